"""A real HTTP server on 127.0.0.1 that speaks the Kingdee K3Cloud WebAPI subset we use, over a real database.

The database (any SQLAlchemy URL; SQLite files and PostgreSQL are tested) holds K3Cloud-like tables:
``T_BD_CUSTOMER`` (form ``BD_Customer``), ``T_BD_CURRENCY`` (``BD_Currency``), ``T_AR_RECEIVABLE`` with its
entry ``T_AR_RECEIVABLEENTRY`` (``AR_receivable`` 应收单, entity ``FEntityDetail``, the source sales order in
``FORDERNUMBER``) and ``T_AR_RECEIVEBILL`` with ``T_AR_RECEIVEBILLENTRY`` (收款明细, ``FRECEIVEBILLENTRY``) and
``T_AR_RECEIVEBILLSRCENTRY`` (源单明细: the receivables a receipt is written off against,
``FRECEIVEBILLSRCENTRY``) for ``AR_RECEIVEBILL`` 收款单. Every write stamps ``FModifyDate`` (milliseconds,
taken under the write lock, so stamps follow commit order).

Endpoints, each ``POST <site>/<service>.common.kdsvc`` (any site path, e.g. ``/k3cloud``):

* ``Kingdee.BOS.WebApi.ServicesStub.AuthService.ValidateUser`` ``{"acctID", "username", "password", "lcid"}``
  and ``...AuthService.LoginByAppSecret`` ``{"acctid", "username", "appid", "appsecret", "lcid"}`` (or the older
  ``{"parameters": [...]}`` form) → ``{"LoginResultType": 1, "KDSVCSessionId", "Message", ...}`` and the
  ``kdservice-sessionid`` cookie;
* ``...DynamicFormService.ExecuteBillQuery`` ``{"data": {FormId, FieldKeys, FilterString, OrderString,
  TopRowCount, StartRow, Limit}}`` → rows as lists; an error is ``[[{"Result": {"ResponseStatus": ...}}]]``;
* ``...DynamicFormService.Save`` / ``BatchSave`` (``BD_Customer``; ``NeedUpDateFields``,
  ``IsAutoSubmitAndAudit``), ``Submit``, ``Audit`` → ``{"Result": {"ResponseStatus": {"IsSuccess", "Errors":
  [{FieldName, Message, DIndex}], "SuccessEntitys": [{Id, Number, DIndex}], "MsgCode"}}}``;
* ``POST /_test/faults`` ``{"faults": [...]}`` and ``POST /_test/release`` (test control).

A request is authenticated by its session (cookie or ``kdservice-sessionid`` header), or, like a K3Cloud site
that trusts third-party apps, by Kingdee SDK's ``X-Kd-Appkey/Appdata/Signature`` headers (a session is opened
and its cookie set). Signature headers, when sent, are verified: ``X-Api-Signature`` (HMAC-SHA256 over method,
path, nonce and timestamp with the client secret hidden in the app id), a timestamp no more than
``max_skew`` seconds off, a request never replayed, and ``X-Kd-Signature`` with the app secret. A refusal is
HTTP 401. A lost session answers ``MsgCode`` 1 (会话信息已丢失).

``faults`` is a queue applied to the next requests (one per request): ``500``, ``503``, ``timeout`` (handled,
then the answer is held until :meth:`K3Api.release` or ``stall_limit``), ``drop`` (a save is handled, then the
connection is closed without an answer: the client cannot know whether it was saved), ``pass`` (nothing: places the next
fault further down the queue), ``expire_session`` (every session so far
is dropped before the request is handled), ``short_page`` (a query answers half the rows it could) and
``reject:<field>=<value>`` (a save's records whose field has that value fail validation; the rest are saved).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import quote, urlparse

import sqlalchemy as sa

from tests.servers.base import FaultsAndLog, JsonHandler, ThreadedServer, run_in_foreground, serving

# The demo project's defaults (examples/demo/project.yaml, sync.finance), so the demo needs no options.
ACCT_ID = "6512a3b4c5d6e7"
USERNAME, PASSWORD = "crm_api", "demo-k3-password"
# An app id is "<client id>_<32 characters>": the SDK hides the gateway client secret in the second part.
APP_ID = "300001_" + base64.b64encode(b"crm-integration-demo-app").decode()
APP_SECRET = "demo-k3-app-secret"
DEMO_PORT = 8767  # the demo finance project expects it; U8's test server: 8766, the steward workbench: 8765
SESSION_COOKIE = "kdservice-sessionid"
SESSION_LOST = 1
_SDK_CODE = "0054s397p6234378o09pn7q3r5qropr7"

metadata = sa.MetaData()
# K3Cloud keeps amounts as decimal(23,10). SQLite has no decimal type: it keeps a REAL, read back as a float whose
# shortest repr is the amount written (up to 15 significant digits), never through a 10-place rounding.
Money = sa.Numeric(23, 10).with_variant(sa.Numeric(23, 10, asdecimal=False), "sqlite")

CURRENCY = sa.Table(
    "T_BD_CURRENCY", metadata,
    sa.Column("FCURRENCYID", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("FNumber", sa.String(30), nullable=False, unique=True),  # PRE001 ...
    sa.Column("FName", sa.String(80)),
    sa.Column("FCODE", sa.String(10)),  # ISO 4217
    sa.Column("FModifyDate", sa.DateTime),
)  # fmt: skip

CUSTOMER = sa.Table(
    "T_BD_CUSTOMER", metadata,
    sa.Column("FCUSTID", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("FNumber", sa.String(80), nullable=False, unique=True),
    sa.Column("FName", sa.String(255), nullable=False),
    sa.Column("FShortName", sa.String(255)),
    sa.Column("FTEL", sa.String(100)),
    sa.Column("FADDRESS", sa.String(255)),
    sa.Column("FSOCIALCRECODE", sa.String(50)),  # 统一社会信用代码
    sa.Column("FINVOICETITLE", sa.String(255)),
    sa.Column("F_CRM_ID", sa.String(80), unique=True),  # a custom field (扩展字段): the CRM's record id
    sa.Column("FDocumentStatus", sa.String(1), nullable=False),  # A created, B submitted, C audited
    sa.Column("FForbidStatus", sa.String(1), nullable=False),
    sa.Column("FCreateDate", sa.DateTime),
    sa.Column("FModifyDate", sa.DateTime, index=True),
)  # fmt: skip

RECEIVABLE = sa.Table(
    "T_AR_RECEIVABLE", metadata,
    sa.Column("FID", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("FBillNo", sa.String(80), nullable=False, unique=True),
    sa.Column("FBillTypeID", sa.String(30)),  # YSD01_SYS 标准应收单
    sa.Column("FDATE", sa.DateTime),
    sa.Column("FENDDATE_H", sa.DateTime),  # 到期日
    sa.Column("FCUSTOMERID", sa.Integer, index=True),
    sa.Column("FCURRENCYID", sa.Integer),
    sa.Column("FEXCHANGERATE", Money),
    sa.Column("FALLAMOUNTFOR", Money),  # 价税合计 (document currency)
    sa.Column("FDOCUMENTSTATUS", sa.String(1)),
    sa.Column("FAR_Remark", sa.String(255)),
    sa.Column("FCreateDate", sa.DateTime),
    sa.Column("FModifyDate", sa.DateTime, index=True),
)  # fmt: skip

RECEIVABLE_ENTRY = sa.Table(
    "T_AR_RECEIVABLEENTRY", metadata,
    sa.Column("FEntryID", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("FID", sa.Integer, index=True),
    sa.Column("FSeq", sa.Integer),
    sa.Column("FMATERIALNAME", sa.String(255)),
    sa.Column("FPriceQty", Money),
    sa.Column("FTaxPrice", Money),
    sa.Column("FALLAMOUNTFOR_D", Money),
    sa.Column("FORDERNUMBER", sa.String(80)),  # 销售订单号: the source order
)  # fmt: skip

RECEIPT = sa.Table(
    "T_AR_RECEIVEBILL", metadata,
    sa.Column("FID", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("FBillNo", sa.String(80), nullable=False, unique=True),
    sa.Column("FBillTypeID", sa.String(30)),  # SKDLX01_SYS 销售收款单
    sa.Column("FDATE", sa.DateTime),
    sa.Column("FCONTACTUNITTYPE", sa.String(30)),  # BD_Customer
    sa.Column("FCONTACTUNIT", sa.Integer, index=True),
    sa.Column("FCURRENCYID", sa.Integer),
    sa.Column("FEXCHANGERATE", Money),
    sa.Column("FREALRECAMOUNTFOR", Money),  # 实收金额 (document currency)
    sa.Column("FDOCUMENTSTATUS", sa.String(1)),
    sa.Column("FREMARK", sa.String(255)),
    sa.Column("FCreateDate", sa.DateTime),
    sa.Column("FModifyDate", sa.DateTime, index=True),
)  # fmt: skip

RECEIPT_ENTRY = sa.Table(
    "T_AR_RECEIVEBILLENTRY", metadata,
    sa.Column("FEntryID", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("FID", sa.Integer, index=True),
    sa.Column("FSeq", sa.Integer),
    sa.Column("FSETTLETYPEID", sa.String(30)),  # JSFS04_SYS 电汇 ...
    sa.Column("FRECTOTALAMOUNTFOR", Money),
)  # fmt: skip

RECEIPT_SOURCE = sa.Table(
    "T_AR_RECEIVEBILLSRCENTRY", metadata,
    sa.Column("FEntryID", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("FID", sa.Integer, index=True),
    sa.Column("FSeq", sa.Integer),
    sa.Column("FSRCBILLTYPEID", sa.String(30)),  # AR_receivable
    sa.Column("FSRCBILLNO", sa.String(80)),  # the receivable written off
    sa.Column("FREALRECAMOUNT", Money),  # 本次收款金额 applied to it
)  # fmt: skip

SEQUENCE = sa.Table(
    "k3api_sequence", metadata,
    sa.Column("name", sa.String(32), primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False),
)  # fmt: skip

CURRENCIES = ((1, "PRE001", "人民币", "CNY"), (2, "PRE002", "港币", "HKD"), (3, "PRE003", "欧元", "EUR"),
              (7, "PRE007", "美元", "USD"))  # fmt: skip


# --------------------------------------------------------------------------- forms


@dataclass(frozen=True)
class Form:
    """A form (FormId): its head table, entry entities, and field key -> (entity or None, column)."""

    form_id: str
    head: sa.Table
    id_column: str
    entities: Mapping[str, sa.Table]  # entity key -> entry table (FID links it to the head)
    fields: Mapping[str, tuple[str | None, str]]  # FIELDKEY (upper) -> (entity key | None, column)
    refs: Mapping[str, str]  # FIELDKEY (upper) of a base-data field -> the form it points at

    def field(self, key: str) -> tuple[str | None, str] | None:
        """Return (entity, column) of a field key (case-insensitive), entry ids as ``<Entity>_FEntryID``."""
        upper = key.upper()
        for entity in self.entities:
            if upper == f"{entity.upper()}_FENTRYID":
                return entity, "FEntryID"
        return self.fields.get(upper)


def _fields(
    table: sa.Table, entity: str | None = None, skip: Sequence[str] = ()
) -> dict[str, tuple[str | None, str]]:
    return {c.name.upper(): (entity, c.name) for c in table.columns if c.name not in skip}


FORMS: dict[str, Form] = {
    "BD_CURRENCY": Form("BD_Currency", CURRENCY, "FCURRENCYID", {}, _fields(CURRENCY), {}),
    "BD_CUSTOMER": Form("BD_Customer", CUSTOMER, "FCUSTID", {}, _fields(CUSTOMER), {}),
    "AR_RECEIVABLE": Form(
        "AR_receivable", RECEIVABLE, "FID", {"FEntityDetail": RECEIVABLE_ENTRY},
        {**_fields(RECEIVABLE_ENTRY, "FEntityDetail", ("FEntryID", "FID")), **_fields(RECEIVABLE)},
        {"FCUSTOMERID": "BD_CUSTOMER", "FCURRENCYID": "BD_CURRENCY"},
    ),
    "AR_RECEIVEBILL": Form(
        "AR_RECEIVEBILL", RECEIPT, "FID",
        {"FRECEIVEBILLENTRY": RECEIPT_ENTRY, "FRECEIVEBILLSRCENTRY": RECEIPT_SOURCE},
        {**_fields(RECEIPT_ENTRY, "FRECEIVEBILLENTRY", ("FEntryID", "FID", "FSeq")),
         **_fields(RECEIPT_SOURCE, "FRECEIVEBILLSRCENTRY", ("FEntryID", "FID", "FSeq")), **_fields(RECEIPT)},
        {"FCONTACTUNIT": "BD_CUSTOMER", "FCURRENCYID": "BD_CURRENCY"},
    ),
}  # fmt: skip
WRITABLE = {"BD_CUSTOMER"}
# BD_Customer fields a Save may write, and the organisation fields it accepts (as {"FNumber": ...}) and ignores.
CUSTOMER_WRITABLE = frozenset({"FNUMBER", "FNAME", "FSHORTNAME", "FTEL", "FADDRESS", "FSOCIALCRECODE",
                               "FINVOICETITLE", "F_CRM_ID", "FCUSTID"})  # fmt: skip
IGNORED_REFS = frozenset({"FCREATEORGID", "FUSEORGID", "FGROUP", "FCUSTTYPEID", "FTRADINGCURRID"})


class QueryError(Exception):
    """A query the server refuses (unknown form or field, unreadable filter)."""

    def __init__(self, message: str, field_name: str | None = None) -> None:
        super().__init__(message)
        self.field_name = field_name


class _Query:
    """Builds one ExecuteBillQuery: field keys, filter and order to a SELECT over the form's tables."""

    def __init__(self, form: Form) -> None:
        self.form = form
        self.entity: str | None = None
        self._refs: dict[str, Any] = {}  # base-data field -> the aliased table it joins

    def column(self, key: str) -> sa.ColumnElement[Any]:
        """Return the SQL expression of a field key (``FCUSTOMERID.FNumber`` joins the customer)."""
        base, _, prop = key.partition(".")
        found = self.form.field(base)
        if found is None:
            raise QueryError(f"表单 {self.form.form_id} 不存在字段 {base} (no such field key)", base)
        entity, column = found
        if entity is not None:
            if self.entity not in (None, entity):
                raise QueryError(
                    f"不能同时查询多个单据体 {self.entity}, {entity} (one entry entity per query)", base
                )
            self.entity = entity
        table = self.form.entities[entity] if entity else self.form.head
        if not prop:
            return table.c[column]
        target = self.form.refs.get(base.upper())
        if target is None:
            raise QueryError(f"字段 {base} 不是基础资料 (not a base-data field)", key)
        ref = FORMS[target]
        alias: Any = self._refs.get(base.upper())
        if alias is None:
            alias = ref.head.alias(f"ref_{len(self._refs)}")
            self._refs[base.upper()] = alias
            self._joins.append((alias, alias.c[ref.id_column] == table.c[column]))
        ref_column = ref.field(prop)
        if ref_column is None or ref_column[0] is not None:
            raise QueryError(f"基础资料 {ref.form_id} 不存在字段 {prop}", key)
        found_column: sa.ColumnElement[Any] = alias.c[ref_column[1]]
        return found_column

    _joins: list[tuple[Any, Any]]

    def build(self, keys: Sequence[str], where: str, order: str) -> sa.Select[Any]:
        """Return the SELECT of the field keys, filtered and ordered."""
        self._joins = []
        columns = [self.column(k).label(f"c{n}") for n, k in enumerate(keys)]
        condition = parse_filter(where, self.column) if where.strip() else None
        ordering = []
        for part in [p.strip() for p in order.split(",") if p.strip()]:
            name, _, direction = part.partition(" ")
            expression = self.column(name.strip())
            ordering.append(expression.desc() if direction.strip().upper() == "DESC" else expression.asc())
        source: Any = self.form.head
        if self.entity is not None:
            entry = self.form.entities[self.entity]
            source = source.outerjoin(entry, self.form.head.c[self.form.id_column] == entry.c.FID)
        for alias, on in self._joins:
            source = source.outerjoin(alias, on)
        query = sa.select(*columns).select_from(source)
        if condition is not None:
            query = query.where(condition)
        return (
            query.order_by(*ordering) if ordering else query.order_by(self.form.head.c[self.form.id_column])
        )


