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

import contextlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from crm_core.entities import ENTITIES, EntityDef
from crm_core.errors import ConfigError, Problem
from integration.mappings.expressions import Expression, ExpressionError, parse
from integration.mappings.transforms import REGISTRY, Args, TransformDef
from integration.yamlconf import LocatedDocument, close_names, load_yaml, pydantic_problems

if TYPE_CHECKING:
    from integration.mappings.money import CompiledConvert, RateTable

OnError = Literal["reject", "null", "fail"]
# Validation context key: validate the keys of a field without the checks that combine them (see _validate_parts).
PARTIAL = "partial_field"
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


class HashKey(_Strict):
    """A key made from a stable hash of chosen columns: for sheets that have no id column."""

    hash: list[str] = Field(
        min_length=1,
        description="columns whose normalised text is hashed (e.g. [客户名称, 联系电话]); inserted rows do not "
        "re-key the others, duplicates are rejected",
    )


class SourceLookupSpec(_Strict):
    """A value looked up in another table or sheet of the same source (``lookup`` with ``table``)."""

    table: str = Field(description="table or sheet of the same source")
    key: str = Field(description="its column matched against the field's 'from' value")
    value: str = Field(description="its column whose value is taken")
    where: str | None = Field(default=None, description="filter on the lookup table (expression)")
    multiple: Literal["reject", "first"] = Field(
        default="reject",
        description="several matching rows with different values: reject the row, or take the smallest value",
    )


class ViaHop(_Strict):
    """One step through a link table: rows whose ``from`` equals the value give their ``to``."""

    table: str = Field(description="link table or sheet of the same source")
    from_: str = Field(alias="from", description="its column matched against the current value")
    to: str = Field(description="its column that becomes the new value")
    where: str | None = Field(default=None, description="filter on the link table, e.g. deleted = 0")
    multiple: Literal["reject", "first"] = Field(
        default="reject",
        description="several links with different values: reject the row, or take the smallest",
    )


class AggregateSpec(_Strict):
    """A value summarised over child rows of another table or sheet (order total = sum of its lines)."""

    table: str = Field(description="child table or sheet of the same source")
    key: str = Field(description="its column holding the parent's value (the field's 'from')")
    function: Literal["sum", "count", "min", "max", "avg"] = Field(
        description="how child rows are summarised"
    )
    value: str | None = Field(default=None, description="the child column summarised (not needed for count)")
    where: str | None = Field(default=None, description="filter on the child rows (expression)")

    @model_validator(mode="after")
    def _value_needed(self) -> AggregateSpec:
        if self.function != "count" and self.value is None:
            raise ValueError(f"'{self.function}' needs 'value': the child column to summarise")
        return self


class JoinedColumnSpec(_Strict):
    """A named column computed from another table or sheet of the same source (``source.lookups``)."""

    from_: str = Field(alias="from", description="column of this table whose value is looked up")
    lookup: SourceLookupSpec | None = None
    via: ViaHop | list[ViaHop] | None = None
    aggregate: AggregateSpec | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> JoinedColumnSpec:
        if sum(x is not None for x in (self.lookup, self.via, self.aggregate)) != 1:
            raise ValueError("give exactly one of 'lookup', 'via' or 'aggregate'")
        return self


class SourceSpec(_Strict):
    """Where the rows come from."""

    connector: str = Field(description="name of a source in project.yaml")
    table: str | None = Field(default=None, description="database table (or sheet)")
    sheet: str | None = Field(default=None, description="spreadsheet sheet name")
    query: str | None = Field(default=None, description="SQL SELECT instead of a table (joins, unions)")
    where: str | None = Field(
        default=None,
        description="filter (expression language, every connector; pushed down to SQL sources), e.g. deleted = 0",
    )
    key: str | list[str] | HashKey | None = Field(
        default=None, description="column(s) forming the source's record key, or {hash: [columns]}"
    )
    lookups: dict[str, JoinedColumnSpec] = Field(
        default_factory=dict,
        description="named columns looked up in other tables/sheets of the source (usable like source columns)",
    )
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
            if not self.key or isinstance(self.key, HashKey):
                raise ValueError(
                    "incremental reads need 'key' column(s) (not a hash): they tell rows at the cursor boundary apart"
                )
        return self

    @property
    def location(self) -> str:
        """Return the table or sheet name."""
        return self.table or self.sheet or "query"

    @property
    def key_columns(self) -> list[str]:
        """Return the key columns as a list (the hashed columns for a hash key)."""
        if isinstance(self.key, HashKey):
            return list(self.key.hash)
        return [self.key] if isinstance(self.key, str) else list(self.key or [])

    @property
    def hash_key(self) -> bool:
        """Return True when the key is a hash of columns (not their values)."""
        return isinstance(self.key, HashKey)

    @property
    def read_key(self) -> list[str]:
        """Return the columns a connector orders and tags rows by (none for a hash key: row numbers)."""
        return [] if self.hash_key else self.key_columns


