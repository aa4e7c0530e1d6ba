"""The append-only audit log: every sign-in, decision, merge, undo, claim and user change, who and when.

Lines are written with Core inserts on the caller's connection, in the transaction of what they describe
(a decision and its audit line commit together), and never through an ORM session: a session a load run
journals would otherwise journal the audit line, and rolling the run back would try to delete it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, func, insert, select

from crm_core.journal import to_json
from crm_core.models import Base
from crm_core.steward_models import AUDIT

TABLES = Base.metadata.tables


def _safe(value: Any) -> Any:
    """JSON-safe form of audit values (decimals and dates as text)."""
    if isinstance(value, Mapping):
        return {str(k): _safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_safe(v) for v in value]
    return to_json(value)


def record_event(
    connection: Connection,
    actor: str | None,
    action: str,
    *,
    ip: str | None = None,
    entity: str | None = None,
    record_id: int | None = None,
    summary: str | None = None,
    before: Mapping[str, Any] | None = None,
    after: Mapping[str, Any] | None = None,
) -> None:
    """Append one audit line."""
    connection.execute(
        insert(AUDIT).values(
            at=dt.datetime.now(dt.UTC), actor=actor, ip=ip, action=action, entity=entity, record_id=record_id,
            summary=summary, before=None if before is None else _safe(before),
            after=None if after is None else _safe(after),
        )
    )  # fmt: skip


@dataclass(frozen=True)
class AuditPage:
    """One page of audit lines, newest first, and how many match."""

    rows: list[dict[str, Any]]
    total: int


def audit_page(
    connection: Connection,
    *,
    actor: str | None = None,
    action: str | None = None,
    entity: str | None = None,
    record_ids: list[int] | None = None,
    page: int = 1,
    per_page: int = 50,
) -> AuditPage:
    """Audit lines newest first, filtered by actor, action, or the records they are about."""
    conditions = []
    if actor:
        conditions.append(AUDIT.c.actor == actor)
    if action:
        conditions.append(AUDIT.c.action == action)
    if entity:
        conditions.append(AUDIT.c.entity == entity)
    if record_ids is not None:
        conditions.append(AUDIT.c.record_id.in_(record_ids))
    total = connection.scalar(select(func.count()).select_from(AUDIT).where(*conditions)) or 0
    rows = connection.execute(
        select(AUDIT)
        .where(*conditions)
        .order_by(AUDIT.c.id.desc())
        .limit(per_page)
        .offset((page - 1) * per_page)
    )
    return AuditPage([dict(r._mapping) for r in rows], int(total))
