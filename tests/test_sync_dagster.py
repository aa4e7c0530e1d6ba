"""Dagster wiring of the ERP sync: jobs apart from the migration, schedules, the outbox sensor, checks."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa

from crm_core.db import make_engine, session_factory
from crm_core.edits import create_record, edit_record
from crm_core.models import Customer, LoadRun, SyncConflict, SyncOutbox
from crm_core.watermarks import CursorState, save_watermark
from integration.assets.resources import dispose_engines
from integration.assets.sync import METRICS, SYNC_GROUP, OutboxCursor
from integration.failures import step_failures
from integration.jobs import DELTA_JOB, MIGRATION_JOB, TRIAL_JOB, build_definitions
from integration.pipeline import (
    Migration,
    core_engine,
    extract,
    finish_run,
    load,
    reconcile,
    stage,
    start_run,
)
from integration.sync.outbox import CAPTURE_STREAM, retry_dead, watermark_source
from tests.conftest import DEMO
from tests.servers.u8_openapi import APP_KEY, APP_SECRET, FROM_ACCOUNT, TO_ACCOUNT, serve

SECRET = "Sync-s3cret-9f2c"  # exported as U8_APP_SECRET: must never show in Dagster events


@pytest.fixture(scope="module")
def migrated(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> Path:
    """The demo project with a core after one committed migration run (loaded without Dagster, once)."""
    root = tmp_path_factory.mktemp("sync_dagster")
    project = root / "demo"
    shutil.copytree(DEMO, project, ignore=shutil.ignore_patterns("data", "__pycache__"))
    shutil.copytree(demo_data, project / "data")
    url = f"sqlite:///{root / 'core.sqlite'}"
    engine = core_engine(url)
    migration = Migration.load(str(project))
    run_key = "migration-" + uuid.uuid4().hex[:8]
    start_run(engine, run_key, migration.project.name)
    for entity in migration.entities:
        raw = {migration.raw_asset(m): extract(migration, m) for m in migration.mappings_for(entity)}
        load(migration, engine, run_key, stage(migration, entity, raw))
    finish_run(engine, run_key, reconcile(engine, run_key))
    engine.dispose()
    return root


@pytest.fixture
def env(migrated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """(project, core URL): this test's own copy of the migrated core."""
    monkeypatch.setenv("U8_APP_SECRET", SECRET)
    core = tmp_path / "core.sqlite"
    shutil.copyfile(migrated / "core.sqlite", core)
    yield migrated / "demo", f"sqlite:///{core}"
    dispose_engines()


def event_text(result: Any) -> str:
    """Every event of a run as text (messages, metadata, check results)."""
    return "\n".join(repr(e) for e in result.all_events)


def add_outbox(engine: sa.Engine, status: str, **values: Any) -> int:
    """Insert one outbox row of target u8 and return its id."""
    now = dt.datetime.now(dt.UTC)
    row = {
        "target": "u8", "entity": "customer", "entity_id": 1, "operation": "customer/edit",
        "payload": {"name": "x"}, "payload_hash": "h", "core_values": {},
        "idempotency_key": f"u8:{uuid.uuid4().hex}", "trade_id": None, "status": status, "attempts": 0,
        "next_attempt_at": now, "last_error": None, "external_key": None, "load_run_id": None, "created_at": now,
        **values,
    }  # fmt: skip
    with engine.begin() as connection:
        return int(
            connection.execute(sa.insert(SyncOutbox).values(**row).returning(SyncOutbox.id)).scalar_one()
        )


def add_run(engine: sa.Engine, run_key: str, status: str, finished: dt.datetime | None = None) -> int:
    """Insert a load run (a sync run of u8 when its key starts with sync-u8-) and return its id."""
    with engine.begin() as connection:
        values: dict[str, Any] = {"run_key": run_key, "project": "demo", "mode": "sync" if run_key.startswith("sync-") else "edit",
                  "status": status, "stats": {}, "finished_at": finished}  # fmt: skip
        return int(connection.execute(sa.insert(LoadRun).values(**values).returning(LoadRun.id)).scalar_one())


