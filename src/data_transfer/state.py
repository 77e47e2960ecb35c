"""Record state transitions shared by every stage: claim, succeed, fail with bounded retries.

Every operation record (raw data package, transfer package, transfer, unpack, archive transfer,
staging job) moves ``PENDING → SCHEDULED → IN_PROGRESS → COMPLETED | FAILED``. Managers set
SCHEDULED (and commit) before they submit the task; a task *claims* its record with one
conditional UPDATE (SCHEDULED → IN_PROGRESS), so a duplicate delivery of the same task finds
nothing to claim and does nothing. A failure stores ``"<ExceptionClass>: message (log: path)"``,
counts the attempt and either puts the record back to PENDING with an exponential back-off
(``next_attempt_at``) or, past ``max_retries`` or for a non-retryable error, marks it FAILED.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from ccat_ops_db.enums import Status
from ccat_ops_db.models import (
    DataTransfer,
    DataTransferPackage,
    LongTermArchiveTransfer,
    RawDataPackage,
    StagingJob,
)

from .errors import TransferSystemError
from .movers.space import is_out_of_space
from .settings import TransferSettings


def utcnow() -> dt.datetime:
    """Timezone-aware now (UTC)."""
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Kind:
    """How one kind of operation record keeps its status and retry bookkeeping."""

    name: str
    model: Any
    status: str = "status"
    retry_count: str = "retry_count"
    failure_reason: str = "failure_reason"
    next_attempt_at: str | None = "next_attempt_at"
    started_at: str | None = None
    finished_at: str | None = None
    claim_count: str = "claim_count"


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("raw_data_package", RawDataPackage),
        Kind("data_transfer_package", DataTransferPackage),
        Kind("data_transfer", DataTransfer, started_at="started_at", finished_at="finished_at"),
        Kind(
            "unpack",
            DataTransfer,
            status="unpack_status",
            retry_count="unpack_retry_count",
            failure_reason="unpack_failure_reason",
            next_attempt_at=None,
            finished_at="unpacked_at",
            claim_count="unpack_claim_count",
        ),
        Kind(
            "long_term_archive_transfer",
            LongTermArchiveTransfer,
            started_at="started_at",
            finished_at="finished_at",
        ),
        Kind("staging_job", StagingJob, started_at="started_at", finished_at="finished_at"),
    )
}


#: Failure classes of a transfer that a partition (a route cut off) produces: such a FAILED
#: transfer is revived by the recovery manager after ``partition_retry_s``.
PARTITION_REASONS = ("NetworkError:", "BBCPError:", "StorageError:")


@dataclass(frozen=True)
class Claim:
    """One run of a record: the record's claim counter after this run's claim. Every claim
    adds one and nothing resets it (unlike ``retry_count``, which an operator's retry or a
    revival after a partition sets back to 0), so a record that shows another count has been
    claimed again since - its late result must not overwrite the new run's state."""

    count: int

    def holds(self, record: Any, kind: str) -> bool:
        """True if ``record`` is still in the run this claim started: IN_PROGRESS (not reset
        by the recovery sweeper, nor cancelled) and not claimed again since."""
        k = KINDS[kind]
        return (
            getattr(record, k.status) == Status.IN_PROGRESS
            and (getattr(record, k.claim_count) or 0) == self.count
        )


def claim(session: Session, kind: str, record_id: Any) -> Claim | None:
    """SCHEDULED → IN_PROGRESS in one conditional UPDATE that also counts the claim; None if
    someone else has it."""
    k = KINDS[kind]
    col = getattr(k.model, k.status)
    counter = getattr(k.model, k.claim_count)
    values: dict[str, Any] = {k.status: Status.IN_PROGRESS, k.claim_count: counter + 1}
    if k.started_at:
        values[k.started_at] = utcnow()
    count = session.scalar(
        update(k.model)
        .where(k.model.id == record_id, col == Status.SCHEDULED)
        .values(**values)
        .returning(counter)
        .execution_options(synchronize_session=False)
    )
    return None if count is None else Claim(int(count))


