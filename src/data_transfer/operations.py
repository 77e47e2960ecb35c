"""What the workers do: one function per operation, each taking a record id.

Every operation follows the same frame (:func:`_run`): claim the record (SCHEDULED →
IN_PROGRESS, one conditional UPDATE: a duplicate delivery finds nothing to claim), do the I/O
outside any transaction while a heartbeat says the task is alive, then record the result in
one transaction. On an exception the full traceback and the mover's output go to a log file,
and the record gets ``"<ExceptionClass>: message (log: path)"`` plus a bounded retry with
back-off (see :mod:`data_transfer.state`).

Bytes are verified after every hop: the package tar is hashed while it is written at the
SOURCE (each file checked against its filed checksum on the way), hashed again while it
streams to every later location, and unpacking checks every member against the manifest in
the same pass that writes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import shutil
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session, selectinload

from ccat_ops_db.enums import (
    CopyType,
    LocationType,
    PackageState,
    PhysicalCopyStatus,
    Status,
)
from ccat_ops_db.models import (
    DataLocation,
    DataTransfer,
    DataTransferLog,
    DataTransferPackage,
    DataTransferPackagePhysicalCopy,
    LongTermArchiveTransfer,
    PhysicalCopy,
    RawDataFile,
    RawDataFilePhysicalCopy,
    RawDataPackage,
    RawDataPackagePhysicalCopy,
    StagingJob,
    staging_job_raw_data_package,
)

from . import deletion, packaging, routing, state
from .errors import (
    ChecksumMismatchError,
    ConfigurationError,
    CopyBusyError,
    PackageError,
    StorageError,
    TransferSystemError,
    UnpackError,
)
from .heartbeat import Heartbeats, MemoryHeartbeats, beating, repeating, task_key
from .locations import LocationRef
from .metrics import TASK_METRICS
from .movers import Mover, mover_for
from .movers.space import REPAIR_DIR, ensure_space
from .settings import TransferSettings

log = logging.getLogger("data_transfer.operations")

#: Folder (in the archive's origin BUFFER) where an archive task writes the metadata sidecar
#: before copying it next to the package in the archive.
SIDECAR_DIR = ".sidecars"

#: ``(src, dst, method, options=...) -> Mover``; defaults to :func:`movers.mover_for`.
MoverFactory = Callable[..., Any]


@dataclass
class Context:
    """What an operation needs: the database, the settings, heartbeats, mover choice."""

    engine: Engine
    settings: TransferSettings
    heartbeats: Heartbeats = field(default_factory=MemoryHeartbeats)
    # (src, dst, method) -> Mover; tests wrap it to count or to inject faults.
    mover_factory: MoverFactory = mover_for

    def session(self) -> Session:
        """A new session (no expiry on commit: results are read after committing)."""
        return Session(self.engine, expire_on_commit=False)

    def mover(
        self,
        src: LocationRef,
        dst: LocationRef,
        method: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> Mover:
        """The mover for ``src`` -> ``dst``: ``options`` (a route's, or a repair's
        ``overwrite``) on top of the ``s3_options`` setting when either end is S3."""
        if self.settings.s3_options and "s3" in (src.storage_type, dst.storage_type):
            options = {**self.settings.s3_options, **(options or {})}
        if options is None:
            return self.mover_factory(src, dst, method)
        return self.mover_factory(src, dst, method, options=options)


@dataclass
class Outcome:
    """What one task did (returned to Celery; small and JSON-friendly)."""

    kind: str
    record_id: str
    result: str  # "done", "skipped", "retry", "failed"
    detail: str = ""

    def as_dict(self) -> dict[str, str]:
        """JSON-friendly form."""
        return {
            "kind": self.kind,
            "id": self.record_id,
            "result": self.result,
            "detail": self.detail,
        }


def now() -> dt.datetime:
    """UTC now."""
    return dt.datetime.now(dt.UTC)


def write_log(ctx: Context, kind: str, record_id: object, text: str) -> str:
    """Write a full log (command output, traceback) to a file; return its path."""
    folder = Path(ctx.settings.log_dir) / kind
    folder.mkdir(parents=True, exist_ok=True)
    stamp = now().strftime("%Y%m%dT%H%M%S%f")
    path = folder / f"{record_id}-{stamp}.log"
    path.write_text(text)
    return str(path)


def _add_log(session: Session, kind: str, record_id: Any, level: str, msg: str, path: str | None):
    column = {
        "data_transfer": "data_transfer_id",
        "unpack": "data_transfer_id",
        "long_term_archive_transfer": "long_term_archive_transfer_id",
        "staging_job": "staging_job_id",
    }.get(kind)
    if column is None:
        return
    session.add(
        DataTransferLog(**{column: record_id}, level=level, message=msg[:1000], log_path=path)
    )


def _run(ctx: Context, kind: str, record_id: Any, body: Callable[[], Callable[[Session], str]]):
    """Claim, do the work (``body``) under a heartbeat, then commit its result.

    ``body`` does the I/O and returns a function that records the result in a session.
    """
    with ctx.session() as session, session.begin():
        run = state.claim(session, kind, record_id)
        if run is None:
            return Outcome(kind, str(record_id), "skipped", "not SCHEDULED (duplicate delivery?)")
    key = task_key(kind, record_id)
    started = now()
    try:
        with beating(
            ctx.heartbeats, key, ctx.settings.heartbeat_interval_s, ctx.settings.stale_after_s
        ):
            commit = body()
        with ctx.session() as session, session.begin():
            detail = commit(session)
        for hook in session.info.pop("after_commit", []):  # clean-up once the commit holds
            hook()
        TASK_METRICS.done(kind, (now() - started).total_seconds())
        return Outcome(kind, str(record_id), "done", detail)
    except Exception as exc:
        text = "".join(traceback.format_exception(exc))
        output = getattr(exc, "output", "")
        if output:
            text += "\n--- mover output ---\n" + str(output)
        path = write_log(ctx, kind, record_id, text)
        log.warning("%s %s failed: %s", kind, record_id, state.describe_error(exc, path))
        with ctx.session() as session, session.begin():
            record = session.get(state.KINDS[kind].model, record_id, with_for_update=True)
            if record is None:  # deleted under us: nothing to record
                return Outcome(kind, str(record_id), "failed", str(exc))
            if not run.holds(record, kind):
                # another run of the same record finished it meanwhile, or holds it now (the
                # recovery sweeper took this run for dead and reset the record): its state
                # stands, and this run's failure is history
                status = getattr(record, state.KINDS[kind].status)
                why = (
                    "completed by another run"
                    if status == Status.COMPLETED
                    else "taken over by another run"
                )
                log.warning(
                    "%s %s: %s (now %s); this run's failure is dropped: %s",
                    kind,
                    record_id,
                    why,
                    status.value,
                    state.describe_error(exc, path),
                )
                _add_log(
                    session,
                    kind,
                    record_id,
                    "warning",
                    f"a run {why} failed late: {state.describe_error(exc)}",
                    path,
                )
                return Outcome(kind, str(record_id), "skipped", why)
            _on_failure(ctx, session, kind, record, exc)
            permanent = state.record_failure(
                session, record, kind, exc, ctx.settings, log_path=path
            )
            repair: Repair | None = getattr(exc, "repair", None)
            if repair is not None:  # the reason says what became of the bad copy
                column = state.KINDS[kind].failure_reason
                setattr(record, column, f"{getattr(record, column)}; {repair.note}"[:1990])
            _add_log(session, kind, record_id, "error", state.describe_error(exc), path)
            if permanent:
                _on_permanent_failure(session, kind, record)
        TASK_METRICS.failed(kind, type(exc).__name__)
        return Outcome(
            kind,
            str(record_id),
            "failed" if permanent else "retry",
            state.describe_error(exc, path),
        )


def _on_failure(ctx: Context, session: Session, kind: str, record: Any, exc: BaseException) -> None:
    """Per-kind clean-up after a failure (before the retry bookkeeping)."""
    if kind == "unpack" and isinstance(exc, ChecksumMismatchError | UnpackError):
        # The copy that arrived is bad: drop it, and fetch it again from the origin.
        why = state.describe_error(exc)
        copy = session.scalar(
            select(PhysicalCopy).where(
                PhysicalCopy.data_transfer_package_id == record.data_transfer_package_id,
                PhysicalCopy.data_location_id == record.destination_location_id,
            )
        )
        dest = _ref(record.destination_location)
        path = record.data_transfer_package.relative_path
        try:
            ctx.mover(dest, dest).delete(dest, path)
        except Exception as del_exc:  # the retry will meet the bad file and say so
            log.warning("could not remove bad copy %s at %s: %s", path, dest.label, del_exc)
        if copy is not None:
            copy.status = PhysicalCopyStatus.DELETED
            copy.deleted_at = now()
            # the reason says why this BUFFER copy went before its data was archived: it was
            # bad on arrival (any unpack error: a flipped byte may break the checksum or the
            # tar's manifest), and the origin's copy is fetched again
            copy.failure_reason = f"dropped for a re-fetch: {why}"[:1990]
        record.status = Status.PENDING
        record.retry_count = (record.retry_count or 0) + 1
        record.failure_reason = f"re-fetch after bad copy: {why}"[:1990]
        record.next_attempt_at = None
    repair: Repair | None = getattr(exc, "repair", None)
    if repair is not None:
        # the copy the mismatch came from: say what was found and done on it
        _note_repair(session, repair)
        _add_log(session, kind, record.id, "warning", repair.note, None)


def _on_permanent_failure(session: Session, kind: str, record: Any) -> None:
    """Make a permanent failure visible on the package operators look at."""
    if kind == "raw_data_package":
        record.state = PackageState.FAILED
    elif kind == "long_term_archive_transfer":
        pkg = session.get(RawDataPackage, record.raw_data_package_id)
        if pkg is not None and pkg.state != PackageState.ARCHIVED:
            pkg.state = PackageState.FAILED


def _ref(loc: DataLocation) -> LocationRef:
    return LocationRef.from_orm(loc)


def _ensure_space(ctx: Context, loc: LocationRef, needed: int) -> None:
    """Refuse to start writing ``needed`` bytes into a full BUFFER (see movers.space)."""
    if loc.location_type != "buffer":
        return
    cfg = ctx.settings
    ensure_space(
        loc,
        needed,
        min_free_bytes=cfg.buffer_min_free_bytes,
        min_free_percent=cfg.buffer_min_free_percent,
        retry_after_s=cfg.buffer_full_recheck_s,
        part_max_age_s=cfg.part_file_max_age_s,
        sweep_interval_s=cfg.part_sweep_interval_s,
    )


def _upsert_copy(
    session: Session,
    cls: type[PhysicalCopy],
    item_field: str,
    item_id: Any,
    location_id: int,
    **values: Any,
) -> PhysicalCopy:
    """Create or refresh the copy of one item at one location (unique per item+location)."""
    copy = session.scalar(
        select(PhysicalCopy).where(
            getattr(PhysicalCopy, item_field) == item_id,
            PhysicalCopy.data_location_id == location_id,
        )
    )
    if copy is None:
        copy = cls(**{item_field: item_id}, data_location_id=location_id)
        session.add(copy)
    copy.status = values.pop("status", PhysicalCopyStatus.PRESENT)
    copy.deleted_at = None
    copy.failure_reason = None
    for key, value in values.items():
        setattr(copy, key, value)
    return copy


# --- stage 1: raw data packages -----------------------------------------------------------


def _built_at(record: RawDataPackage | DataTransferPackage) -> dt.datetime:
    """The time a package's tar says it was made: its record's creation, in whole seconds.

    Taken from the record rather than the clock so that a package can be rebuilt byte for
    byte from its sources and its record alone (:func:`repair_package_copy`).
    """
    stamp = record.created_at
    if stamp.tzinfo is None:  # SQLite hands back naive UTC
        stamp = stamp.replace(tzinfo=dt.UTC)
    return stamp.astimezone(dt.UTC).replace(microsecond=0)


def _raw_package_sources(
    s: Session, pkg: RawDataPackage
) -> tuple[list[packaging.Member], dict, DataLocation]:
    """The files of a raw data package at its SOURCE as tar members (in package order), the
    package's manifest metadata, and the SOURCE location (checked to be mounted here)."""
    files = list(
        s.scalars(
            select(RawDataFile)
            .where(RawDataFile.raw_data_package_id == pkg.id)
            .order_by(RawDataFile.relative_path)
        )
    )
    if not files:
        raise ConfigurationError(f"raw data package {pkg.name} has no files")
    source = s.get(DataLocation, files[0].source_location_id)
    assert source is not None
    src = _ref(source)
    if src.is_remote:
        raise ConfigurationError(
            f"packaging needs {src.label} mounted on the worker "
            "(run the worker on the host that mounts it)"
        )
    members = [
        packaging.Member(
            source=src.path(f.relative_path),
            arcname=f.relative_path,
            size=f.size,
            checksum=f.checksum,
            algorithm=str(f.checksum_algorithm),
        )
        for f in files
    ]
    return members, _package_metadata(s, pkg, files), source


