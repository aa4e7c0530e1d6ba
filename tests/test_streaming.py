"""Streaming through the pipeline: extraction, staging and loading hold one piece of a source at a time.

A run with tiny pieces must leave exactly the core, rejects and reconciliation a run with whole sources
leaves; the steps pass files, not frames; and staging's memory follows the piece size, not the source's.
"""

from __future__ import annotations

import dataclasses
import re
import tracemalloc
from decimal import Decimal
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest
import sqlalchemy as sa

from crm_core.db import make_engine
from crm_core.errors import LoadError
from crm_core.loading import Batch, StoredPieces
from crm_core.models import Base
from crm_core.validation import RuleContext, unique
from integration.jobs import MIGRATION_JOB, build_definitions
from integration.pipeline import Migration, reconcile, stage
from integration.spill import SPILL_FOLDER, SpillFolder, StoredFrames
from tests.conftest import reset_postgres

pytestmark = pytest.mark.slow

REPORT_COLUMNS = ["source", "entity", "location", "row_ref", "field", "value", "rule", "reason", "severity"]


def with_chunk_rows(project: Path, rows: int) -> Path:
    """Set the project's chunk_rows (rows read, staged and loaded at a time)."""
    path = project / "project.yaml"
    path.write_text(path.read_text(encoding="utf-8") + f"\nchunk_rows: {rows}\n", encoding="utf-8")
    return project


def run(project: Path, core_url: str) -> tuple[Any, list[str]]:
    """Run the migration job on a throw-away instance; return the result and the spill files it left."""
    job = build_definitions(project, core_url).resolve_job_def(MIGRATION_JOB)
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(instance=instance, raise_on_error=False)
        spill = Path(instance.storage_directory()) / SPILL_FOLDER
        files = sorted(str(p.relative_to(spill)) for p in spill.rglob("*.pkl")) if spill.exists() else []
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    return result, files


TIMES = {"created_at", "updated_at", "last_synced_at", "decided_at"}


def _timeless(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _timeless(v) for k, v in value.items() if k not in TIMES}
    if isinstance(value, list):
        return [_timeless(v) for v in value]
    return value


def comparable(engine: sa.Engine) -> dict[str, list[Any]]:
    """Every table of the core, without what two databases loaded at other times cannot share.

    Timestamps (in columns and in journal images); the mapping fingerprints (they hash project.yaml, where
    chunk_rows differs); the ids of reference decisions, numbered in the order names turn up unresolved
    (a set's order per batch or piece), so decisions and their journal rows are keyed by name instead; and
    the order of the rejects (ids). On PostgreSQL, ids at all (see ``_without_ids``).
    """
    tables: dict[str, list[Any]] = {}
    with engine.connect() as connection:
        for table in Base.metadata.sorted_tables:
            if table.name == "load_runs":
                continue
            names = [c.name for c in table.columns if c.name not in TIMES]
            rows = connection.execute(
                sa.select(*(table.c[n] for n in names)).order_by(*table.primary_key.columns)
            )
            found = [_timeless(dict(zip(names, row, strict=True))) for row in rows]
            if table.name == "mapping_fingerprints":
                found = [{k: v for k, v in row.items() if k != "fingerprint"} for row in found]
            if table.name == "reference_decisions":
                found = sorted(({k: v for k, v in row.items() if k != "id"} for row in found), key=str)
            if table.name == "row_changes":  # decisions' journal rows are written in id order: keyed by name
                decisions = [row for row in found if row["table_name"] == "reference_decisions"]
                for row in decisions:
                    if row["before"]:
                        row["row_key"] = row["before"].pop("name")
                        row["before"].pop("id")
                    row.pop("id")
                tables["row_changes of decisions"] = sorted(decisions, key=str)
                found = [row for row in found if row["table_name"] != "reference_decisions"]
            if table.name == "rejects":  # a piece's mapping rejects come before the next piece's rows
                found = sorted(({k: v for k, v in row.items() if k != "id"} for row in found), key=str)
                for row in found:  # a held row's reason names its decision by id
                    row["reason"] = re.sub(r"\(reference \d+;", "(reference #;", row["reason"] or "")
            tables[table.name] = found
    if engine.dialect.name == "postgresql":
        return {name: _without_ids(name, rows) for name, rows in tables.items()}
    return tables


