"""``ccat-dc demo``: a simulated instrument files data and the whole pipeline carries it to the
archives, stages one package to processing and cleans up, with live progress and a summary.

Exit code 0 only when every filed file is ARCHIVED with a verified archive copy, one package
was staged to PROCESSING (every staged file checked against the original) and released, and
the SOURCE and buffer copies were deleted by the deletion rules.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import statistics
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ccat_ops_db.enums import LocationType, PackageState, PhysicalCopyStatus, Status

from .instrument import FiledFile, run_instrument
from .stack import LocalDataCenter

STAGES = ("filed", "packaged", "transferred", "unpacked", "archived", "cleaned")


@dataclass
class DemoOptions:
    """What the demo does."""

    files: int = 500
    size_mb: float = 300.0
    observations: int = 12
    seed: int = 1
    timeout_s: float = 900.0


@dataclass
class DemoResult:
    """What the demo saw (the summary is built from this)."""

    ok: bool
    problems: list[str] = field(default_factory=list)
    rows: list[tuple[str, str]] = field(default_factory=list)


def make_tokens(engine: Engine) -> dict[str, str]:
    """A fresh token for the simulated instrument and one for the operator (staging)."""
    tokens = {}
    with Session(engine) as s, s.begin():
        for username, role_name, scopes in (
            ("demo-instrument", "instrument", ["read", "file"]),
            ("demo-operator", "operator", ["read", "file", "operate"]),
        ):
            user = s.scalar(select(m.User).where(m.User.username == username))
            if user is None:
                role = s.scalar(select(m.Role).where(m.Role.name == role_name))
                user = m.User(username=username, roles=[role] if role else [])
                s.add(user)
            row, raw = m.ApiToken.issue(
                user,
                f"demo {dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}",
                scopes,
                dt.datetime.now(dt.UTC) + dt.timedelta(days=1),
            )
            s.add(row)
            tokens[role_name] = raw
    return tokens


def lookup_ids(engine: Engine) -> tuple[dict[str, int], dict[str, Path]]:
    """Ids of instruments, modules and ccat SOURCE locations; the SOURCE roots."""
    ids: dict[str, int] = {}
    roots: dict[str, Path] = {}
    with Session(engine) as s:
        for inst in s.scalars(select(m.Instrument)):
            ids[inst.name] = inst.id
            for mod in inst.modules:
                ids[f"{inst.name}/{mod.name}"] = mod.id
        for loc in s.scalars(
            select(m.DiskDataLocation).where(
                m.DiskDataLocation.location_type == LocationType.SOURCE
            )
        ):
            ids[loc.name] = loc.id
            roots[loc.name] = Path(loc.root_path)
    return ids, roots


def stage_counts(engine: Engine, observations: list[uuid.UUID]) -> dict[str, int]:
    """Files of this run at each stage."""
    f, p = m.RawDataFile, m.RawDataPackage
    mine = f.executed_obs_unit_id.in_(observations)
    with Session(engine) as s:

        def count(*where: Any, join_pkg: bool = True) -> int:
            q = select(func.count()).select_from(f)
            if join_pkg:
                q = q.join(p, p.id == f.raw_data_package_id)
            return int(s.scalar(q.where(mine, *where)) or 0)

        foreign_buffer = (
            select(m.PhysicalCopy.raw_data_package_id)
            .join(m.DataLocation)
            .join(m.Site)
            .where(
                m.DataLocation.location_type == LocationType.BUFFER,
                m.Site.short_name != "ccat",
                m.PhysicalCopy.copy_type == "raw_data_package",
            )
        )
        transferred = select(m.DataTransfer.data_transfer_package_id).where(
            m.DataTransfer.status == Status.COMPLETED
        )
        cleaned = (
            select(m.PhysicalCopy.raw_data_file_id)
            .join(m.DataLocation)
            .where(
                m.DataLocation.location_type == LocationType.SOURCE,
                m.PhysicalCopy.status == PhysicalCopyStatus.DELETED,
            )
        )
        return {
            "filed": count(join_pkg=False),
            "packaged": count(p.status == Status.COMPLETED),
            "transferred": count(p.data_transfer_package_id.in_(transferred)),
            "unpacked": count(p.id.in_(foreign_buffer)),
            "archived": count(p.state == PackageState.ARCHIVED),
            "cleaned": count(f.id.in_(cleaned), join_pkg=False),
        }


def site_lines(engine: Engine) -> dict[str, str]:
    """Live bytes per site and location type (package copies, and files at SOURCE)."""
    with Session(engine) as s:
        rows = s.execute(
            select(m.Site.short_name, m.DataLocation.location_type, func.sum(m.PhysicalCopy.size))
            .join(m.DataLocation, m.DataLocation.site_id == m.Site.id)
            .join(m.PhysicalCopy, m.PhysicalCopy.data_location_id == m.DataLocation.id)
            .where(
                m.PhysicalCopy.status.in_([PhysicalCopyStatus.PRESENT, PhysicalCopyStatus.STAGED])
            )
            .group_by(m.Site.short_name, m.DataLocation.location_type)
        ).all()
    per: dict[str, list[str]] = {}
    for site, ltype, size in rows:
        per.setdefault(site, []).append(f"{ltype} {int(size or 0) / 1e6:,.1f} MB")
    return {site: ", ".join(parts) for site, parts in sorted(per.items())}


def run_demo(home: Path, opts: DemoOptions, console: Console, dc: LocalDataCenter) -> DemoResult:
    """The demo on a started stack ``dc``."""
    from ccat_ops_db.db import make_engine

    engine = make_engine(dc.db_url)
    tokens = make_tokens(engine)
    ids, roots = lookup_ids(engine)
    total_bytes = int(opts.size_mb * 1e6)
    t0 = time.monotonic()
    filed: list[FiledFile] = []
    with Progress(
        TextColumn("{task.description:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        bars = {name: progress.add_task(name, total=opts.files, note="") for name in STAGES}
        site_tasks: dict[str, Any] = {}

        def on_file(n: int, _size: int) -> None:
            progress.update(bars["filed"], completed=n)

        filed = run_instrument(
            dc.api_url,
            tokens["instrument"],
            roots,
            ids,
            files=opts.files,
            total_bytes=total_bytes,
            observations=opts.observations,
            seed=opts.seed + int(time.time()),
            progress=on_file,
        )
        t_filed = time.monotonic()
        observations = sorted({f.observation for f in filed})
        deadline = time.monotonic() + opts.timeout_s
        while True:
            dc.check_children()
            counts = stage_counts(engine, observations)
            for name in STAGES:
                progress.update(bars[name], completed=counts[name])
            for site, line in site_lines(engine).items():
                if site not in site_tasks:
                    site_tasks[site] = progress.add_task(site, total=None, note="")
                progress.update(site_tasks[site], note=line)
            if counts["archived"] == len(filed) and counts["cleaned"] == len(filed):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        t_archived = time.monotonic()
        staging = stage_one_package(engine, dc, tokens["operator"], observations, progress)
        result = summarize(engine, filed, observations, t0, t_filed, t_archived, staging)
        # what each site holds at the end (after the clean-up and the released staging job)
        final = site_lines(engine)
        for site, task in site_tasks.items():
            progress.update(task, note=final.get(site, "nothing left"))
    engine.dispose()
    return result


def stage_one_package(
    engine: Engine,
    dc: LocalDataCenter,
    token: str,
    observations: list[uuid.UUID],
    progress: Progress,
) -> dict[str, Any]:
    """Stage one archived package to RAMSES through the API, check its files, release it."""
    out: dict[str, Any] = {"ok": False}
    with Session(engine) as s:
        pkg = s.scalar(
            select(m.RawDataPackage)
            .where(
                m.RawDataPackage.executed_obs_unit_id.in_(observations),
                m.RawDataPackage.state == PackageState.ARCHIVED,
            )
            .order_by(m.RawDataPackage.id)
            .limit(1)
        )
        ramses = s.scalar(
            select(m.DataLocation).where(m.DataLocation.location_type == LocationType.PROCESSING)
        )
        if pkg is None or ramses is None:
            out["problem"] = "no archived package to stage"
            return out
        files = {f.relative_path: f.checksum for f in pkg.files}
        pkg_id, ramses_id, ramses_root = pkg.id, ramses.id, Path(ramses.root_path)
    task = progress.add_task("staging", total=3, note=f"package {pkg_id} -> {ramses.name}")
    t0 = time.monotonic()
    with httpx.Client(
        base_url=dc.api_url, headers={"Authorization": f"Bearer {token}"}, timeout=60
    ) as c:
        r = c.post(
            "/api/v1/staging_jobs",
            json={
                "raw_data_package_ids": [pkg_id],
                "destination_location_id": ramses_id,
                "name": "demo",
            },
        )
        if r.status_code != 201:
            out["problem"] = f"staging request failed: HTTP {r.status_code} {r.text[:300]}"
            return out
        job_id = r.json()["id"]
        deadline = time.monotonic() + 300
        while True:
            dc.check_children()
            job = c.get(f"/api/v1/staging_jobs/{job_id}").json()
            if job["status"] in ("completed", "failed") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if job["status"] != "completed":
            out["problem"] = (
                f"staging job {job_id} ended {job['status']}: {job.get('failure_reason')}"
            )
            return out
        out["staged_s"] = time.monotonic() - t0
        progress.update(task, completed=1)
        staged_dir = ramses_root / job["packages"][0]["path"]
        bad = [
            rel
            for rel, checksum in files.items()
            if hashlib.sha256((staged_dir / rel).read_bytes()).hexdigest() != checksum
        ]
        if bad:
            out["problem"] = f"staged files differ from the originals: {bad[:3]}"
            return out
        out["files"] = len(files)
        progress.update(task, completed=2)
        r = c.post(f"/api/v1/staging_jobs/{job_id}/release")
        if r.status_code >= 300:
            out["problem"] = f"release failed: HTTP {r.status_code} {r.text[:300]}"
            return out
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with Session(engine) as s:
                copy = s.scalar(
                    select(m.PhysicalCopy).where(
                        m.PhysicalCopy.raw_data_package_id == pkg_id,
                        m.PhysicalCopy.data_location_id == ramses_id,
                    )
                )
                if copy is not None and copy.status == PhysicalCopyStatus.DELETED:
                    break
            time.sleep(0.5)
        else:
            out["problem"] = "staged copy not cleaned up after release"
            return out
        progress.update(task, completed=3)
    out.update(ok=True, job_id=job_id, package_id=pkg_id)
    return out


def _span(values: list[dt.datetime | None]) -> tuple[dt.datetime | None, dt.datetime | None]:
    vals = [v for v in values if v is not None]
    return (min(vals), max(vals)) if vals else (None, None)


def summarize(
    engine: Engine,
    filed: list[FiledFile],
    observations: list[uuid.UUID],
    t0: float,
    t_filed: float,
    t_archived: float,
    staging: dict[str, Any],
) -> DemoResult:
    """Check the end state and build the summary rows."""
    from data_transfer.deletion import archived_package_ids

    problems: list[str] = []
    rows: list[tuple[str, str]] = []
    total = sum(f.size for f in filed)
    with Session(engine) as s:
        pkgs = s.scalars(
            select(m.RawDataPackage).where(m.RawDataPackage.executed_obs_unit_id.in_(observations))
        ).all()
        pkg_ids = [p.id for p in pkgs]
        archived_ok = archived_package_ids(s, pkg_ids)
        files = s.scalars(
            select(m.RawDataFile).where(m.RawDataFile.executed_obs_unit_id.in_(observations))
        ).all()
        not_archived = [f for f in files if f.raw_data_package_id not in archived_ok]
        if len(files) != len(filed):
            problems.append(f"{len(filed)} files written but {len(files)} filed")
        if not_archived:
            problems.append(f"{len(not_archived)} files not ARCHIVED with a verified archive copy")
        upstream = s.execute(
            select(m.PhysicalCopy.status, func.count())
            .join(m.DataLocation)
            .where(
                m.DataLocation.location_type.in_([LocationType.SOURCE, LocationType.BUFFER]),
                (m.PhysicalCopy.raw_data_package_id.in_(pkg_ids))
                | (m.PhysicalCopy.raw_data_file_id.in_([f.id for f in files])),
            )
            .group_by(m.PhysicalCopy.status)
        ).all()
        left = sum(n for st, n in upstream if st != PhysicalCopyStatus.DELETED)
        deleted = sum(n for st, n in upstream if st == PhysicalCopyStatus.DELETED)
        if left:
            problems.append(f"{left} SOURCE/buffer copies not deleted")
        latencies = []
        by_pkg = {p.id: p for p in pkgs}
        for f in files:
            p = by_pkg.get(f.raw_data_package_id)
            if p is not None and p.archived_at is not None:
                latencies.append((p.archived_at - f.created_at).total_seconds())
        verified = s.scalar(
            select(func.count())
            .select_from(m.PhysicalCopy)
            .where(
                m.PhysicalCopy.raw_data_package_id.in_(pkg_ids),
                m.PhysicalCopy.checksum_verified_at.is_not(None),
            )
        )
        transfers = s.scalars(
            select(m.DataTransfer).where(
                m.DataTransfer.data_transfer_package_id.in_(
                    select(m.RawDataPackage.data_transfer_package_id).where(
                        m.RawDataPackage.id.in_(pkg_ids)
                    )
                )
            )
        ).all()
        unpacks = sum(1 for t in transfers if t.unpacked_at is not None)
        file_checks = len(files) * (1 + max(unpacks, 0)) + int(staging.get("files", 0))
        ltas = s.scalars(
            select(m.LongTermArchiveTransfer).where(
                m.LongTermArchiveTransfer.raw_data_package_id.in_(pkg_ids)
            )
        ).all()
        retried = [
            (kind, r)
            for kind, r in [("package", p.failure_reason) for p in pkgs]
            + [("transfer", t.failure_reason) for t in transfers]
            + [("unpack", t.unpack_failure_reason) for t in transfers]
            + [("archive", a.failure_reason) for a in ltas]
            if r
        ]
        failed = [p for p in pkgs if p.state == PackageState.FAILED]
        for p in failed:
            problems.append(f"package {p.name} FAILED: {p.failure_reason}")
        pk0, pk1 = _span([p.created_at for p in pkgs] + [p.updated_at for p in pkgs])
        tr0, tr1 = _span([t.started_at for t in transfers] + [t.finished_at for t in transfers])
        un0, un1 = _span([t.finished_at for t in transfers] + [t.unpacked_at for t in transfers])
        ar0, ar1 = _span([a.started_at for a in ltas] + [a.finished_at for a in ltas])
    if not staging.get("ok"):
        problems.append(staging.get("problem", "staging did not finish"))

    def secs(a: dt.datetime | None, b: dt.datetime | None) -> str:
        return f"{(b - a).total_seconds():.1f} s" if a and b else "-"

    elapsed = t_archived - t_filed
    rows += [
        (
            "files filed through the API",
            f"{len(files)} ({total / 1e6:,.1f} MB) in {t_filed - t0:.1f} s",
        ),
        ("raw data packages", f"{len(pkgs)} ({len(archived_ok)} archived)"),
        ("packaging (span)", secs(pk0, pk1)),
        ("transfers (span)", f"{secs(tr0, tr1)}, {len(transfers)} transfers"),
        ("unpack + verify (span)", secs(un0, un1)),
        ("archive (span)", f"{secs(ar0, ar1)}, {len(ltas)} archive copies"),
        (
            "filed -> archived + cleaned",
            f"{elapsed:.1f} s, {total / 1e6 / max(elapsed, 1e-9):,.1f} MB/s",
        ),
    ]
    if latencies:
        rows.append(
            (
                "file filed -> ARCHIVED",
                f"median {statistics.median(latencies):.1f} s, "
                f"max {max(latencies):.1f} s (target < 30 s)",
            )
        )
    rows += [
        ("checksums verified", f"{file_checks} file checks, {verified} package copies"),
        ("upstream copies deleted", f"{deleted} (left: {left})"),
        (
            "staging",
            f"job {staging.get('job_id')}: {staging.get('files', 0)} files checked, "
            "released, cleaned"
            if staging.get("ok")
            else f"FAILED: {staging.get('problem')}",
        ),
        ("retries / failures", f"{len(retried)} retried, {len(failed)} failed"),
    ]
    for kind, reason in retried[:5]:
        rows.append((f"  {kind}", reason[:120]))
    return DemoResult(ok=not problems, problems=problems, rows=rows)


def print_summary(console: Console, result: DemoResult) -> None:
    """The closing table."""
    table = Table(title="Demo summary", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for k, v in result.rows:
        table.add_row(k, v)
    console.print(table)
    if result.ok:
        console.print(
            "[green]OK[/green]: every file ARCHIVED with a verified checksum, one package "
            "staged and released, upstream copies deleted by the rules"
        )
    else:
        for p in result.problems:
            console.print(f"[red]problem:[/red] {p}")
