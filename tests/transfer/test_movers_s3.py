"""The S3 mover against moto's standalone S3 server on 127.0.0.1 (``s3_server``)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from data_transfer.errors import (
    ChecksumMismatchError,
    ConfigurationError,
    DestinationExistsError,
    NetworkError,
    StorageError,
)
from data_transfer.locations import LocationRef
from data_transfer.movers import S3Mover
from data_transfer.movers.s3 import CHECKSUM_KEY, MiB
from tests.transfer.servers import S3Server, free_port

PART = 5 * MiB  # S3's (and moto's) smallest part


def disk(root: Path, name: str = "buffer") -> LocationRef:
    root.mkdir(parents=True, exist_ok=True)
    return LocationRef(
        id=1,
        site="cologne",
        name=name,
        location_type="buffer",
        storage_type="disk",
        root_path=str(root),
    )


def put(root: Path, rel: str, data: bytes) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def multipart_uploads(client: Any, bucket: str) -> list[Any]:
    return client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def test_multipart_upload_metadata_and_download(
    s3_location: LocationRef, s3_client: Any, tmp_path: Path
) -> None:
    data = os.urandom(2 * PART + 123_456)  # three parts
    put(tmp_path / "buf", "pkg/raw.tar", data)
    src = disk(tmp_path / "buf")
    digest = hashlib.sha256(data).hexdigest()
    mover = S3Mover({"part_size": PART})
    seen: list[int] = []
    result = mover.copy(
        src,
        "pkg/raw.tar",
        s3_location,
        "archive/raw.tar",
        expected_checksum=digest,
        metadata={"Obs-Unit": "42", "instrument": "chai"},
        progress=seen.append,
    )
    assert result.checksum == digest and result.bytes == len(data)
    assert result.extra["parts"] == 3
    assert seen[-1] == len(data)

    head = s3_client.head_object(Bucket=s3_location.bucket, Key="archive/raw.tar")
    assert head["ContentLength"] == len(data)
    assert head["Metadata"][CHECKSUM_KEY] == f"sha256:{digest}"
    assert head["Metadata"]["obs-unit"] == "42" and head["Metadata"]["instrument"] == "chai"
    assert head["ETag"].strip('"').endswith("-3")  # really multipart
    assert mover.stored_checksum(s3_location, "archive/raw.tar") == f"sha256:{digest}"
    assert mover.size(s3_location, "archive/raw.tar") == len(data)
    assert mover.checksum(s3_location, "archive/raw.tar") == digest
    assert multipart_uploads(s3_client, str(s3_location.bucket)) == []

    dst = disk(tmp_path / "staging", "processing")
    down = mover.copy(s3_location, "archive/raw.tar", dst, "raw.tar")
    assert (tmp_path / "staging/raw.tar").read_bytes() == data
    assert down.checksum == digest
    assert down.extra["verified_against"] == "object metadata"
    assert [p.name for p in (tmp_path / "staging").iterdir()] == ["raw.tar"]


def test_multipart_without_expected_stores_computed_checksum(
    s3_server: S3Server, s3_client: Any, tmp_path: Path
) -> None:
    loc = s3_server.location(key_prefix="lta/")
    data = os.urandom(PART + 1000)
    put(tmp_path / "buf", "f.tar", data)
    digest = hashlib.sha256(data).hexdigest()
    mover = S3Mover({"part_size": PART})
    result = mover.copy(disk(tmp_path / "buf"), "f.tar", loc, "f.tar", metadata={"k": "v"})
    assert result.checksum == digest and result.extra["parts"] == 2
    head = s3_client.head_object(Bucket=loc.bucket, Key="lta/f.tar")
    assert head["Metadata"] == {CHECKSUM_KEY: f"sha256:{digest}", "k": "v"}
    # the same through the multipart server-side copy used above 5 GiB
    big = S3Mover({"part_size": PART, "copy_object_limit": 1})
    big.copy(disk(tmp_path / "buf"), "f.tar", loc, "g.tar")
    head = s3_client.head_object(Bucket=loc.bucket, Key="lta/g.tar")
    assert head["Metadata"][CHECKSUM_KEY] == f"sha256:{digest}"
    assert big.checksum(loc, "g.tar") == digest


def test_small_upload_single_put(s3_location: LocationRef, s3_client: Any, tmp_path: Path) -> None:
    data = b"small file" * 100
    put(tmp_path / "buf", "s.txt", data)
    result = S3Mover().copy(disk(tmp_path / "buf"), "s.txt", s3_location, "s.txt", algorithm="md5")
    assert result.extra["parts"] == 1
    assert result.checksum == hashlib.md5(data).hexdigest()
    head = s3_client.head_object(Bucket=s3_location.bucket, Key="s.txt")
    assert head["Metadata"][CHECKSUM_KEY] == f"md5:{hashlib.md5(data).hexdigest()}"


@pytest.mark.parametrize("size", [1000, 2 * PART + 7])
def test_upload_mismatch_leaves_nothing(
    s3_location: LocationRef, s3_client: Any, tmp_path: Path, size: int
) -> None:
    data = os.urandom(size)
    put(tmp_path / "buf", "f", data)
    with pytest.raises(ChecksumMismatchError) as info:
        S3Mover({"part_size": PART}).copy(
            disk(tmp_path / "buf"), "f", s3_location, "f", expected_checksum="ab" * 32
        )
    assert info.value.actual == hashlib.sha256(data).hexdigest()
    assert S3Mover().size(s3_location, "f") is None
    assert multipart_uploads(s3_client, str(s3_location.bucket)) == []  # aborted


def test_existing_object_identical_or_conflicting(
    s3_location: LocationRef, s3_client: Any, tmp_path: Path
) -> None:
    data = os.urandom(10_000)
    put(tmp_path / "buf", "f", data)
    src = disk(tmp_path / "buf")
    mover = S3Mover()
    first = mover.copy(src, "f", s3_location, "f")
    again = mover.copy(src, "f", s3_location, "f")
    assert again.extra.get("skipped") is True and again.checksum == first.checksum
    assert mover.copy(src, "f", s3_location, "f", expected_checksum=first.checksum).extra.get(
        "skipped"
    )
    other = os.urandom(10_000)
    put(tmp_path / "buf", "g", other)
    with pytest.raises(DestinationExistsError):
        mover.copy(src, "g", s3_location, "f")
    S3Mover({"overwrite": True}).copy(src, "g", s3_location, "f")
    body = s3_client.get_object(Bucket=s3_location.bucket, Key="f")["Body"].read()
    assert body == other


def test_corruption_detected_by_checksum(
    s3_location: LocationRef, s3_client: Any, tmp_path: Path
) -> None:
    """Overwrite the object behind the archive's back: checksum() and download notice."""
    data = os.urandom(PART + 10)
    put(tmp_path / "buf", "f.tar", data)
    mover = S3Mover({"part_size": PART})
    digest = mover.copy(disk(tmp_path / "buf"), "f.tar", s3_location, "f.tar").checksum
    head = s3_client.head_object(Bucket=s3_location.bucket, Key="f.tar")
    corrupt = bytearray(data)
    corrupt[12345] ^= 0x01
    s3_client.put_object(
        Bucket=s3_location.bucket, Key="f.tar", Body=bytes(corrupt), Metadata=head["Metadata"]
    )
    assert mover.stored_checksum(s3_location, "f.tar") == f"sha256:{digest}"  # metadata lies
    assert mover.checksum(s3_location, "f.tar") == hashlib.sha256(corrupt).hexdigest() != digest

    dst = disk(tmp_path / "out")
    with pytest.raises(ChecksumMismatchError) as info:
        mover.copy(s3_location, "f.tar", dst, "f.tar")  # verified against the metadata
    assert info.value.expected == digest
    with pytest.raises(ChecksumMismatchError):
        mover.copy(s3_location, "f.tar", dst, "f.tar", expected_checksum=digest)
    assert list((tmp_path / "out").iterdir()) == []


