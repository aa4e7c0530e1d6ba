"""Reconciliation output for people: Markdown for the Dagster UI, CSV files for the customer."""

from __future__ import annotations

import html
import itertools
import re
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from crm_core.journal import plain_decimal

if TYPE_CHECKING:
    from integration.pipeline import ReconciliationLine, ReconciliationReport


def report_root() -> Path:
    """Return where reconciliation reports are written: ``var/reports`` under the working directory."""
    return Path("var") / "reports"


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# After a + or -, only digits, spaces and . , - ( ) /: a phone number (+86-139-0000-0000, +86 (0)10 1234 5678)
# or a plain number. A spreadsheet can at most do arithmetic with it, never call a function or reach outside.
_PHONE_OR_NUMBER = re.compile(r"[+-]\(?\d[\d .,()/-]*")


def _formula_like(text: str) -> bool:
    """Return True for text a spreadsheet would take for a formula that could run something (OWASP CSV
    injection): it starts with = @ tab or CR, or with + or - not followed by a phone number or plain number."""
    return text.startswith(_FORMULA_START) and not _PHONE_OR_NUMBER.fullmatch(text)


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


def plain_value(value: Any) -> Any:
    """Return a decimal as people write it (``50000``, not ``50000.0000000000`` or ``5E+4``); anything else as is."""
    return plain_decimal(value) if isinstance(value, Decimal) else value


def escape_formula(value: Any) -> Any:
    """Neutralize spreadsheet formula injection: text a spreadsheet would run as a formula gets a leading quote.

    So does such text already behind quotes (``'=1`` becomes ``''=1``): :func:`unescape_formula` then takes off
    exactly the quote added here. A phone number or plain number after + or - is no formula: left alone.
    """
    if isinstance(value, str) and _formula_like(value.lstrip("'")):
        return "'" + value
    return value


def unescape_formula(value: Any) -> Any:
    """Return what :func:`escape_formula` was given: the one quote it added comes off, nothing else."""
    if isinstance(value, str) and value.startswith("'") and _formula_like(value.lstrip("'")):
        return value[1:]
    return value


REJECT_COLUMNS = ["source", "entity", "location", "row_ref", "field", "value", "rule", "reason", "severity"]


def amount_text(value: Decimal | str | float | None, missing: str = "") -> str:
    """Return an amount as every table and message shows it, ``200,000.00``; ``missing`` for None."""
    if value is None:
        return missing
    return f"{value if isinstance(value, Decimal) else Decimal(str(value)):,.2f}"


def _money(value: Decimal | None) -> str:
    return amount_text(value, "none")


def line_problems(line: ReconciliationLine) -> list[str]:
    """Return why one reconciliation line fails (empty when it passes): it does not balance, or it leaves
    more of its rows or money in quarantine than the project allows."""
    problems = []
    if not line.rows_balance:
        problems.append(
            f"rows read {line.rows_read} ≠ loaded {line.loaded} + merged {line.merged} + rejected {line.rejected}"
            + f" + held {line.held}"
        )
    if not line.amounts_balance:
        loaded = line.amount_loaded if line.amount_loaded is not None else line.amount_source
        if loaded != line.amount_core:
            problems.append(f"amount loaded {_money(loaded)} ≠ core {_money(line.amount_core)}")
        else:
            problems.append(
                f"amount source {_money(line.amount_source)} ≠ loaded {_money(loaded)} + merged "
                f"{_money(line.amount_merged)} + quarantined {_money(line.amount_in_quarantine)}"
                + (f" + corrected {_money(line.amount_corrected)}" if line.corrected else "")
            )
    if line.keys_missing:
        problems.append(f"{line.keys_missing} source key(s) neither in the core nor quarantined")
    if line.spot_mismatches:
        example = ""
        if line.spot_sample:
            first = line.spot_sample[0]
            fields = ", ".join(
                f"{name} core {first['core'].get(name)!r}, mapped {first['mapped'].get(name)!r}"
                for name in first["fields"]
            )
            example = f", e.g. key {first['key']}: {fields}"
        problems.append(
            f"{line.spot_mismatches} of {line.spot_checked} spot-checked record(s) differ in the core{example} "
            "(the load wrote other values than the mapping gives: `crmi mapping preview` shows what it gives)"
        )
    if line.over_quarantine_limit:
        money = (
            f", {_money(line.amount_in_quarantine)} of {_money(line.amount_source)}"
            if line.amount_source
            else ""
        )
        over = " and ".join(
            f"{share:.1%} of the {what}"
            for what, share in line.quarantined_shares()
            if share > line.max_quarantined_share
        )
        problems.append(
            f"{line.quarantined} of {line.rows_read - line.subtotals} row(s) quarantined{money} "
            f"({over} > reconciliation.max_quarantined_share {line.max_quarantined_share:.0%})"
        )
    return problems


