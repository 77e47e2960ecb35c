"""Request dependencies: database sessions, authentication, scopes, paging, auditing."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import anyio.to_thread
from fastapi import Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from sqlalchemy import Engine, Select, select, tuple_, update
from sqlalchemy.orm import Session, selectinload

from ccat_ops_db.models import ApiAuditLog, ApiToken, User, hash_token, scope_allows
from ccat_ops_db.models.access import TOKEN_PREFIX

from .errors import ApiError
from .fastpath import AsyncPgPool

bearer = HTTPBearer(auto_error=False, description="An API token: `Authorization: Bearer ccat_…`")


async def get_db(request: Request) -> AsyncIterator[Session]:
    """A session for one request; the route commits, anything unfinished is rolled back.

    Async so that FastAPI does not hop to a worker thread for it: creating a session does no
    I/O (the connection is taken on first use, in the route's own thread).
    """
    session = Session(request.app.state.engine, expire_on_commit=False)
    try:
        yield session
    finally:
        if session.in_transaction():
            # Rolling back is network I/O, so it runs in a thread - but on its own small
            # limiter: were it to queue behind routes that wait for a pooled connection, the
            # connections it would hand back could never be returned (pool deadlock).
            await anyio.to_thread.run_sync(
                session.close, limiter=getattr(request.app.state, "close_limiter", None)
            )
        else:
            session.close()


DB = Annotated[Session, Depends(get_db)]


def fast_pool(app_state: Any) -> AsyncPgPool | None:
    """The process's async PostgreSQL pool for the hot paths (None on SQLite or when off)."""
    return getattr(app_state, "fast_pool", None)


def json_response(model: BaseModel, status_code: int = 200) -> Response:
    """A JSON response of ``model``, serialised once by pydantic (no re-validation)."""
    return Response(
        content=model.__pydantic_serializer__.to_json(model),
        status_code=status_code,
        media_type="application/json",
    )


@dataclass
class Principal:
    """Who is calling: the token's owner, the token, and the effective scopes."""

    user_id: int
    username: str
    token_id: int
    scopes: list[str] = field(default_factory=list)


def _effective_scopes(token: ApiToken, user: User) -> list[str]:
    user_scopes = user.scopes
    if "admin" in user_scopes or "*" in user_scopes:
        return list(token.scopes)
    return [s for s in token.scopes if scope_allows(user_scopes, s)]


@dataclass
class _CachedToken:
    principal: Principal
    expires_at: dt.datetime | None
    cached_at: float
    touched_at: float


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value


async def authenticate(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    """Resolve the bearer token to a :class:`Principal` or answer 401.

    Resolved tokens are cached per process for ``token_cache_ttl_s`` (default 5 s), so the
    hot filing path does not look the token up on every request; revocation, expiry and
    disabling a user take effect within that time. A cache hit does no I/O at all (the
    token's ``last_used_at`` is written at most every ``token_touch_interval_s``).
    """
    if creds is None or creds.scheme.lower() != "bearer":
        raise ApiError(401, "missing bearer token (Authorization: Bearer <token>)")
    raw = creds.credentials.strip()
    if not raw.startswith(TOKEN_PREFIX) or len(raw) > 128 or not raw.isascii():
        raise ApiError(401, "malformed token")
    state = request.app.state
    settings = state.settings
    cache: dict[str, _CachedToken] = state.token_cache
    digest = hash_token(raw)
    now = dt.datetime.now(dt.UTC)
    mono = time.monotonic()
    client_ip = request.client.host if request.client else None
    # At the observatory the ops database is a read-only replica: token use is not recorded
    # there (a write would fail on a hot standby); the main site records its own.
    touch_interval_s = (
        math.inf if settings.site_mode == "observatory" else settings.token_touch_interval_s
    )
    entry = cache.get(digest)
    if entry is not None and mono - entry.cached_at < settings.token_cache_ttl_s:
        if entry.expires_at is not None and entry.expires_at <= now:
            cache.pop(digest, None)
            raise ApiError(401, "token expired")
        if mono - entry.touched_at >= touch_interval_s:
            entry.touched_at = mono
            await run_in_threadpool(_touch, state.engine, entry.principal.token_id, now, client_ip)
        request.state.principal = entry.principal
        return entry.principal
    principal, expires_at = await run_in_threadpool(
        _resolve, state.engine, digest, now, touch_interval_s, client_ip
    )
    if settings.token_cache_ttl_s > 0:
        if len(cache) > 10_000:  # bounded: forget everything rather than grow
            cache.clear()
        cache[digest] = _CachedToken(principal, expires_at, mono, mono)
    request.state.principal = principal
    return principal


def _resolve(
    engine: Engine, digest: str, now: dt.datetime, touch_interval_s: float, client_ip: str | None
) -> tuple[Principal, dt.datetime | None]:
    """Look the token up (in its own short session); 401 unless it is valid right now."""
    with Session(engine, expire_on_commit=False) as db:
        token = _lookup(db, digest)
        if token is None:
            raise ApiError(401, "unknown token")
        if token.revoked_at is not None:
            raise ApiError(401, "token revoked")
        if not token.is_valid(now):
            raise ApiError(401, "token expired" if token.user.active else "user disabled")
        principal = Principal(
            user_id=token.user_id,
            username=token.user.username,
            token_id=token.id,
            scopes=_effective_scopes(token, token.user),
        )
        expires_at = _aware(token.expires_at)
        last = _aware(token.last_used_at)
    if math.isfinite(touch_interval_s) and (
        last is None or (now - last).total_seconds() >= touch_interval_s
    ):
        _touch(engine, principal.token_id, now, client_ip)
    return principal, expires_at


def _lookup(db: Session, digest: str) -> ApiToken | None:
    return db.scalar(
        select(ApiToken)
        .options(selectinload(ApiToken.user).selectinload(User.roles))
        .where(ApiToken.token_hash == digest)
    )


def _touch(engine: Engine, token_id: int, now: dt.datetime, client_ip: str | None) -> None:
    with Session(engine) as db:
        db.execute(
            update(ApiToken)
            .where(ApiToken.id == token_id)
            .values(
                last_used_at=now,
                usage_count=ApiToken.usage_count + 1,
                last_used_ip=client_ip,
            )
        )
        db.commit()


class require(HTTPBearer):  # noqa: N801 - used like a function: Depends(require("file"))
    """Dependency: a valid bearer token holding ``scope``; answers 401/403 otherwise.

    One dependency does it all (reading the header, resolving the token, checking the scope):
    FastAPI's per-request cost grows with every level of dependencies, and this one runs on
    every request. Being an :class:`HTTPBearer` itself, it declares the same ``HTTPBearer``
    security scheme in the OpenAPI document as :data:`bearer`.
    """

    def __init__(self, scope: str) -> None:
        super().__init__(
            auto_error=False, description=bearer.model.description, scheme_name="HTTPBearer"
        )
        self.scope = scope

    async def __call__(self, request: Request) -> Principal:  # type: ignore[override]
        principal = await authenticate(request, await bearer(request))
        if not scope_allows(principal.scopes, self.scope):
            raise ApiError(
                403,
                f"token lacks scope {self.scope!r} (has: {', '.join(principal.scopes) or 'none'})",
            )
        return principal


Reader = Annotated[Principal, Depends(require("read"))]
Filer = Annotated[Principal, Depends(require("file"))]
Operator = Annotated[Principal, Depends(require("operate"))]
Admin = Annotated[Principal, Depends(require("admin"))]


def audit(
    db: Session,
    principal: Principal,
    request: Request,
    status_code: int,
    resource: str,
    ids: list[Any] | None = None,
    detail: str | None = None,
) -> None:
    """Record a write in the API audit log (same transaction as the write itself)."""
    db.add(
        ApiAuditLog(
            user_id=principal.user_id,
            token_id=principal.token_id,
            method=request.method,
            path=request.url.path[:1024],
            status_code=status_code,
            resource=resource,
            resource_ids=[str(i) for i in (ids or [])][:100],
            item_count=len(ids) if ids is not None else None,
            client_ip=request.client.host if request.client else None,
            detail=detail,
        )
    )


# --- keyset pagination ----------------------------------------------------------------------


@dataclass
class Page:
    """Paging parameters of a list request."""

    limit: int
    cursor: str | None


async def page_params(
    request: Request,
    limit: Annotated[
        int | None,
        Query(ge=1, description="Page size (bounded by the server's maximum).", examples=[100]),
    ] = None,
    cursor: Annotated[
        str | None,
        Query(max_length=512, description="`next_cursor` of the previous page."),
    ] = None,
) -> Page:
    """Read ``limit`` and ``cursor``; the limit is capped at the configured maximum."""
    settings = request.app.state.settings
    size = settings.page_size_default if limit is None else min(limit, settings.page_size_max)
    return Page(limit=size, cursor=cursor)


Paging = Annotated[Page, Depends(page_params)]


def _encode(values: list[Any]) -> str:
    def conv(v: Any) -> Any:
        if isinstance(v, dt.datetime):
            return {"t": v.isoformat()}
        if hasattr(v, "hex") and not isinstance(v, int | float | str):
            return {"u": str(v)}
        return v

    raw = json.dumps([conv(v) for v in values], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode(cursor: str, n: int) -> list[Any]:
    import uuid

    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        values = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if not isinstance(values, list) or len(values) != n:
            raise ValueError("wrong shape")
        out: list[Any] = []
        for v in values:
            if isinstance(v, dict) and "t" in v:
                out.append(dt.datetime.fromisoformat(v["t"]))
            elif isinstance(v, dict) and "u" in v:
                out.append(uuid.UUID(v["u"]))
            elif isinstance(v, int | float | str) and not isinstance(v, bool):
                out.append(v)
            else:
                raise ValueError("bad value")
        return out
    except (ValueError, binascii.Error, json.JSONDecodeError, TypeError, KeyError) as exc:
        raise ApiError(
            422,
            "invalid cursor",
            [{"loc": ["query", "cursor"], "msg": "not a cursor this API returned"}],
        ) from exc


def _check_cursor_value(key: Any, value: Any) -> None:
    """A decoded cursor value must have its key column's type (and range): else 422."""
    try:
        expected = key.type.python_type
    except (NotImplementedError, AttributeError):
        return
    ok = isinstance(value, expected) and not isinstance(value, bool)
    if ok and expected is int:
        ok = -(2**63) <= value < 2**63
    if not ok:
        raise ApiError(
            422,
            "invalid cursor",
            [{"loc": ["query", "cursor"], "msg": "not a cursor this API returned"}],
        )


def paginate(
    db: Session, query: Select[Any], keys: list[Any], page: Page
) -> tuple[list[Any], str | None]:
    """Run ``query`` ordered by ``keys`` (unique together) from ``page.cursor`` on.

    Returns ``(rows, next_cursor)``; ``next_cursor`` is None on the last page. The cursor is
    keyset-based, so pages stay stable while rows are added.
    """
    if page.cursor:
        values = _decode(page.cursor, len(keys))
        for key, value in zip(keys, values, strict=True):
            _check_cursor_value(key, value)
        if len(keys) == 1:
            query = query.where(keys[0] > values[0])
        else:
            query = query.where(tuple_(*keys) > tuple_(*values))
    rows = list(db.scalars(query.order_by(*keys).limit(page.limit + 1)))
    if len(rows) <= page.limit:
        return rows, None
    rows = rows[: page.limit]
    last = rows[-1]
    return rows, _encode([getattr(last, k.key) for k in keys])
