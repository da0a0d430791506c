"""Which adapters the engine can use: registered by name → path, resident up to `max_cpu_loras`,
loaded off the step loop, versioned so a running request keeps the adapter it started with.

Names users see ("support") map to *versions* loaded on the model ("support@1", "support@2"):
replacing an adapter loads the new file as a new version and points the name at it; the old
version stays on the model until its last request finishes, then its bank rows are freed.
A cold adapter is loaded by a background thread (a write into the banks between two steps,
adapters.py); its requests wait, the others keep decoding. A load that fails fails only the
requests for that adapter, with the loader's message. Resident adapters beyond
`max_cpu_loras` are evicted least recently used first — never a pinned one, never one in use.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.errors import AdapterNameError, LorakitError


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    loads: int = 0
    load_seconds: float = 0.0


@dataclass
class Version:
    internal: str  # the adapter's name on the model
    users: int = 0  # requests bound to it and not finished
    stale: bool = False  # replaced or unregistered: removed when its last user finishes


@dataclass
class Entry:
    path: Path | None  # None: an adapter put on the model directly (never evicted, never reloaded)
    pinned: bool = False
    current: Version | None = None
    loading: Future | None = None
    error: str | None = None
    versions: int = 0
    old: list[Version] = field(default_factory=list)


class AdapterCache:
    def __init__(self, model, max_cpu_loras: int = 8):
        self.model = model
        self.max_cpu_loras = max_cpu_loras
        self.entries: dict[str, Entry] = {}
        self.recent: OrderedDict[str, None] = OrderedDict()  # resident names, least recently used first
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorakit-adapter-loader")
        for name in list(model.peft_config):  # adapters already on the model: usable, pinned
            self.entries[name] = Entry(path=None, pinned=True, current=Version(name))

    def register(self, name: str, path: str | Path, pinned: bool = False) -> None:
        """Make `name` loadable from `path`; an existing name is replaced (running requests keep theirs)."""
        with self._lock:
            entry = self.entries.get(name)
            if entry is not None and entry.path is None:
                raise AdapterNameError(f"{name!r} was put on the model directly; pick another name.")
            if entry is None:
                entry = self.entries[name] = Entry(Path(path), pinned)
            else:
                entry.path, entry.pinned, entry.error = Path(path), pinned, None
                if entry.current is not None:
                    self._retire(name, entry)
        if pinned:
            self.prefetch(name)

    def prefetch(self, name: str) -> None:
        """Start loading `name` in the background if it is not resident."""
        with self._lock:
            self._start_load(name, self._entry(name))

    def acquire(self, name: str) -> str | None:
        """The version `name` runs as now (counted as used until `release`), or None while it loads.
        Raises the loader's error if loading failed."""
        with self._lock:
            entry = self._entry(name)
            if entry.error is not None:
                raise LorakitError(f"Adapter {name!r} could not be loaded: {entry.error}")
            if entry.current is None:
                self.stats.misses += entry.loading is None
                self._start_load(name, entry)
                return None
            self.stats.hits += 1
            entry.current.users += 1
            self.recent.pop(name, None)
            self.recent[name] = None
            return entry.current.internal

    def release(self, internal: str) -> None:
        with self._lock:
            for entry in self.entries.values():
                for version in ([entry.current] if entry.current else []) + entry.old:
                    if version.internal == internal:
                        version.users -= 1
                        if version.stale and version.users == 0:
                            entry.old.remove(version)
                            self.model.delete_adapter(internal)
                        return

    def failed(self, name: str) -> str | None:
        entry = self.entries.get(name)
        return entry.error if entry else None

    def _entry(self, name: str) -> Entry:
        if name not in self.entries:
            raise AdapterNameError(f"Unknown adapter {name!r}; registered: {sorted(self.entries)}.")
        return self.entries[name]

    def _start_load(self, name: str, entry: Entry) -> None:
        if entry.current is None and entry.loading is None and entry.path is not None:
            entry.loading = self._loader.submit(self._load, name, entry)

    def _load(self, name: str, entry: Entry) -> None:
        start = time.perf_counter()
        internal = f"{name}@{entry.versions + 1}"
        try:
            self.model.load_adapter(entry.path, adapter_name=internal)
        except Exception as error:  # noqa: BLE001 - any failure is reported to this adapter's requests
            with self._lock:
                entry.error, entry.loading = str(error), None
            return
        with self._lock:
            entry.versions += 1
            entry.current, entry.loading = Version(internal), None
            self.stats.loads += 1
            self.stats.load_seconds += time.perf_counter() - start
            self.recent[name] = None
            self._evict()

    def _retire(self, name: str, entry: Entry) -> None:
        """Detach the current version from `name`; delete it now if unused, else when its last user finishes."""
        version, entry.current = entry.current, None
        self.recent.pop(name, None)
        if version.users == 0:
            self.model.delete_adapter(version.internal)
        else:
            version.stale = True
            entry.old.append(version)

    def _evict(self) -> None:
        resident = [n for n in self.recent if self.entries[n].path is not None]
        for name in list(resident):
            if len(resident) <= self.max_cpu_loras:
                return
            entry = self.entries[name]
            if entry.pinned or entry.current.users:
                continue
            self._retire(name, entry)
            resident.remove(name)
            self.stats.evictions += 1

    def close(self) -> None:
        self._loader.shutdown(wait=True)
