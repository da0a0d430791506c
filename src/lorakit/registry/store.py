"""`Registry`: adapters as versioned artefacts — push, resolve, pull, promote, roll back, delete, gc.

    registry = Registry()                      # $LORAKIT_REGISTRY, else ~/.cache/lorakit/registry
    v = registry.push("support", "runs/support/adapter", alias="staging")
    registry.promote("support@2", "prod", gates=[Gate.parse("exact_match>=0.9")], evaluate=...)
    registry.rollback("support", "prod")       # back to the version prod held before

Safety: a push claims its digest (a pending row), writes the blob, and commits its version row
last, in one transaction with its audit entry and the claim's removal — so a crash leaves at
most an unreferenced blob (`gc` removes it), never a half version, and `gc` never removes the
blob of a push in flight. Every change to one adapter's versions or aliases locks its adapter
row first (a row lock on PostgreSQL, the write lock on SQLite), so a check and the change it
guards (delete vs. a promote, the next version number) see the same state. Version numbers are
never reused, even after the newest is deleted (the audit log remembers every push); every
pull and every served blob is re-hashed against its digest; a promotion refuses a blob that
no longer verifies and, unless told the base changed on purpose, a version trained on another
base than the one the alias serves now.
"""

from __future__ import annotations

import getpass
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sqlalchemy import create_engine, delete, func, select, update
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session

from lorakit.errors import RegistryError, RegistryNotFound
from lorakit.files.fingerprint import compare, short_id
from lorakit.files.format import read_adapter
from lorakit.registry.blobs import BlobStore, folder_digest
from lorakit.registry.gates import Gate
from lorakit.registry.refs import Ref, check_name, parse_ref
from lorakit.registry.tables import AdapterRow, AliasRow, AuditRow, Base, PendingRow, VersionRow, now

DEFAULT_ALIAS = "prod"
GC_GRACE_S = 3600.0  # gc leaves claims and temporary folders younger than this: a push in flight owns them

# evaluate(version, its verified folder) -> scores, for promotion gates and the regression check
Evaluate = Callable[["VersionInfo", Path], dict]


def default_location() -> tuple[str, str]:
    """(database URL, blob folder): $LORAKIT_REGISTRY as a folder or a URL (then blobs in
    $LORAKIT_REGISTRY_BLOBS), else ~/.cache/lorakit/registry."""
    value = os.environ.get("LORAKIT_REGISTRY") or str(Path.home() / ".cache" / "lorakit" / "registry")
    if "://" in value:
        blobs = os.environ.get("LORAKIT_REGISTRY_BLOBS")
        if not blobs:
            raise RegistryError(f"LORAKIT_REGISTRY={value} is a database URL; set LORAKIT_REGISTRY_BLOBS to the blob "
                                "folder every machine shares (or pass --blobs).")
        return value, blobs
    return folder_location(value)


def folder_location(folder: str | os.PathLike) -> tuple[str, str]:
    """The embedded registry kept in one folder: a SQLite file and a blob folder beside it."""
    root = Path(folder).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'registry.db'}", str(root / "blobs")


@dataclass
class VersionInfo:
    name: str
    version: int
    digest: str
    size_bytes: int
    base_model: str | None
    fingerprint: str
    method: str
    config: dict
    created_at: str
    created_by: str
    notes: str
    source_run: str | None
    data_digest: str | None
    parent: str | None
    metrics: dict
    aliases: list[str] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict:
        return asdict(self)


