"""Connectors: one contract for every source, Excel layout quirks, SQL filters, queries and chunks."""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa
from openpyxl import Workbook

from crm_core.errors import ExtractError
from integration.connectors import Connector, ExcelConnector, ReadRequest, SqlConnector
from integration.connectors.base import LOCATION, META_COLUMNS, ROW_KIND, ROW_REF
from tests.conftest import MARIADB_URL, PG_URL, server_or_skip


def workbook(path: Path, rows: list[list[object]], sheet: str = "客户") -> Path:
    book = Workbook()
    ws = book.active
    assert ws is not None
    ws.title = sheet
    for row in rows:
        ws.append(row)
    book.save(path)
    return path


MESSY = [
    ["2025年度客户台账"],
    [],
    ["序号", "客户名称", "签约日期", "金额"],
    [1, "深圳市腾达科技有限公司", dt.date(2025, 3, 5), 120000],
    [],
    [2, "ＡＢＣ贸易有限公司", "2025年3月6日", "12.5万"],
    ["合计", None, None, 245000],
    [],
]


def test_excel_skips_title_and_blank_rows_keeps_row_numbers_and_flags_subtotals(tmp_path: Path) -> None:
    path = workbook(tmp_path / "a.xlsx", MESSY)
    connector = ExcelConnector("sheets", [path], "a.xlsx")
    assert connector.columns("客户") == ["序号", "客户名称", "签约日期", "金额"]
    [frame] = list(connector.read(ReadRequest("客户")))
    assert list(frame[ROW_REF]) == ["4", "6", "7"]
    assert list(frame[ROW_KIND]) == ["data", "data", "subtotal"]
    # Columns mixing typed cells and text arrive as text (the mapping's parse_date/parse_amount read both).
    # Text columns stay Arrow-backed (string[pyarrow]); missing cells are pd.NA.
    assert str(frame["签约日期"].dtype) == "string[pyarrow]"
    assert frame["签约日期"].tolist()[:2] == ["2025-03-05 00:00:00", "2025年3月6日"] and frame[
        "签约日期"
    ].isna().tolist() == [False, False, True]
    assert list(frame["金额"]) == ["120000", "12.5万", "245000"]
    assert list(frame["序号"]) == ["1", "2", "合计"]
    assert set(frame[LOCATION]) == {"a.xlsx#客户"}


def test_excel_typed_columns_keep_their_types_and_a_late_text_cell_is_not_lost(tmp_path: Path) -> None:
    rows: list[list[object]] = [["编号", "金额", "签约日期", "时间", "是否重点", "代码"]]
    rows += [
        [i, i + 0.5, dt.datetime(2025, 3, 5, 14, 30), dt.time(9, 15), i % 2 == 0, i] for i in range(1500)
    ]
    rows.append([1500, 1.0, None, None, None, "A-1500"])  # text after 1,500 numbers: beyond any type sample
    [frame] = list(
        ExcelConnector("s", [workbook(tmp_path / "t.xlsx", rows)], "t.xlsx").read(ReadRequest("客户"))
    )
    first = frame.iloc[0]
    assert first["编号"] == 0 and isinstance(first["编号"], int)
    assert first["金额"] == 0.5
    assert first["签约日期"] == dt.datetime(2025, 3, 5, 14, 30)
    assert first["时间"] == "09:15:00"
    assert first["是否重点"] is True
    last = frame.iloc[-1]
    assert (last["金额"], last["签约日期"], last["代码"], last[ROW_REF]) == (1, None, "A-1500", "1502")
    assert isinstance(last["金额"], int)


def test_excel_explicit_header_row_and_chunks(tmp_path: Path) -> None:
    path = workbook(tmp_path / "a.xlsx", MESSY)
    chunks = list(ExcelConnector("s", [path], "a.xlsx").read(ReadRequest("客户", header_row=3, chunk_rows=2)))
    assert [len(c) for c in chunks] == [2, 1]


def test_excel_glob_reads_every_workbook_and_names_each_file(tmp_path: Path) -> None:
    workbook(tmp_path / "east.xlsx", [["客户名称"], ["甲公司"]])
    workbook(tmp_path / "west.xlsx", [["客户名称"], ["乙公司"], ["丙公司"]])
    paths = sorted(tmp_path.glob("*.xlsx"))
    frame = pd.concat(ExcelConnector("s", paths, "*.xlsx").read(ReadRequest("客户")))
    assert list(zip(frame[LOCATION], frame[ROW_REF], strict=True)) == [
        ("east.xlsx#客户", "2"),
        ("west.xlsx#客户", "2"),
        ("west.xlsx#客户", "3"),
    ]


