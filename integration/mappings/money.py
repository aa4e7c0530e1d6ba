"""Money with currency: ``convert`` on amount fields, and the project's rate tables.

A field that ``convert``s turns the source's amount into the project's base currency and keeps what the
source said beside it::

    amount:
      from: amount
      transforms: [parse_amount]
      convert: {currency: currency_code}                    # rate from currencies.rates in project.yaml
      convert: {currency: currency_code, date: date_closed}  # rate valid on the row's date (currencies.dated)
      convert: {currency: iso4217, rate: conversion_rate, direction: divide}   # the row's own rate

The field gets the base-currency amount (rounded half up to cents); ``original_amount`` and
``original_currency`` get the source's amount and ISO 4217 code, and ``currency`` the base currency.
``currency``, ``rate``, ``date`` and ``currency_id`` are operands: a source column, or a field spec
(``{from:, transforms:, default:, const:}``) run by the engine like any field, so whatever a field can
read (a source-side lookup, an expression) an operand can read too.

SuiteCRM (checked in salesagility/SuiteCRM): ``modules/Currencies/Currency.php`` ``convertToDollar()``
returns ``amount / conversion_rate``, and ``retrieve('-99')`` (the system currency, which has no row in
``currencies``) sets ``conversion_rate = 1`` and ``iso4217 = $sugar_config['default_currency_iso4217']``;
``modules/Opportunities/SaveOverload.php`` ``perform_save()`` stores ``amount_usdollar =
convertToDollar(amount)``. So ``conversion_rate`` is units of the currency per base unit (divide), and
``currency_id = '-99'`` means the base currency: that is what ``profile: suitecrm`` says. (SuiteCRM also
falls back to the base currency for a deleted or missing currencies row; we reject such rows instead,
since guessing would load a foreign amount as if it were in the base currency.)
"""

from __future__ import annotations

import bisect
import datetime as dt
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from crm_core.entities import EntityDef, FieldDef, FieldKind
from crm_core.errors import MappingError, Problem
from crm_core.validation import is_iso4217
from integration.connectors.base import LOCATION, ROW_REF
from integration.mappings import columnar
from integration.mappings.spec import CompiledField, FieldSpec, MappingSpec, _parse_step
from integration.mappings.transforms import TransformFailure, _isnull, currency_code
from integration.yamlconf import DocPath, LocatedDocument, close_names

if TYPE_CHECKING:
    from integration.mappings.engine import _Outcome

CENT = Decimal("0.01")
SUITECRM_BASE_ID = "-99"
OPERANDS = ("currency", "rate", "date", "currency_id")
# Fields a convert fills besides its own, when the target entity has them.
ORIGINAL_FIELDS = ("original_amount", "original_currency")


# --------------------------------------------------------------------------- project.yaml: currencies


def _rate(value: Any) -> Decimal:
    """Read a rate written in project.yaml: a positive number."""
    try:
        if isinstance(value, bool):
            raise InvalidOperation
        rate = Decimal(str(value).strip())
    except (InvalidOperation, ValueError):
        rate = None
    if rate is None or not rate.is_finite() or rate <= 0:
        raise ValueError(
            f"a rate is a positive number (base-currency units per unit, e.g. 7.1), not {value!r}"
        )
    return rate


Rate = Annotated[Decimal, BeforeValidator(_rate)]


