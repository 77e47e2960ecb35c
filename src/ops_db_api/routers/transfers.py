"""Data transfer packages and site-to-site transfers (pipeline stages 2-4).

The transfer managers create and run them; the API reads them, their log lines, and lets an
operator put a FAILED transfer (or a FAILED unpack) back to PENDING so it is scheduled again,
or give a transfer up for good (CANCELLED: its destination is gone).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from sqlalchemy import Select, func, or_, select
from sqlalchemy.orm import Session, selectinload

from ccat_ops_db.enums import Status
from ccat_ops_db.models import (
    DataLocation,
    DataTransfer,
    DataTransferLog,
    DataTransferPackage,
    RawDataPackage,
    Site,
)

from ..deps import DB, Operator, Paging, Principal, Reader, audit, paginate
from ..errors import ERROR_RESPONSES, ApiError, ErrorBody, conflict, not_found
from ..schemas.archive import LogLineOut
from ..schemas.common import Page
from ..schemas.transfers import (
    MAX_PACKAGE_IDS,
    CancelTransferIn,
    DataTransferOut,
    DataTransferPackageDetail,
    DataTransferPackageOut,
)

router = APIRouter(tags=["transfers"])

PackageId = Annotated[int, Path(ge=1, le=2**63 - 1, description="Data transfer package id.")]
TransferId = Annotated[int, Path(ge=1, le=2**63 - 1, description="Data transfer id.")]
SiteName = Annotated[
    str | None,
    Query(
        min_length=1,
        max_length=32,
        pattern=r"^[^\x00]*$",
        description="Site short name.",
        examples=["cologne"],
    ),
]
PACKAGE_NOT_FOUND = {404: {"model": ErrorBody, "description": "No transfer package with this id"}}
TRANSFER_NOT_FOUND = {404: {"model": ErrorBody, "description": "No data transfer with this id"}}


def location_label(loc: DataLocation | None) -> str:
    """``site/location`` of a data location ('' for None)."""
    return "" if loc is None else f"{loc.site.short_name}/{loc.name}"


# --- data transfer packages ------------------------------------------------------------------


def _package_out(p: DataTransferPackage) -> dict[str, object]:
    return {
        "id": p.id,
        "name": p.name,
        "relative_path": p.relative_path,
        "size": p.size,
        "checksum": p.checksum,
        "checksum_algorithm": p.checksum_algorithm,
        "status": p.status,
        "origin_location_id": p.origin_location_id,
        "origin_location": location_label(p.origin_location),
        "retry_count": p.retry_count,
        "failure_reason": p.failure_reason,
        "last_failure_at": p.last_failure_at,
        "next_attempt_at": p.next_attempt_at,
        "created_at": p.created_at,
        "updated_at": p.updated_at,
    }


@router.get(
    "/data_transfer_packages",
    response_model=Page[DataTransferPackageOut],
    responses=ERROR_RESPONSES,
)
def list_packages(
    db: DB,
    _: Reader,
    page: Paging,
    status: Status | None = None,
    origin_location_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
) -> Page[DataTransferPackageOut]:
    """Data transfer packages in creation (id) order, filtered."""
    q = select(DataTransferPackage).options(
        selectinload(DataTransferPackage.origin_location).selectinload(DataLocation.site)
    )
    if status is not None:
        q = q.where(DataTransferPackage.status == status)
    if origin_location_id is not None:
        q = q.where(DataTransferPackage.origin_location_id == origin_location_id)
    rows, nxt = paginate(db, q, [DataTransferPackage.id], page)
    return Page(
        items=[DataTransferPackageOut.model_validate(_package_out(r)) for r in rows],
        next_cursor=nxt,
        limit=page.limit,
    )


@router.get(
    "/data_transfer_packages/{package_id}",
    response_model=DataTransferPackageDetail,
    responses={**ERROR_RESPONSES, **PACKAGE_NOT_FOUND},
)
def get_package(package_id: PackageId, db: DB, _: Reader) -> DataTransferPackageDetail:
    """One transfer package: the raw data packages in it (ids, bounded) and its transfers."""
    p = db.scalar(
        select(DataTransferPackage)
        .options(selectinload(DataTransferPackage.origin_location).selectinload(DataLocation.site))
        .where(DataTransferPackage.id == package_id)
    )
    if p is None:
        raise not_found("data transfer package", package_id)
    member = RawDataPackage.data_transfer_package_id == package_id
    count = db.scalar(select(func.count()).select_from(RawDataPackage).where(member)) or 0
    ids = list(
        db.scalars(
            select(RawDataPackage.id)
            .where(member)
            .order_by(RawDataPackage.id)
            .limit(MAX_PACKAGE_IDS)
        )
    )
    transfers = db.scalars(
        _transfer_query()
        .where(DataTransfer.data_transfer_package_id == package_id)
        .order_by(DataTransfer.id)
    )
    return DataTransferPackageDetail.model_validate(
        {
            **_package_out(p),
            "raw_data_package_count": count,
            "raw_data_package_ids": ids,
            "transfers": [_transfer_out(t) for t in transfers],
        }
    )


# --- data transfers --------------------------------------------------------------------------


def _transfer_query() -> Select[tuple[DataTransfer]]:
    return select(DataTransfer).options(
        selectinload(DataTransfer.data_transfer_package),
        selectinload(DataTransfer.origin_location).selectinload(DataLocation.site),
        selectinload(DataTransfer.destination_location).selectinload(DataLocation.site),
    )


def _transfer_out(t: DataTransfer) -> DataTransferOut:
    return DataTransferOut(
        id=t.id,
        data_transfer_package_id=t.data_transfer_package_id,
        data_transfer_package_name=t.data_transfer_package.name,
        route_id=t.route_id,
        origin_location_id=t.origin_location_id,
        origin_location=location_label(t.origin_location),
        destination_location_id=t.destination_location_id,
        destination_location=location_label(t.destination_location),
        method=t.method,
        is_secondary=t.is_secondary,
        status=t.status,
        retry_count=t.retry_count,
        failure_reason=t.failure_reason,
        last_failure_at=t.last_failure_at,
        next_attempt_at=t.next_attempt_at,
        unpack_status=t.unpack_status,
        unpack_retry_count=t.unpack_retry_count,
        unpack_failure_reason=t.unpack_failure_reason,
        started_at=t.started_at,
        finished_at=t.finished_at,
        unpacked_at=t.unpacked_at,
        bytes_transferred=t.bytes_transferred,
        rate_bytes_per_s=t.rate_bytes_per_s,
        created_at=t.created_at,
        updated_at=t.updated_at,
    )


def _get_transfer(db: Session, transfer_id: int) -> DataTransfer:
    t = db.scalar(_transfer_query().where(DataTransfer.id == transfer_id))
    if t is None:
        raise not_found("data transfer", transfer_id)
    return t


def _at_site(short_name: str) -> Select[tuple[int]]:
    return (
        select(DataLocation.id)
        .join(Site, Site.id == DataLocation.site_id)
        .where(Site.short_name == short_name)
    )


@router.get("/data_transfers", response_model=Page[DataTransferOut], responses=ERROR_RESPONSES)
def list_transfers(
    db: DB,
    _: Reader,
    page: Paging,
    status: Status | None = None,
    unpack_status: Status | None = None,
    origin_site: SiteName = None,
    destination_site: SiteName = None,
    data_transfer_package_id: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
    failed: Annotated[
        bool | None,
        Query(
            description="true: only transfers whose transfer or unpack FAILED; "
            "false: only the others."
        ),
    ] = None,
) -> Page[DataTransferOut]:
    """Site-to-site transfers in creation (id) order, filtered."""
    q = _transfer_query()
    if status is not None:
        q = q.where(DataTransfer.status == status)
    if unpack_status is not None:
        q = q.where(DataTransfer.unpack_status == unpack_status)
    if origin_site is not None:
        q = q.where(DataTransfer.origin_location_id.in_(_at_site(origin_site)))
    if destination_site is not None:
        q = q.where(DataTransfer.destination_location_id.in_(_at_site(destination_site)))
    if data_transfer_package_id is not None:
        q = q.where(DataTransfer.data_transfer_package_id == data_transfer_package_id)
    any_failed = or_(
        DataTransfer.status == Status.FAILED, DataTransfer.unpack_status == Status.FAILED
    )
    if failed is True:
        q = q.where(any_failed)
    elif failed is False:
        q = q.where(~any_failed)
    rows, nxt = paginate(db, q, [DataTransfer.id], page)
    return Page(items=[_transfer_out(r) for r in rows], next_cursor=nxt, limit=page.limit)


@router.get(
    "/data_transfers/{transfer_id}",
    response_model=DataTransferOut,
    responses={**ERROR_RESPONSES, **TRANSFER_NOT_FOUND},
)
def get_transfer(transfer_id: TransferId, db: DB, _: Reader) -> DataTransferOut:
    """One transfer: transfer and unpack status, retry counts and failure reasons."""
    return _transfer_out(_get_transfer(db, transfer_id))


@router.get(
    "/data_transfers/{transfer_id}/logs",
    response_model=Page[LogLineOut],
    responses={**ERROR_RESPONSES, **TRANSFER_NOT_FOUND},
)
def transfer_logs(transfer_id: TransferId, db: DB, _: Reader, page: Paging) -> Page[LogLineOut]:
    """The log lines of a transfer, oldest first; the full output is in each `log_path`."""
    if db.get(DataTransfer, transfer_id) is None:
        raise not_found("data transfer", transfer_id)
    q = select(DataTransferLog).where(DataTransferLog.data_transfer_id == transfer_id)
    rows, nxt = paginate(db, q, [DataTransferLog.id], page)
    return Page(
        items=[LogLineOut.model_validate(r) for r in rows], next_cursor=nxt, limit=page.limit
    )


def _state_conflict(t: DataTransfer, rule: str) -> ApiError:
    """409 for an operator action the transfer's state does not allow; ``rule`` says why."""
    return conflict(
        f"data transfer {t.id} is {t.status} (unpack {t.unpack_status}): {rule}",
        [
            {
                "loc": ["status"],
                "msg": f"transfer {t.status}, unpack {t.unpack_status}",
                "type": "conflict",
            }
        ],
    )


