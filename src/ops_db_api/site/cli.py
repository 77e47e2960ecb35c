"""``ccat-api buffer ...``: the observatory buffer for operators (status, replay, parked)."""

from __future__ import annotations

import json
import logging
import signal
import threading
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..settings import ApiSettings
from .buffer import SiteBuffer

buffer_app = typer.Typer(
    help="The observatory's write buffer: status, replay to the main site, parked writes.",
    no_args_is_help=True,
)
park_app = typer.Typer(help="Writes the main site refused (kept with their reason).")
buffer_app.add_typer(park_app, name="park")

console = Console()
err = Console(stderr=True)


def _buffer(settings: ApiSettings) -> SiteBuffer:
    if settings.buffer_url is None:
        err.print("[red]error:[/] CCAT_API_BUFFER_URL is not set (the observatory buffer database)")
        raise typer.Exit(2)
    buffer = SiteBuffer(settings.buffer_url.get_secret_value())
    buffer.create_schema()
    return buffer


JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@buffer_app.command()
def status(as_json: JsonOpt = False) -> None:
    """Depth, oldest pending write, parked writes, replay totals and rate, last error."""
    buffer = _buffer(ApiSettings())
    s = buffer.status()
    buffer.dispose()
    if as_json:
        typer.echo(json.dumps(s.as_dict(), indent=2))
        return
    table = Table(title="observatory buffer", show_header=False)
    for key, value in s.as_dict().items():
        table.add_row(key, "-" if value is None else str(value))
    console.print(table)


@buffer_app.command()
def replay(
    follow: Annotated[
        bool, typer.Option("--follow", help="Keep draining (the replayer service).")
    ] = False,
    metrics_port: Annotated[
        int | None, typer.Option(help="With --follow: serve /metrics on 127.0.0.1:PORT.")
    ] = None,
) -> None:
    """Send the buffered writes to the main API (CCAT_API_MAIN_URL, CCAT_API_MAIN_TOKEN)."""
    from .replayer import Replayer, ReplayerBusyError

    settings = ApiSettings()
    if not settings.main_url or settings.main_token is None:
        err.print("[red]error:[/] set CCAT_API_MAIN_URL and CCAT_API_MAIN_TOKEN (a `file` token)")
        raise typer.Exit(2)
    logging.basicConfig(level=settings.log_level.upper())
    buffer = _buffer(settings)
    if follow:
        _follow(buffer, settings, metrics_port)
        return
    depth = buffer.status().depth
    with Progress(
        TextColumn("replaying"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as progress:
        task = progress.add_task("replay", total=depth)
        replayer = Replayer(
            buffer,
            settings.main_url,
            settings.main_token.get_secret_value(),
            batch_size=settings.replay_batch_size,
            on_sent=lambda ok, parked: progress.advance(task, ok + parked),
        )
        try:
            with replayer.lock():
                done = replayer.drain_once()
        except ReplayerBusyError as exc:
            err.print(f"[red]error:[/] {exc}")
            raise typer.Exit(3) from exc
        finally:
            replayer.close()
    left = buffer.status()
    buffer.dispose()
    console.print(
        f"replayed {done.replayed}, parked {done.parked}, in {done.requests} request(s); "
        f"{left.depth} still buffered, {left.parked} parked in all"
    )
    if done.error:
        err.print(f"[red]main site unreachable:[/] {done.error}")
        raise typer.Exit(1)


def _follow(buffer: SiteBuffer, settings: ApiSettings, metrics_port: int | None) -> None:
    from .replayer import Replayer, ReplayerBusyError

    assert settings.main_url
    assert settings.main_token is not None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    replayer = Replayer(
        buffer,
        settings.main_url,
        settings.main_token.get_secret_value(),
        batch_size=settings.replay_batch_size,
        backoff_max_s=settings.replay_backoff_max_s,
        retention_s=settings.buffer_retention_s,
    )
    if metrics_port is not None:
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        from .metrics import BufferCollector

        registry = CollectorRegistry()
        registry.register(BufferCollector(buffer))
        Gauge("ccat_replayer_up", "1 while the replayer runs.", registry=registry).set(1)
        Gauge(
            "ccat_replayer_consecutive_failures",
            "Failed replay passes in a row (the link is down while this grows).",
            registry=registry,
        ).set_function(lambda: replayer.failures)
        start_http_server(metrics_port, addr="127.0.0.1", registry=registry)
    try:
        with replayer.lock(wait_until=stop):
            logging.getLogger("ops_db_api.site.replayer").info(
                "replayer started", extra={"main_url": settings.main_url}
            )
            replayer.follow(stop)
    except ReplayerBusyError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(3) from exc
    finally:
        replayer.close()
        buffer.dispose()
    console.print(f"replayer stopped: {replayer.stats}")


@park_app.command("list")
def park_list(
    as_json: JsonOpt = False,
    limit: Annotated[int, typer.Option(min=1, help="At most this many.")] = 1000,
) -> None:
    """Parked writes, oldest first, with the main site's reason."""
    buffer = _buffer(ApiSettings())
    rows = buffer.parked(limit)
    buffer.dispose()
    if as_json:
        typer.echo(json.dumps([r.as_dict() for r in rows], indent=2))
        return
    table = Table(title=f"{len(rows)} parked write(s)")
    for col in ("seq", "kind", "id", "parked at", "reason"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            str(r.seq),
            r.kind,
            str(r.item_id),
            r.parked_at.isoformat() if r.parked_at else "-",
            r.park_reason or "-",
        )
    console.print(table)


@park_app.command("retry")
def park_retry(
    seq: Annotated[
        int | None, typer.Argument(help="The parked write's seq (see park list).")
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every parked write.")] = False,
) -> None:
    """Queue a parked write (or --all) for replay again, after fixing the cause."""
    if (seq is None) == (not all_):
        err.print("[red]error:[/] give a SEQ or --all")
        raise typer.Exit(2)
    buffer = _buffer(ApiSettings())
    n = buffer.retry_parked(seq)
    buffer.dispose()
    if seq is not None and n == 0:
        err.print(f"[red]error:[/] no parked write with seq {seq}")
        raise typer.Exit(1)
    console.print(f"{n} write(s) queued for replay again")
