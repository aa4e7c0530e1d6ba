"""Validation and reconciliation at scale: every opportunity rule on N rows, then the key-set, spot check
and amount sum of an N-row load read back from a SQLite core.

Prints one JSON line. Run: ``make bench-validate`` or ``python bench/bench_validate.py --rows 1000000``.
Target (issue 'Go-live workflow'): each part under 30 s on 2 cores at 1,000,000 rows.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

import numpy as np
import pandas as pd
from sqlalchemy import func, insert, select

from crm_core.db import make_engine, session_factory, upgrade
from crm_core.loading import EXTERNAL_KEY, LOCATION, ROW_REF, Batch
from crm_core.models import Customer, ExternalId, LoadRun, Opportunity
from crm_core.validation import RuleContext, builtin_rules, validate
from integration.mappings.engine import empty_rejects
from integration.pipeline import verify_batch

STAGES = np.array(["initial_contact", "needs_analysis", "proposal", "negotiation", "won", "lost", "商务谈判"])


def opportunities(rows: int, seed: int = 7) -> pd.DataFrame:
    """Mapped opportunity records with a few percent of rule violations of every kind."""
    rng = np.random.default_rng(seed)
    stage = STAGES[rng.integers(0, len(STAGES), rows)]
    probability = rng.integers(0, 101, rows).astype(float)
    probability[rng.random(rows) < 0.01] = 140
    cents = rng.integers(-100, 50_000_000, rows)
    closed = pd.to_datetime("2025-01-01") + pd.to_timedelta(rng.integers(0, 800, rows), unit="D")
    closed_on = pd.Series(closed.date, dtype=object)
    closed_on[rng.random(rows) < 0.05] = None
    names = pd.Series([f"商机 {i}" for i in range(rows)], dtype=object)
    names[rng.random(rows) < 0.005] = None
    return pd.DataFrame({
        "name": names,
        "customer": pd.Series([f"C{i % 10_000}" for i in range(rows)], dtype=object),
        "stage": stage,
        "probability": probability,
        "amount": [Decimal(int(c)).scaleb(-2) for c in cents],
        "closed_on": closed_on,
        EXTERNAL_KEY: pd.Series([f"OPP-{i}" for i in range(rows)], dtype=object),
        ROW_REF: pd.Series([f"OPP-{i}" for i in range(rows)], dtype=object),
        LOCATION: "opportunities",
    })  # fmt: skip


def bench_validate(frame: pd.DataFrame) -> dict[str, object]:
    """Time every built-in opportunity rule over the frame."""
    rules = [r for r in builtin_rules() if r.entity == "opportunity"]
    started = time.perf_counter()
    found = validate("opportunity", frame, rules, RuleContext(today=dt.date(2026, 11, 23)))
    seconds = time.perf_counter() - started
    return {"validate_rows": len(frame), "validate_rules": len(rules), "validate_s": round(seconds, 2),
            "violations": len(found)}  # fmt: skip


def bench_reconcile(frame: pd.DataFrame, folder: Path) -> dict[str, object]:
    """Write the frame into a core as if loaded (not timed), then time its reconciliation."""
    engine = make_engine(f"sqlite:///{folder / 'core.sqlite'}")
    upgrade(engine)
    rows = len(frame)
    with engine.begin() as connection:
        run_id = connection.execute(
            insert(LoadRun).values(run_key="bench", project="bench", stats={})
        ).inserted_primary_key[0]  # type: ignore[index]
        connection.execute(insert(Customer), [{"id": 1, "name": "基准客户有限公司"}])
        step = 50_000
        for start in range(0, rows, step):
            part = frame.iloc[start : start + step]
            connection.execute(insert(Opportunity), [
                {"id": start + i + 1, "customer_id": 1, "name": name or "-", "stage_code": "proposal",
                 "amount": amount, "created_run_id": run_id, "updated_run_id": run_id}
                for i, (name, amount) in enumerate(zip(part["name"], part["amount"], strict=True))
            ])  # fmt: skip
            connection.execute(insert(ExternalId), [
                {"entity": "opportunity", "entity_id": start + i + 1, "system": "crm", "external_key": key,
                 "match_method": "created", "created_run_id": run_id}
                for i, key in enumerate(part[EXTERNAL_KEY])
            ])  # fmt: skip
    records = frame.assign(name=frame["name"].fillna("-"))
    batch = Batch(source="crm", mapping="crm_opportunities", records=records, rejects=empty_rejects(),
                  rows_read=rows, fields=["name", "amount"], raw=records[[LOCATION, ROW_REF]])  # fmt: skip
    started = time.perf_counter()
    with session_factory(engine)() as session:
        run = session.get(LoadRun, run_id)
        assert run is not None
        checked = verify_batch(session, run, "opportunity", batch)
        core_sum = session.scalar(select(func.sum(Opportunity.amount)))
    seconds = time.perf_counter() - started
    engine.dispose()
    source_sum = sum(records["amount"], Decimal(0))
    return {"reconcile_rows": rows, "reconcile_s": round(seconds, 2), "keys_missing": checked["keys_missing"],
            "spot_mismatches": checked["spot_mismatches"],
            "amounts_agree": Decimal(str(core_sum)).quantize(Decimal("0.01")) == source_sum}  # fmt: skip


def main() -> None:
    """Run both parts and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    frame = opportunities(args.rows)
    result: dict[str, object] = {"benchmark": "validate", **bench_validate(frame)}
    with tempfile.TemporaryDirectory() as folder:
        result.update(bench_reconcile(frame, Path(folder)))
    result["target_s"] = 30
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    result["python"] = sys.version.split()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
