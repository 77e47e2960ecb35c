"""Bodies an instrument files, shared by the site-mode tests."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any


def eou_body(ids: dict[str, int], **overrides: Any) -> dict[str, Any]:
    """The start of an observation with a fresh UUID."""
    return {
        "id": str(uuid.uuid4()),
        "start_time": "2026-05-01T03:00:00Z",
        "instrument_id": ids["CHAI"],
        **overrides,
    }


def file_body(ids: dict[str, int], eou_id: str, n: int, **overrides: Any) -> dict[str, Any]:
    """A raw data file of ``eou_id`` with a fresh UUID; content derived from ``n``."""
    content = f"{eou_id}-{n}".encode()
    return {
        "id": str(uuid.uuid4()),
        "relative_path": f"2026/05/01/{eou_id}/scan_{n:05d}.fits",
        "size": len(content) * 1000 + n,
        "checksum": hashlib.sha256(content).hexdigest(),
        "instrument_module_id": ids["CHAI/LFA"],
        "executed_obs_unit_id": eou_id,
        "source_location_id": ids["ccat/chai_raw_data"],
        "file_type": "fits",
        **overrides,
    }
