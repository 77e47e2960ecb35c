"""Schemas of the transfer routes (pipeline stages 2-4) and of the pipeline summary."""

from __future__ import annotations

import datetime as dt
import uuid

from pydantic import BaseModel, Field

from ccat_ops_db.enums import ChecksumAlgorithm, LocationType, Status, TransferMethod

from .filing import Strict

#: Most raw data package ids ``GET /data_transfer_packages/{id}`` lists.
MAX_PACKAGE_IDS = 1000

# --- data transfer packages ------------------------------------------------------------------


class CancelTransferIn(Strict):
    """Why an operator gives a transfer up (kept in its failure reason and its log)."""

    reason: str = Field(
        min_length=1,
        max_length=500,
        examples=["the Cornell archive is decommissioned"],
        description="Why the transfer is given up; shown with the transfer from now on.",
    )


class DataTransferPackageOut(BaseModel):
    """A tar of raw data packages built in a BUFFER for one long-haul hop."""

    id: int = Field(examples=[7])
    name: str = Field(examples=["ccat_buffer_20260501_0001.tar"])
    relative_path: str = Field(examples=["transfer/ccat_buffer_20260501_0001.tar"])
    size: int | None = Field(None, examples=[12_000_000_000_000])
    checksum: str | None = Field(None, examples=["9f86d081" * 8])
    checksum_algorithm: ChecksumAlgorithm
    status: Status = Field(examples=["completed"])
    origin_location_id: int = Field(examples=[3])
    origin_location: str = Field(description="`site/location`", examples=["ccat/buffer"])
    retry_count: int = Field(examples=[0])
    failure_reason: str | None = Field(None, examples=[None])
    last_failure_at: dt.datetime | None = None
    next_attempt_at: dt.datetime | None = None
    created_at: dt.datetime
    updated_at: dt.datetime


class DataTransferOut(BaseModel):
    """Moving one data transfer package to one destination BUFFER, then unpacking it there.

    Transfer and unpack each have a status, a retry count and a failure reason.
    """

    id: int = Field(examples=[11])
    data_transfer_package_id: int = Field(examples=[7])
    data_transfer_package_name: str = Field(examples=["ccat_buffer_20260501_0001.tar"])
    route_id: int | None = Field(None, examples=[1])
    origin_location_id: int = Field(examples=[3])
    origin_location: str = Field(description="`site/location`", examples=["ccat/buffer"])
    destination_location_id: int = Field(examples=[4])
    destination_location: str = Field(description="`site/location`", examples=["cologne/buffer"])
    method: TransferMethod = Field(examples=["bbcp"])
    is_secondary: bool = Field(description="Replication between archive sites.")
    status: Status = Field(examples=["failed"])
    retry_count: int = Field(examples=[3])
    failure_reason: str | None = Field(None, examples=["bbcp: connection reset by peer"])
    last_failure_at: dt.datetime | None = None
    next_attempt_at: dt.datetime | None = None
    unpack_status: Status = Field(examples=["pending"])
    unpack_retry_count: int = Field(examples=[0])
    unpack_failure_reason: str | None = Field(None, examples=[None])
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    unpacked_at: dt.datetime | None = None
    bytes_transferred: int | None = Field(None, examples=[12_000_000_000_000])
    rate_bytes_per_s: float | None = Field(None, examples=[1.2e9])
    created_at: dt.datetime
    updated_at: dt.datetime


class DataTransferPackageDetail(DataTransferPackageOut):
    """A transfer package with the raw data packages in it and its transfers."""

    raw_data_package_count: int = Field(examples=[240])
    raw_data_package_ids: list[int] = Field(
        description=f"The first {MAX_PACKAGE_IDS} raw data package ids, ascending.",
        examples=[[42, 43]],
    )
    transfers: list[DataTransferOut]


# --- pipeline summary ------------------------------------------------------------------------


class OldestWaiting(BaseModel):
    """The item that has waited longest in a stage."""

    id: int | uuid.UUID = Field(examples=[42])
    since: dt.datetime = Field(description="When it started waiting (see the stage's note).")
    age_s: float = Field(description="Seconds since `since`.", examples=[3600.0])


class Stage0Filing(BaseModel):
    """Filed files that are in no raw data package yet."""

    unpackaged_files: int = Field(examples=[1200])
    unpackaged_bytes: int = Field(examples=[62_914_560_000])
    oldest_waiting: OldestWaiting | None = Field(
        None, description="Oldest unpackaged file, by filing time."
    )


class Stage1Packaging(BaseModel):
    """Raw data packages by build status."""

    raw_data_packages_by_status: dict[str, int] = Field(
        examples=[{"pending": 3, "scheduled": 0, "in_progress": 1, "completed": 90, "failed": 0}]
    )
    oldest_waiting: OldestWaiting | None = Field(
        None, description="Oldest package not built yet (pending/scheduled/in progress)."
    )


