"""Running a compiled mapping over extracted chunks: every row is either mapped or rejected with a reason."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import pandas as pd

from crm_core.entities import FieldDef
from crm_core.errors import MappingError
from integration.connectors.base import LOCATION, ROW_KIND, ROW_REF
from integration.mappings.spec import CompiledField, CompiledMapping
from integration.mappings.transforms import (
    DateArgs,
    TransformFailure,
    _as_text,
    _isnull,
    clean_text,
    lookup,
    parse_datetime_value,
    per_value,
)

# Columns of mapped records besides the entity's fields.
EXTERNAL_KEY = "_external_key"
SOURCE = "_source"
MAPPING = "_mapping"
RECORD_META = (EXTERNAL_KEY, ROW_REF, LOCATION, SOURCE, MAPPING)

REJECT_COLUMNS = ["source", "entity", "location", "row_ref", "field", "value", "rule", "reason", "severity"]


@dataclass
class MappingResult:
    """Mapped records (entity fields + record metadata) and the rejects, one row per problem."""

    records: pd.DataFrame
    rejects: pd.DataFrame
    rows_read: int

    @classmethod
    def concat(cls, parts: Iterable[MappingResult]) -> MappingResult:
        """Join the results of several chunks."""
        items = list(parts)
        if not items:
            return cls(pd.DataFrame(), empty_rejects(), 0)
        return cls(
            pd.concat([p.records for p in items], ignore_index=True),
            pd.concat([p.rejects for p in items], ignore_index=True),
            sum(p.rows_read for p in items),
        )


def empty_rejects() -> pd.DataFrame:
    """Return an empty rejects frame with the standard columns."""
    return pd.DataFrame({c: pd.Series(dtype=object) for c in REJECT_COLUMNS})


def _blank(value: Any) -> bool:
    return _isnull(value) or (isinstance(value, str) and not value.strip())


def _concat(frame: pd.DataFrame, columns: list[str], sep: str) -> pd.Series:
    def join(row: tuple[Any, ...]) -> str | None:
        parts = [clean_text(_as_text(v)) for v in row if not _blank(v)]
        return sep.join(parts) if parts else None

    return pd.Series(
        [join(r) for r in frame[columns].itertuples(index=False)], index=frame.index, dtype=object
    )


def blank_mask(values: pd.Series) -> pd.Series:
    """Return True where a value is missing or only whitespace (vectorized)."""
    mask = values.isna()
    if values.dtype == object or pd.api.types.is_string_dtype(values.dtype):
        mask = mask | values.astype(str).str.strip().eq("")
    return mask


def null_where(values: pd.Series, condition: pd.Series) -> pd.Series:
    """Return a copy of ``values`` (object dtype) with None where ``condition`` holds."""
    out = values.astype(object).copy()
    out[condition] = None
    return out


def _first_non_empty(frame: pd.DataFrame, columns: list[str]) -> pd.Series:
    result = null_where(frame[columns[0]], blank_mask(frame[columns[0]]))
    for column in columns[1:]:
        candidate = null_where(frame[column], blank_mask(frame[column]))
        result = result.where(result.notna(), candidate)
    return result


def _key_text(value: Any) -> str | None:
    return clean_text(_as_text(value)) or None


def cast_value(value: Any, target: FieldDef) -> Any:
    """Convert a transformed value to the target field's type; raise TransformFailure when it cannot be."""
    kind = target.kind
    if kind == "str":
        text = clean_text(_as_text(value))
        if target.max_length and len(text) > target.max_length:
            raise TransformFailure(f"longer than {target.max_length} characters ({len(text)})")
        return text or None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise TransformFailure(f"'{value}' is not true/false; add the 'bool' transform")
    if kind == "int":
        try:
            number = Decimal(str(value).strip())
        except InvalidOperation:
            raise TransformFailure(f"'{value}' is not a whole number") from None
        if number != number.to_integral_value():
            raise TransformFailure(f"'{value}' is not a whole number")
        return int(number)
    if kind == "decimal":
        if isinstance(value, Decimal):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return Decimal(str(value))
        try:
            return Decimal(str(value).strip())
        except InvalidOperation:
            raise TransformFailure(f"'{value}' is not a number; add the 'parse_amount' transform") from None
    if kind == "date":
        if isinstance(value, dt.datetime):
            return value.date()
        if isinstance(value, dt.date):
            return value
        return parse_datetime_value(value, DateArgs()).date()
    if kind == "datetime":
        if isinstance(value, dt.datetime):
            return value
        return parse_datetime_value(value, DateArgs())
    raise AssertionError(kind)


