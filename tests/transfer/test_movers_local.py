"""The local mover on real files: streamed verified copy, conflicts, delete, free space."""

from __future__ import annotations

import hashlib
import os
import shutil
import zlib
from pathlib import Path

import pytest

from data_transfer.checksums import hash_file
from data_transfer.errors import (
    ChecksumMismatchError,
    ConfigurationError,
    DestinationExistsError,
    StorageError,
)
from data_transfer.locations import LocationRef
from data_transfer.movers import LocalMover, Mover, RsyncMover, S3Mover, get_mover, mover_for


def disk(root: Path, name: str = "buffer", host: str | None = None) -> LocationRef:
    root.mkdir(parents=True, exist_ok=True)
    return LocationRef(
        id=abs(hash((str(root), name))) % 10_000,
        site="ccat",
        name=name,
        location_type="buffer",
        storage_type="disk",
        root_path=str(root),
        host=host,
    )


@pytest.fixture
def ends(tmp_path: Path) -> tuple[LocationRef, LocationRef]:
    return disk(tmp_path / "src", "source"), disk(tmp_path / "dst", "buffer")


def write(loc: LocationRef, rel: str, data: bytes) -> Path:
    p = Path(str(loc.root_path)) / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if ".part-" in p.name)


def test_copy_streams_checksum_equal_to_hashlib(ends: tuple[LocationRef, LocationRef]) -> None:
    src, dst = ends
    data = os.urandom(3 * (1 << 20) + 12345)  # several 1 MiB chunks and a ragged tail
    write(src, "obs/raw.tar", data)
    seen: list[int] = []
    result = LocalMover().copy(
        src,
        "obs/raw.tar",
        dst,
        "a/b/raw.tar",
        progress=seen.append,
        expected_checksum=hashlib.sha256(data).hexdigest(),
    )
    out = Path(str(dst.root_path)) / "a/b/raw.tar"
    assert out.read_bytes() == data
    assert result.checksum == hashlib.sha256(data).hexdigest()
    assert result.bytes == len(data)
    assert result.algorithm == "sha256"
    assert result.rate_bytes_per_s > 0
    assert seen and seen[-1] == len(data)
    assert leftovers(Path(str(dst.root_path))) == []


@pytest.mark.parametrize(
    ("algorithm", "reference"),
    [
        ("md5", lambda b: hashlib.md5(b).hexdigest()),
        ("blake2b", lambda b: hashlib.blake2b(b).hexdigest()),
        ("adler32", lambda b: f"{zlib.adler32(b) & 0xFFFFFFFF:08x}"),
    ],
)
def test_other_algorithms(ends: tuple[LocationRef, LocationRef], algorithm, reference) -> None:
    src, dst = ends
    data = os.urandom(1_500_000)
    write(src, "f", data)
    result = LocalMover().copy(src, "f", dst, "f", algorithm=algorithm)
    assert result.checksum == reference(data)
    assert LocalMover().checksum(dst, "f", algorithm=algorithm) == reference(data)


def test_empty_file(ends: tuple[LocationRef, LocationRef]) -> None:
    src, dst = ends
    write(src, "empty", b"")
    result = LocalMover().copy(src, "empty", dst, "empty")
    assert result.bytes == 0
    assert result.checksum == hashlib.sha256(b"").hexdigest()
    assert (Path(str(dst.root_path)) / "empty").read_bytes() == b""


def test_mismatch_leaves_nothing(ends: tuple[LocationRef, LocationRef]) -> None:
    src, dst = ends
    data = os.urandom(2_000_000)
    write(src, "f.tar", data)
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(ChecksumMismatchError) as info:
        LocalMover().copy(src, "f.tar", dst, "x/f.tar", expected_checksum=wrong)
    assert info.value.expected == wrong
    assert info.value.actual == hashlib.sha256(data).hexdigest()
    assert info.value.retryable
    assert "source/" in str(info.value) or "f.tar" in str(info.value)
    root = Path(str(dst.root_path))
    assert not (root / "x/f.tar").exists()
    assert leftovers(root) == []


def test_expected_checksum_with_algorithm_prefix(ends: tuple[LocationRef, LocationRef]) -> None:
    src, dst = ends
    data = b"abc" * 1000
    write(src, "f", data)
    digest = hashlib.sha256(data).hexdigest()
    assert LocalMover().copy(src, "f", dst, "f", expected_checksum=f"SHA256:{digest.upper()}")
    with pytest.raises(ConfigurationError):
        LocalMover().copy(src, "f", dst, "g", expected_checksum=f"md5:{digest}")


def test_identical_recopy_is_success_without_rewrite(
    ends: tuple[LocationRef, LocationRef],
) -> None:
    src, dst = ends
    data = os.urandom(1_000_000)
    write(src, "f", data)
    mover = LocalMover()
    first = mover.copy(src, "f", dst, "f")
    out = Path(str(dst.root_path)) / "f"
    inode = out.stat().st_ino
    again = mover.copy(src, "f", dst, "f")  # no expected checksum: byte comparison
    assert again.extra.get("skipped") is True
    assert again.checksum == first.checksum
    third = mover.copy(src, "f", dst, "f", expected_checksum=first.checksum)
    assert third.extra.get("skipped") is True
    assert out.stat().st_ino == inode  # never rewritten


