"""`crmi runs prune-trials` deletes what older trials left (scratch cores, UI trials' step outputs), keeps the newest."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from integration.cli import app
from integration.trials import prune_trials


def _trial(parent: Path, name: str, age_seconds: int) -> Path:
    folder = parent / name
    folder.mkdir(parents=True)
    (folder / "core.sqlite").write_bytes(b"x" * 1000)
    stamp = 1_700_000_000 - age_seconds
    os.utime(folder, (stamp, stamp))
    return folder


def test_the_newest_trials_stay_and_the_rest_go(tmp_path: Path) -> None:
    cores, storage = tmp_path / "var" / "trial", tmp_path / "storage"
    old, middle, new = (
        _trial(cores, n, age) for n, age in (("a-old", 300), ("b-middle", 200), ("c-new", 100))
    )
    outputs_old, outputs_new = _trial(storage / "trial", "run-1", 50), _trial(storage / "trial", "run-2", 10)
    reports = tmp_path / "var" / "reports" / "run-1"
    reports.mkdir(parents=True)

    would = prune_trials(1, cores, storage, dry_run=True)
    assert {f.path for f in would} == {old, middle, outputs_old} and old.exists()  # a dry run deletes nothing

    gone = prune_trials(1, cores, storage)

    assert {f.path for f in gone} == {old, middle, outputs_old}
    assert {f.kind for f in gone} == {"scratch core", "step outputs"} and all(f.bytes == 1000 for f in gone)
    assert not old.exists() and not middle.exists() and not outputs_old.exists()
    assert new.exists() and outputs_new.exists() and reports.exists()
    assert prune_trials(1, cores, storage) == []  # nothing left to prune


def test_the_command_prunes_under_the_working_directory_and_the_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "dagster_home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    kept = _trial(Path("var") / "trial", "new", 10)
    dropped = _trial(Path("var") / "trial", "old", 20)
    outputs = _trial(home / "storage" / "trial", "run-old", 30)

    result = CliRunner().invoke(app, ["runs", "prune-trials", "--keep", "1"])

    assert result.exit_code == 0, result.output
    assert kept.exists() and not dropped.exists()
    assert outputs.exists()  # the newest (only) step outputs of UI trials stay
    assert "deleted 1 trial folder(s)" in result.stdout
