"""Kingdee K3Cloud (金蝶云星空) WebAPI: the sync engine's transport and a source connector for the mapping engine.

:class:`K3CloudClient` speaks the documented WebAPI: a session by user/password (``AuthService.ValidateUser``)
or by app id/secret (``AuthService.LoginByAppSecret``), kept in the ``kdservice-sessionid`` cookie and renewed
once when K3Cloud says it is lost; ``DynamicFormService.ExecuteBillQuery`` (``FormId``, ``FieldKeys``,
``FilterString``, ``OrderString``, ``StartRow``/``Limit``); ``Save``/``BatchSave`` (``NeedUpDateFields``,
``IsAutoSubmitAndAudit``), ``Submit`` and ``Audit``. Every request carries the signature headers Kingdee's own
Python SDK (``kingdee.cdp.webapi.sdk``, ``k3cloud_webapi_sdk``) sends when an app id is configured
(:func:`sign_headers`, byte-for-byte the same for the same inputs; tests compare them).

As a transport it turns the engine's deliveries into one :class:`~integration.connectors.u8_openapi.Outcome`
each (the same shape as U8's, so ``integration.sync.outbox.deliver`` works unchanged): ``ResponseStatus``'s
``SuccessEntitys`` (``Id``, ``Number``, ``DIndex``) become ``applied`` with the K3Cloud number, its ``Errors``
(``FieldName``, ``Message``, ``DIndex``) ``rejected`` with the message, transport failures ``retry``.

As a source (:class:`K3CloudConnector`, ``connector: k3cloud`` in project.yaml) it reads forms page by page
through ExecuteBillQuery, so receivables and receipts load through the same mapping engine, loader and
journal as every other source; incremental reads follow ``FModifyDate`` (see docs/k3cloud.md).

Passwords, app secrets and session ids never appear in messages, exceptions or ``repr``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote, urlparse

import pandas as pd
import requests

from crm_core.errors import ExtractError, SyncError, TransientExtractError
from integration.connectors.base import ReadRequest, filter_chunks, tag_rows
from integration.sync.transport import (
    Delivery,
    Outcome,
    SessionClient,
    Transient,
    deliver_in_groups,
    request_failure,
    scrub,
    unwell,
)

if TYPE_CHECKING:
    from integration.sync.spec import K3CloudTransport

SERVICES = "Kingdee.BOS.WebApi.ServicesStub"
VALIDATE_USER = f"{SERVICES}.AuthService.ValidateUser"
LOGIN_BY_APP_SECRET = f"{SERVICES}.AuthService.LoginByAppSecret"
FORM_SERVICE = f"{SERVICES}.DynamicFormService"
SESSION_COOKIE = "kdservice-sessionid"
LOGIN_OK = 1  # LoginResultType of a successful login
SESSION_LOST = 1  # ResponseStatus.MsgCode: 会话信息已丢失 (the session expired or the server restarted)
MAX_QUERY_ROWS = 10_000  # a page larger than this is not asked for
# operation -> (FormId, is an edit): both are Save; an edit carries the record's K3Cloud id
OPERATIONS: dict[str, tuple[str, bool]] = {"BD_Customer/add": ("BD_Customer", False),
                                           "BD_Customer/edit": ("BD_Customer", True)}  # fmt: skip
# The field holding a form's internal id (Save updates the record with this id); FID for bills.
ID_FIELDS: dict[str, str] = {
    "BD_Customer": "FCUSTID",
    "BD_MATERIAL": "FMATERIALID",
    "BD_Supplier": "FSUPPLIERID",
}
# The XOR key Kingdee's SDK decodes the secret part of an app id with (k3cloud_webapi_sdk.util.encode_util:
# the four eight-character blocks of its default code, rot13'd; the SDK's random digits fall between them).
_SDK_CODE = "0054s397p6234378o09pn7q3r5qropr7"
_BASE64_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
SDK_USER_AGENT = "Kingdee/Python WebApi SDK 7.3 (compatible; MSIE 6.0; Windows NT 5.1;SV1)"


class K3CloudError(SyncError):
    """K3Cloud could not be used: wrong credentials or signature, or (``transient``) not reachable now."""

    def __init__(self, message: str, *, transient: bool = False, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.retry_after = retry_after


# --------------------------------------------------------------------------- the SDK's request signature


def _rot13(text: str) -> str:
    def shift(ch: str) -> str:
        if ch.islower():
            return chr((ord(ch) - 97 + 13) % 26 + 97)
        if ch.isupper():
            return chr((ord(ch) - 65 + 13) % 26 + 65)
        return ch

    return "".join(shift(c) for c in text)


def decode_app_secret(part: str) -> str:
    """Return the gateway client secret hidden in the part of an app id after ``_`` (the SDK's DecodeAppSecret)."""
    if len(part) != 32 or not set(part) <= _BASE64_ALPHABET:  # the SDK decodes nothing else
        return ""
    try:
        raw = base64.b64decode(part, validate=True)
    except ValueError:
        return ""
    key = _rot13(_SDK_CODE).encode()
    return base64.b64encode(bytes(b ^ key[i] for i, b in enumerate(raw))).decode()


def kd_hmac(content: str, key: str) -> str:
    """HMAC-SHA256 as the SDK encodes it: the hex digest, base64-encoded."""
    digest = hmac.new(key.encode(), content.encode(), hashlib.sha256).hexdigest()
    return base64.b64encode(digest.encode()).decode()


def signed_path(url: str) -> str:
    """Return the request path as the SDK signs it: URL-encoded, ``/`` as ``%2F``."""
    path = urlparse(url).path if url.startswith("http") else url
    return quote(path, safe="", encoding="utf-8")


def app_data(acct_id: str, username: str, lcid: int, org_num: str | int) -> str:
    """Return the ``X-Kd-Appdata`` text before base64: data centre, user, language and organisation."""
    return f"{acct_id},{username},{lcid},{org_num}"


def sign_headers(
    url: str, *, app_id: str, app_secret: str, acct_id: str, username: str, lcid: int = 2052,
    org_num: str | int = 0, timestamp: int, nonce: str,
) -> dict[str, str]:  # fmt: skip
    """Return the headers Kingdee's SDK (``WebApiClient.BuildHeader``) signs a POST to ``url`` with.

    ``X-Api-*`` are checked by Kingdee's API gateway (HMAC-SHA256 of method, path, nonce and timestamp with the
    client secret hidden in the app id); ``X-Kd-*`` identify the third-party app to K3Cloud (HMAC-SHA256 of the
    app id and the app data with the app secret).
    """
    client_id, _, hidden = app_id.partition("_")
    client_secret = decode_app_secret(hidden) if hidden and "_" not in hidden else ""
    if not hidden or "_" in hidden:
        client_id = ""
    text = f"POST\n{signed_path(url)}\n\nx-api-nonce:{nonce}\nx-api-timestamp:{timestamp}\n"
    data = app_data(acct_id, username, lcid, org_num)
    return {
        "X-Api-ClientID": client_id,
        "X-Api-Auth-Version": "2.0",
        "x-api-timestamp": str(timestamp),
        "x-api-nonce": nonce,
        "x-api-signheaders": "x-api-timestamp,x-api-nonce",
        "X-Api-Signature": kd_hmac(text, client_secret),
        "X-Kd-Appkey": app_id,
        "X-Kd-Appdata": base64.b64encode(data.encode()).decode(),
        "X-Kd-Signature": kd_hmac(app_id + data, app_secret),
    }


# --------------------------------------------------------------------------- the client


@dataclass(frozen=True)
class K3CloudCredentials:
    """Where K3Cloud is and who we are to it (project.yaml's values, secrets already expanded)."""

    base_url: str  # the site, e.g. http://erp.example.com/k3cloud
    acct_id: str  # 数据中心 ID
    username: str
    password: str | None = None  # ValidateUser
    app_id: str | None = None  # LoginByAppSecret, and the SDK's signature headers
    app_secret: str | None = None
    lcid: int = 2052
    org_num: str = "0"

    def __repr__(self) -> str:
        return (
            f"K3CloudCredentials(base_url={self.base_url!r}, acct_id={self.acct_id!r}, "
            f"username={self.username!r}, password={'***' if self.password else None}, app_id={self.app_id!r}, "
            f"app_secret={'***' if self.app_secret else None}, lcid={self.lcid}, org_num={self.org_num!r})"
        )

    @property
    def by_app(self) -> bool:
        """Return True when the session is opened with the app id and secret (else user and password)."""
        return bool(self.app_id and self.app_secret)


@dataclass(frozen=True)
class Status:
    """``Result.ResponseStatus`` of a Save, BatchSave, Submit or Audit answer."""

    is_success: bool
    errors: tuple[dict[str, Any], ...]  # {FieldName, Message, DIndex}
    successes: tuple[dict[str, Any], ...]  # {Id, Number, DIndex}
    msg_code: int = 0

    @classmethod
    def of(cls, answer: Any) -> Status:
        """Read the status out of an answer (a missing or odd one counts as a failure)."""
        result = answer.get("Result") if isinstance(answer, dict) else None
        status = result.get("ResponseStatus") if isinstance(result, dict) else None
        if not isinstance(status, dict):
            return cls(
                False, ({"FieldName": None, "Message": f"unexpected answer: {str(answer)[:200]}"},), ()
            )
        errors = tuple(e for e in status.get("Errors") or [] if isinstance(e, dict))
        successes = tuple(e for e in status.get("SuccessEntitys") or [] if isinstance(e, dict))
        try:
            msg_code = int(status.get("MsgCode") or 0)
        except (TypeError, ValueError):
            msg_code = 0
        return cls(bool(status.get("IsSuccess")), errors, successes, msg_code)


def _session_lost(answer: Any) -> bool:
    """Return True when K3Cloud says the session is gone (MsgCode 1), in a status or a query's error row."""
    if isinstance(answer, list) and answer and isinstance(answer[0], list) and answer[0]:
        answer = answer[0][0]
    return isinstance(answer, dict) and "Result" in answer and Status.of(answer).msg_code == SESSION_LOST


def query_error(answer: Any) -> Status | None:
    """Return the status of an ExecuteBillQuery answer that is an error (``[[{"Result": ...}]]``), else None."""
    if isinstance(answer, dict) and "Result" in answer:
        return Status.of(answer)
    if (
        isinstance(answer, list) and len(answer) == 1 and isinstance(answer[0], list) and len(answer[0]) == 1
        and isinstance(answer[0][0], dict) and "Result" in answer[0][0]
    ):  # fmt: skip
        return Status.of(answer[0][0])
    return None


def _messages(errors: Sequence[Mapping[str, Any]]) -> str:
    parts = []
    for error in errors:
        name = error.get("FieldName")
        message = str(error.get("Message") or "(no message)")
        parts.append(f"{name}: {message}" if name else message)
    return "; ".join(parts) or "(no message)"


class K3CloudClient(SessionClient):
    """The K3Cloud WebAPI: session, queries, (batch) saves with submit/audit, and the engine's Transport."""

    def __init__(
        self,
        credentials: K3CloudCredentials,
        *,
        timeout: float = 30.0,
        max_batch: int = 100,
        audit: Literal["none", "auto", "explicit"] = "auto",
        crm_key_field: str | None = None,
        session: requests.Session | None = None,
    ) -> None:
        self.credentials = credentials
        self.timeout = timeout
        self.max_batch = max(1, max_batch)
        self.audit = audit
        self.crm_key_field = crm_key_field
        super().__init__(session)
        self._base = credentials.base_url.rstrip("/")
        self._sid: str | None = None
        self._spent: list[str] = []  # earlier session ids, masked too
        self._lock = threading.Lock()  # the session
        self._nonce_lock = threading.Lock()
        self._nonce = 0
        self.logins = 0  # how many times a session was opened (tests and metadata)
        self._clock = time.time

    def __repr__(self) -> str:
        return (
            f"K3CloudClient({self._base!r}, acct_id={self.credentials.acct_id!r}, max_batch={self.max_batch})"
        )

    # ------------------------------------------------------------------ session

    def login(self) -> None:
        """Open a session (ValidateUser, or LoginByAppSecret with an app id); raise :class:`K3CloudError` if refused."""
        c = self.credentials
        if c.by_app:
            service = LOGIN_BY_APP_SECRET
            body: dict[str, Any] = {"acctid": c.acct_id, "username": c.username, "appid": c.app_id,
                                    "appsecret": c.app_secret, "lcid": c.lcid}  # fmt: skip
        else:
            service = VALIDATE_USER
            body = {"acctID": c.acct_id, "username": c.username, "password": c.password or "", "lcid": c.lcid}
        with self._lock:
            self._forget_session()
            try:
                answer, response = self._http(service, body)
            except Transient as problem:
                raise K3CloudError(f"K3Cloud login failed: {problem.message}", transient=True,
                                   retry_after=problem.retry_after) from None  # fmt: skip
            result = answer if isinstance(answer, dict) else {}
            if result.get("LoginResultType") != LOGIN_OK:
                what = "app id / app secret" if c.by_app else "user name / password"
                raise K3CloudError(
                    f"K3Cloud refused the login of '{c.username}' to data centre {c.acct_id}: "
                    f"{self._scrub(str(result.get('Message') or '(no message)'))}; check acct_id and the {what}"
                )
            sid = response.cookies.get(SESSION_COOKIE) or result.get("KDSVCSessionId")
            if not sid:
                raise K3CloudError("K3Cloud accepted the login but gave no session (no kdservice-sessionid)")
            self._sid = str(sid)
            self.logins += 1

    def _forget_session(self) -> None:
        if self._sid is not None:
            self._spent = [*self._spent[-4:], self._sid]
        self._sid = None
        self._http_session.cookies.clear()

    def call(self, service: str, body: Any) -> Any:
        """Call a DynamicFormService method with the session (opened or renewed as needed; renewed once)."""
        for attempt in (1, 2):
            if self._sid is None:
                self.login()
            answer, _ = self._http(service, body)
            if not _session_lost(answer):
                return answer
            self._forget_session()
            if attempt == 2:
                raise Transient(f"K3Cloud lost a freshly opened session on {service.rsplit('.', 1)[-1]}")
        raise AssertionError("unreachable")

    def _headers(self, url: str) -> dict[str, str]:
        c = self.credentials
        headers = {"Content-Type": "application/json", "Accept-Charset": "utf-8"}
        if c.app_id:
            with self._nonce_lock:
                self._nonce = max(self._nonce + 1, time.time_ns())
                nonce = str(self._nonce)
            headers.update(sign_headers(url, app_id=c.app_id, app_secret=c.app_secret or "", acct_id=c.acct_id,
                                        username=c.username, lcid=c.lcid, org_num=c.org_num,
                                        timestamp=int(self._clock()), nonce=nonce))  # fmt: skip
        if self._sid:
            headers[SESSION_COOKIE] = self._sid
            headers["Cookie"] = f"{SESSION_COOKIE}={self._sid}"
        return headers

    def _http(self, service: str, body: Any) -> tuple[Any, requests.Response]:
        """POST one request; return the parsed answer (numbers with a fraction as Decimal) and the response."""
        url = f"{self._base}/{service}.common.kdsvc"
        short = service.rsplit(".", 1)[-1]
        failure: Transient | None = None
        try:
            response = self._http_session.post(
                url, data=json.dumps(body, ensure_ascii=False, default=str).encode(), headers=self._headers(url),
                timeout=self.timeout,
            )  # fmt: skip
        except requests.RequestException as error:
            failure = request_failure(error, system="K3Cloud", where=short, timeout=self.timeout,
                                      base_url=self._base, secrets=self._secrets(),
                                      on_timeout="a save may have been applied")  # fmt: skip
        if failure is not None:  # raised outside the except block: the requests error is not chained
            raise failure
        status = response.status_code
        problem = unwell(response, system="K3Cloud", where=short)
        if problem is not None:
            raise problem
        if status in (401, 403):
            raise K3CloudError(
                f"K3Cloud refused the request signature (HTTP {status}) on {short}: "
                f"{self._scrub(response.text[:200])}; check app_id, app_secret and the machine's clock"
            )
        if status == 404:
            raise K3CloudError(
                f"{self._base} has no {short} (HTTP 404): check base_url (e.g. http://host/k3cloud)"
            )
        renewed = response.cookies.get(SESSION_COOKIE)
        if renewed and self._sid and renewed != self._sid:  # the site reopened the session (SDK headers)
            with self._lock:
                self._spent = [*self._spent[-4:], self._sid]
                self._sid = renewed
        try:
            answer = json.loads(response.content, parse_float=Decimal)
        except ValueError:
            raise Transient(f"K3Cloud answered {short} with HTTP {status} and no JSON", stops=False) from None
        return answer, response

    def _secrets(self) -> tuple[str | None, ...]:
        return (self.credentials.password, self.credentials.app_secret, self._sid, *self._spent)

    def _scrub(self, text: str) -> str:
        """Mask the password, the app secret and every session id this client has held."""
        return scrub(text, self._secrets())

    # ------------------------------------------------------------------ queries

    def execute_bill_query(
        self, form_id: str, field_keys: Sequence[str], *, filter_string: str = "", order_string: str = "",
        start_row: int = 0, limit: int = 2000,
    ) -> list[list[Any]]:  # fmt: skip
        """Return one page of ``form_id`` rows (values in ``field_keys`` order); raise K3CloudError on an error."""
        data = {"FormId": form_id, "FieldKeys": ",".join(field_keys), "FilterString": filter_string,
                "OrderString": order_string, "TopRowCount": 0, "StartRow": start_row,
                "Limit": min(limit, MAX_QUERY_ROWS), "SubSystemId": ""}  # fmt: skip
        try:
            answer = self.call(f"{FORM_SERVICE}.ExecuteBillQuery", {"data": data})
        except Transient as problem:
            raise K3CloudError(f"K3Cloud query of {form_id} failed: {problem.message}", transient=True,
                               retry_after=problem.retry_after) from None  # fmt: skip
        error = query_error(answer)
        if error is not None:
            raise K3CloudError(
                f"K3Cloud refused the query of {form_id}: {self._scrub(_messages(error.errors))}"
            )
        if not isinstance(answer, list) or not all(isinstance(r, list) for r in answer):
            raise K3CloudError(f"K3Cloud answered the query of {form_id} with {str(answer)[:120]!r}")
        return answer

    # ------------------------------------------------------------------ writes

    def save(
        self, form_id: str, models: Sequence[dict[str, Any]], *, need_update_fields: Sequence[str] = (),
        auto_audit: bool = False,
    ) -> Status:  # fmt: skip
        """Save one model (``Save``) or several (``BatchSave``); return K3Cloud's status (DIndex = position)."""
        data: dict[str, Any] = {"NeedUpDateFields": list(need_update_fields), "NeedReturnFields": [],
                                "IsDeleteEntry": "true", "SubSystemId": "", "IsVerifyBaseDataField": "false",
                                "IsAutoSubmitAndAudit": auto_audit}  # fmt: skip
        if len(models) == 1:
            service, data["Model"] = "Save", dict(models[0])
        else:
            service, data["Model"] = "BatchSave", [dict(m) for m in models]
        return Status.of(self.call(f"{FORM_SERVICE}.{service}", {"formid": form_id, "data": data}))

    def submit(self, form_id: str, numbers: Sequence[str]) -> Status:
        """Submit (提交) records by number."""
        return self._operate("Submit", form_id, numbers)

    def audit_records(self, form_id: str, numbers: Sequence[str]) -> Status:
        """Audit (审核) records by number."""
        return self._operate("Audit", form_id, numbers)

    def _operate(self, operation: str, form_id: str, numbers: Sequence[str]) -> Status:
        data = {
            "CreateOrgId": 0,
            "Numbers": list(numbers),
            "Ids": "",
            "NetworkCtrl": "",
            "IgnoreInterationFlag": "",
        }
        return Status.of(self.call(f"{FORM_SERVICE}.{operation}", {"formid": form_id, "data": data}))

    # ------------------------------------------------------------------ the engine's Transport

    def new_trade_ids(self, count: int) -> list[str]:
        """Return ``count`` delivery ids: K3Cloud issues none, so they are ours (an add is found again by
        ``crm_key_field``, not by the id)."""
        return [uuid.uuid4().hex for _ in range(count)]

    def results(self, trade_ids: Sequence[str]) -> list[Outcome]:
        """K3Cloud answers every save synchronously: no delivery is ever pending."""
        return [
            Outcome(t, "retry", None, "K3Cloud has no pending deliveries; send it again") for t in trade_ids
        ]

    def find_applied(self, deliveries: Sequence[Delivery]) -> list[str | None]:
        """Return, per add whose answer was lost, the number of the record K3Cloud saved from it, or None.

        An add is looked up by our key (``crm_key_field``), else by the number it carried (``FNumber``); one
        with neither cannot be found again (:class:`K3CloudError`), nor can any lookup while K3Cloud is down.
        """
        found: list[str | None] = []
        for delivery in deliveries:
            form_id = OPERATIONS.get(delivery.operation, (delivery.operation.split("/")[0], False))[0]
            key = str(delivery.payload.get(self.crm_key_field) or "") if self.crm_key_field else ""
            field_key, value = (
                (self.crm_key_field, key) if key else ("FNumber", str(delivery.payload.get("FNumber") or ""))
            )
            if not value:
                raise K3CloudError(
                    f"K3Cloud cannot say whether it saved this {form_id} add: it carries neither our key "
                    "(crm_key_field) nor an FNumber; look for it in K3Cloud"
                )
            try:
                numbers = self._numbers_by(form_id, str(field_key), [value])
            except Transient as problem:
                raise K3CloudError(problem.message, transient=True, retry_after=problem.retry_after) from None
            found.append(numbers[value][1] if value in numbers else None)
        return found

    def deliver(self, deliveries: Sequence[Delivery]) -> list[Outcome]:
        """Save the documents (grouped by operation, BatchSave of ``max_batch``); one Outcome per delivery, in order."""
        for delivery in deliveries:
            if delivery.operation not in OPERATIONS:
                raise K3CloudError(
                    f"unknown K3Cloud operation {delivery.operation!r}; expected one of {', '.join(OPERATIONS)}"
                )
        return deliver_in_groups(deliveries, self.max_batch, self._send_chunk)

    def _send_chunk(
        self, operation: str, chunk: list[Delivery], indices: list[int], outcomes: list[Outcome | None]
    ) -> Transient | None:
        """Save one chunk; a transport failure (or an unreachable login / lookup) is returned, not raised."""
        try:
            try:
                self._deliver_chunk(operation, chunk, indices, outcomes)
            except K3CloudError as error:  # the login or a lookup: down now, or wrong settings
                if not error.transient:
                    raise
                raise Transient(str(error), retry_after=error.retry_after) from None
        except Transient as problem:
            return problem
        return None

    def _deliver_chunk(
        self, operation: str, chunk: list[Delivery], indices: list[int], outcomes: list[Outcome | None]
    ) -> None:
        form_id, is_edit = OPERATIONS[operation]
        id_field = ID_FIELDS.get(form_id, "FID")
        todo: list[tuple[int, Delivery, dict[str, Any]]] = []
        if is_edit:
            numbers = [str(d.payload.get("FNumber") or "") for d in chunk]
            ids = self._ids_by(form_id, id_field, "FNumber", [n for n in numbers if n])
            for i, d, number in zip(indices, chunk, numbers, strict=True):
                if number not in ids:
                    outcomes[i] = Outcome(d.trade_id, "rejected", None,
                                          f"K3Cloud has no {form_id} numbered '{number}' to edit")  # fmt: skip
                else:
                    todo.append((i, d, {**d.payload, id_field: ids[number]}))
        else:
            found: dict[str, tuple[Any, str]] = {}
            if self.crm_key_field:  # an add sent before (its answer lost): K3Cloud has it already
                keys = [str(d.payload.get(self.crm_key_field) or "") for d in chunk]
                found = self._numbers_by(form_id, self.crm_key_field, [k for k in keys if k])
            for i, d in zip(indices, chunk, strict=True):
                key = str(d.payload.get(self.crm_key_field) or "") if self.crm_key_field else ""
                if key and key in found:
                    outcomes[i] = Outcome(d.trade_id, "applied", found[key][1], None)
                else:
                    todo.append((i, d, {k: v for k, v in d.payload.items() if k != id_field}))
        if not todo:
            return
        update_fields = sorted({k for _, _, m in todo for k in m if k != id_field}) if is_edit else []
        status = self.save(form_id, [m for _, _, m in todo], need_update_fields=update_fields,
                           auto_audit=self.audit == "auto" and not is_edit)  # fmt: skip
        by_index = {int(s.get("DIndex") or 0): s for s in status.successes}
        errors: dict[int, list[dict[str, Any]]] = {}
        general: list[dict[str, Any]] = []
        for error in status.errors:
            position = error.get("DIndex")
            if isinstance(position, int) and 0 <= position < len(todo):
                errors.setdefault(position, []).append(error)
            else:
                general.append(error)
        applied: list[str] = []
        for position, (i, d, _model) in enumerate(todo):
            if position in errors or (general and position not in by_index):
                message = f"K3Cloud {form_id}: {self._scrub(_messages(errors.get(position) or general))}"
                outcomes[i] = Outcome(d.trade_id, "rejected", None, message)
            elif position in by_index:
                given = str(by_index[position].get("Number") or d.payload.get("FNumber") or "")
                outcomes[i] = Outcome(d.trade_id, "applied", given or None, None)
                if given and not is_edit:
                    applied.append(given)
            else:
                outcomes[i] = Outcome(d.trade_id, "retry", None,
                                      f"K3Cloud's answer did not cover record {position} of the batch")  # fmt: skip
        if self.audit == "explicit" and applied:
            self._submit_and_audit(form_id, applied)

    def _submit_and_audit(self, form_id: str, numbers: list[str]) -> None:
        """Submit and audit saved records; a refusal leaves them saved (K3Cloud users audit them by hand)."""
        for operation in (self.submit, self.audit_records):
            status = operation(form_id, numbers)
            if not status.is_success:
                import logging

                logging.getLogger(__name__).warning(
                    "K3Cloud %s of %s %s refused: %s", operation.__name__, form_id, ", ".join(numbers),
                    self._scrub(_messages(status.errors)),
                )  # fmt: skip
                return

    def _ids_by(self, form_id: str, id_field: str, field_key: str, values: list[str]) -> dict[str, Any]:
        return {
            v: row[0] for v, row in self._lookup(form_id, [id_field, "FNumber"], field_key, values).items()
        }

    def _numbers_by(self, form_id: str, field_key: str, values: list[str]) -> dict[str, tuple[Any, str]]:
        id_field = ID_FIELDS.get(form_id, "FID")
        found = self._lookup(form_id, [id_field, "FNumber"], field_key, values)
        return {v: (row[0], str(row[1])) for v, row in found.items()}

    def _lookup(
        self, form_id: str, fields: list[str], field_key: str, values: list[str]
    ) -> dict[str, list[Any]]:
        """Return, per value of ``field_key``, the first row of ``fields`` (an unreachable K3Cloud: Transient)."""
        found: dict[str, list[Any]] = {}
        for start in range(0, len(values), 200):
            part = values[start : start + 200]
            quoted = ",".join("'" + v.replace("'", "''") + "'" for v in part)
            try:
                rows = self.execute_bill_query(form_id, [*fields, field_key], filter_string=f"{field_key} IN ({quoted})",
                                               limit=len(part) * 2)  # fmt: skip
            except K3CloudError as error:
                if error.transient:
                    raise Transient(str(error), retry_after=error.retry_after) from None
                raise
            for row in rows:
                found.setdefault(str(row[-1]), row[:-1])
        return found


def k3cloud_client(target: str, transport: K3CloudTransport) -> K3CloudClient:
    """Return the client of a sync target's ``k3cloud`` transport, secrets expanded from the environment."""
    from integration.yamlconf import expand_env

    def value(text: str | None) -> str | None:
        return expand_env(text) if text else None

    try:
        credentials = K3CloudCredentials(
            base_url=expand_env(transport.base_url), acct_id=expand_env(transport.acct_id),
            username=expand_env(transport.username), password=value(transport.password),
            app_id=value(transport.app_id), app_secret=value(transport.app_secret), lcid=transport.lcid,
            org_num=expand_env(transport.org_num),
        )  # fmt: skip
    except KeyError as exc:
        raise SyncError(f"environment variable {exc.args[0]} is not set (sync target '{target}')") from None
    return K3CloudClient(credentials, timeout=transport.timeout, max_batch=transport.batch_size,
                         audit=transport.audit, crm_key_field=transport.crm_key_field)  # fmt: skip


# --------------------------------------------------------------------------- the source connector


@dataclass(frozen=True)
class FormTable:
    """A table of a K3Cloud source: a form read with chosen field keys (column name -> field key)."""

    form: str
    fields: dict[str, str]
    filter: str = ""  # a FilterString always applied, e.g. FDOCUMENTSTATUS = 'C'


@dataclass(frozen=True)
class K3CloudSettings:
    """A ``connector: k3cloud`` source: the login and the tables it offers."""

    credentials: K3CloudCredentials
    tables: dict[str, FormTable] = field(default_factory=dict)
    page_size: int = 2000
    timeout: float = 30.0


def column_name(field_key: str) -> str:
    """Return the column a field key is read into: ``FCUSTOMERID.FNumber`` → ``FCUSTOMERID_FNumber``."""
    return field_key.replace(".", "_")


def _filter_value(value: Any) -> str:
    if isinstance(value, pd.Timestamp):
        value = value.to_pydatetime()
    if isinstance(value, dt.datetime):
        return "'" + value.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "'"
    if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


class K3CloudConnector:
    """Reads K3Cloud forms through ExecuteBillQuery, page by page: one declared table = a form + field keys."""

    def __init__(self, name: str, settings: K3CloudSettings, *, client: K3CloudClient | None = None) -> None:
        self.name = name
        self.settings = settings
        self._client = client or K3CloudClient(settings.credentials, timeout=settings.timeout)
        self.pages = 0  # queries sent (tests and metadata)

    def describe(self) -> str:
        """Return the site and data centre (no secrets)."""
        c = self.settings.credentials
        return f"k3cloud:{c.base_url} (acct {c.acct_id})"

    def close(self) -> None:
        """Close the client's connections."""
        self._client.close()

    def list_tables(self) -> list[str]:
        """Return the tables declared for this source in project.yaml."""
        return sorted(self.settings.tables)

    def _table(self, table: str) -> FormTable:
        found = self.settings.tables.get(table)
        if found is None:
            known = ", ".join(sorted(self.settings.tables)) or "(none declared)"
            raise ExtractError(self.name, f"no table '{table}' declared under sources.{self.name}.tables; "
                                          f"declared: {known}")  # fmt: skip
        return found

    def columns(self, table: str, header_row: int | None = None) -> list[str]:
        """Return the columns of a declared table (its field keys, dots as underscores unless named)."""
        return list(self._table(table).fields)

    def read(self, request: ReadRequest) -> Iterator[pd.DataFrame]:
        """Yield the table's rows in chunks (from ``cursor_from`` on when incremental), ``where`` applied."""
        return filter_chunks(self._read(request), request.where, self.name, request.table)

    def _query(
        self, table: FormTable, keys: list[str], where: str, order: str, start: int
    ) -> list[list[Any]]:
        try:
            self.pages += 1
            return self._client.execute_bill_query(table.form, keys, filter_string=where, order_string=order,
                                                   start_row=start, limit=self.settings.page_size)  # fmt: skip
        except K3CloudError as error:
            kind = TransientExtractError if error.transient else ExtractError
            raise kind(self.name, str(error)) from None

    def _read(self, request: ReadRequest) -> Iterator[pd.DataFrame]:
        table = self._table(request.table)
        columns = list(table.fields)
        keys = list(table.fields.values())
        field_of = dict(table.fields)
        missing = [k for k in request.key if k not in field_of]
        if missing:
            raise ExtractError(self.name, f"key column(s) {missing} are not fields of table {request.table}")
        cursor = request.cursor_column
        if cursor is not None and cursor not in field_of:
            raise ExtractError(self.name, f"cursor column '{cursor}' is not a field of table {request.table}")
        # A stable order: by the cursor (incremental) and the record key, so pages neither overlap nor skip.
        order_fields = ([field_of[cursor]] if cursor else []) + [field_of[k] for k in request.key]
        order = ",".join(f"{f} ASC" for f in dict.fromkeys(order_fields))
        key_positions = [columns.index(k) for k in request.key]
        cursor_position = columns.index(cursor) if cursor else None
        bound: Any = request.cursor_from
        seen_at_bound: set[tuple[Any, ...]] = set()
        start = 0
        buffer: list[list[Any]] = []
        offset = 0
        while True:
            conditions = [f"({table.filter})"] if table.filter else []
            if cursor is not None and bound is not None:
                conditions.append(f"{field_of[cursor]} >= {_filter_value(bound)}")
            rows = self._query(table, keys, " AND ".join(conditions), order, start)
            if not rows:  # only an empty page ends a read: a short page may just be the server's limit
                break
            if cursor_position is None:
                buffer.extend(rows)
                start += len(rows)
            else:
                # From the highest cursor value read on, so a record changed meanwhile (its FModifyDate moves
                # past everything) is read again at the end instead of shifting the pages under us.
                fresh = [r for r in rows if not (_same_cursor(r[cursor_position], bound)
                                                 and tuple(r[p] for p in key_positions) in seen_at_bound)]  # fmt: skip
                buffer.extend(fresh)
                top = rows[-1][cursor_position]
                if bound is None or not _same_cursor(top, bound):
                    bound = _cursor_value(top)
                    seen_at_bound = {tuple(r[p] for p in key_positions) for r in rows
                                     if _same_cursor(r[cursor_position], bound)}  # fmt: skip
                    start = 0
                else:  # a whole page at one cursor value: step over it
                    seen_at_bound |= {tuple(r[p] for p in key_positions) for r in rows}
                    start += len(rows)
            while len(buffer) >= request.chunk_rows:
                chunk, buffer = buffer[: request.chunk_rows], buffer[request.chunk_rows :]
                yield self._frame(chunk, columns, request, offset)
                offset += len(chunk)
        if buffer or offset == 0:
            yield self._frame(buffer, columns, request, offset)

    def _frame(
        self, rows: list[list[Any]], columns: list[str], request: ReadRequest, offset: int
    ) -> pd.DataFrame:
        frame = pd.DataFrame.from_records(rows, columns=columns) if rows else pd.DataFrame(
            {c: pd.Series(dtype=object) for c in columns})  # fmt: skip
        if request.cursor_column is not None and len(frame):
            frame[request.cursor_column] = [_cursor_value(v) for v in frame[request.cursor_column]]
        return tag_rows(frame, list(request.key), request.table, offset)


def _cursor_value(value: Any) -> Any:
    """Return a cursor value as K3Cloud sends it, datetimes (``2026-10-01T10:00:00.123``) as ``datetime``."""
    if isinstance(value, str):
        try:
            return dt.datetime.fromisoformat(value)
        except ValueError:
            return value
    return value


def _same_cursor(value: Any, bound: Any) -> bool:
    if bound is None:
        return False
    return bool(_cursor_value(value) == _cursor_value(bound))


__all__ = [
    "FormTable",
    "K3CloudClient",
    "K3CloudConnector",
    "K3CloudCredentials",
    "K3CloudError",
    "K3CloudSettings",
    "Status",
    "column_name",
    "k3cloud_client",
    "sign_headers",
]  # fmt: skip
