"""Packages (tar + checksum manifest): build, extract, verify, nested transfer packages.

No database: plain files in a temporary folder. Corrupt and malicious tars are made by hand
with ``tarfile`` or by flipping bytes of a built one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import tarfile
import tempfile
import tracemalloc
import zlib
from datetime import UTC, datetime
from pathlib import Path

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_transfer.checksums import ALGORITHMS, CHUNK, hash_file
from data_transfer.errors import (
    ChecksumMismatchError,
    DestinationBlockedError,
    PackageError,
    UnpackError,
)
from data_transfer.packaging import (
    FORMAT,
    MANIFEST_NAME,
    HashingReader,
    HashingWriter,
    Manifest,
    ManifestEntry,
    Member,
    build_package,
    extract_package,
    read_manifest,
    rebuild_package,
    verify_package,
)

CREATED = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


# --------------------------------------------------------------------------------------------
# helpers


def make_file(path: Path, size: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def filed(path: Path, arcname: str, algorithm: str = "sha256", *, known: bool = True) -> Member:
    """A Member as filing would describe it (checksum from the instrument when ``known``)."""
    checksum = hash_file(path, algorithm)[0] if known else None
    return Member(path, arcname, path.stat().st_size, checksum, algorithm)


def mixed_tree(root: Path) -> list[Member]:
    """0 B, 1 B, > CHUNK and several MB, over the four algorithms, some in subdirectories."""
    spec = [
        ("empty.dat", 0, "sha256"),
        ("one.bin", 1, "md5"),
        ("obs/chunk_plus.fits", CHUNK + 17, "adler32"),
        ("obs/deep/several_mb.fits", 5 * CHUNK + 3, "blake2b"),
        ("obs/small.txt", 4000, "sha256"),
    ]
    return [
        filed(make_file(root / "src" / arc, size, seed=i), arc, algo)
        for i, (arc, size, algo) in enumerate(spec)
    ]


def leftovers(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*")) if directory.exists() else []


def tar_names(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def data_offset(path: Path, member: str) -> int:
    with tarfile.open(path) as tar:
        return tar.getmember(member).offset_data


def hand_tar(path: Path, entries: list[tuple[tarfile.TarInfo, bytes | None]], **kw) -> Path:
    with tarfile.open(path, "w", format=kw.pop("format", tarfile.PAX_FORMAT), **kw) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def reg(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def manifest_member(files: dict[str, bytes], name: str = "hand") -> tuple[tarfile.TarInfo, bytes]:
    manifest = Manifest(
        name=name,
        files=tuple(
            ManifestEntry(p, len(d), hashlib.sha256(d).hexdigest(), "sha256")
            for p, d in files.items()
        ),
        created_at=CREATED.isoformat(),
    )
    return reg(MANIFEST_NAME, manifest.to_bytes())


# --------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("known", [True, False], ids=["manifest-first", "manifest-last"])
def test_round_trip_mixed_sizes_and_algorithms(tmp_path: Path, known: bool) -> None:
    members = mixed_tree(tmp_path)
    if not known:  # one file arrives without a checksum: computed while streaming
        members[2] = filed(members[2].source, members[2].arcname, "adler32", known=False)
    progress: list[int] = []
    result = build_package(
        tmp_path / "pkg.tar",
        "obs-1_primecam-1",
        members,
        metadata={"obs_unit": 1},
        progress=progress.append,
    )

    tar_bytes = (tmp_path / "pkg.tar").read_bytes()
    assert result.path == tmp_path / "pkg.tar"
    assert result.size == len(tar_bytes)
    assert result.checksum == hashlib.sha256(tar_bytes).hexdigest()
    assert result.algorithm == "sha256"
    assert result.file_count == len(members)
    assert result.manifest_first is known
    assert progress[-1] == result.size
    for entry, m in zip(result.files, members, strict=True):
        assert (entry.path, entry.size, entry.algorithm) == (m.arcname, m.size, m.algorithm)
        assert entry.checksum == hash_file(m.source, m.algorithm)[0]
    names = tar_names(tmp_path / "pkg.tar")
    assert names[0 if known else -1] == MANIFEST_NAME
    assert [n for n in names if n != MANIFEST_NAME] == [m.arcname for m in members]
    assert not [p for p in tmp_path.iterdir() if ".part-" in p.name]

    manifest = read_manifest(tmp_path / "pkg.tar")
    assert manifest.format == FORMAT
    assert manifest.name == "obs-1_primecam-1"
    assert manifest.metadata == {"obs_unit": 1}
    assert list(manifest.files) == result.files

    out = tmp_path / "out"
    extracted = extract_package(tmp_path / "pkg.tar", out, expected_checksum=result.checksum)
    assert extracted.checksum == result.checksum
    assert extracted.size == result.size
    assert extracted.manifest_first is known
    assert extracted.dest_dir == out
    for m, got in zip(members, extracted.members, strict=True):
        assert got.path == m.arcname
        assert got.final_path == out / m.arcname
        assert (out / m.arcname).read_bytes() == m.source.read_bytes()
        assert got.checksum == hash_file(out / m.arcname, m.algorithm)[0]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(
        m.arcname for m in members
    )

    verified = verify_package(tmp_path / "pkg.tar", expected_checksum=result.checksum)
    assert [(v.path, v.checksum) for v in verified.members] == [
        (e.path, e.checksum) for e in result.files
    ]


def test_tar_is_deterministic_and_readable_by_tar_tools(tmp_path: Path) -> None:
    members = mixed_tree(tmp_path)
    a = build_package(tmp_path / "a.tar", "p", members, created_at=CREATED)
    b = build_package(tmp_path / "b.tar", "p", members, created_at=CREATED)
    assert a.checksum == b.checksum
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as tar:
        for info in tar.getmembers():
            assert (info.uid, info.gid, info.uname, info.gname, info.mode) == (0, 0, "", "", 0o644)
        by_name = {i.name: i for i in tar.getmembers()}
        src = members[3].source
        assert by_name[members[3].arcname].mtime == int(src.stat().st_mtime)
        assert by_name[members[3].arcname].pax_headers["comment"] == "ccat-algorithm=blake2b"
        assert by_name[MANIFEST_NAME].mtime == int(CREATED.timestamp())
        doc = json.loads(tar.extractfile(MANIFEST_NAME).read())  # type: ignore[union-attr]
    assert list(doc) == ["format", "name", "created_at", "algorithm", "files", "metadata"]
    assert doc["created_at"] == "2025-06-01T12:00:00+00:00"


@pytest.mark.skipif(shutil.which("tar") is None, reason="no tar command on this machine")
def test_gnu_tar_reads_packages_silently(tmp_path: Path) -> None:
    """Operators can list and unpack a package with plain tar: no warnings, same bytes."""
    members = [filed(m.source, m.arcname, m.algorithm, known=False) for m in mixed_tree(tmp_path)]
    build_package(tmp_path / "p.tar", "p", members)
    (tmp_path / "x").mkdir()
    done = subprocess.run(
        ["tar", "-xf", str(tmp_path / "p.tar"), "-C", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stderr == ""
    for m in members:
        assert (tmp_path / "x" / m.arcname).read_bytes() == m.source.read_bytes()
    assert Manifest.from_bytes((tmp_path / "x" / MANIFEST_NAME).read_bytes()).name == "p"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_package_checksum_algorithm(tmp_path: Path, algorithm: str) -> None:
    result = build_package(tmp_path / "p.tar", "p", mixed_tree(tmp_path), algorithm=algorithm)
    data = (tmp_path / "p.tar").read_bytes()
    expected = {
        "sha256": lambda: hashlib.sha256(data).hexdigest(),
        "blake2b": lambda: hashlib.blake2b(data).hexdigest(),
        "md5": lambda: hashlib.md5(data).hexdigest(),
        "adler32": lambda: f"{zlib.adler32(data) & 0xFFFFFFFF:08x}",
        # the reference value of the xxhash module, which xxh128sum prints as well
        "xxh3_128": lambda: xxhash.xxh3_128(data).hexdigest(),
    }[algorithm]()
    assert result.checksum == expected
    assert read_manifest(tmp_path / "p.tar").algorithm == algorithm
    out = extract_package(
        tmp_path / "p.tar", tmp_path / "o", expected_checksum=expected, algorithm=algorithm
    )
    assert out.checksum == expected


def test_long_and_non_ascii_names(tmp_path: Path) -> None:
    long_name = "/".join(["d" * 60, "e" * 70, "f" * 90 + ".fits"])
    members = [
        filed(make_file(tmp_path / "s1", 10), long_name),
        filed(make_file(tmp_path / "s2", 20, 1), "données/観測_ü.dat", "md5"),
    ]
    result = build_package(tmp_path / "p.tar", "p", members)
    out = extract_package(tmp_path / "p.tar", tmp_path / "o", expected_checksum=result.checksum)
    assert [m.path for m in out.members] == [long_name, "données/観測_ü.dat"]
    assert (tmp_path / "o" / long_name).read_bytes() == (tmp_path / "s1").read_bytes()


def test_empty_package(tmp_path: Path) -> None:
    result = build_package(tmp_path / "p.tar", "empty", [])
    assert result.file_count == 0
    assert extract_package(tmp_path / "p.tar", tmp_path / "o").members == []


def test_uppercase_filed_checksum_is_accepted(tmp_path: Path) -> None:
    src = make_file(tmp_path / "s", 100)
    member = Member(src, "s", 100, hash_file(src, "md5")[0].upper(), "md5")
    result = build_package(tmp_path / "p.tar", "p", [member])
    assert result.files[0].checksum == hash_file(src, "md5")[0]


# --------------------------------------------------------------------------------------------
# build refusals


@pytest.mark.parametrize(
    "bad",
    ["/etc/passwd", "../up", "a/../../up", "a/..", "MANIFEST.json", "a//b", "./a", "a/", ""],
)
def test_build_refuses_bad_names(tmp_path: Path, bad: str) -> None:
    src = make_file(tmp_path / "s", 3)
    with pytest.raises(PackageError) as err:
        build_package(tmp_path / "p.tar", "p", [Member(src, bad, 3, None)])
    assert repr(bad) in str(err.value) or (bad and bad in str(err.value))
    assert not (tmp_path / "p.tar").exists()


@pytest.mark.parametrize(
    ("names", "culprit"),
    [(["a/b", "c", "a/b"], "a/b"), (["x", "x/y"], "x/y")],
    ids=["duplicate", "file-and-directory"],
)
def test_build_refuses_colliding_names(tmp_path: Path, names: list[str], culprit: str) -> None:
    src = make_file(tmp_path / "s", 3)
    with pytest.raises(PackageError, match=culprit):
        build_package(tmp_path / "p.tar", "p", [Member(src, n, 3, None) for n in names])


def test_build_checksum_mismatch_names_source_and_leaves_nothing(tmp_path: Path) -> None:
    members = mixed_tree(tmp_path)
    bad = members[3]
    members[3] = Member(bad.source, bad.arcname, bad.size, "0" * 128, bad.algorithm)
    with pytest.raises(ChecksumMismatchError) as err:
        build_package(tmp_path / "out" / "p.tar", "p", members)
    assert err.value.path == str(bad.source)
    assert err.value.expected == "0" * 128
    assert err.value.actual == hash_file(bad.source, "blake2b")[0]
    assert err.value.algorithm == "blake2b"
    assert leftovers(tmp_path / "out") == []


def test_build_refuses_a_file_whose_size_changed(tmp_path: Path) -> None:
    members = mixed_tree(tmp_path)
    with open(members[1].source, "ab") as f:
        f.write(b"more")
    with pytest.raises(PackageError, match=re.escape(str(members[1].source))):
        build_package(tmp_path / "out" / "p.tar", "p", members)
    assert leftovers(tmp_path / "out") == []


def test_build_refuses_missing_source_and_unknown_algorithm(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="nope"):
        build_package(tmp_path / "p.tar", "p", [Member(tmp_path / "nope", "n", 0, None)])
    src = make_file(tmp_path / "s", 3)
    with pytest.raises(PackageError, match="crc32"):
        build_package(tmp_path / "p.tar", "p", [Member(src, "s", 3, None, "crc32")])
    assert leftovers(tmp_path) == [src]


def test_build_replaces_an_existing_package(tmp_path: Path) -> None:
    (tmp_path / "p.tar").write_bytes(b"old")
    result = build_package(tmp_path / "p.tar", "p", mixed_tree(tmp_path))
    assert hashlib.sha256((tmp_path / "p.tar").read_bytes()).hexdigest() == result.checksum


# --------------------------------------------------------------------------------------------
# rebuilding a rotten copy from its sources


def _built(tmp_path: Path) -> tuple[Path, list[Member], str, bytes]:
    members = mixed_tree(tmp_path)
    dest = tmp_path / "buf" / "p.tar"
    # built at another time than the rebuild: created_at must come from the bad copy
    result = build_package(dest, "p", members, metadata={"obs": 7}, created_at=CREATED)
    return dest, members, result.checksum, dest.read_bytes()


def test_rebuild_restores_a_rotten_package_byte_for_byte(tmp_path: Path) -> None:
    dest, members, checksum, original = _built(tmp_path)
    # the sources' mtimes moved on since (touched by a backup, say): the headers keep theirs
    for m in members:
        os.utime(m.source, (1_900_000_000, 1_900_000_000))
    flip_byte(dest, data_offset(dest, members[3].arcname) + 100)
    assert dest.read_bytes() != original
    result = rebuild_package(
        dest,
        "p",
        [filed(m.source, m.arcname, m.algorithm) for m in members],
        algorithm="sha256",
        expected_checksum=checksum,
        metadata={"obs": 7},
    )
    assert dest.read_bytes() == original
    assert result.path == dest and result.checksum == checksum
    assert leftovers(dest.parent) == [dest]


def test_rebuild_refuses_when_a_source_went_bad_too(tmp_path: Path) -> None:
    dest, members, checksum, _ = _built(tmp_path)
    flip_byte(dest, data_offset(dest, members[2].arcname) + 5)
    rotten = dest.read_bytes()
    flip_byte(members[2].source, 10)  # the file at the SOURCE rotted as well
    with pytest.raises(ChecksumMismatchError) as err:
        rebuild_package(
            dest, "p", members, algorithm="sha256", expected_checksum=checksum, metadata={"obs": 7}
        )
    assert err.value.path == str(members[2].source)
    assert dest.read_bytes() == rotten  # left as it was, for a person to look at
    assert leftovers(dest.parent) == [dest]


def test_rebuild_refuses_different_bytes_and_an_unreadable_manifest(tmp_path: Path) -> None:
    dest, members, checksum, _ = _built(tmp_path)
    flip_byte(dest, data_offset(dest, members[1].arcname))
    rotten = dest.read_bytes()
    # the metadata recorded now differs from the build's: the result is not the recorded tar
    with pytest.raises(ChecksumMismatchError, match="rebuilt from its sources"):
        rebuild_package(
            dest, "p", members, algorithm="sha256", expected_checksum=checksum, metadata={"obs": 8}
        )
    assert dest.read_bytes() == rotten and leftovers(dest.parent) == [dest]
    # a flipped byte in the manifest's header: created_at cannot be read from the bad copy,
    # so without one from the caller nothing is replaced
    flip_byte(dest, 100)
    with pytest.raises(PackageError, match="cannot be rebuilt byte for byte: its manifest"):
        rebuild_package(
            dest, "p", members, algorithm="sha256", expected_checksum=checksum, metadata={"obs": 7}
        )
    assert leftovers(dest.parent) == [dest]


def test_rebuild_from_records_alone_when_the_headers_are_gone(tmp_path: Path) -> None:
    dest, members, checksum, original = _built(tmp_path)
    # the caller knows created_at (the pipeline keeps it on the package record) and the
    # members' mtimes: a rotten header, or a copy lost altogether, is rebuilt all the same
    for damage in (lambda: flip_byte(dest, 100), dest.unlink):
        damage()
        rebuild_package(
            dest,
            "p",
            members,
            algorithm="sha256",
            expected_checksum=checksum,
            metadata={"obs": 7},
            created_at=CREATED,
        )
        assert dest.read_bytes() == original
        assert leftovers(dest.parent) == [dest]


# --------------------------------------------------------------------------------------------
# extraction: corruption, verify-then-commit


@pytest.mark.parametrize("known", [True, False], ids=["manifest-first", "manifest-last"])
def test_flipped_byte_in_member_data_is_detected_and_nothing_is_left(
    tmp_path: Path, known: bool
) -> None:
    members = [filed(m.source, m.arcname, m.algorithm, known=known) for m in mixed_tree(tmp_path)]
    result = build_package(tmp_path / "p.tar", "p", members)
    victim = "obs/deep/several_mb.fits"  # the 4th of 5 members: earlier ones verify fine
    flip_byte(tmp_path / "p.tar", data_offset(tmp_path / "p.tar", victim) + 3 * CHUNK + 5)

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("someone else's")
    with pytest.raises(ChecksumMismatchError) as err:
        extract_package(tmp_path / "p.tar", out)
    assert err.value.path.endswith(f"p.tar:{victim}")
    assert err.value.algorithm == "blake2b"
    assert leftovers(out) == [out / "keep.txt"]

    with pytest.raises(ChecksumMismatchError, match=victim):
        verify_package(tmp_path / "p.tar")
    with pytest.raises(ChecksumMismatchError):  # the package checksum alone sees it too
        verify_package(tmp_path / "p.tar", expected_checksum=result.checksum, nested=False)


def test_wrong_expected_package_checksum_leaves_nothing(tmp_path: Path) -> None:
    result = build_package(tmp_path / "p.tar", "p", mixed_tree(tmp_path))
    wrong = "f" * 64
    with pytest.raises(ChecksumMismatchError) as err:
        extract_package(tmp_path / "p.tar", tmp_path / "out", expected_checksum=wrong)
    assert err.value.path == str(tmp_path / "p.tar")
    assert (err.value.expected, err.value.actual) == (wrong, result.checksum)
    assert leftovers(tmp_path / "out") == []


def test_truncated_package_is_refused(tmp_path: Path) -> None:
    build_package(tmp_path / "p.tar", "p", mixed_tree(tmp_path))
    data = (tmp_path / "p.tar").read_bytes()
    for cut in (len(data) // 2, 700, 100):
        (tmp_path / "t.tar").write_bytes(data[:cut])
        with pytest.raises(UnpackError, match="truncated"):
            extract_package(tmp_path / "t.tar", tmp_path / "out")
        assert leftovers(tmp_path / "out") == []


def test_missing_extra_and_absent_manifest(tmp_path: Path) -> None:
    files = {"a": b"alpha", "b": b"beta"}
    out = tmp_path / "out"
    cases = {
        "missing": ([manifest_member(files), reg("a", files["a"])], "b: in the manifest"),
        "extra": (
            [manifest_member(files), *(reg(n, d) for n, d in files.items()), reg("c", b"x")],
            "c: in the tar but not",
        ),
        "extra-manifest-last": (
            [*(reg(n, d) for n, d in files.items()), reg("c", b"x"), manifest_member(files)],
            "c: in the tar but not",
        ),
        "no-manifest": ([reg(n, d) for n, d in files.items()], f"no {MANIFEST_NAME}"),
        "manifest-in-the-middle": (
            [reg("a", files["a"]), manifest_member(files), reg("b", files["b"])],
            "must be the first or the last",
        ),
        "size-differs": ([manifest_member(files), reg("a", b"alph")], "a: 4 bytes in the tar"),
    }
    for label, (entries, message) in cases.items():
        hand_tar(tmp_path / f"{label}.tar", entries)
        with pytest.raises(UnpackError, match=message):
            extract_package(tmp_path / f"{label}.tar", out)
        assert leftovers(out) == [], label


def test_bad_manifest_is_refused(tmp_path: Path) -> None:
    for label, doc in {
        "json": b"{not json",
        "format": json.dumps({"format": "other/9", "name": "x"}).encode(),
        "path": json.dumps(
            {
                "format": FORMAT,
                "name": "x",
                "created_at": "now",
                "files": [{"path": "../x", "size": 1, "checksum": "00", "algorithm": "md5"}],
            }
        ).encode(),
    }.items():
        hand_tar(tmp_path / f"{label}.tar", [reg(MANIFEST_NAME, doc)])
        with pytest.raises(UnpackError, match=MANIFEST_NAME):
            extract_package(tmp_path / f"{label}.tar", tmp_path / "out")


# --------------------------------------------------------------------------------------------
# path safety


def _link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def _special(name: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    return info, None


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (reg("../evil", b"x"), "'..'"),
        (reg("a/../../evil", b"x"), "'..'"),
        (reg("/tmp/evil-abs", b"x"), "absolute"),
        (_link("link", "../../etc/passwd", tarfile.SYMTYPE), "links are refused"),
        (_link("hard", "/etc/passwd", tarfile.LNKTYPE), "links are refused"),
        (_special("dev", tarfile.CHRTYPE), "device"),
        (_special("fifo", tarfile.FIFOTYPE), "device"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "chardev", "fifo"],
)
@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_unsafe_members_are_refused(
    tmp_path: Path, entry: tuple[tarfile.TarInfo, bytes | None], message: str, fmt: int
) -> None:
    files = {"ok": b"fine"}
    path = hand_tar(
        tmp_path / "evil.tar", [manifest_member(files), reg("ok", files["ok"]), entry], format=fmt
    )
    out = tmp_path / "deep" / "out"
    with pytest.raises(UnpackError, match=message) as err:
        extract_package(path, out)
    assert entry[0].name in str(err.value)
    assert leftovers(out) == []
    assert not (tmp_path / "deep" / "evil").exists()
    assert not (tmp_path / "evil").exists()
    assert not Path("/tmp/evil-abs").exists()
    with pytest.raises(UnpackError, match=message):
        verify_package(path)


def test_symlink_inside_destination_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "obs").symlink_to(outside)
    src = make_file(tmp_path / "s", 10)
    build_package(tmp_path / "p.tar", "p", [filed(src, "obs/file")])
    with pytest.raises(DestinationBlockedError, match="symbolic link"):
        extract_package(tmp_path / "p.tar", out)
    assert leftovers(outside) == []


def test_sparse_members_are_refused(tmp_path: Path) -> None:
    info, data = reg("s", b"x")
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}
    hand_tar(tmp_path / "sparse.tar", [manifest_member({"s": b"x"}), (info, data)])
    with pytest.raises(UnpackError, match="sparse"):
        verify_package(tmp_path / "sparse.tar")


def test_pax_size_beyond_the_ustar_field_is_honoured(tmp_path: Path) -> None:
    """Members over 8 GiB carry their size only in the PAX header (ustar field 0): emulate."""
    payload = b"0123456789" * 100
    info, data = reg("big", payload)
    info.pax_headers = {"size": str(len(payload))}
    path = hand_tar(tmp_path / "p.tar", [manifest_member({"big": payload}), (info, data)])
    raw = bytearray(path.read_bytes())
    header = data_offset(path, "big") - 512
    raw[header + 124 : header + 136] = b"00000000000\0"  # ustar size field says 0
    raw[header + 148 : header + 156] = b" " * 8
    raw[header + 148 : header + 156] = b"%06o\0 " % sum(raw[header : header + 512])
    path.write_bytes(bytes(raw))
    result = extract_package(path, tmp_path / "o")
    assert result.members[0].size == len(payload)
    assert (tmp_path / "o" / "big").read_bytes() == payload


# --------------------------------------------------------------------------------------------
# idempotence


def test_re_extract_is_idempotent_and_replaces_stale_content(tmp_path: Path) -> None:
    members = mixed_tree(tmp_path)
    result = build_package(tmp_path / "p.tar", "p", members)
    out = tmp_path / "out"
    first = extract_package(tmp_path / "p.tar", out, expected_checksum=result.checksum)
    (out / "one.bin").write_bytes(b"stale")  # a wrong copy at a final name is replaced
    second = extract_package(tmp_path / "p.tar", out, expected_checksum=result.checksum)
    assert [m.checksum for m in first.members] == [m.checksum for m in second.members]
    for m in members:
        assert (out / m.arcname).read_bytes() == m.source.read_bytes()
    assert not [p for p in out.rglob("*") if ".part-" in p.name]


def test_failed_extract_then_good_extract(tmp_path: Path) -> None:
    """Nothing is committed before the end: a run that fails at the last check leaves nothing,
    and a later good run succeeds."""
    result = build_package(tmp_path / "p.tar", "p", mixed_tree(tmp_path))
    out = tmp_path / "out"
    with pytest.raises(ChecksumMismatchError):
        extract_package(tmp_path / "p.tar", out, expected_checksum="0" * 64)
    assert leftovers(out) == []
    extract_package(tmp_path / "p.tar", out, expected_checksum=result.checksum)


def _extract_failing_at_rename(
    monkeypatch: pytest.MonkeyPatch, tar: Path, out: Path, good: int, error: str
) -> None:
    """Extract ``tar`` into ``out`` with ``os.replace`` failing (``error``) after ``good``
    renames; check that the extraction raised it and that exactly ``good`` renames happened."""
    real_replace = os.replace
    renamed: list[str] = []

    def replace_then_fail(src: str, dst: str) -> None:
        if len(renamed) == good:
            raise OSError(5, f"{error} (simulated)")
        renamed.append(str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_fail)
    with pytest.raises(OSError, match="simulated"):
        extract_package(tar, out)
    monkeypatch.undo()
    assert len(renamed) == good


def test_failure_while_committing_removes_what_was_renamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_package(tmp_path / "p.tar", "p", mixed_tree(tmp_path))
    out = tmp_path / "out"
    _extract_failing_at_rename(monkeypatch, tmp_path / "p.tar", out, 3, "No space left on device")
    assert leftovers(out) == []


def test_failure_while_committing_keeps_the_files_it_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second extraction over the first fails part way through its renames: the names it
    already replaced keep the new, verified bytes. Before, the rollback unlinked them, so a
    file that was there (maybe a recorded copy) was gone."""
    members = mixed_tree(tmp_path)
    build_package(tmp_path / "p.tar", "p", members)
    out = tmp_path / "out"
    extract_package(tmp_path / "p.tar", out)
    _extract_failing_at_rename(monkeypatch, tmp_path / "p.tar", out, 3, "Input/output error")
    for m in members:
        assert (out / m.arcname).read_bytes() == m.source.read_bytes(), m.arcname
    assert not [p for p in out.rglob("*") if ".part-" in p.name]


