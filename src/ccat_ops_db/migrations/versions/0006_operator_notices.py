"""operator notices

Adds ``operator_notice``: the problems that need a person (data_transfer.notify), one row per
problem from the pass that first saw it until it cleared, with the channels each opening and
clearing was delivered to. ``ix_operator_notice_open`` is a partial unique index on
(kind, subject) over the open notices: one open notice per problem, and the notifications
manager's scan of the open ones reads only them however long the history grows.

The downgrade drops the table: its rows are a record of what was sent, not pipeline state,
so it never refuses.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 19:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OPEN = "cleared_at IS NULL"
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        "operator_notice",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("subject", sa.String(length=255), nullable=False),
        sa.Column("site", sa.String(length=64), nullable=True),
        sa.Column("summary", sa.String(length=1000), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cleared_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("delivered", JSON, nullable=False),
        sa.Column("cleared_delivered", JSON, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_operator_notice")),
    )
    op.create_index(op.f("ix_operator_notice_first_seen_at"), "operator_notice", ["first_seen_at"])
    op.create_index(op.f("ix_operator_notice_cleared_at"), "operator_notice", ["cleared_at"])
    op.create_index(
        "ix_operator_notice_open",
        "operator_notice",
        ["kind", "subject"],
        unique=True,
        postgresql_where=sa.text(OPEN),
        sqlite_where=sa.text(OPEN),
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_index("ix_operator_notice_open", table_name="operator_notice")
    op.drop_index(op.f("ix_operator_notice_cleared_at"), table_name="operator_notice")
    op.drop_index(op.f("ix_operator_notice_first_seen_at"), table_name="operator_notice")
    op.drop_table("operator_notice")
