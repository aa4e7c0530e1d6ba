"""Held names on the steward workbench: a name no single customer matched, decided from the browser as
``crmi dedup decide rN`` decides it from a shell; its held rows load (or are rejected) on the next run."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session
from starlette.testclient import TestClient
from typer.testing import CliRunner

from crm_core.db import make_engine, upgrade
from crm_core.models import Customer, ExternalId, LoadRun, Opportunity, ReferenceDecision, Reject
from crm_core.steward_models import AUDIT
from integration.cli import app as cli
from integration.steward import security
from integration.steward.app import Settings, create_app
from integration.steward.decisions import Rules
from tests.test_run_lock_steps import held_by_another_process

PASSWORD = "correct horse battery"
CSRF = re.compile(r'name="csrf" value="([^"]+)"')
RULES = Rules(project="t")


def signed_in(engine: sa.Engine, name: str, role: str, currency: str = "CNY") -> tuple[TestClient, str]:
    """A workbench client signed in as a new user ``name`` of ``role``, and its CSRF token."""
    with engine.begin() as connection:
        security.add_user(connection, name, role, PASSWORD, actor="test")
    client = TestClient(
        create_app(engine, Settings(rules=RULES, training_cache_seconds=0, base_currency=currency)),
        base_url="http://127.0.0.1",
    )
    form = client.get("/login")
    login_token = CSRF.search(form.text)
    assert login_token, form.text
    done = client.post("/login", data={"csrf": login_token.group(1), "name": name, "password": PASSWORD,
                                       "next": "/names"}, follow_redirects=False)  # fmt: skip
    assert done.status_code == 303, done.text
    page = client.get("/names")
    token = CSRF.search(page.text)
    assert token, page.text
    return client, token.group(1)


def held_core(url: str) -> tuple[sa.Engine, dict[str, int], dict[str, int]]:
    """A core with three customers (one merged into another) and three names waiting: customer ids by name,
    reference decision ids by name."""
    engine = make_engine(url)
    upgrade(engine)
    with Session(engine) as session, session.begin():
        customers = {
            n: Customer(name=n)
            for n in ("上海新元物流有限公司", "武汉恒信环保工程有限公司", "新元物流（上海）有限公司")
        }
        session.add_all(customers.values())
        session.flush()
        customers["新元物流（上海）有限公司"].merged_into_id = customers["上海新元物流有限公司"].id
        names = {
            "广州新元物流公司": ReferenceDecision(
                entity="customer", name="广州新元物流公司", name_key="广州新元物流",
                candidates=[{"id": customers["上海新元物流有限公司"].id, "name": "上海新元物流有限公司", "probability": 0.25}],
                rows_held=2, amount_held=Decimal("400000.00"),
            ),
            "成都恒信环保工程公司": ReferenceDecision(
                entity="customer", name="成都恒信环保工程公司", name_key="成都恒信环保工程",
                candidates=[{"id": customers["武汉恒信环保工程有限公司"].id, "name": "武汉恒信环保工程有限公司",
                             "probability": None, "similarity": 0.47}],
                rows_held=1, amount_held=Decimal("1250000.50"),
            ),
            "某某未知客户有限公司": ReferenceDecision(
                entity="customer", name="某某未知客户有限公司", name_key="某某未知客户", candidates=[], rows_held=4,
                amount_held=None,
            ),
        }  # fmt: skip
        session.add_all(names.values())
        session.flush()
        return engine, {n: c.id for n, c in customers.items()}, {n: d.id for n, d in names.items()}


def decision(engine: sa.Engine, decision_id: int) -> ReferenceDecision:
    with Session(engine) as session:
        found = session.get(ReferenceDecision, decision_id)
        assert found is not None
        session.expunge(found)
        return found


def test_a_steward_sees_the_held_names_by_money_and_decides_them_as_the_cli_does(core_url: str) -> None:
    """The page lists every name waiting, the most money first, with its candidates' probability or name
    similarity named as such and the amounts' currency; deciding a candidate, any other customer (a merged-away
    one stands for its golden record) or none records the decision in a steward run that rollback undoes."""
    engine, customers, names = held_core(core_url)
    client, token = signed_in(engine, "wang", "steward", currency="CNY")
    page = client.get("/names")
    assert page.status_code == 200
    assert "amount held (CNY)" in page.text
    order = [
        page.text.index(f'id="held-r{names[n]}"')
        for n in ("成都恒信环保工程公司", "广州新元物流公司", "某某未知客户有限公司")
    ]
    assert order == sorted(order)  # 1,250,000.50 before 400,000.00 before no amount
    assert (
        "1,250,000.50" in page.text
        and "probability 0.25" in page.text
        and "name similarity 0.47" in page.text
    )
    assert "<strong>3</strong> name(s) wait" in page.text

    chosen = client.post(
        f"/names/{names['广州新元物流公司']}/decide",
        data={"csrf": token, "customer": str(customers["上海新元物流有限公司"])},
        follow_redirects=False,
    )
    assert chosen.status_code == 303, chosen.text
    other = client.post(
        f"/names/{names['成都恒信环保工程公司']}/decide",
        data={"csrf": token, "customer": "other", "other": f"#{customers['新元物流（上海）有限公司']}"},
        follow_redirects=False,
    )
    assert other.status_code == 303, other.text
    none = client.post(
        f"/names/{names['某某未知客户有限公司']}/decide", data={"csrf": token, "customer": "none"},
        follow_redirects=False,
    )  # fmt: skip
    assert none.status_code == 303, none.text

    linked = decision(engine, names["广州新元物流公司"])
    assert (linked.status, linked.target_id, linked.decided_by) == (
        "linked",
        customers["上海新元物流有限公司"],
        "wang",
    )
    # the merged-away customer stands for its golden record
    assert decision(engine, names["成都恒信环保工程公司"]).target_id == customers["上海新元物流有限公司"]
    rejected = decision(engine, names["某某未知客户有限公司"])
    assert (rejected.status, rejected.target_id) == ("no_match", None)
    with Session(engine) as session:
        runs = session.scalars(sa.select(LoadRun).where(LoadRun.mode == "steward")).all()
    assert len(runs) == 3 and {r.status for r in runs} == {
        "succeeded"
    }  # each in a run `crmi rollback` undoes

    record = client.get(f"/records/customer/{customers['上海新元物流有限公司']}").text  # its Audit list
    assert (
        "held name &#39;广州新元物流公司&#39;" in record
        and "held name &#39;成都恒信环保工程公司&#39;" in record
    )
    assert "workbench" in record
    with engine.connect() as connection:
        actions = connection.execute(
            sa.select(AUDIT.c.actor, AUDIT.c.record_id, AUDIT.c.ip).where(
                AUDIT.c.action == "decide_reference"
            )
        ).all()
    assert sorted(actions, key=str) == sorted(
        [("wang", customers["上海新元物流有限公司"], "testclient")] * 2 + [("wang", None, "testclient")],
        key=str,
    )  # "none" too, on the audit page

    after = client.get("/names")
    assert "No name waits for a decision." in after.text and "<strong>0</strong> name(s) wait" in after.text
    decided = after.text[after.text.index('id="held-decided"') :]
    assert (
        "no customer: its rows are rejected" in decided and f"#{customers['上海新元物流有限公司']}" in decided
    )
    engine.dispose()


def test_what_the_workbench_refuses_changes_nothing(core_url: str) -> None:
    """A viewer reads but cannot decide; a decided name, a customer not in the core, an empty id and an unknown
    name are refused with what to do; a command holding the core answers 423; nothing is written."""
    engine, customers, names = held_core(core_url)
    viewer, viewer_token = signed_in(engine, "zhao", "viewer")
    page = viewer.get("/names")
    assert page.status_code == 200 and "广州新元物流公司" in page.text and "/decide" not in page.text
    target = names["广州新元物流公司"]
    refused = viewer.post(f"/names/{target}/decide", data={"csrf": viewer_token, "customer": "none"})
    assert refused.status_code == 403
    client, token = signed_in(engine, "wang", "steward")
    assert (
        client.post(f"/names/{target}/decide", data={"customer": "none"}).status_code == 403
    )  # no CSRF token
    missing = client.post(f"/names/{target}/decide", data={"csrf": token, "customer": "999999"})
    assert missing.status_code == 400 and "no customer 999999 in the core" in missing.text
    unchosen = client.post(f"/names/{target}/decide", data={"csrf": token})  # nothing is chosen for them
    assert unchosen.status_code == 400 and "choose the customer the name means" in unchosen.text
    blank = client.post(f"/names/{target}/decide", data={"csrf": token, "customer": "other", "other": " "})
    assert blank.status_code == 400 and "write the id of the customer" in blank.text
    unknown = client.post("/names/999999/decide", data={"csrf": token, "customer": "none"})
    assert unknown.status_code == 404
    with held_by_another_process(core_url):  # `crmi rollback` in another terminal
        busy = client.post(f"/names/{target}/decide", data={"csrf": token, "customer": "none"})
    assert busy.status_code == 423 and "crmi rollback on the consultant" in busy.text, busy.text
    assert busy.headers["retry-after"] == "30"
    assert decision(engine, target).status == "pending"  # nothing of the refusals was written

    first = client.post(
        f"/names/{target}/decide", data={"csrf": token, "customer": "none"}, follow_redirects=False
    )
    assert first.status_code == 303
    again = client.post(
        f"/names/{target}/decide", data={"csrf": token, "customer": str(customers["上海新元物流有限公司"])}
    )
    assert (
        again.status_code == 409
        and "already decided" in again.text
        and "crmi rollback steward-" in again.text
    )
    assert decision(engine, target).status == "no_match"
    engine.dispose()


@pytest.mark.slow
def test_names_decided_on_the_workbench_load_or_are_rejected_on_the_next_run(
    demo_project: Path, sqlite_core_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo's sales sheet names customers no single record matches: a steward decides two on the page (the
    first candidate; none), and the next `crmi run` loads the first one's rows onto that customer and rejects
    the second's with the steward's decision."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    run = ["run", "--project", str(demo_project), "--core-url", sqlite_core_url, "--json"]
    first = runner.invoke(cli, run)
    assert first.exit_code == 0, first.output
    [line] = [
        x
        for x in json.loads(first.stdout)["lines"]
        if (x["source"], x["entity"]) == ("sales_xlsx", "opportunity")
    ]
    engine = make_engine(sqlite_core_url)
    client, token = signed_in(engine, "wang", "steward")
    page = client.get("/names").text
    with Session(engine) as session:
        waiting = session.scalars(
            sa.select(ReferenceDecision).where(ReferenceDecision.status == "pending", ReferenceDecision.rows_held > 0)
        ).all()  # fmt: skip
    assert waiting and all(f'id="held-r{d.id}"' in page for d in waiting)
    linked = next(d for d in waiting if d.candidates)
    dropped = next(d for d in waiting if d.id != linked.id)
    target = linked.candidates[0]["id"]
    for decided, choice in ((linked, str(target)), (dropped, "none")):
        answer = client.post(f"/names/{decided.id}/decide", data={"csrf": token, "customer": choice},
                             follow_redirects=False)  # fmt: skip
        assert answer.status_code == 303, answer.text

    second = runner.invoke(cli, run)
    assert second.exit_code == 0, second.output
    [again] = [
        x
        for x in json.loads(second.stdout)["lines"]
        if (x["source"], x["entity"]) == ("sales_xlsx", "opportunity")
    ]
    assert again["held"] == line["held"] - linked.rows_held - dropped.rows_held
    assert again["loaded"] == line["loaded"] + linked.rows_held
    with Session(engine) as session:
        keys = {
            str(row["商机编号"])
            for row in session.scalars(
                sa.select(Reject.raw_row).where(Reject.value == linked.name, Reject.severity == "held")
            )
        }
        attached = session.scalars(
            sa.select(Opportunity.customer_id).join(ExternalId, ExternalId.entity_id == Opportunity.id)
            .where(ExternalId.entity == "opportunity", ExternalId.system == "sales_xlsx", ExternalId.external_key.in_(keys))
        ).all()  # fmt: skip
        reasons = session.scalars(
            sa.select(Reject.reason).where(Reject.value == dropped.name, Reject.severity == "error")
        ).all()
    assert attached and set(attached) == {target}
    assert len(reasons) >= dropped.rows_held and all("wang" in r for r in reasons), reasons
    engine.dispose()


def test_a_steward_decides_a_held_name_in_the_browser(sqlite_core_url: str) -> None:
    """In headless Chromium: the header's Held names link, a candidate chosen with its radio button, the
    decision's message with the golden record's link, and the name under "Decided lately"."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.browser import headless_chromium
    from tests.test_steward import serving

    engine, customers, names = held_core(sqlite_core_url)
    with engine.begin() as connection:
        security.add_user(connection, "wang", "steward", PASSWORD, actor="test")
    reference = f"r{names['广州新元物流公司']}"
    app = create_app(engine, Settings(rules=RULES, training_cache_seconds=0))
    with (
        headless_chromium(window="1400,1000", lang="zh-CN", page_timeout=20) as browser,
        serving(app) as base,
    ):
        wait = WebDriverWait(browser, 20)
        browser.get(f"{base}/queue")
        wait.until(ec.presence_of_element_located((By.ID, "sign-in")))
        browser.find_element(By.ID, "name").send_keys("wang")
        browser.find_element(By.ID, "password").send_keys(PASSWORD + Keys.ENTER)
        wait.until(ec.presence_of_element_located((By.ID, "nav-names"))).click()
        row = wait.until(ec.presence_of_element_located((By.ID, f"held-{reference}")))
        choice = row.find_element(By.CSS_SELECTOR, f"input[value='{customers['上海新元物流有限公司']}']")
        assert not choice.is_selected()  # nothing is chosen for the steward
        row.find_element(By.ID, f"decide-{reference}").click()  # the browser asks for a choice: nothing sent
        assert (
            browser.find_elements(By.ID, f"held-{reference}")
            and decision(engine, names["广州新元物流公司"]).status == "pending"
        )
        choice.click()
        row.find_element(By.ID, f"decide-{reference}").click()
        wait.until(ec.presence_of_element_located((By.ID, "flash-link")))
        assert "its 2 held row(s) load on the next run" in browser.find_element(By.ID, "flash").text
        decided = browser.find_element(By.ID, f"decided-{reference}").text
        assert "上海新元物流有限公司" in decided and "wang" in decided
        assert not browser.find_elements(By.ID, f"held-{reference}")
    assert decision(engine, names["广州新元物流公司"]).target_id == customers["上海新元物流有限公司"]
    engine.dispose()


