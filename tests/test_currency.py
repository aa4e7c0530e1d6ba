"""Money with currency: convert into the base currency from constant, dated or per-row rates, keeping the original."""

from __future__ import annotations

import datetime as dt
import random
import sqlite3
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from crm_core.errors import ConfigError, MappingError
from crm_core.validation import builtin_rules, validate
from integration.connectors.base import LOCATION, ROW_KIND, ROW_REF
from integration.mappings.engine import EXTERNAL_KEY, map_chunk, map_chunks, python_records
from integration.mappings.money import CurrenciesConfig, RateTable
from integration.mappings.spec import CompiledMapping, load_mapping
from integration.pipeline import Migration, extract_chunks

CENT = Decimal("0.01")
HEAD = (
    "version: 1\nsource: {connector: crm, table: deals, key: id}\ntarget: opportunity\nfields:\n"
    "  customer: acc\n  name: name\n  stage: {const: prospecting}\n"
)
TABLE = RateTable.of(
    CurrenciesConfig(
        base="CNY",
        rates={"USD": Decimal("7.1"), "EUR": Decimal("7.8"), "HKD": Decimal("0.91")},
        dated={"USD": {dt.date(2024, 1, 1): Decimal("7.10"), dt.date(2025, 1, 1): Decimal("7.25")}},
    )
)


def mapping(tmp_path: Path, amount: str, table: RateTable | None = TABLE) -> CompiledMapping:
    file = tmp_path / "deals.yaml"
    file.write_text(HEAD + amount, encoding="utf-8")
    return load_mapping(file, rates=table)


def frame(rows: list[dict[str, object]]) -> pd.DataFrame:
    data = pd.DataFrame([{"acc": "a", "name": f"deal {i}", **row} for i, row in enumerate(rows)])
    data["id"] = [str(i) for i in range(len(rows))]
    data[ROW_REF] = [str(i + 2) for i in range(len(rows))]
    data[LOCATION] = "deals"
    data[ROW_KIND] = "data"
    return data


def records(result_records: pd.DataFrame) -> dict[str, dict[str, object]]:
    plain = python_records(result_records)
    return {row[EXTERNAL_KEY]: row for row in plain.to_dict("records")}


def reasons(rejects: pd.DataFrame) -> dict[str, tuple[str, str, str]]:
    return {r["row_ref"]: (r["rule"], r["value"], r["reason"]) for r in rejects.to_dict("records")}


def test_constant_rates_convert_and_keep_the_original_amount_and_currency(tmp_path: Path) -> None:
    compiled = mapping(
        tmp_path, "  amount: {from: amt, transforms: [parse_amount], convert: {currency: cur}}\n"
    )
    assert compiled.written_fields()[-3:] == ["currency", "original_amount", "original_currency"]
    rows = [
        {"amt": "1,000", "cur": "美元"},
        {"amt": "12.5万", "cur": "EUR"},
        {"amt": "2000", "cur": "人民币"},
        {"amt": "300", "cur": "hkd"},
        {"amt": None, "cur": "USD"},  # no amount: nothing to convert, the currency is still kept
    ]
    result = map_chunk(compiled, frame(rows))
    assert result.rejects.empty
    got = records(result.records)
    rate = {"USD": Decimal("7.1"), "EUR": Decimal("7.8"), "CNY": Decimal(1), "HKD": Decimal("0.91")}
    for key, code, original in [
        ("0", "USD", "1000"),
        ("1", "EUR", "125000"),
        ("2", "CNY", "2000"),
        ("3", "HKD", "300"),
    ]:
        row = got[key]
        assert (row["original_currency"], row["original_amount"], row["currency"]) == (
            code,
            Decimal(original),
            "CNY",
        )
        assert row["amount"] == (Decimal(original) * rate[code]).quantize(CENT, ROUND_HALF_UP)
    assert got["4"]["amount"] is None and got["4"]["original_amount"] is None
    assert got["4"]["original_currency"] == "USD"


