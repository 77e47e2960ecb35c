"""bbcp: the long-haul mover (telescope -> Cologne), multi-stream TCP started over ssh.

bbcp is not packaged for Debian and cannot be installed on the development machines, so this
module is in two parts:

* :func:`make_bbcp_command` builds the command line from a route's options and
  :func:`parse_bbcp_output` reads bbcp's progress, summary and error lines. Both are pure and
  unit-tested against output written from bbcp's sources and manual (SLAC, A. Hanushevsky);
* :class:`BbcpMover` runs the command where ``bbcp`` is on PATH (``shutil.which``) and
  otherwise raises a ConfigurationError naming the missing program.

Flags used (bbcp's own names): ``-s`` streams, ``-w`` window (``=`` prefix disables
autotuning), ``-P`` progress interval (s), ``-z`` reverse connection (target connects to
source, for firewalls), ``-Z first:last`` port range (bbcp >= 14), ``-S``/``-T`` the commands
that start bbcp on the source/target host (built here from the same ssh settings as rsync, so
identity file, port and known_hosts apply), ``-x`` rate limit, ``-t`` time limit, ``-B`` I/O
buffer, ``-c`` compression, ``-a``/``-k`` append-mode restart and keep-on-failure (resume),
``-f`` force, ``-n`` no DNS, ``-v`` per-file rate summary, ``-E md5|a32|c32`` bbcp's own
transmission checksum. bbcp has **no sha256** (``-E`` knows ``a32``, ``c32`` and ``md5``), so
it cannot verify our checksum itself.

Verification is therefore the rsync mover's: bbcp writes ``<destination>.part-bbcp`` (a fixed
name, so ``-a`` can resume it), then the checksum is computed at the destination host
(``sha256sum`` over ssh: one extra read there, the price of a tool that does not hand us its
byte stream), compared, and the file is fsynced and renamed over ssh. A mismatch deletes it.
"""

from __future__ import annotations

import re
import shlex
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ccat_ops_db.route_options import (
    BBCP_CHECKSUMS,
    PORT_RANGE_PATTERN,
    SIZE_PATTERN,
    WINDOW_PATTERN,
)

from ..errors import (
    BBCPError,
    ConfigurationError,
    NetworkError,
    StorageError,
    TransferSystemError,
)
from ..locations import LocationRef
from .local import ProgressTicker
from .rsync import (
    AUTH_PATTERNS,
    SshConfig,
    SshFileMover,
    classify_failure,
    file_spec,
    run_tool,
)

__all__ = [
    "BBCP_CHECKSUMS",
    "BbcpFileReport",
    "BbcpMover",
    "BbcpProgress",
    "BbcpReport",
    "bbcp_failure",
    "make_bbcp_command",
    "parse_bbcp_output",
    "parse_progress_line",
    "parse_rate",
]


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "E": 1 << 50}

# "bbcp: 260114 03:12:45  42% done; 112.4 MB/s" (-P), "..., avg 98.0 MB/s" (-P with -v),
# "bbcp: At 140506 17:33:18 copy 20% complete; 89998.2 KB/s" (newer releases).
_PROGRESS_RE = re.compile(
    r"^bbcp:\s+(?:At\s+)?(?P<at>\d{6}\s+\d{2}:\d{2}:\d{2})?\s*(?:copy\s+)?"
    r"(?P<pct>\d+%|not)\s+(?:done|complete);\s+"
    r"(?P<rate>[\d.]+)\s*(?P<unit>[KMGTE]?)B/s"
    r"(?:,\s+avg\s+(?P<avg>[\d.]+)\s*(?P<avgunit>[KMGTE]?)B/s)?"
)
# "File /data/x.tar created; 1073741824 bytes at 95.4 MB/s" (-v, once per file)
_FILE_RE = re.compile(
    r"^File\s+(?P<path>.+?)\s+created;\s+(?P<bytes>\d+)\s+bytes\s+at\s+"
    r"(?P<rate>[\d.]+)\s*(?P<unit>[KMGTE]?)B/s"
)
_INFO_RE = re.compile(
    r"^bbcp:\s+(?:Creating|Appending to|Window size reduced)\b"
    r"|^(?:Source|Target)\s+\S+\s+using\b"
    r"|^(?:Source|Target)\s+cpu="
    r"|^\d+\s+buffers used"
)
_ERROR_HINTS = (
    "unable",
    "error",
    "failed",
    "refused",
    "timed out",
    "timeout",
    "invalid",
    "not all data",
    "too much data",
    "no such file",
    "denied",
    "not specified",
    "mutually exclusive",
    "insufficient",
    "exceeded",
    "reset",
    "broken pipe",
    "no route",
    "unreachable",
    "killed",
    "segmentation",
    "verification failed",
    "could not resolve",
    "not found",
    "file exists",
    "lost connection",
    "no space",
)
# Errors a retry cannot fix: the command line or the setup is wrong.
_FATAL_HINTS = (
    "invalid",
    "mutually exclusive",
    "not specified",
    "command not found",
    "bbcp: not found",
    "unknown option",
    "illegal option",
)
_NETWORK_HINTS = (
    "unable to connect",
    "accept timed out",
    "unable to allocate more than",
    "connection refused",
    "connection reset",
    "connection timed out",
    "timed out",
    "broken pipe",
    "no route to host",
    "network is unreachable",
    "lost connection",
)