def test_excel_errors_name_the_source_and_what_to_do(tmp_path: Path) -> None:
    path = workbook(tmp_path / "a.xlsx", MESSY)
    with pytest.raises(
        ExtractError, match=r"source 'sheets': workbook a.xlsx has no sheet '商机'; sheets: 客户"
    ):
        list(ExcelConnector("sheets", [path], "a.xlsx").read(ReadRequest("商机")))
    broken = tmp_path / "broken.xlsx"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(
        ExtractError, match=r"source 'sheets': cannot open workbook broken.xlsx: .*valid, unprotected"
    ):
        ExcelConnector("sheets", [broken], "broken.xlsx").list_tables()
    with pytest.raises(
        ExtractError, match=r"no workbook matches data/\*.xlsx; check the path in project.yaml"
    ):
        ExcelConnector("sheets", [], "data/*.xlsx").list_tables()


def suitecrm_sqlite(demo_data: Path) -> str:
    return f"sqlite:///{demo_data / 'legacy_crm.sqlite'}"


def copy_tables(source_url: str, target: sa.Engine, tables: list[str]) -> None:
    source = sa.create_engine(source_url)
    for table in tables:
        sa.Table(table, sa.MetaData()).drop(target, checkfirst=True)
    for table in tables:
        frame = pd.read_sql_table(table, source)
        frame.to_sql(table, target, index=False, chunksize=500)
    source.dispose()


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ]
)
def suitecrm(request: pytest.FixtureRequest, demo_data: Path) -> Iterator[str]:
    """The demo's SuiteCRM database on SQLite, PostgreSQL or MariaDB."""
    if request.param == "sqlite":
        yield suitecrm_sqlite(demo_data)
        return
    url = PG_URL if request.param == "postgres" else MARIADB_URL
    engine = server_or_skip(url, request.param)
    copy_tables(suitecrm_sqlite(demo_data), engine, ["accounts", "accounts_contacts", "contacts"])
    engine.dispose()
    yield url


def excel_connector(demo_data: Path) -> Connector:
    return ExcelConnector("sales_xlsx", [demo_data / "sales.xlsx"], "sales.xlsx")


CONTRACT: dict[str, Callable[[Path], tuple[Connector, str]]] = {
    "excel": lambda d: (excel_connector(d), "商机"),
    "sqlite": lambda d: (SqlConnector("legacy_crm", suitecrm_sqlite(d)), "accounts"),
}


@pytest.mark.parametrize("kind", sorted(CONTRACT))
def test_connector_contract(kind: str, demo_data: Path) -> None:
    connector, table = CONTRACT[kind](demo_data)
    check_contract(connector, table)


def check_contract(connector: Connector, table: str) -> None:
    """What every connector promises: tables, columns, chunks with row metadata, unique row refs."""
    assert isinstance(connector, Connector)
    assert table in connector.list_tables()
    columns = connector.columns(table)
    assert columns and all(isinstance(c, str) and c for c in columns)
    chunks = list(connector.read(ReadRequest(table, chunk_rows=10)))
    assert len(chunks) > 1 and all(len(c) <= 10 for c in chunks)
    frame = pd.concat(chunks, ignore_index=True)
    assert [c for c in frame.columns if c not in META_COLUMNS] == columns
    assert set(META_COLUMNS) <= set(frame.columns)
    assert not frame[[LOCATION, ROW_REF]].duplicated().any()
    assert isinstance(connector.describe(), str) and connector.describe()


def test_suitecrm_accounts_with_soft_delete_filter_on_every_database(suitecrm: str, demo_data: Path) -> None:
    connector = SqlConnector("legacy_crm", suitecrm)
    check_contract(connector, "accounts")
    request = ReadRequest("accounts", where="deleted = 0", key=("id",), chunk_rows=25)
    frame = pd.concat(connector.read(request), ignore_index=True)
    with sqlite3.connect(demo_data / "legacy_crm.sqlite") as db:
        expected = sorted(r[0] for r in db.execute("SELECT id FROM accounts WHERE deleted = 0"))
    assert list(frame["id"]) == expected  # ordered by key, soft-deleted rows filtered
    assert list(frame[ROW_REF]) == expected
    query = "SELECT c.id, ac.account_id FROM contacts c JOIN accounts_contacts ac ON ac.contact_id = c.id"
    joined = pd.concat(connector.read(ReadRequest("q", query=query, key=("id",))), ignore_index=True)
    assert connector.query_columns(query) == ["id", "account_id"]
    assert len(joined) > 0 and joined["account_id"].isin(frame["id"]).all()
    connector.dispose()