def _without_ids(table: str, rows: list[Any]) -> list[Any]:
    """PostgreSQL hands ids out from sequences in blocks per chunk: the same rows, other numbers. Compared
    without ids (and references, which are ids), as multisets; journal rows by table and operation."""
    if table.startswith("row_changes"):
        return sorted(str((row["table_name"], row["operation"])) for row in rows)
    return sorted(str({k: v for k, v in row.items() if k != "id" and not k.endswith("_id")}) for row in rows)


def test_tiny_pieces_load_exactly_what_whole_sources_load(demo_project: Path, core_url: str) -> None:
    """Every source split into pieces of 7 rows: the same core, rejects (raw rows too) and reconciliation
    as whole sources on the same kind of database."""
    whole, _ = run(demo_project, core_url)
    engine = make_engine(core_url)
    expected, expected_core = reconcile(engine, whole.run_id), comparable(engine)
    empty_core(engine)
    pieces, files = run(with_chunk_rows(demo_project, 7), core_url)
    got = reconcile(engine, pieces.run_id)
    assert got.balanced and expected.balanced
    assert comparable(engine) == expected_core
    # spot checks spread over a batch's pieces: as many in all, not necessarily the same rows
    assert all(line.spot_checked <= 25 and not line.spot_mismatches for line in [*got.lines, *expected.lines])
    lines = [
        {k: v for k, v in vars(line).items() if k not in ("spot_checked", "run_key")} for line in got.lines
    ]
    assert lines == [
        {k: v for k, v in vars(line).items() if k not in ("spot_checked", "run_key")}
        for line in expected.lines
    ]
    assert len(got.rejects) > 10  # the demo plants rejects: the core's (compared above) are not empty
    # the steps passed pieces: each raw and staged step wrote several files
    raw_steps = {f.split("/")[0] for f in files if f.startswith("raw_")}
    staged_steps = {f.split("/")[0] for f in files if f.startswith("staged_")}
    assert raw_steps and staged_steps
    assert any(sum(f.startswith(f"{step}/") for f in files) > 3 for step in staged_steps)
    engine.dispose()


def empty_core(engine: sa.Engine) -> None:
    """Drop every table of the core (the next run creates the schema again)."""
    from integration.assets.resources import dispose_engines

    dispose_engines()
    if engine.dialect.name == "postgresql":
        reset_postgres(engine)
    else:
        with engine.begin() as connection:
            for table in reversed(Base.metadata.sorted_tables):
                connection.execute(sa.text(f'DROP TABLE IF EXISTS "{table.name}"'))
            for (name,) in connection.execute(
                sa.text("SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")
            ).all():
                connection.execute(sa.text(f'DROP TABLE IF EXISTS "{name}"'))
            # SQLite's own AUTOINCREMENT counters (merge_log) cannot be dropped: emptied, as in a new file
            if connection.scalar(
                sa.text("SELECT count(*) FROM sqlite_master WHERE name = 'sqlite_sequence'")
            ):
                connection.execute(sa.text("DELETE FROM sqlite_sequence"))
    engine.dispose()


# --------------------------------------------------------------------------- staging piece by piece


def joined(batch: Batch) -> Batch:
    """The batch held whole: its stored pieces read and joined (the reference the pieces are compared to)."""
    if batch.stored is None:
        return batch
    pieces = list(batch.stored)
    raws = [p.raw for p in pieces if p.raw is not None]
    return dataclasses.replace(
        batch,
        records=pd.concat([p.records for p in pieces], ignore_index=True),
        raw=pd.concat(raws, ignore_index=True) if raws else None,
        stored=None,
    )


def stored(frames: list[pd.DataFrame], folder: SpillFolder, **attrs: Any) -> StoredFrames:
    return StoredFrames([folder.write(f, prefix="chunk") for f in frames], sum(map(len, frames)), dict(attrs))


def demo_customers(migration: Migration) -> tuple[str, pd.DataFrame]:
    """The raw customer rows of the demo's SQL source, and their raw asset name."""
    from integration.pipeline import extract

    mapping = next(m for m in migration.mappings_for("customer") if m.source == "erp_u8")
    return migration.raw_asset(mapping), extract(migration, mapping)


KEY = "cCusCode"  # the U8 customer mapping's source key


