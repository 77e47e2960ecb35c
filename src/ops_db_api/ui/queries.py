"""The status page's reads: cheap, index-backed queries (the database holds ~10 M files).

* Overview and storage reuse the pipeline summary (:mod:`ops_db_api.routers.pipeline`, cached
  per process) and the per-stage-and-site backlog of :func:`data_transfer.metrics.backlog`.
* Failures read rows by their indexed status (FAILED, and PENDING with a reason = retrying).
* Search looks a file up by UUID or by its exact path at a SOURCE location (the unique index
  ``(source_location_id, relative_path)``), a package by id or unique name.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from ccat_ops_db.enums import LocationType, Status
from ccat_ops_db.models import (
    DataLocation,
    DataTransfer,
    DataTransferLog,
    DataTransferPackage,
    LongTermArchiveTransfer,
    OperatorNotice,
    PhysicalCopy,
    RawDataFile,
    RawDataPackage,
    StagingJob,
    staging_job_raw_data_package,
)

#: Stage name -> (model, status column, failure reason column), as the transfer system names them.
FAILURE_SOURCES: dict[str, tuple[Any, str, str]] = {
    "raw_data_package": (RawDataPackage, "status", "failure_reason"),
    "data_transfer_package": (DataTransferPackage, "status", "failure_reason"),
    "data_transfer": (DataTransfer, "status", "failure_reason"),
    "unpack": (DataTransfer, "unpack_status", "unpack_failure_reason"),
    "long_term_archive_transfer": (LongTermArchiveTransfer, "status", "failure_reason"),
    "staging_job": (StagingJob, "status", "failure_reason"),
}

_LOG_PATH = re.compile(r"\(log: (?P<path>[^()]+)\)\s*$")

#: At most this much of a log file is shown (its end).
LOG_TAIL_BYTES = 64 * 1024


def log_path_of(reason: str | None) -> str | None:
    """The log file named in a stored reason ``"Class: message (log: path)"``."""
    if not reason:
        return None
    match = _LOG_PATH.search(reason)
    return match.group("path").strip() if match else None


def reason_class(reason: str | None) -> str:
    """``Class`` of ``"Class: message (log: path)"``."""
    return (reason or "unknown").split(":", 1)[0][:64]


@dataclass
class Failure:
    """One failed or retrying record."""

    stage: str
    record_id: int
    status: str
    reason: str
    reason_class: str
    retry_count: int
    at: dt.datetime | None
    log_path: str | None


def latest_failures(db: Session, limit: int = 50) -> list[Failure]:
    """The most recent failures over every stage (FAILED, or PENDING again with a reason)."""
    out: list[Failure] = []
    for stage, (model, status_name, reason_name) in FAILURE_SOURCES.items():
        status_col = getattr(model, status_name)
        reason_col = getattr(model, reason_name)
        retry_col = model.unpack_retry_count if stage == "unpack" else model.retry_count
        when = model.updated_at if stage == "unpack" else model.last_failure_at
        rows = db.execute(
            select(model.id, status_col, reason_col, retry_col, when)
            .where(status_col.in_((Status.FAILED, Status.PENDING)), reason_col.is_not(None))
            .order_by(when.desc().nulls_last(), model.id.desc())
            .limit(limit)
        )
        for rid, status, reason, retries, at in rows:
            out.append(
                Failure(
                    stage=stage,
                    record_id=rid,
                    status="failed" if status == Status.FAILED else "retrying",
                    reason=reason,
                    reason_class=reason_class(reason),
                    retry_count=int(retries or 0),
                    at=at,
                    log_path=log_path_of(reason),
                )
            )
    floor = dt.datetime.min
    out.sort(key=lambda f: f.at.replace(tzinfo=None) if f.at else floor, reverse=True)
    return out[:limit]


def open_notices(db: Session, limit: int = 10) -> tuple[list[OperatorNotice], int]:
    """The open operator notices (what needs a person, data_transfer.notify), newest first,
    at most ``limit``, and how many are open in all."""
    rows = db.scalars(OperatorNotice.newest().limit(limit)).all()
    total = (
        db.scalar(
            select(func.count())
            .select_from(OperatorNotice)
            .where(OperatorNotice.cleared_at.is_(None))
        )
        or 0
    )
    return list(rows), int(total)


def failure_detail(db: Session, stage: str, record_id: int) -> dict[str, Any] | None:
    """A record's failure reason, its log file (when readable here) and its log entries."""
    if stage not in FAILURE_SOURCES:
        return None
    model, status_name, reason_name = FAILURE_SOURCES[stage]
    record = db.get(model, record_id)
    if record is None:
        return None
    reason = getattr(record, reason_name)
    entries: list[DataTransferLog] = []
    column = {
        "data_transfer": DataTransferLog.data_transfer_id,
        "unpack": DataTransferLog.data_transfer_id,
        "long_term_archive_transfer": DataTransferLog.long_term_archive_transfer_id,
        "staging_job": DataTransferLog.staging_job_id,
    }.get(stage)
    if column is not None:
        entries = list(
            db.scalars(
                select(DataTransferLog)
                .where(column == record_id)
                .order_by(DataTransferLog.created_at.desc())
                .limit(100)
            )
        )
    # Only paths the database recorded are read - never a path from the request.
    paths = [p for p in [log_path_of(reason), *(e.log_path for e in entries)] if p]
    path = paths[0] if paths else None
    text, note = read_log(path)
    return {
        "stage": stage,
        "id": record_id,
        "status": str(getattr(record, status_name)),
        "reason": reason,
        "log_path": path,
        "log_text": text,
        "log_note": note,
        "entries": entries,
    }


