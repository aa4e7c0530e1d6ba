"""The floor of a 1M load's writes on SQLite: what the records and crosswalk rows cost with no decision at all.

Reads every record and crosswalk row of a finished core (``bench_e2e.py --keep`` leaves one) and writes them
again into an empty core of the same schema, entity by entity in load order, as ready driver tuples:
``executemany`` of the records and of their crosswalk rows in one transaction per entity, the entity table's
secondary indexes created after its rows, and the crosswalk's two ``entity_id`` indexes likewise when the entity
brings at least as many crosswalk rows as the table holds (the loader's rule, ``EntityLoader._defer_indexes``). No
hashing, matching, resolving, journal or read-back: a loader cannot write the same rows faster than this
through the same statements, so ``rows_per_second`` (crosswalk rows, one per source row loaded, over the
seconds) bounds what any loader reaches on this machine with this schema. ``--without-crosswalk-entity-indexes``
measures the same writes without the crosswalk's two ``entity_id`` indexes (what the schema costs).

Prints one JSON line. Run: ``python bench/bench_write_floor.py --core var/bench_e2e/sqlite-1000000/core.sqlite``.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import cpu_reference_seconds

TABLES = {  # entity -> table, in load order
    "customer": "customers",
    "contact": "contacts",
    "opportunity": "opportunities",
    "sales_order": "sales_orders",
    "sales_order_line": "sales_order_lines",
}
CHUNK = 5_000  # rows per executemany, as the loader's chunks
CACHE_KIB = 64 * 1024  # the core's page cache (crm_core.db.SQLITE_CACHE_KIB)


def measure(source: sqlite3.Connection, target: Path, *, crosswalk_entity_indexes: bool) -> dict[str, object]:
    """Write every entity's records and crosswalk rows from ``source`` into a new core at ``target``."""
    core = sqlite3.connect(target, isolation_level=None)
    core.execute("PRAGMA journal_mode=WAL")
    core.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    names = [*TABLES.values(), "external_ids"]
    marks = ",".join("?" * len(names))
    for (sql,) in source.execute(
        f"SELECT sql FROM sqlite_master WHERE type='table' AND name IN ({marks})", names
    ):
        core.execute(sql)
    indexes = {
        table: [
            sql
            for (sql,) in source.execute(
                "SELECT sql FROM sqlite_master WHERE type='index' AND tbl_name=? AND sql IS NOT NULL",
                (table,),
            )
        ]
        for table in names
    }
    # the crosswalk's non-unique indexes, which the loader defers for a load as big as the table (its unique key
    # on the source key stays: the loader looks rows up by it)
    entity_indexes = [
        (str(name), str(sql))
        for name, sql in source.execute(
            "SELECT name, sql FROM sqlite_master WHERE type='index' AND tbl_name='external_ids' AND sql IS NOT NULL "
            "AND sql NOT LIKE '%UNIQUE%' AND sql NOT LIKE '%external_key%'"
        )
    ]
    for sql in indexes["external_ids"]:
        if crosswalk_entity_indexes or all(sql != kept for _, kept in entity_indexes):
            core.execute(sql)
    steps: dict[str, dict[str, object]] = {}
    seconds = 0.0
    crosswalk_rows = records = 0
    for entity, table in TABLES.items():
        rows = source.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()
        crosswalk = source.execute(
            "SELECT * FROM external_ids WHERE entity=? ORDER BY id", (entity,)
        ).fetchall()
        if not rows:
            continue
        insert_record = f"INSERT INTO {table} VALUES ({','.join('?' * len(rows[0]))})"
        insert_crosswalk = f"INSERT INTO external_ids VALUES ({','.join('?' * len(crosswalk[0]))})"
        started = time.perf_counter()
        core.execute("BEGIN")
        deferred = []
        if crosswalk_entity_indexes and len(crosswalk) >= crosswalk_rows:
            deferred = [(name, sql) for name, sql in entity_indexes]
            for name, _ in deferred:
                core.execute(f"DROP INDEX {name}")
        for start in range(0, len(rows), CHUNK):
            core.executemany(insert_record, rows[start : start + CHUNK])
        for start in range(0, len(crosswalk), CHUNK):
            core.executemany(insert_crosswalk, crosswalk[start : start + CHUNK])
        for sql in indexes[table]:
            core.execute(sql)
        for _, sql in deferred:
            core.execute(sql)
        core.execute("COMMIT")
        took = time.perf_counter() - started
        steps[entity] = {"records": len(rows), "crosswalk_rows": len(crosswalk), "seconds": round(took, 2)}
        seconds += took
        crosswalk_rows += len(crosswalk)
        records += len(rows)
    core.close()
    return {
        "steps": steps,
        "records": records,
        "crosswalk_rows": crosswalk_rows,
        "seconds": round(seconds, 2),
        "rows_per_second": round(crosswalk_rows / seconds) if seconds else None,
    }


def main() -> None:
    """Measure the floor (and, asked for, the floor without the crosswalk's entity indexes); print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--core", type=Path, required=True, help="a finished SQLite core (bench_e2e.py --keep)"
    )
    parser.add_argument("--without-crosswalk-entity-indexes", action="store_true")
    args = parser.parse_args()
    if not args.core.exists():
        sys.exit(
            f"{args.core} does not exist: run `python bench/bench_e2e.py --sizes 1000000 --cores sqlite --keep`"
        )
    source = sqlite3.connect(f"file:{args.core}?mode=ro", uri=True)
    result: dict[str, object] = {"bench": "write_floor", "core": str(args.core)}
    result["cpu_reference_seconds"] = cpu_reference_seconds()
    with tempfile.TemporaryDirectory() as scratch:
        result["floor"] = measure(source, Path(scratch) / "floor.sqlite", crosswalk_entity_indexes=True)
        if args.without_crosswalk_entity_indexes:
            result["without_crosswalk_entity_indexes"] = measure(
                source, Path(scratch) / "lean.sqlite", crosswalk_entity_indexes=False
            )
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
