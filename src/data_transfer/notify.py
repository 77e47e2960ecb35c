"""Operator notices: tell a person what needs a person, once, with what to look at.

The pipeline retries what can succeed by itself (back-off, re-fetch from a good copy, the
recovery sweeper, the partition retry). What is left needs someone, and the reference system's
rule holds: alert humans only for issues requiring intervention. Each pass of the ``notify``
manager reads those conditions from the database, the same conditions ``ccat-transfer status``
lists and the alerting rules count:

``failed``
    an operation record FAILED for good (its retries used up, or a non-retryable error): one
    notice per record and run, with the stored reason (exception, message, log path);
``stranded``
    a transfer package whose every way to an archive site was cancelled;
``bad_copy``
    a package copy that failed its checksum and that no good copy could repair;
``undeletable``
    copies at a location whose deletion failed (the disk does not empty): one notice per
    location;
``stuck``
    a site whose oldest raw data package is still not archived after
    ``CCAT_TRANSFER_NOTIFY_STUCK_AFTER_S``: none of that site's SOURCE or BUFFER copies may go.

Each problem is one row of ``operator_notice`` from the pass that first saw it until the pass
that no longer does (``cleared_at``). A problem is sent once it has held for
``CCAT_TRANSFER_NOTIFY_HOLD_S`` (a FAILED record at once: its retries are behind it), as one
digest per channel per pass, at most one per ``CCAT_TRANSFER_NOTIFY_MIN_INTERVAL_S``; when a
problem that was sent clears, the next digest says so. Which channel was told what is kept on
the notice, so a channel that was down is told later and nobody is told twice, also across a
restart (the pace too: a restarted manager reads when each channel was last told from the
notices); two notify managers take turns on a PostgreSQL advisory lock. Cleared notices are
deleted after ``CCAT_TRANSFER_NOTIFY_KEEP_CLEARED_S`` (90 days).

Channels (``data_transfer.settings``): a webhook (a JSON POST whose ``text`` a Slack or
Mattermost incoming webhook shows as is; ``notices`` carries the structured list) and e-mail
over SMTP (STARTTLS, TLS or plain; login when a user is set; the server's certificate checked
against the system's CAs or ``CCAT_TRANSFER_NOTIFY_SMTP_CA_FILE``). No channel: notices are only
kept, for ``ccat-transfer notices``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import smtplib
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any, Protocol
from urllib.parse import urlsplit

from prometheus_client import Counter, Gauge
from sqlalchemy import Connection, Engine, delete, func, select, text
from sqlalchemy.orm import Session, aliased

from ccat_ops_db.enums import PackageState, PhysicalCopyStatus, Status
from ccat_ops_db.models import (
    DataTransfer,
    DataTransferPackage,
    LongTermArchiveTransfer,
    OperatorNotice,
    PhysicalCopy,
    RawDataPackage,
    StagingJob,
)

from .errors import ConfigurationError, TransferSystemError
from .metrics import _UNVERIFIED, _aware, _locations
from .metrics import _stranded as stranded_condition
from .settings import TransferSettings

log = logging.getLogger("data_transfer.notify")

#: The kinds of notice, in the order a digest lists them (see the module docstring).
KINDS = ("failed", "stranded", "bad_copy", "undeletable", "stuck")

#: At most this many conditions of one kind are read per pass. Past it, the kind is
#: incomplete this pass: nothing of that kind is cleared (what was not read is not gone).
CAP = 10_000

#: A clearing not delivered within this long is not sent any more (the channel was down for
#: a week; the notice's history still has it).
CLEARED_DELIVERY_WINDOW = dt.timedelta(days=7)
#: Cleared notices deleted per pass at most (the rest go in the next passes).
PRUNE_BATCH = 1000

#: An open notice whose text did not change gets its ``last_seen_at`` written this often (a
#: write per open notice at every pass would be thousands of updates an hour for nothing).
SEEN_REFRESH = dt.timedelta(hours=1)

#: Key of the PostgreSQL advisory lock two notify managers take turns on.
_LOCK_KEY = 0x43434154_4E4F54  # "CCAT" "NOT"

_SENT = Counter(
    "ccat_transfer_notifications_total",
    "Notice digests the notify manager tried to send, by channel and outcome (sent, failed)",
    ["channel", "outcome"],
)
_OPEN = Gauge("ccat_transfer_notices_open", "Open operator notices, by kind", ["kind"])
_UNDELIVERED = Gauge(
    "ccat_transfer_notices_undelivered",
    "Notices (openings and clearings) due to a channel and not delivered to it yet",
    ["channel"],
)


class NotifyError(TransferSystemError):
    """A channel could not deliver a digest (the message names the channel and why)."""


@dataclass(frozen=True)
class Condition:
    """One problem as a pass finds it."""

    kind: str
    subject: str
    site: str | None
    summary: str
    detail: str | None = None


@dataclass
class Item:
    """One line of a digest: a problem that opened (``new``) or cleared."""

    kind: str
    subject: str
    site: str | None
    summary: str
    detail: str | None
    first_seen_at: dt.datetime
    cleared_at: dt.datetime | None = None

    @property
    def state(self) -> str:
        """``new`` or ``cleared``."""
        return "cleared" if self.cleared_at is not None else "new"

    def as_json(self) -> dict[str, Any]:
        """The item as the webhook's ``notices`` list carries it."""
        return {
            "state": self.state,
            "kind": self.kind,
            "subject": self.subject,
            "site": self.site,
            "summary": self.summary,
            "detail": self.detail,
            "first_seen_at": self.first_seen_at.isoformat(),
            "cleared_at": self.cleared_at.isoformat() if self.cleared_at else None,
        }


