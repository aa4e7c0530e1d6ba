"""The ERP connector through pyodbc and real unixODBC drivers: SQLite3, PostgreSQL and MariaDB."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from crm_core.errors import ExtractError
from integration.connectors import OdbcConnector, ReadRequest
from integration.connectors.odbc import mask_connection_string
from tests.conftest import MARIADB_URL, PG_DATABASE, PG_URL, REPO, WORKER, server_or_skip
from tests.test_connectors import check_contract, copy_tables

U8_DATABASE = f"u8_odbc_{WORKER}" if WORKER else "u8_odbc"

pytestmark = pytest.mark.odbc
U8_TABLES = ["Customer", "Person", "SO_SOMain", "SO_SODetails"]


def driver_or_skip(driver: str) -> None:
    try:
        import pyodbc
    except ImportError as exc:
        reason = f"pyodbc/unixODBC not importable: {exc}"
    else:
        if driver in pyodbc.drivers():
            return
        reason = f"ODBC driver '{driver}' not installed (have: {pyodbc.drivers()}); apt-get install the odbc-* package"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true requires it: {reason}")
    pytest.skip(reason)


@pytest.fixture(
    params=[
        "sqlite3",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ]
)
def u8_odbc(request: pytest.FixtureRequest, demo_data: Path) -> Iterator[str]:
    """An ODBC connection string to the demo's U8 database on SQLite, PostgreSQL or MariaDB."""
    sqlite_url = f"sqlite:///{demo_data / 'erp_u8.sqlite'}"
    if request.param == "sqlite3":
        driver_or_skip("SQLite3")
        yield f"DRIVER={{SQLite3}};Database={demo_data / 'erp_u8.sqlite'}"
        return
    if request.param == "postgres":
        driver_or_skip("PostgreSQL Unicode")
        engine = server_or_skip(PG_URL, "PostgreSQL")
        copy_tables(sqlite_url, engine, U8_TABLES)
        engine.dispose()
        yield f"DRIVER={{PostgreSQL Unicode}};Server=127.0.0.1;Port=5432;Database={PG_DATABASE};UID=postgres;PWD=;"
        return
    driver_or_skip("MariaDB Unicode")
    engine = server_or_skip(MARIADB_URL, "MariaDB")
    with engine.begin() as connection:
        connection.execute(sa.text(f"CREATE DATABASE IF NOT EXISTS {U8_DATABASE} CHARACTER SET utf8mb4"))
    target = sa.create_engine(sa.engine.make_url(MARIADB_URL).set(database=U8_DATABASE))
    copy_tables(sqlite_url, target, U8_TABLES)
    target.dispose()
    engine.dispose()
    yield f"DRIVER={{MariaDB Unicode}};Server=127.0.0.1;Port=3306;Database={U8_DATABASE};UID=root;PWD=;CHARSET=utf8mb4;"


def test_u8_customer_table_through_every_driver(u8_odbc: str, demo_data: Path) -> None:
    connector = OdbcConnector("erp_u8", u8_odbc)
    check_contract(connector, "Customer")
    frame = pd.concat(
        connector.read(ReadRequest("Customer", key=("cCusCode",), chunk_rows=25)), ignore_index=True
    )
    expected = pd.read_sql(
        "SELECT cCusCode, cCusName FROM Customer ORDER BY cCusCode",
        sa.create_engine(f"sqlite:///{demo_data / 'erp_u8.sqlite'}"),
    )
    assert list(frame["cCusCode"]) == list(expected["cCusCode"])
    assert list(frame["cCusName"]) == list(expected["cCusName"])  # Chinese survives every driver
    assert set(U8_TABLES) <= set(connector.list_tables())
    query = (
        'SELECT m."cSOCode", d."iSum" FROM "SO_SOMain" m JOIN "SO_SODetails" d ON d."cSOCode" = m."cSOCode"'
    )
    if "MariaDB" in u8_odbc:
        query = query.replace('"', "`")
    joined = pd.concat(connector.read(ReadRequest("q", query=query)), ignore_index=True)
    assert len(joined) > 0 and connector.query_columns(query) == ["cSOCode", "iSum"]


def test_unknown_table_names_the_source_and_lists_tables(demo_data: Path) -> None:
    driver_or_skip("SQLite3")
    connector = OdbcConnector("erp_u8", f"DRIVER={{SQLite3}};Database={demo_data / 'erp_u8.sqlite'}")
    with pytest.raises(
        ExtractError, match=r"source 'erp_u8': table 'Custmer' does not exist; tables: Customer, Person"
    ):
        connector.columns("Custmer")


