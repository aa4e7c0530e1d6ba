"""Alert sensors against a real webhook receiver, over runs executed in process on a test Dagster instance.

One failing job and one asset with failing checks run once per module; each test evaluates the sensors
from the cursor they had before those runs, as the daemon's next tick would.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import dagster as dg
import pytest

import integration.alerts
from integration.alerts import (
    FORMATS,
    RETRY_DELAYS,
    Alert,
    AlertConfig,
    AlertDeliveryError,
    alert_cli_run,
    check_failure_alert,
    metadata_summary,
    post_alert,
    run_failure_alert,
)
from integration.alerts import (
    main as alerts_main,
)
from integration.assets.alerts import (
    CHECK_ALERT_SENSOR,
    MAX_ATTEMPTS,
    MAX_PENDING_AGE,
    RUN_ALERT_SENSOR,
    PendingAlert,
    alert_sensors,
    check_failure_alert_sensor,
    run_failure_alert_sensor,
    send_alerts,
)
from integration.run_tags import LAUNCHED_BY_CLI, LAUNCHED_BY_TAG
from tests.servers.webhook_receiver import Receiver, closed_port_url, serve

KEY = "SECRET123"  # what a robot's webhook URL carries: it must never show up anywhere
SIGNING_SECRET = "SECsigning0123456789"
UI = "http://dagster.example:3000"
FIRST_LINE = 'RuntimeError: duplicate key value violates unique constraint "uq_customer"'
SQL_ERROR = (
    'duplicate key value violates unique constraint "uq_customer"\n'
    "DETAIL:  Key (code)=(C-001) already exists.\n"
    "[SQL: INSERT INTO customer (code, name) VALUES (%(code)s, %(name)s)]"
)


@dg.op
def extract() -> int:
    return 1


@dg.op
def load(rows: int) -> None:
    raise RuntimeError(SQL_ERROR)


@dg.job
def failing_job() -> None:
    load(extract())


@dg.job
def other_job() -> None:
    extract()


@dg.asset(
    check_specs=[
        dg.AssetCheckSpec("check_core_rules", asset="customers"),
        dg.AssetCheckSpec("check_names_look_right", asset="customers"),
        dg.AssetCheckSpec("check_counts", asset="customers"),
    ]
)
def customers() -> Iterator[Any]:
    yield dg.Output(3)
    yield dg.AssetCheckResult(
        check_name="check_core_rules",
        passed=False,
        description="3 customers without a name\nsecond line of the description",
        metadata={
            "quarantined_rows": 3,
            "by_rule": dg.MetadataValue.json({"customer.name.required": 3}),
            "sample": dg.MetadataValue.md("| code | name |\n|---|---|\n| C-1 | |"),
        },
    )
    yield dg.AssetCheckResult(
        check_name="check_names_look_right", passed=False, severity=dg.AssetCheckSeverity.WARN
    )
    yield dg.AssetCheckResult(check_name="check_counts", passed=True)


@dataclass(frozen=True)
class History:
    """A test instance with one failed run and one run with failed checks, and the cursors before them."""

    instance: dg.DagsterInstance
    run_cursor: str | None
    check_cursor: str | None
    failed_run: str
    checked_run: str


def tick(sensor: dg.SensorDefinition, instance: dg.DagsterInstance, cursor: str | None) -> Any:
    """Evaluate one tick of ``sensor`` as the daemon does; return its SensorExecutionData."""
    return sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=cursor))


@pytest.fixture(scope="module")
def history() -> Iterator[History]:
    with dg.instance_for_test() as instance:
        run_sensor, check_sensor = alert_sensors()
        run_cursor = tick(run_sensor, instance, None).cursor  # the first tick only sets the cursor
        check_cursor = tick(check_sensor, instance, None).cursor
        failed = failing_job.execute_in_process(instance=instance, raise_on_error=False)
        assert not failed.success
        checked = dg.materialize([customers], instance=instance)
        yield History(instance, run_cursor, check_cursor, failed.run_id, checked.run_id)


@pytest.fixture(autouse=True)
def _no_alert_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("URL", "FORMAT", "SECRET"):
        monkeypatch.delenv(f"CRMI_ALERT_WEBHOOK_{name}", raising=False)
    monkeypatch.delenv("CRMI_ALERT_TIMEOUT", raising=False)
    monkeypatch.delenv("CRMI_ALERT_CHECK_SEVERITY", raising=False)
    monkeypatch.setenv("CRMI_DAGSTER_UI_URL", UI + "/")
    monkeypatch.setattr(integration.alerts, "RETRY_DELAYS", (0.0, 0.0))  # retries without waiting


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with serve() as rx:
        yield rx


def configure(monkeypatch: pytest.MonkeyPatch, base: str, fmt: str = "json", **env: str) -> str:
    url = f"{base}/robot/send?key={KEY}"
    monkeypatch.setenv("CRMI_ALERT_WEBHOOK_URL", url)
    monkeypatch.setenv("CRMI_ALERT_WEBHOOK_FORMAT", fmt)
    for name, value in env.items():
        monkeypatch.setenv(f"CRMI_ALERT_{name.upper()}", value)
    return url


def message_text(fmt: str, body: Any, query: dict[str, list[str]], secret: str | None) -> str:
    """Check the body's documented shape for ``fmt`` (and its signature); return the message text."""
    now = time.time()
    if fmt == "wecom":
        assert body["msgtype"] == "markdown" and set(body) == {"msgtype", "markdown"}
        return str(body["markdown"]["content"])
    if fmt == "dingtalk":
        assert body["msgtype"] == "markdown" and set(body["markdown"]) == {"title", "text"}
        assert "crm-integration" in body["markdown"]["title"]
        if secret:  # timestamp (ms) and sign in the query: HMAC-SHA256(secret, "timestamp\nsecret"), base64
            stamp = query["timestamp"][0]
            assert abs(int(stamp) / 1000 - now) < 120
            expected = hmac.new(secret.encode(), f"{stamp}\n{secret}".encode(), hashlib.sha256).digest()
            assert query["sign"] == [base64.b64encode(expected).decode()]
            assert query["key"] == [KEY]  # the robot's own parameter is kept
        return str(body["markdown"]["text"])
    if fmt == "feishu":
        assert body["msg_type"] == "text" and set(body["content"]) == {"text"}
        if secret:  # timestamp (s) and sign in the body: HMAC-SHA256 keyed by "timestamp\nsecret" over ""
            stamp = body["timestamp"]
            assert abs(int(stamp) - now) < 120
            expected = hmac.new(f"{stamp}\n{secret}".encode(), b"", hashlib.sha256).digest()
            assert body["sign"] == base64.b64encode(expected).decode()
        else:
            assert set(body) == {"msg_type", "content"}
        return str(body["content"]["text"])
    if fmt == "slack":
        assert set(body) == {"text"}
        return str(body["text"])
    assert fmt == "json"
    return "\n".join(str(value) for value in body.values())


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_failed_run_is_alerted_once_in_each_format(
    history: History, receiver: Receiver, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    secret = SIGNING_SECRET if fmt in ("dingtalk", "feishu") else None
    configure(monkeypatch, receiver.url, fmt, **({"webhook_secret": secret} if secret else {}))
    sensor = run_failure_alert_sensor()

    data = tick(sensor, history.instance, history.run_cursor)

    assert data.skip_message == "1 run alert(s) handled"
    [received] = receiver.received
    assert received.path == "/robot/send"
    run_id, link = history.failed_run, f"{UI}/runs/{history.failed_run}"
    if fmt == "json":
        assert received.body == {
            "kind": "run_failure", "job": "failing_job", "run_id": run_id, "steps": ["load"],
            "error": FIRST_LINE, "url": link,
        }  # fmt: skip
    text = message_text(fmt, received.body, received.query, secret)
    for expected in ("failing_job", run_id, "load", FIRST_LINE, link):
        assert expected in text, (expected, text)
    for statement in ("INSERT", "[SQL", "DETAIL"):
        assert statement not in text

    again = tick(sensor, history.instance, data.cursor)  # the cursor moved past the run
    assert again.skip_message == "no new failed runs" and len(receiver.received) == 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_failed_check_is_alerted_once_in_each_format(
    history: History, receiver: Receiver, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    configure(monkeypatch, receiver.url, fmt)
    sensor = check_failure_alert_sensor()

    data = tick(sensor, history.instance, history.check_cursor)

    # One ERROR check failed; the WARN one is not alerted by default, the passed one never.
    [received] = receiver.received
    run_id, link = history.checked_run, f"{UI}/runs/{history.checked_run}"
    if fmt == "json":
        assert received.body == {
            "kind": "check_failure", "job": "__ephemeral_asset_job__", "run_id": run_id, "steps": [],
            "error": "3 customers without a name", "url": link, "asset": "customers",
            "check": "check_core_rules", "severity": "ERROR",
            "details": 'by_rule: {"customer.name.required":3}; quarantined_rows: 3',
        }  # fmt: skip
    text = message_text(fmt, received.body, received.query, None)
    for expected in (
        "customers",
        "check_core_rules",
        run_id,
        "3 customers without a name",
        "quarantined_rows: 3",
        link,
    ):
        assert expected in text, (expected, text)
    assert "second line" not in text and "check_names_look_right" not in text
    assert data.skip_message.startswith("1 check alert(s) handled")

    again = tick(sensor, history.instance, data.cursor)
    assert again.skip_message == "no new failed checks" and len(receiver.received) == 1


def test_warn_checks_are_alerted_when_asked(
    history: History, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch, receiver.url, check_severity="warn")
    tick(check_failure_alert_sensor(), history.instance, history.check_cursor)
    assert [(b["check"], b["severity"]) for b in receiver.bodies()] == [
        ("check_core_rules", "ERROR"),
        ("check_names_look_right", "WARN"),
    ]


def test_without_a_url_the_sensors_skip_saying_why(
    history: History, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_data = tick(run_failure_alert_sensor(), history.instance, history.run_cursor)
    check_data = tick(check_failure_alert_sensor(), history.instance, history.check_cursor)

    assert "CRMI_ALERT_WEBHOOK_URL is not set" in run_data.skip_message
    assert "CRMI_ALERT_WEBHOOK_URL is not set" in check_data.skip_message
    # Runs and checks that failed while alerts were off are not sent in a burst once a URL is set.
    configure(monkeypatch, receiver.url)
    tick(run_failure_alert_sensor(), history.instance, run_data.cursor)
    tick(check_failure_alert_sensor(), history.instance, check_data.cursor)
    assert receiver.received == []


def test_a_bad_setting_skips_naming_the_variable(history: History, monkeypatch: pytest.MonkeyPatch) -> None:
    configure(monkeypatch, "http://127.0.0.1:9", "teams")
    data = tick(check_failure_alert_sensor(), history.instance, history.check_cursor)
    assert (
        "CRMI_ALERT_WEBHOOK_FORMAT='teams' is not one of json, wecom, dingtalk, feishu, slack"
        in data.skip_message
    )
    assert KEY not in data.skip_message

    monkeypatch.setenv("CRMI_ALERT_WEBHOOK_URL", f"ftp://robot.example/send?key={KEY}")
    data = tick(run_failure_alert_sensor(), history.instance, history.run_cursor)
    assert "CRMI_ALERT_WEBHOOK_URL must be an http:// or https:// URL" in data.skip_message
    assert KEY not in data.skip_message


FAULTS = {
    "500": "the webhook receiver answered HTTP 500",
    "stall": "the webhook receiver did not answer within 0.5 s",
    "down": "the webhook receiver could not be reached",
    "robot:310000": "the dingtalk robot refused the message: error 310000: sign not match",
}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_failed_delivery_is_logged_without_the_url_and_the_sensors_go_on(
    history: History,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    fault: str,
) -> None:
    base = closed_port_url() if fault == "down" else receiver.url
    url = configure(monkeypatch, base, "dingtalk", timeout="0.5", webhook_secret=SIGNING_SECRET)
    receiver.errmsg = f"sign not match, more: [{url}] {SIGNING_SECRET}"  # a robot echoing what it got
    tries = 1 if fault.startswith("robot:") else 3  # a refusal is final; the rest is tried thrice
    receiver.faults.extend([fault] * 2 * tries)

    run_sensor, check_sensor = run_failure_alert_sensor(), check_failure_alert_sensor()
    run_data = tick(run_sensor, history.instance, history.run_cursor)
    check_data = tick(check_sensor, history.instance, history.check_cursor)
    receiver.release.set()  # let the stalled requests end

    assert FAULTS[fault] in run_data.skip_message
    assert (
        f"alert for failed run {history.failed_run} of failing_job not delivered (attempt 1; the next tick "
        "tries it again)" in run_data.skip_message
    )
    assert FAULTS[fault] in check_data.skip_message and "(attempt 1;" in check_data.skip_message
    assert ("(3 tries)" in run_data.skip_message) == (tries == 3)
    output = capfd.readouterr()
    logs = output.out + output.err + caplog.text
    assert "not delivered" in logs
    shown = [logs, repr(run_data), repr(check_data), str(run_data.cursor), str(check_data.cursor)]
    for secret in (KEY, SIGNING_SECRET):
        assert not [text for text in shown if secret in text]

    # The next ticks deliver the alerts that waited in the cursors, once.
    configure(monkeypatch, receiver.url)
    data = tick(run_sensor, history.instance, run_data.cursor)
    assert data.skip_message == "1 run alert(s) handled"
    data = tick(check_sensor, history.instance, check_data.cursor)
    assert data.skip_message.startswith("1 check alert(s) handled")
    assert [(b["kind"], b.get("check")) for b in receiver.bodies() if b.get("kind")] == [
        ("run_failure", None),
        ("check_failure", "check_core_rules"),
    ]
    assert tick(check_sensor, history.instance, data.cursor).skip_message == "no new failed checks"


def test_a_refused_check_alert_is_given_up_after_the_last_attempt(
    history: History, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch, receiver.url, check_severity="WARN")
    receiver.faults.extend(["400"] * MAX_ATTEMPTS)  # HTTP 400: a setting to fix, not retried in one delivery
    sensor, cursor = check_failure_alert_sensor(), history.check_cursor
    for _ in range(MAX_ATTEMPTS):
        data = tick(sensor, history.instance, cursor)
        cursor = data.cursor
    # The third refusal gives the ERROR check's alert up; the same tick goes on with the WARN one.
    assert data.skip_message.startswith("2 check alert(s) handled")
    assert receiver.requests() == MAX_ATTEMPTS + 1
    assert [b["check"] for b in receiver.bodies()] == ["check_names_look_right"]


@pytest.mark.parametrize("fault", ["500", "429", "down"])
def test_a_receiver_down_or_busy_is_tried_again_with_backoff_within_one_delivery(
    receiver: Receiver, fault: str
) -> None:
    alert = run_failure_alert("migration", "r1", ["core_customer"], "boom", UI)
    waits: list[float] = []
    if fault == "down":
        config = AlertConfig(f"{closed_port_url()}/robot/send?key={KEY}")
        with pytest.raises(AlertDeliveryError) as raised:
            post_alert(alert, config, delays=RETRY_DELAYS, sleep=waits.append)
        assert raised.value.transient and str(raised.value).endswith("(3 tries)")
        assert KEY not in str(raised.value) and raised.value.__cause__ is None
    else:
        receiver.faults.extend([fault, fault])  # fails twice, then accepts
        post_alert(
            alert,
            AlertConfig(f"{receiver.url}/robot/send?key={KEY}"),
            delays=RETRY_DELAYS,
            sleep=waits.append,
        )
        assert receiver.requests() == 3 and [b["run_id"] for b in receiver.bodies()] == ["r1"]
    assert waits == list(RETRY_DELAYS) == [1.0, 3.0]  # the backoff, not slept here


@pytest.mark.parametrize("fault", ["400", "robot:93000"])
def test_a_refusal_is_not_tried_again_within_one_delivery(receiver: Receiver, fault: str) -> None:
    config = AlertConfig(f"{receiver.url}/robot/send?key={KEY}", "wecom")
    receiver.faults.extend([fault] * 3)
    waits: list[float] = []
    with pytest.raises(AlertDeliveryError) as raised:
        post_alert(run_failure_alert("migration", "r1", [], "boom", UI), config, sleep=waits.append)
    assert not raised.value.transient and receiver.requests() == 1 and waits == []


def test_an_undelivered_run_alert_waits_in_the_cursor_for_the_next_tick(
    history: History, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch, receiver.url, webhook_secret=SIGNING_SECRET)
    receiver.faults.extend(
        ["500"] * 3
    )  # the whole first delivery fails; the receiver is back for the next tick
    sensor = run_failure_alert_sensor()

    first = tick(sensor, history.instance, history.run_cursor)

    assert "not delivered (attempt 1; the next tick tries it again)" in first.skip_message
    assert receiver.requests() == 3 and receiver.bodies() == []
    assert history.failed_run in str(first.cursor)  # the alert's content is kept …
    assert KEY not in str(first.cursor) and SIGNING_SECRET not in str(first.cursor)  # … not the request's URL
    second = tick(sensor, history.instance, first.cursor)
    assert second.skip_message == "1 run alert(s) handled"
    assert [(b["kind"], b["run_id"], b["steps"]) for b in receiver.bodies()] == [
        ("run_failure", history.failed_run, ["load"])
    ]
    assert tick(sensor, history.instance, second.cursor).skip_message == "no new failed runs"
    assert len(receiver.bodies()) == 1


class Log:
    """Collects what a sensor logs."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda message: self.lines.append((level, message))


def test_an_alert_not_delivered_within_a_day_is_dropped_and_logged(receiver: Receiver) -> None:
    config = AlertConfig(f"{receiver.url}/robot/send?key={KEY}")
    old = PendingAlert(run_failure_alert("migration", "old", [], "boom", UI), since=1000.0, attempts=50)
    recent = PendingAlert(run_failure_alert("migration", "recent", [], "boom", UI), since=1000.0, attempts=5)
    log = Log()

    waiting, handled, note = send_alerts(log, config, [old], [], now=1000.0 + MAX_PENDING_AGE + 1)
    assert (waiting, handled, note) == ([], 1, "") and receiver.requests() == 0
    assert log.lines == [
        ("error", "alert for failed run old of migration dropped: not delivered within 24 h")
    ]

    waiting, handled, note = send_alerts(log, config, [recent], [], now=1000.0 + MAX_PENDING_AGE - 1)
    assert (waiting, handled) == ([], 1) and [b["run_id"] for b in receiver.bodies()] == ["recent"]
    assert PendingAlert.from_dict(json.loads(json.dumps(old.to_dict()))) == old


def test_runs_of_crmi_run_are_left_to_it(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """`crmi run` executes its run in its own process and alerts its failure itself: no second alert."""
    configure(monkeypatch, receiver.url)
    sensor = run_failure_alert_sensor()
    with dg.instance_for_test() as instance:
        cursor = tick(sensor, instance, None).cursor
        failing_job.execute_in_process(
            instance=instance, raise_on_error=False, tags={LAUNCHED_BY_TAG: LAUNCHED_BY_CLI}
        )
        assert tick(sensor, instance, cursor).skip_message == "no new failed runs"
    assert receiver.requests() == 0


def test_a_failed_crmi_run_is_alerted_with_its_project_and_exit_code(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert alert_cli_run("migration", "r1", "demo", ["core_customer"], "boom", 1) == (True, "")  # alerts off

    configure(monkeypatch, receiver.url, "wecom")
    assert alert_cli_run("migration", "r1", "demo", ["core_customer"], "boom\nmore", 1) == (
        True,
        "alert sent (wecom format)",
    )
    [body] = receiver.bodies()
    text = body["markdown"]["content"]
    for expected in ("run failed: migration", "**Project:** demo", "**Run:** r1", "core_customer", "boom",
                     "**Exit code:** 1 (crmi run)"):  # fmt: skip
        assert expected in text, text

    configure(monkeypatch, receiver.url)
    alert_cli_run("migration", "r2", "demo", [], "sales_xlsx/opportunity: amount loaded 3 ≠ core 4", 2)
    assert receiver.bodies()[-1] == {
        "kind": "run_unbalanced", "job": "migration", "run_id": "r2", "steps": [],
        "error": "sales_xlsx/opportunity: amount loaded 3 ≠ core 4", "url": f"{UI}/runs/r2",
        "project": "demo", "exit_code": 2,
    }  # fmt: skip
    assert Alert.from_dict(json.loads(json.dumps(receiver.bodies()[-1]))).exit_code == 2

    url = configure(monkeypatch, closed_port_url())
    delivered, note = alert_cli_run("migration", "r3", "demo", [], "boom", 1)
    assert not delivered and note.startswith("the alert of this run was not delivered: the webhook receiver")
    assert KEY not in note and url not in note
    monkeypatch.setenv("CRMI_ALERT_WEBHOOK_FORMAT", "teams")
    delivered, note = alert_cli_run("migration", "r3", "demo", [], "boom", 1)
    assert not delivered and "CRMI_ALERT_WEBHOOK_FORMAT='teams'" in note


def test_only_the_given_jobs_are_watched(
    history: History, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch, receiver.url)
    run_sensor, check_sensor = alert_sensors(jobs=[other_job])
    assert (run_sensor.name, check_sensor.name) == (RUN_ALERT_SENSOR, CHECK_ALERT_SENSOR)
    tick(run_sensor, history.instance, history.run_cursor)
    tick(check_sensor, history.instance, history.check_cursor)
    assert receiver.received == []

    tick(run_failure_alert_sensor([failing_job]), history.instance, history.run_cursor)
    assert [b["job"] for b in receiver.bodies()] == ["failing_job"]


def test_messages_keep_one_line_of_the_error() -> None:
    alert = run_failure_alert("migration", "r1", ["core_customer"], "x" * 1000 + "\n[SQL: INSERT …]", UI)
    assert len(alert.error) <= 300 and "\n" not in alert.error and "SQL" not in alert.error
    assert alert.url == f"{UI}/runs/r1"
    many = run_failure_alert("migration", "r1", [f"step_{i}" for i in range(8)], "boom", UI)
    assert "step_4 (+3 more)" in many.text()
    summary = metadata_summary({"rows": 3, "share": 0.25, "none": None, "big": {"k": "v" * 500}})
    assert summary.startswith("rows: 3; share: 0.25; big: ") and len(summary) <= 300


def test_the_url_and_secret_stay_out_of_config_repr_and_redacted_text() -> None:
    config = AlertConfig.from_env(
        {
            "CRMI_ALERT_WEBHOOK_URL": f"https://open.feishu.cn/open-apis/bot/v2/hook/{KEY}-4f2a",
            "CRMI_ALERT_WEBHOOK_SECRET": SIGNING_SECRET,
            "CRMI_ALERT_WEBHOOK_FORMAT": "lark",
        }
    )
    assert config is not None and config.format == "feishu"
    assert KEY not in repr(config) and SIGNING_SECRET not in repr(config)
    redacted = config.redact(f"bad hook {config.webhook_url}; token {KEY}-4f2a; secret {SIGNING_SECRET}")
    assert KEY not in redacted and SIGNING_SECRET not in redacted and "open-apis" not in redacted


def test_a_robot_refusal_is_an_error_without_the_url(receiver: Receiver) -> None:
    url = f"{receiver.url}/cgi-bin/webhook/send?key={KEY}"
    config = AlertConfig(url, "wecom")
    receiver.errmsg = f"invalid webhook url, hint: [{url}]"
    receiver.faults.append("robot:93000")
    alert = check_failure_alert("migration", "r1", "customers", "check_core_rules", "error", None, {}, UI)
    with pytest.raises(AlertDeliveryError) as raised:
        post_alert(alert, config)
    assert str(raised.value).startswith(
        "the wecom robot refused the message: error 93000: invalid webhook url"
    )
    assert KEY not in str(raised.value) and raised.value.__cause__ is None


def test_the_test_command_posts_a_test_alert(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert alerts_main() == 2
    assert "CRMI_ALERT_WEBHOOK_URL is not set" in capsys.readouterr().err

    configure(monkeypatch, receiver.url)
    assert alerts_main() == 0
    assert receiver.bodies() == [
        {"kind": "test", "job": "", "run_id": "", "steps": [],
         "error": "alerts of failed runs and failed checks will come here", "url": UI},
    ]  # fmt: skip

    receiver.faults.extend(["500"] * 3)
    assert alerts_main() == 1
    output = capsys.readouterr()
    assert "test alert not delivered: the webhook receiver answered HTTP 500" in output.err
    assert "(3 tries)" in output.err
    assert KEY not in output.out + output.err


FLAKY: dict[str, bool] = {"passes": False}


@dg.asset(check_specs=[dg.AssetCheckSpec("check_dead_letters", asset="outbox")])
def outbox() -> Iterator[Any]:
    yield dg.Output(1)
    passed = FLAKY["passes"]
    yield dg.AssetCheckResult(
        check_name="check_dead_letters", passed=passed, description=None if passed else "1 dead letter(s)"
    )


def test_a_check_that_keeps_failing_is_alerted_once_per_failure(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch, receiver.url)
    sensor = check_failure_alert_sensor()
    with dg.instance_for_test() as instance:
        cursor = tick(sensor, instance, None).cursor

        def runs(*outcomes: bool) -> None:
            for passes in outcomes:
                FLAKY["passes"] = passes
                dg.materialize([outbox], instance=instance)

        runs(False, False)  # fails, and fails again on the next run: one failure
        cursor = tick(sensor, instance, cursor).cursor
        runs(False)  # still failing, on a later tick (the state survives in the cursor)
        cursor = tick(sensor, instance, cursor).cursor
        assert [b["check"] for b in receiver.bodies()] == ["check_dead_letters"]

        runs(True, False, False)  # recovered, then a new failure: alerted once more
        data = tick(sensor, instance, cursor)
        assert len(receiver.bodies()) == 2
        assert tick(sensor, instance, data.cursor).skip_message == "no new failed checks"
