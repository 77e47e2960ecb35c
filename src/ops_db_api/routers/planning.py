"""Observation planning (read-only): programmes, sources, observing modes and obs units."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from sqlalchemy import Select, select
from sqlalchemy.orm import selectinload, with_polymorphic

from ccat_ops_db.enums import SourceType
from ccat_ops_db.models import (
    ConstantElevationSource,
    FixedSource,
    InstrumentModule,
    InstrumentModuleConfiguration,
    ObservingProgram,
    ObsMode,
    ObsUnit,
    SolarSystemObject,
    Source,
)

from ..deps import DB, Paging, Reader
from ..errors import ERROR_RESPONSES, ErrorBody, not_found
from ..schemas.common import Page
from ..schemas.reference import (
    SOURCE_MODELS,
    ObservingProgramDetail,
    ObservingProgramOut,
    ObsModeOut,
    ObsUnitOut,
    SourceOut,
    SourcePage,
)
from .observatory import paginate_by_id

router = APIRouter(tags=["planning"])

MAX_ID = 2**31 - 1


def _not_found(kind: str) -> dict[int | str, dict[str, object]]:
    return {**ERROR_RESPONSES, 404: {"model": ErrorBody, "description": f"No {kind} with this id"}}


def _id_filter(description: str) -> Any:
    """A bounded id query parameter."""
    return Query(ge=1, le=MAX_ID, description=description)


# --- observing programmes --------------------------------------------------------------------


@router.get(
    "/observing_programs", response_model=Page[ObservingProgramOut], responses=ERROR_RESPONSES
)
def list_observing_programs(db: DB, _: Reader, page: Paging) -> Page[ObservingProgramOut]:
    """All observing programmes, in id order."""
    rows, nxt = paginate_by_id(db, select(ObservingProgram), ObservingProgram.id, page)
    return Page(
        items=[ObservingProgramOut.model_validate(r) for r in rows],
        next_cursor=nxt,
        limit=page.limit,
    )


@router.get(
    "/observing_programs/{program_id}",
    response_model=ObservingProgramDetail,
    responses=_not_found("observing program"),
)
def get_observing_program(
    program_id: Annotated[int, Path(ge=1, le=MAX_ID, description="Observing program id.")],
    db: DB,
    _: Reader,
) -> ObservingProgramDetail:
    """One observing programme with its sub-programmes (in id order)."""
    prog = db.scalar(
        select(ObservingProgram)
        .options(selectinload(ObservingProgram.sub_programs))
        .where(ObservingProgram.id == program_id)
    )
    if prog is None:
        raise not_found("observing program", program_id)
    return ObservingProgramDetail.model_validate(
        {
            **ObservingProgramOut.model_validate(prog).model_dump(),
            "sub_programs": sorted(prog.sub_programs, key=lambda s: s.id),
        }
    )


# --- sources ---------------------------------------------------------------------------------


def _any_source() -> Any:
    """``Source`` loaded together with the columns of every subclass (one query)."""
    return with_polymorphic(Source, [FixedSource, SolarSystemObject, ConstantElevationSource])


def source_out(s: Source) -> SourceOut:
    """Response model of a source, with the fields of its own kind."""
    return SOURCE_MODELS[s.source_type].model_validate(s)  # type: ignore[return-value]


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


@router.get("/sources", response_model=SourcePage, responses=ERROR_RESPONSES)
def list_sources(
    db: DB,
    _: Reader,
    page: Paging,
    source_type: Annotated[
        SourceType | None, Query(description="Only sources of this kind.")
    ] = None,
    name: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=255,
            pattern=r"^[^\x00]*$",
            description="Only sources whose name contains this text (case-insensitive).",
            examples=["orion"],
        ),
    ] = None,
) -> SourcePage:
    """Sources in id order, filtered; each with the fields of its kind (``source_type``)."""
    poly = _any_source()
    q = select(poly)
    if source_type is not None:
        q = q.where(poly.source_type == source_type)
    if name is not None:
        q = q.where(poly.name.ilike(f"%{_like_escape(name)}%", escape="\\"))
    rows, nxt = paginate_by_id(db, q, poly.id, page)
    return SourcePage(items=[source_out(r) for r in rows], next_cursor=nxt, limit=page.limit)


@router.get("/sources/{source_id}", response_model=SourceOut, responses=_not_found("source"))
def get_source(
    source_id: Annotated[int, Path(ge=1, le=MAX_ID, description="Source id.")],
    db: DB,
    _: Reader,
) -> SourceOut:
    """One source with the fields of its kind: ``fixed_source`` (ra/dec, frame, velocity),
    ``solar_system_object`` (ephemeris name, NAIF id) or ``constant_elevation_source``
    (elevation and the sky patch)."""
    poly = _any_source()
    src = db.scalar(select(poly).where(poly.id == source_id))
    if src is None:
        raise not_found("source", source_id)
    return source_out(src)


# --- observing modes -------------------------------------------------------------------------


@router.get("/obs_modes", response_model=Page[ObsModeOut], responses=ERROR_RESPONSES)
def list_obs_modes(db: DB, _: Reader, page: Paging) -> Page[ObsModeOut]:
    """All observing modes, in id order."""
    rows, nxt = paginate_by_id(db, select(ObsMode), ObsMode.id, page)
    return Page(
        items=[ObsModeOut.model_validate(r) for r in rows], next_cursor=nxt, limit=page.limit
    )


@router.get("/obs_modes/{obs_mode_id}", response_model=ObsModeOut, responses=_not_found("obs mode"))
def get_obs_mode(
    obs_mode_id: Annotated[int, Path(ge=1, le=MAX_ID, description="Observing mode id.")],
    db: DB,
    _: Reader,
) -> ObsModeOut:
    """One observing mode."""
    mode = db.get(ObsMode, obs_mode_id)
    if mode is None:
        raise not_found("obs mode", obs_mode_id)
    return ObsModeOut.model_validate(mode)


# --- obs units -------------------------------------------------------------------------------


def _with_module() -> Select[tuple[ObsUnit]]:
    """Obs units with their module configuration and its module (for the derived ids)."""
    return select(ObsUnit).options(
        selectinload(ObsUnit.instrument_module_configuration).selectinload(
            InstrumentModuleConfiguration.instrument_module
        )
    )


def obs_unit_out(u: ObsUnit) -> ObsUnitOut:
    """Response model of an obs unit, with its instrument module and instrument (if any)."""
    out = ObsUnitOut.model_validate(u)
    imc = u.instrument_module_configuration
    if imc is not None:
        out.instrument_module_id = imc.instrument_module_id
        out.instrument_id = imc.instrument_module.instrument_id
    return out


@router.get("/obs_units", response_model=Page[ObsUnitOut], responses=ERROR_RESPONSES)
def list_obs_units(
    db: DB,
    _: Reader,
    page: Paging,
    observing_program_id: Annotated[
        int | None, _id_filter("Only obs units of this observing program.")
    ] = None,
    source_id: Annotated[int | None, _id_filter("Only obs units of this source.")] = None,
    instrument_id: Annotated[
        int | None,
        _id_filter("Only obs units whose module configuration belongs to this instrument."),
    ] = None,
    instrument_module_id: Annotated[
        int | None, _id_filter("Only obs units whose module configuration is of this module.")
    ] = None,
    obs_mode_id: Annotated[int | None, _id_filter("Only obs units in this mode.")] = None,
    active: Annotated[
        bool | None, Query(description="Only obs units that are (or are not) active.")
    ] = None,
) -> Page[ObsUnitOut]:
    """Obs units in id order, filtered."""
    q = _with_module()
    if observing_program_id is not None:
        q = q.where(ObsUnit.observing_program_id == observing_program_id)
    if source_id is not None:
        q = q.where(ObsUnit.source_id == source_id)
    if obs_mode_id is not None:
        q = q.where(ObsUnit.obs_mode_id == obs_mode_id)
    if active is not None:
        q = q.where(ObsUnit.active.is_(active))
    if instrument_module_id is not None:
        q = q.where(
            ObsUnit.instrument_module_configuration_id.in_(
                select(InstrumentModuleConfiguration.id).where(
                    InstrumentModuleConfiguration.instrument_module_id == instrument_module_id
                )
            )
        )
    if instrument_id is not None:
        q = q.where(
            ObsUnit.instrument_module_configuration_id.in_(
                select(InstrumentModuleConfiguration.id)
                .join(InstrumentModule)
                .where(InstrumentModule.instrument_id == instrument_id)
            )
        )
    rows, nxt = paginate_by_id(db, q, ObsUnit.id, page)
    return Page(items=[obs_unit_out(r) for r in rows], next_cursor=nxt, limit=page.limit)


@router.get("/obs_units/{obs_unit_id}", response_model=ObsUnitOut, responses=_not_found("obs unit"))
def get_obs_unit(
    obs_unit_id: Annotated[int, Path(ge=1, le=MAX_ID, description="Obs unit id.")],
    db: DB,
    _: Reader,
) -> ObsUnitOut:
    """One obs unit."""
    unit = db.scalar(_with_module().where(ObsUnit.id == obs_unit_id))
    if unit is None:
        raise not_found("obs unit", obs_unit_id)
    return obs_unit_out(unit)
