"""Schemas of the long-term archive and staging routes (pipeline stages 5 and 6)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from pydantic import AfterValidator, AwareDatetime, BaseModel, Field, field_validator

from ccat_ops_db.enums import PackageState, Status

from .common import ORMModel
from .filing import Strict

#: Longest a staged copy may be kept, as ``expires_at`` or ``retention_hours`` (ten years).
MAX_RETENTION = dt.timedelta(days=3650)
MAX_PACKAGES_PER_JOB = 1000


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


BigIdValue = Annotated[int, Field(ge=1, le=2**63 - 1)]


# --- shared ----------------------------------------------------------------------------------


class LogLineOut(ORMModel):
    """A short log line about an operation; the full output is in the file at ``log_path``."""

    id: int = Field(examples=[4711])
    created_at: dt.datetime
    level: str = Field(examples=["info"])
    message: str = Field(examples=["retry requested by alice (was failed: S3 timeout)"])
    log_path: str | None = Field(None, examples=["/var/log/ccat/lta/4711.log"])


# --- long-term archive -----------------------------------------------------------------------


class LongTermArchiveTransferOut(BaseModel):
    """Copying one raw data package from a BUFFER into a LONG_TERM_ARCHIVE (with sidecar)."""

    id: int = Field(examples=[17])
    raw_data_package_id: int = Field(examples=[42])
    raw_data_package_name: str = Field(examples=["chai_lfa_20260501T030000_0001.tar"])
    raw_data_package_state: PackageState = Field(examples=["transferring"])
    origin_location_id: int = Field(examples=[4])
    origin_location: str = Field(description="`site/location`", examples=["cologne/buffer"])
    destination_location_id: int = Field(examples=[5])
    destination_location: str = Field(description="`site/location`", examples=["cologne/lta"])
    status: Status = Field(examples=["failed"])
    retry_count: int = Field(examples=[3])
    failure_reason: str | None = Field(None, examples=["S3 upload timed out after 3 attempts"])
    last_failure_at: dt.datetime | None = None
    next_attempt_at: dt.datetime | None = None
    object_key: str | None = Field(None, examples=["raw/chai/2026/05/01/pkg_0001.tar"])
    sidecar_key: str | None = Field(None, examples=["raw/chai/2026/05/01/pkg_0001.tar.json"])
    bytes_transferred: int | None = Field(None, examples=[52_428_800])
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    checksum_verified_at: dt.datetime | None = None
    created_at: dt.datetime
    updated_at: dt.datetime


# --- staging ---------------------------------------------------------------------------------


class StagingJobCreate(Strict):
    """A request to stage archived raw data packages into a PROCESSING location.

    Give at most one of ``expires_at`` and ``retention_hours``; with neither, the copies expire
    after the destination location's own ``retention_hours`` (or never, if it has none).
    """

    raw_data_package_ids: list[BigIdValue] = Field(
        min_length=1,
        max_length=MAX_PACKAGES_PER_JOB,
        description="Ids of ARCHIVED raw data packages (duplicates are ignored).",
        examples=[[42, 43]],
    )
    destination_location_id: int = Field(
        ge=1, le=2**31 - 1, description="An active PROCESSING location.", examples=[6]
    )
    name: Annotated[str, AfterValidator(_no_nul)] | None = Field(
        None, min_length=1, max_length=255, examples=["orion-b cube run 3"]
    )
    description: Annotated[str, AfterValidator(_no_nul)] | None = Field(
        None, max_length=4000, examples=["CHAI LFA maps of Orion B for the GEco pipeline"]
    )
    unpack: bool = Field(True, description="Unpack the package tars at the destination.")
    expires_at: AwareDatetime | None = Field(
        None,
        description="When the staged copies may be removed even without a release (future).",
        examples=["2030-01-01T00:00:00Z"],
    )
    retention_hours: float | None = Field(
        None,
        gt=0,
        le=MAX_RETENTION.total_seconds() / 3600,
        allow_inf_nan=False,
        description="Alternative to expires_at: keep the staged copies this long.",
        examples=[336],
    )

    @field_validator("expires_at")
    @classmethod
    def _future(cls, value: dt.datetime | None) -> dt.datetime | None:
        if value is None:
            return value
        now = dt.datetime.now(dt.UTC)
        if value <= now:
            raise ValueError("must be in the future")
        if value > now + MAX_RETENTION:
            raise ValueError(f"must be within {MAX_RETENTION.days} days from now")
        return value


class StagingProgress(BaseModel):
    """How far a staging job got: packages and bytes with a STAGED/PRESENT copy there."""

    packages_requested: int = Field(examples=[2])
    packages_staged: int = Field(examples=[1])
    bytes_requested: int = Field(examples=[104_857_600])
    bytes_staged: int = Field(examples=[52_428_800])


class StagingPackageOut(BaseModel):
    """One package of a staging job and whether it is staged at the destination yet."""

    id: int = Field(examples=[42])
    name: str = Field(examples=["chai_lfa_20260501T030000_0001.tar"])
    size: int | None = Field(None, examples=[52_428_800])
    state: PackageState = Field(examples=["archived"])
    staged: bool = Field(description="Has a STAGED or PRESENT copy at the destination.")
    path: str | None = Field(
        None,
        description="Where it is staged, relative to the destination's root: a folder with "
        "its files when unpacked, a tar when not (one place per package, shared by every job "
        "that asks for it there); null until staged.",
        examples=["staging/chai_lfa_20260501T030000_0001"],
    )


class StagingJobOut(BaseModel):
    """A staging job as listed."""

    id: int = Field(examples=[7])
    name: str | None = Field(None, examples=["orion-b cube run 3"])
    description: str | None = None
    status: Status = Field(examples=["pending"])
    active: bool = Field(description="False once released or cancelled.")
    unpack: bool
    destination_location_id: int = Field(examples=[6])
    destination_location: str = Field(description="`site/location`", examples=["cologne/ramses"])
    origin_location_id: int | None = Field(None, examples=[5])
    origin_location: str | None = Field(None, examples=["cologne/lta"])
    requested_by_user_id: int | None = Field(None, examples=[3])
    requested_by: str | None = Field(None, description="Username.", examples=["alice"])
    created_by_token_id: int | None = None
    package_count: int = Field(examples=[2])
    requested_at: dt.datetime
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    released_at: dt.datetime | None = None
    expires_at: dt.datetime | None = None
    retry_count: int = 0
    failure_reason: str | None = Field(None, examples=["cancelled by alice"])
    created_at: dt.datetime
    updated_at: dt.datetime


class StagingJobDetail(StagingJobOut):
    """A staging job with its progress, its packages and its most recent log lines."""

    progress: StagingProgress
    packages: list[StagingPackageOut]
    recent_logs: list[LogLineOut] = Field(description="Up to 20 log lines, newest first.")
