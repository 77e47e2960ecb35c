"""Packages: tar archives that carry a checksum manifest, built and read in one streaming pass.

Two kinds of package share this format. A *raw data package* is a tar of the raw files of one
observation and instrument module (up to about 50 GB). A *data transfer package* is a tar whose
members are raw data package tars (``nested``), bundled for the long haul.

Format (``ccat-package/1``)
---------------------------
An uncompressed POSIX tar (PAX format) of regular files, written deterministically: mtime from
the source file (whole seconds) unless the builder names one, uid/gid 0, empty user and group
names, mode 0644, no directory members. One member, ``MANIFEST.json``, lists every other member::

    {"format": "ccat-package/1", "name": "...", "created_at": "2025-01-01T00:00:00+00:00",
     "algorithm": "sha256",
     "files": [{"path": "raw/a.fits", "size": 123, "checksum": "<hex>", "algorithm": "md5"}, ...],
     "metadata": {...}}

``algorithm`` at the top is the package's own algorithm (the one ``build_package`` used for the
checksum of the whole tar); each file keeps the algorithm it was filed with (an instrument that
filed md5 or adler32 keeps it), so the checksum carried from filing is the one verified at every
hop. Member names are relative, normalised POSIX paths (no ``/`` at the start, no empty, ``.``
or ``..`` component), unique, and never ``MANIFEST.json``; no name is the parent directory of
another.

Where the manifest goes
~~~~~~~~~~~~~~~~~~~~~~~
The manifest is the **first** member whenever every file's checksum is known before the build
(the normal case: checksums are taken at filing). A reader then knows what to expect before
the first data byte, can stop at the first bad member, and :func:`read_manifest` reads only the
start of the tar. When some file arrives without a checksum, its checksum is computed while its
bytes stream into the tar, so the manifest cannot be written before them without a second read
pass; the manifest then goes **last**. Readers accept either position (and nothing else).

So that a reader can hash every member in the same single pass even when the manifest comes
last, each file member carries its algorithm in its PAX header as ``comment=ccat-algorithm=<a>``
(``comment`` is the one PAX keyword every tar ignores silently; a vendor keyword would make GNU
tar warn on every member).

One pass, flat memory
---------------------
Building reads each source file once, in :data:`~data_transfer.checksums.CHUNK` blocks: the
bytes go through the file's hasher (and are checked against the filed checksum and size) and,
as part of the tar stream, through the package hasher, so the package checksum costs no extra
read. Extracting and verifying read the tar once, sequentially, through a
:class:`HashingReader` (for the package checksum) and a small tar reader that hands member data
to ``readinto`` without copying it: the package checksum, every member's checksum and, for a
data transfer package, every inner file's checksum (the inner tar is parsed from the same bytes
while they are written to disk, a tee) all come from that one pass. Memory stays flat: one
CHUNK buffer per tar level, the manifest, and one small record per member.

Verify, then commit
~~~~~~~~~~~~~~~~~~~
``build_package`` writes ``<dest>.part-<random>`` and renames it into place only when every
file matched. ``extract_package`` writes each member to ``<final>.part-<random>``, and renames
the files into place only after the whole tar has been read and every check has passed; on any
failure it removes its temporary files, what it renamed to names that were free and the
directories it created. Final names that already exist are replaced atomically by verified
content (re-running an extraction is safe); a failure part way through the renames leaves a
replaced name with its new, verified content, never with nothing.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import stat
import string
import tarfile
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from .checksums import ALGORITHMS, CHUNK, Hasher, new_hasher
from .errors import ChecksumMismatchError, DestinationBlockedError, PackageError, UnpackError
from .pagecache import DropBehindReader, WriteBehindFile

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "ExtractResult",
    "HashingReader",
    "HashingWriter",
    "Manifest",
    "ManifestEntry",
    "Member",
    "MemberResult",
    "PackageResult",
    "Progress",
    "VerifyResult",
    "build_package",
    "extract_package",
    "read_manifest",
    "rebuild_package",
    "verify_package",
]

#: Value of the manifest's ``format`` key.
FORMAT = "ccat-package/1"
#: Name of the manifest member.
MANIFEST_NAME = "MANIFEST.json"
#: A manifest larger than this is refused (about a million entries).
MAX_MANIFEST_BYTES = 256 << 20
#: A PAX or GNU long-name header larger than this is refused.
MAX_HEADER_DATA = 16 << 20
#: ``progress`` callbacks are called at most once per this many bytes (and at the end).
PROGRESS_STEP = 16 * CHUNK

#: ``progress(bytes_done)``: bytes of tar written (build) or read (extract, verify) so far.
#: It runs in the streaming loop, so it can also throttle (a fixity audit may sleep in it).
Progress = Callable[[int], None]

_ALGO_COMMENT = "ccat-algorithm="
_HEX = frozenset(string.hexdigits)
_ZERO_BLOCK = bytes(tarfile.BLOCKSIZE)


# --------------------------------------------------------------------------------------------
# Hashing stream wrappers


class HashingReader:
    """A readable stream that hashes every byte it hands out.

    Wraps ``raw`` (anything with ``read``); each byte returned by :meth:`read` or
    :meth:`readinto` goes through the hasher for ``algorithm`` (``None``: count only) and, when
    ``sink`` is given, is also written to ``sink`` (a tee: whoever reads this stream decides how
    much is consumed, and the sink receives exactly that). ``bytes`` counts what was handed out.
    ``read(n)`` returns ``n`` bytes unless the end of ``raw`` comes first.
    """

    def __init__(
        self,
        raw: BinaryIO,
        algorithm: str | None = "sha256",
        *,
        sink: BinaryIO | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.raw = raw
        self.algorithm = algorithm
        self.hasher: Hasher | None = new_hasher(algorithm) if algorithm else None
        self.sink = sink
        self.bytes = 0
        self._progress = progress
        self._next_report = PROGRESS_STEP

    def readable(self) -> bool:
        """Always true."""
        return True

    def read(self, size: int | None = -1) -> bytes:
        """Read up to ``size`` bytes (all that is left when ``size`` is negative or None)."""
        if size is None or size < 0:
            parts = []
            while chunk := self.read(CHUNK):
                parts.append(chunk)
            return b"".join(parts)
        parts = []
        want = size
        while want > 0:
            chunk = self.raw.read(want)
            if not chunk:
                break
            parts.append(chunk)
            want -= len(chunk)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if data:
            self._account(data)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:
        """Read into ``buffer``; return the number of bytes read (0 at the end)."""
        view = memoryview(buffer).cast("B")
        readinto = getattr(self.raw, "readinto", None)
        if readinto is not None:
            n = readinto(view) or 0
        else:
            data = self.raw.read(len(view))
            n = len(data)
            view[:n] = data
        if n:
            self._account(view[:n])
        return n

    def drain(self) -> int:
        """Read ``raw`` to its end (hashing and teeing it as usual); return the bytes read."""
        n = 0
        while chunk := self.read(CHUNK):
            n += len(chunk)
        return n

    def hexdigest(self) -> str:
        """Hex digest of the bytes handed out so far."""
        if self.hasher is None:
            raise PackageError("this HashingReader counts only (no algorithm)")
        return self.hasher.hexdigest()

    def close(self) -> None:
        """Does nothing: the caller owns ``raw`` and ``sink``."""

    def _account(self, data: bytes | memoryview) -> None:
        if self.hasher is not None:
            self.hasher.update(data)
        if self.sink is not None:
            self.sink.write(data)
        self.bytes += len(data)
        if self._progress is not None and self.bytes >= self._next_report:
            self._next_report = self.bytes + PROGRESS_STEP
            self._progress(self.bytes)


class HashingWriter:
    """A writable stream that hashes every byte on its way to ``raw``.

    ``tell()`` is the number of bytes written through it (``tarfile`` asks for it), so the
    wrapper can sit on any writable stream, seekable or not.
    """

    def __init__(
        self, raw: BinaryIO, algorithm: str = "sha256", *, progress: Progress | None = None
    ) -> None:
        self.raw = raw
        self.algorithm = algorithm
        self.hasher: Hasher = new_hasher(algorithm)
        self.bytes = 0
        self._progress = progress
        self._next_report = PROGRESS_STEP

    def writable(self) -> bool:
        """Always true."""
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Hash ``data`` and write all of it to ``raw``; return its length."""
        view = memoryview(data).cast("B")
        self.hasher.update(view)
        rest = view
        while rest:
            n = self.raw.write(rest)
            if n is None:  # a non-blocking raw stream: not supported
                raise PackageError("the output stream would block")
            rest = rest[n:]
        self.bytes += len(view)
        if self._progress is not None and self.bytes >= self._next_report:
            self._next_report = self.bytes + PROGRESS_STEP
            self._progress(self.bytes)
        return len(view)

    def tell(self) -> int:
        """Bytes written so far."""
        return self.bytes

    def flush(self) -> None:
        """Flush ``raw``."""
        self.raw.flush()

    def hexdigest(self) -> str:
        """Hex digest of the bytes written so far."""
        return self.hasher.hexdigest()

    def close(self) -> None:
        """Does nothing: the caller owns ``raw``."""


