"""Migrations: upgrade on an empty database, no drift, clean round trips with data."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, inspect, select, text
from sqlalchemy.orm import Session

from ccat_ops_db import migrate as mig
from ccat_ops_db.db import make_engine
from ccat_ops_db.models import Base

from .factories import populate_every_table


def snapshot(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every model table, sorted, for before/after comparisons."""
    result = {}
    present = set(inspect(engine).get_table_names())
    with engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            if table.name not in present:  # a later revision's table, below that revision
                continue
            rows = conn.execute(select(table)).all()
            result[table.name] = sorted((tuple(r) for r in rows), key=repr)
    return result


def test_upgrade_empty_database_to_head_without_drift(db_url: str) -> None:
    engine = make_engine(db_url)
    assert mig.current_revision(engine) is None
    mig.upgrade(db_url)
    assert mig.current_revision(engine) == mig.head_revision()
    tables = set(inspect(engine).get_table_names())
    assert set(Base.metadata.tables) <= tables
    # Drift test: autogenerate finds no difference between the models and the migrations.
    assert mig.schema_diff(engine) == []
    res = mig.check(engine)
    assert res.ok, res.differences


def test_drift_is_detected(migrated_url: str) -> None:
    engine = make_engine(migrated_url)
    with engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_raw_data_file_unpackaged"))
        conn.execute(text("CREATE TABLE stray_table (id INTEGER PRIMARY KEY)"))
    res = mig.check(engine)
    assert not res.ok
    joined = " ".join(res.differences)
    assert "ix_raw_data_file_unpackaged" in joined
    assert "stray_table" in joined


def test_round_trip_with_rows_in_every_table(db_url: str) -> None:
    engine = make_engine(db_url)
    mig.upgrade(db_url)
    with Session(engine) as s, s.begin():
        populate_every_table(s)
    first = snapshot(engine)
    empty = [name for name, rows in first.items() if not rows]
    assert empty == [], f"factory left tables empty: {empty}"

    # Re-running the migration on a populated database at head changes nothing.
    mig.migrate(db_url)
    assert snapshot(engine) == first

    # head -> base leaves nothing of ours behind (a complete downgrade) ...
    mig.downgrade(db_url, "base")
    leftover = set(inspect(engine).get_table_names()) - {"alembic_version"}
    assert leftover == set()
    assert mig.current_revision(engine) is None

    # ... and base -> head rebuilds the same schema, which takes the same rows again.
    mig.upgrade(db_url)
    assert mig.schema_diff(engine) == []
    with Session(engine) as s, s.begin():
        populate_every_table(s)
    second = snapshot(engine)
    assert {k: len(v) for k, v in second.items()} == {k: len(v) for k, v in first.items()}


def test_every_revision_steps_up_and_down(db_url: str) -> None:
    """Walk the whole history one revision at a time, up then down then up again."""
    revisions = [rev for rev, _down, _doc in reversed(mig.history())]
    engine = make_engine(db_url)
    for rev in revisions:
        mig.upgrade(db_url, rev)
        assert mig.current_revision(engine) == rev
    for rev in reversed(revisions):
        assert mig.current_revision(engine) == rev
        mig.downgrade(db_url, "-1")
    assert mig.current_revision(engine) is None
    mig.upgrade(db_url)
    assert mig.schema_diff(engine) == []


def test_offline_sql_covers_every_table(db_url: str) -> None:
    sql = mig.upgrade_sql(db_url)
    for table in Base.metadata.tables:
        assert f"CREATE TABLE {table} " in sql or f'CREATE TABLE "{table}" ' in sql, table
    assert "ix_raw_data_file_unpackaged" in sql


@pytest.mark.parametrize(
    "sql",
    [
        # the pipeline's hot scans must be able to use an index
        "SELECT id FROM raw_data_file WHERE raw_data_package_id IS NULL "
        "AND executed_obs_unit_id = '00000000-0000-0000-0000-000000000000' "
        "AND instrument_module_id = 1",
        "SELECT id FROM physical_copy WHERE data_location_id = 1 "
        "AND copy_type = 'raw_data_package' AND status = 'present'",
        "SELECT id FROM raw_data_package WHERE state = 'waiting' "
        "AND data_transfer_package_id IS NULL",
        "SELECT id FROM data_transfer WHERE status = 'pending' ORDER BY next_attempt_at",
        "SELECT id FROM raw_data_file WHERE raw_data_package_id = 7",
    ],
)
def test_pipeline_scans_can_use_an_index(pg_url: str, sql: str) -> None:
    mig.upgrade(pg_url)
    engine = make_engine(pg_url)
    with engine.connect() as conn:
        conn.execute(text("SET enable_seqscan = off"))
        plan = "\n".join(r[0] for r in conn.execute(text(f"EXPLAIN {sql}")))
    assert "Index" in plan, plan