@dataclass
class Digest:
    """What one message says: problems that opened, problems that cleared, what stays open."""

    new: list[Item] = field(default_factory=list)
    cleared: list[Item] = field(default_factory=list)
    still_open: int = 0
    max_items: int = 50
    at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    title: str = ""

    @property
    def subject(self) -> str:
        """One line: the e-mail subject and the first line of the text."""
        if self.title:
            return f"CCAT data transfer: {self.title}"
        parts = []
        if self.new:
            parts.append(f"{len(self.new)} new problem{'s' if len(self.new) != 1 else ''}")
        if self.cleared:
            parts.append(f"{len(self.cleared)} cleared")
        return "CCAT data transfer: " + (", ".join(parts) or "nothing new")

    def shown(self) -> tuple[list[Item], list[Item]]:
        """The items a message lists: at most ``max_items``, the new ones first. The rest are
        counted, not listed (``ccat-transfer notices`` has them), so a burst of problems makes
        one message of bounded size, which a chat webhook still takes."""
        new = self.new[: self.max_items]
        return new, self.cleared[: max(self.max_items - len(new), 0)]

    def text(self) -> str:
        """The plain-text body (also the webhook's ``text``)."""
        lines = [self.subject, f"as of {self.at:%Y-%m-%d %H:%M} UTC", ""]
        for title, items, shown in zip(
            ("NEW", "CLEARED"), (self.new, self.cleared), self.shown(), strict=True
        ):
            if not items:
                continue
            lines.append(f"{title} ({len(items)})")
            for item in shown:
                where = f"{item.site}: " if item.site else ""
                lines.append(f"- [{item.kind}] {where}{item.summary}")
                if item.cleared_at is not None:
                    lines.append(f"    open since {item.first_seen_at:%Y-%m-%d %H:%M} UTC")
                elif item.detail:
                    lines.append(f"    {item.detail}")
            if len(items) > len(shown):
                lines.append(f"- ... and {len(items) - len(shown)} more")
            lines.append("")
        lines.append(
            f"Open now: {self.still_open}. `ccat-transfer notices` lists them, "
            "`ccat-transfer status --limit 20` shows the pipeline around them; what to do per "
            'kind: docs/data-transfer.md, "Operator notifications".'
        )
        return "\n".join(lines)

    def payload(self) -> dict[str, Any]:
        """The webhook body: ``text`` for chat tools, the items for anything else."""
        new, cleared = self.shown()
        return {
            "text": self.text(),
            "subject": self.subject,
            "at": self.at.isoformat(),
            "still_open": self.still_open,
            "notices": [i.as_json() for i in [*new, *cleared]],
            # listed in neither ``notices`` nor ``text``: counted only
            "more": len(self.new) + len(self.cleared) - len(new) - len(cleared),
        }


