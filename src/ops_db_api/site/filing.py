"""Filing at the observatory: validate against the local replica, then buffer durably.

The same rules as on the main site, checked as far as the observatory can see: a UUID filed
again with the same content answers 200, with other content 409 naming the fields; a bulk
request is all-or-nothing; a (source location, path) another file holds (replica, or buffer
on its way to the main site) is a 409 as on the main site; a write filed again as it was but
parked answers 409 "parked" with the main site's reason. What only the main site can know
(a conflict with a write that reached Cologne by another way) shows up at replay and is
parked there.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from ccat_ops_db.models import DataLocation, ExecutedObsUnit, InstrumentModule, RawDataFile

from ..errors import ApiError
from ..filing import (
    FILE_FIELDS,
    START_FIELDS,
    check_obs_unit_references,
    differing_fields,
    path_conflict,
    source_location_error,
)
from ..schemas.filing import ExecutedObsUnitFinish, ExecutedObsUnitStart, RawDataFileIn
from .buffer import BufferedItem, SiteBuffer

log = logging.getLogger("ops_db_api.site")


def _payload_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _conflict(what: str, item_id: uuid.UUID, fields: list[str], loc: list[Any]) -> dict[str, Any]:
    return {
        "loc": loc,
        "msg": f"{what} {item_id} was filed with other values: {', '.join(fields)}",
        "type": "conflict",
        "fields": fields,
    }


def _parked(what: str, item: BufferedItem, loc: list[Any]) -> dict[str, Any]:
    """A write filed again as it was, but parked: the main site refused it (409 at filing)."""
    return {
        "loc": loc,
        "msg": f"{what} {item.item_id} is parked: the main site refused it "
        f"({item.park_reason}); an operator retries it once the cause is fixed",
        "type": "parked",
        "replication": "parked",
        "reason": item.park_reason,
        "status_code": item.park_status,
        "seq": item.seq,
    }


def _paths_in_replica(db: Session, keys: set[tuple[int, str]]) -> dict[tuple[int, str], uuid.UUID]:
    """The files of the replica at these (source location, relative path) keys."""
    held: dict[tuple[int, str], uuid.UUID] = {}
    for loc_id in {loc for loc, _ in keys}:
        paths = sorted(p for loc, p in keys if loc == loc_id)
        for n in range(0, len(paths), 5000):
            for fid, path in db.execute(
                select(RawDataFile.id, RawDataFile.relative_path).where(
                    RawDataFile.source_location_id == loc_id,
                    RawDataFile.relative_path.in_(paths[n : n + 5000]),
                )
            ):
                held[(loc_id, path)] = fid
    return held


def buffer_files(
    replica: Engine, buffer: SiteBuffer, files: list[RawDataFileIn], token_id: int | None
) -> tuple[int, int]:
    """Validate ``files`` and buffer the new ones in one transaction; returns (new, unchanged).

    Raises :class:`ApiError` 422/409 listing every rejected item before anything is written:
    409 for a file filed before with other values, for a new file at a (source location,
    path) another file holds - in the replica, or in the buffer on its way to the main site -
    and for a file filed again that the main site refused (parked, with the reason).
    """
    payloads = [f.model_dump(mode="json") for f in files]
    wanted = [f.model_dump() for f in files]
    errors: list[dict[str, Any]] = []
    first: dict[uuid.UUID, int] = {}
    paths: dict[tuple[int, str], int] = {}
    for i, f in enumerate(files):
        j = first.setdefault(f.id, i)
        if j != i and payloads[j] != payloads[i]:
            errors.append(
                {"loc": ["files", i, "id"], "msg": f"same id as item {j} with other content"}
            )
        k = paths.setdefault((f.source_location_id, f.relative_path), i)
        if k != i and files[k].id != f.id:
            errors.append({"loc": ["files", i, "relative_path"], "msg": f"same path as item {k}"})
    ids = list(first)
    with Session(replica) as db:
        modules = set(
            db.scalars(
                select(InstrumentModule.id).where(
                    InstrumentModule.id.in_({f.instrument_module_id for f in files})
                )
            )
        )
        locations = dict(
            db.execute(
                select(DataLocation.id, DataLocation.location_type).where(
                    DataLocation.id.in_({f.source_location_id for f in files})
                )
            ).all()
        )
        eou_ids = {f.executed_obs_unit_id for f in files}
        eous = set(db.scalars(select(ExecutedObsUnit.id).where(ExecutedObsUnit.id.in_(eou_ids))))
        in_replica: dict[uuid.UUID, RawDataFile] = {}
        for n in range(0, len(ids), 5000):
            for row in db.scalars(select(RawDataFile).where(RawDataFile.id.in_(ids[n : n + 5000]))):
                in_replica[row.id] = row
                db.expunge(row)
        replica_paths = _paths_in_replica(db, set(paths))
    with buffer.engine.begin() as conn:
        buffer.lock_paths(conn, paths)  # until commit: the path check below cannot race
        eous |= set(buffer.existing(conn, "eou_start", eou_ids - eous))
        for i, f in enumerate(files):
            if f.instrument_module_id not in modules:
                errors.append(
                    {
                        "loc": ["files", i, "instrument_module_id"],
                        "msg": f"instrument module {f.instrument_module_id} does not exist",
                    }
                )
            if f.executed_obs_unit_id not in eous:
                errors.append(
                    {
                        "loc": ["files", i, "executed_obs_unit_id"],
                        "msg": f"executed obs unit {f.executed_obs_unit_id} does not exist "
                        "(start it first)",
                    }
                )
            bad = source_location_error(
                i, f.source_location_id, locations.get(f.source_location_id)
            )
            if bad is not None:
                errors.append(bad)
        if errors:
            raise ApiError(422, f"{len(errors)} item(s) rejected", errors)
        in_buffer = buffer.existing(conn, "file", [i for i in ids if i not in in_replica])
        buffer_paths = buffer.paths_held(conn, paths)
        new: list[tuple[uuid.UUID, dict[str, Any]]] = []
        unchanged = 0
        for i, f in enumerate(files):
            if first[f.id] != i:
                continue
            if f.id in in_replica:
                diff = differing_fields(in_replica[f.id], wanted[i], FILE_FIELDS)
            elif f.id in in_buffer:
                old = in_buffer[f.id]
                diff = _payload_diff(old.payload, payloads[i])
                if not diff and old.state == "parked":
                    errors.append(_parked("file", old, ["files", i]))
                    continue
            else:
                key = (f.source_location_id, f.relative_path)
                holder = replica_paths.get(key) or buffer_paths.get(key)
                if holder is not None and holder != f.id:
                    errors.append(path_conflict(holder, ["files", i, "relative_path"]))
                else:
                    new.append((f.id, payloads[i]))
                continue
            if diff:
                errors.append(_conflict("file", f.id, diff, ["files", i]))
            else:
                unchanged += 1
        if errors:
            raise ApiError(409, f"{len(errors)} item(s) conflict with filed data", errors)
        inserted = buffer.insert_new(conn, "file", new, token_id)
        if inserted != len(new):
            # a concurrent request buffered some of the same ids: check everything again
            raise _RacedError()
    log.info(
        "buffered raw data files",
        extra={"buffered": len(new), "unchanged": unchanged, "token_id": token_id},
    )
    return len(new), unchanged


class _RacedError(Exception):
    """Another request buffered one of the same ids between the check and the insert."""


def with_retry(fn: Any, *args: Any) -> Any:
    """Run a buffering function, once more if it raced with a concurrent request."""
    try:
        return fn(*args)
    except _RacedError:
        return fn(*args)


def buffer_start(
    replica: Engine, buffer: SiteBuffer, body: ExecutedObsUnitStart, token_id: int | None
) -> bool:
    """Buffer the start of an observation; True if new, False if already filed as-is."""
    payload = body.model_dump(mode="json")
    wanted = body.model_dump()
    with Session(replica) as db:
        existing = db.get(ExecutedObsUnit, body.id)
        if existing is not None:
            diff = differing_fields(existing, wanted, START_FIELDS)
            if diff:
                raise _start_conflict(body.id, diff)
            return False
        check_obs_unit_references(db, body.obs_unit_id, body.instrument_id)
    with buffer.engine.begin() as conn:
        old = buffer.existing(conn, "eou_start", [body.id]).get(body.id)
        if old is not None:
            diff = _payload_diff(old.payload, payload)
            if diff:
                raise _start_conflict(body.id, diff)
            if old.state == "parked":
                raise _parked_error("executed obs unit start", old)
            return False
        if buffer.insert_new(conn, "eou_start", [(body.id, payload)], token_id) != 1:
            raise _RacedError()
    log.info("buffered obs unit start", extra={"executed_obs_unit_id": str(body.id)})
    return True


def _start_conflict(eou_id: uuid.UUID, diff: list[str]) -> ApiError:
    return ApiError(
        409,
        f"executed obs unit {eou_id} was started with other values: {', '.join(diff)}",
        [
            {"loc": ["body", f], "msg": "differs from the filed value", "type": "conflict"}
            for f in diff
        ],
    )


def buffer_finish(
    replica: Engine,
    buffer: SiteBuffer,
    eou_id: uuid.UUID,
    body: ExecutedObsUnitFinish,
    token_id: int | None,
) -> bool:
    """Buffer the end of an observation; True if new, False if already finished as-is."""
    payload = body.model_dump(mode="json", exclude_none=True)
    values = body.model_dump(exclude_none=True)
    with Session(replica) as db:
        eou = db.get(ExecutedObsUnit, eou_id)
        start_time = eou.start_time if eou is not None else None
        if eou is not None and eou.end_time is not None:
            diff = differing_fields(eou, values, list(values))
            if diff:
                raise _finish_conflict(eou_id, diff)
            return False
    with buffer.engine.begin() as conn:
        if start_time is None:
            started = buffer.existing(conn, "eou_start", [eou_id]).get(eou_id)
            if started is None:
                raise ApiError(404, f"executed obs unit {eou_id} not found")
            start_time = dt.datetime.fromisoformat(started.payload["start_time"])
        if start_time.tzinfo is None:
            start_time = start_time.replace(tzinfo=dt.UTC)
        if body.end_time < start_time:
            raise ApiError(
                422,
                "end_time is before start_time",
                [{"loc": ["body", "end_time"], "msg": f"before start_time {start_time}"}],
            )
        old = buffer.existing(conn, "eou_finish", [eou_id]).get(eou_id)
        if old is not None:
            diff = _payload_diff(old.payload, payload)
            if diff:
                raise _finish_conflict(eou_id, diff)
            if old.state == "parked":
                raise _parked_error("executed obs unit finish", old)
            return False
        if buffer.insert_new(conn, "eou_finish", [(eou_id, payload)], token_id) != 1:
            raise _RacedError()
    log.info("buffered obs unit finish", extra={"executed_obs_unit_id": str(eou_id)})
    return True


def _finish_conflict(eou_id: uuid.UUID, diff: list[str]) -> ApiError:
    return ApiError(
        409,
        f"executed obs unit {eou_id} was finished with other values: {', '.join(diff)}",
        [
            {"loc": ["body", f], "msg": "differs from the filed value", "type": "conflict"}
            for f in diff
        ],
    )


def _parked_error(what: str, item: BufferedItem) -> ApiError:
    """409 for a start or finish filed again as it was, which the main site refused."""
    err = _parked(what, item, ["body"])
    return ApiError(409, err["msg"], [err])
