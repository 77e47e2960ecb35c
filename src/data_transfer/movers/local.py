"""Copies between directories on the filesystem the worker sees (local disks, NFS, Lustre).

One read of the source and one write of the destination per copy: the checksum is computed on
the bytes as they stream (1 MiB ``readinto`` blocks), the bytes land in
``<destination>.part-<random>`` in the destination directory, the file is fsynced, its checksum
compared with the expected one, and only then renamed into place (``os.replace``) and the
directory fsynced. A mismatch deletes the temporary file: nothing ever appears under the
destination name unless it is complete, verified and durable.

The helpers at the bottom (temporary names, durable rename, streamed copy) are shared with the
rsync and S3 movers, which commit to a local destination the same way.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

from ..checksums import CHUNK, Hasher, hash_file, new_hasher
from ..errors import (
    ChecksumMismatchError,
    ConfigurationError,
    DestinationExistsError,
    StorageError,
)
from ..locations import LocationRef
from ..pagecache import DropBehindReader, WriteBehind
from .base import CopyResult, Progress

#: How often (seconds) a long copy calls its ``progress`` callback.
PROGRESS_INTERVAL = 0.5


class LocalMover:
    """Streamed, verified copies between disk locations reachable as local paths.

    Options: ``overwrite`` (bool, default False) replaces a destination holding different
    content atomically instead of raising :class:`DestinationExistsError`; ``chunk_size``
    (bytes, default 1 MiB).
    """

    name = "local"

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        opts = dict(options or {})
        self.overwrite = bool(opts.get("overwrite", False))
        self.chunk_size = int(opts.get("chunk_size", CHUNK))
        if self.chunk_size <= 0:
            raise ConfigurationError(f"local mover: chunk_size must be > 0, not {self.chunk_size}")

    # -- copy ---------------------------------------------------------------------------------

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
        """Copy one file; see :meth:`data_transfer.movers.base.Mover.copy`.

        ``metadata`` is ignored (a filesystem has no place for it).
        """
        new_hasher(algorithm)  # unknown algorithm: ConfigurationError before any I/O
        expected = normalize_checksum(expected_checksum, algorithm)
        source = local_path(src, src_path, self.name)
        target = local_path(dst, dst_path, self.name)
        where = f"{src.label}:{src_path}"
        start = time.monotonic()
        src_size = _source_size(source, where)

        existing = check_existing_local(
            source,
            src_size,
            target,
            f"{dst.label}:{dst_path}",
            algorithm,
            expected,
            overwrite=self.overwrite,
            chunk_size=self.chunk_size,
        )
        if existing is not None:
            return CopyResult(
                bytes=src_size,
                checksum=existing,
                algorithm=algorithm,
                seconds=time.monotonic() - start,
                output=f"{target} already holds identical content; nothing copied",
                extra={"skipped": True},
            )

        digest, nbytes = copy_file_verified(
            source,
            target,
            algorithm=algorithm,
            expected=expected,
            where=where,
            dst_label=dst.label,
            progress=progress,
            chunk_size=self.chunk_size,
            expected_size=src_size,
        )
        return CopyResult(
            bytes=nbytes, checksum=digest, algorithm=algorithm, seconds=time.monotonic() - start
        )

    # -- management ---------------------------------------------------------------------------

    def checksum(self, loc: LocationRef, path: str, *, algorithm: str = "sha256") -> str:
        """Read the file back and return its checksum."""
        p = local_path(loc, path, self.name)
        try:
            return hash_file(p, algorithm)[0]
        except FileNotFoundError:
            raise StorageError(f"{loc.label}:{path}: no such file", retryable=False) from None
        except OSError as exc:
            raise storage_error(exc, f"reading {loc.label}:{path}") from exc

    def size(self, loc: LocationRef, path: str) -> int | None:
        """Size of the file, or None when it does not exist."""
        p = local_path(loc, path, self.name)
        try:
            return p.stat().st_size
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise storage_error(exc, f"stat {loc.label}:{path}") from exc

    def delete(self, loc: LocationRef, path: str) -> bool:
        """Delete the file (only the file: directories stay); False when it was absent."""
        p = local_path(loc, path, self.name)
        try:
            if p.is_dir() and not p.is_symlink():
                raise StorageError(
                    f"{loc.label}:{path} is a directory; movers delete single files",
                    retryable=False,
                )
            p.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise storage_error(exc, f"deleting {loc.label}:{path}") from exc
        fsync_dir(p.parent)
        return True

    def free_space(self, loc: LocationRef) -> int | None:
        """Free bytes on the filesystem holding the location's root (or its nearest ancestor)."""
        if loc.storage_type != "disk" or not loc.root_path:
            raise ConfigurationError(f"location {loc.label} has no root_path (not a disk)")
        try:
            return shutil.disk_usage(nearest_existing(Path(loc.root_path))).free
        except OSError as exc:
            raise storage_error(exc, f"free space of {loc.label}") from exc


