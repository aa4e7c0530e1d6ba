"""The vectorized (Arrow) path of the transforms gives exactly what the per-value Python path gives."""

from __future__ import annotations

import unicodedata
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from integration.mappings import columnar
from integration.mappings.transforms import REGISTRY, clean_text

# Values that exercise every fast path and every way out of it: Chinese and Latin text, full-width forms,
# every kind of space, zero-width characters, case mappings that differ between Unicode libraries.
TRICKY = [
    "深圳市腾达科技有限公司", " 深圳市腾达科技有限公司 ", "深圳 腾达（集团）有限公司", "深圳市腾达 (集团) 有限公司",
    "ＡＢＣ有限公司", "Acme  Trading\tLtd", "acme\u3000trading", "a\u200bb\u00adc", "\ufeffBOM Co", "  ",
    "", "Straße GmbH", "ﬁne ﬂowers", "İstanbul Ltd", "ΣΑΣ ΟΔΟΣ", "ǆungla", "Ｃａｆé", "emoji 😀 Co",
    "they're o'neil", "x" * 300, "广东省深圳市南山区科技园1号", "北京海淀区中关村", "上海市浦东新区张江",
    "内蒙古自治区 呼和浩特市新城区", "重庆市", "天津红桥", "User@Example.CN", " <sales@acme.com.cn>; ",
    "用户＠例子.cn", "bad@", "13800138000", "+86 139-1234-5678", "0086 755 8600 1234", "(0755)86001234",
    "010-12345678", "0755-8600123转8", "+1 650-253-0000", "12345", "91440300708461136T",
    "9144 0300 7084 6113 6t", "91440300708461136X", "９１４４０３００７０８４６１１３６Ｔ", "914403007084611",
    "¥1,234.50", "12.5万", "-300", "(500)", "一百二十万", "1,2,3", "$1,000", "1.2k", "￥９９.５", "0.10",
    "-0", "1" * 45, "abc", None,
]  # fmt: skip

KERNEL_TRANSFORMS = [
    ("trim", {}), ("nfkc", {}), ("upper", {}), ("lower", {}), ("title", {}), ("company_name", {}),
    ("email", {}), ("phone", {}), ("uscc", {}), ("parse_amount", {}),
    ("address_part", {"part": "province"}), ("address_part", {"part": "city"}),
    ("address_part", {"part": "district"}),
]  # fmt: skip


def _plain(value: Any) -> Any:
    return None if value is None or value is pd.NA else value


def _apply(name: str, values: list[Any], args: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    definition = REGISTRY[name]
    with columnar.chunk_scope():
        out, errors = definition.func(pd.Series(values, dtype=object), definition.args.model_validate(args))
    reasons = [None] * len(values) if errors is None else [_plain(e) for e in errors]
    return [_plain(v) for v in out], reasons


@pytest.mark.parametrize(("name", "args"), KERNEL_TRANSFORMS, ids=lambda x: str(x))
def test_vectorized_path_equals_per_value_path(name: str, args: dict[str, Any]) -> None:
    vectorized, vectorized_errors = _apply(name, TRICKY, args)
    # One non-text value in the column sends every value through the per-value Python functions.
    per_value, per_value_errors = _apply(name, [*TRICKY, 7], args)
    for position, value in enumerate(TRICKY):
        assert vectorized[position] == per_value[position], (value, vectorized[position], per_value[position])
        assert vectorized_errors[position] == per_value_errors[position], value


def test_whitespace_set_is_pythons() -> None:
    spaces = "".join(chr(c) for c in range(0x110000) if chr(c).isspace())
    assert set(columnar.WHITESPACE) == set(spaces)


def test_tidy_values_are_left_alone_by_nfkc_clean_and_cased_alike_by_arrow_and_python() -> None:
    ranges = [(0x21, 0x7E), (0x3001, 0x3002), (0x300A, 0x3011), (0x3400, 0x4DBF), (0x4E00, 0x9FFF)]
    characters = [chr(c) for start, end in ranges for c in range(start, end + 1)]
    assert all(unicodedata.normalize("NFKC", c) == c for c in characters)
    words = pa.array(characters)
    assert columnar.tidy_mask(words).to_pylist() == [True] * len(characters)
    assert pc.utf8_upper(words).to_pylist() == [c.upper() for c in characters]
    assert pc.utf8_lower(words).to_pylist() == [c.lower() for c in characters]
    assert pc.utf8_title(words).to_pylist() == [c.title() for c in characters]
    samples = pa.array(["a b", " a", "a ", "a  b", "a\tb", "ａ", "é", "a\u200bb", "深圳 腾达", ""])
    assert columnar.tidy_mask(samples).to_pylist() == [
        True,
        False,
        False,
        False,
        False,
        False,
        False,
        False,
        True,
        True,
    ]
    assert columnar.clean_text_array(samples).to_pylist() == [clean_text(v) for v in samples.to_pylist()]


def test_a_column_with_nothing_but_nulls_stays_null() -> None:
    out, errors = _apply("company_name", [None, None], {})
    assert out == [None, None] and errors == [None, None]
