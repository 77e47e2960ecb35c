"""Sites, their storage locations and the transfer routes between sites (read-only).

This reference data comes from the seeded topology (``ccat-ops-db seed``). Locations answer with
the fields of their storage type; S3 locations never show credentials, only the prefix of the
environment variables the workers read them from.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from sqlalchemy import select
from sqlalchemy.orm import selectinload, with_polymorphic

from ccat_ops_db.enums import LocationType, RouteType, StorageType
from ccat_ops_db.models import (
    DataLocation,
    DataTransferRoute,
    DiskDataLocation,
    S3DataLocation,
    Site,
    TapeDataLocation,
)

from ..deps import DB, Paging, Reader
from ..errors import ERROR_RESPONSES, ErrorBody, not_found
from ..schemas.common import Page
from ..schemas.reference import (
    LOCATION_MODELS,
    DataLocationOut,
    DataLocationPage,
    RouteOut,
    SiteDetail,
    SiteOut,
)
from .observatory import paginate_by_id

router = APIRouter(tags=["sites"])

MAX_ID = 2**31 - 1
#: Fields of the location models that are not plain columns of the ORM object.
DERIVED = {"site_short_name", "queue_prefix", "credentials_env_prefix"}


def _not_found(kind: str) -> dict[int | str, dict[str, object]]:
    return {**ERROR_RESPONSES, 404: {"model": ErrorBody, "description": f"No {kind} with this id"}}


def _id_filter(description: str) -> Any:
    """A bounded id query parameter."""
    return Query(ge=1, le=MAX_ID, description=description)


def _short_name_filter(description: str) -> Any:
    """A bounded site short name query parameter."""
    return Query(
        min_length=1,
        max_length=32,
        pattern=r"^[^\x00]+$",
        description=description,
        examples=["cologne"],
    )


def _active_filter(what: str) -> Any:
    return Query(description=f"Only {what} that are (or are not) active.")


# --- sites -----------------------------------------------------------------------------------


@router.get("/sites", response_model=Page[SiteOut], responses=ERROR_RESPONSES)
def list_sites(
    db: DB,
    _: Reader,
    page: Paging,
    active: Annotated[bool | None, _active_filter("sites")] = None,
) -> Page[SiteOut]:
    """All sites, in id order."""
    q = select(Site)
    if active is not None:
        q = q.where(Site.active.is_(active))
    rows, nxt = paginate_by_id(db, q, Site.id, page)
    return Page(items=[SiteOut.model_validate(r) for r in rows], next_cursor=nxt, limit=page.limit)


@router.get("/sites/{site_id}", response_model=SiteDetail, responses=_not_found("site"))
def get_site(
    site_id: Annotated[int, Path(ge=1, le=MAX_ID, description="Site id.")],
    db: DB,
    _: Reader,
) -> SiteDetail:
    """One site with its storage locations (lowest ``priority`` first, then by id)."""
    site = db.get(Site, site_id)
    if site is None:
        raise not_found("site", site_id)
    poly = _any_location()
    locations = db.scalars(
        select(poly)
        .options(selectinload(poly.site))
        .where(poly.site_id == site_id)
        .order_by(poly.priority, poly.id)
    )
    return SiteDetail.model_validate(
        {
            **SiteOut.model_validate(site).model_dump(),
            "locations": [location_out(loc) for loc in locations],
        }
    )


# --- data locations --------------------------------------------------------------------------


def _any_location() -> Any:
    """``DataLocation`` loaded together with the columns of every storage type (one query)."""
    return with_polymorphic(DataLocation, [DiskDataLocation, S3DataLocation, TapeDataLocation])


def default_credentials_env_prefix(loc: S3DataLocation) -> str:
    """The prefix workers use when none is configured (as ``S3DataLocation`` computes it)."""
    return f"CCAT_S3_{loc.site.short_name}_{loc.name}".upper()


def location_out(loc: DataLocation) -> DataLocationOut:
    """Response model of a location with the fields of its storage type and its queue prefix.

    Only the fields the response models declare are read, so nothing secret can slip through.
    """
    model = LOCATION_MODELS[loc.storage_type]
    data: dict[str, Any] = {
        name: getattr(loc, name) for name in model.model_fields if name not in DERIVED
    }
    data["site_short_name"] = loc.site.short_name
    data["queue_prefix"] = loc.queue_prefix
    if isinstance(loc, S3DataLocation):
        data["credentials_env_prefix"] = (
            loc.credentials_env_prefix or default_credentials_env_prefix(loc)
        )
    return model.model_validate(data)  # type: ignore[return-value]


@router.get("/data_locations", response_model=DataLocationPage, responses=ERROR_RESPONSES)
def list_data_locations(
    db: DB,
    _: Reader,
    page: Paging,
    site_id: Annotated[int | None, _id_filter("Only locations of this site.")] = None,
    site: Annotated[
        str | None, _short_name_filter("Only locations of the site with this short name.")
    ] = None,
    location_type: Annotated[
        LocationType | None, Query(description="Only locations with this role.")
    ] = None,
    storage_type: Annotated[
        StorageType | None, Query(description="Only locations on this kind of storage.")
    ] = None,
    active: Annotated[bool | None, _active_filter("locations")] = None,
) -> DataLocationPage:
    """Storage locations in id order, filtered; each with the fields of its storage type."""
    poly = _any_location()
    q = select(poly).options(selectinload(poly.site))
    if site_id is not None:
        q = q.where(poly.site_id == site_id)
    if site is not None:
        q = q.where(poly.site_id.in_(select(Site.id).where(Site.short_name == site)))
    if location_type is not None:
        q = q.where(poly.location_type == location_type)
    if storage_type is not None:
        q = q.where(poly.storage_type == storage_type)
    if active is not None:
        q = q.where(poly.active.is_(active))
    rows, nxt = paginate_by_id(db, q, poly.id, page)
    return DataLocationPage(
        items=[location_out(r) for r in rows], next_cursor=nxt, limit=page.limit
    )


@router.get(
    "/data_locations/{location_id}",
    response_model=DataLocationOut,
    responses=_not_found("data location"),
)
def get_data_location(
    location_id: Annotated[int, Path(ge=1, le=MAX_ID, description="Data location id.")],
    db: DB,
    _: Reader,
) -> DataLocationOut:
    """One storage location with the fields of its storage type: ``disk`` (root path, host),
    ``s3`` (bucket, endpoint, region, key prefix and the *name prefix* of the credential
    environment variables, never a credential) or ``tape`` (library, staging path)."""
    poly = _any_location()
    loc = db.scalar(select(poly).options(selectinload(poly.site)).where(poly.id == location_id))
    if loc is None:
        raise not_found("data location", location_id)
    return location_out(loc)


# --- routes ----------------------------------------------------------------------------------


def _routes() -> Any:
    return select(DataTransferRoute).options(
        selectinload(DataTransferRoute.origin_site),
        selectinload(DataTransferRoute.destination_site),
        selectinload(DataTransferRoute.relay_site),
        selectinload(DataTransferRoute.origin_location).selectinload(DataLocation.site),
        selectinload(DataTransferRoute.destination_location).selectinload(DataLocation.site),
    )


def _label(loc: DataLocation | None) -> str | None:
    return f"{loc.site.short_name}/{loc.name}" if loc is not None else None


def route_out(r: DataTransferRoute) -> RouteOut:
    """Response model of a route, naming its sites by short name."""
    return RouteOut(
        id=r.id,
        name=r.name,
        origin_site_id=r.origin_site_id,
        origin_site=r.origin_site.short_name,
        destination_site_id=r.destination_site_id,
        destination_site=r.destination_site.short_name,
        relay_site_id=r.relay_site_id,
        relay_site=r.relay_site.short_name if r.relay_site is not None else None,
        origin_location_id=r.origin_location_id,
        origin_location=_label(r.origin_location),
        destination_location_id=r.destination_location_id,
        destination_location=_label(r.destination_location),
        route_type=r.route_type,
        method=r.method,
        active=r.active,
        options=r.options,
    )


@router.get("/routes", response_model=Page[RouteOut], responses=ERROR_RESPONSES)
def list_routes(
    db: DB,
    _: Reader,
    page: Paging,
    origin: Annotated[str | None, _short_name_filter("Only routes from this site.")] = None,
    destination: Annotated[str | None, _short_name_filter("Only routes to this site.")] = None,
    origin_site_id: Annotated[int | None, _id_filter("Only routes from this site.")] = None,
    destination_site_id: Annotated[int | None, _id_filter("Only routes to this site.")] = None,
    route_type: Annotated[RouteType | None, Query(description="Only routes of this type.")] = None,
    active: Annotated[bool | None, _active_filter("routes")] = None,
) -> Page[RouteOut]:
    """Transfer routes in id order, filtered; sites are given by short name or by id."""
    q = _routes()
    if origin is not None:
        q = q.where(
            DataTransferRoute.origin_site_id.in_(select(Site.id).where(Site.short_name == origin))
        )
    if destination is not None:
        q = q.where(
            DataTransferRoute.destination_site_id.in_(
                select(Site.id).where(Site.short_name == destination)
            )
        )
    if origin_site_id is not None:
        q = q.where(DataTransferRoute.origin_site_id == origin_site_id)
    if destination_site_id is not None:
        q = q.where(DataTransferRoute.destination_site_id == destination_site_id)
    if route_type is not None:
        q = q.where(DataTransferRoute.route_type == route_type)
    if active is not None:
        q = q.where(DataTransferRoute.active.is_(active))
    rows, nxt = paginate_by_id(db, q, DataTransferRoute.id, page)
    return Page(items=[route_out(r) for r in rows], next_cursor=nxt, limit=page.limit)


@router.get("/routes/{route_id}", response_model=RouteOut, responses=_not_found("route"))
def get_route(
    route_id: Annotated[int, Path(ge=1, le=MAX_ID, description="Transfer route id.")],
    db: DB,
    _: Reader,
) -> RouteOut:
    """One transfer route, with the short names of its origin, destination and relay sites."""
    route = db.scalar(_routes().where(DataTransferRoute.id == route_id))
    if route is None:
        raise not_found("route", route_id)
    return route_out(route)
