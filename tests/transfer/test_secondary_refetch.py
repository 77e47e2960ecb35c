"""A secondary transfer leg that has to fetch its package again is not left waiting for good.

The secondary leg replicates a transfer package from the first archive site's buffer (Cologne)
to the other archive site (US). Two ways the leg goes back to PENDING after its bytes left:
the copy that arrived turns out bad at unpack (dropped, fetched again), or the leg failed for a
network reason and the recovery manager revives it. The first needs the sending copy, so
deletion keeps it until the destination has unpacked and verified, and while the leg is FAILED
and waits to be revived. Should the sending copy be lost all the same, the leg is scheduled
anyway: the task rebuilds it from the raw data package tars (fetched from the archive) before
it copies, where the origin is mounted on the worker.

Real PostgreSQL, real files, archives on moto's S3 server (tests/transfer/stack.py).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ccat_ops_db.enums import LocationType, PackageState, PhysicalCopyStatus, Status
from data_transfer import deletion, routing
from data_transfer.inline import QueueDispatcher
from data_transfer.managers import run_pass
from data_transfer.operations import Context
from tests.transfer.stack import Stack, live_upstream_copies, passes
from tests.transfer.test_pipeline import check_archive_bytes, ctx_for, run_until_quiet
from tests.transfer.test_repair_upstream import flip


def to_secondary_leg(stack: Stack, ctx: Context) -> int:
    """Files through packaging, the primary transfer, unpack and archive at the first archive
    site; returns the id of the secondary leg that this created (still PENDING)."""
    stack.file_observation(files=3, seed=9, sizes=(50_000, 90_000))
    passes(ctx, "raw_data_packages", "transfer_packages", "transfer_packages")
    passes(ctx, "transfers", "unpacking", "archive")
    with Session(stack.engine) as s:
        sec = s.scalars(select(m.DataTransfer).where(m.DataTransfer.is_secondary)).one()
        assert sec.status == Status.PENDING
        assert {p.state for p in s.scalars(select(m.RawDataPackage))} == {PackageState.ARCHIVED}
        return sec.id


def origin_copy(s: Session, transfer: m.DataTransfer) -> m.PhysicalCopy | None:
    """The transfer package's copy at the transfer's origin."""
    return s.scalar(
        select(m.PhysicalCopy).where(
            m.PhysicalCopy.data_transfer_package_id == transfer.data_transfer_package_id,
            m.PhysicalCopy.data_location_id == transfer.origin_location_id,
        )
    )


def assert_every_package_in_every_archive(stack: Stack) -> None:
    """Both archives hold a verified copy of every package, with the original bytes."""
    with Session(stack.engine) as s:
        archives = s.scalars(
            select(m.DataLocation.id).where(
                m.DataLocation.location_type == LocationType.LONG_TERM_ARCHIVE
            )
        ).all()
        assert len(archives) == 2
        for pkg in s.scalars(select(m.RawDataPackage)):
            held = s.scalars(
                select(m.PhysicalCopy.data_location_id).where(
                    m.PhysicalCopy.raw_data_package_id == pkg.id,
                    m.PhysicalCopy.status == PhysicalCopyStatus.PRESENT,
                    m.PhysicalCopy.checksum_verified_at.is_not(None),
                    m.PhysicalCopy.data_location_id.in_(archives),
                )
            ).all()
            assert sorted(held) == sorted(archives), pkg.name
    assert check_archive_bytes(stack) > 0


def test_sending_copy_stays_until_the_destination_unpacked(stack: Stack) -> None:
    # a long back-off: the re-fetch after a bad copy must not wait for the unpack's
    ctx = ctx_for(stack, retry_backoff_s=600)
    sec_id = to_secondary_leg(stack, ctx)
    assert passes(ctx, "transfers") == ["done"]  # Cologne -> US; the unpack there is pending
    passes(ctx, "deletion")
    with Session(stack.engine) as s:
        sec = s.get(m.DataTransfer, sec_id)
        assert sec.status == Status.COMPLETED and sec.unpack_status == Status.PENDING
        sending = origin_copy(s, sec)
        assert sending is not None and sending.status == PhysicalCopyStatus.PRESENT
        v = deletion.verdict(s, sending)
        assert not v.allowed and "unpack" in v.reason
        us_tar = Path(sec.destination_location.root_path) / sec.data_transfer_package.relative_path
    flip(us_tar)  # the copy that reached the US buffer is bad
    assert passes(ctx, "unpacking") == ["retry"]
    with Session(stack.engine) as s:
        sec = s.get(m.DataTransfer, sec_id)
        assert sec.status == Status.PENDING and "re-fetch" in (sec.failure_reason or "")
    # fetched again from the copy Cologne kept, then unpacked, verified and archived
    assert passes(ctx, "transfers") == ["done"]
    run_until_quiet(ctx, passes=6)
    with Session(stack.engine) as s:
        sec = s.get(m.DataTransfer, sec_id)
        assert sec.status == Status.COMPLETED and sec.unpack_status == Status.COMPLETED
        # and once unpacked there, the sending copy went like every other upstream copy
        assert origin_copy(s, sec).status == PhysicalCopyStatus.DELETED
        assert live_upstream_copies(s) == 0
    assert_every_package_in_every_archive(stack)


def revived_after_origin_deleted(stack: Stack, row: str = "deleted") -> tuple[Context, int, Path]:
    """A secondary leg FAILED by a partition keeps Cologne's copy of its transfer package;
    that copy is then lost all the same (a disk replaced, a person's mistake), and the leg is
    revived: returns the context, the leg's id and where its origin copy was."""
    ctx = ctx_for(stack, partition_retry_s=60)
    sec_id = to_secondary_leg(stack, ctx)
    with Session(stack.engine) as s, s.begin():
        sec = s.get(m.DataTransfer, sec_id)  # the route to the US failed for good, for now
        sec.status = Status.FAILED
        sec.failure_reason = "NetworkError: injected: the link to us is down"
        sec.last_failure_at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    passes(ctx, "deletion")  # the FAILED leg will be retried: it keeps Cologne's copy
    with Session(stack.engine) as s, s.begin():
        sec = s.get(m.DataTransfer, sec_id)
        kept = origin_copy(s, sec)
        assert kept.status == PhysicalCopyStatus.PRESENT
        assert not deletion.verdict(s, kept).allowed
        cologne = sec.origin_location.id
        dtp_path = Path(sec.origin_location.root_path) / sec.data_transfer_package.relative_path
        dtp_path.unlink()  # lost all the same
        if row == "deleted":
            kept.status, kept.deleted_at = PhysicalCopyStatus.DELETED, dt.datetime.now(dt.UTC)
        else:  # and its row with it
            s.delete(kept)
    with Session(stack.engine) as s:
        # the raw data package tars beside it are gone too: a rebuild fetches them
        assert not s.scalars(
            select(m.PhysicalCopy).where(
                m.PhysicalCopy.data_location_id == cologne,
                m.PhysicalCopy.raw_data_package_id.is_not(None),
                m.PhysicalCopy.status != PhysicalCopyStatus.DELETED,
            )
        ).all()
    passes(ctx, "recovery")  # the partition is over: the leg gets another round
    with Session(stack.engine) as s:
        assert s.get(m.DataTransfer, sec_id).status == Status.PENDING
    return ctx, sec_id, dtp_path


def test_revived_leg_whose_origin_copy_was_deleted_is_rebuilt_and_sent(stack: Stack) -> None:
    ctx, sec_id, dtp_path = revived_after_origin_deleted(stack)
    d = QueueDispatcher()
    report = run_pass("transfers", ctx.engine, ctx.settings, d)
    assert [(t.kind, t.payload) for t in d.pending] == [("data_transfer", sec_id)]
    assert any("origin copy gone" in n for n in report.notes)
    d.drain(ctx)
    assert dtp_path.is_file()  # rebuilt where it was, from tars fetched from the archive
    run_until_quiet(ctx, passes=6)
    with Session(stack.engine) as s:
        sec = s.get(m.DataTransfer, sec_id)
        assert sec.status == Status.COMPLETED and sec.unpack_status == Status.COMPLETED
    assert_every_package_in_every_archive(stack)


def test_transfer_of_a_package_never_built_waits(stack: Stack) -> None:
    ctx = ctx_for(stack)
    stack.file_observation(files=2, seed=5, sizes=(1_000, 2_000))
    passes(ctx, "raw_data_packages")
    # stage 2 decided on a transfer package, but its build has not run (task still queued)
    run_pass("transfer_packages", ctx.engine, ctx.settings, QueueDispatcher())
    with Session(stack.engine) as s, s.begin():
        dtp = s.scalars(select(m.DataTransferPackage)).one()
        assert dtp.status == Status.SCHEDULED
        t = routing.create_primary_transfer(s, dtp)
        assert t is not None
        t_id = t.id
    d = QueueDispatcher()
    report = run_pass("transfers", ctx.engine, ctx.settings, d)
    assert report.scheduled == 0 and not d.pending
    with Session(stack.engine) as s:
        t = s.get(m.DataTransfer, t_id)
        assert t.status == Status.PENDING and origin_copy(s, t) is None


@pytest.mark.parametrize("row", ["deleted", "none"])
def test_rebuilt_origin_copy_is_not_left_behind(stack: Stack, row: str) -> None:
    ctx, sec_id, dtp_path = revived_after_origin_deleted(stack, row)
    run_until_quiet(ctx, passes=8)
    with Session(stack.engine) as s:
        sec = s.get(m.DataTransfer, sec_id)
        assert sec.status == Status.COMPLETED and sec.unpack_status == Status.COMPLETED
        copy = origin_copy(s, sec)
        # the rebuilt file is described by a row, and so deleted in its turn
        assert copy is not None and copy.status == PhysicalCopyStatus.DELETED
        assert not dtp_path.exists()


def test_a_leg_failed_for_another_reason_holds_no_copy(stack: Stack) -> None:
    """Only a leg the recovery manager will revive (network or storage reasons) keeps the
    sending copy; one FAILED for a reason a person has to fix first holds nothing, so a
    buffer does not fill with copies of archived packages."""
    ctx = ctx_for(stack)
    sec_id = to_secondary_leg(stack, ctx)
    with Session(stack.engine) as s, s.begin():
        sec = s.get(m.DataTransfer, sec_id)
        sec.status = Status.FAILED
        sec.failure_reason = "ConfigurationError: route cologne->us: unknown method 'ftp'"
    passes(ctx, "recovery", "deletion", "deletion")
    with Session(stack.engine) as s:
        sec = s.get(m.DataTransfer, sec_id)
        assert sec.status == Status.FAILED  # not revived: a person fixes the route first
        assert origin_copy(s, sec).status == PhysicalCopyStatus.DELETED
        assert live_upstream_copies(s) == 0
