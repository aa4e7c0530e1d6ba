"""The steward workbench at size: queue and cluster pages with 100,000 pending pairs, and the duplicate-check
API with many golden customers under concurrent clients, over real HTTP (uvicorn on 127.0.0.1).

Creates a fresh core (bulk insert: customers with a crosswalk key in one of three systems and a city,
``--pairs`` disjoint pending pairs spread over the review band), signs a steward in, and times (p50/p95,
milliseconds) the queue page under each filter and sort, a deep page, and the cluster pages of random
pairs. Then the API: ``--clients`` closed-loop clients (threads of a second process, so they do not share
the server's interpreter) post form-style look-ups to ``/api/v1/match`` (p50/p95/p99, requests per second,
the server's CPU per request, the load average before and after: the machine may be shared), 1,000
customers are changed by a load run and the index refreshed (seconds). ``--no-pages`` measures the API only.

Prints one JSON line. Run: ``python bench/bench_steward.py --pairs 100000 --customers 1000000 --db sqlite
postgres``. PostgreSQL: ``$CRM_BENCH_PG_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/
bench_steward``; the database is created if missing and its public schema wiped).
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import random
import re
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import requests
import sqlalchemy as sa

from crm_core.db import make_engine, upgrade
from crm_core.models import Base
from integration.steward import security
from integration.steward.app import Settings, create_app
from integration.steward.serving import cpu_seconds, fork_workers, listen, stop_workers

PG_URL = os.environ.get("CRM_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/bench_steward")
REGIONS = ("深圳", "广州", "上海", "北京", "杭州", "成都", "武汉", "南京", "苏州", "西安", "宁波", "厦门")
# Trade names of 2–6 characters drawn from these (as bench_dedup.py's golden customers): realistic spread of
# name prefixes, so the match index's blocks hold hundreds of customers, not tens of thousands.
CHARACTERS = "腾达讯华创环保海纳医疗星河物流启明软件云帆科技同创贸易安捷电子凯达思源信息恒通机械博远咨询金桥瑞丰鼎新宏图天成众合卓越远景汇丰长城明德嘉禾飞扬"
INDUSTRIES = ("科技", "贸易", "电子", "软件", "物流", "机械", "医疗", "环保")
SYSTEMS = ("erp_u8", "legacy_crm", "sales_xlsx")
PASSWORD = "bench password 123"
CHUNK = 50_000


def fresh_core(db: str) -> sa.Engine:
    """An empty core at the current schema (SQLite in a temporary folder, or the wiped PostgreSQL database)."""
    if db == "sqlite":
        folder = Path(tempfile.mkdtemp(prefix="bench_steward_"))
        engine = make_engine(f"sqlite:///{folder / 'core.sqlite'}")
    else:
        url = sa.engine.make_url(PG_URL)
        admin = sa.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            if not connection.scalar(
                sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": url.database}
            ):
                connection.execute(sa.text(f'CREATE DATABASE "{url.database}"'))
        admin.dispose()
        engine = make_engine(PG_URL)
        with engine.begin() as connection:
            connection.execute(sa.text("DROP SCHEMA IF EXISTS public CASCADE"))
            connection.execute(sa.text("CREATE SCHEMA public"))
    upgrade(engine)
    return engine


def name_of(rng: random.Random) -> str:
    trade = "".join(rng.choice(CHARACTERS) for _ in range(rng.randint(2, 6)))
    return f"{rng.choice(REGIONS)}{trade}{rng.choice(INDUSTRIES)}有限公司"


def seed(engine: sa.Engine, customers: int, pairs: int) -> dict[str, float]:
    """Customers 1..N, crosswalk keys, ``pairs`` pending pairs (2k+1, 2k+2); returns seconds per step."""
    tables = Base.metadata.tables
    rng = random.Random(7)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with engine.begin() as connection:
        run_id = connection.execute(
            sa.insert(tables["load_runs"]).values(
                run_key="seed", project="bench", status="succeeded", stats={}
            )
        ).inserted_primary_key[0]  # type: ignore[index]
        for start in range(1, customers + 1, CHUNK):
            ids = range(start, min(customers, start + CHUNK - 1) + 1)
            rows = []
            for i in ids:
                name = name_of(rng)
                rows.append({"id": i, "name": name, "city": f"{name[:2]}市", "phone": f"+86755{i:08d}" if i % 3 else None,
                             "created_run_id": run_id, "status": "active", "is_branch": False})  # fmt: skip
            connection.execute(sa.insert(tables["customers"]), rows)
            connection.execute(sa.insert(tables["external_ids"]), [
                {"entity": "customer", "entity_id": i, "system": SYSTEMS[i % 3], "external_key": f"K{i}",
                 "match_method": "created"} for i in ids
            ])  # fmt: skip
        timings["customers_s"] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        for start in range(0, pairs, CHUNK):
            connection.execute(sa.insert(tables["match_candidates"]), [
                {"entity": "customer", "left_id": 2 * k + 1, "right_id": 2 * k + 2,
                 "probability": round(0.5 + 0.45 * rng.random(), 4), "features": {"name_core_levenshtein": 1},
                 "status": "review", "load_run_id": run_id}
                for k in range(start, min(pairs, start + CHUNK))
            ])  # fmt: skip
        timings["pairs_s"] = round(time.perf_counter() - started, 1)
        if engine.dialect.name == "postgresql":
            connection.execute(sa.text("ANALYZE"))
            connection.exec_driver_sql(
                "SELECT setval(pg_get_serial_sequence('customers', 'id'), (SELECT max(id) FROM customers))"
            )
        security.add_user(connection, "bench", "steward", PASSWORD, actor="bench")
    return timings


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """uvicorn on 127.0.0.1, an ephemeral port, in a thread."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def served(app: Any, processes: int) -> Iterator[tuple[str, list[int] | None, float | None]]:
    """The app on 127.0.0.1: in a thread of this process, or in ``processes`` forked workers sharing the
    index built here first; yields (base URL, the workers' pids or None, the index build seconds or None)."""
    if processes <= 1:
        with serving(app) as base:
            yield base, None, None
        return
    started = time.perf_counter()
    app.state.workbench.match.build()
    built = time.perf_counter() - started
    sock = listen("127.0.0.1", 0)
    pids = fork_workers(app, sock, processes)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{base}/login", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the forked server did not start")
            time.sleep(0.1)
        yield base, pids, built
    finally:
        stop_workers(pids)
        sock.close()


