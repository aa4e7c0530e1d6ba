"""Transforms: pure functions over a pandas Series, chained in mapping files.

Each transform takes the column's values and its validated arguments and returns the new values and,
for transforms that can fail, a Series of error reasons (None where the value was fine). Expensive
parsers run once per *distinct* value, so a million rows with repeated values cost little.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pandas as pd
import phonenumbers
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator
from stdnum.cn import uscc as stdnum_uscc

from crm_core.stages import resolve_stage
from crm_core.validation import USCC_SHAPE, uscc_check_digits_ok, uscc_is_valid
from integration import geo
from integration.mappings import columnar

Outcome = tuple[pd.Series, pd.Series | None]


class TransformFailure(ValueError):
    """A single value cannot be transformed; the message becomes the reject reason."""


class Args(BaseModel):
    """Base for transform arguments: unknown arguments are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoArgs(Args):
    """The transform takes no arguments."""


@dataclass(frozen=True)
class TransformDef:
    """A registered transform: its function, argument model and one-line description."""

    name: str
    func: Callable[[pd.Series, Any], Outcome]
    args: type[Args]
    summary: str
    clean_output: bool = False  # text results are already in clean_text form (the engine skips re-cleaning)
    yields: str | None = None  # the field kind every non-null result already has (the engine skips the cast)
    examples: tuple[Any, ...] = ()  # inputs shown, with what the transform makes of them, in the reference
    example_args: dict[str, Any] | None = None  # the arguments the examples run with


REGISTRY: dict[str, TransformDef] = {}


def transform(
    name: str,
    args: type[Args] = NoArgs,
    clean_output: bool = False,
    yields: str | None = None,
    examples: tuple[Any, ...] = (),
    example_args: dict[str, Any] | None = None,
) -> Callable[[Callable[[pd.Series, Any], Outcome]], Callable[[pd.Series, Any], Outcome]]:
    """Register a transform under ``name``; its docstring's first line is its summary.

    ``examples`` are raw values (Chinese and Latin) run through the transform, with ``example_args``,
    for the reference (``crmi mapping transforms``, docs/transforms.md), so the documentation is the code's.
    """

    def register(func: Callable[[pd.Series, Any], Outcome]) -> Callable[[pd.Series, Any], Outcome]:
        summary = (func.__doc__ or "").strip().splitlines()[0]
        REGISTRY[name] = TransformDef(name, func, args, summary, clean_output, yields, examples, example_args)
        return func

    return register


def _isnull(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value) or value is pd.NaT or value is pd.NA


def per_value(values: pd.Series, func: Callable[[Any], Any]) -> Outcome:
    """Apply ``func`` once per distinct non-null value; TransformFailure becomes that row's error.

    Rows are never visited in Python: the distinct values are found (Arrow dictionary encoding for text,
    pandas factorize otherwise), transformed, and taken back by position, so cost follows the number of
    distinct values, not rows.
    """
    array = columnar.text_array(values)
    if array is not None:
        return columnar.map_distinct(array, values.index, func, TransformFailure)
    codes, uniques = pd.factorize(values)
    results: list[Any] = []
    failures: dict[int, str] = {}
    for position, value in enumerate(uniques):
        try:
            results.append(func(value))
        except TransformFailure as exc:
            results.append(None)
            failures[position] = str(exc)
    out = pd.Series(columnar.object_array(results)[codes], index=values.index, dtype=object)
    if not failures:
        return out, None
    reasons = columnar.object_array([failures.get(i) for i in range(len(results))])
    return out, pd.Series(reasons[codes], index=values.index, dtype=object)


def _text(
    values: pd.Series,
    func: Callable[[str], str | None],
    kernel: Callable[[pa.Array | pa.ChunkedArray], pa.Array | pa.ChunkedArray] | None = None,
) -> Outcome:
    """Apply a string function to text values; non-text values pass through as text.

    With a ``kernel`` (the same function over an Arrow array), text columns take the vectorized path.
    """

    def apply(value: Any) -> Any:
        text = func(_as_text(value))
        return text if text else None

    array = columnar.text_array(values) if kernel is not None else None
    if kernel is None or array is None:
        return per_value(values, apply)
    return columnar.arrow_series(columnar.empty_to_null(kernel(array)), values.index), None


def _cased(values: pd.Series, func: Callable[[str], str], kernel: Callable[[Any], Any]) -> Outcome:
    """Case mapping: Arrow kernels for ASCII/CJK values, Python for the rest (ß, ligatures, final sigma…)."""
    array = columnar.text_array(values)
    if array is None:
        return _text(values, func)
    result, errors = columnar.settle(
        array,
        values.index,
        columnar.simple_mask(array),
        kernel(array),
        lambda v: func(v) or None,
        TransformFailure,
    )
    cased = pa.array(result.array)
    columnar.keep_tidy(cased, array)  # case mapping keeps tidy (ASCII/CJK) values tidy
    return columnar.arrow_series(columnar.empty_to_null(cased), values.index), errors


def _as_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# --------------------------------------------------------------------------- text

_INVISIBLE = re.compile("[\u200b\u200c\u200d\u2060\ufeff\u00ad]")
_SPACES = re.compile(r"\s+")


def clean_text(value: str) -> str:
    """Remove zero-width characters, turn every kind of space (incl. U+3000) into one, strip the ends."""
    return _SPACES.sub(" ", _INVISIBLE.sub("", value)).strip()


@transform("trim", clean_output=True, examples=("  深圳市\u3000腾达科技  ", "Acme \t Trading\u200b Ltd "))
def trim(values: pd.Series, args: NoArgs) -> Outcome:
    """Strip both ends, collapse inner whitespace (incl. full-width spaces), drop zero-width characters."""
    return _text(values, clean_text, columnar.clean_text_array)


