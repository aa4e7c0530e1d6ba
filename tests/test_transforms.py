"""Transforms on Chinese and Western values: what they return and which values they reject."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pandas as pd
import pytest
from pydantic import ValidationError

from integration.mappings.transforms import REGISTRY, split_address


def run(name: str, data: list[Any], **args: Any) -> tuple[list[Any], list[str | None]]:
    definition = REGISTRY[name]
    out, errors = definition.func(pd.Series(data, dtype=object), definition.args.model_validate(args))
    error_list = [None] * len(data) if errors is None else [None if e is None else str(e) for e in errors]
    # Text results come back Arrow-backed (missing is pd.NA); compare them as plain Python values.
    return [None if v is pd.NA else v for v in out], error_list


def one(name: str, value: Any, **args: Any) -> Any:
    [out], [error] = run(name, [value], **args)
    assert error is None, error
    return out


def fails(name: str, value: Any, **args: Any) -> str:
    [out], [error] = run(name, [value], **args)
    assert out is None and error is not None
    return error


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("  深圳　腾达  ", "深圳 腾达"),
        ("a\u200bb", "ab"),
        ("Acme\t\tTrading\n", "Acme Trading"),
        ("   ", None),
    ],
)
def test_trim(value: str, expected: str | None) -> None:
    assert one("trim", value) == expected


def test_nfkc_turns_full_width_into_half_width() -> None:
    assert one("nfkc", "ＡＢＣ１２３（深圳）") == "ABC123(深圳)"


def test_case_transforms_leave_chinese_alone() -> None:
    assert (one("upper", "abc深圳"), one("lower", "ABC深圳"), one("title", "acme trading 深圳")) == (
        "ABC深圳",
        "abc深圳",
        "Acme Trading 深圳",
    )


def test_regex_and_split() -> None:
    assert one("regex_replace", "Tel: 0755-1234", pattern=r"\D", replace="") == "07551234"
    assert one("regex_extract", "订单号SO-2025-001", pattern=r"SO-(\d{4})") == "2025"
    assert one("regex_extract", "无", pattern=r"SO-(\d{4})") is None
    assert one("split", "张伟/李娜", sep="/", index=-1) == "李娜"


def test_map_values_matches_ignoring_case_and_width() -> None:
    values, errors = run(
        "map_values", ["ＶＩＰ", "vip ", "normal", None], values={"VIP": "key"}, unmatched="reject"
    )
    assert values == ["key", "key", None, None]
    assert errors[2] == "'normal' is not in the value map (known: VIP)"
    assert run("map_values", ["x"], values={"a": 1}, unmatched="keep")[0] == ["x"]
    assert run("map_values", ["x"], values={"a": 1}, unmatched="null") == ([None], [None])


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2025-03-05", dt.date(2025, 3, 5)), ("2025/3/5", dt.date(2025, 3, 5)), ("2025.3.5", dt.date(2025, 3, 5)),
        ("2025年3月5日", dt.date(2025, 3, 5)), ("２０２５年３月５日", dt.date(2025, 3, 5)), ("20250305", dt.date(2025, 3, 5)),
        ("2025-03-05 14:30:00", dt.date(2025, 3, 5)), (45721, dt.date(2025, 3, 5)), (45721.75, dt.date(2025, 3, 5)),
        (59, dt.date(1900, 2, 28)), (61, dt.date(1900, 3, 1)), (1, dt.date(1900, 1, 1)),
        (dt.datetime(2025, 3, 5, 9), dt.date(2025, 3, 5)), ("45721", dt.date(2025, 3, 5)),
    ],
)  # fmt: skip
def test_parse_date(value: Any, expected: dt.date) -> None:
    assert one("parse_date", value) == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (60, "Excel serial 60 is 1900-02-29, a day that does not exist (Excel's leap-year bug)"),
        ("2025年13月1日", "'2025年13月1日' is not a valid date: month must be in 1..12"),
        ("下周", "'下周' is not a date (expected e.g. 2025-03-05, 2025/3/5 or 2025年3月5日)"),
        (0, "0 is not a plausible Excel date serial (1..2958465)"),
    ],
)
def test_parse_date_rejects_with_a_reason(value: Any, reason: str) -> None:
    assert fails("parse_date", value) == reason


def test_parse_date_with_explicit_format_and_no_serials() -> None:
    assert one("parse_date", "05/03/2025", formats=["%d/%m/%Y"]) == dt.date(2025, 3, 5)
    assert fails("parse_date", 45721, excel_serial=False) == "45721 is a number, not a date"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2025年3月5日 14时30分", dt.datetime(2025, 3, 5, 14, 30)),
        ("2025年3月5日14时30分15秒", dt.datetime(2025, 3, 5, 14, 30, 15)),
        ("2025年3月5日 14点30分", dt.datetime(2025, 3, 5, 14, 30)),
        ("2025/3/5 9:05", dt.datetime(2025, 3, 5, 9, 5)),
        ("2025-03-05 14:30:15.250", dt.datetime(2025, 3, 5, 14, 30, 15)),
    ],
)
def test_parse_datetime_reads_chinese_and_latin_times(value: str, expected: dt.datetime) -> None:
    assert one("parse_datetime", value) == expected


def test_a_time_glued_to_a_numeric_date_is_not_read_as_part_of_the_day() -> None:
    assert fails("parse_datetime", "2025-03-0514:30") == (
        "'2025-03-0514:30' is not a date (expected e.g. 2025-03-05, 2025/3/5 or 2025年3月5日)"
    )


def test_parse_datetime_attaches_the_zone_to_naive_values_only() -> None:
    shanghai = ZoneInfo("Asia/Shanghai")
    assert one("parse_datetime", "2025-03-05 14:30", timezone="Asia/Shanghai") == dt.datetime(
        2025, 3, 5, 14, 30, tzinfo=shanghai
    )
    utc = one("parse_datetime", "2025-03-05T14:30:00Z", timezone="Asia/Shanghai")
    assert utc.utcoffset() == dt.timedelta(0)
    assert one("parse_datetime", "2025-03-05T14:30:00+08:00").utcoffset() == dt.timedelta(hours=8)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("¥1,234.50", "1234.50"), ("￥1,234.50", "1234.50"), ("12.5万", "125000"), ("3亿", "300000000"), ("1.2k", "1200"),
        ("(500)", "-500"), ("-500", "-500"), ("一百二十万", "1200000"), ("壹仟贰佰元", "1200"), ("壹拾万元整", "100000"),
        ("RMB 88,000", "88000"), ("$1,000.00", "1000.00"), ("2w", "20000"), ("1.5M", "1500000"), (86000.5, "86000.5"),
        (120000, "120000"), ("80,000元", "80000"), ("３５万", "350000"),
    ],
)  # fmt: skip
def test_parse_amount(value: Any, expected: str) -> None:
    assert one("parse_amount", value) == Decimal(expected)


@pytest.mark.parametrize("value", ["待定", "abc", "万", "12..5"])
def test_parse_amount_rejects_non_amounts(value: str) -> None:
    assert "amount" in fails("parse_amount", value) or "numeral" in fails("parse_amount", value)


def test_parse_amount_multiplier_for_columns_in_wan() -> None:
    assert one("parse_amount", "12.5", multiply=10000) == Decimal("125000.0")


@pytest.mark.parametrize(
    ("value", "code"),
    [
        ("¥", "CNY"),
        ("人民币", "CNY"),
        ("rmb", "CNY"),
        ("美元", "USD"),
        ("usd", "USD"),
        ("港币", "HKD"),
        ("EUR", "EUR"),
    ],
)
def test_currency(value: str, code: str) -> None:
    assert one("currency", value) == code


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("13812345678", "+8613812345678"), ("+86 138 1234 5678", "+8613812345678"), ("0086-13812345678", "+8613812345678"),
        ("１３８１２３４５６７８", "+8613812345678"), ("010-62345678", "+861062345678"), ("(0755)88889999", "+8675588889999"),
        ("0755-8888 9999转123", "+8675588889999;ext=123"), ("+1 650-253-0000", "+16502530000"), (13812345678, "+8613812345678"),
    ],
)  # fmt: skip
def test_phone_to_e164(value: Any, expected: str) -> None:
    assert one("phone", value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("029-44340459（分机919）", "+862944340459;ext=919"), ("0574-7384 4850 (分机 187)", "+8657473844850;ext=187"),
        ("0755-86001234 x12", "+8675586001234;ext=12"), ("0510-74217686-2853", "+8651074217686;ext=2853"),
        ("021-57496611-852", "+862157496611;ext=852"),
        ("0755-8600-1234", "+8675586001234"),  # dashes inside one number: the digits together are the number
    ],
)  # fmt: skip
def test_phone_keeps_extensions_in_brackets_or_after_a_dash(value: str, expected: str) -> None:
    assert one("phone", value) == expected
    assert run("phone", [value, "13812345678", value]) == ([expected, "+8613812345678", expected], [None] * 3)


@pytest.mark.parametrize("value", ["0755-86001234（分机12345678901）", "0755-86001234转12345678901234567890"])
def test_phone_refuses_an_extension_longer_than_ten_digits(value: str) -> None:
    # +86 and 12 digits, ;ext= and 20 digits is 39 characters: more than the String(32) phone columns hold.
    assert fails("phone", value) == f"'{value}' has an extension longer than 10 digits"


@pytest.mark.parametrize("value", ["13800138000-12", "+86 138-0013-8000 - 8", "15960927284-8"])
def test_a_dash_after_a_mobile_is_no_extension(value: str) -> None:
    # a mobile has no switchboard: what follows the dash is not an extension of it
    assert fails("phone", value) == f"'{value}' is not a valid phone number for region CN"


def test_a_dash_is_no_extension_unless_the_number_before_it_is_whole() -> None:
    assert (
        fails("phone", "0000-12345678-12") == "'0000-12345678-12' is not a valid phone number for region CN"
    )
    assert (
        fails("phone", "0755-86001234-123456")
        == "'0755-86001234-123456' is not a valid phone number for region CN"
    )
    assert (
        fails("phone", "48394825") == "'48394825' is not a valid phone number for region CN"
    )  # no area code


SEVERAL = [  # (cell, first number that reads)
    ("021-48410754、021-48410753", "+862148410754"),
    ("0512-23993476；0512-23993477", "+8651223993476"),
    ("13589138968, 0551-69969191", "+8613589138968"),
    ("028-21860530；13967114502", "+862821860530"),  # not an 'extension' of 11 digits
    ("0592-7658904/13943616563", "+865927658904"),
    ("0755-86001234转8、0755-86001235", "+8675586001234;ext=8"),
    ("12345 / 021-48410753", "+862148410753"),  # the first that reads
    ("0755-88410754,88410755", "+8675588410754"),  # not extension 88410755 (libphonenumber's reading)
    ("0755-88410754；88410755", "+8675588410754"),
    ("0755-88410754 ; +86 755 88410755", "+8675588410754"),
]


@pytest.mark.parametrize(("cell", "expected"), SEVERAL)
def test_phone_keeps_the_first_number_of_a_cell_listing_several_when_asked(cell: str, expected: str) -> None:
    assert one("phone", cell, several="first") == expected
    assert fails("phone", cell).startswith(f"'{cell}' ")  # the default still refuses the cell


def test_several_first_changes_nothing_else() -> None:
    cells = [
        "138 0013 8000",
        "+8675586001234;ext=8",
        "0755-86001234转8",
        "12345",
        "48394825",
        "待定、未知",
        None,
    ]
    assert run("phone", cells, several="first") == run("phone", cells)
    # the Arrow path and the one-value path agree
    arrow = pd.Series([cell for cell, _ in SEVERAL], dtype="string[pyarrow]")
    definition = REGISTRY["phone"]
    out, errors = definition.func(arrow, definition.args.model_validate({"several": "first"}))
    assert list(out) == [expected for _, expected in SEVERAL] and (errors is None or errors.isna().all())


def test_several_first_keeps_an_rfc3966_extension_with_its_number() -> None:
    """';ext=12' (the form phone writes) is the extension of the number before it, not a second number:
    several: first keeps it, as it keeps 转12, and does not drop an extension the default refuses as too long."""
    assert one("phone", "+8675588410754;ext=12、+8613800138000", several="first") == "+8675588410754;ext=12"
    assert one("phone", "0755-88410754;ext=12、13800138000", several="first") == "+8675588410754;ext=12"
    assert one("phone", "0755-88410754转12、13800138000", several="first") == "+8675588410754;ext=12"
    assert one("phone", "0755-88410754;EXT=12/0755-88410755", several="first") == "+8675588410754;ext=12"
    too_long = "+86-755-88410754;ext=123456789012"
    assert fails("phone", too_long, several="first") == fails("phone", too_long)
    assert "longer than 10 digits" in fails("phone", too_long)


def test_a_second_number_after_a_comma_is_no_extension() -> None:
    cell = "0755-88410754,88410755"
    assert fails("phone", cell) == (
        f"'{cell}' lists several phone numbers: write one per cell, or keep the first with several: first"
    )
    # a few digits after a comma stay the extension they were read as, and ;ext= of any length is one
    assert one("phone", "0755-88410754,12") == "+8675588410754;ext=12"
    assert one("phone", "0755-88410754;ext=1234567") == "+8675588410754;ext=1234567"
    assert one("phone", "0755-88410754 ext. 1234567") == "+8675588410754;ext=1234567"


def test_phone_rejects_invalid_numbers_and_honours_the_region() -> None:
    assert fails("phone", "12345") == "'12345' is not a valid phone number for region CN"
    assert one("phone", "650-253-0000", region="US") == "+16502530000"


def test_email() -> None:
    assert one("email", " Wang.Fang@Example.COM ") == "wang.fang@example.com"
    assert one("email", "wang＠example.cn") == "wang@example.cn"
    assert fails("email", "wang at example.cn") == "'wang at example.cn' is not an e-mail address"


def test_uscc_compacts_and_checks_the_check_digit() -> None:
    assert one("uscc", " 9144 0300 7084 6113 6t ") == "91440300708461136T"
    assert one("uscc", "９１４４０３００７０８４６１１３６Ｔ") == "91440300708461136T"
    assert (
        fails("uscc", "91440300708461136A")
        == "'91440300708461136A' is not a valid unified social credit code (check digit fails)"
    )
    assert fails("uscc", "12345") == "'12345' is not a unified social credit code (18 characters expected)"
    # python-stdnum raises ValueError on this one (its digit check lets "5576032\n" through): a row error
    assert fails("uscc", "5576032\nRY2NNP9DH0") == (
        "'5576032\nRY2NNP9DH0' is not a valid unified social credit code (check digit fails)"
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [("腾达科技(深圳)有限公司", "腾达科技（深圳）有限公司"), ("深圳市 腾达 科技有限公司", "深圳市腾达科技有限公司"),
     ("ＡＣＭＥ Trading  Co., Ltd.", "ACME Trading Co., Ltd."), ("Acme (Shanghai) Ltd.", "Acme (Shanghai) Ltd.")],
)  # fmt: skip
def test_company_name_display_form(value: str, expected: str) -> None:
    assert one("company_name", value) == expected


@pytest.mark.parametrize(
    ("address", "parts"),
    [
        ("广东省深圳市南山区科技园1号", ("广东省", "深圳市", "南山区")), ("北京市海淀区中关村", ("北京市", "北京市", "海淀区")),
        ("浙江省杭州市余杭区文一西路", ("浙江省", "杭州市", "余杭区")), ("新疆维吾尔自治区乌鲁木齐市天山区", ("新疆维吾尔自治区", "乌鲁木齐市", "天山区")),
        ("深圳市福田区", ("广东省", "深圳市", "福田区")), ("上海浦东新区张江路", ("上海市", "上海市", "浦东新区")),
        ("江苏无锡新吴区学院路12号", ("江苏省", "无锡市", "新吴区")), ("苏州工业园区星湖街328号", ("江苏省", "苏州市", None)),
        ("浙江杭州西湖区文三路", ("浙江省", "杭州市", "西湖区")),
        ("8 Keji Road, Nanshan, Shenzhen", ("广东省", "深圳市", None)), ("Room 5, 1 Queen's Road", (None, None, None)),
    ],
)  # fmt: skip
def test_address_split(address: str, parts: tuple[str | None, ...]) -> None:
    """Written out, without suffixes, abbreviated, or a pinyin city: per value and over an Arrow column."""
    assert tuple(split_address(address).values()) == parts
    for position, part in enumerate(("province", "city", "district")):
        assert one("address_part", address, part=part) == parts[position]
        mixed, _ = run("address_part", [address, 42], part=part)  # not all text: the per-value path
        assert mixed[0] == parts[position]


def test_address_parts_keep_a_written_district_geo_cannot_place() -> None:
    """An address cpca does not know keeps what its suffixes say; each distinct address is placed once."""
    values = ["某某开发区创业路1号", "江苏无锡新吴区学院路12号", "江苏无锡新吴区学院路12号", None]
    assert run("address_part", values, part="district")[0] == ["某某开发区", "新吴区", "新吴区", None]
    assert run("address_part", values, part="province")[0] == [None, "江苏省", "江苏省", None]


def test_stage_and_bool() -> None:
    assert run("stage", ["赢单", "Closed Lost", "Negotiation/Review"])[0] == ["won", "lost", "negotiation"]
    assert (
        fails("stage", "搁置")
        == "'搁置' is not a known stage; map it with map_values or extend the stage list"
    )
    assert run("bool", ["是", "否", "Y", "n", "TRUE", "0", "√", "×"])[0] == [
        True,
        False,
        True,
        False,
        True,
        False,
        True,
        False,
    ]
    assert fails("bool", "也许") == "'也许' is not a yes/no value (是/否, Y/N, true/false, 1/0)"


def test_to_text_keeps_numeric_codes_intact() -> None:
    assert run("to_text", [1001.0, 42, "A-7"])[0] == ["1001", "42", "A-7"]


def test_transforms_leave_nulls_alone_and_parse_each_unsettled_distinct_value_once() -> None:
    calls: list[Any] = []
    original = REGISTRY["uscc"].func.__globals__["uscc_value"]

    def counting(value: Any) -> str:
        calls.append(value)
        return str(original(value))

    REGISTRY["uscc"].func.__globals__["uscc_value"] = counting
    try:
        values, errors = run("uscc", ["91440300708461136T"] * 1000 + ["91440300708461136X"] * 1000 + [None])
    finally:
        REGISTRY["uscc"].func.__globals__["uscc_value"] = original
    assert values[0] == "91440300708461136T" and values[1000] is None and values[-1] is None
    assert errors[1000] is not None and "check digit" in errors[1000] and errors[-1] is None
    # The valid code is settled by the vectorized check; only the bad one reaches Python, once.
    assert calls == ["91440300708461136X"]


def test_cn_mobile_blocks_agree_with_full_validation_on_every_block() -> None:
    import phonenumbers

    from integration.mappings.transforms import cn_block_is_valid

    for block in range(13000, 20000):
        for suffix in ("000000", "987654"):
            number = phonenumbers.PhoneNumber(country_code=86, national_number=int(f"{block}{suffix}"))
            assert phonenumbers.is_valid_number(number) == cn_block_is_valid(str(block), 11), block


def test_vectorized_phone_path_agrees_with_phonenumbers_on_random_cn_numbers() -> None:
    """Numbers settled in Arrow by block get exactly what a full phonenumbers parse gives (or its error)."""
    import random

    from integration.mappings.transforms import TransformFailure, phone_e164

    rng = random.Random(20251123)
    area_codes = ["10", "20", "21", "22", "23", "24", "25", "27", "28", "29", "311", "351", "371", "431", "451",
                  "471", "511", "531", "571", "591", "731", "755", "757", "760", "769", "851", "871", "898", "991"]  # fmt: skip
    numbers = []
    for _ in range(3000):
        area = rng.choice(area_codes)
        local = str(rng.randrange(10**6, 10**8 * 3))
        numbers.append(
            rng.choice([f"0{area}-{local}", f"+86 {area} {local}", f"0086{area}{local}", f"({area}){local}"])
        )
        numbers.append(f"1{rng.randrange(3, 10)}{rng.randrange(10**9):09d}")
        numbers.append(f"0{rng.randrange(10**9, 10**11)}")
    out, errors = run("phone", numbers)
    for value, got, error in zip(numbers, out, errors, strict=True):
        try:
            expected = phone_e164(value)
        except TransformFailure as exc:
            assert got is None and error == str(exc), value
        else:
            assert got == expected and error is None, value


def test_join_rejoins_chinese_and_latin_lists_without_empty_or_repeated_items() -> None:
    values, errors = run("join", ["销售；市场、 售后;;销售", "sales, Marketing ;support|sales", " ; ", None])
    assert values == ["销售, 市场, 售后", "sales, Marketing, support", None, None]
    assert errors == [None] * 4
    assert one("join", "张三/李四/张三", split_on=["/"], sep="、", unique=False) == "张三、李四、张三"


def test_join_refuses_an_empty_separator() -> None:
    with pytest.raises(ValidationError, match="an empty separator would split between every character"):
        REGISTRY["join"].args.model_validate({"split_on": [";", ""]})
