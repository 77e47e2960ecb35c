"""Scale benchmark: the managers' work-finding queries and the API's main reads on the database
``bench/scale_gen.py`` made (10 million files by default), with EXPLAIN's verdict beside each.

What is timed, and how:

* **Every manager pass** (``data_transfer.managers``, the real code) with a dispatcher that
  only records what would be submitted. A pass creates records and marks them SCHEDULED, so
  each run happens inside one transaction that is rolled back afterwards: the database is the
  same for every run and every later benchmark. In that transaction the manager runs twice:
  the **first pass** finds the generated in-flight tail and does that work (shown for
  information), the **later pass** is the steady state the manager then loops in (the target
  applies to it). Task heartbeats are all alive (a healthy system), so the recovery manager
  resets nothing.
* **Every SELECT those passes ran**, captured as sent to PostgreSQL (statement and
  parameters): its time in the pass (p50/p99 over every execution), and ``EXPLAIN (ANALYZE,
  BUFFERS)`` of its slowest execution, on the same database state, for the plan verdict: index
  or sequential scan, and the rows the scans read. A sequential scan of a table with more than
  100,000 rows fails the target whatever its time.
* **The API's main reads**, by calling the route functions of ``ops_db_api`` on a session
  (the same code and SQL as the routes, without HTTP): GET a file by id, list the files of an
  executed obs unit, the pipeline summary (computed fresh, no cache). With ``--http`` (the
  default) also through the real API (``ccat-api serve``, one worker, on 127.0.0.1) with one
  keep-alive client.

Targets: manager scans and later passes < 200 ms (p50), API GET by id p99 < 10 ms, pipeline
summary < 500 ms (p50). Exits 0 (it is a measurement) unless something fails to run.

    python bench/scale_bench.py [--pgdata /var/tmp/ccat-scale] [--runs 5] [--markdown FILE]
"""

# ruff: noqa: S311 - seeded sampling, not cryptography
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import Connection, event, text
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ccat_ops_db.db import make_engine
from ccat_ops_db.embedded import EmbeddedPostgres
from data_transfer.managers import MANAGERS, run_pass
from data_transfer.settings import TransferSettings

console = Console(width=None if sys.stdout.isatty() else 200)

DEFAULT_PGDATA = Path("/var/tmp/ccat-scale")  # noqa: S108 - a fixed, documented place
MANAGER_TARGET_MS = 200.0
GET_TARGET_MS = 10.0
SUMMARY_TARGET_MS = 500.0
BIG_TABLE_ROWS = 1_000_000  # a sequential scan of a table this big fails the target
LARGE_TABLE_ROWS = 100_000  # ... of one this big is shown in the verdict
SOURCE_DIRS = ("/data_transfer/", "/ops_db_api/")


# --------------------------------------------------------------------------------------------
# Capturing the statements the real code sends


@dataclass
class Stat:
    """One distinct SELECT: every execution's time and the slowest execution's parameters."""

    label: str
    statement: str
    times: list[float] = field(default_factory=list)
    worst: float = -1.0
    params: Any = None
    plan: Plan | None = None


@dataclass
class Plan:
    """What EXPLAIN (ANALYZE, BUFFERS) said about one statement."""

    ms: float
    scans: list[tuple[str, str, str | None, int]]  # (node type, table, index, rows read)
    rows_read: int
    big_seq: list[str]
    buffers: int
    large_seq: list[str] = field(default_factory=list)

    def verdict(self) -> str:
        if self.big_seq:
            return "SEQ SCAN " + ", ".join(sorted(set(self.big_seq)))
        if self.large_seq:
            return "seq scan " + ", ".join(sorted(set(self.large_seq)))
        idx = sorted({i for _t, _r, i, _n in self.scans if i})
        kinds = {t for t, *_ in self.scans}
        if not self.scans:
            return "no table read"
        name = "index only" if kinds == {"Index Only Scan"} else "index"
        if not idx:
            return "seq scan of small tables"
        shown = ", ".join(_short_index(i) for i in idx[:2]) + (" …" if len(idx) > 2 else "")
        return f"{name}: {shown}"


def _short_index(name: str) -> str:
    return name.removeprefix("ix_").removeprefix("uq_")


