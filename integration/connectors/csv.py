"""CSV exports (often GBK from Chinese Excel or ERP exports): a glob of files, read in chunks."""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from crm_core.errors import ExtractError
from integration.connectors.base import LOCATION, ROW_KIND, ROW_REF, ReadRequest, filter_chunks


class CsvConnector:
    """Delimited text files matched by a glob: the table is every file, or the one a lookup names."""

    def __init__(
        self, name: str, paths: list[Path], pattern: str, *, encoding: str = "utf-8", delimiter: str = ","
    ) -> None:
        self.name = name
        self.paths = paths
        self.pattern = pattern
        self.require_files = True  # False once restricted to new files: none left is then fine
        self.encoding = encoding
        self.delimiter = delimiter

    def describe(self) -> str:
        """Return the glob, encoding and how many files it matches."""
        return f"csv:{self.pattern} ({self.encoding}, {len(self.paths)} file(s))"

    def _files(self) -> list[Path]:
        if not self.paths and self.require_files:
            raise ExtractError(self.name, f"no file matches {self.pattern}; check the path in project.yaml")
        return self.paths

    def _undecodable(self, path: Path, exc: UnicodeDecodeError) -> ExtractError:
        byte = exc.object[exc.start : exc.start + 1].hex() if isinstance(exc.object, bytes) else "?"
        hint = (
            "gb18030 (Chinese Windows/Excel exports)"
            if codecs.lookup(self.encoding).name == "utf-8"
            else "utf-8 or gb18030"
        )
        return ExtractError(
            self.name,
            f"{path.name} is not valid {self.encoding} (byte 0x{byte} at offset {exc.start}); "
            f"set encoding: {hint} for this source in project.yaml",
        )

    def _table_files(self, table: str) -> list[Path]:
        """Return the files of ``table``: the one named so (``rates`` or ``rates.csv``), else every file.

        A mapping's own table is a label for all matched files; a lookup names one file of the source.
        """
        named = [p for p in self._files() if table in (p.name, p.stem)]
        return named or self._files()

    def list_tables(self) -> list[str]:
        """Return the file names."""
        return [p.name for p in self._files()]

    def columns(self, table: str, header_row: int | None = None) -> list[str]:
        """Return the header of the first file."""
        path = self._table_files(table)[0]
        try:
            head = pd.read_csv(
                path, nrows=0, encoding=self.encoding, sep=self.delimiter, header=(header_row or 1) - 1
            )
        except UnicodeDecodeError as exc:
            raise self._undecodable(path, exc) from None
        return [" ".join(str(c).split()) for c in head.columns]

    def read(self, request: ReadRequest) -> Iterator[pd.DataFrame]:
        """Yield rows of every file in chunks (``where`` applied); ``_row_ref`` is the line number in the file."""
        return filter_chunks(self._read(request), request.where, self.name, request.table)

    def _read(self, request: ReadRequest) -> Iterator[pd.DataFrame]:
        for path in self._table_files(request.table):
            header_line = request.header_row or 1
            line = header_line
            try:
                reader = pd.read_csv(
                    path, encoding=self.encoding, sep=self.delimiter, header=header_line - 1, dtype=str,
                    keep_default_na=False, chunksize=request.chunk_rows, skip_blank_lines=False,
                )  # fmt: skip
                for chunk in reader:
                    chunk.columns = [" ".join(str(c).split()) for c in chunk.columns]
                    numbers = range(line + 1, line + len(chunk) + 1)
                    line += len(chunk)
                    chunk = chunk.replace("", None)
                    chunk[ROW_REF] = [str(n) for n in numbers]
                    chunk[LOCATION] = path.name
                    chunk[ROW_KIND] = "data"
                    blank = chunk.drop(columns=[ROW_REF, LOCATION, ROW_KIND]).isna().all(axis=1)
                    yield chunk.loc[~blank].reset_index(drop=True)
            except UnicodeDecodeError as exc:
                raise self._undecodable(path, exc) from None
            except pd.errors.ParserError as exc:
                raise ExtractError(self.name, f"{path.name} is not readable as CSV: {exc}") from None
