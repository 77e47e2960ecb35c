"""``ccat-transfer``: workers, managers, queues and the pipeline's state from the command line.

The database comes from ``CCAT_OPS_DB_*``, the broker and every other knob from
``CCAT_TRANSFER_*`` (see :mod:`data_transfer.settings`).
"""

from __future__ import annotations

import signal
import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from ccat_ops_db.config import ConfigurationError as DbConfigurationError
from ccat_ops_db.enums import Status

from .errors import ConfigurationError
from .managers import MANAGERS, run_loop, run_pass
from .queues import discover_queues
from .settings import load_transfer_settings

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)
console = Console()
err = Console(stderr=True)


def _engine() -> Engine:
    from ccat_ops_db.db import make_engine

    return make_engine()


def _fail(exc: Exception) -> None:
    err.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(2)


def _logging(level: str, service: str = "transfer") -> None:
    """Structured logs (CCAT_LOG_FORMAT: json, the default for services, or text)."""
    from ccat_ops_db.logs import setup_logging

    setup_logging(level=level.upper(), service=service)


@app.command()
def queues(
    site: Annotated[str | None, typer.Option(help="only this site (short name)")] = None,
    location: Annotated[list[str] | None, typer.Option(help="only these locations")] = None,
    plain: Annotated[bool, typer.Option(help="names only, one per line")] = False,
) -> None:
    """Print the queues derived from the database (what a worker would listen to)."""
    try:
        with Session(_engine()) as s:
            found = discover_queues(s, site=site, locations=location)
    except (ConfigurationError, DbConfigurationError) as exc:
        _fail(exc)
        return
    if plain:
        for q in found:
            console.print(q.name, highlight=False)
        return
    table = Table(title="Transfer queues")
    for col in ("queue", "site", "location", "type", "operation"):
        table.add_column(col)
    for q in found:
        table.add_row(q.name, q.site, q.location, q.location_type, q.operation.value)
    console.print(table)
    console.print(f"{len(found)} queues")


def _discover_waiting(site: str, locations: list[str] | None, wait_s: float) -> list[Any]:
    """The worker's queues, read from the database; while the database does not answer (a
    host or a cluster starting all at once), retry every 2 s for up to ``wait_s`` seconds, then
    fail with an error that says what to check."""
    from sqlalchemy.exc import OperationalError

    deadline = time.monotonic() + wait_s
    engine = _engine()
    try:
        while True:
            try:
                with Session(engine) as s:
                    return discover_queues(s, site=site, locations=locations)
            except OperationalError as exc:
                reason = str(exc.orig or exc).strip().splitlines()[0][:300]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ConfigurationError(
                        f"the operations database did not answer within {wait_s:.0f} s "
                        f"({reason}); check CCAT_OPS_DB_URL and that PostgreSQL is running"
                    ) from None
                err.print(
                    f"waiting for the operations database ({reason}); giving up in {left:.0f} s"
                )
                time.sleep(min(2.0, max(left, 0.1)))
    finally:
        engine.dispose()


@app.command()
def worker(
    site: Annotated[str, typer.Option(help="site short name, e.g. ccat")],
    location: Annotated[
        list[str] | None, typer.Option(help="locations this host can reach (default: all)")
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="parallel tasks")] = 2,
    pool: Annotated[str, typer.Option(help="celery pool: threads, prefork or solo")] = "threads",
    loglevel: Annotated[str, typer.Option()] = "INFO",
    db_wait: Annotated[
        float,
        typer.Option(
            min=0, help="seconds to wait for the operations database at start (it may start later)"
        ),
    ] = 60.0,
) -> None:
    """Start a Celery worker listening to exactly the queues of these locations."""
    try:
        settings = load_transfer_settings()
        found = _discover_waiting(site, location, db_wait)
    except (ConfigurationError, DbConfigurationError) as exc:
        _fail(exc)
        return
    if not found:
        _fail(ConfigurationError(f"no queues for site {site!r} and locations {location}"))
    from . import metrics
    from .celery_app import make_celery

    if settings.metrics_port:
        metrics.serve(
            settings.metrics_port,
            settings.metrics_host,
            worker_site=site,
            worker_locations=location,
        )
    from celery.signals import setup_logging as celery_setup_logging

    # a receiver of this signal stops Celery from configuring logging itself: ours is used
    celery_setup_logging.connect(lambda **_: _logging(loglevel, "worker"), weak=False)
    celery = make_celery(settings)
    names = sorted({q.name for q in found})
    err.print(f"worker for {site}/{','.join(location or ['*'])}: {len(names)} queues")
    tag = "-".join(location or ["all"])
    celery.worker_main(
        argv=[
            "worker",
            "-Q",
            ",".join(names),
            "-n",
            f"{site}-{tag}@%h",
            "--pool",
            pool,
            "-c",
            str(concurrency),
            "--loglevel",
            loglevel,
            "--without-gossip",
            "--without-mingle",
        ]
    )


