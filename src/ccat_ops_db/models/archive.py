"""Long-term archive transfers and staging jobs."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from sqlalchemy import (
    BigInteger,
    Column,
    ForeignKey,
    Index,
    String,
    Table,
    Text,
    UniqueConstraint,
    true,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from ..enums import Status
from .base import Base, BigId, RetryMixin, TimestampMixin, enum_column, utcnow

if TYPE_CHECKING:
    from .access import User
    from .location import DataLocation
    from .raw_data import RawDataPackage
    from .transfer import DataTransferLog


class LongTermArchiveTransfer(RetryMixin, TimestampMixin, Base):
    """Copying one raw data package from a BUFFER into a LONG_TERM_ARCHIVE (with sidecar)."""

    __tablename__ = "long_term_archive_transfer"
    __table_args__ = (
        UniqueConstraint("raw_data_package_id", "destination_location_id"),
        Index(None, "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    raw_data_package_id: Mapped[int] = mapped_column(
        ForeignKey("raw_data_package.id", ondelete="RESTRICT")
    )
    origin_location_id: Mapped[int] = mapped_column(
        ForeignKey("data_location.id", ondelete="RESTRICT"), index=True
    )
    destination_location_id: Mapped[int] = mapped_column(
        ForeignKey("data_location.id", ondelete="RESTRICT"), index=True
    )
    status: Mapped[Status] = mapped_column(enum_column(Status, "status"), default=Status.PENDING)
    # +1 on every claim by a worker, never reset: tells a run from a later run of this record.
    claim_count: Mapped[int] = mapped_column(default=0, server_default="0", nullable=False)
    object_key: Mapped[str | None] = mapped_column(String(1024))
    sidecar_key: Mapped[str | None] = mapped_column(String(1024))
    bytes_transferred: Mapped[int | None] = mapped_column(BigInteger)
    started_at: Mapped[dt.datetime | None] = mapped_column()
    finished_at: Mapped[dt.datetime | None] = mapped_column()
    checksum_verified_at: Mapped[dt.datetime | None] = mapped_column()

    raw_data_package: Mapped[RawDataPackage] = relationship()
    origin_location: Mapped[DataLocation] = relationship(foreign_keys=[origin_location_id])
    destination_location: Mapped[DataLocation] = relationship(
        foreign_keys=[destination_location_id]
    )
    logs: Mapped[list[DataTransferLog]] = relationship(
        back_populates="long_term_archive_transfer", passive_deletes=True
    )


staging_job_raw_data_package = Table(
    "staging_job_raw_data_package",
    Base.metadata,
    Column(
        "staging_job_id",
        ForeignKey("staging_job.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column(
        "raw_data_package_id",
        BigId,
        ForeignKey("raw_data_package.id", ondelete="RESTRICT"),
        primary_key=True,
        index=True,
    ),
)


class StagingJob(RetryMixin, TimestampMixin, Base):
    """A request to stage raw data packages from an archive into a PROCESSING location.

    Lifecycle: PENDING → SCHEDULED → IN_PROGRESS → COMPLETED (copies STAGED); ``released_at``
    set by the requester lets the deletion manager clean the staged copies up; ``expires_at``
    bounds how long they may stay without a release.
    """

    __tablename__ = "staging_job"
    __table_args__ = (Index(None, "status", "next_attempt_at"), Index(None, "active", "status"))

    id: Mapped[int] = mapped_column(primary_key=True)
    # The API token that created the row (the user is the token's owner).
    created_by_token_id: Mapped[int | None] = mapped_column(
        ForeignKey("api_token.id", ondelete="SET NULL")
    )
    name: Mapped[str | None] = mapped_column()
    description: Mapped[str | None] = mapped_column(Text)
    destination_location_id: Mapped[int] = mapped_column(
        ForeignKey("data_location.id", ondelete="RESTRICT"), index=True
    )
    # The archive chosen as the source (by the staging manager, or pinned by the request).
    origin_location_id: Mapped[int | None] = mapped_column(
        ForeignKey("data_location.id", ondelete="RESTRICT"), index=True
    )
    status: Mapped[Status] = mapped_column(enum_column(Status, "status"), default=Status.PENDING)
    # +1 on every claim by a worker, never reset: tells a run from a later run of this record.
    claim_count: Mapped[int] = mapped_column(default=0, server_default="0", nullable=False)
    # False once released: its staged copies are then eligible for deletion.
    active: Mapped[bool] = mapped_column(default=True, server_default=true())
    unpack: Mapped[bool] = mapped_column(default=True, server_default=true())
    requested_by_user_id: Mapped[int | None] = mapped_column(
        ForeignKey("user.id", ondelete="SET NULL"), index=True
    )
    requested_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column()
    finished_at: Mapped[dt.datetime | None] = mapped_column()
    released_at: Mapped[dt.datetime | None] = mapped_column()
    expires_at: Mapped[dt.datetime | None] = mapped_column()

    destination_location: Mapped[DataLocation] = relationship(
        foreign_keys=[destination_location_id]
    )
    origin_location: Mapped[DataLocation | None] = relationship(foreign_keys=[origin_location_id])
    requested_by: Mapped[User | None] = relationship()
    raw_data_packages: Mapped[list[RawDataPackage]] = relationship(
        secondary=staging_job_raw_data_package
    )
    logs: Mapped[list[DataTransferLog]] = relationship(
        back_populates="staging_job", passive_deletes=True
    )
