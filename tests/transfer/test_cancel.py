"""An operator gives a transfer up (its destination site is gone for good).

Real PostgreSQL, real files, moto's S3 server, and the real API process (``ccat-api serve`` on
loopback) for the cancel itself; managers and tasks run in this process, in order.

Before, a transfer to a site that never came back was FAILED and revived every
``partition_retry_s`` for ever, it kept its transfer package in the sending BUFFER, and its
package was never archived anywhere else: only a retry existed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import tarfile
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ccat_ops_db.enums import PackageState, PhysicalCopyStatus, RouteType, Status
from data_transfer import routing
from data_transfer.managers import run_pass
from data_transfer.operations import Context
from tests.api_server import running_api
from tests.transfer.stack import Stack, live_upstream_copies, passes, transfer_settings

V1 = "/api/v1"
ALL = (
    "raw_data_packages",
    "transfer_packages",
    "transfers",
    "unpacking",
    "archive",
    "deletion",
    "recovery",
)


def _operator_token(stack: Stack) -> str:
    with Session(stack.engine) as s, s.begin():
        role = m.Role(name="cancel-operator", scopes=["read", "operate"])
        user = m.User(username="night-shift", roles=[role])
        row, raw = m.ApiToken.issue(user, "cancel test", ["read", "operate"])
        s.add(row)
    return raw


def _legs(stack: Stack) -> list[tuple[int, str, str, bool]]:
    """(id, destination site, status, secondary) of every transfer, by id."""
    with Session(stack.engine) as s:
        rows = s.execute(
            select(m.DataTransfer.id, m.Site.short_name, m.DataTransfer.status)
            .join(m.DataLocation, m.DataLocation.id == m.DataTransfer.destination_location_id)
            .join(m.Site, m.Site.id == m.DataLocation.site_id)
            .order_by(m.DataTransfer.id)
        ).all()
        secondary = dict(s.execute(select(m.DataTransfer.id, m.DataTransfer.is_secondary)).all())
    return [(i, site, str(st), secondary[i]) for i, site, st in rows]


def _first_leg(stack: Stack, ctx: Context) -> int:
    for _ in range(4):
        passes(ctx, "raw_data_packages", "transfer_packages")
        legs = _legs(stack)
        if legs:
            assert len(legs) == 1, legs
            return legs[0][0]
    raise AssertionError("no primary transfer was created")


def test_a_cancelled_primary_goes_to_another_archive(
    stack: Stack, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Cornell reached directly (the reference topology relays through Cologne, which the
    # next test gives up)
    with Session(stack.engine) as s, s.begin():
        route = s.scalar(
            select(m.DataTransferRoute).where(m.DataTransferRoute.name == "ccat_to_us")
        )
        route.route_type, route.relay_site_id = RouteType.DIRECT, None
    stack.file_observation(files=5, seed=21)
    ctx = Context(
        engine=stack.engine, settings=transfer_settings(stack.root, partition_retry_s=0.01)
    )
    tid = _first_leg(stack, ctx)
    assert _legs(stack)[0][1] == "cologne"  # round-robin: ties by name
    # Cologne is cut off and its retries are used up: a partition failure, which the recovery
    # manager revives and which keeps the package in the telescope's BUFFER meanwhile
    with Session(stack.engine) as s, s.begin():
        t = s.get(m.DataTransfer, tid)
        t.status, t.retry_count = Status.FAILED, 4
        t.failure_reason = "NetworkError: no route to host cologne"
        t.last_failure_at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    passes(ctx, "recovery")
    assert _legs(stack)[0][2] == "pending"  # revived: that is what a partition gets
    with Session(stack.engine) as s, s.begin():
        t = s.get(m.DataTransfer, tid)
        t.status, t.failure_reason = Status.FAILED, "NetworkError: no route to host cologne"

    # the operator gives Cologne up for this transfer, through the real API
    token = _operator_token(stack)
    with (
        running_api(stack.db_url, tmp_path, seed=False) as api,
        httpx.Client(
            base_url=api.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        ) as c,
    ):
        r = c.post(
            f"{V1}/data_transfers/{tid}/cancel",
            json={"reason": "Cologne's buffer is decommissioned"},
        )
        assert r.status_code == 200, r.text
        assert r.json()["failure_reason"] == (
            "cancelled by night-shift: Cologne's buffer is decommissioned"
        )

    # the package goes to the other archive, is archived there, and the telescope's copies
    # are deleted; the cancelled leg is never revived, and nothing replicates to Cologne
    with caplog.at_level(logging.ERROR):
        for _ in range(8):
            passes(ctx, *ALL)
    legs = _legs(stack)
    assert legs[0] == (tid, "cologne", "cancelled", False), legs
    assert [(site, st, sec) for _, site, st, sec in legs[1:]] == [("us", "completed", False)]
    with Session(stack.engine) as s:
        t = s.get(m.DataTransfer, tid)
        assert t.unpack_status == Status.CANCELLED
        assert t.failure_reason.startswith("cancelled by night-shift")
        pkgs = s.scalars(select(m.RawDataPackage)).all()
        assert pkgs and {p.state for p in pkgs} == {PackageState.ARCHIVED}
        assert live_upstream_copies(s) == 0
        # the transfer package copy in the telescope's BUFFER went once it was no longer needed
        dtp_copies = s.scalars(
            select(m.DataTransferPackagePhysicalCopy.status).where(
                m.DataTransferPackagePhysicalCopy.data_location_id
                == stack.location_id("ccat", "buffer")
            )
        ).all()
        assert dtp_copies and set(dtp_copies) == {PhysicalCopyStatus.DELETED}
        # every file, read back from the Cornell archive, equals the original
        lta = s.scalar(select(m.S3DataLocation).join(m.Site).where(m.Site.short_name == "us"))
        client = stack.s3.client()
        checked = 0
        for pkg in pkgs:
            blob = client.get_object(
                Bucket=stack.buckets["us/lta"], Key=lta.key_prefix + pkg.relative_path
            )["Body"].read()
            with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
                for f in pkg.files:
                    data = tar.extractfile(f.relative_path).read()
                    assert (
                        hashlib.sha256(data).hexdigest().encode()
                        == stack.originals[f.relative_path]
                    )
                    checked += 1
        assert checked == 5
        assert stack.buckets.get("cologne/lta")
        assert not client.list_objects_v2(Bucket=stack.buckets["cologne/lta"]).get("Contents")
    assert not [r for r in caplog.records if "given up everywhere" in r.getMessage()]


def test_a_package_given_up_everywhere_waits_and_says_so(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """The reference topology reaches Cornell only through Cologne: once the leg to Cologne is
    given up, no archive is left. Nothing is lost (the telescope keeps every copy), no leg is
    made, and the transfer packages manager says which package has nowhere to go and why."""
    stack.file_observation(files=3, seed=22)
    ctx = Context(engine=stack.engine, settings=transfer_settings(stack.root))
    tid = _first_leg(stack, ctx)
    with Session(stack.engine) as s, s.begin():  # what the API's cancel writes
        t = s.get(m.DataTransfer, tid)
        t.status = t.unpack_status = Status.CANCELLED
        t.failure_reason = "cancelled by test: cologne is gone"
    with caplog.at_level(logging.ERROR):
        report = run_pass("transfer_packages", ctx.engine, ctx.settings, _NoDispatch())
        for _ in range(3):
            passes(ctx, *ALL)
    assert "1 transfer package(s) with nowhere left to go" in report.notes, report.notes
    errors = [r.getMessage() for r in caplog.records if "given up everywhere" in r.getMessage()]
    assert errors, caplog.text
    assert "other than the ones it was given up for (cologne)" in errors[0], errors
    assert [st for _, _, st, _ in _legs(stack)] == ["cancelled"]
    with Session(stack.engine) as s:
        assert PackageState.ARCHIVED not in {p.state for p in s.scalars(select(m.RawDataPackage))}
        source = s.scalars(
            select(m.RawDataFilePhysicalCopy.status).where(
                m.RawDataFilePhysicalCopy.data_location_id
                == stack.location_id("ccat", "primecam_raw_data")
            )
        ).all()
        assert source and set(source) == {PhysicalCopyStatus.PRESENT}


class _NoDispatch:
    """A dispatcher for a pass that must not submit anything."""

    def submit(self, kind: str, payload: object, queue: str) -> None:
        raise AssertionError(f"nothing to submit, got {kind} {payload} for {queue}")


def test_a_relay_whose_onward_leg_is_cancelled_stays_archived_at_the_relay(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """Reference topology: Cornell through Cologne, which archives what passes through it.
    The onward leg to Cornell is cancelled after the package reached Cologne: the package is
    archived in Cologne once, no leg is made again (it would archive it twice), and the
    manager does not keep picking it up as a package with nowhere to go."""
    with Session(stack.engine) as s, s.begin():  # the first package goes the relay way
        direct = s.scalar(
            select(m.DataTransferRoute).where(m.DataTransferRoute.name == "ccat_to_cologne")
        )
        direct.active = False
    stack.file_observation(files=4, seed=23)
    ctx = Context(engine=stack.engine, settings=transfer_settings(stack.root))
    first = _first_leg(stack, ctx)
    with Session(stack.engine) as s, s.begin():
        s.scalar(
            select(m.DataTransferRoute).where(m.DataTransferRoute.name == "ccat_to_cologne")
        ).active = True
    passes(ctx, "transfers")  # the first leg: it makes the onward one when it completes
    legs = _legs(stack)
    assert [(site, st) for _, site, st, _ in legs] == [("cologne", "completed"), ("us", "pending")]
    with Session(stack.engine) as s, s.begin():  # Cornell is gone: the onward leg given up
        t = s.get(m.DataTransfer, legs[1][0])
        t.status = t.unpack_status = Status.CANCELLED
        t.failure_reason = "cancelled by test: us is gone"
    with caplog.at_level(logging.ERROR):
        for _ in range(6):
            passes(ctx, *ALL)
    assert [(i, st) for i, _, st, _ in _legs(stack)] == [
        (first, "completed"),
        (legs[1][0], "cancelled"),
    ]
    assert "given up everywhere" not in caplog.text
    with Session(stack.engine) as s:
        built = s.scalars(
            select(m.DataTransferPackage.id).where(~routing.live_primary(m.DataTransferPackage.id))
        ).all()
        assert built == []  # the manager has nothing to route
        pkgs = s.scalars(select(m.RawDataPackage)).all()
        assert {p.state for p in pkgs} == {PackageState.ARCHIVED}
        archived = s.scalars(
            select(m.LongTermArchiveTransfer.status).where(
                m.LongTermArchiveTransfer.raw_data_package_id.in_([p.id for p in pkgs])
            )
        ).all()
        assert archived == [Status.COMPLETED] * len(pkgs)  # once, in Cologne
        assert live_upstream_copies(s) == 0
