"""match candidates and merge log

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "match_candidates",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("entity", sa.String(length=32), nullable=False),
        sa.Column("left_id", sa.Integer(), nullable=False),
        sa.Column("right_id", sa.Integer(), nullable=False),
        sa.Column("probability", sa.Double(), nullable=False),
        sa.Column("features", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("decided_by", sa.String(length=64), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("load_run_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["load_run_id"], ["load_runs.id"], name=op.f("fk_match_candidates_load_run_id_load_runs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_match_candidates")),
        sa.UniqueConstraint(
            "entity", "left_id", "right_id", name=op.f("uq_match_candidates_entity_left_id_right_id")
        ),
    )
    op.create_index(op.f("ix_match_candidates_status"), "match_candidates", ["status"], unique=False)
    op.create_table(
        "merge_log",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("entity", sa.String(length=32), nullable=False),
        sa.Column("survivor_id", sa.Integer(), nullable=False),
        sa.Column("merged_id", sa.Integer(), nullable=False),
        sa.Column("probability", sa.Double(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("decided_by", sa.String(length=64), nullable=False),
        sa.Column("load_run_id", sa.Integer(), nullable=False),
        sa.Column("first_change_id", sa.Integer(), nullable=True),
        sa.Column("last_change_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("undone_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["load_run_id"], ["load_runs.id"], name=op.f("fk_merge_log_load_run_id_load_runs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_merge_log")),
    )
    op.create_index(op.f("ix_merge_log_merged_id"), "merge_log", ["merged_id"], unique=False)
    op.create_index(op.f("ix_merge_log_survivor_id"), "merge_log", ["survivor_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_merge_log_survivor_id"), table_name="merge_log")
    op.drop_index(op.f("ix_merge_log_merged_id"), table_name="merge_log")
    op.drop_table("merge_log")
    op.drop_index(op.f("ix_match_candidates_status"), table_name="match_candidates")
    op.drop_table("match_candidates")