class _Outcome:
    """Collects per-row problems while a chunk is mapped (as frames, not row by row)."""

    def __init__(self, mapping: CompiledMapping, chunk: pd.DataFrame) -> None:
        self.mapping = mapping
        self.chunk = chunk
        self.rejected = pd.Series(False, index=chunk.index)
        self.parts: list[pd.DataFrame] = []

    def add(
        self,
        mask: pd.Series,
        field: str | None,
        values: pd.Series | None,
        reasons: pd.Series | str,
        rule: str,
        severity: str = "error",
    ) -> None:
        """Record a problem for the rows in ``mask`` (subtotal rows are reported once, as such)."""
        if rule != "subtotal":
            mask = mask & (self.chunk[ROW_KIND] != "subtotal")
        if not mask.any():
            return
        if severity == "error":
            self.rejected |= mask
        rows = self.chunk.loc[mask]
        raw = (
            values.loc[mask]
            if values is not None
            else pd.Series([None] * len(rows), index=rows.index, dtype=object)
        )
        self.parts.append(
            pd.DataFrame(
                {
                    "source": self.mapping.source,
                    "entity": self.mapping.entity.name,
                    "location": rows[LOCATION].astype(str),
                    "row_ref": rows[ROW_REF].astype(str),
                    "field": field,
                    "value": null_where(raw.astype(str), raw.isna()),
                    "rule": rule,
                    "reason": reasons if isinstance(reasons, str) else reasons.loc[mask],
                    "severity": severity,
                },
                columns=REJECT_COLUMNS,
            )
        )

    def rejects(self) -> pd.DataFrame:
        """Return every problem recorded, in the order found."""
        return pd.concat(self.parts, ignore_index=True) if self.parts else empty_rejects()


def _run_field(field: CompiledField, target: FieldDef, chunk: pd.DataFrame, outcome: _Outcome) -> pd.Series:
    spec = field.spec
    if spec.from_ is not None and spec.combine == "concat":
        raw = _concat(chunk, spec.columns, spec.sep)
    elif spec.from_ is not None:
        raw = _first_non_empty(chunk, spec.columns)
    else:
        raw = pd.Series([spec.const] * len(chunk), index=chunk.index, dtype=object)
    values = raw
    failed = pd.Series(False, index=chunk.index)
    reasons = pd.Series([None] * len(chunk), index=chunk.index, dtype=object)
    for step in field.steps:
        values, errors = step.transform.func(null_where(values, failed), step.args)
        if errors is not None:
            new = errors.notna() & ~failed
            reasons = reasons.where(~new, step.transform.name + ": " + errors.astype(str))
            failed |= new
    # Cast once per distinct value and map back: the row count never reaches Python.
    castable = values[~(failed | blank_mask(values))]
    cast_ok: dict[Any, Any] = {}
    cast_errors: dict[Any, str] = {}
    for value in pd.unique(castable):
        try:
            cast_ok[value] = cast_value(value, target)
        except TransformFailure as exc:
            cast_errors[value] = str(exc)
    result = lookup(castable, cast_ok).reindex(chunk.index)
    result = null_where(result, result.isna())
    if cast_errors:
        cast_failed = lookup(castable, cast_errors).reindex(chunk.index)
        new = cast_failed.notna()
        reasons = reasons.where(~new, cast_failed)
        failed = failed | new
    if failed.any():
        if spec.on_error == "fail":
            index = failed[failed].index[0]
            raise MappingError(
                f"{outcome.mapping.file}: field '{field.name}' failed on {chunk.at[index, LOCATION]!s} row "
                f"{chunk.at[index, ROW_REF]!s} (value {raw.at[index]!r}): {reasons.at[index]!s} (on_error: fail)"
            )
        severity = "error" if spec.on_error == "reject" else "warn"
        outcome.add(failed, field.name, raw, reasons, rule="mapping", severity=severity)
    if "default" in spec.model_fields_set and spec.default is not None:
        default = cast_value(spec.default, target)
        result = result.where(result.notna() | failed, default)
    if spec.required or target.required:
        empty = result.isna() & ~failed
        outcome.add(empty, field.name, raw, f"required field '{field.name}' is empty", rule="required")
    return result


