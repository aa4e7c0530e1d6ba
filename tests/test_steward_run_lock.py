"""A person's writes and a migration never write into one core at once: the run lock, from both sides.

While a `crmi` command (run, rollback…) holds the core, a steward's decision in the workbench (decide, undo a
merge, reopen a pair, a sheet import) is refused with HTTP 423 and Retry-After, as a page naming the holder (or
a problem+json body, for a caller asking for JSON), and `crmi dedup decide`, `crmi dedup undo`, `crmi sync
retry` and `crmi sync conflicts --decide` exit 1 with one line naming it; nothing is written, and the same
write goes through once the command has ended. While one of these writes works, it holds the lock shared
(named after the steward or the command): `crmi run` refuses naming it, other stewards and syncs share the
core. The holder is another process, as a command in another terminal is.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from openpyxl import load_workbook
from starlette.testclient import TestClient
from typer.testing import CliRunner

from crm_core.db import make_engine
from crm_core.models import LoadRun, MatchCandidate, MergeLog, SyncConflict, SyncOutbox
from crm_core.runs import CoreBusy, core_lock_holder, core_run_lock, core_sync_lock, lock_holder
from crm_core.steward_models import AUDIT
from integration.cli import app
from integration.steward.decisions import CORE_BUSY_RETRY_AFTER
from tests.test_run_lock_steps import held_by_another_process
from tests.test_steward import build_core, planted, signed_in, snapshot

COMMAND = "crmi rollback on the consultant's laptop (pid 4242)"  # what held_by_another_process holds
HELD = f"another command holds this core ({COMMAND}"
# What Chromium sends for a page (a form's POST included)
BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"


@pytest.fixture
def core(core_url: str) -> Iterator[sa.Engine]:
    engine = build_core(core_url, synthetic_pairs=6)
    yield engine
    engine.dispose()


def everything(engine: sa.Engine) -> dict[str, Any]:
    """What a refused write must leave as it was: pairs, customers, merges, runs, audit, outbox, conflicts."""
    with engine.connect() as connection:
        return {
            **snapshot(engine),
            "runs": connection.execute(sa.select(LoadRun.id, LoadRun.status).order_by(LoadRun.id)).all(),
            "audit": connection.execute(  # claims and their release are the workbench's own bookkeeping
                sa.select(AUDIT.c.id, AUDIT.c.action).where(AUDIT.c.action.not_in(("claim", "release")))
            ).all(),
            "outbox": connection.execute(
                sa.select(SyncOutbox.id, SyncOutbox.status, SyncOutbox.attempts).order_by(SyncOutbox.id)
            ).all(),
            "conflicts": connection.execute(
                sa.select(SyncConflict.id, SyncConflict.status).order_by(SyncConflict.id)
            ).all(),
        }


def a_linkage_merge(engine: sa.Engine) -> int:
    with engine.connect() as connection:
        merge = connection.scalar(
            sa.select(MergeLog.id)
            .where(MergeLog.decided_by == "linkage", MergeLog.undone_at.is_(None))
            .limit(1)
        )
    assert merge is not None
    return int(merge)


def fingerprint_of(page: str) -> str:
    found = re.search(r'name="fingerprint" value="([^"]+)"', page)
    assert found, page
    return found.group(1)


def problem(page: str) -> str:
    found = re.search(r'<p id="problem">(.*?)</p>', page, re.S)
    assert found, page
    return " ".join(found.group(1).split()).replace("&#39;", "'")


# --------------------------------------------------------------------------- the workbench


@dataclass
class Writes:
    """A signed-in steward and the four writes that hold the core, ready to be sent."""

    client: TestClient
    csrf: str
    pair: Any
    fingerprint: str
    send: Callable[[dict[str, str]], dict[str, Any]]


def the_writes(core: sa.Engine) -> Writes:
    """Sign in; make a "different" decision to reopen and export a filled sheet; return a sender of a decision,
    an undo, a reopen and a sheet import with the given request headers."""
    pair = planted(core, "宁波市甬兴模具有限责任公司")
    other = planted(core, "宁波市海曙包装有限责任公司")
    merge = a_linkage_merge(core)
    client, csrf = signed_in(core, "wang")
    different = client.post(f"/cluster/{other.id}/decide", data={"csrf": csrf, "verdict": "different"},
                            follow_redirects=False)  # fmt: skip
    assert different.status_code == 303  # a decision to reopen while the core is held
    exported = client.get("/queue/export.xlsx")
    book = load_workbook(io.BytesIO(exported.content))
    sheet = book["queue"]
    for row in list(sheet.iter_rows())[1:2]:
        row[4].value = "different"
    sheet_bytes = io.BytesIO()
    book.save(sheet_bytes)
    fingerprint = fingerprint_of(client.get(f"/cluster/{pair.id}").text)

    def send(headers: dict[str, str]) -> dict[str, Any]:
        return {
            "decide": client.post(f"/cluster/{pair.id}/decide", headers=headers, data={
                "csrf": csrf, "verdict": "same", "fingerprint": fingerprint, "then": "next",
            }),
            "undo": client.post(f"/merges/{merge}/undo", headers=headers, data={"csrf": csrf}),
            "reopen": client.post(f"/pairs/{other.id}/reopen", headers=headers,
                                  data={"csrf": csrf, "back": str(other.left_id)}),
            "import": client.post("/queue/import", headers=headers, data={"csrf": csrf},
                                  files={"sheet": ("queue.xlsx", sheet_bytes.getvalue(), "application/octet-stream")}),
        }  # fmt: skip

    return Writes(client, csrf, pair, fingerprint, send)


def retry_after(response: Any) -> int:
    """The response's Retry-After in seconds (delta-seconds, as the workbench sends it)."""
    value = response.headers.get("retry-after", "")
    assert value.isdigit() and int(value) > 0, dict(response.headers)
    return int(value)


