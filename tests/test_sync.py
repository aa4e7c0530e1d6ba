"""Sync with U8 against the local U8 OpenAPI server over a real database: the loop, failures, conflicts, echoes.

The server writes the U8 tables the inbound mappings read, so what the CRM sends comes back on the next
inbound read and the loop is closed. Nothing of the code under test is replaced.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from crm_core.db import session_factory
from crm_core.edits import create_record, edit_record
from crm_core.errors import ConfigError
from crm_core.models import Customer, ExternalId, LoadRun, Opportunity, SalesOrder, SyncConflict, SyncOutbox
from integration.pipeline import Migration, core_engine
from integration.sync.engine import SyncReport, run_sync, target_of
from integration.sync.outbox import retry_dead
from tests.conftest import REPO
from tests.servers.u8_openapi import U8Api, serve
from tests.servers.u8_project import CUSTOMER, environment, sync_yaml
from tests.servers.u8_project import write_project as write_u8_project

SYNC_YAML = sync_yaml(
    CUSTOMER
    + """      opportunity:
        direction: outbound
        outbound:
          add: saleorder/add
          when: "stage = 'won'"
          key_field: erp_order_no
          fields:
            customercode: {from: customer._key, required: true}
            date: closed_on
            businesstype: {const: 普通销售}
            memo: name
            define1: id
          lines:
            fields:
              rowno: {const: 1}
              inventorycode: {const: CRM-DEAL}
              inventoryname: name
              quantity: {const: 1}
              taxunitprice: amount
              sum: amount
      sales_order:
        direction: inbound
        inbound: [{mapping: erp_u8_orders, cursor: ufts}]
        ownership:
          u8: [status, shipment_status, invoice_status, order_date]
      sales_order_line:
        direction: inbound
        inbound: [{mapping: erp_u8_order_lines, cursor: ufts}]
"""
)
MAPPINGS = ("erp_u8_person", "erp_u8_customers", "erp_u8_orders", "erp_u8_order_lines")


def write_project(root: Path, u8_url: str, sync: str = SYNC_YAML) -> Path:
    """A project with the U8 database as its only source and the sync section."""
    return write_u8_project(root, u8_url, sync, MAPPINGS)


@pytest.fixture
def u8(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[U8Api, Path, str]]:
    """The U8 OpenAPI server over a SQLite U8 database with a salesperson and three customers."""
    with running_u8(tmp_path, monkeypatch) as running:
        yield running


@contextmanager
def running_u8(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sync_section: str = SYNC_YAML
) -> Iterator[tuple[U8Api, Path, str]]:
    """The seeded U8 server and a project with ``sync_section``: (server state, project folder, U8 URL)."""
    url = f"sqlite:///{tmp_path / 'u8.sqlite'}"
    with serve(url) as (base_url, api):
        _environment(monkeypatch, base_url)
        _seed(api)
        yield api, write_project(tmp_path / "project", url, sync_section), url


@pytest.fixture
def core(tmp_path: Path) -> Iterator[sa.Engine]:
    engine = core_engine(f"sqlite:///{tmp_path / 'core.sqlite'}")
    yield engine
    engine.dispose()


def sync(project: Path, engine: sa.Engine, direction: str = "both") -> SyncReport:
    return run_sync(Migration.load(str(project)), engine, "u8", direction)


def u8_rows(url: str, sql: str, **params: Any) -> list[Any]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            return list(connection.execute(sa.text(sql), params))
    finally:
        engine.dispose()


def customer_by_name(engine: sa.Engine, name: str) -> Customer:
    with session_factory(engine)() as session:
        found = session.scalar(sa.select(Customer).where(Customer.name == name))
        assert found is not None, name
        return found


def test_full_loop_customer_out_code_back_order_status_in(u8: Any, core: sa.Engine) -> None:
    """CRM customer → U8 → code into the crosswalk; won deal → U8 order → approved and shipped → CRM."""
    full_loop(*u8, core)


@pytest.mark.postgres
def test_full_loop_on_postgresql(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same loop with the core and the U8 database on PostgreSQL."""
    from tests.conftest import PG_URL, _ensure_database, reset_postgres, server_or_skip

    core_engine_pg = server_or_skip(PG_URL, "PostgreSQL")
    reset_postgres(core_engine_pg)
    core_engine_pg.dispose()
    u8_url = sa.engine.make_url(PG_URL).set(database=f"{sa.engine.make_url(PG_URL).database}_u8")
    u8_text = u8_url.render_as_string(hide_password=False)
    _ensure_database(u8_text)
    u8_engine = sa.create_engine(u8_text)
    reset_postgres(u8_engine)
    engine = core_engine(PG_URL)
    try:
        with serve(u8_engine) as (base_url, api):
            _environment(monkeypatch, base_url)
            _seed(api)
            full_loop(api, write_project(tmp_path / "project", u8_text), u8_text, engine)
    finally:
        engine.dispose()
        u8_engine.dispose()
        from integration.assets.resources import dispose_engines

        dispose_engines()


def _environment(monkeypatch: pytest.MonkeyPatch, base_url: str) -> None:
    for name, value in environment(base_url).items():
        monkeypatch.setenv(name, value)


def _seed(api: U8Api) -> None:
    api.erp.insert_person("P01", "张伟")
    api.erp.insert_customer("C001", "上海华鑫科技有限公司", cCusPPerson="P01", iCusCreLine=100000,
                            cCusPayCond="01", cCusPhone="021-35967116", cCusAddress="上海市浦东新区张江路88号")  # fmt: skip
    api.erp.insert_customer("C002", "北京腾达商贸有限公司", cCusPPerson="P01", iCusCreLine=50000,
                            cCusPayCond="02", cCusPhone="010-62345678", cCusAddress="北京市海淀区中关村大街1号")  # fmt: skip
    api.erp.insert_customer("C003", "深圳卓泰电子有限公司", iCusCreLine=80000, cCusPayCond="03")


