"""Building the Dagster ``Definitions`` of a migration project: assets, checks, jobs and resources.

``integration.definitions`` (what ``workspace.yaml`` loads) calls :func:`build_definitions` for
``$CRM_PROJECT``; the CLI and the tests call it for the project they are given. Importing this module
builds nothing, so ``crmi run --project X`` works from any folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
from sqlalchemy.engine import make_url

from crm_core.db import core_url
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
    undo_failed_run,
)
from integration.pipeline import Migration, RunOptions
from integration.project import project_dir

MIGRATION_JOB = "migration"
DELTA_JOB = "migration_delta"
TRIAL_JOB = "migration_trial"
TRIAL_SAMPLE = 500
ROLLBACK_JOB = "rollback"


def report_root() -> Path:
    """Return where reconciliation reports are written: ``var/reports`` under the working directory."""
    return Path("var") / "reports"


def build_definitions(
    project_path: str | Path | None = None, core_database_url: str | None = None
) -> dg.Definitions:
    """Build assets, checks, the migration job and resources for a project folder."""
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
    }
    # SQLite allows one writer: run steps in one process there; PostgreSQL takes the default executor.
    sqlite = make_url(core_url(core_database_url)).get_backend_name() == "sqlite"
    executor = dg.in_process_executor if sqlite else None

    def migration_job(name: str, description: str, options: RunOptions, executor: Any) -> Any:
        return dg.define_asset_job(
            name, selection=dg.AssetSelection.all(), description=description, executor_def=executor,
            hooks={undo_failed_run}, tags=options.tags(),
        )  # fmt: skip

    full = migration_job(
        MIGRATION_JOB,
        f"Full run of project '{migration.project.name}': read every source, map, validate, load, reconcile. "
        "A failed step undoes the run.",
        RunOptions(mode="full"),
        executor,
    )
    delta = migration_job(
        DELTA_JOB,
        "Delta run (cutover weekend, scheduled syncs): incremental sources read only what changed since "
        "their watermark.",
        RunOptions(mode="delta"),
        executor,
    )
    trial = migration_job(
        TRIAL_JOB,
        f"Trial run: at most {TRIAL_SAMPLE} rows per source into a scratch SQLite core under var/trial/<run id>/ "
        "(change the sample with the crmi/sample tag); the real core is not touched.",
        RunOptions(mode="trial", sample=TRIAL_SAMPLE),
        dg.in_process_executor,  # the scratch core is SQLite
    )
    rollback = dg.GraphDefinition(name=ROLLBACK_JOB, node_defs=[rollback_load_run]).to_job(
        description="Undo one load run (config: run_id, cascade), exactly as `crmi rollback` does.",
    )
    return dg.Definitions(assets=assets, jobs=[full, delta, trial, rollback], resources=resources)
