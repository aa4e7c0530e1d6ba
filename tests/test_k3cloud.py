"""K3Cloud WebAPI against the local K3Cloud server over a real database: the client, Kingdee's own SDK, the
source connector, and the finance loop through the sync engine (customer out, receivables and receipts in).

Nothing of the code under test is replaced; faults are injected by the server.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from crm_core.db import session_factory
from crm_core.edits import create_record, edit_record
from crm_core.finance import opportunity_collections, order_collections, reconcile
from crm_core.models import Customer, ExternalId, Payment, PaymentApplication, Receivable, SyncOutbox
from integration.connectors.base import ReadRequest
from integration.connectors.k3cloud import (
    FormTable,
    K3CloudClient,
    K3CloudConnector,
    K3CloudCredentials,
    K3CloudError,
    K3CloudSettings,
    sign_headers,
)
from integration.pipeline import Migration, core_engine
from integration.sync.engine import SyncReport, run_sync
from integration.sync.outbox import retry_dead
from integration.sync.transport import Delivery
from tests.conftest import PG_URL, REPO, reset_postgres, server_or_skip
from tests.servers.k3cloud import ACCT_ID, APP_ID, APP_SECRET, PASSWORD, USERNAME, K3Api, serve

QUERY = "Kingdee.BOS.WebApi.ServicesStub.DynamicFormService.ExecuteBillQuery"


def kingdee_sdk() -> Any:
    """Return Kingdee's SDK modules (a dev dependency); skip without it, fail under CI=true."""
    import importlib
    import os

    try:
        return importlib.import_module("k3cloud_webapi_sdk.main"), importlib.import_module(
            "k3cloud_webapi_sdk.core.webapi_client"
        )
    except ImportError:
        reason = "Kingdee's SDK is not installed: pip install kingdee.cdp.webapi.sdk"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true requires it: {reason}")
        pytest.skip(reason)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def k3_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The K3Cloud database: a SQLite file, or the PostgreSQL test database wiped clean."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'k3.sqlite'}"
        return
    engine = server_or_skip(PG_URL, "PostgreSQL")
    reset_postgres(engine)
    engine.dispose()
    yield PG_URL


@pytest.fixture
def k3(k3_db: str) -> Iterator[tuple[str, K3Api]]:
    with serve(k3_db) as (url, api):
        yield url, api


def password_client(url: str, **options: Any) -> K3CloudClient:
    return K3CloudClient(K3CloudCredentials(url, ACCT_ID, USERNAME, password=PASSWORD), **options)


def app_client(url: str, secret: str = APP_SECRET, **options: Any) -> K3CloudClient:
    return K3CloudClient(
        K3CloudCredentials(url, ACCT_ID, USERNAME, app_id=APP_ID, app_secret=secret), **options
    )


def logins(api: K3Api) -> int:
    return sum(r.service in ("ValidateUser", "LoginByAppSecret") for r in api.requests)


# --------------------------------------------------------------------------- the protocol


def test_signature_headers_are_the_sdks_for_the_same_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kingdee's SDK and :func:`sign_headers` give the same X-Api-* and X-Kd-* headers for the same inputs."""
    from k3cloud_webapi_sdk.core import webapi_client
    from k3cloud_webapi_sdk.main import K3CloudApiSdk

    url = (
        "http://erp.example.com/k3cloud/Kingdee.BOS.WebApi.ServicesStub.DynamicFormService.Save.common.kdsvc"
    )
    for app_id, secret, org in ((APP_ID, APP_SECRET, 0), ("218358_1ccC0/HFQmH/XUVET36Bzz8M1rWb0APu", "s3", 101),
                                ("no-underscore", "x", 0)):  # fmt: skip
        sdk = K3CloudApiSdk("http://erp.example.com/k3cloud")
        sdk.InitConfig(ACCT_ID, USERNAME, app_id, secret, "http://erp.example.com/k3cloud", org_num=org)
        monkeypatch.setattr(webapi_client.time, "time", lambda: 1_790_000_000.25)
        theirs = sdk.BuildHeader(url)
        ours = sign_headers(url, app_id=app_id, app_secret=secret, acct_id=ACCT_ID, username=USERNAME, lcid=2052,
                            org_num=org, timestamp=1_790_000_000, nonce="1790000000")  # fmt: skip
        assert {k: theirs[k] for k in ours} == ours
        assert ours["X-Api-Signature"] and ours["X-Kd-Signature"]


