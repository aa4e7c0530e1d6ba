"""The finance part of the sync benchmark: K3Cloud inbound at size, and order_to_cash over a million documents.

1. **Inbound from K3Cloud**: ``--docs`` documents (default 200,000: half receivables 应收单, half receipts 收款单,
   each receipt written off against one receivable) in the local K3Cloud test server (SQLite, real HTTP, its own
   process as K3Cloud is another system). One
   ``run_sync`` of the demo's finance target, inbound: every ``ExecuteBillQuery`` page (``--page-size`` rows), the
   mappings, the validation rules and the load into a SQLite core with the crosswalk and the run journal. The
   figure is documents (receivables + receipts) per second of that sync; the write-offs are loaded too.
2. **order_to_cash**: a SQLite core with ``--orders`` sales orders (default 1,000,000), as many receivables (one per
   order), receipts and write-offs, 200 orders per won opportunity and 100 per customer; the seconds of
   ``crm_core.finance.order_to_cash`` (what the Dagster asset computes: per opportunity and per customer) and of
   ``loop_orphans`` (its check).

Prints one JSON line. Run: ``make bench-finance`` or ``python bench/bench_finance.py --docs 20000 --orders 100000``.
Targets (issue 18): inbound >= 5,000 documents/s with paging; order_to_cash over 1,000,000 <= 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from crm_core.db import session_factory  # noqa: E402
from crm_core.edits import create_records  # noqa: E402
from crm_core.finance import loop_orphans, order_to_cash  # noqa: E402
from crm_core.models import (  # noqa: E402
    Customer,
    ExternalId,
    Opportunity,
    Payment,
    PaymentApplication,
    Receivable,
    SalesOrder,
)
from integration.pipeline import Migration, core_engine  # noqa: E402
from integration.sync.engine import run_sync  # noqa: E402
from tests.servers.k3cloud import (  # noqa: E402
    ACCT_ID,
    PASSWORD,
    RECEIPT,
    RECEIPT_ENTRY,
    RECEIPT_SOURCE,
    RECEIVABLE,
    RECEIVABLE_ENTRY,
    USERNAME,
    ErpUser,
    next_values,
)

CHUNK = 20_000
CUSTOMERS = 100


def _chunks(rows: list[dict[str, Any]]) -> Any:
    for start in range(0, len(rows), CHUNK):
        yield rows[start : start + CHUNK]


def seed_k3(k3: sa.Engine, numbers: list[str], docs: int) -> None:
    """Half the documents receivables, half receipts written off against them, all audited, stamped in order."""
    half = docs // 2
    stamp = dt.datetime(2026, 10, 1)
    day = dt.datetime(2026, 10, 8)
    with k3.begin() as conn:
        fid = next_values(conn, "fid", 2 * half)
        entry = next_values(conn, "entryid", 3 * half)
        custid = dict(conn.execute(sa.text('SELECT "FNumber", "FCUSTID" FROM "T_BD_CUSTOMER"')).all())
        amounts = [Decimal(f"{1000 + n % 9000}.{n % 100:02d}") for n in range(half)]
        receivables = [
            {"FID": fid + n, "FBillNo": f"AR{n:07d}", "FBillTypeID": "YSD01_SYS", "FDATE": day,
             "FENDDATE_H": day + dt.timedelta(days=30), "FCUSTOMERID": custid[numbers[n % len(numbers)]],
             "FCURRENCYID": 1, "FEXCHANGERATE": Decimal(1), "FALLAMOUNTFOR": amounts[n], "FDOCUMENTSTATUS": "C",
             "FCreateDate": stamp, "FModifyDate": stamp + dt.timedelta(milliseconds=n)}
            for n in range(half)
        ]  # fmt: skip
        for rows in _chunks(receivables):
            conn.execute(sa.insert(RECEIVABLE), rows)
        for rows in _chunks([
            {"FEntryID": entry + n, "FID": fid + n, "FSeq": 1, "FMATERIALNAME": "CRM-DEAL", "FPriceQty": 1,
             "FTaxPrice": amounts[n], "FALLAMOUNTFOR_D": amounts[n], "FORDERNUMBER": None}
            for n in range(half)
        ]):  # fmt: skip
            conn.execute(sa.insert(RECEIVABLE_ENTRY), rows)
        later = stamp + dt.timedelta(days=1)
        for rows in _chunks([
            {"FID": fid + half + n, "FBillNo": f"SK{n:07d}", "FBillTypeID": "SKDLX01_SYS", "FDATE": day,
             "FCONTACTUNITTYPE": "BD_Customer", "FCONTACTUNIT": custid[numbers[n % len(numbers)]], "FCURRENCYID": 1,
             "FEXCHANGERATE": Decimal(1), "FREALRECAMOUNTFOR": amounts[n], "FDOCUMENTSTATUS": "C",
             "FCreateDate": later, "FModifyDate": later + dt.timedelta(milliseconds=n)}
            for n in range(half)
        ]):  # fmt: skip
            conn.execute(sa.insert(RECEIPT), rows)
        for rows in _chunks([
            {"FEntryID": entry + half + n, "FID": fid + half + n, "FSeq": 1, "FSETTLETYPEID": "JSFS04_SYS",
             "FRECTOTALAMOUNTFOR": amounts[n]}
            for n in range(half)
        ]):  # fmt: skip
            conn.execute(sa.insert(RECEIPT_ENTRY), rows)
        for rows in _chunks([
            {"FEntryID": entry + 2 * half + n, "FID": fid + half + n, "FSeq": 1, "FSRCBILLTYPEID": "AR_receivable",
             "FSRCBILLNO": f"AR{n:07d}", "FREALRECAMOUNT": amounts[n]}
            for n in range(half)
        ]):  # fmt: skip
            conn.execute(sa.insert(RECEIPT_SOURCE), rows)


def finance_project(root: Path, page_size: int) -> Path:
    """The demo's finance target (examples/demo/finance) with the K3Cloud mappings beside it."""
    root.mkdir(parents=True)
    shutil.copytree(REPO / "examples" / "k3cloud" / "mappings", root / "mappings")
    text = (REPO / "examples" / "demo" / "finance" / "project.yaml").read_text(encoding="utf-8")
    text = text.replace("../../k3cloud/mappings/*.yaml", "mappings/*.yaml")
    text = re.sub(r"page_size: \d+", f"page_size: {page_size}", text)
    (root / "project.yaml").write_text(text, encoding="utf-8")
    return root


