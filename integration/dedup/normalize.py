"""Normalization for matching: company names (Chinese and Latin), credit codes, phones, e-mails.

A company name is reduced to what identifies the firm: region (深圳), trade name and industry (腾达科技),
and a branch marker (北京分公司) kept apart so a branch never matches its parent. Legal forms
(有限公司, 股份有限公司, Co., Ltd., GmbH…) and bracket styles do not matter.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

from opencc import OpenCC

PROVINCES = [
    "北京",
    "天津",
    "上海",
    "重庆",
    "河北",
    "山西",
    "辽宁",
    "吉林",
    "黑龙江",
    "江苏",
    "浙江",
    "安徽",
    "福建",
    "江西",
    "山东",
    "河南",
    "湖北",
    "湖南",
    "广东",
    "海南",
    "四川",
    "贵州",
    "云南",
    "陕西",
    "甘肃",
    "青海",
    "台湾",
    "内蒙古",
    "广西",
    "西藏",
    "宁夏",
    "新疆",
    "香港",
    "澳门",
]
CITIES = [
    "深圳",
    "广州",
    "东莞",
    "佛山",
    "珠海",
    "中山",
    "惠州",
    "汕头",
    "杭州",
    "宁波",
    "温州",
    "绍兴",
    "嘉兴",
    "金华",
    "台州",
    "苏州",
    "南京",
    "无锡",
    "常州",
    "南通",
    "徐州",
    "扬州",
    "成都",
    "绵阳",
    "武汉",
    "宜昌",
    "长沙",
    "株洲",
    "西安",
    "郑州",
    "洛阳",
    "济南",
    "青岛",
    "烟台",
    "潍坊",
    "合肥",
    "芜湖",
    "福州",
    "厦门",
    "泉州",
    "南昌",
    "沈阳",
    "大连",
    "长春",
    "哈尔滨",
    "石家庄",
    "唐山",
    "太原",
    "昆明",
    "贵阳",
    "南宁",
    "海口",
    "兰州",
    "银川",
    "西宁",
    "乌鲁木齐",
    "拉萨",
    "呼和浩特",
]
COUNTRIES = ("中国", "china", "香港", "hong kong", "亚太", "asia pacific")
_REGION_SUFFIX = r"(?:省|市|自治区|特别行政区)?"
_REGIONS = sorted({*PROVINCES, *CITIES}, key=len, reverse=True)
_REGION_PREFIX = re.compile(rf"^({'|'.join(_REGIONS)}){_REGION_SUFFIX}")
_BRACKETS = re.compile(r"[(\[【]([^)\]】]*)[)\]】]")
_BRANCH_WORDS = r"(?:分公司|分店|办事处|分厂|分部|营业部|branch office|branch)"
_BRANCH_AFTER_LEGAL = re.compile(
    rf"^(?P<head>.+?(?:股份有限公司|有限责任公司|有限公司|公司|集团|co\.,?ltd\.?|ltd\.?|inc\.?))(?P<branch>.{{1,10}}?{_BRANCH_WORDS})$"
)
_BRANCH_AFTER_REGION = re.compile(
    rf"^(?P<head>.{{2,}}?)(?P<branch>(?:{'|'.join(sorted({*PROVINCES, *CITIES}, key=len, reverse=True))}).{{0,4}}?{_BRANCH_WORDS})$"
)
# Matched after whitespace is removed, so the forms are written without spaces ("co ltd" -> "coltd").
_LEGAL_FORMS = sorted(
    {form.replace(" ", "") for form in [
        "股份有限公司", "有限责任公司", "集团有限公司", "集团股份有限公司", "有限公司", "集团", "公司", "厂", "商行",
        "co.,ltd.", "co.,ltd", "co. ltd.", "co ltd", "company limited", "co.", "ltd.", "ltd", "limited", "inc.", "inc",
        "corporation", "corp.", "corp", "gmbh", "llc", "plc", "s.a.", "ag", "pte. ltd.", "pte ltd",
    ]},
    key=len,
    reverse=True,
)  # fmt: skip
_TO_SIMPLIFIED = OpenCC("t2s")  # OpenCC's dictionaries: traditional → simplified, phrase-aware
# Zero-width and format characters, whitespace, and emoji / pictographs with their variation selectors.
_INVISIBLE = re.compile(
    "[\u200b\u200c\u200d\u2060\ufeff\u00ad\\s\ufe0e\ufe0f\u2600-\u27bf\U0001f000-\U0001faff]"
)
_PUNCT = re.compile(r"[·・•,，.。'\"“”‘’&＆\-_/]")


_FIRST_WORD = re.compile(r"[a-z]+\b")


@lru_cache(maxsize=1)
def _pinyin_regions() -> dict[str, str]:
    """Return region names in toneless pinyin (shenzhen, guangdong…) → the region in Chinese."""
    from pypinyin import lazy_pinyin  # loads its dictionary: only when a Latin name needs it

    return {"".join(lazy_pinyin(region)): region for region in sorted({*PROVINCES, *CITIES})}


@dataclass(frozen=True)
class CompanyName:
    """The parts of a normalized company name."""

    core: str  # trade name + industry, e.g. 腾达科技
    region: str | None  # 深圳, or None when the name carries no region
    branch: str | None  # e.g. 北京分公司

    @property
    def key(self) -> str:
        """Return the exact-match key: region, core and branch; two names match when keys are equal."""
        return "|".join([self.region or "", self.core, self.branch or ""])


def _strip_legal(text: str) -> str:
    changed = True
    while changed:
        changed = False
        for form in _LEGAL_FORMS:
            if text.endswith(form) and len(text) > len(form) + 1:
                text = text[: -len(form)].rstrip(" ,.")
                changed = True
                break
    return text


def _region(text: str) -> str | None:
    match = _REGION_PREFIX.match(text)
    return match.group(1) if match else None


@lru_cache(maxsize=200_000)
def normalize_company_name(name: str) -> CompanyName:
    """Split a company name into region, core and branch (see module doc); robust to any Unicode input."""
    text = _TO_SIMPLIFIED.convert(unicodedata.normalize("NFKC", name)).casefold()
    text = _INVISIBLE.sub("", text)
    branch = None
    region: str | None = None
    # Bracketed parts: a region or country is an attribute, anything else is just noise in brackets.
    for inner in _BRACKETS.findall(text):
        found = _region(inner)
        if found and region is None:
            region = found
    text = _BRACKETS.sub("", text)
    branch_match = _BRANCH_AFTER_LEGAL.match(text) or _BRANCH_AFTER_REGION.match(text)
    if branch_match:
        branch, text = branch_match.group("branch"), branch_match.group("head")
    text = _strip_legal(text)
    for _ in range(2):  # 广东省深圳市… : province, then city
        found = _region(text)
        if not found:
            break
        rest = _REGION_PREFIX.sub("", text, count=1)
        if len(rest) < 2:
            break
        region, text = found if found in CITIES or region is None else region, rest
    if region is None:  # "Shenzhen Tengda Technology": a region written in pinyin, as the first word
        first = _FIRST_WORD.match(unicodedata.normalize("NFKC", name).casefold().lstrip())
        found = _pinyin_regions().get(first.group()) if first else None
        if found and first and text.startswith(first.group()) and len(text) > len(first.group()) + 1:
            region, text = found, text[len(first.group()) :]
    text = _PUNCT.sub("", _strip_legal(text))
    if not text:  # only legal words or punctuation: keep what was there rather than nothing
        text = _PUNCT.sub("", unicodedata.normalize("NFKC", name).casefold().strip())
    return CompanyName(core=text, region=region, branch=branch)


def company_key(name: str | None) -> str | None:
    """Return the exact-match key of a company name, or None for an empty name."""
    if name is None or not str(name).strip():
        return None
    normalized = normalize_company_name(str(name))
    return normalized.key if normalized.core else None


def person_key(name: str | None) -> str | None:
    """Return the match key of a person's name: NFKC, case-folded, without spaces and dots."""
    if name is None:
        return None
    text = _PUNCT.sub("", _INVISIBLE.sub("", unicodedata.normalize("NFKC", str(name)).casefold()))
    return text or None


