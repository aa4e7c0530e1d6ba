"""Runs that end partial (assets materialized on their own) against the runs around them.

Which runs count as having linked a partial run's customers, recovery racing a run that ends or the sensor,
a re-execution of some steps over a run that was undone, and a Dagster instance that cannot be asked.
(First written by a reviewer as failing cases.)"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import crm_core.runs as runs
from crm_core.db import ensure_schema, make_engine, session_factory
from crm_core.merging import changed_in_run
from crm_core.models import Customer, LoadRun
from crm_core.runs import PARTIAL, finish_partial_run, recover_crashed_runs, rollback_run
from tests.test_run_failures import dead_pid
from tests.test_runs import content


def _core(tmp_path: Path) -> sa.Engine:
    engine = make_engine(f"sqlite:///{tmp_path / 'core.sqlite'}")
    ensure_schema(engine)
    return engine


def _run(engine: sa.Engine, key: str, project: str, mode: str, status: str, pid: int | None = None) -> int:
    import socket

    with engine.begin() as connection:
        return int(
            connection.execute(
                sa.insert(LoadRun)
                .values(run_key=key, project=project, mode=mode, status=status, stats={},
                        host=socket.gethostname(), pid=pid)
                .returning(LoadRun.id)
            ).scalar_one()
        )  # fmt: skip


def _customer(engine: sa.Engine, run_id: int, name: str) -> int:
    with engine.begin() as connection:
        return int(
            connection.execute(
                sa.insert(Customer)
                .values(name=name, created_run_id=run_id, updated_run_id=run_id)
                .returning(Customer.id)
            ).scalar_one()
        )


def test_a_full_run_of_another_project_does_not_link_a_partial_runs_customers(tmp_path: Path) -> None:
    """Project B (no customer entity: no linkage step) ends a full run succeeded after A's partial run.

    A's next run must still count the partial run's customers as changed: nothing linked them."""
    engine = _core(tmp_path)
    _run(engine, "a-first", "a", "full", "succeeded")
    partial = _run(engine, "a-ui", "a", "full", PARTIAL)
    loaded = _customer(engine, partial, "鑫达贸易")
    _run(engine, "b-full", "b", "full", "succeeded")  # an opportunities-only project: no dedup assets
    _run(engine, "a-next", "a", "full", "running")
    with session_factory(engine)() as session:
        assert changed_in_run(session, Customer, "a-next") == [loaded]
    engine.dispose()


def test_a_dedup_run_after_a_partial_run_linked_its_customers(tmp_path: Path) -> None:
    """`crmi dedup run` (its own mode, `dedup`) links every customer: a partial run that ended before it started
    is linked, and the next run's linkage need not count its customers as changed."""
    engine = _core(tmp_path)
    _run(engine, "a-first", "a", "full", "succeeded")
    partial = _run(engine, "a-ui", "a", "full", PARTIAL)
    _customer(engine, partial, "鑫达贸易")
    with engine.begin() as connection:  # it ended before the dedup run started
        connection.execute(sa.update(LoadRun).where(LoadRun.id == partial).values(finished_at=sa.func.now()))
    dedup = _run(engine, "dedup-1", "a", "dedup", "succeeded")
    with engine.begin() as connection:
        connection.execute(sa.update(LoadRun).where(LoadRun.id == dedup).values(started_at=sa.func.now()))
    _run(engine, "a-next", "a", "full", "running")
    with session_factory(engine)() as session:
        assert changed_in_run(session, Customer, "a-next") == []
    engine.dispose()


def test_a_partial_run_still_running_when_a_full_run_linked_stays_unlinked(tmp_path: Path) -> None:
    """P (a UI run) is still running when F's linkage asks what changed; F ends succeeded, P then partial.

    F's linkage never saw P's customers, so the next run must."""
    engine = _core(tmp_path)
    _run(engine, "first", "a", "full", "succeeded")
    p = _run(engine, "ui", "a", "full", "running")
    loaded = _customer(engine, p, "鑫达贸易")
    f = _run(engine, "full", "a", "full", "running")
    with session_factory(engine)() as session:
        assert changed_in_run(session, Customer, "full") == []  # F's linkage: P is not partial yet
    with engine.begin() as connection:
        connection.execute(sa.update(LoadRun).where(LoadRun.id == f).values(status="succeeded"))
    assert finish_partial_run(engine, "ui")  # the sensor, after F ended
    _run(engine, "next", "a", "full", "running")
    with session_factory(engine)() as session:
        assert changed_in_run(session, Customer, "next") == [loaded]
    engine.dispose()


