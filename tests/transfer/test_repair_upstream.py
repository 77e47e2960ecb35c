"""Bit rot at the telescope's BUFFER, before the bytes leave the site.

The package tars there are the only copies of their kind: a raw data package tar before it is
bundled, a transfer package before it is sent. A mismatch found while reading one must not
block the package until its retries run out: the copy is re-hashed where it lies and, when it
is bad, rebuilt byte for byte from what it was made of (the files still at the SOURCE; the raw
data package tars beside the transfer package), checked against the checksum recorded when it
was first built. When that cannot be done (the source rotted too) the failure says so on the
copy and on the operation, and nothing upstream is deleted.

Real PostgreSQL, real files, archives on moto's S3 server (tests/transfer/stack.py).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ccat_ops_db.enums import PackageState, PhysicalCopyStatus, Status
from data_transfer.checksums import hash_file
from data_transfer.metrics import holdup_details, holdups
from data_transfer.operations import Context
from tests.transfer.stack import Stack, passes
from tests.transfer.test_pipeline import check_archive_bytes, ctx_for, run_until_quiet


def flip(path: Path, where: float = 0.5) -> None:
    """Flip one byte in place (inside a file's data for packages of these sizes)."""
    with open(path, "r+b") as f:
        f.seek(int(path.stat().st_size * where))
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


def finishes_with_original_bytes(stack: Stack, ctx: Context) -> int:
    """Run every manager until quiet; every package ARCHIVED; count the files read back from
    both archives and found equal to the originals."""
    run_until_quiet(ctx)
    with Session(stack.engine) as s:
        assert {p.state for p in s.scalars(select(m.RawDataPackage))} == {PackageState.ARCHIVED}
    return check_archive_bytes(stack)


def buffer_copy(s: Session, key: str, item_id: int) -> m.PhysicalCopy:
    return s.scalars(
        select(m.PhysicalCopy)
        .join(m.DataLocation)
        .join(m.Site)
        .where(getattr(m.PhysicalCopy, key) == item_id, m.Site.short_name == "ccat")
    ).one()


def damage(path: Path, how: str) -> None:
    if how == "data byte":
        flip(path)
    elif how == "header byte":  # inside the first header: the manifest's, unreadable now
        flip(path, 100 / path.stat().st_size)
    elif how == "truncated":  # cut short (a disk that filled up, a bad block dropped)
        os.truncate(path, path.stat().st_size // 2)
    else:
        path.unlink()


@pytest.mark.parametrize(
    ("how", "error", "seen"),
    [
        ("data byte", "ChecksumMismatchError", "is bad"),
        ("header byte", "ChecksumMismatchError", "is bad"),
        ("lost", "PackageError", "is unreadable"),
        ("truncated", "PackageError", "is bad"),
    ],
)
def test_rotten_raw_data_package_is_rebuilt_from_the_source(
    stack: Stack, how: str, error: str, seen: str
) -> None:
    stack.file_observation(files=4, seed=4, sizes=(50_000, 90_000))
    ctx = ctx_for(stack)
    passes(ctx, "raw_data_packages")
    with Session(stack.engine) as s:
        pkg = s.scalars(select(m.RawDataPackage)).one()
        tar = stack.roots["ccat/buffer"] / pkg.relative_path
        original, pkg_id = tar.read_bytes(), pkg.id
    damage(tar, how)
    assert passes(ctx, "transfer_packages") == ["retry"]
    assert tar.read_bytes() == original  # rebuilt byte for byte, before the retry
    with Session(stack.engine) as s:
        dtp = s.scalars(select(m.DataTransferPackage)).one()
        assert dtp.status == Status.PENDING and dtp.retry_count == 1
        assert dtp.failure_reason.startswith(error), dtp.failure_reason
        assert "rebuilt from its files at ccat/" in dtp.failure_reason, dtp.failure_reason
        copy = buffer_copy(s, "raw_data_package_id", pkg_id)
        assert copy.status == PhysicalCopyStatus.PRESENT
        assert seen in copy.failure_reason and "rebuilt from" in copy.failure_reason
        assert copy.checksum_verified_at is not None
    assert finishes_with_original_bytes(stack, ctx) == 2 * 4


def test_lost_transfer_package_is_rebuilt_instead_of_failing_for_good(stack: Stack) -> None:
    stack.file_observation(files=3, seed=7, sizes=(50_000, 90_000))
    ctx = ctx_for(stack)
    passes(ctx, "raw_data_packages", "transfer_packages", "transfer_packages")
    with Session(stack.engine) as s:
        dtp = s.scalars(select(m.DataTransferPackage)).one()
        tar = stack.roots["ccat/buffer"] / dtp.relative_path
        original = tar.read_bytes()
    tar.unlink()  # "no such file" alone is final: the copy is gone and nobody brings it back
    assert passes(ctx, "transfers") == ["retry"]
    assert tar.read_bytes() == original
    with Session(stack.engine) as s:
        t = s.scalars(select(m.DataTransfer)).one()
        assert t.status == Status.PENDING, t.failure_reason
        assert "no such file" in t.failure_reason and "is unreadable" in t.failure_reason
        assert "rebuilt from the raw data package tars at ccat/buffer" in t.failure_reason
    assert finishes_with_original_bytes(stack, ctx) == 2 * 3


@pytest.mark.parametrize("how", ["data byte", "truncated"])
def test_rotten_transfer_package_is_rebuilt_before_it_is_sent(stack: Stack, how: str) -> None:
    stack.file_observation(files=4, seed=5, sizes=(50_000, 90_000))
    ctx = ctx_for(stack)
    passes(ctx, "raw_data_packages", "transfer_packages", "transfer_packages")
    with Session(stack.engine) as s:
        dtp = s.scalars(select(m.DataTransferPackage)).one()
        assert dtp.status == Status.COMPLETED
        tar = stack.roots["ccat/buffer"] / dtp.relative_path
        original, dtp_id = tar.read_bytes(), dtp.id
        raw = stack.roots["ccat/buffer"] / dtp.raw_data_packages[0].relative_path
    # the transfer package and a raw data package tar inside it both rotted in the BUFFER:
    # the raw data package is rebuilt from the SOURCE first, then the transfer package from it
    if how == "truncated":
        damage(tar, how)
        damage(raw, how)
    else:
        flip(tar, 0.3)
        flip(raw, 0.6)
    assert passes(ctx, "transfers") == ["retry"]
    assert tar.read_bytes() == original
    with Session(stack.engine) as s:
        t = s.scalars(select(m.DataTransfer)).one()
        assert t.status == Status.PENDING and t.retry_count == 1
        assert "rebuilt from the raw data package tars at ccat/buffer" in t.failure_reason
        logs = [x.message for x in s.scalars(select(m.DataTransferLog))]
        assert any("is bad" in x and "rebuilt" in x for x in logs), logs
        copy = buffer_copy(s, "data_transfer_package_id", dtp_id)
        assert copy.checksum_verified_at is not None and "rebuilt" in copy.failure_reason
        inner = buffer_copy(s, "raw_data_package_id", s.scalars(select(m.RawDataPackage)).one().id)
        assert "rebuilt from its files" in inner.failure_reason, inner.failure_reason
    assert finishes_with_original_bytes(stack, ctx) == 2 * 4


def test_a_copy_that_cannot_be_rebuilt_stops_visibly_and_nothing_is_deleted(
    stack: Stack,
) -> None:
    stack.file_observation(files=3, seed=6, sizes=(50_000, 90_000))
    ctx = ctx_for(stack, max_retries=2)
    passes(ctx, "raw_data_packages")
    with Session(stack.engine) as s:
        pkg = s.scalars(select(m.RawDataPackage)).one()
        tar = stack.roots["ccat/buffer"] / pkg.relative_path
        biggest = max(pkg.files, key=lambda f: f.size)
        src = stack.roots["ccat/primecam_raw_data"] / biggest.relative_path
        pkg_id, pkg_name = pkg.id, pkg.name
    flip(tar)
    flip(src)  # the file at the SOURCE rotted too: there is nothing good to rebuild from
    for _ in range(4):
        passes(ctx, "transfer_packages", "transfer_packages")
    with Session(stack.engine) as s:
        dtp = s.scalars(select(m.DataTransferPackage)).one()
        assert dtp.status == Status.FAILED and dtp.retry_count == 3
        assert "could not be rebuilt: ChecksumMismatchError" in dtp.failure_reason
        assert str(src) in dtp.failure_reason, dtp.failure_reason
        copy = buffer_copy(s, "raw_data_package_id", pkg_id)
        assert copy.checksum_verified_at is None  # marked bad
        assert copy.status == PhysicalCopyStatus.PRESENT  # kept for a person to look at
    assert holdups(stack.engine).unverified == {("ccat", "buffer"): 1}  # the metric says so
    [(site, where, name, found)] = holdup_details(stack.engine)["bad"]  # status names it
    assert (site, where) == ("ccat", "buffer") and name == pkg_name, (site, where, name)
    assert "could not be rebuilt" in found, found
    run_until_quiet(ctx)
    with Session(stack.engine) as s:
        assert s.get(m.RawDataPackage, pkg_id).state != PackageState.ARCHIVED
        live = s.scalars(
            select(m.PhysicalCopy).where(m.PhysicalCopy.status != PhysicalCopyStatus.PRESENT)
        ).all()
        assert live == [], [(c.id, c.status) for c in live]
    # every other SOURCE file is there, untouched
    for rel, digest in stack.originals.items():
        path = stack.roots["ccat/primecam_raw_data"] / rel
        if path != src:
            assert hash_file(path, "sha256")[0].encode() == digest


def test_a_lost_buffer_copy_at_the_archive_site_is_fetched_again(stack: Stack) -> None:
    stack.file_observation(files=3, seed=8, sizes=(50_000, 90_000))
    ctx = ctx_for(stack)
    passes(ctx, "raw_data_packages", "transfer_packages", "transfer_packages")
    passes(ctx, "transfers", "unpacking")
    with Session(stack.engine) as s:
        pkg = s.scalars(select(m.RawDataPackage)).one()
        at_cologne = stack.roots["cologne/buffer"] / pkg.relative_path
        original = at_cologne.read_bytes()
    at_cologne.unlink()  # gone after unpacking, before archiving
    results = passes(ctx, "archive")
    assert "retry" in results and "failed" not in results, results
    assert at_cologne.read_bytes() == original  # from the telescope's verified BUFFER copy
    with Session(stack.engine) as s:
        logs = [x.message for x in s.scalars(select(m.DataTransferLog))]
        assert any("is unreadable" in x and "repaired from ccat/buffer" in x for x in logs), logs
    assert finishes_with_original_bytes(stack, ctx) == 2 * 3


def test_rotten_transfer_package_for_the_second_archive_is_rebuilt_from_the_first(
    stack: Stack,
) -> None:
    """Cologne forwards the transfer package to the US archive site. By then the telescope's
    copies are deleted and so are Cologne's raw data package tars (Cologne's archive holds
    them): when Cologne's transfer package rots, the only good bytes are in an archive."""
    stack.file_observation(files=3, seed=9, sizes=(50_000, 90_000))
    ctx = ctx_for(stack)
    passes(ctx, "raw_data_packages", "transfer_packages", "transfer_packages")
    passes(ctx, "transfers", "unpacking", "archive", "deletion")
    with Session(stack.engine) as s:
        dtp = s.scalars(select(m.DataTransferPackage)).one()
        pkg = s.scalars(select(m.RawDataPackage)).one()
        assert pkg.state == PackageState.ARCHIVED
        secondary = s.scalars(select(m.DataTransfer).where(m.DataTransfer.is_secondary)).one()
        assert secondary.status != Status.COMPLETED
        tar = stack.roots["cologne/buffer"] / dtp.relative_path
        original = tar.read_bytes()
    assert not (stack.roots["ccat/buffer"] / dtp.relative_path).exists()
    assert not (stack.roots["cologne/buffer"] / pkg.relative_path).exists()
    flip(tar)
    assert passes(ctx, "transfers") == ["retry"]
    assert tar.read_bytes() == original
    with Session(stack.engine) as s:
        t = s.get(m.DataTransfer, secondary.id)
        assert "rebuilt from the raw data package tars at cologne/buffer" in t.failure_reason
        assert "1 of them fetched from cologne/lta" in t.failure_reason, t.failure_reason
    # the scratch copy of the raw data package tar is gone again
    assert not (stack.roots["cologne/buffer"] / ".repair").exists()
    assert not (stack.roots["cologne/buffer"] / pkg.relative_path).exists()
    run_until_quiet(ctx)
    assert check_archive_bytes(stack) == 2 * 3


def test_something_in_the_way_of_an_unpack_is_not_taken_for_a_bad_package(stack: Stack) -> None:
    """A folder where the unpack must write a file: the transfer package that arrived is fine,
    so it is kept (not deleted and fetched again over the long link); the unpack stops at once
    with the path to clear, and goes through after a person cleared it and retried it."""
    stack.file_observation(files=3, seed=8, sizes=(50_000, 90_000))
    ctx = ctx_for(stack)
    passes(ctx, "raw_data_packages", "transfer_packages", "transfer_packages", "transfers")
    with Session(stack.engine) as s:
        pkg = s.scalars(select(m.RawDataPackage)).one()
        blocker = stack.roots["cologne/buffer"] / pkg.relative_path
    blocker.mkdir(parents=True)
    (blocker / "someone's notes.txt").write_text("not a package")

    assert passes(ctx, "unpacking") == ["failed"]
    with Session(stack.engine) as s:
        t = s.scalars(select(m.DataTransfer)).one()
        assert t.status == Status.COMPLETED and t.unpack_status == Status.FAILED
        assert t.unpack_failure_reason.startswith("DestinationBlockedError: "), t
        assert f"{blocker}: a directory is in the way" in t.unpack_failure_reason
        arrived = s.scalars(
            select(m.PhysicalCopy).where(
                m.PhysicalCopy.data_transfer_package_id == t.data_transfer_package_id,
                m.PhysicalCopy.data_location_id == t.destination_location_id,
            )
        ).one()
        assert arrived.status == PhysicalCopyStatus.PRESENT  # kept, not fetched again
    shutil.rmtree(blocker)
    with Session(stack.engine) as s, s.begin():  # what `retry` on the API does
        t = s.scalars(select(m.DataTransfer)).one()
        t.unpack_status, t.unpack_retry_count = Status.PENDING, 0
    assert finishes_with_original_bytes(stack, ctx) == 2 * 3
