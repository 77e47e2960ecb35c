"""The status page: ``/ui`` (overview), ``/ui/failures``, ``/ui/search``, ``/ui/storage``.

Server-rendered with Jinja2 (plain HTML and CSS, an inline SVG chart, no JavaScript build).

Auth is the API's own: a bearer token with the ``read`` scope. A browser cannot send a header,
so the page takes the token once - from the login form (``POST /ui/login``) or as
``?token=...`` on any page - and keeps it in an HttpOnly, SameSite=Strict cookie
(``ccat_ui_token``; ``Secure`` when served over HTTPS). Every page resolves the cookie's token
exactly as the API resolves a bearer token (expiry, revocation, scopes); an
``Authorization: Bearer`` header works as well. ``/ui/logout`` forgets the cookie.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from ccat_ops_db.models import scope_allows

from ..deps import DB, Principal, authenticate, bearer
from ..errors import ApiError
from ..routers.pipeline import _cache_lock, _Cached, compute_summary
from . import queries

COOKIE = "ccat_ui_token"
#: How long the browser keeps the token cookie (the token's own expiry still applies).
COOKIE_MAX_AGE_S = 12 * 3600
#: A summary computed up to this many seconds ago is shown again (shared with the API route).
SUMMARY_MAX_AGE_S = 10.0
#: The per-site backlog is computed at most this often per process.
BACKLOG_MAX_AGE_S = 10.0

templates = Jinja2Templates(directory=str(Path(__file__).with_name("templates")))
router = APIRouter(prefix="/ui", include_in_schema=False)

STAGES = [
    ("filing", "0 filing", "files not in a package yet"),
    ("raw_data_package", "1 packaging", "raw data packages being built"),
    ("data_transfer_package", "2 bundling", "transfer packages being built"),
    ("data_transfer", "3 transfer", "inter-site transfers"),
    ("unpack", "4 unpack", "unpack and verify at the destination"),
    ("long_term_archive_transfer", "5 archive", "copies into the long-term archives"),
    ("staging_job", "6 staging", "staging for processing"),
]


def _fmt_bytes(n: Any) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(value) < 1000 or unit == "PB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return str(n)


def _fmt_age(seconds: Any) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def _fmt_time(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dt.datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        return aware.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


templates.env.filters["bytes"] = _fmt_bytes
templates.env.filters["age"] = _fmt_age
templates.env.filters["time"] = _fmt_time


class _LoginNeededError(Exception):
    def __init__(self, message: str) -> None:
        self.message = message


async def _principal(request: Request) -> Principal:
    """The reader behind the header or the cookie; ``_LoginNeededError`` if there is none."""
    creds = await bearer(request)
    if creds is None:
        raw = request.cookies.get(COOKIE)
        if not raw:
            raise _LoginNeededError("Sign in with an API token that has the read scope.")
        creds = HTTPAuthorizationCredentials(scheme="Bearer", credentials=raw)
    try:
        principal = await authenticate(request, creds)
    except ApiError as exc:
        raise _LoginNeededError(f"The token was refused: {exc.detail}.") from exc
    if not scope_allows(principal.scopes, "read"):
        raise ApiError(403, "token lacks scope 'read'")
    return principal


def _login_redirect(request: Request, message: str) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    query = urlencode({"next": target, "msg": message})
    response = RedirectResponse(f"{_root(request)}/ui/login?{query}", status_code=303)
    response.delete_cookie(COOKIE, path="/ui")
    return response


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


def _set_cookie(request: Request, response: Response, token: str) -> None:
    response.set_cookie(
        COOKIE,
        token,
        max_age=COOKIE_MAX_AGE_S,
        path="/ui",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


async def _page(
    request: Request, template: str, load: Callable[[], dict[str, Any]] | None = None
) -> Response:
    """Check the reader (token from ``?token=``, header or cookie), load the data, render."""
    token = request.query_params.get("token")
    if token:  # take it once, keep it in the cookie, drop it from the address
        url = request.url.remove_query_params("token")
        response = RedirectResponse(str(url), status_code=303)
        _set_cookie(request, response, token.strip())
        return response
    try:
        principal = await _principal(request)
    except _LoginNeededError as exc:
        return _login_redirect(request, exc.message)
    context = await run_in_threadpool(load) if load is not None else {}
    context.update(request=request, user=principal.username, root=_root(request))
    return templates.TemplateResponse(request, template, context)


def _summary(request: Request, db: Any) -> Any:
    """The pipeline summary, shared with ``GET /api/v1/pipeline/summary``'s cache."""
    state = request.app.state
    with _cache_lock:
        cached: _Cached | None = getattr(state, "pipeline_summary_cache", None)
    if cached is not None and time.monotonic() - cached.at <= SUMMARY_MAX_AGE_S:
        return cached.value
    value = compute_summary(db)
    with _cache_lock:
        state.pipeline_summary_cache = _Cached(at=time.monotonic(), value=value)
    return value


