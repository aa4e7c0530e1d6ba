"""Tables of the steward workbench (``integration/steward``): users, sessions, claims, audit, API tokens.

They share the core's metadata (so Alembic and ``ensure_schema`` see them) but hold no foreign key to a
business table: a merge re-points every reference to a merged record (``crm_core.merging``), and the
workbench's claims and audit lines must keep naming the records they were written about. None of them
carries ``created_run_id``: a load run's rollback never touches them. The audit table is append-only (the
migration adds triggers that refuse UPDATE and DELETE on SQLite and PostgreSQL).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from crm_core.models import Base, Customer, ExternalId, MatchCandidate, intpk

ROLES = ("viewer", "steward", "admin")


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class StewardUser(Base):
    """A person who signs in to the workbench: viewer (reads), steward (decides), admin (everything)."""

    __tablename__ = "steward_users"

    id: Mapped[intpk]
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(String(255))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=_utcnow)
    password_changed_at: Mapped[dt.datetime] = mapped_column(default=_utcnow)


class StewardSession(Base):
    """A signed-in browser: the cookie holds a random token, this row only its SHA-256."""

    __tablename__ = "steward_sessions"

    id: Mapped[intpk]
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("steward_users.id"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    ip: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=_utcnow)
    last_seen_at: Mapped[dt.datetime] = mapped_column(default=_utcnow)
    skipped: Mapped[list[Any]] = mapped_column(JSON, default=list)  # pairs skipped: "next" passes them


class StewardClaim(Base):
    """One record a steward works on (claimed) or was given (assigned): nobody else decides it meanwhile.

    A cluster is claimed record by record; the unique key makes two stewards' claims on one record
    impossible, whatever the timing. A claim past ``expires_at`` is free again.
    """

    __tablename__ = "steward_claims"
    __table_args__ = (UniqueConstraint("entity", "record_id"),)

    id: Mapped[intpk]
    entity: Mapped[str] = mapped_column(String(32))
    record_id: Mapped[int]
    user_id: Mapped[int] = mapped_column(ForeignKey("steward_users.id"), index=True)
    assigned_by: Mapped[str | None] = mapped_column(String(64))  # an admin's assignment, not a claim
    claimed_at: Mapped[dt.datetime] = mapped_column(default=_utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(index=True)


class AuditEvent(Base):
    """Append-only: who did what, when, from where, with the state before and after (never a secret)."""

    __tablename__ = "steward_audit"
    __table_args__ = (
        Index("ix_steward_audit_action_at", "action", "at"),
        Index("ix_steward_audit_entity_record_id", "entity", "record_id"),
    )

    id: Mapped[intpk]
    at: Mapped[dt.datetime] = mapped_column(default=_utcnow)
    actor: Mapped[str | None] = mapped_column(String(64))  # None: nobody signed in (a failed login)
    ip: Mapped[str | None] = mapped_column(String(64))
    # login | login_failed | logout | decide | undo | claim | assign | release | user_add | user_disable |
    # user_reset | token_add
    action: Mapped[str] = mapped_column(String(32))
    entity: Mapped[str | None] = mapped_column(String(32))
    record_id: Mapped[int | None]  # the golden record the event is about (survivor of a decision)
    summary: Mapped[str | None] = mapped_column(Text)
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class ApiToken(Base):
    """A token for the duplicate-check API (商机报备 forms); stored as SHA-256, shown once when made."""

    __tablename__ = "steward_api_tokens"

    id: Mapped[intpk]
    name: Mapped[str] = mapped_column(String(64), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=_utcnow)
    last_used_at: Mapped[dt.datetime | None]


# The workbench's reads of core tables. The queue scans pending pairs of an entity in score order and checks
# each pair's records against a filter without leaving the index (covering: id, left and right); a cluster
# is walked from the right-hand record of a pair too; the city and source filters list their records from
# an index.
_candidates = MatchCandidate.__table__.c
Index(
    "ix_match_candidates_queue",
    _candidates.status,
    _candidates.entity,
    _candidates.probability,
    _candidates.id,
    _candidates.left_id,
    _candidates.right_id,
)
Index("ix_match_candidates_entity_right_id", _candidates.entity, _candidates.right_id)
Index("ix_customers_city", Customer.__table__.c.city)
_crosswalk = ExternalId.__table__.c
Index("ix_external_ids_entity_system_entity_id", _crosswalk.entity, _crosswalk.system, _crosswalk.entity_id)


# The tables as Core tables, for the workbench's set-based statements.
USERS, SESSIONS, CLAIMS, AUDIT, API_TOKENS = (
    Base.metadata.tables[model.__tablename__]
    for model in (StewardUser, StewardSession, StewardClaim, AuditEvent, ApiToken)
)
