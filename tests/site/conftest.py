"""Two sites on loopback, as real processes: a main API and an observatory API with its buffer.

Databases (all in the session's embedded PostgreSQL server, see tests/conftest.py):

* ``main``: the main site's ops database (Cologne).
* ``replica``: the observatory's local ops database. In production a streaming replica of the
  main database; here a separately migrated and seeded database stands in for it (same seed,
  so the same reference ids), which is enough for what the observatory reads from it (tokens,
  instruments, locations). Its tokens are its own.
* ``buffer``: the observatory's durable write buffer (``CCAT_API_BUFFER_URL``).

The link is cut by stopping the main API process; it comes back by starting it again on the
same port.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from ..api_server import free_port, seed_minimal
from ..conftest import PgServer, migrate_fresh

BIN = Path(sys.executable).parent


@dataclass
class Proc:
    """A service process we start, stop, kill -9 and start again (same port, same env)."""

    name: str
    args: list[str]
    env: dict[str, str]
    log_dir: Path
    health_url: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self, timeout: float = 60) -> None:
        """Start the process and wait for its health URL (if any) to answer 200."""
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is running"
        self.starts += 1
        log = open(self.log_dir / f"{self.name}-{self.starts}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(BIN / self.args[0]), *self.args[1:]],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        if self.health_url is None:
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(self.health_url, timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start; log:\n{self.log()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def kill9(self) -> None:
        """kill -9: no shutdown handlers, no flushing, nothing."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def log(self) -> str:
        """The latest log of this process."""
        path = self.log_dir / f"{self.name}-{self.starts}.log"
        return path.read_text() if path.exists() else ""


@dataclass
class Sites:
    """The two sites and the handles a test needs."""

    main: Proc
    obs: Proc
    main_url: str
    obs_url: str
    main_db: str
    replica_db: str
    buffer_db: str
    main_tokens: dict[str, str]
    obs_tokens: dict[str, str]
    ids: dict[str, int]
    env: dict[str, str]
    procs: list[Proc] = field(default_factory=list)

    def obs_client(self, role: str = "instrument", timeout: float = 120) -> httpx.Client:
        """A client of the observatory API with the replica's token of ``role``."""
        return httpx.Client(
            base_url=self.obs_url,
            headers={"Authorization": f"Bearer {self.obs_tokens[role]}"},
            timeout=timeout,
        )

    def main_client(self, role: str = "instrument") -> httpx.Client:
        """A client of the main API (the main database's token of ``role``)."""
        return httpx.Client(
            base_url=self.main_url,
            headers={"Authorization": f"Bearer {self.main_tokens[role]}"},
            timeout=120,
        )

    def replayer(self, metrics_port: int | None = None) -> Proc:
        """The replayer service (``ccat-api buffer replay --follow``), not yet started."""
        args = ["ccat-api", "buffer", "replay", "--follow"]
        if metrics_port is not None:
            args += ["--metrics-port", str(metrics_port)]
        proc = Proc("replayer", args, self.env, self.obs.log_dir)
        self.procs.append(proc)
        return proc

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run ``ccat-api ARGS`` with the observatory's environment."""
        return subprocess.run(
            [str(BIN / "ccat-api"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def buffer_status(self) -> dict[str, object]:
        """GET /api/v1/site/buffer on the observatory."""
        with self.obs_client("reader") as c:
            r = c.get("/api/v1/site/buffer")
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def wait_drained(self, timeout: float = 240) -> dict[str, object]:
        """Wait until nothing is pending in the buffer; returns the last status."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.buffer_status()
            if s["depth"] == 0:
                return s
            if time.monotonic() > deadline:
                logs = "\n".join(p.log()[-3000:] for p in self.procs)
                raise AssertionError(f"buffer not drained in {timeout} s: {s}\n{logs}")
            time.sleep(0.5)

    def obs_metrics(self) -> dict[str, float]:
        """The observatory's /metrics as {name: value} for unlabelled samples."""
        text = httpx.get(f"{self.obs_url}/metrics", timeout=30).text
        return parse_metrics(text)


def parse_metrics(text: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus text exposition."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*) (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


@pytest.fixture
def sites(pg_server: PgServer, tmp_path: Path) -> Iterator[Sites]:
    """A main API and an observatory API (buffer mode), both running; the replayer is not."""
    names = {k: pg_server.create_database(f"site_{k}") for k in ("main", "replica", "buffer")}
    urls = {k: pg_server.url(v) for k, v in names.items()}
    migrate_fresh(urls["main"])
    migrate_fresh(urls["replica"])
    main_tokens, ids = seed_minimal(urls["main"])
    obs_tokens, obs_ids = seed_minimal(urls["replica"])
    assert ids == obs_ids, "the replica stand-in must have the main site's reference ids"
    main_port, obs_port = free_port(), free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("CCAT_")}
    base["CCAT_API_HOST"] = "127.0.0.1"
    base["CCAT_API_LOG_LEVEL"] = "warning"
    main_env = {**base, "CCAT_OPS_DB_URL": urls["main"], "CCAT_API_PORT": str(main_port)}
    obs_env = {
        **base,
        "CCAT_OPS_DB_URL": urls["replica"],
        "CCAT_API_PORT": str(obs_port),
        "CCAT_API_SITE_MODE": "observatory",
        "CCAT_API_BUFFER_URL": urls["buffer"],
        "CCAT_API_MAIN_URL": f"http://127.0.0.1:{main_port}",
        "CCAT_API_MAIN_TOKEN": main_tokens["instrument"],  # scopes read + file
        "CCAT_API_REPLAY_BACKOFF_MAX_S": "1",
    }
    main = Proc(
        "main-api",
        ["ccat-api", "serve"],
        main_env,
        tmp_path,
        f"http://127.0.0.1:{main_port}/healthz",
    )
    obs = Proc(
        "obs-api", ["ccat-api", "serve"], obs_env, tmp_path, f"http://127.0.0.1:{obs_port}/healthz"
    )
    s = Sites(
        main=main,
        obs=obs,
        main_url=f"http://127.0.0.1:{main_port}",
        obs_url=f"http://127.0.0.1:{obs_port}",
        main_db=urls["main"],
        replica_db=urls["replica"],
        buffer_db=urls["buffer"],
        main_tokens=main_tokens,
        obs_tokens=obs_tokens,
        ids=ids,
        env=obs_env,
        procs=[main, obs],
    )
    try:
        main.start()
        obs.start()
        yield s
    finally:
        for p in s.procs:
            p.stop()
        for name in names.values():
            pg_server.drop_database(name)
