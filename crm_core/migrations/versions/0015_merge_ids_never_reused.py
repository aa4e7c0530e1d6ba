"""merge ids never reused: ``merge_log`` on SQLite hands out ids with AUTOINCREMENT

Stewards and audit notes name a merge by its id (``crmi dedup undo 17``, "undid merge 17"). SQLite gave a
new row the largest id + 1, so after a rollback removed a run's merges the next run's merges took their
ids again and an earlier note named another merge. With AUTOINCREMENT SQLite remembers the largest id
ever handed out (``sqlite_sequence``); the table is rebuilt once, its rows and ids kept. PostgreSQL's
sequence never reuses an id: nothing changes there.

Revision ID: 0015
Revises: 0014
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    _rebuild(autoincrement=True)


def downgrade() -> None:
    _rebuild(autoincrement=False)


def _rebuild(*, autoincrement: bool) -> None:
    """Rebuild ``merge_log`` on SQLite with or without AUTOINCREMENT, rows, ids and names kept."""
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    table = sa.Table("merge_log", sa.MetaData(), autoload_with=bind)
    table.primary_key.name = "pk_merge_log"  # (batch mode's rebuild would drop the constraint's name)
    with op.batch_alter_table(
        "merge_log", recreate="always", copy_from=table, table_kwargs={"sqlite_autoincrement": autoincrement}
    ):
        pass
