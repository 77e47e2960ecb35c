"""Declarative base, naming convention and column types shared by every model."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Integer, MetaData, String, Uuid, text
from sqlalchemy import Enum as SAEnum
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Deterministic constraint names: migrations can drop/alter them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# 64-bit keys on PostgreSQL; SQLite only autoincrements INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")
# JSONB on PostgreSQL (indexable, queryable by path), JSON text elsewhere.
JsonType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> dt.datetime:
    """Timezone-aware current time in UTC."""
    return dt.datetime.now(dt.UTC)


def enum_column(enum_cls: type[enum.Enum], column: str) -> SAEnum:
    """A portable enum column: VARCHAR + CHECK constraint storing the member *values*.

    ``column`` names the CHECK constraint (``ck_<table>_<column>``), so two columns of the same
    enum in one table get distinct constraints.
    """
    return SAEnum(
        enum_cls,
        name=column,
        native_enum=False,
        create_constraint=True,
        length=32,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    """Base class of every ops-db model."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        dt.datetime: DateTime(timezone=True),
        uuid.UUID: Uuid(),
        dict[str, Any]: JsonType,
        list[Any]: JsonType,
        str: String(255),
    }

    def __repr__(self) -> str:
        ident = getattr(self, "id", None)
        name = getattr(self, "name", None) or getattr(self, "short_name", None)
        extra = f" {name!r}" if name else ""
        return f"<{type(self).__name__} id={ident}{extra}>"


class TimestampMixin:
    """``created_at`` / ``updated_at`` maintained by the database and the ORM."""

    created_at: Mapped[dt.datetime] = mapped_column(
        default=utcnow, server_default=text("CURRENT_TIMESTAMP"), nullable=False
    )
    updated_at: Mapped[dt.datetime] = mapped_column(
        default=utcnow, server_default=text("CURRENT_TIMESTAMP"), onupdate=utcnow, nullable=False
    )


class RetryMixin:
    """Bookkeeping for any record a task can fail on: bounded retries with a readable reason."""

    retry_count: Mapped[int] = mapped_column(default=0, server_default="0", nullable=False)
    failure_reason: Mapped[str | None] = mapped_column(String(2000))
    last_failure_at: Mapped[dt.datetime | None] = mapped_column()
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column()


def new_uuid() -> uuid.UUID:
    """A random (version 4) UUID."""
    return uuid.uuid4()
