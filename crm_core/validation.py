"""Validation rules for the canonical model: declarative, vectorized, each with a name and a severity.

Rules run on mapped records (one frame per source × entity) before they load. A violated ``error`` rule
quarantines the row (it becomes a reject with the rule's name and message and is not loaded); a ``warn``
rule loads the row and reports it. A project overrides a built-in rule's severity (or turns it ``off``)
and adds its own rules in ``project.yaml``; see :class:`RuleSpec`.

Rules that need the whole core (amounts applied to a receivable, references to merged records, shared
credit codes) are :func:`core_violations`, run after a load as Dagster asset checks.
"""

from __future__ import annotations

import datetime as dt
import itertools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pycountry
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from stdnum.cn import uscc as stdnum_uscc

from crm_core.entities import ENTITIES
from crm_core.journal import to_json
from crm_core.models import Customer, Payment, PaymentApplication, Receivable
from crm_core.stages import STAGES

Severity = Literal["error", "warn"]
SeverityOrOff = Literal["error", "warn", "off"]
E164 = re.compile(r"^\+[1-9]\d{6,14}(;ext=\d{1,10})?$")
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
WON_STAGES = frozenset(s["code"] for s in STAGES if s["is_won"])
LOST_STAGES = frozenset(s["code"] for s in STAGES if s["is_closed"] and not s["is_won"])
CLOSED_STAGES = WON_STAGES | LOST_STAGES


@dataclass(frozen=True)
class RuleContext:
    """What rules may depend on besides the rows: today's date and the tolerance for future dates."""

    today: dt.date = field(default_factory=dt.date.today)
    future_tolerance: dt.timedelta = dt.timedelta(days=7)
    # The values ``unique`` rules saw in earlier pieces of the same source (rule → values), when a
    # source is validated piece by piece; None: the frame is the whole source.
    seen: dict[str, set[str]] | None = field(default=None, compare=False)


Check = Callable[[pd.DataFrame, RuleContext], pd.Series]


@dataclass(frozen=True)
class Rule:
    """A named check on one entity; ``violated`` returns True for each row that breaks it."""

    name: str
    entity: str
    field: str
    severity: Severity
    message: str
    violated: Check
    columns: tuple[str, ...] = ()  # the fields it reads: it is skipped when a batch has none of them
    allowed: tuple[str, ...] = ()  # one_of rules: the allowed values (documented by crmi mapping targets)

    def applies_to(self, frame: pd.DataFrame) -> bool:
        """Return True when the frame has the fields this rule reads."""
        return all(c in frame.columns for c in (self.columns or (self.field,)))


# --------------------------------------------------------------------------- vectorized helpers


def present(values: pd.Series) -> pd.Series:
    """Return True where a value is given (not None/NaN/NaT, not blank text)."""
    given = values.notna().to_numpy(dtype=bool)
    if values.dtype == object:
        blank = np.fromiter(
            (isinstance(v, str) and not v.strip() for v in values), dtype=bool, count=len(values)
        )
        given &= ~blank
    return pd.Series(given, index=values.index)


def _per_distinct(values: pd.Series, test: Callable[[Any], bool]) -> pd.Series:
    """Apply ``test`` once per distinct present value (cheap on repetitive columns)."""
    return _per_distinct_at_once(values, lambda distinct: np.array([test(v) for v in distinct], dtype=bool))


def decimals(values: pd.Series) -> pd.Series:
    """Return the values as floats for comparisons (NaN where missing or not a number)."""

    def number(value: Any) -> float:
        if value is None or (isinstance(value, float) and value != value):
            return np.nan
        try:
            return float(Decimal(str(value)))
        except (InvalidOperation, ValueError):
            return np.nan

    if values.dtype.kind in "fiu":
        return values.astype(float)
    return values.map(number).astype(float)


def dates(values: pd.Series) -> pd.Series:
    """Return the values as datetimes (NaT where missing)."""
    return pd.to_datetime(values, errors="coerce")


# --------------------------------------------------------------------------- rule constructors


def required(entity: str, name: str, severity: Severity = "error") -> Rule:
    """The field must have a value."""
    return Rule(f"{entity}.{name}.required", entity, name, severity, f"{name} is required",
                lambda f, _c: ~present(f[name]))  # fmt: skip