def read_log(path: str | None) -> tuple[str | None, str | None]:
    """(text, note): the end of a log file, or why it cannot be shown from this host."""
    if not path:
        return None, "no log file was recorded"
    p = Path(path)
    try:
        size = p.stat().st_size
        with p.open("rb") as fh:
            if size > LOG_TAIL_BYTES:
                fh.seek(size - LOG_TAIL_BYTES)
            data = fh.read()
    except OSError as exc:
        return None, f"not readable from the API host ({exc.strerror or exc}); it is on the worker"
    note = f"last {LOG_TAIL_BYTES // 1024} KiB of {size} bytes" if size > LOG_TAIL_BYTES else None
    return data.decode("utf-8", "replace"), note


# --- search -----------------------------------------------------------------------------------


@dataclass
class SearchResult:
    """What a search found: files and packages, each with its copies and history."""

    query: str
    files: list[dict[str, Any]] = field(default_factory=list)
    packages: list[dict[str, Any]] = field(default_factory=list)
    transfer_packages: list[dict[str, Any]] = field(default_factory=list)


def _locations(db: Session) -> dict[int, DataLocation]:
    return {loc.id: loc for loc in db.scalars(select(DataLocation))}


def _copy_rows(copies: list[PhysicalCopy], locs: dict[int, DataLocation]) -> list[dict[str, Any]]:
    rows = []
    for c in copies:
        loc = locs.get(c.data_location_id)
        rows.append(
            {
                "id": c.id,
                "type": str(c.copy_type),
                "location": f"{loc.site.short_name}/{loc.name}" if loc else str(c.data_location_id),
                "location_type": str(loc.location_type) if loc else "",
                "status": str(c.status),
                "size": c.size,
                "checksum": c.checksum,
                "verified_at": c.checksum_verified_at,
                "updated_at": c.updated_at,
            }
        )
    return rows


