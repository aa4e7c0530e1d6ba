"""Spreadsheets: header detection, several files, subtotal rows flagged.

The data is read by fastexcel (calamine into Arrow, no Python object per cell); the header is found on
the first rows, streamed from the sheet XML for .xlsx/.xlsm (see ``ooxml``) and read by python-calamine
for .xls/.xlsb/.ods.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastexcel
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from python_calamine import CalamineWorkbook

from crm_core.errors import ExtractError
from integration.connectors import ooxml
from integration.connectors.base import LOCATION, ROW_KIND, ROW_REF, TEXT_DTYPE, ReadRequest, filter_chunks
from integration.connectors.ooxml import MergedRange
from integration.reports import unescape_formula

# The columns a fix sheet of the reconciliation report carries beside the source's (integration.reports.fix_sheets):
# a sheet with all three is one, and the formula guard the report put on its text comes off.
FIX_SHEET_COLUMNS = (LOCATION, ROW_REF, "_reasons")

HEADER_SCAN_ROWS = 30
_SUBTOTAL = re.compile(r"^(合计|小计|总计|共计|total|subtotal|grand total|sum)\b", re.IGNORECASE)
# Cheap vectorized pre-filter for _SUBTOTAL: the first letters a subtotal label can start with, in
# either width (the exact test, after NFKC, runs only on the rows that pass).
_SUBTOTAL_START = r"^\s*[合小总共tsgTSGｔｓｇＴＳＧ]"
_OOXML = {".xlsx", ".xlsm"}
_ENCRYPTED_MAGIC = (
    b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"  # an OLE container: how encrypted .xlsx files are stored
)
_PROTECTED_HINT = (
    "it is password-protected; open it in Excel and save a copy without a password "
    "(File > Info > Protect Workbook > Encrypt with Password: clear it), then point the source at the copy"
)


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


@dataclass(frozen=True)
class SheetLayout:
    """Where a sheet's header is and what its columns are called."""

    labels: dict[int, str]  # 0-based sheet column (A = 0) -> label, for labelled columns only
    last_header_row: int  # 0-based sheet row of the header's last row; data starts below it
    # labelled columns without a value in the scanned rows below the header (perhaps empty throughout)
    blank_below_header: tuple[int, ...] = ()

    def ordered_labels(self) -> list[str]:
        """Return the labels left to right."""
        return [self.labels[column] for column in sorted(self.labels)]


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

    def _cannot_open(self, path: Path, exc: Exception) -> ExtractError:
        with path.open("rb") as stream:
            encrypted = stream.read(8) == _ENCRYPTED_MAGIC and path.suffix.lower() in _OOXML
        if encrypted or "password" in str(exc).lower() or "encrypt" in str(exc).lower():
            return ExtractError(self.name, f"cannot open workbook {path.name}: {_PROTECTED_HINT}")
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return ExtractError(
            self.name,
            f"cannot open workbook {path.name}: {detail}; is it a valid, unprotected .xlsx/.xls/.ods? "
            "Re-save it from Excel or WPS",
        )

    def _open(self, path: Path) -> fastexcel.ExcelReader:
        try:
            return fastexcel.read_excel(str(path))
        except Exception as exc:  # calamine raises its own error types per format
            raise self._cannot_open(path, exc) from None

    def list_tables(self) -> list[str]:
        """Return the sheet names across all matched workbooks (in order, without repeats)."""
        names: list[str] = []
        for path in self._workbooks():
            names.extend(n for n in self._open(path).sheet_names if n not in names)
        return names

    def _check_sheet(self, path: Path, reader: fastexcel.ExcelReader, sheet: str) -> None:
        if sheet not in reader.sheet_names:
            raise ExtractError(
                self.name,
                f"workbook {path.name} has no sheet '{sheet}'; sheets: {', '.join(reader.sheet_names)}",
            )

    def _head(self, path: Path, sheet: str) -> tuple[list[list[Any]], Any]:
        """Return the sheet's first rows (from A1) and a callable giving its merged ranges."""
        try:
            if path.suffix.lower() in _OOXML:
                with zipfile.ZipFile(path) as book:
                    member = ooxml.sheet_members(book)[sheet]
                return ooxml.head_rows(path, member, HEADER_SCAN_ROWS), lambda: ooxml.merged_ranges(
                    path, member
                )
            calamine_sheet = CalamineWorkbook.from_path(str(path)).get_sheet_by_name(sheet)
        except ExtractError:
            raise
        except Exception as exc:
            raise self._cannot_open(path, exc) from None
        # python-calamine starts rows at row 1 but columns at the first used column.
        pad = [None] * calamine_sheet.start[1] if calamine_sheet.start else []
        head = [
            [*pad, *(None if v == "" else v for v in row)]
            for row in itertools.islice(calamine_sheet.iter_rows(), HEADER_SCAN_ROWS)
        ]
        return head, lambda: list(calamine_sheet.merged_cell_ranges or [])

    def layout(self, path: Path, sheet: str, header_row: int | None = None) -> SheetLayout:
        """Find the header of ``sheet`` in ``path`` (explicit 1-based ``header_row``, or detected)."""
        self._check_sheet(path, self._open(path), sheet)
        head, merges = self._head(path, sheet)
        if not head:
            return SheetLayout({}, -1)
        index = header_row - 1 if header_row else detect_header_row(head)
        below = [v for v in head[index + 1] if not _blank(v)] if index + 1 < len(head) else []
        # A second header row is possible only under text labels; only then are the merges needed.
        merged = merges() if below and all(isinstance(v, str) for v in below) else None
        labels, header_rows = header_labels(head, index, merged)
        labelled = {column: label for column, label in enumerate(labels) if label}
        last = index + header_rows - 1
        blank = tuple(
            c for c in sorted(labelled) if all(c >= len(row) or _blank(row[c]) for row in head[last + 1 :])
        )
        return SheetLayout(labelled, last, blank)

    def columns(self, table: str, header_row: int | None = None) -> list[str]:
        """Return the header labels of ``table`` (a sheet) in the first workbook."""
        return self.layout(self._workbooks()[0], table, header_row).ordered_labels()

    def read(self, request: ReadRequest) -> Iterator[pd.DataFrame]:
        """Yield the sheet's data rows from every workbook, in chunks, blank rows skipped, ``where`` applied."""
        return filter_chunks(self._read(request), request.where, self.name, request.table)

    def _read(self, request: ReadRequest) -> Iterator[pd.DataFrame]:
        for path in self._workbooks():
            layout = self.layout(path, request.table, request.header_row)
            data, sheet_columns = self._load(path, request.table, layout)
            location = f"{path.name}#{request.table}"
            # Row numbers before blank rows are dropped: data row i sits on sheet row last_header_row + 2 + i.
            numbers = np.arange(data.num_rows) + layout.last_header_row + 2
            filled = _any_filled(data)
            data, numbers = data.filter(filled), numbers[np.asarray(filled)]
            keep = [i for i, column in enumerate(sheet_columns) if column in layout.labels]
            labels = [layout.labels[sheet_columns[i]] for i in keep]
            fix_sheet = set(FIX_SHEET_COLUMNS) <= set(labels)
            for start in range(0, data.num_rows, request.chunk_rows):
                part = data.slice(start, request.chunk_rows)
                subtotal = _subtotal_rows(part)
                frame = pd.DataFrame({f"c{n}": _python_values(part.column(i)) for n, i in enumerate(keep)})
                frame.columns = pd.Index(labels)
                # A fix sheet of the reconciliation report names each row's original location and row:
                # they are kept, so a corrected row comes back as the source row it replaces.
                frame[ROW_REF] = _kept(
                    frame, ROW_REF, numbers[start : start + request.chunk_rows].astype(str)
                )
                frame[LOCATION] = _kept(frame, LOCATION, location)
                frame[ROW_KIND] = np.where(subtotal, "subtotal", "data")
                if fix_sheet:
                    _unguarded(frame, labels)
                yield frame

    def _load(self, path: Path, sheet: str, layout: SheetLayout) -> tuple[pa.RecordBatch, list[int]]:
        """Read the rows below the header into Arrow; return them with each column's sheet column index.

        fastexcel guesses each column's type from its values. Only labelled columns are read (one without
        a header, under a merged title row or merely formatted, is dropped anyway), and a labelled column
        with no value at all is declared text, the type fastexcel would fall back to: nothing is guessed
        from no values (fastexcel would log "Could not determine dtype for column N" to the consultant).
        """
        header_row = layout.last_header_row if layout.last_header_row >= 0 else None
        try:
            reader = self._open(path)
            empty = self._empty_columns(reader, sheet, header_row, layout.blank_below_header)
            loaded = reader.load_sheet(
                sheet,
                header_row=header_row,
                # Every row decides a column's type: with a sample, a text cell after the sampled rows
                # of a numeric column would silently read as empty.
                schema_sample_rows=None,
                whitespace_as_null=True,
                use_columns=sorted(layout.labels) or None,
                dtypes=dict.fromkeys(empty, "string") or None,
            )
            return loaded.to_arrow(), [c.absolute_index for c in loaded.selected_columns]
        except Exception as exc:
            raise ExtractError(self.name, f"cannot read sheet '{sheet}' of {path.name}: {exc}") from None

    @staticmethod
    def _empty_columns(
        reader: fastexcel.ExcelReader, sheet: str, header_row: int | None, candidates: tuple[int, ...]
    ) -> list[int]:
        """Return the ``candidates`` (blank in the scanned rows) that have no value further down either."""
        if not candidates:
            return []
        probe = reader.load_sheet(
            sheet,
            header_row=header_row,
            whitespace_as_null=True,
            use_columns=list(candidates),
            dtypes="string",  # declared: read as they are, nothing guessed
        ).to_arrow()
        return [
            c for c, column in zip(candidates, probe.columns, strict=True) if column.null_count == len(column)
        ]