@transform("nfkc", examples=("ＡＢＣ１２３（集团）", "Ｃａｆé　Ｎｏ．５"))
def nfkc(values: pd.Series, args: NoArgs) -> Outcome:
    """Unicode NFKC: full-width letters, digits and punctuation become half-width (ＡＢＣ１２３ → ABC123)."""
    return _text(values, lambda v: unicodedata.normalize("NFKC", v), columnar.nfkc_array)


@transform("upper", examples=("abc有限公司", "straße"))
def upper(values: pd.Series, args: NoArgs) -> Outcome:
    """Upper-case (Chinese text is unchanged)."""
    return _cased(values, str.upper, pc.utf8_upper)


@transform("lower", examples=("ACME 贸易", "Straße GmbH"))
def lower(values: pd.Series, args: NoArgs) -> Outcome:
    """Lower-case (Chinese text is unchanged)."""
    return _cased(values, str.lower, pc.utf8_lower)


@transform("title", examples=("acme trading ltd", "深圳 acme 分公司"))
def title(values: pd.Series, args: NoArgs) -> Outcome:
    """Title-case Latin words (Chinese text is unchanged)."""
    return _cased(values, str.title, pc.utf8_title)


def _valid_regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"invalid regular expression: {exc}") from None
    return value


class RegexReplaceArgs(Args):
    """Arguments of ``regex_replace``."""

    pattern: str = Field(description="regular expression (Python re syntax)")
    replace: str = Field(default="", description="replacement; \\1 or \\g<name> insert groups")

    _compiles = field_validator("pattern")(_valid_regex)


@transform(
    "regex_replace",
    RegexReplaceArgs,
    examples=("客户-0042", "cust-7"),
    example_args={"pattern": r"^\D+-0*", "replace": "C"},
)
def regex_replace(values: pd.Series, args: RegexReplaceArgs) -> Outcome:
    """Replace every match of ``pattern`` with ``replace`` (Python ``re`` syntax, ``\\1`` for groups)."""
    compiled = re.compile(args.pattern)
    return _text(values, lambda v: compiled.sub(args.replace, v))


class RegexExtractArgs(Args):
    """Arguments of ``regex_extract``."""

    pattern: str = Field(description="regular expression (Python re syntax)")
    group: int | str = Field(default=1, description="group number or name to keep")

    _compiles = field_validator("pattern")(_valid_regex)


@transform(
    "regex_extract",
    RegexExtractArgs,
    examples=("合同号：HT-2025-017", "ref HT-2024-3 (signed)", "无合同"),
    example_args={"pattern": r"HT-(\d{4})-\d+"},
)
def regex_extract(values: pd.Series, args: RegexExtractArgs) -> Outcome:
    """Keep the given group of the first match of ``pattern``; no match gives an empty value."""
    compiled = re.compile(args.pattern)

    def extract(value: str) -> str | None:
        match = compiled.search(value)
        return match.group(args.group) if match else None

    return _text(values, extract)


class SplitArgs(Args):
    """Arguments of ``split``."""

    sep: str = Field(description="separator, e.g. '-' or '/'")
    index: int = Field(default=0, description="part to keep: 0 is the first, -1 the last")


@transform(
    "split",
    SplitArgs,
    examples=("华东区/上海", "EMEA/Berlin", "总部"),
    example_args={"sep": "/", "index": -1},
)
def split(values: pd.Series, args: SplitArgs) -> Outcome:
    """Split on ``sep`` and keep part ``index`` (0 = first, -1 = last); missing parts give an empty value."""

    def part(value: str) -> str | None:
        pieces = value.split(args.sep)
        try:
            return pieces[args.index].strip()
        except IndexError:
            return None

    return _text(values, part)


# Separators of list-like values: ASCII and full-width commas and semicolons, the enumeration comma 、,
# bars and line breaks (several contacts or tags typed into one cell).
LIST_SEPARATORS = (",", "，", ";", "；", "、", "|", "\n")


class JoinArgs(Args):
    """Arguments of ``join``."""

    split_on: list[str] = Field(
        default_factory=lambda: list(LIST_SEPARATORS),
        min_length=1,
        description="separators between the items (default: , ， ; ； 、 | and line breaks)",
    )
    sep: str = Field(default=", ", description="separator written between the items")
    unique: bool = Field(default=True, description="drop repeated items (the first one stays)")

    @field_validator("split_on")
    @classmethod
    def _no_empty_separator(cls, value: list[str]) -> list[str]:
        if any(not separator for separator in value):
            raise ValueError("an empty separator would split between every character")
        return value


@transform(
    "join",
    JoinArgs,
    clean_output=True,
    examples=("销售；市场、 售后;;销售", "sales, Marketing ;support|sales", ""),
)
def join(values: pd.Series, args: JoinArgs) -> Outcome:
    """Rejoin the items of a list-like value (a；b、c) with one separator; empty and repeated items dropped."""
    splitter = re.compile("|".join(re.escape(separator) for separator in args.split_on))

    def rejoin(value: str) -> str | None:
        items = [item for item in (clean_text(part) for part in splitter.split(value)) if item]
        if args.unique:
            items = list(dict.fromkeys(items))
        return args.sep.join(items) or None

    return _text(values, rejoin)


class MapValuesArgs(Args):
    """Arguments of ``map_values``."""

    values: dict[str, Any] = Field(description="source value → target value")
    unmatched: Literal["keep", "null", "reject"] = Field(
        default="keep", description="a value not in the table: keep it, leave the field empty, or reject"
    )


def _fold(value: Any) -> str:
    return clean_text(unicodedata.normalize("NFKC", _as_text(value))).casefold()


@transform(
    "map_values",
    MapValuesArgs,
    examples=("ＶＩＰ", " vip ", "普通", "其他"),
    example_args={"values": {"VIP": "key_account", "普通": "standard"}, "unmatched": "reject"},
)
def map_values(values: pd.Series, args: MapValuesArgs) -> Outcome:
    """Translate values through a table; keys match ignoring case, width and extra spaces."""
    table = {_fold(k): v for k, v in args.values.items()}

    def translate(value: Any) -> Any:
        key = _fold(value)
        if key in table:
            return table[key]
        if args.unmatched == "keep":
            return value
        if args.unmatched == "null":
            return None
        raise TransformFailure(
            f"'{value}' is not in the value map (known: {', '.join(map(str, args.values))})"
        )

    return per_value(values, translate)


