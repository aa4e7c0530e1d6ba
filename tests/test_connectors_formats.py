"""Workbook formats other than .xlsx (.xls, .ods), and workbooks that cannot be read (protected, corrupt)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import msoffcrypto.format.ooxml
import pandas as pd
import pytest
import xlwt
from openpyxl import Workbook

from crm_core.errors import ExtractError
from integration.connectors import ExcelConnector, ReadRequest
from integration.connectors.base import LOCATION, ROW_KIND, ROW_REF

# A title row, a blank row, the header on row 3, data with a blank row in between and a total line.
TITLE = "2025年度客户台账"
HEADER = ["客户名称", "电话", "金额", "签约日期"]
DATA: list[list[object] | None] = [
    ["深圳市腾达科技有限公司", "0755-86001234", 120000.0, dt.datetime(2025, 3, 5)],
    None,
    ["ＡＢＣ贸易有限公司", "13800000000", 2.5, dt.datetime(2025, 3, 6)],
    ["合计", None, 120002.5, None],
]


def write_xlsx(path: Path) -> None:
    book = Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.title = "客户"
    sheet.append([TITLE])
    sheet.append([])
    sheet.append(HEADER)
    for row in DATA:
        sheet.append(row or [])
    book.save(path)


def write_xls(path: Path) -> None:
    book = xlwt.Workbook(encoding="utf-8")
    sheet = book.add_sheet("客户")
    date_style = xlwt.easyxf(num_format_str="YYYY-MM-DD")
    sheet.write(0, 0, TITLE)
    for column, label in enumerate(HEADER):
        sheet.write(2, column, label)
    for offset, row in enumerate(DATA):
        for column, value in enumerate(row or []):
            if isinstance(value, dt.datetime):
                sheet.write(3 + offset, column, value, date_style)
            elif value is not None:
                sheet.write(3 + offset, column, value)
    book.save(str(path))


def write_ods(path: Path) -> None:
    rows = [[TITLE, None, None, None], [None] * 4, HEADER, *[row or [None] * 4 for row in DATA]]
    pd.DataFrame(rows).to_excel(path, sheet_name="客户", header=False, index=False, engine="odf")


WRITERS: dict[str, Callable[[Path], None]] = {".xlsx": write_xlsx, ".xls": write_xls, ".ods": write_ods}


@pytest.mark.parametrize("suffix", sorted(WRITERS))
def test_every_workbook_format_reads_the_same_rows_numbers_and_subtotals(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"台账{suffix}"
    WRITERS[suffix](path)
    connector = ExcelConnector("sheets", [path], path.name)
    assert connector.list_tables() == ["客户"]
    assert connector.columns("客户") == HEADER
    [frame] = list(connector.read(ReadRequest("客户")))
    assert list(frame[ROW_REF]) == ["4", "6", "7"]
    assert list(frame[ROW_KIND]) == ["data", "data", "subtotal"]
    assert set(frame[LOCATION]) == {f"台账{suffix}#客户"}
    assert list(frame["客户名称"]) == ["深圳市腾达科技有限公司", "ＡＢＣ贸易有限公司", "合计"]
    assert frame["电话"].tolist()[:2] == ["0755-86001234", "13800000000"] and frame[
        "电话"
    ].isna().tolist() == [False, False, True]
    assert list(frame["金额"]) == [120000, 2.5, 120002.5]
    assert isinstance(frame.loc[0, "金额"], int)
    assert [None if v is None else pd.Timestamp(v).date() for v in frame["签约日期"]] == [
        dt.date(2025, 3, 5),
        dt.date(2025, 3, 6),
        None,
    ]


def test_a_password_protected_workbook_says_so_and_how_to_fix_it(tmp_path: Path) -> None:
    plain, protected = tmp_path / "plain.xlsx", tmp_path / "加密.xlsx"
    write_xlsx(plain)
    with plain.open("rb") as source, protected.open("wb") as target:
        msoffcrypto.format.ooxml.OOXMLFile(source).encrypt("s3cret", target)
    connector = ExcelConnector("sheets", [protected], "加密.xlsx")
    for attempt in (connector.list_tables, lambda: list(connector.read(ReadRequest("客户")))):
        with pytest.raises(ExtractError) as caught:
            attempt()
        assert str(caught.value) == (
            "source 'sheets': cannot open workbook 加密.xlsx: it is password-protected; open it in Excel and "
            "save a copy without a password (File > Info > Protect Workbook > Encrypt with Password: clear "
            "it), then point the source at the copy"
        )


@pytest.mark.parametrize("suffix", [".xlsx", ".xls", ".ods"])
def test_a_corrupt_workbook_is_one_clear_error_naming_the_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"this is not a workbook at all" * 10)
    with pytest.raises(ExtractError) as caught:
        ExcelConnector("sheets", [path], path.name).list_tables()
    message = str(caught.value)
    assert message.startswith(f"source 'sheets': cannot open workbook broken{suffix}: ")
    assert message.endswith("is it a valid, unprotected .xlsx/.xls/.ods? Re-save it from Excel or WPS")


def test_a_sheet_that_vanished_from_an_xls_names_the_sheets_it_has(tmp_path: Path) -> None:
    path = tmp_path / "old.xls"
    write_xls(path)
    with pytest.raises(ExtractError, match=r"workbook old.xls has no sheet '商机'; sheets: 客户$"):
        list(ExcelConnector("sheets", [path], "old.xls").read(ReadRequest("商机")))
