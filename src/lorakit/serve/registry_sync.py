"""A server that follows the registry: `lorakit serve --registry URL`.

Model names in requests: `NAME` (its default alias, `prod` unless `--registry-alias`),
`NAME:alias`, `NAME@N`. A poller reads every alias in one query every `--registry-poll`
seconds (polling, not notification: it works the same on SQLite and on PostgreSQL, and the
bound is the poll interval plus one load); when an alias moves — a promote, a rollback — the
new version is loaded under the same model name with the server's in-place semantics:
requests already admitted finish on the old version, new ones get the new. Several servers
on one database switch within one poll of each other.

Nothing unsafe is served: a blob whose files no longer match their digest is refused, and so
is a version whose recorded base fingerprint does not match this server's base — the request
gets a 400 saying why, never the wrong weights.
"""

from __future__ import annotations

import logging
import threading

from lorakit.errors import BlobIntegrityError, RegistryError
from lorakit.files.fingerprint import compare
from lorakit.files.format import read_adapter
from lorakit.registry.refs import Ref, parse_ref
from lorakit.registry.store import Registry

_log = logging.getLogger(__name__)


class RegistrySync:
    def __init__(self, registry: Registry, engine, default_alias: str = "prod", poll_s: float = 2.0):
        self.registry, self.engine = registry, engine
        self.default_alias, self.poll_s = default_alias, poll_s
        self.fingerprint = engine.model.base_fingerprint
        self.current: dict[str, tuple[int, str]] = {}  # served model name -> (version, digest)
        self.refused: dict[str, str] = {}  # model name -> why it is not served
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what a request's model names ------------------------------------------------------
    def knows(self, model: str) -> bool:
        """Whether `model` is served from the registry; a pinned `NAME@N` is looked up on first use."""
        if model in self.current:
            return True
        try:
            ref = parse_ref(model)
        except RegistryError:
            return False
        if ref.version is None:
            return False
        try:
            info = self.registry.show(ref)
        except RegistryError:
            return False
        self._serve(model, info.name, info.version, info.digest)
        return model in self.current

    def root_of(self, model: str) -> str | None:
        entry = self.current.get(model)
        return f"sha256:{entry[1]}" if entry else None

    # -- following the aliases --------------------------------------------------------------------------
    def sync(self) -> None:
        """Bring every alias-named model in line with the registry (one query, loads only for changes)."""
        wanted: dict[str, tuple[str, int, str]] = {}
        for (name, alias), (version, digest) in self.registry.all_aliases().items():
            wanted[f"{name}:{alias}"] = (name, version, digest)
            if alias == self.default_alias:
                wanted[name] = (name, version, digest)
        for model, (name, version, digest) in wanted.items():
            if self.current.get(model) != (version, digest):
                self._serve(model, name, version, digest)
        for model in [m for m in self.current if m not in wanted and "@" not in m]:  # the alias is gone
            self._drop(model, f"{model} no longer exists in the registry.")

    def _serve(self, model: str, name: str, version: int, digest: str) -> None:
        with self._lock:
            info = self.registry.show(Ref(name, version))
            try:
                folder = self.registry.blob_folder(info)  # re-hashed: a tampered blob is refused
            except BlobIntegrityError as error:
                self._drop(model, str(error))
                return
            reason = self._other_base(info, folder)
            if reason is not None:
                self._drop(model, reason)
                return
            cache = self.engine.adapters
            if model in cache.entries and cache.entries[model].current is not None:
                cache.load(model, folder, replace=True).result()  # in place: running requests keep the old
            else:
                cache.register(model, folder)  # loaded on first use
            self.current[model] = (version, digest)
            self.refused.pop(model, None)
            _log.info("%s -> %s@%d", model, name, version)

    def _other_base(self, info, folder) -> str | None:
        saved = read_adapter(folder).fingerprint
        result = compare(saved, self.fingerprint) if saved is not None else None
        if result is None or result.match:
            return None
        return (f"{info.ref} was trained on another base ({info.base_model}: {result.reason}); this server serves a "
                "different base, so it refuses it.")

    def _drop(self, model: str, reason: str) -> None:
        self.refused[model] = reason
        self.current.pop(model, None)
        if model in self.engine.adapters.entries:
            self.engine.adapters.unload(model).result()

    # -- the poller ----------------------------------------------------------------------------------------
    def start(self) -> None:
        self.sync()
        self._thread = threading.Thread(target=self._loop, name="lorakit-registry-sync", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.sync()
            except Exception:  # noqa: BLE001 - a database hiccup must not stop serving; next poll retries
                _log.exception("registry sync failed; retrying in %.1f s", self.poll_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
