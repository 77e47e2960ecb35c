"""``ccat-api``: serve the ops-db API."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from .settings import ApiSettings

app = typer.Typer(
    name="ccat-api",
    help="The CCAT ops-db REST API.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (CCAT_API_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (CCAT_API_PORT).")] = None,
    workers: Annotated[
        int | None, typer.Option(help="Worker processes (CCAT_API_WORKERS).")
    ] = None,
) -> None:
    """Serve the API with uvicorn (database from the CCAT_OPS_DB_* settings)."""
    import uvicorn

    from ccat_ops_db.logs import log_format, uvicorn_log_config

    s = ApiSettings()
    processes = workers or s.workers
    if processes > 1:
        _share_metrics()
    uvicorn.run(
        "ops_db_api.main:app",
        host=host or s.host,
        port=port or s.port,
        workers=processes,
        log_level=s.log_level,
        log_config=uvicorn_log_config(log_format("json"), s.log_level),  # CCAT_LOG_FORMAT
        access_log=False,
        proxy_headers=True,
    )


def _share_metrics() -> None:
    """Give the worker processes one metrics folder (see :mod:`ops_db_api.metrics`).

    ``PROMETHEUS_MULTIPROC_DIR`` when set (its old files are removed first: a folder left by
    a previous run would add its counts to this one's), otherwise a new temporary folder,
    removed when the server stops. The workers inherit it through the environment."""
    import atexit
    import shutil
    import tempfile

    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if folder:
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(folder):
            if name.endswith(".db"):
                os.unlink(os.path.join(folder, name))
    else:
        folder = tempfile.mkdtemp(prefix="ccat-api-metrics-")
        atexit.register(shutil.rmtree, folder, True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder


@app.command()
def openapi() -> None:
    """Print the OpenAPI document (JSON)."""
    import json

    from ccat_ops_db.db import make_engine

    from .app import create_app

    typer.echo(json.dumps(create_app(engine=make_engine("sqlite://")).openapi(), indent=2))


from .site.cli import buffer_app  # noqa: E402 - the observatory buffer (docs/site-mode.md)

app.add_typer(buffer_app, name="buffer")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
