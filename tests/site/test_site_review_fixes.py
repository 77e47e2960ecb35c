"""Review fixes of the observatory mode.

* A (source location, relative path) another file holds - in the buffer on its way to the main
  site, or in the replica - is refused at filing (409, as the main API words it), not parked
  at replay; a write filed again as it was but parked answers "parked" with the reason.
* A 404/400 that is not the main API's answer about the data (a wrong CCAT_API_MAIN_URL path
  prefix, a proxy) parks nothing: the replayer backs off and says why.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ops_db_api.filing import file_rows, insert_files
from ops_db_api.schemas.filing import RawDataFileIn
from ops_db_api.site.buffer import SiteBuffer, path_index
from ops_db_api.site.replayer import LinkConfigError, Replayer, refuses_content

from .conftest import Sites
from .helpers import eou_body, file_body

# --- A: paths across requests, and re-filing a parked write -------------------------------


def test_path_held_by_another_file_is_refused_like_the_main_site(sites: Sites) -> None:
    ids = sites.ids
    eou = eou_body(ids)
    a = file_body(ids, eou["id"], 1)
    b = {**file_body(ids, eou["id"], 2), "relative_path": a["relative_path"]}  # other id
    with sites.main_client() as c:  # what the main site answers, for comparison
        assert c.post("/api/v1/executed_obs_units/start", json=eou).status_code == 201
        assert c.post("/api/v1/raw_data_files", json=a).status_code == 201
        at_main = c.post("/api/v1/raw_data_files", json=b)
    assert at_main.status_code == 409
    with sites.obs_client() as obs:
        assert obs.post("/api/v1/executed_obs_units/start", json=eou).status_code == 202
        assert obs.post("/api/v1/raw_data_files", json=a).status_code == 202
        r = obs.post("/api/v1/raw_data_files", json=b)
        assert r.status_code == 409, r.text
        assert r.json() == at_main.json()  # same shape, same words
        assert r.json()["detail"] == f"path already filed at this location as file {a['id']}"
        assert r.json()["errors"][0]["loc"] == ["body", "relative_path"]
        assert obs.get(f"/api/v1/raw_data_files/{b['id']}").status_code == 404
        # in a bulk: all or nothing, the item named
        c3 = file_body(ids, eou["id"], 3)
        r = obs.post("/api/v1/raw_data_files/bulk", json={"files": [c3, b]})
        assert r.status_code == 409, r.text
        err = r.json()["errors"]
        assert [(e["loc"], e["type"]) for e in err] == [(["files", 1, "relative_path"], "conflict")]
        assert a["id"] in err[0]["msg"]
        assert obs.get(f"/api/v1/raw_data_files/{c3['id']}").status_code == 404
        # the same file again is still fine
        r = obs.post("/api/v1/raw_data_files", json=a)
        assert (r.status_code, r.json()["replication"]) == (200, "filed")

    # replayed (not yet in the replica): still holds its path
    rep = Replayer(SiteBuffer(sites.buffer_db), sites.main_url, sites.main_tokens["instrument"])
    try:
        done = rep.drain_once()
    finally:
        rep.close()
        rep.buffer.dispose()
    assert (done.replayed, done.parked, done.error) == (2, 0, None)
    with sites.obs_client() as obs:
        assert obs.get(f"/api/v1/raw_data_files/{a['id']}").json()["replication"] == "replayed"
        r = obs.post("/api/v1/raw_data_files", json=b)
        assert r.status_code == 409
        assert a["id"] in r.json()["detail"]
    assert sites.buffer_status()["depth"] == 0


def test_path_held_in_the_replica_is_refused(sites: Sites) -> None:
    """A file that reached the replica (filed at the main site by another way)."""
    ids = sites.ids
    eou = eou_body(ids)
    x = file_body(ids, eou["id"], 1)
    eng = create_engine(sites.replica_db)
    with Session(eng) as db:
        db.add(
            m.ExecutedObsUnit(
                id=uuid.UUID(eou["id"]),
                instrument_id=ids["CHAI"],
                start_time=dt.datetime(2026, 5, 1, 3, tzinfo=dt.UTC),
            )
        )
        db.flush()
        rows, _ = file_rows(db, [RawDataFileIn.model_validate(x)], None)
        insert_files(db, rows)
        db.commit()
    eng.dispose()
    y = {**file_body(ids, eou["id"], 2), "relative_path": x["relative_path"]}
    with sites.obs_client() as obs:
        r = obs.post("/api/v1/raw_data_files", json=y)
        assert r.status_code == 409, r.text
        assert r.json()["detail"] == f"path already filed at this location as file {x['id']}"
        # the replica's own file filed again: 200, nothing buffered
        assert obs.post("/api/v1/raw_data_files", json=x).status_code == 200
        # at another path: buffered
        r = obs.post("/api/v1/raw_data_files", json={**y, "relative_path": "other/y.fits"})
        assert r.status_code == 202, r.text
    assert sites.buffer_status()["depth"] == 1


def test_concurrent_filings_of_one_path_buffer_one_file(sites: Sites) -> None:
    ids = sites.ids
    eou = eou_body(ids)
    with sites.obs_client() as obs:
        assert obs.post("/api/v1/executed_obs_units/start", json=eou).status_code == 202
    bodies = [file_body(ids, eou["id"], 7) for _ in range(8)]  # 8 ids, one path
    codes: list[int] = []
    go = threading.Barrier(len(bodies))

    def file(body: dict[str, Any]) -> None:
        with sites.obs_client() as c:
            go.wait()
            codes.append(c.post("/api/v1/raw_data_files/bulk", json={"files": [body]}).status_code)

    threads = [threading.Thread(target=file, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [202] + [409] * 7
    assert sites.buffer_status()["depth"] == 2  # the start and one file


def test_refiling_a_parked_write_answers_parked(sites: Sites) -> None:
    """The reviewer's sequence: a file buffered before the path check existed is parked at
    replay ("path already filed"); filing it again answers that, never "filed"."""
    ids = sites.ids
    eou = eou_body(ids)
    a = file_body(ids, eou["id"], 1)
    b = {**file_body(ids, eou["id"], 2), "relative_path": a["relative_path"]}
    with sites.obs_client() as obs:
        assert obs.post("/api/v1/executed_obs_units/start", json=eou).status_code == 202
        assert obs.post("/api/v1/raw_data_files", json=a).status_code == 202
    buf = SiteBuffer(sites.buffer_db)
    payload = RawDataFileIn.model_validate(b).model_dump(mode="json")
    with buf.engine.begin() as conn:  # as an observatory without the path check buffered it
        assert buf.insert_new(conn, "file", [(uuid.UUID(b["id"]), payload)], None) == 1
    # a start the main site knows with other values: parked too
    other = eou_body(ids)
    with sites.main_client() as c:
        assert c.post("/api/v1/executed_obs_units/start", json=other).status_code == 201
    with sites.obs_client() as obs:
        changed = {**other, "start_time": "2026-05-01T04:00:00Z"}
        assert obs.post("/api/v1/executed_obs_units/start", json=changed).status_code == 202
    rep = Replayer(buf, sites.main_url, sites.main_tokens["instrument"])
    try:
        done = rep.drain_once()
    finally:
        rep.close()
        buf.dispose()
    assert (done.replayed, done.parked, done.error) == (2, 2, None)

    with sites.obs_client() as obs:
        assert obs.get(f"/api/v1/raw_data_files/{b['id']}").json()["replication"] == "parked"
        r = obs.post("/api/v1/raw_data_files", json=b)
        assert r.status_code == 409, r.text
        body = r.json()
        assert "parked" in body["detail"]
        assert f"path already filed at this location as file {a['id']}" in body["detail"]
        (err,) = body["errors"]
        assert (err["type"], err["replication"], err["status_code"]) == ("parked", "parked", 409)
        assert err["loc"] == ["body"]
        assert a["id"] in err["reason"]
        # in a bulk: refused with the others, nothing buffered
        c3 = file_body(ids, eou["id"], 3)
        r = obs.post("/api/v1/raw_data_files/bulk", json={"files": [b, c3]})
        assert r.status_code == 409
        assert r.json()["errors"][0]["loc"] == ["files", 0]
        assert r.json()["errors"][0]["type"] == "parked"
        assert obs.get(f"/api/v1/raw_data_files/{c3['id']}").status_code == 404
        # other content than the parked one: the usual conflict naming the field
        r = obs.post("/api/v1/raw_data_files", json={**b, "size": 1})
        assert r.status_code == 409
        assert "size" in r.json()["detail"]
        # the parked start, filed again as it was
        r = obs.post("/api/v1/executed_obs_units/start", json=changed)
        assert r.status_code == 409, r.text
        assert r.json()["errors"][0]["type"] == "parked"
        assert "start_time" in r.json()["errors"][0]["reason"]
        # the replayed file filed again as it was: still 200
        assert obs.post("/api/v1/raw_data_files", json=a).status_code == 200
    assert sites.buffer_status()["parked"] == 2


def test_path_index_is_added_to_an_older_buffer(tmp_path: Path) -> None:
    buf = SiteBuffer(f"sqlite:///{tmp_path}/b.sqlite")
    buf.create_schema()
    path_index.drop(buf.engine)

    def indexes() -> set[str]:
        with buf.engine.connect() as conn:
            return set(conn.scalars(text("SELECT name FROM sqlite_master WHERE type = 'index'")))

    assert path_index.name not in indexes()
    buf.create_schema()
    buf.create_schema()
    assert path_index.name in indexes()
    buf.dispose()


# --- B: 404/400 that is not the main API's answer about the data --------------------------


def test_wrong_url_prefix_parks_nothing_and_replays_once_fixed(sites: Sites) -> None:
    ids = sites.ids
    eou = eou_body(ids)
    f = file_body(ids, eou["id"], 1)
    with sites.obs_client() as obs:
        assert obs.post("/api/v1/executed_obs_units/start", json=eou).status_code == 202
        assert obs.post("/api/v1/raw_data_files", json=f).status_code == 202
    buf = SiteBuffer(sites.buffer_db)
    unknown = uuid.uuid4()  # the finish of an observation the main site does not know
    finish = {"end_time": "2026-05-01T04:00:00Z", "status": "completed"}
    with buf.engine.begin() as conn:
        assert buf.insert_new(conn, "eou_finish", [(unknown, finish)], None) == 1
    token = sites.main_tokens["instrument"]

    # what the main API answers for a route it does not have: its own shape, bare phrase
    r = httpx.post(
        f"{sites.main_url}/wrong/api/v1/raw_data_files/bulk",
        json={"files": [f]},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert (r.status_code, r.json()) == (404, {"detail": "Not Found", "errors": []})
    assert not refuses_content(r)

    wrong = Replayer(buf, f"{sites.main_url}/wrong", token)
    try:
        done = wrong.drain_once()
    finally:
        wrong.close()
    assert (done.replayed, done.parked) == (0, 0)
    assert done.error is not None and "CCAT_API_MAIN_URL" in done.error
    st = sites.buffer_status()
    assert (st["depth"], st["parked"]) == (3, 0)
    assert "not the main API's answer" in str(st["last_error"])
    r = sites.cli("buffer", "status", "--json")
    assert "CCAT_API_MAIN_URL" in r.stdout

    # the right URL: everything goes, and the main API's own 404 (unknown observation) parks
    right = Replayer(buf, sites.main_url, token)
    try:
        done = right.drain_once()
    finally:
        right.close()
        buf.dispose()
    assert (done.replayed, done.parked, done.error) == (2, 1, None)
    st = sites.buffer_status()
    assert (st["depth"], st["parked"]) == (0, 1)
    with sites.obs_client("reader") as obs:
        (p,) = obs.get("/api/v1/site/parked").json()["items"]
    assert (p["id"], p["status_code"]) == (str(unknown), 404)
    assert f"executed obs unit {unknown} not found" in p["reason"]


def _mock_replayer(tmp_path: Path, answer: httpx.Response) -> tuple[Replayer, SiteBuffer]:
    buf = SiteBuffer(f"sqlite:///{tmp_path}/b.sqlite")
    buf.create_schema()
    with buf.engine.begin() as conn:
        buf.insert_new(conn, "eou_start", [(uuid.uuid4(), {"start_time": "x"})], 1)
        buf.insert_new(conn, "file", [(uuid.uuid4(), {"n": i}) for i in range(3)], 1)
        buf.insert_new(conn, "eou_finish", [(uuid.uuid4(), {"end_time": "x"})], 1)
    rep = Replayer(buf, "http://main.invalid/prefix", "ccat_x")
    rep.client.close()
    rep.client = httpx.Client(
        base_url="http://main.invalid/prefix",
        transport=httpx.MockTransport(
            lambda req: httpx.Response(
                answer.status_code, headers=answer.headers, content=answer.content
            )
        ),
    )
    return rep, buf


NOT_THE_API = {
    "proxy HTML 404": httpx.Response(404, html="<html><h1>404 Not Found</h1>nginx</html>"),
    "proxy HTML 400": httpx.Response(400, html="<html><h1>400 Bad Request</h1></html>"),
    "bare JSON": httpx.Response(404, json={"detail": "Not Found"}),
    "unknown route": httpx.Response(404, json={"detail": "Not Found", "errors": []}),
    "bad request": httpx.Response(400, json={"detail": "Bad Request", "errors": []}),
    "plain text": httpx.Response(404, text="no such thing"),
    "empty": httpx.Response(400),
}


@pytest.mark.parametrize("answer", list(NOT_THE_API.values()), ids=list(NOT_THE_API))
def test_404_400_not_from_the_api_parks_nothing(tmp_path: Path, answer: httpx.Response) -> None:
    rep, buf = _mock_replayer(tmp_path, answer)
    try:
        done = rep.drain_once()
        st = buf.status()
    finally:
        rep.close()
        buf.dispose()
    assert (done.parked, done.replayed, done.requests) == (0, 0, 1)
    assert done.error is not None and "CCAT_API_MAIN_URL" in done.error
    assert (st.depth, st.parked) == (5, 0)
    assert st.last_error == done.error


def test_the_api_404_and_400_park(tmp_path: Path) -> None:
    api_404 = httpx.Response(404, json={"detail": "executed obs unit 1 not found", "errors": []})
    rep, buf = _mock_replayer(tmp_path, api_404)
    try:
        done = rep.drain_once()
    finally:
        rep.close()
        buf.dispose()
    assert (done.parked, done.error) == (5, None)
    bad = httpx.Response(400, json={"detail": "There was an error parsing the body", "errors": []})
    assert refuses_content(bad)
    for status in (409, 413, 422):
        assert refuses_content(httpx.Response(status, json={"detail": "x", "errors": []}))
    assert not refuses_content(httpx.Response(503, json={"detail": "x", "errors": []}))


PROXY_REFUSALS = {
    "proxy HTML 409": httpx.Response(409, html="<html><h1>409 Conflict</h1>nginx</html>"),
    "proxy HTML 422": httpx.Response(422, html="<html><h1>422</h1></html>"),
    "proxy HTML 413": httpx.Response(
        413, html="<html><h1>413 Request Entity Too Large</h1>nginx</html>"
    ),
    "proxy JSON 409": httpx.Response(409, json={"message": "conflict"}),
    "plain 422": httpx.Response(422, text="unprocessable"),
}


@pytest.mark.parametrize("answer", list(PROXY_REFUSALS.values()), ids=list(PROXY_REFUSALS))
def test_a_proxy_409_413_422_parks_nothing(tmp_path: Path, answer: httpx.Response) -> None:
    """Only the main API's error document refuses the data: a proxy's page for 409/413/422
    parked writes the main site never saw (before, they were parked for good)."""
    assert not refuses_content(answer)
    rep, buf = _mock_replayer(tmp_path, answer)
    try:
        done = rep.drain_once()
        st = buf.status()
    finally:
        rep.close()
        buf.dispose()
    assert (done.parked, done.replayed, done.requests) == (0, 0, 1)
    assert done.error is not None and "not the main API's answer" in done.error
    assert "CCAT_API_MAIN_URL" in done.error and "proxy" in done.error
    assert (st.depth, st.parked) == (5, 0)


def test_a_proxy_413_on_a_bulk_splits_it(tmp_path: Path) -> None:
    """A proxy with a small body-size limit: bulks over it are halved until they pass, so
    every file arrives once and nothing is parked; a file too large even alone waits, with
    an error that names the proxy's limit, and the files after it wait behind it (order)."""
    buf = SiteBuffer(f"sqlite:///{tmp_path}/b.sqlite")
    buf.create_schema()
    with buf.engine.begin() as conn:
        buf.insert_new(conn, "file", [(uuid.uuid4(), {"n": i, "pad": "x"}) for i in range(9)], 1)
    limit = 100  # bytes: about three files per request
    seen: list[int] = []

    def proxy(req: httpx.Request) -> httpx.Response:
        if len(req.content) > limit:
            return httpx.Response(413, html="<html><h1>413 Request Entity Too Large</h1></html>")
        seen.extend(f["n"] for f in json.loads(req.content)["files"])
        return httpx.Response(200, json={"filed": 1})

    rep = Replayer(buf, "http://main.invalid", "ccat_x")
    rep.client.close()
    rep.client = httpx.Client(base_url="http://main.invalid", transport=httpx.MockTransport(proxy))
    try:
        done = rep.drain_once()
        st = buf.status()
        assert (done.replayed, done.parked, done.error) == (9, 0, None)
        assert sorted(seen) == list(range(9)) and seen == sorted(seen)
        assert (st.depth, st.parked) == (0, 0)
        assert done.requests > 2  # it was split

        # one file larger than the limit on its own: nothing parked, the error says why
        with buf.engine.begin() as conn:
            buf.insert_new(conn, "file", [(uuid.uuid4(), {"n": 100, "pad": "y" * 400})], 1)
            buf.insert_new(conn, "file", [(uuid.uuid4(), {"n": 101})], 1)
        done = rep.drain_once()
        st = buf.status()
    finally:
        rep.close()
        buf.dispose()
    assert (done.replayed, done.parked) == (0, 0)
    assert done.error is not None and "body-size limit" in done.error
    assert (st.depth, st.parked) == (2, 0)


def test_link_config_error_is_a_link_error() -> None:
    """The service loop backs off for it as for any link error (follow() counts failures)."""
    from ops_db_api.site.replayer import LinkDownError

    assert issubclass(LinkConfigError, LinkDownError)
