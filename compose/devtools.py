"""Helpers the CCAT image runs in the compose stack (``ccat-entrypoint <role>``).

* ``health api|worker|manager NAME``: the container healthchecks. Cheap on purpose (they run
  every few seconds in every container): stdlib + redis only, no CLI start-up.

  - api: ``GET /readyz`` is 200, i.e. the database answers *and* its schema is at the head
    revision, so the API turns healthy only after the migrations ran;
  - worker: this container's Celery worker keeps ``health:data_transfer:worker_*@<hostname>``
    alive in Redis (set when the worker is ready, refreshed every 30 s, TTL 90 s);
  - manager NAME: the manager loop keeps ``health:data_transfer:manager_NAME`` alive.

* ``create-buckets``: create the bucket of every S3 location in the database (a one-shot of
  the compose stack; production buckets are made by whoever runs the object store).

* ``instrument``: the simulated instrument (``ccat_dc.instrument.run_instrument``): writes
  files to the SOURCE disks (volumes mounted at their ``root_path``) and files them through
  the API with a token from ``CCAT_API_TOKEN``. Without one it issues itself a token straight
  in the database (a convenience of the development stack only).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

SERVICE_PREFIX = "health:data_transfer:"  # data_transfer.heartbeat.SERVICE_PREFIX


def _redis_url() -> str:
    return (
        os.environ.get("CCAT_TRANSFER_REDIS_URL")
        or os.environ.get("CCAT_TRANSFER_BROKER_URL")
        or "redis://127.0.0.1:6379/0"
    )


class _Redis:
    """Just enough of the Redis protocol for a healthcheck (stdlib only: a check that imports
    the redis client costs ~0.1 s of CPU, every few seconds, in every container)."""

    def __init__(self, url: str) -> None:
        u = urllib.parse.urlsplit(url)
        if u.scheme != "redis":
            raise ValueError(f"healthcheck supports redis:// URLs only, not {u.scheme}://")
        self.sock = socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379), 3)
        self.sock.settimeout(3)
        self.reader = self.sock.makefile("rb")
        if u.password:
            user = [urllib.parse.unquote(u.username)] if u.username else []
            self.call("AUTH", *user, urllib.parse.unquote(u.password))
        db = (u.path or "/0").lstrip("/") or "0"
        if db != "0":
            self.call("SELECT", db)

    def call(self, *args: str) -> Any:
        out = [f"*{len(args)}\r\n".encode()]
        for a in args:
            b = a.encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        self.sock.sendall(b"".join(out))
        return self._read()

    def _read(self) -> Any:
        line = self.reader.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("connection closed by redis")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.reader.read(n + 2)[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise RuntimeError(f"unexpected reply {line[:80]!r}")

    def any_key(self, pattern: str) -> bool:
        cursor = "0"
        while True:
            cursor_b, keys = self.call("SCAN", cursor, "MATCH", pattern, "COUNT", "1000")
            if keys:
                return True
            cursor = cursor_b.decode()
            if cursor == "0":
                return False

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def health(kind: str, name: str | None) -> int:
    """0 when the service of this container is healthy, 1 (with a reason on stdout) if not."""
    if kind == "api":
        port = os.environ.get("CCAT_API_PORT", "8000")
        url = f"http://127.0.0.1:{port}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                return 0 if r.status == 200 else 1
        except urllib.error.HTTPError as exc:
            print(f"not ready: {exc.code} {exc.read()[:300].decode(errors='replace')}")
            return 1
        except OSError as exc:
            print(f"not ready: {exc}")
            return 1
    if kind == "worker":
        # the worker's node name is <site>-<locations>@<hostname> (ccat-transfer worker)
        pattern = f"{SERVICE_PREFIX}worker_*@{socket.gethostname()}"
    else:
        pattern = f"{SERVICE_PREFIX}manager_{name or 'all'}"
    try:
        client = _Redis(_redis_url())
        try:
            alive = client.any_key(pattern)
        finally:
            client.close()
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"redis: {type(exc).__name__}: {exc}")
        return 1
    if not alive:
        print(f"no live health key {pattern}")
    return 0 if alive else 1


def create_buckets(timeout_s: float) -> int:
    """Create every S3 location's bucket (idempotent); retry while the server starts."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from ccat_ops_db import models as m
    from ccat_ops_db.db import make_engine
    from data_transfer.locations import LocationRef

    engine = make_engine()
    with Session(engine) as s:
        refs = [LocationRef.from_orm(loc) for loc in s.scalars(select(m.S3DataLocation))]
    engine.dispose()
    for ref in refs:
        if not ref.credentials:
            print(f"{ref.label}: no credentials in the environment", file=sys.stderr)
            return 2
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=ref.endpoint_url,
            region_name=ref.region or "us-east-1",
            aws_access_key_id=ref.credentials[0],
            aws_secret_access_key=ref.credentials[1],
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
        )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                try:
                    client.head_bucket(Bucket=ref.bucket)
                    print(f"{ref.label}: bucket {ref.bucket} exists at {ref.endpoint_url}")
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                        raise
                    kwargs: dict[str, Any] = {"Bucket": ref.bucket}
                    if ref.region and ref.region != "us-east-1":
                        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": ref.region}
                    client.create_bucket(**kwargs)
                    print(f"{ref.label}: created bucket {ref.bucket} at {ref.endpoint_url}")
                break
            except (BotoCoreError, ClientError) as exc:
                if time.monotonic() > deadline:
                    print(f"{ref.label}: {type(exc).__name__}: {exc}", file=sys.stderr)
                    return 1
                time.sleep(1)
    return 0