@pytest.mark.parametrize("make", [password_client, app_client], ids=["ValidateUser", "LoginByAppSecret"])
def test_login_both_ways_then_query_pages(k3: tuple[str, K3Api], make: Any) -> None:
    url, api = k3
    api.erp.insert_customer("C001", "上海华鑫科技有限公司")
    for n in range(7):
        api.erp.add_receivable(f"AR{n:03d}", "C001", [("SO-1", f"{100 + n}.10")])
    with make(url) as client:
        pages = [client.execute_bill_query("AR_receivable", ["FBillNo", "FALLAMOUNTFOR", "FCUSTOMERID.FNumber"],
                                           order_string="FBillNo ASC", start_row=s, limit=3) for s in (0, 3, 6, 9)]  # fmt: skip
    assert [len(p) for p in pages] == [3, 3, 1, 0]
    assert pages[2][0] == ["AR006", Decimal("106.1"), "C001"]  # exact decimals, base data by its number
    assert logins(api) == 1
    assert {r.auth for r in api.requests if r.service == "ExecuteBillQuery"} == {"session"}


def test_wrong_credentials_are_refused_without_showing_the_secret(k3: tuple[str, K3Api]) -> None:
    url, _api = k3
    for client in (
        password_client(url),
        K3CloudClient(K3CloudCredentials(url, ACCT_ID, USERNAME, password="wr0ng-pw")),
    ):
        client.credentials = K3CloudCredentials(url, ACCT_ID, USERNAME, password="wr0ng-pw")
        with pytest.raises(K3CloudError) as raised:
            client.execute_bill_query("BD_Customer", ["FNumber"])
        assert "refused the login" in str(raised.value) and "wr0ng-pw" not in str(raised.value)
        assert not raised.value.transient
    with pytest.raises(K3CloudError) as raised:
        app_client(url, secret="not-the-secret").execute_bill_query("BD_Customer", ["FNumber"])
    assert "not-the-secret" not in str(raised.value) and "HTTP 401" in str(raised.value)


def _post_signed(
    url: str, body: dict[str, Any], *, timestamp: int, nonce: str, secret: str = APP_SECRET
) -> requests.Response:
    target = f"{url}/{QUERY}.common.kdsvc"
    headers = sign_headers(target, app_id=APP_ID, app_secret=secret, acct_id=ACCT_ID, username=USERNAME,
                           timestamp=timestamp, nonce=nonce)  # fmt: skip
    return requests.post(target, data=json.dumps(body), headers=headers, timeout=10)


def test_server_refuses_a_wrong_secret_a_stale_timestamp_and_a_replayed_request(
    k3: tuple[str, K3Api],
) -> None:
    url, api = k3
    body = {"data": {"FormId": "BD_Customer", "FieldKeys": "FNumber"}}
    now = int(time.time())
    first = _post_signed(url, body, timestamp=now, nonce="n-1")
    assert first.status_code == 200 and first.json() == []  # signed headers alone open a session (SDK style)
    assert _post_signed(url, body, timestamp=now, nonce="n-1").status_code == 401  # the same request again
    assert "replayed" in api.requests[-1].error  # type: ignore[operator]
    assert _post_signed(url, body, timestamp=now - 3600, nonce="n-2").status_code == 401
    assert "stale" in api.requests[-1].error  # type: ignore[operator]
    assert _post_signed(url, body, timestamp=now, nonce="n-3", secret="guessed").status_code == 401
    assert "wrong app secret" in api.requests[-1].error  # type: ignore[operator]
    assert (
        _post_signed(url, {**body, "x": 1}, timestamp=now, nonce="n-1").status_code == 200
    )  # another request


def test_kingdee_sdk_drives_the_server_paging_and_partial_batch_save(k3: tuple[str, K3Api]) -> None:
    """Kingdee's own SDK (signed headers, no login call) pages a query and gets a BatchSave's partial failure."""
    K3CloudApiSdk = kingdee_sdk()[0].K3CloudApiSdk

    url, api = k3
    for n in range(5):
        api.erp.insert_customer(f"C{n:03d}", f"客户{n}有限公司")
    sdk = K3CloudApiSdk(url)
    sdk.InitConfig(ACCT_ID, USERNAME, APP_ID, APP_SECRET, url)
    pages = [json.loads(sdk.ExecuteBillQuery({"FormId": "BD_Customer", "FieldKeys": "FNumber,FName",
                                              "OrderString": "FNumber ASC", "StartRow": s, "Limit": 2}))
             for s in (0, 2, 4)]  # fmt: skip
    assert [row[0] for page in pages for row in page] == ["C000", "C001", "C002", "C003", "C004"]
    answer = json.loads(sdk.BatchSave("BD_Customer", {"Model": [{"FName": "甲公司"}, {"FName": "乙", "FNumber": "C001"},
                                                                {"FName": "丙公司", "F_CRM_ID": "9"}]}))  # fmt: skip
    status = answer["Result"]["ResponseStatus"]
    assert status["IsSuccess"] is False
    assert [(e["DIndex"], e["FieldName"]) for e in status["Errors"]] == [(1, "FNumber")]  # duplicate FNumber
    assert [e["DIndex"] for e in status["SuccessEntitys"]] == [0, 2]
    assert {r.auth for r in api.requests} == {"headers", "session"}  # the cookie the SDK kept was honoured
    wrong = K3CloudApiSdk(url)
    wrong.InitConfig(ACCT_ID, USERNAME, APP_ID, "wrong-secret", url)
    with pytest.raises(RuntimeError):
        wrong.ExecuteBillQuery({"FormId": "BD_Customer", "FieldKeys": "FNumber"})