def full_loop(api: U8Api, project: Path, url: str, core: sa.Engine) -> None:
    """Run the loop and check each step on both sides."""
    first = sync(project, core, "inbound")
    assert first.entities["customer"]["received"] == 3 and first.entities["customer"]["applied"] == 3
    huaxin = customer_by_name(core, "上海华鑫科技有限公司")
    assert (huaxin.erp_code, huaxin.credit_limit, huaxin.payment_terms) == (
        "C001",
        Decimal("100000.00"),
        "01",
    )

    new_id = create_record(core, "customer", {"name": "杭州新禾贸易有限公司", "phone": "+8657188886666",
                                               "address": "浙江省杭州市西湖区文三路100号"})  # fmt: skip
    out = sync(project, core, "outbound")
    assert (out.delivery.applied, out.delivery.dead_letters) == (1, 0)
    rows = u8_rows(
        url, 'SELECT "cCusCode", "cCusName" FROM "Customer" WHERE "cCusDefine1" = :k', k=str(new_id)
    )
    assert len(rows) == 1 and rows[0][1] == "杭州新禾贸易有限公司"
    code = rows[0][0]
    with session_factory(core)() as session:
        assert session.get(Customer, new_id).erp_code == code  # type: ignore[union-attr]
        link = session.scalar(sa.select(ExternalId).where(ExternalId.entity == "customer",
                                                          ExternalId.system == "erp_u8", ExternalId.external_key == code))  # fmt: skip
        assert link is not None and link.entity_id == new_id and link.match_method == "linked"

    back = sync(project, core, "inbound")  # U8's row for the new customer comes back: the same record
    with session_factory(core)() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Customer)) == 4
    assert back.entities["customer"]["rejected"] == 0
    echo = sync(project, core, "outbound")
    assert echo.delivery.sent == 0 and echo.capture.echoes_suppressed >= 1

    deal = create_record(core, "opportunity", {"customer": new_id, "name": "年度框架采购", "stage": "won",
                                                "amount": Decimal("113000.00"), "closed_on": dt.date(2026, 11, 20)})  # fmt: skip
    create_record(core, "opportunity", {"customer": new_id, "name": "还在谈", "stage": "proposal",
                                        "amount": Decimal("5000.00")})  # fmt: skip
    won = sync(project, core, "outbound")
    assert won.delivery.applied == 1  # only the won deal becomes an order
    orders = u8_rows(url, 'SELECT "cSOCode", "cCusCode" FROM "SO_SOMain" WHERE "cDefine1" = :k', k=str(deal))
    assert len(orders) == 1 and orders[0][1] == code
    order_no = orders[0][0]
    lines = u8_rows(url, 'SELECT "iSum", "cInvCode" FROM "SO_SODetails" WHERE "cSOCode" = :c', c=order_no)
    assert [(float(s), c) for s, c in lines] == [(113000.0, "CRM-DEAL")]
    with session_factory(core)() as session:
        assert session.get(Opportunity, deal).erp_order_no == order_no  # type: ignore[union-attr]

    api.erp.approve_order(order_no, "王会计")
    api.erp.ship(order_no)
    sync(project, core, "inbound")
    with session_factory(core)() as session:
        order = session.scalar(sa.select(SalesOrder).where(SalesOrder.order_no == order_no))
        assert order is not None
        assert (order.status, order.shipment_status, order.invoice_status) == ("approved", "shipped", "none")
        assert (order.opportunity_id, order.customer_id) == (deal, new_id)


def test_conflict_owner_wins_on_both_sides_and_is_logged_once(u8: Any, core: sa.Engine) -> None:
    """Both sides change the CRM-owned phone and the U8-owned credit limit: each owner wins, one entry each."""
    api, project, url = u8
    sync(project, core)
    huaxin = customer_by_name(core, "上海华鑫科技有限公司")
    edit_record(core, "customer", huaxin.id, {"phone": "+862111112222", "credit_limit": Decimal("1.00")})
    api.erp.update_customer("C001", cCusPhone="021-99998888", iCusCreLine=250000)
    sync(project, core)
    with session_factory(core)() as session:
        conflicts = session.scalars(sa.select(SyncConflict).order_by(SyncConflict.field)).all()
        assert [(c.field, c.status) for c in conflicts] == [
            ("credit_limit", "resolved_target"),
            ("phone", "resolved_crm"),
        ]
        current = session.get(Customer, huaxin.id)
        assert current is not None
        assert (current.phone, current.credit_limit) == ("+862111112222", Decimal("250000.00"))
    phone, limit = u8_rows(
        url, 'SELECT "cCusPhone", "iCusCreLine" FROM "Customer" WHERE "cCusCode" = \'C001\''
    )[0]
    assert phone == "+862111112222" and float(limit) == 250000.0  # the owner's value on both sides
    again = sync(project, core)
    assert again.conflicts == 0 and again.delivery.sent == 0  # settled: nothing more goes either way


def test_erp_down_for_a_whole_run_loses_nothing_and_delivers_once(u8: Any, core: sa.Engine) -> None:
    """Every request fails with 503: the changes wait in the outbox; the next run delivers each exactly once."""
    api, project, url = u8
    sync(project, core)
    ids = [create_record(core, "customer", {"name": f"测试客户{i}有限公司"}) for i in range(3)]
    api.faults.extend(["503"] * 20)
    down = sync(project, core, "outbound")
    assert down.delivery.applied == 0 and down.delivery.stopped
    with session_factory(core)() as session:
        statuses = session.scalars(sa.select(SyncOutbox.status).where(SyncOutbox.entity_id.in_(ids))).all()
        assert sorted(statuses) == ["pending"] * 3  # nothing lost, nothing dead
    api.faults.clear()
    up = sync(project, core, "outbound")
    assert up.delivery.applied == 3
    for record_id in ids:
        assert len(u8_rows(url, 'SELECT 1 FROM "Customer" WHERE "cCusDefine1" = :k', k=str(record_id))) == 1
    assert sync(project, core, "outbound").delivery.sent == 0


def test_one_bad_record_of_a_batch_is_a_dead_letter_with_the_erp_message(u8: Any, core: sa.Engine) -> None:
    """U8 rejects one customer of the batch: the others are applied, the bad one waits with U8's reason."""
    api, project, _url = u8
    sync(project, core)
    for name in ("好客户甲有限公司", "坏客户有限公司", "好客户乙有限公司"):
        create_record(core, "customer", {"name": name})
    api.faults.append("reject:name=坏客户有限公司")
    report = sync(project, core, "outbound")
    assert (report.delivery.applied, report.delivery.dead_letters) == (2, 1)
    with session_factory(core)() as session:
        dead = session.scalars(sa.select(SyncOutbox).where(SyncOutbox.status == "dead")).all()
        assert len(dead) == 1 and dead[0].payload["name"] == "坏客户有限公司" and dead[0].last_error
        assert retry_dead(session, "u8") == 1
        session.commit()
    assert sync(project, core, "outbound").delivery.applied == 1  # resent: U8 takes it now


def test_expired_token_mid_run_is_renewed_once_and_nothing_is_lost(u8: Any, core: sa.Engine) -> None:
    api, project, url = u8
    sync(project, core)
    for i in range(3):
        create_record(core, "customer", {"name": f"续期客户{i}有限公司"})
    api.faults.append("expire_token")
    report = sync(project, core, "outbound")
    assert report.delivery.applied == 3 and report.delivery.dead_letters == 0
    assert len(u8_rows(url, 'SELECT 1 FROM "Customer" WHERE "cCusName" LIKE \'续期客户%\'')) == 3


def test_killed_between_send_and_acknowledgement_replays_without_duplicate(
    u8: Any, core: sa.Engine, tmp_path: Path
) -> None:
    """SIGKILL after U8 applied the batch but before the outbox recorded it: the resend is applied once."""
    _api, project, url = u8
    sync(project, core)
    record_id = create_record(core, "customer", {"name": "断电测试有限公司"})
    fifo = tmp_path / "failpoint"
    os.mkfifo(fifo)
    env = {**os.environ, "CRMI_FAILPOINT": "sync:delivered", "CRMI_FAILPOINT_ACTION": f"pause:{fifo}",
           "CRM_CORE_URL": str(core.url.render_as_string(hide_password=False))}  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "integration.cli", "sync", "run", "-d", "outbound", "--project", str(project)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    reached = _wait_for_failpoint(fifo, process)
    assert reached == "sync:delivered", process.stderr.read().decode() if process.stderr else ""
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    if process.stderr is not None:
        process.stderr.close()
    assert len(u8_rows(url, 'SELECT 1 FROM "Customer" WHERE "cCusDefine1" = :k', k=str(record_id))) == 1
    with session_factory(core)() as session:
        row = session.scalar(sa.select(SyncOutbox).where(SyncOutbox.entity_id == record_id))
        assert row is not None and row.status == "pending" and row.trade_id  # sent, not acknowledged
    replay = sync(project, core, "outbound")
    assert replay.delivery.applied == 1
    assert len(u8_rows(url, 'SELECT 1 FROM "Customer" WHERE "cCusDefine1" = :k', k=str(record_id))) == 1
    assert customer_by_name(core, "断电测试有限公司").erp_code is not None


