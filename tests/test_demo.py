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


def _env() -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("CCAT_")}
    env["COLUMNS"] = "160"
    return env


def _children_alive(home: Path) -> list[int]:
    import json
    import os

    info = json.loads((home / "stack.json").read_text())
    alive = []
    for pid in info["children"].values():
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    return alive


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def test_up_status_down_keep_and_stop_the_stack(tmp_path: Path) -> None:
    import json
    import time

    import httpx

    home = tmp_path / "dc"
    cli = [sys.executable, "-m", "ccat_dc.cli"]
    up = subprocess.Popen(
        [*cli, "up", "--home", str(home)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for(home / "stack.json", up)
        info = json.loads((home / "stack.json").read_text())
        assert httpx.get(info["api_url"] + "/readyz", timeout=5).status_code == 200
        assert httpx.get(info["api_url"] + "/docs", timeout=5).status_code == 200
        children = _children_alive(home)
        assert len(children) == 5  # api, three site workers, managers
        status = subprocess.run(
            [*cli, "status", "--home", str(home)], env=_env(), capture_output=True, text=True
        )
        assert status.returncode == 0, status.stderr
        assert "raw_data_package" in status.stdout
        down = subprocess.run(
            [*cli, "down", "--home", str(home)], env=_env(), capture_output=True, text=True
        )
        assert down.returncode == 0, down.stderr
        up.wait(60)
        assert up.returncode == 0
        assert not (home / "stack.json").exists()
        time.sleep(0.5)
        import os

        for pid in children:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            raise AssertionError(f"process {pid} still runs after down")
    finally:
        if up.poll() is None:
            up.kill()


def test_ctrl_c_stops_every_process_and_a_second_run_resumes(tmp_path: Path) -> None:
    import signal
    import time

    home = tmp_path / "dc"
    cli = [sys.executable, "-m", "ccat_dc.cli"]
    # A terminal delivers Ctrl-C to a process whose SIGINT is at its default. Under a runner that
    # started this test in the background without job control (CI does), SIGINT is inherited as
    # ignored, Python then leaves it ignored, and the demo would rightly run to its end: restore
    # the default in the child, as a terminal session would have it.
    demo = subprocess.Popen(
        [*cli, "demo", "--home", str(home), "--files", "400", "--size", "200"],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    _wait_for(home / "stack.json", demo)
    children = _children_alive(home)
    # mid-run: the instrument is filing, workers are packaging (the whole run takes about
    # 6 s after the stack is up on 2 cores since the batched deletion; it took 10 s or more)
    time.sleep(1)
    demo.send_signal(signal.SIGINT)
    out, _ = demo.communicate(timeout=90)
    assert demo.returncode == 130, f"the demo did not stop on SIGINT 1 s into the run:\n{out}"
    assert "stopping every process" in out
    import os

    for pid in children:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"process {pid} still runs after Ctrl-C")
    # the second run resumes on the same folder (database and archives kept) and finishes
    again = subprocess.run(
        [*cli, "demo", "--home", str(home), "--files", "20", "--size", "5", "--timeout", "240"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
