"""The observatory's durable write buffer: a local PostgreSQL database (``CCAT_API_BUFFER_URL``).

Every write an instrument files at the observatory becomes one row of ``site_buffer_item``,
committed before the API answers 202. The replayer sends the pending rows to the main site in
``seq`` order and marks them ``replayed``; a row the main site refuses for its content (a
conflict, an unknown reference) is marked ``parked`` with the reason - never deleted.

Row states: ``pending`` -> ``replayed`` (kept for ``buffer_retention_s`` so reads still find
it until the replica has it) or ``pending`` -> ``parked`` -> (``park retry``) ``pending``.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    create_engine,
    delete,
    func,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.schema import CreateIndex

log = logging.getLogger("ops_db_api.site")

KINDS = ("eou_start", "file", "eou_finish")

metadata = MetaData()

#: One buffered write per row, replayed in ``seq`` order.
items = Table(
    "site_buffer_item",
    metadata,
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("item_id", Uuid, nullable=False),
    Column("payload", JSON, nullable=False),
    Column("token_id", Integer),
    Column("buffered_at", DateTime(timezone=True), nullable=False),
    Column("state", String(10), nullable=False, default="pending"),
    Column("attempts", Integer, nullable=False, default=0),
    Column("replayed_at", DateTime(timezone=True)),
    Column("parked_at", DateTime(timezone=True)),
    Column("park_reason", Text),
    Column("park_status", Integer),
    UniqueConstraint("kind", "item_id", name="uq_site_buffer_kind_item"),
    Index("ix_site_buffer_state_seq", "state", "seq"),
    Index("ix_site_buffer_replayed_at", "replayed_at"),
)

#: A buffered file's place, from its payload: (source location, relative path) must be unique
#: among the files filed, as on the main site (``raw_data_file``'s unique constraint).
FILE_LOCATION = items.c.payload["source_location_id"].as_integer()
FILE_PATH = items.c.payload["relative_path"].as_string()
#: Files are looked up by path at filing time; an expression index keeps that an index scan.
#: Created by :meth:`SiteBuffer.create_schema` also on buffers made before it existed.
path_index = Index("ix_site_buffer_file_path", FILE_PATH)
#: States in which a buffered file holds its path: on its way to the main site, or there.
#: A parked file was refused by the main site and holds nothing until it is retried.
HOLDS_PATH = ("pending", "replayed")
#: Filings of files take these transaction-level advisory locks (PostgreSQL) on the buckets
#: of their paths, so two requests filing the same path under different ids cannot both pass
#: the check. Few buckets: a bulk takes at most this many locks.
PATH_LOCK_CLASS = 0x0CCA
PATH_LOCK_BUCKETS = 64

#: The replayer's running totals and its last error (one row, id 1).
replay_state = Table(
    "site_replay_state",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("replayed_total", BigInteger, nullable=False, default=0),
    Column("parked_total", BigInteger, nullable=False, default=0),
    Column("last_error", Text),
    Column("last_error_at", DateTime(timezone=True)),
    Column("last_success_at", DateTime(timezone=True)),
)

#: Advisory-lock key held by the one replayer allowed to run (PostgreSQL).
REPLAYER_LOCK_KEY = 0x0CCA7_5173


def utcnow() -> dt.datetime:
    """Now, timezone-aware UTC."""
    return dt.datetime.now(dt.UTC)


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value


@dataclass
class BufferedItem:
    """One buffered write as the replayer and the read path see it."""

    seq: int
    kind: str
    item_id: uuid.UUID
    payload: dict[str, Any]
    token_id: int | None
    buffered_at: dt.datetime
    state: str
    attempts: int = 0
    replayed_at: dt.datetime | None = None
    parked_at: dt.datetime | None = None
    park_reason: str | None = None
    park_status: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready view (API and CLI)."""
        return {
            "seq": self.seq,
            "kind": self.kind,
            "id": str(self.item_id),
            "state": self.state,
            "attempts": self.attempts,
            "buffered_at": self.buffered_at.isoformat(),
            "replayed_at": self.replayed_at.isoformat() if self.replayed_at else None,
            "parked_at": self.parked_at.isoformat() if self.parked_at else None,
            "reason": self.park_reason,
            "status_code": self.park_status,
            "payload": self.payload,
        }


def _item(row: Any) -> BufferedItem:
    m = row._mapping
    return BufferedItem(
        seq=m["seq"],
        kind=m["kind"],
        item_id=m["item_id"],
        payload=m["payload"],
        token_id=m["token_id"],
        buffered_at=_aware(m["buffered_at"]),  # type: ignore[arg-type]
        state=m["state"],
        attempts=m["attempts"],
        replayed_at=_aware(m["replayed_at"]),
        parked_at=_aware(m["parked_at"]),
        park_reason=m["park_reason"],
        park_status=m["park_status"],
    )