class Channel(Protocol):
    """Where digests go."""

    name: str

    def send(self, digest: Digest) -> None:
        """Deliver ``digest`` or raise :class:`NotifyError`."""
        ...


class WebhookChannel:
    """POST the digest as JSON. The URL is a secret (chat webhooks carry their token in it):
    errors name its host only."""

    name = "webhook"

    def __init__(self, url: str, timeout_s: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigurationError(
                "CCAT_TRANSFER_NOTIFY_WEBHOOK_URL: not an http(s) URL with a host"
            )
        self.url = url
        self.host = parts.hostname
        self.timeout_s = timeout_s

    def send(self, digest: Digest) -> None:
        """POST the digest; anything but a 2xx answer is an error."""
        body = json.dumps(digest.payload()).encode()
        request = urllib.request.Request(  # noqa: S310 - http(s) checked in __init__
            self.url,
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "ccat-transfer-notify"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as answer:  # noqa: S310 - http(s) checked above
                answer.read(4096)
        except urllib.error.HTTPError as exc:
            said = exc.read(300).decode(errors="replace").strip()
            raise NotifyError(
                f"webhook at {self.host} answered {exc.code} {exc.reason}: {said}"
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise NotifyError(f"webhook at {self.host} not reached: {reason}") from None


class EmailChannel:
    """Send the digest as a plain-text e-mail over SMTP."""

    name = "email"

    def __init__(self, settings: TransferSettings) -> None:
        assert settings.notify_smtp_host is not None
        self.host = settings.notify_smtp_host
        self.port = settings.notify_smtp_port
        self.security = settings.notify_smtp_security
        self.user = settings.notify_smtp_user
        self.password = (
            settings.notify_smtp_password.get_secret_value()
            if settings.notify_smtp_password is not None
            else None
        )
        self.sender = settings.notify_email_from
        self.recipients = settings.notify_recipients
        self.timeout_s = settings.notify_timeout_s
        self.ca_file = settings.notify_smtp_ca_file

    def _context(self) -> ssl.SSLContext:
        """The TLS context (the system's CAs, or the CA file), built when a message is sent:
        the channels are made at every pass, most of which send nothing."""
        ca = self.ca_file
        return ssl.create_default_context(cafile=str(ca) if ca is not None else None)

    def message(self, digest: Digest) -> EmailMessage:
        """The e-mail of ``digest``."""
        msg = EmailMessage()
        msg["Subject"] = digest.subject
        msg["From"] = self.sender
        msg["To"] = ", ".join(self.recipients)
        msg["Date"] = formatdate(localtime=False, usegmt=True)
        msg["Message-ID"] = make_msgid(domain=self.sender.rpartition("@")[2] or None)
        msg["Auto-Submitted"] = "auto-generated"
        msg.set_content(digest.text())
        return msg

    def send(self, digest: Digest) -> None:
        """Connect, secure, log in if asked, send; any refusal is an error."""
        where = f"mail server {self.host}:{self.port}"
        try:
            if self.security == "ssl":
                smtp: smtplib.SMTP = smtplib.SMTP_SSL(
                    self.host,
                    self.port,
                    timeout=self.timeout_s,
                    context=self._context(),
                )
            else:
                smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout_s)
            with smtp:
                smtp.ehlo()
                if self.security == "starttls":
                    smtp.starttls(context=self._context())
                    smtp.ehlo()
                if self.user:
                    smtp.login(self.user, self.password or "")
                refused = smtp.send_message(self.message(digest))
        except smtplib.SMTPException as exc:
            raise NotifyError(f"{where} refused the notice: {exc}") from None
        except ssl.SSLCertVerificationError as exc:
            raise NotifyError(
                f"{where}: its certificate is not trusted ({exc.verify_message}); if an"
                " internal CA signed it, set CCAT_TRANSFER_NOTIFY_SMTP_CA_FILE to that CA"
            ) from None
        except OSError as exc:  # TimeoutError is one
            raise NotifyError(f"{where} not reached: {exc}") from None
        if refused:
            raise NotifyError(f"{where} refused the recipients {', '.join(sorted(refused))}")


def channels(settings: TransferSettings) -> list[Channel]:
    """The channels the settings configure (none: notices are only kept)."""
    out: list[Channel] = []
    if settings.notify_webhook_url is not None:
        out.append(
            WebhookChannel(
                settings.notify_webhook_url.get_secret_value(), settings.notify_timeout_s
            )
        )
    if settings.notify_smtp_host:
        out.append(EmailChannel(settings))
    return out


# --- reading the conditions ------------------------------------------------------------------


def _age(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 60:.0f} minutes"


#: FAILED records: per kind of record (data_transfer.state.KINDS), how a person calls it, the
#: column with a name for it, the join that column needs, and the location whose site acts.
def _failed_specs() -> list[tuple[str, str, Any, Any, Any, Any]]:
    from .state import KINDS as RECORDS

    dtp = aliased(DataTransferPackage)
    rdp = aliased(RawDataPackage)
    specs = {
        "raw_data_package": ("raw data package", RawDataPackage.name, None, "origin_location_id"),
        "data_transfer_package": (
            "transfer package",
            DataTransferPackage.name,
            None,
            "origin_location_id",
        ),
        "data_transfer": (
            "transfer of",
            dtp.name,
            (dtp, dtp.id == DataTransfer.data_transfer_package_id),
            "origin_location_id",
        ),
        "unpack": (
            "unpack of",
            dtp.name,
            (dtp, dtp.id == DataTransfer.data_transfer_package_id),
            "destination_location_id",
        ),
        "long_term_archive_transfer": (
            "archive transfer of",
            rdp.name,
            (rdp, rdp.id == LongTermArchiveTransfer.raw_data_package_id),
            "destination_location_id",
        ),
        "staging_job": ("staging job", StagingJob.name, None, "destination_location_id"),
    }
    out = []
    for record, (label, name_col, join, loc_attr) in specs.items():
        kind = RECORDS[record]
        out.append((record, label, kind, name_col, join, getattr(kind.model, loc_attr)))
    return out


def _failed(s: Session, where: dict[int, tuple[str, str]]) -> tuple[list[Condition], bool]:
    found: list[Condition] = []
    complete = True
    for record, label, kind, name_col, join, loc_col in _failed_specs():
        model = kind.model
        query = select(
            model.id,
            name_col,
            getattr(model, kind.retry_count),
            getattr(model, kind.failure_reason),
            getattr(model, kind.claim_count),
            loc_col,
        ).where(getattr(model, kind.status) == Status.FAILED)
        if join is not None:
            query = query.outerjoin(*join)
        rows = s.execute(query.order_by(model.id).limit(CAP + 1)).all()
        if len(rows) > CAP:
            complete, rows = False, rows[:CAP]
        for rid, name, tries, reason, claims, loc_id in rows:
            site, loc = where.get(loc_id, (None, None))
            shown = name or f"{record} {rid}"
            at = f" at {site}/{loc}" if site else ""
            found.append(
                Condition(
                    "failed",
                    # the claim counter tells this run from a later one: a record retried by
                    # an operator that fails again is a new notice
                    f"{record}:{rid}#{claims}",
                    site,
                    f"{label} {shown}{at} FAILED for good after {tries} attempt(s)",
                    reason or "(no reason recorded)",
                )
            )
    return found, complete


def _stranded(s: Session, where: dict[int, tuple[str, str]], now: dt.datetime) -> list[Condition]:
    rows = s.execute(
        select(
            DataTransferPackage.id, DataTransferPackage.name, DataTransferPackage.origin_location_id
        )
        .where(*stranded_condition(now))
        .order_by(DataTransferPackage.id)
        .limit(CAP)
    ).all()
    return [
        Condition(
            "stranded",
            f"data_transfer_package:{pid}",
            where.get(loc_id, (None, None))[0],
            f"transfer package {name}: every way to an archive site was cancelled",
            "It is kept and looked at again every CCAT_TRANSFER_PARTITION_RETRY_S: add a route "
            "or an archive site for it.",
        )
        for pid, name, loc_id in rows
    ]


def _bad_copies(s: Session, where: dict[int, tuple[str, str]]) -> list[Condition]:
    rows = s.execute(
        select(
            PhysicalCopy.id,
            PhysicalCopy.data_location_id,
            RawDataPackage.name,
            PhysicalCopy.failure_reason,
        )
        .join(RawDataPackage, RawDataPackage.id == PhysicalCopy.raw_data_package_id)
        .where(*_UNVERIFIED)
        .order_by(PhysicalCopy.id)
        .limit(CAP)
    ).all()
    out = []
    for cid, loc_id, name, reason in rows:
        site, loc = where.get(loc_id, (None, str(loc_id)))
        out.append(
            Condition(
                "bad_copy",
                f"physical_copy:{cid}",
                site,
                f"copy of raw data package {name} at {site}/{loc} failed its checksum and was "
                "not repaired",
                reason or "(no reason recorded)",
            )
        )
    return out


def _undeletable(s: Session, where: dict[int, tuple[str, str]]) -> list[Condition]:
    rows = s.execute(
        select(PhysicalCopy.data_location_id, func.count(), func.max(PhysicalCopy.failure_reason))
        .where(PhysicalCopy.status == PhysicalCopyStatus.DELETION_FAILED)
        .group_by(PhysicalCopy.data_location_id)
    ).all()
    out = []
    for loc_id, n, reason in rows:
        site, loc = where.get(loc_id, (None, str(loc_id)))
        out.append(
            Condition(
                "undeletable",
                f"location:{loc_id}",
                site,
                f"{n} copy(ies) at {site}/{loc} could not be deleted; the space is not freed",
                f"one reason: {reason}" if reason else None,
            )
        )
    return out


def _stuck(
    s: Session, where: dict[int, tuple[str, str]], now: dt.datetime, after_s: float
) -> list[Condition]:
    before = now - dt.timedelta(seconds=after_s)
    per_site: dict[str, tuple[int, dt.datetime, str, str]] = {}
    loc = RawDataPackage.origin_location_id
    # one read of the packages not archived: per SOURCE, how many are older than the limit
    # and which is the oldest
    ranked = (
        select(
            loc.label("loc_id"),
            RawDataPackage.name,
            RawDataPackage.state,
            RawDataPackage.created_at,
            func.count().over(partition_by=loc).label("n"),
            func.row_number()
            .over(partition_by=loc, order_by=(RawDataPackage.created_at, RawDataPackage.id))
            .label("r"),
        )
        .where(RawDataPackage.state != PackageState.ARCHIVED, RawDataPackage.created_at < before)
        .subquery()
    )
    rows = s.execute(
        select(
            ranked.c.loc_id, ranked.c.n, ranked.c.created_at, ranked.c.name, ranked.c.state
        ).where(ranked.c.r == 1)
    ).all()
    for loc_id, n, oldest, name, state in rows:
        site = where.get(loc_id, ("unknown", ""))[0]
        count, first, first_name, first_state = per_site.get(
            site, (0, _aware(oldest), name, str(state))
        )
        if _aware(oldest) < first:  # an older package at another SOURCE of the site
            first, first_name, first_state = _aware(oldest), name, str(state)
        per_site[site] = (count + int(n), first, first_name, first_state)
    return [
        Condition(
            "stuck",
            f"site:{site}",
            site,
            f"{n} raw data package(s) built at {site} not archived after "
            f"{_age(after_s)}; the oldest, {name}, is {state} since "
            f"{_age((now - oldest).total_seconds())}",
            "None of their SOURCE or BUFFER copies may be deleted until they are archived; "
            "the other notices and `ccat-transfer status` say where they are held.",
        )
        for site, (n, oldest, name, state) in sorted(per_site.items())
    ]


def conditions(
    engine: Engine, settings: TransferSettings, now: dt.datetime | None = None
) -> tuple[list[Condition], set[str]]:
    """Every problem that needs a person now, and the kinds read completely (a kind past
    :data:`CAP` is not, and nothing of it is cleared this pass)."""
    now = now or dt.datetime.now(dt.UTC)
    with Session(engine) as s:
        where = _locations(s)
        failed, failed_complete = _failed(s, where)
        found = [
            *failed,
            *_stranded(s, where, now),
            *_bad_copies(s, where),
            *_undeletable(s, where),
            *_stuck(s, where, now, settings.notify_stuck_after_s),
        ]
    complete = set(KINDS) - ({"failed"} if not failed_complete else set())
    for kind in ("stranded", "bad_copy"):
        if sum(1 for c in found if c.kind == kind) >= CAP:
            complete.discard(kind)
    return found, complete


# --- the pass ----------------------------------------------------------------------------------


@contextmanager
def _turn(engine: Engine) -> Iterator[bool]:
    """Hold the notify lock for the pass (PostgreSQL advisory lock; elsewhere always)."""
    if engine.dialect.name != "postgresql":
        yield True
        return
    own = not isinstance(engine, Connection)  # else a caller's connection (scale benchmark)
    with engine.connect() if own else nullcontext(engine) as conn:
        got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": _LOCK_KEY}).scalar())
        if own:
            conn.commit()
        try:
            yield got
        finally:
            if got:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _LOCK_KEY})
                if own:
                    conn.commit()


