"""The append-only audit log: every sign-in, decision, merge, undo, claim and user change, who and when.

Lines are written with Core inserts on the caller's connection, in the transaction of what they describe
(a decision and its audit line commit together), and never through an ORM session: a session a load run
journals would otherwise journal the audit line, and rolling the run back would try to delete it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
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


# Where a decision was taken, as its audit line says (``after["channel"]``) and the pages show it.
CHANNELS = {"web": "workbench", "sheet": "sheet", "cli": "CLI"}


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
    channel: str | None = None,
) -> None:
    """Append one audit line; ``channel`` (a key of :data:`CHANNELS`) says where a decision was taken."""
    if channel is not None:
        after = {**(after or {}), "channel": channel}
    connection.execute(
        insert(AUDIT).values(
            at=dt.datetime.now(dt.UTC), actor=actor, ip=ip, action=action, entity=entity, record_id=record_id,
            summary=summary, before=None if before is None else _safe(before),
            after=None if after is None else _safe(after),
        )
    )  # fmt: skip


def channel_of(after: Mapping[str, Any] | None) -> str:
    """Where an audit line's action was taken, in words: workbench, sheet or CLI.

    Lines written before the channel was recorded came from the workbench (a sheet's carry its row).
    """
    after = after or {}
    channel = after.get("channel") or ("sheet" if "sheet_row" in after else "web")
    return CHANNELS.get(str(channel), str(channel))


def record_decision(
    connection: Connection,
    actor: str,
    entity: str,
    main: int,
    others: Sequence[int],
    summary: str,
    *,
    channel: str,
    ip: str | None = None,
    before: Mapping[str, Any] | None = None,
    after: Mapping[str, Any] | None = None,
) -> None:
    """Audit a decision on records: a ``decide`` line on ``main`` (the golden record), and a ``decide_member``
    line on each of ``others``, so every record's Audit list shows it, whatever the channel."""
    record_event(connection, actor, "decide", ip=ip, entity=entity, record_id=main, summary=summary,
                 before=before, after=after, channel=channel)  # fmt: skip
    for other in others:
        if other != main:
            record_event(connection, actor, "decide_member", ip=ip, entity=entity, record_id=other,
                         summary=f"{summary} (pair of {main})", channel=channel)  # fmt: skip


def record_undo(connection: Connection, actor: str, log: Any, *, channel: str, ip: str | None = None) -> None:
    """Audit the undo of merge ``log`` (a ``MergeLog`` just undone) on its survivor and its merged record."""
    record_event(
        connection, actor, "undo", ip=ip, entity=log.entity, record_id=log.survivor_id, channel=channel,
        summary=f"undid merge {log.id}: {log.entity} {log.merged_id} is separate from {log.survivor_id} "
        "again",
        before={"merge": log.id, "survivor_id": log.survivor_id, "merged_id": log.merged_id,
                "decided_by": log.decided_by},
        after={"undone_at": to_json(log.undone_at), "pair": "distinct"},
    )  # fmt: skip
    record_event(connection, actor, "undo_member", ip=ip, entity=log.entity, record_id=log.merged_id,
                 summary=f"undid merge {log.id} (merged record)", channel=channel)  # fmt: skip


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
    return AuditPage([{**r._mapping, "channel": channel_of(r.after)} for r in rows], int(total))
