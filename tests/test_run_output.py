"""What `crmi run` says when it ends: time and rows/s per phase, and a failed step's cause on one line."""

from __future__ import annotations

import sqlite3
import sys
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa
from dagster._utils.error import serializable_error_info_from_exc_info

from crm_core.errors import LoadError
from integration.failures import MAX_CAUSE, cause_line, error_info_line, shorten
from integration.phases import PHASES, phase_of, phase_timings, step_timings

STATEMENT = "SELECT id FROM match_candidates WHERE " + " OR ".join(
    f"(left_id = {i} AND right_id = {i + 1})" for i in range(5000)
)


def huge_sql_error() -> sa.exc.OperationalError:
    return sa.exc.OperationalError(
        STATEMENT, {}, sqlite3.OperationalError("Expression tree is too large (maximum depth 1000)")
    )


def test_a_database_error_is_one_line_without_its_statement() -> None:
    line = cause_line(huge_sql_error())
    assert line == "OperationalError: Expression tree is too large (maximum depth 1000)"


def test_our_errors_keep_their_message_on_one_line_and_long_ones_are_cut() -> None:
    assert cause_line(LoadError("customer: 3 rows\nwithout a key")) == "customer: 3 rows; without a key"
    assert cause_line(ValueError("bad\nvalue")) == "ValueError: bad"
    assert cause_line(KeyError()) == "KeyError"
    long = shorten("x" * 1000)
    assert len(long) == MAX_CAUSE and long.endswith("…")
    assert "s3cret" not in cause_line(LoadError("postgresql://crm:s3cret@db/crm refused"))


def test_a_dagster_error_chain_reduces_to_its_innermost_cause() -> None:
    try:
        try:
            raise huge_sql_error()
        except sa.exc.OperationalError as exc:
            raise RuntimeError("Error occurred while executing op customer_match_candidates:") from exc
    except RuntimeError:
        info = serializable_error_info_from_exc_info(sys.exc_info())
    line = error_info_line(info)
    assert line.startswith("OperationalError: (sqlite3.OperationalError) Expression tree is too large")
    assert "SELECT" not in line and len(line) <= MAX_CAUSE


def test_an_interrupted_step_says_it_was_interrupted_not_the_exceptions_name() -> None:
    """Ctrl-C under `crmi run`, or a run terminated from the UI: Dagster's interrupt has no message of its own."""
    try:
        try:
            raise dg.DagsterExecutionInterruptedError()
        except dg.DagsterExecutionInterruptedError as exc:
            raise RuntimeError("Error occurred while executing op staged_sales_order:") from exc
    except RuntimeError:
        info = serializable_error_info_from_exc_info(sys.exc_info())
    assert error_info_line(info) == "interrupted (Ctrl-C, or the run was terminated)"


def entry(step: str, kind: str, at: float, **metadata: int) -> Any:
    data = SimpleNamespace(materialization=SimpleNamespace(metadata=metadata))
    event = SimpleNamespace(event_type_value=kind, event_specific_data=data)
    return SimpleNamespace(step_key=step, timestamp=at, dagster_event=event)


def test_phases_sum_wall_time_of_their_steps_once_and_count_their_rows() -> None:
    entries = [
        entry("raw_erp_u8_customer", "STEP_START", 0.0),
        entry("raw_sales_xlsx_customer", "STEP_START", 1.0),  # ran side by side with the first
        entry("raw_erp_u8_customer", "ASSET_MATERIALIZATION", 1.5, rows_read=600),
        entry("raw_erp_u8_customer", "STEP_SUCCESS", 2.0),
        entry("raw_sales_xlsx_customer", "ASSET_MATERIALIZATION", 2.9, rows_read=400),
        entry("raw_sales_xlsx_customer", "STEP_SUCCESS", 3.0),
        entry("staged_customer", "STEP_START", 3.0),
        entry("staged_customer", "ASSET_MATERIALIZATION", 4.0, records=990),
        entry("staged_customer", "STEP_SUCCESS", 4.0),
        entry("core_customer", "STEP_START", 4.0),
        entry("core_customer", "ASSET_MATERIALIZATION", 6.0, rows_read=990),
        entry("core_customer", "STEP_FAILURE", 6.5),
        entry("golden_customers", "STEP_START", 7.0),
        entry("golden_customers", "ASSET_MATERIALIZATION", 7.5, customers=900),
        entry("golden_customers", "STEP_SUCCESS", 7.5),
        entry("golden_contacts", "STEP_START", 7.5),
        entry("golden_contacts", "ASSET_MATERIALIZATION", 8.0, contacts=100),
        entry("golden_contacts", "STEP_SUCCESS", 8.0),
        SimpleNamespace(step_key=None, timestamp=9.0, dagster_event=None),  # a plain log line
    ]
    phases = {p.phase: p for p in phase_timings(entries)}
    assert list(phases) == list(PHASES)
    assert (phases["extract"].seconds, phases["extract"].rows) == (3.0, 1000)
    assert phases["extract"].as_dict() == {
        "phase": "extract",
        "seconds": 3.0,
        "rows": 1000,
        "rows_per_second": pytest.approx(333.3),
    }
    assert (phases["map_validate"].seconds, phases["map_validate"].rows) == (1.0, 990)
    assert (phases["load"].seconds, phases["load"].rows) == (2.5, 990)  # a failed step's time counts
    assert (phases["merge"].seconds, phases["merge"].rows) == (1.0, 1000)
    assert phases["link"].as_dict() == {"phase": "link", "seconds": 0.0, "rows": 0, "rows_per_second": 0.0}


