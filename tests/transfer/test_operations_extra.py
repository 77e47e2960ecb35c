"""Fixity audit and repair, queue discovery, the CLI, metrics, and the deletion verdicts."""

from __future__ import annotations

import contextlib
import datetime as dt
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ccat_ops_db.enums import LocationType, PhysicalCopyStatus, Status
from data_transfer import deletion, managers, operations, state
from data_transfer.errors import (
    ConfigurationError,
    DestinationExistsError,
    StalledTaskError,
    StorageError,
)
from data_transfer.heartbeat import MemoryHeartbeats
from data_transfer.inline import QueueDispatcher
from data_transfer.managers import run_pass
from data_transfer.metrics import PipelineCollector, holdups
from data_transfer.movers import mover_for
from data_transfer.operations import Context
from data_transfer.queues import discover_queues
from data_transfer.settings import TransferSettings
from tests.transfer.stack import Stack, passes, transfer_settings
from tests.transfer.test_pipeline import check_archive_bytes, run_until_quiet


def test_fixity_audit_finds_a_corrupted_archive_copy_and_repairs_it(stack: Stack) -> None:
    stack.file_observation(files=3, seed=21, sizes=(10_000, 40_000))
    ctx = Context(engine=stack.engine, settings=transfer_settings(stack.root))
    run_until_quiet(ctx)
    with Session(stack.engine) as s:
        pkg = s.scalars(select(m.RawDataPackage)).one()
        lta = s.scalar(select(m.S3DataLocation).join(m.Site).where(m.Site.short_name == "cologne"))
        key = lta.key_prefix + pkg.relative_path
        bucket = lta.bucket
    client = stack.s3.client()
    original = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    bad = bytearray(original)
    bad[len(bad) // 3] ^= 0x01  # bit rot in the archive
    client.put_object(Bucket=bucket, Key=key, Body=bytes(bad))
    # every archived copy is due for a check now
    audit = Context(
        engine=stack.engine, settings=transfer_settings(stack.root, fixity_interval_days=1e-9)
    )
    d = QueueDispatcher()
    report = run_pass("fixity", audit.engine, audit.settings, d)
    assert report.scheduled == 2  # both archives' copies
    outcomes = d.drain(audit)
    details = sorted(o.detail for o in outcomes)
    assert any(dd.startswith("repaired from us/lta") for dd in details), details
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == original
    with Session(stack.engine) as s:
        copy = s.scalar(
            select(m.PhysicalCopy).where(
                m.PhysicalCopy.raw_data_package_id == pkg.id,
                m.PhysicalCopy.data_location_id == lta.id,
            )
        )
        assert copy.checksum_verified_at is not None
        assert "ChecksumMismatchError" in copy.failure_reason
    assert check_archive_bytes(stack) == 2 * 3


def test_deletion_verdicts_name_the_rule(stack: Stack) -> None:
    stack.file_observation(files=2, seed=22)
    ctx = Context(engine=stack.engine, settings=transfer_settings(stack.root))
    d = QueueDispatcher()
    run_pass("raw_data_packages", ctx.engine, ctx.settings, d)
    d.drain(ctx)
    with Session(stack.engine) as s:
        source_copy = s.scalars(
            select(m.PhysicalCopy)
            .join(m.DataLocation)
            .where(m.DataLocation.location_type == LocationType.SOURCE)
        ).first()
        v = deletion.verdict(s, source_copy)
        assert not v.allowed and "not yet ARCHIVED" in v.reason
        lta = s.scalar(select(m.DataLocation).where(m.DataLocation.name == "lta"))
        fake = m.RawDataPackagePhysicalCopy(
            raw_data_package_id=source_copy.raw_data_file.raw_data_package_id,
            data_location_id=lta.id,
            status=PhysicalCopyStatus.PRESENT,
        )
        s.add(fake)
        s.flush()
        assert "never deleted" in deletion.verdict(s, fake).reason
        s.rollback()


def test_queue_discovery_follows_the_database(stack: Stack) -> None:
    with Session(stack.engine) as s:
        names = [q.name for q in discover_queues(s, site="ccat", locations=["buffer"])]
        assert names == [
            "ccat_buffer_data_transfer_package_creation",
            "ccat_buffer_data_transfer",
            "ccat_buffer_data_transfer_unpacking",
            "ccat_buffer_deletion",
        ]
        all_names = {q.name for q in discover_queues(s)}
        assert "cologne_lta_long_term_archive_transfer" in all_names
        assert "cologne_ramses_staging" in all_names
        assert "ccat_primecam_raw_data_raw_data_package_creation" in all_names
        with pytest.raises(ConfigurationError, match="unknown site 'mars'"):
            discover_queues(s, site="mars")
        with pytest.raises(ConfigurationError, match="nowhere"):
            discover_queues(s, site="ccat", locations=["nowhere"])
        # a new location needs no code: its queues appear
        site = s.scalar(select(m.Site).where(m.Site.short_name == "us"))
        s.add(
            m.DiskDataLocation(
                site=site,
                name="scratch",
                location_type=LocationType.PROCESSING,
                storage_type="disk",
                root_path="/tmp/x",
            )
        )
        s.flush()
        assert "us_scratch_staging" in {q.name for q in discover_queues(s, site="us")}
        # names that join into another location's queues are refused, naming both
        s.add(m.Site(name="US East", short_name="us_east"))
        s.flush()
        east = s.scalar(select(m.Site).where(m.Site.short_name == "us_east"))
        s.add(
            m.DiskDataLocation(
                site=east,
                name="staging",  # us_east + staging = us + east_staging
                location_type=LocationType.PROCESSING,
                storage_type="disk",
                root_path="/tmp/y",
            )
        )
        s.add(
            m.DiskDataLocation(
                site=site,
                name="east_staging",
                location_type=LocationType.PROCESSING,
                storage_type="disk",
                root_path="/tmp/z",
                active=False,  # inactive locations count too
            )
        )
        s.flush()
        with pytest.raises(ConfigurationError, match="would share the queue 'us_east_staging_"):
            discover_queues(s, site="ccat")
        s.rollback()


def test_cli_queues_status_and_run_once(stack: Stack) -> None:
    env = dict(stack.env, COLUMNS="200")
    cli = [sys.executable, "-m", "data_transfer.cli"]
    out = subprocess.run(
        [*cli, "queues", "--site", "cologne", "--plain"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "cologne_buffer_data_transfer" in out.stdout.split()
    bad = subprocess.run(
        [*cli, "queues", "--site", "mars"], env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "unknown site 'mars'" in bad.stderr
    bad = subprocess.run(
        [*cli, "manager", "nope", "--once"], env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "unknown manager 'nope'" in bad.stderr
    stack.file_observation(files=2, seed=23)
    env.update(
        {"CCAT_TRANSFER_RAW_PACKAGE_IDLE_S": "0", "CCAT_TRANSFER_TRANSFER_PACKAGE_MAX_WAIT_S": "0"}
    )
    for _ in range(6):
        run = subprocess.run(
            [*cli, "run-once", "--inline"], env=env, capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr
    assert "raw_data_packages" in run.stdout
    status = subprocess.run([*cli, "status"], env=env, capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    assert "long_term_archive_transfer" in status.stdout
    assert "Waiting or retrying" not in status.stdout
    for nothing_held in ("Failed records", "not archived", "no archive site left", "deleted"):
        assert nothing_held not in status.stdout, status.stdout
    with Session(stack.engine) as s:
        assert {str(p.state) for p in s.scalars(select(m.RawDataPackage))} == {"archived"}
    # a task no worker ever started is not FAILED, and still shows, with its reason
    stack.file_observation(files=1, seed=25)
    with Session(stack.engine) as s, s.begin():
        s.add(
            m.RawDataPackage(
                name="never-started",
                relative_path="raw_data_packages/never-started.tar",
                executed_obs_unit_id=s.scalars(select(m.ExecutedObsUnit.id)).first(),
                instrument_module_id=s.scalars(select(m.InstrumentModule.id)).first(),
                status="scheduled",
                failure_reason="NotStartedError: task not started 21700 s after it was scheduled",
            )
        )
    status = subprocess.run([*cli, "status"], env=env, capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    waiting = status.stdout[status.stdout.index("Waiting or retrying") :]
    assert "raw_data_package" in waiting and "NotStartedError" in waiting, status.stdout
    assert "Cancelled" not in status.stdout
    oldest = status.stdout[status.stdout.index("Oldest raw data package not archived") :]
    assert "never-started" in oldest and "waiting" in oldest, status.stdout
    # a transfer an operator gave up: counted in its column, and by whom
    with Session(stack.engine) as s, s.begin():
        t = s.scalars(select(m.DataTransfer)).first()
        t.status = t.unpack_status = Status.CANCELLED
        t.failure_reason = "cancelled by night-shift: the us archive is decommissioned"
    status = subprocess.run([*cli, "status"], env=env, capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    header = next(line for line in status.stdout.splitlines() if "in_progress" in line)
    assert "cancelled" in header, status.stdout
    given_up = status.stdout[status.stdout.index("Cancelled (given up") :]
    assert "data_transfer" in given_up and "cancelled by night-shift" in given_up, status.stdout
    # a record FAILED for good: listed by name with its reason and log path
    with Session(stack.engine) as s, s.begin():
        pkg = s.scalars(select(m.RawDataPackage).where(m.RawDataPackage.name == "never-started"))
        pkg = pkg.one()
        pkg.status = Status.FAILED
        pkg.failure_reason = "PackageError: a file changed size since filing (log: /l/rdp-9.log)"
    status = subprocess.run([*cli, "status"], env=env, capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    failed = status.stdout[status.stdout.index("Failed records (latest 20 per stage)") :]
    assert "never-started" in failed and "/l/rdp-9.log" in failed, status.stdout


def test_pipeline_metrics_show_backlog_and_failures(stack: Stack) -> None:
    stack.file_observation(files=2, seed=24)
    ctx = Context(engine=stack.engine, settings=transfer_settings(stack.root))
    d = QueueDispatcher()
    run_pass("raw_data_packages", ctx.engine, ctx.settings, d)  # scheduled, not run
    with Session(stack.engine) as s:
        pkg = s.scalars(select(m.RawDataPackage)).one()
        pkg.status = "failed"
        pkg.failure_reason = "PackageError: a file changed size since filing"
        s.commit()
    registry = CollectorRegistry()
    registry.register(PipelineCollector(stack.engine))  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    assert 'ccat_transfer_records{stage="raw_data_package",status="failed"} 1.0' in text
    assert (
        'ccat_transfer_failed_records{reason="PackageError",stage="raw_data_package"} 1.0' in text
    )


def test_pipeline_metrics_name_what_holds_data_back(stack: Stack) -> None:
    """The gauges the alerts read: the database answering, every status (cancelled too),
    unarchived and stranded packages per site (0 when none: the series exist), copies by
    status; and a manager whose database is gone says so instead of going quiet."""
    stack.file_observation(files=2, seed=25)
    ctx = Context(engine=stack.engine, settings=transfer_settings(stack.root))
    stack.file_observation(files=2, seed=26)
    passes(ctx, "raw_data_packages")  # built, not archived
    registry = CollectorRegistry()
    registry.register(PipelineCollector(stack.engine))  # type: ignore[arg-type]
    waiting = generate_latest(registry).decode()
    assert "ccat_transfer_database_up 1.0" in waiting
    for status in Status:
        assert f'ccat_transfer_records{{stage="unpack",status="{status.value}"}}' in waiting
    assert 'ccat_transfer_unarchived_packages{site="ccat"} 2.0' in waiting
    assert 'ccat_transfer_stranded_packages{site="ccat"} 0.0' in waiting
    present = 'ccat_transfer_copies{location="primecam_raw_data",site="ccat",status="present"} 4.0'
    assert present in waiting, waiting

    run_until_quiet(ctx)
    with Session(stack.engine) as s, s.begin():  # one archive copy that could not be deleted
        copy = s.scalars(
            select(m.PhysicalCopy)
            .join(m.DataLocation)
            .where(m.DataLocation.location_type == LocationType.LONG_TERM_ARCHIVE)
            .limit(1)
        ).one()
        copy.status = PhysicalCopyStatus.DELETION_FAILED
        site, where = copy.data_location.site.short_name, copy.data_location.name
    done = generate_latest(registry).decode()
    assert 'ccat_transfer_unarchived_packages{site="ccat"} 0.0' in done
    assert 'ccat_transfer_unarchived_oldest_age_seconds{site="ccat"} 0.0' in done
    failed = (
        f'ccat_transfer_copies{{location="{where}",site="{site}",status="deletion_failed"}} 1.0'
    )
    assert failed in done, done
    assert 'status="deleted"' not in done.split("ccat_transfer_copies", 1)[1]  # live copies only
    assert 'location="primecam_raw_data"' not in done.split("# HELP ccat_transfer_copies")[1]

    gone = create_engine("postgresql+psycopg://ccat@127.0.0.1:9/none", pool_pre_ping=False)
    dead = CollectorRegistry()
    dead.register(PipelineCollector(gone))  # type: ignore[arg-type]
    text = generate_latest(dead).decode()
    assert "ccat_transfer_database_up 0.0" in text
    assert "ccat_transfer_records" not in text


def _forward_after(delay: float, listen: Path, target: Path, stop: threading.Event) -> None:
    """Create the unix socket ``listen`` only after ``delay`` seconds (until then a client
    finds no server, as with a database that is still starting), then relay every connection
    to the socket ``target``."""
    import socket

    time.sleep(delay)
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(str(listen))
        srv.listen()
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                client, _ = srv.accept()
            except TimeoutError:
                continue
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(str(target))

            def pump(a: socket.socket, b: socket.socket) -> None:
                with contextlib.suppress(OSError):
                    while data := a.recv(65536):
                        b.sendall(data)
                with contextlib.suppress(OSError):
                    b.shutdown(socket.SHUT_WR)

            threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=pump, args=(upstream, client), daemon=True).start()


def test_worker_waits_for_a_database_that_starts_later(stack: Stack, tmp_path: Path) -> None:
    """A worker started before PostgreSQL answers keeps trying for --db-wait seconds and then
    starts normally; with nothing answering it ends with an error that says what to check."""
    from sqlalchemy.engine import make_url

    url = make_url(stack.env["CCAT_OPS_DB_URL"])
    real_dir = Path(str(url.query["host"]))
    real = next(p for p in real_dir.glob(".s.PGSQL.*") if not p.name.endswith(".lock"))
    relay_dir = tmp_path / "later"  # the server's socket appears here only later
    relay_dir.mkdir()
    moved = dict(
        stack.env,
        CCAT_OPS_DB_URL=url.update_query_dict({"host": str(relay_dir)}).render_as_string(
            hide_password=False
        ),
    )
    cli = [sys.executable, "-m", "data_transfer.cli", "worker", "--site", "cologne"]
    # nothing ever answers: a clear error after the wait, naming the setting
    gone = subprocess.run(
        [*cli, "--db-wait", "2"], env=moved, capture_output=True, text=True, timeout=60
    )
    assert gone.returncode == 2, gone.stderr
    assert "waiting for the operations database" in gone.stderr
    flat = " ".join(gone.stderr.split())
    assert "did not answer within 2 s" in flat and "CCAT_OPS_DB_URL" in flat, flat
    # the database answers 4 s after the worker started: it waits, then lists its queues
    stop = threading.Event()
    relay = threading.Thread(
        target=_forward_after, args=(4.0, relay_dir / real.name, real, stop), daemon=True
    )
    relay.start()
    proc = subprocess.Popen([*cli, "--db-wait", "60"], env=moved, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stderr.readline() if proc.stderr else ""
            if not line:
                break
            lines.append(line)
            if "worker for cologne" in line:
                break
        text = " ".join("".join(lines).split())
        assert "waiting for the operations database" in text, text
        assert "worker for cologne/*:" in text, text
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        if proc.poll() is None:
            proc.kill()
        stop.set()


def test_a_late_failure_does_not_undo_a_record_another_run_completed(stack: Stack) -> None:
    """The recovery sweeper took a slow worker for dead and the record ran again elsewhere;
    one run completes it, the other then fails (its destination exists now). The failure is
    logged and dropped: the record stays COMPLETED, no retry is counted."""
    stack.file_observation(files=2, seed=3)
    ctx = Context(engine=stack.engine, settings=transfer_settings(stack.root))
    run_pass("raw_data_packages", ctx.engine, ctx.settings, QueueDispatcher())  # not run
    with Session(stack.engine) as s:
        pkg_id = s.scalars(select(m.RawDataPackage.id)).one()

    def body():  # the other run finishes first; then this one fails
        with Session(stack.engine) as s, s.begin():
            s.get(m.RawDataPackage, pkg_id).status = Status.COMPLETED
        raise DestinationExistsError("ccat/buffer:raw_data_packages/x.tar exists")

    outcome = operations._run(ctx, "raw_data_package", pkg_id, body)

    assert (outcome.result, outcome.detail) == ("skipped", "completed by another run")
    with Session(stack.engine) as s:
        pkg = s.get(m.RawDataPackage, pkg_id)
        assert pkg.status == Status.COMPLETED
        assert pkg.retry_count == 0 and pkg.failure_reason is None


def test_unpack_retries_back_off_like_the_others() -> None:
    """Unpack has no next_attempt_at of its own; its transfer's is free by then. Without it a
    minute's hiccup on the destination disk used up every retry in one go."""
    from data_transfer import state
    from data_transfer.errors import StorageError

    settings = TransferSettings(retry_backoff_s=600)
    t = m.DataTransfer(
        status=Status.COMPLETED, unpack_status=Status.IN_PROGRESS, unpack_retry_count=0
    )
    before = dt.datetime.now(dt.UTC)
    assert (
        state.record_failure(None, t, "unpack", StorageError("stale NFS handle"), settings) is False
    )
    assert t.unpack_status == Status.PENDING and t.unpack_retry_count == 1
    assert t.status == Status.COMPLETED
    assert t.next_attempt_at >= before + dt.timedelta(seconds=599)
    state.record_failure(None, t, "unpack", StorageError("stale NFS handle"), settings)
    assert t.next_attempt_at >= before + dt.timedelta(seconds=1199)  # doubled


def test_fixity_sends_each_copy_once_and_keeps_to_its_byte_budget(stack: Stack) -> None:
    """Passes come every 30 s, a check of a 50 GB copy takes longer: a copy sent for a check
    is not sent again while it waits, and the bytes waiting count against the budget. A copy
    that is bad with nothing to repair it from backs off instead of coming first forever."""
    stack.file_observation(files=3, seed=22, sizes=(10_000, 40_000))
    run_until_quiet(Context(engine=stack.engine, settings=transfer_settings(stack.root)))
    audit = Context(
        engine=stack.engine,
        settings=transfer_settings(
            stack.root, fixity_interval_days=1e-9, fixity_bytes_per_pass=1, retry_backoff_s=600
        ),
    )
    d = QueueDispatcher()
    assert run_pass("fixity", audit.engine, audit.settings, d).scheduled == 1
    report = run_pass("fixity", audit.engine, audit.settings, d)  # the first still queued
    assert report.scheduled == 0 and "still queued or being checked" in report.notes[0]
    (first,) = [t.payload for t in d.pending]
    assert [o.result for o in d.drain(audit)] == ["done"]
    assert run_pass("fixity", audit.engine, audit.settings, d).scheduled == 1
    (second,) = [t.payload for t in d.pending]
    assert second != first  # the other archive's copy, the one checked longest ago
    d.drain(audit)

    with Session(stack.engine) as s:  # both archive copies rot: nothing to repair from
        pkg = s.scalars(select(m.RawDataPackage)).one()
        client = stack.s3.client()
        for lta in s.scalars(select(m.S3DataLocation)):
            key = lta.key_prefix + pkg.relative_path
            body = bytearray(client.get_object(Bucket=lta.bucket, Key=key)["Body"].read())
            body[100] ^= 0x01
            client.put_object(Bucket=lta.bucket, Key=key, Body=bytes(body))
    wide = Context(
        engine=stack.engine,
        settings=transfer_settings(stack.root, fixity_interval_days=1e-9, retry_backoff_s=600),
    )
    assert run_pass("fixity", wide.engine, wide.settings, d).scheduled == 2
    assert [o.result for o in d.drain(wide)] == ["failed", "failed"]
    with Session(stack.engine) as s:
        for copy in s.scalars(select(m.PhysicalCopy).where(m.PhysicalCopy.id.in_([first, second]))):
            assert copy.failure_reason.startswith("bad copy, no good copy to repair from")
            assert copy.retry_count == 1 and copy.next_attempt_at is not None
    assert holdups(stack.engine).unverified == {("cologne", "lta"): 1, ("us", "lta"): 1}
    assert run_pass("fixity", wide.engine, wide.settings, d).scheduled == 0  # backing off


@pytest.mark.parametrize("new_run", [True, False], ids=["running-again", "reset-only"])
def test_a_late_failure_does_not_undo_a_record_taken_over(stack: Stack, new_run: bool) -> None:
    """A worker loses its heartbeat (paused, cut off from Redis) but goes on; the recovery
    sweeper resets its record, which may already run again elsewhere. When the old run then
    fails, its failure is logged and dropped: it must not put the new run's IN_PROGRESS back to
    PENDING (a third run would start beside the second) nor count a second attempt for one
    stall. Before, it did both."""
    stack.file_observation(files=2, seed=4)
    settings = transfer_settings(stack.root).model_copy(update={"stale_after_s": 0.001})
    ctx = Context(engine=stack.engine, settings=settings)
    run_pass("raw_data_packages", ctx.engine, ctx.settings, QueueDispatcher())  # not run
    with Session(stack.engine) as s:
        pkg_id = s.scalars(select(m.RawDataPackage.id)).one()

    def body():
        time.sleep(0.05)
        # the sweeper sees no heartbeat in its store and resets the record (an attempt)
        report = managers.recovery(ctx.engine, settings, QueueDispatcher(), MemoryHeartbeats())
        assert report.created == 1, report.notes
        if new_run:  # scheduled again and claimed by another worker
            with Session(stack.engine) as s, s.begin():
                assert state.schedule(s, "raw_data_package", pkg_id)
                assert state.claim(s, "raw_data_package", pkg_id) is not None
        raise DestinationExistsError("ccat/buffer:raw_data_packages/x.tar exists")

    outcome = operations._run(ctx, "raw_data_package", pkg_id, body)

    assert (outcome.result, outcome.detail) == ("skipped", "taken over by another run")
    with Session(stack.engine) as s:
        pkg = s.get(m.RawDataPackage, pkg_id)
        assert pkg.status == (Status.IN_PROGRESS if new_run else Status.PENDING)
        assert pkg.retry_count == 1  # the stall, once
        assert pkg.failure_reason.startswith("StalledTaskError: no heartbeat"), pkg.failure_reason


def test_a_claim_names_its_run(stack: Stack) -> None:
    """The run identity is the record's claim counter, which every claim raises and nothing
    resets."""
    stack.file_observation(files=1, seed=5)
    ctx = Context(engine=stack.engine, settings=transfer_settings(stack.root))
    run_pass("raw_data_packages", ctx.engine, ctx.settings, QueueDispatcher())
    with Session(stack.engine) as s, s.begin():
        pkg = s.scalars(select(m.RawDataPackage)).one()
        run = state.claim(s, "raw_data_package", pkg.id)
        assert run == state.Claim(1)
        assert state.claim(s, "raw_data_package", pkg.id) is None  # a duplicate delivery
        s.refresh(pkg)
        assert run.holds(pkg, "raw_data_package")
        pkg.status, pkg.retry_count = Status.SCHEDULED, 0  # reset, as an operator's retry does
        s.flush()
        again = state.claim(s, "raw_data_package", pkg.id)
        assert again == state.Claim(2)
        s.refresh(pkg)
        assert not run.holds(pkg, "raw_data_package") and again.holds(pkg, "raw_data_package")
    transfer = m.DataTransfer(
        claim_count=3,
        unpack_claim_count=7,
        status=Status.IN_PROGRESS,
        unpack_status=Status.IN_PROGRESS,
    )
    assert state.Claim(3).holds(transfer, "data_transfer")
    assert state.Claim(7).holds(transfer, "unpack") and not state.Claim(3).holds(transfer, "unpack")
    transfer.status = Status.PENDING  # reset by the recovery sweeper
    assert not state.Claim(3).holds(transfer, "data_transfer")


def test_a_late_unpack_failure_spares_the_run_after_an_operator_retry(stack: Stack) -> None:
    """Run A of an unpack hangs; the sweeper resets it (FAILED: no retries left), an operator
    retries it (the retry count back to 0), and run B claims it. A then fails: B keeps the
    record. (Before, a run was told by its retry count, which the retry had set back to A's
    value, so A's failure overwrote B's IN_PROGRESS and a third run could start.)"""
    settings = transfer_settings(stack.root, max_retries=0)
    ctx = Context(engine=stack.engine, settings=settings)
    stack.file_observation(files=2, seed=61)
    for _ in range(4):
        passes(ctx, "raw_data_packages", "transfer_packages")
    with Session(stack.engine) as s, s.begin():
        t = s.scalars(select(m.DataTransfer)).one()
        tid = t.id
        t.status, t.unpack_status = Status.COMPLETED, Status.SCHEDULED
    go, started = threading.Event(), threading.Event()

    def body():
        started.set()
        assert go.wait(30)
        raise StorageError("NFS came back: stale file handle")  # run A, hung, fails late

    out: dict[str, operations.Outcome] = {}
    th = threading.Thread(
        target=lambda: out.setdefault("a", operations._run(ctx, "unpack", tid, body))
    )
    th.start()
    assert started.wait(30)
    with Session(stack.engine) as s, s.begin():  # the recovery sweeper: A has no heartbeat
        t = s.get(m.DataTransfer, tid)
        state.record_failure(s, t, "unpack", StalledTaskError("no heartbeat"), settings)
        assert t.unpack_status == Status.FAILED
    with Session(stack.engine) as s, s.begin():  # POST /data_transfers/{id}/retry (unpack)
        t = s.get(m.DataTransfer, tid)
        t.unpack_status, t.unpack_retry_count, t.unpack_failure_reason = Status.PENDING, 0, None
    with Session(stack.engine) as s, s.begin():  # the manager schedules it, run B claims it
        assert state.schedule(s, "unpack", tid)
        assert state.claim(s, "unpack", tid) is not None
    go.set()
    th.join(30)
    assert (out["a"].result, out["a"].detail) == ("skipped", "taken over by another run")
    with Session(stack.engine) as s:
        t = s.get(m.DataTransfer, tid)
        assert (t.unpack_status, t.unpack_retry_count) == (Status.IN_PROGRESS, 0)
        assert t.unpack_claim_count == 2


def test_a_fixity_check_longer_than_its_lease_is_not_sent_again(stack: Stack) -> None:
    """The lease of a copy sent for a fixity check lasts ``scheduled_timeout_s``; a check of a
    large copy on slow storage can read for longer. The check renews its lease while it
    reads, so the passes meanwhile do not send the copy again beside it. (Before, a check
    longer than the lease was queued a second time while the first still read.)"""
    stack.file_observation(files=2, seed=26, sizes=(10_000, 20_000))
    run_until_quiet(Context(engine=stack.engine, settings=transfer_settings(stack.root)))
    slow_read = threading.Event()
    release = threading.Event()

    class SlowChecksum:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def checksum(self, *a: Any, **kw: Any) -> Any:
            slow_read.set()
            assert release.wait(30)
            return self.inner.checksum(*a, **kw)

    settings = transfer_settings(
        stack.root, fixity_interval_days=1e-9, fixity_bytes_per_pass=1, scheduled_timeout_s=0.6
    )
    audit = Context(
        engine=stack.engine,
        settings=settings,
        mover_factory=lambda *a, **kw: SlowChecksum(mover_for(*a, **kw)),
    )
    d = QueueDispatcher()
    assert run_pass("fixity", audit.engine, audit.settings, d).scheduled == 1
    (task,) = d.pending
    d.pending = []
    out: dict[str, Any] = {}
    th = threading.Thread(
        target=lambda: out.setdefault("o", operations.fixity(audit, task.payload))
    )
    th.start()
    assert slow_read.wait(30)
    again = []
    for _ in range(10):  # 3 s of passes: five leases' worth
        time.sleep(0.3)
        run_pass("fixity", audit.engine, audit.settings, d)
        again += [t.payload for t in d.pending]
        d.pending = []
    release.set()
    th.join(30)
    assert out["o"].result == "done"
    assert task.payload not in again, again
    with Session(stack.engine) as s:
        assert s.get(m.PhysicalCopy, task.payload).next_attempt_at is None  # lease given back


def _sweep_while_row_locked(
    stack: Stack, change: Any, settings: TransferSettings
) -> managers.PassReport:
    """Run one recovery pass in a thread while another transaction holds a row ``change``
    changed; let that transaction commit once the pass has ended or waits on the row lock (seen
    in pg_locks, so the old unlocked read-then-write is caught in the act, not by timing).
    Returns the pass's report."""
    done = threading.Event()
    errors: list[BaseException] = []
    reports: list[managers.PassReport] = []

    def run() -> None:
        try:
            reports.append(
                managers.recovery(stack.engine, settings, QueueDispatcher(), MemoryHeartbeats())
            )
        except BaseException as exc:  # reported on the test's thread
            errors.append(exc)
        finally:
            done.set()

    with Session(stack.engine) as holder, holder.begin():
        change(holder)
        holder.flush()
        th = threading.Thread(target=run)
        th.start()
        deadline = time.monotonic() + 30
        with stack.engine.connect() as watch:
            while not done.wait(0.05):
                waiting = watch.exec_driver_sql(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted"
                ).scalar()
                watch.rollback()
                if waiting or time.monotonic() > deadline:
                    break
    th.join(30)
    assert not th.is_alive(), "the sweep did not end once the row was free"
    if errors:
        raise errors[0]
    return reports[0]


def test_the_recovery_sweeper_does_not_undo_a_claim_made_while_it_reads(stack: Stack) -> None:
    """A task that waited long in its queue starts just as the sweeper takes it for never
    started. Before, the sweeper's reset, written after the claim committed, put the claimed
    record back to PENDING: it was scheduled again and ran twice side by side. The sweeper now
    locks what it resets and passes over a row held by someone else."""
    stack.file_observation(files=2, seed=71)
    settings = transfer_settings(stack.root, stale_after_s=0.001, scheduled_timeout_s=0.001)
    ctx = Context(engine=stack.engine, settings=settings)
    run_pass("raw_data_packages", ctx.engine, ctx.settings, QueueDispatcher())  # not run
    with Session(stack.engine) as s:
        pkg_id = s.scalars(select(m.RawDataPackage.id)).one()
    time.sleep(0.05)
    claims: list[Any] = []
    report = _sweep_while_row_locked(
        stack, lambda s: claims.append(state.claim(s, "raw_data_package", pkg_id)), settings
    )
    assert claims == [state.Claim(1)]
    assert report.created == 0, report.notes  # held by its run: not stalled
    with Session(stack.engine) as s:
        pkg = s.get(m.RawDataPackage, pkg_id)
        assert (pkg.status, pkg.claim_count, pkg.retry_count) == (Status.IN_PROGRESS, 1, 0)
        assert pkg.failure_reason is None


def test_a_cancel_made_while_the_sweeper_revives_the_transfer_stands(stack: Stack) -> None:
    """An operator cancels a transfer FAILED by a gone site just as the recovery sweeper
    revives it after ``partition_retry_s``. Before, the revival, written after the cancel
    committed, made it PENDING again: the package went on to the site the operator gave up."""
    settings = transfer_settings(stack.root, partition_retry_s=60)
    ctx = Context(engine=stack.engine, settings=settings)
    stack.file_observation(files=2, seed=72)
    for _ in range(4):
        passes(ctx, "raw_data_packages", "transfer_packages")
    with Session(stack.engine) as s, s.begin():
        t = s.scalars(select(m.DataTransfer)).one()
        tid = t.id
        t.status = Status.FAILED
        t.failure_reason = "NetworkError: no route to host cologne"
        t.last_failure_at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)

    def cancel(s: Session) -> None:  # as POST /data_transfers/{id}/cancel does it
        t = s.get(m.DataTransfer, tid, with_for_update=True)
        t.status = t.unpack_status = Status.CANCELLED
        t.failure_reason = "cancelled by ops: the site is gone"

    report = _sweep_while_row_locked(stack, cancel, settings)
    assert report.created == 0, report.notes
    with Session(stack.engine) as s:
        t = s.get(m.DataTransfer, tid)
        assert t.status == Status.CANCELLED, (t.status, t.failure_reason)
        assert t.failure_reason == "cancelled by ops: the site is gone"
    # and the next pass leaves it alone too: a cancelled transfer is never revived
    report = managers.recovery(ctx.engine, settings, QueueDispatcher(), MemoryHeartbeats())
    assert report.created == 0


def test_a_deletion_that_ends_while_the_sweeper_reads_stays_recorded(stack: Stack) -> None:
    """A deletion task records DELETED just as the sweeper takes it for stuck. Before, the
    sweeper's DELETION_FAILED, written after the result committed, said a deleted file was
    still there (and sent it to be deleted again)."""
    stack.file_observation(files=1, seed=73)
    settings = transfer_settings(stack.root, scheduled_timeout_s=0.001)
    with Session(stack.engine) as s, s.begin():
        copy = s.scalars(select(m.PhysicalCopy)).first()
        copy_id = copy.id
        copy.status = PhysicalCopyStatus.DELETION_IN_PROGRESS
    time.sleep(0.05)

    def deleted(s: Session) -> None:  # as operations.delete_copies records its result
        c = s.get(m.PhysicalCopy, copy_id, with_for_update=True)
        c.status, c.deleted_at = PhysicalCopyStatus.DELETED, dt.datetime.now(dt.UTC)

    report = _sweep_while_row_locked(stack, deleted, settings)
    assert report.created == 0, report.notes
    with Session(stack.engine) as s:
        c = s.get(m.PhysicalCopy, copy_id)
        assert (c.status, c.failure_reason) == (PhysicalCopyStatus.DELETED, None)
