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


YONGXING = "宁波甬兴模具有限公司"


@pytest.mark.parametrize(
    ("name", "head_office", "branch"),
    [
        ("宁波甬兴模具有限公司（北仑分公司）", YONGXING, "北仑分公司"),  # full-width brackets
        ("宁波甬兴模具有限公司(北仑分公司)", YONGXING, "北仑分公司"),  # ASCII brackets
        ("宁波甬兴模具有限公司【北仑分公司】", YONGXING, "北仑分公司"),
        ("宁波甬兴模具有限公司 ( 北仑分厂 )", YONGXING, "北仑分厂"),
        ("宁波甬兴模具有限公司（北仑营业部）", YONGXING, "北仑营业部"),
        ("宁波甬兴模具有限公司（杭州办事处）", YONGXING, "杭州办事处"),
        ("宁波甬兴模具有限公司北仑分公司", YONGXING, "北仑分公司"),  # unbracketed, as before
        (
            "深圳市腾达科技有限公司（北京）分公司",
            "深圳市腾达科技有限公司",
            "北京分公司",
        ),  # region, then the word
        # a bank's branches: 分行, 支行 (and 分理处), written after the legal form or in brackets
        ("中国工商银行股份有限公司深圳分行", "中国工商银行股份有限公司", "深圳分行"),
        ("中国银行股份有限公司北京西城支行", "中国银行股份有限公司", "北京西城支行"),
        ("中国银行（北京西城支行）", "中国银行股份有限公司", "北京西城支行"),
        ("Acme Trading Co., Ltd. (Shanghai Branch)", "Acme Trading Co., Ltd.", "shanghaibranch"),
        ("Acme Trading Co., Ltd. Shanghai Branch Office", "Acme Trading Co., Ltd.", "shanghaibranchoffice"),
    ],
)
def test_a_branch_word_in_brackets_is_the_branch(name: str, head_office: str, branch: str) -> None:
    parts, head = normalize_company_name(name), normalize_company_name(head_office)
    assert parts.branch == branch and head.branch is None
    assert (parts.region, parts.core) == (head.region, head.core)  # the head office's name, plus a branch
    assert company_key(name) != company_key(head_office)


def test_a_branch_is_one_key_with_or_without_brackets() -> None:
    keys = {company_key(f"宁波甬兴模具有限公司{b}") for b in ("北仑分公司", "（北仑分公司）", "(北仑分公司)")}
    assert len(keys) == 1


@pytest.mark.parametrize(
    ("name", "region"),
    [
        ("华鑫科技（北京）有限公司", "北京"),
        ("华鑫科技(北京)有限公司", "北京"),
        ("腾达科技有限公司（北京分公司）", None),
    ],
)
def test_a_region_in_brackets_stays_a_region_and_a_branch_is_not_one(name: str, region: str | None) -> None:
    parts = normalize_company_name(name)
    assert parts.region == region
    assert parts.branch == (None if region else "北京分公司")
