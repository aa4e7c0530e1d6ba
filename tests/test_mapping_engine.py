"""The mapping engine: every input row becomes a record or a reject with source, row, field, value, reason."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pandas as pd
import pytest

from crm_core.errors import ConfigError, MappingError
from integration.connectors.base import LOCATION, ROW_KIND, ROW_REF, TEXT_DTYPE
from integration.mappings import engine
from integration.mappings.engine import EXTERNAL_KEY, map_chunk, map_chunks, python_records, python_values
from integration.mappings.spec import CompiledMapping, load_mapping

HEAD = "version: 1\nsource: {connector: xlsx, sheet: 商机, key: 编号}\ntarget: opportunity\nfields:\n"
FIELDS = (
    "  customer: {from: 客户, lookup: {by: name}}\n"
    "  name: {from: [名称, 备用名称], required: true}\n"
    "  stage: {from: 阶段, transforms: [stage]}\n"
)


def mapping(tmp_path: Path, extra: str = "") -> CompiledMapping:
    file = tmp_path / "m.yaml"
    file.write_text(HEAD + FIELDS + extra, encoding="utf-8")
    return load_mapping(file)


def frame(rows: list[dict[str, object]]) -> pd.DataFrame:
    data = pd.DataFrame(rows)
    data[ROW_REF] = [str(i + 3) for i in range(len(data))]
    data[LOCATION] = "sales.xlsx#商机"
    data[ROW_KIND] = ["subtotal" if r.get("编号") == "合计" else "data" for r in rows]
    return data


ROW = {"编号": "O1", "客户": "甲公司", "名称": "扩容", "备用名称": None, "阶段": "赢单", "金额": "12.5万"}


def test_on_error_reject_null_and_fail(tmp_path: Path) -> None:
    rows = frame([ROW, {**ROW, "编号": "O2", "金额": "待定"}])
    rejected = map_chunk(mapping(tmp_path, "  amount: {from: 金额, transforms: [parse_amount]}\n"), rows)
    assert list(rejected.records[EXTERNAL_KEY]) == ["O1"] and rejected.records.loc[0, "amount"] == Decimal(
        "125000"
    )
    [entry] = rejected.rejects.to_dict("records")
    assert entry == {
        "source": "xlsx", "entity": "opportunity", "location": "sales.xlsx#商机", "row_ref": "4", "field": "amount",
        "value": "待定", "rule": "mapping", "severity": "error",
        "reason": "parse_amount: '待定' is not an amount (expected e.g. 1234.5, ¥1,234.50, 12.5万)",
        "external_key": "O2", "amount": None,  # the row's key and its amount (unreadable here)
    }  # fmt: skip
    nulled = map_chunk(
        mapping(tmp_path, '  amount: {from: 金额, transforms: [parse_amount], on_error: "null"}\n'), rows
    )
    assert list(nulled.records[EXTERNAL_KEY]) == ["O1", "O2"] and pd.isna(nulled.records.loc[1, "amount"])
    assert list(nulled.rejects["severity"]) == ["warn"]
    with pytest.raises(
        MappingError,
        match=r"field 'amount' failed on sales.xlsx#商机 row 4 \(value '待定'\).*\(on_error: fail\)",
    ):
        map_chunk(
            mapping(tmp_path, "  amount: {from: 金额, transforms: [parse_amount], on_error: fail}\n"), rows
        )


def test_first_non_empty_const_default_and_required(tmp_path: Path) -> None:
    extra = "  currency: {const: CNY}\n  probability: {from: 概率, default: 10}\n"
    rows = frame([{**ROW, "概率": None}, {**ROW, "编号": "O2", "名称": " ", "备用名称": "备选", "概率": 55},
                  {**ROW, "编号": "O3", "名称": None, "备用名称": None, "概率": 1}])  # fmt: skip
    result = map_chunk(mapping(tmp_path, extra), rows)
    assert list(result.records["name"]) == ["扩容", "备选"]
    assert list(result.records["currency"]) == ["CNY", "CNY"]
    assert list(result.records["probability"]) == [10, 55]
    assert result.rejects[["row_ref", "field", "rule", "reason"]].to_dict("records") == [
        {"row_ref": "5", "field": "name", "rule": "required", "reason": "required field 'name' is empty"}
    ]


def test_concat_joins_non_empty_parts(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text(
        "version: 1\nsource: {connector: crm, table: contacts, key: id}\ntarget: contact\nfields:\n"
        "  name: {from: [last_name, first_name], combine: concat, sep: ''}\n",
        encoding="utf-8",
    )
    rows = frame(
        [
            {"id": "1", "last_name": "王", "first_name": "芳"},
            {"id": "2", "last_name": None, "first_name": "Li"},
        ]
    )
    assert list(map_chunk(load_mapping(file), rows).records["name"]) == ["王芳", "Li"]


def test_subtotal_rows_are_one_reject_each_and_duplicate_keys_are_rejected(tmp_path: Path) -> None:
    rows = frame(
        [
            ROW,
            {**ROW, "名称": "又一个"},
            {"编号": "合计", "客户": None, "名称": None, "阶段": None, "金额": 1},
        ]
    )
    result = map_chunks(mapping(tmp_path), [rows])
    assert result.rows_read == 3 and list(result.records["name"]) == ["扩容"]
    assert result.rejects[["row_ref", "rule", "reason"]].to_dict("records") == [
        {"row_ref": "5", "rule": "subtotal", "reason": "subtotal/total row, not a record"},
        {"row_ref": "4", "rule": "duplicate_key", "reason": "duplicate source key (first seen on row 3)"},
    ]


def test_every_row_is_accounted_for_on_random_garbage(tmp_path: Path) -> None:
    garbage = ["", None, "😀", "0", "-", "=1+1", "一百二十万", "13/45/2025", 3.5, "\u200b"]
    rows = frame(
        [
            {"编号": f"K{i}", "客户": g, "名称": g, "备用名称": None, "阶段": g, "金额": g}
            for i, g in enumerate(garbage)
        ]
    )
    result = map_chunks(mapping(tmp_path, "  amount: {from: 金额, transforms: [parse_amount]}\n"), [rows])
    rejected_rows = set(result.rejects.loc[result.rejects["severity"] == "error", "row_ref"])
    assert len(result.records) + len(rejected_rows) == len(garbage)
    assert not set(result.records[ROW_REF]) & rejected_rows


def test_a_column_that_disappeared_names_the_mapping_and_the_column(tmp_path: Path) -> None:
    rows = frame([ROW]).drop(columns=["阶段"])
    with pytest.raises(
        MappingError, match=r"m.yaml: column\(s\) 阶段 no longer exist in xlsx.商机; update the mapping"
    ):
        map_chunk(mapping(tmp_path), rows)


def _wide_rows(count: int) -> pd.DataFrame:
    rows = [
        {**ROW, "编号": f"O{i}", "客户": f" 甲{i % 7}公司 ", "名称": f"扩容{i}", "阶段": ["赢单", "需求分析", "?"][i % 3],
         "金额": ["12.5万", "¥1,234.50", "待定", None][i % 4]}
        for i in range(count)
    ]  # fmt: skip
    return frame(rows)


def _same(left: pd.DataFrame, right: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(python_records(left), python_records(right), check_dtype=False)


def test_threads_pieces_and_distinct_values_do_not_change_the_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled = mapping(
        tmp_path,
        "  amount: {from: 金额, transforms: [parse_amount]}\n  owner: {from: 客户, transforms: [trim]}\n",
    )
    rows = _wide_rows(400)
    reference = map_chunks(compiled, [rows], workers=1)
    monkeypatch.setattr(engine, "PIECE_ROWS", 37)  # eleven pieces, mapped on two threads
    threaded = map_chunks(compiled, [rows], workers=2)
    monkeypatch.setattr(engine, "DISTINCT_SHARE", 0.0)  # every column value by value
    valuewise = map_chunks(compiled, [rows], workers=1)
    for other in (threaded, valuewise):
        _same(reference.records, other.records)
        # Rejects come chunk by chunk (all problems of a piece together): compare them as a set.
        order = ["row_ref", "field", "rule"]
        pd.testing.assert_frame_equal(
            reference.rejects.sort_values(order, ignore_index=True),
            other.rejects.sort_values(order, ignore_index=True),
        )
    kept = sum(1 for i in range(400) if i % 3 != 2 and i % 4 != 2)  # unknown stage or amount 待定: rejected
    assert len(reference.records) == kept and set(reference.rejects["rule"]) == {"mapping"}
    assert reference.records["amount"].dropna().map(str).isin(["125000.00", "1234.50"]).all()


def test_arrow_text_input_maps_like_python_objects(tmp_path: Path) -> None:
    compiled = mapping(tmp_path, "  amount: {from: 金额, transforms: [parse_amount]}\n")
    rows = _wide_rows(40)
    arrow_rows = rows.astype({c: TEXT_DTYPE for c in ROW if c in rows.columns})
    assert str(arrow_rows["客户"].dtype) == "string[pyarrow]"
    from_objects, from_arrow = map_chunk(compiled, rows), map_chunk(compiled, arrow_rows)
    _same(from_objects.records, from_arrow.records)
    pd.testing.assert_frame_equal(from_objects.rejects, from_arrow.rejects)


def test_python_records_gives_plain_values(tmp_path: Path) -> None:
    rows = frame([ROW, {**ROW, "编号": "O2", "金额": None, "备用名称": None}])
    compiled = mapping(tmp_path, "  amount: {from: 金额, transforms: [parse_amount]}\n")
    mapped = map_chunk(compiled, rows).records
    assert str(mapped["stage"].dtype) == "string[pyarrow]" and str(mapped["amount"].dtype).startswith(
        "decimal128"
    )
    records = python_records(mapped)
    assert records.loc[1, "amount"] is None and records.loc[0, "stage"] == "won"
    assert isinstance(records.loc[0, "amount"], Decimal) and records.loc[0, "amount"] == Decimal("125000")
    assert all(pd.api.types.is_object_dtype(dtype) for dtype in records.dtypes)


def test_a_typed_field_over_an_empty_column_takes_its_default(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text(
        "version: 1\nsource: {connector: erp, table: Customer, key: code}\ntarget: customer\nfields:\n"
        "  name: {from: name, required: true}\n"
        '  is_branch: {from: head, transforms: [{regex_replace: {pattern: ".+", replace: "Y"}}, bool], default: false}\n',
        encoding="utf-8",
    )
    rows = pd.DataFrame({"code": ["1", "2"], "name": ["甲公司", "乙公司"], "head": [None, None]})
    rows[ROW_REF], rows[LOCATION], rows[ROW_KIND] = ["1", "2"], "Customer", "data"
    for chunk in (rows, rows.astype({"head": TEXT_DTYPE})):
        records = python_records(map_chunk(load_mapping(file), chunk).records)
        assert records["is_branch"].tolist() == [False, False]


@pytest.mark.parametrize(("setting", "expected"), [("3", 3), (" 2 ", 2), ("", None)])
def test_mapping_threads_follow_crmi_mapping_workers(
    setting: str, expected: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRMI_MAPPING_WORKERS", setting)
    workers = engine.default_workers()
    assert workers == expected if expected is not None else 1 <= workers <= 8


@pytest.mark.parametrize("setting", ["0", "two", "-1", "1.5"])
def test_a_bad_crmi_mapping_workers_names_the_variable_and_what_is_allowed(
    setting: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRMI_MAPPING_WORKERS", setting)
    with pytest.raises(ConfigError) as raised:
        engine.default_workers()
    assert str(raised.value) == (
        f"<config>: CRMI_MAPPING_WORKERS={setting!r}: expected a whole number of threads, 1 or more "
        "(unset it to use one thread per core)"
    )


def test_computed_values_go_through_transforms_and_on_error(tmp_path: Path) -> None:
    rows = frame([{**ROW, "数量": 3, "单价": "0.1"}, {**ROW, "编号": "O2", "数量": 0, "单价": "2"}])
    computed = mapping(
        tmp_path,
        "  description: {expr: \"'  ' || 名称 || '（' || 阶段 || '）'\", transforms: [trim, nfkc]}\n"
        '  amount: {expr: "数量 * 单价"}\n'
        '  probability: {expr: "round(100 / 数量)", on_error: "null"}\n'
        "  currency:\n"
        "    when:\n"
        '      - {if: "数量 > 1", then: {expr: "upper(\'cny\')"}}\n'
        "      - else: USD\n",
    )
    result = map_chunk(computed, rows)
    records = result.records.set_index(EXTERNAL_KEY)
    assert records.loc["O1", "description"] == "扩容(赢单)"  # the expression, then trim and NFKC
    assert records.loc["O1", "amount"] == Decimal("0.3")  # not 0.30000000000000004
    assert (records.loc["O1", "probability"], records.loc["O2", "probability"]) == (33, None)
    assert (records.loc["O1", "currency"], records.loc["O2", "currency"]) == ("CNY", "USD")
    [warning] = result.rejects.to_dict("records")
    assert (warning["row_ref"], warning["field"], warning["reason"], warning["severity"]) == (
        "4",
        "probability",
        "division by zero",
        "warn",
    )
    assert warning["value"] == "数量=0"  # what the expression was given


def customer_phones(tmp_path: Path, phone: str = 'transforms: [phone], on_error: "null"') -> CompiledMapping:
    """A customer mapping whose phone (listed before its city) is completed from the city: area_code_from."""
    file = tmp_path / "customers.yaml"
    file.write_text(
        "version: 1\nsource: {connector: xlsx, sheet: 客户, key: 编号}\ntarget: customer\nfields:\n"
        f"  name: 名称\n  phone: {{from: 电话, {phone}, area_code_from: city}}\n"
        "  city: {from: 城市, transforms: [trim]}\n",
        encoding="utf-8",
    )
    return load_mapping(file)


def test_a_local_number_written_without_its_area_code_takes_the_city_s(tmp_path: Path) -> None:
    """area_code_from: refused local numbers are tried again with the city's area code; nothing else changes."""
    mapping = customer_phones(tmp_path)
    cases = [  # (电话, 城市, phone expected)
        ("48410754", "苏州市", "+8651248410754"),
        ("8841 0754", "Shenzhen", "+8675588410754"),
        ("48410754转8", "苏州", "+8651248410754;ext=8"),
        ("13800138000", "苏州市", "+8613800138000"),  # a mobile converts on its own
        ("0571-88880000", "苏州市", "+8657188880000"),  # its own area code wins over the city's
        ("48410754", None, None),  # no city: still refused
        ("48410754", "火星市", None),  # no area code known for it
        ("12345", "苏州市", None),  # not a local number
    ]
    rows = frame([{"编号": f"C{i}", "名称": f"公司{i}", "电话": tel, "城市": city}
                  for i, (tel, city, _) in enumerate(cases)])  # fmt: skip
    result = map_chunk(mapping, rows)
    records = python_records(result.records)
    assert list(records.columns[:3]) == ["name", "phone", "city"]  # the mapping's order, not the run order
    assert records["phone"].tolist() == [expected for _, _, expected in cases]
    refused = result.rejects[result.rejects["field"] == "phone"]
    assert refused["value"].tolist() == ["48410754", "48410754", "12345"]
    assert (refused["severity"] == "warn").all()
    assert "area code" not in " ".join(refused["reason"])  # the transform's own reason, as before


