"""finance documents: the receivable's document date, each document's exchange rate, red-letter entries

K3Cloud receivables (应收单) and receipts (收款单) keep their own currency and exchange rate (汇率); a refund or
red-letter entry (红字) is a negative amount marked ``red_letter``, and a negative amount without the mark is
rejected by the built-in amount rules. ``invoiced_on`` (业务日期) dates a receivable, for days sales
outstanding and for reconciling a period.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("receivables") as batch:
        batch.add_column(sa.Column("invoiced_on", sa.Date(), nullable=True))
        batch.add_column(sa.Column("exchange_rate", sa.Numeric(18, 8), nullable=True))
        batch.add_column(sa.Column("red_letter", sa.Boolean(), server_default=sa.false(), nullable=False))
    with op.batch_alter_table("payments") as batch:
        batch.add_column(sa.Column("exchange_rate", sa.Numeric(18, 8), nullable=True))
        batch.add_column(sa.Column("red_letter", sa.Boolean(), server_default=sa.false(), nullable=False))
    with op.batch_alter_table("payment_applications") as batch:
        batch.add_column(sa.Column("red_letter", sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("payment_applications") as batch:
        batch.drop_column("red_letter")
    with op.batch_alter_table("payments") as batch:
        batch.drop_column("red_letter")
        batch.drop_column("exchange_rate")
    with op.batch_alter_table("receivables") as batch:
        batch.drop_column("red_letter")
        batch.drop_column("exchange_rate")
        batch.drop_column("invoiced_on")