_backlog_lock = threading.Lock()


def _backlog(request: Request) -> dict[tuple[str, str], tuple[int, float]]:
    """Not-done items and the oldest one's age per stage and site (cached per process)."""
    from data_transfer.metrics import backlog

    state = request.app.state
    with _backlog_lock:
        hit = getattr(state, "ui_backlog_cache", None)
    if hit is not None and time.monotonic() - hit[0] <= BACKLOG_MAX_AGE_S:
        return hit[1]
    value = backlog(state.engine)
    with _backlog_lock:
        state.ui_backlog_cache = (time.monotonic(), value)
    return value


def _chart(points: list[dict[str, Any]], width: int = 1080, height: int = 160) -> dict[str, Any]:
    """Bars of bytes per hour (transfer stacked on archive), laid out for an inline SVG."""
    top = max([p["transfer"] + p["archive"] for p in points] + [1])
    bar_w = width / max(len(points), 1)
    bars = []
    for i, p in enumerate(points):
        h_t = p["transfer"] / top * (height - 20)
        h_a = p["archive"] / top * (height - 20)
        bars.append(
            {
                "x": round(i * bar_w + 1, 1),
                "w": round(max(bar_w - 2, 1), 1),
                "yt": round(height - h_t, 1),
                "ht": round(h_t, 1),
                "ya": round(height - h_t - h_a, 1),
                "ha": round(h_a, 1),
                "label": p["hour"].strftime("%H:00"),
                "title": f"{p['hour']:%Y-%m-%d %H:00} UTC: transfer {_fmt_bytes(p['transfer'])},"
                f" archive {_fmt_bytes(p['archive'])}",
            }
        )
    return {"bars": bars, "width": width, "height": height, "top": _fmt_bytes(top)}


@router.get("", response_class=HTMLResponse)
@router.get("/", response_class=HTMLResponse)
async def overview(request: Request, db: DB) -> Response:
    """Pipeline overview: per stage (status counts, oldest waiting) and per stage and site."""

    def load() -> dict[str, Any]:
        summary = _summary(request, db)
        points = queries.throughput(db)
        notices, notices_open = queries.open_notices(db)
        return {
            "summary": summary,
            "backlog": _backlog(request),
            "sites": [s.site for s in summary.sites],
            "stage_rows": _stage_rows(summary),
            "stages": STAGES,
            "chart": _chart(points),
            "throughput_total": sum(p["transfer"] + p["archive"] for p in points),
            "failures": queries.latest_failures(db, limit=5),
            "notices": notices,
            "notices_open": notices_open,
        }

    return await _page(request, "overview.html", load)


