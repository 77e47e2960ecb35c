"""Prometheus metrics of the transfer system.

Workers count what they do (tasks done and failed by exception class, bytes moved per stage
and per route, task durations) and report the disk use of the locations they reach
(:class:`LocationDiskCollector`). Managers serve the pipeline's state from the database at
scrape time (:class:`PipelineCollector`): per stage, how many records wait, run, finished and
failed, failures by reason class, and per stage and site the backlog and the age of its oldest
item — so a dashboard shows what is stuck without a log search. The full list with labels is in
``docs/observability.md``.

This module imports only SQLAlchemy, prometheus_client and the ops-db models (the transfer
state machine is imported where needed), so the API's status page can reuse :func:`backlog`.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, aliased

from ccat_ops_db.enums import CopyType, PackageState, PhysicalCopyStatus, Status
from ccat_ops_db.models import (
    DataLocation,
    DataTransfer,
    DataTransferPackage,
    DiskDataLocation,
    LongTermArchiveTransfer,
    PhysicalCopy,
    RawDataFile,
    RawDataPackage,
    Site,
    StagingJob,
)

log = logging.getLogger("data_transfer.metrics")

_TASKS = Counter(
    "ccat_transfer_tasks_total",
    "Transfer tasks finished, by stage, result and the site of the worker that ran them",
    ["stage", "result", "site"],
)
_FAILURES = Counter(
    "ccat_transfer_task_failures_total",
    "Transfer task failures, by stage and exception class",
    ["stage", "reason"],
)
_BYTES = Counter("ccat_transfer_bytes_total", "Bytes written, by stage", ["stage"])
_ROUTE_BYTES = Counter(
    "ccat_transfer_route_bytes_total",
    "Bytes moved between sites, by source site, destination site and method",
    ["source_site", "dest_site", "method"],
)
_SECONDS = Histogram(
    "ccat_transfer_task_seconds",
    "Task duration, by stage",
    ["stage"],
    buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600),
)


class TaskMetrics:
    """Counters the workers update.

    ``site`` is the worker's ``--site`` (set by :func:`serve`; empty where tasks run inline):
    the site whose queues the worker serves, the same site the managers' backlog gauges name,
    so a stage that stalls at one site shows even while it progresses at another.
    """

    site: str = ""

    def start_at_zero(self, stages: Iterable[str]) -> None:
        """Export the done and failed counts of ``stages`` at 0 from the start. A series that
        first appears at 1 is no increase to ``rate()`` / ``increase()``, so the first task a
        worker finishes after a (re)start would be missed (CCATTransferStalled reads them)."""
        for stage in stages:
            for result in ("done", "failed"):
                _TASKS.labels(stage, result, self.site)

    def done(self, stage: str, seconds: float) -> None:
        """A task of ``stage`` finished."""
        _TASKS.labels(stage, "done", self.site).inc()
        if seconds:
            _SECONDS.labels(stage).observe(seconds)

    def failed(self, stage: str, reason: str) -> None:
        """A task of ``stage`` failed with exception class ``reason``."""
        _TASKS.labels(stage, "failed", self.site).inc()
        _FAILURES.labels(stage, reason).inc()

    def bytes(self, stage: str, n: int) -> None:
        """``n`` bytes written by ``stage``."""
        _BYTES.labels(stage).inc(n)

    def route_bytes(self, source_site: str, dest_site: str, method: str, n: int) -> None:
        """``n`` bytes moved from ``source_site`` to ``dest_site`` by ``method``."""
        _ROUTE_BYTES.labels(source_site, dest_site, method).inc(n)


TASK_METRICS = TaskMetrics()


def pipeline_counts(engine: Engine) -> dict[str, dict[str, int]]:
    """Records per stage and status, from the database."""
    from .state import KINDS

    out: dict[str, dict[str, int]] = {}
    with Session(engine) as s:
        for name, kind in KINDS.items():
            col = getattr(kind.model, kind.status)
            rows = s.execute(select(col, func.count()).group_by(col)).all()
            out[name] = {str(status): int(n) for status, n in rows}
    return out


def failure_reasons(
    engine: Engine, statuses: tuple[str, ...] = ("failed",)
) -> dict[tuple[str, str], int]:
    """Records in ``statuses`` (FAILED by default) that carry a reason, per stage and
    exception class (the text before the first colon). With ``("pending", "scheduled")``:
    what is waiting (a full BUFFER, a copy being deleted, a task no worker started) or
    retrying, and why."""
    from .state import KINDS

    out: dict[tuple[str, str], int] = {}
    with Session(engine) as s:
        for name, kind in KINDS.items():
            col = getattr(kind.model, kind.status)
            reason_col = getattr(kind.model, kind.failure_reason)
            query = select(reason_col).where(col.in_(statuses))
            if statuses != ("failed",):
                query = query.where(reason_col.is_not(None))
            for (reason,) in s.execute(query).all():
                cls = (reason or "unknown").split(":", 1)[0][:64]
                out[(name, cls)] = out.get((name, cls), 0) + 1
    return out


def failed_records(engine: Engine, limit: int = 20) -> list[tuple[str, int, str, str]]:
    """``(stage, id, name, reason)`` of records FAILED for good, the most recent failures
    first, at most ``limit`` per stage; the name is the package's where the record has one.
    The reason carries the exception, its message and the log path (``state.describe_error``).
    """
    from .state import KINDS

    out: list[tuple[str, int, str, str]] = []
    with Session(engine) as s:
        for name, kind in KINDS.items():
            model = kind.model
            label = getattr(model, "name", None)
            query = (
                select(model.id, label if label is not None else model.id)
                .add_columns(getattr(model, kind.failure_reason))
                .where(getattr(model, kind.status) == Status.FAILED)
                .order_by(model.last_failure_at.desc().nulls_last(), model.id.desc())
                .limit(limit)
            )
            for rid, title, reason in s.execute(query):
                shown = str(title) if label is not None else f"{name} {rid}"
                out.append((name, int(rid), shown, reason or "(no reason recorded)"))
    return out


NOT_DONE = (Status.PENDING, Status.SCHEDULED, Status.IN_PROGRESS)


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _backlog_queries() -> Iterable[tuple[str, Any]]:
    """(stage, SELECT location_id, count, min(waiting since)) of everything not done yet.

    The location is the one whose queue runs the work (origin for packaging, destination for
    transfers, unpacking, archiving and staging); every query filters on an indexed status.
    """
    yield (
        "filing",
        select(RawDataFile.source_location_id, func.count(), func.min(RawDataFile.created_at))
        .where(RawDataFile.raw_data_package_id.is_(None))
        .group_by(RawDataFile.source_location_id),
    )
    for stage, model, loc_col, since_col in (
        (
            "raw_data_package",
            RawDataPackage,
            RawDataPackage.origin_location_id,
            RawDataPackage.created_at,
        ),
        (
            "data_transfer_package",
            DataTransferPackage,
            DataTransferPackage.origin_location_id,
            DataTransferPackage.created_at,
        ),
        (
            "data_transfer",
            DataTransfer,
            DataTransfer.destination_location_id,
            DataTransfer.created_at,
        ),
        (
            "long_term_archive_transfer",
            LongTermArchiveTransfer,
            LongTermArchiveTransfer.destination_location_id,
            LongTermArchiveTransfer.created_at,
        ),
        ("staging_job", StagingJob, StagingJob.destination_location_id, StagingJob.requested_at),
    ):
        yield (
            stage,
            select(loc_col, func.count(), func.min(since_col))
            .where(model.status.in_(NOT_DONE))
            .group_by(loc_col),
        )
    yield (
        "unpack",
        select(
            DataTransfer.destination_location_id,
            func.count(),
            func.min(func.coalesce(DataTransfer.finished_at, DataTransfer.created_at)),
        )
        .where(DataTransfer.status == Status.COMPLETED, DataTransfer.unpack_status.in_(NOT_DONE))
        .group_by(DataTransfer.destination_location_id),
    )


def _locations(s: Session) -> dict[int, tuple[str, str]]:
    """Every data location's id -> (site short name, location name)."""
    rows = s.execute(
        select(DataLocation.id, Site.short_name, DataLocation.name).join(
            Site, DataLocation.site_id == Site.id
        )
    )
    return {loc_id: (site, name) for loc_id, site, name in rows}