# --------------------------------------------------------------------------- the source connector


def connector(url: str, **tables: FormTable) -> K3CloudConnector:
    credentials = K3CloudCredentials(url, ACCT_ID, USERNAME, password=PASSWORD)
    return K3CloudConnector("k3", K3CloudSettings(credentials, dict(tables), page_size=4))


RECEIVABLES = FormTable("AR_receivable", {"FBillNo": "FBillNo", "FALLAMOUNTFOR": "FALLAMOUNTFOR",
                                          "FModifyDate": "FModifyDate"})  # fmt: skip


def read_all(source: K3CloudConnector, **request: Any) -> list[str]:
    frames = list(source.read(ReadRequest(table="receivables", key=("FBillNo",), **request)))
    return [str(v) for frame in frames for v in frame["FBillNo"]]


def test_paging_survives_an_expired_session_and_short_pages(k3: tuple[str, K3Api]) -> None:
    url, api = k3
    api.erp.insert_customer("C001", "华鑫")
    for n in range(13):
        api.erp.add_receivable(f"AR{n:03d}", "C001", [(None, "10")])
    source = connector(url, receivables=RECEIVABLES)
    api.faults.extend(["pass", "pass", "expire_session", "short_page", "pass", "short_page"])
    assert read_all(source) == [f"AR{n:03d}" for n in range(13)]
    assert logins(api) == 2  # renewed once, the page asked again
    assert any(
        r.rows == 2 for r in api.requests if r.service == "ExecuteBillQuery"
    )  # a short page was answered


def test_app_secret_session_is_renewed_by_a_new_login_when_the_site_ignores_signed_headers(
    k3_db: str,
) -> None:
    with serve(k3_db, header_auth=False) as (url, api):
        api.erp.insert_customer("C001", "华鑫")
        with app_client(url) as client:
            assert client.execute_bill_query("BD_Customer", ["FNumber"]) == [["C001"]]
            api.faults.append("expire_session")
            assert client.execute_bill_query("BD_Customer", ["FNumber"]) == [["C001"]]
        assert [r.service for r in api.requests if r.service == "LoginByAppSecret"] == [
            "LoginByAppSecret"
        ] * 2


def test_incremental_read_keeps_the_boundary(k3: tuple[str, K3Api]) -> None:
    """Rows at the cursor's top value are not read twice; rows changed later (same or new stamp) are read."""
    url, api = k3
    api.erp.insert_customer("C001", "华鑫")
    for n in range(6):
        api.erp.add_receivable(f"AR{n:03d}", "C001", [(None, "10")])
    source = connector(url, receivables=RECEIVABLES)
    frames = list(
        source.read(ReadRequest(table="receivables", key=("FBillNo",), cursor_column="FModifyDate"))
    )
    frame = frames[0]
    top = max(frame["FModifyDate"])
    assert isinstance(top, dt.datetime) and len(frame) == 6
    api.erp.update("AR_receivable", "AR002", FAR_Remark="改过")
    api.erp.add_receivable("AR900", "C001", [(None, "5")])
    again = read_all(source, cursor_column="FModifyDate", cursor_from=top)
    assert again == [
        "AR005",
        "AR002",
        "AR900",
    ]  # from the boundary on (AR005 sits on it), ordered by FModifyDate


# --------------------------------------------------------------------------- the transport