def _wait_for_failpoint(fifo: Path, process: subprocess.Popen[bytes], timeout: float = 60) -> str:
    """Return the failpoint the process announced on the pipe ('' when it exited without reaching it)."""
    import select
    import time

    descriptor = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # our own writer end: select blocks until data
    deadline = time.monotonic() + timeout
    try:
        data = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([descriptor], [], [], 0.2)
            if ready:
                chunk = os.read(descriptor, 1024)
                data += chunk
                if b"\n" in data:
                    return data.decode().strip()
            if process.poll() is not None and not data:
                return ""
        return data.decode().strip()
    finally:
        os.close(descriptor)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("crm: [name, short_name, phone, email, address]", "crm: [name, shortname, phone, email, address]"),
         "entity 'customer' has no field 'shortname'; did you mean 'short_name'"),
        (("u8: [erp_code, credit_limit, payment_terms, credit_code]", "u8: [erp_code, credit_limit, phone]"),
         "field 'phone' is owned twice (crm and u8); give each field one owner"),
        (("            abbrname: short_name", "            abbrname: shortname"),
         "column 'shortname' is not in customer; did you mean 'short_name'"),
        (("    system: erp_u8", "    system: erp_u9"), "unknown source 'erp_u9'"),
        (("        direction: outbound\n", "        direction: sideways\n"), "'sideways' is not allowed"),
        (("when: \"stage = 'won'\"", "when: \"stag = 'won'\""), "column 'stag' is not in opportunity; did you mean 'stage'"),
    ],
)  # fmt: skip
def test_a_bad_sync_spec_is_a_located_error(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    project = write_project(tmp_path / "p", "sqlite:///u8.sqlite", SYNC_YAML.replace(*change))
    os.environ.setdefault("U8_API_URL", "http://127.0.0.1:9")
    for name in ("U8_FROM_ACCOUNT", "U8_TO_ACCOUNT", "U8_APP_KEY", "U8_APP_SECRET"):
        os.environ.setdefault(name, "x")
    with pytest.raises(ConfigError) as raised:
        Migration.load(str(project))
    text = str(raised.value)
    assert message in text, text
    line = text.split("project.yaml:")[1].split(":")[0]
    assert line.isdigit()  # file:line:col


def test_retry_after_is_honoured_and_the_row_waits(u8: Any, core: sa.Engine) -> None:
    """429 with Retry-After on the batch: the change waits at least that long, then goes once."""
    api, project, _url = u8
    sync(project, core)
    record_id = create_record(core, "customer", {"name": "限流测试有限公司"})
    api.faults.extend(["pass", "pass", "429:120"])  # token and trade ids pass; the batch is rate limited
    before = dt.datetime.now(dt.UTC)
    limited = sync(project, core, "outbound")
    assert limited.delivery.applied == 0 and limited.delivery.retries == 1
    with session_factory(core)() as session:
        row = session.scalar(sa.select(SyncOutbox).where(SyncOutbox.entity_id == record_id))
        assert row is not None and row.status == "pending" and row.attempts == 1
        due = (
            row.next_attempt_at if row.next_attempt_at.tzinfo else row.next_attempt_at.replace(tzinfo=dt.UTC)
        )
        assert due >= before + dt.timedelta(seconds=120)
    assert sync(project, core, "outbound").delivery.sent == 0  # not due yet


def test_asynchronous_answers_are_collected_by_the_next_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            core: sa.Engine) -> None:  # fmt: skip
    """U8 accepts writes and applies them later: the row awaits, a later run records the code."""
    url = f"sqlite:///{tmp_path / 'u8.sqlite'}"
    with serve(url, async_mode=True) as (base_url, api):
        _environment(monkeypatch, base_url)
        project = write_project(tmp_path / "project", url)
        sync(project, core)
        api.pause_async()
        record_id = create_record(core, "customer", {"name": "异步测试有限公司"})
        first = sync(project, core, "outbound")
        assert first.delivery.awaiting == 1 and first.delivery.applied == 0
        api.resume_async()
        assert api.drain()
        second = sync(project, core, "outbound")
        assert second.delivery.applied == 1
        assert customer_by_name(core, "异步测试有限公司").erp_code is not None
        rows = u8_rows(url, 'SELECT 1 FROM "Customer" WHERE "cCusDefine1" = :k', k=str(record_id))
        assert len(rows) == 1


def test_bad_erp_rows_are_rejected_with_the_reason_and_the_rest_applied(u8: Any, core: sa.Engine) -> None:
    """An order of an unknown customer and a line with an unreadable amount: rejected; the others load."""
    from tests.servers.u8_openapi import next_values

    _api, project, url = u8
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        stamp = next_values(connection, "ufts", 4)
        connection.execute(sa.text(
            "INSERT INTO SO_SOMain (ID, cSOCode, dDate, cCusCode, iStatus, ufts) VALUES "
            "(901, 'SO901', '2026-11-01', 'C001', 1, :a), (902, 'SO902', '2026-11-02', 'NOPE', 1, :b)"
        ), {"a": stamp, "b": stamp + 1})  # fmt: skip
        connection.execute(sa.text(
            "INSERT INTO SO_SODetails (AutoID, ID, cSOCode, iRowNo, cInvCode, iQuantity, iSum, ufts) VALUES "
            "(9011, 901, 'SO901', 1, 'P1', 2, 200, :a), (9012, 901, 'SO901', 2, 'P2', 1, '12,3x元', :b)"
        ), {"a": stamp + 2, "b": stamp + 3})  # fmt: skip
    engine.dispose()
    report = sync(project, core, "inbound")
    assert report.entities["sales_order"] == {"received": 2, "applied": 1, "unchanged": 0, "rejected": 1}
    assert report.entities["sales_order_line"]["applied"] == 1
    assert report.entities["sales_order_line"]["rejected"] == 1
    with core.connect() as connection:
        reasons = dict(
            connection.execute(sa.text("SELECT row_ref, reason FROM rejects WHERE source = 'erp_u8'")).all()
        )
    assert "NOPE" in reasons["SO902"] and reasons["9012"]


def test_crm_changes_after_go_live_go_out_with_the_first_sync(u8: Any, core: sa.Engine) -> None:
    """The first sync starts from the go-live run: a customer created after it, before the first sync, goes out."""
    from crm_core.loading import get_or_start_run
    from crm_core.models import LoadRun

    _api, project, url = u8
    with session_factory(core)() as session, session.begin():
        run = get_or_start_run(session, "go-live", "synctest", mode="full")
        session.flush()
        session.execute(sa.update(LoadRun).where(LoadRun.id == run.id).values(status="succeeded"))
    record_id = create_record(core, "customer", {"name": "上线后新客户有限公司"})
    first = sync(project, core)
    assert first.delivery.applied == 1
    assert len(u8_rows(url, 'SELECT 1 FROM "Customer" WHERE "cCusDefine1" = :k', k=str(record_id))) == 1