def test_converted_amounts_round_half_up_to_cents(tmp_path: Path) -> None:
    compiled = mapping(tmp_path, "  amount: {from: amt, convert: {currency: cur, rate: r}}\n")
    # 0.5 × 7.13 = 3.565: half up gives 3.57 (banker's rounding would give 3.56); 0.125 CNY → 0.13.
    result = map_chunk(
        compiled,
        frame([{"amt": "0.5", "cur": "USD", "r": "7.13"}, {"amt": "0.125", "cur": "CNY", "r": None}]),
    )
    got = records(result.records)
    assert (got["0"]["amount"], got["1"]["amount"]) == (Decimal("3.57"), Decimal("0.13"))


def test_the_dated_table_picks_the_rate_valid_on_the_rows_date(tmp_path: Path) -> None:
    compiled = mapping(
        tmp_path,
        "  amount:\n    from: amt\n    convert: {currency: cur, date: {from: day, transforms: [parse_date]}}\n",
    )
    rows = [
        {"amt": "100", "cur": "USD", "day": "2024-12-31"},  # the 2024-01-01 rate
        {"amt": "100", "cur": "USD", "day": "2025年1月1日"},  # the 2025-01-01 rate, from its first day
        {"amt": "100", "cur": "USD", "day": "2023-06-30"},  # before the first rate: rejected
        {"amt": "100", "cur": "USD", "day": None},  # no date: rejected
        {"amt": "100", "cur": "EUR", "day": "2025-03-01"},  # no dated EUR rates: currencies.rates
        {"amt": "100", "cur": "GBP", "day": "2025-03-01"},  # no rate anywhere: rejected
    ]
    result = map_chunk(compiled, frame(rows))
    got = records(result.records)
    assert got["0"]["amount"] == Decimal("710.00") and got["1"]["amount"] == Decimal("725.00")
    assert got["4"]["amount"] == Decimal("780.00")
    assert reasons(result.rejects) == {
        "4": (
            "convert",
            "2023-06-30",
            "no USD rate valid on 2023-06-30 (currencies.dated.USD starts 2024-01-01)",
        ),
        "5": ("convert", "USD", "no date to pick the USD rate (day is empty)"),
        "7": ("convert", "GBP", "no rate for GBP in project.yaml (currencies.dated or currencies.rates)"),
    }


def test_row_failures_become_rejects_with_the_reason(tmp_path: Path) -> None:
    compiled = mapping(
        tmp_path, "  amount: {from: amt, transforms: [parse_amount], convert: {currency: cur}}\n"
    )
    rows = [
        {"amt": "待定", "cur": "USD"},
        {"amt": "100", "cur": "GBP"},
        {"amt": "100", "cur": "ABC"},
        {"amt": "100", "cur": "比特币"},
        {"amt": "100", "cur": None},
        {"amt": "100", "cur": "-99"},
        {"amt": None, "cur": "比特币"},  # no amount: no reject, and no currency kept
        {"amt": "100", "cur": "USD"},
    ]
    result = map_chunk(compiled, frame(rows))
    assert list(records(result.records)) == ["6", "7"]
    assert records(result.records)["6"]["original_currency"] is None
    got = reasons(result.rejects)
    assert got["2"][0] == "mapping" and got["2"][2].startswith("parse_amount: '待定' is not an amount")
    assert {k: v for k, v in got.items() if k != "2"} == {
        "3": ("convert", "GBP", "no rate for GBP in project.yaml (currencies.rates)"),
        "4": ("convert", "ABC", "'ABC' is not an ISO 4217 currency"),
        "5": ("convert", "比特币", "'比特币' is not a currency (use an ISO code like CNY)"),
        "6": (
            "convert",
            None,
            "the amount has no currency (give currency a default if blank means the base currency)",
        ),
        "7": (
            "convert",
            "-99",
            "'-99' is not a currency; SuiteCRM's -99 is its base currency: use profile: suitecrm",
        ),
    }


