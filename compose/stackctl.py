"""Drive the compose stack from Python: used by ``compose/e2e.py`` and ``bench/stack_bench.py``.

A :class:`Stack` is one compose project (its own name, random secrets, free loopback ports),
so a test run never touches a developer's stack nor leaves secrets on disk: the secrets live
only in the environment of the ``docker-compose`` processes it starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMPOSE_DIR = REPO / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
LOOPBACK = "127.0.0.1"

#: The one-shots: they must exit 0; every other service must turn healthy.
ONE_SHOTS = ("migrate", "create-buckets")


class StackError(RuntimeError):
    """The stack did not do what it should (the message says what and where)."""


def compose_command() -> list[str]:
    """``docker-compose`` (v1, Debian) when installed, else the ``docker compose`` plugin."""
    override = os.environ.get("COMPOSE")
    if override:
        return override.split()
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    probe = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, text=True, check=False
    )
    if probe.returncode == 0:
        return ["docker", "compose"]
    raise StackError("neither docker-compose nor the docker compose plugin is installed")


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def log(msg: str) -> None:
    """A progress line on stderr, with the wall-clock time."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Container:
    """One container of the project, as ``docker ps -a`` and ``docker inspect`` see it."""

    id: str
    name: str
    service: str
    status: str  # running, exited, ...
    health: str | None  # starting, healthy, unhealthy, or None without a healthcheck
    exit_code: int


