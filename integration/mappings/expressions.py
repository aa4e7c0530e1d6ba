"""The mapping expression language: SQL-like conditions and computed values over source columns.

One language serves ``source.where``, computed fields (``expr``) and conditional fields (``when``), on every
connector. Text is parsed by sqlglot (SQL syntax consultants already know); only the node types listed in
``ALLOWED`` are accepted, so nothing but these operators and functions can run. A parsed expression is

* type-checked when the mapping is checked (unknown column or function, wrong argument, type mismatch:
  a located error, never ignored);
* evaluated vectorized over a chunk with pyarrow.compute (no Python per row, no ``eval``); a row-level
  failure (division by zero, a text that is not a date in ``cast``) yields a reason for that row;
* rendered as the source database's SQL (sqlglot transpiles it) when a ``where`` is pushed down.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

# Kinds of values an expression yields. "any" is a column whose type is only known at run time.
BOOL, NUMBER, TEXT, DATE, NULL, ANY = "bool", "number", "text", "date", "null", "any"

FUNCTIONS = (
    "lower(s)",
    "upper(s)",
    "trim(s)",
    "ltrim(s)",
    "rtrim(s)",
    "length(s)",
    "substr(s, start[, length])",
    "replace(s, 'from', 'to')",
    "concat(a, b, ...)",
    "coalesce(a, b, ...)",
    "nullif(a, b)",
    "abs(x)",
    "round(x[, digits])",
    "cast(x as int|decimal|text|date)",
    "current_date",
    "date_add(d, days)",
    "datediff(a, b)",
    "year(d)",
    "month(d)",
    "day(d)",
)
OPERATORS = (
    "= != <> < <= > >=",
    "in (...)",
    "not in (...)",
    "between a and b",
    "is null",
    "is not null",
    "like / not like ('%', '_')",
    "and or not",
    "+ - * / %",
    "|| (concatenate)",
    "case when ... then ... else ... end",
)
ALLOWED_TEXT = f"operators: {', '.join(OPERATORS)}; functions: {', '.join(FUNCTIONS)}"

_ANONYMOUS = {"ltrim", "rtrim", "date_add", "substr"}
_CAST_TYPES = {
    exp.DataType.Type.INT: NUMBER,
    exp.DataType.Type.BIGINT: NUMBER,
    exp.DataType.Type.SMALLINT: NUMBER,
    exp.DataType.Type.DECIMAL: NUMBER,
    exp.DataType.Type.DOUBLE: NUMBER,
    exp.DataType.Type.FLOAT: NUMBER,
    exp.DataType.Type.TEXT: TEXT,
    exp.DataType.Type.VARCHAR: TEXT,
    exp.DataType.Type.CHAR: TEXT,
    exp.DataType.Type.DATE: DATE,
    exp.DataType.Type.DATETIME: DATE,
    exp.DataType.Type.TIMESTAMP: DATE,
}


class ExpressionError(Exception):
    """An expression that cannot be evaluated; ``offset`` is the 0-based position in its text, if known."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset


def _offset(node: exp.Expression) -> int | None:
    for candidate in (node, *node.find_all(exp.Identifier, exp.Literal)):
        meta = getattr(candidate, "_meta", None) or {}
        if "start" in meta:
            return int(meta["start"])
    return None


def _name(node: exp.Expression) -> str:
    if isinstance(node, exp.Anonymous):
        return str(node.name).lower()
    return str(node.key).lower()


@dataclass(frozen=True)
class Expression:
    """A parsed, checked expression: its text, syntax tree, the columns it reads and the kind it yields."""

    text: str
    tree: exp.Expression
    columns: tuple[str, ...]
    kind: str
    column_kinds: tuple[tuple[str, str], ...] = ()

    def sql(self, dialect: str | None = None) -> str:
        """Return the expression in ``dialect``'s SQL (identifiers quoted), for pushing a filter down.

        Date arithmetic is written as the dialect's date functions: ``d + 30`` on a date becomes
        ``DATE_ADD``/``DATEADD``/``DATE(d, '30 DAY')``, ``d1 - d2`` a day difference.
        """
        tree = self.tree.copy()
        checker = _Checker(None, dict(self.column_kinds))
        try:
            checker.kind(tree)
        except ExpressionError:  # the database's column types disagree with a use: its SQL decides
            checker = _Checker(None, {})
            checker.kind(tree)
        day = exp.Var(this="DAY")

        def rewrite(node: exp.Expression) -> exp.Expression:
            if isinstance(node, exp.Add | exp.Sub):
                left, right = checker.seen.get(id(node.this)), checker.seen.get(id(node.expression))
                if left == DATE and right == DATE and isinstance(node, exp.Sub):
                    return exp.DateDiff(this=node.this, expression=node.expression, unit=day.copy())
                if left == DATE and right != DATE:
                    days = node.expression if isinstance(node, exp.Add) else _negated(node.expression)
                    return exp.DateAdd(this=node.this, expression=days, unit=day.copy())
                if right == DATE and isinstance(node, exp.Add):
                    return exp.DateAdd(this=node.expression, expression=node.this, unit=day.copy())
            if isinstance(node, exp.DateAdd | exp.DateDiff) and node.args.get("unit") is None:
                node.set("unit", day.copy())
            return node

        return tree.transform(rewrite, copy=False).sql(dialect=dialect, identify=True)