def _package_history(
    db: Session, pkg: RawDataPackage, locs: dict[int, DataLocation]
) -> list[tuple[Any, str]]:
    """Dated events of a raw data package: built, bundled, transferred, archived, staged."""

    def name(loc_id: int | None) -> str:
        loc = locs.get(loc_id) if loc_id is not None else None
        return f"{loc.site.short_name}/{loc.name}" if loc else "?"

    events: list[tuple[Any, str]] = [
        (pkg.created_at, f"raw data package {pkg.name} created ({pkg.status}, state {pkg.state})")
    ]
    if pkg.failure_reason:
        events.append((pkg.last_failure_at, f"package failure: {pkg.failure_reason}"))
    dtp = pkg.data_transfer_package
    if dtp is not None:
        events.append(
            (dtp.created_at, f"bundled into transfer package {dtp.name} (#{dtp.id}, {dtp.status})")
        )
        for t in db.scalars(
            select(DataTransfer).where(DataTransfer.data_transfer_package_id == dtp.id)
        ):
            events.append(
                (
                    t.finished_at or t.created_at,
                    f"transfer #{t.id} {name(t.origin_location_id)} -> "
                    f"{name(t.destination_location_id)} by {t.method}: {t.status}, "
                    f"unpack {t.unpack_status}"
                    + (f" ({t.bytes_transferred} bytes)" if t.bytes_transferred else "")
                    + (f" - {t.failure_reason}" if t.failure_reason else ""),
                )
            )
            for entry in t.logs:
                events.append((entry.created_at, f"transfer #{t.id} log: {entry.message}"))
    for a in db.scalars(
        select(LongTermArchiveTransfer).where(LongTermArchiveTransfer.raw_data_package_id == pkg.id)
    ):
        events.append(
            (
                a.finished_at or a.created_at,
                f"archive transfer #{a.id} -> {name(a.destination_location_id)}: {a.status}"
                + (f" - {a.failure_reason}" if a.failure_reason else ""),
            )
        )
    for job in db.scalars(
        select(StagingJob)
        .join(
            staging_job_raw_data_package,
            staging_job_raw_data_package.c.staging_job_id == StagingJob.id,
        )
        .where(staging_job_raw_data_package.c.raw_data_package_id == pkg.id)
    ):
        events.append(
            (
                job.finished_at or job.requested_at,
                f"staging job #{job.id} to {name(job.destination_location_id)}: {job.status}",
            )
        )
    if pkg.archived_at:
        events.append((pkg.archived_at, "package ARCHIVED"))
    return events


def _sorted(events: list[tuple[Any, str]]) -> list[tuple[Any, str]]:
    floor = dt.datetime.min
    return sorted(events, key=lambda e: e[0].replace(tzinfo=None) if e[0] else floor)


def _package_view(db: Session, pkg: RawDataPackage, locs: dict[int, DataLocation]) -> dict:
    copies = list(
        db.scalars(
            select(PhysicalCopy)
            .where(PhysicalCopy.raw_data_package_id == pkg.id)
            .order_by(PhysicalCopy.id)
        )
    )
    return {
        "package": pkg,
        "copies": _copy_rows(copies, locs),
        "history": _sorted(_package_history(db, pkg, locs)),
    }


def _file_view(db: Session, f: RawDataFile, locs: dict[int, DataLocation]) -> dict[str, Any]:
    copies = list(
        db.scalars(
            select(PhysicalCopy)
            .where(PhysicalCopy.raw_data_file_id == f.id)
            .order_by(PhysicalCopy.id)
        )
    )
    events: list[tuple[Any, str]] = [(f.created_at, "filed")]
    pkg_copies: list[dict[str, Any]] = []
    pkg = f.raw_data_package
    if pkg is not None:
        view = _package_view(db, pkg, locs)
        pkg_copies = view["copies"]
        events += view["history"]
    for c in copies:
        if c.deleted_at:
            events.append((c.deleted_at, f"copy #{c.id} deleted"))
    return {
        "file": f,
        "source": locs.get(f.source_location_id),
        "package": pkg,
        "copies": _copy_rows(copies, locs),
        "package_copies": pkg_copies,
        "history": _sorted(events),
    }