def test_an_inbound_only_run_queues_the_crm_value_it_kept(u8: Any, core: sa.Engine) -> None:
    """U8 changed a CRM-owned field: an inbound-only run keeps the CRM's value and queues it for U8."""
    api, project, url = u8
    sync(project, core)
    huaxin = customer_by_name(core, "上海华鑫科技有限公司")
    api.erp.update_customer("C001", cCusPhone="021-77776666")
    report = sync(project, core, "inbound")
    assert report.kept_crm >= 1 and report.capture.queued == 1
    with session_factory(core)() as session:
        row = session.scalar(sa.select(SyncOutbox).where(SyncOutbox.entity_id == huaxin.id))
        assert row is not None and row.status == "pending" and row.payload["phone"] == huaxin.phone
    sync(project, core, "outbound")
    assert (
        u8_rows(url, 'SELECT "cCusPhone" FROM "Customer" WHERE "cCusCode" = \'C001\'')[0][0] == huaxin.phone
    )


def test_inbound_reads_u8_over_odbc_by_its_cursor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: sa.Engine
) -> None:
    """The U8 source through a real unixODBC driver: the loop closes the same way (out over HTTP, back over ODBC)."""
    with running_u8(tmp_path, monkeypatch) as (_api, project, url):
        text = (project / "project.yaml").read_text(encoding="utf-8")
        odbc = f"DRIVER={{SQLite3}};Database={tmp_path / 'u8.sqlite'}"
        (project / "project.yaml").write_text(
            text.replace(
                f"{{connector: sql, url: '{url}'}}", f"{{connector: odbc, connection_string: '{odbc}'}}"
            ),
            encoding="utf-8",
        )
        first = sync(project, core, "inbound")
        assert first.entities["customer"]["applied"] == 3
        new_id = create_record(core, "customer", {"name": "经由ODBC有限公司"})
        assert sync(project, core, "outbound").delivery.applied == 1
        back = sync(project, core, "inbound")
        assert back.entities["customer"] == {"received": 1, "applied": 1, "unchanged": 0, "rejected": 0}
        with session_factory(core)() as session:
            assert session.scalar(sa.select(sa.func.count()).select_from(Customer)) == 4
            assert session.get(Customer, new_id).erp_code is not None  # type: ignore[union-attr]
        assert sync(project, core, "inbound").received == 0  # the cursor: nothing new


def test_an_add_u8_already_holds_by_our_key_links_instead_of_duplicating(u8: Any, core: sa.Engine) -> None:
    """U8 already has the record under our key (a lost answer): the add links to it, no second customer."""
    api, project, url = u8
    sync(project, core)
    record_id = create_record(core, "customer", {"name": "答复丢失有限公司"})
    api.erp.insert_customer("C777", "答复丢失有限公司", cCusDefine1=str(record_id))
    report = sync(project, core, "outbound")
    assert (report.delivery.applied, report.delivery.dead_letters) == (1, 0)
    assert customer_by_name(core, "答复丢失有限公司").erp_code == "C777"
    assert len(u8_rows(url, 'SELECT 1 FROM "Customer" WHERE "cCusDefine1" = :k', k=str(record_id))) == 1


def test_a_dead_letter_overtaken_by_a_newer_change_is_not_resent(u8: Any, core: sa.Engine) -> None:
    """Resending a dead letter after the record changed again would put old values over new ones."""
    api, project, url = u8
    sync(project, core)
    record_id = create_record(core, "customer", {"name": "旧名字有限公司"})
    api.faults.append("reject:name=旧名字有限公司")
    assert sync(project, core, "outbound").delivery.dead_letters == 1
    edit_record(core, "customer", record_id, {"name": "新名字有限公司"})
    assert sync(project, core, "outbound").delivery.applied == 1
    with session_factory(core)() as session:
        assert retry_dead(session, "u8") == 0
        session.commit()
        statuses = session.scalars(
            sa.select(SyncOutbox.status).where(SyncOutbox.entity_id == record_id).order_by(SyncOutbox.id)
        ).all()
    assert statuses == ["superseded", "done"]
    assert u8_rows(url, 'SELECT "cCusName" FROM "Customer" WHERE "cCusDefine1" = :k', k=str(record_id)) == [
        ("新名字有限公司",)
    ]


@pytest.mark.parametrize(
    "code_field", ["_key", "{from: _key, transforms: [trim]}"], ids=["derived", "mapped-again"]
)
def test_an_added_records_next_document_is_known_so_nothing_is_echoed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: sa.Engine, code_field: str
) -> None:
    """After an add, the hash stored for the record is that of the edit it would be sent as now (with U8's code,
    without what U8 owns), whether derived from the add's document or mapped again; the next run sends nothing."""
    from crm_core.models import SyncState
    from integration.sync.engine import _payload_hashes, target_of

    entities = CUSTOMER.replace("code: _key", f"code: {code_field}").replace(
        "self_define1: id", "self_define1: id\n            regcode: credit_code"
    )
    with running_u8(tmp_path, monkeypatch, sync_yaml(entities)) as (_api, project, _url):
        sync(project, core)
        ids = [create_record(core, "customer", {"name": f"新增客户{n}有限公司", "phone": f"+861380000000{n}",
                                                "credit_code": "91350100M000100Y43"}) for n in range(3)]  # fmt: skip
        first = sync(project, core, "outbound")
        assert first.delivery.applied == 3
        target = target_of(Migration.load(str(project)), "u8")
        with session_factory(core)() as session:
            stored = {s.entity_id: s.payload_hash for s in session.scalars(
                sa.select(SyncState).where(SyncState.entity == "customer", SyncState.entity_id.in_(ids)))}  # fmt: skip
            expected = _payload_hashes(session, target, "customer", ids)
        assert expected is not None and len(expected) == 3
        assert stored == expected
        again = sync(project, core)  # U8's rows for them come back: echoes, nothing is sent
        assert again.received == 3
        assert again.delivery.sent == 0


def test_many_batches_get_their_trade_ids_ahead_and_each_record_goes_out_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: sa.Engine
) -> None:
    """More records than a batch: trade ids are asked for several batches at once, each row keeps its own."""
    with running_u8(tmp_path, monkeypatch, sync_yaml(CUSTOMER, batch_size=7)) as (api, project, url):
        sync(project, core)
        from crm_core.edits import create_records

        ids = create_records(core, "customer", [{"name": f"批量客户{n:03d}有限公司"} for n in range(30)])
        asked_before = sum(1 for r in api.requests if r.path == "/system/tradeid")
        report = sync(project, core, "outbound")
        assert report.delivery.applied == 30
        # five batches of seven, one request for their trade ids
        assert sum(1 for r in api.requests if r.path == "/system/tradeid") - asked_before == 1
        with session_factory(core)() as session:
            trade_ids = session.scalars(
                sa.select(SyncOutbox.trade_id).where(
                    SyncOutbox.entity_id.in_(ids), SyncOutbox.entity == "customer"
                )
            ).all()
        assert len(trade_ids) == 30 and len(set(trade_ids)) == 30 and None not in trade_ids
        issued = u8_rows(url, 'SELECT COUNT(*) FROM "Customer" WHERE "cCusName" LIKE :n', n="批量客户%")
        assert issued[0][0] == 30


