"""Dedup storage at size: candidate pairs, cluster merges, single undos and the run's rollback.

Creates N customers directly in a fresh core (bulk insert: each with a crosswalk key, a contact, and every
fourth with an opportunity), fabricates duplicate clusters (pairs and triples, about 13% of the records)
and review pairs, then times ``record_candidates`` (first pass and a re-scoring pass), ``merge_clusters``
with source priority and survivorship rules, the full review queue, single ``undo_merge`` calls in random
order, and ``rollback_run`` of the whole dedup run, checking the core is exactly as seeded afterwards.
Linkage itself is measured by ``bench_dedup.py``; this covers what the core does with its output.

``--real`` instead loads the generated Chinese B2B set (``chinese_b2b.py``: planted duplicates, hard
negatives; the records of one company share a contact) and runs what ``crmi dedup run`` runs: customer
linkage and candidates, cluster merges with the survivorship rules, then contact dedup; then the rollback.

Prints one JSON line. Run: ``python bench/bench_dedup_storage.py --size 100000 --db sqlite postgres``.
PostgreSQL: ``$CRM_BENCH_PG_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/bench_dedup``; the
database is created if missing and its public schema wiped).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from crm_core.db import make_engine, session_factory, upgrade
from crm_core.journal import bulk_insert
from crm_core.loading import get_or_start_run
from crm_core.merging import record_candidates, undo_merge
from crm_core.models import Base, LoadRun
from crm_core.runs import rollback_run
from integration.dedup.contacts import deduplicate_contacts
from integration.dedup.workflow import (
    Candidates,
    DedupOutcome,
    find_candidates,
    finish_run,
    merge_clusters,
    review_queue,
)

sys.path.insert(0, str(Path(__file__).parent))  # chinese_b2b

PG_URL = os.environ.get("CRM_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/bench_dedup")
SYSTEMS = ("erp_u8", "legacy_crm", "sales_xlsx")
RULES: dict[str, Any] = {"phone": "most_recent", "address": "most_complete", "industry": "most_frequent",
                         "name": "source_priority"}  # fmt: skip
CHUNK = 200_000


def fresh_core(db: str, size: int, workdir: Path) -> sa.Engine:
    """Return an engine on an empty, migrated core."""
    if db == "sqlite":
        url = f"sqlite:///{workdir / f'bench-{size}.sqlite'}"
    else:
        parsed = sa.engine.make_url(PG_URL)
        admin = sa.create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            if not connection.scalar(
                sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": parsed.database}
            ):
                connection.execute(sa.text(f'CREATE DATABASE "{parsed.database}"'))
        admin.dispose()
        url = PG_URL
        engine = sa.create_engine(url)
        with engine.begin() as connection:
            connection.execute(sa.text("DROP SCHEMA IF EXISTS public CASCADE"))
            connection.execute(sa.text("CREATE SCHEMA public"))
        engine.dispose()
    engine = make_engine(url)
    upgrade(engine)
    return engine


def seed(engine: sa.Engine, size: int) -> None:
    """``size`` customers with crosswalk keys and contacts, every fourth with an opportunity."""
    tables = Base.metadata.tables
    epoch = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    with engine.begin() as connection:
        run_id = connection.execute(
            sa.insert(LoadRun).values(run_key="seed", project="bench", status="succeeded", stats={})
        ).inserted_primary_key[0]  # type: ignore[index]
        for start in range(1, size + 1, CHUNK):
            ids = range(start, min(start + CHUNK, size + 1))
            bulk_insert(connection, tables["customers"], [
                {"id": i, "name": f"深圳市腾达{i}科技有限公司", "phone": f"+86755{i:08d}" if i % 3 else None,
                 "email": f"sales@c{i}.cn" if i % 2 else None, "city": "深圳",
                 "address": f"南山区科技园{i}号" if i % 5 else None, "industry": "软件" if i % 7 else "信息技术",
                 "is_branch": False, "status": "active", "created_run_id": run_id, "created_at": epoch,
                 "updated_at": epoch}
                for i in ids
            ])  # fmt: skip
            bulk_insert(connection, tables["external_ids"], [
                {"entity": "customer", "entity_id": i, "system": SYSTEMS[i % 3], "external_key": f"C{i}",
                 "match_method": "created", "last_synced_at": epoch + dt.timedelta(minutes=i % 10_000),
                 "created_run_id": run_id}
                for i in ids
            ])  # fmt: skip
            bulk_insert(connection, tables["contacts"], [
                {"customer_id": i, "name": f"联系人{i}", "is_primary": True, "created_run_id": run_id,
                 "created_at": epoch, "updated_at": epoch}
                for i in ids
            ])  # fmt: skip
            bulk_insert(connection, tables["opportunities"], [
                {"customer_id": i, "name": f"商机{i}", "stage_code": "proposal", "currency": "CNY",
                 "created_run_id": run_id, "created_at": epoch, "updated_at": epoch}
                for i in ids if i % 4 == 0
            ])  # fmt: skip


def fabricate(size: int) -> tuple[list[list[int]], dict[tuple[int, int], tuple[float, dict[str, Any], str]]]:
    """Clusters (pairs at i % 10 == 1, triples at i % 30 == 5) and review pairs (i % 10 == 8)."""
    clusters: list[list[int]] = []
    scored: dict[tuple[int, int], tuple[float, dict[str, Any], str]] = {}
    features = {"name_core": 2, "credit_code": 0, "phone": 1, "email_domain": 1}
    for i in range(1, size - 2):
        if i % 30 == 5:
            members = [i, i + 1, i + 2]
        elif i % 10 == 1:
            members = [i, i + 1]
        elif i % 10 == 8:
            scored[(i, i + 1)] = (0.6 + (i % 300) / 1000, features, "review")
            continue
        else:
            continue
        clusters.append(members)
        for a, b in (
            (members[x], members[y]) for x in range(len(members)) for y in range(x + 1, len(members))
        ):
            scored[(a, b)] = (0.97, features, "merged")
    return clusters, scored


def seed_real(engine: sa.Engine, size: int) -> None:
    """About ``size`` customers of the generated Chinese B2B set, each with a crosswalk key and two contacts."""
    from chinese_b2b import generate

    records, truth = generate(max(1, int(size / 2.1)))
    tables = Base.metadata.tables
    epoch = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    with engine.begin() as connection:
        run_id = connection.execute(
            sa.insert(LoadRun).values(run_key="seed", project="bench", status="succeeded", stats={})
        ).inserted_primary_key[0]  # type: ignore[index]
        for start in range(0, len(records), CHUNK):
            part = list(enumerate(records[start : start + CHUNK], start=start + 1))
            bulk_insert(connection, tables["customers"], [
                {"id": i, "name": r["name"], "credit_code": r["credit_code"], "phone": r["phone"],
                 "email": r["email"], "city": r["city"], "is_branch": "分公司" in r["name"], "status": "active",
                 "created_run_id": run_id, "created_at": epoch, "updated_at": epoch}
                for i, r in part
            ])  # fmt: skip
            bulk_insert(connection, tables["external_ids"], [
                {"entity": "customer", "entity_id": i, "system": SYSTEMS[i % 3], "external_key": f"C{i}",
                 "match_method": "created", "last_synced_at": epoch + dt.timedelta(minutes=i % 10_000),
                 "created_run_id": run_id}
                for i, _ in part
            ])  # fmt: skip
            # The company's buyer, entered with each of its records, and someone only this record knows.
            bulk_insert(connection, tables["contacts"], [
                {"customer_id": i, "name": name, "mobile": mobile, "email": email, "is_primary": primary,
                 "created_run_id": run_id, "created_at": epoch, "updated_at": epoch}
                for i, _ in part
                for name, mobile, email, primary in (
                    (f"王{truth[i - 1] % 997}芳", f"+86138{truth[i - 1]:08d}", None, True),
                    (f"李{i % 991}强", f"+86139{i:08d}", f"li{i}@example.cn", False),
                )
            ])  # fmt: skip


def bench_real(db: str, size: int, workdir: Path, rollback: bool = True) -> dict[str, Any]:
    """What ``crmi dedup run`` does on a generated set; then the rollback of the run."""
    engine = fresh_core(db, size, workdir)
    figures: dict[str, Any] = {}
    _, figures["seed_s"] = timed(lambda: seed_real(engine, size))
    with engine.connect() as connection:
        figures["customers"] = connection.scalar(
            sa.select(sa.func.count()).select_from(Base.metadata.tables["customers"])
        )
    before = fingerprint(engine) if rollback else ""
    found, figures["link_and_record_s"] = timed(lambda: find_candidates(engine, "dedup", "bench"))
    figures["pairs_compared"] = found.outcome.pairs_compared
    figures["candidates"] = found.outcome.new_candidates
    outcome, figures["merge_clusters_s"] = timed(lambda: merge_clusters(
        engine, "dedup", "bench", found, source_priority=list(SYSTEMS), survivorship=RULES
    ))  # fmt: skip
    figures["customer_merges"] = outcome.auto_merged
    contacts, figures["contact_dedup_s"] = timed(lambda: deduplicate_contacts(engine, "dedup", "bench"))
    figures["contact_merges"] = contacts.auto_merged
    finish_run(engine, "dedup", "bench")
    figures["dedup_run_s"] = round(
        figures["link_and_record_s"] + figures["merge_clusters_s"] + figures["contact_dedup_s"], 2
    )
    if rollback:
        _, figures["rollback_dedup_run_s"] = timed(lambda: rollback_run(engine, "dedup"))
        figures["exact_after_rollback"] = fingerprint(engine) == before
    engine.dispose()
    return figures


def fingerprint(engine: sa.Engine) -> str:
    """A hash of every business row (all columns), to check a rollback restored the core exactly."""
    digest = hashlib.sha256()
    skip = {"load_runs", "row_changes", "rejects", "merge_log", "match_candidates"}
    with engine.connect() as connection:
        for table in Base.metadata.sorted_tables:
            if table.name in skip:
                continue
            for row in connection.execute(sa.select(table).order_by(*table.primary_key)).yield_per(50_000):
                digest.update(repr(tuple(row)).encode())
    return digest.hexdigest()


def timed(action: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = action()
    return result, round(time.perf_counter() - started, 2)


def bench(db: str, size: int, undos: int, workdir: Path) -> dict[str, Any]:
    """Run every step on one database; return its figures."""
    engine = fresh_core(db, size, workdir)
    figures: dict[str, Any] = {"customers": size}
    _, figures["seed_s"] = timed(lambda: seed(engine, size))
    before = fingerprint(engine)
    clusters, scored = fabricate(size)
    figures["pairs"] = len(scored)
    figures["clusters"] = len(clusters)

    def record(run_key: str, pairs: dict[tuple[int, int], Any]) -> int:
        with session_factory(engine)() as session, session.begin():
            run = get_or_start_run(session, run_key, "bench")
            return record_candidates(session, run, "customer", pairs)

    new, figures["record_candidates_s"] = timed(lambda: record("dedup", scored))
    assert new == len(scored)
    candidates = Candidates(DedupOutcome(records=size), clusters, scored, 0.95, [0.97] * len(clusters))
    outcome, figures["merge_clusters_s"] = timed(lambda: merge_clusters(
        engine, "dedup", "bench", candidates, source_priority=list(SYSTEMS), survivorship=RULES
    ))  # fmt: skip
    finish_run(engine, "dedup", "bench")
    figures["merges"] = outcome.auto_merged
    figures["merges_per_s"] = round(outcome.auto_merged / max(figures["merge_clusters_s"], 1e-9))
    rescored = {
        pair: (p - 0.01 if status == "review" else p, f, status) for pair, (p, f, status) in scored.items()
    }
    again, figures["record_candidates_again_s"] = timed(lambda: record("dedup-again", rescored))
    assert again == 0
    finish_run(engine, "dedup-again", "bench")
    queue, figures["review_queue_s"] = timed(lambda: review_queue(engine))
    figures["review_pairs"] = len(queue)

    chosen = random.Random(7).sample(outcome.merge_log_ids, min(undos, len(outcome.merge_log_ids)))
    each: list[float] = []
    for merge_id in chosen:
        started = time.perf_counter()
        with session_factory(engine)() as session, session.begin():
            undo_merge(session, merge_id, "bench")
        each.append(time.perf_counter() - started)
    each.sort()
    figures["undos"] = len(each)
    figures["undo_ms_p50"] = round(each[len(each) // 2] * 1000, 1) if each else None
    figures["undo_ms_p99"] = round(each[int(len(each) * 0.99)] * 1000, 1) if each else None

    _, figures["rollback_again_s"] = timed(lambda: rollback_run(engine, "dedup-again"))
    _, figures["rollback_dedup_run_s"] = timed(lambda: rollback_run(engine, "dedup"))
    figures["exact_after_rollback"] = fingerprint(engine) == before
    engine.dispose()
    return figures


def main() -> None:
    """Parse options, run the benchmark on each database, print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=100_000, help="customers in the core")
    parser.add_argument("--db", nargs="+", default=["sqlite", "postgres"], choices=["sqlite", "postgres"])
    parser.add_argument("--undos", type=int, default=1000, help="single merges undone, in random order")
    parser.add_argument("--real", action="store_true", help="generated set through linkage (crmi dedup run)")
    parser.add_argument("--no-rollback", action="store_true", help="--real: skip rolling the run back")
    args = parser.parse_args()
    result: dict[str, Any] = {"bench": "dedup_real" if args.real else "dedup_storage", "size": args.size}
    with tempfile.TemporaryDirectory() as workdir:
        for db in args.db:
            if args.real:
                result[db] = bench_real(db, args.size, Path(workdir), rollback=not args.no_rollback)
            else:
                result[db] = bench(db, args.size, args.undos, Path(workdir))
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