def _commit_action(
    db: Session,
    t: DataTransfer,
    who: Principal,
    request: Request,
    level: str,
    message: str,
    what: str,
) -> DataTransferOut:
    """An operator's action on ``t``: a log line and an audit row in the same transaction,
    committed; the transfer as it is now."""
    db.add(
        DataTransferLog(
            data_transfer_id=t.id,
            created_at=dt.datetime.now(dt.UTC),
            level=level,
            message=message[:1000],
        )
    )
    audit(db, who, request, 200, "data_transfer", [t.id], detail=what)
    db.commit()
    return _transfer_out(_get_transfer(db, t.id))


_NOT_RETRYABLE = {
    Status.PENDING: "it is already pending (waiting for the transfer manager)",
    Status.SCHEDULED: "it is scheduled (a task was submitted for it)",
    Status.IN_PROGRESS: "it is in progress",
    Status.COMPLETED: "it completed",
    Status.CANCELLED: "it was cancelled (given up for good)",
}


@router.post(
    "/data_transfers/{transfer_id}/retry",
    response_model=DataTransferOut,
    summary="Retry a failed transfer or a failed unpack",
    responses={
        **ERROR_RESPONSES,
        **TRANSFER_NOT_FOUND,
        409: {"model": ErrorBody, "description": "Neither the transfer nor its unpack FAILED"},
    },
)
def retry_transfer(
    transfer_id: TransferId, request: Request, db: DB, who: Operator
) -> DataTransferOut:
    """Put a FAILED transfer back to PENDING, or, when the bytes arrived but unpacking FAILED,
    put the unpack back to PENDING (nothing is transferred again).

    The retry budget starts over, ``next_attempt_at`` is cleared and the failure reason moves
    into a log line; ``last_failure_at`` is kept. Anything else answers 409 saying why.
    """
    t = db.get(DataTransfer, transfer_id, with_for_update=True)
    if t is None:
        raise not_found("data transfer", transfer_id)
    if t.status == Status.FAILED:
        what = "transfer"
        previous = t.failure_reason
        t.status = Status.PENDING
        t.retry_count = 0
        t.failure_reason = None
    elif t.status == Status.COMPLETED and t.unpack_status == Status.FAILED:
        what = "unpack"
        previous = t.unpack_failure_reason
        t.unpack_status = Status.PENDING
        t.unpack_retry_count = 0
        t.unpack_failure_reason = None
    else:
        if t.status == Status.COMPLETED:
            why = f"its transfer completed and its unpack {_NOT_RETRYABLE[t.unpack_status]}"
        else:
            why = f"its transfer {_NOT_RETRYABLE[t.status]}"
        raise _state_conflict(
            t, f"only a failed transfer or a failed unpack can be retried, and {why}"
        )
    t.next_attempt_at = None
    return _commit_action(
        db,
        t,
        who,
        request,
        "info",
        f"{what} retry requested by {who.username} "
        f"(was failed: {previous or 'no reason recorded'})",
        f"retry {what}",
    )


