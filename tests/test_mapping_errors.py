"""Every invalid mapping spec gets its exact message at its exact location (file:line:col: path: message)."""

from __future__ import annotations

from pathlib import Path

import pytest

from crm_core.entities import ENTITIES
from crm_core.errors import ConfigError, Problem
from integration.mappings.spec import load_mapping

SOURCE_COLUMNS: dict[str, list[str] | None] = {"crm": ["id", "name", "n", "p", "amt", "cur", "rate", "day"]}
# The source's other tables, for lookups, link tables and aggregates.
OTHER_TABLES = {"currencies": ["id", "rate"], "links": ["account_id", "user_id", "deleted"]}


def other_table(table: str) -> list[str]:
    if table not in OTHER_TABLES:
        raise LookupError(f"table '{table}' does not exist; tables: {', '.join(OTHER_TABLES)}")
    return OTHER_TABLES[table]


BASE = "version: 1\nsource: {connector: crm, table: accounts, key: id}\ntarget: customer\nfields:\n"
OPP = "version: 1\nsource: {connector: crm, table: o}\ntarget: opportunity\nfields:\n  name: n\n  customer: p\n  stage: {const: prospecting}\n"

CASES: list[tuple[str, str, list[str]]] = [
    (
        "incremental_on_a_sheet",
        "version: 1\nsource: {connector: crm, sheet: s, key: id, incremental: {cursor: m}}\ntarget: customer\nfields:\n  name: name\n",
        [
            "{file}:2:9: source: a cursor needs a table or query; for spreadsheet folders use incremental: {files: true}"
        ],
    ),
    (
        "incremental_without_cursor_or_files",
        "version: 1\nsource: {connector: crm, table: t, key: id, incremental: {}}\ntarget: customer\nfields:\n  name: name\n",
        ["{file}:2:58: source.incremental: give either 'cursor: <column>' or 'files: true'"],
    ),
    (
        "incremental_without_key",
        "version: 1\nsource: {connector: crm, table: t, incremental: {cursor: m}}\ntarget: customer\nfields:\n  name: name\n",
        [
            "{file}:2:9: source: incremental reads need 'key' column(s) (not a hash): they tell rows at the cursor boundary apart"
        ],
    ),
    (
        "incremental_cursor_not_in_source",
        "version: 1\nsource: {connector: crm, table: accounts, key: id, incremental: {cursor: date_modifed}}\ntarget: customer\nfields:\n  name: name\n",
        ["{file}:2:74: source.incremental.cursor: column 'date_modifed' is not in accounts"],
    ),
    (
        "unknown_top_key",
        "version: 1\nsource: {connector: crm, table: accounts}\ntarget: customer\nfeilds: {}\nfields:\n  name: name\n",
        [
            "{file}:4:1: feilds: unknown key 'feilds'; did you mean 'fields'?; allowed: description, fields, source, target, unmapped, version",
        ],
    ),
    (
        "unknown_field_key",
        BASE + "  name: {from: name, tranforms: [trim]}\n",
        [
            "{file}:5:22: fields.name.tranforms: unknown key 'tranforms'; did you mean 'transforms'?; allowed: aggregate, area_code_from, combine, const, convert, default, expr, from, lookup, on_error, required, sep, transforms, via, when",
        ],
    ),
    (
        "unknown_transform",
        BASE + "  name: {from: name, transforms: [trimm]}\n",
        [
            "{file}:5:35: fields.name.transforms[0]: unknown transform 'trimm'; did you mean 'trim'?",
        ],
    ),
    (
        "unknown_transform_long",
        BASE + "  phone: {from: p, transforms: [{phonee: {region: CN}}]}\n  name: name\n",
        [
            "{file}:5:34: fields.phone.transforms[0].phonee: unknown transform 'phonee'; did you mean 'phone'?",
        ],
    ),
    (
        "field_not_in_entity_and_column_not_in_source",
        BASE + "  name: name\n  amount_x: x\n",
        [
            "{file}:6:3: fields.amount_x: entity 'customer' has no field 'amount_x'; fields: name, name_normalized, short_name, english_name, credit_code, credit_code_as_written, phone, email, website, address, province, city, district, industry, is_branch, parent, owner, status, erp_code, credit_limit, payment_terms",
            "{file}:6:13: fields.amount_x: column 'x' is not in accounts",
        ],
    ),
    (
        "wrong_argument_type",
        BASE + "  name: name\n  phone: {from: p, transforms: [{phone: {region: 12}}]}\n",
        [
            "{file}:6:50: fields.phone.transforms[0].phone.region: phone: Input should be a valid string",
        ],
    ),
    (
        "unknown_arg",
        BASE + "  name: name\n  phone: {from: p, transforms: [{phone: {regoin: CN}}]}\n",
        [
            "{file}:6:42: fields.phone.transforms[0].phone.regoin: phone: unknown key 'regoin'; did you mean 'region'?; allowed: region, several",
        ],
    ),
    (
        "bad_region",
        BASE + "  name: name\n  phone: {from: p, transforms: [{phone: {region: XX}}]}\n",
        [
            "{file}:6:50: fields.phone.transforms[0].phone.region: phone: unknown region 'XX' (use a two-letter country code such as CN)",
        ],
    ),
    (
        "bad_regex",
        BASE + "  name: {from: n, transforms: [{regex_replace: {pattern: '(', replace: ''}}]}\n",
        [
            "{file}:5:58: fields.name.transforms[0].regex_replace.pattern: regex_replace: invalid regular expression: missing ), unterminated subpattern at position 0",
        ],
    ),
    (
        "args_not_mapping",
        BASE + "  name: {from: n, transforms: [{split: ','}]}\n",
        [
            "{file}:5:40: fields.name.transforms[0].split: arguments of 'split' must be a mapping like {split: {arg: value}}",
        ],
    ),
    (
        "two_key_step",
        BASE + "  name: {from: n, transforms: [{trim: {}, nfkc: {}}]}\n",
        [
            "{file}:5:32: fields.name.transforms[0]: a transform is a name (trim) or a one-key mapping ({phone: {region: CN}})",
        ],
    ),
    (
        "missing_required_arg",
        BASE + "  name: {from: n, transforms: [split]}\n",
        [
            "{file}:5:32: fields.name.transforms[0].sep: split: missing required key 'sep'",
        ],
    ),
    (
        "target_unknown",
        "version: 1\nsource: {connector: crm, table: accounts}\ntarget: customers\nfields:\n  name: name\n",
        [
            "{file}:3:9: target: 'customers' is not allowed; did you mean 'customer'?; allowed: sales_rep, customer, contact, opportunity, sales_order, sales_order_line, receivable, payment, payment_application",
        ],
    ),
    (
        "field_unknown",
        BASE + "  name: name\n  nmae: x\n",
        [
            "{file}:6:3: fields.nmae: entity 'customer' has no field 'nmae'; did you mean 'name'?; fields: name, name_normalized, short_name, english_name, credit_code, credit_code_as_written, phone, email, website, address, province, city, district, industry, is_branch, parent, owner, status, erp_code, credit_limit, payment_terms",
            "{file}:6:9: fields.nmae: column 'x' is not in accounts",
        ],
    ),
    (
        "required_unmapped",
        BASE + "  phone: p\n",
        [
            "{file}:4:1: fields: required field 'name' of customer is not mapped",
        ],
    ),
    (
        "from_and_const",
        BASE + "  name: {from: n, const: x}\n",
        [
            "{file}:5:9: fields.name: give only one of 'from', 'const', 'expr' or 'when', not from and const",
        ],
    ),
    (
        "nothing",
        BASE + "  name: {required: true}\n",
        [
            "{file}:5:9: fields.name: give 'from' (a source column), 'const', 'expr', 'when' or 'default'",
        ],
    ),
    (
        "version",
        "version: 2\nsource: {connector: crm, table: accounts}\ntarget: customer\nfields:\n  name: name\n",
        [
            "{file}:1:10: version: Input should be 1",
        ],
    ),
    (
        "table_and_sheet",
        "version: 1\nsource: {connector: crm, table: a, sheet: b}\ntarget: customer\nfields:\n  name: name\n",
        [
            "{file}:2:9: source: give exactly one of 'table', 'sheet' or 'query'",
        ],
    ),
    (
        "no_table",
        "version: 1\nsource: {connector: crm}\ntarget: customer\nfields:\n  name: name\n",
        [
            "{file}:2:9: source: give exactly one of 'table', 'sheet' or 'query'",
        ],
    ),
    (
        "bad_on_error",
        BASE + "  name: {from: n, on_error: skip}\n",
        [
            "{file}:5:29: fields.name.on_error: 'skip' is not allowed; allowed: reject, null, fail",
        ],
    ),
    (
        "bad_unmapped",
        "version: 1\nsource: {connector: crm, table: accounts, key: id}\ntarget: customer\nunmapped: ignore\nfields:\n  name: n\n",
        [
            "{file}:4:11: unmapped: 'ignore' is not allowed; allowed: drop, keep, error",
        ],
    ),
    (
        "lookup_on_plain",
        BASE + "  name: {from: n, lookup: {by: name}}\n",
        [
            "{file}:5:19: fields.name.lookup: 'name' is not a reference field; only parent, owner take a lookup",
        ],
    ),
    (
        "lookup_by_code",
        BASE + "  name: n\n  parent: {from: p, lookup: {by: code}}\n",
        [
            "{file}:6:34: fields.parent.lookup.by: lookup by code works for sales reps only",
        ],
    ),
    (
        "bad_lookup_by",
        BASE + "  name: n\n  owner: {from: p, lookup: {by: email}}\n",
        [
            "{file}:6:33: fields.owner.lookup.by: 'email' is not allowed; allowed: external_id, name, code, id",
        ],
    ),
    (
        "duplicate_key",
        BASE + "  name: n\n  name: m\n",
        [
            "{file}:6:3: fields.name: duplicate key 'name'",
        ],
    ),
    (
        "bad_yaml",
        BASE + "  name: {from: n\n",
        [
            "{file}:6:1: invalid YAML: expected ',' or '}', but got '<stream end>'",
        ],
    ),
    (
        "field_not_in_entity_named_created",
        BASE + "  name: n\n  created: x\n",
        [
            "{file}:6:3: fields.created: entity 'customer' has no field 'created'; fields: name, name_normalized, short_name, english_name, credit_code, credit_code_as_written, phone, email, website, address, province, city, district, industry, is_branch, parent, owner, status, erp_code, credit_limit, payment_terms",
            "{file}:6:12: fields.created: column 'x' is not in accounts",
        ],
    ),
    (
        "where_and_query",
        "version: 1\nsource: {connector: crm, query: 'select 1', where: 'x=1'}\ntarget: customer\nfields:\n  name: name\n",
        [
            "{file}:2:9: source: 'where' filters a table; put the condition into the query instead",
        ],
    ),
    (
        "bad_timezone",
        "version: 1\nsource: {connector: crm, table: o}\ntarget: opportunity\nfields:\n  name: n\n  customer: c\n  stage: s\n  registered_at: {from: r, transforms: [{parse_datetime: {timezone: Mars/Base}}]}\n",
        [
            "{file}:8:69: fields.registered_at.transforms[0].parse_datetime.timezone: parse_datetime: unknown time zone 'Mars/Base' (use an IANA name such as Asia/Shanghai)",
            "{file}:6:13: fields.customer: column 'c' is not in o",
            "{file}:7:10: fields.stage: column 's' is not in o",
            "{file}:8:25: fields.registered_at.from: column 'r' is not in o",
        ],
    ),
    (
        "bad_unmatched",
        BASE
        + "  name: n\n  status: {from: s, transforms: [{map_values: {values: {a: b}, unmatched: drop}}]}\n",
        [
            "{file}:6:75: fields.status.transforms[0].map_values.unmatched: map_values: 'drop' is not allowed; allowed: keep, null, reject",
            "{file}:6:18: fields.status.from: column 's' is not in accounts",
        ],
    ),
    (
        "convert_on_a_text_field",
        OPP + "  description: {from: n, convert: {currency: cur}}\n",
        [
            "{file}:8:26: fields.description.convert: convert works on amounts; 'description' of opportunity is str"
        ],
    ),
    (
        "convert_operand_column_not_in_source",
        OPP + "  amount: {from: amt, convert: {currency: curr, rate: {from: rates}}}\n",
        [
            "{file}:8:43: fields.amount.convert.currency: column 'curr' is not in o; did you mean 'cur'?",
            "{file}:8:62: fields.amount.convert.rate.from: column 'rates' is not in o; did you mean 'rate'?",
        ],
    ),
    (
        "convert_and_currency_both_mapped",
        OPP + "  amount: {from: amt, convert: {currency: cur, rate: rate}}\n  currency: cur\n",
        [
            "{file}:9:3: fields.currency: 'currency' is filled by convert on 'amount' (the base currency); remove this field"
        ],
    ),
    (
        "convert_direction_without_rate",
        OPP + "  amount: {from: amt, convert: {currency: cur, direction: divide}}\n",
        [
            "{file}:8:48: fields.amount.convert.direction: direction says how to read a rate column; the rates in project.yaml are base-currency units per unit (multiply)"
        ],
    ),
    (
        "convert_rate_and_date",
        OPP + "  amount: {from: amt, convert: {currency: cur, rate: rate, date: day}}\n",
        [
            "{file}:8:60: fields.amount.convert.date: date picks a rate from currencies.dated in project.yaml; this convert reads its rate from rate: give one of the two"
        ],
    ),
    (
        "convert_unknown_key",
        OPP + "  amount: {from: amt, convert: {currency: cur, rat: rate}}\n",
        [
            "{file}:8:48: fields.amount.convert.rat: unknown key 'rat'; did you mean 'rate'?; allowed: base_ids, currency, currency_id, date, direction, profile, rate"
        ],
    ),
    (
        "convert_suitecrm_multiplies",
        OPP
        + "  amount: {from: amt, convert: {profile: suitecrm, currency: cur, rate: rate, direction: multiply}}\n",
        [
            "{file}:8:90: fields.amount.convert.direction: profile: suitecrm divides (SuiteCRM's amount_usdollar = amount / conversion_rate); remove direction"
        ],
    ),
    (
        "convert_without_currency",
        OPP + "  amount: {from: amt, convert: {rate: rate}}\n",
        ["{file}:8:23: fields.amount.convert.currency: missing required key 'currency'"],
    ),
    (
        "convert_operand_unknown_transform",
        OPP + "  amount: {from: amt, convert: {currency: {from: cur, transforms: [trimm]}, rate: rate}}\n",
        [
            "{file}:8:68: fields.amount.convert.currency.transforms[0]: unknown transform 'trimm'; did you mean 'trim'?"
        ],
    ),
    (
        "convert_currency_id_without_base_ids",
        OPP + "  amount: {from: amt, convert: {currency: cur, currency_id: p, rate: rate}}\n",
        [
            "{file}:8:48: fields.amount.convert.currency_id: currency_id is where base_ids are looked for; give base_ids (or profile: suitecrm)"
        ],
    ),
    (
        "header_row",
        "version: 1\nsource: {connector: x, sheet: s, header_row: 0}\ntarget: customer\nfields:\n  name: name\n",
        [
            "{file}:2:46: source.header_row: Input should be greater than or equal to 1",
            "{file}:2:21: source.connector: unknown source 'x'; project sources: crm",  # independent of it
        ],
    ),
    (
        "where_unknown_column",
        "version: 1\nsource: {connector: crm, table: accounts, where: 'delted = 0'}\ntarget: customer\nfields:\n  name: name\n",
        ["{file}:2:51: source.where: unknown column 'delted'; columns: id, name, n, p, amt, cur, rate, day"],
    ),
    (
        "where_not_a_condition",
        "version: 1\nsource: {connector: crm, table: accounts, where: 'n + 1'}\ntarget: customer\nfields:\n  name: name\n",
        [
            "{file}:2:51: source.where: 'n + 1' is a computed value, not a condition (true/false); compare it, e.g. x = 1"
        ],
    ),
    (
        "expr_unknown_function",
        BASE + '  name: {expr: "lowr(name)"}\n',
        [
            "{file}:5:17: fields.name.expr: unknown function 'lowr'; did you mean 'lower'?; functions: lower(s), upper(s), trim(s), ltrim(s), rtrim(s), length(s), substr(s, start[, length]), replace(s, 'from', 'to'), concat(a, b, ...), coalesce(a, b, ...), nullif(a, b), abs(x), round(x[, digits]), cast(x as int|decimal|text|date), current_date, date_add(d, days), datediff(a, b), year(d), month(d), day(d)"
        ],
    ),
    (
        "expr_syntax_error",
        BASE + '  name: {expr: "name ||"}\n',
        [
            "{file}:5:23: fields.name.expr: cannot parse 'name ||': Required keyword: 'expression' missing for <class 'sqlglot.expressions.core.DPipe'>; allowed: operators: = != <> < <= > >=, in (...), not in (...), between a and b, is null, is not null, like / not like ('%', '_'), and or not, + - * / %, || (concatenate), case when ... then ... else ... end; functions: lower(s), upper(s), trim(s), ltrim(s), rtrim(s), length(s), substr(s, start[, length]), replace(s, 'from', 'to'), concat(a, b, ...), coalesce(a, b, ...), nullif(a, b), abs(x), round(x[, digits]), cast(x as int|decimal|text|date), current_date, date_add(d, days), datediff(a, b), year(d), month(d), day(d)"
        ],
    ),
    (
        "expr_type_mismatch",
        BASE + '  name: {expr: "upper(name) * 2"}\n',
        ["{file}:5:17: fields.name.expr: type mismatch: mul needs number, got text (UPPER(name))"],
    ),
    (
        "when_unknown_column_and_else_first",
        BASE + "  name: n\n  status: {when: [{else: x}, {if: 'stat = 1', then: y}]}\n",
        [
            "{file}:6:19: fields.status.when[0]: 'else' must be the last branch of 'when'",
            "{file}:6:36: fields.status.when[1].if: unknown column 'stat'; columns: id, name, n, p, amt, cur, rate, day",
        ],
    ),
    (
        "when_branch_shape",
        BASE + "  name: n\n  status: {when: [{if: 'n = 1'}]}\n",
        [
            "{file}:6:19: fields.status.when[0]: a branch is {if: condition, then: value} (or the last one: {else: value})"
        ],
    ),
    (
        "lookup_table_missing",
        BASE + "  name: n\n  industry: {from: p, lookup: {table: currency, key: id, value: rate}}\n",
        [
            "{file}:6:39: fields.industry.lookup.table: table 'currency' does not exist; tables: currencies, links"
        ],
    ),
    (
        "lookup_both_kinds",
        BASE + "  name: n\n  owner: {from: p, lookup: {by: name, table: links, key: a, value: b}}\n",
        [
            "{file}:6:28: fields.owner.lookup: 'by' finds a core record, 'table' looks up in the source: use one; to do both, follow the table with 'via' and keep 'lookup: {by: ...}'"
        ],
    ),
    (
        "link_table_without_columns",
        BASE
        + "  name: n\n  owner:\n    from: id\n    via: {table: links, from: acount_id, to: user, where: 'deleted = 0'}\n",
        [
            "{file}:8:31: fields.owner.via.from: column 'acount_id' is not in links; did you mean 'account_id'?; columns: account_id, user_id, deleted",
            "{file}:8:46: fields.owner.via.to: column 'user' is not in links; did you mean 'user_id'?; columns: account_id, user_id, deleted",
        ],
    ),
    (
        "link_where_unknown_column",
        BASE
        + "  name: n\n  owner: {from: id, via: {table: links, from: account_id, to: user_id, where: 'removed = 0'}}\n",
        [
            "{file}:6:80: fields.owner.via.where: unknown column 'removed'; columns: account_id, user_id, deleted"
        ],
    ),
    (
        "aggregate_without_value",
        BASE
        + "  name: n\n  industry: {from: id, aggregate: {table: links, key: account_id, function: sum}}\n",
        ["{file}:6:35: fields.industry.aggregate: 'sum' needs 'value': the child column to summarise"],
    ),
    (
        "join_without_from",
        BASE + "  name: n\n  industry: {expr: 'n', via: {table: links, from: account_id, to: user_id}}\n",
        [
            "{file}:6:13: fields.industry: 'via' needs 'from': the one column of this table whose value is looked up"
        ],
    ),
    (
        "two_value_sources_and_two_joins",  # both at once: fixing one must not reveal the other
        BASE
        + "  name: n\n  industry: {from: n, const: x, via: {table: links, from: account_id, to: user_id}, "
        "aggregate: {table: links, key: account_id, function: count}}\n",
        [
            "{file}:6:13: fields.industry: give only one of 'from', 'const', 'expr' or 'when', not from and const; "
            "give only one of via and aggregate; chain link tables as a list under 'via'"
        ],
    ),
    (
        "area_code_from_unknown_field",
        "version: 1\nsource: {connector: crm, table: accounts, key: id}\ntarget: customer\nfields:\n  name: name\n  phone: {from: p, transforms: [phone], area_code_from: town}\n",
        [
            "{file}:6:57: fields.phone.area_code_from: area_code_from names another field of this mapping holding the city; fields: name"
        ],
    ),
    (
        "area_code_from_without_phone",
        "version: 1\nsource: {connector: crm, table: accounts, key: id}\ntarget: customer\nfields:\n  name: name\n  city: n\n  phone: {from: p, area_code_from: city}\n",
        [
            "{file}:7:36: fields.phone.area_code_from: area_code_from completes phone numbers: 'phone' needs the phone transform"
        ],
    ),
    (
        "area_code_from_another_region",
        "version: 1\nsource: {connector: crm, table: accounts, key: id}\ntarget: customer\nfields:\n  name: name\n  city: n\n  phone: {from: p, transforms: [{phone: {region: US}}], area_code_from: city}\n",
        [
            "{file}:7:73: fields.phone.area_code_from: area_code_from takes Chinese area codes: the phone transform's region must be CN"
        ],
    ),
    (
        "area_code_from_beside_an_invalid_phone_step",  # the step's own problem, not "needs the phone transform"
        "version: 1\nsource: {connector: crm, table: accounts, key: id}\ntarget: customer\nfields:\n  name: name\n  city: n\n  phone: {from: p, transforms: [{phone: {region: XX}}], area_code_from: city}\n",
        [
            "{file}:7:50: fields.phone.transforms[0].phone.region: phone: unknown region 'XX' (use a two-letter country code such as CN)"
        ],
    ),
    (
        "hash_key_unknown_column",
        "version: 1\nsource: {connector: crm, table: accounts, key: {hash: [name, phone]}}\ntarget: customer\nfields:\n  name: name\n",
        ["{file}:2:62: source.key.hash[1]: column 'phone' is not in accounts"],
    ),
]