@pytest.mark.parametrize("take", ["crm", "target"])
def test_a_queued_conflict_is_settled_by_a_person_as_a_run_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: sa.Engine, take: str
) -> None:
    """`conflicts: queue`: both sides change the phone, the conflict waits; `crmi sync conflicts --decide`
    settles it: the CRM's value goes to U8, or U8's value comes into the CRM, under a run of its own."""
    from typer.testing import CliRunner

    from crm_core.models import LoadRun
    from integration.cli import app

    entities = CUSTOMER.replace("direction: both\n", "direction: both\n        conflicts: queue\n", 1)
    with running_u8(tmp_path, monkeypatch, sync_yaml(entities)) as (api, project, url):
        sync(project, core)
        huaxin = customer_by_name(core, "上海华鑫科技有限公司")
        edit_record(core, "customer", huaxin.id, {"phone": "+862111112222"})
        api.erp.update_customer("C001", cCusPhone="021-99998888")
        waiting = sync(project, core)
        assert waiting.conflicts_open == 1
        assert waiting.capture.held == 1 and waiting.delivery.sent == 0  # nothing decided behind the person
        assert (
            u8_rows(url, 'SELECT "cCusPhone" FROM "Customer" WHERE "cCusCode" = \'C001\'')[0][0]
            == "021-99998888"
        )
        with session_factory(core)() as session:
            conflict = session.scalars(sa.select(SyncConflict).where(SyncConflict.status == "open")).one()
        core_url = core.url.render_as_string(hide_password=False)
        base = ["sync", "conflicts", "--project", str(project), "--core-url", core_url]
        listed = CliRunner().invoke(app, [*base, "--json"])
        assert listed.exit_code == 0 and f'"id": {conflict.id}' in listed.output
        decided = CliRunner().invoke(
            app, [*base, "--decide", str(conflict.id), "--take", take, "--by", "li.na"]
        )
        assert decided.exit_code == 0, decided.output
        nameless = CliRunner().invoke(app, [*base, "--decide", str(conflict.id), "--take", take])
        assert nameless.exit_code == 1 and "--decide needs --by NAME" in nameless.output, nameless.output
        again = CliRunner().invoke(
            app, [*base, "--decide", str(conflict.id), "--take", take, "--by", "li.na"]
        )
        assert again.exit_code == 1 and "is not open" in again.output
        after = sync(project, core)
        assert after.conflicts_open == 0
        with session_factory(core)() as session:
            settled = session.get(SyncConflict, conflict.id)
            assert settled is not None and (settled.status, settled.decided_by) == (
                f"decided_{take}",
                "li.na",
            )
            decision_runs = session.execute(
                sa.select(LoadRun.mode, LoadRun.run_key).where(LoadRun.project == "sync-conflict")
            ).all()
            assert [mode for mode, _ in decision_runs] == ["edit"] and "li.na" in decision_runs[0][1]
            phone = session.get(Customer, huaxin.id).phone  # type: ignore[union-attr]
        u8_phone = u8_rows(url, 'SELECT "cCusPhone" FROM "Customer" WHERE "cCusCode" = \'C001\'')[0][0]
        if take == "crm":
            assert phone == "+862111112222" and u8_phone == "+862111112222"
        else:  # U8's number in the CRM; U8 gets it back as the CRM writes it (with anything else held back)
            assert phone == "+862199998888" and u8_phone in ("021-99998888", "+862199998888")
        quiet = sync(project, core)
        assert quiet.delivery.sent == 0 and quiet.conflicts == 0


def test_a_change_queued_before_its_conflict_opened_is_held_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: sa.Engine
) -> None:
    """The CRM's phone change could not go out (U8 down); U8's user then changes the phone too: the queued
    change is not sent while the conflict waits for a person (it would decide for the CRM)."""
    entities = CUSTOMER.replace("direction: both\n", "direction: both\n        conflicts: queue\n", 1)
    with running_u8(tmp_path, monkeypatch, sync_yaml(entities)) as (api, project, url):
        sync(project, core)
        huaxin = customer_by_name(core, "上海华鑫科技有限公司")
        edit_record(core, "customer", huaxin.id, {"phone": "+862111112222"})
        api.faults.extend(["503"] * 5)
        down = sync(project, core)
        assert down.delivery.applied == 0 and down.capture.queued == 1
        api.faults.clear()
        api.erp.update_customer("C001", cCusPhone="021-99998888")
        held = sync(project, core)
        assert held.conflicts_open == 1 and held.delivery.sent == 0
        phone = 'SELECT "cCusPhone" FROM "Customer" WHERE "cCusCode" = \'C001\''
        assert u8_rows(url, phone)[0][0] == "021-99998888"


def test_a_partial_runs_changes_are_captured(core: sa.Engine) -> None:
    """What assets materialized on their own loaded (a partial run) is committed: a sync sends it like a full run's."""
    from crm_core.loading import get_or_start_run
    from crm_core.runs import PARTIAL
    from integration.sync.outbox import changed_ids

    with session_factory(core)() as session, session.begin():
        run = get_or_start_run(session, "materialized-from-the-ui", "t")
        customer = Customer(name="杭州云栖智能科技有限公司", created_run_id=run.id, updated_run_id=run.id)
        session.add(customer)
        run.status = PARTIAL
        session.flush()
        assert changed_ids(session, "customer", 0, run.id) == [customer.id]


def test_runs_list_shows_a_sync_run_after_it_succeeded(u8: Any, core: sa.Engine) -> None:
    """A sync run's stats hold its report beside the batches: `crmi runs list` (and --json) still lists it."""
    import json

    from typer.testing import CliRunner

    from integration.cli import app

    _api, project, _url = u8
    report = sync(project, core)
    core_url = core.url.render_as_string(hide_password=False)
    listed = CliRunner().invoke(app, ["runs", "list", "--core-url", core_url, "--json"])
    assert listed.exit_code == 0, listed.output
    runs = {r["run_key"]: r for r in (json.loads(line) for line in listed.output.splitlines())}
    assert runs[report.run_key]["mode"] == "sync" and runs[report.run_key]["rows_read"] == report.received
    table = CliRunner().invoke(app, ["runs", "list", "--core-url", core_url], terminal_width=200)
    assert table.exit_code == 0 and "sync" in table.output, table.output
    # instants in tables are named, as the workbench names them (the core keeps UTC)
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", table.output), table.output


def test_sync_run_says_how_to_decide_the_open_conflicts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: sa.Engine
) -> None:
    """Exit 2 with the counts alone left a newcomer guessing: one line names the open conflicts and the command
    that decides them, in the terminal and in --json, also on a later run while they still wait."""
    import json

    from typer.testing import CliRunner

    from integration.cli import app

    entities = CUSTOMER.replace("direction: both\n", "direction: both\n        conflicts: queue\n", 1)
    with running_u8(tmp_path, monkeypatch, sync_yaml(entities)) as (api, project, _url):
        sync(project, core)
        huaxin = customer_by_name(core, "上海华鑫科技有限公司")
        edit_record(core, "customer", huaxin.id, {"phone": "+862111112222"})
        api.erp.update_customer("C001", cCusPhone="021-99998888")
        base = [
            "sync",
            "run",
            "--project",
            str(project),
            "--core-url",
            core.url.render_as_string(hide_password=False),
        ]
        shown = CliRunner().invoke(app, base)
        assert shown.exit_code == 2, shown.output
        assert "1 conflict open: `crmi sync conflicts` to decide" in shown.output
        later = CliRunner().invoke(app, [*base, "--json"])  # nothing new, the conflict still waits
        assert later.exit_code == 2, later.output
        data = json.loads(later.output.strip().splitlines()[-1])
        assert (data["conflicts_open"], data["conflicts_waiting"]) == (0, 1)
        assert data["hint"] == "1 conflict open: `crmi sync conflicts` to decide"