def test_a_rate_column_multiplies_or_divides_and_bad_rates_are_rejected(tmp_path: Path) -> None:
    rows = [
        {"amt": "100", "cur": "USD", "r": "7.2"},
        {"amt": "100", "cur": "USD", "r": None},
        {"amt": "100", "cur": "USD", "r": "0"},
        {"amt": "100", "cur": "USD", "r": "abc"},
        {"amt": "100", "cur": "CNY", "r": None},  # the base currency needs no rate
    ]
    compiled = mapping(tmp_path, "  amount: {from: amt, convert: {currency: cur, rate: r}}\n")
    result = map_chunk(compiled, frame(rows))
    got = records(result.records)
    assert got["0"]["amount"] == Decimal("720.00") and got["4"]["amount"] == Decimal("100.00")
    found = reasons(result.rejects)
    assert found["3"] == ("convert", "USD", "no rate for USD on this row (r is empty)")
    assert found["4"] == ("convert", "0", "the rate for USD is not a positive number")
    assert found["5"][0] == "mapping" and "'abc' is not a number" in found["5"][2]
    divide = mapping(
        tmp_path, "  amount: {from: amt, convert: {currency: cur, rate: r, direction: divide}}\n"
    )
    assert records(map_chunk(divide, frame(rows[:1])).records)["0"]["amount"] == (
        Decimal(100) / Decimal("7.2")
    ).quantize(CENT, ROUND_HALF_UP)


def suitecrm_project(root: Path) -> Path:
    """A SuiteCRM database (base currency CNY) and a project whose mapping joins currencies in its query."""
    (root / "mappings").mkdir(parents=True)
    db = sqlite3.connect(root / "crm.sqlite")
    db.executescript(
        "CREATE TABLE opportunities (id TEXT, name TEXT, account_id TEXT, amount DOUBLE, amount_usdollar DOUBLE,"
        " currency_id TEXT, deleted INT);"
        "CREATE TABLE currencies (id TEXT, iso4217 TEXT, conversion_rate DOUBLE, deleted INT);"
        "INSERT INTO currencies VALUES ('u1', 'USD', 0.1408, 0), ('e1', 'EUR', 0.1282, 0), ('old', 'GBP', 0.11, 1),"
        " ('nil', 'JPY', NULL, 0);"
    )
    rows = [
        ("o1", 50000, "-99"),
        ("o2", 18000, "u1"),
        ("o3", 86000.5, "e1"),
        ("o4", 1000, "old"),  # its currencies row is deleted: SuiteCRM would silently use the base currency
        ("o5", 1000, "nil"),  # a currencies row without a rate
    ]
    for opp, amount, currency in rows:
        db.execute(
            "INSERT INTO opportunities VALUES (?, ?, 'a1', ?, NULL, ?, 0)",
            (opp, f"deal {opp}", amount, currency),
        )
    db.commit()
    db.close()
    (root / "project.yaml").write_text(
        "version: 1\nname: suite\nsources:\n  crm: {connector: sql, url: 'sqlite:///crm.sqlite'}\n"
        "currencies: {base: CNY}\n",
        encoding="utf-8",
    )
    (root / "mappings" / "crm_opportunities.yaml").write_text(
        "version: 1\n"
        "source:\n  connector: crm\n  key: id\n  query: >-\n"
        "    SELECT o.*, c.iso4217, c.conversion_rate FROM opportunities o\n"
        "    LEFT JOIN currencies c ON c.id = o.currency_id AND c.deleted = 0 WHERE o.deleted = 0\n"
        "target: opportunity\nfields:\n  customer: account_id\n  name: name\n  stage: {const: prospecting}\n"
        "  amount:\n    from: amount\n"
        "    convert: {profile: suitecrm, currency_id: currency_id, currency: iso4217, rate: conversion_rate}\n",
        encoding="utf-8",
    )
    return root