# --------------------------------------------------------------------------- dates

_EXCEL_EPOCH = dt.date(1899, 12, 31)
_DATE = re.compile(
    r"^(?P<y>\d{4})\s*[-/.年]\s*(?P<m>\d{1,2})\s*[-/.月]\s*(?P<d>\d{1,2})\s*[日号]?"
    # 14:30, 14:30:15.5, 14时30分, 14点30分15秒; glued to the date only after 日/号 (2025年3月5日14时).
    r"(?:(?:[\sT]+|(?<=[日号]))(?P<H>\d{1,2})[:：时点](?P<M>\d{1,2})"
    r"(?:[:：分](?P<S>\d{1,2})(?:\.\d+)?秒?|分)?)?"
    r"\s*(?P<tz>Z|[+-]\d{2}:?\d{2})?$"
)
_COMPACT_DATE = re.compile(r"^(?P<y>\d{4})(?P<m>\d{2})(?P<d>\d{2})$")


def excel_serial_to_date(serial: float) -> dt.date:
    """Convert an Excel (1900 system) serial day number; serial 60 is Excel's fictitious 1900-02-29."""
    day = int(serial)
    if not 1 <= day <= 2_958_465:
        raise TransformFailure(f"{serial} is not a plausible Excel date serial (1..2958465)")
    if day == 60:
        raise TransformFailure(
            "Excel serial 60 is 1900-02-29, a day that does not exist (Excel's leap-year bug)"
        )
    return _EXCEL_EPOCH + dt.timedelta(days=day - 1 if day > 60 else day)


class DateArgs(Args):
    """Arguments of ``parse_date`` and ``parse_datetime``."""

    formats: list[str] = Field(default_factory=list, description="strptime formats tried first")
    excel_serial: bool = Field(default=True, description="treat numbers as Excel serial dates")
    timezone: str | None = Field(default=None, description="zone of values without one, e.g. Asia/Shanghai")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(
                    f"unknown time zone '{value}' (use an IANA name such as Asia/Shanghai)"
                ) from None
        return value


def parse_datetime_value(value: Any, args: DateArgs) -> dt.datetime:
    """Parse one date/time value (see ``parse_date``); naive results get ``args.timezone`` when set."""
    result: dt.datetime
    if isinstance(value, pd.Timestamp):
        result = value.to_pydatetime()
    elif isinstance(value, dt.datetime):
        result = value
    elif isinstance(value, dt.date):
        result = dt.datetime(value.year, value.month, value.day)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if not args.excel_serial:
            raise TransformFailure(f"{value} is a number, not a date")
        day = excel_serial_to_date(value)
        seconds = round((float(value) - int(value)) * 86400)
        result = dt.datetime(day.year, day.month, day.day) + dt.timedelta(seconds=seconds)
    else:
        text = clean_text(unicodedata.normalize("NFKC", str(value)))
        parsed = None
        for fmt in args.formats:
            try:
                parsed = dt.datetime.strptime(text, fmt)
                break
            except ValueError:
                continue
        if parsed is None:
            parsed = _parse_date_text(text, args)
        result = parsed
    if args.timezone and result.tzinfo is None:
        result = result.replace(tzinfo=ZoneInfo(args.timezone))
    return result


def _parse_date_text(text: str, args: DateArgs) -> dt.datetime:
    match = _DATE.match(text) or _COMPACT_DATE.match(text)
    if match is None:
        if args.excel_serial and re.fullmatch(r"\d{5}(\.\d+)?", text):
            return parse_datetime_value(float(text), args)
        raise TransformFailure(f"'{text}' is not a date (expected e.g. 2025-03-05, 2025/3/5 or 2025年3月5日)")
    parts = match.groupdict()
    try:
        result = dt.datetime(
            int(parts["y"]),
            int(parts["m"]),
            int(parts["d"]),
            int(parts.get("H") or 0),
            int(parts.get("M") or 0),
            int(parts.get("S") or 0),
        )
    except ValueError as exc:
        raise TransformFailure(f"'{text}' is not a valid date: {exc}") from None
    zone = parts.get("tz")
    if zone:
        zone = "+00:00" if zone == "Z" else zone
        hours, minutes = int(zone[1:3]), int(zone[-2:])
        offset = dt.timedelta(hours=hours, minutes=minutes) * (-1 if zone[0] == "-" else 1)
        result = result.replace(tzinfo=dt.timezone(offset))
    return result


@transform(
    "parse_date",
    DateArgs,
    yields="date",
    examples=("2025年3月5日", "2025/3/5", "2025.3.5", "20250305", 45721, 60, "next week"),
)
def parse_date(values: pd.Series, args: DateArgs) -> Outcome:
    """Parse dates: ISO, 2025/3/5, 2025.3.5, 2025年3月5日, 20250305, Excel serials (1900 leap bug handled)."""
    return per_value(values, lambda v: parse_datetime_value(v, args).date())


@transform(
    "parse_datetime",
    DateArgs,
    yields="datetime",
    examples=("2025年3月5日 14时30分", "2025-03-05T14:30:00Z", "2025/3/5"),
    example_args={"timezone": "Asia/Shanghai"},
)
def parse_datetime(values: pd.Series, args: DateArgs) -> Outcome:
    """Parse date-times like ``parse_date``, keeping the time and attaching ``timezone`` to naive values."""
    return per_value(values, lambda v: parse_datetime_value(v, args))


# --------------------------------------------------------------------------- amounts

