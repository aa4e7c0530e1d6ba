"""Write a starter mapping from a source's real columns, guessing fields from Chinese and English headers."""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from crm_core.entities import ENTITIES
from crm_core.errors import ConfigError, Problem
from integration.mappings.profiles import SystemProfile, spec_columns, spec_tables

# Normalized header -> canonical field. Headers are compared NFKC + case-folded, without spaces/_/-.
FIELD_SYNONYMS: dict[str, list[str]] = {
    "name": ["name", "名称", "客户名称", "公司名称", "企业名称", "单位名称", "ccusname", "accountname", "商机名称",
             "项目名称", "姓名", "联系人", "cpersonname", "opportunityname"],
    "short_name": ["简称", "客户简称", "ccusabbname", "shortname"],
    "english_name": ["英文名称", "englishname"],
    "credit_code": ["统一社会信用代码", "社会信用代码", "信用代码", "税号", "纳税人识别号", "ccusregcode", "siccode", "uscc",
                    "creditcode", "taxid"],
    "phone": ["电话", "办公电话", "座机", "联系电话", "公司电话", "固定电话", "phone", "phoneoffice", "ccusphone", "tel", "telephone", "phonework"],
    "mobile": ["手机", "手机号", "手机号码", "联系手机", "移动电话", "mobile", "phonemobile", "ccushand", "cellphone"],
    "email": ["邮箱", "电子邮件", "email", "email1", "emailaddress", "ccusemail", "e-mail"],
    "website": ["网址", "网站", "website", "url"],
    "address": ["地址", "详细地址", "address", "ccusaddress", "billingaddressstreet", "primaryaddressstreet"],
    "province": ["省", "省份", "billingaddressstate", "province", "state"],
    "city": ["市", "城市", "billingaddresscity", "city"],
    "district": ["区", "区县", "district"],
    "industry": ["行业", "所属行业", "industry"],
    "title": ["职务", "职位", "title"],
    "department": ["部门", "department"],
    "code": ["工号", "员工编号", "cpersoncode", "username", "code"],
    "owner": ["负责人", "销售", "销售员", "业务员", "专管业务员", "客户经理", "owner", "assigneduserid", "ccusperson_code",
              "ccuspperson", "cpersoncode_owner"],
    "customer": ["客户", "所属客户", "accountid", "customer", "customerid"],
    "parent": ["上级客户", "总公司", "母公司", "ccusheadcode", "parentid"],
    "amount": ["金额", "预计金额", "合同金额", "商机金额", "amount", "isum", "money"],
    "stage": ["阶段", "销售阶段", "商机阶段", "salesstage", "stage"],
    "probability": ["赢率", "概率", "probability"],
    "expected_close_date": ["预计成交日期", "预计签约日期", "预计结单日期", "dateclosed", "closedate", "expectedclosedate"],
    "registered_at": ["报备日期", "报备时间", "registeredat"],
    "registered_by": ["报备人", "registeredby"],
    "lead_source": ["来源", "线索来源", "leadsource"],
    "description": ["备注", "说明", "描述", "description", "cmemo", "memo", "remark"],
    "order_no": ["订单号", "订单编号", "单据号", "csocode", "orderno"],
    "order_date": ["订单日期", "单据日期", "ddate", "orderdate"],
    "currency": ["币种", "币别", "cexchname", "currency", "currencyid"],
    "quantity": ["数量", "iquantity", "quantity", "qty"],
    "unit_price": ["单价", "含税单价", "itaxunitprice", "unitprice", "price"],
    "product_code": ["存货编码", "产品编码", "物料编码", "cinvcode", "productcode", "sku"],
    "product_name": ["存货名称", "产品名称", "物料名称", "cinvname", "productname"],
    "line_no": ["行号", "irowno", "lineno"],
    "tax_rate": ["税率", "itaxrate", "taxrate"],
}  # fmt: skip
# Columns that mark soft-deleted rows (header_key form): the scaffold suggests a where filter on them.
SOFT_DELETE_COLUMNS = ("deleted", "isdeleted", "是否删除", "删除标记")
KEY_SYNONYMS = [
    "id",
    "code",
    "编号",
    "编码",
    "客户编码",
    "客户编号",
    "商机编号",
    "ccuscode",
    "csocode",
    "autoid",
    "cpersoncode",
    "序号",
]
TARGET_HINTS: list[tuple[str, str]] = [
    (r"opportunit|商机|项目|deal", "opportunity"),
    (r"contact|联系人", "contact"),
    (r"sodetail|订单明细|orderline|明细", "sales_order_line"),
    (r"somain|订单|order", "sales_order"),
    (r"user|person|业务员|销售员|员工", "sales_rep"),
    (r"account|customer|客户", "customer"),
]
TRANSFORMS: dict[str, dict[str, Any]] = {
    "credit_code": {"transforms": ["uscc"], "on_error": "null"},
    "phone": {"transforms": ["phone"], "on_error": "null"},
    "mobile": {"transforms": ["phone"], "on_error": "null"},
    "email": {"transforms": ["email"], "on_error": "null"},
    "amount": {"transforms": ["parse_amount"]},
    "unit_price": {"transforms": ["parse_amount"]},
    "quantity": {"transforms": ["parse_amount"]},
    "tax_rate": {"transforms": [{"parse_amount": {"multiply": 0.01}}]},
    "stage": {"transforms": ["stage"]},
    "expected_close_date": {"transforms": ["parse_date"]},
    "order_date": {"transforms": ["parse_date"]},
    "registered_at": {"transforms": [{"parse_datetime": {"timezone": "Asia/Shanghai"}}]},
    "currency": {"transforms": ["currency"], "default": "CNY"},
    "website": {"transforms": ["trim", "lower"]},
    "description": {"transforms": ["trim"]},
}


