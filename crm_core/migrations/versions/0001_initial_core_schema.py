"""initial core schema

Revision ID: 0001
Revises:
Create Date: 2026-11-23 15:40:11.640178
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from crm_core.stages import STAGES

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "load_runs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_key", sa.String(length=64), nullable=False),
        sa.Column("project", sa.String(length=128), nullable=False),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("stats", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_load_runs")),
        sa.UniqueConstraint("run_key", name=op.f("uq_load_runs_run_key")),
    )
    op.create_table(
        "stages",
        sa.Column("code", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("name_zh", sa.String(length=64), nullable=False),
        sa.Column("sort_order", sa.Integer(), nullable=False),
        sa.Column("default_probability", sa.Integer(), nullable=False),
        sa.Column("forecast_category", sa.String(length=16), nullable=False),
        sa.Column("is_closed", sa.Boolean(), nullable=False),
        sa.Column("is_won", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("code", name=op.f("pk_stages")),
    )
    op.create_table(
        "external_ids",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("entity", sa.String(length=32), nullable=False),
        sa.Column("entity_id", sa.Integer(), nullable=False),
        sa.Column("system", sa.String(length=64), nullable=False),
        sa.Column("external_key", sa.String(length=255), nullable=False),
        sa.Column("match_method", sa.String(length=64), nullable=False),
        sa.Column("last_synced_hash", sa.String(length=64), nullable=True),
        sa.Column("last_synced_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_run_id", sa.Integer(), nullable=True),
        sa.Column("updated_run_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["created_run_id"], ["load_runs.id"], name=op.f("fk_external_ids_created_run_id_load_runs")
        ),
        sa.ForeignKeyConstraint(
            ["updated_run_id"], ["load_runs.id"], name=op.f("fk_external_ids_updated_run_id_load_runs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_external_ids")),
        sa.UniqueConstraint(
            "entity", "system", "external_key", name=op.f("uq_external_ids_entity_system_external_key")
        ),
    )
    with op.batch_alter_table("external_ids", schema=None) as batch_op:
        batch_op.create_index("ix_external_ids_entity_entity_id", ["entity", "entity_id"], unique=False)

    op.create_table(
        "rejects",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("load_run_id", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("entity", sa.String(length=32), nullable=False),
        sa.Column("location", sa.String(length=255), nullable=True),
        sa.Column("row_ref", sa.String(length=255), nullable=False),
        sa.Column("field", sa.String(length=64), nullable=True),
        sa.Column("value", sa.Text(), nullable=True),
        sa.Column("rule", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("severity", sa.String(length=8), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["load_run_id"], ["load_runs.id"], name=op.f("fk_rejects_load_run_id_load_runs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rejects")),
    )
    with op.batch_alter_table("rejects", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_rejects_load_run_id"), ["load_run_id"], unique=False)

    op.create_table(
        "sales_reps",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("code", sa.String(length=64), nullable=True),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("email", sa.String(length=255), nullable=True),
        sa.Column("phone", sa.String(length=32), nullable=True),
        sa.Column("department", sa.String(length=255), nullable=True),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("merged_into_id", sa.Integer(), nullable=True),
        sa.Column("created_run_id", sa.Integer(), nullable=True),
        sa.Column("updated_run_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(
            ["created_run_id"], ["load_runs.id"], name=op.f("fk_sales_reps_created_run_id_load_runs")
        ),
        sa.ForeignKeyConstraint(
            ["merged_into_id"], ["sales_reps.id"], name=op.f("fk_sales_reps_merged_into_id_sales_reps")
        ),
        sa.ForeignKeyConstraint(
            ["updated_run_id"], ["load_runs.id"], name=op.f("fk_sales_reps_updated_run_id_load_runs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sales_reps")),
    )
    with op.batch_alter_table("sales_reps", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sales_reps_code"), ["code"], unique=False)
        batch_op.create_index(batch_op.f("ix_sales_reps_created_run_id"), ["created_run_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_sales_reps_updated_run_id"), ["updated_run_id"], unique=False)

    op.create_table(
        "watermarks",
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("stream", sa.String(length=128), nullable=False),
        sa.Column("cursor_value", sa.Text(), nullable=True),
        sa.Column("load_run_id", sa.Integer(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["load_run_id"], ["load_runs.id"], name=op.f("fk_watermarks_load_run_id_load_runs")
        ),
        sa.PrimaryKeyConstraint("source", "stream", name=op.f("pk_watermarks")),
    )
    op.create_table(
        "customers",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("name_normalized", sa.String(length=255), nullable=True),
        sa.Column("short_name", sa.String(length=255), nullable=True),
        sa.Column("english_name", sa.String(length=255), nullable=True),
        sa.Column("credit_code", sa.String(length=18), nullable=True),
        sa.Column("phone", sa.String(length=32), nullable=True),
        sa.Column("email", sa.String(length=255), nullable=True),
        sa.Column("website", sa.String(length=255), nullable=True),
        sa.Column("address", sa.String(length=512), nullable=True),
        sa.Column("province", sa.String(length=32), nullable=True),
        sa.Column("city", sa.String(length=32), nullable=True),
        sa.Column("district", sa.String(length=32), nullable=True),
        sa.Column("industry", sa.String(length=64), nullable=True),
        sa.Column("is_branch", sa.Boolean(), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("owner_id", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("merged_into_id", sa.Integer(), nullable=True),
        sa.Column("created_run_id", sa.Integer(), nullable=True),
        sa.Column("updated_run_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(
            ["created_run_id"], ["load_runs.id"], name=op.f("fk_customers_created_run_id_load_runs")
        ),
        sa.ForeignKeyConstraint(
            ["merged_into_id"], ["customers.id"], name=op.f("fk_customers_merged_into_id_customers")
        ),
        sa.ForeignKeyConstraint(
            ["owner_id"], ["sales_reps.id"], name=op.f("fk_customers_owner_id_sales_reps")
        ),
        sa.ForeignKeyConstraint(
            ["parent_id"], ["customers.id"], name=op.f("fk_customers_parent_id_customers")
        ),
        sa.ForeignKeyConstraint(
            ["updated_run_id"], ["load_runs.id"], name=op.f("fk_customers_updated_run_id_load_runs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_customers")),
    )
    with op.batch_alter_table("customers", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_customers_created_run_id"), ["created_run_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_customers_credit_code"), ["credit_code"], unique=False)
        batch_op.create_index(batch_op.f("ix_customers_merged_into_id"), ["merged_into_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_customers_name_normalized"), ["name_normalized"], unique=False)
        batch_op.create_index(batch_op.f("ix_customers_owner_id"), ["owner_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_customers_parent_id"), ["parent_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_customers_updated_run_id"), ["updated_run_id"], unique=False)

    op.create_table(
        "contacts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("customer_id", sa.Integer(), nullable=True),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("title", sa.String(length=128), nullable=True),
        sa.Column("department", sa.String(length=128), nullable=True),
        sa.Column("mobile", sa.String(length=32), nullable=True),
        sa.Column("phone", sa.String(length=32), nullable=True),
        sa.Column("email", sa.String(length=255), nullable=True),
        sa.Column("is_primary", sa.Boolean(), nullable=False),
        sa.Column("merged_into_id", sa.Integer(), nullable=True),
        sa.Column("created_run_id", sa.Integer(), nullable=True),
        sa.Column("updated_run_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(
            ["created_run_id"], ["load_runs.id"], name=op.f("fk_contacts_created_run_id_load_runs")
        ),
        sa.ForeignKeyConstraint(
            ["customer_id"], ["customers.id"], name=op.f("fk_contacts_customer_id_customers")
        ),
        sa.ForeignKeyConstraint(
            ["merged_into_id"], ["contacts.id"], name=op.f("fk_contacts_merged_into_id_contacts")
        ),
        sa.ForeignKeyConstraint(
            ["updated_run_id"], ["load_runs.id"], name=op.f("fk_contacts_updated_run_id_load_runs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_contacts")),
    )
    with op.batch_alter_table("contacts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_contacts_created_run_id"), ["created_run_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_contacts_customer_id"), ["customer_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_contacts_updated_run_id"), ["updated_run_id"], unique=False)

    op.create_table(
        "opportunities",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("customer_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("stage_code", sa.String(length=32), nullable=False),
        sa.Column("probability", sa.Integer(), nullable=True),
        sa.Column("amount", sa.Numeric(precision=18, scale=2), nullable=True),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("expected_close_date", sa.Date(), nullable=True),
        sa.Column("closed_on", sa.Date(), nullable=True),
        sa.Column("owner_id", sa.Integer(), nullable=True),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("registered_by_id", sa.Integer(), nullable=True),
        sa.Column("lead_source", sa.String(length=64), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("created_run_id", sa.Integer(), nullable=True),
        sa.Column("updated_run_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(
            ["created_run_id"], ["load_runs.id"], name=op.f("fk_opportunities_created_run_id_load_runs")
        ),
        sa.ForeignKeyConstraint(
            ["customer_id"], ["customers.id"], name=op.f("fk_opportunities_customer_id_customers")
        ),
        sa.ForeignKeyConstraint(
            ["owner_id"], ["sales_reps.id"], name=op.f("fk_opportunities_owner_id_sales_reps")
        ),
        sa.ForeignKeyConstraint(
            ["registered_by_id"], ["sales_reps.id"], name=op.f("fk_opportunities_registered_by_id_sales_reps")
        ),
        sa.ForeignKeyConstraint(
            ["stage_code"], ["stages.code"], name=op.f("fk_opportunities_stage_code_stages")
        ),
        sa.ForeignKeyConstraint(
            ["updated_run_id"], ["load_runs.id"], name=op.f("fk_opportunities_updated_run_id_load_runs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_opportunities")),
    )
    with op.batch_alter_table("opportunities", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_opportunities_created_run_id"), ["created_run_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_opportunities_customer_id"), ["customer_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_opportunities_owner_id"), ["owner_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_opportunities_updated_run_id"), ["updated_run_id"], unique=False)

    op.create_table(
        "payments",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("payment_no", sa.String(length=64), nullable=False),
        sa.Column("customer_id", sa.Integer(), nullable=False),
        sa.Column("received_on", sa.Date(), nullable=True),
        sa.Column("amount", sa.Numeric(precision=18, scale=2), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("method", sa.String(length=32), nullable=True),
        sa.Column("reference", sa.String(length=128), nullable=True),
        sa.Column("created_run_id", sa.Integer(), nullable=True),
        sa.Column("updated_run_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(
            ["created_run_id"], ["load_runs.id"], name=op.f("fk_payments_created_run_id_load_runs")
        ),
        sa.ForeignKeyConstraint(
            ["customer_id"], ["customers.id"], name=op.f("fk_payments_customer_id_customers")
        ),
        sa.ForeignKeyConstraint(
            ["updated_run_id"], ["load_runs.id"], name=op.f("fk_payments_updated_run_id_load_runs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payments")),
    )
    with op.batch_alter_table("payments", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_payments_created_run_id"), ["created_run_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_payments_customer_id"), ["customer_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_payments_updated_run_id"), ["updated_run_id"], unique=False)

    op.create_table(
        "sales_orders",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("order_no", sa.String(length=64), nullable=False),
        sa.Column("customer_id", sa.Integer(), nullable=False),
        sa.Column("opportunity_id", sa.Integer(), nullable=True),
        sa.Column("order_date", sa.Date(), nullable=True),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("total_amount", sa.Numeric(precision=18, scale=2), nullable=True),
        sa.Column("status", sa.String(length=32), nullable=True),
        sa.Column("owner_id", sa.Integer(), nullable=True),
        sa.Column("created_run_id", sa.Integer(), nullable=True),
        sa.Column("updated_run_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(
            ["created_run_id"], ["load_runs.id"], name=op.f("fk_sales_orders_created_run_id_load_runs")
        ),
        sa.ForeignKeyConstraint(
            ["customer_id"], ["customers.id"], name=op.f("fk_sales_orders_customer_id_customers")
        ),
        sa.ForeignKeyConstraint(
            ["opportunity_id"],
            ["opportunities.id"],
            name=op.f("fk_sales_orders_opportunity_id_opportunities"),
        ),
        sa.ForeignKeyConstraint(
            ["owner_id"], ["sales_reps.id"], name=op.f("fk_sales_orders_owner_id_sales_reps")
        ),
        sa.ForeignKeyConstraint(
            ["updated_run_id"], ["load_runs.id"], name=op.f("fk_sales_orders_updated_run_id_load_runs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sales_orders")),
    )
    with op.batch_alter_table("sales_orders", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sales_orders_created_run_id"), ["created_run_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_sales_orders_customer_id"), ["customer_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_sales_orders_updated_run_id"), ["updated_run_id"], unique=False)

    op.create_table(
        "receivables",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("receivable_no", sa.String(length=64), nullable=False),
        sa.Column("customer_id", sa.Integer(), nullable=False),
        sa.Column("order_id", sa.Integer(), nullable=True),
        sa.Column("due_date", sa.Date(), nullable=True),
        sa.Column("amount", sa.Numeric(precision=18, scale=2), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=True),
        sa.Column("created_run_id", sa.Integer(), nullable=True),
        sa.Column("updated_run_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(
            ["created_run_id"], ["load_runs.id"], name=op.f("fk_receivables_created_run_id_load_runs")
        ),
        sa.ForeignKeyConstraint(
            ["customer_id"], ["customers.id"], name=op.f("fk_receivables_customer_id_customers")
        ),
        sa.ForeignKeyConstraint(
            ["order_id"], ["sales_orders.id"], name=op.f("fk_receivables_order_id_sales_orders")
        ),
        sa.ForeignKeyConstraint(
            ["updated_run_id"], ["load_runs.id"], name=op.f("fk_receivables_updated_run_id_load_runs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_receivables")),
    )
    with op.batch_alter_table("receivables", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_receivables_created_run_id"), ["created_run_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_receivables_customer_id"), ["customer_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_receivables_updated_run_id"), ["updated_run_id"], unique=False)

    op.create_table(
        "sales_order_lines",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("order_id", sa.Integer(), nullable=False),
        sa.Column("line_no", sa.Integer(), nullable=False),
        sa.Column("product_code", sa.String(length=64), nullable=True),
        sa.Column("product_name", sa.String(length=255), nullable=True),
        sa.Column("quantity", sa.Numeric(precision=18, scale=4), nullable=True),
        sa.Column("unit_price", sa.Numeric(precision=18, scale=4), nullable=True),
        sa.Column("amount", sa.Numeric(precision=18, scale=2), nullable=True),
        sa.Column("tax_rate", sa.Numeric(precision=6, scale=4), nullable=True),
        sa.Column("created_run_id", sa.Integer(), nullable=True),
        sa.Column("updated_run_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(
            ["created_run_id"], ["load_runs.id"], name=op.f("fk_sales_order_lines_created_run_id_load_runs")
        ),
        sa.ForeignKeyConstraint(
            ["order_id"], ["sales_orders.id"], name=op.f("fk_sales_order_lines_order_id_sales_orders")
        ),
        sa.ForeignKeyConstraint(
            ["updated_run_id"], ["load_runs.id"], name=op.f("fk_sales_order_lines_updated_run_id_load_runs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sales_order_lines")),
    )
    with op.batch_alter_table("sales_order_lines", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_sales_order_lines_created_run_id"), ["created_run_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_sales_order_lines_order_id"), ["order_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_sales_order_lines_updated_run_id"), ["updated_run_id"], unique=False
        )

    op.create_table(
        "payment_applications",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("payment_id", sa.Integer(), nullable=False),
        sa.Column("receivable_id", sa.Integer(), nullable=False),
        sa.Column("amount", sa.Numeric(precision=18, scale=2), nullable=False),
        sa.Column("created_run_id", sa.Integer(), nullable=True),
        sa.Column("updated_run_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(
            ["created_run_id"],
            ["load_runs.id"],
            name=op.f("fk_payment_applications_created_run_id_load_runs"),
        ),
        sa.ForeignKeyConstraint(
            ["payment_id"], ["payments.id"], name=op.f("fk_payment_applications_payment_id_payments")
        ),
        sa.ForeignKeyConstraint(
            ["receivable_id"],
            ["receivables.id"],
            name=op.f("fk_payment_applications_receivable_id_receivables"),
        ),
        sa.ForeignKeyConstraint(
            ["updated_run_id"],
            ["load_runs.id"],
            name=op.f("fk_payment_applications_updated_run_id_load_runs"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payment_applications")),
        sa.UniqueConstraint(
            "payment_id", "receivable_id", name=op.f("uq_payment_applications_payment_id_receivable_id")
        ),
    )
    with op.batch_alter_table("payment_applications", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_payment_applications_created_run_id"), ["created_run_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_payment_applications_payment_id"), ["payment_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_payment_applications_receivable_id"), ["receivable_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_payment_applications_updated_run_id"), ["updated_run_id"], unique=False
        )

    stages = sa.table(
        "stages",
        sa.column("code", sa.String),
        sa.column("name", sa.String),
        sa.column("name_zh", sa.String),
        sa.column("sort_order", sa.Integer),
        sa.column("default_probability", sa.Integer),
        sa.column("forecast_category", sa.String),
        sa.column("is_closed", sa.Boolean),
        sa.column("is_won", sa.Boolean),
    )
    op.bulk_insert(stages, [dict(row) for row in STAGES])


def downgrade() -> None:
    with op.batch_alter_table("payment_applications", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_payment_applications_updated_run_id"))
        batch_op.drop_index(batch_op.f("ix_payment_applications_receivable_id"))
        batch_op.drop_index(batch_op.f("ix_payment_applications_payment_id"))
        batch_op.drop_index(batch_op.f("ix_payment_applications_created_run_id"))

    op.drop_table("payment_applications")
    with op.batch_alter_table("sales_order_lines", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sales_order_lines_updated_run_id"))
        batch_op.drop_index(batch_op.f("ix_sales_order_lines_order_id"))
        batch_op.drop_index(batch_op.f("ix_sales_order_lines_created_run_id"))

    op.drop_table("sales_order_lines")
    with op.batch_alter_table("receivables", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_receivables_updated_run_id"))
        batch_op.drop_index(batch_op.f("ix_receivables_customer_id"))
        batch_op.drop_index(batch_op.f("ix_receivables_created_run_id"))

    op.drop_table("receivables")
    with op.batch_alter_table("sales_orders", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sales_orders_updated_run_id"))
        batch_op.drop_index(batch_op.f("ix_sales_orders_customer_id"))
        batch_op.drop_index(batch_op.f("ix_sales_orders_created_run_id"))

    op.drop_table("sales_orders")
    with op.batch_alter_table("payments", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_payments_updated_run_id"))
        batch_op.drop_index(batch_op.f("ix_payments_customer_id"))
        batch_op.drop_index(batch_op.f("ix_payments_created_run_id"))

    op.drop_table("payments")
    with op.batch_alter_table("opportunities", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_opportunities_updated_run_id"))
        batch_op.drop_index(batch_op.f("ix_opportunities_owner_id"))
        batch_op.drop_index(batch_op.f("ix_opportunities_customer_id"))
        batch_op.drop_index(batch_op.f("ix_opportunities_created_run_id"))

    op.drop_table("opportunities")
    with op.batch_alter_table("contacts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_contacts_updated_run_id"))
        batch_op.drop_index(batch_op.f("ix_contacts_customer_id"))
        batch_op.drop_index(batch_op.f("ix_contacts_created_run_id"))

    op.drop_table("contacts")
    with op.batch_alter_table("customers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_customers_updated_run_id"))
        batch_op.drop_index(batch_op.f("ix_customers_parent_id"))
        batch_op.drop_index(batch_op.f("ix_customers_owner_id"))
        batch_op.drop_index(batch_op.f("ix_customers_name_normalized"))
        batch_op.drop_index(batch_op.f("ix_customers_merged_into_id"))
        batch_op.drop_index(batch_op.f("ix_customers_credit_code"))
        batch_op.drop_index(batch_op.f("ix_customers_created_run_id"))

    op.drop_table("customers")
    op.drop_table("watermarks")
    with op.batch_alter_table("sales_reps", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sales_reps_updated_run_id"))
        batch_op.drop_index(batch_op.f("ix_sales_reps_created_run_id"))
        batch_op.drop_index(batch_op.f("ix_sales_reps_code"))

    op.drop_table("sales_reps")
    with op.batch_alter_table("rejects", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_rejects_load_run_id"))

    op.drop_table("rejects")
    with op.batch_alter_table("external_ids", schema=None) as batch_op:
        batch_op.drop_index("ix_external_ids_entity_entity_id")

    op.drop_table("external_ids")
    op.drop_table("stages")
    op.drop_table("load_runs")