_CURRENCY_WORDS = re.compile(
    r"(人民币|RMB|CNY|USD|US\$|EUR|HKD|元整|圆整|元|圆|整|¥|\$|€|HK\$)", re.IGNORECASE
)
_UNITS: list[tuple[str, Decimal]] = [
    ("千万", Decimal(10_000_000)),
    ("百万", Decimal(1_000_000)),
    ("亿", Decimal(100_000_000)),
    ("万", Decimal(10_000)),
    ("千", Decimal(1_000)),
    ("mn", Decimal(1_000_000)),
    ("m", Decimal(1_000_000)),
    ("k", Decimal(1_000)),
    ("w", Decimal(10_000)),
]
_PLAIN_AMOUNT = r"^[¥$]?-?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?$"
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
_CN_NUMERAL = re.compile(r"^[零〇一二两三四五六七八九十百千万亿壹贰叁肆伍陆柒捌玖拾佰仟萬億点]+$")


class AmountArgs(Args):
    """Arguments of ``parse_amount``."""

    multiply: float = Field(
        default=1, description="multiply the parsed value (e.g. 10000 for a column in 万元)"
    )


def parse_amount_value(value: Any, multiply: float = 1) -> Decimal:
    """Parse one amount: ¥1,234.50, 12.5万, 3亿, 1.2k, (500), 一百二十万, 壹仟贰佰元整."""
    if isinstance(value, bool):
        raise TransformFailure(f"{value} is not an amount")
    if isinstance(value, int | float | Decimal):
        result = Decimal(str(value))
    else:
        text = clean_text(unicodedata.normalize("NFKC", str(value)))
        negative = False
        if text.startswith("(") and text.endswith(")"):
            negative, text = True, text[1:-1]
        text = _CURRENCY_WORDS.sub("", text).replace(",", "").replace(" ", "").replace("，", "")
        if text.startswith("-") or text.endswith("-"):
            negative, text = True, text.strip("-")
        text = text.lstrip("+")
        if not text:
            raise TransformFailure(f"'{value}' has no number in it")
        multiplier = Decimal(1)
        if _NUMBER.match(text) is None and not _CN_NUMERAL.match(text):
            for unit, factor in _UNITS:
                if text.lower().endswith(unit):
                    text, multiplier = text[: -len(unit)], factor
                    break
        if _NUMBER.match(text):
            result = Decimal(text) * multiplier
        elif _CN_NUMERAL.match(text):
            result = _chinese_numeral(text, value) * multiplier
        else:
            raise TransformFailure(f"'{value}' is not an amount (expected e.g. 1234.5, ¥1,234.50, 12.5万)")
        if negative:
            result = -result
    if multiply != 1:
        result *= Decimal(str(multiply))
    return result


def _chinese_numeral(text: str, original: Any) -> Decimal:
    import cn2an  # heavy-ish import, only when Chinese numerals occur

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Decimal(str(cn2an.cn2an(text, "smart")))
    except (ValueError, InvalidOperation):
        raise TransformFailure(f"'{original}' is not a Chinese numeral amount") from None


@transform(
    "parse_amount",
    AmountArgs,
    yields="decimal",
    examples=("¥1,234.50", "12.5万", "3亿", "1.2k", "(500)", "一百二十万", "壹仟贰佰元整", "待定"),
)
def parse_amount(values: pd.Series, args: AmountArgs) -> Outcome:
    """Parse money amounts (¥1,234.50, 12.5万, 3亿, 1.2k, (500), 一百二十万, 壹仟贰佰元) into Decimal."""
    array = columnar.text_array(values)
    if array is None or args.multiply != 1:
        return per_value(values, lambda v: parse_amount_value(v, args.multiply))
    # Plain numbers, with or without ¥/$ and thousands separators, are read straight from the cleaned
    # text into Arrow decimals; units (万, 亿, k), brackets and Chinese numerals go to parse_amount_value.
    text = columnar.nfkc_clean_array(array)
    done = columnar.flags(pc.match_substring_regex(text, _PLAIN_AMOUNT))
    digits = columnar.null_where_array(text, pc.invert(done))
    for mark in ("¥", "$", ","):
        digits = pc.replace_substring(digits, mark, "")
    point = pc.find_substring(digits, ".")
    places = pc.if_else(
        pc.greater_equal(point, 0), pc.subtract(pc.subtract(pc.utf8_length(digits), point), 1), 0
    )
    scale = pc.max(places).as_py() or 0
    rest = columnar.apply_distinct(
        columnar.null_where_array(array, done), parse_amount_value, TransformFailure
    )
    scale = max(
        [scale, *(-int(d.as_tuple().exponent) for d in rest.results if d is not None and d.is_finite())]
    )
    try:
        decimal = pa.decimal128(38, scale)
        slow = pc.take(pa.array(rest.results, type=decimal), rest.indices)
        amounts = pc.if_else(done, pc.cast(digits, decimal), slow)
    except (pa.ArrowInvalid, ValueError):  # more than 38 digits: keep Python decimals
        return per_value(values, parse_amount_value)
    return columnar.arrow_series(amounts, values.index), rest.reasons(values.index)


_CURRENCIES = {
    "¥": "CNY", "￥": "CNY", "元": "CNY", "人民币": "CNY", "rmb": "CNY", "cny": "CNY",
    "$": "USD", "us$": "USD", "usd": "USD", "美元": "USD", "€": "EUR", "eur": "EUR", "欧元": "EUR",
    "hk$": "HKD", "hkd": "HKD", "港币": "HKD", "港元": "HKD", "jpy": "JPY", "日元": "JPY",
}  # fmt: skip


def currency_code(value: Any) -> str:
    """Return the three-letter code of a code, symbol or Chinese name; raise TransformFailure otherwise."""
    text = clean_text(unicodedata.normalize("NFKC", str(value))).lower()
    if text in _CURRENCIES:
        return _CURRENCIES[text]
    if re.fullmatch(r"[a-z]{3}", text):
        return text.upper()
    for marker, iso in _CURRENCIES.items():
        if marker in text:
            return iso
    raise TransformFailure(f"'{value}' is not a currency (use an ISO code like CNY)")


