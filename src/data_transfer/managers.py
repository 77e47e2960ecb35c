"""Managers: one per stage. Each pass scans the database, creates the records the next step
needs, marks them SCHEDULED, commits, and only then submits a task carrying the record id.

Every pass is safe to repeat and safe to interrupt: the records are the state. A task that was
submitted twice finds nothing to claim the second time; a submission lost between commit and
broker is found by the recovery sweeper (SCHEDULED too long) and submitted again.

Run one as a loop (``ccat-transfer manager NAME``), one pass (``--once``), or every manager
one pass in pipeline order (``ccat-transfer run-once``).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
import uuid
import weakref
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import Engine, and_, func, or_, select, update
from sqlalchemy.orm import Session, selectinload

from ccat_ops_db.enums import (
    CopyType,
    ExecutionStatus,
    LocationType,
    PackageState,
    PhysicalCopyStatus,
    Status,
)
from ccat_ops_db.models import (
    DataLocation,
    DataTransfer,
    DataTransferPackage,
    ExecutedObsUnit,
    InstrumentModule,
    LongTermArchiveTransfer,
    PhysicalCopy,
    RawDataFile,
    RawDataPackage,
    StagingJob,
)

from . import deletion, routing, state
from .errors import ConfigurationError, NotStartedError, StalledTaskError
from .heartbeat import Heartbeats, MemoryHeartbeats, task_key
from .queues import Operation, location_queue
from .settings import TransferSettings

log = logging.getLogger("data_transfer.managers")


class Dispatcher(Protocol):
    """Where managers send work: Celery in production, a list or inline in tests."""

    def submit(self, kind: str, payload: Any, queue: str) -> None:
        """Send ``kind`` for ``payload`` (an id or a list of ids) to ``queue``."""
        ...


@dataclass
class PassReport:
    """What one manager pass did."""

    manager: str
    created: int = 0
    scheduled: int = 0
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        extra = f" ({'; '.join(self.notes)})" if self.notes else ""
        return f"{self.manager}: created {self.created}, scheduled {self.scheduled}{extra}"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _due(model: Any) -> Any:
    now = _now()
    return or_(model.next_attempt_at.is_(None), model.next_attempt_at <= now)


def _schedule_and_submit(
    engine: Engine,
    dispatcher: Dispatcher,
    kind: str,
    items: list[tuple[Any, str]],
    report: PassReport,
) -> None:
    """PENDING → SCHEDULED for each (id, queue), commit, then submit."""
    if not items:
        return
    sent: list[tuple[Any, str]] = []
    with Session(engine) as s, s.begin():
        for record_id, queue in items:
            if state.schedule(s, kind, record_id):
                sent.append((record_id, queue))
    for record_id, queue in sent:
        # the record id as the task takes it (an int; the Celery task still accepts a str,
        # as older managers sent staging job ids)
        dispatcher.submit(kind, record_id, queue)
        log.info("submitted %s %s", kind, record_id, extra={"kind": kind, "record_id": record_id})
    report.scheduled += len(sent)


# --- stage 1 --------------------------------------------------------------------------------


def raw_data_packages(
    engine: Engine, settings: TransferSettings, dispatcher: Dispatcher
) -> PassReport:
    """Group unpackaged files per (executed obs unit, module, SOURCE) into packages ≤ the
    size limit, once the obs unit has finished (or gone idle); then schedule the builds."""
    report = PassReport("raw_data_packages")
    idle_before = _now() - dt.timedelta(seconds=settings.raw_package_idle_s)
    with Session(engine) as s, s.begin():
        groups = s.execute(
            select(
                RawDataFile.executed_obs_unit_id,
                RawDataFile.instrument_module_id,
                RawDataFile.source_location_id,
            )
            .join(ExecutedObsUnit, ExecutedObsUnit.id == RawDataFile.executed_obs_unit_id)
            .join(DataLocation, DataLocation.id == RawDataFile.source_location_id)
            .where(
                RawDataFile.raw_data_package_id.is_(None),
                DataLocation.active.is_(True),
                DataLocation.location_type == LocationType.SOURCE,
            )
            .group_by(
                RawDataFile.executed_obs_unit_id,
                RawDataFile.instrument_module_id,
                RawDataFile.source_location_id,
                ExecutedObsUnit.status,
            )
            .having(
                or_(
                    ExecutedObsUnit.status != ExecutionStatus.RUNNING,
                    func.max(RawDataFile.created_at) < idle_before.replace(tzinfo=None),
                )
            )
            .limit(settings.batch_size)
        ).all()
        for eou_id, module_id, source_id in groups:
            report.created += _package_group(s, settings, eou_id, module_id, source_id)
    with Session(engine) as s:
        rows = s.execute(
            select(RawDataPackage.id, RawDataPackage.origin_location_id)
            .where(RawDataPackage.status == Status.PENDING, _due(RawDataPackage))
            .order_by(RawDataPackage.id)
            .limit(settings.batch_size)
        ).all()
        items = [
            (pid, location_queue(_loc(s, lid), Operation.RAW_DATA_PACKAGE_CREATION))
            for pid, lid in rows
        ]
    _schedule_and_submit(engine, dispatcher, "raw_data_package", items, report)
    return report


def _loc(s: Session, loc_id: int) -> DataLocation:
    loc = s.scalar(
        select(DataLocation)
        .where(DataLocation.id == loc_id)
        .options(selectinload(DataLocation.site))
    )
    assert loc is not None
    return loc


def _package_group(
    s: Session, settings: TransferSettings, eou_id: uuid.UUID, module_id: int, source_id: int
) -> int:
    files = list(
        s.execute(
            select(RawDataFile.id, RawDataFile.size)
            .where(
                RawDataFile.executed_obs_unit_id == eou_id,
                RawDataFile.instrument_module_id == module_id,
                RawDataFile.source_location_id == source_id,
                RawDataFile.raw_data_package_id.is_(None),
            )
            .order_by(RawDataFile.relative_path)
        ).all()
    )
    chunks: list[list[uuid.UUID]] = [[]]
    size = 0
    for fid, fsize in files:
        if chunks[-1] and size + fsize > settings.raw_package_max_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(fid)
        size += fsize
    module = s.get(InstrumentModule, module_id)
    source = _loc(s, source_id)
    slug = "".join(
        c if c.isalnum() else "-" for c in (module.name if module else str(module_id))
    ).lower()
    made = 0
    for chunk in chunks:
        if not chunk:
            continue
        name = f"{source.site.short_name}-{eou_id.hex[:12]}-{slug}-{uuid.uuid4().hex[:8]}"
        pkg = RawDataPackage(
            name=name,
            relative_path=f"raw_data_packages/{eou_id}/{name}.tar",
            executed_obs_unit_id=eou_id,
            instrument_module_id=module_id,
            origin_location_id=source_id,
            file_count=len(chunk),
            status=Status.PENDING,
            state=PackageState.WAITING,
            checksum_algorithm=settings.checksum_algorithm,
        )
        s.add(pkg)
        s.flush()
        claimed = s.execute(
            update(RawDataFile)
            .where(RawDataFile.id.in_(chunk), RawDataFile.raw_data_package_id.is_(None))
            .values(raw_data_package_id=pkg.id)
            .execution_options(synchronize_session=False)
        ).rowcount
        if claimed != len(chunk):  # another manager got some of them: give this one up
            s.rollback()
            return made
        made += 1
    return made


# --- stage 2 --------------------------------------------------------------------------------


def transfer_packages(
    engine: Engine, settings: TransferSettings, dispatcher: Dispatcher
) -> PassReport:
    """Bundle finished raw data packages in each BUFFER into transfer packages (size target or
    maximum wait), schedule their builds, and create the primary transfer of each built one."""
    report = PassReport("transfer_packages")
    oldest_ok = _now() - dt.timedelta(seconds=settings.transfer_package_max_wait_s)
    with Session(engine) as s, s.begin():
        rows = s.execute(
            select(
                RawDataPackage.id,
                RawDataPackage.size,
                RawDataPackage.updated_at,
                PhysicalCopy.data_location_id,
            )
            .join(PhysicalCopy, PhysicalCopy.raw_data_package_id == RawDataPackage.id)
            .join(DataLocation, DataLocation.id == PhysicalCopy.data_location_id)
            .where(
                RawDataPackage.status == Status.COMPLETED,
                RawDataPackage.state == PackageState.WAITING,
                RawDataPackage.data_transfer_package_id.is_(None),
                PhysicalCopy.status == PhysicalCopyStatus.PRESENT,
                DataLocation.location_type == LocationType.BUFFER,
            )
            .order_by(RawDataPackage.id)
        ).all()
        by_buffer: dict[int, list[tuple[int, int, dt.datetime]]] = defaultdict(list)
        seen: set[int] = set()
        for pid, size, updated, loc_id in rows:
            if pid in seen:
                continue
            seen.add(pid)
            by_buffer[loc_id].append((pid, size or 0, updated))
        for loc_id, pkgs in by_buffer.items():
            total = sum(p[1] for p in pkgs)
            oldest = min(p[2] for p in pkgs)
            if oldest.tzinfo is None:
                oldest = oldest.replace(tzinfo=dt.UTC)
            if total < settings.transfer_package_target_bytes and oldest > oldest_ok:
                report.notes.append(f"buffer {loc_id}: {total} bytes waiting for more")
                continue
            chunk: list[int] = []
            size = 0
            for pid, psize, _ in pkgs:
                chunk.append(pid)
                size += psize
                if size >= settings.transfer_package_target_bytes:
                    _make_dtp(s, settings, loc_id, chunk)
                    report.created += 1
                    chunk, size = [], 0
            if chunk:
                _make_dtp(s, settings, loc_id, chunk)
                report.created += 1
    with Session(engine) as s:
        rows2 = s.execute(
            select(DataTransferPackage.id, DataTransferPackage.origin_location_id)
            .where(DataTransferPackage.status == Status.PENDING, _due(DataTransferPackage))
            .limit(settings.batch_size)
        ).all()
        items = [
            (i, location_queue(_loc(s, lid), Operation.DATA_TRANSFER_PACKAGE_CREATION))
            for i, lid in rows2
        ]
    _schedule_and_submit(engine, dispatcher, "data_transfer_package", items, report)
    with Session(engine) as s, s.begin():
        # built and not on its way: new, or its way off the site was cancelled (given up)
        built = s.scalars(
            select(DataTransferPackage)
            .where(
                DataTransferPackage.status == Status.COMPLETED,
                ~routing.live_primary(DataTransferPackage.id),
                _due(DataTransferPackage),
            )
            .order_by(DataTransferPackage.id)
            .limit(settings.batch_size)
        ).all()
        stranded: list[str] = []
        for dtp in built:
            try:
                with s.begin_nested():
                    if routing.create_primary_transfer(s, dtp) is not None:
                        report.created += 1
            except ConfigurationError as exc:
                if not routing.given_up_sites(s, dtp.id):
                    raise  # no archive route at all: the topology is wrong, say so loudly
                stranded.append(f"{dtp.name}: {exc}")
                # looked at again after partition_retry_s (a route added, a site back), and
                # meanwhile out of the way of packages that can go
                dtp.next_attempt_at = _now() + dt.timedelta(
                    seconds=max(settings.partition_retry_s, settings.manager_sleep_s, 60.0)
                )
        if stranded:
            report.notes.append(f"{len(stranded)} transfer package(s) with nowhere left to go")
            for line in stranded[:20]:
                log.error("transfer package given up everywhere: %s", line)
    return report


def _make_dtp(s: Session, settings: TransferSettings, loc_id: int, package_ids: list[int]) -> None:
    loc = _loc(s, loc_id)
    stamp = _now().strftime("%Y%m%dT%H%M%S")
    name = f"{loc.site.short_name}-{loc.name}-{stamp}-{uuid.uuid4().hex[:8]}"
    dtp = DataTransferPackage(
        name=name,
        relative_path=f"transfer_packages/{name}.tar",
        origin_location_id=loc_id,
        status=Status.PENDING,
        checksum_algorithm=settings.checksum_algorithm,
    )
    s.add(dtp)
    s.flush()
    s.execute(
        update(RawDataPackage)
        .where(
            RawDataPackage.id.in_(package_ids), RawDataPackage.data_transfer_package_id.is_(None)
        )
        .values(data_transfer_package_id=dtp.id, state=PackageState.TRANSFERRING)
        .execution_options(synchronize_session=False)
    )


# --- stage 3 and 4 ----------------------------------------------------------------------------


#: States of an origin copy that is gone for good: a pending transfer from it is scheduled
#: anyway, and the task rebuilds the copy first (see :func:`transfers`).
ORIGIN_GONE = (PhysicalCopyStatus.DELETED, PhysicalCopyStatus.DELETION_FAILED)


def transfers(engine: Engine, settings: TransferSettings, dispatcher: Dispatcher) -> PassReport:
    """Schedule pending transfers whose package is present at the origin (pull: the queue of
    the destination buffer).

    Also those whose origin copy was built but is gone since (deleted, its deletion failed,
    or its row missing): a leg sent back to PENDING after its origin copy went (a bad copy
    dropped at the destination for a re-fetch, a failed leg revived after a partition) would
    otherwise wait for good. The transfer task finds the copy lost and repairs or rebuilds it
    (:func:`operations.repair_package_copy`) before it copies again. A transfer whose package
    was never built (stage 2 unfinished) still waits; one whose origin copy is being deleted
    waits for the deletion to end (the task re-checks the rules and keeps the copy).
    """
    report = PassReport("transfers")
    with Session(engine) as s:
        rows = s.execute(
            select(DataTransfer.id, DataTransfer.destination_location_id, PhysicalCopy.status)
            .join(
                DataTransferPackage,
                DataTransferPackage.id == DataTransfer.data_transfer_package_id,
            )
            .outerjoin(
                PhysicalCopy,
                and_(
                    PhysicalCopy.data_transfer_package_id == DataTransfer.data_transfer_package_id,
                    PhysicalCopy.data_location_id == DataTransfer.origin_location_id,
                ),
            )
            .where(
                DataTransfer.status == Status.PENDING,
                _due(DataTransfer),
                or_(
                    PhysicalCopy.status == PhysicalCopyStatus.PRESENT,
                    and_(
                        DataTransferPackage.status == Status.COMPLETED,
                        or_(PhysicalCopy.id.is_(None), PhysicalCopy.status.in_(ORIGIN_GONE)),
                    ),
                ),
            )
            .order_by(DataTransfer.id)
            .limit(settings.batch_size)
        ).all()
        items = [(i, location_queue(_loc(s, lid), Operation.DATA_TRANSFER)) for i, lid, _ in rows]
        gone = [i for i, _, status in rows if status != PhysicalCopyStatus.PRESENT]
    if gone:
        report.notes.append(
            f"transfer(s) {', '.join(map(str, gone[:5]))}: origin copy gone, rebuilt by the task"
        )
        log.warning(
            "transfers %s: origin copy gone; scheduled, the task repairs or rebuilds it", gone[:20]
        )
    _schedule_and_submit(engine, dispatcher, "data_transfer", items, report)
    return report


def unpacking(engine: Engine, settings: TransferSettings, dispatcher: Dispatcher) -> PassReport:
    """Schedule the unpack of every completed transfer at its destination buffer."""
    report = PassReport("unpacking")
    with Session(engine) as s:
        rows = s.execute(
            select(DataTransfer.id, DataTransfer.destination_location_id)
            .where(
                DataTransfer.status == Status.COMPLETED,
                DataTransfer.unpack_status == Status.PENDING,
                _due(DataTransfer),  # a full BUFFER sets a time to look again
            )
            .order_by(DataTransfer.id)
            .limit(settings.batch_size)
        ).all()
        items = [
            (i, location_queue(_loc(s, lid), Operation.DATA_TRANSFER_UNPACKING)) for i, lid in rows
        ]
    _schedule_and_submit(engine, dispatcher, "unpack", items, report)
    return report


# --- stage 5 --------------------------------------------------------------------------------


def archive(engine: Engine, settings: TransferSettings, dispatcher: Dispatcher) -> PassReport:
    """For every verified package copy in a buffer of an archive site, one archive transfer per
    archive location of that site; schedule them on the archive's queue."""
    report = PassReport("archive")
    with Session(engine) as s, s.begin():
        ltas = list(
            s.scalars(
                select(DataLocation).where(
                    DataLocation.location_type == LocationType.LONG_TERM_ARCHIVE,
                    DataLocation.active.is_(True),
                )
            )
        )
        for lta in ltas:
            # the site's buffers as a list of ids: the index on (location, type, status) then
            # reads only the present package copies there (a join lets the planner guess)
            buffers = list(
                s.scalars(
                    select(DataLocation.id).where(
                        DataLocation.site_id == lta.site_id,
                        DataLocation.location_type == LocationType.BUFFER,
                    )
                )
            )
            rows = s.execute(
                select(PhysicalCopy.raw_data_package_id, PhysicalCopy.data_location_id)
                .join(RawDataPackage, RawDataPackage.id == PhysicalCopy.raw_data_package_id)
                .where(
                    PhysicalCopy.copy_type == CopyType.RAW_DATA_PACKAGE,
                    PhysicalCopy.status == PhysicalCopyStatus.PRESENT,
                    PhysicalCopy.checksum_verified_at.is_not(None),
                    PhysicalCopy.checksum == RawDataPackage.checksum,
                    PhysicalCopy.data_location_id.in_(buffers or [-1]),
                    ~select(LongTermArchiveTransfer.id)
                    .where(
                        LongTermArchiveTransfer.raw_data_package_id
                        == PhysicalCopy.raw_data_package_id,
                        LongTermArchiveTransfer.destination_location_id == lta.id,
                    )
                    .exists(),
                )
                .limit(settings.batch_size)
            ).all()
            done: set[int] = set()
            for pid, buf_id in rows:
                if pid in done:
                    continue
                done.add(pid)
                s.add(
                    LongTermArchiveTransfer(
                        raw_data_package_id=pid,
                        origin_location_id=buf_id,
                        destination_location_id=lta.id,
                        status=Status.PENDING,
                    )
                )
                report.created += 1
    with Session(engine) as s:
        rows2 = s.execute(
            select(LongTermArchiveTransfer.id, LongTermArchiveTransfer.destination_location_id)
            .where(LongTermArchiveTransfer.status == Status.PENDING, _due(LongTermArchiveTransfer))
            .order_by(LongTermArchiveTransfer.id)
            .limit(settings.batch_size)
        ).all()
        items = [
            (i, location_queue(_loc(s, lid), Operation.LONG_TERM_ARCHIVE_TRANSFER))
            for i, lid in rows2
        ]
    _schedule_and_submit(engine, dispatcher, "long_term_archive_transfer", items, report)
    return report