def test_steps_are_timed_in_the_order_they_started_and_add_up_to_their_phases() -> None:
    entries = [
        entry("raw_erp_u8_customer", "STEP_START", 0.0),
        entry("raw_sales_xlsx_customer", "STEP_START", 1.0),
        entry("raw_sales_xlsx_customer", "ASSET_MATERIALIZATION", 2.9, rows_read=400),
        entry("raw_sales_xlsx_customer", "STEP_SUCCESS", 3.0),
        entry("raw_erp_u8_customer", "ASSET_MATERIALIZATION", 3.5, rows_read=600),
        entry("raw_erp_u8_customer", "STEP_SUCCESS", 4.0),  # ended after the one that started later
        entry("core_customer", "STEP_START", 4.0),
        entry("core_customer", "ASSET_MATERIALIZATION", 6.0, rows_read=990),
        entry("core_customer", "STEP_FAILURE", 6.5),
        entry("rollback_load_run", "STEP_START", 7.0),  # not a step of the migration's phases
        entry("rollback_load_run", "STEP_SUCCESS", 8.0),
    ]
    steps = step_timings(entries)
    assert [s.as_dict() for s in steps] == [
        {"step": "raw_erp_u8_customer", "phase": "extract", "seconds": 4.0, "rows": 600, "rows_per_second": 150.0},
        {"step": "raw_sales_xlsx_customer", "phase": "extract", "seconds": 2.0, "rows": 400,
         "rows_per_second": 200.0},
        {"step": "core_customer", "phase": "load", "seconds": 2.5, "rows": 990, "rows_per_second": 396.0},
    ]  # fmt: skip
    assert phase_timings((), steps) == phase_timings(entries)
    assert [(p.phase, p.seconds, p.rows) for p in phase_timings(entries)][:3] == [
        ("extract", 4.0, 1000), ("map_validate", 0.0, 0), ("load", 2.5, 990),
    ]  # fmt: skip


def test_the_timing_table_names_the_slowest_steps() -> None:
    from rich.console import Console

    from integration.cli import _timing_table

    steps = [{"step": name, "phase": "load", "seconds": seconds, "rows": 10, "rows_per_second": 1.0}
             for name, seconds in (("core_customer", 16.6), ("core_contact", 13.2), ("core_opportunity", 25.6),
                                   ("core_sales_order", 5.1), ("core_sales_rep", 0.01))]  # fmt: skip
    timing = {"phases": [], "steps": steps, "seconds_total": 70.0, "rows_read": 50, "rows_per_second": 0.7}
    console = Console(record=True, width=200)
    console.print(_timing_table(timing))
    assert (
        "slowest steps: core_opportunity 25.6 s, core_customer 16.6 s, core_contact 13.2 s"
        in console.export_text()
    )
    console.print(_timing_table({**timing, "steps": []}))  # a run that started no step: no caption
    assert console.export_text().count("slowest steps") == 0


@pytest.mark.parametrize(
    ("step", "phase"),
    [
        ("raw_erp_u8_customer_erp_u8_customers_2", "extract"),
        ("staged_opportunity", "map_validate"),
        ("core_sales_order_line", "load"),
        ("customer_match_candidates", "link"),
        ("customer_review_queue", "merge"),
        ("reconciliation_report", "reconcile"),
        ("rollback_load_run", None),
    ],
)
def test_steps_map_to_phases_by_name(step: str, phase: str | None) -> None:
    assert phase_of(step) == phase


