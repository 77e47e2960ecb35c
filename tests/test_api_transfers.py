"""Transfer packages, transfers, their logs and retries, and the pipeline summary, over real
HTTP against a real PostgreSQL. Rows the managers would write are inserted with SQLAlchemy."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ccat_ops_db.db import make_engine
from ccat_ops_db.enums import PackageState, PhysicalCopyStatus, Status, TransferMethod

from .api_server import ApiServer, running_api
from .conftest import PgServer

V1 = "/api/v1"
NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def api(pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    name = pg_server.create_database("xfer")
    with running_api(pg_server.url(name), tmp_path_factory.mktemp("xfer")) as server:
        yield server
    pg_server.drop_database(name)


@pytest.fixture(scope="module")
def engine(api: ApiServer) -> Iterator[Any]:
    eng = make_engine(api.db_url)
    yield eng
    eng.dispose()


# --- rows as the managers would write them --------------------------------------------------


def add_eou(s: Session, api: ApiServer) -> m.ExecutedObsUnit:
    eou = m.ExecutedObsUnit(start_time=NOW, instrument_id=api.ids["CHAI"])
    s.add(eou)
    s.flush()
    return eou


def add_file(s: Session, api: ApiServer, eou: m.ExecutedObsUnit, **kw: Any) -> m.RawDataFile:
    n = uuid.uuid4().hex
    f = m.RawDataFile(
        name=f"{n}.fits",
        relative_path=f"2026/05/01/{n}.fits",
        size=kw.pop("size", 1000),
        checksum="ab" * 32,
        instrument_module_id=api.ids["CHAI/LFA"],
        executed_obs_unit_id=eou.id,
        source_location_id=api.ids["ccat/chai_raw_data"],
        **kw,
    )
    s.add(f)
    s.flush()
    return f


def add_package(s: Session, api: ApiServer, eou: m.ExecutedObsUnit, **kw: Any) -> m.RawDataPackage:
    n = uuid.uuid4().hex[:12]
    p = m.RawDataPackage(
        name=f"pkg_{n}.tar",
        relative_path=f"pkg_{n}.tar",
        executed_obs_unit_id=eou.id,
        instrument_module_id=api.ids["CHAI/LFA"],
        origin_location_id=api.ids["ccat/chai_raw_data"],
        **kw,
    )
    s.add(p)
    s.flush()
    return p


def add_dtp(s: Session, api: ApiServer, **kw: Any) -> m.DataTransferPackage:
    n = uuid.uuid4().hex[:12]
    kw.setdefault("origin_location_id", api.ids["ccat/buffer"])
    d = m.DataTransferPackage(name=f"dtp_{n}.tar", relative_path=f"transfer/dtp_{n}.tar", **kw)
    s.add(d)
    s.flush()
    return d


def add_transfer(
    s: Session,
    api: ApiServer,
    dtp: m.DataTransferPackage | None = None,
    origin: str = "ccat/buffer",
    destination: str = "cologne/buffer",
    **kw: Any,
) -> m.DataTransfer:
    dtp = dtp or add_dtp(s, api, status=Status.COMPLETED)
    kw.setdefault("method", TransferMethod.BBCP)
    t = m.DataTransfer(
        data_transfer_package_id=dtp.id,
        origin_location_id=api.ids[origin],
        destination_location_id=api.ids[destination],
        **kw,
    )
    s.add(t)
    s.flush()
    return t


def count(engine: Any, model: Any, *where: Any) -> int:
    with Session(engine) as s:
        return s.scalar(select(func.count()).select_from(model).where(*where)) or 0


# --- data transfer packages -----------------------------------------------------------------


def test_transfer_packages_list_and_detail(api: ApiServer, engine: Any) -> None:
    with Session(engine) as s, s.begin():
        eou = add_eou(s, api)
        dtp = add_dtp(s, api, status=Status.IN_PROGRESS, size=10**13)
        pkgs = [
            add_package(
                s, api, eou, data_transfer_package_id=dtp.id, state=PackageState.TRANSFERRING
            )
            for _ in range(3)
        ]
        t1 = add_transfer(s, api, dtp)
        t2 = add_transfer(s, api, dtp, destination="us/buffer", is_secondary=True)
        other = add_dtp(s, api, status=Status.FAILED, failure_reason="tar: no space left")
        ids = {"dtp": dtp.id, "other": other.id, "pkgs": [p.id for p in pkgs]}
        ids["transfers"] = [t1.id, t2.id]
    with api.client("reader") as c:
        r = c.get(f"{V1}/data_transfer_packages", params={"status": "in_progress"})
        assert r.status_code == 200, r.text
        assert ids["dtp"] in [x["id"] for x in r.json()["items"]]
        assert ids["other"] not in [x["id"] for x in r.json()["items"]]
        r = c.get(
            f"{V1}/data_transfer_packages",
            params={"origin_location_id": api.ids["ccat/buffer"], "status": "failed"},
        )
        (failed,) = [x for x in r.json()["items"] if x["id"] == ids["other"]]
        assert failed["failure_reason"] == "tar: no space left"
        assert failed["origin_location"] == "ccat/buffer"
        r = c.get(f"{V1}/data_transfer_packages", params={"origin_location_id": 999999})
        assert r.json()["items"] == []

        r = c.get(f"{V1}/data_transfer_packages/{ids['dtp']}")
        assert r.status_code == 200, r.text
        d = r.json()
        assert d["raw_data_package_ids"] == ids["pkgs"] and d["raw_data_package_count"] == 3
        assert d["size"] == 10**13 and d["status"] == "in_progress"
        assert [t["id"] for t in d["transfers"]] == ids["transfers"]
        assert [t["destination_location"] for t in d["transfers"]] == [
            "cologne/buffer",
            "us/buffer",
        ]
        assert d["transfers"][1]["is_secondary"] is True

        r = c.get(f"{V1}/data_transfer_packages/999999999")
        assert r.status_code == 404
        assert r.json()["detail"] == "data transfer package 999999999 not found"
        for bad in ("0", "x", str(2**63)):
            r = c.get(f"{V1}/data_transfer_packages/{bad}")
            assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["path", "package_id"]
        for params in ({"status": "lost"}, {"origin_location_id": 0}, {"limit": 0}):
            r = c.get(f"{V1}/data_transfer_packages", params=params)
            assert r.status_code == 422 and r.json()["errors"][0]["loc"][0] == "query"


def test_transfer_package_pages(api: ApiServer, engine: Any) -> None:
    with Session(engine) as s, s.begin():
        made = [add_dtp(s, api, status=Status.SCHEDULED).id for _ in range(3)]
    seen: list[int] = []
    cursor = None
    with api.client("reader") as c:
        while True:
            params: dict[str, Any] = {"status": "scheduled", "limit": 2}
            if cursor:
                params["cursor"] = cursor
            page = c.get(f"{V1}/data_transfer_packages", params=params).json()
            seen += [x["id"] for x in page["items"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
    assert [i for i in seen if i in made] == made


# --- data transfers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transfers(api: ApiServer, engine: Any) -> dict[str, int]:
    """One transfer per interesting state; returns their ids by name."""
    with Session(engine) as s, s.begin():
        out = {
            "failed": add_transfer(
                s,
                api,
                status=Status.FAILED,
                retry_count=3,
                failure_reason="bbcp: connection reset by peer",
                last_failure_at=NOW,
                next_attempt_at=NOW + dt.timedelta(hours=1),
            ),
            "unpack_failed": add_transfer(
                s,
                api,
                status=Status.COMPLETED,
                unpack_status=Status.FAILED,
                unpack_retry_count=2,
                unpack_failure_reason="checksum mismatch: scan_00003.fits",
                bytes_transferred=5000,
                rate_bytes_per_s=1.5e9,
                finished_at=NOW,
            ),
            "running": add_transfer(s, api, status=Status.IN_PROGRESS),
            "done": add_transfer(s, api, status=Status.COMPLETED, unpack_status=Status.COMPLETED),
            "secondary": add_transfer(
                s,
                api,
                origin="cologne/buffer",
                destination="us/buffer",
                method=TransferMethod.RSYNC,
                is_secondary=True,
                status=Status.PENDING,
            ),
        }
        return {k: v.id for k, v in out.items()}


def _ids(r: httpx.Response) -> set[int]:
    assert r.status_code == 200, r.text
    return {x["id"] for x in r.json()["items"]}


def test_transfers_list_filters(api: ApiServer, transfers: dict[str, int]) -> None:
    mine = set(transfers.values())
    url = f"{V1}/data_transfers"
    with api.client("reader") as c:
        assert mine <= _ids(c.get(url, params={"limit": 1000}))
        assert _ids(c.get(url, params={"failed": True})) & mine == {
            transfers["failed"],
            transfers["unpack_failed"],
        }
        assert _ids(c.get(url, params={"failed": False})) & mine == {
            transfers["running"],
            transfers["done"],
            transfers["secondary"],
        }
        assert _ids(c.get(url, params={"status": "in_progress"})) & mine == {transfers["running"]}
        assert _ids(c.get(url, params={"status": "completed", "unpack_status": "failed"})) & (
            mine
        ) == {transfers["unpack_failed"]}
        assert _ids(c.get(url, params={"origin_site": "cologne"})) & mine == {
            transfers["secondary"]
        }
        assert _ids(c.get(url, params={"destination_site": "us"})) & mine == {
            transfers["secondary"]
        }
        assert (
            _ids(c.get(url, params={"origin_site": "ccat", "destination_site": "us"})) & (mine)
            == set()
        )
        assert _ids(c.get(url, params={"origin_site": "atlantis"})) == set()
        for params in (
            {"status": "lost"},
            {"unpack_status": "x"},
            {"origin_site": ""},
            {"destination_site": "x" * 33},
            {"origin_site": "a\x00b"},
            {"failed": "maybe"},
            {"data_transfer_package_id": 0},
        ):
            r = c.get(url, params=params)
            assert r.status_code == 422, params
            assert r.json()["errors"][0]["loc"] == ["query", next(iter(params))]


def test_transfer_detail_shows_reasons_and_retry_counts(
    api: ApiServer, transfers: dict[str, int]
) -> None:
    with api.client("reader") as c:
        t = c.get(f"{V1}/data_transfers/{transfers['unpack_failed']}").json()
        assert (t["status"], t["unpack_status"]) == ("completed", "failed")
        assert t["unpack_failure_reason"] == "checksum mismatch: scan_00003.fits"
        assert t["unpack_retry_count"] == 2 and t["failure_reason"] is None
        assert (t["origin_location"], t["destination_location"]) == (
            "ccat/buffer",
            "cologne/buffer",
        )
        assert t["method"] == "bbcp" and t["bytes_transferred"] == 5000
        assert t["data_transfer_package_name"].startswith("dtp_")
        t = c.get(f"{V1}/data_transfers/{transfers['secondary']}").json()
        assert t["is_secondary"] is True and t["method"] == "rsync"
        r = c.get(f"{V1}/data_transfers/999999999")
        assert r.status_code == 404 and r.json()["detail"] == "data transfer 999999999 not found"
        for bad in ("0", "x", str(2**63)):
            r = c.get(f"{V1}/data_transfers/{bad}")
            assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["path", "transfer_id"]


def test_transfer_logs_are_paginated(api: ApiServer, engine: Any) -> None:
    with Session(engine) as s, s.begin():
        t = add_transfer(s, api, status=Status.IN_PROGRESS)
        for i in range(5):
            s.add(
                m.DataTransferLog(
                    data_transfer_id=t.id,
                    level="warning" if i == 3 else "info",
                    message=f"step {i}",
                    log_path=f"/var/log/ccat/transfer/{t.id}/{i}.log",
                )
            )
        tid = t.id
    url = f"{V1}/data_transfers/{tid}/logs"
    with api.client("reader") as c:
        first = c.get(url, params={"limit": 3}).json()
        rest = c.get(url, params={"limit": 3, "cursor": first["next_cursor"]}).json()
        lines = first["items"] + rest["items"]
        assert rest["next_cursor"] is None
        assert [x["message"] for x in lines] == [f"step {i}" for i in range(5)]
        assert lines[3]["level"] == "warning"
        assert lines[4]["log_path"] == f"/var/log/ccat/transfer/{tid}/4.log"
        assert lines[0]["created_at"]
        assert c.get(f"{V1}/data_transfers/999999999/logs").status_code == 404
        assert c.get(url, params={"cursor": "nope"}).status_code == 422


def test_retry_a_failed_transfer_once(
    api: ApiServer, engine: Any, transfers: dict[str, int]
) -> None:
    tid = transfers["failed"]
    url = f"{V1}/data_transfers/{tid}/retry"
    with api.client("operator") as c:
        r = c.post(url)
        assert r.status_code == 200, r.text
        t = r.json()
        assert (t["status"], t["retry_count"], t["failure_reason"]) == ("pending", 0, None)
        assert t["next_attempt_at"] is None and t["last_failure_at"] is not None
        logs = c.get(f"{V1}/data_transfers/{tid}/logs").json()["items"]
        assert logs[-1]["message"] == (
            "transfer retry requested by test-operator (was failed: bbcp: connection reset by peer)"
        )
        n_logs = count(engine, m.DataTransferLog)
        n_audit = count(engine, m.ApiAuditLog, m.ApiAuditLog.resource == "data_transfer")
        assert n_audit >= 1
        # again: it is pending now, so 409 saying why; nothing written
        r = c.post(url)
        assert r.status_code == 409, r.text
        assert "already pending" in r.json()["detail"]
        assert count(engine, m.DataTransferLog) == n_logs
        assert count(engine, m.ApiAuditLog, m.ApiAuditLog.resource == "data_transfer") == n_audit
        assert c.get(f"{V1}/data_transfers/{tid}").json()["status"] == "pending"


def test_retry_a_failed_unpack_without_moving_bytes_again(
    api: ApiServer, transfers: dict[str, int]
) -> None:
    tid = transfers["unpack_failed"]
    with api.client("operator") as c:
        r = c.post(f"{V1}/data_transfers/{tid}/retry")
        assert r.status_code == 200, r.text
        t = r.json()
        assert (t["status"], t["unpack_status"]) == ("completed", "pending")
        assert (t["unpack_retry_count"], t["unpack_failure_reason"]) == (0, None)
        assert t["bytes_transferred"] == 5000
        logs = c.get(f"{V1}/data_transfers/{tid}/logs").json()["items"]
        assert "unpack retry requested" in logs[-1]["message"]
        assert "checksum mismatch: scan_00003.fits" in logs[-1]["message"]
        r = c.post(f"{V1}/data_transfers/{tid}/retry")
        assert r.status_code == 409
        assert "its unpack it is already pending" in r.json()["detail"]


def test_retry_refuses_what_did_not_fail(api: ApiServer, transfers: dict[str, int]) -> None:
    with api.client("operator") as c:
        r = c.post(f"{V1}/data_transfers/{transfers['running']}/retry")
        assert r.status_code == 409 and "it is in progress" in r.json()["detail"]
        assert r.json()["errors"][0]["type"] == "conflict"
        r = c.post(f"{V1}/data_transfers/{transfers['done']}/retry")
        assert r.status_code == 409 and "unpack it completed" in r.json()["detail"]
        r = c.post(f"{V1}/data_transfers/999999999/retry")
        assert r.status_code == 404
        r = c.post(f"{V1}/data_transfers/0/retry")
        assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["path", "transfer_id"]


def test_retry_needs_the_operate_scope(
    api: ApiServer, engine: Any, transfers: dict[str, int]
) -> None:
    url = f"{V1}/data_transfers/{transfers['running']}/retry"
    n_audit = count(engine, m.ApiAuditLog)
    for role, code in {
        None: 401,
        "expired": 401,
        "revoked": 401,
        "reader": 403,
        "instrument": 403,
        "overclaiming": 403,
    }.items():
        with api.client(role) as c:
            r = c.post(url)
        assert r.status_code == code, (role, r.text)
    assert count(engine, m.ApiAuditLog) == n_audit


def test_cancel_gives_a_transfer_up_once(api: ApiServer, engine: Any) -> None:
    """An operator gives up a transfer to a site that is gone: CANCELLED with the reason, a
    log line and an audit row; never again (409), and nothing that runs, arrived or is
    cancelled already can be cancelled. A retry of a cancelled transfer is refused too."""
    with Session(engine) as s, s.begin():
        ids = {
            "failed": add_transfer(
                s,
                api,
                status=Status.FAILED,
                retry_count=4,
                failure_reason="NetworkError: no route to host",
                last_failure_at=NOW,
                next_attempt_at=NOW + dt.timedelta(hours=1),
            ).id,
            "pending": add_transfer(s, api, status=Status.PENDING).id,
            "scheduled": add_transfer(s, api, status=Status.SCHEDULED).id,
            "running": add_transfer(s, api, status=Status.IN_PROGRESS).id,
            "arrived": add_transfer(
                s,
                api,
                status=Status.COMPLETED,
                unpack_status=Status.FAILED,
                unpack_failure_reason="StorageError: cologne buffer unreachable",
            ).id,
            "unpacking": add_transfer(
                s, api, status=Status.COMPLETED, unpack_status=Status.IN_PROGRESS
            ).id,
            "unpacked": add_transfer(
                s, api, status=Status.COMPLETED, unpack_status=Status.COMPLETED
            ).id,
        }
    reason = {"reason": "the us archive\nis decommissioned"}
    with api.client("operator") as c:
        url = f"{V1}/data_transfers/{ids['failed']}/cancel"
        r = c.post(url, json=reason)
        assert r.status_code == 200, r.text
        t = r.json()
        assert (t["status"], t["unpack_status"]) == ("cancelled", "cancelled")
        assert t["failure_reason"] == "cancelled by test-operator: the us archive is decommissioned"
        assert t["next_attempt_at"] is None and t["retry_count"] == 4
        logs = c.get(f"{V1}/data_transfers/{ids['failed']}/logs").json()["items"]
        assert logs[-1]["level"] == "warning"
        assert logs[-1]["message"] == (
            "transfer cancelled by test-operator: the us archive is decommissioned "
            "(was failed: NetworkError: no route to host)"
        )
        listed = c.get(f"{V1}/data_transfers", params={"status": "cancelled"}).json()["items"]
        assert ids["failed"] in {x["id"] for x in listed}
        n_logs = count(engine, m.DataTransferLog)
        n_audit = count(engine, m.ApiAuditLog, m.ApiAuditLog.resource == "data_transfer")
        # bytes that arrived at a site that went before unpacking them: cancellable too
        r = c.post(f"{V1}/data_transfers/{ids['arrived']}/cancel", json={"reason": "gone"})
        assert r.status_code == 200, r.text
        assert (r.json()["status"], r.json()["unpack_status"]) == ("cancelled", "cancelled")
        logs = c.get(f"{V1}/data_transfers/{ids['arrived']}/logs").json()["items"]
        assert logs[-1]["message"] == (
            "transfer cancelled by test-operator: gone "
            "(was arrived, unpack failed: StorageError: cologne buffer unreachable)"
        )
        n_logs = count(engine, m.DataTransferLog)
        n_audit = count(engine, m.ApiAuditLog, m.ApiAuditLog.resource == "data_transfer")
        for name, words in {
            "failed": "it is already cancelled",
            "scheduled": "a task was submitted for it",
            "running": "a worker is moving it",
            "unpacking": "its unpack is in_progress: cancel it once that ends",
            "unpacked": "its bytes arrived and were unpacked",
        }.items():
            r = c.post(f"{V1}/data_transfers/{ids[name]}/cancel", json=reason)
            assert r.status_code == 409, (name, r.text)
            assert words in r.json()["detail"], (name, r.json())
            assert r.json()["errors"][0]["loc"] == ["status"]
        r = c.post(f"{V1}/data_transfers/{ids['failed']}/retry")
        assert r.status_code == 409 and "it was cancelled" in r.json()["detail"]
        assert count(engine, m.DataTransferLog) == n_logs
        assert count(engine, m.ApiAuditLog, m.ApiAuditLog.resource == "data_transfer") == n_audit
        # the reason is required, plain text, bounded
        for bad, loc in (
            ({}, ["body", "reason"]),
            ({"reason": ""}, ["body", "reason"]),
            ({"reason": "x" * 501}, ["body", "reason"]),
            ({"reason": "a\x00b"}, ["body", "reason"]),
            ({"reason": "ok", "force": True}, ["body", "force"]),
        ):
            r = c.post(f"{V1}/data_transfers/{ids['pending']}/cancel", json=bad)
            assert r.status_code == 422, (bad, r.text)
            assert r.json()["errors"][0]["loc"] == loc, (bad, r.json())
        r = c.post(f"{V1}/data_transfers/{ids['pending']}/cancel", json={"reason": "gone"})
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        r = c.post(f"{V1}/data_transfers/999999999/cancel", json={"reason": "gone"})
        assert r.status_code == 404
    # the operate scope
    for role, code in {None: 401, "reader": 403, "instrument": 403}.items():
        with api.client(role) as c:
            r = c.post(f"{V1}/data_transfers/{ids['running']}/cancel", json=reason)
        assert r.status_code == code, (role, r.text)


@pytest.mark.parametrize(
    "path",
    [
        "/data_transfer_packages",
        "/data_transfer_packages/1",
        "/data_transfers",
        "/data_transfers/1",
        "/data_transfers/1/logs",
        "/pipeline/summary",
    ],
)
def test_reads_need_a_valid_token(api: ApiServer, path: str) -> None:
    for role in (None, "expired", "revoked"):
        with api.client(role) as c:
            assert c.get(V1 + path).status_code == 401, role
    with api.client("reader") as c:
        assert c.get(V1 + path).status_code in (200, 404)


# --- pipeline summary ----------------------------------------------------------------------------


def _summary(api: ApiServer) -> dict[str, Any]:
    with api.client("reader") as c:
        r = c.get(f"{V1}/pipeline/summary", params={"max_age_s": 0})
    assert r.status_code == 200, r.text
    return r.json()


def _location(summary: dict[str, Any], label: str) -> dict[str, Any]:
    site, name = label.split("/")
    (s,) = [x for x in summary["sites"] if x["site"] == site]
    (loc,) = [x for x in s["locations"] if x["name"] == name]
    return loc


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {
        k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)
    }


def test_summary_counts_match_what_was_inserted(api: ApiServer, engine: Any) -> None:
    before = _summary(api)
    long_ago = NOW - dt.timedelta(days=400)  # older than anything else in this database
    with Session(engine) as s, s.begin():
        eou = add_eou(s, api)
        # stage 0: 3 unpackaged files, the oldest filed long ago
        oldest_file = add_file(s, api, eou, size=100, created_at=long_ago)
        new_files = [add_file(s, api, eou, size=200) for _ in range(2)]
        # stage 1/2/5: packages by status and state
        pending = add_package(s, api, eou, created_at=long_ago)
        add_package(s, api, eou, status=Status.FAILED, state=PackageState.FAILED)
        ready = add_package(
            s, api, eou, status=Status.COMPLETED, created_at=long_ago + dt.timedelta(days=1)
        )
        dtp = add_dtp(s, api, status=Status.COMPLETED)
        moving = add_package(
            s,
            api,
            eou,
            status=Status.COMPLETED,
            state=PackageState.TRANSFERRING,
            data_transfer_package_id=dtp.id,
        )
        archived = add_package(
            s,
            api,
            eou,
            status=Status.COMPLETED,
            state=PackageState.ARCHIVED,
            data_transfer_package_id=dtp.id,
        )
        # stage 3/4: transfers
        waiting_transfer = add_transfer(s, api, status=Status.PENDING, created_at=long_ago)
        add_transfer(s, api, status=Status.FAILED)
        unpacking = add_transfer(
            s,
            api,
            status=Status.COMPLETED,
            unpack_status=Status.PENDING,
            finished_at=long_ago,
        )
        add_transfer(s, api, status=Status.COMPLETED, unpack_status=Status.COMPLETED)
        # stage 5: archive transfers
        lta = m.LongTermArchiveTransfer(
            raw_data_package_id=moving.id,
            origin_location_id=api.ids["cologne/buffer"],
            destination_location_id=api.ids["cologne/lta"],
            status=Status.SCHEDULED,
            created_at=long_ago,
        )
        s.add(lta)
        s.add(
            m.LongTermArchiveTransfer(
                raw_data_package_id=archived.id,
                origin_location_id=api.ids["cologne/buffer"],
                destination_location_id=api.ids["cologne/lta"],
                status=Status.COMPLETED,
            )
        )
        # stage 6: staging jobs
        job = m.StagingJob(
            destination_location_id=api.ids["cologne/ramses"],
            status=Status.PENDING,
            requested_at=long_ago,
        )
        s.add(job)
        s.add(
            m.StagingJob(destination_location_id=api.ids["cologne/ramses"], status=Status.COMPLETED)
        )
        # stage 7 and sites: copies
        for f in [oldest_file, *new_files]:
            s.add(
                m.RawDataFilePhysicalCopy(
                    raw_data_file_id=f.id,
                    data_location_id=api.ids["ccat/chai_raw_data"],
                    size=f.size,
                )
            )
        s.add(
            m.RawDataPackagePhysicalCopy(
                raw_data_package_id=archived.id,
                data_location_id=api.ids["cologne/lta"],
                size=5000,
                checksum_verified_at=NOW,
            )
        )
        doomed = m.RawDataPackagePhysicalCopy(
            raw_data_package_id=archived.id,
            data_location_id=api.ids["ccat/buffer"],
            size=5000,
            status=PhysicalCopyStatus.DELETION_SCHEDULED,
            updated_at=long_ago,
        )
        s.add(doomed)
        s.add(
            m.RawDataPackagePhysicalCopy(
                raw_data_package_id=moving.id,
                data_location_id=api.ids["cologne/ramses"],
                size=700,
                status=PhysicalCopyStatus.STAGED,
            )
        )
        s.flush()
        ids = {
            "file": str(oldest_file.id),
            "pending": pending.id,
            "ready": ready.id,
            "transfer": waiting_transfer.id,
            "unpack": unpacking.id,
            "lta": lta.id,
            "job": job.id,
            "doomed": doomed.id,
        }
    after = _summary(api)
    b, a = before["stages"], after["stages"]

    assert a["filing"]["unpackaged_files"] - b["filing"]["unpackaged_files"] == 3
    assert a["filing"]["unpackaged_bytes"] - b["filing"]["unpackaged_bytes"] == 500
    assert _delta(
        a["packaging"]["raw_data_packages_by_status"], b["packaging"]["raw_data_packages_by_status"]
    ) == {"pending": 1, "failed": 1, "completed": 3}
    tp_a, tp_b = a["transfer_packaging"], b["transfer_packaging"]
    assert tp_a["raw_data_packages_waiting"] - tp_b["raw_data_packages_waiting"] == 1
    assert (
        tp_a["raw_data_packages_in_transfer_packages"]
        - tp_b["raw_data_packages_in_transfer_packages"]
        == 2
    )
    # one transfer package above plus one per add_transfer without its own
    assert _delta(
        tp_a["data_transfer_packages_by_status"], tp_b["data_transfer_packages_by_status"]
    ) == {"completed": 5}
    assert _delta(
        a["transfer"]["data_transfers_by_status"], b["transfer"]["data_transfers_by_status"]
    ) == {"pending": 1, "failed": 1, "completed": 2}
    assert _delta(a["unpack"]["unpacks_by_status"], b["unpack"]["unpacks_by_status"]) == {
        "pending": 1,
        "completed": 1,
    }
    assert _delta(
        a["archive"]["archive_transfers_by_status"], b["archive"]["archive_transfers_by_status"]
    ) == {"scheduled": 1, "completed": 1}
    assert _delta(
        a["archive"]["raw_data_packages_by_state"], b["archive"]["raw_data_packages_by_state"]
    ) == {"waiting": 2, "failed": 1, "transferring": 1, "archived": 1}
    assert (
        a["archive"]["raw_data_packages_archived"] - b["archive"]["raw_data_packages_archived"] == 1
    )
    assert _delta(
        a["staging"]["staging_jobs_by_status"], b["staging"]["staging_jobs_by_status"]
    ) == {"pending": 1, "completed": 1}
    assert _delta(a["copies"]["copies_by_status"], b["copies"]["copies_by_status"]) == {
        "present": 4,
        "deletion_scheduled": 1,
        "staged": 1,
    }
    assert _delta(
        a["copies"]["copies_by_type"]["raw_data_package"],
        b["copies"]["copies_by_type"].get("raw_data_package", {}),
    ) == {"present": 1, "deletion_scheduled": 1, "staged": 1}

    # per location: live copies (present or staged) and their bytes
    for label, n, size in (
        ("ccat/chai_raw_data", 3, 500),
        ("cologne/lta", 1, 5000),
        ("cologne/ramses", 1, 700),
        ("ccat/buffer", 0, 0),  # the copy being deleted does not count
    ):
        la, lb = _location(after, label), _location(before, label)
        assert la["present_copies"] - lb["present_copies"] == n, label
        assert la["present_bytes"] - lb["present_bytes"] == size, label
    assert _location(after, "cologne/lta")["location_type"] == "long_term_archive"
    site_a = next(x for x in after["sites"] if x["site"] == "cologne")
    site_b = next(x for x in before["sites"] if x["site"] == "cologne")
    assert site_a["present_bytes"] - site_b["present_bytes"] == 5700
    assert {x["site"] for x in after["sites"]} == {"ccat", "cologne", "us"}

    # the oldest waiting item of each stage is the one inserted long ago, with a plausible age
    expected_age = (dt.datetime.now(dt.UTC) - long_ago).total_seconds()
    for stage, ident in (
        ("filing", ids["file"]),
        ("packaging", ids["pending"]),
        ("transfer", ids["transfer"]),
        ("unpack", ids["unpack"]),
        ("archive", ids["lta"]),
        ("staging", ids["job"]),
        ("copies", ids["doomed"]),
    ):
        oldest = a[stage]["oldest_waiting"]
        assert oldest is not None, stage
        assert oldest["id"] == ident, stage
        assert expected_age - 120 < oldest["age_s"] <= expected_age + 1, (stage, oldest)
    oldest = a["transfer_packaging"]["oldest_waiting"]
    assert oldest["id"] == ids["ready"]
    # inserted one day after long_ago (NOW is taken at import: the suite may run minutes later)
    assert expected_age - 86400 - 120 < oldest["age_s"] <= expected_age - 86400 + 1


def test_summary_on_an_empty_pipeline_has_every_status(api: ApiServer) -> None:
    summary = _summary(api)
    st = summary["stages"]
    assert set(st["packaging"]["raw_data_packages_by_status"]) == {
        "pending",
        "scheduled",
        "in_progress",
        "completed",
        "failed",
        "cancelled",
    }
    assert set(st["archive"]["raw_data_packages_by_state"]) == {
        "waiting",
        "transferring",
        "archived",
        "failed",
    }
    assert "deletion_possible" in st["copies"]["copies_by_status"]
    assert summary["generated_at"]


def test_summary_is_shared_for_max_age_s(api: ApiServer, engine: Any) -> None:
    fresh = _summary(api)
    with Session(engine) as s, s.begin():
        add_transfer(s, api, status=Status.SCHEDULED)
    with api.client("reader") as c:
        cached = c.get(f"{V1}/pipeline/summary", params={"max_age_s": 3600}).json()
        assert cached == fresh  # the same result, computed before the insert
        newer = c.get(f"{V1}/pipeline/summary", params={"max_age_s": 0}).json()
        assert newer["generated_at"] > fresh["generated_at"]
        by_status = newer["stages"]["transfer"]["data_transfers_by_status"]
        assert (
            by_status["scheduled"]
            == fresh["stages"]["transfer"]["data_transfers_by_status"]["scheduled"] + 1
        )
        for bad in (-1, 3601, "x"):
            r = c.get(f"{V1}/pipeline/summary", params={"max_age_s": bad})
            assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["query", "max_age_s"]