_IN_LIST = re.compile(r"IN \((?:%\(\w+\)s(?:::\w+)?(?:, )?)+\)")


def _caller() -> str:
    f = sys._getframe(2)
    while f is not None:
        fn = f.f_code.co_filename
        if any(d in fn for d in SOURCE_DIRS):
            return f"{Path(fn).name}:{f.f_code.co_name}"
        f = f.f_back  # type: ignore[assignment]
    return "?"


class Capture:
    """SQLAlchemy cursor events on one connection: times and keeps every SELECT."""

    def __init__(self, conn: Connection) -> None:
        self.on = False
        self.phase = ""
        self.stats: dict[tuple[str, str, str], Stat] = {}
        self._t0 = 0.0
        event.listen(conn, "before_cursor_execute", self._before)
        event.listen(conn, "after_cursor_execute", self._after)

    def _before(self, conn, cursor, statement, parameters, context, executemany) -> None:
        self._t0 = time.perf_counter()

    def _after(self, conn, cursor, statement, parameters, context, executemany) -> None:
        if not self.on or executemany:
            return
        elapsed = time.perf_counter() - self._t0
        if not statement.lstrip().upper().startswith("SELECT"):
            return
        label = _caller()
        key = (self.phase, label, _IN_LIST.sub("IN (…)", statement))
        st = self.stats.get(key)
        if st is None:
            st = self.stats[key] = Stat(label, statement)
        st.times.append(elapsed)
        if elapsed > st.worst:
            st.worst, st.statement, st.params = elapsed, statement, parameters


def explain(conn: Connection, st: Stat, reltuples: dict[str, float]) -> Plan:
    """EXPLAIN (ANALYZE, BUFFERS) of the statement's slowest execution."""
    doc = conn.exec_driver_sql(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + st.statement, st.params or {}
    ).scalar()
    if isinstance(doc, str):
        doc = json.loads(doc)
    top = doc[0]
    scans: list[tuple[str, str, str | None, int]] = []
    big_seq: list[str] = []
    large_seq: list[str] = []

    def walk(node: dict[str, Any]) -> None:
        kind = node.get("Node Type", "")
        rel = node.get("Relation Name")
        loops = int(node.get("Actual Loops", 1) or 1)
        if rel:
            read = int((node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)) * loops)
            index = node.get("Index Name")
            if kind == "Bitmap Heap Scan":
                index = _bitmap_index(node)
            scans.append((kind, rel, index, read))
            if kind == "Seq Scan" and reltuples.get(rel, 0) >= BIG_TABLE_ROWS:
                big_seq.append(f"{rel} ({reltuples[rel] / 1e6:.1f}M rows)")
            elif kind == "Seq Scan" and reltuples.get(rel, 0) >= LARGE_TABLE_ROWS:
                large_seq.append(f"{rel} ({reltuples[rel] / 1e3:,.0f}k rows)")
        for child in node.get("Plans", []) or []:
            walk(child)

    walk(top["Plan"])
    plan_node = top["Plan"]
    buffers = int(plan_node.get("Shared Hit Blocks", 0) + plan_node.get("Shared Read Blocks", 0))
    return Plan(
        ms=float(top.get("Execution Time", 0.0)),
        scans=scans,
        rows_read=sum(s[3] for s in scans),
        big_seq=big_seq,
        buffers=buffers,
        large_seq=large_seq,
    )


def _bitmap_index(node: dict[str, Any]) -> str | None:
    for child in node.get("Plans", []) or []:
        if child.get("Index Name"):
            return str(child["Index Name"])
        found = _bitmap_index(child)
        if found:
            return found
    return None