SHOWN_ROWS = 10  # rows a note names before it says how many more there are


def superseded_note(report: ReconciliationReport, line: ReconciliationLine, label: str) -> str:
    """Return the warning of a fix sheet's line whose rows the source's own mapping loads now, naming them."""
    from crm_core.loading import SUPERSEDED  # (the loader: not for every reader of a fix sheet)

    rejects = report.rejects
    rows = (
        rejects[(rejects["rule"] == SUPERSEDED) & (rejects["mapping"] == line.mapping)
                & (rejects["source"] == line.source) & (rejects["entity"] == line.entity)]
        if len(rejects) else rejects
    )  # fmt: skip
    named = [f"{value} ({location} row {row_ref})"
             for value, location, row_ref in zip(rows["value"], rows["location"], rows["row_ref"], strict=True)]  # fmt: skip
    more = f" and {len(named) - SHOWN_ROWS} more" if len(named) > SHOWN_ROWS else ""
    return (
        f"{label}/{line.entity}: {line.superseded} fix sheet row(s) superseded: their source rows were corrected "
        f"at the source and load by themselves now, so the source's values stand and these rows were not loaded"
        + (f": {', '.join(named[:SHOWN_ROWS])}{more}" if named else "")
        + ". Remove them from the fix sheet, or remove the fix mapping once every row is corrected at the source"
    )


def quarantine_notes(report: ReconciliationReport) -> list[str]:
    """Return one line per source and entity that loaded but left rows (and money) in quarantine, one per source
    and entity whose rejected or held rows a re-imported fix sheet loaded (corrected), and one per fix sheet whose
    rows the source's own mapping loads now (superseded)."""
    notes = []
    for line, label in zip(report.lines, report.labels(), strict=True):
        if line.superseded:
            notes.append(superseded_note(report, line, label))
        if line.corrected:
            money = f" carrying {_money(line.amount_corrected)}" if line.amount_corrected else ""
            notes.append(
                f"{label}/{line.entity}: {line.corrected} {'rejected or held' if line.corrected_held else 'rejected'} "
                f"row(s){money} corrected: a fix sheet loaded "
                "them under their source keys"
            )
        if not line.quarantined:
            continue
        money = f" carrying {_money(line.amount_in_quarantine)}" if line.amount_in_quarantine else ""
        unreadable = f" ({line.amount_unreadable} with no readable amount)" if line.amount_unreadable else ""
        held = f", {line.waiting} waiting for a steward (`crmi dedup review`)" if line.waiting else ""
        notes.append(
            f"{label}/{line.entity}: {line.quarantined} row(s){money}{unreadable} quarantined "
            f"({', '.join(f'{share:.1%} of the {what}' for what, share in line.quarantined_shares())}){held}"
        )
    return notes


def unbalanced_reasons(report: ReconciliationReport) -> list[str]:
    """Return one line per source and entity that fails (does not balance, or quarantines too much), saying why."""
    return [
        f"{label}/{line.entity}: {'; '.join(line_problems(line))}"
        for line, label in zip(report.lines, report.labels(), strict=True)
        if line.status == "failed"
    ]