# --------------------------------------------------------------------------------------------
# nested: data transfer packages


def _transfer_package(tmp_path: Path) -> tuple[Path, list[list[Member]], list]:
    raw_members = []
    raw_results = []
    for k in range(3):
        members = [
            filed(make_file(tmp_path / f"src{k}" / f"f{i}", size, seed=10 * k + i), f"f{i}", algo)
            for i, (size, algo) in enumerate(
                [(0, "md5"), (CHUNK + 3, "adler32"), (70_000, "sha256")]
            )
        ]
        raw_members.append(members)
        raw_results.append(build_package(tmp_path / "buffer" / f"raw{k}.tar", f"raw{k}", members))
    transfer = [Member(r.path, r.path.name, r.size, r.checksum) for r in raw_results]
    tp = build_package(tmp_path / "tp.tar", "tp", transfer)
    return tp.path, raw_members, [tp, *raw_results]


def test_nested_extract_verifies_inner_files(tmp_path: Path) -> None:
    tp_path, raw_members, (tp, *raws) = _transfer_package(tmp_path)
    out = tmp_path / "dest_buffer"
    result = extract_package(tp_path, out, expected_checksum=tp.checksum, nested=True)
    assert [m.path for m in result.members] == ["raw0.tar", "raw1.tar", "raw2.tar"]
    for got, raw, members in zip(result.members, raws, raw_members, strict=True):
        assert got.checksum == raw.checksum
        assert (out / got.path).read_bytes() == raw.path.read_bytes()
        assert got.inner_manifest is not None and got.inner_manifest.name == raw.path.stem
        assert got.inner is not None
        assert [(i.path, i.checksum, i.algorithm) for i in got.inner] == [
            (m.arcname, m.checksum, m.algorithm) for m in members
        ]
        assert all(i.final_path is None for i in got.inner)
    verified = verify_package(tp_path, expected_checksum=tp.checksum, nested=True)
    assert verified.members[1].inner == result.members[1].inner
    # and a raw package then stages into a processing area
    staged = extract_package(
        out / "raw1.tar", tmp_path / "processing", expected_checksum=raws[1].checksum
    )
    assert [m.checksum for m in staged.members] == [m.checksum for m in raw_members[1]]


