"""Long-term archive transfers and staging jobs over real HTTP against a real PostgreSQL."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ccat_ops_db.db import make_engine
from ccat_ops_db.enums import (
    ExecutionStatus,
    PackageState,
    PhysicalCopyStatus,
    Status,
)

from .api_server import ApiServer, running_api
from .conftest import PgServer

LTA = "/api/v1/long_term_archive_transfers"
JOBS = "/api/v1/staging_jobs"


@pytest.fixture(scope="module")
def api(pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    name = pg_server.create_database("arch")
    with running_api(pg_server.url(name), tmp_path_factory.mktemp("arch")) as server:
        yield server
    pg_server.drop_database(name)


@pytest.fixture(scope="module")
def engine(api: ApiServer) -> Iterator[Engine]:
    eng = make_engine(api.db_url)
    yield eng
    eng.dispose()


@pytest.fixture(scope="module")
def scientist(api: ApiServer, engine: Engine) -> str:
    """A second user with `read` + `operate` (to test jobs of other users); its role name."""
    with Session(engine) as s, s.begin():
        role = m.Role(name="test-scientist", scopes=["read", "operate"])
        user = m.User(username="test-scientist", roles=[role])
        row, raw = m.ApiToken.issue(user, "tests", ["read", "operate"])
        s.add(row)
    api.tokens["scientist"] = raw
    return "scientist"


# --- data helpers --------------------------------------------------------------------------


def make_packages(
    api: ApiServer, engine: Engine, states: list[PackageState], size: int = 1000
) -> list[int]:
    """Insert one executed obs unit and a package per state; returns the package ids."""
    with Session(engine) as s, s.begin():
        eou = m.ExecutedObsUnit(
            instrument_id=api.ids["CHAI"],
            start_time=dt.datetime(2026, 5, 1, 3, tzinfo=dt.UTC),
            status=ExecutionStatus.COMPLETED,
        )
        s.add(eou)
        s.flush()
        pkgs = [
            m.RawDataPackage(
                name=f"pkg_{uuid.uuid4().hex}.tar",
                relative_path=f"2026/05/01/pkg_{i}.tar",
                size=size * (i + 1),
                state=state,
                status=Status.COMPLETED,
                executed_obs_unit_id=eou.id,
                instrument_module_id=api.ids["CHAI/LFA"],
                origin_location_id=api.ids["ccat/chai_raw_data"],
            )
            for i, state in enumerate(states)
        ]
        s.add_all(pkgs)
        s.flush()
        return [p.id for p in pkgs]


def make_transfer(
    api: ApiServer,
    engine: Engine,
    status: Status,
    destination: str = "cologne/lta",
    failure_reason: str | None = None,
    logs: int = 0,
) -> int:
    (pkg,) = make_packages(api, engine, [PackageState.TRANSFERRING])
    with Session(engine) as s, s.begin():
        t = m.LongTermArchiveTransfer(
            raw_data_package_id=pkg,
            origin_location_id=api.ids["cologne/buffer"],
            destination_location_id=api.ids[destination],
            status=status,
            retry_count=3 if status == Status.FAILED else 0,
            failure_reason=failure_reason,
            object_key=f"raw/{pkg}.tar",
            sidecar_key=f"raw/{pkg}.tar.json",
        )
        s.add(t)
        s.flush()
        for i in range(logs):
            s.add(m.DataTransferLog(long_term_archive_transfer_id=t.id, message=f"attempt {i}"))
        return t.id


def count(engine: Engine, model: type) -> int:
    with Session(engine) as s:
        return s.scalar(select(func.count()).select_from(model)) or 0


def audited(engine: Engine, resource: str, ident: int) -> list[tuple[str, str | None]]:
    """(username, detail) of the audit rows about one resource id."""
    with Session(engine) as s:
        rows = s.execute(
            select(m.User.username, m.ApiAuditLog.detail, m.ApiAuditLog.resource_ids)
            .join(m.User, m.User.id == m.ApiAuditLog.user_id)
            .where(m.ApiAuditLog.resource == resource)
            .order_by(m.ApiAuditLog.id)
        ).all()
    return [(u, d) for u, d, ids in rows if str(ident) in (ids or [])]


def create_job(api: ApiServer, pkgs: list[int], role: str = "operator", **extra: object) -> dict:
    body = {"raw_data_package_ids": pkgs, "destination_location_id": api.ids["cologne/ramses"]}
    with api.client(role) as c:
        r = c.post(JOBS, json={**body, **extra})
    assert r.status_code == 201, r.text
    return r.json()


def set_job(engine: Engine, job_id: int, **values: object) -> None:
    with Session(engine) as s, s.begin():
        job = s.get(m.StagingJob, job_id)
        assert job is not None
        for k, v in values.items():
            setattr(job, k, v)


def add_copy(
    engine: Engine, pkg: int, location_id: int, status: PhysicalCopyStatus, path: str | None = None
) -> None:
    with Session(engine) as s, s.begin():
        s.add(
            m.RawDataPackagePhysicalCopy(
                raw_data_package_id=pkg,
                data_location_id=location_id,
                status=status,
                relative_path=path,
            )
        )


# --- long-term archive transfers -----------------------------------------------------------


def test_lta_list_filters_get_and_logs(api: ApiServer, engine: Engine) -> None:
    failed = make_transfer(api, engine, Status.FAILED, failure_reason="S3 timeout", logs=5)
    done = make_transfer(api, engine, Status.COMPLETED)
    us = make_transfer(api, engine, Status.PENDING, destination="us/lta")
    with api.client("reader") as c:
        r = c.get(f"{LTA}/{failed}")
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["status"] == "failed"
        assert out["retry_count"] == 3
        assert out["failure_reason"] == "S3 timeout"
        assert out["origin_location"] == "cologne/buffer"
        assert out["destination_location"] == "cologne/lta"
        assert out["object_key"].endswith(".tar") and out["sidecar_key"].endswith(".json")
        assert out["raw_data_package_state"] == "transferring"
        assert out["checksum_verified_at"] is None

        def ids(**params: object) -> set[int]:
            r = c.get(LTA, params={"limit": 1000, **params})
            assert r.status_code == 200, r.text
            return {x["id"] for x in r.json()["items"]}

        assert failed in ids(failed="true") and done not in ids(failed="true")
        assert done in ids(failed="false") and failed not in ids(failed="false")
        assert ids(status="completed") >= {done} and failed not in ids(status="completed")
        assert us in ids(site="us") and failed not in ids(site="us")
        assert ids(site="nowhere") == set()
        assert ids(destination_location_id=api.ids["us/lta"]) >= {us}
        assert failed not in ids(destination_location_id=api.ids["us/lta"])
        pkg = out["raw_data_package_id"]
        assert ids(raw_data_package_id=pkg) == {failed}
        # paging
        first = c.get(LTA, params={"limit": 1}).json()
        assert len(first["items"]) == 1 and first["next_cursor"]
        second = c.get(LTA, params={"limit": 1, "cursor": first["next_cursor"]}).json()
        assert second["items"][0]["id"] > first["items"][0]["id"]
        # logs, paginated, oldest first
        r = c.get(f"{LTA}/{failed}/logs", params={"limit": 3})
        assert r.status_code == 200
        page1 = r.json()
        assert [x["message"] for x in page1["items"]] == ["attempt 0", "attempt 1", "attempt 2"]
        page2 = c.get(
            f"{LTA}/{failed}/logs", params={"limit": 3, "cursor": page1["next_cursor"]}
        ).json()
        assert [x["message"] for x in page2["items"]] == ["attempt 3", "attempt 4"]
        assert page2["next_cursor"] is None
        # unknown ids, bad input
        assert c.get(f"{LTA}/999999999").status_code == 404
        assert c.get(f"{LTA}/999999999/logs").status_code == 404
        assert c.get(f"{LTA}/0").status_code == 422
        assert c.get(f"{LTA}/{2**63}").status_code == 422
        assert c.get(LTA, params={"status": "lost"}).status_code == 422
        assert c.get(LTA, params={"site": "x" * 33}).status_code == 422
        assert c.get(LTA, params={"raw_data_package_id": 2**63}).status_code == 422
    with api.client(None) as c:
        assert c.get(LTA).status_code == 401


def test_lta_retry(api: ApiServer, engine: Engine) -> None:
    failed = make_transfer(api, engine, Status.FAILED, failure_reason="S3 timeout", logs=1)
    done = make_transfer(api, engine, Status.COMPLETED)
    logs_before = count(engine, m.DataTransferLog)
    # wrong scope / bad tokens: nothing changes
    for role, code in {
        None: 401,
        "expired": 401,
        "revoked": 401,
        "reader": 403,
        "instrument": 403,
        "overclaiming": 403,
    }.items():
        with api.client(role) as c:
            r = c.post(f"{LTA}/{failed}/retry")
        assert r.status_code == code, (role, r.text)
    assert count(engine, m.DataTransferLog) == logs_before
    with api.client("operator") as c:
        assert c.get(f"{LTA}/{failed}").json()["status"] == "failed"
        r = c.post(f"{LTA}/{failed}/retry")
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["status"] == "pending"
        assert out["retry_count"] == 0
        assert out["failure_reason"] is None
        logs = c.get(f"{LTA}/{failed}/logs").json()["items"]
        assert logs[-1]["message"] == "retry requested by test-operator (was failed: S3 timeout)"
        assert audited(engine, "long_term_archive_transfer", failed) == [("test-operator", "retry")]
        # not failed (any more): 409 saying why, nothing written
        before = count(engine, m.DataTransferLog)
        r = c.post(f"{LTA}/{failed}/retry")
        assert r.status_code == 409
        assert "already pending" in r.json()["detail"]
        r = c.post(f"{LTA}/{done}/retry")
        assert r.status_code == 409
        assert "completed" in r.json()["detail"]
        assert count(engine, m.DataTransferLog) == before
        assert audited(engine, "long_term_archive_transfer", done) == []
        assert c.post(f"{LTA}/999999999/retry").status_code == 404
        assert c.post(f"{LTA}/-1/retry").status_code == 422


# --- staging jobs --------------------------------------------------------------------------


def test_staging_create_and_progress(api: ApiServer, engine: Engine) -> None:
    a, b, c_ = make_packages(api, engine, [PackageState.ARCHIVED] * 3)
    before = dt.datetime.now(dt.UTC)
    job = create_job(
        api, [a, b, a], name="orion-b run", description="GEco maps", unpack=False
    )  # the duplicate is ignored
    assert job["status"] == "pending"
    assert job["active"] is True
    assert job["unpack"] is False
    assert job["name"] == "orion-b run"
    assert job["requested_by"] == "test-operator"
    assert job["requested_by_user_id"] is not None
    assert job["created_by_token_id"] is not None
    assert job["destination_location"] == "cologne/ramses"
    assert job["package_count"] == 2
    assert [p["id"] for p in job["packages"]] == [a, b]
    assert job["progress"] == {
        "packages_requested": 2,
        "packages_staged": 0,
        "bytes_requested": 1000 + 2000,
        "bytes_staged": 0,
    }
    # no expiry given: the destination's retention (336 h in the reference topology)
    expires = dt.datetime.fromisoformat(job["expires_at"])
    assert abs((expires - before) - dt.timedelta(hours=336)) < dt.timedelta(minutes=5)
    assert job["recent_logs"][0]["message"].startswith("requested by test-operator: 2 package")
    assert audited(engine, "staging_job", job["id"]) == [
        ("test-operator", "2 package(s) to cologne/ramses")
    ]
    with Session(engine) as s:
        row = s.get(m.StagingJob, job["id"])
        assert row is not None
        assert sorted(p.id for p in row.raw_data_packages) == [a, b]
    ramses, lta = api.ids["cologne/ramses"], api.ids["cologne/lta"]
    # progress follows the copies at the destination only, STAGED or PRESENT
    add_copy(engine, a, lta, PhysicalCopyStatus.PRESENT)
    add_copy(engine, c_, ramses, PhysicalCopyStatus.STAGED)  # not part of the job
    with api.client("reader") as cl:
        assert cl.get(f"{JOBS}/{job['id']}").json()["progress"]["packages_staged"] == 0
        add_copy(engine, a, ramses, PhysicalCopyStatus.STAGED, "staging/pkg-a")
        out = cl.get(f"{JOBS}/{job['id']}").json()
        assert out["progress"]["packages_staged"] == 1
        assert out["progress"]["bytes_staged"] == 1000
        assert [p["staged"] for p in out["packages"]] == [True, False]
        assert [p["path"] for p in out["packages"]] == ["staging/pkg-a", None]
        add_copy(engine, b, ramses, PhysicalCopyStatus.DELETED)
        assert cl.get(f"{JOBS}/{job['id']}").json()["progress"]["packages_staged"] == 1
        with Session(engine) as s, s.begin():
            copy = s.scalar(
                select(m.PhysicalCopy).where(
                    m.PhysicalCopy.raw_data_package_id == b,
                    m.PhysicalCopy.data_location_id == ramses,
                )
            )
            assert copy is not None
            copy.status = PhysicalCopyStatus.PRESENT
        out = cl.get(f"{JOBS}/{job['id']}").json()
        assert out["progress"]["packages_staged"] == 2
        assert out["progress"]["bytes_staged"] == 3000
        # status, times and logs written by the staging manager show up
        started = dt.datetime(2026, 5, 2, 10, tzinfo=dt.UTC)
        set_job(engine, job["id"], status=Status.COMPLETED, started_at=started)
        with Session(engine) as s, s.begin():
            s.add(m.DataTransferLog(staging_job_id=job["id"], message="staged 2 packages"))
        out = cl.get(f"{JOBS}/{job['id']}").json()
        assert out["status"] == "completed"
        assert dt.datetime.fromisoformat(out["started_at"]) == started
        assert out["recent_logs"][0]["message"] == "staged 2 packages"  # newest first
        logs = cl.get(f"{JOBS}/{job['id']}/logs").json()["items"]
        assert [x["message"] for x in logs][-1] == "staged 2 packages"
        assert cl.get(f"{JOBS}/999999/logs").status_code == 404


def test_staging_create_with_expiry(api: ApiServer, engine: Engine) -> None:
    (a,) = make_packages(api, engine, [PackageState.ARCHIVED])
    when = (dt.datetime.now(dt.UTC) + dt.timedelta(days=3)).replace(microsecond=0)
    job = create_job(api, [a], expires_at=when.isoformat())
    assert dt.datetime.fromisoformat(job["expires_at"]) == when
    job = create_job(api, [a], retention_hours=2)
    delta = dt.datetime.fromisoformat(job["expires_at"]) - dt.datetime.now(dt.UTC)
    assert dt.timedelta(hours=1, minutes=55) < delta <= dt.timedelta(hours=2)
    # POST is not idempotent: the same request makes another job
    assert create_job(api, [a])["id"] != create_job(api, [a])["id"]


def test_staging_create_rejections_change_nothing(api: ApiServer, engine: Engine) -> None:
    ok, waiting, failed = make_packages(
        api, engine, [PackageState.ARCHIVED, PackageState.WAITING, PackageState.FAILED]
    )
    ramses = api.ids["cologne/ramses"]
    jobs_before = count(engine, m.StagingJob)
    logs_before = count(engine, m.DataTransferLog)
    with api.client("operator") as c:

        def post(**body: object) -> httpx.Response:
            base = {"raw_data_package_ids": [ok], "destination_location_id": ramses}
            r = c.post(JOBS, json={**base, **body})
            assert r.status_code == 422, r.text
            return r

        def locs(r: httpx.Response) -> list[list[object]]:
            return [e["loc"] for e in r.json()["errors"]]

        r = post(destination_location_id=api.ids["cologne/lta"])
        assert locs(r) == [["body", "destination_location_id"]]
        assert "not a processing location" in r.json()["errors"][0]["msg"]
        r = post(destination_location_id=99999)
        assert locs(r) == [["body", "destination_location_id"]]
        assert "does not exist" in r.text
        r = post(raw_data_package_ids=[waiting, ok, 987654321, failed])
        assert locs(r) == [
            ["body", "raw_data_package_ids", 0],
            ["body", "raw_data_package_ids", 2],
            ["body", "raw_data_package_ids", 3],
        ]
        detail = r.json()["detail"]
        assert f"{waiting} (waiting)" in detail
        assert "987654321 (not found)" in detail
        assert f"{failed} (failed)" in detail
        assert str(ok) not in detail.split(":", 1)[1]
        # everything wrong at once is reported at once
        r = post(raw_data_package_ids=[waiting], destination_location_id=api.ids["ccat/buffer"])
        assert len(r.json()["errors"]) == 2
        assert ["body", "colour"] in locs(post(colour="red"))
        assert ["body", "expires_at"] in locs(post(expires_at="2030-01-01T00:00:00"))  # naive
        assert ["body", "expires_at"] in locs(post(expires_at="2020-01-01T00:00:00Z"))  # past
        assert ["body", "expires_at"] in locs(post(expires_at="9999-12-31T23:59:59-23:59"))
        r = post(expires_at="2030-01-01T00:00:00Z", retention_hours=5)
        assert locs(r) == [["body", "retention_hours"]]
        assert ["body", "retention_hours"] in locs(post(retention_hours=0))
        assert ["body", "retention_hours"] in locs(post(retention_hours=1e12))
        assert ["body", "raw_data_package_ids"] in locs(post(raw_data_package_ids=[]))
        assert ["body", "raw_data_package_ids"] in locs(
            post(raw_data_package_ids=list(range(1, 1002)))
        )
        assert ["body", "raw_data_package_ids", 0] in locs(post(raw_data_package_ids=[2**63]))
        assert ["body", "destination_location_id"] in locs(post(destination_location_id=2**31))
        assert ["body", "name"] in locs(post(name="x" * 256))
        assert ["body", "name"] in locs(post(name="a\x00b"))
        assert c.post(JOBS, content=b"not json").status_code == 422
    for role, code in {
        None: 401,
        "expired": 401,
        "revoked": 401,
        "reader": 403,
        "instrument": 403,
        "overclaiming": 403,
    }.items():
        with api.client(role) as c:
            r = c.post(JOBS, json={"raw_data_package_ids": [ok], "destination_location_id": ramses})
        assert r.status_code == code, (role, r.text)
    assert count(engine, m.StagingJob) == jobs_before
    assert count(engine, m.DataTransferLog) == logs_before


def test_staging_list_filters(api: ApiServer, engine: Engine, scientist: str) -> None:
    (a,) = make_packages(api, engine, [PackageState.ARCHIVED])
    mine = create_job(api, [a])
    theirs = create_job(api, [a], role=scientist)
    set_job(engine, theirs["id"], status=Status.IN_PROGRESS)
    with api.client("reader") as c:

        def ids(**params: object) -> set[int]:
            r = c.get(JOBS, params={"limit": 1000, **params})
            assert r.status_code == 200, r.text
            return {x["id"] for x in r.json()["items"]}

        assert {mine["id"], theirs["id"]} <= ids()
        assert theirs["id"] in ids(requested_by="test-scientist")
        assert mine["id"] not in ids(requested_by="test-scientist")
        assert ids(requested_by="nobody") == set()
        assert theirs["id"] in ids(status="in_progress")
        assert mine["id"] not in ids(status="in_progress")
        assert mine["id"] in ids(active="true", destination_location_id=api.ids["cologne/ramses"])
        assert ids(destination_location_id=api.ids["cologne/lta"]) == set()
        item = next(
            x for x in c.get(JOBS, params={"limit": 1000}).json()["items"] if x["id"] == mine["id"]
        )
        assert item["package_count"] == 1 and item["requested_by"] == "test-operator"
        first = c.get(JOBS, params={"limit": 1}).json()
        assert len(first["items"]) == 1 and first["next_cursor"]
        assert c.get(JOBS, params={"status": "lost"}).status_code == 422
        assert c.get(JOBS, params={"requested_by": "x" * 65}).status_code == 422
        assert c.get(JOBS, params={"active": "maybe"}).status_code == 422
        assert c.get(f"{JOBS}/999999").status_code == 404
        assert c.get(f"{JOBS}/0").status_code == 422
        assert c.get(f"{JOBS}/{2**31}").status_code == 422
    with api.client(None) as c:
        assert c.get(JOBS).status_code == 401
        assert c.get(f"{JOBS}/{mine['id']}").status_code == 401


def test_staging_release(api: ApiServer, engine: Engine, scientist: str) -> None:
    (a,) = make_packages(api, engine, [PackageState.ARCHIVED])
    job = create_job(api, [a])
    set_job(engine, job["id"], status=Status.COMPLETED)
    url = f"{JOBS}/{job['id']}/release"
    for role, code in {None: 401, "expired": 401, "reader": 403, "instrument": 403}.items():
        with api.client(role) as c:
            assert c.post(url).status_code == code, role
    with api.client(scientist) as c:  # someone else's job
        r = c.post(url)
        assert r.status_code == 403
        assert "another user" in r.json()["detail"]
    with api.client("reader") as c:
        assert c.get(f"{JOBS}/{job['id']}").json()["active"] is True
    with api.client("operator") as c:
        r = c.post(url)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["active"] is False
        assert out["released_at"] is not None
        assert out["status"] == "completed"
        assert out["recent_logs"][0]["message"] == "released by test-operator"
        again = c.post(url)
        assert again.status_code == 200
        assert again.json()["released_at"] == out["released_at"]
        assert c.post(f"{JOBS}/999999/release").status_code == 404
    assert audited(engine, "staging_job", job["id"]) == [
        ("test-operator", "1 package(s) to cologne/ramses"),
        ("test-operator", "release"),
    ]
    with api.client("reader") as c:
        assert job["id"] in {
            x["id"] for x in c.get(JOBS, params={"active": "false", "limit": 1000}).json()["items"]
        }
    # an admin may release anyone's job
    other = create_job(api, [a], role=scientist)
    with api.client("admin") as c:
        r = c.post(f"{JOBS}/{other['id']}/release")
        assert r.status_code == 200
        assert r.json()["active"] is False
    assert audited(engine, "staging_job", other["id"])[-1] == ("test-admin", "release")


def test_staging_cancel(api: ApiServer, engine: Engine, scientist: str) -> None:
    (a,) = make_packages(api, engine, [PackageState.ARCHIVED])
    job = create_job(api, [a])
    set_job(engine, job["id"], status=Status.SCHEDULED)
    url = f"{JOBS}/{job['id']}/cancel"
    for role, code in {None: 401, "revoked": 401, "reader": 403, "instrument": 403}.items():
        with api.client(role) as c:
            assert c.post(url).status_code == code, role
    with api.client(scientist) as c:
        assert c.post(url).status_code == 403
    with api.client("reader") as c:
        assert c.get(f"{JOBS}/{job['id']}").json()["status"] == "scheduled"
    with api.client("operator") as c:
        r = c.post(url)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["status"] == "failed"
        assert out["failure_reason"] == "cancelled by test-operator"
        assert out["active"] is False
        assert out["finished_at"] is not None
        assert audited(engine, "staging_job", job["id"])[-1] == ("test-operator", "cancel")
        # cancelling again, or a completed job: 409, nothing written
        logs_before = count(engine, m.DataTransferLog)
        r = c.post(url)
        assert r.status_code == 409
        assert "cancelled by test-operator" in r.json()["detail"]
        done = create_job(api, [a])
        set_job(engine, done["id"], status=Status.COMPLETED)
        r = c.post(f"{JOBS}/{done['id']}/cancel")
        assert r.status_code == 409
        assert "completed" in r.json()["detail"] and "release it instead" in r.json()["detail"]
        assert c.get(f"{JOBS}/{done['id']}").json()["status"] == "completed"
        assert count(engine, m.DataTransferLog) == logs_before + 1  # only done's creation line
        assert c.post(f"{JOBS}/999999/cancel").status_code == 404
        assert c.post(f"{JOBS}/abc/cancel").status_code == 422
    # an admin may cancel anyone's pending job
    theirs = create_job(api, [a], role=scientist)
    with api.client("admin") as c:
        r = c.post(f"{JOBS}/{theirs['id']}/cancel")
        assert r.status_code == 200
        assert r.json()["failure_reason"] == "cancelled by test-admin"
