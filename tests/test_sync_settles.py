"""Sync correctness against the local U8 OpenAPI server: no CRM change is swallowed, the first sync with
``start: now`` overwrites nothing in U8, and a sync with nothing changed sends and receives nothing.

Real HTTP peer over a real U8-layout database, as in tests/test_sync.py; nothing of the code under test is
replaced.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, wait
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from crm_core.db import session_factory
from crm_core.edits import create_records, edit_record
from crm_core.errors import LoadError
from crm_core.loading import get_or_start_run
from crm_core.models import Customer, LoadRun, MatchCandidate, MergeLog, RowChange, SyncConflict, SyncState
from integration.dedup.workflow import decide
from integration.pipeline import Migration, core_engine, extract, load, stage
from integration.steward.security import Principal, add_user
from integration.sync.engine import SyncReport
from tests.servers.u8_project import CUSTOMER, sync_yaml
from tests.test_sync import customer_by_name, running_u8, sync, u8_rows

ABBR = 'SELECT "cCusAbbName" FROM "Customer" WHERE "cCusCode" = :code'


@pytest.fixture
def core(tmp_path: Path) -> Iterator[sa.Engine]:
    engine = core_engine(f"sqlite:///{tmp_path / 'core.sqlite'}")
    yield engine
    engine.dispose()


def test_a_crm_edit_is_sent_although_the_same_sync_reads_the_record_from_u8(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: sa.Engine
) -> None:
    """The CRM renames a customer's short name; U8 changes the credit limit of the same customer before the
    next sync. That sync reads U8's row (and the loader touches the record): the CRM's change still goes out,
    and sync_state does not claim U8 has it before U8 does."""
    with running_u8(tmp_path, monkeypatch) as (api, project, url):
        sync(project, core)
        huaxin = customer_by_name(core, "上海华鑫科技有限公司")
        edit_record(core, "customer", huaxin.id, {"short_name": "华鑫药业"})
        api.erp.update_customer("C001", iCusCreLine=120000)
        report = sync(project, core)
        assert (report.entities["customer"]["received"], report.delivery.sent) == (1, 1)
        assert u8_rows(url, ABBR, code="C001") == [("华鑫药业",)]
        assert customer_by_name(core, "上海华鑫科技有限公司").credit_limit == Decimal("120000.00")
        sync(project, core)  # U8's row of the change comes back: its echo
        quiet = sync(project, core)
        assert (quiet.received, quiet.delivery.sent) == (0, 0)
        assert u8_rows(url, ABBR, code="C001") == [("华鑫药业",)]


def test_a_crm_edit_after_an_inbound_only_run_is_not_taken_for_an_echo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: sa.Engine
) -> None:
    """An inbound-only run reads the record the CRM just changed (not captured yet): the change is not
    recorded as exchanged, the next outbound run sends it."""
    with running_u8(tmp_path, monkeypatch) as (api, project, url):
        sync(project, core)
        huaxin = customer_by_name(core, "上海华鑫科技有限公司")
        edit_record(core, "customer", huaxin.id, {"short_name": "华鑫药业"})
        api.erp.update_customer("C001", iCusCreLine=120000)
        sync(project, core, "inbound")
        with session_factory(core)() as session:
            state = session.scalars(sa.select(SyncState).where(SyncState.entity_id == huaxin.id)).one()
            assert (state.core_values or {}).get("short_name") != "华鑫药业"  # U8 does not hold it yet
        out = sync(project, core, "outbound")
        assert out.delivery.applied == 1
        assert u8_rows(url, ABBR, code="C001") == [("华鑫药业",)]
        with session_factory(core)() as session:
            assert not session.scalars(sa.select(SyncConflict)).all()


NAME_AND_PHONE = CUSTOMER.replace("            abbrname: short_name\n", "").replace(
    "            address: address\n", ""
)


def test_a_field_the_crm_owns_but_never_sends_does_not_make_the_sync_send_forever(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: sa.Engine
) -> None:
    """The CRM owns short_name, email and address but only name and phone go out, and an empty CRM phone
    is left out of the document: a U8 change of those keeps the CRM's value and sends nothing (sending would
    not change U8, whose row would come back changed, again and again). `crmi project check` warns."""
    from typer.testing import CliRunner

    from integration.cli import app

    with running_u8(tmp_path, monkeypatch, sync_yaml(NAME_AND_PHONE)) as (api, project, url):
        sync(project, core)
        api.erp.update_customer("C001", cCusAbbName="华鑫")
        api.erp.update_customer("C002", cCusAddress="北京市朝阳区建国路1号")
        api.erp.update_customer("C003", cCusPhone="0755-86013388")  # the CRM's phone is empty
        changed = sync(project, core)
        assert (changed.received, changed.kept_crm, changed.delivery.sent) == (3, 3, 0)
        quiet = sync(project, core)
        assert (quiet.received, quiet.kept_crm, quiet.delivery.sent) == (0, 0, 0)
        assert u8_rows(url, ABBR, code="C001") == [("华鑫",)]
        assert customer_by_name(core, "上海华鑫科技有限公司").short_name is None
        checked = CliRunner().invoke(app, ["project", "check", "--project", str(project)])
        for name in ("short_name", "email", "address"):
            assert (
                f"warning: {project / 'project.yaml'}" in checked.output
                and f"the CRM owns '{name}' but no outbound field sends it" in checked.output
            ), checked.output
        assert "the CRM owns 'phone'" not in checked.output


NAME = 'SELECT "cCusName" FROM "Customer" WHERE "cCusCode" = :code'
PHONE = 'SELECT "cCusPhone" FROM "Customer" WHERE "cCusCode" = :code'
GOLDEN = "北京腾达商贸集团有限公司"


def go_live(project: Path, engine: sa.Engine) -> None:
    """The migration: U8's customers loaded as a `crmi run` loads them, then a steward's merge gives C002 its
    golden name (a run of its own, before the first sync)."""
    migration = Migration.load(str(project))
    mapping = next(m for m in migration.mappings_for("customer") if m.name == "erp_u8_customers")
    staged = stage(migration, "customer", {migration.raw_asset(mapping): extract(migration, mapping)})
    load(migration, engine, "go-live", staged, mode="full")
    with session_factory(engine)() as session, session.begin():
        run = get_or_start_run(session, "steward-merge", "synctest", mode="dedup")
        record = session.scalars(sa.select(Customer).where(Customer.erp_code == "C002")).one()
        record.name, record.updated_run_id = GOLDEN, run.id
        session.execute(sa.update(LoadRun).where(LoadRun.run_key.in_(("go-live", "steward-merge")))
                        .values(status="succeeded"))  # fmt: skip


def test_the_first_sync_after_go_live_rewrites_nothing_in_u8(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: sa.Engine
) -> None:
    """`start: now`: the first sync records both sides as they are. A difference the migration made (C002's
    golden name) is an open conflict for a person, not sent; a CRM edit after go-live goes out; a change of
    what U8 owns comes in; the next syncs are quiet."""
    first_sync_after_go_live(tmp_path, monkeypatch, core)


@contextmanager
def postgresql_core() -> Iterator[sa.Engine]:
    """An emptied core on the test PostgreSQL server (skipped without one, except under CI=true)."""
    from integration.assets.resources import dispose_engines
    from tests.conftest import PG_URL, reset_postgres, server_or_skip

    server = server_or_skip(PG_URL, "PostgreSQL")
    reset_postgres(server)
    server.dispose()
    engine = core_engine(PG_URL)
    try:
        yield engine
    finally:
        engine.dispose()
        dispose_engines()


@pytest.mark.postgres
def test_the_first_sync_after_go_live_on_postgresql(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same with the core on PostgreSQL (the journal's before-images as JSON there)."""
    with postgresql_core() as engine:
        first_sync_after_go_live(tmp_path, monkeypatch, engine)