def test_nested_extract_detects_flipped_byte_inside_inner_file(tmp_path: Path) -> None:
    tp_path, _, _ = _transfer_package(tmp_path)
    offset = data_offset(tp_path, "raw1.tar") + data_offset(tmp_path / "buffer" / "raw1.tar", "f1")
    flip_byte(tp_path, offset + 1000)
    out = tmp_path / "dest_buffer"
    with pytest.raises(ChecksumMismatchError) as err:
        extract_package(tp_path, out, nested=True)
    assert err.value.path.endswith("tp.tar:raw1.tar:f1")
    assert err.value.algorithm == "adler32"
    assert leftovers(out) == []


def test_nested_catches_an_inner_package_that_was_bad_before_bundling(tmp_path: Path) -> None:
    """The outer checksum was taken over an already corrupt raw package: only the inner
    manifest can tell. nested=False passes; nested=True refuses."""
    members = [filed(make_file(tmp_path / "s" / "f", 3 * CHUNK), "f")]
    raw = build_package(tmp_path / "raw.tar", "raw", members)
    flip_byte(raw.path, data_offset(raw.path, "f") + 7)
    tp = build_package(tmp_path / "tp.tar", "tp", [filed(raw.path, "raw.tar")])
    assert verify_package(tp.path, expected_checksum=tp.checksum).file_count == 1
    with pytest.raises(ChecksumMismatchError, match=re.escape("raw.tar:f")):
        extract_package(tp.path, tmp_path / "out", nested=True)
    assert leftovers(tmp_path / "out") == []


