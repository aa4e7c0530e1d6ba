"""Incremental extraction: only new/changed rows are read, boundaries are exact, failures keep the watermark."""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from crm_core.db import make_engine
from crm_core.loading import EntityLoader
from crm_core.models import Customer
from crm_core.watermarks import CursorState, advance, all_watermarks
from integration.jobs import DELTA_JOB
from integration.pipeline import reconcile
from tests.test_end_to_end import execute, run_job

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "value",
    [dt.datetime(2025, 6, 1, 9, 0, 0), dt.date(2025, 6, 1), 42, 1.5, "2025-06-01 09:00:00"],
)
def test_cursor_state_round_trips_its_type(value: Any) -> None:
    state = CursorState(value, frozenset({"a", "b"}))
    assert CursorState.from_json(state.to_json()) == state


def test_advance_keeps_the_keys_at_the_top_value() -> None:
    first = advance(None, ["2025-01-01", "2025-01-02", "2025-01-02"], ["a", "b", "c"])
    assert first == CursorState("2025-01-02", frozenset({"b", "c"}))
    same_top = advance(first, ["2025-01-02"], ["d"])  # a row written later with the same timestamp
    assert same_top == CursorState("2025-01-02", frozenset({"b", "c", "d"}))
    assert advance(same_top, ["2025-01-03"], ["e"]) == CursorState("2025-01-03", frozenset({"e"}))
    assert advance(same_top, [], []) == same_top


def legacy(project: Path) -> sqlite3.Connection:
    return sqlite3.connect(project / "data" / "legacy_crm.sqlite")


def legacy_rows_read(result: Any, entity: str) -> int:
    [event] = [
        e
        for e in result.get_asset_materialization_events()
        if e.asset_key.to_user_string() == f"raw_legacy_crm_{entity}"
    ]
    return int(event.materialization.metadata["rows_read"].value)


def test_a_delta_run_reads_only_changed_rows_and_boundary_rows_exactly_once(
    demo_project: Path, core_url: str
) -> None:
    first = run_job(demo_project, core_url, DELTA_JOB)
    engine = make_engine(core_url)
    with legacy(demo_project) as db:
        total = db.execute("SELECT count(*) FROM accounts WHERE deleted = 0").fetchone()[0]
        top = db.execute("SELECT max(date_modified) FROM accounts").fetchone()[0]
    assert legacy_rows_read(first, "customer") == total

    unchanged = run_job(demo_project, core_url, DELTA_JOB)
    assert legacy_rows_read(unchanged, "customer") == 0

    with legacy(demo_project) as db:
        ids = [r[0] for r in db.execute("SELECT id FROM accounts WHERE deleted = 0 ORDER BY id LIMIT 2")]
        db.execute(
            "UPDATE accounts SET name = name || '（更名）', date_modified = '2025-07-01 10:00:00' WHERE id = ?",
            (ids[0],),
        )
        db.execute(
            "UPDATE accounts SET phone_office = '0755-86001234', date_modified = '2025-07-01 10:00:00' WHERE id = ?",
            (ids[1],),
        )
        # Written with the same timestamp as the last load's newest rows: must not be lost.
        db.execute(
            "INSERT INTO accounts (id, name, date_entered, date_modified, deleted) VALUES ('zz-new', '杭州新客户科技有限公司', ?, ?, 0)",
            (top, top),
        )
    delta = run_job(demo_project, core_url, DELTA_JOB)
    assert legacy_rows_read(delta, "customer") == 3
    report = reconcile(engine, delta.run_id)
    assert report.balanced
    [line] = [line for line in report.lines if line.source == "legacy_crm" and line.entity == "customer"]
    assert (line.rows_read, line.loaded + line.merged) == (3, 3)
    with Session(engine) as session:
        names = set(session.scalars(sa.select(Customer.name)))
        marks = all_watermarks(session)
    assert "杭州新客户科技有限公司" in names
    assert marks[("legacy_crm", "legacy_crm_accounts")] == CursorState(
        dt.datetime(2025, 7, 1, 10, 0), frozenset(ids)
    )
    assert legacy_rows_read(run_job(demo_project, core_url, DELTA_JOB), "customer") == 0
    engine.dispose()


