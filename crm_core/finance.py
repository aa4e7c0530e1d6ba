"""回款 on orders and opportunities, and the 业财 loop per customer: computed from the core, set-based.

Invoiced and collected amounts are derived, not stored: receivables (应收) point at their sales order, receipts
(回款) are applied to receivables (核销, ``payment_applications``), and orders point at their opportunity and
customer. A query sums them per order, opportunity or customer in a few GROUP BYs, so the figures are always
those of the core as it is: a finance sync rolled back takes its receivables with it and the figures follow,
and no sales order or opportunity row changes (which would make the sync engine capture and send it to the
ERP again). docs/k3cloud.md explains the choice.

Amounts are in the core's base currency as loaded (``amount`` columns); sums are rounded to the fen.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from crm_core.models import Customer, Opportunity, Payment, PaymentApplication, Receivable, SalesOrder

FEN = Decimal("0.01")
ZERO = Decimal("0.00")


def money(value: Any) -> Decimal:
    """Return a sum as an exact amount in fen (None → 0.00)."""
    if value is None:
        return ZERO
    return Decimal(str(value)).quantize(FEN, rounding=ROUND_HALF_UP)


@dataclass(frozen=True)
class Collection:
    """Ordered, invoiced and collected for one order or opportunity (outstanding = invoiced − collected)."""

    ordered: Decimal
    invoiced: Decimal
    collected: Decimal
    overdue: Decimal  # outstanding on receivables past their due date

    @property
    def outstanding(self) -> Decimal:
        """Return what was invoiced and not collected yet."""
        return self.invoiced - self.collected

    @property
    def not_invoiced(self) -> Decimal:
        """Return what was ordered and not invoiced yet."""
        return self.ordered - self.invoiced

    def as_dict(self) -> dict[str, str]:
        """Return the figures as text amounts (JSON keeps them exact)."""
        figures = {k: str(v) for k, v in asdict(self).items()}
        return {**figures, "outstanding": str(self.outstanding), "not_invoiced": str(self.not_invoiced)}


def _applied_per_receivable() -> Any:
    applied = func.sum(PaymentApplication.amount).label("applied")
    return (
        select(PaymentApplication.receivable_id.label("receivable_id"), applied)
        .group_by(PaymentApplication.receivable_id)
        .subquery()
    )


def _overdue_expression(today: dt.date) -> Any:
    """Return the applied-per-receivable subquery and each receivable's open amount when past due (else 0)."""
    applied = _applied_per_receivable()
    open_amount = Receivable.amount - func.coalesce(applied.c.applied, 0)
    return applied, case(((Receivable.due_date < today) & (open_amount > 0), open_amount), else_=0)


def _per_order(today: dt.date) -> Any:
    applied, overdue = _overdue_expression(today)
    return (
        select(
            Receivable.order_id.label("order_id"),
            func.sum(Receivable.amount).label("invoiced"),
            func.sum(func.coalesce(applied.c.applied, 0)).label("collected"),
            func.sum(overdue).label("overdue"),
        )
        .outerjoin(applied, applied.c.receivable_id == Receivable.id)
        .where(Receivable.order_id.is_not(None))
        .group_by(Receivable.order_id)
        .subquery()
    )


def _ids(query: Any, column: Any, ids: Iterable[int] | None) -> Any:
    return query if ids is None else query.where(column.in_(list(ids)))


def order_collections(
    session: Session, order_ids: Iterable[int] | None = None, *, today: dt.date | None = None
) -> dict[int, Collection]:
    """Return per sales order: its total, what was invoiced against it and what was collected (回款)."""
    per = _per_order(today or dt.date.today())
    query = select(
        SalesOrder.id, SalesOrder.total_amount, per.c.invoiced, per.c.collected, per.c.overdue
    ).outerjoin(per, per.c.order_id == SalesOrder.id)
    return {
        row[0]: Collection(money(row[1]), money(row[2]), money(row[3]), money(row[4]))
        for row in session.execute(_ids(query, SalesOrder.id, order_ids))
    }


def opportunity_collections(
    session: Session, opportunity_ids: Iterable[int] | None = None, *, today: dt.date | None = None
) -> dict[int, Collection]:
    """Return per opportunity, through its sales orders: ordered, invoiced, collected and overdue.

    ``ordered`` is the total of the opportunity's orders; a won deal without an order yet counts its amount.
    """
    per = _per_order(today or dt.date.today())
    orders = (
        select(
            SalesOrder.opportunity_id.label("opportunity_id"),
            func.sum(SalesOrder.total_amount).label("ordered"),
            func.sum(per.c.invoiced).label("invoiced"),
            func.sum(per.c.collected).label("collected"),
            func.sum(per.c.overdue).label("overdue"),
            func.count(SalesOrder.id).label("orders"),
        )
        .outerjoin(per, per.c.order_id == SalesOrder.id)
        .where(SalesOrder.opportunity_id.is_not(None))
        .group_by(SalesOrder.opportunity_id)
        .subquery()
    )
    query = select(
        Opportunity.id, Opportunity.amount, Opportunity.stage_code, orders.c.orders, orders.c.ordered,
        orders.c.invoiced, orders.c.collected, orders.c.overdue,
    ).outerjoin(orders, orders.c.opportunity_id == Opportunity.id)  # fmt: skip
    found: dict[int, Collection] = {}
    for row in session.execute(_ids(query, Opportunity.id, opportunity_ids)):
        ordered = row.ordered if row.orders else (row.amount if row.stage_code == "won" else None)
        found[row.id] = Collection(
            money(ordered), money(row.invoiced), money(row.collected), money(row.overdue)
        )
    return found


