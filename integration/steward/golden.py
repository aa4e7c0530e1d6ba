"""The golden record page: a record, every source record merged into it, its crosswalk keys, what hangs off
it (contacts, opportunities, orders) and its history (merges and undos; every decision on it, who, when and
through which channel: workbench, sheet or CLI). A few set queries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, func, or_, select

from crm_core.merging import MODEL_OF, table_of
from crm_core.models import Base
from crm_core.steward_models import AUDIT
from integration.steward.audit import channel_of
from integration.steward.cluster import FIELDS, active_ids
from integration.steward.errors import StewardError

TABLES = Base.metadata.tables
SHOWN = 100  # rows per list on the page (the count says how many there are)


@dataclass
class GoldenView:
    """What the golden record page shows."""

    entity: str
    record: dict[str, Any]
    active_id: int  # the golden record this one is part of now (itself when active)
    fields: tuple[str, ...]
    sources: list[dict[str, Any]]  # records merged into it, directly or through an earlier survivor
    crosswalk: list[dict[str, Any]]
    merges: list[dict[str, Any]]
    audit: list[dict[str, Any]]
    related: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    owner: str | None = None
    customer: dict[str, Any] | None = None  # a contact's customer
    pending: list[dict[str, Any]] = field(default_factory=list)  # pairs still waiting on it
    different: list[dict[str, Any]] = field(default_factory=list)  # pairs decided "not the same"


def golden_view(connection: Connection, entity: str, record_id: int) -> GoldenView:
    """Read a record and everything the page shows about it."""
    if entity not in MODEL_OF:
        raise StewardError(f"unknown entity '{entity}'; use customer or contact", status=404)
    table = table_of(MODEL_OF[entity])
    row = connection.execute(select(table).where(table.c.id == record_id)).mappings().first()
    if row is None:
        raise StewardError(f"no {entity} {record_id} in the core", status=404)
    record = dict(row)
    active = active_ids(connection, entity, [record_id])[record_id]
    sources: list[dict[str, Any]] = []
    frontier, seen = [record_id], {record_id}
    while frontier:
        found = [
            dict(r)
            for r in connection.execute(
                select(table).where(table.c.merged_into_id.in_(frontier)).order_by(table.c.id)
            ).mappings()
        ]
        found = [r for r in found if r["id"] not in seen]
        seen |= {r["id"] for r in found}
        sources += found
        frontier = [r["id"] for r in found]
    everyone = sorted(seen)
    xw = TABLES["external_ids"]
    crosswalk = sorted(
        (
            dict(r)
            for r in connection.execute(
                select(xw.c.system, xw.c.external_key, xw.c.match_method, xw.c.last_synced_at).where(
                    xw.c.entity == entity, xw.c.entity_id == record_id
                )
            ).mappings()
        ),
        key=lambda r: (r["system"], r["external_key"]),
    )  # sorted here: an ORDER BY would tempt the planner into the (entity, system, key) index
    log = TABLES["merge_log"]
    merges = [
        dict(r)
        for r in connection.execute(
            select(log)
            .where(
                log.c.entity == entity, or_(log.c.survivor_id.in_(everyone), log.c.merged_id.in_(everyone))
            )
            .order_by(log.c.id.desc())
            .limit(SHOWN)
        ).mappings()
    ]
    audit = [
        {**r, "channel": channel_of(r["after"])}
        for r in connection.execute(
            select(AUDIT.c.at, AUDIT.c.actor, AUDIT.c.action, AUDIT.c.summary, AUDIT.c.ip, AUDIT.c.after)
            .where(AUDIT.c.entity == entity, AUDIT.c.record_id.in_(everyone))
            .order_by(AUDIT.c.id.desc())
            .limit(SHOWN)
        ).mappings()
    ]  # every channel's decisions: the workbench, its sheet import, the CLI
    mc = TABLES["match_candidates"]
    pending = [
        dict(r)
        for r in connection.execute(
            select(mc.c.id, mc.c.left_id, mc.c.right_id, mc.c.probability)
            .where(mc.c.entity == entity, mc.c.status == "review",
                   or_(mc.c.left_id == record_id, mc.c.right_id == record_id))
            .order_by(mc.c.probability.desc())
            .limit(SHOWN)
        ).mappings()
    ]  # fmt: skip
    different = [
        dict(r)
        for r in connection.execute(
            select(mc.c.id, mc.c.left_id, mc.c.right_id, mc.c.decided_by, mc.c.decided_at)
            .where(mc.c.entity == entity, mc.c.status == "distinct",
                   or_(mc.c.left_id.in_(everyone), mc.c.right_id.in_(everyone)))
            .order_by(mc.c.id.desc())
            .limit(SHOWN)
        ).mappings()
    ]  # fmt: skip
    view = GoldenView(
        entity,
        record,
        active,
        FIELDS[entity],
        sources,
        crosswalk,
        merges,
        audit,
        pending=pending,
        different=different,
    )
    reps = TABLES["sales_reps"]
    customers = TABLES["customers"]
    if entity == "customer":
        if record.get("owner_id") is not None:
            view.owner = connection.scalar(select(reps.c.name).where(reps.c.id == record["owner_id"]))
        contacts, opportunities, orders = TABLES["contacts"], TABLES["opportunities"], TABLES["sales_orders"]
        queries = {
            "contacts": (
                contacts,
                select(contacts.c.id, contacts.c.name, contacts.c.title, contacts.c.mobile, contacts.c.email)
                .where(contacts.c.customer_id == record_id, contacts.c.merged_into_id.is_(None))
                .order_by(contacts.c.id),
                [contacts.c.customer_id == record_id, contacts.c.merged_into_id.is_(None)],
            ),
            "opportunities": (
                opportunities,
                select(opportunities.c.id, opportunities.c.name, opportunities.c.stage_code, opportunities.c.amount,
                       opportunities.c.currency, opportunities.c.registered_at, reps.c.name.label("owner"))
                .outerjoin(reps, reps.c.id == opportunities.c.owner_id)
                .where(opportunities.c.customer_id == record_id)
                .order_by(opportunities.c.id),
                [opportunities.c.customer_id == record_id],
            ),
            "orders": (
                orders,
                select(orders.c.id, orders.c.order_no, orders.c.order_date, orders.c.total_amount,
                       orders.c.currency, orders.c.status)
                .where(orders.c.customer_id == record_id)
                .order_by(orders.c.id),
                [orders.c.customer_id == record_id],
            ),
        }  # fmt: skip
        for name, (related_table, query, where) in queries.items():
            view.related[name] = [dict(r) for r in connection.execute(query.limit(SHOWN)).mappings()]
            view.counts[name] = int(
                connection.scalar(select(func.count()).select_from(related_table).where(*where)) or 0
            )
    elif record.get("customer_id") is not None:
        company = connection.execute(
            select(customers.c.id, customers.c.name).where(customers.c.id == record["customer_id"])
        ).first()
        view.customer = dict(company._mapping) if company else None
    return view
