"""Runs the real API in a separate uvicorn process on loopback, against a real database."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ccat_ops_db.db import make_engine


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ApiServer:
    """A running API: its base URL, tokens by role name, and the database URL behind it."""

    base_url: str
    db_url: str
    tokens: dict[str, str] = field(default_factory=dict)
    ids: dict[str, int] = field(default_factory=dict)
    log_path: Path | None = None

    def client(self, role: str | None = "admin", **kwargs: object) -> httpx.Client:
        """An HTTP client, authenticated with the token of ``role`` (None: no token)."""
        headers = {"Authorization": f"Bearer {self.tokens[role]}"} if role else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60, **kwargs)


ROLE_SCOPES = {
    "admin": ["admin"],
    "instrument": ["read", "file"],
    "operator": ["read", "file", "operate"],
    "reader": ["read"],
}


def seed_minimal(db_url: str) -> tuple[dict[str, str], dict[str, int]]:
    """Reference topology + one user and token per role; returns (tokens, ids)."""
    from ccat_ops_db.seed import default_topology_path, seed_file

    engine = make_engine(db_url)
    seed_file(engine, default_topology_path())
    tokens: dict[str, str] = {}
    with Session(engine) as s, s.begin():
        for role_name, scopes in ROLE_SCOPES.items():
            role = s.query(m.Role).filter_by(name=f"test-{role_name}").one_or_none()
            if role is None:
                role = m.Role(name=f"test-{role_name}", scopes=scopes)
            user = m.User(username=f"test-{role_name}", roles=[role])
            row, raw = m.ApiToken.issue(user, "tests", scopes)
            s.add(row)
            tokens[role_name] = raw
        # a token whose user lacks the scope it claims, an expired and a revoked one
        reader = s.query(m.User).filter_by(username="test-reader").one()
        row, raw = m.ApiToken.issue(reader, "overclaims", ["read", "file"])
        s.add(row)
        tokens["overclaiming"] = raw
        import datetime as dt

        row, raw = m.ApiToken.issue(
            reader, "expired", ["read"], dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
        )
        s.add(row)
        tokens["expired"] = raw
        row, raw = m.ApiToken.issue(reader, "revoked", ["read"])
        row.revoked_at = dt.datetime.now(dt.UTC)
        s.add(row)
        tokens["revoked"] = raw
    ids: dict[str, int] = {}
    with Session(engine) as s:
        for loc in s.query(m.DataLocation).all():
            ids[f"{loc.site.short_name}/{loc.name}"] = loc.id
        for mod in s.query(m.InstrumentModule).all():
            ids[f"{mod.instrument.name}/{mod.name}"] = mod.id
        for inst in s.query(m.Instrument).all():
            ids[inst.name] = inst.id
    engine.dispose()
    return tokens, ids


@contextmanager
def running_api(
    db_url: str, workdir: Path, extra_env: dict[str, str] | None = None, seed: bool = True
) -> Iterator[ApiServer]:
    """Start ``ccat-api serve`` on a free loopback port; stop it afterwards."""
    from .conftest import migrate_fresh

    migrate_fresh(db_url)
    tokens, ids = seed_minimal(db_url) if seed else ({}, {})
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CCAT_",))}
    env.update(
        {
            "CCAT_OPS_DB_URL": db_url,
            "CCAT_API_HOST": "127.0.0.1",
            "CCAT_API_PORT": str(port),
            "CCAT_API_LOG_LEVEL": "warning",
        }
    )
    env.update(extra_env or {})
    log_path = workdir / f"api-{port}.log"
    exe = Path(sys.executable).with_name("ccat-api")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(exe), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"API did not start; log:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield ApiServer(base_url=base, db_url=db_url, tokens=tokens, ids=ids, log_path=log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
