"""A re-run with nothing changed skips every mapping, and anything that may change a mapping's load makes it read.

Each case starts from the demo loaded once by `crmi run` (a copy of the project and of its SQLite core), then
changes one thing and runs again: the core must hold what a full re-run would have loaded, the reconciliation
must balance with the skipped mappings carried over, and the exit code must not change because of skipping.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from crm_core.db import make_engine
from crm_core.models import ExternalId, LoadRun, MappingFingerprint, Opportunity
from crm_core.runs import rollback_run
from integration.assets.resources import dispose_engines
from integration.cli import app
from integration.connectors.sql import SqlConnector
from integration.pipeline import reconcile
from integration.rerun import _postgres_digest
from tests.conftest import DEMO, PG_URL, reset_postgres, server_or_skip
from tests.test_runs import content

pytestmark = pytest.mark.slow
MAPPINGS = sorted(path.stem for path in (DEMO / "mappings").glob("*.yaml"))


def crmi_run(project: Path, url: str, *options: str) -> tuple[int, dict[str, Any]]:
    """Run `crmi run --json`; return the exit code and the summary."""
    result = CliRunner().invoke(
        app, ["run", "--project", str(project), "--core-url", url, "--json", *options]
    )
    dispose_engines()
    assert result.exit_code in (0, 2), result.output
    return result.exit_code, json.loads(result.stdout)


def skipped(summary: dict[str, Any]) -> set[str]:
    return {item["mapping"] for item in summary["skipped"]}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> tuple[Path, Path, str]:
    """The demo loaded once into a SQLite core: project folder, core file and the first run's id."""
    root = tmp_path_factory.mktemp("rerun_baseline")
    project = root / "demo"
    shutil.copytree(DEMO, project, ignore=shutil.ignore_patterns("data", "__pycache__"))
    shutil.copytree(demo_data, project / "data")
    core = root / "core.sqlite"
    code, first = crmi_run(project, f"sqlite:///{core}")
    assert code == 0 and first["skipped"] == []
    return project, core, first["run_id"]


