"""The pipeline end to end, in one process (managers + operations, no broker).

Real PostgreSQL, real files in three site folders, archives on moto's S3 server. The Celery
version of the same run (separate worker processes, Redis) is in test_e2e_celery.py.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterable
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ccat_ops_db.enums import LocationType, PackageState, PhysicalCopyStatus, Status
from data_transfer import deletion
from data_transfer.checksums import hash_bytes
from data_transfer.inline import QueueDispatcher, run_all_once
from data_transfer.managers import run_pass
from data_transfer.operations import Context
from tests.transfer.stack import Stack, transfer_settings


def ctx_for(stack: Stack, **overrides) -> Context:
    return Context(engine=stack.engine, settings=transfer_settings(stack.root, **overrides))


def run_until_quiet(ctx: Context, passes: int = 12) -> None:
    for _ in range(passes):
        run_all_once(ctx, QueueDispatcher())


def check_archive_bytes(stack: Stack, sites: Iterable[str] | None = None) -> int:
    """Every file in every archived package, read back from S3 (at every archive site, or
    at ``sites``), equals the original bytes."""
    client = stack.s3.client()
    checked = 0
    with Session(stack.engine) as s:
        for pkg in s.scalars(select(m.RawDataPackage)):
            for loc_key, bucket in stack.buckets.items():
                site = loc_key.split("/")[0]
                if sites is not None and site not in sites:
                    continue
                lta = s.scalar(
                    select(m.S3DataLocation).join(m.Site).where(m.Site.short_name == site)
                )
                body = client.get_object(Bucket=bucket, Key=lta.key_prefix + pkg.relative_path)
                blob = body["Body"].read()
                assert hash_bytes(blob, str(pkg.checksum_algorithm)) == pkg.checksum
                meta = body["Metadata"]
                assert pkg.checksum in meta.get("ccat-checksum", ""), meta
                with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
                    for f in pkg.files:
                        data = tar.extractfile(f.relative_path).read()
                        assert (
                            hashlib.sha256(data).hexdigest().encode()
                            == stack.originals[f.relative_path]
                        )
                        checked += 1
                sidecar = client.get_object(
                    Bucket=bucket, Key=lta.key_prefix + pkg.relative_path + ".meta.json"
                )["Body"].read()
                assert pkg.name.encode() in sidecar
    return checked


def test_files_reach_both_archives_and_upstream_copies_go(stack: Stack) -> None:
    stack.file_observation(files=5, seed=1)
    stack.file_observation(files=4, seed=2, instrument_module="LFA", source="chai_raw_data")
    ctx = ctx_for(stack)
    run_until_quiet(ctx)
    with Session(stack.engine) as s:
        pkgs = s.scalars(select(m.RawDataPackage)).all()
        assert len(pkgs) == 2
        assert {p.state for p in pkgs} == {PackageState.ARCHIVED}
        # package tars carry the fast transport checksum; files keep the instrument's sha256
        assert {str(p.checksum_algorithm) for p in pkgs} == {"xxh3_128"}
        assert {str(f.checksum_algorithm) for p in pkgs for f in p.files} == {"sha256"}
        dtps = s.scalars(select(m.DataTransferPackage)).all()
        assert dtps and {str(d.checksum_algorithm) for d in dtps} == {"xxh3_128"}
        # both archive sites hold a verified copy of every package
        lta_copies = s.scalars(
            select(m.PhysicalCopy)
            .join(m.DataLocation)
            .where(m.DataLocation.location_type == LocationType.LONG_TERM_ARCHIVE)
        ).all()
        assert len(lta_copies) == 4
        assert all(c.checksum_verified_at is not None for c in lta_copies)
        # the primary transfer left the telescope once; the second archive got a secondary
        transfers = s.scalars(select(m.DataTransfer)).all()
        from_ccat = [t for t in transfers if t.origin_location.site.short_name == "ccat"]
        assert len(from_ccat) == 1
        assert any(t.is_secondary for t in transfers)
        assert all(t.status == Status.COMPLETED for t in transfers)
        # SOURCE and telescope BUFFER copies deleted, each only after archiving
        upstream = s.scalars(
            select(m.PhysicalCopy)
            .join(m.DataLocation)
            .where(m.DataLocation.location_type.in_([LocationType.SOURCE, LocationType.BUFFER]))
        ).all()
        assert upstream and all(c.status == PhysicalCopyStatus.DELETED for c in upstream)
        for c in upstream:
            for pid in deletion.packages_held(s, c):
                pkg = s.get(m.RawDataPackage, pid)
                assert pkg.archived_at is not None and pkg.archived_at <= c.deleted_at
    # the bytes are gone from the SOURCE folders and the buffers
    for key in ("ccat/primecam_raw_data", "ccat/chai_raw_data", "ccat/buffer", "cologne/buffer"):
        leftovers = [p for p in stack.roots[key].rglob("*") if p.is_file()]
        assert leftovers == [], (key, leftovers)
    assert check_archive_bytes(stack) == 2 * 9


def test_nothing_is_deleted_before_archiving(stack: Stack) -> None:
    stack.file_observation(files=3, seed=3)
    ctx = ctx_for(stack)
    d = QueueDispatcher()
    # stop before the archive stage: everything up to unpack, several times
    for _ in range(4):
        for name in (
            "raw_data_packages",
            "transfer_packages",
            "transfers",
            "unpacking",
            "deletion",
        ):
            run_pass(name, ctx.engine, ctx.settings, d)
            d.drain(ctx)
    with Session(stack.engine) as s:
        deleted = s.scalar(
            select(func.count())
            .select_from(m.PhysicalCopy)
            .where(m.PhysicalCopy.status != PhysicalCopyStatus.PRESENT)
        )
        assert deleted == 0
        assert s.scalar(select(func.count()).select_from(m.RawDataPackage)) == 1
    src = [p for p in stack.roots["ccat/primecam_raw_data"].rglob("*") if p.is_file()]
    assert len(src) == 3


def test_corrupted_transfer_is_detected_and_repaired(stack: Stack) -> None:
    stack.file_observation(files=4, seed=4, sizes=(50_000, 90_000))
    ctx = ctx_for(stack)
    d = QueueDispatcher()
    for name in ("raw_data_packages", "transfer_packages", "transfer_packages", "transfers"):
        run_pass(name, ctx.engine, ctx.settings, d)
        d.drain(ctx)
    with Session(stack.engine) as s:
        t = s.scalars(select(m.DataTransfer)).one()
        assert t.status == Status.COMPLETED
        dtp_path = stack.roots["cologne/buffer"] / t.data_transfer_package.relative_path
    # flip one byte in the middle of the transferred package (inside a file's data)
    raw = bytearray(dtp_path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    dtp_path.write_bytes(bytes(raw))
    run_pass("unpacking", ctx.engine, ctx.settings, d)
    outcomes = d.drain(ctx)
    assert [o.result for o in outcomes] == ["retry"]
    with Session(stack.engine) as s:
        t = s.scalars(select(m.DataTransfer)).one()
        assert t.status == Status.PENDING  # fetched again from the telescope buffer
        assert "ChecksumMismatchError" in (t.unpack_failure_reason or "")
        assert "re-fetch" in (t.failure_reason or "")
        bad = s.scalar(
            select(m.PhysicalCopy).where(
                m.PhysicalCopy.data_transfer_package_id == t.data_transfer_package_id,
                m.PhysicalCopy.data_location_id == t.destination_location_id,
            )
        )
        assert bad.status == PhysicalCopyStatus.DELETED
        # why this BUFFER copy went before archiving (the deletion invariant of
        # test_properties tells a dropped bad copy from a deletion by this)
        assert bad.failure_reason.startswith("dropped for a re-fetch: ChecksumMismatchError")
    run_until_quiet(ctx)
    with Session(stack.engine) as s:
        assert {p.state for p in s.scalars(select(m.RawDataPackage))} == {PackageState.ARCHIVED}
    assert check_archive_bytes(stack) == 2 * 4  # both archives


def test_permanent_failure_stops_after_its_retry_bound(stack: Stack) -> None:
    """A transfer that can never succeed stops after max_retries, its reason visible."""
    stack.file_observation(files=2, seed=5)
    ctx = ctx_for(stack, max_retries=2)
    d = QueueDispatcher()
    for name in ("raw_data_packages", "transfer_packages", "transfer_packages"):
        run_pass(name, ctx.engine, ctx.settings, d)
        d.drain(ctx)
    # The link to Cologne is down: the destination buffer is reached over ssh on a loopback
    # port where nothing listens, so every attempt fails with a real "connection refused".
    stack.cut_link_to_cologne()
    attempts = 0
    for _ in range(8):
        run_pass("transfers", ctx.engine, ctx.settings, d)
        attempts += len(d.drain(ctx))
    with Session(stack.engine) as s:
        t = s.scalars(select(m.DataTransfer)).one()
        assert t.status == Status.FAILED
        assert t.retry_count == 3  # first attempt + 2 retries
        assert attempts == 3
        reason = t.failure_reason or ""
        assert reason.startswith("NetworkError:") and "log:" in reason, reason
        log_path = reason.split("log: ", 1)[1].rstrip(")")
        assert Path(log_path).is_file()
        logs = s.scalars(
            select(m.DataTransferLog).where(m.DataTransferLog.data_transfer_id == t.id)
        ).all()
        assert len([x for x in logs if x.level == "error"]) == 3


def test_a_killed_archive_attempt_leaves_no_sidecar_behind(stack: Stack) -> None:
    """An archive task killed after writing its metadata sidecar into the BUFFER (before it
    could remove it) leaves a file there; the record's next attempt overwrites and removes it."""
    from data_transfer.operations import SIDECAR_DIR

    stack.file_observation(files=3, seed=6)
    ctx = ctx_for(stack)
    d = QueueDispatcher()
    for _ in range(3):  # everything up to the unpacked packages at cologne
        for name in ("raw_data_packages", "transfer_packages", "transfers", "unpacking"):
            run_pass(name, ctx.engine, ctx.settings, d)
            d.drain(ctx)
    run_pass("archive", ctx.engine, ctx.settings, d)
    archive_tasks = [t for t in d.pending if t.kind == "long_term_archive_transfer"]
    assert archive_tasks, [t.kind for t in d.pending]
    planted = []
    for task in archive_tasks:  # what a killed attempt of each left behind
        ltat_id = task.payload if isinstance(task.payload, int) else task.payload["id"]
        with Session(stack.engine) as s:
            a = s.get(m.LongTermArchiveTransfer, ltat_id)
            root = Path(a.origin_location.root_path)
        leftover = root / SIDECAR_DIR / f"{ltat_id}.json"
        leftover.parent.mkdir(parents=True, exist_ok=True)
        leftover.write_text('{"half": ')
        planted.append(leftover)
    d.drain(ctx)
    run_until_quiet(ctx)
    assert [p for p in planted if p.exists()] == []
    for key in ("ccat/buffer", "cologne/buffer"):
        assert [p for p in stack.roots[key].rglob("*") if p.is_file()] == [], key
    assert check_archive_bytes(stack) == 3 * 2
