"""Location evidence: addresses without suffixes, pinyin city fields, area codes and division codes."""

from __future__ import annotations

import pytest

from integration.geo import (
    NOWHERE,
    Place,
    area_code_of_city,
    cities_of_area_code,
    city_of_name,
    place_of_address,
    place_of_city,
    place_of_division_code,
    places_of_addresses,
)


@pytest.mark.parametrize(
    ("address", "province", "city", "district"),
    [
        ("江苏无锡新吴区学院路12号", "江苏省", "无锡市", "新吴区"),
        ("广东省深圳市南山区科技园", "广东省", "深圳市", "南山区"),
        ("上海浦东新区张江路88号", "上海市", "上海市", "浦东新区"),
        ("郑州市金水路1号", "河南省", "郑州市", None),
    ],
)
def test_addresses_with_and_without_suffixes_are_placed(
    address: str, province: str, city: str, district: str | None
) -> None:
    place = place_of_address(address)
    assert (place.province, place.city, place.district) == (province, city, district)


def test_latin_addresses_are_placed_by_the_pinyin_city_they_name() -> None:
    places = places_of_addresses(
        ["8 Keji Road, Nanshan, Shenzhen", "Zheng Zhou City, Jinshui", "Fuzhou Road 3"]
    )
    assert [(p.province, p.city) for p in places] == [
        ("广东省", "深圳市"),
        ("河南省", "郑州市"),
        (None, None),
    ]
    assert place_of_city("Wuxi") == place_of_city("无锡") == Place("江苏省", "无锡市", None, "320200")
    assert place_of_city("上海").province == "上海市" and place_of_city("Atlantis") == NOWHERE


def test_unplaceable_and_missing_addresses_are_nowhere() -> None:
    assert places_of_addresses([None, "", "Room 5, Unit 3"]) == [NOWHERE, NOWHERE, NOWHERE]


@pytest.mark.parametrize(
    ("field", "city"),
    [
        ("深圳", "深圳市"),
        ("深圳市", "深圳市"),
        ("Shenzhen", "深圳市"),
        ("Zheng Zhou City", "郑州市"),
        ("北京", "北京市"),
    ],
)
def test_city_fields_in_chinese_or_pinyin_name_the_city(field: str, city: str) -> None:
    assert city_of_name(field) == city


@pytest.mark.parametrize(
    ("field", "city", "area_code"),
    [
        ("广东省深圳市", "深圳市", "755"),
        ("深圳市南山区", "深圳市", "755"),
        ("广东深圳", "深圳市", "755"),
        ("浙江省宁波市鄞州区", "宁波市", "574"),
        ("北京市朝阳区", "北京市", "10"),
        ("吉林省长春市朝阳区", "长春市", "431"),
        ("Shenzhen, Guangdong", "深圳市", "755"),
        ("Nanshan / Shenzhen", "深圳市", "755"),
    ],
)
def test_a_city_field_with_its_province_or_district_names_the_city(
    field: str, city: str, area_code: str
) -> None:
    assert city_of_name(field) == city
    assert area_code_of_city(field) == area_code


@pytest.mark.parametrize("field", ["南山区", "朝阳区", "广东省", "Shenzhen, Beijing", "Atlantis, Guangdong"])
def test_a_district_or_province_alone_or_two_cities_name_no_city(field: str) -> None:
    # 朝阳区 is in 北京 and in 长春: a district without its city is no evidence of either
    assert city_of_name(field) is None
    assert area_code_of_city(field) is None


def test_a_pinyin_shared_by_two_cities_is_not_evidence() -> None:
    assert city_of_name("Fuzhou") is None  # 福州 and 抚州


def test_division_code_of_a_credit_code_places_the_company() -> None:
    assert place_of_division_code("440305") == Place("广东省", "深圳市", "南山区", "440305")
    assert place_of_division_code("310115").city == "上海市"
    assert place_of_division_code("999999") == NOWHERE


def test_area_codes_both_ways() -> None:
    assert cities_of_area_code("0755") == ("深圳市",)
    assert "沈阳市" in cities_of_area_code("24")
    assert area_code_of_city("Wuxi") == "510"
    assert area_code_of_city("北京市") == "10"


def test_conflicting_places() -> None:
    shenzhen, guangzhou = Place("广东省", "深圳市"), Place("广东省", "广州市")
    assert shenzhen.conflicts_with(guangzhou)
    assert not shenzhen.conflicts_with(Place("广东省"))
    assert not shenzhen.conflicts_with(NOWHERE)
