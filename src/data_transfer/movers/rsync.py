"""rsync over ssh: resumable copies to or from a disk location on another host.

How a copy goes (verify-then-commit, as for every mover):

1. one ssh call creates the destination directory and looks for an existing destination
   (identical content = success without copying; different content = DestinationExistsError
   unless ``overwrite``);
2. rsync writes ``<destination>.part-rsync``. The name is fixed, not random, so that an
   interrupted copy resumes: ``--partial --partial-dir=.rsync-partial`` keeps the bytes already
   sent and the next attempt sends only the rest. ``--inplace`` is never used, so the
   temporary name holds a complete file only when rsync finished;
3. the checksum is computed **at the destination** (``sha256sum``/``xxh128sum``/... over
   ssh, or hashlib when the destination is local) and compared with the expected one;
4. only then the file is fsynced, renamed to its final name and the directory fsynced (one
   more ssh call). A mismatch deletes the temporary file and its partial data.

The cost of using rsync, stated honestly: rsync does not hand us the byte stream, so step 3 is
one extra read of the file **at the destination** (the source is read once, by rsync). The
local and S3 movers hash while streaming and have no such read; use them where they fit. rsync
checks every file it transfers with its own whole-file checksum as well, so the extra read is
a verification against *our* checksum, not a repair of rsync's.

Both ends local (no ``host``) also works, without ssh: the unit tests use it. Both ends remote
does not (rsync cannot copy between two remote hosts): run the worker on one of them.

One copy makes four ssh sessions (prepare, rsync, checksum, commit). They share one
connection: ssh's connection multiplexing (``ControlMaster=auto``, ``ControlPersist``) keeps a
master connection per host, user, port and ssh configuration open for ``control_persist``
seconds (default 60; 0 opens a new connection for every session). Across a link with a
quarter-second round trip each new connection costs a second or more of handshakes, so a copy
saves several seconds, and a deletion pass over many files far more. The master's socket lives
in a folder only this user can open (``control_dir``, default ``<tmp>/ccat-ssh-<uid>``); its
name carries a hash of the ssh options, so a route with another key or known-hosts file never
borrows a connection opened with different ones.

The ssh helpers (:class:`SshConfig`, :class:`RemoteShell`, :func:`classify_failure`) and the
copy/verify/commit skeleton (:class:`SshFileMover`) are shared with the bbcp mover.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
import shlex
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..checksums import ALGORITHMS, hash_file, new_hasher
from ..errors import (
    ChecksumMismatchError,
    ConfigurationError,
    DestinationExistsError,
    NetworkError,
    StorageError,
    TransferSystemError,
)
from ..locations import LocationRef
from .base import CopyResult, Progress
from .local import (
    LocalMover,
    ProgressTicker,
    fsync_dir,
    make_parents,
    normalize_checksum,
    storage_error,
)

log = logging.getLogger("data_transfer.movers.ssh")

#: Suffix of the temporary name rsync and bbcp write to (fixed so a retry resumes).
PART_SUFFIX = ".part-rsync"

#: Largest piece of a tool's output kept for the transfer log.
MAX_OUTPUT = 64 * 1024

# Exit code a remote script uses to say "the destination exists" / "no such file".
_RC_EXISTS = 17
_RC_MISSING = 3

#: Remote hash command per algorithm, and the Debian package that has it (the playbooks install
#: xxhash on every site host).
_HASH_COMMANDS = {
    "sha256": ("sha256sum", "coreutils"),
    "blake2b": ("b2sum", "coreutils"),
    "md5": ("md5sum", "coreutils"),
    "xxh3_128": ("xxh128sum", "xxhash"),
}

_ADLER32_PY = (
    "import sys, zlib\n"
    "v = 1\n"
    "with open(sys.argv[1], 'rb') as f:\n"
    "    for b in iter(lambda: f.read(1 << 20), b''):\n"
    "        v = zlib.adler32(b, v)\n"
    "print('%08x  %s' % (v & 0xffffffff, sys.argv[1]))\n"
)


# -- ssh -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SshConfig:
    """How to reach a host with ssh, from a route's options.

    Options read: ``identity_file``, ``known_hosts_file``, ``strict_host_key_checking``
    (``yes``, the default, ``accept-new`` or ``no``), ``connect_timeout`` (s, default 30),
    ``server_alive_interval`` (s, default 15), ``ssh_command`` (default ``ssh``),
    ``ssh_options`` (extra ``-o`` values, e.g. ``["Ciphers=aes128-gcm@openssh.com"]``; they
    come before the mover's own connection-sharing options, so ``ControlMaster=no`` there
    wins), ``ssh_config_file`` (``-F``; ``/dev/null`` ignores the user's ~/.ssh/config),
    ``control_persist`` (s, default 60; 0: no connection sharing) and ``control_dir`` (the
    folder for the shared connections' sockets; it must be this user's, mode 0700).
    """

    ssh_command: str = "ssh"
    identity_file: str | None = None
    known_hosts_file: str | None = None
    strict_host_key_checking: str = "yes"
    connect_timeout: int = 30
    server_alive_interval: int = 15
    extra_options: tuple[str, ...] = field(default_factory=tuple)
    config_file: str | None = None
    control_persist: int = 60
    control_dir: str | None = None

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> SshConfig:
        """Build from a mover's options dict (unknown keys are ignored)."""
        shkc = str(options.get("strict_host_key_checking", "yes"))
        if shkc not in ("yes", "no", "accept-new"):
            raise ConfigurationError(
                f"strict_host_key_checking must be yes, no or accept-new, not {shkc!r}"
            )
        extra = options.get("ssh_options") or ()
        if isinstance(extra, str):
            extra = (extra,)
        try:
            persist = int(options.get("control_persist", 60))
        except (TypeError, ValueError):
            persist = -1
        if persist < 0:
            raise ConfigurationError(
                "control_persist must be a whole number of seconds >= 0 (0: no connection"
                f" sharing), not {options.get('control_persist')!r}"
            )
        return cls(
            ssh_command=str(options.get("ssh_command", "ssh")),
            identity_file=_opt_str(options.get("identity_file")),
            known_hosts_file=_opt_str(options.get("known_hosts_file")),
            strict_host_key_checking=shkc,
            connect_timeout=int(options.get("connect_timeout", 30)),
            server_alive_interval=int(options.get("server_alive_interval", 15)),
            extra_options=tuple(str(o) for o in extra),
            config_file=_opt_str(options.get("ssh_config_file")),
            control_persist=persist,
            control_dir=_opt_str(options.get("control_dir")),
        )

    def base_args(self, port: int | None = None, *, share: bool = True) -> list[str]:
        """``ssh`` and its options, without user and host (what ``rsync -e`` takes).

        ``share=False`` leaves out connection sharing (bbcp's own ssh start command, whose
        ``%`` tokens would clash with the socket name's ``%C``).
        """
        args = shlex.split(self.ssh_command)
        if self.config_file:
            args += ["-F", self.config_file]
        if port:
            args += ["-p", str(port)]
        args += [
            "-o",
            "BatchMode=yes",
            "-o",
            f"StrictHostKeyChecking={self.strict_host_key_checking}",
            "-o",
            f"ConnectTimeout={self.connect_timeout}",
            "-o",
            f"ServerAliveInterval={self.server_alive_interval}",
            "-o",
            "ServerAliveCountMax=4",
        ]
        if self.known_hosts_file:
            args += ["-o", f"UserKnownHostsFile={self.known_hosts_file}"]
        if self.identity_file:
            args += ["-i", self.identity_file, "-o", "IdentitiesOnly=yes"]
        for opt in self.extra_options:
            args += ["-o", opt]
        path = self.control_path() if share else None
        if path:
            args += [
                "-o",
                "ControlMaster=auto",
                "-o",
                f"ControlPath={path}",
                "-o",
                f"ControlPersist={self.control_persist}",
            ]
        return args

    @functools.cached_property
    def _share_key(self) -> str:
        """A hash of the options that decide who we log in as and whom we trust: a connection
        opened with other ones is never shared."""
        who = (
            self.ssh_command,
            self.identity_file,
            self.known_hosts_file,
            self.strict_host_key_checking,
            self.config_file,
            self.extra_options,
        )
        return hashlib.sha256(repr(who).encode()).hexdigest()[:12]

    def control_path(self) -> str | None:
        """The socket name of the shared connection (``%C``: ssh's hash of local host, host,
        port and user), or None when sharing is off or its folder is not safe to use.

        The folder is made mode 0700; one that is not this user's or that others can open is
        refused: with ``control_dir`` set, as a ConfigurationError naming it; for the default
        folder, with a warning, and each session then opens its own connection.
        """
        if self.control_persist <= 0:
            return None
        folder = self.control_dir or os.path.join(tempfile.gettempdir(), f"ccat-ssh-{os.getuid()}")
        problem = _private_folder(folder)
        if problem is None:
            path = os.path.join(folder, f"{self._share_key}-%C")
            # a unix socket name holds 107 bytes; ssh adds 17 for its temporary name, %C is 40
            if len(path.encode()) - 2 + 40 + 17 <= 107:
                return path
            problem = "its path is too long for a unix socket name"
        if self.control_dir:
            raise ConfigurationError(f"control_dir {folder}: {problem}")
        _warn_once(f"ssh connection sharing is off: {folder}: {problem}")
        return None

    def argv(self, loc: LocationRef, remote_command: str) -> list[str]:
        """Full argv running ``remote_command`` (a shell string) on ``loc``'s host."""
        host = _require_host(loc)
        args = self.base_args(loc.ssh_port)
        if loc.ssh_user:
            args += ["-l", loc.ssh_user]
        return [*args, "--", host, remote_command]


def _opt_str(value: Any) -> str | None:
    return None if value in (None, "") else str(value)


def _private_folder(folder: str) -> str | None:
    """Make ``folder`` (mode 0700) if missing; what is wrong with it, or None if it is ours
    and closed to others."""
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except FileExistsError:  # something else than a folder: said below
        pass
    except OSError as exc:
        return f"cannot be made ({exc.strerror})"
    try:
        st = os.lstat(folder)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != os.getuid():
        return f"belongs to uid {st.st_uid}, not to this user ({os.getuid()})"
    if st.st_mode & 0o077:
        return f"others can open it (mode {stat.S_IMODE(st.st_mode):o}; it must be 700)"
    return None


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def _require_host(loc: LocationRef) -> str:
    if not loc.host:
        raise ConfigurationError(f"location {loc.label} has no host")
    return loc.host


def user_at_host(loc: LocationRef) -> str:
    """``user@host`` (or ``host``) of a remote disk location."""
    host = _require_host(loc)
    return f"{loc.ssh_user}@{host}" if loc.ssh_user else host


# -- failures ------------------------------------------------------------------------------------

AUTH_PATTERNS = (
    "permission denied (publickey",
    "permission denied, please try again",
    "host key verification failed",
    "remote host identification has changed",
    "no matching host key type",
    "too many authentication failures",
)
_NETWORK_PATTERNS = (
    "connection refused",
    "connection timed out",
    "operation timed out",
    "no route to host",
    "network is unreachable",
    "connection reset",
    "broken pipe",
    "connection closed by",
    "connection unexpectedly closed",
    "lost connection",
    "could not resolve hostname",
    "temporary failure in name resolution",
    "kex_exchange_identification",
    "timeout waiting for daemon",
    "timed out",
)
_MISSING_PATTERNS = ("no such file or directory",)
_SPACE_PATTERNS = ("no space left on device", "disk quota exceeded", "write failed")
_DENIED_PATTERNS = ("permission denied", "read-only file system", "operation not permitted")

#: rsync exit codes that mean the link failed (see rsync(1), EXIT VALUES).
RSYNC_NETWORK_CODES = {5, 10, 12, 30, 35, 255}


def classify_failure(
    tool: str,
    returncode: int,
    stderr: str,
    where: str,
    *,
    network_codes: Sequence[int] = (255,),
    network_error: type[NetworkError] = NetworkError,
) -> TransferSystemError:
    """Turn a failed ssh/rsync/bbcp run into the exception a person can act on.

    Connection trouble (refused, timed out, reset, dropped) is a retryable
    :class:`NetworkError` (or ``network_error``); ssh authentication and host-key failures,
    missing files and permission problems are non-retryable :class:`StorageError`; a full
    disk is a retryable StorageError (space may be freed).
    """
    text = stderr.strip()
    low = text.lower()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    tail = " | ".join(lines[-4:]) if lines else "(no output)"
    msg = f"{tool} failed for {where} (exit {returncode}): {tail}"
    if any(p in low for p in AUTH_PATTERNS):
        return StorageError(
            f"{msg} -- ssh authentication or host key check failed: check identity_file, "
            "known_hosts_file and the remote authorized_keys",
            retryable=False,
        )
    if any(p in low for p in _SPACE_PATTERNS):
        return StorageError(msg)
    if any(p in low for p in _NETWORK_PATTERNS) or returncode in network_codes:
        return network_error(msg)
    if any(p in low for p in _MISSING_PATTERNS):
        return StorageError(msg, retryable=False)
    if any(p in low for p in _DENIED_PATTERNS):
        return StorageError(msg, retryable=False)
    return StorageError(msg)


# -- remote shell --------------------------------------------------------------------------------


class RemoteShell:
    """Runs small shell scripts on a location's host over ssh, mapping failures to errors."""

    def __init__(self, ssh: SshConfig, *, timeout: float = 120.0) -> None:
        self.ssh = ssh
        self.timeout = timeout

    def run(
        self,
        loc: LocationRef,
        script: str,
        *,
        what: str,
        ok_codes: Sequence[int] = (0,),
        no_timeout: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``script`` with ``sh -c`` on the host; raise on an exit code not in ``ok_codes``.

        Limited to ``self.timeout`` seconds unless ``no_timeout`` (hashing a large file).
        """
        remote = "env LC_ALL=C sh -c " + shlex.quote(script)
        argv = self.ssh.argv(loc, remote)
        where = f"{what} on {user_at_host(loc)} ({loc.label})"
        limit = None if no_timeout else self.timeout
        try:
            proc = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=limit,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise NetworkError(f"ssh timed out after {limit} s: {where}") from None
        except FileNotFoundError as exc:
            raise ConfigurationError(f"cannot run {argv[0]!r}: {exc}") from exc
        if proc.returncode not in ok_codes:
            raise classify_failure("ssh", proc.returncode, proc.stderr, where)
        return proc

    # The operations every ssh-based mover needs, on absolute remote paths.

    def size(self, loc: LocationRef, path: str) -> int | None:
        """Size of a remote file, None if it does not exist."""
        q = shlex.quote(path)
        script = f"if [ -e {q} ]; then stat -c %s -- {q}; else echo MISSING; fi"
        out = self.run(loc, script, what=f"stat {path}").stdout.strip()
        if out == "MISSING":
            return None
        return _parse_int(out, f"stat {path}")

    def prepare(self, loc: LocationRef, path: str) -> int | None:
        """``mkdir -p`` the parent of ``path``; return the size of ``path`` if it exists."""
        q = shlex.quote(path)
        parent = shlex.quote(str(PurePosixPath(path).parent))
        script = (
            f"mkdir -p -- {parent} || exit 1; "
            f"if [ -d {q} ]; then echo DIR; elif [ -e {q} ]; then stat -c %s -- {q}; "
            "else echo MISSING; fi"
        )
        out = self.run(loc, script, what=f"prepare {path}").stdout.strip()
        if out == "MISSING":
            return None
        if out == "DIR":
            raise DestinationExistsError(f"{loc.label}:{path} is a directory", retryable=False)
        return _parse_int(out, f"stat {path}")

    def checksum(self, loc: LocationRef, path: str, algorithm: str) -> tuple[str, int]:
        """``(hexdigest, size)`` of a remote file, hashed on the remote host (one read there)."""
        algo = algorithm.lower()
        if algo not in ALGORITHMS:
            new_hasher(algo)  # raises ConfigurationError naming the known ones
        q = shlex.quote(path)
        if algo in _HASH_COMMANDS:
            cmd, package = _HASH_COMMANDS[algo]
            hash_cmd = (
                f"{{ command -v {cmd} >/dev/null || {{ echo '{cmd} is not installed on this "
                f"host (Debian package {package})' >&2; exit 127; }}; }} "
                f"&& {cmd} -- {q}"
            )
        else:
            hash_cmd = f"python3 -c {shlex.quote(_ADLER32_PY)} {q}"
        script = (
            f"[ -f {q} ] || {{ echo 'no such file' >&2; exit {_RC_MISSING}; }}; "
            f"stat -c %s -- {q} && {hash_cmd}"
        )
        proc = self.run(
            loc, script, what=f"{algo} of {path}", ok_codes=(0, _RC_MISSING), no_timeout=True
        )
        if proc.returncode == _RC_MISSING:
            raise StorageError(f"{loc.label}:{path}: no such file", retryable=False)
        lines = proc.stdout.split("\n")
        size = _parse_int(lines[0].strip(), f"stat {path}")
        digest = lines[1].split()[0].lower() if len(lines) > 1 and lines[1].split() else ""
        if not re.fullmatch(r"[0-9a-f]+", digest):
            raise StorageError(f"{algo} of {loc.label}:{path}: unexpected output {proc.stdout!r}")
        return digest, size

    def delete(self, loc: LocationRef, path: str) -> bool:
        """Remove a remote file; False when it was absent."""
        q = shlex.quote(path)
        parent = shlex.quote(str(PurePosixPath(path).parent))
        script = (
            f"if [ -d {q} ]; then echo DIR; elif [ -e {q} ] || [ -L {q} ]; then "
            f"rm -f -- {q} && {{ sync -- {parent} 2>/dev/null; echo DELETED; }}; "
            "else echo ABSENT; fi"
        )
        out = self.run(loc, script, what=f"delete {path}").stdout.strip()
        if out == "DIR":
            raise StorageError(
                f"{loc.label}:{path} is a directory; movers delete single files", retryable=False
            )
        return out == "DELETED"

    def free_space(self, loc: LocationRef, root: str) -> int:
        """Free bytes on the filesystem holding ``root`` (or its nearest existing ancestor)."""
        script = (
            f"p={shlex.quote(root)}; "
            'while [ ! -e "$p" ]; do p=$(dirname -- "$p"); done; '
            'df -PB1 -- "$p"'
        )
        out = self.run(loc, script, what=f"df {root}").stdout.strip().splitlines()
        try:
            return int(out[-1].split()[3])
        except (IndexError, ValueError):
            raise StorageError(f"df on {loc.label}: unexpected output {out!r}") from None

    def commit(self, loc: LocationRef, tmp: str, target: str, *, overwrite: bool) -> None:
        """fsync ``tmp``, rename it to ``target`` (refusing to replace unless ``overwrite``),
        fsync the directory."""
        qt, qd = shlex.quote(tmp), shlex.quote(target)
        parent = shlex.quote(str(PurePosixPath(target).parent))
        guard = "" if overwrite else f"if [ -e {qd} ]; then exit {_RC_EXISTS}; fi; "
        script = (
            f"sync -- {qt} || exit 1; {guard}"
            f"mv -f -- {qt} {qd} || exit 1; sync -- {parent} 2>/dev/null; exit 0"
        )
        proc = self.run(loc, script, what=f"commit {target}", ok_codes=(0, _RC_EXISTS))
        if proc.returncode == _RC_EXISTS:
            raise DestinationExistsError(
                f"{loc.label}:{target} appeared while the copy ran; not replaced"
            )

    def discard(self, loc: LocationRef, paths: Sequence[str]) -> None:
        """Remove temporary files (errors ignored: this runs on a failure path)."""
        quoted = " ".join(shlex.quote(p) for p in paths)
        with contextlib.suppress(TransferSystemError):
            self.run(loc, f"rm -f -- {quoted}", what="discard temporary files")


def _parse_int(text: str, what: str) -> int:
    try:
        return int(text.split()[0])
    except (IndexError, ValueError):
        raise StorageError(f"{what}: unexpected output {text!r}") from None


# -- running a tool with live output --------------------------------------------------------------


def run_tool(
    argv: Sequence[str],
    *,
    on_line: Callable[[str], None] | None = None,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[int, str, str]:
    """Run a transfer tool; feed every stdout/stderr line (split on CR and LF) to ``on_line``.

    Returns ``(returncode, stdout, stderr)``, each output capped to the last
    :data:`MAX_OUTPUT` characters. Raises :class:`NetworkError` when ``timeout`` expires.
    """
    try:
        proc = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
        )
    except FileNotFoundError as exc:
        raise ConfigurationError(f"cannot run {argv[0]!r}: {exc}") from exc
    outputs: dict[str, list[str]] = {"out": [], "err": []}
    lock = threading.Lock()

    def pump(stream: Any, key: str) -> None:
        pending = b""
        while True:
            chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
            if not chunk:
                break
            pending += chunk
            parts = re.split(rb"[\r\n]", pending)
            pending = parts.pop()
            for raw in parts:
                _emit(raw, key)
        if pending:
            _emit(pending, key)

    def _emit(raw: bytes, key: str) -> None:
        line = raw.decode("utf-8", "replace")
        if not line.strip():
            return
        with lock:
            outputs[key].append(line)
            if on_line is not None:
                with contextlib.suppress(Exception):
                    on_line(line)

    threads = [
        threading.Thread(target=pump, args=(proc.stdout, "out"), daemon=True),
        threading.Thread(target=pump, args=(proc.stderr, "err"), daemon=True),
    ]
    for t in threads:
        t.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        for t in threads:
            t.join(5)
        raise NetworkError(f"{argv[0]} did not finish within {timeout:.0f} s; killed") from None
    for t in threads:
        t.join()
    out = "\n".join(outputs["out"])[-MAX_OUTPUT:]
    err = "\n".join(outputs["err"])[-MAX_OUTPUT:]
    return rc, out, err


# -- the movers -----------------------------------------------------------------------------------


class SshFileMover:
    """What every mover built on an external copy tool over ssh shares (rsync, bbcp).

    The tool writes ``<destination><part_suffix>``; this class prepares the destination,
    recognises an identical existing destination, verifies the checksum at the destination,
    commits (fsync + rename + fsync directory, over ssh for a remote destination) and
    implements checksum/size/delete/free_space locally or over ssh. Subclasses implement
    :meth:`_transfer`.
    """

    name = "ssh"
    part_suffix = ".part"

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        opts = dict(options or {})
        self.options = opts
        self.ssh = SshConfig.from_options(opts)
        self.shell = RemoteShell(self.ssh, timeout=float(opts.get("ssh_timeout", 120)))
        self.overwrite = bool(opts.get("overwrite", False))
        self.extra_args = [str(a) for a in opts.get("extra_args") or ()]
        self._local = LocalMover({"overwrite": self.overwrite})

    # -- copy template --------------------------------------------------------------------------

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

        The tool writes a temporary name; the checksum is then computed at the destination
        (one read there, see the module docstring) and compared before the rename.
        ``metadata`` is ignored.
        """
        new_hasher(algorithm)
        expected = normalize_checksum(expected_checksum, algorithm)
        _check_disk(src, self.name)
        _check_disk(dst, self.name)
        self._check_ends(src, dst)
        start = time.monotonic()
        src_abs = str(src.path(src_path))
        dst_abs = str(dst.path(dst_path))
        tmp_abs = dst_abs + self.part_suffix
        where = f"{src.label}:{src_path}"

        # 1. destination directory + existing destination
        if dst.is_remote:
            existing = self.shell.prepare(dst, dst_abs)
        else:
            make_parents(Path(dst_abs).parent)
            existing = self._local.size(dst, dst_path)
        if existing is not None:
            done = self._existing(src, src_path, dst, dst_path, existing, algorithm, expected)
            if done is not None:
                return CopyResult(
                    bytes=existing,
                    checksum=done,
                    algorithm=algorithm,
                    seconds=time.monotonic() - start,
                    output=f"{dst.label}:{dst_path} already holds identical content",
                    extra={"skipped": True},
                )

        # 2. the tool writes the temporary name
        ticker = ProgressTicker(progress)
        output, extra = self._transfer(
            src, src_path, src_abs, dst, dst_path, tmp_abs, ticker if progress else None
        )

        # 3. verify at the destination
        if dst.is_remote:
            digest, nbytes = self.shell.checksum(dst, tmp_abs, algorithm)
        else:
            try:
                digest, nbytes = hash_file(tmp_abs, algorithm)
            except OSError as exc:
                raise storage_error(exc, f"reading {tmp_abs} at {dst.label}") from exc
        if expected is not None and digest != expected:
            self._discard(dst, tmp_abs)
            raise ChecksumMismatchError(where, expected, digest, algorithm)

        # 4. commit
        if dst.is_remote:
            self.shell.commit(dst, tmp_abs, dst_abs, overwrite=self.overwrite)
        else:
            _commit_local(Path(tmp_abs), Path(dst_abs), overwrite=self.overwrite)
        self._after_commit(dst, dst_abs)
        ticker(nbytes, final=True)
        return CopyResult(
            bytes=nbytes,
            checksum=digest,
            algorithm=algorithm,
            seconds=time.monotonic() - start,
            output=output,
            extra={"verified_at": "destination", **extra},
        )

    def _check_ends(self, src: LocationRef, dst: LocationRef) -> None:
        """Refuse combinations the tool cannot do (override)."""

    def _transfer(
        self,
        src: LocationRef,
        src_path: str,
        src_abs: str,
        dst: LocationRef,
        dst_path: str,
        tmp_abs: str,
        ticker: ProgressTicker | None,
    ) -> tuple[str, dict[str, Any]]:
        """Run the tool copying ``src_abs`` to ``tmp_abs``; return ``(output, extra)``."""
        raise NotImplementedError

    def _partial_paths(self, tmp_abs: str) -> list[str]:
        """Files the tool keeps for resuming (deleted when the copy turned out bad)."""
        return []

    def _after_commit(self, dst: LocationRef, dst_abs: str) -> None:
        """Tidy up after a successful commit (override)."""

    def _existing(
        self,
        src: LocationRef,
        src_path: str,
        dst: LocationRef,
        dst_path: str,
        dst_size: int,
        algorithm: str,
        expected: str | None,
    ) -> str | None:
        """Checksum if the existing destination is identical; None to copy over it
        (``overwrite``); DestinationExistsError otherwise."""
        src_size = self.size(src, src_path)
        if src_size is None:
            raise StorageError(f"{src.label}:{src_path}: no such file", retryable=False)
        if src_size != dst_size:
            why = f"{dst_size} bytes, source has {src_size}"
        else:
            have = self.checksum(dst, dst_path, algorithm=algorithm)
            want = (
                expected
                if expected is not None
                else self.checksum(src, src_path, algorithm=algorithm)
            )
            if have == want:
                return have
            why = f"{algorithm} {have}, expected {want}"
        if self.overwrite:
            return None
        raise DestinationExistsError(
            f"{dst.label}:{dst_path} already exists with different content ({why})"
        )

    def _discard(self, dst: LocationRef, tmp_abs: str) -> None:
        paths = [tmp_abs, *self._partial_paths(tmp_abs)]
        if dst.is_remote:
            self.shell.discard(dst, paths)
        else:
            for p in paths:
                with contextlib.suppress(OSError):
                    os.unlink(p)

    # -- management -----------------------------------------------------------------------------

    def checksum(self, loc: LocationRef, path: str, *, algorithm: str = "sha256") -> str:
        """Checksum of ``path``, computed on the host that holds it."""
        _check_disk(loc, self.name)
        if loc.is_remote:
            return self.shell.checksum(loc, str(loc.path(path)), algorithm)[0]
        return self._local.checksum(loc, path, algorithm=algorithm)

    def size(self, loc: LocationRef, path: str) -> int | None:
        """Size of ``path`` (``stat`` over ssh for a remote location), None if absent."""
        _check_disk(loc, self.name)
        if loc.is_remote:
            return self.shell.size(loc, str(loc.path(path)))
        return self._local.size(loc, path)

    def delete(self, loc: LocationRef, path: str) -> bool:
        """Delete ``path`` (``rm -f`` over ssh); False when it was absent."""
        _check_disk(loc, self.name)
        if loc.is_remote:
            return self.shell.delete(loc, str(loc.path(path)))
        return self._local.delete(loc, path)

    def free_space(self, loc: LocationRef) -> int | None:
        """Free bytes at the location (``df -PB1`` over ssh for a remote one)."""
        _check_disk(loc, self.name)
        if loc.is_remote:
            if not loc.root_path:
                raise ConfigurationError(f"location {loc.label} has no root_path")
            return self.shell.free_space(loc, loc.root_path)
        return self._local.free_space(loc)


_PROGRESS2 = re.compile(r"^\s*([\d,]+)\s+\d+%\s+\S+/s")


class RsyncMover(SshFileMover):
    """Resumable copies with rsync over ssh, verified at the destination before the rename.

    Options (all optional): the ssh ones of :class:`SshConfig`; ``timeout`` (rsync I/O
    timeout, s, default 600); ``bwlimit`` (rsync ``--bwlimit``, e.g. ``"50m"`` or KiB/s);
    ``rsync_path`` (local binary, default ``rsync``); ``remote_rsync_path``
    (``--rsync-path``); ``partial_dir`` (default ``.rsync-partial``); ``overwrite`` (bool);
    ``extra_args`` (list appended to the rsync command); ``ssh_timeout`` (s, for the small
    ssh commands, default 120; hashing has no limit).
    """

    name = "rsync"
    part_suffix = PART_SUFFIX

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        opts = self.options
        self.timeout = int(opts.get("timeout", 600))
        self.bwlimit = _opt_str(opts.get("bwlimit"))
        self.rsync_path = str(opts.get("rsync_path", "rsync"))
        self.remote_rsync_path = _opt_str(opts.get("remote_rsync_path"))
        self.partial_dir = str(opts.get("partial_dir", ".rsync-partial"))
        if "/" in self.partial_dir or self.partial_dir in ("", ".", ".."):
            raise ConfigurationError(
                f"partial_dir must be a plain directory name, not {self.partial_dir!r}"
            )

    def build_command(
        self, src: LocationRef, src_abs: str, dst: LocationRef, dst_abs: str, *, progress: bool
    ) -> list[str]:
        """The rsync argv copying ``src_abs`` at ``src`` to ``dst_abs`` at ``dst``."""
        argv = [
            *shlex.split(self.rsync_path),
            "--times",
            "--partial",
            f"--partial-dir={self.partial_dir}",
            f"--timeout={self.timeout}",
        ]
        if progress:
            argv += ["--outbuf=L", "--info=progress2"]
        if self.bwlimit:
            argv.append(f"--bwlimit={self.bwlimit}")
        remote = src if src.is_remote else dst if dst.is_remote else None
        if remote is not None:
            argv += ["-e", shlex.join(self.ssh.base_args(remote.ssh_port))]
            if self.remote_rsync_path:
                argv.append(f"--rsync-path={self.remote_rsync_path}")
        argv += self.extra_args
        argv += ["--", file_spec(src, src_abs), file_spec(dst, dst_abs)]
        return argv

    def _check_ends(self, src: LocationRef, dst: LocationRef) -> None:
        if src.is_remote and dst.is_remote:
            raise ConfigurationError(
                f"rsync cannot copy between two remote hosts ({src.label} on {src.host} -> "
                f"{dst.label} on {dst.host}); run the worker on one of them"
            )

    def _transfer(
        self,
        src: LocationRef,
        src_path: str,
        src_abs: str,
        dst: LocationRef,
        dst_path: str,
        tmp_abs: str,
        ticker: ProgressTicker | None,
    ) -> tuple[str, dict[str, Any]]:
        argv = self.build_command(src, src_abs, dst, tmp_abs, progress=ticker is not None)

        def on_line(line: str) -> None:
            m = _PROGRESS2.match(line)
            if m and ticker is not None:
                ticker(int(m.group(1).replace(",", "")))

        rc, out, err = run_tool(argv, on_line=on_line if ticker is not None else None)
        output = f"$ {shlex.join(argv)}\n{_strip_progress(out)}\n{err}".strip()
        if rc != 0:
            raise classify_failure(
                "rsync",
                rc,
                err,
                f"{src.label}:{src_path} -> {dst.label}:{dst_path}",
                network_codes=tuple(RSYNC_NETWORK_CODES),
            )
        return output, {"command": argv}

    def _partial_paths(self, tmp_abs: str) -> list[str]:
        p = PurePosixPath(tmp_abs)
        return [str(p.parent / self.partial_dir / p.name)]

    def _after_commit(self, dst: LocationRef, dst_abs: str) -> None:
        """Remove an empty partial directory (rsync leaves it when a copy was resumed)."""
        pdir = str(PurePosixPath(dst_abs).parent / self.partial_dir)
        if dst.is_remote:
            with contextlib.suppress(TransferSystemError):
                self.shell.run(
                    dst, f"rmdir -- {shlex.quote(pdir)} 2>/dev/null; exit 0", what="tidy"
                )
        else:
            with contextlib.suppress(OSError):
                os.rmdir(pdir)


def _check_disk(loc: LocationRef, mover: str) -> None:
    if loc.storage_type != "disk":
        raise ConfigurationError(
            f"the {mover} mover handles disk locations; {loc.label} is {loc.storage_type}"
        )


def file_spec(loc: LocationRef, abs_path: str) -> str:
    """rsync/bbcp file spec: ``user@host:/path`` for a remote location, the path otherwise."""
    if loc.is_remote:
        return f"{user_at_host(loc)}:{abs_path}"
    return abs_path


def _strip_progress(text: str) -> str:
    lines = text.splitlines()
    kept = [ln for ln in lines if not _PROGRESS2.match(ln)]
    last = [ln for ln in lines if _PROGRESS2.match(ln)][-1:]
    return "\n".join(kept + last)


def _commit_local(tmp: Path, target: Path, *, overwrite: bool) -> None:
    """fsync a file written by an external tool, rename it into place, fsync the directory."""
    try:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if not overwrite and target.exists():
            raise DestinationExistsError(f"{target} appeared while the copy ran; not replaced")
        os.replace(tmp, target)
    except OSError as exc:
        raise storage_error(exc, f"committing {target}") from exc
    fsync_dir(target.parent)