# --- stage 6 --------------------------------------------------------------------------------


def staging(engine: Engine, settings: TransferSettings, dispatcher: Dispatcher) -> PassReport:
    """Pick an archive holding every package of each pending staging job (same site as the
    destination first), then schedule the job on the PROCESSING location's queue."""
    report = PassReport("staging")
    items: list[tuple[Any, str]] = []
    with Session(engine) as s, s.begin():
        jobs = s.scalars(
            select(StagingJob)
            .where(
                StagingJob.status == Status.PENDING, StagingJob.active.is_(True), _due(StagingJob)
            )
            .options(selectinload(StagingJob.raw_data_packages))
            .limit(settings.batch_size)
        ).all()
        for job in jobs:
            ids = [p.id for p in job.raw_data_packages]
            if job.origin_location_id is None:
                cands = s.execute(
                    select(PhysicalCopy.data_location_id, func.count())
                    .join(DataLocation, DataLocation.id == PhysicalCopy.data_location_id)
                    .where(
                        PhysicalCopy.raw_data_package_id.in_(ids or [-1]),
                        PhysicalCopy.status == PhysicalCopyStatus.PRESENT,
                        PhysicalCopy.checksum_verified_at.is_not(None),
                        DataLocation.location_type == LocationType.LONG_TERM_ARCHIVE,
                        DataLocation.active.is_(True),
                    )
                    .group_by(PhysicalCopy.data_location_id)
                ).all()
                full = [lid for lid, n in cands if n == len(ids)]
                if not full:
                    report.notes.append(f"job {job.id}: packages not all archived yet")
                    continue
                dest_site = job.destination_location.site_id
                full.sort(key=lambda lid: (_loc(s, lid).site_id != dest_site, lid))
                job.origin_location_id = full[0]
            items.append((job.id, location_queue(job.destination_location, Operation.STAGING)))
    _schedule_and_submit(engine, dispatcher, "staging_job", items, report)
    return report


