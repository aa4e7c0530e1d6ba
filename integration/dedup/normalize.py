"""Normalization for matching: company names (Chinese and Latin), credit codes, phones, e-mails.

A company name is reduced to what identifies the firm: region (深圳), trade name and industry (腾达科技),
and a branch marker (北京分公司, also written in brackets: 有限公司（北仑分公司）) kept apart so a branch never
matches its parent. Legal forms (有限公司, 股份有限公司, Co., Ltd., GmbH…) and bracket styles do not matter.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from opencc import OpenCC

from integration.geo import PHONE_CELL_SPLIT

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
# Matched after whitespace is removed: "Branch Office" is "branchoffice" by then.
_BRANCH_WORDS = r"(?:分公司|分店|办事处|分厂|分部|营业部|分行|支行|分理处|branchoffice|branch)"
# 有限公司（北仑分公司）: a bracketed part that ends in a branch word is the branch, not noise or a region.
_BRANCH_IN_BRACKETS = re.compile(rf"^.{{0,20}}?{_BRANCH_WORDS}$")
# 有限公司（北京）分公司: the brackets round the branch's place are dropped, so the branch reads 北京分公司.
_BRACKETED_BEFORE_BRANCH = re.compile(rf"[(\[【]([^)\]】]*)[)\]】](?={_BRANCH_WORDS}$)")
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
_LEGAL_ENDINGS = tuple(_LEGAL_FORMS)
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
    while text.endswith(_LEGAL_ENDINGS):  # one call in C for the usual last pass, where no form ends it
        for form in _LEGAL_FORMS:
            if text.endswith(form) and len(text) > len(form) + 1:
                text = text[: -len(form)].rstrip(" ,.")
                break
        else:
            break
    return text


def _region(text: str) -> str | None:
    match = _REGION_PREFIX.match(text)
    return match.group(1) if match else None


# Sized for the customer names of a 1M-row engagement (~370 bytes each): linkage, the second look and the
# reference resolver read the same names within one run.
@lru_cache(maxsize=600_000)
def normalize_company_name(name: str) -> CompanyName:
    """Split a company name into region, core and branch (see module doc); robust to any Unicode input."""
    text = _TO_SIMPLIFIED.convert(unicodedata.normalize("NFKC", name)).casefold()
    text = _INVISIBLE.sub("", text)
    branch = None
    region: str | None = None
    bracketed_branch: str | None = None
    text = _BRACKETED_BEFORE_BRANCH.sub(r"\1", text)
    # Bracketed parts: a branch is the branch, a region or country an attribute, anything else noise.
    for inner in _BRACKETS.findall(text):
        if _BRANCH_IN_BRACKETS.match(inner):
            bracketed_branch = inner
            continue
        found = _region(inner)
        if found and region is None:
            region = found
    text = _BRACKETS.sub("", text)
    branch_match = _BRANCH_AFTER_LEGAL.match(text) or _BRANCH_AFTER_REGION.match(text)
    if branch_match:
        branch, text = branch_match.group("branch"), branch_match.group("head")
    if bracketed_branch:
        branch = (branch or "") + bracketed_branch
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
                "holdings", "holding", "group", "enterprise", "enterprises", "systems", "system", "materials",
                "material", "new", "foods", "food", "supplychain", "supply", "chain", "management", "automation",
                "optoelectronics", "optoelectronic", "chemicals", "chemical", "devices", "device",
                "biotechnology", "services", "service", "energy", "electric", "education", "agriculture",
                "textile", "textiles", "printing", "auto", "parts", "instruments", "communication",
                "communications", "data", "intelligent", "smart", "environment", "science")  # fmt: skip
_INDUSTRY_ZH = ("科技", "技术", "贸易", "商贸", "实业", "电子", "信息", "网络", "软件", "工程", "环保",
                "医药", "医疗", "生物", "机械", "设备", "制造", "物流", "投资", "咨询", "文化", "传媒",
                "建设", "发展", "国际", "控股", "集团", "企业", "系统", "材料", "新材料", "食品", "供应链",
                "管理", "自动化", "光电", "化工", "器械", "能源", "电气", "服务", "环境", "教育", "智能")  # fmt: skip


@lru_cache(maxsize=1)
def _industry_words() -> tuple[str, ...]:
    """Return the industry words in English and in pinyin, longest first (pypinyin loads lazily)."""
    from pypinyin import lazy_pinyin

    industry = {"".join(lazy_pinyin(w)) for w in _INDUSTRY_ZH} | set(_INDUSTRY_EN)
    return tuple(sorted(industry, key=len, reverse=True))


def has_han(text: str | None) -> bool:
    """Return True when the text contains Chinese characters."""
    return bool(text) and _HAN.search(str(text)) is not None


@lru_cache(maxsize=1)
def _pinyin_tables() -> tuple[dict[str, str], frozenset[str], frozenset[str], int]:
    """Return what ``lazy_pinyin`` reads without its phrases: each Han character's first reading (toneless),
    the characters some phrase reads otherwise, those phrases, and the longest one's length.

    ``lazy_pinyin`` splits a text into Han and other runs, segments a Han run into words and reads a word
    from pypinyin's phrase dictionary when it is there, else each character by its first reading in the
    single-character dictionary. A word is a piece of the text, so a text holding none of the phrases
    that read a character otherwise (长 in 长城, 信 in 信用) reads character by character.
    """
    from pypinyin import Style
    from pypinyin.constants import PHRASES_DICT, PINYIN_DICT, RE_HANS
    from pypinyin.converter import UltimateConverter

    converter = UltimateConverter()  # as lazy_pinyin converts (no v_to_u, no neutral tone 5, no sandhi)
    toneless: dict[str, str] = {}  # the NORMAL style depends on the reading only, not on its character

    def read(char: str, reading: str) -> str:
        found = toneless.get(reading)
        if found is None:
            found = toneless[reading] = converter.convert_style(char, reading, Style.NORMAL, strict=True)
        return found

    toned = {chr(n): readings.split(",")[0] for n, readings in PINYIN_DICT.items() if RE_HANS.match(chr(n))}
    first = {char: read(char, reading) for char, reading in toned.items()}
    odd_chars: set[str] = set()
    odd_phrases: set[str] = set()
    for phrase, readings in PHRASES_DICT.items():
        if len(readings) != len(phrase):
            odd_chars.update(phrase)
            odd_phrases.add(phrase)
            continue
        for char, char_readings in zip(phrase, readings, strict=True):
            reading = char_readings[0]
            if reading != toned.get(char) and read(char, reading) != first.get(char):  # not a tone only
                odd_chars.add(char)
                odd_phrases.add(phrase)
    longest = max(map(len, odd_phrases), default=0)
    return first, frozenset(odd_chars), frozenset(odd_phrases), longest


@lru_cache(maxsize=50_000)
def _lazy_pinyin(text: str) -> tuple[str, ...]:
    from pypinyin import lazy_pinyin

    return tuple(lazy_pinyin(text))


def toneless_pinyin(text: str) -> list[str]:
    """Return ``pypinyin.lazy_pinyin(text)`` (toneless, one reading per character, other runs as written).

    Read character by character unless the text holds a phrase that reads a character otherwise
    (:func:`_pinyin_tables`) or a Han character without a reading: then by ``lazy_pinyin`` itself
    (cached). The result is the same either way; per character is some thirty times faster.
    """
    first, odd_chars, odd_phrases, longest = _pinyin_tables()
    out: list[str] = []
    start = 0  # where the current run of other characters began
    odd = False
    for position, char in enumerate(text):
        reading = first.get(char)
        if reading is None:
            if char >= "\u3007":  # pypinyin's Han characters start at 〇
                from pypinyin.constants import RE_HANS

                if RE_HANS.match(char):  # a Han character without a reading: lazy_pinyin says what it does
                    return list(_lazy_pinyin(text))
            continue
        odd = odd or char in odd_chars
        if start < position:
            out.append(text[start:position])
        out.append(reading)
        start = position + 1
    if start < len(text):
        out.append(text[start:])
    if odd and any(
        text[i:j] in odd_phrases
        for i in range(len(text))
        for j in range(i + 1, min(len(text), i + longest) + 1)
    ):
        return list(_lazy_pinyin(text))
    return out


@lru_cache(maxsize=200_000)
def brand_key(core: str) -> str:
    """Return a name core's trade name in pinyin, so scripts compare: 腾达科技 and "Shenzhen Tengda Technology"
    (core ``tengdatechnology``) both give ``tengda``.

    Chinese characters become toneless pinyin, then trailing industry words are dropped as long as two
    letters remain (regions are already split off by :func:`normalize_company_name`).
    """
    text = "".join(toneless_pinyin(core)) if has_han(core) else core
    text = re.sub(r"[^0-9a-z]", "", unicodedata.normalize("NFKC", text).casefold())
    return strip_endings(text, _industry_words())


def strip_endings(text: str, words: Iterable[str]) -> str:
    """Drop any of ``words`` from the end of ``text`` as long as one ends it, keeping two characters.

    The longest word that ends the text goes first (two words of one length cannot both end it).
    """
    by_length = _endings_by_length(words if isinstance(words, tuple) else tuple(words))
    changed = True
    while changed:
        changed = False
        for length, endings in by_length:
            if len(text) - length >= 2 and text[-length:] in endings:
                text, changed = text[:-length], True
                break
    return text


@lru_cache(maxsize=16)
def _endings_by_length(words: tuple[str, ...]) -> list[tuple[int, frozenset[str]]]:
    """Return ``words`` grouped by length, longest first (one set look-up per length, not per word)."""
    lengths = sorted({len(w) for w in words if w}, reverse=True)
    return [(length, frozenset(w for w in words if len(w) == length)) for length in lengths]


# --------------------------------------------------------------------------- Chinese-aware name keys

# Industry words that say the same thing: a source writes 商贸 where another writes 贸易.
INDUSTRY_SYNONYMS = {"商贸": "贸易", "经贸": "贸易", "技术": "科技", "科学技术": "科技", "电子科技": "电子",
                     "机电": "机械", "医疗器械": "医疗", "建筑工程": "建设工程", "建筑": "建设", "实业发展": "实业",
                     "产业": "实业", "电器": "电气", "环境工程": "环保工程", "顾问": "咨询", "软件开发": "软件"}  # fmt: skip
_SYNONYM = re.compile("|".join(sorted(INDUSTRY_SYNONYMS, key=len, reverse=True)))
# What a Chinese trade name is followed by: industry words, longest first (a core minus these is the trade name).
_TRADE_SUFFIXES = tuple(sorted(
    {*INDUSTRY_SYNONYMS, *INDUSTRY_SYNONYMS.values(), *_INDUSTRY_ZH, "材料", "新材料", "食品", "光电", "化工",
     "自动化", "供应链", "管理", "器械", "环境", "能源", "电气", "教育", "智能", "农业", "纺织", "印务", "汽配",
     "服务", "餐饮", "建材", "广告", "包装", "印刷", "家具", "服饰", "传媒", "照明", "仪器", "通信", "数据"},
    key=len, reverse=True,
))  # fmt: skip
_SHAPES_FILE = Path(__file__).parent / "data" / "char_shapes.tsv"


@lru_cache(maxsize=600_000)  # the same name cores are asked for again and again (books, variants, similarity)
def canonical_industry(core: str) -> str:
    """Return a name core with industry-word synonyms written one way (商贸 → 贸易, 技术 → 科技)."""
    for _ in range(3):  # 电子技术 → 电子科技 → 电子: until nothing changes
        changed = _SYNONYM.sub(lambda match: INDUSTRY_SYNONYMS[match.group()], core)
        if changed == core:
            break
        core = changed
    return core


@lru_cache(maxsize=200_000)
def trade_name(core: str) -> str:
    """Return the trade name of a Chinese name core: industry words dropped from the end (腾达科技 → 腾达).

    At least two characters stay; a Latin core is returned unchanged (see :func:`brand_key` for pinyin).
    """
    text = canonical_industry(core)
    if not has_han(text):
        return text
    return strip_endings(text, _TRADE_SUFFIXES)


@lru_cache(maxsize=1)
def _shapes() -> dict[str, tuple[str, str]]:
    """Return character → (four-corner code, strokes) from ``data/char_shapes.tsv``.

    The table is derived from the char-similar package's four-corner, stroke and frequency data (MIT,
    github.com/yongzhuo/char-similar; its header names the files): the 6,290 characters it gives a
    frequency. The package itself pins old tqdm and pulls a segmenter, so only the data is kept.
    """
    shapes: dict[str, tuple[str, str]] = {}
    with _SHAPES_FILE.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.startswith("#"):
                char, code, strokes = line.rstrip("\n").split("\t")
                shapes[char] = (code, strokes)
    return shapes


def look_alike(left: str, right: str) -> bool:
    """True when two characters look alike: equal stroke counts and four-corner codes that differ in at most
    one digit (天/夭, 己/已, 未/末, 土/士)."""
    if left == right:
        return True
    shapes = _shapes()
    a, b = shapes.get(left), shapes.get(right)
    if a is None or b is None or a[1] != b[1]:
        return False
    return sum(x != y for x, y in zip(a[0], b[0], strict=True)) <= 1


@lru_cache(maxsize=20_000)
def sound_alike(left: str, right: str) -> bool:
    """True when two characters share a toneless pinyin reading (鑫/新/馨, 华/骅)."""
    if left == right:
        return True
    return has_han(left) and has_han(right) and bool(_readings(left) & _readings(right))


@lru_cache(maxsize=50_000)
def alike_tokens(char: str) -> frozenset[tuple[str, ...]]:
    """Return tokens two characters share exactly when they look or sound alike (:func:`look_alike`,
    :func:`sound_alike`): each toneless reading, and the stroke count with the four-corner code with one
    digit left open (codes that differ in at most one digit share one such token)."""
    tokens: set[tuple[str, ...]] = {("char", char)}
    if has_han(char):
        tokens.update(("reading", reading) for reading in _readings(char))
    shape = _shapes().get(char)
    if shape is not None:
        code, strokes = shape
        tokens.update(("shape", strokes, code[:i] + "*" + code[i + 1 :]) for i in range(len(code)))
    return frozenset(tokens)


@lru_cache(maxsize=50_000)
def _readings(char: str) -> frozenset[str]:
    """Every toneless reading of one character (heteronyms included)."""
    from pypinyin import Style, pinyin

    return frozenset(pinyin(char, style=Style.NORMAL, heteronym=True)[0])


@lru_cache(maxsize=200_000)
def name_sound(core: str) -> str:
    """Return a name core as toneless pinyin syllables, one private-use character per syllable.

    Homophones become equal (华鑫 / 华新 / 骅鑫 → the same two symbols), and edit distances still count
    characters, not letters. Latin text is kept as it is.
    """
    text = canonical_industry(core)
    if not has_han(text):
        return text
    return "".join(_syllable(spoken) if (spoken := char_pinyin(char)) != char else char for char in text)


@lru_cache(maxsize=50_000)
def char_pinyin(char: str) -> str:
    """Return one character's usual toneless pinyin (the character itself when it has none).

    Per character and cached: names are mostly new strings, their characters are a few thousand, and a
    trade name has no phrase a dictionary would read differently."""
    from pypinyin import lazy_pinyin

    return "".join(lazy_pinyin(char)) if has_han(char) else char


_SYLLABLES: dict[str, str] = {}


def _syllable(syllable: str) -> str:
    """A private-use character standing for one pinyin syllable (stable within a process)."""
    found = _SYLLABLES.get(syllable)
    if found is None:
        found = _SYLLABLES[syllable] = chr(0xE000 + len(_SYLLABLES))
    return found


# --------------------------------------------------------------------------- identifiers

_CREDIT_CODE_CHARS = re.compile(r"[^0-9A-Z]")
_USCC_SHAPE = re.compile(r"^[0-9A-HJ-NPQRTUWXY]{2}[0-9]{6}[0-9A-HJ-NPQRTUWXY]{10}$")


@dataclass(frozen=True)
class CreditCode:
    """What a credit-code field holds: the valid 18-character code, else its parts that can still compare."""

    valid: str | None  # a 统一社会信用代码 whose check digit holds
    organisation: (
        str | None
    )  # the 9-character organisation code (18-char code [8:17], 15-digit number [6:15])
    division: str | None  # the 6-digit administrative division code
    raw: str | None  # the compact text as written (for one-edit repairs and truncated prefixes)


def _uscc_is_valid(code: str) -> bool:
    from stdnum.cn import uscc

    return bool(_USCC_SHAPE.match(code)) and bool(uscc.is_valid(code))


@lru_cache(maxsize=200_000)
def credit_code_parts(value: str | None) -> CreditCode:
    """Split a credit-code field: an 18-character 统一社会信用代码, a 15-digit registration (tax) number
    (division + organisation code) or a 9-character organisation code, or a damaged code (kept raw).

    A placeholder is no code (under 8 characters, one character repeated, no digit: 0, N/A, 000000000),
    so two records that both wrote one do not share an identifier. A damaged code's division digits are
    kept only where no character can have shifted them (18 characters, or a code cut short).
    """
    if value is None:
        return CreditCode(None, None, None, None)
    text = _CREDIT_CODE_CHARS.sub("", unicodedata.normalize("NFKC", str(value)).upper())
    if len(text) < 8 or len(set(text)) == 1 or not any(c.isdigit() for c in text):
        return CreditCode(None, None, None, None)
    if len(text) == 18 and _uscc_is_valid(text):
        return CreditCode(text, text[8:17], text[2:8], text)
    if len(text) == 15 and text[:6].isdigit():
        return CreditCode(None, text[6:15], text[:6], text)
    if len(text) == 9:
        return CreditCode(None, text, None, text)
    placed = len(text) <= 18 and len(text) != 17 and text[2:8].isdigit()
    # 18 characters whose check digit fails: where the organisation code inside still holds its own check
    # character (GB 11714), the damage is elsewhere (the check digit, the division) and it still compares
    organisation = text[8:17] if len(text) == 18 and _organisation_code_holds(text[8:17]) else None
    return CreditCode(None, organisation, text[2:8] if placed else None, text)


_ORGANISATION_WEIGHTS = (3, 7, 9, 10, 5, 8, 4, 2)
_ORGANISATION_VALUE = {c: i for i, c in enumerate("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")}


def _organisation_code_holds(code: str) -> bool:
    """True when a 9-character organisation code's check character (GB 11714) fits its 8-character body."""
    body, check = code[:8], code[8]
    if not all(c in _ORGANISATION_VALUE for c in body):
        return False
    remainder = (
        11 - sum(_ORGANISATION_VALUE[c] * w for c, w in zip(body, _ORGANISATION_WEIGHTS, strict=True)) % 11
    )
    return check == {10: "X", 11: "0"}.get(remainder, str(remainder))