@pytest.mark.parametrize(("name", "text", "expected"), CASES, ids=[c[0] for c in CASES])
def test_invalid_mapping_reports_every_problem_with_its_location(
    tmp_path: Path, name: str, text: str, expected: list[str]
) -> None:
    file = tmp_path / f"{name}.yaml"
    file.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_mapping(file, sources=SOURCE_COLUMNS, tables=other_table)
    assert [str(p) for p in caught.value.problems] == [e.replace("{file}", str(file)) for e in expected]


def test_the_table_covers_at_least_25_invalid_specs() -> None:
    assert len({name for name, _, _ in CASES}) >= 25


def test_committed_json_schema_is_current() -> None:
    from integration.mappings.spec import json_schema

    committed = (
        Path(__file__).resolve().parents[1] / "integration" / "mappings" / "mapping.schema.json"
    ).read_text(encoding="utf-8")
    assert committed == json_schema(), "run `make schema` and commit integration/mappings/mapping.schema.json"


def test_short_and_long_field_forms_are_equivalent(tmp_path: Path) -> None:
    short = tmp_path / "short.yaml"
    short.write_text(BASE + "  name: name\n", encoding="utf-8")
    long = tmp_path / "long.yaml"
    long.write_text(BASE + "  name: {from: name}\n", encoding="utf-8")
    assert load_mapping(short).fields[0].spec == load_mapping(long).fields[0].spec


