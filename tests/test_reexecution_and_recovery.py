"""Re-executions and retries over undone runs, runs that skip a merge, and rollback and recovery refusing.

A re-execution must not build on loads that were undone: not through a chain of refused re-executions, not
"from asset failure", not before the failure sensor has undone its parent. (Written by a reviewer as failing
cases of the first fixes.)"""

from __future__ import annotations

import os
import socket
import sqlite3
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from crm_core.db import ensure_schema, make_engine
from crm_core.errors import RunError
from crm_core.models import Contact, Customer, LoadRun, RowChange
from crm_core.runs import rollback_run
from tests.test_partial_runs import failed_run, re_executed_from_failure, reconstructable_ui_subset_job
from tests.test_run_failures import dead_pid


def _statuses_and_counts(engine: sa.Engine) -> tuple[dict[str, str], int, int]:
    with engine.connect() as connection:
        statuses = dict(connection.execute(sa.select(LoadRun.run_key, LoadRun.status)).all())
        customers = connection.scalar(sa.select(sa.func.count()).select_from(Customer))
        contacts = connection.scalar(sa.select(sa.func.count()).select_from(Contact))
    return statuses, int(customers or 0), int(contacts or 0)


def test_re_executing_from_failure_the_refused_re_execution_is_refused_too(
    demo_project: Path, sqlite_core_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """P0 fails at core_contact (undone); P1, from failure of P0, is refused. P2, from failure of P1, runs the
    same core_contact alone: the steps of every undone ancestor count, so it is refused too."""
    import dagster as dg

    job = reconstructable_ui_subset_job(demo_project, sqlite_core_url)
    engine = make_engine(sqlite_core_url)
    with dg.instance_for_test() as instance:
        first = failed_run(job, instance, monkeypatch, "load:contact:before_commit")
        with re_executed_from_failure(job, instance, first) as again:
            assert not again.success  # refused
        with re_executed_from_failure(job, instance, again.run_id) as third:
            succeeded = third.success
    statuses, customers, contacts = _statuses_and_counts(engine)
    engine.dispose()
    assert not succeeded and contacts == 0, (statuses, customers, contacts)


def test_re_executing_from_asset_failure_over_an_undone_run_is_refused(
    demo_project: Path, sqlite_core_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dagster's "from asset failure" re-execution (UI, or dagster/retry_strategy: FROM_ASSET_FAILURE) subsets
    the job by asset_selection and leaves step_keys_to_execute None (create_reexecuted_run): the steps it runs
    are read from its execution plan, and core_contact over undone customers is refused."""
    import dagster as dg
    from dagster._core.execution.api import execute_run

    from integration.assets.resources import dispose_engines

    job = reconstructable_ui_subset_job(demo_project, sqlite_core_url)
    engine = make_engine(sqlite_core_url)
    with dg.instance_for_test() as instance:
        first = failed_run(job, instance, monkeypatch, "load:contact:before_commit")
        selection = frozenset({dg.AssetKey("core_contact")})
        subset = job.get_subset(asset_selection=selection)
        run = instance.create_run_for_job(
            job_def=subset.get_definition(), parent_run_id=first, root_run_id=first, asset_selection=selection,
            tags={"dagster/parent_run_id": first, "dagster/root_run_id": first},
        )  # fmt: skip
        # as create_reexecuted_run(strategy=FROM_ASSET_FAILURE) stores it: no step keys, an asset selection
        instance.delete_run(run.run_id)
        try:
            run = run._replace(step_keys_to_execute=None)
        except AttributeError:
            from dagster._record import copy

            run = copy(run, step_keys_to_execute=None)
        instance.add_run(run)
        result = execute_run(subset, run, instance)
        dispose_engines()
    statuses, customers, contacts = _statuses_and_counts(engine)
    engine.dispose()
    assert not result.success and contacts == 0, (statuses, customers, contacts)


def test_a_run_that_skips_contact_deduplication_is_not_a_whole_migration(
    demo_project: Path, sqlite_core_url: str
) -> None:
    """Everything up to the reconciliation but golden_contacts (and the read-only review queue) from the UI
    ends partial: were it 'succeeded', no later run would deduplicate its contacts, and the next `crmi run`
    would find nothing changed and report this run."""
    import dagster as dg

    from integration.assets.resources import dispose_engines
    from integration.jobs import build_definitions
    from integration.pipeline import Migration
    from integration.rerun import nothing_changed

    defs = build_definitions(demo_project, sqlite_core_url)
    selection = dg.AssetSelection.assets("reconciliation_report").upstream() - dg.AssetSelection.assets(
        "golden_contacts", "customer_review_queue"
    )
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            list(defs.assets or []), selection=selection, resources=defs.resources, instance=instance
        )
        executed = {e.step_key for e in result.all_events if e.is_step_success}
    dispose_engines()
    assert result.success and "golden_contacts" not in executed
    engine = make_engine(sqlite_core_url)
    statuses = list(_statuses_and_counts(engine)[0].values())
    skipped = nothing_changed(engine, Migration.load(str(demo_project)))
    engine.dispose()
    assert statuses == ["partial"] and skipped is None, (statuses, skipped)


def _sqlite_core(tmp_path: Path) -> sa.Engine:
    engine = make_engine(f"sqlite:///{tmp_path / 'core.sqlite'}")
    ensure_schema(engine)
    return engine


def test_crmi_rollback_of_a_run_in_progress_refuses_at_once_on_sqlite(tmp_path: Path) -> None:
    """`crmi rollback` of a run still loading (its process alive, holding SQLite's write lock) says at once
    "still in progress", before it takes the run's lock (which would wait busy_timeout, then fail)."""
    engine = _sqlite_core(tmp_path)
    with engine.begin() as connection:
        connection.execute(sa.insert(LoadRun).values(
            run_key="live", project="a", mode="full", status="running", stats={},
            host=socket.gethostname(), pid=os.getpid(),
        ))  # fmt: skip
    loading = sqlite3.connect(tmp_path / "core.sqlite", timeout=0, isolation_level=None)
    loading.execute("BEGIN IMMEDIATE")  # the live run's load transaction
    started = time.monotonic()
    try:
        with pytest.raises(RunError, match="still in progress"):
            rollback_run(engine, "live")
    finally:
        loading.rollback()
        loading.close()
        engine.dispose()
    assert time.monotonic() - started < 5


def test_crmi_run_does_not_go_on_over_a_crashed_run_it_cannot_undo(tmp_path: Path) -> None:
    """A crashed run X a later run depends on cannot be undone (RunError): `crmi run` stops with that error
    rather than loading on top of X's fragment; only "Dagster cannot be asked" is a warning."""
    from integration.cli import _recover_runs

    engine = _sqlite_core(tmp_path)
    host = socket.gethostname()
    with engine.begin() as connection:
        crashed = connection.execute(sa.insert(LoadRun).values(
            run_key="x-crashed", project="a", mode="full", status="running", stats={}, host=host, pid=dead_pid(),
        ).returning(LoadRun.id)).scalar_one()  # fmt: skip
        customer = connection.execute(
            sa.insert(Customer).values(name="鑫达贸易", created_run_id=crashed, updated_run_id=crashed)
            .returning(Customer.id)
        ).scalar_one()  # fmt: skip
        later = connection.execute(sa.insert(LoadRun).values(
            run_key="y-later", project="a", mode="full", status="succeeded", stats={}, host=host,
        ).returning(LoadRun.id)).scalar_one()  # fmt: skip
        connection.execute(sa.insert(RowChange).values(
            load_run_id=later, table_name="customers", row_key=f'{{"id": {customer}}}', operation="update",
            before={"name": "鑫达贸易"},
        ))  # fmt: skip
    try:
        with pytest.raises(RunError, match="depend"):
            _recover_runs(engine)
    finally:
        engine.dispose()


def test_a_retry_launched_before_the_failure_sensor_undid_its_parent_is_not_built_on_it(
    demo_project: Path, sqlite_core_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A UI run's worker dies in core_contact after core_customer committed: no step undoes it, its load run
    stays 'running' until undo_failed_load_runs (every 15 s) sees the failure. The run-retry daemon (every 5 s,
    FROM_FAILURE for runs outside the migration jobs) usually launches the retry first: the retry undoes the
    failed parent itself, then refuses to load contacts over the customers that removed."""
    import dagster as dg

    from crm_core.runs import abort_run

    job = reconstructable_ui_subset_job(demo_project, sqlite_core_url)
    engine = make_engine(sqlite_core_url)
    with dg.instance_for_test() as instance:
        first = failed_run(job, instance, monkeypatch, "load:contact:before_commit", worker_died=True)
        assert _statuses_and_counts(engine)[0] == {first: "running"}
        with re_executed_from_failure(job, instance, first) as again:  # the daemon's retry
            retried = again.success
    try:
        abort_run(engine, first)  # the failure sensor, 15 s later
        sensor = "undone"
    except RunError as exc:
        sensor = str(exc)
    statuses, customers, contacts = _statuses_and_counts(engine)
    engine.dispose()
    assert statuses[first] != "running" and not (retried and sensor != "undone"), (
        statuses, customers, contacts, retried, sensor,
    )  # fmt: skip


def test_a_retry_whose_parent_cannot_be_undone_fails_with_one_readable_line(
    demo_project: Path, sqlite_core_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A UI run's worker dies after core_customer committed (its load run stays 'running'); a steward edits one
    of its customers before the retry starts. The retry's first step undoes the failed parent itself
    (_undone_parent), which raises 'later run(s) depend on'. That must leave the step failed the way every
    other step failure is (a dg.Failure with our one line, its own load run undone by the step), not as a raw
    RunError escaping _load_run_step before its try."""
    import dagster as dg

    job = reconstructable_ui_subset_job(demo_project, sqlite_core_url)
    engine = make_engine(sqlite_core_url)
    with dg.instance_for_test() as instance:
        first = failed_run(job, instance, monkeypatch, "load:contact:before_commit", worker_died=True)
        with engine.begin() as connection:  # a steward's edit of one of its customers, in between
            customer = connection.execute(sa.select(Customer.id, Customer.name).limit(1)).one()
            edit = connection.execute(
                sa.insert(LoadRun)
                .values(run_key="edit-1", project="demo", mode="edit", status="succeeded", stats={})
                .returning(LoadRun.id)
            ).scalar_one()
            connection.execute(sa.insert(RowChange).values(
                load_run_id=edit, table_name="customers", row_key=f'{{"id": {customer.id}}}',
                operation="update", before={"name": customer.name},
            ))  # fmt: skip
        with re_executed_from_failure(job, instance, first) as again:  # the daemon's retry
            failures = [e for e in again.all_events if e.is_step_failure]
            error = failures[0].step_failure_data.error  # type: ignore[union-attr]
            user = failures[0].step_failure_data.user_failure_data  # type: ignore[union-attr]
    with engine.connect() as connection:
        statuses = dict(connection.execute(sa.select(LoadRun.run_key, LoadRun.status)).all())
    engine.dispose()
    assert not again.success
    # every other failure of a step is a dg.Failure carrying our line; its own load run is undone by the step
    assert user is not None, (error.cls_name if error else None, error.message if error else None)
    assert "depend" in (user.description or "")
    assert statuses[again.run_id] == "failed", statuses


def test_rollback_and_recovery_refuse_while_a_migration_launched_from_dagster_is_between_two_steps(
    tmp_path: Path,
) -> None:
    """A Dagster migration holds the core's lock only during each step; between two, an operator's `crmi
    rollback` of an earlier run went through under it. Now `crmi rollback`, `crmi runs recover` and `crmi dedup
    run` refuse while a run marked running has a live process on this host, naming it, and change nothing;
    once it has ended, the rollback goes through and says the target keeps what a rolled-back sync sent."""
    import subprocess
    import sys

    from typer.testing import CliRunner

    from integration.cli import app

    engine = _sqlite_core(tmp_path)
    core = f"sqlite:///{tmp_path / 'core.sqlite'}"
    with engine.begin() as connection:
        connection.execute(sa.insert(LoadRun).values(
            run_key="sync-u8-outbound-20261201T015000-abc123", project="sync", mode="sync", status="succeeded",
            stats={}, host=socket.gethostname(), pid=None,
        ))  # fmt: skip
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # the run's step process
    try:
        with engine.begin() as connection:
            connection.execute(sa.insert(LoadRun).values(
                run_key="dagster-live", project="a", mode="full", status="running", stats={},
                host=socket.gethostname(), pid=worker.pid,
            ))  # fmt: skip
        runner = CliRunner()
        for command in (["rollback", "sync-u8-outbound-20261201T015000-abc123"], ["runs", "recover"]):
            refused = runner.invoke(app, [*command, "--core-url", core])
            assert refused.exit_code == 1, refused.output
            assert (
                f"run dagster-live (full) is loading into this core (process {worker.pid}" in refused.output
            )
            assert f"`crmi {command[0]}" in refused.output
        with engine.connect() as connection:
            assert (
                connection.scalar(sa.select(LoadRun.status).where(LoadRun.run_key.like("sync-%")))
                == "succeeded"
            )
    finally:
        worker.kill()
        worker.wait()
    with engine.begin() as connection:
        connection.execute(
            sa.update(LoadRun).where(LoadRun.run_key == "dagster-live").values(status="succeeded")
        )
    done = CliRunner().invoke(
        app, ["rollback", "sync-u8-outbound-20261201T015000-abc123", "--core-url", core]
    )
    engine.dispose()
    assert done.exit_code == 0, done.output
    assert "u8 keep(s) what the rolled-back sync(s) sent them" in " ".join(done.output.split())


def test_recovering_a_killed_crmi_run_also_ends_its_dagster_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`kill -9` of `crmi run` left its Dagster run STARTED for ever (no run worker or monitor watches a run
    executed in the CLI's own process), and the UI's queue waited behind it. `crmi runs recover` undoes the load
    run and marks that Dagster run failed; a run the daemon launched (no crmi run tag) is left to Dagster."""
    import dagster as dg
    from typer.testing import CliRunner

    from integration.cli import LAUNCHED_BY_CLI, LAUNCHED_BY_TAG, app

    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n", encoding="utf-8")
    monkeypatch.setenv("DAGSTER_HOME", str(home))

    @dg.op
    def noop() -> None:
        return None

    @dg.job
    def migration() -> None:
        noop()

    engine = _sqlite_core(tmp_path)
    started: dict[str, str] = {}
    with dg.DagsterInstance.get() as instance:
        for name, tags in (("cli", {LAUNCHED_BY_TAG: LAUNCHED_BY_CLI}), ("daemon", {})):
            run = instance.create_run_for_job(migration, tags=tags)
            instance.handle_new_event(dg.EventLogEntry(
                error_info=None, level="INFO", user_message="", run_id=run.run_id, timestamp=time.time(),
                dagster_event=dg.DagsterEvent(dg.DagsterEventType.RUN_START.value, job_name="migration"),
            ))  # fmt: skip
            started[name] = run.run_id
            assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED  # type: ignore[union-attr]
    with engine.begin() as connection:
        for run_id in started.values():
            connection.execute(sa.insert(LoadRun).values(
                run_key=run_id, project="a", mode="full", status="running", stats={},
                host=socket.gethostname(), pid=dead_pid(),
            ))  # fmt: skip
    recovered = CliRunner().invoke(
        app, ["runs", "recover", "--core-url", f"sqlite:///{tmp_path / 'core.sqlite'}"]
    )
    engine.dispose()
    assert recovered.exit_code == 0, recovered.output
    assert f"Dagster run {started['cli']} marked failed" in recovered.output
    with dg.DagsterInstance.get() as instance:
        status = {name: instance.get_run_by_id(run_id).status for name, run_id in started.items()}  # type: ignore[union-attr]
    assert status == {"cli": dg.DagsterRunStatus.FAILURE, "daemon": dg.DagsterRunStatus.STARTED}
