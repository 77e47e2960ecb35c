"""Liveness, readiness and metrics (no token needed)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from ccat_ops_db import migrate as mig

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process serves requests")
def healthz() -> dict[str, str]:
    """Always 200 while the process is up; does not touch the database."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: database reachable and migrated to head",
    responses={503: {"description": "Not ready; the body says why"}},
)
def readyz(request: Request) -> JSONResponse:
    """200 when the database answers and its schema is at the packaged head revision."""
    engine = request.app.state.engine
    head = mig.head_revision()
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        current = mig.current_revision(engine)
    except Exception as exc:  # any failure means not ready, with the reason
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        return JSONResponse(
            {"status": "unavailable", "database": "unreachable", "reason": reason},
            status_code=503,
        )
    body = {"status": "ok", "database": "ok", "revision": current, "head": head}
    if current != head:
        body.update(status="unavailable", reason=f"schema at {current}, expected {head}")
        return JSONResponse(body, status_code=503)
    return JSONResponse(body)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Metrics in the Prometheus text format."""
    data = generate_latest(request.app.state.metrics.registry)
    return Response(content=data, media_type=CONTENT_TYPE_LATEST)
