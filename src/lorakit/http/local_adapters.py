"""Adapter folders on the server's own disk (`--adapter`, `--adapter-dir`, the admin API), and the one
check they all pass before anything is loaded.

An adapter directory is a trust boundary: whoever can put a folder there (or a symlink in a
folder) must not make the server read a file elsewhere on the machine, nor load an adapter of
any size. So every way in — start-up and the admin API alike — checks that the folder and every
file in it resolve (symlinks followed) inside the allowed roots, and that their bytes stay under
`--max-adapter-size`. Start-up is no looser than the API: a folder that fails is not served, the
server says why when it starts, and a request for it gets a 400 with the same reason.
"""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import AdapterConfigError, ConfigError
from lorakit.files.format import read_config


def adapter_folders(directory: Path) -> dict[str, Path]:
    """{folder name: folder} for every adapter folder directly inside `directory`."""
    if not directory.is_dir():
        raise ConfigError(f"--adapter-dir {directory} is not a directory.")
    return {p.name: p for p in sorted(directory.iterdir()) if (p / "adapter_config.json").is_file()}


def folder_problem(folder: Path, roots: list[Path] | None, max_bytes: int, shown: str | None = None) -> str | None:
    """Why the adapter folder may not be loaded (a file resolving outside `roots`, over `max_bytes`, or an
    adapter_config.json that does not read as one), or None. `roots=None`: any place (an operator's explicit
    `--adapter NAME=PATH`), the size cap still holds."""
    shown = shown or str(folder)
    real_folder = folder.resolve()
    files = list(real_folder.iterdir()) if real_folder.is_dir() else [real_folder]
    if roots is not None:
        resolved_roots = [root.resolve() for root in roots]
        for item in [folder, *files]:
            real = item.resolve()
            if not any(real.is_relative_to(root) for root in resolved_roots):
                return (f"adapter {shown!r} resolves outside the server's adapter directories ({item.name} -> {real}); "
                        f"adapters are loaded only from {', '.join(map(str, roots))}.")
    size = sum(f.stat().st_size for f in files if f.is_file())
    if size > max_bytes:
        return (f"The adapter at {shown!r} is {size / 2**20:.1f} MiB, over the server's cap of "
                f"{max_bytes / 2**20:.0f} MiB (--max-adapter-size).")
    config = real_folder / "adapter_config.json"
    if real_folder.is_dir() and config.is_file():  # a missing one: the loader says so, with PEFT's hints
        try:
            read_config(config)
        except AdapterConfigError as error:
            return f"adapter {shown!r}: " + str(error).replace(str(config), "adapter_config.json")
    return None
