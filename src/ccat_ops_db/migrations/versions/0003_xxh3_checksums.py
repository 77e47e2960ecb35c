"""checksum algorithm xxh3_128 (XXH3, 128-bit)

Adds ``xxh3_128`` to the CHECK constraints of the three ``checksum_algorithm`` columns
(``raw_data_file``, ``raw_data_package``, ``data_transfer_package``). The transfer system
checksums package tars with it by default (``CCAT_TRANSFER_CHECKSUM_ALGORITHM``); files keep
the algorithm they were filed with. No row changes.

The downgrade refuses, naming the table and the number of rows, while any row uses xxh3_128:
those checksums cannot be expressed in an older algorithm without reading the data again.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06 03:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("raw_data_file", "raw_data_package", "data_transfer_package")
OLD = ("sha256", "blake2b", "md5", "adler32")
NEW = (*OLD, "xxh3_128")


def _enum(values: tuple[str, ...]) -> sa.Enum:
    return sa.Enum(
        *values, name="checksum_algorithm", native_enum=False, create_constraint=True, length=32
    )


def _copy_from(table: str, values: tuple[str, ...]) -> dict[str, sa.Table]:
    """Offline (``--sql``) there is no database to reflect: batch mode copies the table as the
    models define it, with the enum of ``values``. Online the live table is reflected."""
    if not context.is_offline_mode():
        return {}
    from ccat_ops_db.models import Base

    copy = Base.metadata.tables[table].to_metadata(sa.MetaData())
    copy.c.checksum_algorithm.type = _enum(values)
    return {"copy_from": copy}


def _swap(old: tuple[str, ...], new: tuple[str, ...]) -> None:
    bind = op.get_bind()
    for table in TABLES:
        if bind.dialect.name == "sqlite":
            # SQLite cannot alter a constraint: batch mode copies the table with the new type,
            # which drops the old CHECK and creates the new one.
            with op.batch_alter_table(table, schema=None, **_copy_from(table, old)) as batch_op:
                batch_op.alter_column(
                    "checksum_algorithm",
                    existing_type=_enum(old),
                    type_=_enum(new),
                    existing_nullable=False,
                )
        else:
            name = f"ck_{table}_checksum_algorithm"
            values = ", ".join(f"'{v}'" for v in new)
            op.execute(sa.text(f'ALTER TABLE "{table}" DROP CONSTRAINT "{name}"'))
            op.execute(
                sa.text(
                    f'ALTER TABLE "{table}" ADD CONSTRAINT "{name}" '
                    f"CHECK (checksum_algorithm IN ({values}))"
                )
            )


def upgrade() -> None:
    """Apply this revision."""
    _swap(OLD, NEW)


def downgrade() -> None:
    """Revert this revision (refused while any row uses xxh3_128)."""
    bind = op.get_bind()
    used = []
    for table in TABLES:
        n = bind.execute(
            sa.text(f'SELECT count(*) FROM "{table}" WHERE checksum_algorithm = :a'),
            {"a": "xxh3_128"},
        ).scalar_one()
        if n:
            used.append(f"{table}: {n} rows")
    if used:
        raise RuntimeError(
            "cannot downgrade below 0003: checksum_algorithm xxh3_128 is used ("
            + "; ".join(used)
            + "); those checksums have no equivalent in the older algorithms: re-checksum or "
            "remove those rows first"
        )
    _swap(NEW, OLD)
