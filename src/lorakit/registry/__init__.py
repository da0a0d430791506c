"""The adapter registry: versions, aliases, eval-gated promotion, rollback, lineage (store.py), over
content-addressed blobs (blobs.py) and any SQLAlchemy database (tables.py)."""

from lorakit.registry.refs import Ref, parse_ref
from lorakit.registry.store import Registry, VersionInfo

__all__ = ["Ref", "Registry", "VersionInfo", "parse_ref"]