# -- helpers shared by the movers ---------------------------------------------------------------


def local_path(loc: LocationRef, path: str, mover: str) -> Path:
    """Absolute local path of ``path`` at a disk location without a host."""
    if loc.storage_type != "disk":
        raise ConfigurationError(
            f"the {mover} mover handles disk locations; {loc.label} is {loc.storage_type}"
        )
    if loc.host:
        raise ConfigurationError(
            f"location {loc.label} is on host {loc.host}: the {mover} mover only reaches "
            "local paths (use rsync or bbcp)"
        )
    return loc.path(path)


def normalize_checksum(value: str | None, algorithm: str) -> str | None:
    """Lower-case hex digest; accepts ``"<algorithm>:<hex>"`` too (the S3 metadata form)."""
    if value is None:
        return None
    v = value.strip().lower()
    prefix, sep, rest = v.partition(":")
    if sep:
        if prefix != algorithm.lower():
            raise ConfigurationError(
                f"expected checksum {value!r} is {prefix}, but the copy computes {algorithm}"
            )
        v = rest
    return v


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists."""
    p = path
    while not p.exists() and p.parent != p:
        p = p.parent
    return p


def temp_path(target: Path) -> Path:
    """``<target>.part-<random>``: a fresh temporary name beside the destination."""
    return target.with_name(f"{target.name}.part-{secrets.token_hex(6)}")


def fsync_dir(directory: Path) -> None:
    """fsync a directory so a rename or unlink in it survives a crash (best effort)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the data itself was fsynced
    finally:
        os.close(fd)


def make_parents(directory: Path) -> None:
    """``mkdir -p`` that also fsyncs the parent of every directory it creates."""
    missing: list[Path] = []
    p = directory
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        fsync_dir(d.parent)
    if not directory.is_dir():
        raise StorageError(f"{directory} exists and is not a directory", retryable=False)


def storage_error(exc: OSError, action: str) -> StorageError:
    """Map an OSError to a StorageError a person can act on."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(f"{action}: no space left ({exc.strerror})")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"{action}: {exc.strerror} ({exc.filename})", retryable=False)
    return StorageError(f"{action}: {exc}")


class ProgressTicker:
    """Calls ``progress(bytes_done)`` at most every :data:`PROGRESS_INTERVAL` seconds."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.last = time.monotonic()

    def __call__(self, done: int, *, final: bool = False) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        if final or now - self.last >= PROGRESS_INTERVAL:
            self.last = now
            self.progress(done)


def stream_into(
    reader: BinaryIO | Any,
    fd: int,
    hasher: Hasher,
    *,
    chunk_size: int = CHUNK,
    ticker: ProgressTicker | None = None,
    start: int = 0,
    where: str = "source",
    behind: WriteBehind | None = None,
) -> int:
    """Copy ``reader`` to file descriptor ``fd`` in blocks, hashing each block once.

    ``reader`` needs ``readinto`` (files) or ``read`` (HTTP bodies). Returns bytes copied.
    ``behind`` (see :mod:`data_transfer.pagecache`) is told of every write.
    """
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    done = start
    readinto = getattr(reader, "readinto", None)
    while True:
        try:
            if readinto is not None:
                got = readinto(view)
                data = None
            else:
                data = reader.read(chunk_size)
                got = len(data) if data else 0
        except OSError as exc:
            raise storage_error(exc, f"reading {where}") from exc
        if not got:
            break
        block = view[:got] if data is None else memoryview(data)
        hasher.update(block)
        while block:
            written = os.write(fd, block)
            block = block[written:]
        if behind is not None:
            behind.wrote(got)
        done += got
        if ticker is not None:
            ticker(done)
    return done


def write_verified(
    target: Path,
    reader: BinaryIO | Any,
    *,
    algorithm: str,
    expected: str | None,
    where: str,
    dst_label: str,
    progress: Progress | None = None,
    chunk_size: int = CHUNK,
    expected_size: int | None = None,
) -> tuple[str, int]:
    """Stream ``reader`` into ``target`` with verify-then-commit; return ``(digest, bytes)``.

    Writes ``<target>.part-<random>``, fsyncs it, compares size and checksum, then renames it
    over ``target`` and fsyncs the directory. On any failure the temporary file is removed and
    nothing appears under ``target``. ``where`` names the source in error messages.
    """
    make_parents(target.parent)
    tmp = temp_path(target)
    hasher = new_hasher(algorithm)
    ticker = ProgressTicker(progress)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        raise storage_error(exc, f"creating {tmp} at {dst_label}") from exc
    try:
        try:
            behind = WriteBehind(fd)
            nbytes = stream_into(
                reader, fd, hasher, chunk_size=chunk_size, ticker=ticker, where=where, behind=behind
            )
            os.fsync(fd)
            behind.finished()
        finally:
            os.close(fd)
        ticker(nbytes, final=True)
        if expected_size is not None and nbytes != expected_size:
            raise StorageError(
                f"{where}: read {nbytes} bytes, expected {expected_size} "
                "(the source changed or was truncated during the copy)"
            )
        digest = hasher.hexdigest()
        if expected is not None and digest != expected:
            raise ChecksumMismatchError(where, expected, digest, algorithm)
        os.replace(tmp, target)
    except BaseException as exc:
        _unlink_quietly(tmp)
        if isinstance(exc, OSError):
            raise storage_error(exc, f"writing {target} at {dst_label}") from exc
        raise
    fsync_dir(target.parent)
    return digest, nbytes