def credit_codes_near(left: str | None, right: str | None) -> bool:
    """True when two credit-code fields name one code without being equal: one is the other after one edit
    (a character dropped, doubled, changed or two swapped) and the repaired side's check digit holds, the
    organisation codes agree (15-digit number, 9-character code), or one is the other cut short (≥ 10)."""
    a, b = credit_code_parts(left), credit_code_parts(right)
    if a.raw is None or b.raw is None or a.raw == b.raw:
        return False
    if a.valid and b.valid:
        return False  # two valid codes that differ are two companies
    if a.organisation and b.organisation and a.organisation == b.organisation:
        return True
    short, long_ = sorted((a.raw, b.raw), key=len)
    if len(short) >= 10 and long_.startswith(short) and not (a.valid and b.valid):
        return True
    valid, other = (a, b) if a.valid else (b, a)
    if valid.valid and other.raw:
        from rapidfuzz.distance import OSA

        return bool(OSA.distance(valid.valid, other.raw, score_cutoff=1) <= 1)
    return False


_EXTENSION = re.compile(r"(?:;ext=|转|分机|ext\.?|x|#|-)\s*\d{1,6}$", re.IGNORECASE)
_DIGITS = re.compile(r"[^\d+]")


def phone_keys(value: str | None, area_code: str | None = None) -> tuple[str, ...]:
    """Return every number of a phone cell as E.164 without extension (+8675586001234).

    Splits a cell on 、 ； / , ; drops extensions (转6206, -8001, ;ext=8); reads +86, 0086 and 86- prefixes;
    completes a 7–8 digit local number with ``area_code`` (the record's city, see
    ``geo.area_code_of_city``). A number it cannot read is left out.
    """
    if not value:
        return ()
    text = unicodedata.normalize("NFKC", str(value))
    keys: list[str] = []
    for part in PHONE_CELL_SPLIT.split(text):
        part = part.strip()
        if not part:
            continue
        number = _phone_key(part, area_code)
        if number and number not in keys:
            keys.append(number)
    return tuple(keys)