@transform("currency", examples=("人民币", "¥", "RMB", "美元", "usd", "比特币"))
def currency(values: pd.Series, args: NoArgs) -> Outcome:
    """ISO 4217 code from a code, symbol or Chinese name (¥, 人民币, RMB → CNY; 美元 → USD)."""
    return per_value(values, currency_code)


# --------------------------------------------------------------------------- contact data


class PhoneArgs(Args):
    """Arguments of ``phone``."""

    region: str = Field(default="CN", description="ISO country of numbers written without +country code")
    several: Literal["refuse", "first"] = Field(
        default="refuse",
        description="a cell listing several numbers (、 ； / ,): refuse it, or keep the first number that reads",
    )

    @field_validator("region")
    @classmethod
    def _known_region(cls, value: str) -> str:
        if value.upper() not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"unknown region '{value}' (use a two-letter country code such as CN)")
        return value.upper()


# A Chinese mobile number, possibly with +86/0086 and separators: the common case, validated without a full parse.
_CN_MOBILE = re.compile(r"^(?:\+?86|0086)?(1[3-9]\d{9})$")
_PHONE_SEPARATORS = re.compile(r"[\s\-().]")
# A landline (or mobile) written with the trunk 0 or +86/0086, separators removed: 0755 1234 5678.
_CN_TRUNK = r"^(?:\+86|0086|0)"
_CN_NATIONAL = _CN_TRUNK + r"[1-9][0-9]{8,10}$"
_BLOCK_DIGITS = 5
_BLOCK_SAMPLES = ("0", "9", "5", "1234567890", "9876543210")


@lru_cache(maxsize=65_536)
def cn_block_is_valid(prefix: str, length: int) -> bool | None:
    """Validity of every CN national number with this 5-digit ``prefix`` and ``length``; None if it varies.

    CN numbering rules (libphonenumber metadata) decide validity on the leading digits and the length, so
    phonenumbers is asked once per block with several different endings; a block whose samples disagree
    is left undecided and its numbers are checked one by one.
    """
    rest = length - len(prefix)
    answers = {
        phonenumbers.is_valid_number(
            phonenumbers.PhoneNumber(country_code=86, national_number=int(prefix + (sample * rest)[:rest]))
        )
        for sample in _BLOCK_SAMPLES
    }
    return answers.pop() if len(answers) == 1 else None


# An extension after the number: 转8, 分机 336, ext. 12, x12, also in brackets (（分机336） is (分机336) after NFKC).
_EXTENSION_WORDS = re.compile(r"\s*(?:\(\s*)?(?:转|分机|ext\.?|x)\s*(\d+)\s*\)?$", re.IGNORECASE)
# A whole landline, a dash and 1-5 digits: tried as an extension only when the digits together are no number.
_DASH_EXTENSION = re.compile(r"^(.*\d{7,8})\s*-\s*(\d{1,5})$")
# +, 15 digits, ;ext= and 10 digits fit the String(32) phone columns (and the E164 check in validation).
_MAX_EXTENSION_DIGITS = 10
# libphonenumber reads digits after ',' or ';' as an extension (a dialling pause): 7 or more are a second
# number of a cell listing two (0755-88410754,88410755), not extension 88410755.
_LISTED_NUMBER = re.compile(r"[,;]\s*(?!ext=)[+\d]", re.IGNORECASE)
_LISTED_NUMBER_DIGITS = 7


def phone_e164(value: Any, region: str = "CN") -> str:
    """Return ``value`` as E.164 (+8613812345678); extensions are kept as ``;ext=``."""
    text = clean_text(unicodedata.normalize("NFKC", _as_text(value)))
    if region == "CN":
        mobile = _CN_MOBILE.match(_PHONE_SEPARATORS.sub("", text))
        if mobile and cn_block_is_valid(mobile.group(1)[:_BLOCK_DIGITS], 11):
            return "+86" + mobile.group(1)
    text = re.sub(r"^00", "+", text)
    text = _EXTENSION_WORDS.sub(r" ext. \1", text)
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        raise TransformFailure(f"'{value}' is not a phone number") from None
    if not phonenumbers.is_valid_number(number):
        # 0512-49243620-1674: a switchboard's extension after a dash, when the number before it is whole
        dashed = _DASH_EXTENSION.match(text)
        invalid = TransformFailure(f"'{value}' is not a valid phone number for region {region}")
        if dashed is None or number.extension:
            raise invalid
        try:
            whole = phonenumbers.parse(dashed.group(1), region)
        except phonenumbers.NumberParseException:
            raise invalid from None
        if phonenumbers.number_type(whole) == phonenumbers.PhoneNumberType.MOBILE:
            raise invalid  # a mobile has no switchboard: 13800138000-12 is no extension 12
        try:
            return phone_e164(f"{dashed.group(1)} ext. {dashed.group(2)}", region)
        except TransformFailure:
            raise invalid from None
    if len(number.extension or "") >= _LISTED_NUMBER_DIGITS and _LISTED_NUMBER.search(text):
        raise TransformFailure(
            f"'{value}' lists several phone numbers: write one per cell, or keep the first with several: first"
        )
    if len(number.extension or "") > _MAX_EXTENSION_DIGITS:
        raise TransformFailure(f"'{value}' has an extension longer than {_MAX_EXTENSION_DIGITS} digits")
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return f"{e164};ext={number.extension}" if number.extension else e164


LOCAL_NUMBER = re.compile(r"[2-9]\d{2,3}[ -]?\d{4}(?!\d)")  # 7-8 digits: no trunk 0, no mobile's 1
# Digits after a completed number that can be an extension (转8, -12, ext. 336); more are another number.
LOCAL_EXTENSION_DIGITS = 6