def copy_file_verified(
    source: Path,
    target: Path,
    *,
    algorithm: str,
    expected: str | None,
    where: str,
    dst_label: str,
    progress: Progress | None = None,
    chunk_size: int = CHUNK,
    expected_size: int | None = None,
) -> tuple[str, int]:
    """Copy a local file with :func:`write_verified`; return ``(digest, bytes)``."""
    try:
        fin = open(source, "rb", buffering=0)  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise StorageError(f"{where}: no such file", retryable=False) from None
    except OSError as exc:
        raise storage_error(exc, f"opening {where}") from exc
    with fin:
        if hasattr(os, "posix_fadvise"):
            with contextlib.suppress(OSError):
                os.posix_fadvise(fin.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        reader = DropBehindReader(fin)
        try:
            return write_verified(
                target,
                reader,
                algorithm=algorithm,
                expected=expected,
                where=where,
                dst_label=dst_label,
                progress=progress,
                chunk_size=chunk_size,
                expected_size=expected_size,
            )
        except OSError as exc:  # read errors on the source
            raise storage_error(exc, f"reading {where}") from exc
        finally:
            reader.done()


def check_existing_local(
    source: Path | None,
    src_size: int,
    target: Path,
    target_label: str,
    algorithm: str,
    expected: str | None,
    *,
    overwrite: bool,
    chunk_size: int = CHUNK,
    source_digest: Any = None,
) -> str | None:
    """Decide what an existing local destination means for a copy.

    Returns the checksum when ``target`` already holds the same bytes (the copy is done),
    None when the copy must go ahead (no destination, or a different one and ``overwrite``),
    and raises :class:`DestinationExistsError` otherwise. Reads the destination only when
    it exists with the right size. Without ``expected`` the source is compared byte for byte
    (``source`` local) or hashed by ``source_digest()`` (a callable, for remote sources).
    """
    try:
        st = target.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise storage_error(exc, f"stat {target_label}") from exc
    if stat.S_ISDIR(st.st_mode):
        raise DestinationExistsError(f"{target_label} is a directory", retryable=False)

    def conflict(why: str) -> None:
        if not overwrite:
            raise DestinationExistsError(
                f"{target_label} already exists with different content ({why})"
            )

    if st.st_size != src_size:
        conflict(f"{st.st_size} bytes, source has {src_size}")
        return None
    try:
        if expected is not None:
            digest = hash_file(target, algorithm)[0]
            if digest == expected:
                return digest
            conflict(f"{algorithm} {digest}, expected {expected}")
            return None
        if source is not None:
            same, digest = _same_content(source, target, algorithm, chunk_size)
            if same:
                return digest
            conflict("same size, different bytes")
            return None
        want = source_digest() if source_digest is not None else None
        digest = hash_file(target, algorithm)[0]
    except OSError as exc:
        raise storage_error(exc, f"comparing with the existing {target_label}") from exc
    if want is not None and digest == want:
        return digest
    conflict(f"{algorithm} {digest}, source has {want}")
    return None


def _same_content(a: Path, b: Path, algorithm: str, chunk_size: int) -> tuple[bool, str]:
    """Compare two files block by block (hashing ``a``); stops at the first difference."""
    h = new_hasher(algorithm)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x = fa.read(chunk_size)
            y = fb.read(chunk_size)
            if x != y:
                return False, ""
            if not x:
                return True, h.hexdigest()
            h.update(x)


def _source_size(source: Path, where: str) -> int:
    try:
        st = source.stat()
    except FileNotFoundError:
        raise StorageError(f"{where}: no such file", retryable=False) from None
    except OSError as exc:
        raise storage_error(exc, f"stat {where}") from exc
    if stat.S_ISDIR(st.st_mode):
        raise StorageError(
            f"{where} is a directory; movers copy single files (packages are tar files)",
            retryable=False,
        )
    return st.st_size


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
