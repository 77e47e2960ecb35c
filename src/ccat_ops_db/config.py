"""Database settings, read from ``CCAT_OPS_DB_*`` environment variables.

Every command and service of the data center reads the database from these settings, so one
set of variables points everything (API, managers, workers, CLIs) at the same database.

Precedence (highest first): ``CCAT_OPS_DB_URL``; the individual ``CCAT_OPS_DB_DATABASE_*``
parts; a TOML settings file (``CCAT_OPS_DB_SETTINGS_FILE``, or ``./ccat_ops_db.toml`` when
present, with ``[default]`` and per-environment tables selected by ``CCAT_OPS_DB_ENV``);
built-in defaults (a local SQLite file).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

ENV_PREFIX = "CCAT_OPS_DB_"
# Decision: a file in the working directory, not /tmp (shared and world-writable).
DEFAULT_SQLITE_PATH = "ccat_ops_db.sqlite"
#: The driver used for a plain ``postgresql://`` URL.
POSTGRES_DRIVER = "postgresql+psycopg"


class ConfigurationError(Exception):
    """A setting is missing or malformed; the message names the setting."""


class _TomlSource(PydanticBaseSettingsSource):
    """Reads ``[default]`` then ``[<env>]`` from the settings file, if there is one."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path_str = os.environ.get(ENV_PREFIX + "SETTINGS_FILE")
        path = Path(path_str) if path_str else Path("ccat_ops_db.toml")
        if not path.is_file():
            if path_str:
                raise ConfigurationError(
                    f"{ENV_PREFIX}SETTINGS_FILE: settings file {path} does not exist"
                )
            return {}
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(f"{path}: invalid TOML: {exc}") from exc
        env = os.environ.get(ENV_PREFIX + "ENV", "development")
        merged: dict[str, Any] = {}
        merged.update(data.get("default", {}))
        merged.update(data.get(env, {}))
        return {k.lower(): v for k, v in merged.items()}


class OpsDbSettings(BaseSettings):
    """Connection settings of the operations database."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    env: Literal["development", "staging", "production"] = Field(
        "development", description="Deployment environment; production enables safety guards."
    )
    url: SecretStr | None = Field(
        None, description="Any SQLAlchemy URL; overrides every DATABASE_* part."
    )
    database_type: Literal["sqlite", "postgresql"] = "sqlite"
    database_sqlite_database: str = DEFAULT_SQLITE_PATH
    database_postgresql_host: str = "localhost"
    database_postgresql_port: int = 5432
    database_postgresql_user: str = "ccat"
    database_postgresql_password: SecretStr | None = None
    database_postgresql_database: str = "ccat_ops_db"
    pool_size: int = Field(5, ge=1)
    max_overflow: int = Field(10, ge=0)
    pool_recycle_s: int = Field(1800, ge=-1)
    connect_timeout_s: int = Field(10, ge=1)
    echo: bool = False
    backup_dir: str = Field("./backups", description="Where pre-migration pg_dump files go.")
    pg_dump: str | None = Field(None, description="Path of pg_dump to use for backups.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlSource(settings_cls))

    def sqlalchemy_url(self) -> URL:
        """The URL to connect with (driver normalised; password kept inside the URL object)."""
        if self.url is not None:
            return normalize_url(self.url.get_secret_value())
        if self.database_type == "sqlite":
            return URL.create("sqlite+pysqlite", database=self.database_sqlite_database)
        password = self.database_postgresql_password
        return URL.create(
            POSTGRES_DRIVER,
            username=self.database_postgresql_user,
            password=password.get_secret_value() if password else None,
            host=self.database_postgresql_host,
            port=self.database_postgresql_port,
            database=self.database_postgresql_database,
        )


def normalize_url(raw: str | URL) -> URL:
    """Parse a URL, mapping plain ``postgresql://``/``postgres://``/``sqlite://`` to drivers."""
    try:
        url = make_url(raw) if isinstance(raw, str) else raw
    except ArgumentError as exc:
        raise ConfigurationError(
            f"{ENV_PREFIX}URL: not a database URL ({mask_url(str(raw))})"
        ) from exc
    except ValueError as exc:
        raise ConfigurationError(f"{ENV_PREFIX}URL: malformed database URL: {exc}") from exc
    driver = url.drivername
    if driver in ("postgresql", "postgres"):
        url = url.set(drivername=POSTGRES_DRIVER)
    elif driver == "sqlite":
        url = url.set(drivername="sqlite+pysqlite")
    backend = url.get_backend_name()
    if backend not in ("postgresql", "sqlite", "mysql"):
        raise ConfigurationError(
            f"{ENV_PREFIX}URL: unsupported database backend {backend!r} "
            "(use postgresql://… or sqlite:///…)"
        )
    return url


def mask_url(url: str | URL) -> str:
    """Render a URL with its password replaced by ``***`` (safe to print or log)."""
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # unparsable: hide everything between '://' and '@'
        if "@" in url and "://" in url:
            scheme, rest = url.split("://", 1)
            return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
        return url


def load_settings(**overrides: Any) -> OpsDbSettings:
    """Read the settings; a bad value raises :class:`ConfigurationError` naming the variable."""
    try:
        return OpsDbSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        raise ConfigurationError(
            f"{ENV_PREFIX}{field.upper()}: {first['msg']} (got {first.get('input')!r})"
        ) from exc
