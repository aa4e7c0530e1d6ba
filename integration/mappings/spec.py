"""Mapping files: the YAML schema, its semantic checks and compilation into runnable transforms.

A mapping turns rows of one source table or sheet into records of one canonical entity::

    version: 1
    source: {connector: legacy_crm, table: accounts, where: "deleted = 0", key: id}
    target: customer
    fields:
      name:        {from: name, transforms: [trim, company_name], required: true}
      credit_code: {from: sic_code, transforms: [uscc], on_error: "null"}
      phone:       {from: [phone_office, phone_alternate], transforms: [{phone: {region: CN}}]}
      owner:       {from: assigned_user_id, lookup: {by: external_id}}
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from crm_core.entities import ENTITIES, EntityDef
from crm_core.errors import ConfigError, Problem
from integration.mappings.transforms import REGISTRY, Args, TransformDef
from integration.yamlconf import LocatedDocument, close_names, load_yaml, pydantic_problems, validate_document

if TYPE_CHECKING:
    from integration.mappings.money import CompiledConvert, RateTable

OnError = Literal["reject", "null", "fail"]
TransformStep = str | dict[str, Any]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class IncrementalSpec(_Strict):
    """Read only what changed since the last committed load: rows by a cursor column, or new files."""

    cursor: str | None = Field(
        default=None, description="column that grows when a row changes, e.g. date_modified"
    )
    files: bool = Field(default=False, description="spreadsheet/CSV folders: read only new or changed files")

    @model_validator(mode="after")
    def _one_kind(self) -> IncrementalSpec:
        if (self.cursor is None) == (not self.files):
            raise ValueError("give either 'cursor: <column>' or 'files: true'")
        return self


class SourceSpec(_Strict):
    """Where the rows come from."""

    connector: str = Field(description="name of a source in project.yaml")
    table: str | None = Field(default=None, description="database table (or sheet)")
    sheet: str | None = Field(default=None, description="spreadsheet sheet name")
    query: str | None = Field(default=None, description="SQL SELECT instead of a table (joins, unions)")
    where: str | None = Field(default=None, description="SQL filter, e.g. deleted = 0")
    key: str | list[str] | None = Field(default=None, description="column(s) forming the source's record key")
    header_row: int | None = Field(default=None, ge=1, description="spreadsheets: 1-based header row")
    incremental: IncrementalSpec | None = Field(default=None, description="read only new/changed rows")
    system: str | None = Field(
        default=None,
        description="crosswalk system the rows belong to (default: this source); a fix sheet names the source "
        "its rows were rejected from, so corrected rows land under that source's keys",
    )

    @model_validator(mode="after")
    def _one_location(self) -> SourceSpec:
        if sum(x is not None for x in (self.table, self.sheet, self.query)) != 1:
            raise ValueError("give exactly one of 'table', 'sheet' or 'query'")
        if self.query is not None and self.where is not None:
            raise ValueError("'where' filters a table; put the condition into the query instead")
        if self.incremental is not None and self.incremental.cursor is not None:
            if self.sheet is not None:
                raise ValueError(
                    "a cursor needs a table or query; for spreadsheet folders use incremental: {files: true}"
                )
            if not self.key:
                raise ValueError("incremental reads need 'key': it tells rows at the cursor boundary apart")
        return self

    @property
    def location(self) -> str:
        """Return the table or sheet name."""
        return self.table or self.sheet or "query"

    @property
    def key_columns(self) -> list[str]:
        """Return the key columns as a list."""
        return [self.key] if isinstance(self.key, str) else list(self.key or [])


class LookupSpec(_Strict):
    """How a reference field finds its target record."""

    by: Literal["external_id", "name", "code"] = Field(
        default="external_id",
        description="external_id: the source's key via the crosswalk; name: the record's name; code: sales rep code",
    )
    system: str | None = Field(
        default=None, description="crosswalk system for by: external_id (default: this source)"
    )


class FieldSpec(_Strict):
    """How one canonical field gets its value."""

    from_: str | list[str] | None = Field(
        default=None, alias="from", description="source column, or a list meaning the first non-empty one"
    )
    combine: Literal["first_non_empty", "concat"] = Field(
        default="first_non_empty",
        description="with several 'from' columns: take the first non-empty, or join them",
    )
    sep: str = Field(default=" ", description="separator for combine: concat")
    const: Any = Field(default=None, description="a fixed value instead of a source column")
    default: Any = Field(default=None, description="used when the value is empty after transforms")
    required: bool = Field(default=False, description="reject the row when the value is empty")
    transforms: list[TransformStep] = Field(default_factory=list, description="applied in order")
    on_error: OnError = Field(
        default="reject", description="a transform error rejects the row, nulls the field or fails the run"
    )
    lookup: LookupSpec | None = Field(
        default=None, description="reference fields only: how to find the target"
    )
    convert: ConvertSpec | None = Field(
        default=None,
        description="amount fields: convert into the base currency, keeping the original amount and currency",
    )

    @model_validator(mode="after")
    def _value_source(self) -> FieldSpec:
        has_from = self.from_ is not None
        has_const = "const" in self.model_fields_set
        if has_from and has_const:
            raise ValueError("give either 'from' or 'const', not both")
        if not has_from and not has_const and "default" not in self.model_fields_set:
            raise ValueError("give 'from' (a source column), 'const' or 'default'")
        return self

    @property
    def columns(self) -> list[str]:
        """Return the source columns this field reads."""
        if self.from_ is None:
            return []
        return [self.from_] if isinstance(self.from_, str) else list(self.from_)


def _column_short_form(value: Any) -> Any:
    return {"from": value} if isinstance(value, str) else value


# A value convert reads: a source column, or a field spec ({from:, transforms:, default:, const:}).
Operand = Annotated[FieldSpec, BeforeValidator(_column_short_form)]


class ConvertSpec(_Strict):
    """Convert an amount into the project's base currency (see integration/mappings/money.py)."""

    currency: Operand = Field(
        description="the amount's currency: ISO code, symbol or Chinese name (USD, $, 美元); a column or field spec"
    )
    rate: Operand | None = Field(
        default=None,
        description="the row's rate (a column or field spec); without it the rate comes from "
        "currencies in project.yaml",
    )
    date: Operand | None = Field(
        default=None,
        description="the row's date: picks the rate valid on it from currencies.dated in project.yaml",
    )
    direction: Literal["multiply", "divide"] | None = Field(
        default=None,
        description="with rate: multiply (base = amount × rate, rate in base units per unit: USD 7.1) or divide "
        "(base = amount ÷ rate, rate in units per base unit: SuiteCRM's conversion_rate); default multiply",
    )
    profile: Literal["suitecrm"] | None = Field(
        default=None,
        description="suitecrm: currency_id '-99' is the base currency and rate is conversion_rate (divide)",
    )
    currency_id: Operand | None = Field(
        default=None,
        description="the value base_ids are looked for in (SuiteCRM's currency_id); default: the currency",
    )
    base_ids: list[str] | None = Field(
        default=None, description="values meaning the base currency, e.g. ['-99'] (profile: suitecrm sets it)"
    )


