"""The first rows and the merged cells of an .xlsx sheet, read from its XML without parsing the whole sheet.

Header detection needs the top 30 rows with their cell types (text or not). calamine parses the whole
sheet before it returns a single row, so asking it for the head of a 500,000-row sheet costs as much
as reading the sheet; streaming the sheet's XML and stopping after the head costs milliseconds.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path, PurePosixPath
from typing import Any
from xml.etree.ElementTree import Element, iterparse

_MAIN = "{http://schemas.openxmlformats.org/spreadsheetml/2006/main}"
_REL = "{http://schemas.openxmlformats.org/officeDocument/2006/relationships}"
_PKG_REL = "{http://schemas.openxmlformats.org/package/2006/relationships}"
_CELL_REF = re.compile(r"([A-Z]+)(\d+)")
_MERGE = re.compile(rb'<(?:\w+:)?mergeCell\s+ref="([A-Z]+\d+):([A-Z]+\d+)"')

MergedRange = tuple[
    tuple[int, int], tuple[int, int]
]  # ((first row, first col), (last row, last col)), 0-based


def _column_index(letters: str) -> int:
    index = 0
    for letter in letters:
        index = index * 26 + ord(letter) - 64
    return index - 1


def _position(reference: str) -> tuple[int, int]:
    match = _CELL_REF.fullmatch(reference)
    if match is None:
        raise ValueError(f"bad cell reference {reference!r}")
    return int(match.group(2)) - 1, _column_index(match.group(1))


def sheet_members(book: zipfile.ZipFile) -> dict[str, str]:
    """Return sheet name → the sheet's XML member in the package, in workbook order."""
    with book.open("xl/_rels/workbook.xml.rels") as stream:
        relations = {
            rel.get("Id"): rel.get("Target", "")
            for _, rel in iterparse(stream)
            if rel.tag == f"{_PKG_REL}Relationship"
        }
    members: dict[str, str] = {}
    with book.open("xl/workbook.xml") as stream:
        for _, element in iterparse(stream):
            if element.tag == f"{_MAIN}sheet":
                target = relations.get(element.get(f"{_REL}id"), "")
                members[element.get("name", "")] = (
                    target.lstrip("/") if target.startswith("/") else str(PurePosixPath("xl") / target)
                )
    return members


def _text(element: Element) -> str:
    # Plain <t>, or rich-text runs <r><t> concatenated; phonetic guides (<rPh>) are not part of the value.
    plain = element.find(f"{_MAIN}t")
    if plain is not None:
        return plain.text or ""
    return "".join(run.findtext(f"{_MAIN}t") or "" for run in element.findall(f"{_MAIN}r"))


class _SharedStrings:
    """The workbook's shared strings, parsed only as far as the highest index asked for."""

    def __init__(self, book: zipfile.ZipFile) -> None:
        has_table = "xl/sharedStrings.xml" in book.namelist()
        self._stream = book.open("xl/sharedStrings.xml") if has_table else None
        self._items: Iterator[tuple[str, Element]] = (
            iterparse(self._stream) if self._stream is not None else iter(())
        )
        self._strings: list[str] = []

    def close(self) -> None:
        """Close the member read so far: left open, it would keep the workbook's file open after the package."""
        if self._stream is not None:
            self._stream.close()

    def __getitem__(self, index: int) -> str:
        for _, element in self._items:
            if len(self._strings) > index:
                break
            if element.tag == f"{_MAIN}si":
                self._strings.append(_text(element))
                element.clear()
        return self._strings[index] if index < len(self._strings) else ""


def _value(cell: Element, strings: _SharedStrings) -> Any:
    kind = cell.get("t", "n")
    if kind == "inlineStr":
        inline = cell.find(f"{_MAIN}is")
        return _text(inline) if inline is not None else None
    raw = cell.findtext(f"{_MAIN}v")
    if raw is None:
        return None
    if kind == "s":
        return strings[int(raw)]
    if kind == "str":
        return raw
    if kind == "b":
        return raw == "1"
    if kind == "e":
        return None  # an error value (#DIV/0!) reads as empty, as calamine reads it
    try:
        return float(raw)  # numbers and dates (a date is a number with a date format): not text
    except ValueError:
        return raw


def head_rows(path: Path, member: str, count: int) -> list[list[Any]]:
    """Return the sheet's first ``count`` rows (from row 1, column A; missing cells None)."""
    rows: list[list[Any]] = []
    with zipfile.ZipFile(path) as book, closing(_SharedStrings(book)) as strings, book.open(member) as stream:
        for _, element in iterparse(stream):
            if element.tag != f"{_MAIN}row":
                continue
            number = int(element.get("r", len(rows) + 1)) - 1
            if number >= count:
                break
            while len(rows) <= number:
                rows.append([])
            row = rows[number]
            for position, cell in enumerate(element.iter(f"{_MAIN}c")):
                column = _position(cell.get("r", ""))[1] if cell.get("r") else position
                row.extend([None] * (column + 1 - len(row)))
                row[column] = _value(cell, strings)
            element.clear()
    width = max((len(r) for r in rows), default=0)
    return [[*row, *[None] * (width - len(row))] for row in rows]


def merged_ranges(path: Path, member: str) -> list[MergedRange]:
    """Return the sheet's merged cell ranges (they follow the cell data, so the whole member is read)."""
    with zipfile.ZipFile(path) as book:
        data = book.read(member)
    start = data.rfind(b"</sheetData>")
    return [(_position(a.decode()), _position(b.decode())) for a, b in _MERGE.findall(data, max(start, 0))]
