"""What IT staff and consultants ask of a sync target: backlog, dead letters, conflicts, last run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine, func, select

from crm_core.db import session_factory
from crm_core.models import LoadRun, SyncConflict, SyncOutbox
from integration.sync.outbox import oldest_pending, outbox_counts

WAITING_SHOWN = 10  # waiting documents listed with their reason, oldest first


def sync_status(engine: Engine, targets: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Return per target: outbox counts by status, the oldest undelivered change, open conflicts, last run, and
    the first documents that wait with why (a customer's U8 code, a steward's decision), the first dead
    letters with the target's reason and the last ones discarded, with who and why."""
    status: dict[str, dict[str, Any]] = {}
    with session_factory(engine)() as session:
        counts = outbox_counts(session)
        for target in targets:
            last = session.scalar(
                select(LoadRun)
                .where(LoadRun.mode == "sync", LoadRun.run_key.like(f"sync-{target}-%"))
                .order_by(LoadRun.id.desc())
                .limit(1)
            )
            open_conflicts = session.scalar(
                select(func.count()).where(SyncConflict.target == target, SyncConflict.status == "open")
            )
            waiting = session.execute(
                select(SyncOutbox.entity, SyncOutbox.entity_id, SyncOutbox.last_error)
                .where(SyncOutbox.target == target, SyncOutbox.status == "waiting")
                .order_by(SyncOutbox.id)
                .limit(WAITING_SHOWN)
            ).all()
            listed = {
                kind: [
                    {"id": row_id, "entity": e, "entity_id": i, "reason": why}
                    for row_id, e, i, why in session.execute(
                        select(SyncOutbox.id, SyncOutbox.entity, SyncOutbox.entity_id, SyncOutbox.last_error)
                        .where(SyncOutbox.target == target, SyncOutbox.status == kind)
                        .order_by(SyncOutbox.id.desc() if kind == "discarded" else SyncOutbox.id)
                        .limit(WAITING_SHOWN)
                    )
                ]
                for kind in ("dead", "discarded")
            }
            status[target] = {
                "outbox": counts.get(target, {}),
                "waiting": [{"entity": e, "entity_id": i, "reason": why} for e, i, why in waiting],
                **listed,
                "oldest_pending": oldest_pending(session, target),
                "conflicts_open": int(open_conflicts or 0),
                "last_run": None
                if last is None
                else {
                    "run_key": last.run_key,
                    "status": last.status,
                    "started_at": last.started_at,
                    "finished_at": last.finished_at,
                    "stats": (last.stats or {}).get("sync"),
                },
            }
    return status
