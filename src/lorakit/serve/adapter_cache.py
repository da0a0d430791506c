"""Which adapters the engine can use: registered by name → path, resident up to `max_cpu_loras`,
loaded off the step loop, versioned so a running request keeps the adapter it started with.

Names users see ("support") map to *versions* loaded on the model ("support@1", "support@2"):
replacing an adapter loads the new file as a new version and then points the name at it; the
old version stays on the model until its last request finishes, then its bank rows are freed.
A cold adapter is loaded by a background thread (a write into the banks between two steps,
adapters.py); its requests wait, the others keep decoding. A load that fails fails only the
requests for that adapter, with the loader's message.

Resident adapters beyond `max_cpu_loras` are evicted least recently used first — never a pinned
one, never one in use, never one a queued request waits for (its `waiter`, until it binds): with
10 adapters in turn and room for 2, evicting an adapter just loaded for a request that has not run
yet would load it again, and again (87 loads for 10 adapters before this rule). A load for a
waiting request starts only when there is room — under the cap, or an idle adapter to evict —
so the cap holds, and the request waits for a running one to finish instead.

Two ways in: `register` (lazy: loaded on first use, as a server's `--adapter-dir` wants for
hundreds of adapters) and `load` (now, on the loader thread, all-or-nothing: the admin API
reports the loader's error and a failed replacement leaves the old version serving).
Model changes (load, delete) never run under this cache's lock, so a caller that only asks
for a version (a server's event loop) never waits for a forward to end.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.errors import AdapterLoadError, AdapterNameError


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    loads: int = 0
    load_seconds: float = 0.0


@dataclass
class Version:
    internal: str  # the adapter's name on the model ("support@2")
    users: int = 0  # requests bound to it and not finished
    stale: bool = False  # replaced, evicted or unregistered: removed when its last user finishes


@dataclass
class Registered:
    path: Path | None  # None: an adapter put on the model directly (never evicted, never reloaded)
    pinned: bool = False
    current: Version | None = None
    loading: Future | None = None
    error: str | None = None
    label: str | None = None  # what errors call the adapter instead of its path (a registry ref)
    waiters: set[int] = field(default_factory=set)  # queued requests waiting for it, not bound yet


class AdapterCache:
    def __init__(self, model, max_cpu_loras: int = 8):
        self.model = model
        self.max_cpu_loras = max_cpu_loras
        self.stats = CacheStats()
        self._entries: dict[str, Registered] = {}
        self._versions: dict[str, Version] = {}  # every version on the model, current or stale, by internal name
        self._recent: OrderedDict[str, None] = OrderedDict()  # resident names, least recently used first
        self._numbers: dict[str, int] = {}  # last version number per name, kept after unload: never reused
        self._lock = threading.Lock()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorakit-adapter-loader")
        for name in list(model.peft_config):  # adapters already on the model: usable, pinned
            self._entries[name] = Registered(path=None, pinned=True, current=self._version(name))

    # -- registering ------------------------------------------------------------------------------
    def register(self, name: str, path: str | Path, pinned: bool = False, label: str | None = None) -> None:
        """Make `name` loadable from `path` (loaded on first use); an existing name is replaced (running
        requests keep theirs)."""
        with self._lock:
            entry = self._replaceable(name)
            if entry is None:
                entry = self._entries[name] = Registered(Path(path), pinned, label=label)
            else:
                entry.path, entry.pinned, entry.error, entry.label = Path(path), pinned, None, label
            doomed = self._retire(name, entry)
        self._drop(doomed)
        if pinned:
            self.prefetch(name)

    def load(self, name: str, path: str | Path, replace: bool = False, pinned: bool = False,
             label: str | None = None) -> Future:
        """Load `path` as `name` now, on the loader thread; the future gives the version or the loader's
        error. Nothing changes if it fails; with `replace`, requests running on the old version finish on it."""
        with self._lock:
            if not replace and name in self._entries:
                raise AdapterNameError(f"The lora adapter '{name}' has already been loaded.")
            self._replaceable(name)
        return self._loader.submit(self._load_and_swap, name, Path(path), replace, pinned, label)

    def unload(self, name: str) -> Future:
        """Forget `name`; its version is freed now if unused, else when its last request finishes."""
        with self._lock:
            entry = self._entry(name)
            if entry.path is None:
                raise AdapterNameError(f"{name!r} was put on the model directly and cannot be unloaded.")
            del self._entries[name]
            doomed = self._retire(name, entry)
        return self._loader.submit(self._drop, doomed)

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def path_of(self, name: str) -> Path | None:
        entry = self._entries.get(name)
        return entry.path if entry else None

    def version_of(self, name: str) -> str | None:
        """The version `name` runs as now ("support@2"), None while it is not resident."""
        entry = self._entries.get(name)
        return entry.current.internal if entry is not None and entry.current is not None else None

    def is_resident(self, name: str) -> bool:
        entry = self._entries.get(name)
        return entry is not None and entry.current is not None

    def resident_count(self) -> int:
        return len(self._versions)

    def resident_versions(self) -> list[str]:
        """Every version on the model now, current or on its way out ("support@2")."""
        with self._lock:
            return list(self._versions)

    # -- use by requests ---------------------------------------------------------------------------
    def prefetch(self, name: str) -> None:
        """Start loading `name` in the background if it is not resident."""
        with self._lock:
            self._start_load(name, self._entry(name))

    def acquire(self, name: str, waiter: int | None = None) -> str | None:
        """The version `name` runs as now (counted as used until `release`), or None while it loads (or
        waits for room to load); `waiter` (a request id) keeps it resident once loaded until that request
        acquires it or `forget`s it. Raises the loader's error if loading failed."""
        with self._lock:
            entry = self._entry(name)
            if entry.error is not None:
                raise AdapterLoadError(f"Adapter {name!r} could not be loaded: {entry.error}")
            waited = waiter in entry.waiters
            if entry.current is None:
                if not waited:  # a miss per request that found it cold
                    self.stats.misses += 1
                    if waiter is not None:
                        entry.waiters.add(waiter)
                if self._room():
                    self._start_load(name, entry)
                return None
            entry.waiters.discard(waiter)
            self.stats.hits += not waited
            entry.current.users += 1
            self._recent.pop(name, None)
            self._recent[name] = None
            return entry.current.internal

    def forget(self, name: str, waiter: int) -> None:
        """A request that waited for `name` ended before it acquired it."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None:
                entry.waiters.discard(waiter)

    def retain(self, internal: str) -> None:
        """One more request uses a version it already runs (another choice of the same request)."""
        with self._lock:
            self._versions[internal].users += 1

    def release(self, internal: str) -> None:
        """A request bound to `internal` finished: O(1); a stale version goes with its last user."""
        with self._lock:
            version = self._versions.get(internal)
            if version is None:
                return
            version.users -= 1
            gone = version.stale and version.users == 0
            if gone:
                del self._versions[internal]
        if gone:
            self._drop([internal])

    def failed(self, name: str) -> str | None:
        entry = self._entries.get(name)
        return entry.error if entry else None

    # -- inside ----------------------------------------------------------------------------------------
    def _version(self, internal: str) -> Version:
        version = self._versions[internal] = Version(internal)
        return version

    def _entry(self, name: str) -> Registered:
        if name not in self._entries:
            raise AdapterNameError(f"Unknown adapter {name!r}; registered: {sorted(self._entries)}.")
        return self._entries[name]

    def _replaceable(self, name: str) -> Registered | None:
        entry = self._entries.get(name)
        if entry is not None and entry.path is None:
            raise AdapterNameError(f"{name!r} was put on the model directly; pick another name.")
        return entry

    def _start_load(self, name: str, entry: Registered) -> None:
        if entry.current is None and entry.loading is None and entry.path is not None:
            entry.loading = self._loader.submit(self._load_registered, name, entry, entry.path)

    def _load_version(self, name: str, path: Path, label: str | None) -> str:
        """Put the file at `path` on the model as a new version of `name` (loader thread; raises, naming the
        adapter by `label` instead of its path when it has one: a server never shows its blob store)."""
        with self._lock:
            self._numbers[name] = number = self._numbers.get(name, 0) + 1
        internal = f"{name}@{number}"
        start = time.perf_counter()
        try:
            self.model.load_adapter(path, adapter_name=internal)
        except Exception as error:
            if label is None:
                raise
            raise AdapterLoadError(str(error).replace(str(path), label)) from None
        with self._lock:
            self.stats.loads += 1
            self.stats.load_seconds += time.perf_counter() - start
        return internal

    def _load_registered(self, name: str, entry: Registered, path: Path) -> None:
        try:
            internal = self._load_version(name, path, entry.label)
        except Exception as error:  # noqa: BLE001 - any failure is reported to this adapter's requests
            with self._lock:
                entry.error, entry.loading = str(error), None
            return
        with self._lock:
            entry.loading = None
            if self._entries.get(name) is not entry or entry.path != path:  # unloaded or re-pointed meanwhile
                doomed = [internal]
                if self._entries.get(name) is entry:
                    self._start_load(name, entry)
            else:
                entry.current = self._version(internal)
                self._recent[name] = None
                doomed = self._evict()
        self._drop(doomed)

    def _load_and_swap(self, name: str, path: Path, replace: bool, pinned: bool, label: str | None) -> str:
        internal = self._load_version(name, path, label)  # raises: nothing has changed
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None and not replace:  # another load of this name won the race
                doomed, error = [internal], AdapterNameError(f"The lora adapter '{name}' has already been loaded.")
            else:
                error = None
                if entry is None:
                    entry = self._entries[name] = Registered(path, pinned, label=label)
                    doomed = []
                else:
                    entry.path, entry.pinned, entry.error, entry.label = path, pinned, None, label
                    doomed = self._retire(name, entry)
                entry.current = self._version(internal)
                self._recent[name] = None
                doomed += self._evict()
        self._drop(doomed)
        if error is not None:
            raise error
        return internal

    def _retire(self, name: str, entry: Registered) -> list[str]:
        """Detach the current version from `name` (under the lock): returned to delete now if unused, else
        marked stale, to go when its last user finishes (`release`)."""
        version, entry.current = entry.current, None
        self._recent.pop(name, None)
        if version is None:
            return []
        if version.users == 0:
            del self._versions[version.internal]
            return [version.internal]
        version.stale = True
        return []

    def _resident(self) -> list[str]:
        """Resident names that count against the cap (not the ones put on the model directly), LRU first."""
        return [n for n in self._recent if self._entries[n].path is not None]

    def _idle(self, name: str) -> bool:
        """Evictable: not pinned, no request running on it, none waiting for it."""
        entry = self._entries[name]
        return not entry.pinned and not entry.current.users and not entry.waiters

    def _room(self) -> bool:
        """Whether a load may start now: the versions resident and loading stay within the cap once the idle
        ones are evicted (or pinned adapters alone fill it: then nothing will ever make room, so load)."""
        resident = self._resident()
        loading = sum(e.loading is not None for e in self._entries.values())
        idle = sum(self._idle(n) for n in resident)
        stuck = all(self._entries[n].pinned for n in resident) and not loading
        return len(resident) + loading - idle < self.max_cpu_loras or stuck

    def _evict(self) -> list[str]:
        doomed: list[str] = []
        resident = self._resident()
        for name in list(resident):
            if len(resident) <= self.max_cpu_loras:
                break
            if not self._idle(name):
                continue
            doomed += self._retire(name, self._entries[name])
            resident.remove(name)
            self.stats.evictions += 1
        return doomed

    def _drop(self, internals: list[str]) -> None:
        """Delete versions from the model (outside the lock: this waits for a running forward)."""
        for internal in internals:
            self.model.delete_adapter(internal)

    def close(self) -> None:
        self._loader.shutdown(wait=True)