def parse_rate(value: str, unit: str) -> float:
    """bbcp rate ``"112.4", "M"`` -> bytes/s (bbcp scales by 1024)."""
    return float(value) * _UNITS.get(unit.upper(), 1)


@dataclass
class BbcpProgress:
    """One ``-P`` progress line."""

    percent: int | None
    rate_bytes_per_s: float
    avg_rate_bytes_per_s: float | None = None
    at: str | None = None


@dataclass
class BbcpFileReport:
    """One ``File ... created; N bytes at R`` summary line (``-v``)."""

    path: str
    bytes: int
    rate_bytes_per_s: float


@dataclass
class BbcpReport:
    """What bbcp said: progress, per-file summaries, errors and the other messages."""

    progress: list[BbcpProgress] = field(default_factory=list)
    files: list[BbcpFileReport] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    @property
    def rate_bytes_per_s(self) -> float | None:
        """The final rate: the last file summary, else the last progress line."""
        if self.files:
            return self.files[-1].rate_bytes_per_s
        if self.progress:
            last = self.progress[-1]
            return last.avg_rate_bytes_per_s or last.rate_bytes_per_s
        return None

    @property
    def bytes(self) -> int | None:
        """Bytes bbcp reports as written (sum of the file summaries), None without ``-v``."""
        return sum(f.bytes for f in self.files) if self.files else None

    @property
    def network_failure(self) -> bool:
        """True when an error line says the link failed (worth a retry)."""
        low = "\n".join(self.errors).lower()
        return any(h in low for h in _NETWORK_HINTS)

    @property
    def fatal(self) -> bool:
        """True when an error line says the command or setup is wrong (no retry)."""
        low = "\n".join(self.errors).lower()
        return any(h in low for h in _FATAL_HINTS)

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly digest for the transfer log."""
        return {
            "rate_bytes_per_s": self.rate_bytes_per_s,
            "bytes": self.bytes,
            "progress_lines": len(self.progress),
            "last_percent": self.progress[-1].percent if self.progress else None,
            "errors": self.errors[-10:],
        }


def parse_progress_line(line: str) -> BbcpProgress | None:
    """Parse one progress line; None when the line is something else."""
    m = _PROGRESS_RE.match(line.strip())
    if not m:
        return None
    pct = m.group("pct")
    return BbcpProgress(
        percent=None if pct == "not" else int(pct.rstrip("%")),
        rate_bytes_per_s=parse_rate(m.group("rate"), m.group("unit")),
        avg_rate_bytes_per_s=(
            parse_rate(m.group("avg"), m.group("avgunit") or "") if m.group("avg") else None
        ),
        at=m.group("at"),
    )


def parse_bbcp_output(text: str) -> BbcpReport:
    """Split bbcp's (stderr) output into progress, file summaries, errors and messages."""
    report = BbcpReport()
    for raw in re.split(r"[\r\n]+", text):
        line = raw.strip()
        if not line:
            continue
        prog = parse_progress_line(line)
        if prog is not None:
            report.progress.append(prog)
            continue
        m = _FILE_RE.match(line)
        if m:
            report.files.append(
                BbcpFileReport(
                    path=m.group("path"),
                    bytes=int(m.group("bytes")),
                    rate_bytes_per_s=parse_rate(m.group("rate"), m.group("unit")),
                )
            )
            continue
        if _INFO_RE.match(line):
            report.messages.append(line)
            continue
        low = line.lower()
        if any(h in low for h in _ERROR_HINTS):
            report.errors.append(line)
        else:
            report.messages.append(line)
    return report


