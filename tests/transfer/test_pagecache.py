"""Write-behind and drop-behind: copies keep their bytes and leave the page cache alone.

Page-cache residency is read with ``fincore`` (util-linux, part of every Debian). The kernel
may keep or drop pages as it likes, so each test compares with the same file written or read
without the module (window 0), on the same machine in the same run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from data_transfer import packaging, pagecache
from data_transfer.checksums import hash_file
from data_transfer.errors import ConfigurationError
from data_transfer.movers.local import copy_file_verified

MIB = 1 << 20


def cached_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache, by ``fincore``."""
    fincore = shutil.which("fincore")
    assert fincore, "fincore not found: apt-get install util-linux"
    out = subprocess.run(
        [fincore, "--bytes", "--noheadings", "--output", "RES", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return int(out.split()[0])


def random_file(path: Path, size: int) -> str:
    data = os.urandom(size)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # dirty pages cannot be dropped; sources are long on disk
    return hashlib.sha256(data).hexdigest()


def test_window_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pagecache.ENV_WINDOW, raising=False)
    assert pagecache.window_bytes() == pagecache.DEFAULT_WINDOW_MB * MIB
    monkeypatch.setenv(pagecache.ENV_WINDOW, "0")
    assert pagecache.window_bytes() == 0
    monkeypatch.setenv(pagecache.ENV_WINDOW, "8")
    assert pagecache.window_bytes() == 8 * MIB
    for bad in ("lots", "-1", "1.5"):
        monkeypatch.setenv(pagecache.ENV_WINDOW, bad)
        with pytest.raises(ConfigurationError, match=pagecache.ENV_WINDOW):
            pagecache.window_bytes()


def test_write_behind_keeps_bytes_and_drops_pages(tmp_path: Path) -> None:
    data = os.urandom(48 * MIB + 12345)
    kept, dropped = tmp_path / "kept.bin", tmp_path / "dropped.bin"
    for path, window in ((kept, 0), (dropped, 4 * MIB)):
        with pagecache.WriteBehindFile(open(path, "xb"), window=window) as out:
            view = memoryview(data)
            while view:  # odd-sized writes, as tarfile makes them
                out.write(view[: 3 * MIB + 17])
                view = view[3 * MIB + 17 :]
            out.sync()
    dropped_cached = cached_bytes(dropped)
    assert dropped_cached < cached_bytes(kept) // 2 or dropped_cached == 0
    assert dropped_cached <= 8 * MIB + 4096, "at most two windows may stay cached"
    assert kept.read_bytes() == data and dropped.read_bytes() == data


def test_write_behind_off_without_fsync(tmp_path: Path) -> None:
    # fsync=False (scratch space, tests): no syncing at all, so nothing can be dropped either
    behind = pagecache.WriteBehind(os.open(tmp_path / "x", os.O_WRONLY | os.O_CREAT), window=0)
    behind.wrote(10 * MIB)
    behind.finished()
    os.close(behind.fd)


def test_drop_behind_reader(tmp_path: Path) -> None:
    path = tmp_path / "src.bin"
    digest = random_file(path, 24 * MIB)
    hash_file(path)  # reads through DropBehindReader and drops what it read
    assert cached_bytes(path) <= 4096
    with open(path, "rb", buffering=0) as f:
        reader = pagecache.DropBehindReader(f, window=0)
        assert hashlib.sha256(reader.read()).hexdigest() == digest
        reader.done()
    assert cached_bytes(path) >= 20 * MIB, "window 0 must leave the kernel's caching alone"


def test_verified_copy_and_package_leave_cache_empty(tmp_path: Path) -> None:
    src = tmp_path / "a.fits"
    digest = random_file(src, 40 * MIB)
    got, n = copy_file_verified(
        src, tmp_path / "copy.fits", algorithm="sha256", expected=digest, where="a", dst_label="t"
    )
    assert (got, n) == (digest, 40 * MIB)
    assert cached_bytes(src) <= 4096
    assert cached_bytes(tmp_path / "copy.fits") <= 4096

    member = packaging.Member(src, "raw/a.fits", 40 * MIB, digest, "sha256")
    result = packaging.build_package(tmp_path / "p.tar", "p", [member])
    assert cached_bytes(result.path) <= 4096
    out = tmp_path / "out"
    packaging.extract_package(result.path, out, expected_checksum=result.checksum)
    assert hash_file(out / "raw" / "a.fits")[0] == digest
    assert cached_bytes(out / "raw" / "a.fits") <= 4096
    assert cached_bytes(result.path) <= 4096