# --- stage 7 --------------------------------------------------------------------------------


#: Candidate windows one deletion pass reads at most while each comes back full and without
#: a copy the rules allow (so that a single pass, ``--once``, gets past refused copies too).
DELETION_WINDOWS_PER_PASS = 5

_deletion_cursors: dict[str, int] = {}
_deletion_cursors_lock = threading.Lock()


def _cursor_key(engine: Engine) -> str:
    """The database an engine talks to (one deletion cursor per database); a Connection
    passed for an engine (the scale benchmark does) counts as its engine."""
    return engine.engine.url.render_as_string(hide_password=True)


def reset_deletion_cursor(engine: Engine | None = None) -> None:
    """Forget where the deletion manager's scan stopped (for ``engine``'s database, or all):
    the next pass starts from the lowest candidate id, as a fresh process does."""
    with _deletion_cursors_lock:
        if engine is None:
            _deletion_cursors.clear()
        else:
            _deletion_cursors.pop(_cursor_key(engine), None)


def deletions(engine: Engine, settings: TransferSettings, dispatcher: Dispatcher) -> PassReport:
    """Schedule the deletion of every copy the rules allow, one task per location and package.

    Candidates (:func:`deletion.candidates`): live copies at SOURCE, BUFFER and PROCESSING,
    and failed deletions whose back-off has passed, less those the rules refuse for sure (a
    package not ARCHIVED, retention). Every candidate goes through :func:`deletion.verdicts`.

    Candidates are read in windows of ``batch_size * 20`` by id, from where the last pass on
    this database stopped (a cursor kept in this process), back to the start once a window
    comes back short. A window that is full and has nothing allowed is followed by the next
    one, up to :data:`DELETION_WINDOWS_PER_PASS`. So copies refused for long (held by an active
    staging job, needed by a secondary transfer) cannot fill every window: every candidate is
    asked about within a bounded number of passes.
    """
    report = PassReport("deletion")
    batches: dict[tuple[int, Any], list[int]] = defaultdict(list)
    now = _now()
    limit = settings.batch_size * 20
    key = _cursor_key(engine)
    with _deletion_cursors_lock:
        after = start = _deletion_cursors.get(key, 0)
    wrapped = False
    with Session(engine) as s, s.begin():
        for _ in range(DELETION_WINDOWS_PER_PASS):
            copies = s.scalars(
                deletion.candidates(
                    s, now, max_retries=settings.max_retries, limit=limit, after=after
                )
            ).all()
            decided = deletion.verdicts(s, copies, now)
            allowed = [c for c in copies if decided[c.id].allowed]
            held = deletion.packages_held_many(s, allowed)
            for copy in allowed:
                copy.status = PhysicalCopyStatus.DELETION_SCHEDULED
                group_key = held[copy.id] if copy.raw_data_file_id else None
                group = (copy.data_location_id, tuple(group_key) if group_key else copy.id)
                batches[group].append(copy.id)
            short = len(copies) < limit
            after = 0 if short else copies[-1].id
            if allowed or (short and (wrapped or start == 0)):
                break  # work found, or every candidate asked about in this pass
            wrapped = wrapped or short
    with _deletion_cursors_lock:
        _deletion_cursors[key] = after
    with Session(engine) as s:
        items = [
            (ids, location_queue(_loc(s, loc_id), Operation.DELETION))
            for (loc_id, _), ids in batches.items()
        ]
    for ids, queue in items:
        dispatcher.submit("deletion", ids, queue)
        report.scheduled += len(ids)
    return report


