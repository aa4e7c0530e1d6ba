"""Every failure class of matching on data nobody tuned on (issue 14), each with a concrete pair.

Each pair is linked among the background customers of ``test_linkage.companies`` (so the unsupervised
classifier has the usual mix of pairs to learn from) and must end in one golden record, or must not.
A duplicate carries the evidence such a record usually has (one shared phone or address); a false merge
carries the evidence that tempted the old rules (the same trade name, a shared phone).
"""

from __future__ import annotations

import random
from functools import lru_cache
from typing import Any

import pandas as pd
import pytest
from stdnum.cn import uscc

from integration.dedup.customers import CUSTOMER_SPEC, linkage_row
from integration.dedup.linkage import LinkageResult, coherent_clusters, link, variant_similarity
from integration.dedup.normalize import credit_code_parts, credit_codes_near, phone_keys


def code(division: str, organisation: str = "70846113") -> str:
    """A valid 统一社会信用代码 for a division and an 8-digit organisation body (check characters added)."""
    weights = [3, 7, 9, 10, 5, 8, 4, 2]
    check = 11 - sum(int(c) * w for c, w in zip(organisation, weights, strict=True)) % 11
    org9 = organisation + ("X" if check == 10 else "0" if check == 11 else str(check))
    body = f"91{division}{org9}"
    return body + uscc.calc_check_digit(body)


SHENZHEN_CODE = code("440305")
ZHENGZHOU_CODE = code("410105")


CITIES = [("深圳", "0755", "440305", "南山区"), ("郑州", "0371", "410105", "金水区"), ("上海", "021", "310104", "徐汇区"),
          ("成都", "028", "510107", "武侯区"), ("杭州", "0571", "330106", "西湖区")]  # fmt: skip
BRANDS = ["恒信", "博远", "瑞丰", "金桥", "安捷", "鼎新", "宏图", "天成", "众合", "卓越", "远景", "嘉禾", "明德", "汇通",
          "启明", "云帆", "同创", "海纳", "星河", "凯达", "思源", "长城", "飞扬", "华创", "盛达", "永泰", "志远", "佳和"]  # fmt: skip
INDUSTRIES = ["科技", "贸易", "电子", "软件", "物流", "机械设备", "环保工程", "食品"]
# How people mistype a name: a homophone or look-alike for one character, or one character left out.
MISTYPED = {"恒": "衡", "信": "新", "博": "搏", "远": "源", "瑞": "锐", "丰": "风", "金": "今", "安": "按", "鼎": "顶",
            "宏": "弘", "图": "途", "天": "夭", "成": "城", "众": "重", "卓": "桌", "景": "京", "嘉": "佳", "明": "名",
            "汇": "会", "通": "同", "启": "起", "云": "芸", "帆": "凡", "同": "桐", "创": "闯", "海": "每", "纳": "呐",
            "星": "醒", "河": "何", "凯": "恺", "达": "达", "思": "斯", "源": "元", "长": "常", "城": "诚", "飞": "非",
            "扬": "杨", "华": "骅", "盛": "胜", "永": "水", "泰": "秦", "志": "至", "佳": "嘉", "和": "禾"}  # fmt: skip