def with_area_code(value: Any, area_code: str, read: Callable[[str], str] = phone_e164) -> str | None:
    """Return a local number written without its area code as ``0<area_code>-<cell>``, or None.

    None unless the cell starts with a 7-8 digit local number and the completed cell reads (``read``) as the
    area code, those digits and at most an extension: the transform also takes digits after a separator into
    the number (8841075.0 and 8841075 0 would become 0755-88410750) and a second number for an extension
    (88410754,88410755). The cell is read as the transform reads it (NFKC, clean, 88410754.0 → 88410754).
    """
    text = clean_text(unicodedata.normalize("NFKC", _as_text(value)))
    local = LOCAL_NUMBER.match(text)
    if local is None:
        return None
    completed = f"0{area_code}-{text}"
    try:
        e164 = read(completed)
    except TransformFailure:
        return None
    number, _, extension = e164.partition(";ext=")
    digits = local.group().replace(" ", "").replace("-", "")
    return (
        completed
        if number == f"+86{area_code}{digits}" and len(extension) <= LOCAL_EXTENSION_DIGITS
        else None
    )


def _cn_number_kernel(array: pa.Array | pa.ChunkedArray) -> tuple[Any, Any]:
    """Settle plain CN mobile and landline numbers in Arrow: return (done mask, E.164 values).

    Numbers whose block is valid are done; everything else (extensions, other countries, invalid or
    undecided blocks) is left for ``phone_e164``, which also words the errors.
    """
    text = columnar.nfkc_clean_array(array)
    for separator in (" ", "-", "(", ")"):  # literal passes cost less than one regex replace; "." is rare
        text = pc.replace_substring(text, separator, "")
    mobile = columnar.flags(pc.match_substring_regex(text, r"^(?:\+?86|0086)?1[3-9][0-9]{9}$"))
    trunk = pc.and_(columnar.flags(pc.match_substring_regex(text, _CN_NATIONAL)), pc.invert(mobile))
    national = pc.if_else(mobile, pc.utf8_slice_codeunits(text, -11), pa.scalar(None, pa.string()))
    if pc.any(trunk).as_py():
        # Drop the trunk prefix by its length: +86 and 0086 are tried before the bare 0.
        dialled = pc.filter(text, trunk)
        without = pc.if_else(
            pc.starts_with(dialled, "+86"),
            pc.utf8_slice_codeunits(dialled, 3),
            pc.if_else(
                pc.starts_with(dialled, "0086"),
                pc.utf8_slice_codeunits(dialled, 4),
                pc.utf8_slice_codeunits(dialled, 1),
            ),
        )
        national = columnar.scatter(national, trunk, without)
    blocks = pc.dictionary_encode(
        columnar.combined(
            pc.binary_join_element_wise(
                pc.utf8_slice_codeunits(national, 0, _BLOCK_DIGITS),
                pc.cast(pc.utf8_length(national), pa.string()),
                ":",
            )
        )
    )
    verdicts = []
    for block in blocks.dictionary.to_pylist():
        prefix, length = block.split(":")
        verdicts.append(cn_block_is_valid(prefix, int(length)) is True)
    done = columnar.flags(pc.take(pa.array(verdicts, pa.bool_()), blocks.indices))
    return done, pc.binary_join_element_wise("+86", national, "")


@transform(
    "phone",
    PhoneArgs,
    clean_output=True,
    examples=(
        "138 0013 8000",
        "+86 139-1234-5678",
        "0755-86001234转8",
        "029-44340459（分机919）",
        "0510-74217686-2853",
        "(010) 1234 5678",
        "+1 650-253-0000",
        "12345",
    ),
)
def phone(values: pd.Series, args: PhoneArgs) -> Outcome:
    """Phone numbers to E.164 (CN mobiles, landlines with area code, +86/0086, extensions: 转8, （分机8）, -8)."""

    def one(value: Any) -> str:
        return phone_e164(value, args.region) if args.several == "refuse" else first_phone(value, args.region)

    array = columnar.text_array(values)
    if array is None or args.region != "CN":
        return per_value(values, one)
    done, e164 = _cn_number_kernel(array)
    return columnar.settle(array, values.index, done, e164, one, TransformFailure)


# An RFC 3966 extension parameter (';ext=12', the form phone writes): the split cuts it at its ';'.
_RFC3966_EXTENSION = re.compile(r"ext=", re.IGNORECASE)


def first_phone(value: Any, region: str = "CN") -> str:
    """Return the cell as E.164, or else the first of the numbers it lists that reads (``phone_e164``).

    An ``;ext=`` after a number is its extension, as 转12 is, not another number.
    """
    try:
        return phone_e164(value, region)
    except TransformFailure as whole:
        parts: list[str] = []
        for part in geo.PHONE_CELL_SPLIT.split(unicodedata.normalize("NFKC", _as_text(value))):
            part = part.strip()
            if parts and parts[-1] and _RFC3966_EXTENSION.match(part):
                parts[-1] += ";" + part  # +8675588410754;ext=12: one number, as phone_e164 reads it
            else:
                parts.append(part)
        numbers = [part for part in parts if part]
        for number in numbers if len(numbers) > 1 else []:  # one part only: the cell's own reason stands
            try:
                return phone_e164(number, region)
            except TransformFailure:
                continue
        raise whole from None


_EMAIL = re.compile(r"^[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}$")


def email_value(value: Any) -> str:
    """Return a lower-cased, trimmed e-mail address; raise TransformFailure when it is not one."""
    text = clean_text(unicodedata.normalize("NFKC", str(value))).lower().strip("<>;,")
    if not _EMAIL.match(text):
        raise TransformFailure(f"'{value}' is not an e-mail address")
    return text


@transform(
    "email",
    clean_output=True,
    examples=(" Sales@Example.CN ", "LI.NA＠ACME.COM.CN", "<li.na@acme.com>;", "bad@"),
)
def email(values: pd.Series, args: NoArgs) -> Outcome:
    """Lower-cased, trimmed e-mail address (full-width ＠ allowed); anything else is an error."""
    array = columnar.text_array(values)
    if array is None:
        return per_value(values, email_value)
    text = columnar.nfkc_clean_array(array)
    ascii_only = pc.string_is_ascii(text)  # Arrow and Python lower-case ASCII alike; the pattern is ASCII
    text = pc.utf8_trim(pc.utf8_lower(text), "<>;,")
    done = columnar.flags(pc.and_(ascii_only, pc.match_substring_regex(text, _EMAIL.pattern)))
    return columnar.settle(array, values.index, done, text, email_value, TransformFailure)


