"""Several mappings per source and entity, and the re-import of the report's corrected fix sheet."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

import openpyxl
import pandas as pd
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from crm_core.db import make_engine
from crm_core.errors import ConfigError
from crm_core.models import Customer, ExternalId, LoadRun, Opportunity, ReferenceDecision, Reject
from crm_core.runs import rollback_run
from integration.assets.resources import dispose_engines
from integration.cli import app
from integration.connectors.base import LOCATION, ROW_REF, ReadRequest
from integration.connectors.excel import ExcelConnector
from integration.jobs import build_definitions
from integration.mappings.engine import EXTERNAL_KEY, map_chunks
from integration.mappings.spec import load_mapping
from integration.pipeline import Migration, core_engine, reconcile
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


def re_import_fix_sheet(demo_project: Path, corrected: pd.DataFrame) -> None:
    """What the README asks of a consultant: the corrected sheet saved into the project as a source, and a copy
    of the opportunities' mapping reading it under the sales workbook's system."""
    (demo_project / "fixes").mkdir()
    with pd.ExcelWriter(demo_project / "fixes" / "corrected.xlsx") as writer:
        corrected.to_excel(writer, sheet_name=FIX_SHEET, index=False)
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


def test_the_corrected_fix_sheet_re_imports_the_rejected_rows_under_their_source_keys(
    demo_project: Path, core_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the report lands in var/reports/<run id>/ here
    first = run_job(demo_project, core_url)
    dispose_engines()
    engine = make_engine(core_url)
    held = sum(line.held for line in reconcile(engine, first.run_id).lines)
    assert held > 0 and reconciliation_metadata(first)[HELD_COUNTS] == (held, 0)
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
    re_import_fix_sheet(demo_project, correct(fixes, str(customer)))
    before = content(engine)
    decisions_before = reference_decisions(engine)

    second = run_job(demo_project, core_url)
    dispose_engines()

    report = reconcile(engine, second.run_id)
    assert report.balanced, report.to_markdown()
    # The held rows are in the core now, corrected: none waits for a steward.
    assert reconciliation_metadata(second)[HELD_COUNTS] == (0, held)
    fixed_line = [
        line for line in report.lines if line.entity == "opportunity" and line.rows_read == len(fixes)
    ]
    assert len(fixed_line) == 1 and fixed_line[0].loaded == len(fixes) and fixed_line[0].rejected == 0
    after = content(engine)
    # Nothing that was there changed or went away, but the names the held rows waited on: none waits now.
    for table in before.keys() - {"reference_decisions"}:
        assert set(before[table]) <= set(after[table]), table
    assert len(before["reference_decisions"]) == len(after["reference_decisions"])
    with engine.connect() as connection:
        assert set(connection.scalars(sa.select(ReferenceDecision.rows_held))) == {0}
    added = {
        table: set(after[table]) - set(before[table]) for table in after.keys() - {"reference_decisions"}
    }
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
    assert reconciliation_metadata(third)[HELD_COUNTS] == (0, held)

    # Rolling the correcting run back (and the one after it) restores the core exactly: the held rows wait on
    # their names again, with the counts, money and run the decisions had before.
    assert decisions_before != reference_decisions(engine)
    rollback_run(engine, second.run_id, cascade=True)
    assert reference_decisions(engine) == decisions_before
    assert content(engine) == before
    engine.dispose()


HELD_COUNTS = ("held_rows", "corrected_held_rows")


def reconciliation_metadata(result: Any) -> dict[Any, Any]:
    """The reconciliation asset's materialization metadata of a job run, values plain; ``HELD_COUNTS`` as a pair."""
    [materialization] = result.asset_materializations_for_node("reconciliation_report")
    metadata = {key: value.value for key, value in materialization.metadata.items()}
    return {**metadata, HELD_COUNTS: tuple(metadata.get(key) for key in HELD_COUNTS)}