def bbcp_failure(returncode: int, output: str, where: str) -> TransferSystemError:
    """The exception for a failed bbcp run.

    ssh failures (authentication: StorageError, not retryable; connection: NetworkError)
    are recognised first; then bbcp's own errors: a broken or refused data connection is a
    retryable :class:`BBCPError`, a bad command line a non-retryable one, a crash (killed by
    a signal, e.g. the segmentation faults the real system has seen) a retryable one.
    """
    report = parse_bbcp_output(output)
    lines = report.errors or [ln for ln in output.splitlines() if ln.strip()][-4:]
    tail = " | ".join(lines[-4:]) if lines else "(no output)"
    if returncode < 0:
        return BBCPError(f"bbcp for {where} was killed by signal {-returncode}: {tail}")
    if any(p in output.lower() for p in AUTH_PATTERNS):
        return classify_failure("bbcp", returncode, output, where)
    if any(ln.strip().lower().startswith("ssh:") for ln in output.splitlines()):
        return NetworkError(
            f"bbcp for {where} could not start over ssh (exit {returncode}): {tail}"
        )
    if report.fatal:
        return BBCPError(f"bbcp for {where} refused its arguments: {tail}", retryable=False)
    if report.network_failure:
        return BBCPError(f"bbcp for {where} lost its connection (exit {returncode}): {tail}")
    if any("no such file" in e.lower() for e in report.errors):
        return BBCPError(f"bbcp for {where}: {tail}", retryable=False)
    if any("no space" in e.lower() or "insufficient" in e.lower() for e in report.errors):
        return StorageError(f"bbcp for {where}: destination full: {tail}")
    return BBCPError(f"bbcp for {where} failed (exit {returncode}): {tail}")


def _ssh_start_command(ssh: SshConfig, port: int | None, remote_bbcp: str) -> str:
    """The ``-S``/``-T`` command: our ssh settings, then bbcp's %I/%U/%H substitutions."""
    return f"{shlex.join(ssh.base_args(port, share=False))} -x -a %I -l %U %H {remote_bbcp}"


def make_bbcp_command(
    src_spec: str,
    dst_spec: str,
    options: Mapping[str, Any] | None = None,
    *,
    ssh: SshConfig | None = None,
    src_port: int | None = None,
    dst_port: int | None = None,
    src_remote: bool = False,
    dst_remote: bool = False,
) -> list[str]:
    """The bbcp argv for one file from a route's ``options``.

    Options: ``bbcp_path`` (default ``bbcp``), ``remote_bbcp_path`` (default ``bbcp``),
    ``streams`` (-s), ``window`` (-w, e.g. ``"8M"`` or ``"=8M"``), ``progress_interval``
    (-P seconds, default 15), ``reverse`` (-z), ``port_range`` (-Z, ``"5031:5040"``),
    ``max_rate`` (-x), ``time_limit`` (-t), ``buffer_size`` (-B), ``compress`` (-c level),
    ``bbcp_checksum`` (-E: md5, a32 or c32), ``resume`` (default True: -a -k; False: -f),
    ``no_dns`` (-n), ``verbose`` (default True: -v), ``source_command`` / ``target_command``
    (-S / -T, default: ssh with the route's ssh settings), ``extra_args`` (list).
    """
    opts = dict(options or {})
    ssh = ssh or SshConfig.from_options(opts)
    argv = [*shlex.split(str(opts.get("bbcp_path", "bbcp")))]
    remote_bbcp = str(opts.get("remote_bbcp_path", "bbcp"))

    def flag(name: str, letter: str, check: str = r".+") -> None:
        value = opts.get(name)
        if value is None or value == "":
            return
        text = str(value)
        if not re.fullmatch(check, text):
            raise ConfigurationError(f"bbcp option {name}={value!r} is not valid")
        argv.extend([letter, text])

    if opts.get("verbose", True):
        argv.append("-v")
    flag("streams", "-s", r"[1-9]\d*")
    flag("window", "-w", WINDOW_PATTERN)
    flag("progress_interval", "-P", r"\d+")
    if "progress_interval" not in opts:
        argv.extend(["-P", "15"])
    if opts.get("reverse"):
        argv.append("-z")
    flag("port_range", "-Z", PORT_RANGE_PATTERN)
    flag("max_rate", "-x", SIZE_PATTERN)
    flag("time_limit", "-t", r"\d+")
    flag("buffer_size", "-B", SIZE_PATTERN)
    compress = opts.get("compress")
    if compress:
        argv.extend(["-c", "1" if compress is True else str(int(compress))])
    csum = opts.get("bbcp_checksum")
    if csum:
        if str(csum) not in BBCP_CHECKSUMS:
            raise ConfigurationError(
                f"bbcp_checksum {csum!r}: bbcp knows {', '.join(BBCP_CHECKSUMS)} only "
                "(our own checksum is verified at the destination anyway)"
            )
        argv.extend(["-E", str(csum)])
    if opts.get("resume", True):
        argv.extend(["-a", "-k"])
    else:
        argv.append("-f")
    if opts.get("no_dns"):
        argv.append("-n")
    if src_remote:
        argv.extend(
            [
                "-S",
                str(opts.get("source_command") or _ssh_start_command(ssh, src_port, remote_bbcp)),
            ]
        )
    if dst_remote:
        argv.extend(
            [
                "-T",
                str(opts.get("target_command") or _ssh_start_command(ssh, dst_port, remote_bbcp)),
            ]
        )
    argv.extend(str(a) for a in opts.get("extra_args") or ())
    argv.extend(["--", src_spec, dst_spec])
    return argv


