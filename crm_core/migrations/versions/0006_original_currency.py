"""original amount and currency beside the base-currency amount

A mapping's ``convert`` turns a foreign-currency amount into the base currency; the amount and the
ISO 4217 currency the source gave are kept on the record in these columns (empty when not converted).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

TABLES = ["opportunities", "sales_orders", "sales_order_lines", "receivables", "payments"]


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("original_amount", sa.Numeric(18, 2), nullable=True))
            batch.add_column(sa.Column("original_currency", sa.String(3), nullable=True))


def downgrade() -> None:
    for table in reversed(TABLES):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("original_currency")
            batch.drop_column("original_amount")