_TOKEN = re.compile(
    r"\s*(?:(?P<str>'(?:[^']|'')*')|(?P<num>-?\d+(?:\.\d+)?)(?![\w.])|(?P<op><>|!=|>=|<=|=|>|<|\(|\)|,)"
    r"|(?P<word>[A-Za-z_][A-Za-z0-9_.]*))"
)


def _tokens(text: str) -> list[tuple[str, str]]:
    tokens, position = [], 0
    text = text.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            raise QueryError(
                f"过滤条件无法解析: {text[position : position + 30]!r} (unreadable FilterString)"
            )
        kind = match.lastgroup or ""
        tokens.append((kind, match.group(kind)))
        position = match.end()
    return tokens


def parse_filter(text: str, column: Callable[[str], sa.ColumnElement[Any]]) -> sa.ColumnElement[bool]:
    """Parse a FilterString subset (comparisons, IN, LIKE, IS [NOT] NULL, AND/OR/NOT, parentheses)."""
    tokens = _tokens(text)
    position = 0

    def peek(word: str | None = None) -> bool:
        if position >= len(tokens):
            return False
        return word is None or tokens[position][1].upper() == word

    def take() -> tuple[str, str]:
        nonlocal position
        if position >= len(tokens):
            raise QueryError("过滤条件不完整 (FilterString ends early)")
        position += 1
        return tokens[position - 1]

    def literal(target: sa.ColumnElement[Any]) -> Any:
        kind, value = take()
        if kind == "str":
            text_value = value[1:-1].replace("''", "'")
            if isinstance(target.type, sa.DateTime):
                try:
                    return dt.datetime.fromisoformat(
                        text_value.replace(" ", "T", 1) if "T" not in text_value else text_value
                    )
                except ValueError:
                    raise QueryError(f"日期格式错误: {text_value}") from None
            return text_value
        if kind == "num":
            return Decimal(value) if "." in value else int(value)
        raise QueryError(f"过滤条件此处应为值: {value} (expected a value)")

    def expression() -> sa.ColumnElement[bool]:
        parts = [term()]
        while peek("OR"):
            take()
            parts.append(term())
        return parts[0] if len(parts) == 1 else sa.or_(*parts)

    def term() -> sa.ColumnElement[bool]:
        parts = [factor()]
        while peek("AND"):
            take()
            parts.append(factor())
        return parts[0] if len(parts) == 1 else sa.and_(*parts)

    def factor() -> sa.ColumnElement[bool]:
        if peek("NOT"):
            take()
            return sa.not_(factor())
        if peek("("):
            take()
            inner = expression()
            if take()[1] != ")":
                raise QueryError("过滤条件括号不匹配 (unbalanced parentheses)")
            return inner
        kind, name = take()
        if kind != "word":
            raise QueryError(f"过滤条件此处应为字段: {name} (expected a field key)")
        target = column(name)
        negate = False
        if peek("NOT"):
            take()
            negate = True
        kind, operator = take()
        operator = operator.upper()
        result: sa.ColumnElement[bool]
        if operator == "IN":
            if take()[1] != "(":
                raise QueryError("IN 后应为 ( (expected a list)")
            values = [literal(target)]
            while peek(","):
                take()
                values.append(literal(target))
            if take()[1] != ")":
                raise QueryError("IN 列表未结束 (unclosed list)")
            result = target.in_(values)
        elif operator == "LIKE":
            result = target.like(literal(target))
        elif operator == "IS":
            if peek("NOT"):
                take()
                negate = not negate
            if take()[1].upper() != "NULL":
                raise QueryError("IS 后应为 NULL")
            result = target.is_(None)
        else:
            value = literal(target)
            operations: dict[str, Callable[[Any, Any], Any]] = {
                "=": lambda a, b: a == b, "<>": lambda a, b: a != b, "!=": lambda a, b: a != b,
                ">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b, "<=": lambda a, b: a <= b,
            }  # fmt: skip
            if operator not in operations:
                raise QueryError(f"不支持的比较符 {operator} (unknown operator)")
            result = operations[operator](target, value)
        return sa.not_(result) if negate else result

    parsed = expression()
    if position != len(tokens):
        raise QueryError(f"过滤条件多余内容: {tokens[position][1]} (unexpected text)")
    return parsed