def _negated(node: exp.Expression) -> exp.Expression:
    if isinstance(node, exp.Literal) and not node.is_string:
        return exp.Literal.number(-float(node.this) if "." in str(node.this) else -int(node.this))
    return exp.Neg(this=exp.Paren(this=node))


def parse(
    text: str,
    columns: Sequence[str] | None = None,
    *,
    condition: bool = False,
    kinds: Mapping[str, str] | None = None,
) -> Expression:
    """Parse and check ``text``; ``columns`` are the names it may use (None: not known yet).

    ``condition`` asks for a true/false result (``where``, ``when``). Raises ExpressionError.
    """
    if not isinstance(text, str) or not text.strip():
        raise ExpressionError("an expression must be non-empty text")
    try:
        tree = sqlglot.parse_one(text)
    except (ParseError, TokenError) as exc:
        errors = getattr(exc, "errors", None) or []
        offset = None
        if errors and errors[0].get("col"):
            offset = max(0, int(errors[0]["col"]) - 1)
        detail = str(errors[0]["description"]) if errors else str(exc).splitlines()[0]
        raise ExpressionError(f"cannot parse '{text}': {detail}; allowed: {ALLOWED_TEXT}", offset) from None
    if not isinstance(tree, exp.Expression):
        raise ExpressionError("an expression must be non-empty text")
    checker = _Checker(columns, kinds or {})
    kind = checker.kind(tree)
    computed = (exp.Add, exp.Sub, exp.Mul, exp.Div, exp.Mod, exp.Neg, exp.DPipe, exp.Concat, exp.Func)
    if (
        condition
        and kind == ANY
        and isinstance(tree, computed)
        and not isinstance(tree, exp.Coalesce | exp.Nullif)
    ):
        raise ExpressionError(
            f"'{text}' is a computed value, not a condition (true/false); compare it, e.g. x = 1", 0
        )
    if condition and kind not in (BOOL, NULL, ANY):
        raise ExpressionError(
            f"'{text}' is a {kind}, not a condition (true/false); compare it, e.g. x = 1", 0
        )
    used = tuple(checker.used)
    return Expression(
        text, tree, used, kind, tuple((c, checker.kinds[c]) for c in used if c in checker.kinds)
    )