def create_raw_data_package(ctx: Context, package_id: int) -> Outcome:
    """Tar the package's files at the SOURCE into the site's primary BUFFER."""

    def body() -> Callable[[Session], str]:
        with ctx.session() as s:
            pkg = s.get(RawDataPackage, package_id)
            assert pkg is not None
            members, meta, source = _raw_package_sources(s, pkg)
            buffer = routing.primary_buffer(s, source.site_id)
            src, buf = _ref(source), _ref(buffer)
            if buf.is_remote:
                raise ConfigurationError(
                    f"packaging needs {src.label} and {buf.label} mounted on the worker "
                    "(run the worker on the host that mounts both)"
                )
            dest = buf.path(pkg.relative_path)
            buffer_id = buffer.id
            algorithm, built_at = str(pkg.checksum_algorithm), _built_at(pkg)
        # tar headers and the manifest on top of the bytes
        _ensure_space(ctx, buf, sum(mb.size for mb in members) + 1024 * len(members) + 65536)
        result = packaging.build_package(
            dest, pkg.name, members, algorithm=algorithm, metadata=meta, created_at=built_at
        )

        def commit(s: Session) -> str:
            p = s.get(RawDataPackage, package_id)
            assert p is not None
            p.size = result.size
            p.checksum = result.checksum
            p.file_count = result.file_count
            state.complete(p, "raw_data_package")
            _upsert_copy(
                s,
                RawDataPackagePhysicalCopy,
                "raw_data_package_id",
                package_id,
                buffer_id,
                size=result.size,
                checksum=result.checksum,
                checksum_verified_at=now(),
            )
            TASK_METRICS.bytes("raw_data_package", result.size)
            return f"{result.file_count} files, {result.size} bytes"

        return commit

    return _run(ctx, "raw_data_package", package_id, body)


def _package_metadata(s: Session, pkg: RawDataPackage, files: list[RawDataFile]) -> dict:
    eou = pkg.executed_obs_unit
    module = pkg.instrument_module
    return {
        "package": pkg.name,
        "executed_obs_unit": str(pkg.executed_obs_unit_id),
        "obs_start": eou.start_time.isoformat() if eou and eou.start_time else None,
        "instrument": module.instrument.name if module else None,
        "instrument_module": module.name if module else None,
        "file_count": len(files),
        "bytes": sum(f.size for f in files),
    }


# --- stage 2: transfer packages -----------------------------------------------------------


def _transfer_package_sources(
    s: Session, dtp: DataTransferPackage, buf: LocationRef
) -> tuple[list[packaging.Member], dict, list[int]]:
    """The raw data package tars of a transfer package at ``buf`` as tar members (in package
    order), the manifest metadata, and the raw data packages' ids (in the same order)."""
    pkgs = list(
        s.scalars(
            select(RawDataPackage)
            .where(RawDataPackage.data_transfer_package_id == dtp.id)
            .order_by(RawDataPackage.id)
        )
    )
    if not pkgs:
        raise ConfigurationError(f"transfer package {dtp.name} has no raw data packages")
    members = [
        packaging.Member(
            source=buf.path(p.relative_path),
            arcname=p.relative_path,
            size=p.size or 0,
            checksum=p.checksum,
            algorithm=str(p.checksum_algorithm),
            mtime=int(_built_at(p).timestamp()),
        )
        for p in pkgs
    ]
    return members, {"raw_data_packages": [p.name for p in pkgs]}, [p.id for p in pkgs]


