"""The control plane's tables (SQLAlchemy 2). The schema is created and changed only by the
Alembic migrations in ``migrations/``; ``tests/plane`` checks that they match these models.

Times are stored as naive UTC (``UTCDateTime``) so SQLite and PostgreSQL behave alike.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """An aware UTC datetime in Python, a naive UTC timestamp in the database."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(dt.UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC)


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    display_name: Mapped[str] = mapped_column(String(200), default="")
    state: Mapped[str] = mapped_column(String(16), default="active")  # active | suspended
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())

    volumes: Mapped[list[Volume]] = relationship(back_populates="tenant")


class Volume(Base):
    __tablename__ = "volumes"
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_volumes_tenant_name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(63))
    uuid: Mapped[str] = mapped_column(String(36), default="")
    engine: Mapped[str] = mapped_column(String(16))
    # creating | active | deleting | purging
    state: Mapped[str] = mapped_column(String(16), default="creating")
    capacity: Mapped[int] = mapped_column(BigInteger, default=0)
    inodes: Mapped[int] = mapped_column(BigInteger, default=0)
    block_size: Mapped[int] = mapped_column(Integer)
    compress: Mapped[str] = mapped_column(String(8))
    trash_days: Mapped[int] = mapped_column(Integer, default=0)
    # VolumeSecrets as JSON, sealed with the master key for context "volume:<id>"
    secrets: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    delete_after: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    usage_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    usage_inodes: Mapped[int] = mapped_column(BigInteger, default=0)
    usage_objects: Mapped[int] = mapped_column(BigInteger, default=0)
    usage_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    tenant: Mapped[Tenant] = relationship(back_populates="volumes")


class Token(Base):
    __tablename__ = "tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # SHA-256 hex
    kind: Mapped[str] = mapped_column(String(16))  # operator | tenant-admin | mount
    name: Mapped[str] = mapped_column(String(200), default="")
    tenant_id: Mapped[str | None] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), nullable=True, index=True
    )
    volume_id: Mapped[str | None] = mapped_column(
        ForeignKey("volumes.id", ondelete="CASCADE"), nullable=True, index=True
    )
    read_only: Mapped[bool] = mapped_column(Boolean, default=False)
    created_by: Mapped[str] = mapped_column(String(32), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class NodeGroup(Base):
    __tablename__ = "nodegroups"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    spec: Mapped[str] = mapped_column(Text)  # NodeGroupSpec as JSON
    generation: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class AuditEvent(Base):
    __tablename__ = "audit"
    __table_args__ = (
        Index("ix_audit_at", "at"),
        Index("ix_audit_tenant_at", "tenant", "at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    actor: Mapped[str] = mapped_column(String(32))  # token id, or "system"
    actor_kind: Mapped[str] = mapped_column(String(16))
    tenant: Mapped[str] = mapped_column(String(63), default="")
    action: Mapped[str] = mapped_column(String(40))
    target: Mapped[str] = mapped_column(String(200), default="")
    detail: Mapped[str] = mapped_column(Text, default="{}")  # JSON, never secrets
    status: Mapped[int] = mapped_column(Integer, default=200)
