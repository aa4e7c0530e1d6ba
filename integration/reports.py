"""Reconciliation output for people: Markdown for the Dagster UI, CSV files for the customer."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from integration.pipeline import ReconciliationReport

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"^[+-]?\d[\d\s.,]*$")  # +8613800000000, -500: nothing a spreadsheet could execute


def markdown_table(frame: pd.DataFrame) -> str:
    """Render a frame as a GitHub Markdown table (pipes escaped, no extra dependency)."""
    if frame.empty:
        return "_none_"

    def cell(value: Any) -> str:
        text = "" if value is None or (isinstance(value, float) and value != value) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(cell(c) for c in frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def escape_formula(value: Any) -> Any:
    """Neutralize spreadsheet formula injection: text starting with = + - @ gets a leading quote."""
    if isinstance(value, str) and value.startswith(_FORMULA_START) and not _PLAIN_NUMBER.match(value):
        return "'" + value
    return value


def write_reports(report: ReconciliationReport, directory: Path) -> dict[str, Path]:
    """Write reconciliation.md, reconciliation.csv and rejects.csv into ``directory``; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": directory / "reconciliation.md",
        "reconciliation_csv": directory / "reconciliation.csv",
        "rejects_csv": directory / "rejects.csv",
    }
    paths["markdown"].write_text(
        f"# Reconciliation of run {report.run_key}\n\n{report.to_markdown()}\n", encoding="utf-8"
    )
    report.to_frame().map(escape_formula).to_csv(
        paths["reconciliation_csv"], index=False, encoding="utf-8-sig"
    )
    report.rejects.map(escape_formula).to_csv(paths["rejects_csv"], index=False, encoding="utf-8-sig")
    return paths
