"""`Registry`: adapters as versioned artefacts — push, resolve, pull, promote, roll back, delete, gc.

    registry = Registry()                      # $LORAKIT_REGISTRY, else ~/.cache/lorakit/registry
    v = registry.push("support", "runs/support/adapter", alias="staging")
    registry.promote("support@2", "prod", gates=[Gate.parse("exact_match>=0.9")], evaluate=...)
    registry.rollback("support", "prod")       # back to the version prod held before

Safety: a push writes the blob first and commits its row last, in one transaction with its
audit entry, so a crash leaves at most an unreferenced blob (`gc` removes it), never a half
version; version numbers are unique per adapter in the database, so concurrent pushes retry
and get distinct numbers; every pull and every served blob is re-hashed against its digest.
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

from sqlalchemy import create_engine, func, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from lorakit.errors import RegistryError, RegistryNotFound
from lorakit.files.fingerprint import compare, short_id
from lorakit.files.format import read_adapter
from lorakit.registry.blobs import BlobStore
from lorakit.registry.gates import Gate, check_gates
from lorakit.registry.refs import Ref, check_name, parse_ref
from lorakit.registry.tables import AdapterRow, AliasRow, AuditRow, Base, VersionRow, now

DEFAULT_ALIAS = "prod"


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
        files = read_adapter(folder)  # a push is checked like a load: no broken or pickled adapter gets in
        config = files.config.to_dict()
        digest, size = self.blobs.put(Path(folder))  # the blob first ...

        def commit(session: Session) -> int:  # ... the row last, with its audit entry
            adapter = self._adapter(session, name, create=True)
            number = (session.scalar(select(func.max(VersionRow.number)).where(VersionRow.adapter_id == adapter.id))
                      or 0) + 1
            session.add(VersionRow(
                adapter_id=adapter.id, number=number, digest=digest, size_bytes=size,
                base_model=files.metadata.get("lorakit.base_model") or config.get("base_model_name_or_path"),
                base_fingerprint=files.fingerprint, method=str(config.get("peft_type")), config=config,
                created_by=self.actor, notes=notes, source_run=source_run, data_digest=data_digest, parent=parent,
                metrics=metrics or {}, train_config=train_config))
            self._audit(session, "push", name, number, details={"digest": digest, "parent": parent})
            if alias:
                self._point(session, adapter, name, alias, number, "alias")
            return number

        return self.show(Ref(name, self._transaction(commit)))

    def promote(self, ref: str, alias: str, gates: list[Gate] | None = None, data: Path | None = None,
                evaluate: Callable[[Path], dict] | None = None, allow_regression: bool = False) -> dict:
        """Point `alias` at `ref` if it passes `gates` and does not score below what the alias holds now
        (both evaluated by `evaluate` on `data`, scores recorded). Returns {"version", "previous", "scores"}."""
        check_name(alias, "alias")
        candidate = self.resolve(ref)
        current = self.aliases(candidate.name).get(alias)
        scores: dict = {}
        if data is not None and evaluate is not None:
            key = f"eval:{Path(data).name}"
            scores["candidate"] = self._scores(candidate, key, data, evaluate)
            failed = check_gates(gates or [], scores["candidate"])
            if failed:
                raise RegistryError(f"{candidate.ref} fails its gate(s): {'; '.join(failed)}. Not promoted to {alias}.")
            if current is not None and current != candidate.version:
                held = self.show(Ref(candidate.name, current))
                scores["current"] = self._scores(held, key, data, evaluate)
                worse = [g.metric for g in gates or [] if not g.better_or_equal(scores["candidate"], scores["current"])]
                if worse and not allow_regression:
                    raise RegistryError(f"{candidate.ref} scores below {held.ref} ({alias} now) on {', '.join(worse)} "
                                        f"({_fmt(scores, worse)}); pass --allow-regression to promote it anyway.")
        elif gates:
            raise RegistryError("Gates need an eval file: pass --eval data.jsonl.")
        self._transaction(lambda s: self._point(s, self._adapter(s, candidate.name), candidate.name, alias,
                                                candidate.version, "promote", details={"scores": scores}))
        return {"version": candidate.version, "previous": current, "scores": scores}

    def rollback(self, name: str, alias: str = DEFAULT_ALIAS) -> dict:
        """Point `alias` back at the version it held before its latest promotion to what it holds now."""
        def roll(session: Session) -> dict:
            adapter = self._adapter(session, name)
            row = self._alias_row(session, adapter, alias)
            if row is None:
                raise RegistryNotFound(f"{name} has no alias {alias!r}.")
            last = session.scalars(select(AuditRow).where(
                AuditRow.adapter == name, AuditRow.alias == alias, AuditRow.version == row.version,
                AuditRow.action.in_(("promote", "alias"))).order_by(AuditRow.id.desc())).first()
            if last is None or last.previous is None:
                raise RegistryError(f"{name}:{alias} was never pointed anywhere before v{row.version}; nothing to "
                                    "roll back to.")
            current = row.version
            self._point(session, adapter, name, alias, last.previous, "rollback")
            return {"from": current, "to": last.previous}

        return self._transaction(roll)

    def delete(self, ref: str) -> None:
        """Remove a version (refused while an alias points to it); its blob goes at the next `gc`."""
        info = self.resolve(ref)
        if info.aliases:
            raise RegistryError(f"{info.ref} is what {', '.join(f'{info.name}:{a}' for a in info.aliases)} points to; "
                                "move or roll back the alias first.")

        def drop(session: Session) -> None:
            adapter = self._adapter(session, info.name)
            session.delete(session.scalars(select(VersionRow).where(VersionRow.adapter_id == adapter.id,
                                                                    VersionRow.number == info.version)).one())
            self._audit(session, "delete", info.name, info.version, details={"digest": info.digest})

        self._transaction(drop)

    def gc(self) -> dict:
        """Delete blobs no version refers to (and temporary folders of pushes that died)."""
        with Session(self.engine) as session:
            used = set(session.scalars(select(VersionRow.digest)))
        unused = self.blobs.digests() - used
        for digest in unused:
            self.blobs.remove(digest)
        incoming = self.blobs.remove_incoming()
        self._transaction(lambda s: self._audit(s, "gc", "*", None, details={"blobs": len(unused)}))
        return {"removed_blobs": sorted(unused), "removed_incoming": incoming}

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
            adapter = self._adapter(session, ref.name)
            query = select(VersionRow).where(VersionRow.adapter_id == adapter.id)
            row = session.scalars(query.where(VersionRow.number == ref.version) if ref.version
                                  else query.order_by(VersionRow.number.desc())).first()
            if row is None:
                raise RegistryNotFound(f"{ref} is not in the registry ({self.url}).")
            return self._info(session, ref.name, row)

    def versions(self, name: str) -> list[VersionInfo]:
        with Session(self.engine) as session:
            adapter = self._adapter(session, name)
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

    def train_config(self, ref: str) -> str | None:
        info = self.resolve(ref)
        with Session(self.engine) as session:
            adapter = self._adapter(session, info.name)
            return session.scalars(select(VersionRow.train_config).where(
                VersionRow.adapter_id == adapter.id, VersionRow.number == info.version)).one()

    # -- inside ------------------------------------------------------------------------------------------
    def _scores(self, info: VersionInfo, key: str, data: Path, evaluate: Callable[[Path], dict]) -> dict:
        scores = evaluate(self.blob_folder(info))

        def record(session: Session) -> None:
            adapter = self._adapter(session, info.name)
            row = session.scalars(select(VersionRow).where(VersionRow.adapter_id == adapter.id,
                                                           VersionRow.number == info.version)).one()
            row.metrics = {**row.metrics, key: scores}

        self._transaction(record)
        return scores

    def _adapter(self, session: Session, name: str, create: bool = False) -> AdapterRow:
        adapter = session.scalars(select(AdapterRow).where(AdapterRow.name == name)).first()
        if adapter is None:
            if not create:
                raise RegistryNotFound(f"No adapter named {name!r} in the registry ({self.url}).")
            adapter = AdapterRow(name=name)
            session.add(adapter)
            session.flush()
        return adapter

    def _alias_row(self, session: Session, adapter: AdapterRow, alias: str) -> AliasRow | None:
        return session.scalars(select(AliasRow).where(AliasRow.adapter_id == adapter.id,
                                                      AliasRow.alias == alias)).first()

    def _point(self, session: Session, adapter: AdapterRow, name: str, alias: str, version: int, action: str,
               details: dict | None = None) -> None:
        if session.scalars(select(VersionRow.id).where(VersionRow.adapter_id == adapter.id,
                                                       VersionRow.number == version)).first() is None:
            raise RegistryNotFound(f"{name}@{version} is not in the registry.")
        row = self._alias_row(session, adapter, alias)
        previous = row.version if row else None
        if row is None:
            session.add(AliasRow(adapter_id=adapter.id, alias=alias, version=version))
        else:
            row.version, row.updated_at = version, now()
        self._audit(session, action, name, version, alias, previous, details)

    def _audit(self, session: Session, action: str, name: str, version: int | None, alias: str | None = None,
               previous: int | None = None, details: dict | None = None) -> None:
        session.add(AuditRow(actor=self.actor, action=action, adapter=name, version=version, alias=alias,
                             previous=previous, details=details or {}))

    def _transaction(self, work: Callable[[Session], object]):
        def attempt():
            with Session(self.engine) as session, session.begin():
                return work(session)

        return self._retry(attempt)

    @staticmethod
    def _retry(attempt: Callable[[], object], tries: int = 40):
        """Run `attempt`, again after a unique-key race (two pushes took the same number) or a busy database."""
        for i in range(tries):
            try:
                return attempt()
            except (IntegrityError, OperationalError) as error:
                busy = isinstance(error, IntegrityError) or "locked" in str(error) or "busy" in str(error)
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


def _fmt(scores: dict, metrics: list[str]) -> str:
    return ", ".join(f"{m}: {scores['candidate'].get(m)} vs {scores['current'].get(m)}" for m in metrics)
