"""What IT staff and consultants ask of a sync target: backlog, dead letters, conflicts, last run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine, func, select

from crm_core.db import session_factory
from crm_core.models import LoadRun, SyncConflict
from integration.sync.outbox import oldest_pending, outbox_counts


def sync_status(engine: Engine, targets: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Return per target: outbox counts by status, the oldest undelivered change, open conflicts, last run."""
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
            status[target] = {
                "outbox": counts.get(target, {}),
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