def test_delete_size_and_404(s3_location: LocationRef, tmp_path: Path) -> None:
    put(tmp_path / "buf", "f", b"x" * 10)
    mover = S3Mover()
    assert mover.size(s3_location, "nothing/here") is None
    assert mover.stored_checksum(s3_location, "nothing/here") is None
    mover.copy(disk(tmp_path / "buf"), "f", s3_location, "d/f")
    assert mover.size(s3_location, "d/f") == 10
    assert mover.delete(s3_location, "d/f") is True
    assert mover.delete(s3_location, "d/f") is False
    assert mover.size(s3_location, "d/f") is None
    assert mover.free_space(s3_location) is None
    with pytest.raises(StorageError) as info:
        mover.copy(s3_location, "d/f", disk(tmp_path / "out"), "f")
    assert not info.value.retryable
    with pytest.raises(StorageError):
        mover.checksum(s3_location, "d/f")


def test_errors_name_the_bucket(s3_server: S3Server, tmp_path: Path) -> None:
    put(tmp_path / "buf", "f", b"x")
    src = disk(tmp_path / "buf")
    missing = s3_server.location(bucket="no-such-bucket-here")
    with pytest.raises(StorageError, match="no-such-bucket-here") as info:
        S3Mover().copy(src, "f", missing, "f")
    assert not info.value.retryable
    assert "NoSuchBucket" in str(info.value)

    down = LocationRef(
        id=9,
        site="cologne",
        name="lta",
        location_type="long_term_archive",
        storage_type="s3",
        bucket="archive",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        region="us-east-1",
        credentials=("a", "b"),
    )
    mover = S3Mover({"max_attempts": 1, "connect_timeout": 2})
    with pytest.raises(NetworkError) as info:
        mover.size(down, "f")
    assert info.value.retryable and "archive" in str(info.value)