def test_the_first_of_several_local_numbers_takes_the_city_s_area_code(tmp_path: Path) -> None:
    mapping = customer_phones(tmp_path, 'transforms: [{phone: {several: first}}], on_error: "null"')
    rows = frame([{"编号": "C1", "名称": "甲公司", "电话": "48410754、48410753", "城市": "苏州市"}])
    records = python_records(map_chunk(mapping, rows).records)
    assert records["phone"].tolist() == ["+8651248410754"]


def test_a_completed_local_number_keeps_its_digits_and_is_one_number(tmp_path: Path) -> None:
    """area_code_from adds the area code and nothing else: no digit of the cell's tail joins the number.

    A whole-number cell read as a float (88410754.0: an integer column with empty cells) is the number the
    phone transform reads (88410754), not 8841075 followed by a 0; a second number after the first is no
    extension.
    """
    mapping = customer_phones(tmp_path)
    cases: list[tuple[object, str | None]] = [  # (电话, phone expected), all in 深圳 (0755, 8 digits)
        (88410754.0, "+8675588410754"),  # the float of a whole number: 88410754
        (8841075.0, None),  # 8841075: seven digits, no Shenzhen number; never 0755-88410750
        ("8841075 0", None),  # nor with the stray digit after a space
        ("88410754,88410755", None),  # two numbers: the second is no extension
        ("88410754转8", "+8675588410754;ext=8"),
        ("\u200b88410754", "+8675588410754"),  # a zero-width space before it, as the transform reads it
        ("0755-88410754,88410755", None),  # two numbers (several: refuse), not extension 88410755
    ]
    rows = frame([{"编号": f"C{i}", "名称": f"公司{i}", "电话": tel, "城市": "深圳"}
                  for i, (tel, _) in enumerate(cases)])  # fmt: skip
    records = python_records(map_chunk(mapping, rows).records)
    assert records["phone"].tolist() == [expected for _, expected in cases]


