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
from python_calamine import CalamineSheet, CalamineWorkbook

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


MergedRange = tuple[
    tuple[int, int], tuple[int, int]
]  # ((first row, first col), (last row, last col)), 0-based


def header_labels(
    rows: list[list[Any]], header_index: int, merged: list[MergedRange] | None
) -> tuple[list[str], int]:
    """Return the column labels and how many rows the header spans (1, or 2 under merged group titles).

    ``联系人`` merged over two columns with ``姓名`` / ``手机`` below gives ``联系人姓名``, ``联系人手机``;
    cells merged vertically across both header rows keep their one label.
    """
    top = rows[header_index]
    groups = [m for m in merged or () if m[0][0] == header_index == m[1][0] and m[1][1] > m[0][1]]
    below = rows[header_index + 1] if header_index + 1 < len(rows) else []
    if not groups or not all(
        isinstance(below[c], str) and below[c].strip()
        for (_, c0), (_, c1) in groups
        for c in range(c0, c1 + 1)
        if c < len(below)
    ):
        return [_header_name(v) if not _blank(v) else "" for v in top], 1
    labels = []
    for column in range(max(len(top), len(below))):
        group = next((g for g in groups if g[0][1] <= column <= g[1][1]), None)
        child = _header_name(below[column]) if column < len(below) and not _blank(below[column]) else ""
        if group is not None:
            parent = _header_name(top[group[0][1]])
            labels.append(
                parent + (" " if parent.isascii() and child.isascii() else "") + child if child else parent
            )
        else:
            own = _header_name(top[column]) if column < len(top) and not _blank(top[column]) else ""
            labels.append(own or child)
    return labels, 2


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
        self.require_files = True  # False once restricted to new files: none left is then fine

    def describe(self) -> str:
        """Return the glob and how many workbooks it matches."""
        return f"excel:{self.pattern} ({len(self.paths)} file(s))"

    def _workbooks(self) -> list[Path]:
        if not self.paths and self.require_files:
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

    def _sheet(self, path: Path, sheet: str) -> CalamineSheet:
        workbook = self._open(path)
        if sheet not in workbook.sheet_names:
            raise ExtractError(
                self.name,
                f"workbook {path.name} has no sheet '{sheet}'; sheets: {', '.join(workbook.sheet_names)}",
            )
        return workbook.get_sheet_by_name(sheet)

    def _header(
        self, sheet: CalamineSheet, header_row: int | None
    ) -> tuple[list[str], int, Iterator[list[Any]]]:
        """Return the labels, the first data row's 0-based index, and the rows after the scanned head."""
        # iter_rows hands rows to Python one at a time: memory follows the chunk size, not the sheet.
        rows = (list(row) for row in sheet.iter_rows())
        head = list(itertools.islice(rows, HEADER_SCAN_ROWS))
        if not head:
            return [], 0, rows
        index = header_row - 1 if header_row else detect_header_row(head)
        merged = list(sheet.merged_cell_ranges or []) or None
        labels, header_rows = header_labels(head, index, merged)
        return labels, index + header_rows, itertools.chain(head[index + header_rows :], rows)

    def columns(self, table: str, header_row: int | None = None) -> list[str]:
        """Return the header labels of ``table`` (a sheet) in the first workbook."""
        labels, _, _ = self._header(self._sheet(self._workbooks()[0], table), header_row)
        return [label for label in labels if label]

    def read(self, request: ReadRequest) -> Iterator[pd.DataFrame]:
        """Yield the sheet's data rows from every workbook, in chunks, blank rows skipped."""
        for path in self._workbooks():
            header, first_data, data_rows = self._header(self._sheet(path, request.table), request.header_row)
            keep = [i for i, label in enumerate(header) if label]
            labels = [header[i] for i in keep]
            columns = [*labels, ROW_REF, LOCATION, ROW_KIND]
            location = f"{path.name}#{request.table}"
            records: list[list[Any]] = []
            for number, row in enumerate(data_rows, start=first_data + 1):
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
