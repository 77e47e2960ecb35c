"""Stage 6, staging: one place per package at a PROCESSING location, shared by the jobs that
ask for it, and never pulled from under a job by a deletion.

Real PostgreSQL, the local mover, the in-process dispatcher; the archive is moto's S3 server.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ccat_ops_db.enums import PackageState, PhysicalCopyStatus, Status
from data_transfer.inline import QueueDispatcher
from data_transfer.managers import run_pass
from data_transfer.operations import Context, staged_path

from .stack import Stack, passes
from .test_pipeline import ctx_for, run_until_quiet


def archived(stack: Stack, ctx: Context) -> list[int]:
    """Run the pipeline until quiet; the ids of the packages, every one ARCHIVED."""
    run_until_quiet(ctx)
    with Session(stack.engine) as s:
        pkgs = s.scalars(select(m.RawDataPackage).order_by(m.RawDataPackage.id)).all()
        assert {p.state for p in pkgs} == {PackageState.ARCHIVED}
        return [p.id for p in pkgs]


def new_job(stack: Stack, package_ids: list[int], *, unpack: bool = True) -> int:
    with Session(stack.engine) as s, s.begin():
        pkgs = s.scalars(select(m.RawDataPackage).where(m.RawDataPackage.id.in_(package_ids)))
        job = m.StagingJob(
            name="t",
            destination_location_id=stack.location_id("cologne", "ramses"),
            raw_data_packages=list(pkgs),
            unpack=unpack,
        )
        s.add(job)
        s.flush()
        return job.id


def release(stack: Stack, job_id: int) -> None:
    with Session(stack.engine) as s, s.begin():
        job = s.get(m.StagingJob, job_id)
        job.active = False
        job.released_at = dt.datetime.now(dt.UTC)


def ramses_copy(s: Session, stack: Stack, package_id: int) -> m.PhysicalCopy:
    return s.scalars(
        select(m.PhysicalCopy).where(
            m.PhysicalCopy.raw_data_package_id == package_id,
            m.PhysicalCopy.data_location_id == stack.location_id("cologne", "ramses"),
        )
    ).one()


def staged_files_match(stack: Stack, package_id: int) -> int:
    """Every file of the package is at its recorded staged path with its filed checksum."""
    root = stack.roots["cologne/ramses"]
    with Session(stack.engine) as s:
        pkg = s.get(m.RawDataPackage, package_id)
        copy = ramses_copy(s, stack, package_id)
        assert copy.status == PhysicalCopyStatus.STAGED, copy.status
        assert copy.relative_path == staged_path(pkg.name, unpacked=True)
        for f in pkg.files:
            data = (root / copy.relative_path / f.relative_path).read_bytes()
            assert hashlib.sha256(data).hexdigest() == f.checksum, f.relative_path
            fc = s.scalars(
                select(m.PhysicalCopy).where(
                    m.PhysicalCopy.raw_data_file_id == f.id,
                    m.PhysicalCopy.data_location_id == copy.data_location_id,
                )
            ).one()
            assert fc.status == PhysicalCopyStatus.STAGED
            assert fc.relative_path == f"{copy.relative_path}/{f.relative_path}"
        return len(pkg.files)


def test_two_instruments_files_with_the_same_paths_do_not_overwrite_each_other(
    stack: Stack,
) -> None:
    """Relative paths are unique per SOURCE only: Prime-Cam and CHAI may both file
    ``<night>/scan_000.dat``. Staged together, each package keeps its own bytes."""
    ctx = ctx_for(stack)
    stack.file_observation(files=3, seed=1, sizes=(1_000, 5_000))
    chai = stack.file_observation(
        files=3, seed=2, sizes=(1_000, 5_000), source="chai_raw_data", instrument_module="LFA"
    )
    with Session(stack.engine) as s, s.begin():  # CHAI's files take Prime-Cam's paths
        prime = s.scalars(
            select(m.RawDataFile)
            .where(m.RawDataFile.executed_obs_unit_id != chai)
            .order_by(m.RawDataFile.relative_path)
        ).all()
        theirs = s.scalars(
            select(m.RawDataFile)
            .where(m.RawDataFile.executed_obs_unit_id == chai)
            .order_by(m.RawDataFile.relative_path)
        ).all()
        for mine, other in zip(prime, theirs, strict=True):
            old = stack.roots["ccat/chai_raw_data"] / other.relative_path
            new = stack.roots["ccat/chai_raw_data"] / mine.relative_path
            new.parent.mkdir(parents=True, exist_ok=True)
            old.rename(new)
            other.relative_path = mine.relative_path
    pkgs = archived(stack, ctx)
    assert len(pkgs) == 2
    job = new_job(stack, pkgs)

    assert passes(ctx, "staging") == ["done"]

    assert staged_files_match(stack, pkgs[0]) == staged_files_match(stack, pkgs[1]) == 3
    with Session(stack.engine) as s:
        assert s.get(m.StagingJob, job).status == Status.COMPLETED


def test_two_jobs_share_one_copy_and_it_goes_when_both_are_released(stack: Stack) -> None:
    ctx = ctx_for(stack)
    stack.file_observation(files=3, seed=3, sizes=(1_000, 5_000))
    (pkg,) = archived(stack, ctx)
    first = new_job(stack, [pkg])
    assert passes(ctx, "staging") == ["done"]
    second = new_job(stack, [pkg])
    assert passes(ctx, "staging") == ["done"]
    with Session(stack.engine) as s:
        assert s.get(m.StagingJob, second).status == Status.COMPLETED
        logs = [x.message for x in s.scalars(select(m.DataTransferLog))]
        assert any("1 already there" in x for x in logs), logs
    staged = stack.roots["cologne/ramses"] / staged_path(_name(stack, pkg), unpacked=True)

    release(stack, first)  # the second job still needs the copy: it stays
    passes(ctx, "deletion", "deletion")
    assert staged_files_match(stack, pkg) == 3

    release(stack, second)
    passes(ctx, "deletion")
    with Session(stack.engine) as s:
        assert ramses_copy(s, stack, pkg).status == PhysicalCopyStatus.DELETED
    assert not staged.exists()
    assert not any(p.is_file() for p in stack.roots["cologne/ramses"].rglob("*"))


def test_a_job_waits_while_the_copy_it_needs_is_being_deleted(stack: Stack) -> None:
    """A deletion claimed the copy (the job before was released) when a new job arrives: the
    new job waits without using a retry, then stages afresh."""
    ctx = ctx_for(stack)
    stack.file_observation(files=3, seed=4, sizes=(1_000, 5_000))
    (pkg,) = archived(stack, ctx)
    first = new_job(stack, [pkg])
    passes(ctx, "staging")
    release(stack, first)
    with Session(stack.engine) as s, s.begin():  # a deletion task is working on it now
        ramses_copy(s, stack, pkg).status = PhysicalCopyStatus.DELETION_IN_PROGRESS
    second = new_job(stack, [pkg])

    assert passes(ctx, "staging") == ["retry"]
    with Session(stack.engine) as s, s.begin():
        job = s.get(m.StagingJob, second)
        assert job.status == Status.PENDING and job.retry_count == 0
        assert "is being deleted" in job.failure_reason, job.failure_reason
        job.next_attempt_at = None  # the wait is over
        copy = ramses_copy(s, stack, pkg)  # the deletion ends
        copy.status, copy.deleted_at = PhysicalCopyStatus.DELETED, dt.datetime.now(dt.UTC)
        for f in s.get(m.RawDataPackage, pkg).files:
            (stack.roots["cologne/ramses"] / copy.relative_path / f.relative_path).unlink()

    assert passes(ctx, "staging") == ["done"]
    assert staged_files_match(stack, pkg) == 3


def test_a_deletion_refused_at_run_time_leaves_a_staged_copy_staged(stack: Stack) -> None:
    """The deletion was scheduled while no job needed the copy; a job asking for it arrived
    before the task ran. The task refuses, and the copy is STAGED again (not PRESENT, which
    would read as a packed tar), so the new job uses it as it is."""
    ctx = ctx_for(stack)
    stack.file_observation(files=3, seed=5, sizes=(1_000, 5_000))
    (pkg,) = archived(stack, ctx)
    first = new_job(stack, [pkg])
    passes(ctx, "staging")
    release(stack, first)
    d = QueueDispatcher()
    run_pass("deletion", ctx.engine, ctx.settings, d)
    with Session(stack.engine) as s:
        assert ramses_copy(s, stack, pkg).status == PhysicalCopyStatus.DELETION_SCHEDULED
    second = new_job(stack, [pkg])
    d.drain(ctx)
    with Session(stack.engine) as s:
        copy = ramses_copy(s, stack, pkg)
        assert copy.status == PhysicalCopyStatus.STAGED
        assert "deletion refused at run time" in copy.failure_reason
    assert passes(ctx, "staging") == ["done"]
    with Session(stack.engine) as s:
        assert s.get(m.StagingJob, second).status == Status.COMPLETED
    assert staged_files_match(stack, pkg) == 3


def test_the_other_form_waits_for_the_jobs_using_it_then_is_converted(stack: Stack) -> None:
    """One copy per package and location: a job that wants a package unpacked where another
    active job has it packed waits (no retry used); once that job is released, the copy is
    converted, and back again for a later packed job."""
    ctx = ctx_for(stack)
    stack.file_observation(files=3, seed=6, sizes=(1_000, 5_000))
    (pkg,) = archived(stack, ctx)
    root, name = stack.roots["cologne/ramses"], _name(stack, pkg)
    packed_job = new_job(stack, [pkg], unpack=False)
    assert passes(ctx, "staging") == ["done"]
    tar = root / staged_path(name, unpacked=False)
    with Session(stack.engine) as s:
        copy = ramses_copy(s, stack, pkg)
        assert copy.status == PhysicalCopyStatus.PRESENT
        assert copy.relative_path == staged_path(name, unpacked=False) and tar.is_file()

    unpacked_job = new_job(stack, [pkg], unpack=True)
    assert passes(ctx, "staging") == ["retry"]
    _assert_waits(stack, unpacked_job, f"staged packed at cologne/ramses ({tar.relative_to(root)})")
    assert tar.is_file() and not (root / staged_path(name, unpacked=True)).exists()

    release(stack, packed_job)
    assert passes(ctx, "staging") == ["done"]
    assert staged_files_match(stack, pkg) == 3
    assert not tar.exists()  # converted: the packed form is gone
    assert not (root / "staging" / f"{name}.unpacking.tar").exists()

    packed_again = new_job(stack, [pkg], unpack=False)
    assert passes(ctx, "staging") == ["retry"]
    _assert_waits(stack, packed_again, "staged unpacked at cologne/ramses")
    release(stack, unpacked_job)
    assert passes(ctx, "staging") == ["done"]
    with Session(stack.engine) as s:
        copy = ramses_copy(s, stack, pkg)
        assert copy.status == PhysicalCopyStatus.PRESENT and tar.is_file()
        files = s.scalars(
            select(m.PhysicalCopy).where(
                m.PhysicalCopy.data_location_id == copy.data_location_id,
                m.PhysicalCopy.raw_data_file_id.is_not(None),
            )
        ).all()
        assert {f.status for f in files} == {PhysicalCopyStatus.DELETED}
    assert not (root / staged_path(name, unpacked=True)).exists()


def test_a_folder_of_the_old_per_job_layout_is_not_reused_nor_pulled_away(stack: Stack) -> None:
    """Copies staged before the per-package layout share one ``staging/job_<id>`` folder. A
    new job restages its package in the new place and leaves the old folder to the other
    package's copy; the deletions then remove everything."""
    ctx = ctx_for(stack)
    stack.file_observation(files=2, seed=7, sizes=(1_000, 5_000))
    stack.file_observation(files=2, seed=8, sizes=(1_000, 5_000))
    first, second = archived(stack, ctx)
    old_job = new_job(stack, [first, second])
    assert passes(ctx, "staging") == ["done"]
    root = stack.roots["cologne/ramses"]
    legacy = root / "staging" / f"job_{old_job}"
    legacy.mkdir()
    with Session(stack.engine) as s, s.begin():  # as the old layout recorded them
        for pid in (first, second):
            copy = ramses_copy(s, stack, pid)
            for item in (root / copy.relative_path).iterdir():
                item.rename(legacy / item.name)
            (root / copy.relative_path).rmdir()
            copy.relative_path = f"staging/job_{old_job}"
            for f in s.get(m.RawDataPackage, pid).files:
                fc = s.scalars(
                    select(m.PhysicalCopy).where(
                        m.PhysicalCopy.raw_data_file_id == f.id,
                        m.PhysicalCopy.data_location_id == copy.data_location_id,
                    )
                ).one()
                fc.relative_path = f"staging/job_{old_job}/{f.relative_path}"

    new = new_job(stack, [second])
    assert passes(ctx, "staging") == ["done"]
    assert staged_files_match(stack, second) == 2  # in its own folder now
    with Session(stack.engine) as s:
        for f in s.get(m.RawDataPackage, first).files:  # the other package keeps its files
            assert (legacy / f.relative_path).is_file()
    release(stack, old_job)
    release(stack, new)
    passes(ctx, "deletion", "deletion")
    with Session(stack.engine) as s:
        for pid in (first, second):
            assert ramses_copy(s, stack, pid).status == PhysicalCopyStatus.DELETED
    assert not any(p.is_file() for p in root.rglob("*"))


