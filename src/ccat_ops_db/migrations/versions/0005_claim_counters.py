"""operation claim counters

Adds a never-reset claim counter to every operation record: ``claim_count`` to
``raw_data_package``, ``data_transfer_package``, ``data_transfer``, ``long_term_archive_transfer``
and ``staging_job``, and ``unpack_claim_count`` to ``data_transfer`` (its unpack is a second
operation on the same row). Every claim by a worker increments it and nothing ever resets it,
unlike ``retry_count`` (which an operator resets on a retry): the value a run claimed at tells
that run apart from any later run of the same record. Integer, NOT NULL, server default 0;
existing rows get 0.

The downgrade drops the six columns (on SQLite in batch mode, which copies the table). The
counters are bookkeeping only: nothing else depends on them, so the downgrade never refuses.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08 03:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# table -> its claim counter columns
COLUMNS: dict[str, tuple[str, ...]] = {
    "raw_data_package": ("claim_count",),
    "data_transfer_package": ("claim_count",),
    "data_transfer": ("claim_count", "unpack_claim_count"),
    "long_term_archive_transfer": ("claim_count",),
    "staging_job": ("claim_count",),
}


def _copy_from(table: str) -> dict[str, sa.Table]:
    """Offline (``--sql``) there is no database to reflect: batch mode copies the table as the
    models define it (with the counters, which the batch then drops). Online the live table is
    reflected. The copy is made to match what the earlier revisions built: it keeps the naming
    convention (its constraints keep their names), its ``index=True`` indexes are restated as
    table indexes (batch mode leaves the column flags of a ``copy_from`` table out of the
    recreated table), and its boolean server defaults are the literal ``true``/``false`` of 0001
    (``true()``/``false()`` of the models render as 1/0 on SQLite)."""
    if not context.is_offline_mode():
        return {}
    from ccat_ops_db.models import Base

    metadata = sa.MetaData(naming_convention=Base.metadata.naming_convention)
    copy = Base.metadata.tables[table].to_metadata(metadata)
    for column in copy.c:
        if column.index:
            (flagged,) = (i for i in copy.indexes if list(i.columns) == [column])
            copy.indexes.discard(flagged)
            column.index = False
            sa.Index(flagged.name, column, unique=flagged.unique)
        if isinstance(column.type, sa.Boolean) and column.server_default is not None:
            literal = str(column.server_default.arg)  # type: ignore[attr-defined]
            column.server_default = sa.DefaultClause(sa.text(literal))
    return {"copy_from": copy}


def upgrade() -> None:
    """Apply this revision."""
    # A NOT NULL column with a constant server default is a plain ADD COLUMN on PostgreSQL and
    # on SQLite alike (no table copy); every existing row gets 0.
    for table, columns in COLUMNS.items():
        for column in columns:
            op.add_column(
                table, sa.Column(column, sa.Integer(), server_default="0", nullable=False)
            )


def downgrade() -> None:
    """Revert this revision."""
    bind = op.get_bind()
    for table, columns in COLUMNS.items():
        if bind.dialect.name == "sqlite":
            # Batch mode copies the table without the counters (one copy per table).
            with op.batch_alter_table(table, schema=None, **_copy_from(table)) as batch_op:
                for column in columns:
                    batch_op.drop_column(column)
        else:
            for column in columns:
                op.drop_column(table, column)
