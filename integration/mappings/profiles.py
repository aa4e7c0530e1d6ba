"""What ``crmi mapping scaffold`` knows about common source systems: SuiteCRM/SugarCRM CE, Yonyou U8 and
Kingdee K3Cloud databases, recognised by their table names.

A profile says, per table, what a consultant would otherwise look up: the entity it holds, its real key
(U8 orders are keyed by ``cSOCode``, which their lines reference, not by ``ID``), the soft-delete or
approval filter (SuiteCRM ``deleted = 0``), the link tables to follow (an opportunity's account through
``accounts_opportunities``), the tables to look values up in (SuiteCRM ``currencies``, where ``-99`` is
the base currency; Kingdee's ``_L`` name tables), and value maps (sales stages, order statuses), with a
comment where the mapping is a judgment call.

Profiles write the mapping constructs of issue 15 (``where`` expressions, ``when``, source-side
``lookup: {table, key, value}``, ``via`` link tables, ``aggregate``, ``source.lookups`` and
``convert``), exactly as documented for mapping files. Each field a profile writes is used only when
the columns and tables it names exist in the real source.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# ``stage`` transform vocabulary: SuiteCRM's sales_stage dropdown (sales_stage_dom) → our stage codes.
SUITECRM_STAGES: dict[str, str] = {
    "Prospecting": "initial_contact",
    "Qualification": "initial_contact",
    "Needs Analysis": "needs_analysis",
    "Value Proposition": "needs_analysis",
    "Id. Decision Makers": "needs_analysis",
    "Perception Analysis": "proposal",
    "Proposal/Price Quote": "proposal",
    "Negotiation/Review": "negotiation",
    "Closed Won": "won",
    "Closed Lost": "lost",
}
SUITECRM_STAGE_JUDGMENT = ("Qualification", "Value Proposition", "Id. Decision Makers", "Perception Analysis")


@dataclass(frozen=True)
class TableProfile:
    """What a profile knows about one table: target, key, filter, and the fields it writes itself."""

    target: str
    key: str | None = None
    where: str | None = None  # columns named in it must exist
    where_columns: tuple[str, ...] = ()
    lookups: dict[str, dict[str, Any]] = field(default_factory=dict)  # source.lookups
    fields: dict[str, dict[str, Any]] = field(default_factory=dict)  # field -> spec (replaces a guess)
    drop: dict[str, str] = field(default_factory=dict)  # guessed field -> the profile field replacing it
    fallbacks: dict[str, dict[str, Any]] = field(default_factory=dict)  # when a field cannot be written
    comments: dict[str, tuple[str, ...]] = field(default_factory=dict)  # field ("" = source) -> lines
    # a table read through another table's mapping (link, name, currency, line-amount tables): why
    read_through: str | None = None


@dataclass(frozen=True)
class SystemProfile:
    """A source system: the tables that identify it and what is known about each table."""

    name: str
    title: str
    signature: frozenset[str]  # case-folded table names that must all exist
    tables: dict[str, TableProfile]  # by case-folded table name

    def table(self, name: str) -> TableProfile | None:
        """Return what the profile knows about ``name`` (any case), if anything."""
        return self.tables.get(name.casefold())


def _via(table: str, source: str, target: str, where: str | None = None) -> dict[str, Any]:
    hop: dict[str, Any] = {"table": table, "from": source, "to": target}
    if where:
        hop["where"] = where
    return hop


def _address_parts(column: str) -> dict[str, dict[str, Any]]:
    """Province, city and district out of an address column (suffixes or not: see ``address_part``)."""
    return {
        part: {"from": column, "transforms": [{"address_part": {"part": part}}]}
        for part in ("province", "city", "district")
    }


def _lookup(table: str, key: str, value: str, where: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"table": table, "key": key, "value": value}
    if where:
        spec["where"] = where
    return spec


# SuiteCRM people (users, contacts): Chinese names family name first, no space (张 + 伟 → 张伟).
_SUITECRM_PERSON_NAME = {
    "from": ["last_name", "first_name"],
    "combine": "concat",
    "sep": "",
    "required": True,
}

SUITECRM = SystemProfile(
    name="suitecrm",
    title="SuiteCRM / SugarCRM CE",
    signature=frozenset({"accounts", "opportunities", "accounts_opportunities", "users"}),
    tables={
        "users": TableProfile(
            target="sales_rep",
            key="id",
            where="deleted = 0",
            where_columns=("deleted",),
            fields={
                "name": _SUITECRM_PERSON_NAME,
                "code": {"from": "user_name", "transforms": ["trim"]},
                "email": {"from": "email1", "transforms": ["email"], "on_error": "null"},
                "active": {
                    "from": "status",
                    "transforms": [{"map_values": {"values": {"Active": "Y", "Inactive": "N"}}}, "bool"],
                },
            },
            comments={"name": ("Chinese names: family name first, no space (张 + 伟 → 张伟).",)},
        ),
        "accounts": TableProfile(
            target="customer",
            key="id",
            where="deleted = 0",
            where_columns=("deleted",),
            fields={
                "parent": {"from": "parent_id", "lookup": {"by": "external_id"}},
                "owner": {"from": "assigned_user_id", "lookup": {"by": "external_id"}},
            },
            comments={
                "": ("SuiteCRM soft-deletes: deleted = 1 rows are gone for its users, so they stay out.",)
            },
        ),
        "contacts": TableProfile(
            target="contact",
            key="id",
            where="deleted = 0",
            where_columns=("deleted",),
            fields={
                "name": _SUITECRM_PERSON_NAME,
                "customer": {
                    "from": "id",
                    "via": _via("accounts_contacts", "contact_id", "account_id", "deleted = 0"),
                    "lookup": {"by": "external_id"},
                },
                "email": {
                    "from": "id",
                    "via": [
                        _via(
                            "email_addr_bean_rel",
                            "bean_id",
                            "email_address_id",
                            "deleted = 0 and primary_address = 1 and bean_module = 'Contacts'",
                        ),
                        _via("email_addresses", "id", "email_address", "deleted = 0"),
                    ],
                    "transforms": ["email"],
                    "on_error": "null",
                },
                "mobile": {"from": "phone_mobile", "transforms": ["phone"], "on_error": "null"},
                "phone": {"from": "phone_work", "transforms": ["phone"], "on_error": "null"},
            },
            comments={
                "customer": (
                    "A contact's account is in the link table accounts_contacts (soft-deleted links excluded);",
                    "a contact linked to several accounts: the lookup rejects the row (multiple: reject).",
                ),
                "email": ("The primary e-mail address: email_addr_bean_rel → email_addresses.",),
            },
        ),
        "opportunities": TableProfile(
            target="opportunity",
            key="id",
            where="deleted = 0",
            where_columns=("deleted",),
            lookups={
                "iso4217": {
                    "from": "currency_id",
                    "lookup": _lookup("currencies", "id", "iso4217", "deleted = 0"),
                },
                "conversion_rate": {
                    "from": "currency_id",
                    "lookup": _lookup("currencies", "id", "conversion_rate", "deleted = 0"),
                },
            },
            fields={
                "customer": {
                    "from": "id",
                    "via": _via("accounts_opportunities", "opportunity_id", "account_id", "deleted = 0"),
                    "lookup": {"by": "external_id"},
                    "required": True,
                },
                "stage": {
                    "from": "sales_stage",
                    "transforms": [{"map_values": {"values": SUITECRM_STAGES, "unmatched": "reject"}}],
                    "required": True,
                },
                "amount": {
                    "from": "amount",
                    "transforms": ["parse_amount"],
                    "convert": {
                        "profile": "suitecrm",
                        "currency_id": "currency_id",
                        "currency": "iso4217",
                        "rate": "conversion_rate",
                    },
                },
                "expected_close_date": {"from": "date_closed", "transforms": ["parse_date"]},
                "owner": {"from": "assigned_user_id", "lookup": {"by": "external_id"}},
            },
            drop={"currency": "amount"},  # convert sets the base currency and keeps the original beside it
            fallbacks={
                "currency": {
                    "from": "currency_id",
                    "transforms": [
                        {"map_values": {"values": {"-99": "CNY"}, "unmatched": "keep"}},
                        "currency",
                    ],
                    "default": "CNY",
                }
            },
            comments={
                "customer": (
                    "The account is in the link table accounts_opportunities (deleted = 0 links only).",
                ),
                "stage": (
                    "sales_stage → our stages. Judgment calls (check with the client):",
                    ", ".join(SUITECRM_STAGE_JUDGMENT) + "; the others are one to one.",
                    "A custom stage not listed here rejects the row: add it.",
                ),
                "currency": (
                    "Without a currencies table: -99 is SuiteCRM's base currency, taken as CNY (judgment call).",
                ),
                "amount": (
                    "amount is in the deal's currency: currency_id -99 is SuiteCRM's base currency (no currencies",
                    "row; its code is config.php default_currency_iso4217), any other id's currencies row gives",
                    "iso4217 and conversion_rate (units per base unit, so ÷). convert loads the base-currency",
                    "amount and keeps original_amount/original_currency; amount_usdollar is SuiteCRM's own result.",
                ),
            },
        ),
        **{
            name: TableProfile(target="customer", read_through=why)
            for name, why in {
                "accounts_opportunities": "SuiteCRM's link of opportunities to accounts: the opportunities "
                "mapping follows it with `via` (scaffold --table opportunities)",
                "accounts_contacts": "SuiteCRM's link of contacts to accounts: the contacts mapping follows "
                "it with `via` (scaffold --table contacts)",
                "currencies": "SuiteCRM's currency table (-99, the base currency, has no row): the "
                "opportunities mapping looks it up (scaffold --table opportunities)",
                "email_addr_bean_rel": "SuiteCRM's link of records to e-mail addresses: the contacts mapping "
                "follows it with `via`",
                "email_addresses": "SuiteCRM's e-mail addresses: the contacts mapping reaches them with `via`",
            }.items()
        },
    },
)

U8 = SystemProfile(
    name="u8",
    title="Yonyou U8",
    signature=frozenset({"customer", "so_somain", "so_sodetails"}),
    tables={
        "person": TableProfile(
            target="sales_rep",
            key="cPersonCode",
            fields={
                "code": {"from": "cPersonCode"},
                "name": {"from": "cPersonName", "transforms": ["trim"], "required": True},
                "department": {"from": "cDepCode"},
            },
        ),
        "customer": TableProfile(
            target="customer",
            key="cCusCode",
            fields={
                **_address_parts("cCusAddress"),
                "owner": {"from": "cCusPPerson", "lookup": {"by": "external_id"}},
                "parent": {"from": "cCusHeadCode", "lookup": {"by": "external_id"}},
                # what the ERP owns and a sync keeps in step (docs/sync.md)
                "erp_code": {"from": "cCusCode"},
                "credit_limit": {"from": "iCusCreLine", "transforms": ["parse_amount"]},
                "payment_terms": {"from": "cCusPayCond"},
                "is_branch": {
                    "when": [
                        {"if": "cCusHeadCode is not null and cCusHeadCode <> cCusCode", "then": True},
                        {"else": False},
                    ]
                },
                "status": {
                    "when": [
                        {"if": "dEndDate is not null and dEndDate <= current_date", "then": "inactive"},
                        {"else": "active"},
                    ]
                },
            },
            comments={
                "status": (
                    "Judgment call: U8 has no customer status; a customer whose 停用日期 (dEndDate) has passed",
                    "is taken as inactive, every other one as active (no prospects in an ERP).",
                ),
                "parent": ("分公司: cCusHeadCode names the head office's cCusCode.",),
            },
        ),
        "so_somain": TableProfile(
            target="sales_order",
            key="cSOCode",
            fields={
                "order_no": {"from": "cSOCode", "required": True},
                "customer": {"from": "cCusCode", "lookup": {"by": "external_id"}, "required": True},
                "owner": {"from": "cPersonCode", "lookup": {"by": "external_id"}},
                "order_date": {"from": "dDate", "transforms": ["parse_date"]},
                "currency": {"from": "cexch_name", "transforms": ["currency"], "default": "CNY"},
                "total_amount": {
                    "from": "cSOCode",
                    "aggregate": {
                        "table": "SO_SODetails",
                        "key": "cSOCode",
                        "function": "sum",
                        "value": "iSum",
                    },
                },
                "status": {
                    "from": "iStatus",
                    "transforms": [
                        {
                            "map_values": {
                                "values": {"0": "open", "1": "approved", "2": "closed"},
                                "unmatched": "keep",
                            }
                        }
                    ],
                },
            },
            comments={
                "": (
                    "Keyed by cSOCode (the order number), which the lines in SO_SODetails reference: not by ID.",
                ),
                "total_amount": ("价税合计: the sum of the lines' iSum (tax included).",),
                "status": (
                    "Judgment call: iStatus 0/1/2 → open/approved/closed; where a U8 version has no iStatus,",
                    "use cVerifier (审核人) for approved and cCloser (关闭人) for closed with `when`.",
                ),
            },
        ),
        "so_sodetails": TableProfile(
            target="sales_order_line",
            key="AutoID",
            fields={
                "order": {"from": "cSOCode", "lookup": {"by": "external_id"}, "required": True},
                "line_no": {"from": "iRowNo", "required": True},
                "product_code": {"from": "cInvCode"},
                "product_name": {"from": "cInvName"},
                "quantity": {"from": "iQuantity", "transforms": ["parse_amount"]},
                "unit_price": {"from": "iTaxUnitPrice", "transforms": ["parse_amount"]},
                "amount": {"from": "iSum", "transforms": ["parse_amount"]},
                "tax_rate": {"from": "iTaxRate", "transforms": [{"parse_amount": {"multiply": 0.01}}]},
            },
            comments={
                "order": ("The order by its cSOCode, the key of the SO_SOMain mapping.",),
                "amount": (
                    "Judgment call: tax-inclusive (iSum, 价税合计, and iTaxUnitPrice); iMoney/iUnitPrice exclude tax.",
                ),
            },
        ),
    },
)

K3CLOUD = SystemProfile(
    name="k3cloud",
    title="Kingdee K3Cloud",
    signature=frozenset({"t_bd_customer", "t_sal_order", "t_sal_orderentry"}),
    tables={
        "t_bd_customer": TableProfile(
            target="customer",
            key="FCUSTID",
            where="FDOCUMENTSTATUS = 'C'",
            where_columns=("FDOCUMENTSTATUS",),
            fields={
                "name": {
                    "from": "FCUSTID",
                    "lookup": _lookup("T_BD_CUSTOMER_L", "FCUSTID", "FNAME", "FLOCALEID = 2052"),
                    "transforms": ["company_name"],
                    "required": True,
                },
                "short_name": {
                    "from": "FCUSTID",
                    "lookup": _lookup("T_BD_CUSTOMER_L", "FCUSTID", "FSHORTNAME", "FLOCALEID = 2052"),
                },
                "credit_code": {"from": "FSOCIALCRECODE", "transforms": ["uscc"], "on_error": "null"},
                "phone": {"from": "FTEL", "transforms": ["phone"], "on_error": "null"},
                "address": {"from": "FADDRESS", "transforms": ["trim"]},
                **_address_parts("FADDRESS"),
                "owner": {"from": "FSELLER", "lookup": {"by": "external_id"}},
                "status": {"when": [{"if": "FFORBIDSTATUS = 'B'", "then": "inactive"}, {"else": "active"}]},
            },
            comments={
                "": (
                    "Approved records only (FDOCUMENTSTATUS C); drafts (A), re-audits (D) and temporary (Z) stay out.",
                ),
                "name": ("Names live in T_BD_CUSTOMER_L, one row per language: 2052 is Simplified Chinese.",),
                "status": ("Judgment call: forbidden (FFORBIDSTATUS B) → inactive, everything else active.",),
            },
        ),
        "t_sal_order": TableProfile(
            target="sales_order",
            key="FID",
            where="FDOCUMENTSTATUS = 'C'",
            where_columns=("FDOCUMENTSTATUS",),
            fields={
                "order_no": {"from": "FBILLNO", "required": True},
                "customer": {"from": "FCUSTID", "lookup": {"by": "external_id"}, "required": True},
                "owner": {"from": "FSALERID", "lookup": {"by": "external_id"}},
                "order_date": {"from": "FDATE", "transforms": ["parse_date"]},
                "total_amount": {
                    "from": "FID",
                    "lookup": _lookup("T_SAL_ORDERFIN", "FID", "FBILLALLAMOUNT"),
                    "transforms": ["parse_amount"],
                },
                "status": {
                    "when": [
                        {"if": "FCLOSESTATUS = 'B'", "then": "closed"},
                        {"if": "FDOCUMENTSTATUS = 'C'", "then": "approved"},
                        {"else": "open"},
                    ]
                },
            },
            comments={
                "": (
                    "Keyed by FID, which the lines in T_SAL_ORDERENTRY reference; FBILLNO is the order number.",
                ),
                "total_amount": ("价税合计 from the order's finance row (T_SAL_ORDERFIN).",),
                "status": (
                    "Judgment call: closed (FCLOSESTATUS B) → closed, approved → approved, else open.",
                ),
            },
        ),
        "t_sal_orderentry": TableProfile(
            target="sales_order_line",
            key="FENTRYID",
            fields={
                "order": {"from": "FID", "lookup": {"by": "external_id"}, "required": True},
                "line_no": {"from": "FSEQ", "required": True},
                "product_code": {
                    "from": "FMATERIALID",
                    "lookup": _lookup("T_BD_MATERIAL", "FMATERIALID", "FNUMBER"),
                },
                "quantity": {"from": "FQTY", "transforms": ["parse_amount"]},
                "unit_price": {
                    "from": "FENTRYID",
                    "lookup": _lookup("T_SAL_ORDERENTRY_F", "FENTRYID", "FTAXPRICE"),
                    "transforms": ["parse_amount"],
                },
                "amount": {
                    "from": "FENTRYID",
                    "lookup": _lookup("T_SAL_ORDERENTRY_F", "FENTRYID", "FALLAMOUNT"),
                    "transforms": ["parse_amount"],
                },
            },
            comments={
                "amount": ("Judgment call: tax-inclusive (FALLAMOUNT, FTAXPRICE) from T_SAL_ORDERENTRY_F.",)
            },
        ),
        **{
            name: TableProfile(target="customer", read_through=why)
            for name, why in {
                "t_bd_customer_l": "Kingdee's customer names per language: the T_BD_CUSTOMER mapping looks "
                "them up",
                "t_sal_orderfin": "Kingdee's order finance rows: the T_SAL_ORDER mapping looks its total up",
                "t_sal_orderentry_f": "Kingdee's line amounts: the T_SAL_ORDERENTRY mapping looks them up",
            }.items()
        },
    },
)

PROFILES: tuple[SystemProfile, ...] = (SUITECRM, U8, K3CLOUD)


def detect_profile(tables: Iterable[str]) -> SystemProfile | None:
    """Return the profile whose signature tables all exist among ``tables`` (any case), if one does."""
    names = {t.casefold() for t in tables}
    return next((p for p in PROFILES if p.signature <= names), None)


def profile_named(name: str) -> SystemProfile | None:
    """Return the profile called ``name`` (suitecrm, u8, k3cloud), or None."""
    return next((p for p in PROFILES if p.name == name), None)


_WORDS = frozenset(
    [
        "and",
        "or",
        "not",
        "is",
        "null",
        "in",
        "like",
        "between",
        "case",
        "when",
        "then",
        "else",
        "end",
        "true",
        "false",
        "current_date",
        "date",
        "cast",
        "as",
    ]
)


def spec_columns(spec: dict[str, Any]) -> list[str]:
    """Return the source columns a profile field reads: ``from``, and the names in its conditions."""
    source = spec.get("from")
    columns = [] if source is None else list(source) if isinstance(source, list) else [source]
    convert = spec.get("convert") or {}
    columns += [
        convert[k] for k in ("currency_id", "currency", "rate", "date") if isinstance(convert.get(k), str)
    ]
    texts = [branch["if"] for branch in spec.get("when", []) if "if" in branch]
    if "expr" in spec:
        texts.append(spec["expr"])
    return columns + [name for text in texts for name in expression_names(text)]


def expression_names(text: str) -> list[str]:
    """Return the column names an expression mentions (string literals and keywords left out)."""
    bare = re.sub(r"'[^']*'", " ", text)
    return [w for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", bare) if w.casefold() not in _WORDS]


def spec_tables(spec: dict[str, Any]) -> list[str]:
    """Return the other tables a profile field or lookup reads (lookup, via, aggregate)."""
    tables = []
    lookup = spec.get("lookup")
    if isinstance(lookup, dict) and "table" in lookup:
        tables.append(lookup["table"])
    via = spec.get("via")
    for hop in via if isinstance(via, list) else [via] if via else []:
        tables.append(hop["table"])
    aggregate = spec.get("aggregate")
    if aggregate:
        tables.append(aggregate["table"])
    return tables