def first_sync_after_go_live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: sa.Engine) -> None:
    """Go live, edit one customer in the CRM, change one in U8, and sync: check both sides after each run."""
    with running_u8(tmp_path, monkeypatch) as (api, project, url):
        go_live(project, core)
        huaxin = customer_by_name(core, "上海华鑫科技有限公司")
        edit_record(core, "customer", huaxin.id, {"phone": "+862188889999"})  # after go-live: goes out
        api.erp.update_customer("C003", iCusCreLine=90000)  # U8 owns the credit limit
        first = sync(project, core)
        assert u8_rows(url, NAME, code="C002") == [("北京腾达商贸有限公司",)]  # not the golden name
        assert u8_rows(url, PHONE, code="C002") == [("010-62345678",)]  # nor the CRM's +86 form
        assert u8_rows(url, PHONE, code="C001") == [("+862188889999",)]
        assert first.delivery.sent == 1 and first.conflicts_waiting == 1
        assert customer_by_name(core, "深圳卓泰电子有限公司").credit_limit == Decimal("90000.00")
        with session_factory(core)() as session:
            conflict = session.scalars(sa.select(SyncConflict)).one()
        assert (conflict.field, conflict.status, conflict.crm_value, conflict.target_value) == (
            "name", "open", GOLDEN, "北京腾达商贸有限公司",
        )  # fmt: skip
        echo = sync(project, core)  # C001's row comes back from U8
        assert (echo.received, echo.delivery.sent, echo.conflicts) == (1, 0, 0)
        quiet = sync(project, core)
        assert (quiet.received, quiet.delivery.sent, quiet.conflicts) == (0, 0, 0)
        from integration.sync.engine import decide_conflict

        decide_conflict(Migration.load(str(project)), core, conflict.id, "crm", by="li.na")
        sync(project, core)
        assert u8_rows(url, NAME, code="C002") == [(GOLDEN,)]  # decided by a person: now it goes