def test_the_migration_jobs_leave_the_sync_out_and_each_target_gets_jobs_schedules_a_sensor(
    env: tuple[Path, str],
) -> None:
    project, url = env
    defs = build_definitions(project, url)
    for name in (MIGRATION_JOB, DELTA_JOB, TRIAL_JOB):  # `crmi run` resolves one of these
        job = defs.resolve_job_def(name)
        assert not [n for n in job.graph.node_dict if n.startswith("sync_")], name
        keys = job.asset_layer.asset_graph.get_all_asset_keys()
        assert "core_customer" in {k.to_user_string() for k in keys}
        assert not {k.to_user_string() for k in keys} & {"sync_u8_inbound", "sync_u8_outbound"}
        assert not [c for c in job.asset_layer.asset_graph.asset_check_keys if "sync" in str(c.asset_key)]

    inbound, outbound = (
        defs.resolve_job_def("sync_u8_inbound_job"),
        defs.resolve_job_def("sync_u8_outbound_job"),
    )
    assert set(inbound.graph.node_dict) == {"sync_u8_inbound", "sync_u8_inbound_check_inbound_freshness"}
    assert set(outbound.graph.node_dict) == {
        "sync_u8_outbound",
        "sync_u8_outbound_check_outbox_backlog_age",
        "sync_u8_outbound_check_dead_letters",
        "sync_u8_outbound_check_conflicts_open",
    }
    assert inbound.tags == {"crmi/sync-target": "u8", "crmi/sync-direction": "inbound"}
    assert outbound.tags == {"crmi/sync-target": "u8", "crmi/sync-direction": "outbound"}
    assert inbound.executor_def.name == outbound.executor_def.name == "in_process"  # SQLite core
    checks = defs.resolve_job_def("sync_u8_checks_job")
    assert (
        len(checks.graph.node_dict) == 4 and "crmi/sync-target" not in checks.tags
    )  # reads only: never queued

    graph = defs.resolve_asset_graph()
    for direction in ("inbound", "outbound"):
        node = graph.get(dg.AssetKey(f"sync_u8_{direction}"))
        assert node.group_name == SYNC_GROUP
        assert node.description and "\n" not in node.description and "u8" in node.description

    schedules = {s.name: s for s in defs.schedules or [] if isinstance(s, dg.ScheduleDefinition)}
    assert {n: (s.cron_schedule, s.execution_timezone) for n, s in schedules.items()} == {
        "sync_u8_inbound_schedule": ("*/10 * * * *", "Asia/Shanghai"),
        "sync_u8_outbound_schedule": ("*/5 * * * *", "Asia/Shanghai"),
        "sync_u8_checks_schedule": ("*/15 * * * *", "Asia/Shanghai"),
    }
    assert schedules["sync_u8_inbound_schedule"].job_name == "sync_u8_inbound_job"
    # Nothing writes to the ERP until someone turns it on after go-live.
    assert {s.default_status for s in schedules.values()} == {dg.DefaultScheduleStatus.STOPPED}
    sensor = defs.resolve_sensor_def("sync_u8_outbox")
    assert sensor.job_name == "sync_u8_outbound_job"
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED
    assert SECRET not in repr(defs.resolve_job_def("sync_u8_outbound_job").tags)


def test_the_jobs_that_write_the_core_carry_its_address_for_the_run_queue(
    tmp_path: Path, demo_project: Path
) -> None:
    """One writer per core: `crmi/core` on migration, delta and rollback (no password); none on a trial."""
    url = "postgresql+psycopg://crm:s3cret-pw@db.example:5432/core?password=s3cret-pw"
    defs = build_definitions(demo_project, url)
    for name in (MIGRATION_JOB, DELTA_JOB, "rollback"):
        tag = defs.resolve_job_def(name).tags.get("crmi/core")
        assert tag == "postgresql+psycopg://crm@db.example:5432/core", name
    assert "crmi/core" not in defs.resolve_job_def(TRIAL_JOB).tags
    # Another password for the same database: the same identity, so the queue's limit still holds.
    other = build_definitions(demo_project, url.replace("s3cret-pw", "rotated"))
    assert other.resolve_job_def(MIGRATION_JOB).tags["crmi/core"] == tag