def _stage_rows(summary: Any) -> list[dict[str, Any]]:
    st = summary.stages
    rows = [
        ("raw_data_package", "1 packaging", st.packaging.raw_data_packages_by_status, st.packaging),
        (
            "data_transfer_package",
            "2 bundling",
            st.transfer_packaging.data_transfer_packages_by_status,
            st.transfer_packaging,
        ),
        ("data_transfer", "3 transfer", st.transfer.data_transfers_by_status, st.transfer),
        ("unpack", "4 unpack", st.unpack.unpacks_by_status, st.unpack),
        (
            "long_term_archive_transfer",
            "5 archive",
            st.archive.archive_transfers_by_status,
            st.archive,
        ),
        ("staging_job", "6 staging", st.staging.staging_jobs_by_status, st.staging),
    ]
    out = [
        {
            "key": "filing",
            "label": "0 filing",
            "counts": {"pending": st.filing.unpackaged_files},
            "oldest": st.filing.oldest_waiting,
        }
    ]
    for key, label, counts, stage in rows:
        out.append({"key": key, "label": label, "counts": counts, "oldest": stage.oldest_waiting})
    return out


@router.get("/failures", response_class=HTMLResponse)
async def failures(
    request: Request, db: DB, limit: Annotated[int, Query(ge=1, le=500)] = 100
) -> Response:
    """The latest failures over every stage, with their reasons and a link to the log."""
    return await _page(
        request,
        "failures.html",
        lambda: {"failures": queries.latest_failures(db, limit), "limit": limit},
    )


@router.get("/failures/{stage}/{record_id}", response_class=HTMLResponse)
async def failure(request: Request, db: DB, stage: str, record_id: int) -> Response:
    """One record's failure: its reason, the log file the worker wrote, its log entries."""

    def load() -> dict[str, Any]:
        detail = queries.failure_detail(db, stage, record_id)
        if detail is None:
            raise ApiError(404, f"no {stage} record {record_id}")
        return {"d": detail}

    return await _page(request, "failure.html", load)


@router.get("/search", response_class=HTMLResponse)
async def search(
    request: Request,
    db: DB,
    q: Annotated[str, Query(max_length=1024, description="UUID, id, name or path")] = "",
) -> Response:
    """Find a file (UUID or path) or a package (id or name): every copy and its history."""
    return await _page(
        request,
        "search.html",
        lambda: {"q": q, "result": queries.search(db, q) if q.strip() else None},
    )


@router.get("/storage", response_class=HTMLResponse)
async def storage(request: Request, db: DB) -> Response:
    """Live copies and bytes per site and location, against the location's capacity."""
    return await _page(request, "storage.html", lambda: {"summary": _summary(request, db)})


@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request, next: str = "/ui", msg: str = "") -> Response:
    """The sign-in form: paste an API token (read scope)."""
    return templates.TemplateResponse(
        request,
        "login.html",
        {"request": request, "next": _safe_next(next), "msg": msg, "root": _root(request)},
    )


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    """Check the posted token, keep it in the cookie, go to ``next``."""
    form = parse_qs((await request.body()).decode("utf-8", "replace"))
    token = (form.get("token") or [""])[0].strip()
    target = _safe_next((form.get("next") or ["/ui"])[0])
    if not token:
        return _login_page(request, target, "Paste an API token.", 422)
    try:
        principal = await authenticate(
            request, HTTPAuthorizationCredentials(scheme="Bearer", credentials=token)
        )
    except ApiError as exc:
        return _login_page(request, target, f"The token was refused: {exc.detail}.", 401)
    if not scope_allows(principal.scopes, "read"):
        return _login_page(request, target, "The token lacks the read scope.", 403)
    response = RedirectResponse(_root(request) + target, status_code=303)
    _set_cookie(request, response, token)
    return response


def _login_page(request: Request, target: str, msg: str, status: int) -> Response:
    return templates.TemplateResponse(
        request,
        "login.html",
        {"request": request, "next": target, "msg": msg, "root": _root(request)},
        status_code=status,
    )


def _safe_next(target: str) -> str:
    """Only paths of this page: no open redirect to another site."""
    if not target.startswith("/ui") or target.startswith("//") or "\\" in target:
        return "/ui"
    return target


@router.get("/logout")
async def logout(request: Request) -> Response:
    """Forget the token cookie."""
    response = RedirectResponse(f"{_root(request)}/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/ui")
    return response
