"""回款 on orders and opportunities, and the 业财 loop per customer: computed from the core, set-based.

Invoiced and collected amounts are derived, not stored: receivables (应收) point at their sales order, receipts
(回款) are applied to receivables (核销, ``payment_applications``), and orders point at their opportunity and
customer. A query sums them per order, opportunity or customer in a few GROUP BYs, so the figures are always
those of the core as it is: a finance sync rolled back takes its receivables with it and the figures follow,
and no sales order or opportunity row changes (which would make the sync engine capture and send it to the
ERP again). docs/k3cloud.md explains the choice.

Amounts are in the core's base currency as loaded (``amount`` columns); sums are rounded to the fen.

**An order's amount** (``ordered``) is its ``total_amount``; an order loaded without one (a mapping that does
not map it) counts the sum of its lines' ``amount`` when every line has one. An order with neither is *without
an amount*: it is left out of ``ordered``, never counted as 0, and every figure here says how many there are
(``orders_without_amount``), so a loop cannot look closed for want of an amount. An order whose total and lines
disagree counts its total, and the reconciliations list it as a difference.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from sqlalchemy import case, exists, func, select
from sqlalchemy.orm import Session, aliased

from crm_core.models import (
    Customer,
    ExternalId,
    Opportunity,
    Payment,
    PaymentApplication,
    Receivable,
    SalesOrder,
    SalesOrderLine,
)

FEN = Decimal("0.01")
ZERO = Decimal("0.00")


def money(value: Any) -> Decimal:
    """Return a sum as an exact amount in fen (None → 0.00)."""
    if value is None:
        return ZERO
    return Decimal(str(value)).quantize(FEN, rounding=ROUND_HALF_UP)


def _lines_per_order(order_ids: Any | None = None) -> Any:
    """Per order (of ``order_ids``, a select of ids, else all): the sum of its lines' amounts, NULL unless every
    line has an amount."""
    every_line_priced = func.count() == func.count(SalesOrderLine.amount)
    query = select(
        SalesOrderLine.order_id.label("order_id"),
        case((every_line_priced, func.sum(SalesOrderLine.amount))).label("amount"),
    ).group_by(SalesOrderLine.order_id)
    if order_ids is not None:
        query = query.where(SalesOrderLine.order_id.in_(order_ids))
    return query.subquery()


def _order_amount(lines: Any) -> Any:
    """An order's amount: its total_amount, else the sum of its lines (``lines``: outer-joined); NULL: unknown."""
    return func.coalesce(SalesOrder.total_amount, lines.c.amount)


def _without_total() -> Any:
    """The ids of orders without a total_amount: the only ones whose lines an amount needs."""
    return select(SalesOrder.id).where(SalesOrder.total_amount.is_(None))


def _differs_from_lines(lines: Any) -> Any:
    """True where an order has a total_amount and priced lines that add up to another amount (to the fen)."""
    return (
        SalesOrder.total_amount.is_not(None)
        & lines.c.amount.is_not(None)
        & (func.round(SalesOrder.total_amount - lines.c.amount, 2) != 0)
    )


def _count(condition: Any) -> Any:
    return func.sum(case((condition, 1), else_=0))


def _orders(count: int) -> str:
    return f"{count} order" if count == 1 else f"{count} orders"


@dataclass(frozen=True)
class Collection:
    """Ordered, invoiced and collected for one order or opportunity (outstanding = invoiced − collected).

    ``ordered`` leaves out orders without an amount (no total_amount, not every line priced); they are counted in
    ``orders_without_amount``.
    """

    ordered: Decimal
    invoiced: Decimal
    collected: Decimal
    overdue: Decimal  # outstanding on receivables past their due date
    orders_without_amount: int = 0

    @property
    def outstanding(self) -> Decimal:
        """Return what was invoiced and not collected yet."""
        return self.invoiced - self.collected

    @property
    def not_invoiced(self) -> Decimal:
        """Return what was ordered and not invoiced yet."""
        return self.ordered - self.invoiced

    def as_dict(self) -> dict[str, Any]:
        """Return the figures as text amounts (JSON keeps them exact), the count of orders without an amount."""
        figures: dict[str, Any] = {k: str(v) for k, v in asdict(self).items()}
        figures["orders_without_amount"] = self.orders_without_amount
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
    """Return per sales order: its amount, what was invoiced against it and what was collected (回款)."""
    per = _per_order(today or dt.date.today())
    lines = _lines_per_order(_without_total())
    query = (
        select(SalesOrder.id, _order_amount(lines), per.c.invoiced, per.c.collected, per.c.overdue)
        .outerjoin(per, per.c.order_id == SalesOrder.id)
        .outerjoin(lines, lines.c.order_id == SalesOrder.id)
    )
    return {
        row[0]: Collection(money(row[1]), money(row[2]), money(row[3]), money(row[4]), int(row[1] is None))
        for row in session.execute(_ids(query, SalesOrder.id, order_ids))
    }


