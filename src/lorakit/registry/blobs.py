"""Content-addressed adapter blobs: a folder stored under the SHA-256 of its files, on any fsspec
filesystem — a local or shared (NFS) path, or a URL (`s3://…`, `gs://…`, `memory://…`).

The digest covers every file's name and bytes (sorted by name), so identical pushes are
stored once, and a blob whose bytes changed after the push — tampered, truncated, a bit
flipped — no longer matches its digest and is refused on pull and on serve. A blob is
uploaded into a temporary folder beside the store and moved into place: on a local disk that
is an atomic rename; on an object store the move is a copy, and the digest check on every read
is what guarantees that a half-written blob is never used. Blobs on a remote filesystem are
read through a local cache of verified copies (the loader needs files on disk).

Deleting is two-phase, so `gc` can race a push of the same content safely: a blob is first
renamed aside (`doom`), then the database is asked again whether anything refers to it, and only
then purged — or renamed back (`restore`). Temporary folders carry their creation time in their
name (`.incoming-<unix time>-<uuid>`), so `gc` removes only those of pushes that died long ago,
on any filesystem, never those of a push in flight.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from lorakit.errors import BlobIntegrityError, RegistryError
from lorakit.filemode import publish_mode

_CHUNK = 1 << 20
_INCOMING = ".incoming-"
_DOOMED = ".doomed-"


def _temporary_name(prefix: str, suffix: str = "") -> str:
    return f"{prefix}{int(time.time())}-{uuid.uuid4().hex}{suffix}"


def _age(name: str, prefix: str, now: float) -> float:
    """Seconds since a temporary folder named by `_temporary_name` was made (inf for an older naming)."""
    stamp = name.removeprefix(prefix).split("-", 1)[0]
    return now - int(stamp) if stamp.isdigit() else float("inf")


def _digest_of(files: list[tuple[str, object]], open_file) -> str:
    """sha256 over (name, sha256 of bytes) of each file, in name order."""
    outer = hashlib.sha256()
    for name, handle in sorted(files, key=lambda item: item[0]):
        inner = hashlib.sha256()
        with open_file(handle) as stream:
            while chunk := stream.read(_CHUNK):
                inner.update(chunk)
        outer.update(name.encode() + b"\0" + inner.hexdigest().encode() + b"\n")
    return outer.hexdigest()


def folder_digest(folder: Path) -> str:
    """The digest of a local folder's files (no subfolders)."""
    return _digest_of([(p.name, p) for p in Path(folder).iterdir() if p.is_file()], lambda p: p.open("rb"))