# --------------------------------------------------------------------------------------------
# Manifest


@dataclass(frozen=True)
class ManifestEntry:
    """One file of a package: its name in the tar, size and checksum (hex, lower case)."""

    path: str
    size: int
    checksum: str
    algorithm: str = "sha256"

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of the entry."""
        return {
            "path": self.path,
            "size": self.size,
            "checksum": self.checksum,
            "algorithm": self.algorithm,
        }


@dataclass(frozen=True)
class Manifest:
    """The parsed ``MANIFEST.json`` of a package."""

    name: str
    files: tuple[ManifestEntry, ...]
    created_at: str
    algorithm: str = "sha256"
    metadata: Mapping[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    def to_bytes(self) -> bytes:
        """The manifest as UTF-8 JSON (keys in a fixed order, one file per line)."""
        head = {
            "format": self.format,
            "name": self.name,
            "created_at": self.created_at,
            "algorithm": self.algorithm,
        }
        lines = [json.dumps(head, ensure_ascii=False)[:-1] + ', "files": [']
        lines += [
            json.dumps(e.to_dict(), ensure_ascii=False) + ("," if i < len(self.files) - 1 else "")
            for i, e in enumerate(self.files)
        ]
        lines.append('], "metadata": ' + json.dumps(dict(self.metadata), ensure_ascii=False) + "}")
        return ("\n".join(lines) + "\n").encode("utf-8")

    def by_path(self) -> dict[str, ManifestEntry]:
        """Entries keyed by member name."""
        return {e.path: e for e in self.files}

    @property
    def total_size(self) -> int:
        """Sum of the file sizes."""
        return sum(e.size for e in self.files)

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str = MANIFEST_NAME) -> Manifest:
        """Parse and validate a manifest; :class:`UnpackError` naming ``where`` if invalid."""
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UnpackError(f"{where}: not valid UTF-8 JSON ({exc})") from exc
        if not isinstance(obj, dict):
            raise UnpackError(f"{where}: not a JSON object")
        if obj.get("format") != FORMAT:
            raise UnpackError(f"{where}: format is {obj.get('format')!r}, expected {FORMAT!r}")
        name, created_at = obj.get("name"), obj.get("created_at")
        algorithm = obj.get("algorithm", "sha256")
        files, metadata = obj.get("files"), obj.get("metadata", {})
        if not isinstance(name, str) or not isinstance(created_at, str):
            raise UnpackError(f"{where}: 'name' and 'created_at' must be strings")
        if algorithm not in ALGORITHMS:
            raise UnpackError(f"{where}: unknown algorithm {algorithm!r}")
        if not isinstance(files, list) or not isinstance(metadata, dict):
            raise UnpackError(f"{where}: 'files' must be a list and 'metadata' an object")
        entries = []
        for item in files:
            if not isinstance(item, dict):
                raise UnpackError(f"{where}: a file entry is not an object: {item!r}")
            path, size = item.get("path"), item.get("size")
            checksum, algo = item.get("checksum"), item.get("algorithm", algorithm)
            if not isinstance(path, str):
                raise UnpackError(f"{where}: a file entry has no path: {item!r}")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise UnpackError(f"{where}: {path}: bad size {size!r}")
            if algo not in ALGORITHMS:
                raise UnpackError(f"{where}: {path}: unknown algorithm {algo!r}")
            if not isinstance(checksum, str) or not _is_hex(checksum):
                raise UnpackError(f"{where}: {path}: bad checksum {checksum!r}")
            entries.append(ManifestEntry(path, size, checksum.lower(), algo))
        _check_names([e.path for e in entries], UnpackError, where)
        return cls(
            name=name,
            files=tuple(entries),
            created_at=created_at,
            algorithm=algorithm,
            metadata=metadata,
        )


def _is_hex(value: str) -> bool:
    return bool(value) and all(c in _HEX for c in value)


def _check_name(name: object, error: type[PackageError], where: str) -> str:
    """Refuse anything but a normalised relative POSIX path that is not the manifest's name."""
    if not isinstance(name, str) or not name:
        raise error(f"{where}: empty or non-string member name {name!r}")
    if "\x00" in name:
        raise error(f"{where}: {name!r}: NUL in member name")
    if name.startswith("/"):
        raise error(f"{where}: {name}: absolute member names are refused")
    parts = name.split("/")
    if ".." in parts:
        raise error(f"{where}: {name}: '..' in member name is refused")
    if any(p in ("", ".") for p in parts):
        raise error(f"{where}: {name}: not a normalised relative path (empty or '.' component)")
    if name == MANIFEST_NAME:
        raise error(f"{where}: {name}: collides with the package manifest")
    return name