def outbox_rows(engine: sa.Engine, record_id: int) -> list[Any]:
    with session_factory(engine)() as session:
        return list(
            session.execute(
                sa.select(SyncOutbox.id, SyncOutbox.status, SyncOutbox.last_error, SyncOutbox.payload)
                .where(SyncOutbox.entity == "customer", SyncOutbox.entity_id == record_id)
                .order_by(SyncOutbox.id)
            )
        )


def dead_letter_of_a_long_name(u8: Any, core: sa.Engine) -> tuple[int, int]:
    """A new customer U8 rejects (its name too long): (record id, outbox id of the dead letter)."""
    api, project, _url = u8
    sync(project, core)
    record_id = create_record(core, "customer", {"name": "名字太长的客户有限公司"})
    api.faults.append("reject:name=名字太长的客户有限公司")
    assert sync(project, core, "outbound").delivery.dead_letters == 1
    [(dead_id, status, _why, _payload)] = outbox_rows(core, record_id)
    assert status == "dead"
    return record_id, dead_id


def test_a_newer_document_of_the_record_supersedes_its_dead_letter(u8: Any, core: sa.Engine) -> None:
    """The record fixed in the CRM: its new document replaces the dead letter, which no longer waits."""
    _api, project, url = u8
    record_id, dead_id = dead_letter_of_a_long_name(u8, core)
    edit_record(core, "customer", record_id, {"name": "短名有限公司"})
    report = sync(project, core, "outbound")
    assert (report.delivery.applied, report.delivery.dead_letters) == (1, 0)
    [old, new] = outbox_rows(core, record_id)
    assert (old.id, old.status, new.status) == (dead_id, "superseded", "done")
    assert f"superseded by outbox row {new.id}" in old.last_error
    assert u8_rows(url, 'SELECT "cCusName" FROM "Customer" WHERE "cCusDefine1" = :k', k=str(record_id)) == [
        ("短名有限公司",)
    ]


def test_retry_of_a_dead_letter_whose_record_changed_sends_the_record_as_it_is_now(
    u8: Any, core: sa.Engine
) -> None:
    """Fixed in the CRM, then retried before any sync: the retry sends the corrected record, not the stored
    document U8 rejected; a record unchanged since is resent with its trade id (applied once)."""
    _api, project, url = u8
    record_id, dead_id = dead_letter_of_a_long_name(u8, core)
    edit_record(core, "customer", record_id, {"name": "短名有限公司"})
    targets = {"u8": target_of(Migration.load(str(project)), "u8")}
    with session_factory(core)() as session, session.begin():
        assert retry_dead(session, "u8", targets=targets) == 1
    report = sync(project, core, "outbound")
    assert (report.delivery.applied, report.delivery.dead_letters) == (1, 0)
    [old, new] = outbox_rows(core, record_id)
    assert (old.id, old.status, new.status, new.payload["name"]) == (
        dead_id,
        "superseded",
        "done",
        "短名有限公司",
    )
    assert f"superseded by outbox row {new.id}" in old.last_error
    assert u8_rows(url, 'SELECT "cCusName" FROM "Customer" WHERE "cCusDefine1" = :k', k=str(record_id)) == [
        ("短名有限公司",)
    ]


def test_retry_of_an_unchanged_dead_letter_resends_it_with_its_trade_id(u8: Any, core: sa.Engine) -> None:
    _api, project, _url = u8
    record_id, dead_id = dead_letter_of_a_long_name(u8, core)
    with session_factory(core)() as session:
        trade_id = session.get(SyncOutbox, dead_id).trade_id  # type: ignore[union-attr]
    targets = {"u8": target_of(Migration.load(str(project)), "u8")}
    with session_factory(core)() as session, session.begin():
        assert retry_dead(session, "u8", targets=targets) == 1
    assert sync(project, core, "outbound").delivery.applied == 1
    with session_factory(core)() as session:
        row = session.get(SyncOutbox, dead_id)
        assert row is not None and (row.status, row.trade_id) == ("done", trade_id)
    assert len(outbox_rows(core, record_id)) == 1


def test_a_dead_letter_is_discarded_by_a_person_with_a_reason(u8: Any, core: sa.Engine) -> None:
    """`crmi sync discard IDS --by NAME --reason TEXT`: the dead letter stops waiting, who and why recorded."""
    from typer.testing import CliRunner

    from integration.cli import app

    _api, project, _url = u8
    record_id, dead_id = dead_letter_of_a_long_name(u8, core)
    cli = ["--project", str(project), "--core-url", core.url.render_as_string(hide_password=False)]
    refused = CliRunner().invoke(app, ["sync", "discard", str(dead_id), *cli])
    assert refused.exit_code != 0 and "--by" in refused.output
    done = CliRunner().invoke(
        app, ["sync", "discard", str(dead_id), "--by", "王工", "--reason", "corrected by hand in U8", *cli]
    )
    assert done.exit_code == 0, done.output
    assert "1 dead letter(s) discarded" in done.output
    [(row_id, status, why, _payload)] = outbox_rows(core, record_id)
    assert (row_id, status) == (dead_id, "discarded")
    assert why.startswith("discarded by 王工 at ") and "UTC: corrected by hand in U8 (was dead: U8 " in why
    again = CliRunner().invoke(app, ["sync", "discard", str(dead_id), "--by", "王工", *cli])
    assert again.exit_code != 0 and f"outbox row {dead_id} is not a dead letter" in again.output
    status = CliRunner().invoke(app, ["sync", "status", "--json", *cli])
    assert json.loads(status.output)["u8"]["outbox"]["discarded"] == 1
    shown = CliRunner().invoke(app, ["sync", "status", *cli])
    assert "discarded" in shown.output and "王工" in shown.output


def test_a_dead_letter_of_a_change_set_back_is_superseded_with_nothing_to_send(
    u8: Any, core: sa.Engine
) -> None:
    """U8 rejects an edit; the CRM puts the record back as U8 has it: nothing to send, the dead letter ends."""
    api, project, _url = u8
    sync(project, core)
    record = customer_by_name(core, "深圳卓泰电子有限公司")
    edit_record(core, "customer", record.id, {"name": "深圳卓泰电子（集团）有限公司"})
    api.faults.append("reject:name=深圳卓泰电子（集团）有限公司")
    assert sync(project, core, "outbound").delivery.dead_letters == 1
    edit_record(core, "customer", record.id, {"name": "深圳卓泰电子有限公司"})
    assert sync(project, core, "outbound").delivery.sent == 0
    [(_id, status, why, _payload)] = outbox_rows(core, record.id)
    assert status == "superseded" and why.startswith("superseded: u8 holds the record as it is now"), why


NO_OUR_KEY = CUSTOMER.replace("            self_define1: id\n", "")  # U8 is told nothing of the CRM's id


def dead_in_doubt(running: Any, core: sa.Engine, fault: str) -> tuple[int, int]:
    """A new customer whose add dies on transport (no answer, its only try): (record id, dead letter id)."""
    api, project, _url = running
    sync(project, core)
    record_id = create_record(core, "customer", {"name": "应答丢失贸易有限公司", "phone": "+862088001100"})
    api.faults.append(fault)
    report = sync(project, core, "outbound")
    assert report.delivery.dead_letters == 1, report.delivery
    [(dead_id, status, why, _payload)] = outbox_rows(core, record_id)
    assert status == "dead" and "gave up after 1 tries" in why, why
    return record_id, dead_id


