"""The 业财 loop computed from the core: order_to_cash per opportunity and customer, its link check in Dagster,
`crmi finance reconcile` and `crmi finance status`, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa

from crm_core.db import session_factory
from crm_core.edits import create_record, create_records
from crm_core.finance import loop_orphans, order_to_cash
from integration.pipeline import core_engine
from tests.conftest import PG_URL, REPO, reset_postgres, server_or_skip
from tests.servers.k3cloud import K3Api

TODAY = dt.date(2026, 11, 1)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def core_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated core: a SQLite file, or the PostgreSQL test database wiped clean."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'core.sqlite'}"
    else:
        engine = server_or_skip(PG_URL, "PostgreSQL")
        reset_postgres(engine)
        engine.dispose()
        url = PG_URL
    core_engine(url).dispose()
    yield url


@pytest.fixture
def core(core_url: str) -> Iterator[sa.Engine]:
    engine = core_engine(core_url)
    yield engine
    engine.dispose()


def loop(engine: sa.Engine) -> dict[str, int]:
    """Two customers: a won deal with an order invoiced twice and partly collected; a USD receivable, a refund.

    The ids come back by name.
    """
    a = create_record(engine, "customer", {"name": "杭州新禾贸易有限公司"})
    b = create_record(engine, "customer", {"name": "深圳远航电子有限公司"})
    d1 = create_record(engine, "opportunity", {"customer": a, "name": "年度框架采购", "stage": "won",
                                                "amount": Decimal("113000.00"), "closed_on": dt.date(2026, 9, 20)})  # fmt: skip
    d3 = create_record(engine, "opportunity", {"customer": b, "name": "试点项目", "stage": "won",
                                                "amount": Decimal("5000.00"), "closed_on": dt.date(2026, 10, 2)})  # fmt: skip
    create_record(
        engine, "opportunity", {"customer": b, "name": "二期", "stage": "proposal", "amount": Decimal("1")}
    )
    so1 = create_record(engine, "sales_order", {"order_no": "SO-1", "customer": a, "opportunity": d1,
                                                 "order_date": dt.date(2026, 9, 25), "total_amount": Decimal("113000.00")})  # fmt: skip
    r1, r2, r3, r4 = create_records(engine, "receivable", [
        {"receivable_no": "AR-1", "customer": a, "order": so1, "amount": Decimal("80000.00"),
         "invoiced_on": dt.date(2026, 10, 8), "due_date": dt.date(2026, 10, 15)},
        {"receivable_no": "AR-2", "customer": a, "order": so1, "amount": Decimal("33000.00"),
         "invoiced_on": dt.date(2026, 10, 20), "due_date": dt.date(2026, 12, 31)},
        {"receivable_no": "AR-USD", "customer": b, "amount": Decimal("1000.00"), "currency": "USD",
         "exchange_rate": Decimal("7.1"), "invoiced_on": dt.date(2026, 10, 10), "due_date": dt.date(2026, 10, 20)},
        {"receivable_no": "AR-RED", "customer": b, "amount": Decimal("-500.00"), "red_letter": True,
         "invoiced_on": dt.date(2026, 10, 12), "due_date": dt.date(2026, 10, 25)},
    ])  # fmt: skip
    p1, p2, p3 = create_records(engine, "payment", [
        {"payment_no": "SK-1", "customer": a, "amount": Decimal("60000.00"), "received_on": dt.date(2026, 10, 25)},
        {"payment_no": "SK-USD", "customer": b, "amount": Decimal("400.00"), "currency": "USD",
         "exchange_rate": Decimal("7.1"), "received_on": dt.date(2026, 10, 28)},
        {"payment_no": "SK-LOOSE", "customer": b, "amount": Decimal("99.99"), "received_on": dt.date(2026, 10, 29)},
    ])  # fmt: skip
    create_records(engine, "payment_application", [
        {"payment": p1, "receivable": r1, "amount": Decimal("50000.00")},
        {"payment": p1, "receivable": r2, "amount": Decimal("10000.00")},
        {"payment": p2, "receivable": r3, "amount": Decimal("400.00")},
    ])  # fmt: skip
    return {"a": a, "b": b, "d1": d1, "d3": d3, "so1": so1, "r4": r4, "p3": p3}


def test_order_to_cash_per_opportunity_and_customer_to_the_fen(core: sa.Engine) -> None:
    ids = loop(core)
    with session_factory(core)() as session:
        cash = order_to_cash(session, today=TODAY)
    a, b = cash.customers[ids["a"]], cash.customers[ids["b"]]
    assert (a.ordered, a.invoiced, a.collected, a.outstanding, a.overdue) == (
        Decimal("113000.00"), Decimal("113000.00"), Decimal("60000.00"), Decimal("53000.00"), Decimal("30000.00"))  # fmt: skip
    assert a.dso == Decimal("42.2")  # 53,000 outstanding / 113,000 invoiced in 90 days × 90
    # USD 1,000 at 7.1 = 7,100; the red-letter -500 counts negative; USD 400 collected at 7.1 = 2,840
    assert (b.ordered, b.invoiced, b.collected, b.outstanding, b.overdue) == (
        Decimal("0.00"), Decimal("6600.00"), Decimal("2840.00"), Decimal("3760.00"), Decimal("4260.00"))  # fmt: skip
    assert cash.opportunities[ids["d1"]].as_dict() == {
        "ordered": "113000.00", "invoiced": "113000.00", "collected": "60000.00", "outstanding": "53000.00",
        "overdue": "30000.00", "dso": "42.2"}  # fmt: skip
    deal3 = cash.opportunities[ids["d3"]]  # won without an order yet: sold, nothing invoiced
    assert (deal3.ordered, deal3.invoiced, deal3.dso) == (Decimal("5000.00"), Decimal("0.00"), None)
    assert len(cash.opportunities) == 2  # the open deal has no figures
    assert cash.totals.as_dict() == {
        "ordered": "113000.00", "invoiced": "119600.00", "collected": "62840.00", "outstanding": "56760.00",
        "overdue": "34260.00", "dso": "42.7"}  # fmt: skip
    assert [t["customer"] for t in cash.top_overdue] == ["杭州新禾贸易有限公司", "深圳远航电子有限公司"]
    assert cash.documents == {
        "orders": 1, "orders_without_amount": 0, "receivables": 4, "receipts": 3, "foreign_without_rate": 0}  # fmt: skip


def test_the_loop_check_lists_orphans_and_drops_none(core: sa.Engine) -> None:
    ids = loop(core)
    stray = create_record(core, "receivable", {"receivable_no": "AR-X", "customer": ids["b"], "order": ids["so1"],
                                               "amount": Decimal("10.00")})  # fmt: skip
    with session_factory(core)() as session:
        counts, orphans = loop_orphans(session)
        invoiced = order_to_cash(session, today=TODAY).customers[ids["b"]].invoiced
    assert counts == {"receipt": 1, "receivable": 1}
    assert {(o.kind, o.number, o.reason) for o in orphans} == {
        ("receipt", "SK-LOOSE", "applied to no receivable"),
        ("receivable", "AR-X", "its order belongs to another customer"),
    }
    assert stray and invoiced == Decimal("6610.00")  # listed, still counted


def test_sums_over_many_documents_equal_the_exact_decimal_sums(core: sa.Engine) -> None:
    customer = create_record(core, "customer", {"name": "万象贸易有限公司"})
    amounts = [Decimal(f"{(n * 7919) % 1_000_000}.{(n * 37) % 100:02d}") for n in range(3000)]
    ids = create_records(core, "receivable", [
        {"receivable_no": f"AR{n}", "customer": customer, "amount": amount, "invoiced_on": dt.date(2026, 10, 1)}
        for n, amount in enumerate(amounts)
    ])  # fmt: skip
    pay = create_record(
        core, "payment", {"payment_no": "SK", "customer": customer, "amount": sum(amounts[::2])}
    )
    create_records(core, "payment_application", [
        {"payment": pay, "receivable": rid, "amount": amounts[n]} for n, rid in enumerate(ids) if n % 2 == 0
    ])  # fmt: skip
    with session_factory(core)() as session:
        figures = order_to_cash(session, today=TODAY).customers[customer]
    assert figures.invoiced == sum(amounts) and figures.collected == sum(amounts[::2])


def test_the_collections_and_the_customer_loop_count_order_lines_and_name_orders_without_an_amount(
    core: sa.Engine,
) -> None:
    """An order's amount is its total_amount, else the sum of its lines when every line has an amount; orders with
    neither are counted apart (what was invoiced against them is not taken for invoiced more than ordered)."""
    from crm_core.finance import opportunity_collections, order_collections, reconcile

    customer = create_record(core, "customer", {"name": "杭州新禾贸易有限公司"})
    deal = create_record(core, "opportunity", {"customer": customer, "name": "年度框架采购", "stage": "won",
                                                "amount": Decimal("1000.00"), "closed_on": dt.date(2026, 10, 1)})  # fmt: skip
    lines_only, with_total, bare = create_records(core, "sales_order", [
        {"order_no": "SO-L", "customer": customer, "opportunity": deal, "order_date": dt.date(2026, 10, 5)},
        {"order_no": "SO-T", "customer": customer, "order_date": dt.date(2026, 10, 6), "total_amount": Decimal("2000.00")},
        {"order_no": "SO-N", "customer": customer, "opportunity": deal, "order_date": dt.date(2026, 10, 7)},
    ])  # fmt: skip
    create_records(core, "sales_order_line", [
        {"order": lines_only, "line_no": 1, "amount": Decimal("600.10")},
        {"order": lines_only, "line_no": 2, "amount": Decimal("399.90")},
        {"order": with_total, "line_no": 1, "amount": Decimal("1500.00")},
    ])  # fmt: skip
    create_records(core, "receivable", [
        {"receivable_no": "R-L", "customer": customer, "order": lines_only, "amount": Decimal("1000.00")},
        {"receivable_no": "R-T", "customer": customer, "order": with_total, "amount": Decimal("2000.00")},
        {"receivable_no": "R-N", "customer": customer, "order": bare, "amount": Decimal("300.00")},
    ])  # fmt: skip
    with session_factory(core)() as session:
        orders = order_collections(session, today=TODAY)
        deal_cash = opportunity_collections(session, [deal], today=TODAY)[deal]
        loop = reconcile(session, today=TODAY)
        cash = order_to_cash(session, today=TODAY)
    assert (orders[lines_only].ordered, orders[with_total].ordered) == (
        Decimal("1000.00"),
        Decimal("2000.00"),
    )
    assert (orders[lines_only].orders_without_amount, orders[bare].orders_without_amount) == (0, 1)
    assert (deal_cash.ordered, deal_cash.invoiced, deal_cash.orders_without_amount) == (
        Decimal("1000.00"), Decimal("1300.00"), 1)  # fmt: skip
    assert deal_cash.as_dict()["orders_without_amount"] == 1
    [row] = loop["customers"]
    assert (row["ordered"], row["invoiced"], row["orders_without_amount"]) == ("3000.00", "3300.00", 1)
    [difference] = loop["differences"]
    reasons = difference["reasons"]
    assert "1 order without an amount (neither total_amount nor an amount on every line)" in reasons
    assert "1 order whose total_amount differs from the sum of its lines" in reasons
    assert "invoiced more than ordered" not in reasons and "ordered, not invoiced yet" not in reasons
    assert loop["orders_without_amount"] == 1
    assert (cash.customers[customer].ordered, cash.opportunities[deal].ordered) == (
        Decimal("3000.00"), Decimal("1000.00"))  # fmt: skip
    assert cash.documents["orders_without_amount"] == 1


# --------------------------------------------------------------------------- Dagster


@pytest.fixture
def finance_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The K3Cloud finance project of tests/test_k3cloud.py (no server needed to build definitions)."""
    from tests.test_k3cloud import PROJECT

    for name, value in (("K3_URL", "http://127.0.0.1:9/k3cloud"), ("K3_ACCT_ID", "1"), ("K3_USERNAME", "u"),
                        ("K3_PASSWORD", "p")):  # fmt: skip
        monkeypatch.setenv(name, value)
    root = tmp_path / "project"
    shutil.copytree(REPO / "examples" / "k3cloud" / "mappings", root / "mappings")
    (root / "project.yaml").write_text(PROJECT, encoding="utf-8")
    return root


