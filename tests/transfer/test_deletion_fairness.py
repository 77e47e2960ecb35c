"""The deletion manager gets past copies the rules refuse for a long time.

Copies held by an active staging job stay PRESENT and are candidates on every pass. When there
are at least a window's worth of them at the lowest ids, a manager that always read the first
window would never look at the copies behind them, and buffers would fill. Here they sit below
every copy of a second, archived observation; those must be deleted within a few passes, by a
long-running manager (its cursor moves on) and by ``manager deletion --once`` (a fresh process
each time: it reads on past a full window that has nothing allowed).

Also: a staging job run through the in-process dispatcher (``ccat-transfer run-once
--inline``), its copies kept while the job is active and deleted once it is released.

Real PostgreSQL, real files, archives on moto's S3 server (tests/transfer/stack.py).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ccat_ops_db.enums import LocationType, PackageState, PhysicalCopyStatus, Status
from data_transfer import deletion, managers
from data_transfer.inline import QueueDispatcher, run_all_once
from data_transfer.managers import MANAGERS, run_pass
from data_transfer.operations import Context
from tests.transfer.stack import Stack, live_upstream_copies, make_stack
from tests.transfer.test_pipeline import ctx_for, run_until_quiet


@pytest.fixture
def stack(pg_url: str, tmp_path: Path, s3_server) -> Iterator[Stack]:
    st = make_stack(pg_url, tmp_path, s3_server, None)
    managers.reset_deletion_cursor()
    yield st
    managers.reset_deletion_cursor()
    st.engine.dispose()


def run(ctx: Context, *names: str) -> int:
    """Manager passes, each followed by its tasks; returns how many items were scheduled."""
    d, scheduled = QueueDispatcher(), 0
    for name in names:
        scheduled += run_pass(name, ctx.engine, ctx.settings, d).scheduled
        d.drain(ctx)
    return scheduled


def live_upstream(s: Session) -> list[m.PhysicalCopy]:
    """Copies at SOURCE and BUFFER locations not deleted."""
    return list(
        s.scalars(
            select(m.PhysicalCopy)
            .join(m.DataLocation)
            .where(
                m.DataLocation.location_type.in_([LocationType.SOURCE, LocationType.BUFFER]),
                m.PhysicalCopy.status != PhysicalCopyStatus.DELETED,
            )
        )
    )


def refused_below_allowed(stack: Stack, ctx: Context) -> list[int]:
    """An observation archived and cleaned up; an active staging job keeps a window's worth of
    its files at a PROCESSING location; then a second observation archived, not cleaned up.
    Returns the ids of the refused copies (all below the second observation's copies)."""
    limit = ctx.settings.batch_size * 20
    stack.file_observation(files=limit, seed=3, sizes=(100, 2_000))
    run_until_quiet(ctx, passes=8)
    with Session(stack.engine) as s, s.begin():
        assert live_upstream_copies(s) == 0
        pkg = s.scalars(select(m.RawDataPackage)).one()
        ramses = s.scalar(select(m.DataLocation).where(m.DataLocation.name == "ramses"))
        # a long-lived job holds the package at ramses: every copy of it there is refused
        s.add(
            m.StagingJob(
                name="long-lived",
                destination_location_id=ramses.id,
                raw_data_packages=[pkg],
                unpack=True,
                active=True,
                status=Status.COMPLETED,
            )
        )
        held = [
            m.RawDataFilePhysicalCopy(
                raw_data_file_id=f.id,
                data_location_id=ramses.id,
                status=PhysicalCopyStatus.PRESENT,
                size=f.size,
            )
            for f in pkg.files
        ]
        s.add_all(held)
        s.flush()
        refused = sorted(c.id for c in held)
    stack.file_observation(files=3, seed=4, sizes=(100, 2_000))
    without_deletion = [n for n in MANAGERS if n != "deletion"]
    for _ in range(8):
        run(ctx, *without_deletion)
    with Session(stack.engine) as s:
        assert {p.state for p in s.scalars(select(m.RawDataPackage))} == {PackageState.ARCHIVED}
        upstream = live_upstream(s)
        assert upstream and min(c.id for c in upstream) > max(refused)
        now = dt.datetime.now(dt.UTC)
        decided = deletion.verdicts(s, upstream, now)
        assert all(decided[c.id].allowed for c in upstream)
        # the first window from the start is all refused copies
        first = s.scalars(
            deletion.candidates(s, now, max_retries=ctx.settings.max_retries, limit=limit)
        ).all()
        assert [c.id for c in first] == refused
        assert not any(v.allowed for v in deletion.verdicts(s, first, now).values())
    return refused


@pytest.mark.parametrize(
    ("windows", "fresh_process"),
    [(5, False), (5, True), (1, False)],
    ids=["long-running", "once-each-time", "one-window-per-pass"],
)
def test_refused_copies_do_not_starve_the_others(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, windows: int, fresh_process: bool
) -> None:
    ctx = ctx_for(stack, batch_size=1)
    refused = refused_below_allowed(stack, ctx)
    # the old behaviour, one window from the start each pass: nothing to schedule, for ever
    monkeypatch.setattr(managers, "DELETION_WINDOWS_PER_PASS", 1)
    managers.reset_deletion_cursor(stack.engine)
    assert run(ctx, "deletion") == 0
    managers.reset_deletion_cursor(stack.engine)
    monkeypatch.setattr(managers, "DELETION_WINDOWS_PER_PASS", windows)
    for _ in range(4):
        if fresh_process:
            managers.reset_deletion_cursor(stack.engine)
        run(ctx, "deletion")
        with Session(stack.engine) as s:
            if not live_upstream(s):
                break
    with Session(stack.engine) as s:
        assert not live_upstream(s), "allowed copies behind the refused ones were not deleted"
        # and the rules were kept: the staging job's copies are all still there
        kept = s.scalars(select(m.PhysicalCopy).where(m.PhysicalCopy.id.in_(refused))).all()
        assert {c.status for c in kept} == {PhysicalCopyStatus.PRESENT}


def test_every_candidate_is_asked_about_within_bounded_passes(stack: Stack) -> None:
    """The cursor moves on by windows and comes back to the start after a short one."""
    ctx = ctx_for(stack, batch_size=1)
    refused = refused_below_allowed(stack, ctx)
    seen: list[list[int]] = []
    real = deletion.verdicts

    def spy(session: Session, copies, now=None):  # type: ignore[no-untyped-def]
        seen.append([c.id for c in copies])
        return real(session, copies, now)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(managers.deletion, "verdicts", spy)
        mp.setattr(managers, "DELETION_WINDOWS_PER_PASS", 1)
        for _ in range(3):
            run_pass("deletion", ctx.engine, ctx.settings, QueueDispatcher())
    assert len(seen) == 3
    assert seen[0] == refused  # pass 1: the first window, nothing allowed in it
    assert seen[1] and min(seen[1]) > max(refused)  # pass 2: the window after it (short)
    assert seen[2] == refused  # pass 3: from the start again


def test_staging_job_through_the_inline_dispatcher(stack: Stack) -> None:
    stack.file_observation(files=3, seed=11, sizes=(20_000, 40_000))
    ctx = ctx_for(stack)
    run_until_quiet(ctx, passes=8)
    with Session(stack.engine) as s, s.begin():
        pkg = s.scalars(select(m.RawDataPackage)).one()
        ramses = s.scalar(select(m.DataLocation).where(m.DataLocation.name == "ramses"))
        job = m.StagingJob(
            name="inline", destination_location_id=ramses.id, raw_data_packages=[pkg]
        )
        s.add(job)
        s.flush()
        job_id, ramses_id, pkg_id = job.id, ramses.id, pkg.id
        files = {f.relative_path: f.checksum for f in pkg.files}
    d = QueueDispatcher()
    run_all_once(ctx, d)  # what `ccat-transfer run-once --inline` runs
    staged = [(t, o) for t, o in d.log if t.kind == "staging_job"]
    assert [(t.payload, o.result) for t, o in staged] == [(job_id, "done")], staged
    with Session(stack.engine) as s:
        assert s.get(m.StagingJob, job_id).status == Status.COMPLETED
        staged_copy = s.scalars(
            select(m.PhysicalCopy).where(
                m.PhysicalCopy.raw_data_package_id == pkg_id,
                m.PhysicalCopy.data_location_id == ramses_id,
            )
        ).one()
        assert staged_copy.status == PhysicalCopyStatus.STAGED
        root = stack.roots["cologne/ramses"] / staged_copy.relative_path
    for rel, checksum in files.items():
        assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == checksum
    run(ctx, "deletion")  # the job is active: its copies stay
    assert all((root / rel).is_file() for rel in files)
    with Session(stack.engine) as s, s.begin():
        job = s.get(m.StagingJob, job_id)
        job.active = False
        job.released_at = dt.datetime.now(dt.UTC)
    run(ctx, "deletion")
    assert not any(p.is_file() for p in root.rglob("*"))
    with Session(stack.engine) as s:
        live = s.scalars(
            select(m.PhysicalCopy).where(
                m.PhysicalCopy.data_location_id == ramses_id,
                m.PhysicalCopy.status != PhysicalCopyStatus.DELETED,
            )
        ).all()
        assert not live
