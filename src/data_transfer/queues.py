"""Queue names, derived from the database: ``{site}_{location}_{operation}``.

Which operations a location has follows from its type:

============================  =================================================================
SOURCE                         ``raw_data_package_creation``, ``deletion``
BUFFER                         ``data_transfer_package_creation``, ``data_transfer`` (pull: the
                               queue of the *destination* buffer), ``data_transfer_unpacking``,
                               ``deletion``
LONG_TERM_ARCHIVE              ``long_term_archive_transfer`` (the worker reads the site's
                               buffer and writes the archive), ``fixity``, ``deletion``
PROCESSING                     ``staging``, ``deletion``
============================  =================================================================

A worker started for some locations listens to exactly their queues, so a task only ever runs
on a host that can reach its data. New sites and locations need no code change.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from ccat_ops_db.enums import LocationType
from ccat_ops_db.models import DataLocation, Site

from .errors import ConfigurationError


class Operation(enum.StrEnum):
    """The operation part of a queue name."""

    RAW_DATA_PACKAGE_CREATION = "raw_data_package_creation"
    DATA_TRANSFER_PACKAGE_CREATION = "data_transfer_package_creation"
    DATA_TRANSFER = "data_transfer"
    DATA_TRANSFER_UNPACKING = "data_transfer_unpacking"
    LONG_TERM_ARCHIVE_TRANSFER = "long_term_archive_transfer"
    STAGING = "staging"
    DELETION = "deletion"
    FIXITY = "fixity"


OPERATIONS_BY_TYPE: dict[str, tuple[Operation, ...]] = {
    LocationType.SOURCE: (Operation.RAW_DATA_PACKAGE_CREATION, Operation.DELETION),
    LocationType.BUFFER: (
        Operation.DATA_TRANSFER_PACKAGE_CREATION,
        Operation.DATA_TRANSFER,
        Operation.DATA_TRANSFER_UNPACKING,
        Operation.DELETION,
    ),
    LocationType.LONG_TERM_ARCHIVE: (
        Operation.LONG_TERM_ARCHIVE_TRANSFER,
        Operation.FIXITY,
        Operation.DELETION,
    ),
    LocationType.PROCESSING: (Operation.STAGING, Operation.DELETION),
}


def queue_name(site: str, location: str, operation: Operation | str) -> str:
    """``{site}_{location}_{operation}``."""
    return f"{site}_{location}_{Operation(operation).value}"


def location_queue(loc: DataLocation, operation: Operation | str) -> str:
    """The queue of ``operation`` at ``loc`` (refuses an operation the type does not have)."""
    op = Operation(operation)
    if op not in OPERATIONS_BY_TYPE[str(loc.location_type)]:
        raise ConfigurationError(
            f"location {loc.site.short_name}/{loc.name} ({loc.location_type}) has no "
            f"{op.value} operation"
        )
    return queue_name(loc.site.short_name, loc.name, op)


def check_queue_names(session: Session) -> None:
    """Refuse a topology in which two locations would share a queue.

    Site and location names may both contain ``_``, so ``us`` + ``east_buffer`` and
    ``us_east`` + ``buffer`` both make ``us_east_buffer_deletion``: a worker of one would take
    the other's tasks (and delete on its own disk what was meant for the other). Every location
    in the database counts, active or not. Raises ConfigurationError naming both locations.
    """
    seen: dict[str, str] = {}
    for loc in session.scalars(
        select(DataLocation).join(Site).options(selectinload(DataLocation.site))
    ):
        label = f"{loc.site.short_name}/{loc.name}"
        for op in OPERATIONS_BY_TYPE[str(loc.location_type)]:
            name = queue_name(loc.site.short_name, loc.name, op)
            other = seen.setdefault(name, label)
            if other != label:
                raise ConfigurationError(
                    f"locations {other} and {label} would share the queue {name!r}: rename "
                    "one of them (site and location names are joined with '_')"
                )


@dataclass(frozen=True)
class QueueInfo:
    """One discovered queue."""

    name: str
    site: str
    location: str
    location_type: str
    operation: Operation


def discover_queues(
    session: Session,
    *,
    site: str | None = None,
    locations: Iterable[str] | None = None,
    include_inactive: bool = False,
) -> list[QueueInfo]:
    """Every queue of the (active) locations in the database, optionally of one site and
    some of its locations. Unknown site or location names raise ConfigurationError."""
    stmt = (
        select(DataLocation)
        .join(Site)
        .options(selectinload(DataLocation.site))
        .order_by(Site.short_name, DataLocation.priority, DataLocation.name)
    )
    if site is not None:
        if session.scalar(select(Site.id).where(Site.short_name == site)) is None:
            known = ", ".join(session.scalars(select(Site.short_name).order_by(Site.short_name)))
            raise ConfigurationError(f"unknown site {site!r} (known: {known or 'none'})")
        stmt = stmt.where(Site.short_name == site)
    if not include_inactive:
        stmt = stmt.where(DataLocation.active.is_(True), Site.active.is_(True))
    check_queue_names(session)
    rows = list(session.scalars(stmt))
    wanted = list(locations or [])
    if wanted:
        names = {loc.name for loc in rows}
        missing = [n for n in wanted if n not in names]
        if missing:
            where = f"site {site!r}" if site else "any site"
            raise ConfigurationError(
                f"unknown or inactive location(s) {', '.join(missing)} at {where} "
                f"(known: {', '.join(sorted(names)) or 'none'})"
            )
        rows = [loc for loc in rows if loc.name in wanted]
    out: list[QueueInfo] = []
    for loc in rows:
        for op in OPERATIONS_BY_TYPE[str(loc.location_type)]:
            out.append(
                QueueInfo(
                    name=queue_name(loc.site.short_name, loc.name, op),
                    site=loc.site.short_name,
                    location=loc.name,
                    location_type=str(loc.location_type),
                    operation=op,
                )
            )
    return out
