"""Disk full: a BUFFER that fills up stops taking new packages with a clear reason, without
using up retries, and resumes by itself once space returns; a write cut short by a full disk
leaves nothing that is taken for a complete file.

The full disk is real: each BUFFER under test is a small tmpfs mounted over its folder (the
tests run as root: ``mount -t tmpfs``; they fail, saying so, when not root). PostgreSQL and the
S3 archives are the real servers of the transfer tests; the managers and operations run in
this process (data_transfer.inline), the same code the workers run.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ccat_ops_db.enums import PackageState, Status
from data_transfer import packaging
from data_transfer.errors import StorageError
from data_transfer.inline import QueueDispatcher
from data_transfer.locations import LocationRef
from data_transfer.managers import MANAGERS, run_pass
from data_transfer.movers.local import LocalMover
from data_transfer.movers.space import BufferFullError, ensure_space
from data_transfer.operations import Context
from tests.transfer.stack import Stack, make_stack, transfer_settings

KB = 1024


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the disk-full tests mount a small tmpfs: run them as root (mount -t tmpfs)")


class Tmpfs:
    """A tmpfs of ``size`` bytes mounted over ``path`` (its contents hidden meanwhile)."""

    def __init__(self, path: Path, size: int) -> None:
        _require_root()
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True
        )

    def fill(self, leave: int, name: str = "filler.bin") -> Path:
        """Write a file that leaves about ``leave`` bytes free."""
        import shutil

        free = shutil.disk_usage(self.path).free
        filler = self.path / name
        with open(filler, "wb") as f:
            f.write(b"\0" * max(free - leave, 0))
        return filler

    def umount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def stack(pg_url: str, tmp_path: Path, s3_server) -> Iterator[Stack]:
    st = make_stack(pg_url, tmp_path, s3_server, None)
    yield st
    st.engine.dispose()


def drive(ctx: Context, d: QueueDispatcher, passes: int = 1) -> None:
    for _ in range(passes):
        for name in MANAGERS:
            run_pass(name, ctx.engine, ctx.settings, d, ctx.heartbeats)
            d.drain(ctx)


def _pkgs(stack: Stack) -> list[m.RawDataPackage]:
    with Session(stack.engine, expire_on_commit=False) as s:
        return list(s.scalars(select(m.RawDataPackage).order_by(m.RawDataPackage.id)))


@pytest.mark.timeout(180)
def test_full_telescope_buffer_waits_with_reason_then_resumes(stack: Stack) -> None:
    """Stage 1: the raw data package is not started while the BUFFER is full."""
    fs = Tmpfs(stack.roots["ccat/buffer"], 2 * 1024 * KB)
    try:
        stack.file_observation(files=8, sizes=(60 * KB, 120 * KB), seed=1)
        filler = fs.fill(leave=200 * KB)
        ctx = Context(
            engine=stack.engine,
            settings=transfer_settings(stack.root, buffer_full_recheck_s=1.0),
        )
        d = QueueDispatcher()
        drive(ctx, d, passes=3)
        (pkg,) = _pkgs(stack)
        assert pkg.status == Status.PENDING and pkg.state == PackageState.WAITING
        assert pkg.retry_count == 0  # waiting for space is not a failed attempt
        reason = pkg.failure_reason or ""
        assert reason.startswith("BufferFullError: BUFFER ccat/buffer has "), reason
        assert " bytes free, needs " in reason
        assert pkg.next_attempt_at is not None
        # nothing was written: no package, no temporary file
        assert [p.name for p in fs.path.rglob("*") if p.is_file()] == ["filler.bin"]
        tries = [o for t, o in d.log if t.kind == "raw_data_package"]
        assert len(tries) == 1  # the recheck waits buffer_full_recheck_s: no retry storm
        # space comes back: the next attempt after the recheck delay goes through
        filler.unlink()
        time.sleep(1.2)
        drive(ctx, d, passes=8)
        (pkg,) = _pkgs(stack)
        assert pkg.state == PackageState.ARCHIVED, pkg.failure_reason
        assert pkg.failure_reason is None and pkg.retry_count == 0
    finally:
        fs.umount()


@pytest.mark.timeout(180)
def test_reserve_setting_and_stale_part_files_are_swept(stack: Stack) -> None:
    """The reserve (CCAT_TRANSFER_BUFFER_MIN_FREE_BYTES) counts; an old ``.part-*`` file left by
    a killed writer is removed when space is short, and the package then fits."""
    fs = Tmpfs(stack.roots["ccat/buffer"], 2 * 1024 * KB)
    try:
        stack.file_observation(files=4, sizes=(50 * KB, 60 * KB), seed=2)
        stale = fs.fill(leave=700 * KB, name="old.tar.part-0123456789ab")
        # ageing is for real (the sweeper reads ctime too, which cannot be back-dated): the
        # left-over is older than the maximum age when the writer's file is made
        time.sleep(3.3)
        fresh = fs.path / "busy.tar.part-abcdef012345"  # a writer at work: must stay
        fresh.write_bytes(b"x" * 10 * KB)
        ctx = Context(
            engine=stack.engine,
            settings=transfer_settings(
                stack.root,
                buffer_min_free_bytes=600 * KB,
                part_file_max_age_s=3,
                part_sweep_interval_s=3600,
            ),
        )
        d = QueueDispatcher()
        for name in ("raw_data_packages",):
            run_pass(name, ctx.engine, ctx.settings, d)
            d.drain(ctx)
        (pkg,) = _pkgs(stack)
        assert pkg.status == Status.COMPLETED, pkg.failure_reason
        assert not stale.exists() and fresh.exists()
        # with a reserve bigger than the disk, nothing fits: the reason names the reserve
        loc = LocationRef(1, "ccat", "buffer", "buffer", "disk", root_path=str(fs.path))
        with pytest.raises(BufferFullError, match=r"needs 1 \(\+ 99999999999 reserved\)"):
            ensure_space(loc, 1, min_free_bytes=99_999_999_999)
    finally:
        fs.umount()


@pytest.mark.timeout(180)
def test_full_destination_buffer_unpack_waits_then_resumes(stack: Stack) -> None:
    """Stage 4: the unpack at Cologne waits while its BUFFER is full, then completes."""
    fs = Tmpfs(stack.roots["cologne/buffer"], 3 * 1024 * KB)
    try:
        stack.file_observation(files=6, sizes=(60 * KB, 100 * KB), seed=3)
        ctx = Context(
            engine=stack.engine,
            settings=transfer_settings(stack.root, buffer_full_recheck_s=1.0),
        )
        d = QueueDispatcher()
        for name in ("raw_data_packages", "transfer_packages", "transfer_packages", "transfers"):
            run_pass(name, ctx.engine, ctx.settings, d)
            d.drain(ctx)
        with Session(stack.engine) as s:
            t = s.scalars(select(m.DataTransfer)).one()
            assert t.status == Status.COMPLETED and t.unpack_status == Status.PENDING
            size = t.data_transfer_package.size
        filler = fs.fill(leave=size // 2)
        for _ in range(3):
            run_pass("unpacking", ctx.engine, ctx.settings, d)
            d.drain(ctx)
        with Session(stack.engine) as s:
            t = s.scalars(select(m.DataTransfer)).one()
            assert t.unpack_status == Status.PENDING and t.unpack_retry_count == 0
            reason = t.unpack_failure_reason or ""
            assert reason.startswith("BufferFullError: BUFFER cologne/buffer has "), reason
        assert len([1 for task, _ in d.log if task.kind == "unpack"]) == 1
        filler.unlink()
        time.sleep(1.2)
        drive(ctx, d, passes=8)
        for pkg in _pkgs(stack):
            assert pkg.state == PackageState.ARCHIVED
    finally:
        fs.umount()


@pytest.mark.timeout(120)
def test_enospc_mid_write_leaves_no_partial_file(tmp_path: Path) -> None:
    """A real ENOSPC while a package is written or copied: an error naming the cause, and
    neither the final name nor a temporary file is left behind."""
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    data = os.urandom(700 * KB)
    (src_dir / "a.dat").write_bytes(data)
    member = packaging.Member(
        source=src_dir / "a.dat",
        arcname="a.dat",
        size=len(data),
        checksum=hashlib.sha256(data).hexdigest(),
        algorithm="sha256",
    )
    fs = Tmpfs(tmp_path / "small", 512 * KB)
    try:
        dest = fs.path / "raw_data_packages" / "p.tar"
        with pytest.raises(Exception) as err:
            packaging.build_package(dest, "p", [member], algorithm="sha256", metadata={})
        assert "no space" in str(err.value).lower() or "ENOSPC" in repr(err.value), err.value
        assert [p for p in fs.path.rglob("*") if p.is_file()] == []
        src = LocationRef(1, "s", "src", "buffer", "disk", root_path=str(src_dir))
        dst = LocationRef(2, "s", "small", "buffer", "disk", root_path=str(fs.path))
        with pytest.raises(StorageError, match="no space left"):
            LocalMover().copy(src, "a.dat", dst, "copied/a.dat", algorithm="sha256")
        assert [p for p in fs.path.rglob("*") if p.is_file()] == []
    finally:
        fs.umount()


def test_real_enospc_during_a_task_waits_without_using_a_retry() -> None:
    """The error a writer raises on ENOSPC (see above) puts the record back to wait for space,
    like the check before the write, instead of counting an attempt."""
    from data_transfer import state
    from data_transfer.movers.local import storage_error
    from tests.transfer.stack import transfer_settings

    pkg = m.RawDataPackage(status=Status.IN_PROGRESS, retry_count=0)
    exc = storage_error(OSError(28, "No space left on device"), "write ccat/buffer:p.tar")
    settings = transfer_settings(Path("/tmp"), max_retries=0, buffer_full_recheck_s=30)
    assert state.record_failure(None, pkg, "raw_data_package", exc, settings) is False  # type: ignore[arg-type]
    assert pkg.status == Status.PENDING and pkg.retry_count == 0
    assert pkg.failure_reason.startswith("StorageError: write ccat/buffer:p.tar: no space left")
    assert pkg.next_attempt_at is not None
    # any other storage error counts (and with max_retries 0, fails for good)
    other = storage_error(OSError(5, "Input/output error"), "write ccat/buffer:p.tar")
    assert state.record_failure(None, pkg, "raw_data_package", other, settings) is True  # type: ignore[arg-type]
    assert pkg.status == Status.FAILED and pkg.retry_count == 1