def test_deliver_turns_response_status_into_outcomes_and_finds_a_replayed_add(k3: tuple[str, K3Api]) -> None:
    url, api = k3
    api.erp.insert_customer("C001", "已有客户")
    with password_client(url, crm_key_field="F_CRM_ID", max_batch=10) as client:
        api.faults.append("reject:FName=坏客户有限公司")
        outcomes = client.deliver([
            Delivery("t1", "BD_Customer/add", {"FName": "好客户甲有限公司", "F_CRM_ID": "1"}),
            Delivery("t2", "BD_Customer/add", {"FName": "坏客户有限公司", "F_CRM_ID": "2"}),
            Delivery("t3", "BD_Customer/add", {"FName": "重号客户", "FNumber": "C001", "F_CRM_ID": "3"}),
        ])  # fmt: skip
        assert [o.status for o in outcomes] == ["applied", "rejected", "rejected"]
        assert outcomes[0].external_key == "CUST0001"
        assert "business rule" in (outcomes[1].message or "") and "FNumber" in (outcomes[2].message or "")
        again = client.deliver(
            [Delivery("t1", "BD_Customer/add", {"FName": "好客户甲有限公司", "F_CRM_ID": "1"})]
        )
        assert (again[0].status, again[0].external_key) == (
            "applied",
            "CUST0001",
        )  # found by F_CRM_ID, not re-added
        api.faults.extend(["503"])
        down = client.deliver([Delivery("t4", "BD_Customer/edit", {"FNumber": "CUST0001", "FTEL": "1"})])
        assert down[0].status == "retry" and "503" in (down[0].message or "")
        api.faults.append("timeout")
        client.timeout = 0.5
        late = client.deliver([Delivery("t5", "BD_Customer/add", {"FName": "超时客户", "F_CRM_ID": "5"})])
        api.release()
        assert late[0].status == "retry"
        client.timeout = 10
        replay = client.deliver([Delivery("t5", "BD_Customer/add", {"FName": "超时客户", "F_CRM_ID": "5"})])
        assert replay[0].status == "applied"  # the timed-out save was applied: found, not saved twice
    with api.engine.connect() as conn:
        assert (
            conn.execute(
                sa.text('SELECT count(*) FROM "T_BD_CUSTOMER" WHERE "FName" = \'超时客户\'')
            ).scalar()
            == 1
        )


# --------------------------------------------------------------------------- the finance loop through the engine

TABLES = """
    tables:
      receivables:
        form: AR_receivable
        filter: "FDOCUMENTSTATUS = 'C'"
        fields: [FID, FBillNo, FBillTypeID, FDATE, FENDDATE_H, FCUSTOMERID.FNumber, FCURRENCYID.FCODE, FEXCHANGERATE, FALLAMOUNTFOR, FDOCUMENTSTATUS, FModifyDate]
      receivable_lines: {form: AR_receivable, fields: [FEntityDetail_FEntryID, FBillNo, FORDERNUMBER, FALLAMOUNTFOR_D]}
      receipts:
        form: AR_RECEIVEBILL
        filter: "FDOCUMENTSTATUS = 'C'"
        fields: [FID, FBillNo, FBillTypeID, FDATE, FCONTACTUNIT.FNumber, FCURRENCYID.FCODE, FEXCHANGERATE, FREALRECAMOUNTFOR, FModifyDate]
      receipt_writeoffs:
        form: AR_RECEIVEBILL
        filter: "FDOCUMENTSTATUS = 'C' AND FSRCBILLNO IS NOT NULL"
        fields: [FRECEIVEBILLSRCENTRY_FEntryID, FBillNo, FBillTypeID, FSRCBILLNO, FREALRECAMOUNT, FModifyDate]
"""
PROJECT = f"""version: 1
name: k3test
currencies: {{base: CNY, rates: {{USD: 7.1}}}}
validation:
  rules:  # money is exact: an amount with more than two decimals is not rounded into the core, it is rejected
    - {{name: receivable.amount.fen, entity: receivable, field: amount, pattern: '-?[0-9]+([.][0-9]{{0,2}}0*)?',
       message: "more than two decimals: not an amount in fen; correct it in K3Cloud"}}
    - {{name: payment.amount.fen, entity: payment, field: amount, pattern: '-?[0-9]+([.][0-9]{{0,2}}0*)?',
       message: "more than two decimals: not an amount in fen; correct it in K3Cloud"}}
    - {{name: payment_application.amount.fen, entity: payment_application, field: amount,
       pattern: '-?[0-9]+([.][0-9]{{0,2}}0*)?', message: "more than two decimals: not an amount in fen"}}
sources:
  k3:
    connector: k3cloud
    base_url: ${{K3_URL}}
    acct_id: ${{K3_ACCT_ID}}
    username: ${{K3_USERNAME}}
    password: ${{K3_PASSWORD}}
    page_size: 50
{TABLES}
sync:
  finance:
    system: k3
    transport:
      profile: k3cloud
      base_url: ${{K3_URL}}
      acct_id: ${{K3_ACCT_ID}}
      username: ${{K3_USERNAME}}
      password: ${{K3_PASSWORD}}
      crm_key_field: F_CRM_ID
      batch_size: 50
      timeout: 5
    retry: {{max_attempts: 3, backoff_seconds: 0, max_backoff_seconds: 0}}
    entities:
      customer:
        direction: outbound
        outbound:
          add: BD_Customer/add
          edit: BD_Customer/edit
          key_field: erp_code
          fields:
            FNumber: _key
            FName: name
            FShortName: short_name
            FTEL: phone
            FADDRESS: address
            FSOCIALCRECODE: credit_code
            F_CRM_ID: id
      receivable: {{direction: inbound, inbound: [k3_receivables]}}
      payment: {{direction: inbound, inbound: [k3_receipts]}}
      payment_application: {{direction: inbound, inbound: [k3_receipt_writeoffs]}}
"""


