"""Real servers for the transfer tests, on 127.0.0.1 only: a private sshd and moto's S3 server.

Session fixtures (start once, reused by every test file that imports them):

* ``sshd`` -> :class:`SshServer`: an OpenSSH server run as the current user from a temporary
  directory (its own host key, client key, authorized_keys and known_hosts). Needs
  ``/usr/sbin/sshd`` (Debian: ``apt-get install openssh-server``); the fixture fails, not
  skips, without it.
* ``s3_server`` -> :class:`S3Server`: moto's standalone S3 server in a separate process.

Function fixtures: ``remote_disk`` (a LocationRef on the sshd, rooted in a fresh directory),
``s3_location`` (a LocationRef on a fresh bucket), ``s3_client`` (boto3 client for the server).

Use them from a test module or a conftest with ``from tests.transfer.servers import *``.
"""

from __future__ import annotations

import contextlib
import getpass
import itertools
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from data_transfer.locations import LocationRef

__all__ = [
    "S3Server",
    "SshServer",
    "free_port",
    "remote_disk",
    "s3_client",
    "s3_location",
    "s3_server",
    "sshd",
]

SSHD = "/usr/sbin/sshd"
LOOPBACK = "127.0.0.1"
_ids = itertools.count(1000)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _wait_for(
    check: Any, proc: subprocess.Popen[bytes], what: str, log: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
        with contextlib.suppress(OSError):
            if check():
                return
        time.sleep(0.05)
    pytest.fail(f"{what} did not come up within {timeout:.0f} s:\n{_tail(log)}")


def _tail(log: Path, n: int = 4000) -> str:
    try:
        return log.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- sshd ------------------------------------------------------------------------------------------


@dataclass
class SshServer:
    """A running private sshd and the client files to log in to it."""

    host: str
    port: int
    user: str
    identity_file: str
    known_hosts_file: str
    workdir: Path
    log_file: Path

    @property
    def options(self) -> dict[str, Any]:
        """Mover options (rsync/bbcp) for reaching this server with strict host key checking."""
        return {
            "identity_file": self.identity_file,
            "known_hosts_file": self.known_hosts_file,
            "strict_host_key_checking": "yes",
            "ssh_config_file": "/dev/null",
            "connect_timeout": 10,
        }

    def location(
        self,
        root_path: str | Path,
        *,
        name: str = "remote",
        site: str = "remote",
        location_type: str = "buffer",
    ) -> LocationRef:
        """A disk LocationRef on this server rooted at ``root_path`` (a directory on this host)."""
        return LocationRef(
            id=next(_ids),
            site=site,
            name=name,
            location_type=location_type,
            storage_type="disk",
            root_path=str(root_path),
            host=self.host,
            ssh_user=self.user,
            ssh_port=self.port,
        )

    def ssh_argv(self, command: str) -> list[str]:
        """argv running ``command`` on the server."""
        return [
            "ssh",
            "-F",
            "/dev/null",
            "-p",
            str(self.port),
            "-i",
            self.identity_file,
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts_file}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-l",
            self.user,
            self.host,
            command,
        ]

    def run(self, command: str) -> subprocess.CompletedProcess[str]:
        """Run ``command`` over ssh (for test assertions)."""
        return subprocess.run(
            self.ssh_argv(command), capture_output=True, text=True, timeout=60, check=False
        )


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ccat-test", "-f", str(path)],
        check=True,
        capture_output=True,
    )


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """A private OpenSSH server on 127.0.0.1 for the whole session, logged into by key."""
    if not os.path.exists(SSHD):
        pytest.fail(
            f"{SSHD} not found: the ssh transfer tests need a real sshd; "
            "install openssh-server (apt-get install openssh-server)"
        )
    if shutil.which("ssh-keygen") is None or shutil.which("ssh") is None:
        pytest.fail(
            "ssh/ssh-keygen not found: install openssh-client (apt-get install openssh-client)"
        )
    work = tmp_path_factory.mktemp("sshd")
    host_key = work / "ssh_host_ed25519_key"
    client_key = work / "id_ed25519"
    _keygen(host_key)
    _keygen(client_key)
    authorized = work / "authorized_keys"
    authorized.write_text(client_key.with_suffix(".pub").read_text())
    authorized.chmod(0o600)
    if os.geteuid() == 0:
        # sshd started by root insists on its privilege-separation directory.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)

    last_log = ""
    for _attempt in range(3):
        port = free_port()
        config = work / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"ListenAddress {LOOPBACK}",
                    f"Port {port}",
                    f"HostKey {host_key}",
                    f"PidFile {work / 'sshd.pid'}",
                    f"AuthorizedKeysFile {authorized}",
                    "UsePAM no",
                    "StrictModes no",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PermitRootLogin prohibit-password",
                    "MaxStartups 100:30:200",
                    "MaxSessions 50",
                    "LogLevel INFO",
                    "",
                ]
            )
        )
        log = work / f"sshd-{port}.log"
        with open(log, "wb") as logf:
            proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(config)],
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

        def banner(port: int = port) -> bool:
            with socket.create_connection((LOOPBACK, port), timeout=1) as s:
                return s.recv(64).startswith(b"SSH-")

        try:
            _wait_for(banner, proc, "sshd", log, 15)
        except pytest.fail.Exception:
            _stop(proc)
            last_log = _tail(log)
            continue
        break
    else:
        pytest.fail(f"sshd did not start:\n{last_log}")

    pub = host_key.with_suffix(".pub").read_text().split()
    known_hosts = work / "known_hosts"
    known_hosts.write_text(f"[{LOOPBACK}]:{port} {pub[0]} {pub[1]}\n")
    server = SshServer(
        host=LOOPBACK,
        port=port,
        user=getpass.getuser(),
        identity_file=str(client_key),
        known_hosts_file=str(known_hosts),
        workdir=work,
        log_file=log,
    )
    probe = server.run("echo ok")
    if probe.returncode != 0 or probe.stdout.strip() != "ok":
        _stop(proc)
        pytest.fail(f"cannot log in to the test sshd: {probe.stderr}\n{_tail(log)}")
    try:
        yield server
    finally:
        _stop(proc)


