"""Failures leave nothing behind: a run that fails at any step, before or after its first load, is undone.

Each case starts from a core loaded by one good run, changes the sources, and fails the next run at one
step. The core must then be exactly as before (the rollback tests' ``content`` comparison), the run marked
failed, and ``crmi run`` must exit 1 naming the step and its cause on one line.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from crm_core.db import ensure_schema, make_engine
from crm_core.models import ExternalId, LoadRun, MergeLog
from crm_core.runs import CoreBusy, core_run_lock, rollback_run
from integration.assets.resources import dispose_engines
from integration.cli import app
from integration.jobs import (
    build_definitions,
    finish_partial_runs_sensor,
    undo_canceled_runs_sensor,
    undo_failed_runs_sensor,
)
from integration.project import load_project
from tests.conftest import DEMO, PG_URL, crmi_run_paused_at, reset_postgres, server_or_skip
from tests.servers.webhook_receiver import closed_port_url, serve
from tests.test_end_to_end import run_job
from tests.test_run_output import huge_sql_error
from tests.test_runs import content, edit_sources

pytestmark = pytest.mark.slow


def copy_project(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> tuple[Path, Path]:
    """The demo loaded once into a SQLite core, then its ERP edited: what each case starts from."""
    root = tmp_path_factory.mktemp("baseline")
    project = copy_project(DEMO, root / "demo")
    shutil.rmtree(project / "data", ignore_errors=True)
    shutil.copytree(demo_data, project / "data")
    core = root / "core.sqlite"
    run_job(project, f"sqlite:///{core}")
    dispose_engines()
    edit_sources(project)
    return project, core


def from_baseline(baseline: tuple[Path, Path], tmp_path: Path) -> tuple[Path, str]:
    """Return a private copy of the baseline project and the URL of a copy of its core."""
    project = copy_project(baseline[0], tmp_path / "demo")
    shutil.copy(baseline[1], tmp_path / "core.sqlite")
    return project, f"sqlite:///{tmp_path / 'core.sqlite'}"


def statuses(engine: sa.Engine) -> list[str]:
    with engine.connect() as connection:
        return list(connection.scalars(sa.select(LoadRun.status).order_by(LoadRun.id)))


def vanish_a_column(project: Path) -> None:
    mapping = project / "mappings" / "legacy_crm_opportunities.yaml"
    text = mapping.read_text(encoding="utf-8").replace("from: lead_source", "from: lead_src")
    mapping.write_text(text, encoding="utf-8")


CASES = {
    # name: (failpoint or None, step that fails, its cause)
    "extraction": (
        "extract:sales_xlsx_opportunities",
        "raw_sales_xlsx_opportunity",
        "failpoint extract:sales_xlsx_opportunities triggered",
    ),
    "mapping": (None, "staged_opportunity", "column(s) lead_src no longer exist in legacy_crm.opportunities"),
    "staging": ("stage:customer", "staged_customer", "failpoint stage:customer triggered"),
    "between two core loads": (
        "load:customer:after_commit",
        "core_customer",
        "failpoint load:customer:after_commit triggered",
    ),
    "dedup": ("dedup:candidates", "customer_match_candidates", "failpoint dedup:candidates triggered"),
    "merge": ("dedup:merge", "golden_customers", "failpoint dedup:merge triggered"),
}


def crmi_run(project: Path, url: str, *options: str) -> object:
    result = CliRunner().invoke(app, ["run", "--project", str(project), "--core-url", url, *options])
    dispose_engines()
    return result


def assert_failed_run(result: object, step: str, cause: str) -> None:
    """Exit 1; the failing step and its cause on one line, rich markup rendered, not printed."""
    assert result.exit_code == 1, result.output  # type: ignore[attr-defined]
    output: str = result.stderr  # type: ignore[attr-defined]
    [line] = [line for line in output.splitlines() if line.startswith(f"{step} failed: ")]
    assert cause in line, output
    assert len(line) <= 400 and "[red]" not in output and "Traceback" not in output
    assert "nothing of it remains in the core (load run marked failed)" in output


@pytest.mark.parametrize("case", list(CASES))
def test_a_run_failing_at_any_step_leaves_the_core_as_it_was(
    case: str, baseline: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failpoint, step, cause = CASES[case]
    project, url = from_baseline(baseline, tmp_path)
    monkeypatch.setenv("CRM_CORE_URL", url)  # restored afterwards: `crmi run --core-url` sets it
    if failpoint is None:
        vanish_a_column(project)
    else:
        monkeypatch.setenv("CRMI_FAILPOINT", failpoint)
    engine = make_engine(url)
    before = content(engine)

    result = crmi_run(project, url)

    assert_failed_run(result, step, cause)
    assert content(engine) == before
    assert statuses(engine) == ["succeeded", "failed"]
    engine.dispose()


KEY = "SECRET123"  # the robot's key in the webhook URL: never shown


def alert_to(monkeypatch: pytest.MonkeyPatch, base: str) -> None:
    """Configure alerts to ``base`` (json format), with retries that do not wait."""
    monkeypatch.setenv("CRMI_ALERT_WEBHOOK_URL", f"{base}/robot/send?key={KEY}")
    for name in ("CRMI_ALERT_WEBHOOK_FORMAT", "CRMI_ALERT_WEBHOOK_SECRET", "CRMI_ALERT_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CRMI_DAGSTER_UI_URL", "http://dagster.example:3000")
    monkeypatch.setattr("integration.alerts.RETRY_DELAYS", (0.0, 0.0))


@pytest.mark.parametrize("receiver_up", [True, False], ids=["delivered", "receiver-down"])
def test_a_failed_crmi_run_posts_one_alert_itself(
    baseline: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, receiver_up: bool
) -> None:
    """A run started by cron is not seen by Dagster's alert sensor: `crmi run` posts its alert itself."""
    failpoint, step, cause = CASES["dedup"]
    project, url = from_baseline(baseline, tmp_path)
    monkeypatch.setenv("CRM_CORE_URL", url)
    monkeypatch.setenv("CRMI_FAILPOINT", failpoint)
    with serve() as receiver:
        alert_to(monkeypatch, receiver.url if receiver_up else closed_port_url())
        result = crmi_run(project, url)

    assert_failed_run(result, step, cause)  # exit 1 either way: the alert does not change the outcome
    output: str = result.output  # type: ignore[attr-defined]
    assert KEY not in output
    if not receiver_up:
        assert (
            "warning: the alert of this run was not delivered: the webhook receiver could not be reached"
            in output
        )
        return
    [body] = receiver.bodies()
    assert body["kind"] == "run_failure" and body["steps"] == [step] and cause in body["error"]
    assert (body["project"], body["exit_code"]) == (load_project(project).name, 1)
    assert body["job"] == "migration" and body["url"].endswith(f"/runs/{body['run_id']}")
    assert "alert sent (json format)" in output