# --------------------------------------------------------------------------------------------
# Results


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of seconds, in ms."""
    if not values:
        return math.nan
    s = sorted(values)
    return 1000 * s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


@dataclass
class Row:
    query: str
    n: int
    p50: float
    p99: float
    plan: str
    rows_read: str
    target: str
    met: bool | None
    style: str = ""


def _ms(v: float) -> str:
    if math.isnan(v):
        return "-"
    return f"{v:,.1f}" if v < 100 else f"{v:,.0f}"


class AllAlive:
    """Heartbeats of a healthy system: every task is alive."""

    def beat(self, key: str, ttl_s: float) -> None:
        pass

    def alive(self, key: str) -> bool:
        return True

    def clear(self, key: str) -> None:
        pass

    def keys(self, prefix: str) -> list[str]:
        return []

    def memory_s(self) -> float:
        return float("inf")


@dataclass
class Recorder:
    """A dispatcher that only records submissions (like inline.QueueDispatcher, never runs)."""

    submitted: list[tuple[str, Any, str]] = field(default_factory=list)

    def submit(self, kind: str, payload: Any, queue: str) -> None:
        self.submitted.append((kind, payload, queue))


# --------------------------------------------------------------------------------------------


def bench_managers(
    engine: Any, names: list[str], runs: int, reltuples: dict[str, float], progress: Progress
) -> tuple[list[Row], dict[str, str]]:
    settings = TransferSettings(notify_check_s=0)  # every notify pass timed is a real one
    rows: list[Row] = []
    work: dict[str, str] = {}
    task = progress.add_task("manager passes", total=len(names) * (runs + 2))
    for name in names:
        first: list[float] = []
        later: list[float] = []
        with engine.connect() as conn:
            cap = Capture(conn)
            for i in range(runs + 1):  # the first run warms the caches up
                trans = conn.begin()
                disp = Recorder()
                cap.on = i > 0
                cap.phase = "first"
                t0 = time.perf_counter()
                r1 = run_pass(name, conn, settings, disp, AllAlive())  # type: ignore[arg-type]
                t1 = time.perf_counter()
                n_first = len(disp.submitted)
                cap.phase = "later"
                r2 = run_pass(name, conn, settings, disp, AllAlive())  # type: ignore[arg-type]
                t2 = time.perf_counter()
                cap.on = False
                trans.rollback()
                if i > 0:
                    first.append(t1 - t0)
                    later.append(t2 - t1)
                work[name] = (
                    f"first pass: created {r1.created}, scheduled {r1.scheduled}, "
                    f"submitted {n_first}; later pass: created {r2.created}, "
                    f"scheduled {r2.scheduled}"
                )
                progress.advance(task)
            # EXPLAIN each statement on the state it ran against (same transaction shape)
            trans = conn.begin()
            for (phase, _l, _s), st in cap.stats.items():
                if phase == "first":
                    st.plan = explain(conn, st, reltuples)
            run_pass(name, conn, settings, Recorder(), AllAlive())  # type: ignore[arg-type]
            for (phase, _l, _s), st in cap.stats.items():
                if phase == "later":
                    st.plan = explain(conn, st, reltuples)
            trans.rollback()
            progress.advance(task)
        rows.extend(_manager_rows(name, first, later, cap.stats, runs))
    return rows, work


def _manager_rows(
    name: str, first: list[float], later: list[float], stats: dict, runs: int
) -> list[Row]:
    out = []
    for phase, times, target in (("first", first, None), ("later", later, MANAGER_TARGET_MS)):
        mine = [st for (ph, _l, _s), st in stats.items() if ph == phase]
        bad = [st for st in mine if st.plan and st.plan.big_seq]
        worst = max(mine, key=lambda st: st.plan.ms if st.plan else 0, default=None)
        rows_read = sum((st.plan.rows_read if st.plan else 0) * len(st.times) / runs for st in mine)
        plan = f"{sum(len(st.times) for st in mine) / runs:,.0f} SELECTs/pass"
        if bad:
            plan += "; " + bad[0].plan.verdict()  # type: ignore[union-attr]
        elif worst and worst.plan:
            plan += f"; slowest {worst.plan.ms:,.1f} ms"
        p50 = pct(times, 50)
        met = None if target is None else (p50 < target and not bad)
        out.append(
            Row(
                query=f"{name}: {'first pass (tail work)' if phase == 'first' else 'later pass'}",
                n=len(times),
                p50=p50,
                p99=pct(times, 99),
                plan=plan,
                rows_read=f"≈{rows_read:,.0f}",
                target=f"< {target:.0f} ms" if target else "info",
                met=met,
                style="bold" if phase == "later" else "",
            )
        )
        if phase != "later":
            continue
        # the individual SELECTs of the later pass, and those only the first pass ran
        seen = {(st.label, _IN_LIST.sub("IN (…)", st.statement)) for st in mine}
        extra = [
            st
            for (ph, _l, _s), st in stats.items()
            if ph == "first" and (st.label, _IN_LIST.sub("IN (…)", st.statement)) not in seen
        ]
        for st in sorted(mine, key=lambda s: -s.worst) + sorted(extra, key=lambda s: -s.worst):
            out.append(_select_row(st, runs, target=MANAGER_TARGET_MS, first_only=st in extra))
    return out


def _main_table(statement: str) -> str:
    found = re.search(r"\bFROM\s+(\w+)", statement)
    return found.group(1) if found else "?"


def _target(target: float | None, p99: bool) -> str:
    return "info" if target is None else f"< {target:.0f} ms" + (" p99" if p99 else "")


def _met(value: float, target: float | None, ok: bool = True) -> bool | None:
    return None if target is None else (value < target and ok)


def _select_row(
    st: Stat,
    runs: int,
    *,
    target: float | None,
    first_only: bool = False,
    p99_target: bool = False,
) -> Row:
    p50, p99 = pct(st.times, 50), pct(st.times, 99)
    plan = st.plan
    bad = bool(plan and plan.big_seq)
    judged = p99 if p99_target else p50
    per = len(st.times) / runs
    label = f"  ↳ {st.label} ({_main_table(st.statement)})"
    if per > 1.5:
        label += f" x{per:,.0f}"
    if first_only:
        label += " [first pass]"
    return Row(
        query=label,
        n=len(st.times),
        p50=p50,
        p99=p99,
        plan=plan.verdict() if plan else "-",
        rows_read=f"{plan.rows_read:,}" if plan else "-",
        target=_target(target, p99_target),
        met=_met(judged, target, not bad),
        style="dim",
    )


# --------------------------------------------------------------------------------------------
# API reads


def bench_api_direct(
    engine: Any,
    file_ids: list[uuid.UUID],
    eou_ids: list[uuid.UUID],
    runs: int,
    reltuples: dict[str, float],
    progress: Progress,
) -> list[Row]:
    """The route functions, called on a session: the routes' own SQL and serialisation."""
    try:
        from ops_db_api.deps import Page
        from ops_db_api.routers import pipeline, raw_data_files
    except Exception as exc:  # the API package is optional for the managers' part
        return [Row(f"API routes not importable: {exc}", 0, math.nan, math.nan, "", "", "", None)]

    cases: list[tuple[str, Callable[[Session, int], Any], int, float | None, bool]] = [
        (
            "GET /raw_data_files/{id} (route code)",
            lambda s, i: raw_data_files.get_one(file_ids[i % len(file_ids)], s, None),
            len(file_ids),
            GET_TARGET_MS,
            True,
        ),
        (
            "GET /raw_data_files?executed_obs_unit_id= (route code, 1st page)",
            lambda s, i: raw_data_files.list_all(
                db=s,
                _=None,
                page=Page(limit=100, cursor=None),
                executed_obs_unit_id=eou_ids[i % len(eou_ids)],
                instrument_module_id=None,
                state=None,
                location_id=None,
                filed_after=None,
                filed_before=None,
            ),
            len(eou_ids),
            None,
            False,
        ),
        (
            "GET /pipeline/summary?max_age_s=0 (compute_summary)",
            lambda s, i: pipeline.compute_summary(s),
            runs,
            SUMMARY_TARGET_MS,
            False,
        ),
    ]
    rows: list[Row] = []
    task = progress.add_task("API reads (route code)", total=sum(c[2] + 1 for c in cases))
    for label, fn, n, target, p99_target in cases:
        times: list[float] = []
        with engine.connect() as conn:
            cap = Capture(conn)
            cap.phase = "api"
            try:
                with Session(conn) as s:
                    fn(s, 0)  # warm-up
                    progress.advance(task)
                    for i in range(n):
                        cap.on = True
                        t0 = time.perf_counter()
                        fn(s, i)
                        times.append(time.perf_counter() - t0)
                        cap.on = False
                        s.expunge_all()
                        progress.advance(task)
                    s.rollback()
            except Exception as exc:
                rows.append(
                    Row(
                        f"{label}: failed ({type(exc).__name__}: {exc})"[:150],
                        0,
                        math.nan,
                        math.nan,
                        "",
                        "",
                        "",
                        False,
                    )
                )
                continue
            for st in cap.stats.values():
                st.plan = explain(conn, st, reltuples)
            conn.rollback()
        judged = pct(times, 99 if p99_target else 50)
        bad = [st for st in cap.stats.values() if st.plan and st.plan.big_seq]
        rows.append(
            Row(
                query=label,
                n=len(times),
                p50=pct(times, 50),
                p99=pct(times, 99),
                plan=f"{sum(len(st.times) for st in cap.stats.values()) / max(1, n):,.0f} "
                "SELECTs/call" + ("; " + bad[0].plan.verdict() if bad else ""),  # type: ignore[union-attr]
                rows_read="",
                target=_target(target, p99_target),
                met=_met(judged, target, not bad),
                style="bold",
            )
        )
        for st in sorted(cap.stats.values(), key=lambda s: -s.worst):
            rows.append(_select_row(st, n, target=target, p99_target=p99_target))
    return rows


