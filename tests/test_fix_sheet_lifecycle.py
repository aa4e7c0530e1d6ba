"""A fix sheet's life on a small Excel project: rows rejected, corrected in the report's fix sheet and re-imported,
then corrected in the source itself. The reconciliation counts each row once and equals what the core holds."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa
from openpyxl import Workbook
from typer.testing import CliRunner

from crm_core.db import make_engine
from crm_core.models import Customer, ExternalId, Opportunity
from integration.assets.resources import dispose_engines
from integration.cli import app
from integration.pipeline import ReconciliationReport, reconcile

CUSTOMERS = [
    ["深圳市腾达科技有限公司", "91440300708461136T", "广东省深圳市南山区科技园"],
    ["无锡市科众贸易有限公司", None, "江苏无锡新吴区学院路12号"],
    [None, "91310115MA1H7GQX2K", "上海市浦东新区世纪大道100号"],  # no name: rejected
]
OPPORTUNITIES = [
    ["OPP-1", "服务器采购", "深圳市腾达科技有限公司", "初步接洽", "10万"],
    ["OPP-2", "软件许可", "无锡市科众贸易有限公司", "商务谈判", "20000"],
    ["OPP-3", "运维服务", "深圳市腾达科技有限公司", "商务谈判", "待定"],  # no readable amount: rejected
    ["OPP-4", "培训", "无锡市科众贸易有限公司", "初步接洽", "5000"],
]
CUSTOMER_MAPPING = """version: 1
source: {connector: sales, sheet: 客户, key: {hash: [客户名称, 统一社会信用代码]}}
target: customer
fields:
  name: {from: 客户名称, transforms: [company_name], required: true}
  credit_code: {from: 统一社会信用代码, transforms: [uscc], on_error: "null"}
  address: {from: 地址, transforms: [trim]}
"""
OPPORTUNITY_MAPPING = """version: 1
source: {connector: sales, sheet: 商机, key: 商机编号}
target: opportunity
fields:
  customer: {from: 客户名称, lookup: {by: name}}
  name: {from: 商机名称, required: true}
  stage: {from: 阶段, transforms: [stage]}
  amount: {from: 预计金额, transforms: [parse_amount]}
