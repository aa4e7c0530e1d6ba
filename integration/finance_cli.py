"""``crmi finance``: the 业财 loop from the core — reconcile a period across systems, show an opportunity's loop.

``crmi finance reconcile --period 2026-10`` compares per customer the CRM's orders of the month with the ERP's
(U8: the orders the U8 sync target has a key for), K3Cloud's receivables and receipts (those the K3Cloud target
has a key for), classifies the differences (timing, missing link, amount mismatch, currency), writes an Excel
workbook and an HTML page like the migration's reconciliation, and prints a summary.
``crmi finance status`` prints the order-to-cash totals and the customers most overdue, or with
``--opportunity N`` one won deal's loop: its orders, their receivables and the receipts applied to them.
"""

from __future__ import annotations

import json
import sys
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from crm_core.db import session_factory

if TYPE_CHECKING:
    import pandas as pd

    from integration.pipeline import Migration

finance_app = typer.Typer(
    help="The 业财 loop: order → receivable → receipt, reconciled across systems.", no_args_is_help=True
)

ProjectOption = Annotated[
    Path | None,
    typer.Option("--project", "-p", help="project folder (default: $CRM_PROJECT or examples/demo)"),
]
CoreOption = Annotated[
    str | None, typer.Option("--core-url", help="core database URL (default: $CRM_CORE_URL)")
]
WaitOption = Annotated[  # integration.cli's too
    float,
    typer.Option(
        "--wait", min=0, metavar="SECONDS",
        help="while another command (a crmi run, rollback…) holds the core, wait up to this long for it to end "
        "(default 0: refused at once)",
    ),
]  # fmt: skip
ERP_PROFILES = ("u8_openapi",)
FINANCE_PROFILES = ("k3cloud",)


def target_systems(migration: Migration) -> tuple[str | None, str | None]:
    """Return the crosswalk systems of the project's ERP (U8) and finance (K3Cloud) sync targets, if any."""
    erp = finance = None
    for target in migration.project.sync.values():
        profile = target.spec.transport.profile
        if profile in ERP_PROFILES and erp is None:
            erp = target.system
        elif profile in FINANCE_PROFILES and finance is None:
            finance = target.system
    return erp, finance


def _base_currency(migration: Migration) -> str:
    currencies = migration.project.spec.currencies
    return currencies.base if currencies is not None else "CNY"


def difference_frame(result: dict[str, Any]) -> pd.DataFrame:
    """Return one row per classified difference: customer, between which figures, class, amount, detail."""
    import pandas as pd  # imported here: every crmi command loads this module, few build frames

    rows = [
        {"customer_id": d["customer_id"], "customer": d["customer"], "between": r["between"], "class": r["class"],
         "amount": r["amount"], "detail": r["detail"]}
        for d in result["differences"] for r in d["reasons"]
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=["customer_id", "customer", "between", "class", "amount", "detail"])


