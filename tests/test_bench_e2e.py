"""The end-to-end benchmark's engagement: a reproducible generator, a project that checks, a run that balances."""

from __future__ import annotations

import ast
import csv
import importlib.util
import json
import re
import sqlite3
import sys
from pathlib import Path
from types import ModuleType

import pytest
import sqlalchemy as sa
from openpyxl import load_workbook
from stdnum.cn import uscc
from typer.testing import CliRunner

from integration.cli import app
from tests.conftest import REPO

E2E = REPO / "bench" / "e2e"
ROWS = 300


def load_engagement_generator() -> ModuleType:
    """Import bench/e2e/generate_engagement.py as a module."""
    spec = importlib.util.spec_from_file_location("generate_engagement", E2E / "generate_engagement.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def engagement(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny engagement (300 source rows) in SQLite files and a workbook."""
    out = tmp_path_factory.mktemp("engagement")
    load_engagement_generator().generate(ROWS, out)
    return out


def contents(folder: Path) -> dict[str, object]:
    """Everything the generator wrote, as comparable values (workbook files carry save timestamps)."""
    found: dict[str, object] = {}
    for name in ("erp_u8.sqlite", "legacy_crm.sqlite"):
        with sqlite3.connect(folder / name) as db:
            tables = [
                r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY 1")
            ]
            for table in tables:
                found[f"{name}:{table}"] = db.execute(f'SELECT * FROM "{table}" ORDER BY 1').fetchall()
    workbook = load_workbook(folder / "sales.xlsx", read_only=True)
    for sheet in workbook.worksheets:
        found[f"xlsx:{sheet.title}"] = [tuple(row) for row in sheet.iter_rows(values_only=True)]
    workbook.close()
    for name in ("truth.csv", "soft_deleted.csv", "opportunities_truth.csv"):
        found[name] = (folder / name).read_text(encoding="utf-8")
    return found


def env_for(folder: Path) -> dict[str, str]:
    """The environment the benchmark project reads its sources from."""
    return {
        "E2E_U8_URL": f"sqlite:///{folder / 'erp_u8.sqlite'}",
        "E2E_CRM_URL": f"sqlite:///{folder / 'legacy_crm.sqlite'}",
        "E2E_SALES_XLSX": str(folder / "sales.xlsx"),
    }


def test_same_seed_same_engagement_and_the_size_is_exact(engagement: Path, tmp_path: Path) -> None:
    generator = load_engagement_generator()
    again = generator.generate(ROWS, tmp_path / "again")
    assert contents(tmp_path / "again") == contents(engagement)
    assert again["rows"] == ROWS == sum(again["by_entity"].values())
    other = generator.generate(ROWS, tmp_path / "other", seed=7)
    assert (tmp_path / "other" / "truth.csv").read_text() != (engagement / "truth.csv").read_text()
    assert other["rows"] == ROWS


def test_hard_cases_are_planted_and_the_truth_covers_every_live_customer(engagement: Path) -> None:
    manifest = json.loads((engagement / "manifest.json").read_text(encoding="utf-8"))
    for case in ("branches", "companies_sharing_a_phone", "old_15_digit_tax_numbers",
                 "foreign_currency_opportunities", "subtotal_rows"):  # fmt: skip
        assert manifest["hard_cases"].get(case, 0) > 0, case
    for name_class in ("name_english", "name_region_bracket", "name_region_absent"):
        assert manifest["classes"].get(name_class, 0) > 0, name_class
    with (engagement / "truth.csv").open(encoding="utf-8") as handle:
        truth = list(csv.DictReader(handle))
    with sqlite3.connect(engagement / "erp_u8.sqlite") as db:
        customers = db.execute('SELECT COUNT(*) FROM "Customer"').fetchone()[0]
        codes = dict(
            db.execute('SELECT "cCusCode", "cCusRegCode" FROM "Customer" WHERE "cCusRegCode" IS NOT NULL')
        )
    with sqlite3.connect(engagement / "legacy_crm.sqlite") as db:
        live_accounts = db.execute("SELECT COUNT(*) FROM accounts WHERE deleted = 0").fetchone()[0]
        deleted = db.execute("SELECT COUNT(*) FROM accounts WHERE deleted = 1").fetchone()[0]
    sources = [row["source"] for row in truth]
    assert sources.count("erp_u8") == customers and sources.count("legacy_crm") == live_accounts
    assert sources.count("sales_xlsx") == manifest["tables"]["xlsx.客户"]
    assert deleted > 0 and manifest["soft_deleted_rows"] >= 3  # accounts, contacts, opportunities
    # A credit code without an identifier class is valid; each class is what it says.
    classes = {row["key"]: set(row["classes"].split(";")) for row in truth if row["source"] == "erp_u8"}
    lengths = {"id_reg15": {15}, "id_org9": {9, 10}, "id_uscc_cut10": {10}, "id_uscc_dropped": {17},
               "id_uscc_doubled": {19}, "id_uscc_swapped": {18}}  # fmt: skip
    for key, code in codes.items():
        tagged = [tag for tag in classes[key] if tag in lengths]
        assert len(tagged) <= 1, (key, code, tagged)
        if tagged:
            assert len(code) in lengths[tagged[0]], (key, code, tagged)
        else:
            assert uscc.is_valid(code), (key, code)


# Every failure class of issue 14, as the held-out generator tags it.
MUST_MATCH = [
    "name_homophone", "name_lookalike", "name_char_dropped", "name_chars_swapped", "name_industry_variant",
    "name_traditional_mixed", "name_short_trade", "name_region_before", "name_region_bracket",
    "name_region_absent", "name_english", "id_uscc_dropped", "id_uscc_doubled", "id_uscc_swapped",
    "id_reg15", "id_org9", "id_uscc_cut10", "phone_local_only", "phone_extension", "phone_multi",
    "phone_intl_prefix", "address_only",
]  # fmt: skip
TRAPS = [
    "trap_other_city_address", "trap_other_city_crm_city_en", "trap_other_city_area_code",
    "trap_other_city_uscc_division", "trap_english_other_city", "trap_branch_parent",
    "trap_same_district_one_char", "trap_bridge", "trap_shared_phone",
]  # fmt: skip


def test_the_held_out_generator_and_its_scorer_import_nothing_from_the_toolkit() -> None:
    for path in (E2E / "generate_engagement.py", E2E / "quality.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules = {
            alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        }
        modules |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not {m for m in modules if m.split(".")[0] in ("crm_core", "integration")}, path


def test_every_failure_class_is_planted_and_written_as_its_tag_says(tmp_path: Path) -> None:
    manifest = load_engagement_generator().generate(None, tmp_path, customers=3000)
    assert 2500 <= manifest["by_entity"]["customers"] <= 3500
    assert not [tag for tag in MUST_MATCH + TRAPS if manifest["classes"].get(tag, 0) == 0]
    with (tmp_path / "truth.csv").open(encoding="utf-8") as handle:
        truth = list(csv.DictReader(handle))
    # A trap group holds the records of exactly two companies.
    companies_of: dict[str, set[str]] = {}
    for row in truth:
        for tag in row["classes"].split(";"):
            if tag.startswith("trap_"):
                companies_of.setdefault(tag, set()).add(row["company_id"])
    assert companies_of and all(len(found) <= 2 for found in companies_of.values())
    assert sum(len(found) == 2 for found in companies_of.values()) > 0.8 * len(companies_of)
    with sqlite3.connect(tmp_path / "erp_u8.sqlite") as db:
        u8 = {
            code: (name, phone)
            for code, name, phone in db.execute('SELECT "cCusCode", "cCusName", "cCusPhone" FROM "Customer"')
        }
    shapes = {
        "phone_extension": r"(转|-\d{3,4}$|ext\.|分机)",
        "phone_multi": r"\d\s*[、；/,]\s*[\d(]",
        "phone_intl_prefix": r"^(\+86|0086|86-)",
        "phone_local_only": r"^\d{7,8}$",
    }  # fmt: skip
    for row in truth:
        if row["source"] != "erp_u8":
            continue
        name, phone = u8[row["key"]]
        tags = row["classes"].split(";")
        for tag, pattern in shapes.items():
            if tag in tags:
                assert re.search(pattern, phone), (tag, phone)
        if "name_english" in tags:
            raise AssertionError(f"U8 writes no English names: {name}")
        if "name_short_trade" in tags:
            assert len(name) == 2, name
    with (tmp_path / "opportunities_truth.csv").open(encoding="utf-8") as handle:
        opportunities = list(csv.DictReader(handle))
    assert {row["source"] for row in opportunities} == {"legacy_crm", "sales_xlsx"}
    assert {row["resolvable"] for row in opportunities} == {"0", "1"}


def test_the_project_checks_against_the_generated_sources(
    engagement: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env_for(engagement).items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(app, ["project", "check", "--project", str(E2E / "project")])
    assert result.exit_code == 0, result.output
    assert "12 mapping(s), 3 source(s)" in result.output


def test_the_project_names_the_missing_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("E2E_U8_URL", "E2E_CRM_URL", "E2E_SALES_XLSX"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(app, ["project", "check", "--project", str(E2E / "project")])
    assert result.exit_code != 0
    assert "E2E_U8_URL" in result.output


@pytest.mark.slow
def test_a_tiny_engagement_runs_balances_and_leaves_soft_deletes_behind(
    engagement: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env_for(engagement).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # reports go to ./var/reports
    core = f"sqlite:///{tmp_path / 'core.sqlite'}"
    result = CliRunner().invoke(app, ["run", "--project", str(E2E / "project"), "--core-url", core, "--json"])
    summary = json.loads(result.stdout)
    # Every row is accounted for. A tiny sheet may still hold more than the project's quarantine limit
    # (names of companies that exist nowhere wait for a steward): that, and only that, exits 2.
    assert summary["success"] and summary["balanced"], result.output
    assert result.exit_code == (0 if summary["acceptable"] else 2), result.output
    assert summary["acceptable"] or "quarantined" in summary["verdict"]
    engine = sa.create_engine(core)
    with engine.connect() as connection:
        crosswalk = {
            (system, key)
            for system, key in connection.execute(sa.text("SELECT system, external_key FROM external_ids"))
        }
    engine.dispose()
    with (engagement / "soft_deleted.csv").open(encoding="utf-8") as handle:
        deleted = {(row["source"], row["key"]) for row in csv.DictReader(handle)}
    with (engagement / "truth.csv").open(encoding="utf-8") as handle:
        truth = {(row["source"], row["key"]) for row in csv.DictReader(handle)}
    assert deleted and not deleted & crosswalk
    assert truth <= crosswalk