def test_suitecrm_profile_reads_minus_99_as_base_and_divides_by_conversion_rate(tmp_path: Path) -> None:
    migration = Migration.load(str(suitecrm_project(tmp_path / "suite")))
    [compiled] = migration.mappings
    result = map_chunks(compiled, extract_chunks(migration, compiled))
    got = records(result.records)
    assert set(got) == {"o1", "o2", "o3"}
    # SuiteCRM's Currency::convertToDollar: amount / conversion_rate (then cents); -99 has rate 1.
    for key, amount, rate, code in [
        ("o1", "50000", "1", "CNY"),
        ("o2", "18000", "0.1408", "USD"),
        ("o3", "86000.5", "0.1282", "EUR"),
    ]:
        assert got[key]["amount"] == (Decimal(amount) / Decimal(rate)).quantize(CENT, ROUND_HALF_UP)
        assert (got[key]["original_currency"], got[key]["original_amount"]) == (code, Decimal(amount))
        assert got[key]["currency"] == "CNY"
    assert {r["row_ref"]: r["reason"] for r in result.rejects.to_dict("records")} == {
        "o4": "currency_id 'old' names no currency (its row is missing or deleted)",
        "o5": "no rate for JPY on this row (conversion_rate is empty)",
    }


def test_minus_99_stays_invalid_outside_the_suitecrm_convention(tmp_path: Path) -> None:
    plain = mapping(tmp_path, "  amount: amt\n  currency: {from: cur, transforms: [currency]}\n")
    result = map_chunk(plain, frame([{"amt": "1", "cur": "-99"}]))
    assert list(result.rejects["reason"]) == ["currency: '-99' is not a currency (use an ISO code like CNY)"]
    own_ids = mapping(
        tmp_path, "  amount: {from: amt, convert: {currency: cur, base_ids: ['0'], rate: r}}\n"
    )  # another system's base-currency marker, by option
    got = records(
        map_chunk(
            own_ids, frame([{"amt": "5", "cur": "0", "r": None}, {"amt": "5", "cur": "-99", "r": "2"}])
        ).records
    )
    assert list(got) == ["0"] and got["0"]["original_currency"] == "CNY"