def test_a_key_repeated_in_a_later_piece_is_rejected_as_within_one_frame(
    demo_project: Path, tmp_path: Path
) -> None:
    migration = Migration.load(str(demo_project))
    name, frame = demo_customers(migration)
    repeated = pd.concat([frame, frame.iloc[[0, 5]]], ignore_index=True)  # two keys again, at the end
    repeated.loc[len(frame) :, "_row_ref"] = ["9001", "9002"]
    whole = stage(migration, "customer", {name: repeated})
    folder = SpillFolder(tmp_path, "staged_customer", "run")
    parts = [repeated.iloc[i : i + 4].reset_index(drop=True) for i in range(0, len(repeated), 4)]
    piecewise = stage(migration, "customer", {name: stored(parts, folder)}, spill=folder)
    [expected], [got] = [b for b in whole.batches], [b for b in piecewise.batches]
    assert isinstance(got.stored, StoredPieces) and len(got.stored.paths) == len(parts)
    assert got.record_count == len(expected.records) == len(frame)
    assert joined(got).records.equals(expected.records)
    assert (
        got.rejects.sort_values(REPORT_COLUMNS[2:4])
        .reset_index(drop=True)
        .equals(expected.rejects.sort_values(REPORT_COLUMNS[2:4]).reset_index(drop=True))
    )
    dupes = got.rejects[got.rejects["rule"] == "duplicate_key"]
    assert sorted(dupes["row_ref"]) == ["9001", "9002"]
    assert (got.rows_read, got.amount_read) == (expected.rows_read, expected.amount_read)
    assert got.locations == frozenset(expected.raw["_location"].unique())


def test_a_unique_rule_counts_values_of_earlier_pieces() -> None:
    rule = unique("customer", "email")
    frame = pd.DataFrame({"email": ["a@x.cn", "b@x.cn", None, "a@x.cn", "c@x.cn", "b@x.cn", "c@x.cn"]})
    whole = rule.violated(frame, RuleContext()).tolist()
    context = RuleContext(seen={})
    pieces = [frame.iloc[0:3], frame.iloc[3:5], frame.iloc[5:7]]
    piecewise = [v for piece in pieces for v in rule.violated(piece, context).tolist()]
    assert piecewise == whole == [False, False, False, True, False, True, True]


