"""Raw data: files as the instruments write them, and the tar packages they are bundled into."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from ..enums import ChecksumAlgorithm, PackageState, Status
from .base import Base, BigId, RetryMixin, TimestampMixin, enum_column, new_uuid

if TYPE_CHECKING:
    from .execution import ExecutedObsUnit
    from .location import DataLocation
    from .observatory import InstrumentModule
    from .physical_copy import RawDataFilePhysicalCopy, RawDataPackagePhysicalCopy
    from .transfer_package import DataTransferPackage


class RawDataFile(TimestampMixin, Base):
    """One file written by an instrument module.

    The key is a UUID made by the instrument, so files can be filed while the telescope is
    offline. ``relative_path`` is relative to the root of ``source_location``; the same path
    is kept inside the package tar and at every later location.
    """

    __tablename__ = "raw_data_file"
    __table_args__ = (
        UniqueConstraint("source_location_id", "relative_path"),
        CheckConstraint("size >= 0", name="size_non_negative"),
        CheckConstraint("relative_path NOT LIKE '/%'", name="relative_path_relative"),
        # Stage 1 scan: files not yet in a package, grouped by (execution, module).
        Index(
            "ix_raw_data_file_unpackaged",
            "executed_obs_unit_id",
            "instrument_module_id",
            postgresql_where=text("raw_data_package_id IS NULL"),
            sqlite_where=text("raw_data_package_id IS NULL"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_uuid)
    # The API token that created the row (the user is the token's owner).
    created_by_token_id: Mapped[int | None] = mapped_column(
        ForeignKey("api_token.id", ondelete="SET NULL")
    )
    name: Mapped[str] = mapped_column()
    relative_path: Mapped[str] = mapped_column(String(1024))
    size: Mapped[int] = mapped_column(BigInteger)
    checksum: Mapped[str] = mapped_column(String(128))
    checksum_algorithm: Mapped[ChecksumAlgorithm] = mapped_column(
        enum_column(ChecksumAlgorithm, "checksum_algorithm"), default=ChecksumAlgorithm.SHA256
    )
    file_type: Mapped[str | None] = mapped_column(String(32))
    instrument_module_id: Mapped[int] = mapped_column(
        ForeignKey("instrument_module.id", ondelete="RESTRICT"), index=True
    )
    executed_obs_unit_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("executed_obs_unit.id", ondelete="RESTRICT"), index=True
    )
    source_location_id: Mapped[int] = mapped_column(
        ForeignKey("data_location.id", ondelete="RESTRICT")
    )
    raw_data_package_id: Mapped[int | None] = mapped_column(
        ForeignKey("raw_data_package.id", ondelete="RESTRICT"), index=True
    )
    # When the instrument wrote the file (filing time is created_at).
    written_at: Mapped[dt.datetime | None] = mapped_column()
    extra: Mapped[dict[str, Any] | None] = mapped_column()

    instrument_module: Mapped[InstrumentModule] = relationship()
    executed_obs_unit: Mapped[ExecutedObsUnit] = relationship(back_populates="raw_data_files")
    source_location: Mapped[DataLocation] = relationship()
    raw_data_package: Mapped[RawDataPackage | None] = relationship(back_populates="files")
    physical_copies: Mapped[list[RawDataFilePhysicalCopy]] = relationship(
        back_populates="raw_data_file", passive_deletes=True
    )


Index(None, RawDataFile.created_at)


class RawDataPackage(RetryMixin, TimestampMixin, Base):
    """A tar of the raw files of one (executed obs unit, instrument module), ≤ ~50 GB.

    ``status`` tracks building the tar (an operation); ``state`` is the package's lifecycle
    (waiting → transferring → archived, or failed).
    """

    __tablename__ = "raw_data_package"
    __table_args__ = (
        CheckConstraint("size IS NULL OR size >= 0", name="size_non_negative"),
        Index(None, "state", "data_transfer_package_id"),
        Index(None, "status", "next_attempt_at"),
        Index(None, "executed_obs_unit_id", "instrument_module_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    # The API token that created the row (the user is the token's owner).
    created_by_token_id: Mapped[int | None] = mapped_column(
        ForeignKey("api_token.id", ondelete="SET NULL")
    )
    name: Mapped[str] = mapped_column(String(255), unique=True)
    relative_path: Mapped[str] = mapped_column(String(1024))
    size: Mapped[int | None] = mapped_column(BigInteger)
    file_count: Mapped[int] = mapped_column(default=0, server_default="0")
    checksum: Mapped[str | None] = mapped_column(String(128))
    checksum_algorithm: Mapped[ChecksumAlgorithm] = mapped_column(
        enum_column(ChecksumAlgorithm, "checksum_algorithm"), default=ChecksumAlgorithm.SHA256
    )
    state: Mapped[PackageState] = mapped_column(
        enum_column(PackageState, "state"), default=PackageState.WAITING
    )
    status: Mapped[Status] = mapped_column(enum_column(Status, "status"), default=Status.PENDING)
    # +1 on every claim by a worker, never reset: tells a run from a later run of this record.
    claim_count: Mapped[int] = mapped_column(default=0, server_default="0", nullable=False)
    executed_obs_unit_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("executed_obs_unit.id", ondelete="RESTRICT")
    )
    instrument_module_id: Mapped[int] = mapped_column(
        ForeignKey("instrument_module.id", ondelete="RESTRICT"), index=True
    )
    # The SOURCE location whose files it packs (where the tar is built).
    origin_location_id: Mapped[int | None] = mapped_column(
        ForeignKey("data_location.id", ondelete="RESTRICT"), index=True
    )
    data_transfer_package_id: Mapped[int | None] = mapped_column(
        ForeignKey("data_transfer_package.id", ondelete="RESTRICT"), index=True
    )
    package_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata")
    archived_at: Mapped[dt.datetime | None] = mapped_column()

    executed_obs_unit: Mapped[ExecutedObsUnit] = relationship(back_populates="raw_data_packages")
    instrument_module: Mapped[InstrumentModule] = relationship()
    origin_location: Mapped[DataLocation | None] = relationship()
    data_transfer_package: Mapped[DataTransferPackage | None] = relationship(
        back_populates="raw_data_packages"
    )
    files: Mapped[list[RawDataFile]] = relationship(back_populates="raw_data_package")
    ivoa_metadata: Mapped[RawDataPackageMetadata | None] = relationship(
        back_populates="raw_data_package", cascade="all, delete-orphan", passive_deletes=True
    )
    physical_copies: Mapped[list[RawDataPackagePhysicalCopy]] = relationship(
        back_populates="raw_data_package", passive_deletes=True
    )


class RawDataPackageMetadata(TimestampMixin, Base):
    """IVOA ObsCore-style description of a raw data package (one per package).

    Kept apart from :class:`RawDataPackage` so the hot table stays narrow; the archive manager
    writes it out as the package's metadata sidecar.
    """

    __tablename__ = "raw_data_package_metadata"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    raw_data_package_id: Mapped[int] = mapped_column(
        ForeignKey("raw_data_package.id", ondelete="CASCADE"), unique=True
    )
    obs_collection: Mapped[str | None] = mapped_column(String(128))
    facility_name: Mapped[str | None] = mapped_column(String(128))
    instrument_name: Mapped[str | None] = mapped_column(String(128))
    target_name: Mapped[str | None] = mapped_column(String(128))
    dataproduct_type: Mapped[str | None] = mapped_column(String(32))
    calib_level: Mapped[int | None] = mapped_column()
    s_ra_deg: Mapped[float | None] = mapped_column(Float)
    s_dec_deg: Mapped[float | None] = mapped_column(Float)
    t_min: Mapped[dt.datetime | None] = mapped_column()
    t_max: Mapped[dt.datetime | None] = mapped_column()
    em_min_m: Mapped[float | None] = mapped_column(Float)
    em_max_m: Mapped[float | None] = mapped_column(Float)
    description: Mapped[str | None] = mapped_column(Text)
    extra: Mapped[dict[str, Any] | None] = mapped_column()

    raw_data_package: Mapped[RawDataPackage] = relationship(back_populates="ivoa_metadata")
