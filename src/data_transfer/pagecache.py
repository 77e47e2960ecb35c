"""Streamed copies that leave the page cache as they found it: write-behind and drop-behind.

A mover copies packages of up to 50 GB through hosts whose memory is a small fraction of that.
Left to itself, the kernel keeps every byte written or read in the page cache: a single copy
then pushes everything else on the buffer host out of memory, builds a dirty backlog of many
gigabytes that the final ``fsync`` must wait for in one stall, and makes the next stage's
writes wait in dirty-page throttling. This module does what ``dd oflag=nocache``, rsync's
``--drop-cache`` and the streaming-write recipe of the kernel developers do:

* **write-behind**: every :func:`window_bytes` bytes written, writeback of that window is
  started (``sync_file_range(WRITE)``, or ``fdatasync`` where the C library lacks it), the
  previous window is waited for and dropped from the page cache (``POSIX_FADV_DONTNEED``). At
  most two windows of a file are ever dirty. The final ``fsync`` is still the caller's (it is
  what makes the copy durable); it then has at most two windows left to write.
* **drop-behind**: a file read sequentially drops what it has read, window by window.

Both are performance measures only: durability still comes from the ``fsync`` before the
rename, and a page dropped early is simply read from disk again. The window is the setting
``CCAT_TRANSFER_WRITE_BEHIND_MB`` (default 32; ``0`` turns both off and leaves caching to the
kernel). Measured on the 2-core machines here (``bench/transfer_bench.py``): a verified,
fsynced copy of 1 GiB took 3.6-4.6 s when the page cache grew with every copy (the kernel
reclaiming, the hypervisor backing new memory) and 1.1-1.4 s with write-behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from collections.abc import Callable
from typing import Any, BinaryIO

from .errors import ConfigurationError

ENV_WINDOW = "CCAT_TRANSFER_WRITE_BEHIND_MB"
DEFAULT_WINDOW_MB = 32

_SFR_WAIT_BEFORE, _SFR_WRITE, _SFR_WAIT_AFTER = 1, 2, 4
_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", None)


def window_bytes() -> int:
    """The write-behind window in bytes from ``CCAT_TRANSFER_WRITE_BEHIND_MB`` (0: off)."""
    raw = os.environ.get(ENV_WINDOW, "").strip()
    if not raw:
        return DEFAULT_WINDOW_MB << 20
    try:
        mb = int(raw)
    except ValueError:
        raise ConfigurationError(
            f"{ENV_WINDOW}={raw!r}: must be a whole number of MiB (0 turns write-behind off)"
        ) from None
    if mb < 0:
        raise ConfigurationError(f"{ENV_WINDOW}={raw!r}: must be 0 or more")
    return mb << 20


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range() if _DONTNEED is not None else None


def drop(fd: int, offset: int = 0, length: int = 0) -> None:
    """Ask the kernel to drop a range of ``fd`` from the page cache (0 length: to the end)."""
    if _DONTNEED is None:
        return
    # a pipe, a socket, a file system without page cache: nothing to drop
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, offset, length, _DONTNEED)


class WriteBehind:
    """Write-behind for one file written sequentially from offset 0 through ``fd``.

    Call :meth:`wrote` after each write with the number of bytes written, and
    :meth:`finished` after the caller's final ``fsync``. ``flush`` (if given) is called before
    the kernel is asked to write back, for a buffered file object whose bytes may still sit in
    its buffer. ``window=0`` makes every call a no-op.
    """

    def __init__(
        self, fd: int, *, window: int | None = None, flush: Callable[[], Any] | None = None
    ) -> None:
        self.fd = fd
        self.window = window_bytes() if window is None else window
        self.flush = flush
        self.position = 0
        self._started = 0  # writeback started for [0, _started)
        self._dropped = 0  # dropped from the cache: [0, _dropped)

    def wrote(self, n: int) -> None:
        """Account for ``n`` more bytes written; start/await writeback each full window."""
        self.position += n
        if not self.window or self.position - self._started < self.window:
            return
        if self.flush is not None:
            self.flush()
        start, end = self._started, self.position
        if _sync_file_range is not None:
            self._sfr(start, end - start, _SFR_WRITE)
            if self._dropped < start:  # the previous window: wait for it, then drop it
                self._sfr(
                    self._dropped,
                    start - self._dropped,
                    _SFR_WAIT_BEFORE | _SFR_WRITE | _SFR_WAIT_AFTER,
                )
                drop(self.fd, self._dropped, start - self._dropped)
                self._dropped = start
        else:
            os.fdatasync(self.fd)
            drop(self.fd, self._dropped, end - self._dropped)
            self._dropped = end
        self._started = end

    def finished(self) -> None:
        """After the final fsync: drop whatever of the file is still cached."""
        if self.window:
            drop(self.fd)

    def _sfr(self, offset: int, length: int, flags: int) -> None:
        assert _sync_file_range is not None
        if _sync_file_range(self.fd, offset, length, flags) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"sync_file_range: {os.strerror(err)}")


class WriteBehindFile:
    """A writable file object that applies :class:`WriteBehind` to the file it wraps.

    ``raw`` is a file opened for writing at offset 0 (buffered or not). :meth:`sync` flushes,
    fsyncs and drops the file's pages; :meth:`close` closes ``raw``.
    """

    def __init__(self, raw: BinaryIO, *, window: int | None = None) -> None:
        self.raw = raw
        self.behind = WriteBehind(raw.fileno(), window=window, flush=raw.flush)

    def writable(self) -> bool:
        """Always true."""
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write all of ``data``; return its length."""
        view = memoryview(data).cast("B")
        rest = view
        while rest:
            n = self.raw.write(rest)
            if n is None:
                raise BlockingIOError("the output stream would block")
            rest = rest[n:]
        self.behind.wrote(len(view))
        return len(view)

    def flush(self) -> None:
        """Flush ``raw``."""
        self.raw.flush()

    def fileno(self) -> int:
        """The file descriptor of ``raw``."""
        return self.raw.fileno()

    def sync(self, *, fsync: bool = True) -> None:
        """Flush, fsync (unless ``fsync=False``), and drop the file's pages."""
        self.raw.flush()
        if fsync:
            os.fsync(self.raw.fileno())
            self.behind.finished()

    def close(self) -> None:
        """Close ``raw``."""
        self.raw.close()

    def __enter__(self) -> WriteBehindFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DropBehindReader:
    """A readable file object that drops what it has read from the page cache, per window.

    ``raw`` is a regular file read sequentially from its current offset (``read`` and
    ``readinto`` are passed through). :meth:`done` drops the rest. With ``window=0`` it
    only passes reads through.
    """

    def __init__(self, raw: BinaryIO, *, window: int | None = None) -> None:
        self.raw = raw
        self.window = window_bytes() if window is None else window
        try:
            self.fd: int | None = raw.fileno()
            self.position = raw.tell()
        except (AttributeError, OSError, ValueError):
            self.fd, self.position = None, 0
        self._dropped = self.position
        self.name = getattr(raw, "name", None)

    def readable(self) -> bool:
        """Always true."""
        return True

    def read(self, size: int = -1) -> bytes:
        """Read up to ``size`` bytes."""
        data = self.raw.read(size)
        self._advance(len(data) if data else 0)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:
        """Read into ``buffer``; return the number of bytes read."""
        n = self.raw.readinto(buffer) or 0  # type: ignore[attr-defined]
        self._advance(n)
        return n

    def fileno(self) -> int:
        """The file descriptor of ``raw``."""
        return self.raw.fileno()

    def done(self) -> None:
        """Drop everything read (and the rest of the file) from the page cache."""
        if self.window and self.fd is not None:
            drop(self.fd)

    def _advance(self, n: int) -> None:
        self.position += n
        if self.window and self.fd is not None and self.position - self._dropped >= self.window:
            drop(self.fd, self._dropped, self.position - self._dropped)
            self._dropped = self.position