def test_order_to_cash_asset_metadata_and_its_check_in_dagster(
    core: sa.Engine, core_url: str, finance_project: Path
) -> None:
    from integration.jobs import MIGRATION_JOB, build_definitions

    ids = loop(core)
    defs = build_definitions(finance_project, core_url)
    migration = defs.resolve_job_def(MIGRATION_JOB)
    assert "order_to_cash" not in {
        k.to_user_string() for k in migration.asset_layer.asset_graph.get_all_asset_keys()
    }
    graph = defs.resolve_asset_graph()
    node = graph.get(dg.AssetKey("order_to_cash"))
    assert node.group_name == "finance"
    assert {k.to_user_string() for k in node.parent_keys} == {"sync_finance_inbound"}
    # the finance target gets the sync engine's assets, checks, jobs and schedules like U8
    for name in ("sync_finance_inbound_job", "sync_finance_outbound_job", "sync_finance_checks_job"):
        defs.resolve_job_def(name)
    checks = {str(key.name) for key in graph.asset_check_keys}
    assert {
        "check_inbound_freshness",
        "check_dead_letters",
        "check_conflicts_open",
        "check_loop_links",
    } <= checks
    schedules = {s.name for s in defs.schedules or [] if isinstance(s, dg.ScheduleDefinition)}
    assert "order_to_cash_schedule" in schedules

    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def("order_to_cash_job").execute_in_process(instance=instance)
    assert result.success
    [materialization] = result.asset_materializations_for_node("order_to_cash")
    meta: dict[str, Any] = {k: v.value for k, v in materialization.metadata.items()}
    assert meta["overdue"] == 34260.0 and meta["outstanding"] == 56760.0 and meta["receivables"] == 4
    assert meta["totals_exact"]["collected"] == "62840.00"
    assert "杭州新禾贸易有限公司" in meta["top_overdue_customers"]
    [evaluation] = [
        e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"
    ]
    assert evaluation is not None and not evaluation.passed  # type: ignore[union-attr]
    check_meta = {k: v.value for k, v in evaluation.metadata.items()}  # type: ignore[union-attr]
    assert check_meta["orphans"] == 1 and "SK-LOOSE" in check_meta["listed"]
    assert ids