def test_while_a_command_holds_the_core_the_workbench_refuses_every_decision_and_writes_nothing(
    core: sa.Engine, core_url: str
) -> None:
    """`crmi rollback` in another terminal holds the core: a decision, an undo, a reopen and a sheet import
    from the workbench answer 423 with a page naming the holder and saying to try again, and with Retry-After;
    nothing is written (pairs, records, merges, runs, audit). Reading, claiming and releasing still work. Once
    the command has ended the same decision goes through."""
    writes = the_writes(core)
    client, csrf, pair = writes.client, writes.csrf, writes.pair
    before = everything(core)
    with held_by_another_process(core_url):
        assert client.get(f"/cluster/{pair.id}").status_code == 200  # reading needs no lock
        claimed = client.post(f"/cluster/{pair.id}/claim", data={"csrf": csrf}, follow_redirects=False)
        assert claimed.status_code == 303  # a claim is the workbench's own bookkeeping, no core record
        for what, refused in writes.send({}).items():
            assert refused.status_code == 423, (what, refused.status_code, refused.text)
            message = problem(refused.text)
            assert message.startswith(HELD), (what, message)
            assert message.endswith("nothing was changed; try again when it has ended"), (what, message)
            assert "The core is busy" in refused.text, what
            assert retry_after(refused) == CORE_BUSY_RETRY_AFTER, what
        released = client.post(f"/cluster/{pair.id}/release", data={"csrf": csrf}, follow_redirects=False)
        assert released.status_code == 303
        assert everything(core) == before  # nothing written: pairs, records, merges, runs, audit lines
    done = client.post(f"/cluster/{pair.id}/decide", data={"csrf": csrf, "verdict": "same",
                                                          "fingerprint": writes.fingerprint}, follow_redirects=False)  # fmt: skip
    assert done.status_code == 303, done.text
    with core.connect() as connection:
        assert (
            connection.scalar(sa.select(MatchCandidate.status).where(MatchCandidate.id == pair.id))
            == "merged"
        )


def test_while_a_command_holds_the_core_a_script_gets_a_problem_and_a_browser_a_page_both_with_retry_after(
    core: sa.Engine, core_url: str
) -> None:
    """A script calling the writing routes with `Accept: application/json` (or application/problem+json)
    gets the 423 as an RFC 7807 problem naming the holder and what to do, a browser the HTML page; both carry
    Retry-After, and nothing is written."""
    writes = the_writes(core)
    before = everything(core)
    with held_by_another_process(core_url):
        asked = {
            "json": writes.send({"Accept": "application/json"}),
            "problem": writes.send({"Accept": "text/html;q=0.5, application/problem+json"}),
            "browser": writes.send({"Accept": BROWSER}),
        }
        assert everything(core) == before
    for accept, refusals in asked.items():
        for what, refused in refusals.items():
            assert refused.status_code == 423, (accept, what, refused.text)
            assert retry_after(refused) > 0, (accept, what)
            kind = refused.headers["content-type"]
            if accept == "browser":
                assert kind.startswith("text/html"), (what, kind)
                assert problem(refused.text).startswith(HELD) and "The core is busy" in refused.text, what
                continue
            assert kind == "application/problem+json", (accept, what, kind)
            body = refused.json()
            assert (body["type"], body["title"], body["status"]) == ("about:blank", "Locked", 423), body
            assert body["detail"].startswith(HELD), (accept, what, body)
            assert body["detail"].endswith("nothing was changed; try again when it has ended"), body
            assert "<" not in refused.text, (accept, what)  # no page in it


