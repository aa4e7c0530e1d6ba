"""A trial's sample shows what the full run would do to the rows it takes, and says how much it left out.

A newcomer's trial of a 4-row opportunities table read 3 rows and rejected none ("Every row is accounted for")
where the full run read 4 and rejected 1: the row whose customer exists in no source had been left out.
"""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path
from typing import Any

import openpyxl
import pytest
from rich.console import Console

from crm_core.db import make_engine, upgrade
from integration import cli
from integration.pipeline import Migration, extract, load, reconcile, stage

ACCOUNTS = [
    ("a1", "深圳市华鑫科技有限公司"),
    ("a2", "广州市天河贸易有限公司"),
    ("a3", "北京市朝阳咨询有限公司"),
]
DEALS = [("o1", "a1"), ("o2", "a2"), ("o3", "a3"), ("o4", "a9")]  # a9: in no source


def legacy_crm_project(root: Path, accounts: list[tuple[str, str]], deals: list[tuple[str, str]]) -> None:
    """A legacy CRM database of accounts and opportunities pointing at them by account id."""
    (root / "data").mkdir()
    (root / "mappings").mkdir()
    with sqlite3.connect(root / "data" / "crm.sqlite") as db:
        db.execute("CREATE TABLE accounts (id TEXT PRIMARY KEY, name TEXT)")
        db.executemany("INSERT INTO accounts VALUES (?, ?)", accounts)
        db.execute(
            "CREATE TABLE opportunities (id TEXT PRIMARY KEY, account_id TEXT, name TEXT, amount TEXT)"
        )
        db.executemany(
            "INSERT INTO opportunities VALUES (?, ?, ?, ?)",
            [(key, account, f"deal {key}", "100") for key, account in deals],
        )
    (root / "project.yaml").write_text(
        "version: 1\nname: acme\nsources:\n  legacy_crm: {connector: sql, url: 'sqlite:///data/crm.sqlite'}\n"
        "reconciliation: {max_quarantined_share: 1.0}\n",
        encoding="utf-8",
    )
    (root / "mappings" / "accounts.yaml").write_text(
        "version: 1\nsource: {connector: legacy_crm, table: accounts, key: id}\ntarget: customer\n"
        "fields:\n  name: {from: name, required: true}\n",
        encoding="utf-8",
    )
    (root / "mappings" / "opportunities.yaml").write_text(
        "version: 1\nsource: {connector: legacy_crm, table: opportunities, key: id}\ntarget: opportunity\n"
        "fields:\n  customer: {from: account_id, lookup: {by: external_id}}\n"
        "  name: {from: name, required: true}\n  stage: {const: 方案报价, transforms: [stage]}\n"
        "  amount: {from: amount, transforms: [parse_amount]}\n",
        encoding="utf-8",
    )


def run_lines(root: Path, url: str, run_key: str, sample: int | None) -> dict[str, Any]:
    """Load the project's customers and opportunities (a trial sample when ``sample``); return its lines."""
    migration = Migration.load(str(root))
    engine = make_engine(url)
    upgrade(engine)
    for entity in ("customer", "opportunity"):
        raw = {migration.raw_asset(m): extract(migration, m) for m in migration.mappings_for(entity)}
        mode = "full" if sample is None else "trial"
        load(migration, engine, run_key, stage(migration, entity, raw), mode=mode, sample=sample)
    report = reconcile(engine, run_key)
    engine.dispose()
    return {"report": report, **{line.entity: line for line in report.lines}}


def test_a_trial_keeps_and_rejects_a_row_whose_reference_is_in_no_source_as_the_full_run_does(
    tmp_path: Path,
) -> None:
    legacy_crm_project(tmp_path, ACCOUNTS, DEALS)
    full = run_lines(tmp_path, f"sqlite:///{tmp_path / 'core.sqlite'}", "full-1", None)
    trial = run_lines(tmp_path, f"sqlite:///{tmp_path / 'trial.sqlite'}", "trial-1", 500)
    counts = [
        (line.rows_read, line.loaded, line.rejected) for line in (full["opportunity"], trial["opportunity"])
    ]
    assert counts == [(4, 3, 1), (4, 3, 1)]
    for entity in ("customer", "opportunity"):  # the tables are smaller than the sample: every row is in
        line = trial[entity]
        assert line.rows_in_source == line.rows_read and line.left_out == 0
    assert full["opportunity"].rows_in_source is None