def test_while_a_command_holds_the_core_order_to_cash_and_the_reconciliation_refuse(
    core: sa.Engine, core_url: str, finance_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`crmi rollback` in another terminal holds the core: the order_to_cash step asks to be retried naming it, as
    a sync step does, and fails naming it once its wait is over; its schedule skips the tick naming it, `crmi
    finance reconcile` exits 1 and writes no report; afterwards the job runs."""
    from typer.testing import CliRunner

    from integration.assets.sync import BUSY_RETRY_ENV, BUSY_WAIT_ENV
    from integration.cli import app
    from integration.jobs import build_definitions
    from tests.test_run_lock_steps import held_by_another_process

    monkeypatch.setenv(BUSY_WAIT_ENV, "0.2")
    monkeypatch.setenv(BUSY_RETRY_ENV, "0.1")
    holder = "another command holds this core (crmi rollback on the consultant's laptop (pid 4242)"
    loop(core)
    defs = build_definitions(finance_project, core_url)
    job = defs.resolve_job_def("order_to_cash_job")
    out = tmp_path / "reports"
    with held_by_another_process(core_url), dg.instance_for_test() as instance:
        result = job.execute_in_process(instance=instance, raise_on_error=False)
        assert not result.success
        retries = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY]
        assert len(retries) == 2 and all(
            e.step_retry_data.error is not None
            and e.step_retry_data.error.cause is not None
            and holder in e.step_retry_data.error.cause.message
            for e in retries
        )
        failures = [
            e.step_failure_data.user_failure_data.description or ""
            for e in result.all_events
            if e.is_step_failure and e.step_failure_data.user_failure_data is not None
        ]
        assert [f for f in failures if "no order_to_cash while it loads" in f] == failures
        assert len(failures) == 1 and holder in failures[0] and "gave up after 2 retries" in failures[0]
        assert not result.asset_materializations_for_node("order_to_cash")
        tick = defs.resolve_schedule_def("order_to_cash_schedule").evaluate_tick(
            dg.build_schedule_context(instance=instance)
        )
        assert not tick.run_requests and holder in (tick.skip_message or "")
        refused = CliRunner().invoke(app, ["finance", "reconcile", "--period", "2026-10", "--out", str(out),
                                           "--project", str(finance_project), "--core-url", core_url])  # fmt: skip
        assert refused.exit_code == 1, refused.output
        assert f"reconciliation refused: {holder}" in refused.output
        assert not out.exists()
    with dg.instance_for_test() as instance:
        assert job.execute_in_process(instance=instance).success


def test_crmi_finance_reconcile_told_to_wait_reconciles_once_the_core_is_free_and_is_refused_after_it(
    core: sa.Engine, core_url: str, finance_project: Path, tmp_path: Path
) -> None:
    """`crmi rollback` in another terminal holds the core. `crmi finance reconcile --wait` too short: it says it
    waits, then is refused (exit 1) naming the holder and how long it waited, no report written. Told to wait
    long enough (from cron, a process of its own): it says so once, writes nothing while the command holds the
    core, and reconciles as soon as it has ended."""
    from typer.testing import CliRunner

    from integration.cli import app
    from tests.test_run_lock_steps import held_by_another_process
    from tests.test_sync_run_lock import COMMAND, crmi_in_another_process, line_starting, rest_of

    loop(core)
    out = tmp_path / "reports"
    args = ["finance", "reconcile", "--period", "2026-10", "--out", str(out), "--project", str(finance_project),
            "--core-url", core_url, "--json"]  # fmt: skip
    holder = f"another command holds this core ({COMMAND}"
    with ExitStack() as holding:
        holding.enter_context(held_by_another_process(core_url))
        short = CliRunner().invoke(app, [*args, "--wait", "0.3"])
        assert short.exit_code == 1, short.output
        [waiting, refused] = [line for line in short.output.splitlines() if line.strip()]
        assert waiting.startswith(f"waiting: {holder}") and "waits up to 0.3 s" in waiting, waiting
        assert refused.startswith(f"reconciliation refused: {holder}"), refused
        assert refused.endswith("run it again when it has ended; waited 0.3 s (--wait)"), refused
        assert not out.exists()

        with crmi_in_another_process(*args, "--wait", "600") as (process, lines):
            waiting = line_starting(lines, "waiting:")
            assert waiting.startswith(f"waiting: {holder}"), waiting
            assert waiting.endswith("`crmi finance reconcile` waits up to 10 min for it to end (--wait)")
            assert process.poll() is None and not out.exists()
            holding.close()  # the command has ended
            assert process.wait(timeout=120) == 0, rest_of(lines)
            assert process.stdout is not None
            result = json.loads(process.stdout.read())
            assert not [line for line in rest_of(lines) if "waiting" in line]  # said once
    assert result["period"] == "2026-10" and Path(result["reports"]["excel"]).is_file()


# --------------------------------------------------------------------------- reconciliation of a period


def link(engine: sa.Engine, entity: str, system: str, ids: dict[str, int]) -> None:
    """Give records a key in a system's crosswalk (as its sync would)."""
    from crm_core.models import ExternalId

    with session_factory(engine)() as session, session.begin():
        session.add_all(
            ExternalId(entity=entity, entity_id=i, system=system, external_key=k) for k, i in ids.items()
        )


def october(engine: sa.Engine) -> dict[str, int]:
    """Four customers whose October differs for every class of reason, and one that balances."""
    a, b, c, d = create_records(engine, "customer", [{"name": "杭州新禾贸易有限公司"}, {"name": "深圳远航电子有限公司"},
                                                      {"name": "成都平衡科技有限公司"}, {"name": "=SUM(1,2)有限公司"}])  # fmt: skip
    orders = dict(zip(["SO-A1", "SO-A2", "SO-B1", "SO-C1", "SO-D0"], create_records(engine, "sales_order", [
        {"order_no": "SO-A1", "customer": a, "order_date": dt.date(2026, 10, 5), "total_amount": Decimal("10000.00")},
        {"order_no": "SO-A2", "customer": a, "order_date": dt.date(2026, 10, 15), "total_amount": Decimal("5000.00")},
        {"order_no": "SO-B1", "customer": b, "order_date": dt.date(2026, 10, 8), "total_amount": Decimal("2000.00")},
        {"order_no": "SO-C1", "customer": c, "order_date": dt.date(2026, 10, 9), "total_amount": Decimal("1000.00")},
        {"order_no": "SO-D0", "customer": d, "order_date": dt.date(2026, 9, 1), "total_amount": Decimal("800.00")},
    ]), strict=True))  # fmt: skip
    link(
        engine, "sales_order", "u8", {k: v for k, v in orders.items() if k != "SO-A2"}
    )  # SO-A2 never reached U8
    r = dict(zip(["RA1", "RA2", "RB1", "RB2", "RC1", "RD1", "RC-OLD"], create_records(engine, "receivable", [
        {"receivable_no": "RA1", "customer": a, "order": orders["SO-A1"], "amount": Decimal("10000.00"),
         "invoiced_on": dt.date(2026, 10, 10)},
        {"receivable_no": "RA2", "customer": a, "order": orders["SO-A2"], "amount": Decimal("5000.00"),
         "invoiced_on": dt.date(2026, 11, 3)},
        {"receivable_no": "RB1", "customer": b, "order": orders["SO-B1"], "amount": Decimal("2500.00"),
         "invoiced_on": dt.date(2026, 10, 9)},
        {"receivable_no": "RB2", "customer": b, "amount": Decimal("100.00"), "currency": "USD",
         "exchange_rate": Decimal("7.1"), "invoiced_on": dt.date(2026, 10, 12)},
        {"receivable_no": "RC1", "customer": c, "order": orders["SO-C1"], "amount": Decimal("1000.00"),
         "invoiced_on": dt.date(2026, 10, 11)},
        {"receivable_no": "RD1", "customer": d, "order": orders["SO-D0"], "amount": Decimal("800.00"),
         "invoiced_on": dt.date(2026, 9, 20)},
        {"receivable_no": "RC-OLD", "customer": c, "amount": Decimal("999.00"), "invoiced_on": dt.date(2026, 10, 1)},
    ]), strict=True))  # fmt: skip
    link(engine, "receivable", "k3", {k: v for k, v in r.items() if k != "RC-OLD"})  # migrated, not K3Cloud's
    p = dict(zip(["PA1", "PA3", "PB1", "PB2", "PC1", "PD1"], create_records(engine, "payment", [
        {"payment_no": "PA1", "customer": a, "amount": Decimal("6000.00"), "received_on": dt.date(2026, 10, 20)},
        {"payment_no": "PA3", "customer": a, "amount": Decimal("1000.00"), "received_on": dt.date(2026, 11, 5)},
        {"payment_no": "PB1", "customer": b, "amount": Decimal("2500.00"), "received_on": dt.date(2026, 10, 30)},
        {"payment_no": "PB2", "customer": b, "amount": Decimal("300.00"), "received_on": dt.date(2026, 10, 31)},
        {"payment_no": "PC1", "customer": c, "amount": Decimal("1000.00"), "received_on": dt.date(2026, 10, 25)},
        {"payment_no": "PD1", "customer": d, "amount": Decimal("800.00"), "received_on": dt.date(2026, 10, 2)},
    ]), strict=True))  # fmt: skip
    link(engine, "payment", "k3", p)
    create_records(engine, "payment_application", [
        {"payment": p[pay], "receivable": r[rec], "amount": Decimal(amount)}
        for pay, rec, amount in (("PA1", "RA1", "6000"), ("PA3", "RA1", "1000"), ("PB1", "RB1", "2500"),
                                 ("PC1", "RC1", "1000"), ("PD1", "RD1", "800"))
    ])  # fmt: skip
    return {"a": a, "b": b, "c": c, "d": d}


def test_a_period_is_reconciled_per_customer_with_classified_reasons(core: sa.Engine) -> None:
    from crm_core.finance import period_bounds, reconcile_period

    ids = october(core)
    start, end = period_bounds("2026-10")
    assert (start, end) == (dt.date(2026, 10, 1), dt.date(2026, 10, 31))
    with pytest.raises(ValueError, match="YYYY-MM"):
        period_bounds("Oct 2026")
    with session_factory(core)() as session:
        result = reconcile_period(session, start, end, erp_system="u8", finance_system="k3", today=TODAY)
    assert result["totals"] == {"crm_ordered": "18000.00", "erp_ordered": "13000.00", "invoiced": "14210.00",
                                "received": "10600.00"}  # fmt: skip
    reasons = {
        d["customer_id"]: sorted((r["between"], r["class"], r["amount"], r["detail"]) for r in d["reasons"])
        for d in result["differences"]
    }
    assert ids["c"] not in reasons  # balances (its migrated receivable is not K3Cloud's)
    assert reasons[ids["a"]] == sorted([
        ("crm/erp", "missing link", "5000.00", "CRM orders of the period the ERP does not have (no ERP key)"),
        ("orders/receivables", "timing", "5000.00", "the period's orders invoiced in another period"),
        ("receivables/receipts", "timing", "1000.00", "the period's receivables collected after it"),
        ("receivables/receipts", "timing", "3000.00", "the period's receivables not collected yet"),
    ])  # fmt: skip
    assert [(c, a) for _, c, a, _ in reasons[ids["b"]]] == [
        ("amount mismatch", "-500.00"), ("currency", "710.00"), ("missing link", "710.00"),
        ("missing link", "300.00"), ("timing", "710.00")]  # fmt: skip
    assert reasons[ids["d"]] == [("receivables/receipts", "timing", "800.00",
                                  "receipts of the period for receivables of other periods")]  # fmt: skip


def test_crmi_finance_reconcile_writes_a_formula_safe_workbook_and_status_shows_the_loop(
    core: sa.Engine, core_url: str, finance_project: Path, tmp_path: Path
) -> None:
    from openpyxl import load_workbook
    from typer.testing import CliRunner

    from integration.cli import app

    ids = october(core)
    runner = CliRunner()
    common = ["--project", str(finance_project), "--core-url", core_url]
    out = tmp_path / "reports"
    shown = runner.invoke(app, ["finance", "reconcile", "--period", "2026-10", "--erp-system", "u8", "--out",
                                str(out), *common])  # fmt: skip
    assert shown.exit_code == 0, shown.output
    assert "3 of 4 customers differ" in shown.output
    assert "missing link" in shown.output and "18000.00" in shown.output
    as_json = runner.invoke(app, ["finance", "reconcile", "--period", "2026-10", "--erp-system", "u8", "--out",
                                  str(out), "--json", *common])  # fmt: skip
    data = json.loads(as_json.stdout)
    assert data["finance_system"] == "k3" and data["erp_system"] == "u8"  # k3: the project's K3Cloud target
    book = load_workbook(out / "finance-reconcile-2026-10.xlsx")
    assert book.sheetnames == ["Summary", "Customers", "Differences"]
    names = [row[1] for row in book["Customers"].iter_rows(min_row=2, values_only=True)]
    assert "'=SUM(1,2)有限公司" in names and "=SUM(1,2)有限公司" not in names
    amounts = [row[4] for row in book["Differences"].iter_rows(min_row=2, values_only=True)]
    assert 5000.0 in amounts  # numbers, not text
    assert "<td>=SUM(1,2)有限公司</td>" in (out / "finance-reconcile-2026-10.html").read_text(
        encoding="utf-8"
    )
    bad = runner.invoke(app, ["finance", "reconcile", "--period", "10/2026", *common])
    assert bad.exit_code == 1 and "YYYY-MM" in bad.output

    deal = create_record(core, "opportunity", {"customer": ids["a"], "name": "年度框架采购", "stage": "won",
                                                "amount": Decimal("10000.00"), "closed_on": dt.date(2026, 10, 1)})  # fmt: skip
    from crm_core.models import SalesOrder

    with session_factory(core)() as session, session.begin():
        session.execute(
            sa.update(SalesOrder).where(SalesOrder.order_no == "SO-A1").values(opportunity_id=deal)
        )
    tree = runner.invoke(app, ["finance", "status", "--opportunity", str(deal), *common])
    assert tree.exit_code == 0, tree.output
    # amounts as every table shows them (200,000.00); the status table's totals too
    for text in ("年度框架采购", "order SO-A1", "receivable RA1 10,000.00", "receipt PA1 applied 6,000.00",
                 "receipt PA3 applied 1,000.00", "outstanding 3,000.00"):  # fmt: skip
        assert text in tree.output, tree.output
    totals = runner.invoke(app, ["finance", "status", "--json", *common])
    assert (
        json.loads(totals.stdout)["totals"]["invoiced"] == "21009.00"
    )  # every receivable in the core, USD at its rate
    table = runner.invoke(app, ["finance", "status", *common])
    assert table.exit_code == 0 and "21,009.00" in table.output, table.output
    missing = runner.invoke(app, ["finance", "status", "--opportunity", "999999", *common])
    assert missing.exit_code == 1


# --------------------------------------------------------------------------- the finance target through crmi


@contextmanager
def k3cloud_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, K3Api]]:
    """The finance project of tests/test_k3cloud.py against the local K3Cloud server (stopped on leaving)."""
    from tests.servers.k3cloud import ACCT_ID, PASSWORD, USERNAME, serve
    from tests.test_k3cloud import PROJECT

    with serve(f"sqlite:///{tmp_path / 'k3.sqlite'}") as (url, api):
        for name, value in (("K3_URL", url), ("K3_ACCT_ID", ACCT_ID), ("K3_USERNAME", USERNAME),
                            ("K3_PASSWORD", PASSWORD)):  # fmt: skip
            monkeypatch.setenv(name, value)
        root = tmp_path / "project"
        shutil.copytree(REPO / "examples" / "k3cloud" / "mappings", root / "mappings")
        (root / "project.yaml").write_text(PROJECT, encoding="utf-8")
        yield root, api