@finance_app.command("reconcile")
def finance_reconcile(
    period: Annotated[str, typer.Option("--period", help="the month to reconcile, YYYY-MM")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="folder of the report (default: var/reports/finance)")] = None,
    erp_system: Annotated[str | None, typer.Option("--erp-system", help="crosswalk system of the ERP's orders (default: the U8 sync target's)")] = None,
    finance_system: Annotated[str | None, typer.Option("--finance-system", help="crosswalk system of K3Cloud's documents (default: the K3Cloud target's)")] = None,
    project: ProjectOption = None,
    core: CoreOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
    wait: WaitOption = 0,
) -> None:  # fmt: skip
    """Reconcile a month per customer: CRM orders vs U8 orders vs K3Cloud receivables vs receipts, with reasons.

    Refused (exit 1) while a ``crmi run``, rollback or another command holds the core (with ``--wait``: once it
    has waited that long for it to end): its figures would be of a core halfway through a load; those commands
    refuse while it reads.
    """
    import pandas as pd

    from crm_core.finance import period_bounds, reconcile_period
    from crm_core.runs import CoreBusy
    from integration.cli import (
        EXIT_FAILED,
        EXIT_INTERRUPTED,
        _core_engine,
        _migration_or_exit,
        _refused_after,
        _waiting_hold,
        console,
        errors,
        run_lock_holder,
    )
    from integration.reports import write_workbook
    from integration.sync.engine import StoppedWaiting

    try:
        start, end = period_bounds(period)
    except ValueError as exc:
        errors.print(f"[red]{escape(str(exc))}[/red]", highlight=False)
        raise typer.Exit(EXIT_FAILED) from None
    migration = _migration_or_exit(project)
    erp, finance = target_systems(migration)
    erp, finance = erp_system or erp, finance_system or finance
    base = _base_currency(migration)
    with _core_engine(core) as engine:
        try:
            hold = _waiting_hold(wait, "crmi finance reconcile", "reconciliation")
            with (
                hold(engine, run_lock_holder("crmi finance reconcile")),
                session_factory(engine)() as session,
            ):
                result = reconcile_period(
                    session, start, end, erp_system=erp, finance_system=finance, base_currency=base
                )
        except CoreBusy as exc:
            errors.print(
                f"[red]reconciliation refused:[/red] {escape(str(exc))}{_refused_after(wait)}",
                highlight=False,
            )
            raise typer.Exit(EXIT_FAILED) from None
        except StoppedWaiting as exc:
            errors.print(f"[yellow]{escape(str(exc))}[/yellow]", highlight=False)
            raise typer.Exit(EXIT_INTERRUPTED) from None
    differences = difference_frame(result)
    figures = pd.DataFrame(result["customers"], columns=["customer_id", "customer", "crm_ordered", "erp_ordered",
                                                         "invoiced", "received"])  # fmt: skip
    for column in ("crm_ordered", "erp_ordered", "invoiced", "received"):
        figures[column] = figures[column].map(lambda v: None if v is None else Decimal(v))
    differences["amount"] = differences["amount"].map(lambda v: None if v is None else Decimal(v))
    summary: list[tuple[str, Any]] = [
        ("period", f"{result['from']} – {result['to']}"),
        ("ERP orders: crosswalk system", erp or "none (every CRM order counts as the ERP's)"),
        ("K3Cloud documents: crosswalk system", finance or "none (every receivable and receipt counts)"),
        ("base currency", base),
        *((f"total {name}", Decimal(value)) for name, value in result["totals"].items()),
        ("orders without an amount (not in CRM orders)", result["orders_without_amount"]),
        ("orders whose total_amount differs from their lines", result["orders_differing_from_lines"]),
        ("customers with differences", len(result["differences"])),
    ]
    folder = out or Path("var") / "reports" / "finance"
    paths = write_workbook(folder, f"finance-reconcile-{result['period']}",
                           f"业财 reconciliation {result['period']}", summary,
                           {"Customers": figures, "Differences": differences})  # fmt: skip
    if as_json:
        sys.stdout.write(
            json.dumps({**result, "reports": {k: str(v) for k, v in paths.items()}}, ensure_ascii=False)
            + "\n"
        )
        return
    table = Table(title=f"业财 reconciliation {result['period']} (base {base})")
    for column, justify in (("customer", "left"), ("CRM orders", "right"), ("U8 orders", "right"),
                            ("K3 receivables", "right"), ("K3 receipts", "right"), ("differences", "left")):  # fmt: skip
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    reasons = {d["customer_id"]: d["reasons"] for d in result["differences"]}
    for row in result["customers"]:
        found = reasons.get(row["customer_id"], [])
        text = "; ".join(f"{r['class']}: {r['detail']}" + ("" if r["amount"] is None else f" ({r['amount']})")
                         for r in found) or "—"  # fmt: skip
        table.add_row(escape(str(row["customer"])), row["crm_ordered"], row["erp_ordered"], row["invoiced"],
                      row["received"], escape(text))  # fmt: skip
    totals = result["totals"]
    table.add_row("[bold]total[/bold]", totals["crm_ordered"], totals["erp_ordered"], totals["invoiced"],
                  totals["received"], "")  # fmt: skip
    console.print(table)
    counts = differences["class"].value_counts().to_dict() if len(differences) else {}
    console.print(
        f"{len(result['differences'])} of {len(result['customers'])} customers differ"
        + (" (" + ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) + ")" if counts else "")
    )
    if result["orders_without_amount"]:
        console.print(f"[yellow]{without_amount(result['orders_without_amount'], 'of ' + result['period'])}: CRM "
                      "orders leave them out[/yellow]", highlight=False)  # fmt: skip
    console.print(f"report: {paths['excel']} and {paths['html']}", highlight=False)


