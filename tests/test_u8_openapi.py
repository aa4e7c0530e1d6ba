"""The U8 OpenAPI client against the real test server (tests/servers/u8_openapi.py) over SQLite and PostgreSQL."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from integration.connectors.u8_openapi import U8ApiError, U8Client, U8Credentials
from integration.sync.transport import Delivery, Outcome
from tests.conftest import PG_URL, REPO, reset_postgres, server_or_skip
from tests.servers.u8_openapi import (
    APP_KEY,
    CUSTOMER,
    FROM_ACCOUNT,
    SO_DETAILS,
    SO_MAIN,
    TO_ACCOUNT,
    U8_TABLES,
    ErpUser,
    U8Api,
    ensure_schema,
    serve,
)

SECRET = "PLANTED-u8-secret-7f3a9c"  # recognisable: it must never show up in messages, logs or reprs


def credentials(url: str, secret: str = SECRET) -> U8Credentials:
    return U8Credentials(url, FROM_ACCOUNT, TO_ACCOUNT, APP_KEY, secret, ds_sequence=1)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def u8_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty U8 database: a SQLite file, or the PostgreSQL test database wiped clean."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'u8.sqlite'}"
        return
    engine = server_or_skip(PG_URL, "PostgreSQL")
    reset_postgres(engine)
    engine.dispose()
    yield PG_URL


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'u8.sqlite'}"


@pytest.fixture
def u8(sqlite_url: str) -> Iterator[tuple[str, U8Api]]:
    with serve(sqlite_url, app_secret=SECRET) as running:
        yield running


@pytest.fixture
def client(u8: tuple[str, U8Api]) -> Iterator[U8Client]:
    with U8Client(credentials(u8[0]), timeout=5.0) as made:
        yield made


def customer_adds(client: U8Client, *documents: dict[str, Any]) -> list[Delivery]:
    ids = client.new_trade_ids(len(documents))
    return [Delivery(t, "customer/add", d) for t, d in zip(ids, documents, strict=True)]


def table(api: U8Api, query: sa.Select[Any]) -> list[dict[str, Any]]:
    with api.engine.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]


def tuples(api: U8Api, query: sa.Select[Any]) -> list[tuple[Any, ...]]:
    with api.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(query)]


def customers(api: U8Api) -> dict[str, dict[str, Any]]:
    return {r["cCusCode"]: r for r in table(api, sa.select(CUSTOMER))}


def paths(api: U8Api, since: int = 0) -> list[str]:
    return [f"{r.path} {r.errcode}" for r in api.requests[since:]]


# --------------------------------------------------------------------------- round trips, SQLite and PostgreSQL


def test_add_edit_and_order_round_trip_lands_in_the_u8_tables(u8_url: str) -> None:
    with serve(u8_url, app_secret=SECRET) as (url, api), U8Client(credentials(url)) as client:
        api.erp.insert_person("0301", "王芳", "03")
        [added] = client.deliver(customer_adds(client, {
            "name": "深圳市腾达科技有限公司", "abbrname": "腾达科技", "phone": "0755-86001234",
            "self_define1": "crm:c-1", "iCusCreLine": 200000, "cCusPayCond": "30", "spec_operator": "0301",
            "regcode": "91440300MA5EXAMPLE",
        }))  # fmt: skip
        assert added.status == "applied" and added.external_key and added.message is None
        code = added.external_key
        row = customers(api)[code]
        assert (row["cCusName"], row["cCusAbbName"], row["cCusDefine1"], row["iCusCreLine"], row["cCusPayCond"]) == (
            "深圳市腾达科技有限公司", "腾达科技", "crm:c-1", 200000.0, "30")  # fmt: skip

        edit, order = client.new_trade_ids(2)
        [edited] = client.deliver([Delivery(edit, "customer/edit", {"code": code, "phone": "0755-86009999"})])
        assert (edited.status, edited.external_key) == ("applied", code)
        assert customers(api)[code]["cCusPhone"] == "0755-86009999"
        assert customers(api)[code]["cCusName"] == "深圳市腾达科技有限公司"  # only the given fields change

        document = {"customercode": code, "personcode": "0301", "define1": "crm:opp-7", "date": "2025-11-20",
                    "entry": [{"inventorycode": "P-100", "inventoryname": "工业网关", "quantity": 2, "taxunitprice": 113.0},
                              {"inventorycode": "P-200", "quantity": 1, "unitprice": 50.0, "taxrate": 6}]}  # fmt: skip
        [placed] = client.deliver([Delivery(order, "saleorder/add", document)])
        assert placed.status == "applied" and placed.external_key
        [head] = table(api, sa.select(SO_MAIN).where(SO_MAIN.c.cSOCode == placed.external_key))
        assert (head["cCusCode"], head["cDefine1"], head["iStatus"], head["cPersonCode"]) == (
            code,
            "crm:opp-7",
            0,
            "0301",
        )
        lines = table(
            api, sa.select(SO_DETAILS).where(SO_DETAILS.c["ID"] == head["ID"]).order_by(SO_DETAILS.c.iRowNo)
        )
        assert [(r["iRowNo"], r["cInvCode"], r["iQuantity"], r["iSum"], r["iMoney"], r["iFHQuantity"]) for r in lines] == [
            (1, "P-100", 2.0, 226.0, 200.0, 0.0), (2, "P-200", 1.0, 53.0, 50.0, 0.0)]  # fmt: skip

        by_code = client.find_customer(code=code)
        assert (
            by_code is not None
            and by_code["name"] == "深圳市腾达科技有限公司"
            and by_code["self_define1"] == "crm:c-1"
        )
        assert (
            by_code["regcode"] == "91440300MA5EXAMPLE"
            and by_code["icuscreline"] == 200000.0
            and by_code["timestamp"] == customers(api)[code]["ufts"]
        )
        by_key = client.find_customer(crm_key="crm:c-1")
        assert by_key is not None and by_key["code"] == code
        assert (
            client.find_customer(code="NO-SUCH") is None
            and client.find_customer(crm_key="crm:nobody") is None
        )


def test_ufts_is_a_cursor_over_server_writes_and_erp_user_changes(u8_url: str) -> None:
    with serve(u8_url, app_secret=SECRET) as (url, api), U8Client(credentials(url)) as client:
        first = client.deliver(customer_adds(client, {"name": "甲公司"}, {"name": "乙公司"}))
        [order] = client.deliver([Delivery(client.new_trade_ids(1)[0], "saleorder/add", {
            "customercode": first[0].external_key, "entry": [{"inventorycode": "A", "quantity": 3}, {"inventorycode": "B", "quantity": 1}]})])  # fmt: skip
        so_code, customer_a, customer_b = order.external_key, first[0].external_key, first[1].external_key
        assert so_code and customer_a and customer_b

        def stamps() -> dict[tuple[str, Any], int]:
            found = {}
            for t in (CUSTOMER, SO_MAIN, SO_DETAILS):
                key = next(iter(t.primary_key.columns))
                found.update({(t.name, r[0]): r[1] for r in tuples(api, sa.select(key, t.c.ufts))})
            return found

        def changed_since(cursor: int) -> set[tuple[str, Any]]:
            found = set()
            for t in (CUSTOMER, SO_MAIN, SO_DETAILS):
                key = next(iter(t.primary_key.columns))
                found |= {(t.name, r[0]) for r in tuples(api, sa.select(key).where(t.c.ufts > cursor))}
            return found

        before = stamps()
        assert len(set(before.values())) == len(
            before
        )  # one database-wide counter: no two rows share a stamp
        cursor = max(before.values())
        steps: list[tuple[Callable[[], object], set[tuple[str, Any]]]] = [
            (lambda: api.erp.approve_order(so_code, "李审核"), {("SO_SOMain", 1)}),
            (lambda: api.erp.ship(so_code, {1: 2}), {("SO_SODetails", 1)}),
            (lambda: api.erp.invoice(so_code), {("SO_SODetails", 1), ("SO_SODetails", 2)}),
            (lambda: api.erp.close_order(so_code), {("SO_SOMain", 1)}),
            (lambda: api.erp.update_customer(customer_b, iCusCreLine=50000, cCusPayCond="60"), {("Customer", customer_b)}),
            (lambda: api.erp.insert_customer("U8-900", "丙公司", cCusPhone="010-1"), {("Customer", "U8-900")}),
            (lambda: client.deliver([Delivery(client.new_trade_ids(1)[0], "customer/edit", {"code": customer_a, "memo": "改"})]),
             {("Customer", customer_a)}),
        ]  # fmt: skip
        for step, expected in steps:
            step()
            assert changed_since(cursor) == expected
            now = stamps()
            assert all(now[k] > cursor for k in expected) and all(
                now[k] == before[k] for k in before if k not in expected
            )
            before, cursor = now, max(now.values())

        [line1, line2] = table(api, sa.select(SO_DETAILS).order_by(SO_DETAILS.c.iRowNo))
        [head] = table(api, sa.select(SO_MAIN))
        assert (head["iStatus"], head["cVerifier"]) == (2, "李审核")
        assert (line1["iFHQuantity"], line1["iKPQuantity"], line2["iFHQuantity"], line2["iKPQuantity"]) == (
            2.0,
            3.0,
            0.0,
            1.0,
        )
        assert (
            customers(api)[customer_b]["iCusCreLine"] == 50000.0
            and customers(api)[customer_b]["dModifyDate"] is not None
        )


def test_a_replayed_trade_id_is_applied_once_even_after_a_restart(u8_url: str) -> None:
    with serve(u8_url, app_secret=SECRET) as (url, api), U8Client(credentials(url)) as client:
        deliveries = customer_adds(client, {"name": "重放公司", "self_define1": "crm:r-1"})
        [first] = client.deliver(deliveries)
        [again] = client.deliver(deliveries)
        assert first.status == again.status == "applied" and first.external_key == again.external_key
    with serve(u8_url, app_secret=SECRET) as (url, api), U8Client(credentials(url)) as client:
        changed = [Delivery(deliveries[0].trade_id, "customer/add", {"name": "改过的名字"})]
        [after_restart] = client.deliver(changed)
        assert (after_restart.status, after_restart.external_key) == ("applied", first.external_key)
        assert [r["cCusName"] for r in customers(api).values()] == [
            "重放公司"
        ]  # the original result, not the new body


# --------------------------------------------------------------------------- business rejections


def test_duplicates_and_unknown_customers_are_rejected_with_the_erp_message(
    client: U8Client, u8: tuple[str, U8Api]
) -> None:
    api = u8[1]
    [created] = client.deliver(
        customer_adds(client, {"code": "C001", "name": "原公司", "self_define1": "crm:1"})
    )
    assert created.external_key == "C001"
    outcomes = client.deliver(
        customer_adds(
            client, {"code": "C001", "name": "重号公司"}, {"name": "同键公司", "self_define1": "crm:1"}
        )
    )
    assert [o.status for o in outcomes] == ["rejected", "applied"]
    assert outcomes[0].message == "U8 20001: 客户编码 C001 已存在 (customer code already exists)"
    # U8 refuses a second customer with our key (20002); the customer holding it is the one we added
    # before (its answer was lost): the client answers with it instead of a rejection.
    assert outcomes[1].external_key == "C001" and "self_define1" in (outcomes[1].message or "")
    assert [r.path for r in api.requests].count("/api/customer/batch_get") + [
        r.path for r in api.requests
    ].count("/api/customer/get") >= 1
    [order] = client.deliver(
        [
            Delivery(
                client.new_trade_ids(1)[0],
                "saleorder/add",
                {"customercode": "NOPE", "entry": [{"inventorycode": "A"}]},
            )
        ]
    )
    assert order.status == "rejected" and order.message is not None and "客户 NOPE 不存在" in order.message
    [bad] = client.deliver([Delivery("made-up-id", "customer/add", {"name": "X"})])
    assert bad.status == "rejected" and bad.message is not None and "new_trade_ids" in bad.message
    assert list(customers(api)) == ["C001"] and table(api, sa.select(SO_MAIN)) == []


def test_an_edit_with_an_old_timestamp_is_rejected(client: U8Client, u8: tuple[str, U8Api]) -> None:
    api = u8[1]
    [created] = client.deliver(customer_adds(client, {"name": "乐观锁公司"}))
    code = created.external_key
    assert code
    seen = client.find_customer(code=code)
    assert seen is not None
    api.erp.update_customer(code, cCusPhone="021-1")  # a U8 user edits meanwhile
    [stale] = client.deliver([Delivery(client.new_trade_ids(1)[0], "customer/edit",
                                       {"code": code, "timestamp": seen["timestamp"], "phone": "021-2"})])  # fmt: skip
    assert stale.status == "rejected" and stale.message is not None and "20008" in stale.message
    assert customers(api)[code]["cCusPhone"] == "021-1"


def test_one_rejected_record_of_a_batch_leaves_the_others_applied(
    client: U8Client, u8: tuple[str, U8Api]
) -> None:
    api = u8[1]
    api.erp.insert_customer("00003", "U8 里已有")
    deliveries = customer_adds(client, *({"name": f"公司{n}", "self_define1": f"crm:{n}"} for n in range(5)),
                               {"code": "00003", "name": "重号"}, {"name": "", "self_define1": "crm:empty"})  # fmt: skip
    api.faults.append("reject:self_define1=crm:2")
    outcomes = client.deliver(deliveries)
    assert [o.status for o in outcomes] == [
        "applied",
        "applied",
        "rejected",
        "applied",
        "applied",
        "rejected",
        "rejected",
    ]
    assert outcomes[2].message is not None and "self_define1=crm:2" in outcomes[2].message
    assert outcomes[6].message is not None and "20005" in outcomes[6].message
    written = {r["cCusDefine1"]: code for code, r in customers(api).items()}
    assert {f"crm:{n}" for n in (0, 1, 3, 4)} <= set(written) and "crm:2" not in written
    assert "00003" not in {o.external_key for o in outcomes}  # the assigned codes skip the one a U8 user took
    [batch] = [r for r in api.requests if r.path == "/api/customer/batch_add"]
    assert batch.tradeids == tuple(d.trade_id for d in deliveries)

    again = client.deliver(deliveries)  # a rejected trade id is judged afresh; applied ones answer as before
    assert [o.status for o in again] == ["applied"] * 5 + ["rejected", "rejected"]
    assert [o.external_key for o in again[:2]] == [o.external_key for o in outcomes[:2]]
    assert len(customers(api)) == 1 + 5


# --------------------------------------------------------------------------- transport faults


def test_500_and_503_are_retries_and_503_holds_back_the_rest(u8: tuple[str, U8Api]) -> None:
    url, api = u8
    with U8Client(credentials(url), max_batch=2) as client:
        deliveries = customer_adds(client, *({"name": f"公司{n}"} for n in range(4)))
        api.faults.append("500")
        outcomes = client.deliver(deliveries)
        assert [o.status for o in outcomes] == ["retry", "retry", "applied", "applied"]
        assert (
            outcomes[0].message == "HTTP 500 from U8 OpenAPI (/api/customer/batch_add)"
            and outcomes[0].retry_after is None
        )
        since = len(api.requests)
        api.faults.append("503")
        outcomes = client.deliver(deliveries)
        assert [o.status for o in outcomes] == ["retry"] * 4
        assert paths(api, since) == ["/api/customer/batch_add 503"]  # the second batch waited
        outcomes = client.deliver(deliveries)
        assert [o.status for o in outcomes] == ["applied"] * 4 and len(customers(api)) == 4


def test_429_is_a_retry_with_the_servers_retry_after(client: U8Client, u8: tuple[str, U8Api]) -> None:
    deliveries = customer_adds(client, {"name": "限流公司"})
    u8[1].faults.append("429:7")
    [outcome] = client.deliver(deliveries)
    assert (outcome.status, outcome.retry_after) == ("retry", 7.0)
    assert customers(u8[1]) == {}


def test_a_timed_out_write_resent_with_its_trade_id_is_applied_once(u8: tuple[str, U8Api]) -> None:
    url, api = u8
    with U8Client(credentials(url), timeout=0.3) as client:
        deliveries = customer_adds(client, {"name": "超时公司"}, {"name": "超时二号"})
        api.faults.append("timeout")
        outcomes = client.deliver(deliveries)
        assert [o.status for o in outcomes] == ["retry", "retry"]
        assert outcomes[0].message is not None and "same trade id" in outcomes[0].message
        api.release()
        again = client.deliver(deliveries)
        assert [o.status for o in again] == ["applied", "applied"]
        assert sorted(r["cCusName"] for r in customers(api).values()) == ["超时二号", "超时公司"]


@pytest.mark.parametrize(("fault", "applied"), [("drop", True), ("reset", False)])
def test_a_write_whose_connection_is_lost_is_a_retry_applied_or_not(
    client: U8Client, u8: tuple[str, U8Api], fault: str, applied: bool
) -> None:
    """``drop``: U8 applied the add and the answer never came; ``reset``: it never took it. The client cannot
    tell them apart (both ``retry``); the faults wait for the write, not the token or trade id requests."""
    api = u8[1]
    api.faults.append(fault)
    deliveries = customer_adds(client, {"name": "断线公司"})
    [outcome] = client.deliver(deliveries)
    assert outcome.status == "retry" and outcome.message and "unreachable" in outcome.message
    assert len(customers(api)) == (1 if applied else 0)
    [again] = client.deliver(deliveries)  # the same trade id: applied once either way
    assert again.status == "applied" and len(customers(api)) == 1


def test_an_expired_token_is_renewed_once_and_the_write_resent(
    u8: tuple[str, U8Api], client: U8Client
) -> None:
    api = u8[1]
    deliveries = customer_adds(client, {"name": "续期公司"})
    since = len(api.requests)
    api.faults.append("expire_token")
    [outcome] = client.deliver(deliveries)
    assert outcome.status == "applied" and len(customers(api)) == 1
    assert paths(api, since) == ["/api/customer/add 40014", "/system/token 0", "/api/customer/add 0"]

    deliveries = customer_adds(client, {"name": "再续期"})
    since = len(api.requests)
    api.faults.extend(["expire_token"] * 3)  # the write, the renewal and the resend all meet a revoked token
    [refused] = client.deliver(deliveries)
    assert (
        refused.status == "retry"
        and refused.message is not None
        and "freshly issued token" in refused.message
    )
    assert paths(api, since) == ["/api/customer/add 40014", "/system/token 0", "/api/customer/add 40014"]


def test_a_token_past_its_lifetime_is_renewed(sqlite_url: str) -> None:
    now = [1_000_000.0]
    running = serve(sqlite_url, app_secret=SECRET, token_ttl=3600, clock=lambda: now[0])
    with running as (url, api), U8Client(credentials(url)) as client:
        deliveries = customer_adds(client, {"name": "过期公司"})
        now[0] += 3601
        since = len(api.requests)
        [outcome] = client.deliver(deliveries)
        assert outcome.status == "applied"
        assert paths(api, since) == ["/api/customer/add 42001", "/system/token 0", "/api/customer/add 0"]


def test_the_client_renews_a_token_before_it_lapses(
    u8: tuple[str, U8Api], client: U8Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = u8[1]
    deliveries = customer_adds(client, {"name": "提前续期"})  # token lives 7200 s; renewed 60 s before
    later = time.monotonic() + 7200 - 30
    monkeypatch.setattr(client, "_clock", lambda: later)
    since = len(api.requests)
    [outcome] = client.deliver(deliveries)
    assert outcome.status == "applied" and paths(api, since) == ["/system/token 0", "/api/customer/add 0"]


def test_an_unreachable_u8_gives_retries_and_transient_errors() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with U8Client(credentials(f"http://127.0.0.1:{port}"), timeout=2.0) as client:
        outcomes = client.deliver(
            [Delivery("t-1", "customer/add", {"name": "A"}), Delivery("t-2", "saleorder/add", {})]
        )
        assert [o.status for o in outcomes] == ["retry", "retry"]
        assert outcomes[0].message is not None and "unreachable" in outcomes[0].message
        with pytest.raises(U8ApiError) as raised:
            client.new_trade_ids(1)
        assert raised.value.transient and SECRET not in str(raised.value)


def test_wrong_credentials_raise_an_actionable_error(u8: tuple[str, U8Api]) -> None:
    with U8Client(credentials(u8[0], secret="PLANTED-wrong-secret"), timeout=2.0) as client:
        with pytest.raises(U8ApiError, match="check from_account, to_account, app_key, app_secret") as raised:
            client.deliver([Delivery("t-1", "customer/add", {"name": "A"})])
        assert not raised.value.transient and "PLANTED-wrong-secret" not in str(raised.value)
    wrong_account = U8Credentials(u8[0], FROM_ACCOUNT, "other_u8", APP_KEY, SECRET)
    with U8Client(wrong_account) as client, pytest.raises(U8ApiError, match="40003"):
        client.deliver(customer_adds(client, {"name": "A"}))


def test_faults_can_be_queued_over_http(u8: tuple[str, U8Api], client: U8Client) -> None:
    url = u8[0]
    deliveries = customer_adds(client, {"name": "控制端"})
    requests.post(f"{url}/_test/faults", json={"faults": ["503"]}, timeout=5).close()
    assert [o.status for o in client.deliver(deliveries)] == ["retry"]
    assert [o.status for o in client.deliver(deliveries)] == ["applied"]


# --------------------------------------------------------------------------- batching, async mode, throughput


def test_without_batch_endpoints_the_client_falls_back_to_single_writes(sqlite_url: str) -> None:
    with (
        serve(sqlite_url, app_secret=SECRET, batch_endpoints=False) as (url, api),
        U8Client(credentials(url)) as client,
    ):
        since = len(api.requests)
        outcomes = client.deliver(customer_adds(client, {"name": "一"}, {"name": "二"}))
        outcomes += client.deliver(customer_adds(client, {"name": "三"}, {"name": "四"}))
        assert [o.status for o in outcomes] == ["applied"] * 4
        writes = [p for p in paths(api, since) if p.startswith("/api/")]
        assert writes == ["/api/customer/batch_add 40400"] + ["/api/customer/add 0"] * 4  # learnt once
    with (
        serve(sqlite_url, app_secret=SECRET) as (url, api),
        U8Client(credentials(url), max_batch=1) as client,
    ):
        since = len(api.requests)
        client.deliver(customer_adds(client, {"name": "五"}, {"name": "六"}))
        assert [p for p in paths(api, since) if p.startswith("/api/")] == ["/api/customer/add 0"] * 2


def test_async_mode_answers_pending_and_results_tell_the_outcome(sqlite_url: str) -> None:
    with (
        serve(sqlite_url, app_secret=SECRET, async_mode=True) as (url, api),
        U8Client(credentials(url)) as client,
    ):
        api.pause_async()
        deliveries = customer_adds(
            client, {"name": "异步一", "self_define1": "crm:a1"}, {"name": "异步二"}, {"name": ""}
        )
        [never_sent] = client.new_trade_ids(1)
        outcomes = client.deliver(deliveries)
        assert [o.status for o in outcomes] == ["pending"] * 3 and customers(api) == {}
        assert [o.status for o in client.deliver(deliveries)] == [
            "pending"
        ] * 3  # a resend is not queued twice
        assert [o.status for o in client.results([d.trade_id for d in deliveries])] == ["pending"] * 3
        api.resume_async()
        assert api.drain(timeout=10)
        results = client.results([*(d.trade_id for d in deliveries), never_sent, "not-a-trade-id"])
        assert [o.status for o in results] == ["applied", "applied", "rejected", "retry", "rejected"]
        assert {results[0].external_key, results[1].external_key} == set(customers(api))
        assert results[2].message is not None and "20005" in results[2].message
        [replayed] = client.deliver(deliveries[:1])
        assert (replayed.status, replayed.external_key) == ("applied", results[0].external_key)


def test_a_batch_of_records_is_sent_per_request(u8: tuple[str, U8Api], client: U8Client) -> None:
    """2,000 adds go in 20 batch requests (speed is measured in `make bench-sync`, not asserted here)."""
    deliveries = customer_adds(
        client,
        *({"name": f"批量公司{n:05d}", "self_define1": f"crm:b{n}", "iCusCreLine": n} for n in range(2000)),
    )
    outcomes = client.deliver(deliveries)
    assert [o.status for o in outcomes] == ["applied"] * 2000 and len(customers(u8[1])) == 2000
    assert sum(1 for r in u8[1].requests if r.path == "/api/customer/batch_add") == 20


# --------------------------------------------------------------------------- secrets, schema, command line


def test_the_app_secret_and_tokens_never_show(
    u8: tuple[str, U8Api], caplog: pytest.LogCaptureFixture
) -> None:
    url, api = u8
    issued: list[str] = []
    issue = api.issue_token

    def recording() -> tuple[str, float]:
        token = issue()
        issued.append(token[0])
        return token

    api.issue_token = recording  # type: ignore[method-assign]
    caplog.set_level(logging.DEBUG)
    # urllib3's own level too: importing dagster-k8s (the deploy tests) sets the "urllib3" logger to WARNING
    caplog.set_level(logging.DEBUG, logger="urllib3")
    seen: list[str] = []
    with U8Client(credentials(url), timeout=0.3) as client:
        seen += [repr(client), repr(client.credentials)]
        deliveries = customer_adds(client, {"name": "密钥公司"})
        for fault in ("500", "429:1", "timeout", "expire_token", None):
            if fault:
                api.faults.append(fault)
            seen += [str(o) for o in client.deliver(deliveries)]
            api.release()
        seen += [str(o) for o in client.deliver([Delivery("forged", "customer/add", {"name": "伪造"})])]
        seen += [str(o) for o in client.results([deliveries[0].trade_id, "forged"])]
    with U8Client(credentials(url, secret=SECRET + "-wrong")) as wrong, pytest.raises(U8ApiError) as raised:
        wrong.new_trade_ids(1)
    seen += [str(raised.value), repr(raised.value), str(api.requests), caplog.text]
    assert issued and "app_secret=***" in caplog.text  # urllib3 logged the URLs, masked
    text = "\n".join(seen)
    assert "U8 40004" in text and "HTTP 429" in text
    for secret in [SECRET, *issued]:
        assert secret not in text


def test_ensure_schema_upgrades_the_demo_database(tmp_path: Path, generator: ModuleType) -> None:
    paths_ = generator.generate(tmp_path / "demo", scale=0.1)
    url = f"sqlite:///{paths_['erp_u8']}"
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        before = {
            t.name: conn.execute(sa.text(f'SELECT COUNT(*) FROM "{t.name}"')).scalar_one() for t in U8_TABLES
        }
        some_code = conn.execute(sa.text('SELECT MIN("cCusCode") FROM "Customer"')).scalar_one()
    ensure_schema(engine)
    ensure_schema(engine)  # a second run changes nothing
    with engine.connect() as conn:
        columns = {c["name"] for c in sa.inspect(conn).get_columns("SO_SODetails")}
        assert {"iFHQuantity", "iKPQuantity", "ufts", "dModifyDate"} <= columns
        stamps = [
            s for t in U8_TABLES for s in conn.execute(sa.text(f'SELECT ufts FROM "{t.name}"')).scalars()
        ]
        after = {
            t.name: conn.execute(sa.text(f'SELECT COUNT(*) FROM "{t.name}"')).scalar_one() for t in U8_TABLES
        }
    engine.dispose()
    assert after == before and None not in stamps and len(set(stamps)) == len(stamps) == sum(before.values())
    with serve(url, app_secret=SECRET) as (server_url, api), U8Client(credentials(server_url)) as client:
        [customer] = client.deliver(customer_adds(client, {"name": "新客户"}))
        [order] = client.deliver([Delivery(client.new_trade_ids(1)[0], "saleorder/add",
                                           {"customercode": some_code, "personcode": "0101", "entry": [{"inventorycode": "X"}]})])  # fmt: skip
        assert customer.status == "applied" and order.status == "applied", (customer, order)
        assert customer.external_key == f"{before['Customer'] + 1:05d}"
        assert min(
            r["ufts"]
            for r in table(api, sa.select(CUSTOMER).where(CUSTOMER.c.cCusCode == customer.external_key))
        ) > max(stamps)


def test_the_command_line_runs_the_server_and_prints_its_url(sqlite_url: str) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.servers.u8_openapi", "--db", sqlite_url, "--app-secret", SECRET],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), process.stderr.read() if process.stderr else url
        with U8Client(credentials(url)) as client:
            [outcome] = client.deliver(customer_adds(client, {"name": "命令行公司"}))
            assert outcome.status == "applied" and outcome.external_key
            user = ErpUser(sqlite_url)  # the demo loop plays the U8 user from its own process
            try:
                user.update_customer(outcome.external_key, iCusCreLine=123000)
            finally:
                user.close()
            seen = client.find_customer(code=outcome.external_key)
            assert seen is not None and seen["icuscreline"] == 123000.0
    finally:
        process.terminate()
        process.communicate(timeout=10)
    assert process.returncode == 0


def test_outcomes_keep_the_delivery_order_across_operations(client: U8Client, u8: tuple[str, U8Api]) -> None:
    [base] = client.deliver(customer_adds(client, {"name": "顺序公司"}))
    ids = client.new_trade_ids(4)
    deliveries = [
        Delivery(
            ids[0], "saleorder/add", {"customercode": base.external_key, "entry": [{"inventorycode": "A"}]}
        ),
        Delivery(ids[1], "customer/add", {"name": "新一"}),
        Delivery(ids[2], "customer/edit", {"code": base.external_key, "memo": "备注"}),
        Delivery(ids[3], "customer/add", {"name": "新二"}),
    ]
    outcomes = client.deliver(deliveries)
    assert [o.trade_id for o in outcomes] == ids and all(isinstance(o, Outcome) for o in outcomes)
    assert [o.status for o in outcomes] == ["applied"] * 4
    with pytest.raises(U8ApiError, match="unknown U8 operation"):
        client.deliver([Delivery("x", "customer/delete", {})])


@pytest.mark.parametrize(
    ("header", "expected"),
    [("7", 7.0), ("-3", 0.0), ("inf", None), ("1e400", None), ("soon", None), ("99999999", 86_400.0),
     ("Wed, 21 Oct 2099 07:28:00 -0000", 86_400.0), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0)],
)  # fmt: skip
def test_a_retry_after_header_is_read_safely(header: str, expected: float | None) -> None:
    """Seconds or an HTTP date (with or without a zone), never past a day; nonsense is ignored, not a crash."""
    from integration.sync.transport import retry_after_seconds

    assert retry_after_seconds(header) == expected