def _check_names(names: Iterable[str], error: type[PackageError], where: str) -> None:
    """Check each name, and the set: no duplicate, no name that is another's parent directory."""
    seen: set[str] = set()
    for name in names:
        _check_name(name, error, where)
        if name in seen:
            raise error(f"{where}: {name}: duplicate member name")
        seen.add(name)
    for name in seen:
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in seen:
                raise error(f"{where}: {name}: {parent} is both a file and a directory")


# --------------------------------------------------------------------------------------------
# Building


@dataclass(frozen=True)
class Member:
    """A file to pack: where it is, its name in the tar, and what filing recorded about it.

    ``checksum`` (hex) and ``algorithm`` are the values from filing; with ``checksum=None`` the
    checksum is computed (with ``algorithm``) while the file streams into the tar. ``mtime``
    goes into the member's header (default: the source file's modification time).
    """

    source: Path
    arcname: str
    size: int
    checksum: str | None
    algorithm: str = "sha256"
    mtime: int | None = None


@dataclass(frozen=True)
class PackageResult:
    """What :func:`build_package` wrote: the tar's path, size and checksum, and its files."""

    path: Path
    size: int
    checksum: str
    algorithm: str
    file_count: int
    files: list[ManifestEntry]
    manifest_first: bool = True


def build_package(
    dest: Path,
    name: str,
    members: list[Member],
    *,
    algorithm: str = "sha256",
    metadata: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    created_at: datetime | None = None,
    fsync: bool = True,
) -> PackageResult:
    """Pack ``members`` into the tar ``dest``, reading each source file exactly once.

    The tar is written to ``dest.part-<random>``, synced, and renamed to ``dest`` (replacing
    it) only when every file had its filed size and checksum. The manifest is the first member
    when every member has a checksum, otherwise the last (see the module docstring).
    ``algorithm`` is the algorithm of the whole-tar checksum returned in the result (computed
    from the bytes as they are written). ``created_at`` (default: now) goes into the manifest;
    fixing it makes the tar byte-for-byte reproducible. ``fsync=False`` skips the syncs
    (tests, scratch space).

    Raises :class:`PackageError` naming the member for a bad name, an unknown algorithm, or a
    source that is not a regular file or whose size differs from ``size``;
    :class:`ChecksumMismatchError` naming the source file when its bytes do not match its
    checksum. Nothing is left at ``dest`` or at the temporary name on failure.
    """
    dest = Path(dest)
    if not isinstance(name, str) or not name:
        raise PackageError(f"{dest}: package name must be a non-empty string")
    _known_algorithm(algorithm, PackageError, str(dest))
    _check_names([m.arcname for m in members], PackageError, str(dest))
    for m in members:
        _known_algorithm(m.algorithm, PackageError, f"{dest}: {m.arcname}")
        if not isinstance(m.size, int) or m.size < 0:
            raise PackageError(f"{dest}: {m.arcname}: bad size {m.size!r}")
        if m.checksum is not None and not _is_hex(m.checksum.strip()):
            raise PackageError(f"{dest}: {m.arcname}: bad checksum {m.checksum!r}")
    created = (created_at or datetime.now(UTC)).astimezone(UTC)
    manifest_mtime = int(created.timestamp())
    meta = dict(metadata or {})
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as exc:
        raise PackageError(f"{dest}: metadata is not JSON-serialisable: {exc}") from exc

    def manifest_for(entries: list[ManifestEntry]) -> Manifest:
        return Manifest(
            name=name,
            files=tuple(entries),
            created_at=created.isoformat(timespec="seconds"),
            algorithm=algorithm.lower(),
            metadata=meta,
        )

    manifest_first = all(m.checksum is not None for m in members)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f"{dest.name}.part-{secrets.token_hex(6)}")
    entries: list[ManifestEntry] = []
    try:
        with WriteBehindFile(open(part, "xb"), window=None if fsync else 0) as out:
            writer = HashingWriter(out, algorithm, progress=progress)  # type: ignore[arg-type]
            with tarfile.open(
                fileobj=writer,  # type: ignore[arg-type]
                mode="w",
                format=tarfile.PAX_FORMAT,
                encoding="utf-8",
                copybufsize=CHUNK,
            ) as tar:
                if manifest_first:
                    planned = [
                        ManifestEntry(m.arcname, m.size, _norm(m.checksum), m.algorithm.lower())
                        for m in members
                    ]
                    _add_manifest(tar, manifest_for(planned), manifest_mtime)
                for m in members:
                    entries.append(_add_member(tar, m))
                if not manifest_first:
                    _add_manifest(tar, manifest_for(entries), manifest_mtime)
            out.sync(fsync=fsync)
        os.replace(part, dest)
        if fsync:
            _fsync_dir(dest.parent)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    if progress is not None:
        progress(writer.bytes)
    return PackageResult(
        path=dest,
        size=writer.bytes,
        checksum=writer.hexdigest(),
        algorithm=algorithm.lower(),
        file_count=len(entries),
        files=entries,
        manifest_first=manifest_first,
    )


