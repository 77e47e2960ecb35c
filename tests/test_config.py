"""Settings: environment variables, URL normalisation, masking, the settings file."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from ccat_ops_db import ConfigurationError, init_ccat_ops_db, load_settings, mask_url
from ccat_ops_db.config import normalize_url


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("CCAT_OPS_DB_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def test_default_is_a_local_sqlite_file() -> None:
    url = load_settings().sqlalchemy_url()
    assert url.get_backend_name() == "sqlite"
    assert url.database == "ccat_ops_db.sqlite"


def test_parts_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CCAT_OPS_DB_DATABASE_TYPE", "postgresql")
    monkeypatch.setenv("CCAT_OPS_DB_DATABASE_POSTGRESQL_HOST", "db.example.org")
    monkeypatch.setenv("CCAT_OPS_DB_DATABASE_POSTGRESQL_PASSWORD", "pw")
    url = load_settings().sqlalchemy_url()
    assert url.drivername == "postgresql+psycopg"
    assert url.host == "db.example.org" and url.password == "pw"
    assert "pw" not in mask_url(url)


def test_url_overrides_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CCAT_OPS_DB_DATABASE_TYPE", "postgresql")
    monkeypatch.setenv("CCAT_OPS_DB_URL", "postgresql://a:b@h:5433/x")
    url = load_settings().sqlalchemy_url()
    assert (url.drivername, url.host, url.port, url.database) == (
        "postgresql+psycopg",
        "h",
        5433,
        "x",
    )


def test_normalize_url_drivers() -> None:
    assert normalize_url("postgres://u@h/d").drivername == "postgresql+psycopg"
    assert normalize_url("postgresql+psycopg://u@h/d").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite+pysqlite"
    with pytest.raises(ConfigurationError, match="CCAT_OPS_DB_URL"):
        normalize_url("redis://localhost")


def test_mask_url_hides_passwords() -> None:
    assert mask_url("postgresql://u:topsecret@h/d") == "postgresql://u:***@h/d"
    assert "topsecret" not in mask_url("weird://u:topsecret@h:x:y/d")


def test_invalid_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CCAT_OPS_DB_ENV", "prod")
    with pytest.raises(ConfigurationError, match="CCAT_OPS_DB_ENV"):
        load_settings()


def test_settings_file_with_environments(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "ccat_ops_db.toml").write_text(
        '[default]\ndatabase_sqlite_database = "dev.sqlite"\n'
        '[staging]\ndatabase_type = "postgresql"\ndatabase_postgresql_host = "stg-db"\n'
    )
    assert load_settings().sqlalchemy_url().database == "dev.sqlite"
    monkeypatch.setenv("CCAT_OPS_DB_ENV", "staging")
    url = load_settings().sqlalchemy_url()
    assert url.host == "stg-db"
    # the environment beats the file
    monkeypatch.setenv("CCAT_OPS_DB_DATABASE_POSTGRESQL_HOST", "env-db")
    assert load_settings().sqlalchemy_url().host == "env-db"
    bad = tmp_path / "bad.toml"
    bad.write_text("[default\n")
    monkeypatch.setenv("CCAT_OPS_DB_SETTINGS_FILE", str(bad))
    with pytest.raises(ConfigurationError, match=r"bad\.toml"):
        load_settings()


def test_init_ccat_ops_db_sqlite_and_drop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    session, engine = init_ccat_ops_db(
        database_type="sqlite", database=str(tmp_path / "a.db"), drop=True
    )
    assert engine.url.database == str(tmp_path / "a.db")
    assert session.execute(text("SELECT count(*) FROM raw_data_file")).scalar() == 0
    session.remove()
    monkeypatch.setenv("CCAT_OPS_DB_ENV", "production")
    with pytest.raises(ConfigurationError, match="production"):
        init_ccat_ops_db(database=f"sqlite:///{tmp_path / 'b.db'}", drop=True)


def test_init_ccat_ops_db_postgres_from_env(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CCAT_OPS_DB_URL", pg_url)
    session, engine = init_ccat_ops_db()
    assert engine.url.get_backend_name() == "postgresql"
    assert engine.pool._pre_ping  # type: ignore[attr-defined]
    assert session.execute(text("SELECT 1")).scalar() == 1
    session.remove()