def matches(
    entity: str, name: str, pattern: re.Pattern[str], what: str, severity: Severity = "error"
) -> Rule:
    """A given value must match ``pattern`` (missing values pass)."""
    return Rule(f"{entity}.{name}.format", entity, name, severity, f"{name} is not {what}",
                lambda f, _c: _per_distinct(f[name], lambda v: not pattern.fullmatch(v)))  # fmt: skip


def one_of(
    entity: str, name: str, allowed: Iterable[Any], severity: Severity = "error", rule: str = ""
) -> Rule:
    """A given value must be one of ``allowed``."""
    allowed_list = list(allowed)
    values = frozenset(str(v) for v in allowed_list)
    shown = ", ".join(sorted(values))
    return Rule(rule or f"{entity}.{name}.allowed", entity, name, severity, f"{name} must be one of: {shown}",
                lambda f, _c: _per_distinct(f[name], lambda v: v not in values),
                allowed=tuple(str(v) for v in allowed_list))  # fmt: skip


def in_range(
    entity: str,
    name: str,
    minimum: float | None = None,
    maximum: float | None = None,
    severity: Severity = "error",
    rule: str = "",
) -> Rule:
    """A given number must lie within [minimum, maximum]."""
    bounds = f"between {minimum} and {maximum}" if minimum is not None and maximum is not None else (
        f">= {minimum}" if minimum is not None else f"<= {maximum}")  # fmt: skip

    def violated(frame: pd.DataFrame, _context: RuleContext) -> pd.Series:
        numbers = decimals(frame[name])
        bad = present(frame[name]) & numbers.isna()  # given but not a number
        if minimum is not None:
            bad |= numbers < minimum
        if maximum is not None:
            bad |= numbers > maximum
        return bad

    return Rule(
        rule or f"{entity}.{name}.range", entity, name, severity, f"{name} must be {bounds}", violated
    )


_UNIQUE_RULES = itertools.count()


def unique(entity: str, name: str, severity: Severity = "error") -> Rule:
    """A given value may appear only once per source (the first occurrence passes)."""
    rule = f"{entity}.{name}.unique"
    # what this rule saw, apart from another unique rule on the same field (a project renames its rules)
    remembered = f"{rule}#{next(_UNIQUE_RULES)}"

    def violated(frame: pd.DataFrame, context: RuleContext) -> pd.Series:
        given = present(frame[name])
        texts = frame[name].astype(str)
        repeated = given & texts.duplicated(keep="first")
        if context.seen is not None:  # a piece of the source: values of the pieces before it count too
            earlier = context.seen.setdefault(remembered, set())
            if earlier:
                repeated |= given & texts.isin(earlier)
            earlier.update(texts[given & ~repeated])
        return repeated

    return Rule(rule, entity, name, severity, f"{name} appears more than once in this source", violated)


# --------------------------------------------------------------------------- domain rules


def is_iso4217(code: str) -> bool:
    """Return True for an active ISO 4217 currency code (CNY, USD, EUR…)."""
    # pycountry matches case-insensitively; a code is written in capitals (rate tables are keyed by it).
    return len(code) == 3 and code.isupper() and pycountry.currencies.get(alpha_3=code) is not None


USCC_SHAPE = r"^[0-9]{8}[0-9A-HJ-NPQRTUWXY]{10}$"  # what python-stdnum accepts once a code is compact
_USCC_ALPHABET = "0123456789ABCDEFGHJKLMNPQRTUWXY"
_USCC_WEIGHTS = np.array([1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28], dtype=np.int64)
_USCC_VALUE = np.full(256, 0, dtype=np.int64)
for _position, _character in enumerate(_USCC_ALPHABET):
    _USCC_VALUE[ord(_character)] = _position