SCHEMA_FILE = Path(__file__).with_name("mapping.schema.json")


def schema_reference(folder: Path | None) -> str:
    """Return the path of the mapping schema as a mapping file in ``folder`` refers to it (relative when it can)."""
    if folder is None:
        return "../../../integration/mappings/mapping.schema.json"
    try:
        return Path(os.path.relpath(SCHEMA_FILE.resolve(), folder.resolve())).as_posix()
    except ValueError:  # another drive (Windows): no relative path exists
        return SCHEMA_FILE.resolve().as_posix()


def header_key(header: str) -> str:
    """Return the comparison form of a header: NFKC, case-folded, without spaces, underscores and dashes."""
    return re.sub(r"[\s_\-./（）()]", "", unicodedata.normalize("NFKC", header).casefold())


def guess_target(table: str) -> str:
    """Guess the entity a table or sheet holds from its name (accounts → customer, 商机 → opportunity)."""
    key = header_key(table)
    for pattern, entity in TARGET_HINTS:
        if re.search(pattern, key):
            return entity
    return "customer"


# Headers that name a company: the record's own name on a customer sheet, its customer's elsewhere.
COMPANY_NAME_HEADERS = {
    "客户名称",
    "公司名称",
    "企业名称",
    "单位名称",
    "客户名",
    "公司名",
    "客户",
    "公司",
    "企业",
    "单位",
    "ccusname",
    "accountname",
    "company",
    "companyname",
    "customername",
}
# Headers that name a *customer*: the record's own name on a customer sheet, a reference elsewhere.
CUSTOMER_NAME_HEADERS = COMPANY_NAME_HEADERS | {"ccuscode", "accountid"}


def guess_fields(columns: list[str], target: str) -> tuple[dict[str, str], list[str]]:
    """Return ``field -> column`` for the columns that look like a target field, and the columns left over."""
    fields = ENTITIES[target].fields
    chosen: dict[str, str] = {}
    if target != "customer" and "customer" in fields:
        for column in columns:  # in an opportunity sheet, 客户名称 names the customer, not the record
            if header_key(column) in CUSTOMER_NAME_HEADERS:
                chosen["customer"] = column
                break
    elif target == "customer":
        # A customer sheet's name is its company column: a full header (客户名称) before a short one (公司),
        # and either before a person's (联系人 is the contact, not the customer).
        keys = [header_key(c) for c in columns]
        for tier in (COMPANY_NAME_HEADERS & set(FIELD_SYNONYMS["name"]), COMPANY_NAME_HEADERS):
            company = next((c for c, k in zip(columns, keys, strict=True) if k in tier), None)
            if company is not None:
                chosen["name"] = company
                break
    for column in columns:
        key = header_key(column)
        if column in chosen.values():
            continue
        for field, synonyms in FIELD_SYNONYMS.items():
            if field in fields and field not in chosen and key in synonyms:
                chosen[field] = column
                break
    used = set(chosen.values())
    return chosen, [c for c in columns if c not in used]


_CJK = re.compile(r"[\u4e00-\u9fff]")
_WORDS = re.compile(r"^[^\W\d_]+(?:[ .'-][^\W\d_]+)+$")  # Wang Fang, Li Na (no digit anywhere)


def _names_people_write(values: Sequence[Any]) -> bool | None:
    """Whether a reference column's values are names (李明, Wang Fang) rather than keys (U001, 42, a uuid):
    None when the sample holds no value to tell."""
    texts = list(dict.fromkeys(str(v).strip() for v in values if v is not None and str(v).strip()))[:50]
    if not texts:
        return None
    named = sum(1 for t in texts if _CJK.search(t) or _WORDS.match(t))
    return named * 2 > len(texts)


