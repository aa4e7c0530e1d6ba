"""steward workbench: users, sessions, claims, an append-only audit table, API tokens; queue indexes

``steward_audit`` refuses UPDATE and DELETE (triggers on SQLite and PostgreSQL): an audit line, once
written, stays. ``match_candidates`` gets the indexes the workbench's queue reads by (pending pairs of an
entity by score, covering both records; a cluster walked from the right-hand record of a pair),
``customers`` one on the city and ``external_ids`` one on (entity, system, record) for the queue's
filters.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

APPEND_ONLY = "steward_audit is append-only: audit lines are never changed or deleted"


def upgrade() -> None:
    op.create_table(
        "steward_api_tokens",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_steward_api_tokens")),
        sa.UniqueConstraint("name", name=op.f("uq_steward_api_tokens_name")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_steward_api_tokens_token_hash")),
    )
    op.create_table(
        "steward_audit",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=True),
        sa.Column("ip", sa.String(length=64), nullable=True),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("entity", sa.String(length=32), nullable=True),
        sa.Column("record_id", sa.Integer(), nullable=True),
        sa.Column("summary", sa.Text(), nullable=True),
        sa.Column("before", sa.JSON(), nullable=True),
        sa.Column("after", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_steward_audit")),
    )
    op.create_index("ix_steward_audit_action_at", "steward_audit", ["action", "at"], unique=False)
    op.create_index(
        "ix_steward_audit_entity_record_id", "steward_audit", ["entity", "record_id"], unique=False
    )
    op.create_table(
        "steward_users",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("password_changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_steward_users")),
        sa.UniqueConstraint("name", name=op.f("uq_steward_users_name")),
    )
    op.create_table(
        "steward_claims",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("entity", sa.String(length=32), nullable=False),
        sa.Column("record_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("assigned_by", sa.String(length=64), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["steward_users.id"], name=op.f("fk_steward_claims_user_id_steward_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_steward_claims")),
        sa.UniqueConstraint("entity", "record_id", name=op.f("uq_steward_claims_entity_record_id")),
    )
    op.create_index(op.f("ix_steward_claims_expires_at"), "steward_claims", ["expires_at"], unique=False)
    op.create_index(op.f("ix_steward_claims_user_id"), "steward_claims", ["user_id"], unique=False)
    op.create_table(
        "steward_sessions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("csrf_token", sa.String(length=64), nullable=False),
        sa.Column("ip", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("skipped", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["steward_users.id"], name=op.f("fk_steward_sessions_user_id_steward_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_steward_sessions")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_steward_sessions_token_hash")),
    )
    op.create_index(op.f("ix_steward_sessions_user_id"), "steward_sessions", ["user_id"], unique=False)
    op.create_index(
        "ix_match_candidates_entity_right_id", "match_candidates", ["entity", "right_id"], unique=False
    )
    op.create_index(
        "ix_match_candidates_queue",
        "match_candidates",
        ["status", "entity", "probability", "id", "left_id", "right_id"],
        unique=False,
    )
    op.create_index("ix_customers_city", "customers", ["city"], unique=False)
    op.create_index(
        "ix_external_ids_entity_system_entity_id",
        "external_ids",
        ["entity", "system", "entity_id"],
        unique=False,
    )
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for event in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER steward_audit_no_{event.lower()} BEFORE {event} ON steward_audit "
                f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END"
            )
    elif dialect == "postgresql":
        op.execute(
            "CREATE FUNCTION steward_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN RAISE EXCEPTION '{APPEND_ONLY}'; END $$"
        )
        op.execute(
            "CREATE TRIGGER steward_audit_append_only BEFORE UPDATE OR DELETE ON steward_audit "
            "FOR EACH ROW EXECUTE FUNCTION steward_audit_append_only()"
        )
        op.execute(
            "CREATE TRIGGER steward_audit_no_truncate BEFORE TRUNCATE ON steward_audit "
            "FOR EACH STATEMENT EXECUTE FUNCTION steward_audit_append_only()"
        )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.drop_index("ix_external_ids_entity_system_entity_id", table_name="external_ids")
    op.drop_index("ix_customers_city", table_name="customers")
    op.drop_index("ix_match_candidates_queue", table_name="match_candidates")
    op.drop_index("ix_match_candidates_entity_right_id", table_name="match_candidates")
    op.drop_index(op.f("ix_steward_sessions_user_id"), table_name="steward_sessions")
    op.drop_table("steward_sessions")
    op.drop_index(op.f("ix_steward_claims_user_id"), table_name="steward_claims")
    op.drop_index(op.f("ix_steward_claims_expires_at"), table_name="steward_claims")
    op.drop_table("steward_claims")
    op.drop_table("steward_users")
    op.drop_index("ix_steward_audit_entity_record_id", table_name="steward_audit")
    op.drop_index("ix_steward_audit_action_at", table_name="steward_audit")
    op.drop_table("steward_audit")  # its triggers go with it
    if dialect == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS steward_audit_append_only()")
    op.drop_table("steward_api_tokens")