def k3_settings(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """The K3_* variables the example project reads, pointing at the test server at ``url``."""
    for name, value in (
        ("K3_URL", url),
        ("K3_ACCT_ID", ACCT_ID),
        ("K3_USERNAME", USERNAME),
        ("K3_PASSWORD", PASSWORD),
    ):
        monkeypatch.setenv(name, value)


@pytest.fixture
def finance(k3: tuple[str, K3Api], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[K3Api, Path]:
    url, api = k3
    k3_settings(monkeypatch, url)
    root = tmp_path / "project"
    shutil.copytree(REPO / "examples" / "k3cloud" / "mappings", root / "mappings")
    (root / "project.yaml").write_text(PROJECT, encoding="utf-8")
    return api, root


@pytest.fixture
def core(tmp_path: Path) -> Iterator[sa.Engine]:
    engine = core_engine(f"sqlite:///{tmp_path / 'core.sqlite'}")
    yield engine
    engine.dispose()


def sync(project: Path, engine: sa.Engine, direction: str = "both") -> SyncReport:
    return run_sync(Migration.load(str(project)), engine, "finance", direction)


def test_finance_loop_customer_out_number_back_receivables_and_receipts_in(
    finance: tuple[K3Api, Path], core: sa.Engine
) -> None:
    """CRM customer → K3Cloud number back; receivable and receipt in → 回款 on the order and the opportunity."""
    api, project = finance
    sync(project, core)  # go-live: the first sync takes the baseline
    customer = create_record(core, "customer", {"name": "杭州新禾贸易有限公司", "phone": "+8657188886666"})
    out = sync(project, core, "outbound")
    assert (out.delivery.applied, out.delivery.dead_letters) == (1, 0)
    with api.engine.connect() as conn:
        number, crm_id, state = conn.execute(sa.text('SELECT "FNumber", "F_CRM_ID", "FDocumentStatus" FROM '
                                                     '"T_BD_CUSTOMER"')).one()  # fmt: skip
    assert (crm_id, state) == (str(customer), "C")  # audited on save (IsAutoSubmitAndAudit)
    with session_factory(core)() as session:
        assert session.get(Customer, customer).erp_code == number  # type: ignore[union-attr]
        link = session.scalar(
            sa.select(ExternalId).where(ExternalId.system == "k3", ExternalId.entity == "customer")
        )
        assert link is not None and (link.entity_id, link.external_key) == (customer, number)
    edit_record(core, "customer", customer, {"phone": "+8657100001111"})
    assert sync(project, core, "outbound").delivery.applied == 1
    with api.engine.connect() as conn:
        assert conn.execute(sa.text('SELECT "FTEL" FROM "T_BD_CUSTOMER"')).scalar() == "+8657100001111"

    deal = create_record(core, "opportunity", {"customer": customer, "name": "年度框架采购", "stage": "won",
                                                "amount": Decimal("113000.00"), "closed_on": dt.date(2026, 9, 20)})  # fmt: skip
    order = create_record(core, "sales_order", {"order_no": "SO-2026-0001", "customer": customer, "opportunity": deal,
                                                 "total_amount": Decimal("113000.00")})  # fmt: skip
    api.erp.add_receivable("AR-0001", number, [("SO-2026-0001", "60000.00"), ("SO-2026-0001", "20000.00")],
                           due=dt.date(2026, 10, 1))  # fmt: skip
    api.erp.add_receivable("AR-0002", number, [("SO-2026-0001", "33000.00")], due=dt.date(2026, 12, 31))
    api.erp.add_receipt("SK-0001", number, [("AR-0001", "50000.00"), ("AR-0002", "10000.00")])
    api.erp.add_receipt("SK-0002", number, [], date=dt.date(2026, 10, 25))  # not written off yet
    api.erp.update("AR_RECEIVEBILL", "SK-0002", FREALRECAMOUNTFOR=Decimal("1500.00"))
    inbound = sync(project, core, "inbound")
    assert inbound.rejected == 0, inbound.as_dict()
    assert (
        inbound.entities["receivable"]["applied"] == 2
        and inbound.entities["payment_application"]["applied"] == 2
    )
    today = dt.date(2026, 11, 1)
    with session_factory(core)() as session:
        assert session.scalars(sa.select(Receivable.order_id)).all() == [order, order]
        cash = order_collections(session, [order], today=today)[order]
        assert (cash.ordered, cash.invoiced, cash.collected, cash.outstanding, cash.overdue) == (
            Decimal("113000.00"),
            Decimal("113000.00"),
            Decimal("60000.00"),
            Decimal("53000.00"),
            Decimal("30000.00"),
        )
        assert opportunity_collections(session, [deal], today=today)[deal] == cash
        loop = reconcile(session, today=today)
    row = loop["customers"][0]
    assert (row["ordered"], row["invoiced"], row["collected"], row["received"], row["unapplied"]) == (
        "113000.00", "113000.00", "60000.00", "61500.00", "1500.00")  # fmt: skip
    assert loop["differences"][0]["reasons"] == ["invoiced, not collected yet (not due)", "overdue",
                                                 "receipts not applied to a receivable"]  # fmt: skip

    api.erp.add_receipt("SK-0003", number, [("AR-0001", "30000.00")], date=dt.date(2026, 11, 5))
    later = sync(project, core, "inbound")
    assert later.entities["payment"]["received"] == 1  # only the new receipt: read from the cursor on
    with session_factory(core)() as session:
        assert order_collections(session, [order], today=today)[order].collected == Decimal("90000.00")
        assert session.scalar(sa.select(sa.func.count()).select_from(PaymentApplication)) == 3
        assert session.scalar(sa.select(sa.func.sum(Payment.amount))) == Decimal("91500.00")


def test_one_bad_record_of_a_batch_save_is_a_dead_letter_with_k3clouds_message(
    finance: tuple[K3Api, Path], core: sa.Engine
) -> None:
    api, project = finance
    sync(project, core)
    for name in ("好客户甲有限公司", "坏客户有限公司", "好客户乙有限公司"):
        create_record(core, "customer", {"name": name})
    api.faults.append("reject:FName=坏客户有限公司")
    report = sync(project, core, "outbound")
    assert (report.delivery.applied, report.delivery.dead_letters) == (2, 1)
    with session_factory(core)() as session:
        dead = session.scalars(sa.select(SyncOutbox).where(SyncOutbox.status == "dead")).all()
        assert len(dead) == 1 and dead[0].payload["FName"] == "坏客户有限公司"
        assert "business rule" in (dead[0].last_error or "")
        assert retry_dead(session, "finance") == 1
        session.commit()
    assert sync(project, core, "outbound").delivery.applied == 1


def test_bad_finance_rows_are_rejected_with_reasons_and_the_rest_applied(
    finance: tuple[K3Api, Path], core: sa.Engine
) -> None:
    api, project = finance
    sync(project, core)
    customer = create_record(core, "customer", {"name": "华鑫科技有限公司"})
    sync(project, core, "outbound")
    with session_factory(core)() as session:
        number = str(session.get(Customer, customer).erp_code)  # type: ignore[union-attr]
    future = dt.date.today() + dt.timedelta(days=60)
    api.erp.insert_customer("K-ONLY", "只在金蝶的客户")  # never sent by the CRM: unknown to the crosswalk
    api.erp.add_receivable("AR-1", number, [("SO-NONE", "100.00")])  # its order is not in the core
    api.erp.add_receivable("AR-OK", number, [(None, "100.00")], rate="1")  # no order: the customer's
    api.erp.add_receivable("AR-2", "K-ONLY", [(None, "200.00")])
    api.erp.add_receivable("AR-3", number, [(None, "100.125")])  # more than two decimals: not a fen amount
    api.erp.add_receivable("AR-FUT", number, [(None, "10.00")], date=future)
    api.erp.add_receivable(
        "AR-HKD", number, [(None, "10.00")], currency="HKD", rate="0.92"
    )  # not the project's
    api.erp.add_receivable("AR-NEG", number, [(None, "-30.00")])  # negative, not a red-letter bill type
    api.erp.add_receivable("AR-RED", number, [(None, "-50.00")], bill_type="YSD_RED")  # 红字应收单
    api.erp.add_receipt("SK-1", number, [("AR-OK", "100.00"), ("AR-404", "5.00")])
    api.erp.add_receipt("SK-NEG", number, [("AR-OK", "-20.00")])  # negative, not marked
    api.erp.add_receipt("SK-REF", number, [("AR-RED", "-50.00")], bill_type="SKD_RED")  # a refund
    api.erp.add_receipt("SK-K", "K-ONLY", [])  # a receipt of a customer the CRM does not know
    api.erp.update("AR_RECEIVEBILL", "SK-K", FREALRECAMOUNTFOR=Decimal("7.00"))
    report = sync(project, core, "inbound")
    assert report.entities["receivable"]["applied"] == 2  # AR-OK and the red-letter AR-RED
    assert report.entities["payment"]["applied"] == 2  # SK-1 and the refund SK-REF
    assert report.entities["payment_application"]["applied"] == 2  # SK-1 → AR-OK, SK-REF → AR-RED
    with session_factory(core)() as session:
        loaded = {r.receivable_no: (r.amount, r.red_letter, r.exchange_rate, r.invoiced_on)
                  for r in session.scalars(sa.select(Receivable))}  # fmt: skip
        assert loaded == {
            "AR-OK": (Decimal("100.00"), False, Decimal("1"), dt.date(2026, 10, 8)),
            "AR-RED": (Decimal("-50.00"), True, Decimal("1"), dt.date(2026, 10, 8)),
        }
        assert reconcile(session)["totals"]["collected"] == "50.00"  # 100 collected, 50 refunded
    with session_factory(core)() as session:
        from crm_core.models import Reject

        reasons: dict[tuple[str, str], list[str]] = {}
        for r in session.scalars(sa.select(Reject)):
            reasons.setdefault((r.entity, r.field), []).append(f"{r.row_ref}: {r.reason}")
    text = {key: " | ".join(found) for key, found in reasons.items()}
    assert (
        "no sales_order named 'SO-NONE'" in text[("receivable", "order")]
    )  # rejected, not loaded without it
    assert "K-ONLY' not found" in text[("receivable", "customer")]
    assert "K-ONLY' not found" in text[("payment", "customer")]
    assert "not found" in text[("payment_application", "receivable")]
    assert "more than two decimals" in text[("receivable", "amount")]
    assert "invoiced_on lies in the future" in text[("receivable", "invoiced_on")]
    assert "not a currency of this project (currencies: CNY, USD" in text[("receivable", "currency")]
    unmarked = {(key[0], r.split(":")[0]) for key, found in reasons.items() if key[1] == "amount"
                for r in found if "red_letter" in r}  # fmt: skip
    assert {e for e, _ in unmarked} == {"receivable", "payment", "payment_application"} and len(unmarked) == 3
    assert {("receivable", "AR-NEG"), ("payment", "SK-NEG")} < unmarked  # SK-NEG's write-off is the third


def test_secrets_never_in_errors_or_logs(k3: tuple[str, K3Api], caplog: pytest.LogCaptureFixture) -> None:
    url, api = k3
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="urllib3")  # dagster-k8s, once imported, sets it to WARNING
    client = app_client(url)
    client.execute_bill_query("BD_Customer", ["FNumber"])
    sid = client._sid  # the session id must not leak either
    api.faults.append("500")
    outcome = client.deliver([Delivery("t", "BD_Customer/add", {"FName": "x"})])[0]
    with pytest.raises(K3CloudError) as raised:
        client.execute_bill_query("NO_SUCH_FORM", ["FNumber"])
    texts = [str(raised.value), outcome.message or "", repr(client), repr(client.credentials), caplog.text]
    for secret in (APP_SECRET, PASSWORD, sid or "-"):
        assert all(secret not in text for text in texts)
    assert "NO_SUCH_FORM" in str(raised.value)


def test_k3cloud_down_at_login_makes_retries_not_a_failed_run(k3: tuple[str, K3Api]) -> None:
    url, api = k3
    api.faults.append("503")
    with password_client(url) as client:
        outcomes = client.deliver([Delivery("t1", "BD_Customer/add", {"FName": "甲"}),
                                   Delivery("t2", "BD_Customer/add", {"FName": "乙"})])  # fmt: skip
        assert [o.status for o in outcomes] == ["retry", "retry"]
        assert [o.status for o in client.deliver([Delivery("t1", "BD_Customer/add", {"FName": "甲"})])] == [
            "applied"
        ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("      password: ${K3_PASSWORD}\n      crm_key_field", "      password: hunter2\n      crm_key_field"),
         "sync.finance.transport.password: password is a secret; write ${ENV_VAR}"),
        (("      password: ${K3_PASSWORD}\n      crm_key_field", "      crm_key_field"),
         "give password (ValidateUser) or app_id and app_secret (LoginByAppSecret)"),
        (("add: BD_Customer/add", "add: BD_Customer/save"), "'BD_Customer/save' is not allowed"),
        (("    password: ${K3_PASSWORD}\n    page_size", "    password: s3cret\n    page_size"),
         "sources.k3.password: password is a secret"),
    ],
)  # fmt: skip
def test_a_bad_k3cloud_section_is_a_located_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: tuple[str, str], message: str
) -> None:
    from crm_core.errors import ConfigError

    for name in ("K3_URL", "K3_ACCT_ID", "K3_USERNAME", "K3_PASSWORD"):
        monkeypatch.setenv(name, "x")
    root = tmp_path / "p"
    shutil.copytree(REPO / "examples" / "k3cloud" / "mappings", root / "mappings")
    assert change[0] in PROJECT
    (root / "project.yaml").write_text(PROJECT.replace(*change), encoding="utf-8")
    with pytest.raises(ConfigError) as raised:
        Migration.load(str(root))
    text = str(raised.value)
    assert message in text, text
    assert text.split("project.yaml:")[1].split(":")[0].isdigit()  # file:line:col
    assert "hunter2" not in text and "s3cret" not in text