def _field_spec(field: str, column: str, target: str, sample: Sequence[Any] = ()) -> dict[str, Any] | str:
    definition = ENTITIES[target].fields[field]
    spec: dict[str, Any] = {"from": column}
    if definition.references:
        # What the column holds decides (an `owner` column of 李明, 王芳 names its rep); the header only
        # when no row says
        by_name = _names_people_write(sample)
        if by_name is None:
            by_name = bool(
                re.search(r"名称|负责人|销售|业务员|name", column, re.IGNORECASE)
            ) and not column.lower().endswith("id")
        spec["lookup"] = {"by": "name" if by_name else "external_id"}
    elif field == "name":
        spec["transforms"] = ["company_name"] if target == "customer" else ["trim"]
    elif field in ("province", "city", "district") and header_key(column) in FIELD_SYNONYMS["address"]:
        spec["transforms"] = [{"address_part": {"part": field}}]
    else:
        spec.update(TRANSFORMS.get(field, {}))
    if definition.required:
        spec["required"] = True
    return spec


def scaffold(
    source: str,
    table: str,
    columns: list[str],
    *,
    target: str | None = None,
    sheet: bool = False,
    profile: SystemProfile | None = None,
    tables: list[str] | None = None,
    folder: Path | None = None,
    samples: Mapping[str, Sequence[Any]] | None = None,
) -> str:
    """Return the YAML text of a starter mapping for ``source.table`` with its real ``columns``.

    ``samples``: some rows' values per column (the first rows of the source), which tell whether a
    reference column names its record or holds its key.

    ``folder`` is where the file will live: its editor-schema comment points from there to this toolkit's
    ``mapping.schema.json`` (without it, from a project folder's ``mappings/`` inside this repository).

    With a ``profile`` (see :mod:`integration.mappings.profiles`) the table's known key, filter, link
    tables, lookups and value maps replace the guesses, as far as the columns and ``tables`` exist.
    A table the profile reads through another table's mapping (a link table) is refused: ConfigError.
    """
    known = profile.table(table) if profile else None
    if known is not None and known.read_through:
        raise ConfigError(
            Problem(
                f"{table} is {known.read_through}; it is not mapped on its own ({profile.title if profile else ''})"
            )
        )
    entity = target or (known.target if known else guess_target(table))
    if known is not None and known.target != entity:
        known = None  # a different target than the profile's: the profile's fields do not apply
    fields, leftover = guess_fields(columns, entity)
    address = fields.get("address")
    if address is not None:
        # A whole address in one column is also where the record's place is: city, province and district
        # are read from it (address_part) unless a column of their own holds them. Matching weighs the city.
        for part in ("province", "city", "district"):
            if part in ENTITIES[entity].fields and part not in fields:
                fields[part] = address
    key = next((c for c in columns if header_key(c) in KEY_SYNONYMS), None)
    specs: dict[str, Any] = {
        field: _field_spec(field, column, entity, (samples or {}).get(column, ()))
        for field, column in fields.items()
    }
    source_spec: dict[str, Any] = {"connector": source, "sheet" if sheet else "table": table}
    comments: dict[str, tuple[str, ...]] = {}
    skipped: list[str] = []
    if known is not None:
        present = _Presence(columns, tables)
        key = present.column(known.key) or key
        if known.where and all(present.column(c) for c in known.where_columns):
            source_spec["where"] = known.where
        lookups = {}
        for name, spec in known.lookups.items():
            if present.fits(spec):
                lookups[name] = present.spelled(spec)
            else:
                skipped.append(f"source.lookups.{name}")
        written = []
        for name, spec in known.fields.items():
            if not present.fits(spec, extra=set(lookups)):
                skipped.append(name)
                continue
            specs[name] = present.spelled(spec)
            written.append(name)
            if ENTITIES[entity].fields[name].required:
                specs[name]["required"] = True
        for name, by in known.drop.items():
            if by in written:
                specs.pop(name, None)
            elif name in known.fallbacks and present.fits(known.fallbacks[name]):
                specs[name] = present.spelled(known.fallbacks[name])
                written.append(name)
        if key:
            source_spec["key"] = key
        if lookups:
            source_spec["lookups"] = lookups
        comments = {name: lines for name, lines in known.comments.items() if name == "" or name in written}
        used = {c for spec in specs.values() if isinstance(spec, dict) for c in spec_columns(spec)}
        leftover = [c for c in columns if c not in used]
    elif key:
        source_spec["key"] = key
    elif sheet and "name" in fields:
        # A sheet without an id column: a hash of the name and an identifier stays put when rows are
        # inserted (row positions do not); which columns identify a record is a judgment call.
        identifier = next(
            (fields[f] for f in ("credit_code", "code", "phone", "mobile", "email") if f in fields), None
        )
        source_spec["key"] = {"hash": [fields["name"], *([identifier] if identifier else [])]}
        key = fields["name"]
    code = specs.get("credit_code")
    if (
        entity == "customer"
        and isinstance(code, dict)
        and code.get("from")
        and "credit_code_as_written" not in specs
    ):
        # uscc empties a damaged, old-style or cut code; linkage still compares it as written
        specs["credit_code_as_written"] = {"from": code["from"], "transforms": ["uscc_as_written"]}
    phone = specs.get("phone")
    if (
        isinstance(phone, dict)
        and "city" in specs
        and "phone" in phone.get("transforms", [])
        and "area_code_from" not in phone
    ):
        phone["area_code_from"] = "city"  # a local number written without its area code takes the city's
    body = {
        "version": 1,
        "description": f"{source}.{table} → {entity} (scaffolded: review every field)",
        "source": source_spec,
        "target": entity,
        "fields": specs,
    }
    text = f"# yaml-language-server: $schema={schema_reference(folder)}\n"
    if profile is not None and known is not None:
        recognised = tables is not None and profile.signature <= {t.casefold() for t in tables}
        how = (
            f"recognised by its tables {', '.join(sorted(profile.signature))}"
            if recognised
            else "chosen with --profile"
        )
        text += (
            f"# profile: {profile.title} ({how});\n"
            "# what it knows about this table is filled in below, with a comment where it is a judgment call.\n"
        )
    dumped = yaml.safe_dump(body, allow_unicode=True, sort_keys=False, default_flow_style=None, width=110)
    text += _with_comments(dumped, comments)
    missing = [f.name for f in ENTITIES[entity].fields.values() if f.required and f.name not in specs]
    for name in missing:
        text += f"  # TODO {name}: {{from: ???}}  (required: map it before running)\n"
    if isinstance(source_spec.get("key"), dict):
        text += (
            "# source.key hashes the columns that identify a record (no id column in this sheet): check that\n"
            "# they do; two rows with the same values are reported as duplicate keys, not merged; a correction in\n"
            "# one of them changes the row's key: a fix sheet files the row under both, but a source row corrected\n"
            "# otherwise than its fix sheet loads as another record (README: Re-importing the rows to fix)\n"
        )
    elif not key:
        text += (
            "# TODO source.key: the column(s) that identify a record; without it rows are keyed by position\n"
        )
    for name in skipped:
        text += f"# profile: {name} left out (a column or table it reads is not in this source)\n"
    leftover = [c for c in leftover if c != key]
    if leftover:
        text += f"# unmapped source columns: {', '.join(leftover)}\n"
    deleted = next((c for c in leftover if header_key(c) in SOFT_DELETE_COLUMNS), None)
    if deleted and "where" not in source_spec:
        text += (
            f'# {deleted}: soft-deleted rows? `where: "{deleted} = 0"` in source reads only the live ones\n'
        )
    if entity == "opportunity" and "stage" in specs and "closed_on" not in specs:
        text += (
            "# closed_on is not mapped: a won deal loads without its close date (the rule\n"
            "# opportunity.closed_on.required_when_won checks only a mapped closed_on)\n"
        )
    return text


