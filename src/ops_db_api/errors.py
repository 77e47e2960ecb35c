"""Uniform error bodies: every error is JSON with a ``detail`` and, where useful, ``errors``.

422: bad input, with one entry per field; 404: unknown id; 409: conflict, naming the fields or
items that differ. Database errors caused by input are mapped to 409/422, never to a 500.
A database without the schema (never migrated, or downgraded) answers 503 "database not
migrated" instead of a 500.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DataError, IntegrityError, OperationalError, ProgrammingError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("ops_db_api")

#: PostgreSQL SQLSTATEs of a missing table/column/type: the schema is not (fully) there.
_SCHEMA_MISSING_CODES = frozenset({"42P01", "42703", "42704", "3F000"})
NOT_MIGRATED = "database not migrated: run `ccat-ops-db migrate` (see /readyz)"


def schema_missing(exc: BaseException) -> bool:
    """True if a database error says a table or column does not exist (an unmigrated schema)."""
    orig = getattr(exc, "orig", None) or exc
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if code in _SCHEMA_MISSING_CODES:
        return True
    text = str(orig).lower()
    return "no such table" in text or "no such column" in text  # SQLite


def _not_migrated(exc: BaseException) -> JSONResponse:
    log.error("database not migrated: %s", str(getattr(exc, "orig", exc)).splitlines()[0])
    return JSONResponse(
        {"detail": NOT_MIGRATED, "errors": []},
        status_code=503,
        headers={"Retry-After": "30"},
    )


class ErrorItem(BaseModel):
    """One problem: where (``loc``: path of the field, or the item index) and what."""

    loc: list[str | int]
    msg: str
    type: str = "value_error"


class ErrorBody(BaseModel):
    """The body of every error response."""

    detail: str
    errors: list[ErrorItem] = []


class ApiError(Exception):
    """An error with a status code, a message and optional per-field/per-item errors."""

    def __init__(
        self, status_code: int, detail: str, errors: list[dict[str, Any]] | None = None
    ) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.errors = errors or []


def not_found(kind: str, ident: object) -> ApiError:
    """A 404 naming the kind of thing and the id asked for."""
    return ApiError(404, f"{kind} {ident} not found")


def conflict(detail: str, errors: list[dict[str, Any]] | None = None) -> ApiError:
    """A 409 with the conflicting fields or items."""
    return ApiError(409, detail, errors)


def invalid(detail: str, errors: list[dict[str, Any]] | None = None) -> ApiError:
    """A 422 for input that is well-formed but not acceptable."""
    return ApiError(422, detail, errors)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing, malformed, expired or revoked token"},
    403: {"model": ErrorBody, "description": "The token lacks the scope this route needs"},
    422: {"model": ErrorBody, "description": "Invalid input; `errors` names each field"},
}


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that produce :class:`ErrorBody` responses."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(
            {"detail": exc.detail, "errors": exc.errors},
            status_code=exc.status_code,
            headers={"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        items = [
            {
                "loc": [str(x) if not isinstance(x, int) else x for x in e.get("loc", ())],
                "msg": e.get("msg", "invalid"),
                "type": e.get("type", "value_error"),
            }
            for e in exc.errors()
        ]
        return JSONResponse({"detail": "invalid input", "errors": items}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            {"detail": str(exc.detail), "errors": []},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(IntegrityError)
    async def _integrity(_: Request, exc: IntegrityError) -> JSONResponse:
        reason = str(exc.orig).splitlines()[0] if exc.orig else "constraint violated"
        return JSONResponse(
            {"detail": f"conflicts with existing data: {reason}", "errors": []},
            status_code=409,
        )

    @app.exception_handler(DataError)
    async def _data(_: Request, exc: DataError) -> JSONResponse:
        reason = str(exc.orig).splitlines()[0] if exc.orig else "invalid value"
        return JSONResponse({"detail": f"invalid value: {reason}", "errors": []}, status_code=422)

    @app.exception_handler(ProgrammingError)
    async def _programming(_: Request, exc: ProgrammingError) -> JSONResponse:
        if schema_missing(exc):
            return _not_migrated(exc)
        log.error("database programming error", exc_info=exc)
        return JSONResponse({"detail": "internal server error", "errors": []}, status_code=500)

    @app.exception_handler(OperationalError)
    async def _operational(_: Request, exc: OperationalError) -> JSONResponse:
        if schema_missing(exc):  # SQLite reports a missing table as an OperationalError
            return _not_migrated(exc)
        log.error("database unavailable: %s", str(exc.orig).splitlines()[0] if exc.orig else exc)
        return JSONResponse(
            {"detail": "database unavailable, retry later", "errors": []},
            status_code=503,
            headers={"Retry-After": "5"},
        )
