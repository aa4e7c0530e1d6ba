"""The core loader at size: customers, contacts and opportunities loaded with the crosswalk and the journal.

Loads N mapped customers (exact-key matching on credit code and normalized name, a few percent duplicates
and branches with parents), 1.5 N contacts and N opportunities (references resolved through the crosswalk)
into a fresh SQLite and PostgreSQL core, then loads them again unchanged, then rolls the first load back.
Beside it, the naive path: pandas ``to_sql`` of the same frames (no crosswalk, journal, matching or checks).

Prints one JSON line. Run: ``make bench-load`` or ``python bench/bench_load.py --rows 200000``.
Target (issue 'A real go-live at real size'): loading >= 30,000 rows/s with the journal on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.orm import Session

from crm_core.db import make_engine, upgrade
from crm_core.loading import (
    EXTERNAL_KEY,
    LOCATION,
    ROW_REF,
    Batch,
    EntityLoader,
    Lookup,
    MatchRules,
    get_or_start_run,
)
from crm_core.runs import rollback_run
from integration.mappings.engine import empty_rejects

PG_URL = os.environ.get("CRM_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/bench_load")
CUSTOMER_RULES = MatchRules(keys=[("credit_code",), ("name_normalized",)], conflict_fields=("credit_code",))
CITIES = np.array(["深圳", "北京", "上海", "广州", "杭州", "成都", "武汉", "南京"])
WORDS = np.array(["腾达", "华鑫", "恒通", "金盛", "远航", "瑞丰", "东方", "新宇", "长城", "嘉禾"])


def frames(rows: int, seed: int = 11) -> dict[str, pd.DataFrame]:
    """Mapped records of three entities, as staging hands them to the loader."""
    rng = np.random.default_rng(seed)
    company = rng.integers(0, int(rows * 0.97), rows)  # ~3% of rows repeat a company: exact-key merges
    names = [f"{CITIES[c % 8]}{WORDS[c % 10]}{c}科技有限公司" for c in company]
    codes = [f"9144{c:014d}" if c % 3 == 0 else None for c in company]
    parents = [f"C{i - 1}" if i % 50 == 1 else None for i in range(rows)]
    customers = pd.DataFrame({
        "name": names, "name_normalized": [n.replace("有限公司", "") for n in names], "credit_code": codes,
        "phone": [f"+86755{int(x):08d}" for x in rng.integers(0, 10**8, rows)],
        "city": CITIES[company % 8], "parent": parents,
        EXTERNAL_KEY: [f"C{i}" for i in range(rows)], ROW_REF: [str(i + 2) for i in range(rows)], LOCATION: "Customer",
    })  # fmt: skip
    contacts_n = rows * 3 // 2
    contacts = pd.DataFrame({
        "name": [f"联系人{i}" for i in range(contacts_n)],
        "customer": [f"C{int(x)}" for x in rng.integers(0, rows, contacts_n)],
        "mobile": [f"+86138{int(x):08d}" for x in rng.integers(0, 10**8, contacts_n)],
        "email": [f"p{i}@example.cn" for i in range(contacts_n)],
        EXTERNAL_KEY: [f"P{i}" for i in range(contacts_n)], ROW_REF: [str(i + 2) for i in range(contacts_n)], LOCATION: "Person",
    })  # fmt: skip
    opportunities = pd.DataFrame({
        "name": [f"商机{i}" for i in range(rows)],
        "customer": [f"C{int(x)}" for x in rng.integers(0, rows, rows)],
        "stage": np.array(["initial_contact", "needs_analysis", "proposal", "negotiation", "won"])[rng.integers(0, 5, rows)],
        "amount": [Decimal(int(c)).scaleb(-2) for c in rng.integers(100, 10**9, rows)],
        EXTERNAL_KEY: [f"O{i}" for i in range(rows)], ROW_REF: [str(i + 2) for i in range(rows)], LOCATION: "opportunities",
    })  # fmt: skip
    return {"customer": customers, "contact": contacts, "opportunity": opportunities}


def batch(entity: str, records: pd.DataFrame) -> Batch:
    """Wrap a frame as the loader's batch (every reference by source key)."""
    fields = [c for c in records.columns if not c.startswith("_")]
    lookups = {name: Lookup() for name in ("parent", "customer") if name in fields}
    return Batch("erp", f"erp_{entity}", records, empty_rejects(), len(records), fields, lookups)


