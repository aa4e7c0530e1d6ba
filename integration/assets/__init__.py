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
from integration.assets.sync import SyncDefinitions, sync_asset, sync_checks, sync_definitions

__all__ = [
    "CoreDatabase",
    "MigrationProject",
    "SourceSystem",
    "SyncDefinitions",
    "core_asset",
    "dedup_assets",
    "raw_asset",
    "reconciliation_asset",
    "rollback_load_run",
    "staged_asset",
    "sync_asset",
    "sync_checks",
    "sync_definitions",
    "undo_failed_run",
]