def reconcile(
    session: Session, customer_ids: Iterable[int] | None = None, *, today: dt.date | None = None
) -> dict[str, Any]:
    """Return the 业财 loop per customer — ordered vs invoiced vs collected vs received — and what does not add up.

    ``received`` is every receipt's amount, ``collected`` the part applied to receivables; a customer is listed
    under ``differences`` with the reasons: orders not (fully) invoiced, receivables not collected (overdue
    ones apart), receipts not applied to any receivable, receivables without an order, more invoiced than ordered.
    The result is JSON-ready (amounts as text), for ``crmi`` and the Dagster metadata.
    """
    today = today or dt.date.today()
    applied, overdue = _overdue_expression(today)
    sums: dict[int, dict[str, Decimal]] = {}

    def add(query: Any, *names: str) -> None:
        for row in session.execute(_ids(query, query.selected_columns[0], customer_ids)):
            figures = sums.setdefault(row[0], {})
            for name, value in zip(names, row[1:], strict=True):
                figures[name] = money(value)

    add(
        select(SalesOrder.customer_id, func.sum(SalesOrder.total_amount)).group_by(SalesOrder.customer_id),
        "ordered",
    )
    add(
        select(Receivable.customer_id, func.sum(Receivable.amount), func.sum(func.coalesce(applied.c.applied, 0)),
               func.sum(overdue),
               func.sum(case((Receivable.order_id.is_(None), Receivable.amount), else_=0)))
        .outerjoin(applied, applied.c.receivable_id == Receivable.id)
        .group_by(Receivable.customer_id),
        "invoiced", "collected", "overdue", "invoiced_without_order",
    )  # fmt: skip
    add(select(Payment.customer_id, func.sum(Payment.amount)).group_by(Payment.customer_id), "received")
    names: dict[int, str] = {}
    if sums:
        query = select(Customer.id, Customer.name).where(Customer.id.in_(list(sums)))
        names = {row[0]: row[1] for row in session.execute(query)}
    customers: list[dict[str, Any]] = []
    differences: list[dict[str, Any]] = []
    totals = dict.fromkeys(("ordered", "invoiced", "collected", "received", "overdue"), ZERO)
    for customer_id in sorted(sums):
        f = {k: sums[customer_id].get(k, ZERO) for k in (*totals, "invoiced_without_order")}
        for k in totals:
            totals[k] += f[k]
        row = {"customer_id": customer_id, "customer": names.get(customer_id),
               **{k: str(f[k]) for k in (*totals, "invoiced_without_order")},
               "not_invoiced": str(f["ordered"] - f["invoiced"] + f["invoiced_without_order"]),
               "outstanding": str(f["invoiced"] - f["collected"]),
               "unapplied": str(f["received"] - f["collected"])}  # fmt: skip
        customers.append(row)
        reasons = []
        if f["ordered"] > f["invoiced"] - f["invoiced_without_order"]:
            reasons.append("ordered, not invoiced yet")
        if f["invoiced"] - f["invoiced_without_order"] > f["ordered"]:
            reasons.append("invoiced more than ordered")
        if f["invoiced_without_order"]:
            reasons.append("receivables without an order")
        if f["invoiced"] - f["collected"] - f["overdue"] > 0:
            reasons.append("invoiced, not collected yet (not due)")
        if f["overdue"] > 0:
            reasons.append("overdue")
        if f["received"] != f["collected"]:
            reasons.append("receipts not applied to a receivable" if f["received"] > f["collected"]
                           else "applied more than received")  # fmt: skip
        if reasons:
            differences.append(
                {"customer_id": customer_id, "customer": names.get(customer_id), "reasons": reasons}
            )
    return {
        "as_of": today.isoformat(),
        "totals": {
            **{k: str(v) for k, v in totals.items()},
            "outstanding": str(totals["invoiced"] - totals["collected"]),
            "unapplied": str(totals["received"] - totals["collected"]),
        },
        "customers": customers,
        "differences": differences,
    }


__all__ = ["Collection", "money", "opportunity_collections", "order_collections", "reconcile"]
