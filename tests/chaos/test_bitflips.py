"""Bit flips in the three places bytes rest or travel: a transfer package in transit, a raw
data package in a BUFFER, an archived object. Each is detected by a checksum, recorded with its
reason, and repaired from a good copy; at the end the archives hold the original bytes.

Real PostgreSQL, real files, S3 archives on moto's server; the managers and operations run in
this process (data_transfer.inline, the code the workers run). The flips are real writes into
the real files and objects; for the transfer package the mover is wrapped so that the byte
changes right after the copy, between the sending and the receiving end's check.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ccat_ops_db.enums import PackageState, PhysicalCopyStatus
from data_transfer.checksums import hash_bytes
from data_transfer.inline import QueueDispatcher
from data_transfer.managers import MANAGERS, run_pass
from data_transfer.movers import mover_for
from data_transfer.operations import Context
from tests.transfer.stack import Stack, make_stack, transfer_settings
from tests.transfer.test_pipeline import check_archive_bytes


@pytest.fixture
def stack(pg_url: str, tmp_path: Path, s3_server) -> Iterator[Stack]:
    st = make_stack(pg_url, tmp_path, s3_server, None)
    yield st
    st.engine.dispose()


def flip(path: Path, offset: int | None = None) -> None:
    """Invert one bit of the file, in place (the middle byte unless told)."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def drive(ctx: Context, d: QueueDispatcher, passes: int, only: tuple[str, ...] = ()) -> None:
    for _ in range(passes):
        for name in only or tuple(MANAGERS):
            run_pass(name, ctx.engine, ctx.settings, d, ctx.heartbeats)
            d.drain(ctx)


def archived(stack: Stack) -> bool:
    with Session(stack.engine) as s:
        return all(p.state == PackageState.ARCHIVED for p in s.scalars(select(m.RawDataPackage)))


@pytest.mark.timeout(180)
def test_bit_flip_in_transit_is_detected_and_fetched_again(stack: Stack) -> None:
    stack.file_observation(files=5, sizes=(2000, 20000), seed=21)
    flipped: list[Path] = []

    def flaky_wire(src: Any, dst: Any, method: Any, **kw: Any) -> Any:
        mover = mover_for(src, dst, method, **kw)
        if dst.site != "cologne" or dst.location_type != "buffer" or src.site != "ccat":
            return mover
        real_copy = mover.copy

        def copy(s: Any, sp: str, d: Any, dp: str, **k: Any) -> Any:
            result = real_copy(s, sp, d, dp, **k)
            if not flipped:  # the first transfer package arrives with one bit flipped
                flip(d.path(dp))
                flipped.append(d.path(dp))
            return result

        mover.copy = copy
        return mover

    ctx = Context(
        engine=stack.engine, settings=transfer_settings(stack.root), mover_factory=flaky_wire
    )
    drive(ctx, QueueDispatcher(), passes=10)
    assert flipped, "the fault was never injected"
    assert archived(stack)
    with Session(stack.engine) as s:
        t = s.scalars(select(m.DataTransfer).where(m.DataTransfer.is_secondary.is_(False))).one()
        errors = [
            x.message
            for x in s.scalars(
                select(m.DataTransferLog).where(
                    m.DataTransferLog.data_transfer_id == t.id, m.DataTransferLog.level == "error"
                )
            )
        ]
        assert len(errors) == 1 and errors[0].startswith("ChecksumMismatchError"), errors
        assert t.retry_count == 1  # fetched once more, from the good copy at the telescope
        bad_copy = s.scalar(
            select(m.PhysicalCopy).where(
                m.PhysicalCopy.data_transfer_package_id == t.data_transfer_package_id,
                m.PhysicalCopy.data_location_id == t.destination_location_id,
            )
        )
        # the same row now describes the good copy fetched again; the log keeps the reason
        assert bad_copy.status in (PhysicalCopyStatus.PRESENT, PhysicalCopyStatus.DELETED)
    assert check_archive_bytes(stack) == 2 * 5


