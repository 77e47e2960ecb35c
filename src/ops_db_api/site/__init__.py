"""Observatory site mode: buffer writes locally, replay them to the main site.

``CCAT_API_SITE_MODE=observatory`` makes the API buffer filings in a local PostgreSQL
database (``CCAT_API_BUFFER_URL``) and answer 202; ``ccat-api buffer replay --follow`` drains
the buffer to the main API (``CCAT_API_MAIN_URL`` / ``CCAT_API_MAIN_TOKEN``). See
docs/site-mode.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .buffer import SiteBuffer

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ..settings import ApiSettings

__all__ = ["SiteBuffer", "install_observatory"]


def install_observatory(app: FastAPI, settings: ApiSettings, prefix: str) -> SiteBuffer:
    """Wire observatory mode into ``app``: the buffer, its routes (ahead of the ordinary
    filing routes, which they shadow) and its metrics on ``app.state.metrics.registry``.

    Call before the ordinary routers are included.
    """
    from prometheus_client import Counter

    from ccat_ops_db.config import ConfigurationError

    from .metrics import BufferCollector
    from .routes import filing_router, site_router

    if not settings.buffer_url:
        raise ConfigurationError(
            "CCAT_API_SITE_MODE=observatory needs CCAT_API_BUFFER_URL (the local buffer database)"
        )
    buffer = SiteBuffer(settings.buffer_url.get_secret_value())
    buffer.create_schema()
    app.state.site_buffer = buffer
    app.state.metrics.registry.register(BufferCollector(buffer))  # read at each scrape
    app.state.site_writes = Counter(
        "ccat_api_buffer_writes",
        "Writes buffered at the observatory, by kind.",
        ["kind"],
        registry=app.state.metrics.local_registry,  # summed over the API's processes
    )
    app.include_router(filing_router, prefix=prefix)
    app.include_router(site_router, prefix=prefix)
    _document_shadowing(app, [filing_router, site_router], prefix)
    return buffer


def _document_shadowing(app: FastAPI, routers: list[Any], prefix: str) -> None:
    """Let the OpenAPI document show the observatory's filing routes, not the main site's
    routes they shadow (those come later in matching order and are never reached)."""
    from fastapi import FastAPI as _FastAPI

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = generate()
            mini = _FastAPI(title=app.title, version=app.version)
            for router in routers:
                mini.include_router(router, prefix=prefix)
            own = mini.openapi()
            for path, methods in own["paths"].items():
                doc["paths"].setdefault(path, {}).update(methods)
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            for name, schema in own.get("components", {}).get("schemas", {}).items():
                schemas.setdefault(name, schema)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