@pytest.mark.parametrize(("audit", "state"), [("auto", "C"), ("explicit", "C"), ("none", "A")])
def test_saved_customers_are_submitted_and_audited_as_the_project_asks(
    k3: tuple[str, K3Api], audit: Any, state: str
) -> None:
    url, api = k3
    with password_client(url, audit=audit) as client:
        outcome = client.deliver([Delivery("t1", "BD_Customer/add", {"FName": "审核测试有限公司"})])[0]
    assert outcome.status == "applied"
    with api.engine.connect() as conn:
        found = conn.execute(sa.text('SELECT "FDocumentStatus" FROM "T_BD_CUSTOMER" WHERE "FNumber" = :n'),
                             {"n": outcome.external_key}).scalar()  # fmt: skip
    assert found == state
    services = [r.service for r in api.requests if r.service in ("Save", "Submit", "Audit")]
    assert services == (["Save", "Submit", "Audit"] if audit == "explicit" else ["Save"])


def test_a_session_reopened_by_the_signed_headers_is_kept(k3: tuple[str, K3Api]) -> None:
    """After the session lapses, the SDK headers open a new one (no login call); the client keeps using it."""
    url, api = k3
    with app_client(url) as client:
        client.execute_bill_query("BD_Customer", ["FNumber"])
        api.faults.append("expire_session")
        for _ in range(3):
            client.execute_bill_query("BD_Customer", ["FNumber"])
    queries = [r.auth for r in api.requests if r.service == "ExecuteBillQuery"]
    assert queries == ["session", "headers", "session", "session"] and logins(api) == 1


