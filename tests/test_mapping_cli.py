"""Consultant commands on the three demo sources: scaffold a mapping, preview it, check it."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from crm_core.errors import ConfigError
from integration.cli import app
from integration.mappings.scaffold import SCHEMA_FILE, guess_fields, guess_target, header_key
from integration.mappings.spec import load_mapping
from integration.mappings.targets import markdown as targets_markdown
from integration.mappings.targets import target_fields
from integration.pipeline import Migration

runner = CliRunner()


@pytest.mark.parametrize(
    ("source", "table", "target", "expected"),
    [
        ("legacy_crm", "accounts", "customer", {"name": "name", "credit_code": "sic_code", "owner": "assigned_user_id", "city": "billing_address_city"}),
        ("sales_xlsx", "商机", "opportunity", {"customer": "客户名称", "name": "商机名称", "amount": "预计金额", "stage": "阶段", "owner": "负责人"}),
        ("erp_u8", "Customer", "customer", {"name": "cCusName", "credit_code": "cCusRegCode", "short_name": "cCusAbbName", "parent": "cCusHeadCode"}),
        ("sales_xlsx", "客户", "customer", {"name": "客户名称", "credit_code": "统一社会信用代码", "owner": "负责人"}),
    ],
)  # fmt: skip
def test_scaffold_guesses_fields_and_writes_a_mapping_that_checks(
    demo_project: Path, tmp_path: Path, source: str, table: str, target: str, expected: dict[str, str]
) -> None:
    out = tmp_path / "scaffolded.yaml"
    command = [
        "mapping",
        "scaffold",
        "--project",
        str(demo_project),
        "--source",
        source,
        "--table",
        table,
        "--out",
        str(out),
    ]
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    spec = yaml.safe_load(out.read_text(encoding="utf-8"))
    assert spec["target"] == target
    assert {field: spec["fields"][field]["from"] for field in expected} == expected
    columns = Migration.load(str(demo_project)).connector(source).columns(table)
    compiled = load_mapping(out, sources={source: columns})  # valid against the real columns
    assert compiled.entity.name == target
    again = runner.invoke(app, command)
    assert again.exit_code == 1 and "exists; not overwriting it" in again.output


def test_scaffold_out_into_a_folder_missing_here_says_where_it_looked(
    demo_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # README: `crmi mapping scaffold --source S --table T --out mappings/s_t.yaml`, run from the repository
    # root with --project: there is no ./mappings there, and the command ended in a FileNotFoundError traceback.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = runner.invoke(app, ["mapping", "scaffold", "--project", str(demo_project), "--source", "legacy_crm",
                                 "--table", "accounts", "--out", "mappings/legacy_crm_accounts.yaml"])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    message = " ".join(result.output.split())
    assert f"no folder {elsewhere / 'mappings'}" in message
    assert f"--out {demo_project / 'mappings' / 'legacy_crm_accounts.yaml'}" in message
    assert not (elsewhere / "mappings").exists()


def test_scaffold_lookups_and_transforms_fit_the_columns(demo_project: Path) -> None:
    result = runner.invoke(
        app,
        ["mapping", "scaffold", "--project", str(demo_project), "--source", "sales_xlsx", "--table", "商机"],
    )
    spec = yaml.safe_load(result.stdout)
    assert spec["source"] == {"connector": "sales_xlsx", "sheet": "商机", "key": "商机编号"}
    assert spec["fields"]["customer"]["lookup"] == {"by": "name"}
    assert spec["fields"]["amount"]["transforms"] == ["parse_amount"]
    assert spec["fields"]["expected_close_date"]["transforms"] == ["parse_date"]


@pytest.mark.parametrize(
    ("columns", "target", "expected"),
    [
        (["编号", "公司", "电话"], "customer", {"name": "公司"}),  # 公司 is the customer's own name here
        (["客户", "城市"], "customer", {"name": "客户"}),
        (["Company", "Phone"], "customer", {"name": "Company"}),
        (["姓名", "公司", "手机"], "contact", {"name": "姓名", "customer": "公司"}),  # the contact's customer
        (["公司", "客户名称"], "customer", {"name": "客户名称"}),  # a real name column wins
        (["公司", "姓名"], "sales_rep", {"name": "姓名"}),  # a salesperson is no company
        (["联系人", "公司", "电话"], "customer", {"name": "公司"}),  # 联系人 is the contact person
        (["客户编码", "客户名称", "联系人"], "customer", {"name": "客户名称"}),
    ],
)  # fmt: skip
def test_company_headers_name_a_customer_sheets_records_and_a_contacts_customer(
    columns: list[str], target: str, expected: dict[str, str]
) -> None:
    chosen, _ = guess_fields(columns, target)
    assert {field: chosen.get(field) for field in expected} == expected


def test_a_scaffolded_mappings_schema_comment_points_at_the_schema_from_where_it_is_written(
    demo_project: Path, tmp_path: Path
) -> None:
    out = tmp_path / "elsewhere" / "deeper" / "accounts.yaml"
    out.parent.mkdir(parents=True)
    command = ["mapping", "scaffold", "--project", str(demo_project), "--source", "legacy_crm",
               "--table", "accounts", "--out", str(out)]  # fmt: skip
    assert runner.invoke(app, command).exit_code == 0
    first = out.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# yaml-language-server: $schema=")
    reference = first.split("$schema=", 1)[1]
    assert not Path(reference).is_absolute()
    assert (out.parent / reference).resolve() == SCHEMA_FILE.resolve()


@pytest.mark.parametrize(
    ("table", "entity"),
    [
        ("accounts", "customer"),
        ("商机", "opportunity"),
        ("SO_SODetails", "sales_order_line"),
        ("SO_SOMain", "sales_order"),
        ("Person", "sales_rep"),
        ("联系人", "contact"),
    ],
)
def test_target_is_guessed_from_the_table_name(table: str, entity: str) -> None:
    assert guess_target(table) == entity


def test_header_keys_ignore_width_case_and_separators() -> None:
    assert header_key("Phone_Office") == header_key("phone office") == "phoneoffice"
    assert header_key("客户名称（全称）") == "客户名称全称"


@pytest.mark.parametrize(
    "mapping", ["erp_u8_customers.yaml", "legacy_crm_contacts.yaml", "sales_xlsx_opportunities.yaml"]
)
def test_preview_shows_raw_and_mapped_values_on_every_source(demo_project: Path, mapping: str) -> None:
    file = demo_project / "mappings" / mapping
    result = runner.invoke(app, ["mapping", "preview", str(file), "--rows", "200", "--format", "csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert rows and {"_row", "_status", "name (raw)", "name"} <= set(rows[0])
    assert all(
        r["_status"] == "ok" or r["_status"].startswith(("rejected: ", "invalid: ", "warning: "))
        for r in rows
    )


def test_preview_names_the_reason_of_each_rejected_row(demo_project: Path) -> None:
    file = demo_project / "mappings" / "sales_xlsx_opportunities.yaml"
    result = runner.invoke(app, ["mapping", "preview", str(file), "--rows", "500", "--format", "csv"])
    rows = {r["_row"]: r for r in csv.DictReader(io.StringIO(result.stdout))}
    rejected = {k: r["_status"] for k, r in rows.items() if r["_status"].startswith("rejected")}
    assert any("parse_amount: '待定' is not an amount" in s for s in rejected.values())
    assert any(s == "rejected: subtotal/total row, not a record" for s in rejected.values())
    ok = next(r for r in rows.values() if r["_status"] == "ok" and r["amount (raw)"].endswith("万"))
    assert float(ok["amount"]) == float(ok["amount (raw)"].removesuffix("万")) * 10000
    table = runner.invoke(app, ["mapping", "preview", str(file), "--rows", "5"])
    assert table.exit_code == 0 and "5 row(s) read, 5 mapped, 0 rejected" in table.stdout


def test_preview_runs_the_validation_rules_and_keeps_a_status_field_apart(demo_project: Path) -> None:
    """A target field named ``status`` has its own column; ``bogus`` previews as invalid with rule and reason."""
    file = demo_project / "mappings" / "erp_u8_customers.yaml"
    text = file.read_text(encoding="utf-8")
    file.write_text(
        text + '  status: {from: cCusCode, transforms: [{regex_replace: {pattern: ".+", replace: bogus}}]}\n',
        encoding="utf-8",
    )
    result = runner.invoke(app, ["mapping", "preview", str(file), "--rows", "3", "--format", "csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 3
    for row in rows:
        assert row["status"] == "bogus" and row["status (raw)"] == row["_row"]  # the field, untouched
        assert row["_status"] == (
            "invalid: customer.status.allowed: status must be one of: active, inactive, prospect (value 'bogus')"
        )
    table = runner.invoke(app, ["mapping", "preview", str(file), "--rows", "3"])
    assert "3 row(s) read, 3 mapped, 0 rejected, 3 invalid (validation errors)" in table.stdout
    file.write_text(text.replace("phone: {from: cCusPhone, transforms: [{phone: {region: CN}}], on_error: \"null\", area_code_from: city}",
                                 "phone: {from: cCusPhone}"), encoding="utf-8")  # fmt: skip
    loose = runner.invoke(app, ["mapping", "preview", str(file), "--rows", "50", "--format", "csv"])
    statuses = [r["_status"] for r in csv.DictReader(io.StringIO(loose.stdout))]
    assert any(s.startswith("warning: customer.phone.format: phone is not an E.164") for s in statuses)


def _break_the_rest_of_the_project(root: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Make another source need an unset variable and another mapping invalid; return project.yaml and it."""
    project = root / "project.yaml"
    text = project.read_text(encoding="utf-8")
    project.write_text(
        text.replace("${LEGACY_CRM_URL:-sqlite:///data/legacy_crm.sqlite}", "${TRIAL_CRM_URL}"),
        encoding="utf-8",
    )
    monkeypatch.delenv("TRIAL_CRM_URL", raising=False)
    other = root / "mappings" / "sales_xlsx_customers.yaml"
    text = other.read_text(encoding="utf-8")
    other.write_text(text.replace('on_error: "null"', "on_error: skip"), encoding="utf-8")
    return project, other