@dataclass
class BufferStatus:
    """What an operator wants to know about the buffer."""

    depth: int
    oldest_pending_age_s: float | None
    parked: int
    replayed_kept: int
    replayed_total: int
    parked_total: int
    replay_rate_per_s: float
    last_error: str | None
    last_error_at: dt.datetime | None
    last_success_at: dt.datetime | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready view."""
        return {
            "depth": self.depth,
            "oldest_pending_age_s": self.oldest_pending_age_s,
            "parked": self.parked,
            "replayed_kept": self.replayed_kept,
            "replayed_total": self.replayed_total,
            "parked_total": self.parked_total,
            "replay_rate_per_s": self.replay_rate_per_s,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at.isoformat() if self.last_error_at else None,
            "last_success_at": self.last_success_at.isoformat() if self.last_success_at else None,
        }


class SiteBuffer:
    """Access to the buffer database; every state change is one transaction."""

    def __init__(self, url_or_engine: str | Engine) -> None:
        if isinstance(url_or_engine, str):
            from ccat_ops_db.config import normalize_url

            self.engine = create_engine(normalize_url(url_or_engine), pool_pre_ping=True)
        else:
            self.engine = url_or_engine

    @property
    def is_postgresql(self) -> bool:
        """True on PostgreSQL (advisory lock, ON CONFLICT)."""
        return self.engine.dialect.name == "postgresql"

    def create_schema(self) -> None:
        """Create the buffer tables if missing (idempotent; the buffer is local state, not a
        migrated part of the ops database)."""
        metadata.create_all(self.engine)
        with self.engine.begin() as conn:
            conn.execute(CreateIndex(path_index, if_not_exists=True))  # older buffers
            if conn.execute(select(replay_state.c.id)).first() is None:
                conn.execute(replay_state.insert().values(id=1, replayed_total=0, parked_total=0))

    def dispose(self) -> None:
        """Close the pooled connections."""
        self.engine.dispose()

    # --- writes from the API ---------------------------------------------------------------

    def existing(
        self, conn: Connection, kind: str, ids: Iterable[uuid.UUID]
    ) -> dict[uuid.UUID, BufferedItem]:
        """Buffered rows of ``kind`` among ``ids`` (any state)."""
        ids = list(ids)
        found: dict[uuid.UUID, BufferedItem] = {}
        for i in range(0, len(ids), 5000):
            chunk = ids[i : i + 5000]
            for row in conn.execute(
                select(items).where(items.c.kind == kind, items.c.item_id.in_(chunk))
            ):
                it = _item(row)
                found[it.item_id] = it
        return found

    def lock_paths(self, conn: Connection, keys: Iterable[tuple[int, str]]) -> None:
        """Serialise the filings of the same (source location, relative path) keys until the
        transaction of ``conn`` ends (PostgreSQL; SQLite serialises writers anyway).

        Taken before :meth:`paths_held`, so a concurrent request's file at one of these paths
        is committed (and seen) or not yet checked. Buckets, not one lock per path: a bulk of
        thousands of files takes at most ``PATH_LOCK_BUCKETS`` locks, in order (no deadlock).
        """
        if not self.is_postgresql:
            return
        buckets = sorted(
            {zlib.crc32(f"{loc}\x00{path}".encode()) % PATH_LOCK_BUCKETS for loc, path in keys}
        )
        conn.execute(
            text("SELECT pg_advisory_xact_lock(:c, b) FROM unnest(CAST(:bs AS integer[])) AS b"),
            {"c": PATH_LOCK_CLASS, "bs": buckets},
        ).all()

    def paths_held(
        self, conn: Connection, keys: Iterable[tuple[int, str]]
    ) -> dict[tuple[int, str], uuid.UUID]:
        """The ids of buffered files holding these (source location, relative path) keys:
        pending or replayed ones (the first buffered, should there be several)."""
        wanted = set(keys)
        paths = sorted({path for _, path in wanted})
        held: dict[tuple[int, str], uuid.UUID] = {}
        for i in range(0, len(paths), 5000):
            for item_id, loc, path in conn.execute(
                select(items.c.item_id, FILE_LOCATION, FILE_PATH)
                .where(
                    FILE_PATH.in_(paths[i : i + 5000]),
                    items.c.kind == "file",
                    items.c.state.in_(HOLDS_PATH),
                )
                .order_by(items.c.seq)
            ):
                if (loc, path) in wanted:
                    held.setdefault((loc, path), item_id)
        return held

    def insert_new(
        self,
        conn: Connection,
        kind: str,
        rows: Sequence[tuple[uuid.UUID, dict[str, Any]]],
        token_id: int | None,
    ) -> int:
        """Insert ``rows`` (id, payload) as pending; returns how many were new.

        Callers check :meth:`existing` first inside the same transaction; a concurrent insert
        of the same id loses on the unique constraint (ON CONFLICT DO NOTHING) and the caller
        sees fewer rows than it asked for.
        """
        if not rows:
            return 0
        now = utcnow()
        values = [
            {
                "kind": kind,
                "item_id": item_id,
                "payload": payload,
                "token_id": token_id,
                "buffered_at": now,
                "state": "pending",
                "attempts": 0,
            }
            for item_id, payload in rows
        ]
        if self.is_postgresql:
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            stmt = pg_insert(items).on_conflict_do_nothing(constraint="uq_site_buffer_kind_item")
        else:
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            stmt = sqlite_insert(items).on_conflict_do_nothing()
        result = conn.execute(stmt.returning(items.c.seq), values)
        return len(result.all())

    # --- replay ----------------------------------------------------------------------------

    def pending(self, limit: int) -> list[BufferedItem]:
        """The oldest pending writes, in ``seq`` order."""
        with self.engine.connect() as conn:
            return [
                _item(r)
                for r in conn.execute(
                    select(items)
                    .where(items.c.state == "pending")
                    .order_by(items.c.seq)
                    .limit(limit)
                )
            ]

    def mark_replayed(self, seqs: Sequence[int]) -> None:
        """Mark ``seqs`` replayed and count them, in one transaction."""
        if not seqs:
            return
        now = utcnow()
        with self.engine.begin() as conn:
            n = conn.execute(
                update(items)
                .where(items.c.seq.in_(list(seqs)), items.c.state == "pending")
                .values(state="replayed", replayed_at=now, attempts=items.c.attempts + 1)
            ).rowcount
            conn.execute(
                update(replay_state)
                .where(replay_state.c.id == 1)
                .values(
                    replayed_total=replay_state.c.replayed_total + n,
                    last_success_at=now,
                )
            )

    def park(self, seq: int, reason: str, status_code: int | None) -> None:
        """Park one write with the reason the main site gave; it is kept, never dropped."""
        now = utcnow()
        with self.engine.begin() as conn:
            n = conn.execute(
                update(items)
                .where(items.c.seq == seq, items.c.state == "pending")
                .values(
                    state="parked",
                    parked_at=now,
                    park_reason=reason,
                    park_status=status_code,
                    attempts=items.c.attempts + 1,
                )
            ).rowcount
            conn.execute(
                update(replay_state)
                .where(replay_state.c.id == 1)
                .values(parked_total=replay_state.c.parked_total + n)
            )
        log.warning(
            "parked buffered write",
            extra={"buffer_seq": seq, "reason": reason, "status_code": status_code},
        )

    def record_error(self, message: str) -> None:
        """Remember the replayer's last error (the link is down, the token was refused...)."""
        with self.engine.begin() as conn:
            conn.execute(
                update(replay_state)
                .where(replay_state.c.id == 1)
                .values(last_error=message[:2000], last_error_at=utcnow())
            )

    def retry_parked(self, seq: int | None = None) -> int:
        """Put one parked write (or all of them) back in the queue; returns how many."""
        with self.engine.begin() as conn:
            stmt = update(items).where(items.c.state == "parked")
            if seq is not None:
                stmt = stmt.where(items.c.seq == seq)
            return conn.execute(
                stmt.values(state="pending", parked_at=None, park_reason=None, park_status=None)
            ).rowcount

    def prune_replayed(self, older_than_s: float) -> int:
        """Forget replayed writes older than ``older_than_s`` (the replica has them by then)."""
        cutoff = utcnow() - dt.timedelta(seconds=older_than_s)
        with self.engine.begin() as conn:
            return conn.execute(
                delete(items).where(items.c.state == "replayed", items.c.replayed_at < cutoff)
            ).rowcount

    # --- reads ------------------------------------------------------------------------------

    def get(self, kind: str, item_id: uuid.UUID) -> BufferedItem | None:
        """One buffered write by kind and id (any state)."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(items).where(items.c.kind == kind, items.c.item_id == item_id)
            ).first()
        return _item(row) if row is not None else None

    def parked(self, limit: int = 1000) -> list[BufferedItem]:
        """Parked writes, oldest first."""
        with self.engine.connect() as conn:
            return [
                _item(r)
                for r in conn.execute(
                    select(items)
                    .where(items.c.state == "parked")
                    .order_by(items.c.seq)
                    .limit(limit)
                )
            ]

    def status(self, rate_window_s: float = 60.0) -> BufferStatus:
        """Depth, oldest pending age, parked count, totals, recent replay rate, last error."""
        now = utcnow()
        since = now - dt.timedelta(seconds=rate_window_s)
        with self.engine.connect() as conn:
            counts = dict(
                conn.execute(select(items.c.state, func.count()).group_by(items.c.state)).all()
            )
            oldest = conn.scalar(
                select(func.min(items.c.buffered_at)).where(items.c.state == "pending")
            )
            recent = conn.scalar(
                select(func.count()).where(
                    items.c.state == "replayed", items.c.replayed_at >= since
                )
            )
            st = conn.execute(select(replay_state).where(replay_state.c.id == 1)).first()
        oldest = _aware(oldest)
        s = st._mapping if st is not None else {}
        return BufferStatus(
            depth=int(counts.get("pending", 0)),
            oldest_pending_age_s=(now - oldest).total_seconds() if oldest else None,
            parked=int(counts.get("parked", 0)),
            replayed_kept=int(counts.get("replayed", 0)),
            replayed_total=int(s.get("replayed_total") or 0),
            parked_total=int(s.get("parked_total") or 0),
            replay_rate_per_s=float(recent or 0) / rate_window_s,
            last_error=s.get("last_error"),
            last_error_at=_aware(s.get("last_error_at")),
            last_success_at=_aware(s.get("last_success_at")),
        )
