"""Reconciliation beyond counts: key sets, a read-back spot check, and the reports handed to the customer."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import openpyxl
import pandas as pd
import pytest
import sqlalchemy as sa

from crm_core.db import make_engine, session_factory, upgrade
from crm_core.models import Customer, ExternalId, LoadRun
from integration.pipeline import (
    Migration,
    ReconciliationLine,
    ReconciliationReport,
    extract,
    load,
    stage,
    verify_batch,
)
from integration.reports import write_reports


def test_verify_finds_keys_missing_from_the_core_and_values_that_differ(
    demo_project: Path, sqlite_core_url: str
) -> None:
    migration = Migration.load(str(demo_project))
    mapping = next(m for m in migration.mappings if m.name == "erp_u8_customers")
    staged = stage(migration, "customer", {"raw_erp_u8_customer": extract(migration, mapping)})
    engine = make_engine(sqlite_core_url)
    upgrade(engine)
    load(migration, engine, "run-1", staged)
    batch = staged.batches[0]
    with session_factory(engine)() as session:
        run = session.scalar(sa.select(LoadRun).where(LoadRun.run_key == "run-1"))
        assert run is not None
        clean = verify_batch(session, run, "customer", batch)
        assert run.stats["customer"][0]["keys_missing"] == 0  # what load() recorded
    assert clean["keys_read"] == batch.rows_read and clean["keys_missing"] == 0
    assert clean["spot_checked"] == 25 and clean["spot_mismatches"] == 0

    # Someone edits the core behind the loader's back, and a crosswalk entry is lost.
    first, last = str(batch.records["_external_key"].iloc[0]), str(batch.records["_external_key"].iloc[-1])
    with session_factory(engine)() as session, session.begin():
        run = session.scalar(sa.select(LoadRun).where(LoadRun.run_key == "run-1"))
        entries = {
            x.external_key: x
            for x in session.scalars(sa.select(ExternalId).where(ExternalId.external_key.in_([first, last])))
        }
        customer = session.get(Customer, entries[first].entity_id)
        assert customer is not None
        mapped_name = customer.name
        customer.name = customer.name + "X"
        session.delete(entries[last])
        session.flush()
        assert run is not None
        found = verify_batch(session, run, "customer", batch)
    assert found["keys_missing"] == 1
    assert found["missing_sample"] == [f"Customer:{last}"]
    assert found["spot_mismatches"] == 1
    assert found["spot_sample"] == [
        {
            "key": first,
            "fields": ["name"],
            "mapped": {"name": mapped_name},
            "core": {"name": mapped_name + "X"},
        }
    ]
    line = ReconciliationLine("erp_u8", "customer", 91, 90, 0, 0, 0, None, None, keys_missing=1)
    assert not line.balanced
    engine.dispose()


def test_excel_and_html_reports_escape_formulas_and_hold_rows_to_fix(tmp_path: Path) -> None:
    rejects = pd.DataFrame([
        {"source": "sales_xlsx", "entity": "customer", "location": "sales.xlsx#客户", "row_ref": "7",
         "field": "credit_code", "value": "=HYPERLINK(\"http://evil\")", "rule": "customer.credit_code.check_digit",
         "reason": "credit_code is not a valid 统一社会信用代码", "severity": "error",
         "raw_row": {"客户名称": "@SUM(1+1)", "统一社会信用代码": "=HYPERLINK(\"http://evil\")", "手机": "+8613800138000"}},
        {"source": "sales_xlsx", "entity": "customer", "location": "sales.xlsx#客户", "row_ref": "7",
         "field": "name", "value": "<script>x</script>", "rule": "customer.name.required", "reason": "name is required",
         "severity": "error", "raw_row": {"客户名称": "@SUM(1+1)"}},
        {"source": "sales_xlsx", "entity": "customer", "location": "sales.xlsx#客户", "row_ref": "54", "field": None,
         "value": None, "rule": "subtotal", "reason": "subtotal/total row, not a record", "severity": "error",
         "raw_row": {"客户名称": "合计"}},
    ])  # fmt: skip
    line = ReconciliationLine(
        "sales_xlsx", "customer", 3, 1, 0, 2, 0, Decimal("5.00"), Decimal("5.00"), subtotals=1
    )
    report = ReconciliationReport("run-x", [line], rejects, {"customer": 1})
    paths = write_reports(report, tmp_path)

    workbook = openpyxl.load_workbook(paths["excel"])
    assert workbook.sheetnames == ["Summary", "Rejects", "fix sales_xlsx.customer"]
    rejected_values = [row[5] for row in workbook["Rejects"].iter_rows(min_row=2, values_only=True)]
    assert rejected_values[0] == '\'=HYPERLINK("http://evil")'
    fix = list(workbook["fix sales_xlsx.customer"].iter_rows(values_only=True))
    assert fix[0] == ("客户名称", "统一社会信用代码", "手机", "_location", "_row_ref", "_reasons")
    assert fix[1] == (
        "'@SUM(1+1)", "'=HYPERLINK(\"http://evil\")", "+8613800138000", "sales.xlsx#客户", "7",
        "credit_code: credit_code is not a valid 统一社会信用代码; name: name is required",
    )  # fmt: skip
    assert len(fix) == 2  # the subtotal row is not something to fix

    page = paths["html"].read_text(encoding="utf-8")
    assert "&lt;script&gt;x&lt;/script&gt;" in page and "<script>" not in page
    # One record row sits in quarantine (the subtotal line is not a record): the summary says so.
    assert (
        "Every row is accounted for, but 1 row(s) are quarantined" in page
        and "To fix: sales_xlsx.customer" in page
    )


def _one_reject(value: str, raw: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame([
        {"source": "sales_xlsx", "entity": "customer", "location": "sales.xlsx#客户", "row_ref": "7",
         "field": "remark", "value": value, "rule": "customer.remark.length", "reason": "remark is too long",
         "severity": "error", "raw_row": raw},
    ])  # fmt: skip


def test_excel_cells_that_look_like_rich_text_or_exceed_a_cell_keep_their_row(tmp_path: Path) -> None:
    """Text shaped like XlsxWriter's rich-text markup stays text; an over-long cell is cut, its row complete."""
    rich = "<r>A & B</r>"
    injected = '<r><t>a</t></r></is></c><c r="B1"><f>1+1</f></c><c><is><r><t>b</t></r>'
    long_text = "备注" * 20_000  # 40,000 characters
    rejects = pd.concat([
        _one_reject(rich, {"客户名称": rich, "备注": injected}),
        _one_reject(long_text[:2000], {"客户名称": "腾达", "备注": long_text, "手机": "+8613800138000"}),
    ], ignore_index=True)  # fmt: skip
    rejects.loc[1, "row_ref"] = "8"
    line = ReconciliationLine("sales_xlsx", "customer", 2, 0, 0, 2, 0, None, None)
    paths = write_reports(ReconciliationReport("run-x", [line], rejects, {"customer": 0}), tmp_path)

    workbook = openpyxl.load_workbook(paths["excel"])  # well-formed: it parses
    fix = list(workbook["fix sales_xlsx.customer"].iter_rows(values_only=True))
    header = fix[0]
    first, second = (dict(zip(header, row, strict=True)) for row in fix[1:])
    assert first["客户名称"] == "'" + rich and first["备注"] == "'" + injected
    assert all(not isinstance(cell.value, str) or not cell.value.startswith("=")
               for row in workbook["fix sales_xlsx.customer"].iter_rows() for cell in row)  # fmt: skip
    assert second["备注"].startswith("备注备注") and second["备注"].endswith("32,767 characters]")
    assert len(second["备注"].encode("utf-16-le")) // 2 <= 32_767
    # the cells after the cut one are all there: the row still re-imports under its key
    assert second["手机"] == "+8613800138000" and second["_row_ref"] == "8" and second["_reasons"]


def test_a_sheet_longer_than_excel_allows_says_how_many_rows_it_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from integration import reports

    monkeypatch.setattr(reports, "EXCEL_ROWS", 12)  # header + 10 rows + the note
    rejects = pd.concat([_one_reject(f"v{i}", {"客户名称": f"c{i}"}) for i in range(15)], ignore_index=True)
    rejects["row_ref"] = [str(i) for i in range(15)]
    line = ReconciliationLine("sales_xlsx", "customer", 15, 0, 0, 15, 0, None, None)
    paths = write_reports(ReconciliationReport("run-x", [line], rejects, {"customer": 0}), tmp_path)
    rows = list(openpyxl.load_workbook(paths["excel"])["Rejects"].iter_rows(values_only=True))
    assert len(rows) == 12 and [r[3] for r in rows[1:11]] == [str(i) for i in range(10)]
    note = rows[11][0]
    assert isinstance(note, str) and note.startswith("… 5 more rows")