def test_crmi_sync_run_target_finance_brings_the_loop_in(
    core: sa.Engine, core_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`crmi sync run --target finance` against the local K3Cloud server; the loop then shows in `crmi finance`."""
    from typer.testing import CliRunner

    from integration.cli import app

    with k3cloud_project(tmp_path, monkeypatch) as (root, api):
        runner = CliRunner()
        common = ["--target", "finance", "--project", str(root), "--core-url", core_url, "--json"]
        assert runner.invoke(app, ["sync", "run", *common]).exit_code == 0  # go-live baseline
        customer = create_record(core, "customer", {"name": "杭州新禾贸易有限公司"})
        deal = create_record(core, "opportunity", {"customer": customer, "name": "年度框架采购", "stage": "won",
                                                    "amount": Decimal("113000.00"), "closed_on": dt.date(2026, 9, 20)})  # fmt: skip
        create_record(core, "sales_order", {"order_no": "SO-2026-0001", "customer": customer, "opportunity": deal,
                                            "order_date": dt.date(2026, 9, 25), "total_amount": Decimal("113000.00")})  # fmt: skip
        out = runner.invoke(app, ["sync", "run", *common, "--direction", "outbound"])
        assert json.loads(out.stdout)["delivered"] == 1, out.output
        with session_factory(core)() as session:
            from crm_core.models import Customer

            number = str(session.get(Customer, customer).erp_code)  # type: ignore[union-attr]
        api.erp.add_receivable("AR-0001", number, [("SO-2026-0001", "113000.00")], due=dt.date(2026, 10, 30))
        api.erp.add_receipt("SK-0001", number, [("AR-0001", "113000.00")], date=dt.date(2026, 10, 28))
        inbound = runner.invoke(app, ["sync", "run", *common, "--direction", "inbound"])
        assert inbound.exit_code == 0, inbound.output
        assert json.loads(inbound.stdout)["rejected"] == 0
    shown = runner.invoke(app, ["finance", "status", "--opportunity", str(deal), "--project", str(root),
                                "--core-url", core_url, "--json"])  # fmt: skip
    found = json.loads(shown.stdout)
    [order] = found["orders"]
    [receivable] = order["receivables"]
    assert receivable["receipts"] == [{"payment_no": "SK-0001", "received_on": "2026-10-28", "applied": "113000.00",
                                       "currency": "CNY"}]  # fmt: skip
    assert found["figures"]["collected"] == "113000.00" and found["figures"]["outstanding"] == "0.00"


def test_an_order_without_a_total_counts_its_lines_and_one_without_any_amount_is_flagged(
    core: sa.Engine, core_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Orders loaded without total_amount (a mapping that never maps it): the finance figures count the sum of
    their lines; an order with neither a total nor an amount on every line is counted and flagged, never taken
    for 0 with no differences; an order whose total and lines disagree is a difference. Through K3Cloud and crmi."""
    from typer.testing import CliRunner

    from integration.cli import app

    runner = CliRunner()
    with k3cloud_project(tmp_path, monkeypatch) as (root, api):
        common = ["--project", str(root), "--core-url", core_url]
        sync = ["sync", "run", "--target", "finance", *common, "--json"]
        assert runner.invoke(app, sync).exit_code == 0  # go-live baseline
        customer = create_record(core, "customer", {"name": "杭州新禾贸易有限公司"})
        deal = create_record(core, "opportunity", {"customer": customer, "name": "年度框架采购", "stage": "won",
                                                    "amount": Decimal("113000.00"), "closed_on": dt.date(2026, 10, 1)})  # fmt: skip
        lines_only, with_total, _bare, part_priced = create_records(core, "sales_order", [
            {"order_no": "SO-LINES", "customer": customer, "opportunity": deal, "order_date": dt.date(2026, 10, 5)},
            {"order_no": "SO-TOTAL", "customer": customer, "order_date": dt.date(2026, 10, 7),
             "total_amount": Decimal("5000.00")},
            {"order_no": "SO-BARE", "customer": customer, "order_date": dt.date(2026, 10, 9)},
            {"order_no": "SO-PART", "customer": customer, "order_date": dt.date(2026, 10, 10)},
        ])  # fmt: skip
        create_records(core, "sales_order_line", [
            {"order": lines_only, "line_no": 1, "amount": Decimal("80000.00")},
            {"order": lines_only, "line_no": 2, "amount": Decimal("33000.00")},
            {"order": with_total, "line_no": 1, "amount": Decimal("4000.00")},  # the total says 5,000
            {"order": part_priced, "line_no": 1, "amount": Decimal("100.00")},
            {"order": part_priced, "line_no": 2},  # no amount: the order's amount is unknown
        ])  # fmt: skip
        out = runner.invoke(app, [*sync, "--direction", "outbound"])
        assert json.loads(out.stdout)["delivered"] == 1, out.output
        with session_factory(core)() as session:
            from crm_core.models import Customer

            number = str(session.get(Customer, customer).erp_code)  # type: ignore[union-attr]
        api.erp.add_receivable("AR-1", number, [("SO-LINES", "113000.00")], date=dt.date(2026, 10, 8),
                               due=dt.date(2026, 11, 30))  # fmt: skip
        api.erp.add_receivable("AR-2", number, [("SO-TOTAL", "5000.00")], date=dt.date(2026, 10, 10),
                               due=dt.date(2026, 11, 30))  # fmt: skip
        api.erp.add_receivable("AR-3", number, [("SO-BARE", "700.00")], date=dt.date(2026, 10, 12),
                               due=dt.date(2026, 11, 30))  # fmt: skip
        api.erp.add_receipt("SK-1", number, [("AR-1", "113000.00"), ("AR-2", "5000.00"), ("AR-3", "700.00")],
                            date=dt.date(2026, 10, 20))  # fmt: skip
        inbound = runner.invoke(app, [*sync, "--direction", "inbound"])
        assert inbound.exit_code == 0 and json.loads(inbound.stdout)["rejected"] == 0, inbound.output

    # one deal's loop: its order counts the sum of its lines
    shown = json.loads(
        runner.invoke(app, ["finance", "status", "--opportunity", str(deal), *common, "--json"]).stdout
    )
    assert shown["figures"]["ordered"] == "113000.00" and shown["figures"]["not_invoiced"] == "0.00"
    [order] = shown["orders"]
    assert (order["total_amount"], order["lines_amount"], order["amount"], order["amount_from"]) == (
        None, "113000.00", "113000.00", "lines")  # fmt: skip
    tree = runner.invoke(app, ["finance", "status", "--opportunity", str(deal), *common])
    assert "order SO-LINES 113,000.00 (the sum of its lines; no total_amount)" in tree.output, tree.output

    # the whole core: ordered counts the lines' sum, the two orders without an amount are counted and said
    status = json.loads(runner.invoke(app, ["finance", "status", *common, "--json"]).stdout)
    assert status["totals"]["ordered"] == "118000.00" and status["totals"]["invoiced"] == "118700.00"
    assert status["documents"]["orders"] == 4 and status["documents"]["orders_without_amount"] == 2
    table = runner.invoke(app, ["finance", "status", *common])
    assert "118,000.00" in table.output
    assert "2 of 4 sales orders have no amount" in " ".join(table.output.split()), table.output

    # the month: the unknown amounts and the total that disagrees with its lines are differences
    report = tmp_path / "reports"
    month = runner.invoke(app, ["finance", "reconcile", "--period", "2026-10", "--out", str(report), *common,
                                "--json"])  # fmt: skip
    assert month.exit_code == 0, month.output
    result = json.loads(month.stdout)
    assert result["totals"]["crm_ordered"] == "118000.00" and result["orders_without_amount"] == 2
    [row] = result["customers"]
    assert (row["crm_ordered"], row["invoiced"], row["received"], row["orders_without_amount"]) == (
        "118000.00", "118700.00", "118700.00", 2)  # fmt: skip
    [difference] = result["differences"]
    assert sorted((r["between"], r["class"], r["amount"]) for r in difference["reasons"]) == [
        ("order/lines", "amount mismatch", "1000.00"),  # SO-TOTAL: 5,000 against lines of 4,000
        ("orders", "amount unknown", None),  # SO-BARE and SO-PART; SO-BARE's 700 invoiced is not a mismatch
    ]
    details = " ".join(r["detail"] for r in difference["reasons"])
    assert "2 orders of the period without an amount" in details and "1 order whose total_amount" in details
    text = runner.invoke(app, ["finance", "reconcile", "--period", "2026-10", "--out", str(report), *common])
    assert text.exit_code == 0, text.output
    flat = " ".join(text.output.split())
    assert "1 of 1 customers differ" in flat and "2 orders of 2026-10 have no amount" in flat, text.output


def test_the_demo_finance_project_loads_without_a_server_and_gets_the_finance_assets(tmp_path: Path) -> None:
    """examples/demo/finance (make finance-demo) is valid with its defaults; `make demo` never reads it."""
    from integration.jobs import build_definitions
    from integration.pipeline import Migration

    migration = Migration.load(str(REPO / "examples" / "demo" / "finance"))
    assert migration.project.sync["finance"].spec.transport.profile == "k3cloud"
    assert sorted(m.name for m in migration.mappings) == [
        "k3_receipt_writeoffs",
        "k3_receipts",
        "k3_receivables",
    ]
    defs = build_definitions(REPO / "examples" / "demo" / "finance", f"sqlite:///{tmp_path / 'core.sqlite'}")
    defs.resolve_job_def("order_to_cash_job")
    demo = Migration.load(str(REPO / "examples" / "demo"))
    assert not [m for m in demo.mappings if m.name.startswith("k3_")]


def test_the_finance_demo_prints_the_commands_that_show_its_deal_and_its_month(
    core_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`make finance-demo` ends with the `crmi finance` commands for the deal and month it made (their ids and
    period change with every run and every day); each of them, as printed, shows that deal and that month."""
    import importlib.util
    import os
    import re
    import shlex

    from typer.testing import CliRunner

    from integration.cli import app

    monkeypatch.setenv("CRM_CORE_URL", core_url)
    for name in ("K3_URL", "K3_ACCT_ID", "K3_USERNAME", "K3_PASSWORD"):
        monkeypatch.delenv(name, raising=False)  # the loop sets them for its server: undone after the test
    spec = importlib.util.spec_from_file_location(
        "finance_loop", REPO / "examples" / "demo" / "finance_loop.py"
    )
    assert spec is not None and spec.loader is not None
    finance_loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(finance_loop)
    assert finance_loop.main(data=tmp_path / "data") == 0
    printed = capsys.readouterr().out
    project = os.path.relpath(REPO / "examples" / "demo" / "finance")
    status = re.search(
        rf"^ *(crmi finance status --opportunity (\d+) -p {re.escape(project)})$", printed, re.M
    )
    month = re.search(
        rf"^ *(crmi finance reconcile --period (\d{{4}}-\d\d) -p {re.escape(project)})$", printed, re.M
    )
    assert status and month, printed
    with session_factory(core_engine(core_url))() as session:
        from crm_core.models import Opportunity, SalesOrder

        deal = session.scalar(sa.select(sa.func.max(Opportunity.id)))
        order_date = session.scalar(sa.select(SalesOrder.order_date).where(SalesOrder.opportunity_id == deal))
    assert (int(status.group(2)), month.group(2)) == (deal, f"{order_date:%Y-%m}")

    runner = CliRunner()
    shown = runner.invoke(app, shlex.split(status.group(1))[1:])
    assert shown.exit_code == 0, shown.output
    assert "order SO-DEMO-" in shown.output and "collected 113,000.00" in shown.output, shown.output
    reconciled = runner.invoke(
        app, [*shlex.split(month.group(1))[1:], "--out", str(tmp_path / "reports"), "--json"]
    )
    assert reconciled.exit_code == 0, reconciled.output
    result = json.loads(reconciled.stdout)
    assert result["totals"]["crm_ordered"] == "113000.00" and result["totals"]["received"] == "113000.00"


def test_the_demo_servers_and_the_steward_workbench_have_distinct_ports_everywhere() -> None:
    """The U8 and K3Cloud test servers of the demo and the steward workbench can run side by side: the demo's
    project files, the servers' documented commands and the workbench's default agree and differ."""
    import re
    from urllib.parse import urlparse

    from integration.pipeline import Migration
    from integration.steward.cli import DEFAULT_PORT as STEWARD_PORT
    from integration.yamlconf import expand_env
    from tests.servers import k3cloud, u8_openapi

    demo = Migration.load(str(REPO / "examples" / "demo")).project
    finance = Migration.load(str(REPO / "examples" / "demo" / "finance")).project
    u8_url = expand_env(demo.sync["u8"].spec.transport.base_url, {})
    k3_urls = {expand_env(finance.sync["finance"].spec.transport.base_url, {}),
               expand_env(finance.spec.sources["k3"].base_url, {})}  # fmt: skip
    assert urlparse(u8_url).port == u8_openapi.DEMO_PORT
    assert {urlparse(url).port for url in k3_urls} == {k3cloud.DEMO_PORT}
    assert len({u8_openapi.DEMO_PORT, k3cloud.DEMO_PORT, STEWARD_PORT}) == 3
    files = [REPO / "README.md", REPO / "Makefile", *sorted((REPO / "docs").glob("*.md")),
             *sorted((REPO / "examples" / "demo").rglob("*.py")), *sorted((REPO / "examples" / "demo").rglob("*.yaml"))]  # fmt: skip
    started: dict[str, set[int]] = {"u8_openapi": set(), "k3cloud": set()}
    for path in files:
        text = " ".join(path.read_text(encoding="utf-8").split())
        for server, port in re.findall(
            r"python -m tests\.servers\.(u8_openapi|k3cloud) [^`]*?--port (\d+)", text
        ):
            started[server].add(int(port))
    assert started == {"u8_openapi": {u8_openapi.DEMO_PORT}, "k3cloud": {k3cloud.DEMO_PORT}}


def test_a_negative_amount_passes_only_when_marked_red_letter() -> None:
    import pandas as pd

    from crm_core.validation import builtin_rules, validate

    frame = pd.DataFrame({"amount": [Decimal("-50.00"), Decimal("-50.00"), Decimal("20.00"), "abc"],
                          "red_letter": [True, False, False, False]})  # fmt: skip
    for entity in ("receivable", "payment", "payment_application"):
        found = validate(entity, frame, [r for r in builtin_rules() if r.name == f"{entity}.amount.range"])
        assert sorted(found["index"]) == [1, 3], entity
        assert "red_letter" in found["reason"].iloc[0]
    unmarked = validate(
        "payment", frame[["amount"]], [r for r in builtin_rules() if r.name == "payment.amount.range"]
    )
    assert sorted(unmarked["index"]) == [0, 1, 3]  # a mapping without red_letter: every negative is rejected