class LookupSpec(_Strict):
    """How a reference field finds its core record (``by``), or a value in another table of the source (``table``)."""

    by: Literal["external_id", "name", "code", "id"] = Field(
        default="external_id",
        description="external_id: the source's key via the crosswalk; name: the record's name; code: sales rep "
        "code; id: the core's own record id (a target system that stores the CRM's key, e.g. U8 cDefine1)",
    )
    system: str | None = Field(
        default=None, description="crosswalk system for by: external_id (default: this source)"
    )
    table: str | None = Field(
        default=None, description="source lookup: table or sheet of the same source to look the value up in"
    )
    key: str | None = Field(
        default=None, description="source lookup: its column matched against the 'from' value"
    )
    value: str | None = Field(default=None, description="source lookup: its column whose value is taken")
    where: str | None = Field(
        default=None, description="source lookup: filter on the lookup table (expression)"
    )
    multiple: Literal["reject", "first"] = Field(
        default="reject",
        description="source lookup: several matching rows with different values: reject the row, or take the smallest",
    )
    missing: Literal["warn", "reject"] | None = Field(
        default=None,
        description="a value given whose record is not in the core: warn and load without the reference, or "
        "reject the row (default: reject when the field is required, else warn)",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> LookupSpec:
        source_keys = [k for k in ("key", "value", "where", "multiple") if k in self.model_fields_set]
        if self.table is None:
            if source_keys:
                raise ValueError(f"'{source_keys[0]}' belongs to a source lookup: add 'table'")
            return self
        core = [k for k in ("by", "system", "missing") if k in self.model_fields_set]
        if core:
            raise ValueError(
                f"'{core[0]}' finds a core record, 'table' looks up in the source: use one; to do both, "
                "follow the table with 'via' and keep 'lookup: {by: ...}'"
            )
        missing = [k for k in ("key", "value") if getattr(self, k) is None]
        if missing:
            raise ValueError(f"a source lookup needs {' and '.join(repr(m) for m in missing)}")
        return self

    @property
    def is_source(self) -> bool:
        """Return True for a lookup in another table of the source (``table`` given)."""
        return self.table is not None

    def source_lookup(self) -> SourceLookupSpec:
        """Return the source lookup this spec describes."""
        return SourceLookupSpec(
            table=str(self.table),
            key=str(self.key),
            value=str(self.value),
            where=self.where,
            multiple=self.multiple,
        )


class WhenBranch(_Strict):
    """One branch of ``when``: ``{if: condition, then: value}``, or the final ``{else: value}``."""

    if_: str | None = Field(default=None, alias="if", description="condition (expression language)")
    then: Any = Field(default=None, description="value when the condition holds; {expr: ...} to compute it")
    else_: Any = Field(default=None, alias="else", description="value when no condition holds")

    @model_validator(mode="after")
    def _shape(self) -> WhenBranch:
        if "else_" in self.model_fields_set:
            if self.if_ is not None or "then" in self.model_fields_set:
                raise ValueError("'else' stands alone: - else: value")
        elif self.if_ is None or "then" not in self.model_fields_set:
            raise ValueError("a branch is {if: condition, then: value} (or the last one: {else: value})")
        return self


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
        default=None,
        description="{by: external_id|name|code}: find the core record (reference fields); "
        "{table, key, value}: look the value up in another table/sheet of the source",
    )
    expr: str | None = Field(
        default=None, description="computed value (expression language), e.g. amount * 1.13"
    )
    when: list[WhenBranch] | None = Field(
        default=None, description="conditional value: [{if: cond, then: value}, ..., {else: value}]"
    )
    via: ViaHop | list[ViaHop] | None = Field(
        default=None, description="follow link table(s) of the source from the 'from' value"
    )
    aggregate: AggregateSpec | None = Field(
        default=None, description="summarise child rows of another table/sheet (sum, count, min, max, avg)"
    )
    convert: ConvertSpec | None = Field(
        default=None,
        description="amount fields: convert into the base currency, keeping the original amount and currency",
    )
    area_code_from: str | None = Field(
        default=None,
        description="phone fields: another field of this mapping holding the record's city (深圳, 深圳市, "
        "Shenzhen); a 7-8 digit local number written without its area code gets that city's",
    )

    @model_validator(mode="after")
    def _value_source(self, info: ValidationInfo) -> FieldSpec:
        if isinstance(info.context, dict) and info.context.get(PARTIAL):
            return self  # the valid keys of an invalid field: their own checks still run (_validate_parts)
        has_from = self.from_ is not None
        has_const = "const" in self.model_fields_set
        given = [k for k, v in (("from", has_from), ("const", has_const), ("expr", self.expr is not None),
                                ("when", self.when is not None)) if v]  # fmt: skip
        # Every problem of the field's shape at once (each is fixed on its own), in one message at the field.
        shape: list[str] = []
        if len(given) > 1:
            shape.append(f"give only one of 'from', 'const', 'expr' or 'when', not {' and '.join(given)}")
        nothing = not given and "default" not in self.model_fields_set
        if nothing:
            shape.append("give 'from' (a source column), 'const', 'expr', 'when' or 'default'")
        joins = [k for k in ("via", "aggregate") if getattr(self, k) is not None]
        if self.lookup is not None and self.lookup.is_source:
            joins.append("lookup")
        if len(joins) > 1:
            shape.append(f"give only one of {' and '.join(joins)}; chain link tables as a list under 'via'")
        if joins and not isinstance(self.from_, str) and not nothing:  # nothing given: said above
            shape.append(f"'{joins[0]}' needs 'from': the one column of this table whose value is looked up")
        if shape:
            raise ValueError("; ".join(shape))
        return self

    @property
    def joins(self) -> bool:
        """Return True when the field reads through a source lookup, link table or aggregate."""
        source_lookup = self.lookup is not None and self.lookup.is_source
        return source_lookup or self.via is not None or self.aggregate is not None

    @property
    def source_join(self) -> JoinedColumnSpec | None:
        """Return the source-side lookup/link/aggregate this field reads through, if any."""
        source_lookup = (
            self.lookup.source_lookup() if self.lookup is not None and self.lookup.is_source else None
        )
        if source_lookup is None and self.via is None and self.aggregate is None:
            return None
        return JoinedColumnSpec.model_validate(
            {"from": self.from_, "lookup": source_lookup, "via": self.via, "aggregate": self.aggregate}
        )

    @property
    def core_lookup(self) -> LookupSpec | None:
        """Return the core reference lookup, if given."""
        return self.lookup if self.lookup is not None and not self.lookup.is_source else None

    @property
    def columns(self) -> list[str]:
        """Return the source columns this field reads."""
        if self.from_ is None:
            return []
        return [self.from_] if isinstance(self.from_, str) else list(self.from_)