def map_chunk(mapping: CompiledMapping, chunk: pd.DataFrame) -> MappingResult:
    """Map one extracted chunk; rows with errors go to the rejects instead of the records."""
    missing = [c for c in mapping.source_columns() if c not in chunk.columns]
    if missing:
        raise MappingError(
            f"{mapping.file}: column(s) {', '.join(missing)} no longer exist in "
            f"{mapping.source}.{mapping.spec.source.location}; update the mapping (crmi mapping check)"
        )
    chunk = chunk.reset_index(drop=True)
    outcome = _Outcome(mapping, chunk)
    subtotal = chunk[ROW_KIND] == "subtotal"
    outcome.add(subtotal, None, None, "subtotal/total row, not a record", rule="subtotal")
    data = chunk
    columns: dict[str, pd.Series] = {}
    for field in mapping.fields:
        columns[field.name] = _run_field(field, mapping.entity.fields[field.name], data, outcome)
    key_columns = mapping.spec.source.key_columns
    if key_columns:
        parts = [per_value(null_where(data[c], blank_mask(data[c])), _key_text)[0] for c in key_columns]
        key = parts[0]
        for part in parts[1:]:
            key = key.where(key.isna() | part.isna(), key + "|" + part)
            key = null_where(key, part.isna())
        outcome.add(
            key.isna() & ~subtotal, None, None, f"empty key column(s) {', '.join(key_columns)}", rule="key"
        )
    else:
        key = data[LOCATION].astype(str) + ":" + data[ROW_REF].astype(str)
    records = pd.DataFrame(columns, index=data.index)
    if mapping.spec.unmapped == "keep":
        used = set(mapping.source_columns())
        for column in data.columns:
            if column not in used and not column.startswith("_"):
                records[f"_extra_{column}"] = data[column]
    records[EXTERNAL_KEY] = key
    records[ROW_REF] = data[ROW_REF]
    records[LOCATION] = data[LOCATION]
    records[SOURCE] = mapping.source
    records[MAPPING] = mapping.name
    keep = ~outcome.rejected
    rejects = outcome.rejects()
    return MappingResult(records.loc[keep].reset_index(drop=True), rejects, len(chunk))


def map_chunks(mapping: CompiledMapping, chunks: Iterable[pd.DataFrame]) -> MappingResult:
    """Map every chunk, then reject later rows whose external key repeats an earlier one."""
    result = MappingResult.concat(map_chunk(mapping, chunk) for chunk in chunks)
    if result.records.empty:
        if result.records.columns.empty:
            result.records = pd.DataFrame(columns=[*(f.name for f in mapping.fields), *RECORD_META])
        return result
    duplicated = result.records[EXTERNAL_KEY].duplicated(keep="first")
    if duplicated.any():
        first_row = result.records.drop_duplicates(EXTERNAL_KEY).set_index(EXTERNAL_KEY)[ROW_REF]
        dupes = result.records.loc[duplicated]
        extra = pd.DataFrame(
            {
                "source": mapping.source,
                "entity": mapping.entity.name,
                "location": dupes[LOCATION],
                "row_ref": dupes[ROW_REF],
                "field": None,
                "value": dupes[EXTERNAL_KEY],
                "rule": "duplicate_key",
                "reason": "duplicate source key (first seen on row "
                + dupes[EXTERNAL_KEY].map(first_row).astype(str)
                + ")",
                "severity": "error",
            }
        )
        result.rejects = pd.concat([result.rejects, extra], ignore_index=True)
        result.records = result.records.loc[~duplicated].reset_index(drop=True)
    return result
