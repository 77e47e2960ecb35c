"""Body limits over real HTTP: oversized bodies answer 413 (with or without Content-Length),
JSON nested too deeply answers 422 before any parser recurses, and neither changes a row.
A bulk filing of 10,000 files - the largest request the instruments send - still fits."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator
from urllib.parse import urlparse

import pytest
from sqlalchemy import Engine

from ops_db_api.limits import json_depth
from ops_db_api.settings import ApiSettings

from ..api_server import ApiServer, running_api
from ..conftest import PgServer
from .conftest import diff_tables, snapshot

SMALL_LIMIT = 64 * 1024
SMALL_DEPTH = 16


@pytest.fixture(scope="module")
def small_api(pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """An API with small limits (64 KiB, depth 16), so the edges are cheap to reach."""
    name = pg_server.create_database("limits")
    env = {
        "CCAT_API_MAX_BODY_BYTES": str(SMALL_LIMIT),
        "CCAT_API_MAX_JSON_DEPTH": str(SMALL_DEPTH),
    }
    with running_api(pg_server.url(name), tmp_path_factory.mktemp("lim"), extra_env=env) as api:
        yield api
    pg_server.drop_database(name)


def eou_body(api: ApiServer, **extra: object) -> dict[str, object]:
    return {
        "id": str(uuid.uuid4()),
        "start_time": "2026-05-01T03:00:00Z",
        "instrument_id": api.ids["CHAI"],
        **extra,
    }


def raw_request(api: ApiServer, head: bytes, chunks: list[bytes]) -> tuple[int, dict, bytes]:
    """Send ``head`` and then ``chunks`` on a plain socket (stop early if the server answers);
    returns (status, headers, body) of the response."""
    url = urlparse(api.base_url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(head)
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        data = b""
        while True:
            try:
                part = sock.recv(65536)
            except ConnectionResetError:
                break
            if not part:
                break
            data += part
            if b"\r\n\r\n" in data:
                head_part, _, rest = data.partition(b"\r\n\r\n")
                headers = dict(
                    line.decode().lower().split(": ", 1) for line in head_part.split(b"\r\n")[1:]
                )
                if len(rest) >= int(headers.get("content-length", "0")):
                    break
    assert data, "no response at all"
    head_part, _, rest = data.partition(b"\r\n\r\n")
    status = int(head_part.split(b" ", 2)[1])
    headers = dict(line.decode().lower().split(": ", 1) for line in head_part.split(b"\r\n")[1:])
    return status, headers, rest


def assert_refused(status: int, body: bytes, code: int, setting: str) -> None:
    assert status == code, body[:300]
    doc = json.loads(body)
    assert setting in doc["detail"], doc
    assert doc["errors"][0]["loc"] == ["body"]


def test_json_depth_counts_nesting_and_skips_strings() -> None:
    assert json_depth(b"1") == 0
    assert json_depth(b"{}") == 1
    assert json_depth(b'{"a": [1, {"b": []}]}') == 4
    assert json_depth(b'{"a": "[[[[{{{{"}') == 1
    assert json_depth(b'{"a": "x\\"[[[["}') == 1  # escaped quote inside the string
    assert json_depth(b"[" * 10_000, stop_at=64) == 65  # stops early
    assert json_depth(b"]]]][[") == 2  # unbalanced closers are ignored


def test_content_length_over_the_limit_is_413_without_reading(
    small_api: ApiServer,
) -> None:
    engine_before = snapshot_of(small_api)
    size = SMALL_LIMIT + 1
    head = (
        b"POST /api/v1/executed_obs_units/start HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer " + small_api.tokens["admin"].encode() + b"\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: " + str(size).encode() + b"\r\n\r\n"
    )
    # Only the headers are sent: the answer comes before a byte of the body.
    status, headers, body = raw_request(small_api, head, [])
    assert_refused(status, body, 413, "CCAT_API_MAX_BODY_BYTES")
    assert headers.get("connection") == "close"
    assert diff_tables(engine_before, snapshot_of(small_api)) == []


def test_chunked_body_over_the_limit_is_413(small_api: ApiServer) -> None:
    before = snapshot_of(small_api)
    head = (
        b"POST /api/v1/raw_data_files/bulk HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer " + small_api.tokens["admin"].encode() + b"\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    piece = b'{"files": [' + b" " * 8000
    chunks = []
    total = 0
    while total <= SMALL_LIMIT + 8192:  # just past the limit, and no terminating chunk
        chunks.append(b"%x\r\n%s\r\n" % (len(piece), piece))
        total += len(piece)
    status, _headers, body = raw_request(small_api, head, chunks)
    assert_refused(status, body, 413, "CCAT_API_MAX_BODY_BYTES")
    assert diff_tables(before, snapshot_of(small_api)) == []


def test_chunked_body_under_the_limit_is_accepted(small_api: ApiServer) -> None:
    body = json.dumps(eou_body(small_api, comment="c" * 3000)).encode()

    def pieces() -> Iterator[bytes]:  # httpx sends a generator chunked (no Content-Length)
        for i in range(0, len(body), 500):
            yield body[i : i + 500]

    with small_api.client("admin") as c:
        r = c.post(
            "/api/v1/executed_obs_units/start",
            content=pieces(),
            headers={"content-type": "application/json"},
        )
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert r.status_code == 201, r.text


def test_body_just_over_the_limit_via_httpx_is_413(small_api: ApiServer) -> None:
    body = json.dumps(eou_body(small_api, comment="c" * (SMALL_LIMIT + 10))).encode()
    before = snapshot_of(small_api)
    with small_api.client("admin") as c:
        r = c.post(
            "/api/v1/executed_obs_units/start",
            content=body,
            headers={"content-type": "application/json"},
        )
    assert_refused(r.status_code, r.content, 413, "CCAT_API_MAX_BODY_BYTES")
    assert diff_tables(before, snapshot_of(small_api)) == []


@pytest.mark.parametrize(
    "make",
    [
        lambda n: b"[" * n + b"]" * n,
        lambda n: b'{"a":' * n + b"1" + b"}" * n,
        lambda n: b"[" * n,  # not even closed
    ],
    ids=["arrays", "objects", "unclosed"],
)
def test_deep_json_is_422_before_parsing(small_api: ApiServer, sec_api: ApiServer, make) -> None:
    for api, depth in ((small_api, SMALL_DEPTH + 1), (sec_api, 200_000)):
        before = snapshot_of(api)
        with api.client("admin") as c:
            for path in ("/api/v1/executed_obs_units/start", "/api/v1/raw_data_files/bulk"):
                r = c.post(path, content=make(depth), headers={"content-type": "application/json"})
                assert_refused(r.status_code, r.content, 422, "CCAT_API_MAX_JSON_DEPTH")
        assert diff_tables(before, snapshot_of(api)) == []


def test_nesting_up_to_the_limit_and_brackets_in_strings_are_fine(small_api: ApiServer) -> None:
    nested: object = 1
    for _ in range(SMALL_DEPTH - 1):  # the body itself is one level
        nested = {"k": nested}
    with small_api.client("admin") as c:
        r = c.post("/api/v1/executed_obs_units/start", json=eou_body(small_api, conditions=nested))
        assert r.status_code == 201, r.text
        assert r.json()["conditions"] == nested
        r = c.post(
            "/api/v1/executed_obs_units/start",
            json=eou_body(small_api, comment="[{" * 1500),
        )
        assert r.status_code == 201, r.text


def test_default_limit_fits_a_bulk_of_10000_files_and_refuses_more(
    sec_api: ApiServer, sec_engine: Engine
) -> None:
    limit = ApiSettings().max_body_bytes
    eou = str(sec_api.ids["eou"])
    files = [
        {
            "id": str(uuid.uuid4()),
            "relative_path": f"2026/05/01/{eou}/bulk_limit_{n:05d}_{'x' * 150}.fits",
            "size": 52_428_800,
            "checksum": f"{n:064x}",
            "instrument_module_id": sec_api.ids["CHAI/LFA"],
            "executed_obs_unit_id": eou,
            "source_location_id": sec_api.ids["ccat/chai_raw_data"],
            "file_type": "fits",
            "written_at": "2026-05-01T03:00:00.123456+00:00",
            "extra": {"scan": n, "subscan": 3, "backend": "spectrometer", "note": "n" * 200},
        }
        for n in range(10_000)
    ]
    body = json.dumps({"files": files}).encode()
    assert len(body) < limit / 2, f"10,000 files take {len(body)} bytes of {limit}"
    with sec_api.client("instrument") as c:
        r = c.post(
            "/api/v1/raw_data_files/bulk",
            content=body,
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 200, r.text[:500]
        assert r.json()["created"] == 10_000
        before = snapshot(sec_engine)
        too_big = b'{"files": [' + b" " * limit + b"]}"
        r = c.post(
            "/api/v1/raw_data_files/bulk",
            content=too_big,
            headers={"content-type": "application/json"},
        )
        assert_refused(r.status_code, r.content, 413, "CCAT_API_MAX_BODY_BYTES")
    assert diff_tables(before, snapshot(sec_engine)) == []


def snapshot_of(api: ApiServer) -> dict:
    from ccat_ops_db.db import make_engine

    engine = make_engine(api.db_url)
    try:
        return snapshot(engine)
    finally:
        engine.dispose()
