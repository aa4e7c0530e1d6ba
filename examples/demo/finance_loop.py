"""The 业财 loop on the demo, against the local K3Cloud test server (``make finance-demo``).

Run after ``make demo`` (it needs the migrated core). It starts the K3Cloud WebAPI test server on
data/k3cloud.sqlite and syncs the demo's finance target (examples/demo/finance/project.yaml): a salesperson
wins a deal → its sales order (as U8 brings it in; ``make sync-demo`` shows that leg) → the customer goes to
K3Cloud and its K3Cloud number comes back into the crosswalk → finance posts a receivable (应收单) for the order
→ a first receipt (收款单) collects part of it → the rest is collected. After each sync the opportunity's loop is
printed as `crmi finance status --opportunity N` shows it, then the order-to-cash totals and the month's
reconciliation. Every step is a real sync over HTTP. It ends with the `crmi finance` commands for the deal and
the month it made (a new opportunity id each run, the month of today): docs/k3cloud.md sends readers to them.

To run the server on its own instead (e.g. for `crmi sync run --target finance -p examples/demo/finance`):
``python -m tests.servers.k3cloud --db sqlite:///examples/demo/data/k3cloud.sqlite --port 8767``.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import time
from decimal import Decimal
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repository: tests.servers lives there

from rich.console import Console  # noqa: E402
from sqlalchemy import Engine  # noqa: E402

from crm_core.db import session_factory  # noqa: E402
from crm_core.edits import create_record  # noqa: E402
from crm_core.finance import opportunity_loop, order_to_cash, period_bounds, reconcile_period  # noqa: E402
from crm_core.models import ExternalId  # noqa: E402
from integration.finance_cli import loop_tree  # noqa: E402
from integration.pipeline import Migration, core_engine  # noqa: E402
from integration.sync.engine import run_sync  # noqa: E402
from tests.servers.k3cloud import ACCT_ID, PASSWORD, USERNAME, serve  # noqa: E402

PROJECT = HERE / "finance"
console = Console()


def step(text: str) -> None:
    """Print one step of the loop."""
    console.print(f"\n== {text}", highlight=False)


def main(data: Path = HERE / "data") -> int:
    """Run the loop with the K3Cloud server's database in ``data``; return the exit code."""
    data.mkdir(exist_ok=True)
    engine = core_engine(os.environ.get("CRM_CORE_URL"))
    try:
        return run_loop(engine, f"sqlite:///{data / 'k3cloud.sqlite'}")
    finally:
        engine.dispose()


def run_loop(engine: Engine, k3_url: str) -> int:
    """Run the loop on the core and a K3Cloud server over ``k3_url``; return the exit code."""
    today = dt.date.today()
    suffix = time.strftime("%H%M%S")  # the demo can run again: a new customer and order each time
    with serve(k3_url) as (base_url, api):
        os.environ.update(K3_URL=base_url, K3_ACCT_ID=ACCT_ID, K3_USERNAME=USERNAME, K3_PASSWORD=PASSWORD)
        migration = Migration.load(str(PROJECT))
        step(f"K3Cloud test server on {base_url}; first sync of the finance target (baseline)")
        print(run_sync(migration, engine, "finance").as_dict())

        step("A salesperson wins a deal; its sales order comes from U8 (make sync-demo shows that leg)")
        customer = create_record(engine, "customer", {"name": f"杭州新禾贸易有限公司{suffix}",
                                                       "phone": "+8657188886666"})  # fmt: skip
        deal = create_record(engine, "opportunity", {"customer": customer, "name": "年度框架采购", "stage": "won",
                                                     "amount": Decimal("113000.00"), "closed_on": today})  # fmt: skip
        order_no = f"SO-DEMO-{suffix}"
        create_record(engine, "sales_order", {"order_no": order_no, "customer": customer, "opportunity": deal,
                                              "order_date": today, "total_amount": Decimal("113000.00")})  # fmt: skip

        step("The customer goes to K3Cloud (BD_Customer); its K3Cloud number comes back into the crosswalk")
        report = run_sync(migration, engine, "finance", "outbound")
        with session_factory(engine)() as session:
            number = session.query(ExternalId.external_key).filter_by(entity="customer", system="k3",
                                                                       entity_id=customer).scalar()  # fmt: skip
        print(f"sent {report.delivery.sent}, applied {report.delivery.applied}; K3Cloud number {number}")
        if number is None:
            return 1

        step("Finance posts a receivable (应收单) for the order; a first receipt (收款单) collects 60,000")
        api.erp.add_receivable(f"AR-{suffix}", number, [(order_no, "80000.00"), (order_no, "33000.00")],
                               date=today, due=today + dt.timedelta(days=30))  # fmt: skip
        api.erp.add_receipt(f"SK-{suffix}-1", number, [(f"AR-{suffix}", "60000.00")], date=today)
        report = run_sync(migration, engine, "finance", "inbound")
        print(f"received {report.as_dict()['received']}, applied {report.as_dict()['applied']}, "
              f"rejected {report.rejected}")  # fmt: skip
        with session_factory(engine)() as session:
            console.print(loop_tree(opportunity_loop(session, deal) or {}))

        step("The rest is collected (回款): the loop closes")
        api.erp.add_receipt(f"SK-{suffix}-2", number, [(f"AR-{suffix}", "53000.00")], date=today)
        run_sync(migration, engine, "finance", "inbound")
        with session_factory(engine)() as session:
            found = opportunity_loop(session, deal) or {}
            console.print(loop_tree(found))
            cash = order_to_cash(session)
            start, end = period_bounds(f"{today:%Y-%m}")
            month = reconcile_period(session, start, end, finance_system="k3")
        print(f"order to cash, whole core: {cash.totals.as_dict()}")
        print(f"{today:%Y-%m}: {len(month['differences'])} of {len(month['customers'])} customers differ")
        figures = found.get("figures", {})
        ok = figures.get("collected") == "113000.00" and figures.get("outstanding") == "0.00"
    step("loop closed: won deal → order → receivable → collected" if ok else "the loop did not close")
    follow_up(deal, f"{today:%Y-%m}")
    return 0 if ok else 1


def follow_up(deal: int, period: str) -> None:
    """Print the `crmi finance` commands that show this run's deal and month (both change with every run)."""
    try:
        project = os.path.relpath(PROJECT)
    except ValueError:  # another drive (Windows)
        project = str(PROJECT)
    step(f"See it again with crmi (opportunity {deal} is this run's deal, {period} the month of its order):")
    for command in (f"crmi finance status --opportunity {deal} -p {project}",
                    f"crmi finance reconcile --period {period} -p {project}",
                    f"crmi finance status -p {project}"):  # fmt: skip
        print(f"  {command}")  # print, not rich: a long line stays one line to copy


if __name__ == "__main__":
    raise SystemExit(main())