# --- recovery and fixity ------------------------------------------------------------------------


def recovery(
    engine: Engine,
    settings: TransferSettings,
    dispatcher: Dispatcher,
    heartbeats: Heartbeats | None = None,
) -> PassReport:
    """Reset stalled work without a person: IN_PROGRESS records whose task heartbeat stopped
    (worker died), SCHEDULED records whose task never started, and deletions stuck in progress.
    Each reset of a task that ran counts as a failed attempt with a reason that says what
    happened; a task that never started is submitted again without counting one. Missing
    heartbeats are believed only once the heartbeat store is older than a heartbeat's time to
    live (after a Redis restart, live tasks need one interval to beat again)."""
    report = PassReport("recovery")
    hb = heartbeats or MemoryHeartbeats()
    now = _now()
    stale = now - dt.timedelta(seconds=settings.stale_after_s)
    too_long = now - dt.timedelta(seconds=settings.scheduled_timeout_s)
    # a heartbeat store that has just lost its keys (Redis restarted without persistence)
    # cannot tell a dead task from a live one until every live task has beaten again
    trusted = hb.memory_s() >= settings.stale_after_s
    skipped = 0
    with Session(engine) as s, s.begin():
        for name, kind in state.KINDS.items():
            col = getattr(kind.model, kind.status)
            for rec in s.scalars(
                select(kind.model)
                .where(
                    col.in_([Status.IN_PROGRESS, Status.SCHEDULED]),
                    kind.model.updated_at < stale.replace(tzinfo=None),
                )
                # locked from the read to the write: a claim, a result or an operator's action
                # landing in between would otherwise be overwritten by this reset (a SCHEDULED
                # record claimed meanwhile went back to PENDING and ran twice); a row someone
                # holds right now is not stalled, and is looked at again next pass
                .with_for_update(of=kind.model, skip_locked=True)
            ):
                status = getattr(rec, kind.status)
                if status == Status.IN_PROGRESS and hb.alive(task_key(name, rec.id)):
                    continue
                if status == Status.IN_PROGRESS and not trusted:
                    skipped += 1
                    continue
                updated = (
                    rec.updated_at.replace(tzinfo=dt.UTC)
                    if rec.updated_at.tzinfo is None
                    else rec.updated_at
                )
                if status == Status.SCHEDULED and updated > too_long:
                    continue
                waited = int((now - updated).total_seconds())
                if status == Status.IN_PROGRESS:
                    reason = StalledTaskError(
                        f"no heartbeat for {waited} s: the worker died or lost the task"
                    )
                else:  # it never ran: not a failed attempt
                    reason = NotStartedError(
                        f"task not started {waited} s after it was scheduled: submitted again"
                    )
                state.record_failure(s, rec, name, reason, settings)
                column = state.next_attempt_column(rec, kind)
                if column and getattr(rec, kind.status) == Status.PENDING:
                    setattr(rec, column, None)
                report.created += 1
        stuck = s.scalars(
            select(PhysicalCopy)
            .where(
                PhysicalCopy.status.in_(
                    [PhysicalCopyStatus.DELETION_IN_PROGRESS, PhysicalCopyStatus.DELETION_SCHEDULED]
                ),
                PhysicalCopy.updated_at < too_long.replace(tzinfo=None),
            )
            .with_for_update(of=PhysicalCopy, skip_locked=True)  # a result landing meanwhile
        ).all()
        for copy in stuck:
            copy.status = PhysicalCopyStatus.DELETION_FAILED
            copy.failure_reason = "StalledTask: deletion did not finish; will be retried"
            report.created += 1
        revived = _revive_after_partition(s, settings, now)
    if report.created:
        report.notes.append(f"reset {report.created} stalled records")
    if skipped:
        report.notes.append(
            f"{skipped} tasks without a heartbeat left alone: the heartbeat store is younger "
            f"than {settings.stale_after_s:g} s (restarted?)"
        )
        log.warning("recovery: heartbeat store just (re)started; %d tasks checked later", skipped)
    if revived:
        report.created += revived
        report.notes.append(f"retrying {revived} transfers failed by an unreachable route")
    return report