def backlog(engine: Engine) -> dict[tuple[str, str], tuple[int, float]]:
    """Items waiting or running per (stage, site), with the age in seconds of the oldest."""
    now = dt.datetime.now(dt.UTC)
    out: dict[tuple[str, str], tuple[int, float]] = {}
    with Session(engine) as s:
        site_of = {loc_id: site for loc_id, (site, _) in _locations(s).items()}
        sites = sorted(set(site_of.values()))
        for stage, query in _backlog_queries():
            per_site: dict[str, tuple[int, dt.datetime | None]] = {
                site: (0, None) for site in sites
            }
            for loc_id, n, since in s.execute(query):
                site = site_of.get(loc_id, "unknown")
                count, oldest = per_site.get(site, (0, None))
                since = _aware(since) if since is not None else None
                if since is not None and (oldest is None or since < oldest):
                    oldest = since
                per_site[site] = (count + int(n), oldest)
            for site, (count, oldest) in per_site.items():
                age = max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0
                out[(stage, site)] = (count, age)
    return out


@dataclass
class Holdups:
    """What keeps data from the archive or a disk from emptying, beyond the per-stage backlog.

    ``unarchived``: per origin site, raw data packages not ARCHIVED yet and the age in seconds
    of the oldest (every SOURCE and BUFFER copy of theirs must stay); ``stranded``: per origin
    site, transfer packages built whose every way to an archive site was cancelled (the
    transfer packages manager logs them as "given up everywhere"); ``copies``: per
    (site, location, status), copies not deleted; ``unverified``: per (site, location),
    package copies present without a verified checksum (a bad copy no repair could fix).
    Every site appears in ``unarchived`` and ``stranded``, with 0 when nothing waits, so an
    alert sees the series before it has anything to say.
    """

    unarchived: dict[str, tuple[int, float]]
    stranded: dict[str, int]
    copies: dict[tuple[str, str, str], int]
    unverified: dict[tuple[str, str], int]


