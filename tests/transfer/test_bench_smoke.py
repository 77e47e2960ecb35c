"""The data-plane benchmark still runs: bench/transfer_bench.py at a tiny size, as a subprocess.

Only that it completes (pipeline finished, archive verified, exit 0) and prints its table is
checked here; its figures are measurements, never assertions (see bench/README.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.postgres


def test_transfer_bench_runs_at_a_tiny_size(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "160"}
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "transfer_bench.py"),
            "--size-mb",
            "20",
            "--workdir",
            str(tmp_path),
            "--no-drop-caches",  # leave the machine's page cache alone during the test suite
            "--timeout",
            "240",
        ],
        capture_output=True,
        text=True,
        timeout=280,
        env=env,
        cwd=REPO,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for expected in (
        "cp -r",
        "sha256sum",
        "one pipeline hop alone",
        "x one hop alone",
        "5 x 'cp -r, then sync' = ",
        "package tars xxh3_128 at every hop",
        "pipeline end to end",
        "raw data package",
        "archive (buffer → LTA disk)",
        "full read passes over the data: ",
        "target: pipeline ≥ 25% of cp -r: ",
        "archive verified: ",
    ):
        assert expected in out, f"{expected!r} missing from the output:\n{out[-4000:]}"
    # nothing is left behind in the work folder
    assert list(tmp_path.iterdir()) == []