def _phone_key(part: str, area_code: str | None) -> str | None:
    digits = _DIGITS.sub("", part)
    if len(digits) > 8 and not digits.startswith(("+", "00", "86")) and _EXTENSION.search(part):
        without = _DIGITS.sub("", _EXTENSION.sub("", part))
        if len(without) >= 7:
            digits = without
    elif _EXTENSION.search(part) and (
        ";ext=" in part or "转" in part or "分机" in part or "ext" in part.lower()
    ):
        digits = _DIGITS.sub("", _EXTENSION.sub("", part))
    if digits.startswith("+86"):
        digits = digits[3:]
    elif digits.startswith("0086"):
        digits = digits[4:]
    elif digits.startswith("86") and len(digits) in (12, 13) and not digits.startswith("0"):
        digits = digits[2:]
    digits = digits.lstrip("+")
    if len(digits) == 11 and digits[0] == "1" and digits[1] in "3456789":
        return "+86" + digits
    if digits.startswith("0"):
        digits = digits[1:]
    if len(digits) in (7, 8) and area_code:
        return "+86" + area_code + digits
    if 9 <= len(digits) <= 11 and digits[0] in "23456789":
        return "+86" + digits
    if len(digits) in (9, 10) and digits.startswith("10"):
        return "+86" + digits
    return None


