"""Transfer operations between sites, and their log entries."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Select,
    String,
    Text,
    UniqueConstraint,
    false,
    select,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from ..enums import Status, TransferMethod
from .base import Base, BigId, RetryMixin, TimestampMixin, enum_column, utcnow

if TYPE_CHECKING:
    from .archive import LongTermArchiveTransfer, StagingJob
    from .location import DataLocation, DataTransferRoute
    from .transfer_package import DataTransferPackage


class DataTransfer(RetryMixin, TimestampMixin, Base):
    """Moving one data transfer package from an origin BUFFER to a destination BUFFER.

    Transfer and unpack have their own status, retry count and failure reason, so an unpack
    failure is told apart from a transfer failure and unpacking is retried without moving the
    bytes again. ``retry_count``/``failure_reason`` (from :class:`RetryMixin`) are the
    transfer's; ``unpack_*`` are the unpack's.
    """

    __tablename__ = "data_transfer"
    __table_args__ = (
        UniqueConstraint("data_transfer_package_id", "destination_location_id"),
        CheckConstraint("origin_location_id <> destination_location_id", name="distinct_ends"),
        Index(None, "status", "next_attempt_at"),
        Index(None, "unpack_status", "status"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    data_transfer_package_id: Mapped[int] = mapped_column(
        ForeignKey("data_transfer_package.id", ondelete="RESTRICT")
    )
    route_id: Mapped[int | None] = mapped_column(
        ForeignKey("data_transfer_route.id", ondelete="SET NULL"), index=True
    )
    origin_location_id: Mapped[int] = mapped_column(
        ForeignKey("data_location.id", ondelete="RESTRICT"), index=True
    )
    destination_location_id: Mapped[int] = mapped_column(
        ForeignKey("data_location.id", ondelete="RESTRICT"), index=True
    )
    method: Mapped[TransferMethod] = mapped_column(enum_column(TransferMethod, "method"))
    # Secondary transfers replicate from one archive site to another.
    is_secondary: Mapped[bool] = mapped_column(default=False, server_default=false())
    status: Mapped[Status] = mapped_column(enum_column(Status, "status"), default=Status.PENDING)
    # +1 on every claim by a worker, never reset: tells a run from a later run of this record.
    claim_count: Mapped[int] = mapped_column(default=0, server_default="0", nullable=False)
    unpack_status: Mapped[Status] = mapped_column(
        enum_column(Status, "unpack_status"), default=Status.PENDING
    )
    unpack_retry_count: Mapped[int] = mapped_column(default=0, server_default="0")
    # +1 on every unpack claim by a worker, never reset: tells one unpack run from a later one.
    unpack_claim_count: Mapped[int] = mapped_column(default=0, server_default="0", nullable=False)
    unpack_failure_reason: Mapped[str | None] = mapped_column(String(2000))
    started_at: Mapped[dt.datetime | None] = mapped_column()
    finished_at: Mapped[dt.datetime | None] = mapped_column()
    unpacked_at: Mapped[dt.datetime | None] = mapped_column()
    bytes_transferred: Mapped[int | None] = mapped_column(BigInteger)
    rate_bytes_per_s: Mapped[float | None] = mapped_column(Float)

    data_transfer_package: Mapped[DataTransferPackage] = relationship(back_populates="transfers")
    route: Mapped[DataTransferRoute | None] = relationship()
    origin_location: Mapped[DataLocation] = relationship(foreign_keys=[origin_location_id])
    destination_location: Mapped[DataLocation] = relationship(
        foreign_keys=[destination_location_id]
    )
    logs: Mapped[list[DataTransferLog]] = relationship(
        back_populates="data_transfer", passive_deletes=True, order_by="DataTransferLog.id"
    )


class DataTransferLog(Base):
    """A short log line about an operation, pointing at the full log file.

    The full command output never goes into the database: only ``log_path``. One of the
    operation keys is set (transfer, archive transfer or staging job).
    """

    __tablename__ = "data_transfer_log"
    __table_args__ = (
        CheckConstraint(
            "data_transfer_id IS NOT NULL OR long_term_archive_transfer_id IS NOT NULL"
            " OR staging_job_id IS NOT NULL",
            name="has_operation",
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    data_transfer_id: Mapped[int | None] = mapped_column(
        ForeignKey("data_transfer.id", ondelete="CASCADE"), index=True
    )
    long_term_archive_transfer_id: Mapped[int | None] = mapped_column(
        ForeignKey("long_term_archive_transfer.id", ondelete="CASCADE"), index=True
    )
    staging_job_id: Mapped[int | None] = mapped_column(
        ForeignKey("staging_job.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    level: Mapped[str] = mapped_column(String(16), default="info")
    message: Mapped[str] = mapped_column(String(1000))
    log_path: Mapped[str | None] = mapped_column(String(1024))

    data_transfer: Mapped[DataTransfer | None] = relationship(back_populates="logs")
    long_term_archive_transfer: Mapped[LongTermArchiveTransfer | None] = relationship(
        back_populates="logs"
    )
    staging_job: Mapped[StagingJob | None] = relationship(back_populates="logs")


class OperatorNotice(Base):
    """A problem that needs a person, from the pass that first saw it until it cleared.

    Written and sent by the notifications manager (``data_transfer.notify``): a record FAILED
    for good, a transfer package with no archive site left, a package copy that failed its
    check and could not be repaired, copies that could not be deleted at a location, a site
    whose oldest package is not archived after a while. ``subject`` names the problem within
    its ``kind`` (``data_transfer:42``, ``site:ccat``); at most one notice per subject is open
    (``cleared_at`` NULL) at a time, so a problem that comes back after it cleared is a new
    notice. ``delivered`` and ``cleared_delivered`` map each channel to when it was told
    (ISO time), so a channel that was down is told later and nobody is told twice.
    ``last_seen_at``: when a pass last changed its text, or at least hourly while it is open.
    """

    __tablename__ = "operator_notice"
    __table_args__ = (
        Index(
            "ix_operator_notice_open",
            "kind",
            "subject",
            unique=True,
            postgresql_where=text("cleared_at IS NULL"),
            sqlite_where=text("cleared_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    subject: Mapped[str] = mapped_column(String(255))
    site: Mapped[str | None] = mapped_column(String(64))
    summary: Mapped[str] = mapped_column(String(1000))
    detail: Mapped[str | None] = mapped_column(Text)
    first_seen_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    last_seen_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    cleared_at: Mapped[dt.datetime | None] = mapped_column(index=True)
    delivered: Mapped[dict[str, Any]] = mapped_column(default=dict)
    cleared_delivered: Mapped[dict[str, Any]] = mapped_column(default=dict)

    @classmethod
    def newest(cls, *, include_cleared: bool = False) -> Select[tuple[OperatorNotice]]:
        """The notices newest first: the open ones (``include_cleared``: every one)."""
        query = select(cls).order_by(cls.first_seen_at.desc(), cls.id.desc())
        return query if include_cleared else query.where(cls.cleared_at.is_(None))
