"""Executed obs units: an instrument starts and finishes observations with its own UUIDs."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from ccat_ops_db.enums import ExecutionStatus
from ccat_ops_db.models import ExecutedObsUnit

from ..deps import DB, Filer, Paging, Reader, audit, paginate
from ..errors import ERROR_RESPONSES, ApiError, ErrorBody, not_found
from ..filing import START_FIELDS, check_obs_unit_references, differing_fields, same_value
from ..schemas.common import Page
from ..schemas.filing import ExecutedObsUnitFinish, ExecutedObsUnitOut, ExecutedObsUnitStart

router = APIRouter(prefix="/executed_obs_units", tags=["executed obs units"])


@router.post(
    "/start",
    status_code=201,
    response_model=ExecutedObsUnitOut,
    summary="Start an observation (idempotent on its UUID)",
    responses={
        **ERROR_RESPONSES,
        200: {"model": ExecutedObsUnitOut, "description": "Already started with these values"},
        409: {"model": ErrorBody, "description": "Already started with other values"},
    },
)
def start(
    body: ExecutedObsUnitStart, request: Request, response: Response, db: DB, who: Filer
) -> ExecutedObsUnit:
    """Record the start of an observation under the UUID the instrument generated."""
    wanted = body.model_dump()
    existing = db.get(ExecutedObsUnit, body.id)
    if existing is not None:
        diff = differing_fields(existing, wanted, START_FIELDS)
        if diff:
            raise ApiError(
                409,
                f"executed obs unit {body.id} was started with other values: {', '.join(diff)}",
                [
                    {"loc": ["body", f], "msg": "differs from the filed value", "type": "conflict"}
                    for f in diff
                ],
            )
        response.status_code = 200
        return existing
    check_obs_unit_references(db, body.obs_unit_id, body.instrument_id)
    eou = ExecutedObsUnit(
        **wanted, status=ExecutionStatus.RUNNING, created_by_token_id=who.token_id
    )
    db.add(eou)
    audit(db, who, request, 201, "executed_obs_unit", [body.id])
    try:
        db.commit()
    except IntegrityError:  # a concurrent start of the same id: answer as a refile would
        db.rollback()
        return start(body, request, response, db, who)
    request.app.state.metrics.observations_started.inc()
    return eou


@router.put(
    "/{eou_id}/finish",
    response_model=ExecutedObsUnitOut,
    summary="Finish an observation (idempotent)",
    responses={**ERROR_RESPONSES, 404: {"model": ErrorBody}, 409: {"model": ErrorBody}},
)
def finish(
    eou_id: uuid.UUID, body: ExecutedObsUnitFinish, request: Request, db: DB, who: Filer
) -> ExecutedObsUnit:
    """Record the end and outcome; finishing again with the same values is a success."""
    eou = db.get(ExecutedObsUnit, eou_id, with_for_update=True)
    if eou is None:
        raise not_found("executed obs unit", eou_id)
    start_time = eou.start_time if eou.start_time.tzinfo else eou.start_time.replace(tzinfo=dt.UTC)
    if body.end_time < start_time:
        raise ApiError(
            422,
            "end_time is before start_time",
            [{"loc": ["body", "end_time"], "msg": f"before start_time {start_time}"}],
        )
    values = body.model_dump(exclude_none=True)
    if eou.end_time is not None:
        diff = [k for k, v in values.items() if not same_value(getattr(eou, k), v)]
        if diff:
            raise ApiError(
                409,
                f"executed obs unit {eou_id} was finished with other values: {', '.join(diff)}",
                [
                    {"loc": ["body", f], "msg": "differs from the filed value", "type": "conflict"}
                    for f in diff
                ],
            )
        return eou
    for key, value in values.items():
        setattr(eou, key, ExecutionStatus(value) if key == "status" else value)
    audit(db, who, request, 200, "executed_obs_unit", [eou_id], detail=f"finish {body.status}")
    db.commit()
    return eou


@router.get(
    "/{eou_id}",
    response_model=ExecutedObsUnitOut,
    responses={**ERROR_RESPONSES, 404: {"model": ErrorBody}},
)
def get_one(eou_id: uuid.UUID, db: DB, _: Reader) -> ExecutedObsUnit:
    """One executed obs unit."""
    eou = db.get(ExecutedObsUnit, eou_id)
    if eou is None:
        raise not_found("executed obs unit", eou_id)
    return eou


@router.get("", response_model=Page[ExecutedObsUnitOut], responses=ERROR_RESPONSES)
def list_all(
    db: DB,
    _: Reader,
    page: Paging,
    obs_unit_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    instrument_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    status: ExecutionStatus | None = None,
    started_after: dt.datetime | None = None,
    started_before: dt.datetime | None = None,
) -> Page[ExecutedObsUnitOut]:
    """Executed obs units in start order, filtered."""
    q = select(ExecutedObsUnit)
    if obs_unit_id is not None:
        q = q.where(ExecutedObsUnit.obs_unit_id == obs_unit_id)
    if instrument_id is not None:
        q = q.where(ExecutedObsUnit.instrument_id == instrument_id)
    if status is not None:
        q = q.where(ExecutedObsUnit.status == status)
    if started_after is not None:
        q = q.where(ExecutedObsUnit.start_time >= started_after)
    if started_before is not None:
        q = q.where(ExecutedObsUnit.start_time < started_before)
    rows, nxt = paginate(db, q, [ExecutedObsUnit.start_time, ExecutedObsUnit.id], page)
    return Page(
        items=[ExecutedObsUnitOut.model_validate(r) for r in rows],
        next_cursor=nxt,
        limit=page.limit,
    )
