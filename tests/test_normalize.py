"""Company-name normalization: the same firm written differently matches; different firms never do."""

from __future__ import annotations

import pytest

from integration.dedup.normalize import brand_key, company_key, normalize_company_name, person_key

SAME_FIRM = [
    ["深圳市腾达科技有限公司", "腾达科技（深圳）有限公司", "腾达科技(深圳)有限公司", " 深圳腾达科技有限公司 ",
     "深圳市腾达科技有限责任公司", "广东省深圳市腾达科技股份有限公司", "深圳市腾达科技有限公司\u200b", "ＳＨＥＮＺＨＥＮ"[0:0] + "深圳市腾达科技有限公司"],
    ["Acme Trading Co., Ltd.", "ACME TRADING CO.,LTD", "Acme Trading Limited", "acme trading"],
    ["北京华创环保工程有限公司", "北京市华创环保工程有限公司", "华创环保工程（北京）有限公司"],
    ["深圳市騰達科技有限公司", "深圳市腾达科技有限公司"],
]  # fmt: skip
DIFFERENT_FIRMS = [
    ("深圳市腾达科技有限公司", "北京腾达科技有限公司"),  # same trade name, another city
    ("深圳市腾达科技有限公司", "深圳市腾达科技有限公司北京分公司"),  # a branch is not its parent
    ("深圳市腾达科技有限公司", "深圳市腾讯科技有限公司"),  # one character apart
    ("深圳市腾达科技有限公司", "腾达科技有限公司"),  # no region: not provably the same
    ("深圳市腾达科技有限公司北京分公司", "深圳市腾达科技有限公司上海分公司"),
]


@pytest.mark.parametrize("variants", SAME_FIRM, ids=[v[0] for v in SAME_FIRM])
def test_variants_of_one_firm_share_a_key(variants: list[str]) -> None:
    assert len({company_key(v) for v in variants}) == 1


@pytest.mark.parametrize(("a", "b"), DIFFERENT_FIRMS)
def test_different_firms_have_different_keys(a: str, b: str) -> None:
    assert company_key(a) != company_key(b)


def test_parts_are_exposed() -> None:
    name = normalize_company_name("深圳市腾达科技有限公司北京分公司")
    assert (name.region, name.core, name.branch) == ("深圳", "腾达科技", "北京分公司")


@pytest.mark.parametrize("odd", ["", "   ", "\u200b", "😀😀", "有限公司", "（）", "a", "深圳", "Co., Ltd."])
def test_odd_input_never_crashes(odd: str) -> None:
    key = company_key(odd)
    assert key is None or isinstance(key, str)
    assert company_key(None) is None


def test_person_key_ignores_spaces_width_and_case() -> None:
    assert person_key("王 芳") == person_key("王芳") == person_key("王　芳")
    assert person_key("Zhang Wei") == person_key("zhangwei")
    assert person_key("张伟") != person_key("张玮")


@pytest.mark.parametrize(
    ("name", "brand"),
    [
        ("深圳市腾达科技有限公司", "tengda"),
        ("Shenzhen Tengda Technology Co., Ltd.", "tengda"),
        ("SHENZHEN TENGDA TECH CO LTD", "tengda"),
        ("Tengda Keji", "tengda"),  # the Chinese industry word written in pinyin
        ("深圳市腾讯科技有限公司", "tengxun"),
        ("Beijing Huachuang Environmental Engineering Co., Ltd.", "huachuang"),
        ("北京华创环保工程有限公司", "huachuang"),
        ("重庆长安汽车股份有限公司", "changanqiche"),  # 重 and 长 read chong/chang here
        ("ABC Trading GmbH", "abc"),
        ("Tech", "tech"),  # nothing but an industry word: kept rather than emptied
    ],
)
def test_brand_key_gives_the_trade_name_in_pinyin_for_both_scripts(name: str, brand: str) -> None:
    assert brand_key(normalize_company_name(name).core) == brand
