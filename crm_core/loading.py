"""Loading canonical records into the core: upsert by crosswalk, exact-key matching, references, rejects.

One call loads one entity inside one transaction. Every incoming row ends in exactly one outcome —
inserted, updated, unchanged, merged (attached to an existing record) or rejected — and the counts per
source are returned for the reconciliation report. Re-loading the same rows changes nothing: the
crosswalk remembers a hash of what each source row last contributed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import pickle
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import (
    Index,
    Result,
    Table,
    func,
    inspect,
    literal,
    select,
    text,
)
from sqlalchemy.orm import Session

from crm_core import steward_models as _steward_models  # noqa: F401  (declares more indexes of core tables)
from crm_core.collections_policy import rare_collections
from crm_core.db import refresh_statistics
from crm_core.entities import ENTITIES, EntityDef
from crm_core.errors import LoadError
from crm_core.journal import (
    bulk_insert,
    bulk_update,
    decimal_cell,
    ids_in,
    journal_session,
    to_json,
    update_entry,
    write_journal,
)
from crm_core.models import Base, ExternalId, LoadRun, ReferenceDecision, Reject, Stage
from crm_core.runs import owner
from crm_core.watermarks import CursorState, save_watermark

EXTERNAL_KEY = "_external_key"
ROW_REF = "_row_ref"
LOCATION = "_location"
# A fix sheet's rows: the key their original source row had (the report's fix sheet carries it), when the key
# their corrected cells give may differ (a hash key over a corrected column, a corrected key column).
SOURCE_KEY = "_source_key"
SUPERSEDED = "superseded"  # rule of the warning on a fix sheet row whose source row loads by itself now
CHUNK_ROWS = 20_000  # rows decided in memory between two bulk writes (bounds what a load holds at once)
ANALYZE_AFTER_ROWS = 50_000  # PostgreSQL: refresh planner statistics after this many new rows
IN_CHUNK = 5_000  # keys per IN (...) list: well under SQLite's and PostgreSQL's bind-parameter limits
# A load at least this big, and at least as big as the table it writes, builds the table's secondary indexes
# after its rows are in (one sort each) instead of updating every index row by row.
DEFER_INDEXES_MIN_ROWS = 50_000

KeyFunction = Callable[[Any], Any]
KeyFunctions = Mapping[str, KeyFunction]
LINKED = "linked"  # crosswalk match_method of a key a sync target assigned to a record the CRM sent it
HELD = "held"  # severity of a row waiting for a steward's reference decision (quarantined, not rejected)


@dataclass(frozen=True)
class NameMatch:
    """What a name resolver made of one name: the record it names, or the candidates a steward chooses from."""

    record_id: int | None
    candidates: tuple[dict[str, Any], ...] = ()  # {"id", "name", "probability"}, best first (shown)
    method: str = ""
    candidate_ids: tuple[int, ...] = ()  # unresolved: every record the name may mean (beyond those shown)


# (target entity, names that matched no record exactly) -> what each name resolves to
NameResolver = Callable[[str, Sequence[str]], Mapping[str, NameMatch]]


@dataclass(frozen=True)
class Lookup:
    """How a reference field finds its target: by the source's key (crosswalk), by name or by code."""

    by: str = "external_id"  # external_id | name | code | id (the core's own id, stored by a sync target)
    system: str | None = None  # crosswalk system; defaults to the batch's source
    missing: str | None = (
        None  # warn | reject a row whose value finds no record (default: reject if required)
    )


@dataclass(frozen=True)
class MatchRules:
    """Exact-key matching: a new row joins an existing record when all fields of one key are equal."""

    keys: Sequence[Sequence[str]] = ()
    conflict_fields: Sequence[str] = ()  # differing non-empty values here forbid a match


@dataclass
class Batch:
    """Mapped records of one mapping (source × entity), with the mapping's rejects."""

    source: str
    mapping: str
    records: pd.DataFrame
    rejects: pd.DataFrame
    rows_read: int
    fields: Sequence[str]
    lookups: dict[str, Lookup] = field(default_factory=dict)
    # Incremental streams: (stream, watermark after these rows), saved in the load's transaction.
    watermark: tuple[str, CursorState] | None = None
    # The rows as extracted (source columns + _location/_row_ref): rejects keep theirs for re-import.
    raw: pd.DataFrame | None = None
    # The amount summed over every record row read (mapped, or quarantined while mapping or validating);
    # None: only the mapped records are known (then they are what the source amount covers).
    amount_read: Decimal | None = None
    # A batch too large to hold whole is written piece by piece (see ``StoredPieces``): then ``records`` has
    # its columns and no rows, ``raw`` is None, and ``rejects`` holds every piece's entries, in piece order
    # (the pieces are written without them; :meth:`pieces` gives each its own).
    stored: StoredPieces | None = None
    # The places (file/sheet or table) its rows were read from, when ``raw`` is not at hand.
    locations: frozenset[Any] | None = None
    # Its mapping re-imports corrected rows of another source (``system:``, a fix sheet): the crosswalk keys it
    # writes are marked ``corrected_by`` the mapping, so that source's rejects under them count as corrected.
    corrects: bool = False
    # A trial's sample of a batch (``rows_read`` counts the sampled rows): the rows its source read, and the
    # keys of the records it left out (rows of other sources pointing at them are left out of their samples).
    sampled_from: int | None = None
    left_out_keys: frozenset[str] = frozenset()

    @property
    def record_count(self) -> int:
        """Return the number of mapped records, stored or held."""
        return self.stored.records if self.stored is not None else len(self.records)

    def pieces(self, raw: bool = True) -> Iterator[Batch]:
        """Yield the batch piece by piece: itself when held whole, else each stored piece read in turn, with
        its own reject entries (its rows' share of ``rejects``).

        ``raw=False``: a stored piece comes with only the columns of its raw rows that the load's check reads
        (see ``PieceHead``), the rest of its file left unread.
        """
        if self.stored is None:
            yield self
            return
        counts = self.stored.rejects
        if counts is None:  # pieces written with their entries
            yield from self.stored.batches(raw)
            return
        start = 0
        for piece, count in zip(self.stored.batches(raw), counts, strict=True):
            yield replace(piece, rejects=self.rejects.iloc[start : start + count].reset_index(drop=True))
            start += count


def read_piece(path: str, gone: Callable[[str], Exception]) -> Any:
    """Unpickle one piece a step of this project wrote; a missing file raises ``gone(path)`` instead."""
    try:
        with Path(path).open("rb") as file:
            return pickle.load(file)
    except FileNotFoundError:
        raise gone(path) from None


@dataclass(frozen=True)
class PieceHead:
    """What a staged piece's file holds first: the batch without its raw rows, and the raw rows' columns the
    load's check reads (location, row, row kind). The raw rows follow in the file (when ``read`` is not None),
    so the check reads a fraction of the file: at 1M rows the raw rows are two thirds of what unpickling a
    piece costs."""

    batch: Batch
    read: pd.DataFrame | None


def _gone(path: str) -> Exception:
    return LoadError(
        f"{path} is gone (its staging step ran again since, or the storage was cleaned): stage again"
    )


def read_batch_piece(path: str, raw: bool = True) -> Batch:
    """Read one staged piece (``raw=False``: its raw rows' checked columns only, when its file has them apart)."""
    try:
        with Path(path).open("rb") as file:
            piece = pickle.load(file)
            if isinstance(piece, PieceHead):
                rows = pickle.load(file) if raw and piece.read is not None else piece.read
                piece = replace(piece.batch, raw=rows)
    except FileNotFoundError:
        raise _gone(path) from None
    if not isinstance(piece, Batch):
        raise LoadError(f"{path} holds no staged batch piece: stage the entity again")
    return piece


@dataclass(frozen=True)
class StoredPieces:
    """The pieces of a batch, one file each (a ``PieceHead`` and the raw rows; earlier: one pickled ``Batch``).

    ``rejects``: how many of the batch's reject entries belong to each piece, which is then written without
    them (each entry is kept once, in the batch); None: each piece holds its own entries.
    """

    paths: tuple[str, ...]
    records: int
    rejects: tuple[int, ...] | None = None

    def __iter__(self) -> Iterator[Batch]:
        return self.batches()

    def batches(self, raw: bool = True) -> Iterator[Batch]:
        """Read the pieces in turn (``raw=False``: see :meth:`Batch.pieces`)."""
        for path in self.paths:
            yield read_batch_piece(path, raw)


@dataclass
class SourceStats:
    """What happened to the rows of one batch."""

    source: str
    entity: str
    mapping: str
    rows_read: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    merged: int = 0
    # Among the merged: rows of a fix sheet whose source row its own mapping loaded in the same load (corrected
    # at the source): not written, the source's values stand (their amount is counted as merged).
    superseded: int = 0
    rejected: int = 0
    held: int = 0  # rows waiting for a steward's reference decision (quarantined, not rejected)
    subtotals: int = 0  # subtotal/total lines among the rejected rows: not records, nothing to fix
    warnings: int = 0
    amount_source: Decimal | None = None  # every record row read: loaded, merged and quarantined
    amount_mapped: Decimal | None = None
    amount_loaded: Decimal | None = None
    amount_core: Decimal | None = None  # what the core holds for the loaded rows, read back after the load
    amount_merged: Decimal | None = None  # rows that joined an existing record (their amount is not added)
    amount_quarantined: Decimal | None = None  # rejected and held rows, where their amount could be read
    amount_unreadable: int = 0  # quarantined rows whose amount itself could not be read

    @property
    def loaded(self) -> int:
        """Return rows that are (still) in the core as their own record."""
        return self.inserted + self.updated + self.unchanged

    @property
    def quarantined(self) -> int:
        """Return the record rows that did not load: rejected or held (subtotal lines are not records)."""
        return self.rejected - self.subtotals + self.held

    @property
    def balanced(self) -> bool:
        """Return True when every row read is accounted for."""
        return self.rows_read == self.loaded + self.merged + self.rejected + self.held

    def plus(self, other: SourceStats) -> SourceStats:
        """Return the stats of two pieces of one batch taken together (counts and amounts added)."""
        added: dict[str, Any] = {}
        for name, mine in self.__dict__.items():
            theirs = getattr(other, name)
            if name in ("source", "entity", "mapping"):
                added[name] = mine
            elif mine is None or theirs is None:
                added[name] = theirs if mine is None else mine
            else:
                added[name] = mine + theirs
        return SourceStats(**added)

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-friendly dict (amounts as strings)."""
        out = {k: (None if v is None else str(v)) if k.startswith("amount_") and k != "amount_unreadable" else v
               for k, v in self.__dict__.items()}  # fmt: skip
        out["loaded"] = self.loaded
        return out


def get_or_start_run(session: Session, run_key: str, project: str, mode: str = "full") -> LoadRun:
    """Return the running load run ``run_key`` (created if new) and journal the session's changes to it."""
    run = session.scalar(select(LoadRun).where(LoadRun.run_key == run_key).with_for_update())
    if run is None:
        host, pid = owner()
        run = LoadRun(
            run_key=run_key, project=project, mode=mode, status="running", stats={}, host=host, pid=pid
        )
        session.add(run)
        session.flush()
    elif run.status != "running":
        raise LoadError(f"load run {run_key} is {run.status}; its changes were undone; start a new run")
    journal_session(session, run.id)
    return run


class RawRows:
    """The extracted rows of a batch, looked up by (location, row ref) when a row is rejected."""

    def __init__(self, raw: pd.DataFrame | None) -> None:
        usable = raw is not None and not raw.empty and ROW_REF in raw.columns and LOCATION in raw.columns
        self.frame = raw if usable else None
        self._positions: dict[tuple[str, str], int] | None = None

    def get(self, location: str | None, row_ref: str) -> dict[str, Any] | None:
        """Return the source columns of one row as JSON-safe values, or None when unknown."""
        return self.many([(location, row_ref)])[0]

    def many(self, rows: Sequence[tuple[str | None, str]]) -> list[dict[str, Any] | None]:
        """Return the source columns of each (location, row ref) as JSON-safe values (None when unknown).

        One ``take`` of the frame for all of them: a load may quarantine or warn about tens of thousands of
        rows, and a frame row read one at a time costs a pandas Series each.
        """
        if self.frame is None or not rows:
            return [None] * len(rows)
        if self._positions is None:
            keys = zip(self.frame[LOCATION].astype(str), self.frame[ROW_REF].astype(str), strict=True)
            self._positions = {key: position for position, key in enumerate(keys)}
        positions = [self._positions.get((str(location), str(row_ref))) for location, row_ref in rows]
        known = [p for p in positions if p is not None]
        # by position: a sheet may repeat a header (two 备注 columns); the later one wins, as in a dict
        columns = [i for i, c in enumerate(self.frame.columns) if not str(c).startswith("_")]
        taken = self.frame.iloc[known, columns]
        names = [str(name) for name in taken.columns]
        values = [_json_safe(taken.iloc[:, j].tolist()) for j in range(len(columns))]
        rows_found = iter(zip(*values, strict=True)) if values else iter([()] * len(known))
        return [None if position is None else dict(zip(names, next(rows_found), strict=True))
                for position in positions]  # fmt: skip


