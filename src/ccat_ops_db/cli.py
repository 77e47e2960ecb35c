"""``ccat-ops-db``: migrate, check, seed and administer the operations database.

Every command reads the database from the ``CCAT_OPS_DB_*`` settings (``--url`` overrides).
Errors end in one line on stderr naming what is wrong (passwords masked) and a non-zero exit:
2 for configuration/input errors, 1 for a database or runtime failure.
"""

from __future__ import annotations

import datetime as dt
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError

from . import __version__
from .config import ConfigurationError, load_settings, mask_url
from .db import make_engine, session_scope

app = typer.Typer(
    name="ccat-ops-db",
    help="Operations database of the CCAT data center: migrations, reference data, users.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
user_app = typer.Typer(help="Manage API users and their roles.", no_args_is_help=True)
token_app = typer.Typer(help="Manage API tokens (a token is printed once).", no_args_is_help=True)
app.add_typer(user_app, name="user")
app.add_typer(token_app, name="token")

# Not a terminal (make, CI, pipes): wide enough that tables are not cut.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True)
_state: dict[str, Any] = {"url": None}

F = TypeVar("F", bound=Callable[..., Any])


class CliError(Exception):
    """A user-facing error with an exit code."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def _one_line(text: str, secret: str | None = None) -> str:
    line = " ".join(text.strip().split())
    if secret:
        line = line.replace(secret, "***")
    return line


def handle_errors(fn: F) -> F:
    """Turn known failures into a one-line message and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .migrate import BackupError

        secret = None
        try:
            url = _state.get("url") or load_settings().sqlalchemy_url()
            secret = getattr(url, "password", None) if not isinstance(url, str) else None
        except Exception:  # noqa: S110 - only used to mask the password in messages
            pass
        try:
            return fn(*args, **kwargs)
        except CliError as exc:
            err.print(f"[red]error:[/] {_one_line(str(exc), secret)}", highlight=False)
            raise typer.Exit(exc.code) from None
        except ConfigurationError as exc:
            err.print(f"[red]configuration error:[/] {_one_line(str(exc), secret)}")
            raise typer.Exit(2) from None
        except (ArgumentError, NoSuchModuleError) as exc:
            err.print(f"[red]configuration error:[/] bad database URL: {_one_line(str(exc))}")
            raise typer.Exit(2) from None
        except BackupError as exc:
            err.print(
                f"[red]backup failed, nothing migrated:[/] {_one_line(str(exc), secret)}",
                highlight=False,
            )
            raise typer.Exit(1) from None
        except DBAPIError as exc:
            where = _target()
            reason = _one_line(str(exc.orig).splitlines()[0] if exc.orig else str(exc), secret)
            err.print(f"[red]database error[/] ({where}): {reason}", highlight=False)
            raise typer.Exit(1) from None
        except SQLAlchemyError as exc:
            err.print(f"[red]database error[/] ({_target()}): {_one_line(str(exc), secret)}")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _target() -> str:
    try:
        return mask_url(_state.get("url") or load_settings().sqlalchemy_url())
    except Exception:
        return "database"


def _engine() -> Engine:
    return make_engine(_state.get("url"), null_pool=True)


@app.callback()
def main_callback(
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            envvar="CCAT_OPS_DB_URL",
            help="Database URL (default: the CCAT_OPS_DB_* settings).",
            show_envvar=True,
        ),
    ] = None,
) -> None:
    """Operations database of the CCAT data center."""
    _state["url"] = url


# --- schema -------------------------------------------------------------------------------


@app.command()
@handle_errors
def migrate(
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
    sql: Annotated[
        bool, typer.Option("--sql", help="Print the SQL instead of running it.")
    ] = False,
    no_backup: Annotated[
        bool, typer.Option("--no-backup", help="Skip the pre-migration pg_dump in production.")
    ] = False,
) -> None:
    """Upgrade the schema (a non-empty production PostgreSQL is backed up with pg_dump first)."""
    from . import migrate as mig

    if sql:
        sys.stdout.write(mig.upgrade_sql(_state.get("url"), revision))
        return
    settings = load_settings()
    with out.status(f"migrating {_target()} …"):
        res = mig.migrate(
            _state.get("url"), revision, backup_enabled=not no_backup, settings=settings
        )
    if res.backup_path:
        out.print(f"backup written: {res.backup_path}")
    if res.before == res.after:
        out.print(f"already at {res.after} (head {mig.head_revision()}): nothing to do")
    else:
        out.print(f"migrated {_target()}: {res.before or 'empty'} → {res.after}")