def opportunity_collections(
    session: Session, opportunity_ids: Iterable[int] | None = None, *, today: dt.date | None = None
) -> dict[int, Collection]:
    """Return per opportunity, through its sales orders: ordered, invoiced, collected and overdue.

    ``ordered`` is the amount of the opportunity's orders; a won deal without an order yet counts its amount.
    """
    per = _per_order(today or dt.date.today())
    lines = _lines_per_order(_without_total())
    amount = _order_amount(lines)
    orders = (
        select(
            SalesOrder.opportunity_id.label("opportunity_id"),
            func.sum(amount).label("ordered"),
            func.sum(per.c.invoiced).label("invoiced"),
            func.sum(per.c.collected).label("collected"),
            func.sum(per.c.overdue).label("overdue"),
            func.count(SalesOrder.id).label("orders"),
            _count(amount.is_(None)).label("without_amount"),
        )
        .outerjoin(per, per.c.order_id == SalesOrder.id)
        .outerjoin(lines, lines.c.order_id == SalesOrder.id)
        .where(SalesOrder.opportunity_id.is_not(None))
        .group_by(SalesOrder.opportunity_id)
        .subquery()
    )
    query = select(
        Opportunity.id, Opportunity.amount, Opportunity.stage_code, orders.c.orders, orders.c.ordered,
        orders.c.invoiced, orders.c.collected, orders.c.overdue, orders.c.without_amount,
    ).outerjoin(orders, orders.c.opportunity_id == Opportunity.id)  # fmt: skip
    found: dict[int, Collection] = {}
    for row in session.execute(_ids(query, Opportunity.id, opportunity_ids)):
        ordered = row.ordered if row.orders else (row.amount if row.stage_code == "won" else None)
        found[row.id] = Collection(
            money(ordered), money(row.invoiced), money(row.collected), money(row.overdue),
            int(row.without_amount or 0),
        )  # fmt: skip
    return found


def reconcile(
    session: Session, customer_ids: Iterable[int] | None = None, *, today: dt.date | None = None
) -> dict[str, Any]:
    """Return the 业财 loop per customer — ordered vs invoiced vs collected vs received — and what does not add up.

    ``received`` is every receipt's amount, ``collected`` the part applied to receivables; a customer is listed
    under ``differences`` with the reasons: orders not (fully) invoiced, receivables not collected (overdue
    ones apart), receipts not applied to any receivable, receivables without an order, more invoiced than ordered,
    orders without an amount (what was invoiced against them is not compared with ``ordered``), orders whose
    total_amount differs from the sum of their lines. The result is JSON-ready (amounts as text), for ``crmi`` and
    the Dagster metadata.
    """
    today = today or dt.date.today()
    applied, overdue = _overdue_expression(today)
    lines = _lines_per_order()
    amount = _order_amount(lines)
    unknown = (
        select(SalesOrder.id).outerjoin(lines, lines.c.order_id == SalesOrder.id).where(amount.is_(None))
    )
    sums: dict[int, dict[str, Decimal]] = {}

    def add(query: Any, *names: str) -> None:
        for row in session.execute(_ids(query, query.selected_columns[0], customer_ids)):
            figures = sums.setdefault(row[0], {})
            for name, value in zip(names, row[1:], strict=True):
                figures[name] = money(value)

    add(
        select(SalesOrder.customer_id, func.sum(amount), _count(amount.is_(None)), _count(_differs_from_lines(lines)))
        .outerjoin(lines, lines.c.order_id == SalesOrder.id).group_by(SalesOrder.customer_id),
        "ordered", "orders_without_amount", "orders_differing_from_lines",
    )  # fmt: skip
    add(
        select(Receivable.customer_id, func.sum(Receivable.amount), func.sum(func.coalesce(applied.c.applied, 0)),
               func.sum(overdue),
               func.sum(case((Receivable.order_id.is_(None), Receivable.amount), else_=0)),
               func.sum(case((Receivable.order_id.in_(unknown), Receivable.amount), else_=0)))
        .outerjoin(applied, applied.c.receivable_id == Receivable.id)
        .group_by(Receivable.customer_id),
        "invoiced", "collected", "overdue", "invoiced_without_order", "invoiced_without_amount",
    )  # fmt: skip
    add(select(Payment.customer_id, func.sum(Payment.amount)).group_by(Payment.customer_id), "received")
    names: dict[int, str] = {}
    if sums:
        query = select(Customer.id, Customer.name).where(Customer.id.in_(list(sums)))
        names = {row[0]: row[1] for row in session.execute(query)}
    customers: list[dict[str, Any]] = []
    differences: list[dict[str, Any]] = []
    totals = dict.fromkeys(("ordered", "invoiced", "collected", "received", "overdue"), ZERO)
    counts = dict.fromkeys(("orders_without_amount", "orders_differing_from_lines"), 0)
    for customer_id in sorted(sums):
        f = {
            k: sums[customer_id].get(k, ZERO)
            for k in (*totals, "invoiced_without_order", "invoiced_without_amount")
        }
        n = {k: int(sums[customer_id].get(k, ZERO)) for k in counts}
        for k in totals:
            totals[k] += f[k]
        for k in counts:
            counts[k] += n[k]
        # what was invoiced against orders of a known amount: the part ``ordered`` can be compared with
        invoiced_on_orders = f["invoiced"] - f["invoiced_without_order"] - f["invoiced_without_amount"]
        row = {"customer_id": customer_id, "customer": names.get(customer_id),
               **{k: str(f[k]) for k in (*totals, "invoiced_without_order")},
               "not_invoiced": str(f["ordered"] - invoiced_on_orders),
               "outstanding": str(f["invoiced"] - f["collected"]),
               "unapplied": str(f["received"] - f["collected"]), **n}  # fmt: skip
        customers.append(row)
        reasons = []
        if n["orders_without_amount"]:
            reasons.append(f"{_orders(n['orders_without_amount'])} without an amount "
                           "(neither total_amount nor an amount on every line)")  # fmt: skip
        if n["orders_differing_from_lines"]:
            count = n["orders_differing_from_lines"]
            reasons.append(
                f"{_orders(count)} whose total_amount differs from the sum of {'its' if count == 1 else 'their'} lines"
            )
        if f["ordered"] > invoiced_on_orders:
            reasons.append("ordered, not invoiced yet")
        if invoiced_on_orders > f["ordered"]:
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
        **counts,
        "customers": customers,
        "differences": differences,
    }