def rebuild_package(
    dest: Path,
    name: str,
    members: list[Member],
    *,
    algorithm: str,
    expected_checksum: str,
    metadata: Mapping[str, Any] | None = None,
    created_at: datetime | None = None,
    fsync: bool = True,
) -> PackageResult:
    """Rebuild the package at ``dest`` byte for byte from ``members`` (its sources).

    For a copy that rotted where it lies while its sources are still at hand (a raw data
    package tar in a BUFFER whose files are still at the SOURCE; a transfer package whose raw
    data package tars are beside it). The build is deterministic (see the module docstring)
    given the manifest's ``created_at`` and each member's mtime. Those are read from the bad
    copy's headers when they are readable (a flipped data byte leaves them so); otherwise (a
    rotten header, a lost copy) ``created_at`` and the members' own ``mtime`` are used, which
    the pipeline derives from its records when it first builds a package. The new tar is
    built beside ``dest`` and replaces it only when its checksum is ``expected_checksum``, the
    one recorded when the package was first built.

    Raises :class:`PackageError` when the bad copy's manifest cannot be read and no
    ``created_at`` is given (nothing is replaced), :class:`ChecksumMismatchError` naming a
    source whose bytes are bad (as :func:`build_package`), or naming ``dest`` when the rebuilt
    tar still differs from the recorded checksum (nothing is replaced).
    """
    dest = Path(dest)
    try:
        recorded, mtimes = _layout(dest)
    except PackageError:
        if created_at is None:
            raise
        recorded, mtimes = None, {}
    created = created_at
    if recorded is not None:
        try:
            created = datetime.fromisoformat(recorded)
        except ValueError as exc:
            raise PackageError(f"{dest}: manifest created_at {recorded!r}: {exc}") from exc
    planned = [replace(m, mtime=mtimes.get(m.arcname, m.mtime)) for m in members]
    # a temporary name the stale-file sweeper knows (``.part-<hex>``), should this be killed
    scratch = dest.with_name(f"{dest.name}.part-{secrets.token_hex(6)}")
    result = build_package(
        scratch,
        name,
        planned,
        algorithm=algorithm,
        metadata=metadata,
        created_at=created,
        fsync=fsync,
    )
    if result.checksum != _norm(expected_checksum):
        scratch.unlink(missing_ok=True)
        raise ChecksumMismatchError(
            f"{dest} (rebuilt from its sources)",
            _norm(expected_checksum),
            result.checksum,
            algorithm,
        )
    os.replace(scratch, dest)
    if fsync:
        _fsync_dir(dest.parent)
    return replace(result, path=dest)


def _layout(path: Path) -> tuple[str, dict[str, int]]:
    """A package's manifest ``created_at`` and every member's mtime, read from its headers."""
    label = str(path)
    mtimes: dict[str, int] = {}
    created_at: str | None = None
    try:
        with tarfile.open(path, mode="r:", encoding="utf-8") as tar:
            for info in iter(tar.next, None):
                tar.members.clear()
                if info.name == MANIFEST_NAME:
                    created_at = _read_manifest_member(tar, info, label).created_at
                else:
                    mtimes[info.name] = int(info.mtime)
    except (tarfile.TarError, OSError, UnpackError) as exc:
        if created_at is None:
            raise PackageError(
                f"{label}: cannot be rebuilt byte for byte: its manifest is unreadable ({exc})"
            ) from exc
    if created_at is None:
        raise PackageError(f"{label}: cannot be rebuilt byte for byte: no {MANIFEST_NAME}")
    return created_at, mtimes


def _norm(checksum: str | None) -> str:
    """A checksum as the manifest stores it: hex, lower case, no surrounding blanks."""
    return (checksum or "").strip().lower()


def _known_algorithm(algorithm: object, error: type[PackageError], where: str) -> str:
    if not isinstance(algorithm, str) or algorithm.lower() not in ALGORITHMS:
        raise error(f"{where}: unknown checksum algorithm {algorithm!r}")
    return algorithm.lower()


def _tarinfo(name: str, size: int, mtime: int, algorithm: str | None = None) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.REGTYPE
    info.size = size
    info.mtime = mtime
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if algorithm is not None:
        info.pax_headers = {"comment": _ALGO_COMMENT + algorithm}
    return info


def _add_manifest(tar: tarfile.TarFile, manifest: Manifest, mtime: int) -> None:
    data = manifest.to_bytes()
    tar.addfile(_tarinfo(MANIFEST_NAME, len(data), mtime), io.BytesIO(data))