@pytest.mark.postgres
def test_gbk_char_data_is_decoded_with_the_configured_encoding() -> None:
    driver_or_skip("PostgreSQL ANSI")
    engine = server_or_skip(PG_URL, "PostgreSQL")
    with engine.begin() as connection:
        connection.execute(sa.text("DROP TABLE IF EXISTS legacy_gbk"))
        connection.execute(sa.text("CREATE TABLE legacy_gbk (code varchar(8), name varchar(50))"))
        connection.execute(
            sa.text("INSERT INTO legacy_gbk VALUES ('00001', '深圳市腾达科技有限公司（南山）')")
        )
    engine.dispose()
    # The ANSI driver hands over CHAR data in the client encoding: GBK here, as a Chinese SQL Server would.
    gbk = f"DRIVER={{PostgreSQL ANSI}};Server=127.0.0.1;Port=5432;Database={PG_DATABASE};UID=postgres;PWD=;ConnSettings=SET client_encoding TO 'GBK';"
    [chunk] = list(OdbcConnector("erp", gbk, encoding="gbk").read(ReadRequest("legacy_gbk")))
    assert chunk.loc[0, "name"] == "深圳市腾达科技有限公司（南山）"


@pytest.mark.mariadb
def test_wrong_password_is_one_clear_error_without_the_password() -> None:
    driver_or_skip("MariaDB Unicode")
    root = server_or_skip(MARIADB_URL, "MariaDB")
    with root.begin() as connection:
        connection.execute(sa.text("CREATE USER IF NOT EXISTS 'u8_reader'@'%' IDENTIFIED BY 'right-pw'"))
    root.dispose()
    connector = OdbcConnector(
        "erp_u8", "DRIVER={MariaDB Unicode};Server=127.0.0.1;Port=3306;UID=u8_reader;PWD=Wr0ng-pw;"
    )
    with pytest.raises(ExtractError) as caught:
        connector.list_tables()
    message = str(caught.value)
    assert message.startswith(
        "source 'erp_u8': connecting failed (odbc:DRIVER={MariaDB Unicode};Server=127.0.0.1;Port=3306;UID=u8_reader;PWD=***;)"
    )
    assert "Access denied" in message and "Wr0ng-pw" not in message


def test_connection_string_passwords_are_masked() -> None:
    assert mask_connection_string("DSN=u8;UID=sa;PWD=p@ss;x=1") == "DSN=u8;UID=sa;PWD=***;x=1"
    assert mask_connection_string("Password={a;b};UID=x") == "Password=***;UID=x"


def test_the_toolkit_imports_without_pyodbc() -> None:
    code = "import sys; import integration.definitions, integration.connectors; assert 'pyodbc' not in sys.modules"
    env = {**os.environ, "CRM_PROJECT": str(REPO / "examples" / "demo")}
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, timeout=120)


def test_demo_with_the_erp_over_odbc_loads_the_same_as_over_sqlalchemy(
    demo_project: Path, sqlite_core_url: str
) -> None:
    driver_or_skip("SQLite3")
    from crm_core.db import make_engine
    from integration.pipeline import reconcile
    from tests.test_end_to_end import run_job

    project_file = demo_project / "project.yaml"
    text = project_file.read_text(encoding="utf-8")
    odbc = (
        '    connector: odbc\n    connection_string: "DRIVER={SQLite3};Database=${U8_DB:-'
        + str(demo_project / "data" / "erp_u8.sqlite")
        + '}"\n'
    )
    text = text.replace(
        "    connector: sql\n    # Production: ERP_U8_URL=mssql+pyodbc://... (the password lives in the environment, never here).\n    url: ${ERP_U8_URL:-sqlite:///data/erp_u8.sqlite}\n",
        odbc,
    )
    assert "connector: odbc" in text
    project_file.write_text(text, encoding="utf-8")
    result = run_job(demo_project, sqlite_core_url)
    report = reconcile(make_engine(sqlite_core_url), result.run_id)
    assert report.balanced
    erp = {line.entity: line for line in report.lines if line.source == "erp_u8"}
    with sqlite3.connect(demo_project / "data" / "erp_u8.sqlite") as db:
        customers = db.execute("SELECT count(*) FROM Customer").fetchone()[0]
    assert erp["customer"].rows_read == customers and erp["customer"].loaded == customers
    assert erp["sales_order_line"].amount_source == erp["sales_order_line"].amount_core > 0


def test_project_check_reads_query_columns_through_odbc(demo_project: Path) -> None:
    driver_or_skip("SQLite3")
    from typer.testing import CliRunner

    from integration.cli import app

    project_file = demo_project / "project.yaml"
    legacy = str(demo_project / "data" / "legacy_crm.sqlite")
    text = project_file.read_text(encoding="utf-8").replace(
        "    connector: sql\n    url: ${LEGACY_CRM_URL:-sqlite:///data/legacy_crm.sqlite}\n",
        f'    connector: odbc\n    connection_string: "DRIVER={{SQLite3}};Database={legacy}"\n',
    )
    assert "Database=" in text
    project_file.write_text(text, encoding="utf-8")
    result = CliRunner().invoke(app, ["project", "check", "--project", str(demo_project)])
    assert result.exit_code == 0, result.output  # the contact/opportunity mappings are queries
    assert "ok: project 'demo'" in result.output
