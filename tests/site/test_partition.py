"""Partition tests with real processes on loopback.

The "link to Cologne" is cut by stopping the main API process and restored by starting it
again on the same port; the observatory API, its buffer database and the replayer keep
running (or are killed with SIGKILL) meanwhile.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from typing import Any

import httpx
from sqlalchemy import create_engine, func, select, text

from ccat_ops_db import models as m

from ..api_server import free_port
from .conftest import Sites, parse_metrics
from .helpers import eou_body, file_body

N_FILES = 10_000
BULK = 1000


def _main_files(db_url: str, ids: list[str]) -> dict[str, Any]:
    """The rows the main database holds for ``ids``, by id."""
    eng = create_engine(db_url)
    out: dict[str, Any] = {}
    with eng.connect() as conn:
        for i in range(0, len(ids), 5000):
            chunk = [uuid.UUID(x) for x in ids[i : i + 5000]]
            for row in conn.execute(
                select(
                    m.RawDataFile.id,
                    m.RawDataFile.name,
                    m.RawDataFile.relative_path,
                    m.RawDataFile.size,
                    m.RawDataFile.checksum,
                    m.RawDataFile.executed_obs_unit_id,
                    m.RawDataFile.instrument_module_id,
                    m.RawDataFile.source_location_id,
                    m.RawDataFile.file_type,
                    m.RawDataFile.created_at,
                ).where(m.RawDataFile.id.in_(chunk))
            ):
                out[str(row.id)] = row
    eng.dispose()
    return out


def _assert_identical(stored: Any, sent: dict[str, Any]) -> None:
    assert stored.relative_path == sent["relative_path"]
    assert stored.name == sent["relative_path"].rsplit("/", 1)[-1]
    assert stored.size == sent["size"]
    assert stored.checksum == sent["checksum"]
    assert str(stored.executed_obs_unit_id) == sent["executed_obs_unit_id"]
    assert stored.instrument_module_id == sent["instrument_module_id"]
    assert stored.source_location_id == sent["source_location_id"]
    assert stored.file_type == sent["file_type"]


def test_partition_10000_files_replayed_exactly_once_in_order(sites: Sites) -> None:
    ids = sites.ids
    metrics_port = free_port()
    replayer = sites.replayer(metrics_port)
    replayer.start()

    # the link works: a first observation reaches the main site through the replayer
    with sites.obs_client() as obs:
        warm = eou_body(ids)
        assert obs.post("/api/v1/executed_obs_units/start", json=warm).status_code == 202
    sites.wait_drained(60)

    # cut the link
    sites.main.stop()
    t_cut = time.monotonic()
    eou = eou_body(ids)
    files = [file_body(ids, eou["id"], n) for n in range(N_FILES)]
    with sites.obs_client() as obs:
        assert obs.post("/api/v1/executed_obs_units/start", json=eou).status_code == 202
        for i in range(0, N_FILES, BULK):
            r = obs.post("/api/v1/raw_data_files/bulk", json={"files": files[i : i + BULK]})
            assert r.status_code == 202, r.text
            assert r.json()["created"] == BULK
            assert r.json()["ids"] == [f["id"] for f in files[i : i + BULK]]
        # an instrument reads back what it just filed
        for f in (files[0], files[N_FILES // 2], files[-1]):
            got = obs.get(f"/api/v1/raw_data_files/{f['id']}")
            assert got.status_code == 200
            assert got.json()["replication"] == "buffered"
            assert got.json()["checksum"] == f["checksum"]
    filing_s = time.monotonic() - t_cut

    # while cut: everything is buffered, visible in /metrics; the replayer backs off
    time.sleep(1.5)
    met = sites.obs_metrics()
    assert met["ccat_api_buffer_depth"] == N_FILES + 1
    assert met["ccat_api_buffer_oldest_write_age_seconds"] >= 1.0
    assert met["ccat_api_buffer_up"] == 1
    status = sites.buffer_status()
    assert status["last_error"], status
    rep_met = parse_metrics(httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text)
    assert rep_met["ccat_replayer_consecutive_failures"] >= 1
    assert rep_met["ccat_api_buffer_depth"] == N_FILES + 1

    # a one-shot replay while the service holds the buffer: refused, nothing touched
    r = sites.cli("buffer", "replay")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "another replayer" in r.stderr

    # the link comes back: the replayer drains the buffer; kill -9 it part-way through and
    # start another one (a batch the main site took but that was not marked replayed yet is
    # sent again and answered 200: still exactly once)
    sites.main.start()
    t_back = time.monotonic()
    while time.monotonic() - t_back < 120:
        depth = sites.buffer_status()["depth"]
        if depth <= N_FILES - 2 * BULK:
            break
        time.sleep(0.1)
    replayer.kill9()
    killed_at_depth = sites.buffer_status()["depth"]
    assert killed_at_depth > 0, "the replayer finished before it could be killed mid-drain"
    replayer.start()
    final = sites.wait_drained(300)
    drain_s = time.monotonic() - t_back
    assert final["parked"] == 0
    assert final["replayed_total"] == N_FILES + 2
    met = sites.obs_metrics()
    assert met["ccat_api_buffer_depth"] == 0
    assert met["ccat_api_buffer_oldest_write_age_seconds"] == 0
    assert met["ccat_api_buffer_replayed_total"] == N_FILES + 2

    # the main database holds every file exactly once, with identical content
    stored = _main_files(sites.main_db, [f["id"] for f in files])
    assert len(stored) == N_FILES
    for f in files:
        _assert_identical(stored[f["id"]], f)
    eng = create_engine(sites.main_db)
    with eng.connect() as conn:
        per_eou = conn.scalar(
            select(func.count()).where(m.RawDataFile.executed_obs_unit_id == uuid.UUID(eou["id"]))
        )
        assert per_eou == N_FILES
        dup_paths = conn.scalar(
            text(
                "SELECT count(*) FROM (SELECT relative_path FROM raw_data_file "
                "GROUP BY source_location_id, relative_path HAVING count(*) > 1) d"
            )
        )
        assert dup_paths == 0
        eou_created = conn.scalar(
            select(m.ExecutedObsUnit.created_at).where(m.ExecutedObsUnit.id == uuid.UUID(eou["id"]))
        )
    eng.dispose()
    # in order: the observation before its files, the files in the order they were buffered
    buf = create_engine(sites.buffer_db)
    with buf.connect() as conn:
        order = [
            str(r[0])
            for r in conn.execute(
                text("SELECT item_id FROM site_buffer_item WHERE kind = 'file' ORDER BY seq")
            )
        ]
    buf.dispose()
    assert order == [f["id"] for f in files]
    created = [stored[i].created_at for i in order]
    assert eou_created <= created[0]
    assert all(a <= b for a, b in itertools.pairwise(created))
    print(
        f"\n{N_FILES} files buffered during the cut in {filing_s:.1f} s; "
        f"drained after the link came back in {drain_s:.1f} s "
        f"(replayer killed -9 with {killed_at_depth} writes still buffered)"
    )


def test_kill9_of_the_observatory_api_loses_no_acknowledged_write(sites: Sites) -> None:
    ids = sites.ids
    sites.main.stop()  # the link is down for the whole filing
    eou = eou_body(ids)
    with sites.obs_client() as obs:
        assert obs.post("/api/v1/executed_obs_units/start", json=eou).status_code == 202

    acked: dict[str, dict[str, Any]] = {}
    sent: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()
    stop = threading.Event()
    counter = iter(range(10**6))

    def instrument(single: bool) -> None:
        with sites.obs_client(timeout=30) as obs:
            while not stop.is_set():
                with lock:
                    batch = [
                        file_body(ids, eou["id"], next(counter)) for _ in range(1 if single else 25)
                    ]
                    sent.update({f["id"]: f for f in batch})
                try:
                    if single:
                        r = obs.post("/api/v1/raw_data_files", json=batch[0])
                    else:
                        r = obs.post("/api/v1/raw_data_files/bulk", json={"files": batch})
                except httpx.TransportError:
                    return  # the API is gone: what was not answered is not acknowledged
                assert r.status_code == 202, r.text
                with lock:
                    acked.update({f["id"]: f for f in batch})

    threads = [threading.Thread(target=instrument, args=(k % 2 == 0,)) for k in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while len(acked) < 1500 and time.monotonic() < deadline:
        time.sleep(0.05)
    sites.obs.kill9()  # mid-stream, with requests in flight
    stop.set()
    for t in threads:
        t.join(30)
    assert len(acked) >= 1500, "the instrument threads filed too little before the kill"

    # the observatory comes back: every acknowledged write is still there
    sites.obs.start()
    with sites.obs_client() as obs:
        for fid in list(acked)[:: max(1, len(acked) // 50)]:
            got = obs.get(f"/api/v1/raw_data_files/{fid}")
            assert got.status_code == 200, got.text
            assert got.json()["replication"] == "buffered"
    buf = create_engine(sites.buffer_db)
    with buf.connect() as conn:
        buffered = {
            str(r[0])
            for r in conn.execute(text("SELECT item_id FROM site_buffer_item WHERE kind='file'"))
        }
    buf.dispose()
    assert set(acked) <= buffered
    # what was in flight at the kill is either fully buffered or not at all: the instrument
    # files it again (same content) and gets 200 or 202
    in_flight = [sent[i] for i in sent if i not in acked]
    with sites.obs_client() as obs:
        for f in in_flight:
            r = obs.post("/api/v1/raw_data_files", json=f)
            assert r.status_code == (200 if f["id"] in buffered else 202), r.text

    # link back; a one-shot replay delivers everything exactly once
    sites.main.start()
    r = sites.cli("buffer", "replay")
    assert r.returncode == 0, r.stdout + r.stderr
    stored = _main_files(sites.main_db, list(sent))
    assert len(stored) == len(sent)
    for fid, f in sent.items():
        _assert_identical(stored[fid], f)
    st = sites.buffer_status()
    assert (st["depth"], st["parked"]) == (0, 0)
    print(f"\n{len(acked)} acknowledged before kill -9, {len(in_flight)} in flight; none lost")
