"""The option names a transfer route may carry, per method (``routes[].options``).

A route's ``options`` go to the mover its ``method`` names (see ``data_transfer.movers``).
The movers read only the names listed here; any other name is a mistake (``bwlimt`` for
``bwlimit``, a bbcp option on an rsync route) that would otherwise be ignored without a word,
so the link runs unthrottled or with the wrong window and nobody knows why. The topology
loader (``ccat-ops-db seed``) rejects such a name with its file and line, and the movers
refuse a route whose stored options hold one (a database seeded before this check).

Decision: names are checked, values are checked by the mover that reads them (each raises a
ConfigurationError naming the option). The tables live beside the routes they describe, in the
database package, so the loader needs nothing from the transfer package; the movers import
them from here, so there is one list to keep up to date.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from .enums import TransferMethod

#: How a mover reaches a host with ssh (rsync and bbcp routes).
SSH_OPTIONS = frozenset(
    {
        "ssh_command",
        "identity_file",
        "known_hosts_file",
        "strict_host_key_checking",
        "connect_timeout",
        "server_alive_interval",
        "ssh_options",
        "ssh_config_file",
        "control_persist",
        "control_dir",
    }
)

#: What every copy tool over ssh shares (rsync, bbcp).
_SSH_TOOL_OPTIONS = SSH_OPTIONS | {"ssh_timeout", "overwrite", "extra_args"}

#: Option names per route method.
ROUTE_OPTIONS: dict[TransferMethod, frozenset[str]] = {
    TransferMethod.LOCAL: frozenset({"overwrite", "chunk_size"}),
    TransferMethod.RSYNC: _SSH_TOOL_OPTIONS
    | {"timeout", "bwlimit", "rsync_path", "remote_rsync_path", "partial_dir"},
    TransferMethod.BBCP: _SSH_TOOL_OPTIONS
    | {
        "bbcp_path",
        "remote_bbcp_path",
        "verbose",
        "streams",
        "window",
        "progress_interval",
        "reverse",
        "port_range",
        "max_rate",
        "time_limit",
        "buffer_size",
        "compress",
        "bbcp_checksum",
        "resume",
        "no_dns",
        "source_command",
        "target_command",
        "process_timeout",
    },
    TransferMethod.S3: frozenset(
        {
            "part_size",
            "multipart_threshold",
            "overwrite",
            "max_attempts",
            "connect_timeout",
            "read_timeout",
            "addressing_style",
            "storage_class",
            "max_pool_connections",
            "copy_object_limit",
        }
    ),
}


def unknown_route_options(
    method: TransferMethod | str, options: Mapping[str, Any] | None
) -> list[tuple[str, str]]:
    """``(name, problem)`` for every option in ``options`` that a ``method`` route does not
    know, in the order given; the problem names the method, suggests a close known name, and
    says which method knows the name when another one does."""
    if not options:
        return []
    method = TransferMethod(str(method).lower())
    known = ROUTE_OPTIONS[method]
    problems: list[tuple[str, str]] = []
    for name in options:
        if name in known:
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