def test_preview_and_check_of_one_mapping_are_not_blocked_by_the_rest_of_the_project(
    demo_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consultant works on one mapping: another source's unset variable or another mapping's error is a warning."""
    project, other = _break_the_rest_of_the_project(demo_project, monkeypatch)
    file = demo_project / "mappings" / "sales_xlsx_opportunities.yaml"
    preview = runner.invoke(app, ["mapping", "preview", str(file), "--rows", "3"])
    assert preview.exit_code == 0, preview.output
    assert "3 row(s) read" in preview.stdout
    warnings = [line for line in preview.stderr.splitlines() if line.startswith("warning: ")]
    assert any(f"{project}:" in w and "TRIAL_CRM_URL is not set" in w for w in warnings), preview.stderr
    assert any(f"{other}:" in w and "'skip' is not allowed" in w for w in warnings), preview.stderr
    check = runner.invoke(app, ["mapping", "check", str(file), "--project", str(demo_project)])
    assert check.exit_code == 0, check.output
    assert "columns checked against project" in check.stdout
    assert "TRIAL_CRM_URL is not set" in check.stderr and "'skip' is not allowed" in check.stderr
    # The source the mapping reads, and the mapping itself, still refuse.
    legacy = demo_project / "mappings" / "legacy_crm_accounts.yaml"
    refused = runner.invoke(app, ["mapping", "preview", str(legacy), "--rows", "3"])
    assert refused.exit_code == 1
    assert f"{project}:" in refused.stderr and "TRIAL_CRM_URL is not set" in refused.stderr
    own = runner.invoke(app, ["mapping", "preview", str(other), "--rows", "3"])
    assert own.exit_code == 1 and "'skip' is not allowed" in own.stderr


def test_crmi_run_stays_strict_about_the_whole_project(
    demo_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _break_the_rest_of_the_project(demo_project, monkeypatch)
    with pytest.raises(ConfigError) as caught:
        Migration.load(str(demo_project))
    assert any("TRIAL_CRM_URL is not set" in str(p) for p in caught.value.problems)


def test_mapping_check_exits_1_with_located_problems(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "version: 1\nsource: {connector: x, table: t}\ntarget: customer\nfields:\n  name: {from: n, transforms: [trimm]}\n",
        encoding="utf-8",
    )
    result = runner.invoke(app, ["mapping", "check", str(bad)])
    assert result.exit_code == 1
    assert (
        f"{bad}:5:32: fields.name.transforms[0]: unknown transform 'trimm'; did you mean 'trim'?"
        in result.output
    )


def test_mapping_check_reports_every_independent_problem_of_every_file_at_once(tmp_path: Path) -> None:
    """A bad key under source: does not hide a bad transform argument; one bad file does not hide another."""
    files = []
    for name, key in (("opportunities", "filter"), ("leads", "filtre")):
        file = tmp_path / f"{name}.yaml"
        file.write_text(
            f'version: 1\nsource: {{connector: x, sheet: 商机, {key}: "x"}}\ntarget: opportunity\nfields:\n'
            "  customer: 客户\n  name: 名称\n  stage: {from: 阶段, transforms: [{stage: {map: {a: b}}}]}\n",
            encoding="utf-8",
        )
        files.append(file)
    result = runner.invoke(app, ["mapping", "check", *map(str, files)])
    assert result.exit_code == 1
    for file, key in zip(files, ("filter", "filtre"), strict=True):
        assert f"{file}:2:35: source.{key}: unknown key '{key}'" in result.output
        assert (
            f"{file}:7:43: fields.stage.transforms[0].stage.map: stage: unknown key 'map'; 'stage' takes no arguments (write just stage)"
            in result.output
        )
    assert "4 problem(s)" in result.output


def test_mapping_check_reports_every_problem_of_a_field_without_a_rerun(tmp_path: Path) -> None:
    """Two independent problems in one field and two in another: all four in one run, not one per rerun."""
    file = tmp_path / "customers.yaml"
    file.write_text(
        "version: 1\nsource: {connector: x, table: t}\ntarget: customer\nfields:\n  name: n\n"
        "  nmae: {from: n, transforms: [trimm]}\n"
        "  owner: {from: u, transforms: [upperr], lookup: {by: nmae}}\n",
        encoding="utf-8",
    )
    result = runner.invoke(app, ["mapping", "check", str(file)])
    assert result.exit_code == 1
    for expected in (
        f"{file}:6:3: fields.nmae: entity 'customer' has no field 'nmae'; did you mean 'name'?",
        f"{file}:6:32: fields.nmae.transforms[0]: unknown transform 'trimm'; did you mean 'trim'?",
        f"{file}:7:55: fields.owner.lookup.by: 'nmae' is not allowed; did you mean 'name'?; allowed: external_id, name, code, id",
        f"{file}:7:33: fields.owner.transforms[0]: unknown transform 'upperr'; did you mean 'upper'?",
    ):
        assert expected in result.output, result.output
    assert "4 problem(s)" in result.output


def test_mapping_check_with_a_project_checks_the_real_source_columns(
    demo_project: Path, tmp_path: Path
) -> None:
    accounts = demo_project / "mappings" / "legacy_crm_accounts.yaml"
    ok = runner.invoke(app, ["mapping", "check", str(accounts), "--project", str(demo_project)])
    assert ok.exit_code == 0, ok.output
    assert "columns checked against project" in ok.output
    # Outside the project: a second mapping of the same table inside it would be a project error.
    renamed = tmp_path / "accounts.yaml"
    text = accounts.read_text(encoding="utf-8")
    renamed.write_text(text.replace("from: industry", "from: industri"), encoding="utf-8")
    line, column = next(
        (n, row.index("from: industry") + len("from: ") + 1)
        for n, row in enumerate(text.splitlines(), 1)
        if "from: industry" in row
    )
    offline = runner.invoke(app, ["mapping", "check", str(renamed)])
    assert offline.exit_code == 0, "without --project the columns are not known"
    checked = runner.invoke(app, ["mapping", "check", str(renamed), "--project", str(demo_project)])
    assert checked.exit_code == 1
    assert (
        f"{renamed}:{line}:{column}: fields.industry.from: column 'industri' is not in accounts; did you mean 'industry'?"
        in checked.output
    )


def test_a_table_missing_at_the_source_is_located_at_the_mapping_line_that_names_it(
    demo_project: Path, tmp_path: Path
) -> None:
    """A newcomer's `table: crm_customers` (the table is crm_customer) was reported without file:line:col."""
    accounts = demo_project / "mappings" / "legacy_crm_accounts.yaml"
    text = accounts.read_text(encoding="utf-8")
    renamed = tmp_path / "accounts.yaml"
    renamed.write_text(text.replace("table: accounts", "table: acounts"), encoding="utf-8")
    line, column = next(
        (n, row.index("table: acounts") + len("table: ") + 1)
        for n, row in enumerate(renamed.read_text(encoding="utf-8").splitlines(), 1)
        if "table: acounts" in row
    )
    checked = runner.invoke(app, ["mapping", "check", str(renamed), "--project", str(demo_project)])
    assert checked.exit_code == 1
    assert f"{renamed}:{line}:{column}: source.table: " in checked.output, checked.output
    assert "'acounts' does not exist" in checked.output and "accounts" in checked.output.split("tables:")[-1]


def test_committed_target_reference_is_current() -> None:
    committed = (Path(__file__).resolve().parents[1] / "docs" / "targets.md").read_text(encoding="utf-8")
    assert committed == targets_markdown(), "docs/targets.md is out of date: run `make schema`"


def test_targets_list_what_validation_accepts_for_each_enumerated_field() -> None:
    """The allowed values shown are exactly those the validation rules let through."""
    import pandas as pd

    from crm_core.entities import ENTITIES
    from crm_core.validation import builtin_rules, validate

    shown = {(e, f.name): f for e in ENTITIES for f in target_fields(e)}
    assert shown[("customer", "status")].allowed and shown[("opportunity", "stage")].allowed
    assert all(shown[(e, n)].required == d.required for e in ENTITIES for n, d in ENTITIES[e].fields.items())
    for (entity, name), field in shown.items():
        if not field.allowed:
            continue
        frame = pd.DataFrame({name: [*field.allowed, "bogus"]})
        bad = validate(entity, frame, [r for r in builtin_rules() if r.field == name and r.allowed])
        assert list(bad["index"]) == [len(field.allowed)], (entity, name)


def test_mapping_targets_command_shows_one_entity_and_names_a_misspelt_one() -> None:
    result = runner.invoke(app, ["mapping", "targets", "customer"])
    assert result.exit_code == 0, result.output
    assert "active, inactive, prospect" in result.stdout and "credit_code" in result.stdout
    assert "opportunity" not in result.stdout
    wrong = runner.invoke(app, ["mapping", "targets", "custmer"])
    assert wrong.exit_code == 1 and "unknown entity 'custmer'; did you mean 'customer'?" in wrong.output


def test_mapping_check_with_a_project_checks_link_tables_and_where_against_the_source(
    demo_project: Path, tmp_path: Path
) -> None:
    opportunities = demo_project / "mappings" / "legacy_crm_opportunities.yaml"
    ok = runner.invoke(app, ["mapping", "check", str(opportunities), "--project", str(demo_project)])
    assert ok.exit_code == 0, ok.output
    broken = tmp_path / "opportunities.yaml"
    text = opportunities.read_text(encoding="utf-8")
    broken.write_text(
        text.replace("table: accounts_opportunities", "table: account_opportunities").replace(
            'where: "deleted = 0"\n', 'where: "deleted = 0 and stage = 1"\n'
        ),
        encoding="utf-8",
    )
    checked = runner.invoke(app, ["mapping", "check", str(broken), "--project", str(demo_project)])
    assert checked.exit_code == 1
    output = " ".join(checked.output.split())
    assert "source.where: unknown column 'stage'" in output
    assert (
        "fields.customer.via.table: source 'legacy_crm': table 'account_opportunities' does not exist"
        in output
    )
    assert "did you mean 'sales_stage'?" in output
    # A type mismatch needs no source: found offline.
    broken.write_text(text.replace("from: date_closed", "expr: \"date_closed + 'x'\""), encoding="utf-8")
    offline = runner.invoke(app, ["mapping", "check", str(broken)])
    assert offline.exit_code == 1
    assert (
        "fields.expected_close_date.expr: type mismatch: add needs number or date, got text ('x')"
        in " ".join(offline.output.split())
    )
