"""The deletion rules, in one place. Every deletion (manager and task) asks :func:`verdicts`
(a batch of copies) or :func:`verdict` (one copy, the same rules).

A copy at a SOURCE or BUFFER location may go only when every raw data package it holds

1. has a copy in at least one LONG_TERM_ARCHIVE location,
2. whose checksum was verified there (``checksum_verified_at`` set, checksum equal to the
   package's), and
3. is marked ARCHIVED.

On top of that, a copy is kept while the pipeline still needs it: a transfer package while a
transfer from or an unpack at its location is unfinished, and at the sending end also until the
destination has unpacked and verified what it received (a bad copy found there is fetched
again from here) and while that transfer is FAILED for a network reason (it will be revived);
a raw data package tar in a buffer while an archive transfer from it is unfinished or an
archive at its site still lacks it.
Temporary copies (any location with ``retention_hours``) stay for their retention period unless
the location is above its high-water mark. Copies in PROCESSING stay while an active staging
job needs them. Copies in a LONG_TERM_ARCHIVE are never deleted by the pipeline.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, func, or_, select, true, union_all
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

from .state import PARTITION_REASONS

ACTIVE = (Status.PENDING, Status.SCHEDULED, Status.IN_PROGRESS)


def staging_job_in_force(now: dt.datetime) -> ColumnElement[bool]:
    """A staging job whose copies must stay: active (not released) and not expired."""
    return StagingJob.active.is_(True) & (
        StagingJob.expires_at.is_(None) | (StagingJob.expires_at > now)
    )


LIVE_COPY = (PhysicalCopyStatus.PRESENT, PhysicalCopyStatus.STAGED)
DELETABLE_STATUS = (
    PhysicalCopyStatus.PRESENT,
    PhysicalCopyStatus.STAGED,
    PhysicalCopyStatus.DELETION_SCHEDULED,
    PhysicalCopyStatus.DELETION_FAILED,
)


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
    return packages_held_many(session, [copy])[copy.id]


def packages_held_many(session: Session, copies: Sequence[PhysicalCopy]) -> dict[int, list[int]]:
    """:func:`packages_held` for many copies: at most one query per copy type."""
    file_ids = {c.raw_data_file_id for c in copies if c.copy_type == CopyType.RAW_DATA_FILE}
    dtp_ids = {
        c.data_transfer_package_id for c in copies if c.copy_type == CopyType.DATA_TRANSFER_PACKAGE
    }
    file_pkg: dict[Any, int | None] = {}
    for chunk in _chunks(file_ids):
        file_pkg.update(
            session.execute(
                select(RawDataFile.id, RawDataFile.raw_data_package_id).where(
                    RawDataFile.id.in_(chunk)
                )
            ).all()
        )
    dtp_pkgs: dict[Any, list[int]] = defaultdict(list)
    for chunk in _chunks(dtp_ids):
        for dtp_id, pkg_id in session.execute(
            select(RawDataPackage.data_transfer_package_id, RawDataPackage.id)
            .where(RawDataPackage.data_transfer_package_id.in_(chunk))
            .order_by(RawDataPackage.id)
        ):
            dtp_pkgs[dtp_id].append(pkg_id)
    held: dict[int, list[int]] = {}
    for c in copies:
        if c.copy_type == CopyType.RAW_DATA_PACKAGE:
            held[c.id] = [c.raw_data_package_id]  # type: ignore[list-item]
        elif c.copy_type == CopyType.RAW_DATA_FILE:
            pkg = file_pkg.get(c.raw_data_file_id)
            held[c.id] = [pkg] if pkg is not None else []
        else:
            held[c.id] = list(dtp_pkgs.get(c.data_transfer_package_id, []))
    return held


def _chunks(values: Iterable[Any], size: int = 5000) -> Iterator[list[Any]]:
    """``values`` in lists of at most ``size`` (bounded IN lists)."""
    items = [v for v in values if v is not None]
    for i in range(0, len(items), size):
        yield items[i : i + size]


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


def verdict(session: Session, copy: PhysicalCopy, now: dt.datetime | None = None) -> Verdict:
    """May ``copy`` be deleted now? Every deletion goes through here or :func:`verdicts`."""
    return verdicts(session, [copy], now)[copy.id]


def verdicts(
    session: Session, copies: Sequence[PhysicalCopy], now: dt.datetime | None = None
) -> dict[int, Verdict]:
    """May each of ``copies`` be deleted now? The rules, applied to a batch.

    The same decision for each copy as if it were asked about alone; the facts the rules read
    (packages held, archive copies, unfinished transfers, staging jobs, fill levels) are read
    with one query per kind for the whole batch, in the caller's transaction.
    """
    return _Rules(session, copies, now or dt.datetime.now(dt.UTC)).decide()


class _Rules:
    """The facts the rules need for one batch of copies, read once, and the decision."""

    def __init__(self, session: Session, copies: Sequence[PhysicalCopy], now: dt.datetime):
        self.s, self.copies, self.now = session, copies, now
        self.locations = {
            loc_id: session.get(DataLocation, loc_id)
            for loc_id in {c.data_location_id for c in copies}
        }
        self.fill: dict[int, float | None] = {}

    def decide(self) -> dict[int, Verdict]:
        out: dict[int, Verdict] = {}
        asked: list[PhysicalCopy] = []
        for c in self.copies:
            loc = self.locations[c.data_location_id]
            assert loc is not None
            if c.status not in DELETABLE_STATUS:
                out[c.id] = Verdict(False, f"copy is {c.status}")
            elif loc.location_type == LocationType.LONG_TERM_ARCHIVE:
                out[c.id] = Verdict(False, "archive copies are never deleted by the pipeline")
            else:
                asked.append(c)
        if not asked:
            return out
        held = packages_held_many(self.s, asked)
        processing: list[PhysicalCopy] = []
        upstream: list[PhysicalCopy] = []
        for c in asked:
            loc = self.locations[c.data_location_id]
            is_processing = loc is not None and loc.location_type == LocationType.PROCESSING
            (processing if is_processing else upstream).append(c)
        needed = self._staging_needs({p for c in processing for p in held[c.id]})
        for c in processing:
            if any((p, c.data_location_id) in needed for p in held[c.id]):
                out[c.id] = Verdict(False, "needed by an active staging job")
            else:
                out[c.id] = Verdict(True, "no active staging job needs it")
        # SOURCE and BUFFER: the three rules first.
        archived = archived_package_ids(self.s, (p for c in upstream for p in held[c.id]))
        passed: list[PhysicalCopy] = []
        for c in upstream:
            if not held[c.id]:
                out[c.id] = Verdict(False, "not in any raw data package yet")
                continue
            missing = [p for p in held[c.id] if p not in archived]
            if missing:
                out[c.id] = Verdict(
                    False,
                    f"raw data package(s) {', '.join(map(str, sorted(missing)[:5]))} not yet "
                    "ARCHIVED with a verified archive copy",
                )
                continue
            passed.append(c)
        # Still needed by the pipeline at this location?
        busy_dtp = self._busy_transfer_packages(passed)
        busy_archive, in_ltas, site_ltas = self._archive_facts(passed)
        for c in passed:
            loc = self.locations[c.data_location_id]
            assert loc is not None
            if (c.data_transfer_package_id, loc.id) in busy_dtp:
                out[c.id] = Verdict(
                    False, "a transfer or unpack of this package is unfinished here"
                )
                continue
            if c.copy_type == CopyType.RAW_DATA_PACKAGE:
                if (c.raw_data_package_id, loc.id) in busy_archive:
                    out[c.id] = Verdict(False, "an archive transfer from this copy is unfinished")
                    continue
                if any(
                    (c.raw_data_package_id, lta) not in in_ltas
                    for lta in site_ltas.get(loc.site_id, [])
                ):
                    out[c.id] = Verdict(False, "an archive at this site does not hold it yet")
                    continue
            kept = self._retention(c, loc)
            out[c.id] = kept or Verdict(True, "archived and verified in a long-term archive")
        return out

    def _staging_needs(self, packages: set[int]) -> set[tuple[int, int]]:
        """(package, PROCESSING location) pairs an active staging job needs."""
        if not packages:
            return set()
        link = staging_job_raw_data_package
        rows = self.s.execute(
            select(link.c.raw_data_package_id, StagingJob.destination_location_id)
            .join(StagingJob, StagingJob.id == link.c.staging_job_id)
            .where(
                link.c.raw_data_package_id.in_(packages),
                staging_job_in_force(self.now),
            )
        )
        return {(pkg, loc) for pkg, loc in rows}

    def _busy_transfer_packages(self, copies: list[PhysicalCopy]) -> set[tuple[int, int]]:
        """(transfer package, location) pairs with a transfer from, or a transfer or unpack
        into, that location unfinished.

        The origin stays busy until the destination has unpacked and verified what it got (an
        unpack that finds the copy bad drops it and sets the transfer back to PENDING, to
        fetch it again from the origin), and while the transfer is FAILED for a network or
        storage reason: the recovery manager revives such a leg after ``partition_retry_s``,
        and it needs the origin's copy then (a destination worker that reaches the origin
        over ssh cannot rebuild it). A leg FAILED for another reason (configuration, a
        refused copy) holds nothing: a person retries it, and the copy is rebuilt where the
        origin is mounted, or fails with the reason.
        """
        ids = {
            c.data_transfer_package_id
            for c in copies
            if c.copy_type == CopyType.DATA_TRANSFER_PACKAGE
        }
        if not ids:
            return set()
        busy: set[tuple[int, int]] = set()
        for dtp, origin, dest, status, unpack, reason in self.s.execute(
            select(
                DataTransfer.data_transfer_package_id,
                DataTransfer.origin_location_id,
                DataTransfer.destination_location_id,
                DataTransfer.status,
                DataTransfer.unpack_status,
                DataTransfer.failure_reason,
            ).where(
                DataTransfer.data_transfer_package_id.in_(ids),
                DataTransfer.status.in_((*ACTIVE, Status.FAILED))
                | DataTransfer.unpack_status.in_(ACTIVE),
            )
        ):
            revived_later = status == Status.FAILED and (reason or "").startswith(PARTITION_REASONS)
            if (
                status in ACTIVE
                or revived_later
                or (status == Status.COMPLETED and unpack in ACTIVE)
            ):
                busy.add((dtp, origin))
            if status in ACTIVE or unpack in ACTIVE:
                busy.add((dtp, dest))
        return busy

    def _archive_facts(
        self, copies: list[PhysicalCopy]
    ) -> tuple[set[tuple[int, int]], set[tuple[int, int]], dict[int, list[int]]]:
        """For raw data package copies: (package, origin) pairs with an archive transfer
        unfinished; (package, archive) pairs with a present, verified copy there; the active
        archive locations of each site."""
        pkgs = {c.raw_data_package_id for c in copies if c.copy_type == CopyType.RAW_DATA_PACKAGE}
        if not pkgs:
            return set(), set(), {}
        busy = {
            (pkg, origin)
            for pkg, origin in self.s.execute(
                select(
                    LongTermArchiveTransfer.raw_data_package_id,
                    LongTermArchiveTransfer.origin_location_id,
                ).where(
                    LongTermArchiveTransfer.raw_data_package_id.in_(pkgs),
                    LongTermArchiveTransfer.status.in_(ACTIVE),
                )
            )
        }
        site_ltas: dict[int, list[int]] = defaultdict(list)
        for site_id, loc_id in self.s.execute(
            select(DataLocation.site_id, DataLocation.id).where(
                DataLocation.location_type == LocationType.LONG_TERM_ARCHIVE,
                DataLocation.active.is_(True),
            )
        ):
            site_ltas[site_id].append(loc_id)
        there = {
            (pkg, loc)
            for pkg, loc in self.s.execute(
                select(PhysicalCopy.raw_data_package_id, PhysicalCopy.data_location_id).where(
                    PhysicalCopy.raw_data_package_id.in_(pkgs),
                    PhysicalCopy.data_location_id.in_(
                        [loc for ltas in site_ltas.values() for loc in ltas] or [-1]
                    ),
                    PhysicalCopy.status == PhysicalCopyStatus.PRESENT,
                    PhysicalCopy.checksum_verified_at.is_not(None),
                )
            )
        }
        return busy, there, site_ltas

    def _retention(self, copy: PhysicalCopy, loc: DataLocation) -> Verdict | None:
        """Kept for the location's retention period, unless the location is above its
        high-water mark (disk pressure overrides retention)."""
        if not loc.retention_hours:
            return None
        created = copy.created_at
        if created.tzinfo is None:
            created = created.replace(tzinfo=dt.UTC)
        keep_until = created + dt.timedelta(hours=loc.retention_hours)
        if self.now >= keep_until:
            return None
        if loc.id not in self.fill:
            self.fill[loc.id] = location_fill(self.s, loc)
        fill = self.fill[loc.id]
        if (
            fill is not None
            and loc.high_watermark_percent
            and fill * 100 >= loc.high_watermark_percent
        ):
            return None
        return Verdict(False, f"retention: kept until {keep_until.isoformat(timespec='seconds')}")


def candidates(
    session: Session, now: dt.datetime, *, max_retries: int, limit: int, after: int = 0
) -> Select[tuple[PhysicalCopy]]:
    """The copies the deletion manager asks :func:`verdict` about: the first ``limit`` by id
    above ``after`` (keyset pagination; the manager moves ``after`` on from pass to pass, so
    copies the rules refuse for long, e.g. ones an active staging job holds, do not fill every
    window and hide the copies behind them).

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
        PhysicalCopy.id > after,
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