def u8_customers_named(url: str, *names: str) -> list[Any]:
    rows = u8_rows(url, 'SELECT "cCusCode", "cCusName", "cCusPhone" FROM "Customer"')
    return [row for row in rows if row[1] in names]


def crm_codes(engine: sa.Engine, record_id: int) -> tuple[str | None, list[str]]:
    """The record's erp_code and its U8 keys in the crosswalk."""
    with session_factory(engine)() as session:
        customer = session.get(Customer, record_id)
        assert customer is not None
        keys = session.scalars(
            sa.select(ExternalId.external_key).where(
                ExternalId.entity == "customer",
                ExternalId.entity_id == record_id,
                ExternalId.system == "erp_u8",
            )
        ).all()
        return customer.erp_code, list(keys)


@pytest.mark.parametrize("section", [CUSTOMER, NO_OUR_KEY], ids=["our-key-in-u8", "no-key-of-ours"])
def test_an_add_u8_applied_without_answering_is_edited_when_a_newer_document_supersedes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: sa.Engine, section: str
) -> None:
    """U8 applied the add but the answer was lost (dead letter in doubt); the record is then edited in the CRM:
    the next run finds U8's customer, links it and sends the edit, instead of a second add."""
    with running_u8(tmp_path, monkeypatch, sync_yaml(section, max_attempts=1)) as running:
        _api, project, url = running
        record_id, dead_id = dead_in_doubt(running, core, "drop")
        [(code, _name, _phone)] = u8_customers_named(url, "应答丢失贸易有限公司")  # U8 took it
        edit_record(
            core, "customer", record_id, {"name": "应答丢失贸易（华南）有限公司", "phone": "+862088001199"}
        )
        report = sync(project, core, "outbound")
        assert (report.delivery.applied, report.delivery.dead_letters) == (1, 0), report.delivery
        assert u8_customers_named(url, "应答丢失贸易有限公司", "应答丢失贸易（华南）有限公司") == [
            (code, "应答丢失贸易（华南）有限公司", "+862088001199")
        ]
        assert crm_codes(core, record_id) == (code, [code])
        [old, new] = outbox_rows(core, record_id)
        assert (old.id, old.status, new.status) == (dead_id, "superseded", "done")
        assert f"superseded by outbox row {new.id}" in old.last_error and code in old.last_error, (
            old.last_error
        )
        assert "code" in new.payload and new.payload["code"] == code  # sent as an edit of U8's customer
        again = sync(project, core)
        assert again.delivery.sent == 0 and again.conflicts_waiting == 0


def test_an_add_u8_never_took_is_added_when_a_newer_document_supersedes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: sa.Engine
) -> None:
    """The connection reset before U8 took the add: U8 holds no such customer, so the record is added as it is
    now, once."""
    with running_u8(tmp_path, monkeypatch, sync_yaml(CUSTOMER, max_attempts=1)) as running:
        _api, project, url = running
        record_id, dead_id = dead_in_doubt(running, core, "reset")
        assert u8_customers_named(url, "应答丢失贸易有限公司") == []
        edit_record(core, "customer", record_id, {"name": "应答丢失贸易（华南）有限公司"})
        report = sync(project, core, "outbound")
        assert (report.delivery.applied, report.delivery.dead_letters) == (1, 0), report.delivery
        [(code, name, _phone)] = u8_customers_named(
            url, "应答丢失贸易有限公司", "应答丢失贸易（华南）有限公司"
        )
        assert name == "应答丢失贸易（华南）有限公司" and crm_codes(core, record_id) == (code, [code])
        [old, new] = outbox_rows(core, record_id)
        assert (old.id, old.status, new.status) == (dead_id, "superseded", "done")
        assert new.payload.get("code") is None  # an add, as before


def test_retry_of_an_add_in_doubt_whose_record_changed_edits_what_u8_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: sa.Engine
) -> None:
    """`crmi sync retry` of a dead letter in doubt, the record fixed in the CRM since: one customer in U8, edited."""
    from typer.testing import CliRunner

    from integration.cli import app

    with running_u8(tmp_path, monkeypatch, sync_yaml(CUSTOMER, max_attempts=1)) as running:
        _api, project, url = running
        record_id, dead_id = dead_in_doubt(running, core, "drop")
        [(code, _name, _phone)] = u8_customers_named(url, "应答丢失贸易有限公司")
        edit_record(core, "customer", record_id, {"name": "应答丢失贸易（华南）有限公司"})
        cli = ["--project", str(project), "--core-url", core.url.render_as_string(hide_password=False)]
        retried = CliRunner().invoke(app, ["sync", "retry", *cli])
        assert retried.exit_code == 0, retried.output
        assert "1 dead letter(s) queued again" in retried.output and "left" not in retried.output
        report = sync(project, core, "outbound")
        assert report.delivery.dead_letters == 0, report.delivery
        assert u8_customers_named(url, "应答丢失贸易有限公司", "应答丢失贸易（华南）有限公司") == [
            (code, "应答丢失贸易（华南）有限公司", "+862088001100")
        ]
        assert crm_codes(core, record_id) == (code, [code])
        [dead, asked, edit] = outbox_rows(core, record_id)  # the retry's row waited for the sync to ask U8
        assert dead.id == dead_id and (dead.status, asked.status, edit.status) == (
            "superseded",
            "superseded",
            "done",
        )
        assert f"superseded by outbox row {edit.id}" in dead.last_error and code in dead.last_error
        assert edit.payload["code"] == code


def test_an_add_still_to_be_resent_is_answered_before_the_records_newer_document_goes_out(
    u8: Any, core: sa.Engine
) -> None:
    """The add's answer was lost, its retry still due; the record is edited meanwhile: the resend (same trade
    id) brings U8's code back and the newer document goes out as an edit of that customer, in the same run."""
    api, project, url = u8
    sync(project, core)
    record_id = create_record(core, "customer", {"name": "应答丢失贸易有限公司"})
    api.faults.append("drop")
    assert sync(project, core, "outbound").delivery.retries == 1
    [(code, _name, _phone)] = u8_customers_named(url, "应答丢失贸易有限公司")
    edit_record(core, "customer", record_id, {"name": "应答丢失贸易（华南）有限公司"})
    report = sync(project, core, "outbound")
    assert (report.delivery.applied, report.delivery.dead_letters) == (2, 0), report.delivery
    assert u8_customers_named(url, "应答丢失贸易有限公司", "应答丢失贸易（华南）有限公司") == [
        (code, "应答丢失贸易（华南）有限公司", None)
    ]
    assert crm_codes(core, record_id) == (code, [code])
    [add, waited, edit] = outbox_rows(core, record_id)
    assert (add.status, waited.status, edit.status) == ("done", "superseded", "done")
    assert waited.last_error == f"waits for outbox row {add.id}, its add sent before, to be answered"
    assert edit.payload["code"] == code


