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