class BlobStore:
    def __init__(self, root: str | os.PathLike, cache: Path | None = None):
        self.fs, self.root = fsspec.core.url_to_fs(str(root))
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.fs.makedirs(self.root, exist_ok=True)
        if cache is None:
            from lorakit.base_models import cache_dir

            cache = cache_dir() / "blob-cache"
        self.cache = Path(cache)

    def url(self, digest: str) -> str:
        return f"{self.root.rstrip('/')}/{digest}"

    def _remote_digest(self, path: str) -> str:
        files = [(Path(e["name"]).name, e["name"]) for e in self.fs.ls(path, detail=True) if e["type"] == "file"]
        return _digest_of(files, lambda name: self.fs.open(name, "rb"))

    def put(self, folder: Path, digest: str | None = None) -> tuple[str, int]:
        """Store `folder`'s files (once per content); returns (digest, bytes). With `digest` (what the
        caller hashed and claimed before), a folder that no longer hashes to it is refused."""
        folder = Path(folder)
        if not (folder / "adapter_config.json").is_file():
            raise RegistryError(f"{folder} is not an adapter folder (no adapter_config.json).")
        digest = digest or folder_digest(folder)
        size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        if self.fs.isdir(self.url(digest)):
            return digest, size
        staging = f"{self.root.rstrip('/')}/{_temporary_name(_INCOMING)}"
        self.fs.makedirs(staging, exist_ok=True)
        for item in folder.iterdir():
            if item.is_file():
                self.fs.put_file(str(item), f"{staging}/{item.name}")
        if self._remote_digest(staging) != digest:  # the source changed while it was uploaded
            self.fs.rm(staging, recursive=True)
            raise RegistryError(f"{folder} changed while it was being pushed; push it again.")
        try:
            if self.fs.isdir(self.url(digest)):  # another push of the same content won the race
                raise FileExistsError
            self.fs.mv(staging, self.url(digest), recursive=True)
        except OSError:
            self.fs.rm(staging, recursive=True)
        return digest, size

    def verify(self, digest: str) -> Path:
        """A local folder holding the blob's files, checked against `digest` (for a remote store: a verified
        copy in the local cache)."""
        if not self.fs.isdir(self.url(digest)):
            raise BlobIntegrityError(f"Blob {digest[:12]} is missing from the registry's blob store.")
        if self.is_local:
            folder = Path(self.url(digest))
        else:
            folder = self.cache / digest
            if not folder.is_dir():
                self.cache.mkdir(parents=True, exist_ok=True)
                staging = Path(tempfile.mkdtemp(prefix=_INCOMING, dir=self.cache))
                self.fs.get(f"{self.url(digest)}/", f"{staging}/", recursive=True)
                if folder.exists():  # another reader fetched it meanwhile
                    shutil.rmtree(staging)
                else:
                    os.replace(staging, folder)
        actual = folder_digest(folder)
        if actual != digest:
            if not self.is_local:
                shutil.rmtree(folder, ignore_errors=True)  # a bad download or a tampered store: fetch again next time
            raise BlobIntegrityError(f"Blob {digest[:12]} does not match its digest (now {actual[:12]}): its files "
                                     "were changed after the push. Refusing it; push the adapter again.")
        return folder

    def copy_to(self, digest: str, destination: Path) -> Path:
        """Copy a verified blob to `destination` (atomically: a temporary folder renamed)."""
        source = self.verify(digest)
        destination = Path(destination)
        if destination.exists() and not destination.is_dir():
            raise RegistryError(f"{destination} is a file; pull into a new or empty folder.")
        if destination.exists() and any(destination.iterdir()):
            raise RegistryError(f"{destination} exists and is not empty; choose an empty or new folder.")
        destination.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}-", dir=destination.parent))
        for item in source.iterdir():
            shutil.copyfile(item, staging / item.name)
            publish_mode(staging / item.name)
        publish_mode(staging, directory=True)  # mkdtemp makes it 0700: the pulled folder is the user's, as mkdir's
        if destination.exists():
            destination.rmdir()
        os.rename(staging, destination)
        return destination

    def digests(self) -> set[str]:
        names = {Path(e["name"]).name for e in self.fs.ls(self.root, detail=True) if e["type"] == "directory"}
        return {n for n in names if not n.startswith(".")}

    def doom(self, digest: str) -> str | None:
        """Rename a blob aside before deleting it (None if it is gone already); see the module docstring."""
        doomed = f"{self.root.rstrip('/')}/{_temporary_name(_DOOMED, '-' + digest)}"
        try:
            self.fs.mv(self.url(digest), doomed, recursive=True)
        except (FileNotFoundError, OSError):
            return None
        return doomed

    def restore(self, doomed: str, digest: str) -> None:
        """Put a doomed blob back (a push claimed it meanwhile); if that push wrote it anew, drop the copy."""
        if self.fs.isdir(self.url(digest)):
            self.fs.rm(doomed, recursive=True)
            return
        try:
            self.fs.mv(doomed, self.url(digest), recursive=True)
        except OSError:  # written anew between the check and the move
            self.fs.rm(doomed, recursive=True)

    def purge(self, doomed: str, digest: str) -> None:
        self.fs.rm(doomed, recursive=True)
        shutil.rmtree(self.cache / digest, ignore_errors=True)

    def doomed(self) -> list[tuple[str, str]]:
        """(path, digest) of blobs a gc renamed aside and did not finish with (it died midway)."""
        return [(e["name"], Path(e["name"]).name.rsplit("-", 1)[-1]) for e in self.fs.ls(self.root, detail=True)
                if Path(e["name"]).name.startswith(_DOOMED)]

    def remove_incoming(self, older_than: float = 0.0) -> int:
        """Temporary folders of pushes that died midway: those made more than `older_than` seconds ago."""
        now = time.time()
        stale = [e["name"] for e in self.fs.ls(self.root, detail=True)
                 if Path(e["name"]).name.startswith(_INCOMING) and _age(Path(e["name"]).name, _INCOMING, now) > older_than]
        for path in stale:
            self.fs.rm(path, recursive=True)
        return len(stale)
