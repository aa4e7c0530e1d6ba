"""Legacy CRM APIs over HTTP: declarative auth and pagination, retries that honour Retry-After.

One ``RestConnector`` serves any JSON API described by a ``RestSource`` config; the ``suitecrm_v8``
profile fills in SuiteCRM 8 / SugarCRM v8 JSON:API conventions (``/Api/V8/module/Accounts``,
``page[number]``, OAuth2 client-credentials login, ``{id, type, attributes}`` records).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd
import requests

from crm_core.errors import ExtractError, TransientExtractError, mask_secrets
from integration.connectors.base import ReadRequest, filter_chunks, tag_rows

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RestSettings:
    """Everything the connector needs; built from project.yaml (secrets already expanded)."""

    base_url: str
    endpoint: str = "{table}"  # path template; {table} is the mapping's table (resource)
    auth: Literal["none", "bearer", "basic", "login"] = "none"
    token: str | None = None
    username: str | None = None
    password: str | None = None
    login_path: str | None = None
    login_body: dict[str, str] = field(default_factory=dict)
    token_field: str = "access_token"
    pagination: Literal["none", "page_number", "offset", "cursor", "next_link"] = "none"
    page_param: str = "page"
    size_param: str = "page_size"
    page_size: int = 100
    first_page: int = 1
    cursor_param: str = "cursor"
    cursor_field: str = "next_cursor"
    next_link_field: str = "links.next"
    records_field: str = "data"
    flatten: Literal["none", "jsonapi"] = "none"
    incremental_param: str | None = (
        None  # query parameter taking the watermark, e.g. filter[date_modified][gte]
    )
    tables_path: str | None = None  # endpoint listing the resources, if the API has one
    tables_field: str = "data"
    timeout: float = 30.0
    max_retries: int = 5
    backoff: float = 0.5
    max_backoff: float = 60.0


SUITECRM_V8 = {
    "endpoint": "/Api/V8/module/{table}",
    "auth": "login",
    "login_path": "/Api/access_token",
    "pagination": "page_number",
    "page_param": "page[number]",
    "size_param": "page[size]",
    "records_field": "data",
    "flatten": "jsonapi",
    "incremental_param": "filter[date_modified][gte]",
    "tables_path": "/Api/V8/meta/modules",
    "tables_field": "data.attributes",
}


def _dig(document: Any, dotted: str) -> Any:
    current = document
    for part in dotted.split("."):
        if not isinstance(current, dict):
            return None
        current = current.get(part)
    return current


class RestConnector:
    """Reads resources of an HTTP JSON API page by page."""

    def __init__(
        self, name: str, settings: RestSettings, *, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.name = name
        self.settings = settings
        self._sleep = sleep  # injectable so tests can see the waits without waiting
        self._session = requests.Session()
        self._session.headers["Accept"] = "application/vnd.api+json, application/json"
        self._token: str | None = settings.token
        self.waits: list[float] = []

    def describe(self) -> str:
        """Return the base URL (credentials masked)."""
        return f"rest:{mask_secrets(self.settings.base_url)}"

    # ------------------------------------------------------------------ HTTP with retries

    def _url(self, path: str) -> str:
        if path.startswith(("http://", "https://")):
            return path
        return self.settings.base_url.rstrip("/") + "/" + path.lstrip("/")

    def _wait_for(self, attempt: int, response: requests.Response | None) -> float:
        retry_after = response.headers.get("Retry-After") if response is not None else None
        if retry_after is not None:
            try:
                return min(float(retry_after), self.settings.max_backoff)
            except ValueError:
                pass  # an HTTP date: fall back to our own backoff
        return float(min(self.settings.backoff * (2**attempt), self.settings.max_backoff))

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        url = self._url(path)
        last_problem = ""
        for attempt in range(self.settings.max_retries + 1):
            response: requests.Response | None = None
            try:
                response = self._session.request(method, url, timeout=self.settings.timeout, **kwargs)
            except (requests.ConnectionError, requests.Timeout) as exc:
                last_problem = f"{type(exc).__name__}: {mask_secrets(str(exc)).splitlines()[0][:200]}"
            else:
                if response.status_code not in RETRY_STATUSES:
                    return response
                last_problem = f"HTTP {response.status_code}"
            if attempt == self.settings.max_retries:
                break
            wait = self._wait_for(attempt, response)
            self.waits.append(wait)
            self._sleep(wait)
        raise TransientExtractError(
            self.name,
            f"{method} {mask_secrets(url)} failed after {self.settings.max_retries + 1} attempts ({last_problem}); "
            "the server is down or overloaded, try again later",
        )

    def _authenticate(self) -> None:
        settings = self.settings
        if settings.auth == "basic":
            self._session.auth = (settings.username or "", settings.password or "")
        elif settings.auth == "login" and self._token is None:
            response = self._request("POST", settings.login_path or "/login", json=settings.login_body)
            if response.status_code != 200:
                raise ExtractError(
                    self.name,
                    f"login at {settings.login_path} refused (HTTP {response.status_code}); check the API credentials",
                )
            token = _dig(response.json(), settings.token_field)
            if not token:
                raise ExtractError(self.name, f"login answered without '{settings.token_field}'")
            self._token = str(token)
        if self._token:
            self._session.headers["Authorization"] = f"Bearer {self._token}"

    def _get(self, path: str, params: dict[str, Any]) -> Any:
        self._authenticate()
        response = self._request("GET", path, params=params)
        if response.status_code in (401, 403):
            raise ExtractError(
                self.name,
                f"access to {path} denied (HTTP {response.status_code}); check the token or user rights",
            )
        if response.status_code == 404:
            raise ExtractError(self.name, f"{path} does not exist (HTTP 404); check the table/module name")
        if response.status_code >= 400:
            raise ExtractError(
                self.name, f"GET {path} failed: HTTP {response.status_code} {response.text[:200]}"
            )
        try:
            return response.json()
        except ValueError:
            raise ExtractError(self.name, f"GET {path} did not return JSON") from None

    # ------------------------------------------------------------------ records and pages

    def _records(self, document: Any) -> list[dict[str, Any]]:
        records = _dig(document, self.settings.records_field) if self.settings.records_field else document
        if not isinstance(records, list):
            raise ExtractError(self.name, f"no list at '{self.settings.records_field}' in the response")
        if self.settings.flatten == "jsonapi":
            return [{"id": r.get("id"), **(r.get("attributes") or {})} for r in records]
        return [r for r in records if isinstance(r, dict)]

    def _pages(self, path: str, base_params: dict[str, Any]) -> Iterator[list[dict[str, Any]]]:
        settings = self.settings
        params = dict(base_params)
        if settings.pagination == "none":
            yield self._records(self._get(path, params))
            return
        page, offset, next_path = settings.first_page, 0, path
        while True:
            if settings.pagination == "page_number":
                params.update({settings.page_param: page, settings.size_param: settings.page_size})
            elif settings.pagination == "offset":
                params.update({settings.page_param: offset, settings.size_param: settings.page_size})
            document = self._get(next_path, params)
            records = self._records(document)
            yield records
            if settings.pagination == "next_link":
                link = _dig(document, settings.next_link_field)
                if not link:
                    return
                next_path, params = str(link), {}
            elif settings.pagination == "cursor":
                cursor = _dig(document, settings.cursor_field)
                if not cursor:
                    return
                params[settings.cursor_param] = cursor
            else:
                if len(records) < settings.page_size:
                    return
                page, offset = page + 1, offset + len(records)

    def _path(self, table: str) -> str:
        return self.settings.endpoint.format(table=table)

    def list_tables(self) -> list[str]:
        """Return the resources the API lists (SuiteCRM: its modules); empty if it has no such endpoint."""
        if not self.settings.tables_path:
            return []
        listed = _dig(self._get(self.settings.tables_path, {}), self.settings.tables_field)
        return sorted(listed) if isinstance(listed, dict | list) else []

    def columns(self, table: str, header_row: int | None = None) -> list[str]:
        """Return the fields of the first record of ``table`` (an API has no schema to ask)."""
        params = (
            {self.settings.size_param: 1} if self.settings.pagination in ("page_number", "offset") else {}
        )
        records = self._records(self._get(self._path(table), params))
        return list(records[0]) if records else []

    def read(self, request: ReadRequest) -> Iterator[pd.DataFrame]:
        """Yield the resource's records page by page (from the cursor value when incremental), ``where`` applied."""
        return filter_chunks(self._read(request), request.where, self.name, request.table)

    def _read(self, request: ReadRequest) -> Iterator[pd.DataFrame]:
        params: dict[str, Any] = {}
        if request.cursor_from is not None and self.settings.incremental_param:
            value = request.cursor_from
            params[self.settings.incremental_param] = (
                value.isoformat() if hasattr(value, "isoformat") else value
            )
        buffer: list[dict[str, Any]] = []
        offset = 0
        for records in self._pages(self._path(request.table), params):
            buffer.extend(records)
            while len(buffer) >= request.chunk_rows:
                chunk, buffer = buffer[: request.chunk_rows], buffer[request.chunk_rows :]
                yield self._frame(chunk, request, offset)
                offset += len(chunk)
        if buffer:
            yield self._frame(buffer, request, offset)

    def _frame(self, records: list[dict[str, Any]], request: ReadRequest, offset: int) -> pd.DataFrame:
        frame = pd.DataFrame.from_records(records)
        missing = [k for k in request.key if k not in frame.columns]
        if missing:
            raise ExtractError(self.name, f"key field(s) {missing} not in the records of {request.table}")
        return tag_rows(frame, request.key, request.table, offset)
