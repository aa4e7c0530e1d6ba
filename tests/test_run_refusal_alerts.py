"""`crmi run` alerts a refusal before any run starts, for cron: an operator learns that no run happened.

Each case refuses a real `crmi run` (the core held by another command, a core at an older schema, a project
that does not load) with alerts posted to a real webhook receiver on 127.0.0.1. No Dagster run is made, so
Dagster's failed-run sensor has nothing to alert a second time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from typer.testing import CliRunner

from crm_core.db import make_engine, upgrade
from crm_core.runs import core_run_lock
from integration.assets.alerts import run_failure_alert_sensor
from integration.assets.resources import dispose_engines
from integration.cli import app
from tests.servers.webhook_receiver import Receiver, closed_port_url, serve

KEY = "SECRET123"  # the robot's key in the webhook URL: never shown
UI = "http://dagster.example:3000"


@pytest.fixture(autouse=True)
def _alert_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("URL", "FORMAT", "SECRET"):
        monkeypatch.delenv(f"CRMI_ALERT_WEBHOOK_{name}", raising=False)
    monkeypatch.delenv("CRMI_ALERT_TIMEOUT", raising=False)
    monkeypatch.setenv("CRMI_DAGSTER_UI_URL", UI)
    monkeypatch.setattr("integration.alerts.RETRY_DELAYS", (0.0, 0.0))
    # a Dagster instance of this test's own: what the failed-run sensor would look at
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n", encoding="utf-8")
    monkeypatch.setenv("DAGSTER_HOME", str(home))


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    with serve() as rx:
        monkeypatch.setenv("CRMI_ALERT_WEBHOOK_URL", f"{rx.url}/robot/send?key={KEY}")
        yield rx


def fresh_core(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'core.sqlite'}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    return url


def crmi_run(project: Path, url: str, *options: str) -> Any:
    result = CliRunner().invoke(app, ["run", "--project", str(project), "--core-url", url, *options])
    dispose_engines()
    return result


def no_dagster_run_to_alert(receiver: Receiver) -> None:
    """No Dagster run was made, and the failed-run sensor's next tick posts nothing more."""
    with dg.DagsterInstance.get() as instance:
        assert instance.get_runs_count() == 0
        sensor = run_failure_alert_sensor()
        context = dg.build_sensor_context(instance=instance, cursor=None)
        first = sensor.evaluate_tick(context)  # the first tick sets its cursor
        again = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=first.cursor))
        assert again.skip_message == "no new failed runs"
    assert receiver.requests() == 1


def test_a_run_refused_because_another_command_holds_the_core_is_alerted_once(
    demo_project: Path, tmp_path: Path, receiver: Receiver
) -> None:
    url = fresh_core(tmp_path)
    engine = make_engine(url)
    with core_run_lock(engine, "crmi run on other-laptop (pid 4242)"):
        result = crmi_run(demo_project, url)
    engine.dispose()
    assert result.exit_code == 1, result.output  # the refusal's own exit code
    assert "another command holds this core" in result.stderr
    [body] = receiver.bodies()
    assert (body["kind"], body["job"], body["project"], body["exit_code"]) == (
        "run_refused",
        "migration",
        "demo",
        1,
    )
    assert body["run_id"] == "" and body["steps"] == [] and body["url"] == f"{UI}/runs"
    assert "another command holds this core (crmi run on other-laptop (pid 4242)" in body["error"]
    assert "wait for it to end" in body["error"]  # what to do
    assert "alert sent (json format)" in result.stderr
    assert KEY not in result.output
    no_dagster_run_to_alert(receiver)


def test_a_run_refused_by_a_core_at_an_older_schema_is_alerted_naming_the_upgrade(
    demo_project: Path, tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRMI_ALERT_WEBHOOK_FORMAT", "wecom")
    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    engine = make_engine(url)
    upgrade(engine, "0001")
    engine.dispose()
    result = crmi_run(demo_project, url, "--delta")
    assert result.exit_code == 1, result.output
    [body] = receiver.bodies()
    text = body["markdown"]["content"]
    for expected in ("run refused: migration_delta", "**Project:** demo", "is at schema revision 0001",
                     "crmi core upgrade", "**Exit code:** 1 (crmi run: no run started)"):  # fmt: skip
        assert expected in text, text
    assert "**Run:**" not in text  # there is none
    no_dagster_run_to_alert(receiver)


def test_a_run_refused_by_an_invalid_project_is_alerted_without_secrets(
    demo_project: Path, tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = fresh_core(tmp_path)
    project_file = demo_project / "project.yaml"
    text = project_file.read_text(encoding="utf-8")
    broken = text.replace(
        "url: ${ERP_U8_URL:-sqlite:///data/erp_u8.sqlite}",
        "url: mssql+pyodbc://sa:Pa55word@erp/u8\n    bogus: 1",
    )
    assert broken != text
    project_file.write_text(broken, encoding="utf-8")
    result = crmi_run(demo_project, url)
    assert result.exit_code == 1, result.output
    [body] = receiver.bodies()
    assert (body["kind"], body["job"], body["exit_code"]) == ("run_refused", "migration", 1)
    assert body["project"] == "demo"  # the folder's name: its project.yaml does not load
    assert "bogus" in body["error"] and "project.yaml" in body["error"]
    assert "Pa55word" not in str(body) and KEY not in result.output
    no_dagster_run_to_alert(receiver)
    # a trial is not alerted, as its failures are not
    trial = crmi_run(demo_project, url, "--trial")
    assert trial.exit_code == 1 and receiver.requests() == 1


def test_an_undelivered_refusal_alert_is_a_warning_and_the_exit_code_stays(
    demo_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = fresh_core(tmp_path)
    engine = make_engine(url)
    down = closed_port_url()
    monkeypatch.setenv("CRMI_ALERT_WEBHOOK_URL", f"{down}/robot/send?key={KEY}")
    with core_run_lock(engine, "crmi run on other-laptop (pid 4242)"):
        result = crmi_run(demo_project, url)
        monkeypatch.delenv("CRMI_ALERT_WEBHOOK_URL")
        off = crmi_run(demo_project, url)  # alerts off: the refusal alone
    engine.dispose()
    assert result.exit_code == 1, result.output
    assert (
        "warning: the alert of this refusal was not delivered: the webhook receiver could not be reached"
        in result.stderr
    )
    assert KEY not in result.output and down not in result.output
    assert off.exit_code == 1 and "alert" not in off.stderr
