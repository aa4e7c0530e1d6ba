"""An honest reconciliation: the source amount is the money of every row read, quarantine is shown, and a
run that leaves too much of it in quarantine fails (exit 2, the asset check) instead of saying all is well."""

from __future__ import annotations

import io
import json
from decimal import Decimal
from pathlib import Path

import openpyxl
import pandas as pd
import pytest
import sqlalchemy as sa
from rich.console import Console
from typer.testing import CliRunner

from crm_core.db import make_engine, upgrade
from crm_core.models import LoadRun
from integration import cli
from integration.cli import app
from integration.connectors.base import ROW_KIND
from integration.mappings.transforms import TransformFailure, parse_amount_value
from integration.pipeline import (
    Migration,
    ReconciliationLine,
    ReconciliationReport,
    extract,
    load,
    reconcile,
    stage,
)
from integration.reports import quarantine_notes, unbalanced_reasons


def load_entities(migration: Migration, engine: sa.Engine, run_key: str, entities: list[str]) -> None:
    """Extract, stage and load the given entities of a project, in order."""
    for entity in entities:
        raw = {migration.raw_asset(m): extract(migration, m) for m in migration.mappings_for(entity)}
        load(migration, engine, run_key, stage(migration, entity, raw))


def readable_amounts(values: list[object]) -> Decimal:
    """Sum what parse_amount can read of a column, as the sheet's reader would by hand."""
    total = Decimal(0)
    for value in values:
        if value is None or (isinstance(value, float) and value != value) or not str(value).strip():
            continue
        try:
            total += parse_amount_value(value)
        except (TransformFailure, ValueError):
            continue
    return total


def all_in_base_currency(project: Path) -> None:
    """Blank the 商机 sheet's 币种 column (blank means 人民币) in the project's copy of the workbook."""
    for path in (project / "data").glob("sales*.xlsx"):
        workbook = openpyxl.load_workbook(path)
        sheet = workbook["商机"]
        for row in sheet.iter_rows():
            for cell in row:
                if cell.value == "币种":
                    for below in sheet.iter_rows(
                        min_row=cell.row + 1, min_col=cell.column, max_col=cell.column
                    ):
                        below[0].value = None
        workbook.save(path)


def test_amount_source_is_every_row_read_and_the_quarantine_is_shown(
    demo_project: Path, sqlite_core_url: str
) -> None:
    # Every deal in the base currency, so the sheet's own figures add up by hand (conversion: test_currency).
    all_in_base_currency(demo_project)
    migration = Migration.load(str(demo_project))
    engine = make_engine(sqlite_core_url)
    upgrade(engine)
    load_entities(migration, engine, "run-1", ["sales_rep", "customer", "opportunity"])
    report = reconcile(engine, "run-1", max_quarantined_share=0.2)
    [line] = [x for x in report.lines if (x.source, x.entity) == ("sales_xlsx", "opportunity")]

    # The 商机 sheet as read: every data row's 预计金额 that can be read at all, loaded or not.
    mapping = next(m for m in migration.mappings if m.name == "sales_xlsx_opportunities")
    sheet = extract(migration, mapping)
    data = sheet[sheet[ROW_KIND] != "subtotal"]
    assert line.amount_source == readable_amounts(data["预计金额"].tolist())
    # The sheet plants an unreadable amount and a bad date (rejected): money sits in quarantine,
    # and customers named nowhere (held for a steward, not rejected).
    assert line.quarantined == line.rejected - line.subtotals + line.held and line.held > 0
    assert line.amount_unreadable == 1
    assert line.amount_quarantined is not None and line.amount_quarantined > 0
    assert line.amount_core is not None and line.amount_core + line.amount_quarantined == line.amount_source
    assert line.balanced and line.status == "quarantined"

    verdict = report.verdict()
    assert "quarantined" in verdict and "and loaded" not in verdict
    [note] = [n for n in quarantine_notes(report) if n.startswith("sales_xlsx/opportunity")]
    assert f"{line.amount_quarantined:,.2f}" in note
    assert report.acceptable and not unbalanced_reasons(report)

    # Under a stricter project limit the same run fails, and says why.
    strict = reconcile(engine, "run-1", max_quarantined_share=0.05)
    assert strict.balanced and not strict.acceptable
    assert any(
        r.startswith("sales_xlsx/opportunity") and "max_quarantined_share 5%" in r
        for r in unbalanced_reasons(strict)
    )
    engine.dispose()


