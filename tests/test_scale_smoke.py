"""The scale generator and benchmark still run: bench/scale_gen.py and bench/scale_bench.py at
20,000 files (instead of 10 million), as subprocesses, against their own embedded PostgreSQL.

Only that both complete, that the generator made every stage of the history it promises (its
foreign keys checked) and that the benchmark prints its table are checked here; its figures
are measurements, never assertions (see bench/README.md and docs/scale.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.postgres


def run(args: list[str]) -> str:
    env = {**os.environ, "COLUMNS": "200"}
    env = {k: v for k, v in env.items() if not k.startswith(("CCAT_OPS_DB_", "CCAT_TRANSFER_"))}
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=120, env=env, cwd=REPO
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def test_scale_generator_and_benchmark_run_at_a_tiny_size(tmp_path: Path) -> None:
    pgdata = tmp_path / "pg"
    out = run(["bench/scale_gen.py", "--pgdata", str(pgdata), "--files", "20000", "--check"])
    assert "generated in" in out, out[-4000:]
    meta = json.loads(pgdata.with_suffix(".json").read_text())
    assert meta["rows"]["raw_data_file"] == 20_000
    assert meta["rows"]["raw_data_package"] == 200
    assert meta["db_bytes"] > 0
    # every stage of the history: done, in flight in each stage, failures
    for stage in (
        "done",
        "unpackaged",
        "pkg_pending",
        "pkg_failed",
        "pkg_waiting",
        "dtp_pending",
        "t_pending",
        "t_failed",
        "unpack_pending",
        "lta_todo",
        "second_leg",
        "retained",
        "deletable",
        "deleting",
    ):
        assert meta["stages"].get(stage, 0) > 0, (stage, meta["stages"])
    for kind in ("deleted", "present", "staged", "deletion_failed", "deletion_scheduled"):
        assert any(k.endswith(f":{kind}") for k in meta["details"]), kind

    table = tmp_path / "table.md"
    out = run(
        [
            "bench/scale_bench.py",
            "--pgdata",
            str(pgdata),
            "--runs",
            "1",
            "--requests",
            "50",
            "--markdown",
            str(table),
        ]
    )
    for expected in (
        "raw_data_packages: later pass",
        "deletion: first pass (tail work)",
        "deletion: later pass",
        "fixity: later pass",
        "notify: later pass",
        "GET /raw_data_files/{id}",
        "GET /pipeline/summary",
        "HTTP GET /api/v1/raw_data_files/{id}",
        "targets: ",
        "generator: ",
    ):
        assert expected in out, f"{expected!r} missing from the output:\n{out[-4000:]}"
    md = table.read_text()
    assert "| query |" in md
    from data_transfer.managers import MANAGERS

    assert md.count("later pass") == 2 * len(MANAGERS)  # one per manager, in both tables