def test_completed_phone_numbers_keep_the_column_s_dtype(tmp_path: Path) -> None:
    """A chunk where area_code_from completed a number gives the phone column the dtype of any other chunk."""
    mapping = customer_phones(tmp_path)

    def phones(*cells: str | None) -> pd.Series:
        rows = frame(
            [
                {"编号": f"C{i}", "名称": f"公司{i}", "电话": tel, "城市": "深圳"}
                for i, tel in enumerate(cells)
            ]
        )
        return map_chunk(mapping, rows).records["phone"]

    plain = phones("0755-88410754", "x", None)
    completed = phones("88410754", "x", None)
    assert completed.dtype == plain.dtype == TEXT_DTYPE
    assert python_values(completed).tolist() == ["+8675588410754", None, None]


def test_area_code_from_keeps_the_rejects_in_the_mapping_s_order(tmp_path: Path) -> None:
    """The phone field runs after its city field, yet its rejects come where the mapping lists it, as before."""
    head = "version: 1\nsource: {connector: xlsx, sheet: 客户, key: 编号}\ntarget: customer\nfields:\n  name: 名称\n"
    fields = (
        '  phone: {from: 电话, transforms: [phone], on_error: "null"%s}\n'
        '  email: {from: 邮箱, transforms: [email], on_error: "null"}\n'
        "  city: {from: 城市, transforms: [trim]}\n"
    )
    rows = frame([{"编号": "C1", "名称": "甲", "电话": "x", "邮箱": "bad", "城市": "深圳"},
                  {"编号": "C2", "名称": "乙", "电话": "88410754", "邮箱": "bad", "城市": "深圳"}])  # fmt: skip
    rejects = []
    for extra in ("", ", area_code_from: city"):
        file = tmp_path / "customers.yaml"
        file.write_text(head + fields % extra, encoding="utf-8")
        rejects.append(map_chunk(load_mapping(file), rows).rejects)
    before, after = rejects
    assert before[["row_ref", "field"]].values.tolist() == [
        ["3", "phone"],
        ["4", "phone"],
        ["3", "email"],
        ["4", "email"],
    ]
    assert after[["row_ref", "field"]].values.tolist() == [["3", "phone"], ["3", "email"], ["4", "email"]]


