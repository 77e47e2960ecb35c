"""Access control: users, roles and API tokens (only a hash of a token is ever stored)."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from typing import Any

from sqlalchemy import Column, ForeignKey, String, Table, true
from sqlalchemy.orm import Mapped, mapped_column, relationship

from .base import Base, BigId, TimestampMixin, utcnow

TOKEN_PREFIX = "ccat_"  # noqa: S105 - a label, not a secret
#: Scopes of the data center. ``read``: every GET; ``file``: file observations, raw data files
#: and packages (instruments); ``operate``: package states, transfers, staging (operators and
#: pipelines); ``admin``: everything, including users and tokens. ``*`` is a synonym of admin.
KNOWN_SCOPES = ("read", "file", "operate", "admin", "*")

user_role = Table(
    "user_role",
    Base.metadata,
    Column("user_id", ForeignKey("user.id", ondelete="CASCADE"), primary_key=True),
    Column("role_id", ForeignKey("role.id", ondelete="CASCADE"), primary_key=True, index=True),
)


def hash_token(raw: str) -> str:
    """SHA-256 hex digest of a raw token: what the database stores."""
    return hashlib.sha256(raw.encode()).hexdigest()


def scope_allows(granted: list[str] | tuple[str, ...], needed: str) -> bool:
    """Whether ``granted`` scopes cover ``needed`` (``admin`` and ``*`` cover everything)."""
    return needed in granted or "admin" in granted or "*" in granted


class Role(TimestampMixin, Base):
    """A named bundle of scopes (e.g. instrument, operator, reader, admin)."""

    __tablename__ = "role"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str | None] = mapped_column()
    scopes: Mapped[list[Any]] = mapped_column(default=list)

    users: Mapped[list[User]] = relationship(secondary=user_role, back_populates="roles")


class User(TimestampMixin, Base):
    """A person or an automated system (an instrument, a pipeline) that uses the API."""

    __tablename__ = "user"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    email: Mapped[str | None] = mapped_column()
    full_name: Mapped[str | None] = mapped_column()
    active: Mapped[bool] = mapped_column(default=True, server_default=true())

    roles: Mapped[list[Role]] = relationship(secondary=user_role, back_populates="users")
    tokens: Mapped[list[ApiToken]] = relationship(
        back_populates="user", cascade="all, delete-orphan", passive_deletes=True
    )

    @property
    def scopes(self) -> list[str]:
        """The union of the scopes of the user's roles."""
        return sorted({s for role in self.roles for s in (role.scopes or [])})


class ApiToken(TimestampMixin, Base):
    """A bearer token for programmatic access. The raw token is shown once, at creation."""

    __tablename__ = "api_token"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column()
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # The first characters of the raw token, to recognise it in lists and logs.
    token_prefix: Mapped[str] = mapped_column(String(16), index=True)
    # Scopes of this token; the effective scopes are these intersected with the user's.
    scopes: Mapped[list[Any]] = mapped_column(default=list)
    expires_at: Mapped[dt.datetime | None] = mapped_column()
    revoked_at: Mapped[dt.datetime | None] = mapped_column()
    last_used_at: Mapped[dt.datetime | None] = mapped_column()
    last_used_ip: Mapped[str | None] = mapped_column(String(64))
    usage_count: Mapped[int] = mapped_column(default=0, server_default="0")

    user: Mapped[User] = relationship(back_populates="tokens")

    @staticmethod
    def generate() -> str:
        """A new random raw token (256 bits of entropy)."""
        return TOKEN_PREFIX + secrets.token_urlsafe(32)

    @classmethod
    def issue(
        cls,
        user: User,
        name: str,
        scopes: list[str] | None = None,
        expires_at: dt.datetime | None = None,
    ) -> tuple[ApiToken, str]:
        """Create a token row for ``user``; returns ``(row, raw_token)``. Show the raw once."""
        raw = cls.generate()
        row = cls(
            user=user,
            name=name,
            token_hash=hash_token(raw),
            token_prefix=raw[: len(TOKEN_PREFIX) + 6],
            scopes=list(scopes or ["read"]),
            expires_at=expires_at,
        )
        return row, raw

    @property
    def revoked(self) -> bool:
        """Whether the token was revoked."""
        return self.revoked_at is not None

    def matches(self, raw: str) -> bool:
        """Constant-time comparison of ``raw`` with this token's hash."""
        return hmac.compare_digest(self.token_hash, hash_token(raw))

    def is_valid(self, now: dt.datetime | None = None) -> bool:
        """Not revoked, not expired, and its user is active."""
        now = now or utcnow()
        if self.revoked_at is not None:
            return False
        if self.expires_at is not None:
            exp = self.expires_at
            if exp.tzinfo is None:  # SQLite returns naive datetimes
                exp = exp.replace(tzinfo=dt.UTC)
            if exp <= now:
                return False
        return bool(self.user is None or self.user.active)


class ApiAuditLog(Base):
    """One row per write request through the API: who (user, token), what, and the outcome."""

    __tablename__ = "api_audit_log"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("user.id", ondelete="SET NULL"), index=True
    )
    token_id: Mapped[int | None] = mapped_column(
        ForeignKey("api_token.id", ondelete="SET NULL"), index=True
    )
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(1024))
    status_code: Mapped[int] = mapped_column()
    resource: Mapped[str | None] = mapped_column(String(64))
    resource_ids: Mapped[list[Any] | None] = mapped_column()
    item_count: Mapped[int | None] = mapped_column()
    client_ip: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(String(2000))
