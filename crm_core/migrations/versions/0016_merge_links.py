"""merge links: the customer merges a contact merge follows from, instead of its reason text

A contact merge that joined contacts a customer merge brought under one customer is undone with that
customer merge. Until now only a steward's merge tied them together, through the contact merge's reason
("same person under one customer after customer merge 5, 6"), and undoing an automatic customer merge
left its contacts merged across two customers again. ``merge_links`` holds (contact merge, customer merge)
pairs; the rows the reason text named are copied in, each journaled as inserted by its merge's run so a
rollback of that run removes it with the merge.

Revision ID: 0016
Revises: 0015
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

# crm_core.merging.CONTACTS_AFTER as every earlier revision wrote it (copied: a migration never changes meaning)
CONTACTS_AFTER = "same person under one customer after customer merge "
_JOURNAL = sa.table(
    "row_changes",
    sa.column("load_run_id", sa.Integer()), sa.column("table_name", sa.String()), sa.column("row_key", sa.String()),
    sa.column("operation", sa.String()), sa.column("before", sa.JSON()), sa.column("after", sa.JSON()),
    sa.column("merge_id", sa.Integer()),
)  # fmt: skip


def upgrade() -> None:
    links = op.create_table(
        "merge_links",
        sa.Column("merge_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("follows_merge_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.PrimaryKeyConstraint("merge_id", "follows_merge_id", name=op.f("pk_merge_links")),
    )
    op.create_index(
        op.f("ix_merge_links_follows_merge_id"), "merge_links", ["follows_merge_id"], unique=False
    )
    rows, journal = _from_reasons(op.get_bind())
    if rows:
        op.bulk_insert(links, rows)
        op.bulk_insert(_JOURNAL, journal)


def downgrade() -> None:
    # An older toolkit's rollback would not know the table: the journal forgets its rows with it.
    op.execute(sa.text("DELETE FROM row_changes WHERE table_name = 'merge_links'"))
    op.drop_index(op.f("ix_merge_links_follows_merge_id"), table_name="merge_links")
    op.drop_table("merge_links")


def _from_reasons(bind: sa.Connection) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The links the reasons of contact merges name, as the code before this revision read them: customer
    merges of the same run, made before the contact merge; and their journal entries."""
    customers = {
        int(i): int(run)
        for i, run in bind.execute(sa.text("SELECT id, load_run_id FROM merge_log WHERE entity = 'customer'"))
    }
    contacts: Sequence[Any] = bind.execute(
        sa.text("SELECT id, load_run_id, reason FROM merge_log WHERE entity = 'contact' AND reason LIKE :p"),
        {"p": CONTACTS_AFTER + "%"},
    ).all()
    rows: list[dict[str, Any]] = []
    journal: list[dict[str, Any]] = []
    for merge_id, run_id, reason in contacts:
        named = {int(i) for i in reason.removeprefix(CONTACTS_AFTER).split(", ") if i.strip().isdigit()}
        for follows in sorted(i for i in named if customers.get(i) == run_id and i < merge_id):
            rows.append({"merge_id": int(merge_id), "follows_merge_id": follows})
            key = json.dumps({"follows_merge_id": follows, "merge_id": int(merge_id)}, sort_keys=True)
            journal.append({"load_run_id": int(run_id), "table_name": "merge_links", "row_key": key,
                            "operation": "insert", "before": None, "after": None, "merge_id": None})  # fmt: skip
    return rows, journal
