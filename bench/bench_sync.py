"""Sync with U8 at size, against the local U8 OpenAPI test server (real HTTP, real databases).

1. **Round trip of a few changes in a big core**: a core of N customers (default 1,000,000), all known to U8;
   100 of them change in the CRM. One ``run_sync`` (inbound, capture, outbound to U8, U8's rows back) is
   timed, beside a full-table diff of the same core (hash every customer, compare with the last snapshot),
   which is what a sync without change capture must do. The ratio is the point.
2. **Outbound throughput**: ``--outbound`` new CRM customers delivered in batches (records/s).
3. **Outbox drain after an outage**: ``--outage`` changes captured while U8 is down (its server stopped),
   then the drain once it is back (records/s, each applied once).

The U8 test server runs as its own process, as U8 runs on its own machine: its SQLite writes and JSON do
not share this process's interpreter lock with the code measured.

Prints one JSON line. Run: ``make bench-sync`` or ``python bench/bench_sync.py --customers 100000``.
Targets (issue 16): round trip <= 2 s at 1,000,000 customers; outbound >= 2,000 records/s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from crm_core.db import session_factory  # noqa: E402
from crm_core.edits import create_records, edit_records  # noqa: E402
from crm_core.journal import bulk_insert  # noqa: E402
from crm_core.loading import get_or_start_run  # noqa: E402
from crm_core.models import Customer, ExternalId, LoadRun, SyncOutbox  # noqa: E402
from crm_core.watermarks import CursorState, save_watermark  # noqa: E402
from integration.pipeline import Migration, core_engine  # noqa: E402
from integration.sync.engine import run_sync  # noqa: E402
from tests.servers.u8_openapi import CUSTOMER, ensure_schema, next_values  # noqa: E402
from tests.servers.u8_project import environment, sync_yaml  # noqa: E402
from tests.servers.u8_project import write_project as write_u8_project  # noqa: E402


class U8Process:
    """The U8 OpenAPI test server as a child process on a fixed port (stopped and started for an outage)."""

    def __init__(self, u8_url: str) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.u8_url = u8_url
        self.process: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self) -> str:
        """Start the server; return its base URL once it listens."""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.servers.u8_openapi", "--db", self.u8_url, "--port", str(self.port)],
            cwd=REPO, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.process.stdout is not None
        self.url = self.process.stdout.readline().strip()
        if not self.url:
            raise RuntimeError("the U8 test server did not start")
        return self.url

    def stop(self) -> None:
        """Stop the server (SIGTERM) and wait for it."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None


BATCH = int(os.environ.get("BENCH_SYNC_BATCH", "500"))  # U8 batch size: records per request


def write_project(root: Path, u8_url: str) -> Path:
    """A project whose only source is the U8 database, with the customer mapping and the sync section."""
    return write_u8_project(root, u8_url, sync_yaml(batch_size=BATCH, max_attempts=20),
                            ("erp_u8_person", "erp_u8_customers"))  # fmt: skip


def seed(core: sa.Engine, u8: sa.Engine, customers: int) -> None:
    """N customers in U8 and in the core (as a go-live left them: crosswalk keys, U8 watermark at its end)."""
    now = dt.datetime.now(dt.UTC)
    with u8.begin() as connection:
        first = next_values(connection, "ufts", customers)
        rows = [{"cCusCode": f"C{i:07d}", "cCusName": f"基准客户{i:07d}有限公司", "cCusPhone": f"021-{i % 10**8:08d}",
                 "iCusCreLine": 100000.0, "cCusPayCond": "01", "dModifyDate": now.replace(tzinfo=None),
                 "ufts": first + i} for i in range(customers)]  # fmt: skip
        for start in range(0, customers, 50_000):
            connection.execute(sa.insert(CUSTOMER), rows[start : start + 50_000])
    with session_factory(core)() as session, session.begin():
        run = get_or_start_run(session, "golive", "benchsync", mode="full")
        run_id = run.id
    connection = core.connect()
    with connection.begin():
        customers_table: Any = Customer.__table__
        crosswalk: Any = ExternalId.__table__
        for start in range(0, customers, 50_000):
            ids = range(start + 1, min(start + 50_000, customers) + 1)
            bulk_insert(connection, customers_table, [
                {"id": i, "name": f"基准客户{i - 1:07d}有限公司", "phone": f"+8621{(i - 1) % 10**8:08d}",
                 "erp_code": f"C{i - 1:07d}", "credit_limit": 100000, "payment_terms": "01", "status": "active",
                 "is_branch": False, "created_run_id": run_id, "updated_run_id": run_id, "created_at": now,
                 "updated_at": now} for i in ids])  # fmt: skip
            bulk_insert(connection, crosswalk, [
                {"id": i, "entity": "customer", "entity_id": i, "system": "erp_u8", "external_key": f"C{i - 1:07d}",
                 "match_method": "created", "last_synced_hash": None, "last_synced_at": now,
                 "created_run_id": run_id, "updated_run_id": run_id} for i in ids])  # fmt: skip
    connection.close()
    with session_factory(core)() as session, session.begin():
        last = first + customers - 1
        save_watermark(session, "erp_u8", "erp_u8_customers", CursorState(last, frozenset({f"C{customers - 1:07d}"})),
                       run_id)  # fmt: skip
        session.execute(sa.update(LoadRun).where(LoadRun.id == run_id).values(status="succeeded"))