class Registry:
    @classmethod
    def open(cls, location: str | None, blobs: str | None = None, actor: str | None = None) -> Registry:
        """A registry from what a user types: a folder (the embedded SQLite registry in it), a database URL
        (with `blobs`), or None ($LORAKIT_REGISTRY, else ~/.cache/lorakit/registry)."""
        if location and "://" not in location:
            url, folder_blobs = folder_location(location)
            return cls(url, blobs or folder_blobs, actor)
        return cls(location, blobs, actor)

    def __init__(self, url: str | None = None, blobs: str | os.PathLike | None = None, actor: str | None = None):
        """`url`: any SQLAlchemy URL; `blobs`: a folder or an fsspec URL (both default to default_location())."""
        if url is None or blobs is None:
            default_url, default_blobs = default_location() if url is None else (url, None)
            url, blobs = url or default_url, blobs or default_blobs
            if blobs is None:
                raise RegistryError(f"{url}: give the blob folder too (--blobs or LORAKIT_REGISTRY_BLOBS).")
        self.url = url
        sqlite = url.startswith("sqlite")
        self.engine = create_engine(url, connect_args={"timeout": 60} if sqlite else {}, pool_pre_ping=True)
        try:
            self._retry(lambda: Base.metadata.create_all(self.engine))  # several processes may start at once
        except OperationalError as error:
            raise RegistryError(f"Cannot open the registry database {self.engine.url!r}: {error.orig}") from None
        self.blobs = BlobStore(blobs)
        self.actor = actor or f"{getpass.getuser()}@{socket.gethostname()}"

    # -- writing ----------------------------------------------------------------------------------
    def push(self, name: str, folder: str | os.PathLike, alias: str | None = None, notes: str = "",
             source_run: str | None = None, data_digest: str | None = None, metrics: dict | None = None,
             train_config: str | None = None, parent: str | None = None) -> VersionInfo:
        """Store `folder` as the next version of `name` (and point `alias` at it)."""
        check_name(name)
        if alias is not None:
            check_name(alias, "alias")
        files = read_adapter(folder)  # a push is checked like a load: no broken or pickled adapter gets in
        config = files.config.to_dict()
        digest = folder_digest(Path(folder))
        claim = self.transaction(lambda s: self._claim(s, digest))  # before the blob: gc keeps it from now on
        try:
            _, size = self.blobs.put(Path(folder), digest)
        except BaseException:
            self.transaction(lambda s: s.execute(delete(PendingRow).where(PendingRow.id == claim)))
            raise

        def commit(session: Session) -> int:  # the row last, with its audit entry, releasing the claim
            if session.execute(delete(PendingRow).where(PendingRow.id == claim)).rowcount != 1:
                raise RegistryError(f"Pushing {name} took longer than `gc`'s grace period, so gc may have removed "
                                    "its files; push it again.")
            adapter = self.adapter_row(session, name, create=True, lock=True)
            pushed = session.scalar(select(func.max(AuditRow.version)).where(AuditRow.adapter == name,
                                                                              AuditRow.action == "push"))
            newest = session.scalar(select(func.max(VersionRow.number)).where(VersionRow.adapter_id == adapter.id))
            number = max(pushed or 0, newest or 0) + 1  # never a number used before, even if deleted since
            session.add(VersionRow(
                adapter_id=adapter.id, number=number, digest=digest, size_bytes=size,
                base_model=files.metadata.get("lorakit.base_model") or config.get("base_model_name_or_path"),
                base_fingerprint=files.fingerprint, method=str(config.get("peft_type")), config=config,
                created_by=self.actor, notes=notes, source_run=source_run, data_digest=data_digest, parent=parent,
                metrics=metrics or {}, train_config=train_config))
            self.audit(session, "push", name, number, details={"digest": digest, "parent": parent})
            if alias:
                session.flush()
                self.point(session, adapter, name, alias, number, "alias")
            return number

        return self.show(Ref(name, self.transaction(commit)))

    def promote(self, ref: str, alias: str, gates: list[Gate] | None = None, data: Path | None = None,
                evaluate: Evaluate | None = None, allow_regression: bool = False, new_base: bool = False) -> dict:
        """Point `alias` at `ref` after the checks of promotion.py; {"version", "previous", "changed", "scores"}."""
        from lorakit.registry.promotion import promote

        return promote(self, ref, alias, gates, data, evaluate, allow_regression, new_base)

    def rollback(self, name: str, alias: str = DEFAULT_ALIAS) -> dict:
        """Point `alias` back at the version it held before its latest promotion to what it holds now."""
        from lorakit.registry.promotion import rollback

        return rollback(self, name, alias)

    def gc(self, grace: float = GC_GRACE_S) -> dict:
        """Delete blobs nothing refers to, and temporary folders older than `grace` seconds (gc.py)."""
        from lorakit.registry.gc import collect

        return collect(self, grace)

    def delete(self, ref: str) -> None:
        """Remove a version (refused while an alias points to it); its blob goes at the next `gc`."""
        info = self.resolve(ref)

        def drop(session: Session) -> None:
            adapter = self.adapter_row(session, info.name, lock=True)  # checked and deleted under one lock
            aliases = sorted(session.scalars(select(AliasRow.alias).where(AliasRow.adapter_id == adapter.id,
                                                                          AliasRow.version == info.version)))
            if aliases:
                raise RegistryError(f"{info.ref} is what {', '.join(f'{info.name}:{a}' for a in aliases)} points to; "
                                    "move or roll back the alias first.")
            row = session.scalars(select(VersionRow).where(VersionRow.adapter_id == adapter.id,
                                                           VersionRow.number == info.version)).first()
            if row is None:
                raise RegistryNotFound(f"{info.ref} is not in the registry (deleted meanwhile).")
            session.delete(row)
            self.audit(session, "delete", info.name, info.version, details={"digest": info.digest})

        self.transaction(drop)

    # -- reading -----------------------------------------------------------------------------------------
    def resolve(self, ref: str | Ref, default_alias: str | None = None) -> VersionInfo:
        """NAME@N, NAME:alias, or NAME (its `default_alias` if given, else its newest version)."""
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        if ref.version is None:
            alias = ref.alias or default_alias
            if alias is not None:
                number = self.aliases(ref.name).get(alias)
                if number is None:
                    raise RegistryNotFound(f"{ref.name} has no alias {alias!r} (aliases: "
                                           f"{sorted(self.aliases(ref.name)) or 'none'}).")
                ref = Ref(ref.name, number)
        return self.show(ref)

    def show(self, ref: str | Ref) -> VersionInfo:
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        if ref.alias is not None:
            return self.resolve(ref)
        with Session(self.engine) as session:
            adapter = self.adapter_row(session, ref.name)
            query = select(VersionRow).where(VersionRow.adapter_id == adapter.id)
            row = session.scalars(query.where(VersionRow.number == ref.version) if ref.version
                                  else query.order_by(VersionRow.number.desc())).first()
            if row is None:
                raise RegistryNotFound(f"{ref} is not in the registry ({self.url}).")
            return self._info(session, ref.name, row)

    def versions(self, name: str) -> list[VersionInfo]:
        with Session(self.engine) as session:
            adapter = self.adapter_row(session, name)
            rows = session.scalars(select(VersionRow).where(VersionRow.adapter_id == adapter.id)
                                   .order_by(VersionRow.number))
            return [self._info(session, name, row) for row in rows]

    def names(self) -> list[str]:
        with Session(self.engine) as session:
            return list(session.scalars(select(AdapterRow.name).order_by(AdapterRow.name)))

    def aliases(self, name: str) -> dict[str, int]:
        with Session(self.engine) as session:
            adapter = session.scalars(select(AdapterRow).where(AdapterRow.name == name)).first()
            if adapter is None:
                raise RegistryNotFound(f"No adapter named {name!r} in the registry ({self.url}).")
            return {row.alias: row.version for row in
                    session.scalars(select(AliasRow).where(AliasRow.adapter_id == adapter.id))}

    def all_aliases(self) -> dict[tuple[str, str], tuple[int, str]]:
        """{(name, alias): (version, digest)} in one query: what a server polls."""
        with Session(self.engine) as session:
            rows = session.execute(select(AdapterRow.name, AliasRow.alias, AliasRow.version, VersionRow.digest)
                                   .join(AliasRow, AliasRow.adapter_id == AdapterRow.id)
                                   .join(VersionRow, (VersionRow.adapter_id == AdapterRow.id)
                                         & (VersionRow.number == AliasRow.version)))
            return {(n, a): (v, d) for n, a, v, d in rows}

    def log(self, name: str | None = None) -> list[dict]:
        with Session(self.engine) as session:
            query = select(AuditRow).order_by(AuditRow.id)
            rows = session.scalars(query.where(AuditRow.adapter == name) if name else query)
            return [{"at": r.at.isoformat(), "actor": r.actor, "action": r.action, "adapter": r.adapter,
                     "version": r.version, "alias": r.alias, "previous": r.previous, "details": r.details}
                    for r in rows]

    def pull(self, ref: str, destination: str | os.PathLike) -> Path:
        """Copy a version's files to `destination`, after re-hashing them against its digest."""
        return self.blobs.copy_to(self.resolve(ref).digest, Path(destination))

    def blob_folder(self, info: VersionInfo) -> Path:
        """The stored folder of a version, verified (a server loads straight from it)."""
        return self.blobs.verify(info.digest)

    def check(self, fingerprint: dict) -> list[dict]:
        """Every version, and whether its recorded base fingerprint matches `fingerprint`."""
        with Session(self.engine) as session:
            rows = session.execute(select(AdapterRow.name, VersionRow).join(VersionRow, VersionRow.adapter_id == AdapterRow.id)
                                   .order_by(AdapterRow.name, VersionRow.number)).all()
            out = []
            for name, row in rows:
                result = compare(row.base_fingerprint, fingerprint) if row.base_fingerprint else None
                out.append({"ref": f"{name}@{row.number}", "base_model": row.base_model,
                            "match": result.match if result else None,
                            "reason": result.reason if result else "no fingerprint recorded"})
            return out

    def source_run_of(self, folder: str | os.PathLike) -> str | None:
        """The version whose recorded training run is `folder` (a path to the same place), or None."""
        target = Path(folder).resolve()
        with Session(self.engine) as session:
            rows = session.execute(select(AdapterRow.name, VersionRow.number, VersionRow.source_run).join(
                VersionRow, VersionRow.adapter_id == AdapterRow.id).where(VersionRow.source_run.is_not(None)))
            return next((f"{n}@{v}" for n, v, run in rows if Path(run).resolve() == target), None)

    def train_config(self, ref: str) -> str | None:
        info = self.resolve(ref)
        with Session(self.engine) as session:
            adapter = self.adapter_row(session, info.name)
            return session.scalars(select(VersionRow.train_config).where(
                VersionRow.adapter_id == adapter.id, VersionRow.number == info.version)).one()

    # -- sessions (for the registry's own modules: promotion.py, gc.py) ------------------------------------------------------------------------------------------
    def _claim(self, session: Session, digest: str) -> int:
        row = PendingRow(digest=digest, actor=self.actor)
        session.add(row)
        session.flush()
        return row.id

    def adapter_row(self, session: Session, name: str, create: bool = False, lock: bool = False) -> AdapterRow:
        """The adapter's row; with `lock`, locked for this transaction (a no-op update: a row lock on
        PostgreSQL, the database write lock on SQLite) so concurrent changes to it run one at a time."""
        adapter = session.scalars(select(AdapterRow).where(AdapterRow.name == name)).first()
        if adapter is None:
            if not create:
                raise RegistryNotFound(f"No adapter named {name!r} in the registry ({self.url}).")
            adapter = AdapterRow(name=name)
            session.add(adapter)
            session.flush()
        elif lock:
            session.execute(update(AdapterRow).where(AdapterRow.id == adapter.id).values(name=AdapterRow.name)
                            .execution_options(synchronize_session=False))
        return adapter

    def alias_row(self, session: Session, adapter: AdapterRow, alias: str) -> AliasRow | None:
        return session.scalars(select(AliasRow).where(AliasRow.adapter_id == adapter.id,
                                                      AliasRow.alias == alias)).first()

    def point(self, session: Session, adapter: AdapterRow, name: str, alias: str, version: int, action: str,
               details: dict | None = None) -> bool:
        """Point `alias` at `version`; False (and nothing in the history) if it points there already."""
        if session.scalars(select(VersionRow.id).where(VersionRow.adapter_id == adapter.id,
                                                       VersionRow.number == version)).first() is None:
            raise RegistryNotFound(f"{name}@{version} is not in the registry.")
        row = self.alias_row(session, adapter, alias)
        previous = row.version if row else None
        if previous == version:
            return False
        if row is None:
            session.add(AliasRow(adapter_id=adapter.id, alias=alias, version=version))
        else:
            row.version, row.updated_at = version, now()
        self.audit(session, action, name, version, alias, previous, details)
        return True

    def audit(self, session: Session, action: str, name: str, version: int | None, alias: str | None = None,
               previous: int | None = None, details: dict | None = None) -> None:
        session.add(AuditRow(actor=self.actor, action=action, adapter=name, version=version, alias=alias,
                             previous=previous, details=details or {}))

    def transaction(self, work: Callable[[Session], object]):
        def attempt():
            with Session(self.engine) as session, session.begin():
                return work(session)

        return self._retry(attempt)

    @staticmethod
    def _retry(attempt: Callable[[], object], tries: int = 40):
        """Run `attempt`, again after a unique-key race (two pushes took the same number, two processes
        created the tables of a new database at once) or a busy database."""
        for i in range(tries):
            try:
                return attempt()
            except (IntegrityError, OperationalError, ProgrammingError) as error:
                text = str(error)
                busy = (isinstance(error, IntegrityError) or "locked" in text or "busy" in text
                        or "already exists" in text)
                if not busy or i == tries - 1:  # a wrong URL or a dead server fails at once
                    raise
                time.sleep(random.uniform(0.01, 0.05) * (1 + i))

    @staticmethod
    def _info(session: Session, name: str, row: VersionRow) -> VersionInfo:
        aliases = sorted(session.scalars(select(AliasRow.alias).where(AliasRow.adapter_id == row.adapter_id,
                                                                      AliasRow.version == row.number)))
        return VersionInfo(name, row.number, row.digest, row.size_bytes, row.base_model, short_id(row.base_fingerprint),
                           row.method, row.config, row.created_at.isoformat(), row.created_by, row.notes,
                           row.source_run, row.data_digest, row.parent, row.metrics or {}, aliases)