def test_staging_memory_follows_the_piece_size_not_the_source_size(
    demo_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five times the rows in pieces of one size: staging's peak memory grows by the keys seen only (the
    rows passed as pieces are never joined), while staging them whole grows with the rows."""
    migration = Migration.load(str(demo_project))
    name, frame = demo_customers(migration)
    piece_rows = 200

    def pieces(count: int) -> list[pd.DataFrame]:
        out = []
        for n in range(count):
            piece = (
                pd.concat([frame] * (piece_rows // len(frame) + 1), ignore_index=True)
                .iloc[:piece_rows]
                .copy()
            )
            piece[KEY] = [f"P{n}-{i}" for i in range(piece_rows)]
            piece["cCusHeadCode"] = None  # no parent among the copies
            piece["_row_ref"] = [str(n * piece_rows + i) for i in range(piece_rows)]
            out.append(piece)
        return out

    def peak(count: int, spill: bool) -> int:
        folder = SpillFolder(tmp_path / f"{count}-{spill}", "staged_customer", "run")
        raw: Any = stored(pieces(count), folder) if spill else pd.concat(pieces(count), ignore_index=True)
        tracemalloc.start()
        staged = stage(migration, "customer", {name: raw}, spill=folder if spill else None)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert staged.records == count * piece_rows
        return top

    # one mapping thread: at most two pieces in flight, whatever the source's size (and no scheduling noise)
    monkeypatch.setenv("CRMI_MAPPING_WORKERS", "1")
    small, large = peak(8, spill=True), peak(40, spill=True)
    whole_small, whole_large = peak(8, spill=False), peak(40, spill=False)
    # Streamed, what grows with the source is the keys seen (to reject one repeated in a later piece): a few
    # dozen bytes a row, against the rows themselves when staged whole.
    assert large - small < 0.3 * (whole_large - whole_small), (small, large, whole_small, whole_large)


def test_a_step_run_again_keeps_only_its_latest_pieces(tmp_path: Path) -> None:
    first = SpillFolder(tmp_path, "raw_x", "run-1")
    path = first.write(pd.DataFrame({"a": [1]}))
    first.keep_only_this_run()
    second = SpillFolder(tmp_path, "raw_x", "run-2")
    second.write(pd.DataFrame({"a": [2]}))
    assert Path(path).exists()  # until the new run's pieces are all written
    second.keep_only_this_run()
    assert not Path(path).exists() and [p.name for p in (tmp_path / SPILL_FOLDER / "raw_x").iterdir()] == [
        "run-2"
    ]
    frames = StoredFrames([path], 1, source="crm")
    with pytest.raises(Exception, match=r"source .crm.*is gone.*extract again"):
        list(frames)
    pieces = StoredPieces((path,), 1)
    with pytest.raises(LoadError, match=r"is gone .*stage again"):
        list(pieces)


def test_stored_pieces_add_their_stats() -> None:
    from crm_core.loading import SourceStats

    a = SourceStats("s", "order", "m", rows_read=3, inserted=2, rejected=1, amount_loaded=Decimal("5"))
    b = SourceStats("s", "order", "m", rows_read=4, updated=4, amount_loaded=Decimal("2.5"), amount_core=None)
    total = a.plus(b)
    assert (total.rows_read, total.inserted, total.updated, total.rejected) == (7, 2, 4, 1)
    assert total.amount_loaded == Decimal("7.5") and total.amount_core is None and total.balanced
    assert isinstance(Batch, type)


# --------------------------------------------------------------------------- review: semantics of pieces


def test_workbooks_of_one_source_with_other_columns_stage_as_one_frame(
    demo_project: Path, tmp_path: Path
) -> None:
    """A folder of workbooks whose sheets differ in a column: each workbook is its own chunk, but a column
    one of them lacks is empty for its rows (as in the frame of all of them), not a vanished column."""
    import openpyxl

    from integration.pipeline import Extraction, extract

    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.title = "商机"
    sheet.append(
        ["商机编号", "客户名称", "商机名称", "阶段", "预计金额", "预计成交日期", "负责人", "报备日期", "币种"]
    )
    sheet.append(["OPP-2025-Q3-1", "上海市同创电子有限公司", "同创二期", "商务谈判", 50000, "2025/9/4", "张伟",
                  "2025年8月24日", None])  # fmt: skip
    book.save(demo_project / "data" / "sales_2025Q3.xlsx")  # no 备注 column
    migration = Migration.load(str(demo_project))
    mapping = next(m for m in migration.mappings_for("opportunity") if m.source == "sales_xlsx")
    name = migration.raw_asset(mapping)
    whole = stage(migration, "opportunity", {name: extract(migration, mapping)})
    folder = SpillFolder(tmp_path, "staged_opportunity", "run")
    piecewise = stage(migration, "opportunity", {name: stored(list(Extraction(migration, mapping)), folder)},
                      spill=folder)  # fmt: skip
    [expected], [got] = whole.batches, piecewise.batches
    assert got.record_count == len(expected.records) > 1
    assert joined(got).records.to_dict("records") == expected.records.to_dict("records")
    assert len(got.rejects) == len(expected.rejects)


def test_a_column_no_workbook_has_is_still_a_vanished_column(demo_project: Path, tmp_path: Path) -> None:
    from crm_core.errors import MappingError
    from integration.pipeline import Extraction

    path = demo_project / "mappings" / "sales_xlsx_opportunities.yaml"
    path.write_text(path.read_text(encoding="utf-8").replace("from: 备注", "from: 备注2"), encoding="utf-8")
    migration = Migration.load(str(demo_project))
    mapping = next(m for m in migration.mappings_for("opportunity") if m.source == "sales_xlsx")
    folder = SpillFolder(tmp_path, "staged_opportunity", "run")
    raw = {migration.raw_asset(mapping): stored(list(Extraction(migration, mapping)), folder)}
    with pytest.raises(MappingError, match="备注2 no longer exist"):
        stage(migration, "opportunity", raw, spill=folder)


def test_a_missing_parent_in_an_early_piece_keeps_its_raw_row(demo_project: Path, tmp_path: Path) -> None:
    """Self-references resolve after every piece loaded: the warning about a parent no source row has keeps
    the row as read, as it does when the source is loaded whole."""
    from integration.pipeline import core_engine, load

    migration = Migration.load(str(demo_project))
    name, frame = demo_customers(migration)
    frame = frame.copy()
    frame.loc[0, "cCusHeadCode"] = "NO-SUCH-PARENT"

    def warnings(raw: Any, folder: SpillFolder | None, url: str) -> list[Any]:
        engine = core_engine(url)
        load(migration, engine, "run", stage(migration, "customer", {name: raw}, spill=folder))
        with engine.connect() as connection:
            found = connection.execute(
                sa.text("SELECT row_ref, raw_row FROM rejects WHERE value = 'NO-SUCH-PARENT'")
            ).all()
        engine.dispose()
        return [tuple(row) for row in found]

    whole = warnings(frame, None, f"sqlite:///{tmp_path / 'whole.sqlite'}")
    folder = SpillFolder(tmp_path, "staged_customer", "run")
    parts = [frame.iloc[i : i + 4].reset_index(drop=True) for i in range(0, len(frame), 4)]
    piecewise = warnings(stored(parts, folder), folder, f"sqlite:///{tmp_path / 'pieces.sqlite'}")
    assert len(whole) == 1 and whole[0][1] is not None
    assert piecewise == whole


def test_two_unique_rules_on_one_field_each_remember_their_own_values() -> None:
    """A project may check one field twice (say an error rule and a warning under other names): the values
    one rule saw are not values the other saw before."""
    from crm_core.validation import RuleSpec, validate

    rules = [
        RuleSpec(name="email_once", entity="customer", field="email", unique=True).compile(),
        RuleSpec(
            name="email_once_warn", entity="customer", field="email", unique=True, severity="warn"
        ).compile(),
    ]
    frame = pd.DataFrame({"email": ["a@x.cn", "b@x.cn", "a@x.cn"]})
    whole = validate("customer", frame, rules, RuleContext())
    context = RuleContext(seen={})
    piecewise = pd.concat(
        [
            validate("customer", frame.iloc[0:2], rules, context),
            validate("customer", frame.iloc[2:3], rules, context),
        ]
    )
    assert sorted(whole["rule"]) == sorted(piecewise["rule"]) == ["email_once", "email_once_warn"]
    assert list(piecewise["index"]) == [2, 2]


def test_a_skipped_mapping_read_again_in_the_core_step_streams_too(
    demo_project: Path, tmp_path: Path
) -> None:
    """A skipped mapping that must load after all (this run changed what it depends on) is read and staged
    in the core step: in pieces into the step's folder, not whole."""
    from integration.pipeline import StagedEntity, core_engine, reload_if_needed
    from integration.rerun import Unchanged

    migration = Migration.load(str(with_chunk_rows(demo_project, 7)))
    mapping = next(m for m in migration.mappings_for("customer") if m.source == "erp_u8")
    item = Unchanged(mapping.name, "customer", "erp_u8", "f", 1, "earlier", ("Customer",), True)
    engine = core_engine(f"sqlite:///{tmp_path / 'core.sqlite'}")  # no run "now": every skipped one reloads
    whole = reload_if_needed(migration, engine, "now", StagedEntity("customer", unchanged=[item]))
    folder = SpillFolder(tmp_path, "core_customer", "now")
    piecewise = reload_if_needed(
        migration, engine, "now", StagedEntity("customer", unchanged=[item]), spill=folder
    )
    engine.dispose()
    [expected], [got] = whole.batches, piecewise.batches
    assert got.stored is not None and len(got.stored.paths) > 1
    assert all(Path(path).is_relative_to(folder.path) for path in got.stored.paths)
    assert joined(got).records.equals(expected.records)
    assert piecewise.unchanged == whole.unchanged == []
    assert piecewise.fingerprints == whole.fingerprints == {mapping.name: "f"}