@app.command()
@handle_errors
def downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision: -1, base, or an id.")] = "-1",
    yes: Annotated[bool, typer.Option("--yes", help="Confirm in production.")] = False,
) -> None:
    """Downgrade the schema (drops what later revisions added: data in it is lost)."""
    from . import migrate as mig

    if load_settings().env == "production" and not yes:
        raise CliError("refusing to downgrade a production database without --yes")
    engine = _engine()
    before = mig.current_revision(engine)
    mig.downgrade(engine.url, revision)
    out.print(f"downgraded {_target()}: {before} → {mig.current_revision(engine) or 'base'}")


@app.command()
@handle_errors
def current() -> None:
    """Print the database's revision."""
    from . import migrate as mig

    rev = mig.current_revision(_engine())
    head = mig.head_revision()
    out.print(
        f"{rev or 'none (empty database)'}{' (head)' if rev == head else f' (head is {head})'}"
    )


@app.command()
@handle_errors
def history() -> None:
    """List the shipped migrations, newest first."""
    from . import migrate as mig

    table = Table("revision", "revises", "description")
    for rev, down, doc in mig.history():
        table.add_row(rev, str(down or "-"), doc.splitlines()[0] if doc else "")
    out.print(table)


@app.command()
@handle_errors
def check() -> None:
    """Connect, report the revision, and whether the schema matches the models."""
    from . import migrate as mig

    res = mig.check(_engine())
    out.print(f"database : {res.url}")
    out.print(f"revision : {res.current or 'none'} (head {res.head})")
    if res.differences:
        out.print(f"[red]schema differs from the models ({len(res.differences)}):[/]")
        for d in res.differences:
            out.print(f"  - {d}")
    else:
        out.print("schema   : matches the models")
    if not res.ok:
        raise typer.Exit(1)
    out.print("[green]ok[/]")


@app.command("config")
@handle_errors
def show_config() -> None:
    """Print the effective database settings (password masked)."""
    s = load_settings()
    out.print(f"env      : {s.env}")
    out.print(f"database : {mask_url(_state.get('url') or s.sqlalchemy_url())}")


# --- reference data -------------------------------------------------------------------------


