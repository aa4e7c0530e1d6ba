"""The run journal: every row a load run inserts, changes or deletes is recorded with its before-image.

A session opted in with :func:`journal_session` writes one ``row_changes`` entry per flushed change,
in the same transaction as the change itself, so the journal can never disagree with the data. Replaying
a run's entries newest first restores the core exactly as it was before the run (see ``crm_core.runs``).
The before-image is read from the database just before the flush, so it is right even for attributes
the session never loaded.

Set-based writers (the loader, merges) bypass the session and insert their entries themselves with
:func:`insert_entry` and :func:`update_entry`. A merge's entries carry its ``merge_id`` and the values it
wrote (``after``), so a single merge can be undone column by column (``crm_core.merging.undo_merge``).
"""

from __future__ import annotations

import datetime as dt
import json
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from decimal import Decimal
from operator import itemgetter
from typing import Any

from sqlalchemy import (
    JSON,
    BindParameter,
    Column,
    ColumnElement,
    Connection,
    Date,
    DateTime,
    Numeric,
    Table,
    any_,
    bindparam,
    event,
    func,
    insert,
    inspect,
    literal_column,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session, UOWTransaction

from crm_core.models import Base, RowChange

JOURNAL_RUN = "journal_run_id"
_PENDING = "journal_pending"
# Bookkeeping tables are not journaled: they record runs rather than being changed by them.
NOT_JOURNALED = frozenset({"load_runs", "rejects", "row_changes"})


def journal_session(session: Session, run_id: int) -> None:
    """Record every change ``session`` flushes from now on as made by load run ``run_id``."""
    session.info[JOURNAL_RUN] = run_id


def plain_decimal(value: Decimal) -> str:
    """Return a decimal as people write it: no trailing zeros after the point, never an exponent (``50000``).

    ``Decimal.normalize`` would round to the context's 28 digits and write ``5E+4``; this strips the zeros
    digit by digit instead.
    """
    if not value.is_finite():
        return str(value)
    sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # finite
    if not any(digits):
        return "0"
    while exponent < 0 and digits[-1] == 0:
        digits, exponent = digits[:-1], exponent + 1
    return format(Decimal((sign, digits, exponent)), "f")


SPREADSHEET_DIGITS = 15  # significant digits a spreadsheet keeps of a number


def decimal_cell(value: Decimal) -> int | float | str:
    """Return a decimal as a number a spreadsheet and JSON hold exactly, else as :func:`plain_decimal` text.

    A number with more than 15 significant digits (an 18-digit code held in a DECIMAL column) would lose its
    last digits in a spreadsheet: it stays text, written whole.
    """
    text = plain_decimal(value)
    if not value.is_finite() or len(text.lstrip("-").replace(".", "").lstrip("0")) > SPREADSHEET_DIGITS:
        return text
    return int(text) if "." not in text else float(text)


def to_json(value: Any) -> Any:
    """Return a JSON-safe form of a column value (Decimal and dates as text)."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    return value


def from_json(column: Column[Any], value: Any) -> Any:
    """Return the column's Python value for what :func:`to_json` stored."""
    if value is None:
        return None
    if isinstance(column.type, Numeric):
        return Decimal(value)
    if isinstance(column.type, DateTime):
        return dt.datetime.fromisoformat(value)
    if isinstance(column.type, Date):
        return dt.date.fromisoformat(value)
    return value


def row_key(table: Table, values: dict[str, Any]) -> str:
    """Return a row's primary key as canonical JSON (the journal's row identity)."""
    pk = table.primary_key.columns
    if len(pk) == 1 and pk[0].name == "id" and type(values["id"]) is int:  # the common case, without json
        return f'{{"id": {values["id"]}}}'
    return json.dumps({c.name: to_json(values[c.name]) for c in table.primary_key.columns}, sort_keys=True)


def _table(instance: Any) -> Table | None:
    table = getattr(type(instance), "__table__", None)
    if not isinstance(table, Table) or table.name in NOT_JOURNALED or not isinstance(instance, Base):
        return None
    return table


def _pk_values(instance: Any, table: Table) -> dict[str, Any]:
    state = inspect(instance)
    mapper = state.mapper
    return {
        c.name: getattr(instance, mapper.get_property_by_column(c).key) for c in table.primary_key.columns
    }


def comparable(column: Column[Any], value: Any) -> Any:
    """Return a column value in a form that compares equal however it was stored or read back.

    Accepts both database values and their :func:`to_json` form. Instants compare in UTC without a zone
    (SQLite keeps the wall-clock part only, PostgreSQL returns them in the session's zone).
    """
    if isinstance(value, str) and isinstance(column.type, Numeric | DateTime | Date):
        value = from_json(column, value)
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        value = value.astimezone(dt.UTC).replace(tzinfo=None)
    if isinstance(value, Decimal):
        return value.normalize()
    return value


def update_entry(
    run_id: int,
    table: Table,
    key: dict[str, Any],
    before: dict[str, Any],
    after: dict[str, Any],
    merge_id: int | None = None,
) -> dict[str, Any]:
    """Return a ``row_changes`` row for an update written with a Core statement (values as JSON)."""
    return {"load_run_id": run_id, "table_name": table.name, "row_key": row_key(table, key),
            "operation": "update", "before": {k: to_json(v) for k, v in before.items()},
            "after": {k: to_json(v) for k, v in after.items()}, "merge_id": merge_id}  # fmt: skip


def insert_entry(run_id: int, table: Table, key: dict[str, Any]) -> dict[str, Any]:
    """Return a ``row_changes`` row for a row inserted with a Core statement."""
    return {"load_run_id": run_id, "table_name": table.name, "row_key": row_key(table, key),
            "operation": "insert", "before": None, "after": None, "merge_id": None}  # fmt: skip


def id_parts(connection: Connection, ids: Sequence[int]) -> Iterator[Sequence[int]]:
    """Yield sorted, distinct ids in slices sized for :func:`ids_in` on this database."""
    ordered = sorted(set(ids))
    size = 20_000 if connection.dialect.name == "postgresql" else 1000
    for start in range(0, len(ordered), size):
        yield ordered[start : start + size]


def ids_in(connection: Connection, column: ColumnElement[Any], ids: Sequence[Any]) -> ColumnElement[bool]:
    """Return ``column IN (ids)``; on PostgreSQL ``column = ANY(:ids)``, one array parameter for any count.

    Ids or keys of any column type. psycopg parses a query with thousands of placeholders slowly; one
    array parameter costs nothing.
    """
    if connection.dialect.name == "postgresql":
        return column == any_(bindparam(None, list(ids), type_=postgresql.ARRAY(column.type)))
    if connection.dialect.name == "sqlite" and _json_keys(column, ids):
        # One JSON array parameter read by json_each (SQLite's ANY(array)): binding thousands of expanded
        # parameters costs SQLAlchemy more Python per key than the lookup itself.
        keys: BindParameter[str] = bindparam(None, json.dumps(list(ids), ensure_ascii=False))
        return column.in_(select(literal_column("value")).select_from(func.json_each(keys)))
    return column.in_(ids)


def _json_keys(column: ColumnElement[Any], ids: Sequence[Any]) -> bool:
    """Whether ``json_each`` returns these keys as the column stores them, so ``IN`` compares them alike.

    json_each's values carry no column affinity: an int key would not match the text '5' that ``IN (5)``
    matches, so only text keys for a text column and integer keys for an integer column go that way.
    SQLite's JSON reader ends a string at an escaped NUL, so keys holding one keep the plain ``IN``.
    """
    if not len(ids):
        return False
    try:
        kind = column.type.python_type
    except NotImplementedError:
        return False
    if kind is str:
        return all(type(i) is str and "\x00" not in i for i in ids)
    if kind is int:
        return all(type(i) is int and -(2**63) <= i < 2**63 for i in ids)
    return False


def key_condition(table: Table, keys: Sequence[dict[str, Any]]) -> ColumnElement[bool]:
    """Return ``pk IN (...)`` for these primary keys (a tuple ``IN`` for composite keys)."""
    pk = list(table.primary_key.columns)
    if len(pk) == 1:
        return pk[0].in_([key[pk[0].name] for key in keys])
    return tuple_(*pk).in_([tuple(key[c.name] for c in pk) for key in keys])


def read_rows(
    connection: Connection, table: Table, keys: Iterable[dict[str, Any]], chunk: int = 1000
) -> dict[str, dict[str, Any]]:
    """Return the current rows for these primary keys by journal row key, values as JSON."""
    found: dict[str, dict[str, Any]] = {}
    key_list = list(keys)
    for start in range(0, len(key_list), chunk):
        part = key_list[start : start + chunk]
        for row in connection.execute(select(table).where(key_condition(table, part))).mappings():
            values = dict(row)
            found[row_key(table, values)] = {k: to_json(v) for k, v in values.items()}
    return found


def _copy(
    connection: Connection, table_name: str, names: Sequence[str], rows: Iterable[Sequence[Any]]
) -> None:
    """Stream rows into a PostgreSQL table with ``COPY … FROM STDIN`` (inside the current transaction)."""
    quote = connection.dialect.identifier_preparer.quote
    driver: Any = connection.connection.driver_connection
    with (
        driver.cursor() as cursor,
        cursor.copy(f"COPY {quote(table_name)} ({', '.join(quote(n) for n in names)}) FROM STDIN") as copy,
    ):
        for row in _dates_as_text(driver, rows):
            copy.write_row(row)


def _dates_as_text(driver: Any, rows: Iterable[Sequence[Any]]) -> Iterable[Sequence[Any]]:
    """Return ``rows`` with each date and datetime replaced by the text psycopg writes for it in ``COPY``.

    The same bytes reach the server, but each value object is formatted once: psycopg takes about 2 µs per
    datetime, and a chunk's rows share their timestamps (created_at, updated_at, last_synced_at).
    """
    from psycopg.adapt import PyFormat, Transformer  # here: a run on SQLite never imports psycopg

    rows = list(rows)
    if not rows:
        return rows
    columns: list[Sequence[Any]] = list(zip(*rows, strict=True))
    transformer = Transformer.from_context(driver)
    converted = False
    for i, column in enumerate(columns):
        if not set(map(type, column)) & {dt.datetime, dt.date}:
            continue
        # by object (the column holds them all, so no id is reused): each distinct one formatted once
        texts: dict[int, str] = {}
        for identity, value in dict(zip(map(id, column), column, strict=True)).items():
            if type(value) is dt.datetime or type(value) is dt.date:
                dumped = transformer.get_dumper(value, PyFormat.TEXT).dump(value)
                assert dumped is not None  # (None only for a None value)
                texts[identity] = bytes(dumped).decode("ascii")
        columns[i] = list(map(texts.get, map(id, column), column))  # the text, or the value itself
        converted = True
    return list(zip(*columns, strict=True)) if converted else rows


def _copy_values(
    table: Table, names: Sequence[str], rows: Sequence[dict[str, Any]]
) -> Iterator[tuple[Any, ...]]:
    as_json = [n != "_id" and isinstance(table.c[n].type, JSON) for n in names]
    if not any(as_json):  # plain values: one C-level itemgetter call per row
        pick = itemgetter(*names) if len(names) > 1 else (lambda row: (row[names[0]],))
        yield from map(pick, rows)
        return
    for row in rows:
        yield tuple(
            json.dumps(row[n], ensure_ascii=False) if j and row[n] is not None else row[n]
            for n, j in zip(names, as_json, strict=True)
        )


# Values whose equal ones bind alike (Decimal is not: 1.0 and 1.00 are equal and may bind as different text).
_CACHEABLE = frozenset({dt.datetime, dt.date, bool, int, str})
_MISSING = object()


def _driver_values(
    connection: Connection, table: Table, names: Sequence[str], rows: Sequence[dict[str, Any]]
) -> list[tuple[Any, ...]]:
    """Return rows as the driver's parameter tuples, through each column type's bind processor."""
    dialect = connection.dialect
    processors = [
        (table.c.id if n == "_id" else table.c[n]).type.dialect_impl(dialect).bind_processor(dialect)
        for n in names
    ]
    pick = itemgetter(*names) if len(names) > 1 else (lambda row: (row[names[0]],))
    plain = [pick(row) for row in rows]  # one C-level itemgetter call per row
    converted = [(i, p) for i, p in enumerate(processors) if p is not None]
    if not converted or not plain:
        return plain
    # Column by column: a chunk's rows share many values (its timestamps, dates, flags), each converted once.
    columns = list(zip(*plain, strict=True))
    for i, process in converted:
        seen: dict[tuple[Any, ...], Any] = {}
        column: list[Any] = []
        for value in columns[i]:
            if value is None:
                column.append(None)
                continue
            kind = type(value)
            if kind not in _CACHEABLE:
                column.append(process(value))
                continue
            # by type too (1 and True are equal keys and bind differently), and by zone: equal instants in
            # two zones are equal keys and are written as their own wall-clock times
            key = (kind, value, value.tzinfo) if kind is dt.datetime else (kind, value)
            cached = seen.get(key, _MISSING)
            if cached is _MISSING:
                cached = seen[key] = process(value)
            column.append(cached)
        columns[i] = tuple(column)
    return list(zip(*columns, strict=True))


def bulk_insert(
    connection: Connection, table: Table, rows: Sequence[dict[str, Any]], *, return_ids: bool = False
) -> list[int]:
    """Insert rows (all with the same keys) set-based; with ``return_ids``, their new ids in row order.

    SQLite: executemany in the transaction. PostgreSQL: ``COPY`` (multi-row VALUES spends its time parsing
    and binding tens of thousands of placeholders); ids are drawn from the table's sequence first.
    """
    if not rows:
        return []
    if connection.dialect.name != "postgresql":
        if return_ids:
            statement = insert(table).returning(table.c.id, sort_by_parameter_order=True)
            return [int(i) for i in connection.execute(statement, list(rows)).scalars()]
        if connection.dialect.name == "sqlite":
            names = list(rows[0])
            quote = connection.dialect.identifier_preparer.quote
            sql = f"INSERT INTO {quote(table.name)} ({', '.join(quote(n) for n in names)}) VALUES ({', '.join('?' * len(names))})"
            connection.exec_driver_sql(sql, _driver_values(connection, table, names, rows))
            return []
        connection.execute(insert(table), list(rows))
        return []
    ids: list[int] = []
    if return_ids:
        sequence = connection.scalar(text("SELECT pg_get_serial_sequence(:t, 'id')"), {"t": table.name})
        ids = sorted(connection.scalars(text("SELECT nextval(:s) FROM generate_series(1, :n)"),
                                        {"s": sequence, "n": len(rows)}))  # fmt: skip
        rows = [{**row, "id": i} for row, i in zip(rows, ids, strict=True)]
    names = list(rows[0])
    _copy(connection, table.name, names, _copy_values(table, names, rows))
    return ids


def bulk_update(connection: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """Update rows by id: each row holds ``_id`` and the new values of the same columns.

    SQLite: executemany. PostgreSQL: ``COPY`` into a temporary table, then one ``UPDATE … FROM`` it.
    No ``onupdate`` default applies: pass ``updated_at`` when it should change.
    """
    if not rows:
        return
    if connection.dialect.name == "sqlite":
        quote = connection.dialect.identifier_preparer.quote
        names = [n for n in rows[0] if n != "_id"]
        sql = f"UPDATE {quote(table.name)} SET {', '.join(f'{quote(n)} = ?' for n in names)} WHERE id = ?"
        connection.exec_driver_sql(sql, _driver_values(connection, table, [*names, "_id"], rows))
        return
    if connection.dialect.name != "postgresql":
        connection.execute(update(table).where(table.c.id == bindparam("_id")), list(rows))
        return
    quote = connection.dialect.identifier_preparer.quote
    names = list(rows[0])
    columns = [n for n in names if n != "_id"]
    scratch = f"_bulk_{table.name}"
    kinds = ", ".join(f"{quote(n)} {table.c[n].type.compile(dialect=connection.dialect)}" for n in columns)
    connection.execute(text(f"CREATE TEMPORARY TABLE {scratch} (_id INTEGER, {kinds}) ON COMMIT DROP"))
    _copy(connection, scratch, names, _copy_values(table, names, rows))
    assignments = ", ".join(f"{quote(n)} = s.{quote(n)}" for n in columns)
    # Right after a bulk load the table's statistics are stale: the planner may hash-join the whole table
    # against a few thousand keys. An update by primary key is an index lookup per row.
    connection.execute(text("SET LOCAL enable_hashjoin = off"))
    connection.execute(text("SET LOCAL enable_mergejoin = off"))
    connection.execute(
        text(
            f"UPDATE {quote(table.name)} SET {assignments} FROM {scratch} s WHERE {quote(table.name)}.id = s._id"
        )
    )
    connection.execute(text("SET LOCAL enable_hashjoin TO DEFAULT"))
    connection.execute(text("SET LOCAL enable_mergejoin TO DEFAULT"))
    connection.execute(text(f"DROP TABLE {scratch}"))


def write_journal(connection: Connection, entries: Sequence[dict[str, Any]]) -> None:
    """Insert journal rows built by :func:`insert_entry` and :func:`update_entry` in a few statements."""
    bulk_insert(connection, Base.metadata.tables["row_changes"], entries)


def _read_rows(session: Session, table: Table, keys: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Read the current database rows for these primary keys (before the flush changes them)."""
    return read_rows(session.connection(), table, keys)


@event.listens_for(Session, "before_flush")
def _before_flush(session: Session, _flush: UOWTransaction, _instances: Any) -> None:
    run_id = session.info.get(JOURNAL_RUN)
    if run_id is None:
        return
    changed: dict[Table, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    for operation, instances in (("update", session.dirty), ("delete", session.deleted)):
        for instance in instances:
            table = _table(instance)
            if table is None or (operation == "update" and not session.is_modified(instance)):
                continue
            changed[table].append((operation, _pk_values(instance, table)))
    entries: list[dict[str, Any]] = []
    for table, items in changed.items():
        before = _read_rows(session, table, (key for _, key in items))
        for operation, key in items:
            identity = row_key(table, key)
            if identity in before:  # not yet in the database: its insert is journaled instead
                entries.append({"load_run_id": run_id, "table_name": table.name, "row_key": identity,
                                "operation": operation, "before": before[identity]})  # fmt: skip
    # Inserts get their primary keys during the flush; remember the objects and journal them after it.
    session.info[_PENDING] = (entries, [i for i in session.new if _table(i) is not None])


@event.listens_for(Session, "after_flush")
def _after_flush(session: Session, _flush: UOWTransaction) -> None:
    run_id = session.info.get(JOURNAL_RUN)
    pending = session.info.pop(_PENDING, None)
    if run_id is None or pending is None:
        return
    changes, inserted = pending
    # Inserts first: replayed newest first, a flush's updates (which may point at its new rows) are undone
    # before its new rows are deleted.
    entries: list[dict[str, Any]] = []
    for instance in inserted:
        table = _table(instance)
        assert table is not None
        entries.append({"load_run_id": run_id, "table_name": table.name,
                        "row_key": row_key(table, _pk_values(instance, table)), "operation": "insert",
                        "before": None})  # fmt: skip
    entries.extend(changes)
    if entries:
        session.connection().execute(insert(RowChange), entries)
