"""Where a record is: China's administrative divisions from an address, a city field, a phone or a code.

One place for location evidence, used by the mapping transforms (``address_part``) and by dedup.
The division table is cpca's (every province, city and district with its 6-digit adcode); the
fixed-line area codes come from phonenumbers' geocoding data. Neither is a hand-kept list.
"""

from __future__ import annotations

import re
import unicodedata
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

_MUNICIPALITY_CITY = "市辖区"  # cpca's city for the districts of 北京/上海/天津/重庆
_CITY_SUFFIXES = ("自治州", "地区", "盟", "市")
_PINYIN_SEPARATORS = re.compile(r"[\s\-_'·.]+")
_ENGLISH_CITY_WORDS = re.compile(r"\b(city|shi|prefecture|municipality)\b", re.IGNORECASE)
_HAS_CJK = re.compile(r"[\u4e00-\u9fff]")
_LATIN_WORD = re.compile(r"[A-Za-z]+")
# Between the numbers of one phone cell: 、 ； / , | two spaces, or a space before another whole number.
PHONE_CELL_SPLIT = re.compile(r"[、；;/,，|]|\s{2,}|(?<=\d)\s+(?=(?:\+|0|1[3-9]))(?=[\d+]{7,})")


@dataclass(frozen=True)
class Place:
    """A location: province, city and district names (None where unknown) and the most specific adcode."""

    province: str | None = None
    city: str | None = None
    district: str | None = None
    adcode: str | None = None

    @property
    def known(self) -> bool:
        """True when at least the province is known."""
        return self.province is not None

    def conflicts_with(self, other: Place) -> bool:
        """True when both places are known at some level and differ there (different province or city)."""
        if self.province and other.province and self.province != other.province:
            return True
        return bool(self.city and other.city and self.city != other.city)


NOWHERE = Place()


