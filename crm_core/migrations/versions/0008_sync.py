"""sync with ERP and finance: outbox, per-record sync state, conflicts, and the fields the ERP owns

``sync_outbox`` holds captured changes until a target applied them (or they became dead letters),
``sync_state`` what a record and a target last exchanged (echo suppression, conflict detection),
``sync_conflicts`` fields both sides changed. Customers get the ERP's code, credit limit and payment
terms, sales orders their shipment and invoice state, opportunities the ERP order number.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sync_conflicts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("target", sa.String(length=64), nullable=False),
        sa.Column("entity", sa.String(length=32), nullable=False),
        sa.Column("entity_id", sa.Integer(), nullable=False),
        sa.Column("field", sa.String(length=64), nullable=False),
        sa.Column("exchanged_value", sa.Text(), nullable=True),
        sa.Column("crm_value", sa.Text(), nullable=True),
        sa.Column("target_value", sa.Text(), nullable=True),
        sa.Column("owner", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("decided_by", sa.String(length=64), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("load_run_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["load_run_id"], ["load_runs.id"], name=op.f("fk_sync_conflicts_load_run_id_load_runs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sync_conflicts")),
    )
    with op.batch_alter_table("sync_conflicts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sync_conflicts_entity_id"), ["entity_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_sync_conflicts_load_run_id"), ["load_run_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_sync_conflicts_status"), ["status"], unique=False)

    op.create_table(
        "sync_outbox",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("target", sa.String(length=64), nullable=False),
        sa.Column("entity", sa.String(length=32), nullable=False),
        sa.Column("entity_id", sa.Integer(), nullable=False),
        sa.Column("operation", sa.String(length=32), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("payload_hash", sa.String(length=64), nullable=False),
        sa.Column("core_values", sa.JSON(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=128), nullable=False),
        sa.Column("trade_id", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("external_key", sa.String(length=255), nullable=True),
        sa.Column("load_run_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["load_run_id"], ["load_runs.id"], name=op.f("fk_sync_outbox_load_run_id_load_runs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sync_outbox")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_sync_outbox_idempotency_key")),
    )
    with op.batch_alter_table("sync_outbox", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sync_outbox_load_run_id"), ["load_run_id"], unique=False)
        batch_op.create_index(
            "ix_sync_outbox_target_entity_entity_id", ["target", "entity", "entity_id"], unique=False
        )
        batch_op.create_index(
            "ix_sync_outbox_target_status_next_attempt_at",
            ["target", "status", "next_attempt_at"],
            unique=False,
        )

    op.create_table(
        "sync_state",
        sa.Column("target", sa.String(length=64), nullable=False),
        sa.Column("entity", sa.String(length=32), nullable=False),
        sa.Column("entity_id", sa.Integer(), nullable=False),
        sa.Column("external_key", sa.String(length=255), nullable=True),
        sa.Column("payload_hash", sa.String(length=64), nullable=True),
        sa.Column("core_values", sa.JSON(), nullable=False),
        sa.Column("load_run_id", sa.Integer(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["load_run_id"], ["load_runs.id"], name=op.f("fk_sync_state_load_run_id_load_runs")
        ),
        sa.PrimaryKeyConstraint("target", "entity", "entity_id", name=op.f("pk_sync_state")),
    )
    with op.batch_alter_table("sync_state", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sync_state_load_run_id"), ["load_run_id"], unique=False)

    with op.batch_alter_table("customers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("erp_code", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("credit_limit", sa.Numeric(precision=18, scale=2), nullable=True))
        batch_op.add_column(sa.Column("payment_terms", sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f("ix_customers_erp_code"), ["erp_code"], unique=False)

    with op.batch_alter_table("opportunities", schema=None) as batch_op:
        batch_op.add_column(sa.Column("erp_order_no", sa.String(length=64), nullable=True))

    with op.batch_alter_table("sales_orders", schema=None) as batch_op:
        batch_op.add_column(sa.Column("shipment_status", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("invoice_status", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sales_orders", schema=None) as batch_op:
        batch_op.drop_column("invoice_status")
        batch_op.drop_column("shipment_status")

    with op.batch_alter_table("opportunities", schema=None) as batch_op:
        batch_op.drop_column("erp_order_no")

    with op.batch_alter_table("customers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_customers_erp_code"))
        batch_op.drop_column("payment_terms")
        batch_op.drop_column("credit_limit")
        batch_op.drop_column("erp_code")

    with op.batch_alter_table("sync_state", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sync_state_load_run_id"))

    op.drop_table("sync_state")
    with op.batch_alter_table("sync_outbox", schema=None) as batch_op:
        batch_op.drop_index("ix_sync_outbox_target_status_next_attempt_at")
        batch_op.drop_index("ix_sync_outbox_target_entity_entity_id")
        batch_op.drop_index(batch_op.f("ix_sync_outbox_load_run_id"))

    op.drop_table("sync_outbox")
    with op.batch_alter_table("sync_conflicts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sync_conflicts_status"))
        batch_op.drop_index(batch_op.f("ix_sync_conflicts_load_run_id"))
        batch_op.drop_index(batch_op.f("ix_sync_conflicts_entity_id"))

    op.drop_table("sync_conflicts")