def test_independent_problems_of_a_mapping_are_reported_in_one_pass(tmp_path: Path) -> None:
    """A bad key under source: does not hide a bad transform argument or an unknown field elsewhere."""
    file = tmp_path / "opportunities.yaml"
    file.write_text(
        "version: 1\n"
        'source: {connector: crm, sheet: 商机, key: id, filter: "x"}\n'
        "target: opportunity\n"
        "fields:\n"
        "  customer: {from: p, lookup: {by: name}}\n"
        "  name: n\n"
        "  stage: {from: n, transforms: [{stage: {map: {a: b}}}]}\n"
        "  stagee: n\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as caught:
        load_mapping(file, sources=SOURCE_COLUMNS, tables=other_table)
    assert [str(p) for p in caught.value.problems] == [
        f"{file}:2:46: source.filter: unknown key 'filter'; allowed: connector, header_row, incremental, key, "
        "lookups, query, sheet, system, table, where",
        f"{file}:7:42: fields.stage.transforms[0].stage.map: stage: unknown key 'map'; 'stage' takes no arguments (write just stage)",
        f"{file}:8:3: fields.stagee: entity 'opportunity' has no field 'stagee'; did you mean 'stage'?; fields: "
        + ", ".join(ENTITIES["opportunity"].fields),
    ]


def test_a_problem_inside_an_invalid_field_or_target_hides_only_what_depends_on_it(tmp_path: Path) -> None:
    """An invalid field is left out (not reported as unmapped); an invalid target skips entity checks only."""
    file = tmp_path / "customers.yaml"
    file.write_text(
        "version: 1\n"
        "source: {connector: crm, table: accounts, key: id}\n"
        "target: custommer\n"
        "fields:\n"
        "  name: {from: name, requird: true}\n"
        "  phone: {from: p, transforms: [trimm]}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as caught:
        load_mapping(file, sources=SOURCE_COLUMNS, tables=other_table)
    messages = [str(p) for p in caught.value.problems]
    assert [m.split(": ")[1] for m in messages] == [
        "target",
        "fields.name.requird",
        "fields.phone.transforms[0]",
    ]
    assert (
        messages[2]
        == f"{file}:6:33: fields.phone.transforms[0]: unknown transform 'trimm'; did you mean 'trim'?"
    )


def test_the_caret_is_padded_by_display_width(tmp_path: Path) -> None:
    """Wide (CJK) characters take two terminal cells; a tab stays a tab, so the caret lines up under it."""
    file = tmp_path / "m.yaml"
    line = 'source: {connector: x,\tsheet: 商机, key: 商机编号, filter: "x"}'
    file.write_text(line + "\n", encoding="utf-8")
    column = line.index("filter") + 1
    rendered = Problem("unknown key 'filter'", file, 1, column).render().splitlines()
    assert rendered[0].startswith(f"{file}:1:{column}: ")  # the column counts characters, as editors do
    assert rendered[1:] == [f"    {line}", "    " + " " * 22 + "\t" + " " * (column - 24 + 6) + "^"]


def test_every_independent_problem_of_one_field_is_reported_in_one_pass(tmp_path: Path) -> None:
    """Fixing one problem of a field must not reveal the next: an unknown field name does not hide its
    unknown transform, a bad lookup option does not hide its unknown column or transform, and a field
    giving both 'from' and 'const' still has its transforms checked."""
    file = tmp_path / "customers.yaml"
    file.write_text(
        BASE + "  name: name\n"
        "  nmae: {from: n, transforms: [trimm]}\n"
        "  owner: {from: assigned_usr, transforms: [upperr], lookup: {by: nmae}}\n"
        "  phone: {from: p, const: x, transforms: [phonee]}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as caught:
        load_mapping(file, sources=SOURCE_COLUMNS, tables=other_table)
    messages = [str(p) for p in caught.value.problems]
    fields = ", ".join(ENTITIES["customer"].fields)
    assert messages == [
        f"{file}:7:66: fields.owner.lookup.by: 'nmae' is not allowed; did you mean 'name'?; allowed: external_id, name, code, id",
        f"{file}:8:10: fields.phone: give only one of 'from', 'const', 'expr' or 'when', not from and const",
        f"{file}:6:3: fields.nmae: entity 'customer' has no field 'nmae'; did you mean 'name'?; fields: {fields}",
        f"{file}:6:32: fields.nmae.transforms[0]: unknown transform 'trimm'; did you mean 'trim'?",
        f"{file}:7:44: fields.owner.transforms[0]: unknown transform 'upperr'; did you mean 'upper'?",
        f"{file}:8:43: fields.phone.transforms[0]: unknown transform 'phonee'; did you mean 'phone'?",
        f"{file}:7:17: fields.owner.from: column 'assigned_usr' is not in accounts",
    ], "\n".join(messages)


def test_nothing_inside_a_field_that_is_not_a_mapping_is_checked(tmp_path: Path) -> None:
    """A field entry that is a list cannot be read at all: its own problem only (its name is still checked)."""
    file = tmp_path / "customers.yaml"
    file.write_text(BASE + "  name: name\n  nmae: [trimm]\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_mapping(file, sources=SOURCE_COLUMNS, tables=other_table)
    messages = [p.message for p in caught.value.problems]
    assert [p.path for p in caught.value.problems] == ["fields.nmae", "fields.nmae"], messages
    assert messages[0] == "Input should be a valid dictionary or instance of FieldSpec"
    assert messages[1].startswith("entity 'customer' has no field 'nmae'; did you mean 'name'?")


def test_a_misspelt_source_key_does_not_hide_the_columns_of_the_fields(tmp_path: Path) -> None:
    """The table and the source are known: the fields' columns are checked beside the bad key; a source
    whose table is in doubt (table and sheet) leaves them unchecked."""
    file = tmp_path / "customers.yaml"
    text = BASE.replace("key: id}", 'key: id, filtre: "deleted = 0"}') + "  name: nmae\n"
    file.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_mapping(file, sources=SOURCE_COLUMNS, tables=other_table)
    assert [str(p).split(": ", 1)[1] for p in caught.value.problems] == [
        "source.filtre: unknown key 'filtre'; allowed: connector, header_row, incremental, "
        "key, lookups, query, sheet, system, table, where",
        "fields.name: column 'nmae' is not in accounts; did you mean 'name'?",
    ]
    file.write_text(text.replace("table: accounts", "table: accounts, sheet: s"), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_mapping(file, sources=SOURCE_COLUMNS, tables=other_table)
    assert [p.path for p in caught.value.problems] == ["source.filtre"]


def test_a_bad_key_does_not_hide_that_the_field_gives_no_value(tmp_path: Path) -> None:
    """The shape of the field's valid keys is checked too; not when a key it combines is the invalid one."""
    file = tmp_path / "customers.yaml"
    file.write_text(
        BASE + "  name: {transforms: [trimm], on_error: nope}\n  phone: {from: [p, 5], const: x}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as caught:
        load_mapping(file, sources=SOURCE_COLUMNS, tables=other_table)
    assert [str(p) for p in caught.value.problems if not p.path.startswith("fields.phone")] == [
        f"{file}:5:41: fields.name.on_error: 'nope' is not allowed; allowed: reject, null, fail",
        f"{file}:5:9: fields.name: give 'from' (a source column), 'const', 'expr', 'when' or 'default'",
        f"{file}:5:23: fields.name.transforms[0]: unknown transform 'trimm'; did you mean 'trim'?",
    ]
    assert {p.path for p in caught.value.problems if p.path.startswith("fields.phone")} == {
        "fields.phone.from",
        "fields.phone.from[1]",
    }, "with 'from' invalid, 'const' beside it is not said to be a second value"
