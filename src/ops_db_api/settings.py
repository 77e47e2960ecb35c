"""API settings from ``CCAT_API_*`` environment variables (the database: ``CCAT_OPS_DB_*``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ApiSettings(BaseSettings):
    """Settings of the API process."""

    model_config = SettingsConfigDict(env_prefix="CCAT_API_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1)
    site_mode: Literal["main", "observatory"] = "main"
    # Observatory mode (docs/site-mode.md): the local buffer database, and the main API the
    # replayer sends the buffered writes to, with a token of scope `file` (environment only).
    buffer_url: SecretStr | None = None
    main_url: str | None = None
    main_token: SecretStr | None = None
    replay_batch_size: int = Field(1000, ge=1, le=10_000)
    replay_backoff_max_s: float = Field(60.0, gt=0)
    buffer_retention_s: float = Field(7 * 86400.0, ge=0)
    page_size_default: int = Field(100, ge=1)
    page_size_max: int = Field(1000, ge=1)
    bulk_max_items: int = Field(10_000, ge=1)
    # Update a token's last_used_at at most this often (saves a write per request).
    token_touch_interval_s: float = Field(60.0, ge=0)
    # Resolved tokens are kept this long in each API process (0: look up every request).
    # A revoked or expired token, or a disabled user, is refused at most this long later.
    token_cache_ttl_s: float = Field(5.0, ge=0, le=300)
    # Threads per process for the (synchronous) database work. Few threads beat many: the
    # work is CPU-bound Python, and 40 threads fighting for the GIL cost more than they give.
    threads: int = Field(8, ge=1, le=256)
    # PostgreSQL only: file single raw data files on the event loop, one statement per file,
    # over this many async connections per process (off: every filing goes through a thread).
    fast_filing: bool = True
    async_pool_size: int = Field(4, ge=1, le=64)
    log_level: str = "info"
    root_path: str = ""
    # Request bodies over this many bytes answer 413 (limits.py). 10,000 files in one bulk
    # filing measure about 5 MiB (15 MiB with 250-character paths and 1 KiB of extra each).
    max_body_bytes: int = Field(32 * 2**20, ge=1024)
    # JSON nested deeper than this answers 422 before any parser recurses into it.
    max_json_depth: int = Field(64, ge=4, le=512)