def uscc_value(value: Any) -> str:
    """Return the compact, upper-case 统一社会信用代码; raise TransformFailure if its check digit fails."""
    text = unicodedata.normalize("NFKC", str(value))
    code = stdnum_uscc.compact(text).upper()
    if len(code) != 18:
        raise TransformFailure(f"'{value}' is not a unified social credit code (18 characters expected)")
    if not uscc_is_valid(code):
        raise TransformFailure(f"'{value}' is not a valid unified social credit code (check digit fails)")
    return code


@transform(
    "uscc",
    clean_output=True,
    examples=("9144 0300 7084 6113 6t", "９１４４０３００７０８４６１１３６Ｔ", "91440300708461136X"),
)
def uscc(values: pd.Series, args: NoArgs) -> Outcome:
    """统一社会信用代码: compact, upper-case, check digit verified (python-stdnum); invalid codes are errors."""
    array = columnar.text_array(values)
    if array is None:
        return per_value(values, uscc_value)
    text = columnar.nfkc_array(array)
    text = pc.replace_substring(pc.replace_substring(text, " ", ""), "-", "")
    text = pc.utf8_trim(pc.utf8_upper(text), columnar.WHITESPACE)
    shaped = columnar.flags(pc.match_substring_regex(text, USCC_SHAPE))
    checked = pa.array(uscc_check_digits_ok(columnar.combined(pc.filter(text, shaped))))
    done = columnar.scatter(shaped, shaped, checked) if len(checked) else shaped
    return columnar.settle(array, values.index, done, text, uscc_value, TransformFailure)


_NOT_CODE_CHARACTER = re.compile(r"[^0-9A-Z]")
WRITTEN_CODE_LENGTHS = (8, 24)  # shorter: a placeholder (0, 无, N/A); longer: not one code (two, a note)


def uscc_as_written_value(value: Any) -> str | None:
    """Return a credit-code cell compacted, not verified; None for a placeholder (see ``uscc_as_written``)."""
    text = _NOT_CODE_CHARACTER.sub("", unicodedata.normalize("NFKC", _as_text(value)).upper())
    shortest, longest = WRITTEN_CODE_LENGTHS
    if not shortest <= len(text) <= longest or len(set(text)) == 1 or not any(c.isdigit() for c in text):
        return None
    return text


@transform(
    "uscc_as_written",
    clean_output=True,
    examples=("9144 0300 7084 6113 6X", "４４０３０１７０８４６１１３６", "70846113-6", "无"),
)
def uscc_as_written(values: pd.Series, args: NoArgs) -> Outcome:
    """Credit code as written, for linkage: compact, upper-case, never verified (a placeholder is empty).

    A damaged code, a 15-digit registration number or a 9-character organisation code is kept, so
    linkage's near-matches can use it: map it to ``credit_code_as_written`` beside ``credit_code`` with
    ``uscc``. A placeholder (无, N/A, 000000000: under 8 characters, one character repeated or no digit)
    and a cell longer than 24 characters (two codes, a note) become empty.
    """
    return per_value(values, uscc_as_written_value)


_CJK = r"[\u3400-\u9fff]"


def company_display_name(value: str) -> str:
    """Canonical display form of a company name: NFKC, single spaces, full-width brackets beside Chinese."""
    text = clean_text(unicodedata.normalize("NFKC", value))
    text = re.sub(rf"(?<={_CJK}) (?={_CJK})", "", text)
    if re.search(_CJK, text):
        text = re.sub(r"\s*\(\s*", "（", text)
        text = re.sub(r"\s*\)\s*", "）", text)
    return text


@transform(
    "company_name",
    clean_output=True,
    examples=(" 深圳市腾达（集团） 有限公司", "深圳 腾达(集团)有限公司", "ＡＣＭＥ  Trading (HK) Ltd"),
)
def company_name(values: pd.Series, args: NoArgs) -> Outcome:
    """Company name display form: full-width → half-width, spaces tidied, （） brackets in Chinese names."""
    array = columnar.text_array(values)
    if array is None:
        return _text(values, company_display_name)
    text = columnar.nfkc_clean_array(array)
    # Only names with spaces or brackets need the CJK-aware tidy-up; the rest are done after NFKC + trim.
    done = pc.invert(
        pc.or_(
            pc.or_(pc.match_substring(text, " "), pc.match_substring(text, "(")),
            pc.match_substring(text, ")"),
        )
    )
    done = columnar.flags(done)
    values_out, errors = columnar.settle(
        array, values.index, done, text, lambda v: company_display_name(v) or None, TransformFailure
    )
    return columnar.arrow_series(columnar.empty_to_null(pa.array(values_out.array)), values.index), errors


# --------------------------------------------------------------------------- addresses

_MUNICIPALITIES = ("北京", "上海", "天津", "重庆")
_MUNICIPAL_DISTRICT = r"^([^区县]{1,6}?(?:区|县))"
_ADDRESS = re.compile(
    r"^(?P<province>[^省市]{2,7}?(?:省|自治区|特别行政区))?"
    r"(?P<city>.{1,8}?(?:市|自治州|地区|盟))?"
    r"(?P<district>.{1,8}?(?:区|县|旗|市))?"
)
_MUNICIPAL_RE2 = (
    "^(?P<municipality>"
    + "|".join(_MUNICIPALITIES)
    + ")市?(?P<local_district>"
    + _MUNICIPAL_DISTRICT[2:-1]
    + ")?"
)


