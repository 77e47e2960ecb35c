"""An operator gives a transfer up (its destination site is gone for good).

Real PostgreSQL, real files, moto's S3 server, and the real API process (``ccat-api serve`` on
loopback) for the cancel itself; managers and tasks run in this process, in order.

Before, a transfer to a site that never came back was FAILED and revived every
``partition_retry_s`` for ever, it kept its transfer package in the sending BUFFER, and its
package was never archived anywhere else: only a retry existed.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ccat_ops_db.enums import (
    LocationType,
    PackageState,
    PhysicalCopyStatus,
    RouteType,
    Status,
    StorageType,
)
from data_transfer import operations, packaging, routing, state
from data_transfer.errors import NetworkError, StalledTaskError
from data_transfer.managers import run_pass
from data_transfer.metrics import holdup_details, holdups
from data_transfer.movers import mover_for
from data_transfer.operations import Context
from tests.api_server import running_api
from tests.transfer.stack import Stack, live_upstream_copies, passes, transfer_settings
from tests.transfer.test_pipeline import check_archive_bytes

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
        assert check_archive_bytes(stack, sites=["us"]) == 5
        client = stack.s3.client()
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
    held = holdups(stack.engine)  # what the managers' metrics (and the alert) see
    assert held.stranded == {"ccat": 1, "cologne": 0, "us": 0}, held.stranded
    assert held.unarchived["ccat"][0] == 1 and held.unarchived["ccat"][1] > 0
    details = holdup_details(stack.engine)  # and what `ccat-transfer status` names
    with Session(stack.engine) as s:
        dtp_name = s.scalars(select(m.DataTransferPackage.name)).one()
        pkg_name = s.scalars(select(m.RawDataPackage.name)).one()
    assert [(site, name) for site, name, _ in details["stranded"]] == [("ccat", dtp_name)]
    assert [row[:2] for row in details["oldest"]] == [("ccat", pkg_name)]
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


# --- re-routing corner cases -------------------------------------------------------------------


def _route(s: Session, name: str) -> m.DataTransferRoute:
    return s.scalar(select(m.DataTransferRoute).where(m.DataTransferRoute.name == name))


def _cancel(stack: Stack, tid: int) -> None:
    with Session(stack.engine) as s, s.begin():  # what POST .../cancel writes
        t = s.get(m.DataTransfer, tid)
        assert t.status in (Status.PENDING, Status.FAILED)
        t.status = t.unpack_status = Status.CANCELLED
        t.failure_reason = "cancelled by test: gone"


def _package_legs(stack: Stack) -> list[tuple[int, int, str, str]]:
    """(transfer id, transfer package id, destination site, status), by id."""
    with Session(stack.engine) as s:
        rows = s.execute(
            select(
                m.DataTransfer.id,
                m.DataTransfer.data_transfer_package_id,
                m.Site.short_name,
                m.DataTransfer.status,
            )
            .join(m.DataLocation, m.DataLocation.id == m.DataTransfer.destination_location_id)
            .join(m.Site, m.Site.id == m.DataLocation.site_id)
            .order_by(m.DataTransfer.id)
        ).all()
    return [(i, d, site, str(st)) for i, d, site, st in rows]


def _built(stack: Stack, ctx: Context, n: int) -> None:
    """Package until ``n`` transfer packages are built and have their first leg."""
    for _ in range(6):
        passes(ctx, "raw_data_packages", "transfer_packages")
        with Session(stack.engine) as s:
            done = s.scalars(
                select(m.DataTransferPackage.id).where(
                    m.DataTransferPackage.status == Status.COMPLETED
                )
            ).all()
        if len(done) >= n:
            passes(ctx, "transfer_packages")
            return
    raise AssertionError(f"{n} transfer packages not built")


def test_one_cancel_does_not_unroute_other_packages_on_its_route(stack: Stack) -> None:
    """The manager's query and the per-package check agree: a cancelled leg of one package
    says nothing about another package on the same route. (Before, the subquery was not tied
    to the package: every package on the route looked unrouted, filled the batch, and a
    cancelled package behind them was never sent elsewhere.)"""
    ctx = Context(engine=stack.engine, settings=transfer_settings(stack.root, batch_size=1))
    with Session(stack.engine) as s, s.begin():
        _route(s, "ccat_to_us").active = False
    for seed in (51, 52):
        stack.file_observation(files=2, seed=seed)
        _built(stack, ctx, 1 if seed == 51 else 2)
    legs = _package_legs(stack)
    assert [(site, st) for _, _, site, st in legs] == [("cologne", "pending")] * 2, legs
    _cancel(stack, legs[1][0])
    with Session(stack.engine) as s:
        unrouted = s.scalars(
            select(m.DataTransferPackage.id).where(~routing.live_primary(m.DataTransferPackage.id))
        ).all()
        assert unrouted == [legs[1][1]]
    with Session(stack.engine) as s, s.begin():  # Cornell reachable directly
        r = _route(s, "ccat_to_us")
        r.active, r.route_type, r.relay_site_id = True, RouteType.DIRECT, None
    passes(ctx, "transfer_packages")
    assert [(d, site, st) for _, d, site, st in _package_legs(stack)][2:] == [
        (legs[1][1], "us", "pending")
    ]


def test_cancelling_the_leg_to_a_relay_gives_up_the_relay_only(stack: Stack) -> None:
    """Cologne is decommissioned while a package waits on the first leg of the relay route to
    Cornell. That leg is cancelled; Cologne's package count is waiting for an operator's
    route. Once the operator makes Cornell reachable directly, the package goes there (and a
    package with nowhere to go meanwhile does not hold up a newer one)."""
    ctx = Context(engine=stack.engine, settings=transfer_settings(stack.root, batch_size=1))
    with Session(stack.engine) as s, s.begin():
        _route(s, "ccat_to_cologne").active = False  # the package goes the relay way
    stack.file_observation(files=2, seed=31)
    _built(stack, ctx, 1)
    (first,) = _package_legs(stack)
    assert first[2:] == ("cologne", "pending"), first
    _cancel(stack, first[0])
    report = run_pass("transfer_packages", ctx.engine, ctx.settings, _NoDispatch())
    assert "1 transfer package(s) with nowhere left to go" in report.notes, report.notes
    # a newer package, which can go (Cornell direct from now on), is not held up behind it
    with Session(stack.engine) as s, s.begin():
        r = _route(s, "ccat_to_us")
        r.route_type, r.relay_site_id = RouteType.DIRECT, None
        for loc in s.scalars(
            select(m.DataLocation).join(m.Site).where(m.Site.short_name == "cologne")
        ):
            loc.active = False
    stack.file_observation(files=2, seed=32)
    _built(stack, ctx, 2)
    legs = _package_legs(stack)
    assert [(d, site) for _, d, site, _ in legs[1:]] == [(legs[1][1], "us")], legs
    assert legs[1][1] != first[1]
    # the stranded one is looked at again after partition_retry_s, and goes to Cornell
    with Session(stack.engine) as s, s.begin():
        s.get(m.DataTransferPackage, first[1]).next_attempt_at = None
    passes(ctx, "transfer_packages")
    assert [(d, site, st) for _, d, site, st in _package_legs(stack)][2:] == [
        (first[1], "us", "pending")
    ]


def test_a_reroute_through_the_same_relay_starts_at_the_relay(stack: Stack) -> None:
    """Telescope -> a relay site without an archive -> Cologne or Cornell. The package has
    reached the relay; its onward leg to Cologne is cancelled. The new way to Cornell starts
    at the relay (a second transfer telescope -> relay is not allowed: one per package and
    destination, and it would send the bytes over the long link again)."""
    ctx = Context(engine=stack.engine, settings=transfer_settings(stack.root))
    with Session(stack.engine) as s, s.begin():
        relay = m.Site(name="Relay", short_name="relay")
        s.add(relay)
        s.flush()
        root = stack.root / "relay" / "buffer"
        root.mkdir(parents=True)
        s.add(
            m.DiskDataLocation(
                site_id=relay.id,
                name="buffer",
                location_type=LocationType.BUFFER,
                storage_type=StorageType.DISK,
                root_path=str(root),
            )
        )
        for name in ("ccat_to_cologne", "ccat_to_us"):
            r = _route(s, name)
            r.route_type, r.relay_site_id = RouteType.RELAY, relay.id
        for short in ("cologne", "us"):
            dst = s.scalar(select(m.Site).where(m.Site.short_name == short))
            s.add(
                m.DataTransferRoute(
                    name=f"relay_to_{short}",
                    origin_site_id=relay.id,
                    destination_site_id=dst.id,
                    route_type=RouteType.DIRECT,
                    method=_route(s, "ccat_to_cologne").method,
                )
            )
    stack.file_observation(files=2, seed=33)
    _built(stack, ctx, 1)
    passes(ctx, "transfers")  # ccat -> relay; it makes relay -> cologne
    legs = _package_legs(stack)
    assert [(site, st) for _, _, site, st in legs] == [
        ("relay", "completed"),
        ("cologne", "pending"),
    ], legs
    _cancel(stack, legs[1][0])
    for _ in range(8):
        passes(ctx, *ALL)
    after = _package_legs(stack)
    assert [(site, st) for _, _, site, st in after] == [
        ("relay", "completed"),
        ("cologne", "cancelled"),
        ("us", "completed"),
    ], after
    with Session(stack.engine) as s:
        t = s.get(m.DataTransfer, after[2][0])
        assert t.origin_location.site.short_name == "relay"
        assert {p.state for p in s.scalars(select(m.RawDataPackage))} == {PackageState.ARCHIVED}
        assert live_upstream_copies(s) == 0


def _late_run(
    stack: Stack,
    kind: str,
    task: Any,
    tid: int,
    started: threading.Event,
    go: threading.Event,
    cancel: Any,
) -> Any:
    """Run ``task`` in a thread; once it is at work (``started``), reset its record as the
    recovery sweeper does for a missing heartbeat and cancel the transfer; then let the task
    finish (``go``) and return its outcome."""
    out: dict[str, Any] = {}
    th = threading.Thread(target=lambda: out.setdefault("o", task()))
    th.start()
    assert started.wait(30)
    with Session(stack.engine) as s, s.begin():
        t = s.get(m.DataTransfer, tid)
        settings = transfer_settings(stack.root)
        state.record_failure(s, t, kind, StalledTaskError("no heartbeat"), settings)
    cancel(stack, tid)
    go.set()
    th.join(60)
    return out["o"]


def test_a_late_success_does_not_undo_a_cancel(stack: Stack) -> None:
    """A run is still copying when the sweeper takes it for dead and an operator cancels the
    transfer; then the copy finishes. The transfer stays CANCELLED (no unpack, no onward
    leg) and the copy that arrived is recorded, to be deleted with the package's other
    BUFFER copies. (Before, the late success set COMPLETED and cleared the reason.)"""
    settings = transfer_settings(stack.root)
    go, copying = threading.Event(), threading.Event()

    class SlowMover:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def copy(self, *a: Any, **kw: Any) -> Any:
            copying.set()
            assert go.wait(30)
            return self.inner.copy(*a, **kw)

    ctx = Context(
        engine=stack.engine,
        settings=settings,
        mover_factory=lambda *a, **kw: SlowMover(mover_for(*a, **kw)),
    )
    plain = Context(engine=stack.engine, settings=settings)
    stack.file_observation(files=2, seed=41)
    _built(stack, plain, 1)
    with Session(stack.engine) as s, s.begin():
        tid = s.scalars(select(m.DataTransfer.id)).one()
        assert state.schedule(s, "data_transfer", tid)
    outcome = _late_run(
        stack, "data_transfer", lambda: operations.transfer(ctx, tid), tid, copying, go, _cancel
    )
    assert outcome.detail.startswith("arrived after the transfer was cancelled"), outcome
    with Session(stack.engine) as s:
        t = s.get(m.DataTransfer, tid)
        assert (t.status, t.unpack_status) == (Status.CANCELLED, Status.CANCELLED)
        assert t.failure_reason == "cancelled by test: gone"
        copy = s.scalar(
            select(m.DataTransferPackagePhysicalCopy).where(
                m.DataTransferPackagePhysicalCopy.data_location_id == t.destination_location_id
            )
        )
        assert copy is not None and copy.status == PhysicalCopyStatus.PRESENT
        assert s.scalars(select(m.DataTransfer.id)).all() == [tid]  # no onward leg


# --- a transfer whose bytes arrived at a site that went before unpacking them ------------------


def _direct_us(stack: Stack) -> None:
    with Session(stack.engine) as s, s.begin():
        r = _route(s, "ccat_to_us")
        r.route_type, r.relay_site_id = RouteType.DIRECT, None


def _cancel_arrived(stack: Stack, tid: int) -> None:
    with Session(stack.engine) as s, s.begin():  # what POST .../cancel writes for it
        t = s.get(m.DataTransfer, tid)
        assert t.status == Status.COMPLETED and t.unpack_status in (Status.PENDING, Status.FAILED)
        t.status = t.unpack_status = Status.CANCELLED
        t.failure_reason = t.unpack_failure_reason = "cancelled by test: cologne gone"


def _archived_at(s: Session) -> list[tuple[int, str]]:
    return sorted(
        s.execute(
            select(m.LongTermArchiveTransfer.raw_data_package_id, m.Site.short_name)
            .join(
                m.DataLocation,
                m.DataLocation.id == m.LongTermArchiveTransfer.destination_location_id,
            )
            .join(m.Site)
        ).all()
    )


def test_a_cancelled_arrival_goes_to_another_archive(
    stack: Stack, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The bytes reached Cologne, whose unpack then failed for good; the operator cancels the
    transfer through the API. The package goes to Cornell from the telescope's copy, is
    archived there once, every file equal, and no copy is left upstream."""
    _direct_us(stack)
    stack.file_observation(files=5, seed=61)
    ctx = Context(
        engine=stack.engine, settings=transfer_settings(stack.root, partition_retry_s=0.01)
    )
    tid = _first_leg(stack, ctx)
    passes(ctx, "transfers")
    with Session(stack.engine) as s, s.begin():
        t = s.get(m.DataTransfer, tid)
        assert t.status == Status.COMPLETED
        t.unpack_status, t.unpack_retry_count = Status.FAILED, 4
        t.unpack_failure_reason = "StorageError: cologne buffer read-only"
    token = _operator_token(stack)
    with (
        running_api(stack.db_url, tmp_path, seed=False) as api,
        httpx.Client(
            base_url=api.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        ) as c,
    ):
        r = c.post(f"{V1}/data_transfers/{tid}/cancel", json={"reason": "cologne gone"})
        assert r.status_code == 200, r.text
        assert r.json()["unpack_failure_reason"] == "cancelled by night-shift: cologne gone"
    with caplog.at_level(logging.ERROR):
        for _ in range(8):
            passes(ctx, *ALL)
    legs = _legs(stack)
    assert legs[0] == (tid, "cologne", "cancelled", False), legs
    assert [(site, st, sec) for _, site, st, sec in legs[1:]] == [("us", "completed", False)]
    with Session(stack.engine) as s:
        pkgs = s.scalars(select(m.RawDataPackage)).all()
        assert {p.state for p in pkgs} == {PackageState.ARCHIVED}
        assert _archived_at(s) == sorted((p.id, "us") for p in pkgs)
        assert live_upstream_copies(s) == 0
    assert "given up everywhere" not in caplog.text