def uscc_check_digits_ok(codes: pa.Array) -> np.ndarray:
    """Check digits of codes matching ``USCC_SHAPE``, all at once (python-stdnum's arithmetic)."""
    if len(codes) == 0:
        return np.zeros(0, dtype=bool)
    offsets = np.frombuffer(codes.buffers()[1], dtype=np.int32)[codes.offset : codes.offset + len(codes) + 1]
    data = np.frombuffer(codes.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    values = _USCC_VALUE[data.reshape(-1, 18)]
    expected = (31 - (values[:, :17] * _USCC_WEIGHTS).sum(axis=1)) % 31
    return np.asarray(values[:, 17] == expected)


def uscc_is_valid(code: str) -> bool:
    """python-stdnum's ``uscc.is_valid``, False also where python-stdnum raises.

    Its digit check of the first eight characters is ``^[0-9]+$``, whose ``$`` matches before a final
    newline: a compact code with a newline as its eighth character passes, and the check digit's
    ``_alphabet.index("\\n")`` raises ValueError (python-stdnum 2.2).
    """
    try:
        return bool(stdnum_uscc.is_valid(code))
    except ValueError:
        return False


def valid_uscc(codes: Sequence[str]) -> np.ndarray:
    """Return ``uscc_is_valid`` (python-stdnum's verdict) of each code, compact codes checked all at once.

    A code already compact (18 characters, digits then the code alphabet) is checked by array arithmetic;
    anything else (spaces, dashes, lower case, a wrong length) goes to python-stdnum itself.
    """
    try:
        text = pa.array(codes, type=pa.string())
    except (pa.ArrowException, UnicodeError):  # a lone surrogate from a damaged file: one by one
        return np.array([uscc_is_valid(code) for code in codes], dtype=bool)
    shaped = pc.match_substring_regex(text, USCC_SHAPE).to_numpy(zero_copy_only=False)
    valid = np.zeros(len(codes), dtype=bool)
    compact = np.flatnonzero(shaped)
    if len(compact):
        valid[compact] = uscc_check_digits_ok(text.take(pa.array(compact)))
    for position in np.flatnonzero(~shaped).tolist():
        valid[position] = uscc_is_valid(codes[position])
    return valid


def _per_distinct_at_once(values: pd.Series, test: Callable[[list[str]], np.ndarray]) -> pd.Series:
    """Apply ``test`` to all distinct present values (as text) in one call; spread its verdicts to the rows."""
    given = present(values).to_numpy(dtype=bool)
    result = np.zeros(len(values), dtype=bool)
    if given.any():
        subset = values[given].astype(str)
        distinct = subset.unique().tolist()
        verdict = dict(zip(distinct, test(distinct).tolist(), strict=True))
        result[given] = subset.map(verdict).to_numpy(dtype=bool)
    return pd.Series(result, index=values.index)


def _probability_matches_stage(frame: pd.DataFrame, _context: RuleContext) -> pd.Series:
    probability = decimals(frame["probability"])
    stage = frame["stage"].astype(str)
    won = stage.isin(WON_STAGES) & probability.notna() & (probability != 100)
    lost = stage.isin(LOST_STAGES) & probability.notna() & (probability != 0)
    open_ = ~stage.isin(CLOSED_STAGES) & present(frame["stage"]) & probability.isin([0.0, 100.0])
    return won | lost | open_


def _won_needs_close_date(frame: pd.DataFrame, _context: RuleContext) -> pd.Series:
    return frame["stage"].astype(str).isin(WON_STAGES) & ~present(frame["closed_on"])


# Finance documents whose amount may be negative when they are marked red-letter (refunds, 红字 entries).
RED_LETTER_ENTITIES = ("receivable", "payment", "payment_application")


def _unmarked_negative(frame: pd.DataFrame, _context: RuleContext) -> pd.Series:
    """A negative amount without ``red_letter``, or an amount given that is not a number."""
    numbers = decimals(frame["amount"])
    bad = present(frame["amount"]) & numbers.isna()
    if "red_letter" in frame.columns:
        marked = frame["red_letter"].map(lambda v: v is True or str(v).strip().lower() in TRUE_TEXTS)
    else:
        marked = pd.Series(False, index=frame.index)
    return (bad | ((numbers < 0) & ~marked.astype(bool))).fillna(False).astype(bool)


TRUE_TEXTS = frozenset({"true", "1", "yes", "y"})


def _not_in_future(name: str) -> Check:
    def violated(frame: pd.DataFrame, context: RuleContext) -> pd.Series:
        limit = pd.Timestamp(context.today + context.future_tolerance)
        return (dates(frame[name]) > limit).fillna(False).astype(bool)

    return violated


def builtin_rules() -> list[Rule]:
    """Return the rules every project gets (override their severity in project.yaml)."""
    rules: list[Rule] = []
    for entity, definition in ENTITIES.items():
        for name, field_def in definition.fields.items():
            if field_def.required:
                rules.append(required(entity, name))
    for entity, names in {
        "customer": ("phone",),
        "contact": ("mobile", "phone"),
        "sales_rep": ("phone",),
    }.items():
        rules += [matches(entity, n, E164, "an E.164 phone number (+8613800000000)", "warn") for n in names]
    for entity in ("customer", "contact", "sales_rep"):
        rules.append(matches(entity, "email", EMAIL, "an e-mail address", "warn"))
    rules.append(Rule("customer.credit_code.check_digit", "customer", "credit_code", "error",
                      "credit_code is not a valid 统一社会信用代码 (18 characters, check digit)",
                      lambda f, _c: _per_distinct_at_once(f["credit_code"], lambda v: ~valid_uscc(v))))  # fmt: skip
    rules.append(one_of("customer", "status", ("active", "inactive", "prospect")))
    rules.append(one_of("opportunity", "stage", (s["code"] for s in STAGES)))
    rules.append(in_range("opportunity", "probability", 0, 100))
    rules.append(Rule("opportunity.probability.matches_stage", "opportunity", "probability", "warn",
                      "probability contradicts the stage (won = 100, lost = 0, open stages between)",
                      _probability_matches_stage, ("probability", "stage")))  # fmt: skip
    rules.append(Rule("opportunity.closed_on.required_when_won", "opportunity", "closed_on", "error",
                      "a won opportunity needs its close date (closed_on)", _won_needs_close_date,
                      ("stage", "closed_on")))  # fmt: skip
    for entity, name in (
        ("opportunity", "closed_on"),
        ("sales_order", "order_date"),
        ("payment", "received_on"),
        ("receivable", "invoiced_on"),
    ):
        rules.append(Rule(f"{entity}.{name}.not_in_future", entity, name, "error",
                          f"{name} lies in the future", _not_in_future(name)))  # fmt: skip
    for entity, name in (
        ("opportunity", "amount"),
        ("sales_order", "total_amount"),
        ("sales_order_line", "quantity"),
    ):
        rules.append(in_range(entity, name, minimum=0))
    # A negative credit limit is a sign read wrong ((500) in an accountant's sheet): loaded, and reported
    rules.append(in_range("customer", "credit_limit", minimum=0, severity="warn"))
    for entity in RED_LETTER_ENTITIES:
        rules.append(Rule(f"{entity}.amount.range", entity, "amount", "error",
                          "a negative amount is a refund or red-letter entry (红字) only when marked red_letter; "
                          "map red_letter from the document, or correct the amount", _unmarked_negative))  # fmt: skip
    for entity, definition in ENTITIES.items():
        if "original_currency" in definition.fields:
            rules.append(Rule(f"{entity}.original_currency.iso4217", entity, "original_currency", "error",
                              "original_currency is not an ISO 4217 currency code (CNY, USD, EUR…)",
                              lambda f, _c: _per_distinct(f["original_currency"], lambda v: not is_iso4217(v))))  # fmt: skip
            rules.append(Rule(f"{entity}.original_amount.needs_currency", entity, "original_amount", "error",
                              "original_amount without original_currency: the amount's currency is unknown",
                              lambda f, _c: present(f["original_amount"]) & ~present(f["original_currency"]),
                              ("original_amount", "original_currency")))  # fmt: skip
    rules.append(Rule("sales_order_line.amount.matches_quantity_price", "sales_order_line", "amount", "warn",
                      "amount differs from quantity × unit_price by more than 1%", _line_amount_mismatch,
                      ("amount", "quantity", "unit_price")))  # fmt: skip
    return rules


def _line_amount_mismatch(frame: pd.DataFrame, _context: RuleContext) -> pd.Series:
    amount, quantity, price = (decimals(frame[c]) for c in ("amount", "quantity", "unit_price"))
    expected = quantity * price
    return ((amount - expected).abs() > expected.abs() * 0.01 + 0.01).fillna(False).astype(bool)


# --------------------------------------------------------------------------- project rules


@dataclass(frozen=True)
class RuleSpec:
    """A project rule from ``project.yaml`` (exactly one of required/pattern/one_of/min/max/unique)."""

    name: str
    entity: str
    field: str
    severity: Severity = "error"
    required: bool = False
    pattern: str | None = None
    one_of: Sequence[Any] | None = None
    min: float | None = None
    max: float | None = None
    unique: bool = False
    message: str | None = None

    def compile(self) -> Rule:
        """Return the executable rule."""
        if self.required:
            rule = required(self.entity, self.field, self.severity)
        elif self.pattern is not None:
            rule = matches(
                self.entity, self.field, re.compile(self.pattern), f"matching {self.pattern}", self.severity
            )
        elif self.one_of is not None:
            rule = one_of(self.entity, self.field, self.one_of, self.severity)
        elif self.min is not None or self.max is not None:
            rule = in_range(self.entity, self.field, self.min, self.max, self.severity)
        else:
            rule = unique(self.entity, self.field, self.severity)
        return replace(rule, name=self.name, message=self.message or rule.message)


def ruleset(
    overrides: Mapping[str, SeverityOrOff] | None = None, extra: Sequence[RuleSpec] = ()
) -> list[Rule]:
    """Return the built-in rules with project severities applied, plus the project's own rules."""
    overrides = overrides or {}
    known = {rule.name for rule in builtin_rules()}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise KeyError(f"unknown rule(s) {', '.join(unknown)}")
    rules = []
    for rule in builtin_rules():
        severity = overrides.get(rule.name, rule.severity)
        if severity != "off":
            rules.append(replace(rule, severity=severity))
    return rules + [spec.compile() for spec in extra]


# --------------------------------------------------------------------------- running rules


QUARANTINE_COLUMNS = ["index", "rule", "field", "value", "reason", "severity"]


def validate(
    entity: str, frame: pd.DataFrame, rules: Sequence[Rule], context: RuleContext | None = None
) -> pd.DataFrame:
    """Return one row per violation (index into ``frame``, rule, field, value, reason, severity)."""
    context = context or RuleContext()
    parts = []
    for rule in rules:
        if rule.entity != entity or not rule.applies_to(frame):
            continue
        bad = rule.violated(frame, context)
        if not bad.any():
            continue
        hits = frame.index[bad.to_numpy(dtype=bool)]
        parts.append(pd.DataFrame({
            "index": hits, "rule": rule.name, "field": rule.field,
            "value": frame.loc[hits, rule.field].map(lambda v: None if v is None or v != v else str(v)).to_numpy(),
            "reason": rule.message, "severity": rule.severity,
        }))  # fmt: skip
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in QUARANTINE_COLUMNS})
    return pd.concat(parts, ignore_index=True)