def percentiles(timings: list[float], *points: int) -> dict[str, float]:
    return {f"p{p}_ms": round(float(np.percentile(timings, p)), 1) for p in points}


def pages(base: str, pairs: int, samples: int) -> dict[str, Any]:
    """Queue pages per filter and cluster pages of random pairs, as a signed-in steward."""
    session = requests.Session()
    token = re.search(r'name="csrf" value="([^"]+)"', session.get(f"{base}/login", timeout=30).text)
    assert token
    signed = session.post(f"{base}/login", data={"csrf": token.group(1), "name": "bench", "password": PASSWORD},
                          allow_redirects=False, timeout=30)  # fmt: skip
    assert signed.status_code == 303, signed.text
    queries = {
        "default": "", "score_desc": "sort=score_desc", "band_high": "band=high", "range": "min=0.6&max=0.7",
        "city": "city=深圳市", "source": "source=sales_xlsx", "available": "assigned=available",
        "unassigned_newest": "assigned=unassigned&sort=newest", "deep_page": "sort=score_desc&page=1000",
        "per_page_200": "per_page=200",
    }  # fmt: skip
    session.get(f"{base}/cluster/1", timeout=60)  # warm-up: the address parser loads its tables once
    out: dict[str, Any] = {}
    everything: list[float] = []
    for label, query in queries.items():
        timings = []
        for _ in range(samples):
            started = time.perf_counter()
            response = session.get(f"{base}/queue?{query}", timeout=60)
            timings.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, response.text[:300]
        out[label] = percentiles(timings, 50, 95)
        everything += timings
    out["all_queue_pages"] = percentiles(everything, 50, 95)
    rng = random.Random(3)
    timings = []
    for _ in range(samples * 3):
        started = time.perf_counter()
        response = session.get(f"{base}/cluster/{rng.randrange(1, pairs + 1)}", timeout=60)
        timings.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, response.text[:300]
    out["cluster_page"] = percentiles(timings, 50, 95)
    return out


