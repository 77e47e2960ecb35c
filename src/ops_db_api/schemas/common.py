"""Shared schema pieces: pages, ORM reading, validated paths and checksums."""

from __future__ import annotations

import re
from typing import Annotated, Any, Generic, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

T = TypeVar("T")


class ORMModel(BaseModel):
    """A response model read from ORM attributes."""

    model_config = ConfigDict(from_attributes=True)


class Page(BaseModel, Generic[T]):
    """One page of a list. Pass ``next_cursor`` as ``cursor`` to get the next page."""

    items: list[T]
    next_cursor: str | None = Field(None, description="None on the last page.")
    limit: int


_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")
_HEX = re.compile(r"[0-9a-f]+")


def _relative_path(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    if value.startswith("/") or _DRIVE.match(value):
        raise ValueError("must be relative to the location's root (no leading '/')")
    parts = value.replace("\\", "/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError("must not contain empty, '.' or '..' components")
    return value


RelativePath = Annotated[
    str,
    Field(min_length=1, max_length=1024, examples=["2026/05/01/chai_lfa_0001.fits"]),
    AfterValidator(_relative_path),
]

CHECKSUM_LENGTHS = {"sha256": 64, "blake2b": 128, "md5": 32, "adler32": 8, "xxh3_128": 32}


def checksum_validator() -> Any:
    """A validator of a model's ``checksum`` field against its ``checksum_algorithm`` (which
    the model declares first), so that errors name the ``checksum`` field."""

    def check(value: str, info: ValidationInfo) -> str:
        algorithm = info.data.get("checksum_algorithm")
        if algorithm is None:  # the algorithm itself is invalid: that error says so
            return value
        return check_checksum(getattr(algorithm, "value", str(algorithm)), value)

    return field_validator("checksum")(check)


def check_checksum(algorithm: str, checksum: str) -> str:
    """Lower-case hex of the right length for ``algorithm``, or ValueError."""
    value = checksum.lower()
    expected = CHECKSUM_LENGTHS.get(algorithm)
    if not _HEX.fullmatch(value):
        raise ValueError("checksum must be hexadecimal")
    if expected and len(value) != expected:
        raise ValueError(f"a {algorithm} checksum has {expected} hex digits, got {len(value)}")
    return value
