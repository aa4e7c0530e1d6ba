"""Row hashes computed column by column are byte for byte the hash of each row's dict."""

from __future__ import annotations

import datetime as dt
import random
from decimal import Decimal

import numpy as np
import pandas as pd

from crm_core.loading import row_hash, row_hashes

ODD_VALUES = [
    None, True, False, 0, -1, 2**70, 1.5, -0.0, 1e300, float("nan"), float("inf"), float("-inf"),
    "", "腾达科技有限公司", 'quote " and \\ backslash', "tab\tnew\nline\x01", "100%", "%s %(x)s",
    Decimal("12.50"), Decimal("1E+3"), Decimal("-0.000"), dt.date(2025, 3, 5), dt.datetime(2025, 3, 5, 8, 30),
    dt.datetime(2025, 3, 5, tzinfo=dt.UTC), pd.Timestamp("2025-03-05 10:00"), np.int64(7), np.float64(2.25),
    np.bool_(True), ["a", 1, None], {"k": "v", "n": [1.5, None]}, ("t", 2), b"bytes", object.__new__(object),
]  # fmt: skip


def test_every_kind_of_value_hashes_as_its_row_dict_does() -> None:
    generator = random.Random(13)
    names = ["name", "amount", "100%_field", "备注", 'a"b', "z"]
    columns = [[generator.choice(ODD_VALUES) for _ in range(400)] for _ in names]
    columns[0][: len(ODD_VALUES)] = ODD_VALUES  # every value at least once
    expected = [row_hash(dict(zip(names, row, strict=True))) for row in zip(*columns, strict=True)]
    assert row_hashes(names, columns) == expected


def test_key_order_and_empty_inputs() -> None:
    assert row_hashes(["b", "a"], [[1, 2], ["x", "y"]]) == [
        row_hash({"a": "x", "b": 1}),
        row_hash({"a": "y", "b": 2}),
    ]
    assert row_hashes(["a"], [[]]) == []
    assert row_hashes([], []) == []
    # a different value gives a different hash
    assert row_hashes(["a"], [["x"]]) != row_hashes(["a"], [["y"]])


def test_columns_of_text_and_blanks_hash_as_their_row_dicts_do() -> None:
    """Columns holding only text, text and None, or only None take a shortcut: the same bytes."""
    text = ["", "腾达", 'q"\\', "tab\tx\x01", "100%", "%(x)s", "\u2028"]
    names = ["text", "blanks", "none", "mixed"]
    columns = [text, [None if i % 2 else t for i, t in enumerate(text)], [None] * len(text),
               [*text[:-1], 5]]  # fmt: skip
    expected = [row_hash(dict(zip(names, row, strict=True))) for row in zip(*columns, strict=True)]
    assert row_hashes(names, columns) == expected


def test_columns_of_amounts_and_dates_hash_as_their_row_dicts_do() -> None:
    """Columns holding only decimals, dates or datetimes (and blanks) take a shortcut: the same bytes."""
    amounts = [Decimal("12.50"), Decimal("1E+3"), Decimal("-0.000"), Decimal("NaN"), Decimal("Infinity"),
               Decimal("-1234567.891"), None, Decimal("0.1")]  # fmt: skip
    days = [dt.date(2025, 3, 5), None, dt.date(1999, 12, 31), dt.date(2025, 1, 1), None, dt.date(2000, 2, 29),
            dt.date(2025, 3, 5), dt.date(1, 1, 1)]  # fmt: skip
    times = [dt.datetime(2025, 3, 5, 8, 30), dt.datetime(2025, 3, 5, tzinfo=dt.UTC), None,
             dt.datetime(2025, 3, 5, 8, 30, 0, 123456), dt.datetime(2025, 3, 5, tzinfo=dt.timezone(dt.timedelta(hours=8))),
             None, dt.datetime(1, 1, 1), dt.datetime(2025, 12, 31, 23, 59, 59)]  # fmt: skip
    names = ["amount", "day", "time", "mixed"]
    columns = [amounts, days, times, [*amounts[:-1], dt.date(2025, 1, 1)]]
    expected = [row_hash(dict(zip(names, row, strict=True))) for row in zip(*columns, strict=True)]
    assert row_hashes(names, columns) == expected
