"""Observatory mode over real HTTP: 202 + read-back, idempotency, replay, parking, CLI, API."""

from __future__ import annotations

import json
import uuid

import httpx
from sqlalchemy import create_engine, make_url, select, text

from ccat_ops_db import models as m

from .conftest import Sites
from .helpers import eou_body, file_body


def test_main_mode_is_unchanged(sites: Sites) -> None:
    """The main API files straight into its database (201) and has no site routes."""
    with sites.main_client() as c:
        eou = eou_body(sites.ids)
        assert c.post("/api/v1/executed_obs_units/start", json=eou).status_code == 201
        r = c.post("/api/v1/raw_data_files", json=file_body(sites.ids, eou["id"], 0))
        assert r.status_code == 201, r.text
        assert "replication" not in r.json()
        assert c.get("/api/v1/site/buffer").status_code == 404
        main_doc = c.get("/openapi.json").json()
    obs_doc = httpx.get(f"{sites.obs_url}/openapi.json", timeout=30).json()
    # each site documents the filing answers it gives
    assert "202" not in main_doc["paths"]["/api/v1/raw_data_files"]["post"]["responses"]
    assert "202" in obs_doc["paths"]["/api/v1/raw_data_files"]["post"]["responses"]
    assert "202" in obs_doc["paths"]["/api/v1/raw_data_files/bulk"]["post"]["responses"]
    assert "/api/v1/site/parked" in obs_doc["paths"]


