"""The transform reference and the editor schema come from the code and agree with the loader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from crm_core.errors import ConfigError
from integration.cli import app
from integration.mappings.reference import markdown, transform_docs
from integration.mappings.spec import json_schema, load_mapping
from integration.mappings.transforms import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
DEMO_MAPPINGS = sorted((ROOT / "examples" / "demo" / "mappings").glob("*.yaml"))
runner = CliRunner()


def validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads(json_schema()))


def test_committed_transform_reference_is_current() -> None:
    committed = (ROOT / "docs" / "transforms.md").read_text(encoding="utf-8")
    assert committed == markdown(), "docs/transforms.md is out of date: run `make schema`"


def test_every_transform_is_documented_with_described_arguments_and_working_examples() -> None:
    docs = {doc.name: doc for doc in transform_docs()}
    assert set(docs) == set(REGISTRY)
    for name, doc in docs.items():
        assert doc.summary, name
        assert all(arg.description for arg in doc.arguments), name
        assert len(doc.examples) >= 2 and any(e.ok for e in doc.examples), name


def test_the_reference_shows_what_each_example_becomes_including_errors() -> None:
    docs = {doc.name: doc for doc in transform_docs()}
    amounts = {e.value: e.result for e in docs["parse_amount"].examples}
    assert amounts["'12.5万'"] == "125000.00" and amounts["'壹仟贰佰元整'"] == "1200.00"
    assert amounts["'待定'"].startswith("error: '待定' is not an amount")
    dates = {e.value: e.result for e in docs["parse_datetime"].examples}
    assert dates["'2025/3/5'"] == "2025-03-05T00:00:00+08:00"  # example_args: timezone Asia/Shanghai
    assert docs["split"].usage == '{split: {sep: "/", index: -1}}'
    assert [(a.name, a.kind, a.default) for a in docs["map_values"].arguments] == [
        ("values", "mapping", None),
        ("unmatched", "keep | null | reject", "keep"),
    ]
    assert {e.value: e.ok for e in docs["uscc"].examples}["'91440300708461136X'"] is False


@pytest.mark.parametrize("file", DEMO_MAPPINGS, ids=lambda p: p.name)
def test_the_editor_schema_accepts_every_demo_mapping(file: Path) -> None:
    document = yaml.safe_load(file.read_text(encoding="utf-8"))
    errors = [e.message for e in validator().iter_errors(document)]
    assert errors == []


def _accounts() -> dict[str, Any]:
    document = yaml.safe_load(
        (ROOT / "examples" / "demo" / "mappings" / "legacy_crm_accounts.yaml").read_text(encoding="utf-8")
    )
    assert isinstance(document, dict)
    return document


def _with_field(name: str, spec: Any) -> dict[str, Any]:
    document = _accounts()
    document["fields"][name] = spec
    return document


def _without_field(name: str) -> dict[str, Any]:
    document = _accounts()
    del document["fields"][name]
    return document


BROKEN = {
    "unknown transform": _with_field("website", {"from": "website", "transforms": ["lowr"]}),
    "unknown transform in long form": _with_field("website", {"from": "website", "transforms": [{"fone": {}}]}),
    "argument of the wrong type": _with_field("city", {"from": "billing_address_city", "transforms": [{"split": {"sep": 1}}]}),
    "unknown argument": _with_field("phone", {"from": "phone_office", "transforms": [{"phone": {"country": "CN"}}]}),
    "required argument missing (short form)": _with_field("city", {"from": "billing_address_city", "transforms": ["split"]}),
    "value outside an enum": _with_field("city", {"from": "billing_address_street", "transforms": [{"address_part": {"part": "street"}}]}),
    "two transforms in one entry": _with_field("website", {"from": "website", "transforms": [{"trim": None, "lower": None}]}),
    "field the target does not have": _with_field("nmae", "name"),
    "required target field left unmapped": _without_field("name"),
}  # fmt: skip


@pytest.mark.parametrize("case", BROKEN, ids=str)
def test_the_editor_schema_and_the_loader_refuse_the_same_mistakes(case: str, tmp_path: Path) -> None:
    document = BROKEN[case]
    assert list(validator().iter_errors(document)), f"the schema lets through: {case}"
    file = tmp_path / "broken.yaml"
    file.write_text(yaml.safe_dump(document, allow_unicode=True, sort_keys=False), encoding="utf-8")
    with pytest.raises(ConfigError):
        load_mapping(file)


def test_crmi_mapping_transforms_lists_every_transform() -> None:
    result = runner.invoke(app, ["mapping", "transforms"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    listed = {line.split("│")[1].strip() for line in result.output.splitlines() if line.startswith("│")}
    assert set(REGISTRY) <= listed


def test_crmi_mapping_transforms_name_shows_arguments_and_examples() -> None:
    result = runner.invoke(app, ["mapping", "transforms", "join"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "split_on" in result.output and "'销售, 市场, 售后'" in result.output


def test_crmi_mapping_transforms_suggests_the_close_name() -> None:
    result = runner.invoke(app, ["mapping", "transforms", "fone"])
    assert result.exit_code == 1
    assert "unknown transform 'fone'; did you mean 'phone'?" in result.output


def test_crmi_mapping_transforms_markdown_is_the_committed_reference() -> None:
    result = runner.invoke(app, ["mapping", "transforms", "--format", "markdown"])
    assert result.exit_code == 0
    assert result.output == (ROOT / "docs" / "transforms.md").read_text(encoding="utf-8")


def test_each_usage_line_is_yaml_that_gives_the_example_arguments() -> None:
    for doc in transform_docs():
        definition = REGISTRY[doc.name]
        expected = {doc.name: definition.example_args} if definition.example_args else doc.name
        assert yaml.safe_load(doc.usage) == expected, doc.usage
