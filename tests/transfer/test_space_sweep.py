"""The stale-file sweeper: left-overs of killed writers and killed repairs go, live work stays.

Staleness is judged by the later of mtime and ctime (ctime cannot be back-dated), so these
tests age files for real: a short maximum age and a wait.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from data_transfer.checksums import hash_bytes
from data_transfer.locations import LocationRef
from data_transfer.movers import rsync as rsync_mod
from data_transfer.movers.space import REPAIR_DIR, sweep_stale_parts

AGE = 1.0  # maximum age in these tests, s
DAY = 24 * 3600.0


def _let_age() -> None:
    time.sleep(AGE + 0.3)


def test_killed_repair_leaves_nothing_after_a_sweep(tmp_path: Path) -> None:
    root = tmp_path / "buffer"
    scratch = root / REPAIR_DIR
    killed = scratch / "killed"  # a repair killed while it fetched a tar
    killed.mkdir(parents=True)
    part = killed / "pkg.tar.part-0123456789ab"
    part.write_bytes(b"half a tar")
    empty = scratch / "empty"  # killed after its tar was read, before the folder went
    empty.mkdir()
    _let_age()
    live = scratch / "live"  # a repair at work: its tar is fresh
    live.mkdir()
    (live / "pkg.tar.part-abcdef012345").write_bytes(b"being fetched")
    young = scratch / "young"  # just made, nothing in it yet
    young.mkdir()

    removed = sweep_stale_parts(root, AGE)

    assert removed == [part]
    assert not killed.exists() and not empty.exists()
    assert (live / "pkg.tar.part-abcdef012345").read_bytes() == b"being fetched"
    assert young.is_dir()


def test_scratch_root_goes_only_when_old_and_empty(tmp_path: Path) -> None:
    root = tmp_path / "buffer"
    scratch = root / REPAIR_DIR
    scratch.mkdir(parents=True)
    sweep_stale_parts(root, AGE)
    assert scratch.is_dir(), "a fresh .repair folder may be a repair about to start"
    _let_age()
    sweep_stale_parts(root, AGE)
    assert not scratch.exists()
    (root / "pkg.tar").write_bytes(b"a package")  # nothing else is touched
    _let_age()
    sweep_stale_parts(root, AGE)
    assert (root / "pkg.tar").read_bytes() == b"a package"


def test_a_finished_copy_with_its_sources_old_mtime_is_not_stale(tmp_path: Path) -> None:
    """``rsync --times`` stamps the finished ``.part-rsync`` with the source's mtime (days old
    after a backlog on the link); it is still being verified, so it must stay. Stale bbcp
    left-overs are swept like the others."""
    root = tmp_path / "buffer"
    root.mkdir()
    finished = root / "dtp.tar.part-rsync"
    finished.write_bytes(b"complete, being hashed")
    old = time.time() - 3 * DAY
    os.utime(finished, (old, old))
    left_over = root / "dtp2.tar.part-bbcp"
    left_over.write_bytes(b"a killed bbcp")
    _let_age()
    os.utime(finished, (old, old))  # re-stamped just now (ctime fresh), as rsync does at its end

    assert sweep_stale_parts(root, AGE) == [left_over]
    assert finished.read_bytes() == b"complete, being hashed"


def test_rsync_copy_survives_a_sweep_between_its_end_and_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real rsync (local to local): a source package two days old, and another task on the
    destination BUFFER sweeping (default maximum age, one day) while the mover hashes the
    finished temporary file. Before the sweeper looked at ctime, it removed that file and the
    copy failed with "No such file"."""
    src_root, dst_root = tmp_path / "a", tmp_path / "b"
    src_root.mkdir()
    dst_root.mkdir()
    src = LocationRef(1, "ccat", "a", "buffer", "disk", root_path=str(src_root))
    dst = LocationRef(2, "cologne", "b", "buffer", "disk", root_path=str(dst_root))
    data = os.urandom(200_000)
    package = src_root / "dtp.tar"
    package.write_bytes(data)
    old = time.time() - 2 * DAY
    os.utime(package, (old, old))
    swept: list[Path] = []
    real_hash = rsync_mod.hash_file

    def hash_while_another_task_sweeps(path: str, algorithm: str) -> tuple[str, int]:
        swept.extend(sweep_stale_parts(dst_root, DAY))
        return real_hash(path, algorithm)

    monkeypatch.setattr(rsync_mod, "hash_file", hash_while_another_task_sweeps)
    result = rsync_mod.RsyncMover().copy(
        src, "dtp.tar", dst, "dtp.tar", expected_checksum=hash_bytes(data, "sha256")
    )

    assert swept == []
    assert (dst_root / "dtp.tar").read_bytes() == data
    assert result.bytes == len(data)
