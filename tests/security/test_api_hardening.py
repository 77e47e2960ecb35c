"""Error answers an attacker (or an operator) can provoke: an unmigrated database answers a
clear 503 "database not migrated" instead of a 500, and a single filing's errors name the
body's own fields (not the bulk form's ``files[0]``)."""

from __future__ import annotations

import uuid
from pathlib import Path

from ccat_ops_db import migrate as mig
from ccat_ops_db.models import ApiToken

from ..api_server import ApiServer, running_api


def test_an_unmigrated_database_answers_503_not_500(db_url: str, tmp_path: Path) -> None:
    """On PostgreSQL (UndefinedTable) and SQLite ("no such table") alike."""
    with running_api(db_url, tmp_path, seed=False) as api:
        mig.downgrade(db_url, "base")
        headers = {"Authorization": f"Bearer {ApiToken.generate()}"}
        with api.client(None) as c:
            for method, path, body in (
                ("GET", "/api/v1/sites", None),
                ("GET", "/api/v1/raw_data_files", None),
                ("POST", "/api/v1/executed_obs_units/start", {"id": str(uuid.uuid4())}),
            ):
                r = c.request(method, path, json=body, headers=headers)
                assert r.status_code == 503, (path, r.status_code, r.text)
                assert r.headers["content-type"].startswith("application/json")
                assert "database not migrated" in r.json()["detail"]
                assert r.headers.get("retry-after")
            assert c.get("/readyz").status_code == 503
        log = api.log_path.read_text() if api.log_path else ""
        assert "Traceback" not in log, log[-3000:]


def test_single_filing_errors_name_the_body_fields(sec_api: ApiServer) -> None:
    body = {
        "id": str(uuid.uuid4()),
        "relative_path": "2026/05/01/sec/loc_test.fits",
        "size": 1,
        "checksum": "cd" * 32,
        "instrument_module_id": sec_api.ids["CHAI/LFA"],
        "executed_obs_unit_id": str(uuid.uuid4()),  # never started
        "source_location_id": sec_api.ids["ccat/chai_raw_data"],
    }
    with sec_api.client("instrument") as c:
        r = c.post("/api/v1/raw_data_files", json=body)
        assert r.status_code == 422, r.text
        assert r.json()["errors"][0]["loc"] == ["body", "executed_obs_unit_id"]
        assert "does not exist" in r.json()["detail"]
        # the bulk form keeps naming the item by its index
        r = c.post("/api/v1/raw_data_files/bulk", json={"files": [body]})
        assert r.status_code == 422, r.text
        assert r.json()["errors"][0]["loc"] == ["files", 0, "executed_obs_unit_id"]
