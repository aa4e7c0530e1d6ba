"""Held names on the workbench: the names source rows give for a customer that matched no single one.

A sales sheet's opportunity naming 广州新元物流公司 waits (held, not rejected) until a steward says which
customer the name means, or that none does (``integration.dedup.references``). ``crmi dedup decide rN`` decides
one from a shell; this is the same decision from the workbench, with the same effect: journaled in a steward
run of its own (``crmi rollback`` undoes it), the held rows load (or are rejected, for "none") on the next
``crmi run``, and the decision is audited on the customer's golden record.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, func, select

from crm_core.db import session_factory
from crm_core.errors import DedupError, SyncLoadWaitError
from crm_core.models import Customer, ReferenceDecision
from integration.dedup.references import REFERENCE_PREFIX, decide_reference, reference_queue
from integration.steward.decisions import Rules, holding_the_core, waited
from integration.steward.errors import StewardError
from integration.steward.security import Principal

SHOWN = 200  # held names on the page, the most money held first
RECENT = 20  # recent decisions shown under them


@dataclass(frozen=True)
class HeldNames:
    """The page's content: the names waiting, how many in all, and the latest decisions."""

    waiting: list[dict[str, Any]]
    total: int
    decided: list[dict[str, Any]]


def held_names(engine: Engine) -> HeldNames:
    """The names waiting for a steward (the most money held first) and the latest decisions."""
    waiting = reference_queue(engine, SHOWN)
    with session_factory(engine)() as session:
        total = session.scalar(
            select(func.count())
            .select_from(ReferenceDecision)
            .where(ReferenceDecision.status == "pending", ReferenceDecision.rows_held > 0)
        )
        decided = session.execute(
            select(ReferenceDecision, Customer.name)
            .outerjoin(Customer, Customer.id == ReferenceDecision.target_id)
            .where(ReferenceDecision.status != "pending")
            .order_by(ReferenceDecision.decided_at.desc(), ReferenceDecision.id.desc())
            .limit(RECENT)
        ).all()
        recent = [
            {"reference": f"{REFERENCE_PREFIX}{d.id}", "name": d.name, "status": d.status, "target_id": d.target_id,
             "target_name": target_name, "rows_held": d.rows_held, "decided_by": d.decided_by,
             "decided_at": d.decided_at}
            for d, target_name in decided
        ]  # fmt: skip
    return HeldNames(waiting, int(total or 0), recent)


def decide_held_name(
    engine: Engine,
    decision_id: int,
    customer_id: int | None,
    user: Principal,
    rules: Rules,
    ip: str | None = None,
) -> ReferenceDecision:
    """Decide held name ``decision_id``: it means customer ``customer_id`` (a merged-away one stands for its
    golden record), or no customer at all (None). Refused while a command holds the core (423), for a name
    already decided (409), a customer not in the core (400), an unknown name (404)."""
    if not user.can("steward"):
        raise StewardError("a viewer cannot decide; ask an admin for the steward role", status=403)
    try:
        with holding_the_core(engine, user, "reference decision"):
            return decide_reference(
                engine, decision_id, record_id=customer_id, steward=user.name, run_key=f"steward-{uuid.uuid4()}",
                project=rules.project, channel="web", ip=ip,
            )  # fmt: skip
    except SyncLoadWaitError as exc:
        raise waited(exc) from None
    except DedupError as exc:
        message = str(exc)
        # an unknown name: 404; a customer id not in the core is the form's (400); a decided name: 409
        status = 404 if message.startswith(f"no reference decision {REFERENCE_PREFIX}") else 409
        if message.startswith("no ") and message.endswith(" in the core"):
            status = 400
        raise StewardError(message, status=status) from None
