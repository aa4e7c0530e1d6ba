"""The contract every connector implements, and the frame layout it hands to the mapping engine."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import pandas as pd
import pyarrow as pa

# Metadata columns every extracted chunk carries next to the source's own columns.
ROW_REF = "_row_ref"  # row number (spreadsheets) or source key (databases)
LOCATION = "_location"  # file#sheet or table
ROW_KIND = "_row_kind"  # "data" or "subtotal"
META_COLUMNS = (ROW_REF, LOCATION, ROW_KIND)

DEFAULT_CHUNK_ROWS = 50_000


@dataclass(frozen=True)
class ReadRequest:
    """What to read: a table or sheet, an optional filter, the key columns and the chunk size."""

    table: str  # table or sheet name; a label when ``query`` is given
    where: str | None = (
        None  # expression language (integration.mappings.expressions); SQL sources push it down
    )
    query: str | None = None  # SQL sources: a SELECT to run instead of reading ``table``
    key: Sequence[str] = field(default_factory=tuple)
    header_row: int | None = None  # spreadsheets: 1-based header row; None detects it
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    cursor_column: str | None = None  # incremental reads: rows ordered by this column ...
    cursor_from: Any = None  # ... starting at this value (inclusive; the caller drops rows it already has)


def tag_rows(chunk: pd.DataFrame, key: Sequence[str], location: str, offset: int) -> pd.DataFrame:
    """Add ``_row_ref`` (the key values joined by ``|``, or the row position after ``offset``), ``_location``, ``_row_kind``."""
    if key:
        refs = chunk[key[0]].astype(str)
        for column in key[1:]:
            refs = refs + "|" + chunk[column].astype(str)
        chunk[ROW_REF] = refs
    else:
        chunk[ROW_REF] = [str(i) for i in range(offset + 1, offset + len(chunk) + 1)]
    chunk[LOCATION] = location
    chunk[ROW_KIND] = "data"
    return chunk


def filter_chunks(
    chunks: Iterable[pd.DataFrame], where: str | None, source: str, table: str
) -> Iterator[pd.DataFrame]:
    """Keep the rows of ``chunks`` where the ``where`` expression holds (for sources SQL cannot filter).

    The same expression language as the mapping's other expressions, evaluated vectorized on each chunk;
    rows numbers (``_row_ref``) are those of the source, so a filtered sheet still points at the right row.
    """
    if not where:
        yield from chunks
        return
    from crm_core.errors import ExtractError
    from integration.mappings.expressions import ExpressionError, filter_frame, parse

    try:
        expression = parse(where, condition=True)
    except ExpressionError as exc:
        raise ExtractError(source, f"where of {table}: {exc.message}") from None
    for chunk in chunks:
        missing = [c for c in expression.columns if c not in chunk.columns]
        if missing:
            raise ExtractError(
                source, f"where of {table} names column(s) {', '.join(missing)} that {table} does not have"
            )
        try:
            kept = filter_frame(chunk, expression)
        except ExpressionError as exc:
            raise ExtractError(source, f"where of {table}: {exc.message}") from None
        if len(kept):
            yield kept


@runtime_checkable
class Connector(Protocol):
    """A source the toolkit can extract from."""

    name: str

    def describe(self) -> str:
        """Return where the source is, without secrets (for logs and Dagster metadata)."""
        ...

    def list_tables(self) -> list[str]:
        """Return the tables or sheets the source offers."""
        ...

    def columns(self, table: str, header_row: int | None = None) -> list[str]:
        """Return the column names of a table or sheet."""
        ...

    def read(self, request: ReadRequest) -> Iterator[pd.DataFrame]:
        """Yield chunks of rows with the source columns plus ``_row_ref``, ``_location`` and ``_row_kind``."""
        ...


TEXT_DTYPE = pd.ArrowDtype(pa.string())


def arrow_text(data_type: pa.DataType) -> pd.ArrowDtype | None:
    """``types_mapper`` for Arrow ``to_pandas``: text stays Arrow-backed (string[pyarrow]), the rest as usual.

    The mapping engine runs its text transforms on Arrow arrays, so handing text over as Python objects
    would only be converted back (about 100 ns a value, holding the GIL).
    """
    return TEXT_DTYPE if pa.types.is_string(data_type) or pa.types.is_large_string(data_type) else None