def test_nested_refuses_a_member_that_is_not_a_package(tmp_path: Path) -> None:
    src = make_file(tmp_path / "notatar.bin", 5000)
    tp = build_package(tmp_path / "tp.tar", "tp", [filed(src, "notatar.bin")])
    with pytest.raises(UnpackError, match=re.escape("notatar.bin")):
        extract_package(tp.path, tmp_path / "out", nested=True)
    assert leftovers(tmp_path / "out") == []


def test_nested_inner_manifest_last(tmp_path: Path) -> None:
    members = [
        filed(make_file(tmp_path / "s" / f"f{i}", 1000 * i, i), f"f{i}", a, known=False)
        for i, a in enumerate(ALGORITHMS)
    ]
    raw = build_package(tmp_path / "raw.tar", "raw", members)
    assert not raw.manifest_first
    tp = build_package(tmp_path / "tp.tar", "tp", [filed(raw.path, "raw.tar")])
    result = verify_package(tp.path, nested=True)
    assert [(i.path, i.algorithm) for i in result.members[0].inner or []] == [
        (m.arcname, m.algorithm) for m in members
    ]


# --------------------------------------------------------------------------------------------
# read_manifest, streams, hashing wrappers


def test_read_manifest_first_reads_only_the_start(tmp_path: Path) -> None:
    result = build_package(tmp_path / "p.tar", "p", mixed_tree(tmp_path))
    data = (tmp_path / "p.tar").read_bytes()
    end = data_offset(tmp_path / "p.tar", MANIFEST_NAME) + 4096
    cut = tmp_path / "head.tar"
    cut.write_bytes(data[:end])  # the data after the manifest is gone: still readable
    assert list(read_manifest(cut).files) == result.files


