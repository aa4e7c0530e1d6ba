"""run journal for rollback, run owner, raw rows on rejects

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "row_changes",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("load_run_id", sa.Integer(), nullable=False),
        sa.Column("table_name", sa.String(length=64), nullable=False),
        sa.Column("row_key", sa.String(length=255), nullable=False),
        sa.Column("operation", sa.String(length=8), nullable=False),
        sa.Column("before", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(
            ["load_run_id"], ["load_runs.id"], name=op.f("fk_row_changes_load_run_id_load_runs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_row_changes")),
    )
    op.create_index(op.f("ix_row_changes_load_run_id"), "row_changes", ["load_run_id"], unique=False)
    op.create_index(
        "ix_row_changes_table_name_row_key", "row_changes", ["table_name", "row_key"], unique=False
    )
    with op.batch_alter_table("load_runs") as batch:
        batch.add_column(sa.Column("host", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("pid", sa.Integer(), nullable=True))
    with op.batch_alter_table("rejects") as batch:
        batch.add_column(sa.Column("raw_row", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rejects") as batch:
        batch.drop_column("raw_row")
    with op.batch_alter_table("load_runs") as batch:
        batch.drop_column("pid")
        batch.drop_column("host")
    op.drop_index("ix_row_changes_table_name_row_key", table_name="row_changes")
    op.drop_index(op.f("ix_row_changes_load_run_id"), table_name="row_changes")
    op.drop_table("row_changes")