def test_different_destination_conflicts(ends: tuple[LocationRef, LocationRef]) -> None:
    src, dst = ends
    data = os.urandom(100_000)
    write(src, "f", data)
    other = bytearray(data)
    other[500] ^= 0xFF
    target = write(dst, "f", bytes(other))  # same size, one byte differs
    with pytest.raises(DestinationExistsError) as info:
        LocalMover().copy(src, "f", dst, "f")
    assert not info.value.retryable
    with pytest.raises(DestinationExistsError):
        LocalMover().copy(src, "f", dst, "f", expected_checksum=hashlib.sha256(data).hexdigest())
    write(dst, "g", b"short")  # different size
    with pytest.raises(DestinationExistsError):
        LocalMover().copy(src, "f", dst, "g")
    assert target.read_bytes() == bytes(other)  # untouched

    result = LocalMover({"overwrite": True}).copy(src, "f", dst, "f")
    assert target.read_bytes() == data
    assert result.checksum == hashlib.sha256(data).hexdigest()
    assert leftovers(Path(str(dst.root_path))) == []


def test_delete_is_idempotent(ends: tuple[LocationRef, LocationRef]) -> None:
    _, dst = ends
    p = write(dst, "d/f", b"x")
    mover = LocalMover()
    assert mover.size(dst, "d/f") == 1
    assert mover.delete(dst, "d/f") is True
    assert not p.exists()
    assert p.parent.is_dir()  # only the file goes
    assert mover.delete(dst, "d/f") is False
    assert mover.size(dst, "d/f") is None
    with pytest.raises(StorageError):
        mover.delete(dst, "d")  # a directory is not a file


def test_free_space_uses_nearest_existing_ancestor(tmp_path: Path) -> None:
    loc = LocationRef(
        id=1,
        site="s",
        name="n",
        location_type="buffer",
        storage_type="disk",
        root_path=str(tmp_path / "not" / "yet" / "there"),
    )
    free = LocalMover().free_space(loc)
    assert free is not None
    assert 0 < free <= shutil.disk_usage(tmp_path).total
    assert abs(free - shutil.disk_usage(tmp_path).free) < 256 << 20  # same filesystem


def test_path_escape_refused(ends: tuple[LocationRef, LocationRef]) -> None:
    src, dst = ends
    write(src, "f", b"data")
    mover = LocalMover()
    for bad in ("../outside", "/etc/passwd", "a/../../b", ""):
        with pytest.raises(ConfigurationError):
            mover.copy(src, "f", dst, bad)
        with pytest.raises(ConfigurationError):
            mover.copy(src, bad, dst, "f")
        with pytest.raises(ConfigurationError):
            mover.delete(dst, bad)
    assert not (Path(str(dst.root_path)).parent / "outside").exists()


def test_missing_source_and_directory_source(ends: tuple[LocationRef, LocationRef]) -> None:
    src, dst = ends
    with pytest.raises(StorageError) as info:
        LocalMover().copy(src, "nope", dst, "nope")
    assert not info.value.retryable
    (Path(str(src.root_path)) / "adir").mkdir()
    with pytest.raises(StorageError, match="directory"):
        LocalMover().copy(src, "adir", dst, "adir")
    with pytest.raises(StorageError):
        LocalMover().checksum(src, "nope")


def test_remote_or_s3_location_refused(ends: tuple[LocationRef, LocationRef]) -> None:
    src, dst = ends
    write(src, "f", b"x")
    remote = LocationRef(
        id=9,
        site="x",
        name="r",
        location_type="buffer",
        storage_type="disk",
        root_path="/data",
        host="buffer.example.org",
    )
    with pytest.raises(ConfigurationError, match="rsync or bbcp"):
        LocalMover().copy(src, "f", remote, "f")
    with pytest.raises(ConfigurationError):
        LocalMover().copy(src, "f", dst, "f", algorithm="crc7")


def test_copy_result_checksum_matches_hash_file(ends: tuple[LocationRef, LocationRef]) -> None:
    src, dst = ends
    data = os.urandom(5 * (1 << 20))
    write(src, "big", data)
    result = LocalMover({"chunk_size": 65536}).copy(src, "big", dst, "big")
    assert result.checksum == hash_file(Path(str(dst.root_path)) / "big")[0]


# -- factory --------------------------------------------------------------------------------------


def test_get_mover_and_mover_for(tmp_path: Path) -> None:
    for method in ("local", "rsync", "s3", "bbcp"):
        m = get_mover(method)
        assert isinstance(m, Mover)
        assert m.name == method
    with pytest.raises(ConfigurationError, match="ftp"):
        get_mover("ftp")
    assert get_mover("local", options={"overwrite": True}).overwrite is True

    a = disk(tmp_path / "a")
    b = disk(tmp_path / "b")
    remote = LocationRef(
        id=3,
        site="cologne",
        name="buffer",
        location_type="buffer",
        storage_type="disk",
        root_path="/data",
        host="cologne-buffer",
        ssh_user="ccat",
    )
    s3 = LocationRef(
        id=4,
        site="cologne",
        name="lta",
        location_type="long_term_archive",
        storage_type="s3",
        bucket="archive",
    )
    assert isinstance(mover_for(a, b, None), LocalMover)
    assert isinstance(mover_for(a, b, "bbcp"), LocalMover)  # both local: no network tool
    assert isinstance(mover_for(a, remote, None), RsyncMover)
    assert isinstance(mover_for(remote, a, "rsync"), RsyncMover)
    assert mover_for(a, remote, "bbcp").name == "bbcp"
    assert isinstance(mover_for(a, s3, None), S3Mover)
    assert isinstance(mover_for(s3, a, "bbcp"), S3Mover)
    tape = LocationRef(
        id=5, site="x", name="t", location_type="long_term_archive", storage_type="tape"
    )
    with pytest.raises(ConfigurationError, match="tape"):
        mover_for(a, tape, None)
