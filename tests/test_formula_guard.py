"""The spreadsheet formula guard: a leading ``'`` on text a spreadsheet would evaluate as a formula that could
call a function or reach outside (OWASP CSV injection), none on a phone number or plain number, and a
re-imported fix sheet loses exactly the guard the report added (found by a newcomer's trial)."""

from __future__ import annotations

import csv
from decimal import Decimal
from pathlib import Path

import pandas as pd
import pytest

from integration.connectors.base import ReadRequest
from integration.connectors.excel import ExcelConnector
from integration.pipeline import ReconciliationLine, ReconciliationReport
from integration.reports import escape_formula, unescape_formula, write_reports

GUARDED = [
    "=1+2",
    "@SUM(1+1)",
    '=HYPERLINK("http://evil")',
    "+cmd|' /C calc'!A0",
    "-2+3+cmd|' /C calc'!A0",
    "+A1",
    "-SUM(A1:A9)",
    "\t=1",
    "\r=1",
    "-",
    "+86-139-0000-0000 ext 5",  # letters after the sign: not only a number
    "-- a note",
    "'=1",  # already starts with a quote: guarded again, so the re-import can tell it from a guard
]
PLAIN = [
    "+86-139-0000-0000",
    "+86 (0)10 1234 5678",
    "+8613800000000",
    "-500",
    "-1,234.50",
    "0571-8888-0000",
    "普通客户",
    "'quoted'",
    "",
]


@pytest.mark.parametrize("value", GUARDED)
def test_text_a_spreadsheet_would_run_gets_a_leading_quote(value: str) -> None:
    assert escape_formula(value) == "'" + value


@pytest.mark.parametrize("value", PLAIN)
def test_a_phone_number_or_plain_number_is_left_alone(value: str) -> None:
    assert escape_formula(value) == value


@pytest.mark.parametrize("value", [*GUARDED, *PLAIN, "'", "''=x", "'+86-139-0000-0000", "'-SUM(A1)"])
def test_the_guard_comes_off_exactly(value: str) -> None:
    assert unescape_formula(escape_formula(value)) == value


def fix_sheet_report() -> ReconciliationReport:
    """One rejected row whose columns hold a formula, a phone number, a quoted text and an amount."""
    raw_row = {"客户名称": "@SUM(1+1)", "电话": "+86-139-0000-0000", "备注": "'=引用", "说明": "'quoted'",
               "金额": 50000, "编号": "K-1"}  # fmt: skip
    rejects = pd.DataFrame([
        {"source": "sales_xlsx", "entity": "customer", "location": "sales.xlsx#客户", "row_ref": "7",
         "field": "name", "value": "@SUM(1+1)", "rule": "customer.name.check", "reason": "bad name",
         "severity": "error", "raw_row": raw_row},
    ])  # fmt: skip
    line = ReconciliationLine("sales_xlsx", "customer", 1, 0, 0, 1, 0, Decimal(5), None)
    return ReconciliationReport("r1", [line], rejects, {})


def test_the_reports_guard_a_formula_and_leave_a_phone_number(tmp_path: Path) -> None:
    paths = write_reports(fix_sheet_report(), tmp_path)
    with paths["rejects_csv"].open(encoding="utf-8-sig", newline="") as stream:
        [row] = list(csv.DictReader(stream))
    assert row["value"] == "'@SUM(1+1)"
    frame = pd.read_excel(paths["excel"], sheet_name="fix sales_xlsx.customer", dtype=object)
    assert frame.loc[0, "客户名称"] == "'@SUM(1+1)" and frame.loc[0, "电话"] == "+86-139-0000-0000"
    assert frame.loc[0, "备注"] == "''=引用"


def test_a_re_imported_fix_sheet_reads_each_value_as_it_was_rejected(tmp_path: Path) -> None:
    paths = write_reports(fix_sheet_report(), tmp_path)
    connector = ExcelConnector("fixes", [paths["excel"]], str(paths["excel"]))
    [chunk] = list(connector.read(ReadRequest("fix sales_xlsx.customer")))
    row = chunk.iloc[0]
    assert row["客户名称"] == "@SUM(1+1)" and row["电话"] == "+86-139-0000-0000"
    assert row["备注"] == "'=引用" and row["说明"] == "'quoted'" and row["金额"] == 50000
    assert (row["_location"], row["_row_ref"]) == ("sales.xlsx#客户", "7")


def test_a_workbook_that_is_no_fix_sheet_keeps_its_quotes(tmp_path: Path) -> None:
    # A customer's own workbook may hold text that starts with a quote: only a fix sheet's guard comes off.
    path = tmp_path / "own.xlsx"
    pd.DataFrame({"客户名称": ["'@SUM(1+1)", "甲"], "电话": ["1", "2"]}).to_excel(
        path, sheet_name="客户", index=False
    )
    [chunk] = list(ExcelConnector("own", [path], str(path)).read(ReadRequest("客户")))
    assert chunk["客户名称"].tolist() == ["'@SUM(1+1)", "甲"]