def _assert_waits(stack: Stack, job_id: int, why: str) -> None:
    with Session(stack.engine) as s, s.begin():
        job = s.get(m.StagingJob, job_id)
        assert job.status == Status.PENDING and job.retry_count == 0
        assert job.failure_reason.startswith("CopyBusyError: ") and why in job.failure_reason, (
            job.failure_reason
        )
        job.next_attempt_at = None  # the wait is over


def _name(stack: Stack, package_id: int) -> str:
    with Session(stack.engine) as s:
        return s.get(m.RawDataPackage, package_id).name


def test_a_run_that_ends_after_its_job_was_cancelled_leaves_the_job_cancelled(
    stack: Stack,
) -> None:
    """The recovery sweeper took a long staging run for dead (PENDING again) and the requester
    cancelled the job; then the old run finished its copy. Before, its commit marked the
    cancelled job COMPLETED: the cancel and its reason were gone, and the job read as staged
    for use. Now the copy it made is recorded (the database agrees with the disk), the job
    stays cancelled, the log says what happened, and the copy goes like any copy no active job
    needs."""
    ctx = ctx_for(stack)
    stack.file_observation(files=3, seed=6, sizes=(1_000, 5_000))
    (pkg,) = archived(stack, ctx)
    job_id = new_job(stack, [pkg])

    real_factory = ctx.mover_factory

    class CancelledWhileCopying:
        """The mover, with the sweeper's reset and the cancel landing during its copy."""

        def __init__(self, mover: Any) -> None:
            self.mover = mover

        def __getattr__(self, name: str) -> Any:
            return getattr(self.mover, name)

        def copy(self, *args: Any, **kwargs: Any) -> Any:
            with Session(stack.engine) as s, s.begin():
                job = s.get(m.StagingJob, job_id, with_for_update=True)
                assert job.status == Status.IN_PROGRESS
                job.status = Status.PENDING  # the sweeper: no heartbeat, reset
                job.status = Status.FAILED  # the cancel route, on the PENDING job
                job.failure_reason = "cancelled by ops"
                job.finished_at = dt.datetime.now(dt.UTC)
                job.active = False
            return self.mover.copy(*args, **kwargs)

    ctx = Context(
        engine=ctx.engine,
        settings=ctx.settings,
        mover_factory=lambda *a: CancelledWhileCopying(real_factory(*a)),
    )
    assert passes(ctx, "staging") == ["done"]
    with Session(stack.engine) as s:
        job = s.get(m.StagingJob, job_id)
        assert (job.status, job.failure_reason, job.active) == (
            Status.FAILED,
            "cancelled by ops",
            False,
        )
        logs = [x.message for x in s.scalars(select(m.DataTransferLog))]
        assert any("after the job was cancelled" in x for x in logs), logs
    assert staged_files_match(stack, pkg) == 3  # recorded, at its place

    passes(ctx, "deletion")  # no active job needs it
    with Session(stack.engine) as s:
        assert ramses_copy(s, stack, pkg).status == PhysicalCopyStatus.DELETED
    assert not any(p.is_file() for p in stack.roots["cologne/ramses"].rglob("*"))
