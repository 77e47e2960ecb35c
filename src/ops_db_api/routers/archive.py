"""Long-term archive transfers (pipeline stage 5): follow them, read their logs, retry failures.

The archive manager creates and runs the transfers; the API only reads them and lets an
operator put a FAILED transfer back to PENDING, so the manager schedules it again.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from ccat_ops_db.enums import Status
from ccat_ops_db.models import (
    DataLocation,
    DataTransferLog,
    LongTermArchiveTransfer,
    Site,
)

from ..deps import DB, Operator, Paging, Reader, audit, paginate
from ..errors import ERROR_RESPONSES, ErrorBody, conflict, not_found
from ..schemas.archive import LogLineOut, LongTermArchiveTransferOut
from ..schemas.common import Page

router = APIRouter(prefix="/long_term_archive_transfers", tags=["long-term archive"])

TransferId = Annotated[int, Path(ge=1, le=2**63 - 1, description="Archive transfer id.")]
NOT_FOUND = {404: {"model": ErrorBody, "description": "No archive transfer with this id"}}


def location_label(loc: DataLocation | None) -> str | None:
    """``site/location`` of a data location (None for None)."""
    return None if loc is None else f"{loc.site.short_name}/{loc.name}"


def _loaded() -> list[Any]:
    return [
        selectinload(LongTermArchiveTransfer.raw_data_package),
        selectinload(LongTermArchiveTransfer.origin_location).selectinload(DataLocation.site),
        selectinload(LongTermArchiveTransfer.destination_location).selectinload(DataLocation.site),
    ]


def to_out(t: LongTermArchiveTransfer) -> LongTermArchiveTransferOut:
    """Response model of an archive transfer, with its locations as ``site/location``."""
    return LongTermArchiveTransferOut(
        id=t.id,
        raw_data_package_id=t.raw_data_package_id,
        raw_data_package_name=t.raw_data_package.name,
        raw_data_package_state=t.raw_data_package.state,
        origin_location_id=t.origin_location_id,
        origin_location=location_label(t.origin_location) or "",
        destination_location_id=t.destination_location_id,
        destination_location=location_label(t.destination_location) or "",
        status=t.status,
        retry_count=t.retry_count,
        failure_reason=t.failure_reason,
        last_failure_at=t.last_failure_at,
        next_attempt_at=t.next_attempt_at,
        object_key=t.object_key,
        sidecar_key=t.sidecar_key,
        bytes_transferred=t.bytes_transferred,
        started_at=t.started_at,
        finished_at=t.finished_at,
        checksum_verified_at=t.checksum_verified_at,
        created_at=t.created_at,
        updated_at=t.updated_at,
    )


def _get(db: DB, transfer_id: int) -> LongTermArchiveTransfer:
    t = db.scalar(
        select(LongTermArchiveTransfer)
        .options(*_loaded())
        .where(LongTermArchiveTransfer.id == transfer_id)
    )
    if t is None:
        raise not_found("long-term archive transfer", transfer_id)
    return t


@router.get("", response_model=Page[LongTermArchiveTransferOut], responses=ERROR_RESPONSES)
def list_all(
    db: DB,
    _: Reader,
    page: Paging,
    status: Status | None = None,
    raw_data_package_id: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
    destination_location_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    site: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=32,
            pattern=r"^[^\x00]*$",
            description="Short name of the destination site.",
            examples=["cologne"],
        ),
    ] = None,
    failed: Annotated[
        bool | None,
        Query(description="true: only FAILED transfers; false: only the others."),
    ] = None,
) -> Page[LongTermArchiveTransferOut]:
    """Archive transfers in creation (id) order, filtered."""
    q = select(LongTermArchiveTransfer).options(*_loaded())
    if status is not None:
        q = q.where(LongTermArchiveTransfer.status == status)
    if raw_data_package_id is not None:
        q = q.where(LongTermArchiveTransfer.raw_data_package_id == raw_data_package_id)
    if destination_location_id is not None:
        q = q.where(LongTermArchiveTransfer.destination_location_id == destination_location_id)
    if site is not None:
        q = q.where(
            LongTermArchiveTransfer.destination_location_id.in_(
                select(DataLocation.id).join(Site).where(Site.short_name == site)
            )
        )
    if failed is True:
        q = q.where(LongTermArchiveTransfer.status == Status.FAILED)
    elif failed is False:
        q = q.where(LongTermArchiveTransfer.status != Status.FAILED)
    rows, nxt = paginate(db, q, [LongTermArchiveTransfer.id], page)
    return Page(items=[to_out(r) for r in rows], next_cursor=nxt, limit=page.limit)


@router.get(
    "/{transfer_id}",
    response_model=LongTermArchiveTransferOut,
    responses={**ERROR_RESPONSES, **NOT_FOUND},
)
def get_one(transfer_id: TransferId, db: DB, _: Reader) -> LongTermArchiveTransferOut:
    """One archive transfer: status, retries, failure reason, object and sidecar keys."""
    return to_out(_get(db, transfer_id))


@router.get(
    "/{transfer_id}/logs",
    response_model=Page[LogLineOut],
    responses={**ERROR_RESPONSES, **NOT_FOUND},
)
def logs(transfer_id: TransferId, db: DB, _: Reader, page: Paging) -> Page[LogLineOut]:
    """The log lines of an archive transfer, oldest first."""
    if db.get(LongTermArchiveTransfer, transfer_id) is None:
        raise not_found("long-term archive transfer", transfer_id)
    q = select(DataTransferLog).where(DataTransferLog.long_term_archive_transfer_id == transfer_id)
    rows, nxt = paginate(db, q, [DataTransferLog.id], page)
    return Page(
        items=[LogLineOut.model_validate(r) for r in rows], next_cursor=nxt, limit=page.limit
    )


@router.post(
    "/{transfer_id}/retry",
    response_model=LongTermArchiveTransferOut,
    summary="Retry a failed archive transfer",
    responses={
        **ERROR_RESPONSES,
        **NOT_FOUND,
        409: {"model": ErrorBody, "description": "The transfer is not FAILED"},
    },
)
def retry(
    transfer_id: TransferId, request: Request, db: DB, who: Operator
) -> LongTermArchiveTransferOut:
    """Put a FAILED transfer back to PENDING so the archive manager schedules it again.

    The retry budget starts over (``retry_count`` 0) and the failure reason moves into a log
    line; ``last_failure_at`` is kept. Any other status answers 409 saying why.
    """
    t = db.get(LongTermArchiveTransfer, transfer_id, with_for_update=True)
    if t is None:
        raise not_found("long-term archive transfer", transfer_id)
    if t.status != Status.FAILED:
        why = {
            Status.COMPLETED: "it completed",
            Status.PENDING: "it is already pending (waiting for the archive manager)",
            Status.SCHEDULED: "it is scheduled (a task was submitted for it)",
            Status.IN_PROGRESS: "it is in progress",
        }.get(t.status, f"it is {t.status}")
        raise conflict(
            f"long-term archive transfer {transfer_id} is {t.status}, not failed: "
            f"only a failed transfer can be retried, and {why}",
            [{"loc": ["status"], "msg": f"is {t.status}", "type": "conflict"}],
        )
    previous = t.failure_reason or "no reason recorded"
    t.status = Status.PENDING
    t.retry_count = 0
    t.failure_reason = None
    t.next_attempt_at = None
    db.add(
        DataTransferLog(
            long_term_archive_transfer_id=t.id,
            created_at=dt.datetime.now(dt.UTC),
            level="info",
            message=f"retry requested by {who.username} (was failed: {previous})"[:1000],
        )
    )
    audit(db, who, request, 200, "long_term_archive_transfer", [t.id], detail="retry")
    db.commit()
    return to_out(_get(db, transfer_id))
