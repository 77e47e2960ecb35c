"""The FastAPI application factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy import Engine

from ccat_ops_db.db import make_engine

from . import __version__
from .errors import install_error_handlers
from .metrics import ApiMetrics, MetricsMiddleware
from .routers import (
    archive,
    executed_obs_units,
    health,
    observatory,
    pipeline,
    planning,
    raw_data_files,
    raw_data_packages,
    sites,
    staging,
    transfers,
)
from .settings import ApiSettings

API_PREFIX = "/api/v1"
log = logging.getLogger("ops_db_api")

DESCRIPTION = """
The operations database API of the CCAT data center.

Instruments file **executed obs units** and **raw data files** here; operators and pipelines
follow packages, transfers, archive copies and staging jobs.

* Every route except `/healthz`, `/readyz` and `/metrics` needs `Authorization: Bearer <token>`
  (tokens: `ccat-ops-db token create`). Scopes: `read` (GET), `file` (filing), `operate`
  (package states, transfers, staging), `admin` (everything).
* Filing is idempotent on the client's UUIDs: the same content again answers 200; other content
  answers 409 naming the differing fields. Bulk filing is all-or-nothing.
* Lists are keyset-paginated: pass `next_cursor` back as `cursor`; `limit` is capped.
* Errors are JSON: `{"detail": "...", "errors": [{"loc": [...], "msg": "..."}]}`.
"""


def create_app(engine: Engine | None = None, settings: ApiSettings | None = None) -> FastAPI:
    """Build the API app; the engine defaults to the ``CCAT_OPS_DB_*`` settings."""
    settings = settings or ApiSettings()
    engine = engine or make_engine()
    metrics = ApiMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import anyio.to_thread

        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.threads
        app.state.close_limiter = anyio.CapacityLimiter(4)
        yield
        engine.dispose()

    app = FastAPI(
        title="CCAT ops-db API",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        root_path=settings.root_path,
    )
    app.state.engine = engine
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.token_cache = {}
    app.state.location_types = {}
    install_error_handlers(app)
    app.add_middleware(MetricsMiddleware, metrics=metrics, prefix=API_PREFIX)
    app.include_router(health.router)
    for module in (
        observatory,
        planning,
        sites,
        executed_obs_units,
        raw_data_files,
        raw_data_packages,
        transfers,
        pipeline,
        archive,
        staging,
    ):
        app.include_router(module.router, prefix=API_PREFIX)
    return app