def test_ten_thousand_receivables_sum_to_the_fen(finance: tuple[K3Api, Path], core: sa.Engine) -> None:
    """10,000 receivables read page by page: the core's total equals K3Cloud's exactly."""
    import random

    api, project = finance
    (project / "project.yaml").write_text(
        PROJECT.replace("page_size: 50", "page_size: 2000"), encoding="utf-8"
    )
    sync(project, core)
    customer = create_record(core, "customer", {"name": "大客户有限公司"})
    sync(project, core, "outbound")
    with session_factory(core)() as session:
        number = str(session.get(Customer, customer).erp_code)  # type: ignore[union-attr]
    generator = random.Random(18)
    amounts = [Decimal(generator.randrange(1, 10**9)) / 100 for _ in range(10_000)]
    api.erp.bulk_receivables(number, amounts)
    report = sync(project, core, "inbound")
    assert report.entities["receivable"]["applied"] == 10_000 and report.rejected == 0
    with api.engine.connect() as conn:
        theirs = sum(
            (
                Decimal(str(v))
                for v in conn.execute(sa.text('SELECT "FALLAMOUNTFOR" FROM "T_AR_RECEIVABLE"')).scalars()
            ),
            Decimal(0),
        )
    with session_factory(core)() as session:
        ours = reconcile(session)["totals"]["invoiced"]
        rows = [Decimal(str(v)) for v in session.scalars(sa.select(Receivable.amount))]
    assert theirs == sum(amounts) and sum(rows) == theirs and Decimal(ours) == theirs


