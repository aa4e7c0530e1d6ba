"""Databases through SQLAlchemy: reflected tables, optional filter, server-side chunked reads.

SQLAlchemy reflects the table and builds the statement in every case. PostgreSQL and MariaDB/MySQL
rows are then streamed through ConnectorX as Arrow batches (no Python object per cell in the driver,
several times faster); other databases, and sources with ``reader: sqlalchemy``, stream through the
SQLAlchemy driver.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.exc import NoSuchTableError, SQLAlchemyError

from crm_core.db import redact_url
from crm_core.errors import ExtractError, TransientExtractError
from integration.connectors.base import ReadRequest, arrow_text, tag_rows

if TYPE_CHECKING:
    import pyarrow as pa


# SQLAlchemy backend -> ConnectorX URL scheme, the URL options it takes, and the ones it does not need
# (ConnectorX always talks utf8mb4 to MySQL).
_ARROW_BACKENDS = {
    "postgresql": ("postgresql", {"sslmode"}, set()),
    "mysql": ("mysql", set(), {"charset"}),
    "mariadb": ("mysql", set(), {"charset"}),
}
_TRANSIENT = ("connection refused", "timed out", "timeout", "connection reset", "broken pipe", "closed")


_DECLARED_TYPE = re.compile(r"([\w ]+)(\(.*?\))?")


def sqlite_column_type(declared: str, known: Mapping[str, Any]) -> sa.types.TypeEngine[Any]:
    """Return the type of a SQLite column declared as ``declared`` (``known``: the dialect's type names).

    As SQLAlchemy's own reflection does — a known name, else SQLite's affinity rules (sqlite.org/datatype3)
    — except that arguments the type cannot take (``INTEGER(11)``, ``TINYINT(1)``: MySQL display widths in
    SuiteCRM databases copied to SQLite, which SQLite ignores) are dropped quietly instead of with a warning.
    """
    match = _DECLARED_TYPE.match(declared.upper())
    name, arguments = (match.group(1), match.group(2)) if match else ("", None)
    kind: Any
    if name in known:
        kind = known[name]
    elif "INT" in name:
        kind = sa.INTEGER
    elif "CHAR" in name or "CLOB" in name or "TEXT" in name:
        kind = sa.TEXT
    elif "BLOB" in name or not name:
        kind = sa.types.NullType
    elif "REAL" in name or "FLOA" in name or "DOUB" in name:
        kind = sa.REAL
    else:
        kind = sa.NUMERIC
    try:
        return cast("sa.types.TypeEngine[Any]", kind(*(int(n) for n in re.findall(r"\d+", arguments or ""))))
    except TypeError:
        return cast("sa.types.TypeEngine[Any]", kind())


class SqlConnector:
    """A table source in any database SQLAlchemy reaches."""

    def __init__(self, name: str, url: str, schema: str | None = None, *, arrow: bool = True) -> None:
        self.name = name
        self._url = url  # holds secrets: never put it in a message
        self.schema = schema
        self.arrow = arrow  # False: always read through the SQLAlchemy driver
        self._engine: sa.Engine | None = None

    def describe(self) -> str:
        """Return the URL with its password masked."""
        return redact_url(self._url)

    def _scrub(self, text: str) -> str:
        password = sa.engine.make_url(self._url).password
        return text.replace(str(password), "***") if password else text

    def _fail(self, exc: Exception, doing: str) -> ExtractError:
        detail = self._scrub(str(getattr(exc, "orig", None) or exc)).splitlines()[0]
        message = f"{doing} failed at {self.describe()}: {detail}"
        if isinstance(exc, sa.exc.OperationalError):
            return TransientExtractError(
                self.name, message + "; check the server is reachable and the credentials"
            )
        return ExtractError(self.name, message)

    @property
    def engine(self) -> sa.Engine:
        """Return the (lazily created) engine."""
        if self._engine is None:
            try:
                url = sa.engine.make_url(self._url)
                database = (
                    url.database if url.get_backend_name() == "sqlite" and not url.query.get("uri") else None
                )
                if database not in (None, "", ":memory:") and not Path(str(database)).is_file():
                    # SQLite would create an empty file and report its tables as none.
                    raise ExtractError(
                        self.name,
                        f"no SQLite database file {Path(str(database)).resolve()}; check the source's url in "
                        "project.yaml (sqlite:///relative/path is read from the project folder)",
                    )
                self._engine = sa.create_engine(self._url, pool_pre_ping=True)
            except (SQLAlchemyError, ImportError, ValueError) as exc:
                raise ExtractError(
                    self.name, f"cannot use URL {self.describe()}: {self._scrub(str(exc))}"
                ) from None
        return self._engine

    def list_tables(self) -> list[str]:
        """Return the table and view names."""
        try:
            inspector = sa.inspect(self.engine)
            return sorted(inspector.get_table_names(self.schema) + inspector.get_view_names(self.schema))
        except SQLAlchemyError as exc:
            raise self._fail(exc, "listing tables") from None

    def _table(self, table: str) -> sa.Table:
        try:
            if self.engine.dialect.name == "sqlite":
                return self._sqlite_table(table)
            return sa.Table(table, sa.MetaData(), schema=self.schema, autoload_with=self.engine)
        except NoSuchTableError:
            raise ExtractError(
                self.name,
                f"table '{table}' does not exist at {self.describe()}; tables: {', '.join(self.list_tables())}",
            ) from None
        except SQLAlchemyError as exc:
            raise self._fail(exc, f"reading the columns of '{table}'") from None

    def _sqlite_table(self, table: str) -> sa.Table:
        """Describe a SQLite table from ``PRAGMA table_info`` (types: :func:`sqlite_column_type`)."""
        quote = self.engine.dialect.identifier_preparer.quote
        prefix = f"{quote(self.schema)}." if self.schema else ""
        with self.engine.connect() as connection:
            rows = connection.exec_driver_sql(f"PRAGMA {prefix}table_info({quote(table)})").all()
        if not rows:
            raise NoSuchTableError(table)
        known = getattr(self.engine.dialect, "ischema_names", {})
        return sa.Table(
            table,
            sa.MetaData(),
            *(sa.Column(row[1], sqlite_column_type(str(row[2] or ""), known)) for row in rows),
            schema=self.schema,
        )

    def columns(self, table: str, header_row: int | None = None) -> list[str]:
        """Return the column names of ``table``."""
        return [str(c.name) for c in self._table(table).columns]

    def query_columns(self, query: str) -> list[str]:
        """Return the column names a SELECT produces (runs it with a false condition)."""
        try:
            with self.engine.connect() as connection:
                result = connection.execute(sa.text(f"SELECT * FROM ({query}) q WHERE 1 = 0"))
                return [str(k) for k in result.keys()]  # noqa: SIM118 (iterating a Result yields rows)
        except SQLAlchemyError as exc:
            raise self._fail(exc, "checking the query") from None

    def _statement(self, request: ReadRequest) -> tuple[sa.Select[Any] | sa.TextClause, list[str]]:
        order_columns = [*([request.cursor_column] if request.cursor_column else []), *request.key]
        if request.query is not None:
            columns = self.query_columns(request.query)
            missing = [k for k in order_columns if k not in columns]
            if missing:
                raise ExtractError(self.name, f"key/cursor column(s) {missing} not in the query's columns")
            quote = self.engine.dialect.identifier_preparer.quote
            sql = f"SELECT * FROM ({request.query}) q"
            params: dict[str, Any] = {}
            if request.cursor_column and request.cursor_from is not None:
                sql += f" WHERE {quote(request.cursor_column)} >= :cursor_from"
                params["cursor_from"] = request.cursor_from
            if order_columns:
                sql += " ORDER BY " + ", ".join(quote(k) for k in order_columns)
            return sa.text(sql).bindparams(**params), columns
        table = self._table(request.table)
        missing = [k for k in order_columns if k not in table.c]
        if missing:
            raise ExtractError(self.name, f"key column(s) {missing} not in table '{request.table}'")
        statement = sa.select(table)
        if request.where:
            statement = statement.where(self.where_clause(request.where, request.table, table))
        if request.cursor_column and request.cursor_from is not None:
            statement = statement.where(table.c[request.cursor_column] >= request.cursor_from)
        if order_columns:
            statement = statement.order_by(*(table.c[k] for k in order_columns))
        return statement, [c.name for c in table.columns]

    def where_clause(self, where: str, label: str, table: sa.Table) -> sa.TextClause:
        """Return a ``where`` expression as this database's SQL (checked, then rendered by sqlglot)."""
        from integration.mappings.expressions import ExpressionError, parse, sql_dialect

        try:
            expression = parse(where, [str(c.name) for c in table.columns], condition=True)
        except ExpressionError as exc:
            raise ExtractError(self.name, f"where of {label}: {exc.message}") from None
        # Date columns are known from the table: date arithmetic is then written in the dialect's functions.
        dates = tuple(
            (str(c.name), "date") for c in table.columns if isinstance(c.type, sa.Date | sa.DateTime)
        )
        expression = dataclasses.replace(expression, column_kinds=dates)
        dialect = sql_dialect(self.engine.dialect.name)
        return sa.text(expression.sql(dialect).replace(":", "\\:"))

    def aggregate(
        self, table: str, key: str, value: str | None, function: str, where: str | None
    ) -> pd.DataFrame:
        """Return one row per ``key`` with ``function`` of ``value`` as ``value`` and the distinct values as ``n``.

        ``function`` is sum/count/min/max/avg; the grouping runs in the database, only the groups travel.
        """
        source = self._table(table)
        for column in (key, value):
            if column is not None and column not in source.c:
                raise ExtractError(self.name, f"column '{column}' is not in table '{table}'")
        functions: dict[str, Any] = {
            "sum": sa.func.sum,
            "min": sa.func.min,
            "max": sa.func.max,
            "avg": sa.func.avg,
        }
        group = source.c[key]
        if function == "count":
            summary: Any = sa.func.count()
        else:
            summary = functions[function](source.c[str(value)])
        distinct = sa.func.count(sa.distinct(source.c[str(value)])) if value is not None else sa.func.count()
        statement = sa.select(group.label("key"), summary.label("value"), distinct.label("n")).group_by(group)
        if where:
            statement = statement.where(self.where_clause(where, table, source))
        try:
            with self.engine.connect() as connection:
                rows = connection.execute(statement).all()
        except SQLAlchemyError as exc:
            raise self._fail(exc, f"reading '{table}'") from None
        return pd.DataFrame([tuple(r) for r in rows], columns=["key", "value", "n"])

    def arrow_url(self) -> str | None:
        """Return the ConnectorX URL for this source, or None when it reads through SQLAlchemy."""
        url = sa.engine.make_url(self._url)
        backend = _ARROW_BACKENDS.get(url.get_backend_name())
        if not self.arrow or backend is None or importlib.util.find_spec("connectorx") is None:
            return None
        scheme, passed, dropped = backend
        if set(url.query) - passed - dropped:
            return None  # options only the SQLAlchemy driver knows (sockets, SSL files): keep its path
        return url.set(
            drivername=scheme, query={k: v for k, v in url.query.items() if k in passed}
        ).render_as_string(hide_password=False)

    def read(self, request: ReadRequest) -> Iterator[pd.DataFrame]:
        """Yield the rows of the table (filtered by ``where``) in chunks streamed from the server."""
        statement, _ = self._statement(request)
        arrow_url = self.arrow_url()
        if arrow_url is not None:
            yield from self._read_arrow(arrow_url, statement, request)
            return
        try:
            with self.engine.connect() as connection:
                streaming = connection.execution_options(
                    stream_results=True, max_row_buffer=request.chunk_rows
                )
                offset = 0  # without a key, the row's position in the whole result is its reference
                for chunk in pd.read_sql(statement, streaming, chunksize=request.chunk_rows):
                    tag_rows(chunk, request.key, request.table, offset)
                    offset += len(chunk)
                    yield chunk
        except SQLAlchemyError as exc:
            raise self._fail(exc, f"reading '{request.table}'") from None

    def _read_arrow(
        self, url: str, statement: sa.Select[Any] | sa.TextClause, request: ReadRequest
    ) -> Iterator[pd.DataFrame]:
        import connectorx

        # Values are rendered into the SQL (ConnectorX takes no parameters); the dialect quotes them.
        # "named" keeps a literal % as it is (the pymysql/psycopg paramstyles would double it).
        dialect = type(self.engine.dialect)(paramstyle="named")  # type: ignore[call-arg]
        sql = str(statement.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
        try:
            batches = cast(
                "pa.RecordBatchReader",
                connectorx.read_sql(url, sql, return_type="arrow_stream", batch_size=request.chunk_rows),
            )
            scales = _declared_scales(statement)
            offset = 0
            for batch in batches:
                if batch.num_rows == 0:
                    continue
                chunk = _with_declared_scales(batch, scales).to_pandas(types_mapper=arrow_text)
                tag_rows(chunk, request.key, request.table, offset)
                offset += len(chunk)
                yield chunk
        except (RuntimeError, OSError, ValueError) as exc:
            detail = self._scrub(str(exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            message = f"reading '{request.table}' failed at {self.describe()}: {detail}"
            if any(word in detail.lower() for word in _TRANSIENT):
                raise TransientExtractError(self.name, message + "; check the server is reachable") from None
            raise ExtractError(self.name, message) from None

    def dispose(self) -> None:
        """Close pooled connections."""
        if self._engine is not None:
            self._engine.dispose()


def _declared_scales(statement: sa.Select[Any] | sa.TextClause) -> dict[str, int]:
    """Return the scale each DECIMAL/NUMERIC column of a table read declares (none for a ``query``)."""
    if not isinstance(statement, sa.Select):
        return {}
    return {
        str(column.name): column.type.scale
        for column in statement.selected_columns
        if isinstance(column.type, sa.Numeric) and not isinstance(column.type, sa.Float)
        and column.type.scale is not None
    }  # fmt: skip


def _with_declared_scales(batch: pa.RecordBatch, scales: dict[str, int]) -> pa.RecordBatch:
    """Return ``batch`` with each decimal column at the scale its table declares.

    ConnectorX reads every MySQL DECIMAL as decimal128(38, 10): a DECIMAL(14,2) amount of 50000.00 came out
    as ``50000.0000000000`` in previews and fix sheets. The cast is exact (a declared scale holds every value);
    were it not, the column is left as read.
    """
    import pyarrow as pa

    columns = list(batch.columns)
    changed = False
    for position, field in enumerate(batch.schema):
        scale = scales.get(field.name)
        if scale is None or not pa.types.is_decimal(field.type) or field.type.scale <= scale:
            continue
        try:
            columns[position] = columns[position].cast(pa.decimal128(field.type.precision, scale), safe=True)
        except pa.ArrowInvalid:
            continue
        changed = True
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names) if changed else batch
