"""What every target's HTTP client shares: deliveries and outcomes, transient failures, secret masking.

The U8 OpenAPI and K3Cloud WebAPI clients differ in how they log in and what a document looks like; they
agree on what the outbox needs from them (one :class:`Outcome` per :class:`Delivery`, in order), on what a
transport failure is (:class:`Transient`: retried later, and when the service is unwell the rest of the
call waits too), and on never letting a secret reach a message.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Self

import requests

from crm_core.errors import mask_secrets

# HTTP statuses that say the service is unwell now: the rest of the call is held back too.
STOP_STATUSES = frozenset({429, 502, 503, 504})
MAX_RETRY_AFTER = 86_400.0  # a Retry-After further out than a day is read as a day


@dataclass(frozen=True)
class Delivery:
    """One write for a target: the operation, the document, and the trade id that makes a resend safe."""

    trade_id: str
    operation: str  # e.g. "customer/add", "saleorder/add", "BD_Customer/save"
    payload: dict[str, Any]  # the target's document (with its lines, where it has them)


@dataclass(frozen=True)
class Outcome:
    """What became of one delivery (or trade id)."""

    trade_id: str
    status: Literal["applied", "rejected", "pending", "retry"]
    external_key: str | None  # the code / number the target created or edited
    message: str | None  # the target's or the transport's message, secrets masked
    retry_after: float | None = None  # seconds, from Retry-After, when status == "retry"


class Transient(Exception):
    """The target did not answer usably this time: becomes ``retry`` outcomes or a transient error.

    ``stops`` says the service is unwell (429, a gateway error, no connection), so the deliveries not
    yet sent in this call wait as well instead of meeting the same failure one by one.
    """

    def __init__(self, message: str, *, retry_after: float | None = None, stops: bool = True) -> None:
        super().__init__(message)
        self.message, self.retry_after, self.stops = message, retry_after, stops

    def outcome(self, trade_id: str) -> Outcome:
        """Return the ``retry`` outcome this failure gives the delivery ``trade_id``."""
        return Outcome(trade_id, "retry", None, self.message, self.retry_after)


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date), at most a day; None if unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # "-0000" or no zone: HTTP dates are in GMT
            when = when.replace(tzinfo=dt.UTC)
        seconds = (when - dt.datetime.now(dt.UTC)).total_seconds()
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER)


def scrub(text: str, secrets: Iterable[str | None]) -> str:
    """Mask each known secret in ``text``, then passwords, tokens and keys by keyword."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return mask_secrets(text)


def request_failure(error: requests.RequestException, *, system: str, where: str, timeout: float,
                    base_url: str, on_timeout: str, secrets: Iterable[str | None]) -> Transient:  # fmt: skip
    """Turn a ``requests`` failure into a :class:`Transient` whose message names the system and the call.

    Raise the result outside the ``except`` block, so the requests error (whose text holds the URL and its
    query string) is not chained into tracebacks.
    """
    if isinstance(error, requests.Timeout):
        return Transient(f"no answer from {system} within {timeout:g}s ({where}); {on_timeout}")
    if isinstance(error, requests.ConnectionError):
        return Transient(f"{system} unreachable at {base_url} ({where}): {type(error).__name__}")
    return Transient(f"{system} request failed ({where}): {scrub(str(error), secrets)}")


def unwell(response: requests.Response, *, system: str, where: str) -> Transient | None:
    """Return the :class:`Transient` for a 5xx / 429 answer (with its Retry-After), or None."""
    status = response.status_code
    if status in STOP_STATUSES or status >= 500:
        return Transient(
            f"HTTP {status} from {system} ({where})",
            retry_after=retry_after_seconds(response.headers.get("Retry-After")),
            stops=status in STOP_STATUSES,
        )
    return None


class SessionClient:
    """A client on a ``requests.Session``: given one, or its own, closed with the client."""

    def __init__(self, session: requests.Session | None) -> None:
        self._http_session = session or requests.Session()
        self._owns_session = session is None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP session (when this client made it)."""
        if self._owns_session:
            self._http_session.close()


# Sends one chunk of one operation and fills its outcomes; returns the failure that holds back the rest.
SendChunk = Callable[[str, list[Delivery], list[int], list[Outcome | None]], Transient | None]


def deliver_in_groups(deliveries: Sequence[Delivery], max_batch: int, send_chunk: SendChunk) -> list[Outcome]:
    """Send ``deliveries`` grouped by operation in chunks of ``max_batch``; one Outcome each, same order.

    Groups go out in the order their operation first appears (customers before their orders, say). Once a
    chunk reports a failure that stops, every chunk after it gets ``retry`` outcomes without being sent.
    """
    outcomes: list[Outcome | None] = [None] * len(deliveries)
    groups: dict[str, list[int]] = {}
    for index, delivery in enumerate(deliveries):
        groups.setdefault(delivery.operation, []).append(index)
    stopped: Transient | None = None
    size = max(1, max_batch)
    for operation, indices in groups.items():
        for start in range(0, len(indices), size):
            chunk = indices[start : start + size]
            problem = stopped
            if stopped is None:
                problem = send_chunk(operation, [deliveries[i] for i in chunk], chunk, outcomes)
                stopped = problem if problem is not None and problem.stops else None
            for i in chunk:
                if outcomes[i] is None:  # a chunk the target answered only in part: send the rest again
                    missing = problem or Transient(
                        f"no answer for trade id {deliveries[i].trade_id}", stops=False
                    )
                    outcomes[i] = missing.outcome(deliveries[i].trade_id)
    return [outcome for outcome in outcomes if outcome is not None]


class MaskSecretsInLogs(logging.Filter):
    """Masks ``app_secret=…``, ``token=…`` and the like in log records (urllib3 logs request URLs at DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Mask the record's message in place; never drop a record."""
        message = record.getMessage()
        masked = mask_secrets(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


_LOG_FILTER = MaskSecretsInLogs()
logging.getLogger("urllib3.connectionpool").addFilter(_LOG_FILTER)