"""


def write_workbook(root: Path, customers: list[list[Any]], opportunities: list[list[Any]]) -> None:
    """The sales team's workbook: 客户 (no id column: a hash key) and 商机 (keyed by 商机编号)."""
    book = Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.title = "客户"
    sheet.append(["客户名称", "统一社会信用代码", "地址"])
    for row in customers:
        sheet.append(row)
    deals = book.create_sheet("商机")
    deals.append(["商机编号", "商机名称", "客户名称", "阶段", "预计金额"])
    for row in opportunities:
        deals.append(row)
    book.save(root / "data" / "sales.xlsx")


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A small engagement: one workbook, one mapping per sheet (the customers' as `mapping scaffold` keys it)."""
    root = tmp_path / "acme"
    (root / "data").mkdir(parents=True)
    (root / "mappings").mkdir()
    write_workbook(root, CUSTOMERS, OPPORTUNITIES)
    (root / "project.yaml").write_text(
        "version: 1\nname: acme\nsources:\n  sales: {connector: excel, path: data/sales*.xlsx}\n"
        "reconciliation: {max_quarantined_share: 0.5}\n",
        encoding="utf-8",
    )
    (root / "mappings" / "sales_customers.yaml").write_text(CUSTOMER_MAPPING, encoding="utf-8")
    (root / "mappings" / "sales_opportunities.yaml").write_text(OPPORTUNITY_MAPPING, encoding="utf-8")
    monkeypatch.chdir(root)  # the reports land in var/reports/<run id>/ here
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    (tmp_path / "dagster_home").mkdir()
    return root


def crmi_run(project: Path, core_url: str, *more: str) -> tuple[str, str]:
    """`crmi run` as a consultant types it: its run id and what it printed."""
    result = CliRunner().invoke(app, ["run", "--project", str(project), "--core-url", core_url, *more])
    dispose_engines()
    assert result.exit_code == 0, result.output
    [run_id] = [w.split("/")[-1] for w in result.output.split() if w.startswith("var/reports/")]
    return run_id, " ".join(result.output.split())  # the console wraps long lines


def fix_sheet(project: Path, run_id: str, entity: str) -> pd.DataFrame:
    return pd.read_excel(
        project / "var" / "reports" / run_id / "reconciliation.xlsx",
        sheet_name=f"fix sales.{entity}",
        dtype=str,
    )


def re_import(project: Path, sheets: dict[str, pd.DataFrame]) -> None:
    """README "Re-importing the rows to fix": the corrected workbook as a source, a copy of each mapping reading it."""
    (project / "fixes").mkdir()
    with pd.ExcelWriter(project / "fixes" / "corrected.xlsx") as writer:
        for entity, frame in sheets.items():
            frame.to_excel(writer, sheet_name=f"fix sales.{entity}", index=False)
    project_yaml = project / "project.yaml"
    project_yaml.write_text(
        project_yaml.read_text(encoding="utf-8").replace(
            "sources:\n", "sources:\n  fixes: {connector: excel, path: fixes/*.xlsx}\n"
        ),
        encoding="utf-8",
    )
    for entity, name, old in (
        ("customer", "sales_customers", "{connector: sales, sheet: 客户, "),
        ("opportunity", "sales_opportunities", "{connector: sales, sheet: 商机, "),
    ):
        if entity in sheets:
            text = (project / "mappings" / f"{name}.yaml").read_text(encoding="utf-8")
            new = f"{{connector: fixes, sheet: fix sales.{entity}, system: sales, "
            (project / "mappings" / f"{name}_fixed.yaml").write_text(text.replace(old, new), encoding="utf-8")


def lines(report: ReconciliationReport, entity: str) -> dict[str, Any]:
    return {line.mapping: line for line in report.lines if line.entity == entity}


def assert_report_equals_core(engine: sa.Engine, report: ReconciliationReport) -> None:
    """Every record the core holds is counted once over the lines, with the money the core holds."""
    assert report.balanced, report.to_markdown()
    opportunities = lines(report, "opportunity").values()
    with engine.connect() as connection:
        held = connection.scalar(sa.select(sa.func.count()).select_from(Opportunity))
        money = connection.scalar(sa.select(sa.func.sum(Opportunity.amount)))
    assert sum(line.loaded for line in opportunities) == held
    assert sum((line.amount_core or Decimal(0)) for line in opportunities) == Decimal(money)
    assert sum((line.amount_loaded or Decimal(0)) for line in opportunities) == Decimal(money)


def test_a_row_corrected_in_the_source_after_its_fix_sheet_loaded_counts_once_and_the_source_wins(
    project: Path, core_url: str
) -> None:
    first, _ = crmi_run(project, core_url)
    fixes = fix_sheet(project, first, "opportunity")
    assert list(fixes["商机编号"]) == ["OPP-3"]
    re_import(project, {"opportunity": fixes.assign(预计金额="12.5万")})
    crmi_run(project, core_url)
    engine = make_engine(core_url)

    def amount_of_opp_3() -> Decimal:
        with engine.connect() as connection:
            return Decimal(
                connection.scalar(
                    sa.select(Opportunity.amount)
                    .join(
                        ExternalId,
                        (ExternalId.entity_id == Opportunity.id) & (ExternalId.entity == "opportunity"),
                    )
                    .where(ExternalId.external_key == "OPP-3")
                )
            )

    assert amount_of_opp_3() == Decimal(125000)
    # The sales team corrects the row in the workbook too, to another amount; the fix mapping is still there.
    corrected = [row if row[0] != "OPP-3" else [*row[:4], "15万"] for row in OPPORTUNITIES]
    write_workbook(project, CUSTOMERS, corrected)

    # The run that reads the corrected source, and one that reads both again (unchanged rows).
    for more in ((), ("--no-skip",)):
        run_id, output = crmi_run(project, core_url, *more)
        report = reconcile(engine, run_id)

        assert amount_of_opp_3() == Decimal(150000)  # the newer, the source's own value
        assert_report_equals_core(engine, report)
        by_mapping = lines(report, "opportunity")
        source, fix = by_mapping["sales_opportunities"], by_mapping["sales_opportunities_fixed"]
        assert (source.loaded, source.rejected, source.corrected) == (4, 0, 0)
        assert (fix.rows_read, fix.loaded, fix.merged, fix.superseded) == (1, 0, 1, 1)
        assert fix.amount_merged == Decimal(125000) and fix.amount_core == Decimal(0)
        assert "OPP-3" in output and "superseded" in output and "remove the fix mapping" in output, output
        rows = report.rejects[report.rejects["rule"] == "superseded"]
        assert list(rows["value"]) == ["OPP-3"] and set(rows["severity"]) == {"warn"}
    engine.dispose()


def test_a_hash_keyed_row_corrected_in_the_fix_sheet_replaces_its_quarantined_original(
    project: Path, sqlite_core_url: str
) -> None:
    first, _ = crmi_run(project, sqlite_core_url)
    fixes = fix_sheet(project, first, "customer")
    assert fixes["客户名称"].isna().all() and len(fixes) == 1
    assert "_source_key" in fixes.columns and fixes["_source_key"].notna().all()
    # The empty name is filled in: one of the hashed columns.
    re_import(project, {"customer": fixes.assign(客户名称="上海浦江测试科技有限公司")})

    second, _ = crmi_run(project, sqlite_core_url)

    engine = make_engine(sqlite_core_url)
    report = reconcile(engine, second)
    assert report.balanced, report.to_markdown()
    by_mapping = lines(report, "customer")
    source, fix = by_mapping["sales_customers"], by_mapping["sales_customers_fixed"]
    assert (fix.loaded, fix.rejected) == (1, 0)
    # The source still rejects its row, but it is in the core now: corrected, not quarantined.
    assert (source.rejected, source.corrected, source.quarantined) == (1, 1, 0)
    assert report.quarantined_rows == 1  # OPP-3 only
    with engine.connect() as connection:
        names = set(connection.scalars(sa.select(Customer.name).where(Customer.merged_into_id.is_(None))))
        keys = connection.execute(
            sa.select(ExternalId.external_key, ExternalId.entity_id, ExternalId.corrected_by).where(
                ExternalId.entity == "customer", ExternalId.corrected_by.is_not(None)
            )
        ).all()
    assert names == {"深圳市腾达科技有限公司", "无锡市科众贸易有限公司", "上海浦江测试科技有限公司"}
    # The original row's key names the corrected customer; so does the key its corrected cells give.
    assert {key for key, _, _ in keys} >= {fixes["_source_key"].iloc[0]}
    assert len({entity_id for _, entity_id, _ in keys}) == 1
    with pd.ExcelFile(project / "var" / "reports" / second / "reconciliation.xlsx") as book:
        assert "fix sales.customer" not in book.sheet_names  # nothing left to fix there

    # Later the sales team fills the name in the workbook itself, as the fix sheet did: the same customer,
    # updated by its source, not a second one; the fix sheet's row is superseded.
    named = [row if row[0] is not None else ["上海浦江测试科技有限公司", *row[1:]] for row in CUSTOMERS]
    write_workbook(project, named, OPPORTUNITIES)
    third, output = crmi_run(project, sqlite_core_url)
    report = reconcile(engine, third)
    assert report.balanced, report.to_markdown()
    with engine.connect() as connection:
        assert (
            connection.scalar(
                sa.select(sa.func.count()).select_from(Customer).where(Customer.merged_into_id.is_(None))
            )
            == 3
        )
    by_mapping = lines(report, "customer")
    assert (by_mapping["sales_customers"].loaded, by_mapping["sales_customers"].rejected) == (3, 0)
    assert by_mapping["sales_customers_fixed"].superseded == 1
    assert "superseded" in output
    engine.dispose()
