"""The lazily filled match index (``online.NameIndex``) answers exactly as the full ``MatchIndex`` does."""

from __future__ import annotations

import random
from typing import Any

import pandas as pd
import pytest

from crm_core.errors import DedupError
from integration.dedup.customers import NAME_FIELDS, linkage_rows
from integration.dedup.normalize import normalize_company_name
from integration.dedup.online import MatchIndex, NameIndex, query_record
from tests.test_matching_classes import code

TRADES = ["腾达", "华鑫", "明汇", "明辉", "恒通", "博远", "金桥",
          "瑞丰", "鼎宏", "天成", "众合", "卓越", "景汇", "德嘉"]  # fmt: skip
INDUSTRIES = ["科技", "技术", "贸易", "软件", "咨询", "建设工程"]
REGIONS = ["深圳", "广州", "上海", "北京", "成都", ""]
CITIES = ["深圳市", "广州市", "上海市", "北京市", "成都市", None]
AREA = {"深圳市": "755", "广州市": "20", "上海市": "21", "北京市": "10", "成都市": "28"}
DIVISIONS = ["440305", "440106", "310115", "110108", "510107"]


def _customers(count: int, seed: int = 5) -> list[dict[str, Any]]:
    """Golden customers whose place comes from the name, the city field, the phone or the credit code, some of
    them branches, many sharing a trade name in other places."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        region, trade, industry = rng.choice(REGIONS), rng.choice(TRADES), rng.choice(INDUSTRIES)
        branch = rng.choice(["", "", "", "北京分公司", "上海分公司"])
        name = f"{region}{trade}{rng.choice(['', '', rng.choice(TRADES)[0]])}{industry}有限公司{branch}"
        city = rng.choice(CITIES)
        phone = f"0{AREA[city]}{rng.randrange(10**7, 10**8)}" if city and rng.random() < 0.5 else None
        credit = code(rng.choice(DIVISIONS), f"{rng.randrange(10**7, 10**8)}") if rng.random() < 0.4 else None
        rows.append({
            "id": 1000 + 3 * i, "name": name if rng.random() < 0.97 else None, "credit_code": credit,
            "phone": phone, "email": rng.choice([None, f"info@{trade}{i % 7}.cn", "x@qq.com"]),
            "city": city if rng.random() < 0.6 else None, "address": None, "province": None, "district": None,
            "credit_code_as_written": None if credit or rng.random() < 0.8 else f"91{i:09d}",
        })  # fmt: skip
    return rows


def _indexes(customers: list[dict[str, Any]]) -> tuple[MatchIndex, NameIndex, list[int]]:
    """The full index and the lazy one over the same linkage rows (as the name resolver builds them)."""
    rows = linkage_rows(customers)
    frame = pd.DataFrame.from_records(
        [{"id": c["id"], **r} for c, r in zip(customers, rows, strict=True)], index="id"
    )
    asked: list[int] = []

    def linkage(positions: list[int]) -> list[dict[str, Any]]:
        asked.extend(positions)
        return linkage_rows([customers[p] for p in positions])

    lazy = NameIndex([c["id"] for c in customers], [c["name"] for c in customers], linkage)
    return MatchIndex(frame), lazy, asked


def _written(customers: list[dict[str, Any]], count: int, seed: int = 9) -> list[str]:
    """Names as a form or a workbook writes them: the customers', another region's, slips, branches."""
    rng = random.Random(seed)
    names = [c["name"] for c in customers if c["name"]]
    written = []
    for _ in range(count):
        name = rng.choice(names)
        kind = rng.randrange(5)
        at = rng.randrange(len(name))
        if kind == 1:
            name = rng.choice(REGIONS) + normalize_company_name(name).core + "有限公司"
        elif kind == 2:
            name = name[:at] + name[at + 1 :]
        elif kind == 3:
            name = name[:at] + rng.choice(TRADES)[1] + name[at + 1 :]
        elif kind == 4:
            name = name.replace("有限公司", "有限公司上海分公司")
        written.append(name)
    return written


def test_name_fields_are_what_linkage_rows_derives_from_the_name() -> None:
    customers = _customers(400)
    for customer, row in zip(customers, linkage_rows(customers), strict=True):
        parts = normalize_company_name(customer["name"] or "")
        assert {f: derive(parts) for f, derive in NAME_FIELDS.items()} == {f: row[f] for f in NAME_FIELDS}
        # the name alone decides them: the same without the rest of the row
        [alone] = linkage_rows([{"name": customer["name"]}])
        assert {f: alone[f] for f in NAME_FIELDS} == {f: row[f] for f in NAME_FIELDS}


def test_the_lazy_index_matches_names_as_the_full_index_does() -> None:
    customers = _customers(600)
    full, lazy, asked = _indexes(customers)
    capped = 0
    for name in _written(customers, 400):
        query = query_record(name)
        expected = full.match(query, limit=5)
        assert lazy.match(query, limit=5) == expected, name
        capped += any(c.probability < full.spec.review for c in expected)
    assert capped  # places and branches cap candidates: the lazy rows must hold them
    assert len(set(asked)) < len(customers)  # and it computed only the rows it compared
    assert lazy.weights == {k: v for k, v in full.weights.items() if k in lazy.weights}
    assert set(lazy.weights) == {"name_core_levenshtein", "trade_rare_rare"}


def test_the_lazy_index_answers_any_query_as_the_full_index_does() -> None:
    customers = _customers(300)
    full, lazy, _ = _indexes(customers)
    for customer in customers[::7]:
        query = query_record(
            customer["name"], phone=customer["phone"], credit_code=customer["credit_code"],
            email=customer["email"], city=customer["city"],
        )  # fmt: skip
        assert lazy.match(query) == full.match(query)
    assert {name: lazy.weights[name] for name in full.weights} == full.weights  # each worked out when asked
    some = customers[3]["id"]
    assert lazy.value(some, "city") == full.value(some, "city")
    with pytest.raises(DedupError):
        lazy.add(pd.DataFrame(index=pd.Index([1], name="id")))


def test_the_lazy_index_fills_what_only_the_rest_of_the_row_places() -> None:
    # A province known only from a phone's area code (028: several cities of 四川) caps a candidate for a
    # name written in 广东; and value() fills the row it is asked about before any query has.
    customers = [
        {"id": 1, "name": "腾达科技有限公司", "phone": "02887654321"},
        {"id": 2, "name": "腾达科技有限公司", "city": "深圳市"},
        {"id": 3, "name": "腾达科技有限公司"},
        *({"id": 10 + i, "name": name} for i, name in enumerate(_written(_customers(60), 60))),
    ]
    full, lazy, asked = _indexes(customers)
    assert lazy.value(1, "province") == full.value(1, "province") == "四川省"
    assert asked == [0]
    _, fresh, _ = _indexes(customers)
    query = query_record("广东腾达科技有限公司")
    expected = full.match(query)
    assert fresh.match(query) == expected
    capped = {c.customer_id: c.probability for c in expected}
    assert capped[1] <= full.spec.review * 0.5 < capped[2]  # the province conflict is what caps customer 1
