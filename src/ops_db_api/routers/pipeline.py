"""The pipeline at a glance: counts per stage and status, live copies per site and location,
and the item that has waited longest in each stage.

Every figure comes from a GROUP BY (one pass per table at most, no per-row Python); the oldest
item of a stage is found from its group's minimum timestamp and then looked up by that exact
value. The one pass over ``physical_copy`` grows with the number of copies (about 0.2 s per
million on the test machine), so a result is shared for ``max_age_s`` seconds per process.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from sqlalchemy import ColumnElement, and_, func, select
from sqlalchemy.orm import Session, selectinload

from ccat_ops_db.enums import PackageState, PhysicalCopyStatus, Status
from ccat_ops_db.models import (
    DataTransfer,
    DataTransferPackage,
    LongTermArchiveTransfer,
    PhysicalCopy,
    RawDataFile,
    RawDataPackage,
    Site,
    StagingJob,
)

from ..deps import DB, Reader
from ..errors import ERROR_RESPONSES
from ..schemas.transfers import (
    LocationSummary,
    OldestWaiting,
    PipelineStages,
    PipelineSummary,
    SiteSummary,
    Stage0Filing,
    Stage1Packaging,
    Stage2TransferPackaging,
    Stage3Transfer,
    Stage4Unpack,
    Stage5Archive,
    Stage6Staging,
    Stage7Copies,
)

router = APIRouter(prefix="/pipeline", tags=["pipeline"])

NOT_DONE = (Status.PENDING, Status.SCHEDULED, Status.IN_PROGRESS)
DELETING = (PhysicalCopyStatus.DELETION_SCHEDULED, PhysicalCopyStatus.DELETION_IN_PROGRESS)
LIVE = (PhysicalCopyStatus.PRESENT, PhysicalCopyStatus.STAGED)


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _zeros(members: Iterable[Any]) -> dict[str, int]:
    return {str(m): 0 for m in members}


def _min(values: Iterable[dt.datetime | None]) -> dt.datetime | None:
    present = [_aware(v) for v in values if v is not None]
    return min(present) if present else None


def _oldest(
    db: Session,
    id_col: Any,
    since_col: Any,
    since: dt.datetime | None,
    where: list[ColumnElement[bool]],
    now: dt.datetime,
) -> OldestWaiting | None:
    """The id of an item of ``where`` whose ``since_col`` equals the group minimum ``since``."""
    if since is None:
        return None
    ident: int | uuid.UUID | None = db.scalar(
        select(id_col).where(*where, since_col == since).order_by(id_col).limit(1)
    )
    if ident is None:  # it moved on between the two queries
        return None
    return OldestWaiting(id=ident, since=since, age_s=max(0.0, (now - since).total_seconds()))


def _by_status(db: Session, model: Any, since_col: Any) -> list[Any]:
    """(status, count, min(since)) per status of an operation table."""
    return list(
        db.execute(select(model.status, func.count(), func.min(since_col)).group_by(model.status))
    )


@dataclass
class _Cached:
    at: float
    value: PipelineSummary


_cache_lock = threading.Lock()


@router.get(
    "/summary",
    response_model=PipelineSummary,
    summary="Counts per pipeline stage and site, and the oldest waiting item per stage",
    responses=ERROR_RESPONSES,
)
def summary(
    request: Request,
    db: DB,
    _: Reader,
    max_age_s: Annotated[
        int,
        Query(
            ge=0,
            le=3600,
            description="Accept a summary computed up to this many seconds ago by this API "
            "process (see `generated_at`); 0 always computes a fresh one.",
        ),
    ] = 10,
) -> PipelineSummary:
    """Counts of every pipeline stage by status or state, live copies and bytes per location,
    and the item that has waited longest in each stage (its id and age in seconds).

    Stages: 0 unpackaged files; 1 raw packages by build status; 2 built packages waiting for a
    transfer package, packages in one, transfer packages by status; 3 transfers by status;
    4 unpacks of arrived transfers by status; 5 archive transfers by status and packages by
    state; 6 staging jobs by status; 7 physical copies by status (and type).

    The copy counts need one pass over all physical copies (about 0.2 s per million rows), so
    dashboards polling this share a result for ``max_age_s`` seconds.
    """
    state = request.app.state
    with _cache_lock:
        cached: _Cached | None = getattr(state, "pipeline_summary_cache", None)
    if cached is not None and time.monotonic() - cached.at <= max_age_s:
        return cached.value
    value = compute_summary(db)
    with _cache_lock:
        state.pipeline_summary_cache = _Cached(at=time.monotonic(), value=value)
    return value


#: How long the DELETED-copy counts are reused (they only grow, and slowly matter).
DELETED_COUNTS_MAX_AGE_S = 600.0
_deleted_cache: dict[str, tuple[float, list[tuple[Any, int]]]] = {}


def _deleted_counts(db: Session) -> list[tuple[Any, int]]:
    """DELETED copies per copy type, cached per database for ``DELETED_COUNTS_MAX_AGE_S``."""
    bind = db.get_bind()
    key = str(getattr(bind, "engine", bind).url)
    hit = _deleted_cache.get(key)
    if hit is not None and time.monotonic() - hit[0] <= DELETED_COUNTS_MAX_AGE_S:
        return hit[1]
    rows = [
        (copy_type, int(n))
        for copy_type, n in db.execute(
            select(PhysicalCopy.copy_type, func.count())
            .where(PhysicalCopy.status == PhysicalCopyStatus.DELETED)
            .group_by(PhysicalCopy.copy_type)
        )
    ]
    _deleted_cache[key] = (time.monotonic(), rows)
    return rows


def compute_summary(db: Session) -> PipelineSummary:
    """The pipeline summary, computed now with aggregate queries."""
    now = dt.datetime.now(dt.UTC)

    # stage 0: unpackaged files (the partial index ix_raw_data_file_unpackaged)
    unpackaged = RawDataFile.raw_data_package_id.is_(None)
    n_files, n_bytes, files_since = db.execute(
        select(
            func.count(),
            func.coalesce(func.sum(RawDataFile.size), 0),
            func.min(RawDataFile.created_at),
        ).where(unpackaged)
    ).one()
    files_since = _aware(files_since) if files_since else None
    filing = Stage0Filing(
        unpackaged_files=n_files,
        unpackaged_bytes=int(n_bytes),
        oldest_waiting=_oldest(
            db, RawDataFile.id, RawDataFile.created_at, files_since, [unpackaged], now
        ),
    )

    # stages 1, 2, 5: raw data packages by state, status and transfer-package membership
    in_dtp = RawDataPackage.data_transfer_package_id.is_not(None)
    pkg_groups = list(
        db.execute(
            select(
                RawDataPackage.state,
                RawDataPackage.status,
                in_dtp.label("in_dtp"),
                func.count(),
                func.min(RawDataPackage.created_at),
            ).group_by(RawDataPackage.state, RawDataPackage.status, in_dtp)
        )
    )
    by_status = _zeros(Status)
    by_state = _zeros(PackageState)
    waiting_for_dtp = in_dtps = 0
    for state, status, member, n, _since in pkg_groups:
        by_status[str(status)] += n
        by_state[str(state)] += n
        if member:
            in_dtps += n
        elif state == PackageState.WAITING and status == Status.COMPLETED:
            waiting_for_dtp += n
    build_since = _min(g[4] for g in pkg_groups if g[1] in NOT_DONE)
    packaging = Stage1Packaging(
        raw_data_packages_by_status=by_status,
        oldest_waiting=_oldest(
            db,
            RawDataPackage.id,
            RawDataPackage.created_at,
            build_since,
            [RawDataPackage.status.in_(NOT_DONE)],
            now,
        ),
    )
    ready = [
        RawDataPackage.state == PackageState.WAITING,
        RawDataPackage.status == Status.COMPLETED,
        RawDataPackage.data_transfer_package_id.is_(None),
    ]
    ready_since = _min(
        g[4]
        for g in pkg_groups
        if g[0] == PackageState.WAITING and g[1] == Status.COMPLETED and not g[2]
    )
    dtp_groups = _by_status(db, DataTransferPackage, DataTransferPackage.created_at)
    transfer_packaging = Stage2TransferPackaging(
        raw_data_packages_waiting=waiting_for_dtp,
        raw_data_packages_in_transfer_packages=in_dtps,
        data_transfer_packages_by_status={
            **_zeros(Status),
            **{str(s): n for s, n, _ in dtp_groups},
        },
        oldest_waiting=_oldest(
            db, RawDataPackage.id, RawDataPackage.created_at, ready_since, ready, now
        ),
    )

    # stages 3 and 4: transfers by status and unpack status
    unpack_since_col = func.coalesce(DataTransfer.finished_at, DataTransfer.created_at)
    t_groups = list(
        db.execute(
            select(
                DataTransfer.status,
                DataTransfer.unpack_status,
                func.count(),
                func.min(DataTransfer.created_at),
                func.min(unpack_since_col),
            ).group_by(DataTransfer.status, DataTransfer.unpack_status)
        )
    )
    t_by_status = _zeros(Status)
    u_by_status = _zeros(Status)
    for status, unpack_status, n, _a, _b in t_groups:
        t_by_status[str(status)] += n
        if status == Status.COMPLETED:
            u_by_status[str(unpack_status)] += n
    transfer = Stage3Transfer(
        data_transfers_by_status=t_by_status,
        oldest_waiting=_oldest(
            db,
            DataTransfer.id,
            DataTransfer.created_at,
            _min(g[3] for g in t_groups if g[0] in NOT_DONE),
            [DataTransfer.status.in_(NOT_DONE)],
            now,
        ),
    )
    unpack_since = _min(g[4] for g in t_groups if g[0] == Status.COMPLETED and g[1] in NOT_DONE)
    unpack = Stage4Unpack(
        unpacks_by_status=u_by_status,
        oldest_waiting=_oldest(
            db,
            DataTransfer.id,
            unpack_since_col,
            unpack_since,
            [DataTransfer.status == Status.COMPLETED, DataTransfer.unpack_status.in_(NOT_DONE)],
            now,
        ),
    )

    # stage 5: archive transfers
    a_groups = _by_status(db, LongTermArchiveTransfer, LongTermArchiveTransfer.created_at)
    archive = Stage5Archive(
        archive_transfers_by_status={**_zeros(Status), **{str(s): n for s, n, _ in a_groups}},
        raw_data_packages_archived=by_state[str(PackageState.ARCHIVED)],
        raw_data_packages_by_state=by_state,
        oldest_waiting=_oldest(
            db,
            LongTermArchiveTransfer.id,
            LongTermArchiveTransfer.created_at,
            _min(g[2] for g in a_groups if g[0] in NOT_DONE),
            [LongTermArchiveTransfer.status.in_(NOT_DONE)],
            now,
        ),
    )

    # stage 6: staging jobs
    s_groups = _by_status(db, StagingJob, StagingJob.requested_at)
    staging = Stage6Staging(
        staging_jobs_by_status={**_zeros(Status), **{str(s): n for s, n, _ in s_groups}},
        oldest_waiting=_oldest(
            db,
            StagingJob.id,
            StagingJob.requested_at,
            _min(g[2] for g in s_groups if g[0] in NOT_DONE),
            [StagingJob.status.in_(NOT_DONE)],
            now,
        ),
    )

    # stage 7 and sites: the live copies (not DELETED) grouped by location, type and status,
    # read from the partial index ix_physical_copy_live; the DELETED history (most rows after
    # years of operation) only feeds counts, so it is counted separately and kept longer.
    c_groups = list(
        db.execute(
            select(
                PhysicalCopy.data_location_id,
                PhysicalCopy.copy_type,
                PhysicalCopy.status,
                func.count(),
                func.coalesce(func.sum(PhysicalCopy.size), 0),
                func.min(PhysicalCopy.updated_at),
            )
            .where(PhysicalCopy.status != PhysicalCopyStatus.DELETED)
            .group_by(PhysicalCopy.data_location_id, PhysicalCopy.copy_type, PhysicalCopy.status)
        )
    )
    c_groups += [
        (None, copy_type, PhysicalCopyStatus.DELETED, n, 0, None)
        for copy_type, n in _deleted_counts(db)
    ]
    copies_by_status = _zeros(PhysicalCopyStatus)
    copies_by_type: dict[str, dict[str, int]] = defaultdict(dict)
    live: dict[int, dict[str, int]] = defaultdict(lambda: {"copies": 0, "bytes": 0})
    live_by_type: dict[int, dict[str, int]] = defaultdict(dict)
    deleting: tuple[dt.datetime, int, Any, Any] | None = None
    for loc_id, copy_type, status, n, size, since in c_groups:
        copies_by_status[str(status)] += n
        per_type = copies_by_type[str(copy_type)]
        per_type[str(status)] = per_type.get(str(status), 0) + n
        if status in LIVE:
            live[loc_id]["copies"] += n
            live[loc_id]["bytes"] += int(size)
            by_type = live_by_type[loc_id]
            by_type[str(copy_type)] = by_type.get(str(copy_type), 0) + n
        if (
            status in DELETING
            and since is not None
            and (deleting is None or _aware(since) < deleting[0])
        ):
            deleting = (_aware(since), loc_id, copy_type, status)
    oldest_deletion = None
    if deleting is not None:
        since, loc_id, copy_type, status = deleting
        oldest_deletion = _oldest(
            db,
            PhysicalCopy.id,
            PhysicalCopy.updated_at,
            since,
            [
                and_(
                    PhysicalCopy.data_location_id == loc_id,
                    PhysicalCopy.copy_type == copy_type,
                    PhysicalCopy.status == status,
                )
            ],
            now,
        )
    copies = Stage7Copies(
        copies_by_status=copies_by_status,
        copies_by_type=dict(copies_by_type),
        oldest_waiting=oldest_deletion,
    )

    sites = []
    for site in db.scalars(
        select(Site).options(selectinload(Site.locations)).order_by(Site.short_name)
    ):
        locations = [
            LocationSummary(
                id=loc.id,
                name=loc.name,
                location_type=loc.location_type,
                active=loc.active,
                present_copies=live[loc.id]["copies"] if loc.id in live else 0,
                present_bytes=live[loc.id]["bytes"] if loc.id in live else 0,
                present_copies_by_type=live_by_type.get(loc.id, {}),
                capacity_bytes=loc.capacity_bytes,
            )
            for loc in sorted(site.locations, key=lambda x: (x.priority, x.name))
        ]
        sites.append(
            SiteSummary(
                site=site.short_name,
                name=site.name,
                present_copies=sum(x.present_copies for x in locations),
                present_bytes=sum(x.present_bytes for x in locations),
                locations=locations,
            )
        )

    return PipelineSummary(
        generated_at=now,
        stages=PipelineStages(
            filing=filing,
            packaging=packaging,
            transfer_packaging=transfer_packaging,
            transfer=transfer,
            unpack=unpack,
            archive=archive,
            staging=staging,
            copies=copies,
        ),
        sites=sites,
    )