def test_buffer_read_back_replay_and_park(sites: Sites) -> None:
    ids = sites.ids
    with sites.obs_client() as obs:
        # filed at the observatory: 202 with the id, readable right away
        eou = eou_body(ids, mean_pwv_mm=0.6)
        r = obs.post("/api/v1/executed_obs_units/start", json=eou)
        assert r.status_code == 202, r.text
        assert r.json() == {"id": eou["id"], "kind": "eou_start", "replication": "buffered"}
        got = obs.get(f"/api/v1/executed_obs_units/{eou['id']}").json()
        assert got["status"] == "running"
        assert got["replication"] == "buffered"
        # the same start again: 200; other values: 409 naming the field
        assert obs.post("/api/v1/executed_obs_units/start", json=eou).status_code == 200
        r = obs.post("/api/v1/executed_obs_units/start", json={**eou, "mean_pwv_mm": 0.9})
        assert r.status_code == 409
        assert "mean_pwv_mm" in r.json()["detail"]
        # files of an observation nobody started: 422 naming the field, nothing buffered
        r = obs.post("/api/v1/raw_data_files", json=file_body(ids, str(uuid.uuid4()), 0))
        assert r.status_code == 422
        assert r.json()["errors"][0]["loc"][-1] == "executed_obs_unit_id"

        files = [file_body(ids, eou["id"], n) for n in range(5)]
        r = obs.post("/api/v1/raw_data_files", json=files[0])
        assert r.status_code == 202, r.text
        got = obs.get(f"/api/v1/raw_data_files/{files[0]['id']}").json()
        assert got["replication"] == "buffered"
        assert got["checksum"] == files[0]["checksum"]
        assert got["state"] == "unpackaged"
        r = obs.post("/api/v1/raw_data_files", json={**files[0], "size": 1})
        assert r.status_code == 409
        assert "size" in r.json()["detail"]

    # a file with the UUID of files[1] reached the main site by another way, with other content
    with sites.main_client() as c:
        assert c.post("/api/v1/executed_obs_units/start", json=eou).status_code == 201
        other = {**files[1], "checksum": "ab" * 32}
        assert c.post("/api/v1/raw_data_files", json=other).status_code == 201

    with sites.obs_client() as obs:
        r = obs.post("/api/v1/raw_data_files/bulk", json={"files": files})
        assert r.status_code == 202, r.text
        assert (r.json()["created"], r.json()["unchanged"]) == (4, 1)
        finish = {"end_time": "2026-05-01T03:40:00Z", "status": "completed"}
        r = obs.put(f"/api/v1/executed_obs_units/{eou['id']}/finish", json=finish)
        assert r.status_code == 202, r.text
        got = obs.get(f"/api/v1/executed_obs_units/{eou['id']}").json()
        assert (got["status"], got["end_time"]) == ("completed", "2026-05-01T03:40:00Z")

    status = sites.buffer_status()
    assert status["depth"] == 7  # start, 5 files, finish
    metrics = sites.obs_metrics()
    assert metrics["ccat_api_buffer_depth"] == 7
    assert metrics["ccat_api_buffer_oldest_write_age_seconds"] > 0

    # one-shot replay: the bulk is refused (409), file by file isolates the conflict
    r = sites.cli("buffer", "replay")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "replayed 6, parked 1" in r.stdout

    eng = create_engine(sites.main_db)
    with eng.connect() as conn:
        main_eou = conn.execute(
            select(m.ExecutedObsUnit).where(m.ExecutedObsUnit.id == uuid.UUID(eou["id"]))
        ).one()
        assert main_eou.status.value == "completed"
        stored = {
            str(row.id): row
            for row in conn.execute(
                select(m.RawDataFile).where(
                    m.RawDataFile.executed_obs_unit_id == uuid.UUID(eou["id"])
                )
            )
        }
    eng.dispose()
    assert set(stored) == {f["id"] for f in files}
    assert stored[files[1]["id"]].checksum == "ab" * 32  # the main site's version stands
    for f in files[2:]:
        assert stored[f["id"]].checksum == f["checksum"]

    # parked, with the reason, through the CLI and the API; never dropped
    r = sites.cli("buffer", "park", "list", "--json")
    assert r.returncode == 0, r.stderr
    parked = json.loads(r.stdout)
    assert [p["id"] for p in parked] == [files[1]["id"]]
    assert parked[0]["status_code"] == 409
    assert "checksum" in parked[0]["reason"]
    with sites.obs_client("reader") as obs:
        api_parked = obs.get("/api/v1/site/parked").json()
        assert [p["id"] for p in api_parked["items"]] == [files[1]["id"]]
        assert obs.get(f"/api/v1/raw_data_files/{files[1]['id']}").json()["replication"] in (
            "parked"
        )
        # reading needs a token; retrying needs the operate scope
        assert obs.post(f"/api/v1/site/parked/{parked[0]['seq']}/retry").status_code == 403
    r = sites.cli("buffer", "park", "list")
    assert files[1]["id"] in r.stdout.replace("\n", "").replace("│", "").replace(" ", "") or (
        files[1]["id"][:8] in r.stdout
    )

    # retry: back in the queue, refused again, parked again (counted twice)
    with sites.obs_client("operator") as obs:
        r = obs.post(f"/api/v1/site/parked/{parked[0]['seq']}/retry")
        assert r.status_code == 200, r.text
        assert obs.post("/api/v1/site/parked/999999/retry").status_code == 404
    assert sites.buffer_status()["depth"] == 1
    r = sites.cli("buffer", "replay")
    assert r.returncode == 0
    assert "replayed 0, parked 1" in r.stdout

    r = sites.cli("buffer", "status", "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert (st["depth"], st["parked"], st["parked_total"], st["replayed_total"]) == (0, 1, 2, 6)
    metrics = sites.obs_metrics()
    assert metrics["ccat_api_buffer_parked"] == 1
    assert metrics["ccat_api_buffer_replayed_total"] == 6
    assert metrics["ccat_api_buffer_oldest_write_age_seconds"] == 0


def test_replay_refuses_to_park_when_token_is_wrong(sites: Sites) -> None:
    """A refused replay token is a link problem, not a content problem: nothing is parked."""
    with sites.obs_client() as obs:
        assert obs.post("/api/v1/executed_obs_units/start", json=eou_body(sites.ids)).is_success
    env = {**sites.env, "CCAT_API_MAIN_TOKEN": sites.obs_tokens["instrument"]}  # wrong site
    sites.env, saved = env, sites.env
    try:
        r = sites.cli("buffer", "replay")
    finally:
        sites.env = saved
    assert r.returncode == 1
    assert "unknown token" in r.stderr
    st = sites.buffer_status()
    assert (st["depth"], st["parked"]) == (1, 0)
    assert "401" in str(st["last_error"])


def test_settings_errors_name_the_setting(sites: Sites) -> None:
    env = {k: v for k, v in sites.env.items() if k != "CCAT_API_MAIN_URL"}
    sites.env, saved = env, sites.env
    try:
        r = sites.cli("buffer", "replay")
        assert r.returncode == 2
        assert "CCAT_API_MAIN_URL" in r.stderr
        sites.env = {k: v for k, v in saved.items() if k != "CCAT_API_BUFFER_URL"}
        r = sites.cli("buffer", "status")
        assert r.returncode == 2
        assert "CCAT_API_BUFFER_URL" in r.stderr
    finally:
        sites.env = saved
    with create_engine(sites.buffer_db).connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM site_buffer_item")) == 0


def test_observatory_runs_on_a_read_only_replica(sites: Sites) -> None:
    """A hot standby refuses writes: the observatory must authenticate without writing to it.

    The replica stand-in is made read-only for every new session (as a streaming standby is);
    filing and read-back still work, and token use is not recorded at the observatory.
    """
    admin = create_engine(sites.replica_db, isolation_level="AUTOCOMMIT")
    db_name = make_url(sites.replica_db).database
    with admin.connect() as conn:
        conn.execute(text(f'ALTER DATABASE "{db_name}" SET default_transaction_read_only = on'))
    admin.dispose()
    sites.obs.stop()
    sites.obs.start()
    with sites.obs_client() as c:
        eou = eou_body(sites.ids)
        r = c.post("/api/v1/executed_obs_units/start", json=eou)
        assert r.status_code == 202, r.text
        f = file_body(sites.ids, eou["id"], 0)
        assert c.post("/api/v1/raw_data_files", json=f).status_code == 202
        got = c.get(f"/api/v1/raw_data_files/{f['id']}")
        assert got.status_code == 200, got.text
        assert got.json()["replication"] == "buffered"
    eng = create_engine(sites.replica_db)
    with eng.connect() as conn:
        used = conn.execute(select(m.ApiToken.last_used_at)).scalars().all()
    eng.dispose()
    assert used and all(u is None for u in used), used
