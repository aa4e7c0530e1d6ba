"""The mapping expression language and the constructs built on it, on a spreadsheet and on SQL sources.

One small order book is written as a workbook (four sheets) and as database tables (SQLite, PostgreSQL);
the same mapping (where, expr, when, a named source lookup, a link table, a child aggregate) must give
the same records and the same row-level rejects from each.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import pandas as pd
import pyarrow as pa
import pytest
import sqlalchemy as sa
from openpyxl import Workbook

from crm_core.errors import ExtractError
from integration.connectors import CsvConnector, ExcelConnector, ReadRequest, SqlConnector
from integration.connectors.base import Connector
from integration.mappings.engine import EXTERNAL_KEY, map_chunks
from integration.mappings.expressions import ExpressionError, evaluate, parse
from integration.mappings.spec import CompiledMapping, load_mapping
from integration.pipeline import Migration, extract_chunks
from tests.conftest import PG_URL, server_or_skip

ORDERS = [
    # id, amount, currency_id, deleted, order_date, note
    (1, 100, -99, 0, dt.date(2024, 1, 10), "ok"),
    (2, 5000, 2, 0, dt.date(2024, 2, 1), None),
    (3, 70, 3, 0, dt.date(2024, 3, 1), "x"),  # rate 0: division by zero
    (4, 10, -99, 1, dt.date(2024, 3, 2), None),  # soft-deleted
    (5, 20, -99, 0, dt.date(2024, 3, 3), "TEST order"),  # a test row
    (6, 30, 2, 0, dt.date(2024, 3, 4), None),  # linked to two accounts
]
CURRENCIES = [(2, 0.5), (3, 0)]
LINKS = [(1, "A1", 0), (2, "A2", 0), (2, "A9", 1), (3, "A3", 0), (6, "A1", 0), (6, "A2", 0)]
LINES = [(1, 60), (1, 40), (2, 5000), (3, 70), (6, 30)]
COLUMNS = {
    "orders": ["id", "amount", "currency_id", "deleted", "order_date", "note"],
    "currencies": ["id", "conversion_rate"],
    "links": ["order_id", "account_id", "deleted"],
    "order_lines": ["order_id", "amount"],
}
ROWS: dict[str, list[tuple[Any, ...]]] = {
    "orders": ORDERS,
    "currencies": CURRENCIES,
    "links": LINKS,
    "order_lines": LINES,
}

MAPPING = """version: 1
source:
  connector: src
  {location}: orders
  where: "deleted = 0 and lower(coalesce(note, '')) not like '%test%'"
  key: id
  lookups:
    rate: {{from: currency_id, lookup: {{table: currencies, key: id, value: conversion_rate}}}}
target: sales_order
fields:
  order_no: {{expr: "'SO-' || id"}}
  customer:
    from: id
    via: {{table: links, from: order_id, to: account_id, where: "deleted = 0"}}
    lookup: {{by: external_id}}
  total_amount: {{from: id, aggregate: {{table: order_lines, key: order_id, function: sum, value: amount}}}}
  currency:
    when:
      - {{if: "rate is null", then: CNY}}
      - else: USD
  status:
    when:
      - {{if: "amount / rate > 1000", then: big}}
      - {{if: "amount > 0", then: {{expr: "'small ' || amount"}}}}
      - else: none
  order_date: {{expr: "order_date + 30"}}
