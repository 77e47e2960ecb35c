"""Fixtures of the security suite: one real API process over a real PostgreSQL, with users and
tokens for every authorization case, and a few rows that write routes could change."""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ccat_ops_db.db import make_engine
from ccat_ops_db.enums import ExecutionStatus, PackageState, Status
from ccat_ops_db.models import Base

from ..api_server import ApiServer, running_api
from ..conftest import PgServer

#: Resolved tokens are cached this long by the API under test (the default is 5 s).
TOKEN_CACHE_TTL_S = 1.0


@pytest.fixture(scope="session")
def sec_api(pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """The API under attack, with extra principals: a disabled user, a second operator."""
    name = pg_server.create_database("sec")
    env = {"CCAT_API_TOKEN_CACHE_TTL_S": str(TOKEN_CACHE_TTL_S)}
    with running_api(pg_server.url(name), tmp_path_factory.mktemp("sec"), extra_env=env) as api:
        add_principals(api)
        add_rows(api)
        yield api
    pg_server.drop_database(name)


@pytest.fixture(scope="session")
def sec_engine(sec_api: ApiServer) -> Iterator[Engine]:
    """A direct connection to the database behind :func:`sec_api` (to check for changes)."""
    engine = make_engine(sec_api.db_url)
    yield engine
    engine.dispose()


def add_principals(api: ApiServer) -> None:
    """Tokens beyond the seeded ones: disabled user, scientist (read+operate), empty scopes."""
    engine = make_engine(api.db_url)
    with Session(engine) as s, s.begin():
        disabled = m.User(
            username="sec-disabled",
            active=False,
            roles=[m.Role(name="sec-disabled-admin", scopes=["admin"])],
        )
        row, raw = m.ApiToken.issue(disabled, "disabled user", ["admin"])
        s.add(row)
        api.tokens["disabled"] = raw
        scientist = m.User(
            username="sec-scientist",
            roles=[m.Role(name="sec-scientist", scopes=["read", "operate"])],
        )
        row, raw = m.ApiToken.issue(scientist, "scientist", ["read", "operate"])
        s.add(row)
        api.tokens["scientist"] = raw
        admin_user = s.scalar(select(m.User).where(m.User.username == "test-admin"))
        assert admin_user is not None
        # A token of an admin user restricted to 'read': the token's scopes bound the user's.
        row, raw = m.ApiToken.issue(admin_user, "narrow", ["read"])
        s.add(row)
        api.tokens["admin-read-only"] = raw
    engine.dispose()


def add_rows(api: ApiServer) -> None:
    """An executed obs unit with files, packages in several states, a failed transfer each
    kind, and a staging job owned by the scientist: targets for the write routes."""
    engine = make_engine(api.db_url)
    with Session(engine) as s, s.begin():
        eou = m.ExecutedObsUnit(
            id=uuid.uuid4(),
            instrument_id=api.ids["CHAI"],
            start_time=dt.datetime(2026, 5, 1, 3, tzinfo=dt.UTC),
            status=ExecutionStatus.RUNNING,
        )
        s.add(eou)
        s.flush()
        api.ids["eou"] = eou.id  # type: ignore[assignment]
        pkgs = []
        for i, state in enumerate(
            [PackageState.WAITING, PackageState.ARCHIVED, PackageState.ARCHIVED]
        ):
            pkg = m.RawDataPackage(
                name=f"sec_{i}_{uuid.uuid4().hex}.tar",
                relative_path=f"2026/05/01/sec_{i}.tar",
                size=1000 * (i + 1),
                state=state,
                status=Status.COMPLETED,
                executed_obs_unit_id=eou.id,
                instrument_module_id=api.ids["CHAI/LFA"],
                origin_location_id=api.ids["ccat/chai_raw_data"],
            )
            s.add(pkg)
            pkgs.append(pkg)
        s.flush()
        api.ids["package"] = pkgs[0].id
        api.ids["archived_package"] = pkgs[1].id
        for n in range(3):
            content = f"sec-{n}".encode()
            s.add(
                m.RawDataFile(
                    id=uuid.uuid4(),
                    name=f"sec_{n}.fits",
                    relative_path=f"2026/05/01/sec/sec_{n}.fits",
                    size=len(content),
                    checksum=hashlib.sha256(content).hexdigest(),
                    instrument_module_id=api.ids["CHAI/LFA"],
                    executed_obs_unit_id=eou.id,
                    source_location_id=api.ids["ccat/chai_raw_data"],
                )
            )
        lta = m.LongTermArchiveTransfer(
            raw_data_package_id=pkgs[2].id,
            origin_location_id=api.ids["cologne/buffer"],
            destination_location_id=api.ids["cologne/lta"],
            status=Status.FAILED,
            retry_count=3,
            failure_reason="sec test",
            object_key="raw/sec.tar",
            sidecar_key="raw/sec.tar.json",
        )
        s.add(lta)
        scientist = s.scalar(select(m.User).where(m.User.username == "sec-scientist"))
        assert scientist is not None
        processing = s.scalar(
            select(m.DataLocation).where(m.DataLocation.location_type == "processing")
        )
        assert processing is not None, "the seed topology has no processing location"
        job = m.StagingJob(
            name="scientist's job",
            destination_location_id=processing.id,
            status=Status.PENDING,
            active=True,
            requested_by_user_id=scientist.id,
            requested_at=dt.datetime.now(dt.UTC),
            raw_data_packages=[pkgs[1]],
        )
        s.add(job)
        s.flush()
        api.ids["lta_transfer"] = lta.id
        api.ids["staging_job"] = job.id
        api.ids["processing_location"] = processing.id
    engine.dispose()


def snapshot(engine: Engine, skip: tuple[str, ...] = ("api_token",)) -> dict[str, Any]:
    """Every row of every table (tables in ``skip``: only their row count), for comparisons.

    ``api_token`` rows change on every accepted authentication (last_used_at, usage_count),
    which is not a change a refused request may cause - its row count is still compared.
    """
    out: dict[str, Any] = {}
    with engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            rows = conn.execute(select(table)).all()
            if table.name in skip:
                out[table.name] = len(rows)
            else:
                out[table.name] = sorted((tuple(r) for r in rows), key=repr)
    return out


def diff_tables(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Names of the tables whose content differs between two snapshots."""
    return sorted(k for k in before if before[k] != after.get(k))