def test_a_retried_migration_runs_every_step_again(demo_project: Path, tmp_path: Path) -> None:
    """The run-retry daemon re-executes a failed run from its failed step unless the run says otherwise. A
    migration's failed attempt has been undone, so its retry must run every step: re-running only the failed
    one (a worker that died while reconciling) would reconcile a load run with nothing in it."""
    from dagster._core.execution.plan.resume_retry import ReexecutionStrategy
    from dagster._core.storage.dagster_run import DagsterRun
    from dagster._daemon.auto_run_reexecution.auto_run_reexecution import get_reexecution_strategy

    defs = build_definitions(demo_project, f"sqlite:///{tmp_path / 'core.sqlite'}")
    with dg.instance_for_test() as instance:
        for name in (MIGRATION_JOB, DELTA_JOB, TRIAL_JOB):
            run = DagsterRun(
                job_name=name, run_id=str(uuid.uuid4()), tags=dict(defs.resolve_job_def(name).tags)
            )
            assert get_reexecution_strategy(run, instance) == ReexecutionStrategy.ALL_STEPS, name


def test_sync_assets_name_their_owner_and_target_and_inbound_has_a_freshness_policy(
    demo_project: Path,
) -> None:
    """What the UI shows at a glance: owner, tags to filter by, and when the inbound side is overdue."""
    defs = build_definitions(demo_project, "sqlite:///unused.sqlite")
    graph = defs.resolve_asset_graph()
    for direction in ("inbound", "outbound"):
        spec = graph.get(dg.AssetKey(f"sync_u8_{direction}"))
        assert spec.owners == ["team:crm-integration"]
        assert spec.tags["crmi/sync-target"] == "u8" and spec.tags["crmi/sync-direction"] == direction
    inbound = graph.get(dg.AssetKey("sync_u8_inbound")).freshness_policy
    assert isinstance(inbound, dg.FreshnessPolicy)
    assert graph.get(dg.AssetKey("sync_u8_outbound")).freshness_policy is None
    core = graph.get(dg.AssetKey("core_customer"))
    assert core.freshness_policy is not None and core.tags["crmi/layer"] == "core" and core.owners


def test_the_inbound_job_counts_every_row_as_metadata(env: tuple[Path, str]) -> None:
    project, url = env
    job = build_definitions(project, url).resolve_job_def("sync_u8_inbound_job")
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(instance=instance, raise_on_error=True)
        again = job.execute_in_process(instance=instance, raise_on_error=True)
    [first] = result.asset_materializations_for_node("sync_u8_inbound")
    counts = {k: int(v.value or 0) for k, v in first.metadata.items() if isinstance(v, dg.IntMetadataValue)}
    assert set(METRICS) <= set(counts)
    # Right after the migration U8 holds what the core holds: every row read, none changed.
    assert counts["received"] > 0 and counts["unchanged"] == counts["received"]
    assert counts["applied"] == counts["rejected"] == counts["sent"] == 0
    assert str(first.metadata["load_run"].value).startswith("sync-u8-inbound-")
    duration = first.metadata["duration_seconds"]
    assert isinstance(duration, dg.FloatMetadataValue) and (duration.value or 0) > 0
    [fresh] = result.get_asset_check_evaluations()
    assert fresh.check_name == "check_inbound_freshness" and fresh.passed
    [second] = again.asset_materializations_for_node("sync_u8_inbound")
    assert second.metadata["received"].value == 0  # the ufts cursor moved on
    assert SECRET not in event_text(result) and "8766" not in event_text(result)


def test_a_sync_that_cannot_start_fails_with_one_line_and_leaves_no_run(env: tuple[Path, str]) -> None:
    project, url = env
    engine = make_engine(url)
    add_run(engine, "sync-u8-outbound-elsewhere", "running")  # another sync of u8 is running
    job = build_definitions(project, url).resolve_job_def("sync_u8_inbound_job")
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(instance=instance, raise_on_error=False)
    assert not result.success
    [failure] = step_failures(result.all_events)
    assert failure.step == "sync_u8_inbound"
    assert failure.cause.startswith("a sync of 'u8' is already running (run sync-u8-outbound-elsewhere")
    with engine.connect() as connection:
        keys = connection.scalars(sa.select(LoadRun.run_key).where(LoadRun.run_key.like("sync-u8-inbound-%")))
        assert list(keys) == []  # refused before it started
    engine.dispose()