def test_a_failed_load_leaves_the_watermark_where_it_was(
    demo_project: Path, sqlite_core_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_job(demo_project, sqlite_core_url, DELTA_JOB)
    engine = make_engine(sqlite_core_url)
    with Session(engine) as session:
        before = all_watermarks(session)
    with legacy(demo_project) as db:
        db.execute(
            "UPDATE accounts SET name = name || '（新）', date_modified = '2025-08-01 00:00:00' WHERE deleted = 0"
        )
    original = EntityLoader._resolve_self_references

    def crash(self: EntityLoader) -> None:
        if self.entity.name == "customer":
            raise RuntimeError("server went away mid-load")
        original(self)

    monkeypatch.setattr(EntityLoader, "_resolve_self_references", crash)
    assert not execute(demo_project, sqlite_core_url, DELTA_JOB).success
    with Session(engine) as session:
        assert all_watermarks(session) == before
        assert not any(n.endswith("（新）") for n in session.scalars(sa.select(Customer.name)))
    monkeypatch.undo()
    retried = run_job(demo_project, sqlite_core_url, DELTA_JOB)
    assert legacy_rows_read(retried, "customer") > 0
    assert reconcile(engine, retried.run_id).balanced


def test_a_spreadsheet_folder_picks_up_only_new_or_changed_files(
    demo_project: Path, sqlite_core_url: str
) -> None:
    import shutil

    from openpyxl import load_workbook

    mapping = demo_project / "mappings" / "sales_xlsx_opportunities.yaml"
    text = mapping.read_text(encoding="utf-8").replace(
        "source: {connector: sales_xlsx, sheet: 商机, key: 商机编号}",
        "source: {connector: sales_xlsx, sheet: 商机, key: 商机编号, incremental: {files: true}}",
    )
    assert "files: true" in text
    mapping.write_text(text, encoding="utf-8")
    # The copied workbook repeats the customer sheet, whose rows are then rejected as duplicate keys: allow it.
    project = demo_project / "project.yaml"
    project.write_text(
        project.read_text(encoding="utf-8") + "validation: {max_reject_ratio: 1}\n", encoding="utf-8"
    )

    def xlsx_rows(result: Any) -> int:
        [event] = [
            e
            for e in result.get_asset_materialization_events()
            if e.asset_key.to_user_string() == "raw_sales_xlsx_opportunity"
        ]
        return int(event.materialization.metadata["rows_read"].value)

    first = run_job(demo_project, sqlite_core_url, DELTA_JOB)
    assert xlsx_rows(first) > 50
    assert xlsx_rows(run_job(demo_project, sqlite_core_url, DELTA_JOB)) == 0  # same file: nothing to read
    (demo_project / "data" / "sales.xlsx").touch()  # a new modification time alone changes nothing
    assert xlsx_rows(run_job(demo_project, sqlite_core_url, DELTA_JOB)) == 0
    book = load_workbook(demo_project / "data" / "sales.xlsx")
    sheet = book["商机"]
    rows = [r for r in sheet.iter_rows(min_row=3, max_row=4, values_only=True)]
    new_book_path = demo_project / "data" / "sales_2025Q3.xlsx"
    shutil.copy(demo_project / "data" / "sales.xlsx", new_book_path)
    new_book = load_workbook(new_book_path)
    new_sheet = new_book["商机"]
    new_sheet.delete_rows(3, new_sheet.max_row)
    for number, row in enumerate(rows):
        new_sheet.append([f"OPP-2025-Q3-{number}", *row[1:]])
    new_book.save(new_book_path)
    third = run_job(demo_project, sqlite_core_url, DELTA_JOB)
    assert xlsx_rows(third) == 2  # only the new workbook's rows
    assert reconcile(make_engine(sqlite_core_url), third.run_id).balanced
