"""The sync loop on the demo, against the local U8 OpenAPI test server (``make sync-demo``).

Run after ``make demo`` (it needs the migrated core and data/erp_u8.sqlite). It starts the U8 test server on
the demo's U8 database, then: a salesperson creates a customer in the CRM → it appears in U8 → U8's code
comes back into the crosswalk → a deal is won → a U8 sales order → a U8 user approves and ships it → the
order's status reaches the CRM. Every step is a real ``crmi sync run`` over HTTP and SQL.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from decimal import Decimal
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repository: tests.servers lives there

import sqlalchemy as sa  # noqa: E402

from crm_core.db import session_factory  # noqa: E402
from crm_core.edits import create_record  # noqa: E402
from crm_core.models import Customer, Opportunity, SalesOrder  # noqa: E402
from integration.pipeline import Migration, core_engine  # noqa: E402
from integration.sync.engine import run_sync  # noqa: E402
from tests.servers.u8_openapi import APP_KEY, APP_SECRET, FROM_ACCOUNT, TO_ACCOUNT, serve  # noqa: E402


def step(text: str) -> None:
    """Print one step of the loop."""
    print(f"\n== {text}", flush=True)


def main() -> int:
    """Run the loop; return the exit code."""
    u8_url = f"sqlite:///{HERE / 'data' / 'erp_u8.sqlite'}"
    engine = core_engine(os.environ.get("CRM_CORE_URL"))
    with serve(u8_url) as (base_url, api):
        os.environ.update(U8_API_URL=base_url, U8_FROM_ACCOUNT=FROM_ACCOUNT, U8_TO_ACCOUNT=TO_ACCOUNT,
                          U8_APP_KEY=APP_KEY, U8_APP_SECRET=APP_SECRET)  # fmt: skip
        migration = Migration.load(str(HERE))
        step(f"U8 OpenAPI test server on {base_url}; first sync (baseline: what go-live loaded)")
        report = run_sync(migration, engine, "u8")
        print(report.as_dict())

        step("A salesperson creates a customer in the CRM")
        customer_id = create_record(engine, "customer", {"name": "杭州新禾贸易有限公司", "phone": "+8657188886666",
                                                          "address": "浙江省杭州市西湖区文三路100号"})  # fmt: skip
        report = run_sync(migration, engine, "u8")
        with session_factory(engine)() as session:
            code = session.get(Customer, customer_id).erp_code  # type: ignore[union-attr]
        print(
            f"sent {report.delivery.sent}, applied {report.delivery.applied}; U8 code {code} is back in the CRM"
        )

        step("The deal is won (赢单): a U8 sales order")
        deal = create_record(engine, "opportunity", {"customer": customer_id, "name": "年度框架采购", "stage": "won",
                                                     "amount": Decimal("113000.00"), "closed_on": dt.date.today()})  # fmt: skip
        run_sync(migration, engine, "u8")
        with session_factory(engine)() as session:
            order_no = session.get(Opportunity, deal).erp_order_no  # type: ignore[union-attr]
        print(f"U8 sales order {order_no} for opportunity {deal}")
        if order_no is None:
            return 1

        step("A U8 user approves and ships the order; the next sync brings its state to the CRM")
        api.erp.approve_order(order_no, "王会计")
        api.erp.ship(order_no)
        report = run_sync(migration, engine, "u8")
        with session_factory(engine)() as session:
            order = session.scalar(sa.select(SalesOrder).where(SalesOrder.order_no == order_no))
            assert order is not None
            print(f"CRM order {order.order_no}: status {order.status}, shipment {order.shipment_status}, "
                  f"invoice {order.invoice_status}, opportunity {order.opportunity_id}")  # fmt: skip
            ok = (
                order.status == "approved"
                and order.shipment_status == "shipped"
                and order.opportunity_id == deal
            )
        step("Once more: nothing changed on either side, nothing moves (echoes suppressed)")
        report = run_sync(migration, engine, "u8")
        print(f"sent {report.delivery.sent}, echoes suppressed {report.capture.echoes_suppressed}")
    engine.dispose()
    print("\nThe loop is closed." if ok else "\nThe loop did NOT close.")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
