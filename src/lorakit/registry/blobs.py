"""Content-addressed adapter blobs: a folder stored under the SHA-256 of its files.

The digest covers every file's name and bytes (sorted by name), so identical pushes are
stored once, and a folder whose bytes changed after the push — tampered, truncated, a
bit flipped on disk — no longer matches its digest and is refused on pull and on serve.
A blob is written to a temporary folder beside the store and renamed into place, so a push
that dies midway leaves no half blob (only a temporary folder that `gc` removes).

The store is a local or shared (NFS) path; fsspec URLs are not wired yet.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from lorakit.errors import BlobIntegrityError, RegistryError

_CHUNK = 1 << 20


def folder_digest(folder: Path) -> str:
    """sha256 over (name, sha256 of bytes) of every file in `folder`, in name order (no subfolders)."""
    outer = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        inner = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                inner.update(chunk)
        outer.update(path.name.encode() + b"\0" + inner.hexdigest().encode() + b"\n")
    return outer.hexdigest()


class BlobStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.root / digest

    def put(self, folder: Path) -> tuple[str, int]:
        """Store `folder`'s files (once per content); returns (digest, bytes)."""
        folder = Path(folder)
        if not (folder / "adapter_config.json").is_file():
            raise RegistryError(f"{folder} is not an adapter folder (no adapter_config.json).")
        digest = folder_digest(folder)
        size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        if self.path(digest).is_dir():
            return digest, size
        staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=self.root))
        for item in folder.iterdir():
            if item.is_file():
                shutil.copyfile(item, staging / item.name)
                with (staging / item.name).open("rb") as handle:
                    os.fsync(handle.fileno())
        if folder_digest(staging) != digest:  # the source changed while we copied it
            shutil.rmtree(staging)
            raise RegistryError(f"{folder} changed while it was being pushed; push it again.")
        try:
            os.rename(staging, self.path(digest))
        except OSError:  # another push of the same content won the race
            shutil.rmtree(staging, ignore_errors=True)
        return digest, size

    def verify(self, digest: str) -> Path:
        """The blob's folder, after checking its files still hash to `digest`."""
        path = self.path(digest)
        if not path.is_dir():
            raise BlobIntegrityError(f"Blob {digest[:12]} is missing from {self.root}.")
        actual = folder_digest(path)
        if actual != digest:
            raise BlobIntegrityError(f"Blob {digest[:12]} in {self.root} does not match its digest (now {actual[:12]}): "
                                     "its files were changed after the push. Refusing it; push the adapter again.")
        return path

    def copy_to(self, digest: str, destination: Path) -> Path:
        """Copy a verified blob to `destination` (atomically: a temporary folder renamed)."""
        source = self.verify(digest)
        destination = Path(destination)
        if destination.exists() and any(destination.iterdir()):
            raise RegistryError(f"{destination} exists and is not empty; choose an empty or new folder.")
        destination.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}-", dir=destination.parent))
        for item in source.iterdir():
            shutil.copyfile(item, staging / item.name)
        if destination.exists():
            destination.rmdir()
        os.rename(staging, destination)
        return destination

    def digests(self) -> set[str]:
        return {p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")}

    def remove(self, digest: str) -> None:
        shutil.rmtree(self.path(digest), ignore_errors=True)

    def remove_incoming(self) -> int:
        """Temporary folders of pushes that died midway."""
        stale = [p for p in self.root.iterdir() if p.name.startswith(".incoming-")]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return len(stale)