@dataclass
class NotifyReport:
    """What one notify pass did."""

    opened: int = 0
    cleared: int = 0
    pruned: int = 0
    sent: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: bool = False


class _Pace:
    """When each channel may be sent to next (in this process)."""

    def __init__(self) -> None:
        self._next: dict[str, float] = {}
        self._lock = threading.Lock()

    def due(self, channel: str, now: float) -> bool:
        with self._lock:
            return now >= self._next.get(channel, 0.0)

    def sent(self, channel: str, now: float, interval: float) -> None:
        with self._lock:
            self._next[channel] = now + interval

    def reset(self) -> None:
        with self._lock:
            self._next.clear()


PACE = _Pace()


def record(
    engine: Engine, found: Sequence[Condition], complete: set[str], now: dt.datetime
) -> tuple[int, int]:
    """Open a notice per new problem, refresh the open ones, clear those no longer found (of
    the kinds read completely). One transaction. Returns (opened, cleared)."""
    opened = cleared = 0
    with Session(engine) as s, s.begin():
        open_notices = {(n.kind, n.subject): n for n in s.scalars(OperatorNotice.newest())}
        for c in found:
            notice = open_notices.pop((c.kind, c.subject), None)
            text_now = (c.summary[:1000], c.detail, c.site)
            if notice is None:
                s.add(
                    OperatorNotice(
                        kind=c.kind,
                        subject=c.subject,
                        site=c.site,
                        summary=c.summary[:1000],
                        detail=c.detail,
                        first_seen_at=now,
                        last_seen_at=now,
                        delivered={},
                        cleared_delivered={},
                    )
                )
                opened += 1
            elif (notice.summary, notice.detail, notice.site) != text_now:
                notice.summary, notice.detail, notice.site = text_now
                notice.last_seen_at = now
            elif now - _aware(notice.last_seen_at) >= SEEN_REFRESH:
                notice.last_seen_at = now  # unchanged: written hourly, not at every pass
        for (kind, _subject), notice in open_notices.items():
            if kind in complete:
                notice.cleared_at = now
                cleared += 1
    return opened, cleared