def search(db: Session, query: str, limit: int = 20) -> SearchResult:
    """Files and packages matching ``query`` (a UUID, an integer id, a name or a path)."""
    q = query.strip()
    result = SearchResult(query=q)
    if not q:
        return result
    locs = _locations(db)
    files: list[RawDataFile] = []
    pkgs: list[RawDataPackage] = []
    dtps: list[DataTransferPackage] = []
    try:
        ident = uuid.UUID(q)
    except ValueError:
        ident = None
    if ident is not None:
        f = db.get(RawDataFile, ident)
        if f is not None:
            files.append(f)
        # an executed obs unit id: its packages
        pkgs += list(
            db.scalars(
                select(RawDataPackage)
                .where(RawDataPackage.executed_obs_unit_id == ident)
                .limit(limit)
            )
        )
    elif q.isdigit() and len(q) < 19:
        pkg = db.get(RawDataPackage, int(q))
        if pkg is not None:
            pkgs.append(pkg)
        dtp = db.get(DataTransferPackage, int(q))
        if dtp is not None:
            dtps.append(dtp)
    else:
        # the exact path at a SOURCE location: served by (source_location_id, relative_path)
        sources = [loc.id for loc in locs.values() if loc.location_type == LocationType.SOURCE] or [
            -1
        ]
        files += list(
            db.scalars(
                select(RawDataFile)
                .where(
                    RawDataFile.source_location_id.in_(sources),
                    RawDataFile.relative_path == q.lstrip("/"),
                )
                .limit(limit)
            )
        )
        pkgs += list(
            db.scalars(
                select(RawDataPackage)
                .where(or_(RawDataPackage.name == q, RawDataPackage.name == Path(q).name))
                .limit(limit)
            )
        )
        dtps += list(
            db.scalars(
                select(DataTransferPackage)
                .where(or_(DataTransferPackage.name == q, DataTransferPackage.name == Path(q).name))
                .limit(limit)
            )
        )
    result.files = [_file_view(db, f, locs) for f in files]
    result.packages = [_package_view(db, p, locs) for p in pkgs]
    for dtp in dtps:
        copies = list(
            db.scalars(
                select(PhysicalCopy)
                .where(PhysicalCopy.data_transfer_package_id == dtp.id)
                .order_by(PhysicalCopy.id)
            )
        )
        result.transfer_packages.append(
            {
                "package": dtp,
                "copies": _copy_rows(copies, locs),
                "transfers": list(
                    db.scalars(
                        select(DataTransfer).where(DataTransfer.data_transfer_package_id == dtp.id)
                    )
                ),
            }
        )
    return result


# --- throughput -------------------------------------------------------------------------------


def throughput(db: Session, hours: int = 24, now: dt.datetime | None = None) -> list[dict]:
    """Bytes finished per hour over the last ``hours``: inter-site transfers and archiving.

    Transfer packages are 10-50 TB, so these tables hold few rows per day; the rows of the
    window are read and binned here (the same on PostgreSQL and SQLite).
    """
    now = now or dt.datetime.now(dt.UTC)
    end = now.replace(minute=0, second=0, microsecond=0) + dt.timedelta(hours=1)
    start = end - dt.timedelta(hours=hours)
    bins: dict[dt.datetime, dict[str, int]] = defaultdict(lambda: {"transfer": 0, "archive": 0})
    for kind, model in (("transfer", DataTransfer), ("archive", LongTermArchiveTransfer)):
        rows = db.execute(
            select(model.finished_at, model.bytes_transferred)
            .where(
                model.status == Status.COMPLETED,
                model.finished_at >= start,
            )
            .limit(100_000)
        )
        for finished, n in rows:
            if finished is None or not n:
                continue
            at = finished if finished.tzinfo else finished.replace(tzinfo=dt.UTC)
            key = at.replace(minute=0, second=0, microsecond=0)
            bins[key][kind] += int(n)
    out = []
    for i in range(hours):
        hour = start + dt.timedelta(hours=i)
        b = bins.get(hour, {"transfer": 0, "archive": 0})
        out.append({"hour": hour, "transfer": b["transfer"], "archive": b["archive"]})
    return out