def test_only_a_run_with_nothing_quarantined_says_every_row_is_loaded() -> None:
    clean = ReconciliationLine("erp", "customer", 10, 10, 0, 0, 0, None, None)
    subtotal_only = ReconciliationLine("xlsx", "customer", 11, 10, 0, 1, 0, None, None, subtotals=1)
    assert clean.status == subtotal_only.status == "clean"
    held = ReconciliationLine("xlsx", "opportunity", 10, 9, 0, 0, 0, Decimal(100), Decimal(90), held=1,
                              amount_loaded=Decimal(90), amount_quarantined=Decimal(10))  # fmt: skip
    assert held.balanced and held.quarantined == 1 and held.status == "quarantined"
    # Money that is neither loaded, merged nor quarantined does not balance.
    lost = ReconciliationLine("xlsx", "opportunity", 10, 9, 0, 1, 0, Decimal(100), Decimal(90),
                              amount_loaded=Decimal(90), amount_quarantined=Decimal(5))  # fmt: skip
    assert not lost.balanced and lost.status == "failed"
    # A line can balance in rows and fail on its quarantined money alone.
    costly = ReconciliationLine("xlsx", "opportunity", 100, 99, 0, 1, 0, Decimal(100), Decimal(50),
                                amount_loaded=Decimal(50), amount_quarantined=Decimal(50),
                                max_quarantined_share=0.05)  # fmt: skip
    assert costly.balanced and costly.quarantined_share == 0.5 and costly.status == "failed"


def fix_sheet_report() -> ReconciliationReport:
    """A run with a fix sheet re-imported as the README says: two lines read sales_xlsx → opportunity."""

    def line(mapping: str, read: int, rejected: int) -> ReconciliationLine:
        return ReconciliationLine("sales_xlsx", "opportunity", read, read - rejected, 0, rejected, 0, None, None,
                                  max_quarantined_share=0.05, mapping=mapping)  # fmt: skip

    return ReconciliationReport(
        "r1",
        [line("sales_xlsx_opportunities", 5, 2), line("sales_xlsx_opportunities_fixed", 2, 1),
         ReconciliationLine("legacy_crm", "customer", 3, 2, 0, 1, 0, None, None, max_quarantined_share=0.05,
                            mapping="legacy_crm_accounts")],
        pd.DataFrame(), {},
    )  # fmt: skip


def test_a_fix_sheet_line_is_told_apart_from_its_source_line_by_its_mapping() -> None:
    # The README's fix sheet re-import files its rows under the original source (`system: sales_xlsx`):
    # both lines read sales_xlsx → opportunity and were printed alike, in the table and in why the run fails.
    report = fix_sheet_report()
    assert report.labels() == [
        "sales_xlsx (sales_xlsx_opportunities)", "sales_xlsx (sales_xlsx_opportunities_fixed)", "legacy_crm",
    ]  # fmt: skip
    assert "| sales_xlsx (sales_xlsx_opportunities_fixed) | opportunity | 2 |" in report.to_markdown()
    assert [n.split(":")[0] for n in quarantine_notes(report)] == [
        "sales_xlsx (sales_xlsx_opportunities)/opportunity", "sales_xlsx (sales_xlsx_opportunities_fixed)/opportunity",
        "legacy_crm/customer",
    ]  # fmt: skip
    assert unbalanced_reasons(report)[1].startswith(
        "sales_xlsx (sales_xlsx_opportunities_fixed)/opportunity: 1 of 2"
    )


def test_crmi_run_table_prints_each_lines_mapping_whole(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The table's source column cut "sales_xlsx (sales_xlsx_opportunities_fixed)" to "(sales_xl…" on both lines.
    out = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(width=160, file=out))
    monkeypatch.setattr(cli, "_converted_amounts", lambda core: "")
    monkeypatch.chdir(tmp_path)
    timing = {"phases": [], "seconds_total": 1.0, "rows_read": 10, "rows_per_second": 10.0}
    cli._report_success("r1", fix_sheet_report(), "sqlite://", "full", timing, False)
    first_column = "".join(
        row.split("│")[1].strip() for row in out.getvalue().splitlines() if row.startswith("│")
    )
    assert "sales_xlsx(sales_xlsx_opportunities)sales_xlsx(sales_xlsx_opportunities_fixed)" in first_column


