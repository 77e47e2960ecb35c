"""Where packages go: primary buffers, round-robin archive choice, relay legs, secondaries.

Decisions (the public docs name the functions, not their rules):

* The *primary buffer* of a site is its active BUFFER with the lowest ``priority``.
* A transfer package leaves its site once, to one archive site chosen round-robin among the
  sites that have an active LONG_TERM_ARCHIVE and an active route from the origin site. The
  round-robin state is the database itself: the site that has received the fewest primary
  transfers from this origin is next (ties by name), so it survives restarts and needs no
  counter.
* A RELAY route is travelled in legs: the first leg ends at the relay site's primary buffer;
  when it completes, the next leg (relay → destination) is created. A relay site that has an
  archive of its own also unpacks and archives what passes through it.
* Once a package is unpacked at an archive site, *secondary* transfers replicate it from there
  to every other archive site that has not received it, over the active route between them.
* An operator may cancel a pending or failed transfer (its destination is gone for good). The
  package is then *given up* for that leg's destination site: a cancelled secondary is not
  made again; a package whose way off its site was cancelled (any leg of the route it took)
  and that no archive site holds yet gets a new primary transfer, round-robin among the
  archive sites it was not given up for, by routes that do not relay through such a site.
  Where an earlier leg already brought it to the new route's relay, the new way starts there.
  A package with nowhere left to go is looked at again after ``partition_retry_s``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session, aliased

from ccat_ops_db.enums import LocationType, RouteType, Status
from ccat_ops_db.models import (
    DataLocation,
    DataTransfer,
    DataTransferLog,
    DataTransferPackage,
    DataTransferRoute,
    Site,
)
from ccat_ops_db.route_options import route_option_problems

from .errors import ConfigurationError


def primary_buffer(session: Session, site_id: int) -> DataLocation:
    """The site's active BUFFER with the lowest priority (ConfigurationError if none)."""
    loc = session.scalar(
        select(DataLocation)
        .where(
            DataLocation.site_id == site_id,
            DataLocation.location_type == LocationType.BUFFER,
            DataLocation.active.is_(True),
        )
        .order_by(DataLocation.priority, DataLocation.id)
        .limit(1)
    )
    if loc is None:
        site = session.get(Site, site_id)
        raise ConfigurationError(
            f"site {site.short_name if site else site_id} has no active BUFFER location"
        )
    return loc


def archive_site_ids(session: Session) -> set[int]:
    """Sites with at least one active LONG_TERM_ARCHIVE location."""
    return set(
        session.scalars(
            select(DataLocation.site_id).where(
                DataLocation.location_type == LocationType.LONG_TERM_ARCHIVE,
                DataLocation.active.is_(True),
            )
        )
    )


def find_route(
    session: Session, origin_site_id: int, dest_site_id: int
) -> DataTransferRoute | None:
    """The active route between two sites (a CUSTOM override first, then DIRECT, then RELAY)."""
    routes = list(
        session.scalars(
            select(DataTransferRoute).where(
                DataTransferRoute.origin_site_id == origin_site_id,
                DataTransferRoute.destination_site_id == dest_site_id,
                DataTransferRoute.active.is_(True),
            )
        )
    )
    order = {RouteType.CUSTOM: 0, RouteType.DIRECT: 1, RouteType.RELAY: 2}
    routes.sort(key=lambda r: (order.get(RouteType(r.route_type), 9), r.id))
    return routes[0] if routes else None


