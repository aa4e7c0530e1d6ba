"""The steward workbench in a real browser: headless Chromium from Debian (``chromium``, ``chromium-driver``)
driven by Selenium with the system chromedriver (no browser download). Skipped with the reason when they
are missing, except under CI=true, where they must be there (``.ci/run`` installs them).

Set ``STEWARD_SCREENSHOT=docs/steward-cluster.png`` to refresh the documentation's screenshot of the
cluster page from this run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from crm_core.models import Customer, MergeLog
from tests.browser import headless_chromium
from tests.test_steward import PASSWORD, build_core, make_app, planted, serving

WAIT = 20  # seconds: the longest any page or redirect may take


@pytest.fixture
def browser() -> Iterator[Any]:
    with headless_chromium(window="1500,1100", lang="zh-CN", page_timeout=WAIT) as driver:
        yield driver


def test_a_steward_logs_in_filters_decides_with_the_keyboard_sees_the_golden_record_and_undoes(
    browser: Any, sqlite_core_url: str, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    engine = build_core(sqlite_core_url)
    pair = planted(engine, "宁波市甬兴模具有限责任公司")
    wait = WebDriverWait(browser, WAIT)
    with serving(make_app(engine)) as base:
        browser.get(f"{base}/queue")
        wait.until(ec.presence_of_element_located((By.ID, "sign-in")))  # no session: the login page
        browser.find_element(By.ID, "name").send_keys("wang")
        browser.find_element(By.ID, "password").send_keys(PASSWORD + Keys.ENTER)
        wait.until(ec.text_to_be_present_in_element((By.ID, "who"), "wang"))

        city = browser.find_element(By.ID, "city")
        city.send_keys("宁波市")
        browser.find_element(By.ID, "apply").click()
        wait.until(lambda d: "city=" in d.current_url)
        rows = browser.find_elements(By.CSS_SELECTOR, "table.queue tr[data-href]")
        assert rows and f"pair-{pair.id}" in {r.get_attribute("id") for r in rows}
        browser.find_element(By.CSS_SELECTOR, "body").send_keys("j")  # the keyboard selects the first row
        assert "selected" in (rows[0].get_attribute("class") or "")
        browser.find_element(By.CSS_SELECTOR, f"#pair-{pair.id} a.open").click()
        wait.until(ec.presence_of_element_located((By.ID, "records")))
        assert "held back: not merged" in browser.find_element(By.ID, "why").text

        # Choose another record's name for the golden record: the preview column follows.
        radios = browser.find_elements(By.CSS_SELECTOR, "input[name='field:name']")
        other = next(r for r in radios if not r.is_selected())
        chosen = other.get_attribute("data-value")
        other.click()
        preview = browser.find_element(By.CSS_SELECTOR, "[data-preview='name']")
        assert preview.text == chosen
        if target := os.environ.get("STEWARD_SCREENSHOT"):
            browser.save_screenshot(str(Path(target).resolve()))
        browser.save_screenshot(str(tmp_path / "cluster.png"))

        browser.find_element(By.CSS_SELECTOR, "body").send_keys("s")  # the same: merge, then the next cluster
        wait.until(ec.presence_of_element_located((By.ID, "flash-link")))
        assert "merged 2 customers" in browser.find_element(By.ID, "flash").text
        browser.find_element(By.ID, "flash-link").click()
        wait.until(ec.presence_of_element_located((By.ID, "merges")))
        with engine.connect() as connection:
            merge = connection.execute(sa.select(MergeLog).where(MergeLog.decided_by == "wang")).one()
            golden = connection.scalar(sa.select(Customer.name).where(Customer.id == merge.survivor_id))
        assert golden == chosen == browser.find_element(By.ID, "record-name").text
        row = browser.find_element(By.ID, f"merge-{merge.id}").text
        assert "steward decision" in row and "wang" in row
        assert "decide" in browser.find_element(By.ID, "record-audit").text

        browser.find_element(By.ID, f"undo-{merge.id}").click()
        wait.until(ec.alert_is_present()).accept()  # undo asks first
        wait.until(ec.text_to_be_present_in_element((By.ID, "flash"), f"undid merge {merge.id}"))
        assert "undone" in (browser.find_element(By.ID, f"merge-{merge.id}").get_attribute("class") or "")
        with engine.connect() as connection:
            assert connection.scalar(sa.select(MergeLog.undone_at).where(MergeLog.id == merge.id)) is not None

        browser.find_element(By.ID, "logout").click()
        wait.until(ec.presence_of_element_located((By.ID, "sign-in")))
        browser.get(f"{base}/queue")
        wait.until(ec.presence_of_element_located((By.ID, "sign-in")))  # signed out for good
    assert (tmp_path / "cluster.png").stat().st_size > 10_000
    engine.dispose()


def test_a_steward_works_the_whole_review_queue_to_zero_and_every_decision_is_audited_and_reversible(
    browser: Any, sqlite_core_url: str
) -> None:
    """Done-when of the workbench: the queue of a small demo core (customers and contacts) worked to zero
    in the browser with the keyboard (the same, every third cluster different), each decision an audit
    line, and every decision reversed again: merges undone, "different" pairs reopened (one of each from
    a golden record's page in the browser), leaving the records and the queue as they were."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from crm_core.models import Contact, MatchCandidate
    from crm_core.steward_models import AUDIT, USERS
    from integration.steward import decisions, security

    engine = build_core(sqlite_core_url, synthetic_pairs=4)
    with engine.connect() as connection:
        waiting = set(
            connection.scalars(sa.select(MatchCandidate.id).where(MatchCandidate.status == "review"))
        )
        pending = len(waiting)
        active = {
            model: connection.scalar(sa.select(sa.func.count()).where(model.merged_into_id.is_(None)))
            for model in (Customer, Contact)
        }
    assert pending and pending > 5
    wait = WebDriverWait(browser, WAIT)
    decided: list[str] = []
    with serving(make_app(engine)) as base:
        browser.get(f"{base}/login")
        wait.until(ec.presence_of_element_located((By.ID, "sign-in")))
        browser.find_element(By.ID, "name").send_keys("wang")
        browser.find_element(By.ID, "password").send_keys(PASSWORD)
        browser.find_element(By.ID, "sign-in").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "who"), "wang"))
        for entity in ("customer", "contact"):
            browser.get(f"{base}/queue?entity={entity}")
            wait.until(ec.presence_of_element_located((By.ID, "total")))
            if browser.find_element(By.ID, "total").text == "0":
                continue
            browser.find_element(By.CSS_SELECTOR, "body").send_keys("n")  # the next free cluster
            for _ in range(3 * pending):
                wait.until(lambda d: d.find_elements(By.ID, "records") or d.find_elements(By.ID, "total"))
                if not browser.find_elements(By.ID, "records"):
                    break  # back on the queue: nothing left in this tab
                page = browser.current_url
                key = "d" if len(decided) % 3 == 2 else "s"  # every third cluster different, else the same
                browser.find_element(By.CSS_SELECTOR, "body").send_keys(key)
                wait.until(lambda d, page=page: d.current_url != page or d.find_elements(By.ID, "problem"))
                if browser.find_elements(By.ID, "problem"):  # a merge refused (two credit codes): different
                    browser.get(page)
                    wait.until(ec.presence_of_element_located((By.ID, "records")))
                    browser.find_element(By.CSS_SELECTOR, "body").send_keys("d")
                    wait.until(lambda d, page=page: d.current_url != page)
                    key = "d"
                decided.append({"s": "same", "d": "different"}[key])
            wait.until(ec.text_to_be_present_in_element((By.ID, "flash"), "nothing left to review"))
            assert browser.find_element(By.ID, "total").text == "0"
        with engine.connect() as connection:
            assert connection.scalar(sa.select(sa.func.count()).where(MatchCandidate.status == "review")) == 0
            lines = connection.execute(
                sa.select(AUDIT.c.after).where(AUDIT.c.action == "decide").order_by(AUDIT.c.id)
            ).all()
            merges = connection.execute(
                sa.select(MergeLog.id, MergeLog.entity, MergeLog.survivor_id)
                .where(MergeLog.decided_by == "wang")
                .order_by(MergeLog.id)
            ).all()
        assert len(lines) == len(decided) and {"same", "different"} <= set(decided)
        assert [line.after["verdict"] for line in lines] == decided
        assert sorted(m for line in lines for m in line.after["merges"]) == [m.id for m in merges]
        # Every decision reversed: a "different" one reopened and the last merge undone from golden record
        # pages in the browser, the rest below (merges newest first, then the pairs reopened).
        with engine.connect() as connection:
            distinct = connection.execute(
                sa.select(MatchCandidate.id, MatchCandidate.entity, MatchCandidate.left_id)
                .where(MatchCandidate.status == "distinct", MatchCandidate.decided_by == "wang")
                .order_by(MatchCandidate.id)
            ).first()
        assert distinct is not None
        browser.get(f"{base}/records/{distinct.entity}/{distinct.left_id}")
        browser.find_element(By.ID, f"reopen-{distinct.id}").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "flash"), f"reopened pair {distinct.id}"))
        last = merges[-1]
        browser.get(f"{base}/records/{last.entity}/{last.survivor_id}")
        browser.find_element(By.ID, f"undo-{last.id}").click()
        wait.until(ec.alert_is_present()).accept()
        wait.until(ec.text_to_be_present_in_element((By.ID, "flash"), f"undid merge {last.id}"))
    with engine.connect() as connection:
        wang = connection.scalar(sa.select(USERS.c.id).where(USERS.c.name == "wang"))
    steward = security.Principal(int(wang), "wang", "steward", 0, "")
    for merge in reversed(merges[:-1]):
        decisions.undo(engine, merge.id, steward)
    with engine.connect() as connection:
        decided = list(
            connection.scalars(
                sa.select(MatchCandidate.id).where(
                    MatchCandidate.status.in_(("merged", "distinct")), MatchCandidate.decided_by == "wang"
                )
            )
        )
    for candidate_id in decided:
        decisions.reopen(engine, candidate_id, steward)
    with engine.connect() as connection:
        assert {
            model: connection.scalar(sa.select(sa.func.count()).where(model.merged_into_id.is_(None)))
            for model in (Customer, Contact)
        } == active
        assert connection.scalar(sa.select(sa.func.count()).where(AUDIT.c.action == "undo")) == len(merges)
        assert (
            connection.scalar(sa.select(sa.func.count()).where(AUDIT.c.action == "reopen"))
            == len(decided) + 1
        )
        again = set(connection.scalars(sa.select(MatchCandidate.id).where(MatchCandidate.status == "review")))
    assert waiting <= again  # every pair the steward worked is waiting again
    engine.dispose()
