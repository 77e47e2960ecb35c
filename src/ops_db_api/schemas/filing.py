"""Schemas for filing: executed obs units and raw data files."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

from ccat_ops_db.enums import ChecksumAlgorithm, ExecutionStatus

from .common import ORMModel, RelativePath, checksum_validator

EXAMPLE_EOU = "3f1c2a9e-8d47-4d6b-9a51-0c2b7e5d1a10"
EXAMPLE_FILE = "a6d0c1f2-47b3-4f3e-8e1d-2b9c5e7f0a31"


class Strict(BaseModel):
    """Input model: unknown fields are errors (a typo never passes silently), and no text
    anywhere in it, nested dictionaries and lists included, may hold a NUL character (the
    database cannot store one: a site buffer would accept it and the main site refuse it for
    good)."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        where = _nul_in(value)
        if where is not None:
            raise ValueError(f"must not contain NUL characters{where}")
        return value


def _nul_in(value: Any, path: str = "") -> str | None:
    """Where in ``value`` a string holds a NUL ("" for the value itself, " (at a.b[2])" for a
    nested one), or None."""
    if isinstance(value, str):
        return (f" (at {path.lstrip('.')})" if path else "") if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _nul_in(str(key), f"{path}.{key!s}") or _nul_in(item, f"{path}.{key!s}")
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found = _nul_in(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


class ExecutedObsUnitStart(Strict):
    """Start of an observation, filed by the instrument with a UUID it generated itself."""

    id: uuid.UUID = Field(examples=[EXAMPLE_EOU])
    obs_unit_id: int | None = Field(None, ge=1, examples=[12])
    instrument_id: int | None = Field(None, ge=1, examples=[2])
    start_time: AwareDatetime = Field(examples=["2026-05-01T03:00:00Z"])
    mean_pwv_mm: float | None = Field(None, ge=0, le=100, allow_inf_nan=False)
    mean_elevation_deg: float | None = Field(None, ge=-90, le=90, allow_inf_nan=False)
    conditions: dict[str, Any] | None = Field(None, examples=[{"ambient_temp_c": -8.5}])
    comment: str | None = Field(None, max_length=4000)


class ExecutedObsUnitFinish(Strict):
    """End of an observation."""

    end_time: AwareDatetime = Field(examples=["2026-05-01T03:45:00Z"])
    status: Literal["completed", "failed", "aborted"] = "completed"
    mean_pwv_mm: float | None = Field(None, ge=0, le=100, allow_inf_nan=False)
    mean_elevation_deg: float | None = Field(None, ge=-90, le=90, allow_inf_nan=False)
    conditions: dict[str, Any] | None = None
    comment: str | None = Field(None, max_length=4000)


class ExecutedObsUnitOut(ORMModel):
    """An executed obs unit."""

    id: uuid.UUID
    obs_unit_id: int | None
    instrument_id: int | None
    start_time: dt.datetime
    end_time: dt.datetime | None
    status: ExecutionStatus
    mean_pwv_mm: float | None
    mean_elevation_deg: float | None
    conditions: dict[str, Any] | None
    comment: str | None
    created_at: dt.datetime
    created_by_token_id: int | None


class RawDataFileIn(Strict):
    """A raw data file written by an instrument module at its SOURCE location."""

    id: uuid.UUID = Field(examples=[EXAMPLE_FILE])
    relative_path: RelativePath
    name: str | None = Field(
        None, max_length=255, description="Defaults to the last component of relative_path."
    )
    size: int = Field(ge=0, le=2**63 - 1, examples=[52_428_800])
    # the algorithm first: the checksum is checked against it (errors then name `checksum`)
    checksum_algorithm: ChecksumAlgorithm = ChecksumAlgorithm.SHA256
    checksum: str = Field(min_length=8, max_length=128, examples=["9f86d081" * 8])
    instrument_module_id: int = Field(ge=1, le=2**31 - 1, examples=[5])
    executed_obs_unit_id: uuid.UUID = Field(examples=[EXAMPLE_EOU])
    source_location_id: int = Field(ge=1, le=2**31 - 1, examples=[2])
    file_type: str | None = Field(None, max_length=32, examples=["fits"])
    written_at: AwareDatetime | None = None
    extra: dict[str, Any] | None = None

    _checksum = checksum_validator()

    @field_validator("written_at")
    @classmethod
    def _in_utc(cls, value: dt.datetime | None) -> dt.datetime | None:
        """Stored and answered in UTC, like every other time of the API."""
        if value is None or not value.utcoffset():
            return value
        try:
            return value.astimezone(dt.UTC)
        except OverflowError:
            raise ValueError("is out of range once converted to UTC") from None

    @model_validator(mode="after")
    def _normalise(self) -> RawDataFileIn:
        if self.name is None:
            self.name = self.relative_path.replace("\\", "/").rsplit("/", 1)[-1]
        return self


class RawDataFileBulkIn(Strict):
    """Many files in one all-or-nothing request."""

    files: list[RawDataFileIn] = Field(min_length=1)


class FilingResult(BaseModel):
    """Outcome of a bulk filing: how many were new and how many were already filed as-is."""

    created: int
    unchanged: int
    ids: list[uuid.UUID] = Field(description="The ids of the request, in order.")


class RawDataFileOut(ORMModel):
    """A raw data file, with the package it is in and that package's state."""

    id: uuid.UUID
    name: str
    relative_path: str
    size: int
    checksum: str
    checksum_algorithm: ChecksumAlgorithm
    instrument_module_id: int
    executed_obs_unit_id: uuid.UUID
    source_location_id: int
    raw_data_package_id: int | None
    file_type: str | None
    written_at: dt.datetime | None
    extra: dict[str, Any] | None
    created_at: dt.datetime
    created_by_token_id: int | None
    state: str = Field(
        description="'unpackaged' until in a package, then the package's state.",
        examples=["unpackaged", "waiting", "archived"],
    )
