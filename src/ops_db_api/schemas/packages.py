"""Schemas of the raw data package routes (pipeline stage 1, and package lifecycle states)."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field

from ccat_ops_db.enums import (
    ChecksumAlgorithm,
    LocationType,
    PackageState,
    PhysicalCopyStatus,
    Status,
)

from .common import ORMModel, RelativePath, checksum_validator
from .filing import EXAMPLE_EOU, EXAMPLE_FILE, Strict

#: Most files one package may be created with (one request, one UPDATE).
MAX_PACKAGE_FILES = 10_000
#: Most file summaries ``GET /raw_data_packages/{id}`` returns.
MAX_FILE_SUMMARIES = 1000
EXAMPLE_PACKAGE = "chai_lfa_20260501T030000_0001.tar"


def _package_name(value: str) -> str:
    if any(c in value for c in "/\\\x00") or value in (".", ".."):
        raise ValueError("must be a plain file name (no '/', '\\', NUL, '.' or '..')")
    if value != value.strip():
        raise ValueError("must not start or end with white space")
    return value


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


PackageName = Annotated[
    str,
    Field(min_length=1, max_length=255, examples=[EXAMPLE_PACKAGE]),
    AfterValidator(_package_name),
]


# --- requests --------------------------------------------------------------------------------


class RawDataPackageCreate(Strict):
    """A package of raw data files already filed by one instrument module for one observation.

    The name is the package's natural key: creating it again with the same content answers 200.
    """

    name: PackageName
    executed_obs_unit_id: uuid.UUID = Field(examples=[EXAMPLE_EOU])
    instrument_module_id: int = Field(ge=1, le=2**31 - 1, examples=[5])
    origin_location_id: int = Field(
        ge=1, le=2**31 - 1, description="The SOURCE location the files are at.", examples=[2]
    )
    relative_path: RelativePath | None = Field(
        None,
        description="Path of the tar relative to a location's root; defaults to `name`.",
        examples=["2026/05/01/" + EXAMPLE_PACKAGE],
    )
    file_ids: list[uuid.UUID] = Field(
        min_length=1,
        max_length=MAX_PACKAGE_FILES,
        description="The files to pack: filed, unpackaged, of this observation, module and "
        "origin location. No duplicates.",
        examples=[[EXAMPLE_FILE]],
    )


class RawDataPackageFinalize(Strict):
    """The built tar: its size and checksum, and where it now is (SOURCE or BUFFER)."""

    size: int = Field(ge=0, le=2**63 - 1, examples=[52_428_800])
    # the algorithm first: the checksum is checked against it (errors then name `checksum`)
    checksum_algorithm: ChecksumAlgorithm = ChecksumAlgorithm.SHA256
    checksum: str = Field(min_length=8, max_length=128, examples=["9f86d081" * 8])
    location_id: int = Field(
        ge=1,
        le=2**31 - 1,
        description="A SOURCE or BUFFER location of the origin's site.",
        examples=[3],
    )
    relative_path: RelativePath = Field(examples=["2026/05/01/" + EXAMPLE_PACKAGE])

    _checksum = checksum_validator()


class RawDataPackageStateChange(Strict):
    """An operator sets a package's lifecycle state, saying why."""

    state: PackageState = Field(examples=["waiting"])
    reason: Annotated[str, AfterValidator(_no_nul)] = Field(
        min_length=1,
        max_length=1000,
        examples=["transfer link repaired, retrying"],
    )


# --- responses -------------------------------------------------------------------------------


class RawDataPackageOut(ORMModel):
    """A raw data package: ``status`` is building the tar, ``state`` its lifecycle."""

    id: int = Field(examples=[42])
    name: str = Field(examples=[EXAMPLE_PACKAGE])
    relative_path: str = Field(examples=["2026/05/01/" + EXAMPLE_PACKAGE])
    size: int | None = Field(None, description="Size of the tar, once built.", examples=[52428800])
    file_count: int = Field(examples=[120])
    checksum: str | None = Field(None, examples=["9f86d081" * 8])
    checksum_algorithm: ChecksumAlgorithm
    state: PackageState = Field(examples=["waiting"])
    status: Status = Field(examples=["pending"])
    executed_obs_unit_id: uuid.UUID = Field(examples=[EXAMPLE_EOU])
    instrument_module_id: int = Field(examples=[5])
    origin_location_id: int | None = Field(None, examples=[2])
    data_transfer_package_id: int | None = Field(None, examples=[None])
    retry_count: int = Field(examples=[0])
    failure_reason: str | None = Field(None, examples=[None])
    archived_at: dt.datetime | None = None
    created_by_token_id: int | None = None
    created_at: dt.datetime
    updated_at: dt.datetime


