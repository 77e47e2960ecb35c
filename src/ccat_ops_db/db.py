"""Engines and sessions for the operations database."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event, pool
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from .config import ConfigurationError, OpsDbSettings, load_settings, mask_url, normalize_url


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")  # enforce ON DELETE rules as PostgreSQL does
    cur.execute("PRAGMA journal_mode=WAL")  # readers and one writer in parallel processes
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def make_engine(
    url: str | URL | None = None,
    *,
    settings: OpsDbSettings | None = None,
    null_pool: bool = False,
) -> Engine:
    """Create an engine from ``url`` or from the settings (pool pre-ping on)."""
    settings = settings or load_settings()
    sa_url = normalize_url(url) if url is not None else settings.sqlalchemy_url()
    kwargs: dict[str, Any] = {"pool_pre_ping": True, "echo": settings.echo}
    backend = sa_url.get_backend_name()
    if backend == "sqlite":
        database = sa_url.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            parent = os.path.dirname(os.path.abspath(database))
            if not os.path.isdir(parent):
                raise ConfigurationError(
                    f"SQLite database {database}: folder {parent} does not exist "
                    "(set CCAT_OPS_DB_URL or CCAT_OPS_DB_DATABASE_SQLITE_DATABASE)"
                )
        kwargs["connect_args"] = {"timeout": 30}
        if null_pool:
            kwargs["poolclass"] = pool.NullPool
    else:
        if backend == "postgresql":
            # Every session in UTC, whatever the server's or the database's default: the
            # code compares timestamptz columns with naive UTC datetimes in places, which
            # PostgreSQL reads in the session's time zone (on a server set to
            # America/Santiago, a 5-minute staleness test would mean 3-4 hours).
            kwargs["connect_args"] = {
                "connect_timeout": settings.connect_timeout_s,
                "options": "-c timezone=UTC",
            }
        if null_pool:
            kwargs["poolclass"] = pool.NullPool
        else:
            kwargs.update(
                pool_size=settings.pool_size,
                max_overflow=settings.max_overflow,
                pool_recycle=settings.pool_recycle_s,
            )
    engine = create_engine(sa_url, **kwargs)
    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def init_ccat_ops_db(
    database_type: str | None = None,
    database: str | None = None,
    drop: bool = False,
    null_pool: bool = False,
    host: str | None = None,
    port: str | int | None = None,
    user: str | None = None,
    password: str | None = None,
    db_name: str | None = None,
) -> tuple[scoped_session[Session], Engine]:
    """Connect to the operations database; returns ``(session, engine)``.

    Arguments override the ``CCAT_OPS_DB_*`` settings. ``database`` is a full SQLAlchemy URL
    (or, with ``database_type="sqlite"``, a file path). ``drop=True`` drops and re-creates
    every table and is refused when ``CCAT_OPS_DB_ENV=production``. The schema itself is
    managed by the migrations (``ccat-ops-db migrate``), not here.
    """
    overrides: dict[str, Any] = {
        "database_type": database_type,
        "database_postgresql_host": host,
        "database_postgresql_port": port,
        "database_postgresql_user": user,
        "database_postgresql_password": password,
        "database_postgresql_database": db_name,
    }
    url: str | None = None
    if database is not None:
        if database_type == "sqlite" and "://" not in database:
            overrides["database_sqlite_database"] = database
        else:
            url = database
    settings = load_settings(**overrides)
    if url is None and settings.url is None and database_type is not None:
        # explicit parts win over an environment URL
        url = settings.model_copy(update={"url": None}).sqlalchemy_url()  # type: ignore[assignment]
    engine = make_engine(url, settings=settings, null_pool=null_pool)
    if drop:
        if settings.env == "production":
            raise ConfigurationError(
                "refusing drop=True: CCAT_OPS_DB_ENV=production (this would destroy real data)"
            )
        from .models import Base

        Base.metadata.drop_all(engine)
        Base.metadata.create_all(engine)
    factory = sessionmaker(bind=engine, expire_on_commit=False)
    return scoped_session(factory), engine


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session in one transaction: commit on success, roll back on any error."""
    with Session(engine, expire_on_commit=False) as session, session.begin():
        yield session


def describe(engine: Engine) -> str:
    """The engine's URL with the password masked."""
    return mask_url(engine.url)
