"""`gc`: delete the blobs no version refers to, without ever racing a push.

A push claims its digest (a pending row) before it writes the blob and releases the claim in
the transaction that records its version. `gc` reads what versions and claims refer to, renames
each other blob aside, asks the database again, and only then purges it — or renames it back:
a push that claimed the same content in between keeps its blob whichever order things happen in.
Temporary folders and claims are removed only once older than the grace period (a folder's name
carries its creation time): a push slower than that fails loudly at its commit ("push again")
rather than record a version whose files gc took.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from lorakit.registry.tables import PendingRow, VersionRow, now

if TYPE_CHECKING:  # the store calls these with itself; they never import it
    from lorakit.registry.store import Registry


def collect(registry: Registry, grace: float) -> dict:
    """Delete blobs no version and no push in flight refers to, and the claims and temporary folders of
    pushes that started more than `grace` seconds ago. Each blob is renamed aside, checked again, then
    purged — or put back if a push claimed it meanwhile (blobs.py)."""
    def claimed(session: Session) -> set[str]:
        expired = now().timestamp() - grace
        stale = [r for r in session.scalars(select(PendingRow)) if r.created_at.timestamp() < expired]
        for row in stale:
            session.delete(row)
        return set(session.scalars(select(VersionRow.digest))) | set(session.scalars(select(PendingRow.digest)))

    unused = registry.blobs.digests() - registry.transaction(claimed)
    removed = []
    for digest in sorted(unused):
        doomed = registry.blobs.doom(digest)
        if doomed is not None:
            removed += _finish_doomed(registry, doomed, digest)
    for doomed, digest in registry.blobs.doomed():  # left by a gc that died midway
        _finish_doomed(registry, doomed, digest)
    incoming = registry.blobs.remove_incoming(older_than=grace)
    registry.transaction(lambda s: registry.audit(s, "gc", "*", None, details={"blobs": len(removed)}))
    return {"removed_blobs": removed, "removed_incoming": incoming}

def _finish_doomed(registry: Registry, doomed: str, digest: str) -> list[str]:
    def referenced(session: Session) -> bool:
        return any(session.scalars(select(VersionRow.id).where(VersionRow.digest == digest).limit(1))) or any(
            session.scalars(select(PendingRow.id).where(PendingRow.digest == digest).limit(1)))

    if registry.transaction(referenced):
        registry.blobs.restore(doomed, digest)
        return []
    registry.blobs.purge(doomed, digest)
    return [digest]

