"""Staging jobs (pipeline stage 6): request archived packages in a PROCESSING location.

A scientist or pipeline asks for ARCHIVED raw data packages to be staged into a PROCESSING
location; the staging manager copies them there from a long-term archive (unpacked: STAGED
copies). When the requester is done, it *releases* the job and the deletion manager removes
the staged copies; ``expires_at`` bounds how long they stay without a release. A job not yet
started can be *cancelled*.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from ccat_ops_db.enums import CopyType, LocationType, PackageState, PhysicalCopyStatus, Status
from ccat_ops_db.models import (
    DataLocation,
    DataTransferLog,
    PhysicalCopy,
    RawDataPackage,
    StagingJob,
    User,
    scope_allows,
    staging_job_raw_data_package,
)

from ..deps import DB, Operator, Paging, Principal, Reader, audit, paginate
from ..errors import ERROR_RESPONSES, ApiError, ErrorBody, conflict, invalid, not_found
from ..schemas.archive import (
    MAX_RETENTION,
    LogLineOut,
    StagingJobCreate,
    StagingJobDetail,
    StagingJobOut,
    StagingPackageOut,
    StagingProgress,
)
from ..schemas.common import Page
from .archive import location_label

router = APIRouter(prefix="/staging_jobs", tags=["staging"])

JobId = Annotated[int, Path(ge=1, le=2**31 - 1, description="Staging job id.")]
NOT_FOUND = {404: {"model": ErrorBody, "description": "No staging job with this id"}}
NOT_YOURS = {
    403: {
        "model": ErrorBody,
        "description": "The token lacks the scope, or the job is another user's (admins may)",
    }
}
RECENT_LOGS = 20
LIVE = (PhysicalCopyStatus.STAGED, PhysicalCopyStatus.PRESENT)


def _loaded() -> list[Any]:
    return [
        selectinload(StagingJob.destination_location).selectinload(DataLocation.site),
        selectinload(StagingJob.origin_location).selectinload(DataLocation.site),
        selectinload(StagingJob.requested_by),
    ]


def _fields(job: StagingJob, package_count: int) -> dict[str, Any]:
    return {
        "id": job.id,
        "name": job.name,
        "description": job.description,
        "status": job.status,
        "active": job.active,
        "unpack": job.unpack,
        "destination_location_id": job.destination_location_id,
        "destination_location": location_label(job.destination_location) or "",
        "origin_location_id": job.origin_location_id,
        "origin_location": location_label(job.origin_location),
        "requested_by_user_id": job.requested_by_user_id,
        "requested_by": job.requested_by.username if job.requested_by else None,
        "created_by_token_id": job.created_by_token_id,
        "package_count": package_count,
        "requested_at": job.requested_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "released_at": job.released_at,
        "expires_at": job.expires_at,
        "retry_count": job.retry_count,
        "failure_reason": job.failure_reason,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
    }


def _detail(db: Session, job_id: int) -> StagingJobDetail:
    """The job with progress, packages and recent logs (404 if it does not exist)."""
    job = db.scalar(
        select(StagingJob)
        .options(*_loaded(), selectinload(StagingJob.raw_data_packages))
        .where(StagingJob.id == job_id)
    )
    if job is None:
        raise not_found("staging job", job_id)
    packages = sorted(job.raw_data_packages, key=lambda p: p.id)
    staged: dict[int, str | None] = dict(
        db.execute(
            select(PhysicalCopy.raw_data_package_id, PhysicalCopy.relative_path).where(
                PhysicalCopy.copy_type == CopyType.RAW_DATA_PACKAGE,
                PhysicalCopy.data_location_id == job.destination_location_id,
                PhysicalCopy.status.in_(LIVE),
                PhysicalCopy.raw_data_package_id.in_(
                    select(staging_job_raw_data_package.c.raw_data_package_id).where(
                        staging_job_raw_data_package.c.staging_job_id == job.id
                    )
                ),
            )
        )
        .tuples()
        .all()
    )
    logs = db.scalars(
        select(DataTransferLog)
        .where(DataTransferLog.staging_job_id == job.id)
        .order_by(DataTransferLog.id.desc())
        .limit(RECENT_LOGS)
    )
    progress = StagingProgress(
        packages_requested=len(packages),
        packages_staged=sum(1 for p in packages if p.id in staged),
        bytes_requested=sum(p.size or 0 for p in packages),
        bytes_staged=sum(p.size or 0 for p in packages if p.id in staged),
    )
    return StagingJobDetail(
        **_fields(job, len(packages)),
        progress=progress,
        packages=[
            StagingPackageOut(
                id=p.id,
                name=p.name,
                size=p.size,
                state=p.state,
                staged=p.id in staged,
                path=staged.get(p.id),
            )
            for p in packages
        ],
        recent_logs=[LogLineOut.model_validate(x) for x in logs],
    )


def _log(db: Session, job: StagingJob, message: str, level: str = "info") -> None:
    db.add(
        DataTransferLog(
            staging_job_id=job.id,
            created_at=dt.datetime.now(dt.UTC),
            level=level,
            message=message[:1000],
        )
    )


def _owned(db: Session, job_id: int, who: Principal, action: str) -> StagingJob:
    """The job, locked for update; 404 if unknown, 403 unless the caller requested it or is
    an admin."""
    job = db.get(StagingJob, job_id, with_for_update=True)
    if job is None:
        raise not_found("staging job", job_id)
    if job.requested_by_user_id != who.user_id and not scope_allows(who.scopes, "admin"):
        raise ApiError(
            403,
            f"staging job {job_id} was requested by another user; only they or an admin may "
            f"{action} it",
        )
    return job


# --- routes ----------------------------------------------------------------------------------


@router.post(
    "",
    status_code=201,
    response_model=StagingJobDetail,
    summary="Request staging of archived packages into a PROCESSING location",
    responses=ERROR_RESPONSES,
)
def create(body: StagingJobCreate, request: Request, db: DB, who: Operator) -> StagingJobDetail:
    """Create a PENDING staging job for the caller; the staging manager picks it up.

    Every package must exist and be ARCHIVED, and the destination must be an active
    PROCESSING location; otherwise 422 lists every problem (each bad package with its index
    and state). **Not idempotent**: every successful call creates a new job (201). A client
    unsure whether a request went through looks for its job with
    `GET /staging_jobs?requested_by=<username>` before asking again.
    """
    errors: list[dict[str, Any]] = []
    dest = db.get(DataLocation, body.destination_location_id)
    dest_loc: list[str | int] = ["body", "destination_location_id"]
    if dest is None:
        errors.append(
            {"loc": dest_loc, "msg": f"data location {body.destination_location_id} does not exist"}
        )
    elif dest.location_type != LocationType.PROCESSING:
        errors.append(
            {
                "loc": dest_loc,
                "msg": f"data location {location_label(dest)} is a {dest.location_type} "
                "location, not a processing location",
            }
        )
    elif not dest.active:
        errors.append({"loc": dest_loc, "msg": f"data location {location_label(dest)} is inactive"})
    if body.expires_at is not None and body.retention_hours is not None:
        errors.append(
            {
                "loc": ["body", "retention_hours"],
                "msg": "give either expires_at or retention_hours, not both",
            }
        )
    ids = list(dict.fromkeys(body.raw_data_package_ids))
    found = {p.id: p for p in db.scalars(select(RawDataPackage).where(RawDataPackage.id.in_(ids)))}
    bad: list[str] = []
    seen: set[int] = set()
    for index, pid in enumerate(body.raw_data_package_ids):
        if pid in seen:
            continue
        seen.add(pid)
        pkg = found.get(pid)
        if pkg is None:
            msg, short = f"raw data package {pid} does not exist", f"{pid} (not found)"
        elif pkg.state != PackageState.ARCHIVED:
            msg = f"raw data package {pid} is {pkg.state}, not archived"
            short = f"{pid} ({pkg.state})"
        else:
            continue
        bad.append(short)
        errors.append({"loc": ["body", "raw_data_package_ids", index], "msg": msg})
    if errors:
        detail = "cannot create the staging job"
        if bad:
            detail += f"; packages not archived: {', '.join(bad[:50])}"
            if len(bad) > 50:
                detail += f" and {len(bad) - 50} more"
        raise invalid(detail, errors)
    assert dest is not None
    now = dt.datetime.now(dt.UTC)
    if body.expires_at is not None:
        expires_at: dt.datetime | None = body.expires_at
    elif body.retention_hours is not None:
        expires_at = now + dt.timedelta(hours=body.retention_hours)
    elif dest.retention_hours:
        expires_at = now + min(dt.timedelta(hours=dest.retention_hours), MAX_RETENTION)
    else:
        expires_at = None
    job = StagingJob(
        name=body.name,
        description=body.description,
        destination_location_id=dest.id,
        status=Status.PENDING,
        active=True,
        unpack=body.unpack,
        requested_by_user_id=who.user_id,
        created_by_token_id=who.token_id,
        requested_at=now,
        expires_at=expires_at,
        raw_data_packages=[found[i] for i in ids],
    )
    db.add(job)
    db.flush()
    _log(
        db,
        job,
        f"requested by {who.username}: {len(ids)} package(s) to {location_label(dest)}"
        + (", unpacked" if body.unpack else ", as tars"),
    )
    audit(
        db,
        who,
        request,
        201,
        "staging_job",
        [job.id],
        detail=f"{len(ids)} package(s) to {location_label(dest)}",
    )
    db.commit()
    return _detail(db, job.id)


@router.get("", response_model=Page[StagingJobOut], responses=ERROR_RESPONSES)
def list_all(
    db: DB,
    _: Reader,
    page: Paging,
    status: Status | None = None,
    active: bool | None = None,
    destination_location_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    requested_by: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=64,
            pattern=r"^[^\x00]*$",
            description="Username of the requester.",
            examples=["alice"],
        ),
    ] = None,
) -> Page[StagingJobOut]:
    """Staging jobs in request (id) order, filtered."""
    q = select(StagingJob).options(*_loaded())
    if status is not None:
        q = q.where(StagingJob.status == status)
    if active is not None:
        q = q.where(StagingJob.active.is_(active))
    if destination_location_id is not None:
        q = q.where(StagingJob.destination_location_id == destination_location_id)
    if requested_by is not None:
        q = q.where(
            StagingJob.requested_by_user_id.in_(
                select(User.id).where(User.username == requested_by)
            )
        )
    rows, nxt = paginate(db, q, [StagingJob.id], page)
    counts: dict[int, int] = {}
    if rows:
        link = staging_job_raw_data_package.c
        counts = {
            job_id: n
            for job_id, n in db.execute(
                select(link.staging_job_id, func.count())
                .where(link.staging_job_id.in_([r.id for r in rows]))
                .group_by(link.staging_job_id)
            ).tuples()
        }
    return Page(
        items=[StagingJobOut(**_fields(r, counts.get(r.id, 0))) for r in rows],
        next_cursor=nxt,
        limit=page.limit,
    )


@router.get(
    "/{job_id}", response_model=StagingJobDetail, responses={**ERROR_RESPONSES, **NOT_FOUND}
)
def get_one(job_id: JobId, db: DB, _: Reader) -> StagingJobDetail:
    """One staging job with its progress: packages and bytes staged at the destination
    (a STAGED or PRESENT copy there), times, failure reason, retries and recent log lines."""
    return _detail(db, job_id)


@router.get(
    "/{job_id}/logs", response_model=Page[LogLineOut], responses={**ERROR_RESPONSES, **NOT_FOUND}
)
def logs(job_id: JobId, db: DB, _: Reader, page: Paging) -> Page[LogLineOut]:
    """All log lines of a staging job, oldest first."""
    if db.get(StagingJob, job_id) is None:
        raise not_found("staging job", job_id)
    q = select(DataTransferLog).where(DataTransferLog.staging_job_id == job_id)
    rows, nxt = paginate(db, q, [DataTransferLog.id], page)
    return Page(
        items=[LogLineOut.model_validate(r) for r in rows], next_cursor=nxt, limit=page.limit
    )


@router.post(
    "/{job_id}/release",
    response_model=StagingJobDetail,
    summary="Release a staging job: its staged copies may be deleted (idempotent)",
    responses={**ERROR_RESPONSES, **NOT_FOUND, **NOT_YOURS},
)
def release(job_id: JobId, request: Request, db: DB, who: Operator) -> StagingJobDetail:
    """Tell the data center the staged data is no longer needed.

    Sets ``active`` false and ``released_at``; the deletion manager then removes the staged
    copies, and the staging manager no longer works on the job. Only the requester or an
    admin may release a job. Releasing a released job again answers 200 and changes nothing.
    """
    job = _owned(db, job_id, who, "release")
    if job.released_at is None:
        job.active = False
        job.released_at = dt.datetime.now(dt.UTC)
        _log(db, job, f"released by {who.username}")
        audit(db, who, request, 200, "staging_job", [job.id], detail="release")
        db.commit()
    else:
        db.rollback()  # nothing to change: drop the row lock
    return _detail(db, job_id)


@router.post(
    "/{job_id}/cancel",
    response_model=StagingJobDetail,
    summary="Cancel a staging job that has not started",
    responses={
        **ERROR_RESPONSES,
        **NOT_FOUND,
        **NOT_YOURS,
        409: {"model": ErrorBody, "description": "The job is no longer PENDING or SCHEDULED"},
    },
)
def cancel(job_id: JobId, request: Request, db: DB, who: Operator) -> StagingJobDetail:
    """Cancel a PENDING or SCHEDULED job: it becomes FAILED with the reason
    ``cancelled by <username>`` and inactive. Only the requester or an admin may cancel;
    a job that started or ended answers 409."""
    job = _owned(db, job_id, who, "cancel")
    if job.status not in (Status.PENDING, Status.SCHEDULED):
        state = (
            f"failed ({job.failure_reason})"
            if job.status == Status.FAILED and job.failure_reason
            else str(job.status)
        )
        raise conflict(
            f"staging job {job_id} is {state}: only a pending or scheduled job can be cancelled"
            + ("; release it instead" if job.active and job.status != Status.FAILED else ""),
            [{"loc": ["status"], "msg": f"is {job.status}", "type": "conflict"}],
        )
    now = dt.datetime.now(dt.UTC)
    job.status = Status.FAILED
    job.failure_reason = f"cancelled by {who.username}"
    job.last_failure_at = now
    job.finished_at = now
    job.next_attempt_at = None
    job.active = False
    _log(db, job, f"cancelled by {who.username}", level="warning")
    audit(db, who, request, 200, "staging_job", [job.id], detail="cancel")
    db.commit()
    return _detail(db, job_id)
