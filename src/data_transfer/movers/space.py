"""Free space in BUFFERs: check before writing a package, wait (not fail) while it is full.

A worker that is about to write a new package into a BUFFER (stage 1: the raw data package
tar; stage 3: the transfer package pulled in; stage 4: the unpacked packages) first calls
:func:`ensure_space`. When the write would leave less free than the reserve
(``CCAT_TRANSFER_BUFFER_MIN_FREE_BYTES`` or ``..._PERCENT`` of the file system, the larger),
it raises :class:`BufferFullError`: the task does not start, the record goes back to PENDING
with the reason ``"BUFFER ccat/buffer has X bytes free, needs Y (+ Z reserved)"``, and it is
tried again after ``CCAT_TRANSFER_BUFFER_FULL_RECHECK_S`` without using up a retry. Once space
returns, the next attempt simply goes through.

Writers never put bytes at the final name directly: they write ``<name>.part-<random>`` and
rename it after verifying, so a write cut short by a real ENOSPC (or a kill) leaves at most a
``.part-*`` file, which nothing takes for a package. :func:`sweep_stale_parts` removes such
left-overs once unchanged (mtime and ctime) for ``CCAT_TRANSFER_PART_FILE_MAX_AGE_S``, and with
them the empty scratch folders a killed repair leaves under ``<buffer>/.repair/``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path

from ..errors import StorageError
from ..locations import LocationRef

log = logging.getLogger("data_transfer.space")

#: Temporary names the writers use: ``.part-<hex>`` (local, packaging), ``.part-rsync`` and
#: ``.part-bbcp``.
PART_NAME = re.compile(r"\.part-([0-9a-f]{6,}|rsync|bbcp)$")

#: Scratch folder of a repair inside a BUFFER (``<root>/.repair/<uuid>/``), removed by the
#: repair when it ends; a killed repair leaves it behind.
REPAIR_DIR = ".repair"

_last_sweep: dict[str, float] = {}
_sweep_lock = threading.Lock()


class BufferFullError(StorageError):
    """Not enough free space in a BUFFER to start writing: wait, do not count an attempt."""

    counts_as_attempt = False

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def is_out_of_space(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) is a full disk: a :class:`BufferFullError`, an
    ``OSError`` ENOSPC/EDQUOT, or a storage error saying "no space left"."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, BufferFullError):
            return True
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(cur, StorageError) and "no space left" in str(cur).lower():
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def last_change(st: os.stat_result) -> float:
    """When a file was last written, renamed or re-stamped: the later of its mtime and ctime.

    mtime alone is not enough: ``rsync --times`` (and any copy that keeps the source's times)
    gives a temporary file that was finished a moment ago the source's old mtime, while its
    ctime is set by the kernel on every write, rename or time change and cannot be back-dated.
    """
    return max(st.st_mtime, st.st_ctime)


def sweep_stale_parts(root: Path, max_age_s: float) -> list[Path]:
    """Remove ``*.part-*`` files under ``root`` unchanged for ``max_age_s`` (by
    :func:`last_change`: a finished copy carrying its source's old mtime is not stale);
    return them."""
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    cutoff = time.time() - max_age_s
    for folder, _dirs, files in os.walk(root):
        for name in files:
            if not PART_NAME.search(name):
                continue
            path = Path(folder) / name
            try:
                if last_change(path.stat()) < cutoff:
                    path.unlink()
                    removed.append(path)
            except FileNotFoundError:  # its writer finished or removed it meanwhile
                continue
    if removed:
        log.warning("removed %d stale temporary files under %s", len(removed), root)
    _sweep_repair_scratch(root / REPAIR_DIR, cutoff, {path.parent for path in removed})
    return removed


def _sweep_repair_scratch(scratch: Path, cutoff: float, emptied: set[Path]) -> None:
    """Remove empty repair scratch folders not modified since ``cutoff``, or just emptied of
    stale parts by this sweep (a live repair's folder changes whenever it fetches a tar)."""
    if not scratch.is_dir():
        return
    for folder in scratch.iterdir():
        try:
            if folder.is_dir() and (folder in emptied or last_change(folder.stat()) < cutoff):
                folder.rmdir()  # only when empty: OSError otherwise
                log.warning("removed the stale repair scratch folder %s", folder)
        except OSError:
            continue
    with contextlib.suppress(OSError):
        if last_change(scratch.stat()) < cutoff:
            scratch.rmdir()


def ensure_space(
    loc: LocationRef,
    needed: int,
    *,
    min_free_bytes: int = 0,
    min_free_percent: float = 0.0,
    retry_after_s: float = 60.0,
    part_max_age_s: float = 24 * 3600.0,
    sweep_interval_s: float = 3600.0,
) -> int:
    """Check that ``needed`` bytes fit in ``loc`` with the reserve left; return the free bytes.

    Stale temporary files are swept now and then (every ``sweep_interval_s`` per location)
    and always before giving up for lack of space. Raises :class:`BufferFullError`.
    """
    if loc.storage_type != "disk" or loc.is_remote or not loc.root_path:
        return -1
    root = Path(loc.root_path)
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    with _sweep_lock:
        due = time.monotonic() - _last_sweep.get(str(root), -1e18) >= sweep_interval_s
        if due:
            _last_sweep[str(root)] = time.monotonic()
    if due:
        sweep_stale_parts(root, part_max_age_s)
    usage = shutil.disk_usage(probe)
    reserve = max(min_free_bytes, int(usage.total * min_free_percent / 100))
    if usage.free - needed >= reserve:
        return usage.free
    if sweep_stale_parts(root, part_max_age_s):
        usage = shutil.disk_usage(probe)
        if usage.free - needed >= reserve:
            return usage.free
    raise BufferFullError(
        f"{loc.location_type.upper()} {loc.label} has {usage.free} bytes free, needs {needed}"
        f" (+ {reserve} reserved); waiting {retry_after_s:g} s for space",
        retry_after_s=retry_after_s,
    )