def choose_primary_route(
    session: Session, origin_site_id: int, exclude: frozenset[int] | set[int] = frozenset()
) -> DataTransferRoute:
    """Round-robin over the archive sites reachable from ``origin_site_id`` (but ``exclude``)."""
    candidates: list[tuple[int, str, DataTransferRoute]] = []
    for site_id in sorted(archive_site_ids(session) - {origin_site_id} - set(exclude)):
        route = find_route(session, origin_site_id, site_id)
        if route is None or route.relay_site_id in exclude:
            continue
        sent = session.scalar(
            select(func.count())
            .select_from(DataTransfer)
            .join(DataTransferRoute, DataTransferRoute.id == DataTransfer.route_id)
            .join(DataLocation, DataLocation.id == DataTransfer.origin_location_id)
            .where(
                DataTransfer.is_secondary.is_(False),
                DataLocation.site_id == origin_site_id,
                DataTransferRoute.destination_site_id == site_id,
                DataTransfer.origin_location_id.in_(
                    select(DataLocation.id).where(DataLocation.site_id == origin_site_id)
                ),
            )
        )
        site = session.get(Site, site_id)
        assert site is not None
        # Count packages, not legs: the first leg of a relay route carries the count.
        candidates.append((int(sent or 0), site.short_name, route))
    if not candidates:
        origin = session.get(Site, origin_site_id)
        names = sorted(
            s.short_name for s in session.scalars(select(Site).where(Site.id.in_(exclude)))
        )
        raise ConfigurationError(
            f"no active route from site {origin.short_name if origin else origin_site_id} "
            "to any site with a long-term archive"
            + (f" other than the ones it was given up for ({', '.join(names)})" if names else "")
        )
    candidates.sort(key=lambda c: (c[0], c[1]))
    return candidates[0][2]


def _hop_target(session: Session, route: DataTransferRoute, from_site_id: int) -> int:
    """The site the next leg of ``route`` ends at, starting from ``from_site_id``."""
    if RouteType(route.route_type) == RouteType.RELAY and from_site_id == route.origin_site_id:
        assert route.relay_site_id is not None
        return route.relay_site_id
    return route.destination_site_id


def _leg_plan(
    session: Session, route: DataTransferRoute, origin: DataLocation
) -> tuple[int, DataLocation, str]:
    """Where the next leg of ``route`` from ``origin`` ends (site and location) and by which
    method: a relay leg uses the direct route of its hop when there is one."""
    target_site = _hop_target(session, route, origin.site_id)
    if RouteType(route.route_type) == RouteType.CUSTOM and route.destination_location_id:
        dest = session.get(DataLocation, route.destination_location_id)
        assert dest is not None
    else:
        dest = primary_buffer(session, target_site)
    method = route.method
    if target_site != route.destination_site_id or origin.site_id != route.origin_site_id:
        hop = find_route(session, origin.site_id, target_site)
        if hop is not None and RouteType(hop.route_type) != RouteType.RELAY:
            method = hop.method
    return target_site, dest, method


def _new_leg(
    session: Session,
    dtp: DataTransferPackage,
    route: DataTransferRoute,
    origin: DataLocation,
    *,
    secondary: bool,
) -> DataTransfer | None:
    target_site, dest, method = _leg_plan(session, route, origin)
    exists = session.scalar(
        select(DataTransfer.id).where(
            DataTransfer.data_transfer_package_id == dtp.id,
            DataTransfer.destination_location_id == dest.id,
        )
    )
    if exists is not None:
        return None
    leg = DataTransfer(
        data_transfer_package_id=dtp.id,
        route_id=route.id,
        origin_location_id=origin.id,
        destination_location_id=dest.id,
        method=method,
        is_secondary=secondary,
        status=Status.PENDING,
        unpack_status=Status.PENDING,
    )
    if target_site not in archive_site_ids(session):
        # a pure relay hop: nothing is unpacked there
        leg.unpack_status = Status.COMPLETED
    session.add(leg)
    session.flush()
    return leg