def test_the_pieces_of_a_run_still_in_progress_stay(demo_project: Path, sqlite_core_url: str) -> None:
    """A trial may run beside a migration (it writes a scratch core): a step written again removes the
    pieces of finished runs only, not those the other run's later steps are about to read."""
    import uuid

    job = build_definitions(demo_project, sqlite_core_url).resolve_job_def(MIGRATION_JOB)
    with dg.instance_for_test() as instance:
        spill = Path(instance.storage_directory()) / SPILL_FOLDER
        runs = {
            status: str(uuid.uuid4()) for status in (dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.SUCCESS)
        }
        for status, run_id in runs.items():
            instance.add_run(dg.DagsterRun(job_name=MIGRATION_JOB, run_id=run_id, status=status))
            for step in ("raw_erp_u8_customer", "staged_customer"):
                (spill / step / run_id).mkdir(parents=True)
                (spill / step / run_id / "piece-00001.pkl").write_bytes(b"")
        result = job.execute_in_process(instance=instance, raise_on_error=False)
        assert result.success
        for step in ("raw_erp_u8_customer", "staged_customer"):
            assert (spill / step / runs[dg.DagsterRunStatus.STARTED]).exists()
            assert not (spill / step / runs[dg.DagsterRunStatus.SUCCESS]).exists()
            assert (spill / step / result.run_id).exists()