@app.command()
def manager(
    name: Annotated[
        str, typer.Argument(help=f"one of: {', '.join(MANAGERS)}, or all (one process)")
    ],
    once: Annotated[bool, typer.Option("--once", help="one pass, then exit")] = False,
    loglevel: Annotated[str, typer.Option()] = "INFO",
) -> None:
    """Run one stage's manager as a loop (or one pass with --once)."""
    if name not in MANAGERS and name != "all":
        _fail(ConfigurationError(f"unknown manager {name!r} (known: {', '.join(MANAGERS)})"))
    _logging(loglevel, f"manager-{name}")
    try:
        settings = load_transfer_settings()
        engine = _engine()
    except (ConfigurationError, DbConfigurationError) as exc:
        _fail(exc)
        return
    from . import metrics
    from .celery_app import CeleryDispatcher, make_celery
    from .heartbeat import RedisHeartbeats

    dispatcher = CeleryDispatcher(make_celery(settings))
    heartbeats = RedisHeartbeats(settings.heartbeat_redis_url)
    if once:
        report = run_pass(name, engine, settings, dispatcher, heartbeats)
        console.print(str(report), highlight=False)
        return
    if settings.metrics_port:
        metrics.serve(settings.metrics_port, settings.metrics_host, engine)
    stop = {"flag": False}

    def _stop(*_: object) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    err.print(f"manager {name}: every {settings.manager_sleep_s:g} s (Ctrl-C stops)")
    from ccat_ops_db.logs import bind

    bind(manager=name)
    run_loop(
        name, engine, settings, dispatcher, heartbeats=heartbeats, should_stop=lambda: stop["flag"]
    )


@app.command("run-once")
def run_once(
    inline: Annotated[
        bool, typer.Option(help="run the tasks in this process instead of sending them")
    ] = False,
) -> None:
    """Every manager one pass, in pipeline order."""
    try:
        settings = load_transfer_settings()
        engine = _engine()
    except (ConfigurationError, DbConfigurationError) as exc:
        _fail(exc)
        return
    table = Table(title="Manager passes")
    for col in ("manager", "created", "scheduled", "notes"):
        table.add_column(col)
    if inline:
        from .inline import QueueDispatcher, run_all_once
        from .operations import Context

        reports = run_all_once(Context(engine=engine, settings=settings), QueueDispatcher())
    else:
        from .celery_app import CeleryDispatcher, make_celery
        from .heartbeat import RedisHeartbeats

        dispatcher = CeleryDispatcher(make_celery(settings))
        hb = RedisHeartbeats(settings.heartbeat_redis_url)
        reports = [run_pass(n, engine, settings, dispatcher, hb) for n in MANAGERS]
    for r in reports:
        table.add_row(r.manager, str(r.created), str(r.scheduled), "; ".join(r.notes)[:80])
    console.print(table)


@app.command()
def status(
    limit: Annotated[int, typer.Option(min=1, help="rows at most per list")] = 20,
) -> None:
    """Records per stage and status, the failures with their reasons, what is waiting or
    retrying with its last reason, and what an operator cancelled; then each failed record
    with its reason and log path, and what holds data back from the archive: the oldest
    package not archived per site, transfer packages with nowhere to go, bad copies, copies
    that could not be deleted."""
    from .metrics import failed_records, failure_reasons, holdup_details, pipeline_counts

    try:
        engine = _engine()
        counts = pipeline_counts(engine)
        reasons = failure_reasons(engine)
        waiting = failure_reasons(engine, ("pending", "scheduled"))
        cancelled = failure_reasons(engine, ("cancelled",))
        failed = failed_records(engine, limit)
        held = holdup_details(engine, limit)
    except (ConfigurationError, DbConfigurationError) as exc:
        _fail(exc)
        return
    table = Table(title="Pipeline")
    cols = [str(st) for st in Status]
    table.add_column("stage")
    for c in cols:
        table.add_column(c, justify="right")
    for stage_name, by in counts.items():
        table.add_row(stage_name, *(str(by.get(c, 0)) for c in cols))
    console.print(table)
    for title, by_reason in (
        ("Failed, by reason", reasons),
        ("Waiting or retrying, by last reason", waiting),
        ("Cancelled (given up by an operator), by whom", cancelled),
    ):
        if by_reason:
            t2 = Table(title=title)
            for c in ("stage", "reason", "count"):
                t2.add_column(c)
            for (stage_name, reason), n in sorted(by_reason.items()):
                t2.add_row(stage_name, reason, str(n))
            console.print(t2)
    lists: list[tuple[str, tuple[str, ...], list[tuple[str, ...]]]] = [
        (
            f"Failed records (latest {limit} per stage)",
            ("stage", "id", "record", "reason (log)"),
            [(st, str(i), name, why) for st, i, name, why in failed],
        ),
        (
            "Oldest raw data package not archived, per site",
            ("site", "package", "state", "built"),
            held["oldest"],
        ),
        (
            "Transfer packages with no archive site left (given up everywhere)",
            ("site", "transfer package", "looked at again"),
            held["stranded"],
        ),
        (
            "Package copies that failed verification and were not repaired",
            ("site", "location", "package", "what was found"),
            held["bad"],
        ),
        (
            "Copies that could not be deleted",
            ("site", "location", "copies", "a reason"),
            held["undeletable"],
        ),
    ]
    for title, columns, rows in lists:
        if rows:
            t3 = Table(title=title)
            for c in columns:
                t3.add_column(c, overflow="fold")
            for row in rows:
                t3.add_row(*row)
            console.print(t3)


