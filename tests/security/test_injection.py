"""SQL and LIKE injection through every filter parameter of every list route (from OpenAPI).

Every payload is sent in every filter: the answer is never a 5xx, nothing in the database
changes, and a 200 lists exactly what literal matching would: no row has a value like
``' OR 1=1 --``, so equality filters return nothing, and the one substring filter
(``GET /sources?name=``) matches ``%``, ``_`` and ``\\`` as the characters they are.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from ccat_ops_db import models as m

from ..api_server import ApiServer
from .conftest import diff_tables, snapshot

PAYLOADS = [
    "' OR 1=1 --",
    "' OR '1'='1",
    '" OR ""="',
    "1 OR 1=1",
    "1; DROP TABLE raw_data_file; --",
    "'; UPDATE api_token SET revoked_at = NULL; --",
    "' UNION SELECT token_hash FROM api_token --",
    "1) OR (1=1",
    "%",
    "%%",
    "_",
    "__",
    "\\",
    "\\%",
    "%' --",
    "*",
    "[a-z]",
    "\x00",
    "a\x00b",
    "\u2028",
    "$$; SELECT pg_sleep(3); $$",
    "ccat",  # harmless, real-looking: the filter still works
]

#: Sources whose names hold LIKE metacharacters (all fixed sources at ra/dec 0).
LIKE_NAMES = ["sec 50% off", "sec a_b", "sec axb", "sec back\\slash", "sec quote'd", "sec plain"]
LIKE_NEEDLES = ["%", "_", "\\", "'", "50%", "a_b", "x", "SEC A_", "%_%", "' OR 1=1 --", "\\s"]

PAGING = {"limit", "cursor"}
#: Substring filters: (path, parameter) -> the column they search.
SUBSTRING_FILTERS = {("/api/v1/sources", "name")}


def list_routes(api: ApiServer) -> dict[str, list[str]]:
    """Every list route (GET without path parameters) and its filter parameters."""
    spec = httpx.get(f"{api.base_url}/openapi.json", timeout=30).json()
    out = {}
    for path, ops in spec["paths"].items():
        if "get" not in ops or "{" in path or not path.startswith("/api/"):
            continue
        params = [
            p["name"]
            for p in ops["get"].get("parameters", [])
            if p["in"] == "query" and p["name"] not in PAGING
        ]
        if params:
            out[path] = params
    return out


@pytest.fixture(scope="module")
def like_sources(sec_engine: Engine) -> list[str]:
    with Session(sec_engine) as s, s.begin():
        for name in LIKE_NAMES:
            if s.scalar(select(m.Source).where(m.Source.name == name)) is None:
                s.add(m.FixedSource(name=name, ra_deg=0.0, dec_deg=0.0))
    return LIKE_NAMES


def test_every_filter_parameter_is_covered(sec_api: ApiServer) -> None:
    routes = list_routes(sec_api)
    assert len(routes) >= 15, routes
    assert sum(len(v) for v in routes.values()) >= 50


def test_injection_payloads_in_every_filter_are_harmless(
    sec_api: ApiServer, sec_engine: Engine, like_sources: list[str]
) -> None:
    before = snapshot(sec_engine)
    statuses: dict[int, int] = {}
    problems: list[str] = []
    with sec_api.client("admin") as c:
        for path, params in list_routes(sec_api).items():
            for param in params:
                for payload in PAYLOADS:
                    r = c.get(path, params={param: payload, "limit": 1000})
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    where = f"GET {path}?{param}={payload!r}"
                    if r.status_code >= 500:
                        problems.append(f"{where}: {r.status_code} {r.text[:200]}")
                        continue
                    if r.status_code != 200:
                        assert r.status_code == 422, f"{where}: {r.status_code} {r.text[:200]}"
                        assert r.json()["detail"], where
                        continue
                    items = r.json()["items"]
                    if (path, param) in SUBSTRING_FILTERS:
                        continue  # checked against literal matching below
                    if payload != "ccat" and items:
                        problems.append(f"{where}: matched {len(items)} rows")
    print(f"injection: statuses {statuses}")
    assert not problems, "\n".join(problems)
    assert diff_tables(before, snapshot(sec_engine)) == []
    assert statuses.get(200, 0) > 100  # most string filters did run a query


@pytest.mark.parametrize("needle", LIKE_NEEDLES + PAYLOADS)
def test_substring_filter_matches_literally(
    sec_api: ApiServer, sec_engine: Engine, like_sources: list[str], needle: str
) -> None:
    with Session(sec_engine) as s:
        names = list(s.scalars(select(m.Source.name)))
    expected = sorted(n for n in names if needle.lower() in n.lower())
    with sec_api.client("reader") as c:
        r = c.get("/api/v1/sources", params={"name": needle, "limit": 1000})
    if "\x00" in needle:
        assert r.status_code == 422, r.text  # a NUL can be in no name: named, refused
        assert r.json()["errors"][0]["loc"] == ["query", "name"]
        return
    assert r.status_code == 200, r.text
    got = sorted(item["name"] for item in r.json()["items"])
    assert got == expected
    if needle in ("%", "_", "%_%"):
        assert len(got) < len(names)  # a metacharacter does not match everything


def _items(r: httpx.Response) -> list[Any]:
    assert r.status_code == 200, r.text
    return r.json()["items"]


def test_real_values_still_filter(sec_api: ApiServer) -> None:
    """Control: the filters are live (a real value finds its row, a near miss finds none)."""
    with sec_api.client("reader") as c:
        assert len(_items(c.get("/api/v1/data_locations", params={"site": "ccat"}))) >= 1
        assert _items(c.get("/api/v1/data_locations", params={"site": "ccat' --"})) == []
        assert len(_items(c.get("/api/v1/sources", params={"name": "sec a_b"}))) == 1