@pytest.mark.slow
def test_crmi_run_exits_2_when_more_is_quarantined_than_the_project_allows(
    demo_project: Path, sqlite_core_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = demo_project / "project.yaml"
    text = settings.read_text(encoding="utf-8")
    assert "max_quarantined_share: 0.2" in text
    settings.write_text(
        text.replace("max_quarantined_share: 0.2", "max_quarantined_share: 0.01"), encoding="utf-8"
    )
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        app, ["run", "--project", str(demo_project), "--core-url", sqlite_core_url, "--json"]
    )
    assert result.exit_code == 2, result.output
    payload = json.loads(result.stdout)
    assert payload["balanced"] is True and payload["acceptable"] is False
    assert payload["quarantined_rows"] > 0 and Decimal(payload["quarantined_amount"]) > 0
    assert any("max_quarantined_share 1%" in reason for reason in payload["unbalanced"])
    engine = make_engine(sqlite_core_url)
    with engine.connect() as connection:
        status = connection.scalar(sa.select(LoadRun.status).where(LoadRun.run_key == payload["run_id"]))
    engine.dispose()
    assert status == "unbalanced"  # the reconciliation asset (and its check) judged it the same way


def small_sales_project(root: Path) -> None:
    """A workbook of one customer and three deals: 12.5万, 待定 (unreadable) and -500 (a rule rejects it)."""
    workbook = openpyxl.Workbook()
    customers = workbook.active
    assert customers is not None
    customers.title = "客户"
    customers.append(["客户名称"])
    customers.append(["深圳市华鑫科技有限公司"])
    deals = workbook.create_sheet("商机")
    deals.append(["商机编号", "客户名称", "商机名称", "阶段", "预计金额"])
    deals.append(["XS-1", "深圳市华鑫科技有限公司", "升级", "方案报价", "12.5万"])
    deals.append(["XS-2", "深圳市华鑫科技有限公司", "二期", "方案报价", "待定"])
    deals.append(["XS-3", "深圳市华鑫科技有限公司", "退款", "方案报价", "-500"])
    (root / "data").mkdir()
    workbook.save(root / "data" / "sales.xlsx")
    (root / "mappings").mkdir()
    (root / "project.yaml").write_text(
        "version: 1\nname: acme\nsources:\n  sales: {connector: excel, path: data/sales*.xlsx}\n",
        encoding="utf-8",
    )
    (root / "mappings" / "customers.yaml").write_text(
        "version: 1\nsource: {connector: sales, sheet: 客户, key: 客户名称}\ntarget: customer\n"
        "fields:\n  name: {from: 客户名称, required: true}\n",
        encoding="utf-8",
    )
    (root / "mappings" / "deals.yaml").write_text(
        "version: 1\nsource: {connector: sales, sheet: 商机, key: 商机编号}\ntarget: opportunity\nfields:\n"
        "  customer: {from: 客户名称, lookup: {by: name}}\n  name: {from: 商机名称, required: true}\n"
        "  stage: {from: 阶段, transforms: [stage]}\n  amount: {from: 预计金额, transforms: [parse_amount]}\n",
        encoding="utf-8",
    )


def test_a_readable_amount_a_rule_rejects_is_not_called_unreadable(
    tmp_path: Path, sqlite_core_url: str
) -> None:
    # 待定 cannot be read; -500 is read and counted, and only the amount rule rejects its row.
    small_sales_project(tmp_path)
    migration = Migration.load(str(tmp_path))
    engine = make_engine(sqlite_core_url)
    upgrade(engine)
    load_entities(migration, engine, "run-1", ["customer", "opportunity"])
    report = reconcile(engine, "run-1", max_quarantined_share=1.0)
    [line] = [x for x in report.lines if x.entity == "opportunity"]
    engine.dispose()
    assert line.rejected == 2 and line.amount_quarantined == Decimal("-500")
    assert line.amount_unreadable == 1
    [note] = quarantine_notes(report)
    assert "(1 with no readable amount)" in note