# --------------------------------------------------------------------------- order to cash (Dagster asset)

DSO_WINDOW_DAYS = 90


@dataclass(frozen=True)
class CashFigures:
    """Ordered, invoiced, collected and overdue of one opportunity, customer or the whole core, in the base currency.

    ``dso`` (days sales outstanding) = outstanding ÷ invoiced in the last ``window`` days × ``window``; None when
    nothing was invoiced in the window.
    """

    ordered: Decimal
    invoiced: Decimal
    collected: Decimal
    overdue: Decimal
    invoiced_in_window: Decimal
    window: int = DSO_WINDOW_DAYS

    @property
    def outstanding(self) -> Decimal:
        """Return what was invoiced and not collected yet."""
        return self.invoiced - self.collected

    @property
    def dso(self) -> Decimal | None:
        """Return the days sales outstanding, to a tenth of a day (None without sales in the window)."""
        if self.invoiced_in_window <= 0:
            return None
        days = self.outstanding / self.invoiced_in_window * self.window
        return days.quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)

    def as_dict(self) -> dict[str, str | None]:
        """Return the figures as text (JSON keeps them exact)."""
        dso = self.dso
        return {
            "ordered": str(self.ordered), "invoiced": str(self.invoiced), "collected": str(self.collected),
            "outstanding": str(self.outstanding), "overdue": str(self.overdue),
            "dso": None if dso is None else str(dso),
        }  # fmt: skip


@dataclass(frozen=True)
class OrderToCash:
    """The 业财 loop per opportunity and per customer, with totals and the customers most overdue."""

    as_of: dt.date
    base_currency: str
    opportunities: dict[int, CashFigures]
    customers: dict[int, CashFigures]
    totals: CashFigures
    top_overdue: list[dict[str, Any]]
    documents: dict[str, int]  # orders, orders_without_amount, receivables, receipts, foreign_without_rate


def _in_base(amount: Any, currency: Any, rate: Any, base: str) -> Any:
    """A document's amount in the base currency: as is in the base currency, else × its rate, to the fen."""
    return case(((currency == base) | rate.is_(None), amount), else_=func.round(amount * rate, 2))


def _figures(row: Any, ordered: Any, window: int) -> CashFigures:
    return CashFigures(
        money(ordered), money(row.invoiced if row is not None else None),
        money(row.collected if row is not None else None), money(row.overdue if row is not None else None),
        money(row.in_window if row is not None else None), window,
    )  # fmt: skip