def reference_decisions(engine: sa.Engine) -> list[tuple[Any, ...]]:
    """Every reference decision as stored: what waits on it, and the run that last counted it."""
    with engine.connect() as connection:
        return [
            tuple(row)
            for row in connection.execute(
                sa.select(ReferenceDecision.id, ReferenceDecision.name_key, ReferenceDecision.status,
                          ReferenceDecision.rows_held, ReferenceDecision.amount_held,
                          ReferenceDecision.load_run_id).order_by(ReferenceDecision.id)
            )
        ]  # fmt: skip


def crmi_run(project: Path, core_url: str) -> tuple[int, dict[str, Any]]:
    """``crmi run --json``: its exit code and what it printed."""
    result = CliRunner().invoke(app, ["run", "--project", str(project), "--core-url", core_url, "--json"])
    assert result.exit_code in (0, 2), result.output
    return result.exit_code, json.loads(result.stdout)


def the_line(payload: dict[str, Any], mapping: str) -> dict[str, Any]:
    [line] = [line for line in payload["lines"] if line["mapping"] == mapping]
    return line


def money(value: Any) -> Decimal:
    return Decimal(str(value)).quantize(Decimal("0.01"))


def per_row_amount(rejects: pd.DataFrame) -> Decimal:
    """The money of the rows of some rejects: each row's amount once."""
    amounts = rejects.groupby(["location", "row_ref"])["amount"].first()
    return sum((Decimal(a) for a in amounts if a is not None and a == a), Decimal(0))