def _stranded(now: dt.datetime) -> tuple[Any, ...]:
    """Transfer packages built whose every way to an archive site was cancelled: the transfer
    packages manager puts them off (``next_attempt_at`` ahead) and keeps no live primary."""
    from . import routing

    return (
        DataTransferPackage.status == Status.COMPLETED,
        DataTransferPackage.next_attempt_at > now,
        ~routing.live_primary(DataTransferPackage.id),
    )


#: Package copies present without a verified checksum: found bad and not repaired (the
#: partial index ix_physical_copy_unverified).
_UNVERIFIED = (
    PhysicalCopy.copy_type == CopyType.RAW_DATA_PACKAGE,
    PhysicalCopy.status == PhysicalCopyStatus.PRESENT,
    PhysicalCopy.checksum_verified_at.is_(None),
)


def holdups(engine: Engine) -> Holdups:
    """Read :class:`Holdups` from the database: a few aggregate queries, each on an index
    (raw data packages by state, the live-copies index, the unverified-copies index)."""

    now = dt.datetime.now(dt.UTC)
    with Session(engine) as s:
        where = _locations(s)
        sites = sorted({site for site, _ in where.values()})
        unarchived: dict[str, tuple[int, float]] = {site: (0, 0.0) for site in sites}
        for loc_id, n, since in s.execute(
            select(
                RawDataPackage.origin_location_id, func.count(), func.min(RawDataPackage.created_at)
            )
            .where(RawDataPackage.state != PackageState.ARCHIVED)
            .group_by(RawDataPackage.origin_location_id)
        ):
            site = where.get(loc_id, ("unknown", ""))[0]
            count, age = unarchived.get(site, (0, 0.0))
            if since is not None:
                age = max(age, (now - _aware(since)).total_seconds())
            unarchived[site] = (count + int(n), age)
        stranded: dict[str, int] = {site: 0 for site in sites}
        for loc_id, n in s.execute(
            select(DataTransferPackage.origin_location_id, func.count())
            .where(*_stranded(now))
            .group_by(DataTransferPackage.origin_location_id)
        ):
            site = where.get(loc_id, ("unknown", ""))[0]
            stranded[site] = stranded.get(site, 0) + int(n)
        copies: dict[tuple[str, str, str], int] = {}
        for loc_id, status, n in s.execute(
            select(PhysicalCopy.data_location_id, PhysicalCopy.status, func.count())
            .where(PhysicalCopy.status != PhysicalCopyStatus.DELETED)
            .group_by(PhysicalCopy.data_location_id, PhysicalCopy.status)
        ):
            site, name = where.get(loc_id, ("unknown", str(loc_id)))
            copies[(site, name, str(status))] = int(n)
        unverified: dict[tuple[str, str], int] = {}
        for loc_id, n in s.execute(
            select(PhysicalCopy.data_location_id, func.count())
            .where(*_UNVERIFIED)
            .group_by(PhysicalCopy.data_location_id)
        ):
            unverified[where.get(loc_id, ("unknown", str(loc_id)))] = int(n)
    return Holdups(unarchived, stranded, copies, unverified)


