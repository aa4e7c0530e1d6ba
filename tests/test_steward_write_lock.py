"""A person's write that waits too long for another writer on a SQLite core: one clear refusal, nothing changed.

On SQLite one connection writes at a time. While another one holds the write lock (a migration step's load
launched from Dagster, a sync's load, a script), a steward's decision, undo, reopen or sheet import from the
workbench, `crmi dedup decide` (a pair, a held name), `crmi dedup undo` and `crmi edit` wait at most
``CRMI_EDIT_WAIT_SECONDS`` for it; then they are refused saying the core is busy with another writer (named
when the core's run lock tells who), that nothing was changed and what to do, instead of the driver's
"database is locked" (a traceback in the CLI, a 500 in the workbench). The holder here is a raw sqlite3
connection in ``BEGIN IMMEDIATE``, as a load's transaction holds it; the wait is set short, no sleeps.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from crm_core.edits import edit_record
from crm_core.errors import CoreWaitError, LoadError, SyncLoadWaitError
from crm_core.models import Customer, LoadRun, MatchCandidate
from crm_core.runs import core_sync_lock
from integration.cli import app
from integration.dedup.workflow import decide
from tests.test_steward import build_core, planted
from tests.test_steward_run_lock import a_linkage_merge, everything, problem, retry_after, the_writes

WAIT = "0.2"
BUSY = "the core is busy with another writer ("
ADVICE = (
    "nothing was changed: wait for it to finish (`crmi runs list` shows the load runs) and try again "
    "(or raise CRMI_EDIT_WAIT_SECONDS)"
)
SYNC = "crmi sync on erp-gateway (pid 4242)"


@pytest.fixture
def core(sqlite_core_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[sa.Engine]:
    engine = build_core(sqlite_core_url, synthetic_pairs=6)
    monkeypatch.setenv("CRMI_EDIT_WAIT_SECONDS", WAIT)
    yield engine
    engine.dispose()


@contextmanager
def write_locked(url: str) -> Iterator[sqlite3.Connection]:
    """Hold the SQLite core's write lock from another connection, as a load's open transaction does."""
    database = make_url(url).database
    assert database
    holder = sqlite3.connect(database, isolation_level=None, timeout=5)
    try:
        holder.execute("BEGIN IMMEDIATE")
        holder.execute(
            "UPDATE customers SET name = name || ' (loading)'"
        )  # what the load writes, uncommitted
        yield holder
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def one_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) >= 1, output
    return " ".join(" ".join(lines).split())


def test_a_steward_merge_that_waits_too_long_for_another_writer_is_refused_naming_it(
    core: sa.Engine, sqlite_core_url: str
) -> None:
    """`workflow.decide` (what `crmi dedup decide` calls) raises the project's own error, naming the sync that
    holds the core and the load run in progress, and changes nothing."""
    pair = planted(core, "宁波市甬兴模具有限责任公司")
    with core.begin() as connection:
        connection.execute(sa.insert(LoadRun).values(run_key="dagster-7f3a", project="demo", mode="full",
                                                     status="running"))  # fmt: skip
    before = everything(core)
    with (
        core_sync_lock(core, SYNC),
        write_locked(sqlite_core_url),
        pytest.raises(SyncLoadWaitError) as refused,
    ):
        decide(core, pair.id, same=True, steward="li", run_key="steward-li", project="demo")
    message = str(refused.value)
    assert isinstance(refused.value, CoreWaitError)
    assert message.startswith(BUSY), message
    assert SYNC in message and "load run dagster-7f3a (full) is running" in message, message
    assert f"the steward decision waited {WAIT} s for it" in message, message
    assert message.endswith(ADVICE), message
    assert "database is locked" not in message
    assert everything(core) == before
    assert (
        decide(core, pair.id, same=True, steward="li", run_key="steward-li", project="demo").status
        == "merged"
    )


def test_the_workbench_answers_423_when_another_writer_holds_the_core_too_long(
    core: sa.Engine, sqlite_core_url: str
) -> None:
    """A decision, an undo, a reopen and a sheet import from the workbench answer 423 with Retry-After and
    the message (a page, or a problem for a script) instead of a 500; nothing is written; once the writer is
    done the same decision goes through."""
    writes = the_writes(core)
    before = everything(core)
    with write_locked(sqlite_core_url):
        pages = writes.send({})
        scripts = writes.send({"Accept": "application/json"})
        assert everything(core) == before
    for what, refused in pages.items():
        assert refused.status_code == 423, (what, refused.status_code, refused.text)
        message = problem(refused.text)
        assert message.startswith(BUSY) and message.endswith(ADVICE), (what, message)
        assert retry_after(refused) > 0, what
    for what, refused in scripts.items():
        assert refused.status_code == 423, (what, refused.status_code, refused.text)
        detail = refused.json()["detail"]
        assert detail.startswith(BUSY) and "waited 0.2 s" in detail and detail.endswith(ADVICE), (
            what,
            detail,
        )
    done = writes.client.post(f"/cluster/{writes.pair.id}/decide", follow_redirects=False, data={
        "csrf": writes.csrf, "verdict": "same", "fingerprint": writes.fingerprint})  # fmt: skip
    assert done.status_code == 303, done.text
    with core.connect() as connection:
        status = connection.scalar(
            sa.select(MatchCandidate.status).where(MatchCandidate.id == writes.pair.id)
        )
    assert status == "merged"


def test_the_cli_writes_of_people_exit_1_with_one_line_when_another_writer_holds_the_core_too_long(
    core: sa.Engine, sqlite_core_url: str, demo_project: Path
) -> None:
    """`crmi dedup decide` (a pair, a held name), `crmi dedup undo` and `crmi edit` exit 1 with the message,
    no traceback, and change nothing."""
    pair = planted(core, "宁波市甬兴模具有限责任公司")
    merge = a_linkage_merge(core)
    with core.connect() as connection:
        customer = connection.scalar(
            sa.select(sa.func.min(Customer.id)).where(Customer.merged_into_id.is_(None))
        )
    project, at = ["--project", str(demo_project)], ["--core-url", sqlite_core_url]
    commands = {
        "steward decision": ["dedup", "decide", str(pair.id), "--same", "--steward", "li", *project, *at],
        "reference decision": ["dedup", "decide", "r1", "--different", "--steward", "li", *project, *at],
        "undo of a merge": ["dedup", "undo", str(merge), "--steward", "li", *at],
        "edit": ["edit", "customer", str(customer), "short_name=华鑫", "--by", "li", *project, *at],
    }
    runner = CliRunner()
    before = everything(core)
    with write_locked(sqlite_core_url):
        for what, command in commands.items():
            refused = runner.invoke(app, command)
            assert refused.exit_code == 1, (what, refused.output, refused.exception)
            assert not isinstance(refused.exception, sa.exc.OperationalError), (what, refused.exception)
            said = one_line(refused.output)
            assert said.startswith(f"refused: {BUSY}"), (what, said)
            assert f"the {what} waited {WAIT} s for it" in said and said.endswith(ADVICE), (what, said)
            assert "Traceback" not in refused.output and "database is locked" not in said, (what, said)
        assert everything(core) == before
    decided = runner.invoke(app, commands["steward decision"])
    assert decided.exit_code == 0 and "merged (by li)" in decided.output, decided.output


def test_a_crm_edit_that_waits_too_long_for_another_writer_is_a_load_error_of_the_same_kind(
    core: sa.Engine, sqlite_core_url: str
) -> None:
    """`edit_record` (what `crmi edit` and a CRM front end call) raises the same kind of error, still a
    LoadError for callers that catch those."""
    with core.connect() as connection:
        customer = connection.scalar(
            sa.select(sa.func.min(Customer.id)).where(Customer.merged_into_id.is_(None))
        )
    with write_locked(sqlite_core_url), pytest.raises(CoreWaitError) as refused:
        edit_record(core, "customer", customer, {"short_name": "华鑫"})
    assert isinstance(refused.value, LoadError)
    assert str(refused.value).startswith(BUSY) and str(refused.value).endswith(ADVICE), str(refused.value)
    assert "the edit waited 0.2 s for it" in str(refused.value)


def test_a_workbench_write_outside_the_decisions_answers_423_too_when_the_write_lock_outlasts_the_timeout(
    core: sa.Engine, sqlite_core_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim writes only the workbench's own tables, with the engine's busy timeout (shortened here): held
    past it by another writer it answers 423 with the same advice, not a 500, and claims nothing."""
    import crm_core.db

    writes = the_writes(core)
    monkeypatch.setattr(crm_core.db, "SQLITE_BUSY_MILLISECONDS", 200)
    core.dispose()  # the pool's connections were opened with the 30 s timeout
    before = everything(core)
    with write_locked(sqlite_core_url):
        refused = writes.client.post(f"/cluster/{writes.pair.id}/claim", data={"csrf": writes.csrf},
                                     headers={"Accept": "application/json"})  # fmt: skip
    assert refused.status_code == 423, refused.text
    detail = refused.json()["detail"]
    assert detail.startswith(BUSY) and "the request waited" in detail and "nothing was changed" in detail, (
        detail
    )
    assert "CRMI_EDIT_WAIT_SECONDS" not in detail  # not the setting that timed it
    assert retry_after(refused) > 0
    assert everything(core) == before
