"""Spreadsheets through python-calamine: header detection, several files, subtotal rows flagged."""

from __future__ import annotations

import datetime as dt
import itertools
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
from python_calamine import CalamineWorkbook

from crm_core.errors import ExtractError
from integration.connectors.base import LOCATION, ROW_KIND, ROW_REF, ReadRequest

HEADER_SCAN_ROWS = 30
_SUBTOTAL = re.compile(r"^(合计|小计|总计|共计|total|subtotal|grand total|sum)\b", re.IGNORECASE)


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _header_name(value: Any) -> str:
    return " ".join(unicodedata.normalize("NFKC", str(value)).split())


def detect_header_row(rows: list[list[Any]]) -> int:
    """Return the 0-based index of the header: the first row of text labels at least half as wide as the data."""
    widths = [sum(not _blank(v) for v in row) for row in rows[:HEADER_SCAN_ROWS]]
    widest = max(widths, default=0)
    for index, row in enumerate(rows[:HEADER_SCAN_ROWS]):
        filled = [v for v in row if not _blank(v)]
        if len(filled) >= max(2, (widest + 1) // 2) and all(isinstance(v, str) for v in filled):
            return index
    return 0


def is_subtotal(row: list[Any]) -> bool:
    """Return True when a row is a subtotal/total line (合计, 小计, Total…) rather than data."""
    for value in row:
        if isinstance(value, str) and value.strip():
            return bool(_SUBTOTAL.match(unicodedata.normalize("NFKC", value).strip()))
    return False


class ExcelConnector:
    """Workbooks matched by a path or glob; every row keeps file, sheet and row number."""

    def __init__(self, name: str, paths: list[Path], pattern: str) -> None:
        self.name = name
        self.paths = paths
        self.pattern = pattern

    def describe(self) -> str:
        """Return the glob and how many workbooks it matches."""
        return f"excel:{self.pattern} ({len(self.paths)} file(s))"

    def _workbooks(self) -> list[Path]:
        if not self.paths:
            raise ExtractError(
                self.name, f"no workbook matches {self.pattern}; check the path in project.yaml"
            )
        return self.paths

    def _open(self, path: Path) -> CalamineWorkbook:
        try:
            return CalamineWorkbook.from_path(str(path))
        except Exception as exc:  # calamine raises its own error types per format
            raise ExtractError(
                self.name,
                f"cannot open workbook {path.name}: {exc}; is it a valid, unprotected .xlsx/.xls/.ods?",
            ) from None

    def list_tables(self) -> list[str]:
        """Return the sheet names across all matched workbooks (in order, without repeats)."""
        names: list[str] = []
        for path in self._workbooks():
            names.extend(n for n in self._open(path).sheet_names if n not in names)
        return names

    def _rows(self, path: Path, sheet: str) -> list[list[Any]]:
        workbook = self._open(path)
        if sheet not in workbook.sheet_names:
            raise ExtractError(
                self.name,
                f"workbook {path.name} has no sheet '{sheet}'; sheets: {', '.join(workbook.sheet_names)}",
            )
        return [list(r) for r in workbook.get_sheet_by_name(sheet).to_python(skip_empty_area=False)]

    def columns(self, table: str, header_row: int | None = None) -> list[str]:
        """Return the header labels of ``table`` (a sheet) in the first workbook."""
        rows = self._rows(self._workbooks()[0], table)
        index = header_row - 1 if header_row else detect_header_row(rows)
        return [_header_name(v) for v in rows[index] if not _blank(v)] if rows else []

    def _row_iter(self, path: Path, sheet: str) -> Iterator[list[Any]]:
        workbook = self._open(path)
        if sheet not in workbook.sheet_names:
            raise ExtractError(
                self.name,
                f"workbook {path.name} has no sheet '{sheet}'; sheets: {', '.join(workbook.sheet_names)}",
            )
        # iter_rows hands rows to Python one at a time: memory follows the chunk size, not the sheet.
        for row in workbook.get_sheet_by_name(sheet).iter_rows():
            yield list(row)

    def read(self, request: ReadRequest) -> Iterator[pd.DataFrame]:
        """Yield the sheet's data rows from every workbook, in chunks, blank rows skipped."""
        for path in self._workbooks():
            rows = self._row_iter(path, request.table)
            head = list(itertools.islice(rows, HEADER_SCAN_ROWS))
            if not head:
                continue
            header_index = request.header_row - 1 if request.header_row else detect_header_row(head)
            header = [_header_name(v) if not _blank(v) else "" for v in head[header_index]]
            keep = [i for i, label in enumerate(header) if label]
            labels = [header[i] for i in keep]
            columns = [*labels, ROW_REF, LOCATION, ROW_KIND]
            location = f"{path.name}#{request.table}"
            records: list[list[Any]] = []
            data_rows = itertools.chain(head[header_index + 1 :], rows)
            for number, row in enumerate(data_rows, start=header_index + 2):
                if all(_blank(v) for v in row):
                    continue
                values = [_cell(row[i]) if i < len(row) else None for i in keep]
                records.append([*values, str(number), location, "subtotal" if is_subtotal(row) else "data"])
                if len(records) >= request.chunk_rows:
                    yield pd.DataFrame.from_records(records, columns=columns)
                    records = []
            if records:
                yield pd.DataFrame.from_records(records, columns=columns)


def _cell(value: Any) -> Any:
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)  # calamine reads every number as float; keep codes like 1001 intact
    if isinstance(value, dt.time):
        return value.isoformat()
    return value