def _unguarded(frame: pd.DataFrame, columns: list[str]) -> None:
    """Take off the quote the report put before text a spreadsheet would run (``'@SUM(…)``), in place.

    Only that quote: text that began with a quote in the source keeps it (:func:`unescape_formula`).
    """
    for column in dict.fromkeys(columns):
        values = frame[column]
        if not (isinstance(values.dtype, pd.ArrowDtype) or values.dtype == object):
            continue
        quoted = values.map(lambda v: isinstance(v, str) and v.startswith("'")).astype(bool)
        if quoted.any():
            unquoted = values.astype(object).where(~quoted, values[quoted].map(unescape_formula))
            frame[column] = unquoted.astype(values.dtype)


def _kept(frame: pd.DataFrame, column: str, default: np.ndarray | str) -> pd.Series:
    """Return the sheet's own ``column`` as text where filled, else ``default`` (a row number or location)."""
    fallback = pd.Series(default, index=frame.index, dtype=object)
    if column not in frame.columns:
        return fallback
    given = frame[column].astype(object)
    text = pd.Series(
        [None if v is None or v is pd.NA or v != v or not str(v).strip() else str(v).strip() for v in given],
        index=frame.index,
        dtype=object,
    )
    return text.where(text.notna(), fallback)


def _any_filled(data: pa.RecordBatch) -> pa.Array:
    """Return a mask of rows with at least one non-empty cell."""
    if data.num_columns == 0:
        return pa.array([False] * data.num_rows)
    filled = pc.is_valid(data.column(0))
    for column in data.columns[1:]:
        filled = pc.or_(filled, pc.is_valid(column))
    return filled


