"""The one interface every mover implements: copy, verify, delete, free space.

A copy is verify-then-commit: bytes are hashed while they stream, written under a temporary
name, compared with the expected checksum, and only then renamed (or, for S3, completed and
tagged) into place. A failed comparison leaves nothing at the destination name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ..locations import LocationRef

#: ``progress(bytes_done)`` is called now and then during a long copy (may be None).
Progress = Callable[[int], None]


@dataclass
class CopyResult:
    """What a copy did: bytes written, the checksum of the bytes as they streamed, timing,
    and the mover's own output (command lines and their stdout/stderr) for the log file."""

    bytes: int
    checksum: str
    algorithm: str
    seconds: float
    output: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def rate_bytes_per_s(self) -> float:
        """Average rate of the copy."""
        return self.bytes / self.seconds if self.seconds > 0 else float(self.bytes)


@runtime_checkable
class Mover(Protocol):
    """Moves bytes between two locations and manages them there."""

    name: str

    def copy(
        self,
        src: LocationRef,
        src_path: str,
        dst: LocationRef,
        dst_path: str,
        *,
        algorithm: str = "sha256",
        expected_checksum: str | None = None,
        metadata: dict[str, str] | None = None,
        progress: Progress | None = None,
    ) -> CopyResult:
        """Copy ``src_path`` at ``src`` to ``dst_path`` at ``dst``.

        The checksum is computed while the bytes stream (no second read pass). When
        ``expected_checksum`` is given and differs, raises ``ChecksumMismatchError`` and leaves
        nothing under ``dst_path``. An existing destination with the same size and checksum
        is success; different content raises ``DestinationExistsError`` unless the mover
        overwrites atomically. ``metadata`` is stored with the object where the storage
        supports it (S3 user metadata); the checksum is always stored on S3.
        """
        ...

    def checksum(self, loc: LocationRef, path: str, *, algorithm: str = "sha256") -> str:
        """Read ``path`` at ``loc`` back and return its checksum (fixity check)."""
        ...

    def size(self, loc: LocationRef, path: str) -> int | None:
        """Size in bytes of ``path`` at ``loc``, or None when it does not exist."""
        ...

    def delete(self, loc: LocationRef, path: str) -> bool:
        """Delete ``path`` at ``loc``; True if something was deleted, False if it was absent."""
        ...

    def free_space(self, loc: LocationRef) -> int | None:
        """Free bytes at ``loc`` (None when the storage has no such notion, e.g. S3)."""
        ...
