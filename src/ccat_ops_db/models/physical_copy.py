"""Physical copies: where each file or package physically exists, and in what state.

Single-table inheritance (decision): at tens of millions of rows the pipeline scans copies by
``(location, type, status)`` all the time, and one narrow table with one index serves that
better than a join per subtype. A CHECK constraint keeps exactly the subtype's key set, and a
unique key per (item, location) makes "one copy of an item per location" a database rule.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import TYPE_CHECKING

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Index,
    String,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from ..enums import CopyType, PhysicalCopyStatus
from .base import Base, BigId, RetryMixin, TimestampMixin, enum_column

if TYPE_CHECKING:
    from .location import DataLocation
    from .raw_data import RawDataFile, RawDataPackage
    from .transfer_package import DataTransferPackage

_ONE_ITEM = (
    "(copy_type = 'raw_data_file' AND raw_data_file_id IS NOT NULL"
    " AND raw_data_package_id IS NULL AND data_transfer_package_id IS NULL)"
    " OR (copy_type = 'raw_data_package' AND raw_data_package_id IS NOT NULL"
    " AND raw_data_file_id IS NULL AND data_transfer_package_id IS NULL)"
    " OR (copy_type = 'data_transfer_package' AND data_transfer_package_id IS NOT NULL"
    " AND raw_data_file_id IS NULL AND raw_data_package_id IS NULL)"
)


class PhysicalCopy(RetryMixin, TimestampMixin, Base):
    """One copy of a file or package at one data location."""

    __tablename__ = "physical_copy"
    __table_args__ = (
        CheckConstraint(_ONE_ITEM, name="exactly_one_item"),
        UniqueConstraint("raw_data_file_id", "data_location_id"),
        UniqueConstraint("raw_data_package_id", "data_location_id"),
        UniqueConstraint("data_transfer_package_id", "data_location_id"),
        Index(None, "data_location_id", "copy_type", "status"),
        # Copies that are not DELETED: a small slice of the table (deleted copies keep their
        # rows, so at scale almost every row is DELETED). Serves the deletion manager's and
        # the recovery sweeper's scans by status and location, and counting live copies.
        Index(
            "ix_physical_copy_live",
            "status",
            "data_location_id",
            postgresql_where=text("status <> 'deleted'"),
            sqlite_where=text("status <> 'deleted'"),
            # PostgreSQL: live copies and bytes per location from the index alone
            postgresql_include=["copy_type", "size", "updated_at"],
        ),
        # The fixity audit: present package copies by last verification (oldest first), and
        # those never verified (normally none: an empty index the planner trusts).
        Index(
            "ix_physical_copy_fixity",
            "checksum_verified_at",
            "id",
            postgresql_where=text("copy_type = 'raw_data_package' AND status = 'present'"),
            sqlite_where=text("copy_type = 'raw_data_package' AND status = 'present'"),
        ),
        Index(
            "ix_physical_copy_unverified",
            "id",
            postgresql_where=text(
                "copy_type = 'raw_data_package' AND status = 'present'"
                " AND checksum_verified_at IS NULL"
            ),
            sqlite_where=text(
                "copy_type = 'raw_data_package' AND status = 'present'"
                " AND checksum_verified_at IS NULL"
            ),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    copy_type: Mapped[CopyType] = mapped_column(enum_column(CopyType, "copy_type"))
    data_location_id: Mapped[int] = mapped_column(
        ForeignKey("data_location.id", ondelete="RESTRICT")
    )
    raw_data_file_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("raw_data_file.id", ondelete="CASCADE")
    )
    raw_data_package_id: Mapped[int | None] = mapped_column(
        ForeignKey("raw_data_package.id", ondelete="CASCADE")
    )
    data_transfer_package_id: Mapped[int | None] = mapped_column(
        ForeignKey("data_transfer_package.id", ondelete="CASCADE")
    )
    status: Mapped[PhysicalCopyStatus] = mapped_column(
        enum_column(PhysicalCopyStatus, "status"), default=PhysicalCopyStatus.PRESENT
    )
    # Path (or object key) at this location when it differs from the item's relative path.
    relative_path: Mapped[str | None] = mapped_column(String(1024))
    size: Mapped[int | None] = mapped_column(BigInteger)
    # Checksum measured at this location, and when it was last found to match the record.
    checksum: Mapped[str | None] = mapped_column(String(128))
    checksum_verified_at: Mapped[dt.datetime | None] = mapped_column()
    deleted_at: Mapped[dt.datetime | None] = mapped_column()

    data_location: Mapped[DataLocation] = relationship()

    __mapper_args__ = {"polymorphic_on": "copy_type"}

    @property
    def is_verified(self) -> bool:
        """True when the copy is present and its checksum was verified at this location."""
        return (
            self.status in (PhysicalCopyStatus.PRESENT, PhysicalCopyStatus.STAGED)
            and self.checksum_verified_at is not None
        )


class RawDataFilePhysicalCopy(PhysicalCopy):
    """A copy of one raw data file (at a SOURCE, or unpacked in a BUFFER/PROCESSING)."""

    raw_data_file: Mapped[RawDataFile] = relationship(back_populates="physical_copies")

    __mapper_args__ = {"polymorphic_identity": CopyType.RAW_DATA_FILE}


class RawDataPackagePhysicalCopy(PhysicalCopy):
    """A copy of a raw data package tar (BUFFER, LONG_TERM_ARCHIVE, PROCESSING)."""

    raw_data_package: Mapped[RawDataPackage] = relationship(back_populates="physical_copies")

    __mapper_args__ = {"polymorphic_identity": CopyType.RAW_DATA_PACKAGE}


class DataTransferPackagePhysicalCopy(PhysicalCopy):
    """A copy of a data transfer package tar (origin and destination BUFFERs)."""

    data_transfer_package: Mapped[DataTransferPackage] = relationship(
        back_populates="physical_copies"
    )

    __mapper_args__ = {"polymorphic_identity": CopyType.DATA_TRANSFER_PACKAGE}