@cache
def _cpca() -> Any:
    """cpca, imported quietly: it loads its table through pkg_resources, which warns on import."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="Module .* was already imported", category=UserWarning)
        import cpca
    return cpca


@cache
def _divisions() -> dict[str, tuple[str, int]]:
    """adcode (6 digits) → (name, rank) for every division; rank 0 province, 1 city, 2 district."""
    ad_2_addr_dict = _cpca().ad_2_addr_dict
    return {code[:6]: (info.name, int(info.rank)) for code, info in ad_2_addr_dict.items()}


@lru_cache(maxsize=100_000)
def place_of_division_code(code: str | None) -> Place:
    """The place a 6-digit division code names (the 3rd–8th characters of a 统一社会信用代码)."""
    if not code or len(code) < 6 or not code[:6].isdigit():
        return NOWHERE
    code = code[:6]
    divisions = _divisions()
    province = divisions.get(code[:2] + "0000")
    if province is None:
        return NOWHERE
    city_entry = divisions.get(code[:4] + "00")
    district_entry = divisions.get(code) if code[4:] != "00" else None
    city = city_entry[0] if city_entry and code[2:4] != "00" else None
    if city in (None, _MUNICIPALITY_CITY) and province[0].endswith("市"):
        city = province[0]
    elif city == _MUNICIPALITY_CITY:
        city = None
    exact = code if (district_entry or city_entry) else code[:2] + "0000"
    return Place(province[0], city, district_entry[0] if district_entry else None, exact)


def places_of_addresses(addresses: Iterable[str | None]) -> list[Place]:
    """Province, city and district of each address (each distinct one looked up once).

    Addresses without suffixes (江苏无锡新吴区…) and with abbreviations (苏州工业园区…) are placed by cpca;
    an address in Latin letters by the pinyin city it names ('Keji Road, Shenzhen' → 广东省 / 深圳市).
    """
    return [place for place, _ in parse_addresses(addresses)]


def parse_addresses(addresses: Iterable[str | None]) -> list[tuple[Place, str | None]]:
    """Place of each address and the rest of it after the divisions (the street and number), if any."""
    values = list(addresses)
    cleaned = {value: _clean(value) for value in values if value}
    found: dict[str, tuple[Place, str | None]] = {}
    new = sorted({text for text in cleaned.values() if text and text not in _PLACED})
    for text in {text for text in cleaned.values() if text in _PLACED}:
        found[text] = _PLACED[text]
    if new:
        found.update(_place_new(new))
        if len(_PLACED) + len(new) > _PLACED_MAX:
            _PLACED.clear()
        _PLACED.update((text, found[text]) for text in new)
    return [found.get(cleaned[value], (NOWHERE, None)) if value else (NOWHERE, None) for value in values]


# Addresses placed before (a chunked read meets the same addresses again); bounded, cleared when full.
_PLACED: dict[str, tuple[Place, str | None]] = {}
_PLACED_MAX = 200_000


def _place_new(distinct: list[str]) -> dict[str, tuple[Place, str | None]]:
    """Place distinct cleaned addresses with cpca, then Latin ones by their pinyin city."""
    frame = _cpca().transform(distinct)
    found: dict[str, tuple[Place, str | None]] = {}
    for text, province, city, district, rest, adcode in zip(
        distinct, frame["省"], frame["市"], frame["区"], frame["地址"], frame["adcode"], strict=True
    ):
        street = str(rest).strip() or None if rest else None
        if not province:
            found[text] = (NOWHERE, street)
            continue
        if city == _MUNICIPALITY_CITY or (city is None and str(province).endswith("市")):
            city = province
        found[text] = (
            Place(province, city or None, district or None, str(adcode) if adcode else None),
            street,
        )
    for text, (place, street) in found.items():
        if not place.known and not _HAS_CJK.search(text):
            found[text] = (_place_of_latin_address(text), street)
    return found


def _place_of_latin_address(text: str) -> Place:
    """The city (and its province) an address in Latin letters names in pinyin: 'Keji Road, Shenzhen'.

    Two adjacent words are tried before single ones ('Zheng Zhou'); a pinyin shared by two cities is
    no evidence (see :func:`city_of_name`).
    """
    words = _LATIN_WORD.findall(text)
    for size in (2, 1):
        for start in range(len(words) - size + 1):
            city = _city_named(" ".join(words[start : start + size]))
            if city:
                return place_of_city(city)
    return NOWHERE


@cache
def _city_codes() -> dict[str, str]:
    """City name → its adcode (prefecture-level cities, and the four municipalities)."""
    codes: dict[str, str] = {}
    for code, (name, rank) in sorted(_divisions().items()):
        if (rank == 1 and name != _MUNICIPALITY_CITY) or (rank == 0 and name.endswith("市")):
            codes.setdefault(name, code)
    return codes


def place_of_city(city: str | None) -> Place:
    """The province and city of a city name in Chinese or pinyin ('无锡', 'Wuxi' → 江苏省 / 无锡市)."""
    canonical = city_of_name(city) if city else None
    code = _city_codes().get(canonical) if canonical else None
    return place_of_division_code(code) if code else NOWHERE


def place_of_address(address: str | None) -> Place:
    """Province, city and district of one address (see ``places_of_addresses``)."""
    return places_of_addresses([address])[0]


@cache
def _city_names() -> dict[str, str | None]:
    """Lookup key → canonical city name, for Chinese names with or without suffix and for pinyin.

    A key shared by two cities (福州 and 抚州 are both "fuzhou") maps to None: ambiguous, not evidence.
    """
    from pypinyin import lazy_pinyin

    names: dict[str, str | None] = {}

    def add(key: str, city: str) -> None:
        if key in names and names[key] != city:
            names[key] = None
        else:
            names[key] = city

    for name, rank in _divisions().values():
        municipality = rank == 0 and name.endswith("市")
        if rank != 1 and not municipality:
            continue
        if name == _MUNICIPALITY_CITY:
            continue
        short = _short_city(name)
        add(name, name)
        add(short, name)
        add("".join(lazy_pinyin(short)).lower(), name)
    return names


def _short_city(name: str) -> str:
    for suffix in _CITY_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix) + 1:
            return name[: -len(suffix)]
    return name


@lru_cache(maxsize=100_000)
def city_of_name(value: str | None) -> str | None:
    """The city a CRM city field names, in Chinese or pinyin (深圳, 深圳市, Shenzhen, "Zheng Zhou City").

    A field with the province or district around the city (广东省深圳市, 深圳市南山区, "Shenzhen, Guangdong")
    names that city. A district alone (南山区, 朝阳区) names none: the city must be written.
    """
    if not value:
        return None
    text = _clean(value)
    if not text:
        return None
    city = _city_named(text)
    if city is not None:
        return city
    if _HAS_CJK.search(text):
        place, _ = parse_addresses([text])[0]
        written = place.city is not None and _short_city(place.city) in text
        return place.city if written and place.city in _city_codes() else None
    parts = [part for part in re.split(r"[,/;]", text) if part.strip()]
    named = {_city_named(part.strip()) for part in parts} - {None} if len(parts) > 1 else set()
    return named.pop() if len(named) == 1 else None  # two cities named: neither


def _city_named(text: str) -> str | None:
    """The city a cleaned text is the name of, with or without suffix, in Chinese or pinyin; else None."""
    names = _city_names()
    if text in names:
        return names[text]
    latin = _ENGLISH_CITY_WORDS.sub(" ", text.lower())
    latin = _PINYIN_SEPARATORS.sub("", latin)
    return names.get(latin) if latin else None


@cache
def _area_codes() -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """(area code → cities it serves, city → its area code) from phonenumbers' Chinese fixed-line data."""
    from phonenumbers.geodata import GEOCODE_DATA

    cities_by_code: dict[str, tuple[str, ...]] = {}
    code_by_city: dict[str, str] = {}
    for prefix, descriptions in GEOCODE_DATA.items():
        area = prefix[2:]
        # Fixed-line area codes: 10, 2x and 3-digit codes 3xx-9xx; longer prefixes are mobile ranges.
        if (
            not prefix.startswith("86")
            or not (2 <= len(area) <= 3)
            or (area.startswith("1") and area != "10")
        ):
            continue
        description = descriptions.get("zh")
        if not description:
            continue
        cities = tuple(_cities_in_description(description))
        if not cities:
            continue
        cities_by_code[area] = cities
        for city in cities:
            code_by_city.setdefault(city, area)
    return cities_by_code, code_by_city