@lru_cache(maxsize=1)
def background() -> pd.DataFrame:
    """Customers of 150 companies in five cities, written the ways sources write them.

    Trade names repeat across cities (namesakes); a duplicate record may mistype the name, drop the
    region into brackets, be in pinyin English, and carry only some of the phone, address and credit code.
    """
    from pypinyin import lazy_pinyin

    rng = random.Random(14)
    rows: list[dict[str, Any]] = []
    for _ in range(150):
        city, area, division, district = rng.choice(CITIES)
        brand, industry = rng.choice(BRANDS), rng.choice(INDUSTRIES)
        official = f"{city}{brand}{industry}有限公司"
        identity = {
            "credit_code": code(division, f"{rng.randrange(10**8):08d}"),
            "phone": f"{area}-{rng.randrange(2 * 10**7, 9 * 10**7)}",
            "address": f"{city}市{district}{rng.choice(['人民路', '建设路', '科技园路'])}{rng.randrange(1, 300)}号",
        }
        rows.append({"name": official, **identity})
        for _ in range(rng.choice([0, 1, 1, 2])):
            style = rng.random()
            if style < 0.25:
                name = f"{brand}{industry}（{city}）有限公司"
            elif style < 0.45:
                typo = rng.randrange(2)
                name = f"{city}{brand[:typo]}{MISTYPED.get(brand[typo], '')}{brand[typo + 1 :]}{industry}有限公司"
            elif style < 0.55:
                name = f"{city}{brand}{industry[:-1]}有限公司"
            elif style < 0.7:
                spoken = "".join(lazy_pinyin(brand)).capitalize()
                name = f"{''.join(lazy_pinyin(city)).capitalize()} {spoken} Co., Ltd."
            else:
                name = f"{city}市{brand}{industry}有限公司"
            kept = {k: v for k, v in identity.items() if rng.random() < 0.5} or {"phone": identity["phone"]}
            rows.append({"name": name, **kept})
    return pd.DataFrame([linkage_row(**row) for row in rows], index=range(1, len(rows) + 1))


def linked(*records: dict[str, Any]) -> LinkageResult:
    """Link the records (ids 9001…) among the background customers."""
    extra = pd.DataFrame([linkage_row(**r) for r in records], index=range(9001, 9001 + len(records)))
    return link(pd.concat([background(), extra]), CUSTOMER_SPEC)


def together(result: LinkageResult, *ids: int) -> bool:
    """True when the records share one golden record."""
    return any(set(ids) <= set(cluster) for cluster in result.clusters)


def apart(result: LinkageResult, left: int, right: int) -> bool:
    """True when two records are in no merge cluster together."""
    return not together(result, left, right)


# --------------------------------------------------------------------------- names that must match

SHARED = {"phone": "0755-86001234", "address": "深圳市南山区科技园路12号"}


@pytest.mark.parametrize(
    ("kind", "left", "right"),
    [
        ("homophone", "深圳华鑫科技有限公司", "深圳华新科技有限公司"),
        ("near-homophone", "深圳骅鑫科技有限公司", "深圳华鑫科技有限公司"),
        ("look-alike 天/夭", "深圳天成能源有限公司", "深圳夭成能源有限公司"),
        ("look-alike 己/已", "深圳己达电子有限公司", "深圳已达电子有限公司"),
        ("look-alike 未/末", "深圳未来软件有限公司", "深圳末来软件有限公司"),
        ("dropped character", "深圳腾达网络科技有限公司", "深圳腾网络科技有限公司"),
        ("swapped characters", "深圳腾达科技有限公司", "深圳达腾科技有限公司"),
        ("industry synonym 商贸/贸易", "深圳腾达商贸有限公司", "深圳腾达贸易有限公司"),
        ("industry synonym 科技/技术", "深圳腾达科技有限公司", "深圳腾达技术有限公司"),
        ("traditional mixed in", "深圳騰達科技有限公司", "深圳腾达科技有限公司"),
        ("short trade name", "腾达", "深圳腾达科技有限公司"),
        ("region before / in brackets", "深圳腾达科技有限公司", "腾达科技（深圳）有限公司"),
        ("region absent", "腾达科技有限公司", "深圳市腾达科技有限公司"),
        ("pinyin English name", "Shenzhen Tengda Technology Co., Ltd.", "深圳腾达科技有限公司"),
    ],
)  # fmt: skip
def test_name_variants_of_one_company_match(kind: str, left: str, right: str) -> None:
    result = linked({"name": left, **SHARED}, {"name": right, **SHARED})
    assert together(result, 9001, 9002), kind