def schedule(session: Session, kind: str, record_id: Any) -> bool:
    """PENDING → SCHEDULED (the manager commits, then submits the task)."""
    k = KINDS[kind]
    col = getattr(k.model, k.status)
    result = session.execute(
        update(k.model)
        .where(k.model.id == record_id, col == Status.PENDING)
        .values({k.status: Status.SCHEDULED})
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)


def complete(record: Any, kind: str) -> None:
    """Mark a loaded record COMPLETED and clear its failure reason."""
    k = KINDS[kind]
    setattr(record, k.status, Status.COMPLETED)
    setattr(record, k.failure_reason, None)
    if k.finished_at:
        setattr(record, k.finished_at, utcnow())


def describe_error(exc: BaseException, log_path: str | None = None) -> str:
    """``"<ExceptionClass>: message (log: path)"``, bounded to fit the column."""
    text = f"{type(exc).__name__}: {exc}"
    if log_path:
        text += f" (log: {log_path})"
    return text[:1990]


def next_attempt_column(record: Any, k: Kind) -> str | None:
    """The column that holds when ``record`` may be tried again, if any.

    The unpack kind has none of its own: it borrows its transfer's ``next_attempt_at``, which
    is free while the transfer is COMPLETED. Once the transfer is PENDING again (a bad copy
    dropped, to be fetched again) the column is the transfer's, and the re-fetch is due now.
    """
    if k.next_attempt_at is not None:
        return k.next_attempt_at
    if hasattr(record, "next_attempt_at") and getattr(record, "status", None) == Status.COMPLETED:
        return "next_attempt_at"
    return None


def _set_next_attempt(record: Any, k: Kind, when: dt.datetime) -> None:
    column = next_attempt_column(record, k)
    if column:
        setattr(record, column, when)


def backoff_s(settings: TransferSettings, attempt: int) -> float:
    """Exponential back-off before attempt ``attempt + 1`` (bounded)."""
    return min(settings.retry_backoff_s * (2 ** max(attempt - 1, 0)), settings.retry_backoff_max_s)


def record_failure(
    session: Session,
    record: Any,
    kind: str,
    exc: BaseException,
    settings: TransferSettings,
    *,
    log_path: str | None = None,
) -> bool:
    """Count a failed attempt; PENDING with back-off if retries remain, else FAILED.

    Returns True when the record failed permanently.
    """
    k = KINDS[kind]
    retryable = getattr(exc, "retryable", True) if isinstance(exc, TransferSystemError) else True
    if retryable and (is_out_of_space(exc) or getattr(exc, "counts_as_attempt", True) is False):
        # A full BUFFER (or a copy being deleted) is a condition to wait out, not a failed
        # attempt: PENDING again, the reason says what it waits for, no retry used up.
        setattr(record, k.failure_reason, describe_error(exc, log_path))
        setattr(record, k.status, Status.PENDING)
        wait = getattr(exc, "retry_after_s", settings.buffer_full_recheck_s)
        _set_next_attempt(record, k, utcnow() + dt.timedelta(seconds=wait))
        return False
    count = (getattr(record, k.retry_count) or 0) + 1
    setattr(record, k.retry_count, count)
    setattr(record, k.failure_reason, describe_error(exc, log_path))
    if hasattr(record, "last_failure_at"):
        record.last_failure_at = utcnow()
    permanent = (not retryable) or count > settings.max_retries
    if permanent:
        setattr(record, k.status, Status.FAILED)
    else:
        setattr(record, k.status, Status.PENDING)
        # (unpack too: before, it had no back-off and a minute's hiccup used up every retry)
        _set_next_attempt(record, k, utcnow() + dt.timedelta(seconds=backoff_s(settings, count)))
    return permanent
