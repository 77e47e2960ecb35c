"""``ccat-dc``: the whole data center on this machine (demo, up, status, down).

Everything goes under one folder (``--home``, default ``./.ccat-demo``): the PostgreSQL data,
the site folders, the logs. ``CCAT_OPS_DB_URL`` / ``CCAT_TRANSFER_BROKER_URL`` use real servers
instead of the ones started from wheels.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .stack import LocalDataCenter, wipe

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)
console = Console()
err = Console(stderr=True)

Home = Annotated[Path, typer.Option("--home", help="folder for everything the stack writes")]


class _StopError(Exception):
    """SIGTERM: stop like Ctrl-C."""


def _on_signal(*_: object) -> None:
    raise _StopError()


def _start(home: Path, fresh: bool) -> LocalDataCenter:
    if fresh:
        wipe(home)
    home.mkdir(parents=True, exist_ok=True)
    state = home / "stack.json"
    if state.exists():
        pid = json.loads(state.read_text()).get("pid")
        if pid and _alive(pid):
            err.print(
                f"[red]error:[/red] a stack already runs from {home} (pid {pid}); "
                "`ccat-dc down` first"
            )
            raise typer.Exit(2)
        state.unlink()
    dc = LocalDataCenter(
        home=home.resolve(),
        db_url=os.environ.get("CCAT_OPS_DB_URL"),
        broker_url=os.environ.get("CCAT_TRANSFER_BROKER_URL"),
    )
    with console.status("starting PostgreSQL ..."):
        dc.start_database()
    console.print(f"database  {dc.db_url.split('?')[0] if dc.db_url else ''}", highlight=False)
    with console.status("starting Redis ..."):
        dc.start_broker()
    console.print(f"broker    {dc.broker_url}", highlight=False)
    with console.status("seeding the reference topology ..."):
        dc.seed()
    with console.status("starting the API, three site workers and the managers ..."):
        dc.start_services()
    console.print(f"API       {dc.api_url}  (docs: {dc.api_url}/docs)", highlight=False)
    console.print(
        f"status    {dc.api_url}/ui  (sign in with a read-scope token: docs/observability.md)",
        highlight=False,
    )
    console.print(f"logs      {dc.home / 'logs'}", highlight=False)
    return dc


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@app.command()
def demo(
    home: Home = Path(".ccat-demo"),
    files: Annotated[int, typer.Option(min=1, help="files the simulated instrument writes")] = 500,
    size: Annotated[float, typer.Option(min=0.001, help="total size in MB")] = 300.0,
    observations: Annotated[int, typer.Option(min=1, help="observations to spread them over")] = 12,
    fresh: Annotated[bool, typer.Option("--fresh", help="delete the folder first")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the pipeline")] = 900.0,
) -> None:
    """Start the local data center, file data from a simulated instrument, follow it to the
    archives, stage one package, clean up, print a summary; exit 0 only if all of it worked."""
    from .demo import DemoOptions, print_summary, run_demo

    signal.signal(signal.SIGTERM, _on_signal)
    started = time.monotonic()
    dc: LocalDataCenter | None = None
    try:
        dc = _start(home, fresh)
        result = run_demo(
            home,
            DemoOptions(files=files, size_mb=size, observations=observations, timeout_s=timeout),
            console,
            dc,
        )
    except (KeyboardInterrupt, _StopError):
        err.print("interrupted: stopping every process the demo started")
        raise typer.Exit(130) from None
    except RuntimeError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    finally:
        if dc is not None:
            with console.status("stopping ..."):
                dc.stop()
    print_summary(console, result)
    console.print(f"total {time.monotonic() - started:.0f} s; everything is under {home}")
    raise typer.Exit(0 if result.ok else 1)


@app.command()
def up(
    home: Home = Path(".ccat-demo"), fresh: Annotated[bool, typer.Option("--fresh")] = False
) -> None:
    """Start the local stack and keep it running until Ctrl-C or `ccat-dc down`."""
    signal.signal(signal.SIGTERM, _on_signal)
    dc: LocalDataCenter | None = None
    try:
        dc = _start(home, fresh)
        console.print(
            "running: Ctrl-C or `ccat-dc down` stops it; `ccat-dc status` shows the pipeline"
        )
        while True:
            dc.check_children()
            time.sleep(1)
    except (KeyboardInterrupt, _StopError):
        pass
    except RuntimeError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    finally:
        if dc is not None:
            dc.stop()
            console.print("stopped")


@app.command()
def status(home: Home = Path(".ccat-demo")) -> None:
    """The pipeline summary of the running stack (or of CCAT_OPS_DB_URL)."""
    state = home / "stack.json"
    db_url = os.environ.get("CCAT_OPS_DB_URL")
    if db_url is None:
        if not state.exists():
            err.print(f"no stack runs from {home} (start one with `ccat-dc up`)")
            raise typer.Exit(1)
        db_url = json.loads(state.read_text())["db_url"]
    os.environ["CCAT_OPS_DB_URL"] = db_url
    from data_transfer.cli import status as transfer_status

    transfer_status()


@app.command()
def down(home: Home = Path(".ccat-demo")) -> None:
    """Stop the stack that `ccat-dc up` started from this folder."""
    state = home / "stack.json"
    if not state.exists():
        console.print(f"nothing runs from {home}")
        return
    info = json.loads(state.read_text())
    pid = info.get("pid")
    if pid and _alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    for name, child in (info.get("children") or {}).items():
        if _alive(child):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child, signal.SIGTERM)
            console.print(f"stopped {name}")
    state.unlink(missing_ok=True)
    console.print("down")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())