class _Checker:
    """Walks a tree once: accepts only the allowed nodes, collects columns and infers kinds."""

    def __init__(self, columns: Sequence[str] | None, kinds: Mapping[str, str]) -> None:
        self.columns = None if columns is None else list(columns)
        self.kinds = kinds
        self.used: list[str] = []
        self.seen: dict[int, str] = {}  # id(node) -> its kind, for rendering date arithmetic as SQL

    def fail(self, node: exp.Expression, message: str) -> ExpressionError:
        return ExpressionError(message, _offset(node))

    def expect(self, node: exp.Expression, wanted: tuple[str, ...], what: str) -> str:
        kind = self.kind(node)
        if kind not in (*wanted, NULL, ANY):
            raise self.fail(
                node, f"type mismatch: {what} needs {' or '.join(wanted)}, got {kind} ({node.sql()})"
            )
        return kind

    def kind(self, node: exp.Expression) -> str:
        """Return the kind ``node`` yields (and remember it); raise ExpressionError for what is not allowed."""
        found = self._kind(node)
        self.seen[id(node)] = found
        return found

    def _kind(self, node: exp.Expression) -> str:  # one branch per node type
        if isinstance(node, exp.Paren):
            return self.kind(node.this)
        if isinstance(node, exp.Column):
            if node.table:
                raise self.fail(node, f"'{node.sql()}': name a column of this table without a table prefix")
            name = str(node.name)
            if self.columns is not None and name not in self.columns:
                from integration.yamlconf import close_names

                raise self.fail(
                    node,
                    f"unknown column '{name}'{close_names(name, self.columns)}; columns: {', '.join(self.columns)}",
                )
            if name not in self.used:
                self.used.append(name)
            return self.kinds.get(name, ANY)
        if isinstance(node, exp.Literal):
            return TEXT if node.is_string else NUMBER
        if isinstance(node, exp.Null):
            return NULL
        if isinstance(node, exp.Boolean):
            return BOOL
        if isinstance(node, exp.And | exp.Or):
            self.expect(node.this, (BOOL,), node.key)
            self.expect(node.expression, (BOOL,), node.key)
            return BOOL
        if isinstance(node, exp.Not):
            self.expect(node.this, (BOOL,), "not")
            return BOOL
        if isinstance(node, exp.EQ | exp.NEQ | exp.GT | exp.GTE | exp.LT | exp.LTE):
            left, right = self.kind(node.this), self.kind(node.expression)
            _comparable(self, node, left, right)
            return BOOL
        if isinstance(node, exp.Is):
            if not isinstance(node.expression, exp.Null):
                raise self.fail(node, "'is' takes null: x is null / x is not null")
            self.kind(node.this)
            return BOOL
        if isinstance(node, exp.In):
            if node.args.get("query") or node.args.get("unnest") or node.args.get("field"):
                raise self.fail(node, "'in' takes a list of values: x in ('a', 'b')")
            left = self.kind(node.this)
            for item in node.expressions:
                if not isinstance(item, exp.Literal | exp.Null | exp.Neg | exp.Boolean):
                    raise self.fail(item, f"'in' takes literal values, not {item.sql()}")
                _comparable(self, item, left, self.kind(item))
            return BOOL
        if isinstance(node, exp.Between):
            left = self.kind(node.this)
            _comparable(self, node, left, self.kind(node.args["low"]))
            _comparable(self, node, left, self.kind(node.args["high"]))
            return BOOL
        if isinstance(node, exp.Like | exp.ILike):
            self.expect(node.this, (TEXT,), "like")
            if not (isinstance(node.expression, exp.Literal) and node.expression.is_string):
                raise self.fail(node.expression, "like takes a quoted pattern: x like '%abc%'")
            return BOOL
        if isinstance(node, exp.Add | exp.Sub):
            left = self.expect(node.this, (NUMBER, DATE), node.key)
            right = self.expect(node.expression, (NUMBER, DATE), node.key)
            if ANY in (left, right) and DATE not in (left, right):
                return ANY
            if ANY in (left, right):
                return ANY if isinstance(node, exp.Sub) else DATE
            if left == DATE and right == DATE:
                if isinstance(node, exp.Add):
                    raise self.fail(node, "type mismatch: two dates cannot be added (subtract them for days)")
                return NUMBER
            if DATE in (left, right):
                if isinstance(node, exp.Sub) and right == DATE and left != ANY:
                    raise self.fail(node, "type mismatch: a number minus a date")
                return DATE
            return ANY if ANY in (left, right) else NUMBER
        if isinstance(node, exp.Mul | exp.Div | exp.Mod):
            self.expect(node.this, (NUMBER,), node.key)
            self.expect(node.expression, (NUMBER,), node.key)
            return NUMBER
        if isinstance(node, exp.Neg):
            self.expect(node.this, (NUMBER,), "minus")
            return NUMBER
        if isinstance(node, exp.DPipe):
            self.kind(node.this)
            self.kind(node.expression)
            return TEXT
        if isinstance(node, exp.Concat):
            for item in node.expressions:
                self.kind(item)
            return TEXT
        if isinstance(node, exp.Lower | exp.Upper):
            self.expect(node.this, (TEXT,), _name(node))
            return TEXT
        if isinstance(node, exp.Trim):
            self.expect(node.this, (TEXT,), "trim")
            if node.args.get("expression") is not None:
                raise self.fail(node, "trim takes one argument: trim(s)")
            return TEXT
        if isinstance(node, exp.Length):
            self.expect(node.this, (TEXT,), "length")
            return NUMBER
        if isinstance(node, exp.Substring):
            self.expect(node.this, (TEXT,), "substr")
            for part in ("start", "length"):
                arg = node.args.get(part)
                if arg is not None and not (isinstance(arg, exp.Literal) and not arg.is_string):
                    raise self.fail(node, f"substr: {part} must be a whole number, e.g. substr(s, 1, 4)")
            return TEXT
        if isinstance(node, exp.Replace):
            self.expect(node.this, (TEXT,), "replace")
            for arg in (node.expression, node.args.get("replacement")):
                if not (isinstance(arg, exp.Literal) and arg.is_string):
                    raise self.fail(node, "replace takes quoted texts: replace(s, 'a', 'b')")
            return TEXT
        if isinstance(node, exp.Coalesce):
            kinds = [self.kind(node.this), *(self.kind(e) for e in node.expressions)]
            return _common(self, node, kinds)
        if isinstance(node, exp.Nullif):
            left = self.kind(node.this)
            _comparable(self, node, left, self.kind(node.expression))
            return left
        if isinstance(node, exp.Abs):
            self.expect(node.this, (NUMBER,), "abs")
            return NUMBER
        if isinstance(node, exp.Round):
            self.expect(node.this, (NUMBER,), "round")
            digits = node.args.get("decimals")
            if digits is not None and not (isinstance(digits, exp.Literal) and not digits.is_string):
                raise self.fail(node, "round: digits must be a whole number, e.g. round(x, 2)")
            return NUMBER
        if isinstance(node, exp.Cast | exp.TryCast):
            target = _CAST_TYPES.get(node.to.this)
            if target is None:
                raise self.fail(
                    node, f"cast to {node.to.sql()} is not supported; use int, decimal, text or date"
                )
            self.kind(node.this)
            return target
        if isinstance(node, exp.CurrentDate):
            return DATE
        if isinstance(node, exp.DateAdd):
            self.expect(node.this, (DATE, TEXT), "date_add")
            self.expect(node.expression, (NUMBER,), "date_add")
            unit = node.args.get("unit")
            if unit is not None and str(unit.name).lower() not in ("day", "days"):
                raise self.fail(node, "date_add counts days: date_add(d, 30)")
            return DATE
        if isinstance(node, exp.DateDiff):
            self.expect(node.this, (DATE, TEXT), "datediff")
            self.expect(node.expression, (DATE, TEXT), "datediff")
            return NUMBER
        if isinstance(node, exp.Year | exp.Month | exp.Day):
            self.expect(node.this, (DATE, TEXT), _name(node))
            return NUMBER
        if isinstance(node, exp.Case):
            if node.this is not None:
                raise self.fail(node, "use the searched form: case when x = 1 then ... end")
            values = []
            for branch in node.args.get("ifs") or []:
                self.expect(branch.this, (BOOL,), "when")
                values.append(self.kind(branch.args["true"]))
            if node.args.get("default") is not None:
                values.append(self.kind(node.args["default"]))
            return _common(self, node, values)
        if isinstance(node, exp.If):
            self.expect(node.this, (BOOL,), "if")
            values = [self.kind(node.args["true"])]
            if node.args.get("false") is not None:
                values.append(self.kind(node.args["false"]))
            return _common(self, node, values)
        if isinstance(node, exp.Anonymous):
            name = _name(node)
            from integration.yamlconf import close_names

            known = [f.split("(")[0] for f in FUNCTIONS]
            raise self.fail(
                node,
                f"unknown function '{name}'{close_names(name, known)}; functions: {', '.join(FUNCTIONS)}",
            )
        if isinstance(node, exp.Func):
            raise self.fail(
                node, f"function '{_name(node)}' is not allowed; functions: {', '.join(FUNCTIONS)}"
            )
        raise self.fail(node, f"'{node.sql()}' is not allowed here; {ALLOWED_TEXT}")


