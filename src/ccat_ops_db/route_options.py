"""The option names a transfer route may carry, per method (``routes[].options``).

A route's ``options`` go to the mover its ``method`` names (see ``data_transfer.movers``).
The movers read only the names listed here; any other name is a mistake (``bwlimt`` for
``bwlimit``, a bbcp option on an rsync route) that would otherwise be ignored without a word,
so the link runs unthrottled or with the wrong window and nobody knows why. The topology
loader (``ccat-ops-db seed``) rejects such a name with its file and line, and the movers
refuse a route whose stored options hold one (a database seeded before this check).

Values are checked here too, by kind (a whole number of seconds, true or false, one of a few
words, a size like ``8M``...), so ``streams: eight`` or ``extra_args: --foo`` (a string where a
list is wanted) stops at the loader with its line, not at the first transfer. Decision: the
tables live beside the routes they describe, in the database package, so the loader needs
nothing from the transfer package; the movers keep their own checks of what they read.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from typing import Any

from .enums import TransferMethod

#: A value check: the problem with ``value`` (``"must be ..."``), or None when it is fine.
Check = Callable[[Any], str | None]


def _got(value: Any) -> str:
    return f"(got {value!r})"


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false {_got(value)}"


def _whole(minimum: int, unit: str = "") -> Check:
    def check(value: Any) -> str | None:
        if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
            return None
        return f"must be a whole number{unit} >= {minimum} {_got(value)}"

    return check


def _positive(value: Any) -> str | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return None
    return f"must be a number of seconds > 0 {_got(value)}"


def _text(value: Any) -> str | None:
    return None if isinstance(value, str) and value else f"must be a non-empty string {_got(value)}"


def _texts(value: Any) -> str | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return None
    return f"must be a list of strings {_got(value)}"


def _text_or_texts(value: Any) -> str | None:
    return None if isinstance(value, str) else _texts(value)


def _choice(*words: str) -> Check:
    def check(value: Any) -> str | None:
        if value in words:
            return None
        return f"must be one of {', '.join(repr(w) for w in words)} {_got(value)}"

    return check


def _pattern(regex: str, what: str) -> Check:
    def check(value: Any) -> str | None:
        ok = not isinstance(value, bool) and isinstance(value, int | str)
        if ok and re.fullmatch(regex, str(value)):
            return None
        return f"must be {what} {_got(value)}"

    return check


def _compression(value: Any) -> str | None:
    if isinstance(value, bool) or (isinstance(value, int) and 0 <= value <= 9):
        return None
    return f"must be true, false or a level 0-9 {_got(value)}"


#: A count with an optional unit, as bbcp and rsync take sizes and rates (``8M``, ``100``).
SIZE_PATTERN = r"\d+[kKmMgG]?"
#: bbcp's window (``-w``): a size, ``=`` in front to stop bbcp from adjusting it.
WINDOW_PATTERN = r"=?" + SIZE_PATTERN
#: bbcp's port range (``-Z``): one port or ``low:high``.
PORT_RANGE_PATTERN = r"\d+(?::\d+)?"
#: bbcp's own checksum algorithms (``-E``); ours (sha256...) is checked at the destination.
BBCP_CHECKSUMS = ("md5", "a32", "c32")

#: How a mover reaches a host with ssh (rsync and bbcp routes).
SSH_OPTIONS: dict[str, Check] = {
    "ssh_command": _text,
    "identity_file": _text,
    "known_hosts_file": _text,
    "strict_host_key_checking": _choice("yes", "accept-new", "no"),
    "connect_timeout": _whole(1, " of seconds"),
    "server_alive_interval": _whole(0, " of seconds"),
    "ssh_options": _text_or_texts,
    "ssh_config_file": _text,
    "control_persist": _whole(0, " of seconds"),
    "control_dir": _text,
}

#: What every copy tool over ssh shares (rsync, bbcp).
_SSH_TOOL_OPTIONS: dict[str, Check] = {
    **SSH_OPTIONS,
    "ssh_timeout": _positive,
    "overwrite": _boolean,
    "extra_args": _texts,
}

#: Option names per route method, each with the check of its value.
ROUTE_OPTIONS: dict[TransferMethod, dict[str, Check]] = {
    TransferMethod.LOCAL: {"overwrite": _boolean, "chunk_size": _whole(1, " of bytes")},
    TransferMethod.RSYNC: {
        **_SSH_TOOL_OPTIONS,
        "timeout": _whole(0, " of seconds"),
        "bwlimit": _pattern(SIZE_PATTERN, "a rate like 50m or a number of KiB/s"),
        "rsync_path": _text,
        "remote_rsync_path": _text,
        "partial_dir": _pattern(r"(?!\.\.?$)[^/]+", "a plain folder name"),
    },
    TransferMethod.BBCP: {
        **_SSH_TOOL_OPTIONS,
        "bbcp_path": _text,
        "remote_bbcp_path": _text,
        "verbose": _boolean,
        "streams": _whole(1),
        "window": _pattern(WINDOW_PATTERN, "a size like 8M or =8M"),
        "progress_interval": _whole(0, " of seconds"),
        "reverse": _boolean,
        "port_range": _pattern(PORT_RANGE_PATTERN, "a port or a range like 5031:5040"),
        "max_rate": _pattern(SIZE_PATTERN, "a rate like 100M"),
        "time_limit": _whole(0, " of seconds"),
        "buffer_size": _pattern(SIZE_PATTERN, "a size like 4M"),
        "compress": _compression,
        "bbcp_checksum": _choice(*BBCP_CHECKSUMS),
        "resume": _boolean,
        "no_dns": _boolean,
        "source_command": _text,
        "target_command": _text,
        "process_timeout": _positive,
    },
    TransferMethod.S3: {
        "part_size": _whole(5 * 1024 * 1024, " of bytes"),
        "multipart_threshold": _whole(1, " of bytes"),
        "overwrite": _boolean,
        "max_attempts": _whole(1),
        "connect_timeout": _positive,
        "read_timeout": _positive,
        "addressing_style": _choice("auto", "path", "virtual"),
        "storage_class": _text,
        "max_pool_connections": _whole(1),
        "copy_object_limit": _whole(1, " of bytes"),
    },
}


def route_option_problems(
    method: TransferMethod | str, options: Mapping[str, Any] | None
) -> list[tuple[str, str]]:
    """``(name, problem)`` for every option in ``options`` that a ``method`` route does not
    know or whose value is not of its kind, in the order given. For an unknown name the
    problem suggests a close known name, or says which method's routes know it."""
    if not options:
        return []
    method = TransferMethod(str(method).lower())
    known = ROUTE_OPTIONS[method]
    problems: list[tuple[str, str]] = []
    for name, value in options.items():
        check = known.get(name)
        if check is not None:
            problem = check(value)
            if problem is not None:
                problems.append((str(name), problem))
            continue
        text = f"unknown option {name!r} for {method.value} routes"
        close = difflib.get_close_matches(str(name), sorted(known), n=1)
        if close:
            text += f"; did you mean {close[0]!r}?"
        else:
            others = [m.value for m, names in ROUTE_OPTIONS.items() if name in names]
            if others:
                text += f" (it is an option of {' and '.join(others)} routes)"
            else:
                text += f" (known: {', '.join(sorted(known))})"
        problems.append((str(name), text))
    return problems
