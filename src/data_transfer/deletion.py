"""The deletion rules, in one place. Every deletion (manager and task) asks :func:`verdict`.

A copy at a SOURCE or BUFFER location may go only when every raw data package it holds

1. has a copy in at least one LONG_TERM_ARCHIVE location,
2. whose checksum was verified there (``checksum_verified_at`` set, checksum equal to the
   package's), and
3. is marked ARCHIVED.

On top of that, a copy is kept while the pipeline still needs it: a transfer package while a
transfer from or an unpack at its location is unfinished; a raw data package tar in a buffer
while an archive transfer from it is unfinished or an archive at its site still lacks it.
Temporary copies (any location with ``retention_hours``) stay for their retention period unless
the location is above its high-water mark. Copies in PROCESSING stay while an active staging
job needs them. Copies in a LONG_TERM_ARCHIVE are never deleted by the pipeline.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Select, and_, exists, func, or_, select, true, union_all
from sqlalchemy.orm import Session

from ccat_ops_db.enums import CopyType, LocationType, PackageState, PhysicalCopyStatus, Status
from ccat_ops_db.models import (
    DataLocation,
    DataTransfer,
    LongTermArchiveTransfer,
    PhysicalCopy,
    RawDataFile,
    RawDataPackage,
    StagingJob,
    staging_job_raw_data_package,
)

ACTIVE = (Status.PENDING, Status.SCHEDULED, Status.IN_PROGRESS)
LIVE_COPY = (PhysicalCopyStatus.PRESENT, PhysicalCopyStatus.STAGED)


@dataclass(frozen=True)
class Verdict:
    """Whether a copy may be deleted now, and why (or why not)."""

    allowed: bool
    reason: str


def archived_package_ids(session: Session, package_ids: Iterable[int]) -> set[int]:
    """The packages among ``package_ids`` that satisfy the three archive rules."""
    ids = list(set(package_ids))
    if not ids:
        return set()
    lta_copy = (
        select(PhysicalCopy.raw_data_package_id)
        .join(DataLocation, DataLocation.id == PhysicalCopy.data_location_id)
        .join(RawDataPackage, RawDataPackage.id == PhysicalCopy.raw_data_package_id)
        .where(
            PhysicalCopy.raw_data_package_id.in_(ids),
            DataLocation.location_type == LocationType.LONG_TERM_ARCHIVE,
            PhysicalCopy.status == PhysicalCopyStatus.PRESENT,
            PhysicalCopy.checksum_verified_at.is_not(None),
            PhysicalCopy.checksum == RawDataPackage.checksum,
            RawDataPackage.state == PackageState.ARCHIVED,
        )
    )
    return set(session.scalars(lta_copy))


def packages_held(session: Session, copy: PhysicalCopy) -> list[int]:
    """The raw data packages whose data this copy holds."""
    if copy.copy_type == CopyType.RAW_DATA_PACKAGE:
        return [copy.raw_data_package_id]  # type: ignore[list-item]
    if copy.copy_type == CopyType.RAW_DATA_FILE:
        pkg = session.scalar(
            select(RawDataFile.raw_data_package_id).where(RawDataFile.id == copy.raw_data_file_id)
        )
        return [pkg] if pkg is not None else []
    return list(
        session.scalars(
            select(RawDataPackage.id).where(
                RawDataPackage.data_transfer_package_id == copy.data_transfer_package_id
            )
        )
    )


def location_fill(session: Session, loc: DataLocation) -> float | None:
    """Fraction of the location's capacity held by live copies (None without a capacity)."""
    if not loc.capacity_bytes:
        return None
    used = session.scalar(
        select(func.coalesce(func.sum(PhysicalCopy.size), 0)).where(
            PhysicalCopy.data_location_id == loc.id,
            PhysicalCopy.status.in_(LIVE_COPY),
            # every type but raw data files, as a list: the index on (location, type, status)
            # then reads only these rows
            PhysicalCopy.copy_type.in_([CopyType.RAW_DATA_PACKAGE, CopyType.DATA_TRANSFER_PACKAGE]),
        )
    )
    return float(used or 0) / float(loc.capacity_bytes)


def _retention_verdict(
    session: Session, copy: PhysicalCopy, loc: DataLocation, now: dt.datetime
) -> Verdict | None:
    if not loc.retention_hours:
        return None
    created = copy.created_at
    if created.tzinfo is None:
        created = created.replace(tzinfo=dt.UTC)
    keep_until = created + dt.timedelta(hours=loc.retention_hours)
    if now >= keep_until:
        return None
    fill = location_fill(session, loc)
    if fill is not None and loc.high_watermark_percent and fill * 100 >= loc.high_watermark_percent:
        return None  # disk pressure overrides retention
    return Verdict(False, f"retention: kept until {keep_until.isoformat(timespec='seconds')}")