def _json_safe(column: list[Any]) -> list[Any]:
    """Return ``to_json(_python(value))`` of each value; a column of text and blanks is that already.

    A decimal (a database's DECIMAL column) is kept as a number where one holds it exactly, so the fix sheet
    writes it into a number cell, not ``"50000.0000000000"`` as text (:func:`crm_core.journal.decimal_cell`).
    """
    if set(map(type, column)) <= {str, type(None)}:
        return column
    return [
        decimal_cell(value) if isinstance(value, Decimal) and value.is_finite() else to_json(_python(value))
        for value in column
    ]


def crosswalk_ids(session: Session, entity: str, system: str, keys: Iterable[str]) -> dict[str, int]:
    """Return the core ids of the records that ``system`` knows by these keys (unknown keys are left out)."""
    found: dict[str, int] = {}
    key_list = sorted(set(keys))
    # Table columns, not the model's attributes: the ORM would build its rows through its loading machinery.
    xw = ExternalId.__table__.c
    for start in range(0, len(key_list), IN_CHUNK):
        rows = session.execute(
            select(xw.external_key, xw.entity_id).where(
                xw.entity == entity,
                xw.system == system,
                ids_in(session.connection(), xw.external_key, key_list[start : start + IN_CHUNK]),
            )
        )
        found.update(rows.all())  # one fetchall: iterating the result fetches row by row
    return found


# Tests set this to decide every row through EntityLoader._upsert, the reference the fast path is compared with.
_ROW_BY_ROW = False
_NEW, _SAME = 1, 2  # rows the fast path decides (EntityLoader._fast_kinds)
_FAST_RUN_MIN = 8  # fewer rows in a row than this are decided one at a time
_FAST_GIVE_UP = 800  # rows of a chunk left to the per-row path before its new rows are no longer tried

_AS_IS = frozenset({str, int, float, bool, type(None)})  # JSON writes these the same every time


def _canonical(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value.normalize(), "f")
    if isinstance(value, dt.date | dt.datetime):
        return value.isoformat()
    return value


_HASH_ENCODER = json.JSONEncoder(ensure_ascii=False, default=str)  # json.dumps would build one per call
_encode_text = json.encoder.encode_basestring  # how the encoder writes a string (ensure_ascii=False), in C
_INFINITY = float("inf")