def test_a_saved_add_whose_answer_was_lost_is_edited_when_a_newer_document_supersedes_it(
    k3: tuple[str, K3Api], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: sa.Engine
) -> None:
    """K3Cloud saved the add, the answer never came (its only try: a dead letter in doubt); the record is then
    edited: the next run finds K3Cloud's customer by our key and saves the edit into it, nothing twice."""
    url, api = k3
    k3_settings(monkeypatch, url)
    project = tmp_path / "project"
    shutil.copytree(REPO / "examples" / "k3cloud" / "mappings", project / "mappings")
    (project / "project.yaml").write_text(
        PROJECT.replace("max_attempts: 3", "max_attempts: 1"), encoding="utf-8"
    )
    sync(project, core)
    customer = create_record(core, "customer", {"name": "杭州应答丢失有限公司"})
    api.faults.append("drop")
    assert sync(project, core, "outbound").delivery.dead_letters == 1
    edit_record(core, "customer", customer, {"name": "杭州应答丢失（新）有限公司"})
    report = sync(project, core, "outbound")
    assert (report.delivery.applied, report.delivery.dead_letters) == (1, 0), report.delivery
    with api.engine.connect() as conn:
        [(number, name)] = conn.execute(sa.text('SELECT "FNumber", "FName" FROM "T_BD_CUSTOMER"')).all()
    assert name == "杭州应答丢失（新）有限公司"
    with session_factory(core)() as session:
        assert session.get(Customer, customer).erp_code == number  # type: ignore[union-attr]
        keys = session.scalars(sa.select(ExternalId.external_key).where(ExternalId.system == "k3")).all()
        assert keys == [number]
        rows = session.scalars(sa.select(SyncOutbox).order_by(SyncOutbox.id)).all()
        assert [r.status for r in rows] == ["superseded", "done"]
        assert f"finance had applied it as {number}" in (rows[0].last_error or "")
        assert rows[1].payload["FNumber"] == number