class CurrenciesConfig(BaseModel):
    """``currencies:`` in project.yaml: the base currency and the rates convert uses without a rate column."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str = Field(default="CNY", description="ISO 4217 code of the core's amounts")
    rates: dict[str, Rate] = Field(
        default_factory=dict,
        description="ISO code -> base-currency units per unit (USD: 7.1 means 1 USD = 7.1 CNY)",
    )
    dated: dict[str, dict[dt.date, Rate]] = Field(
        default_factory=dict,
        description="ISO code -> {valid-from date: rate}; a row's date picks the latest rate valid on it",
    )


def currency_problems(document: LocatedDocument, config: CurrenciesConfig | None) -> list[Problem]:
    """Check the codes of ``currencies:`` in project.yaml (ISO 4217) and that the base rate is 1."""
    if config is None:
        return []
    problems = []

    def check(path: DocPath, code: str, at_key: bool) -> bool:
        if is_iso4217(code):
            return True
        hint = ""
        try:
            suggestion = currency_code(code)
            if suggestion != code and is_iso4217(suggestion):
                hint = f"; did you mean {suggestion}?"
        except TransformFailure:
            pass
        problems.append(
            document.problem(path, f"'{code}' is not an ISO 4217 currency code{hint}", at_key=at_key)
        )
        return False

    check(("currencies", "base"), config.base, False)
    for code, rate in config.rates.items():
        if check(("currencies", "rates", code), code, True) and code == config.base and rate != 1:
            problems.append(
                document.problem(
                    ("currencies", "rates", code), f"{code} is the base currency: its rate is 1, not {rate}"
                )
            )
    for code, table in config.dated.items():
        if check(("currencies", "dated", code), code, True) and not table:
            problems.append(
                document.problem(
                    ("currencies", "dated", code), f"no rates for {code}; write {{2025-01-01: 7.1, …}}"
                )
            )
    return problems


@dataclass(frozen=True)
class RateTable:
    """The project's base currency and rates, ready for lookups; ``declared``: project.yaml has currencies."""

    base: str = "CNY"
    rates: Mapping[str, Decimal] = field(default_factory=dict)
    dated: Mapping[str, tuple[tuple[dt.date, ...], tuple[Decimal, ...]]] = field(default_factory=dict)
    declared: bool = False

    @classmethod
    def of(cls, config: CurrenciesConfig | None) -> RateTable:
        """Return the table of a project's ``currencies:`` (the core's default, CNY, when there is none)."""
        if config is None:
            return cls()
        dated = {
            code: (tuple(sorted(table)), tuple(table[d] for d in sorted(table)))
            for code, table in config.dated.items()
        }
        return cls(config.base, dict(config.rates), dated, declared=True)

    def dated_rate(self, code: str, day: dt.date) -> Decimal | None:
        """Return the rate of ``code`` valid on ``day`` (the latest valid-from on or before it), or None."""
        days, rates = self.dated[code]
        position = bisect.bisect_right(days, day)
        return rates[position - 1] if position else None


# --------------------------------------------------------------------------- compiling a convert


@dataclass(frozen=True)
class Operand:
    """One value convert reads, compiled like a field (named ``<field>.<operand>`` in rejects)."""

    name: str
    field: CompiledField
    target: FieldDef


@dataclass(frozen=True)
class CompiledConvert:
    """A checked convert: its operands, how to read the rate, and the fields it fills besides its own."""

    field: str
    currency: Operand
    rate: Operand | None
    date: Operand | None
    currency_id: Operand | None
    divide: bool
    base_ids: frozenset[str]
    table: RateTable | None  # None: the mapping was compiled without its project
    writes: tuple[str, ...]
    on_error: str = "reject"  # the field's: reject the row, keep it without the amount (warn), or fail

    def operands(self) -> list[Operand]:
        """Return the operands given."""
        return [o for o in (self.currency, self.rate, self.date, self.currency_id) if o is not None]

    def columns(self) -> list[str]:
        """Return the source columns the operands read."""
        found: list[str] = []
        for operand in self.operands():
            found.extend(c for c in operand.field.spec.columns if c not in found)
        return found


_KINDS: dict[str, FieldKind] = {"currency": "str", "rate": "decimal", "date": "date", "currency_id": "str"}


