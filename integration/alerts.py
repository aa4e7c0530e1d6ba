"""Alerts about failed runs and failed asset checks, posted to a chat robot or any JSON webhook.

The settings come from the environment (``CRMI_ALERT_*``, see docs/alerts.md); the Dagster sensors that
decide *when* to alert live in :mod:`integration.assets.alerts`. This module knows nothing of Dagster: it
builds the message and posts it.

The webhook URL of a WeCom or DingTalk robot carries its key, so the URL and the signing secret never go
into a message, a log line or an exception: a failed delivery is reported as what went wrong (timeout,
HTTP status, the robot's error code), and any text the receiver sends back is redacted before it is shown.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import requests

from crm_core.errors import CrmError
from crm_core.settings import env_number
from integration.failures import MAX_CAUSE, shorten

URL_ENV = "CRMI_ALERT_WEBHOOK_URL"
FORMAT_ENV = "CRMI_ALERT_WEBHOOK_FORMAT"
SECRET_ENV = "CRMI_ALERT_WEBHOOK_SECRET"
UI_ENV = "CRMI_DAGSTER_UI_URL"
TIMEOUT_ENV = "CRMI_ALERT_TIMEOUT"
SEVERITY_ENV = "CRMI_ALERT_CHECK_SEVERITY"

FORMATS = ("json", "wecom", "dingtalk", "feishu", "slack")
SEVERITIES = ("ERROR", "WARN")
DEFAULT_UI_URL = "http://127.0.0.1:3000"
DEFAULT_TIMEOUT = 10.0
# Every message starts with this name: a DingTalk robot secured by "custom keywords" can use it as keyword.
SOURCE = "crm-integration"
RUN_FAILURE = "run_failure"
RUN_UNBALANCED = "run_unbalanced"  # `crmi run` ended with exit code 2: the run does not balance
RUN_REFUSED = "run_refused"  # `crmi run` refused before any run started (core busy or too old, bad project)
CHECK_FAILURE = "check_failure"
TEST = "test"
MAX_STEPS = 5  # failed steps named in a message; the rest are counted
MAX_REASON = 600  # characters of a refusal's reason: the holder and the lock file come before what to do
_DETAIL = 160  # characters of a receiver's error text shown in a delivery error
# Pauses (seconds) before the second and third try of one delivery when the receiver is down, times out or
# answers 5xx/429. Read at each call, so tests set them to zero; a refusal (4xx, a robot's error code) is final.
RETRY_DELAYS: tuple[float, ...] = (1.0, 3.0)
# A robot's "too many messages" answers (WeCom 45009, DingTalk 130101, Feishu 11232): worth another try.
ROBOT_BUSY_CODES = frozenset({"45009", "130101", "11232"})


class AlertError(CrmError):
    """An alert could not be configured or delivered."""


class AlertConfigError(AlertError):
    """A ``CRMI_ALERT_*`` setting is invalid; the message names the variable (never the URL's value)."""


class AlertDeliveryError(AlertError):
    """The receiver could not be reached, timed out or refused the message (no URL in the message).

    ``transient`` is True when trying again later may succeed (unreachable, timeout, HTTP 5xx or 429) and
    False when the receiver refused the message (HTTP 4xx, a robot's error code: a setting to fix).
    """

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class AlertConfig:
    """Where and how alerts are posted; ``repr`` leaves out the URL and the secret."""

    webhook_url: str = field(repr=False)
    format: str = "json"
    secret: str | None = field(default=None, repr=False)
    ui_url: str = DEFAULT_UI_URL
    timeout: float = DEFAULT_TIMEOUT
    check_severity: str = "ERROR"  # the lowest severity of a failed check that is alerted

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AlertConfig | None:
        """Read the ``CRMI_ALERT_*`` variables; None when no webhook URL is set (alerts are off)."""
        env = os.environ if environ is None else environ
        url = env.get(URL_ENV, "").strip()
        if not url:
            return None
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise AlertConfigError(
                f"{URL_ENV} must be an http:// or https:// URL (value not shown: it holds a key)"
            )
        fmt = env.get(FORMAT_ENV, "").strip().lower() or "json"
        if fmt == "lark":
            fmt = "feishu"
        if fmt not in FORMATS:
            raise AlertConfigError(f"{FORMAT_ENV}={fmt!r} is not one of {', '.join(FORMATS)}")
        timeout = env_number(TIMEOUT_ENV, DEFAULT_TIMEOUT, AlertConfigError, at_most=60, env=env)
        severity = env.get(SEVERITY_ENV, "").strip().upper() or "ERROR"
        if severity == "WARNING":
            severity = "WARN"
        if severity not in SEVERITIES:
            raise AlertConfigError(f"{SEVERITY_ENV}={severity!r} is not one of {', '.join(SEVERITIES)}")
        ui_url = env.get(UI_ENV, "").strip().rstrip("/") or DEFAULT_UI_URL
        secret = env.get(SECRET_ENV, "").strip() or None
        return cls(url, fmt, secret, ui_url, timeout, severity)

    def alerts_severity(self, severity: str) -> bool:
        """Return True if a failed check of this severity (``ERROR`` / ``WARN``) is alerted."""
        return severity.upper() == "ERROR" or (self.check_severity == "WARN" and severity.upper() == "WARN")

    def redact(self, text: str) -> str:
        """Return ``text`` with the webhook URL, its key-like parts and the secret replaced by ``***``."""
        parts = urlsplit(self.webhook_url)
        secrets = {self.webhook_url, urlunsplit(parts._replace(query="", fragment=""))}
        if "@" in parts.netloc:
            secrets.add(parts.netloc.rpartition("@")[0])  # user:password
        secrets |= {value for _, value in parse_qsl(parts.query, keep_blank_values=True) if len(value) >= 3}
        # Feishu and Slack put the key in the path (…/hook/<uuid>, …/services/T…/B…/<token>).
        secrets |= {
            seg for seg in unquote(parts.path).split("/") if len(seg) >= 8 and any(c.isdigit() for c in seg)
        }
        if self.secret:
            secrets.add(self.secret)
        for secret in sorted(secrets, key=len, reverse=True):
            if secret:
                text = text.replace(secret, "***")
        return text


@dataclass(frozen=True)
class Alert:
    """One message: a failed run (``kind`` run_failure) or one failed asset check (check_failure)."""

    kind: str
    job: str
    run_id: str
    url: str
    steps: tuple[str, ...] = ()
    error: str = ""  # run: the cause's first line; check: its description
    asset: str = ""
    check: str = ""
    severity: str = ""
    details: str = ""  # check: a summary of its metadata
    project: str = ""  # `crmi run`: the project's name
    exit_code: int | None = None  # `crmi run`: its exit code (1 failed and undone, 2 does not balance)

    def to_dict(self) -> dict[str, Any]:
        """Return the alert's content as JSON-ready data (kept by a sensor until it is delivered)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Alert:
        """Return the alert :meth:`to_dict` returned; raise ValueError if ``data`` is not one."""
        try:
            values = {k: data[k] for k in ("kind", "job", "run_id", "url")}
            texts = ("error", "asset", "check", "severity", "details", "project")
            extra = {k: str(data[k]) for k in texts if k in data}
            code = data.get("exit_code")
            return cls(
                **{k: str(v) for k, v in values.items()},
                steps=tuple(map(str, data.get("steps", ()))),
                exit_code=None if code is None else int(code),
                **extra,
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not an alert: {type(exc).__name__}") from None

    def title(self) -> str:
        """Return the headline, e.g. ``crm-integration: run failed: migration``."""
        if self.kind == CHECK_FAILURE:
            return f"{SOURCE}: check failed: {self.asset} {self.check}"
        if self.kind == TEST:
            return f"{SOURCE}: test alert"
        if self.kind == RUN_UNBALANCED:
            return f"{SOURCE}: run does not balance: {self.job}"
        if self.kind == RUN_REFUSED:
            return f"{SOURCE}: run refused: {self.job}"
        return f"{SOURCE}: run failed: {self.job}"

    def fields(self) -> list[tuple[str, str]]:
        """Return the labelled lines of the message body (without the title and the link)."""
        if self.kind == TEST:
            return [("Result", self.error)]
        if self.kind == RUN_REFUSED:  # no run: its reason, which says what to do
            return [("Project", self.project), ("Job", self.job), ("Refused", self.error),
                    ("Exit code", f"{self.exit_code} (crmi run: no run started)")]  # fmt: skip
        rows = [("Job", self.job), ("Run", self.run_id)]
        if self.project:
            rows.insert(0, ("Project", self.project))
        if self.kind == CHECK_FAILURE:
            rows = [("Asset", self.asset), ("Check", self.check), ("Severity", self.severity), *rows]
            if self.error:
                rows.append(("Result", self.error))
            if self.details:
                rows.append(("Details", self.details))
            return rows
        if self.steps:
            shown = ", ".join(self.steps[:MAX_STEPS])
            more = len(self.steps) - MAX_STEPS
            rows.append(
                (
                    "Failed step" if len(self.steps) == 1 else "Failed steps",
                    shown + (f" (+{more} more)" if more > 0 else ""),
                )
            )
        rows.append(("Error", self.error or "(no error message recorded)"))
        if self.exit_code is not None:
            rows.append(("Exit code", f"{self.exit_code} (crmi run)"))
        return rows

    def as_json(self) -> dict[str, Any]:
        """Return the body of the ``json`` format."""
        body: dict[str, Any] = {
            "kind": self.kind, "job": self.job, "run_id": self.run_id, "steps": list(self.steps),
            "error": self.error, "url": self.url,
        }  # fmt: skip
        if self.kind == CHECK_FAILURE:
            body.update(asset=self.asset, check=self.check, severity=self.severity, details=self.details)
        if self.exit_code is not None:
            body.update(project=self.project, exit_code=self.exit_code)
        return body

    def text(self) -> str:
        """Return the plain-text message (Feishu, and the fallback of the others)."""
        lines = [self.title(), *(f"{label}: {value}" for label, value in self.fields())]
        return "\n".join([*lines, f"Open in Dagster: {self.url}"])

    def markdown(self, separator: str = "\n") -> str:
        """Return the message as the markdown subset WeCom and DingTalk robots render."""
        lines = [f"### {self.title()}", *(f"**{label}:** {_md(value)}" for label, value in self.fields())]
        return separator.join([*lines, f"[Open in Dagster]({self.url})"])

    def slack(self) -> str:
        """Return the message in Slack's mrkdwn."""
        lines = [f"*{self.title()}*", *(f"*{label}:* {_slack(value)}" for label, value in self.fields())]
        return "\n".join([*lines, f"<{self.url}|Open in Dagster>"])


def _md(value: str) -> str:
    # Backslash escapes show literally on some robots; only a backtick (code span) would garble the rest.
    return value.replace("`", "'")


def _slack(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def first_line(text: str, limit: int = MAX_CAUSE) -> str:
    """Return the first non-empty line of ``text``, masked and cut at ``limit`` characters."""
    line = next((part.strip() for part in text.strip().splitlines() if part.strip()), "")
    return shorten(line, limit)


def run_failure_alert(job: str, run_id: str, steps: Sequence[str], error: str, ui_url: str) -> Alert:
    """Return the alert of a failed run: its job, the failed steps and the first line of the cause."""
    return Alert(
        RUN_FAILURE, job, run_id, f"{ui_url.rstrip('/')}/runs/{run_id}", tuple(steps), first_line(error)
    )


def cli_run_alert(
    job: str, run_id: str, project: str, steps: Sequence[str], error: str, exit_code: int, ui_url: str
) -> Alert:
    """Return the alert of a ``crmi run`` that failed (exit 1) or does not balance (exit 2)."""
    kind = RUN_UNBALANCED if exit_code == 2 else RUN_FAILURE
    link = f"{ui_url.rstrip('/')}/runs/{run_id}"
    return Alert(
        kind, job, run_id, link, tuple(steps), first_line(error), project=project, exit_code=exit_code
    )


def cli_refusal_alert(job: str, project: str, reason: str, exit_code: int, ui_url: str) -> Alert:
    """Return the alert of a ``crmi run`` refused before any run started: its reason on one line, secrets
    masked (it may quote a setting); the link goes to the UI's runs, where a run holding the core shows."""
    link = f"{ui_url.rstrip('/')}/runs"
    return Alert(RUN_REFUSED, job, "", link, error=first_line(reason, MAX_REASON), project=project,
                 exit_code=exit_code)  # fmt: skip


def alert_cli_run(
    job: str,
    run_id: str,
    project: str,
    steps: Sequence[str],
    error: str,
    exit_code: int,
    environ: Mapping[str, str] | None = None,
) -> tuple[bool, str]:
    """Post the alert of a failed ``crmi run`` when ``CRMI_ALERT_WEBHOOK_URL`` is set.

    Returns (True, what happened) when the alert was sent or alerts are off (an empty text), else (False,
    why not): a bad setting or a delivery that failed after its retries. It never raises, and the text never
    holds the webhook URL or the secret.
    """
    return _post_cli_alert(
        lambda ui: cli_run_alert(job, run_id, project, steps, error, exit_code, ui), "run", environ
    )


def alert_cli_refusal(
    job: str, project: str, reason: str, exit_code: int, environ: Mapping[str, str] | None = None
) -> tuple[bool, str]:
    """Post the alert of a ``crmi run`` refused before it started when ``CRMI_ALERT_WEBHOOK_URL`` is set;
    returns as :func:`alert_cli_run` does."""
    return _post_cli_alert(
        lambda ui: cli_refusal_alert(job, project, reason, exit_code, ui), "refusal", environ
    )


def _post_cli_alert(
    make: Callable[[str], Alert], what: str, environ: Mapping[str, str] | None
) -> tuple[bool, str]:
    try:
        config = AlertConfig.from_env(environ)
    except AlertConfigError as exc:
        return False, f"no alert sent: {exc}"
    if config is None:
        return True, ""
    try:
        post_alert(make(config.ui_url), config)
    except AlertDeliveryError as exc:
        return False, f"the alert of this {what} was not delivered: {exc}"
    return True, f"alert sent ({config.format} format)"


def check_failure_alert(
    job: str,
    run_id: str,
    asset: str,
    check: str,
    severity: str,
    description: str | None,
    metadata: Mapping[str, Any],
    ui_url: str,
) -> Alert:
    """Return the alert of one failed asset check, with its description and a summary of its metadata."""
    link = f"{ui_url.rstrip('/')}/runs/{run_id}"
    return Alert(
        CHECK_FAILURE, job, run_id, link, error=first_line(description or ""),
        asset=asset, check=check, severity=severity.upper(), details=metadata_summary(metadata),
    )  # fmt: skip


def sample_alert(ui_url: str) -> Alert:
    """Return the message ``python -m integration.alerts`` posts to try the settings."""
    return Alert(
        TEST, "", "", ui_url.rstrip("/"), error="alerts of failed runs and failed checks will come here"
    )


def metadata_summary(metadata: Mapping[str, Any], limit: int = MAX_CAUSE) -> str:
    """Return ``key: value; …`` for the scalar and JSON entries of a check's metadata, on one line."""
    parts = []
    for key, value in metadata.items():
        if value is None:
            continue
        if isinstance(value, float):
            text = f"{value:g}"
        elif isinstance(value, str | int | bool):
            text = str(value)
        else:
            text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
        parts.append(f"{key}: {shorten(text, 100)}")
    return shorten("; ".join(parts), limit)


def dingtalk_sign(secret: str, timestamp_ms: int) -> str:
    """Return DingTalk's ``sign``: base64 of HMAC-SHA256 keyed by the secret over ``timestamp\\nsecret``."""
    digest = hmac.new(secret.encode(), f"{timestamp_ms}\n{secret}".encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def feishu_sign(secret: str, timestamp_s: int) -> str:
    """Return Feishu's ``sign``: base64 of HMAC-SHA256 keyed by ``timestamp\\nsecret`` over nothing."""
    digest = hmac.new(f"{timestamp_s}\n{secret}".encode(), b"", hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def _with_query(url: str, extra: Mapping[str, str]) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in extra]
    return urlunsplit(parts._replace(query=urlencode([*query, *extra.items()])))


def build_request(alert: Alert, config: AlertConfig, now: float | None = None) -> tuple[str, dict[str, Any]]:
    """Return the URL to post to and the JSON body, in the configured format (signed if a secret is set)."""
    now = time.time() if now is None else now
    url = config.webhook_url
    if config.format == "wecom":
        return url, {"msgtype": "markdown", "markdown": {"content": alert.markdown("\n")}}
    if config.format == "dingtalk":
        if config.secret:
            stamp = int(now * 1000)
            url = _with_query(url, {"timestamp": str(stamp), "sign": dingtalk_sign(config.secret, stamp)})
        # DingTalk's markdown needs a blank line between lines.
        return url, {
            "msgtype": "markdown",
            "markdown": {"title": alert.title(), "text": alert.markdown("\n\n")},
        }
    if config.format == "feishu":
        body: dict[str, Any] = {"msg_type": "text", "content": {"text": alert.text()}}
        if config.secret:
            stamp = int(now)
            body = {"timestamp": str(stamp), "sign": feishu_sign(config.secret, stamp), **body}
        return url, body
    if config.format == "slack":
        return url, {"text": alert.slack()}
    return url, alert.as_json()


def post_alert(
    alert: Alert,
    config: AlertConfig,
    session: requests.Session | None = None,
    *,
    delays: Sequence[float] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Post one alert, trying again after each of ``delays`` (default :data:`RETRY_DELAYS`) while the
    failure is transient; raise :class:`AlertDeliveryError` (without the URL) if it was not accepted."""
    pauses = list(RETRY_DELAYS if delays is None else delays)
    tries = 1
    while True:
        try:
            _post_once(alert, config, session)
            return
        except AlertDeliveryError as exc:
            if not exc.transient or not pauses:
                if tries > 1:
                    raise AlertDeliveryError(f"{exc} ({tries} tries)", transient=exc.transient) from None
                raise
        sleep(pauses.pop(0))
        tries += 1


def _post_once(alert: Alert, config: AlertConfig, session: requests.Session | None) -> None:
    """Post one alert once (signed now); raise :class:`AlertDeliveryError` if it was not accepted."""
    url, body = build_request(alert, config)
    data = json.dumps(body, ensure_ascii=False).encode()
    headers = {"Content-Type": "application/json; charset=utf-8"}
    poster = session or requests
    try:
        response = poster.post(url, data=data, headers=headers, timeout=config.timeout)
    # The exceptions of requests quote the URL, key included: only their type is kept (`from None`).
    except requests.Timeout:
        raise AlertDeliveryError(f"the webhook receiver did not answer within {config.timeout:g} s") from None
    except requests.ConnectionError:
        raise AlertDeliveryError(
            f"the webhook receiver could not be reached (refused or lost connection): check {URL_ENV}, "
            "the proxy settings and the firewall"
        ) from None
    except requests.RequestException as exc:
        raise AlertDeliveryError(f"posting the alert failed ({type(exc).__name__})") from None
    _check_answer(response, config)


def _check_answer(response: requests.Response, config: AlertConfig) -> None:
    if not 200 <= response.status_code < 300:
        detail = config.redact(first_line(response.text, _DETAIL))
        raise AlertDeliveryError(
            f"the webhook receiver answered HTTP {response.status_code}" + (f": {detail}" if detail else ""),
            transient=response.status_code >= 500 or response.status_code == 429,
        )
    if config.format not in ("wecom", "dingtalk", "feishu"):
        return
    # These robots answer 200 to a refused message and say why in the body.
    try:
        answer = response.json()
    except ValueError:
        return
    if not isinstance(answer, dict):
        return
    code = answer.get("errcode", answer.get("code", answer.get("StatusCode", 0)))
    if code in (0, "0", None):
        return
    message = answer.get("errmsg") or answer.get("msg") or answer.get("StatusMessage") or ""
    detail = config.redact(first_line(str(message), _DETAIL))
    raise AlertDeliveryError(
        f"the {config.format} robot refused the message: error {code}" + (f": {detail}" if detail else ""),
        transient=str(code) in ROBOT_BUSY_CODES,
    )


def main() -> int:
    """Post a test alert with the ``CRMI_ALERT_*`` settings; exit 0: delivered, 1: not, 2: not set up."""
    try:
        config = AlertConfig.from_env()
    except AlertConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if config is None:
        print(f"error: {URL_ENV} is not set: there is nowhere to post alerts", file=sys.stderr)
        return 2
    try:
        post_alert(sample_alert(config.ui_url), config)
    except AlertDeliveryError as exc:
        print(f"test alert not delivered: {exc}", file=sys.stderr)
        return 1
    print(f"test alert delivered ({config.format} format): check the chat or the receiver")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