def fix_sheets(rejects: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Return, per source and entity, the quarantined rows (rejected or held) as read plus why: fix and re-import.

    One row per rejected source row: its columns as read, ``_location`` and ``_row_ref`` (where it was read),
    ``_source_key`` (its crosswalk key, when the rejects carry it) and ``_reasons`` (joined). Key is
    ``<source>.<entity>``. Rows a fix sheet already loaded (``corrected``, see
    :func:`integration.pipeline.reconcile`) need nothing more: left out.
    """
    sheets: dict[str, pd.DataFrame] = {}
    if rejects.empty:
        return sheets
    # Subtotal rows are rejected on purpose (they are not records): nothing to fix there. Rows held for a
    # steward's decision on their customer's name are there too: correcting the name is the other way out.
    corrected = rejects["corrected"].astype(bool) if "corrected" in rejects else False
    errors = rejects[
        rejects["severity"].isin(("error", "held"))
        & rejects["raw_row"].notna()
        & (rejects["rule"] != "subtotal")
        & ~pd.Series(corrected, index=rejects.index, dtype=bool)
    ]
    for (source, entity), group in errors.groupby(["source", "entity"], sort=True):
        rows = []
        for (location, row_ref), entries in group.groupby(["location", "row_ref"], sort=False, dropna=False):
            reasons = "; ".join(
                f"{f if isinstance(f, str) and f else '(row)'}: {r}"
                for f, r in zip(entries["field"], entries["reason"], strict=True)
            )
            row = {**entries["raw_row"].iloc[0], "_location": location, "_row_ref": row_ref}
            if "external_key" in entries:
                # the row's own key (none for a repeated key): a correction to the cells it is computed from
                # still files the corrected row under it (crm_core.loading.SOURCE_KEY)
                keys = entries["external_key"].dropna()
                row["_source_key"] = keys.iloc[0] if len(keys) else None
            rows.append({**row, "_reasons": reasons})
        sheets[f"{source}.{entity}"] = pd.DataFrame(rows)
    return sheets


def _html_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "<p><em>none</em></p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape('' if v is None or v != v else str(v))}</td>" for v in row)
        + "</tr>"
        for row in frame.itertuples(index=False)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_html(report: ReconciliationReport, path: Path) -> None:
    """Write a self-contained HTML reconciliation report (summary, rejects, rows to fix)."""
    verdict = report.verdict()
    mood = "ok" if report.acceptable and not report.quarantined_rows else "bad"
    parts = [
        "<!doctype html><html lang='zh-CN'><head><meta charset='utf-8'>",
        f"<title>Reconciliation {html.escape(report.run_key)}</title><style>",
        "body{font-family:system-ui,'PingFang SC','Microsoft YaHei',sans-serif;margin:2em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
        "th{background:#f4f4f4}.ok{color:#070}.bad{color:#b00}",
        "</style></head><body>",
        f"<h1>Reconciliation of run {html.escape(report.run_key)}</h1>",
        f"<p class='{mood}'><strong>{html.escape(verdict)}</strong></p>",
        "".join(f"<p class='bad'>{html.escape(reason)}</p>" for reason in unbalanced_reasons(report)),
        "".join(f"<p>{html.escape(note)}</p>" for note in quarantine_notes(report)),
        "<h2>Per source and entity</h2>", _html_table(report.to_frame()),
        "<h2>Rejects and warnings</h2>", _html_table(report.rejects[REJECT_COLUMNS] if len(report.rejects) else report.rejects),
    ]  # fmt: skip
    for name, frame in fix_sheets(report.rejects).items():
        parts += [f"<h2>To fix: {html.escape(name)}</h2>", _html_table(frame)]
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")


def _sheet_title(name: str, used: set[str]) -> str:
    title = re.sub(r"[\[\]:*?/\\]", "_", name)[:31]
    base, n = title, 2
    while title in used:
        title = f"{base[:28]}~{n}"
        n += 1
    used.add(title)
    return title


def write_excel(report: ReconciliationReport, path: Path) -> None:
    """Write the reconciliation workbook: Summary, Rejects, and one 'fix' sheet per source × entity.

    Every text cell goes through :func:`escape_formula`; a fix sheet holds the rejected rows with their
    source columns, so the customer can correct them and hand the sheet back as an Excel source.
    """
    import xlsxwriter

    # XlsxWriter streams each row to disk (constant memory) about twice as fast as openpyxl's write-only mode
    # (100,000 reject rows: 11 s against 23 s); it must never read text as a formula, a number or a link.
    workbook = xlsxwriter.Workbook(
        str(path),
        {"constant_memory": True, "strings_to_formulas": False, "strings_to_numbers": False,
         "strings_to_urls": False, "nan_inf_to_errors": True},
    )  # fmt: skip
    used: set[str] = set()

    def sheet(name: str, frame: pd.DataFrame, preface: list[list[Any]] | None = None) -> None:
        worksheet = workbook.add_worksheet(_sheet_title(name, used))
        lines = [*(preface or []), [str(c) for c in frame.columns]]
        for number, line in enumerate(lines):
            worksheet.write_row(number, 0, [_cell(v) for v in line])
        room = EXCEL_ROWS - len(lines)
        shown = len(frame) if len(frame) <= room else max(room - 1, 0)
        for number, row in enumerate(
            itertools.islice(frame.itertuples(index=False), shown), start=len(lines)
        ):
            worksheet.write_row(number, 0, [_cell(v) for v in row])
        if shown < len(frame):  # said in the sheet, never dropped silently
            worksheet.write_string(EXCEL_ROWS - 1, 0, f"… {len(frame) - shown:,} more rows: a sheet holds "
                                   f"{EXCEL_ROWS:,} rows; rejects.csv has every reject")  # fmt: skip

    summary = report.to_frame()
    why = [["fails", escape_formula(reason)] for reason in unbalanced_reasons(report)]
    notes = [["quarantined", escape_formula(note)] for note in quarantine_notes(report)]
    sheet("Summary", summary, [["run", report.run_key], ["verdict", escape_formula(report.verdict())],
                               ["balanced", report.balanced], *why, *notes, []])  # fmt: skip
    rejects = report.rejects[REJECT_COLUMNS] if len(report.rejects) else pd.DataFrame(columns=REJECT_COLUMNS)
    sheet("Rejects", rejects)
    for name, frame in fix_sheets(report.rejects).items():
        sheet(f"fix {name}", frame)
    workbook.close()


EXCEL_ROWS = 1_048_576  # rows of a worksheet
EXCEL_CELL_UNITS = 32_767  # UTF-16 code units of a cell's text
_CUT = "…[cut: an Excel cell holds 32,767 characters]"


def _cell(value: Any) -> Any:
    """Return a value as the workbook writes it: numbers as numbers, text escaped and cut to a cell's size.

    Text that starts with ``<r>`` and ends with ``</r>`` gets a leading quote like a formula: XlsxWriter's
    streaming mode would write it into the sheet as rich-text XML (malformed, or a formula cell). Text longer
    than a cell holds is cut with a note, so the rest of its row is still written.
    """
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bool | int | float):
        return value
    text = escape_formula(str(value))
    if text.startswith("<r>") and text.endswith("</r>"):
        text = "'" + text
    if len(text) > EXCEL_CELL_UNITS // 2:
        units = text.encode("utf-16-le")
        if len(units) > 2 * EXCEL_CELL_UNITS:
            keep = 2 * (EXCEL_CELL_UNITS - len(_CUT))
            text = (
                units[:keep].decode("utf-16-le", errors="ignore") + _CUT
            )  # a split surrogate pair is dropped
    return text


def write_reports(report: ReconciliationReport, directory: Path) -> dict[str, Path]:
    """Write the reconciliation as Markdown, CSV, Excel and HTML into ``directory``; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": directory / "reconciliation.md",
        "reconciliation_csv": directory / "reconciliation.csv",
        "rejects_csv": directory / "rejects.csv",
        "excel": directory / "reconciliation.xlsx",
        "html": directory / "reconciliation.html",
    }
    write_excel(report, paths["excel"])
    write_html(report, paths["html"])
    reasons = unbalanced_reasons(report)
    heading = "Why it does not balance" if not report.balanced else "Why it fails"
    why = f"\n## {heading}\n\n" + "".join(f"* {r}\n" for r in reasons) if reasons else ""
    notes = quarantine_notes(report)
    if notes:
        why += "\n## Quarantined\n\n" + "".join(f"* {n}\n" for n in notes)
    paths["markdown"].write_text(
        f"# Reconciliation of run {report.run_key}\n\n{report.to_markdown()}\n{why}", encoding="utf-8"
    )
    report.to_frame().map(escape_formula).to_csv(
        paths["reconciliation_csv"], index=False, encoding="utf-8-sig"
    )
    rejects = report.rejects[REJECT_COLUMNS] if len(report.rejects) else pd.DataFrame(columns=REJECT_COLUMNS)
    rejects.map(escape_formula).to_csv(paths["rejects_csv"], index=False, encoding="utf-8-sig")
    return paths


