"""customers.credit_code_as_written: the credit-code cell as the source wrote it

The mapping cleans ``credit_code`` with the ``uscc`` transform, which refuses a code whose check digit
fails, a 15-digit registration number and a 9-character organisation code; with ``on_error: "null"`` the
field stays empty and linkage cannot see the code. ``credit_code_as_written`` keeps the cell (compacted
by the ``uscc_as_written`` transform) so linkage compares it as an identifier with near-matches. It is
not validated as a 统一社会信用代码 and not indexed (linkage reads every active customer anyway).

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("customers") as batch:
        batch.add_column(sa.Column("credit_code_as_written", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("customers") as batch:
        batch.drop_column("credit_code_as_written")