def load_all(engine: sa.Engine, run_key: str, data: dict[str, pd.DataFrame]) -> dict[str, object]:
    """Load the three entities as a run does (one transaction each); return seconds and outcomes."""
    out: dict[str, object] = {}
    total_rows, total_seconds = 0, 0.0
    for entity, records in data.items():
        started, cpu_started = time.perf_counter(), time.process_time()
        with Session(engine) as session, session.begin():
            run = get_or_start_run(session, run_key, "bench")
            rules = CUSTOMER_RULES if entity == "customer" else None
            [stats] = EntityLoader(session, run, entity, match=rules).load([batch(entity, records)])
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        total_rows += len(records)
        total_seconds += seconds
        out[entity] = {
            "rows": len(records), "seconds": round(seconds, 2), "rows_per_s": round(len(records) / seconds),
            # this process's CPU time (all of SQLite's work; not the PostgreSQL server's): steadier than the
            # wall time on a shared machine
            "cpu_seconds": round(cpu_seconds, 2),
            "inserted": stats.inserted, "merged": stats.merged, "unchanged": stats.unchanged, "rejected": stats.rejected,
        }  # fmt: skip
    with engine.begin() as connection:
        connection.execute(
            sa.text("UPDATE load_runs SET status = 'succeeded' WHERE run_key = :k"), {"k": run_key}
        )
    out["rows_per_s"] = round(total_rows / total_seconds)
    out["seconds"] = round(total_seconds, 2)
    return out


def naive(engine: sa.Engine, data: dict[str, pd.DataFrame]) -> dict[str, object]:
    """pandas to_sql of the same frames into plain tables: the floor a set-based loader is compared with."""
    rows, started = 0, time.perf_counter()
    for entity, records in data.items():
        frame = records.copy()
        for column in frame.columns:
            if frame[column].dtype == object:
                frame[column] = frame[column].map(lambda v: None if v is None else str(v))
        frame.to_sql(f"naive_{entity}", engine, if_exists="replace", index=False, chunksize=2_000,
                     method="multi" if engine.dialect.name == "postgresql" else None)  # fmt: skip
        rows += len(records)
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 2), "rows_per_s": round(rows / seconds)}


def fresh(url: str) -> sa.Engine:
    """Return an engine on an empty, migrated core (PostgreSQL: the database is dropped and recreated)."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "postgresql":
        admin = sa.create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)'))
            connection.execute(sa.text(f'CREATE DATABASE "{parsed.database}"'))
        admin.dispose()
    engine = make_engine(url)
    upgrade(engine)
    return engine


def bench(url: str, data: dict[str, pd.DataFrame]) -> dict[str, object]:
    """First load, unchanged re-load, rollback of the first run, and the naive path, on one database."""
    engine = fresh(url)
    try:
        first = load_all(engine, "first", data)
        again = load_all(engine, "again", data)
        rollback_run(engine, "again")
        started = time.perf_counter()
        rollback_run(engine, "first")
        rolled = time.perf_counter() - started
        with engine.connect() as connection:
            journal = connection.scalar(sa.text("SELECT count(*) FROM row_changes"))
        return {"first_load": first, "unchanged_reload": again, "rollback_seconds": round(rolled, 2),
                "journal_rows_after_rollback": journal, "naive_to_sql": naive(engine, data)}  # fmt: skip
    finally:
        engine.dispose()


def main() -> None:
    """Run the benchmark and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", type=int, default=200_000, help="customers (contacts 1.5x, opportunities 1x)"
    )
    parser.add_argument("--cores", default="sqlite,postgresql")
    args = parser.parse_args()
    data = frames(args.rows)
    result: dict[str, object] = {
        "benchmark": "load",
        "customers": args.rows,
        "source_rows": sum(len(f) for f in data.values()),
    }
    with tempfile.TemporaryDirectory() as folder:
        for core in args.cores.split(","):
            url = f"sqlite:///{Path(folder) / 'core.sqlite'}" if core == "sqlite" else PG_URL
            try:
                result[core] = bench(url, data)
            except sa.exc.OperationalError as exc:
                result[core] = {"skipped": str(exc.orig).splitlines()[0] if exc.orig else str(exc)}
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    json.dump(result, sys.stdout, ensure_ascii=False)
    print()


if __name__ == "__main__":
    main()
