"""Sync limits a newcomer's trial found, against the local U8 OpenAPI server (real HTTP over a real U8 database):
what the outbound counts call an echo, a CRM customer waiting for a steward, and CRM edits of fields U8 owns.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from crm_core.edits import edit_record
from integration.cli import app
from integration.pipeline import core_engine
from tests.test_sync import customer_by_name, running_u8, sync


@pytest.fixture
def core(tmp_path: Path) -> Iterator[sa.Engine]:
    engine = core_engine(f"sqlite:///{tmp_path / 'core.sqlite'}")
    yield engine
    engine.dispose()


def _cli(project: Path, core: sa.Engine, *args: str) -> list[str]:
    return [*args, "--project", str(project), "--core-url", core.url.render_as_string(hide_password=False)]


def test_only_what_came_from_u8_is_counted_as_an_echo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: sa.Engine
) -> None:
    """A CRM edit of a field no outbound field sends builds the document U8 already has: nothing to send, but no
    echo (an echo is U8's own change coming back). U8's change read in is one; the run's output, --json and the
    Dagster metadata count both apart."""
    from integration.assets.sync import report_metadata

    with running_u8(tmp_path, monkeypatch) as (api, project, _url):
        sync(project, core)
        sync(project, core)  # the first run's inbound rows come back as echoes; from here on both sides agree
        huaxin = customer_by_name(core, "上海华鑫科技有限公司")
        edit_record(core, "customer", huaxin.id, {"industry": "医药"})  # no outbound field sends it
        quiet = sync(project, core, "outbound")
        assert quiet.delivery.sent == 0
        assert (quiet.capture.echoes_suppressed, quiet.capture.nothing_to_send) == (0, 1)
        data = quiet.as_dict()
        assert (data["echoes_suppressed"], data["nothing_to_send"]) == (0, 1)
        assert report_metadata(quiet)["nothing_to_send"].value == 1

        api.erp.update_customer("C002", iCusCreLine=60000)  # U8 owns the credit limit: applied in the core
        assert sync(project, core, "inbound").applied == 1
        echo = sync(project, core, "outbound")
        assert echo.delivery.sent == 0
        assert (echo.capture.echoes_suppressed, echo.capture.nothing_to_send) == (1, 0)

        edit_record(core, "customer", huaxin.id, {"industry": "化工"})
        shown = CliRunner().invoke(app, _cli(project, core, "sync", "run", "-d", "outbound", "--json"))
        assert shown.exit_code == 0, shown.output
        counts = json.loads(shown.output.strip().splitlines()[-1])
        assert (counts["echoes_suppressed"], counts["nothing_to_send"], counts["sent"]) == (0, 1, 0)
        assert counts["captured"]["nothing_to_send"] == 1
        edit_record(core, "customer", huaxin.id, {"industry": "医药"})
        table = CliRunner().invoke(app, _cli(project, core, "sync", "run", "-d", "outbound"))
        assert table.exit_code == 0, table.output
        assert "nothing_to_send" in table.output
        status = CliRunner().invoke(app, _cli(project, core, "sync", "status", "--json"))
        last = json.loads(status.output)["u8"]["last_run"]["stats"]
        assert (last["echoes_suppressed"], last["nothing_to_send"]) == (0, 1)


@pytest.mark.parametrize("decision", ["--different", "--same"])
def test_a_new_crm_customer_waiting_for_a_steward_waits_for_the_sync_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: sa.Engine, decision: str
) -> None:
    """A salesperson creates a customer that linkage (`crmi dedup run`) sends to review beside a U8 customer: the
    sync does not add it to U8 while the pair waits (its document waits, saying for which pair), and the U8
    customer of the pair keeps syncing. Decided different, the next sync adds it; decided the same, the merged-away
    customer is never sent and the survivor's merged values go to U8 as an edit."""
    from crm_core.db import session_factory
    from crm_core.edits import create_record
    from crm_core.models import Customer, MatchCandidate, SyncOutbox
    from tests.test_sync import u8_rows

    with running_u8(tmp_path, monkeypatch) as (_api, project, url):
        sync(project, core)
        huaxin = customer_by_name(core, "上海华鑫科技有限公司")
        new_id = create_record(core, "customer", {"name": "上海华鑫贸易有限公司", "short_name": "华鑫贸易",
                                                  "phone": "+862164001234", "address": "上海市徐汇区漕溪北路18号"})  # fmt: skip
        linked = CliRunner().invoke(app, _cli(project, core, "dedup", "run"))
        assert linked.exit_code == 0, linked.output
        with session_factory(core)() as session:
            pair = session.scalars(sa.select(MatchCandidate).where(MatchCandidate.status == "review")).one()
        assert {pair.left_id, pair.right_id} == {huaxin.id, new_id}
        edit_record(core, "customer", huaxin.id, {"phone": "+862135960000"})  # known to U8: not held

        held = sync(project, core)
        assert (held.delivery.applied, held.capture.waiting) == (1, 1)
        assert u8_rows(url, 'SELECT "cCusPhone" FROM "Customer" WHERE "cCusCode" = \'C001\'') == [
            ("+862135960000",)
        ]
        assert u8_rows(url, 'SELECT 1 FROM "Customer" WHERE "cCusDefine1" = :k', k=str(new_id)) == []
        with session_factory(core)() as session:
            row = session.scalars(
                sa.select(SyncOutbox).where(SyncOutbox.entity == "customer", SyncOutbox.entity_id == new_id)
            ).one()
        assert row.status == "waiting" and row.operation == "customer/add"
        assert row.last_error == (
            f"waits for a steward's decision on duplicate pair {pair.id} (customers {pair.left_id} and "
            f"{pair.right_id}): `crmi dedup review` lists it, `crmi dedup decide {pair.id}` or the steward "
            "workbench decides it"
        )
        assert sync(project, core).delivery.sent == 0  # still waiting: nothing goes out
        status = CliRunner().invoke(app, _cli(project, core, "sync", "status", "--json"))
        assert json.loads(status.output)["u8"]["outbox"].get("waiting") == 1
        assert json.loads(status.output)["u8"]["waiting"] == [
            {"entity": "customer", "entity_id": new_id, "reason": row.last_error}
        ]
        shown = CliRunner().invoke(app, _cli(project, core, "sync", "status"))
        assert (
            f"u8 waiting: customer {new_id}: waits for a steward's decision on duplicate pair {pair.id}"
            in (" ".join(shown.output.split()))
        ), shown.output

        decided = CliRunner().invoke(
            app, _cli(project, core, "dedup", "decide", str(pair.id), decision, "--steward", "li.na")
        )
        assert decided.exit_code == 0, decided.output
        after = sync(project, core)
        assert (after.delivery.applied, after.delivery.dead_letters, after.capture.waiting) == (1, 0, 0)
        added = u8_rows(url, 'SELECT "cCusName" FROM "Customer" WHERE "cCusDefine1" = :k', k=str(new_id))
        with session_factory(core)() as session:
            statuses = session.scalars(
                sa.select(SyncOutbox.status)
                .where(SyncOutbox.entity == "customer", SyncOutbox.entity_id == new_id)
                .order_by(SyncOutbox.id)
            ).all()
            merged_into = session.get(Customer, new_id).merged_into_id  # type: ignore[union-attr]
        if decision == "--different":
            assert added == [("上海华鑫贸易有限公司",)] and statuses == ["superseded", "done"]
            assert customer_by_name(core, "上海华鑫贸易有限公司").erp_code is not None
        else:  # merged into the U8 customer: never added, the survivor's filled-in short name goes as an edit
            assert merged_into == huaxin.id and added == [] and statuses == ["superseded"]
            abbr = 'SELECT "cCusAbbName" FROM "Customer" WHERE "cCusCode" = \'C001\''
            assert u8_rows(url, abbr) == [("华鑫贸易",)]
            assert u8_rows(url, 'SELECT COUNT(*) FROM "Customer"') == [(3,)]
        sync(project, core)  # U8's rows of what was sent come back
        assert sync(project, core).delivery.sent == 0


U8_CODE, OTHER_CODE, NEWER_CODE = "91440300708461136T", "91110000600037341L", "91350100M000100Y43"


def test_a_crm_edit_of_a_field_u8_owns_is_refused_unless_forced_and_then_a_conflict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, core: sa.Engine
) -> None:
    """U8 owns the credit code: `crmi edit` of it (and an edit made with the project's ownership) is refused before
    anything changes, naming the field, the target and what to do; the CRM's own fields go through. Forced, the
    edit is an open conflict: the sync says so and changes nothing in U8 until U8's value changes (the owner wins,
    the conflict is settled) or a person decides."""
    from crm_core.db import session_factory
    from crm_core.edits import create_record
    from crm_core.errors import OwnedFieldError
    from crm_core.models import LoadRun, SyncConflict
    from crm_core.runs import rollback_run
    from integration.pipeline import Migration
    from integration.sync.spec import owned_fields
    from tests.test_sync import u8_rows

    code_in_u8 = 'SELECT "cCusRegCode" FROM "Customer" WHERE "cCusCode" = \'C001\''
    with running_u8(tmp_path, monkeypatch) as (api, project, url):
        api.erp.update_customer("C001", cCusRegCode=U8_CODE)
        sync(project, core)
        huaxin = customer_by_name(core, "上海华鑫科技有限公司")
        assert huaxin.credit_code == U8_CODE
        with core.connect() as connection:
            runs_before = connection.scalar(sa.select(sa.func.count()).select_from(LoadRun))
        edit = _cli(
            project, core, "edit", "customer", str(huaxin.id), f"credit_code={OTHER_CODE}", "--by", "li.na"
        )
        refused = CliRunner().invoke(app, edit)
        assert refused.exit_code == 1, refused.output
        message = (
            f"customer {huaxin.id}: credit_code is owned by U8 (sync target 'u8'): change it in U8, and the next "
            "inbound sync brings it here; nothing was changed (--force-owned, or force_owned=True, makes the CRM "
            "differ from U8 on purpose, recorded as an open sync conflict)"
        )
        assert message in " ".join(refused.output.split()), refused.output
        owned = owned_fields(Migration.load(str(project)).project.sync)
        with pytest.raises(OwnedFieldError) as raised:
            both = {"phone": "+862135960000", "credit_code": OTHER_CODE}
            edit_record(core, "customer", huaxin.id, both, owned=owned)
        assert str(raised.value) == message
        # nothing of it was changed, no run left behind
        assert customer_by_name(core, "上海华鑫科技有限公司").phone == huaxin.phone
        with core.connect() as connection:
            assert connection.scalar(sa.select(sa.func.count()).select_from(LoadRun)) == runs_before
        # the same value as stored (a form saved whole) and a field the CRM owns go through
        same = _cli(project, core, "edit", "customer", str(huaxin.id), f"credit_code={U8_CODE}",
                    "phone=+862135960000", "--by", "li.na")  # fmt: skip
        assert CliRunner().invoke(app, same).exit_code == 0
        assert sync(project, core).delivery.applied == 1
        assert u8_rows(url, 'SELECT "cCusPhone" FROM "Customer" WHERE "cCusCode" = \'C001\'') == [
            ("+862135960000",)
        ]

        forced = CliRunner().invoke(app, [*edit, "--force-owned"])
        assert forced.exit_code == 0, forced.output
        assert "open sync conflict" in forced.output and "crmi sync conflicts" in forced.output
        assert customer_by_name(core, "上海华鑫科技有限公司").credit_code == OTHER_CODE
        shown = CliRunner().invoke(app, _cli(project, core, "sync", "run"))
        assert shown.exit_code == 2 and "1 conflict open" in shown.output, shown.output
        with session_factory(core)() as session:
            conflict = session.scalars(sa.select(SyncConflict).where(SyncConflict.status == "open")).one()
        assert (conflict.field, conflict.owner, conflict.crm_value, conflict.target_value) == (
            "credit_code",
            "u8",
            OTHER_CODE,
            U8_CODE,
        )
        assert u8_rows(url, code_in_u8) == [(U8_CODE,)]
        # U8's code changes: the owner's value comes in and the conflict is settled by it
        api.erp.update_customer("C001", cCusRegCode=NEWER_CODE)
        settled = sync(project, core)
        assert settled.conflicts_waiting == 0
        assert customer_by_name(core, "上海华鑫科技有限公司").credit_code == NEWER_CODE
        with session_factory(core)() as session:
            assert session.get(SyncConflict, conflict.id).status == "resolved_target"  # type: ignore[union-attr]

        # forced again, then a person takes U8's value back
        assert CliRunner().invoke(app, [*edit, "--force-owned"]).exit_code == 0
        with session_factory(core)() as session:
            again = session.scalars(sa.select(SyncConflict).where(SyncConflict.status == "open")).one()
        decide = _cli(
            project, core, "sync", "conflicts", "--decide", str(again.id), "--take", "target", "--by", "li.na"
        )
        assert CliRunner().invoke(app, decide).exit_code == 0
        assert customer_by_name(core, "上海华鑫科技有限公司").credit_code == NEWER_CODE
        quiet = sync(project, core)
        assert (quiet.conflicts_waiting, quiet.delivery.dead_letters) == (0, 0)

        # forced again: rolling the edit back takes its conflict with it
        run_key = edit_record(
            core, "customer", huaxin.id, {"credit_code": OTHER_CODE}, owned=owned, force_owned=True
        )
        rollback_run(core, run_key)
        with session_factory(core)() as session:
            assert session.scalars(sa.select(SyncConflict).where(SyncConflict.status == "open")).all() == []
        assert customer_by_name(core, "上海华鑫科技有限公司").credit_code == NEWER_CODE
        # forced, then set back to U8's code by an ordinary edit: that is no change of U8's field, and settles it
        edit_record(core, "customer", huaxin.id, {"credit_code": OTHER_CODE}, owned=owned, force_owned=True)
        edit_record(core, "customer", huaxin.id, {"credit_code": NEWER_CODE}, owned=owned)
        with session_factory(core)() as session:
            assert session.scalars(sa.select(SyncConflict).where(SyncConflict.status == "open")).all() == []
        # and once more: U8's owner then writes the same code there, which settles it
        edit_record(core, "customer", huaxin.id, {"credit_code": OTHER_CODE}, owned=owned, force_owned=True)
        api.erp.update_customer("C001", cCusRegCode=OTHER_CODE)
        agreed = sync(project, core)
        assert (agreed.conflicts_waiting, agreed.conflicts) == (0, 0)
        assert customer_by_name(core, "上海华鑫科技有限公司").credit_code == OTHER_CODE

        # a customer U8 does not know yet: its credit code is the CRM's to set
        new_id = create_record(core, "customer", {"name": "杭州新禾贸易有限公司"})
        fresh = _cli(
            project, core, "edit", "customer", str(new_id), f"credit_code={OTHER_CODE}", "--by", "li.na"
        )
        assert CliRunner().invoke(app, fresh).exit_code == 0


def test_crmi_edit_reads_each_value_as_its_fields_type() -> None:
    """`crmi edit` hands the edit the field's type (a decimal, a flag, none for `FIELD=`) and names a bad value."""
    from decimal import Decimal

    from crm_core.errors import CrmError
    from integration.cli import _edit_value

    assert _edit_value("customer", "credit_limit=12.50") == ("credit_limit", Decimal("12.50"))
    assert _edit_value("customer", "is_branch=yes") == ("is_branch", True)
    assert _edit_value("customer", "phone=") == ("phone", None)
    assert _edit_value("customer", "address=a=b") == ("address", "a=b")
    with pytest.raises(CrmError, match="credit_limit: '12,5x' is not a numeric value"):
        _edit_value("customer", "credit_limit=12,5x")
    with pytest.raises(CrmError, match="write FIELD=VALUE"):
        _edit_value("customer", "phone")