def table_hashes(core: sa.Engine) -> dict[int, str]:
    """Hash every customer's synced fields (the snapshot a diff-based sync keeps)."""
    snapshot: dict[int, str] = {}
    with core.connect() as connection:
        result = connection.execution_options(stream_results=True).execute(
            sa.select(Customer.id, Customer.name, Customer.phone, Customer.address, Customer.short_name)
        )
        for row in result:
            snapshot[row[0]] = hashlib.sha256(repr(tuple(row[1:])).encode()).hexdigest()
    return snapshot


def full_table_diff(core: sa.Engine, before: dict[int, str]) -> tuple[float, int]:
    """Find the changed customers by hashing the whole table against the last snapshot; return (s, changed)."""
    started = time.perf_counter()
    now = table_hashes(core)
    changed = sum(1 for record_id, digest in now.items() if before.get(record_id) != digest)
    return time.perf_counter() - started, changed


def main() -> None:
    """Run the three measurements and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--changed", type=int, default=100)
    parser.add_argument("--outbound", type=int, default=20_000)
    parser.add_argument("--outage", type=int, default=50_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-sync-"))
    u8_url = f"sqlite:///{work / 'u8.sqlite'}"
    core = core_engine(f"sqlite:///{work / 'core.sqlite'}")
    u8 = sa.create_engine(u8_url)
    ensure_schema(u8)
    out: dict[str, Any] = {
        "bench": "sync",
        "customers": args.customers,
        "changed": args.changed,
        "core": "sqlite",
    }
    started = time.perf_counter()
    seed(core, u8, args.customers)
    out["seed_s"] = round(time.perf_counter() - started, 1)
    project = write_project(work / "project", u8_url)
    server = U8Process(u8_url)
    base_url = server.start()
    try:
        os.environ.update(environment(base_url))
        migration = Migration.load(str(project))
        run_sync(migration, core, "u8")  # the first sync: the baseline
        before = table_hashes(core)
        step = max(1, args.customers // args.changed)
        edit_records(core, "customer", {i: {"phone": f"+86108888{i % 10**4:04d}"}
                                        for i in range(1, args.customers + 1, step)[: args.changed]})  # fmt: skip
        started = time.perf_counter()
        report = run_sync(migration, core, "u8")
        out["round_trip_s"] = round(time.perf_counter() - started, 3)
        back = run_sync(migration, core, "u8")  # U8's rows for our edits come back: echoes, nothing sent
        out["round_trip"] = {"sent": report.delivery.sent, "delivered": report.delivery.applied,
                             "received_back": back.received, "echo_sends": back.delivery.sent}  # fmt: skip
        diff_s, diff_changed = full_table_diff(core, before)
        out["full_table_diff_s"] = round(diff_s, 3)
        out["full_table_diff_found"] = diff_changed
        out["diff_over_capture"] = round(diff_s / out["round_trip_s"], 1) if out["round_trip_s"] else None

        create_records(core, "customer", [{"name": f"新客户{n:06d}有限公司"} for n in range(args.outbound)])
        started, cpu_started = time.perf_counter(), time.process_time()
        sent = run_sync(migration, core, "u8", "outbound")
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        deliver_s = sent.seconds.get("deliver") or 0.0
        out["outbound"] = {"records": sent.delivery.applied, "seconds": round(elapsed, 2),
                           "records_per_s": round(sent.delivery.applied / elapsed) if elapsed else None,
                           "capture_s": sent.seconds.get("capture"), "deliver_s": deliver_s,
                           "delivered_per_s": round(sent.delivery.applied / deliver_s) if deliver_s else None,
                           # this process's CPU seconds: what the sync itself costs, whatever else the machine runs
                           "cpu_s": round(cpu, 2), "records_per_cpu_s": round(sent.delivery.applied / cpu) if cpu else None}  # fmt: skip

        edit_records(core, "customer", {i: {"phone": f"+86109999{i % 10**4:04d}"}
                                        for i in range(1, min(args.outage, args.customers) + 1)})  # fmt: skip
        server.stop()  # U8 is down: the changes wait in the outbox
        down = run_sync(migration, core, "u8", "outbound")
        server.start()
        started = time.perf_counter()
        drained = run_sync(migration, core, "u8", "outbound")
        elapsed = time.perf_counter() - started
        with session_factory(core)() as session:
            left = session.scalar(
                sa.select(sa.func.count()).where(SyncOutbox.status.in_(("pending", "dead")))
            )
        out["outage_drain"] = {"queued": down.capture.queued, "delivered_during_outage": down.delivery.applied,
                               "drained": drained.delivery.applied, "seconds": round(elapsed, 2),
                               "records_per_s": round(drained.delivery.applied / elapsed) if elapsed else None,
                               "left_pending_or_dead": int(left or 0)}  # fmt: skip
    finally:
        server.stop()
    core.dispose()
    u8.dispose()
    shutil.rmtree(work, ignore_errors=True)
    out["load_average_1m"] = round(os.getloadavg()[0], 2)  # other work on the machine while measuring
    out["cores"] = os.cpu_count()
    print(json.dumps(out, ensure_ascii=False))


if __name__ == "__main__":
    main()
