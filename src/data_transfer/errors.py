"""Exceptions of the transfer system.

Every exception says whether retrying can help (``retryable``). Tasks record
``"<ExceptionClass>: <message>"`` as the failure reason, so the class name is part of what an
operator reads: keep the names specific.
"""

from __future__ import annotations


class TransferSystemError(Exception):
    """Base of every error the transfer system raises on purpose."""

    retryable: bool = True

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable


class ConfigurationError(TransferSystemError):
    """A setting, location or route is missing or wrong; retrying will not help."""

    retryable = False


class StorageError(TransferSystemError):
    """Reading, writing, listing or deleting at a location failed (disk, S3, remote host)."""


class DestinationBlockedError(StorageError):
    """Something at the destination is in the way of a file being written (a folder, a
    symbolic link or a file where a folder must go). The package is not at fault, so it is not
    fetched again; retrying cannot help until a person clears the path the message names."""

    retryable = False


class NetworkError(StorageError):
    """The remote end could not be reached or the connection broke."""


class DestinationExistsError(StorageError):
    """The destination already holds different content under the same name."""

    retryable = False


class ChecksumMismatchError(TransferSystemError):
    """Bytes read back do not match the recorded checksum.

    ``path`` names the file or object; ``expected``/``actual`` are hex digests. Retryable: the
    copy is marked bad and the data is fetched again from a good copy.
    """

    def __init__(self, path: str, expected: str, actual: str, algorithm: str = "sha256") -> None:
        super().__init__(f"{path}: {algorithm} is {actual}, expected {expected}")
        self.path = path
        self.expected = expected
        self.actual = actual
        self.algorithm = algorithm


class PackageError(TransferSystemError):
    """Building or reading a package (tar + manifest) failed."""


class UnpackError(PackageError):
    """A package could not be unpacked (truncated, corrupt, manifest missing or inconsistent)."""


class CopyBusyError(TransferSystemError):
    """The copy this task would write is being deleted right now: wait for the deletion to
    end and try again, without using up a retry (like a full BUFFER)."""

    counts_as_attempt = False

    def __init__(self, message: str, *, retry_after_s: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BBCPError(NetworkError):
    """bbcp exited non-zero or reported an error."""


class DeletionRefusedError(TransferSystemError):
    """The deletion rules forbid deleting this copy (never retried: the rules said no)."""

    retryable = False


class PermanentFailureError(TransferSystemError):
    """Raised to stop retrying: the operation has used its retries or cannot succeed."""

    retryable = False


class StalledTaskError(TransferSystemError):
    """A task stopped sending heartbeats, or never started: the sweeper reset it."""


class NotStartedError(StalledTaskError):
    """A task was scheduled but no worker started it in time (a long queue, a lost message, no
    worker for its queue): it is submitted again without counting an attempt, since it never
    ran; the reason says how long it waited."""

    counts_as_attempt = False
    retry_after_s = 0.0
