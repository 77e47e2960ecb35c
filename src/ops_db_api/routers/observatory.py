"""The observatory hierarchy (read-only): observatories → telescopes → instruments → modules.

This reference data comes from the seeded topology (``ccat-ops-db seed``) and changes rarely.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from sqlalchemy import Select, select
from sqlalchemy.orm import Session, selectinload

from ccat_ops_db.models import (
    ChaiModuleConfiguration,
    Instrument,
    InstrumentModule,
    InstrumentModuleConfiguration,
    Observatory,
    Telescope,
)

from ..deps import DB, Paging, Reader, _decode, paginate
from ..deps import Page as Page_
from ..errors import ERROR_RESPONSES, ApiError, ErrorBody, not_found
from ..schemas.common import Page
from ..schemas.reference import (
    ChaiModuleConfigurationOut,
    GenericModuleConfigurationOut,
    InstrumentDetail,
    InstrumentModuleDetail,
    InstrumentModuleOut,
    InstrumentOut,
    ObservatoryDetail,
    ObservatoryOut,
    TelescopeDetail,
    TelescopeOut,
)

router = APIRouter(tags=["observatory"])

MAX_ID = 2**31 - 1


def paginate_by_id(
    db: Session, query: Select[Any], key: Any, page: Page_
) -> tuple[list[Any], str | None]:
    """:func:`paginate` ordered by an integer ``id``, refusing a cursor that holds no such id.

    ``paginate`` passes the decoded cursor value to the database as it is; a crafted cursor
    with a string or timestamp there would fail in PostgreSQL (a 500), so it is a 422 here.
    Shared by the observatory, planning and sites routers.
    """
    if page.cursor:
        [value] = _decode(page.cursor, 1)
        if not isinstance(value, int) or not 0 <= value <= MAX_ID:
            raise ApiError(
                422,
                "invalid cursor",
                [{"loc": ["query", "cursor"], "msg": "not a cursor this API returned"}],
            )
    return paginate(db, query, [key], page)


def _not_found(kind: str) -> dict[int | str, dict[str, object]]:
    return {**ERROR_RESPONSES, 404: {"model": ErrorBody, "description": f"No {kind} with this id"}}


# --- observatories ---------------------------------------------------------------------------


@router.get("/observatories", response_model=Page[ObservatoryOut], responses=ERROR_RESPONSES)
def list_observatories(db: DB, _: Reader, page: Paging) -> Page[ObservatoryOut]:
    """All observatories, in id order."""
    rows, nxt = paginate_by_id(db, select(Observatory), Observatory.id, page)
    return Page(
        items=[ObservatoryOut.model_validate(r) for r in rows], next_cursor=nxt, limit=page.limit
    )


@router.get(
    "/observatories/{observatory_id}",
    response_model=ObservatoryDetail,
    responses=_not_found("observatory"),
)
def get_observatory(
    observatory_id: Annotated[int, Path(ge=1, le=MAX_ID, description="Observatory id.")],
    db: DB,
    _: Reader,
) -> ObservatoryDetail:
    """One observatory with its telescopes (in id order)."""
    obs = db.scalar(
        select(Observatory)
        .options(selectinload(Observatory.telescopes))
        .where(Observatory.id == observatory_id)
    )
    if obs is None:
        raise not_found("observatory", observatory_id)
    return ObservatoryDetail.model_validate(
        {
            **ObservatoryOut.model_validate(obs).model_dump(),
            "telescopes": sorted(obs.telescopes, key=lambda t: t.id),
        }
    )


# --- telescopes ------------------------------------------------------------------------------


@router.get("/telescopes", response_model=Page[TelescopeOut], responses=ERROR_RESPONSES)
def list_telescopes(
    db: DB,
    _: Reader,
    page: Paging,
    observatory_id: Annotated[
        int | None, Query(ge=1, le=MAX_ID, description="Only telescopes of this observatory.")
    ] = None,
) -> Page[TelescopeOut]:
    """All telescopes, in id order."""
    q = select(Telescope)
    if observatory_id is not None:
        q = q.where(Telescope.observatory_id == observatory_id)
    rows, nxt = paginate_by_id(db, q, Telescope.id, page)
    return Page(
        items=[TelescopeOut.model_validate(r) for r in rows], next_cursor=nxt, limit=page.limit
    )


@router.get(
    "/telescopes/{telescope_id}",
    response_model=TelescopeDetail,
    responses=_not_found("telescope"),
)
def get_telescope(
    telescope_id: Annotated[int, Path(ge=1, le=MAX_ID, description="Telescope id.")],
    db: DB,
    _: Reader,
) -> TelescopeDetail:
    """One telescope with its instruments (in id order)."""
    tel = db.scalar(
        select(Telescope)
        .options(selectinload(Telescope.instruments))
        .where(Telescope.id == telescope_id)
    )
    if tel is None:
        raise not_found("telescope", telescope_id)
    return TelescopeDetail.model_validate(
        {
            **TelescopeOut.model_validate(tel).model_dump(),
            "instruments": sorted(tel.instruments, key=lambda i: i.id),
        }
    )


# --- instruments -----------------------------------------------------------------------------


@router.get("/instruments", response_model=Page[InstrumentOut], responses=ERROR_RESPONSES)
def list_instruments(
    db: DB,
    _: Reader,
    page: Paging,
    available: Annotated[
        bool | None, Query(description="Only instruments that are (or are not) available.")
    ] = None,
    telescope_id: Annotated[
        int | None, Query(ge=1, le=MAX_ID, description="Only instruments on this telescope.")
    ] = None,
) -> Page[InstrumentOut]:
    """Instruments in id order, filtered."""
    q = select(Instrument)
    if available is not None:
        q = q.where(Instrument.available.is_(available))
    if telescope_id is not None:
        q = q.where(Instrument.telescope_id == telescope_id)
    rows, nxt = paginate_by_id(db, q, Instrument.id, page)
    return Page(
        items=[InstrumentOut.model_validate(r) for r in rows], next_cursor=nxt, limit=page.limit
    )


@router.get(
    "/instruments/{instrument_id}",
    response_model=InstrumentDetail,
    responses=_not_found("instrument"),
)
def get_instrument(
    instrument_id: Annotated[int, Path(ge=1, le=MAX_ID, description="Instrument id.")],
    db: DB,
    _: Reader,
) -> InstrumentDetail:
    """One instrument with its modules (in id order)."""
    inst = db.scalar(
        select(Instrument)
        .options(selectinload(Instrument.modules))
        .where(Instrument.id == instrument_id)
    )
    if inst is None:
        raise not_found("instrument", instrument_id)
    return InstrumentDetail.model_validate(
        {
            **InstrumentOut.model_validate(inst).model_dump(),
            "modules": sorted(inst.modules, key=lambda m: m.id),
        }
    )


# --- instrument modules ----------------------------------------------------------------------


def configuration_out(
    c: InstrumentModuleConfiguration,
) -> GenericModuleConfigurationOut | ChaiModuleConfigurationOut:
    """Response model of a module configuration, with the CHAI fields for CHAI set-ups."""
    if isinstance(c, ChaiModuleConfiguration):
        return ChaiModuleConfigurationOut.model_validate(c)
    return GenericModuleConfigurationOut.model_validate(c)


@router.get(
    "/instrument_modules", response_model=Page[InstrumentModuleOut], responses=ERROR_RESPONSES
)
def list_instrument_modules(
    db: DB,
    _: Reader,
    page: Paging,
    instrument_id: Annotated[
        int | None, Query(ge=1, le=MAX_ID, description="Only modules of this instrument.")
    ] = None,
    available: Annotated[
        bool | None, Query(description="Only modules that are (or are not) available.")
    ] = None,
) -> Page[InstrumentModuleOut]:
    """Instrument modules in id order, filtered."""
    q = select(InstrumentModule)
    if instrument_id is not None:
        q = q.where(InstrumentModule.instrument_id == instrument_id)
    if available is not None:
        q = q.where(InstrumentModule.available.is_(available))
    rows, nxt = paginate_by_id(db, q, InstrumentModule.id, page)
    return Page(
        items=[InstrumentModuleOut.model_validate(r) for r in rows],
        next_cursor=nxt,
        limit=page.limit,
    )


@router.get(
    "/instrument_modules/{module_id}",
    response_model=InstrumentModuleDetail,
    responses=_not_found("instrument module"),
)
def get_instrument_module(
    module_id: Annotated[int, Path(ge=1, le=MAX_ID, description="Instrument module id.")],
    db: DB,
    _: Reader,
) -> InstrumentModuleDetail:
    """One instrument module with its configurations (in id order); CHAI configurations carry
    their receiver fields (LO frequency, sideband, backend, bandwidth)."""
    mod = db.scalar(
        select(InstrumentModule)
        .options(
            selectinload(InstrumentModule.configurations).selectin_polymorphic(
                [ChaiModuleConfiguration]
            )
        )
        .where(InstrumentModule.id == module_id)
    )
    if mod is None:
        raise not_found("instrument module", module_id)
    return InstrumentModuleDetail.model_validate(
        {
            **InstrumentModuleOut.model_validate(mod).model_dump(),
            "configurations": [
                configuration_out(c) for c in sorted(mod.configurations, key=lambda c: c.id)
            ],
        }
    )