def client_load(
    base: str, token: str, forms: list[dict[str, str]], clients: int
) -> tuple[list[float], float, float]:
    """``clients`` closed-loop clients (threads, one kept-alive connection each, ``http.client``: little CPU
    per request, so the load generator does not starve the server on a small machine) posting ``forms`` to
    the match API; returns (ms per call, wall seconds, this process's CPU seconds)."""
    url = urlsplit(base)
    timings: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def client(number: int) -> None:
        connection = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=60)
        barrier.wait()
        for form in forms[number::clients]:
            body = json.dumps(form, ensure_ascii=False).encode()
            began = time.perf_counter()
            connection.request("POST", "/api/v1/match", body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
            elapsed = (time.perf_counter() - began) * 1000
            assert response.status == 200, payload[:300]
            with lock:
                timings.append(elapsed)
        connection.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    cpu = time.process_time()
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return timings, time.perf_counter() - started, time.process_time() - cpu


def api(
    base: str,
    engine: sa.Engine,
    service: Any,
    customers: int,
    clients: int,
    per_client: int,
    *,
    server_pids: list[int] | None = None,
    built: float | None = None,
) -> dict[str, Any]:
    """Concurrent form look-ups over HTTP, then the refresh after 1,000 changed customers.

    ``server_pids``: forked server processes (their CPU is counted instead of this process's).
    """
    with engine.begin() as connection:
        token = security.add_token(connection, "bench", actor="bench")
    started = time.perf_counter()
    service.index()
    built = time.perf_counter() - started if built is None else built
    rng = random.Random(5)
    names = []
    with engine.connect() as connection:
        for i in rng.sample(range(1, customers + 1), min(customers, clients * per_client)):
            names.append(connection.scalar(sa.text("SELECT name FROM customers WHERE id = :i"), {"i": i}))
    forms = [{"name": name.replace("有限公司", "公司"), "city": f"{name[:2]}市"} for name in names]
    load_before = os.getloadavg()[0]
    # The clients run in another process (20 threads there), so they do not share the server's GIL.
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        pool.apply(client_load, (base, token, forms[: max(clients, 40)], clients))  # warm-up, not timed

        def serving_cpu() -> float:  # this process serves, or the forked workers do; the clients are the pool
            return sum(cpu_seconds(pid) for pid in server_pids) if server_pids else time.process_time()

        server_cpu = serving_cpu()
        timings, wall, client_cpu = pool.apply(client_load, (base, token, forms, clients))
        server_cpu = serving_cpu() - server_cpu
    load_after = os.getloadavg()[0]
    tables = Base.metadata.tables
    with engine.begin() as connection:
        run_id = connection.execute(
            sa.insert(tables["load_runs"]).values(
                run_key="changes", project="bench", status="running", stats={}
            )
        ).inserted_primary_key[0]  # type: ignore[index]
        changed = rng.sample(range(1, customers + 1), 1000)
        connection.execute(
            sa.update(tables["customers"]).where(tables["customers"].c.id == sa.bindparam("_id"))
            .values(name=sa.bindparam("name"), updated_run_id=run_id),
            [{"_id": i, "name": f"杭州新{i}网络科技有限公司"} for i in changed],
        )  # fmt: skip
        connection.execute(
            sa.update(tables["load_runs"])
            .where(tables["load_runs"].c.id == run_id)
            .values(status="succeeded")
        )
    started = time.perf_counter()
    replaced = service.refresh()
    refresh = time.perf_counter() - started
    return {
        "customers": customers, "index_build_s": round(built, 1), "clients": clients, "requests": len(timings),
        "server_processes": len(server_pids) if server_pids else 1,
        **percentiles(timings, 50, 95, 99), "requests_per_s": round(len(timings) / wall, 1),
        "server_cpu_ms_per_request": round(server_cpu * 1000 / len(timings), 2),
        "client_cpu_ms_per_request": round(client_cpu * 1000 / len(timings), 2),
        "load_average_1min": [round(load_before, 1), round(load_after, 1)], "cpus": os.cpu_count(),
        "refresh_1000_changed_s": round(refresh, 2), "refresh_replaced": replaced,
        "target": {"p99_ms": 50, "refresh_s": 2},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100_000, help="pending pairs")
    parser.add_argument(
        "--customers", type=int, default=1_000_000, help="golden customers (at least 2 × pairs)"
    )
    parser.add_argument("--db", nargs="+", default=["sqlite", "postgres"], choices=["sqlite", "postgres"])
    parser.add_argument("--samples", type=int, default=30, help="requests per queue filter")
    parser.add_argument("--clients", type=int, default=20, help="concurrent API clients")
    parser.add_argument("--per-client", type=int, default=100, help="API requests per client")
    parser.add_argument("--no-api", action="store_true", help="skip the API part")
    parser.add_argument("--no-pages", action="store_true", help="skip the queue and cluster pages")
    parser.add_argument(
        "--server-processes", type=int, default=1,
        help="serve from this many forked processes sharing one index (integration.steward.serving)",
    )  # fmt: skip
    args = parser.parse_args()
    customers = max(args.customers, 2 * args.pairs)
    result: dict[str, Any] = {"bench": "steward", "pairs": args.pairs, "customers": customers}
    for db in args.db:
        engine = fresh_core(db)
        entry: dict[str, Any] = {"seed": seed(engine, customers, args.pairs)}
        app = create_app(engine, Settings(match_refresh_seconds=3600))
        with served(app, args.server_processes) as (base, pids, built):
            if not args.no_pages:
                entry["pages"] = pages(base, args.pairs, args.samples)
            if not args.no_api:
                entry["api"] = api(
                    base,
                    engine,
                    app.state.workbench.match,
                    customers,
                    args.clients,
                    args.per_client,
                    server_pids=pids,
                    built=built,
                )
        entry["target"] = {"queue_p95_ms": 200, "cluster_p95_ms": 200}
        result[db] = entry
        engine.dispose()
        print(json.dumps({db: entry}, ensure_ascii=False), file=sys.stderr)
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