# --------------------------------------------------------------------------- schema and helpers


def ensure_schema(engine: sa.Engine) -> None:
    """Create the K3Cloud tables if missing, the currencies and the counters (idempotent)."""
    with engine.begin() as conn:
        metadata.create_all(conn)
        if not conn.execute(sa.select(sa.func.count()).select_from(CURRENCY)).scalar():
            conn.execute(sa.insert(CURRENCY), [{"FCURRENCYID": i, "FNumber": n, "FName": name, "FCODE": code,
                                                "FModifyDate": _now()} for i, n, name, code in CURRENCIES])  # fmt: skip
        counters = {
            "custid": _max(conn, CUSTOMER.c.FCUSTID), "custno": 0, "fid": max(_max(conn, RECEIVABLE.c.FID),
                                                                             _max(conn, RECEIPT.c.FID)),
            "entryid": max(_max(conn, t.c.FEntryID) for t in (RECEIVABLE_ENTRY, RECEIPT_ENTRY, RECEIPT_SOURCE)),
        }  # fmt: skip
        known = set(conn.execute(sa.select(SEQUENCE.c.name)).scalars())
        missing = [{"name": n, "value": v} for n, v in counters.items() if n not in known]
        if missing:
            conn.execute(sa.insert(SEQUENCE), missing)