def test_a_crm_edit_before_a_steward_merge_goes_out_with_the_first_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: sa.Engine
) -> None:
    """Go-live is the migration's last load, not the last run that was no edit: a CRM user edits a phone, then
    a steward merges (a run of its own), then the first sync runs. The edit goes out; the merge's golden name
    waits for a person (U8 holds another name)."""
    with running_u8(tmp_path, monkeypatch) as (_api, project, url):
        migration = Migration.load(str(project))
        mapping = next(m for m in migration.mappings_for("customer") if m.name == "erp_u8_customers")
        staged = stage(migration, "customer", {migration.raw_asset(mapping): extract(migration, mapping)})
        load(migration, core, "go-live", staged, mode="full")
        with session_factory(core)() as session, session.begin():
            session.execute(sa.update(LoadRun).where(LoadRun.run_key == "go-live").values(status="succeeded"))
        huaxin = customer_by_name(core, "上海华鑫科技有限公司")
        edit_record(core, "customer", huaxin.id, {"phone": "+862188889999"})
        with session_factory(core)() as session, session.begin():
            run = get_or_start_run(session, "steward-merge", "synctest", mode="steward")
            record = session.scalars(sa.select(Customer).where(Customer.erp_code == "C002")).one()
            record.name, record.updated_run_id = GOLDEN, run.id
            run.status = "succeeded"
        first = sync(project, core)
        assert u8_rows(url, PHONE, code="C001") == [("+862188889999",)]
        assert u8_rows(url, NAME, code="C002") == [("北京腾达商贸有限公司",)]
        assert (first.delivery.sent, first.conflicts_waiting) == (1, 1)
        with session_factory(core)() as session:
            conflict = session.scalars(sa.select(SyncConflict)).one()
        assert (conflict.field, conflict.crm_value) == ("name", GOLDEN)


def test_a_failed_sync_leaves_no_conflict_and_its_retry_opens_each_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: sa.Engine
) -> None:
    """The first sync opens a conflict (C002's golden name) and then fails in its load: the run is undone and
    so is its conflict; the sync run again opens it once, not twice."""
    from crm_core.errors import LoadError

    with running_u8(tmp_path, monkeypatch) as (_api, project, _url):
        go_live(project, core)
        monkeypatch.setenv("CRMI_FAILPOINT", "load:customer:before_commit")
        with pytest.raises(LoadError, match="failpoint"):
            sync(project, core)
        with session_factory(core)() as session:
            assert session.scalars(sa.select(SyncConflict)).all() == []
        monkeypatch.delenv("CRMI_FAILPOINT")
        again = sync(project, core)
        assert (again.conflicts_open, again.conflicts_waiting) == (1, 1)
        with session_factory(core)() as session:
            conflict = session.scalars(sa.select(SyncConflict)).one()
        assert (conflict.field, conflict.status) == ("name", "open")


def read_by_ufts(project: Path) -> None:
    """Make the customer mapping incremental by ``ufts``: the migration saves a watermark, and the first sync
    reads only U8 rows changed since."""
    path = project / "mappings" / "erp_u8_customers.yaml"
    text = path.read_text(encoding="utf-8")
    old = "source: {connector: erp_u8, table: Customer, key: cCusCode}"
    assert old in text
    path.write_text(
        text.replace(
            old, "source: {connector: erp_u8, table: Customer, key: cCusCode, incremental: {cursor: ufts}}"
        ),
        encoding="utf-8",
    )


