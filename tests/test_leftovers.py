"""Leftovers of the streaming review: work done once, rejects stored once, the extraction's columns whole."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from crm_core import loading
from integration.pipeline import Extraction
from tests.conftest import PG_URL, reset_postgres, server_or_skip


@pytest.fixture
def statements() -> Iterator[tuple[sa.Engine, list[str]]]:
    """The PostgreSQL test database, wiped, and the statements run on it (as tests/test_loading_fast.py does)."""
    engine = server_or_skip(PG_URL, "PostgreSQL")
    reset_postgres(engine)
    seen: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", note)
    yield engine, seen
    sa.event.remove(engine, "before_cursor_execute", note)
    engine.dispose()


@pytest.mark.postgres
def test_an_id_allocator_looks_its_sequence_up_once(statements: tuple[sa.Engine, list[str]]) -> None:
    engine, seen = statements
    table = sa.Table("things", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True))
    table.metadata.create_all(engine)
    with Session(engine) as session:
        allocator = loading._IdAllocator(session, table)
        seen.clear()
        ids = [allocator.take(1) for _ in range(40)] + allocator.take_many([20] * 30)  # blocks of 16, then 20
    assert ids == list(range(1, 71))
    assert sum("nextval" in s for s in seen) == 5  # three blocks of 16, then two of 20
    assert sum("pg_get_serial_sequence" in s for s in seen) == 1


def test_the_extraction_step_names_the_columns_of_every_chunk(
    demo_project: Path, sqlite_core_url: str
) -> None:
    """A later workbook with a column the first lacks: the step's ``columns`` metadata names it too, after the
    first chunk's columns (the preview stays the first rows)."""
    import openpyxl

    from integration.assets.resources import dispose_engines
    from integration.jobs import build_definitions
    from integration.pipeline import Migration

    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.title = "商机"
    sheet.append(["商机编号", "客户名称", "商机名称", "阶段", "预计金额", "预计成交日期", "负责人", "报备日期",
                  "币种", "备注", "附加列"])  # fmt: skip
    sheet.append(["OPP-2025-Q3-1", "上海市同创电子有限公司", "同创二期", "商务谈判", 50000, "2025/9/4", "张伟",
                  "2025年8月24日", None, None, "extra"])  # fmt: skip
    book.save(demo_project / "data" / "sales_zz_later.xlsx")  # after sales.xlsx: its own, later chunk
    migration = Migration.load(str(demo_project))
    mapping = next(m for m in migration.mappings_for("opportunity") if m.source == "sales_xlsx")
    name = migration.raw_asset(mapping)
    first = next(iter(Extraction(migration, mapping)))
    assert "附加列" not in first.columns
    defs = build_definitions(demo_project, sqlite_core_url)
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            list(defs.assets or []), selection=dg.AssetSelection.assets(name), resources=defs.resources,
            instance=instance,
        )  # fmt: skip
    dispose_engines()
    [materialization] = result.asset_materializations_for_node(name)
    metadata = materialization.metadata
    assert metadata["chunks"].value == 2
    expected = [c for c in first.columns if not c.startswith("_")] + ["附加列"]
    assert metadata["columns"].value == expected
    assert "extra" not in str(metadata["preview"].value)  # the first rows


def entries(rejects: Any) -> list[str]:
    """Reject entries as comparable text, in no particular order (a piece's come before the next piece's)."""
    return sorted(
        str(entry) for entry in rejects.astype(object).where(rejects.notna(), None).to_dict("records")
    )


def test_a_staged_batchs_rejects_are_stored_once(demo_project: Path, tmp_path: Path) -> None:
    """A batch staged in pieces keeps each reject entry in one place (the batch, which the staging step's
    metadata and a trial's sample read); the loader still gets each piece's own entries with its rows."""
    import pandas as pd

    from crm_core.loading import read_batch_piece
    from integration.pipeline import Migration, extract, stage
    from integration.spill import SpillFolder, StoredFrames

    migration = Migration.load(str(demo_project))
    mapping = next(m for m in migration.mappings_for("opportunity") if m.source == "sales_xlsx")
    name, frame = migration.raw_asset(mapping), extract(migration, mapping)  # three rows rejected
    [whole] = stage(migration, "opportunity", {name: frame}).batches
    folder = SpillFolder(tmp_path, "staged_opportunity", "run")
    parts = [frame.iloc[i : i + 4].reset_index(drop=True) for i in range(0, len(frame), 4)]
    raw = StoredFrames([folder.write(p, prefix="chunk") for p in parts], len(frame))
    [batch] = stage(migration, "opportunity", {name: raw}, spill=folder).batches
    assert batch.stored is not None and len(whole.rejects) > 2
    in_files = sum(len(read_batch_piece(path).rejects) for path in batch.stored.paths)
    assert len(batch.rejects) + in_files == len(whole.rejects)
    expected = entries(whole.rejects)
    assert entries(batch.rejects) == expected
    given = [piece.rejects for piece in batch.pieces()]  # what the loader reads, piece by piece
    assert entries(pd.concat(given, ignore_index=True)) == expected
    for piece, rejects in zip(batch.pieces(), given, strict=True):  # each with the rows it rejects
        assert piece.raw is not None
        rows = set(zip(piece.raw["_location"].astype(str), piece.raw["_row_ref"].astype(str), strict=True))
        assert set(zip(rejects["location"], rejects["row_ref"], strict=True)) <= rows