def _add_member(tar: tarfile.TarFile, m: Member) -> ManifestEntry:
    """Stream one source file into the tar, hashing it; check its size and checksum."""
    algorithm = m.algorithm.lower()
    try:
        src = open(m.source, "rb", buffering=0)  # noqa: SIM115 - closed below
    except OSError as exc:
        raise PackageError(f"{m.source}: cannot open for {m.arcname}: {exc}") from exc
    with src:
        st = os.fstat(src.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise PackageError(f"{m.source}: not a regular file (member {m.arcname})")
        if st.st_size != m.size:
            raise PackageError(
                f"{m.source}: size is {st.st_size}, {m.size} was filed (member {m.arcname})"
            )
        dropping = DropBehindReader(src)
        reader = HashingReader(dropping, algorithm)  # type: ignore[arg-type]
        mtime = int(st.st_mtime) if m.mtime is None else int(m.mtime)
        info = _tarinfo(m.arcname, m.size, mtime, algorithm)
        try:
            tar.addfile(info, reader)  # type: ignore[arg-type]
            dropping.done()
        except OSError as exc:
            # tarfile raises OSError("unexpected end of data") when the source comes up short;
            # any other OSError (a read or write failing) is passed on as it is.
            now = os.fstat(src.fileno()).st_size
            if str(exc) != "unexpected end of data" and now == m.size:
                raise
            raise PackageError(
                f"{m.source}: changed while it was packed (size now {now}, {m.size} filed; "
                f"{reader.bytes} bytes read)"
            ) from exc
        if src.read(1):
            raise PackageError(f"{m.source}: grew beyond its filed size {m.size} while packed")
    actual = reader.hexdigest()
    if m.checksum is not None and actual != _norm(m.checksum):
        raise ChecksumMismatchError(str(m.source), _norm(m.checksum), actual, algorithm)
    return ManifestEntry(m.arcname, m.size, actual, algorithm)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Reading: one sequential pass


@dataclass
class MemberResult:
    """One member as read from the tar: its name, size and the checksum measured while reading.

    For a data transfer package read with ``nested=True``, ``inner_manifest`` and ``inner`` are
    the manifest of the inner raw data package and its files (each verified against it).
    ``final_path`` is where :func:`extract_package` put the member (None when only verified).
    """

    path: str
    size: int
    checksum: str
    algorithm: str
    final_path: Path | None = None
    inner_manifest: Manifest | None = None
    inner: list[MemberResult] | None = None


@dataclass
class VerifyResult:
    """The outcome of reading a package once: the whole-tar checksum and every member checked.

    ``source`` names what was read (path, or ``<stream>``); ``size`` is the number of bytes of
    tar read; ``members`` follow the manifest's order.
    """

    source: str
    manifest: Manifest
    size: int
    checksum: str
    algorithm: str
    members: list[MemberResult]
    manifest_first: bool

    @property
    def file_count(self) -> int:
        """Number of files (the manifest excluded)."""
        return len(self.members)


@dataclass
class ExtractResult(VerifyResult):
    """A :class:`VerifyResult` whose members were written under ``dest_dir``."""

    dest_dir: Path


def verify_package(
    source: Path | str | BinaryIO,
    *,
    expected_checksum: str | None = None,
    algorithm: str = "sha256",
    nested: bool = False,
    progress: Progress | None = None,
) -> VerifyResult:
    """Read a package once and check it, writing nothing (fixity audits).

    Checks the manifest (present, first or last, valid), that the tar holds exactly the files
    it lists with their sizes and checksums, with ``nested=True`` that every member is a valid
    package whose files match its own manifest, and finally the whole-tar checksum
    (``algorithm``) against ``expected_checksum`` when given. ``source`` is a path or a readable
    binary stream (an S3 body, say). Raises :class:`ChecksumMismatchError` or
    :class:`UnpackError` naming the member.
    """
    _known_algorithm(algorithm, UnpackError, "verify_package")
    with ExitStack() as stack:
        raw, label = _open_source(source, stack)
        reader = HashingReader(raw, algorithm, progress=progress)
        manifest, members, first = _scan(reader, label, None, nested=nested)
        reader.drain()
        checksum = _check_package_checksum(reader, label, expected_checksum)
    if progress is not None:
        progress(reader.bytes)
    return VerifyResult(label, manifest, reader.bytes, checksum, algorithm.lower(), members, first)


def extract_package(
    source: Path | str | BinaryIO,
    dest_dir: Path,
    *,
    expected_checksum: str | None = None,
    algorithm: str = "sha256",
    nested: bool = False,
    progress: Progress | None = None,
    fsync: bool = True,
) -> ExtractResult:
    """Unpack a package into ``dest_dir`` in one sequential pass, verify-then-commit.

    Each member streams to ``<dest_dir>/<name>.part-<random>`` while it is hashed; the whole
    tar is hashed in the same pass. Only when the tar has been read to its end and everything
    matched (manifest present and consistent, no member missing or extra, every checksum, with
    ``nested=True`` every inner package's files, and ``expected_checksum`` when given) are the
    files synced and renamed to their final names, replacing what is there. On failure nothing
    this call wrote remains (temporary files, files renamed to names that were free,
    directories it created; a file that replaced one keeps its verified content) and
    :class:`ChecksumMismatchError` or :class:`UnpackError` names the member. Absolute names,
    ``..``, links, devices and a symbolic link inside ``dest_dir`` on the way to a member are
    refused.
    """
    _known_algorithm(algorithm, UnpackError, "extract_package")
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    staging = _Staging(dest_dir, fsync=fsync)
    try:
        with ExitStack() as stack:
            raw, label = _open_source(source, stack)
            reader = HashingReader(raw, algorithm, progress=progress)
            manifest, members, first = _scan(reader, label, staging, nested=nested)
            reader.drain()
            checksum = _check_package_checksum(reader, label, expected_checksum)
        staging.commit()
    except BaseException:
        staging.rollback()
        raise
    if progress is not None:
        progress(reader.bytes)
    return ExtractResult(
        label, manifest, reader.bytes, checksum, algorithm.lower(), members, first, dest_dir
    )


def read_manifest(source: Path | str | BinaryIO) -> Manifest:
    """The manifest of a package, read without reading the files' data.

    When the manifest is the first member only the start of the tar is read; otherwise the
    member headers are scanned (seeking over the data, so ``source`` must be seekable) to the
    manifest, which must be the last member. :class:`UnpackError` when there is none.
    """
    label = str(source) if isinstance(source, (str, Path)) else "<stream>"
    try:
        if isinstance(source, (str, Path)):
            tar = tarfile.open(source, mode="r:", encoding="utf-8")  # noqa: SIM115 - with below
        else:
            tar = tarfile.open(fileobj=source, mode="r:", encoding="utf-8")  # noqa: SIM115
    except (tarfile.TarError, OSError) as exc:
        raise UnpackError(f"{label}: not a readable tar: {exc}") from exc
    with tar:
        try:
            info = tar.next()
            first = True
            while info is not None and info.name != MANIFEST_NAME:
                first = False
                tar.members.clear()
                info = tar.next()
            if info is None:
                raise UnpackError(f"{label}: no {MANIFEST_NAME} in the package")
            manifest = _read_manifest_member(tar, info, label)
            if not first and tar.next() is not None:
                raise UnpackError(f"{label}: {MANIFEST_NAME} is neither the first nor the last")
        except (tarfile.TarError, OSError) as exc:
            raise UnpackError(f"{label}: corrupt or truncated tar: {exc}") from exc
    return manifest


def _open_source(source: Path | str | BinaryIO, stack: ExitStack) -> tuple[BinaryIO, str]:
    if isinstance(source, (str, Path)):
        try:
            raw = stack.enter_context(open(source, "rb", buffering=0))  # noqa: SIM115
        except OSError as exc:
            raise UnpackError(f"{source}: cannot open: {exc}") from exc
        reader = DropBehindReader(raw)
        stack.callback(reader.done)
        return reader, str(source)  # type: ignore[return-value]
    name = getattr(source, "name", None)
    return source, name if isinstance(name, str) and name else "<stream>"


def _check_package_checksum(reader: HashingReader, label: str, expected: str | None) -> str:
    actual = reader.hexdigest()
    if expected is not None and actual != expected.strip().lower():
        raise ChecksumMismatchError(label, expected.strip().lower(), actual, reader.algorithm or "")
    return actual


def _read_manifest_member(
    tar: tarfile.TarFile | _TarReader, info: tarfile.TarInfo, label: str
) -> Manifest:
    where = f"{label}:{MANIFEST_NAME}"
    if not info.isreg() or info.issparse():
        raise UnpackError(f"{where}: not a regular file")
    if info.size > MAX_MANIFEST_BYTES:
        raise UnpackError(f"{where}: {info.size} bytes, more than {MAX_MANIFEST_BYTES}")
    if isinstance(tar, _TarReader):
        data = tar.read(info.size)
    else:
        fobj = tar.extractfile(info)
        assert fobj is not None
        data = fobj.read()
    return Manifest.from_bytes(data, where=where)


def _member_algorithm(info: tarfile.TarInfo, where: str) -> str:
    """The algorithm a member announces in its PAX header (sha256 when it says nothing)."""
    comment = info.pax_headers.get("comment", "")
    if comment.startswith(_ALGO_COMMENT):
        algo = comment[len(_ALGO_COMMENT) :].strip().lower()
        if algo not in ALGORITHMS:
            raise UnpackError(f"{where}: unknown algorithm {algo!r} in its header")
        return algo
    return "sha256"


def _check_member_type(info: tarfile.TarInfo, label: str) -> str:
    where = f"{label}:{info.name}"
    if info.issparse():
        raise UnpackError(f"{where}: sparse members are refused")
    if info.issym() or info.islnk():
        raise UnpackError(f"{where}: links are refused (-> {info.linkname})")
    if info.isdev():
        raise UnpackError(f"{where}: device and FIFO members are refused")
    if not (info.isreg() or info.isdir()):
        raise UnpackError(f"{where}: unsupported member type {info.type!r}")
    return _check_name(info.name, UnpackError, label)


def _compare(entry: ManifestEntry, result: MemberResult, where: str) -> None:
    if result.algorithm != entry.algorithm:
        raise UnpackError(
            f"{where}: hashed with {result.algorithm} while streaming (the manifest came last) "
            f"but the manifest says {entry.algorithm}; the member header lacks its algorithm"
        )
    if result.size != entry.size:
        raise UnpackError(f"{where}: {result.size} bytes in the tar, {entry.size} in the manifest")
    if result.checksum != entry.checksum:
        raise ChecksumMismatchError(where, entry.checksum, result.checksum, entry.algorithm)


class _TarReader:
    """A minimal sequential tar reader: one pass, no seeking, no copies of member data.

    Headers are parsed with :meth:`tarfile.TarInfo.frombuf` (which checks the header
    checksum); PAX extended and global headers and GNU long names are applied here. Member data
    is read with :meth:`readinto` straight into the caller's buffer, bounded by the member's
    size. (``tarfile``'s own stream mode copies every byte about four times on its way through
    its internal buffers; measured, it halved the throughput of a verifying read.)
    """

    def __init__(self, stream: HashingReader, label: str) -> None:
        self._stream = stream
        self._label = label
        self._global: dict[str, str] = {}
        self._left = 0  # data bytes of the current member not read yet
        self._pad = 0  # padding after the current member's data
        self.position = 0  # bytes consumed from the stream

    # -- member data

    def readinto(self, buffer: bytearray | memoryview) -> int:
        """Read the current member's data into ``buffer``; 0 at the member's end."""
        view = memoryview(buffer).cast("B")
        if self._left <= 0 or not len(view):
            return 0
        if len(view) > self._left:
            view = view[: self._left]
        n = self._stream.readinto(view)
        if not n:
            raise UnpackError(
                f"{self._label}: truncated: the tar ends {self._left} bytes into a member's data"
            )
        self._left -= n
        self.position += n
        return n

    def read(self, size: int = -1) -> bytes:
        """Read up to ``size`` bytes of the current member's data (the rest when negative)."""
        want = self._left if size is None or size < 0 else min(size, self._left)
        data = self._read_exact(want) if want else b""
        self._left -= len(data)
        return data

    # -- headers

    def next(self) -> tarfile.TarInfo | None:
        """The next member's header (the previous member's unread data is skipped), or None
        at the end-of-archive marker (or at the end of the stream on a block boundary)."""
        self._skip(self._left + self._pad)
        self._left = self._pad = 0
        pax: dict[str, str] = {}
        long_name: str | None = None
        long_link: str | None = None
        while True:
            start = self.position
            block = self._stream.read(tarfile.BLOCKSIZE)
            self.position += len(block)
            pending = bool(pax or long_name is not None or long_link is not None)
            if not block:
                if start == 0:
                    raise UnpackError(f"{self._label}: empty, not a tar")
                if pending:
                    raise UnpackError(f"{self._label}: truncated after an extended header")
                return None
            if len(block) < tarfile.BLOCKSIZE:
                raise UnpackError(f"{self._label}: truncated: partial header at byte {start}")
            if block == _ZERO_BLOCK:
                if pending:
                    raise UnpackError(f"{self._label}: extended header without a member")
                return None
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.HeaderError as exc:
                raise UnpackError(f"{self._label}: bad tar header at byte {start}: {exc}") from exc
            if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE):
                records = self._parse_pax(self._header_data(info.size), start)
                (self._global if info.type == tarfile.XGLTYPE else pax).update(records)
                continue
            if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
                raw = self._header_data(info.size).split(b"\0", 1)[0]
                value = raw.decode("utf-8", "surrogateescape")
                if info.type == tarfile.GNUTYPE_LONGNAME:
                    long_name = value
                else:
                    long_link = value
                continue
            if long_name is not None:
                info.name = long_name.rstrip("/") if info.isdir() else long_name
            if long_link is not None:
                info.linkname = long_link
            self._apply_pax({**self._global, **pax}, info, start)
            has_data = info.isreg() or info.type not in tarfile.SUPPORTED_TYPES
            self._left = info.size if has_data else 0
            self._pad = -self._left % tarfile.BLOCKSIZE
            return info

    def _apply_pax(self, headers: dict[str, str], info: tarfile.TarInfo, start: int) -> None:
        if any(key.startswith("GNU.sparse.") for key in headers):
            raise UnpackError(f"{self._label}:{info.name}: sparse members are refused")
        try:
            for key, value in headers.items():
                if key == "path":
                    info.name = value.rstrip("/") if info.isdir() else value
                elif key == "linkpath":
                    info.linkname = value
                elif key in ("size", "uid", "gid"):
                    setattr(info, key, int(value))
                elif key == "mtime":
                    info.mtime = float(value)  # type: ignore[assignment]
                elif key in ("uname", "gname"):
                    setattr(info, key, value)
        except ValueError as exc:
            raise UnpackError(f"{self._label}: bad PAX record at byte {start}: {exc}") from exc
        if info.size < 0:
            raise UnpackError(f"{self._label}:{info.name}: negative size")
        info.pax_headers = dict(headers)

    def _parse_pax(self, data: bytes, start: int) -> dict[str, str]:
        """Records ``"<length> <keyword>=<value>\\n"`` (the length counts the whole record)."""
        records: dict[str, str] = {}
        pos = 0
        while pos < len(data) and data[pos] != 0:
            space = data.find(b" ", pos)
            try:
                length = int(data[pos:space]) if space > pos else 0
            except ValueError:
                length = 0
            end = pos + length
            if length <= 0 or end > len(data) or data[end - 1] != 0x0A or space >= end:
                raise UnpackError(f"{self._label}: bad PAX header at byte {start}")
            key, eq, value = data[space + 1 : end - 1].partition(b"=")
            if not eq:
                raise UnpackError(f"{self._label}: bad PAX record at byte {start}")
            records[key.decode("utf-8", "surrogateescape")] = value.decode(
                "utf-8", "surrogateescape"
            )
            pos = end
        return records

    def _header_data(self, size: int) -> bytes:
        if size > MAX_HEADER_DATA:
            raise UnpackError(f"{self._label}: extended header of {size} bytes refused")
        data = self._read_exact(size + (-size % tarfile.BLOCKSIZE))
        return data[:size]

    def _read_exact(self, size: int) -> bytes:
        data = self._stream.read(size)
        self.position += len(data)
        if len(data) != size:
            raise UnpackError(f"{self._label}: truncated at byte {self.position}")
        return data

    def _skip(self, size: int) -> None:
        if size <= 0:
            return
        scratch = bytearray(min(size, CHUNK))
        view = memoryview(scratch)
        while size > 0:
            n = self._stream.readinto(view[: min(size, len(view))])
            if not n:
                raise UnpackError(f"{self._label}: truncated at byte {self.position}")
            size -= n
            self.position += n