@finance_app.command("status")
def finance_status(
    opportunity: Annotated[
        int | None, typer.Option("--opportunity", help="one opportunity's loop (its id)")
    ] = None,
    project: ProjectOption = None,
    core: CoreOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Show order-to-cash totals and the customers most overdue, or one opportunity's loop down to its receipts."""
    from crm_core.finance import opportunity_loop, order_to_cash
    from integration.cli import EXIT_FAILED, _core_engine, _migration_or_exit, console, errors

    migration = _migration_or_exit(project)
    with _core_engine(core) as engine, session_factory(engine)() as session:
        if opportunity is not None:
            found = opportunity_loop(session, opportunity)
            if found is None:
                errors.print(f"[red]no opportunity {opportunity} in the core[/red]")
                raise typer.Exit(EXIT_FAILED)
            if as_json:
                sys.stdout.write(json.dumps(found, ensure_ascii=False) + "\n")
                return
            console.print(loop_tree(found))
            return
        cash = order_to_cash(session, base_currency=_base_currency(migration))
    data: dict[str, Any] = {"as_of": cash.as_of.isoformat(), "totals": cash.totals.as_dict(), "top_overdue": cash.top_overdue,
            "documents": cash.documents}  # fmt: skip
    if as_json:
        sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
        return
    table = Table(title=f"Order to cash, {data['as_of']} ({cash.base_currency})")
    for column in ("ordered", "invoiced", "collected", "outstanding", "overdue", "dso"):
        table.add_column(column, justify="right")
    totals = data["totals"]
    table.add_row(*(_amount(totals[c]) for c in ("ordered", "invoiced", "collected", "outstanding", "overdue")),
                  str(totals["dso"] or "—"))  # fmt: skip
    console.print(table)
    if cash.documents["orders_without_amount"]:
        console.print(f"[yellow]{without_amount(cash.documents['orders_without_amount'], 'sales', cash.documents['orders'])}: "
                      "'ordered' leaves them out[/yellow]", highlight=False)  # fmt: skip
    if cash.top_overdue:
        worst = Table(title="Most overdue customers")
        for column in ("customer", "overdue", "outstanding", "DSO"):
            worst.add_column(column)
        for t in cash.top_overdue:
            worst.add_row(escape(str(t["customer"])), _amount(t["overdue"]), _amount(t["outstanding"]),
                          str(t["dso"] or "—"))  # fmt: skip
        console.print(worst)


def without_amount(count: int, what: str, of: int | None = None) -> str:
    """Say how many orders have no amount: ``2 orders of 2026-10 have no amount (…)``, ``2 of 4 sales orders …``."""
    orders = (
        f"{count} of {of} {what} orders"
        if of is not None
        else f"{count} order{'' if count == 1 else 's'} {what}"
    )
    verb = "has" if count == 1 else "have"
    return (f"{orders} {verb} no amount (neither total_amount nor an amount on every line; map total_amount, "
            "e.g. the sum of the lines: docs/expressions.md, aggregate)")  # fmt: skip


def _amount(value: Any) -> str:
    """An amount as every table shows it (``200,000.00``), ``—`` when there is none."""
    from integration.reports import amount_text

    return amount_text(value if value not in (None, "") else None, "—")


def loop_tree(found: dict[str, Any]) -> Tree:
    """Return one opportunity's loop as a rich tree: deal → orders → receivables → receipts."""
    figures = found["figures"]
    unknown = figures.get("orders_without_amount", 0)
    tree = Tree(
        f"[bold]{escape(found['name'])}[/bold] (opportunity {found['opportunity_id']}, {found['stage']}, "
        f"{_amount(found['amount'])}): invoiced {_amount(figures['invoiced'])}, collected "
        f"{_amount(figures['collected'])}, outstanding {_amount(figures['outstanding'])}, overdue "
        f"{_amount(figures['overdue'])}"
        + (f"; {unknown} order{'' if unknown == 1 else 's'} without an amount" if unknown else "")
    )
    if not found["orders"]:
        tree.add("no sales order yet")
    for order in found["orders"]:
        branch = tree.add(
            f"order {escape(order['order_no'])} {_order_text(order)} ({order['order_date'] or 'no date'})"
        )
        if not order["receivables"]:
            branch.add("not invoiced yet")
        for receivable in order["receivables"]:
            red = " 红字" if receivable["red_letter"] else ""
            leaf = branch.add(
                f"receivable {escape(receivable['receivable_no'])}{red} {_amount(receivable['amount'])} {receivable['currency']}"
                f" (invoiced {receivable['invoiced_on'] or '?'}, due {receivable['due_date'] or '?'})"
            )
            if not receivable["receipts"]:
                leaf.add("not collected yet")
            for receipt in receivable["receipts"]:
                leaf.add(f"receipt {escape(receipt['payment_no'])} applied {_amount(receipt['applied'])} {receipt['currency']}"
                         f" (received {receipt['received_on'] or '?'})")  # fmt: skip
    return tree


def _order_text(order: dict[str, Any]) -> str:
    """An order's amount in the loop, saying where it comes from when not from its total."""
    source = order.get("amount_from", "total_amount")
    if source == "total_amount":
        lines = order.get("lines_amount")
        differs = lines is not None and Decimal(lines) != Decimal(order["total_amount"])
        return _amount(order["total_amount"]) + (
            f" (its lines add up to {_amount(lines)})" if differs else ""
        )
    if source == "lines":
        return f"{_amount(order['amount'])} (the sum of its lines; no total_amount)"
    return "amount unknown (neither total_amount nor an amount on every line)"


__all__ = ["difference_frame", "finance_app", "loop_tree", "target_systems", "without_amount"]
