"""Streaming checksums: one factory for every algorithm the data center accepts.

All hashers share hashlib's interface (``update``, ``hexdigest``). Adler-32 (zlib) is wrapped
to match. Hash while the bytes stream; never read a file twice just to hash it.
"""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path
from typing import BinaryIO, Protocol

from ccat_ops_db.enums import ChecksumAlgorithm

from .errors import ConfigurationError
from .pagecache import DropBehindReader

#: Read/write block size for streamed copies and hashing (1 MiB: large enough for throughput,
#: small enough to keep memory flat with many parallel copies).
CHUNK = 1 << 20

#: Every algorithm the data center accepts: the values of the ops-db enum.
ALGORITHMS = tuple(a.value for a in ChecksumAlgorithm)


class Hasher(Protocol):
    """The part of hashlib's interface the transfer code uses."""

    def update(self, data: bytes | memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...


class _Adler32:
    def __init__(self) -> None:
        self._value = 1

    def update(self, data: bytes | memoryview, /) -> None:
        self._value = zlib.adler32(data, self._value)

    def hexdigest(self) -> str:
        return f"{self._value & 0xFFFFFFFF:08x}"


def new_hasher(algorithm: str = "sha256") -> Hasher:
    """A fresh hasher for ``algorithm`` (one of :data:`ALGORITHMS`)."""
    algo = str(algorithm).lower()
    if algo == "sha256":
        return hashlib.sha256()
    if algo == "blake2b":
        return hashlib.blake2b()
    if algo == "md5":
        return hashlib.md5(usedforsecurity=False)
    if algo == "adler32":
        return _Adler32()
    if algo == "xxh3_128":
        try:
            import xxhash
        except ImportError as exc:  # pragma: no cover - a dependency of the transfer extra
            raise ConfigurationError(
                "checksum algorithm xxh3_128 needs the xxhash package: "
                "pip install 'ccat-data-center[transfer]' (or pip install xxhash)"
            ) from exc
        return xxhash.xxh3_128()
    raise ConfigurationError(
        f"unknown checksum algorithm {algorithm!r} (known: {', '.join(ALGORITHMS)})"
    )


def hash_bytes(data: bytes | memoryview, algorithm: str = "sha256") -> str:
    """Hex digest of bytes already in memory."""
    h = new_hasher(algorithm)
    h.update(data)
    return h.hexdigest()


def hash_stream(stream: BinaryIO, algorithm: str = "sha256") -> tuple[str, int]:
    """Hash a stream to its end; return ``(hexdigest, bytes_read)``."""
    h = new_hasher(algorithm)
    n = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while True:
        got = stream.readinto(view)  # type: ignore[attr-defined]
        if not got:
            break
        h.update(view[:got])
        n += got
    return h.hexdigest(), n


def hash_file(path: str | Path, algorithm: str = "sha256") -> tuple[str, int]:
    """Hash a file; return ``(hexdigest, size)``. What it reads leaves the page cache."""
    with open(path, "rb", buffering=0) as f:
        reader = DropBehindReader(f)
        try:
            return hash_stream(reader, algorithm)  # type: ignore[arg-type]
        finally:
            reader.done()