_NOT_CANCELLABLE = {
    Status.SCHEDULED: "a task was submitted for it: cancel it once that task ends or fails",
    Status.IN_PROGRESS: "a worker is moving it: cancel it once that run ends or fails",
    Status.COMPLETED: "its bytes arrived and were unpacked",
    Status.CANCELLED: "it is already cancelled",
}


@router.post(
    "/data_transfers/{transfer_id}/cancel",
    response_model=DataTransferOut,
    summary="Give a transfer up for good (its destination is gone)",
    responses={
        **ERROR_RESPONSES,
        **TRANSFER_NOT_FOUND,
        409: {"model": ErrorBody, "description": "The transfer is running, arrived or cancelled"},
    },
)
def cancel_transfer(
    transfer_id: TransferId, body: CancelTransferIn, request: Request, db: DB, who: Operator
) -> DataTransferOut:
    """Mark a PENDING or FAILED transfer CANCELLED, with the operator's reason; also one whose
    bytes arrived but whose unpack is PENDING or FAILED (the site went before unpacking).

    A cancelled transfer is never scheduled, retried or revived again, and it holds no copy:
    the sending BUFFER may delete its transfer package once nothing else needs it. Nothing is
    lost by it: a package's SOURCE and BUFFER copies are deleted only once it is archived.
    For the transfer that takes a package off its site (not a secondary), the transfer
    packages manager sends the package to another archive site, chosen round-robin among the
    sites this package was not given up for; a cancelled secondary transfer means the package
    is not replicated to that site. Anything else answers 409 saying why; there is no undo.
    """
    t = db.get(DataTransfer, transfer_id, with_for_update=True)
    if t is None:
        raise not_found("data transfer", transfer_id)
    arrived = t.status == Status.COMPLETED and t.unpack_status in (Status.PENDING, Status.FAILED)
    if t.status not in (Status.PENDING, Status.FAILED) and not arrived:
        if t.status == Status.COMPLETED and t.unpack_status != Status.COMPLETED:
            why = f"its bytes arrived and its unpack is {t.unpack_status}: cancel it once that ends"
        else:
            why = _NOT_CANCELLABLE[t.status]
        raise _state_conflict(
            t,
            "only a pending or failed transfer, or one whose unpack is pending or failed, can "
            f"be cancelled, and {why}",
        )
    previous = t.unpack_failure_reason if arrived else t.failure_reason
    reason = " ".join(body.reason.split())
    t.status = Status.CANCELLED
    t.unpack_status = Status.CANCELLED
    t.next_attempt_at = None
    t.failure_reason = f"cancelled by {who.username}: {reason}"[:1990]
    if arrived:  # the unpack is given up with it (its last reason goes to the log line)
        t.unpack_failure_reason = t.failure_reason
    return _commit_action(
        db,
        t,
        who,
        request,
        "warning",
        f"transfer cancelled by {who.username}: {reason} "
        f"(was {'arrived, unpack ' if arrived else ''}"
        f"{'failed: ' + previous if previous else 'pending'})",
        f"cancel: {reason}"[:200],
    )
