"""API settings from ``CCAT_API_*`` environment variables (the database: ``CCAT_OPS_DB_*``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ApiSettings(BaseSettings):
    """Settings of the API process."""

    model_config = SettingsConfigDict(env_prefix="CCAT_API_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1)
    site_mode: Literal["main", "observatory"] = "main"
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