def evaluate(defs: dg.Definitions, instance: dg.DagsterInstance, cursor: str | None) -> Any:
    """Evaluate the outbox sensor of u8 once; return its tick data (run requests, cursor, skip message)."""
    context = dg.build_sensor_context(instance=instance, cursor=cursor)
    return defs.resolve_sensor_def("sync_u8_outbox").evaluate_tick(context)


def test_the_outbox_sensor_asks_once_per_change_and_never_for_its_own_runs(env: tuple[Path, str]) -> None:
    project, url = env
    defs = build_definitions(project, url)
    engine = make_engine(url)
    with dg.instance_for_test() as instance:
        # No outbound sync yet: one run marks where capture starts (start: now, the default).
        start = evaluate(defs, instance, None)
        [request] = start.run_requests
        assert "no outbound sync yet" in request.tags["crmi/sync-trigger"]
        quiet = evaluate(defs, instance, start.cursor)
        assert quiet.run_requests == [] and "no committed change" in (quiet.skip_message or "")

        # A salesperson edits a customer: one request; the same cursor state asks with the same run key.
        customer = sa.select(Customer.id).order_by(Customer.id).limit(1)
        with engine.connect() as connection:
            customer_id = int(connection.scalar(customer) or 0)
        edit_record(engine, "customer", customer_id, {"phone": "+8675586009999"})
        edited = evaluate(defs, instance, quiet.cursor)
        [request] = edited.run_requests
        assert [r.run_key for r in evaluate(defs, instance, quiet.cursor).run_requests] == [request.run_key]
        assert evaluate(defs, instance, edited.cursor).run_requests == []

        # Sync runs of u8 itself never ask (else every outbound run would start the next one).
        add_run(engine, "sync-u8-outbound-x", "succeeded", dt.datetime.now(dt.UTC))
        own = evaluate(defs, instance, edited.cursor)
        assert (
            own.run_requests == []
            and OutboxCursor.parse(own.cursor).run > OutboxCursor.parse(edited.cursor).run
        )

        # A run still running holds the sensor before it; its changes count once it commits.
        running = add_run(engine, "edit-running", "running")
        waiting = evaluate(defs, instance, own.cursor)
        assert waiting.run_requests == [] and f"load run {running} is still running" in (
            waiting.skip_message or ""
        )
        assert OutboxCursor.parse(waiting.cursor).run == running - 1
        with engine.begin() as connection:
            connection.execute(sa.update(LoadRun).where(LoadRun.id == running).values(status="succeeded"))
        assert len(evaluate(defs, instance, waiting.cursor).run_requests) == 1

        # What an outbound run already captured (its watermark) does not ask again, whatever the cursor.
        with session_factory(engine)() as session, session.begin():
            newest = session.scalar(sa.select(sa.func.max(LoadRun.id)))
            save_watermark(
                session, watermark_source("u8"), CAPTURE_STREAM, CursorState(newest, frozenset()), newest
            )
        captured = evaluate(defs, instance, None)
        assert captured.run_requests == []

        # A pending outbox row asks; a retried one asks again when it becomes due.
        row = add_outbox(engine, "pending", next_attempt_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))
        pending = evaluate(defs, instance, captured.cursor)
        [request] = pending.run_requests
        assert request.tags["crmi/sync-trigger"] == "1 new outbox row(s) pending"
        assert evaluate(defs, instance, pending.cursor).run_requests == []
        later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=10)
        with engine.begin() as connection:  # as a delivery that failed in transport leaves it
            connection.execute(
                sa.update(SyncOutbox).where(SyncOutbox.id == row).values(next_attempt_at=later)
            )
        assert evaluate(defs, instance, pending.cursor).run_requests == []  # not due yet
        with engine.begin() as connection:  # ... and time passes
            due = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
            connection.execute(sa.update(SyncOutbox).where(SyncOutbox.id == row).values(next_attempt_at=due))
        retried = evaluate(defs, instance, pending.cursor)
        [request] = retried.run_requests
        assert request.tags["crmi/sync-trigger"] == "1 outbox row(s) due for a retry"
        # A dead letter resent with `crmi sync retry` asks too.
        with session_factory(engine)() as session, session.begin():
            session.execute(sa.update(SyncOutbox).where(SyncOutbox.id == row).values(status="dead"))
        assert evaluate(defs, instance, retried.cursor).run_requests == []
        with session_factory(engine)() as session, session.begin():
            assert retry_dead(session, "u8") == 1
        assert len(evaluate(defs, instance, retried.cursor).run_requests) == 1

        # While a sync of u8 is queued or running the sensor waits, cursor unchanged.
        instance.add_run(
            dg.DagsterRun(
                job_name="sync_u8_inbound_job",
                run_id=str(uuid.uuid4()),
                status=dg.DagsterRunStatus.STARTED,
                tags={"crmi/sync-target": "u8"},
            )
        )
        busy = evaluate(defs, instance, pending.cursor)
        assert busy.run_requests == [] and "queued or running" in (busy.skip_message or "")
        assert busy.cursor in (None, pending.cursor)
    engine.dispose()


