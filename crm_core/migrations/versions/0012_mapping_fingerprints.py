"""mapping fingerprints: what each mapping's input was when a run last loaded it, to skip unchanged re-runs

A full run skips a mapping whose sources, mapping file, project settings and code are what they were when
the last run that loaded it succeeded. Rows carry that run in ``created_run_id``: rolling the run back
deletes them, so a fingerprint never outlives the rows it describes.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mapping_fingerprints",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("created_run_id", sa.Integer(), nullable=False),
        sa.Column("project", sa.String(length=128), nullable=False),
        sa.Column("mapping", sa.String(length=128), nullable=False),
        sa.Column("entity", sa.String(length=32), nullable=False),
        sa.Column("system", sa.String(length=64), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=True),
        sa.Column("locations", sa.JSON(), nullable=False),
        sa.Column("depends_on_core", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["created_run_id"],
            ["load_runs.id"],
            name=op.f("fk_mapping_fingerprints_created_run_id_load_runs"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mapping_fingerprints")),
    )
    op.create_index(
        op.f("ix_mapping_fingerprints_created_run_id"),
        "mapping_fingerprints",
        ["created_run_id"],
        unique=False,
    )
    op.create_index(
        "ix_mapping_fingerprints_project_mapping",
        "mapping_fingerprints",
        ["project", "mapping"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_mapping_fingerprints_project_mapping", table_name="mapping_fingerprints")
    op.drop_index(op.f("ix_mapping_fingerprints_created_run_id"), table_name="mapping_fingerprints")
    op.drop_table("mapping_fingerprints")
