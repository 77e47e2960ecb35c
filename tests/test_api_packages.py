"""Raw data packages over real HTTP against a real PostgreSQL: create, finalize, follow, state."""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ccat_ops_db.db import make_engine
from ccat_ops_db.enums import (
    LocationType,
    PackageState,
    PhysicalCopyStatus,
    Status,
    TransferMethod,
)

from .api_server import ApiServer, running_api
from .conftest import PgServer

PKG = "/api/v1/raw_data_packages"


@pytest.fixture(scope="module")
def api(pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    name = pg_server.create_database("pkg")
    with running_api(pg_server.url(name), tmp_path_factory.mktemp("pkg")) as server:
        yield server
    pg_server.drop_database(name)


@pytest.fixture(scope="module")
def engine(api: ApiServer) -> Iterator[Any]:
    eng = make_engine(api.db_url)
    yield eng
    eng.dispose()


def start_eou(api: ApiServer) -> str:
    eou_id = str(uuid.uuid4())
    body = {"id": eou_id, "start_time": "2026-05-01T03:00:00Z", "instrument_id": api.ids["CHAI"]}
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


def file_files(api: ApiServer, eou_id: str, n: int, first: int = 0, **overrides: object) -> list:
    """File ``n`` files of ``eou_id``; returns their ids in order."""
    files = [file_body(api, eou_id, i, **overrides) for i in range(first, first + n)]
    with api.client("instrument") as c:
        r = c.post("/api/v1/raw_data_files/bulk", json={"files": files})
    assert r.status_code == 200, r.text
    return [f["id"] for f in files]


def package_body(api: ApiServer, eou_id: str, file_ids: list, **overrides: object) -> dict:
    return {
        "name": f"chai_lfa_{uuid.uuid4().hex[:12]}.tar",
        "executed_obs_unit_id": eou_id,
        "instrument_module_id": api.ids["CHAI/LFA"],
        "origin_location_id": api.ids["ccat/chai_raw_data"],
        "file_ids": file_ids,
        **overrides,
    }


def new_package(api: ApiServer, n_files: int = 3) -> tuple[dict, str, list]:
    """A fresh observation with ``n_files`` files packaged: (package json, eou id, file ids)."""
    eou_id = start_eou(api)
    ids = file_files(api, eou_id, n_files)
    with api.client("instrument") as c:
        r = c.post(PKG, json=package_body(api, eou_id, ids))
    assert r.status_code == 201, r.text
    return r.json(), eou_id, ids


def finalize_body(api: ApiServer, **overrides: object) -> dict:
    return {
        "size": 123456,
        "checksum": hashlib.sha256(b"tar").hexdigest(),
        "location_id": api.ids["ccat/buffer"],
        "relative_path": "packages/2026/05/01/pkg.tar",
        **overrides,
    }


def counts(engine: Any) -> dict[str, int]:
    """Row counts that a rejected write must leave unchanged."""
    with Session(engine) as s:
        return {
            "packages": s.scalar(select(func.count()).select_from(m.RawDataPackage)) or 0,
            "packaged_files": s.scalar(
                select(func.count())
                .select_from(m.RawDataFile)
                .where(m.RawDataFile.raw_data_package_id.is_not(None))
            )
            or 0,
            "copies": s.scalar(select(func.count()).select_from(m.PhysicalCopy)) or 0,
            "audit": s.scalar(select(func.count()).select_from(m.ApiAuditLog)) or 0,
        }


def error_locs(r: httpx.Response) -> list[list]:
    return [e["loc"] for e in r.json()["errors"]]


# --- create ----------------------------------------------------------------------------------


def test_create_get_list_and_recreate(api: ApiServer, engine: Any) -> None:
    eou_id = start_eou(api)
    ids = file_files(api, eou_id, 5)
    body = package_body(api, eou_id, ids)
    with api.client("instrument") as c:
        r = c.post(PKG, json=body)
        assert r.status_code == 201, r.text
        pkg = r.json()
        assert pkg["name"] == body["name"]
        assert pkg["relative_path"] == body["name"]  # defaults to the name
        assert (pkg["state"], pkg["status"], pkg["file_count"]) == ("waiting", "pending", 5)
        assert pkg["size"] is None and pkg["checksum"] is None
        assert pkg["created_by_token_id"] is not None
        # every file now points at the package, and reads as waiting
        with Session(engine) as s:
            owners = set(
                s.scalars(
                    select(m.RawDataFile.raw_data_package_id).where(
                        m.RawDataFile.executed_obs_unit_id == uuid.UUID(eou_id)
                    )
                )
            )
            audit = s.scalars(
                select(m.ApiAuditLog).where(m.ApiAuditLog.resource == "raw_data_package")
            ).all()
        assert owners == {pkg["id"]}
        assert any(a.resource_ids == [str(pkg["id"])] and a.status_code == 201 for a in audit)
        assert c.get(f"/api/v1/raw_data_files/{ids[0]}").json()["state"] == "waiting"

        # detail: files by path, bounded
        r = c.get(f"{PKG}/{pkg['id']}")
        assert r.status_code == 200
        detail = r.json()
        assert [f["id"] for f in detail["files"]] == ids  # filed in path order
        assert detail["files_truncated"] is False
        assert detail["ivoa_metadata"] is None
        assert detail["files"][0]["relative_path"].endswith("scan_00000.fits")
        r = c.get(f"{PKG}/{pkg['id']}", params={"file_limit": 2})
        assert len(r.json()["files"]) == 2 and r.json()["files_truncated"] is True
        assert r.json()["file_count"] == 5
        assert c.get(f"{PKG}/{pkg['id']}", params={"file_limit": 5000}).status_code == 422

        # the same name and file set again: 200 with the same package, files in any order
        before = counts(engine)
        r = c.post(PKG, json={**body, "file_ids": list(reversed(ids))})
        assert r.status_code == 200, r.text
        assert r.json()["id"] == pkg["id"]
        # same name, other content: 409 naming each differing field, nothing written
        r = c.post(
            PKG,
            json={**body, "instrument_module_id": api.ids["CHAI/HFA"], "file_ids": ids[:4]},
        )
        assert r.status_code == 409, r.text
        assert "instrument_module_id" in r.json()["detail"] and "file_ids" in r.json()["detail"]
        assert error_locs(r) == [["body", "instrument_module_id"], ["body", "file_ids"]]
        assert "1 packaged file(s) were not requested" in r.json()["errors"][1]["msg"]
        r = c.post(PKG, json={**body, "relative_path": "elsewhere/x.tar"})
        assert r.status_code == 409 and error_locs(r) == [["body", "relative_path"]]
        assert counts(engine) == before

        # list with filters
        r = c.get(PKG, params={"executed_obs_unit_id": eou_id})
        assert [x["id"] for x in r.json()["items"]] == [pkg["id"]]
        r = c.get(
            PKG,
            params={
                "state": "waiting",
                "status": "pending",
                "instrument_module_id": api.ids["CHAI/LFA"],
                "executed_obs_unit_id": eou_id,
            },
        )
        assert [x["id"] for x in r.json()["items"]] == [pkg["id"]]
        r = c.get(PKG, params={"executed_obs_unit_id": eou_id, "status": "completed"})
        assert r.json()["items"] == []
        assert c.get(PKG, params={"data_transfer_package_id": 999999}).json()["items"] == []
        for bad in (
            {"state": "lost"},
            {"status": "done"},
            {"instrument_module_id": 0},
            {"data_transfer_package_id": 2**63},
            {"executed_obs_unit_id": "x"},
        ):
            r = c.get(PKG, params=bad)
            assert r.status_code == 422, bad
            assert r.json()["errors"][0]["loc"] == ["query", next(iter(bad))]


def test_list_pages_through_every_package(api: ApiServer) -> None:
    eou_id = start_eou(api)
    ids = file_files(api, eou_id, 5)
    made = []
    with api.client("instrument") as c:
        for i in range(5):
            r = c.post(PKG, json=package_body(api, eou_id, ids[i : i + 1]))
            assert r.status_code == 201
            made.append(r.json()["id"])
        seen, cursor = [], None
        while True:
            params: dict[str, Any] = {"executed_obs_unit_id": eou_id, "limit": 2}
            if cursor:
                params["cursor"] = cursor
            page = c.get(PKG, params=params).json()
            assert page["limit"] == 2
            seen += [x["id"] for x in page["items"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert seen == made
        assert c.get(PKG, params={"cursor": "garbage!"}).status_code == 422


def test_create_lists_every_bad_file_with_its_reason(api: ApiServer, engine: Any) -> None:
    eou_id = start_eou(api)
    other_eou = start_eou(api)
    good = file_files(api, eou_id, 2)
    hfa = file_files(api, eou_id, 1, first=10, instrument_module_id=api.ids["CHAI/HFA"])
    foreign = file_files(api, other_eou, 1)
    unknown = str(uuid.uuid4())
    packaged_pkg, _, packaged_files = new_package(api, 1)
    before = counts(engine)
    with api.client("instrument") as c:
        r = c.post(
            PKG,
            json=package_body(api, eou_id, [*good, hfa[0], foreign[0], unknown, packaged_files[0]]),
        )
        assert r.status_code == 422, r.text
        errs = r.json()["errors"]
        assert [e["loc"] for e in errs] == [["body", "file_ids", i] for i in (2, 3, 4, 5)]
        assert "belongs to instrument module" in errs[0]["msg"] and hfa[0] in errs[0]["msg"]
        assert f"belongs to executed obs unit {other_eou}" in errs[1]["msg"]
        assert errs[2]["msg"] == f"file {unknown} does not exist"
        assert f"already in raw data package {packaged_pkg['id']}" in errs[3]["msg"]
        assert errs[3]["file_id"] == packaged_files[0]  # one entry per file, every reason
        # only files already packaged (in a package of the same observation): 409
        mine = file_files(api, eou_id, 1, first=20)
        r = c.post(PKG, json=package_body(api, eou_id, mine))
        assert r.status_code == 201
        mine_pkg = r.json()["id"]
        before = counts(engine)
        r = c.post(PKG, json=package_body(api, eou_id, [*good, mine[0]]))
        assert r.status_code == 409, r.text
        assert error_locs(r) == [["body", "file_ids", 2]]
        err = r.json()["errors"][0]
        assert err["type"] == "conflict" and err["file_id"] == mine[0]
        assert err["msg"] == f"file {mine[0]} is already in raw data package {mine_pkg}"
        # files of another origin location than declared
        r = c.post(
            PKG,
            json=package_body(
                api, eou_id, good, origin_location_id=api.ids["ccat/primecam_raw_data"]
            ),
        )
        assert r.status_code == 422
        assert "was filed at data location" in r.json()["errors"][0]["msg"]
    assert counts(engine) == before  # nothing half-written


@pytest.mark.parametrize(
    ("override", "loc"),
    [
        ({"name": "a/b.tar"}, ["body", "name"]),
        ({"name": ""}, ["body", "name"]),
        ({"name": "x" * 256}, ["body", "name"]),
        ({"name": ".."}, ["body", "name"]),
        ({"file_ids": []}, ["body", "file_ids"]),
        ({"file_ids": ["nope"]}, ["body", "file_ids", 0]),
        ({"instrument_module_id": 0}, ["body", "instrument_module_id"]),
        ({"origin_location_id": 2**31}, ["body", "origin_location_id"]),
        ({"executed_obs_unit_id": "nope"}, ["body", "executed_obs_unit_id"]),
        ({"relative_path": "/abs/x.tar"}, ["body", "relative_path"]),
        ({"colour": "red"}, ["body", "colour"]),
    ],
)
def test_create_bad_input_is_422_naming_the_field(
    api: ApiServer, override: dict, loc: list
) -> None:
    body = {**package_body(api, str(uuid.uuid4()), [str(uuid.uuid4())]), **override}
    with api.client("instrument") as c:
        r = c.post(PKG, json=body)
    assert r.status_code == 422, r.text
    assert loc in error_locs(r), r.json()


def test_create_bounds_and_references(api: ApiServer, engine: Any) -> None:
    eou_id = start_eou(api)
    ids = file_files(api, eou_id, 2)
    before = counts(engine)
    with api.client("instrument") as c:
        too_many = [str(uuid.uuid4()) for _ in range(10_001)]
        r = c.post(PKG, json=package_body(api, eou_id, too_many))
        assert r.status_code == 422 and error_locs(r) == [["body", "file_ids"]]
        r = c.post(PKG, json=package_body(api, eou_id, [ids[0], ids[1], ids[0]]))
        assert r.status_code == 422 and error_locs(r) == [["body", "file_ids", 2]]
        assert "listed twice" in r.json()["errors"][0]["msg"]
        r = c.post(
            PKG,
            json=package_body(
                api,
                str(uuid.uuid4()),
                ids,
                instrument_module_id=999999,
                origin_location_id=api.ids["ccat/buffer"],
            ),
        )
        assert r.status_code == 422
        assert error_locs(r) == [
            ["body", "executed_obs_unit_id"],
            ["body", "instrument_module_id"],
            ["body", "origin_location_id"],
        ]
        assert "not a source" in r.json()["errors"][2]["msg"]
    assert counts(engine) == before


def test_create_ten_thousand_files_in_one_request(api: ApiServer, engine: Any) -> None:
    eou_id = start_eou(api)
    ids: list[str] = []
    for first in (0, 5000):
        ids += file_files(api, eou_id, 5000, first=first)
    with api.client("instrument") as c:
        r = c.post(PKG, json=package_body(api, eou_id, ids))
        assert r.status_code == 201, r.text[:500]
        pkg = r.json()
        assert pkg["file_count"] == 10_000
        detail = c.get(f"{PKG}/{pkg['id']}").json()
        assert len(detail["files"]) == 100 and detail["files_truncated"] is True
    with Session(engine) as s:
        n = s.scalar(
            select(func.count())
            .select_from(m.RawDataFile)
            .where(m.RawDataFile.raw_data_package_id == pkg["id"])
        )
    assert n == 10_000


def test_concurrent_creates_agree(api: ApiServer, engine: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor

    eou_id = start_eou(api)
    ids = file_files(api, eou_id, 50)
    same = package_body(api, eou_id, ids)

    def post(body: dict) -> httpx.Response:
        with api.client("instrument") as c:
            return c.post(PKG, json=body)

    # the same package four times at once: one creates it, the others get it back
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(post, [same] * 4))
    assert sorted(r.status_code for r in answers) == [200, 200, 200, 201], [
        r.text[:300] for r in answers
    ]
    assert len({r.json()["id"] for r in answers}) == 1
    # four different names for the same new files at once: exactly one wins
    more = file_files(api, eou_id, 50, first=100)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(post, [package_body(api, eou_id, more) for _ in range(4)]))
    assert sorted(r.status_code for r in answers) == [201, 409, 409, 409], [
        r.text[:200] for r in answers
    ]
    winner = next(r.json()["id"] for r in answers if r.status_code == 201)
    with Session(engine) as s:
        owners = set(
            s.scalars(
                select(m.RawDataFile.raw_data_package_id).where(
                    m.RawDataFile.id.in_([uuid.UUID(x) for x in more])
                )
            )
        )
    assert owners == {winner}


# --- finalize ---------------------------------------------------------------------------------


def test_finalize_records_the_tar_and_is_idempotent(api: ApiServer, engine: Any) -> None:
    pkg, _, _ = new_package(api)
    body = finalize_body(api)
    with api.client("instrument") as c:
        r = c.put(f"{PKG}/{pkg['id']}/finalize", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["status"] == "completed" and out["state"] == "waiting"
        assert (out["size"], out["checksum"], out["checksum_algorithm"]) == (
            body["size"],
            body["checksum"],
            "sha256",
        )
        copies = c.get(f"{PKG}/{pkg['id']}/physical_copies").json()["items"]
        assert len(copies) == 1
        copy = copies[0]
        assert (copy["site"], copy["location"], copy["location_type"]) == (
            "ccat",
            "buffer",
            "buffer",
        )
        assert copy["location_id"] == api.ids["ccat/buffer"]
        assert copy["status"] == "present" and copy["checksum"] == body["checksum"]
        assert copy["relative_path"] == body["relative_path"] and copy["size"] == body["size"]
        assert copy["checksum_verified_at"] is not None and copy["deleted_at"] is None

        before = counts(engine)
        # the same values again (checksum in upper case is the same checksum): 200, no write
        r = c.put(
            f"{PKG}/{pkg['id']}/finalize", json={**body, "checksum": body["checksum"].upper()}
        )
        assert r.status_code == 200, r.text
        assert counts(engine) == before
        # other values: 409 naming the fields
        r = c.put(
            f"{PKG}/{pkg['id']}/finalize",
            json={**body, "size": 1, "location_id": api.ids["ccat/chai_raw_data"]},
        )
        assert r.status_code == 409, r.text
        assert error_locs(r) == [["body", "size"], ["body", "location_id"]]
        assert "size, location_id" in r.json()["detail"]
        assert counts(engine) == before
        assert c.get(f"{PKG}/{pkg['id']}").json()["size"] == body["size"]
        r = c.get(
            PKG, params={"status": "completed", "executed_obs_unit_id": pkg["executed_obs_unit_id"]}
        )
        assert [x["id"] for x in r.json()["items"]] == [pkg["id"]]


def test_finalize_at_the_source_itself(api: ApiServer) -> None:
    pkg, _, _ = new_package(api, 1)
    with api.client("operator") as c:
        r = c.put(
            f"{PKG}/{pkg['id']}/finalize",
            json=finalize_body(
                api,
                location_id=api.ids["ccat/chai_raw_data"],
                checksum_algorithm="md5",
                checksum="0123456789abcdef" * 2,
            ),
        )
        assert r.status_code == 200, r.text
        assert r.json()["checksum_algorithm"] == "md5"


@pytest.mark.parametrize(
    ("override", "loc"),
    [
        ({"size": -1}, ["body", "size"]),
        ({"size": 2**63}, ["body", "size"]),
        ({"checksum": "xyz"}, ["body", "checksum"]),
        ({"checksum": "zz" * 32}, ["body", "checksum"]),  # not hex
        ({"checksum": "ab" * 10}, ["body", "checksum"]),  # wrong length for sha256
        ({"checksum_algorithm": "crc32"}, ["body", "checksum_algorithm"]),
        ({"location_id": 0}, ["body", "location_id"]),
        ({"relative_path": "../x.tar"}, ["body", "relative_path"]),
        ({"extra": 1}, ["body", "extra"]),
    ],
)
def test_finalize_bad_input_is_422(api: ApiServer, override: dict, loc: list) -> None:
    with api.client("instrument") as c:
        r = c.put(f"{PKG}/1/finalize", json=finalize_body(api, **override))
    assert r.status_code == 422, r.text
    assert loc in error_locs(r), r.json()


def test_finalize_location_rules_and_unknown_package(api: ApiServer, engine: Any) -> None:
    pkg, _, _ = new_package(api, 1)
    before = counts(engine)
    with api.client("instrument") as c:
        url = f"{PKG}/{pkg['id']}/finalize"
        r = c.put(url, json=finalize_body(api, location_id=api.ids["cologne/lta"]))
        assert r.status_code == 422 and "not a source or buffer" in r.text
        r = c.put(url, json=finalize_body(api, location_id=api.ids["cologne/buffer"]))
        assert r.status_code == 422 and "not at the site of the origin" in r.text
        r = c.put(url, json=finalize_body(api, location_id=999999))
        assert r.status_code == 422 and error_locs(r) == [["body", "location_id"]]
        r = c.put(f"{PKG}/999999999/finalize", json=finalize_body(api))
        assert r.status_code == 404 and "raw data package 999999999 not found" in r.text
    assert counts(engine) == before
    with api.client("reader") as c:
        assert c.get(f"{PKG}/{pkg['id']}").json()["status"] == "pending"


# --- status and copies ------------------------------------------------------------------------


def test_status_shows_transfer_package_transfers_and_archive(api: ApiServer, engine: Any) -> None:
    pkg, _, _ = new_package(api, 1)
    with api.client("reader") as c:
        r = c.get(f"{PKG}/{pkg['id']}/status")
        assert r.status_code == 200, r.text
        st = r.json()
        assert (st["state"], st["status"], st["retry_count"]) == ("waiting", "pending", 0)
        assert st["data_transfer_package"] is None
        assert st["transfers"] == [] and st["archive_transfers"] == []
    with Session(engine) as s, s.begin():
        dtp = m.DataTransferPackage(
            name=f"dtp_{uuid.uuid4().hex[:8]}.tar",
            relative_path="dtp.tar",
            origin_location_id=api.ids["ccat/buffer"],
            status=Status.COMPLETED,
        )
        s.add(dtp)
        s.flush()
        s.add(
            m.DataTransfer(
                data_transfer_package_id=dtp.id,
                origin_location_id=api.ids["ccat/buffer"],
                destination_location_id=api.ids["cologne/buffer"],
                method=TransferMethod.BBCP,
                status=Status.FAILED,
                retry_count=3,
                failure_reason="bbcp: connection reset by peer",
            )
        )
        p = s.get(m.RawDataPackage, pkg["id"])
        assert p is not None
        p.data_transfer_package_id = dtp.id
        p.state = PackageState.TRANSFERRING
        s.add(
            m.LongTermArchiveTransfer(
                raw_data_package_id=pkg["id"],
                origin_location_id=api.ids["cologne/buffer"],
                destination_location_id=api.ids["cologne/lta"],
                status=Status.IN_PROGRESS,
            )
        )
        dtp_id, dtp_name = dtp.id, dtp.name
    with api.client("reader") as c:
        st = c.get(f"{PKG}/{pkg['id']}/status").json()
        assert st["state"] == "transferring"
        assert st["data_transfer_package"] == {
            "id": dtp_id,
            "name": dtp_name,
            "status": "completed",
        }
        (t,) = st["transfers"]
        assert t["destination_location"] == "cologne/buffer"
        assert (t["status"], t["retry_count"]) == ("failed", 3)
        assert t["failure_reason"] == "bbcp: connection reset by peer"
        (a,) = st["archive_transfers"]
        assert (a["destination_location"], a["status"]) == ("cologne/lta", "in_progress")
        r = c.get(PKG, params={"data_transfer_package_id": dtp_id})
        assert [x["id"] for x in r.json()["items"]] == [pkg["id"]]


def test_physical_copies_lists_every_copy_paginated(api: ApiServer, engine: Any) -> None:
    pkg, _, _ = new_package(api, 1)
    with api.client("instrument") as c:
        assert c.put(f"{PKG}/{pkg['id']}/finalize", json=finalize_body(api)).status_code == 200
    deleted_at = dt.datetime(2026, 5, 2, tzinfo=dt.UTC)
    with Session(engine) as s, s.begin():
        s.add_all(
            [
                m.RawDataPackagePhysicalCopy(
                    raw_data_package_id=pkg["id"],
                    data_location_id=api.ids["cologne/buffer"],
                    status=PhysicalCopyStatus.DELETED,
                    deleted_at=deleted_at,
                ),
                m.RawDataPackagePhysicalCopy(
                    raw_data_package_id=pkg["id"],
                    data_location_id=api.ids["cologne/lta"],
                    status=PhysicalCopyStatus.PRESENT,
                ),
            ]
        )
    with api.client("reader") as c:
        url = f"{PKG}/{pkg['id']}/physical_copies"
        first = c.get(url, params={"limit": 2}).json()
        assert len(first["items"]) == 2 and first["next_cursor"]
        rest = c.get(url, params={"limit": 2, "cursor": first["next_cursor"]}).json()
        items = first["items"] + rest["items"]
        assert rest["next_cursor"] is None
        assert [(x["site"], x["location"], x["status"]) for x in items] == [
            ("ccat", "buffer", "present"),
            ("cologne", "buffer", "deleted"),
            ("cologne", "lta", "present"),
        ]
        assert items[1]["deleted_at"].startswith("2026-05-02")
        assert items[2]["location_type"] == "long_term_archive"
        assert items[2]["checksum_verified_at"] is None


def test_unknown_and_malformed_package_ids(api: ApiServer) -> None:
    with api.client("operator") as c:
        for suffix in ("", "/status", "/physical_copies"):
            r = c.get(f"{PKG}/999999999{suffix}")
            assert r.status_code == 404, suffix
            assert r.json()["detail"] == "raw data package 999999999 not found"
            for bad in ("0", "abc", str(2**63), "-1"):
                r = c.get(f"{PKG}/{bad}{suffix}")
                assert r.status_code == 422, (bad, suffix)
                assert r.json()["errors"][0]["loc"] == ["path", "package_id"]
        r = c.patch(f"{PKG}/999999999/state", json={"state": "failed", "reason": "x"})
        assert r.status_code == 404


# --- lifecycle state ---------------------------------------------------------------------------


def _state(c: httpx.Client, pkg_id: int, state: str, reason: str = "operator says so") -> Any:
    return c.patch(f"{PKG}/{pkg_id}/state", json={"state": state, "reason": reason})


def test_state_transitions_follow_the_rules(api: ApiServer, engine: Any) -> None:
    pkg, _, _ = new_package(api, 1)
    pid = pkg["id"]
    with api.client("operator") as c:
        before = counts(engine)
        r = _state(c, pid, "archived")
        assert r.status_code == 409, r.text
        assert "verified long-term archive copy" in r.json()["detail"]
        assert error_locs(r) == [["body", "state"]]
        r = _state(c, pid, "transferring")
        assert r.status_code == 409 and "only as part of a data transfer package" in r.text
        assert counts(engine) == before  # refused: no write, no audit

        # the current state again: a no-op
        r = _state(c, pid, "waiting")
        assert r.status_code == 200 and r.json()["state"] == "waiting"
        assert counts(engine) == before

        r = _state(c, pid, "failed", "tar kept failing: disk full on chai computer")
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "failed"
        assert r.json()["failure_reason"] == "tar kept failing: disk full on chai computer"
        st = c.get(f"{PKG}/{pid}/status").json()
        assert st["last_failure_at"] is not None
        with Session(engine) as s:
            detail = s.scalars(
                select(m.ApiAuditLog.detail).where(
                    m.ApiAuditLog.resource == "raw_data_package",
                    m.ApiAuditLog.path == f"{PKG}/{pid}/state",
                )
            ).all()
        assert detail == ["state waiting -> failed: tar kept failing: disk full on chai computer"]

        # retry: failed -> waiting clears the failure and the retry count
        with Session(engine) as s, s.begin():
            p = s.get(m.RawDataPackage, pid)
            assert p is not None
            p.retry_count = 3
            p.status = Status.FAILED
        r = _state(c, pid, "waiting", "disk cleaned")
        assert r.status_code == 200, r.text
        out = r.json()
        assert (out["state"], out["status"], out["retry_count"]) == ("waiting", "pending", 0)
        assert out["failure_reason"] is None

        # an LTA copy that is not verified is not enough, a verified one is
        with Session(engine) as s, s.begin():
            s.add(
                m.RawDataPackagePhysicalCopy(
                    raw_data_package_id=pid,
                    data_location_id=api.ids["cologne/lta"],
                    status=PhysicalCopyStatus.PRESENT,
                )
            )
            # a verified copy at a BUFFER does not count either
            s.add(
                m.RawDataPackagePhysicalCopy(
                    raw_data_package_id=pid,
                    data_location_id=api.ids["cologne/buffer"],
                    status=PhysicalCopyStatus.PRESENT,
                    checksum_verified_at=dt.datetime.now(dt.UTC),
                )
            )
        assert _state(c, pid, "archived").status_code == 409
        with Session(engine) as s, s.begin():
            copy = s.scalar(
                select(m.RawDataPackagePhysicalCopy).where(
                    m.RawDataPackagePhysicalCopy.raw_data_package_id == pid,
                    m.RawDataPackagePhysicalCopy.data_location_id == api.ids["cologne/lta"],
                )
            )
            assert copy is not None
            copy.checksum_verified_at = dt.datetime.now(dt.UTC)
        r = _state(c, pid, "archived", "verified in the Cologne LTA")
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "archived" and r.json()["archived_at"] is not None
        # archived is final
        r = _state(c, pid, "waiting")
        assert r.status_code == 409 and "stays archived" in r.json()["detail"]
        assert c.get(f"{PKG}/{pid}").json()["state"] == "archived"


def test_state_with_a_transfer_package(api: ApiServer, engine: Any) -> None:
    pkg, _, _ = new_package(api, 1)
    pid = pkg["id"]
    with Session(engine) as s, s.begin():
        dtp = m.DataTransferPackage(
            name=f"dtp_{uuid.uuid4().hex[:8]}.tar",
            relative_path="dtp.tar",
            origin_location_id=api.ids["ccat/buffer"],
        )
        s.add(dtp)
        s.flush()
        p = s.get(m.RawDataPackage, pid)
        assert p is not None
        p.data_transfer_package_id = dtp.id
    with api.client("operator") as c:
        assert _state(c, pid, "transferring").status_code == 200
        assert _state(c, pid, "failed", "bbcp gave up").status_code == 200
        r = _state(c, pid, "waiting")
        assert r.status_code == 409
        assert "set it to transferring to retry it" in r.json()["detail"]
        r = _state(c, pid, "transferring", "link is back")
        assert r.status_code == 200 and r.json()["failure_reason"] is None


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"state": "lost", "reason": "x"}, ["body", "state"]),
        ({"state": "failed"}, ["body", "reason"]),
        ({"state": "failed", "reason": ""}, ["body", "reason"]),
        ({"state": "failed", "reason": "x" * 1001}, ["body", "reason"]),
        ({"state": "failed", "reason": "a\x00b"}, ["body", "reason"]),
        ({"state": "failed", "reason": "x", "force": True}, ["body", "force"]),
    ],
)
def test_state_bad_input(api: ApiServer, body: dict, loc: list) -> None:
    with api.client("operator") as c:
        r = c.patch(f"{PKG}/1/state", json=body)
    assert r.status_code == 422, r.text
    assert loc in error_locs(r)