def test_project_rate_problems_are_located_in_the_mapping(tmp_path: Path) -> None:
    root = tmp_path / "p"
    (root / "mappings").mkdir(parents=True)
    (root / "project.yaml").write_text(
        "version: 1\nname: p\nsources:\n  crm: {connector: sql, url: 'sqlite:///crm.sqlite'}\n",
        encoding="utf-8",
    )
    file = root / "mappings" / "deals.yaml"
    file.write_text(HEAD + "  amount: {from: amt, convert: {currency: cur}}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        Migration.load(str(root))
    assert [str(p) for p in caught.value.problems] == [
        f"{file}:8:23: fields.amount.convert: convert needs a rate: give rate: (a column) or add currencies: "
        "{base: CNY, rates: {USD: 7.1}} to project.yaml"
    ]
    (root / "project.yaml").write_text(
        "version: 1\nname: p\nsources:\n  crm: {connector: sql, url: 'sqlite:///crm.sqlite'}\n"
        "currencies: {rates: {USD: 7.1}}\n",
        encoding="utf-8",
    )
    file.write_text(
        HEAD + "  amount: {from: amt, convert: {currency: {const: 欧元}, date: d}}\n", encoding="utf-8"
    )
    with pytest.raises(ConfigError) as caught:
        Migration.load(str(root))
    assert [str(p) for p in caught.value.problems] == [
        f"{file}:8:56: fields.amount.convert.date: date picks a rate from currencies.dated in project.yaml, which has none"
    ]
    file.write_text(HEAD + "  amount: {from: amt, convert: {currency: {const: 欧元}}}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        Migration.load(str(root))
    assert [str(p) for p in caught.value.problems] == [
        f"{file}:8:51: fields.amount.convert.currency.const: no rate for EUR in project.yaml (currencies.rates)"
    ]


def test_validation_checks_original_currency_codes() -> None:
    frame = pd.DataFrame(
        {
            "original_amount": [Decimal(1), Decimal(2), Decimal(3)],
            "original_currency": ["USD", "XYZ", None],
        }
    )
    found = validate("opportunity", frame, builtin_rules())
    assert sorted(zip(found["index"], found["rule"], strict=True)) == [
        (1, "opportunity.original_currency.iso4217"),
        (2, "opportunity.original_amount.needs_currency"),
    ]


@pytest.mark.parametrize("divide", [False, True])
def test_arrow_decimals_round_like_python_decimals_half_up(divide: bool) -> None:
    from integration.mappings import money

    draw = random.Random(7)
    amounts = [Decimal(draw.randint(-(10**9), 10**9)) / 10 ** draw.randint(0, 4) for _ in range(3000)]
    amounts += [Decimal("0.5"), Decimal("-0.5"), Decimal("1.005"), Decimal("-1.005"), None]
    rates = np.array(
        [Decimal(draw.randint(1, 10**7)) / 10 ** draw.randint(0, 7) for _ in amounts[:-2]]
        + [Decimal(1), None],
        dtype=object,
    )
    arrow = money._arrow_convert(pd.Series(amounts, dtype=object), rates, divide)
    assert arrow is not None and isinstance(arrow.dtype, pd.ArrowDtype)
    python = money._python_convert(np.array(amounts, dtype=object), rates, divide)
    assert arrow.array.to_numpy(dtype=object, na_value=None).tolist() == python.tolist()


def test_the_fields_on_error_applies_to_conversion_failures(tmp_path: Path) -> None:
    rows = frame([{"amt": "100", "cur": "GBP"}, {"amt": "100", "cur": "USD"}])
    kept = map_chunk(
        mapping(tmp_path, '  amount: {from: amt, convert: {currency: cur}, on_error: "null"}\n'), rows
    )
    got = records(kept.records)
    assert got["0"]["amount"] is None and got["0"]["original_amount"] == Decimal(100)
    assert got["1"]["amount"] == Decimal("710.00")
    assert list(kept.rejects["severity"]) == ["warn"]
    with pytest.raises(
        MappingError, match=r"field 'amount' failed on deals row 2 \(value 'GBP'\): no rate for GBP"
    ):
        map_chunk(
            mapping(tmp_path, "  amount: {from: amt, convert: {currency: cur}, on_error: fail}\n"), rows
        )


def test_preview_shows_what_convert_fills(tmp_path: Path) -> None:
    from integration.mappings.preview import preview

    root = suitecrm_project(tmp_path / "suite")
    shown = preview(root / "mappings" / "crm_opportunities.yaml", rows=10).side_by_side()
    usd = shown[shown["_row"] == "o2"].iloc[0]
    assert (usd["original_currency"], usd["currency"], usd["amount (raw)"]) == ("USD", "CNY", "18000.0")
    assert usd["amount"] == (Decimal(18000) / Decimal("0.1408")).quantize(CENT, ROUND_HALF_UP)


def test_the_run_summary_counts_converted_amounts_by_currency(tmp_path: Path) -> None:
    from sqlalchemy.orm import Session

    from crm_core.db import make_engine, upgrade
    from crm_core.models import Customer, Opportunity
    from integration.cli import _converted_amounts

    url = f"sqlite:///{tmp_path / 'core.sqlite'}"
    engine = make_engine(url)
    upgrade(engine)
    with Session(engine) as session:
        customer = Customer(name="甲公司")
        session.add(customer)
        session.flush()
        for original in ("USD", "USD", "EUR", "CNY", None):
            session.add(
                Opportunity(
                    customer_id=customer.id,
                    name="x",
                    stage_code="initial_contact",
                    currency="CNY",
                    amount=Decimal(7),
                    original_amount=Decimal(1) if original else None,
                    original_currency=original,
                )
            )
        session.commit()
    engine.dispose()
    assert _converted_amounts(url) == "opportunity 3 (USD 2, EUR 1)"