def test_a_trial_samples_a_stored_batch_a_piece_at_a_time(demo_project: Path, tmp_path: Path) -> None:
    """A trial's sample of a source staged in pieces is the sample of the whole batch, taken without
    joining its pieces (the core step holds the sampled rows, not the source)."""
    from crm_core.db import session_factory
    from integration.pipeline import core_engine, extract, load, sample_batch, sample_pieces

    migration = Migration.load(str(demo_project))
    engine = core_engine(f"sqlite:///{tmp_path / 'core.sqlite'}")
    reps = {migration.raw_asset(m): extract(migration, m) for m in migration.mappings_for("sales_rep")}
    load(migration, engine, "reps", stage(migration, "sales_rep", reps))  # the customers' owners
    name, frame = demo_customers(migration)
    folder = SpillFolder(tmp_path, "staged_customer", "run")
    parts = [frame.iloc[i : i + 4].reset_index(drop=True) for i in range(0, len(frame), 4)]
    [batch] = stage(migration, "customer", {name: stored(parts, folder)}, spill=folder).batches
    with session_factory(engine)() as session:
        expected = sample_batch(session, "customer", joined(batch), 15)
        got = sample_pieces(session, "customer", batch, 15)  # (no code path joins a batch's pieces any more)
    engine.dispose()
    assert 0 < len(got.records) <= 15 and got.stored is None
    assert got.records.equals(expected.records)
    assert got.raw is not None and expected.raw is not None
    assert got.raw.reset_index(drop=True).equals(expected.raw.reset_index(drop=True))
    assert got.rejects.equals(expected.rejects)
    assert (got.rows_read, got.watermark, got.amount_read) == (expected.rows_read, None, None)


def test_a_later_piece_filling_an_earlier_records_blank_amount_is_read_back_as_whole(
    sqlite_core_url: str, tmp_path: Path
) -> None:
    """The core's amount of a batch is read back once all its pieces are in: a row of a later piece that
    joins an earlier piece's record by an exact key fills its blank amount, as within one frame."""
    from dataclasses import replace

    from crm_core.db import upgrade
    from crm_core.loading import Lookup, MatchRules
    from tests.test_loading import batch, load

    rules = MatchRules(keys=[("name",)])
    rows = [
        {"_external_key": "O1", "name": "年度框架", "customer": "C1", "stage": "won", "amount": None},
        {"_external_key": "O2", "name": "其他项目", "customer": "C1", "stage": "won", "amount": Decimal(100)},
        {"_external_key": "O3", "name": "年度框架", "customer": "C1", "stage": "won", "amount": Decimal(500)},
    ]
    refs = {"customer": Lookup()}

    def loaded(url: str, pieces: bool) -> dict[str, Any]:
        engine = make_engine(url)
        upgrade(engine)
        load(engine, "r1", "customer", [batch("erp", [{"_external_key": "C1", "name": "某某有限公司"}])])
        whole = batch("erp", rows, refs)
        if pieces:
            folder = SpillFolder(tmp_path, "staged_opportunity", url[-12:])
            parts = [replace(whole, records=whole.records.iloc[i : i + 2].reset_index(drop=True), rows_read=len(
                whole.records.iloc[i : i + 2])) for i in (0, 2)]  # fmt: skip
            paths = tuple(folder.write(part) for part in parts)
            whole = replace(whole, records=whole.records.iloc[0:0], stored=StoredPieces(paths, len(rows)))
        [stats] = load(engine, "r2", "opportunity", [whole], rules)
        engine.dispose()
        return stats.as_dict()

    expected = loaded(sqlite_core_url, pieces=False)
    got = loaded(f"sqlite:///{tmp_path / 'pieces.sqlite'}", pieces=True)
    assert (expected["merged"], expected["amount_core"], expected["amount_loaded"]) == (1, "600.00", "100")
    assert got == expected
