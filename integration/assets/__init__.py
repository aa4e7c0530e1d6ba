"""Dagster assets built from a migration project by factories."""

from __future__ import annotations

from integration.assets.factories import core_asset, raw_asset, reconciliation_asset, staged_asset
from integration.assets.resources import CoreDatabase, MigrationProject, SourceSystem

__all__ = [
    "CoreDatabase",
    "MigrationProject",
    "SourceSystem",
    "core_asset",
    "raw_asset",
    "reconciliation_asset",
    "staged_asset",
]