def _revive_after_partition(s: Session, settings: TransferSettings, now: dt.datetime) -> int:
    """Transfers FAILED for a network or storage reason get a fresh round of retries once
    ``partition_retry_s`` has passed since their last failure: a cut-off site heals without a
    person, at most one round of ``max_retries`` attempts per period (no retry storm)."""
    if settings.partition_retry_s <= 0:
        return 0
    before = now - dt.timedelta(seconds=settings.partition_retry_s)
    failed = s.scalars(
        select(DataTransfer)
        .where(
            DataTransfer.status == Status.FAILED,
            DataTransfer.last_failure_at < before,
            or_(*(DataTransfer.failure_reason.startswith(r) for r in state.PARTITION_REASONS)),
        )
        # an operator's cancel or retry landing between the read and the write is not undone
        .with_for_update(of=DataTransfer, skip_locked=True)
    ).all()
    for t in failed:
        t.status = Status.PENDING
        t.retry_count = 0
        t.next_attempt_at = None
        t.failure_reason = f"retrying after the route failed: {t.failure_reason}"[:1990]
    return len(failed)


def fixity(engine: Engine, settings: TransferSettings, dispatcher: Dispatcher) -> PassReport:
    """Queue archived copies for re-verification, oldest check first, within a byte budget.

    A copy sent for a check is leased (its ``next_attempt_at`` set ``scheduled_timeout_s``
    ahead; the task clears it), so later passes do not send it again while it waits in the
    queue, and the bytes of the leased copies count against ``fixity_bytes_per_pass``: at most
    that much is queued or being read at any time, however slow the workers. A copy found bad
    with nothing to repair it from is checked again only after a back-off, so it cannot keep
    the copies behind it from their turn.
    """
    report = PassReport("fixity")
    now = _now()
    naive_now = now.replace(tzinfo=None)
    due_before = now - dt.timedelta(days=settings.fixity_interval_days)
    with Session(engine) as s, s.begin():
        at_archive = (
            select(PhysicalCopy)
            .join(DataLocation, DataLocation.id == PhysicalCopy.data_location_id)
            .where(
                DataLocation.location_type == LocationType.LONG_TERM_ARCHIVE,
                PhysicalCopy.copy_type == CopyType.RAW_DATA_PACKAGE,
                PhysicalCopy.status == PhysicalCopyStatus.PRESENT,
            )
        )
        in_flight = (
            s.scalar(
                at_archive.where(
                    PhysicalCopy.next_attempt_at > naive_now,
                    PhysicalCopy.last_failure_at.is_(None),
                ).with_only_columns(func.coalesce(func.sum(PhysicalCopy.size), 0))
            )
            or 0
        )
        budget = settings.fixity_bytes_per_pass - int(in_flight)
        if budget <= 0:
            report.notes.append(f"{in_flight} bytes still queued or being checked")
            return report
        free = at_archive.where(
            (PhysicalCopy.next_attempt_at.is_(None)) | (PhysicalCopy.next_attempt_at <= naive_now)
        )
        # Oldest check first, never-verified copies before all others: the order
        # (checksum_verified_at NULLS FIRST, id), read as two index range scans.
        copies = list(
            s.scalars(
                free.where(PhysicalCopy.checksum_verified_at.is_(None))
                .order_by(PhysicalCopy.id)
                .limit(settings.batch_size)
                .with_for_update(of=PhysicalCopy, skip_locked=True)
            )
        )
        if len(copies) < settings.batch_size:
            copies += s.scalars(
                free.where(PhysicalCopy.checksum_verified_at < due_before.replace(tzinfo=None))
                .order_by(PhysicalCopy.checksum_verified_at, PhysicalCopy.id)
                .limit(settings.batch_size - len(copies))
                .with_for_update(of=PhysicalCopy, skip_locked=True)
            ).all()
        lease_until = naive_now + dt.timedelta(seconds=settings.scheduled_timeout_s)
        items = []
        for copy in copies:
            if budget <= 0:
                break
            budget -= copy.size or 0
            copy.next_attempt_at = lease_until
            copy.last_failure_at = None
            items.append(
                (copy.id, location_queue(_loc(s, copy.data_location_id), Operation.FIXITY))
            )
    for cid, queue in items:
        dispatcher.submit("fixity", cid, queue)
        report.scheduled += 1
    return report