def _cities_in_description(description: str) -> list[str]:
    """'辽宁省沈阳市、铁岭市' → ['沈阳市', '铁岭市']; '上海市' → ['上海市']."""
    found: list[str] = []
    for part in description.split("、"):
        part = part.strip()
        match = re.search(r"(?:省|自治区)(.+)$", part)
        city = match.group(1) if match else part
        if city:
            found.append(city)
    return found


def cities_of_area_code(area_code: str | None) -> tuple[str, ...]:
    """The cities a fixed-line area code serves ('755' → ('深圳市',)); empty when unknown."""
    if not area_code:
        return ()
    return _area_codes()[0].get(area_code.lstrip("0"), ())


@lru_cache(maxsize=100_000)
def area_code_of_city(city: str | None) -> str | None:
    """The fixed-line area code of a city without the trunk 0 ('深圳市' or 'Shenzhen' → '755')."""
    canonical = city_of_name(city) if city else None
    return _area_codes()[1].get(canonical) if canonical else None


def _clean(value: str) -> str:
    """NFKC and trimmed; spaces inside Chinese text dropped (深圳 南山区 → 深圳南山区)."""
    text = unicodedata.normalize("NFKC", str(value)).strip()
    return text.replace(" ", "") if any("\u4e00" <= char <= "\u9fff" for char in text) else text


@cache
def _province_of_city() -> dict[str, str]:
    """Canonical city name → its province, from the division table."""
    divisions = _divisions()
    out: dict[str, str] = {}
    for code, (name, rank) in divisions.items():
        province = divisions.get(code[:2] + "0000")
        if province is None:
            continue
        if rank == 1 and name != _MUNICIPALITY_CITY:
            out.setdefault(name, province[0])
        elif rank == 0 and name.endswith("市"):
            out.setdefault(name, name)
    return out


def province_of_city(city: str | None) -> str | None:
    """The province a canonical city name ('深圳市') lies in ('广东省'); municipalities are their own."""
    return _province_of_city().get(city) if city else None


@cache
def _provinces() -> dict[str, str]:
    """Province names with and without suffix (广东, 广东省, 内蒙古) → the canonical name."""
    names: dict[str, str] = {}
    for name, rank in _divisions().values():
        if rank == 0:
            names[name] = name
            for suffix in ("维吾尔自治区", "壮族自治区", "回族自治区", "自治区", "特别行政区", "省", "市"):
                if name.endswith(suffix) and len(name) > len(suffix) + 1:
                    names.setdefault(name[: -len(suffix)], name)
                    break
    return names


@lru_cache(maxsize=100_000)
def place_of_region(region: str | None) -> Place:
    """The place a region written in a company name names: a city (深圳 → 广东省/深圳市) or a province (广东)."""
    if not region:
        return NOWHERE
    city = city_of_name(region)
    if city:
        return Place(province_of_city(city), city)
    province = _provinces().get(_clean(region))
    return Place(province) if province else NOWHERE