def _subtotal_rows(part: pa.RecordBatch) -> np.ndarray:
    """Return a mask of subtotal rows: the row's first text cell reads 合计, 小计, Total…"""
    first: pa.Array | None = None
    for column in part.columns:
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            first = column if first is None else pc.coalesce(first, column)
    if first is None:
        return np.zeros(part.num_rows, dtype=bool)
    candidates = pc.fill_null(pc.match_substring_regex(first, _SUBTOTAL_START), False)
    mask = np.asarray(candidates.to_numpy(zero_copy_only=False), dtype=bool)
    for row in np.flatnonzero(mask):
        mask[row] = is_subtotal([first[row].as_py()])
    return mask


def _python_values(column: pa.Array) -> pd.Series:
    """Convert an Arrow column to Python values: whole numbers as int, times as ``HH:MM:SS``, nulls as None."""
    if pa.types.is_floating(column.type):
        values = column.to_numpy(zero_copy_only=False)
        result = values.astype(object)
        whole = np.isfinite(values) & (np.floor(values) == values) & (np.abs(values) < 2**53)
        result[whole] = values[whole].astype(np.int64).tolist()  # calamine reads 1001 as 1001.0
        result[np.isnan(values)] = None
        return pd.Series(result, dtype=object)
    if pa.types.is_timestamp(column.type):
        stamps = pd.Series(column.to_pandas(), dtype=object)
        missing = column.is_null().to_numpy(zero_copy_only=False)
        times = ~missing & (pc.year(column).fill_null(0).to_numpy() == 1899)  # a time-only cell
        stamps[times] = [t.time().isoformat() for t in stamps[times]]
        stamps[missing] = None
        return stamps
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        # Text stays in Arrow (pandas string[pyarrow]): the mapping kernels read it without a copy.
        return pd.Series(
            pd.arrays.ArrowExtensionArray(pc.cast(column, pa.string())), dtype=TEXT_DTYPE, copy=False
        )
    return pd.Series(column.to_pandas(), dtype=object)  # booleans; nulls arrive as None