def leg_options(session: Session, transfer: DataTransfer) -> dict:
    """The mover options of one leg: a relay leg uses its hop's direct route (the same route
    its method came from), every other leg its own route's options.

    Raises ConfigurationError naming the route when its options hold a name its method does
    not know or a value not of its kind (a database seeded before the topology loader checked
    them): the transfer fails with that reason instead of running without the option."""
    route = transfer.route
    if route is None:
        return {}
    origin = session.get(DataLocation, transfer.origin_location_id)
    dest = session.get(DataLocation, transfer.destination_location_id)
    if RouteType(route.route_type) == RouteType.RELAY and origin is not None and dest is not None:
        hop = find_route(session, origin.site_id, dest.site_id)
        if hop is not None and RouteType(hop.route_type) != RouteType.RELAY:
            route = hop
    # the leg's method is its route's (for a relay leg: its hop's), the mover's choice
    problems = route_option_problems(transfer.method, route.options)
    if problems:
        raise ConfigurationError(
            f"route {route.name}: {'; '.join(f'options.{n}: {p}' for n, p in problems)} "
            "(correct routes[].options in the topology file and run ccat-ops-db seed)"
        )
    return dict(route.options or {})


def cancelled_routes(dtp_id: int) -> Any:
    """SELECT of the routes of ``dtp_id``'s cancelled transfers (an alias of its own, so it
    does not correlate with a query on transfers around it)."""
    leg = aliased(DataTransfer)
    return (
        select(leg.route_id)
        .where(
            leg.data_transfer_package_id == dtp_id,
            leg.status == Status.CANCELLED,
            leg.route_id.is_not(None),
        )
        .correlate_except(leg)
    )


def given_up_sites(session: Session, dtp_id: int) -> set[int]:
    """Sites ``dtp_id`` was given up for: the destination site of each cancelled leg. (Not
    its route's final site: cancelling the leg to a relay gives up the relay, and the final
    site stays reachable by another route.)"""
    return set(
        session.scalars(
            select(DataLocation.site_id)
            .join(DataTransfer, DataTransfer.destination_location_id == DataLocation.id)
            .where(
                DataTransfer.data_transfer_package_id == dtp_id,
                DataTransfer.status == Status.CANCELLED,
            )
        )
    )


def live_primary(dtp_id_column: Any) -> Any:
    """EXISTS: a transfer takes the package off its site and is not given up: not cancelled,
    and either no leg of its route for this package was cancelled, or it has delivered the
    package to an archive site already (a relay through an archive site whose onward leg was
    cancelled: the package is at home there, and sending it again would archive it twice)."""
    here = aliased(DataLocation)
    lta = aliased(DataLocation)
    delivered = and_(
        DataTransfer.status == Status.COMPLETED,  # its unpack there is that site's to finish
        select(here.id)
        .where(
            here.id == DataTransfer.destination_location_id,
            here.site_id.in_(
                select(lta.site_id).where(
                    lta.location_type == LocationType.LONG_TERM_ARCHIVE, lta.active.is_(True)
                )
            ),
        )
        .exists(),
    )
    return (
        select(DataTransfer.id)
        .where(
            DataTransfer.data_transfer_package_id == dtp_id_column,
            DataTransfer.is_secondary.is_(False),
            DataTransfer.status != Status.CANCELLED,
            or_(
                DataTransfer.route_id.is_(None),
                DataTransfer.route_id.not_in(cancelled_routes(dtp_id_column)),
                delivered,
            ),
        )
        .exists()
    )


def create_primary_transfer(session: Session, dtp: DataTransferPackage) -> DataTransfer | None:
    """The one transfer that takes ``dtp`` off its site (None if a live one exists).

    A package whose way off its site was cancelled (any leg of its route) gets a new one, to
    an archive site it was not given up for (ConfigurationError naming them if none is left).
    """
    if session.scalar(select(live_primary(dtp.id))):
        return None
    origin = session.get(DataLocation, dtp.origin_location_id)
    assert origin is not None
    given_up = given_up_sites(session, dtp.id)
    route = choose_primary_route(session, origin.site_id, given_up)
    if RouteType(route.route_type) == RouteType.CUSTOM and route.origin_location_id:
        origin = session.get(DataLocation, route.origin_location_id) or origin
    if given_up:
        # re-routed: where an earlier leg already delivered the package to this route's relay
        # (one transfer per package and destination), the new way starts from that relay
        first, relay, _ = _leg_plan(session, route, origin)
        if first != route.destination_site_id and session.scalar(
            select(DataTransfer.id).where(
                DataTransfer.data_transfer_package_id == dtp.id,
                DataTransfer.destination_location_id == relay.id,
                DataTransfer.status == Status.COMPLETED,
            )
        ):
            origin = relay
        moved = _repoint_stuck_leg(session, dtp, route, origin, given_up)
        if moved is not None:
            return moved
    leg = _new_leg(session, dtp, route, origin, secondary=False)
    if leg is None and given_up:
        here = session.get(Site, origin.site_id)
        raise ConfigurationError(
            f"re-routing it by route {route.name} needs a transfer from "
            f"{here.short_name if here else origin.site_id}/{origin.name} to a buffer it was "
            "sent to before (one transfer per package and destination)"
        )
    return leg