def test_read_manifest_refuses_a_tar_without_one(tmp_path: Path) -> None:
    hand_tar(tmp_path / "p.tar", [reg("a", b"x")])
    with pytest.raises(UnpackError, match=MANIFEST_NAME):
        read_manifest(tmp_path / "p.tar")
    (tmp_path / "junk").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(UnpackError):
        read_manifest(tmp_path / "junk")


class _Unseekable(io.RawIOBase):
    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # short reads, like a socket
        chunk = self._buf.read(min(len(b), 7777))
        b[: len(chunk)] = chunk
        return len(chunk)


def test_extract_and_verify_from_an_unseekable_stream(tmp_path: Path) -> None:
    tp_path, _, (tp, *_) = _transfer_package(tmp_path)
    data = tp_path.read_bytes()
    result = verify_package(_Unseekable(data), expected_checksum=tp.checksum, nested=True)  # type: ignore[arg-type]
    assert result.source == "<stream>"
    progress: list[int] = []
    out = extract_package(
        _Unseekable(data),  # type: ignore[arg-type]
        tmp_path / "o",
        expected_checksum=tp.checksum,
        nested=True,
        progress=progress.append,
    )
    assert progress[-1] == len(data)
    assert (tmp_path / "o" / "raw2.tar").read_bytes() == (
        tmp_path / "buffer" / "raw2.tar"
    ).read_bytes()
    assert out.size == len(data)


