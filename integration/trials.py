"""What trial runs leave behind, and pruning it.

A trial (``crmi run --trial``, or the ``migration_trial`` job in the Dagster UI) loads a sample into a scratch
SQLite core under ``var/trial/<stamp or run id>/``; a trial from the UI also keeps its step outputs under
``<DAGSTER_HOME>/storage/trial/<root run id>/``. Both stay after the trial, for the consultant to look at,
and nothing else removes them: :func:`prune_trials` keeps the newest few of each and deletes the rest.
Reports (``var/reports/<run id>/``) are deliverables and are never touched.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from integration.storage import TRIAL_OUTPUTS

SCRATCH_CORES = Path("var") / "trial"  # relative to the working directory, as the trial runs write them


@dataclass(frozen=True)
class TrialFolder:
    """One folder a trial left: its scratch core, or its step outputs."""

    path: Path
    kind: str  # "scratch core" | "step outputs"
    bytes: int


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def trial_folders(scratch_cores: Path, storage: Path | None) -> list[TrialFolder]:
    """Return every trial's folder, newest first within each kind (by modification time)."""
    found: list[TrialFolder] = []
    for parent, kind in (
        (scratch_cores, "scratch core"),
        (storage / TRIAL_OUTPUTS if storage else None, "step outputs"),
    ):
        if parent is None or not parent.is_dir():
            continue
        folders = sorted(
            (p for p in parent.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True
        )
        found.extend(TrialFolder(p, kind, _size(p)) for p in folders)
    return found


def prune_trials(
    keep: int, scratch_cores: Path = SCRATCH_CORES, storage: Path | None = None, *, dry_run: bool = False
) -> list[TrialFolder]:
    """Delete all but the newest ``keep`` trial folders of each kind; return what was (or would be) deleted."""
    if keep < 0:
        raise ValueError("keep must be 0 or more")
    found = trial_folders(scratch_cores, storage)  # newest first within each kind
    doomed = [
        folder
        for kind in ("scratch core", "step outputs")
        for folder in [f for f in found if f.kind == kind][keep:]
    ]
    if not dry_run:
        for folder in doomed:
            shutil.rmtree(folder.path, ignore_errors=True)
    return doomed