def create_data_transfer_package(ctx: Context, dtp_id: int) -> Outcome:
    """Bundle raw data package tars in a BUFFER into one transfer package tar.

    A raw data package tar that does not match its recorded checksum is checked where it lies
    and repaired (from a good copy, or rebuilt from its files at the SOURCE) before the retry.
    """

    def body() -> Callable[[Session], str]:
        with ctx.session() as s:
            dtp = s.get(DataTransferPackage, dtp_id)
            assert dtp is not None
            buf = _ref(dtp.origin_location)
            members, meta, inner = _transfer_package_sources(s, dtp, buf)
            dest = buf.path(dtp.relative_path)
            name, algorithm, origin_id = dtp.name, str(dtp.checksum_algorithm), buf.id
            built_at = _built_at(dtp)
        try:
            result = packaging.build_package(
                dest, name, members, algorithm=algorithm, metadata=meta, created_at=built_at
            )
        except (PackageError, ChecksumMismatchError) as exc:
            _repair_members(ctx, exc, buf, inner, members)
            raise

        def commit(s: Session) -> str:
            d = s.get(DataTransferPackage, dtp_id)
            assert d is not None
            d.size, d.checksum = result.size, result.checksum
            state.complete(d, "data_transfer_package")
            _upsert_copy(
                s,
                DataTransferPackagePhysicalCopy,
                "data_transfer_package_id",
                dtp_id,
                origin_id,
                size=result.size,
                checksum=result.checksum,
                checksum_verified_at=now(),
            )
            TASK_METRICS.bytes("data_transfer_package", result.size)
            return f"{len(members)} packages, {result.size} bytes"

        return commit

    return _run(ctx, "data_transfer_package", dtp_id, body)


def _repair_members(
    ctx: Context,
    exc: Exception,
    buf: LocationRef,
    inner: list[int],
    members: list[packaging.Member],
) -> None:
    """After bundling failed: repair the raw data package tar it failed on (bad, lost, or of
    another size than its record: truncated or grown)."""
    for pid, m in zip(inner, members, strict=True):
        if getattr(exc, "path", None) == str(m.source) or _size_differs(m.source, m.size):
            repair = repair_package_copy(ctx, "raw_data_package", pid, buf, m.arcname, m.checksum)
            _attach_repair(exc, repair)
            return


def _size_differs(path: Path, size: int | None) -> bool:
    """True when ``path`` is gone or its size is not ``size`` (a copy damaged on disk)."""
    try:
        return size is not None and path.stat().st_size != size
    except FileNotFoundError:
        return True


# --- stage 3: inter-site transfer ---------------------------------------------------------


def transfer(ctx: Context, transfer_id: int) -> Outcome:
    """Pull a transfer package from the origin BUFFER to the destination BUFFER."""

    def body() -> Callable[[Session], str]:
        with ctx.session() as s:
            t = s.get(DataTransfer, transfer_id)
            assert t is not None
            dtp = t.data_transfer_package
            src, dst = _ref(t.origin_location), _ref(t.destination_location)
            path, expected, algorithm = dtp.relative_path, dtp.checksum, dtp.checksum_algorithm
            dtp_id = dtp.id
            method = str(t.method)
            options = routing.leg_options(s, t)
        _ensure_space(ctx, dst, int(dtp.size or 0))
        mover = ctx.mover(src, dst, method, options)
        try:
            result = mover.copy(
                src, path, dst, path, algorithm=str(algorithm), expected_checksum=expected
            )
        except TransferSystemError as exc:
            # the origin's copy may have rotted or gone: check it, repair or rebuild it, retry
            if isinstance(exc, ChecksumMismatchError) or _is_lost(ctx, src, path):
                repair = repair_package_copy(
                    ctx, "data_transfer_package", dtp_id, src, path, expected
                )
                _attach_repair(exc, repair)
                if repair is not None and repair.fixed:
                    exc.retryable = True  # "no such file" is final, unless it is back
            raise
        log_path = write_log(ctx, "data_transfer", transfer_id, result.output or "(no output)")

        def commit(s: Session) -> str:
            t = s.get(DataTransfer, transfer_id, with_for_update=True)
            assert t is not None
            cancelled = t.status == Status.CANCELLED  # by an operator while this run copied
            if not cancelled:
                t.bytes_transferred = result.bytes
                t.rate_bytes_per_s = result.rate_bytes_per_s
                state.complete(t, "data_transfer")
            _upsert_copy(
                s,
                DataTransferPackagePhysicalCopy,
                "data_transfer_package_id",
                t.data_transfer_package_id,
                t.destination_location_id,
                size=result.bytes,
                checksum=result.checksum,
                checksum_verified_at=now(),
            )
            msg = (
                f"{result.bytes} bytes {src.label} -> {dst.label} by {method} "
                f"at {result.rate_bytes_per_s / 1e6:.1f} MB/s"
            )
            if cancelled:
                # the copy that arrived is recorded (the database keeps agreeing with the
                # disk) and deleted with the package's other BUFFER copies; the transfer stays
                # given up: no COMPLETED, no unpack, no onward leg
                msg = f"arrived after the transfer was cancelled, kept as a copy: {msg}"
                _add_log(s, "data_transfer", transfer_id, "warning", msg, log_path)
                return msg
            _add_log(s, "data_transfer", transfer_id, "info", msg, log_path)
            routing.next_relay_leg(s, t)
            TASK_METRICS.bytes("data_transfer", result.bytes)
            TASK_METRICS.route_bytes(src.site, dst.site, method, result.bytes)
            return msg

        return commit

    return _run(ctx, "data_transfer", transfer_id, body)


def _is_lost(ctx: Context, loc: LocationRef, path: str) -> bool:
    """True when the file is known to be absent at ``loc`` (False when that cannot be told)."""
    try:
        return ctx.mover(loc, loc).size(loc, path) is None
    except Exception:
        return False


# --- stage 4: unpack and verify -----------------------------------------------------------


def unpack(ctx: Context, transfer_id: int) -> Outcome:
    """Unpack a transfer package at its destination BUFFER, verifying every checksum."""

    def body() -> Callable[[Session], str]:
        with ctx.session() as s:
            t = s.get(DataTransfer, transfer_id)
            assert t is not None
            dtp = t.data_transfer_package
            dst = _ref(t.destination_location)
            if dst.is_remote:
                raise ConfigurationError(f"unpacking needs {dst.label} mounted on the worker")
            tar_path = dst.path(dtp.relative_path)
            root = Path(dst.root_path or "")
            expected, algorithm = dtp.checksum, str(dtp.checksum_algorithm)
            pkgs = {p.relative_path: (p.id, p.checksum) for p in dtp.raw_data_packages}
            dest_id = t.destination_location_id
        if not tar_path.exists():
            raise UnpackError(f"{tar_path}: transfer package is not at {dst.label}")
        _ensure_space(ctx, dst, tar_path.stat().st_size)
        result = packaging.extract_package(
            tar_path, root, expected_checksum=expected, algorithm=algorithm, nested=True
        )
        found = {m.path: m for m in result.members}
        missing = [p for p in pkgs if p not in found]
        if missing:
            raise UnpackError(f"{tar_path}: packages missing from the tar: {', '.join(missing)}")
        for path, (_pid, checksum) in pkgs.items():
            if checksum and found[path].checksum != checksum:
                raise ChecksumMismatchError(path, checksum, found[path].checksum, algorithm)

        def commit(s: Session) -> str:
            t = s.get(DataTransfer, transfer_id, with_for_update=True)
            assert t is not None
            if Status.CANCELLED in (t.status, t.unpack_status):
                return _discard_unpacked(s, t, pkgs, root, dst)
            stamp = now()
            for path, (pid, checksum) in pkgs.items():
                _upsert_copy(
                    s,
                    RawDataPackagePhysicalCopy,
                    "raw_data_package_id",
                    pid,
                    dest_id,
                    size=found[path].size,
                    checksum=checksum,
                    checksum_verified_at=stamp,
                )
            state.complete(t, "unpack")
            files = sum(len(getattr(m, "inner", None) or []) for m in result.members)
            msg = f"unpacked {len(pkgs)} packages ({files} files verified) at {dst.label}"
            _add_log(s, "unpack", transfer_id, "info", msg, None)
            routing.create_secondary_transfers(s, t)
            return msg

        return commit

    return _run(ctx, "unpack", transfer_id, body)


