"""The async single-file filing path (PostgreSQL) answers exactly as the full check does.

Two API processes on the same database: one with the fast path (the default), one with
``CCAT_API_FAST_FILING=false``. Every case is sent to both and must give the same status and
body; on top: concurrent refiling, lost database connections, values PostgreSQL cannot store,
and token revocation through the token cache.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import hashlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ccat_ops_db.db import make_engine

from .api_server import ApiServer, running_api
from .conftest import PgServer

FILES = "/api/v1/raw_data_files"


@pytest.fixture(scope="module")
def servers(
    pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ApiServer, ApiServer]]:
    """(fast path on, fast path off) on one database; the token cache is kept short."""
    name = pg_server.create_database("fast")
    url = pg_server.url(name)
    work = tmp_path_factory.mktemp("fast")
    env = {"CCAT_API_TOKEN_CACHE_TTL_S": "0.5"}
    with (
        running_api(url, work, extra_env=env) as fast,
        running_api(
            url, work, extra_env={**env, "CCAT_API_FAST_FILING": "false"}, seed=False
        ) as slow,
    ):
        slow.tokens, slow.ids = fast.tokens, fast.ids
        yield fast, slow
    pg_server.drop_database(name)


def start_eou(api: ApiServer) -> str:
    eou_id = str(uuid.uuid4())
    body = {"id": eou_id, "start_time": "2026-05-01T03:00:00Z", "instrument_id": api.ids["CHAI"]}
    with api.client("instrument") as c:
        assert c.post("/api/v1/executed_obs_units/start", json=body).status_code == 201
    return eou_id


def file_body(api: ApiServer, eou_id: str, **overrides: Any) -> dict[str, Any]:
    fid = str(uuid.uuid4())
    return {
        "id": fid,
        "relative_path": f"fast/{eou_id}/{fid}.fits",
        "size": 1234,
        "checksum": hashlib.sha256(fid.encode()).hexdigest(),
        "instrument_module_id": api.ids["CHAI/LFA"],
        "executed_obs_unit_id": eou_id,
        "source_location_id": api.ids["ccat/chai_raw_data"],
        **overrides,
    }


def comparable(r: httpx.Response) -> tuple[int, Any]:
    """Status and body, without what legitimately differs between two filings."""
    body = r.json()
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in ("id", "created_at", "name", "checksum")}
        if "relative_path" in body:
            body["relative_path"] = body["relative_path"].rsplit("/", 1)[0]
        if "detail" in body:
            body["detail"] = "<detail>"  # names ids; compared separately where it matters
    return r.status_code, body


def test_fast_and_full_path_answer_alike(servers: tuple[ApiServer, ApiServer]) -> None:
    fast, slow = servers
    eou_id = start_eou(fast)
    cases: list[tuple[str, dict[str, Any]]] = [
        ("new", {}),
        (
            "new with every field",
            {
                "file_type": "fits",
                "written_at": "2026-05-01T03:01:02.5+02:00",
                "extra": {"scan": 7, "tags": ["a", "ü"], "nested": {"x": 1.5}},
                "checksum_algorithm": "md5",
                "checksum": "D41D8CD98F00B204E9800998ECF8427E",
                "name": "explicit-name.fits",
            },
        ),
        ("unknown module", {"instrument_module_id": 999_999}),
        ("unknown execution", {"executed_obs_unit_id": str(uuid.uuid4())}),
        ("not a source", {"source_location_id": fast.ids["cologne/lta"]}),
        ("unknown location", {"source_location_id": 999_999}),
        ("NUL in name", {"name": "a\x00b"}),
        ("NUL in extra", {"extra": {"k": "a\x00b"}}),
    ]
    for label, overrides in cases:
        answers = []
        for api in (fast, slow):
            body = file_body(fast, eou_id, **overrides)
            with api.client("instrument") as c:
                r = c.post(FILES, json=body)
            assert r.status_code < 500, (label, r.text)
            answers.append(comparable(r))
            if r.status_code == 201:
                with api.client("instrument") as c:
                    got = c.get(f"{FILES}/{body['id']}").json()
                assert {k: v for k, v in got.items() if k != "state"} == {
                    k: v for k, v in r.json().items() if k != "state"
                }, label
        assert answers[0] == answers[1], label


def test_refiling_and_conflicts_through_both_paths(servers: tuple[ApiServer, ApiServer]) -> None:
    fast, slow = servers
    eou_id = start_eou(fast)
    body = file_body(fast, eou_id, extra={"a": 1})
    with fast.client("instrument") as cf, slow.client("instrument") as cs:
        first = cf.post(FILES, json=body)
        assert first.status_code == 201
        for c in (cf, cs):
            again = c.post(FILES, json=body)
            assert again.status_code == 200
            assert again.json() == first.json()
            r = c.post(FILES, json={**body, "size": 1, "extra": None})
            assert r.status_code == 409
            assert r.json()["errors"][0]["fields"] == ["size", "extra"]
            r = c.post(FILES, json={**body, "id": str(uuid.uuid4())})
            assert r.status_code == 409
            assert body["id"] in r.json()["detail"]


def test_concurrent_filings_of_one_file(servers: tuple[ApiServer, ApiServer]) -> None:
    """32 clients file the same UUID at once: one 201, the rest 200; other content: 409."""
    fast, _ = servers
    eou_id = start_eou(fast)
    body = file_body(fast, eou_id)
    other = {**body, "size": 1}

    def post(payload: dict[str, Any]) -> int:
        with fast.client("instrument") as c:
            return c.post(FILES, json=payload).status_code

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        codes = list(pool.map(post, [body] * 24 + [other] * 8))
    same, changed = codes[:24], codes[24:]
    if 201 in same:
        assert sorted(same) == [200] * 23 + [201]
        assert changed == [409] * 8
    else:  # the other content won the race
        assert same == [409] * 24
        assert sorted(changed) == [200] * 7 + [201]
    engine = make_engine(fast.db_url)
    with engine.connect() as conn:
        n_files, n_copies, n_audit = conn.execute(
            text(
                "SELECT (SELECT count(*) FROM raw_data_file WHERE id = :i),"
                " (SELECT count(*) FROM physical_copy WHERE raw_data_file_id = :i),"
                " (SELECT count(*) FROM api_audit_log WHERE resource_ids ->> 0 = :s)"
            ),
            {"i": body["id"], "s": body["id"]},
        ).one()
    engine.dispose()
    assert (n_files, n_copies, n_audit) == (1, 1, 1)


def test_file_copy_and_audit_in_one_transaction(servers: tuple[ApiServer, ApiServer]) -> None:
    fast, _ = servers
    eou_id = start_eou(fast)
    bodies = [file_body(fast, eou_id) for _ in range(20)]
    with fast.client("instrument") as c:
        for b in bodies:
            assert c.post(FILES, json=b).status_code == 201
    engine = make_engine(fast.db_url)
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT f.created_by_token_id, c.copy_type, c.status, l.location_type, c.size,"
                " c.checksum = f.checksum, a.user_id, a.token_id, a.method, a.path,"
                " a.status_code, a.item_count, u.username"
                " FROM raw_data_file f"
                " JOIN physical_copy c ON c.raw_data_file_id = f.id"
                " JOIN data_location l ON l.id = c.data_location_id"
                " JOIN api_audit_log a ON a.resource_ids ->> 0 = f.id::text"
                ' JOIN "user" u ON u.id = a.user_id'
                " WHERE f.executed_obs_unit_id = :e"
            ),
            {"e": eou_id},
        ).all()
    engine.dispose()
    assert len(rows) == 20
    for row in rows:
        token_id, copy_type, status, loc_type, size, same_sum, user_id, audit_token, *rest = row
        assert (copy_type, status, loc_type, size, same_sum) == (
            "raw_data_file",
            "present",
            "source",
            1234,
            True,
        )
        assert token_id == audit_token and user_id is not None
        assert rest == ["POST", FILES, 201, 1, "test-instrument"]


def test_filing_survives_lost_database_connections(
    servers: tuple[ApiServer, ApiServer],
) -> None:
    fast, _ = servers
    eou_id = start_eou(fast)
    with fast.client("instrument") as c:
        assert c.post(FILES, json=file_body(fast, eou_id)).status_code == 201
        engine = make_engine(fast.db_url)
        with engine.connect() as conn:
            killed = conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalar()
        engine.dispose()
        assert killed >= 1
        for _ in range(10):
            r = c.post(FILES, json=file_body(fast, eou_id))
            assert r.status_code == 201, r.text


def test_revoked_token_is_refused_within_the_cache_ttl(
    servers: tuple[ApiServer, ApiServer],
) -> None:
    fast, _ = servers
    eou_id = start_eou(fast)
    engine = make_engine(fast.db_url)
    with Session(engine) as s, s.begin():
        user = s.query(m.User).filter_by(username="test-instrument").one()
        row, raw = m.ApiToken.issue(user, "to-revoke", ["read", "file"])
        s.add(row)
    headers = {"Authorization": f"Bearer {raw}"}
    with httpx.Client(base_url=fast.base_url, headers=headers, timeout=30) as c:
        assert c.post(FILES, json=file_body(fast, eou_id)).status_code == 201
        with Session(engine) as s, s.begin():
            s.query(m.ApiToken).filter_by(name="to-revoke").update(
                {"revoked_at": dt.datetime.now(dt.UTC)}
            )
        time.sleep(0.6)  # the servers' token_cache_ttl_s is 0.5 s
        r = c.post(FILES, json=file_body(fast, eou_id))
        assert r.status_code == 401
        assert "revoked" in r.json()["detail"]
    engine.dispose()


def test_bulk_with_unstorable_values_is_422_and_writes_nothing(
    servers: tuple[ApiServer, ApiServer],
) -> None:
    fast, _ = servers
    eou_id = start_eou(fast)
    files = [file_body(fast, eou_id) for _ in range(30)]  # > 20: the COPY path
    files[12]["name"] = "bad\x00name"
    with fast.client("instrument") as c:
        r = c.post(f"{FILES}/bulk", json={"files": files})
        assert r.status_code == 422, r.text
        assert c.get(f"{FILES}/{files[0]['id']}").status_code == 404


def test_concurrent_bulk_filings_of_the_same_files(servers: tuple[ApiServer, ApiServer]) -> None:
    """Identical bulk requests at once: one creates, the others find everything unchanged."""
    fast, _ = servers
    eou_id = start_eou(fast)
    files = [file_body(fast, eou_id) for _ in range(300)]

    def post(_: int) -> tuple[int, int, int]:
        with fast.client("instrument") as c:
            r = c.post(f"{FILES}/bulk", json={"files": files})
        assert r.status_code == 200, r.text
        return r.status_code, r.json()["created"], r.json()["unchanged"]

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = sorted(pool.map(post, range(6)))
    assert sum(created for _, created, _ in results) == 300
    assert all(created + unchanged == 300 for _, created, unchanged in results)