def _scan(
    reader: HashingReader,
    label: str,
    staging: _Staging | None,
    *,
    nested: bool,
) -> tuple[Manifest, list[MemberResult], bool]:
    """Read one tar stream from ``reader`` up to its end-of-archive, checking it as it goes.

    Each member's bytes are hashed and, with ``staging``, written to a temporary file; with
    ``nested`` each member is itself scanned as a package while it streams. Returns the
    manifest, the member results in manifest order and whether the manifest came first.
    """
    tar = _TarReader(reader, label)
    buffer = memoryview(bytearray(CHUNK))
    manifest: Manifest | None = None
    expected: dict[str, ManifestEntry] = {}
    manifest_first = False
    results: dict[str, MemberResult] = {}
    while (info := tar.next()) is not None:
        name = info.name
        if manifest is not None and not manifest_first:
            raise UnpackError(
                f"{label}:{name}: follows {MANIFEST_NAME}, which must be the first or the "
                "last member"
            )
        if name == MANIFEST_NAME:
            if manifest is not None:
                raise UnpackError(f"{label}: {MANIFEST_NAME} appears twice")
            manifest = _read_manifest_member(tar, info, label)
            expected = manifest.by_path()
            manifest_first = not results
            continue
        _check_member_type(info, label)
        if info.isdir():
            continue
        where = f"{label}:{name}"
        if name in results:
            raise UnpackError(f"{where}: appears twice in the tar")
        entry = expected.get(name)
        if manifest is not None:
            if entry is None:
                raise UnpackError(f"{where}: in the tar but not in the manifest")
            if info.size != entry.size:
                raise UnpackError(
                    f"{where}: {info.size} bytes in the tar, {entry.size} in the manifest"
                )
            algorithm = entry.algorithm
        else:
            algorithm = _member_algorithm(info, where)
        result = _stream_member(tar, info, algorithm, where, staging, buffer, nested=nested)
        if entry is not None:
            _compare(entry, result, where)
        results[name] = result
    if manifest is None:
        raise UnpackError(f"{label}: no {MANIFEST_NAME} in the package")
    missing = [e.path for e in manifest.files if e.path not in results]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UnpackError(f"{label}:{missing[0]}: in the manifest but not in the tar{more}")
    if not manifest_first:
        for name, result in results.items():
            entry = expected.get(name)
            if entry is None:
                raise UnpackError(f"{label}:{name}: in the tar but not in the manifest")
            _compare(entry, result, f"{label}:{name}")
    return manifest, [results[e.path] for e in manifest.files], manifest_first