def test_a_late_unpack_does_not_undo_a_cancel(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unpack run the sweeper took for dead finishes after the operator cancelled the
    arrived transfer: nothing is recorded at the given-up site and what it extracted is
    removed; the package goes to Cornell and is archived there only. (Before, the late unpack
    set COMPLETED on the cancelled transfer, recorded copies that were archived at the
    given-up site, and made secondaries from there.)"""
    _direct_us(stack)
    settings = transfer_settings(stack.root, partition_retry_s=0.01)
    ctx = Context(engine=stack.engine, settings=settings)
    stack.file_observation(files=3, seed=62)
    tid = _first_leg(stack, ctx)
    passes(ctx, "transfers")
    go, unpacking = threading.Event(), threading.Event()
    real = packaging.extract_package

    def slow(*a: Any, **kw: Any) -> Any:
        unpacking.set()
        assert go.wait(30)
        return real(*a, **kw)

    monkeypatch.setattr(packaging, "extract_package", slow)
    with Session(stack.engine) as s, s.begin():
        assert state.schedule(s, "unpack", tid)
    outcome = _late_run(
        stack, "unpack", lambda: operations.unpack(ctx, tid), tid, unpacking, go, _cancel_arrived
    )
    monkeypatch.setattr(packaging, "extract_package", real)
    assert "after the transfer was cancelled: nothing recorded" in outcome.detail, outcome
    cologne = stack.roots["cologne/buffer"]
    with Session(stack.engine) as s:
        t = s.get(m.DataTransfer, tid)
        assert (t.status, t.unpack_status) == (Status.CANCELLED, Status.CANCELLED)
        for pkg in s.scalars(select(m.RawDataPackage)):
            assert not (cologne / pkg.relative_path).exists(), pkg.relative_path
        assert not s.scalars(
            select(m.RawDataPackagePhysicalCopy).where(
                m.RawDataPackagePhysicalCopy.data_location_id == t.destination_location_id
            )
        ).all()
    for _ in range(8):
        passes(ctx, *ALL)
    with Session(stack.engine) as s:
        pkgs = s.scalars(select(m.RawDataPackage)).all()
        assert {p.state for p in pkgs} == {PackageState.ARCHIVED}
        assert _archived_at(s) == sorted((p.id, "us") for p in pkgs)
        assert [(site, st) for _, site, st, _ in _legs(stack)] == [
            ("cologne", "cancelled"),
            ("us", "completed"),
        ]


def test_an_onward_leg_from_a_given_up_relay_is_moved(stack: Stack) -> None:
    """Cornell through Cologne: the first leg arrived in Cologne (its onward leg to Cornell is
    made then), Cologne's unpack failed and Cologne is gone. The operator cancels the first
    leg and makes Cornell reachable directly. The onward leg, which could never leave Cologne,
    is moved to start at the telescope (one transfer per package and destination), and the
    package is archived in Cornell. (Before, the package was stranded, and cancelling the
    onward leg too gave Cornell up.)"""
    with Session(stack.engine) as s, s.begin():
        _route(s, "ccat_to_cologne").active = False
    stack.file_observation(files=2, seed=63)
    settings = transfer_settings(stack.root, partition_retry_s=0.01)
    plain = Context(engine=stack.engine, settings=settings)
    first = _first_leg(stack, plain)
    passes(plain, "transfers")
    legs = _legs(stack)
    assert [(site, st) for _, site, st, _ in legs] == [("cologne", "completed"), ("us", "pending")]
    with Session(stack.engine) as s, s.begin():
        t = s.get(m.DataTransfer, first)
        t.unpack_status = Status.FAILED
        t.unpack_failure_reason = "StorageError: cologne buffer dying"
    _cancel_arrived(stack, first)
    _direct_us(stack)

    class Gone:
        """Cologne does not answer any more."""

        def __init__(self, inner: Any, src: Any, dst: Any) -> None:
            self.inner, self.src, self.dst = inner, src, dst

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def copy(self, *a: Any, **kw: Any) -> Any:
            if "cologne" in (self.src.site, self.dst.site):
                raise NetworkError("cologne unreachable")
            return self.inner.copy(*a, **kw)

    ctx = Context(
        engine=stack.engine,
        settings=settings,
        mover_factory=lambda src, dst, *a, **kw: Gone(mover_for(src, dst, *a, **kw), src, dst),
    )
    for _ in range(8):
        passes(ctx, *ALL)
    with Session(stack.engine) as s:
        onward = s.get(m.DataTransfer, legs[1][0])
        assert onward.origin_location.site.short_name == "ccat"
        assert onward.status == Status.COMPLETED
        assert onward.failure_reason is None
        pkgs = s.scalars(select(m.RawDataPackage)).all()
        assert {p.state for p in pkgs} == {PackageState.ARCHIVED}
        assert _archived_at(s) == sorted((p.id, "us") for p in pkgs)
    with Session(stack.engine) as s:
        logs = s.scalars(
            select(m.DataTransferLog.message).where(
                m.DataTransferLog.data_transfer_id == legs[1][0]
            )
        ).all()
    assert len(_legs(stack)) == 2
    assert any(line.startswith("re-routed by ccat_to_us: its origin buffer") for line in logs), logs