def test_hashing_reader_and_writer(tmp_path: Path) -> None:
    data = random.Random(5).randbytes(3 * CHUNK + 11)
    sink = io.BytesIO()
    seen: list[int] = []
    reader = HashingReader(io.BytesIO(data), "md5", sink=sink, progress=seen.append)
    head = reader.read(100)
    buf = bytearray(CHUNK)
    n = reader.readinto(buf)
    rest = reader.read()
    assert head + bytes(buf[:n]) + rest == data
    assert reader.bytes == len(data)
    assert reader.hexdigest() == hashlib.md5(data).hexdigest()
    assert sink.getvalue() == data
    assert reader.read(10) == b""

    out = io.BytesIO()
    writer = HashingWriter(out, "blake2b")
    writer.write(data[:10])
    writer.write(memoryview(data)[10:])
    assert writer.tell() == len(data)
    assert out.getvalue() == data
    assert writer.hexdigest() == hashlib.blake2b(data).hexdigest()


# --------------------------------------------------------------------------------------------
# property: random file sets round-trip


_component = st.text(alphabet="abcXY01_-.é観", min_size=1, max_size=6).filter(
    lambda s: s not in (".", "..")
)
_arcname = st.lists(_component, min_size=1, max_size=3).map("/".join)
_content = st.one_of(
    st.binary(max_size=1500),
    st.builds(
        lambda n, seed: random.Random(seed).randbytes(n),
        st.integers(0, 2 * CHUNK + 9),
        st.integers(0, 99),
    ),
)
_file_set = st.dictionaries(
    _arcname.filter(lambda n: n != MANIFEST_NAME),
    st.tuples(_content, st.sampled_from(ALGORITHMS), st.booleans()),
    max_size=6,
).filter(
    lambda files: not any(f"{a}/".startswith(f"{b}/") and a != b for a in files for b in files)
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=_file_set, package_algorithm=st.sampled_from(ALGORITHMS), nest=st.booleans())
def test_property_build_then_extract_round_trips(
    files: dict[str, tuple[bytes, str, bool]], package_algorithm: str, nest: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        members = []
        for i, (arc, (data, algo, known)) in enumerate(files.items()):
            src = root / "src" / f"{i}"
            src.parent.mkdir(exist_ok=True)
            src.write_bytes(data)
            members.append(filed(src, arc, algo, known=known))
        built = build_package(
            root / "p.tar", "p", members, algorithm=package_algorithm, fsync=False
        )
        package = built.path
        if nest:
            package = build_package(
                root / "tp.tar", "tp", [filed(built.path, "p.tar")], fsync=False
            ).path
        out = extract_package(package, root / "out", nested=nest, fsync=False)
        inner = out.members[0].inner if nest else out.members
        assert inner is not None
        assert [(m.path, m.checksum) for m in inner] == [(e.path, e.checksum) for e in built.files]
        if nest:
            extract_package(
                root / "out" / "p.tar",
                root / "staged",
                algorithm=package_algorithm,
                expected_checksum=built.checksum,
                fsync=False,
            )
        final = root / ("staged" if nest else "out")
        for m in members:
            assert (final / m.arcname).read_bytes() == m.source.read_bytes()
            assert (
                hash_file(final / m.arcname, m.algorithm)[0] == hash_file(m.source, m.algorithm)[0]
            )


# --------------------------------------------------------------------------------------------
# memory stays flat


def test_memory_stays_flat_for_a_200_mb_file(tmp_path: Path) -> None:
    big = tmp_path / "big.dat"
    with open(big, "wb") as f:  # sparse-ish: mostly holes, a few real bytes
        f.truncate(200 * 1024 * 1024)
        for off in range(0, 200 * 1024 * 1024, 37 * 1024 * 1024):
            f.seek(off)
            f.write(os.urandom(4096))
    member = filed(big, "big.dat", known=False)  # computed while streaming
    limit = 20 * 1024 * 1024

    tracemalloc.start()
    try:
        built = build_package(tmp_path / "p.tar", "p", [member], fsync=False)
        _, build_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        tp = build_package(tmp_path / "tp.tar", "tp", [filed(built.path, "p.tar")], fsync=False)
        tracemalloc.reset_peak()
        big.unlink()
        out = extract_package(tp.path, tmp_path / "out", nested=True, fsync=False)
        _, extract_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert build_peak < limit, build_peak
    assert extract_peak < limit, extract_peak
    assert out.members[0].inner is not None
    assert out.members[0].inner[0].checksum == built.files[0].checksum


def test_package_checksum_setting_defaults_to_xxh3_and_names_a_bad_value() -> None:
    from data_transfer.errors import ConfigurationError
    from data_transfer.settings import load_transfer_settings

    assert load_transfer_settings().checksum_algorithm == "xxh3_128"
    assert load_transfer_settings(checksum_algorithm="sha256").checksum_algorithm == "sha256"
    with pytest.raises(ConfigurationError, match="CCAT_TRANSFER_CHECKSUM_ALGORITHM"):
        load_transfer_settings(checksum_algorithm="crc7")
