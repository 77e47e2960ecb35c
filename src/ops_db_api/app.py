"""The FastAPI application factory."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy import Engine

from ccat_ops_db.config import load_settings
from ccat_ops_db.db import make_engine

from . import __version__
from .errors import install_error_handlers
from .fastpath import AsyncPgPool
from .limits import BodyLimitMiddleware
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
from .ui import router as ui_router

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


#: The route groups in the order the documentation shows them.
OPENAPI_TAGS = [
    {"name": "health", "description": "Liveness, readiness and metrics; no token needed."},
    {"name": "observatory", "description": "Observatories, telescopes, instruments, modules."},
    {"name": "planning", "description": "Observing programs, sources, obs modes, obs units."},
    {"name": "sites", "description": "Sites, data locations and transfer routes."},
    {"name": "executed obs units", "description": "Observations, filed by the instruments."},
    {"name": "raw data files", "description": "Raw data files, filed one by one or in bulk."},
    {"name": "raw data packages", "description": "Packages of raw data files and their state."},
    {"name": "transfers", "description": "Data transfer packages, transfers and their logs."},
    {"name": "pipeline", "description": "Where everything is in the pipeline."},
    {"name": "long-term archive", "description": "Transfers into the long-term archives."},
    {"name": "staging", "description": "Staging archived packages for processing."},
]


def create_app(engine: Engine | None = None, settings: ApiSettings | None = None) -> FastAPI:
    """Build the API app; the engine defaults to the ``CCAT_OPS_DB_*`` settings."""
    settings = settings or ApiSettings()
    if engine is None:
        # Keep as many pooled connections as there are worker threads: with fewer, the pool
        # opens and closes "overflow" connections all the time under load (a new PostgreSQL
        # backend each, several milliseconds of CPU on both sides).
        db_settings = load_settings()
        if db_settings.pool_size < settings.threads:
            db_settings = db_settings.model_copy(update={"pool_size": settings.threads})
        engine = make_engine(settings=db_settings)
    metrics = ApiMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import anyio.to_thread

        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.threads
        app.state.close_limiter = anyio.CapacityLimiter(4)
        if settings.fast_filing and engine.dialect.name == "postgresql":
            app.state.fast_pool = AsyncPgPool(engine, settings.async_pool_size)
        # The ~200,000 objects made at startup (routes, schemas, models) live as long as the
        # process: moved out of the collector's sight, a full collection no longer walks
        # them - otherwise it stops the process for tens of milliseconds now and then.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            pool = app.state.fast_pool
            app.state.fast_pool = None
            if pool is not None:
                await pool.close()
            engine.dispose()

    app = FastAPI(
        title="CCAT ops-db API",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        root_path=settings.root_path,
        openapi_tags=OPENAPI_TAGS,
    )
    app.state.engine = engine
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.token_cache = {}
    app.state.location_types = {}
    app.state.fast_pool = None  # set by the lifespan (PostgreSQL): the async filing path
    install_error_handlers(app)
    # Inside the metrics middleware, so refused bodies (413/422) are counted too.
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_body_bytes, max_depth=settings.max_json_depth
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics, prefix=API_PREFIX)
    # Routes are matched in the order they are included, one by one: the instruments' filing
    # routes (thousands of requests a minute) come first so they are found after a couple of
    # comparisons instead of thirty. The documentation keeps its order (OPENAPI_TAGS).
    if settings.site_mode == "observatory":  # filings go to the local buffer (site/)
        from .site import install_observatory

        install_observatory(app, settings, API_PREFIX)  # its routes shadow the filing routes
    for module in (raw_data_files, executed_obs_units):
        app.include_router(module.router, prefix=API_PREFIX)
    app.include_router(health.router)
    app.include_router(ui_router)  # the status page, /ui (see ops_db_api.ui)
    for module in (
        observatory,
        planning,
        sites,
        raw_data_packages,
        transfers,
        pipeline,
        archive,
        staging,
    ):
        app.include_router(module.router, prefix=API_PREFIX)
    return app