def _items(notices: Sequence[OperatorNotice]) -> list[Item]:
    return [
        Item(
            n.kind,
            n.subject,
            n.site,
            n.summary,
            n.detail,
            _aware(n.first_seen_at),
            _aware(n.cleared_at) if n.cleared_at else None,
        )
        for n in sorted(notices, key=lambda n: (KINDS.index(n.kind), n.id))
    ]


def _due(
    opened: Sequence[OperatorNotice],
    recent: Sequence[OperatorNotice],
    channel: str,
    settings: TransferSettings,
    now: dt.datetime,
) -> tuple[list[OperatorNotice], list[OperatorNotice]]:
    """Of the open notices and those cleared lately: (openings due to ``channel``, clearings
    due to it: none unless ``notify_resolved``)."""
    held_since = now - dt.timedelta(seconds=settings.notify_hold_s)
    new = [
        n
        for n in opened
        if channel not in (n.delivered or {})
        and (n.kind == "failed" or _aware(n.first_seen_at) <= held_since)
    ]
    cleared = [
        n
        for n in (recent if settings.notify_resolved else ())
        if channel in (n.delivered or {}) and channel not in (n.cleared_delivered or {})
    ]
    return new, cleared


def last_told(channel: str, notices: Sequence[OperatorNotice]) -> dt.datetime | None:
    """When ``channel`` was last sent a digest, as far as the notices show (the newest stamp of
    an opening or a clearing told to it), so a restarted manager keeps the pace too."""
    stamps = [
        stamp
        for n in notices
        for stamp in ((n.delivered or {}).get(channel), (n.cleared_delivered or {}).get(channel))
        if stamp
    ]
    return max((dt.datetime.fromisoformat(x) for x in stamps), default=None)