class BbcpMover(SshFileMover):
    """bbcp transfers (see :func:`make_bbcp_command` for the options), verified at the
    destination and renamed over ssh like :class:`~data_transfer.movers.rsync.RsyncMover`.

    Mover options beyond the bbcp flags: the ssh ones of
    :class:`~data_transfer.movers.rsync.SshConfig`, ``overwrite``, ``ssh_timeout``, and
    ``process_timeout`` (s, kill bbcp after this long; default none, bbcp's ``-t`` is the
    gentler limit).

    Runs only where ``bbcp`` is installed; otherwise :meth:`copy` raises ConfigurationError.
    ``checksum``/``size``/``delete``/``free_space`` use ssh and work without bbcp.
    """

    name = "bbcp"
    part_suffix = ".part-bbcp"

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.bbcp_path = str(self.options.get("bbcp_path", "bbcp"))
        self.time_limit = self.options.get("process_timeout")
        if self.options.get("bbcp_checksum") not in (None, "", *BBCP_CHECKSUMS):
            raise ConfigurationError(
                f"bbcp_checksum {self.options['bbcp_checksum']!r}: bbcp knows "
                f"{', '.join(BBCP_CHECKSUMS)} only"
            )

    def available(self) -> bool:
        """True when the bbcp program is installed on this worker."""
        return shutil.which(shlex.split(self.bbcp_path)[0]) is not None

    def build_command(
        self, src: LocationRef, src_abs: str, dst: LocationRef, dst_abs: str
    ) -> list[str]:
        """The bbcp argv copying ``src_abs`` at ``src`` to ``dst_abs`` at ``dst``."""
        opts = {k: v for k, v in self.options.items() if k != "extra_args"}
        opts["extra_args"] = self.extra_args
        return make_bbcp_command(
            file_spec(src, src_abs),
            file_spec(dst, dst_abs),
            opts,
            ssh=self.ssh,
            src_port=src.ssh_port,
            dst_port=dst.ssh_port,
            src_remote=src.is_remote,
            dst_remote=dst.is_remote,
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
        if not self.available():
            raise ConfigurationError(
                f"bbcp is not installed on this worker (no {self.bbcp_path!r} on PATH): "
                "install bbcp here and on the other host, or give the route method rsync"
            )
        argv = self.build_command(src, src_abs, dst, tmp_abs)
        total = self.size(src, src_path) if ticker is not None else None

        def on_line(line: str) -> None:
            prog = parse_progress_line(line)
            if prog is not None and prog.percent is not None and total and ticker is not None:
                ticker(total * prog.percent // 100)

        timeout = float(self.time_limit) if self.time_limit else None
        rc, out, err = run_tool(argv, on_line=on_line, timeout=timeout)
        text = f"{out}\n{err}".strip()
        report = parse_bbcp_output(text)
        output = f"$ {shlex.join(argv)}\n{text}".strip()
        where = f"{src.label}:{src_path} -> {dst.label}:{dst_path}"
        if rc != 0:
            raise bbcp_failure(rc, text, where)
        return output, {"command": argv, "bbcp": report.summary()}