ManagerFn = Callable[[Engine, TransferSettings, Dispatcher], PassReport]


#: When the notify pass last ran, per engine (this process).
_NOTIFY_LAST: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()


def notifications(engine: Engine, settings: TransferSettings, dispatcher: Dispatcher) -> PassReport:
    """Operator notices (:mod:`data_transfer.notify`): record what needs a person and send
    each configured channel what is due to it, at most every ``notify_check_s``. Submits no
    task."""
    from .notify import run_notify_pass

    now = time.monotonic()
    last = _NOTIFY_LAST.get(engine)
    if last is not None and now - last < settings.notify_check_s:
        return PassReport("notify")
    _NOTIFY_LAST[engine] = now
    done = run_notify_pass(engine, settings)
    report = PassReport("notify", created=done.opened)
    if done.skipped:
        report.notes.append("another notify manager holds the lock")
    if done.cleared:
        report.notes.append(f"{done.cleared} cleared")
    report.notes.extend(f"told {name} of {n}" for name, n in done.sent.items())
    report.notes.extend(f"{name} failed: {why}" for name, why in done.failed.items())
    return report


#: The managers in pipeline order (``run-once`` runs them in this order).
MANAGERS: dict[str, ManagerFn] = {
    "raw_data_packages": raw_data_packages,
    "transfer_packages": transfer_packages,
    "transfers": transfers,
    "unpacking": unpacking,
    "archive": archive,
    "staging": staging,
    "deletion": deletions,
    "recovery": recovery,  # type: ignore[dict-item]
    "fixity": fixity,
    "notify": notifications,
}


