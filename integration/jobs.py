"""Building the Dagster ``Definitions`` of a migration project: assets, checks, jobs and resources.

``integration.definitions`` (what ``workspace.yaml`` loads) calls :func:`build_definitions` for
``$CRM_PROJECT``; the CLI and the tests call it for the project they are given. Importing this module
builds nothing, so ``crmi run --project X`` works from any folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
from sqlalchemy.engine import URL, Engine, make_url

from crm_core.db import core_url, current_revision, head_revision, make_engine
from crm_core.errors import ConfigError
from crm_core.runs import abort_run, finish_partial_run
from integration.assets import (
    CoreDatabase,
    MigrationProject,
    SourceSystem,
    core_asset,
    dedup_assets,
    raw_asset,
    reconciliation_asset,
    rollback_load_run,
    staged_asset,
    sync_definitions,
    undo_failed_run,
)
from integration.assets.alerts import alert_sensors
from integration.assets.finance import FINANCE_GROUP, finance_definitions, finance_inbound_assets
from integration.assets.resources import run_trial_core_url
from integration.assets.sync import SYNC_GROUP
from integration.failures import cause_line
from integration.pipeline import MODE_TAG, Migration, RunOptions
from integration.project import project_dir
from integration.reports import report_root
from integration.storage import StepOutputFiles

CORE_TAG = "crmi/core"  # the run queue allows one run per value (deploy/dagster.yaml)
# read by Dagster's run-retry daemon (deploy/dagster.yaml run_retries)
RETRY_STRATEGY_TAG = "dagster/retry_strategy"
MIGRATION_JOB = "migration"
DELTA_JOB = "migration_delta"
TRIAL_JOB = "migration_trial"
TRIAL_SAMPLE = 500
ROLLBACK_JOB = "rollback"
EXECUTOR_ENV = "CRMI_DAGSTER_EXECUTOR"  # multiprocess (default), k8s or celery: docs/deploy.md


def core_identity(url: str) -> str:
    """Return the core database's identity for the ``crmi/core`` run tag: its address without credentials.

    Two code locations (or two spellings of one URL with different passwords) writing to the same database
    get the same value, so the run queue's limit of one run per value holds; no password or query string
    (which may carry one) is ever part of it.
    """
    parsed = make_url(url)
    bare = URL.create(parsed.drivername, parsed.username, None, parsed.host, parsed.port, parsed.database)
    return bare.render_as_string(hide_password=False)


def forkserver_multiprocess_executor() -> dg.ExecutorDefinition:
    """Return Dagster's default executor (multiprocess, or ``in_process`` by run config) whose step processes
    start from a forkserver unless the run config names another ``start_method``.

    Spawned (Dagster's default), each step process imports Dagster, pandas and this toolkit and builds the
    definitions again: 5–7 s of CPU per step on the 2-core reference machine, minutes per migration run of
    about thirty steps. A forkserver does that once per run (it preloads the code location's module) and
    forks each step from it. The run config is Dagster's own (``execution: {config: {multiprocess: …}}``).
    Should a Dagster release move the internals this uses, Dagster's executor runs as it is.
    """
    try:
        from dagster._core.definitions.executor_definition import (
            _core_in_process_executor_creation,
            _core_multiprocess_executor_creation,
            multi_or_in_process_executor,
        )
    except ImportError:  # pragma: no cover - depends on the Dagster release
        return dg.multi_or_in_process_executor

    @dg.executor(
        name=multi_or_in_process_executor.name,
        config_schema=multi_or_in_process_executor.config_schema.as_field(),
        requirements=multi_or_in_process_executor.get_requirements,
    )
    def forkserver_by_default(init_context: dg.InitExecutorContext) -> Any:
        """Execute each step in a process of its own (forked from a forkserver by default), or all in this one."""
        config: dict[str, Any] = dict(init_context.executor_config)
        if "multiprocess" not in config:
            return _core_in_process_executor_creation(config["in_process"])
        multiprocess: dict[str, Any] = dict(config["multiprocess"] or {})
        if not multiprocess.get("start_method"):
            multiprocess["start_method"] = {"forkserver": {}}
        return _core_multiprocess_executor_creation(multiprocess)

    return forkserver_by_default


def cluster_executor() -> dg.ExecutorDefinition:
    """Return the executor ``$CRMI_DAGSTER_EXECUTOR`` names for the PostgreSQL jobs (default: multiprocess).

    ``k8s`` (dagster-k8s: one pod per step) and ``celery`` (dagster-celery: steps as Celery tasks) run the
    same definitions past one machine; their run config is in deploy/k8s and deploy/celery.
    """
    name = os.environ.get(EXECUTOR_ENV, "").strip().lower()
    if name in ("", "multiprocess"):
        return forkserver_multiprocess_executor()
    try:
        if name == "k8s":
            from dagster_k8s import k8s_job_executor

            return k8s_job_executor
        if name == "celery":
            from dagster_celery import celery_executor

            return celery_executor
    except ImportError as exc:
        raise ConfigError(
            f"{EXECUTOR_ENV}={name}: {exc.name} is not installed in this environment; "
            f"pip install dagster-{name} (the release matching Dagster's)"
        ) from None
    raise ConfigError(f"{EXECUTOR_ENV}={name!r} is not an executor; choose multiprocess, k8s or celery")


@contextmanager
def _run_core(run: dg.DagsterRun, core_database_url: str | None) -> Iterator[Engine | None]:
    """Yield an engine on the core a Dagster run worked on; None when it never reached one this code can use."""
    url = run_trial_core_url(run) if run.tags.get(MODE_TAG) == "trial" else core_url(core_database_url)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        yield None  # the run never reached its core (a trial's scratch core is made by its first step)
        return
    engine = make_engine(url)
    try:
        # not a core this code can work on: the steps said so
        yield engine if current_revision(engine) == head_revision() else None
    finally:
        engine.dispose()


def undo_failed_runs_sensor(core_database_url: str | None) -> dg.SensorDefinition:
    """Return the sensor that undoes the load run of any failed Dagster run of this code location.

    Steps undo their run themselves when they fail, in a job or materialized from the UI; this covers what
    fails around a step (an input that cannot be loaded, a resource), which no step and, outside the named
    jobs, no failure hook sees. It runs with the Dagster daemon (`make ui` starts one).
    """

    @dg.run_failure_sensor(
        name="undo_failed_load_runs",
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=15,
        description="Undoes the core changes of a Dagster run that failed (any job, or assets materialized "
        "from the UI), like `crmi runs recover` does for crashed runs.",
    )
    def _undo(context: dg.RunFailureSensorContext) -> None:
        _undo_run(context, core_database_url, "failed")

    return _undo


def undo_canceled_runs_sensor(core_database_url: str | None) -> dg.SensorDefinition:
    """Return the sensor that undoes the load run of a Dagster run someone terminated.

    A step interrupted mid-load undoes its run itself; a run terminated between two steps (after a core load
    committed) leaves its earlier steps' changes, which no failure hook or failure sensor sees.
    """

    @dg.run_status_sensor(
        run_status=dg.DagsterRunStatus.CANCELED,
        name="undo_canceled_load_runs",
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=15,
        description="Undoes the core changes of a Dagster run that was terminated (any job, or assets "
        "materialized from the UI): a canceled run leaves the core as it was.",
    )
    def _undo(context: dg.RunStatusSensorContext) -> None:
        _undo_run(context, core_database_url, "was canceled")

    return _undo


def _undo_run(context: dg.RunStatusSensorContext, core_database_url: str | None, ended: str) -> None:
    run = context.dagster_run
    try:
        with _run_core(run, core_database_url) as engine:
            if engine is not None and abort_run(engine, run.run_id):
                context.log.warning(f"run {run.run_id} {ended}: its changes in the core were undone")
    except Exception as exc:  # the sensor must keep running for the next run
        context.log.error(f"could not undo run {run.run_id}: {cause_line(exc)}; `crmi runs recover`")


def finish_partial_runs_sensor(core_database_url: str | None) -> dg.SensorDefinition:
    """Return the sensor that marks partial the load run of a succeeded Dagster run no reconciliation ended.

    Assets materialized on their own (from the UI) start a load run like a job does, but only the
    reconciliation ends it: without this, `crmi run` would take the run for crashed and undo what it loaded.
    """

    @dg.run_status_sensor(
        run_status=dg.DagsterRunStatus.SUCCESS,
        name="finish_partial_load_runs",
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=15,
        description="Marks 'partial' the core load run of a succeeded Dagster run that did not reconcile "
        "(assets materialized from the UI): its changes stay, and the next migration run links them.",
    )
    def _finish(context: dg.RunStatusSensorContext) -> None:
        run = context.dagster_run
        try:
            with _run_core(run, core_database_url) as engine:
                if engine is not None and finish_partial_run(engine, run.run_id):
                    context.log.info(f"run {run.run_id} ended without a reconciliation: marked partial")
        except Exception as exc:  # the sensor must keep running for the next run
            context.log.error(f"could not finish run {run.run_id}: {cause_line(exc)}")

    return _finish


def build_definitions(
    project_path: str | Path | None = None, core_database_url: str | None = None
) -> dg.Definitions:
    """Build assets, checks, the migration jobs, the sync jobs of each sync target, and resources for a project folder."""
    path = str(Path(project_dir(project_path)).resolve())
    migration = Migration.load(path)
    assets: list[dg.AssetsDefinition] = [raw_asset(migration, m) for m in migration.mappings]
    for entity in migration.entities:
        assets.append(staged_asset(migration, entity))
        assets.append(core_asset(migration, entity))
    if "customer" in migration.entities:
        assets.extend(dedup_assets(migration))
    assets.append(reconciliation_asset(migration, report_root().resolve()))
    resources: dict[str, object] = {
        "core": CoreDatabase(url=core_database_url),
        "project": MigrationProject(path=path),
        **{
            f"source_{name}": SourceSystem(project_path=path, source=name)
            for name in migration.project.spec.sources
        },
        # Step outputs go to files under the instance's storage folder, not memory: `crmi run` executes in
        # process, where Dagster would otherwise keep every source's frames until the run ends, so memory
        # grew with the engagement (4.4 GB at 1,000,000 source rows) instead of with its largest step.
        # StepOutputFiles is Dagster's FilesystemIOManager writing decimal columns as text (integration.storage).
        "io_manager": StepOutputFiles(),
    }
    # SQLite allows one writer: run steps in one process there; PostgreSQL takes the default executor
    # (multiprocess) or the cluster's ($CRMI_DAGSTER_EXECUTOR).
    sqlite = make_url(core_url(core_database_url)).get_backend_name() == "sqlite"
    executor = dg.in_process_executor if sqlite else cluster_executor()
    sync = sync_definitions(migration.project.sync, core_database_url, executor)
    assets.extend(sync.assets)
    # A project whose sync brings receivables or receipts in gets order_to_cash, its check, job and schedule.
    finance = (
        finance_definitions(migration.project.sync, executor, core_database_url)
        if finance_inbound_assets(migration.project.sync)
        else None
    )
    if finance is not None:
        assets.append(finance[0])
    # The migration jobs (`crmi run`, `make demo`) never run a sync, nor the 业财 figures computed after it:
    # those have jobs of their own.
    migration_assets = dg.AssetSelection.all() - dg.AssetSelection.groups(SYNC_GROUP, FINANCE_GROUP)

    # One writer per core database (the run queue's `crmi/core` limit, deploy/dagster.yaml); a trial writes
    # to a scratch core of its own and carries none.
    core_tag = {CORE_TAG: core_identity(core_url(core_database_url))}

    def migration_job(name: str, description: str, options: RunOptions, executor: Any) -> Any:
        tags = options.tags() if options.mode == "trial" else {**options.tags(), **core_tag}
        # A retried run (run_retries, after its worker died) re-executes every step: the failed attempt's loads
        # were undone, so "from failure" (Dagster's default) would reconcile a load run with nothing in it.
        tags[RETRY_STRATEGY_TAG] = "ALL_STEPS"
        return dg.define_asset_job(
            name, selection=migration_assets, description=description, executor_def=executor,
            hooks={undo_failed_run}, tags=tags,
        )  # fmt: skip

    full = migration_job(
        MIGRATION_JOB,
        f"Use for the first load of project '{migration.project.name}', each go-live rehearsal, and after a "
        "mapping changed: reads every source in full, maps, validates, loads the core, reconciles. A failed "
        "step undoes the whole run. One run per core database at a time (tag crmi/core).",
        RunOptions(mode="full"),
        executor,
    )
    delta = migration_job(
        DELTA_JOB,
        "Use on the cutover weekend and between rehearsals, after a full run: brings the core up to date "
        "with what changed in the sources (incremental sources read only what changed since their "
        "watermark). A failed step undoes the run. One run per core database at a time (tag crmi/core).",
        RunOptions(mode="delta"),
        executor,
    )
    trial = migration_job(
        TRIAL_JOB,
        f"Use before the first real run or after editing a mapping, to see rejects and reconciliation early: "
        f"at most {TRIAL_SAMPLE} rows per source into a scratch SQLite core under var/trial/<run id>/ "
        "(change the sample with the crmi/sample tag); the real core is not touched.",
        RunOptions(mode="trial", sample=TRIAL_SAMPLE),
        dg.in_process_executor,  # the scratch core is SQLite
    )
    rollback = dg.GraphDefinition(name=ROLLBACK_JOB, node_defs=[rollback_load_run]).to_job(
        description="Use when a finished load run put wrong data into the core: undoes that one run "
        "(config: run_id as `crmi runs list` shows it, cascade), exactly as `crmi rollback` does. Failed runs "
        "need no rollback: they are undone by themselves.",
        tags=core_tag,
    )
    return dg.Definitions(
        assets=assets,
        asset_checks=[*sync.checks, *([finance[1]] if finance else [])],
        jobs=[full, delta, trial, rollback, *sync.jobs, *([finance[2]] if finance else [])],
        schedules=[*sync.schedules, *([finance[3]] if finance else [])],
        sensors=[
            undo_failed_runs_sensor(core_database_url),
            undo_canceled_runs_sensor(core_database_url),
            finish_partial_runs_sensor(core_database_url),
            *sync.sensors,
            *alert_sensors(),
        ],
        resources=resources,
    )