def test_one_distinctive_character_is_another_company_even_in_one_district() -> None:
    assert variant_similarity("卓泰微电子", "卓泰众电子") < CUSTOMER_SPEC.comparisons[0].levels[-1]
    result = linked(
        {"name": "深圳卓泰微电子有限公司", "address": "深圳市南山区科技园路12号"},
        {"name": "深圳卓泰众电子有限公司", "address": "深圳市南山区科技园路88号"},
    )
    assert apart(result, 9001, 9002)


# --------------------------------------------------------------------------- identifiers that must match


@pytest.mark.parametrize(
    ("kind", "written"),
    [
        ("one character dropped", SHENZHEN_CODE[:10] + SHENZHEN_CODE[11:]),
        ("one character doubled", SHENZHEN_CODE[:10] + SHENZHEN_CODE[10] + SHENZHEN_CODE[10:]),
        ("two characters swapped", SHENZHEN_CODE[:10] + SHENZHEN_CODE[11] + SHENZHEN_CODE[10] + SHENZHEN_CODE[12:]),
        ("15-digit registration number", SHENZHEN_CODE[2:17]),
        ("9-character organisation code", SHENZHEN_CODE[8:17]),
        ("cut to 10 characters", SHENZHEN_CODE[:10]),
    ],
)  # fmt: skip
def test_credit_code_near_matches(kind: str, written: str) -> None:
    assert credit_codes_near(SHENZHEN_CODE, written), kind
    result = linked(
        {"name": "深圳腾达科技有限公司", "credit_code": SHENZHEN_CODE},
        {"name": "腾达科技（深圳）有限公司", "credit_code": written},
    )
    assert together(result, 9001, 9002), kind


def test_two_valid_credit_codes_differing_in_one_character_are_not_near() -> None:
    other = code("440305", "70846114")
    assert not credit_codes_near(SHENZHEN_CODE, other)
    assert credit_code_parts(other).valid == other


@pytest.mark.parametrize(
    ("kind", "left", "right", "city"),
    [
        ("with and without area code", "35967116", "021-35967116", "上海"),
        ("extension 转", "0755-86001234转6206", "0755-86001234", None),
        ("extension -", "0755-86001234-8001", "(0755)86001234", None),
        ("multi-number cell", "13812345678、0755-86001234；021-35967116", "0755-86001234", None),
        ("multi-number cell /", "13912345678/0755-86001234", "+86 755 8600 1234", None),
        ("+86 prefix", "+86 138 1234 5678", "13812345678", None),
        ("0086 prefix", "0086-13812345678", "138 1234 5678", None),
        ("86- prefix", "86-755-86001234", "0755 86001234", None),
    ],
)  # fmt: skip
def test_phones_written_differently_are_one_number(
    kind: str, left: str, right: str, city: str | None
) -> None:
    assert set(phone_keys(left, "21" if city else None)) & set(phone_keys(right)), kind
    result = linked(
        {"name": "深圳腾达科技有限公司" if not city else "上海腾达科技有限公司", "phone": left, "city": city},
        {"name": "腾达科技（深圳）有限公司" if not city else "腾达科技（上海）有限公司", "phone": right},
    )
    assert together(result, 9001, 9002), kind


def test_the_same_street_address_is_evidence() -> None:
    # Names one edit apart (a dropped character) and nothing else in common but the street address.
    result = linked(
        {"name": "深圳腾达网络科技有限公司", "address": "广东省深圳市南山区科技园路12号"},
        {"name": "深圳腾网络科技有限公司", "address": "深圳南山区科技园路 12 号"},
    )
    assert together(result, 9001, 9002)


# --------------------------------------------------------------------------- false merges