def _pages(client: Any, path: str, **params: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        q = {**params, "limit": 1000, **({"cursor": cursor} if cursor else {})}
        r = client.get(path, params=q)
        r.raise_for_status()
        body = r.json()
        out.extend(body["items"])
        cursor = body.get("next_cursor")
        if not cursor:
            return out


def _mint_token() -> str:
    from ccat_dc.demo import make_tokens
    from ccat_ops_db.db import make_engine

    engine = make_engine()
    try:
        return make_tokens(engine)["instrument"]
    finally:
        engine.dispose()


def instrument(args: argparse.Namespace) -> int:
    """Write and file data (once, or every ``--every`` seconds); JSON of the files on stdout."""
    import httpx

    from ccat_dc.instrument import run_instrument

    token = os.environ.get("CCAT_API_TOKEN") or _mint_token()
    headers = {"Authorization": f"Bearer {token}"}
    ids: dict[str, int] = {}
    roots: dict[str, Path] = {}
    with httpx.Client(base_url=args.api_url, headers=headers, timeout=30) as client:
        deadline = time.monotonic() + args.wait_s
        while True:
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                print(f"instrument: the API at {args.api_url} is not ready", file=sys.stderr)
                return 1
            time.sleep(1)
        names = {}
        for inst in _pages(client, "/api/v1/instruments"):
            ids[inst["name"]] = inst["id"]
            names[inst["id"]] = inst["name"]
        for mod in _pages(client, "/api/v1/instrument_modules"):
            ids[f"{names[mod['instrument_id']]}/{mod['name']}"] = mod["id"]
        for loc in _pages(client, "/api/v1/data_locations", site=args.site, location_type="source"):
            ids[loc["name"]] = loc["id"]
            roots[loc["name"]] = Path(loc["root_path"])
    filed: list[dict[str, Any]] = []
    rounds = 0
    while True:
        t0 = time.monotonic()
        files = run_instrument(
            args.api_url,
            token,
            roots,
            ids,
            files=args.files,
            total_bytes=int(args.size_mb * 1e6),
            observations=args.observations,
            seed=args.seed + rounds,
        )
        rounds += 1
        size = sum(f.size for f in files)
        print(
            f"instrument: filed {len(files)} files, {size / 1e6:.1f} MB in "
            f"{len({f.observation for f in files})} observations "
            f"({time.monotonic() - t0:.1f} s)",
            file=sys.stderr,
        )
        filed.extend(
            {
                "id": str(f.id),
                "relative_path": f.relative_path,
                "size": f.size,
                "checksum": f.checksum,
                "observation": str(f.observation),
            }
            for f in files
        )
        if not args.every or (args.rounds and rounds >= args.rounds):
            break
        time.sleep(args.every)
    if args.json:
        json.dump(filed, sys.stdout)
        sys.stdout.write("\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line of the helpers."""
    p = argparse.ArgumentParser(prog="devtools", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("health", help="container healthcheck")
    h.add_argument("kind", choices=["api", "worker", "manager"])
    h.add_argument("name", nargs="?")
    b = sub.add_parser("create-buckets", help="create the S3 locations' buckets")
    b.add_argument("--timeout-s", type=float, default=60)
    i = sub.add_parser("instrument", help="the simulated instrument")
    i.add_argument("--api-url", default=os.environ.get("CCAT_API_URL", "http://api:8000"))
    i.add_argument("--site", default="ccat", help="site of the SOURCE locations")
    i.add_argument("--files", type=int, default=60)
    i.add_argument("--size-mb", type=float, default=50.0, help="total size of one round")
    i.add_argument("--observations", type=int, default=6)
    i.add_argument("--seed", type=int, default=int(time.time()))
    i.add_argument("--every", type=float, default=0, help="repeat every N seconds (0: once)")
    i.add_argument("--rounds", type=int, default=0, help="stop after N rounds (0: no limit)")
    i.add_argument("--wait-s", type=float, default=120, help="how long to wait for the API")
    i.add_argument("--json", action="store_true", help="print the filed files as JSON")
    args = p.parse_args(argv)
    if args.cmd == "health":
        return health(args.kind, args.name)
    if args.cmd == "create-buckets":
        return create_buckets(args.timeout_s)
    return instrument(args)


if __name__ == "__main__":
    sys.exit(main())