def prune(engine: Engine, settings: TransferSettings, now: dt.datetime) -> int:
    """Delete notices cleared longer ago than ``notify_keep_cleared_s``, at most
    ``PRUNE_BATCH`` per pass (one transaction). Returns how many."""
    before = now - dt.timedelta(seconds=settings.notify_keep_cleared_s)
    with Session(engine) as s, s.begin():
        ids = (
            select(OperatorNotice.id)
            .where(OperatorNotice.cleared_at < before)
            .order_by(OperatorNotice.cleared_at)
            .limit(PRUNE_BATCH)
        )
        gone = s.execute(delete(OperatorNotice).where(OperatorNotice.id.in_(ids.scalar_subquery())))
        return gone.rowcount or 0


def _read(
    engine: Engine, now: dt.datetime
) -> tuple[Sequence[OperatorNotice], Sequence[OperatorNotice]]:
    """(the open notices, those cleared within ``CLEARED_DELIVERY_WINDOW``), detached."""
    with Session(engine) as s:
        opened = s.scalars(OperatorNotice.newest()).all()
        recent = s.scalars(
            select(OperatorNotice).where(OperatorNotice.cleared_at >= now - CLEARED_DELIVERY_WINDOW)
        ).all()
        s.expunge_all()
    return opened, recent


