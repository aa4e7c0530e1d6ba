"""Dagster ``Definitions`` for the migration project named by ``$CRM_PROJECT`` (default: examples/demo).

``workspace.yaml`` loads this module; ``build_definitions`` is what tests and the CLI call.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from sqlalchemy.engine import make_url

from crm_core.db import core_url
from integration.assets import (
    CoreDatabase,
    MigrationProject,
    SourceSystem,
    core_asset,
    raw_asset,
    reconciliation_asset,
    staged_asset,
)
from integration.pipeline import Migration
from integration.project import project_dir

MIGRATION_JOB = "migration"


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
    job = dg.define_asset_job(
        MIGRATION_JOB,
        selection=dg.AssetSelection.all(),
        description=f"Extract, map, match and load project '{migration.project.name}', then reconcile.",
        executor_def=dg.in_process_executor if sqlite else None,
    )
    return dg.Definitions(assets=assets, jobs=[job], resources=resources)


defs = build_definitions()
