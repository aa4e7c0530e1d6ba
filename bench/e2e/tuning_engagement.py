"""The tuning set (``bench/chinese_b2b.py``) written as a three-source engagement for ``crmi run``.

``bench/chinese_b2b.py`` is the generator the linkage rules were tuned on; it yields customer records
and their companies. This spreads them over three sources the way ``tuning_project/`` reads them: an
ERP database (``erp.sqlite``: customers), a CRM database (``crm.sqlite``: accounts, opportunities
referencing their account) and a sales workbook (``sales.xlsx``: 客户 sheet, and a 商机 sheet naming
each deal's customer by one of the names its records carry). The records of one company go to
different sources where there are enough sources (a fourth copy lands beside another in one source).
Writes ``truth.csv`` (source, key, company_id, classes) and ``opportunities_truth.csv`` (source, key,
company_id, resolvable, classes) in the held-out generator's format, so ``bench/e2e/quality.py`` scores
both sets the same way. The set's own hard negatives carry no class tags (chinese_b2b does not say
which records they are).

Run: ``python bench/e2e/tuning_engagement.py --customers 50000 --out var/tuning``.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sqlite3
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from openpyxl import Workbook

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/chinese_b2b.py
from chinese_b2b import generate as generate_records

RECORDS_PER_COMPANY = 1.97  # what chinese_b2b yields (measured)
SOURCES = ["erp", "crm", "sheet"]
STAGES = ["初步接洽", "需求分析", "方案报价", "商务谈判", "赢单", "输单"]


def generate(customers: int, out: Path, seed: int = 17) -> dict[str, Any]:
    """Write about ``customers`` customer records over the three sources into ``out``; return the manifest."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    records, companies = generate_records(max(2, round(customers / RECORDS_PER_COMPANY)), seed=seed)
    rng = random.Random(f"{seed}:sources")
    offset: dict[int, int] = {}
    seen: dict[int, int] = {}
    rows: dict[str, list[tuple[Any, ...]]] = {source: [] for source in SOURCES}
    truth: list[tuple[str, str, int, str]] = []
    names: dict[int, list[str]] = {}
    crm_accounts: dict[int, str] = {}
    for record, company in zip(records, companies, strict=True):
        copy = seen.get(company, 0)
        seen[company] = copy + 1
        source = SOURCES[(offset.setdefault(company, rng.randrange(3)) + copy) % 3]
        key = {"erp": f"C{len(rows['erp']) + 1:07d}", "crm": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
               "sheet": f"K{len(rows['sheet']) + 1:06d}"}[source]  # fmt: skip
        rows[source].append(
            (key, record["name"], record["credit_code"], record["phone"], record["email"], record["city"])
        )
        truth.append((source, key, company, ""))
        names.setdefault(company, []).append(record["name"])
        if source == "crm":
            crm_accounts.setdefault(company, key)
    for name in ("erp.sqlite", "crm.sqlite"):
        (out / name).unlink(missing_ok=True)
    with sqlite3.connect(out / "erp.sqlite") as db:
        db.execute("CREATE TABLE customers (code TEXT PRIMARY KEY, name TEXT, credit_code TEXT, phone TEXT,"
                   " email TEXT, city TEXT)")  # fmt: skip
        db.executemany("INSERT INTO customers VALUES (?, ?, ?, ?, ?, ?)", rows["erp"])
    opportunity_truth: list[tuple[str, str, int, int, str]] = []
    opportunities: list[tuple[Any, ...]] = []
    for company, account in crm_accounts.items():
        for _ in range(rng.choice([0, 1, 1, 2])):
            opportunity_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            opportunities.append((opportunity_id, account, f"项目{len(opportunities) + 1}", rng.choice(STAGES),
                                  float(rng.choice([50000, 120000, 300000])), "CNY"))  # fmt: skip
            opportunity_truth.append(("crm", opportunity_id, company, 1, ""))
    with sqlite3.connect(out / "crm.sqlite") as db:
        db.execute("CREATE TABLE accounts (id TEXT PRIMARY KEY, name TEXT, credit_code TEXT, phone TEXT,"
                   " email TEXT, city TEXT)")  # fmt: skip
        db.executemany("INSERT INTO accounts VALUES (?, ?, ?, ?, ?, ?)", rows["crm"])
        db.execute("CREATE TABLE opportunities (id TEXT PRIMARY KEY, account_id TEXT, name TEXT, stage TEXT,"
                   " amount REAL, currency TEXT)")  # fmt: skip
        db.executemany("INSERT INTO opportunities VALUES (?, ?, ?, ?, ?, ?)", opportunities)
    workbook = Workbook(write_only=True)
    sheet = workbook.create_sheet("客户")
    sheet.append(["编号", "客户名称", "统一社会信用代码", "电话", "邮箱", "城市"])
    for row in rows["sheet"]:
        sheet.append(list(row))
    deals = workbook.create_sheet("商机")
    deals.append(["商机编号", "客户名称", "商机名称", "阶段", "预计金额", "币种"])
    for number, company in enumerate(rng.sample(sorted(names), len(names) // 4), start=1):
        key = f"SJ-{number:06d}"
        deals.append([key, rng.choice(names[company]), f"商机{number}", rng.choice(STAGES),
                      float(rng.choice([30000, 80000, 200000])), "人民币"])  # fmt: skip
        opportunity_truth.append(("sheet", key, company, 1, ""))
    workbook.save(out / "sales.xlsx")
    with (out / "truth.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["source", "key", "company_id", "classes"])
        writer.writerows(truth)
    with (out / "opportunities_truth.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["source", "key", "company_id", "resolvable", "classes"])
        writer.writerows(opportunity_truth)
    manifest = {
        "customers": len(records), "companies": len(set(companies)),
        "by_source": {source: len(found) for source, found in rows.items()},
        "opportunities": len(opportunity_truth), "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=1), encoding="utf-8")
    return manifest


def main() -> None:
    """Command-line entry point: generate, print the manifest as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--customers", type=int, default=50_000, help="customer records over the three sources"
    )
    parser.add_argument("--out", type=Path, default=Path("var/tuning/data"))
    parser.add_argument("--seed", type=int, default=17)
    args = parser.parse_args()
    print(json.dumps(generate(args.customers, args.out, args.seed), ensure_ascii=False))


if __name__ == "__main__":
    main()
