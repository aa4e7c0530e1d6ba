"""The steward workbench over HTTP: sessions, roles, CSRF, the queue, cluster decisions, undo, audit, claims,
the golden record page and the duplicate-check API, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.testclient import TestClient

from crm_core.db import session_factory
from crm_core.loading import get_or_start_run
from crm_core.merging import record_candidates
from crm_core.models import Contact, Customer, ExternalId, MatchCandidate, MergeLog, Opportunity, SalesRep
from crm_core.runs import PARTIAL
from crm_core.steward_models import AUDIT, CLAIMS, SESSIONS, USERS
from integration.dedup.contacts import deduplicate_contacts
from integration.dedup.workflow import decide, deduplicate_customers, finish_run
from integration.steward import security
from integration.steward.app import COOKIE, Settings, create_app
from integration.steward.decisions import Rules
from tests.test_dedup_workflow import seed
from tests.test_matching_classes import code

PASSWORD = "correct horse battery"
USERS_OF = {"ada": "admin", "wang": "steward", "li": "steward", "zhao": "viewer"}
RULES = Rules(project="t", source_priority=("erp", "crm", "xlsx"), survivorship={"phone": "most_complete"})
XSS_NAMES = ("<script>alert('x')</script>有限公司", '"><img src=x onerror=alert(1)>贸易有限公司')


# --------------------------------------------------------------------------- a core with a review queue


def build_core(url: str, *, synthetic_pairs: int = 40) -> sa.Engine:
    """The linkage test companies (with contacts and opportunities), planted clusters a steward must decide,
    linkage and contact dedup run, plus synthetic pending pairs (recorded with the workflow's own function)
    spread over scores, sources and cities, and users of every role."""
    engine, _ = seed(url)
    if engine.dialect.name == "postgresql":  # the seed wrote explicit ids: move the sequences past them
        with engine.begin() as connection:
            for table in ("customers", "contacts", "external_ids", "opportunities"):
                connection.exec_driver_sql(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"
                )
    with session_factory(engine)() as session, session.begin():
        rep = SalesRep(name="销售甲", code="S1")
        session.add(rep)
        session.flush()
        for trade, phone in [("甬兴模具", "+8657488880000"), ("海曙包装", "+8657488880001")]:
            for name, body, system in [
                (f"宁波{trade}有限公司", "10000001", "crm"),
                (f"宁波市{trade}有限责任公司", None, "xlsx"),
                (f"宁波{trade}股份有限公司", "10000003", "crm"),
            ]:
                customer = Customer(name=name, credit_code=code("330203", body) if body else None, phone=phone,
                                    city="宁波市", owner_id=rep.id)  # fmt: skip
                session.add(customer)
                session.flush()
                session.add(ExternalId(entity="customer", entity_id=customer.id, system=system,
                                       external_key=f"{system.upper()}-{customer.id}"))  # fmt: skip
                session.add(Opportunity(customer_id=customer.id, name=f"{trade}商机{customer.id}",
                                        stage_code="proposal", amount=Decimal("50000.00"), owner_id=rep.id))  # fmt: skip
        for name, extra in zip(
            ("厦门腾达科技有限公司", "厦门腾讯科技有限公司", *XSS_NAMES), range(4), strict=True
        ):
            customer = Customer(name=name, phone=f"+865928600000{extra}", city="厦门市")
            session.add(customer)
            session.flush()
            session.add(
                ExternalId(entity="customer", entity_id=customer.id, system="crm", external_key=f"T-{extra}")
            )
    deduplicate_customers(engine, "dedup-1", "t", source_priority=list(RULES.source_priority))
    deduplicate_contacts(engine, "dedup-1", "t")
    finish_run(engine, "dedup-1", "t")
    add_pairs(engine, synthetic_pairs)
    with engine.begin() as connection:
        for name, role in USERS_OF.items():
            security.add_user(connection, name, role, PASSWORD, actor="test")
    return engine


def add_pairs(engine: sa.Engine, count: int) -> None:
    """Pending customer pairs between active records that no pair names yet (disjoint: each a cluster of 2),
    plus 腾达/腾讯 and the two names that try to inject markup."""
    with session_factory(engine)() as session, session.begin():
        named = {
            i
            for pair in session.execute(sa.select(MatchCandidate.left_id, MatchCandidate.right_id))
            for i in pair
        }
        free = [
            i for i in session.scalars(
                sa.select(Customer.id).where(Customer.merged_into_id.is_(None)).order_by(Customer.id)
            ) if i not in named
        ]  # fmt: skip
        ids = {
            n: session.scalar(sa.select(Customer.id).where(Customer.name == n))
            for n in ("厦门腾达科技有限公司", "厦门腾讯科技有限公司", *XSS_NAMES)
        }
        special = list(ids.values())
        free = [i for i in free if i not in special]
        scored: dict[tuple[int, int], tuple[float, dict[str, Any], str]] = {
            (ids["厦门腾达科技有限公司"], ids["厦门腾讯科技有限公司"]): (0.62, {"name_core_levenshtein": 1, "phones_overlap": 0}, "review"),
            (ids[XSS_NAMES[0]], ids[XSS_NAMES[1]]): (0.55, {"name_core_levenshtein": 0}, "review"),
        }  # fmt: skip
        pairs = min(count, len(free) // 2)
        for n in range(pairs):
            left, right = free[2 * n], free[2 * n + 1]
            scored[(left, right)] = (
                round(0.5 + 0.44 * n / max(1, pairs - 1), 4),
                {"name_core_levenshtein": 1},
                "review",
            )
        run = get_or_start_run(session, "seed-pairs", "t")
        record_candidates(session, run, "customer", scored)
        run.status = "succeeded"


@pytest.fixture
def core(core_url: str) -> Iterator[sa.Engine]:
    engine = build_core(core_url)
    yield engine
    engine.dispose()


@pytest.fixture
def sqlite_core(sqlite_core_url: str) -> Iterator[sa.Engine]:
    engine = build_core(sqlite_core_url)
    yield engine
    engine.dispose()


def make_app(engine: sa.Engine, timezone: str = "UTC") -> Starlette:
    return create_app(engine, Settings(rules=RULES, training_cache_seconds=0, timezone=timezone))


CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def login(client: TestClient, name: str, password: str = PASSWORD) -> Any:
    """Sign in through the form (its CSRF token paired with a cookie)."""
    form = client.get("/login")
    token = CSRF.search(form.text)
    assert token, form.text
    return client.post("/login", data={"csrf": token.group(1), "name": name, "password": password, "next": "/queue"},
                       follow_redirects=False)  # fmt: skip


def signed_in(engine: sa.Engine, name: str, timezone: str = "UTC") -> tuple[TestClient, str]:
    """A client signed in as ``name`` and its CSRF token (pages show instants in ``timezone``)."""
    client = TestClient(make_app(engine, timezone), base_url="http://127.0.0.1")
    done = login(client, name)
    assert done.status_code == 303, done.text
    page = client.get("/queue")
    token = CSRF.search(page.text)
    assert token
    return client, token.group(1)


def pending(engine: sa.Engine, entity: str = "customer") -> list[Any]:
    with engine.connect() as connection:
        return connection.execute(
            sa.select(MatchCandidate).where(MatchCandidate.status == "review", MatchCandidate.entity == entity)
            .order_by(MatchCandidate.id)
        ).all()  # fmt: skip


def planted(engine: sa.Engine, name: str) -> Any:
    """The pending pair whose records include a customer named ``name``."""
    with engine.connect() as connection:
        record = connection.scalar(sa.select(Customer.id).where(Customer.name == name))
        return connection.execute(
            sa.select(MatchCandidate).where(
                MatchCandidate.status == "review",
                sa.or_(MatchCandidate.left_id == record, MatchCandidate.right_id == record),
            )
        ).first()


def snapshot(engine: sa.Engine) -> dict[str, Any]:
    """What a refused request must leave as it was."""
    with engine.connect() as connection:
        return {
            "candidates": connection.execute(
                sa.select(MatchCandidate.id, MatchCandidate.status, MatchCandidate.decided_by).order_by(MatchCandidate.id)
            ).all(),
            "customers": connection.execute(
                sa.select(Customer.id, Customer.name, Customer.phone, Customer.merged_into_id).order_by(Customer.id)
            ).all(),
            "merges": connection.execute(sa.select(MergeLog.id, MergeLog.undone_at).order_by(MergeLog.id)).all(),
            "decisions": connection.scalar(
                sa.select(sa.func.count()).select_from(AUDIT).where(AUDIT.c.action.in_(("decide", "undo")))
            ),
        }  # fmt: skip


def audit_lines(engine: sa.Engine, action: str) -> list[Any]:
    with engine.connect() as connection:
        return connection.execute(sa.select(AUDIT).where(AUDIT.c.action == action).order_by(AUDIT.c.id)).all()


# --------------------------------------------------------------------------- sessions and security


def test_every_page_needs_a_session_and_a_refused_post_changes_nothing(sqlite_core: sa.Engine) -> None:
    client = TestClient(make_app(sqlite_core))
    pair = pending(sqlite_core)[0]
    for path in ("/queue", f"/cluster/{pair.id}", "/records/customer/1", "/audit", "/users"):
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"].startswith("/login?next="), path
    before = snapshot(sqlite_core)
    response = client.post(f"/cluster/{pair.id}/decide", data={"verdict": "same"}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"].startswith("/login")
    assert snapshot(sqlite_core) == before


def test_sign_in_sets_a_safe_cookie_and_sign_out_ends_the_session(sqlite_core: sa.Engine) -> None:
    client = TestClient(make_app(sqlite_core), base_url="http://127.0.0.1")
    response = login(client, "wang")
    assert response.status_code == 303 and response.headers["location"] == "/queue"
    cookie = next(h for h in response.headers.get_list("set-cookie") if h.startswith(f"{COOKIE}="))
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie
    token = cookie.split(";")[0].split("=", 1)[1]
    with sqlite_core.connect() as connection:
        stored = connection.scalar(sa.select(SESSIONS.c.token_hash))
    assert stored == security.token_hash(token) and token not in str(stored)
    page = client.get("/queue")
    assert page.status_code == 200 and 'id="who">wang<' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    assert token not in page.text and security.token_hash(token) not in page.text
    csrf = CSRF.search(page.text)
    assert csrf
    out = client.post("/logout", data={"csrf": csrf.group(1)}, follow_redirects=False)
    assert out.status_code == 303
    client.cookies.set(COOKIE, token)  # the old cookie replayed
    assert client.get("/queue", follow_redirects=False).status_code == 303
    actions = [a.action for a in audit_lines(sqlite_core, "login")] + [
        a.action for a in audit_lines(sqlite_core, "logout")
    ]
    assert actions == ["login", "logout"]


def test_a_wrong_password_is_refused_and_audited_and_failures_pause_sign_in(sqlite_core: sa.Engine) -> None:
    client = TestClient(make_app(sqlite_core))
    wrong = login(client, "wang", "not the password")
    assert wrong.status_code == 401 and "wrong name or password" in wrong.text
    assert PASSWORD not in wrong.text
    for _ in range(security.THROTTLE_FAILURES - 1):
        assert login(client, "wang", "still wrong").status_code == 401
    paused = login(client, "wang")  # the right password, too late
    assert paused.status_code == 429 and "too many failed sign-ins" in paused.text
    assert paused.headers["retry-after"] == str(int(security.THROTTLE_WINDOW.total_seconds()))
    other = TestClient(
        make_app(sqlite_core)
    )  # another name from the same address (testclient) still signs in
    assert login(other, "li").status_code == 303
    for n in range(security.THROTTLE_FAILURES_PER_ADDRESS - security.THROTTLE_FAILURES):
        assert login(client, f"guess{n}", "wrong").status_code == 401
    assert login(TestClient(make_app(sqlite_core)), "ada").status_code == 429  # the address is paused
    failed = audit_lines(sqlite_core, "login_failed")
    assert len(failed) == security.THROTTLE_FAILURES_PER_ADDRESS
    assert {f.actor for f in failed[: security.THROTTLE_FAILURES]} == {"wang"}
    assert all(PASSWORD not in str(tuple(f)) for f in failed)
    with sqlite_core.begin() as connection:  # the window passes
        connection.exec_driver_sql("DROP TRIGGER steward_audit_no_update")
        connection.execute(sa.update(AUDIT).values(at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=16)))
    assert login(TestClient(make_app(sqlite_core)), "wang").status_code == 303


def test_a_tampered_or_idle_session_cookie_is_refused(sqlite_core: sa.Engine) -> None:
    client, _ = signed_in(sqlite_core, "wang")
    token = client.cookies[COOKIE]
    tampered = TestClient(make_app(sqlite_core))
    tampered.cookies.set(COOKIE, token[:-2] + ("AA" if not token.endswith("AA") else "BB"))
    assert tampered.get("/queue", follow_redirects=False).status_code == 303
    assert client.get("/queue", follow_redirects=False).status_code == 200
    with sqlite_core.begin() as connection:
        connection.execute(
            sa.update(SESSIONS).values(last_seen_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=31))
        )
    assert client.get("/queue", follow_redirects=False).status_code == 303
    with sqlite_core.connect() as connection:
        assert connection.scalar(sa.select(sa.func.count()).select_from(SESSIONS)) == 0


def test_a_missing_or_wrong_csrf_token_is_refused_and_nothing_changes(core: sa.Engine) -> None:
    client, csrf = signed_in(core, "wang")
    pair = pending(core)[0]
    before = snapshot(core)
    for data in (
        {"verdict": "same"},
        {"verdict": "same", "csrf": "forged"},
        {"verdict": "same", "csrf": csrf + "x"},
    ):
        response = client.post(f"/cluster/{pair.id}/decide", data=data)
        assert response.status_code == 403 and "security token" in response.text
    assert client.post("/merges/1/undo", data={"csrf": ""}).status_code == 403
    assert snapshot(core) == before
    fresh = TestClient(make_app(core))
    no_token = fresh.post("/login", data={"name": "wang", "password": PASSWORD})
    assert no_token.status_code == 403 and COOKIE not in fresh.cookies


def test_a_viewer_reads_but_cannot_decide_undo_or_administer(sqlite_core: sa.Engine) -> None:
    client, csrf = signed_in(sqlite_core, "zhao")
    pair = pending(sqlite_core)[0]
    page = client.get(f"/cluster/{pair.id}")
    assert page.status_code == 200 and 'id="same"' not in page.text
    before = snapshot(sqlite_core)
    for path, data in ((f"/cluster/{pair.id}/decide", {"verdict": "same"}), ("/queue/next", {}),
                       (f"/cluster/{pair.id}/claim", {}), ("/merges/1/undo", {})):  # fmt: skip
        response = client.post(path, data={**data, "csrf": csrf})
        assert response.status_code == 403 and "steward role" in response.text, path
    assert snapshot(sqlite_core) == before
    assert client.get("/audit").status_code == 403 and client.get("/users").status_code == 403
    steward, _ = signed_in(sqlite_core, "wang")
    assert steward.get("/audit").status_code == 403
    admin, _ = signed_in(sqlite_core, "ada")
    assert admin.get("/audit").status_code == 200 and admin.get("/users").status_code == 200


JSON = {"Accept": "application/json"}
BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"  # Chromium


def is_problem(response: Any, status: int, detail: str) -> dict[str, Any]:
    """Assert an RFC 7807 problem of ``status`` whose detail says ``detail``; return its body."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/problem+json", response.headers
    body = response.json()
    assert (body["type"], body["status"], body["title"]) == ("about:blank", status, HTTPStatus(status).phrase)
    assert detail in body["detail"] and body["error"] == body["detail"], body
    return dict(body)


def test_a_caller_asking_for_json_gets_every_refusal_as_a_problem_and_a_browser_a_page(
    sqlite_core: sa.Engine,
) -> None:
    """A script whose Accept prefers application/json gets the workbench's refusals as RFC 7807
    problem+json: no session 401 (not a redirect to the sign-in page), CSRF and role 403, unknown pair, merge
    or page 404, a bad form 400, a wrong password 401, throttled sign-in 429 with Retry-After. A browser, a
    caller sending */* or one preferring HTML gets the pages as before. Nothing changes."""
    pair = pending(sqlite_core)[0]
    before = snapshot(sqlite_core)
    anonymous = TestClient(make_app(sqlite_core))
    decide = f"/cluster/{pair.id}/decide"
    is_problem(anonymous.post(decide, data={"verdict": "same"}, headers=JSON, follow_redirects=False), 401,
               "sign in at /login")  # fmt: skip
    is_problem(anonymous.get("/queue", headers=JSON, follow_redirects=False), 401, "sign in at /login")
    browser = anonymous.post(
        decide, data={"verdict": "same"}, headers={"Accept": BROWSER}, follow_redirects=False
    )
    assert browser.status_code == 303 and browser.headers["location"].startswith("/login?next=")
    steward, csrf = signed_in(sqlite_core, "wang")
    viewer, viewer_csrf = signed_in(sqlite_core, "zhao")
    is_problem(steward.post(decide, data={"verdict": "same"}, headers=JSON), 403, "security token")
    is_problem(viewer.post(decide, data={"csrf": viewer_csrf, "verdict": "same"}, headers=JSON), 403,
               "this needs the steward role")  # fmt: skip
    is_problem(steward.post("/cluster/999999/decide", data={"csrf": csrf, "verdict": "same"}, headers=JSON),
               404, "no pair 999999")  # fmt: skip
    is_problem(
        steward.post("/merges/999999/undo", headers={"X-CSRF-Token": csrf, **JSON}), 404, "no merge 999999"
    )
    is_problem(steward.post(decide, data={"csrf": csrf, "verdict": "maybe"},
                            headers={"Accept": "application/problem+json"}), 400, "choose same")  # fmt: skip
    is_problem(steward.get("/no/such/page", headers=JSON), 404, "no such page")
    for accept in (BROWSER, "*/*", "application/json;q=0.5, text/html", "application/json, text/html"):
        page = steward.post(decide, data={"csrf": csrf, "verdict": "maybe"}, headers={"Accept": accept})
        assert page.status_code == 400 and page.headers["content-type"].startswith("text/html"), accept
        assert "choose same, different or split" in page.text and "retry-after" not in page.headers, accept
    assert snapshot(sqlite_core) == before
    form = TestClient(make_app(sqlite_core))
    token = CSRF.search(form.get("/login").text)
    assert token
    wrong = {"csrf": token.group(1), "name": "li", "password": "not it", "next": "/queue"}
    for _ in range(security.THROTTLE_FAILURES):
        refused = is_problem(form.post("/login", data=wrong, headers=JSON), 401, "wrong name or password")
        assert PASSWORD not in str(refused)
    paused = form.post("/login", data={**wrong, "password": PASSWORD}, headers=JSON)
    is_problem(paused, 429, "too many failed sign-ins")
    assert paused.headers["retry-after"] == str(int(security.THROTTLE_WINDOW.total_seconds()))


def test_names_with_markup_are_shown_escaped(sqlite_core: sa.Engine) -> None:
    client, _ = signed_in(sqlite_core, "wang")
    pair = planted(sqlite_core, XSS_NAMES[0])
    pages = [client.get("/queue?sort=oldest&per_page=200"), client.get(f"/cluster/{pair.id}"),
             client.get(f"/records/customer/{pair.left_id}")]  # fmt: skip
    for page in pages:
        assert page.status_code == 200
        assert "<script>alert" not in page.text and "<img src=x" not in page.text
        assert "&lt;script&gt;alert(" in page.text or "&lt;script&gt;" in page.text
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in pages[1].text
    scripts = re.findall(r"<script[^>]*>", "".join(p.text for p in pages))
    assert set(scripts) == {'<script src="/static/steward.js" defer>'}


def test_audit_lines_cannot_be_changed_or_deleted(core: sa.Engine) -> None:
    _client, _ = signed_in(core, "wang")
    for statement in (sa.update(AUDIT).values(actor="mallory"), sa.delete(AUDIT)):
        with pytest.raises(sa.exc.DBAPIError, match="append-only"), core.begin() as connection:
            connection.execute(statement)
    assert audit_lines(core, "login")[0].actor == "wang"


# --------------------------------------------------------------------------- the queue


def test_queue_filters_sorts_pages_and_counts_in_sql(sqlite_core: sa.Engine) -> None:
    client, _ = signed_in(sqlite_core, "wang")
    everything = pending(sqlite_core)
    contacts = pending(sqlite_core, "contact")
    page = client.get("/queue")
    assert page.status_code == 200
    assert f'id="total">{len(everything)}<' in page.text
    assert f'id="tab-contact">contacts <span class="count">{len(contacts)}<' in page.text

    def shown(query: str) -> tuple[int, list[int]]:
        html = client.get(f"/queue?{query}").text
        total = re.search(r'id="total">([\d,]+)<', html)
        assert total, html
        return int(total.group(1).replace(",", "")), [int(i) for i in re.findall(r'id="pair-(\d+)"', html)]

    total, ids = shown("sort=score_desc&per_page=25")
    scores = {p.id: p.probability for p in everything}
    assert total == len(everything) and len(ids) == 25
    assert [scores[i] for i in ids] == sorted((scores[i] for i in ids), reverse=True)
    assert scores[ids[0]] == max(scores.values())
    second = shown("sort=score_desc&per_page=25&page=2")[1]
    assert not set(ids) & set(second) and len(ids) + len(second) == min(50, total)
    total, ids = shown("band=high&per_page=200")
    assert total == sum(s >= 0.8 for s in scores.values()) and all(scores[i] >= 0.8 for i in ids)
    total, ids = shown("min=0.6&max=0.7&per_page=200")
    assert total == sum(0.6 <= s <= 0.7 for s in scores.values()) > 0
    total, ids = shown("sort=uncertain&per_page=200")
    assert [abs(scores[i] - 0.5) for i in ids] == sorted(abs(scores[i] - 0.5) for i in ids)
    total, ids = shown("city=宁波市&per_page=200")
    with sqlite_core.connect() as connection:
        ningbo = set(connection.scalars(sa.select(Customer.id).where(Customer.city == "宁波市")))
    assert total == sum(p.left_id in ningbo or p.right_id in ningbo for p in everything) > 0
    total, ids = shown("source=crm&per_page=200")
    with sqlite_core.connect() as connection:
        crm = set(connection.scalars(sa.select(ExternalId.entity_id).where(ExternalId.system == "crm")))
    assert 0 < total == sum(p.left_id in crm or p.right_id in crm for p in everything) < len(everything)
    total, ids = shown("entity=contact&per_page=200")
    assert total == len(contacts) and set(ids) == {p.id for p in contacts}


def test_filter_values_are_data_never_sql(sqlite_core: sa.Engine) -> None:
    client, _ = signed_in(sqlite_core, "wang")
    before = snapshot(sqlite_core)
    for query in ("city=x'%20OR%20'1'='1", "source=erp'--", "city=%27%3B%20DROP%20TABLE%20customers%3B--",
                  "assigned=nobody'%20OR%201=1--"):  # fmt: skip
        page = client.get(f"/queue?{query}")
        assert page.status_code == 200 and 'id="total">0<' in page.text, query
    for query in ("entity=customer'--", "sort=probability;DROP", "min=1e9", "band=1%20OR%201=1", "page=-1"):
        page = client.get(f"/queue?{query}")
        assert page.status_code == 400, query
    assert snapshot(sqlite_core) == before


# --------------------------------------------------------------------------- decisions


def test_a_merge_through_the_workbench_equals_the_workflow_decision_and_is_audited(
    core: sa.Engine, core_url: str, tmp_path: Any
) -> None:
    pair = planted(core, "宁波市甬兴模具有限责任公司")
    twin = build_core(f"sqlite:///{tmp_path / 'twin.sqlite'}")
    decide(twin, pair.id, same=True, steward="wang", run_key="twin", project="t",
           source_priority=list(RULES.source_priority), survivorship=dict(RULES.survivorship))  # fmt: skip
    client, csrf = signed_in(core, "wang")
    page = client.get(f"/cluster/{pair.id}")
    assert page.status_code == 200
    fingerprint = re.search(r'name="fingerprint" value="([^"]+)"', page.text)
    assert fingerprint
    done = client.post(f"/cluster/{pair.id}/decide", data={"csrf": csrf, "verdict": "same",
                                                          "fingerprint": fingerprint.group(1)},
                       follow_redirects=False)  # fmt: skip
    assert done.status_code == 303, done.text
    columns = (Customer.id, Customer.name, Customer.credit_code, Customer.phone, Customer.merged_into_id)
    with core.connect() as mine, twin.connect() as theirs:
        ids = [pair.left_id, pair.right_id]
        assert mine.execute(sa.select(*columns).where(Customer.id.in_(ids)).order_by(Customer.id)).all() == \
            theirs.execute(sa.select(*columns).where(Customer.id.in_(ids)).order_by(Customer.id)).all()  # fmt: skip
        decided = mine.execute(sa.select(MatchCandidate).where(MatchCandidate.id == pair.id)).one()
        merge = mine.execute(sa.select(MergeLog).where(MergeLog.decided_by == "wang")).one()
    twin.dispose()
    assert decided.status == "merged" and decided.decided_by == "wang"
    line = audit_lines(core, "decide")[-1]
    assert line.actor == "wang" and line.ip == "testclient" and line.entity == "customer"
    assert line.record_id == merge.survivor_id and line.after["merges"] == [merge.id]
    assert set(line.before["records"]) == {str(merge.survivor_id), str(merge.merged_id)}
    golden = client.get(f"/records/customer/{merge.survivor_id}")
    assert (
        f'id="merge-{merge.id}"' in golden.text
        and "steward decision" in golden.text
        and "wang" in golden.text
    )
    with core.connect() as connection:
        assert connection.scalar(sa.select(sa.func.count()).select_from(CLAIMS)) == 0  # released


def test_a_stewards_field_choice_makes_the_golden_value_and_undo_restores_it(core: sa.Engine) -> None:
    pair = planted(core, "宁波市海曙包装有限责任公司")
    client, csrf = signed_in(core, "wang")
    page = client.get(f"/cluster/{pair.id}")
    names = re.findall(r'name="field:name" value="(\d+)"', page.text)
    assert len(names) == 2, page.text
    default = re.search(r'name="default:name" value="(\d+)"', page.text)
    assert default
    other = next(i for i in names if i != default.group(1))
    with core.connect() as connection:
        wanted = connection.scalar(sa.select(Customer.name).where(Customer.id == int(other)))
        before = connection.execute(
            sa.select(Customer).where(Customer.id.in_([pair.left_id, pair.right_id]))
        ).all()
    fingerprint = re.search(r'name="fingerprint" value="([^"]+)"', page.text)
    assert fingerprint
    done = client.post(f"/cluster/{pair.id}/decide", data={
        "csrf": csrf, "verdict": "same", "fingerprint": fingerprint.group(1), "field:name": other,
        "default:name": default.group(1),
    }, follow_redirects=False)  # fmt: skip
    assert done.status_code == 303
    with core.connect() as connection:
        merge = connection.execute(sa.select(MergeLog).where(MergeLog.decided_by == "wang")).one()
        survivor_name = connection.scalar(sa.select(Customer.name).where(Customer.id == merge.survivor_id))
    assert survivor_name == wanted
    assert audit_lines(core, "decide")[-1].after["chosen"] == {"name": int(other)}
    golden = client.get(f"/records/customer/{merge.survivor_id}")
    assert f'id="undo-{merge.id}"' in golden.text
    undone = client.post(f"/merges/{merge.id}/undo", data={"csrf": csrf}, follow_redirects=False)
    assert undone.status_code == 303
    with core.connect() as connection:
        after = connection.execute(
            sa.select(Customer).where(Customer.id.in_([pair.left_id, pair.right_id]))
        ).all()
        status = connection.scalar(sa.select(MatchCandidate.status).where(
            MatchCandidate.left_id == min(merge.survivor_id, merge.merged_id),
            MatchCandidate.right_id == max(merge.survivor_id, merge.merged_id)))  # fmt: skip
    assert [(r.name, r.phone, r.credit_code, r.merged_into_id) for r in after] == [
        (r.name, r.phone, r.credit_code, r.merged_into_id) for r in before
    ]
    assert status == "distinct"
    line = audit_lines(core, "undo")[-1]
    assert line.actor == "wang" and line.before["merge"] == merge.id


def test_different_marks_the_pairs_distinct_and_linkage_never_proposes_them_again(
    sqlite_core: sa.Engine,
) -> None:
    pair = planted(sqlite_core, "宁波市甬兴模具有限责任公司")
    client, csrf = signed_in(sqlite_core, "wang")
    done = client.post(f"/cluster/{pair.id}/decide", data={"csrf": csrf, "verdict": "different"},
                       follow_redirects=False)  # fmt: skip
    assert done.status_code == 303
    with sqlite_core.connect() as connection:
        status = connection.scalar(sa.select(MatchCandidate.status).where(MatchCandidate.id == pair.id))
    assert status == "distinct"
    deduplicate_customers(sqlite_core, "dedup-2", "t", finish=True)
    assert pair.id not in {p.id for p in pending(sqlite_core)}
    panel = re.search(r'<p class="note" id="training">(.*?)</p>', client.get("/queue").text, re.S)
    assert panel, "no training panel"
    words = " ".join(re.sub(r"<[^>]+>", "", panel.group(1)).split())
    assert (
        "0 the same, 1 different" in words and "ECM (unsupervised)" in words and "needs 10 of each" in words
    )


def test_a_different_decision_is_reopened_from_the_golden_record_and_audited(sqlite_core: sa.Engine) -> None:
    pair = planted(sqlite_core, "宁波市甬兴模具有限责任公司")
    client, csrf = signed_in(sqlite_core, "wang")
    assert client.post(f"/cluster/{pair.id}/decide", data={"csrf": csrf, "verdict": "different"},
                       follow_redirects=False).status_code == 303  # fmt: skip
    with sqlite_core.connect() as connection:
        distinct = connection.execute(
            sa.select(MatchCandidate).where(
                MatchCandidate.status == "distinct", MatchCandidate.decided_by == "wang"
            )
        ).all()
    assert pair.id in {p.id for p in distinct}
    page = client.get(f"/records/customer/{pair.left_id}").text
    assert f'id="reopen-{pair.id}"' in page and "Marked different" in page
    other, other_csrf = signed_in(sqlite_core, "li")  # another steward: reopens only their own
    assert f'id="reopen-{pair.id}"' not in other.get(f"/records/customer/{pair.left_id}").text
    refused = other.post(f"/pairs/{pair.id}/reopen", data={"csrf": other_csrf, "back": str(pair.left_id)})
    assert refused.status_code == 403
    assert (
        client.post(f"/pairs/{pair.id}/reopen", data={"back": str(pair.left_id)}).status_code == 403
    )  # no CSRF
    done = client.post(f"/pairs/{pair.id}/reopen", data={"csrf": csrf, "back": str(pair.left_id)},
                       follow_redirects=False)  # fmt: skip
    assert done.status_code == 303 and done.headers["location"] == f"/records/customer/{pair.left_id}"
    with sqlite_core.connect() as connection:
        row = connection.execute(sa.select(MatchCandidate).where(MatchCandidate.id == pair.id)).one()
    assert (row.status, row.decided_by, row.decided_at) == ("review", None, None)
    assert pair.id in {p.id for p in pending(sqlite_core)}
    line = audit_lines(sqlite_core, "reopen")[-1]
    assert line.actor == "wang" and line.before["status"] == "distinct" and line.after == {"status": "review"}
    again = client.post(f"/pairs/{pair.id}/reopen", data={"csrf": csrf})
    assert again.status_code == 409 and "waiting for a steward already" in again.text


def test_the_queue_shows_the_supervised_models_precision_and_recall_on_the_decided_pairs(
    sqlite_core: sa.Engine,
) -> None:
    from integration.dedup.customers import CUSTOMER_SPEC
    from integration.dedup.linkage import cross_validate
    from integration.dedup.workflow import steward_labels

    client, _ = signed_in(sqlite_core, "wang")
    words = " ".join(re.sub(r"<[^>]+>", "", client.get("/queue").text).split())
    assert (
        "Its precision and recall on the decided pairs are shown once there are 10 decisions each way"
        in words
    )
    alike = {c.name: 0 for c in CUSTOMER_SPEC.comparisons} | {"name_core_levenshtein": 2, "phones_overlap": 1}
    unlike = {c.name: 0 for c in CUSTOMER_SPEC.comparisons}
    decided = [(alike, "merged")] * 12 + [(unlike, "distinct")] * 12 + [(alike, "distinct")] * 3
    with sqlite_core.begin() as connection:
        connection.execute(sa.insert(MatchCandidate.__table__), [
            {"entity": "customer", "left_id": 900_000 + 2 * n, "right_id": 900_001 + 2 * n, "probability": 0.7,
             "features": features, "status": status, "decided_by": "wang"}
            for n, (features, status) in enumerate(decided)
        ])  # fmt: skip
    with session_factory(sqlite_core)() as session:
        labels = steward_labels(session, CUSTOMER_SPEC)
    assert labels is not None
    expected = cross_validate(labels, CUSTOMER_SPEC)
    assert expected is not None and expected.recall == 1.0 and expected.precision < 1.0
    panel = re.search(r'<p class="note" id="training">(.*?)</p>', client.get("/queue").text, re.S)
    assert panel, "no training panel"
    words = " ".join(re.sub(r"<[^>]+>", "", panel.group(1)).split())
    assert f"{expected.same} the same" in words and "supervised (logistic regression" in words
    assert f"cross-validated on the {expected.pairs} decided pairs ({expected.folds} folds" in words
    assert f"precision {expected.precision * 100:.0f}%, recall 100%" in words


def test_a_cluster_splits_into_groups(sqlite_core: sa.Engine) -> None:
    with session_factory(sqlite_core)() as session, session.begin():
        trio = [Customer(name=f"兰州{n}号机电有限公司", city="兰州市") for n in (1, 2, 3)]
        session.add_all(trio)
        session.flush()
        a, b, c = (t.id for t in trio)
    with session_factory(sqlite_core)() as session, session.begin():
        run = get_or_start_run(session, "three", "t")
        record_candidates(
            session, run, "customer", {(b, c): (0.7, {}, "review"), (a, b): (0.6, {}, "review")}
        )
        run.status = "succeeded"
    with sqlite_core.connect() as connection:
        pair = connection.execute(sa.select(MatchCandidate).where(MatchCandidate.left_id == b)).one()
    client, csrf = signed_in(sqlite_core, "wang")
    page = client.get(f"/cluster/{pair.id}")
    assert "3 record(s), 2 pending pair(s)" in page.text and 'id="split"' in page.text
    done = client.post(f"/cluster/{pair.id}/decide", data={
        "csrf": csrf, "verdict": "split", f"group:{a}": "A", f"group:{b}": "A", f"group:{c}": "B",
    }, follow_redirects=False)  # fmt: skip
    assert done.status_code == 303, done.text
    with sqlite_core.connect() as connection:
        statuses = dict(connection.execute(
            sa.select(MatchCandidate.left_id, MatchCandidate.status).where(MatchCandidate.left_id.in_([a, b]))
        ).all())  # fmt: skip
        merged = connection.execute(
            sa.select(Customer.id, Customer.merged_into_id).where(Customer.id.in_([a, b, c]))
        ).all()
    assert statuses == {a: "merged", b: "distinct"}
    pointers = dict(merged)
    assert pointers[c] is None and {pointers[a], pointers[b]} in ({None, a}, {None, b})


def test_a_stale_page_is_refused(sqlite_core: sa.Engine) -> None:
    pair = planted(sqlite_core, "宁波市甬兴模具有限责任公司")
    client, csrf = signed_in(sqlite_core, "wang")
    before = snapshot(sqlite_core)
    response = client.post(
        f"/cluster/{pair.id}/decide", data={"csrf": csrf, "verdict": "same", "fingerprint": "0" * 32}
    )
    assert response.status_code == 409 and "changed since the page was opened" in response.text
    assert snapshot(sqlite_core) == before


# --------------------------------------------------------------------------- claims


def test_two_stewards_never_work_the_same_cluster(core: sa.Engine) -> None:
    wang, wang_csrf = signed_in(core, "wang")
    li, li_csrf = signed_in(core, "li")
    opened = wang.post(
        "/queue/next", data={"csrf": wang_csrf, "queue": "sort=score_desc"}, follow_redirects=False
    )
    assert opened.status_code == 303
    first = int(re.search(r"/cluster/(\d+)", opened.headers["location"]).group(1))  # type: ignore[union-attr]
    page = li.get(f"/cluster/{first}")
    assert (
        'id="held"' in page.text
        and "wang is working on this cluster" in page.text
        and 'id="same"' not in page.text
    )
    before = snapshot(core)
    refused = li.post(f"/cluster/{first}/decide", data={"csrf": li_csrf, "verdict": "same"})
    assert refused.status_code == 409 and "wang is working on this cluster" in refused.text
    assert snapshot(core) == before
    theirs = li.post(
        "/queue/next", data={"csrf": li_csrf, "queue": "sort=score_desc"}, follow_redirects=False
    )
    second = int(re.search(r"/cluster/(\d+)", theirs.headers["location"]).group(1))  # type: ignore[union-attr]
    assert second != first
    mine = wang.get("/queue?assigned=me&per_page=200").text
    assert f'id="pair-{first}"' in mine and f'id="pair-{second}"' not in mine
    free = li.get("/queue?assigned=available&per_page=200").text
    assert f'id="pair-{first}"' not in free and f'id="pair-{second}"' in free
    admin, admin_csrf = signed_in(core, "ada")
    given = admin.post(
        f"/cluster/{first}/assign", data={"csrf": admin_csrf, "user": "li"}, follow_redirects=False
    )
    assert given.status_code == 303
    assert li.post(f"/cluster/{first}/decide", data={"csrf": li_csrf, "verdict": "different"},
                   follow_redirects=False).status_code == 303  # fmt: skip
    assert [a.summary for a in audit_lines(core, "assign")] == [f"assigned pair {first} to li"]


def test_claims_race_ends_with_one_claim(core: sa.Engine) -> None:
    from integration.steward.cluster import claim

    with core.connect() as connection:
        users = dict(connection.execute(sa.select(USERS.c.name, USERS.c.id)).all())
    ids = [10_001, 10_002, 10_003]
    barrier = threading.Barrier(2)
    outcome: dict[str, str] = {}

    def take(name: str) -> None:
        barrier.wait(timeout=10)
        try:
            with core.begin() as connection:
                claim(connection, "customer", ids, users[name])
            outcome[name] = "claimed"
        except Exception as exc:
            outcome[name] = type(exc).__name__

    threads = [threading.Thread(target=take, args=(n,)) for n in ("wang", "li")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(outcome.values()).count("claimed") == 1, outcome
    with core.connect() as connection:
        holders = set(connection.scalars(sa.select(CLAIMS.c.user_id).where(CLAIMS.c.record_id.in_(ids))))
    assert len(holders) == 1


def test_undo_rights_follow_the_roles(sqlite_core: sa.Engine) -> None:
    pair = planted(sqlite_core, "宁波市甬兴模具有限责任公司")
    wang, wang_csrf = signed_in(sqlite_core, "wang")
    wang.post(f"/cluster/{pair.id}/decide", data={"csrf": wang_csrf, "verdict": "same"})
    with sqlite_core.connect() as connection:
        mine = connection.scalar(sa.select(MergeLog.id).where(MergeLog.decided_by == "wang"))
        automatic = connection.scalar(sa.select(MergeLog.id).where(MergeLog.decided_by == "linkage"))
    li, li_csrf = signed_in(sqlite_core, "li")
    refused = li.post(f"/merges/{mine}/undo", data={"csrf": li_csrf})
    assert refused.status_code == 403 and "only an admin" in refused.text
    assert (
        li.post(f"/merges/{automatic}/undo", data={"csrf": li_csrf}, follow_redirects=False).status_code
        == 303
    )
    admin, admin_csrf = signed_in(sqlite_core, "ada")
    assert (
        admin.post(f"/merges/{mine}/undo", data={"csrf": admin_csrf}, follow_redirects=False).status_code
        == 303
    )
    again = admin.post(f"/merges/{mine}/undo", data={"csrf": admin_csrf})
    assert again.status_code == 409 and "already undone" in again.text
    assert [a.actor for a in audit_lines(sqlite_core, "undo")] == ["li", "ada"]


# --------------------------------------------------------------------------- pages


def test_the_cluster_page_explains_the_pair_and_diffs_the_names(sqlite_core: sa.Engine) -> None:
    client, _ = signed_in(sqlite_core, "zhao")
    pair = planted(sqlite_core, "厦门腾达科技有限公司")
    page = client.get(f"/cluster/{pair.id}").text
    assert '<span class="diff">达</span>' in page and '<span class="diff">讯</span>' in page
    assert "names 75% alike" in page and "same city (厦门市)" in page and "different phones" in page
    assert '<span class="system">crm</span> T-0' in page
    ningbo = planted(sqlite_core, "宁波市甬兴模具有限责任公司")
    page = client.get(f"/cluster/{ningbo.id}").text
    assert "held back: not merged: the cluster would hold two credit codes" in page
    assert "credit code on one side only" in page and "same phone" in page
    # the rows name the fields in words, on the golden record's page too, never by column
    record = client.get(f"/records/customer/{ningbo.left_id}").text
    for shown in (page, record):
        assert "<th>credit code (统一社会信用代码)</th>" in shown
        assert not re.search(r"<th>\w+_\w+</th>", shown), re.findall(r"<th>\w+_\w+</th>", shown)
    assert "<th>short name</th>" in record and "<th>credit code as written</th>" in record


def test_the_preview_is_what_the_merge_makes(sqlite_core: sa.Engine) -> None:
    from integration.steward.cluster import build_view, find_cluster

    for name in ("宁波市甬兴模具有限责任公司", "厦门腾达科技有限公司"):
        pair = planted(sqlite_core, name)
        with sqlite_core.connect() as connection:
            view = build_view(connection, find_cluster(connection, pair.id), RULES.source_priority,
                              RULES.survivorship)  # fmt: skip
        client, csrf = signed_in(sqlite_core, "wang")
        client.post(f"/cluster/{pair.id}/decide", data={"csrf": csrf, "verdict": "same"})
        with sqlite_core.connect() as connection:
            survivor = (
                connection.execute(sa.select(Customer).where(Customer.id == view.order[0])).mappings().one()
            )
        assert {f.name: view.preview[f.name] for f in view.fields} == {
            f.name: survivor[f.name] for f in view.fields
        }


def test_the_audit_list_of_a_record_shows_every_decision_on_it_and_its_channel(
    sqlite_core: sa.Engine, sqlite_core_url: str
) -> None:
    # A newcomer steward decided pairs with `crmi dedup decide` and a sheet: the golden record's Audit list
    # showed the workbench's decisions only. Every decision shows on each record it decided, with its channel.
    import io

    from openpyxl import load_workbook
    from typer.testing import CliRunner

    from integration.cli import app

    def audit_rows(client: TestClient, record: int) -> list[str]:
        page = client.get(f"/records/customer/{record}").text
        table = page.split('id="record-audit"')[1].split("</table>")[0]
        return [re.sub(r"<[^>]+>", " ", row) for row in re.findall(r"<tr>(.*?)</tr>", table)[1:]]

    from integration.steward.cluster import active_ids

    with (
        sqlite_core.connect() as connection
    ):  # the golden records a pair stands for (decisions are about them)
        golden = active_ids(
            connection, "customer", [i for p in pending(sqlite_core) for i in (p.left_id, p.right_id)]
        )

    def ends(pair: Any) -> set[int]:
        return {golden[pair.left_id], golden[pair.right_id]}

    pairs = pending(sqlite_core)
    by_cli = pairs[0]
    apart = [p for p in pairs[1:] if not ends(p) & ends(by_cli)]
    by_sheet = apart[0]
    by_web = next(p for p in apart[1:] if not ends(p) & (ends(by_cli) | ends(by_sheet)))
    core = ["--core-url", sqlite_core_url]
    decided = CliRunner().invoke(app, ["dedup", "decide", str(by_cli.id), "--same", "--steward", "li", *core])
    assert decided.exit_code == 0, decided.output
    client, csrf = signed_in(sqlite_core, "wang")
    book = load_workbook(io.BytesIO(client.get("/queue/export.xlsx?sort=oldest").content))
    for row in list(book["queue"].iter_rows())[1:]:
        row[4].value = "different" if row[0].value == by_sheet.id else None
    out = io.BytesIO()
    book.save(out)
    files = {"sheet": ("queue.xlsx", out.getvalue(), "application/octet-stream")}
    assert client.post("/queue/import", data={"csrf": csrf}, files=files).status_code == 200
    assert client.post(f"/cluster/{by_web.id}/decide", data={"csrf": csrf, "verdict": "different"},
                       follow_redirects=False).status_code == 303  # fmt: skip
    for pair, who, channel in (
        (by_cli, "li", "CLI"),
        (by_sheet, "wang", "sheet"),
        (by_web, "wang", "workbench"),
    ):
        for record in ends(pair):
            rows = [r for r in audit_rows(client, record) if " decide" in r]
            assert rows and all(f" {who} " in r and f" {channel} " in r for r in rows), (record, rows)
    with sqlite_core.connect() as connection:
        merge = connection.scalar(sa.select(MergeLog.id).where(MergeLog.decided_by == "li"))
    undone = CliRunner().invoke(app, ["dedup", "undo", str(merge), "--steward", "li", *core])
    assert undone.exit_code == 0, undone.output
    for record in ends(by_cli):
        rows = [r for r in audit_rows(client, record) if " undo" in r]
        assert rows and all(" li " in r and " CLI " in r for r in rows), (record, audit_rows(client, record))


def test_a_value_written_two_ways_is_one_choice_in_its_most_complete_spelling(sqlite_core: sa.Engine) -> None:
    # A newcomer steward was offered 上海市 and 上海 as two cities to choose from: one city written two ways.
    from integration.dedup.normalize import phone_keys
    from integration.geo import city_of_name
    from integration.steward.cluster import build_view, find_cluster

    pair = planted(sqlite_core, "厦门腾达科技有限公司")
    with sqlite_core.begin() as connection:
        view = build_view(
            connection, find_cluster(connection, pair.id), RULES.source_priority, RULES.survivorship
        )
        survivor, other = view.order[:2]
        for record, city, phone in (
            (survivor, "上海", "021-50001111"),
            (other, "上海市", "+86 21 5000 1111"),
        ):
            connection.execute(
                sa.update(Customer).where(Customer.id == record).values(city=city, phone=phone)
            )
        view = build_view(
            connection, find_cluster(connection, pair.id), RULES.source_priority, RULES.survivorship
        )
    assert city_of_name("上海") == city_of_name("上海市") and phone_keys("021-50001111") == phone_keys(
        "+86 21 5000 1111"
    )
    fields = {f.name: f for f in view.fields}
    city = fields["city"]
    assert city.choices == [other] and city.carriers == {other: [survivor, other]}, city
    assert not city.differs and city.checked == other
    assert len(fields["phone"].choices) == 1 and not fields["phone"].differs
    names = fields["name"]  # really different values stay choices, each its own
    assert len(names.choices) == 2 and names.differs
    client, csrf = signed_in(sqlite_core, "wang")
    page = client.get(f"/cluster/{pair.id}").text
    assert (
        f'name="field:city" value="{other}"' in page and f'name="field:city" value="{survivor}"' not in page
    )
    assert f"#{survivor}, #{other}" in re.sub(
        r"<[^>]+>", "", page.split('id="field-city"')[1].split("</tr>")[0]
    )
    # deciding with the page as shown keeps the most complete spelling, as its preview says
    assert view.preview["city"] == "上海市"
    form = {"csrf": csrf, "verdict": "same", "fingerprint": view.cluster.fingerprint()}
    for tag in re.findall(r"<input [^>]*>", page.split('id="decide"')[1].split("</form>")[0]):
        name, value = re.search(r'name="([^"]+)" value="([^"]*)"', tag).groups()  # type: ignore[union-attr]
        if name.startswith(("default:", "field:")) and ('type="radio"' not in tag or " checked" in tag):
            form[name] = value  # what the browser submits: hidden inputs and the checked radios
    assert client.post(f"/cluster/{pair.id}/decide", data=form, follow_redirects=False).status_code == 303
    with sqlite_core.connect() as connection:
        assert connection.scalar(sa.select(Customer.city).where(Customer.id == survivor)) == "上海市"


def test_the_golden_record_page_shows_sources_keys_related_rows_and_history(sqlite_core: sa.Engine) -> None:
    with sqlite_core.connect() as connection:
        merge = connection.execute(
            sa.select(MergeLog).where(MergeLog.decided_by == "linkage").order_by(MergeLog.id)
        ).first()
        assert merge is not None
        keys = connection.scalars(sa.select(ExternalId.external_key).where(ExternalId.entity_id == merge.survivor_id,
                                                                          ExternalId.entity == "customer")).all()  # fmt: skip
        opportunities = connection.scalar(
            sa.select(sa.func.count()).where(Opportunity.customer_id == merge.survivor_id)
        )
    client, _ = signed_in(sqlite_core, "zhao")
    page = client.get(f"/records/customer/{merge.survivor_id}").text
    assert len(keys) == 2 and all(f"<td>{k}</td>" in page for k in keys)
    assert f'href="/records/customer/{merge.merged_id}">#{merge.merged_id}' in page
    assert f'Opportunities <span class="count">{opportunities}</span>' in page and opportunities >= 2
    assert f'id="merge-{merge.id}"' in page and "linkage" in page
    assert 'id="undo-' not in page  # a viewer sees no undo
    merged = client.get(f"/records/customer/{merge.merged_id}").text
    assert 'id="merged-into"' in merged
    assert client.get("/records/customer/999999").status_code == 404
    assert client.get("/records/order/1").status_code == 404


def test_instants_are_shown_in_the_projects_time_zone_and_named(sqlite_core: sa.Engine) -> None:
    """报备日期 2025/1/18 read in Asia/Shanghai is stored 2025-01-17 16:00 UTC: the page shows 2025-01-18."""
    from integration.steward.cluster import claim

    pair = pending(sqlite_core)[0]
    with session_factory(sqlite_core)() as session, session.begin():
        session.add(Opportunity(customer_id=pair.left_id, name="报备的商机", stage_code="proposal",
                                registered_at=dt.datetime(2025, 1, 17, 16, 0)))  # fmt: skip
        session.add(Opportunity(customer_id=pair.left_id, name="下午报备", stage_code="proposal",
                                registered_at=dt.datetime(2025, 1, 18, 6, 30)))  # fmt: skip
    with sqlite_core.begin() as connection:
        wang = connection.scalar(sa.select(USERS.c.id).where(USERS.c.name == "wang"))
        claim(connection, "customer", [pair.left_id, pair.right_id], wang)
    client, _ = signed_in(sqlite_core, "ada", timezone="Asia/Shanghai")
    page = client.get(f"/records/customer/{pair.left_id}").text
    assert "<td>2025-01-18</td>" in page and "2025-01-17 16:00" not in page
    assert "2025-01-18 14:30:00 Asia/Shanghai" in page  # a time of day keeps its time, the zone named
    held = client.get(f"/cluster/{pair.id}").text
    assert re.search(r"until \d{4}-\d\d-\d\d \d\d:\d\d:\d\d Asia/Shanghai", held), held
    audit = client.get("/audit").text
    assert " UTC<" not in audit and "Asia/Shanghai" in audit
    # A project that declares no zone: UTC, always labelled (a naive stored instant too).
    utc, _ = signed_in(sqlite_core, "ada")
    page = utc.get(f"/records/customer/{pair.left_id}").text
    assert "2025-01-17 16:00:00 UTC" in page and "2025-01-18 06:30:00 UTC" in page
    assert re.search(r"until \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", utc.get(f"/cluster/{pair.id}").text)


def test_the_project_declares_its_time_zone() -> None:
    import integration.mappings  # noqa: F401  (before integration.project)
    from integration.project import ProjectSpec, load_project

    assert load_project(Path("examples/demo")).spec.timezone == "Asia/Shanghai"
    base = {"version": 1, "name": "t", "sources": {}}
    assert ProjectSpec.model_validate(base).timezone == "UTC"
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Base'"):
        ProjectSpec.model_validate({**base, "timezone": "Mars/Base"})


def test_admins_manage_users_in_the_browser(sqlite_core: sa.Engine) -> None:
    admin, csrf = signed_in(sqlite_core, "ada")
    added = admin.post("/users", data={"csrf": csrf, "action": "add", "name": "sun", "role": "viewer",
                                       "password": "another long one"}, follow_redirects=False)  # fmt: skip
    assert added.status_code == 303
    assert login(TestClient(make_app(sqlite_core)), "sun", "another long one").status_code == 303
    short = admin.post(
        "/users", data={"csrf": csrf, "action": "add", "name": "tiny", "role": "viewer", "password": "x"}
    )
    assert short.status_code == 400 and "at least 10 characters" in short.text
    assert admin.post("/users", data={"csrf": csrf, "action": "disable", "name": "ada"}).status_code == 400
    assert admin.post("/users", data={"csrf": csrf, "action": "disable", "name": "wang"},
                      follow_redirects=False).status_code == 303  # fmt: skip
    assert login(TestClient(make_app(sqlite_core)), "wang").status_code == 401
    page = admin.get("/users").text
    with sqlite_core.connect() as connection:
        hashes = connection.scalars(sa.select(USERS.c.password_hash)).all()
    assert not any(h in page for h in hashes) and "$argon2" not in page
    audit = admin.get("/audit").text
    assert "added viewer &#39;sun&#39;" in audit and "disabled &#39;wang&#39;" in audit
    assert "$argon2" not in audit and PASSWORD not in audit


def test_passwords_are_salted_argon2id_hashes() -> None:
    first, second = security.hash_password(PASSWORD), security.hash_password(PASSWORD)
    assert first != second and first.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    assert security.verify_password(PASSWORD, first) and not security.verify_password(PASSWORD + "!", first)
    assert not security.needs_rehash(first)
    assert not security.verify_password(PASSWORD, "garbage") and not security.verify_password(
        PASSWORD, "a$b$c$d$e$f"
    )
    assert not security.verify_password(PASSWORD, "$argon2id$v=19$m=65536,t=3,p=4$bad")


def test_an_scrypt_password_still_signs_in_and_is_rehashed_with_argon2(sqlite_core: sa.Engine) -> None:
    old = security.scrypt_hash(PASSWORD)
    assert security.verify_password(PASSWORD, old) and not security.verify_password(PASSWORD + "!", old)
    assert security.needs_rehash(old)
    with sqlite_core.begin() as connection:
        connection.execute(sa.update(USERS).where(USERS.c.name == "wang").values(password_hash=old))
    assert login(TestClient(make_app(sqlite_core)), "wang", PASSWORD + "!").status_code == 401
    with sqlite_core.connect() as connection:  # a wrong password changes nothing
        assert connection.scalar(sa.select(USERS.c.password_hash).where(USERS.c.name == "wang")) == old
    client = TestClient(make_app(sqlite_core))
    assert login(client, "wang").status_code == 303 and client.get("/queue").status_code == 200
    with sqlite_core.connect() as connection:
        new = connection.scalar(sa.select(USERS.c.password_hash).where(USERS.c.name == "wang"))
    assert new.startswith("$argon2id$") and security.verify_password(PASSWORD, new)
    assert client.get("/queue").status_code == 200  # the session opened with the old hash lives on
    assert login(TestClient(make_app(sqlite_core)), "wang").status_code == 303


# --------------------------------------------------------------------------- CLI


def test_crmi_steward_users_and_tokens(sqlite_core_url: str) -> None:
    from typer.testing import CliRunner

    from integration.steward.cli import steward_app

    runner = CliRunner()
    core = ["--core-url", sqlite_core_url]
    added = runner.invoke(steward_app, ["users", "add", "wang", "--role", "steward", "--password-stdin", *core],
                          input=PASSWORD + "\n")  # fmt: skip
    assert added.exit_code == 0 and "added steward 'wang'" in added.output
    again = runner.invoke(
        steward_app, ["user", "add", "wang", "--password-stdin", *core], input=PASSWORD + "\n"
    )
    assert again.exit_code == 1 and "already exists" in again.output
    bad_role = runner.invoke(steward_app, ["users", "add", "x", "--role", "boss", "--password-stdin", *core],
                             input=PASSWORD + "\n")  # fmt: skip
    assert bad_role.exit_code == 1 and "unknown role 'boss'" in bad_role.output
    reserved = runner.invoke(
        steward_app, ["users", "add", "linkage", "--password-stdin", *core], input=PASSWORD + "\n"
    )
    assert reserved.exit_code == 1 and "reserved" in reserved.output
    assert runner.invoke(steward_app, ["users", "role", "wang", "admin", *core]).exit_code == 0
    assert runner.invoke(steward_app, ["users", "reset", "wang", "--password-stdin", *core],
                         input="a brand new password\n").exit_code == 0  # fmt: skip
    assert runner.invoke(steward_app, ["users", "disable", "wang", *core]).exit_code == 0
    listed = runner.invoke(steward_app, ["users", "list", *core], terminal_width=200)
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", listed.output), listed.output
    assert (
        listed.exit_code == 0
        and "wang" in listed.output
        and "admin" in listed.output
        and "scrypt" not in listed.output
    )
    token = runner.invoke(steward_app, ["tokens", "add", "crm-form", *core])
    assert token.exit_code == 0 and token.stdout.strip().startswith("crmi_")
    engine = sa.create_engine(sqlite_core_url)
    with engine.connect() as connection:
        assert security.api_token_name(connection, token.stdout.strip()) == "crm-form"
        actions = connection.scalars(sa.select(AUDIT.c.action).order_by(AUDIT.c.id)).all()
        actors = set(connection.scalars(sa.select(AUDIT.c.actor)))
    assert actions == ["user_add", "user_role", "user_reset", "user_disable", "token_add"]
    assert all(a.startswith("cli") for a in actors)
    assert runner.invoke(steward_app, ["tokens", "revoke", "crm-form", *core]).exit_code == 0
    with engine.connect() as connection:
        assert security.api_token_name(connection, token.stdout.strip()) is None
    engine.dispose()


# --------------------------------------------------------------------------- the duplicate-check API


def test_the_match_api_needs_a_token_and_scores_a_form(core: sa.Engine) -> None:
    with core.begin() as connection:
        token = security.add_token(connection, "crm-form", actor="test")
        first = connection.execute(sa.select(Customer).where(Customer.name == "宁波甬兴模具有限公司")).one()
    client = TestClient(make_app(core))
    body = {"name": "宁波甬兴模具有限公司", "phone": "0574-88880000"}
    is_problem(client.post("/api/v1/match", json=body), 401, "a valid API token is required")
    is_problem(
        client.post("/api/v1/match", json=body, headers={"Authorization": "Bearer nope"}), 401, "token"
    )
    is_problem(client.post("/api/v1/opportunities/check", json={}), 401, "token")
    is_problem(client.get("/api/v1/no-such-call"), 404, "no such page")  # any Accept: the API speaks JSON
    auth = {"Authorization": f"Bearer {token}"}
    found = client.post("/api/v1/match", json=body, headers=auth)
    assert found.status_code == 200, found.text
    best = found.json()["candidates"][0]
    assert best["probability"] >= 0.5 and best["owner"]["name"] == "销售甲"
    assert best["customer_id"] in {first.id, first.merged_into_id} and "phones" in best["agrees_on"]
    bad = client.post("/api/v1/match", json={"name": "x", "credit_code": "123"}, headers=auth)
    is_problem(bad, 422, "credit code")
    assert client.post("/api/v1/match", json=["x"], headers=auth).status_code == 422
    assert client.post("/api/v1/match", json={"phone": "1"}, headers=auth).status_code == 422
    spec = client.get("/api/v1/openapi.json").json()
    assert set(spec["paths"]) == {"/api/v1/match", "/api/v1/opportunities/check"}
    for path in spec["paths"].values():
        for status, response in path["post"]["responses"].items():
            if status != "200":  # every refusal is documented as the problem it is
                schema = response["content"]["application/problem+json"]["schema"]
                assert {"type", "title", "status", "detail"} <= set(schema["properties"]), (status, schema)


def test_the_match_api_compares_a_damaged_credit_code_as_written(core: sa.Engine) -> None:
    """A code whose check digit fails is compared as a load keeps it (credit_code_as_written), not refused."""
    with core.begin() as connection:
        token = security.add_token(connection, "crm-form", actor="test")
        known = connection.execute(
            sa.select(Customer).where(Customer.name == "宁波甬兴模具股份有限公司")
        ).one()
    damaged = known.credit_code[:-1] + ("0" if known.credit_code[-1] != "0" else "1")
    client = TestClient(make_app(core))
    found = client.post(
        "/api/v1/match",
        json={"name": "甬兴模具", "credit_code": damaged},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert found.status_code == 200, found.text
    best = found.json()["candidates"][0]
    assert best["customer_id"] in {known.id, known.merged_into_id}
    assert any("credit" in agreed for agreed in best["agrees_on"]), best


def test_the_match_api_completes_a_local_number_from_the_city(core: sa.Engine) -> None:
    """8888 0000 typed with 宁波市 is 0574-88880000, as a mapping's area_code_from reads it; without a city, 422."""
    with core.begin() as connection:
        token = security.add_token(connection, "crm-form", actor="test")
    client = TestClient(make_app(core))
    auth = {"Authorization": f"Bearer {token}"}
    found = client.post(
        "/api/v1/match", json={"name": "甬兴模具", "phone": "8888 0000", "city": "宁波市"}, headers=auth
    )
    assert found.status_code == 200, found.text
    best = found.json()["candidates"][0]
    assert best["name"].startswith("宁波") and "甬兴模具" in best["name"] and "phones" in best["agrees_on"]
    alone = client.post("/api/v1/match", json={"name": "甬兴模具", "phone": "8888 0000"}, headers=auth)
    assert alone.status_code == 422 and "8888 0000" in alone.json()["error"]


def test_the_match_form_completes_a_local_number_only_into_its_own_digits() -> None:
    """form_record: a number valid on its own is never changed by the city; an unknown city or a completion
    that would add digits (8841075.0, a second number read as an extension) keeps the phone's own error."""
    from integration.dedup.online import form_record
    from integration.mappings.transforms import TransformFailure

    def phone(value: str, city: str | None) -> Any:
        return form_record("某公司", phone=value, city=city)["phone"]

    assert phone("0574-8888 0000", "深圳") == "+8657488880000"  # its own area code, not the city's
    assert phone("13800138000", "深圳") == "+8613800138000"
    assert phone("８８４１ ０７５４", "Shenzhen") == phone("88410754转8", "深圳市") == "+8675588410754"
    for value, city in [("88880000", "火星"), ("88880000", None), ("8841075.0", "深圳"),
                        ("88410754,88410755", "深圳"), ("88410754 0", "深圳")]:  # fmt: skip
        with pytest.raises(TransformFailure, match=re.escape(f"'{value}' is not a")):
            phone(value, city)


def test_the_match_index_follows_the_core_without_a_rebuild(core: sa.Engine) -> None:
    app = make_app(core)
    service = app.state.workbench.match
    index = service.index()
    built = service.state.built_at
    assert service.match({"name_core": None}) == []
    with session_factory(core)() as session, session.begin():
        run = get_or_start_run(session, "new-customer", "t")
        new = Customer(
            name="杭州云栖智能科技有限公司", phone="+8657100000001", city="杭州市", created_run_id=run.id
        )
        session.add(new)
        run.status = "succeeded"
    from integration.steward.api import form_record

    form = form_record({"name": "杭州云栖智能科技有限公司", "phone": "0571-00000001"})
    assert all(c["name"] != "杭州云栖智能科技有限公司" for c in service.match(form))
    assert service.refresh() == 1
    assert service.index() is index and service.state.built_at == built  # incremental, not rebuilt
    found = service.match(form)
    assert found[0]["name"] == "杭州云栖智能科技有限公司" and found[0]["probability"] > 0.9
    pair = planted(core, "宁波市甬兴模具有限责任公司")
    client, csrf = signed_in(core, "wang")
    client.post(f"/cluster/{pair.id}/decide", data={"csrf": csrf, "verdict": "same"})
    service.refresh()
    with core.connect() as connection:
        merged = connection.scalar(sa.select(MergeLog.merged_id).where(MergeLog.decided_by == "wang"))
    assert merged not in index.where and service.state.customers == index.size


def test_the_match_index_takes_in_what_a_partial_run_loaded(core: sa.Engine) -> None:
    """Assets materialized on their own end their load run partial: its customers are in the core, and in the index."""
    service = make_app(core).state.workbench.match
    service.index()
    with session_factory(core)() as session, session.begin():
        run = get_or_start_run(session, "materialized-from-the-ui", "t")
        session.add(
            Customer(
                name="杭州云栖智能科技有限公司", phone="+8657100000001", city="杭州市", created_run_id=run.id
            )
        )
        run.status = PARTIAL
    assert service.refresh() == 1
    from integration.steward.api import form_record

    found = service.match(form_record({"name": "杭州云栖智能科技有限公司", "phone": "0571-00000001"}))
    assert found[0]["name"] == "杭州云栖智能科技有限公司"


def test_the_match_index_forgets_the_customers_of_a_run_undone_after_it_read_them(core: sa.Engine) -> None:
    """A run's first load commits, the index is built, then the run fails and is undone (marked failed, not
    rolled back): the next refresh drops its customers, which no longer exist."""
    from crm_core.runs import abort_run
    from integration.steward.api import form_record

    service = make_app(core).state.workbench.match
    with session_factory(core)() as session, session.begin():
        run = get_or_start_run(session, "fails-later", "t")
        session.add(
            Customer(
                name="杭州云栖智能科技有限公司", phone="+8657100000001", city="杭州市", created_run_id=run.id
            )
        )
    service.index()
    form = form_record({"name": "杭州云栖智能科技有限公司", "phone": "0571-00000001"})
    assert service.match(form)[0]["name"] == "杭州云栖智能科技有限公司"
    assert abort_run(core, "fails-later")  # what the failure sensor does
    service.refresh()
    assert all(c["name"] != "杭州云栖智能科技有限公司" for c in service.match(form))


def test_the_opportunity_check_finds_another_salespersons_registration(core: sa.Engine) -> None:
    with session_factory(core)() as session, session.begin():
        other = SalesRep(name="销售乙", code="S2")
        session.add(other)
        session.flush()
        customer = session.scalars(sa.select(Customer).where(Customer.name == "宁波甬兴模具有限公司")).one()
        target = customer.merged_into_id or customer.id
        session.add(Opportunity(customer_id=target, name="模具线改造", stage_code="proposal", owner_id=other.id,
                                registered_by_id=other.id, registered_at=dt.datetime(2025, 3, 1, tzinfo=dt.UTC)))  # fmt: skip
        session.add(Contact(customer_id=target, name="王芳"))
        token = security.add_token(session.connection(), "crm-form", actor="test")
    client = TestClient(make_app(core))
    auth = {"Authorization": f"Bearer {token}"}
    clash = client.post("/api/v1/opportunities/check", headers=auth,
                        json={"customer_id": target, "salesperson": "S1"}).json()  # fmt: skip
    assert clash["conflict"] and clash["registrations"][0]["registered_by"] == "销售乙"
    assert clash["registrations"][0]["name"] == "模具线改造"
    by_name = client.post("/api/v1/opportunities/check", headers=auth,
                          json={"name": "宁波甬兴模具有限公司", "phone": "0574-88880000", "salesperson": "销售甲"}).json()  # fmt: skip
    assert by_name["conflict"] and by_name["registrations"][0]["customer_id"] == target
    own = client.post("/api/v1/opportunities/check", headers=auth,
                      json={"customer_id": target, "salesperson": "S2"}).json()  # fmt: skip
    assert not own["conflict"]
    assert (
        client.post("/api/v1/opportunities/check", headers=auth, json={"customer_id": target}).status_code
        == 422
    )


# --------------------------------------------------------------------------- a real HTTP server


@contextmanager
def serving(app: Starlette) -> Iterator[str]:
    """Run ``app`` under uvicorn on 127.0.0.1, an ephemeral port, in a thread; yield its base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = dt.datetime.now() + dt.timedelta(seconds=20)
    while not server.started:
        if dt.datetime.now() > deadline or not thread.is_alive():
            raise RuntimeError("the workbench did not start")
        threading.Event().wait(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def test_the_workbench_answers_over_real_http(core: sa.Engine) -> None:
    import requests

    with serving(make_app(core)) as base, requests.Session() as client:
        assert client.get(f"{base}/healthz", timeout=10).json() == {"ok": True}
        assert client.get(f"{base}/queue", allow_redirects=False, timeout=10).status_code == 303
        form = client.get(f"{base}/login", timeout=10)
        token = CSRF.search(form.text)
        assert token
        signed = client.post(f"{base}/login", data={"csrf": token.group(1), "name": "wang", "password": PASSWORD},
                             allow_redirects=False, timeout=10)  # fmt: skip
        assert signed.status_code == 303
        page = client.get(f"{base}/queue", timeout=10)
        assert page.status_code == 200 and 'id="who">wang<' in page.text
        assert client.get(f"{base}/static/steward.css", timeout=10).status_code == 200


# --------------------------------------------------------------------------- the Excel round trip


def test_the_queue_goes_to_excel_and_back_all_or_nothing(sqlite_core: sa.Engine) -> None:
    import io

    from openpyxl import load_workbook

    from integration.steward.sheets import HEADER

    pairs = pending(sqlite_core)
    formula = '=HYPERLINK("http://evil.example","点我")'
    with sqlite_core.begin() as connection:
        connection.execute(sa.update(Customer).where(Customer.id == pairs[-1].left_id).values(name=formula))
    client, csrf = signed_in(sqlite_core, "wang")
    exported = client.get("/queue/export.xlsx?sort=oldest")
    assert exported.status_code == 200 and exported.headers["content-type"].startswith(
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
    )
    book = load_workbook(io.BytesIO(exported.content))
    sheet = book["queue"]
    rows = list(sheet.iter_rows())
    assert tuple(c.value for c in rows[0]) == HEADER and len(rows) - 1 == len(pairs)
    assert all(c.data_type != "f" for row in rows for c in row)
    assert any(c.value == "'" + formula for row in rows for c in row)
    # the report's guard: a phone number is no formula and reads as written
    from integration.steward.sheets import safe_cell

    assert safe_cell("+86-139-0000-0000") == "+86-139-0000-0000" and safe_cell("-2+3") == "'-2+3"
    by_pair = {row[0].value: row for row in rows[1:]}
    first, second, third, fourth = (p.id for p in pairs[:4])
    by_pair[first][4].value = "same"
    by_pair[second][4].value = "different"
    by_pair[third][4].value = "跳过"
    by_pair[fourth][4].value = "maybe"
    sheet.append([999_999, "customer", 0.5, "x", "same"])

    def upload(workbook: Any) -> Any:
        out = io.BytesIO()
        workbook.save(out)
        files = {"sheet": ("queue.xlsx", out.getvalue(), "application/octet-stream")}
        return client.post("/queue/import", data={"csrf": csrf}, files=files)

    before = snapshot(sqlite_core)
    refused = upload(book)
    assert refused.status_code == 422 and "Nothing was applied" in refused.text
    problems = dict(re.findall(r"<tr><td>(\d+)</td><td>(.*?)</td></tr>", refused.text))
    assert set(problems) == {str(by_pair[fourth][0].row), str(sheet.max_row)}
    assert "not one of same, different, skip" in problems[str(by_pair[fourth][0].row)]
    assert "no pair 999999" in problems[str(sheet.max_row)]
    assert snapshot(sqlite_core) == before
    by_pair[fourth][4].value = None
    sheet.delete_rows(sheet.max_row)
    applied = upload(book)
    assert applied.status_code == 200, applied.text
    assert "1 merged, 1 marked different, 1 skipped" in applied.text
    with sqlite_core.connect() as connection:
        statuses = dict(connection.execute(
            sa.select(MatchCandidate.id, MatchCandidate.status).where(MatchCandidate.id.in_([first, second, third]))
        ).all())  # fmt: skip
        merge = connection.execute(sa.select(MergeLog).where(MergeLog.decided_by == "wang")).one()
    assert statuses == {first: "merged", second: "distinct", third: "review"}
    assert merge.reason == "steward decision (sheet)"
    assert [line.summary.split(":")[0] for line in audit_lines(sqlite_core, "decide")] == [
        f"sheet row {by_pair[first][0].row}",
        f"sheet row {by_pair[second][0].row}",
    ]
    again = upload(book)  # the same sheet twice: those pairs are decided now
    assert again.status_code == 422 and "was decided since the export" in again.text
    with sqlite_core.begin() as connection:  # a record changed after the export
        connection.execute(
            sa.update(Customer).where(Customer.id == pairs[4].left_id).values(phone="+8613900000000")
        )
    for pair_id in (first, second):
        by_pair[pair_id][4].value = None
    by_pair[pairs[4].id][4].value = "different"
    stale = upload(book)
    assert stale.status_code == 422 and "changed since the export" in stale.text
    viewer, _ = signed_in(sqlite_core, "zhao")
    assert viewer.get("/queue/export.xlsx").status_code == 403


def test_forked_server_processes_share_one_index_and_answer(sqlite_core: sa.Engine) -> None:
    import json
    import os
    import time
    import urllib.request

    from integration.steward.serving import fork_workers, listen, stop_workers

    app = make_app(sqlite_core)
    with sqlite_core.begin() as connection:
        token = security.add_token(connection, "form", actor="test")
    sock = listen("127.0.0.1", 0)
    pids = fork_workers(app, sock, 2)  # builds the index here first: the workers inherit it
    assert app.state.workbench.match.ready and len(pids) == 2
    try:
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        body = json.dumps({"name": "宁波甬兴模具有限公司", "phone": "0574-88880000"}).encode()
        request = urllib.request.Request(f"{base}/api/v1/match", data=body, method="POST", headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/json"})  # fmt: skip
        for _ in range(200):  # the workers need a moment to start
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    found = json.loads(response.read())
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise AssertionError("the forked workers never answered")
        assert (
            "甬兴模具" in found["candidates"][0]["name"] and found["candidates"][0]["owner"]["code"] == "S1"
        )
        assert all(os.waitpid(pid, os.WNOHANG) == (0, 0) for pid in pids)  # both alive
    finally:
        stop_workers(pids)
        sock.close()
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # gone, and reaped


def test_a_pair_whose_record_was_merged_since_shows_and_decides_its_golden_records(core_url: str) -> None:
    """The queue, the sheet and its import act on the golden records a pair stands for now; two pending pairs
    on the same two golden records are decided together, and a sheet that decides them two ways is refused."""
    import io

    from openpyxl import load_workbook

    from tests.test_dedup_workflow import OLD_NAME, open_pairs, seed_merged_since

    engine = seed_merged_since(core_url)
    deduplicate_customers(engine, "dedup-1", "t", finish=True)
    (stale, *_), (fresh, *_) = open_pairs(engine)
    with engine.begin() as connection:
        security.add_user(connection, "wang", "steward", PASSWORD, actor="test")
    client, csrf = signed_in(engine, "wang")
    page = client.get("/queue")
    assert page.status_code == 200 and OLD_NAME not in page.text, page.text
    # one row for the two pairs: the one scored on the golden records themselves, the other named beside it
    assert f'id="pair-{fresh}"' in page.text and f'id="pair-{stale}"' not in page.text, page.text
    assert f"+{stale}</span>" in page.text and "#49, was #1" not in page.text, page.text
    book = load_workbook(io.BytesIO(client.get("/queue/export.xlsx").content))
    sheet = book["queue"]
    rows = {row[0].value: row for row in list(sheet.iter_rows())[1:]}
    assert set(rows) == {stale, fresh}
    assert all(cell.value != OLD_NAME for row in rows.values() for cell in row)
    assert {rows[stale][6].value, rows[stale][11].value} == {7, 49}  # the golden records, not 1

    def upload() -> Any:
        out = io.BytesIO()
        book.save(out)
        files = {"sheet": ("queue.xlsx", out.getvalue(), "application/octet-stream")}
        return client.post("/queue/import", data={"csrf": csrf}, files=files)

    rows[stale][4].value, rows[fresh][4].value = "different", "same"
    refused = upload()
    assert refused.status_code == 422 and "decided the other way" in refused.text, refused.text
    assert open_pairs(engine) == [(stale, 1, 7), (fresh, 7, 49)]
    rows[fresh][4].value = None
    applied = upload()
    assert applied.status_code == 200, applied.text
    assert open_pairs(engine) == []  # the stale pair's "different" decided the fresh one too
    with engine.connect() as connection:
        decided = connection.execute(
            sa.select(MatchCandidate.status, MatchCandidate.decided_by).where(MatchCandidate.id == fresh)
        ).one()
        merged = connection.scalar(sa.select(Customer.merged_into_id).where(Customer.id == 7))
    assert tuple(decided) == ("distinct", "wang") and merged is None
    engine.dispose()


def test_decisions_stored_under_a_written_out_comparisons_old_name_still_train(
    sqlite_core: sa.Engine,
) -> None:
    # A project that wrote its comparisons out stored the name comparison as name_core_name; it is now
    # named as the built-in one (name_core_levenshtein), and those decisions must still count.
    from integration.dedup.customers import CUSTOMER_SPEC
    from integration.dedup.workflow import steward_labels

    old = {f"{c.field}_{c.method}": 0 for c in CUSTOMER_SPEC.comparisons} | {"name_core_name": 2}
    assert "name_core_levenshtein" not in old
    with sqlite_core.begin() as connection:
        connection.execute(sa.insert(MatchCandidate.__table__), [
            {"entity": "customer", "left_id": 800_000 + 2 * n, "right_id": 800_001 + 2 * n, "probability": 0.7,
             "features": old, "status": "merged" if n % 2 else "distinct", "decided_by": "wang"}
            for n in range(4)
        ])  # fmt: skip
    with session_factory(sqlite_core)() as session:
        labels = steward_labels(session, CUSTOMER_SPEC)
    assert labels is not None and len(labels.features) == 4
    assert labels.features["name_core_levenshtein"].tolist() == [2, 2, 2, 2]