def _field_short_forms(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: {"from": v} if isinstance(v, str) else v for k, v in value.items()}
    return value


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
        return _field_short_forms(value)

    def field_specs(self) -> dict[str, FieldSpec]:
        """Return every field (the short form already expanded)."""
        return dict(self.fields)


@dataclass(frozen=True)
class CompiledStep:
    """A transform with its validated arguments."""

    transform: TransformDef
    args: Args


@dataclass(frozen=True)
class SourceJoin:
    """A column added to every extracted chunk from another table or sheet of the same source."""

    name: str  # the column added to the chunk
    column: str  # the column of this table whose value is looked up
    spec: JoinedColumnSpec
    hops: tuple[ViaHop | SourceLookupSpec | AggregateSpec, ...]
    wheres: tuple[Expression | None, ...]  # one per hop


@dataclass(frozen=True)
class WhenCase:
    """A branch of ``when``: its condition (None: else) and the value, a constant or an expression."""

    condition: Expression | None
    value: Any
    expression: Expression | None


@dataclass(frozen=True)
class CompiledField:
    """A field ready to run."""

    name: str
    spec: FieldSpec
    steps: tuple[CompiledStep, ...]
    lookup: LookupSpec | None
    columns: tuple[str, ...] = ()  # what the engine reads: the 'from' columns, or the joined column
    expr: Expression | None = None
    when: tuple[WhenCase, ...] = ()
    convert: CompiledConvert | None = None  # see money.py
    area_code_from: str | None = None  # the field whose city completes local phone numbers

    @property
    def computed(self) -> bool:
        """Return True when the value comes from ``expr`` or ``when``."""
        return self.expr is not None or bool(self.when)

    def expression_columns(self) -> list[str]:
        """Return the columns the field's expressions read."""
        found: list[str] = []
        expressions = [self.expr, *(c.condition for c in self.when), *(c.expression for c in self.when)]
        for expression in expressions:
            if expression is not None:
                found.extend(c for c in expression.columns if c not in found)
        return found


