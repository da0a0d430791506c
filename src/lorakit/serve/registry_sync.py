"""A server that follows the registry: `lorakit serve --registry URL`.

Model names in requests: `NAME` (its default alias, `prod` unless `--registry-alias`),
`NAME:alias`, `NAME@N`. A poller reads every alias in one query every `--registry-poll`
seconds (polling, not notification: it works the same on SQLite and on PostgreSQL, and the
bound is the poll interval plus one load); when an alias moves — a promote, a rollback — the
new version is loaded under the same model name with the server's in-place semantics:
requests already admitted finish on the old version, new ones get the new. Several servers
on one database switch within one poll of each other.

Nothing unsafe is served: a blob whose files no longer match their digest is refused, and so
is a version whose recorded base fingerprint does not match this server's base. When an alias
moves to such a version, the version it served before keeps serving (logged, and shown in
/v1/models as `held_back`); a name that never had a good version answers 400 saying why —
never the wrong weights. A registry name that is also a local adapter's name (`--adapter`,
`--adapter-dir`, the admin API) is not served from the registry: the local adapter keeps it,
the server says so when it sees the clash, and the registry version stays reachable as
`NAME:alias` and `NAME@N`. The sync only ever loads or unloads the names it serves itself.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy.exc import SQLAlchemyError

from lorakit.errors import BlobIntegrityError, RegistryError, RegistryUnavailable
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
        self.refused: dict[str, str] = {}  # model name -> why it is not served (no good version to keep)
        self.held_back: dict[str, str] = {}  # model name -> why its alias's new version is not served (yet)
        self.clashes: set[str] = set()  # registry names a local adapter holds (reported once each)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what a request's model names ------------------------------------------------------
    def owns(self, model: str) -> bool:
        """Whether `model` is a name this sync serves (the admin API leaves those to the registry)."""
        return model in self.current

    def knows(self, model: str) -> bool:
        """Whether `model` is served from the registry; a pinned `NAME@N` is looked up on first use.
        Raises RegistryUnavailable when the database cannot be reached."""
        if model in self.current:
            return True
        if model in self.refused:  # asked before and refused: the reason stands (a version's blob never changes)
            return False
        try:
            ref = parse_ref(model)
        except RegistryError:
            return False
        if ref.version is None:
            return False
        try:
            info = self.registry.show(ref)
            self._serve(model, info.name, info.version, info.digest)
        except RegistryError:
            return False
        except SQLAlchemyError as error:
            raise RegistryUnavailable(f"The adapter registry cannot be reached ({type(error).__name__}); "
                                      "retry shortly.") from None
        return model in self.current

    def card(self, model: str) -> dict | None:
        """What /v1/models shows of a registry model: its root (the blob digest, not a server path), the
        version served and, when the alias moved to a version this server refuses, why it held back."""
        entry = self.current.get(model)
        if entry is None:
            return None
        name = model.split(":")[0].split("@")[0]
        return {"root": f"sha256:{entry[1]}", "registry": {"ref": f"{name}@{entry[0]}",
                                                          "held_back": self.held_back.get(model)}}

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
            cache = self.engine.adapters
            if model in cache.names() and model not in self.current:  # a local adapter holds this name
                if model not in self.clashes:
                    self.clashes.add(model)
                    _log.warning("registry adapter %r is not served under that name: a local adapter (--adapter, "
                                 "--adapter-dir or the admin API) has it; ask for %s:%s or %s@N for the registry's.",
                                 model, name, self.default_alias, name)
                return
            info = self.registry.show(Ref(name, version))
            try:
                folder = self.registry.blob_folder(info)  # re-hashed: a tampered blob is refused
                reason = self._other_base(info, folder)
            except BlobIntegrityError as error:
                reason = f"{info.ref}: {error}"
            if reason is not None:
                self._refuse(model, info.ref, reason)
                return
            if cache.is_resident(model):
                cache.load(model, folder, replace=True, label=f"{info.ref}").result()  # running requests keep the old
            else:
                cache.register(model, folder, label=f"{info.ref}")  # loaded on first use
            self.current[model] = (version, digest)
            self.refused.pop(model, None)
            self.held_back.pop(model, None)
            _log.info("%s -> %s@%d", model, name, version)

    def _other_base(self, info, folder) -> str | None:
        saved = read_adapter(folder).fingerprint
        result = compare(saved, self.fingerprint) if saved is not None else None
        if result is None or result.match:
            return None
        return (f"{info.ref} was trained on another base ({info.base_model}: {result.reason}); this server serves a "
                "different base, so it refuses it.")

    def _refuse(self, model: str, ref: str, reason: str) -> None:
        """Not serving `ref` as `model`: keep the version served now if there is one, else refuse the name."""
        if model in self.current:
            if self.held_back.get(model) != reason:
                _log.warning("%s now points to %s, which this server refuses (%s); it keeps serving %s.", model, ref,
                             reason, self.card(model)["registry"]["ref"])
            self.held_back[model] = reason
        else:
            self.refused[model] = reason

    def _drop(self, model: str, reason: str) -> None:
        self.refused[model] = reason
        self.held_back.pop(model, None)
        if self.current.pop(model, None) is not None and model in self.engine.adapters.names():
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
