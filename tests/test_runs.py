"""Runs, rollback and crash safety: a run lands whole or not at all, and can be undone exactly."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from crm_core.db import make_engine, upgrade
from crm_core.errors import RunError
from crm_core.models import Base, Customer, ExternalId, LoadRun, RowChange
from crm_core.runs import dependents, list_runs, rollback_run
from integration.assets.resources import dispose_engines
from integration.cli import app
from tests.conftest import PG_URL, crmi_run_paused_at, reset_postgres, server_or_skip
from tests.test_end_to_end import execute, run_job
from tests.test_run_stamps_migration import dangling_run_stamps

pytestmark = pytest.mark.slow
# What records runs rather than being changed by them; mapping fingerprints are keyed by the run that loaded
# (a rollback deletes them with the run's rows: tests/test_rerun_skip.py), so two runs loading the same
# content leave different fingerprint rows behind.
BOOKKEEPING = {"load_runs", "rejects", "row_changes", "mapping_fingerprints"}
VOLATILE = {
    "id",
    "created_at",
    "updated_at",
    "last_synced_at",
    "created_run_id",
    "updated_run_id",
    "load_run_id",
}


def content(engine: sa.Engine) -> dict[str, list[tuple[Any, ...]]]:
    """The core's business content with surrogate ids replaced by the records' crosswalk keys.

    Two cores that hold the same records compare equal even when their ids differ (PostgreSQL sequences
    never reuse the ids a rolled-back run consumed).
    """
    with engine.connect() as connection:
        keys: dict[tuple[str, int], str] = {}
        for entity, entity_id, system, key in connection.execute(
            sa.select(ExternalId.entity, ExternalId.entity_id, ExternalId.system, ExternalId.external_key)
        ):
            keys[(entity, entity_id)] = min(keys.get((entity, entity_id), "\uffff"), f"{system}:{key}")
        table_entity = {"customers": "customer", "contacts": "contact", "sales_reps": "sales_rep",
                        "opportunities": "opportunity", "sales_orders": "sales_order",
                        "sales_order_lines": "sales_order_line"}  # fmt: skip
        out: dict[str, list[tuple[Any, ...]]] = {}
        for table in Base.metadata.sorted_tables:
            if table.name in BOOKKEEPING:
                continue
            rows = []
            for row in connection.execute(sa.select(table)).mappings():
                values = []
                for column in table.columns:
                    value = row[column.name]
                    if column.name in VOLATILE and (column.name != "id" or table.name not in table_entity):
                        continue
                    if column.name == "id" or column.foreign_keys or column.name == "entity_id":
                        target = (
                            table.name if column.name == "id" else next(iter(column.foreign_keys)).column.table.name
                        ) if column.name != "entity_id" else None  # fmt: skip
                        entity = row["entity"] if target is None else table_entity.get(target)
                        value = keys.get((entity, value), value) if value is not None and entity else value
                    values.append((column.name, str(value)))
                rows.append(tuple(values))
            out[table.name] = sorted(rows)
        return out


def edit_sources(project: Path) -> None:
    """Change the ERP between runs: one renamed customer, one new customer, one changed order line."""
    with sqlite3.connect(project / "data" / "erp_u8.sqlite") as erp:
        code = erp.execute("SELECT cCusCode FROM Customer ORDER BY cCusCode LIMIT 1").fetchone()[0]
        erp.execute("UPDATE Customer SET cCusName = cCusName || '（华东）' WHERE cCusCode = ?", (code,))
        erp.execute(
            "INSERT INTO Customer (cCusCode, cCusName, cCusPhone) VALUES ('ZZ9001', '杭州新增测试科技有限公司', '0571-88886666')"
        )
        erp.execute(
            "UPDATE SO_SODetails SET iSum = iSum + 100 WHERE AutoID = (SELECT MIN(AutoID) FROM SO_SODetails)"
        )


def test_rollback_restores_the_core_exactly_and_a_re_run_lands_the_same(
    demo_project: Path, core_url: str
) -> None:
    first = run_job(demo_project, core_url)
    engine = make_engine(core_url)
    after_first = content(engine)
    edit_sources(demo_project)
    second = run_job(demo_project, core_url)
    after_second = content(engine)
    assert after_second != after_first
    with engine.connect() as connection:
        operations = set(connection.scalars(sa.select(RowChange.operation).where(
            RowChange.load_run_id == sa.select(LoadRun.id).where(LoadRun.run_key == second.run_id).scalar_subquery()
        )))  # fmt: skip
    assert operations == {"update"}  # what it changed; what it created carries its id instead
    with engine.connect() as connection:
        created = connection.scalar(sa.select(sa.func.count()).select_from(Customer).where(
            Customer.created_run_id == sa.select(LoadRun.id).where(LoadRun.run_key == second.run_id).scalar_subquery()
        ))  # fmt: skip
    assert created

    assert rollback_run(engine, second.run_id) == [second.run_id]
    assert content(engine) == after_first
    with engine.connect() as connection:
        statuses = dict(connection.execute(sa.select(LoadRun.run_key, LoadRun.status)).all())
    assert statuses == {first.run_id: "succeeded", second.run_id: "rolled_back"}
    with pytest.raises(RunError, match="rolled_back"):
        rollback_run(engine, second.run_id)

    run_job(demo_project, core_url)
    assert content(engine) == after_second
    assert dangling_run_stamps(engine) == {}  # no foreign key guards run stamps (revision 0013)
    engine.dispose()


def test_rollback_refuses_when_a_later_run_depends_on_it_unless_cascade(
    demo_project: Path, sqlite_core_url: str
) -> None:
    engine = make_engine(sqlite_core_url)
    upgrade(engine)
    empty = content(engine)
    first = run_job(demo_project, sqlite_core_url)
    edit_sources(demo_project)
    second = run_job(demo_project, sqlite_core_url)
    with engine.connect() as connection, sa.orm.Session(bind=connection) as session:
        run = session.scalar(sa.select(LoadRun).where(LoadRun.run_key == first.run_id))
        assert run is not None
        assert dependents(session, run) == {run.id + 1}

    result = CliRunner().invoke(app, ["rollback", first.run_id[:8], "--core-url", sqlite_core_url])
    assert result.exit_code == 1
    assert f"later run(s) depend on {first.run_id}: {second.run_id}" in result.output
    assert "--cascade" in result.output

    result = CliRunner().invoke(
        app, ["rollback", first.run_id, "--cascade", "--json", "--core-url", sqlite_core_url]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"rolled_back": [second.run_id, first.run_id]}
    assert content(engine) == empty
    listed = CliRunner().invoke(app, ["runs", "list", "--json", "--core-url", sqlite_core_url])
    assert listed.exit_code == 0, listed.output
    assert [json.loads(line)["status"] for line in listed.output.splitlines()] == [
        "rolled_back",
        "rolled_back",
    ]
    engine.dispose()


def test_a_step_failing_after_earlier_loads_committed_undoes_the_whole_run(
    demo_project: Path, core_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_job(demo_project, core_url)
    engine = make_engine(core_url)
    before = content(engine)
    edit_sources(demo_project)
    monkeypatch.setenv("CRMI_FAILPOINT", "load:opportunity:before_commit")
    result = execute(demo_project, core_url)
    assert not result.success
    assert content(engine) == before
    with engine.connect() as connection:
        statuses = connection.execute(sa.select(LoadRun.status).order_by(LoadRun.id)).scalars().all()
    assert statuses == ["succeeded", "failed"]
    monkeypatch.delenv("CRMI_FAILPOINT")
    run_job(demo_project, core_url)  # and it can simply be run again
    assert content(engine) != before
    assert dangling_run_stamps(engine) == {}
    engine.dispose()


def test_a_run_killed_mid_load_leaves_the_core_as_it_was(
    demo_project: Path, core_url: str, tmp_path: Path
) -> None:
    run_job(demo_project, core_url)
    engine = make_engine(core_url)
    before = content(engine)
    edit_sources(demo_project)
    with crmi_run_paused_at("load:contact:before_commit", demo_project, core_url, tmp_path):
        pass  # killed at the failpoint, inside the contact load
    # Customers and sales reps were committed, contacts were not: the run is crashed, half landed.
    crashed = [r for r in list_runs(engine) if r.status == "crashed"]
    assert len(crashed) == 1 and crashed[0].changes > 0
    assert content(engine) != before

    recovered = CliRunner().invoke(app, ["runs", "recover", "--core-url", core_url])
    assert recovered.exit_code == 0 and crashed[0].run_key in recovered.output
    assert content(engine) == before
    assert [r.status for r in list_runs(engine)] == ["failed", "succeeded"]
    run_job(demo_project, core_url)  # the next run starts from the old state and completes
    assert content(engine) != before
    engine.dispose()


@pytest.mark.parametrize("scratch", ["default", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_trial_run_loads_a_consistent_sample_into_a_scratch_core_and_touches_nothing_else(
    demo_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scratch: str
) -> None:
    real_core = tmp_path / "real-core.sqlite"
    monkeypatch.setenv("CRM_CORE_URL", f"sqlite:///{real_core}")
    monkeypatch.setenv("CRM_TRIAL_CORE_URL", "")  # restored after the test: the CLI sets it
    monkeypatch.chdir(tmp_path)
    options = []
    if scratch == "postgres":  # a consultant may point the trial at a scratch PostgreSQL database instead
        engine = server_or_skip(PG_URL, "PostgreSQL")
        reset_postgres(engine)
        engine.dispose()
        options = ["--core-url", PG_URL]
    command = ["run", "--trial", "--sample", "15", "--json", "--project", str(demo_project), *options]
    result = CliRunner().invoke(app, command)
    dispose_engines()
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["mode"] == "trial"
    assert (
        "/var/trial/" in payload["core"] if scratch == "default" else payload["core"].startswith("postgresql")
    )
    assert not real_core.exists()  # the real core was never opened
    lines = payload["lines"]
    assert lines and all(0 < line["rows_read"] <= 15 for line in lines)
    assert all(line["balanced"] for line in lines)
    scratch_core = make_engine(payload["core"] if scratch == "default" else PG_URL)
    with scratch_core.connect() as connection:
        reasons = connection.scalars(sa.select(sa.text("reason")).select_from(sa.text("rejects"))).all()
        mode = connection.scalar(sa.select(LoadRun.mode))
    # Children were sampled among rows whose parents are in the sample: no 'not found' references.
    assert mode == "trial" and not [r for r in reasons if "not found" in r]
    assert (tmp_path / "var" / "reports" / payload["run_id"] / "reconciliation.xlsx").exists()
    scratch_core.dispose()

    again = CliRunner().invoke(app, ["run", "--trial", "--delta", "--project", str(demo_project)])
    assert again.exit_code == 1 and "choose --delta or --trial" in again.output


def test_it_staff_can_roll_back_from_the_dagster_rollback_job(
    demo_project: Path, sqlite_core_url: str
) -> None:
    import dagster as dg

    from integration.jobs import ROLLBACK_JOB, build_definitions

    engine = make_engine(sqlite_core_url)
    upgrade(engine)
    empty = content(engine)
    first = run_job(demo_project, sqlite_core_url)
    job = build_definitions(demo_project, sqlite_core_url).resolve_job_def(ROLLBACK_JOB)
    config = {"ops": {"rollback_load_run": {"config": {"run_id": first.run_id[:8]}}}}
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(run_config=config, instance=instance)
    assert result.success
    assert content(engine) == empty
    with dg.instance_for_test() as instance:
        again = job.execute_in_process(run_config=config, instance=instance, raise_on_error=False)
    assert not again.success
    [failure] = [e for e in again.all_events if e.is_step_failure]
    assert "is rolled_back" in str(failure.step_failure_data.error.message)  # type: ignore[union-attr]
    engine.dispose()


def test_the_trial_job_in_the_ui_loads_into_a_scratch_core_not_the_real_one(
    demo_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from integration.jobs import TRIAL_JOB

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CRM_TRIAL_CORE_URL", raising=False)
    real = tmp_path / "real.sqlite"
    result = execute(demo_project, f"sqlite:///{real}", TRIAL_JOB, tags={"crmi/sample": "10"})
    dispose_engines()
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    scratch = make_engine(f"sqlite:///{tmp_path / 'var' / 'trial' / result.run_id / 'core.sqlite'}")
    with scratch.connect() as connection:
        mode, stats = connection.execute(sa.select(LoadRun.mode, LoadRun.stats)).one()
    assert mode == "trial" and all(b["rows_read"] <= 10 for batches in stats.values() for b in batches)
    scratch.dispose()
    if real.exists():  # the real core may have been opened (schema), but nothing was loaded into it
        engine = make_engine(f"sqlite:///{real}")
        with engine.connect() as connection:
            assert connection.scalar(sa.select(sa.func.count()).select_from(LoadRun)) == 0
        engine.dispose()


def test_no_command_but_run_makes_a_core_where_there_is_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run from the wrong folder, `crmi runs list` made an empty var/crm_core.sqlite there and listed no runs,
    as if the engagement had none; every command but `crmi run` now says where it looked and changes nothing."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CRM_CORE_URL", raising=False)
    elsewhere = f"sqlite:///{tmp_path / 'typo' / 'core.sqlite'}"
    for command in (["runs", "list"], ["runs", "recover"], ["rollback", "1"], ["dedup", "review"],
                    ["dedup", "merges"], ["runs", "list", "--core-url", elsewhere]):  # fmt: skip
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 1, (command, result.output)
        assert "no core database at" in result.stderr and "`crmi run` creates it" in result.stderr, command
    assert not (tmp_path / "var").exists() and not (tmp_path / "typo").exists()