@lru_cache(maxsize=200_000)
def trade_pinyin(core: str) -> str:
    """Return the trade name in toneless pinyin for both scripts: 鑫宏新材料 and "xinhongnewmaterials"
    both give ``xinhong`` (industry words dropped, see :func:`trade_name` and :func:`brand_key`)."""
    if has_han(core):
        return _spoken(trade_name(core))
    return brand_key(core)


@lru_cache(maxsize=200_000)
def _spoken(trade: str) -> str:
    """A trade name in toneless pinyin, read as a phrase (长城 changcheng, not zhangcheng)."""
    return re.sub(r"[^0-9a-z]", "", "".join(toneless_pinyin(trade)).casefold())


# English industry words as Chinese names write them, to compare "Tengda Technology" with 腾达科技 in full.
INDUSTRY_IN_ENGLISH = {
    "technology": "科技", "technologies": "科技", "tech": "科技", "scitech": "科技", "science": "科学",
    "information": "信息", "network": "网络", "networks": "网络", "electronics": "电子", "electronic": "电子",
    "trading": "贸易", "trade": "贸易", "commerce": "商贸", "commercial": "商贸", "software": "软件",
    "logistics": "物流", "machinery": "机械", "equipment": "设备", "medical": "医疗", "devices": "器械",
    "device": "器械", "new": "新", "materials": "材料", "material": "材料", "environmental": "环保",
    "environment": "环境", "engineering": "工程", "biotechnology": "生物科技", "biotech": "生物科技",
    "industrial": "实业", "industry": "实业", "industries": "实业", "construction": "建设", "foods": "食品",
    "food": "食品", "automation": "自动化", "optoelectronics": "光电", "optoelectronic": "光电",
    "chemical": "化工", "chemicals": "化工", "consulting": "咨询", "supply": "供应", "chain": "链",
    "management": "管理", "pharmaceutical": "医药", "pharmaceuticals": "医药", "investment": "投资",
    "culture": "文化", "media": "传媒", "development": "发展", "international": "国际", "holdings": "控股",
    "holding": "控股", "group": "集团", "energy": "能源", "electric": "电气", "education": "教育",
    "intelligent": "智能", "smart": "智能", "services": "服务", "service": "服务", "textile": "纺织",
    "textiles": "纺织", "printing": "印务", "agriculture": "农业", "communication": "通信",
    "communications": "通信", "data": "数据", "systems": "系统", "system": "系统", "enterprise": "企业",
    "manufacturing": "制造", "instruments": "仪器",
}  # fmt: skip
_ENGLISH_WORDS = sorted(INDUSTRY_IN_ENGLISH, key=len, reverse=True)


@lru_cache(maxsize=200_000)
def industry_in_chinese(latin_rest: str) -> str | None:
    """Return English industry words run together ("environmentalengineering") in Chinese (环保工程),
    industry synonyms unified; None when a part is not an industry word."""
    text, out = latin_rest, []
    while text:
        word = next((w for w in _ENGLISH_WORDS if text.startswith(w)), None)
        if word is None:
            return None
        out.append(INDUSTRY_IN_ENGLISH[word])
        text = text[len(word) :]
    return canonical_industry("".join(out))


def same_name_across_scripts(han_core: str, latin_core: str) -> bool:
    """True when a pinyin English core is the Chinese core: the trade name's pinyin, then its industry
    words in English (鑫宏新材料 / "xinhongnewmaterials")."""
    spoken = trade_pinyin(han_core)
    latin = re.sub(r"[^0-9a-z]", "", latin_core.casefold())
    if len(spoken) < 4 or not latin.startswith(spoken):
        return False
    industry = canonical_industry(han_core)[len(trade_name(han_core)) :]
    return industry_in_chinese(latin[len(spoken) :]) == industry
