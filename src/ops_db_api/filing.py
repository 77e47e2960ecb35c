"""Set-based, idempotent filing of executed obs units and raw data files.

Rules: the same UUID with the same content again is a success (nothing changes); the same
UUID with different content is a conflict naming the differing fields; a bulk request is
all-or-nothing and reports every rejected item with its index and reason.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import any_, bindparam, insert, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ccat_ops_db.enums import CopyType, LocationType, PhysicalCopyStatus
from ccat_ops_db.models import (
    DataLocation,
    ExecutedObsUnit,
    InstrumentModule,
    PhysicalCopy,
    RawDataFile,
)

from .errors import ApiError
from .schemas.filing import RawDataFileIn

FILE_FIELDS = (
    "name",
    "relative_path",
    "size",
    "checksum",
    "checksum_algorithm",
    "instrument_module_id",
    "executed_obs_unit_id",
    "source_location_id",
    "file_type",
    "written_at",
    "extra",
)
CHUNK = 2000  # rows per IN (...) lookup / per INSERT batch


#: The fields of an executed obs unit's start; a repeated start must match them.
START_FIELDS = (
    "obs_unit_id",
    "instrument_id",
    "start_time",
    "mean_pwv_mm",
    "mean_elevation_deg",
    "conditions",
    "comment",
)


def same_value(a: Any, b: Any) -> bool:
    """Compare a stored value with an input value (timezone-naive SQLite datetimes too)."""
    if isinstance(a, dt.datetime) and isinstance(b, dt.datetime):
        if a.tzinfo is None:
            a = a.replace(tzinfo=dt.UTC)
        if b.tzinfo is None:
            b = b.replace(tzinfo=dt.UTC)
        return a == b
    if hasattr(a, "value") and not hasattr(b, "value"):
        a = a.value
    if hasattr(b, "value") and not hasattr(a, "value"):
        b = b.value
    return bool(a == b)


def differing_fields(existing: Any, wanted: dict[str, Any], fields: Sequence[str]) -> list[str]:
    """The names of ``fields`` whose stored value differs from ``wanted``."""
    return [f for f in fields if f in wanted and not same_value(getattr(existing, f), wanted[f])]


def source_location_error(
    i: int, location_id: int, loc_type: LocationType | None
) -> dict[str, Any] | None:
    """The error of item ``i`` whose source location is unknown or not a SOURCE, else None."""
    if loc_type is None:
        return {
            "loc": ["files", i, "source_location_id"],
            "msg": f"data location {location_id} does not exist",
        }
    if loc_type != LocationType.SOURCE:
        return {
            "loc": ["files", i, "source_location_id"],
            "msg": f"data location {location_id} is a {loc_type.value} location, not a source",
        }
    return None


def check_obs_unit_references(
    db: Session, obs_unit_id: int | None, instrument_id: int | None
) -> None:
    """422 naming each reference of an executed obs unit that does not exist."""
    from ccat_ops_db.models import Instrument, ObsUnit

    errors = []
    if obs_unit_id is not None and db.get(ObsUnit, obs_unit_id) is None:
        errors.append(
            {"loc": ["body", "obs_unit_id"], "msg": f"obs unit {obs_unit_id} does not exist"}
        )
    if instrument_id is not None and db.get(Instrument, instrument_id) is None:
        errors.append(
            {"loc": ["body", "instrument_id"], "msg": f"instrument {instrument_id} does not exist"}
        )
    if errors:
        raise ApiError(422, "unknown references", errors)


def _chunks(items: list[Any], n: int = CHUNK) -> list[list[Any]]:
    return [items[i : i + n] for i in range(0, len(items), n)]


def _is_postgresql(db: Session) -> bool:
    return db.get_bind().dialect.name == "postgresql"


def _chunk_size(db: Session) -> int:
    """Values per lookup: one array parameter on PostgreSQL, bounded IN lists elsewhere."""
    return 50_000 if _is_postgresql(db) else CHUNK


def _among(db: Session, column: Any, values: list[Any]) -> Any:
    """``column IN values``; on PostgreSQL ``column = ANY(:array)``, a single parameter.

    Thousands of separate bind parameters make a long statement the driver has to parse and
    the server to plan each time; one array parameter keeps the statement short and cached.
    """
    if _is_postgresql(db):
        return column == any_(bindparam(None, list(values), type_=ARRAY(column.type)))
    return column.in_(values)


def path_conflict(holder: Any, loc: list[Any]) -> dict[str, Any]:
    """The error item for a new file at a (source location, path) another file holds."""
    return {
        "loc": loc,
        "msg": f"path already filed at this location as file {holder}",
        "type": "conflict",
    }


def file_rows(
    db: Session, files: list[RawDataFileIn], token_id: int | None
) -> tuple[list[dict[str, Any]], list[uuid.UUID]]:
    """Validate ``files`` against the database; returns (rows to insert, ids already filed).

    Raises :class:`ApiError` 422 (unknown references) or 409 (conflicts) listing every
    rejected item by index, before anything is written.
    """
    errors: list[dict[str, Any]] = []
    wanted = [f.model_dump() for f in files]

    # duplicates inside the request
    seen_ids: dict[uuid.UUID, int] = {}
    seen_paths: dict[tuple[int, str], int] = {}
    for i, w in enumerate(wanted):
        j = seen_ids.setdefault(w["id"], i)
        if j != i and any(not same_value(wanted[j][k], w[k]) for k in FILE_FIELDS):
            errors.append(
                {"loc": ["files", i, "id"], "msg": f"same id as item {j} with other content"}
            )
        key = (w["source_location_id"], w["relative_path"])
        k = seen_paths.setdefault(key, i)
        if k != i and wanted[k]["id"] != w["id"]:
            errors.append({"loc": ["files", i, "relative_path"], "msg": f"same path as item {k}"})

    # references, set-based
    def known(column: Any, values: set[Any]) -> set[Any]:
        found: set[Any] = set()
        for chunk in _chunks(sorted(values, key=str)):
            found.update(db.scalars(select(column).where(_among(db, column, chunk))))
        return found

    modules = known(InstrumentModule.id, {w["instrument_module_id"] for w in wanted})
    eous = known(ExecutedObsUnit.id, {w["executed_obs_unit_id"] for w in wanted})
    loc_ids = {w["source_location_id"] for w in wanted}
    locations = {
        loc_id: loc_type
        for loc_id, loc_type in db.execute(
            select(DataLocation.id, DataLocation.location_type).where(DataLocation.id.in_(loc_ids))
        )
    }
    for i, w in enumerate(wanted):
        if w["instrument_module_id"] not in modules:
            errors.append(
                {
                    "loc": ["files", i, "instrument_module_id"],
                    "msg": f"instrument module {w['instrument_module_id']} does not exist",
                }
            )
        if w["executed_obs_unit_id"] not in eous:
            errors.append(
                {
                    "loc": ["files", i, "executed_obs_unit_id"],
                    "msg": f"executed obs unit {w['executed_obs_unit_id']} does not exist "
                    "(start it first)",
                }
            )
        bad = source_location_error(
            i, w["source_location_id"], locations.get(w["source_location_id"])
        )
        if bad is not None:
            errors.append(bad)
    if errors:
        raise ApiError(422, f"{len(errors)} item(s) rejected", errors)

    # already filed: same content is fine, different content is a conflict
    existing: dict[uuid.UUID, RawDataFile] = {}
    for chunk in _chunks(list(seen_ids), _chunk_size(db)):
        for row in db.scalars(select(RawDataFile).where(_among(db, RawDataFile.id, chunk))):
            existing[row.id] = row
    by_path: dict[tuple[int, str], uuid.UUID] = {}
    for loc_id in loc_ids:
        paths = [w["relative_path"] for w in wanted if w["source_location_id"] == loc_id]
        for chunk in _chunks(paths, _chunk_size(db)):
            for fid, path in db.execute(
                select(RawDataFile.id, RawDataFile.relative_path).where(
                    RawDataFile.source_location_id == loc_id,
                    _among(db, RawDataFile.relative_path, chunk),
                )
            ):
                by_path[(loc_id, path)] = fid
    rows: list[dict[str, Any]] = []
    unchanged: list[uuid.UUID] = []
    queued: set[uuid.UUID] = set()
    for i, w in enumerate(wanted):
        old = existing.get(w["id"])
        if old is not None:
            diff = differing_fields(old, w, FILE_FIELDS)
            if diff:
                errors.append(
                    {
                        "loc": ["files", i],
                        "msg": f"file {w['id']} was filed with other values: {', '.join(diff)}",
                        "type": "conflict",
                        "fields": diff,
                    }
                )
            else:
                unchanged.append(w["id"])
            continue
        other = by_path.get((w["source_location_id"], w["relative_path"]))
        if other is not None and other != w["id"]:
            errors.append(path_conflict(other, ["files", i, "relative_path"]))
            continue
        if w["id"] in queued:
            continue
        queued.add(w["id"])
        rows.append({**w, "created_by_token_id": token_id})
    if errors:
        raise ApiError(409, f"{len(errors)} item(s) conflict with filed data", errors)
    return rows, unchanged


def _insert_files_copy(db: Session, rows: list[dict[str, Any]], now: dt.datetime) -> None:
    """PostgreSQL: stream the rows with COPY inside the request's transaction.

    COPY runs on the driver's connection, below SQLAlchemy: its errors are raised as the
    SQLAlchemy exceptions they would have been (a duplicate key - a concurrent request filed
    the same file - is an IntegrityError, a value PostgreSQL cannot store a DataError), so the
    callers and the error handlers treat both ways of inserting alike.
    """
    import psycopg
    from sqlalchemy.exc import DBAPIError

    connection = db.connection()
    try:
        _copy_rows(connection.connection.driver_connection, rows, now)
    except psycopg.Error as exc:
        raise DBAPIError.instance(
            "COPY raw_data_file, physical_copy",
            None,
            exc,
            psycopg.Error,
            dialect=db.get_bind().dialect,
        ) from exc


def _copy_rows(raw: Any, rows: list[dict[str, Any]], now: dt.datetime) -> None:
    from psycopg.types.json import Jsonb

    cols = (
        "id, name, relative_path, size, checksum, checksum_algorithm, instrument_module_id,"
        " executed_obs_unit_id, source_location_id, file_type, written_at, extra,"
        " created_by_token_id, created_at, updated_at"
    )
    with raw.cursor() as cur:
        with cur.copy(f"COPY raw_data_file ({cols}) FROM STDIN") as cp:
            for r in rows:
                cp.write_row(
                    (
                        r["id"],
                        r["name"],
                        r["relative_path"],
                        r["size"],
                        r["checksum"],
                        getattr(r["checksum_algorithm"], "value", r["checksum_algorithm"]),
                        r["instrument_module_id"],
                        r["executed_obs_unit_id"],
                        r["source_location_id"],
                        r.get("file_type"),
                        r.get("written_at"),
                        Jsonb(r["extra"]) if r.get("extra") is not None else None,
                        r.get("created_by_token_id"),
                        now,
                        now,
                    )
                )
        with cur.copy(
            "COPY physical_copy (copy_type, data_location_id, raw_data_file_id, status, size,"
            " checksum, retry_count, created_at, updated_at) FROM STDIN"
        ) as cp:
            for r in rows:
                cp.write_row(
                    (
                        CopyType.RAW_DATA_FILE.value,
                        r["source_location_id"],
                        r["id"],
                        PhysicalCopyStatus.PRESENT.value,
                        r["size"],
                        r["checksum"],
                        0,
                        now,
                        now,
                    )
                )


def insert_files(db: Session, rows: list[dict[str, Any]]) -> None:
    """Insert file rows and their SOURCE physical copies with set-based statements.

    PostgreSQL gets ``COPY`` (the fastest way in); other databases a multi-row INSERT.
    """
    now = dt.datetime.now(dt.UTC)
    if db.get_bind().dialect.name == "postgresql" and len(rows) > 20:
        _insert_files_copy(db, rows, now)
        return
    for chunk in _chunks(rows):
        db.execute(
            insert(RawDataFile),
            [{**r, "created_at": now, "updated_at": now} for r in chunk],
        )
        db.execute(
            insert(PhysicalCopy.__table__),  # type: ignore[arg-type]
            [
                {
                    "copy_type": CopyType.RAW_DATA_FILE,
                    "data_location_id": r["source_location_id"],
                    "raw_data_file_id": r["id"],
                    "status": PhysicalCopyStatus.PRESENT,
                    "size": r["size"],
                    "checksum": r["checksum"],
                    "retry_count": 0,
                    "created_at": now,
                    "updated_at": now,
                }
                for r in chunk
            ],
        )


def location_type(app_state: Any, db: Session, location_id: int) -> LocationType | None:
    """The type of a data location, cached per process (locations change rarely)."""
    cache: dict[int, tuple[LocationType | None, float]] = app_state.location_types
    hit = cache.get(location_id)
    mono = time.monotonic()
    if hit is not None and mono - hit[1] < 60:
        return hit[0]
    value = db.scalar(select(DataLocation.location_type).where(DataLocation.id == location_id))
    if len(cache) > 10_000:
        cache.clear()
    cache[location_id] = (value, mono)
    return value


def try_insert_one(db: Session, body: RawDataFileIn, token_id: int | None) -> dict[str, Any] | None:
    """Fast path for one new file: INSERT … ON CONFLICT DO NOTHING, the copy, no lookups.

    Returns the inserted row's values, or None when the file could not be inserted as new
    (already filed, a path conflict, or an unknown reference); the caller then runs the full
    validation (:func:`file_rows`), which explains why. Leaves the transaction open; it
    must be the first write of the transaction.
    """
    from sqlalchemy.dialects.postgresql import insert as pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    now = dt.datetime.now(dt.UTC)
    row = {
        **body.model_dump(),
        "created_by_token_id": token_id,
        "created_at": now,
        "updated_at": now,
    }
    dialect = db.get_bind().dialect.name
    make = pg_insert if dialect == "postgresql" else sqlite_insert
    stmt = (
        make(RawDataFile.__table__)
        .values(row)
        .on_conflict_do_nothing()
        .returning(RawDataFile.__table__.c.id)
    )
    try:
        inserted = db.execute(stmt).first()
        if inserted is None:
            return None
        db.execute(
            insert(PhysicalCopy.__table__),  # type: ignore[arg-type]
            {
                "copy_type": CopyType.RAW_DATA_FILE,
                "data_location_id": row["source_location_id"],
                "raw_data_file_id": row["id"],
                "status": PhysicalCopyStatus.PRESENT,
                "size": row["size"],
                "checksum": row["checksum"],
                "retry_count": 0,
                "created_at": now,
                "updated_at": now,
            },
        )
    except IntegrityError:  # unknown module / execution / location: let file_rows say which
        db.rollback()  # nothing else is in this transaction yet
        return None
    return row