def test_the_first_sync_sends_only_what_the_crm_edited_when_u8_rows_are_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: sa.Engine
) -> None:
    """U8's rows are read by ufts from the migration's watermark, so the first sync reads none of them. The CRM
    edited C001's short name after go-live: only that goes out, not the migration's cleaned phone (+86…) over
    U8's. C002, changed by a steward's merge only, is not sent (its golden name would overwrite U8's)."""
    with running_u8(tmp_path, monkeypatch) as (_api, project, url):
        read_by_ufts(project)
        go_live(project, core)
        huaxin = customer_by_name(core, "上海华鑫科技有限公司")
        edit_record(core, "customer", huaxin.id, {"short_name": "华鑫"})
        first = sync(project, core)
        assert (first.received, first.delivery.sent, first.conflicts) == (0, 1, 0)
        assert u8_rows(url, ABBR, code="C001") == [("华鑫",)]
        assert u8_rows(url, PHONE, code="C001") == [("021-35967116",)]  # not the CRM's +86 form
        assert u8_rows(url, NAME, code="C002") == [("北京腾达商贸有限公司",)]  # not the golden name
        echo = sync(project, core)  # C001's row comes back from U8: it agrees
        assert (echo.received, echo.delivery.sent, echo.conflicts) == (1, 0, 0)
        quiet = sync(project, core)
        assert (quiet.received, quiet.delivery.sent, quiet.conflicts) == (0, 0, 0)
        assert u8_rows(url, PHONE, code="C001") == [("021-35967116",)]


def test_a_value_cleared_in_the_crm_is_cleared_in_u8(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: sa.Engine
) -> None:
    """The CRM clears a customer's phone (U8 had one): the edit sends an explicit empty and U8's phone is
    cleared; U8's row coming back does not bring the old phone back, and the next sync is quiet."""
    with running_u8(tmp_path, monkeypatch) as (_api, project, url):
        sync(project, core)
        huaxin = customer_by_name(core, "上海华鑫科技有限公司")
        edit_record(core, "customer", huaxin.id, {"phone": None})
        cleared = sync(project, core)
        assert cleared.delivery.applied == 1
        assert u8_rows(url, PHONE, code="C001") == [(None,)]
        echo = sync(project, core)
        assert (echo.received, echo.delivery.sent, echo.conflicts) == (1, 0, 0)
        quiet = sync(project, core)
        assert (quiet.received, quiet.delivery.sent) == (0, 0)
        assert customer_by_name(core, "上海华鑫科技有限公司").phone is None
        assert u8_rows(url, PHONE, code="C001") == [(None,)]


UNOWNED_EMAIL = CUSTOMER.replace(
    "crm: [name, short_name, phone, email, address]", "crm: [name, short_name, phone, address]"
)


def test_the_first_read_keeps_a_golden_value_nobody_owns_and_opens_a_conflict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: sa.Engine
) -> None:
    """Nobody owns `email` and no outbound field sends it (docs/sync.md's example). A steward gave C001 its
    golden email before the first sync; U8 has another. The first read does not replace it with U8's value
    unseen: the core keeps it and an open conflict names both values."""
    assert UNOWNED_EMAIL != CUSTOMER
    with running_u8(tmp_path, monkeypatch, sync_yaml(UNOWNED_EMAIL)) as (api, project, _url):
        api.erp.update_customer("C001", cCusEmail="sales@huaxin.com")
        go_live(project, core)
        with session_factory(core)() as session, session.begin():
            run = get_or_start_run(session, "steward-email", "synctest", mode="steward")
            record = session.scalars(sa.select(Customer).where(Customer.erp_code == "C001")).one()
            record.email, record.updated_run_id = "info@huaxin.cn", run.id
            run.status = "succeeded"
        first = sync(project, core)
        assert customer_by_name(core, "上海华鑫科技有限公司").email == "info@huaxin.cn"
        with session_factory(core)() as session:
            conflicts = {c.field: c for c in session.scalars(sa.select(SyncConflict))}
        assert sorted(conflicts) == ["email", "name"]  # and C002's golden name
        email = conflicts["email"]
        assert (email.status, email.crm_value, email.target_value) == (
            "open",
            "info@huaxin.cn",
            "sales@huaxin.com",
        )
        assert first.conflicts_waiting == 2