"""


def write_workbook(path: Path) -> None:
    book = Workbook()
    first = True
    for table, columns in COLUMNS.items():
        sheet = book.active if first else book.create_sheet()
        assert sheet is not None
        sheet.title = table
        first = False
        sheet.append(columns)
        for row in ROWS[table]:
            sheet.append(list(row))
    book.save(path)


def write_database(engine: sa.Engine, schema: str | None = None) -> None:
    for table, columns in COLUMNS.items():
        frame = pd.DataFrame(ROWS[table], columns=columns)
        frame.to_sql(table, engine, schema=schema, index=False, if_exists="replace")


def run(mapping: CompiledMapping, connector: Connector) -> tuple[pd.DataFrame, pd.DataFrame]:
    migration = cast("Migration", None)  # extract_chunks needs it only to build a connector
    chunks = list(extract_chunks(migration, mapping, chunk_rows=4, connector=connector))
    result = map_chunks(mapping, chunks, workers=1)
    return result.records.set_index(EXTERNAL_KEY), result.rejects


def check_order_book(
    records: pd.DataFrame, rejects: pd.DataFrame, rows: dict[int, str] | None = None
) -> None:
    """The same expectations for every source: two orders map, two are rejected, two are filtered."""
    assert sorted(records.index) == ["1", "2"]
    one, two = records.loc["1"], records.loc["2"]
    assert (one["order_no"], two["order_no"]) == ("SO-1", "SO-2")
    assert (one["customer"], two["customer"]) == ("A1", "A2")  # the deleted link to A9 is not followed
    assert (one["total_amount"], two["total_amount"]) == (Decimal("100"), Decimal("5000"))
    assert (one["currency"], two["currency"]) == ("CNY", "USD")
    assert (one["status"], two["status"]) == ("small 100", "big")  # no rate: the first branch is unknown
    assert (one["order_date"], two["order_date"]) == (dt.date(2024, 2, 9), dt.date(2024, 3, 2))
    reasons = {(r["row_ref"], r["field"]): r["reason"] for r in rejects.to_dict("records")}
    row = rows or {3: "3", 6: "6"}  # sheets: row numbers; databases: the key
    assert reasons == {
        (row[3], "status"): "division by zero",
        (row[6], "customer"): "2 different account_id in links for order_id = 6",
    }


def test_every_construct_on_a_spreadsheet(tmp_path: Path) -> None:
    book = tmp_path / "orders.xlsx"
    write_workbook(book)
    file = tmp_path / "orders.yaml"
    file.write_text(MAPPING.format(location="sheet"), encoding="utf-8")
    mapping = load_mapping(file)
    records, rejects = run(mapping, ExcelConnector("src", [book], str(book)))
    check_order_book(records, rejects, {3: "4", 6: "7"})


def test_every_construct_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'orders.sqlite'}"
    engine = sa.create_engine(url)
    write_database(engine)
    engine.dispose()
    file = tmp_path / "orders.yaml"
    file.write_text(MAPPING.format(location="table"), encoding="utf-8")
    records, rejects = run(load_mapping(file), SqlConnector("src", url))
    check_order_book(records, rejects)


@pytest.mark.postgres
def test_every_construct_on_postgresql(tmp_path: Path) -> None:
    engine = server_or_skip(PG_URL, "PostgreSQL")
    with engine.begin() as connection:
        connection.execute(sa.text("DROP SCHEMA IF EXISTS expr_orders CASCADE"))
        connection.execute(sa.text("CREATE SCHEMA expr_orders"))
    write_database(engine, schema="expr_orders")
    engine.dispose()
    file = tmp_path / "orders.yaml"
    file.write_text(MAPPING.format(location="table"), encoding="utf-8")
    records, rejects = run(load_mapping(file), SqlConnector("src", PG_URL, schema="expr_orders"))
    check_order_book(records, rejects)


def test_where_is_pushed_down_to_sql_in_the_database_dialect(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'orders.sqlite'}"
    engine = sa.create_engine(url)
    write_database(engine)
    engine.dispose()
    connector = SqlConnector("src", url)
    statement, _ = connector._statement(ReadRequest("orders", where="deleted = 0 and note is not null"))
    sql = str(statement.compile(dialect=connector.engine.dialect))
    assert 'WHERE NOT "deleted" = 0' not in sql and '"deleted" = 0 AND NOT "note" IS NULL' in sql
    rows = pd.concat(connector.read(ReadRequest("orders", where="deleted = 0 and note is not null")))
    assert sorted(rows["id"]) == [1, 3, 5]
    with pytest.raises(ExtractError, match="unknown column 'nope'"):
        list(connector.read(ReadRequest("orders", where="nope = 1")))
    connector.dispose()


def test_where_filters_csv_and_keeps_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "orders.csv"
    path.write_text("id,deleted,note\n1,0,a\n2,1,b\n3,0,\n", encoding="utf-8")
    connector = CsvConnector("src", [path], str(path))
    frame = pd.concat(connector.read(ReadRequest("orders", where="deleted = 0 and note is null")))
    assert list(frame["id"]) == ["3"] and list(frame["_row_ref"]) == ["4"]


def values(text: str, data: dict[str, list[Any]]) -> list[Any]:
    frame = pd.DataFrame(data)
    result = evaluate(parse(text, list(frame.columns)), frame, len(frame))
    return cast("list[Any]", result.values.to_pylist())


def test_operators_and_functions_evaluate_like_sql() -> None:
    text = pd.array(["Ab", " c ", None], dtype=pd.ArrowDtype(pa.string()))
    assert values("lower(s) in ('ab', 'c')", {"s": text}) == [True, False, None]
    assert values("trim(s) = 'c' or s is null", {"s": text}) == [False, True, True]
    assert values("upper(substr(s, 1, 1)) || length(s)", {"s": text}) == ["A2", " 3", None]
    assert values("replace(coalesce(s, '-'), 'b', 'B')", {"s": text}) == ["AB", " c ", "-"]
    assert values("concat(s, '!')", {"s": text}) == ["Ab!", " c !", "!"]
    assert values("n between 2 and 3 and not n = 3", {"n": [1, 2, 3]}) == [False, True, False]
    assert values("round(n / 3, 2) + abs(-1)", {"n": [1, 3, 0]}) == [1.33, 2.0, 1.0]
    assert values("nullif(n, 0) % 2", {"n": [3, 0, 4]}) == [1.0, None, 0.0]
    assert values("case when n > 1 then 'many' when n = 1 then 'one' end", {"n": [0, 1, 5]}) == [
        None,
        "one",
        "many",
    ]
    # CSV cells are text: numbers compare as numbers, dates as dates.
    assert values("n = 0", {"n": ["0", "1", "x"]}) == [True, False, None]
    assert values("d >= '2024-02-01'", {"d": ["2024-01-31", "2024-02-01", None]}) == [False, True, None]
    days = {"d": [dt.datetime(2024, 1, 31), dt.datetime(2024, 3, 1)]}
    assert values("datediff(d, date '2024-01-01')", days) == [30, 60]
    assert values("date_add(d, 1)", days) == [dt.date(2024, 2, 1), dt.date(2024, 3, 2)]
    assert values("year(d) * 100 + month(d)", days) == [202401, 202403]
    assert values("current_date - d > 0", days) == [True, True]
    assert values("cast(n as int) + 1", {"n": ["41", "1.9"]}) == [42, 2]


def test_runtime_failures_are_per_row_reasons() -> None:
    frame = pd.DataFrame({"a": [1, 2], "b": [0, 4], "d": ["2024-01-01", "soon"]})
    divided = evaluate(parse("a / b", list(frame.columns)), frame, 2)
    assert divided.values.to_pylist() == [None, 0.5]
    assert divided.reasons is not None and divided.reasons.to_pylist() == ["division by zero", None]
    dated = evaluate(parse("cast(d as date)", list(frame.columns)), frame, 2)
    assert dated.values.to_pylist() == [dt.date(2024, 1, 1), None]
    assert dated.reasons is not None and dated.reasons.to_pylist() == [None, "'soon' is not a date"]


@pytest.mark.parametrize(
    ("text", "message", "offset"),
    [
        ("nope = 1", "unknown column 'nope'; did you mean 'note'?; columns: note, amount", 0),
        ("lowr(note) = 'a'", "unknown function 'lowr'; did you mean 'lower'?", 0),
        ("amount = = 1", "cannot parse 'amount = = 1'", 9),
        ("lower(amount) = 'a'", "type mismatch: lower needs text, got number (amount)", 6),
        ("lower(note) + 1 > 2", "type mismatch: add needs number or date, got text (LOWER(note))", 0),
        ("amount + 1", "'amount + 1' is a number, not a condition", 0),
        ("note = 'a' and 1", "type mismatch: and needs bool, got number (1)", 15),
        ("'a' = 1", "type mismatch: cannot compare text with number", None),
        ("note like amount", "like takes a quoted pattern", 10),
        ("(select 1) = 1", "is not allowed here", None),
        ("a.note = 1", "'a.note': name a column of this table without a table prefix", None),
    ],
)
def test_what_the_language_refuses(text: str, message: str, offset: int | None) -> None:
    with pytest.raises(ExpressionError) as caught:
        parse(text, ["note", "amount"], condition=True, kinds={"amount": "number"})
    assert message in caught.value.message
    if offset is not None:
        assert caught.value.offset == offset


def test_no_python_eval_path() -> None:
    with pytest.raises(ExpressionError):
        parse("__import__('os').system('true') = 0", ["x"])


SHEET = "version: 1\nsource: {connector: src, sheet: 客户, key: {hash: [客户名称, 联系电话]}}\ntarget: customer\nfields:\n  name: 客户名称\n"


def customers(tmp_path: Path, rows: list[tuple[Any, ...]], name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    book = Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.title = "客户"
    sheet.append(["客户名称", "联系电话"])
    for row in rows:
        sheet.append(list(row))
    path = tmp_path / f"{name}.xlsx"
    book.save(path)
    file = tmp_path / "customers.yaml"
    file.write_text(SHEET, encoding="utf-8")
    mapping = load_mapping(file)
    chunks = list(ExcelConnector("src", [path], str(path)).read(ReadRequest("客户")))
    result = map_chunks(mapping, chunks, workers=1)
    return result.records, result.rejects


def test_hash_keys_survive_inserted_rows_and_report_duplicates(tmp_path: Path) -> None:
    week1 = [("甲公司", 13800138000), ("乙公司", None), ("丙公司", "010-1234")]
    week2 = [("新公司", 1), *week1, ("ＡＢＣ公司 ", None), ("abc公司", None)]
    first, _ = customers(tmp_path, week1, "week1")
    second, rejects = customers(tmp_path, week2, "week2")
    keys1 = dict(zip(first["name"], first[EXTERNAL_KEY], strict=True))
    keys2 = dict(zip(second["name"], second[EXTERNAL_KEY], strict=True))
    assert all(keys2[name] == key for name, key in keys1.items())  # the inserted row re-keys nothing
    assert len(set(keys2.values())) == len(keys2)
    [duplicate] = rejects.to_dict("records")  # NFKC + case: the same customer twice, reported not merged
    assert duplicate["rule"] == "duplicate_key" and duplicate["row_ref"] == "7"
    assert duplicate["reason"] == "duplicate source key (first seen on row 6)"


def test_csv_lookup_reads_the_named_file_of_the_source(tmp_path: Path) -> None:
    (tmp_path / "orders.csv").write_text("id,currency\n1,2\n2,9\n", encoding="utf-8")
    (tmp_path / "rates.csv").write_text("currency,rate\n2,0.5\n", encoding="utf-8")
    file = tmp_path / "orders.yaml"
    file.write_text(
        "version: 1\nsource: {connector: src, table: orders, key: id, lookups: "
        "{rate: {from: currency, lookup: {table: rates, key: currency, value: rate}}}}\n"
        "target: sales_order\nfields:\n  order_no: id\n  customer: {const: c}\n"
        '  total_amount: {expr: "100 * coalesce(rate, 1)"}\n',
        encoding="utf-8",
    )
    paths = sorted(tmp_path.glob("*.csv"))
    connector = CsvConnector("src", paths, "*.csv")
    assert connector.columns("rates") == ["currency", "rate"]
    records, rejects = run(load_mapping(file), connector)
    assert rejects.empty
    assert records["total_amount"].to_dict() == {"1": Decimal("50"), "2": Decimal("100")}


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_date_arithmetic_in_a_pushed_down_where_is_date_arithmetic(tmp_path: Path, backend: str) -> None:
    today = dt.date.today()
    rows = pd.DataFrame(
        {"id": [1, 2, 3], "due": [today - dt.timedelta(days=40), today, today + dt.timedelta(days=5)]}
    )
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'due.sqlite'}"
        engine = sa.create_engine(url)
        schema = None
    else:
        engine = server_or_skip(PG_URL, "PostgreSQL")
        url, schema = PG_URL, "expr_due"
        with engine.begin() as connection:
            connection.execute(sa.text("DROP SCHEMA IF EXISTS expr_due CASCADE"))
            connection.execute(sa.text("CREATE SCHEMA expr_due"))
    rows.to_sql("bills", engine, schema=schema, index=False, dtype={"due": sa.Date()})
    engine.dispose()
    connector = SqlConnector("src", url, schema=schema)
    where = (
        "due + 30 >= current_date and datediff(due, current_date) <= 0 and due > date_add(current_date, -60)"
    )
    frame = pd.concat(connector.read(ReadRequest("bills", where=where, key=("id",))))
    connector.dispose()
    assert list(frame["id"]) == [2]  # 40 days ago is too old, 5 days ahead is not due