def _operand(
    doc: LocatedDocument, path: DocPath, field_name: str, name: str, spec: FieldSpec
) -> tuple[Operand | None, list[Problem]]:
    problems: list[Problem] = []
    if spec.convert is not None:
        problems.append(doc.problem((*path, "convert"), "an operand of convert cannot convert", at_key=True))
    if spec.core_lookup is not None:
        problems.append(
            doc.problem(
                (*path, "lookup"),
                "lookup by crosswalk is for reference fields, not convert operands",
                at_key=True,
            )
        )
    for key in ("lookup", "via", "aggregate", "expr", "when"):
        if key == "lookup" and spec.core_lookup is not None:
            continue
        if getattr(spec, key) is not None:
            problems.append(
                doc.problem(
                    (*path, key),
                    f"a convert operand reads columns; name the {key} under source.lookups (or use an expr "
                    "field) and give its name here",
                    at_key=True,
                )
            )
    steps = []
    for i, step in enumerate(spec.transforms):
        parsed, step_problems = _parse_step(step, (*path, "transforms", i), doc)
        problems.extend(step_problems)
        if parsed:
            steps.append(parsed)
    label = f"{field_name}.{name}"
    target = FieldDef(name=label, kind=_KINDS[name], required=False, column=label)
    # The operand is compiled like a mapping field (transforms here); whatever else fields learn to read
    # (source-side lookups, expressions) belongs here too, so operands run through the engine unchanged.
    if problems:
        return None, problems
    return Operand(name, CompiledField(label, spec, tuple(steps), None, tuple(spec.columns)), target), []


def compile_convert(
    doc: LocatedDocument,
    path: DocPath,
    spec: FieldSpec,
    target: FieldDef,
    entity: EntityDef,
    mapping: MappingSpec,
    table: RateTable | None,
) -> tuple[CompiledConvert | None, list[Problem]]:
    """Check a field's ``convert`` against its target, the mapping's other fields and the project's rates."""
    convert = spec.convert
    assert convert is not None
    here = (*path, "convert")
    problems: list[Problem] = []
    if target.kind != "decimal":
        problems.append(
            doc.problem(
                here,
                f"convert works on amounts; '{target.name}' of {entity.name} is {target.kind}",
                at_key=True,
            )
        )
    operands: dict[str, Operand | None] = {}
    for name in OPERANDS:
        operand_spec = getattr(convert, name)
        if operand_spec is None:
            operands[name] = None
            continue
        operand, operand_problems = _operand(doc, (*here, name), target.name, name, operand_spec)
        problems.extend(operand_problems)
        operands[name] = operand
    suitecrm = convert.profile == "suitecrm"
    if suitecrm and convert.direction == "multiply":
        problems.append(
            doc.problem(
                (*here, "direction"),
                "profile: suitecrm divides (SuiteCRM's amount_usdollar = amount / conversion_rate); "
                "remove direction",
            )
        )
    if convert.rate is None and convert.direction is not None:
        problems.append(
            doc.problem(
                (*here, "direction"),
                "direction says how to read a rate column; the rates in project.yaml are base-currency "
                "units per unit (multiply)",
                at_key=True,
            )
        )
    if suitecrm and convert.rate is None:
        problems.append(
            doc.problem(
                here,
                "profile: suitecrm needs rate: the currencies row's conversion_rate (a column of the query, "
                "or a lookup in currencies by currency_id)",
                at_key=True,
            )
        )
    if convert.rate is not None and convert.date is not None:
        problems.append(
            doc.problem(
                (*here, "date"),
                "date picks a rate from currencies.dated in project.yaml; this convert reads its rate from "
                "rate: give one of the two",
                at_key=True,
            )
        )
    if convert.currency_id is not None and not (suitecrm or convert.base_ids):
        problems.append(
            doc.problem(
                (*here, "currency_id"),
                "currency_id is where base_ids are looked for; give base_ids (or profile: suitecrm)",
                at_key=True,
            )
        )
    if table is not None and convert.rate is None:
        problems.extend(_table_problems(doc, here, convert.currency, convert.date is not None, table))
    writes = tuple(
        name
        for name in ("currency", *ORIGINAL_FIELDS)
        if name in entity.fields and (name == "currency" or target.name == entity.amount_field)
    )
    for name in writes:
        if name in mapping.fields:
            problems.append(
                doc.problem(
                    ("fields", name),
                    f"'{name}' is filled by convert on '{target.name}' "
                    + ("(the base currency)" if name == "currency" else "(what the source gave)")
                    + "; remove this field",
                    at_key=True,
                )
            )
    base_ids = frozenset(convert.base_ids or ([SUITECRM_BASE_ID] if suitecrm else []))
    currency = operands["currency"]
    if problems or currency is None:
        return None, problems
    return CompiledConvert(
        field=target.name,
        currency=currency,
        rate=operands["rate"],
        date=operands["date"],
        currency_id=operands["currency_id"],
        divide=convert.direction == "divide" or suitecrm,
        base_ids=base_ids,
        table=table,
        writes=writes,
        on_error=spec.on_error,
    ), []