FieldSpec.model_rebuild()


class MappingSpec(_Strict):
    """Schema of a mapping file."""

    version: Literal[1]
    description: str | None = None
    source: SourceSpec
    target: Literal[tuple(ENTITIES)]  # type: ignore[valid-type]
    unmapped: Literal["drop", "keep", "error"] = Field(
        default="drop", description="what happens to source columns no field reads"
    )
    fields: dict[str, FieldSpec] = Field(description="target field -> spec, or just the source column name")

    @field_validator("fields", mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        """Accept ``name: column`` as the short form of ``name: {from: column}``."""
        if isinstance(value, dict):
            return {k: {"from": v} if isinstance(v, str) else v for k, v in value.items()}
        return value

    def field_specs(self) -> dict[str, FieldSpec]:
        """Return every field (the short form already expanded)."""
        return dict(self.fields)


@dataclass(frozen=True)
class CompiledStep:
    """A transform with its validated arguments."""

    transform: TransformDef
    args: Args


@dataclass(frozen=True)
class CompiledField:
    """A field ready to run."""

    name: str
    spec: FieldSpec
    steps: tuple[CompiledStep, ...]
    lookup: LookupSpec | None
    convert: CompiledConvert | None = None  # see money.py


@dataclass(frozen=True)
class CompiledMapping:
    """A checked mapping: the spec, its file and runnable fields."""

    file: Path
    spec: MappingSpec
    entity: EntityDef
    fields: tuple[CompiledField, ...]

    @property
    def name(self) -> str:
        """Return the mapping's name: the file name without extension."""
        return self.file.stem

    @property
    def source(self) -> str:
        """Return the project source this mapping reads."""
        return self.spec.source.connector

    def source_columns(self) -> list[str]:
        """Return every source column the mapping reads (fields, key and cursor)."""
        columns = list(self.spec.source.key_columns)
        cursor = self.spec.source.incremental.cursor if self.spec.source.incremental else None
        if cursor is not None and cursor not in columns:
            columns.append(cursor)
        for f in self.fields:
            columns.extend(c for c in f.spec.columns if c not in columns)
            if f.convert is not None:
                columns.extend(c for c in f.convert.columns() if c not in columns)
        return columns

    def written_fields(self) -> list[str]:
        """Return the target fields the mapping fills: its own and those a convert writes (currency…)."""
        written = [f.name for f in self.fields]
        for f in self.fields:
            if f.convert is not None:
                written.extend(name for name in f.convert.writes if name not in written)
        return written


def _parse_step(
    step: TransformStep, path: tuple[str | int, ...], doc: LocatedDocument
) -> tuple[CompiledStep | None, list[Problem]]:
    raw_args: Any
    if isinstance(step, str):
        name, raw_args, args_path = step, {}, path
    elif isinstance(step, dict) and len(step) == 1:
        name, raw_args = next(iter(step.items()))
        args_path = (*path, name)
        if raw_args is None:
            raw_args = {}
        if not isinstance(raw_args, dict):
            return None, [
                doc.problem(
                    args_path, f"arguments of '{name}' must be a mapping like {{{name}: {{arg: value}}}}"
                )
            ]
    else:
        return None, [
            doc.problem(path, "a transform is a name (trim) or a one-key mapping ({phone: {region: CN}})")
        ]
    definition = REGISTRY.get(name)
    if definition is None:
        hint = close_names(name, REGISTRY) or f"; known transforms: {', '.join(sorted(REGISTRY))}"
        return None, [
            doc.problem(
                path if isinstance(step, str) else (*path, name),
                f"unknown transform '{name}'{hint}",
                at_key=not isinstance(step, str),
            )
        ]
    try:
        args = definition.args.model_validate(raw_args)
    except ValidationError as exc:
        sub = LocatedDocument(raw_args, doc.file)
        sub.value_marks = {
            p[len(args_path) :]: m for p, m in doc.value_marks.items() if p[: len(args_path)] == args_path
        }
        sub.key_marks = {
            p[len(args_path) :]: m for p, m in doc.key_marks.items() if p[: len(args_path)] == args_path
        }
        problems = []
        for problem in pydantic_problems(sub, definition.args, exc):
            inner = problem.path
            full = ".".join(p for p in (_fmt(args_path), inner) if p)
            problems.append(
                Problem(f"{name}: {problem.message}", problem.file, problem.line, problem.col, full)
            )
        if not problems or problems[0].line is None:
            problems = [doc.problem(args_path, f"{name}: {p.message}") for p in problems]
        return None, problems
    return CompiledStep(definition, args), []


def _fmt(path: Sequence[str | int]) -> str:
    from integration.yamlconf import format_path

    return format_path(path)


def compile_document(
    doc: LocatedDocument,
    *,
    sources: dict[str, list[str] | None] | None = None,
    rates: RateTable | None = None,
) -> CompiledMapping:
    """Validate a parsed mapping document; ``sources`` maps source names to their columns (None: unknown),
    ``rates`` is the project's currency table (None: unknown, convert's use of it is checked later)."""
    from integration.mappings import money

    spec = validate_document(doc, MappingSpec)
    entity = ENTITIES[spec.target]
    problems: list[Problem] = []
    compiled: list[CompiledField] = []
    for name, field_spec in spec.field_specs().items():
        path: tuple[str | int, ...] = ("fields", name)
        target_field = entity.fields.get(name)
        if target_field is None:
            hint = close_names(name, entity.fields)
            problems.append(
                doc.problem(
                    path,
                    f"entity '{entity.name}' has no field '{name}'{hint}; fields: {', '.join(entity.fields)}",
                    at_key=True,
                )
            )
            continue
        steps: list[CompiledStep] = []
        for i, step in enumerate(field_spec.transforms):
            parsed, step_problems = _parse_step(step, (*path, "transforms", i), doc)
            problems.extend(step_problems)
            if parsed:
                steps.append(parsed)
        lookup = field_spec.lookup
        if lookup is not None and target_field.references is None:
            problems.append(
                doc.problem(
                    (*path, "lookup"),
                    f"'{name}' is not a reference field; only {', '.join(entity.references) or 'none'} take a lookup",
                    at_key=True,
                )
            )
        if target_field.references and lookup is None:
            lookup = LookupSpec()
        if lookup and lookup.by == "code" and target_field.references != "sales_rep":
            problems.append(doc.problem((*path, "lookup", "by"), "lookup by code works for sales reps only"))
        convert = None
        if field_spec.convert is not None:
            convert, convert_problems = money.compile_convert(
                doc, path, field_spec, target_field, entity, spec, rates
            )
            problems.extend(convert_problems)
        compiled.append(CompiledField(name, field_spec, tuple(steps), lookup, convert))
    mapped = set(spec.fields)
    for field_def in entity.fields.values():
        if field_def.required and field_def.name not in mapped:
            problems.append(
                doc.problem(
                    ("fields",),
                    f"required field '{field_def.name}' of {entity.name} is not mapped",
                    at_key=True,
                )
            )
    if sources is not None:
        problems.extend(_check_source(doc, spec, sources))
    if problems:
        raise ConfigError(problems)
    return CompiledMapping(doc.file, spec, entity, tuple(compiled))


def _check_source(
    doc: LocatedDocument, spec: MappingSpec, sources: dict[str, list[str] | None]
) -> list[Problem]:
    name = spec.source.connector
    if name not in sources:
        return [
            doc.problem(
                ("source", "connector"),
                f"unknown source '{name}'{close_names(name, sources)}; project sources: {', '.join(sources)}",
            )
        ]
    system = spec.source.system
    if system is not None and system not in sources:
        return [doc.problem(("source", "system"), f"unknown source '{system}'{close_names(system, sources)}")]
    columns = sources[name]
    if columns is None:
        return []
    problems = []
    known = set(columns)
    for i, key in enumerate(spec.source.key_columns):
        if key not in known:
            key_path: tuple[str | int, ...] = (
                ("source", "key") if isinstance(spec.source.key, str) else ("source", "key", i)
            )
            problems.append(
                doc.problem(
                    key_path, f"column '{key}' is not in {spec.source.location}{close_names(key, columns)}"
                )
            )
    cursor = spec.source.incremental.cursor if spec.source.incremental else None
    if cursor is not None and cursor not in known:
        problems.append(
            doc.problem(
                ("source", "incremental", "cursor"),
                f"column '{cursor}' is not in {spec.source.location}{close_names(cursor, columns)}",
            )
        )
    used: set[str] = set(spec.source.key_columns)
    for field_name, field_spec in spec.field_specs().items():
        raw = doc.data.get("fields", {}).get(field_name) if isinstance(doc.data, dict) else None
        for i, column in enumerate(field_spec.columns):
            used.add(column)
            if column in known:
                continue
            if isinstance(raw, str):
                path: tuple[str | int, ...] = ("fields", field_name)
            elif isinstance(field_spec.from_, list):
                path = ("fields", field_name, "from", i)
            else:
                path = ("fields", field_name, "from")
            problems.append(
                doc.problem(
                    path, f"column '{column}' is not in {spec.source.location}{close_names(column, columns)}"
                )
            )
    from integration.mappings.money import operand_column_problems

    problems.extend(operand_column_problems(doc, spec, known, columns, used))
    if spec.unmapped == "error":
        extra = [c for c in columns if c not in used]
        if extra:
            problems.append(
                doc.problem(
                    ("unmapped",),
                    f"unmapped source columns: {', '.join(extra)} (map them or set unmapped: drop)",
                )
            )
    return problems


def load_mapping(
    path: Path | str, *, sources: dict[str, list[str] | None] | None = None, rates: RateTable | None = None
) -> CompiledMapping:
    """Load, check and compile one mapping file; raise ConfigError listing every problem."""
    return compile_document(load_yaml(path), sources=sources, rates=rates)


def load_mappings(
    paths: Sequence[Path],
    *,
    sources: dict[str, list[str] | None] | None = None,
    rates: RateTable | None = None,
) -> list[CompiledMapping]:
    """Load several mapping files, collecting the problems of all of them into one ConfigError."""
    compiled: list[CompiledMapping] = []
    problems: list[Problem] = []
    for path in paths:
        try:
            compiled.append(load_mapping(path, sources=sources, rates=rates))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return compiled


def json_schema() -> str:
    """Return the JSON Schema of mapping files (for editor completion), as stable text."""
    from integration.mappings.reference import step_schema

    schema = MappingSpec.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "crm-integration mapping file"
    # Transforms and field names are checked in code (they depend on the registry and the target); the
    # schema spells them out too, so editors complete them and flag mistakes while the file is written.
    step, definitions = step_schema()
    schema["$defs"].update(definitions)
    schema["$defs"]["FieldSpec"]["properties"]["transforms"]["items"] = step
    for name, operand in schema["$defs"]["ConvertSpec"]["properties"].items():
        if name in ("currency", "rate", "date", "currency_id"):  # a column, short for {from: column}
            choices = [{"$ref": "#/$defs/FieldSpec"}, {"type": "string", "description": "a source column"}]
            operand.pop("$ref", None)
            operand["anyOf"] = choices + ([{"type": "null"}] if "default" in operand else [])
    schema["properties"]["fields"]["additionalProperties"] = {
        "anyOf": [
            {"$ref": "#/$defs/FieldSpec"},
            {"description": "the source column (short for {from: column})", "type": "string"},
        ]
    }
    schema["allOf"] = [
        {
            "if": {"properties": {"target": {"const": entity.name}}, "required": ["target"]},
            "then": {
                "properties": {
                    "fields": {
                        "propertyNames": {"enum": list(entity.fields)},
                        "required": [f.name for f in entity.fields.values() if f.required],
                    }
                }
            },
        }
        for entity in ENTITIES.values()
    ]
    return json.dumps(schema, ensure_ascii=False, indent=2, sort_keys=True) + "\n"
