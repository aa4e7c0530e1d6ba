"""Dagster resources: the CRM core database, the migration project, and one resource per source.

Resource config holds only names and templates, never expanded secrets, so the UI shows
``${LEGACY_CRM_URL}`` rather than a password.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import dagster as dg
from pydantic import PrivateAttr
from sqlalchemy import Engine

from crm_core.db import core_url, redact_url
from integration.connectors import Connector
from integration.pipeline import MODE_TAG, Migration, core_engine
from integration.storage import trial_root


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
    """Return the process-wide engine for a core URL (schema created in an empty database, else checked)."""
    if url not in _ENGINES:
        _ENGINES[url] = core_engine(url)
    return _ENGINES[url]


def dispose_engines() -> None:
    """Close the pooled connections of every cached core engine (tests, long-lived processes)."""
    for engine in _ENGINES.values():
        engine.dispose()
    _ENGINES.clear()


TRIAL_CORE_ENV = "CRM_TRIAL_CORE_URL"


def trial_core_url(run_id: str) -> str:
    """Return the scratch core of a trial run: ``$CRM_TRIAL_CORE_URL``, else a SQLite file under var/trial/."""
    return (
        os.environ.get(TRIAL_CORE_ENV)
        or f"sqlite:///{(Path('var') / 'trial' / run_id / 'core.sqlite').resolve()}"
    )


def run_trial_core_url(run: dg.DagsterRun) -> str:
    """Return the scratch core of a trial run: its root run's (:func:`integration.storage.trial_root`), so a
    re-execution loads into the core its first run's steps loaded into."""
    return trial_core_url(trial_root(run))


class CoreDatabase(dg.ConfigurableResource):  # type: ignore[type-arg]
    """The CRM core; ``url`` empty means ``$CRM_CORE_URL`` or the SQLite file under var/.

    A trial run (run tag ``crmi/mode: trial``, e.g. the ``migration_trial`` job in the UI) never touches it:
    its steps get a scratch core of their own (see :func:`trial_core_url`).
    """

    url: str | None = None
    _trial_url: str | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """Switch to the scratch core when the run is a trial."""
        run = context.run
        if run is not None and run.tags.get(MODE_TAG) == "trial":
            self._trial_url = run_trial_core_url(run)

    def _url(self) -> str:
        return self._trial_url or core_url(self.url)

    def engine(self) -> Engine:
        """Return the engine; a core at another schema revision is refused (`crmi core upgrade`)."""
        return _engine(self._url())

    def location(self) -> str:
        """Return the URL without its password."""
        return redact_url(self._url())


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