@app.command()
def notices(
    cleared: Annotated[bool, typer.Option("--cleared", help="also the cleared ones")] = False,
    limit: Annotated[int, typer.Option(min=1, help="rows at most")] = 50,
) -> None:
    """Operator notices: what needs a person (records FAILED for good, transfer packages with
    no archive site left, bad copies not repaired, copies that cannot be deleted, sites whose
    data is not archived), since when, and which channels were told."""
    from .notify import KINDS, open_notices

    try:
        rows = open_notices(_engine(), include_cleared=cleared, limit=limit)
    except (ConfigurationError, DbConfigurationError) as exc:
        _fail(exc)
        return
    table = Table(title="Operator notices" + (" (open and cleared)" if cleared else " (open)"))
    for c in ("kind", "site", "what", "since", "cleared", "told"):
        table.add_column(c, overflow="fold")
    for n in rows:
        told = ", ".join(sorted(n.delivered or {})) or "-"
        if n.cleared_at is not None and n.cleared_delivered:
            told += " (cleared: " + ", ".join(sorted(n.cleared_delivered)) + ")"
        table.add_row(
            n.kind,
            n.site or "-",
            n.summary + (f"\n{n.detail}" if n.detail else ""),
            f"{n.first_seen_at:%Y-%m-%d %H:%M}",
            f"{n.cleared_at:%Y-%m-%d %H:%M}" if n.cleared_at else "-",
            told,
        )
    console.print(table)
    open_now = sum(1 for n in rows if n.cleared_at is None)
    console.print(
        f"{open_now} open notice(s) shown; kinds: {', '.join(KINDS)}. "
        'What to do per kind: docs/data-transfer.md, "Operator notifications".',
        highlight=False,
    )
    _print_channels()


def _print_channels() -> None:
    """Where each notification channel stands (the settings of this process name them)."""
    from .notify import channel_status

    try:
        status = channel_status(_engine(), load_transfer_settings())
    except ConfigurationError as exc:
        console.print(f"channels: not read: {exc}", highlight=False)
        return
    if not status:
        console.print(
            "channels: none configured here (CCAT_TRANSFER_NOTIFY_*): the notices are only kept",
            highlight=False,
        )
    for c in status:
        told = f"last told {c.last_told:%Y-%m-%d %H:%M} UTC" if c.last_told else "never told"
        if c.due and c.oldest_due is not None:
            console.print(
                f"[yellow]channel {c.name}: {c.due} notice(s) due and not told, the oldest "
                f"since {c.oldest_due:%Y-%m-%d %H:%M} UTC; {told}[/yellow] (a failed send is "
                "in the notify manager's log; `ccat-transfer notify-test` tries the channel)",
                highlight=False,
            )
        else:
            console.print(f"channel {c.name}: nothing due; {told}", highlight=False)


@app.command("notify-test")
def notify_test() -> None:
    """Send a test notice through every configured channel (CCAT_TRANSFER_NOTIFY_*) and say
    what each did; exit 1 if none is configured or one failed."""
    from .notify import send_test

    try:
        settings = load_transfer_settings()
        results = send_test(settings)
    except ConfigurationError as exc:
        _fail(exc)
        return
    if not results:
        _fail(
            ConfigurationError(
                "no notification channel is configured: set CCAT_TRANSFER_NOTIFY_WEBHOOK_URL"
                " or CCAT_TRANSFER_NOTIFY_SMTP_HOST and CCAT_TRANSFER_NOTIFY_EMAIL_TO"
            )
        )
        return
    for name, error in results.items():
        if error is None:
            console.print(f"sent    {name}", highlight=False)
        else:
            console.print(f"[red]failed[/red]  {name}: {error}", highlight=False)
    if any(error is not None for error in results.values()):
        raise typer.Exit(1)


@app.command()
def health(
    expect: Annotated[
        list[str] | None, typer.Option(help="service names that must be alive (exit 1 if not)")
    ] = None,
) -> None:
    """Live services (managers and workers) from their Redis health keys."""
    from .heartbeat import SERVICE_PREFIX, RedisHeartbeats

    try:
        settings = load_transfer_settings()
        alive = [
            k.removeprefix(SERVICE_PREFIX)
            for k in RedisHeartbeats(settings.heartbeat_redis_url).keys(SERVICE_PREFIX)
        ]
    except Exception as exc:  # Redis unreachable is the answer here, not a crash
        _fail(ConfigurationError(f"cannot read health keys: {type(exc).__name__}: {exc}"))
        return
    for name in alive:
        console.print(f"alive  {name}", highlight=False)
    missing = [n for n in (expect or []) if not any(a.startswith(n) for a in alive)]
    for name in missing:
        console.print(f"[red]dead[/red]   {name}", highlight=False)
    if missing:
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