@pytest.fixture
def remote_disk(sshd: SshServer, tmp_path: Path) -> LocationRef:
    """A disk location reached over ssh, rooted at a fresh directory (``tmp_path/"remote"``)."""
    root = tmp_path / "remote"
    root.mkdir()
    return sshd.location(root)


# -- S3 (moto) -------------------------------------------------------------------------------------


@dataclass
class S3Server:
    """moto's standalone S3 server running in its own process."""

    endpoint_url: str
    port: int
    log_file: Path
    region: str = "us-east-1"
    credentials: tuple[str, str] = ("testing", "testing")
    buckets: list[str] = field(default_factory=list)

    def client(self) -> Any:
        """A boto3 S3 client for this server."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.credentials[0],
            aws_secret_access_key=self.credentials[1],
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh random name by default) and return its name."""
        bucket = name or f"ccat-test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=bucket)
        self.buckets.append(bucket)
        return bucket

    def location(
        self,
        bucket: str | None = None,
        *,
        key_prefix: str = "",
        name: str = "lta",
        site: str = "cologne",
        credentials: tuple[str, str] | None = None,
    ) -> LocationRef:
        """An S3 LocationRef on ``bucket`` (created fresh when None)."""
        return LocationRef(
            id=next(_ids),
            site=site,
            name=name,
            location_type="long_term_archive",
            storage_type="s3",
            bucket=bucket or self.create_bucket(),
            endpoint_url=self.endpoint_url,
            region=self.region,
            key_prefix=key_prefix,
            credentials=credentials or self.credentials,
        )


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server (``python -m moto.server``) on a free port of 127.0.0.1."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        pytest.fail("moto[server] is not installed: pip install -e '.[dev]'")
    work = tmp_path_factory.mktemp("moto")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
    last_log = ""
    for _attempt in range(3):
        port = free_port()
        log = work / f"moto-{port}.log"
        with open(log, "wb") as logf:
            proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)],
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        url = f"http://{LOOPBACK}:{port}"

        def ready(url: str = url) -> bool:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=1) as r:
                return r.status == 200

        try:
            _wait_for(ready, proc, "moto server", log, 30)
        except pytest.fail.Exception:
            _stop(proc)
            last_log = _tail(log)
            continue
        break
    else:
        pytest.fail(f"moto server did not start:\n{last_log}")
    try:
        yield S3Server(endpoint_url=url, port=port, log_file=log)
    finally:
        _stop(proc)


@pytest.fixture
def s3_location(s3_server: S3Server) -> LocationRef:
    """An S3 location on a fresh bucket of the session's moto server."""
    return s3_server.location()


@pytest.fixture
def s3_client(s3_server: S3Server) -> Any:
    """A boto3 S3 client for the session's moto server."""
    return s3_server.client()