def _discard_unpacked(
    s: Session, t: DataTransfer, pkgs: dict[str, tuple[int, Any]], root: Path, dst: LocationRef
) -> str:
    """An unpack that finished after an operator cancelled its transfer (a run the sweeper
    took for dead): record nothing - no copies the archive manager would archive at the
    given-up site, no secondaries from there - and remove what it extracted once the commit
    holds, except packages a recorded copy there already stands for."""
    held = set(
        s.scalars(
            select(RawDataPackagePhysicalCopy.raw_data_package_id).where(
                RawDataPackagePhysicalCopy.data_location_id == t.destination_location_id,
                RawDataPackagePhysicalCopy.raw_data_package_id.in_([p for p, _ in pkgs.values()]),
                RawDataPackagePhysicalCopy.status.in_(deletion.LIVE_COPY),
            )
        )
    )
    extracted = [root / path for path, (pid, _) in pkgs.items() if pid not in held]

    def remove() -> None:
        for path in extracted:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:  # left for the BUFFER's sweeper and the operator
                log.warning("could not remove %s unpacked after a cancel: %s", path, exc)

    s.info.setdefault("after_commit", []).append(remove)
    msg = (
        f"unpacked at {dst.label} after the transfer was cancelled: nothing recorded, "
        f"{len(extracted)} extracted package(s) removed"
    )
    _add_log(s, "unpack", t.id, "warning", msg, None)
    return msg


# --- stage 5: long-term archive -----------------------------------------------------------


def archive(ctx: Context, ltat_id: int) -> Outcome:
    """Copy a raw data package from a BUFFER into a LONG_TERM_ARCHIVE, with a sidecar."""

    def body() -> Callable[[Session], str]:
        with ctx.session() as s:
            a = s.get(LongTermArchiveTransfer, ltat_id)
            assert a is not None
            pkg = a.raw_data_package
            src, dst = _ref(a.origin_location), _ref(a.destination_location)
            path, expected, pkg_id = pkg.relative_path, pkg.checksum, pkg.id
            algorithm = str(pkg.checksum_algorithm)
            sidecar = sidecar_document(s, pkg)
            metadata = {
                "ccat-package": pkg.name,
                "ccat-executed-obs-unit": str(pkg.executed_obs_unit_id),
            }
        mover = ctx.mover(src, dst)
        try:
            result = mover.copy(
                src,
                path,
                dst,
                path,
                algorithm=algorithm,
                expected_checksum=expected,
                metadata=metadata,
            )
        except TransferSystemError as exc:
            # the BUFFER copy may have rotted or gone: check it, repair it from a good copy
            # (or rebuild it), retry
            if isinstance(exc, ChecksumMismatchError) or _is_lost(ctx, src, path):
                repair = repair_package_copy(ctx, "raw_data_package", pkg_id, src, path, expected)
                _attach_repair(exc, repair)
                if repair is not None and repair.fixed:
                    exc.retryable = True  # "no such file" is final, unless it is back
            raise
        sidecar_path = path + ".meta.json"
        # one name per archive record: an attempt killed between writing and removing it leaves
        # the file behind, and the record's next attempt (after the recovery sweeper reset it)
        # overwrites and removes it, so nothing piles up in the BUFFER
        tmp_rel = f"{SIDECAR_DIR}/{ltat_id}.json"
        tmp_abs = src.path(tmp_rel)
        tmp_abs.parent.mkdir(parents=True, exist_ok=True)
        tmp_abs.write_text(json.dumps(sidecar, indent=2, sort_keys=True))
        try:
            mover.copy(src, tmp_rel, dst, sidecar_path, algorithm="sha256")
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp_abs.unlink()
        log_path = write_log(ctx, "long_term_archive_transfer", ltat_id, result.output or "")

        def commit(s: Session) -> str:
            a = s.get(LongTermArchiveTransfer, ltat_id)
            assert a is not None
            stamp = now()
            a.object_key = dst.key(path) if dst.storage_type == "s3" else path
            a.sidecar_key = dst.key(sidecar_path) if dst.storage_type == "s3" else sidecar_path
            a.bytes_transferred = result.bytes
            a.checksum_verified_at = stamp
            state.complete(a, "long_term_archive_transfer")
            _upsert_copy(
                s,
                RawDataPackagePhysicalCopy,
                "raw_data_package_id",
                a.raw_data_package_id,
                a.destination_location_id,
                size=result.bytes,
                checksum=result.checksum,
                checksum_verified_at=stamp,
            )
            pkg = s.get(RawDataPackage, a.raw_data_package_id)
            assert pkg is not None
            if result.checksum == pkg.checksum and pkg.state != PackageState.ARCHIVED:
                pkg.state = PackageState.ARCHIVED
                pkg.archived_at = stamp
            msg = f"archived {pkg.name} ({result.bytes} bytes) to {dst.label}"
            _add_log(s, "long_term_archive_transfer", ltat_id, "info", msg, log_path)
            TASK_METRICS.bytes("long_term_archive_transfer", result.bytes)
            return msg

        return commit

    return _run(ctx, "long_term_archive_transfer", ltat_id, body)


@dataclass(frozen=True)
class Repair:
    """What checking a copy after a checksum mismatch found and did.

    ``key``/``item_id``/``location_id`` name the copy (``raw_data_package_id`` or
    ``data_transfer_package_id``, the item, where it lies); ``note`` is the sentence an
    operator reads on the copy and in the task's log; ``fixed`` is True when the copy now holds
    the recorded bytes again.
    """

    key: str
    item_id: int
    location_id: int
    note: str
    fixed: bool


def _attach_repair(exc: BaseException, repair: Repair | None) -> None:
    """Carry a repair's result on the exception to :func:`_on_failure` (None: copy fine)."""
    if repair is not None:
        exc.repair = repair  # type: ignore[attr-defined]


def _good_copies(
    s: Session, key: str, item_id: int, not_at: int, expected: str | None
) -> list[tuple[LocationRef, str | None]]:
    """Verified copies of an item elsewhere that hold the recorded bytes (BUFFERs first)."""
    return [
        (_ref(c.data_location), c.relative_path)
        for c in s.scalars(
            select(PhysicalCopy)
            .join(DataLocation, DataLocation.id == PhysicalCopy.data_location_id)
            .where(
                getattr(PhysicalCopy, key) == item_id,
                PhysicalCopy.data_location_id != not_at,
                PhysicalCopy.status == PhysicalCopyStatus.PRESENT,
                PhysicalCopy.checksum == expected,
                PhysicalCopy.checksum_verified_at.is_not(None),
            )
            .order_by(DataLocation.location_type != "buffer", PhysicalCopy.id)
        )
    ]