# --------------------------------------------------------------------------- rules on the whole core


@dataclass(frozen=True)
class CoreViolation:
    """A rule the loaded core breaks: how many records, and a sample of them."""

    rule: str
    message: str
    count: int
    sample: list[dict[str, Any]]


def core_violations(session: Session, entity: str, sample: int = 10) -> list[CoreViolation]:
    """Return the core-wide rules ``entity`` breaks (checked after its load)."""
    found: list[CoreViolation] = []

    def add(rule: str, message: str, rows: Sequence[Any], columns: Sequence[str]) -> None:
        found.append(CoreViolation(rule, message, len(rows),
                                   [dict(zip(columns, map(to_json, r), strict=True)) for r in rows[:sample]]))  # fmt: skip

    definition = ENTITIES[entity]
    model: Any = definition.model
    for name, field_def in definition.references.items():
        target: Any = ENTITIES[field_def.references or ""].model
        if not hasattr(target, "merged_into_id") or field_def.references == entity:
            continue
        column = getattr(model, field_def.column)
        rows = session.execute(
            select(model.id, column, target.merged_into_id).join(target, column == target.id)
            .where(target.merged_into_id.is_not(None))
        ).all()  # fmt: skip
        add(f"{entity}.{name}.not_merged", f"{name} points at a merged {field_def.references}; re-point it at the survivor",
            rows, ("id", f"{name}_id", "survivor_id"))  # fmt: skip
    if entity == "customer":
        rows = session.execute(
            select(Customer.credit_code, func.count())
            .where(Customer.merged_into_id.is_(None), Customer.credit_code.is_not(None))
            .group_by(Customer.credit_code).having(func.count() > 1)
        ).all()  # fmt: skip
        add(
            "customer.credit_code.unique",
            "active customers share a 统一社会信用代码",
            rows,
            ("credit_code", "customers"),
        )
    if entity == "payment_application":
        applied = func.sum(PaymentApplication.amount)
        for target, key, name, message in (
            (Receivable, PaymentApplication.receivable_id, "receivable", "payments applied to a receivable exceed its amount"),
            (Payment, PaymentApplication.payment_id, "payment", "a payment is applied for more than it brought in"),
        ):  # fmt: skip
            number = getattr(target, f"{name}_no")
            rows = session.execute(
                select(number, target.amount, applied).join(PaymentApplication, key == target.id)
                .group_by(target.id, number, target.amount).having(applied > target.amount)
            ).all()  # fmt: skip
            add(
                f"payment_application.amount.within_{name}",
                message,
                rows,
                (f"{name}_no", "amount", "applied"),
            )
    return found