def test_sql_key_column_must_exist(demo_data: Path) -> None:
    with pytest.raises(ExtractError, match=r"key column\(s\) \['nope'\] not in table 'accounts'"):
        list(
            SqlConnector("legacy_crm", suitecrm_sqlite(demo_data)).read(
                ReadRequest("accounts", key=("nope",))
            )
        )


def test_excel_row_numbers_stay_exact_when_the_sheet_starts_below_a1(tmp_path: Path) -> None:
    book = Workbook()
    ws = book.active
    assert ws is not None
    ws["B3"], ws["C3"], ws["B4"], ws["C4"] = "客户名称", "金额", "甲公司", 1
    book.save(tmp_path / "offset.xlsx")
    [frame] = list(ExcelConnector("s", [tmp_path / "offset.xlsx"], "offset.xlsx").read(ReadRequest("Sheet")))
    assert frame[["客户名称", "金额", ROW_REF]].values.tolist() == [["甲公司", 1, "4"]]


def test_csv_reads_gb18030_exports_and_keeps_line_numbers(tmp_path: Path) -> None:
    from integration.connectors import CsvConnector

    path = tmp_path / "客户导出.csv"
    path.write_bytes(
        "客户名称,电话\n深圳市腾达科技有限公司,0755-86001234\n\n北京华创环保工程有限公司,\n".encode("gb18030")
    )
    connector = CsvConnector("export", [path], "*.csv", encoding="gb18030")
    assert connector.columns("客户导出.csv") == ["客户名称", "电话"]
    [frame] = list(connector.read(ReadRequest("客户导出.csv")))
    assert frame[["客户名称", "电话", ROW_REF]].values.tolist() == [
        ["深圳市腾达科技有限公司", "0755-86001234", "2"],
        ["北京华创环保工程有限公司", None, "4"],
    ]


def test_a_non_utf8_csv_is_one_clear_error_saying_which_encoding_to_set(tmp_path: Path) -> None:
    from integration.connectors import CsvConnector

    path = tmp_path / "export.csv"
    path.write_bytes("客户名称\n深圳市腾达科技有限公司\n".encode("gbk"))
    with pytest.raises(ExtractError) as caught:
        list(CsvConnector("export", [path], "*.csv").read(ReadRequest("export.csv")))
    message = str(caught.value)
    assert message.startswith("source 'export': export.csv is not valid utf-8 (byte 0x")
    assert message.endswith(
        "set encoding: gb18030 (Chinese Windows/Excel exports) for this source in project.yaml"
    )


def test_two_row_headers_under_merged_group_titles(tmp_path: Path) -> None:
    book = Workbook()
    ws = book.active
    assert ws is not None
    ws.title = "客户"
    ws.append(["客户台账"])
    ws.merge_cells("A1:D1")
    ws.append(["客户名称", "联系人", None, "金额"])
    ws.merge_cells("B2:C2")
    ws.merge_cells("A2:A3")
    ws.merge_cells("D2:D3")
    ws.append([None, "姓名", "手机", None])
    ws.append(["甲公司", "王芳", "13800000000", 100])
    book.save(tmp_path / "merged.xlsx")
    connector = ExcelConnector("s", [tmp_path / "merged.xlsx"], "merged.xlsx")
    assert connector.columns("客户") == ["客户名称", "联系人姓名", "联系人手机", "金额"]
    [frame] = list(connector.read(ReadRequest("客户")))
    assert frame.drop(columns=[LOCATION, ROW_KIND]).values.tolist() == [
        ["甲公司", "王芳", "13800000000", 100, "4"]
    ]


def comparable(frame: pd.DataFrame) -> list[list[str]]:
    """Rows as text, nulls as '' (the two readers differ only in how they spell a missing value)."""
    rows = frame.drop(columns=list(META_COLUMNS)).astype(object)
    return sorted(
        [["" if pd.isna(v) else str(v) for v in row] for row in rows.itertuples(index=False, name=None)]
    )