@pytest.mark.timeout(180)
def test_bit_flip_in_buffer_copy_is_detected_and_repaired(stack: Stack) -> None:
    stack.file_observation(files=5, sizes=(2000, 20000), seed=22)
    ctx = Context(engine=stack.engine, settings=transfer_settings(stack.root))
    d = QueueDispatcher()
    drive(ctx, d, 1, ("raw_data_packages", "transfer_packages", "transfer_packages"))
    drive(ctx, d, 1, ("transfers", "unpacking"))
    with Session(stack.engine) as s:
        pkg = s.scalars(select(m.RawDataPackage)).one()
        rel, checksum, algorithm = pkg.relative_path, pkg.checksum, str(pkg.checksum_algorithm)
    # the unpacked, verified raw data package at Cologne rots before it is archived
    at_cologne = stack.roots["cologne/buffer"] / rel
    flip(at_cologne)
    drive(ctx, d, 10)
    assert archived(stack)
    # (the repaired BUFFER copy is deleted once archived, as every BUFFER copy is)
    if at_cologne.exists():
        assert hash_bytes(at_cologne.read_bytes(), algorithm) == checksum
    with Session(stack.engine) as s:
        ltat = s.scalars(
            select(m.LongTermArchiveTransfer)
            .join(
                m.DataLocation,
                m.DataLocation.id == m.LongTermArchiveTransfer.destination_location_id,
            )
            .join(m.Site)
            .where(m.Site.short_name == "cologne")
        ).one()
        logs = [
            (x.level, x.message)
            for x in s.scalars(
                select(m.DataTransferLog)
                .where(m.DataTransferLog.long_term_archive_transfer_id == ltat.id)
                .order_by(m.DataTransferLog.id)
            )
        ]
        assert logs[0][0] == "warning" and "is bad" in logs[0][1], logs
        assert "repaired from ccat/buffer" in logs[0][1], logs
        assert logs[1][0] == "error" and logs[1][1].startswith("ChecksumMismatchError"), logs
        assert logs[-1][0] == "info" and logs[-1][1].startswith("archived"), logs
        assert ltat.retry_count == 1
        copy = s.scalar(
            select(m.PhysicalCopy).where(
                m.PhysicalCopy.raw_data_package_id == ltat.raw_data_package_id,
                m.PhysicalCopy.data_location_id == ltat.origin_location_id,
            )
        )
        # its reason stays in the log above; the copy itself went after the archiving
        assert copy.status == PhysicalCopyStatus.DELETED
    assert check_archive_bytes(stack) == 2 * 5


@pytest.mark.timeout(180)
def test_bit_flip_in_archived_object_is_found_by_fixity_and_repaired(stack: Stack) -> None:
    stack.file_observation(files=5, sizes=(2000, 20000), seed=23)
    ctx = Context(engine=stack.engine, settings=transfer_settings(stack.root))
    d = QueueDispatcher()
    drive(ctx, d, 10)
    assert archived(stack)
    client = stack.s3.client()
    with Session(stack.engine) as s:
        pkg = s.scalars(select(m.RawDataPackage)).one()
        lta = s.scalar(select(m.S3DataLocation).join(m.Site).where(m.Site.short_name == "cologne"))
        copy = s.scalar(
            select(m.PhysicalCopy).where(
                m.PhysicalCopy.raw_data_package_id == pkg.id,
                m.PhysicalCopy.data_location_id == lta.id,
            )
        )
        bucket, key, copy_id = lta.bucket, (lta.key_prefix or "") + pkg.relative_path, copy.id
        checksum, algorithm = pkg.checksum, str(pkg.checksum_algorithm)
    obj = client.get_object(Bucket=bucket, Key=key)
    blob = bytearray(obj["Body"].read())
    blob[len(blob) // 3] ^= 0x10
    client.put_object(Bucket=bucket, Key=key, Body=bytes(blob), Metadata=obj["Metadata"])
    # the audit is due (every archived copy looks last checked long ago)
    with Session(stack.engine) as s, s.begin():
        s.get(m.PhysicalCopy, copy_id).checksum_verified_at = None
    drive(ctx, d, 1, ("fixity",))
    with Session(stack.engine) as s:
        c = s.get(m.PhysicalCopy, copy_id)
        reason = c.failure_reason or ""
        assert reason.startswith("repaired from us/"), reason
        assert "ChecksumMismatchError" in reason
        assert c.checksum_verified_at is not None
    again = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert hash_bytes(again, algorithm) == checksum
    assert check_archive_bytes(stack) == 2 * 5