def order_to_cash(
    session: Session,
    *,
    today: dt.date | None = None,
    base_currency: str = "CNY",
    window: int = DSO_WINDOW_DAYS,
    top: int = 10,
) -> OrderToCash:
    """Return ordered, invoiced, collected, outstanding, overdue (by due date) and DSO per opportunity and customer.

    ``ordered`` is the orders' amounts (total_amount, else the sum of the lines); ``documents`` counts the orders
    without an amount, which ``ordered`` leaves out.

    Receivables and receipts in another currency count at their own exchange rate (``exchange_rate``, base units
    per unit), rounded to the fen per document; red-letter entries are negative and count as such. A handful of
    GROUP BY queries over the core, so a million documents take seconds, not a Python loop.
    """
    today = today or dt.date.today()
    since = today - dt.timedelta(days=window)
    applied = (
        select(
            PaymentApplication.receivable_id.label("receivable_id"),
            func.sum(_in_base(PaymentApplication.amount, Payment.currency, Payment.exchange_rate, base_currency))
            .label("applied"),
        )
        .join(Payment, Payment.id == PaymentApplication.payment_id)
        .group_by(PaymentApplication.receivable_id)
        .subquery()
    )  # fmt: skip
    amount = _in_base(Receivable.amount, Receivable.currency, Receivable.exchange_rate, base_currency)
    collected = func.coalesce(applied.c.applied, 0)
    open_amount = amount - collected
    sums = (
        func.sum(amount).label("invoiced"),
        func.sum(collected).label("collected"),
        func.sum(case(((Receivable.due_date < today) & (open_amount > 0), open_amount), else_=0)).label(
            "overdue"
        ),
        func.sum(case((Receivable.invoiced_on >= since, amount), else_=0)).label("in_window"),
    )
    per_customer = {
        row.customer_id: row
        for row in session.execute(
            select(Receivable.customer_id, *sums)
            .outerjoin(applied, applied.c.receivable_id == Receivable.id)
            .group_by(Receivable.customer_id)
        )
    }
    per_opportunity: dict[int, Any] = {
        row.opportunity_id: row
        for row in session.execute(
            select(SalesOrder.opportunity_id, *sums)
            .join(SalesOrder, SalesOrder.id == Receivable.order_id)
            .outerjoin(applied, applied.c.receivable_id == Receivable.id)
            .where(SalesOrder.opportunity_id.is_not(None))
            .group_by(SalesOrder.opportunity_id)
        )
    }
    lines = _lines_per_order(_without_total())
    order_amount = _order_amount(lines)
    ordered_customer = {
        row[0]: row[1]
        for row in session.execute(
            select(SalesOrder.customer_id, func.sum(order_amount))
            .outerjoin(lines, lines.c.order_id == SalesOrder.id)
            .group_by(SalesOrder.customer_id)
        )
    }
    ordered_deal: dict[int, Any] = {}
    for deal_id, total in session.execute(
        select(SalesOrder.opportunity_id, func.sum(order_amount))
        .outerjoin(lines, lines.c.order_id == SalesOrder.id)
        .where(SalesOrder.opportunity_id.is_not(None))
        .group_by(SalesOrder.opportunity_id)
    ):
        if deal_id is not None:
            ordered_deal[deal_id] = total
    won_without_order = select(Opportunity.id, Opportunity.amount).where(
        Opportunity.stage_code == "won",
        ~exists().where(SalesOrder.opportunity_id == Opportunity.id),
    )
    for deal_id, deal_amount in session.execute(won_without_order):
        ordered_deal[deal_id] = deal_amount  # a won deal without an order yet: its amount is what was sold
    opportunities = {
        deal: _figures(per_opportunity.get(deal), ordered_deal.get(deal), window)
        for deal in sorted(set(ordered_deal) | set(per_opportunity))
    }
    customers = {
        customer: _figures(per_customer.get(customer), ordered_customer.get(customer), window)
        for customer in sorted(set(ordered_customer) | set(per_customer))
    }
    zero = CashFigures(ZERO, ZERO, ZERO, ZERO, ZERO, window)
    totals = zero
    for figures in customers.values():
        totals = CashFigures(
            totals.ordered + figures.ordered, totals.invoiced + figures.invoiced,
            totals.collected + figures.collected, totals.overdue + figures.overdue,
            totals.invoiced_in_window + figures.invoiced_in_window, window,
        )  # fmt: skip
    worst = sorted(
        (c for c, f in customers.items() if f.overdue > 0), key=lambda c: (-customers[c].overdue, c)
    )[:top]
    names = {
        row[0]: row[1]
        for row in session.execute(select(Customer.id, Customer.name).where(Customer.id.in_(worst)))
    }
    top_overdue = [
        {"customer_id": c, "customer": names.get(c), "overdue": str(customers[c].overdue),
         "outstanding": str(customers[c].outstanding),
         "dso": None if customers[c].dso is None else str(customers[c].dso)}
        for c in worst
    ]  # fmt: skip
    foreign = 0
    for model in (Receivable, Payment):
        foreign += session.scalar(
            select(func.count()).select_from(model)
            .where(model.currency != base_currency, model.exchange_rate.is_(None))
        ) or 0  # fmt: skip
    documents = {
        "orders": session.scalar(select(func.count()).select_from(SalesOrder)) or 0,
        "orders_without_amount": session.scalar(
            select(func.count(SalesOrder.id))
            .outerjoin(lines, lines.c.order_id == SalesOrder.id)
            .where(order_amount.is_(None))
        )
        or 0,
        "receivables": session.scalar(select(func.count()).select_from(Receivable)) or 0,
        "receipts": session.scalar(select(func.count()).select_from(Payment)) or 0,
        "foreign_without_rate": foreign,
    }
    return OrderToCash(today, base_currency, opportunities, customers, totals, top_overdue, documents)


