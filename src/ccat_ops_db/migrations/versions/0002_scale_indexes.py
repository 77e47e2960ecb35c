"""partial indexes for the pipeline's scans at scale

Three partial indexes on ``physical_copy`` (see docs/scale.md):

* ``ix_physical_copy_live`` (status, data_location_id) over the copies that are not DELETED:
  the deletion manager's candidates and the recovery sweeper's stuck deletions. Deleted copies
  keep their rows, so after five years almost every row is DELETED and this index stays small.
  On PostgreSQL it also carries copy_type, size and updated_at, so live copies and bytes per
  location (the pipeline summary) can be counted from the index alone.
* ``ix_physical_copy_fixity`` (checksum_verified_at, id) over present package copies: the
  fixity audit's oldest-verified-first scan; ``ix_physical_copy_unverified`` (id) over those
  never verified (normally empty, which is what lets the planner pick it: the column is NULL
  for almost every other row, so statistics alone mislead it).

On PostgreSQL each build reads the table once while writes to it wait (3 s for all three at
10.7 million rows); the indexes are small (a few MB).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 12:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LIVE = "status <> 'deleted'"
FIXITY = "copy_type = 'raw_data_package' AND status = 'present'"
UNVERIFIED = FIXITY + " AND checksum_verified_at IS NULL"


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("physical_copy", schema=None) as batch_op:
        batch_op.create_index(
            "ix_physical_copy_live",
            ["status", "data_location_id"],
            unique=False,
            postgresql_where=sa.text(LIVE),
            sqlite_where=sa.text(LIVE),
            postgresql_include=["copy_type", "size", "updated_at"],
        )
        batch_op.create_index(
            "ix_physical_copy_fixity",
            ["checksum_verified_at", "id"],
            unique=False,
            postgresql_where=sa.text(FIXITY),
            sqlite_where=sa.text(FIXITY),
        )
        batch_op.create_index(
            "ix_physical_copy_unverified",
            ["id"],
            unique=False,
            postgresql_where=sa.text(UNVERIFIED),
            sqlite_where=sa.text(UNVERIFIED),
        )


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("physical_copy", schema=None) as batch_op:
        batch_op.drop_index("ix_physical_copy_unverified")
        batch_op.drop_index("ix_physical_copy_fixity")
        batch_op.drop_index("ix_physical_copy_live")
