"""indexes on the foreign keys that had none

Deleting or merging a row makes the database look for rows that still point at it; without an index on
the referencing column that is a full scan per row, so rolling back a 30,000-contact load took minutes.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

INDEXED = [
    ("sales_reps", "merged_into_id"),
    ("contacts", "merged_into_id"),
    ("opportunities", "registered_by_id"),
    ("sales_orders", "opportunity_id"),
    ("sales_orders", "owner_id"),
    ("receivables", "order_id"),
]


def upgrade() -> None:
    for table, column in INDEXED:
        with op.batch_alter_table(table) as batch:
            batch.create_index(batch.f(f"ix_{table}_{column}"), [column], unique=False)


def downgrade() -> None:
    for table, column in reversed(INDEXED):
        with op.batch_alter_table(table) as batch:
            batch.drop_index(batch.f(f"ix_{table}_{column}"))