def test_a_core_step_checks_each_skipped_mapping_once(
    demo_project: Path, sqlite_core_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-run skips the unchanged mappings; each core step asks once per skipped mapping whether it must be
    read after all (the core step asked, and then the load it called asked again)."""
    from collections import Counter

    from integration import pipeline
    from integration.assets.resources import dispose_engines
    from integration.jobs import MIGRATION_JOB, build_definitions

    job = build_definitions(demo_project, sqlite_core_url).resolve_job_def(MIGRATION_JOB)
    asked: Counter[str] = Counter()
    real = pipeline.must_reload

    def counted(connection: Any, run_id: int, mapping: Any, unchanged: Any, loading: bool) -> bool:
        asked[mapping.name] += 1
        return real(connection, run_id, mapping, unchanged, loading)

    with dg.instance_for_test() as instance:
        assert job.execute_in_process(instance=instance).success
        monkeypatch.setattr(pipeline, "must_reload", counted)
        again = job.execute_in_process(instance=instance)
    dispose_engines()
    assert again.success
    skipped = {
        name
        for event in again.get_asset_materialization_events()
        if event.asset_key.path[0].startswith("core_")
        for name in event.materialization.metadata["skipped_unchanged"].value  # type: ignore[union-attr]
    }
    assert skipped and set(asked) == skipped
    assert max(asked.values()) == 1, asked


def test_reloading_skipped_mappings_once_is_enough(
    demo_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A skipped mapping that must load only when another mapping of its entity loads (a branch's parent) is
    read in the same call that reads the other one: what the call returns needs no second call."""
    from integration import pipeline
    from integration.pipeline import Migration, StagedEntity, core_engine, reload_if_needed, start_run
    from integration.rerun import Unchanged

    migration = Migration.load(str(demo_project))
    first, second = migration.mappings_for("customer")[:2]
    items = [Unchanged(m.name, "customer", m.source, "f", 1, "earlier", (), True) for m in (first, second)]
    # the first: the core changed under it; the second: only when another mapping of its entity loads
    monkeypatch.setattr(
        pipeline, "must_reload", lambda c, r, mapping, u, loading: mapping is first or loading
    )
    engine = core_engine(f"sqlite:///{tmp_path / 'core.sqlite'}")
    start_run(engine, "now", migration.project.name)
    staged = reload_if_needed(migration, engine, "now", StagedEntity("customer", unchanged=items))
    engine.dispose()
    assert [b.mapping for b in staged.batches] == [first.name, second.name] and staged.unchanged == []


def test_a_trial_beside_a_migration_leaves_the_migrations_step_outputs(
    demo_project: Path, sqlite_core_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step outputs are named by asset: a trial run in the same instance (the ``migration_trial`` job in the
    UI, beside a migration: it carries no ``crmi/core`` tag) wrote over the migration's, which its later
    steps then read (the trial's dedup candidates name records of the trial's scratch core). A trial's
    outputs go to a folder of its own."""
    from integration.assets.resources import dispose_engines
    from integration.jobs import MIGRATION_JOB, TRIAL_JOB, build_definitions

    monkeypatch.setenv("CRM_TRIAL_CORE_URL", f"sqlite:///{tmp_path / 'trial.sqlite'}")
    defs = build_definitions(demo_project, sqlite_core_url)
    with dg.instance_for_test() as instance:
        storage = Path(instance.storage_directory())
        assert defs.resolve_job_def(MIGRATION_JOB).execute_in_process(instance=instance).success
        outputs = {path: path.read_bytes() for path in storage.iterdir() if path.is_file()}
        trial = defs.resolve_job_def(TRIAL_JOB).execute_in_process(instance=instance)
        dispose_engines()
        assert trial.success
        assert "staged_customer" in {path.name for path in outputs}
        assert {path: path.read_bytes() for path in storage.iterdir() if path.is_file()} == outputs
        assert (storage / "trial" / trial.run_id / "staged_customer").is_file()


def trial_job() -> Any:
    """The demo's trial job, built from ``$CRMI_TEST_PROJECT`` (a module-level function: re-execution
    rebuilds the job from it)."""
    import os

    from integration.jobs import TRIAL_JOB, build_definitions

    return build_definitions(os.environ["CRMI_TEST_PROJECT"], os.environ["CRMI_TEST_CORE"]).resolve_job_def(
        TRIAL_JOB
    )


@contextmanager
def _trial_then_re_executed(step: str) -> Iterator[tuple[str, str, Path]]:
    """Run the trial job, then re-execute ``step`` of it (a new run id, the same root run), both succeeding;
    yield both run ids and the instance's storage folder, which lasts as long as the block
    (``$CRMI_TEST_PROJECT``/``_CORE`` set by the test)."""
    from integration.assets.resources import dispose_engines

    job = dg.reconstructable(trial_job)
    with dg.instance_for_test() as instance:
        with dg.execute_job(job, instance=instance) as first:
            assert first.success
        options = dg.ReexecutionOptions(parent_run_id=first.run_id, step_selection=[step])
        with dg.execute_job(
            job, instance=instance, reexecution_options=options, raise_on_error=False
        ) as again:
            dispose_engines()
            assert again.success, [e.message for e in again.all_events if e.is_failure]
        yield first.run_id, again.run_id, Path(instance.storage_directory())


def test_a_re_executed_trial_reads_the_step_outputs_its_first_run_wrote(
    demo_project: Path, sqlite_core_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-executing a trial run (from the UI: a new run id, the same root run) runs some steps again; the
    others' outputs are read where the first run wrote them, not in a folder of the new run id."""
    monkeypatch.setenv("CRM_TRIAL_CORE_URL", f"sqlite:///{tmp_path / 'trial.sqlite'}")
    monkeypatch.setenv("CRMI_TEST_PROJECT", str(demo_project))
    monkeypatch.setenv("CRMI_TEST_CORE", sqlite_core_url)
    with _trial_then_re_executed("core_customer") as (first, again, storage):
        assert (storage / "trial" / first / "staged_customer").is_file()
        assert not (storage / "trial" / again).exists()  # the re-execution used its root run's folder


def test_a_re_executed_trial_loads_into_its_first_runs_scratch_core(
    demo_project: Path, sqlite_core_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trial's steps load into ``var/trial/<run id>/core.sqlite``; a re-execution (a new run id, the same
    root run) loads into its root run's, where the steps it does not run loaded their rows."""
    from crm_core.db import make_engine
    from crm_core.models import LoadRun

    monkeypatch.delenv("CRM_TRIAL_CORE_URL", raising=False)
    monkeypatch.chdir(tmp_path)  # var/trial/ is relative to the working directory
    monkeypatch.setenv("CRMI_TEST_PROJECT", str(demo_project))
    monkeypatch.setenv("CRMI_TEST_CORE", sqlite_core_url)
    with _trial_then_re_executed("core_contact") as (first, again, _):
        pass
    assert not (tmp_path / "var" / "trial" / again).exists()
    engine = make_engine(f"sqlite:///{tmp_path / 'var' / 'trial' / first / 'core.sqlite'}")
    with Session(engine) as session:
        run_keys = set(session.scalars(sa.select(LoadRun.run_key)))
    engine.dispose()
    assert {first, again} <= run_keys  # the re-executed step loaded beside its first run's


def test_a_trial_of_some_steps_says_it_needs_the_whole_trial(
    demo_project: Path, sqlite_core_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trial launched for some of its assets (not a re-execution) has no upstream outputs of its own; it
    must not read a migration's, and says what to do instead of failing on a missing file."""
    from integration.assets.resources import dispose_engines
    from integration.failures import step_failures
    from integration.jobs import MIGRATION_JOB, TRIAL_JOB, build_definitions

    monkeypatch.setenv("CRM_TRIAL_CORE_URL", f"sqlite:///{tmp_path / 'trial.sqlite'}")
    defs = build_definitions(demo_project, sqlite_core_url)
    with dg.instance_for_test() as instance:
        assert defs.resolve_job_def(MIGRATION_JOB).execute_in_process(instance=instance).success
        some = defs.resolve_job_def(TRIAL_JOB).execute_in_process(
            instance=instance, asset_selection=[dg.AssetKey("staged_customer")], raise_on_error=False
        )
        dispose_engines()
    assert not some.success
    [failure] = step_failures(some.all_events)
    assert failure.step == "staged_customer"
    assert "this trial has no output of raw_" in failure.cause and "crmi run --trial" in failure.cause