def sync_states(engine: sa.Engine) -> list[tuple[object, ...]]:
    """Every ``sync_state`` row as it is stored, in key order."""
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(
            sa.select(SyncState.__table__).order_by(SyncState.target, SyncState.entity, SyncState.entity_id)
        )]  # fmt: skip


def test_a_sync_that_fails_after_its_inbound_load_leaves_sync_state_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: sa.Engine
) -> None:
    """U8 raised C003's credit limit and the CRM changed C001's phone; the sync takes U8's change in, then fails
    delivering the phone. Its run is undone, and so is what it recorded as exchanged: sync_state does not claim
    U8 and the CRM agree on a credit limit the core no longer holds. The sync run again takes the change in and
    sends the phone, then all is quiet."""
    with running_u8(tmp_path, monkeypatch) as (api, project, url):
        sync(project, core)
        zhuotai = customer_by_name(core, "深圳卓泰电子有限公司")
        huaxin = customer_by_name(core, "上海华鑫科技有限公司")
        api.erp.update_customer("C003", iCusCreLine=90000)
        edit_record(core, "customer", huaxin.id, {"phone": "+862188889999"})
        states = sync_states(core)
        monkeypatch.setenv("CRMI_FAILPOINT", "sync:delivered")
        with pytest.raises(LoadError, match="failpoint"):
            sync(project, core)
        monkeypatch.delenv("CRMI_FAILPOINT")
        assert customer_by_name(core, "深圳卓泰电子有限公司").credit_limit == zhuotai.credit_limit
        assert sync_states(core) == states
        again = sync(project, core)
        assert again.received >= 1
        assert customer_by_name(core, "深圳卓泰电子有限公司").credit_limit == Decimal("90000.00")
        assert u8_rows(url, PHONE, code="C001") == [("+862188889999",)]
        sync(project, core)  # C001's row comes back from U8: its echo
        quiet = sync(project, core)
        assert (quiet.received, quiet.delivery.sent, quiet.conflicts) == (0, 0, 0)


class HeldSync:
    """A sync run in a thread that stands after its ownership check, in its load's transaction, until released."""

    def __init__(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, project: Path, core: sa.Engine
    ) -> None:
        import os

        self.announce, self.go = tmp_path / "owned", tmp_path / "owned.go"
        os.mkfifo(self.announce)
        os.mkfifo(self.go)
        monkeypatch.setenv("CRMI_FAILPOINT", "sync:owned")
        monkeypatch.setenv("CRMI_FAILPOINT_ACTION", f"hold:{self.announce}")
        self.syncing = in_background(lambda: sync(project, core))
        with self.announce.open(encoding="utf-8") as at:
            assert at.readline() == "sync:owned\n"  # it has read the records and stands before its write
        monkeypatch.delenv("CRMI_FAILPOINT")  # the sync's other entities, and the next syncs, go through

    def release(self) -> object:
        """Let the sync go on; return its report (or what it raised)."""
        if not self.syncing.done():
            with self.go.open("w", encoding="utf-8") as go:
                go.write("go\n")
        return self.syncing.result(timeout=120)

    def __enter__(self) -> HeldSync:
        return self

    def __exit__(self, *_exc: object) -> None:
        """A test that failed while the sync stood still lets it go (its thread would keep pytest from ending)."""
        self.release()


def in_background(work: Callable[[], object]) -> Future[object]:
    """Run ``work`` in a thread of its own; its result (or exception) comes through the future."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(work)
    pool.shutdown(wait=False)
    return future


def test_a_crm_edit_made_while_the_sync_takes_u8s_changes_in_is_not_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: sa.Engine
) -> None:
    """U8 raised C001's credit limit; while the sync has read C001 to take that in, a salesperson changes C001's
    phone. The edit waits for the sync's load instead of being overwritten by it with the phone read before:
    the core ends with both changes, and the next sync sends the phone."""
    edit_while_the_sync_reads(tmp_path, monkeypatch, core)


@pytest.mark.postgres
def test_a_crm_edit_made_while_the_sync_takes_u8s_changes_in_on_postgresql(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same with the core on PostgreSQL (where the edit waits on the sync's advisory lock)."""
    with postgresql_core() as engine:
        edit_while_the_sync_reads(tmp_path, monkeypatch, engine)


