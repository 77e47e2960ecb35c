"""The hot path of single-file filing on PostgreSQL: async, one statement, one round-trip.

Filing one new raw data file is what instruments do all night long, one request per file. On
PostgreSQL that request is answered here, on the event loop, without a worker thread, the ORM
or a pooled-connection ping: one prepared statement inserts the file (``ON CONFLICT DO
NOTHING``), its ``present`` physical copy at the SOURCE location and the audit row, in one
implicit transaction (autocommit: a single statement is atomic).

The statement only inserts a file that is new and whose location exists and is a SOURCE. When
it inserts nothing (already filed, a path conflict, not a source) or fails (an unknown
instrument module or executed obs unit, an unstorable value, a database problem), the caller
falls back to the full, synchronous check (:func:`ops_db_api.filing.file_rows`), which decides
between 200, 409 and 422 and explains why: the answers are the same as without the fast path.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any

from sqlalchemy import Engine

from .schemas.filing import RawDataFileIn

log = logging.getLogger("ops_db_api")

#: One round-trip: the file, its SOURCE copy and the audit row, or nothing at all.
FILE_ONE_SQL = """
WITH src AS (
    SELECT id FROM data_location WHERE id = %(loc)s AND location_type = 'source'
), f AS (
    INSERT INTO raw_data_file (
        id, name, relative_path, size, checksum, checksum_algorithm, instrument_module_id,
        executed_obs_unit_id, source_location_id, file_type, written_at, extra,
        created_by_token_id, created_at, updated_at)
    SELECT %(id)s::uuid, %(name)s::varchar, %(path)s::varchar, %(size)s::bigint,
        %(checksum)s::varchar, %(algorithm)s::varchar, %(module)s::integer, %(eou)s::uuid,
        src.id, %(file_type)s::varchar, %(written_at)s::timestamptz, %(extra)s::jsonb,
        %(token)s::integer, %(now)s::timestamptz, %(now)s::timestamptz
    FROM src
    ON CONFLICT DO NOTHING
    RETURNING id, source_location_id
), copy AS (
    INSERT INTO physical_copy (
        copy_type, data_location_id, raw_data_file_id, status, size, checksum, retry_count,
        created_at, updated_at)
    SELECT 'raw_data_file', f.source_location_id, f.id, 'present', %(size)s::bigint,
        %(checksum)s::varchar, 0, %(now)s::timestamptz, %(now)s::timestamptz
    FROM f
), audit AS (
    INSERT INTO api_audit_log (
        created_at, user_id, token_id, method, path, status_code, resource, resource_ids,
        item_count, client_ip)
    SELECT %(now)s::timestamptz, %(user)s::integer, %(token)s::integer, %(method)s::varchar,
        %(req_path)s::varchar, 201, 'raw_data_file', jsonb_build_array(f.id::text), 1,
        %(client_ip)s::varchar
    FROM f
)
SELECT id FROM f
"""


class AsyncPgPool:
    """A small pool of autocommit psycopg async connections for one API process.

    Connections are opened on first need (at most ``size``), kept open, and replaced when
    broken; no ping per checkout - a failed statement on a dead connection is retried once
    on a fresh one by the caller. Bound to the event loop of the process that uses it.
    """

    def __init__(self, engine: Engine, size: int) -> None:
        from sqlalchemy.engine import URL

        url: URL = engine.url.set(drivername="postgresql+psycopg")
        cargs, cparams = engine.dialect.create_connect_args(url)
        self._cargs = list(cargs)
        self._cparams = dict(cparams)
        self.size = size
        self._idle: list[Any] = []
        self._open = 0
        self._slots: asyncio.Semaphore | None = None
        self._closed = False

    async def _connect(self) -> Any:
        import psycopg

        return await psycopg.AsyncConnection.connect(
            *self._cargs, **self._cparams, autocommit=True, prepare_threshold=0
        )

    async def acquire(self) -> Any:
        """A connection for the caller's exclusive use; give it back with :meth:`release`."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.size)
        await self._slots.acquire()
        try:
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed and not conn.broken:
                    return conn
                self._open -= 1
            conn = await self._connect()
            self._open += 1
            return conn
        except BaseException:
            self._slots.release()
            raise

    async def release(self, conn: Any, discard: bool = False) -> None:
        """Return ``conn``; a broken, busy (or ``discard``-ed) connection is closed instead."""
        from psycopg.pq import TransactionStatus

        assert self._slots is not None
        try:
            if (
                discard
                or self._closed
                or conn.closed
                or conn.broken
                or conn.info.transaction_status != TransactionStatus.IDLE
            ):
                self._open -= 1
                await conn.close()
            else:
                self._idle.append(conn)
        finally:
            self._slots.release()

    async def close(self) -> None:
        """Close every idle connection (at shutdown)."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()


def file_one_params(
    body: RawDataFileIn,
    *,
    user_id: int,
    token_id: int,
    method: str,
    path: str,
    client_ip: str | None,
    now: dt.datetime,
) -> dict[str, Any]:
    """The parameters of :data:`FILE_ONE_SQL` for ``body`` filed by the given token."""
    from psycopg.types.json import Jsonb

    return {
        "id": body.id,
        "name": body.name,
        "path": body.relative_path,
        "size": body.size,
        "checksum": body.checksum,
        "algorithm": body.checksum_algorithm.value,
        "module": body.instrument_module_id,
        "eou": body.executed_obs_unit_id,
        "loc": body.source_location_id,
        "file_type": body.file_type,
        "written_at": body.written_at,
        "extra": Jsonb(body.extra) if body.extra is not None else None,
        "token": token_id,
        "user": user_id,
        "now": now,
        "method": method,
        "req_path": path[:1024],
        "client_ip": client_ip,
    }


async def file_new(pool: AsyncPgPool, params: dict[str, Any]) -> bool:
    """Run :data:`FILE_ONE_SQL`; True when the file was new and is now filed (committed).

    False means "not filed here, ask the full check": the file exists already, its location
    is unknown or not a SOURCE, a reference is unknown, a value cannot be stored, or the
    database cannot be reached. Never raises for any of these.
    """
    import psycopg

    for attempt in (1, 2):
        try:
            conn = await pool.acquire()
        except (psycopg.Error, OSError) as exc:
            log.warning("fast filing path: cannot connect: %s", exc)
            return False
        discard = False
        try:
            cur = await conn.execute(FILE_ONE_SQL, params)
            return await cur.fetchone() is not None
        except psycopg.OperationalError as exc:
            # A dead connection (server restart, network): retry once on a fresh one. The
            # statement is idempotent - if it did commit, the retry inserts nothing and the
            # full check answers "already filed".
            discard = True
            if attempt == 2:
                log.warning("fast filing path: %s", str(exc).splitlines()[0] if str(exc) else exc)
                return False
        except psycopg.Error:
            # Unknown reference (foreign key), unstorable value, ...: the full check says which.
            return False
        finally:
            await pool.release(conn, discard=discard)
    return False
