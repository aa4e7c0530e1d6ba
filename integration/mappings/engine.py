"""Running a compiled mapping over extracted chunks: every row is either mapped or rejected with a reason."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from crm_core.entities import FieldDef
from crm_core.errors import ConfigError, MappingError
from integration import geo
from integration.connectors.base import LOCATION, ROW_KIND, ROW_REF
from integration.mappings import columnar, money
from integration.mappings.expressions import ExpressionError, evaluate, float_to_decimal, to_arrow, to_text
from integration.mappings.joins import JOIN_PROBLEM
from integration.mappings.spec import CompiledField, CompiledMapping
from integration.mappings.transforms import (
    DateArgs,
    TransformFailure,
    _as_text,
    _isnull,
    clean_text,
    first_phone,
    parse_datetime_value,
    per_value,
    phone_e164,
    with_area_code,
)

# Columns of mapped records besides the entity's fields.
EXTERNAL_KEY = "_external_key"
SOURCE = "_source"
MAPPING = "_mapping"
RECORD_META = (EXTERNAL_KEY, ROW_REF, LOCATION, SOURCE, MAPPING)
# A fix sheet's column (and its records'): the key of the source row it corrects (crm_core.loading.SOURCE_KEY).
SOURCE_KEY = "_source_key"

REJECT_COLUMNS = ["source", "entity", "location", "row_ref", "field", "value", "rule", "reason", "severity"]
# What a reject also records of its row, when known: its crosswalk key (None when the row has none, or when
# the key belongs to another row: a repeated key) and its mapped amount (see crm_core.models.Reject).
REJECT_ROW_COLUMNS = ["external_key", "amount"]
_ROW = "_row"  # the chunk row of a reject while the chunk is mapped


@dataclass
class MappingResult:
    """Mapped records (entity fields + record metadata) and the rejects, one row per problem."""

    records: pd.DataFrame
    rejects: pd.DataFrame
    rows_read: int
    # The entity's amount summed over the rows rejected while mapping (subtotal rows aside), where it could
    # be read: reconciliation counts the money of every row read, not only of the rows that loaded.
    amount_rejected: Decimal | None = None

    @classmethod
    def concat(cls, parts: Iterable[MappingResult]) -> MappingResult:
        """Join the results of several chunks."""
        items = list(parts)
        if not items:
            return cls(pd.DataFrame(), empty_rejects(), 0)
        frames = [p.records for p in items]
        if len({tuple(map(str, f.dtypes)) for f in frames}) > 1:
            # A column that is Arrow in one chunk and objects in another (or decimals of different
            # scales) would mix pd.NA and None: join such chunks as plain Python objects.
            frames = [python_records(f) for f in frames]
        amounts = [p.amount_rejected for p in items if p.amount_rejected is not None]
        return cls(
            pd.concat(frames, ignore_index=True),
            pd.concat([p.rejects for p in items], ignore_index=True),
            sum(p.rows_read for p in items),
            sum(amounts, Decimal(0)) if amounts else None,
        )


def empty_rejects() -> pd.DataFrame:
    """Return an empty rejects frame with the standard columns."""
    return pd.DataFrame({c: pd.Series(dtype=object) for c in REJECT_COLUMNS})


def _blank(value: Any) -> bool:
    return _isnull(value) or (isinstance(value, str) and not value.strip())


def _concat(frame: Mapping[str, pd.Series], columns: list[str], sep: str) -> pd.Series:
    def join(row: tuple[Any, ...]) -> str | None:
        parts = [clean_text(_as_text(v)) for v in row if not _blank(v)]
        return sep.join(parts) if parts else None

    series = [frame[c].astype(object) for c in columns]
    return pd.Series([join(r) for r in zip(*series, strict=True)], index=series[0].index, dtype=object)


def blank_mask(values: pd.Series) -> pd.Series:
    """Return True where a value is missing or only whitespace (vectorized)."""
    if columnar.is_text(values):
        array = pa.array(values.array)
        blank = pc.or_kleene(pc.is_null(array), pc.equal(pc.utf8_trim(array, columnar.WHITESPACE), ""))
        return pd.Series(columnar.flags(blank).to_numpy(zero_copy_only=False), index=values.index)
    mask = values.isna()
    if values.dtype == object or pd.api.types.is_string_dtype(values.dtype):
        mask = mask | values.astype(str).str.strip().eq("")
    return mask


def null_where(values: pd.Series, condition: pd.Series) -> pd.Series:
    """Return a copy of ``values`` with None where ``condition`` holds (text stays Arrow, the rest object)."""
    if columnar.is_arrow(values):
        nulled = columnar.null_where_array(pa.array(values.array), pa.array(condition.to_numpy(dtype=bool)))
        return columnar.arrow_series(nulled, values.index)
    out = values.astype(object).copy()
    out[condition] = None
    return out


def _first_non_empty(frame: Mapping[str, pd.Series], columns: list[str]) -> pd.Series:
    candidates = [frame[c] for c in columns]
    if all(columnar.is_text(c) for c in candidates):
        arrays = [
            columnar.null_where_array(pa.array(c.array), pa.array(blank_mask(c).to_numpy()))
            for c in candidates
        ]
        return columnar.arrow_series(
            pc.coalesce(*arrays) if len(arrays) > 1 else arrays[0], candidates[0].index
        )
    result = null_where(candidates[0].astype(object), blank_mask(candidates[0]))
    for candidate in candidates[1:]:
        result = result.where(result.notna(), null_where(candidate.astype(object), blank_mask(candidate)))
    return result


def _key_text(value: Any) -> str | None:
    return clean_text(_as_text(value)) or None


def _key_part(values: pd.Series) -> pd.Series:
    """Return one key column as cleaned text (missing where empty)."""
    if columnar.is_text(values):
        array = columnar.empty_to_null(columnar.clean_text_array(pa.array(values.array)))
        return columnar.arrow_series(array, values.index)
    return per_value(null_where(values, blank_mask(values)), _key_text)[0]


def _external_key(data: Mapping[str, pd.Series], key_columns: list[str], index: pd.Index) -> pd.Series:
    """Join the key columns with '|'; the key is missing when any part is."""
    parts = [_key_part(data[c]) for c in key_columns]
    if all(columnar.is_text(p) for p in parts):
        arrays = [pa.array(p.array) for p in parts]
        joined = arrays[0] if len(arrays) == 1 else pc.binary_join_element_wise(*arrays, "|")
        return columnar.arrow_series(joined, index)
    key = parts[0].astype(object)
    for part in parts[1:]:
        part = part.astype(object)
        key = key.where(key.isna() | part.isna(), key + "|" + part)
        key = null_where(key, part.isna())
    return key


HASH_SEPARATOR = "\x1f"  # between the parts of a hash key: a character no cell holds


def hash_key(data: Mapping[str, pd.Series], columns: list[str], index: pd.Index) -> pd.Series:
    """Return a stable key per row: a hash of the columns' normalised text (missing where all are empty).

    Normalised: NFKC, whitespace collapsed and trimmed, case-folded, whole numbers without ``.0``; so
    ``ＡＢＣ公司 `` and ``abc公司`` key alike. The hash is BLAKE2b (20 hex digits), the same in every run and
    on every machine, and does not depend on where the row sits in the sheet.
    """
    parts = []
    for column in columns:
        part = _key_part(data[column])
        text = pa.array(part.array) if columnar.is_arrow(part) else pa.array(part.astype(object), pa.string())
        parts.append(pc.utf8_lower(columnar.nfkc_clean_array(text)))
    empty = np.ones(len(index), dtype=bool)
    for part in parts:
        empty &= np.asarray(pc.is_null(part).to_numpy(zero_copy_only=False), dtype=bool)
    joined = pc.binary_join_element_wise(
        *parts, HASH_SEPARATOR, null_handling="replace", null_replacement=""
    ).to_pylist()
    digests = [
        None if skip else hashlib.blake2b(text.encode("utf-8"), digest_size=10).hexdigest()
        for text, skip in zip(joined, empty, strict=True)
    ]
    return pd.Series(digests, index=index, dtype=object)


def arrow_text_columns(chunk: pd.DataFrame, columns: Iterable[str]) -> dict[str, pd.Series]:
    """Return the given columns of ``chunk``, all-text ones as Arrow text (the kernels' input)."""
    selected: dict[str, pd.Series] = {}
    for column in columns:
        array = columnar.text_array(chunk[column])
        selected[column] = chunk[column] if array is None else columnar.arrow_series(array, chunk.index)
    return selected


def python_values(values: pd.Series) -> pd.Series:
    """Return an Arrow-backed Series as Python objects, with None for missing values."""
    return pd.Series(values.array.to_numpy(dtype=object, na_value=None), index=values.index, dtype=object)


def python_records(records: pd.DataFrame) -> pd.DataFrame:
    """Return ``records`` with Arrow text columns as plain Python objects (None for missing), for the loaders."""
    converted = {
        column: python_values(records[column])
        for column in records.columns
        if columnar.is_arrow(records[column])
    }
    return records.assign(**converted) if converted else records


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
        self.subtotal = chunk[ROW_KIND].isin(("subtotal",))  # hash lookup: cheaper than == on objects
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
            mask = mask & ~self.subtotal
        if not mask.any():
            return
        if severity == "error":
            self.rejected |= mask
        selected = mask.to_numpy(dtype=bool)
        count = int(selected.sum())
        if values is None:
            raw = np.full(count, None, dtype=object)
        else:
            picked = values[selected]
            raw = picked.astype(str).to_numpy(dtype=object)
            raw[picked.isna().to_numpy()] = None
        self.parts.append(
            pd.DataFrame(
                {
                    "source": self.mapping.source,
                    "entity": self.mapping.entity.name,
                    "location": self.chunk[LOCATION].to_numpy()[selected].astype(str).astype(object),
                    "row_ref": self.chunk[ROW_REF].to_numpy()[selected].astype(str).astype(object),
                    "field": field,
                    "value": raw,
                    "rule": rule,
                    "reason": reasons
                    if isinstance(reasons, str)
                    else reasons.to_numpy(dtype=object)[selected],
                    "severity": severity,
                    _ROW: self.chunk.index.to_numpy()[selected],
                },
                columns=[*REJECT_COLUMNS, _ROW],
            )
        )

    def rejects(self) -> pd.DataFrame:
        """Return every problem recorded, in the order found."""
        return pd.concat(self.parts, ignore_index=True) if self.parts else empty_rejects()


def _cast(values: pd.Series, target: FieldDef, clean: bool = False) -> tuple[pd.Series, pd.Series | None]:
    """Convert transformed values to the target field's type; return them and the errors (None if none).

    ``clean`` says the values are already in ``clean_text`` form (the last transform guarantees it).
    """
    if target.kind == "str" and columnar.is_text(values):
        array = pa.array(values.array)
        if not clean:
            array = columnar.clean_text_array(array)
        errors = None
        if target.max_length:
            lengths = pc.utf8_length(array)
            too_long = columnar.flags(pc.greater(lengths, target.max_length))
            if pc.any(too_long).as_py():
                reasons = pc.binary_join_element_wise(
                    f"longer than {target.max_length} characters (",
                    pc.cast(lengths, pa.string()),
                    ")",
                    "",
                )
                errors = pd.Series(
                    pc.if_else(too_long, reasons, pa.scalar(None, pa.string())).to_numpy(
                        zero_copy_only=False
                    ),
                    index=values.index,
                    dtype=object,
                )
                array = columnar.null_where_array(array, too_long)
        return columnar.arrow_series(columnar.empty_to_null(array), values.index), errors
    typed = _typed_arrow(values, target)
    if typed is not None:
        return typed, None
    return per_value(values, lambda value: None if _blank(value) else cast_value(value, target))


def _typed_arrow(values: pd.Series, target: FieldDef) -> pd.Series | None:
    """Return Arrow numbers, dates and flags that already have the target's type as they are (else None)."""
    if not columnar.is_arrow(values) or columnar.is_text(values):
        return None
    array = pa.array(values.array)
    kind, data_type = target.kind, array.type
    if kind == "decimal" and pa.types.is_decimal(data_type):
        return values
    if kind == "decimal" and pa.types.is_integer(data_type):
        return columnar.arrow_series(pc.cast(array, pa.decimal128(38, 0)), values.index)
    if kind == "int" and pa.types.is_integer(data_type):
        return values
    if kind == "bool" and pa.types.is_boolean(data_type):
        return values
    if kind == "date" and pa.types.is_date32(data_type):
        return values
    if kind == "date" and pa.types.is_timestamp(data_type):
        return columnar.arrow_series(pc.cast(array, pa.date32()), values.index)
    if kind == "datetime" and pa.types.is_timestamp(data_type):
        return values
    return None


def _source_values(field: CompiledField, chunk: Mapping[str, pd.Series], index: pd.Index) -> pd.Series:
    spec = field.spec
    columns = list(field.columns)
    if columns and spec.combine == "concat":
        return _concat(chunk, columns, spec.sep)
    if columns:
        return _first_non_empty(chunk, columns)
    return pd.Series([spec.const] * len(index), index=index, dtype=object)


def _convert(field: CompiledField, target: FieldDef, values: pd.Series) -> tuple[pd.Series, pd.Series | None]:
    """Run the field's transforms and the cast; return the results and the failure reasons (None: no failures)."""
    failed = pd.Series(False, index=values.index)
    reasons: pd.Series | None = None

    def record(errors: pd.Series | None, prefix: str) -> None:
        nonlocal failed, reasons
        if errors is None:
            return
        new = errors.notna() & ~failed
        if new.any():
            base = reasons if reasons is not None else pd.Series(None, index=values.index, dtype=object)
            reasons = base.where(~new, prefix + errors.astype(str))
            failed = failed | new

    for step in field.steps:
        values, errors = step.transform.func(
            null_where(values, failed) if failed.any() else values, step.args
        )
        record(errors, step.transform.name + ": ")
    last = field.steps[-1].transform if field.steps else None
    if last is not None and last.yields == target.kind:
        result = values
    else:
        clean = last is not None and last.clean_output
        result, cast_errors = _cast(null_where(values, failed) if failed.any() else values, target, clean)
        record(cast_errors, "")
    return (null_where(result, failed) if failed.any() else result), reasons


# A text column with at most this share of distinct values is transformed once per distinct value.
DISTINCT_SHARE = 0.5


# Rows looked at first: when nearly all of them differ, the column is not worth encoding.
DISTINCT_PROBE = 2_000


def _distinct(values: pd.Series) -> tuple[pd.Series, pa.Array] | None:
    """Return the distinct values and each row's position among them, or None when most values differ."""
    array = columnar.combined(pa.array(values.array))
    if len(array) > 2 * DISTINCT_PROBE:
        probe = array.slice(0, DISTINCT_PROBE)
        if pc.count_distinct(probe).as_py() > 0.9 * DISTINCT_PROBE:
            return None
    encoded = pc.dictionary_encode(array)
    if len(encoded.dictionary) > DISTINCT_SHARE * len(values):
        return None
    return columnar.arrow_series(encoded.dictionary, pd.RangeIndex(len(encoded.dictionary))), encoded.indices


def _expand(values: pd.Series, positions: pa.Array, index: pd.Index) -> pd.Series:
    """Return per-row values from per-distinct ``values`` (null positions give missing values)."""
    if columnar.is_arrow(values):
        return columnar.arrow_series(pc.take(pa.array(values.array), positions), index)
    table = columnar.object_array(list(values.to_numpy(dtype=object)))
    return pd.Series(table[pc.fill_null(positions, len(values)).to_numpy()], index=index, dtype=object)


def _convert_distinct(
    field: CompiledField, target: FieldDef, raw: pd.Series
) -> tuple[pd.Series, pd.Series | None]:
    """``_convert``, done once per distinct value when a text column repeats its values (statuses, cities…)."""
    encoded = columnar.memo("distinct", raw, lambda: _distinct(raw)) if columnar.is_text(raw) else None
    if encoded is None:
        return _convert(field, target, raw)
    distinct, positions = encoded
    result, reasons = _convert(field, target, distinct)
    return _expand(result, positions, raw.index), (
        None if reasons is None else _expand(reasons, positions, raw.index)
    )


def _computed_series(array: pa.Array, index: pd.Index) -> pd.Series:
    """Return an expression's result as an Arrow-backed Series (the cast keeps matching types as they are).

    Floating-point results become decimals rounded to 15 significant digits, so 0.1 * 3 is 0.3, not
    0.30000000000000004, when it lands in a decimal field.
    """
    if pa.types.is_null(array.type):
        return pd.Series([None] * len(index), index=index, dtype=object)
    if pa.types.is_large_string(array.type):
        array = pc.cast(array, pa.string())
    elif pa.types.is_floating(array.type):
        decimals = float_to_decimal(array)
        if decimals is None:  # beyond 10^20: Python decimals
            values = [None if v is None or v != v else Decimal(format(v, ".15g")) for v in array.to_pylist()]
            return pd.Series(values, index=index, dtype=object)
        array = decimals
    return columnar.arrow_series(array, index)


def _computed_values(
    field: CompiledField, data: Mapping[str, pd.Series], index: pd.Index
) -> tuple[pd.Series, pd.Series | None]:
    """Evaluate a field's ``expr`` or ``when``; return the values and the row-level failure reasons."""
    length = len(index)
    reasons: pa.Array | None = None

    def run(expression: Any) -> pa.Array:
        nonlocal reasons
        try:
            evaluated = evaluate(expression, data, length)
        except ExpressionError as exc:
            raise MappingError(f"field '{field.name}': {exc.message}") from None
        if evaluated.reasons is not None:
            reasons = evaluated.reasons if reasons is None else pc.coalesce(reasons, evaluated.reasons)
        return evaluated.values

    if field.expr is not None:
        values = _computed_series(run(field.expr), index)
    else:
        # Which branch each row takes (-1: none), then the values: constants by one Arrow take.
        choice = np.full(length, -1, dtype=np.int64)
        for number, case in enumerate(field.when):
            chosen = choice == -1
            if case.condition is not None:
                holds = run(case.condition)
                chosen &= np.asarray(pc.fill_null(holds, False).to_numpy(zero_copy_only=False), dtype=bool)
            choice[chosen] = number
        values = _when_values(field, choice, index, run)
    if reasons is None:
        return values, None
    reason_series = pd.Series(reasons.to_numpy(zero_copy_only=False), index=index, dtype=object)
    return null_where(values, reason_series.notna()), reason_series


def _when_values(field: CompiledField, choice: np.ndarray, index: pd.Index, run: Any) -> pd.Series:
    """Return each row's branch value; constant branches of one type stay a typed Arrow column."""
    constants = [None if case.expression is not None else case.value for case in field.when]
    positions = pa.array(choice, pa.int64(), mask=choice < 0)
    if all(case.expression is None for case in field.when):
        try:
            table = pa.array(constants)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            table = None
        if table is not None and not pa.types.is_null(table.type):
            return _computed_series(table.take(positions), index)
    result = np.full(len(index), None, dtype=object)
    for number, case in enumerate(field.when):
        chosen = choice == number
        if not chosen.any():
            continue
        if case.expression is not None:
            computed = python_values(_computed_series(run(case.expression), index)).to_numpy()
            result[chosen] = computed[chosen]
        else:
            result[chosen] = case.value
    return pd.Series(result, index=index, dtype=object)


def _inputs_text(field: CompiledField, data: Mapping[str, pd.Series], index: pd.Index) -> pd.Series:
    """Return per row the columns an expression read, as ``column=value, ...`` (for its rejects)."""
    parts = []
    for column in field.expression_columns():
        text = pc.fill_null(to_text(to_arrow(data[column])), "")
        parts.append(pc.binary_join_element_wise(f"{column}=", text, ""))
    if not parts:
        return pd.Series(None, index=index, dtype=object)
    joined = parts[0] if len(parts) == 1 else pc.binary_join_element_wise(*parts, ", ")
    return pd.Series(joined.to_pylist(), index=index, dtype=object)


def _join_problems(field: CompiledField, chunk: pd.DataFrame) -> pd.Series | None:
    """Return why a joined column the field reads has no value for a row (several different matches)."""
    found: pd.Series | None = None
    for column in (*field.columns, *field.expression_columns()):
        problem = chunk.get(column + JOIN_PROBLEM)
        if problem is not None:
            problem = problem.astype(object)
            found = problem if found is None else found.where(found.notna(), problem)
    return found


def _merge_reasons(first: pd.Series | None, second: pd.Series | None) -> pd.Series | None:
    if first is None:
        return second
    if second is None:
        return first
    return first.where(first.notna(), second)


def _complete_local_numbers(
    field: CompiledField,
    target: FieldDef,
    raw: pd.Series,
    result: pd.Series,
    reasons: pd.Series,
    cities: pd.Series,
) -> tuple[pd.Series, pd.Series]:
    """Convert again, with the city's area code before them, the failed values that are bare local numbers.

    Only values the transforms refused are tried again, so a number that converted on its own is never
    changed; a value still refused with the area code keeps its first reason.
    """
    failed = reasons.notna() & raw.notna() & cities.notna()
    if not failed.any():
        return result, reasons
    candidates: dict[Any, str] = {}
    codes: dict[Any, str | None] = {}
    # the field's own reading of a cell: with several: first, the first number of a cell listing several
    several = any(getattr(step.args, "several", "refuse") == "first" for step in field.steps)
    read = first_phone if several else phone_e164
    for index, value, city in zip(failed[failed].index, raw[failed], cities[failed], strict=True):
        if city not in codes:
            codes[city] = geo.area_code_of_city(str(city))
        code = codes[city]
        candidate = with_area_code(value, code, read) if code is not None else None
        if candidate is not None:
            candidates[index] = candidate
    if not candidates:
        return result, reasons
    retried, still = _convert(field, target, pd.Series(candidates, dtype=object))
    fixed = retried.index if still is None else still[still.isna()].index
    if len(fixed) == 0:
        return result, reasons
    positions = result.index.get_indexer(fixed)
    values = python_values(result).to_numpy()
    values[positions] = python_values(retried.loc[fixed]).to_numpy()
    why = python_values(reasons).to_numpy()
    why[positions] = None
    completed = pd.Series(values, index=result.index, dtype=object)
    if columnar.is_text(result):  # text stays Arrow text, as in a chunk where nothing was completed
        completed = columnar.arrow_series(pa.array(values, pa.string()), result.index)
    return completed, pd.Series(why, index=reasons.index, dtype=object)


def _run_field(
    field: CompiledField,
    target: FieldDef,
    data: Mapping[str, pd.Series],
    outcome: _Outcome,
    mapped: Mapping[str, pd.Series] | None = None,
) -> pd.Series:
    spec = field.spec
    chunk = outcome.chunk
    early: pd.Series | None = None  # failures before the transforms: expressions, joins
    if field.computed:
        raw, early = _computed_values(field, data, chunk.index)
    elif field.columns:
        # Fields reading the same columns get the same Series object, so transforms can share work (memo).
        raw = columnar.memo(
            f"source:{field.columns}:{spec.combine}:{spec.sep}",
            chunk,
            lambda: _source_values(field, data, chunk.index),
        )
    else:
        raw = _source_values(field, data, chunk.index)
    joined = _join_problems(field, chunk)
    if joined is not None and joined.notna().any():
        early = _merge_reasons(early, joined)
        raw = null_where(raw, joined.notna())
    result, reasons = _convert_distinct(field, target, raw)
    if field.area_code_from is not None and reasons is not None and mapped is not None:
        result, reasons = _complete_local_numbers(
            field, target, raw, result, reasons, mapped[field.area_code_from]
        )
    if early is not None and early.notna().any():
        reasons = _merge_reasons(early, reasons)
        result = null_where(result, early.notna())
    failed = reasons.notna() if reasons is not None else pd.Series(False, index=chunk.index)
    if reasons is not None and failed.any():
        if field.computed and early is not None and early.notna().any():
            raw = _inputs_text(field, data, chunk.index)  # a failed expression: show what it was given
        if spec.on_error == "fail":
            index = failed[failed].index[0]
            raise MappingError(
                f"{outcome.mapping.file}: field '{field.name}' failed on {chunk.at[index, LOCATION]!s} row "
                f"{chunk.at[index, ROW_REF]!s} (value {raw.at[index]!r}): {reasons.at[index]!s} (on_error: fail)"
            )
        severity = "error" if spec.on_error == "reject" else "warn"
        outcome.add(failed, field.name, raw, reasons, rule="mapping", severity=severity)
    if target.kind != "str" and columnar.is_text(result):
        result = python_values(result)  # a column with nothing in it comes back as empty text
    if "default" in spec.model_fields_set and spec.default is not None:
        default = cast_value(spec.default, target)
        fill = result.isna() & ~failed
        if fill.any():
            result = result if columnar.is_arrow(result) else result.astype(object)
            result = result.where(~fill, default)
    if spec.required or target.required:
        empty = result.isna() & ~failed
        outcome.add(empty, field.name, raw, f"required field '{field.name}' is empty", rule="required")
    return result


def vanished_columns(mapping: CompiledMapping, missing: Sequence[str]) -> MappingError:
    """Return the error for source columns a mapping reads that its source no longer has."""
    return MappingError(
        f"{mapping.file}: column(s) {', '.join(missing)} no longer exist in "
        f"{mapping.source}.{mapping.spec.source.location}; update the mapping (crmi mapping check)"
    )


def map_chunk(mapping: CompiledMapping, chunk: pd.DataFrame) -> MappingResult:
    """Map one extracted chunk; rows with errors go to the rejects instead of the records."""
    missing = [c for c in mapping.source_columns() if c not in chunk.columns]
    if missing:
        raise vanished_columns(mapping, missing)
    if not isinstance(chunk.index, pd.RangeIndex) or chunk.index.step != 1:
        chunk = chunk.reset_index(drop=True)
    outcome = _Outcome(mapping, chunk)
    subtotal = outcome.subtotal
    outcome.add(subtotal, None, None, "subtotal/total row, not a record", rule="subtotal")
    data = arrow_text_columns(chunk, mapping.source_columns())
    columns: dict[str, pd.Series] = {}
    computed: dict[str, pd.Series] = {}
    converted: dict[str, dict[str, pd.Series]] = {}
    problems: dict[str, list[pd.DataFrame]] = {}
    # A field completed from another (area_code_from) runs after it; the columns and the rejects keep the
    # mapping's order.
    ordered = sorted(mapping.fields, key=lambda f: f.area_code_from is not None)
    with columnar.chunk_scope():
        for field in ordered:
            start = len(outcome.parts)
            computed[field.name] = _run_field(
                field, mapping.entity.fields[field.name], data, outcome, computed
            )
            if field.convert is not None:  # operands are run like fields (see money.py)
                converted[field.name] = money.convert_amounts(
                    field.convert,
                    computed[field.name],
                    outcome,
                    lambda operand, target: _run_field(operand, target, data, outcome),
                )
            problems[field.name] = outcome.parts[start:]
            del outcome.parts[start:]
    for field in mapping.fields:
        outcome.parts.extend(problems[field.name])
        columns[field.name] = computed[field.name]
        columns.update(converted.get(field.name, {}))
    key_columns = mapping.spec.source.key_columns
    if mapping.spec.source.hash_key:
        key = hash_key(data, key_columns, chunk.index)
        outcome.add(
            key.isna() & ~subtotal,
            None,
            None,
            f"all key column(s) {', '.join(key_columns)} are empty",
            rule="key",
        )
    elif key_columns:
        key = _external_key(data, key_columns, chunk.index)
        outcome.add(
            key.isna() & ~subtotal, None, None, f"empty key column(s) {', '.join(key_columns)}", rule="key"
        )
    else:
        key = chunk[LOCATION].astype(str) + ":" + chunk[ROW_REF].astype(str)
    if mapping.spec.unmapped == "keep":
        used = set(mapping.source_columns())
        for column in chunk.columns:
            if column not in used and not column.startswith("_"):
                columns[f"_extra_{column}"] = chunk[column]
    columns[EXTERNAL_KEY] = key
    system = mapping.spec.source.system
    if system is not None and system != mapping.source and SOURCE_KEY in chunk.columns:
        # A fix sheet's rows name their original source row's key: the loader files them under it too.
        columns[SOURCE_KEY] = pd.Series(
            [None if _blank(v) else _key_text(v) for v in chunk[SOURCE_KEY].tolist()],
            index=chunk.index,
            dtype=object,
        )
    columns[ROW_REF] = chunk[ROW_REF]
    columns[LOCATION] = chunk[LOCATION]
    columns[SOURCE] = pd.Series(mapping.source, index=chunk.index, dtype=object)
    columns[MAPPING] = pd.Series(mapping.name, index=chunk.index, dtype=object)
    records = pd.DataFrame(columns, index=chunk.index)
    keep = ~outcome.rejected
    rejects = outcome.rejects()
    amount_field = mapping.entity.amount_field
    amount_rejected = None
    if amount_field is not None and amount_field in columns:
        amount_rejected = amount_sum(columns[amount_field][outcome.rejected & ~subtotal])
    if _ROW in rejects:
        rows = rejects.pop(_ROW).to_numpy()
        amounts = columns.get(amount_field) if amount_field is not None else None
        rejects["external_key"] = _present_values(key, rows)
        rejects["amount"] = _present_values(amounts, rows) if amounts is not None else None
    if not keep.all():
        records = records.loc[keep].reset_index(drop=True)
    return MappingResult(records, rejects, len(chunk), amount_rejected)


def _present_values(values: pd.Series, rows: np.ndarray) -> np.ndarray:
    """Return ``values`` at the chunk rows ``rows`` as objects, missing ones as None."""
    picked = values.reindex(rows).astype(object).to_numpy()
    picked[pd.isna(picked)] = None
    return picked


def amount_sum(values: pd.Series) -> Decimal:
    """Return the sum of the amounts present in ``values`` (missing ones count nothing), exactly."""
    total = Decimal(0)
    for value in values.tolist():
        if not _blank(value):
            total += value if isinstance(value, Decimal) else Decimal(str(value))
    return total


# Rows per piece when chunks are spread over threads; also what bounds memory per piece in flight.
PIECE_ROWS = 50_000


def default_workers() -> int:
    """Threads for mapping: one per usable core (at most 8); CRMI_MAPPING_WORKERS overrides."""
    configured = os.environ.get("CRMI_MAPPING_WORKERS", "").strip()
    if configured:
        if not configured.isdigit() or int(configured) < 1:
            raise ConfigError(
                f"CRMI_MAPPING_WORKERS={configured!r}: expected a whole number of threads, 1 or more "
                "(unset it to use one thread per core)"
            )
        return int(configured)
    return max(
        1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    )


def _pieces(chunks: Iterable[pd.DataFrame], rows: int) -> Iterator[pd.DataFrame]:
    for chunk in chunks:
        if len(chunk) <= rows:
            yield chunk
        else:
            for start in range(0, len(chunk), rows):
                yield chunk.iloc[start : start + rows]


def iter_map(
    mapping: CompiledMapping, chunks: Iterable[pd.DataFrame], workers: int | None = None
) -> Iterator[MappingResult]:
    """Map chunks on a pool of threads and yield the results in input order.

    The Arrow kernels release the GIL, so pieces map in parallel; at most two pieces per thread are in
    flight, which bounds memory by the piece size, not the input size.
    """
    workers = workers or default_workers()
    pieces = _pieces(chunks, PIECE_ROWS)
    if workers == 1:
        yield from (map_chunk(mapping, piece) for piece in pieces)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="crmi-map") as pool:
        pending: deque[Future[MappingResult]] = deque()
        try:
            for piece in pieces:
                pending.append(pool.submit(map_chunk, mapping, piece))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def map_chunks(
    mapping: CompiledMapping,
    chunks: Iterable[pd.DataFrame],
    workers: int | None = None,
    first_rows: dict[Any, Any] | None = None,
) -> MappingResult:
    """Map every chunk (in parallel pieces), then reject later rows whose external key repeats an earlier one.

    ``first_rows`` (external key → the row it was first seen on) carries the keys of earlier calls: a source
    mapped in several calls (staged piece by piece) rejects a key repeated across them too, and the dict
    is updated with this call's keys.
    """
    return reject_repeated_keys(mapping, MappingResult.concat(iter_map(mapping, chunks, workers)), first_rows)