def split_address(value: str) -> dict[str, str | None]:
    """Split an address into province, city and district: written out, else placed by :mod:`integration.geo`."""
    text = clean_text(unicodedata.normalize("NFKC", value)).replace(" ", "")
    for name in _MUNICIPALITIES:
        if text.startswith(name):
            rest = text[len(name) :].removeprefix("市")
            district = re.match(_MUNICIPAL_DISTRICT, rest)
            return {
                "province": f"{name}市",
                "city": f"{name}市",
                "district": district.group(1) if district else None,
            }
    match = _ADDRESS.match(text)
    parts = match.groupdict() if match else {}
    if not parts.get("province") or not parts.get("city"):  # 江苏无锡新吴区…, 苏州工业园区…, Wuxi
        place = geo.place_of_address(value)
        if place.known:
            return {"province": place.province, "city": place.city, "district": place.district}
    return {"province": parts.get("province"), "city": parts.get("city"), "district": parts.get("district")}


class AddressPartArgs(Args):
    """Arguments of ``address_part``."""

    part: Literal["province", "city", "district"] = Field(description="which part of the address to keep")


@transform(
    "address_part",
    AddressPartArgs,
    clean_output=True,
    examples=(
        "广东省深圳市南山区科技园1号",
        "北京海淀区中关村大街1号",
        "江苏无锡新吴区学院路1号",
        "苏州工业园区星湖街328号",
        "8 Keji Road, Nanshan, Shenzhen",
        "Room 5, 1 Queen's Road",
    ),
    example_args={"part": "city"},
)
def address_part(values: pd.Series, args: AddressPartArgs) -> Outcome:
    """Province, city or district of a Chinese address, with or without 省/市 (江苏无锡新吴区… → 江苏省 / 无锡市 / 新吴区), or the pinyin city of a Latin one."""
    array = columnar.text_array(values)
    if array is None:
        return _text(values, lambda v: split_address(v)[args.part])
    parts = columnar.memo("address_parts", values, lambda: _address_parts(array))
    return columnar.arrow_series(columnar.empty_to_null(parts[args.part]), values.index), None


def _address_parts(array: pa.Array | pa.ChunkedArray) -> dict[str, Any]:
    """``split_address`` over an Arrow array: province, city and district arrays ("" where absent).

    Written-out parts are read by one regular expression; the addresses it leaves without a province
    or city (no suffixes, abbreviations, pinyin) go to :func:`integration.geo.places_of_addresses`, each
    distinct one once.
    """
    cleaned = columnar.nfkc_clean_array(array)
    text = pc.replace_substring(cleaned, " ", "")
    general = pc.extract_regex(text, _ADDRESS.pattern)
    parts = {name: pc.struct_field(general, [name]) for name in ("province", "city", "district")}
    municipal = columnar.flags(pc.match_substring_regex(text, "^(?:" + "|".join(_MUNICIPALITIES) + ")"))
    if pc.any(municipal).as_py():
        local = pc.extract_regex(pc.filter(text, municipal), _MUNICIPAL_RE2)
        city = pc.binary_join_element_wise(pc.struct_field(local, ["municipality"]), "市", "")
        patched = {"province": city, "city": city, "district": pc.struct_field(local, ["local_district"])}
        parts = {name: columnar.scatter(parts[name], municipal, patched[name]) for name in parts}
    incomplete = columnar.flags(
        pc.and_(
            pc.not_equal(text, ""),
            pc.or_(pc.equal(parts["province"], ""), pc.equal(parts["city"], "")),
        )
    )
    if not pc.any(incomplete).as_py():
        return parts
    return _placed_parts(parts, pc.filter(cleaned, incomplete), incomplete)


def _placed_parts(
    parts: dict[str, Any], addresses: pa.Array | pa.ChunkedArray, rows: pa.Array | pa.ChunkedArray
) -> dict[str, Any]:
    """Replace the parts of ``rows`` by the places of their ``addresses`` where geo knows the place."""
    distinct = pc.unique(addresses)
    places = geo.places_of_addresses(distinct.to_pylist())
    position = pc.index_in(addresses, value_set=distinct)
    known = pc.take(pa.array([p.known for p in places], pa.bool_()), position)
    placed = {}
    for name in parts:
        found = pc.take(pa.array([getattr(p, name) or "" for p in places], pa.string()), position)
        written = pc.filter(parts[name], rows)
        placed[name] = columnar.scatter(parts[name], rows, pc.if_else(known, found, written))
    return placed


# --------------------------------------------------------------------------- codes and flags


@transform("stage", examples=("初步接洽", "商务谈判", "赢单", "Closed Won", "Prospecting", "搁置"))
def stage(values: pd.Series, args: NoArgs) -> Outcome:
    """Opportunity stage code from the stage master: codes, 初步接洽…赢单/输单, SugarCRM sales_stage values."""

    def code(value: Any) -> str:
        found = resolve_stage(str(value))
        if found is None:
            raise TransformFailure(
                f"'{value}' is not a known stage; map it with map_values or extend the stage list"
            )
        return found

    return per_value(values, code)


_TRUE = {"1", "y", "yes", "true", "t", "是", "有", "对", "√", "✓", "x", "on"}
_FALSE = {"0", "n", "no", "false", "f", "否", "无", "不", "×", "✗", "off", ""}


@transform("bool", yields="bool", examples=("是", "否", "Y", "no", "√", "也许"))
def to_bool(values: pd.Series, args: NoArgs) -> Outcome:
    """Booleans from 是/否, Y/N, yes/no, true/false, 1/0, √/×."""

    def parse(value: Any) -> bool:
        if isinstance(value, bool):
            return value
        text = _fold(value)
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise TransformFailure(f"'{value}' is not a yes/no value (是/否, Y/N, true/false, 1/0)")

    return per_value(values, parse)


@transform("to_text", examples=(1001.0, "0042", 3.5))
def to_text(values: pd.Series, args: NoArgs) -> Outcome:
    """Text form of codes read as numbers (1001.0 → '1001')."""
    return _text(values, str.strip)