@pytest.mark.parametrize(
    "request_",
    [
        ReadRequest("accounts", key=("id",), chunk_rows=40),
        # A LIKE pattern (a % the DBAPI paramstyles would double) and a cursor value with a quote in it.
        ReadRequest(
            "accounts", where="name LIKE '%科技%'", cursor_column="name", cursor_from="华'x", chunk_rows=7
        ),
    ],
    ids=["table", "filter-and-cursor"],
)
def test_arrow_reader_returns_exactly_what_the_sqlalchemy_reader_returns(
    suitecrm: str, request_: ReadRequest
) -> None:
    if suitecrm.startswith("sqlite"):  # SQLite always reads through SQLAlchemy
        assert SqlConnector("legacy_crm", suitecrm).arrow_url() is None
        return
    fast, plain = SqlConnector("legacy_crm", suitecrm), SqlConnector("legacy_crm", suitecrm, arrow=False)
    assert fast.arrow_url() is not None and plain.arrow_url() is None
    fast_chunks = list(fast.read(request_))
    assert all(len(c) <= request_.chunk_rows for c in fast_chunks)
    fast_frame = pd.concat(fast_chunks, ignore_index=True)
    plain_frame = pd.concat(plain.read(request_), ignore_index=True)
    assert len(fast_frame) > 0
    assert list(fast_frame.columns) == list(plain_frame.columns)
    assert comparable(fast_frame) == comparable(plain_frame)
    assert sorted(fast_frame[ROW_REF]) == sorted(plain_frame[ROW_REF])


def test_sqlite_columns_with_mysql_display_widths_read_without_a_warning(tmp_path: Path) -> None:
    """A SuiteCRM dump copied to SQLite declares ``TINYINT(1)``/``INT(11)``: no SAWarning, same values."""
    import warnings

    db = tmp_path / "crm.sqlite"
    with sqlite3.connect(db) as connection:
        connection.executescript(
            "CREATE TABLE accounts (id char(36) PRIMARY KEY, deleted tinyint(1) DEFAULT 0, employees int(11),"
            " revenue decimal(26,6), date_modified datetime, name varchar(150), notes);"
            "INSERT INTO accounts VALUES ('a1', 0, 12, '12.5', '2025-03-05 10:00:00', '腾达科技', 'x');"
        )
    connector = SqlConnector("crm", f"sqlite:///{db}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        columns = connector.columns("accounts")
        chunk = next(connector.read(ReadRequest(table="accounts", key=("id",), where="deleted = 0")))
    assert columns == ["id", "deleted", "employees", "revenue", "date_modified", "name", "notes"]
    row = chunk.iloc[0]
    assert (row["deleted"], row["employees"], row["name"], row["notes"]) == (0, 12, "腾达科技", "x")
    assert float(row["revenue"]) == 12.5 and pd.Timestamp(row["date_modified"]) == pd.Timestamp(
        "2025-03-05 10:00"
    )
    with pytest.warns(sa.exc.SAWarning, match="Could not instantiate type"):  # what reflection would say
        sa.Table("accounts", sa.MetaData(), autoload_with=connector.engine)


def test_empty_and_unlabelled_sheet_columns_read_without_a_dtype_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A title merged wider than the header, an empty 备注 column, a formatted column without a header:
    fastexcel has no value to guess a type from and would log "Could not determine dtype for column N"."""
    book = Workbook()
    ws = book.active
    assert ws is not None
    ws.title = "客户"
    ws["A1"] = "2025 客户台账"
    ws.merge_cells("A1:H1")
    ws.append(["客户名称", "金额", "备注", "回款"])
    for i in range(40):  # 回款 is blank in the rows scanned for the header, then a number
        ws.append([f"公司{i}", i * 10.5, None, 3000 if i == 39 else None])
    ws["H20"].number_format = "0.00"  # formatted, never filled
    path = tmp_path / "sales.xlsx"
    book.save(path)
    connector = ExcelConnector("sales", [path], str(path))
    with caplog.at_level("DEBUG", logger="fastexcel"):
        frame = pd.concat(connector.read(ReadRequest(table="客户")))
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []
    assert list(frame.columns[:4]) == ["客户名称", "金额", "备注", "回款"]
    assert frame["备注"].isna().all() and frame["金额"].iloc[1] == 10.5
    assert frame["回款"].iloc[-1] == 3000  # a late value keeps its guessed (numeric) type
