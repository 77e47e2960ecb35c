"""Settings of the transfer system, read from ``CCAT_TRANSFER_*`` environment variables.

The database comes from the ops-db settings (``CCAT_OPS_DB_*``), so every process of the data
center points at the same database with the same variables. Sizes follow the real system:
raw data packages up to 50 GB; transfer packages filled to a size target (10 TB, the low end
of the 10-50 TB range that suits the long haul) or sent when the oldest package has waited
``transfer_package_max_wait_s``, whichever comes first.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from ccat_ops_db.enums import ChecksumAlgorithm, TransferMethod
from ccat_ops_db.route_options import route_option_problems

from .errors import ConfigurationError
from .pagecache import DEFAULT_WINDOW_MB

ENV_PREFIX = "CCAT_TRANSFER_"

GB = 1000**3
TB = 1000**4


class TransferSettings(BaseSettings):
    """All knobs of managers and workers (environment: ``CCAT_TRANSFER_<NAME>``)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    # --- broker -------------------------------------------------------------------------
    broker_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Celery broker (Redis) URL; may hold a password"
    )
    result_backend: str | None = Field(None, description="Celery result backend (default: none)")
    # Redis for heartbeats and health keys; defaults to the broker.
    redis_url: str | None = None
    # Seconds a task may stay unacknowledged before Redis re-delivers it (acks late).
    visibility_timeout_s: int = Field(12 * 3600, ge=60)

    # --- packaging ----------------------------------------------------------------------
    raw_package_max_bytes: int = Field(50 * GB, ge=1)
    # Package an executed obs unit's files once it has finished, or once no file was filed
    # for it for this long (an obs unit whose "finish" call never came).
    raw_package_idle_s: float = Field(1800.0, ge=0)
    transfer_package_target_bytes: int = Field(10 * TB, ge=1)
    transfer_package_max_wait_s: float = Field(6 * 3600.0, ge=0)
    # Checksum of the package tars (raw data packages and transfer packages), verified at every
    # hop. Files keep the checksum they were filed with (sha256 from the instruments), checked
    # when they are packed at SOURCE and again when they are unpacked next to the archive: that
    # end-to-end check is the cryptographic one. The tars' own checksums only guard transport
    # and storage between those two points, as adler32 does for FTS and crc32c for NGAS, so
    # the default is XXH3-128: 128 bits, at memory speed, where sha256 cost about 1.3 CPU-s
    # per 2 GiB for each of the seven passes a package tar gets (docs/data-transfer.md).
    checksum_algorithm: ChecksumAlgorithm = Field(
        ChecksumAlgorithm.XXH3_128, description="checksum of package tars (files keep their own)"
    )

    # --- retries and recovery -----------------------------------------------------------
    max_retries: int = Field(3, ge=0, description="attempts after the first before FAILED")
    retry_backoff_s: float = Field(60.0, ge=0, description="first back-off; doubles each time")
    retry_backoff_max_s: float = Field(3600.0, ge=0)
    heartbeat_interval_s: float = Field(30.0, gt=0)
    # An IN_PROGRESS record whose task heartbeat is older than this is reset by the sweeper.
    stale_after_s: float = Field(300.0, gt=0)
    # A SCHEDULED record whose task never started within this time is re-submitted.
    scheduled_timeout_s: float = Field(6 * 3600.0, gt=0)

    # Streamed copies write behind and drop behind in windows of this many MiB, so a 50 GB
    # package never fills the page cache (data_transfer.pagecache reads the same variable);
    # 0 leaves caching to the kernel.
    write_behind_mb: int = Field(DEFAULT_WINDOW_MB, ge=0)

    # --- disk space in BUFFERs and partitions ------------------------------------------
    # A worker writes a new package into a BUFFER only if, after writing it, at least this
    # much stays free (the larger of the two); otherwise the record waits, without using up
    # a retry, and is tried again after ``buffer_full_recheck_s``.
    buffer_min_free_bytes: int = Field(0, ge=0)
    buffer_min_free_percent: float = Field(0.0, ge=0, le=100)
    buffer_full_recheck_s: float = Field(60.0, ge=0)
    # Temporary ``*.part-*`` files older than this are left-overs of a killed writer: removed.
    part_file_max_age_s: float = Field(24 * 3600.0, gt=0)
    part_sweep_interval_s: float = Field(3600.0, ge=0)
    # After ``max_retries`` a transfer that failed for a retryable storage or network reason
    # (a partition, an unreachable host) keeps being tried, once per this many seconds,
    # instead of being marked FAILED; 0 turns this off.
    partition_retry_s: float = Field(3600.0, ge=0)

    # --- managers -----------------------------------------------------------------------
    manager_sleep_s: float = Field(30.0, ge=0)
    batch_size: int = Field(500, ge=1, description="items a manager handles per pass and kind")
    # Fixity audit: re-verify at most this many archived bytes per pass.
    fixity_bytes_per_pass: int = Field(100 * GB, ge=0)
    fixity_interval_days: float = Field(90.0, gt=0)

    # --- S3 -------------------------------------------------------------------------------
    # Mover options for every S3 location this process reaches (archiving, staging and
    # fixity reads, repairs, deletion): the options of s3 routes (docs/data-transfer.md,
    # "Route options"), as JSON, e.g. '{"storage_class": "GLACIER_IR"}'. Archiving has no
    # route, so this is where its part size, storage class or timeouts are set; a route's own
    # options win over these.
    s3_options: dict[str, Any] = Field(default_factory=dict)

    # --- local state --------------------------------------------------------------------
    log_dir: Path = Field(Path("transfer-logs"), description="full command outputs go here")
    metrics_port: int | None = Field(None, description="serve Prometheus metrics on this port")
    metrics_host: str = "127.0.0.1"

    @field_validator("s3_options")
    @classmethod
    def _known_s3_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        problems = route_option_problems(TransferMethod.S3, value)
        if problems:
            raise ValueError("; ".join(f"{name}: {problem}" for name, problem in problems))
        return value

    @property
    def heartbeat_redis_url(self) -> str:
        """The Redis that holds task heartbeats and service health keys."""
        return self.redis_url or self.broker_url


def load_transfer_settings(**overrides: object) -> TransferSettings:
    """Read the settings; a bad value raises ConfigurationError naming the variable."""
    try:
        return TransferSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = ENV_PREFIX + "_".join(str(p) for p in err["loc"]).upper()
            lines.append(f"{name}: {err['msg'].removeprefix('Value error, ')}")
        raise ConfigurationError("invalid transfer settings: " + "; ".join(lines)) from exc
    except SettingsError as exc:  # a JSON setting (s3_options) that does not parse
        field = re.search(r'field "(\w+)"', str(exc))
        name = ENV_PREFIX + (field.group(1).upper() if field else "?")
        raise ConfigurationError(
            f"invalid transfer settings: {name}: not valid JSON ({exc.__cause__ or exc})"
        ) from exc