def test_the_terminal_reconciliation_never_cuts_an_amount_on_a_narrow_terminal() -> None:
    """Sixteen columns did not fit even a wide terminal: the money came out as `27,914,…`. Rows and money are
    two tables now, and on a terminal as wide as the rows need no figure is cut (a long source name folds)."""
    from rich.console import Console

    from integration.cli import _money_table, _rows_table

    def line(entity: str, **money: Decimal | float | None) -> SimpleNamespace:
        money_fields = ("amount_source", "amount_core", "amount_in_quarantine", "amount_corrected")
        amounts = dict.fromkeys((*money_fields, "quarantined_amount_share"))
        return SimpleNamespace(entity=entity, rows_read=120_000, loaded=118_000, merged=1_000, rejected=900,
                               held=100, warnings=3, quarantined=1_000, quarantined_share=0.0083, corrected=12,
                               subtotals=0, superseded=0, quarantined_rows_share=0.0083,
                               keys_missing=0, spot_checked=25, spot_mismatches=0, status="quarantined",
                               **{**amounts, **money})  # fmt: skip

    lines = [
        line("opportunity", amount_source=Decimal("1224902183.91"), amount_core=Decimal("1212345678.90"),
             amount_in_quarantine=Decimal("12556505.01"), amount_corrected=Decimal("80000.00"),
             quarantined_amount_share=0.0103),
        line("customer"),
    ]  # fmt: skip
    report = SimpleNamespace(
        lines=lines, labels=lambda: ["sales_xlsx (sales_sheet_opportunities_2025)", "erp_u8"]
    )
    console = Console(record=True, width=140)
    console.print(_rows_table(report, "Reconciliation of full run 0c0ffee0"))
    money = _money_table(report)
    assert money is not None
    console.print(money)
    shown = console.export_text()
    for figure in ("1,224,902,183.91", "1,212,345,678.90", "12,556,505.01", "80,000.00"):
        assert figure in shown, shown
    assert "…" not in shown and "120000" in shown and "opportunity" in shown.split("Money per line")[1], shown
    assert "erp_u8" not in shown.split("Money per line")[1]  # a line without money is not in the money table
    assert _money_table(SimpleNamespace(lines=[line("customer")], labels=lambda: ["erp_u8"])) is None


def _report_of_two_lines(held: int) -> SimpleNamespace:
    """A report with one line of opportunities (money, long source name) and one of customers (none)."""

    def line(entity: str, **money: Decimal | float | None) -> SimpleNamespace:
        money_fields = ("amount_source", "amount_core", "amount_in_quarantine", "amount_corrected")
        amounts = dict.fromkeys((*money_fields, "quarantined_amount_share"))
        return SimpleNamespace(entity=entity, rows_read=1_120_000, loaded=1_118_000, merged=1_000, rejected=900,
                               held=held, warnings=0, quarantined=1_000, quarantined_share=0.0083, corrected=0,
                               subtotals=4, superseded=0, quarantined_rows_share=0.0083,
                               keys_missing=0, spot_checked=25, spot_mismatches=1, status="quarantined",
                               **{**amounts, **money})  # fmt: skip

    lines = [
        line("opportunity", amount_source=Decimal("1224902183.91"), amount_core=Decimal("1212345678.90"),
             amount_in_quarantine=Decimal("12556505.01"), amount_corrected=Decimal("80000.00"),
             quarantined_amount_share=0.0103),
        line("customer"),
    ]  # fmt: skip
    return SimpleNamespace(
        lines=lines, labels=lambda: ["sales_xlsx (sales_sheet_opportunities_2025)", "erp_u8"]
    )


@pytest.mark.parametrize("width", [72, 80, 100, 120, 200])
def test_the_terminal_reconciliation_fits_the_terminal_with_every_figure_whole(width: int) -> None:
    """At 80 columns the thirteen columns of the rows table were cut at the right edge and their figures split
    over two lines (`120` / `000`): columns that are 0 everywhere give way first (named below the table), then
    the borders, then the table splits into parts that each name the line."""
    from rich.console import Console

    from integration.cli import _money_table, _rows_table

    report = _report_of_two_lines(held=0)
    console = Console(record=True, width=width)
    console.print(_rows_table(report, "Reconciliation of full run 0c0ffee0", width))
    console.print(_money_table(report, width))
    shown = console.export_text()
    assert max(len(row) for row in shown.splitlines()) <= width, shown
    figures = ("1120000", "1118000", "1000", "900 (4 subtotals)", "1000 (0.8%)", "24/25", "1,224,902,183.91",
               "1,212,345,678.90", "12,556,505.01 (1.0%)", "80,000.00")  # fmt: skip
    for figure in figures:
        assert figure in shown, (figure, shown)
    assert "0 on every line: held, warnings, corrected, keys missing" in shown
    for heading in ("read", "loaded", "merged", "rejected", "spot", "amount source", "amount core"):
        assert heading in shown
    assert shown.count("customer") == shown.count("erp_u8") >= 1  # each part names its lines

    held = Console(record=True, width=width)
    held.print(_rows_table(_report_of_two_lines(held=7), "Reconciliation", width))
    assert "held" in held.export_text().split("0 on every line")[0]  # a column with a figure stays