#: Reads proposed for ``ops_db_api`` (not in the API yet), timed the same way; see
#: docs/scale.md. The pipeline summary's one pass over every copy, split in two: live copies
#: (what the summary shows per location) from the partial index, and the deleted history
#: (only counted) which is the part that grows with the years; and GET by id in one query.
PROPOSALS = (
    (
        "proposal: summary copies, live part (status <> 'deleted')",
        "SELECT data_location_id, copy_type, status, count(*), coalesce(sum(size), 0), "
        "min(updated_at) FROM physical_copy WHERE status <> 'deleted' "
        "GROUP BY data_location_id, copy_type, status",
        SUMMARY_TARGET_MS,
    ),
    (
        "proposal: summary copies, deleted history (count per location, type)",
        "SELECT data_location_id, copy_type, count(*) FROM physical_copy "
        "WHERE status = 'deleted' GROUP BY data_location_id, copy_type",
        None,
    ),
    (
        "proposal: GET file by id in one query (LEFT JOIN its package)",
        "SELECT f.*, p.state FROM raw_data_file f LEFT JOIN raw_data_package p "
        "ON p.id = f.raw_data_package_id WHERE f.id = %(id)s",
        GET_TARGET_MS,
    ),
)


def bench_proposals(
    engine: Any, file_ids: list[uuid.UUID], runs: int, reltuples: dict[str, float]
) -> list[Row]:
    rows = []
    with engine.connect() as conn:
        for label, sql, target in PROPOSALS:
            n = len(file_ids) if "%(id)s" in sql else runs
            st = Stat(label, sql)
            for i in range(-1, n):
                params = {"id": file_ids[max(i, 0) % len(file_ids)]} if "%(id)s" in sql else {}
                t0 = time.perf_counter()
                conn.exec_driver_sql(sql, params).all()
                elapsed = time.perf_counter() - t0
                if i >= 0:
                    st.times.append(elapsed)
                    if elapsed > st.worst:
                        st.worst, st.params = elapsed, params
            st.plan = explain(conn, st, reltuples)
            p99 = target == GET_TARGET_MS
            row = _select_row(st, n, target=target, p99_target=p99)
            row.query, row.style = label, "italic"
            rows.append(row)
        conn.rollback()
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_api_http(
    engine: Any,
    url: str,
    file_ids: list[uuid.UUID],
    eou_ids: list[uuid.UUID],
    requests: int,
    runs: int,
    progress: Progress,
) -> list[Row]:
    """The real API (ccat-api serve, one worker) with one keep-alive client, sequentially."""
    import httpx

    with Session(engine) as s, s.begin():
        role = s.query(m.Role).filter_by(name="reader").one()
        user = s.query(m.User).filter_by(username="scale-bench").one_or_none()
        if user is None:
            user = m.User(username="scale-bench", roles=[role])
            s.add(user)
        token_name = f"scale-bench-{uuid.uuid4().hex[:8]}"
        row, token = m.ApiToken.issue(user, token_name, ["read"])
        s.add(row)
    port = free_port()
    env = {
        **os.environ,
        "CCAT_OPS_DB_URL": url,
        "CCAT_API_LOG_LEVEL": "warning",
        "CCAT_API_WORKERS": "1",
    }
    exe = Path(sys.executable).with_name("ccat-api")
    proc = subprocess.Popen(
        [str(exe), "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    rows: list[Row] = []
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"ccat-api serve exited with {proc.returncode}")
            time.sleep(0.1)
        cases = [
            (
                "HTTP GET /api/v1/raw_data_files/{id}",
                requests,
                GET_TARGET_MS,
                True,
                lambda i: f"/api/v1/raw_data_files/{file_ids[i % len(file_ids)]}",
            ),
            (
                "HTTP GET /api/v1/raw_data_files?executed_obs_unit_id=",
                min(requests, 200),
                None,
                False,
                lambda i: (
                    f"/api/v1/raw_data_files?executed_obs_unit_id={eou_ids[i % len(eou_ids)]}"
                ),
            ),
            (
                "HTTP GET /api/v1/pipeline/summary?max_age_s=0",
                runs,
                SUMMARY_TARGET_MS,
                False,
                lambda i: "/api/v1/pipeline/summary?max_age_s=0",
            ),
        ]
        task = progress.add_task("API reads (HTTP)", total=sum(c[1] + 1 for c in cases))
        with httpx.Client(
            base_url=base, timeout=120, headers={"Authorization": f"Bearer {token}"}
        ) as client:
            for label, n, target, p99_target, path in cases:
                times = []
                errors = 0
                for i in range(-1, n):
                    t0 = time.perf_counter()
                    r = client.get(path(max(i, 0)))
                    elapsed = time.perf_counter() - t0
                    if r.status_code != 200:
                        errors += 1
                    elif i >= 0:
                        times.append(elapsed)
                    progress.advance(task)
                judged = pct(times, 99 if p99_target else 50)
                rows.append(
                    Row(
                        query=label,
                        n=len(times),
                        p50=pct(times, 50),
                        p99=pct(times, 99),
                        plan=f"{errors} errors" if errors else "one keep-alive client",
                        rows_read="",
                        target=_target(target, p99_target),
                        met=_met(judged, target, not errors),
                        style="bold",
                    )
                )
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        with Session(engine) as s, s.begin():
            s.query(m.ApiToken).filter_by(name=token_name).delete()
    return rows


# --------------------------------------------------------------------------------------------


def render(rows: list[Row], title: str) -> Table:
    table = Table(title=title, show_lines=False)
    table.add_column("query")
    table.add_column("n", justify="right")
    table.add_column("p50 ms", justify="right")
    table.add_column("p99 ms", justify="right")
    table.add_column("plan (EXPLAIN ANALYZE)")
    table.add_column("rows read", justify="right")
    table.add_column("target")
    table.add_column("", justify="center")
    for r in rows:
        verdict = "" if r.met is None else ("[green]MET" if r.met else "[red]NOT MET")
        table.add_row(
            r.query,
            str(r.n),
            _ms(r.p50),
            _ms(r.p99),
            r.plan,
            r.rows_read,
            r.target,
            verdict,
            style=r.style,
        )
    return table


def markdown(rows: list[Row], title: str) -> str:
    """The passes and reads (compact), then every SELECT, as Markdown tables."""

    def table(selected: list[Row]) -> list[str]:
        lines = [
            "| query | n | p50 ms | p99 ms | plan (EXPLAIN ANALYZE) | rows read | target | |",
            "|---|--:|--:|--:|---|--:|---|---|",
        ]
        for r in selected:
            verdict = "" if r.met is None else ("MET" if r.met else "**NOT MET**")
            q = r.query.replace("|", "\\|").replace("  ↳", "↳")
            q = f"**{q}**" if r.style == "bold" else q
            lines.append(
                f"| {q} | {r.n} | {_ms(r.p50)} | {_ms(r.p99)} | {r.plan.replace('|', '/')} | "
                f"{r.rows_read} | {r.target} | {verdict} |"
            )
        return lines

    compact = [r for r in rows if r.style != "dim"]
    return "\n".join(
        [f"{title}", "", *table(compact), "", "Every SELECT of those:", "", *table(rows), ""]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pgdata", type=Path, default=DEFAULT_PGDATA)
    ap.add_argument("--database", default=None, help="default: the generator's")
    ap.add_argument("--runs", type=int, default=5, help="runs per manager pass and summary")
    ap.add_argument("--requests", type=int, default=1000, help="GET by id calls")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--no-http", dest="http", action="store_false", help="skip the real API")
    ap.add_argument("--only", default=None, help="comma-separated managers to time")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    args = ap.parse_args(argv)
    meta_path = args.pgdata.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    database = args.database or meta.get("database", "ccat_scale")
    load_before = os.getloadavg()
    pg = EmbeddedPostgres(args.pgdata)
    url = pg.url(database)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            reltuples = {
                name: float(n)
                for name, n in conn.execute(
                    text("SELECT relname, reltuples FROM pg_class WHERE relkind = 'r'")
                )
            }
            db_bytes = int(
                conn.execute(text("SELECT pg_database_size(current_database())")).scalar()
            )
            rng = random.Random(args.seed)
            file_ids = list(
                conn.execute(
                    text(
                        "SELECT id FROM raw_data_file TABLESAMPLE SYSTEM (1) "
                        "REPEATABLE (:seed) LIMIT :n"
                    ),
                    {"seed": args.seed, "n": args.requests},
                ).scalars()
            )
            if len(file_ids) < min(args.requests, 100):
                file_ids = list(
                    conn.execute(
                        text("SELECT id FROM raw_data_file LIMIT :n"), {"n": args.requests}
                    ).scalars()
                )
            rng.shuffle(file_ids)
            eou_ids = list(
                conn.execute(
                    text("SELECT id FROM executed_obs_unit ORDER BY id LIMIT 2000")
                ).scalars()
            )
            rng.shuffle(eou_ids)
            eou_ids = eou_ids[:100]
            settings = dict(
                conn.execute(
                    text(
                        "SELECT name, current_setting(name) FROM pg_settings WHERE name IN "
                        "('shared_buffers', 'work_mem', 'effective_cache_size', 'random_page_cost',"
                        " 'max_parallel_workers_per_gather', 'jit')"
                    )
                ).all()
            )
            version = conn.execute(text("SHOW server_version")).scalar()
        files = int(reltuples.get("raw_data_file", 0))
        console.print(
            f"[bold]scale benchmark[/]: {database} in {args.pgdata}: {files:,} files, "
            f"{int(reltuples.get('physical_copy', 0)):,} physical copies, "
            f"{db_bytes / 1e9:,.1f} GB; PostgreSQL {version}"
        )
        rows: list[Row] = []
        with Progress(
            TextColumn("{task.description:<30}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as progress:
            names = [n for n in MANAGERS if not args.only or n in args.only.split(",")]
            manager_rows, work = bench_managers(engine, names, args.runs, reltuples, progress)
            rows += manager_rows
            rows += bench_api_direct(engine, file_ids, eou_ids, args.runs, reltuples, progress)
            rows += bench_proposals(engine, file_ids, args.runs, reltuples)
            if args.http:
                try:
                    rows += bench_api_http(
                        engine, url, file_ids, eou_ids, args.requests, args.runs, progress
                    )
                except Exception as exc:
                    rows.append(
                        Row(
                            f"HTTP API: failed ({exc})"[:150],
                            0,
                            math.nan,
                            math.nan,
                            "",
                            "",
                            "",
                            False,
                        )
                    )
        gen = (
            f"generator: {meta['seconds']:,.0f} s for {meta['files']:,} files "
            f"({meta.get('generated_at', '?')}), "
            if meta
            else ""
        )
        title = (
            f"{gen}database {db_bytes / 1e9:,.1f} GB; {args.runs} runs per pass, "
            f"{len(file_ids)} GETs"
        )
        console.print(render(rows, title))
        for name, w in work.items():
            console.print(f"[dim]{name}: {w}")
        met = sum(1 for r in rows if r.met)
        missed = [r.query.strip() for r in rows if r.met is False]
        console.print(
            f"targets: {met} met, {len(missed)} not met"
            + (": " + "; ".join(missed[:8]) if missed else "")
        )
        console.print(
            "server: "
            + ", ".join(f"{k}={v}" for k, v in sorted(settings.items()))
            + f"; load average before the run {load_before[0]:.2f} "
            f"({os.cpu_count()} cores: other processes share them)"
        )
        if args.markdown:
            args.markdown.write_text(markdown(rows, title))
            console.print(f"markdown table written to {args.markdown}")
    finally:
        engine.dispose()
        pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