_HAN = re.compile(r"[\u3400-\u9fff]")
# Words that say what a firm does, not which firm it is: dropped from the end of a brand key. English
# ones, and Chinese ones (matched in pinyin, after conversion, so "Tengda Keji" loses them too).
_INDUSTRY_EN = ("technology", "technologies", "tech", "scitech", "science", "trading", "trade", "industrial",
                "industry", "industries", "electronics", "electronic", "information", "network", "networks",
                "software", "engineering", "environmental", "medical", "pharmaceutical", "biotech",
                "machinery", "equipment", "manufacturing", "logistics", "investment", "consulting",
                "commerce", "commercial", "culture", "media", "construction", "development", "international",
                "holdings", "holding", "group", "enterprise", "enterprises", "systems", "system")  # fmt: skip
_INDUSTRY_ZH = ("科技", "技术", "贸易", "商贸", "实业", "电子", "信息", "网络", "软件", "工程", "环保",
                "医药", "医疗", "生物", "机械", "设备", "制造", "物流", "投资", "咨询", "文化", "传媒",
                "建设", "发展", "国际", "控股", "集团", "企业", "系统")  # fmt: skip


@lru_cache(maxsize=1)
def _industry_words() -> tuple[str, ...]:
    """Return the industry words in English and in pinyin, longest first (pypinyin loads lazily)."""
    from pypinyin import lazy_pinyin

    industry = {"".join(lazy_pinyin(w)) for w in _INDUSTRY_ZH} | set(_INDUSTRY_EN)
    return tuple(sorted(industry, key=len, reverse=True))


def has_han(text: str | None) -> bool:
    """Return True when the text contains Chinese characters."""
    return bool(text) and _HAN.search(str(text)) is not None


@lru_cache(maxsize=200_000)
def brand_key(core: str) -> str:
    """Return a name core's trade name in pinyin, so scripts compare: 腾达科技 and "Shenzhen Tengda Technology"
    (core ``tengdatechnology``) both give ``tengda``.

    Chinese characters become toneless pinyin, then trailing industry words are dropped as long as two
    letters remain (regions are already split off by :func:`normalize_company_name`).
    """
    from pypinyin import lazy_pinyin

    text = "".join(lazy_pinyin(core)) if has_han(core) else core
    text = re.sub(r"[^0-9a-z]", "", unicodedata.normalize("NFKC", text).casefold())
    industry = _industry_words()
    changed = True
    while changed:
        changed = False
        for word in industry:
            if text.endswith(word) and len(text) - len(word) >= 2:
                text, changed = text[: -len(word)], True
                break
    return text
