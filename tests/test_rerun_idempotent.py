"""A second `crmi run` on unchanged sources changes nothing: no new merges, the same rejects and held rows, no
core row changed — on a generated engagement with the hard cases (the demo's own check is in test_end_to_end)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from crm_core.models import Base
from integration.cli import app
from tests.test_bench_e2e import E2E, env_for, load_engagement_generator

pytestmark = pytest.mark.slow
ROWS = 3000
VOLATILE = {"created_at", "updated_at", "last_synced_at", "decided_at"}
REJECT_COLUMNS = ["source", "entity", "location", "row_ref", "field", "value", "rule", "reason", "severity"]


def snapshot(engine: sa.Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every core table but the run journal, without timestamps."""
    tables: dict[str, list[tuple[Any, ...]]] = {}
    with engine.connect() as connection:
        for table in Base.metadata.sorted_tables:
            if table.name in ("load_runs", "rejects", "row_changes"):
                continue
            columns = [c for c in table.columns if c.name not in VOLATILE]
            rows = connection.execute(sa.select(*columns).order_by(*table.primary_key.columns)).all()
            tables[table.name] = [tuple(r) for r in rows]
    return tables


def rejects_of(engine: sa.Engine, run_key: str) -> list[tuple[Any, ...]]:
    """The quarantine entries a run recorded (rejected, held and warnings), in the order written."""
    query = sa.text(
        f"SELECT {', '.join(REJECT_COLUMNS)} FROM rejects JOIN load_runs ON load_runs.id = rejects.load_run_id "
        "WHERE load_runs.run_key = :run ORDER BY rejects.id"
    )
    with engine.connect() as connection:
        return [tuple(r) for r in connection.execute(query, {"run": run_key})]


def test_a_second_run_on_an_unchanged_generated_engagement_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sources = tmp_path / "sources"
    manifest = load_engagement_generator().generate(ROWS, sources)
    assert manifest["classes"]["name_english"] > 0 and manifest["hard_cases"]["branches"] > 0
    for name, value in env_for(sources).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.chdir(tmp_path)
    core = f"sqlite:///{tmp_path / 'core.sqlite'}"
    command = ["run", "--project", str(E2E / "project"), "--core-url", core, "--json"]

    first = CliRunner().invoke(app, command)
    assert first.exit_code == 0, first.output
    engine = sa.create_engine(core)
    before = snapshot(engine)
    assert before["merge_log"] and before["match_candidates"]  # the engagement has duplicates to merge

    second = CliRunner().invoke(app, [*command, "--new-run"])  # a run, not "nothing changed since"
    assert second.exit_code == 0, second.output
    runs = [json.loads(first.stdout)["run_id"], json.loads(second.stdout)["run_id"]]
    assert snapshot(engine) == before  # no merge, no candidate re-scored, no record or decision touched
    assert rejects_of(engine, runs[1]) == rejects_of(engine, runs[0]) != []
    with engine.connect() as connection:
        changes = connection.execute(
            sa.text("SELECT COUNT(*) FROM row_changes JOIN load_runs ON load_runs.id = row_changes.load_run_id "
                    "WHERE load_runs.run_key = :run"), {"run": runs[1]},
        ).scalar_one()  # fmt: skip
        stats = json.loads(
            connection.execute(
                sa.text("SELECT stats FROM load_runs WHERE run_key = :run"), {"run": runs[1]}
            ).scalar_one()
        )
    engine.dispose()
    assert changes == 0
    lines = [line for batches in stats.values() for line in batches]
    assert all(line["inserted"] == 0 and line["updated"] == 0 for line in lines)