@contextmanager
def k3cloud_process(db_url: str) -> Iterator[str]:
    """Run the K3Cloud test server in its own process (as K3Cloud is another system); yield its site URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.servers.k3cloud", "--db", db_url], cwd=REPO, stdout=subprocess.PIPE,
        text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        assert process.stdout is not None
        yield process.stdout.readline().strip()
    finally:
        process.terminate()
        process.wait(timeout=30)


def bench_inbound(work: Path, docs: int, page_size: int) -> dict[str, Any]:
    """Seconds and documents/s of one inbound sync of ``docs`` receivables and receipts."""
    core = core_engine(f"sqlite:///{work / 'core-inbound.sqlite'}")
    k3_url = f"sqlite:///{work / 'k3.sqlite'}"
    with k3cloud_process(k3_url) as url:
        erp = ErpUser(k3_url)
        numbers = [f"CUST{n:04d}" for n in range(1, CUSTOMERS + 1)]
        for number in numbers:
            erp.insert_customer(number, f"基准客户{number}有限公司")
        ids = create_records(core, "customer", [{"name": f"基准客户{n}有限公司"} for n in numbers])
        with session_factory(core)() as session, session.begin():
            session.add_all(ExternalId(entity="customer", entity_id=i, system="k3", external_key=n)
                            for n, i in zip(numbers, ids, strict=True))  # fmt: skip
        started = time.perf_counter()
        seed_k3(erp.engine, numbers, docs)
        seeded = time.perf_counter() - started
        erp.close()
        os.environ.update(K3_URL=url, K3_ACCT_ID=ACCT_ID, K3_USERNAME=USERNAME, K3_PASSWORD=PASSWORD)
        migration = Migration.load(str(finance_project(work / "project", page_size)))
        started = time.perf_counter()
        report = run_sync(migration, core, "finance", "inbound")
        seconds = time.perf_counter() - started
    with session_factory(core)() as session:
        loaded = {
            "receivables": session.scalar(sa.select(sa.func.count()).select_from(Receivable)),
            "receipts": session.scalar(sa.select(sa.func.count()).select_from(Payment)),
            "writeoffs": session.scalar(sa.select(sa.func.count()).select_from(PaymentApplication)),
        }
    core.dispose()
    documents = (loaded["receivables"] or 0) + (loaded["receipts"] or 0)
    return {
        "documents": docs, "loaded": loaded, "rejected": report.rejected, "page_size": page_size,
        "server": "own process", "seed_seconds": round(seeded, 1), "seconds": round(seconds, 1),
        "phases": report.as_dict().get("seconds"),
        "documents_per_second": round(documents / seconds), "target_documents_per_second": 5000,
    }  # fmt: skip


def seed_core(engine: sa.Engine, orders: int) -> None:
    """Customers, won opportunities, and ``orders`` orders, receivables, receipts and write-offs, straight in."""
    customers = max(orders // 100, 1)
    deals = max(orders // 200, 1)
    today = dt.date(2026, 11, 1)
    with engine.begin() as conn:
        for rows in _chunks([{"id": c + 1, "name": f"客户{c:07d}有限公司", "status": "active", "is_branch": False}
                             for c in range(customers)]):  # fmt: skip
            conn.execute(sa.insert(Customer), rows)
        for rows in _chunks([{"id": d + 1, "customer_id": d % customers + 1, "name": f"商机{d}", "stage_code": "won",
                              "amount": Decimal("1000.00"), "currency": "CNY"} for d in range(deals)]):  # fmt: skip
            conn.execute(sa.insert(Opportunity), rows)

        def amount(n: int) -> Decimal:
            return Decimal(f"{1000 + n % 9000}.{n % 100:02d}")

        for start in range(0, orders, CHUNK):
            block = range(start, min(start + CHUNK, orders))
            conn.execute(sa.insert(SalesOrder), [
                {"id": n + 1, "order_no": f"SO{n:08d}", "customer_id": n % customers + 1,
                 "opportunity_id": n % deals + 1, "order_date": today - dt.timedelta(days=n % 120),
                 "currency": "CNY", "total_amount": amount(n)} for n in block])  # fmt: skip
            conn.execute(sa.insert(Receivable), [
                {"id": n + 1, "receivable_no": f"AR{n:08d}", "customer_id": n % customers + 1, "order_id": n + 1,
                 "invoiced_on": today - dt.timedelta(days=n % 120), "due_date": today - dt.timedelta(days=n % 120 - 30),
                 "amount": amount(n), "currency": "USD" if n % 50 == 0 else "CNY",
                 "exchange_rate": Decimal("7.1") if n % 50 == 0 else None, "red_letter": False} for n in block])  # fmt: skip
            conn.execute(sa.insert(Payment), [
                {"id": n + 1, "payment_no": f"SK{n:08d}", "customer_id": n % customers + 1,
                 "received_on": today - dt.timedelta(days=n % 90), "amount": amount(n) / 2, "currency": "CNY",
                 "red_letter": False} for n in block])  # fmt: skip
            conn.execute(
                sa.insert(PaymentApplication),
                [
                    {
                        "id": n + 1,
                        "payment_id": n + 1,
                        "receivable_id": n + 1,
                        "amount": amount(n) / 2,
                        "red_letter": False,
                    }
                    for n in block
                    if n % 10
                ],
            )  # fmt: skip  (every tenth receipt unapplied)


def bench_order_to_cash(work: Path, orders: int) -> dict[str, Any]:
    """Seconds of order_to_cash and of its link check over ``orders`` orders and as many documents each."""
    engine = core_engine(f"sqlite:///{work / 'core-o2c.sqlite'}")
    started = time.perf_counter()
    seed_core(engine, orders)
    seeded = time.perf_counter() - started
    with session_factory(engine)() as session:
        started = time.perf_counter()
        cash = order_to_cash(session, today=dt.date(2026, 11, 1))
        seconds = time.perf_counter() - started
        started = time.perf_counter()
        counts, _ = loop_orphans(session)
        check_seconds = time.perf_counter() - started
    engine.dispose()
    return {
        "orders": orders, "receivables": orders, "receipts": orders, "writeoffs": orders - orders // 10,
        "opportunities": len(cash.opportunities), "customers": len(cash.customers),
        "seed_seconds": round(seeded, 1), "seconds": round(seconds, 1), "check_seconds": round(check_seconds, 1),
        "orphans": counts, "target_seconds": 60, "invoiced": str(cash.totals.invoiced),
    }  # fmt: skip


def main() -> None:
    """Run both parts and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=200_000, help="receivables + receipts in K3Cloud")
    parser.add_argument(
        "--page-size", type=int, default=10_000, help="rows per ExecuteBillQuery (at most 10,000)"
    )
    parser.add_argument(
        "--orders", type=int, default=1_000_000, help="orders (and receivables, receipts) in the core"
    )
    parser.add_argument("--skip-inbound", action="store_true")
    parser.add_argument("--skip-order-to-cash", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-finance-"))
    result: dict[str, Any] = {"bench": "finance", "cores": os.cpu_count()}
    try:
        if not args.skip_inbound:
            result["inbound"] = bench_inbound(work, args.docs, args.page_size)
        if not args.skip_order_to_cash:
            result["order_to_cash"] = bench_order_to_cash(work, args.orders)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