def _comparable(checker: _Checker, node: exp.Expression, left: str, right: str) -> None:
    if ANY in (left, right) or NULL in (left, right) or left == right:
        return
    if {left, right} == {DATE, TEXT}:
        return  # '2024-01-01' against a date column
    raise checker.fail(node, f"type mismatch: cannot compare {left} with {right} ({node.sql()})")


def _common(checker: _Checker, node: exp.Expression, kinds: Sequence[str]) -> str:
    known = {k for k in kinds if k not in (NULL, ANY)}
    if len(known) > 1:
        raise checker.fail(
            node, f"type mismatch: the values mix {' and '.join(sorted(known))} ({node.sql()})"
        )
    if known:
        return known.pop()
    return ANY if ANY in kinds else NULL


# --------------------------------------------------------------------------- evaluation


@dataclass
class _Context:
    """What evaluation needs: the columns (as Arrow arrays) and the row-level failures found so far."""

    columns: Mapping[str, pd.Series] | pd.DataFrame
    length: int
    arrays: dict[str, pa.Array] = field(default_factory=dict)
    failed: pa.Array | None = None  # reasons (text, null where fine)

    def column(self, name: str) -> pa.Array:
        if name not in self.arrays:
            self.arrays[name] = to_arrow(self.columns[name])
        return self.arrays[name]

    def fail(self, mask: pa.Array, reasons: pa.Array | str) -> None:
        mask = pc.fill_null(mask, False)
        if not pc.any(mask).as_py():
            return
        reason = (
            reasons if isinstance(reasons, pa.Array | pa.ChunkedArray) else pa.scalar(reasons, pa.string())
        )
        new = pc.if_else(mask, reason, pa.scalar(None, pa.string()))
        self.failed = new if self.failed is None else pc.coalesce(self.failed, new)

    def broadcast(self, value: Any) -> pa.Array:
        if isinstance(value, pa.Scalar):
            if not value.is_valid:
                return pa.nulls(self.length, value.type if value.type != pa.null() else pa.null())
            return pc.take(
                pa.array([value.as_py()], value.type), pa.array(np.zeros(self.length, dtype=np.int32))
            )
        return _combined(value)


def _combined(array: Any) -> pa.Array:
    return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array