def edit_while_the_sync_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: sa.Engine) -> None:
    with running_u8(tmp_path, monkeypatch) as (api, project, url):
        sync(project, core)
        huaxin = customer_by_name(core, "上海华鑫科技有限公司")
        api.erp.update_customer("C001", iCusCreLine=120000)
        with HeldSync(tmp_path, monkeypatch, project, core) as held:
            edited = in_background(
                lambda: edit_record(core, "customer", huaxin.id, {"phone": "+862188889999"})
            )
            wait(
                [edited], timeout=2
            )  # it waits for the sync (given the time to overtake it, were it able to)
            report = held.release()
        assert isinstance(report, SyncReport), report
        assert isinstance(edited.result(timeout=120), str)
        after = customer_by_name(core, "上海华鑫科技有限公司")
        assert (after.phone, after.credit_limit) == ("+862188889999", Decimal("120000.00"))
        sync(project, core)
        assert u8_rows(url, PHONE, code="C001") == [("+862188889999",)]


def test_an_edit_that_waits_longer_than_its_limit_for_a_sync_changes_nothing_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: sa.Engine
) -> None:
    """An edit waits at most CRMI_EDIT_WAIT_SECONDS for a sync's load: then it fails with a line saying what
    held it and what to do, and changes nothing; made again once the sync is done, it lands."""
    with running_u8(tmp_path, monkeypatch) as (api, project, _url):
        sync(project, core)
        huaxin = customer_by_name(core, "上海华鑫科技有限公司")
        api.erp.update_customer("C001", iCusCreLine=120000)
        with HeldSync(tmp_path, monkeypatch, project, core) as held:
            monkeypatch.setenv("CRMI_EDIT_WAIT_SECONDS", "0.5")
            with pytest.raises(LoadError) as refused:
                edit_record(core, "customer", huaxin.id, {"phone": "+862188889999"})
            said = str(refused.value)
            assert said.startswith("the core is busy with another writer ("), said
            assert said.endswith(
                "): the edit waited 0.5 s for it; nothing was changed: wait for it to finish (`crmi runs list` "
                "shows the load runs) and try again (or raise CRMI_EDIT_WAIT_SECONDS)"
            ), said
            assert "sync u8 both on " in said and "(sync) is running" in said, said  # the sync, and its run
            assert isinstance(held.release(), SyncReport)
        assert customer_by_name(core, "上海华鑫科技有限公司").phone == huaxin.phone
        edit_record(core, "customer", huaxin.id, {"phone": "+862188889999"})
        assert customer_by_name(core, "上海华鑫科技有限公司").phone == "+862188889999"


def twins_synced(project: Path, core: sa.Engine) -> tuple[int, int]:
    """Two customers the CRM created by hand, twins of U8's C001 and C002, and the first sync (U8's customers in,
    the twins out); return the pairs waiting for a steward: C001 with its twin, C002 with its twin."""
    create_records(
        core, "customer", [{"name": "华鑫科技（上海）有限公司"}, {"name": "腾达商贸（北京）有限公司"}]
    )
    sync(project, core)
    pairs = []
    with session_factory(core)() as session, session.begin():
        for name, twin in [("上海华鑫科技有限公司", "华鑫科技（上海）有限公司"),
                           ("北京腾达商贸有限公司", "腾达商贸（北京）有限公司")]:  # fmt: skip
            left, right = sorted(customer_by_name(core, n).id for n in (name, twin))
            pair = MatchCandidate(entity="customer", left_id=left, right_id=right, probability=0.8,
                                  features={"reason": "names alike"}, status="review")  # fmt: skip
            session.add(pair)
            session.flush()
            pairs.append(int(pair.id))
    return pairs[0], pairs[1]


def a_steward(core: sa.Engine, name: str) -> Principal:
    """A workbench user with the steward role."""
    with core.begin() as connection:
        user_id = add_user(connection, name, "steward", "a-long-password-1", actor=None)
    return Principal(user_id, name, "steward", 0, "")


def steward_state(core: sa.Engine) -> dict[str, Any]:
    """What a steward's write changes: the pairs, the merges, the customers, the runs."""
    with core.connect() as connection:
        return {
            "pairs": connection.execute(
                sa.select(MatchCandidate.id, MatchCandidate.status).order_by(MatchCandidate.id)
            ).all(),
            "merges": connection.execute(
                sa.select(MergeLog.id, MergeLog.undone_at).order_by(MergeLog.id)
            ).all(),
            "customers": connection.execute(
                sa.select(Customer.id, Customer.merged_into_id, Customer.updated_run_id).order_by(Customer.id)
            ).all(),
            "runs": connection.execute(
                sa.select(LoadRun.id, LoadRun.mode, LoadRun.status).order_by(LoadRun.id)
            ).all(),
        }


