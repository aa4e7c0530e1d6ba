"""What a ``crmi`` process pays before its work starts: imports and garbage collections of its start-up."""

from __future__ import annotations

import gc
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """Start and end with nothing in the permanent generation (a frozen object is never collected)."""
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_start_up_runs_without_collections_and_freezes_what_it_built(unfrozen: None) -> None:
    from crm_core.collections_policy import frozen_start_up

    assert gc.isenabled() and gc.get_freeze_count() == 0
    with frozen_start_up():
        assert not gc.isenabled()
        kept = [{"row": n} for n in range(1000)]
    assert gc.isenabled()
    assert gc.get_freeze_count() >= len(kept)


def test_a_failed_start_up_freezes_nothing_and_a_disabled_collector_stays_disabled(unfrozen: None) -> None:
    from crm_core.collections_policy import frozen_start_up

    with pytest.raises(ZeroDivisionError), frozen_start_up():
        1 / 0  # noqa: B018
    assert gc.isenabled() and gc.get_freeze_count() == 0
    gc.disable()
    try:
        with frozen_start_up():
            pass
        assert not gc.isenabled() and gc.get_freeze_count() == 0
    finally:
        gc.enable()


def test_crmi_run_executes_its_job_with_the_start_up_frozen(
    demo_project: Path, sqlite_core_url: str, monkeypatch: pytest.MonkeyPatch, unfrozen: None
) -> None:
    """Full collections during the run and the one at exit skip Dagster, pandas and the definitions."""
    import crm_core.runs
    import integration.cli as cli
    from integration.assets.resources import dispose_engines

    seen: dict[str, Any] = {}
    recover = crm_core.runs.recover_crashed_runs

    def recover_crashed_runs(engine: Any, *args: Any) -> Any:
        seen.update(recovering_collects=gc.isenabled())  # undoing a crashed load is bulk work, not start-up
        return recover(engine, *args)

    def execute(*args: Any, **kwargs: Any) -> Any:
        seen.update(enabled=gc.isenabled(), frozen=gc.get_freeze_count())
        raise RuntimeError("stopped before the job ran")

    monkeypatch.setattr(crm_core.runs, "recover_crashed_runs", recover_crashed_runs)
    monkeypatch.setattr(cli, "_execute_with_progress", execute)
    result = CliRunner().invoke(
        cli.app, ["run", "--project", str(demo_project), "--core-url", sqlite_core_url, "--json"]
    )
    dispose_engines()
    assert isinstance(result.exception, RuntimeError), result.output
    assert seen["recovering_collects"] and seen["enabled"]
    assert seen["frozen"] > 100_000  # Dagster's and pandas' modules, classes and functions


def test_loading_the_command_line_does_not_import_pandas() -> None:
    """pandas costs about half a second to import: `crmi --help` and commands without frames do not pay it,
    and `crmi run` imports it during its start-up, when no collection walks what it builds."""
    code = "import sys, integration.cli; print('pandas' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "False"


def test_loading_the_definitions_does_not_import_psycopg() -> None:
    """psycopg costs about 70 ms to import; only a core or source on PostgreSQL needs it."""
    code = "import sys, integration.cli, integration.jobs, crm_core.runs; print('psycopg' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "False"


@pytest.mark.parametrize(
    "module",
    ["integration.project", "integration.mappings", "integration.mappings.money", "integration.connectors"],
)
def test_each_module_imports_first_in_a_fresh_process(module: str) -> None:
    """`crmi dedup decide` imported integration.project first and died of a circular import (found by a newcomer
    deciding a held customer name): project → mappings.money → mappings → connectors → project."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"], cwd=root, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_crmi_dedup_decide_starts_in_a_fresh_process(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    code = "import sys; from integration.cli import main; sys.argv[0] = 'crmi'; main()"
    core = f"sqlite:///{tmp_path / 'none.sqlite'}"
    done = subprocess.run(
        [sys.executable, "-c", code, "dedup", "decide", "r1", "--different", "--steward", "li", "--core-url", core],
        cwd=root, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert "Traceback" not in done.stdout + done.stderr and "ImportError" not in done.stdout + done.stderr
    assert done.returncode == 1 and "no core database at" in done.stderr
