"""Operator notices (data_transfer.notify) against real receivers.

Real PostgreSQL (the stack fixture), a real SMTP server (aiosmtpd) and a real HTTP webhook
receiver, each in its own process on 127.0.0.1 (notify_servers.py). The FAILED record comes
from a real failing transfer (ssh to a loopback port where nothing listens). STARTTLS and SMTP
over TLS run against the same SMTP server with a certificate from a CA the test makes.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ccat_ops_db.enums import PhysicalCopyStatus, Status
from data_transfer import notify
from data_transfer.errors import ConfigurationError
from data_transfer.inline import QueueDispatcher
from data_transfer.managers import run_pass
from data_transfer.operations import Context
from data_transfer.settings import load_transfer_settings
from tests.transfer.notify_servers import make_certificates
from tests.transfer.servers import free_port
from tests.transfer.stack import REPO, Stack, transfer_settings


@dataclass
class Receiver:
    """A receiver process and what it stored."""

    kind: str
    port: int
    out: Path
    proc: subprocess.Popen[bytes]

    def messages(self) -> list[Any]:
        """Stored messages: parsed e-mails (smtp) or JSON bodies (webhook), in order."""
        if self.kind == "smtp":
            return [
                email.message_from_bytes(p.read_bytes(), policy=email.policy.default)
                for p in sorted(self.out.glob("*.eml"))
            ]
        return [json.loads(p.read_bytes()) for p in sorted(self.out.glob("*.json"))]


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Callable[..., Receiver]]:
    """Start receivers: ``receiver("smtp", user=..., password=...)``, ``receiver("webhook",
    fail_first=N)``. Stopped at the end of the test."""
    started: list[Receiver] = []

    def start(kind: str, **options: Any) -> Receiver:
        port = free_port()
        out = tmp_path / f"{kind}-{len(started)}"
        args = [sys.executable, "-m", "tests.transfer.notify_servers", kind]
        args += ["--port", str(port), "--out", str(out)]
        for key, value in options.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        log = tmp_path / f"{kind}-{len(started)}.log"
        with open(log, "wb") as sink:
            proc = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{kind} receiver exited: {log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{kind} receiver not up in 20 s: {log.read_text()}")
                time.sleep(0.05)
        r = Receiver(kind, port, out, proc)
        started.append(r)
        return r

    yield start
    for r in started:
        r.proc.terminate()
        try:
            r.proc.wait(10)
        except subprocess.TimeoutExpired:
            r.proc.kill()


@pytest.fixture(autouse=True)
def _fresh_pace() -> None:
    """Each test starts with every channel due (the pace is per process)."""
    notify.PACE.reset()


def channel_settings(stack: Stack, smtp: Receiver | None, hook: Receiver | None, **kw: Any) -> Any:
    values: dict[str, Any] = {"notify_min_interval_s": 0, "notify_hold_s": 0}
    if smtp is not None:
        values.update(
            notify_smtp_host="127.0.0.1",
            notify_smtp_port=smtp.port,
            notify_smtp_security="none",
            notify_email_to="dc-oncall@example.org, instrument-team@example.org",
            notify_email_from="ccat-transfer@example.org",
        )
    if hook is not None:
        values["notify_webhook_url"] = f"http://127.0.0.1:{hook.port}/hooks/abc123secret"
    values.update(kw)
    return transfer_settings(stack.root, **values)


def fail_a_transfer(stack: Stack) -> int:
    """A transfer that fails for good, for real: ssh to a loopback port where nothing listens,
    no retries. Returns its id."""
    stack.file_observation(files=2, seed=11)
    ctx = Context(engine=stack.engine, settings=transfer_settings(stack.root, max_retries=0))
    d = QueueDispatcher()
    for name in ("raw_data_packages", "transfer_packages", "transfer_packages"):
        run_pass(name, ctx.engine, ctx.settings, d)
        d.drain(ctx)
    stack.cut_link_to_cologne()
    for _ in range(3):
        run_pass("transfers", ctx.engine, ctx.settings, d)
        d.drain(ctx)
    with Session(stack.engine) as s:
        t = s.scalars(select(m.DataTransfer)).one()
        assert t.status == Status.FAILED, t.failure_reason
        return t.id


def mark_a_package_copy_bad(stack: Stack, reason: str) -> int:
    """Make the first raw data package copy one that failed its check and was not repaired
    (present, no verified checksum, a reason). Returns its id."""
    with Session(stack.engine) as s, s.begin():
        copy = s.scalars(
            select(m.PhysicalCopy)
            .where(m.PhysicalCopy.copy_type == "raw_data_package")
            .order_by(m.PhysicalCopy.id)
        ).first()
        assert copy is not None
        copy.checksum_verified_at = None
        copy.failure_reason = reason
        return copy.id


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_failed_transfer_is_told_once_on_every_channel_and_its_clearing_too(
    stack: Stack, receiver: Callable[..., Receiver]
) -> None:
    smtp, hook = receiver("smtp"), receiver("webhook")
    tid = fail_a_transfer(stack)
    settings = channel_settings(stack, smtp, hook)
    sent_before = sample("ccat_transfer_notifications_total", channel="webhook", outcome="sent")

    report = notify.run_notify_pass(stack.engine, settings)
    assert report.opened == 1 and report.sent == {"webhook": 1, "email": 1}, report

    (body,) = hook.messages()
    (item,) = body["notices"]
    assert item["state"] == "new" and item["kind"] == "failed" and item["site"] == "ccat"
    assert item["subject"].startswith(f"data_transfer:{tid}#")
    assert "FAILED for good after 1 attempt(s)" in item["summary"]
    assert item["detail"].startswith("NetworkError:") and "(log: " in item["detail"]
    assert body["text"].startswith("CCAT data transfer: 1 new problem\n")
    assert item["detail"] in body["text"]
    assert (hook.out / "001.type").read_text() == "application/json"

    (mail,) = smtp.messages()
    assert mail["Subject"] == "CCAT data transfer: 1 new problem"
    assert mail["From"] == "ccat-transfer@example.org"
    assert mail["Auto-Submitted"] == "auto-generated"
    assert (smtp.out / "001.rcpt").read_text().split() == [
        "dc-oncall@example.org",
        "instrument-team@example.org",
    ]
    content = mail.get_content()
    assert "[failed] ccat: transfer of " in content and item["detail"] in content
    assert "ccat-transfer notices" in content

    # The next passes find the same problem: nobody is told twice.
    for _ in range(2):
        again = notify.run_notify_pass(stack.engine, settings)
        assert again.opened == 0 and again.sent == {} and again.failed == {}
    assert len(hook.messages()) == 1 and len(smtp.messages()) == 1
    after = sample("ccat_transfer_notifications_total", channel="webhook", outcome="sent")
    assert after == sent_before + 1
    assert sample("ccat_transfer_notices_open", kind="failed") == 1

    # An operator retries it (as the API's retry does): the problem clears, and both
    # channels that were told of it are told it cleared.
    with Session(stack.engine) as s, s.begin():
        s.execute(
            update(m.DataTransfer)
            .where(m.DataTransfer.id == tid)
            .values(status=Status.PENDING, retry_count=0, failure_reason=None)
        )
    cleared = notify.run_notify_pass(stack.engine, settings)
    assert cleared.cleared == 1 and cleared.sent == {"webhook": 1, "email": 1}
    last = hook.messages()[-1]
    assert [n["state"] for n in last["notices"]] == ["cleared"]
    assert last["subject"] == "CCAT data transfer: 1 cleared" and last["still_open"] == 0
    assert smtp.messages()[-1]["Subject"] == "CCAT data transfer: 1 cleared"
    assert sample("ccat_transfer_notices_open", kind="failed") == 0

    with Session(stack.engine) as s:
        (n,) = s.scalars(select(m.OperatorNotice)).all()
        assert n.cleared_at is not None
        assert set(n.delivered) == set(n.cleared_delivered) == {"webhook", "email"}


def test_a_channel_that_is_down_is_told_later_and_the_others_only_once(
    stack: Stack, receiver: Callable[..., Receiver]
) -> None:
    smtp, hook = receiver("smtp"), receiver("webhook", fail_first=2)
    fail_a_transfer(stack)
    settings = channel_settings(stack, smtp, hook)
    failed_before = sample("ccat_transfer_notifications_total", channel="webhook", outcome="failed")

    first = notify.run_notify_pass(stack.engine, settings)
    assert first.sent == {"email": 1}
    assert first.failed["webhook"].startswith("webhook at 127.0.0.1 answered 503")
    assert "abc123secret" not in first.failed["webhook"]  # the URL's token is not shown
    assert sample("ccat_transfer_notices_undelivered", channel="webhook") == 1

    second = notify.run_notify_pass(stack.engine, settings)
    assert second.sent == {} and set(second.failed) == {"webhook"}
    third = notify.run_notify_pass(stack.engine, settings)
    assert third.sent == {"webhook": 1} and third.failed == {}

    assert len(smtp.messages()) == 1 and len(hook.messages()) == 1
    assert sample("ccat_transfer_notices_undelivered", channel="webhook") == 0
    after = sample("ccat_transfer_notifications_total", channel="webhook", outcome="failed")
    assert after == failed_before + 2


def test_a_channel_is_paced_and_an_unreachable_one_names_why(
    stack: Stack, receiver: Callable[..., Receiver]
) -> None:
    hook = receiver("webhook")
    fail_a_transfer(stack)
    paced = channel_settings(stack, None, hook, notify_min_interval_s=3600)
    assert notify.run_notify_pass(stack.engine, paced).sent == {"webhook": 1}
    # a new problem within the interval waits for the next digest
    mark_a_package_copy_bad(stack, "ChecksumMismatch: xxh3_128 differs; no good copy")
    waiting = notify.run_notify_pass(stack.engine, paced)
    assert waiting.opened == 1 and waiting.sent == {} and len(hook.messages()) == 1
    assert sample("ccat_transfer_notices_undelivered", channel="webhook") == 1

    gone = channel_settings(
        stack, None, None, notify_webhook_url=f"http://127.0.0.1:{free_port()}/x"
    )
    notify.PACE.reset()
    down = notify.run_notify_pass(stack.engine, gone)
    assert down.failed["webhook"].startswith("webhook at 127.0.0.1 not reached:"), down.failed

    # a restarted manager (its in-process pace gone) reads the pace from the notices
    notify.PACE.reset()
    restarted = notify.run_notify_pass(stack.engine, paced)
    assert restarted.sent == {} and len(hook.messages()) == 1
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1, minutes=1)
    assert notify.run_notify_pass(stack.engine, paced, now=later).sent == {"webhook": 1}
    assert [n["kind"] for n in hook.messages()[1]["notices"]] == ["bad_copy"]


def test_a_problem_that_clears_within_the_hold_is_never_sent(
    stack: Stack, receiver: Callable[..., Receiver]
) -> None:
    hook = receiver("webhook")
    stack.file_observation(files=3, seed=2)
    ctx = Context(engine=stack.engine, settings=transfer_settings(stack.root))
    d = QueueDispatcher()
    run_pass("raw_data_packages", ctx.engine, ctx.settings, d)
    d.drain(ctx)
    held = channel_settings(stack, None, hook, notify_hold_s=3600)
    copy_id = mark_a_package_copy_bad(stack, "ChecksumMismatch: re-fetch scheduled")
    opened = notify.run_notify_pass(stack.engine, held)
    assert opened.opened == 1 and opened.sent == {}
    with Session(stack.engine) as s, s.begin():
        s.get(m.PhysicalCopy, copy_id).checksum_verified_at = dt.datetime.now(dt.UTC)
    gone = notify.run_notify_pass(stack.engine, held)
    assert gone.cleared == 1 and gone.sent == {}
    assert hook.messages() == []  # neither the opening nor the clearing

    # the same problem again, held long enough this time: sent, with its subject
    with Session(stack.engine) as s, s.begin():
        s.get(m.PhysicalCopy, copy_id).checksum_verified_at = None
    notify.run_notify_pass(stack.engine, held)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
    sent = notify.run_notify_pass(stack.engine, held, now=later)
    assert sent.sent == {"webhook": 1}
    (item,) = hook.messages()[0]["notices"]
    assert item["kind"] == "bad_copy" and item["subject"] == f"physical_copy:{copy_id}"
    assert "failed its checksum and was not repaired" in item["summary"]
    assert item["detail"] == "ChecksumMismatch: re-fetch scheduled"


def test_stuck_sites_undeletable_copies_and_stranded_packages_are_found(stack: Stack) -> None:
    stack.file_observation(files=3, seed=3)
    ctx = Context(engine=stack.engine, settings=transfer_settings(stack.root))
    d = QueueDispatcher()
    for name in ("raw_data_packages", "transfer_packages", "transfer_packages"):
        run_pass(name, ctx.engine, ctx.settings, d)
        d.drain(ctx)
    settings = transfer_settings(stack.root, notify_stuck_after_s=86400)
    assert notify.conditions(stack.engine, settings)[0] == []
    with Session(stack.engine) as s, s.begin():
        pkg = s.scalars(select(m.RawDataPackage)).one()
        pkg.created_at = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
        file_copy = s.scalars(select(m.RawDataFilePhysicalCopy)).first()
        file_copy.status = PhysicalCopyStatus.DELETION_FAILED
        file_copy.failure_reason = "PermissionError: [Errno 13] Permission denied"
        pkg_name = pkg.name
    found, complete = notify.conditions(stack.engine, settings)
    assert complete == set(notify.KINDS)
    by_kind = {c.kind: c for c in found}
    assert set(by_kind) == {"stuck", "undeletable"}
    stuck = by_kind["stuck"]
    assert stuck.subject == "site:ccat" and stuck.site == "ccat"
    assert f"the oldest, {pkg_name}, is " in stuck.summary and "3.0 days" in stuck.summary
    undeletable = by_kind["undeletable"]
    assert undeletable.summary.startswith("1 copy(ies) at ccat/primecam_raw_data could not")
    assert undeletable.detail == "one reason: PermissionError: [Errno 13] Permission denied"

    # every way to an archive site cancelled: the transfer package is stranded
    with Session(stack.engine) as s, s.begin():
        dtp = s.scalars(select(m.DataTransferPackage)).one()
        s.execute(
            update(m.DataTransfer)
            .where(m.DataTransfer.data_transfer_package_id == dtp.id)
            .values(status=Status.CANCELLED)
        )
        dtp.next_attempt_at = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
        dtp_id = dtp.id
    found, _ = notify.conditions(stack.engine, settings)
    stranded = [c for c in found if c.kind == "stranded"]
    assert [c.subject for c in stranded] == [f"data_transfer_package:{dtp_id}"]
    assert "every way to an archive site was cancelled" in stranded[0].summary


def test_two_notify_managers_take_turns(stack: Stack) -> None:
    settings = transfer_settings(stack.root)
    with stack.engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": notify._LOCK_KEY})
        assert notify.run_notify_pass(stack.engine, settings).skipped
        report = run_pass("notify", stack.engine, settings, QueueDispatcher())
        assert report.notes == ["another notify manager holds the lock"]
        conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": notify._LOCK_KEY})
    assert not notify.run_notify_pass(stack.engine, settings).skipped


def test_smtp_login_is_used_and_a_refusal_is_reported(
    stack: Stack, receiver: Callable[..., Receiver]
) -> None:
    smtp = receiver("smtp", user="notifier", password="s3cret-word")
    fail_a_transfer(stack)
    wrong = channel_settings(stack, smtp, None)  # no login: the server refuses the sender
    refused = notify.run_notify_pass(stack.engine, wrong)
    assert refused.failed["email"].startswith(f"mail server 127.0.0.1:{smtp.port} refused")
    assert "530" in refused.failed["email"]
    notify.PACE.reset()
    right = channel_settings(
        stack, smtp, None, notify_smtp_user="notifier", notify_smtp_password="s3cret-word"
    )
    assert notify.run_notify_pass(stack.engine, right).sent == {"email": 1}
    assert len(smtp.messages()) == 1


def test_a_digest_lists_at_most_max_items_and_counts_the_rest() -> None:
    at = dt.datetime(2026, 12, 7, 19, 0, tzinfo=dt.UTC)
    items = [
        notify.Item("failed", f"data_transfer:{i}#1", "ccat", f"problem {i}", f"why {i}", at)
        for i in range(5)
    ]
    cleared = [notify.Item("stuck", "site:ccat", "ccat", "old", None, at, cleared_at=at)]
    digest = notify.Digest(new=items, cleared=cleared, still_open=5, max_items=2, at=at)
    body = digest.text()
    assert digest.subject == "CCAT data transfer: 5 new problems, 1 cleared"
    assert "- [failed] ccat: problem 1\n    why 1" in body and "problem 2" not in body
    assert "- ... and 3 more" in body and "- ... and 1 more" in body
    assert "Open now: 5." in body
    payload = digest.payload()  # the same two items, the rest counted: a bounded body
    assert [n["subject"] for n in payload["notices"]] == ["data_transfer:0#1", "data_transfer:1#1"]
    assert payload["more"] == 4


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"CCAT_TRANSFER_NOTIFY_EMAIL_TO": "a@example.org"}, "CCAT_TRANSFER_NOTIFY_SMTP_HOST"),
        ({"CCAT_TRANSFER_NOTIFY_SMTP_HOST": "mail"}, "CCAT_TRANSFER_NOTIFY_EMAIL_TO"),
        (
            {"CCAT_TRANSFER_NOTIFY_SMTP_HOST": "mail", "CCAT_TRANSFER_NOTIFY_EMAIL_TO": "oncall"},
            "CCAT_TRANSFER_NOTIFY_EMAIL_TO: not an e-mail address: oncall",
        ),
        (
            {
                "CCAT_TRANSFER_NOTIFY_SMTP_HOST": "mail",
                "CCAT_TRANSFER_NOTIFY_EMAIL_TO": "a@example.org",
                "CCAT_TRANSFER_NOTIFY_SMTP_PASSWORD": "pw",
            },
            "CCAT_TRANSFER_NOTIFY_SMTP_USER",
        ),
        ({"CCAT_TRANSFER_NOTIFY_SMTP_SECURITY": "tls13"}, "CCAT_TRANSFER_NOTIFY_SMTP_SECURITY"),
        (
            {
                "CCAT_TRANSFER_NOTIFY_SMTP_HOST": "127.0.0.1",
                "CCAT_TRANSFER_NOTIFY_EMAIL_TO": "a@example.org",
                "CCAT_TRANSFER_NOTIFY_SMTP_CA_FILE": "/nonexistent/ca.pem",
            },
            "CCAT_TRANSFER_NOTIFY_SMTP_CA_FILE=/nonexistent/ca.pem: not a readable PEM",
        ),
        (
            {
                "CCAT_TRANSFER_NOTIFY_SMTP_HOST": "127.0.0.1",
                "CCAT_TRANSFER_NOTIFY_EMAIL_TO": "a@example.org",
                "CCAT_TRANSFER_NOTIFY_SMTP_SECURITY": "none",
                "CCAT_TRANSFER_NOTIFY_SMTP_CA_FILE": "/etc/hostname",
            },
            "CCAT_TRANSFER_NOTIFY_SMTP_SECURITY is none",
        ),
        ({"CCAT_TRANSFER_NOTIFY_KEEP_CLEARED_S": "3600"}, "CCAT_TRANSFER_NOTIFY_KEEP_CLEARED_S"),
    ],
)
def test_bad_channel_settings_name_the_variable(
    env: dict[str, str], named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigurationError, match=named):
        load_transfer_settings()


def test_a_webhook_url_that_is_not_http_is_refused_without_showing_it() -> None:
    settings = load_transfer_settings(notify_webhook_url="file:///etc/passwd")
    with pytest.raises(ConfigurationError, match="NOTIFY_WEBHOOK_URL: not an http") as info:
        notify.channels(settings)
    assert "passwd" not in str(info.value)


def test_the_cli_lists_notices_and_sends_a_test_notice(
    stack: Stack, receiver: Callable[..., Receiver]
) -> None:
    hook = receiver("webhook")
    fail_a_transfer(stack)
    notify.run_notify_pass(stack.engine, transfer_settings(stack.root))
    env = {**stack.env, "COLUMNS": "200"}
    cli = [sys.executable, "-m", "data_transfer.cli"]
    listed = subprocess.run(
        [*cli, "notices"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert listed.returncode == 0, listed.stderr
    assert "failed" in listed.stdout and "FAILED for good" in listed.stdout
    assert "NetworkError" in listed.stdout and "1 open notice(s) shown" in listed.stdout
    assert "channels: none configured here" in listed.stdout

    env["CCAT_TRANSFER_NOTIFY_WEBHOOK_URL"] = f"http://127.0.0.1:{hook.port}/hooks/t"
    # the channel's standing: the FAILED record is due to it and it was never told
    due = subprocess.run(
        [*cli, "notices"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert "channel webhook: 1 notice(s) due and not told" in due.stdout, due.stdout
    assert "never told" in due.stdout
    told = channel_settings(stack, None, hook)
    assert notify.run_notify_pass(stack.engine, told).sent == {"webhook": 1}
    (status,) = notify.channel_status(stack.engine, told)
    assert status.due == 0 and status.last_told is not None
    after = subprocess.run(
        [*cli, "notices"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert "channel webhook: nothing due; last told " in after.stdout, after.stdout
    hook.out.joinpath("001.json").unlink()  # the test notice below is then the only message
    ok = subprocess.run(
        [*cli, "notify-test"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert ok.returncode == 0 and "sent    webhook" in ok.stdout, ok.stdout + ok.stderr
    (body,) = hook.messages()
    assert body["subject"] == "CCAT data transfer: test notice"

    env["CCAT_TRANSFER_NOTIFY_WEBHOOK_URL"] = f"http://127.0.0.1:{free_port()}/hooks/t"
    down = subprocess.run(
        [*cli, "notify-test"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert down.returncode == 1 and "not reached" in down.stdout, down.stdout + down.stderr

    none = {k: v for k, v in env.items() if not k.startswith("CCAT_TRANSFER_NOTIFY_")}
    unset = subprocess.run(
        [*cli, "notify-test"], env=none, capture_output=True, text=True, timeout=60, check=False
    )
    assert unset.returncode != 0 and "no notification channel" in unset.stdout + unset.stderr
    assert os.environ.get("CCAT_TRANSFER_NOTIFY_WEBHOOK_URL") is None


def test_a_burst_is_one_bounded_message_and_every_problem_in_it_counts_as_told(
    stack: Stack, receiver: Callable[..., Receiver]
) -> None:
    hook = receiver("webhook")
    fail_a_transfer(stack)
    mark_a_package_copy_bad(stack, "ChecksumMismatch: no good copy")
    one = channel_settings(stack, None, hook, notify_max_items=1)
    assert notify.run_notify_pass(stack.engine, one).sent == {"webhook": 2}
    (body,) = hook.messages()
    assert [n["kind"] for n in body["notices"]] == ["failed"] and body["more"] == 1
    assert "- ... and 1 more" in body["text"] and body["still_open"] == 2
    assert notify.run_notify_pass(stack.engine, one).sent == {}
    assert len(hook.messages()) == 1


def test_the_notify_manager_reads_the_problems_at_most_every_notify_check_s(stack: Stack) -> None:
    slow = transfer_settings(stack.root, notify_check_s=3600)
    assert run_pass("notify", stack.engine, slow, QueueDispatcher()).created == 0
    fail_a_transfer(stack)  # a problem appears: the next round within the hour does not look
    assert run_pass("notify", stack.engine, slow, QueueDispatcher()).created == 0
    with Session(stack.engine) as s:
        assert s.scalars(select(m.OperatorNotice)).all() == []
    eager = transfer_settings(stack.root, notify_check_s=0)
    assert run_pass("notify", stack.engine, eager, QueueDispatcher()).created == 1


def test_an_unchanged_open_notice_is_not_written_at_every_pass(stack: Stack) -> None:
    fail_a_transfer(stack)
    settings = transfer_settings(stack.root)
    t0 = dt.datetime.now(dt.UTC)
    notify.run_notify_pass(stack.engine, settings, now=t0)
    notify.run_notify_pass(stack.engine, settings, now=t0 + dt.timedelta(minutes=30))
    with Session(stack.engine) as s:
        (n,) = s.scalars(select(m.OperatorNotice)).all()
        assert n.last_seen_at == t0  # nothing changed: no write
    notify.run_notify_pass(stack.engine, settings, now=t0 + dt.timedelta(minutes=61))
    with Session(stack.engine) as s:
        (n,) = s.scalars(select(m.OperatorNotice)).all()
        assert n.last_seen_at == t0 + dt.timedelta(minutes=61)  # the hourly refresh
        assert n.cleared_at is None and n.first_seen_at == t0


@pytest.mark.parametrize("security", ["starttls", "ssl"])
def test_smtp_over_tls_checks_the_servers_certificate(
    stack: Stack, receiver: Callable[..., Receiver], tmp_path: Path, security: str
) -> None:
    ca, cert, key = make_certificates(tmp_path / "tls")
    smtp = receiver("smtp", tls=security, cert=cert, key=key)
    fail_a_transfer(stack)
    untrusted = channel_settings(stack, smtp, None, notify_smtp_security=security)
    refused = notify.run_notify_pass(stack.engine, untrusted)
    assert "its certificate is not trusted" in refused.failed["email"], refused.failed
    assert "set CCAT_TRANSFER_NOTIFY_SMTP_CA_FILE" in refused.failed["email"]
    if security == "starttls":  # the server will not take mail in the clear either
        notify.PACE.reset()
        plain = channel_settings(stack, smtp, None, notify_smtp_security="none")
        refused = notify.run_notify_pass(stack.engine, plain)
        assert "refused the notice" in refused.failed["email"], refused.failed
        assert "STARTTLS" in refused.failed["email"]
    assert smtp.messages() == []

    notify.PACE.reset()
    trusted = channel_settings(
        stack, smtp, None, notify_smtp_security=security, notify_smtp_ca_file=ca
    )
    assert notify.run_notify_pass(stack.engine, trusted).sent == {"email": 1}
    (msg,) = smtp.messages()
    assert "FAILED" in msg.get_content() or "failed" in msg.get_content()


def test_cleared_notices_are_deleted_after_notify_keep_cleared_s(stack: Stack) -> None:
    transfer_id = fail_a_transfer(stack)
    settings = transfer_settings(stack.root)  # 90 days
    t0 = dt.datetime.now(dt.UTC)
    assert notify.run_notify_pass(stack.engine, settings, now=t0).opened == 1
    with Session(stack.engine) as s, s.begin():
        s.get(m.DataTransfer, transfer_id).status = Status.COMPLETED
    assert notify.run_notify_pass(stack.engine, settings, now=t0).cleared == 1
    kept = notify.run_notify_pass(stack.engine, settings, now=t0 + dt.timedelta(days=89))
    assert kept.pruned == 0

    def failed() -> list[Any]:  # (by then the site is also `stuck`: that notice is open)
        return [
            n for n in notify.open_notices(stack.engine, include_cleared=True) if n.kind == "failed"
        ]

    assert len(failed()) == 1
    gone = notify.run_notify_pass(stack.engine, settings, now=t0 + dt.timedelta(days=91))
    assert gone.pruned == 1 and failed() == []
