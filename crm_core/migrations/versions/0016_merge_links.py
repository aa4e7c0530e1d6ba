"""merge links: the customer merges a contact merge follows from, instead of its reason text

A contact merge that joined contacts a customer merge brought under one customer is undone with that
customer merge. Until now only a steward's merge tied them together, through the contact merge's reason
("same person under one customer after customer merge 5, 6"), and undoing an automatic customer merge
left its contacts merged across two customers again. ``merge_links`` holds (contact merge, customer merge)
pairs. The links the reason text named are copied in, and every contact merge still in place is linked to
the customer merges the journal shows bringing one of its two contacts under their customer and not the
other (so undoing an automatic customer merge made before this revision separates its contacts too); each
link is journaled as inserted by its contact merge's run, so a rollback of that run removes it with the merge.

Revision ID: 0016
Revises: 0015
"""

from __future__ import annotations

import json
from collections import defaultdict
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
    rows, journal = _links(op.get_bind())
    if rows:
        op.bulk_insert(links, rows)
        op.bulk_insert(_JOURNAL, journal)


def downgrade() -> None:
    # An older toolkit's rollback would not know the table: the journal forgets its rows with it.
    op.execute(sa.text("DELETE FROM row_changes WHERE table_name = 'merge_links'"))
    op.drop_index(op.f("ix_merge_links_follows_merge_id"), table_name="merge_links")
    op.drop_table("merge_links")


def _links(bind: sa.Connection) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The links of the core's contact merges, and their journal entries (inserted by the contact merge's run).

    A steward's contact merge names the customer merges it follows from in its reason; the code before this
    revision undid it with those of the same run made before it, and so does the link. Any contact merge not
    undone also follows from the customer merges (not undone, made before it) the journal shows re-pointing
    one of its two contacts and not the other, as ``crm_core.merging.customer_merges_between`` finds them.
    """
    merges = bind.execute(
        sa.text("SELECT id, entity, survivor_id, merged_id, load_run_id, reason, undone_at FROM merge_log")
    ).all()
    customers = {int(m.id): int(m.load_run_id) for m in merges if m.entity == "customer"}
    contacts = [m for m in merges if m.entity == "contact"]
    involved = {int(i) for m in contacts if m.undone_at is None for i in (m.survivor_id, m.merged_id)}
    moved: dict[int, set[int]] = defaultdict(set)
    entries = bind.execute(sa.text(
        "SELECT row_key, merge_id, after FROM row_changes WHERE table_name = 'contacts' AND merge_id IN "
        "(SELECT id FROM merge_log WHERE entity = 'customer' AND undone_at IS NULL)"
    ))  # fmt: skip
    for key, merge_id, after in entries:
        written = json.loads(after) if isinstance(after, str) else after
        contact = int(json.loads(key)["id"])
        if contact in involved and written and "customer_id" in written:
            moved[contact].add(int(merge_id))
    rows: list[dict[str, Any]] = []
    journal: list[dict[str, Any]] = []
    for merge in contacts:
        merge_id, run_id = int(merge.id), int(merge.load_run_id)
        follows: set[int] = set()
        if merge.reason.startswith(CONTACTS_AFTER):
            named = {
                int(i) for i in merge.reason.removeprefix(CONTACTS_AFTER).split(", ") if i.strip().isdigit()
            }
            follows |= {i for i in named if customers.get(i) == run_id and i < merge_id}
        if merge.undone_at is None:
            survivor, merged = (
                {i for i in moved[int(r)] if i < merge_id} for r in (merge.survivor_id, merge.merged_id)
            )
            follows |= survivor ^ merged
        for customer_merge in sorted(follows):
            rows.append({"merge_id": merge_id, "follows_merge_id": customer_merge})
            key = json.dumps({"follows_merge_id": customer_merge, "merge_id": merge_id}, sort_keys=True)
            journal.append({"load_run_id": run_id, "table_name": "merge_links", "row_key": key,
                            "operation": "insert", "before": None, "after": None, "merge_id": None})  # fmt: skip
    return rows, journal