def _with_comments(dumped: str, comments: dict[str, tuple[str, ...]]) -> str:
    """Insert comment lines above ``source:`` (key "") and above each named field of a dumped mapping."""
    if not comments:
        return dumped
    lines = []
    for line in dumped.splitlines(keepends=True):
        name = (
            "" if line.startswith("source:") else line[2:].split(":", 1)[0] if line.startswith("  ") else None
        )
        if name is not None and not line.startswith("   ") and name in comments:
            indent = "" if name == "" else "  "
            lines += [f"{indent}# {comment}\n" for comment in comments[name]]
        lines.append(line)
    return "".join(lines)


class _Presence:
    """Which columns of the table and which tables of the source exist (tables unknown: all do)."""

    def __init__(self, columns: list[str], tables: list[str] | None) -> None:
        self.columns = {c.casefold(): c for c in columns}
        self.tables = {t.casefold() for t in tables} if tables else None

    def column(self, name: str | None) -> str | None:
        """Return the real spelling of column ``name`` (any case), or None."""
        return self.columns.get(name.casefold()) if name else None

    def fits(self, spec: dict[str, Any], extra: set[str] | None = None) -> bool:
        """True when every column and table ``spec`` reads exists (``extra``: named source lookups)."""
        columns_ok = all(self.column(c) or c in (extra or set()) for c in spec_columns(spec))
        tables_ok = self.tables is None or all(t.casefold() in self.tables for t in spec_tables(spec))
        return columns_ok and tables_ok

    def spelled(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Return ``spec`` with its ``from`` column(s) spelled as in the source."""
        spec = dict(spec)
        source = spec.get("from")
        if isinstance(source, list):
            spec["from"] = [self.column(c) or c for c in source]
        elif isinstance(source, str):
            spec["from"] = self.column(source) or source
        return spec