def _table_problems(
    doc: LocatedDocument, here: DocPath, currency: FieldSpec, dated: bool, table: RateTable
) -> list[Problem]:
    """The rate comes from project.yaml: it must have rates, and a fixed currency must have one."""
    if not table.declared or not (table.rates or table.dated):
        return [
            doc.problem(
                here,
                "convert needs a rate: give rate: (a column) or add currencies: {base: CNY, rates: {USD: 7.1}} "
                "to project.yaml",
                at_key=True,
            )
        ]
    if dated and not table.dated:
        return [
            doc.problem(
                (*here, "date"),
                "date picks a rate from currencies.dated in project.yaml, which has none",
                at_key=True,
            )
        ]
    if currency.from_ is not None or currency.const is None:
        return []
    try:
        code = currency_code(currency.const)
    except TransformFailure as exc:
        return [doc.problem((*here, "currency", "const"), str(exc))]
    if code == table.base or code in table.rates or (dated and code in table.dated):
        return []
    return [
        doc.problem(
            (*here, "currency", "const"),
            f"no rate for {code} in project.yaml (currencies.rates{' or currencies.dated' if dated else ''})",
        )
    ]


def operand_column_problems(
    doc: LocatedDocument, spec: MappingSpec, known: Collection[str], columns: list[str], used: set[str]
) -> list[Problem]:
    """Return a located problem for each convert operand column the source does not have (marking the rest used)."""
    problems = []
    for field_name, field_spec in spec.fields.items():
        convert = field_spec.convert
        if convert is None:
            continue
        raw = doc.data.get("fields", {}).get(field_name, {}) if isinstance(doc.data, dict) else {}
        raw_convert = raw.get("convert", {}) if isinstance(raw, dict) else {}
        for name in OPERANDS:
            operand = getattr(convert, name)
            if operand is None:
                continue
            base: DocPath = ("fields", field_name, "convert", name)
            written = raw_convert.get(name) if isinstance(raw_convert, dict) else None
            for i, column in enumerate(operand.columns):
                used.add(column)
                if column in known:
                    continue
                if isinstance(written, str):
                    path: DocPath = base
                elif isinstance(operand.from_, list):
                    path = (*base, "from", i)
                else:
                    path = (*base, "from")
                problems.append(
                    doc.problem(
                        path,
                        f"column '{column}' is not in {spec.source.location}{close_names(column, columns)}",
                    )
                )
    return problems


# --------------------------------------------------------------------------- converting rows

Evaluate = Callable[[CompiledField, FieldDef], pd.Series]


def _objects(values: pd.Series) -> np.ndarray:
    """Return the values as a numpy object array with None for missing values."""
    if isinstance(values.dtype, pd.ArrowDtype):
        return np.asarray(values.array.to_numpy(dtype=object, na_value=None), dtype=object)
    array = values.to_numpy(dtype=object, copy=True)
    array[pd.isna(array)] = None
    return array


def _present(values: np.ndarray) -> np.ndarray:
    return np.asarray(pd.notna(values), dtype=bool)


