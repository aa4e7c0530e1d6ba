"""reference decisions: names of customers that source rows give and that a steward must link

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reference_decisions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("entity", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("name_key", sa.String(length=255), nullable=False),
        sa.Column("candidates", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("target_id", sa.Integer(), nullable=True),
        sa.Column("rows_held", sa.Integer(), nullable=False),
        sa.Column("amount_held", sa.Numeric(precision=18, scale=2), nullable=True),
        sa.Column("decided_by", sa.String(length=64), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("load_run_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["load_run_id"], ["load_runs.id"], name=op.f("fk_reference_decisions_load_run_id_load_runs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reference_decisions")),
        sa.UniqueConstraint("entity", "name_key", name=op.f("uq_reference_decisions_entity_name_key")),
    )
    op.create_index(op.f("ix_reference_decisions_status"), "reference_decisions", ["status"], unique=False)
    op.create_index(
        op.f("ix_reference_decisions_load_run_id"), "reference_decisions", ["load_run_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_reference_decisions_load_run_id"), table_name="reference_decisions")
    op.drop_index(op.f("ix_reference_decisions_status"), table_name="reference_decisions")
    op.drop_table("reference_decisions")