@dataclass
class Stack:
    """One compose project with generated secrets and ports."""

    project: str = field(default_factory=lambda: f"ccate2e{secrets.token_hex(3)}")
    env: dict[str, str] = field(default_factory=dict)
    api_port: int = 0
    s3_port: int = 0

    def __post_init__(self) -> None:
        self.api_port = self.api_port or free_port()
        self.s3_port = self.s3_port or free_port()
        # An empty env file: a developer's compose/.env must not change what is tested.
        fd, self._env_file = tempfile.mkstemp(prefix="ccat-compose-", suffix=".env")
        os.close(fd)
        base = {k: v for k, v in os.environ.items() if not k.startswith(("CCAT_", "COMPOSE_"))}
        base.update(
            {
                "COMPOSE_PROJECT_NAME": self.project,
                "POSTGRES_PASSWORD": secrets.token_hex(16),
                "REDIS_PASSWORD": secrets.token_hex(16),
                "S3_ACCESS_KEY_ID": "ccat" + secrets.token_hex(8),
                "S3_SECRET_ACCESS_KEY": secrets.token_hex(20),
                "CCAT_API_PORT": str(self.api_port),
                "S3_PORT": str(self.s3_port),
                "POSTGRES_PORT": str(free_port()),
                "REDIS_PORT": str(free_port()),
                "PROMETHEUS_PORT": str(free_port()),
            }
        )
        # image names may be overridden from the caller's environment
        images = ("CCAT_IMAGE", "BASE_IMAGE", "POSTGRES_IMAGE", "REDIS_IMAGE", "S3_IMAGE")
        for key in (*images, "PROMETHEUS_IMAGE"):
            if key in os.environ:
                base[key] = os.environ[key]
        base.update(self.env)
        self.env = base
        self.cmd = compose_command()

    @property
    def api_url(self) -> str:
        """The API as published on the host."""
        return f"http://{LOOPBACK}:{self.api_port}"

    @property
    def prometheus_url(self) -> str:
        """Prometheus (profile ``monitoring``) as published on the host."""
        return f"http://{LOOPBACK}:{self.env['PROMETHEUS_PORT']}"

    @property
    def s3_url(self) -> str:
        """The S3 server as published on the host."""
        return f"http://{LOOPBACK}:{self.s3_port}"

    def argv(self, *args: str) -> list[str]:
        """The command line of ``docker-compose ARGS`` for this project."""
        return [*self.cmd, "--env-file", self._env_file, "-f", str(COMPOSE_FILE), *args]

    def compose(
        self,
        *args: str,
        check: bool = True,
        capture: bool = False,
        timeout: float | None = 600,
        extra_env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``docker-compose -f compose/docker-compose.yml ARGS`` for this project."""
        argv = self.argv(*args)
        env = {**self.env, **(extra_env or {})}
        proc = subprocess.run(
            argv,
            env=env,
            cwd=COMPOSE_DIR,
            text=True,
            capture_output=capture,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            detail = (proc.stderr or "")[-2000:] if capture else ""
            raise StackError(f"{' '.join(args[:3])}: exit {proc.returncode}\n{detail}")
        return proc

    def containers(self) -> list[Container]:
        """Every container of the project (running or not)."""
        ids = subprocess.run(
            [
                "docker",
                "ps",
                "-aq",
                "--no-trunc",
                "--filter",
                f"label=com.docker.compose.project={self.project}",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        if not ids:
            return []
        # a container may vanish between ps and inspect (one-shots, recreation): skip it
        proc = subprocess.run(
            ["docker", "inspect", *ids], capture_output=True, text=True, check=False
        )
        data = json.loads(proc.stdout or "[]")
        out = []
        for c in data:
            health = (c["State"].get("Health") or {}).get("Status")
            out.append(
                Container(
                    id=c["Id"][:12],
                    name=c["Name"].lstrip("/"),
                    service=c["Config"]["Labels"].get("com.docker.compose.service", "?"),
                    status=c["State"]["Status"],
                    health=health,
                    exit_code=int(c["State"]["ExitCode"]),
                )
            )
        return sorted(out, key=lambda c: c.service)

    def container_of(self, service: str) -> Container:
        """The (first) container of ``service``."""
        for c in self.containers():
            if c.service == service:
                return c
        raise StackError(f"no container for service {service}")

    def wait_healthy(
        self,
        services: Sequence[str] | None = None,
        *,
        timeout: float = 180,
        one_shots: Sequence[str] = ONE_SHOTS,
    ) -> float:
        """Until every long-running container is healthy and every one-shot exited 0; returns
        the seconds waited. Raises (with the logs of the culprit) on a failure or timeout."""
        t0 = time.monotonic()
        last = ""
        while True:
            cs = [c for c in self.containers() if services is None or c.service in services]
            pending = []
            for c in cs:
                if c.service in one_shots:
                    if c.status == "exited" and c.exit_code != 0:
                        raise StackError(
                            f"{c.service} exited {c.exit_code}\n{self.logs(c.service)}"
                        )
                    if c.status != "exited":
                        pending.append(f"{c.service}:{c.status}")
                elif c.status != "running":
                    raise StackError(f"{c.service} is {c.status}\n{self.logs(c.service)}")
                elif c.health != "healthy":
                    if c.health == "unhealthy":
                        raise StackError(f"{c.service} is unhealthy\n{self.logs(c.service)}")
                    pending.append(f"{c.service}:{c.health}")
            if cs and not pending:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise StackError(f"not healthy after {timeout:.0f} s: {', '.join(pending)}")
            now = ", ".join(pending)
            if now != last:
                log(f"waiting for: {now}")
                last = now
            time.sleep(0.5)

    def logs(self, service: str, tail: int = 40) -> str:
        """The last lines of one service's log."""
        proc = self.compose(
            "logs", "--no-color", "--tail", str(tail), service, check=False, capture=True
        )
        return proc.stdout[-4000:]

    def stats(self) -> dict[str, tuple[int, float]]:
        """``(memory bytes, CPU %)`` per running container, as ``docker stats`` reports them
        (memory without the page cache; CPU in % of one core)."""
        running = {c.id: c.service for c in self.containers() if c.status == "running"}
        if not running:
            return {}
        out = subprocess.run(
            [
                "docker",
                "stats",
                "--no-stream",
                "--format",
                "{{.ID}} {{.CPUPerc}} {{.MemUsage}}",
                *running,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        found: dict[str, tuple[int, float]] = {}
        for line in out.splitlines():
            cid, cpu, usage = line.split(" ", 2)
            service = running.get(cid[:12], cid)
            found[service] = (parse_size(usage.split("/")[0].strip()), float(cpu.rstrip("%")))
        return found

    def down(self) -> None:
        """Stop and remove the project's containers, network and volumes."""
        with contextlib.suppress(Exception):
            self.compose(
                "--profile",
                "demo",
                "--profile",
                "monitoring",
                "down",
                "-v",
                "--remove-orphans",
                "--timeout",
                "20",
                check=False,
                capture=True,
            )
        with contextlib.suppress(OSError):
            os.unlink(self._env_file)


def parse_size(text: str) -> int:
    """``"91.2MiB"`` → bytes (docker's units)."""
    units = {
        "B": 1,
        "KiB": 1024,
        "MiB": 1024**2,
        "GiB": 1024**3,
        "kB": 1000,
        "KB": 1000,
        "MB": 1000**2,
        "GB": 1000**3,
    }
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * units[unit])
    return int(float(text))


#: Profiles whose services the e2e run does not start with the stack: Grafana comes from a
#: registry where there is one (Prometheus, which scripts/build-images.sh builds from Debian's
#: package, is started and checked on its own: e2e.py, step 9).
OPTIONAL_PROFILES = frozenset({"monitoring"})


def missing_images(stack: Stack) -> list[str]:
    """The images of the compose file that are missing locally (optional profiles aside)."""
    cfg = stack.compose("config", capture=True).stdout
    import yaml

    services = yaml.safe_load(cfg)["services"]
    needed = {
        s["image"]
        for s in services.values()
        if "image" in s and not set(s.get("profiles") or ()) & OPTIONAL_PROFILES
    }
    missing = []
    for image in sorted(needed):
        probe = subprocess.run(
            ["docker", "image", "inspect", image], capture_output=True, check=False
        )
        if probe.returncode != 0:
            missing.append(image)
    return missing
