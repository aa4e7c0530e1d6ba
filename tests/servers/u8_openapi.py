"""A real HTTP server on 127.0.0.1 that speaks the Yonyou U8 OpenAPI subset we write through, over a real database.

The database (any SQLAlchemy URL; SQLite files and PostgreSQL are tested) holds the U8 tables ``Customer``,
``SO_SOMain``, ``SO_SODetails`` and ``Person`` (a superset of the demo's ``U8_DDL``), each row stamped with
``ufts`` (U8's rowversion: one database-wide, strictly increasing integer bumped on every write) and
``dModifyDate``. Two bookkeeping tables live beside them: ``u8api_sequence`` (counters) and ``u8api_trade``
(tradeid → outcome, so a replayed tradeid is applied once, also after a restart).

Endpoints (the protocol, and which parts follow Yonyou's documentation, is in docs/u8_openapi.md):

* ``GET /system/token?from_account=&app_key=&app_secret=`` → ``{"errcode": "0", "token": {"id", "expiresIn"}}``
* ``GET /system/tradeid?from_account=&app_key=&token=[&count=N]`` → ``{"trade": {"id"}, "trades": [...]}``
* ``POST /api/customer/add|edit``, ``POST /api/saleorder/add`` (``{"customer": {...}}`` / ``{"saleorder":
  {..., "entry": [...]}}``; URL ``from_account, to_account, app_key, token, tradeid|biz_id, ds_sequence, sync``)
  → ``{"errcode", "errmsg", "id", "tradeid"}`` (plus ``url`` when the write was only accepted, async mode)
* ``POST /api/customer/batch_add|batch_edit``, ``POST /api/saleorder/batch_add``: ``{"customer": [{"tradeid":
  ..., ...}, ...]}`` → ``{"errcode": "0", "results": [one answer per record]}``; a bad record never stops the rest
* ``GET /api/customer/get?id=CODE``, ``GET /api/customer/batch_get?self_define1=KEY|code=CODE``,
  ``GET /api/saleorder/get?id=CODE``
* ``GET /system/result?tradeid=A,B`` → ``{"results": [{"tradeid", "state", "errcode", "errmsg", "id"}]}``
* ``POST /_test/faults`` ``{"faults": [...]}`` and ``POST /_test/release`` (test control)

``faults`` is a queue applied to the next requests (one per request, control requests excepted): ``500``,
``503``, ``429:<seconds>`` (with Retry-After), ``timeout`` (the request is handled, then the answer is held
until :meth:`U8Api.release` or ``stall_limit``), ``drop`` (the request is handled, then the connection is
closed without an answer: the client cannot know whether a write was applied), ``reset`` (the connection is
closed before the request is handled: nothing applied, no answer), ``expire_token`` (every token issued so far becomes invalid)
and ``reject:<field>=<value>`` (a business rejection of each record of that request whose field has that value);
``reject:``, ``drop`` and ``reset`` wait for the next write request (add / edit).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlparse

import sqlalchemy as sa

from tests.servers.base import (
    FaultsAndLog,
    JsonHandler,
    ThreadedServer,
    run_in_foreground,
    serving,
    wal_engine,
)

# The demo project's defaults (examples/demo/project.yaml, sync.u8.transport), so the demo needs no options.
APP_KEY, APP_SECRET = "demo-app-key", "demo-app-secret"
FROM_ACCOUNT, TO_ACCOUNT = "crm", "demo"
DEMO_PORT = 8766  # the demo project expects it; K3Cloud's test server: 8767, the steward workbench: 8765

# errcodes (strings, as U8 sends them). "0" is documented; the others are this emulator's choice.
OK = "0"
BAD_CREDENTIALS = "40001"  # app_key / app_secret / from_account do not match
BAD_ACCOUNT = "40003"  # to_account or ds_sequence unknown
BAD_TRADEID = "40004"  # tradeid not issued by this platform, or missing on an add
BAD_REQUEST = "40005"  # body is not JSON or lacks the document
INVALID_TOKEN = "40014"  # unknown or revoked token
EXPIRED_TOKEN = "42001"  # token past its expiresIn
DUPLICATE_CODE = "20001"
WRITE_FAULTS = ("reject:", "drop", "reset")  # faults that wait for a write request (add / edit)
DUPLICATE_KEY = "20002"  # cCusDefine1 (the CRM's key) already on another customer
NOT_FOUND = "20003"  # customer (edit, get, order's customercode) or order does not exist
DUPLICATE_ORDER = "20004"
MISSING = "20005"  # a required field is empty
BAD_VALUE = "20006"  # unknown or read-only field, not a number, too long
UNKNOWN_PERSON = "20007"
STALE = "20008"  # edit carried a timestamp (ufts) older than the row's
REJECTED = "20009"  # a business rule refused the record (the reject:<field>=<value> fault)
WRITE_FAILED = "20099"  # the database refused the record (constraint, data error)

metadata = sa.MetaData()

PERSON = sa.Table(
    "Person", metadata,
    sa.Column("cPersonCode", sa.String(20), primary_key=True),
    sa.Column("cPersonName", sa.String(40), nullable=False),
    sa.Column("cDepCode", sa.String(12)),
    sa.Column("bPsnPerson", sa.Integer),
    sa.Column("dModifyDate", sa.DateTime),
    sa.Column("ufts", sa.BigInteger, index=True),
)  # fmt: skip

CUSTOMER = sa.Table(
    "Customer", metadata,
    sa.Column("cCusCode", sa.String(20), primary_key=True),
    sa.Column("cCusName", sa.String(98), nullable=False),
    sa.Column("cCusAbbName", sa.String(60)),
    sa.Column("cCCCode", sa.String(12)),
    sa.Column("cDCCode", sa.String(12)),
    sa.Column("cCusAddress", sa.String(255)),
    sa.Column("cCusPhone", sa.String(100)),
    sa.Column("cCusFax", sa.String(100)),
    sa.Column("cCusEmail", sa.String(100)),
    sa.Column("cCusPerson", sa.String(100)),
    sa.Column("cCusHand", sa.String(100)),
    sa.Column("cCusRegCode", sa.String(50)),
    sa.Column("cCusBank", sa.String(100)),
    sa.Column("cCusAccount", sa.String(50)),
    sa.Column("cCusPPerson", sa.String(20)),
    sa.Column("cCusDepart", sa.String(12)),
    sa.Column("dCusDevDate", sa.String(30)),
    sa.Column("dEndDate", sa.String(30)),
    sa.Column("cCusHeadCode", sa.String(20)),
    sa.Column("iCusCreLine", sa.Float),
    sa.Column("cCusPayCond", sa.String(20)),
    sa.Column("cCusDefine1", sa.String(120), index=True),
    sa.Column("cMemo", sa.String(240)),
    sa.Column("dModifyDate", sa.DateTime),
    sa.Column("ufts", sa.BigInteger, index=True),
)  # fmt: skip

SO_MAIN = sa.Table(
    "SO_SOMain", metadata,
    sa.Column("ID", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("cSOCode", sa.String(30), nullable=False, unique=True),
    sa.Column("dDate", sa.String(30)),
    sa.Column("cBusType", sa.String(8)),
    sa.Column("cSTCode", sa.String(2)),
    sa.Column("cCusCode", sa.String(20), index=True),
    sa.Column("cDepCode", sa.String(12)),
    sa.Column("cPersonCode", sa.String(20)),
    sa.Column("cexch_name", sa.String(8)),
    sa.Column("iExchRate", sa.Float),
    sa.Column("iTaxRate", sa.Float),
    sa.Column("cMemo", sa.String(255)),
    sa.Column("cVerifier", sa.String(20)),
    sa.Column("cMaker", sa.String(20)),
    sa.Column("iStatus", sa.Integer),
    sa.Column("cDefine1", sa.String(120), index=True),
    sa.Column("dModifyDate", sa.DateTime),
    sa.Column("ufts", sa.BigInteger, index=True),
)  # fmt: skip

SO_DETAILS = sa.Table(
    "SO_SODetails", metadata,
    sa.Column("AutoID", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("ID", sa.Integer, index=True),
    sa.Column("cSOCode", sa.String(30)),
    sa.Column("iRowNo", sa.Integer),
    sa.Column("cInvCode", sa.String(60)),
    sa.Column("cInvName", sa.String(255)),
    sa.Column("iQuantity", sa.Float),
    sa.Column("iQuotedPrice", sa.Float),
    sa.Column("iUnitPrice", sa.Float),
    sa.Column("iTaxUnitPrice", sa.Float),
    sa.Column("iMoney", sa.Float),
    sa.Column("iTax", sa.Float),
    sa.Column("iSum", sa.Float),
    sa.Column("iTaxRate", sa.Float),
    sa.Column("dPreDate", sa.String(30)),
    sa.Column("iFHQuantity", sa.Float),
    sa.Column("iKPQuantity", sa.Float),
    sa.Column("dModifyDate", sa.DateTime),
    sa.Column("ufts", sa.BigInteger, index=True),
)  # fmt: skip

SEQUENCE = sa.Table(
    "u8api_sequence", metadata,
    sa.Column("name", sa.String(32), primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False),
)  # fmt: skip

TRADE = sa.Table(
    "u8api_trade", metadata,
    sa.Column("tradeid", sa.String(80), primary_key=True),
    sa.Column("state", sa.String(8), nullable=False),  # issued | pending | done (applied) | rejected
    sa.Column("operation", sa.String(40)),
    sa.Column("seq", sa.BigInteger, index=True),  # order of pending writes
    sa.Column("payload", sa.Text),  # the document of a pending (async) write
    sa.Column("errcode", sa.String(8)),
    sa.Column("errmsg", sa.Text),
    sa.Column("result_id", sa.String(40)),
    sa.Column("issued_at", sa.DateTime),
    sa.Column("done_at", sa.DateTime),
)  # fmt: skip

U8_TABLES = (PERSON, CUSTOMER, SO_MAIN, SO_DETAILS)
MAX_IN = 500  # bound of one IN (...) list


# --------------------------------------------------------------------------- documents on the wire


@dataclass(frozen=True)
class Spec:
    """How one U8 document's JSON fields map onto a table's columns."""

    table: sa.Table
    aliases: Mapping[str, str]  # wire name (documented U8 OpenAPI name) -> column
    read_only: frozenset[str]  # columns only U8 writes

    def column(self, name: str) -> str | None:
        """Return the column of a wire name or column name (either, case-insensitive), or None."""
        return self._lookup.get(name.lower())

    def wire_name(self, column: str) -> str:
        """Return the name U8 OpenAPI uses for ``column``: the documented alias, else the lowercased column."""
        return self._wire[column]

    @functools.cached_property
    def _lookup(self) -> dict[str, str]:
        found = {c.name.lower(): c.name for c in self.table.columns}
        return found | {alias.lower(): column for alias, column in self.aliases.items()}

    @functools.cached_property
    def _wire(self) -> dict[str, str]:
        names = {c.name: c.name.lower() for c in self.table.columns}
        return names | {column: alias for alias, column in self.aliases.items()}

    def to_columns(self, document: Mapping[str, Any], *, allow: Iterable[str] = ()) -> dict[str, Any]:
        """Translate a JSON document into column values; raise :class:`Rejected` for a bad field."""
        allowed = set(allow)
        values: dict[str, Any] = {}
        for name, value in document.items():
            column = self.column(name)
            if column is None:
                raise Rejected(BAD_VALUE, f"字段 {name} 不存在 (unknown field {name!r})")
            if column in self.read_only and column not in allowed:
                raise Rejected(BAD_VALUE, f"字段 {name} 由 U8 维护,不能写入 (read-only)")
            values[column] = _convert(self.table.c[column], name, value)
        return values

    def to_wire(self, row: Mapping[Any, Any]) -> dict[str, Any]:
        """Return a row as U8 OpenAPI answers it (wire names, JSON values)."""
        return {self.wire_name(column): _json_value(value) for column, value in row.items()}


def _convert(column: sa.Column[Any], name: str, value: Any) -> Any:
    if value is None or value == "":
        return None
    if isinstance(column.type, (sa.Float, sa.Integer)):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise Rejected(BAD_VALUE, f"字段 {name} 的值 {value!r} 不是数字 (not a number)") from None
        return int(number) if isinstance(column.type, sa.Integer) else number
    if isinstance(value, (dict, list)):
        raise Rejected(BAD_VALUE, f"字段 {name} 应为文本 (expected text)")
    text = str(value)
    length = getattr(column.type, "length", None)
    if length and len(text) > length:
        raise Rejected(BAD_VALUE, f"字段 {name} 超长: {len(text)} 字符,最多 {length} (too long)")
    return text


def _json_value(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    if value is not None and not isinstance(value, (str, int, float, bool)):
        return float(value)  # Decimal from a NUMERIC column
    return value


CUSTOMER_SPEC = Spec(
    CUSTOMER,
    {  # documented in the customer/add, customer/edit and customer/get pages of the U8 OpenAPI
        "code": "cCusCode", "name": "cCusName", "abbrname": "cCusAbbName", "sort_code": "cCCCode",
        "domain_code": "cDCCode", "address": "cCusAddress", "bank_open": "cCusBank",
        "bank_acc_number": "cCusAccount", "contact": "cCusPerson", "phone": "cCusPhone", "fax": "cCusFax",
        "mobile": "cCusHand", "seed_date": "dCusDevDate", "end_date": "dEndDate", "memo": "cMemo",
        "spec_operator": "cCusPPerson", "self_define1": "cCusDefine1", "timestamp": "ufts",
        "ModifyDate": "dModifyDate",
        "regcode": "cCusRegCode",  # ours (not on the pages found); the demo's sync spec uses it
    },
    frozenset({"ufts", "dModifyDate"}),
)  # fmt: skip
ORDER_SPEC = Spec(
    SO_MAIN,
    {  # U8-style names (the saleorder pages were not in the material found; see docs/u8_openapi.md)
        "id": "ID", "code": "cSOCode", "date": "dDate", "businesstype": "cBusType", "typecode": "cSTCode",
        "customercode": "cCusCode", "departmentcode": "cDepCode", "personcode": "cPersonCode",
        "currency_name": "cexch_name", "currency_rate": "iExchRate", "taxrate": "iTaxRate", "memo": "cMemo",
        "verifier": "cVerifier", "maker": "cMaker", "state": "iStatus", "define1": "cDefine1",
        "timestamp": "ufts", "ModifyDate": "dModifyDate",
    },
    frozenset({"ID", "cVerifier", "iStatus", "ufts", "dModifyDate"}),
)  # fmt: skip
ENTRY_SPEC = Spec(
    SO_DETAILS,
    {
        "autoid": "AutoID", "rowno": "iRowNo", "inventorycode": "cInvCode", "inventoryname": "cInvName",
        "quantity": "iQuantity", "quotedprice": "iQuotedPrice", "unitprice": "iUnitPrice",
        "taxunitprice": "iTaxUnitPrice", "money": "iMoney", "tax": "iTax", "sum": "iSum", "taxrate": "iTaxRate",
        "predate": "dPreDate", "fhquantity": "iFHQuantity", "kpquantity": "iKPQuantity", "timestamp": "ufts",
        "ModifyDate": "dModifyDate",
    },
    frozenset({"AutoID", "ID", "cSOCode", "iFHQuantity", "iKPQuantity", "ufts", "dModifyDate"}),
)  # fmt: skip

OPERATIONS = {  # operation -> (document section in the body, single path, batch path)
    "customer/add": ("customer", "/api/customer/add", "/api/customer/batch_add"),
    "customer/edit": ("customer", "/api/customer/edit", "/api/customer/batch_edit"),
    "saleorder/add": ("saleorder", "/api/saleorder/add", "/api/saleorder/batch_add"),
}


class Rejected(Exception):
    """A business rejection of one record: the errcode and errmsg U8 answers."""

    def __init__(self, errcode: str, errmsg: str) -> None:
        super().__init__(errmsg)
        self.errcode, self.errmsg = errcode, errmsg


@dataclass
class Answer:
    """The outcome of one write, as stored in the trade ledger and answered."""

    errcode: str = OK
    errmsg: str = ""
    id: str | None = None

    def as_dict(self, tradeid: str | None) -> dict[str, Any]:
        """Return the JSON answer of a write."""
        return {"errcode": self.errcode, "errmsg": self.errmsg, "id": self.id or "", "tradeid": tradeid or ""}


# --------------------------------------------------------------------------- schema


def _quote(conn: sa.Connection, name: str) -> str:
    return conn.dialect.identifier_preparer.quote(name)


def ensure_schema(engine: sa.Engine) -> None:
    """Create the U8 tables if missing; on an older U8 database add missing columns and number its rows' ufts."""
    with engine.begin() as conn:
        metadata.create_all(conn)
        inspector = sa.inspect(conn)
        for table in U8_TABLES:
            present = {c["name"].lower() for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name.lower() not in present:
                    kind = column.type.compile(dialect=conn.dialect)
                    conn.execute(
                        sa.text(
                            f"ALTER TABLE {_quote(conn, table.name)} ADD COLUMN {_quote(conn, column.name)} {kind}"
                        )
                    )
            indexed = {tuple(i["column_names"]) for i in inspector.get_indexes(table.name)}
            for index in table.indexes:
                if tuple(c.name for c in index.columns) not in indexed:
                    index.create(conn, checkfirst=True)
        counters = {
            "ufts": max(_max(conn, t.c.ufts) for t in U8_TABLES),
            "so_id": _max(conn, SO_MAIN.c.ID),
            "autoid": _max(conn, SO_DETAILS.c.AutoID),
            "cuscode": max((int(c) for c in conn.execute(sa.select(CUSTOMER.c.cCusCode)).scalars() if c.isdigit()), default=0),
            "tradeseq": _max(conn, TRADE.c.seq),
        }  # fmt: skip
        known = set(conn.execute(sa.select(SEQUENCE.c.name)).scalars())
        missing = [{"name": name, "value": value} for name, value in counters.items() if name not in known]
        if missing:
            conn.execute(sa.insert(SEQUENCE), missing)
        for table in U8_TABLES:  # rows written before ufts existed get stamps in key order
            key = next(iter(table.primary_key.columns))
            keys = list(conn.execute(sa.select(key).where(table.c.ufts.is_(None)).order_by(key)).scalars())
            if keys:
                first = next_values(conn, "ufts", len(keys))
                conn.execute(
                    sa.update(table).where(key == sa.bindparam("k_")).values(ufts=sa.bindparam("u_")),
                    [{"k_": k, "u_": first + n} for n, k in enumerate(keys)],
                )


def _max(conn: sa.Connection, column: sa.Column[Any]) -> int:
    return int(conn.execute(sa.select(sa.func.max(column))).scalar() or 0)


def next_values(conn: sa.Connection, name: str, count: int) -> int:
    """Reserve ``count`` values of counter ``name`` in this transaction and return the first.

    The UPDATE locks the counter row until commit, so stamps are handed out in commit order: a reader
    selecting ``ufts > cursor`` never misses a row committed later with a smaller stamp.
    """
    conn.execute(sa.update(SEQUENCE).where(SEQUENCE.c.name == name).values(value=SEQUENCE.c.value + count))
    last = conn.execute(sa.select(SEQUENCE.c.value).where(SEQUENCE.c.name == name)).scalar_one()
    return int(last) - count + 1


def _in_chunks(
    conn: sa.Connection, query: Callable[[list[Any]], sa.Select[Any]], values: Iterable[Any]
) -> list[Any]:
    items, rows = sorted(set(values)), list[Any]()
    for start in range(0, len(items), MAX_IN):
        rows.extend(conn.execute(query(items[start : start + MAX_IN])).all())
    return rows


def _now() -> dt.datetime:
    return dt.datetime.now()


# --------------------------------------------------------------------------- document writes


def add_customers(conn: sa.Connection, documents: Sequence[dict[str, Any]]) -> list[Answer]:
    """Insert customers (column dicts); one :class:`Answer` per document, rejected ones left out of the table."""
    answers = [Answer() for _ in documents]
    taken = {r[0] for r in _in_chunks(conn, lambda v: sa.select(CUSTOMER.c.cCusCode).where(CUSTOMER.c.cCusCode.in_(v)),
                                       (d["cCusCode"] for d in documents if d.get("cCusCode")))}  # fmt: skip
    keys = dict(_in_chunks(conn, lambda v: sa.select(CUSTOMER.c.cCusDefine1, CUSTOMER.c.cCusCode).where(CUSTOMER.c.cCusDefine1.in_(v)),
                           (d["cCusDefine1"] for d in documents if d.get("cCusDefine1"))))  # fmt: skip
    accepted: list[tuple[int, dict[str, Any]]] = []
    for n, document in enumerate(documents):
        code, key = document.get("cCusCode"), document.get("cCusDefine1")
        if not document.get("cCusName"):
            answers[n] = Answer(MISSING, "客户名称 (name) 必填")
        elif code and code in taken:
            answers[n] = Answer(DUPLICATE_CODE, f"客户编码 {code} 已存在 (customer code already exists)")
        elif key and key in keys:
            answers[n] = Answer(
                DUPLICATE_KEY, f"自定义项1 {key} 已用于客户 {keys[key]} (self_define1 already used)"
            )
        else:
            if code:
                taken.add(code)
            if key:
                keys[key] = code or "(本批)"
            accepted.append((n, document))
    if not accepted:
        return answers
    _assign_codes(conn, [d for _, d in accepted if not d.get("cCusCode")], taken)
    first, now = next_values(conn, "ufts", len(accepted)), _now()
    writable = [c.name for c in CUSTOMER.columns]
    rows = [
        {**dict.fromkeys(writable), **d, "dModifyDate": now, "ufts": first + i}
        for i, (_, d) in enumerate(accepted)
    ]
    conn.execute(sa.insert(CUSTOMER), rows)
    for (n, _), row in zip(accepted, rows, strict=True):
        answers[n] = Answer(OK, "", row["cCusCode"])
    return answers


def _assign_codes(conn: sa.Connection, documents: list[dict[str, Any]], taken: set[str]) -> None:
    """Give each document the next free numeric customer code (as U8's automatic numbering does)."""
    while documents:
        first = next_values(conn, "cuscode", len(documents))
        candidates = [f"{first + i:05d}" for i in range(len(documents))]
        used = taken | {r[0] for r in _in_chunks(conn, lambda v: sa.select(CUSTOMER.c.cCusCode).where(CUSTOMER.c.cCusCode.in_(v)), candidates)}  # fmt: skip
        free = [c for c in candidates if c not in used]
        for document, code in zip(documents, free, strict=False):
            document["cCusCode"] = code
            taken.add(code)
        documents = documents[len(free) :]


def edit_customers(conn: sa.Connection, documents: Sequence[dict[str, Any]]) -> list[Answer]:
    """Update customers by code with the given columns only; ``ufts`` in a document is an optimistic check."""
    answers = [Answer() for _ in documents]
    current = {r[0]: (r[1], r[2]) for r in _in_chunks(
        conn, lambda v: sa.select(CUSTOMER.c.cCusCode, CUSTOMER.c.ufts, CUSTOMER.c.cCusDefine1).where(CUSTOMER.c.cCusCode.in_(v)),
        (d["cCusCode"] for d in documents if d.get("cCusCode")))}  # fmt: skip
    keys = dict(_in_chunks(conn, lambda v: sa.select(CUSTOMER.c.cCusDefine1, CUSTOMER.c.cCusCode).where(CUSTOMER.c.cCusDefine1.in_(v)),
                           (d["cCusDefine1"] for d in documents if d.get("cCusDefine1"))))  # fmt: skip
    valid: list[tuple[int, dict[str, Any]]] = []
    for n, document in enumerate(documents):
        code, key, stamp = document.get("cCusCode"), document.get("cCusDefine1"), document.get("ufts")
        if not code:
            answers[n] = Answer(MISSING, "客户编码 (code) 必填")
        elif code not in current:
            answers[n] = Answer(NOT_FOUND, f"客户 {code} 不存在 (customer not found)")
        elif stamp is not None and int(stamp) != current[code][0]:
            answers[n] = Answer(
                STALE, f"客户 {code} 已被修改: timestamp {int(stamp)} ≠ {current[code][0]} (changed in U8)"
            )
        elif key and keys.get(key, code) != code:
            answers[n] = Answer(
                DUPLICATE_KEY, f"自定义项1 {key} 已用于客户 {keys[key]} (self_define1 already used)"
            )
        elif "cCusName" in document and not document["cCusName"]:
            answers[n] = Answer(MISSING, "客户名称 (name) 不能为空")
        else:
            valid.append((n, document))
            if key:
                keys[key] = code
            current[code] = (-1, key)  # a second edit of the same code in this batch must not carry a stamp
    if not valid:
        return answers
    first, now = next_values(conn, "ufts", len(valid)), _now()
    for i, (n, document) in enumerate(valid):
        values = {k: v for k, v in document.items() if k not in ("cCusCode", "ufts")}
        conn.execute(
            sa.update(CUSTOMER).where(CUSTOMER.c.cCusCode == document["cCusCode"])
            .values(**values, dModifyDate=now, ufts=first + i)
        )  # fmt: skip
        current[document["cCusCode"]] = (first + i, current[document["cCusCode"]][1])
        answers[n] = Answer(OK, "", document["cCusCode"])
    return answers


def add_orders(
    conn: sa.Connection, documents: Sequence[tuple[dict[str, Any], list[dict[str, Any]]]]
) -> list[Answer]:
    """Insert sales orders (head columns, entry column dicts); U8 assigns ID, cSOCode (if none) and AutoIDs."""
    answers = [Answer() for _ in documents]
    customers = {r[0] for r in _in_chunks(conn, lambda v: sa.select(CUSTOMER.c.cCusCode).where(CUSTOMER.c.cCusCode.in_(v)),
                                           (h["cCusCode"] for h, _ in documents if h.get("cCusCode")))}  # fmt: skip
    persons = {r[0] for r in _in_chunks(conn, lambda v: sa.select(PERSON.c.cPersonCode).where(PERSON.c.cPersonCode.in_(v)),
                                         (h["cPersonCode"] for h, _ in documents if h.get("cPersonCode")))}  # fmt: skip
    codes = {r[0] for r in _in_chunks(conn, lambda v: sa.select(SO_MAIN.c.cSOCode).where(SO_MAIN.c.cSOCode.in_(v)),
                                       (h["cSOCode"] for h, _ in documents if h.get("cSOCode")))}  # fmt: skip
    valid: list[tuple[int, dict[str, Any], list[dict[str, Any]]]] = []
    for n, (head, lines) in enumerate(documents):
        customer, person, code = head.get("cCusCode"), head.get("cPersonCode"), head.get("cSOCode")
        if not customer:
            answers[n] = Answer(MISSING, "客户编码 (customercode) 必填")
        elif customer not in customers:
            answers[n] = Answer(NOT_FOUND, f"客户 {customer} 不存在 (unknown customer code)")
        elif person and person not in persons:
            answers[n] = Answer(UNKNOWN_PERSON, f"业务员 {person} 不存在 (unknown person code)")
        elif code and code in codes:
            answers[n] = Answer(DUPLICATE_ORDER, f"销售订单号 {code} 已存在 (order code already exists)")
        elif not lines:
            answers[n] = Answer(MISSING, "销售订单至少需要一行 entry (an order needs lines)")
        elif missing := next((i for i, line in enumerate(lines, 1) if not line.get("cInvCode")), None):
            answers[n] = Answer(MISSING, f"第 {missing} 行: 存货编码 (inventorycode) 必填")
        else:
            valid.append((n, head, lines))
            if code:
                codes.add(code)
    if not valid:
        return answers
    line_count = sum(len(lines) for _, _, lines in valid)
    first_id = next_values(conn, "so_id", len(valid))
    first_auto = next_values(conn, "autoid", line_count)
    stamp = next_values(conn, "ufts", len(valid) + line_count)
    now, today = _now(), dt.date.today().isoformat() + " 00:00:00"
    mains, details = [], []
    generated = [f"{first_id + i:010d}" for i in range(len(valid))]
    clashes = {r[0] for r in _in_chunks(conn, lambda v: sa.select(SO_MAIN.c.cSOCode).where(SO_MAIN.c.cSOCode.in_(v)), generated)}  # fmt: skip
    for i, (n, head, lines) in enumerate(valid):
        order_id = first_id + i
        code = head.get("cSOCode") or (
            generated[i] if generated[i] not in clashes | codes else f"SO{generated[i]}"
        )
        main = {**dict.fromkeys(c.name for c in SO_MAIN.columns), "dDate": today, "cBusType": "普通销售",
                "cexch_name": "人民币", "iExchRate": 1.0, "iTaxRate": 13.0, "cMaker": "OpenAPI", **head,
                "ID": order_id, "cSOCode": code, "iStatus": 0, "dModifyDate": now, "ufts": stamp}  # fmt: skip
        stamp += 1
        mains.append(main)
        for row_no, line in enumerate(lines, 1):
            details.append({**dict.fromkeys(c.name for c in SO_DETAILS.columns), "iRowNo": row_no,
                            **_priced(line, main["iTaxRate"]), "AutoID": first_auto, "ID": order_id, "cSOCode": code,
                            "iFHQuantity": 0.0, "iKPQuantity": 0.0, "dModifyDate": now, "ufts": stamp})  # fmt: skip
            first_auto += 1
            stamp += 1
        answers[n] = Answer(OK, "", code)
    conn.execute(sa.insert(SO_MAIN), mains)
    conn.execute(sa.insert(SO_DETAILS), details)
    return answers


def _priced(line: dict[str, Any], head_rate: float | None) -> dict[str, Any]:
    """Fill the amounts U8 derives from quantity, tax-inclusive price and tax rate when they are not given."""
    line = dict(line)
    rate = line.get("iTaxRate")
    rate = line["iTaxRate"] = rate if rate is not None else (head_rate if head_rate is not None else 13.0)
    quantity, taxed = line.get("iQuantity"), line.get("iTaxUnitPrice")
    if taxed is None and line.get("iUnitPrice") is not None:
        taxed = line["iTaxUnitPrice"] = round(line["iUnitPrice"] * (1 + rate / 100), 6)
    if quantity is not None and taxed is not None:
        if line.get("iSum") is None:
            line["iSum"] = round(quantity * taxed, 2)
        if line.get("iMoney") is None:
            line["iMoney"] = round(line["iSum"] / (1 + rate / 100), 2)
        if line.get("iTax") is None:
            line["iTax"] = round(line["iSum"] - line["iMoney"], 2)
        if line.get("iUnitPrice") is None:
            line["iUnitPrice"] = round(taxed / (1 + rate / 100), 6)
    return line


# --------------------------------------------------------------------------- what a U8 user does


class ErpUser:
    """What a user does in the U8 client (approve, ship, invoice, close, edit customers); every write stamps ufts."""

    def __init__(self, engine: sa.Engine | str, lock: threading.Lock | None = None) -> None:
        self._owns_engine = not isinstance(engine, sa.Engine)
        self.engine = engine if isinstance(engine, sa.Engine) else wal_engine(engine)
        self._lock = lock or threading.Lock()

    def close(self) -> None:
        """Close the database connections (when this user was given a URL)."""
        if self._owns_engine:
            self.engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        with self._lock, self.engine.begin() as conn:
            yield conn

    def _order(self, conn: sa.Connection, code: str) -> int:
        order_id = conn.execute(sa.select(SO_MAIN.c.ID).where(SO_MAIN.c.cSOCode == code)).scalar()
        if order_id is None:
            raise LookupError(f"sales order {code} not found in U8")
        return int(order_id)

    def _set_order(self, code: str, **values: Any) -> None:
        with self._write() as conn:
            self._order(conn, code)
            conn.execute(sa.update(SO_MAIN).where(SO_MAIN.c.cSOCode == code)
                         .values(**values, dModifyDate=_now(), ufts=next_values(conn, "ufts", 1)))  # fmt: skip

    def approve_order(self, code: str, verifier: str = "demo") -> None:
        """Approve (审核) a sales order: iStatus 1, cVerifier set."""
        self._set_order(code, iStatus=1, cVerifier=verifier)

    def close_order(self, code: str) -> None:
        """Close (关闭) a sales order: iStatus 2."""
        self._set_order(code, iStatus=2)

    def _progress(self, code: str, column: str, quantities: Mapping[int, float] | None) -> None:
        with self._write() as conn:
            order_id = self._order(conn, code)
            lines = conn.execute(sa.select(SO_DETAILS.c.AutoID, SO_DETAILS.c.iRowNo, SO_DETAILS.c.iQuantity,
                                           SO_DETAILS.c[column]).where(SO_DETAILS.c["ID"] == order_id)
                                 .order_by(SO_DETAILS.c.iRowNo)).all()  # fmt: skip
            if quantities is not None and (unknown := set(quantities) - {line[1] for line in lines}):
                raise LookupError(f"sales order {code} has no row {sorted(unknown)}")
            changes = [(line[0], line[2] if quantities is None else (line[3] or 0.0) + quantities[line[1]])
                       for line in lines if quantities is None or line[1] in quantities]  # fmt: skip
            first, now = next_values(conn, "ufts", len(changes)), _now()
            for i, (auto_id, value) in enumerate(changes):
                conn.execute(sa.update(SO_DETAILS).where(SO_DETAILS.c.AutoID == auto_id)
                             .values({column: value, "dModifyDate": now, "ufts": first + i}))  # fmt: skip

    def ship(self, code: str, quantities: Mapping[int, float] | None = None) -> None:
        """Ship (发货) an order: add ``quantities`` (row number → quantity) to iFHQuantity, or ship every row in full."""
        self._progress(code, "iFHQuantity", quantities)

    def invoice(self, code: str, quantities: Mapping[int, float] | None = None) -> None:
        """Invoice (开票) an order: add ``quantities`` (row number → quantity) to iKPQuantity, or invoice every row in full."""
        self._progress(code, "iKPQuantity", quantities)

    def update_customer(self, code: str, **columns: Any) -> None:
        """Change a customer's columns (U8 names, e.g. ``iCusCreLine=500000, cCusPayCond="30"``)."""
        values = {CUSTOMER_SPEC.column(k) or k: v for k, v in columns.items()}
        if unknown := [k for k in values if k not in CUSTOMER.c]:
            raise KeyError(f"Customer has no column {unknown}")
        with self._write() as conn:
            done = conn.execute(sa.update(CUSTOMER).where(CUSTOMER.c.cCusCode == code)
                                .values(**values, dModifyDate=_now(), ufts=next_values(conn, "ufts", 1)))  # fmt: skip
            if done.rowcount != 1:
                raise LookupError(f"customer {code} not found in U8")

    def insert_customer(self, code: str, name: str, **columns: Any) -> None:
        """Create a customer as a U8 user would (U8 column names)."""
        values = {CUSTOMER_SPEC.column(k) or k: v for k, v in columns.items()}
        with self._write() as conn:
            conn.execute(sa.insert(CUSTOMER).values(cCusCode=code, cCusName=name, **values, dModifyDate=_now(),
                                                    ufts=next_values(conn, "ufts", 1)))  # fmt: skip

    def insert_person(self, code: str, name: str, department: str | None = None) -> None:
        """Create a salesperson (Person row)."""
        with self._write() as conn:
            conn.execute(sa.insert(PERSON).values(cPersonCode=code, cPersonName=name, cDepCode=department,
                                                  bPsnPerson=1, dModifyDate=_now(), ufts=next_values(conn, "ufts", 1)))  # fmt: skip


# --------------------------------------------------------------------------- the platform


@dataclass(frozen=True)
class LoggedRequest:
    """One request as the server saw it (the query's app_secret and token are never kept)."""

    method: str
    path: str
    tradeid: str | None  # the URL's tradeid (or biz:<biz_id>)
    tradeids: tuple[str, ...]  # every record's trade id in a batch
    status: int  # HTTP status answered (0: none, the connection was dropped)
    errcode: str | None  # the answer's errcode, when it had one


@dataclass
class U8Api(FaultsAndLog):
    """State shared by the handler threads: database, credentials, tokens, faults, request log, async queue."""

    engine: sa.Engine
    app_key: str = APP_KEY
    app_secret: str = field(default=APP_SECRET, repr=False)
    from_account: str = FROM_ACCOUNT
    to_account: str = TO_ACCOUNT
    ds_sequences: tuple[int, ...] = (1,)
    token_ttl: float = 7200.0  # seconds (expiresIn)
    async_mode: bool = False  # writes are accepted and applied later by a worker; results via /system/result
    batch_endpoints: bool = True  # False: the batch_* paths answer HTTP 404, like a gateway without them
    stall_limit: float = 10.0  # bound of a "timeout" fault's stall, in seconds
    clock: Callable[[], float] = time.time  # token expiry clock (tests advance it)
    faults: deque[str] = field(default_factory=deque)
    requests: list[LoggedRequest] = field(default_factory=list)
    base_url: str = ""

    def __post_init__(self) -> None:
        self.lock = threading.Lock()  # faults, tokens, request log
        self.write_lock = threading.Lock()  # one writer at a time (SQLite would answer "database is locked")
        self.erp = ErpUser(self.engine, self.write_lock)
        self._tokens: dict[str, float] = {}
        self._stalls: list[threading.Event] = []
        self._paused = False
        self._generation = 0  # bumped by every accepted write: the worker is idle only if none came meanwhile
        self._wake = threading.Condition()
        self._idle = threading.Event()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None

    # ---- faults, stalls, log
    def next_fault(self, *, write: bool = True) -> str | None:
        """Pop the fault for the request being handled; ``reject:``, ``drop`` and ``reset`` wait for a write."""
        with self.lock:
            if not self.faults or (not write and self.faults[0].startswith(WRITE_FAULTS)):
                return None
            return self.faults.popleft()

    # ---- tokens and trade ids
    def issue_token(self) -> tuple[str, float]:
        """Return a new token and its lifetime in seconds."""
        token = uuid.uuid4().hex
        with self.lock:
            self._tokens[token] = self.clock() + self.token_ttl
        return token, self.token_ttl

    def expire_tokens(self) -> None:
        """Revoke every token issued so far (the ``expire_token`` fault; a restart does the same)."""
        with self.lock:
            self._tokens.clear()

    def check_token(self, token: str | None) -> str | None:
        """Return None for a valid token, else the errcode to answer."""
        with self.lock:
            expiry = self._tokens.get(token or "")
        if expiry is None:
            return INVALID_TOKEN
        return EXPIRED_TOKEN if self.clock() >= expiry else None

    def issue_tradeids(self, count: int) -> list[str]:
        """Issue ``count`` trade ids and record them in the ledger."""
        ids = [uuid.uuid4().hex for _ in range(count)]
        now = _now()
        with self.write_lock, self.engine.begin() as conn:
            conn.execute(sa.insert(TRADE), [{"tradeid": t, "state": "issued", "issued_at": now} for t in ids])
        return ids

    # ---- writes
    def write(
        self, operation: str, items: Sequence[tuple[str | None, Any]], reject: tuple[str, str] | None = None
    ) -> list[dict[str, Any]]:
        """Apply (or, in async mode, accept) one write per item (trade key, raw document); answer per item."""
        answers: list[dict[str, Any] | None] = [None] * len(items)
        todo: list[int] = []
        first_of: dict[str, int] = {}
        repeats: list[tuple[int, int]] = []
        with self.write_lock:
            with self.engine.connect() as conn:
                ledger = {r.tradeid: r for r in _in_chunks(conn, lambda v: sa.select(TRADE).where(TRADE.c.tradeid.in_(v)),
                                                           (k for k, _ in items if k))}  # fmt: skip
            for n, (key, _) in enumerate(items):
                if key is None:
                    if operation == "customer/edit":
                        todo.append(n)
                    else:
                        answers[n] = Answer(
                            BAD_TRADEID, "tradeid 或 biz_id 必填 (tradeid or biz_id required)"
                        ).as_dict(None)
                    continue
                if key in first_of:
                    repeats.append((n, first_of[key]))
                    continue
                first_of[key] = n
                row = ledger.get(key)
                if row is None and not key.startswith("biz:"):
                    answers[n] = Answer(
                        BAD_TRADEID, f"tradeid {key} 无效: 不是本平台签发的 (not issued here)"
                    ).as_dict(key)
                elif row is not None and row.state == "done":
                    answers[n] = Answer(row.errcode, row.errmsg or "", row.result_id).as_dict(key)
                elif row is not None and row.state == "pending":
                    answers[n] = self._accepted(key)
                else:
                    todo.append(n)
            if todo:
                chosen = [items[n] for n in todo]
                if self.async_mode:
                    outcome = self._enqueue(operation, chosen, set(ledger), reject)
                else:
                    outcome = self._apply(operation, chosen, set(ledger), reject)
                for n, answer in zip(todo, outcome, strict=True):
                    answers[n] = answer
        for n, first in repeats:
            answers[n] = answers[first]
        return [a for a in answers if a is not None]

    def _accepted(self, key: str) -> dict[str, Any]:
        return {"errcode": OK, "errmsg": "已受理,处理结果请按 url 查询 (accepted)", "id": "", "tradeid": key,
                "url": f"{self.base_url}/system/result?tradeid={key}"}  # fmt: skip

    def _translate(self, operation: str, document: Any, reject: tuple[str, str] | None) -> Any:
        if not isinstance(document, dict):
            raise Rejected(BAD_REQUEST, f"{OPERATIONS[operation][0]} 应为 JSON 对象 (expected an object)")
        if reject is not None and _matches(operation, document, *reject):
            raise Rejected(REJECTED, f"U8 拒绝了该记录: {reject[0]}={reject[1]} (refused by a business rule)")
        if operation == "saleorder/add":
            head = {k: v for k, v in document.items() if k != "entry"}
            lines = document.get("entry") or []
            if not isinstance(lines, list) or not all(isinstance(line, dict) for line in lines):
                raise Rejected(BAD_REQUEST, "entry 应为对象数组 (entry must be a list of objects)")
            return ORDER_SPEC.to_columns(head), [ENTRY_SPEC.to_columns(line) for line in lines]
        return CUSTOMER_SPEC.to_columns(document, allow=("ufts",) if operation == "customer/edit" else ())

    def _apply(self, operation: str, items: Sequence[tuple[str | None, Any]], known: set[str],
               reject: tuple[str, str] | None) -> list[dict[str, Any]]:  # fmt: skip
        """Apply the writes and record their outcomes in the ledger in the same transaction (caller holds write_lock)."""
        answers: list[Answer] = [Answer() for _ in items]
        documents: list[tuple[int, Any]] = []
        for n, (_, document) in enumerate(items):
            try:
                documents.append((n, self._translate(operation, document, reject)))
            except Rejected as refusal:
                answers[n] = Answer(refusal.errcode, refusal.errmsg)
        write = WRITERS[operation]
        try:
            with self.engine.begin() as conn:
                for (n, _), answer in zip(
                    documents, write(conn, [copy_document(d) for _, d in documents]), strict=True
                ):
                    answers[n] = answer
                self._record(conn, operation, items, answers, known)
        except sa.exc.OperationalError:
            raise  # the database is unwell: HTTP 500, nothing recorded, the client sends again
        except sa.exc.DBAPIError:
            self._apply_one_by_one(operation, items, documents, answers, known, write)
        return [answer.as_dict(key) for (key, _), answer in zip(items, answers, strict=True)]

    def _apply_one_by_one(self, operation: str, items: Sequence[tuple[str | None, Any]], documents: list[tuple[int, Any]],
                          answers: list[Answer], known: set[str], write: Callable[..., list[Answer]]) -> None:  # fmt: skip
        """One record broke a batch (constraint, data error): apply each alone, the culprit is rejected."""
        for n, document in documents:
            try:
                with self.engine.begin() as conn:
                    answers[n] = write(conn, [copy_document(document)])[0]
                    self._record(conn, operation, [items[n]], [answers[n]], known)
                continue
            except sa.exc.OperationalError:
                raise
            except sa.exc.DBAPIError as error:
                reason = (
                    str(error.orig).strip().splitlines()[0][:200]
                    if str(error.orig).strip()
                    else type(error.orig).__name__
                )
                answers[n] = Answer(WRITE_FAILED, f"U8 写入失败 (database refused): {reason}")
            with self.engine.begin() as conn:
                self._record(conn, operation, [items[n]], [answers[n]], known)
        translated = {n for n, _ in documents}
        rest = [n for n in range(len(items)) if n not in translated]
        if rest:
            with self.engine.begin() as conn:
                self._record(conn, operation, [items[n] for n in rest], [answers[n] for n in rest], known)

    def _record(self, conn: sa.Connection, operation: str, items: Sequence[tuple[str | None, Any]],
                answers: Sequence[Answer], known: set[str]) -> None:  # fmt: skip
        now = _now()
        rows = [{"k_": key, "state": "done" if a.errcode == OK else "rejected", "operation": operation, "errcode": a.errcode, "errmsg": a.errmsg,
                 "result_id": a.id, "done_at": now, "payload": None}
                for (key, _), a in zip(items, answers, strict=True) if key is not None]  # fmt: skip
        self._store(conn, rows, known)

    def _store(self, conn: sa.Connection, rows: list[dict[str, Any]], known: set[str]) -> None:
        updates = [r for r in rows if r["k_"] in known]
        inserts = [{**{k: v for k, v in r.items() if k != "k_"}, "tradeid": r["k_"], "issued_at": _now()}
                   for r in rows if r["k_"] not in known]  # fmt: skip
        if updates:
            values: dict[str, Any] = {k: sa.bindparam(k) for k in updates[0] if k != "k_"}
            conn.execute(
                sa.update(TRADE).where(TRADE.c.tradeid == sa.bindparam("k_")).values(values), updates
            )
        if inserts:
            conn.execute(sa.insert(TRADE), inserts)

    def _enqueue(self, operation: str, items: Sequence[tuple[str | None, Any]], known: set[str],
                 reject: tuple[str, str] | None) -> list[dict[str, Any]]:  # fmt: skip
        """Async mode: store each write as pending (a matching reject fault is decided now); answer "accepted"."""
        keyed = [(key, document) for key, document in items if key is not None]
        with self.engine.begin() as conn:
            first = next_values(conn, "tradeseq", len(keyed)) if keyed else 0
            rows = []
            for n, (key, document) in enumerate(keyed):
                row: dict[str, Any] = {"k_": key, "operation": operation, "seq": first + n, "state": "pending",
                                       "payload": json.dumps(document, ensure_ascii=False)}  # fmt: skip
                if (
                    reject is not None
                    and isinstance(document, dict)
                    and _matches(operation, document, *reject)
                ):
                    row.update(state="rejected", payload=None, errcode=REJECTED, done_at=_now(),
                               errmsg=f"U8 拒绝了该记录: {reject[0]}={reject[1]} (refused by a business rule)")  # fmt: skip
                rows.append(row)
            self._store(conn, rows, known)
        with self._wake:
            self._generation += 1
            self._idle.clear()
            self._wake.notify_all()
        return [
            self._accepted(key) if key else Answer(BAD_TRADEID, "tradeid 必填").as_dict(None)
            for key, _ in items
        ]

    def results(self, keys: Sequence[str]) -> list[dict[str, Any]]:
        """Return the ledger state of each trade id (``unknown`` when it was never issued nor used)."""
        with self.engine.connect() as conn:
            rows = {
                r.tradeid: r
                for r in _in_chunks(conn, lambda v: sa.select(TRADE).where(TRADE.c.tradeid.in_(v)), keys)
            }
        answers = []
        for key in keys:
            row = rows.get(key)
            state = "unknown" if row is None else "done" if row.state == "rejected" else row.state
            answers.append({"tradeid": key, "state": state, "errcode": row.errcode if row is not None and state == "done" else "",
                            "errmsg": (row.errmsg or "") if row is not None and state == "done" else "",
                            "id": (row.result_id or "") if row is not None else ""})  # fmt: skip
        return answers

    # ---- the async worker
    def start_worker(self) -> None:
        """Start the thread that applies pending (async) writes in arrival order."""
        self._worker = threading.Thread(target=self._work, name="u8-async-worker", daemon=True)
        self._worker.start()

    def stop_worker(self) -> None:
        """Stop the worker thread."""
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        if self._worker is not None:
            self._worker.join(timeout=10)

    def pause_async(self) -> None:
        """Keep accepted writes pending until :meth:`resume_async` (tests observe the pending state)."""
        with self._wake:
            self._paused = True

    def resume_async(self) -> None:
        """Let the worker apply pending writes again."""
        with self._wake:
            self._paused = False
            self._wake.notify_all()

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until no write is pending (the worker must be running and not paused); return whether it is so."""
        if self._worker is None:
            return True  # sync mode: nothing is ever pending
        with self._wake:
            self._wake.notify_all()
        return self._idle.wait(timeout)

    def _work(self) -> None:
        while not self._stop.is_set():
            with self._wake:
                if self._paused:
                    self._wake.wait(0.5)
                    continue
                generation = self._generation
            try:
                applied = self._apply_pending()
            except Exception as error:  # the worker must survive a bad moment of the database
                print(f"u8 async worker: {type(error).__name__}: {error}", file=sys.stderr)
                applied = 0
            if applied == 0:
                with self._wake:
                    if self._generation == generation and not self._paused:
                        self._idle.set()
                        self._wake.wait(0.5)

    def _apply_pending(self, limit: int = 500) -> int:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(TRADE.c.tradeid, TRADE.c.operation, TRADE.c.payload)
                                .where(TRADE.c.state == "pending").order_by(TRADE.c.seq).limit(limit)).all()  # fmt: skip
        start = 0
        while start < len(rows):  # consecutive writes of one operation are applied together
            end = start
            while end < len(rows) and rows[end].operation == rows[start].operation:
                end += 1
            chunk = rows[start:end]
            with self.write_lock:
                self._apply(
                    chunk[0].operation,
                    [(r.tradeid, json.loads(r.payload)) for r in chunk],
                    {r.tradeid for r in chunk},
                    None,
                )
            start = end
        return len(rows)


WRITERS: dict[str, Callable[[sa.Connection, Any], list[Answer]]] = {
    "customer/add": add_customers,
    "customer/edit": edit_customers,
    "saleorder/add": add_orders,
}


def copy_document(document: Any) -> Any:
    """Copy a translated document (writers fill in assigned codes)."""
    if isinstance(document, tuple):
        head, lines = document
        return dict(head), [dict(line) for line in lines]
    return dict(document)


def _matches(operation: str, document: Mapping[str, Any], name: str, value: str) -> bool:
    """Whether a raw document (or one of its entry lines) has ``name`` (wire or column name) equal to ``value``."""
    specs = (ORDER_SPEC, ENTRY_SPEC) if operation == "saleorder/add" else (CUSTOMER_SPEC,)
    parts = [document, *(document.get("entry") or [])] if operation == "saleorder/add" else [document]
    for spec, part in ((s, p) for s in specs for p in parts):
        wanted = spec.column(name)
        if wanted is None or not isinstance(part, dict):
            continue
        if any(spec.column(k) == wanted and str(v) == value for k, v in part.items()):
            return True
    return False


# --------------------------------------------------------------------------- HTTP


def make_handler(api: U8Api) -> type[BaseHTTPRequestHandler]:
    """Return the request handler class bound to ``api``."""

    class Handler(JsonHandler):
        control_ok: ClassVar[dict[str, Any]] = {"errcode": OK}

        def not_found(self, message: str) -> dict[str, Any]:
            return {"errcode": "404", "errmsg": message}

        def do_GET(self) -> None:
            self._handle(None)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self._handle(self.rfile.read(length))  # read first: keep-alive needs the body consumed

        def _handle(self, raw: bytes | None) -> None:
            url = urlparse(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            if url.path.startswith("/_test/"):
                self._control(url.path, raw)
                return
            body: Any = None
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None  # not JSON: every write answers BAD_REQUEST
            writes = url.path.startswith("/api/") and url.path.endswith(("add", "edit"))
            fault = api.next_fault(write=writes)
            trade = query.get("tradeid") or (f"biz:{query['biz_id']}" if query.get("biz_id") else None)
            batch_ids = (
                tuple(str(r.get("tradeid") or "") for r in _records(body))
                if url.path.split("/")[-1].startswith("batch_")
                else ()
            )
            # reset: the connection is lost before U8 takes the write (nothing applied, no answer)
            if fault == "reset":
                api.log(LoggedRequest(self.command, url.path, trade, batch_ids, 0, None))
                self.close_connection = True
                return
            status, answer, headers = self._fault_answer(fault)
            if status == 0 and not api.batch_endpoints and url.path.endswith(("/batch_add", "/batch_edit")):
                status, answer = 404, {"errcode": "40400", "errmsg": f"接口 {url.path} 不存在 (no such API)"}
            if status == 0:
                if fault == "expire_token":
                    api.expire_tokens()
                reject = None
                if fault and fault.startswith("reject:"):
                    name, _, value = fault.removeprefix("reject:").partition("=")
                    reject = (name, value)
                try:
                    status, answer = 200, self._route(url.path, query, body, trade, reject)
                except Exception as error:  # an unwell database: the client should send again later
                    traceback.print_exc()  # on stderr: a bug of this server must not pass for a transient fault
                    status, answer = (
                        500,
                        {"errcode": "50000", "errmsg": f"服务器内部错误: {type(error).__name__}"},
                    )
                if fault == "timeout":
                    api.stall()
            if fault == "drop":  # applied, then the connection is lost before any answer (a gateway reset)
                api.log(LoggedRequest(self.command, url.path, trade, batch_ids, 0, None))
                self.close_connection = True
                return
            api.log(
                LoggedRequest(
                    self.command,
                    url.path,
                    trade,
                    batch_ids,
                    status,
                    answer.get("errcode") if isinstance(answer, dict) else None,
                )
            )
            self._send(status, answer, headers)

        def _fault_answer(self, fault: str | None) -> tuple[int, Any, dict[str, str]]:
            if fault in ("500", "503"):
                return (
                    int(fault),
                    {
                        "errcode": fault,
                        "errmsg": "service unavailable" if fault == "503" else "internal error",
                    },
                    {},
                )
            if fault and fault.startswith("429"):
                seconds = fault.partition(":")[2] or "1"
                return (
                    429,
                    {"errcode": "45011", "errmsg": "调用频率超限 (rate limited)"},
                    {"Retry-After": seconds},
                )
            return 0, None, {}

        def _route(
            self,
            path: str,
            query: dict[str, str],
            body: Any,
            trade: str | None,
            reject: tuple[str, str] | None,
        ) -> dict[str, Any]:
            if path == "/system/token":
                if (query.get("app_key"), query.get("app_secret"), query.get("from_account")) != (
                    api.app_key,
                    api.app_secret,
                    api.from_account,
                ):
                    return {
                        "errcode": BAD_CREDENTIALS,
                        "errmsg": "app_key、app_secret 或 from_account 无效 (invalid credentials)",
                    }
                token, ttl = api.issue_token()
                return {
                    "errcode": OK,
                    "errmsg": "",
                    "token": {"id": token, "expiresIn": int(ttl) if ttl == int(ttl) else ttl},
                }
            if (query.get("app_key"), query.get("from_account")) != (api.app_key, api.from_account):
                return {
                    "errcode": BAD_CREDENTIALS,
                    "errmsg": "app_key 或 from_account 无效 (invalid credentials)",
                }
            if refused := api.check_token(query.get("token")):
                return {
                    "errcode": refused,
                    "errmsg": "token 已过期 (token expired)"
                    if refused == EXPIRED_TOKEN
                    else "token 无效 (invalid token)",
                }
            if path == "/system/tradeid":
                count = max(1, min(1000, int(query.get("count") or 1)))
                ids = api.issue_tradeids(count)
                return {
                    "errcode": OK,
                    "errmsg": "",
                    "trade": {"id": ids[0]},
                    "trades": [{"id": i} for i in ids],
                }
            if path == "/system/result":
                keys = [k for part in (query.get("tradeid") or "").split(",") if (k := part.strip())]
                return {"errcode": OK, "errmsg": "", "results": api.results(keys)}
            if (
                query.get("to_account") != api.to_account
                or int(query.get("ds_sequence") or api.ds_sequences[0]) not in api.ds_sequences
            ):
                return {
                    "errcode": BAD_ACCOUNT,
                    "errmsg": "to_account 或 ds_sequence 无效 (unknown data source)",
                }
            if path in ("/api/customer/get", "/api/saleorder/get"):
                return self._get(path, query)
            if path == "/api/customer/batch_get":
                return self._customer_list(query)
            for operation, (section, single, batch) in OPERATIONS.items():
                if path == single:
                    if not isinstance(body, dict) or section not in body:
                        return {
                            "errcode": BAD_REQUEST,
                            "errmsg": f'请求体应为 {{"{section}": {{...}}}} (bad body)',
                            "tradeid": trade or "",
                        }
                    return api.write(operation, [(trade, body[section])], reject)[0]
                if path == batch:
                    if not isinstance(body, dict) or not isinstance(body.get(section), list):
                        return {
                            "errcode": BAD_REQUEST,
                            "errmsg": f'请求体应为 {{"{section}": [...]}} (bad body)',
                        }
                    items = [(_record_key(r), _record_document(r)) for r in body[section]]
                    return {"errcode": OK, "errmsg": "", "results": api.write(operation, items, reject)}
            return {"errcode": "40400", "errmsg": f"接口 {path} 不存在 (no such API)"}

        def _get(self, path: str, query: dict[str, str]) -> dict[str, Any]:
            code = query.get("id") or ""
            with api.engine.connect() as conn:
                if path == "/api/customer/get":
                    row = (
                        conn.execute(sa.select(CUSTOMER).where(CUSTOMER.c.cCusCode == code))
                        .mappings()
                        .first()
                    )
                    if row is None:
                        return {"errcode": NOT_FOUND, "errmsg": f"客户 {code} 不存在 (customer not found)"}
                    return {"errcode": OK, "errmsg": "", **CUSTOMER_SPEC.to_wire(row)}
                head = conn.execute(sa.select(SO_MAIN).where(SO_MAIN.c.cSOCode == code)).mappings().first()
                if head is None:
                    return {"errcode": NOT_FOUND, "errmsg": f"销售订单 {code} 不存在 (order not found)"}
                lines = (
                    conn.execute(
                        sa.select(SO_DETAILS)
                        .where(SO_DETAILS.c["ID"] == head["ID"])
                        .order_by(SO_DETAILS.c.iRowNo)
                    )
                    .mappings()
                    .all()
                )
            return {
                "errcode": OK,
                "errmsg": "",
                **ORDER_SPEC.to_wire(head),
                "entry": [ENTRY_SPEC.to_wire(line) for line in lines],
            }

        def _customer_list(self, query: dict[str, str]) -> dict[str, Any]:
            page, size = (
                max(1, int(query.get("page_index") or 1)),
                max(1, min(500, int(query.get("rows_per_page") or 20))),
            )
            where = []
            for name, value in query.items():
                column = (
                    CUSTOMER_SPEC.column(name)
                    if name in ("code", "name", "self_define1", "cCusDefine1", "cCusCode")
                    else None
                )
                if column is not None and value:
                    where.append(CUSTOMER.c[column] == value)
            with api.engine.connect() as conn:
                total = conn.execute(
                    sa.select(sa.func.count()).select_from(CUSTOMER).where(*where)
                ).scalar_one()
                rows = conn.execute(sa.select(CUSTOMER).where(*where).order_by(CUSTOMER.c.cCusCode)
                                    .limit(size).offset((page - 1) * size)).mappings().all()  # fmt: skip
            return {"errcode": OK, "errmsg": "", "page_index": page, "rows_per_page": size, "row_count": total,
                    "page_count": -(-total // size), "customer": [CUSTOMER_SPEC.to_wire(r) for r in rows]}  # fmt: skip

    Handler.api = api
    return Handler


def _records(body: Any) -> list[dict[str, Any]]:
    if not isinstance(body, dict):
        return []
    for section in ("customer", "saleorder"):
        if isinstance(body.get(section), list):
            return [r for r in body[section] if isinstance(r, dict)]
    return []


def _record_key(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    if record.get("tradeid"):
        return str(record["tradeid"])
    return f"biz:{record['biz_id']}" if record.get("biz_id") else None


def _record_document(record: Any) -> Any:
    if not isinstance(record, dict):
        return record
    return {k: v for k, v in record.items() if k not in ("tradeid", "biz_id")}


class U8OpenApiServer(ThreadedServer[U8Api]):
    """The server on its own thread: :meth:`start`, :meth:`stop`; ``url`` and ``api`` while it runs."""

    def __init__(
        self, db: str | sa.Engine, *, host: str = "127.0.0.1", port: int = 0, **options: Any
    ) -> None:
        def make_api(engine: sa.Engine) -> U8Api:
            ensure_schema(engine)
            return U8Api(engine, **options)

        super().__init__(db, make_api, make_handler, name="u8-openapi", host=host, port=port, path="")
        self.api.base_url = self.url

    def on_start(self) -> None:
        """Start the worker that applies accepted writes later (async mode)."""
        if self.api.async_mode:
            self.api.start_worker()

    def on_stop(self) -> None:
        """Stop the async worker."""
        self.api.stop_worker()


def serve(db: str | sa.Engine, **options: Any) -> AbstractContextManager[tuple[str, U8Api]]:
    """Run the U8 OpenAPI on a free port of 127.0.0.1 over database ``db``; yield its base URL and state."""
    return serving(U8OpenApiServer(db, **options))


def main(argv: Sequence[str] | None = None) -> None:
    """Run the server in the foreground; print its URL on one line when ready."""
    parser = argparse.ArgumentParser(description="Yonyou U8 OpenAPI test server over a SQLAlchemy database.")
    parser.add_argument("--db", required=True, help="SQLAlchemy URL of the U8 database (created or upgraded)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--port", type=int, default=0, help=f"default 0: a free port; the demo project expects {DEMO_PORT}"
    )
    parser.add_argument("--app-key", default=APP_KEY)
    parser.add_argument("--app-secret", default=None, help="default: $U8_APP_SECRET, else the demo's secret")
    parser.add_argument("--from-account", default=FROM_ACCOUNT)
    parser.add_argument("--to-account", default=TO_ACCOUNT)
    parser.add_argument("--token-ttl", type=float, default=7200.0, help="token lifetime in seconds")
    parser.add_argument(
        "--async", dest="async_mode", action="store_true", help="accept writes, apply them later"
    )
    parser.add_argument("--fault", action="append", default=[], help="queue a fault (repeatable)")
    args = parser.parse_args(argv)
    server = U8OpenApiServer(args.db, host=args.host, port=args.port, app_key=args.app_key,
                             app_secret=args.app_secret or os.environ.get("U8_APP_SECRET") or APP_SECRET,
                             from_account=args.from_account, to_account=args.to_account, token_ttl=args.token_ttl,
                             async_mode=args.async_mode)  # fmt: skip
    server.api.faults.extend(args.fault)
    run_in_foreground(server)


if __name__ == "__main__":
    main()