def test_area_code_from_with_on_error_fail_repeated_values_and_a_shifted_index(tmp_path: Path) -> None:
    """A completable number does not fail an on_error: fail field; repeated cells (the distinct-value path)
    are completed row by row with each row's city; a chunk indexed from 100 (a later piece) as well."""
    mapping = customer_phones(tmp_path, "transforms: [phone], on_error: fail")
    cities = ["深圳", "广州", "深圳", "北京", "深圳", "广州"]
    rows = frame([{"编号": f"C{i}", "名称": f"公司{i}", "电话": "88410754", "城市": city}
                  for i, city in enumerate(cities)])  # fmt: skip
    rows[["编号", "名称", "电话", "城市"]] = rows[["编号", "名称", "电话", "城市"]].astype(TEXT_DTYPE)
    rows.index = pd.RangeIndex(100, 100 + len(rows))
    result = map_chunk(mapping, rows)
    codes = {"深圳": "755", "广州": "20", "北京": "10"}
    assert python_values(result.records["phone"]).tolist() == [f"+86{codes[c]}88410754" for c in cities]
    assert result.rejects.empty
    rows.loc[103, "城市"] = "火星"  # no area code known: the field fails, as without area_code_from
    with pytest.raises(MappingError, match=r"field 'phone' failed on .* row 6 \(value '88410754'\)"):
        map_chunk(mapping, rows)


def test_a_required_reference_rejects_a_row_whose_record_is_not_in_the_core(tmp_path: Path) -> None:
    """``required: true`` on a lookup field means the reference must resolve, not only that the column has a
    value: a newcomer's contacts whose customer was soft-deleted loaded without one, with a warning only.
    ``missing: warn`` written out still wins; a field not required keeps the core's default."""
    from integration.pipeline import _lookups

    head = "version: 1\nsource: {connector: xlsx, sheet: 联系人, key: 编号}\ntarget: contact\nfields:\n  name: {from: 姓名}\n"
    file = tmp_path / "c.yaml"
    cases = {
        "  customer: {from: 客户, lookup: {by: external_id}, required: true}\n": "reject",
        "  customer: {from: 客户, lookup: {by: external_id, missing: warn}, required: true}\n": "warn",
        "  customer: {from: 客户, lookup: {by: external_id}}\n": None,
    }
    for field, missing in cases.items():
        file.write_text(head + field, encoding="utf-8")
        assert _lookups(load_mapping(file))["customer"].missing == missing, field