@dataclass(frozen=True)
class CompiledMapping:
    """A checked mapping: the spec, its file and runnable fields."""

    file: Path
    spec: MappingSpec
    entity: EntityDef
    fields: tuple[CompiledField, ...]
    where: Expression | None = None
    joins: tuple[SourceJoin, ...] = ()

    @property
    def name(self) -> str:
        """Return the mapping's name: the file name without extension."""
        return self.file.stem

    @property
    def source(self) -> str:
        """Return the project source this mapping reads."""
        return self.spec.source.connector

    def source_columns(self) -> list[str]:
        """Return every column the mapping reads (fields, expressions, key and cursor; joined columns too)."""
        columns = list(self.spec.source.key_columns)
        cursor = self.spec.source.incremental.cursor if self.spec.source.incremental else None
        if cursor is not None and cursor not in columns:
            columns.append(cursor)
        for f in self.fields:
            columns.extend(c for c in (*f.columns, *f.expression_columns()) if c not in columns)
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

    def table_columns(self) -> list[str]:
        """Return the columns the mapping needs from its own table (joined columns excluded)."""
        joined = {j.name for j in self.joins}
        needed = [c for c in self.source_columns() if c not in joined]
        needed.extend(j.column for j in self.joins if j.column not in needed)
        return needed


