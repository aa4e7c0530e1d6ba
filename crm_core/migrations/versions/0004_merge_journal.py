"""journal rows tagged with their merge, with the values the merge wrote

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("row_changes") as batch:
        batch.add_column(sa.Column("merge_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("after", sa.JSON(), nullable=True))
        batch.create_index(batch.f("ix_row_changes_merge_id"), ["merge_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("row_changes") as batch:
        batch.drop_index(batch.f("ix_row_changes_merge_id"))
        batch.drop_column("after")
        batch.drop_column("merge_id")
