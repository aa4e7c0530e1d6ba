"""How the reconciliation reads to a person: which share a percentage is, where the subtotal rows went,
and what the project's limit refers to (found by a newcomer's trial)."""

from __future__ import annotations

import io
from decimal import Decimal
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from integration import cli
from integration.pipeline import ReconciliationLine, ReconciliationReport
from integration.reports import quarantine_notes, unbalanced_reasons


def trial_report(limit: float = 0.05) -> ReconciliationReport:
    """6 rows read: 3 loaded, 3 rejected (a 合计 subtotal, one row a fix sheet loaded, one quarantined).

    The quarantined row is 1 of the 5 record rows (20%) but carries 48.7% of the money read.
    """
    line = ReconciliationLine(
        "sales_xlsx", "opportunity", 6, 3, 0, 3, 0, Decimal("200000.00"), Decimal("92600.00"),
        subtotals=1, amount_loaded=Decimal("92600.00"), amount_merged=Decimal(0),
        amount_quarantined=Decimal("107400.00"), corrected=1, amount_corrected=Decimal("10000.00"),
        max_quarantined_share=limit, mapping="sales_xlsx_opportunities",
    )  # fmt: skip
    return ReconciliationReport("r1", [line], pd.DataFrame(), {}, limit)


def test_each_share_is_said_of_what_it_is_a_share_of() -> None:
    [line] = trial_report().lines
    assert line.balanced and line.quarantined == 1
    assert line.quarantined_rows_share == pytest.approx(0.2)
    assert line.quarantined_amount_share == pytest.approx(0.487)
    assert line.quarantined_share == pytest.approx(0.487)  # the limit still judges the larger one
    [note] = [n for n in quarantine_notes(trial_report()) if "quarantined" in n]
    assert "(20.0% of the rows, 48.7% of the amount)" in note, note
    # Only the share over the limit is said to be over it.
    [reason] = unbalanced_reasons(trial_report(limit=0.25))
    assert "(48.7% of the amount > reconciliation.max_quarantined_share 25%)" in reason, reason
    [reason] = unbalanced_reasons(trial_report())
    assert "(20.0% of the rows and 48.7% of the amount > reconciliation.max_quarantined_share 5%)" in reason
    markdown = trial_report().to_markdown()
    assert "| quarantined (% of rows) | amount quarantined (% of amount) |" in markdown, markdown
    assert "| 3 (1 subtotal) |" in markdown and "| 1 (20.0%) | 97,400.00 (48.7%) |" in markdown, markdown


def test_the_terminal_tables_show_the_row_share_the_money_share_and_the_subtotals(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # `quarantined 1 (48.7%)` read as 48.7% of the rows; `rejected 2` counted the subtotal the fix sheet
    # leaves out, and nothing said so.
    out = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(width=200, file=out))
    monkeypatch.setattr(cli, "_converted_amounts", lambda core: "")
    monkeypatch.chdir(tmp_path)
    timing = {"phases": [], "seconds_total": 1.0, "rows_read": 6, "rows_per_second": 6.0}
    cli._report_success("r1", trial_report(), "sqlite://", "full", timing, False)
    rows, money = out.getvalue().split("Money per line")
    cells = [cell.strip() for row in rows.splitlines() if "sales_xlsx" in row for cell in row.split("│")]
    assert "3 (1 subtotal)" in cells and "1 (20.0%)" in cells, rows
    assert "quarantined (% of rows)" in rows and "48.7%" not in rows, rows
    assert "amount quarantined (% of amount)" in money and "97,400.00 (48.7%)" in money, money


def test_the_verdict_ties_the_projects_limit_to_the_quarantined_share() -> None:
    # "…quarantined; 1 more were rejected but loaded from a fix sheet: more than the project's limit of 5%."
    verdict = trial_report().verdict()
    sentences = [s.strip() for s in verdict.split(". ") if s.strip()]
    [limit] = [s for s in sentences if "project's limit" in s]
    assert "quarantined share" in limit and "fix sheet" not in limit, verdict
    assert verdict.endswith("1 more row(s) were rejected but loaded from a fix sheet."), verdict
    within = trial_report(limit=0.5).verdict()
    assert "project's limit" not in within and within.endswith("loaded from a fix sheet."), within
