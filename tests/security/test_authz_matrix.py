"""Authorization matrix over every write route of the API, enumerated from its OpenAPI document.

For each write route (POST/PUT/PATCH/DELETE) and each bad credential - no token, malformed
headers, unknown, expired, revoked, a disabled user, scopes that do not cover the route - the
answer is 401/403 with a JSON error body, and not one row of the database changes. A route
added to the API without an entry in :data:`REQUIRED_SCOPE` fails the test, so no new write
route can escape the matrix. Then: a token with exactly the needed scope gets past the check
(the table is right), and another user's staging job cannot be released or cancelled.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ccat_ops_db.enums import Status

from ..api_server import ApiServer
from .conftest import TOKEN_CACHE_TTL_S, diff_tables, snapshot

WRITE_METHODS = {"post", "put", "patch", "delete"}

#: The scope each write route needs. Every write route in the OpenAPI document must be here.
REQUIRED_SCOPE: dict[tuple[str, str], str] = {
    ("POST", "/api/v1/raw_data_files"): "file",
    ("POST", "/api/v1/raw_data_files/bulk"): "file",
    ("POST", "/api/v1/executed_obs_units/start"): "file",
    ("PUT", "/api/v1/executed_obs_units/{eou_id}/finish"): "file",
    ("POST", "/api/v1/raw_data_packages"): "file",
    ("PUT", "/api/v1/raw_data_packages/{package_id}/finalize"): "file",
    ("PATCH", "/api/v1/raw_data_packages/{package_id}/state"): "operate",
    ("POST", "/api/v1/data_transfers/{transfer_id}/retry"): "operate",
    ("POST", "/api/v1/data_transfers/{transfer_id}/cancel"): "operate",
    ("POST", "/api/v1/long_term_archive_transfers/{transfer_id}/retry"): "operate",
    ("POST", "/api/v1/staging_jobs"): "operate",
    ("POST", "/api/v1/staging_jobs/{job_id}/release"): "operate",
    ("POST", "/api/v1/staging_jobs/{job_id}/cancel"): "operate",
}

#: The scopes each seeded token effectively holds (token scopes bounded by the user's).
EFFECTIVE: dict[str, set[str]] = {
    "reader": {"read"},
    "instrument": {"read", "file"},
    "operator": {"read", "file", "operate"},
    "scientist": {"read", "operate"},
    "overclaiming": {"read"},  # claims read+file, its user only has read
    "admin-read-only": {"read"},  # an admin's token restricted to read
}

#: Tokens that must be refused outright (401), whatever the route.
REFUSED_TOKENS = ("expired", "revoked", "disabled")

MALFORMED_HEADERS = [
    "Bearer",
    "Bearer \t x",
    "Bearer nonsense",
    "Basic dXNlcjpwYXNz",
    "Token ccat_abcdef",
    "Bearer ccat_" + "x" * 300,
    "Bearer ccat_unknowntoken0000000000000000000",
    "Bearer ccat_\u00e9\u00e9\u00e9",
    "Bearer ccat_a ccat_b",
    "bearer' OR 1=1 --",
]


def write_routes(api: ApiServer) -> list[tuple[str, str]]:
    """(METHOD, path template) of every write route in the live OpenAPI document."""
    spec = httpx.get(f"{api.base_url}/openapi.json", timeout=30).json()
    return sorted(
        (method.upper(), path)
        for path, ops in spec["paths"].items()
        for method in ops
        if method in WRITE_METHODS
    )


def fill(api: ApiServer, template: str, real: bool = True) -> str:
    """The path with its parameters filled: real rows (or ids that exist nowhere)."""
    values = {
        "eou_id": str(api.ids["eou"]) if real else str(uuid.uuid4()),
        "package_id": str(api.ids["package"]) if real else "987654321",
        "transfer_id": str(api.ids["lta_transfer"]) if real else "987654321",
        "job_id": str(api.ids["staging_job"]) if real else "987654321",
    }
    return template.format(**values)


def valid_body(api: ApiServer, method: str, template: str) -> dict[str, Any] | None:
    """A body the route would accept from an authorized caller (so a refusal really matters)."""
    eou = str(api.ids["eou"])
    one_file = {
        "id": str(uuid.uuid4()),
        "relative_path": f"2026/05/01/sec/authz_{uuid.uuid4().hex}.fits",
        "size": 10,
        "checksum": "ab" * 32,
        "instrument_module_id": api.ids["CHAI/LFA"],
        "executed_obs_unit_id": eou,
        "source_location_id": api.ids["ccat/chai_raw_data"],
    }
    bodies: dict[tuple[str, str], dict[str, Any]] = {
        ("POST", "/api/v1/raw_data_files"): one_file,
        ("POST", "/api/v1/raw_data_files/bulk"): {"files": [one_file]},
        ("POST", "/api/v1/executed_obs_units/start"): {
            "id": str(uuid.uuid4()),
            "start_time": "2026-05-01T03:00:00Z",
            "instrument_id": api.ids["CHAI"],
        },
        ("PUT", "/api/v1/executed_obs_units/{eou_id}/finish"): {"end_time": "2026-05-01T04:00:00Z"},
        ("PATCH", "/api/v1/raw_data_packages/{package_id}/state"): {"state": "failed"},
        ("POST", "/api/v1/staging_jobs"): {
            "raw_data_package_ids": [api.ids["archived_package"]],
            "destination_location_id": api.ids["processing_location"],
        },
    }
    return bodies.get((method, template), {})


def assert_json_error(r: httpx.Response, codes: tuple[int, ...], what: str) -> None:
    assert r.status_code in codes, f"{what}: {r.status_code} {r.text[:300]}"
    assert r.headers.get("content-type", "").startswith("application/json"), what
    body = r.json()
    assert isinstance(body.get("detail"), str) and body["detail"], what
    if r.status_code == 401:
        assert r.headers.get("www-authenticate", "").lower().startswith("bearer"), what


def test_every_write_route_is_in_the_matrix(sec_api: ApiServer) -> None:
    live = set(write_routes(sec_api))
    unknown = live - set(REQUIRED_SCOPE)
    gone = set(REQUIRED_SCOPE) - live
    assert not unknown, f"write routes missing from REQUIRED_SCOPE (add them): {sorted(unknown)}"
    assert not gone, f"REQUIRED_SCOPE names routes the API no longer has: {sorted(gone)}"
    assert len(live) >= 12


def test_bad_credentials_are_refused_and_change_nothing(
    sec_api: ApiServer, sec_engine: Engine
) -> None:
    before = snapshot(sec_engine)
    attempts = 0
    for method, template in write_routes(sec_api):
        path = fill(sec_api, template)
        body = valid_body(sec_api, method, template)
        url = sec_api.base_url + path
        what = f"{method} {template}"
        # no Authorization header at all
        r = httpx.request(method, url, json=body, timeout=30)
        assert_json_error(r, (401,), f"{what} without a token")
        attempts += 1
        for header in MALFORMED_HEADERS:
            r = httpx.request(
                method, url, json=body, headers={"Authorization": header.encode()}, timeout=30
            )
            assert_json_error(r, (401,), f"{what} with {header[:40]!r}")
            attempts += 1
        for role in REFUSED_TOKENS:
            with sec_api.client(role) as c:
                r = c.request(method, path, json=body)
            assert_json_error(r, (401,), f"{what} as {role}")
            attempts += 1
        needed = REQUIRED_SCOPE[(method, template)]
        for role, scopes in EFFECTIVE.items():
            if needed in scopes:
                continue
            with sec_api.client(role) as c:
                r = c.request(method, path, json=body)
            assert_json_error(r, (403,), f"{what} as {role} (lacks {needed!r})")
            assert needed in r.json()["detail"], r.text
            attempts += 1
    after = snapshot(sec_engine)
    assert diff_tables(before, after) == [], "a refused request changed the database"
    assert attempts >= 12 * 15


def test_the_right_scope_gets_past_the_check(sec_api: ApiServer, sec_engine: Engine) -> None:
    """A token holding exactly the needed scope is not refused (ids that exist nowhere, so
    nothing changes: the answers are 404/422, never 401/403)."""
    before = snapshot(sec_engine)
    for method, template in write_routes(sec_api):
        needed = REQUIRED_SCOPE[(method, template)]
        role = {"file": "instrument", "operate": "scientist"}[needed]
        path = fill(sec_api, template, real=False)
        with sec_api.client(role) as c:
            r = c.request(method, path, json={"not": "valid"})
        assert r.status_code in (404, 409, 422), f"{method} {template} as {role}: {r.text[:300]}"
    assert diff_tables(before, snapshot(sec_engine)) == []


def test_valid_bodies_do_work_for_an_authorized_caller(sec_api: ApiServer) -> None:
    """Positive control: the bodies the refusal test sent would have changed the database."""
    for method, template in (
        ("POST", "/api/v1/executed_obs_units/start"),
        ("POST", "/api/v1/raw_data_files"),
        ("POST", "/api/v1/raw_data_files/bulk"),
    ):
        body = valid_body(sec_api, method, template)
        with sec_api.client("instrument") as c:
            r = c.request(method, fill(sec_api, template), json=body)
        assert r.status_code in (200, 201), f"{method} {template}: {r.text[:300]}"


def test_another_users_staging_job_cannot_be_released_or_cancelled(
    sec_api: ApiServer, sec_engine: Engine
) -> None:
    job_id = sec_api.ids["staging_job"]
    before = snapshot(sec_engine)
    for action in ("release", "cancel"):
        with sec_api.client("operator") as c:  # has 'operate', but did not request the job
            r = c.post(f"/api/v1/staging_jobs/{job_id}/{action}")
        assert_json_error(r, (403,), f"{action} of another user's job")
        assert "another user" in r.json()["detail"]
    assert diff_tables(before, snapshot(sec_engine)) == []
    with Session(sec_engine) as s:
        job = s.get(m.StagingJob, job_id)
        assert job is not None and job.status == Status.PENDING and job.active


def test_revoking_a_used_token_takes_effect_within_the_cache_time(
    sec_api: ApiServer, sec_engine: Engine
) -> None:
    """A token that was just accepted (and is cached) is refused once revoked, at the latest
    after the cache time of the API process (set to TOKEN_CACHE_TTL_S for this suite)."""
    with Session(sec_engine) as s, s.begin():
        user = s.scalar(select(m.User).where(m.User.username == "test-reader"))
        assert user is not None
        row, raw = m.ApiToken.issue(user, "to revoke", ["read"])
        s.add(row)
    headers = {"Authorization": f"Bearer {raw}"}
    url = f"{sec_api.base_url}/api/v1/sites"
    assert httpx.get(url, headers=headers, timeout=30).status_code == 200
    with Session(sec_engine) as s, s.begin():
        token = s.scalar(select(m.ApiToken).where(m.ApiToken.name == "to revoke"))
        assert token is not None
        token.revoked_at = token.created_at
    # Poll for at most a few cache lifetimes; it must flip to 401 and stay there.
    deadline = time.monotonic() + 10 * TOKEN_CACHE_TTL_S + 5
    while httpx.get(url, headers=headers, timeout=30).status_code != 401:
        assert time.monotonic() < deadline, "a revoked token was still accepted"
        time.sleep(0.2)
    r = httpx.get(url, headers=headers, timeout=30)
    assert_json_error(r, (401,), "revoked after use")
    assert r.json()["detail"] == "token revoked"


@pytest.mark.parametrize("role", ["reader", "instrument", "operator", "admin"])
def test_read_routes_need_a_token_but_no_more(sec_api: ApiServer, role: str) -> None:
    spec = httpx.get(f"{sec_api.base_url}/openapi.json", timeout=30).json()
    lists = [p for p, ops in spec["paths"].items() if "get" in ops and "{" not in p]
    lists = [p for p in lists if p.startswith("/api/")]
    assert len(lists) >= 10
    for path in lists:
        r = httpx.get(sec_api.base_url + path, timeout=30)
        assert_json_error(r, (401,), f"GET {path} without a token")
        with sec_api.client(role) as c:
            assert c.get(path).status_code == 200, path