def row_hash(values: dict[str, Any]) -> str:
    """Return a stable SHA-256 of a record's values (what the crosswalk remembers)."""
    payload = _HASH_ENCODER.encode(
        {k: v if type(v) in _AS_IS else _canonical(v) for k, v in sorted(values.items())}
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _json_scalar(value: Any) -> str:
    """Return ``value`` as :func:`row_hash` writes it inside a row (same text, one value at a time)."""
    kind = type(value)
    if kind is str:
        return _encode_text(value)
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return int.__repr__(value)
    if kind is float and value == value and value not in (_INFINITY, -_INFINITY):
        return float.__repr__(value)
    if kind not in _AS_IS:
        value = _canonical(value)
    return _HASH_ENCODER.encode(value)  # NaN, subclasses, containers, anything else: as the encoder writes it


_NONE = type(None)


def _json_column(values: Sequence[Any]) -> list[str]:
    """Return :func:`_json_scalar` of each value; a column of text (and blanks) in one C-level pass."""
    kinds = set(map(type, values))
    if kinds <= {str}:
        return list(map(_encode_text, values))
    if kinds == {str, _NONE}:
        return ["null" if value is None else _encode_text(value) for value in values]
    if kinds == {_NONE}:
        return ["null"] * len(values)
    # Amounts and dates (order lines: five money columns): their canonical text needs no JSON escaping.
    if kinds <= {Decimal, _NONE}:
        return ["null" if value is None else f'"{format(value.normalize(), "f")}"' for value in values]
    if kinds <= {dt.date, _NONE} or kinds <= {dt.datetime, _NONE}:
        return ["null" if value is None else f'"{value.isoformat()}"' for value in values]
    return list(map(_json_scalar, values))


def row_hashes(names: Sequence[str], columns: Sequence[Sequence[Any]]) -> list[str]:
    """Return :func:`row_hash` of each row of ``columns`` (one list per name), computed column by column.

    Each value is written as JSON once, column by column, and each row's text is put together by one string
    format of the sorted keys: byte for byte what :func:`row_hash` encodes (tests/test_row_hashes.py).
    """
    order = sorted(range(len(names)), key=lambda i: names[i])
    if not order:
        return []
    template = "{" + ", ".join(_encode_text(names[i]).replace("%", "%%") + ": %s" for i in order) + "}"
    written = [_json_column(columns[i]) for i in order]
    sha256 = hashlib.sha256
    return [sha256((template % row).encode("utf-8")).hexdigest() for row in zip(*written, strict=True)]


def _python(value: Any) -> Any:
    """Return plain Python scalars (drivers cannot bind numpy types); missing values become None.

    Aware datetimes are converted to UTC: SQLite keeps only the wall-clock part, so 2025-03-24 00:00+08:00
    would come back as midnight UTC, eight hours off. The core stores instants in UTC on every database.
    """
    if not _present(value):
        return None
    if isinstance(value, pd.Timestamp):
        value = value.to_pydatetime()
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        return value.astimezone(dt.UTC)
    return value.item() if isinstance(value, np.generic) else value


def _reject_key(value: Any) -> str | None:
    """Return a row's crosswalk key as a reject records it: None when it has none, or one no crosswalk holds."""
    if not _present(value):
        return None
    key = str(value)
    return key if len(key) <= 255 else None  # external_ids.external_key holds 255 characters


_REJECT_AMOUNT_LIMIT = Decimal(10) ** 16  # what rejects.amount, Numeric(18, 2), holds


def _reject_amount(value: Any) -> Decimal | None:
    """Return a row's mapped amount as a reject records it: a number, else None (missing or unreadable)."""
    if not _present(value):
        return None
    try:
        amount = value if isinstance(value, Decimal) else Decimal(str(value))
    except (ArithmeticError, ValueError):
        return None
    # What Numeric(18, 2) holds: a larger amount (rejected for being one, say) is recorded as unknown.
    return amount if amount.is_finite() and abs(amount) < _REJECT_AMOUNT_LIMIT else None


def _present(value: Any) -> bool:
    return (
        value is not None
        and value is not pd.NA
        and not (isinstance(value, float) and value != value)
        and value is not pd.NaT
    )


def _row_dicts(result: Result[Any]) -> Iterator[dict[str, Any]]:
    """Yield each row of ``result`` as a dict by column name, fetched many at a time (iterating a result, or its
    ``mappings()``, fetches row by row: a tenth of the customer load's reading)."""
    names = list(result.keys())
    # partitions, not one fetchall: a whole table's index (a key only of normalized fields) stays bounded
    for rows in result.partitions(10_000):
        for row in rows:
            yield dict(zip(names, row, strict=True))


def _chunks(items: Sequence[Any], size: int = IN_CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _column_values(series: pd.Series) -> list[Any]:
    """Return a mapped column as plain Python values for the driver (missing values as None)."""
    if isinstance(series.dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_any_dtype(series.dtype):
        return [_python(v) for v in series.tolist()]
    kind = pd.api.types.infer_dtype(series, skipna=True) if series.dtype == object else "plain"
    if kind in ("string", "decimal", "integer", "boolean", "empty"):
        # Python objects already: only the missing markers (NaN, NA, NaT) become None, found in one pass.
        return [
            None if missing else value
            for value, missing in zip(series.tolist(), series.isna().tolist(), strict=True)
        ]
    return [_python(v) for v in series.tolist()]


class _IdAllocator:
    """Hands out primary keys for new rows in blocks, so a chunk's inserts need no RETURNING round trip.

    PostgreSQL draws them from the table's own sequence (safe beside other writers); SQLite, which has one
    writer at a time, continues after the largest id in the table.
    """

    def __init__(self, session: Session, table: Table) -> None:
        self.session = session
        self.table = table
        self._free: list[int] = []
        self._next: int | None = None
        self._postgres = session.get_bind().dialect.name == "postgresql"
        self._sequence: str | None = None  # PostgreSQL: the table's id sequence, looked up at the first draw

    def take(self, expected: int) -> int:
        """Return a new id; ``expected`` is how many more this load may need (the block size)."""
        if self._postgres:
            if not self._free:
                self._draw(expected)
            return self._free.pop()
        if self._next is None:
            self._next = (self.session.scalar(select(func.max(self.table.c.id))) or 0) + 1
        value, self._next = self._next, self._next + 1
        return value

    def take_many(self, expected: Sequence[int]) -> list[int]:
        """Return the ids :meth:`take` would return called once with each of ``expected``, in order."""
        if not self._postgres:
            if not expected:
                return []
            first = self.take(expected[0])
            assert self._next is not None
            self._next = first + len(expected)
            return list(range(first, self._next))
        taken: list[int] = []
        done = 0
        while done < len(expected):
            if not self._free:
                self._draw(expected[done])
            count = min(len(self._free), len(expected) - done)
            taken.extend(reversed(self._free[-count:]))  # what ``count`` pops return
            del self._free[-count:]
            done += count
        return taken

    def _draw(self, expected: int) -> None:
        block = max(16, min(expected, CHUNK_ROWS))
        if self._sequence is None:
            self._sequence = self.session.scalar(
                text("SELECT pg_get_serial_sequence(:t, 'id')"), {"t": self.table.name}
            )
        # One row holding the block as an array: fetching thousands of one-value rows cost more.
        drawn = self.session.scalar(
            text("SELECT array_agg(nextval(CAST(:s AS regclass))) FROM generate_series(1, :n)"),
            {"s": self._sequence, "n": block},
        )
        self._free = sorted(drawn, reverse=True)


class _ChunkValues(Sequence[dict[str, Any]]):
    """The rows ``start:stop`` of a batch as field -> value dicts, each built when first asked for.

    The fast path of :meth:`EntityLoader._load_batch` reads its rows column by column: only the rows
    decided one at a time need a dict.
    """

    def __init__(
        self, fields: Sequence[str], columns: Mapping[str, list[Any]], start: int, stop: int
    ) -> None:
        self._fields = fields
        self._columns = [columns[name] for name in fields]
        self._start = start
        self._built: list[dict[str, Any] | None] = [None] * (stop - start)

    def __len__(self) -> int:
        return len(self._built)

    def __getitem__(self, index: Any) -> Any:
        if not isinstance(index, int):
            raise TypeError("_ChunkValues is indexed by position only")
        row = self._built[index]
        if row is None:
            position = self._start + index
            row = self._built[index] = dict(
                zip(self._fields, [c[position] for c in self._columns], strict=True)
            )
        return row


@dataclass
class _CrosswalkEntry:
    """What the loader knows of one crosswalk row while it decides a chunk."""

    id: int
    entity_id: int
    match_method: str
    last_synced_hash: str | None
    row: dict[str, Any] | None = None  # the stored row (journal before-image); None for rows this load added
    corrected_by: str | None = None  # as stored, or as it will be written (see Batch.corrects)


class EntityLoader:
    """Loads the batches of one entity in one transaction (see module doc).

    Rows are decided in memory chunk by chunk, in source order, exactly as a row-by-row upsert would decide
    them; each chunk is then written with a few set statements: bulk inserts of new records, crosswalk rows,
    journal entries and rejects, and executemany updates of changed records. Only what a chunk touches is
    read from the database (crosswalk rows by key, records by id), so memory follows the chunk size plus the
    exact-key index.
    """

    def __init__(
        self,
        session: Session,
        run: LoadRun,
        entity: EntityDef | str,
        *,
        match: MatchRules | None = None,
        key_functions: KeyFunctions | None = None,
        name_keys: KeyFunctions | None = None,
        name_resolvers: Mapping[str, NameResolver] | None = None,
        defer_indexes_at: int | None = None,
    ) -> None:
        self.session = session
        # rows from which a load builds secondary indexes afterwards (:meth:`_defer_indexes`)
        self.defer_indexes_at = DEFER_INDEXES_MIN_ROWS if defer_indexes_at is None else defer_indexes_at
        self.run = run
        self._run_id: int = run.id  # read per row: the ORM attribute costs more than a plain one
        self.entity = ENTITIES[entity] if isinstance(entity, str) else entity
        self.model: type[Base] = self.entity.model
        self.table: Table = self.model.__table__  # type: ignore[assignment]
        self.match = match or MatchRules()
        self.key_functions = key_functions or {}  # normalize a match-key field before comparing
        self.name_keys = name_keys or {}  # per target entity: normalize names for 'by: name' lookups
        # Per target entity: resolve names that match no record exactly (variants, the match index). A name
        # still unresolved then waits for a steward (reference_decisions) instead of being rejected.
        self.name_resolvers = name_resolvers or {}
        # reference decision id -> the rows it holds in this load: (system, crosswalk key, amount)
        self._held: dict[int, list[tuple[str, str, Any]]] = defaultdict(list)
        self._index: dict[tuple[str, tuple[Any, ...]], set[int]] = defaultdict(set)
        self._queried: dict[str, set[Any]] = {}  # field -> values whose stored records are in the index
        self._index_complete = False
        # The field each exact key is looked up by (its first field compared as stored), and, for a table empty
        # when the load began, the values of those fields this load has written (see _build_index).
        self._lookup_fields = {
            plain[0] for key in self.match.keys if (plain := [n for n in key if n not in self.key_functions])
        }
        self._flushed_values: dict[str, set[Any]] | None = None
        self._conflict_values: dict[int, tuple[Any, ...]] = {}
        self._name_index: dict[str, dict[Any, set[int]]] = {}
        # per name index, a bare firm name (|腾达科技|) → the branches showing a firm of that name (深圳|腾达科技|北京分公司)
        self._branch_firms: dict[str, dict[Any, set[int]]] = {}
        self._stages: set[str] | None = None
        self._merged_into: dict[int, int] = {}
        self._seen_decisions: set[int] = set()  # reference decisions this load consulted (pending or decided)
        # (entity, reference field) -> golden record -> the field's values; and value -> golden records
        self._shared_values: dict[tuple[str, str], dict[int, set[Any]]] = {}
        self._shared_books: dict[tuple[str, str], dict[Any, set[int]]] = {}
        # Self-references (a branch's parent): (source, location, row ref, own key, field, value, lookup).
        self._pending_self_refs: list[tuple[str, str | None, str, str, str, Any, Lookup, str]] = []
        # The rows as read of the pending self-references whose target was not loaded yet when their batch
        # (or piece) was: they are resolved after the last one, when ``_raw`` holds another's rows.
        self._self_ref_rows: dict[int, dict[str, Any] | None] = {}
        self._raw = RawRows(None)
        self._crosswalk: dict[tuple[str, str], _CrosswalkEntry] = {}
        # Sources the crosswalk held no key of for this entity when the load began (a go-live): the only keys
        # of theirs that can be stored are the ones this load wrote, so the others are not looked up.
        self._written_keys: dict[str, set[str]] = {}
        self._record_ids = _IdAllocator(session, self.table)
        self._crosswalk_ids_alloc = _IdAllocator(session, ExternalId.__table__)  # type: ignore[arg-type]
        self._journaled: set[int] = set()  # records with a journal entry from this load (insert or update)
        self._xw_journaled: set[int] = set()  # crosswalk rows likewise
        self._inserted_since_analyze = 0
        self._inserted_before_analyze = 0  # rows this loader had written when statistics were last refreshed
        self._columns = {name: f.column for name, f in self.entity.fields.items()}
        self._self_ref_fields = {
            name for name, f in self.entity.fields.items() if f.references == self.entity.name
        }
        self._key_names = ["|".join(key) for key in self.match.keys]
        self._defaults = {
            column.name: getattr(column.default, "arg", None)
            for column in self.table.columns
            if column.default is not None and column.default.is_scalar
        }
        self._blank_row = {column.name: self._defaults.get(column.name) for column in self.table.columns}
        # A new record carries its row's key values as written unless a key field is a self-reference (written
        # later) or has a column default (written when the row has no value): then its keys are read back.
        key_fields = {name for key in self.match.keys for name in key}
        self._keys_as_written = not any(
            name in self._self_ref_fields or self._blank_row.get(self._columns[name]) is not None
            for name in key_fields
        )
        # One timestamp per chunk: the rows of a chunk are written together, and the driver then formats
        # one value instead of one per row.
        self._now = dt.datetime.now(dt.UTC)
        # Written per chunk by _flush.
        self._rows: dict[int, dict[str, Any]] = {}  # records the chunk read or created: column -> value
        self._new_records: dict[int, dict[str, Any]] = {}
        self._changed_records: set[int] = set()
        self._before: dict[int, dict[str, Any]] = {}  # journal before-images of existing records
        self._new_crosswalk: dict[int, dict[str, Any]] = {}
        self._changed_crosswalk: dict[int, _CrosswalkEntry] = {}
        self._corrected_by: str | None = None  # the batch's mapping when it corrects another source's rows
        # Per system, the keys the load's fix sheets carry, and those of them the system's own mappings loaded in
        # this load: a fix sheet row under such a key is superseded by its source row (see _superseded).
        self._fix_keys: dict[str, set[str]] = {}
        self._own_loaded: dict[str, set[str]] = defaultdict(set)
        self._watched: set[str] | None = None  # the current own batch's system's keys among _fix_keys
        # keys of the current fix sheet that _upsert decides, one row at a time (see _fast_kinds)
        self._one_by_one: set[str] = set()
        self._rejects: list[dict[str, Any]] = []
        self._fast_decided = self._fast_demoted = 0  # see _load_fast
        self._repeated_keys: set[str] = set()  # see _fast_kinds

    # ------------------------------------------------------------------ matching index

    def _key_values(self, values: Mapping[str, Any], key: Sequence[str]) -> tuple[Any, ...] | None:
        parts = []
        for name in key:
            value = values.get(name)
            if not _present(value):
                return None
            function = self.key_functions.get(name)
            parts.append(function(value) if function else value)
        return None if any(p is None for p in parts) else tuple(parts)

    def _field_values(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Return a record's values by field name from its column values."""
        return {name: row.get(column) for name, column in self._columns.items()}

    def _add_to_index(
        self,
        record_id: int,
        row: Mapping[str, Any],
        found_keys: Sequence[tuple[Any, ...] | None] | None = None,
    ) -> None:
        """Index a record by its exact keys; ``found_keys`` are the keys of the row it was inserted from."""
        if not self.match.keys:
            return
        if found_keys is None or not self._keys_as_written:
            values = self._field_values(row)
            found_keys = [self._key_values(values, key) for key in self.match.keys]
        for name, found in zip(self._key_names, found_keys, strict=True):
            if found is not None:
                self._index[(name, found)].add(record_id)
        if self.match.conflict_fields:
            self._conflict_values[record_id] = tuple(
                row.get(self._columns[n]) for n in self.match.conflict_fields
            )

    def _chunk_keys(
        self, columns: Mapping[str, list[Any]], start: int, stop: int
    ) -> list[tuple[tuple[Any, ...] | None, ...]]:
        """Return, per row of ``start:stop``, its value of each exact key (None where a part is missing).

        Column by column, each key function applied once per distinct value: what :meth:`_key_values`
        returns for each row's values, computed once instead of at each step that asks.
        """
        if not self.match.keys:
            return [()] * (stop - start)
        per_key: list[list[tuple[Any, ...] | None]] = []
        for key in self.match.keys:
            parts: list[list[Any]] = []
            for name in key:
                column = columns.get(name)
                if column is None:
                    parts.append([None] * (stop - start))
                    continue
                function = self.key_functions.get(name)
                cache: dict[Any, Any] = {}
                part: list[Any] = []
                for value in column[start:stop]:
                    if not _present(value):
                        part.append(None)
                    elif function is None:
                        part.append(value)
                    else:
                        if value not in cache:
                            cache[value] = function(value)
                        part.append(cache[value])
                parts.append(part)
            per_key.append([
                None if any(part is None for part in found) else found for found in zip(*parts, strict=True)
            ])  # fmt: skip
        return list(zip(*per_key, strict=True))

    def _build_index(self) -> None:
        """Read the merges; the exact-key index is filled per chunk (:meth:`_index_candidates`).

        Into a table empty at the start, the only stored records a lookup can find are the ones this load
        has written: :meth:`_flush` notes their looked-up values, and only those are asked for.
        """
        model: Any = self.model
        if self.session.execute(select(self.table.c.id).limit(1)).first() is None:
            self._flushed_values = {name: set() for name in self._lookup_fields}
        if hasattr(model, "merged_into_id"):
            self._merged_into = dict(
                self.session.execute(
                    select(self.table.c.id, self.table.c.merged_into_id).where(
                        self.table.c.merged_into_id.is_not(None)
                    )
                ).all()
            )

    def _index_query(self) -> Any:
        names = {n for key in self.match.keys for n in key} | set(self.match.conflict_fields)
        columns = [self.table.c[self._columns[n]] for n in sorted(names)]
        query = select(self.table.c.id, *columns)
        if hasattr(self.model, "merged_into_id"):
            query = query.where(self.table.c.merged_into_id.is_(None))
        return query

    def _index_candidates(
        self, rows: Sequence[Mapping[str, Any]], row_keys: Sequence[tuple[tuple[Any, ...] | None, ...]]
    ) -> None:
        """Index the stored records a chunk's new rows could match by an exact key, with a set query per key.

        Only records sharing a key value with the chunk are read, so a load of a few rows into a big core
        costs a few indexed lookups, not a scan. A key whose every field is normalized before comparing
        (no stored column to look up) makes the whole index load once, as before.
        """
        if not self.match.keys or self._index_complete:
            return
        connection = self.session.connection()
        for key in self.match.keys:
            plain = [n for n in key if n not in self.key_functions]
            if not plain:
                for row in _row_dicts(self.session.execute(self._index_query())):
                    self._add_to_index(row["id"], row)
                self._index_complete = True
                return
            first = plain[0]
            queried = self._queried.setdefault(first, set())
            position = self.match.keys.index(key)
            wanted = {
                values[first] for values, found in zip(rows, row_keys, strict=True)
                if found[position] is not None
            } - queried  # fmt: skip
            if not wanted:
                continue
            queried |= wanted  # asked for once, as when every one is looked up
            if self._flushed_values is not None:
                wanted &= self._flushed_values[first]  # the others are not stored: nothing to read
            column = self.table.c[self._columns[first]]
            for part in _chunks(sorted(wanted, key=str)):
                query = self._index_query().where(ids_in(connection, column, part))
                for row in _row_dicts(self.session.execute(query)):
                    self._add_to_index(row["id"], row)

    def _find_match(
        self, values: Mapping[str, Any], found_keys: Sequence[tuple[Any, ...] | None] | None = None
    ) -> tuple[int, str] | None:
        """Return the record a new row joins by an exact key (and how), or None; ``found_keys`` as computed."""
        if found_keys is None:
            found_keys = [self._key_values(values, key) for key in self.match.keys]
        for key, name, found in zip(self.match.keys, self._key_names, found_keys, strict=True):
            if found is None:
                continue
            for record_id in sorted(self._index.get((name, found), ())):
                if not self._conflicts(values, record_id):
                    return record_id, "+".join(key)
        return None

    def _conflicts(self, values: Mapping[str, Any], record_id: int) -> bool:
        theirs_all = self._conflict_values.get(record_id, ())
        for position, name in enumerate(self.match.conflict_fields):
            mine = values.get(name)
            theirs = theirs_all[position] if position < len(theirs_all) else None
            if _present(mine) and _present(theirs) and mine != theirs:
                return True
        return False

    # ------------------------------------------------------------------ references

    def _crosswalk_ids(self, entity: str, system: str, keys: set[str]) -> dict[str, int]:
        return crosswalk_ids(self.session, entity, system, keys)

    def _names(self, entity: str, by: str) -> dict[Any, set[int]]:
        cache_key = f"{entity}:{by}"
        if cache_key not in self._name_index:
            target = ENTITIES[entity]
            model: Any = target.model
            column = (
                "code"
                if by == "code"
                else ("name_normalized" if entity == "customer" else target.label_field)
            )
            # Merged records keep their names and codes: a row naming one finds its survivor, as a row
            # naming it by source key does through the re-pointed crosswalk.
            merged = hasattr(model, "merged_into_id")
            table = model.__table__.c
            query = select(table.id, table[column], table.merged_into_id if merged else literal(None))
            rows = self.session.execute(query).all()
            survivor_of = {record_id: parent for record_id, _, parent in rows if parent is not None}
            index: dict[Any, set[int]] = defaultdict(set)
            branch_firms: dict[Any, set[int]] = defaultdict(set)
            normalize = self.name_keys.get(entity) if entity != "customer" and by == "name" else None
            for record_id, value, _ in rows:
                if value is not None:
                    index[normalize(value) if normalize else value].add(_follow(survivor_of, record_id))
                    if column == "name_normalized" and not value.startswith("|"):
                        # a row may name the customer without its region (腾达科技有限公司): found when
                        # only one customer of that name exists in any region
                        unplaced = "|" + value.split("|", 1)[1]
                        index[unplaced].add(_follow(survivor_of, record_id))
                        if not unplaced.endswith("|"):
                            # a branch (深圳|腾达科技|北京分公司) shows its firm bears the name too
                            branch_firms[unplaced.rsplit("|", 1)[0] + "|"].add(
                                _follow(survivor_of, record_id)
                            )
            self._name_index[cache_key] = index
            self._branch_firms[cache_key] = branch_firms
        return self._name_index[cache_key]

    def _resolve(
        self, batch: Batch, records: pd.DataFrame
    ) -> tuple[dict[str, pd.Series], list[dict[str, Any]]]:
        resolved: dict[str, pd.Series] = {}
        problems: list[dict[str, Any]] = []
        held: dict[Any, int] = {}
        candidates: dict[Any, tuple[int, ...]] = {}
        decided: set[Any] = set()
        # Names a resolver interprets last: the row's other references (its owner) can then pick among the
        # records a name may mean.
        fields = sorted(self.entity.references.items(), key=lambda f: (
            batch.lookups.get(f[0], Lookup()).by == "name" and f[1].references in self.name_resolvers
        ))  # fmt: skip
        for name, definition in fields:
            if name not in records.columns or definition.references is None:
                continue
            target = definition.references
            lookup = batch.lookups.get(name, Lookup())
            values = records[name]
            present = values.notna()
            if target == self.entity.name and lookup.by == "external_id":
                resolved[name] = pd.Series([None] * len(records), index=records.index, dtype=object)
                continue  # self-references resolve after all rows of the entity are in
            ids: dict[Any, int | None] = {}
            reasons: dict[Any, str] = {}
            unique = list(
                dict.fromkeys(values[present])
            )  # first seen first: decisions in row order, whatever the hash seed
            if lookup.by == "external_id":
                system = lookup.system or batch.source
                found = self._crosswalk_ids(target, system, {str(v) for v in unique})
                for value in unique:
                    ids[value] = found.get(str(value))
                    if ids[value] is None:
                        reasons[value] = (
                            f"{target} with {system} key '{value}' not found (was it loaded or rejected?)"
                        )
            elif lookup.by == "id":
                found_ids = self._existing_ids(target, unique)
                for value in unique:
                    ids[value] = found_ids.get(value)
                    if ids[value] is None:
                        reasons[value] = f"no {target} with id '{value}' in the core"
            else:
                index = self._names(target, lookup.by)
                branch_firms = self._branch_firms.get(f"{target}:{lookup.by}", {})
                normalize = self.name_keys.get(target) if lookup.by == "name" else None
                # name -> the records it matches exactly (none, or several)
                unresolved: dict[Any, set[int]] = {}
                for value in unique:
                    key = normalize(value) if normalize else value
                    matches = index.get(key, set())
                    evidenced = key in branch_firms and target in self.name_resolvers
                    if (
                        evidenced
                    ):  # a firm's branch bears the name, maybe another firm's: the resolver weighs them
                        matches = matches | branch_firms[key]
                    if len(matches) == 1 and not evidenced:
                        ids[value] = next(iter(matches))
                    else:
                        ids[value] = None
                        unresolved[value] = matches
                        reasons[value] = (
                            f"no {target} named '{value}'" if not matches
                            else f"'{value}' is ambiguous: {len(matches)} {target} records match ({sorted(matches)[:5]})"
                        )  # fmt: skip
                if unresolved and lookup.by == "name" and target in self.name_resolvers:
                    held, candidates, decided = self._resolve_by_steward_or_resolver(
                        target, unresolved, ids, reasons, normalize,
                        outcome="held" if definition.required else "rejected" if lookup.missing == "reject" else "loaded",
                    )  # fmt: skip
            resolved[name] = pd.Series(
                [ids.get(v) if _present(v) else None for v in values], index=values.index, dtype=object
            )
            if lookup.by == "name" and target in self.name_resolvers:
                self._pick_by_shared_references(
                    target, values, held, candidates, decided, resolved, resolved[name]
                )
            failed = present & resolved[name].isna()
            for index_value in records.index[failed]:
                raw = values.at[index_value]
                severity = "error" if definition.required or lookup.missing == "reject" else "warn"
                if raw in held and definition.required:
                    severity = HELD
                problems.append({
                    "index": index_value, "field": name, "value": raw, "reason": reasons[raw], "severity": severity,
                    "decision": held.get(raw),
                })  # fmt: skip
            held, candidates, decided = {}, {}, set()
        return resolved, problems

    def _resolve_by_steward_or_resolver(
        self,
        target: str,
        unresolved: Mapping[Any, set[int]],
        ids: dict[Any, int | None],
        reasons: dict[Any, str],
        normalize: KeyFunction | None,
        outcome: str = "held",
    ) -> tuple[dict[Any, int], dict[Any, tuple[int, ...]], set[Any]]:
        """Resolve names no record carries exactly: a steward's decision, else the target's name resolver.

        ``outcome``: what becomes of a row whose name stays unresolved, which its reason says: ``held`` for the
        decision (a required reference), ``rejected`` (``missing: reject``), or ``loaded`` without the reference,
        which the decision adds on a later run.

        Fills ``ids`` and ``reasons``; returns, for each name still unresolved, the reference decision its rows
        wait on (created pending, with the resolver's candidates, when new); for each name the resolver saw,
        every record it may mean; and the names a steward decided.
        """
        keys = {value: str((normalize(value) if normalize else None) or value)[:255] for value in unresolved}
        decisions = {
            d.name_key: d
            for part in _chunks(sorted(set(keys.values())))
            for d in self.session.scalars(
                select(ReferenceDecision).where(
                    ReferenceDecision.entity == target, ReferenceDecision.name_key.in_(part)
                )
            )
        }
        survivors = self._merged_targets(target)
        remaining = []
        decided: set[Any] = set()
        may_mean: dict[Any, tuple[int, ...]] = {}
        for value in unresolved:
            decision = decisions.get(keys[value])
            if decision is not None and decision.status != "pending":
                # Its rows no longer wait: the decision's count is set to none, journaled in this run, which
                # makes this run depend on the steward's (a rollback of the decision alone is refused).
                self._seen_decisions.add(decision.id)
            if decision is not None and decision.status == "linked" and decision.target_id is not None:
                ids[value] = _follow(survivors, decision.target_id)
                decided.add(value)
                listed = [int(c["id"]) for c in decision.candidates or [] if c.get("id") is not None]
                may_mean[value] = tuple(
                    dict.fromkeys(_follow(survivors, i) for i in (decision.target_id, *listed))
                )
            elif decision is not None and decision.status == "no_match":
                reasons[value] = (
                    f"{decision.decided_by} decided that no {target} is named '{value}' (reference {decision.id})"
                )
            else:
                remaining.append(value)
        found = self.name_resolvers[target](target, [str(v) for v in remaining]) if remaining else {}
        held: dict[Any, int] = {}
        waiting: list[tuple[Any, list[dict[str, Any]]]] = []
        for value in remaining:
            match = found.get(str(value), NameMatch(None))
            if match.record_id is not None:
                ids[value] = _follow(survivors, match.record_id)
                continue
            may_mean[value] = tuple(dict.fromkeys(_follow(survivors, i) for i in match.candidate_ids))
            candidates = list(match.candidates) or [
                {"id": i, "name": None, "probability": None} for i in sorted(unresolved[value])[:5]
            ]
            decision = decisions.get(keys[value])
            if decision is None:
                decision = ReferenceDecision(
                    entity=target, name=str(value)[:255], name_key=keys[value], candidates=candidates,
                    status="pending", rows_held=0, load_run_id=self.run.id,
                )  # fmt: skip
                self.session.add(decision)
                decisions[keys[value]] = decision
            elif decision.candidates != candidates:
                decision.candidates = candidates
            waiting.append((value, candidates))
        if waiting:
            self.session.flush()  # the new decisions' ids, in one batch
        for value, candidates in waiting:
            decision = decisions[keys[value]]
            shown = ", ".join(
                f"{c['id']} {c.get('name') or ''}".strip()
                + (f" ({c['probability']:.2f})" if c.get("probability") is not None else "")
                for c in candidates[:3]
            )
            found_text = f"reference {decision.id}" + (f"; candidates {shown}" if shown else "; no candidate")
            reasons[value] = {
                "held": f"'{value}' names no single {target}: held for a steward ({found_text}); `crmi dedup "
                "review` lists it, `crmi dedup decide`",
                "rejected": f"'{value}' names no single {target} ({found_text}); `crmi dedup decide "
                f"r{decision.id}` links the name for the next run",
                "loaded": f"'{value}' names no single {target}: loaded without its {target} ({found_text}); "
                f"`crmi dedup decide r{decision.id}` links the name, and the next run fills it in",
            }[outcome]
            held[value] = decision.id
            self._seen_decisions.add(decision.id)
            if not may_mean[value]:  # the exact namesakes, when the resolver knows no more
                may_mean[value] = tuple(
                    dict.fromkeys(_follow(survivors, i) for i in sorted(unresolved[value]))
                )
        return held, may_mean, decided

    def _pick_by_shared_references(
        self,
        target: str,
        values: pd.Series,
        held: Mapping[Any, int],
        candidates: Mapping[Any, tuple[int, ...]],
        decided: set[Any],
        resolved: Mapping[str, pd.Series],
        column: pd.Series,
    ) -> None:
        """Let the row's other references pick among the records its name may mean (in place, per row).

        A reference field both entities have, pointing at the same entity (an opportunity's ``owner`` and its
        customer's ``owner``), is evidence: of the customers a name may mean, the only one the row's owner
        owns (in any record merged into it) is the one meant. A held row (a name two firms share) is told
        apart by whose deal it is, and so is a row of a name a steward linked, when its owner owns exactly
        one of the candidates the steward saw. Else, when the resolver can compare a name within a set of
        records (``among``), the owner's own customers are searched: a held row, or a row whose name found a
        customer with another owner (a bare trade name another firm is also called), goes to the one
        customer of the owner's book the name clearly means; the resolver keeps a name written in full on
        the customer it names. A customer nobody owns is no evidence either way; rows nothing decides stay.
        """
        target_refs = ENTITIES[target].references
        shared = [
            ref_field for ref_field, definition in self.entity.references.items()
            if ref_field in resolved and ref_field in target_refs and definition.references is not None
            and target_refs[ref_field].references == definition.references and definition.references != target
        ]  # fmt: skip
        if not shared:
            return
        # row -> the record each shared reference of the row points at (rows naming something only)
        row_refs = {
            ref_field: resolved[ref_field][values.index[values.notna()]].dropna().to_dict()
            for ref_field in shared
        }
        with_refs = set().union(*row_refs.values())
        rows = [i for i in values.index if i in with_refs]
        if not rows:
            return
        owned = {ref_field: self._survivor_values(target, ref_field) for ref_field in shared}

        def owns(index_value: Any, record_id: int) -> bool:
            return all(
                refs[index_value] in owned[f].get(record_id, ())
                for f, refs in row_refs.items() if index_value in refs
            )  # fmt: skip

        def disowns(index_value: Any, record_id: int) -> bool:
            """The record has an owner, and it is not the row's."""
            return any(
                owned[f].get(record_id) and refs[index_value] not in owned[f][record_id]
                for f, refs in row_refs.items() if index_value in refs
            )  # fmt: skip

        current: dict[Any, Any] = column.to_dict()
        resolver = self.name_resolvers[target]
        among = getattr(resolver, "among", None)
        books = {f: self._books(target, f) for f in shared} if among is not None else {}
        # (name, the row's owners, current) -> the book search deciding it, asked once for all rows below
        searches: dict[tuple[Any, ...], tuple[str, set[int], Any, tuple[Any, ...]]] = {}
        searched_rows: list[tuple[Any, Any, tuple[Any, ...]]] = []  # (row, current, its search)
        for index_value in rows:
            value, found = values.at[index_value], current[index_value]
            if (found is None and value not in held) or (
                found is not None and not disowns(index_value, found)
            ):
                continue
            options = candidates.get(value, ())
            picks = [c for c in options if owns(index_value, c)]
            pick: int | None = None
            if (found is None or value in decided) and len(options) > 1 and len(picks) == 1:
                pick = picks[0]  # whose deal it is tells the name's candidates apart (a steward's too)
            elif among is not None and value not in decided:
                mine = tuple((f, refs[index_value]) for f, refs in row_refs.items() if index_value in refs)
                key = (value, mine, found)
                if key not in searches:
                    book = set.intersection(*(books[f].get(refs[index_value], set())
                                              for f, refs in row_refs.items() if index_value in refs))  # fmt: skip
                    searches[key] = (str(value), book, found, mine)
                searched_rows.append((index_value, found, key))
                continue
            if pick is not None and pick != found:
                column.at[index_value] = pick
        if not searches:
            return
        # The searches at once: a resolver that can share them with a second process (among_many) does.
        among_many = getattr(resolver, "among_many", None)
        asked = list(searches.values())
        if among_many is not None:
            answers = among_many(asked)
        else:
            assert among is not None  # a search is only planned with among
            answers = [among(name, book, found, book_key=mine) for name, book, found, mine in asked]
        settled = dict(zip(searches, answers, strict=True))
        for index_value, found, key in searched_rows:
            pick = settled[key]
            if pick is not None and pick != found:
                column.at[index_value] = pick

    def _books(self, entity: str, field: str) -> dict[Any, set[int]]:
        """Return value of reference ``field`` (a salesperson) -> the golden records carrying it (their book)."""
        key = (entity, field)
        if key not in self._shared_books:
            books: dict[Any, set[int]] = defaultdict(set)
            for survivor, owners in self._survivor_values(entity, field).items():
                for owner in owners:
                    books[owner].add(survivor)
            self._shared_books[key] = books
        return self._shared_books[key]

    def _survivor_values(self, entity: str, field: str) -> dict[int, set[Any]]:
        """Return golden record -> the values of reference ``field`` over every record merged into it."""
        key = (entity, field)
        if key not in self._shared_values:
            table = ENTITIES[entity].model.__table__.c
            column = table[ENTITIES[entity].fields[field].column]
            survivors = self._merged_targets(entity)
            values: dict[int, set[Any]] = defaultdict(set)
            for record_id, value in self.session.execute(
                select(table.id, column).where(column.is_not(None))
            ).all():
                values[_follow(survivors, record_id)].add(value)
            self._shared_values[key] = values
        return self._shared_values[key]

    def _existing_ids(self, entity: str, values: Iterable[Any]) -> dict[Any, int]:
        """Return source value -> core id for values that are ids of live records (merges followed)."""
        numbers: dict[Any, int] = {}
        for value in values:
            try:
                numbers[value] = int(str(value).strip())
            except ValueError:
                continue
        table: Table = ENTITIES[entity].model.__table__  # type: ignore[assignment]
        merged = "merged_into_id" in table.c
        found: dict[int, int] = {}
        for part in _chunks(sorted(set(numbers.values()))):
            columns = [table.c.id, table.c.merged_into_id] if merged else [table.c.id, table.c.id]
            query = select(*columns).where(ids_in(self.session.connection(), table.c.id, part))
            for record_id, merged_into in self.session.execute(query).all():
                found[record_id] = merged_into or record_id
        merges = self._merged_targets(entity) if merged else {}
        return {v: _follow(merges, found[n]) for v, n in numbers.items() if n in found}

    def _merged_targets(self, entity: str) -> dict[int, int]:
        """Return merged record -> the record it was merged into, for an entity that merges."""
        table = ENTITIES[entity].model.__table__.c
        if "merged_into_id" not in table:
            return {}
        return dict(
            self.session.execute(
                select(table.id, table.merged_into_id).where(table.merged_into_id.is_not(None))
            ).all()
        )

    def _valid_stage(self, code: Any) -> bool:
        if self._stages is None:
            self._stages = set(self.session.scalars(select(Stage.code)))
        return code in self._stages

    # ------------------------------------------------------------------ loading

    def load(self, batches: Sequence[Batch]) -> list[SourceStats]:
        """Load ``batches`` in order (earlier batches win on conflicting values); return stats per batch."""
        with rare_collections():  # a load allocates millions of objects that live until it ends
            return self._load(batches)

    def _load(self, batches: Sequence[Batch]) -> list[SourceStats]:
        self.session.flush()
        incoming = sum(batch.record_count for batch in batches)
        deferred = self._defer_indexes(incoming)
        deferred_keys = self._defer_foreign_keys(incoming)
        self._analyze()
        self._build_index()
        self._find_new_sources({batch.source for batch in batches})
        self._fix_keys = self._keys_of_fix_sheets(batches)
        loaded = [self._load_pieces(batch) for batch in batches]
        self._resolve_self_references()
        self._record_held()
        amount_field = self.entity.amount_field
        all_stats = []
        for total, loaded_ids in loaded:
            if total.amount_loaded is not None and amount_field:
                # Read back once every batch is in: a later batch may change a record an earlier one loaded
                # (fill a blank amount), and each line says what the core holds for its rows at the end.
                total.amount_core = self._stored_amount(amount_field, loaded_ids.tolist())
            all_stats.append(total)
        for batch in batches:
            if batch.watermark is not None:
                stream, state = batch.watermark
                save_watermark(self.session, batch.source, stream, state, self.run.id)
        self.session.flush()
        connection = self.session.connection()
        for index in deferred:  # SQLite only: no planner statistics to refresh afterwards
            index.create(connection)
        quote = connection.dialect.identifier_preparer.quote
        for name, definition in deferred_keys:  # validated in one pass each, over the rows just written
            connection.exec_driver_sql(
                f"ALTER TABLE {quote(self.table.name)} ADD CONSTRAINT {quote(name)} {definition}"
            )
        return all_stats

    def _load_pieces(self, batch: Batch) -> tuple[SourceStats, np.ndarray]:
        """Load a batch piece by piece (a batch held whole is one piece); return its stats (the pieces' added)
        and, for an entity with an amount, the records its rows loaded as their own (not merged), whose
        amounts :meth:`_load` reads back."""
        total: SourceStats | None = None
        loaded_ids: list[int] = []
        for piece in batch.pieces():
            stats = self._load_batch(piece, loaded_ids)
            total = stats if total is None else total.plus(stats)
        if total is None:
            raise LoadError(f"staged batch of {batch.mapping} has no pieces: stage the entity again")
        # kept until every batch is in: 8 bytes an id, not a Python int's 28 and a list's 8
        return total, np.fromiter(loaded_ids, dtype=np.int64, count=len(loaded_ids))

    @staticmethod
    def _keys_of_fix_sheets(batches: Sequence[Batch]) -> dict[str, set[str]]:
        """Return, per system, the keys the rows of the fix sheets among ``batches`` carry (the keys their cells
        give and their original source rows' keys)."""
        keys: dict[str, set[str]] = defaultdict(set)
        for batch in batches:
            if not batch.corrects:
                continue
            for piece in batch.pieces(raw=False):
                for column in (EXTERNAL_KEY, SOURCE_KEY):
                    if column in piece.records.columns:
                        keys[batch.source].update(str(k) for k in piece.records[column] if _present(k))
        return dict(keys)

    def _fix_sheet_keys(
        self, source: str, keys: list[str], records: pd.DataFrame
    ) -> tuple[list[str], list[str | None], set[str]]:
        """Return the key each row of a fix sheet loads under, the other key its record is filed under too (None:
        none), and which of those other keys the crosswalk already holds (they are not added).

        A row whose original source row's key (``SOURCE_KEY``) differs from the key its corrected cells give
        (a hash key over a corrected column, a corrected key column) loads into the record the original key
        names when the core has one (the row loaded before it broke, or an earlier run of this fix sheet),
        else under the key its cells give. The record is filed under both: the source row's reject under the
        original key counts as corrected, and the source row, once corrected the same way, updates this record.
        """
        others: list[str | None] = [None] * len(keys)
        if SOURCE_KEY not in records.columns:
            return keys, others, set()
        differ = {
            i: str(original)
            for i, (original, key) in enumerate(zip(records[SOURCE_KEY].tolist(), keys, strict=True))
            if _present(original) and str(original) != key
        }
        if not differ:
            return keys, others, set()
        wanted = {keys[i] for i in differ} | set(differ.values())
        stored = set(self._crosswalk_ids(self.entity.name, source, wanted))
        chosen = list(keys)
        for i, original in differ.items():
            if original in stored:
                chosen[i], others[i] = original, keys[i]
            else:
                others[i] = original
        return chosen, others, stored

    def _superseded(self, source: str, key: str, other: str | None) -> bool:
        """Return True for a fix sheet row whose source row its own mapping loaded in this load (by either key):
        the source was corrected itself, and its newer values stand."""
        own = self._own_loaded.get(source)
        return own is not None and (key in own or (other is not None and other in own))

    def _find_new_sources(self, sources: set[str]) -> None:
        """Note the sources whose keys of this entity the crosswalk does not hold yet (see ``_written_keys``)."""
        xw = ExternalId.__table__.c
        for source in sorted(sources):
            query = select(xw.id).where(xw.entity == self.entity.name, xw.system == source).limit(1)
            if self.session.execute(query).first() is None:
                self._written_keys[source] = set()

    def _defer_indexes(self, incoming: int) -> list[Index]:
        """Drop the secondary indexes a big load does not read, to build them again once its rows are in.

        SQLite only, and only when ``incoming`` rows are at least ``defer_indexes_at`` and at least the rows
        the table holds (a first load, a go-live): building an index from the finished table costs a fraction
        of updating it row by row, while a small load into a big core would pay a whole rebuild. PostgreSQL
        keeps its indexes: measured there, the rebuild cost more than the B-tree inserts it saved (and the
        drop would lock the tables for readers). Kept: unique indexes and those the loader looks records up
        by (the exact-key columns; the crosswalk's unique key). The drop is part of the load's transaction
        (begun here: the driver would commit it at once), so a failed load gets its indexes back.
        """
        connection = self.session.connection()
        if incoming < self.defer_indexes_at or connection.dialect.name != "sqlite":
            return []
        driver: Any = connection.connection.driver_connection
        if not driver.in_transaction:
            # pysqlite opens its transaction only before a write: a DROP INDEX before the load's first write
            # would be committed at once, and a failed load would lose the index for good.
            connection.exec_driver_sql("BEGIN")
        looked_up = {
            self._columns[name] for key in self.match.keys for name in key if name not in self.key_functions
        } | {self._columns[name] for name in self.match.conflict_fields}
        xw: Table = ExternalId.__table__  # type: ignore[assignment]
        deferred: list[Index] = []
        for table, needed in ((self.table, looked_up), (xw, {"external_key"})):
            if incoming < (connection.scalar(select(func.count()).select_from(table)) or 0):
                continue
            existing = {index["name"] for index in inspect(connection).get_indexes(table.name)}
            for index in sorted(table.indexes, key=lambda i: str(i.name)):
                columns = {column.name for column in index.columns}
                if index.unique or index.name not in existing or columns & needed:
                    continue
                index.drop(connection)
                deferred.append(index)
        return deferred

    def _defer_foreign_keys(self, incoming: int) -> list[tuple[str, str]]:
        """Drop the table's validated foreign keys for a big load; return (name, definition) to add each back.

        PostgreSQL only, on the same terms as :meth:`_defer_indexes` (``incoming`` rows at least
        ``defer_indexes_at`` and at least the rows the table holds: a first load, a go-live). Each row a
        ``COPY`` writes fires one check per foreign key, a key-share lock on the row it points at included
        (measured: 157,164 opportunities with their four keys 5.9 s, without them 1.2 s); adding a key back
        checks every row in one join (0.2 s for the four). Each key comes back exactly as the database
        defined it (``pg_get_constraintdef``), in the load's transaction: a failed load rolls the drop back
        with everything else. The drop locks the table and the tables it points at until the load commits.
        """
        connection = self.session.connection()
        if connection.dialect.name != "postgresql" or incoming < self.defer_indexes_at:
            return []
        if incoming < (connection.scalar(select(func.count()).select_from(self.table)) or 0):
            return []
        keys = connection.execute(
            text(
                # not a NOT VALID key: it checks new rows only while it is there, and added back NOT VALID
                # it would check none of the rows loaded meanwhile (validating it would check old ones too)
                "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
                "WHERE contype = 'f' AND convalidated AND conrelid = CAST(:table AS regclass) ORDER BY conname"
            ),
            {"table": self.table.name},
        ).all()
        quote = connection.dialect.identifier_preparer.quote
        for name, _ in keys:
            connection.exec_driver_sql(f"ALTER TABLE {quote(self.table.name)} DROP CONSTRAINT {quote(name)}")
        return [(str(name), str(definition)) for name, definition in keys]

    def _record_held(self) -> None:
        """Write how many rows (and how much money) wait on each reference decision; unchanged counts stay.

        A held row whose key a fix sheet loaded (``corrected_by``, this load or before) waits on nobody: the
        core has it, and the reconciliation counts it corrected.
        """
        corrected = self._corrected_keys(
            {(system, key) for rows in self._held.values() for system, key, _ in rows}
        )
        # one query per part (a session keeps an unchanged object only while something references it)
        decisions = {
            decision.id: decision
            for part in _chunks(sorted(self._seen_decisions | set(self._held)))
            for decision in self.session.scalars(
                select(ReferenceDecision).where(ReferenceDecision.id.in_(part))
            )
        }
        for decision_id in sorted(self._seen_decisions - set(self._held)):
            decision = decisions.get(decision_id)  # every row it held was resolved
            if decision is not None and decision.rows_held:
                decision.rows_held, decision.amount_held, decision.load_run_id = 0, None, self.run.id
        self._seen_decisions.clear()
        for decision_id, held in sorted(self._held.items()):
            decision = decisions.get(decision_id)
            if decision is None:
                continue
            waiting = [amount for system, key, amount in held if (system, key) not in corrected]
            rows = len(waiting)
            money = [a for a in waiting if isinstance(a, Decimal)]
            amount = sum(money, Decimal(0)).quantize(Decimal("0.01")) if money else None
            stored = (
                None
                if decision.amount_held is None
                else Decimal(decision.amount_held).quantize(Decimal("0.01"))
            )
            if decision.rows_held != rows or stored != amount:
                decision.rows_held, decision.amount_held, decision.load_run_id = rows, amount, self.run.id
        self._held.clear()
        self.session.flush()

    def _corrected_keys(self, keys: set[tuple[str, str]]) -> set[tuple[str, str]]:
        """Return the (system, key) pairs of ``keys`` whose crosswalk row of this entity a fix sheet wrote."""
        xw = ExternalId.__table__.c
        found: set[tuple[str, str]] = set()
        for system in sorted({system for system, _ in keys}):
            for part in _chunks(sorted(key for s, key in keys if s == system)):
                query = select(xw.external_key).where(
                    xw.entity == self.entity.name, xw.system == system, xw.corrected_by.is_not(None),
                    ids_in(self.session.connection(), xw.external_key, part),
                )  # fmt: skip
                found.update((system, key) for key in self.session.scalars(query).all())
        return found

    def _reject(
        self,
        source: str,
        location: Any,
        row_ref: Any,
        field_name: str | None,
        value: Any,
        rule: str,
        reason: str,
        severity: str = "error",
        *,
        mapping: str,
        key: Any = None,
        amount: Any = None,
    ) -> None:
        """Record a quarantine entry; ``key`` and ``amount``: the row's crosswalk key and mapped amount, if known."""
        where = str(location) if location is not None else None
        # A row-level reject (subtotal, empty or repeated key) has no field or value: NaN when read back from staging
        field_name = field_name if _present(field_name) else None
        self._rejects.append({
            "load_run_id": self._run_id, "source": source, "entity": self.entity.name, "location": where,
            "row_ref": str(row_ref), "field": field_name, "value": str(value)[:2000] if _present(value) else None,
            "rule": rule, "reason": reason, "severity": severity, "raw_row": (where, str(row_ref)),
            "created_at": self._now, "mapping": mapping, "external_key": _reject_key(key),
            "amount": _reject_amount(amount),
        })  # fmt: skip

    def _load_batch(self, batch: Batch, loaded_ids: list[int]) -> SourceStats:
        """Load one batch (or piece); append to ``loaded_ids`` the records its rows loaded as their own."""
        stats = SourceStats(
            source=batch.source, entity=self.entity.name, mapping=batch.mapping, rows_read=batch.rows_read
        )
        mapping_rejected: set[str] = set()
        subtotals: set[str] = set()
        unreadable: set[str] = set()
        amount_field = self.entity.amount_field
        self._raw = RawRows(batch.raw)
        self._corrected_by = batch.mapping if batch.corrects else None
        self._watched = None if batch.corrects else self._fix_keys.get(batch.source)
        pending_from = len(self._pending_self_refs)
        for entry in batch.rejects.to_dict("records"):
            severity = entry.get("severity") or "error"
            self._reject(batch.source, entry["location"], entry["row_ref"], entry["field"], entry["value"],
                         entry["rule"], entry["reason"], severity, mapping=batch.mapping,
                         key=entry.get("external_key"), amount=entry.get("amount"))  # fmt: skip
            if severity == "error":
                row = f"{entry['location']}\x00{entry['row_ref']}"
                mapping_rejected.add(row)
                if entry["rule"] == "subtotal":
                    subtotals.add(row)
                elif (
                    entry["field"] == amount_field
                    and amount_field is not None
                    and not _present(entry.get("amount"))
                ):
                    # Only an amount that could not be read: one read and refused by a rule (-500) is counted.
                    unreadable.add(row)
            else:
                stats.warnings += 1
        stats.rejected = len(mapping_rejected)
        stats.subtotals = len(subtotals)
        stats.amount_unreadable = len(unreadable)
        records = batch.records.reset_index(drop=True)
        if amount_field and amount_field in records.columns:
            stats.amount_mapped = sum((v for v in records[amount_field] if _present(v)), Decimal(0))
            stats.amount_loaded = Decimal(0)
            stats.amount_merged = Decimal(0)
            stats.amount_source = batch.amount_read if batch.amount_read is not None else stats.amount_mapped
            stats.amount_quarantined = stats.amount_source - stats.amount_mapped
        resolved, problems = self._resolve(batch, records)
        row_errors: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        for problem in problems:
            row_errors[problem["index"]].append(problem)
        fields = [f for f in batch.fields if f in self.entity.fields]
        # What a reference contributes to the row hash is its source key (and whether it resolved), not the
        # core id: a merge re-points the id to the survivor, and an unchanged source row must stay unchanged.
        sources = {name: _column_values(records[name]) for name in resolved}
        columns = {
            name: (_column_values(resolved[name]) if name in resolved else _column_values(records[name]))
            for name in fields
        }
        keys = records[EXTERNAL_KEY].astype(str).tolist() if len(records) else []
        others: list[str | None] = [None] * len(keys)  # a fix sheet row's other key (see _fix_sheet_keys)
        stored_others: set[str] = set()
        self._one_by_one = set()
        if batch.corrects:
            keys, others, stored_others = self._fix_sheet_keys(batch.source, keys, records)
            own = self._own_loaded.get(batch.source, set())
            self._one_by_one = {k for k, o in zip(keys, others, strict=True) if o is not None or k in own}
        locations = records[LOCATION].tolist() if LOCATION in records.columns else [None] * len(records)
        refs = records[ROW_REF].tolist() if ROW_REF in records.columns else [None] * len(records)
        self_ref_values = {
            name: records[name].tolist()
            for name in self._self_ref_fields
            if name in records.columns and batch.lookups.get(name, Lookup()).by == "external_id"
        }
        for start in range(0, len(records), CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, len(records))
            self._now = dt.datetime.now(dt.UTC)
            chunk_values = _ChunkValues(fields, columns, start, stop)
            digests = self._digests(fields, columns, sources, start, stop)
            row_keys = self._chunk_keys(columns, start, stop)
            self._prefetch(batch.source, keys[start:stop], chunk_values, digests, row_keys)
            kinds = self._fast_kinds(
                batch.source, keys[start:stop], digests, row_keys, columns, row_errors, start
            )
            done = start  # rows before this one were decided by the fast path
            for position in range(start, stop):
                if position < done:
                    continue
                if kinds[position - start]:
                    done = self._load_fast(batch, stats, columns, fields, keys, digests, row_keys, kinds,
                                           locations, refs, self_ref_values, loaded_ids, start, stop, position)  # fmt: skip
                    if done > position:
                        continue
                if batch.corrects and self._superseded(batch.source, keys[position], others[position]):
                    self._supersede(batch, stats, chunk_values[position - start], keys[position],
                                    locations[position], refs[position])  # fmt: skip
                    continue
                errors = row_errors.get(position, [])
                rejected = any(p["severity"] == "error" for p in errors)
                # (a row's values are built per call: only for a row with problems)
                row_amount = (
                    chunk_values[position - start].get(amount_field) if errors and amount_field else None
                )
                for problem in errors:
                    if rejected and problem["severity"] == HELD:
                        continue  # rejected anyway: no steward decision makes it loadable
                    self._reject(batch.source, locations[position], refs[position], problem["field"],
                                 problem["value"], "reference", problem["reason"], problem["severity"],
                                 mapping=batch.mapping, key=keys[position], amount=row_amount)  # fmt: skip
                if rejected:
                    stats.rejected += 1
                    self._quarantined_amount(stats, chunk_values[position - start], amount_field)
                    continue
                waits_on = [p["decision"] for p in errors if p["severity"] == HELD]
                if waits_on:
                    stats.held += 1
                    self._quarantined_amount(stats, chunk_values[position - start], amount_field)
                    amount = chunk_values[position - start].get(amount_field) if amount_field else None
                    for decision_id in set(waits_on):
                        self._held[decision_id].append((batch.source, keys[position], amount))
                    continue
                stats.warnings += len(errors)
                values = chunk_values[position - start]
                stage = values.get("stage")
                if stage is not None and not self._valid_stage(stage):
                    self._reject(batch.source, locations[position], refs[position], "stage", stage,
                                 "reference", f"unknown stage code {stage!s}", mapping=batch.mapping,
                                 key=keys[position], amount=values.get(amount_field) if amount_field else None)  # fmt: skip
                    stats.rejected += 1
                    self._quarantined_amount(stats, values, amount_field)
                    continue
                for name, parents in self_ref_values.items():
                    if _present(parents[position]):
                        lookup = batch.lookups.get(name, Lookup())
                        self._pending_self_refs.append((batch.source, locations[position], str(refs[position]),
                                                        keys[position], name, parents[position], lookup, batch.mapping))  # fmt: skip
                outcome, entity_id = self._upsert(
                    batch.source, keys[position], values, digests[position - start], stop - position,
                    row_keys[position - start],
                )  # fmt: skip
                other = others[position]
                if other is not None and other not in stored_others:
                    # the record is filed under the row's other key too (see _fix_sheet_keys)
                    method = self._crosswalk[(batch.source, keys[position])].match_method
                    self._add_crosswalk(batch.source, other, entity_id, method, digests[position - start],
                                        stop - position)  # fmt: skip
                    stored_others.add(other)
                elif self._watched and keys[position] in self._watched:
                    self._own_loaded[batch.source].add(keys[position])
                setattr(stats, outcome, getattr(stats, outcome) + 1)
                if stats.amount_loaded is not None and stats.amount_merged is not None and amount_field:
                    amount = values.get(amount_field)
                    amount = amount if isinstance(amount, Decimal) else Decimal(0)
                    if outcome == "merged":
                        stats.amount_merged += amount
                    else:
                        stats.amount_loaded += amount
                        loaded_ids.append(entity_id)
            self._flush()
        self._flush()
        self._keep_self_ref_rows(pending_from)
        return stats

    def _supersede(
        self,
        batch: Batch,
        stats: SourceStats,
        values: Mapping[str, Any],
        key: str,
        location: Any,
        row_ref: Any,
    ) -> None:
        """Count a fix sheet row superseded by its source row (merged: in the core, not written) and warn."""
        amount_field = self.entity.amount_field
        amount = values.get(amount_field) if amount_field else None
        self._reject(
            batch.source, location, row_ref, None, key, SUPERSEDED,
            "the source's own mapping loads this row now (corrected at the source): its values stand and this "
            "fix sheet row was not loaded; remove it from the fix sheet, or remove the fix mapping once every "
            "row is corrected at the source",
            "warn", mapping=batch.mapping, key=key, amount=amount,
        )  # fmt: skip
        stats.warnings += 1
        stats.merged += 1
        stats.superseded += 1
        if stats.amount_merged is not None and amount_field:
            stats.amount_merged += amount if isinstance(amount, Decimal) else Decimal(0)

    def _fast_kinds(
        self,
        source: str,
        chunk_keys: Sequence[str],
        digests: Sequence[str],
        row_keys: Sequence[tuple[tuple[Any, ...] | None, ...]],
        columns: Mapping[str, list[Any]],
        row_errors: Mapping[Any, list[dict[str, Any]]],
        start: int,
    ) -> list[int]:
        """Return, per row of the chunk, how the fast path may decide it: 0 not, _NEW or _SAME.

        _NEW: a key the crosswalk does not hold (an insert unless it matches by an exact key, which
        :meth:`_load_fast` checks in order); _SAME: a key whose stored hash equals the row's (unchanged, or
        merged as before) and that the batch's kind of mapping wrote (``corrected_by``, see :meth:`_upsert`).
        Only a key's first row in the chunk, without reference problems and with a known stage: no earlier
        row of the chunk can change what these rows find, so each is decided as :meth:`_upsert` would,
        whatever the rows around it do.
        """
        count = len(chunk_keys)
        self._fast_decided = self._fast_demoted = 0  # rows of the chunk the fast path decided or left
        if _ROW_BY_ROW:
            return [0] * count
        stages = columns.get("stage")
        valid: dict[Any, bool] = {}
        if stages is not None:
            for stage in set(stages[start : start + count]):
                valid[stage] = stage is None or self._valid_stage(stage)
        crosswalk = self._crosswalk
        # a new row of an entity with exact keys is indexed by its row's keys (see _add_to_index)
        new_kind = _NEW if (self._keys_as_written or not self.match.keys) else 0
        seen: set[str] = set()
        kinds: list[int] = []
        self._repeated_keys = repeated = set()  # keys a later row of the chunk looks up in the crosswalk
        for offset, key in enumerate(chunk_keys):
            position = start + offset
            if key in seen:
                repeated.add(key)
                kinds.append(0)
                continue
            if (
                position in row_errors
                or (stages is not None and not valid[stages[position]])
                or key in self._one_by_one
            ):
                seen.add(key)
                kinds.append(0)
                continue
            seen.add(key)
            entry = crosswalk.get((source, key))
            if entry is None:
                kinds.append(new_kind)
            else:
                same = entry.last_synced_hash == digests[offset] and entry.corrected_by == self._corrected_by
                kinds.append(_SAME if same else 0)
        return kinds

    def _load_fast(
        self,
        batch: Batch,
        stats: SourceStats,
        columns: Mapping[str, list[Any]],
        fields: Sequence[str],
        keys: Sequence[str],
        digests: Sequence[str],
        row_keys: Sequence[tuple[tuple[Any, ...] | None, ...]],
        kinds: list[int],
        locations: Sequence[Any],
        refs: Sequence[Any],
        self_ref_values: Mapping[str, Sequence[Any]],
        loaded_ids: list[int],
        start: int,
        stop: int,
        position: int,
    ) -> int:
        """Decide the run of fast rows from ``position`` column by column; return the first row not decided.

        The same ids (drawn in row order), rows, crosswalk rows, index entries and counts as one
        :meth:`_upsert` per row. A new row that would match by an exact key ends the run (decided per row).
        """
        source = batch.source
        if self.match.keys:
            # row by row up to the first new row an exact key may match (scanning no further: a chunk of
            # customers may stop at every few rows)
            index = self._index
            pending: set[tuple[str, tuple[Any, ...]]] = set()  # keys of the run's earlier new rows
            end = position
            while end < stop and (kind := kinds[end - start]):
                if kind == _NEW:
                    found = [(n, f) for n, f in zip(self._key_names, row_keys[end - start], strict=True)
                             if f is not None]  # fmt: skip
                    if any(index.get(pair) or pair in pending for pair in found):
                        break
                    pending.update(found)
                end += 1
        else:
            try:
                end = start + kinds.index(0, position - start)
            except ValueError:
                end = stop
        if end - position < _FAST_RUN_MIN:
            # a few rows between rows decided one at a time (customers merging by exact keys): per row is
            # cheaper than building columns for them, and exact for any row
            kinds[position - start : end - start] = [0] * (end - position)
            self._fast_demoted += end - position + 1
            if self.match.keys and self._fast_demoted > max(_FAST_GIVE_UP, self._fast_decided):
                # most new rows of this chunk match: stop looking for runs among them
                kinds[end - start :] = [0 if kind == _NEW else kind for kind in kinds[end - start :]]
            return position
        self._fast_decided += end - position
        if self_ref_values:
            for current in range(position, end):
                for name, parents in self_ref_values.items():
                    if _present(parents[current]):
                        lookup = batch.lookups.get(name, Lookup())
                        self._pending_self_refs.append((source, locations[current], str(refs[current]),
                                                        keys[current], name, parents[current], lookup, batch.mapping))  # fmt: skip
        new = [p for p in range(position, end) if kinds[p - start] == _NEW]
        new_ids = iter(self._insert_new(source, columns, fields, keys, digests, row_keys, new, start, stop))
        crosswalk = self._crosswalk
        outcomes: list[tuple[bool, int]] = []  # per row of the run: (merged, record id)
        for current in range(position, end):
            if kinds[current - start] == _NEW:
                outcomes.append((False, next(new_ids)))
                continue
            entry = crosswalk[(source, keys[current])]
            outcomes.append((entry.match_method not in ("created", LINKED), entry.entity_id))
        if self._watched:
            self._own_loaded[source].update(k for k in keys[position:end] if k in self._watched)
        merged = sum(1 for is_merged, _ in outcomes if is_merged)
        stats.inserted += len(new)
        stats.merged += merged
        stats.unchanged += len(outcomes) - len(new) - merged
        amount_field = self.entity.amount_field
        if stats.amount_loaded is not None and stats.amount_merged is not None and amount_field:
            amounts = columns.get(amount_field)
            for current, (is_merged, record_id) in zip(range(position, end), outcomes, strict=True):
                amount = amounts[current] if amounts is not None else None
                amount = amount if isinstance(amount, Decimal) else Decimal(0)
                if is_merged:
                    stats.amount_merged += amount
                else:
                    stats.amount_loaded += amount
                    loaded_ids.append(record_id)
        return end

    def _insert_new(
        self,
        source: str,
        columns: Mapping[str, list[Any]],
        fields: Sequence[str],
        keys: Sequence[str],
        digests: Sequence[str],
        row_keys: Sequence[tuple[tuple[Any, ...] | None, ...]],
        new: list[int],
        start: int,
        stop: int,
    ) -> list[int]:
        """Create a record and a crosswalk row for each row at ``new`` (positions), as :meth:`_upsert` does.

        Returns the new records' ids, in row order.
        """
        if not new:
            return []
        remaining = [stop - p for p in new]
        record_ids = self._record_ids.take_many(remaining)
        entry_ids = self._crosswalk_ids_alloc.take_many(remaining)
        contiguous = new[-1] - new[0] + 1 == len(new)

        def pick(values: Sequence[Any]) -> Sequence[Any]:
            return values[new[0] : new[-1] + 1] if contiguous else [values[p] for p in new]

        count = len(new)
        now, run_id = self._now, self._run_id
        by_column: dict[str, list[Any]] = {name: [value] * count for name, value in self._blank_row.items()}
        by_column.update(id=record_ids, created_run_id=[run_id] * count, updated_run_id=[run_id] * count,
                         created_at=[now] * count, updated_at=[now] * count)  # fmt: skip
        for name in fields:  # in the row's order: a later field writing the same column wins, as in _upsert
            if name in self._self_ref_fields:
                continue
            column = self._columns[name]
            default = by_column[column]
            by_column[column] = [
                old if value is None else value
                for old, value in zip(default, pick(columns[name]), strict=True)
            ]
        names = list(by_column)
        rows = [dict(zip(names, values, strict=True)) for values in zip(*by_column.values(), strict=True)]
        self._rows.update(zip(record_ids, rows, strict=True))
        self._new_records.update(zip(record_ids, rows, strict=True))
        self._journaled.update(record_ids)
        new_keys = pick(keys)
        new_digests = [digests[p - start] for p in new]
        entity = self.entity.name
        self._new_crosswalk.update(
            (entry_id, {
                "id": entry_id, "entity": entity, "entity_id": record_id, "system": source, "external_key": key,
                "match_method": "created", "last_synced_hash": digest, "last_synced_at": now,
                "created_run_id": run_id, "updated_run_id": run_id, "corrected_by": self._corrected_by,
            })
            for entry_id, record_id, key, digest in zip(entry_ids, record_ids, new_keys, new_digests, strict=True)
        )  # fmt: skip
        crosswalk, repeated = self._crosswalk, self._repeated_keys
        for entry_id, record_id, key, digest in zip(
            entry_ids, record_ids, new_keys, new_digests, strict=True
        ):
            if key in repeated:  # no other row of the chunk asks for the others
                crosswalk[(source, key)] = _CrosswalkEntry(
                    entry_id, record_id, "created", digest, corrected_by=self._corrected_by
                )
        written = self._written_keys.get(source)
        if written is not None:
            written.update(new_keys)
        self._xw_journaled.update(entry_ids)
        if self.match.keys:
            for record_id, row, p in zip(record_ids, rows, new, strict=True):
                self._add_to_index(record_id, row, row_keys[p - start])
        return record_ids

    def _keep_self_ref_rows(self, start: int) -> None:
        """Keep the rows as read of the self-references from ``start`` on whose target is not loaded yet."""
        added = self._pending_self_refs[start:]
        if not added or self._raw.frame is None:
            return
        wanted: dict[str, set[str]] = defaultdict(set)
        for source, _, _, _, _, value, lookup, _ in added:
            wanted[lookup.system or source].add(str(value))
        known = {
            system: self._crosswalk_ids(self.entity.name, system, keys) for system, keys in wanted.items()
        }
        unresolved = [
            start + i for i, (source, _, _, _, _, value, lookup, _) in enumerate(added)
            if str(value) not in known[lookup.system or source]
        ]  # fmt: skip
        rows = self._raw.many([self._pending_self_refs[i][1:3] for i in unresolved])
        self._self_ref_rows.update(zip(unresolved, rows, strict=True))

    @staticmethod
    def _quarantined_amount(stats: SourceStats, values: Mapping[str, Any], amount_field: str | None) -> None:
        """Count a row's amount as quarantined (rejected or held at load)."""
        if stats.amount_quarantined is not None and amount_field:
            amount = values.get(amount_field)
            stats.amount_quarantined += amount if isinstance(amount, Decimal) else Decimal(0)

    def _digests(
        self,
        fields: Sequence[str],
        columns: Mapping[str, list[Any]],
        sources: Mapping[str, list[Any]],
        start: int,
        stop: int,
    ) -> list[str]:
        """Return the row hashes of rows ``start:stop``, column by column.

        References count by their source key, marked when unresolved (a merge re-points the core id).
        """
        names = list(dict.fromkeys([*fields, *sources]))
        if not names:
            return [row_hash({})] * (stop - start)
        hashed: list[Sequence[Any]] = []
        for name in names:
            if name not in sources:
                hashed.append(columns[name][start:stop])
                continue
            keys = sources[name][start:stop]
            values = columns[name][start:stop] if name in columns else [None] * (stop - start)
            self_ref = name in self._self_ref_fields
            hashed.append([
                None if key is None else f"unresolved:{key}" if value is None and not self_ref else f"key:{key}"
                for key, value in zip(keys, values, strict=True)
            ])  # fmt: skip
        return row_hashes(names, hashed)

    def _prefetch(
        self,
        source: str,
        keys: Sequence[str],
        values: Sequence[Mapping[str, Any]],
        digests: Sequence[str],
        row_keys: Sequence[tuple[tuple[Any, ...] | None, ...]],
    ) -> None:
        """Read, in a few set queries, the crosswalk rows and records a chunk is likely to touch."""
        wanted_keys = {k for k in keys if (source, k) not in self._crosswalk}
        written = self._written_keys.get(source)
        wanted = sorted(wanted_keys if written is None else wanted_keys & written)
        xw = ExternalId.__table__
        for part in _chunks(wanted):
            query = select(xw).where(xw.c.entity == self.entity.name, xw.c.system == source,
                                     ids_in(self.session.connection(), xw.c.external_key, part))  # fmt: skip
            result = self.session.execute(query)
            names = list(result.keys())  # rows as tuples: a mapping per row cost more than the query
            at = [names.index(n) for n in ("external_key", "id", "entity_id", "match_method",
                                            "last_synced_hash", "corrected_by")]  # fmt: skip
            i_key, i_id, i_entity, i_method, i_hash, i_fix = at
            crosswalk = self._crosswalk
            for row in result.all():  # one fetchall: iterating the result fetches row by row
                crosswalk[(source, row[i_key])] = _CrosswalkEntry(row[i_id], row[i_entity], row[i_method], row[i_hash],
                                                                  dict(zip(names, row, strict=True)), row[i_fix])  # fmt: skip
        if self.match.keys:  # (values are built per row when asked for: only rows that may match ask)
            new = [i for i, k in enumerate(keys) if (source, k) not in self._crosswalk]
            self._index_candidates([values[i] for i in new], [row_keys[i] for i in new])
        ids: set[int] = set()
        for position, (key, digest) in enumerate(zip(keys, digests, strict=True)):
            entry = self._crosswalk.get((source, key))
            if entry is not None:
                if entry.last_synced_hash != digest:  # unchanged rows need no record
                    ids.add(self._survivor_id(entry.entity_id))
            elif self.match.keys:
                match = self._find_match(values[position], row_keys[position])
                if match is not None:
                    ids.add(match[0])
        self._fetch_records(ids)

    def _fetch_records(self, ids: set[int]) -> None:
        missing = sorted(i for i in ids if i not in self._rows)
        for part in _chunks(missing):
            query = select(self.table).where(ids_in(self.session.connection(), self.table.c.id, part))
            for row in _row_dicts(self.session.execute(query)):
                self._rows[row["id"]] = row

    def _record(self, record_id: int) -> dict[str, Any]:
        if record_id not in self._rows:
            self._fetch_records({record_id})
        if record_id not in self._rows:
            raise LoadError(
                f"crosswalk points at missing {self.entity.name} {record_id}; the core is inconsistent"
            )
        return self._rows[record_id]

    def _survivor_id(self, entity_id: int) -> int:
        return _follow(self._merged_into, entity_id)

    def _stored_amount(self, amount_field: str, ids: list[int]) -> Decimal:
        """Sum what the core holds for these records (read back, so rounding or truncation shows)."""
        column = self.table.c[self.entity.fields[amount_field].column]
        total = Decimal(0)
        for part in _chunks(ids):
            found = self.session.scalar(
                select(func.sum(column)).where(ids_in(self.session.connection(), self.table.c.id, part))
            )
            total += Decimal(str(found)) if found is not None else Decimal(0)
        return total

    def _assign(self, record_id: int, values: Mapping[str, Any], *, only_blanks: bool) -> bool:
        row = self._record(record_id)
        changed: dict[str, Any] = {}
        for name, value in values.items():
            if name in self._self_ref_fields or value is None:
                continue
            column = self._columns[name]
            current = row.get(column)
            if only_blanks and current is not None:
                continue
            if current != value:
                changed[column] = value
        if changed:
            self._touch(record_id, row)
            row.update(changed)
        return bool(changed)

    def _touch(self, record_id: int, row: dict[str, Any], *, journal: bool = False) -> None:
        """Note that a record changes: journal its before-image once per load, write it at the next flush.

        ``journal`` records the before-image even for a record this load inserted (in an earlier chunk): a
        branch's parent pointer must be undone before rollback deletes the rows it points at.
        """
        if record_id in self._new_records:
            return
        if (journal or record_id not in self._journaled) and record_id not in self._before:
            self._before[record_id] = {k: to_json(v) for k, v in row.items()}
            self._journaled.add(record_id)
        self._changed_records.add(record_id)

    def _upsert(
        self,
        source: str,
        key: str,
        values: dict[str, Any],
        digest: str,
        remaining: int,
        found_keys: Sequence[tuple[Any, ...] | None] | None = None,
    ) -> tuple[str, int]:
        existing = self._crosswalk.get((source, key))
        if existing is not None:
            # linked: the key a target system gave a record the CRM sent it (sync); its rows update it in full
            merged = existing.match_method not in ("created", LINKED)
            if existing.last_synced_hash == digest:
                if existing.corrected_by != self._corrected_by:
                    # the same row from the other side (a fix sheet, or the source's own mapping): the key
                    # is that mapping's now (see Batch.corrects)
                    self._sync_crosswalk(existing, digest)
                return ("merged" if merged else "unchanged"), existing.entity_id
            record_id = self._survivor_id(existing.entity_id)
            self._assign(record_id, values, only_blanks=merged)
            row = self._record(record_id)
            self._touch(record_id, row)
            row["updated_run_id"] = self._run_id
            self._sync_crosswalk(existing, digest)
            return ("merged" if merged else "updated"), record_id
        match = self._find_match(values, found_keys)
        if match is not None:
            record_id, method = match
            if self._assign(record_id, values, only_blanks=True):
                self._rows[record_id]["updated_run_id"] = self._run_id
            self._add_crosswalk(source, key, record_id, f"matched:{method}", digest, remaining)
            self._add_to_index(record_id, self._record(record_id))
            return "merged", record_id
        record_id = self._record_ids.take(remaining)
        now = self._now
        row = dict(self._blank_row)
        row.update(id=record_id, created_run_id=self._run_id, updated_run_id=self._run_id, created_at=now,
                   updated_at=now)  # fmt: skip
        for name, value in values.items():
            if name not in self._self_ref_fields and value is not None:
                row[self._columns[name]] = value
        self._rows[record_id] = row
        self._new_records[record_id] = row
        self._journaled.add(record_id)
        self._add_crosswalk(source, key, record_id, "created", digest, remaining)
        self._add_to_index(record_id, row, found_keys)
        return "inserted", record_id

    def _sync_crosswalk(self, entry: _CrosswalkEntry, digest: str) -> None:
        entry.last_synced_hash = digest
        entry.corrected_by = self._corrected_by
        new = self._new_crosswalk.get(entry.id)
        if new is not None:
            new.update(last_synced_hash=digest, last_synced_at=self._now, corrected_by=self._corrected_by)
        else:
            self._changed_crosswalk[entry.id] = entry

    def _add_crosswalk(
        self, source: str, key: str, entity_id: int, method: str, digest: str, remaining: int
    ) -> None:
        entry_id = self._crosswalk_ids_alloc.take(remaining)
        now = self._now
        self._new_crosswalk[entry_id] = {
            "id": entry_id, "entity": self.entity.name, "entity_id": entity_id, "system": source,
            "external_key": key, "match_method": method, "last_synced_hash": digest, "last_synced_at": now,
            "created_run_id": self._run_id, "updated_run_id": self._run_id, "corrected_by": self._corrected_by,
        }  # fmt: skip
        self._crosswalk[(source, key)] = _CrosswalkEntry(
            entry_id, entity_id, method, digest, corrected_by=self._corrected_by
        )
        written = self._written_keys.get(source)
        if written is not None:
            written.add(key)
        self._xw_journaled.add(entry_id)

    def _flush(self) -> None:
        """Write what the chunk decided: inserts, updates, crosswalk, journal and rejects, a statement each."""
        connection = self.session.connection()
        journal: list[dict[str, Any]] = []
        xw: Table = ExternalId.__table__  # type: ignore[assignment]
        self._inserted_since_analyze += len(self._new_records) + len(self._new_crosswalk)
        # New rows carry created_run_id: rollback deletes them by it, so they need no journal entry each.
        if self._new_records:
            bulk_insert(connection, self.table, list(self._new_records.values()))
        if self._flushed_values is not None:
            for name, values in self._flushed_values.items():
                column = self._columns[name]
                values.update(
                    row[column] for row in self._new_records.values() if row.get(column) is not None
                )
                values.update(
                    self._rows[i][column]
                    for i in self._changed_records
                    if self._rows[i].get(column) is not None
                )
        if self._new_crosswalk:
            bulk_insert(connection, xw, list(self._new_crosswalk.values()))
        changed = sorted(self._changed_records)
        if changed:
            now = dt.datetime.now(dt.UTC)
            writable = [
                c.name for c in self.table.columns if c.name not in ("id", "created_run_id", "created_at")
            ]
            rows = []
            for record_id in changed:
                row = self._rows[record_id]
                row["updated_at"] = now
                rows.append({"_id": record_id, **{c: row.get(c) for c in writable}})
                before = self._before.pop(record_id, None)
                if before is not None:
                    after = {c: row.get(c) for c in writable if to_json(row.get(c)) != before.get(c)}
                    journal.append(update_entry(self._run_id, self.table, {"id": record_id}, before, after))
            bulk_update(connection, self.table, rows)
        if self._changed_crosswalk:
            now = dt.datetime.now(dt.UTC)
            updates = [
                {"_id": e.id, "last_synced_hash": e.last_synced_hash, "last_synced_at": now,
                 "updated_run_id": self._run_id, "corrected_by": e.corrected_by}
                for e in self._changed_crosswalk.values()
            ]  # fmt: skip
            bulk_update(connection, xw, updates)
            for entry, written in zip(self._changed_crosswalk.values(), updates, strict=True):
                if entry.row is not None and entry.id not in self._xw_journaled:
                    after = {k: v for k, v in written.items() if k != "_id"}
                    journal.append(update_entry(self._run_id, xw, {"id": entry.id}, entry.row, after))
            self._xw_journaled.update(self._changed_crosswalk)
        if journal:
            write_journal(connection, journal)
        if self._rejects:
            # (location, row ref) of the current batch's rows; a self-reference's row may be known already
            unread = [reject for reject in self._rejects if isinstance(reject["raw_row"], tuple)]
            raw_rows = self._raw.many([reject["raw_row"] for reject in unread])
            for reject, raw_row in zip(unread, raw_rows, strict=True):
                reject["raw_row"] = raw_row
            bulk_insert(connection, _REJECTS, self._rejects)
        # Statistics go stale when a table grows by a large share: refreshed after 50,000 new rows, then each
        # time the load has doubled what it wrote (an ANALYZE of a large table costs about a second).
        if self._inserted_since_analyze >= max(ANALYZE_AFTER_ROWS, self._inserted_before_analyze):
            self._analyze()
        self._rows.clear()
        self._crosswalk.clear()  # flushed: the next chunk reads what it needs by key
        self._new_records.clear()
        self._changed_records.clear()
        self._new_crosswalk.clear()
        self._changed_crosswalk.clear()
        self._rejects = []

    def _analyze(self) -> None:
        refresh_statistics(self.session.connection(), [self.table.name, "external_ids"])
        self._inserted_before_analyze += self._inserted_since_analyze
        self._inserted_since_analyze = 0

    def _resolve_self_references(self) -> None:
        if not self._pending_self_refs:
            return
        by_system: dict[str, set[str]] = defaultdict(set)
        own_keys: dict[str, set[str]] = defaultdict(set)
        for source, _, _, key, _, value, lookup, _ in self._pending_self_refs:
            own_keys[source].add(key)
            by_system[lookup.system or source].add(str(value))
        own = {s: self._crosswalk_ids(self.entity.name, s, k) for s, k in own_keys.items()}
        targets = {s: self._crosswalk_ids(self.entity.name, s, k) for s, k in by_system.items()}
        wanted: dict[int, dict[str, int]] = defaultdict(dict)
        for index, (source, location, ref, key, name, value, lookup, mapping) in enumerate(
            self._pending_self_refs
        ):
            system = lookup.system or source
            own_id = own[source].get(key)
            if own_id is None:
                continue
            record_id = self._survivor_id(own_id)
            target_id = targets[system].get(str(value))
            if target_id is None:
                self._reject(source, location, ref, name, value, "reference",
                             f"{self.entity.name} with {system} key '{value}' not found", "warn",
                             mapping=mapping, key=key)  # fmt: skip
                if index in self._self_ref_rows:
                    self._rejects[-1]["raw_row"] = self._self_ref_rows[index]
            elif target_id != record_id:
                wanted[record_id][self._columns[name]] = target_id
        self._fetch_records(set(wanted))
        for record_id, columns in wanted.items():
            row = self._record(record_id)
            changed = {c: v for c, v in columns.items() if row.get(c) != v}
            if changed:
                self._touch(record_id, row, journal=True)
                row.update(changed)
        self._flush()


_REJECTS: Table = Reject.__table__  # type: ignore[assignment]


def _follow(merged_into: Mapping[int, int], record_id: int) -> int:
    """Return the surviving record a (possibly merged) record's merges lead to."""
    seen: set[int] = set()
    while record_id in merged_into and record_id not in seen:
        seen.add(record_id)
        record_id = merged_into[record_id]
    return record_id
