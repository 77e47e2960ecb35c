"""Raw data files: filed one at a time or in bulk (all-or-nothing), read back, listed."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import exists, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from ccat_ops_db.enums import LocationType, PackageState, PhysicalCopyStatus
from ccat_ops_db.models import PhysicalCopy, RawDataFile, RawDataPackage

from ..deps import DB, Filer, Paging, Principal, Reader, audit, fast_pool, json_response, paginate
from ..errors import ERROR_RESPONSES, ApiError, ErrorBody, not_found
from ..fastpath import file_new, file_one_params
from ..filing import file_rows, insert_files, location_type, try_insert_one
from ..schemas.common import Page
from ..schemas.filing import FilingResult, RawDataFileBulkIn, RawDataFileIn, RawDataFileOut

router = APIRouter(prefix="/raw_data_files", tags=["raw data files"])

FileState = Literal["unpackaged", "waiting", "transferring", "archived", "failed"]


def to_out(f: RawDataFile) -> RawDataFileOut:
    """Response model of a file, with its state derived from its package."""
    state = f.raw_data_package.state.value if f.raw_data_package else "unpackaged"
    return RawDataFileOut.model_validate({**_attrs(f), "state": state})


def _attrs(f: RawDataFile) -> dict[str, object]:
    return {c: getattr(f, c) for c in RawDataFileOut.model_fields if c != "state"}


CONFLICT = {409: {"model": ErrorBody, "description": "Filed before with other values"}}


@router.post(
    "",
    status_code=201,
    response_model=RawDataFileOut,
    summary="File one raw data file (idempotent on its UUID)",
    responses={
        **ERROR_RESPONSES,
        **CONFLICT,
        200: {"model": RawDataFileOut, "description": "Already filed as-is"},
    },
)
async def file_one(body: RawDataFileIn, request: Request, who: Filer) -> Response:
    """Record one file; filing it again with identical values answers 200."""
    state = request.app.state
    pool = fast_pool(state)
    if pool is not None:
        now = dt.datetime.now(dt.UTC)
        params = file_one_params(
            body,
            user_id=who.user_id,
            token_id=who.token_id,
            method=request.method,
            path=request.url.path,
            client_ip=request.client.host if request.client else None,
            now=now,
        )
        if await file_new(pool, params):
            state.metrics.files_filed.inc()
            state.metrics.bytes_filed.inc(body.size)
            # Every value was validated on the way in: build the answer without validating
            # it all again (FastAPI would, for a returned model).
            out = RawDataFileOut.model_construct(
                **body.__dict__,
                raw_data_package_id=None,
                created_at=now,
                created_by_token_id=who.token_id,
                state="unpackaged",
            )
            return json_response(out, 201)
    # SQLite, or not new, or not valid: the full check says which (and files it if it raced).
    status, out = await run_in_threadpool(_file_one_checked, request, body, who, pool is None)
    return json_response(out, status)


def _file_one_checked(
    request: Request, body: RawDataFileIn, who: Principal, try_fast: bool
) -> tuple[int, RawDataFileOut]:
    """File ``body`` with the full check; returns (201 or 200, the file as stored)."""
    state = request.app.state
    with Session(state.engine, expire_on_commit=False) as db:
        if try_fast and location_type(state, db, body.source_location_id) == LocationType.SOURCE:
            row = try_insert_one(db, body, who.token_id)
            if row is not None:
                audit(db, who, request, 201, "raw_data_file", [body.id])
                db.commit()
                state.metrics.files_filed.inc()
                state.metrics.bytes_filed.inc(body.size)
                return 201, RawDataFileOut.model_validate(
                    {**row, "raw_data_package_id": None, "state": "unpackaged"}
                )
            db.rollback()
        status = 201
        for attempt in (1, 2):
            try:
                rows, _unchanged = file_rows(db, [body], who.token_id)
            except ApiError as exc:
                if len(exc.errors) == 1 and exc.status_code in (409, 422):  # one file: plainly
                    exc.detail = exc.errors[0]["msg"]
                for err in exc.errors:  # one file, not a bulk: ["files", 0, f] -> ["body", f]
                    if list(err.get("loc", ())[:2]) == ["files", 0]:
                        err["loc"] = ["body", *err["loc"][2:]]
                raise
            if rows:
                try:
                    insert_files(db, rows)
                    audit(db, who, request, 201, "raw_data_file", [body.id])
                    db.commit()
                except IntegrityError:
                    db.rollback()
                    if attempt == 2:
                        raise
                    continue  # raced with a concurrent request: check again
                state.metrics.files_filed.inc()
                state.metrics.bytes_filed.inc(body.size)
            else:
                status = 200
            break
        f = db.scalar(
            select(RawDataFile)
            .options(selectinload(RawDataFile.raw_data_package))
            .where(RawDataFile.id == body.id)
        )
        assert f is not None
        return status, to_out(f)


@router.post(
    "/bulk",
    response_model=FilingResult,
    summary="File many raw data files at once (all-or-nothing)",
    responses={
        **ERROR_RESPONSES,
        **CONFLICT,
        413: {"model": ErrorBody, "description": "More items than the server accepts at once"},
    },
)
def file_bulk(body: RawDataFileBulkIn, request: Request, db: DB, who: Filer) -> Response:
    """File up to the configured number of files; any rejected item rejects the request,
    and the answer lists every rejected item with its index and reason."""
    limit = request.app.state.settings.bulk_max_items
    if len(body.files) > limit:
        raise ApiError(413, f"{len(body.files)} files in one request; at most {limit}")
    for attempt in (1, 2):
        rows, unchanged = file_rows(db, body.files, who.token_id)
        if rows:
            try:
                insert_files(db, rows)
                audit(db, who, request, 200, "raw_data_file", [r["id"] for r in rows])
                db.commit()
            except IntegrityError:
                db.rollback()
                if attempt == 2:
                    raise
                continue  # raced with a concurrent request: check again
            request.app.state.metrics.files_filed.inc(len(rows))
            request.app.state.metrics.bytes_filed.inc(sum(r["size"] for r in rows))
        return json_response(  # the ids are validated UUIDs already: no second validation
            FilingResult.model_construct(
                created=len(rows), unchanged=len(unchanged), ids=[f.id for f in body.files]
            )
        )
    raise AssertionError("unreachable")


@router.get(
    "/{file_id}",
    response_model=RawDataFileOut,
    responses={**ERROR_RESPONSES, 404: {"model": ErrorBody}},
)
def get_one(file_id: uuid.UUID, db: DB, _: Reader) -> RawDataFileOut:
    """One file."""
    f = db.scalar(
        select(RawDataFile)
        .options(selectinload(RawDataFile.raw_data_package))
        .where(RawDataFile.id == file_id)
    )
    if f is None:
        raise not_found("raw data file", file_id)
    return to_out(f)


@router.get("", response_model=Page[RawDataFileOut], responses=ERROR_RESPONSES)
def list_all(
    db: DB,
    _: Reader,
    page: Paging,
    executed_obs_unit_id: uuid.UUID | None = None,
    instrument_module_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    state: FileState | None = None,
    location_id: Annotated[
        int | None,
        Query(ge=1, le=2**31 - 1, description="Files with a live copy at this location."),
    ] = None,
    filed_after: dt.datetime | None = None,
    filed_before: dt.datetime | None = None,
) -> Page[RawDataFileOut]:
    """Files in filing order, filtered."""
    q = select(RawDataFile).options(selectinload(RawDataFile.raw_data_package))
    if executed_obs_unit_id is not None:
        q = q.where(RawDataFile.executed_obs_unit_id == executed_obs_unit_id)
    if instrument_module_id is not None:
        q = q.where(RawDataFile.instrument_module_id == instrument_module_id)
    if state == "unpackaged":
        q = q.where(RawDataFile.raw_data_package_id.is_(None))
    elif state is not None:
        q = q.where(
            RawDataFile.raw_data_package_id.in_(
                select(RawDataPackage.id).where(RawDataPackage.state == PackageState(state))
            )
        )
    if location_id is not None:
        q = q.where(
            exists().where(
                PhysicalCopy.raw_data_file_id == RawDataFile.id,
                PhysicalCopy.data_location_id == location_id,
                PhysicalCopy.status.in_([PhysicalCopyStatus.PRESENT, PhysicalCopyStatus.STAGED]),
            )
        )
    if filed_after is not None:
        q = q.where(RawDataFile.created_at >= filed_after)
    if filed_before is not None:
        q = q.where(RawDataFile.created_at < filed_before)
    rows, nxt = paginate(db, q, [RawDataFile.created_at, RawDataFile.id], page)
    return Page(items=[to_out(r) for r in rows], next_cursor=nxt, limit=page.limit)