def dump_rows(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    """Every row of every model table as dicts (column name -> value), in dependency order."""
    out: dict[str, list[dict[str, Any]]] = {}
    with engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            out[table.name] = [dict(r._mapping) for r in conn.execute(select(table))]
    return out


def restore_rows(engine: Engine, dump: dict[str, list[dict[str, Any]]]) -> None:
    """Insert a :func:`dump_rows` dump into empty tables (parents first), one transaction."""
    with engine.begin() as conn:
        for table in Base.metadata.sorted_tables:
            if dump[table.name]:
                conn.execute(table.insert(), dump[table.name])


#: Tables created after the first revision, and the revision that creates them.
LATER_TABLES = {"operator_notice": "0006"}


def test_every_row_survives_head_first_revision_head(db_url: str) -> None:
    """Rows in every table at head survive a downgrade to the first revision and back.

    The first revision is the lowest point a database with data can go: below it, at
    ``base``, there are no tables (see the next test for what "base" means with data).
    """
    engine = make_engine(db_url)
    mig.upgrade(db_url)
    with Session(engine) as s, s.begin():
        populate_every_table(s)
    first = snapshot(engine)
    assert [name for name, rows in first.items() if not rows] == []
    first_revision = next(rev for rev, down, _doc in mig.history() if down is None)
    # A table a later revision creates goes with its downgrade, rows and all: it comes back
    # empty. Every other table keeps every row.
    kept = {name: rows for name, rows in first.items() if name not in LATER_TABLES}
    for _ in range(2):
        mig.downgrade(db_url, first_revision)
        assert mig.current_revision(engine) == first_revision
        assert not set(LATER_TABLES) & set(inspect(engine).get_table_names())
        mig.upgrade(db_url)
        assert mig.current_revision(engine) == mig.head_revision()
        again = snapshot(engine)
        assert {name: again[name] for name in kept} == kept, (
            "a row changed or went missing on the round trip"
        )
        assert all(again[name] == [] for name in LATER_TABLES)
    assert mig.schema_diff(engine) == []


def test_every_row_survives_head_base_head_via_dump_and_restore(db_url: str) -> None:
    """head -> base -> head with data: base is an empty schema, so the rows are dumped at head,
    the schema is taken down to base and rebuilt to head, the dump restored, and every row of
    every table compared (values and types, not only counts). Twice, as the issue asks
    (base -> head -> base -> head)."""
    engine = make_engine(db_url)
    mig.upgrade(db_url)
    with Session(engine) as s, s.begin():
        populate_every_table(s)
    first = snapshot(engine)
    total = sum(len(rows) for rows in first.values())
    assert total >= len(first)
    for _ in range(2):
        dump = dump_rows(engine)
        mig.downgrade(db_url, "base")
        assert set(inspect(engine).get_table_names()) - {"alembic_version"} == set()
        mig.upgrade(db_url)
        restore_rows(engine, dump)
        assert snapshot(engine) == first, "a row changed or went missing on the round trip"
    assert mig.schema_diff(engine) == []


def test_0003_accepts_xxh3_and_its_downgrade_refuses_while_it_is_used(db_url: str) -> None:
    """0003 lets the checksum_algorithm columns hold xxh3_128 (the old constraint rejects it);
    going below 0003 while a row uses it fails with the table named and changes nothing."""
    from sqlalchemy.exc import IntegrityError

    engine = make_engine(db_url)
    mig.upgrade(db_url)
    with Session(engine) as s, s.begin():
        populate_every_table(s)
    mig.downgrade(db_url, "0002")
    use = text("UPDATE data_transfer_package SET checksum_algorithm = :a")
    check = r"ck_data_transfer_package_checksum_algorithm|CHECK constraint failed"
    with pytest.raises(IntegrityError, match=check), engine.begin() as conn:
        conn.execute(use, {"a": "xxh3_128"})
    # At 0003 itself: a downgrade through later revisions first would commit those steps on
    # SQLite (alembic gives each revision its own transaction where DDL is not transactional).
    mig.upgrade(db_url, "0003")
    with engine.begin() as conn:
        assert conn.execute(use, {"a": "xxh3_128"}).rowcount >= 1
    with pytest.raises(RuntimeError, match=r"xxh3_128 is used \(data_transfer_package: \d+ rows"):
        mig.downgrade(db_url, "0002")
    assert mig.current_revision(engine) == "0003"
    with engine.begin() as conn:
        conn.execute(use, {"a": "sha256"})
    mig.downgrade(db_url, "0002")
    assert mig.current_revision(engine) == "0002"
    with pytest.raises(IntegrityError, match=check), engine.begin() as conn:
        conn.execute(use, {"a": "xxh3_128"})


# The operation status columns 0004 added ``cancelled`` to, with their CHECK constraints.
STATUS_COLUMNS = [
    ("data_transfer_package", "status"),
    ("data_transfer", "status"),
    ("data_transfer", "unpack_status"),
    ("raw_data_package", "status"),
    ("long_term_archive_transfer", "status"),
    ("staging_job", "status"),
]


def test_0004_accepts_cancelled_and_its_downgrade_refuses_while_it_is_used(db_url: str) -> None:
    """0004 lets every operation status column hold cancelled (the old constraints reject it, and
    a bogus status stays rejected); going below 0004 while a row is cancelled fails with every
    such table and column named and changes nothing; once none is left, the downgrade runs and
    restores the old constraints."""
    from sqlalchemy.exc import IntegrityError

    engine = make_engine(db_url)
    mig.upgrade(db_url)
    with Session(engine) as s, s.begin():
        populate_every_table(s)

    def use(table: str, column: str, value: str) -> int:
        with engine.begin() as conn:
            sql = text(f"UPDATE {table} SET {column} = :s")
            return conn.execute(sql, {"s": value}).rowcount

    def refused(table: str, column: str, value: str) -> None:
        check = rf"\bck_{table}_{column}\b"
        with pytest.raises(IntegrityError, match=check):
            use(table, column, value)

    mig.downgrade(db_url, "0003")
    for table, column in STATUS_COLUMNS:
        refused(table, column, "cancelled")
    # At 0004 itself (see the 0003 test: a refused downgrade through a later revision would
    # leave that step committed on SQLite and rolled back on PostgreSQL).
    mig.upgrade(db_url, "0004")
    assert mig.current_revision(engine) == "0004"
    for table, column in STATUS_COLUMNS:
        assert use(table, column, "cancelled") >= 1, (table, column)
        refused(table, column, "abandoned")

    # Every cancelled column is named; setting them back one by one shrinks the list.
    for i, (table, column) in enumerate(STATUS_COLUMNS):
        with pytest.raises(RuntimeError, match=r"cancelled is used \(") as err:
            mig.downgrade(db_url, "0003")
        for t, c in STATUS_COLUMNS[i:]:
            assert f"{t}.{c}: " in str(err.value), (t, c, str(err.value))
        for t, c in STATUS_COLUMNS[:i]:
            assert f"{t}.{c}: " not in str(err.value), (t, c, str(err.value))
        assert mig.current_revision(engine) == "0004"
        use(table, column, "failed")

    mig.downgrade(db_url, "0003")
    assert mig.current_revision(engine) == "0003"
    for table, column in STATUS_COLUMNS:
        refused(table, column, "cancelled")
        assert use(table, column, "completed") >= 1
    mig.upgrade(db_url)
    assert mig.schema_diff(engine) == []


@pytest.mark.parametrize(("table", "column"), STATUS_COLUMNS)
def test_0004_downgrade_names_the_one_cancelled_table(db_url: str, table: str, column: str) -> None:
    """A single cancelled row in one column is enough to refuse, and the message names its
    table, column and row count."""
    engine = make_engine(db_url)
    mig.upgrade(db_url)
    with Session(engine) as s, s.begin():
        populate_every_table(s)
    mig.downgrade(db_url, "0004")  # at 0004 itself, as above
    with engine.begin() as conn:
        n = conn.execute(text(f"UPDATE {table} SET {column} = 'cancelled'")).rowcount
    assert n >= 1
    with pytest.raises(RuntimeError, match=rf"cancelled is used \({table}\.{column}: {n} rows\)"):
        mig.downgrade(db_url, "0003")
    assert mig.current_revision(engine) == "0004"


def test_0004_offline_sql_has_the_cancelled_constraints(db_url: str) -> None:
    """``--sql`` (offline, no database) writes the new constraints for 0004 and the old ones back
    for its downgrade."""
    import io
    import re

    from alembic import command

    sql = mig.upgrade_sql(db_url)
    step = sql[sql.index("version_num='0003'") : sql.index("version_num='0004'")]
    for table, column in STATUS_COLUMNS:
        new = rf"""CONSTRAINT "?ck_{table}_{column}"? CHECK \({column} IN \([^)]*'cancelled'\)\)"""
        assert re.search(new, step), (table, column, step)

    cfg = mig.alembic_config(db_url)
    cfg.output_buffer = buf = io.StringIO()
    command.downgrade(cfg, "0004:0003", sql=True)
    down = buf.getvalue()
    assert "cancelled" not in down
    for table, column in STATUS_COLUMNS:
        old = rf"""CONSTRAINT "?ck_{table}_{column}"? CHECK \({column} IN \('pending'[^)]*\)\)"""
        assert re.search(old, down), (table, column, down)


# The claim counters 0005 added, one per operation (the data transfer has two: transfer, unpack).
CLAIM_COLUMNS = [
    ("raw_data_package", "claim_count"),
    ("data_transfer_package", "claim_count"),
    ("data_transfer", "claim_count"),
    ("data_transfer", "unpack_claim_count"),
    ("long_term_archive_transfer", "claim_count"),
    ("staging_job", "claim_count"),
]


def _plain(value: Any) -> Any:
    """Reflection results as comparable plain values (SQL text clauses become their text)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def schema_of(engine: Engine) -> dict[str, dict[str, Any]]:
    """Every table as the database describes it: columns (in order, with types, nullability and
    defaults), keys, indexes, unique and CHECK constraints."""
    insp = inspect(engine)
    out = {}
    for table in sorted(insp.get_table_names()):
        if table == "alembic_version":
            continue
        by_name = lambda items: sorted(_plain(items), key=repr)  # noqa: E731
        out[table] = {
            "columns": _plain(insp.get_columns(table)),
            "pk": _plain(insp.get_pk_constraint(table)),
            "fks": by_name(insp.get_foreign_keys(table)),
            "indexes": by_name(insp.get_indexes(table)),
            "unique": by_name(insp.get_unique_constraints(table)),
            "checks": by_name(insp.get_check_constraints(table)),
        }
    return out


def snapshot_without_claims(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """:func:`snapshot` without the 0005 claim counters (readable at 0004 too)."""
    claims = set(CLAIM_COLUMNS)
    result = {}
    present = set(inspect(engine).get_table_names())
    with engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            if table.name not in present:  # a later revision's table, below that revision
                continue
            cols = [c for c in table.c if (table.name, c.name) not in claims]
            rows = conn.execute(select(*cols)).all()
            result[table.name] = sorted((tuple(r) for r in rows), key=repr)
    return result


def claim_columns_present(engine: Engine) -> set[tuple[str, str]]:
    insp = inspect(engine)
    tables = {table for table, _ in CLAIM_COLUMNS}
    present = {(t, c["name"]) for t in tables for c in insp.get_columns(t)}
    return present & set(CLAIM_COLUMNS)


def test_0005_upgrade_keeps_existing_rows_and_gives_them_claim_count_0(db_url: str) -> None:
    """Rows that exist at 0004 survive the upgrade to 0005 unchanged and get 0 in every new
    counter (NOT NULL, server default '0', INTEGER, as the models declare)."""
    engine = make_engine(db_url)
    mig.upgrade(db_url, "0005")
    with Session(engine) as s, s.begin():
        populate_every_table(s, without=LATER_TABLES)
    first = snapshot(engine)
    with engine.begin() as conn:
        for table, column in CLAIM_COLUMNS:
            assert conn.execute(text(f"UPDATE {table} SET {column} = 7")).rowcount >= 1
    # Down to 0004 with the rows in place: those are the existing rows the upgrade meets.
    mig.downgrade(db_url, "0004")
    assert mig.current_revision(engine) == "0004"
    assert claim_columns_present(engine) == set()
    without = snapshot_without_claims(engine)

    mig.upgrade(db_url, "0005")
    assert mig.current_revision(engine) == "0005"
    assert snapshot_without_claims(engine) == without
    assert snapshot(engine) == first, "an existing row changed, or a counter is not 0"
    insp = inspect(engine)
    with engine.connect() as conn:
        for table, column in CLAIM_COLUMNS:
            values = conn.execute(text(f"SELECT {column} FROM {table}")).scalars().all()
            assert values and set(values) == {0}, (table, column, values)
            (col,) = (c for c in insp.get_columns(table) if c["name"] == column)
            assert not col["nullable"], (table, column)
            assert str(col["type"]).upper() == "INTEGER", (table, column, col["type"])
            assert str(col["default"]).strip("'") == "0", (table, column, col["default"])
            model = Base.metadata.tables[table].c[column]
            assert not model.nullable and model.server_default.arg == "0", (table, column)
    mig.upgrade(db_url)
    assert mig.schema_diff(engine) == []


def test_0005_downgrade_drops_the_counters_and_restores_the_0004_schema(db_url: str) -> None:
    """Going below 0005 drops the six counters and nothing else: the schema is the one 0004
    builds (columns, types, defaults, keys, indexes, constraints) and every row keeps every
    other value."""
    engine = make_engine(db_url)
    mig.upgrade(db_url, "0004")
    at_0004 = schema_of(engine)
    mig.upgrade(db_url, "0005")
    assert claim_columns_present(engine) == set(CLAIM_COLUMNS)
    with Session(engine) as s, s.begin():
        populate_every_table(s, without=LATER_TABLES)
    before = snapshot_without_claims(engine)

    mig.downgrade(db_url, "0004")
    assert mig.current_revision(engine) == "0004"
    assert claim_columns_present(engine) == set()
    assert schema_of(engine) == at_0004
    assert snapshot_without_claims(engine) == before

    mig.upgrade(db_url)
    assert mig.schema_diff(engine) == []


def test_0005_offline_sql_adds_and_drops_the_counters(db_url: str, tmp_path: Any) -> None:
    """``--sql`` (offline, no database) writes an ADD COLUMN for each counter; the SQL it writes
    for the downgrade, run on a database at 0005, leaves exactly the 0004 schema."""
    import io
    import re

    from alembic import command

    sql = mig.upgrade_sql(db_url)
    step = sql[sql.index("version_num='0004'") : sql.index("version_num='0005'")]
    for table, column in CLAIM_COLUMNS:
        add = rf"""ALTER TABLE "?{table}"? ADD COLUMN "?{column}"? INTEGER DEFAULT '0' NOT NULL;"""
        assert re.search(add, step), (table, column, step)

    cfg = mig.alembic_config(db_url)
    cfg.output_buffer = buf = io.StringIO()
    command.downgrade(cfg, "0005:0004", sql=True)
    down = buf.getvalue()

    engine = make_engine(db_url)
    mig.upgrade(db_url, "0004")
    at_0004 = schema_of(engine)
    mig.upgrade(db_url, "0005")
    statements = [
        "\n".join(line for line in part.splitlines() if not line.startswith("--")).strip()
        for part in down.split(";\n")
    ]
    statements = [st for st in statements if st and st not in ("BEGIN", "COMMIT")]
    with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            # As env.py does: a table copy drops tables other tables' foreign keys point to.
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            conn.commit()
        with conn.begin():
            for st in statements:
                conn.exec_driver_sql(st)
    engine.dispose()
    assert mig.current_revision(engine) == "0004"
    assert claim_columns_present(engine) == set()
    assert schema_of(engine) == at_0004


def test_0006_adds_operator_notices_with_one_open_notice_per_subject(db_url: str) -> None:
    """0006 creates ``operator_notice`` beside rows that exist at 0005 (untouched); its partial
    unique index allows one open notice per (kind, subject) and any number of cleared ones;
    the downgrade drops the table and leaves exactly the 0005 schema."""
    from sqlalchemy.exc import IntegrityError

    engine = make_engine(db_url)
    mig.upgrade(db_url, "0005")
    at_0005 = schema_of(engine)
    with Session(engine) as s, s.begin():
        populate_every_table(s, without=LATER_TABLES)
    before = snapshot(engine)
    mig.upgrade(db_url, "0006")
    after = snapshot(engine)
    assert after.pop("operator_notice") == []
    assert after == before

    insert = text(
        "INSERT INTO operator_notice (kind, subject, summary, first_seen_at, last_seen_at,"
        " cleared_at, delivered, cleared_delivered)"
        " VALUES ('failed', 'data_transfer:1', 'x', :t, :t, :cleared, '{}', '{}')"
    )
    now = "2026-12-07 19:00:00+00:00"
    with engine.begin() as conn:
        conn.execute(insert, {"t": now, "cleared": now})
        conn.execute(insert, {"t": now, "cleared": now})  # cleared twice: history
        conn.execute(insert, {"t": now, "cleared": None})  # open once
    with (
        pytest.raises(IntegrityError, match=r"ix_operator_notice_open|UNIQUE"),
        engine.begin() as conn,
    ):
        conn.execute(insert, {"t": now, "cleared": None})
    assert mig.schema_diff(engine) == []

    mig.downgrade(db_url, "0005")
    assert schema_of(engine) == at_0005
    assert snapshot(engine) == before
