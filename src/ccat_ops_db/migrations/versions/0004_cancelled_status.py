"""operation status cancelled

Adds ``cancelled`` to the CHECK constraints of the six operation status columns
(``data_transfer_package.status``, ``data_transfer.status``, ``data_transfer.unpack_status``,
``raw_data_package.status``, ``long_term_archive_transfer.status``, ``staging_job.status``).
An operator gives a record up with it (a data transfer whose destination is gone for good): it is
never scheduled, retried or revived again. No row changes.

The downgrade refuses, naming the table, the column and the number of rows, while any row is
cancelled: the older statuses have no way to say "given up for good".

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 03:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# table -> its status columns (the CHECK constraint of each is ck_<table>_<column>)
COLUMNS: dict[str, tuple[str, ...]] = {
    "data_transfer_package": ("status",),
    "data_transfer": ("status", "unpack_status"),
    "raw_data_package": ("status",),
    "long_term_archive_transfer": ("status",),
    "staging_job": ("status",),
}
OLD = ("pending", "scheduled", "in_progress", "completed", "failed")
NEW = (*OLD, "cancelled")


def _enum(column: str, values: tuple[str, ...]) -> sa.Enum:
    return sa.Enum(*values, name=column, native_enum=False, create_constraint=True, length=32)


def _copy_from(table: str, values: tuple[str, ...]) -> dict[str, sa.Table]:
    """Offline (``--sql``) there is no database to reflect: batch mode copies the table as the
    models define it, with the status enums of ``values``. Online the live table is reflected."""
    if not context.is_offline_mode():
        return {}
    from ccat_ops_db.models import Base

    copy = Base.metadata.tables[table].to_metadata(sa.MetaData())
    for column in COLUMNS[table]:
        copy.c[column].type = _enum(column, values)
    return {"copy_from": copy}


def _swap(old: tuple[str, ...], new: tuple[str, ...]) -> None:
    bind = op.get_bind()
    for table, columns in COLUMNS.items():
        if bind.dialect.name == "sqlite":
            # SQLite cannot alter a constraint: batch mode copies the table with the new types,
            # which drops the old CHECKs and creates the new ones (one copy per table).
            with op.batch_alter_table(table, schema=None, **_copy_from(table, old)) as batch_op:
                for column in columns:
                    batch_op.alter_column(
                        column,
                        existing_type=_enum(column, old),
                        type_=_enum(column, new),
                        existing_nullable=False,
                    )
        else:
            values = ", ".join(f"'{v}'" for v in new)
            for column in columns:
                name = f"ck_{table}_{column}"
                op.execute(sa.text(f'ALTER TABLE "{table}" DROP CONSTRAINT "{name}"'))
                op.execute(
                    sa.text(
                        f'ALTER TABLE "{table}" ADD CONSTRAINT "{name}" '
                        f"CHECK ({column} IN ({values}))"
                    )
                )


def upgrade() -> None:
    """Apply this revision."""
    _swap(OLD, NEW)


def downgrade() -> None:
    """Revert this revision (refused while any row is cancelled)."""
    if context.is_offline_mode():
        # No rows to count in ``--sql``: the emitted constraints themselves refuse a cancelled
        # row (PostgreSQL validates ADD CONSTRAINT, SQLite's table copy checks every row).
        _swap(NEW, OLD)
        return
    bind = op.get_bind()
    used = []
    for table, columns in COLUMNS.items():
        for column in columns:
            n = bind.execute(
                sa.text(f'SELECT count(*) FROM "{table}" WHERE {column} = :s'),
                {"s": "cancelled"},
            ).scalar_one()
            if n:
                used.append(f"{table}.{column}: {n} rows")
    if used:
        raise RuntimeError(
            "cannot downgrade below 0004: status cancelled is used ("
            + "; ".join(used)
            + "); the older statuses cannot express it: set those rows to another status "
            "(e.g. failed) or remove them first"
        )
    _swap(NEW, OLD)