class Stage2TransferPackaging(BaseModel):
    """Built raw packages waiting for a transfer package, and transfer packages by status."""

    raw_data_packages_waiting: int = Field(
        description="Built (completed), state waiting, in no transfer package.", examples=[12]
    )
    raw_data_packages_in_transfer_packages: int = Field(examples=[80])
    data_transfer_packages_by_status: dict[str, int] = Field(
        examples=[{"pending": 0, "scheduled": 0, "in_progress": 1, "completed": 4, "failed": 0}]
    )
    oldest_waiting: OldestWaiting | None = Field(
        None, description="Oldest built package waiting for a transfer package, by creation."
    )


class Stage3Transfer(BaseModel):
    """Site-to-site transfers by status."""

    data_transfers_by_status: dict[str, int] = Field(
        examples=[{"pending": 1, "scheduled": 0, "in_progress": 1, "completed": 6, "failed": 1}]
    )
    oldest_waiting: OldestWaiting | None = Field(
        None, description="Oldest transfer not done yet (pending/scheduled/in progress)."
    )


class Stage4Unpack(BaseModel):
    """Unpacking at the destination, for transfers whose bytes arrived (status completed)."""

    unpacks_by_status: dict[str, int] = Field(
        examples=[{"pending": 1, "scheduled": 0, "in_progress": 0, "completed": 5, "failed": 0}]
    )
    oldest_waiting: OldestWaiting | None = Field(
        None, description="Oldest arrived transfer not unpacked yet, since it finished."
    )


class Stage5Archive(BaseModel):
    """Long-term archive transfers by status, and raw packages by lifecycle state."""

    archive_transfers_by_status: dict[str, int] = Field(
        examples=[{"pending": 2, "scheduled": 0, "in_progress": 0, "completed": 70, "failed": 0}]
    )
    raw_data_packages_archived: int = Field(examples=[70])
    raw_data_packages_by_state: dict[str, int] = Field(
        examples=[{"waiting": 15, "transferring": 9, "archived": 70, "failed": 0}]
    )
    oldest_waiting: OldestWaiting | None = Field(
        None, description="Oldest archive transfer not done yet, by creation."
    )


class Stage6Staging(BaseModel):
    """Staging jobs by status."""

    staging_jobs_by_status: dict[str, int] = Field(
        examples=[{"pending": 0, "scheduled": 0, "in_progress": 1, "completed": 3, "failed": 0}]
    )
    oldest_waiting: OldestWaiting | None = Field(
        None, description="Oldest staging job not done yet, by request time."
    )


class Stage7Copies(BaseModel):
    """Physical copies by status (deletion is stage 7), in total and per copy type."""

    copies_by_status: dict[str, int] = Field(examples=[{"present": 1500, "deleted": 20}])
    copies_by_type: dict[str, dict[str, int]] = Field(
        examples=[{"raw_data_file": {"present": 1400}, "raw_data_package": {"present": 100}}]
    )
    oldest_waiting: OldestWaiting | None = Field(
        None, description="Oldest copy scheduled for or being deleted, since its last update."
    )


class PipelineStages(BaseModel):
    """Counts per pipeline stage."""

    filing: Stage0Filing
    packaging: Stage1Packaging
    transfer_packaging: Stage2TransferPackaging
    transfer: Stage3Transfer
    unpack: Stage4Unpack
    archive: Stage5Archive
    staging: Stage6Staging
    copies: Stage7Copies


class LocationSummary(BaseModel):
    """Live (PRESENT or STAGED) copies at one location, and their bytes."""

    id: int = Field(examples=[3])
    name: str = Field(examples=["buffer"])
    location_type: LocationType = Field(examples=["buffer"])
    active: bool
    present_copies: int = Field(examples=[1500])
    present_bytes: int = Field(examples=[78_643_200_000])
    present_copies_by_type: dict[str, int] = Field(
        examples=[{"raw_data_file": 1400, "raw_data_package": 100}]
    )
    capacity_bytes: int | None = Field(None, examples=[200_000_000_000_000])


class SiteSummary(BaseModel):
    """One site's locations."""

    site: str = Field(description="Site short name.", examples=["ccat"])
    name: str = Field(examples=["CCAT"])
    present_copies: int = Field(examples=[1500])
    present_bytes: int = Field(examples=[78_643_200_000])
    locations: list[LocationSummary]


class PipelineSummary(BaseModel):
    """How much is where in the pipeline, per site, and what has waited longest."""

    generated_at: dt.datetime
    stages: PipelineStages
    sites: list[SiteSummary]
