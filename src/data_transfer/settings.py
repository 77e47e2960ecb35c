"""Settings of the transfer system, read from ``CCAT_TRANSFER_*`` environment variables.

The database comes from the ops-db settings (``CCAT_OPS_DB_*``), so every process of the data
center points at the same database with the same variables. Sizes follow the real system:
raw data packages up to 50 GB; transfer packages filled to a size target (10 TB, the low end
of the 10-50 TB range that suits the long haul) or sent when the oldest package has waited
``transfer_package_max_wait_s``, whichever comes first.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
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

    # An empty variable is an unset one: compose passes optional settings through as
    # ``${VAR:-}``, which sets them to "" when the caller has not.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", env_ignore_empty=True)

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

    # --- operator notifications (data_transfer.notify) ---------------------------------
    # What needs a person (a record FAILED for good, a transfer package with no archive site
    # left, a bad copy nothing could repair, copies that cannot be deleted, a site whose
    # oldest package is not archived after ``notify_stuck_after_s``) is kept as a notice in
    # the database and sent, as one digest per pass, to every channel set here. No channel:
    # the notices are only kept (``ccat-transfer notices``). The webhook URL and the SMTP
    # password are secrets: environment (a Kubernetes Secret, Ansible Vault), never a file.
    notify_webhook_url: SecretStr | None = Field(
        None, description="POST a JSON digest here (Slack/Mattermost-compatible 'text')"
    )
    notify_smtp_host: str | None = Field(None, description="mail server for e-mail notices")
    notify_smtp_port: int = Field(587, ge=1, le=65535)
    notify_smtp_security: str = Field("starttls", pattern="^(starttls|ssl|none)$")
    notify_smtp_user: str | None = None
    notify_smtp_password: SecretStr | None = None
    # A CA bundle (PEM) to check the mail server's certificate with, for a relay whose
    # certificate an internal CA signed; unset: the system's trusted CAs. The name is always
    # checked too.
    notify_smtp_ca_file: Path | None = None
    notify_email_from: str = "ccat-transfer@localhost"
    # Comma-separated recipients.
    notify_email_to: str = ""
    # A condition must hold this long before it is sent (a bad copy being repaired, a deletion
    # retried); a record FAILED for good is sent at once, its retries are behind it.
    notify_hold_s: float = Field(900.0, ge=0)
    # A site whose oldest raw data package is not archived after this long gets a notice.
    notify_stuck_after_s: float = Field(2 * 86400.0, gt=0)
    # At most one digest per channel per this many seconds; a failed send is tried again
    # after it too.
    notify_min_interval_s: float = Field(300.0, ge=0)
    notify_max_items: int = Field(50, ge=1, description="notices listed in one digest")
    notify_resolved: bool = Field(True, description="also send when a notified problem clears")
    notify_timeout_s: float = Field(20.0, gt=0)
    # The notify manager reads the problems at most this often: `manager all` runs every pass
    # after each round, which with a short CCAT_TRANSFER_MANAGER_SLEEP_S is far more often than
    # a person needs (the hold and the pace are minutes).
    notify_check_s: float = Field(15.0, ge=0)
    # Cleared notices stay this long for `ccat-transfer notices --cleared`, then the notify
    # manager deletes them. At least a week: a clearing is told within a week of it.
    notify_keep_cleared_s: float = Field(90 * 86400.0, ge=7 * 86400.0)

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

    @field_validator("notify_email_to")
    @classmethod
    def _addresses(cls, value: str) -> str:
        bad = [a for a in _split_addresses(value) if "@" not in a]
        if bad:
            raise ValueError(f"not an e-mail address: {', '.join(bad)}")
        return value

    @model_validator(mode="after")
    def _smtp_complete(self) -> TransferSettings:
        if self.notify_email_to.strip() and not self.notify_smtp_host:
            raise ValueError(
                "CCAT_TRANSFER_NOTIFY_EMAIL_TO is set but CCAT_TRANSFER_NOTIFY_SMTP_HOST is not:"
                " set the mail server that sends the notices"
            )
        if self.notify_smtp_host and not self.notify_email_to.strip():
            raise ValueError(
                "CCAT_TRANSFER_NOTIFY_SMTP_HOST is set but CCAT_TRANSFER_NOTIFY_EMAIL_TO is not:"
                " set who receives the notices"
            )
        if self.notify_smtp_password is not None and not self.notify_smtp_user:
            raise ValueError(
                "CCAT_TRANSFER_NOTIFY_SMTP_PASSWORD is set but CCAT_TRANSFER_NOTIFY_SMTP_USER"
                " is not"
            )
        if self.notify_smtp_ca_file is not None:
            where = f"CCAT_TRANSFER_NOTIFY_SMTP_CA_FILE={self.notify_smtp_ca_file}"
            if self.notify_smtp_security == "none":
                raise ValueError(
                    f"{where} is set but CCAT_TRANSFER_NOTIFY_SMTP_SECURITY is none: a CA file"
                    " is for starttls or ssl"
                )
            try:
                ssl.create_default_context(cafile=str(self.notify_smtp_ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"{where}: not a readable PEM CA bundle ({exc})") from None
        return self

    @property
    def notify_recipients(self) -> list[str]:
        """The e-mail recipients of notices (``notify_email_to`` split at commas)."""
        return _split_addresses(self.notify_email_to)

    @property
    def heartbeat_redis_url(self) -> str:
        """The Redis that holds task heartbeats and service health keys."""
        return self.redis_url or self.broker_url


def _split_addresses(value: str) -> list[str]:
    return [a.strip() for a in value.split(",") if a.strip()]


def load_transfer_settings(**overrides: object) -> TransferSettings:
    """Read the settings; a bad value raises ConfigurationError naming the variable."""
    try:
        return TransferSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            message = err["msg"].removeprefix("Value error, ")
            if not err["loc"]:  # a check across settings: its message names them
                lines.append(message)
                continue
            name = ENV_PREFIX + "_".join(str(p) for p in err["loc"]).upper()
            lines.append(f"{name}: {message}")
        raise ConfigurationError("invalid transfer settings: " + "; ".join(lines)) from exc
    except SettingsError as exc:  # a JSON setting (s3_options) that does not parse
        field = re.search(r'field "(\w+)"', str(exc))
        name = ENV_PREFIX + (field.group(1).upper() if field else "?")
        raise ConfigurationError(
            f"invalid transfer settings: {name}: not valid JSON ({exc.__cause__ or exc})"
        ) from exc