def verdict(session: Session, copy: PhysicalCopy, now: dt.datetime | None = None) -> Verdict:
    """May ``copy`` be deleted now? The one function every deletion goes through."""
    now = now or dt.datetime.now(dt.UTC)
    loc = session.get(DataLocation, copy.data_location_id)
    assert loc is not None
    if copy.status not in (
        PhysicalCopyStatus.PRESENT,
        PhysicalCopyStatus.STAGED,
        PhysicalCopyStatus.DELETION_SCHEDULED,
        PhysicalCopyStatus.DELETION_FAILED,
    ):
        return Verdict(False, f"copy is {copy.status}")
    ltype = LocationType(loc.location_type)
    if ltype == LocationType.LONG_TERM_ARCHIVE:
        return Verdict(False, "archive copies are never deleted by the pipeline")
    packages = packages_held(session, copy)
    if ltype == LocationType.PROCESSING:
        needed = session.scalar(
            select(func.count())
            .select_from(staging_job_raw_data_package)
            .join(StagingJob, StagingJob.id == staging_job_raw_data_package.c.staging_job_id)
            .where(
                staging_job_raw_data_package.c.raw_data_package_id.in_(packages or [-1]),
                StagingJob.destination_location_id == loc.id,
                StagingJob.active.is_(True),
                (StagingJob.expires_at.is_(None)) | (StagingJob.expires_at > now),
            )
        )
        if needed:
            return Verdict(False, "needed by an active staging job")
        return Verdict(True, "no active staging job needs it")
    # SOURCE and BUFFER: the three rules first.
    if not packages:
        return Verdict(False, "not in any raw data package yet")
    archived = archived_package_ids(session, packages)
    missing = [p for p in packages if p not in archived]
    if missing:
        return Verdict(
            False,
            f"raw data package(s) {', '.join(map(str, sorted(missing)[:5]))} not yet ARCHIVED "
            "with a verified archive copy",
        )
    # Still needed by the pipeline at this location?
    if copy.copy_type == CopyType.DATA_TRANSFER_PACKAGE:
        busy = session.scalar(
            select(
                exists().where(
                    DataTransfer.data_transfer_package_id == copy.data_transfer_package_id,
                    ((DataTransfer.origin_location_id == loc.id) & DataTransfer.status.in_(ACTIVE))
                    | (
                        (DataTransfer.destination_location_id == loc.id)
                        & (DataTransfer.status.in_(ACTIVE) | DataTransfer.unpack_status.in_(ACTIVE))
                    ),
                )
            )
        )
        if busy:
            return Verdict(False, "a transfer or unpack of this package is unfinished here")
    if copy.copy_type == CopyType.RAW_DATA_PACKAGE:
        busy = session.scalar(
            select(
                exists().where(
                    LongTermArchiveTransfer.raw_data_package_id == copy.raw_data_package_id,
                    LongTermArchiveTransfer.origin_location_id == loc.id,
                    LongTermArchiveTransfer.status.in_(ACTIVE),
                )
            )
        )
        if busy:
            return Verdict(False, "an archive transfer from this copy is unfinished")
        site_ltas = list(
            session.scalars(
                select(DataLocation.id).where(
                    DataLocation.site_id == loc.site_id,
                    DataLocation.location_type == LocationType.LONG_TERM_ARCHIVE,
                    DataLocation.active.is_(True),
                )
            )
        )
        for lta_id in site_ltas:
            there = session.scalar(
                select(
                    exists().where(
                        PhysicalCopy.raw_data_package_id == copy.raw_data_package_id,
                        PhysicalCopy.data_location_id == lta_id,
                        PhysicalCopy.status == PhysicalCopyStatus.PRESENT,
                        PhysicalCopy.checksum_verified_at.is_not(None),
                    )
                )
            )
            if not there:
                return Verdict(False, "an archive at this site does not hold it yet")
    kept = _retention_verdict(session, copy, loc, now)
    if kept is not None:
        return kept
    return Verdict(True, "archived and verified in a long-term archive")