@dataclass
class ChannelStatus:
    """Where a channel stands: when it was last told, and what is due to it and not told."""

    name: str
    last_told: dt.datetime | None
    due: int
    oldest_due: dt.datetime | None


def channel_status(
    engine: Engine, settings: TransferSettings, now: dt.datetime | None = None
) -> list[ChannelStatus]:
    """Each configured channel's status, from the notices (the same reading ``deliver``
    makes): a channel that cannot be reached shows as notices due and not told."""
    now = now or dt.datetime.now(dt.UTC)
    opened, recent = _read(engine, now)
    out = []
    for channel in channels(settings):
        new, cleared = _due(opened, recent, channel.name, settings, now)
        due = [*new, *cleared]
        out.append(
            ChannelStatus(
                channel.name,
                last_told(channel.name, [*opened, *recent]),
                len(due),
                min((_aware(n.first_seen_at) for n in due), default=None),
            )
        )
    return out


def deliver(
    engine: Engine,
    settings: TransferSettings,
    targets: Sequence[Channel],
    now: dt.datetime,
    report: NotifyReport,
) -> None:
    """Send each channel its digest of what is due to it, and record what it was told."""
    tick = time.monotonic()
    opened, recent = _read(engine, now)  # once for every channel
    pace = dt.timedelta(seconds=settings.notify_min_interval_s)
    for channel in targets:
        new, cleared = _due(opened, recent, channel.name, settings, now)
        _UNDELIVERED.labels(channel.name).set(len(new) + len(cleared))
        if not (new or cleared) or not PACE.due(channel.name, tick):
            continue
        told = last_told(channel.name, [*opened, *recent])
        if told is not None and told <= now < told + pace:
            continue  # told by an earlier process (a restart) within the interval
        digest = Digest(
            new=_items(new),
            cleared=_items(cleared),
            still_open=len(opened),
            max_items=settings.notify_max_items,
            at=now,
        )
        ids_new = [n.id for n in new]
        ids_cleared = [n.id for n in cleared]
        PACE.sent(channel.name, tick, settings.notify_min_interval_s)
        try:
            channel.send(digest)
        except NotifyError as exc:
            _SENT.labels(channel.name, "failed").inc()
            report.failed[channel.name] = str(exc)
            log.warning(
                "notify: %s: %s; tried again in %.0f s",
                channel.name,
                exc,
                settings.notify_min_interval_s,
                extra={"channel": channel.name},
            )
            continue
        _SENT.labels(channel.name, "sent").inc()
        stamp = now.isoformat()
        with Session(engine) as s, s.begin():
            for n in s.scalars(select(OperatorNotice).where(OperatorNotice.id.in_(ids_new))):
                n.delivered = {**(n.delivered or {}), channel.name: stamp}
            for n in s.scalars(select(OperatorNotice).where(OperatorNotice.id.in_(ids_cleared))):
                n.cleared_delivered = {**(n.cleared_delivered or {}), channel.name: stamp}
        _UNDELIVERED.labels(channel.name).set(0)
        report.sent[channel.name] = len(ids_new) + len(ids_cleared)
        log.info(
            "notify: %s told of %d new and %d cleared problem(s)",
            channel.name,
            len(ids_new),
            len(ids_cleared),
            extra={"channel": channel.name},
        )