@pytest.fixture
def copied(
    baseline: tuple[Path, Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, str]:
    """A private copy of the baseline project and core (the copies keep the files' content, not their times)."""
    monkeypatch.chdir(tmp_path)
    project = tmp_path / "demo"
    shutil.copytree(baseline[0], project)
    shutil.copy(baseline[1], tmp_path / "core.sqlite")
    url = f"sqlite:///{tmp_path / 'core.sqlite'}"
    monkeypatch.setenv("CRM_CORE_URL", url)  # `crmi run --core-url` sets it: restored afterwards
    return project, url


def assert_balanced(summary: dict[str, Any]) -> None:
    assert summary["balanced"] and summary["success"], summary["unbalanced"]
    assert all(line["balanced"] for line in summary["lines"])


def test_an_unchanged_re_run_skips_every_mapping_and_changes_nothing(
    baseline: tuple[Path, Path, str], copied: tuple[Path, str]
) -> None:
    project, url = copied
    engine = make_engine(url)
    before = content(engine)
    with engine.connect() as connection:
        first_stats = connection.scalar(sa.select(LoadRun.stats).where(LoadRun.run_key == baseline[2]))
    (project / "data" / "sales.xlsx").touch()  # a newer time, the same content: still unchanged

    code, again = crmi_run(project, url, "--new-run")  # a run recorded anyway: every line carried over

    assert code == 0 and not again.get("nothing_changed")
    assert skipped(again) == set(MAPPINGS)
    assert {item["unchanged_since"] for item in again["skipped"]} == {baseline[2]}
    assert_balanced(again)
    assert content(engine) == before  # byte for byte what the first run left
    with engine.connect() as connection:
        stats = connection.scalar(sa.select(LoadRun.stats).where(LoadRun.run_key == again["run_id"]))
        rejects = [
            connection.execute(
                sa.text("SELECT source, entity, location, row_ref, field, value, rule, reason, severity FROM rejects "
                        "JOIN load_runs ON load_runs.id = rejects.load_run_id WHERE run_key = :r ORDER BY rejects.id"),
                {"r": run},
            ).all()
            for run in (baseline[2], again["run_id"])
        ]  # fmt: skip
    # Every line carries the first run's counts: what loaded then is unchanged now, the quarantine copied.
    for entity, lines in first_stats.items():
        for line, carried in zip(lines, stats[entity], strict=True):
            assert carried["unchanged_since"] == baseline[2] and carried["mapping"] == line["mapping"]
            assert carried["unchanged"] == line["loaded"] and carried["inserted"] == carried["updated"] == 0
            assert (carried["rows_read"], carried["rejected"], carried["held"]) == (
                line["rows_read"], line["rejected"], line["held"],
            )  # fmt: skip
    assert rejects[0] and rejects[1] == rejects[0]
    # The extraction and load phases did nothing: no row read, none loaded.
    phases = {p["phase"]: p for p in again["phases"]}
    assert phases["extract"]["rows"] == 0 and phases["load"]["rows"] == 0
    engine.dispose()


def test_one_changed_cell_re_reads_its_source_and_loads_the_change(copied: tuple[Path, str]) -> None:
    project, url = copied
    with sqlite3.connect(project / "data" / "legacy_crm.sqlite") as crm:
        key = crm.execute("SELECT id FROM opportunities WHERE deleted = 0 ORDER BY id LIMIT 1").fetchone()[0]
        crm.execute("UPDATE opportunities SET name = 'Renamed for the re-run test' WHERE id = ?", (key,))

    code, again = crmi_run(project, url)

    assert code == 0
    # A SQLite source is proved by its file: every mapping of that database reads again, the rest skip.
    assert skipped(again) == {m for m in MAPPINGS if not m.startswith("legacy_crm_")}
    assert_balanced(again)
    engine = make_engine(url)
    with engine.connect() as connection:
        names = connection.scalars(sa.select(Opportunity.name)).all()
    assert "Renamed for the re-run test" in names
    engine.dispose()


def test_a_changed_mapping_file_re_reads_that_mapping_only(copied: tuple[Path, str]) -> None:
    project, url = copied
    mapping = project / "mappings" / "erp_u8_orders.yaml"
    mapping.write_text(mapping.read_text(encoding="utf-8") + "\n# reviewed\n", encoding="utf-8")

    code, again = crmi_run(project, url)

    assert code == 0
    assert skipped(again) == set(MAPPINGS) - {"erp_u8_orders"}
    assert_balanced(again)


def test_after_a_rollback_of_the_loading_run_nothing_is_skipped(
    baseline: tuple[Path, Path, str], copied: tuple[Path, str]
) -> None:
    project, url = copied
    engine = make_engine(url)
    rollback_run(engine, baseline[2])
    with engine.connect() as connection:  # the rollback took the run's fingerprints with it
        assert connection.scalar(sa.select(sa.func.count()).select_from(MappingFingerprint)) == 0
    engine.dispose()

    code, again = crmi_run(project, url)

    assert code == 0 and again["skipped"] == []
    assert again["core_counts"]["opportunity"] > 0
    assert_balanced(again)


def test_trial_runs_and_no_skip_read_everything(copied: tuple[Path, str]) -> None:
    project, url = copied
    code, trial = crmi_run(project, url, "--trial")  # a scratch core: nothing to skip against, never skips
    assert trial["skipped"] == [] and trial["mode"] == "trial"

    code, forced = crmi_run(project, url, "--no-skip")

    assert code == 0 and forced["skipped"] == []
    phases = {p["phase"]: p for p in forced["phases"]}
    assert phases["extract"]["rows"] > 0
    assert_balanced(forced)
    # What a forced run loaded is proved again: the next run skips everything.
    code, again = crmi_run(project, url, "--new-run")
    assert code == 0 and skipped(again) == set(MAPPINGS)
    assert {item["unchanged_since"] for item in again["skipped"]} == {forced["run_id"]}
    # And nothing changed since that run: no run starts, its reconciliation stands.
    code, same = crmi_run(project, url)
    assert (
        code == 0 and same["nothing_changed"] and same["unchanged_since"] == same["run_id"] == again["run_id"]
    )


def test_a_steward_decision_in_between_loads_the_held_rows(
    baseline: tuple[Path, Path, str], copied: tuple[Path, str]
) -> None:
    project, url = copied
    engine = make_engine(url)
    [before] = [x for x in reconcile(engine, baseline[2]).lines if x.mapping == "sales_xlsx_opportunities"]
    engine.dispose()
    runner = CliRunner()
    queue = [
        json.loads(x)
        for x in runner.invoke(app, ["dedup", "review", "--json", "--core-url", url]).output.splitlines()
    ]
    chosen = next(q for q in queue if "reference" in q and q["candidates"])
    decided = runner.invoke(app, ["dedup", "decide", chosen["reference"], "--customer",
                                  str(chosen["candidates"][0]["id"]), "--steward", "li", "--project", str(project),
                                  "--core-url", url])  # fmt: skip
    assert decided.exit_code == 0, decided.output
    dispose_engines()

    code, again = crmi_run(project, url)

    assert code == 0
    assert "sales_xlsx_opportunities" not in skipped(again)  # its held rows depend on the decision
    [line] = [x for x in again["lines"] if x["mapping"] == "sales_xlsx_opportunities"]
    assert line["unchanged_since"] is None
    assert (
        line["held"] == before.held - chosen["rows_held"]
        and line["loaded"] == before.loaded + chosen["rows_held"]
    )
    assert_balanced(again)


@pytest.mark.postgres
def test_an_unchanged_re_run_skips_on_postgresql(
    demo_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = server_or_skip(PG_URL, "PostgreSQL")
    reset_postgres(engine)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CRM_CORE_URL", PG_URL)
    code, first = crmi_run(demo_project, PG_URL)
    assert code == 0 and first["skipped"] == []
    before = content(engine)

    code, again = crmi_run(demo_project, PG_URL, "--new-run")

    assert code == 0 and skipped(again) == set(MAPPINGS)
    assert_balanced(again)
    assert content(engine) == before
    code, same = crmi_run(demo_project, PG_URL)  # nothing changed since: no run starts
    assert code == 0 and same["nothing_changed"] and same["run_id"] == again["run_id"]
    assert content(engine) == before
    engine.dispose()


@pytest.mark.postgres
def test_a_postgresql_source_is_fingerprinted_in_the_server() -> None:
    engine = server_or_skip(PG_URL, "PostgreSQL")
    reset_postgres(engine)
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE accounts (id int primary key, name text, deleted int)"))
        connection.execute(sa.text("INSERT INTO accounts VALUES (1, 'a', 0), (2, 'b', 0), (3, 'c', 1)"))
    connector = SqlConnector("crm", PG_URL)
    first = _postgres_digest(connector, ["accounts", "query:SELECT id, name FROM accounts WHERE deleted = 0"])
    assert (
        _postgres_digest(connector, ["accounts", "query:SELECT id, name FROM accounts WHERE deleted = 0"])
        == first
    )
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE accounts SET name = 'B' WHERE id = 2"))
    changed = _postgres_digest(
        connector, ["accounts", "query:SELECT id, name FROM accounts WHERE deleted = 0"]
    )
    assert changed != first and changed.split("|")[0].split(":")[1] == "3"
    with engine.begin() as connection:  # swapping two values between rows is a change too
        connection.execute(
            sa.text("UPDATE accounts SET name = CASE id WHEN 1 THEN 'B' ELSE 'a' END WHERE id < 3")
        )
    assert _postgres_digest(connector, ["accounts"]) != changed.split("|")[0]
    connector.dispose()
    engine.dispose()


def test_a_sync_run_in_between_means_everything_is_read(copied: tuple[Path, str]) -> None:
    project, url = copied
    engine = make_engine(url)
    with engine.begin() as connection:  # a sync run rewrites crosswalk hashes of source systems
        connection.execute(
            sa.insert(LoadRun).values(
                run_key="sync-1", project="sync", mode="sync", status="succeeded", stats={}
            )
        )
    engine.dispose()

    code, again = crmi_run(project, url)

    assert code == 0 and again["skipped"] == []
    assert_balanced(again)


def test_a_re_run_with_nothing_changed_starts_no_run_and_reports_the_last_one(
    baseline: tuple[Path, Path, str], copied: tuple[Path, str]
) -> None:
    """Nothing changed since the last run: `crmi run` says so, prints that run's reconciliation with its exit
    code, and neither Dagster nor the core get a run (every mapping would be skipped, nothing to link)."""
    import dagster as dg

    project, url = copied
    engine = make_engine(url)
    before = content(engine)
    first = reconcile(engine, baseline[2])
    with dg.DagsterInstance.get() as instance:
        dagster_runs = instance.get_runs_count()
    (project / "data" / "sales.xlsx").touch()  # a newer time, the same content

    code, same = crmi_run(project, url)

    assert code == 0 and same["nothing_changed"] is True
    assert same["run_id"] == same["unchanged_since"] == baseline[2]
    assert [line["loaded"] for line in same["lines"]] == [line.loaded for line in first.lines]
    assert same["quarantined_rows"] == first.quarantined_rows and same["balanced"]
    assert {p["phase"]: p["rows"] for p in same["phases"]} == dict.fromkeys(
        ("extract", "map_validate", "load", "link", "merge", "reconcile"), 0
    )
    assert content(engine) == before  # not even a load run row
    # The last run was started from another folder: its reports are written where this one looks.
    assert same["reports"] == str(Path("var") / "reports" / baseline[2])
    assert (Path(same["reports"]) / "reconciliation.xlsx").is_file()
    with dg.DagsterInstance.get() as instance:
        assert instance.get_runs_count() == dagster_runs
    shown = CliRunner().invoke(app, ["run", "--project", str(project), "--core-url", url])
    assert shown.exit_code == 0 and "Nothing changed since run " + baseline[2][:8] in shown.stdout
    engine.dispose()


def test_the_demo_sources_generated_again_are_nothing_changed(
    copied: tuple[Path, str], generator: ModuleType
) -> None:
    """`make demo` generates its sources before each run: the same seed writes the same bytes (the workbook's
    save time included), so a second `make demo` finds nothing changed instead of reading the workbook again."""
    project, url = copied
    generator.generate(project / "data")  # as the session's demo data: the default seed

    code, again = crmi_run(project, url)

    assert code == 0 and again["nothing_changed"] is True, again.get("skipped")


def test_nothing_changed_answers_no_for_any_doubt(
    baseline: tuple[Path, Path, str], copied: tuple[Path, str]
) -> None:
    """A mapping gone, a later run of any kind (an edit), or a changed cell: a run is needed."""
    from crm_core.edits import edit_record
    from integration.pipeline import Migration
    from integration.rerun import nothing_changed

    project, url = copied
    engine = make_engine(url)
    migration = Migration.load(str(project))
    assert nothing_changed(engine, migration) == baseline[2]
    fewer = Migration.load(str(project))
    fewer.mappings = fewer.mappings[1:]  # a mapping file removed: its reconciliation line would go
    assert nothing_changed(engine, fewer) is None
    with engine.connect() as connection:
        customer = connection.scalar(sa.text("SELECT id FROM customers ORDER BY id LIMIT 1"))
    edit_record(engine, "customer", customer, {"industry": "软件"}, actor="li")  # a later run: an edit
    assert nothing_changed(engine, migration) is None
    engine.dispose()


def test_an_undone_merge_since_the_last_run_means_a_run(
    baseline: tuple[Path, Path, str], copied: tuple[Path, str]
) -> None:
    """Undoing a merge writes no load run, yet the customers it parted count again: a run is needed."""
    import datetime as dt

    from crm_core.models import MergeLog
    from integration.pipeline import Migration
    from integration.rerun import nothing_changed

    project, url = copied
    engine = make_engine(url)
    migration = Migration.load(str(project))
    with engine.begin() as connection:  # a merge the last run made (the demo's customers merge by key only)
        run_id, customers = (
            connection.scalar(sa.select(LoadRun.id).where(LoadRun.run_key == baseline[2])),
            [row[0] for row in connection.execute(sa.text("SELECT id FROM customers ORDER BY id LIMIT 2"))],
        )
        merge = connection.execute(
            sa.insert(MergeLog).values(entity="customer", survivor_id=customers[0], merged_id=customers[1],
                                       reason="auto-merge", decided_by="linkage", load_run_id=run_id)
        ).inserted_primary_key[0]  # fmt: skip
    assert nothing_changed(engine, migration) == baseline[2]
    with engine.begin() as connection:  # what `crmi dedup undo` sets, with no run of its own
        connection.execute(
            sa.update(MergeLog).where(MergeLog.id == merge).values(undone_at=dt.datetime.now(dt.UTC))
        )
    assert nothing_changed(engine, migration) is None
    engine.dispose()


def test_an_undone_merge_means_a_run_even_when_no_mapping_depends_on_the_core(
    baseline: tuple[Path, Path, str], copied: tuple[Path, str]
) -> None:
    """A run checks the whole core (check_core_rules, check_no_shared_credit_code) whatever its mappings
    depend on. A merge undone since the last run writes no run: `crmi run` must run and report what a run
    finds (here two active customers sharing a credit code again: exit 1), not "nothing changed" (exit 0)."""
    import datetime as dt

    from crm_core.models import MergeLog
    from integration.pipeline import Migration
    from integration.rerun import nothing_changed

    project, url = copied
    engine = make_engine(url)
    with engine.begin() as connection:
        # A project none of whose loads depends on the core (the demo's sales sheet does, by name).
        connection.execute(sa.update(MappingFingerprint).values(depends_on_core=False))
        run_id = connection.scalar(sa.select(LoadRun.id).where(LoadRun.run_key == baseline[2]))
        survivor, merged = [
            row[0] for row in connection.execute(sa.text("SELECT id FROM customers ORDER BY id LIMIT 2"))
        ]
        # What the last run's linkage left: the second customer, with the first's credit code, merged into it.
        connection.execute(sa.text(
            "UPDATE customers SET merged_into_id = :survivor, "
            "credit_code = (SELECT credit_code FROM customers WHERE id = :survivor) WHERE id = :merged"
        ), {"survivor": survivor, "merged": merged})  # fmt: skip
        merge = connection.execute(
            sa.insert(MergeLog).values(entity="customer", survivor_id=survivor, merged_id=merged,
                                       reason="auto-merge", decided_by="linkage", load_run_id=run_id)
        ).inserted_primary_key[0]  # fmt: skip
    migration = Migration.load(str(project))
    assert nothing_changed(engine, migration) == baseline[2]
    with engine.begin() as connection:  # what `crmi dedup undo` does, with no run of its own
        connection.execute(
            sa.text("UPDATE customers SET merged_into_id = NULL WHERE id = :merged"), {"merged": merged}
        )
        connection.execute(
            sa.update(MergeLog).where(MergeLog.id == merge).values(undone_at=dt.datetime.now(dt.UTC))
        )

    assert nothing_changed(engine, migration) is None
    result = CliRunner().invoke(app, ["run", "--project", str(project), "--core-url", url, "--json"])
    dispose_engines()
    assert result.exit_code == 1, result.output  # as `--new-run` exits: the blocking check fails
    assert "customer.credit_code.unique" in result.stderr
    engine.dispose()


def test_a_rollback_of_an_earlier_run_since_the_last_run_means_a_run(
    baseline: tuple[Path, Path, str], copied: tuple[Path, str]
) -> None:
    """A rollback writes no run of its own: rolling back a run older than the last one still changed the
    core since (here an edit, undone after a full run that read everything again), so a run is needed."""
    from crm_core.edits import edit_record
    from integration.pipeline import Migration
    from integration.rerun import nothing_changed

    project, url = copied
    engine = make_engine(url)
    with engine.connect() as connection:
        customer = connection.scalar(sa.text("SELECT id FROM customers ORDER BY id LIMIT 1"))
    edit = edit_record(engine, "customer", customer, {"industry": "软件"}, actor="li")
    code, forced = crmi_run(project, url, "--no-skip")  # every mapping loaded after the edit
    assert code == 0 and forced["skipped"] == []
    migration = Migration.load(str(project))
    assert nothing_changed(engine, migration) == forced["run_id"]

    rollback_run(engine, edit)

    assert nothing_changed(engine, migration) is None
    engine.dispose()


def test_a_source_that_cannot_be_read_while_checking_for_changes_fails_the_run_on_one_line(
    copied: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checking whether anything changed reads every source (a workbook open in Excel cannot be read on
    Windows): an error there is a doubt, so the run goes ahead and names the step that fails, no traceback."""
    import integration.rerun

    project, url = copied

    digest = integration.rerun.file_digest

    def locked(path: Path) -> str:
        if path.suffix == ".xlsx":
            raise PermissionError(13, "Permission denied", str(path))
        return digest(path)

    monkeypatch.setattr(integration.rerun, "file_digest", locked)
    result = CliRunner().invoke(app, ["run", "--project", str(project), "--core-url", url, "--json"])
    dispose_engines()
    assert result.exit_code == 1 and not isinstance(result.exception, PermissionError), result.exception
    assert "Permission denied" in result.stderr and "Traceback" not in result.output


def test_a_fix_sheet_and_its_source_are_skipped_together_and_read_together(
    demo_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fix sheet keeps its rows' original `_location`: both it and the source's own mapping were recorded
    with no fingerprint, so neither was ever skipped and "Nothing changed" never came while a fix existed.
    Their quarantine entries are told apart by mapping now; one is read whenever the other is."""
    import pandas as pd
    from openpyxl import load_workbook

    from tests.test_fix_sheet import FIX_SHEET, correct, re_import_fix_sheet

    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'core.sqlite'}"
    monkeypatch.setenv("CRM_CORE_URL", url)
    _, first = crmi_run(demo_project, url)
    report = tmp_path / "var" / "reports" / first["run_id"] / "reconciliation.xlsx"
    fixes = pd.read_excel(report, sheet_name=FIX_SHEET, dtype=str)
    engine = make_engine(url)
    with engine.connect() as connection:
        customer = connection.scalar(
            sa.text("SELECT name FROM customers WHERE merged_into_id IS NULL ORDER BY id")
        )
    re_import_fix_sheet(demo_project, correct(fixes, str(customer)))
    pair = {"sales_xlsx_opportunities", "sales_xlsx_opportunities_fixed"}
    _, fixed = crmi_run(demo_project, url)
    assert not pair & skipped(fixed)
    after = content(engine)

    _, again = crmi_run(demo_project, url, "--new-run")

    assert skipped(again) == {*MAPPINGS, "sales_xlsx_opportunities_fixed"}
    assert_balanced(again)
    assert content(engine) == after
    lines = {line["mapping"]: line for line in again["lines"]}
    for line in fixed["lines"]:  # the same counts, the same corrected rows: no entry copied twice
        carried = lines[line["mapping"]]
        assert (carried["rows_read"], carried["rejected"], carried["held"], carried["corrected"]) == (
            line["rows_read"], line["rejected"], line["held"], line["corrected"],
        )  # fmt: skip
    with engine.connect() as connection:
        rejects = [
            connection.execute(
                sa.text("SELECT mapping, location, row_ref, rule, reason FROM rejects JOIN load_runs "
                        "ON load_runs.id = rejects.load_run_id WHERE run_key = :r ORDER BY rejects.id"),
                {"r": run},
            ).all()
            for run in (fixed["run_id"], again["run_id"])
        ]  # fmt: skip
    assert rejects[0] and sorted(rejects[1]) == sorted(rejects[0])
    _, same = crmi_run(demo_project, url)
    assert same["nothing_changed"] and same["run_id"] == again["run_id"]

    # The source corrects a row the fix sheet corrected, differently: the source's mapping loads it and the fix
    # sheet, read with it though unchanged, leaves it (its row is superseded), as a run reading everything does.
    [key] = fixes.loc[fixes["_reasons"].str.contains("amount"), "商机编号"]
    workbook = load_workbook(demo_project / "data" / "sales.xlsx")
    sheet = workbook["商机"]
    header = next(row for row in sheet.iter_rows() if row[0].value == "商机编号")
    columns = {cell.value: cell.column for cell in header if cell.column is not None}
    [line] = [cell.row for cell in sheet["A"] if cell.value == key]
    for column, value in (("预计金额", "90000"), ("预计成交日期", "2025年12月1日"), ("客户名称", customer)):
        sheet.cell(row=line, column=columns[column]).value = value
    workbook.save(demo_project / "data" / "sales.xlsx")
    _, changed = crmi_run(demo_project, url)
    assert not pair & skipped(changed) and "erp_u8_customers" in skipped(changed)
    assert_balanced(changed)
    after = content(engine)
    with engine.connect() as connection:
        amount = connection.scalar(sa.select(Opportunity.amount).join(
            ExternalId, (ExternalId.entity_id == Opportunity.id) & (ExternalId.entity == "opportunity"),
        ).where(ExternalId.system == "sales_xlsx", ExternalId.external_key == key))  # fmt: skip
    assert amount == 90000  # the source's, newer than the fix sheet's 100000
    assert [
        line["superseded"] for line in changed["lines"] if line["mapping"] == "sales_xlsx_opportunities_fixed"
    ] == [1]
    crmi_run(demo_project, url, "--no-skip")  # what a run reading everything leaves
    assert content(engine) == after
    engine.dispose()
