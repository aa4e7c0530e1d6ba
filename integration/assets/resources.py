"""Dagster resources: the CRM core database, the migration project, and one resource per source.

Resource config holds only names and templates, never expanded secrets, so the UI shows
``${LEGACY_CRM_URL}`` rather than a password.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import dagster as dg
from sqlalchemy import Engine

from crm_core.db import core_url, redact_url
from integration.connectors import Connector
from integration.pipeline import Migration, core_engine


def _fingerprint(path: str) -> tuple[tuple[str, int], ...]:
    """Modification times of project.yaml and every YAML below it: edits invalidate the cache."""
    root = Path(path)
    files = [root / "project.yaml", *sorted(root.rglob("*.yaml"))]
    return tuple((str(f), f.stat().st_mtime_ns) for f in files if f.is_file())


@lru_cache(maxsize=8)
def _load_migration(path: str, fingerprint: tuple[tuple[str, int], ...]) -> Migration:
    return Migration.load(path)


def _migration(path: str) -> Migration:
    return _load_migration(path, _fingerprint(path))


_ENGINES: dict[str, Engine] = {}


def _engine(url: str) -> Engine:
    """Return the process-wide engine for a core URL, migrating the schema on first use."""
    if url not in _ENGINES:
        _ENGINES[url] = core_engine(url)
    return _ENGINES[url]


def dispose_engines() -> None:
    """Close the pooled connections of every cached core engine (tests, long-lived processes)."""
    for engine in _ENGINES.values():
        engine.dispose()
    _ENGINES.clear()


class CoreDatabase(dg.ConfigurableResource):  # type: ignore[type-arg]
    """The CRM core; ``url`` empty means ``$CRM_CORE_URL`` or the SQLite file under var/."""

    url: str | None = None

    def engine(self) -> Engine:
        """Return the engine, with the schema migrated to the latest revision."""
        return _engine(core_url(self.url))

    def location(self) -> str:
        """Return the URL without its password."""
        return redact_url(core_url(self.url))


class MigrationProject(dg.ConfigurableResource):  # type: ignore[type-arg]
    """The migration project folder (project.yaml, mappings)."""

    path: str

    def migration(self) -> Migration:
        """Return the loaded project and its compiled mappings (cached per process)."""
        return _migration(self.path)


class SourceSystem(dg.ConfigurableResource):  # type: ignore[type-arg]
    """One source system of the project; builds its connector from project.yaml at run time."""

    project_path: str
    source: str

    def connector(self) -> Connector:
        """Return the connector (secrets are expanded here, never stored in config)."""
        return _migration(self.project_path).connector(self.source)