# --- auth ----------------------------------------------------------------------------------------


WRITES = [
    ("POST", PKG, "file"),
    ("PUT", f"{PKG}/1/finalize", "file"),
    ("PATCH", f"{PKG}/1/state", "operate"),
]
READS = [PKG, f"{PKG}/1", f"{PKG}/1/status", f"{PKG}/1/physical_copies"]


@pytest.mark.parametrize(("method", "path", "scope"), WRITES)
def test_writes_need_a_valid_token_with_the_scope(
    api: ApiServer, engine: Any, method: str, path: str, scope: str
) -> None:
    cases: dict[str | None, int] = {
        None: 401,
        "expired": 401,
        "revoked": 401,
        "reader": 403,
        "overclaiming": 403,
    }
    if scope == "operate":
        cases["instrument"] = 403
    before = counts(engine)
    for role, code in cases.items():
        with api.client(role) as c:
            r = c.request(method, path, json={})
        assert r.status_code == code, (role, r.text)
        if code == 403:
            assert f"token lacks scope {scope!r}" in r.json()["detail"]
    r = httpx.request(method, api.base_url + path, json={}, headers={"Authorization": "Bearer x"})
    assert r.status_code == 401
    assert counts(engine)["audit"] == before["audit"]


@pytest.mark.parametrize("path", READS)
def test_reads_need_a_valid_token(api: ApiServer, path: str) -> None:
    for role in (None, "expired", "revoked"):
        with api.client(role) as c:
            assert c.get(path).status_code == 401, role
    with api.client("reader") as c:
        assert c.get(path).status_code in (200, 404)


def test_lta_location_type_in_reference_topology(api: ApiServer, engine: Any) -> None:
    """The rules above rely on the seeded topology: cologne/lta is a LONG_TERM_ARCHIVE."""
    with Session(engine) as s:
        loc = s.get(m.DataLocation, api.ids["cologne/lta"])
        assert loc is not None and loc.location_type == LocationType.LONG_TERM_ARCHIVE
