"""The transform reference, made from the registry: what ``crmi mapping transforms`` prints,
``docs/transforms.md`` holds and the JSON Schema offers editors, so none of them can drift from the code.

Every example is run through its transform when the reference is made: the results shown are the ones
a mapping gets.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pandas as pd

from integration.mappings import columnar
from integration.mappings.transforms import REGISTRY, TransformDef


@dataclass(frozen=True)
class ArgumentDoc:
    """One argument of a transform."""

    name: str
    kind: str  # e.g. "text", "whole number", "province | city | district"
    default: str | None  # None: the argument is required
    description: str


@dataclass(frozen=True)
class ExampleDoc:
    """One example value and what the transform makes of it."""

    value: str
    result: str
    ok: bool  # False: the value is an error (the row is rejected unless on_error says otherwise)


@dataclass(frozen=True)
class TransformDoc:
    """Everything a consultant needs to use one transform."""

    name: str
    summary: str
    arguments: list[ArgumentDoc]
    usage: str  # how it is written in a mapping file
    examples: list[ExampleDoc]


_KINDS = {
    "string": "text",
    "integer": "whole number",
    "number": "number",
    "boolean": "true/false",
    "object": "mapping",
    "null": "empty",
}


def _kind(schema: dict[str, Any]) -> str:
    """Describe a JSON Schema type in words (enum values, lists, alternatives)."""
    if "enum" in schema:
        return " | ".join(str(v) for v in schema["enum"])
    if "anyOf" in schema:
        kinds = [_kind(s) for s in schema["anyOf"] if s.get("type") != "null"]
        return " or ".join(kinds)
    if schema.get("type") == "array":
        return f"list of {_kind(schema.get('items', {}))}"
    return _KINDS.get(str(schema.get("type")), "any value")


def _yaml(value: Any) -> str:
    """Write a value the way a mapping file would (JSON flow style is valid YAML)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str) and value.isidentifier() and value not in ("null", "true", "false"):
        return value
    return json.dumps(value, ensure_ascii=False)


def _arguments(definition: TransformDef) -> list[ArgumentDoc]:
    properties = definition.args.model_json_schema().get("properties", {})
    arguments = []
    for name, info in definition.args.model_fields.items():
        default = None if info.is_required() else _yaml(info.get_default(call_default_factory=True))
        arguments.append(ArgumentDoc(name, _kind(properties[name]), default, info.description or ""))
    return arguments


def _shown(value: Any) -> str:
    """Show a value exactly: quotes around text, invisible characters escaped (\\u3000, \\u200b)."""
    return repr(value) if isinstance(value, str) else str(value)


def _result(value: Any) -> str:
    if value is None or value is pd.NA:
        return "(empty)"
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, Decimal | bool | int | float):
        return str(value)
    return _shown(value)


def run_examples(definition: TransformDef) -> list[ExampleDoc]:
    """Run a transform's examples through it (with its example arguments) and return what each became."""
    if not definition.examples:
        return []
    args = definition.args.model_validate(definition.example_args or {})
    with columnar.chunk_scope():
        results, errors = definition.func(pd.Series(list(definition.examples), dtype=object), args)
    docs = []
    for position, value in enumerate(definition.examples):
        error = None if errors is None else errors.iloc[position]
        if error is not None and error is not pd.NA:
            docs.append(ExampleDoc(_shown(value), f"error: {error}", ok=False))
        else:
            docs.append(ExampleDoc(_shown(value), _result(results.iloc[position]), ok=True))
    return docs


def transform_doc(definition: TransformDef) -> TransformDoc:
    """Return the reference entry of one transform."""
    usage = definition.name
    if definition.example_args:
        usage = "{" + definition.name + ": " + _yaml(definition.example_args) + "}"
    return TransformDoc(
        definition.name, definition.summary, _arguments(definition), usage, run_examples(definition)
    )


def transform_docs() -> list[TransformDoc]:
    """Return the reference entries of every registered transform, by name."""
    return [transform_doc(REGISTRY[name]) for name in sorted(REGISTRY)]


