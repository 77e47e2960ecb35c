"""Movers: one interface (:class:`Mover`) over the ways bytes travel between locations.

``get_mover(method)`` builds a mover by name (a route's ``method``); ``mover_for(src, dst,
method)`` picks the one that can actually reach both ends:

* S3 at either end -> :class:`S3Mover`;
* a disk location with a ``host`` at either end -> :class:`RsyncMover`, or
  :class:`BbcpMover` when the route's method is ``bbcp``;
* otherwise (both ends are local paths) -> :class:`LocalMover`, whatever the route says: a
  network tool between two local directories would only add an extra read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ConfigurationError
from ..locations import LocationRef
from .base import CopyResult, Mover, Progress
from .bbcp import BbcpMover, make_bbcp_command, parse_bbcp_output
from .local import LocalMover
from .rsync import RsyncMover
from .s3 import S3Mover

__all__ = [
    "MOVERS",
    "BbcpMover",
    "CopyResult",
    "LocalMover",
    "Mover",
    "Progress",
    "RsyncMover",
    "S3Mover",
    "get_mover",
    "make_bbcp_command",
    "mover_for",
    "parse_bbcp_output",
]

#: Mover classes by method name.
MOVERS: dict[str, type[Any]] = {
    "local": LocalMover,
    "rsync": RsyncMover,
    "s3": S3Mover,
    "bbcp": BbcpMover,
}


def get_mover(method: str, *, options: Mapping[str, Any] | None = None) -> Mover:
    """The mover for ``method`` (``local``, ``rsync``, ``s3`` or ``bbcp``) with ``options``."""
    cls = MOVERS.get(str(method).lower())
    if cls is None:
        raise ConfigurationError(
            f"unknown transfer method {method!r} (known: {', '.join(sorted(MOVERS))})"
        )
    mover: Mover = cls(options=options)
    return mover


def mover_for(
    src: LocationRef,
    dst: LocationRef,
    method: str | None,
    *,
    options: Mapping[str, Any] | None = None,
) -> Mover:
    """The mover that can copy from ``src`` to ``dst`` for a route whose method is ``method``.

    ``options`` are the route's mover options (ssh identity, bbcp streams, S3 part size...).
    """
    for loc in (src, dst):
        if loc.storage_type not in ("disk", "s3"):
            raise ConfigurationError(f"no mover handles {loc.storage_type} storage ({loc.label})")
    if method is not None and str(method).lower() not in MOVERS:
        raise ConfigurationError(
            f"unknown transfer method {method!r} (known: {', '.join(sorted(MOVERS))})"
        )
    if "s3" in (src.storage_type, dst.storage_type):
        return get_mover("s3", options=options)
    if src.is_remote or dst.is_remote:
        return get_mover("bbcp" if method == "bbcp" else "rsync", options=options)
    return get_mover("local", options=options)