@pytest.mark.slow
def test_a_name_decision_a_later_run_loaded_rows_by_is_rolled_back_with_that_run_only(
    demo_project: Path, sqlite_core_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A newcomer linked a held name, ran the migration (its rows loaded onto that customer), rolled back the
    steward run and decided "none": the rows stayed in the core on the first customer while the report counted
    them held, then rejected. Rolling back the decision is refused while a later run loaded rows by it (naming
    that run and --cascade); with --cascade both go and the core is as before the decision; "none" then rejects
    the rows and the core holds none of them."""
    from tests.test_runs import content

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    core = ["--core-url", sqlite_core_url]
    run = ["run", "--project", str(demo_project), *core, "--json"]
    assert runner.invoke(cli, run).exit_code == 0
    engine = make_engine(sqlite_core_url)
    before = content(engine)
    with Session(engine) as session:
        name = session.scalars(
            sa.select(ReferenceDecision).where(ReferenceDecision.status == "pending", ReferenceDecision.rows_held > 0)
            .where(ReferenceDecision.candidates != sa.JSON.NULL).order_by(ReferenceDecision.id)
        ).first()  # fmt: skip
    assert name is not None and name.candidates
    decided = runner.invoke(
        cli, ["dedup", "decide", f"r{name.id}", "--customer", str(name.candidates[0]["id"]), "--steward", "li",
              "--project", str(demo_project), *core],
    )  # fmt: skip
    assert decided.exit_code == 0, decided.output
    with Session(engine) as session:
        steward_run = session.scalars(sa.select(LoadRun.run_key).where(LoadRun.mode == "steward")).one()
    loaded = runner.invoke(cli, run)
    assert loaded.exit_code == 0, loaded.output
    later = json.loads(loaded.stdout)["run_id"]

    refused = runner.invoke(cli, ["rollback", steward_run, *core])
    assert refused.exit_code == 1, refused.output
    assert (
        f"later run(s) depend on {steward_run}: {later}" in refused.output and "--cascade" in refused.output
    )
    cascaded = runner.invoke(cli, ["rollback", steward_run, "--cascade", "--json", *core])
    assert cascaded.exit_code == 0, cascaded.output
    assert json.loads(cascaded.output) == {"rolled_back": [later, steward_run]}
    audit = {"steward_audit"}  # append-only: the decision's line stays
    assert {k: v for k, v in content(engine).items() if k not in audit} == {
        k: v for k, v in before.items() if k not in audit
    }

    none = runner.invoke(
        cli, ["dedup", "decide", f"r{name.id}", "--different", "--steward", "li", "--project", str(demo_project), *core]
    )  # fmt: skip
    assert none.exit_code == 0, none.output
    again = runner.invoke(cli, run)
    assert again.exit_code in (0, 2), again.output
    with Session(engine) as session:
        keys = {
            str(row["商机编号"])
            for row in session.scalars(sa.select(Reject.raw_row).where(Reject.value == name.name))
        }
        in_core = session.scalars(
            sa.select(ExternalId.external_key).where(
                ExternalId.entity == "opportunity", ExternalId.system == "sales_xlsx", ExternalId.external_key.in_(keys)
            )
        ).all()  # fmt: skip
    assert keys and in_core == []  # rejected, and none of them in the core
    engine.dispose()