def write_workbook(
    directory: Path, stem: str, title: str, summary: list[tuple[str, Any]], tables: dict[str, pd.DataFrame]
) -> dict[str, Path]:
    """Write an Excel workbook (a Summary sheet, then one sheet per table) and an HTML page into ``directory``.

    The same cells as the migration's reconciliation workbook: every text cell formula-escaped, amounts as numbers.
    """
    from openpyxl import Workbook

    directory.mkdir(parents=True, exist_ok=True)
    paths = {"excel": directory / f"{stem}.xlsx", "html": directory / f"{stem}.html"}
    workbook = Workbook(write_only=True)
    used: set[str] = set()
    overview = workbook.create_sheet(_sheet_title("Summary", used))
    overview.append([escape_formula(title)])
    for name, value in summary:
        overview.append([escape_formula(str(name)), _cell(value)])
    for name, frame in tables.items():
        worksheet = workbook.create_sheet(_sheet_title(name, used))
        worksheet.append([escape_formula(str(c)) for c in frame.columns])
        for row in frame.itertuples(index=False):
            worksheet.append([_cell(v) for v in row])
    workbook.save(paths["excel"])
    parts = [
        "<!doctype html><html lang='zh-CN'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>",
        "body{font-family:system-ui,'PingFang SC','Microsoft YaHei',sans-serif;margin:2em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
        "th{background:#f4f4f4}",
        "</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        _html_table(pd.DataFrame(summary, columns=["what", "value"])),
    ]  # fmt: skip
    for name, frame in tables.items():
        parts += [f"<h2>{html.escape(name)}</h2>", _html_table(frame)]
    parts.append("</body></html>")
    paths["html"].write_text("\n".join(parts), encoding="utf-8")
    return paths