def _repoint_stuck_leg(
    session: Session,
    dtp: DataTransferPackage,
    route: DataTransferRoute,
    origin: DataLocation,
    given_up: set[int],
) -> DataTransfer | None:
    """The unfinished transfer to the new way's first destination that starts at a given-up
    site (the onward leg of a relay whose relay is gone), moved to start at ``origin`` by
    ``route``: there is one transfer per package and destination, and from the gone site it
    could never run. None when there is no such transfer."""
    _, dest, method = _leg_plan(session, route, origin)
    stuck = session.scalar(
        select(DataTransfer)
        .join(DataLocation, DataLocation.id == DataTransfer.origin_location_id)
        .where(
            DataTransfer.data_transfer_package_id == dtp.id,
            DataTransfer.destination_location_id == dest.id,
            DataTransfer.status.in_((Status.PENDING, Status.FAILED)),
            DataLocation.site_id.in_(given_up),
        )
        .with_for_update()
    )
    if stuck is None:
        return None
    was = session.get(DataLocation, stuck.origin_location_id)
    stuck.failure_reason = (
        f"re-routed by {route.name}: its origin {was.name if was else '?'} at a given-up site "
        f"(was {stuck.status}: {stuck.failure_reason or 'no reason'})"
    )[:1990]
    stuck.origin_location_id = origin.id
    stuck.route_id = route.id
    stuck.method = method
    stuck.is_secondary = False
    stuck.status = Status.PENDING
    stuck.retry_count = 0
    stuck.next_attempt_at = None
    session.add(
        DataTransferLog(data_transfer_id=stuck.id, level="warning", message=stuck.failure_reason)
    )
    session.flush()
    return stuck


def next_relay_leg(session: Session, t: DataTransfer) -> DataTransfer | None:
    """After a relay leg completes, the next leg toward the route's destination."""
    route = t.route
    if route is None or RouteType(route.route_type) != RouteType.RELAY:
        return None
    here = session.get(DataLocation, t.destination_location_id)
    assert here is not None
    if here.site_id == route.destination_site_id:
        return None
    return _new_leg(session, t.data_transfer_package, route, here, secondary=t.is_secondary)


def create_secondary_transfers(session: Session, t: DataTransfer) -> list[DataTransfer]:
    """After unpacking at an archive site, replicate to every archive site still without it."""
    here = session.get(DataLocation, t.destination_location_id)
    assert here is not None
    archives = archive_site_ids(session)
    if here.site_id not in archives:
        return []
    dtp = t.data_transfer_package
    reached = set(
        session.scalars(
            select(DataLocation.site_id)
            .join(DataTransfer, DataTransfer.destination_location_id == DataLocation.id)
            .where(DataTransfer.data_transfer_package_id == dtp.id)
        )
    )
    origin_site = session.scalar(
        select(DataLocation.site_id).where(DataLocation.id == dtp.origin_location_id)
    )
    out = []
    for site_id in sorted(archives - reached - {here.site_id, origin_site}):
        route = find_route(session, here.site_id, site_id)
        if route is None:
            continue
        leg = _new_leg(session, dtp, route, here, secondary=True)
        if leg is not None:
            out.append(leg)
    return out
