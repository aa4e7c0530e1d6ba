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