@pytest.mark.postgres
@pytest.mark.parametrize("case", ["extraction", "dedup"])
def test_on_postgresql_too(case: str, demo_project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = server_or_skip(PG_URL, "PostgreSQL")
    reset_postgres(engine)
    monkeypatch.setenv("CRM_CORE_URL", PG_URL)
    run_job(demo_project, PG_URL)
    edit_sources(demo_project)
    before = content(engine)
    failpoint, step, cause = CASES[case]
    monkeypatch.setenv("CRMI_FAILPOINT", failpoint or "")

    result = crmi_run(demo_project, PG_URL)

    assert_failed_run(result, step, cause)
    assert content(engine) == before
    assert statuses(engine) == ["succeeded", "failed"]
    engine.dispose()


def test_materializing_core_assets_outside_the_jobs_is_undone_too(
    baseline: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ad-hoc selection (the UI's "Materialize") has no job and no failure hook: the steps undo the run."""
    project, url = from_baseline(baseline, tmp_path)
    engine = make_engine(url)
    before = content(engine)
    defs = build_definitions(project, url)
    selection = dg.AssetSelection.assets("core_customer").upstream()
    monkeypatch.setenv("CRMI_FAILPOINT", "load:customer:after_commit")
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            list(defs.assets or []), selection=selection, resources=defs.resources, instance=instance,
            raise_on_error=False,
        )  # fmt: skip
    dispose_engines()
    assert not result.success
    assert {e.step_key for e in result.all_events if e.is_step_failure} == {"core_customer"}
    assert content(engine) == before  # sales reps and customers had committed: both undone
    assert statuses(engine) == ["succeeded", "failed"]
    engine.dispose()


def test_a_database_error_in_a_step_is_one_line_without_its_statement(
    baseline: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise huge_sql_error()

    monkeypatch.setattr("integration.dedup.workflow.find_candidates", boom)
    project, url = from_baseline(baseline, tmp_path)
    monkeypatch.setenv("CRM_CORE_URL", url)
    engine = make_engine(url)
    before = content(engine)

    result = crmi_run(project, url, "--json")

    assert_failed_run(
        result,
        "customer_match_candidates",
        "OperationalError: Expression tree is too large (maximum depth 1000)",
    )
    assert "SELECT" not in result.output
    payload = json.loads(result.stdout)
    assert payload["success"] is False and payload["status"] == "failed"
    assert payload["failures"][0] == {
        "step": "customer_match_candidates",
        "cause": "OperationalError: Expression tree is too large (maximum depth 1000)",
        "after_failure": False,
    }
    assert [p["phase"] for p in payload["phases"]][:3] == ["extract", "map_validate", "load"]
    assert content(engine) == before
    engine.dispose()


def test_a_run_that_does_not_balance_exits_2_and_says_why(
    demo_project: Path, sqlite_core_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRM_CORE_URL", sqlite_core_url)
    monkeypatch.chdir(tmp_path)  # reports go to var/reports/ under the working directory
    engine = make_engine(sqlite_core_url)
    ensure_schema(engine)
    with engine.begin() as connection:  # the core changes what was written: amounts no longer agree
        connection.execute(
            sa.text(
                "CREATE TRIGGER skew_amount AFTER INSERT ON opportunities WHEN NEW.amount IS NOT NULL "
                "BEGIN UPDATE opportunities SET amount = NEW.amount + 1 WHERE id = NEW.id; END"
            )
        )

    with serve() as receiver:
        alert_to(monkeypatch, receiver.url)
        result = crmi_run(demo_project, sqlite_core_url)

    assert result.exit_code == 2, result.output  # type: ignore[attr-defined]
    [alert] = receiver.bodies()  # `crmi run` alerts a run that does not balance too
    assert (alert["kind"], alert["exit_code"], alert["steps"]) == ("run_unbalanced", 2, [])
    assert re.match(r"\d+ lines fail; \w+/opportunity: amount loaded", alert["error"]), alert
    output: str = result.stdout  # type: ignore[attr-defined]
    assert "The run does not balance:" in output
    reason = re.search(r"sales_xlsx/opportunity: amount loaded ([\d,.]+) ≠ core ([\d,.]+)", output)
    assert reason is not None, output
    assert reason.group(1) != reason.group(2)
    assert "crmi rollback" in output and "Time per phase" in output
    assert statuses(engine) == ["unbalanced"]
    with engine.connect() as connection:
        run_key = connection.scalar(sa.select(LoadRun.run_key))
    markdown = tmp_path / "var" / "reports" / str(run_key) / "reconciliation.md"
    assert "## Why it does not balance" in markdown.read_text(encoding="utf-8")
    engine.dispose()


def test_crmi_run_json_has_each_phase_with_seconds_rows_and_rows_per_second(
    demo_project: Path, sqlite_core_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRM_CORE_URL", sqlite_core_url)

    result = crmi_run(demo_project, sqlite_core_url, "--json")

    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    payload = json.loads(result.stdout)  # type: ignore[attr-defined]
    phases = {p["phase"]: p for p in payload["phases"]}
    assert list(phases) == ["extract", "map_validate", "load", "link", "merge", "reconcile"]
    assert all(set(p) == {"phase", "seconds", "rows", "rows_per_second"} for p in phases.values())
    assert all(p["seconds"] > 0 and p["rows"] > 0 and p["rows_per_second"] > 0 for p in phases.values())
    read = sum(line["rows_read"] for line in payload["lines"])
    assert payload["rows_read"] == phases["extract"]["rows"] == phases["load"]["rows"] == read
    assert payload["seconds_total"] >= sum(p["seconds"] for p in phases.values())
    assert payload["rows_per_second"] == pytest.approx(read / payload["seconds_total"], rel=0.01)
    assert payload["unbalanced"] == [] and payload["success"] is True
    # where each phase's time went: its steps, in the order they ran (one at a time in process)
    steps = payload["steps"]
    assert all(set(s) == {"step", "phase", "seconds", "rows", "rows_per_second"} for s in steps)
    assert {s["step"] for s in steps} >= {"core_customer", "core_opportunity", "customer_match_candidates"}
    for phase, timing in phases.items():
        mine = [s for s in steps if s["phase"] == phase]
        assert sum(s["rows"] for s in mine) == timing["rows"]
        assert sum(s["seconds"] for s in mine) == pytest.approx(timing["seconds"], abs=0.002 * len(mine))


def test_the_run_failure_sensor_undoes_what_no_step_could(
    baseline: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure around the steps (here: the steps' own undo disabled) is undone by the sensor (`make ui`)."""
    project, url = from_baseline(baseline, tmp_path)
    engine = make_engine(url)
    before = content(engine)
    defs = build_definitions(project, url)
    assert "undo_failed_load_runs" in [s.name for s in defs.sensors or []]
    monkeypatch.setattr("integration.assets.factories.abort_run", lambda engine, run_key: False)
    monkeypatch.setenv("CRMI_FAILPOINT", "load:customer:after_commit")
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            list(defs.assets or []), selection=dg.AssetSelection.assets("core_customer").upstream(),
            resources=defs.resources, instance=instance, raise_on_error=False,
        )  # fmt: skip
        dispose_engines()
        assert not result.success and content(engine) != before and statuses(engine)[-1] == "running"
        sensor = undo_failed_runs_sensor(url)
        context = dg.build_run_status_sensor_context(
            sensor_name=sensor.name,
            dagster_event=result.get_run_failure_event(),
            dagster_instance=instance,
            dagster_run=result.dagster_run,
        ).for_run_failure()
        sensor(context)  # type: ignore[operator]
    assert content(engine) == before
    assert statuses(engine) == ["succeeded", "failed"]
    engine.dispose()


def test_a_failed_blocking_check_says_which_rule_and_why_on_one_line(
    baseline: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not 'DagsterAssetCheckFailedError: 1 blocking asset check failed': the check, the mapping, the ratio."""
    project, url = from_baseline(baseline, tmp_path)
    monkeypatch.setenv("CRM_CORE_URL", url)
    config = project / "project.yaml"
    config.write_text(
        config.read_text(encoding="utf-8") + "validation: {max_reject_ratio: 0}\n", encoding="utf-8"
    )
    engine = make_engine(url)
    before = content(engine)

    result = crmi_run(project, url)

    assert result.exit_code == 1, result.output  # type: ignore[attr-defined]
    output: str = result.stderr  # type: ignore[attr-defined]
    [line] = [line for line in output.splitlines() if " failed: check_reject_ratio failed: " in line]
    assert line.startswith("staged_") and "of its rows (limit 0%" in line, output
    assert "DagsterAssetCheckFailedError" not in output
    assert content(engine) == before
    assert statuses(engine) == ["succeeded", "failed"]
    engine.dispose()


def plant_duplicates(project: Path) -> list[str]:
    """Add to the ERP companies only linkage can find: names mistyped, no key, the same phones and addresses.

    Three, not one: the match weights are estimated (ECM) from the population, one pair alone may not tip them.
    """
    with sqlite3.connect(project / "data" / "erp_u8.sqlite") as erp:
        erp.execute(
            "INSERT INTO Customer (cCusCode, cCusName, cCusAddress, cCusPhone, cCusPerson) "
            "SELECT 'ZZ' || cCusCode, substr(cCusName, 1, 3) || '鑫' || substr(cCusName, 5), cCusAddress, "
            "cCusPhone, cCusPerson FROM Customer WHERE cCusCode IN "
            "(SELECT cCusCode FROM Customer ORDER BY cCusCode LIMIT 3 OFFSET 3)"
        )
        return [code for (code,) in erp.execute("SELECT cCusCode FROM Customer WHERE cCusCode LIKE 'ZZ0%'")]


def dead_pid() -> int:
    """The pid of a process that has ended (what a UI run's worker is once its run is over)."""
    process = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True
    )
    return int(process.stdout)


def undated(core: dict[str, list[tuple[Any, ...]]]) -> dict[str, list[tuple[Any, ...]]]:
    """``content`` without when linkage decided its pairs (two runs decide the same pairs at other times)."""
    return {
        table: [tuple(c for c in row if c[0] != "decided_at") for row in rows] for table, rows in core.items()
    }


def run_event(instance: dg.DagsterInstance, run_id: str, kind: dg.DagsterEventType) -> dg.DagsterEvent:
    """The run's event of ``kind`` (RUN_SUCCESS, RUN_CANCELED), as a run-status sensor is given it."""
    [event] = [
        e.dagster_event
        for e in instance.all_logs(run_id)
        if e.dagster_event and e.dagster_event.event_type == kind
    ]
    return event


def materialize_customers_on_their_own(
    project: Path, url: str, instance: dg.DagsterInstance
) -> dg.ExecuteInJobResult:
    """What the UI's "Materialize" of core_customer and its upstream does: a load run no reconciliation ends."""
    defs = build_definitions(project, url)
    result = dg.materialize(
        list(defs.assets or []), selection=dg.AssetSelection.assets("core_customer").upstream(),
        resources=defs.resources, instance=instance,
    )  # fmt: skip
    dispose_engines()
    engine = make_engine(url)
    with engine.begin() as connection:  # its worker process has ended, as a UI run's does
        connection.execute(sa.update(LoadRun).where(LoadRun.run_key == result.run_id).values(pid=dead_pid()))
    engine.dispose()
    return result


@pytest.mark.parametrize("ended_by", ["the sensor", "crmi run itself"])
def test_assets_materialized_on_their_own_keep_their_load_and_the_next_run_links_it(
    ended_by: str, baseline: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A succeeded UI materialization is not a crash: it ends partial, keeps its changes, and is linked next run.

    The next ``crmi run`` must not undo it (its process is gone), and must link the customers it loaded even
    though that run finds them unchanged: the core ends as one ``crmi run`` over the same sources leaves it.
    """
    control_project, control_url = from_baseline(baseline, tmp_path / "control")
    planted = plant_duplicates(control_project)
    assert crmi_run(control_project, control_url).exit_code == 0
    control = make_engine(control_url)
    expected = content(control)
    with control.connect() as connection:  # linkage, not the load, merged a planted company
        methods = connection.scalars(
            sa.select(ExternalId.match_method).where(
                ExternalId.entity == "customer", ExternalId.external_key.in_(planted)
            )
        ).all()
        linked = [
            int(m.split(":")[1]) for m in methods if m.startswith("linked:")
        ]  # linked:<the merged record>
        logged = connection.scalar(
            sa.select(sa.func.count()).select_from(MergeLog).where(MergeLog.merged_id.in_(linked))
        )
    assert linked and logged == len(linked), methods
    control.dispose()

    project, url = from_baseline(baseline, tmp_path / "partial")
    plant_duplicates(project)
    engine = make_engine(url)
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n", encoding="utf-8")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        result = materialize_customers_on_their_own(project, url, instance)
        assert result.success and statuses(engine) == ["succeeded", "running"]
        if ended_by == "the sensor":
            sensor = finish_partial_runs_sensor(url)
            context = dg.build_run_status_sensor_context(
                sensor_name=sensor.name,
                dagster_event=run_event(instance, result.run_id, dg.DagsterEventType.RUN_SUCCESS),
                dagster_instance=instance,
                dagster_run=result.dagster_run,
            )
            sensor(context)  # type: ignore[operator]
            assert statuses(engine) == ["succeeded", "partial"]
    loaded = content(engine)
    # recovery racing the sensor: a run that ended meanwhile is not rolled back
    if ended_by == "the sensor":
        assert (
            rollback_run(engine, result.run_id, status="failed", allow_running=True, only_if=("running",))
            == []
        )
        assert content(engine) == loaded

    run = crmi_run(project, url)

    assert run.exit_code == 0, run.output  # type: ignore[attr-defined]
    assert "crashed" not in run.stderr  # type: ignore[attr-defined]
    assert statuses(engine) == ["succeeded", "partial", "succeeded"]
    assert undated(content(engine)) == undated(expected)
    engine.dispose()


def test_a_canceled_run_is_undone_by_its_sensor(
    baseline: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run terminated between steps (customers committed) leaves the core as it was before it."""
    project, url = from_baseline(baseline, tmp_path)
    engine = make_engine(url)
    before = content(engine)
    defs = build_definitions(project, url)
    assert {"undo_canceled_load_runs", "finish_partial_load_runs"} <= {s.name for s in defs.sensors or []}
    with dg.instance_for_test() as instance:
        result = materialize_customers_on_their_own(project, url, instance)
        assert content(engine) != before
        instance.report_run_canceled(result.dagster_run)
        run = instance.get_run_by_id(result.run_id)
        assert run is not None and run.status == dg.DagsterRunStatus.CANCELED
        sensor = undo_canceled_runs_sensor(url)
        context = dg.build_run_status_sensor_context(
            sensor_name=sensor.name, dagster_event=run_event(instance, result.run_id, dg.DagsterEventType.RUN_CANCELED),
            dagster_instance=instance, dagster_run=run,
        )  # fmt: skip
        sensor(context)  # type: ignore[operator]
    assert content(engine) == before
    assert statuses(engine) == ["succeeded", "failed"]
    engine.dispose()


def test_crmi_run_refuses_to_load_beside_a_run_still_loading(
    baseline: tuple[Path, Path], tmp_path: Path
) -> None:
    """Another process on this host holds a running load run: `crmi run` says which and exits 1, loading nothing."""
    project, url = from_baseline(baseline, tmp_path)
    engine = make_engine(url)
    before = content(engine)
    loading = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        with engine.begin() as connection:
            connection.execute(sa.insert(LoadRun).values(
                run_key="another-terminal", project="demo", mode="full", status="running", stats={},
                host=socket.gethostname(), pid=loading.pid,
            ))  # fmt: skip
        result = crmi_run(project, url)
    finally:
        loading.communicate()
    assert result.exit_code == 1, result.output  # type: ignore[attr-defined]
    [line] = [line for line in result.stderr.splitlines() if "is loading into this core" in line]  # type: ignore[attr-defined]
    assert "another-terminal" in line and str(loading.pid) in line
    assert content(engine) == before and statuses(engine) == ["succeeded", "running"]
    engine.dispose()


@pytest.mark.parametrize(
    "command",
    [["run"], ["rollback", "1"], ["runs", "recover"], ["dedup", "run"], ["core", "upgrade"]],
    ids=["run", "rollback", "recover", "dedup", "upgrade"],
)
def test_commands_that_rewrite_the_core_wait_their_turn_too(
    baseline: tuple[Path, Path], tmp_path: Path, command: list[str]
) -> None:
    """A second run, or rolling back, recovering, linking or upgrading the schema beside a run, would interleave
    with its load: each is refused while another command (here from another host) holds the core, naming it, and
    changes nothing; then it runs."""
    project, url = from_baseline(baseline, tmp_path)
    engine = make_engine(url)
    before = content(engine)
    options = ["--project", str(project)] if command[0] in ("run", "dedup") else []
    with core_run_lock(engine, "crmi run on other-laptop (pid 4242)"):
        refused = CliRunner().invoke(app, [*command, *options, "--core-url", url])
    dispose_engines()
    assert refused.exit_code == 1, refused.output
    [line] = [line for line in refused.stderr.splitlines() if "another command holds this core" in line]
    assert (
        "crmi run on other-laptop (pid 4242)" in line
        and f"`crmi {' '.join(command[: 1 if command[0] == 'rollback' else 2])}` again" in line
    )
    assert content(engine) == before and statuses(engine) == ["succeeded"]
    done = CliRunner().invoke(app, [*command, *options, "--core-url", url])
    dispose_engines()
    assert done.exit_code == 0, done.output
    engine.dispose()


HOLD_THE_LOCK = """
import sys
from crm_core.db import make_engine
from crm_core.runs import core_run_lock
with core_run_lock(make_engine(sys.argv[1]), "crmi run on the killed laptop (pid 1)"):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_the_run_lock_is_one_holder_at_a_time_and_dies_with_its_process(core_url: str) -> None:
    """Across processes (and hosts, on PostgreSQL): a second holder is refused with the first one's name; a
    killed holder leaves no stale lock."""
    engine, other = make_engine(core_url), make_engine(core_url)
    ensure_schema(engine)
    with subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, core_url], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent, text=True,
    ) as holder:  # fmt: skip
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
            refused = pytest.raises(
                CoreBusy, match=r"another command holds this core \(crmi run on the killed laptop"
            )
            with refused, core_run_lock(engine, "crmi run here"):
                pass
        finally:
            holder.kill()
    # the killed holder's lock went with its process
    with core_run_lock(engine, "crmi run here"), pytest.raises(CoreBusy, match=r"crmi run here"):  # noqa: SIM117
        with core_run_lock(other, "a third one"):
            pass
    with core_run_lock(engine, "crmi run here, again"):  # released when the block ended
        pass
    engine.dispose()
    other.dispose()


@pytest.fixture
def pg_core() -> str:
    """The PostgreSQL test database (the run lock needs no schema)."""
    engine = server_or_skip(PG_URL, "PostgreSQL")
    engine.dispose()
    return PG_URL


@pytest.mark.postgres
def test_the_run_lock_names_a_holder_logged_in_as_another_role(pg_core: str) -> None:
    """Two consultants log in as two roles: PostgreSQL hides when the other's session started (and from
    where) from an unprivileged role, but the refusal still names the holder."""
    admin = make_engine(pg_core)
    role = f"crmi_lock_test_{re.sub(r'[^a-z0-9_]', '_', sa.engine.make_url(pg_core).database or 'x')}"
    with admin.begin() as connection:
        connection.execute(sa.text(
            f"DO $$ BEGIN CREATE ROLE {role} NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        ))  # fmt: skip
    other = make_engine(pg_core)

    @sa.event.listens_for(other, "connect")
    def unprivileged(dbapi_connection: Any, _record: Any) -> None:
        with dbapi_connection.cursor() as cursor:
            cursor.execute(f"SET ROLE {role}")
        dbapi_connection.commit()

    try:
        refused = pytest.raises(CoreBusy, match=r"crmi run on laptop-a \(pid 4242\)")
        with core_run_lock(admin, "crmi run on laptop-a (pid 4242)"), refused, core_run_lock(other, "b"):
            pass
    finally:
        other.dispose()
        with admin.begin() as connection:
            connection.execute(sa.text(f"DROP ROLE IF EXISTS {role}"))
        admin.dispose()


@pytest.mark.postgres
def test_a_lost_run_lock_session_does_not_hide_how_the_run_ended(pg_core: str) -> None:
    """The lock's session ends during the run (a server restart, a DBA, a firewall): the lock went with it;
    releasing it must not replace the run's outcome (its exit code) with an error."""
    engine, admin = make_engine(pg_core), make_engine(pg_core)

    class Outcome(Exception):
        pass

    with pytest.raises(Outcome), core_run_lock(engine, "crmi run on lost (pid 1)"):
        with admin.begin() as connection:
            connection.execute(sa.text(
                "SELECT pg_terminate_backend(pid, 30000) FROM pg_stat_activity WHERE application_name = 'crmi run on lost (pid 1)'"
            ))  # fmt: skip
        raise Outcome
    with core_run_lock(engine, "the next run"):  # released: it went with the session
        pass
    engine.dispose()
    admin.dispose()


@pytest.mark.postgres
def test_a_vanished_holder_is_probed_and_named_by_its_server_process(pg_core: str) -> None:
    """A holder whose laptop left the network keeps its session until the server notices: the lock's session
    probes its client after 30 s of silence, and the refusal names the server process a DBA may end."""
    engine, other, admin = make_engine(pg_core), make_engine(pg_core), make_engine(pg_core)
    statements: list[str] = []
    sa.event.listen(
        engine, "before_cursor_execute", lambda _c, _cur, statement, *_: statements.append(statement)
    )
    with core_run_lock(engine, "crmi run on vanished (pid 7)"):
        assert {"SET SESSION tcp_keepalives_idle = 30", "SET SESSION tcp_keepalives_count = 3"} <= set(
            statements
        )
        with pytest.raises(CoreBusy) as refused, core_run_lock(other, "second"):
            pass
        found = re.search(
            r"crmi run on vanished \(pid 7\) from [0-9.:a-f]+, server process (\d+) since ",
            str(refused.value),
        )
        assert found is not None, str(refused.value)
        with admin.begin() as connection:
            # the timeout makes the call wait until the backend has exited (and its lock is gone), not only signalled
            assert connection.scalar(sa.text(f"SELECT pg_terminate_backend({int(found.group(1))}, 30000)"))
        with core_run_lock(other, "after the DBA"):  # the ended session's lock is free
            pass
    for e in (engine, other, admin):
        e.dispose()


@pytest.mark.postgres
def test_the_run_lock_outlives_the_servers_idle_session_timeout(pg_core: str) -> None:
    """The lock's session is idle for the whole run: a server (or role) with ``idle_session_timeout`` must not
    end it, or a second run could start beside the first."""
    engine = make_engine(pg_core, connect_args={"options": "-c idle_session_timeout=500"})
    other = make_engine(pg_core)
    with core_run_lock(engine, "crmi run on a long run (pid 1)"):
        time.sleep(1.5)
        with pytest.raises(CoreBusy, match=r"crmi run on a long run"), core_run_lock(other, "second"):
            pass
    engine.dispose()
    other.dispose()


def test_the_run_lock_holder_keeps_its_pid_beside_a_long_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL keeps 63 characters of a session's name: a long host name is cut, not the pid to stop."""
    from integration import cli

    monkeypatch.setattr(
        socket, "gethostname", lambda: "consultant-laptop-0042.corp.customer-example.internal"
    )
    holder = cli.run_lock_holder()
    assert len(holder) <= 63 and holder.startswith("crmi run on consultant-laptop-0042")
    assert holder.endswith(f" (pid {os.getpid()})")


def test_ctrl_c_under_the_progress_bar_keeps_the_core_locked_until_the_run_has_stopped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C while `crmi run` shows its progress bar interrupts the running step, which then undoes its load:
    until the run has stopped, a second Ctrl-C included, the core stays locked (another run, rollback or
    linkage is refused); then it is free."""
    from integration.cli import _execute_with_progress, _one_at_a_time

    main = threading.main_thread()
    if threading.current_thread() is not main or not hasattr(signal, "pthread_kill"):  # pragma: no cover
        pytest.skip("Ctrl-C is pressed here by signalling the main thread (POSIX), where the test must run")
    engine = make_engine(f"sqlite:///{tmp_path / 'core.sqlite'}")
    started, released, woken = threading.Event(), threading.Event(), threading.Event()
    milestones: queue.Queue[str] = queue.Queue()

    def busy() -> None:
        # Woken after each Ctrl-C: a lock wait misses a signal that lands just before it blocks (CPython).
        while not released.is_set():
            woken.wait(60)
            woken.clear()

    @dg.op
    def loads() -> None:
        try:
            started.set()
            busy()  # loading, until the test lets it end
        except dg.DagsterExecutionInterruptedError:
            try:
                milestones.put("interrupted")
                busy()  # undoing what it loaded
            except dg.DagsterExecutionInterruptedError:
                milestones.put("interrupted again")
                busy()  # a step still busy after the second Ctrl-C
            raise

    @dg.job
    def one_step() -> None:
        loads()

    def core_locked() -> bool:
        try:
            with core_run_lock(engine, "crmi rollback here"):
                return False
        except CoreBusy:
            return True

    def ctrl_c() -> None:
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
        woken.set()

    seen: list[tuple[str, bool]] = []

    def press_ctrl_c_twice() -> None:
        try:
            assert started.wait(60)
            ctrl_c()
            seen.append((milestones.get(timeout=60), core_locked()))
            if seen[-1][0] == "interrupted":
                ctrl_c()
                seen.append((milestones.get(timeout=60), core_locked()))
        finally:
            released.set()
            woken.set()

    quiet = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
    presser = threading.Thread(target=press_ctrl_c_twice)
    with dg.DagsterInstance.ephemeral() as instance:
        presser.start()
        result = None
        try:
            with _one_at_a_time(engine, "crmi run"):
                result = _execute_with_progress(one_step, instance, quiet, {}, True)
        except KeyboardInterrupt:  # the run lock left behind a step still running
            pass
        milestones.put("the lock released")
        presser.join()
    assert seen == [("interrupted", True), ("interrupted again", True)]
    assert not core_locked()
    assert result is not None and not result.success
    notices = [line for line in capsys.readouterr().err.splitlines() if "stopping the run" in line]
    assert notices == [
        "Ctrl-C: stopping the run; it undoes what it loaded, and the core stays locked until it has stopped",
        "still stopping the run: the core stays locked until it has stopped",
    ]
    engine.dispose()


def test_ctrl_c_in_a_terminal_stops_the_run_without_a_helpers_traceback(
    demo_project: Path, tmp_path: Path
) -> None:
    """A terminal's Ctrl-C reaches every process of the group: Dagster's log-mirroring helpers (``tail`` and a
    Python orphan watcher per stream) too. The watcher printed a KeyboardInterrupt traceback over the run's own
    lines and ``tail`` stopped mirroring them. Only `crmi run` answers Ctrl-C: it says the step was
    interrupted and undone, exits 1, and leaves no helper behind."""
    core_url = f"sqlite:///{tmp_path / 'core.sqlite'}"
    # a session of its own: the test plays the terminal, signalling the whole process group
    with crmi_run_paused_at(
        "load:contact:before_commit", demo_project, core_url, tmp_path, own_session=True
    ) as (process, log):
        helpers = [
            int(entry.name) for entry in Path("/proc").iterdir()
            if entry.name.isdigit() and int(entry.name) != process.pid and _process_group(int(entry.name)) == process.pid
        ]  # fmt: skip
        assert helpers, "Dagster's log mirroring started no helper process: nothing to check"
        os.killpg(process.pid, signal.SIGINT)
        code = process.wait(timeout=120)
    output_text = log.read_text(encoding="utf-8")
    assert code == 1, output_text
    assert "interrupted (Ctrl-C, or the run was terminated)" in output_text
    assert "nothing of it remains in the core" in output_text
    assert "Traceback" not in output_text and "KeyboardInterrupt" not in output_text, output_text
    assert not [pid for pid in helpers if _process_group(pid) == process.pid], "a helper outlived the run"


def _process_group(pid: int) -> int | None:
    """The process group of ``pid`` from /proc (None once it is gone or reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else int(fields[2])