def _per_distinct(
    values: np.ndarray, rows: np.ndarray, func: Callable[[Any], tuple[Any, str | None]]
) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``func`` (value -> (result, reason)) once per distinct value of ``values[rows]``; results by row."""
    results = np.full(len(values), None, dtype=object)
    reasons = np.full(len(values), None, dtype=object)
    if rows.any():
        positions, uniques = pd.factorize(values[rows], use_na_sentinel=False)
        outcomes = [func(None if _isnull(u) else u) for u in uniques]
        results[rows] = columnar.object_array([o[0] for o in outcomes])[positions]
        reasons[rows] = columnar.object_array([o[1] for o in outcomes])[positions]
    return results, reasons


def _arrow_convert(amounts: pd.Series, rates: np.ndarray, divide: bool) -> pd.Series | None:
    """Multiply or divide in Arrow decimals and round half away from zero to cents (None: out of range).

    Division truncates at a scale above 2, which cannot move a value across a half-cent boundary, so the
    rounded result equals exact division rounded half up (tests compare it with Python's decimals).
    """
    try:
        values = pa.array(amounts.array) if columnar.is_arrow(amounts) else pa.array(_objects(amounts))
        factors = pa.array(rates)
        if pa.types.is_null(factors.type):
            return pd.Series(None, index=amounts.index, dtype=object)
        if not (pa.types.is_decimal(values.type) and pa.types.is_decimal(factors.type)):
            return None
        if factors.type.precision > 35:  # the product's precision must stay within decimal256's 76 digits
            return None
        values = values.cast(pa.decimal256(38 + values.type.scale, values.type.scale))
        factors = factors.cast(pa.decimal256(factors.type.precision, factors.type.scale))
        result = pc.divide(values, factors) if divide else pc.multiply(values, factors)
        cents = pc.round(result, 2, round_mode="half_towards_infinity").cast(pa.decimal128(38, 2))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, OverflowError):
        return None
    return columnar.arrow_series(cents, amounts.index)


def _python_convert(amount: np.ndarray, rates: np.ndarray, divide: bool) -> np.ndarray:
    converted = np.full(len(amount), None, dtype=object)
    ready = _present(amount) & _present(rates)
    if ready.any():
        positions, distinct_rates = pd.factorize(rates[ready])
        rows = np.flatnonzero(ready)
        for position, rate in enumerate(distinct_rates):
            chosen = rows[positions == position]
            converted[chosen] = columnar.object_array([_convert(v, rate, divide) for v in amount[chosen]])[
                :-1
            ]
    return converted


def _convert(amount: Any, rate: Decimal, divide: bool) -> Decimal:
    value = amount if isinstance(amount, Decimal) else Decimal(str(amount))
    return (value / rate if divide else value * rate).quantize(CENT, rounding=ROUND_HALF_UP)


def _row_rate(pair: tuple[str, Any], column: str) -> tuple[Decimal | None, str | None]:
    code, rate = pair
    if rate is None:
        return None, f"no rate for {code} on this row ({column} is empty)"
    if not isinstance(rate, Decimal) or not rate.is_finite() or rate <= 0:
        return None, f"the rate for {code} is not a positive number"
    return rate, None


def _dated_rate(table: RateTable, pair: tuple[str, Any], column: str) -> tuple[Decimal | None, str | None]:
    code, day = pair
    if code not in table.dated:
        return _table_rate(table, code, " (currencies.dated or currencies.rates)")
    if day is None:
        return None, f"no date to pick the {code} rate ({column} is empty)"
    rate = table.dated_rate(code, day)
    if rate is None:
        first = table.dated[code][0][0]
        return None, f"no {code} rate valid on {day} (currencies.dated.{code} starts {first})"
    return rate, None


def _table_rate(
    table: RateTable, code: str, where: str = " (currencies.rates)"
) -> tuple[Decimal | None, str | None]:
    rate = table.rates.get(code)
    return (rate, None) if rate is not None else (None, f"no rate for {code} in project.yaml{where}")


def _code(value: Any) -> tuple[str | None, str | None]:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, "the amount has no currency (give currency a default if blank means the base currency)"
    text = str(value).strip()
    if text == SUITECRM_BASE_ID:
        return None, f"'{text}' is not a currency; SuiteCRM's -99 is its base currency: use profile: suitecrm"
    try:
        code = currency_code(text)
    except TransformFailure as exc:
        return None, str(exc)
    if not is_iso4217(code):
        return None, f"'{text}' is not an ISO 4217 currency"
    return code, None


def convert_amounts(
    convert: CompiledConvert, amounts: pd.Series, outcome: _Outcome, evaluate: Evaluate
) -> dict[str, pd.Series]:
    """Convert one chunk's amounts; return the field's base amounts and the other fields convert fills.

    A row with an amount whose currency, rate or date cannot be settled is rejected with the reason; a row
    without an amount keeps its currency (when valid) and gets no amount.
    """
    table = convert.table
    if table is None:
        raise MappingError(
            f"convert on '{convert.field}' needs its project's currencies: load the mapping with its project"
        )
    index = amounts.index
    already = outcome.rejected.to_numpy(dtype=bool).copy()
    raw_currency = _objects(evaluate(convert.currency.field, convert.currency.target))
    ids = (
        _objects(evaluate(convert.currency_id.field, convert.currency_id.target))
        if convert.currency_id is not None
        else raw_currency
    )
    given_rates = _objects(evaluate(convert.rate.field, convert.rate.target)) if convert.rate else None
    days = _objects(evaluate(convert.date.field, convert.date.target)) if convert.date else None
    # Rows an operand already rejected (a rate that is not a number…) need no second reason here.
    given = amounts.notna().to_numpy(dtype=bool) & ~(outcome.rejected.to_numpy(dtype=bool) & ~already)
    is_base = np.zeros(len(ids), dtype=bool)
    if convert.base_ids:
        stripped = pd.Series(ids, dtype=object).map(lambda v: str(v).strip(), na_action="ignore")
        is_base = stripped.isin(convert.base_ids).to_numpy(dtype=bool)
    codes, reasons = _per_distinct(raw_currency, ~is_base, _code)
    codes[is_base] = table.base
    orphan = np.zeros(len(ids), dtype=bool)  # an id whose currency row is missing (SuiteCRM: deleted)
    if convert.currency_id is not None:
        orphan = ~is_base & _present(ids) & ~_present(raw_currency)
        reasons[orphan] = [
            f"currency_id '{v}' names no currency (its row is missing or deleted)" for v in ids[orphan]
        ]
    shown = raw_currency.copy()  # the value a reject shows
    shown[orphan] = ids[orphan]
    rates = np.full(len(index), None, dtype=object)
    foreign = codes != table.base  # element-wise on the object array
    rates[_present(codes) & ~foreign] = Decimal(1)
    pending = given & _present(codes) & foreign
    if given_rates is not None:
        column = ", ".join(convert.rate.field.spec.columns) if convert.rate else "rate"
        pairs = columnar.object_array(list(zip(codes, given_rates, strict=True)))[:-1]
        found_rates, found = _per_distinct(pairs, pending, lambda pair: _row_rate(pair, column))
        bad = pending & _present(found) & _present(given_rates)
        shown[bad] = given_rates[bad]
    elif days is not None:
        column = ", ".join(convert.date.field.spec.columns) if convert.date else "date"
        pairs = columnar.object_array(list(zip(codes, days, strict=True)))[:-1]
        found_rates, found = _per_distinct(pairs, pending, lambda pair: _dated_rate(table, pair, column))
        early = (
            pending & _present(found) & _present(days) & pd.Series(codes).isin(list(table.dated)).to_numpy()
        )
        shown[early] = days[early]
    else:
        found_rates, found = _per_distinct(codes, pending, lambda code: _table_rate(table, code))
    rates[pending], reasons[pending] = found_rates[pending], found[pending]
    rates[~given] = None
    converted = _arrow_convert(amounts, rates, convert.divide)
    if converted is None:  # beyond Arrow's decimal range: Python decimals, one pass per distinct rate
        converted = pd.Series(
            _python_convert(_objects(amounts), rates, convert.divide), index=index, dtype=object
        )
    failed = given & _present(reasons)
    if failed.any():
        if convert.on_error == "fail":
            row = int(np.flatnonzero(failed)[0])
            chunk = outcome.chunk
            raise MappingError(
                f"{outcome.mapping.file}: field '{convert.field}' failed on {chunk[LOCATION].iat[row]!s} row "
                f"{chunk[ROW_REF].iat[row]!s} (value {shown[row]!r}): {reasons[row]} (on_error: fail)"
            )
        outcome.add(
            pd.Series(failed, index=index),
            convert.field,
            pd.Series(shown, index=index, dtype=object),
            pd.Series(reasons, index=index, dtype=object),
            rule="convert",
            severity="error" if convert.on_error == "reject" else "warn",
        )
    out = {convert.field: converted}
    if "original_amount" in convert.writes:
        out["original_amount"] = amounts
    if "original_currency" in convert.writes:
        out["original_currency"] = pd.Series(codes, index=index, dtype=object)
    if "currency" in convert.writes:
        out["currency"] = pd.Series(table.base, index=index, dtype=object)
    return out