def test_a_trial_leaves_out_only_the_rows_whose_reference_it_left_out_and_says_how_many(
    tmp_path: Path,
) -> None:
    accounts = [(f"a{n}", f"{city}市{trade}科技有限公司") for n, (city, trade) in enumerate(
        [("深圳", "华鑫"), ("广州", "天河"), ("北京", "朝阳"), ("上海", "浦江"), ("杭州", "西湖"), ("成都", "锦江")],
        start=1,
    )]  # fmt: skip
    deals = [(f"o{n}", f"a{n}") for n in range(1, 7)] + [("o7", "a9")]
    legacy_crm_project(tmp_path, accounts, deals)
    lines = run_lines(tmp_path, f"sqlite:///{tmp_path / 'trial.sqlite'}", "trial-1", 4)
    customers, deals_line = lines["customer"], lines["opportunity"]
    assert (customers.rows_read, customers.rows_in_source, customers.left_out) == (4, 6, 2)
    # 4 deals point at the 4 sampled customers and o7 at none: the sample of 4 takes 4 of these 5.
    assert (deals_line.rows_read, deals_line.rows_in_source, deals_line.left_out) == (4, 7, 3)
    engine = make_engine(f"sqlite:///{tmp_path / 'trial.sqlite'}")
    with engine.connect() as connection:
        reasons = [r for (r,) in connection.exec_driver_sql("SELECT reason FROM rejects").all()]
    engine.dispose()
    # No deal was rejected because the sample left its customer out: only o7's a9, if it was sampled.
    assert all("a9" in reason for reason in reasons) and len(reasons) == deals_line.rejected
    note = lines["report"].sample_note()
    assert "sample of 4 of 6 rows (2 left out)" in note and "sample of 4 of 7 rows (3 left out)" in note


def test_a_subtotal_line_takes_no_place_a_record_could_take_in_a_trial_sample(tmp_path: Path) -> None:
    # With --sample 3 the 合计 line (it ranks second) took a place: one of the 3 customers was left out.
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    assert sheet is not None
    sheet.title = "客户"
    sheet.append(["客户名称", "电话"])
    for name in ("深圳市华鑫科技有限公司", "广州市天河贸易有限公司", "北京市朝阳咨询有限公司"):
        sheet.append([name, "0755-1234567"])
    sheet.append(["合计", None])
    (tmp_path / "data").mkdir()
    workbook.save(tmp_path / "data" / "sales.xlsx")
    (tmp_path / "mappings").mkdir()
    (tmp_path / "project.yaml").write_text(
        "version: 1\nname: acme\nsources:\n  sales: {connector: excel, path: data/sales*.xlsx}\n",
        encoding="utf-8",
    )
    (tmp_path / "mappings" / "customers.yaml").write_text(
        "version: 1\nsource: {connector: sales, sheet: 客户, key: 客户名称}\ntarget: customer\n"
        "fields:\n  name: {from: 客户名称, required: true}\n",
        encoding="utf-8",
    )
    migration = Migration.load(str(tmp_path))
    found = []
    for size in (3, 4):  # 3: every customer, the subtotal left out; 4: the whole sheet
        engine = make_engine(f"sqlite:///{tmp_path / f'trial-{size}.sqlite'}")
        upgrade(engine)
        raw = {migration.raw_asset(m): extract(migration, m) for m in migration.mappings_for("customer")}
        load(migration, engine, "trial-1", stage(migration, "customer", raw), mode="trial", sample=size)
        [line] = reconcile(engine, "trial-1").lines
        engine.dispose()
        found.append(line)
    assert [(line.loaded, line.subtotals, line.rows_read) for line in found] == [(3, 0, 3), (3, 1, 4)]
    # the source's data rows: the subtotal line is no row a sample leaves out
    assert [(line.rows_in_source, line.left_out) for line in found] == [(3, 0), (3, 0)]