def test_while_u8_cannot_say_whether_it_applied_the_add_the_newer_document_waits_and_the_dead_letter_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: sa.Engine
) -> None:
    """U8 is down when the sync would ask it: nothing is sent (an add might duplicate), the reason is shown, and
    the next sync asks again and sends the edit."""
    with running_u8(tmp_path, monkeypatch, sync_yaml(CUSTOMER, max_attempts=1)) as running:
        api, project, url = running
        record_id, dead_id = dead_in_doubt(running, core, "drop")
        edit_record(core, "customer", record_id, {"name": "应答丢失贸易（华南）有限公司"})
        api.faults.append("503")  # the lookup's first request
        report = sync(project, core, "outbound")
        assert (report.delivery.sent, report.capture.waiting) == (0, 1), report.as_dict()
        [dead, waiting] = outbox_rows(core, record_id)
        assert (dead.id, dead.status, waiting.status) == (dead_id, "dead", "waiting")
        assert waiting.last_error.startswith(f"waits until u8 says whether it applied outbox row {dead_id}")
        assert "HTTP 503" in waiting.last_error, waiting.last_error
        report = sync(project, core, "outbound")
        assert (report.delivery.applied, report.delivery.dead_letters) == (1, 0), report.delivery
        [(code, name, _phone)] = u8_customers_named(
            url, "应答丢失贸易有限公司", "应答丢失贸易（华南）有限公司"
        )
        assert name == "应答丢失贸易（华南）有限公司" and crm_codes(core, record_id) == (code, [code])
        assert [r.status for r in outbox_rows(core, record_id)] == ["superseded", "superseded", "done"]


def settle(core: sa.Engine, project: Path, *args: str) -> Any:
    """`crmi sync settle ARGS` against the test's project and core."""
    from typer.testing import CliRunner

    from integration.cli import app

    cli = ["--project", str(project), "--core-url", core.url.render_as_string(hide_password=False)]
    return CliRunner().invoke(app, ["sync", "settle", *args, *cli])


def crmi_sync(core: sa.Engine, project: Path, *args: str) -> Any:
    """`crmi sync ARGS` against the test's project and core."""
    from typer.testing import CliRunner

    from integration.cli import app

    cli = ["--project", str(project), "--core-url", core.url.render_as_string(hide_password=False)]
    return CliRunner().invoke(app, ["sync", *args, *cli])


def test_an_add_in_doubt_u8_cannot_settle_is_settled_by_hand_as_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: sa.Engine
) -> None:
    """U8 cannot say whether it applied the add; a person who found the customer in U8 says so: the record is
    linked to that code and its current document goes out as an edit, one customer in U8."""
    with running_u8(tmp_path, monkeypatch, sync_yaml(CUSTOMER, max_attempts=1)) as running:
        api, project, url = running
        record_id, dead_id = dead_in_doubt(running, core, "drop")
        [(code, _name, _phone)] = u8_customers_named(url, "应答丢失贸易有限公司")
        edit_record(
            core, "customer", record_id, {"name": "应答丢失贸易（华南）有限公司", "phone": "+862088001199"}
        )
        api.faults.append("503")  # U8 cannot say
        assert sync(project, core, "outbound").capture.waiting == 1
        shown = crmi_sync(core, project, "status")
        assert f"crmi sync settle {dead_id} --applied-as" in shown.output.replace("\n", " "), shown.output
        [other, *_] = [c for (c,) in u8_rows(url, 'SELECT "cCusCode" FROM "Customer"') if c != code]
        taken = settle(core, project, str(dead_id), "--applied-as", other, "--by", "王工")  # another's code
        assert taken.exit_code == 1 and "nothing was settled" in taken.output, taken.output
        assert len(taken.output.strip().splitlines()) == 1 and crm_codes(core, record_id) == (None, [])
        done = settle(core, project, str(dead_id), "--applied-as", code, "--by", "王工")
        assert done.exit_code == 0, done.output
        assert crm_codes(core, record_id) == (code, [code])
        [dead, _waiting, edit] = outbox_rows(core, record_id)
        assert (dead.id, dead.status, edit.status) == (dead_id, "superseded", "pending")
        assert "settled by 王工" in dead.last_error and code in dead.last_error, dead.last_error
        with session_factory(core)() as session:  # a run of its own: what it wrote is journaled to it
            [(run_key, run_status)] = session.execute(
                sa.select(LoadRun.run_key, LoadRun.status).where(LoadRun.project == "sync-settle")
            ).all()
        assert run_status == "succeeded" and "王工" in run_key
        run = crmi_sync(core, project, "run", "--direction", "outbound")
        assert run.exit_code == 0, run.output
        assert u8_customers_named(url, "应答丢失贸易有限公司", "应答丢失贸易（华南）有限公司") == [
            (code, "应答丢失贸易（华南）有限公司", "+862088001199")
        ]
        assert crm_codes(core, record_id) == (code, [code])
        assert outbox_rows(core, record_id)[-1].payload["code"] == code  # an edit of U8's customer
        again = sync(project, core)
        assert again.delivery.sent == 0 and again.conflicts_waiting == 0


def test_an_add_in_doubt_settled_by_hand_as_not_applied_is_added_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: sa.Engine
) -> None:
    """A person found nothing in U8: the record is added as it is now, once; the settle is refused afterwards."""
    with running_u8(tmp_path, monkeypatch, sync_yaml(NO_OUR_KEY, max_attempts=1)) as running:
        _api, project, url = running
        record_id, dead_id = dead_in_doubt(running, core, "reset")
        assert u8_customers_named(url, "应答丢失贸易有限公司") == []
        done = settle(core, project, str(dead_id), "--not-applied", "--by", "王工")
        assert done.exit_code == 0, done.output
        [dead, add] = outbox_rows(core, record_id)
        assert (dead.status, add.status) == ("superseded", "pending")
        assert "settled by 王工" in dead.last_error and "does not hold it" in dead.last_error, dead.last_error
        run = crmi_sync(core, project, "run", "--direction", "outbound")
        assert run.exit_code == 0, run.output
        [(code, _name, _phone)] = u8_customers_named(url, "应答丢失贸易有限公司")
        assert crm_codes(core, record_id) == (code, [code])
        assert add.payload.get("code") is None and [r.status for r in outbox_rows(core, record_id)] == [
            "superseded",
            "done",
        ]
        again = settle(core, project, str(dead_id), "--not-applied", "--by", "王工")
        assert again.exit_code == 1 and f"outbox row {dead_id} is not an add in doubt" in again.output, (
            again.output
        )


def test_settle_refuses_what_it_cannot_settle(u8: Any, core: sa.Engine) -> None:
    """An unknown row, a business rejection (no doubt), both options or neither, no --by: exit 1, one line."""
    _api, project, _url = u8
    record_id, dead_id = dead_letter_of_a_long_name(u8, core)
    row, by = str(dead_id), ("--by", "王工")
    cases = {
        ("99999", "--not-applied", *by): "there is no outbox row 99999",
        (row, "--not-applied", *by): f"outbox row {dead_id} is not an add in doubt",
        (row, "--not-applied", "--applied-as", "X1", *by): "settle needs either --applied-as KEY",
        (row, *by): "settle needs either --applied-as KEY",
        (row, "--not-applied"): "--by NAME",
    }
    for args, said in cases.items():
        refused = settle(core, project, *args)
        assert refused.exit_code == 1 and said in refused.output, (args, refused.output)
        assert len(refused.output.strip().splitlines()) == 1, refused.output
    [(_id, status, why, _payload)] = outbox_rows(core, record_id)
    assert status == "dead" and "settled" not in why