def _stream_member(
    tar: _TarReader,
    info: tarfile.TarInfo,
    algorithm: str,
    where: str,
    staging: _Staging | None,
    buffer: memoryview,
    *,
    nested: bool,
) -> MemberResult:
    """Stream one member's bytes through its hasher (and to its temporary file)."""
    final = staging.final_path(info.name) if staging is not None else None
    sink = staging.open(info.name) if staging is not None else None
    try:
        if nested:
            # Tee: every byte the inner reader consumes goes to this member's hasher and file.
            tee = HashingReader(tar, algorithm, sink=sink)  # type: ignore[arg-type]
            inner_manifest, inner, _ = _scan(tee, where, None, nested=False)
            tee.drain()  # the inner tar's end padding, and anything after its end marker
            checksum, size = tee.hexdigest(), tee.bytes
        else:
            hasher = new_hasher(algorithm)
            size = 0
            while n := tar.readinto(buffer):
                chunk = buffer[:n]
                hasher.update(chunk)
                if sink is not None:
                    sink.write(chunk)
                size += n
            checksum, inner_manifest, inner = hasher.hexdigest(), None, None
        if size != info.size:
            raise UnpackError(f"{where}: {size} bytes read, the header says {info.size}")
        if staging is not None and sink is not None:
            staging.finish(sink)
    finally:
        if sink is not None:
            sink.close()
    return MemberResult(info.name, size, checksum, algorithm, final, inner_manifest, inner)