class PackageFileSummary(ORMModel):
    """One file of a package."""

    id: uuid.UUID = Field(examples=[EXAMPLE_FILE])
    name: str = Field(examples=["scan_00001.fits"])
    relative_path: str = Field(examples=["2026/05/01/scan_00001.fits"])
    size: int = Field(examples=[52_428_800])
    checksum: str = Field(examples=["9f86d081" * 8])
    checksum_algorithm: ChecksumAlgorithm


class RawDataPackageMetadataOut(ORMModel):
    """IVOA ObsCore-style description of a package (written by the archive manager)."""

    obs_collection: str | None = Field(None, examples=["CCAT/CHAI"])
    facility_name: str | None = Field(None, examples=["FYST"])
    instrument_name: str | None = Field(None, examples=["CHAI"])
    target_name: str | None = Field(None, examples=["Orion B"])
    dataproduct_type: str | None = Field(None, examples=["cube"])
    calib_level: int | None = Field(None, examples=[0])
    s_ra_deg: float | None = Field(None, examples=[85.4])
    s_dec_deg: float | None = Field(None, examples=[-1.9])
    t_min: dt.datetime | None = None
    t_max: dt.datetime | None = None
    em_min_m: float | None = Field(None, examples=[6.06e-4])
    em_max_m: float | None = Field(None, examples=[6.59e-4])
    description: str | None = None
    extra: dict[str, Any] | None = None


class RawDataPackageDetail(RawDataPackageOut):
    """A package with its first files (by path) and its IVOA metadata, if written yet."""

    files: list[PackageFileSummary] = Field(
        description="The first `file_limit` files by relative path; `file_count` has them all."
    )
    files_truncated: bool = Field(description="True when `files` does not list every file.")
    ivoa_metadata: RawDataPackageMetadataOut | None = None


class TransferPackageRef(BaseModel):
    """The data transfer package a raw package travels in."""

    id: int = Field(examples=[7])
    name: str = Field(examples=["ccat_buffer_20260501_0001.tar"])
    status: Status = Field(examples=["completed"])


class PackageTransferRef(BaseModel):
    """One site-to-site transfer of the package's transfer package."""

    id: int = Field(examples=[11])
    destination_location: str = Field(description="`site/location`", examples=["cologne/buffer"])
    status: Status = Field(examples=["failed"])
    unpack_status: Status = Field(examples=["pending"])
    retry_count: int = Field(examples=[3])
    failure_reason: str | None = Field(None, examples=["bbcp: connection reset by peer"])
    unpack_failure_reason: str | None = Field(None, examples=[None])


class PackageArchiveRef(BaseModel):
    """One long-term archive transfer of the package."""

    id: int = Field(examples=[17])
    destination_location: str = Field(description="`site/location`", examples=["cologne/lta"])
    status: Status = Field(examples=["completed"])
    retry_count: int = Field(examples=[0])
    failure_reason: str | None = Field(None, examples=[None])
    checksum_verified_at: dt.datetime | None = None


class RawDataPackageStatusOut(BaseModel):
    """Where a package is in the pipeline, with what went wrong if anything did."""

    id: int = Field(examples=[42])
    name: str = Field(examples=[EXAMPLE_PACKAGE])
    state: PackageState = Field(examples=["transferring"])
    status: Status = Field(examples=["completed"])
    retry_count: int = Field(examples=[0])
    failure_reason: str | None = Field(None, examples=[None])
    last_failure_at: dt.datetime | None = None
    next_attempt_at: dt.datetime | None = None
    archived_at: dt.datetime | None = None
    data_transfer_package: TransferPackageRef | None = None
    transfers: list[PackageTransferRef] = Field(
        description="Transfers of its data transfer package (one per destination)."
    )
    archive_transfers: list[PackageArchiveRef]


class PackageCopyOut(BaseModel):
    """One physical copy of a package at one location."""

    id: int = Field(examples=[901])
    location_id: int = Field(examples=[3])
    site: str = Field(description="Site short name.", examples=["ccat"])
    location: str = Field(description="Location name.", examples=["buffer"])
    location_type: LocationType = Field(examples=["buffer"])
    status: PhysicalCopyStatus = Field(examples=["present"])
    relative_path: str | None = Field(None, examples=["2026/05/01/" + EXAMPLE_PACKAGE])
    size: int | None = Field(None, examples=[52_428_800])
    checksum: str | None = Field(None, examples=["9f86d081" * 8])
    checksum_verified_at: dt.datetime | None = None
    deleted_at: dt.datetime | None = None
    created_at: dt.datetime
    updated_at: dt.datetime