@pytest.mark.parametrize(
    ("kind", "elsewhere"),
    [
        ("city only in the address", {"name": "腾达科技有限公司", "address": "河南省郑州市金水区花园路8号"}),
        ("English CRM city field", {"name": "腾达科技有限公司", "city": "Zhengzhou"}),
        ("phone area code", {"name": "腾达科技有限公司", "phone": "0371-66001234"}),
        ("credit-code division digits", {"name": "腾达科技有限公司", "credit_code": ZHENGZHOU_CODE}),
        ("English pinyin name of another city", {"name": "Zhengzhou Tengda Technology Co., Ltd."}),
    ],
)  # fmt: skip
def test_the_same_trade_name_in_another_city_is_another_company(kind: str, elsewhere: dict[str, Any]) -> None:
    shenzhen = {"name": "腾达科技有限公司", "address": "深圳市南山区科技园路12号", "phone": "0755-86001234",
                "email": "sales@tengda.cn"}  # fmt: skip
    result = linked(shenzhen, {**elsewhere, "email": "sales@tengda.cn"})
    assert apart(result, 9001, 9002), kind
    assert result.band.get((9002, 9001), result.band.get((9001, 9002), "distinct")) == "distinct", kind


def test_a_branch_is_never_merged_into_its_parent() -> None:
    result = linked(
        {"name": "深圳腾达科技有限公司", **SHARED},
        {"name": "深圳腾达科技有限公司南山分公司", **SHARED},
    )
    assert apart(result, 9001, 9002)


def test_one_bridging_record_does_not_join_two_companies() -> None:
    # Two companies of two records each; one ambiguous record links to one record of each.
    merged = pd.Series({(1, 2): 0.99, (3, 4): 0.99, (5, 1): 0.97, (5, 3): 0.97}, dtype=float)
    frame = pd.DataFrame({"credit_code": [None] * 5, "branch": ["总部"] * 5, "city": [None] * 5,
                          "province": [None] * 5}, index=[1, 2, 3, 4, 5])  # fmt: skip
    clusters, refused = coherent_clusters(merged, merged, frame, CUSTOMER_SPEC)
    assert not any({1, 3} <= set(c) for c in clusters)
    assert next(set(c) for c in clusters if 5 in c) in ({1, 2, 5}, {3, 4, 5})
    assert any("bridge" in reason for reason in refused.values())


def test_a_cluster_never_holds_two_valid_credit_codes_or_two_cities() -> None:
    merged = pd.Series({(1, 2): 0.99, (2, 3): 0.98}, dtype=float)
    frame = pd.DataFrame({"credit_code": [SHENZHEN_CODE, None, code("440305", "12345678")],
                          "branch": ["总部"] * 3, "city": ["深圳市"] * 3, "province": ["广东省"] * 3},
                         index=[1, 2, 3])  # fmt: skip
    clusters, refused = coherent_clusters(merged, merged, frame, CUSTOMER_SPEC)
    assert clusters == [[1, 2]] and "two credit codes" in refused[(2, 3)]


def test_a_branch_gets_its_head_office_as_parent(sqlite_core_url: str) -> None:
    import sqlalchemy as sa

    from crm_core.db import make_engine, session_factory, upgrade
    from crm_core.models import Customer
    from crm_core.runs import rollback_run
    from integration.dedup.workflow import deduplicate_customers

    engine = make_engine(sqlite_core_url)
    upgrade(engine)
    with session_factory(engine)() as session, session.begin():
        session.add_all([Customer(id=1, name="深圳腾达科技有限公司", phone="+8675586001234"),
                         Customer(id=2, name="深圳腾达科技有限公司南山分公司", phone="+8675586001234"),
                         Customer(id=3, name="深圳腾达科技有限公司北京分公司")])  # fmt: skip
    outcome = deduplicate_customers(engine, "dedup-1", "t", finish=True)
    with engine.connect() as connection:
        rows = connection.execute(sa.select(Customer.id, Customer.parent_id, Customer.merged_into_id)).all()
    assert sorted(rows) == [(1, None, None), (2, 1, None), (3, 1, None)] and outcome.branches_linked == 2
    rollback_run(engine, "dedup-1")
    with engine.connect() as connection:
        assert connection.scalar(sa.select(sa.func.count()).where(Customer.parent_id.is_not(None))) == 0
    engine.dispose()
