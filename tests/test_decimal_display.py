"""MariaDB DECIMAL(14,2) amounts came out as ``50000.0000000000`` in `crmi mapping preview` and, as text, in
the fix sheet (found by a newcomer's trial): ConnectorX reads every MySQL DECIMAL as decimal128(38, 10)."""

from __future__ import annotations

import csv
import io
from decimal import Decimal
from pathlib import Path

import openpyxl
import pandas as pd
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from crm_core.journal import plain_decimal
from crm_core.loading import RawRows
from integration.cli import app
from integration.connectors.base import LOCATION, ROW_REF, ReadRequest
from integration.connectors.sql import SqlConnector
from integration.pipeline import ReconciliationLine, ReconciliationReport
from integration.reports import write_reports
from tests.conftest import MARIADB_URL, server_or_skip


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Decimal("50000.0000000000"), "50000"),
        (Decimal("1234.5000000000"), "1234.5"),
        (Decimal("5E+4"), "50000"),
        (Decimal("-500.00"), "-500"),
        (Decimal("0E-10"), "0"),
        (Decimal("0.0000001000"), "0.0000001"),
        # more digits than the decimal context's 28: nothing is rounded away
        (Decimal("1234567890123456789012345678.1234567890"), "1234567890123456789012345678.123456789"),
    ],
)
def test_a_decimal_is_written_without_trailing_zeros_or_an_exponent(value: Decimal, text: str) -> None:
    assert plain_decimal(value) == text


def test_the_fix_sheet_writes_a_decimal_amount_as_a_number(tmp_path: Path) -> None:
    raw = pd.DataFrame(
        {"金额": [Decimal("50000.0000000000"), Decimal("1234.5000000000"), Decimal("12345678901234567.89")],
         "电话": ["+86-139-0000-0000", "0571-8888", "x"], LOCATION: "t", ROW_REF: ["1", "2", "3"]}
    )  # fmt: skip
    rows = RawRows(raw).many([("t", "1"), ("t", "2"), ("t", "3")])
    assert [row["金额"] for row in rows if row] == [50000, 1234.5, "12345678901234567.89"]
    assert type(rows[0]["金额"]) is int  # type: ignore[index]
    rejects = pd.DataFrame([
        {"source": "erp", "entity": "opportunity", "location": "t", "row_ref": ref, "field": "customer",
         "value": "x", "rule": "customer.lookup", "reason": "no such customer", "severity": "error", "raw_row": row}
        for ref, row in zip(("1", "2", "3"), rows, strict=True)
    ])  # fmt: skip
    line = ReconciliationLine("erp", "opportunity", 3, 0, 0, 3, 0, None, None)
    paths = write_reports(ReconciliationReport("r1", [line], rejects, {}), tmp_path)
    sheet = openpyxl.load_workbook(paths["excel"])["fix erp.opportunity"]
    amounts = [row[0] for row in sheet.iter_rows(min_row=2, values_only=True)]
    # 17 digits are more than a spreadsheet's number keeps: that one stays text, written whole
    assert amounts == [50000, 1234.5, "12345678901234567.89"]


@pytest.fixture
def mariadb_deals(tmp_path: Path) -> Path:
    """A project reading a MariaDB table of deals whose amount is DECIMAL(14,2)."""
    root = server_or_skip(MARIADB_URL, "MariaDB")
    with root.begin() as connection:
        connection.execute(sa.text("DROP TABLE IF EXISTS deals_display"))
        connection.execute(
            sa.text("CREATE TABLE deals_display (id INT PRIMARY KEY, name VARCHAR(40), amount DECIMAL(14,2))")
        )
        connection.execute(
            sa.text("INSERT INTO deals_display VALUES (1, '甲公司', 50000.00), (2, '乙公司', 1234.50)")
        )
    root.dispose()
    (tmp_path / "mappings").mkdir()
    (tmp_path / "project.yaml").write_text(
        f"version: 1\nname: deals\nsources:\n  erp:\n    connector: sql\n    url: {MARIADB_URL}\n"
        "mappings: [mappings/*.yaml]\n",
        encoding="utf-8",
    )
    (tmp_path / "mappings" / "deals.yaml").write_text(
        "version: 1\nsource: {connector: erp, table: deals_display, key: id}\ntarget: opportunity\nfields:\n"
        "  customer: {from: name, lookup: {by: name}}\n  name: {from: name, required: true}\n"
        "  stage: {const: won}\n  amount: {from: amount, transforms: [parse_amount]}\n",
        encoding="utf-8",
    )
    return tmp_path


@pytest.mark.mariadb
def test_a_mariadb_decimal_keeps_its_declared_scale(mariadb_deals: Path) -> None:
    connector = SqlConnector("erp", MARIADB_URL)
    try:
        assert connector.arrow_url() is not None  # the ConnectorX path, where the scale was widened to 10
        [chunk] = list(connector.read(ReadRequest("deals_display", key=("id",))))
    finally:
        connector.dispose()
    assert [str(value) for value in chunk["amount"]] == ["50000.00", "1234.50"]


@pytest.mark.mariadb
@pytest.mark.parametrize(
    "read", ["table: deals_display", "query: 'SELECT id, name, amount FROM deals_display'"]
)
def test_mapping_preview_shows_a_mariadb_decimal_without_spurious_zeros(
    mariadb_deals: Path, read: str
) -> None:
    # A query's columns declare no scale: its amounts still come as decimal128(38, 10).
    path = mariadb_deals / "mappings" / "deals.yaml"
    path.write_text(path.read_text(encoding="utf-8").replace("table: deals_display", read), encoding="utf-8")
    mapping = str(path)
    table = CliRunner().invoke(app, ["mapping", "preview", mapping])
    assert table.exit_code == 0, table.output
    assert "50000 " in table.output and "1234.5 " in table.output, table.output
    assert "0000000000" not in table.output and "E+" not in table.output, table.output
    shown = CliRunner().invoke(app, ["mapping", "preview", mapping, "--format", "csv"])
    rows = list(csv.DictReader(io.StringIO(shown.stdout)))
    assert [(r["amount (raw)"], r["amount"]) for r in rows] == [("50000", "50000"), ("1234.5", "1234.5")]