def test_recovery_asks_dagster_only_about_runs_whose_process_is_gone(tmp_path: Path) -> None:
    """A run that succeeds while recovery looks is not undone: its process is found gone first, and only then
    is Dagster asked (its success is recorded before its process ends); a live run is not asked about."""
    import os

    engine = _core(tmp_path)
    _run(engine, "first", "a", "full", "succeeded")
    live = _run(engine, "live", "a", "full", "running", pid=os.getpid())
    ended = _run(engine, "ended", "a", "full", "running", pid=dead_pid())
    died = _run(engine, "died", "a", "full", "running", pid=dead_pid())
    for run_id in (live, ended, died):
        _customer(engine, run_id, f"鑫达贸易{run_id}")
    asked: list[list[str]] = []

    def succeeded(keys: Sequence[str]) -> set[str]:
        asked.append(sorted(keys))
        return {"ended"}

    recovery = recover_crashed_runs(engine, succeeded)
    with engine.connect() as connection:
        statuses = dict(connection.execute(sa.select(LoadRun.run_key, LoadRun.status)).all())
        customers = connection.scalar(sa.select(sa.func.count()).select_from(Customer))
    assert asked == [["died", "ended"]]
    assert (recovery.finished, recovery.undone) == (["ended"], ["died"])
    assert statuses == {"first": "succeeded", "live": "running", "ended": PARTIAL, "died": "failed"}
    assert customers == 2
    engine.dispose()


def test_recovery_holds_the_run_from_its_status_check_to_its_end_on_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recovery locks the run before it reads its status, so the sensor cannot mark it partial while recovery
    works out its dependents and then see it undone (SQLite renders no FOR UPDATE: a write takes the lock).
    A run marked partial before recovery locked it is left alone."""
    engine = _core(tmp_path)
    _run(engine, "first", "a", "full", "succeeded")
    ui = _run(engine, "ui", "a", "full", "running", pid=dead_pid())
    loaded = _customer(engine, ui, "鑫达贸易")
    original = runs.dependents
    sensor: list[str] = []

    def dependents_with_the_sensor_meanwhile(session: Session, run: LoadRun) -> set[int]:
        with sqlite3.connect(tmp_path / "core.sqlite", timeout=0) as other:  # the sensor, not waiting
            try:
                other.execute(
                    "UPDATE load_runs SET status = 'partial' WHERE run_key = 'ui' AND status = 'running'"
                )
                sensor.append("marked partial")
            except sqlite3.OperationalError as exc:
                sensor.append(str(exc))
        return original(session, run)

    monkeypatch.setattr(runs, "dependents", dependents_with_the_sensor_meanwhile)
    rolled = rollback_run(engine, "ui", status="failed", allow_running=True, only_if=("running",))
    with engine.connect() as connection:
        status = connection.scalar(sa.select(LoadRun.status).where(LoadRun.id == ui))
        kept = connection.scalar(sa.select(sa.func.count()).where(Customer.id == loaded))
    assert (sensor, rolled, status, kept) == (["database is locked"], ["ui"], "failed", 0)

    other = _run(engine, "other", "a", "full", "running", pid=dead_pid())
    _customer(engine, other, "鑫达贸易二")
    monkeypatch.setattr(runs, "dependents", original)
    assert finish_partial_run(engine, "other")
    assert rollback_run(engine, "other", status="failed", allow_running=True, only_if=("running",)) == []
    with engine.connect() as connection:
        assert connection.scalar(sa.select(LoadRun.status).where(LoadRun.id == other)) == PARTIAL
    engine.dispose()


def ui_subset_job(project: str, core: str) -> object:
    """What the UI's "Materialize" of core_contact and its upstream runs (module level: a re-execution
    rebuilds it)."""
    import dagster as dg

    from integration.jobs import build_definitions

    defs = build_definitions(project, core)
    job = dg.define_asset_job(
        "ui_subset", selection=dg.AssetSelection.assets("core_contact").upstream(),
        executor_def=dg.in_process_executor,
    )  # fmt: skip
    return dg.Definitions(
        assets=list(defs.assets or []), resources=defs.resources, jobs=[job]
    ).resolve_job_def("ui_subset")


def reconstructable_ui_subset_job(project: Path, core: str) -> Any:
    """The job for ``execute_job``; its arguments are part of Dagster's cache key (a plain ``reconstructable``
    would hand every test the job, and core, of the first)."""
    import dagster as dg

    return dg.build_reconstructable_job(
        __name__, "ui_subset_job", reconstructable_kwargs={"project": str(project), "core": core}
    )


def failed_run(
    job: Any, instance: Any, monkeypatch: pytest.MonkeyPatch, failpoint: str, *, worker_died: bool = False
) -> str:
    """Run ``job`` failing at ``failpoint``; return its run id. ``worker_died``: no step undoes it, its load run
    stays 'running' (as when the worker process dies, until the failure sensor comes round)."""
    import dagster as dg

    import integration.assets.factories as factories

    with monkeypatch.context() as patch:
        patch.setenv("CRMI_FAILPOINT", failpoint)
        if worker_died:
            patch.setattr(factories, "abort_run", lambda *_: False)
        with dg.execute_job(job, instance=instance, raise_on_error=False) as result:
            assert not result.success
            return str(result.run_id)


@contextmanager
def re_executed_from_failure(job: Any, instance: Any, run_id: str) -> Iterator[Any]:
    """Re-execute run ``run_id`` from failure (the UI button; the run-retry daemon's default outside the
    migration jobs) and yield its result."""
    import dagster as dg

    from integration.assets.resources import dispose_engines

    options = dg.ReexecutionOptions.from_failure(run_id, instance)
    with dg.execute_job(job, instance=instance, reexecution_options=options, raise_on_error=False) as result:
        dispose_engines()
        yield result


def test_re_executing_some_steps_of_an_undone_run_is_refused(
    demo_project: Path, sqlite_core_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A UI materialization fails at core_contact after core_customer committed: the run is undone. Dagster's
    re-execution from failure (the UI button, or the run-retry daemon's default for runs outside the
    migration jobs) would run core_contact alone, over customers that were undone: it is refused, and
    nothing of it stays."""
    import dagster as dg

    from crm_core.models import Contact

    job = reconstructable_ui_subset_job(demo_project, sqlite_core_url)
    engine = make_engine(sqlite_core_url)
    with dg.instance_for_test() as instance:
        first = failed_run(job, instance, monkeypatch, "load:contact:before_commit")
        before = content(engine)
        with re_executed_from_failure(job, instance, first) as again:
            failures = [e for e in again.all_events if e.is_step_failure]
            assert not again.success
            assert {e.step_key for e in failures} == {"core_contact"}
            message = failures[0].step_failure_data.error.message  # type: ignore[union-attr]
            assert f"re-executes only some steps of run {first}" in message, message
    with engine.connect() as connection:
        statuses = dict(connection.execute(sa.select(LoadRun.run_key, LoadRun.status)).all())
        contacts = connection.scalar(sa.select(sa.func.count()).select_from(Contact))
    assert statuses == {first: "failed", again.run_id: "failed"}
    assert contacts == 0 and content(engine) == before
    engine.dispose()