@dataclass(frozen=True)
class Orphan:
    """A receipt that applies to no known receivable, or a receivable tied to no known order or customer."""

    kind: str  # receipt | receivable | application
    number: str
    customer_id: int | None
    amount: Decimal
    reason: str


def loop_orphans(session: Session, limit: int = 50) -> tuple[dict[str, int], list[Orphan]]:
    """Return, per kind, how many documents break the loop, and up to ``limit`` of them with the reason.

    A receipt applied to no receivable; a write-off (核销) whose receivable or receipt is gone; a receivable
    whose order is gone, or belongs to another customer, or (without an order) whose customer was merged away.
    """
    counts: dict[str, int] = {}
    found: list[Orphan] = []
    order = aliased(SalesOrder)
    customer = aliased(Customer)
    checks: list[tuple[str, str, Any]] = [
        ("receipt", "applied to no receivable",
         select(Payment.payment_no, Payment.customer_id, Payment.amount)
         .where(~exists().where(PaymentApplication.payment_id == Payment.id))),
        ("application", "its receivable is not in the core",
         select(Payment.payment_no, Payment.customer_id, PaymentApplication.amount)
         .join(Payment, Payment.id == PaymentApplication.payment_id)
         .outerjoin(Receivable, Receivable.id == PaymentApplication.receivable_id).where(Receivable.id.is_(None))),
        ("receivable", "its order is not in the core",
         select(Receivable.receivable_no, Receivable.customer_id, Receivable.amount)
         .outerjoin(order, order.id == Receivable.order_id)
         .where(Receivable.order_id.is_not(None), order.id.is_(None))),
        ("receivable", "its order belongs to another customer",
         select(Receivable.receivable_no, Receivable.customer_id, Receivable.amount)
         .join(order, order.id == Receivable.order_id).where(order.customer_id != Receivable.customer_id)),
        ("receivable", "no order, and its customer is not in the core (or was merged away)",
         select(Receivable.receivable_no, Receivable.customer_id, Receivable.amount)
         .outerjoin(customer, customer.id == Receivable.customer_id)
         .where(Receivable.order_id.is_(None), customer.id.is_(None) | customer.merged_into_id.is_not(None))),
    ]  # fmt: skip
    for kind, reason, query in checks:
        total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
        if not total:
            continue
        counts[kind] = counts.get(kind, 0) + total
        room = limit - len(found)
        if room > 0:
            for number, customer_id, amount in session.execute(query.limit(room)):
                found.append(Orphan(kind, str(number), customer_id, money(amount), reason))
    return counts, found


def opportunity_loop(session: Session, opportunity_id: int) -> dict[str, Any] | None:
    """Return one opportunity's 业财 loop: its orders, their receivables and the receipts applied to them.

    Each order carries its ``total_amount`` and ``lines_amount`` as loaded (None when missing, or when a line has
    no amount), its ``amount`` for the figures and where that comes from (``amount_from``: total_amount, lines, or
    None: without an amount).
    """
    deal = session.get(Opportunity, opportunity_id)
    if deal is None:
        return None
    orders = []
    lines = _lines_per_order(select(SalesOrder.id).where(SalesOrder.opportunity_id == opportunity_id))
    lines_amounts = {row[0]: row[1] for row in session.execute(select(lines.c.order_id, lines.c.amount))}
    for sales_order in session.scalars(
        select(SalesOrder).where(SalesOrder.opportunity_id == opportunity_id).order_by(SalesOrder.id)
    ):
        receivables = []
        for receivable in session.scalars(
            select(Receivable).where(Receivable.order_id == sales_order.id).order_by(Receivable.id)
        ):
            receipts = [
                {"payment_no": p.payment_no, "received_on": p.received_on and p.received_on.isoformat(),
                 "applied": str(money(a.amount)), "currency": p.currency}
                for a, p in session.execute(
                    select(PaymentApplication, Payment).join(Payment, Payment.id == PaymentApplication.payment_id)
                    .where(PaymentApplication.receivable_id == receivable.id).order_by(Payment.id)
                )
            ]  # fmt: skip
            receivables.append({
                "receivable_no": receivable.receivable_no,
                "invoiced_on": receivable.invoiced_on and receivable.invoiced_on.isoformat(),
                "due_date": receivable.due_date and receivable.due_date.isoformat(),
                "amount": str(money(receivable.amount)), "currency": receivable.currency,
                "red_letter": receivable.red_letter, "receipts": receipts,
            })  # fmt: skip
        total, from_lines = sales_order.total_amount, lines_amounts.get(sales_order.id)
        amount = total if total is not None else from_lines
        orders.append({
            "order_no": sales_order.order_no, "order_date": sales_order.order_date and sales_order.order_date.isoformat(),
            "total_amount": None if total is None else str(money(total)),
            "lines_amount": None if from_lines is None else str(money(from_lines)),
            "amount": None if amount is None else str(money(amount)),
            "amount_from": "total_amount" if total is not None else ("lines" if from_lines is not None else None),
            "receivables": receivables,
        })  # fmt: skip
    cash = opportunity_collections(session, [opportunity_id])[opportunity_id]
    return {
        "opportunity_id": deal.id, "name": deal.name, "stage": deal.stage_code,
        "amount": str(money(deal.amount)), "customer_id": deal.customer_id, "orders": orders,
        "figures": cash.as_dict(),
    }  # fmt: skip