def to_arrow(values: pd.Series) -> pa.Array:
    """Return a chunk column as an Arrow array: text, numbers, dates or booleans (mixed columns as text)."""
    if isinstance(values.dtype, pd.ArrowDtype):
        return _combined(pa.array(values.array))
    try:
        array = pa.array(values, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
        text = values.astype(object)
        mask = text.isna()
        strings = text.astype(str).to_numpy(dtype=object)
        strings[mask.to_numpy()] = None
        array = pa.array(strings, type=pa.string())
    if pa.types.is_decimal(array.type):
        array = pc.cast(array, pa.float64())
    elif (
        pa.types.is_time(array.type) or pa.types.is_large_string(array.type) or pa.types.is_binary(array.type)
    ):
        array = pc.cast(array, pa.string())
    elif pa.types.is_null(array.type):
        array = pa.nulls(len(array), pa.string())
    return _combined(array)


def _is_text(v: Any) -> bool:
    return bool(pa.types.is_string(v.type) or pa.types.is_large_string(v.type))


def _is_number(v: Any) -> bool:
    return bool(pa.types.is_integer(v.type) or pa.types.is_floating(v.type) or pa.types.is_decimal(v.type))


def _is_date(v: Any) -> bool:
    return bool(pa.types.is_date(v.type) or pa.types.is_timestamp(v.type))


_NUMERIC = r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$"


def to_number(v: Any) -> Any:
    """Return an Arrow array or scalar as numbers (text that is not a number: null)."""
    if _is_number(v):
        return pc.cast(v, pa.float64()) if pa.types.is_decimal(v.type) else v
    if pa.types.is_boolean(v.type):
        return pc.cast(v, pa.int64())
    if pa.types.is_null(v.type):
        return pc.cast(v, pa.float64())
    if _is_text(v):
        if isinstance(v, pa.Scalar):
            try:
                return (
                    pa.scalar(float(v.as_py()), pa.float64()) if v.is_valid else pa.scalar(None, pa.float64())
                )
            except ValueError:
                return pa.scalar(None, pa.float64())
        ok = pc.fill_null(pc.match_substring_regex(v, _NUMERIC), False)
        return pc.cast(pc.utf8_trim_whitespace(pc.if_else(ok, v, pa.scalar(None, pa.string()))), pa.float64())
    return pc.cast(v, pa.float64())


def _to_timestamp(v: Any) -> Any:
    """Return ``v`` as timestamp[us] (text: ISO dates and date-times; anything else unparsable: null)."""
    if pa.types.is_timestamp(v.type):
        return pc.cast(v, pa.timestamp("us", v.type.tz)) if v.type.unit != "us" else v
    if pa.types.is_date(v.type):
        return pc.cast(v, pa.timestamp("us"))
    if pa.types.is_null(v.type):
        return pc.cast(v, pa.timestamp("us"))
    if _is_text(v):
        if isinstance(v, pa.Scalar):
            return pa.scalar(_parse_date_text(v.as_py()), pa.timestamp("us"))
        text = pc.utf8_trim_whitespace(v)
        stamp = pc.strptime(text, "%Y-%m-%d %H:%M:%S", "us", error_is_null=True)
        stamp = pc.coalesce(stamp, pc.strptime(text, "%Y-%m-%dT%H:%M:%S", "us", error_is_null=True))
        day = pc.strptime(pc.utf8_slice_codeunits(text, 0, 10), "%Y-%m-%d", "us", error_is_null=True)
        short = pc.fill_null(pc.less_equal(pc.utf8_length(text), 10), False)
        return pc.coalesce(stamp, pc.if_else(short, day, pa.scalar(None, pa.timestamp("us"))))
    raise ExpressionError(f"{v.type} is not a date")


def _parse_date_text(text: str | None) -> dt.datetime | None:
    if text is None:
        return None
    try:
        return dt.datetime.fromisoformat(text.strip())
    except ValueError:
        return None


def _to_date(v: Any) -> Any:
    if pa.types.is_date32(v.type):
        return v
    return pc.cast(_to_timestamp(v), pa.date32())


def to_text(v: Any) -> Any:
    """Return an Arrow array or scalar as text (whole floats without ``.0``)."""
    if _is_text(v):
        return v
    if pa.types.is_floating(v.type) and not isinstance(v, pa.Scalar):
        whole = pc.fill_null(pc.equal(pc.floor(v), v), False)
        as_int = pc.cast(pc.if_else(whole, v, pa.scalar(None, pa.float64())), pa.int64(), safe=False)
        return pc.coalesce(pc.cast(as_int, pa.string()), pc.cast(v, pa.string()))
    return pc.cast(v, pa.string())


def _align(left: Any, right: Any) -> tuple[Any, Any]:
    """Bring two operands of a comparison to one type, SQL style (text meets number: numbers)."""
    if left.type == right.type:
        return left, right
    if pa.types.is_null(left.type):
        return pc.cast(left, right.type), right
    if pa.types.is_null(right.type):
        return left, pc.cast(right, left.type)
    if _is_date(left) or _is_date(right):
        if pa.types.is_date32(left.type) and pa.types.is_date32(right.type):
            return left, right
        return _to_timestamp(left), _to_timestamp(right)
    if (
        _is_number(left)
        or _is_number(right)
        or pa.types.is_boolean(left.type)
        or pa.types.is_boolean(right.type)
    ):
        if pa.types.is_boolean(left.type) and pa.types.is_boolean(right.type):
            return left, right
        return pc.cast(to_number(left), pa.float64()), pc.cast(to_number(right), pa.float64())
    return to_text(left), to_text(right)


_COMPARE: dict[type[exp.Expression], Callable[..., Any]] = {
    exp.EQ: pc.equal,
    exp.NEQ: pc.not_equal,
    exp.GT: pc.greater,
    exp.GTE: pc.greater_equal,
    exp.LT: pc.less,
    exp.LTE: pc.less_equal,
}


def _literal(node: exp.Literal) -> pa.Scalar:
    if node.is_string:
        return pa.scalar(str(node.this), pa.string())
    text = str(node.this)
    try:
        return pa.scalar(int(text), pa.int64())
    except ValueError:
        return pa.scalar(float(text), pa.float64())


def _days(v: Any) -> Any:
    """Return a date array as whole days since 1970-01-01 (int64)."""
    return pc.cast(pc.cast(_to_date(v), pa.int32()), pa.int64())


def _from_days(v: Any) -> Any:
    return pc.cast(pc.cast(v, pa.int32()), pa.date32())


def _eval(node: exp.Expression, ctx: _Context) -> Any:
    if isinstance(node, exp.Paren):
        return _eval(node.this, ctx)
    if isinstance(node, exp.Column):
        return ctx.column(str(node.name))
    if isinstance(node, exp.Literal):
        return _literal(node)
    if isinstance(node, exp.Null):
        return pa.scalar(None, pa.null())
    if isinstance(node, exp.Boolean):
        return pa.scalar(bool(node.this), pa.bool_())
    if isinstance(node, exp.And):
        return pc.and_kleene(_bool(_eval(node.this, ctx)), _bool(_eval(node.expression, ctx)))
    if isinstance(node, exp.Or):
        return pc.or_kleene(_bool(_eval(node.this, ctx)), _bool(_eval(node.expression, ctx)))
    if isinstance(node, exp.Not):
        return pc.invert(_bool(_eval(node.this, ctx)))
    if type(node) in _COMPARE:
        left, right = _align(_eval(node.this, ctx), _eval(node.expression, ctx))
        return _COMPARE[type(node)](left, right)
    if isinstance(node, exp.Is):
        return pc.is_null(_eval(node.this, ctx))
    if isinstance(node, exp.In):
        value = _eval(node.this, ctx)
        items = [_eval(e, ctx) for e in node.expressions]
        items = [i for i in items if i.is_valid]
        if not items:
            return pa.scalar(None, pa.bool_())
        if _is_text(value) and all(_is_text(i) for i in items):
            options = pa.array([i.as_py() for i in items], pa.string())
        else:
            value = pc.cast(to_number(value), pa.float64())
            options = pa.array([to_number(i).as_py() for i in items], pa.float64())
        found = pc.is_in(value, value_set=options)
        return pc.if_else(pc.is_null(value), pa.scalar(None, pa.bool_()), found)
    if isinstance(node, exp.Between):
        value = _eval(node.this, ctx)
        low, high = _eval(node.args["low"], ctx), _eval(node.args["high"], ctx)
        a, b = _align(value, low)
        c, d = _align(value, high)
        return pc.and_kleene(pc.greater_equal(a, b), pc.less_equal(c, d))
    if isinstance(node, exp.Like | exp.ILike):
        value = to_text(_eval(node.this, ctx))
        matched = pc.match_like(value, str(node.expression.this), ignore_case=isinstance(node, exp.ILike))
        return pc.invert(matched) if node.args.get("negate") else matched
    if isinstance(node, exp.Add | exp.Sub):
        return _add_sub(node, _eval(node.this, ctx), _eval(node.expression, ctx))
    if isinstance(node, exp.Mul):
        left, right = _numbers(_eval(node.this, ctx), _eval(node.expression, ctx))
        return pc.multiply(left, right)
    if isinstance(node, exp.Div | exp.Mod):
        left, right = _numbers(_eval(node.this, ctx), _eval(node.expression, ctx), floats=True)
        zero = pc.equal(right, 0.0)
        if isinstance(zero, pa.Scalar):
            zero = ctx.broadcast(zero)
        ctx.fail(zero, "division by zero")
        safe = pc.if_else(pc.fill_null(zero, False), pa.scalar(None, pa.float64()), right)
        if isinstance(node, exp.Div):
            return pc.divide(left, safe)
        return pc.subtract(left, pc.multiply(pc.floor(pc.divide(left, safe)), safe))
    if isinstance(node, exp.Neg):
        return pc.negate(to_number(_eval(node.this, ctx)))
    if isinstance(node, exp.DPipe):
        parts = [to_text(_eval(node.this, ctx)), to_text(_eval(node.expression, ctx))]
        return pc.binary_join_element_wise(*parts, "", null_handling="emit_null")
    if isinstance(node, exp.Concat):
        parts = [to_text(_eval(e, ctx)) for e in node.expressions]
        return pc.binary_join_element_wise(*parts, "", null_handling="replace", null_replacement="")
    if isinstance(node, exp.Lower):
        return pc.utf8_lower(to_text(_eval(node.this, ctx)))
    if isinstance(node, exp.Upper):
        return pc.utf8_upper(to_text(_eval(node.this, ctx)))
    if isinstance(node, exp.Trim):
        value = to_text(_eval(node.this, ctx))
        position = str(node.args.get("position") or "").upper()
        if position == "LEADING":
            return pc.utf8_ltrim_whitespace(value)
        if position == "TRAILING":
            return pc.utf8_rtrim_whitespace(value)
        return pc.utf8_trim_whitespace(value)
    if isinstance(node, exp.Length):
        return pc.cast(pc.utf8_length(to_text(_eval(node.this, ctx))), pa.int64())
    if isinstance(node, exp.Substring):
        value = to_text(_eval(node.this, ctx))
        start = int(node.args["start"].this) if node.args.get("start") is not None else 1
        begin = max(start - 1, 0)
        length = node.args.get("length")
        if length is None:
            return pc.utf8_slice_codeunits(value, begin)
        return pc.utf8_slice_codeunits(value, begin, begin + max(int(length.this), 0))
    if isinstance(node, exp.Replace):
        value = to_text(_eval(node.this, ctx))
        return pc.replace_substring(value, str(node.expression.this), str(node.args["replacement"].this))
    if isinstance(node, exp.Coalesce):
        values = [_eval(node.this, ctx), *(_eval(e, ctx) for e in node.expressions)]
        return pc.coalesce(*_unify(values, ctx))
    if isinstance(node, exp.Nullif):
        value = _eval(node.this, ctx)
        left, right = _align(value, _eval(node.expression, ctx))
        same = pc.fill_null(pc.equal(left, right), False)
        value = ctx.broadcast(value) if isinstance(value, pa.Scalar) else value
        return pc.if_else(same, pa.scalar(None, value.type), value)
    if isinstance(node, exp.Abs):
        return pc.abs(to_number(_eval(node.this, ctx)))
    if isinstance(node, exp.Round):
        digits = node.args.get("decimals")
        return pc.round(to_number(_eval(node.this, ctx)), int(digits.this) if digits is not None else 0)
    if isinstance(node, exp.Cast | exp.TryCast):
        return _cast(node, _eval(node.this, ctx), ctx)
    if isinstance(node, exp.CurrentDate):
        return pa.scalar(dt.date.today(), pa.date32())
    if isinstance(node, exp.DateAdd):
        days = pc.cast(to_number(_eval(node.expression, ctx)), pa.int64())
        return _from_days(pc.add(_days(_eval(node.this, ctx)), days))
    if isinstance(node, exp.DateDiff):
        return pc.subtract(_days(_eval(node.this, ctx)), _days(_eval(node.expression, ctx)))
    if isinstance(node, exp.Year):
        return pc.cast(pc.year(_to_date(_eval(node.this, ctx))), pa.int64())
    if isinstance(node, exp.Month):
        return pc.cast(pc.month(_to_date(_eval(node.this, ctx))), pa.int64())
    if isinstance(node, exp.Day):
        return pc.cast(pc.day(_to_date(_eval(node.this, ctx))), pa.int64())
    if isinstance(node, exp.Case):
        branches = node.args.get("ifs") or []
        conditions = [ctx.broadcast(pc.fill_null(_bool(_eval(b.this, ctx)), False)) for b in branches]
        default = node.args.get("default")
        values = [_eval(b.args["true"], ctx) for b in branches]
        values.append(_eval(default, ctx) if default is not None else pa.scalar(None, pa.null()))
        return _case(conditions, values, ctx)
    if isinstance(node, exp.If):
        condition = ctx.broadcast(pc.fill_null(_bool(_eval(node.this, ctx)), False))
        other = node.args.get("false")
        values = [
            _eval(node.args["true"], ctx),
            _eval(other, ctx) if other is not None else pa.scalar(None, pa.null()),
        ]
        return _case([condition], values, ctx)
    raise ExpressionError(f"'{node.sql()}' is not allowed here")  # the checker stops these first


def _bool(v: Any) -> Any:
    if pa.types.is_boolean(v.type):
        return v
    if pa.types.is_null(v.type):
        return pc.cast(v, pa.bool_())
    return pc.not_equal(to_number(v), 0.0)


def _numbers(left: Any, right: Any, floats: bool = False) -> tuple[Any, Any]:
    left, right = to_number(left), to_number(right)
    if floats or not (pa.types.is_integer(left.type) and pa.types.is_integer(right.type)):
        return pc.cast(left, pa.float64()), pc.cast(right, pa.float64())
    return pc.cast(left, pa.int64()), pc.cast(right, pa.int64())


def _add_sub(node: exp.Expression, left: Any, right: Any) -> Any:
    if _is_date(left) and _is_date(right):
        return pc.subtract(_days(left), _days(right))
    if _is_date(left):
        days = pc.cast(to_number(right), pa.int64())
        moved = pc.add(_days(left), days) if isinstance(node, exp.Add) else pc.subtract(_days(left), days)
        return _from_days(moved)
    if _is_date(right) and isinstance(node, exp.Add):
        return _from_days(pc.add(_days(right), pc.cast(to_number(left), pa.int64())))
    a, b = _numbers(left, right)
    return pc.add(a, b) if isinstance(node, exp.Add) else pc.subtract(a, b)


def _unify(values: list[Any], ctx: _Context) -> list[Any]:
    types = {v.type for v in values if not pa.types.is_null(v.type)}
    if not types:
        return values
    if len(types) == 1:
        target = types.pop()
        return [pc.cast(v, target) if pa.types.is_null(v.type) else v for v in values]
    if all(pa.types.is_integer(t) or pa.types.is_floating(t) for t in types):
        return [pc.cast(to_number(v), pa.float64()) for v in values]
    if any(pa.types.is_date(t) or pa.types.is_timestamp(t) for t in types):
        return [_to_timestamp(v) for v in values]
    return [to_text(v) for v in values]


def _case(conditions: list[Any], values: list[Any], ctx: _Context) -> Any:
    values = [ctx.broadcast(v) for v in _unify(values, ctx)]
    if pa.types.is_null(values[0].type):
        return pa.nulls(ctx.length)
    struct = pa.StructArray.from_arrays(conditions, [f"c{i}" for i in range(len(conditions))])
    return pc.case_when(struct, *values)


def _cast(node: exp.Cast, value: Any, ctx: _Context) -> Any:
    target = node.to.this
    kind = _CAST_TYPES[target]
    if kind == TEXT:
        return to_text(value)
    if kind == NUMBER:
        number = to_number(value)
        if _is_text(value):
            bad = pc.and_(pc.is_valid(value), pc.is_null(number))
            bad = ctx.broadcast(bad) if isinstance(bad, pa.Scalar) else bad
            ctx.fail(
                bad, pc.binary_join_element_wise("'", to_text(ctx.broadcast(value)), "' is not a number", "")
            )
        if target in (exp.DataType.Type.INT, exp.DataType.Type.BIGINT, exp.DataType.Type.SMALLINT):
            return pc.cast(pc.trunc(pc.cast(number, pa.float64())), pa.int64())
        return number
    stamp = _to_timestamp(value)
    if _is_text(value):
        bad = pc.and_(pc.is_valid(value), pc.is_null(stamp))
        bad = ctx.broadcast(bad) if isinstance(bad, pa.Scalar) else bad
        ctx.fail(bad, pc.binary_join_element_wise("'", to_text(ctx.broadcast(value)), "' is not a date", ""))
    return pc.cast(stamp, pa.date32()) if target == exp.DataType.Type.DATE else stamp


@dataclass(frozen=True)
class Evaluated:
    """The values of an expression over a chunk, and per row the reason it failed (None: no failures)."""

    values: pa.Array
    reasons: pa.Array | None


def evaluate(
    expression: Expression, columns: Mapping[str, pd.Series] | pd.DataFrame, length: int
) -> Evaluated:
    """Evaluate ``expression`` over the chunk ``columns`` (``length`` rows), vectorized."""
    ctx = _Context(columns, length)
    try:
        result = _eval(expression.tree, ctx)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise ExpressionError(f"cannot evaluate '{expression.text}': {str(exc).splitlines()[0]}") from None
    values = ctx.broadcast(result)
    if ctx.failed is not None:
        values = pc.if_else(pc.is_valid(ctx.failed), pa.scalar(None, values.type), values)
    return Evaluated(values, ctx.failed)


def condition_mask(
    expression: Expression, columns: Mapping[str, pd.Series] | pd.DataFrame, length: int
) -> np.ndarray:
    """Return the rows where a condition holds (unknown or failed counts as false), as a NumPy mask."""
    result = evaluate(expression, columns, length).values
    if not pa.types.is_boolean(result.type):
        result = _bool(result)
    return np.asarray(pc.fill_null(result, False).to_numpy(zero_copy_only=False), dtype=bool)


def filter_frame(frame: pd.DataFrame, expression: Expression) -> pd.DataFrame:
    """Return the rows of ``frame`` for which the condition holds (index reset)."""
    if frame.empty:
        return frame
    mask = condition_mask(expression, frame, len(frame))
    if mask.all():
        return frame
    return frame.loc[mask].reset_index(drop=True)


def sql_dialect(backend: str) -> str | None:
    """Return sqlglot's dialect for a SQLAlchemy backend name (None: generic SQL)."""
    return {
        "sqlite": "sqlite",
        "postgresql": "postgres",
        "mysql": "mysql",
        "mariadb": "mysql",
        "mssql": "tsql",
        "oracle": "oracle",
    }.get(backend)


# Significant digits kept when a computed float becomes a decimal: double precision holds 15 exactly, so
# 0.1 * 3 is 0.3 (not 0.30000000000000004) and 1234567.1 * 3 is 3703701.3.
SIGNIFICANT_DIGITS = 15
_MAX_SCALE = 18  # decimal places at most; leaves 20 integer digits in decimal128(38, 18)


def float_to_decimal(values: pa.Array) -> pa.Array | None:
    """Return floats as decimal128 rounded to 15 significant digits (None when a value is too large).

    Values are grouped by magnitude; each group is rounded at its own decimal place and cast by Arrow,
    then all are brought to one scale (exact) and put back in row order. No Python per value.
    """
    numbers = np.asarray(pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
    finite = np.isfinite(numbers)
    magnitude = np.zeros(len(numbers), dtype=np.int64)
    nonzero = finite & (numbers != 0)
    magnitude[nonzero] = np.floor(np.log10(np.abs(numbers[nonzero]))).astype(np.int64)
    if nonzero.any() and magnitude[nonzero].max() >= 38 - _MAX_SCALE:
        return None
    scales = np.clip(SIGNIFICANT_DIGITS - 1 - magnitude, 0, _MAX_SCALE)
    # Decimal places each value really needs once rounded: its scale less the mantissa's trailing zeros,
    # so 0.3 keeps one place, not eighteen.
    mantissa = np.zeros(len(numbers))
    mantissa[finite] = np.rint(numbers[finite] * np.power(10.0, scales[finite]))
    needed = scales.copy()
    for _ in range(_MAX_SCALE):
        strip = finite & (needed > 0) & (np.fmod(mantissa, 10.0) == 0)
        if not strip.any():
            break
        mantissa[strip] /= 10.0
        needed[strip] -= 1
    common = int(needed[finite].max()) if finite.any() else 0
    target = pa.decimal128(38, common)
    parts: list[pa.Array] = []
    positions: list[np.ndarray] = []
    for scale in np.unique(scales[finite]):
        rows = np.flatnonzero(finite & (scales == scale))
        places = min(int(scale), common)
        rounded = pa.array(np.round(numbers[rows], places), pa.float64())
        parts.append(pc.cast(pc.cast(rounded, pa.decimal128(38, places), safe=False), target))
        positions.append(rows)
    rest = np.flatnonzero(~finite)
    parts.append(pa.nulls(len(rest), target))
    positions.append(rest)
    order = np.concatenate(positions)
    inverse = np.empty(len(order), dtype=np.int64)
    inverse[order] = np.arange(len(order))
    return pa.concat_arrays(parts).take(pa.array(inverse))