def candidates(
    session: Session, now: dt.datetime, *, max_retries: int, limit: int
) -> Select[tuple[PhysicalCopy]]:
    """The copies the deletion manager asks :func:`verdict` about, oldest first.

    Live copies (PRESENT, STAGED) at SOURCE, BUFFER and PROCESSING locations, and failed
    deletions whose back-off has passed; staged files go with their package directory. At
    SOURCE and BUFFER the query also applies, in SQL, conditions every allowed copy meets (a
    copy that fails one would be refused by :func:`verdict` anyway): every package the copy
    holds is ARCHIVED, and the location's retention period is over (unless the location is
    above its high-water mark). :func:`verdict` still decides each copy.

    Why: SOURCE disks hold a copy of every file still in the pipeline, and asking
    :func:`verdict` about each of them (several queries per copy) on every pass took seconds at
    scale; they also filled ``limit`` and could starve deletable copies behind them. One
    branch per copy type (UNION ALL) lets each use its index and join.
    """
    locations = list(
        session.scalars(
            select(DataLocation).where(
                DataLocation.location_type.in_(
                    [LocationType.SOURCE, LocationType.BUFFER, LocationType.PROCESSING]
                )
            )
        )
    )
    processing = [loc.id for loc in locations if loc.location_type == LocationType.PROCESSING]
    upstream = [loc for loc in locations if loc.location_type != LocationType.PROCESSING]
    retained = []
    for loc in upstream:
        if not loc.retention_hours:
            continue
        fill = location_fill(session, loc)
        if (
            fill is not None
            and loc.high_watermark_percent
            and fill * 100 >= loc.high_watermark_percent
        ):
            continue  # disk pressure overrides retention
        retained.append(
            and_(
                PhysicalCopy.data_location_id == loc.id,
                PhysicalCopy.created_at > now - dt.timedelta(hours=loc.retention_hours),
            )
        )
    live = and_(
        PhysicalCopy.status.in_(
            [
                PhysicalCopyStatus.PRESENT,
                PhysicalCopyStatus.STAGED,
                PhysicalCopyStatus.DELETION_FAILED,
            ]
        ),
        or_(
            PhysicalCopy.status != PhysicalCopyStatus.DELETION_FAILED,
            and_(
                PhysicalCopy.retry_count <= max_retries,
                or_(PhysicalCopy.next_attempt_at.is_(None), PhysicalCopy.next_attempt_at <= now),
            ),
        ),
        # staged files go with their package directory
        ~and_(
            PhysicalCopy.copy_type == CopyType.RAW_DATA_FILE,
            PhysicalCopy.status == PhysicalCopyStatus.STAGED,
        ),
    )
    upstream_live = and_(
        live,
        PhysicalCopy.data_location_id.in_([loc.id for loc in upstream] or [-1]),
        ~or_(*retained) if retained else true(),
    )
    pkg = RawDataPackage
    not_archived = [state for state in PackageState if state != PackageState.ARCHIVED]
    in_pipeline = union_all(
        select(RawDataFile.id).where(RawDataFile.raw_data_package_id.is_(None)),
        select(RawDataFile.id)
        .join(pkg, pkg.id == RawDataFile.raw_data_package_id)
        .where(pkg.state.in_(not_archived)),
    ).subquery()
    ids = union_all(
        select(PhysicalCopy.id).where(live, PhysicalCopy.data_location_id.in_(processing or [-1])),
        select(PhysicalCopy.id)
        .join(pkg, pkg.id == PhysicalCopy.raw_data_package_id)
        .where(
            upstream_live,
            PhysicalCopy.copy_type == CopyType.RAW_DATA_PACKAGE,
            pkg.state == PackageState.ARCHIVED,
        ),
        # files: every live SOURCE copy is a file still in the pipeline or one that may go;
        # the ones still in the pipeline are few files of few packages, so they are excluded
        # by an anti-join against that set rather than by a lookup per copy
        select(PhysicalCopy.id)
        .outerjoin(in_pipeline, in_pipeline.c.id == PhysicalCopy.raw_data_file_id)
        .where(
            upstream_live,
            PhysicalCopy.copy_type == CopyType.RAW_DATA_FILE,
            in_pipeline.c.id.is_(None),
        ),
        select(PhysicalCopy.id).where(
            upstream_live,
            PhysicalCopy.copy_type == CopyType.DATA_TRANSFER_PACKAGE,
            select(pkg.id)
            .where(pkg.data_transfer_package_id == PhysicalCopy.data_transfer_package_id)
            .exists(),
            ~select(pkg.id)
            .where(
                pkg.data_transfer_package_id == PhysicalCopy.data_transfer_package_id,
                pkg.state != PackageState.ARCHIVED,
            )
            .exists(),
        ),
    ).subquery()
    first = select(ids.c.id).order_by(ids.c.id).limit(limit)
    return (
        select(PhysicalCopy)
        .where(PhysicalCopy.id.in_(first.scalar_subquery()))
        .order_by(PhysicalCopy.id)
    )