def repair_package_copy(
    ctx: Context,
    kind: str,
    item_id: int,
    loc: LocationRef,
    path: str,
    expected: str | None,
) -> Repair | None:
    """After a checksum mismatch on a package copy: is the copy itself bad, and if so repair it.

    ``kind`` is ``raw_data_package`` or ``data_transfer_package``. The copy at ``loc`` is
    re-hashed: when it matches, the bytes went wrong on the way and None is returned (the
    retry copies again). When it is bad (or unreadable), it is overwritten from a verified good
    copy elsewhere (BUFFERs first, then archives) or, when there is none, rebuilt byte for byte
    where it lies from what it was made of: a raw data package from its files at the SOURCE, a
    transfer package from the raw data package tars beside it (each of those checked, and
    repaired the same way when bad). Either way the result carries the recorded checksum
    (verify, then replace).
    """
    key = f"{kind}_id"
    model = RawDataPackage if kind == "raw_data_package" else DataTransferPackage
    with ctx.session() as s:
        item = s.get(model, item_id)
        assert item is not None
        algorithm = str(item.checksum_algorithm)
        goods = _good_copies(s, key, item_id, loc.id, expected)
    try:
        actual = ctx.mover(loc, loc).checksum(loc, path, algorithm=algorithm)
        bad = f"{loc.label} copy of {path} is bad ({algorithm} {actual}, expected {expected})"
    except TransferSystemError as exc:
        actual, bad = None, f"{loc.label} copy of {path} is unreadable ({exc})"
    if actual == expected:
        return None
    for good, good_path in goods:
        try:
            repair_copy(ctx, good, good_path or path, loc, path, expected, algorithm)
        except Exception as exc:  # try the next good copy
            log.warning("repair of %s from %s failed: %s", path, good.label, exc)
            continue
        return Repair(key, item_id, loc.id, f"{bad}: repaired from {good.label}", True)
    if loc.storage_type != "disk" or loc.is_remote:
        return Repair(key, item_id, loc.id, f"{bad}: no good copy to repair from", False)
    try:
        what = _rebuild(ctx, kind, item_id, loc, path, expected)
    except Exception as exc:
        note = (
            f"{bad}: no good copy to repair from, and it could not be rebuilt: "
            f"{state.describe_error(exc)}"
        )
        return Repair(key, item_id, loc.id, note, False)
    log.warning("%s: rebuilt from %s", bad, what)
    return Repair(key, item_id, loc.id, f"{bad}: rebuilt from {what}", True)