@app.command()
@handle_errors
def seed(
    file: Annotated[
        Path | None, typer.Argument(help="Topology YAML (default: the packaged reference).")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and roll back.")] = False,
) -> None:
    """Load the reference topology idempotently (a changed file updates rows in place)."""
    from .seed import TopologyError, default_topology_path, render_report, seed_file

    path = file or default_topology_path()
    try:
        report = seed_file(_engine(), path, dry_run=dry_run)
    except TopologyError as exc:
        err.print(f"[red]invalid topology, nothing written:[/]\n{exc}", highlight=False)
        raise typer.Exit(2) from None
    out.print(render_report(report))
    for change in report.changes:
        out.print(f"  {change}")
    for extra in report.not_in_file:
        out.print(f"  [yellow]in the database, not in the file (kept):[/] {extra}")
    verb = "would change" if dry_run else "changed"
    out.print(f"{path}: {verb} {'something' if report.changed else 'nothing'}")


@app.command()
@handle_errors
def init(
    topology: Annotated[Path | None, typer.Option(help="Topology YAML to seed.")] = None,
) -> None:
    """Migrate to head and seed the reference topology (a new local database in one step).

    The topology file is validated first: an invalid file changes nothing at all.
    """
    from . import migrate as mig
    from .seed import TopologyError, default_topology_path, load_topology, seed_file

    path = topology or default_topology_path()
    try:
        load_topology(path)
        res = mig.migrate(_state.get("url"))
        out.print(f"schema at {res.after} ({_target()})")
        report = seed_file(_engine(), path)
    except TopologyError as exc:
        err.print(f"[red]invalid topology, nothing written:[/]\n{exc}", highlight=False)
        raise typer.Exit(2) from None
    created, updated, _unchanged = report.totals()
    out.print(
        f"reference data from {path}: "
        + (f"{created} created, {updated} updated" if report.changed else "already up to date")
    )


@app.command()
@handle_errors
def show() -> None:
    """Print the topology held in the database: sites, locations, routes, instruments."""
    from .models import DataLocation, DataTransferRoute, Instrument, Site

    with session_scope(_engine()) as s:
        loc_table = Table(title="Sites and data locations")
        for col in ("site", "location", "type", "storage", "prio", "where", "queue prefix"):
            loc_table.add_column(col)
        for site in s.scalars(select(Site).order_by(Site.id)):
            for loc in sorted(site.locations, key=lambda x: (x.location_type, x.priority)):
                where = (
                    getattr(loc, "root_path", None)
                    or (f"s3://{loc.bucket}/{loc.key_prefix}" if hasattr(loc, "bucket") else "")
                    or getattr(loc, "library", "")
                )
                loc_table.add_row(
                    site.short_name,
                    loc.name,
                    str(loc.location_type),
                    str(loc.storage_type),
                    str(loc.priority),
                    where,
                    loc.queue_prefix,
                )
        out.print(loc_table)
        route_table = Table(title="Transfer routes")
        for col in ("route", "from", "to", "type", "via", "method", "active"):
            route_table.add_column(col)
        for r in s.scalars(select(DataTransferRoute).order_by(DataTransferRoute.id)):
            route_table.add_row(
                r.name,
                r.origin_site.short_name,
                r.destination_site.short_name,
                str(r.route_type),
                r.relay_site.short_name if r.relay_site else "-",
                str(r.method),
                "yes" if r.active else "no",
            )
        out.print(route_table)
        inst_table = Table(title="Instruments")
        for col in ("telescope", "instrument", "modules", "available"):
            inst_table.add_column(col)
        for inst in s.scalars(select(Instrument).order_by(Instrument.id)):
            inst_table.add_row(
                inst.telescope.short_name or inst.telescope.name,
                inst.name,
                ", ".join(m.name for m in inst.modules),
                "yes" if inst.available else "no",
            )
        out.print(inst_table)
        n_sites = s.scalar(select(func.count()).select_from(Site))
        n_locs = s.scalar(select(func.count()).select_from(DataLocation))
        n_routes = s.scalar(select(func.count()).select_from(DataTransferRoute))
        out.print(f"{n_sites} sites, {n_locs} data locations, {n_routes} routes")


# --- users and tokens ----------------------------------------------------------------------


def _get_user(session: Any, username: str) -> Any:
    from .models import User

    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        raise CliError(f"user {username!r} does not exist")
    return user


def _get_role(session: Any, name: str) -> Any:
    from .models import Role

    role = session.scalar(select(Role).where(Role.name == name))
    if role is None:
        known = ", ".join(session.scalars(select(Role.name).order_by(Role.name))) or "none"
        raise CliError(f"role {name!r} does not exist (known: {known}; seed the topology)")
    return role


@user_app.command("add")
@handle_errors
def user_add(
    username: str,
    role: Annotated[list[str] | None, typer.Option("--role", "-r", help="Role (repeat).")] = None,
    email: Annotated[str | None, typer.Option()] = None,
    full_name: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Create a user with the given roles."""
    from .models import User

    with session_scope(_engine()) as s:
        if s.scalar(select(User).where(User.username == username)) is not None:
            raise CliError(f"user {username!r} already exists")
        user = User(username=username, email=email, full_name=full_name)
        user.roles = [_get_role(s, r) for r in role or []]
        s.add(user)
    out.print(f"created user {username} (roles: {', '.join(role or []) or 'none'})")


@user_app.command("list")
@handle_errors
def user_list() -> None:
    """List users, their roles and token counts."""
    from .models import User

    table = Table("username", "roles", "scopes", "tokens", "active")
    with session_scope(_engine()) as s:
        for u in s.scalars(select(User).order_by(User.username)):
            live = [t for t in u.tokens if t.is_valid()]
            table.add_row(
                u.username,
                ", ".join(r.name for r in u.roles),
                " ".join(u.scopes),
                str(len(live)),
                "yes" if u.active else "no",
            )
    out.print(table)


@user_app.command("grant")
@handle_errors
def user_grant(username: str, role: str) -> None:
    """Give a user a role."""
    with session_scope(_engine()) as s:
        user, r = _get_user(s, username), _get_role(s, role)
        if r not in user.roles:
            user.roles.append(r)
    out.print(f"{username} now has role {role}")


@user_app.command("revoke-role")
@handle_errors
def user_revoke_role(username: str, role: str) -> None:
    """Take a role away from a user."""
    with session_scope(_engine()) as s:
        user, r = _get_user(s, username), _get_role(s, role)
        if r in user.roles:
            user.roles.remove(r)
    out.print(f"{username} no longer has role {role}")


@user_app.command("disable")
@handle_errors
def user_disable(username: str) -> None:
    """Disable a user: every one of their tokens stops working."""
    with session_scope(_engine()) as s:
        _get_user(s, username).active = False
    out.print(f"disabled {username}")


@user_app.command("enable")
@handle_errors
def user_enable(username: str) -> None:
    """Re-enable a disabled user."""
    with session_scope(_engine()) as s:
        _get_user(s, username).active = True
    out.print(f"enabled {username}")


@token_app.command("create")
@handle_errors
def token_create(
    username: str,
    name: Annotated[str, typer.Option("--name", "-n", help="What the token is for.")],
    scope: Annotated[
        list[str] | None, typer.Option("--scope", "-s", help="Scope (repeat; default: read).")
    ] = None,
    expires_days: Annotated[
        float | None, typer.Option("--expires-days", help="Lifetime in days (default: none).")
    ] = None,
) -> None:
    """Create a token; the raw token is printed once and only its hash is stored."""
    from .models import ApiToken
    from .models.access import KNOWN_SCOPES

    scopes = scope or ["read"]
    unknown = [x for x in scopes if x not in KNOWN_SCOPES]
    if unknown:
        raise CliError(
            f"--scope: unknown scope(s) {', '.join(unknown)}; known: {', '.join(KNOWN_SCOPES)}"
        )
    if expires_days is not None and expires_days <= 0:
        raise CliError("--expires-days: must be positive")
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(days=expires_days) if expires_days else None
    with session_scope(_engine()) as s:
        user = _get_user(s, username)
        if not user.active:
            raise CliError(f"user {username!r} is disabled")
        row, raw = ApiToken.issue(user, name, scopes, expires)
        s.add(row)
        s.flush()
        token_id = row.id
    err.print(
        f"token {token_id} for {username} ({' '.join(scopes)}); store it now, "
        "it is not shown again:"
    )
    print(raw)


@token_app.command("list")
@handle_errors
def token_list(
    username: Annotated[str | None, typer.Option("--user", "-u")] = None,
) -> None:
    """List tokens (prefix, scopes, expiry, last use); never the tokens themselves."""
    from .models import ApiToken, User

    table = Table("id", "user", "name", "prefix", "scopes", "expires", "last used", "uses", "state")
    with session_scope(_engine()) as s:
        q = select(ApiToken).join(User).order_by(ApiToken.id)
        if username:
            q = q.where(User.username == username)
        for t in s.scalars(q):
            state = "revoked" if t.revoked else ("valid" if t.is_valid() else "expired/disabled")
            table.add_row(
                str(t.id),
                t.user.username,
                t.name,
                t.token_prefix + "…",
                " ".join(t.scopes),
                t.expires_at.isoformat(timespec="minutes") if t.expires_at else "never",
                t.last_used_at.isoformat(timespec="minutes") if t.last_used_at else "-",
                str(t.usage_count),
                state,
            )
    out.print(table)


@token_app.command("revoke")
@handle_errors
def token_revoke(
    token_id: Annotated[int, typer.Argument(help="Token id (see token list).")],
) -> None:
    """Revoke a token at once."""
    from .models import ApiToken

    with session_scope(_engine()) as s:
        t = s.get(ApiToken, token_id)
        if t is None:
            raise CliError(f"token {token_id} does not exist")
        if t.revoked_at is None:
            t.revoked_at = dt.datetime.now(dt.UTC)
    out.print(f"revoked token {token_id}")


@app.command()
def version() -> None:
    """Print the version."""
    out.print(__version__)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