def test_configuration_errors(s3_location: LocationRef, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="minimum"):
        S3Mover({"part_size": 1024})
    with pytest.raises(ConfigurationError, match="S3 -> S3"):
        S3Mover().copy(s3_location, "a", s3_location, "b")
    remote = LocationRef(
        id=3,
        site="ccat",
        name="buffer",
        location_type="buffer",
        storage_type="disk",
        root_path="/data",
        host="ccat-buffer",
    )
    with pytest.raises(ConfigurationError):
        S3Mover().copy(remote, "a", s3_location, "a")
    with pytest.raises(ConfigurationError):
        S3Mover().copy(disk(tmp_path / "a"), "x", disk(tmp_path / "b"), "x")
    with pytest.raises(ConfigurationError):
        S3Mover().copy(disk(tmp_path / "a"), "../x", s3_location, "x")


@pytest.mark.parametrize(("setting", "sent"), [(None, True), ("when_required", False)])
def test_request_checksums_follow_the_worker_environment(
    setting: str | None,
    sent: bool,
    s3_location: LocationRef,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """botocore adds a checksum of every PutObject / UploadPart body, which the server checks
    on receipt: bytes damaged on the way are refused there. Some S3-compatible stores refuse
    those headers instead; ``AWS_REQUEST_CHECKSUM_CALCULATION=when_required`` in the worker's
    environment turns them off (the mover's client configuration leaves the choice to the
    environment), and the whole-object checksum is still compared before the upload completes
    and recorded in the object's metadata."""
    if setting is None:
        monkeypatch.delenv("AWS_REQUEST_CHECKSUM_CALCULATION", raising=False)
    else:
        monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", setting)
    mover = S3Mover({"part_size": PART})
    client = mover.client(s3_location)
    seen: dict[str, list[str]] = {}

    def record(request: Any, event_name: str, **_: Any) -> None:
        names = [h.lower() for h in request.headers]
        seen.setdefault(event_name.rsplit(".", 1)[1], []).extend(
            n
            for n in names
            if ("checksum" in n and not n.startswith("x-amz-meta-")) or n == "x-amz-trailer"
        )

    for op in ("PutObject", "UploadPart"):
        client.meta.events.register(f"before-send.s3.{op}", record)
    small, big = os.urandom(1000), os.urandom(PART + 10)  # one put, two parts
    put(tmp_path / "buf", "small.bin", small)
    put(tmp_path / "buf", "big.bin", big)
    for rel, data in (("small.bin", small), ("big.bin", big)):
        digest = hashlib.sha256(data).hexdigest()
        result = mover.copy(disk(tmp_path / "buf"), rel, s3_location, rel, expected_checksum=digest)
        assert result.checksum == digest
    assert set(seen) == {"PutObject", "UploadPart"}, seen
    for op, headers in seen.items():
        assert bool(headers) is sent, (op, headers)
