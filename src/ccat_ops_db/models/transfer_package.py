"""Data transfer packages: many raw data packages bundled for one long-haul transfer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from ..enums import ChecksumAlgorithm, Status
from .base import Base, BigId, RetryMixin, TimestampMixin, enum_column

if TYPE_CHECKING:
    from .location import DataLocation
    from .physical_copy import DataTransferPackagePhysicalCopy
    from .raw_data import RawDataPackage
    from .transfer import DataTransfer


class DataTransferPackage(RetryMixin, TimestampMixin, Base):
    """A tar of raw data packages built in a BUFFER; one package, many transfers
    (one per destination)."""

    __tablename__ = "data_transfer_package"
    __table_args__ = (
        CheckConstraint("size IS NULL OR size >= 0", name="size_non_negative"),
        Index(None, "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    relative_path: Mapped[str] = mapped_column(String(1024))
    size: Mapped[int | None] = mapped_column(BigInteger)
    checksum: Mapped[str | None] = mapped_column(String(128))
    checksum_algorithm: Mapped[ChecksumAlgorithm] = mapped_column(
        enum_column(ChecksumAlgorithm, "checksum_algorithm"), default=ChecksumAlgorithm.SHA256
    )
    status: Mapped[Status] = mapped_column(enum_column(Status, "status"), default=Status.PENDING)
    # +1 on every claim by a worker, never reset: tells a run from a later run of this record.
    claim_count: Mapped[int] = mapped_column(default=0, server_default="0", nullable=False)
    # The BUFFER where it is assembled.
    origin_location_id: Mapped[int] = mapped_column(
        ForeignKey("data_location.id", ondelete="RESTRICT"), index=True
    )

    origin_location: Mapped[DataLocation] = relationship()
    raw_data_packages: Mapped[list[RawDataPackage]] = relationship(
        back_populates="data_transfer_package"
    )
    transfers: Mapped[list[DataTransfer]] = relationship(back_populates="data_transfer_package")
    physical_copies: Mapped[list[DataTransferPackagePhysicalCopy]] = relationship(
        back_populates="data_transfer_package", passive_deletes=True
    )
