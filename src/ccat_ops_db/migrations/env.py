"""Alembic environment: the URL comes from the caller or the CCAT_OPS_DB_* settings."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from ccat_ops_db.db import make_engine
from ccat_ops_db.models import Base

config = context.config
target_metadata = Base.metadata


def _configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        compare_server_default=False,
        render_as_batch=True,  # SQLite cannot ALTER most things; batch mode copies the table
        **kwargs,
    )


def run_offline() -> None:
    """Emit SQL instead of running it (``ccat-ops-db migrate --sql``)."""
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if url is None:
        url = make_engine().url
    _configure(url=url, literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    """Run the migrations on a live connection, all in one transaction."""
    connection: Connection | None = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection, transaction_per_migration=False)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(config.attributes.get("url"), null_pool=True)
    try:
        with engine.connect() as conn:
            sqlite = conn.dialect.name == "sqlite"
            if sqlite:
                # Batch mode copies a table and drops the old one, which an enforced foreign key
                # to it forbids. The pragma only changes outside a transaction; the foreign keys
                # are checked once the migration has run, before it commits.
                conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
                conn.commit()
            _configure(connection=conn, transaction_per_migration=False)
            with context.begin_transaction():
                context.run_migrations()
                if sqlite:
                    bad = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if bad:
                        raise RuntimeError(f"the migration broke foreign keys: {bad[:5]}")
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