def run_notify_pass(
    engine: Engine,
    settings: TransferSettings,
    *,
    targets: Sequence[Channel] | None = None,
    now: dt.datetime | None = None,
) -> NotifyReport:
    """One pass: read the problems, record them as notices, send what is due."""
    now = now or dt.datetime.now(dt.UTC)
    report = NotifyReport()
    targets = channels(settings) if targets is None else targets
    with _turn(engine) as mine:
        if not mine:
            report.skipped = True
            return report
        found, complete = conditions(engine, settings, now)
        report.opened, report.cleared = record(engine, found, complete, now)
        report.pruned = prune(engine, settings, now)
        if report.pruned:
            log.info("notify: deleted %d notice(s) cleared long ago", report.pruned)
        for kind in KINDS:
            _OPEN.labels(kind).set(sum(1 for c in found if c.kind == kind))
        if targets:
            deliver(engine, settings, targets, now, report)
    return report


def send_test(settings: TransferSettings) -> dict[str, str | None]:
    """Send a test digest through every configured channel: channel -> error (None: sent)."""
    digest = Digest(
        new=[
            Item(
                "failed",
                "test",
                None,
                "a test notice from `ccat-transfer notify-test`: nothing is wrong",
                "If you read this, notices reach you through this channel.",
                dt.datetime.now(dt.UTC),
            )
        ],
        title="test notice",
    )
    out: dict[str, str | None] = {}
    for channel in channels(settings):
        try:
            channel.send(digest)
            out[channel.name] = None
        except NotifyError as exc:
            out[channel.name] = str(exc)
    return out


def open_notices(engine: Engine, *, include_cleared: bool = False, limit: int = 50) -> list[Any]:
    """Notices for a person, newest first: the open ones (and the cleared ones with
    ``include_cleared``)."""
    with Session(engine) as s:
        rows = s.scalars(OperatorNotice.newest(include_cleared=include_cleared).limit(limit)).all()
        s.expunge_all()
        return list(rows)
