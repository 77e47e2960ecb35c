"""`ccat-dc demo` in a fresh folder: the whole data center on wheels, as a new user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ccat_ops_db.embedded import EmbeddedPostgres
from ccat_ops_db.enums import LocationType, PackageState, PhysicalCopyStatus, Status


def test_demo_with_50_files_archives_stages_and_cleans_up(tmp_path: Path) -> None:
    home = tmp_path / "dc"
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("CCAT_")}
    env["COLUMNS"] = "160"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "ccat_dc.cli",
            "demo",
            "--home",
            str(home),
            "--files",
            "50",
            "--size",
            "25",
            "--timeout",
            "240",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    assert (
        "files filed through the API  │ 50" in out or "files filed through the API │ 50" in out
    ), out
    assert "OK: every file ARCHIVED" in out
    assert "file filed -> ARCHIVED" in out and "target < 30 s" in out
    assert "(left: 0)" in out
    # nothing left running: the stack file is gone and the database server can start again
    assert not (home / "stack.json").exists()
    pg = EmbeddedPostgres(home / "postgres")
    engine = create_engine(pg.url("ccat_ops_db"))
    try:
        with Session(engine) as s:
            assert s.scalar(select(func.count()).select_from(m.RawDataFile)) == 50
            states = set(s.scalars(select(m.RawDataPackage.state)))
            assert states == {PackageState.ARCHIVED}
            lta_copies = s.scalars(
                select(m.PhysicalCopy)
                .join(m.DataLocation)
                .where(m.DataLocation.location_type == LocationType.LONG_TERM_ARCHIVE)
            ).all()
            packages = s.scalar(select(func.count()).select_from(m.RawDataPackage))
            assert len(lta_copies) == 2 * packages  # both archive sites
            assert all(c.checksum_verified_at is not None for c in lta_copies)
            upstream = s.scalars(
                select(m.PhysicalCopy.status)
                .join(m.DataLocation)
                .where(m.DataLocation.location_type.in_([LocationType.SOURCE, LocationType.BUFFER]))
            ).all()
            assert upstream and set(upstream) == {PhysicalCopyStatus.DELETED}
            job = s.scalars(select(m.StagingJob)).one()
            assert job.status == Status.COMPLETED and job.active is False
            assert s.scalar(select(func.count()).select_from(m.ApiAuditLog)) > 0
    finally:
        engine.dispose()
        pg.stop()
    files = [p for p in (home / "sites" / "ccat").rglob("*") if p.is_file()]
    assert files == []  # SOURCE and telescope buffer emptied by the deletion rules
    archived = [p for p in (home / "sites" / "cologne" / "lta").rglob("*.tar") if p.is_file()]
    assert len(archived) == packages