def test_a_steward_merge_made_while_the_sync_takes_u8s_changes_in_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: sa.Engine
) -> None:
    """U8 raised C001's credit limit; while the sync has read C001 to take that in, a steward merges C001's twin
    into it with `crmi dedup decide` (workflow.decide) and another merges C002's in the workbench. Both wait for
    the sync's load, as a CRM edit does, instead of merging records the load is about to write: nothing is
    merged while it holds them, and once it has committed both merges apply over its values."""
    merge_while_the_sync_reads(tmp_path, monkeypatch, core)


@pytest.mark.postgres
def test_a_steward_merge_made_while_the_sync_takes_u8s_changes_in_waits_for_it_on_postgresql(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same with the core on PostgreSQL, where the merges wait on the sync's advisory lock (SQLite lets one
    writer at a time in)."""
    with postgresql_core() as engine:
        merge_while_the_sync_reads(tmp_path, monkeypatch, engine)


def merge_while_the_sync_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: sa.Engine) -> None:
    from integration.steward.decisions import Outcome, Rules
    from integration.steward.decisions import decide_cluster as workbench_decide

    with running_u8(tmp_path, monkeypatch) as (api, project, _url):
        by_cli, in_workbench = twins_synced(project, core)
        wang = a_steward(core, "wang")
        api.erp.update_customer("C001", iCusCreLine=120000)
        with HeldSync(tmp_path, monkeypatch, project, core) as held:
            before = steward_state(core)
            decided = in_background(
                lambda: decide(
                    core, by_cli, same=True, steward="li", run_key="steward-li", project="synctest"
                )
            )
            clicked = in_background(
                lambda: workbench_decide(core, in_workbench, "same", wang, Rules("synctest"))
            )
            wait([decided, clicked], timeout=2)  # given the time to overtake the sync, were they able to
            assert not decided.done() and not clicked.done()
            assert steward_state(core) == before  # nothing merged while the sync holds the records
            report = held.release()
        assert isinstance(report, SyncReport), report
        decision, outcome = decided.result(timeout=120), clicked.result(timeout=120)
        assert isinstance(decision, MatchCandidate) and decision.status == "merged", decision
        assert isinstance(outcome, Outcome) and outcome.verdict == "same", outcome
        huaxin = customer_by_name(core, "上海华鑫科技有限公司")
        assert huaxin.merged_into_id is None and huaxin.credit_limit == Decimal("120000.00")  # the sync's
        assert customer_by_name(core, "华鑫科技（上海）有限公司").merged_into_id == huaxin.id
        tengda = customer_by_name(core, "北京腾达商贸有限公司")
        assert customer_by_name(core, "腾达商贸（北京）有限公司").merged_into_id == tengda.id


@pytest.mark.postgres
def test_a_steward_write_that_waits_longer_than_its_limit_for_a_sync_changes_nothing_on_postgresql(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A steward's decision in the workbench and `crmi dedup undo` wait at most CRMI_EDIT_WAIT_SECONDS for a
    sync's load on PostgreSQL: then the workbench answers 423 and the command exits 1, each with a line saying
    what held it and what to do, having changed nothing; made again once the sync is done, they land."""
    from typer.testing import CliRunner

    from integration.cli import app
    from integration.steward.decisions import CORE_BUSY, Rules
    from integration.steward.decisions import decide_cluster as workbench_decide
    from integration.steward.errors import StewardError
    from tests.conftest import PG_URL

    with postgresql_core() as core, running_u8(tmp_path, monkeypatch) as (api, project, _url):
        merged, pending = twins_synced(project, core)
        decide(core, merged, same=True, steward="li", run_key="steward-li", project="synctest")
        with core.connect() as connection:
            merge_id = connection.scalar(sa.select(MergeLog.id))
        wang = a_steward(core, "wang")
        undo = ["dedup", "undo", str(merge_id), "--steward", "li", "--core-url", PG_URL]
        api.erp.update_customer("C001", iCusCreLine=120000)
        with HeldSync(tmp_path, monkeypatch, project, core) as held:
            monkeypatch.setenv("CRMI_EDIT_WAIT_SECONDS", "0.5")
            before = steward_state(core)
            with pytest.raises(StewardError) as refused:
                workbench_decide(core, pending, "same", wang, Rules("synctest"))
            assert (refused.value.status, str(refused.value)) == (CORE_BUSY, (
                "the steward decision waited 0.5 s for a sync taking the ERP's changes in, which still holds the "
                "core's records; nothing was changed: try again in a moment (or raise CRMI_EDIT_WAIT_SECONDS)"
            ))  # fmt: skip
            undone = CliRunner().invoke(app, undo)
            assert undone.exit_code == 1, undone.output
            said = " ".join(undone.output.split())
            assert "refused: the undo of a merge waited 0.5 s for a sync taking the ERP's changes in" in said
            assert steward_state(core) == before
            assert isinstance(held.release(), SyncReport)
        assert workbench_decide(core, pending, "same", wang, Rules("synctest")).verdict == "same"
        undone = CliRunner().invoke(app, undo)
        assert undone.exit_code == 0, undone.output


