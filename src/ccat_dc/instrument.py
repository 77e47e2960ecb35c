"""A simulated instrument: writes real files to its SOURCE disk and files them through the API,
as Prime-Cam's and CHAI's data acquisition would (start the observation, file the files in
bulk, finish the observation)."""

from __future__ import annotations

import datetime as dt
import hashlib
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

#: (instrument, module, SOURCE location) the simulation cycles through.
MODULES = [
    ("Prime-Cam", "280GHz", "primecam_raw_data"),
    ("Prime-Cam", "350GHz", "primecam_raw_data"),
    ("Prime-Cam", "850GHz", "primecam_raw_data"),
    ("Prime-Cam", "EoR-Spec", "primecam_raw_data"),
    ("CHAI", "LFA", "chai_raw_data"),
    ("CHAI", "HFA", "chai_raw_data"),
]


@dataclass
class FiledFile:
    """A file the instrument wrote and filed."""

    id: uuid.UUID
    relative_path: str
    size: int
    checksum: str
    observation: uuid.UUID


def plan_sizes(files: int, total_bytes: int, rng: random.Random) -> list[int]:
    """``files`` sizes adding up to about ``total_bytes``: mostly mid-sized, a few large."""
    weights = [rng.lognormvariate(0, 1.0) for _ in range(files)]
    scale = total_bytes / sum(weights)
    return [max(1, int(w * scale)) for w in weights]


def run_instrument(
    api_url: str,
    token: str,
    source_roots: dict[str, Path],
    ids: dict[str, int],
    *,
    files: int,
    total_bytes: int,
    observations: int,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
) -> list[FiledFile]:
    """Write and file ``files`` files in ``observations`` observations; returns what was filed.

    ``ids`` maps ``"Instrument"``, ``"Instrument/module"`` and ``"location"`` names to ids.
    """
    rng = random.Random(seed)  # noqa: S311 - test data, not secrets
    sizes = plan_sizes(files, total_bytes, rng)
    per_obs = max(1, -(-files // observations))
    out: list[FiledFile] = []
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=api_url, headers=headers, timeout=60) as client:
        for obs_index in range(0, files, per_obs):
            instrument, module, source = MODULES[(obs_index // per_obs) % len(MODULES)]
            eou = uuid.uuid4()
            start = dt.datetime.now(dt.UTC)
            r = client.post(
                "/api/v1/executed_obs_units/start",
                json={
                    "id": str(eou),
                    "instrument_id": ids[instrument],
                    "start_time": start.isoformat(),
                    "conditions": {"simulated": True},
                },
            )
            _check(r, "start observation")
            batch = []
            for i in range(obs_index, min(obs_index + per_obs, files)):
                size = sizes[i]
                rel = f"{start:%Y%m%d}/{eou.hex[:8]}/{module.lower()}/scan_{i:05d}.dat"
                path = source_roots[source] / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                h = hashlib.sha256()
                with open(path, "wb") as f:
                    left = size
                    while left:
                        chunk = rng.randbytes(min(left, 1 << 20))
                        h.update(chunk)
                        f.write(chunk)
                        left -= len(chunk)
                fid = uuid.uuid4()
                batch.append(
                    {
                        "id": str(fid),
                        "relative_path": rel,
                        "size": size,
                        "checksum": h.hexdigest(),
                        "instrument_module_id": ids[f"{instrument}/{module}"],
                        "executed_obs_unit_id": str(eou),
                        "source_location_id": ids[source],
                        "file_type": "dat",
                        "written_at": dt.datetime.now(dt.UTC).isoformat(),
                    }
                )
                out.append(FiledFile(fid, rel, size, h.hexdigest(), eou))
                if progress:
                    progress(len(out), size)
            _check(client.post("/api/v1/raw_data_files/bulk", json={"files": batch}), "file files")
            r = client.put(
                f"/api/v1/executed_obs_units/{eou}/finish",
                json={"end_time": dt.datetime.now(dt.UTC).isoformat(), "status": "completed"},
            )
            _check(r, "finish observation")
    return out


def _check(r: httpx.Response, what: str) -> None:
    if r.status_code >= 300:
        raise RuntimeError(f"instrument: {what} failed: HTTP {r.status_code}: {r.text[:500]}")
