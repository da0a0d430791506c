"""The registry's tables (SQLAlchemy 2): adapters, versions, aliases, and an append-only audit log.

Any SQLAlchemy URL works: the embedded default is a SQLite file; several machines share a
PostgreSQL database. Version numbers are unique per adapter (a constraint, not a convention),
so two pushes at once cannot both become version N: the loser retries with N+1. A push in
flight owns its blob through a `PendingRow` written before the blob, so `gc` never removes it.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import JSON, DateTime, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class AdapterRow(Base):
    __tablename__ = "lorakit_adapters"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class VersionRow(Base):
    __tablename__ = "lorakit_versions"
    __table_args__ = (UniqueConstraint("adapter_id", "number"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("lorakit_adapters.id"))
    number: Mapped[int] = mapped_column(Integer)
    digest: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    base_model: Mapped[str | None] = mapped_column(String(500), nullable=True)
    base_fingerprint: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    method: Mapped[str] = mapped_column(String(50))
    config: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    created_by: Mapped[str] = mapped_column(String(200))
    notes: Mapped[str] = mapped_column(Text, default="")
    source_run: Mapped[str | None] = mapped_column(String(1000), nullable=True)
    data_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    parent: Mapped[str | None] = mapped_column(String(250), nullable=True)  # lineage: the ref it was retrained from
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    train_config: Mapped[str | None] = mapped_column(Text, nullable=True)  # the job's config.yaml


class AliasRow(Base):
    __tablename__ = "lorakit_aliases"
    __table_args__ = (UniqueConstraint("adapter_id", "alias"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("lorakit_adapters.id"))
    alias: Mapped[str] = mapped_column(String(100))
    version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class PendingRow(Base):
    """A push between "blob written" and "version committed": `gc` keeps its blob. Written before the blob,
    deleted in the transaction that commits the version; a row older than gc's expiry is a dead push."""

    __tablename__ = "lorakit_pending"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    digest: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    actor: Mapped[str] = mapped_column(String(200))


class AuditRow(Base):
    __tablename__ = "lorakit_audit"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(30))  # push, promote, rollback, delete, gc
    adapter: Mapped[str] = mapped_column(String(200))
    version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    alias: Mapped[str | None] = mapped_column(String(100), nullable=True)
    previous: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the alias's version before
    details: Mapped[dict] = mapped_column(JSON, default=dict)
