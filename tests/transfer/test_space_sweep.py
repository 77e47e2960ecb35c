"""The stale-file sweeper: left-overs of killed writers and killed repairs go, live work stays."""

from __future__ import annotations

import os
import time
from pathlib import Path

from data_transfer.movers.space import REPAIR_DIR, sweep_stale_parts

DAY = 24 * 3600.0


def _age(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


def test_killed_repair_leaves_nothing_after_a_sweep(tmp_path: Path) -> None:
    root = tmp_path / "buffer"
    scratch = root / REPAIR_DIR
    killed = scratch / "killed"  # a repair killed while it fetched a tar
    killed.mkdir(parents=True)
    part = killed / "pkg.tar.part-0123456789ab"
    part.write_bytes(b"half a tar")
    _age(part, 2 * DAY)
    _age(killed, 2 * DAY)
    empty = scratch / "empty"  # killed after its tar was read, before the folder went
    empty.mkdir()
    _age(empty, 2 * DAY)
    live = scratch / "live"  # a repair at work: its tar is fresh
    live.mkdir()
    (live / "pkg.tar.part-abcdef012345").write_bytes(b"being fetched")
    young = scratch / "young"  # just made, nothing in it yet
    young.mkdir()
    _age(scratch, 2 * DAY)

    removed = sweep_stale_parts(root, DAY)

    assert removed == [part]
    assert not killed.exists() and not empty.exists()
    assert (live / "pkg.tar.part-abcdef012345").read_bytes() == b"being fetched"
    assert young.is_dir()


def test_scratch_root_goes_only_when_old_and_empty(tmp_path: Path) -> None:
    root = tmp_path / "buffer"
    scratch = root / REPAIR_DIR
    scratch.mkdir(parents=True)
    sweep_stale_parts(root, DAY)
    assert scratch.is_dir(), "a fresh .repair folder may be a repair about to start"
    _age(scratch, 2 * DAY)
    sweep_stale_parts(root, DAY)
    assert not scratch.exists()
    (root / "pkg.tar").write_bytes(b"a package")  # nothing else is touched
    sweep_stale_parts(root, DAY)
    assert (root / "pkg.tar").read_bytes() == b"a package"
