"""Filing over real HTTP against a real PostgreSQL: observations and raw data files."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select, text

from ccat_ops_db import models as m
from ccat_ops_db.db import make_engine

from .api_server import ApiServer, running_api
from .conftest import PgServer


@pytest.fixture(scope="module")
def api(pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    name = pg_server.create_database("api")
    with running_api(pg_server.url(name), tmp_path_factory.mktemp("api")) as server:
        yield server
    pg_server.drop_database(name)


def start_eou(api: ApiServer, **overrides: object) -> str:
    eou_id = str(uuid.uuid4())
    body = {
        "id": eou_id,
        "start_time": "2026-05-01T03:00:00Z",
        "instrument_id": api.ids["CHAI"],
        **overrides,
    }
    with api.client("instrument") as c:
        r = c.post("/api/v1/executed_obs_units/start", json=body)
    assert r.status_code == 201, r.text
    return eou_id


def file_body(api: ApiServer, eou_id: str, n: int = 0, **overrides: object) -> dict:
    content = f"{eou_id}-{n}".encode()
    return {
        "id": str(uuid.uuid4()),
        "relative_path": f"2026/05/01/{eou_id}/scan_{n:05d}.fits",
        "size": len(content),
        "checksum": hashlib.sha256(content).hexdigest(),
        "instrument_module_id": api.ids["CHAI/LFA"],
        "executed_obs_unit_id": eou_id,
        "source_location_id": api.ids["ccat/chai_raw_data"],
        **overrides,
    }


# --- executed obs units --------------------------------------------------------------------


def test_start_finish_get_list(api: ApiServer) -> None:
    eou_id = start_eou(api, mean_pwv_mm=0.7, conditions={"wind_ms": 3})
    with api.client("instrument") as c:
        r = c.get(f"/api/v1/executed_obs_units/{eou_id}")
        assert r.status_code == 200
        assert r.json()["status"] == "running"
        assert r.json()["created_by_token_id"] is not None
        # same start again: success, nothing changes
        again = {
            "id": eou_id,
            "start_time": "2026-05-01T03:00:00Z",
            "instrument_id": api.ids["CHAI"],
            "mean_pwv_mm": 0.7,
            "conditions": {"wind_ms": 3},
        }
        assert c.post("/api/v1/executed_obs_units/start", json=again).status_code == 200
        # other content: 409 naming the fields
        r = c.post(
            "/api/v1/executed_obs_units/start",
            json={**again, "start_time": "2026-05-01T04:00:00Z", "mean_pwv_mm": 1.0},
        )
        assert r.status_code == 409
        assert "start_time" in r.json()["detail"] and "mean_pwv_mm" in r.json()["detail"]
        fin = {"end_time": "2026-05-01T03:30:00Z", "status": "completed"}
        r = c.put(f"/api/v1/executed_obs_units/{eou_id}/finish", json=fin)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "completed"
        assert c.put(f"/api/v1/executed_obs_units/{eou_id}/finish", json=fin).status_code == 200
        r = c.put(
            f"/api/v1/executed_obs_units/{eou_id}/finish",
            json={"end_time": "2026-05-01T03:31:00Z", "status": "failed"},
        )
        assert r.status_code == 409
        assert "end_time" in r.json()["detail"]
        r = c.get(
            "/api/v1/executed_obs_units",
            params={"instrument_id": api.ids["CHAI"], "status": "completed"},
        )
        assert eou_id in [x["id"] for x in r.json()["items"]]


def test_start_and_finish_bad_input(api: ApiServer) -> None:
    with api.client("instrument") as c:
        r = c.post(
            "/api/v1/executed_obs_units/start",
            json={"id": "not-a-uuid", "start_time": "2026-05-01T03:00:00"},
        )
        assert r.status_code == 422
        locs = {tuple(e["loc"]) for e in r.json()["errors"]}
        assert ("body", "id") in locs and ("body", "start_time") in locs  # naive time refused
        r = c.post(
            "/api/v1/executed_obs_units/start",
            json={
                "id": str(uuid.uuid4()),
                "start_time": "2026-05-01T03:00:00Z",
                "obs_unit_id": 999999,
            },
        )
        assert r.status_code == 422
        assert r.json()["errors"][0]["loc"] == ["body", "obs_unit_id"]
        r = c.post(
            "/api/v1/executed_obs_units/start",
            json={"id": str(uuid.uuid4()), "start_time": "2026-05-01T03:00:00Z", "colour": "red"},
        )
        assert r.status_code == 422
        assert r.json()["errors"][0]["loc"] == ["body", "colour"]
        r = c.put(
            f"/api/v1/executed_obs_units/{uuid.uuid4()}/finish",
            json={"end_time": "2026-05-01T03:30:00Z"},
        )
        assert r.status_code == 404
        eou_id = start_eou(api)
        r = c.put(
            f"/api/v1/executed_obs_units/{eou_id}/finish", json={"end_time": "2026-05-01T02:00:00Z"}
        )
        assert r.status_code == 422
        assert "before start_time" in r.text
        assert c.get("/api/v1/executed_obs_units/xyz").status_code == 422


# --- raw data files -------------------------------------------------------------------------


def test_file_one_refile_and_conflict(api: ApiServer) -> None:
    eou_id = start_eou(api)
    body = file_body(api, eou_id)
    with api.client("instrument") as c:
        r = c.post("/api/v1/raw_data_files", json=body)
        assert r.status_code == 201, r.text
        out = r.json()
        assert out["state"] == "unpackaged"
        assert out["name"] == f"scan_{0:05d}.fits"
        assert out["created_by_token_id"] is not None
        assert c.post("/api/v1/raw_data_files", json=body).status_code == 200
        r = c.post("/api/v1/raw_data_files", json={**body, "size": 99, "checksum": "0" * 64})
        assert r.status_code == 409
        assert r.json()["errors"][0]["fields"] == ["size", "checksum"]
        assert "size, checksum" in r.json()["detail"]
        # a different id at the same path is a conflict too
        r = c.post("/api/v1/raw_data_files", json={**body, "id": str(uuid.uuid4())})
        assert r.status_code == 409
        assert body["id"] in r.json()["detail"]
        r = c.get(f"/api/v1/raw_data_files/{body['id']}")
        assert r.json()["size"] == body["size"]
    engine = make_engine(api.db_url)
    with engine.connect() as conn:
        copies = conn.execute(
            text("SELECT copy_type, status FROM physical_copy WHERE raw_data_file_id = :i"),
            {"i": uuid.UUID(body["id"]) if "sqlite" in api.db_url else body["id"]},
        ).all()
        assert [tuple(x) for x in copies] == [("raw_data_file", "present")]
        audit = (
            conn.execute(
                text(
                    'SELECT u.username FROM api_audit_log a JOIN "user" u ON u.id = a.user_id '
                    "WHERE a.resource = 'raw_data_file' AND a.resource_ids::text LIKE :p"
                ),
                {"p": f"%{body['id']}%"},
            )
            .scalars()
            .all()
        )
        assert audit == ["test-instrument"]


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"relative_path": "/abs/path.fits"}, "relative_path"),
        ({"relative_path": "a/../b.fits"}, "relative_path"),
        ({"size": -1}, "size"),
        ({"checksum": "xyz"}, "checksum"),
        ({"checksum": "ab" * 10}, "checksum"),  # wrong length for sha256
        ({"checksum": "zz" * 32}, "checksum"),  # not hex
        ({"name": "scan\u0000.fits"}, "name"),  # the database cannot store a NUL
        ({"extra": {"note": "a\u0000b"}}, "extra"),  # nor in nested values
        ({"file_type": "fits\u0000"}, "file_type"),
        ({"written_at": "0001-01-01T00:00:00+01:00"}, "written_at"),  # before year 1 in UTC
        ({"written_at": "9999-12-31T23:59:59-01:00"}, "written_at"),  # after 9999 in UTC
        ({"checksum_algorithm": "crc32"}, "checksum_algorithm"),
        ({"instrument_module_id": 0}, "instrument_module_id"),
        ({"executed_obs_unit_id": "nope"}, "executed_obs_unit_id"),
        ({"unknown_field": 1}, "unknown_field"),
    ],
)
def test_file_bad_input_is_422_naming_the_field(api: ApiServer, override: dict, field: str) -> None:
    eou_id = start_eou(api)
    with api.client("instrument") as c:
        r = c.post("/api/v1/raw_data_files", json=file_body(api, eou_id, **override))
    assert r.status_code == 422, r.text
    assert any(e["loc"][-1] == field for e in r.json()["errors"]), r.json()


def test_file_unknown_references(api: ApiServer) -> None:
    eou_id = start_eou(api)
    with api.client("instrument") as c:
        r = c.post("/api/v1/raw_data_files", json=file_body(api, str(uuid.uuid4())))
        assert r.status_code == 422
        assert "start it first" in r.text
        r = c.post(
            "/api/v1/raw_data_files",
            json=file_body(api, eou_id, source_location_id=api.ids["cologne/lta"]),
        )
        assert r.status_code == 422
        assert "not a source" in r.text


def test_bulk_all_or_nothing_with_every_rejection_listed(api: ApiServer) -> None:
    eou_id = start_eou(api)
    files = [file_body(api, eou_id, n) for n in range(50)]
    files[7]["instrument_module_id"] = 999999
    files[31]["executed_obs_unit_id"] = str(uuid.uuid4())
    engine = make_engine(api.db_url)
    with engine.connect() as conn:
        before = conn.execute(select(func.count()).select_from(m.RawDataFile)).scalar()
    with api.client("instrument") as c:
        r = c.post("/api/v1/raw_data_files/bulk", json={"files": files})
        assert r.status_code == 422
        errs = r.json()["errors"]
        assert [e["loc"][:2] for e in errs] == [["files", 7], ["files", 31]]
        with engine.connect() as conn:
            after = conn.execute(select(func.count()).select_from(m.RawDataFile)).scalar()
        assert after == before  # nothing written
        files[7]["instrument_module_id"] = api.ids["CHAI/LFA"]
        files[31]["executed_obs_unit_id"] = eou_id
        r = c.post("/api/v1/raw_data_files/bulk", json={"files": files})
        assert r.status_code == 200, r.text
        assert r.json()["created"] == 50
        # refiling the same batch plus new ones: the old are unchanged, the new created
        more = [file_body(api, eou_id, n) for n in range(50, 60)]
        r = c.post("/api/v1/raw_data_files/bulk", json={"files": files + more})
        assert (r.json()["created"], r.json()["unchanged"]) == (10, 50)
        # one changed item rejects the whole request and is named
        changed = [dict(f) for f in files]
        changed[3]["size"] = 1
        extra = [file_body(api, eou_id, 99)]
        r = c.post("/api/v1/raw_data_files/bulk", json={"files": changed + extra})
        assert r.status_code == 409
        assert r.json()["errors"][0]["loc"] == ["files", 3]
        assert c.get(f"/api/v1/raw_data_files/{extra[0]['id']}").status_code == 404
        # validation errors carry the item index
        bad = [dict(f) for f in more]
        bad[4]["size"] = "big"
        r = c.post("/api/v1/raw_data_files/bulk", json={"files": bad})
        assert r.status_code == 422
        assert r.json()["errors"][0]["loc"][:4] == ["body", "files", 4, "size"]
        r = c.post("/api/v1/raw_data_files/bulk", json={"files": []})
        assert r.status_code == 422


def test_bulk_thousands_in_one_request(api: ApiServer) -> None:
    eou_id = start_eou(api)
    files = [file_body(api, eou_id, n) for n in range(5000)]
    with api.client("instrument") as c:
        r = c.post("/api/v1/raw_data_files/bulk", json={"files": files})
        assert r.status_code == 200, r.text[:500]
        assert r.json()["created"] == 5000
        seen: list[str] = []
        cursor = None
        while True:
            params = {"executed_obs_unit_id": eou_id, "limit": 1000}
            if cursor:
                params["cursor"] = cursor
            page = c.get("/api/v1/raw_data_files", params=params).json()
            seen += [x["id"] for x in page["items"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert len(seen) == 5000
        assert set(seen) == {f["id"] for f in files}


def test_list_filters_and_paging_bounds(api: ApiServer) -> None:
    eou_id = start_eou(api)
    with api.client("instrument") as c:
        files = [file_body(api, eou_id, n) for n in range(5)]
        files[4]["instrument_module_id"] = api.ids["CHAI/HFA"]
        assert c.post("/api/v1/raw_data_files/bulk", json={"files": files}).status_code == 200
        r = c.get(
            "/api/v1/raw_data_files",
            params={"executed_obs_unit_id": eou_id, "instrument_module_id": api.ids["CHAI/HFA"]},
        )
        assert [x["id"] for x in r.json()["items"]] == [files[4]["id"]]
        r = c.get(
            "/api/v1/raw_data_files",
            params={
                "executed_obs_unit_id": eou_id,
                "state": "unpackaged",
                "location_id": api.ids["ccat/chai_raw_data"],
            },
        )
        assert len(r.json()["items"]) == 5
        r = c.get(
            "/api/v1/raw_data_files", params={"executed_obs_unit_id": eou_id, "state": "archived"}
        )
        assert r.json()["items"] == []
        r = c.get(
            "/api/v1/raw_data_files",
            params={"executed_obs_unit_id": eou_id, "filed_after": "2999-01-01T00:00:00Z"},
        )
        assert r.json()["items"] == []
        r = c.get("/api/v1/raw_data_files", params={"limit": 10**6})
        assert r.json()["limit"] == 1000  # capped
        r = c.get("/api/v1/raw_data_files", params={"limit": 2, "executed_obs_unit_id": eou_id})
        first = r.json()
        assert len(first["items"]) == 2 and first["next_cursor"]
        r = c.get(
            "/api/v1/raw_data_files",
            params={"limit": 2, "executed_obs_unit_id": eou_id, "cursor": first["next_cursor"]},
        )
        assert {x["id"] for x in r.json()["items"]}.isdisjoint({x["id"] for x in first["items"]})
        assert c.get("/api/v1/raw_data_files", params={"cursor": "garbage!"}).status_code == 422
        assert c.get("/api/v1/raw_data_files", params={"limit": 0}).status_code == 422
        assert c.get("/api/v1/raw_data_files", params={"state": "lost"}).status_code == 422


# --- auth ----------------------------------------------------------------------------------


WRITE_ROUTES = [
    ("POST", "/api/v1/executed_obs_units/start", "file"),
    ("PUT", "/api/v1/executed_obs_units/6f1c0b8e-2d4a-4c5e-9b7a-3e8f0a1d2c4b/finish", "file"),
    ("POST", "/api/v1/raw_data_files", "file"),
    ("POST", "/api/v1/raw_data_files/bulk", "file"),
]


@pytest.mark.parametrize(("method", "path", "scope"), WRITE_ROUTES)
def test_write_routes_need_a_valid_token_with_scope(
    api: ApiServer, method: str, path: str, scope: str
) -> None:
    import httpx

    cases = {
        None: 401,
        "reader": 403,
        "overclaiming": 403,  # the token claims 'file' but its user has only 'read'
        "expired": 401,
        "revoked": 401,
    }
    for role, code in cases.items():
        with api.client(role) as c:
            r = c.request(method, path, json={})
        assert r.status_code == code, (role, r.text)
    for header in (
        "Bearer",
        "Bearer nonsense",
        "Basic abc",
        "Bearer ccat_" + "x" * 300,
        "Bearer ccat_unknowntoken",
    ):
        r = httpx.request(method, api.base_url + path, json={}, headers={"Authorization": header})
        assert r.status_code == 401, (header, r.text)
        assert r.headers.get("www-authenticate", "").startswith("Bearer")


def test_read_routes_need_a_token(api: ApiServer) -> None:
    with api.client(None) as c:
        assert c.get("/api/v1/raw_data_files").status_code == 401
        assert c.get("/api/v1/executed_obs_units").status_code == 401
        assert c.get("/healthz").status_code == 200
        assert c.get("/metrics").status_code == 200
    with api.client("reader") as c:
        assert c.get("/api/v1/raw_data_files").status_code == 200


def test_health_ready_and_metrics(api: ApiServer) -> None:
    with api.client(None) as c:
        r = c.get("/readyz")
        assert r.status_code == 200
        assert r.json()["revision"] == r.json()["head"]
        eou_id = start_eou(api)
        with api.client("instrument") as ci:
            ci.post("/api/v1/raw_data_files", json=file_body(api, eou_id, 1))
        text_ = c.get("/metrics").text
        assert "ccat_api_requests_total" in text_
        assert 'route="/api/v1/raw_data_files"' in text_
        assert "ccat_api_request_duration_seconds_bucket" in text_
        filed = [
            ln for ln in text_.splitlines() if ln.startswith("ccat_api_raw_data_files_filed_total ")
        ]
        assert filed and float(filed[0].split()[1]) >= 1


def test_readyz_reports_unmigrated_and_unreachable(pg_server: PgServer, tmp_path: Path) -> None:
    name = pg_server.create_database("notready")
    url = pg_server.url(name)
    with running_api(url, tmp_path, seed=False) as server:
        from ccat_ops_db import migrate as mig

        mig.downgrade(url, "base")
        with server.client(None) as c:
            r = c.get("/readyz")
            assert r.status_code == 503
            assert "expected" in r.json()["reason"]
            pg_server.drop_database(name)
            r = c.get("/readyz")
            assert r.status_code == 503
            assert r.json()["database"] == "unreachable"
            assert c.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"comment": "note\u0000"}, "comment"),
        ({"conditions": {"wind": ["calm", "gust\u0000"]}}, "conditions"),
    ],
)
def test_observation_text_with_a_nul_is_refused_naming_the_field(
    api: ApiServer, override: dict, field: str
) -> None:
    """A NUL cannot be stored: refused at once, not accepted (and buffered at the site) only
    to be refused for good later."""
    body = {
        "id": str(uuid.uuid4()),
        "start_time": "2026-05-01T03:00:00Z",
        "instrument_id": api.ids["CHAI"],
        **override,
    }
    with api.client("instrument") as c:
        r = c.post("/api/v1/executed_obs_units/start", json=body)
    assert r.status_code == 422, r.text
    (error,) = r.json()["errors"]
    assert error["loc"][-1] == field and "NUL" in error["msg"], error


def test_metrics_of_a_multi_process_api_count_every_process(
    pg_server: PgServer, tmp_path: Path
) -> None:
    """With ``--workers 2`` each request is answered by one of two processes and a scrape by
    either; the counts must be the sum over both, the same at every scrape. Before the shared
    metrics folder each scrape showed one process's share (about half, and a different half
    each time: a counter going down, which Prometheus reads as a restart)."""
    name = pg_server.create_database("twoproc")
    env = {"CCAT_API_WORKERS": "2", "CCAT_API_LOG_LEVEL": "info"}
    with running_api(pg_server.url(name), tmp_path, extra_env=env, seed=False) as server:
        for _ in range(40):  # a new connection each: both processes take some
            assert httpx.get(f"{server.base_url}/readyz", timeout=10).status_code == 200
        counts = []
        for _ in range(12):
            text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
            [line] = [
                x
                for x in text.splitlines()
                if x.startswith("ccat_api_requests_total{") and 'route="/readyz"' in x
            ]
            counts.append(float(line.rsplit(" ", 1)[1]))
            assert "ccat_api_up 1.0" in text, text
        assert counts == [40.0] * 12, counts
    # two processes answered (each logs with its pid), beside uvicorn's parent
    records = [json.loads(line) for line in server.log_path.read_text().splitlines()]
    [parent] = {r["pid"] for r in records if r["msg"].startswith("Started parent process")}
    assert len({r["pid"] for r in records} - {parent}) == 2, records
