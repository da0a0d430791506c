"""Moving aliases: `promote` (with its checks, gates and regression check) and `rollback`.

A promotion is refused — before any server sees it — when the candidate's blob no longer
verifies, when it was trained on another base than the version the alias serves now (unless
`new_base`: the servers are moving to that base), when it fails a gate, and when it scores
below the alias's version on the gated metrics, or, with an eval file and no gates, on any
metric the eval reports. Each version is evaluated by the caller's `evaluate(version, folder)`,
so the registry never imports the training job. Promoting an alias to the version it holds
already changes nothing and writes nothing into the history, so `rollback` always moves back.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from lorakit.errors import RegistryError, RegistryNotFound
from lorakit.files.fingerprint import compare
from lorakit.registry.gates import METRICS, Gate, check_gates
from lorakit.registry.refs import Ref, check_name
from lorakit.registry.tables import AdapterRow, AuditRow, VersionRow

if TYPE_CHECKING:  # the store calls these with itself; they never import it
    from lorakit.registry.store import Evaluate, Registry, VersionInfo


def promote(registry: Registry, ref: str, alias: str, gates: list[Gate] | None = None, data: Path | None = None,
            evaluate: Evaluate | None = None, allow_regression: bool = False, new_base: bool = False) -> dict:
    """Point `alias` at `ref` if its files verify, it was trained on the base the alias serves now (or
    `new_base`), it passes `gates`, and it does not score below what the alias holds now — on the
    gated metrics, or on every metric `evaluate` reports when there are no gates (both versions
    evaluated on `data`, scores recorded). Returns {"version", "previous", "changed", "scores"}."""
    check_name(alias, "alias")
    candidate = registry.resolve(ref)
    registry.blob_folder(candidate)  # a tampered or missing blob: every server would refuse it
    current = registry.aliases(candidate.name).get(alias)
    held = registry.show(Ref(candidate.name, current)) if current is not None and current != candidate.version else None
    if held is not None and not new_base:
        reason = _other_base(registry, candidate, held)
        if reason:
            raise RegistryError(f"{candidate.ref} was trained on another base than {held.ref}, which "
                                f"{candidate.name}:{alias} serves now ({reason}); servers on that base would keep "
                                "serving the old version. Pass --new-base if the servers are moving to the new "
                                "base.")
    scores: dict = {}
    if data is not None and evaluate is not None:
        key = f"eval:{Path(data).name}"
        scores["candidate"] = _scores(registry, candidate, key, evaluate)
        failed = check_gates(gates or [], scores["candidate"])
        if failed:
            raise RegistryError(f"{candidate.ref} fails its gate(s): {'; '.join(failed)}. Not promoted to {alias}.")
        if held is not None:
            scores["current"] = _scores(registry, held, key, evaluate)
            checked = gates or [Gate(m, ">=" if m.endswith("match") else "<=", 0.0) for m in METRICS]
            worse = [g.metric for g in checked if not g.better_or_equal(scores["candidate"], scores["current"])]
            if worse and not allow_regression:
                raise RegistryError(f"{candidate.ref} scores below {held.ref} ({alias} now) on {', '.join(worse)} "
                                    f"({_fmt(scores, worse)}); pass --allow-regression to promote it anyway.")
    elif gates:
        raise RegistryError("Gates need an eval file: pass --eval data.jsonl.")

    def point(session: Session) -> bool:
        adapter = registry.adapter_row(session, candidate.name, lock=True)
        now_held = registry.alias_row(session, adapter, alias)
        if scores and (now_held.version if now_held else None) != current:  # moved while we evaluated
            raise RegistryError(f"{candidate.name}:{alias} moved while {candidate.ref} was being evaluated; "
                                "promote again.")
        return registry.point(session, adapter, candidate.name, alias, candidate.version, "promote",
                           details={"scores": scores})

    changed = registry.transaction(point)
    return {"version": candidate.version, "previous": current, "changed": changed, "scores": scores}


def rollback(registry: Registry, name: str, alias: str) -> dict:
    """Point `alias` back at the version it held before its latest promotion to what it holds now."""
    def roll(session: Session) -> dict:
        adapter = registry.adapter_row(session, name, lock=True)
        row = registry.alias_row(session, adapter, alias)
        if row is None:
            raise RegistryNotFound(f"{name} has no alias {alias!r}.")
        last = session.scalars(select(AuditRow).where(  # a no-op promote (old databases have them) is no move
            AuditRow.adapter == name, AuditRow.alias == alias, AuditRow.version == row.version,
            AuditRow.action.in_(("promote", "alias")),
            or_(AuditRow.previous.is_(None), AuditRow.previous != AuditRow.version)).order_by(AuditRow.id.desc())
        ).first()
        if last is None or last.previous is None:
            raise RegistryError(f"{name}:{alias} was never pointed anywhere before v{row.version}; nothing to "
                                "roll back to.")
        current = row.version
        registry.point(session, adapter, name, alias, last.previous, "rollback")
        return {"from": current, "to": last.previous}

    return registry.transaction(roll)


def _scores(registry: Registry, info: VersionInfo, key: str, evaluate: Evaluate) -> dict:
    scores = evaluate(info, registry.blob_folder(info))

    def record(session: Session) -> None:
        adapter = registry.adapter_row(session, info.name)
        row = session.scalars(select(VersionRow).where(VersionRow.adapter_id == adapter.id,
                                                       VersionRow.number == info.version)).one()
        row.metrics = {**row.metrics, key: scores}

    registry.transaction(record)
    return scores

def _other_base(registry: Registry, candidate: VersionInfo, held: VersionInfo) -> str | None:
    """Why `candidate` belongs to another base than `held` (by recorded fingerprint), or None."""
    with Session(registry.engine) as session:
        a, b = (session.scalar(select(VersionRow.base_fingerprint).join(
            AdapterRow, AdapterRow.id == VersionRow.adapter_id).where(
            AdapterRow.name == v.name, VersionRow.number == v.version)) for v in (candidate, held))
    if not a or not b:
        return None
    result = compare(a, b)
    return None if result.match else result.reason


def _fmt(scores: dict, metrics: list[str]) -> str:
    return ", ".join(f"{m}: {scores['candidate'].get(m)} vs {scores['current'].get(m)}" for m in metrics)