def check_results(defs: dg.Definitions) -> dict[str, Any]:
    """Run the checks job of u8 in process; return the evaluations by check name."""
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def("sync_u8_checks_job").execute_in_process(instance=instance)
    assert SECRET not in event_text(result)
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def test_the_checks_report_backlog_dead_letters_conflicts_and_freshness(env: tuple[Path, str]) -> None:
    project, url = env
    defs = build_definitions(project, url)
    engine = make_engine(url)
    clean = check_results(defs)
    assert {n for n, e in clean.items() if e.passed} == {
        "check_outbox_backlog_age", "check_dead_letters", "check_conflicts_open",
    }  # fmt: skip
    fresh = clean["check_inbound_freshness"]
    assert (
        fresh.severity == dg.AssetCheckSeverity.WARN
        and "no inbound sync of u8 has succeeded" in fresh.description
    )

    now = dt.datetime.now(dt.UTC)
    add_run(engine, "sync-u8-inbound-recent", "succeeded", now - dt.timedelta(minutes=5))
    add_outbox(engine, "dead", last_error="U8: 客户编码 C0042 已存在 (duplicate code)")
    add_outbox(engine, "pending", created_at=now - dt.timedelta(hours=2))
    add_outbox(engine, "done", created_at=now - dt.timedelta(days=30))  # delivered: no backlog
    with engine.begin() as connection:
        connection.execute(sa.insert(SyncConflict).values(
            target="u8", entity="customer", entity_id=7, field="phone", exchanged_value="13700000000",
            crm_value="13800001111", target_value="13900002222", owner=None, status="open", created_at=now,
        ))  # fmt: skip
    planted = check_results(defs)
    dead = planted["check_dead_letters"]
    assert not dead.passed and dead.severity == dg.AssetCheckSeverity.ERROR
    assert "1 dead letter(s) for u8: customer 1: U8: 客户编码 C0042 已存在" in dead.description
    assert dead.metadata["dead_letters"].value == 1
    backlog = planted["check_outbox_backlog_age"]
    assert (
        not backlog.passed
        and backlog.severity == dg.AssetCheckSeverity.WARN
        and "2.0 h" in backlog.description
    )
    assert backlog.metadata["outbox_pending"].value == 1
    conflicts = planted["check_conflicts_open"]
    assert not conflicts.passed and conflicts.severity == dg.AssetCheckSeverity.WARN
    assert "customer 7.phone" in conflicts.description
    assert "13900002222" not in repr(conflicts)  # which field, not the customer's data
    assert planted["check_inbound_freshness"].passed  # 5 minutes old; the limit is 2 × 10 minutes

    with engine.begin() as connection:
        connection.execute(
            sa.update(SyncOutbox)
            .where(SyncOutbox.status == "pending")
            .values(created_at=now - dt.timedelta(hours=25))
        )
        connection.execute(
            sa.update(LoadRun)
            .where(LoadRun.run_key == "sync-u8-inbound-recent")
            .values(finished_at=now - dt.timedelta(minutes=45))
        )
    later = check_results(defs)
    assert later["check_outbox_backlog_age"].severity == dg.AssetCheckSeverity.ERROR
    stale = later["check_inbound_freshness"]
    assert not stale.passed and "limit 20 min" in stale.description
    # 45 minutes is more than twice its 20: the ERP unreachable (or the schedule off) is an ERROR, alerted by
    # default; a U8 down with changes waiting 5 hours is one too (it was a WARN for 24 hours: nobody paged)
    assert stale.severity == dg.AssetCheckSeverity.ERROR
    with engine.begin() as connection:
        connection.execute(
            sa.update(SyncOutbox)
            .where(SyncOutbox.status == "pending")
            .values(created_at=now - dt.timedelta(hours=5))
        )
    assert check_results(defs)["check_outbox_backlog_age"].severity == dg.AssetCheckSeverity.ERROR
    os.environ["CRMI_SYNC_BACKLOG_ERROR_HOURS"] = "8"
    try:
        assert check_results(defs)["check_outbox_backlog_age"].severity == dg.AssetCheckSeverity.WARN
    finally:
        del os.environ["CRMI_SYNC_BACKLOG_ERROR_HOURS"]
    engine.dispose()


