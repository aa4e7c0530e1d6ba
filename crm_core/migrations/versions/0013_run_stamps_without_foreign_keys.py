"""run stamps without foreign keys: created_run_id, updated_run_id and load_run_id no longer reference load_runs

On PostgreSQL a foreign key costs every written row a trigger check against ``load_runs``, two per row on
the run-tracked tables and the crosswalk: a COPY of 300k crosswalk rows took 15.8-16.8 s with them and
8.1-8.9 s without. The keys protected nothing: the loader writes every stamp from the run it has just
created, and a run is never deleted (a rolled-back run is marked ``rolled_back``). The columns, their
nullability and their indexes stay as they were (rollback, delta and dependency detection query by run).

SQLite drops a constraint by rebuilding the table; env.py switches its foreign keys off around the
migration's transaction and runs ``PRAGMA foreign_key_check`` before committing.

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

RUN_TRACKED = (
    "sales_reps",
    "customers",
    "contacts",
    "opportunities",
    "sales_orders",
    "sales_order_lines",
    "receivables",
    "payments",
    "payment_applications",
)

# (table, column) of every run stamp that referenced load_runs.id at revision 0012.
STAMPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("external_ids", ("created_run_id", "updated_run_id")),
    *((table, ("created_run_id", "updated_run_id")) for table in RUN_TRACKED),
    ("row_changes", ("load_run_id",)),
    ("rejects", ("load_run_id",)),
    ("watermarks", ("load_run_id",)),
    ("mapping_fingerprints", ("created_run_id",)),
    ("match_candidates", ("load_run_id",)),
    ("merge_log", ("load_run_id",)),
    ("reference_decisions", ("load_run_id",)),
    ("sync_outbox", ("load_run_id",)),
    ("sync_state", ("load_run_id",)),
    ("sync_conflicts", ("load_run_id",)),
)


def _name(table: str, column: str) -> str:
    return f"fk_{table}_{column}_load_runs"


def upgrade() -> None:
    for table, columns in STAMPS:
        with op.batch_alter_table(table) as batch:
            for column in columns:
                batch.drop_constraint(_name(table, column), type_="foreignkey")


def downgrade() -> None:
    for table, columns in STAMPS:
        with op.batch_alter_table(table) as batch:
            for column in columns:
                batch.create_foreign_key(_name(table, column), "load_runs", [column], ["id"])