def _area_code_problem(
    name: str, source: str, steps: Sequence[CompiledStep], spec: MappingSpec, all_steps: bool = True
) -> str | None:
    """What is wrong with a field's ``area_code_from`` (None when nothing is).

    ``all_steps`` is False when a transform of the field was refused (its own problem is reported): it may
    be the phone transform, so its absence from ``steps`` is no problem of ``area_code_from``.
    """
    phones = [step for step in steps if step.transform.name == "phone"]
    if not phones and all_steps:
        return f"area_code_from completes phone numbers: '{name}' needs the phone transform"
    if any(getattr(step.args, "region", "CN") != "CN" for step in phones):
        return "area_code_from takes Chinese area codes: the phone transform's region must be CN"
    if source == name or source not in spec.fields:
        others = [field for field in spec.fields if field != name]
        return f"area_code_from names another field of this mapping holding the city; fields: {', '.join(others)}"
    if spec.field_specs()[source].area_code_from is not None:
        return f"'{source}' completes phone numbers itself; name the field holding the city"
    return None


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
    if raw_args and not definition.args.model_fields:
        return None, [
            doc.problem(
                (*args_path, str(key)),
                f"{name}: unknown key '{key}'; '{name}' takes no arguments (write just {name})",
                at_key=True,
            )
            for key in raw_args
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


# Columns of another table or sheet of the mapping's source: raises LookupError(message) when there is none.
TableCatalog = Callable[[str], list[str]]

JOINED_PREFIX = "_join_"  # column a field's own lookup/via/aggregate adds to the chunk: _join_<field>


def _expression_problem(
    doc: LocatedDocument, path: tuple[str | int, ...], text: str, error: ExpressionError
) -> Problem:
    """Locate an expression error at its YAML value, and at the character when the value is on one line."""
    problem = doc.problem(path, error.message)
    mark = doc.value_marks.get(path)
    if mark is None or error.offset is None or "\n" in text:
        return problem
    try:
        line = doc.file.read_text(encoding="utf-8").splitlines()[mark[0] - 1]
    except (OSError, IndexError, UnicodeDecodeError):
        return problem
    start = mark[1] - 1
    quoted = line[start : start + 1] in ("'", '"')
    body = line[start + 1 :] if quoted else line[start:]
    if not body.startswith(text[: error.offset]) and not quoted:
        return problem
    column = mark[1] + (1 if quoted else 0) + error.offset
    return Problem(problem.message, problem.file, problem.line, column, problem.path)


def _expression(
    doc: LocatedDocument,
    path: tuple[str | int, ...],
    text: str,
    columns: list[str] | None,
    problems: list[Problem],
    *,
    condition: bool = False,
) -> Expression | None:
    try:
        return parse(text, columns, condition=condition)
    except ExpressionError as exc:
        problems.append(_expression_problem(doc, path, text, exc))
        return None


def _hops(
    joined: JoinedColumnSpec,
) -> list[tuple[tuple[str | int, ...], ViaHop | SourceLookupSpec | AggregateSpec]]:
    if joined.lookup is not None:
        return [(("lookup",), joined.lookup)]
    if joined.aggregate is not None:
        return [(("aggregate",), joined.aggregate)]
    if isinstance(joined.via, list):
        return [(("via", i), hop) for i, hop in enumerate(joined.via)]
    assert joined.via is not None
    return [(("via",), joined.via)]


def _compile_join(
    doc: LocatedDocument,
    path: tuple[str | int, ...],
    name: str,
    joined: JoinedColumnSpec,
    tables: TableCatalog | None,
    problems: list[Problem],
) -> SourceJoin:
    """Check a lookup/link/aggregate against the other tables of the source (when a catalog is given)."""
    hops = _hops(joined)
    wheres: list[Expression | None] = []
    for hop_path, hop in hops:
        full = (*path, *hop_path)
        columns: list[str] | None = None
        if tables is not None:
            try:
                columns = list(tables(hop.table))
            except LookupError as exc:
                problems.append(doc.problem((*full, "table"), str(exc.args[0]) if exc.args else str(exc)))
        if columns is not None:
            named = {
                "key": getattr(hop, "key", None),
                "value": getattr(hop, "value", None),
                "from": getattr(hop, "from_", None),
                "to": getattr(hop, "to", None),
            }
            for key, column in named.items():
                if column is not None and column not in columns:
                    problems.append(
                        doc.problem(
                            (*full, key),
                            f"column '{column}' is not in {hop.table}{close_names(column, columns)}; "
                            f"columns: {', '.join(columns)}",
                        )
                    )
        wheres.append(
            _expression(doc, (*full, "where"), hop.where, columns, problems, condition=True)
            if hop.where is not None
            else None
        )
    return SourceJoin(name, joined.from_, joined, tuple(h for _, h in hops), tuple(wheres))


def _when_cases(
    doc: LocatedDocument,
    path: tuple[str | int, ...],
    branches: list[WhenBranch],
    columns: list[str] | None,
    problems: list[Problem],
) -> tuple[WhenCase, ...]:
    cases: list[WhenCase] = []
    for i, branch in enumerate(branches):
        is_else = "else_" in branch.model_fields_set
        if is_else and i != len(branches) - 1:
            problems.append(doc.problem((*path, i), "'else' must be the last branch of 'when'"))
        condition = None
        if branch.if_ is not None:
            condition = _expression(doc, (*path, i, "if"), branch.if_, columns, problems, condition=True)
        value = branch.else_ if is_else else branch.then
        expression = None
        value_path = (*path, i, "else" if is_else else "then")
        if isinstance(value, dict):
            if set(value) != {"expr"} or not isinstance(value["expr"], str):
                problems.append(
                    doc.problem(value_path, 'a computed value is {expr: "..."}; otherwise give a plain value')
                )
            else:
                expression = _expression(doc, (*value_path, "expr"), value["expr"], columns, problems)
            value = None
        elif isinstance(value, list):
            problems.append(doc.problem(value_path, "a branch's value is one value, not a list"))
        cases.append(WhenCase(condition, value, expression))
    return tuple(cases)


def compile_document(
    doc: LocatedDocument,
    *,
    sources: dict[str, list[str] | None] | None = None,
    tables: TableCatalog | None = None,
    rates: RateTable | None = None,
    entity: EntityDef | None = None,
) -> CompiledMapping:
    """Validate a parsed mapping document; ``sources`` maps source names to their columns (None: unknown).

    ``entity`` replaces the document's target entity (a sync target's document: its own field names).

    ``tables`` gives the columns of the source's other tables and sheets, to check lookups, link tables
    and aggregates against them; ``rates`` is the project's currency table (None: unknown, convert's use
    of it is checked later).
    """
    from integration.mappings import money

    spec, problems, invalid, partial = _validate_parts(doc)
    if entity is None and ("target",) not in invalid:
        entity = ENTITIES[spec.target]
    source_ok = ("source",) not in invalid
    compiled: list[CompiledField] = []
    table_columns = (sources or {}).get(spec.source.connector) if source_ok else None
    joins: list[SourceJoin] = []
    for name, joined in spec.source.lookups.items() if source_ok else ():
        # A lookup named like a column of the table replaces it (a fix sheet carries the looked-up values).
        joins.append(_compile_join(doc, ("source", "lookups", name), name, joined, tables, problems))
    where = None
    if source_ok and spec.source.where is not None:
        where = _expression(
            doc, ("source", "where"), spec.source.where, table_columns, problems, condition=True
        )
    known = None if table_columns is None else [*table_columns, *spec.source.lookups]
    written = doc.data.get("fields") if isinstance(doc.data, dict) else None
    names = list(written) if isinstance(written, dict) and ("fields",) not in invalid else list(spec.fields)
    for name in names:
        path: tuple[str | int, ...] = ("fields", name)
        target_field = entity.fields.get(name) if entity is not None else None
        if entity is not None and target_field is None:
            hint = close_names(name, entity.fields)
            problems.append(
                doc.problem(
                    path,
                    f"entity '{entity.name}' has no field '{name}'{hint}; fields: {', '.join(entity.fields)}",
                    at_key=True,
                )
            )
        if name in spec.fields:
            field_spec, bad = spec.fields[name], frozenset[str]()
        elif name in partial:
            field_spec, bad, shape = partial[name].spec, partial[name].bad, partial[name].shape
            if shape is not None:
                problems.append(doc.problem(path, shape))
        else:
            continue  # the entry is not a mapping (reported): nothing in it can be checked
        whole = name in spec.fields
        steps: list[CompiledStep] = []
        for i, step in enumerate(field_spec.transforms):
            parsed, step_problems = _parse_step(step, (*path, "transforms", i), doc)
            problems.extend(step_problems)
            if parsed:
                steps.append(parsed)
        columns: tuple[str, ...] = tuple(field_spec.columns)
        own_join = field_spec.source_join if whole else None  # an invalid field's join may be half given
        if own_join is not None:
            join = _compile_join(doc, path, JOINED_PREFIX + name, own_join, tables, problems)
            joins.append(join)
            columns = (join.name,)
        expression = None
        if field_spec.expr is not None:
            expression = _expression(doc, (*path, "expr"), field_spec.expr, known, problems)
        cases = _when_cases(doc, (*path, "when"), field_spec.when, known, problems) if field_spec.when else ()
        if entity is None or target_field is None:
            continue  # the target or field name is invalid (reported): what depends on it cannot be checked
        lookup = field_spec.core_lookup
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
        if field_spec.convert is not None and whole:
            convert, convert_problems = money.compile_convert(
                doc, path, field_spec, target_field, entity, spec, rates
            )
            problems.extend(convert_problems)
        area_code_from = field_spec.area_code_from
        if area_code_from is not None and ("fields", area_code_from) not in invalid:
            all_steps = len(steps) == len(field_spec.transforms) and "transforms" not in bad
            problem = _area_code_problem(name, area_code_from, steps, spec, all_steps)
            if problem:
                problems.append(doc.problem((*path, "area_code_from"), problem))
        if not whole:
            continue  # reported: the valid keys of the field were checked all the same
        compiled.append(
            CompiledField(
                name, field_spec, tuple(steps), lookup, columns, expression, cases, convert, area_code_from
            )
        )
    # Invalid fields are mapped all the same: they are left out of spec.fields, not out of the file.
    mapped = set(spec.fields) | {part[1] for part in invalid if part[0] == "fields" and len(part) == 2}
    if entity is not None and ("fields",) not in invalid:
        for field_def in entity.fields.values():
            if field_def.required and field_def.name not in mapped:
                problems.append(
                    doc.problem(
                        ("fields",),
                        f"required field '{field_def.name}' of {entity.name} is not mapped",
                        at_key=True,
                    )
                )
    if sources is not None and source_ok:
        all_fields = not any(part[0] in ("fields", "source") for part in invalid)  # e.g. a bad 'key' read
        partial_specs = {field: found.spec for field, found in partial.items()}
        problems.extend(_check_source(doc, spec, sources, all_fields=all_fields, partial=partial_specs))
    if problems:
        raise ConfigError(problems)
    assert entity is not None  # no problem: the target validated
    return CompiledMapping(doc.file, spec, entity, tuple(compiled), where, tuple(joins))


@dataclass(frozen=True)
class PartialField:
    """The valid keys of an invalid field (``spec``), and the keys left out because they are invalid (``bad``)."""

    spec: FieldSpec
    bad: frozenset[str]
    shape: str | None = None  # what is wrong with the combination of the valid keys ('from' or 'const'...)


# Keys of a field the shape check combines: when one is invalid, the shape of the others is not checked.
_SHAPE_KEYS = frozenset({"from", "const", "expr", "when", "default", "via", "aggregate", "lookup"})


def _partial_field(entry: Any, locs: Sequence[tuple[str, ...]]) -> PartialField | None:
    """Validate what is valid of an invalid field entry: every key but those with a problem.

    The checks that combine keys ('from' or 'const', one kind of join) are left out: when they failed, they
    are the field's reported problem. None when the entry is not a mapping (nothing in it can be read).
    """
    if not isinstance(entry, dict):
        return None
    bad = frozenset(loc[0] for loc in locs if loc)
    valid = {k: v for k, v in entry.items() if str(k) not in bad}
    try:
        spec = FieldSpec.model_validate(valid, context={PARTIAL: True})
    except ValidationError:
        return None
    shape = None
    if all(locs) and not bad & _SHAPE_KEYS:  # the shape was not checked (a key failed) and can be now
        try:
            FieldSpec.model_validate(valid)
        except ValidationError as exc:
            shape = str(exc.errors(include_url=False)[0]["msg"]).removeprefix("Value error, ")
    return PartialField(spec, bad, shape)


# Keys of source: the columns a mapping names are checked against; a problem in one hides those checks.
_SOURCE_COLUMNS_NEED = frozenset({"connector", "table", "sheet", "query", "lookups"})


def _partial_source(entry: Any, locs: Sequence[tuple[str, ...]]) -> tuple[SourceSpec, frozenset[str]] | None:
    """Validate what is valid of an invalid ``source``: every key but those with a problem.

    Only when the source still says which table is read and which columns it adds (a misspelt ``filter``
    or a bad ``incremental`` leave the fields' columns checkable); None otherwise.
    """
    bad = frozenset(loc[0] for loc in locs if loc)
    if not isinstance(entry, dict) or any(not loc for loc in locs) or bad & _SOURCE_COLUMNS_NEED:
        return None
    try:
        return SourceSpec.model_validate({k: v for k, v in entry.items() if str(k) not in bad}), bad
    except ValidationError:
        return None


def _validate_parts(
    doc: LocatedDocument,
) -> tuple[MappingSpec, list[Problem], set[tuple[str, ...]], dict[str, PartialField]]:
    """Validate a mapping document; when invalid, also return a spec made of the parts that are valid.

    A problem in one part must not hide those of another: a bad key under ``source:`` and a bad transform
    argument of a field are both reported in one pass. The parts that validate on their own (``source``,
    ``target``, each field) go into the spec, so the checks of their contents still run; the invalid ones
    are returned (``("source",)``, ``("fields", "phone")``) and what depends on them is not checked. Of an
    invalid field, the keys that are valid are returned too (a bad lookup option does not hide an unknown
    transform or source column of the same field); a source whose only problems are keys the columns do not
    depend on is kept without them, its bad keys returned as ``("source", "filter")``.
    """
    try:
        return MappingSpec.model_validate(doc.data), [], set(), {}
    except ValidationError as exc:
        problems = pydantic_problems(doc, MappingSpec, exc)
        locs = [tuple(str(part) for part in error["loc"]) for error in exc.errors(include_url=False)]
    data = doc.data
    if not isinstance(data, dict) or any(not loc for loc in locs):
        raise ConfigError(problems)
    invalid = {loc[:2] if loc[0] == "fields" and len(loc) > 1 else loc[:1] for loc in locs}
    partial: dict[str, PartialField] = {}
    parts: dict[str, Any] = {}
    for name, info in MappingSpec.model_fields.items():
        if name == "fields":
            written = {} if ("fields",) in invalid else _field_short_forms(data.get(name, {}))
            parts[name] = {
                field: FieldSpec.model_validate(value)
                for field, value in written.items()
                if ("fields", field) not in invalid
            }
            for field, value in written.items():
                if ("fields", field) in invalid:
                    field_locs = [loc[2:] for loc in locs if loc[:2] == ("fields", field)]
                    found = _partial_field(value, field_locs)
                    if found is not None:
                        partial[field] = found
        elif (
            name == "source"
            and (name,) in invalid
            and (found_source := _partial_source(data.get(name), [loc[1:] for loc in locs if loc[0] == name]))
        ):
            parts[name] = found_source[0]
            invalid.discard((name,))
            invalid.update((name, key) for key in found_source[1])
        elif (name,) in invalid or name not in data:
            parts[name] = info.get_default(call_default_factory=True)  # unused: the part is invalid
        elif name == "source":
            parts[name] = SourceSpec.model_validate(data[name])
        else:
            parts[name] = data[name]
    return MappingSpec.model_construct(**parts), problems, invalid, partial


def _check_source(
    doc: LocatedDocument,
    spec: MappingSpec,
    sources: dict[str, list[str] | None],
    *,
    all_fields: bool = True,
    partial: dict[str, FieldSpec] | None = None,
) -> list[Problem]:
    """Check the columns the mapping names against its source's; ``partial``: the valid keys of invalid fields."""
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
    for name, joined in spec.source.lookups.items():
        if joined.from_ not in known:
            problems.append(
                doc.problem(
                    ("source", "lookups", name, "from"),
                    f"column '{joined.from_}' is not in {spec.source.location}{close_names(joined.from_, columns)}",
                )
            )
    known |= set(spec.source.lookups)
    for i, key in enumerate(spec.source.key_columns):
        if key not in known:
            key_path: tuple[str | int, ...] = (
                ("source", "key")
                if isinstance(spec.source.key, str)
                else ("source", "key", "hash", i)
                if spec.source.hash_key
                else ("source", "key", i)
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
    fields = spec.field_specs()
    fields.update(partial or {})
    for field_name, field_spec in fields.items():
        raw = doc.data.get("fields", {}).get(field_name) if isinstance(doc.data, dict) else None
        for text in [field_spec.expr, *(b.if_ for b in field_spec.when or [])]:
            if text is not None:
                with contextlib.suppress(ExpressionError):  # reported where the expression is compiled
                    used.update(parse(text).columns)
        for i, column in enumerate(field_spec.columns):
            used.add(column)
            if column in known and not (field_spec.joins and column in spec.source.lookups):
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
    if spec.unmapped == "error" and all_fields:  # an invalid field may read the columns said unmapped
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
    path: Path | str,
    *,
    sources: dict[str, list[str] | None] | None = None,
    tables: TableCatalog | None = None,
    rates: RateTable | None = None,
) -> CompiledMapping:
    """Load, check and compile one mapping file; raise ConfigError listing every problem."""
    return compile_document(load_yaml(path), sources=sources, tables=tables, rates=rates)


def load_mappings(
    paths: Sequence[Path],
    *,
    sources: dict[str, list[str] | None] | None = None,
    tables: TableCatalog | None = None,
    rates: RateTable | None = None,
) -> list[CompiledMapping]:
    """Load several mapping files, collecting the problems of all of them into one ConfigError."""
    compiled: list[CompiledMapping] = []
    problems: list[Problem] = []
    for path in paths:
        try:
            compiled.append(load_mapping(path, sources=sources, tables=tables, rates=rates))
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
