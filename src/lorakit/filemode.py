"""Files we write get the mode a plain `open()` (folders: `mkdir`) would give them under the umask.

Why: safetensors writes 0600 and `tempfile` makes 0600 files and 0700 folders, so anything staged
that way and renamed into place — an adapter, a pulled registry version, a converted model —
would be unreadable to the group a user shares it with, unlike every other file they write.
"""

from __future__ import annotations

import os
from pathlib import Path


def _umask() -> int:
    try:  # Linux: read it without changing it (probing with os.umask is process-wide, not thread-safe)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_mode(path: str | os.PathLike, directory: bool = False) -> None:
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def publish_tree(root: str | os.PathLike) -> None:
    """`publish_mode` on a folder and everything in it."""
    publish_mode(root, directory=True)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            publish_mode(Path(folder) / name, directory=True)
        for name in files:
            publish_mode(Path(folder) / name)
