"""ERP databases through ODBC (pyodbc + unixODBC): U8 and K/3 on SQL Server, or anything with a driver.

pyodbc is imported only when an ODBC source is used, so the toolkit runs without unixODBC installed.
Legacy Chinese ERPs often store GBK/GB18030 in CHAR columns: ``encoding`` decodes them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pandas as pd

from crm_core.errors import ExtractError, TransientExtractError, mask_secrets
from integration.connectors.base import ReadRequest, tag_rows

# SQLSTATE classes worth retrying: connection problems (08), timeouts (HYT), deadlocks/serialization (40).
_TRANSIENT_STATES = ("08", "HYT", "40")
_UTF8_DRIVERS = re.compile(r"maodbc|myodbc", re.IGNORECASE)
# DBMS names ODBC drivers report -> the SQL dialect a ``where`` is rendered in.
_DIALECTS = (("sql server", "tsql"), ("mariadb", "mysql"), ("mysql", "mysql"), ("postgres", "postgres"),
             ("sqlite", "sqlite"), ("oracle", "oracle"))  # fmt: skip


def mask_connection_string(text: str) -> str:
    """Mask ``PWD=...`` / ``PASSWORD=...`` in an ODBC connection string or message."""
    return mask_secrets(text)


def _pyodbc() -> Any:
    try:
        import pyodbc
    except ImportError as exc:  # libodbc.so missing, or the extra not installed
        raise ImportError(
            "ODBC sources need pyodbc and unixODBC: pip install 'crm-integration[odbc]' and "
            "apt-get install unixodbc plus the database's ODBC driver"
        ) from exc
    return pyodbc


class OdbcConnector:
    """Tables and queries of a database reached by an ODBC DSN or connection string."""

    def __init__(
        self,
        name: str,
        connection_string: str,
        *,
        encoding: str | None = None,
        schema: str | None = None,
        timeout: int = 30,
    ) -> None:
        self.name = name
        self._connection_string = connection_string  # holds secrets: never put it in a message
        self.encoding = encoding
        self.schema = schema
        self.timeout = timeout

    def describe(self) -> str:
        """Return the connection string with its password masked."""
        return "odbc:" + mask_connection_string(self._connection_string)

    def _fail(self, exc: Exception, doing: str) -> ExtractError:
        state = str(exc.args[0]) if getattr(exc, "args", None) else ""
        detail = mask_connection_string(str(exc.args[-1] if getattr(exc, "args", None) else exc))
        message = f"{doing} failed ({self.describe()}): [{state}] {detail.strip()}"
        if state.startswith(_TRANSIENT_STATES):
            return TransientExtractError(self.name, message + "; check the server is reachable")
        return ExtractError(self.name, message)

    def connect(self) -> Any:
        """Open a connection with the configured decoding (read-only use, autocommit)."""
        pyodbc = _pyodbc()
        try:
            connection = pyodbc.connect(self._connection_string, autocommit=True, timeout=self.timeout)
        except pyodbc.Error as exc:
            raise self._fail(exc, "connecting") from None
        if self.encoding:
            # CHAR data in a legacy code page (GBK, GB18030, Big5); wide columns stay UTF-16.
            connection.setdecoding(pyodbc.SQL_CHAR, encoding=self.encoding)
            connection.setencoding(encoding=self.encoding)
        elif _UTF8_DRIVERS.search(str(connection.getinfo(pyodbc.SQL_DRIVER_NAME))):
            # MariaDB/MySQL drivers hand over UTF-8 even for wide columns; decoded as UTF-16 by default,
            # multi-byte Chinese text comes back cut short (seen: 广州鼎盛物流有限公 for …有限公司).
            connection.setdecoding(pyodbc.SQL_CHAR, encoding="utf-8")
            connection.setdecoding(pyodbc.SQL_WCHAR, encoding="utf-8")
            connection.setencoding(encoding="utf-8")
        return connection

    def _quote(self, connection: Any, identifier: str) -> str:
        pyodbc = _pyodbc()
        quote = connection.getinfo(pyodbc.SQL_IDENTIFIER_QUOTE_CHAR) or '"'
        quote = quote.strip() or '"'
        return f"{quote}{identifier.replace(quote, quote * 2)}{quote}"

    def _qualified(self, connection: Any, table: str) -> str:
        name = self._quote(connection, table)
        return f"{self._quote(connection, self.schema)}.{name}" if self.schema else name

    def list_tables(self) -> list[str]:
        """Return the table and view names the driver reports."""
        pyodbc = _pyodbc()
        connection = self.connect()
        try:
            catalog = (
                connection.getinfo(pyodbc.SQL_DATABASE_NAME) or None
            )  # MariaDB lists every catalog otherwise
            rows = connection.cursor().tables(catalog=catalog, schema=self.schema).fetchall()
            return sorted({str(r.table_name) for r in rows if str(r.table_type).upper() in ("TABLE", "VIEW")})
        except pyodbc.Error as exc:
            raise self._fail(exc, "listing tables") from None
        finally:
            connection.close()

    def _described_columns(self, build_select: Callable[[Any], str], doing: str) -> list[str]:
        """Run the SELECT built for a connection, with a false condition; return the described column names."""
        pyodbc = _pyodbc()
        connection = self.connect()
        try:
            cursor = connection.cursor()
            cursor.execute(build_select(connection) + " WHERE 1 = 0")
            return [str(d[0]) for d in cursor.description]
        except pyodbc.Error as exc:
            raise self._fail(exc, doing) from None
        finally:
            connection.close()

    def columns(self, table: str, header_row: int | None = None) -> list[str]:
        """Return the column names of ``table`` in their declared order."""
        try:
            return self._described_columns(
                lambda connection: f"SELECT * FROM {self._qualified(connection, table)}",
                f"reading the columns of '{table}'",
            )
        except ExtractError:
            tables = self.list_tables()
            if table not in tables:
                raise ExtractError(
                    self.name, f"table '{table}' does not exist; tables: {', '.join(tables)}"
                ) from None
            raise

    def query_columns(self, query: str) -> list[str]:
        """Return the column names a SELECT produces."""
        return self._described_columns(lambda _connection: f"SELECT * FROM ({query}) q", "checking the query")

    def _where_sql(self, connection: Any, request: ReadRequest) -> str:
        """Return the ``where`` expression in the server's SQL dialect (told by the driver's DBMS name)."""
        from integration.mappings.expressions import ExpressionError, parse

        try:
            expression = parse(str(request.where), condition=True)
        except ExpressionError as exc:
            raise ExtractError(self.name, f"where of {request.table}: {exc.message}") from None
        pyodbc = _pyodbc()
        dbms = str(connection.getinfo(pyodbc.SQL_DBMS_NAME) or "").lower()
        dialect = next(
            (d for name, d in _DIALECTS if name in dbms),
            None,
        )
        return expression.sql(dialect)

    def _statement(self, connection: Any, request: ReadRequest) -> tuple[str, list[Any]]:
        source = f"({request.query}) q" if request.query else self._qualified(connection, request.table)
        clauses: list[str] = []
        params: list[Any] = []
        if request.where and not request.query:
            clauses.append(f"({self._where_sql(connection, request)})")
        if request.cursor_column and request.cursor_from is not None:
            clauses.append(f"{self._quote(connection, request.cursor_column)} >= ?")
            params.append(request.cursor_from)
        sql = f"SELECT * FROM {source}"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        order: Sequence[str] = [*([request.cursor_column] if request.cursor_column else []), *request.key]
        if order:
            sql += " ORDER BY " + ", ".join(self._quote(connection, c) for c in order)
        return sql, params

    def read(self, request: ReadRequest) -> Iterator[pd.DataFrame]:
        """Yield rows in chunks of ``chunk_rows`` fetched with ``fetchmany`` (the server streams)."""
        pyodbc = _pyodbc()
        connection = self.connect()
        try:
            cursor = connection.cursor()
            sql, params = self._statement(connection, request)
            cursor.execute(sql, *params)
            columns = [str(d[0]) for d in cursor.description]
            missing = [k for k in request.key if k not in columns]
            if missing:
                raise ExtractError(self.name, f"key column(s) {missing} not in {request.table}")
            offset = 0
            while True:
                rows = cursor.fetchmany(request.chunk_rows)
                if not rows:
                    break
                chunk = pd.DataFrame.from_records([tuple(r) for r in rows], columns=columns)
                yield tag_rows(chunk, request.key, request.table, offset)
                offset += len(chunk)
        except pyodbc.Error as exc:
            raise self._fail(exc, f"reading '{request.table}'") from None
        finally:
            connection.close()