class _Staging:
    """Temporary files of one extraction, committed (renamed) together or rolled back."""

    def __init__(self, dest_dir: Path, *, fsync: bool) -> None:
        self.dest_dir = dest_dir
        self.fsync = fsync
        self.parts: list[tuple[Path, Path]] = []
        self.renamed: list[Path] = []
        self.created_dirs: list[Path] = []
        self._checked_dirs: set[Path] = {dest_dir}

    def final_path(self, name: str) -> Path:
        return self.dest_dir.joinpath(*name.split("/"))

    def open(self, name: str) -> BinaryIO:
        final = self.final_path(name)
        self._make_parents(name)
        if final.is_dir() and not final.is_symlink():
            raise DestinationBlockedError(f"{final}: a directory is in the way of member {name}")
        part = final.with_name(f"{final.name}.part-{secrets.token_hex(6)}")
        fobj = WriteBehindFile(open(part, "xb"), window=None if self.fsync else 0)  # noqa: SIM115 - closed by the caller
        self.parts.append((part, final))
        return fobj  # type: ignore[return-value]

    def finish(self, fobj: BinaryIO) -> None:
        fobj.sync(fsync=self.fsync)  # type: ignore[attr-defined]

    def _make_parents(self, name: str) -> None:
        """Create the member's parent directories, refusing to write through a symlink."""
        current = self.dest_dir
        for part in name.split("/")[:-1]:
            current = current / part
            if current in self._checked_dirs:
                continue
            try:
                os.mkdir(current)
            except FileExistsError:
                mode = os.lstat(current).st_mode
                if stat.S_ISLNK(mode):
                    raise DestinationBlockedError(
                        f"{current}: is a symbolic link; refusing to write {name} through it"
                    ) from None
                if not stat.S_ISDIR(mode):
                    raise DestinationBlockedError(
                        f"{current}: not a directory, in the way of {name}"
                    ) from None
            else:
                self.created_dirs.append(current)
            self._checked_dirs.add(current)

    def commit(self) -> None:
        dirs: set[Path] = {d.parent for d in self.created_dirs}
        for part, final in self.parts:
            existed = os.path.lexists(final)
            os.replace(part, final)
            if not existed:  # a replaced file's old bytes are gone: its new ones stay
                self.renamed.append(final)
            dirs.add(final.parent)
        if self.fsync:
            for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
                _fsync_dir(d)

    def rollback(self) -> None:
        """Remove the temporary files, the files committed under names that were free and the
        directories made. A file that replaced one already there keeps its new, verified bytes:
        the old ones went with the rename, and unlinking would leave nothing at a name that
        may be a recorded copy."""
        for part, _ in self.parts:
            part.unlink(missing_ok=True)
        for final in self.renamed:
            final.unlink(missing_ok=True)
        for d in reversed(self.created_dirs):
            with suppress(OSError):
                d.rmdir()