# --------------------------------------------------------------------------- reconciliation of a period

TIMING, MISSING_LINK, AMOUNT_MISMATCH, CURRENCY = "timing", "missing link", "amount mismatch", "currency"
UNKNOWN_AMOUNT = "amount unknown"  # orders without an amount: what they were worth is not in the core


def period_bounds(period: str) -> tuple[dt.date, dt.date]:
    """Return the first and last day of a month written YYYY-MM; ValueError with the expected form otherwise."""
    try:
        start = dt.datetime.strptime(period.strip(), "%Y-%m").date()
    except ValueError:
        raise ValueError(f"a period is a month written YYYY-MM (2026-10), not '{period}'") from None
    following = (start.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
    return start, following - dt.timedelta(days=1)


def _linked(entity: str, column: Any, system: str | None) -> Any:
    """True where the record has a key in ``system`` (the crosswalk); always true without a system."""
    if system is None:
        return True
    return exists().where(
        ExternalId.entity == entity, ExternalId.system == system, ExternalId.entity_id == column
    )


def _period_reasons(f: dict[str, Decimal], base_currency: str) -> list[dict[str, str | None]]:
    """Classify what separates a customer's orders, receivables and receipts of a period."""

    def get(name: str) -> Decimal:
        return f.get(name, ZERO)

    reasons: list[dict[str, str | None]] = []

    def reason(kind: str, between: str, amount: Decimal | None, detail: str) -> None:
        reasons.append({"class": kind, "between": between, "amount": None if amount is None else str(amount),
                        "detail": detail})  # fmt: skip

    # the orders' own amounts: unknown, or a total its lines contradict
    explained = ZERO
    if get("orders_without_amount"):
        count = int(get("orders_without_amount"))
        detail = (f"{_orders(count)} of the period without an amount (neither total_amount nor an amount on every "
                  "line): not in CRM orders")  # fmt: skip
        if get("invoiced_without_amount"):
            detail += (
                f"; {get('invoiced_without_amount')} invoiced against them in the period is not compared"
            )
            explained -= get("invoiced_without_amount")
        reason(UNKNOWN_AMOUNT, "orders", None, detail)
    if get("orders_differing_from_lines"):
        count = int(get("orders_differing_from_lines"))
        reason(AMOUNT_MISMATCH, "order/lines", get("total_over_lines"),
               f"{_orders(count)} whose total_amount differs from the sum of {'its' if count == 1 else 'their'} "
               "lines (total_amount counts)")  # fmt: skip
    # CRM orders vs the ERP's
    gap = get("crm_ordered") - get("erp_ordered")
    if gap:
        reason(MISSING_LINK, "crm/erp", gap, "CRM orders of the period the ERP does not have (no ERP key)")
    # ERP orders vs K3Cloud receivables
    if get("invoiced_without_order"):
        amount = get("invoiced_without_order")
        reason(MISSING_LINK, "orders/receivables", amount, "receivables of the period without a sales order")
        explained -= amount
    if get("invoiced_for_other_periods"):
        amount = get("invoiced_for_other_periods")
        reason(TIMING, "orders/receivables", amount, "receivables of the period for orders of other periods")
        explained -= amount
    if get("orders_invoiced_in_other_periods"):
        amount = get("orders_invoiced_in_other_periods")
        reason(TIMING, "orders/receivables", amount, "the period's orders invoiced in another period")
        explained += amount
    not_invoiced = get("crm_ordered") - get("orders_invoiced")
    if not_invoiced > 0:
        reason(TIMING, "orders/receivables", not_invoiced, "the period's orders not invoiced yet")
        explained += not_invoiced
    if get("invoiced_foreign") or get("foreign_without_rate") or get("currency_differs_from_order"):
        detail = f"receivables in another currency than {base_currency}, counted at their exchange rate"
        if get("foreign_without_rate"):
            detail += f" ({get('foreign_without_rate'):.0f} without a rate: counted at face value)"
        if get("currency_differs_from_order"):
            detail += f"; {get('currency_differs_from_order'):.0f} in another currency than their order"
        reason(CURRENCY, "orders/receivables", get("invoiced_foreign"), detail)
    rest = get("crm_ordered") - get("invoiced") - explained
    if rest:
        reason(AMOUNT_MISMATCH, "orders/receivables", rest,
               "invoiced more than ordered" if rest < 0 else "ordered and invoiced amounts differ")  # fmt: skip
    # receivables vs receipts
    if get("received_unapplied"):
        reason(MISSING_LINK, "receivables/receipts", get("received_unapplied"),
               "receipts of the period applied to no receivable")  # fmt: skip
    if get("received_for_other_periods"):
        reason(TIMING, "receivables/receipts", get("received_for_other_periods"),
               "receipts of the period for receivables of other periods")  # fmt: skip
    if get("collected_after_period"):
        reason(TIMING, "receivables/receipts", get("collected_after_period"),
               "the period's receivables collected after it")  # fmt: skip
    open_gap = (get("invoiced") - get("received") + get("received_unapplied") + get("received_for_other_periods")
                - get("collected_after_period"))  # fmt: skip
    if open_gap > 0:
        reason(TIMING, "receivables/receipts", open_gap, "the period's receivables not collected yet")
    elif open_gap < 0:
        reason(AMOUNT_MISMATCH, "receivables/receipts", open_gap, "collected more than invoiced")
    if get("received_foreign"):
        reason(CURRENCY, "receivables/receipts", get("received_foreign"),
               f"receipts in another currency than {base_currency}, counted at their exchange rate")  # fmt: skip
    return reasons


def reconcile_period(
    session: Session,
    start: dt.date,
    end: dt.date,
    *,
    erp_system: str | None = None,
    finance_system: str | None = None,
    base_currency: str = "CNY",
    today: dt.date | None = None,
) -> dict[str, Any]:
    """Return, per customer, the period's CRM orders vs ERP (U8) orders vs K3Cloud receivables vs receipts.

    ``erp_system`` is the crosswalk system of the ERP's sales orders (orders of the period without a key there are
    not in the ERP: a missing link); ``finance_system`` that of K3Cloud's receivables and receipts (only those
    count as K3Cloud's). Each difference is classified: timing (invoiced or collected in another period, not
    collected yet), missing link (an order not in the ERP, a receivable without an order, a receipt applied to
    no receivable), currency (documents in another currency, counted at their rate, or without one), amount
    mismatch (an order whose total_amount differs from its lines; what the rest does not explain), amount unknown
    (orders without an amount: counted apart, what was invoiced against them not compared; the reason's amount is
    None). JSON-ready: amounts as text; ``orders_without_amount`` per customer and in all.
    """
    today = today or dt.date.today()

    def in_period(column: Any) -> Any:
        return column.between(start, end)

    r_amount = _in_base(Receivable.amount, Receivable.currency, Receivable.exchange_rate, base_currency)
    p_amount = _in_base(Payment.amount, Payment.currency, Payment.exchange_rate, base_currency)
    a_amount = _in_base(PaymentApplication.amount, Payment.currency, Payment.exchange_rate, base_currency)
    k3_receivable = _linked("receivable", Receivable.id, finance_system)
    k3_payment = _linked("payment", Payment.id, finance_system)
    figures: dict[int, dict[str, Decimal]] = {}

    def add(query: Any, *names: str) -> None:
        for row in session.execute(query):
            target = figures.setdefault(row[0], {})
            for name, value in zip(names, row[1:], strict=True):
                target[name] = target.get(name, ZERO) + money(value)

    order_in_period = in_period(SalesOrder.order_date)
    period_order = select(SalesOrder.id).where(order_in_period)
    lines = _lines_per_order(period_order)
    amount = _order_amount(lines)
    differs = _differs_from_lines(lines)
    add(select(SalesOrder.customer_id, func.sum(amount),
               func.sum(case((_linked("sales_order", SalesOrder.id, erp_system), amount), else_=0)),
               _count(amount.is_(None)), _count(differs),
               func.sum(case((differs, SalesOrder.total_amount - lines.c.amount), else_=0)))
        .outerjoin(lines, lines.c.order_id == SalesOrder.id).where(order_in_period).group_by(SalesOrder.customer_id),
        "crm_ordered", "erp_ordered", "orders_without_amount", "orders_differing_from_lines", "total_over_lines")  # fmt: skip
    without_amount = (
        select(SalesOrder.id).outerjoin(lines, lines.c.order_id == SalesOrder.id)
        .where(order_in_period, amount.is_(None))
    )  # fmt: skip
    add(select(Receivable.customer_id, func.sum(r_amount),
               func.sum(case((Receivable.order_id.is_(None), r_amount), else_=0)),
               func.sum(case((Receivable.order_id.is_not(None) & ~Receivable.order_id.in_(period_order), r_amount), else_=0)),
               func.sum(case((Receivable.currency != base_currency, r_amount), else_=0)),
               func.sum(case(((Receivable.currency != base_currency) & Receivable.exchange_rate.is_(None), 1), else_=0)),
               func.sum(case((Receivable.order_id.in_(without_amount), r_amount), else_=0)))
        .where(in_period(Receivable.invoiced_on), k3_receivable).group_by(Receivable.customer_id),
        "invoiced", "invoiced_without_order", "invoiced_for_other_periods", "invoiced_foreign", "foreign_without_rate",
        "invoiced_without_amount")  # fmt: skip
    add(select(Receivable.customer_id, func.sum(r_amount),
               func.sum(case((~in_period(Receivable.invoiced_on) | Receivable.invoiced_on.is_(None), r_amount), else_=0)),
               func.sum(case((Receivable.currency != SalesOrder.currency, 1), else_=0)))
        .join(SalesOrder, SalesOrder.id == Receivable.order_id)
        .where(order_in_period, SalesOrder.id.not_in(without_amount), k3_receivable)
        .group_by(Receivable.customer_id),
        "orders_invoiced", "orders_invoiced_in_other_periods", "currency_differs_from_order")  # fmt: skip
    applied = (
        select(PaymentApplication.payment_id.label("payment_id"), func.count().label("n"))
        .group_by(PaymentApplication.payment_id).subquery()
    )  # fmt: skip
    add(select(Payment.customer_id, func.sum(p_amount), func.sum(case((applied.c.n.is_(None), p_amount), else_=0)),
               func.sum(case((Payment.currency != base_currency, p_amount), else_=0)))
        .outerjoin(applied, applied.c.payment_id == Payment.id)
        .where(in_period(Payment.received_on), k3_payment).group_by(Payment.customer_id),
        "received", "received_unapplied", "received_foreign")  # fmt: skip
    add(select(Payment.customer_id,
               func.sum(case((~in_period(Receivable.invoiced_on) | Receivable.invoiced_on.is_(None), a_amount), else_=0)))
        .join(PaymentApplication, PaymentApplication.payment_id == Payment.id)
        .join(Receivable, Receivable.id == PaymentApplication.receivable_id)
        .where(in_period(Payment.received_on), k3_payment).group_by(Payment.customer_id),
        "received_for_other_periods")  # fmt: skip
    add(select(Receivable.customer_id, func.sum(a_amount))
        .join(PaymentApplication, PaymentApplication.receivable_id == Receivable.id)
        .join(Payment, Payment.id == PaymentApplication.payment_id)
        .where(in_period(Receivable.invoiced_on), k3_receivable, Payment.received_on > end)
        .group_by(Receivable.customer_id), "collected_after_period")  # fmt: skip
    names: dict[int, str] = {}
    if figures:
        query = select(Customer.id, Customer.name).where(Customer.id.in_(list(figures)))
        names = {row[0]: row[1] for row in session.execute(query)}
    columns = ("crm_ordered", "erp_ordered", "invoiced", "received")
    totals = dict.fromkeys(columns, ZERO)
    counts = dict.fromkeys(("orders_without_amount", "orders_differing_from_lines"), 0)
    customers: list[dict[str, Any]] = []
    differences: list[dict[str, Any]] = []
    for customer_id in sorted(figures):
        f = figures[customer_id]
        for name in columns:
            totals[name] += f.get(name, ZERO)
        for name in counts:
            counts[name] += int(f.get(name, ZERO))
        reasons = _period_reasons(f, base_currency)
        row = {"customer_id": customer_id, "customer": names.get(customer_id),
               **{name: str(f.get(name, ZERO)) for name in columns},
               "orders_without_amount": int(f.get("orders_without_amount", ZERO))}  # fmt: skip
        customers.append(row)
        if reasons:
            differences.append(
                {"customer_id": customer_id, "customer": names.get(customer_id), "reasons": reasons}
            )
    return {
        "period": f"{start:%Y-%m}", "from": start.isoformat(), "to": end.isoformat(), "as_of": today.isoformat(),
        "erp_system": erp_system, "finance_system": finance_system, "base_currency": base_currency,
        "totals": {name: str(value) for name, value in totals.items()}, **counts,
        "customers": customers, "differences": differences,
    }  # fmt: skip


__all__ = [
    "UNKNOWN_AMOUNT",
    "CashFigures",
    "Collection",
    "OrderToCash",
    "Orphan",
    "loop_orphans",
    "money",
    "opportunity_collections",
    "opportunity_loop",
    "order_collections",
    "order_to_cash",
    "period_bounds",
    "reconcile",
    "reconcile_period",
]