def test_the_outbound_job_sends_a_crm_change_to_u8_and_the_sensor_then_rests(
    env: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared, url = env
    project = tmp_path / "demo"
    shutil.copytree(shared, project)  # the server writes into this copy's U8 database
    engine = make_engine(url)
    with serve(f"sqlite:///{project / 'data' / 'erp_u8.sqlite'}") as (base_url, _api):
        for name, value in (("U8_API_URL", base_url), ("U8_FROM_ACCOUNT", FROM_ACCOUNT),
                            ("U8_TO_ACCOUNT", TO_ACCOUNT), ("U8_APP_KEY", APP_KEY), ("U8_APP_SECRET", APP_SECRET)):  # fmt: skip
            monkeypatch.setenv(name, value)
        defs = build_definitions(project, url)
        job = defs.resolve_job_def("sync_u8_outbound_job")
        with dg.instance_for_test() as instance:
            # start: now (the default): the first outbound run marks where capture starts and sends nothing.
            first = job.execute_in_process(instance=instance)
            [baseline] = first.asset_materializations_for_node("sync_u8_outbound")
            assert baseline.metadata["sent"].value == 0
            rested = evaluate(defs, instance, None)
            assert rested.run_requests == []  # the outbound run captured everything, its own run asks nothing

            new_id = create_record(
                engine, "customer", {"name": "杭州新禾贸易有限公司", "phone": "+8657188886666"}
            )
            assert len(evaluate(defs, instance, rested.cursor).run_requests) == 1  # the CRM edit asks
            second = job.execute_in_process(instance=instance)  # what that request starts
            after = evaluate(defs, instance, rested.cursor)
        [sent] = second.asset_materializations_for_node("sync_u8_outbound")
        assert (sent.metadata["sent"].value, sent.metadata["delivered"].value) == (1, 1)
        assert sent.metadata["dead_letters"].value == 0
        checks = {e.check_name: e.passed for e in second.get_asset_check_evaluations()}
        assert checks == {
            "check_outbox_backlog_age": True,
            "check_dead_letters": True,
            "check_conflicts_open": True,
        }
        u8 = sa.create_engine(f"sqlite:///{project / 'data' / 'erp_u8.sqlite'}")
        with u8.connect() as connection:
            query = sa.text("SELECT cCusCode, cCusName FROM Customer WHERE cCusDefine1 = :id")
            rows = list(connection.execute(query, {"id": str(new_id)}))
        u8.dispose()
        assert len(rows) == 1 and rows[0][1] == "杭州新禾贸易有限公司"
        with engine.connect() as connection:
            assert connection.scalar(sa.select(Customer.erp_code).where(Customer.id == new_id)) == rows[0][0]
        # The key written back is the sync run's own change: it asks for no further run.
        assert (
            after.run_requests == []
            and OutboxCursor.parse(after.cursor).run > OutboxCursor.parse(rested.cursor).run
        )
        for result in (first, second):
            assert APP_SECRET not in event_text(result) and base_url not in event_text(result)
    engine.dispose()