def _rebuild(
    ctx: Context, kind: str, item_id: int, loc: LocationRef, path: str, expected: str | None
) -> str:
    """Rebuild a package copy in place from its sources; returns what it was rebuilt from."""
    if expected is None:
        raise ConfigurationError(f"{path}: no checksum recorded, nothing to rebuild against")
    if kind == "raw_data_package":
        with ctx.session() as s:
            pkg = s.get(RawDataPackage, item_id)
            assert pkg is not None
            members, meta, source = _raw_package_sources(s, pkg)
            name, algorithm, label = pkg.name, str(pkg.checksum_algorithm), _ref(source).label
            built_at = _built_at(pkg)
            if _ref(source).site != loc.site:
                raise ConfigurationError(f"its files are at {label}, another site than {loc.label}")
        packaging.rebuild_package(
            loc.path(path),
            name,
            members,
            algorithm=algorithm,
            expected_checksum=expected,
            metadata=meta,
            created_at=built_at,
        )
        return f"its files at {label}"
    # raw data package tars gone from here (deleted once archived) are fetched from a
    # verified copy elsewhere into a scratch folder on the same disk, used, and removed
    scratch_dir = Path(loc.path(REPAIR_DIR)) / uuid.uuid4().hex
    scratch = dataclasses.replace(loc, root_path=str(scratch_dir), host=None)
    try:
        for attempt in (1, 2):
            with ctx.session() as s:
                dtp = s.get(DataTransferPackage, item_id)
                assert dtp is not None
                members, meta, inner = _transfer_package_sources(s, dtp, loc)
                name, algorithm, built_at = dtp.name, str(dtp.checksum_algorithm), _built_at(dtp)
                gone = {
                    i: _good_copies(s, "raw_data_package_id", pid, loc.id, members[i].checksum)
                    for i, pid in enumerate(inner)
                    if not members[i].source.exists()
                }
            fetched: set[str] = set()
            for i, goods in gone.items():
                got, where = _fetch(ctx, goods, members[i], loc, scratch)
                members[i] = dataclasses.replace(members[i], source=got)
                fetched.add(where)
            try:
                packaging.rebuild_package(
                    loc.path(path),
                    name,
                    members,
                    algorithm=algorithm,
                    expected_checksum=expected,
                    metadata=meta,
                    created_at=built_at,
                )
            except (ChecksumMismatchError, PackageError) as exc:
                # a raw data package tar it is made of is bad too (its bytes or its size):
                # repair that one, once
                hit = [
                    (pid, m)
                    for pid, m in zip(inner, members, strict=True)
                    if (
                        getattr(exc, "path", None) == str(m.source)
                        or _size_differs(m.source, m.size)
                    )
                    and not str(m.source).startswith(str(scratch_dir))
                ]
                if attempt == 2 or not hit:
                    raise
                pid, member = hit[0]
                fixed = repair_package_copy(
                    ctx, "raw_data_package", pid, loc, member.arcname, member.checksum
                )
                if fixed is not None:
                    _record_repair(ctx, fixed)
                    if not fixed.fixed:
                        raise
                continue
            what = f"the raw data package tars at {loc.label}"
            if gone:
                what += f" ({len(gone)} of them fetched from {', '.join(sorted(fetched))})"
            return what
    finally:
        shutil.rmtree(scratch_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            scratch_dir.parent.rmdir()
    raise AssertionError("unreachable")


def _fetch(
    ctx: Context,
    goods: list[tuple[LocationRef, str | None]],
    member: packaging.Member,
    loc: LocationRef,
    scratch: LocationRef,
) -> tuple[Path, str]:
    """Copy a raw data package tar from the first good copy that works into ``scratch``;
    returns where it now is and where it came from."""
    # a temporary name the stale-file sweeper knows (``.part-<hex>``), should this be killed
    name = f"{member.arcname}.part-{uuid.uuid4().hex[:12]}"
    for good, good_path in goods:
        try:
            repair_copy(
                ctx,
                good,
                good_path or member.arcname,
                scratch,
                name,
                member.checksum,
                member.algorithm,
            )
        except Exception as exc:  # try the next good copy
            log.warning("fetching %s from %s failed: %s", member.arcname, good.label, exc)
            continue
        return scratch.path(name), good.label
    raise StorageError(
        f"{member.arcname}: gone from {loc.label} and no verified copy elsewhere could be fetched",
        retryable=False,
    )


def _note_repair(s: Session, repair: Repair) -> None:
    """Write what a repair found and did on the copy it worked on; a copy rebuilt where no
    row described one gets its row (else its file would never be deleted)."""
    copy = s.scalar(
        select(PhysicalCopy).where(
            getattr(PhysicalCopy, repair.key) == repair.item_id,
            PhysicalCopy.data_location_id == repair.location_id,
        )
    )
    if copy is None:
        if not repair.fixed:
            return
        model, cls = (
            (RawDataPackage, RawDataPackagePhysicalCopy)
            if repair.key == "raw_data_package_id"
            else (DataTransferPackage, DataTransferPackagePhysicalCopy)
        )
        item = s.get(model, repair.item_id)
        assert item is not None
        copy = _upsert_copy(
            s,
            cls,
            repair.key,
            repair.item_id,
            repair.location_id,
            size=item.size,
            checksum=item.checksum,
        )
    copy.failure_reason = repair.note[:1990]
    copy.checksum_verified_at = now() if repair.fixed else None
    gone = (PhysicalCopyStatus.DELETED, PhysicalCopyStatus.DELETION_FAILED)
    if repair.fixed and copy.status in gone:
        # rebuilt where it had been deleted: the file is there again, and its row says so
        # (so that it is deleted in its turn, not left behind for good)
        copy.status, copy.deleted_at = PhysicalCopyStatus.PRESENT, None


def _record_repair(ctx: Context, repair: Repair) -> None:
    """Write a repair's result on its copy now (for a copy other than the task's own)."""
    with ctx.session() as s, s.begin():
        _note_repair(s, repair)


def sidecar_document(s: Session, pkg: RawDataPackage) -> dict[str, Any]:
    """The metadata sidecar stored beside each archived package."""
    files = list(
        s.scalars(
            select(RawDataFile)
            .where(RawDataFile.raw_data_package_id == pkg.id)
            .order_by(RawDataFile.relative_path)
        )
    )
    doc = _package_metadata(s, pkg, files)
    doc.update(
        {
            "format": "ccat-sidecar/1",
            "checksum": pkg.checksum,
            "checksum_algorithm": str(pkg.checksum_algorithm),
            "size": pkg.size,
            "metadata": pkg.package_metadata or {},
            "files": [
                {
                    "id": str(f.id),
                    "path": f.relative_path,
                    "size": f.size,
                    "checksum": f.checksum,
                    "checksum_algorithm": str(f.checksum_algorithm),
                }
                for f in files
            ],
        }
    )
    ivoa = pkg.ivoa_metadata
    if ivoa is not None:
        doc["ivoa"] = {
            c.key: getattr(ivoa, c.key)
            for c in ivoa.__table__.columns
            if c.key not in ("id", "raw_data_package_id")
            and isinstance(getattr(ivoa, c.key), str | int | float | type(None))
        }
    return doc


# --- stage 6: staging ---------------------------------------------------------------------


def staged_path(package_name: str, unpacked: bool) -> str:
    """Where a package is staged inside a PROCESSING location: ``staging/<package>/`` with its
    files when unpacked, ``staging/<package>.tar`` when packed.

    One place per package (a copy is unique per package and location, whichever job asked for
    it): packages whose files share relative paths (two instruments' SOURCEs) never overwrite
    each other, and deleting one package's copy removes only that package's files.
    """
    base = package_name.removesuffix(".tar").replace("/", "_")
    return f"staging/{base}" if unpacked else f"staging/{base}.tar"


def _staged_intact(dst: LocationRef, rel: str, unpacked: bool, files: list[Any]) -> bool:
    """True when a copy staged earlier is all there: the tar, or every file at its size."""
    if not unpacked:
        return dst.path(rel).is_file()
    try:
        return all(dst.path(f"{rel}/{frel}").stat().st_size == size for _, frel, size in files)
    except OSError:
        return False


_BEING_DELETED = (PhysicalCopyStatus.DELETION_SCHEDULED, PhysicalCopyStatus.DELETION_IN_PROGRESS)


def stage(ctx: Context, job_id: int) -> Outcome:
    """Copy a staging job's packages from an archive to PROCESSING (and unpack them there).

    Each package goes to :func:`staged_path`. A package already staged there in the same form
    (for another job, or by an earlier attempt of this one) and still intact is not copied
    again; the job uses that copy, which the deletion rules keep while any active job needs
    it. A package staged in the other form (packed where this job wants it unpacked, or the
    reverse) is converted when no other active job needs it there, and waited for otherwise.
    A package whose copy there is being deleted waits for the deletion to end. Waiting is a
    :class:`CopyBusyError`: PENDING again, the reason says what for, no retry used up.
    """

    def body() -> Callable[[Session], str]:
        with ctx.session() as s:
            job = s.scalar(
                select(StagingJob)
                .where(StagingJob.id == job_id)
                .options(selectinload(StagingJob.raw_data_packages))
            )
            assert job is not None
            if job.origin_location is None:
                raise ConfigurationError(f"staging job {job_id} has no archive to stage from")
            src, dst = _ref(job.origin_location), _ref(job.destination_location)
            if dst.is_remote:
                raise ConfigurationError(f"staging needs {dst.label} mounted on the worker")
            unpack_it = job.unpack
            dest_id = job.destination_location_id
            items = [
                (p.id, p.name, p.relative_path, p.checksum, str(p.checksum_algorithm))
                for p in sorted(job.raw_data_packages, key=lambda p: p.id)
            ]
            files = {
                p.id: [(f.id, f.relative_path, f.size) for f in p.files]
                for p in job.raw_data_packages
            }
            earlier = _staged_copies(s, [i[0] for i in items], dest_id)
            for pid, name, *_ in items:
                _check_other_form(s, job, pid, name, earlier.get(pid), dst)
        mover = ctx.mover(src, dst)
        done: list[tuple[int, str, int | None, str | None]] = []
        reused: list[str] = []
        for pid, name, path, checksum, algorithm in items:
            rel = staged_path(name, unpack_it)
            prior = earlier.get(pid)
            if (
                prior is not None
                and prior[0] == _form(unpack_it)
                and prior[1] == rel
                and _staged_intact(dst, rel, unpack_it, files[pid])
            ):
                done.append((pid, rel, None, None))
                reused.append(name)
                continue
            # unpacking goes through a tar of its own name: the packed form's path may be
            # another job's copy
            tar_rel = f"{rel}.unpacking.tar" if unpack_it else rel
            result = mover.copy(
                src, path, dst, tar_rel, algorithm=algorithm, expected_checksum=checksum
            )
            if unpack_it:
                try:
                    packaging.extract_package(
                        dst.path(tar_rel),
                        dst.path(rel),
                        expected_checksum=checksum,
                        algorithm=algorithm,
                    )
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        dst.path(tar_rel).unlink()
            done.append((pid, rel, result.bytes, result.checksum))

        def commit(s: Session) -> str:
            job = s.get(StagingJob, job_id, with_for_update=True)
            assert job is not None
            # cancelled by its requester while this run copied (the recovery sweeper had
            # taken the run for dead and reset the job, which made it cancellable)
            given_up = job.status == Status.FAILED and not job.active
            now_there = _staged_copies(s, [d[0] for d in done], dest_id, lock=True)
            names = {i[0]: i[1] for i in items}
            replaced: list[str] = []
            try:
                for pid, rel, _size, _checksum in done:
                    there = now_there.get(pid)
                    _check_other_form(s, job, pid, names[pid], there, dst)
                    if (
                        there is not None
                        and there[0] in deletion.LIVE_COPY
                        and there[1] not in (rel, None)
                    ):
                        # the other form, or a folder of the old per-job layout: it goes
                        # once this commit holds, unless another package's copy is in it
                        shared = s.scalar(
                            select(PhysicalCopy.id).where(
                                PhysicalCopy.data_location_id == dest_id,
                                PhysicalCopy.relative_path == there[1],
                                PhysicalCopy.raw_data_package_id != pid,
                                PhysicalCopy.status.in_(deletion.LIVE_COPY),
                            )
                        )
                        if shared is None:
                            replaced.append(str(there[1]))
            except CopyBusyError:
                # another job staged it in the other form meanwhile and still needs it: what
                # this run put there is described by no row, so it goes
                for pid, rel, size, _checksum in done:
                    if size is not None and now_there.get(pid, (None, None))[1] != rel:
                        _remove_staged(dst, rel)
                raise
            stamp = now()
            status = _form(unpack_it)
            for pid, rel, size, checksum in done:
                if size is None:  # reused as it is
                    continue
                _upsert_copy(
                    s,
                    RawDataPackagePhysicalCopy,
                    "raw_data_package_id",
                    pid,
                    dest_id,
                    status=status,
                    relative_path=rel,
                    size=size,
                    checksum=checksum,
                    checksum_verified_at=stamp,
                )
                if not unpack_it:  # packed (perhaps converted from unpacked): no files there
                    _file_copies_gone(s, pid, dest_id, exclude=(PhysicalCopyStatus.DELETED,))
                    continue
                for fid, frel, _size in files[pid]:
                    _upsert_copy(
                        s,
                        RawDataFilePhysicalCopy,
                        "raw_data_file_id",
                        fid,
                        dest_id,
                        status=PhysicalCopyStatus.STAGED,
                        relative_path=f"{rel}/{frel}",
                        checksum_verified_at=stamp,
                    )
            msg = f"staged {len(done)} packages to {dst.label}/staging/"
            if reused:
                msg += f" ({len(reused)} already there: {', '.join(reused[:3])})"
            if replaced:
                msg += f" (converted from the other form: {', '.join(replaced[:3])})"
            if given_up:
                # the copies are recorded (the database keeps agreeing with the disk) and go
                # like any copy no active job needs; the job stays cancelled
                msg = (
                    f"a run that ended after the job was cancelled ({job.failure_reason}) "
                    f"{msg}; kept as copies no active job needs"
                )
                _add_log(s, "staging_job", job_id, "warning", msg, None)
            else:
                state.complete(job, "staging_job")
                _add_log(s, "staging_job", job_id, "info", msg, None)
            # the other form's files go once no row describes them (after this commit; a
            # crash in between leaves files behind, never a row without its files)
            s.info.setdefault("after_commit", []).extend(
                (lambda r=r: _remove_staged(dst, r)) for r in replaced
            )
            return msg

        return commit

    return _run(ctx, "staging_job", job_id, body)


def _form(unpacked: bool) -> PhysicalCopyStatus:
    """The status of a staged package copy: STAGED unpacked, PRESENT packed."""
    return PhysicalCopyStatus.STAGED if unpacked else PhysicalCopyStatus.PRESENT


def _check_other_form(
    s: Session,
    job: StagingJob,
    package_id: int,
    name: str,
    there: tuple[PhysicalCopyStatus, str | None] | None,
    dst: LocationRef,
) -> None:
    """Raise CopyBusyError when the package's copy at the destination is being deleted, or is
    in the other form and another active job needs it; otherwise this job may (re)stage it."""
    if there is None:
        return
    status, rel = there
    if status in _BEING_DELETED:
        raise CopyBusyError(
            f"package {name}: its copy at {dst.label} ({rel}) is being deleted; staging "
            "again once that is done"
        )
    if status not in deletion.LIVE_COPY or status == _form(job.unpack):
        return
    link = staging_job_raw_data_package
    others = s.scalars(
        select(StagingJob.id)
        .join(link, link.c.staging_job_id == StagingJob.id)
        .where(
            link.c.raw_data_package_id == package_id,
            StagingJob.destination_location_id == job.destination_location_id,
            StagingJob.id != job.id,
            deletion.staging_job_in_force(now()),
        )
    ).all()
    if others:
        form = "packed" if status == PhysicalCopyStatus.PRESENT else "unpacked"
        raise CopyBusyError(
            f"package {name} is staged {form} at {dst.label} ({rel}) for staging job(s) "
            f"{', '.join(map(str, others[:5]))}; this job stages it in its own form once "
            "they are released",
            retry_after_s=300.0,
        )


def _remove_staged(dst: LocationRef, rel: str) -> None:
    """Remove a staged tar or folder that no row describes (best effort, logged)."""
    target = dst.path(rel)
    try:
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not remove %s at %s: %s", rel, dst.label, exc)


def _staged_copies(
    s: Session, package_ids: list[int], location_id: int, *, lock: bool = False
) -> dict[int, tuple[PhysicalCopyStatus, str | None]]:
    """(status, path) of the copies these packages have at a PROCESSING location."""
    q = select(PhysicalCopy).where(
        PhysicalCopy.raw_data_package_id.in_(package_ids),
        PhysicalCopy.data_location_id == location_id,
    )
    if lock:
        q = q.with_for_update()
    return {c.raw_data_package_id: (c.status, c.relative_path) for c in s.scalars(q)}


# --- stage 7: deletion --------------------------------------------------------------------


def delete_copies(ctx: Context, copy_ids: list[int]) -> Outcome:
    """Delete scheduled copies (all at one location), re-checking the rules for each first.

    Batched: one transaction claims the whole batch (each copy still goes through
    :func:`deletion.verdicts`, under a row lock), the files are unlinked, each directory is
    fsynced once, and one transaction records the results.
    """
    from .movers.local import fsync_dir

    deleted = refused = failed = 0
    reasons: list[str] = []
    todo: list[tuple[int, LocationRef, str]] = []
    with ctx.session() as s, s.begin():
        copies = s.scalars(
            select(PhysicalCopy)
            .where(PhysicalCopy.id.in_(copy_ids))
            .order_by(PhysicalCopy.id)
            .with_for_update()
        ).all()
        scheduled = [c for c in copies if c.status == PhysicalCopyStatus.DELETION_SCHEDULED]
        decided = deletion.verdicts(s, scheduled)
        paths = _item_paths(s, scheduled)
        for copy in scheduled:
            v = decided[copy.id]
            if not v.allowed:
                copy.status = _status_when_kept(copy, paths.get(copy.id))
                copy.failure_reason = f"deletion refused at run time: {v.reason}"[:1990]
                refused += 1
                continue
            copy.status = PhysicalCopyStatus.DELETION_IN_PROGRESS
            todo.append((copy.id, _ref(copy.data_location), paths[copy.id]))
    ok: list[int] = []
    bad: list[tuple[int, Exception]] = []
    dirs: set[Path] = set()
    for copy_id, loc, rel in todo:
        try:
            local = loc.storage_type == "disk" and not loc.is_remote
            target = loc.path(rel) if local else None
            if target is not None and target.is_dir():
                _remove_tree(loc, rel)
                dirs.add(target.parent)
            elif target is not None:
                with contextlib.suppress(FileNotFoundError):
                    target.unlink()
                dirs.add(target.parent)
            else:
                ctx.mover(loc, loc).delete(loc, rel)
            ok.append(copy_id)
        except Exception as exc:
            bad.append((copy_id, exc))
    for d in dirs:
        fsync_dir(d)
    with ctx.session() as s, s.begin():
        stamp = now()
        loaded = {
            c.id: c
            for c in s.scalars(
                select(PhysicalCopy)
                .where(PhysicalCopy.id.in_(ok + [i for i, _ in bad]))
                .with_for_update()
            )
        }
        for copy_id in ok:
            c = loaded[copy_id]
            if c.status != PhysicalCopyStatus.DELETION_IN_PROGRESS:  # never, while claimed
                log.error(
                    "copy %s changed to %s during its deletion: left as it is", c.id, c.status
                )
                continue
            c.status = PhysicalCopyStatus.DELETED
            c.deleted_at = stamp
            c.failure_reason = None
            if c.copy_type == CopyType.RAW_DATA_PACKAGE and c.raw_data_package_id is not None:
                _files_deletion_possible(s, c)
            deleted += 1
            TASK_METRICS.done("deletion", 0.0)
        for copy_id, exc in bad:
            c = loaded[copy_id]
            c.status = PhysicalCopyStatus.DELETION_FAILED
            c.retry_count = (c.retry_count or 0) + 1
            c.failure_reason = state.describe_error(exc)
            c.last_failure_at = now()
            c.next_attempt_at = now() + dt.timedelta(
                seconds=state.backoff_s(ctx.settings, c.retry_count)
            )
            failed += 1
            reasons.append(state.describe_error(exc))
            TASK_METRICS.failed("deletion", type(exc).__name__)
    detail = f"deleted {deleted}, refused {refused}, failed {failed}"
    if reasons:
        detail += ": " + "; ".join(reasons[:3])
    return Outcome(
        "deletion", ",".join(map(str, copy_ids[:5])), "done" if not failed else "retry", detail
    )


def _status_when_kept(copy: PhysicalCopy, rel: str | None) -> PhysicalCopyStatus:
    """The status a copy goes back to when its deletion is refused at run time: STAGED for
    what staging unpacked at a PROCESSING location (file copies, and package copies that are
    folders), PRESENT for everything else."""
    loc = copy.data_location
    if loc.location_type != LocationType.PROCESSING:
        return PhysicalCopyStatus.PRESENT
    if copy.copy_type == CopyType.RAW_DATA_FILE:
        return PhysicalCopyStatus.STAGED
    ref = _ref(loc)
    local = ref.storage_type == "disk" and not ref.is_remote
    if copy.copy_type == CopyType.RAW_DATA_PACKAGE and local and rel and ref.path(rel).is_dir():
        return PhysicalCopyStatus.STAGED
    return PhysicalCopyStatus.PRESENT


def _files_deletion_possible(s: Session, c: PhysicalCopy) -> None:
    """Staged file copies whose package copy was deleted are gone with it."""
    if c.relative_path and c.relative_path.startswith("staging/"):
        _file_copies_gone(
            s, c.raw_data_package_id, c.data_location_id, only=PhysicalCopyStatus.STAGED
        )


def _file_copies_gone(
    s: Session,
    package_id: int | None,
    location_id: int,
    *,
    only: PhysicalCopyStatus | None = None,
    exclude: tuple[PhysicalCopyStatus, ...] = (),
) -> None:
    """Mark DELETED the copies at ``location_id`` of a package's files (those with status
    ``only``, or all but ``exclude``): its unpacked files are no longer there."""
    q = (
        select(RawDataFilePhysicalCopy)
        .join(RawDataFile, RawDataFile.id == RawDataFilePhysicalCopy.raw_data_file_id)
        .where(
            RawDataFile.raw_data_package_id == package_id,
            RawDataFilePhysicalCopy.data_location_id == location_id,
        )
    )
    if only is not None:
        q = q.where(RawDataFilePhysicalCopy.status == only)
    if exclude:
        q = q.where(RawDataFilePhysicalCopy.status.not_in(exclude))
    stamp = now()
    for fc in s.scalars(q):
        fc.status, fc.deleted_at = PhysicalCopyStatus.DELETED, stamp


def _remove_tree(loc: LocationRef, rel: str) -> None:
    target = loc.path(rel)
    if target.is_dir():
        shutil.rmtree(target)


def _item_paths(s: Session, copies: list[PhysicalCopy]) -> dict[int, str]:
    """Where each copy is at its location: its own path, else its item's (one query per type)."""
    paths = {c.id: c.relative_path for c in copies if c.relative_path}
    rest = [c for c in copies if not c.relative_path]
    for model, key in (
        (RawDataFile, "raw_data_file_id"),
        (RawDataPackage, "raw_data_package_id"),
        (DataTransferPackage, "data_transfer_package_id"),
    ):
        ids = {getattr(c, key) for c in rest if getattr(c, key) is not None}
        if not ids:
            continue
        found = dict(
            s.execute(select(model.id, model.relative_path).where(model.id.in_(ids))).all()
        )
        for c in rest:
            if getattr(c, key) in found:
                paths[c.id] = found[getattr(c, key)]
    return paths


# --- beyond the real system: fixity audit -------------------------------------------------


@contextmanager
def _lease_held(ctx: Context, copy_id: int) -> Iterator[None]:
    """Keep a fixity check's lease on its copy (``next_attempt_at``, set by the fixity
    manager ``scheduled_timeout_s`` ahead) from running out while the check reads: renewed
    from the start of the read and then every third of that, so a check longer than the lease
    (a large copy on slow or tape-backed storage) is not sent again beside itself."""
    lease_s = ctx.settings.scheduled_timeout_s

    def renew() -> None:
        until = dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(seconds=lease_s)
        with ctx.session() as s, s.begin():
            s.execute(
                update(PhysicalCopy)
                .where(PhysicalCopy.id == copy_id, PhysicalCopy.next_attempt_at.is_not(None))
                .values(next_attempt_at=until)
                .execution_options(synchronize_session=False)
            )

    with repeating(renew, lease_s / 3, f"fixity lease {copy_id}"):
        yield


def fixity(ctx: Context, copy_id: int) -> Outcome:
    """Re-read an archived copy; on a mismatch or loss, repair it from a good copy."""
    with ctx.session() as s:
        copy = s.get(PhysicalCopy, copy_id)
        if copy is None or copy.status != PhysicalCopyStatus.PRESENT:
            return Outcome("fixity", str(copy_id), "skipped", "copy not present")
        pkg = s.get(RawDataPackage, copy.raw_data_package_id)
        assert pkg is not None
        loc = _ref(copy.data_location)
        path = copy.relative_path or pkg.relative_path
        expected, algorithm = pkg.checksum, str(pkg.checksum_algorithm)
        others = [
            (_ref(c.data_location), c.relative_path or pkg.relative_path)
            for c in s.scalars(
                select(PhysicalCopy).where(
                    PhysicalCopy.raw_data_package_id == pkg.id,
                    PhysicalCopy.id != copy_id,
                    PhysicalCopy.status == PhysicalCopyStatus.PRESENT,
                    PhysicalCopy.checksum == pkg.checksum,
                    PhysicalCopy.checksum_verified_at.is_not(None),
                )
            )
        ]
    mover = ctx.mover(loc, loc)
    try:
        with _lease_held(ctx, copy_id):
            actual = mover.checksum(loc, path, algorithm=algorithm)
        problem = (
            None
            if actual == expected
            else ChecksumMismatchError(path, expected or "", actual, algorithm)
        )
    except TransferSystemError as exc:
        problem = exc
    if problem is None:
        with ctx.session() as s, s.begin():
            c = s.get(PhysicalCopy, copy_id)
            assert c is not None
            c.checksum_verified_at = now()
            c.next_attempt_at = None
        TASK_METRICS.done("fixity", 0.0)
        return Outcome("fixity", str(copy_id), "done", "checksum matches")
    TASK_METRICS.failed("fixity", type(problem).__name__)
    repaired_from = None
    for other_loc, other_path in others:
        try:
            repair_copy(ctx, other_loc, other_path, loc, path, expected, algorithm)
            repaired_from = other_loc.label
            break
        except Exception as exc:  # try the next good copy
            log.warning("repair of %s from %s failed: %s", path, other_loc.label, exc)
    with ctx.session() as s, s.begin():
        c = s.get(PhysicalCopy, copy_id)
        assert c is not None
        if repaired_from:
            c.checksum_verified_at = now()
            c.next_attempt_at = None
            c.failure_reason = (
                f"repaired from {repaired_from} after {state.describe_error(problem)}"[:1990]
            )
        else:
            # checked again after a back-off (it would come first in every pass otherwise,
            # ahead of every copy that is due)
            c.checksum_verified_at = None
            c.failure_reason = (
                f"bad copy, no good copy to repair from: {state.describe_error(problem)}"[:1990]
            )
            c.last_failure_at = now()
            c.retry_count = (c.retry_count or 0) + 1
            c.next_attempt_at = now() + dt.timedelta(
                seconds=state.backoff_s(ctx.settings, c.retry_count)
            )
    return Outcome(
        "fixity",
        str(copy_id),
        "done" if repaired_from else "failed",
        f"repaired from {repaired_from}" if repaired_from else state.describe_error(problem),
    )


def repair_copy(
    ctx: Context,
    good: LocationRef,
    good_path: str,
    bad: LocationRef,
    bad_path: str,
    expected: str | None,
    algorithm: str,
) -> None:
    """Overwrite a bad copy with a good one (through a local scratch file when both ends are
    object stores), verifying the checksum on the way."""
    if good.storage_type == "s3" and bad.storage_type == "s3":
        scratch_root = Path(ctx.settings.log_dir).resolve().parent / "scratch"
        scratch_root.mkdir(parents=True, exist_ok=True)
        scratch = LocationRef(
            id=0,
            site="local",
            name="scratch",
            location_type="buffer",
            storage_type="disk",
            root_path=str(scratch_root),
        )
        tmp = f"repair-{uuid.uuid4().hex}.tar"
        try:
            ctx.mover(good, scratch).copy(
                good, good_path, scratch, tmp, algorithm=algorithm, expected_checksum=expected
            )
            ctx.mover(scratch, bad, None, {"overwrite": True}).copy(
                scratch, tmp, bad, bad_path, algorithm=algorithm, expected_checksum=expected
            )
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(scratch_root / tmp)
        return
    mover = ctx.mover(good, bad, None, {"overwrite": True})
    mover.copy(good, good_path, bad, bad_path, algorithm=algorithm, expected_checksum=expected)


OPERATIONS: dict[str, Callable[[Context, Any], Outcome]] = {
    "raw_data_package": create_raw_data_package,
    "data_transfer_package": create_data_transfer_package,
    "data_transfer": transfer,
    "unpack": unpack,
    "long_term_archive_transfer": archive,
    "staging_job": stage,
    "deletion": delete_copies,
    "fixity": fixity,
}

__all__ = ["OPERATIONS", "Context", "Outcome"]