def _max(conn: sa.Connection, column: sa.Column[Any]) -> int:
    return int(conn.execute(sa.select(sa.func.max(column))).scalar() or 0)


def next_values(conn: sa.Connection, name: str, count: int = 1) -> int:
    """Reserve ``count`` values of counter ``name`` in this transaction and return the first."""
    conn.execute(sa.update(SEQUENCE).where(SEQUENCE.c.name == name).values(value=SEQUENCE.c.value + count))
    return (
        int(conn.execute(sa.select(SEQUENCE.c.value).where(SEQUENCE.c.name == name)).scalar_one()) - count + 1
    )


class _Clock:
    """Write stamps: milliseconds, strictly increasing (two writes in one millisecond get distinct stamps)."""

    def __init__(self) -> None:
        self._last = dt.datetime.min

    def stamp(self) -> dt.datetime:
        now = dt.datetime.now()
        now = now.replace(microsecond=now.microsecond // 1000 * 1000)
        if now <= self._last:
            now = self._last + dt.timedelta(milliseconds=1)
        self._last = now
        return now


def _now() -> dt.datetime:
    return dt.datetime.now().replace(microsecond=0)


def _wire(value: Any) -> Any:
    """A database value as K3Cloud sends it: datetimes ISO with milliseconds, decimals exact."""
    if isinstance(value, dt.datetime):
        return (
            value.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
            if value.microsecond
            else value.strftime("%Y-%m-%dT%H:%M:%S")
        )
    if isinstance(value, float):
        value = Decimal(repr(value))
    if isinstance(value, Decimal):
        text = format(value.normalize(), "f")
        return _Number(text)
    return value


class _Number(str):
    """A decimal written into JSON as a number with exactly its digits (see :func:`dumps`)."""


_NUMBER = re.compile(r'"\\u0000N(-?[0-9.]+)\\u0000"')


def dumps(body: Any) -> bytes:
    """JSON with exact decimals: K3Cloud's numbers, never passed through a float."""

    def mark(value: Any) -> Any:
        if isinstance(value, _Number):
            return f"\x00N{value}\x00"
        if isinstance(value, list):
            return [mark(v) for v in value]
        if isinstance(value, dict):
            return {k: mark(v) for k, v in value.items()}
        return value

    return _NUMBER.sub(r"\1", json.dumps(mark(body), ensure_ascii=False)).encode()


def status(errors: Sequence[dict[str, Any]] = (), successes: Sequence[dict[str, Any]] = (),
           msg_code: int = 0) -> dict[str, Any]:  # fmt: skip
    """Return a ``{"Result": {"ResponseStatus": ...}}`` answer."""
    body: dict[str, Any] = {"ResponseStatus": {
        "ErrorCode": 500 if errors else 0, "IsSuccess": not errors, "Errors": list(errors),
        "SuccessEntitys": list(successes), "SuccessMessages": [], "MsgCode": msg_code,
    }}  # fmt: skip
    if successes:
        body["Id"], body["Number"] = successes[0]["Id"], successes[0]["Number"]
    return {"Result": body}


def _error(message: str, field_name: str | None = None, index: int = 0) -> dict[str, Any]:
    return {"FieldName": field_name, "Message": message, "DIndex": index}


# --------------------------------------------------------------------------- finance staff in K3Cloud


class ErpUser:
    """What people do in K3Cloud, straight in its tables: customers, receivables, receipts, changes."""

    def __init__(
        self, engine: sa.Engine | str, lock: threading.Lock | None = None, clock: _Clock | None = None
    ) -> None:
        self._owns = isinstance(engine, str)
        self.engine = sa.create_engine(engine) if isinstance(engine, str) else engine
        self._lock = lock or threading.Lock()
        self.clock = clock or _Clock()

    def close(self) -> None:
        """Release the engine when this helper made it."""
        if self._owns:
            self.engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        with self._lock, self.engine.begin() as conn:
            yield conn

    def _id_of(self, conn: sa.Connection, table: sa.Table, key: str, value: Any, wanted: str) -> Any:
        found = conn.execute(sa.select(table.c[wanted]).where(table.c[key] == value)).scalar()
        if found is None:
            raise KeyError(f"{table.name}: no row with {key} = {value!r}")
        return found

    def _currency(self, conn: sa.Connection, code: str) -> int:
        return int(self._id_of(conn, CURRENCY, "FCODE", code, "FCURRENCYID"))

    def insert_customer(self, number: str, name: str, **columns: Any) -> int:
        """Add an audited customer; return its FCUSTID."""
        with self._write() as conn:
            custid = next_values(conn, "custid")
            stamp = self.clock.stamp()
            conn.execute(sa.insert(CUSTOMER).values(FCUSTID=custid, FNumber=number, FName=name, FDocumentStatus="C",
                                                    FForbidStatus="A", FCreateDate=stamp, FModifyDate=stamp,
                                                    **columns))  # fmt: skip
        return custid

    def add_receivable(
        self, bill_no: str, customer: str, lines: Sequence[tuple[str | None, Decimal | str]], *,
        date: dt.date = dt.date(2026, 10, 8), due: dt.date | None = None, currency: str = "CNY",
        rate: Decimal | str = "1", status: str = "C", bill_type: str = "YSD01_SYS",
    ) -> int:  # fmt: skip
        """Add a receivable (应收单) for customer number ``customer``: lines of (source order number, amount)."""
        with self._write() as conn:
            fid = next_values(conn, "fid")
            entry = next_values(conn, "entryid", len(lines))
            stamp = self.clock.stamp()
            amounts = [Decimal(str(a)) for _, a in lines]
            conn.execute(sa.insert(RECEIVABLE).values(
                FID=fid, FBillNo=bill_no, FBillTypeID=bill_type, FDATE=dt.datetime.combine(date, dt.time()),
                FENDDATE_H=dt.datetime.combine(due or date + dt.timedelta(days=30), dt.time()),
                FCUSTOMERID=self._id_of(conn, CUSTOMER, "FNumber", customer, "FCUSTID"),
                FCURRENCYID=self._currency(conn, currency), FEXCHANGERATE=Decimal(str(rate)),
                FALLAMOUNTFOR=sum(amounts, Decimal(0)), FDOCUMENTSTATUS=status, FCreateDate=stamp, FModifyDate=stamp,
            ))  # fmt: skip
            if lines:
                conn.execute(sa.insert(RECEIVABLE_ENTRY), [
                    {"FEntryID": entry + n, "FID": fid, "FSeq": n + 1, "FMATERIALNAME": "CRM-DEAL", "FPriceQty": 1,
                     "FTaxPrice": amount, "FALLAMOUNTFOR_D": amount, "FORDERNUMBER": order}
                    for n, ((order, _), amount) in enumerate(zip(lines, amounts, strict=True))
                ])  # fmt: skip
        return fid

    def add_receipt(
        self, bill_no: str, customer: str, writeoffs: Sequence[tuple[str | None, Decimal | str]], *,
        date: dt.date = dt.date(2026, 10, 20), currency: str = "CNY", rate: Decimal | str = "1",
        settle: str = "JSFS04_SYS", status: str = "C", bill_type: str = "SKDLX01_SYS",
    ) -> int:  # fmt: skip
        """Add a receipt (收款单) from customer number ``customer`` written off against (receivable no, amount)."""
        with self._write() as conn:
            fid = next_values(conn, "fid")
            entry = next_values(conn, "entryid", len(writeoffs) + 1)
            stamp = self.clock.stamp()
            amounts = [Decimal(str(a)) for _, a in writeoffs]
            total = sum(amounts, Decimal(0))
            conn.execute(sa.insert(RECEIPT).values(
                FID=fid, FBillNo=bill_no, FBillTypeID=bill_type, FDATE=dt.datetime.combine(date, dt.time()),
                FCONTACTUNITTYPE="BD_Customer", FCONTACTUNIT=self._id_of(conn, CUSTOMER, "FNumber", customer, "FCUSTID"),
                FCURRENCYID=self._currency(conn, currency), FEXCHANGERATE=Decimal(str(rate)), FREALRECAMOUNTFOR=total,
                FDOCUMENTSTATUS=status, FCreateDate=stamp, FModifyDate=stamp,
            ))  # fmt: skip
            conn.execute(sa.insert(RECEIPT_ENTRY).values(FEntryID=entry, FID=fid, FSeq=1, FSETTLETYPEID=settle,
                                                         FRECTOTALAMOUNTFOR=total))  # fmt: skip
            if writeoffs:
                conn.execute(sa.insert(RECEIPT_SOURCE), [
                    {"FEntryID": entry + 1 + n, "FID": fid, "FSeq": n + 1, "FSRCBILLTYPEID": "AR_receivable",
                     "FSRCBILLNO": receivable, "FREALRECAMOUNT": amount}
                    for n, ((receivable, _), amount) in enumerate(zip(writeoffs, amounts, strict=True))
                ])  # fmt: skip
        return fid

    def bulk_receivables(self, customer: str, amounts: Sequence[Decimal], *, prefix: str = "ARB") -> None:
        """Add one audited single-line receivable per amount (``<prefix>000001``, ...) in one transaction."""
        with self._write() as conn:
            custid = self._id_of(conn, CUSTOMER, "FNumber", customer, "FCUSTID")
            first = next_values(conn, "fid", len(amounts))
            entry = next_values(conn, "entryid", len(amounts))
            stamp = self.clock.stamp()
            day = dt.datetime(2026, 10, 8)
            conn.execute(sa.insert(RECEIVABLE), [
                {"FID": first + n, "FBillNo": f"{prefix}{n + 1:06d}", "FBillTypeID": "YSD01_SYS", "FDATE": day,
                 "FENDDATE_H": day + dt.timedelta(days=30), "FCUSTOMERID": custid, "FCURRENCYID": 1,
                 "FEXCHANGERATE": Decimal(1), "FALLAMOUNTFOR": amount, "FDOCUMENTSTATUS": "C", "FCreateDate": stamp,
                 "FModifyDate": stamp}
                for n, amount in enumerate(amounts)
            ])  # fmt: skip
            conn.execute(sa.insert(RECEIVABLE_ENTRY), [
                {"FEntryID": entry + n, "FID": first + n, "FSeq": 1, "FMATERIALNAME": "CRM-DEAL", "FPriceQty": 1,
                 "FTaxPrice": amount, "FALLAMOUNTFOR_D": amount, "FORDERNUMBER": None}
                for n, amount in enumerate(amounts)
            ])  # fmt: skip

    def update(self, form_id: str, number: str, **columns: Any) -> None:
        """Change head columns of a record (by FBillNo, or FNumber for base data); FModifyDate moves."""
        form = FORMS[form_id.upper()]
        key = "FNumber" if "FNumber" in form.head.c else "FBillNo"
        with self._write() as conn:
            done = conn.execute(sa.update(form.head).where(form.head.c[key] == number)
                                .values(**columns, FModifyDate=self.clock.stamp()))  # fmt: skip
            if not done.rowcount:
                raise KeyError(f"{form_id}: no record {number}")


# --------------------------------------------------------------------------- the site


@dataclass(frozen=True)
class LoggedRequest:
    """One request as the server saw it (never a password, secret or session id)."""

    service: str  # e.g. ExecuteBillQuery
    form_id: str | None
    status: int
    start_row: int | None = None
    rows: int | None = None  # rows answered by a query
    auth: str = ""  # session | headers | login | none
    error: str | None = None


@dataclass
class K3Api(FaultsAndLog):
    """State shared by the handler threads: database, accounts, sessions, nonces, faults and the request log."""

    engine: sa.Engine
    acct_id: str = ACCT_ID
    users: dict[str, str] = field(default_factory=lambda: {USERNAME: PASSWORD})
    app_id: str = APP_ID
    app_secret: str = field(default=APP_SECRET, repr=False)
    session_ttl: float = 1200.0  # seconds without a request before a session lapses
    header_auth: bool = True  # the SDK's X-Kd-* headers open a session (False: only a login does)
    max_skew: float = 300.0  # seconds a signed timestamp may be off
    max_rows: int = 10_000  # the most rows one query answers
    stall_limit: float = 10.0
    clock: Callable[[], float] = time.time
    faults: deque[str] = field(default_factory=deque)
    requests: list[LoggedRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.write_lock = threading.Lock()
        self.stamps = _Clock()
        self.erp = ErpUser(self.engine, self.write_lock, self.stamps)
        self._sessions: dict[str, float] = {}
        self._nonces: dict[tuple[str, ...], float] = {}
        self._stalls: list[threading.Event] = []

    # ---- faults, stalls, log
    def next_fault(self, *, write: bool) -> str | None:
        """Pop the fault for this request (``pass``: none); ``reject:`` and ``drop`` wait for a save, ``short_page``
        for a query."""
        with self.lock:
            if not self.faults:
                return None
            head = self.faults[0]
            if (head.startswith(("reject:", "drop")) and not write) or (head == "short_page" and write):
                return None
            return self.faults.popleft()

    # ---- sessions and signatures
    def open_session(self) -> str:
        """Return a new session id."""
        sid = uuid.uuid4().hex
        with self.lock:
            self._sessions[sid] = self.clock() + self.session_ttl
        return sid

    def expire_sessions(self) -> None:
        """Drop every session (the ``expire_session`` fault; a restart does the same)."""
        with self.lock:
            self._sessions.clear()

    def session_valid(self, sid: str | None) -> bool:
        """Return True for a live session (and keep it alive: the timeout counts from the last request)."""
        with self.lock:
            expiry = self._sessions.get(sid or "")
            if expiry is None or self.clock() >= expiry:
                self._sessions.pop(sid or "", None)
                return False
            self._sessions[sid or ""] = self.clock() + self.session_ttl
            return True

    def check_signature(self, headers: Mapping[str, str], path: str, body: bytes) -> str | None:
        """Verify the SDK's signature headers that are present (``headers``: lower-case names); return why not, or None."""
        client_id = headers.get("x-api-clientid")
        if client_id is not None:
            own_id, _, hidden = self.app_id.partition("_")
            timestamp, nonce = headers.get("x-api-timestamp") or "", headers.get("x-api-nonce") or ""
            signature = headers.get("x-api-signature") or ""
            if client_id != own_id:
                return f"X-Api-ClientID {client_id} 未注册 (unknown client)"
            try:
                age = abs(self.clock() - int(timestamp))
            except ValueError:
                return "x-api-timestamp 无效 (not a number)"
            if age > self.max_skew:
                return f"x-api-timestamp 已过期: 相差 {age:.0f} 秒 (stale timestamp)"
            text = f"POST\n{quote(path, safe='')}\n\nx-api-nonce:{nonce}\nx-api-timestamp:{timestamp}\n"
            if not hmac.compare_digest(signature, _kd_hmac(text, _client_secret(hidden))):
                return "X-Api-Signature 签名错误 (signature mismatch)"
            # A replay is the same signed request again; the SDK's nonce is its timestamp, so different
            # requests in one second share it and are told apart by their content.
            replay = (client_id, nonce, timestamp, signature, hashlib.sha256(body).hexdigest())
            with self.lock:
                now = self.clock()
                self._nonces = {k: v for k, v in self._nonces.items() if v > now}
                if replay in self._nonces:
                    return f"x-api-nonce {nonce} 已使用 (replayed request)"
                self._nonces[replay] = now + 2 * self.max_skew
        app_key = headers.get("x-kd-appkey")
        if app_key is not None:
            data = headers.get("x-kd-appdata") or ""
            try:
                decoded = base64.b64decode(data).decode()
            except ValueError:
                return "X-Kd-Appdata 无效 (not base64)"
            if app_key != self.app_id:
                return f"X-Kd-Appkey {app_key} 未授权 (unknown app)"
            if not hmac.compare_digest(
                headers.get("x-kd-signature") or "", _kd_hmac(app_key + decoded, self.app_secret)
            ):
                return "X-Kd-Signature 签名错误: 应用密钥不符 (wrong app secret)"
            acct, user = [*decoded.split(","), "", ""][:2]
            if acct != self.acct_id or user not in self.users:
                return f"X-Kd-Appdata: 数据中心 {acct} 或用户 {user} 无效 (unknown data centre or user)"
        return None

    # ---- queries
    def query(self, data: Mapping[str, Any], short: bool) -> tuple[list[list[Any]], int]:
        """Run an ExecuteBillQuery; return the rows and StartRow."""
        form = FORMS.get(str(data.get("FormId") or "").upper())
        if form is None:
            raise QueryError(f"表单 {data.get('FormId')} 不存在 (unknown FormId)", "FormId")
        keys = [k.strip() for k in str(data.get("FieldKeys") or "").split(",") if k.strip()]
        if not keys:
            raise QueryError("FieldKeys 不能为空 (no field keys)", "FieldKeys")
        query = _Query(form).build(
            keys, str(data.get("FilterString") or ""), str(data.get("OrderString") or "")
        )
        start = max(0, int(data.get("StartRow") or 0))
        limit = int(data.get("Limit") or 0) or int(data.get("TopRowCount") or 0) or self.max_rows
        limit = min(limit, self.max_rows)
        if short:
            limit = max(1, limit // 2)
        with self.engine.connect() as conn:
            rows = conn.execute(query.offset(start).limit(limit)).all()
        return [[_wire(v) for v in row] for row in rows], start

    # ---- writes
    def save_customers(self, data: Mapping[str, Any], reject: tuple[str, str] | None) -> dict[str, Any]:
        """Save (insert or update) BD_Customer models; each is validated and written on its own."""
        models = data.get("Model")
        models = models if isinstance(models, list) else [models]
        update_only = {str(f).upper() for f in data.get("NeedUpDateFields") or []}
        audit = str(data.get("IsAutoSubmitAndAudit")).lower() == "true"
        errors: list[dict[str, Any]] = []
        successes: list[dict[str, Any]] = []
        with self.write_lock, self.engine.begin() as conn:
            for index, model in enumerate(models):
                try:
                    custid, number = self._save_customer(conn, model, update_only, audit, reject, index)
                except _Refused as refused:
                    errors.append(_error(refused.message, refused.field_name, index))
                    continue
                successes.append({"Id": custid, "Number": number, "DIndex": index})
        return status(errors, successes)

    def _save_customer(self, conn: sa.Connection, model: Any, update_only: set[str], audit: bool,
                       reject: tuple[str, str] | None, index: int) -> tuple[int, str]:  # fmt: skip
        if not isinstance(model, dict):
            raise _Refused("Model 应为 JSON 对象 (expected an object)", "Model")
        values: dict[str, Any] = {}
        for name, value in model.items():
            upper = name.upper()
            if upper in IGNORED_REFS:
                continue
            if upper not in CUSTOMER_WRITABLE:
                raise _Refused(f"字段 {name} 不存在或不允许写入 (unknown or read-only field)", name)
            column = FORMS["BD_CUSTOMER"].fields[upper][1]
            limit = getattr(CUSTOMER.c[column].type, "length", None)
            if limit and value is not None and not isinstance(value, str | dict | list):
                value = str(value)  # K3Cloud takes 42 for a text field as '42'
            if isinstance(value, dict | list):
                raise _Refused(f"字段 {name} 应为文本 (expected text)", name)
            if isinstance(value, str) and limit and len(value) > limit:
                raise _Refused(f"字段 {name} 超长: 最多 {limit} 个字符 (too long)", name)
            values[column] = None if value == "" else value
        if reject is not None and any(
            k.upper() == reject[0].upper() and str(v) == reject[1] for k, v in model.items()
        ):
            raise _Refused(
                f"业务规则校验不通过: {reject[0]} = {reject[1]} (refused by a business rule)", reject[0]
            )
        custid = int(values.pop("FCUSTID") or 0) if "FCUSTID" in values else 0
        stamp = self.stamps.stamp()
        with conn.begin_nested():
            if custid:
                row = (
                    conn.execute(sa.select(CUSTOMER).where(CUSTOMER.c["FCUSTID"] == custid))
                    .mappings()
                    .first()
                )
                if row is None:
                    raise _Refused(f"客户内码 {custid} 不存在 (no such record)", "FCUSTID")
                if update_only:
                    values = {k: v for k, v in values.items() if k.upper() in update_only}
                self._unique(conn, values, custid)
                if "FName" in values and not values["FName"]:
                    raise _Refused("客户名称 是必录项 (FName required)", "FName")
                conn.execute(
                    sa.update(CUSTOMER)
                    .where(CUSTOMER.c["FCUSTID"] == custid)
                    .values(**values, FModifyDate=stamp)
                )
                return custid, str(values.get("FNumber") or row["FNumber"])
            if not values.get("FName"):
                raise _Refused("客户名称 是必录项 (FName required)", "FName")
            self._unique(conn, values, None)
            if not values.get("FNumber"):
                while True:
                    candidate = f"CUST{next_values(conn, 'custno'):04d}"
                    if (
                        conn.execute(
                            sa.select(CUSTOMER.c.FCUSTID).where(CUSTOMER.c.FNumber == candidate)
                        ).first()
                        is None
                    ):
                        values["FNumber"] = candidate
                        break
            custid = next_values(conn, "custid")
            conn.execute(sa.insert(CUSTOMER).values(FCUSTID=custid, FDocumentStatus="C" if audit else "A",
                                                    FForbidStatus="A", FCreateDate=stamp, FModifyDate=stamp,
                                                    **values))  # fmt: skip
            return custid, str(values["FNumber"])

    def _unique(self, conn: sa.Connection, values: Mapping[str, Any], custid: int | None) -> None:
        for column, label in (("FNumber", "编码"), ("F_CRM_ID", "CRM 标识")):
            value = values.get(column)
            if not value:
                continue
            other = conn.execute(sa.select(CUSTOMER.c.FCUSTID).where(CUSTOMER.c[column] == value)).scalar()
            if other is not None and other != custid:
                raise _Refused(f"{label} {value} 已经被使用 (duplicate {column})", column)

    def operate(self, operation: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """Submit or Audit customers by Numbers: A → B → C."""
        numbers = [str(n) for n in data.get("Numbers") or []]
        before, after = ("A", "B") if operation == "Submit" else ("B", "C")
        errors, successes = [], []
        with self.write_lock, self.engine.begin() as conn:
            for index, number in enumerate(numbers):
                row = conn.execute(sa.select(CUSTOMER.c.FCUSTID, CUSTOMER.c.FDocumentStatus)
                                   .where(CUSTOMER.c.FNumber == number)).first()  # fmt: skip
                if row is None:
                    errors.append(_error(f"编码 {number} 不存在 (no such record)", "FNumber", index))
                elif row.FDocumentStatus != before:
                    errors.append(_error(f"{number} 状态为 {row.FDocumentStatus}, 不能{operation} (wrong status)",
                                         "FDocumentStatus", index))  # fmt: skip
                else:
                    conn.execute(sa.update(CUSTOMER).where(CUSTOMER.c.FCUSTID == row.FCUSTID)
                                 .values(FDocumentStatus=after, FModifyDate=self.stamps.stamp()))  # fmt: skip
                    successes.append({"Id": row.FCUSTID, "Number": number, "DIndex": index})
        return status(errors, successes)


class _Refused(Exception):
    def __init__(self, message: str, field_name: str | None) -> None:
        super().__init__(message)
        self.message, self.field_name = message, field_name


def _rot13(text: str) -> str:
    return text.translate(str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
                                        "NOPQRSTUVWXYZABCDEFGHIJKLMnopqrstuvwxyzabcdefghijklm"))  # fmt: skip


def _client_secret(hidden: str) -> str:
    """The gateway client secret hidden in an app id (XOR with Kingdee's published default code)."""
    try:
        raw = base64.b64decode(hidden, validate=True) if len(hidden) == 32 and "=" not in hidden else b""
    except ValueError:
        raw = b""
    key = _rot13(_SDK_CODE).encode()
    return base64.b64encode(bytes(b ^ key[i] for i, b in enumerate(raw))).decode()


def _kd_hmac(text: str, key: str) -> str:
    return base64.b64encode(
        hmac.new(key.encode(), text.encode(), hashlib.sha256).hexdigest().encode()
    ).decode()


# --------------------------------------------------------------------------- HTTP


def _login_fields(body: Any, names: Sequence[str]) -> dict[str, str]:
    """Login parameters by name (case-insensitive), or from the older ``{"parameters": [...]}`` list."""
    if isinstance(body, dict) and isinstance(body.get("parameters"), list):
        return {n: str(v) for n, v in zip(names, body["parameters"], strict=False)}
    lowered = {str(k).lower(): v for k, v in body.items()} if isinstance(body, dict) else {}
    return {n: str(lowered.get(n.lower(), "")) for n in names}


def make_handler(api: K3Api) -> type[BaseHTTPRequestHandler]:
    """Return the request handler class bound to ``api``."""

    class Handler(JsonHandler):
        def encode(self, body: Any) -> bytes:
            return dumps(body)

        def not_found(self, message: str) -> dict[str, Any]:
            return {"Message": message}

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            path = urlparse(self.path).path
            if path.startswith("/_test/"):
                self._control(path, raw)
                return
            service = path.rsplit("/", 1)[-1].removesuffix(".common.kdsvc")
            short = service.rsplit(".", 1)[-1]
            try:
                body = json.loads(raw or b"{}", parse_float=Decimal)
            except ValueError:
                body = None
            data = body.get("data") if isinstance(body, dict) else None
            if isinstance(data, str):  # older clients send the parameters as a JSON string
                try:
                    data = json.loads(data, parse_float=Decimal)
                except ValueError:
                    data = None
            form_id = (body.get("formid") if isinstance(body, dict) else None) or (
                data.get("FormId") if isinstance(data, dict) else None)  # fmt: skip
            write = short in ("Save", "BatchSave", "Submit", "Audit")
            fault = api.next_fault(write=write)
            refused = api.check_signature({k.lower(): v for k, v in self.headers.items()}, path, raw)
            if refused is not None:
                api.log(LoggedRequest(short, form_id, 401, error=refused))
                self._send(401, {"Message": refused, "IsSuccess": False})
                return
            if fault in ("500", "503"):
                api.log(LoggedRequest(short, form_id, int(fault)))
                self._send(
                    int(fault),
                    {
                        "Message": "服务器内部错误 (internal error)"
                        if fault == "500"
                        else "service unavailable"
                    },
                )
                return
            if fault == "expire_session":
                api.expire_sessions()
            headers: dict[str, str] = {}
            code = 200
            try:
                answer, auth, logged = self._route(short, body, data, fault, headers)
            except Exception as error:
                traceback.print_exc()
                code, answer, auth, logged = (
                    500,
                    {"Message": f"服务器内部错误: {type(error).__name__}"},
                    "",
                    {},
                )
            if fault == "timeout":
                api.stall()
            if fault == "drop":  # saved, then the connection is lost before any answer (a gateway reset)
                api.log(LoggedRequest(short, form_id, 0, auth=auth, **logged))
                self.close_connection = True
                return
            api.log(LoggedRequest(short, form_id, code, auth=auth, **logged))
            self._send(code, answer, headers)

        def _session(self) -> str | None:
            sid = self.headers.get(SESSION_COOKIE)
            for part in (self.headers.get("Cookie") or "").split(";"):
                name, _, value = part.strip().partition("=")
                if name == SESSION_COOKIE and value:
                    sid = value
            return sid

        def _route(self, short: str, body: Any, data: Any, fault: str | None,
                   headers: dict[str, str]) -> tuple[Any, str, dict[str, Any]]:  # fmt: skip
            if short in ("ValidateUser", "LoginByAppSecret"):
                return self._login(short, body, headers), "login", {}
            auth = "session" if api.session_valid(self._session()) else ""
            if not auth and api.header_auth and self.headers.get("X-Kd-Appkey"):
                sid = api.open_session()
                headers["Set-Cookie"] = f"{SESSION_COOKIE}={sid}; path=/"
                auth = "headers"
            if not auth:
                lost = status(
                    [_error("会话信息已丢失，请重新登录 (session lost: log in again)")], msg_code=SESSION_LOST
                )
                return ([[lost]] if short == "ExecuteBillQuery" else lost), "none", {"error": "session lost"}
            reject = None
            if fault and fault.startswith("reject:"):
                name, _, value = fault.removeprefix("reject:").partition("=")
                reject = (name, value)
            if short == "ExecuteBillQuery":
                if not isinstance(data, dict):
                    return [[status([_error("data 应为 JSON 对象 (bad body)")])]], auth, {}
                try:
                    rows, start = api.query(data, fault == "short_page")
                except QueryError as error:
                    return [[status([_error(str(error), error.field_name)])]], auth, {"error": str(error)}
                return rows, auth, {"start_row": start, "rows": len(rows)}
            form = str((body or {}).get("formid") or "").upper() if isinstance(body, dict) else ""
            if short in ("Save", "BatchSave", "Submit", "Audit"):
                if form not in WRITABLE:
                    return (
                        status([_error(f"表单 {form} 不支持通过本接口写入 (not writable here)", "formid")]),
                        auth,
                        {},
                    )
                if not isinstance(data, dict):
                    return status([_error("data 应为 JSON 对象 (bad body)", "data")]), auth, {}
                if short in ("Submit", "Audit"):
                    return api.operate(short, data), auth, {}
                return api.save_customers(data, reject), auth, {}
            return status([_error(f"接口 {short} 不存在 (no such service)")]), auth, {}

        def _login(self, short: str, body: Any, headers: dict[str, str]) -> dict[str, Any]:
            if short == "ValidateUser":
                values = _login_fields(body, ("acctID", "username", "password", "lcid"))
                ok = (
                    values["acctID"] == api.acct_id
                    and api.users.get(values["username"]) == values["password"]
                )
                refusal = "用户名或密码错误 (wrong user name or password)"
            else:
                values = _login_fields(body, ("acctid", "username", "appid", "appsecret", "lcid"))
                ok = (values["acctid"] == api.acct_id and values["username"] in api.users
                      and values["appid"] == api.app_id and hmac.compare_digest(values["appsecret"], api.app_secret))  # fmt: skip
                refusal = "应用ID或应用密钥错误 (wrong app id or app secret)"
            if not ok:
                return {"Message": refusal, "MessageCode": "", "LoginResultType": 0, "IsSuccessByAPI": False}
            sid = api.open_session()
            headers["Set-Cookie"] = f"{SESSION_COOKIE}={sid}; path=/"
            return {"Message": None, "MessageCode": "CheckPasswordPolicy", "LoginResultType": 1,
                    "KDSVCSessionId": sid, "IsSuccessByAPI": True,
                    "Context": {"UserName": values.get("username"), "DBid": api.acct_id, "SessionId": sid}}  # fmt: skip

    Handler.api = api
    return Handler


class K3CloudServer(ThreadedServer[K3Api]):
    """The server on its own thread: :meth:`start`, :meth:`stop`; ``url`` and ``api`` while it runs."""

    def __init__(
        self, db: str | sa.Engine, *, host: str = "127.0.0.1", port: int = 0, **options: Any
    ) -> None:
        def make_api(engine: sa.Engine) -> K3Api:
            ensure_schema(engine)
            return K3Api(engine, **options)

        super().__init__(db, make_api, make_handler, name="k3cloud", host=host, port=port, path="/k3cloud")


def serve(db: str | sa.Engine, **options: Any) -> AbstractContextManager[tuple[str, K3Api]]:
    """Run the K3Cloud WebAPI on a free port of 127.0.0.1 over database ``db``; yield its site URL and state."""
    return serving(K3CloudServer(db, **options))


def main(argv: Sequence[str] | None = None) -> None:
    """Run the server in the foreground; print its site URL on one line when ready."""
    parser = argparse.ArgumentParser(
        description="Kingdee K3Cloud WebAPI test server over a SQLAlchemy database."
    )
    parser.add_argument(
        "--db", required=True, help="SQLAlchemy URL of the K3Cloud database (created if missing)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--port",
        type=int,
        default=0,
        help=f"default 0: a free port; the demo finance project expects {DEMO_PORT}",
    )
    parser.add_argument("--acct-id", default=ACCT_ID)
    parser.add_argument("--username", default=USERNAME)
    parser.add_argument("--password", default=None, help="default: $K3_PASSWORD, else the demo's")
    parser.add_argument("--app-id", default=APP_ID)
    parser.add_argument("--app-secret", default=None, help="default: $K3_APP_SECRET, else the demo's")
    parser.add_argument("--session-ttl", type=float, default=1200.0)
    parser.add_argument("--fault", action="append", default=[], help="queue a fault (repeatable)")
    args = parser.parse_args(argv)
    server = K3CloudServer(args.db, host=args.host, port=args.port, acct_id=args.acct_id,
                           users={args.username: args.password or os.environ.get("K3_PASSWORD") or PASSWORD},
                           app_id=args.app_id, app_secret=args.app_secret or os.environ.get("K3_APP_SECRET") or APP_SECRET,
                           session_ttl=args.session_ttl)  # fmt: skip
    server.api.faults.extend(args.fault)
    run_in_foreground(server)


if __name__ == "__main__":
    main()