def test_rejected_rows_a_fix_sheet_loaded_count_as_corrected_not_quarantined(
    demo_project: Path, core_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the report lands in var/reports/<run id>/ here
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    # A frozen legacy sheet: 13 more opportunities with a close date nobody can read, so the line quarantines
    # more than the project's 20 % (with the demo's unreadable amount and the 11 rows held for a steward).
    book = openpyxl.load_workbook(demo_project / "data" / "sales.xlsx")
    broken = [row for row in range(3, 17) if row != 10]  # row 10 is held for a steward already
    for row in broken:
        book["商机"].cell(row=row, column=6, value="下个月初")
    book.save(demo_project / "data" / "sales.xlsx")

    code, first = crmi_run(demo_project, core_url)

    line = the_line(first, "sales_xlsx_opportunities")
    assert code == 2 and line["status"] == "failed" and line["corrected"] == 0
    assert (line["rejected"], line["subtotals"], line["held"], line["quarantined"]) == (15, 1, 11, 25)
    fixes = pd.read_excel(
        tmp_path / "var" / "reports" / first["run_id"] / "reconciliation.xlsx",
        sheet_name=FIX_SHEET,
        dtype=str,
    )
    rejected = fixes[~fixes["_reasons"].str.contains("names no single customer")]
    assert sorted(rejected["_row_ref"].astype(int)) == [*broken, 112]
    # The sales team corrects the rejected rows (the held ones wait for a steward) and hands them back.
    engine = make_engine(core_url)
    with engine.connect() as connection:
        customer = connection.scalar(
            sa.select(Customer.name).where(Customer.merged_into_id.is_(None)).order_by(Customer.id)
        )
    fixed = rejected.assign(预计成交日期="2025年12月1日", 客户名称=str(customer))
    fixed.loc[fixed["_row_ref"] == "112", "预计金额"] = "100000"
    re_import_fix_sheet(demo_project, fixed)

    code, second = crmi_run(demo_project, core_url)

    assert the_line(second, "sales_xlsx_opportunities_fixed")["loaded"] == 14
    line = the_line(second, "sales_xlsx_opportunities")
    # The source still rejects its 14 rows (and the subtotal): they are in the core now, corrected.
    assert (line["rejected"], line["subtotals"], line["held"]) == (15, 1, 11)
    assert (line["corrected"], line["quarantined"]) == (14, 11)
    assert line["balanced"] and line["status"] == "quarantined" and code == 0, second["verdict"]
    assert line["rows_read"] == line["loaded"] + line["merged"] + line["rejected"] + line["held"]
    rejects = reconcile(engine, second["run_id"]).rejects
    mine = rejects[rejects["mapping"] == "sales_xlsx_opportunities"]
    corrected = mine[mine["corrected"]]
    assert sorted(set(corrected["row_ref"].astype(int))) == [*broken, 112]
    # Their money: what the 13 readable amounts carried (the 待定 row's amount was never readable).
    assert money(line["amount_corrected"]) == per_row_amount(corrected) > 0
    assert money(line["amount_in_quarantine"]) == per_row_amount(mine[mine["severity"] == "held"])
    assert money(line["amount_in_quarantine"]) + money(line["amount_corrected"]) == money(
        line["amount_quarantined"]
    )
    assert money(line["amount_loaded"]) + money(line["amount_merged"]) + money(
        line["amount_quarantined"]
    ) == money(line["amount_source"])
    assert second["quarantined_rows"] == sum(entry["quarantined"] for entry in second["lines"])
    assert "14 more row(s) were rejected but loaded from a fix sheet" in second["verdict"]
    report = tmp_path / "var" / "reports" / second["run_id"]
    assert "| 14 (" in (report / "reconciliation.md").read_text(encoding="utf-8")
    # The next fix sheet holds only what still needs someone: the rows held for a steward.
    again = pd.read_excel(report / "reconciliation.xlsx", sheet_name=FIX_SHEET, dtype=str)
    assert len(again) == 11 and again["_reasons"].str.contains("names no single customer").all()

    # Rolling the correcting run back takes its crosswalk keys with it: the rows are quarantined again.
    rolled = CliRunner().invoke(app, ["rollback", second["run_id"], "--core-url", core_url])
    dispose_engines()
    assert rolled.exit_code == 0, rolled.output
    [line_again] = [
        x for x in reconcile(engine, second["run_id"]).lines if x.mapping == "sales_xlsx_opportunities"
    ]
    assert (line_again.corrected, line_again.quarantined, line_again.amount_corrected) == (0, 25, None)
    engine.dispose()


def seed_run(
    engine: sa.Engine, line: dict[str, Any], crosswalk: list[dict[str, Any]], rejects: list[dict[str, Any]]
) -> None:
    """A succeeded load run "r1" of opportunities with its stats ``line``, crosswalk rows and rejects."""
    with engine.begin() as connection:
        run_id = connection.execute(
            sa.insert(LoadRun).values(run_key="r1", project="p", mode="full", status="succeeded",
                                      stats={"opportunity": [line]}).returning(LoadRun.id)
        ).scalar_one()  # fmt: skip
        connection.execute(sa.insert(ExternalId), crosswalk)
        connection.execute(sa.insert(Reject), [{**reject, "load_run_id": run_id} for reject in rejects])


def test_a_reject_whose_key_is_not_in_the_crosswalk_stays_quarantined(core_url: str) -> None:
    """Only a key a fix mapping wrote makes its reject corrected: a key the source's own mapping loaded in an
    earlier run, whose row is rejected now (changed into something invalid), stays quarantined: the core holds
    the old version and the change did not load."""
    engine = core_engine(core_url)
    line = {"source": "erp", "mapping": "erp_opportunities", "rows_read": 7, "inserted": 0, "updated": 0,
            "unchanged": 1, "loaded": 1, "merged": 0, "rejected": 6, "held": 0, "subtotals": 1, "warnings": 1,
            "amount_source": "110.00", "amount_loaded": "10.00", "amount_core": "10.00", "amount_merged": "0",
            "amount_quarantined": "100.00"}  # fmt: skip
    reject = {"source": "erp", "entity": "opportunity", "location": "t", "field": None, "value": None,
              "rule": "mapping", "reason": "bad", "severity": "error", "mapping": "erp_opportunities", "amount": None}  # fmt: skip
    seed_run(engine, line, [
        {"entity": "opportunity", "entity_id": 1, "system": "erp", "external_key": "K1", "corrected_by": "fix"},
        {"entity": "opportunity", "entity_id": 3, "system": "erp", "external_key": "K5", "corrected_by": None},
        {"entity": "customer", "entity_id": 1, "system": "erp", "external_key": "K3", "corrected_by": "fix"},
        {"entity": "opportunity", "entity_id": 2, "system": "crm", "external_key": "K4", "corrected_by": "fix"},
    ], [
        {**reject, "row_ref": "1", "external_key": "K1", "amount": Decimal(30)},
        {**reject, "row_ref": "1", "external_key": "K1", "amount": Decimal(30),
         "field": "stage"},  # a second problem of the same row: counted once
        {**reject, "row_ref": "2", "external_key": "K2", "amount": Decimal(20)},
        {**reject, "row_ref": "3", "external_key": "K3", "amount": Decimal(15)},
        {**reject, "row_ref": "4", "external_key": "K4", "amount": Decimal(25)},
        {**reject, "row_ref": "7", "external_key": "K5", "amount": Decimal(10)},
        {**reject, "row_ref": "5", "external_key": "K1", "rule": "subtotal"},
        {**reject, "row_ref": "6", "external_key": "K1", "severity": "warn"},
    ])  # fmt: skip

    [result] = reconcile(engine, "r1", max_quarantined_share=0.5).lines

    # Only row 1's key is in the crosswalk for its system and entity, written by a fix mapping: K2 nowhere, K3
    # for a customer, K4 for crm, K5 loaded by the source's own mapping before.
    assert (result.corrected, result.amount_corrected) == (1, Decimal("30.00"))
    assert result.quarantined == 4 and result.amount_in_quarantine == Decimal("70.00")
    assert result.balanced and result.over_quarantine_limit and result.status == "failed"
    engine.dispose()


def test_two_rejected_rows_of_one_key_count_one_corrected_row_when_a_fix_sheet_loads_the_key(
    core_url: str,
) -> None:
    """A row repeated in a sheet (two rows, one key), both rejected: the fix sheet that loads the key corrects
    one of them, the first recorded (the fix sheet lists it first; a mapping loads a repeated key's first
    row). The core holds one record under the key: the other row stays quarantined, with its money, and in
    the next fix sheet. The line still balances (read = loaded + merged + rejected + held)."""
    from integration.reports import fix_sheets

    engine = core_engine(core_url)
    line = {"source": "erp", "mapping": "erp_opportunities", "rows_read": 4, "inserted": 1, "updated": 0,
            "unchanged": 0, "loaded": 1, "merged": 0, "rejected": 3, "held": 0, "subtotals": 0, "warnings": 0,
            "amount_source": "100.00", "amount_loaded": "40.00", "amount_core": "40.00", "amount_merged": "0",
            "amount_quarantined": "60.00"}  # fmt: skip
    reject = {"source": "erp", "entity": "opportunity", "location": "t", "field": "close_date", "value": "x",
              "rule": "mapping", "reason": "bad", "severity": "error", "mapping": "erp_opportunities"}  # fmt: skip
    seed_run(engine, line, [
        {"entity": "opportunity", "entity_id": 1, "system": "erp", "external_key": "K1", "corrected_by": "fix"},
    ], [
        {**reject, "row_ref": "2", "external_key": "K1", "amount": Decimal(30), "raw_row": {"no": "K1", "amount": "30"}},
        {**reject, "row_ref": "2", "external_key": "K1", "amount": Decimal(30),
         "field": "stage", "raw_row": {"no": "K1", "amount": "30"}},  # the same row's second problem
        {**reject, "row_ref": "5", "external_key": "K1", "amount": Decimal(20),
         "raw_row": {"no": "K1", "amount": "20"}},  # the row repeated further down, its amount changed
        {**reject, "row_ref": "7", "external_key": "K2", "amount": Decimal(10), "raw_row": {"no": "K2", "amount": "10"}},
    ])  # fmt: skip

    report = reconcile(engine, "r1")
    [result] = report.lines

    assert (result.corrected, result.amount_corrected) == (1, Decimal("30.00"))
    assert (result.quarantined, result.amount_in_quarantine) == (2, Decimal("30.00"))
    assert result.rows_read == result.loaded + result.merged + result.rejected + result.held
    assert result.balanced and result.status == "quarantined"
    marked = report.rejects.groupby("row_ref")["corrected"].agg(set).to_dict()
    assert marked == {"2": {True}, "5": {False}, "7": {False}}
    [sheet] = fix_sheets(report.rejects).values()
    assert list(sheet["_row_ref"]) == ["5", "7"]
    engine.dispose()


@pytest.mark.parametrize("row_by_row", [False, True], ids=["fast", "row_by_row"])
def test_the_mapping_that_last_loaded_a_key_marks_it_even_when_its_row_is_unchanged(
    core_url: str, row_by_row: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fix sheet's row equal to what the source loaded before (the source broke a row, the fix restores it)
    is loaded, unchanged: the key is the fix sheet's now, so the source's reject under it is corrected. The
    source's own row equal to the fix sheet's (the source itself corrected) takes the key back: a later
    reject of it stays quarantined. Both paths write the same, and rollback restores the marks."""
    from crm_core import loading
    from tests.test_loading import CUSTOMER_RULES, batch, load

    monkeypatch.setattr(loading, "_ROW_BY_ROW", row_by_row)
    engine = core_engine(core_url)
    rows = [
        {"_external_key": f"C{i}", "name": f"深圳市第{i}号科技有限公司", "credit_code": None}
        for i in range(12)
    ]

    def marks() -> set[Any]:
        with engine.connect() as connection:
            return set(
                connection.scalars(sa.select(ExternalId.corrected_by).where(ExternalId.system == "erp"))
            )

    def fix() -> Any:
        return dataclasses.replace(batch("erp", rows), mapping="erp_fixed", corrects=True)

    load(engine, "r1", "customer", [batch("erp", rows)], CUSTOMER_RULES)
    [fixed] = load(engine, "r2", "customer", [fix()], CUSTOMER_RULES)
    assert fixed.unchanged == 12 and marks() == {"erp_fixed"}
    [own] = load(engine, "r3", "customer", [batch("erp", rows)], CUSTOMER_RULES)
    assert own.unchanged == 12 and marks() == {None}
    [again] = load(engine, "r4", "customer", [batch("erp", rows)], CUSTOMER_RULES)
    assert again.unchanged == 12 and marks() == {None}
    with engine.begin() as connection:
        connection.execute(sa.update(LoadRun).values(status="succeeded"))
    rollback_run(engine, "r4")
    rollback_run(engine, "r3")
    assert marks() == {"erp_fixed"}
    rollback_run(engine, "r2")
    assert marks() == {None}
    engine.dispose()


def test_held_rows_a_fix_sheet_loaded_count_as_corrected_and_no_longer_wait_for_a_steward(
    demo_project: Path, core_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row held for a steward (its customer's name matches no single customer) that the sales team corrects
    in the fix sheet is in the core under its source key: corrected like a rejected row, out of the next fix
    sheet, and its name no longer waits in `crmi dedup review` (nothing waits on it)."""
    from integration.dedup.references import reference_queue

    monkeypatch.chdir(tmp_path)  # the report lands in var/reports/<run id>/ here
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    code, first = crmi_run(demo_project, core_url)
    line = the_line(first, "sales_xlsx_opportunities")
    assert (line["rejected"], line["subtotals"], line["held"], line["quarantined"]) == (2, 1, 11, 12)
    engine = make_engine(core_url)
    assert sum(q["rows_held"] for q in reference_queue(engine)) == 11
    fixes = pd.read_excel(
        tmp_path / "var" / "reports" / first["run_id"] / "reconciliation.xlsx",
        sheet_name=FIX_SHEET,
        dtype=str,
    )
    assert fixes["_reasons"].str.contains("names no single customer").sum() == 11 and len(fixes) == 12
    with engine.connect() as connection:
        customer = connection.scalar(
            sa.select(Customer.name).where(Customer.merged_into_id.is_(None)).order_by(Customer.id)
        )
    re_import_fix_sheet(demo_project, correct(fixes, str(customer)))

    for _ in range(2):  # the run that loads the fix sheet, and the next one (its keys there from the start)
        code, run = crmi_run(demo_project, core_url)
        dispose_engines()

        assert the_line(run, "sales_xlsx_opportunities_fixed")["rejected"] == 0
        line = the_line(run, "sales_xlsx_opportunities")
        # The source still holds its 11 rows and rejects its 2: all in the core now (but the subtotal), corrected.
        assert (line["rejected"], line["subtotals"], line["held"]) == (2, 1, 11)
        assert line["rows_read"] == line["loaded"] + line["merged"] + line["rejected"] + line["held"]
        assert (line["corrected"], line["quarantined"]) == (12, 0), run["verdict"]
        assert money(line["amount_in_quarantine"]) == 0
        assert money(line["amount_corrected"]) == money(line["amount_quarantined"]) > 0
        assert line["balanced"] and line["status"] == "clean" and code == 0, run["verdict"]
        assert "steward" not in run["verdict"] and run["quarantined_rows"] == 0
        report = tmp_path / "var" / "reports" / run["run_id"]
        assert FIX_SHEET not in openpyxl.load_workbook(report / "reconciliation.xlsx").sheetnames
        assert reference_queue(engine) == []
    engine.dispose()


def crosswalk_of(engine: sa.Engine, system: str = "erp") -> dict[str, tuple[int, str | None]]:
    """The crosswalk of ``system``'s customers: key -> (record, the fix mapping that last wrote it)."""
    with engine.connect() as connection:
        rows = connection.execute(
            sa.select(ExternalId.external_key, ExternalId.entity_id, ExternalId.corrected_by).where(
                ExternalId.system == system, ExternalId.entity == "customer"
            )
        ).all()
    return {key: (entity_id, fix) for key, entity_id, fix in rows}


def customer_names(engine: sa.Engine) -> dict[int, str]:
    with engine.connect() as connection:
        return dict(connection.execute(sa.select(Customer.id, Customer.name)).all())


@pytest.mark.parametrize("row_by_row", [False, True], ids=["fast", "row_by_row"])
def test_a_fix_sheet_row_whose_source_row_loads_in_the_same_load_is_superseded_and_the_source_wins(
    core_url: str, row_by_row: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The source's row C3 was rejected, a fix sheet loaded it; then the source itself is corrected (to other
    values). Its own mapping loads first: its values stand, the fix sheet's row is not written but counted as
    merged (superseded), with a warning naming it; on every load while both hold the row."""
    from crm_core import loading
    from tests.test_loading import CUSTOMER_RULES, batch, load

    monkeypatch.setattr(loading, "_ROW_BY_ROW", row_by_row)
    engine = core_engine(core_url)
    own = [
        {"_external_key": f"C{i}", "name": f"深圳市第{i}号科技有限公司", "credit_code": None}
        for i in range(12)
    ]
    # The fix sheet holds C3 and ten more rows (enough for the fast path to decide a run of them).
    fixed = [{"_external_key": "C3", "name": "深圳市修正科技有限公司", "credit_code": None}] + [
        {"_external_key": f"F{i}", "name": f"广州市第{i}号贸易有限公司", "credit_code": None}
        for i in range(10)
    ]

    def fix() -> Any:
        return dataclasses.replace(batch("erp", fixed), mapping="erp_fixed", corrects=True)

    load(
        engine,
        "r1",
        "customer",
        [batch("erp", [r for r in own if r["_external_key"] != "C3"])],
        CUSTOMER_RULES,
    )
    load(engine, "r2", "customer", [fix()], CUSTOMER_RULES)
    assert crosswalk_of(engine)["C3"][1] == "erp_fixed"
    own[3]["name"] = "深圳市第3号科技股份有限公司"  # corrected at the source, not as the fix sheet did

    for run, (source_outcome, changed) in (("r3", ("updated", 1)), ("r4", ("unchanged", 12))):
        source, fixes = load(engine, run, "customer", [batch("erp", own), fix()], CUSTOMER_RULES)

        assert getattr(source, source_outcome) == changed and source.loaded == 12
        assert (fixes.inserted, fixes.updated, fixes.unchanged) == (0, 0, 10)
        assert (fixes.merged, fixes.superseded, fixes.warnings) == (1, 1, 1)
        assert fixes.balanced
        entity_id, mark = crosswalk_of(engine)["C3"]
        assert customer_names(engine)[entity_id] == "深圳市第3号科技股份有限公司" and mark is None
        with engine.connect() as connection:
            warned = connection.execute(
                sa.select(Reject.mapping, Reject.value, Reject.severity, Reject.row_ref)
                .join(LoadRun, LoadRun.id == Reject.load_run_id)
                .where(LoadRun.run_key == run, Reject.rule == "superseded")
            ).all()
        assert warned == [("erp_fixed", "C3", "warn", "2")]
    engine.dispose()


@pytest.mark.parametrize("row_by_row", [False, True], ids=["fast", "row_by_row"])
def test_a_fix_sheet_row_whose_key_columns_were_corrected_keeps_its_source_rows_identity(
    core_url: str, row_by_row: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hash key over a corrected column gives the fix sheet's row another key than its source row had: the
    record is filed under both (the fix sheet carries the original as ``_source_key``), so the source row's reject
    is corrected, and the source row corrected the same way later updates that record instead of adding one.
    A row whose original key names a record already (it loaded before it broke) updates that record."""
    from crm_core import loading
    from tests.test_loading import CUSTOMER_RULES, batch, load

    monkeypatch.setattr(loading, "_ROW_BY_ROW", row_by_row)
    engine = core_engine(core_url)
    own = [
        {"_external_key": f"C{i}", "name": f"深圳市第{i}号科技有限公司", "credit_code": None}
        for i in range(10)
    ]
    load(engine, "r1", "customer", [batch("erp", own)], CUSTOMER_RULES)
    # NEW was rejected (no name); BROKE loaded as C5 in r1 and broke later (its key columns changed: key B5).
    fixed = [
        {
            "_external_key": "NEW",
            "_source_key": "H-EMPTY",
            "name": "上海浦江测试科技有限公司",
            "credit_code": None,
        },
        {
            "_external_key": "C5-FIXED",
            "_source_key": "C5",
            "name": "深圳市第五号科技有限公司",
            "credit_code": None,
        },
    ] + [
        {
            "_external_key": f"F{i}",
            "_source_key": f"F{i}",
            "name": f"广州市第{i}号贸易有限公司",
            "credit_code": None,
        }
        for i in range(10)
    ]
    fix = dataclasses.replace(batch("erp", fixed), mapping="erp_fixed", corrects=True)
    before = len(customer_names(engine))

    [stats] = load(engine, "r2", "customer", [fix], CUSTOMER_RULES)

    assert (stats.inserted, stats.updated, stats.rejected) == (11, 1, 0)
    crosswalk = crosswalk_of(engine)
    assert crosswalk["H-EMPTY"] == crosswalk["NEW"] and crosswalk["NEW"][1] == "erp_fixed"
    assert crosswalk["C5-FIXED"] == crosswalk["C5"] and crosswalk["C5"][1] == "erp_fixed"
    names = customer_names(engine)
    assert len(names) == before + 11  # NEW and the ten F rows; C5's record was updated, not doubled
    assert names[crosswalk["C5"][0]] == "深圳市第五号科技有限公司"
    # The same fix sheet again changes nothing.
    [again] = load(engine, "r3", "customer", [fix], CUSTOMER_RULES)
    assert (again.unchanged, again.inserted) == (12, 0) and crosswalk_of(engine) == crosswalk

    # The source is corrected as the fix sheet was: its row has the corrected key and updates the record.
    # (C5 is still broken there: its row has another key and is rejected, not in this batch.)
    corrected = [*(r for r in own if r["_external_key"] != "C5"),
                 {"_external_key": "NEW", "name": "上海浦江测试科技有限公司", "credit_code": None}]  # fmt: skip
    source, fixes = load(engine, "r4", "customer", [batch("erp", corrected), fix], CUSTOMER_RULES)

    assert (source.inserted, source.loaded) == (0, 10)
    assert (fixes.superseded, fixes.merged) == (1, 1)
    assert len(customer_names(engine)) == before + 11
    assert crosswalk_of(engine)["NEW"] == (crosswalk["NEW"][0], None)
    engine.dispose()
