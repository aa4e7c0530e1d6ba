"""Writes into Yonyou U8 through its OpenAPI (api.yonyouup.com or an on-premise gateway): the sync engine's transport.

One :class:`U8Client` turns :class:`Delivery` records (a U8 document plus the trade id that makes it
idempotent) into one :class:`Outcome` each. Business errors (duplicate code, unknown customer, …) are
``rejected`` outcomes carrying U8's message; transport problems (5xx, 429, timeouts, refused connections)
are ``retry`` outcomes with ``retry_after`` when U8 gave one. The client never loops: backoff and attempt
counting belong to the engine; the only resend it does on its own is after renewing an expired token, once.
A resend reuses the same trade id, so U8 applies the write once however often it arrives.

The protocol subset (which parts follow Yonyou's documentation and which are our choice) is in
docs/u8_openapi.md. The app_secret and tokens travel in query strings, as U8 wants; they are masked in
every message, exception and urllib3 debug log line this module can produce.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import requests

from crm_core.errors import SyncError
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

# operation -> (the document's section in the body, single-record path, batch path)
OPERATIONS: dict[str, tuple[str, str, str]] = {
    "customer/add": ("customer", "/api/customer/add", "/api/customer/batch_add"),
    "customer/edit": ("customer", "/api/customer/edit", "/api/customer/batch_edit"),
    "saleorder/add": ("saleorder", "/api/saleorder/add", "/api/saleorder/batch_add"),
}
OK = "0"
TOKEN_ERRCODES = frozenset({"40014", "42001"})  # invalid / expired token: renew and resend once
CONFIG_ERRCODES = frozenset({"40001", "40003"})  # credentials or data source wrong: no record can pass
BAD_TRADEID = "40004"
NOT_FOUND = "20003"
MAX_TRADEIDS_PER_CALL = 1000
MAX_RESULTS_PER_CALL = 100


DUPLICATE_KEY = "20002"  # U8: self_define1 (our key) is already on a customer


class U8ApiError(SyncError):
    """U8 OpenAPI could not be used: wrong credentials or data source, or (``transient``) not reachable now."""

    def __init__(self, message: str, *, transient: bool = False, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.retry_after = retry_after


@dataclass(frozen=True)
class U8Credentials:
    """Where U8 OpenAPI is and who we are to it (the values of project.yaml, secrets already expanded)."""

    base_url: str
    from_account: str
    to_account: str
    app_key: str
    app_secret: str
    ds_sequence: int | None = None

    def __repr__(self) -> str:
        return (
            f"U8Credentials(base_url={self.base_url!r}, from_account={self.from_account!r}, "
            f"to_account={self.to_account!r}, app_key={self.app_key!r}, app_secret='***', "
            f"ds_sequence={self.ds_sequence!r})"
        )


class _NoEndpoint(Exception):
    """The gateway has no such path (HTTP 404), e.g. no batch endpoints."""


class U8Client(SessionClient):
    """The U8 OpenAPI transport: tokens, trade ids, (batched) writes, async results and customer lookups."""

    def __init__(
        self,
        credentials: U8Credentials,
        *,
        timeout: float = 10.0,
        max_batch: int = 100,
        session: requests.Session | None = None,
    ) -> None:
        self.credentials = credentials
        self.timeout = timeout
        self.max_batch = max(1, max_batch)  # 1: only the documented single-record endpoints
        super().__init__(session)
        self._base = credentials.base_url.rstrip("/")
        self._token: str | None = None
        self._clock = time.monotonic
        self._token_renew_at = 0.0  # self._clock() after which the token is renewed before use
        self._spent_tokens: list[str] = []  # masked in messages too
        self._token_lock = threading.Lock()
        self._no_batch: set[str] = set()  # operations whose batch endpoint the gateway lacks (HTTP 404)

    def __repr__(self) -> str:
        return f"U8Client({self._base!r}, from_account={self.credentials.from_account!r}, max_batch={self.max_batch})"

    # ------------------------------------------------------------------ public API

    def new_trade_ids(self, count: int) -> list[str]:
        """Return ``count`` trade ids issued by U8 (``/system/tradeid``); raise :class:`U8ApiError` when U8 cannot."""
        ids: list[str] = []
        while len(ids) < count:
            wanted = min(count - len(ids), MAX_TRADEIDS_PER_CALL)
            params = {"from_account": self.credentials.from_account, "app_key": self.credentials.app_key}
            if wanted > 1:
                params["count"] = str(wanted)  # our gateway's extension; a U8 without it issues one per call
            answer = self._call_or_raise("GET", "/system/tradeid", params, "getting trade ids")
            issued = [str(t["id"]) for t in answer.get("trades") or [] if isinstance(t, dict) and t.get("id")]
            if not issued and isinstance(answer.get("trade"), dict) and answer["trade"].get("id"):
                issued = [str(answer["trade"]["id"])]
            if not issued:
                raise U8ApiError(
                    f"U8 OpenAPI answered /system/tradeid without a trade id: {self._errmsg(answer)}"
                )
            ids.extend(issued[:wanted])
        return ids

    def deliver(self, deliveries: Sequence[Delivery]) -> list[Outcome]:
        """Send the writes (grouped by operation, in batches of ``max_batch``); one Outcome per delivery, same order."""
        for delivery in deliveries:
            if delivery.operation not in OPERATIONS:
                raise U8ApiError(
                    f"unknown U8 operation {delivery.operation!r} (trade id {delivery.trade_id}); "
                    f"expected one of {', '.join(OPERATIONS)}"
                )
        outcomes: list[Outcome | None] = list(
            deliver_in_groups(deliveries, self.max_batch, self._deliver_chunk)
        )
        self._found_by_our_key(deliveries, outcomes)
        return [outcome for outcome in outcomes if outcome is not None]

    def _found_by_our_key(self, deliveries: Sequence[Delivery], outcomes: list[Outcome | None]) -> None:
        """Turn "our key is already on a customer" into that customer: an add that U8 took before.

        The answer to an earlier add can be lost (a crash, a run rolled back after U8 applied it); U8 then
        refuses the next add of the record because ``self_define1`` (our id) is taken. The customer holding
        it is ours: its code is the answer the lost add would have given.
        """
        for index, (delivery, outcome) in enumerate(zip(deliveries, outcomes, strict=True)):
            our_key = delivery.payload.get("self_define1")
            if (outcome is None or outcome.status != "rejected" or delivery.operation != "customer/add"
                    or not our_key or not (outcome.message or "").startswith(f"U8 {DUPLICATE_KEY}")):  # fmt: skip
                continue
            try:
                found = self.find_customer(crm_key=str(our_key))
            except U8ApiError:
                continue  # keep the rejection: a person looks at it
            if found is not None and found.get("code"):
                outcomes[index] = Outcome(delivery.trade_id, "applied", str(found["code"]),
                                          f"already in U8 as {found['code']} (found by self_define1)", None)  # fmt: skip

    def results(self, trade_ids: Sequence[str]) -> list[Outcome]:
        """Return the outcome of each trade id (for ``pending`` deliveries of an asynchronous U8)."""
        outcomes: list[Outcome] = []
        for start in range(0, len(trade_ids), MAX_RESULTS_PER_CALL):
            chunk = list(trade_ids[start : start + MAX_RESULTS_PER_CALL])
            params = {"from_account": self.credentials.from_account, "app_key": self.credentials.app_key,
                      "tradeid": ",".join(chunk)}  # fmt: skip
            try:
                answer = self._call("GET", "/system/result", params)
            except Transient as problem:
                outcomes.extend(problem.outcome(t) for t in chunk)
                continue
            except _NoEndpoint:
                raise U8ApiError(
                    f"{self._base} has no /system/result: this U8 gateway cannot look up async results"
                ) from None
            states = {str(r.get("tradeid")): r for r in answer.get("results") or [] if isinstance(r, dict)}
            outcomes.extend(self._result(t, states.get(t), answer) for t in chunk)
        return outcomes

    def find_applied(self, deliveries: Sequence[Delivery]) -> list[str | None]:
        """Return, per add whose answer was lost, the code of what U8 holds from it, or None when it holds none.

        A customer add is looked up by the code it carried (``customer/get``), else by our key in
        ``self_define1`` (``customer/batch_get``); any other write by its trade id in U8's ledger
        (``/system/result``). Raise :class:`U8ApiError` when U8 cannot say (unreachable, no such lookup).
        """
        return [self._applied_code(d) for d in deliveries]

    def _applied_code(self, delivery: Delivery) -> str | None:
        code, ours = delivery.payload.get("code"), delivery.payload.get("self_define1")
        if delivery.operation == "customer/add" and (code or ours):
            if code:
                found = self.find_customer(code=str(code))
                if found is not None and ours and str(found.get("self_define1") or "") != str(ours):
                    return None  # the code is another customer's: the add was refused, not applied
            else:
                found = self.find_customer(crm_key=str(ours))
            return str(found.get("code") or code) if found is not None else None
        params = {"from_account": self.credentials.from_account, "app_key": self.credentials.app_key,
                  "tradeid": delivery.trade_id}  # fmt: skip
        answer = self._call_or_raise(
            "GET", "/system/result", params, f"looking up trade id {delivery.trade_id}"
        )
        state = next((r for r in answer.get("results") or [] if isinstance(r, dict)
                      and str(r.get("tradeid")) == delivery.trade_id), None)  # fmt: skip
        if state is None:
            raise U8ApiError(f"U8 answered /system/result without trade id {delivery.trade_id}")
        if state.get("state") == "pending":
            raise U8ApiError(
                f"U8 has accepted trade id {delivery.trade_id} and not applied it yet", transient=True
            )
        applied = state.get("state") == "done" and str(state.get("errcode", OK)) == OK
        return (str(state.get("id") or "") or None) if applied else None

    def find_customer(self, *, code: str | None = None, crm_key: str | None = None) -> dict[str, Any] | None:
        """Return U8's customer (OpenAPI field names) by cCusCode or by our key in cCusDefine1, or None."""
        if (code is None) == (crm_key is None):
            raise ValueError("find_customer takes exactly one of code= or crm_key=")
        params = {"from_account": self.credentials.from_account, "to_account": self.credentials.to_account,
                  "app_key": self.credentials.app_key, **self._ds()}  # fmt: skip
        if code is not None:
            answer = self._call_or_raise(
                "GET", "/api/customer/get", {**params, "id": code}, f"looking up customer {code}", found=True
            )
            if str(answer.get("errcode")) == NOT_FOUND:
                return None
            return {k: v for k, v in answer.items() if k not in ("errcode", "errmsg")}
        params = {**params, "self_define1": str(crm_key), "rows_per_page": "2"}
        answer = self._call_or_raise(
            "GET", "/api/customer/batch_get", params, f"looking up CRM key {crm_key}", found=True
        )
        customers = [c for c in answer.get("customer") or [] if isinstance(c, dict)]
        if len(customers) > 1 or int(answer.get("row_count") or 0) > 1:
            codes = ", ".join(str(c.get("code")) for c in customers)
            raise U8ApiError(
                f"several U8 customers carry CRM key {crm_key} in self_define1 ({codes}, …); merge them in U8"
            )
        return customers[0] if customers else None

    # ------------------------------------------------------------------ writes

    def _deliver_chunk(self, operation: str, chunk: list[Delivery], indices: list[int],
                       outcomes: list[Outcome | None]) -> Transient | None:  # fmt: skip
        """Send one chunk; fill its outcomes; return the transport problem that should hold back the rest."""
        section, single, batch = OPERATIONS[operation]
        if len(chunk) > 1 and operation not in self._no_batch:
            body = {section: [{**d.payload, "tradeid": d.trade_id} for d in chunk]}
            try:
                answer = self._call("POST", batch, self._write_params(None), body)
            except Transient as problem:
                for i, d in zip(indices, chunk, strict=True):
                    outcomes[i] = problem.outcome(d.trade_id)
                return problem if problem.stops else None
            except _NoEndpoint:
                self._no_batch.add(operation)  # this gateway only has the documented single-record APIs
            else:
                results = answer.get("results")
                if str(answer.get("errcode", OK)) != OK or not isinstance(results, list):
                    rejected = self._outcome(chunk[0].trade_id, answer)
                    for i, d in zip(indices, chunk, strict=True):
                        outcomes[i] = Outcome(
                            d.trade_id, rejected.status, None, rejected.message, rejected.retry_after
                        )
                    return None
                for n, (i, d) in enumerate(zip(indices, chunk, strict=True)):
                    result = results[n] if n < len(results) and isinstance(results[n], dict) else None
                    if result is None or str(result.get("tradeid") or d.trade_id) != d.trade_id:
                        outcomes[i] = Transient(
                            f"U8's batch answer did not cover trade id {d.trade_id}"
                        ).outcome(d.trade_id)
                    else:
                        outcomes[i] = self._outcome(d.trade_id, result)
                return None
        for i, d in zip(indices, chunk, strict=True):
            try:
                answer = self._call("POST", single, self._write_params(d.trade_id), {section: d.payload})
            except Transient as problem:
                outcomes[i] = problem.outcome(d.trade_id)
                if problem.stops:
                    for j, rest in zip(indices, chunk, strict=True):
                        if outcomes[j] is None:
                            outcomes[j] = problem.outcome(rest.trade_id)
                    return problem
                continue
            except _NoEndpoint:
                raise U8ApiError(
                    f"{self._base}{single} does not exist (HTTP 404): check base_url of the U8 OpenAPI"
                ) from None
            outcomes[i] = self._outcome(d.trade_id, answer)
        return None

    def _write_params(self, trade_id: str | None) -> dict[str, str]:
        params = {"from_account": self.credentials.from_account, "to_account": self.credentials.to_account,
                  "app_key": self.credentials.app_key, "sync": "1", **self._ds()}  # fmt: skip
        if trade_id is not None:
            params["tradeid"] = trade_id
        return params

    def _ds(self) -> dict[str, str]:
        return (
            {} if self.credentials.ds_sequence is None else {"ds_sequence": str(self.credentials.ds_sequence)}
        )

    def _outcome(self, trade_id: str, answer: dict[str, Any]) -> Outcome:
        errcode = str(answer.get("errcode", ""))
        key = str(answer.get("id") or "") or None
        if errcode == OK:
            if answer.get("url"):  # accepted only: U8 applies it later (async), see results()
                return Outcome(trade_id, "pending", key, self._scrub(str(answer.get("errmsg") or "")) or None)
            return Outcome(trade_id, "applied", key, None)
        message = f"U8 {errcode}: {self._errmsg(answer)}"
        if errcode == BAD_TRADEID:
            message += " (ask new_trade_ids() for a new trade id)"
        return Outcome(trade_id, "rejected", None, message)

    def _result(self, trade_id: str, state: dict[str, Any] | None, answer: dict[str, Any]) -> Outcome:
        if state is None:
            return Transient(
                f"U8 answered /system/result without trade id {trade_id}: {self._errmsg(answer)}"
            ).outcome(trade_id)
        kind = str(state.get("state"))
        if kind == "done":
            return self._outcome(trade_id, {**state, "url": None})
        if kind == "pending":
            return Outcome(trade_id, "pending", None, "U8 has accepted the write and not applied it yet")
        if kind == "issued":
            return Outcome(
                trade_id,
                "retry",
                None,
                "U8 never received a write with this trade id; send it again (same trade id)",
            )
        return Outcome(
            trade_id,
            "rejected",
            None,
            f"U8 does not know trade id {trade_id}; ask new_trade_ids() for a new one",
        )

    # ------------------------------------------------------------------ HTTP, tokens and secrets

    def _call_or_raise(
        self, method: str, path: str, params: dict[str, str], doing: str, *, found: bool = False
    ) -> dict[str, Any]:
        """Call U8 for a non-write request; transport problems and errcodes become :class:`U8ApiError`."""
        problem: Transient | None = None
        try:
            answer = self._call(method, path, params)
        except Transient as transient:
            problem = transient
        except _NoEndpoint:
            raise U8ApiError(
                f"U8 OpenAPI at {self._base} has no {path} (HTTP 404) while {doing}; check base_url"
            ) from None
        if problem is not None:
            raise U8ApiError(f"U8 OpenAPI unavailable while {doing}: {problem.message}", transient=True,
                             retry_after=problem.retry_after)  # fmt: skip
        errcode = str(answer.get("errcode", OK))
        if errcode != OK and not (found and errcode == NOT_FOUND):
            raise U8ApiError(f"U8 OpenAPI refused {doing}: U8 {errcode}: {self._errmsg(answer)}")
        return answer

    def _call(self, method: str, path: str, params: dict[str, str], body: Any = None) -> dict[str, Any]:
        """One request with the current token; renew it and resend once if U8 says it is invalid or expired."""
        for attempt in (1, 2):
            answer = self._http(method, path, {**params, "token": self._current_token()}, body)
            errcode = str(answer.get("errcode", OK))
            if errcode not in TOKEN_ERRCODES:
                return answer
            self._drop_token()
            if attempt == 2:
                raise Transient(f"U8 refused a freshly issued token on {path} (errcode {errcode})")
        raise AssertionError("unreachable")

    def _http(self, method: str, path: str, params: dict[str, str], body: Any = None) -> dict[str, Any]:
        """Send one HTTP request; return the JSON answer or raise Transient / _NoEndpoint / U8ApiError."""
        failure: Transient | None = None
        try:
            response = self._http_session.request(
                method, self._base + path, params=params, json=body, timeout=self.timeout
            )
        except requests.RequestException as error:
            failure = request_failure(error, system="U8 OpenAPI", where=path, timeout=self.timeout,
                                      base_url=self._base, secrets=self._secrets(),
                                      on_timeout="the write may have been applied: send it again with the same trade id")  # fmt: skip
        if (
            failure is not None
        ):  # raised outside the except block: the requests error (its URL) is not chained
            raise failure
        status = response.status_code
        problem = unwell(response, system="U8 OpenAPI", where=path)
        if problem is not None:
            raise problem
        if status == 404:
            raise _NoEndpoint(path)
        if status in (401, 403):
            raise U8ApiError(
                f"U8 OpenAPI refused access (HTTP {status}) to {path}: check app_key and from_account"
            )
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise Transient(f"U8 OpenAPI answered {path} with HTTP {status} and no JSON object", stops=False)
        if status >= 400 and "errcode" not in answer:
            answer = {**answer, "errcode": f"HTTP{status}", "errmsg": str(answer)[:200]}
        errcode = str(answer.get("errcode", OK))
        if errcode in CONFIG_ERRCODES:
            raise U8ApiError(
                f"U8 OpenAPI refused the connection settings on {path}: U8 {errcode}: {self._errmsg(answer)}; "
                "check from_account, to_account, app_key, app_secret and ds_sequence"
            )
        return answer

    def _current_token(self) -> str:
        with self._token_lock:
            if self._token is not None and self._clock() < self._token_renew_at:
                return self._token
            params = {"from_account": self.credentials.from_account, "app_key": self.credentials.app_key,
                      "app_secret": self.credentials.app_secret}  # fmt: skip
            answer = self._http("GET", "/system/token", params)
            token = answer.get("token") if str(answer.get("errcode", OK)) == OK else None
            if not isinstance(token, dict) or not token.get("id"):
                raise U8ApiError(
                    f"U8 OpenAPI gave no token: U8 {answer.get('errcode')}: {self._errmsg(answer)}"
                )
            lifetime = float(token.get("expiresIn") or 7200)
            if self._token is not None:
                self._spent_tokens = [*self._spent_tokens[-4:], self._token]
            self._token = str(token["id"])
            self._token_renew_at = (
                self._clock() + lifetime - min(60.0, lifetime / 10)
            )  # renew before it lapses
            return self._token

    def _drop_token(self) -> None:
        with self._token_lock:
            if self._token is not None:
                self._spent_tokens = [*self._spent_tokens[-4:], self._token]
            self._token, self._token_renew_at = None, 0.0

    def _errmsg(self, answer: dict[str, Any]) -> str:
        return self._scrub(str(answer.get("errmsg") or "(no message)"))

    def _secrets(self) -> tuple[str | None, ...]:
        return (self.credentials.app_secret, self._token, *self._spent_tokens)

    def _scrub(self, text: str) -> str:
        """Mask the app_secret and every token this client has held, then passwords/tokens by keyword."""
        return scrub(text, self._secrets())