def test_runs_list_counts_no_change_for_what_a_sync_inserted_or_recorded_as_exchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: sa.Engine
) -> None:
    """`crmi runs list` counts the changes of rows that existed before a run: a first sync that only inserts
    U8's customers (and records what both sides hold) shows 0; one that takes a U8 change in shows it."""
    from crm_core.runs import list_runs

    with running_u8(tmp_path, monkeypatch) as (api, project, _url):
        first = sync(project, core)
        api.erp.update_customer("C003", iCusCreLine=90000)
        second = sync(project, core)
        changes = {run.run_key: run.changes for run in list_runs(core)}
        with core.connect() as connection:
            journaled = dict(connection.execute(  # every entry, the exchange records included
                sa.select(LoadRun.run_key, sa.func.count(RowChange.id)).join(RowChange, RowChange.load_run_id == LoadRun.id)
                .group_by(LoadRun.run_key)
            ).all())  # fmt: skip
        assert changes[first.run_key] == 0 < journaled[first.run_key], (changes, journaled)
        assert 1 <= changes[second.run_key] < journaled[second.run_key], (changes, journaled)


def test_a_crm_edit_in_a_form_the_core_does_not_keep_is_refused_so_the_sync_cannot_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: sa.Engine
) -> None:
    """A front end hands in the phone as typed (0571-88889999): refused with the form the core keeps, nothing
    changed. (Stored raw, it differed from U8's row as the sync reads it, +8657188889999, on every run, and the
    sync sent it back for ever.) In that form the edit goes out once and the syncs after it are quiet."""
    from crm_core.edits import create_record

    with running_u8(tmp_path, monkeypatch) as (_api, project, url):
        sync(project, core)
        huaxin = customer_by_name(core, "上海华鑫科技有限公司")
        with pytest.raises(LoadError) as refused:
            edit_record(core, "customer", huaxin.id, {"phone": "0571-88889999"})
        assert str(refused.value) == (
            f"customer {huaxin.id}: phone '0571-88889999' is not an E.164 phone number such as +8657188889999 "
            "(country code, no spaces or dashes); nothing was changed"
        )
        with pytest.raises(LoadError, match="new customer 1: credit_code '91330100ABC' is not a valid"):
            create_record(core, "customer", {"name": "新客户有限公司", "credit_code": "91330100ABC"})
        assert customer_by_name(core, "上海华鑫科技有限公司").phone == huaxin.phone
        # A value a mapping read (a conflict settled for U8's value) is written as a load writes it
        edit_record(core, "customer", huaxin.id, {"phone": "0571-88889999"}, as_read=True)
        assert customer_by_name(core, "上海华鑫科技有限公司").phone == "0571-88889999"
        # a form saved whole sends the phone it did not change, as it is stored: not refused
        edit_record(core, "customer", huaxin.id, {"phone": "0571-88889999", "short_name": "华鑫"})
        for field, typed in (("phone", "+86057188889999"), ("email", "Sales@HuaXin.cn")):
            with pytest.raises(LoadError, match=f"customer {huaxin.id}: {field} '"):
                edit_record(core, "customer", huaxin.id, {field: typed})
        edit_record(core, "customer", huaxin.id, {"phone": "+8657188889999"})
        sent = sync(project, core)
        assert sent.delivery.sent == 1 and u8_rows(url, PHONE, code="C001") == [("+8657188889999",)]
        sync(project, core)  # its echo
        for _ in range(2):
            quiet = sync(project, core)
            assert (quiet.received, quiet.kept_crm, quiet.delivery.sent) == (0, 0, 0)
