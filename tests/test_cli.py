"""The ``ccat-ops-db`` command line, run as a separate process against real databases."""

from __future__ import annotations

import hashlib
from pathlib import Path

from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session

from ccat_ops_db import migrate as mig
from ccat_ops_db import models as m
from ccat_ops_db.db import make_engine

from .conftest import PgServer, run_cli


def test_migrate_current_check_and_sql(db_url: str, cli_env: dict[str, str]) -> None:
    env = {**cli_env, "CCAT_OPS_DB_URL": db_url}
    r = run_cli(["current"], env)
    assert r.returncode == 0, r.stderr
    assert "none" in r.stdout
    r = run_cli(["check"], env)
    assert r.returncode == 1  # not migrated yet: not at head
    r = run_cli(["migrate"], env)
    assert r.returncode == 0, r.stderr
    assert f"→ {mig.head_revision()}" in r.stdout
    r = run_cli(["migrate"], env)
    assert "nothing to do" in r.stdout
    r = run_cli(["current"], env)
    assert r.stdout.strip().startswith(mig.head_revision()) and "(head)" in r.stdout
    r = run_cli(["check"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "matches the models" in r.stdout
    r = run_cli(["migrate", "--sql"], env)
    assert r.returncode == 0 and "CREATE TABLE raw_data_file" in r.stdout


def test_downgrade_and_history(sqlite_url: str, cli_env: dict[str, str]) -> None:
    env = {**cli_env, "CCAT_OPS_DB_URL": sqlite_url}
    assert run_cli(["migrate"], env).returncode == 0
    r = run_cli(["history"], env)
    assert mig.head_revision() in r.stdout
    r = run_cli(["downgrade", "base"], env)
    assert r.returncode == 0, r.stderr
    assert run_cli(["current"], env).stdout.startswith("none")
    prod = {**env, "CCAT_OPS_DB_ENV": "production"}
    assert run_cli(["migrate"], env).returncode == 0
    r = run_cli(["downgrade", "base"], prod)
    assert r.returncode == 2 and "--yes" in r.stderr
    assert run_cli(["current"], env).stdout.startswith(mig.head_revision())


def test_check_reports_drift(sqlite_url: str, cli_env: dict[str, str]) -> None:
    mig.upgrade(sqlite_url)
    with make_engine(sqlite_url).begin() as conn:
        conn.execute(text("DROP INDEX ix_raw_data_file_unpackaged"))
    r = run_cli(["check"], {**cli_env, "CCAT_OPS_DB_URL": sqlite_url})
    assert r.returncode == 1
    assert "ix_raw_data_file_unpackaged" in r.stdout


BAD_URLS = {
    "refused": ("postgresql://ccat:Sup3rSecret@127.0.0.1:1/ops", 1),
    "unknown host": ("postgresql://ccat:Sup3rSecret@no-such-host.invalid/ops", 1),
    "garbage": ("this is not a url", 2),
    "backend": ("mongodb://ccat:Sup3rSecret@localhost/ops", 2),
    "port": ("postgresql://ccat:Sup3rSecret@localhost:notaport/ops", 2),
    "sqlite folder": ("sqlite:////no/such/folder/ops.sqlite", 2),
}


def test_bad_database_urls_fail_with_one_masked_line(cli_env: dict[str, str]) -> None:
    for label, (url, code) in BAD_URLS.items():
        for cmd in (["check"], ["migrate"], ["current"]):
            r = run_cli(cmd, {**cli_env, "CCAT_OPS_DB_URL": url})
            assert r.returncode == code, (label, cmd, r.returncode, r.stderr)
            lines = [line for line in r.stderr.splitlines() if line.strip()]
            assert len(lines) == 1, (label, r.stderr)
            assert "Sup3rSecret" not in r.stderr + r.stdout, label
            assert "Traceback" not in r.stderr


def test_password_from_parts_is_masked(cli_env: dict[str, str]) -> None:
    env = {
        **cli_env,
        "CCAT_OPS_DB_DATABASE_TYPE": "postgresql",
        "CCAT_OPS_DB_DATABASE_POSTGRESQL_HOST": "127.0.0.1",
        "CCAT_OPS_DB_DATABASE_POSTGRESQL_PORT": "1",
        "CCAT_OPS_DB_DATABASE_POSTGRESQL_PASSWORD": "An0therSecret",
    }
    r = run_cli(["check"], env)
    assert r.returncode == 1
    assert "An0therSecret" not in r.stderr + r.stdout
    assert "***" in r.stderr
    r = run_cli(["config"], env)
    assert r.returncode == 0 and "An0therSecret" not in r.stdout and "***" in r.stdout


def test_users_roles_and_tokens(migrated_url: str, cli_env: dict[str, str]) -> None:
    env = {**cli_env, "CCAT_OPS_DB_URL": migrated_url}
    engine = make_engine(migrated_url)
    with Session(engine) as s, s.begin():
        s.add(m.Role(name="instrument", scopes=["read", "file"]))
    r = run_cli(["user", "add", "chai-daq", "--role", "instrument"], env)
    assert r.returncode == 0, r.stderr
    r = run_cli(["user", "add", "chai-daq"], env)
    assert r.returncode == 2 and "already exists" in r.stderr
    r = run_cli(["user", "add", "x", "--role", "nope"], env)
    assert r.returncode == 2 and "role 'nope' does not exist" in r.stderr

    r = run_cli(["token", "create", "chai-daq", "--name", "daq", "--scope", "file"], env)
    assert r.returncode == 0, r.stderr
    raw = r.stdout.strip()
    assert raw.startswith("ccat_") and len(raw) > 40
    with Session(engine) as s:
        tok = s.scalars(select(m.ApiToken)).one()
        assert tok.token_hash == hashlib.sha256(raw.encode()).hexdigest()
        assert tok.scopes == ["file"]
        # the raw token is nowhere in the database
        for table in ("api_token", '"user"'):
            dump = " ".join(str(row) for row in s.execute(text(f"SELECT * FROM {table}")))
            assert raw not in dump
    r = run_cli(["token", "list"], env)
    assert r.returncode == 0 and raw not in r.stdout and "valid" in r.stdout
    r = run_cli(["token", "create", "chai-daq", "--name", "x", "--scope", "root"], env)
    assert r.returncode == 2 and "--scope" in r.stderr
    r = run_cli(["token", "revoke", str(tok.id)], env)
    assert r.returncode == 0
    with Session(engine) as s:
        assert s.get(m.ApiToken, tok.id).revoked_at is not None
    assert "revoked" in run_cli(["token", "list"], env).stdout
    assert run_cli(["user", "disable", "chai-daq"], env).returncode == 0
    r = run_cli(["token", "create", "chai-daq", "--name", "y"], env)
    assert r.returncode == 2 and "disabled" in r.stderr
    r = run_cli(["token", "revoke", "999"], env)
    assert r.returncode == 2 and "999" in r.stderr


def _make_legacy_db(pg_server: PgServer) -> str:
    name = pg_server.create_database("legacy")
    url = pg_server.url(name)
    with create_engine(url).begin() as conn:
        conn.execute(text("CREATE TABLE legacy_notes (id INTEGER PRIMARY KEY, note TEXT)"))
        conn.execute(text("INSERT INTO legacy_notes VALUES (1, 'keep me')"))
    return url


def test_production_migration_backs_up_first(
    pg_server: PgServer, cli_env: dict[str, str], tmp_path: Path
) -> None:
    url = _make_legacy_db(pg_server)
    env = {
        **cli_env,
        "CCAT_OPS_DB_URL": url,
        "CCAT_OPS_DB_ENV": "production",
        "CCAT_OPS_DB_BACKUP_DIR": str(tmp_path / "backups"),
    }
    # a broken pg_dump stops the migration before it touches anything
    r = run_cli(["migrate"], {**env, "CCAT_OPS_DB_PG_DUMP": str(tmp_path / "missing")})
    assert r.returncode == 1 and "backup failed" in r.stderr, r.stderr
    assert mig.current_revision(make_engine(url)) is None

    r = run_cli(["migrate"], env)
    assert r.returncode == 0, r.stderr
    dumps = list((tmp_path / "backups").glob("*.dump"))
    assert len(dumps) == 1 and dumps[0].stat().st_size > 0
    assert "backup written" in r.stdout
    assert mig.current_revision(make_engine(url)) == mig.head_revision()

    # the dump restores: legacy rows come back in a fresh database
    from ccat_ops_db.migrate import find_pg_dump

    restore = Path(find_pg_dump()).with_name("pg_restore")
    target = pg_server.create_database("restored")
    import subprocess

    subprocess.run(
        [
            str(restore),
            "--no-owner",
            "--host",
            pg_server.socket_dir,
            "--username",
            "postgres",
            "--dbname",
            target,
            str(dumps[0]),
        ],
        check=True,
        capture_output=True,
    )
    with create_engine(pg_server.url(target)).connect() as conn:
        assert conn.execute(text("SELECT note FROM legacy_notes")).scalar() == "keep me"

    # at head already: no second backup
    assert run_cli(["migrate"], env).returncode == 0
    assert len(list((tmp_path / "backups").glob("*.dump"))) == 1


def test_no_backup_flag_and_non_production(
    pg_server: PgServer, cli_env: dict[str, str], tmp_path: Path
) -> None:
    url = _make_legacy_db(pg_server)
    env = {**cli_env, "CCAT_OPS_DB_URL": url, "CCAT_OPS_DB_BACKUP_DIR": str(tmp_path / "b")}
    r = run_cli(["migrate", "--no-backup"], {**env, "CCAT_OPS_DB_ENV": "production"})
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "b").exists()
    url2 = _make_legacy_db(pg_server)
    r = run_cli(["migrate"], {**env, "CCAT_OPS_DB_URL": url2})  # development: no backup
    assert r.returncode == 0 and not (tmp_path / "b").exists()