def run_pass(
    name: str,
    engine: Engine,
    settings: TransferSettings,
    dispatcher: Dispatcher,
    heartbeats: Heartbeats | None = None,
) -> PassReport:
    """One pass of manager ``name`` (``all``: every manager once, in pipeline order)."""
    if name == "all":
        total = PassReport("all")
        for each in MANAGERS:
            r = run_pass(each, engine, settings, dispatcher, heartbeats)
            total.created += r.created
            total.scheduled += r.scheduled
            total.notes.extend(f"{each}: {n}" for n in r.notes[:2])
        return total
    fn = MANAGERS[name]
    if name == "recovery":
        return recovery(engine, settings, dispatcher, heartbeats)
    return fn(engine, settings, dispatcher)


def run_loop(
    name: str,
    engine: Engine,
    settings: TransferSettings,
    dispatcher: Dispatcher,
    *,
    heartbeats: Heartbeats | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    """Poll → dispatch → sleep until ``should_stop()``; errors are logged and the loop goes on."""
    while not should_stop():
        try:
            report = run_pass(name, engine, settings, dispatcher, heartbeats)
            if report.created or report.scheduled:
                log.info("%s", report)
        except Exception:
            log.exception("manager %s: pass failed; retrying after the sleep", name)
        if heartbeats is not None:
            try:  # Redis away: the health key lapses, the loop goes on and beats again later
                heartbeats.beat(
                    f"health:data_transfer:manager_{name}", max(90.0, settings.manager_sleep_s * 3)
                )
            except Exception as exc:
                log.warning("manager %s: could not refresh its health key: %s", name, exc)
        deadline = time.monotonic() + settings.manager_sleep_s
        while time.monotonic() < deadline and not should_stop():
            time.sleep(min(0.5, settings.manager_sleep_s))