def test_re_executing_from_a_failed_first_load_goes_ahead(
    demo_project: Path, sqlite_core_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The usual retry: the run failed at its first core load (a lock, a network blip), so the steps a
    re-execution from failure skips only extracted and staged: their files are still there, nothing is missing."""
    import dagster as dg

    from crm_core.models import Contact

    job = reconstructable_ui_subset_job(demo_project, sqlite_core_url)
    with dg.instance_for_test() as instance:
        first = failed_run(job, instance, monkeypatch, "load:sales_rep:before_commit")
        with re_executed_from_failure(job, instance, first) as again:
            executed = {e.step_key for e in again.all_events if e.is_step_success}
            assert (
                again.success
                and "core_sales_rep" in executed
                and not any(s.startswith("raw_") for s in executed)
            )
    engine = make_engine(sqlite_core_url)
    with engine.connect() as connection:
        statuses = dict(connection.execute(sa.select(LoadRun.run_key, LoadRun.status)).all())
        customers = connection.scalar(sa.select(sa.func.count()).select_from(Customer))
        contacts = connection.scalar(sa.select(sa.func.count()).select_from(Contact))
    assert statuses == {first: "failed", again.run_id: "running"}  # partial once the sensor sees it
    assert customers and contacts
    engine.dispose()


def test_a_reconciliation_materialized_on_its_own_ends_partial(
    demo_project: Path, sqlite_core_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """core_customer and reconciliation_report from the UI: reconciled, but no linkage ran and other entities
    did not load, so the run is partial (never a skip basis, never taken for a linkage), not succeeded."""
    import dagster as dg

    from integration.assets.resources import dispose_engines
    from integration.jobs import build_definitions

    defs = build_definitions(demo_project, sqlite_core_url)
    selection = dg.AssetSelection.assets("core_customer").upstream() | dg.AssetSelection.assets(
        "reconciliation_report"
    )
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            list(defs.assets or []), selection=selection, resources=defs.resources, instance=instance
        )
    dispose_engines()
    assert result.success
    engine = make_engine(sqlite_core_url)
    with engine.connect() as connection:
        assert list(connection.scalars(sa.select(LoadRun.status))) == [PARTIAL]
    engine.dispose()


def test_recovery_settles_nothing_when_dagster_cannot_be_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crashed Dagster run may have succeeded: with the instance unreadable, `crmi runs recover` says why in
    one line and exits 1, and the run stays as it is (never undone on a guess)."""
    from typer.testing import CliRunner

    from integration.cli import app

    engine = _core(tmp_path)
    key = "5f0c4a9e-8a51-4f4e-9a57-0d6f1c2b7e11"
    run_id = _run(engine, key, "a", "full", "running", pid=dead_pid())
    _customer(engine, run_id, "鑫达贸易")
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        "run_storage:\n  module: no_such_module\n  class: Nowhere\n", encoding="utf-8"
    )
    monkeypatch.setenv("DAGSTER_HOME", str(home))

    result = CliRunner().invoke(app, ["runs", "recover", "--core-url", str(engine.url)])

    assert result.exit_code == 1, result.output
    [line] = [line for line in result.stderr.splitlines() if "could not ask the Dagster instance" in line]
    assert key in line and str(home) in line and "Traceback" not in result.output
    with engine.connect() as connection:
        assert connection.scalar(sa.select(LoadRun.status).where(LoadRun.id == run_id)) == "running"
        assert connection.scalar(sa.select(sa.func.count()).select_from(Customer)) == 1
    engine.dispose()