def _text(text: str) -> str:
    """Text for a Markdown table cell (pipes escaped, as GitHub's tables need)."""
    return text.replace("|", "\\|")


def _cell(text: str) -> str:
    """A Markdown table cell in a code span."""
    return "`" + _text(text) + "`"


def markdown() -> str:
    """Return the reference as Markdown (docs/transforms.md)."""
    docs = transform_docs()
    lines = [
        "# Transform reference",
        "",
        "Generated from the code by `crmi mapping transforms --format markdown` (`make schema` rewrites",
        "this file and `mapping.schema.json`; a test fails when either is out of date). Every example was",
        "run through its transform to make this page.",
        "",
        "A field's `transforms` run in order; write one as a name (`trim`) or, with arguments, as a",
        "one-key mapping (`{phone: {region: CN}}`). An error rejects the row, unless the field's",
        '`on_error` is `"null"` (keep the row, leave the field empty, report a warning) or `fail` (stop the',
        "run). Values are cast to the target field's type after the last transform. To join several",
        "columns, give `from` a list with `combine: concat` and `sep`; `from` alone takes the first non-empty.",
        "",
        "| transform | what it does |",
        "|---|---|",
        *(f"| [`{d.name}`](#{d.name}) | {_text(d.summary)} |" for d in docs),
        "",
        "Amounts in foreign currency: see [`convert`](#convert) at the end.",
    ]
    for doc in docs:
        lines += ["", f"## {doc.name}", "", doc.summary, "", f"Usage: `{doc.usage}`"]
        if doc.arguments:
            lines += ["", "| argument | type | default | meaning |", "|---|---|---|---|"]
            for arg in doc.arguments:
                default = "required" if arg.default is None else _cell(arg.default)
                lines.append(f"| `{arg.name}` | {_text(arg.kind)} | {default} | {_text(arg.description)} |")
        if doc.examples:
            lines += ["", "| value | result |", "|---|---|"]
            lines += [
                f"| {_cell(e.value)} | {_cell(e.result) if e.ok else _text(e.result)} |" for e in doc.examples
            ]
    lines += _convert_markdown()
    return "\n".join(lines) + "\n"


# The project.yaml rates and rows the convert examples run with.
CONVERT_RATES = "currencies: {base: CNY, rates: {USD: 7.1, HKD: 0.91}, dated: {USD: {2025-01-01: 7.25}}}"
CONVERT_EXAMPLES: list[tuple[str, list[dict[str, Any]]]] = [
    (
        "{currency: cur}",
        [{"amount": "1,000", "cur": "美元"}, {"amount": "1000", "cur": "港币"}, {"amount": "1000", "cur": "人民币"},
         {"amount": "1000", "cur": "EUR"}, {"amount": "1000", "cur": None}],
    ),
    (
        "{currency: cur, date: day}",
        [{"amount": "1000", "cur": "USD", "day": "2025-03-01"}, {"amount": "1000", "cur": "USD", "day": "2024-12-31"},
         {"amount": "1000", "cur": "HKD", "day": "2024-12-31"}],
    ),
    (
        "{profile: suitecrm, currency_id: currency_id, currency: iso4217, rate: conversion_rate}",
        [{"amount": "1000", "currency_id": "-99", "iso4217": None, "conversion_rate": None},
         {"amount": "1000", "currency_id": "a1b2…", "iso4217": "USD", "conversion_rate": "0.1408"},
         {"amount": "1000", "currency_id": "c3d4…", "iso4217": "EUR", "conversion_rate": None}],
    ),
]  # fmt: skip