def test_a_trial_counts_only_the_data_rows_of_a_sheet_with_a_title_row_and_subtotals(tmp_path: Path) -> None:
    """A newcomer's trial of a 6-customer sheet said "sample of 6 of 9 rows (3 left out)": the 小计 and 合计 lines
    the mapping drops as no record were counted as source rows. Both figures count the data rows, the rows a
    full run loads or rejects as records, whatever the sample's size."""
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    assert sheet is not None
    sheet.title = "客户"
    sheet.append(["2025年重点客户台账"])  # a title row above the header, a blank row below it
    sheet.merge_cells("A1:C1")
    sheet.append([])
    sheet.append(["序号", "客户名称", "电话"])
    groups = [("深圳市华鑫科技有限公司", "广州市天河贸易有限公司", "北京市朝阳咨询有限公司"),
              ("上海市浦江电子有限公司", "杭州市西湖软件有限公司", "成都市锦江物流有限公司")]  # fmt: skip
    n = 0
    for group in groups:
        for name in group:
            n += 1
            sheet.append([n, name, "0755-1234567"])
        sheet.append(["小计", f"{len(group)} 家"])
        sheet.append([])
    sheet.append(["合计", f"{n} 家"])
    (tmp_path / "data").mkdir()
    workbook.save(tmp_path / "data" / "sales.xlsx")
    (tmp_path / "mappings").mkdir()
    (tmp_path / "project.yaml").write_text(
        "version: 1\nname: acme\nsources:\n  sales: {connector: excel, path: data/sales*.xlsx}\n",
        encoding="utf-8",
    )
    (tmp_path / "mappings" / "customers.yaml").write_text(
        "version: 1\nsource: {connector: sales, sheet: 客户, key: 客户名称}\ntarget: customer\n"
        "fields:\n  name: {from: 客户名称, required: true}\n",
        encoding="utf-8",
    )
    migration = Migration.load(str(tmp_path))

    def line_of(size: int | None) -> Any:
        engine = make_engine(f"sqlite:///{tmp_path / f'core-{size}.sqlite'}")
        upgrade(engine)
        raw = {migration.raw_asset(m): extract(migration, m) for m in migration.mappings_for("customer")}
        mode = "full" if size is None else "trial"
        load(migration, engine, "run-1", stage(migration, "customer", raw), mode=mode, sample=size)
        report = reconcile(engine, "run-1")
        engine.dispose()
        [line] = report.lines
        return line, report.sample_note()

    full, _ = line_of(None)
    assert (full.rows_read, full.loaded, full.subtotals) == (9, 6, 3)
    data_rows = full.rows_read - full.subtotals  # what the full run loads or rejects as records
    expected = {
        4: "sales customer: sample of 4 of 6 rows (2 left out)",
        6: "sales customer: sample of 6 of 6 rows (every row)",
        20: "sales customer: sample of 6 of 6 rows (every row)",
    }
    for size, said in expected.items():
        line, note = line_of(size)
        assert line.rows_in_source == data_rows, (size, line)
        assert line.left_out == data_rows - min(size, data_rows), (size, line)
        assert said in note, (size, note)
        assert line.balanced  # the line itself still counts the subtotal lines it read, as the full run's


@pytest.mark.slow
def test_the_trial_console_says_how_many_rows_each_sampled_source_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from integration.assets.resources import dispose_engines

    legacy_crm_project(tmp_path, ACCOUNTS, DEALS)
    out = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(width=300, file=out))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CRM_TRIAL_CORE_URL", "")  # restored after the test: the CLI sets it
    result = CliRunner().invoke(
        cli.app, ["run", "--trial", "--sample", "2", "--project", str(tmp_path),
                  "--core-url", f"sqlite:///{tmp_path / 'trial.sqlite'}"],
    )  # fmt: skip
    dispose_engines()
    text = out.getvalue()
    assert result.exit_code in (0, 2), result.output + text
    assert "legacy_crm customer: sample of 2 of 3 rows (1 left out)" in text
    assert "legacy_crm opportunity: sample of " in text and " of 4 rows (" in text
