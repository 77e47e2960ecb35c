"""Routes of the observatory API: filing into the buffer, reads merged with it, buffer status.

Included before the ordinary filing routers in observatory mode, so these answer the same
paths; the main site's routes and code paths are untouched.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from ccat_ops_db.models import ExecutedObsUnit, RawDataFile

from ..deps import Filer, Operator, Reader
from ..errors import ERROR_RESPONSES, ApiError, ErrorBody, not_found
from ..schemas.filing import (
    ExecutedObsUnitFinish,
    ExecutedObsUnitOut,
    ExecutedObsUnitStart,
    RawDataFileBulkIn,
    RawDataFileIn,
    RawDataFileOut,
)
from .buffer import BufferedItem, SiteBuffer
from .filing import buffer_files, buffer_finish, buffer_start, with_retry

ACCEPTED = {
    202: {"description": "Buffered at the observatory; replayed to the main site later"},
    200: {"description": "Already filed (buffered or replicated) with these values"},
    409: {
        "model": ErrorBody,
        "description": "Filed before with other values; a path another file holds; or filed "
        "before as-is but parked (the main site refused it: `errors[0]` has the reason)",
    },
}

filing_router = APIRouter()
site_router = APIRouter(prefix="/site", tags=["site"])


def _buffer(request: Request) -> SiteBuffer:
    return request.app.state.site_buffer  # type: ignore[no-any-return]


def _ack(item_id: uuid.UUID, new: bool, kind: str) -> JSONResponse:
    return JSONResponse(
        {"id": str(item_id), "kind": kind, "replication": "buffered" if new else "filed"},
        status_code=202 if new else 200,
    )


# --- filing -------------------------------------------------------------------------------


@filing_router.post(
    "/raw_data_files",
    tags=["raw data files"],
    summary="File one raw data file (observatory: buffered, 202)",
    responses={**ERROR_RESPONSES, **ACCEPTED},
)
async def site_file_one(body: RawDataFileIn, request: Request, who: Filer) -> JSONResponse:
    """Buffer one file durably and answer 202 with its id."""
    try:
        new, _ = await run_in_threadpool(
            with_retry,
            buffer_files,
            request.app.state.engine,
            _buffer(request),
            [body],
            who.token_id,
        )
    except ApiError as exc:  # the main site's shape for one file
        if len(exc.errors) == 1 and exc.status_code in (409, 422):  # one file: say it plainly
            exc.detail = exc.errors[0]["msg"]
        for err in exc.errors:  # one file, not a bulk: ["files", 0, f] -> ["body", f]
            if list(err.get("loc", ())[:2]) == ["files", 0]:
                err["loc"] = ["body", *err["loc"][2:]]
        raise
    _count(request, "file", new)
    return _ack(body.id, bool(new), "file")


@filing_router.post(
    "/raw_data_files/bulk",
    tags=["raw data files"],
    summary="File many raw data files (observatory: buffered, 202, all-or-nothing)",
    responses={**ERROR_RESPONSES, **ACCEPTED},
)
async def site_file_bulk(body: RawDataFileBulkIn, request: Request, who: Filer) -> JSONResponse:
    """Buffer up to the configured number of files in one transaction."""
    limit = request.app.state.settings.bulk_max_items
    if len(body.files) > limit:
        raise ApiError(413, f"{len(body.files)} files in one request; at most {limit}")
    new, unchanged = await run_in_threadpool(
        with_retry,
        buffer_files,
        request.app.state.engine,
        _buffer(request),
        body.files,
        who.token_id,
    )
    _count(request, "file", new)
    return JSONResponse(
        {
            "created": new,
            "unchanged": unchanged,
            "ids": [str(f.id) for f in body.files],
            "replication": "buffered",
        },
        status_code=202 if new else 200,
    )


@filing_router.post(
    "/executed_obs_units/start",
    tags=["executed obs units"],
    summary="Start an observation (observatory: buffered, 202)",
    responses={**ERROR_RESPONSES, **ACCEPTED},
)
async def site_start(body: ExecutedObsUnitStart, request: Request, who: Filer) -> JSONResponse:
    """Buffer the start of an observation."""
    new = await run_in_threadpool(
        with_retry, buffer_start, request.app.state.engine, _buffer(request), body, who.token_id
    )
    _count(request, "eou_start", int(new))
    return _ack(body.id, new, "eou_start")


@filing_router.put(
    "/executed_obs_units/{eou_id}/finish",
    tags=["executed obs units"],
    summary="Finish an observation (observatory: buffered, 202)",
    responses={**ERROR_RESPONSES, **ACCEPTED, 404: {"model": ErrorBody}},
)
async def site_finish(
    eou_id: uuid.UUID, body: ExecutedObsUnitFinish, request: Request, who: Filer
) -> JSONResponse:
    """Buffer the end of an observation."""
    new = await run_in_threadpool(
        with_retry,
        buffer_finish,
        request.app.state.engine,
        _buffer(request),
        eou_id,
        body,
        who.token_id,
    )
    _count(request, "eou_finish", int(new))
    return _ack(eou_id, new, "eou_finish")


def _count(request: Request, kind: str, n: int) -> None:
    counter = getattr(request.app.state, "site_writes", None)
    if counter is not None and n:
        counter.labels(kind).inc(n)


# --- reads: the replica, then the buffer ----------------------------------------------------


def _replication(item: BufferedItem) -> str:
    return {"pending": "buffered", "replayed": "replayed", "parked": "parked"}[item.state]


@filing_router.get(
    "/raw_data_files/{file_id}",
    tags=["raw data files"],
    summary="One file (observatory: the replica, else the buffer)",
    responses={**ERROR_RESPONSES, 404: {"model": ErrorBody}},
)
def site_get_file(file_id: uuid.UUID, request: Request, _: Reader) -> dict[str, Any]:
    """A file from the local replica or, if it is not there yet, from the buffer."""
    with Session(request.app.state.engine) as db:
        f = db.scalar(
            select(RawDataFile)
            .options(selectinload(RawDataFile.raw_data_package))
            .where(RawDataFile.id == file_id)
        )
        if f is not None:
            state = f.raw_data_package.state.value if f.raw_data_package else "unpackaged"
            attrs = {c: getattr(f, c) for c in RawDataFileOut.model_fields if c != "state"}
            out = RawDataFileOut.model_validate({**attrs, "state": state})
            return {**out.model_dump(mode="json"), "replication": "replica"}
    item = _buffer(request).get("file", file_id)
    if item is None:
        raise not_found("raw data file", file_id)
    return {
        **item.payload,
        "raw_data_package_id": None,
        "created_at": item.buffered_at.isoformat(),
        "created_by_token_id": item.token_id,
        "state": "unpackaged",
        "replication": _replication(item),
    }


@filing_router.get(
    "/executed_obs_units/{eou_id}",
    tags=["executed obs units"],
    summary="One executed obs unit (observatory: the replica merged with the buffer)",
    responses={**ERROR_RESPONSES, 404: {"model": ErrorBody}},
)
def site_get_eou(eou_id: uuid.UUID, request: Request, _: Reader) -> dict[str, Any]:
    """An executed obs unit from the replica, with a buffered start or finish laid over it."""
    buffer = _buffer(request)
    with Session(request.app.state.engine) as db:
        eou = db.get(ExecutedObsUnit, eou_id)
        out = ExecutedObsUnitOut.model_validate(eou).model_dump(mode="json") if eou else None
    replication = "replica"
    if out is None:
        start = buffer.get("eou_start", eou_id)
        if start is None:
            raise not_found("executed obs unit", eou_id)
        out = {
            "end_time": None,
            "status": "running",
            **start.payload,
            "created_at": start.buffered_at.isoformat(),
            "created_by_token_id": start.token_id,
        }
        replication = _replication(start)
    finish = buffer.get("eou_finish", eou_id)
    if finish is not None and (out.get("end_time") is None):
        out.update(finish.payload)
        replication = _replication(finish)
    return {**out, "replication": replication}


# --- buffer status and parked writes ------------------------------------------------------


@site_router.get("/buffer", summary="Depth, oldest write, replay rate and last error")
async def buffer_status(request: Request, _: Reader) -> dict[str, Any]:
    """The state of the observatory's write buffer."""
    status = await run_in_threadpool(_buffer(request).status)
    return {"site_mode": "observatory", **status.as_dict()}


@site_router.get("/parked", summary="Writes the main site refused, with the reason")
async def parked(
    request: Request, _: Reader, limit: Annotated[int, Query(ge=1, le=10_000)] = 1000
) -> dict[str, Any]:
    """Parked writes, oldest first (kept until an operator retries them)."""
    rows = await run_in_threadpool(_buffer(request).parked, limit)
    return {"items": [r.as_dict() for r in rows], "count": len(rows)}


@site_router.post(
    "/parked/{seq}/retry",
    summary="Queue a parked write for replay again",
    responses={**ERROR_RESPONSES, 404: {"model": ErrorBody}},
)
async def retry(seq: int, request: Request, _: Operator) -> dict[str, Any]:
    """Put a parked write back in the queue (after fixing the cause at the main site)."""
    n = await run_in_threadpool(_buffer(request).retry_parked, seq)
    if not n:
        raise not_found("parked write", seq)
    return {"seq": seq, "state": "pending"}