def convert_examples() -> list[tuple[str, list[tuple[str, str]]]]:
    """Run each convert example through the engine: (convert, [(row, what it became)])."""
    from integration.connectors.base import LOCATION, ROW_KIND, ROW_REF
    from integration.mappings.engine import map_chunk, python_records
    from integration.mappings.money import CurrenciesConfig, RateTable
    from integration.mappings.spec import compile_document
    from integration.yamlconf import parse_yaml

    config = parse_yaml(CONVERT_RATES, Path("project.yaml")).data["currencies"]
    rates = RateTable.of(CurrenciesConfig.model_validate(config))
    found = []
    for convert, rows in CONVERT_EXAMPLES:
        text = (
            "version: 1\nsource: {connector: crm, table: t}\ntarget: opportunity\nfields:\n  customer: {const: c}\n"
            f"  name: {{const: n}}\n  stage: {{const: prospecting}}\n  amount: {{from: amount, transforms: [parse_amount], convert: {convert}}}\n"
        )
        mapping = compile_document(parse_yaml(text, Path("example.yaml")), rates=rates)
        chunk = pd.DataFrame(rows)
        chunk[ROW_REF], chunk[LOCATION], chunk[ROW_KIND] = [str(i) for i in range(len(rows))], "t", "data"
        result = map_chunk(mapping, chunk)
        records = python_records(result.records).set_index(ROW_REF)
        reasons = dict(zip(result.rejects["row_ref"], result.rejects["reason"], strict=True))
        shown = []
        for i, row in enumerate(rows):
            given = ", ".join(f"{k}: {_shown(v)}" for k, v in row.items())
            if str(i) in reasons:
                shown.append((given, f"rejected: {reasons[str(i)]}"))
                continue
            record = records.loc[str(i)]
            shown.append(
                (
                    given,
                    f"amount {_result(record['amount'])} {record['currency']}, original "
                    f"{_result(record['original_amount'])} {record['original_currency']}",
                )
            )
        found.append((convert, shown))
    return found


def _convert_markdown() -> list[str]:
    from integration.mappings.spec import ConvertSpec

    lines = [
        "",
        "## convert",
        "",
        "Not a transform but a field key beside `transforms`: the amount (after its transforms) is converted",
        "into the project's base currency, rounded half up to cents. The field gets the base amount,",
        "`currency` the base currency, and on the entity's amount field `original_amount` / `original_currency`",
        "what the source gave (so the mapping must not map `currency` itself). A row with an amount whose",
        "currency, rate or date cannot be settled is rejected with the reason (or, with the field's",
        '`on_error: "null"`, loaded without the amount and reported). Operands (`currency`, `rate`,',
        "`date`, `currency_id`) are a source column or a field spec (`{from:, transforms:, default:, const:}`).",
        "",
        "Usage: `amount: {from: amount, transforms: [parse_amount], convert: {currency: cur}}`",
        "",
        "| key | meaning |",
        "|---|---|",
        *(
            f"| `{name}` | {_text(info.description or '')} |"
            for name, info in ConvertSpec.model_fields.items()
        ),
        "",
        f"The examples run with `{CONVERT_RATES}` in project.yaml.",
    ]
    for convert, shown in convert_examples():
        lines += ["", f"`convert: {convert}`", "", "| row | result |", "|---|---|"]
        lines += [f"| {_cell(row)} | {_text(result)} |" for row, result in shown]
    return lines


def step_schema() -> tuple[dict[str, Any], dict[str, Any]]:
    """Return the JSON Schema of one ``transforms`` entry and the definitions it refers to.

    Editors then complete transform names, show each one's summary, and check the arguments.
    """
    definitions: dict[str, Any] = {}
    short: list[dict[str, Any]] = []
    long: dict[str, Any] = {}
    for name in sorted(REGISTRY):
        definition = REGISTRY[name]
        args_schema = definition.args.model_json_schema(ref_template="#/$defs/{model}")
        definitions.update(args_schema.pop("$defs", {}))
        definitions[definition.args.__name__] = args_schema
        reference: dict[str, Any] = {"$ref": f"#/$defs/{definition.args.__name__}"}
        takes_no_arguments = not args_schema.get("required")
        if takes_no_arguments:
            short.append({"const": name, "description": definition.summary})
            reference = {"anyOf": [reference, {"type": "null"}]}
        long[name] = {"description": definition.summary, **reference}
    step = {
        "anyOf": [
            {"oneOf": short, "type": "string"},
            {
                "additionalProperties": False,
                "maxProperties": 1,
                "minProperties": 1,
                "properties": long,
                "type": "object",
            },
        ],
        "description": "a transform name, or a one-key mapping {name: {argument: value}}",
    }
    return step, definitions