def holdup_details(engine: Engine, limit: int = 20) -> dict[str, list[tuple[str, ...]]]:
    """The names behind :class:`Holdups`, for a person (``ccat-transfer status``):

    ``oldest``: per site, the oldest raw data package not archived (site, name, state, built
    at); ``stranded``: transfer packages with no archive site left (site, name, looked at
    again at); ``bad``: package copies present without a verified checksum (site, location,
    package, what the last check found); ``undeletable``: copies whose deletion failed, per
    location (site, location, count, one reason). At most ``limit`` rows of each.
    """

    now = dt.datetime.now(dt.UTC)
    site = aliased(Site)
    out: dict[str, list[tuple[str, ...]]] = {}
    with Session(engine) as s:
        first = (
            select(
                site.short_name,
                RawDataPackage.name,
                RawDataPackage.state,
                RawDataPackage.created_at,
                func.row_number()
                .over(
                    partition_by=site.short_name,
                    order_by=(RawDataPackage.created_at, RawDataPackage.id),
                )
                .label("n"),
            )
            # outer joins: a package without an origin location still shows (site "unknown")
            .outerjoin(DataLocation, DataLocation.id == RawDataPackage.origin_location_id)
            .outerjoin(site, site.id == DataLocation.site_id)
            .where(RawDataPackage.state != PackageState.ARCHIVED)
            .subquery()
        )
        out["oldest"] = [
            (where or "unknown", name, str(state), f"{_aware(at):%Y-%m-%d %H:%M} UTC")
            for where, name, state, at in s.execute(
                select(first.c.short_name, first.c.name, first.c.state, first.c.created_at)
                .where(first.c.n == 1)
                .order_by(first.c.created_at)
                .limit(limit)
            )
        ]
        out["stranded"] = [
            (where, name, f"{_aware(again):%Y-%m-%d %H:%M} UTC")
            for where, name, again in s.execute(
                select(
                    site.short_name, DataTransferPackage.name, DataTransferPackage.next_attempt_at
                )
                .join(DataLocation, DataLocation.id == DataTransferPackage.origin_location_id)
                .join(site, site.id == DataLocation.site_id)
                .where(*_stranded(now))
                .order_by(DataTransferPackage.id)
                .limit(limit)
            )
        ]
        out["bad"] = [
            (where, loc, name, reason or "")
            for where, loc, name, reason in s.execute(
                select(
                    site.short_name,
                    DataLocation.name,
                    RawDataPackage.name,
                    PhysicalCopy.failure_reason,
                )
                .join(DataLocation, DataLocation.id == PhysicalCopy.data_location_id)
                .join(site, site.id == DataLocation.site_id)
                .join(RawDataPackage, RawDataPackage.id == PhysicalCopy.raw_data_package_id)
                .where(*_UNVERIFIED)
                .order_by(PhysicalCopy.id)
                .limit(limit)
            )
        ]
        out["undeletable"] = [
            (where, loc, str(n), reason or "")
            for where, loc, n, reason in s.execute(
                select(
                    site.short_name,
                    DataLocation.name,
                    func.count(),
                    func.max(PhysicalCopy.failure_reason),
                )
                .join(DataLocation, DataLocation.id == PhysicalCopy.data_location_id)
                .join(site, site.id == DataLocation.site_id)
                .where(PhysicalCopy.status == PhysicalCopyStatus.DELETION_FAILED)
                .group_by(site.short_name, DataLocation.name)
                .order_by(site.short_name, DataLocation.name)
                .limit(limit)
            )
        ]
    return out


