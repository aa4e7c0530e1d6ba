"""Dagster assets built from a migration project by factories."""

from __future__ import annotations

from integration.assets.factories import (
    core_asset,
    dedup_assets,
    raw_asset,
    reconciliation_asset,
    rollback_load_run,
    staged_asset,
    undo_failed_run,
)
from integration.assets.resources import CoreDatabase, MigrationProject, SourceSystem

__all__ = [
    "CoreDatabase",
    "MigrationProject",
    "SourceSystem",
    "core_asset",
    "dedup_assets",
    "raw_asset",
    "reconciliation_asset",
    "rollback_load_run",
    "staged_asset",
    "undo_failed_run",
]
