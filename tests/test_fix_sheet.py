"""Several mappings per source and entity, and the re-import of the report's corrected fix sheet."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import openpyxl
import pandas as pd
import pytest
import sqlalchemy as sa

from crm_core.db import make_engine
from crm_core.errors import ConfigError
from crm_core.models import Customer, ExternalId, LoadRun, Opportunity
from integration.assets.resources import dispose_engines
from integration.connectors.base import LOCATION, ROW_REF, ReadRequest
from integration.connectors.excel import ExcelConnector
from integration.jobs import build_definitions
from integration.mappings.engine import EXTERNAL_KEY, map_chunks
from integration.mappings.spec import load_mapping
from integration.pipeline import Migration, reconcile
from tests.test_end_to_end import run_job
from tests.test_runs import content

FIX_SHEET = "fix sales_xlsx.opportunity"


def test_the_fix_sheet_keeps_the_original_location_and_row_so_key_less_rows_keep_their_key(
    tmp_path: Path,
) -> None:
    original = tmp_path / "orders.xlsx"
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.title = "单据"
    sheet.append(["客户", "金额"])
    sheet.append(["甲公司", "待定"])
    book.save(original)
    fixes = tmp_path / "fixes.xlsx"
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.title = "fix"
    sheet.append(["客户", "金额", "_location", "_row_ref", "_reasons"])
    sheet.append(["甲公司", "100", "orders.xlsx#单据", "2", "金额: not an amount"])
    sheet.append(["乙公司", "200", None, None, None])  # a row added by hand: where it really is
    book.save(fixes)
    mapping = tmp_path / "orders.yaml"
    mapping.write_text(
        "version: 1\nsource: {connector: x, sheet: 单据}\ntarget: customer\nfields:\n  name: {from: 客户}\n",
        encoding="utf-8",
    )

    read = next(ExcelConnector("x", [original], "*").read(ReadRequest(table="单据")))
    again = next(ExcelConnector("x", [fixes], "*").read(ReadRequest(table="fix")))

    assert list(again[LOCATION]) == ["orders.xlsx#单据", "fixes.xlsx#fix"]
    assert list(again[ROW_REF]) == ["2", "3"]
    compiled = load_mapping(mapping)
    first = map_chunks(compiled, [read]).records[EXTERNAL_KEY].tolist()
    assert first == ["orders.xlsx#单据:2"]
    assert map_chunks(compiled, [again]).records[EXTERNAL_KEY].tolist() == [*first, "fixes.xlsx#fix:3"]


def add_mapping(project: Path, name: str, text: str) -> None:
    (project / "mappings" / f"{name}.yaml").write_text(text, encoding="utf-8")


def test_a_second_mapping_of_one_source_and_entity_gets_its_own_raw_asset_and_a_bad_system_is_named(
    demo_project: Path,
) -> None:
    original = (demo_project / "mappings" / "erp_u8_customers.yaml").read_text(encoding="utf-8")
    add_mapping(
        demo_project, "erp_u8_customers-b", original.replace("table: Customer,", "table: Customer_B,")
    )
    migration = Migration.load(str(demo_project))
    names = {m.name: migration.raw_asset(m) for m in migration.mappings_for("customer")}
    assert names["erp_u8_customers"] == "raw_erp_u8_customer"  # unchanged
    assert names["erp_u8_customers-b"] == "raw_erp_u8_customer_erp_u8_customers_b"

    add_mapping(demo_project, "fixes", original.replace("key: cCusCode}", "key: cCusCode, system: erp_u9}"))
    with pytest.raises(ConfigError, match=r"fixes.yaml:\d+:\d+: source.system: unknown source 'erp_u9'"):
        Migration.load(str(demo_project))


def test_two_sheets_of_one_workbook_and_two_tables_of_one_database_feed_one_entity(
    demo_project: Path, sqlite_core_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    data = demo_project / "data"
    with sqlite3.connect(data / "erp_u8.sqlite") as erp:
        erp.execute("CREATE TABLE Customer_B (cCusCode TEXT PRIMARY KEY, cCusName TEXT, cCusPhone TEXT)")
        erp.executemany(
            "INSERT INTO Customer_B VALUES (?, ?, ?)",
            [("B0001", "宁波测试甲科技有限公司", "0574-88880001"), ("B0002", "温州测试乙贸易有限公司", None)],
        )
    book = openpyxl.load_workbook(data / "sales.xlsx")
    sheet = book.create_sheet("新客户")
    sheet.append(["客户名称", "地址"])
    sheet.append(["嘉兴测试丙物流有限公司", "浙江省嘉兴市南湖区测试路1号"])
    sheet.append(["湖州测试丁环保科技有限公司", None])
    book.save(data / "sales.xlsx")
    add_mapping(demo_project, "erp_u8_customers_b", (
        "version: 1\nsource: {connector: erp_u8, table: Customer_B, key: cCusCode}\ntarget: customer\n"
        "fields:\n  name: {from: cCusName, transforms: [company_name], required: true}\n"
        "  phone: {from: cCusPhone, transforms: [phone]}\n"
    ))  # fmt: skip
    add_mapping(demo_project, "sales_xlsx_new_customers", (
        "version: 1\nsource: {connector: sales_xlsx, sheet: 新客户, key: 客户名称}\ntarget: customer\n"
        "fields:\n  name: {from: 客户名称, transforms: [company_name], required: true}\n"
        "  address: {from: 地址, transforms: [trim]}\n"
    ))  # fmt: skip
    assets = {key.to_user_string() for key in build_definitions(demo_project, sqlite_core_url).resolve_asset_graph().get_all_asset_keys()}  # fmt: skip
    assert {"raw_erp_u8_customer", "raw_erp_u8_customer_erp_u8_customers_b", "raw_sales_xlsx_customer",
            "raw_sales_xlsx_customer_sales_xlsx_new_customers"} <= assets  # fmt: skip

    result = run_job(demo_project, sqlite_core_url)
    dispose_engines()

    engine = make_engine(sqlite_core_url)
    report = reconcile(engine, result.run_id)
    assert report.balanced, report.to_markdown()
    reads = sorted((line.source, line.rows_read) for line in report.lines if line.entity == "customer")
    assert ("erp_u8", 2) in reads and ("sales_xlsx", 2) in reads
    with engine.connect() as connection:
        keys = set(
            connection.execute(
                sa.select(ExternalId.system, ExternalId.external_key).where(ExternalId.entity == "customer")
            ).all()
        )
        names = set(connection.scalars(sa.select(Customer.name)))
    assert {("erp_u8", "B0001"), ("erp_u8", "B0002")} <= keys
    assert {("sales_xlsx", "嘉兴测试丙物流有限公司"), ("sales_xlsx", "湖州测试丁环保科技有限公司")} <= keys
    assert {"宁波测试甲科技有限公司", "嘉兴测试丙物流有限公司"} <= names
    engine.dispose()


def correct(fixes: pd.DataFrame, customer: str) -> pd.DataFrame:
    """Do what the sales team would: a real amount and date, and a customer that exists.

    The row with the unparsable amount names an unknown customer too (checked only once it maps), so
    every row gets the existing customer.
    """
    fixed = fixes.copy()
    bad_amount = fixed["_reasons"].str.contains("amount")
    fixed.loc[bad_amount, "预计金额"] = "100000"
    fixed.loc[bad_amount, "预计成交日期"] = "2025年12月1日"
    fixed["客户名称"] = customer
    return fixed


def test_the_corrected_fix_sheet_re_imports_the_rejected_rows_under_their_source_keys(
    demo_project: Path, core_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the report lands in var/reports/<run id>/ here
    first = run_job(demo_project, core_url)
    dispose_engines()
    engine = make_engine(core_url)
    report_file = tmp_path / "var" / "reports" / first.run_id / "reconciliation.xlsx"
    fixes = pd.read_excel(report_file, sheet_name=FIX_SHEET, dtype=str)
    # Rows rejected, and rows held for a steward's decision on their customer's name (correcting it works too).
    rejected = set(reconcile(engine, first.run_id).rejects.query("severity in ('error', 'held') and rule != 'subtotal'")["row_ref"])  # fmt: skip
    assert set(fixes["_row_ref"]) == rejected and len(fixes) >= 10
    with engine.connect() as connection:
        customer = connection.scalar(
            sa.select(Customer.name).where(Customer.merged_into_id.is_(None)).order_by(Customer.id)
        )
    # The customer corrects the sheet in Excel and hands it back; the consultant adds a source and a mapping.
    (demo_project / "fixes").mkdir()
    with pd.ExcelWriter(demo_project / "fixes" / "corrected.xlsx") as writer:
        correct(fixes, str(customer)).to_excel(writer, sheet_name=FIX_SHEET, index=False)
    project_yaml = demo_project / "project.yaml"
    project_yaml.write_text(
        project_yaml.read_text(encoding="utf-8").replace(
            "sources:\n", "sources:\n  fixes:\n    connector: excel\n    path: fixes/*.xlsx\n", 1
        ),
        encoding="utf-8",
    )
    mapping = (demo_project / "mappings" / "sales_xlsx_opportunities.yaml").read_text(encoding="utf-8")
    add_mapping(demo_project, "sales_xlsx_opportunities_fixed", mapping.replace(
        "source: {connector: sales_xlsx, sheet: 商机, key: 商机编号}",
        f"source: {{connector: fixes, sheet: {FIX_SHEET}, key: 商机编号, system: sales_xlsx}}",
    ))  # fmt: skip
    before = content(engine)

    second = run_job(demo_project, core_url)
    dispose_engines()

    report = reconcile(engine, second.run_id)
    assert report.balanced, report.to_markdown()
    fixed_line = [
        line for line in report.lines if line.entity == "opportunity" and line.rows_read == len(fixes)
    ]
    assert len(fixed_line) == 1 and fixed_line[0].loaded == len(fixes) and fixed_line[0].rejected == 0
    after = content(engine)
    for table in before:  # nothing that was there changed or went away
        assert set(before[table]) <= set(after[table]), table
    added = {table: set(after[table]) - set(before[table]) for table in after}
    assert {table for table, rows in added.items() if rows} == {"opportunities", "external_ids"}
    assert len(added["opportunities"]) == len(fixes)
    with engine.connect() as connection:
        crosswalk = dict(connection.execute(
            sa.select(ExternalId.external_key, ExternalId.entity_id).where(
                ExternalId.entity == "opportunity", ExternalId.system == "sales_xlsx",
                ExternalId.external_key.in_(list(fixes["商机编号"])))
        ).all())  # fmt: skip
        amount_key = fixes.loc[fixes["_reasons"].str.contains("amount"), "商机编号"].iloc[0]
        amount = connection.scalar(
            sa.select(Opportunity.amount).where(Opportunity.id == crosswalk[amount_key])
        )
        statuses = list(connection.scalars(sa.select(LoadRun.status).order_by(LoadRun.id)))
    assert set(crosswalk) == set(fixes["商机编号"])  # the source's own keys: no second record later
    assert amount == 100000
    assert statuses == ["succeeded", "succeeded"]

    third = run_job(demo_project, core_url)  # and running again changes nothing
    dispose_engines()
    assert reconcile(engine, third.run_id).balanced and content(engine) == after
    engine.dispose()