class PipelineCollector:
    """Reads the pipeline state from the database at every scrape."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Any:
        """Yield the gauges (a failing database yields nothing rather than an error)."""
        up = GaugeMetricFamily(
            "ccat_transfer_database_up",
            "1 if the operations database answered this scrape (0: no pipeline gauges below)",
        )
        try:
            counts = pipeline_counts(self.engine)
            reasons = failure_reasons(self.engine)
            waiting = backlog(self.engine)
            held = holdups(self.engine)
        except Exception as exc:
            log.warning("pipeline metrics unavailable: %s: %s", type(exc).__name__, exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        g = GaugeMetricFamily(
            "ccat_transfer_records",
            "Operation records by stage and status",
            labels=["stage", "status"],
        )
        for stage, by_status in counts.items():
            for status in Status:
                g.add_metric([stage, status.value], by_status.get(status.value, 0))
        yield g
        f = GaugeMetricFamily(
            "ccat_transfer_failed_records",
            "Permanently failed records by stage and reason class",
            labels=["stage", "reason"],
        )
        for (stage, reason), n in reasons.items():
            f.add_metric([stage, reason], n)
        yield f
        items = GaugeMetricFamily(
            "ccat_transfer_backlog_items",
            "Items not done yet (pending, scheduled, in progress) by stage and the site that "
            "runs them; filing counts files not in a package yet",
            labels=["stage", "site"],
        )
        age = GaugeMetricFamily(
            "ccat_transfer_backlog_oldest_age_seconds",
            "Age of the oldest item not done yet, by stage and site (0 when none waits)",
            labels=["stage", "site"],
        )
        for (stage, site), (n, seconds) in sorted(waiting.items()):
            items.add_metric([stage, site], n)
            age.add_metric([stage, site], seconds)
        yield items
        yield age
        yield from holdup_families(held)


def holdup_families(held: Holdups) -> Iterable[GaugeMetricFamily]:
    """The gauges of :class:`Holdups` (see docs/observability.md)."""
    count = GaugeMetricFamily(
        "ccat_transfer_unarchived_packages",
        "Raw data packages not archived yet, by the site they were built at",
        labels=["site"],
    )
    oldest = GaugeMetricFamily(
        "ccat_transfer_unarchived_oldest_age_seconds",
        "Age of the oldest raw data package not archived yet, by site (0 when none)",
        labels=["site"],
    )
    for site, (n, seconds) in sorted(held.unarchived.items()):
        count.add_metric([site], n)
        oldest.add_metric([site], seconds)
    stranded = GaugeMetricFamily(
        "ccat_transfer_stranded_packages",
        "Transfer packages whose every way to an archive site was cancelled, by site",
        labels=["site"],
    )
    for site, n in sorted(held.stranded.items()):
        stranded.add_metric([site], n)
    copies = GaugeMetricFamily(
        "ccat_transfer_copies",
        "Copies of files and packages not deleted, by site, location and status",
        labels=["site", "location", "status"],
    )
    for key, n in sorted(held.copies.items()):
        copies.add_metric(list(key), n)
    unverified = GaugeMetricFamily(
        "ccat_transfer_unverified_package_copies",
        "Package copies present without a verified checksum (bad and not repaired)",
        labels=["site", "location"],
    )
    for key, n in sorted(held.unverified.items()):
        unverified.add_metric(list(key), n)
    yield from (count, oldest, stranded, copies, unverified)


class LocationDiskCollector:
    """Disk use of the disk locations a worker reaches (``shutil.disk_usage`` at scrape time).

    The locations (and their root paths) are read from the database at most once a minute;
    locations on another host (reached over ssh) or whose folder is missing are left out.
    """

    def __init__(
        self,
        site: str,
        locations: list[str] | None = None,
        engine: Engine | None = None,
        refresh_s: float = 60.0,
    ) -> None:
        self.site = site
        self.locations = set(locations or [])
        self._engine = engine
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._roots: list[tuple[str, str, str]] = []
        self._read_at = -1e9

    def _engine_now(self) -> Engine:
        if self._engine is None:
            from ccat_ops_db.db import make_engine

            self._engine = make_engine()
        return self._engine

    def roots(self) -> list[tuple[str, str, str]]:
        """(location name, location type, root path) of the disk locations watched."""
        with self._lock:
            if time.monotonic() - self._read_at < self.refresh_s:
                return self._roots
            with Session(self._engine_now()) as s:
                rows = s.execute(
                    select(
                        DiskDataLocation.name,
                        DiskDataLocation.location_type,
                        DiskDataLocation.root_path,
                    )
                    .join(Site, DiskDataLocation.site_id == Site.id)
                    .where(Site.short_name == self.site, DiskDataLocation.host.is_(None))
                    .order_by(DiskDataLocation.name)
                ).all()
            self._roots = [
                (name, str(ltype), root)
                for name, ltype, root in rows
                if not self.locations or name in self.locations
            ]
            self._read_at = time.monotonic()
            return self._roots

    def collect(self) -> Any:
        """Yield free, used and total bytes per location."""
        try:
            roots = self.roots()
        except Exception as exc:
            log.warning("location disk metrics unavailable: %s: %s", type(exc).__name__, exc)
            return
        labels = ["site", "location", "location_type"]
        free = GaugeMetricFamily(
            "ccat_transfer_location_free_bytes",
            "Free bytes on the file system of a disk location this worker reaches",
            labels=labels,
        )
        used = GaugeMetricFamily(
            "ccat_transfer_location_used_bytes",
            "Used bytes on the file system of a disk location this worker reaches",
            labels=labels,
        )
        total = GaugeMetricFamily(
            "ccat_transfer_location_size_bytes",
            "Size in bytes of the file system of a disk location this worker reaches",
            labels=labels,
        )
        for name, ltype, root in roots:
            try:
                usage = shutil.disk_usage(root)
            except OSError:
                continue
            key = [self.site, name, ltype]
            free.add_metric(key, usage.free)
            used.add_metric(key, usage.used)
            total.add_metric(key, usage.total)
        yield free
        yield used
        yield total


_served: set[int] = set()


def serve(
    port: int,
    host: str = "127.0.0.1",
    engine: Engine | None = None,
    *,
    worker_site: str | None = None,
    worker_locations: list[str] | None = None,
) -> None:
    """Serve /metrics on ``host:port`` (once per process).

    With ``engine`` (managers): the pipeline gauges read from the database at scrape time.
    With ``worker_site`` (workers): the disk use of that site's locations (``worker_locations``
    only, when given).
    """
    if port in _served:
        return
    if engine is not None:
        REGISTRY.register(PipelineCollector(engine))  # type: ignore[arg-type]
    if worker_site is not None:
        from .state import KINDS

        TASK_METRICS.site = worker_site
        TASK_METRICS.start_at_zero([*KINDS, "deletion", "fixity"])
        REGISTRY.register(LocationDiskCollector(worker_site, worker_locations))  # type: ignore[arg-type]
    start_http_server(port, addr=host)
    _served.add(port)
