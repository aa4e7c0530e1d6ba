"""corrected rejects: each reject records its mapping, the row's crosswalk key and its mapped amount

A rejected row whose key a re-imported fix sheet loaded (its (system, entity, key) is in ``external_ids``,
marked ``corrected_by`` that fix mapping) is corrected, not quarantined: the reconciliation needs the key, the mapping (which line the row belongs
to: a fix sheet reads the same source and entity) and the amount (the money corrected). Rows written
before this revision have none of the three: they stay quarantined. The crosswalk's unique index on
(entity, system, external_key) serves the look-up; no new index.

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("external_ids") as batch:
        batch.add_column(sa.Column("corrected_by", sa.String(length=128), nullable=True))
    with op.batch_alter_table("rejects") as batch:
        batch.add_column(sa.Column("mapping", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("external_key", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("amount", sa.Numeric(precision=18, scale=2), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rejects") as batch:
        batch.drop_column("amount")
        batch.drop_column("external_key")
        batch.drop_column("mapping")
    with op.batch_alter_table("external_ids") as batch:
        batch.drop_column("corrected_by")