def map_ahead(
    mapping: CompiledMapping, chunks: Iterable[pd.DataFrame], workers: int | None = None
) -> Iterator[tuple[pd.DataFrame, MappingResult]]:
    """Map chunks on a pool of threads; yield each chunk with its result, in input order.

    Keys repeated within or across chunks are left to the caller (:func:`reject_repeated_keys`). At most
    two chunks per thread are in flight: memory follows the chunk size.
    """
    workers = workers or default_workers()

    def mapped(chunk: pd.DataFrame) -> MappingResult:
        return MappingResult.concat(iter_map(mapping, [chunk] if len(chunk.columns) else [], workers=1))

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="crmi-map") as pool:
        pending: deque[tuple[pd.DataFrame, Future[MappingResult]]] = deque()
        try:
            for chunk in chunks:
                pending.append((chunk, pool.submit(mapped, chunk)))
                if len(pending) >= 2 * workers:
                    chunk, future = pending.popleft()
                    yield chunk, future.result()
            while pending:
                chunk, future = pending.popleft()
                yield chunk, future.result()
        finally:
            for _, future in pending:
                future.cancel()


def reject_repeated_keys(
    mapping: CompiledMapping, result: MappingResult, first_rows: dict[Any, Any] | None = None
) -> MappingResult:
    """Reject the mapped rows whose external key repeats an earlier one (see :func:`map_chunks`)."""
    if result.records.empty:
        if result.records.columns.empty:
            result.records = pd.DataFrame(columns=[*mapping.written_fields(), *RECORD_META])
        return result
    duplicated = result.records[EXTERNAL_KEY].duplicated(keep="first")
    if first_rows:
        duplicated |= result.records[EXTERNAL_KEY].isin(first_rows.keys())
    if first_rows is not None:
        firsts = result.records.loc[~duplicated]
        first_rows.update(zip(firsts[EXTERNAL_KEY], firsts[ROW_REF], strict=True))
    if duplicated.any():
        amount_field = mapping.entity.amount_field
        dupes = result.records.loc[duplicated]
        keys = dupes[EXTERNAL_KEY].astype(object)
        first_row = (
            pd.Series([first_rows[key] for key in keys], index=keys.index, dtype=object)
            if first_rows is not None
            else keys.map(result.records.drop_duplicates(EXTERNAL_KEY).set_index(EXTERNAL_KEY)[ROW_REF])
        )
        extra = pd.DataFrame(
            {
                "source": mapping.source,
                "entity": mapping.entity.name,
                "location": dupes[LOCATION].astype(object),
                "row_ref": dupes[ROW_REF].astype(object),
                "field": None,
                "value": keys,
                "rule": "duplicate_key",
                "reason": "duplicate source key (first seen on row " + first_row.astype(str) + ")",
                "severity": "error",
                "external_key": None,  # the key is the first row's: this row has none of its own
                "amount": dupes.get(amount_field) if amount_field is not None else None,
            },
            columns=[*REJECT_COLUMNS, *REJECT_ROW_COLUMNS],
        ).astype(object)
        result.rejects = (
            pd.concat([result.rejects, extra], ignore_index=True) if len(result.rejects) else extra
        )
        if result.amount_rejected is not None and amount_field in result.records.columns:
            result.amount_rejected += amount_sum(dupes[amount_field])
        result.records = result.records.loc[~duplicated].reset_index(drop=True)
    return result