@pytest.mark.parametrize("mode", ["full", "trial"])
def test_a_failing_run_points_at_the_fix_sheets_and_a_trial_at_no_rollback(
    mode: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A newcomer's run failed on quarantined rows: the output named only `crmi rollback`, not the fix sheets
    # that load them, and a trial named a rollback of a run that is in its scratch core, not in the core.
    out = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(width=300, file=out))
    monkeypatch.setattr(cli, "_converted_amounts", lambda core: "")
    monkeypatch.chdir(tmp_path)
    timing = {"phases": [], "seconds_total": 1.0, "rows_read": 10, "rows_per_second": 10.0}
    cli._report_success("r1", fix_sheet_report(), "sqlite://", mode, timing, False)
    text = out.getvalue()
    assert "fix sheets of reconciliation.xlsx" in text and "Re-importing the rows to fix" in text
    if mode == "trial":
        assert "crmi rollback" not in text and "scratch core" in text
    else:
        assert "undo it with `crmi rollback r1`" in text


def test_a_trial_counts_the_money_of_its_sampled_rejected_rows_as_a_full_run_does(
    tmp_path: Path, sqlite_core_url: str
) -> None:
    # A trial's source amount covered only the rows it loaded: the -500 its rule rejected was in neither the
    # source nor the quarantine, and a fix sheet's corrected row then left negative money "in quarantine".
    small_sales_project(tmp_path)
    migration = Migration.load(str(tmp_path))
    engine = make_engine(sqlite_core_url)
    upgrade(engine)
    for entity in ("customer", "opportunity"):
        raw = {migration.raw_asset(m): extract(migration, m) for m in migration.mappings_for(entity)}
        load(migration, engine, "trial-1", stage(migration, entity, raw), mode="trial", sample=10)
    [line] = [x for x in reconcile(engine, "trial-1").lines if x.entity == "opportunity"]
    engine.dispose()
    assert (line.rows_read, line.loaded, line.rejected) == (3, 1, 2)
    assert line.amount_source == Decimal("124500.00") and line.amount_quarantined == Decimal("-500")
    assert line.amount_unreadable == 1 and line.balanced


def test_a_corrected_row_whose_amount_was_unreadable_is_not_counted_as_quarantined_unreadable(
    tmp_path: Path, sqlite_core_url: str
) -> None:
    # The 待定 deal corrected through a fix sheet still counted among the quarantined rows "with no readable
    # amount", beside held rows that all had one.
    small_sales_project(tmp_path)
    fixes = openpyxl.Workbook()
    sheet = fixes.active
    assert sheet is not None
    sheet.title = "fix sales.opportunity"
    sheet.append(["商机编号", "客户名称", "商机名称", "阶段", "预计金额", "_location", "_row_ref"])
    sheet.append(["XS-2", "深圳市华鑫科技有限公司", "二期", "方案报价", "15万", "sales.xlsx#商机", "3"])
    (tmp_path / "fixes").mkdir()
    fixes.save(tmp_path / "fixes" / "corrected.xlsx")
    with (tmp_path / "project.yaml").open("a", encoding="utf-8") as settings:
        settings.write("  fixes: {connector: excel, path: fixes/*.xlsx}\n")
    deals = (tmp_path / "mappings" / "deals.yaml").read_text(encoding="utf-8")
    (tmp_path / "mappings" / "deals_fixed.yaml").write_text(
        deals.replace(
            "source: {connector: sales, sheet: 商机, key: 商机编号}",
            'source: {connector: fixes, sheet: "fix sales.opportunity", key: 商机编号, system: sales}',
        ),
        encoding="utf-8",
    )
    migration = Migration.load(str(tmp_path))
    engine = make_engine(sqlite_core_url)
    upgrade(engine)
    load_entities(migration, engine, "run-1", ["customer", "opportunity"])
    report = reconcile(engine, "run-1", max_quarantined_share=1.0)
    [line] = [x for x in report.lines if x.mapping == "deals"]
    engine.dispose()
    assert line.rejected == 2 and line.corrected == 1 and line.quarantined == 1
    assert line.amount_corrected == 0 and line.amount_in_quarantine == Decimal("-500")
    assert line.amount_unreadable == 0
    assert not [n for n in quarantine_notes(report) if "no readable amount" in n]