def test_a_stewards_decision_holds_the_core_shared_while_it_writes(
    core: sa.Engine, core_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In the middle of a workbench merge (where the workflow merges the records) a `crmi run` on another
    connection is refused naming the steward, and so would a migration step launched from Dagster; another
    steward's write and a sync share the core, and the sync schedules do not skip for it. When the decision
    has committed the core is free again."""
    from integration.dedup import workflow

    seen: list[str] = []
    merge_cluster = workflow.decide_cluster

    def inside(*args: Any, **kwargs: Any) -> Any:
        other = make_engine(core_url)
        try:
            try:
                with core_run_lock(other, lock_holder("crmi run")):
                    seen.append("crmi run took the core")
            except CoreBusy as exc:
                seen.append(str(exc))
            seen.append(
                core_lock_holder(other) or "no holder"
            )  # what a migration step launched from Dagster asks
            assert core_lock_holder(other, syncs=False) is None  # what a sync's schedule asks
            with core_sync_lock(other, "steward li (workbench) on another host (pid 7)"):  # shared
                seen.append("shared")
        finally:
            other.dispose()
        return merge_cluster(*args, **kwargs)

    monkeypatch.setattr(workflow, "decide_cluster", inside)
    pair = planted(core, "宁波市甬兴模具有限责任公司")
    client, csrf = signed_in(core, "wang")
    done = client.post(
        f"/cluster/{pair.id}/decide", data={"csrf": csrf, "verdict": "same"}, follow_redirects=False
    )
    assert done.status_code == 303, done.text
    refusal, probed, shared = seen
    steward = f"steward wang (workbench) on {socket.gethostname()}"[:40]
    assert refusal.startswith("another command holds this core (steward wang (workbench) on "), refusal
    assert steward in refusal and f"(pid {os.getpid()})" in refusal, refusal
    assert steward in probed and shared == "shared"
    with core.connect() as connection:
        assert (
            connection.scalar(sa.select(MatchCandidate.status).where(MatchCandidate.id == pair.id))
            == "merged"
        )
    assert core_lock_holder(core) is None
    with core_run_lock(core, "crmi run after the decision"):
        pass


# --------------------------------------------------------------------------- the CLI


def with_sync_rows(engine: sa.Engine) -> tuple[int, int]:
    """A dead letter and an open conflict of the demo project's u8 target (ids)."""
    with engine.begin() as connection:
        customer = connection.scalar(sa.text("SELECT min(id) FROM customers WHERE merged_into_id IS NULL"))
        other = connection.scalar(
            sa.text("SELECT min(id) FROM customers WHERE merged_into_id IS NULL AND id > :c"), {"c": customer}
        )
        dead = connection.execute(sa.insert(SyncOutbox).values(
            target="u8", entity="customer", entity_id=other, operation="customer/edit", payload={"name": "x"},
            payload_hash="h", core_values={}, idempotency_key="dead-1", status="dead", attempts=5,
            next_attempt_at=dt.datetime.now(dt.UTC), last_error="U8 said no",
        )).inserted_primary_key[0]  # fmt: skip
        conflict = connection.execute(sa.insert(SyncConflict).values(
            target="u8", entity="customer", entity_id=customer, field="phone", exchanged_value="1",
            crm_value="2", target_value="3", status="open",
        )).inserted_primary_key[0]  # fmt: skip
    return int(dead), int(conflict)


def test_while_a_command_holds_the_core_the_cli_writes_of_people_refuse_and_write_nothing(
    core: sa.Engine, core_url: str, demo_project: Path
) -> None:
    """`crmi dedup decide` (a pair, a held name), `crmi dedup undo`, `crmi sync retry` and `crmi sync conflicts
    --decide` exit 1 with one line naming the command that holds the core and what to do; nothing is written.
    Once it has ended they go through."""
    pair = planted(core, "宁波市甬兴模具有限责任公司")
    merge = a_linkage_merge(core)
    dead, conflict = with_sync_rows(core)
    runner = CliRunner()
    project, at = ["--project", str(demo_project)], ["--core-url", core_url]
    commands = {
        "decide": ["dedup", "decide", str(pair.id), "--same", "--steward", "li", *project, *at],
        "reference": ["dedup", "decide", "r1", "--different", "--steward", "li", *project, *at],
        "undo": ["dedup", "undo", str(merge), "--steward", "li", *at],
        "retry": ["sync", "retry", "--target", "u8", *project, *at],
        "conflict": [
            "sync",
            "conflicts",
            "--decide",
            str(conflict),
            "--take",
            "crm",
            "--by",
            "li.na",
            *project,
            *at,
        ],
    }
    what = {"decide": "steward decision", "reference": "steward decision", "undo": "undo of a merge",
            "retry": "retry of dead letters", "conflict": "conflict decision"}  # fmt: skip
    before = everything(core)
    with held_by_another_process(core_url):
        for name, command in commands.items():
            refused = runner.invoke(app, command)
            assert refused.exit_code == 1, (name, refused.output)
            [line] = [line for line in refused.output.splitlines() if line.strip()]
            assert line.startswith(f"refused: {HELD}"), (name, line)
            assert line.endswith(
                f"no {what[name]} while it loads or rolls back the core; run it again when it has ended"
            ), (name, line)
        assert everything(core) == before
    decided = runner.invoke(app, commands["decide"])
    assert decided.exit_code == 0 and "merged (by li)" in decided.output, decided.output
    undone = runner.invoke(app, commands["undo"])
    assert undone.exit_code == 0 and "separate from" in undone.output, undone.output
    retried = runner.invoke(app, commands["retry"])
    assert retried.exit_code == 0 and "1 dead letter(s) queued again" in retried.output, retried.output
    with core.connect() as connection:  # its record's document as it is now replaces the planted one
        assert connection.scalar(sa.select(SyncOutbox.status).where(SyncOutbox.id == dead)) == "superseded"


def test_the_cli_writes_of_people_hold_the_core_shared_named_after_the_command(
    core: sa.Engine, core_url: str, demo_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside each command's write a `crmi run` on another connection is refused naming the command (`crmi
    dedup decide on HOST (pid N)`…), and a sync shares the core."""
    import crm_core.merging
    import integration.dedup.workflow
    import integration.sync.engine
    import integration.sync.outbox

    seen: dict[str, str] = {}

    def hook(name: str, result: Any) -> Callable[..., Any]:
        def inside(*args: Any, **kwargs: Any) -> Any:
            other = make_engine(core_url)
            try:
                try:
                    with core_run_lock(other, lock_holder("crmi run")):
                        seen[name] = "crmi run took the core"
                except CoreBusy as exc:
                    seen[name] = str(exc)
                with core_sync_lock(other, "sync u8 inbound on dagster-host (pid 8)"):
                    pass
            finally:
                other.dispose()
            return result

        return inside

    monkeypatch.setattr(
        integration.dedup.workflow, "decide", hook("crmi dedup decide", SimpleNamespace(status="merged"))
    )
    log = SimpleNamespace(
        id=1, entity="customer", merged_id=2, survivor_id=1, decided_by="linkage", undone_at=None
    )
    monkeypatch.setattr(crm_core.merging, "undo_merge", hook("crmi dedup undo", log))
    monkeypatch.setattr(integration.sync.outbox, "retry_dead", hook("crmi sync retry", 0))
    monkeypatch.setattr(
        integration.sync.engine, "decide_conflict", hook("crmi sync conflicts --decide", "settled")
    )
    runner = CliRunner()
    project, at = ["--project", str(demo_project)], ["--core-url", core_url]
    for command in (
        ["dedup", "decide", "1", "--same", "--steward", "li", *project, *at],
        ["dedup", "undo", "1", "--steward", "li", *at],
        ["sync", "retry", "--target", "u8", *project, *at],
        ["sync", "conflicts", "--decide", "1", "--take", "crm", "--by", "li.na", *project, *at],
    ):
        ran = runner.invoke(app, command)
        assert ran.exit_code == 0, (command, ran.output)
    assert set(seen) == {
        "crmi dedup decide",
        "crmi dedup undo",
        "crmi sync retry",
        "crmi sync conflicts --decide",
    }
    for name, refusal in seen.items():
        holder = lock_holder(name)
        assert refusal.startswith(f"another command holds this core ({holder}"), (name, refusal)
    assert core_lock_holder(core) is None
