"""Dagster sensors that post an alert when a run fails or an asset check fails (see docs/alerts.md).

:func:`alert_sensors` returns both; ``integration.jobs.build_definitions`` adds them to the code location.
The message and the posting are :mod:`integration.alerts`; the settings come from ``CRMI_ALERT_*`` and are
read on every tick. An alert that cannot be delivered is logged (without the webhook URL) and kept in the
sensor's cursor (its content, never the request URL); the next ticks try it again until it is delivered or
given up (:data:`MAX_PENDING_AGE`, or :data:`MAX_ATTEMPTS` ticks for a refusal). The sensors never raise,
so the next failure is still reported.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import dagster as dg

from integration.alerts import (
    CHECK_FAILURE,
    URL_ENV,
    Alert,
    AlertConfig,
    AlertConfigError,
    AlertDeliveryError,
    check_failure_alert,
    post_alert,
    run_failure_alert,
)
from integration.failures import cause_line, error_info_line, step_failures
from integration.run_tags import LAUNCHED_BY_CLI, LAUNCHED_BY_TAG

if TYPE_CHECKING:
    from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition
    from dagster._core.event_api import RunStatusChangeEventType

    MonitoredJob = dg.JobDefinition | UnresolvedAssetJobDefinition

RUN_ALERT_SENSOR = "alert_failed_runs"
CHECK_ALERT_SENSOR = "alert_failed_checks"
INTERVAL_SECONDS = 30
# WeCom and DingTalk robots accept 20 messages a minute: at most 10 check alerts every 30 s; the rest wait.
MAX_CHECK_ALERTS_PER_TICK = 10
MAX_ATTEMPTS = 3  # ticks that try an alert the receiver refused (4xx, robot error) before it is given up
MAX_PENDING_AGE = 24 * 3600.0  # seconds an alert the receiver could not take is tried again, then dropped
MAX_PENDING = 100  # undelivered alerts kept in a cursor at most; the oldest are dropped beyond
RUN_END_EVENTS: tuple[RunStatusChangeEventType, ...] = (
    dg.DagsterEventType.RUN_SUCCESS,
    dg.DagsterEventType.RUN_FAILURE,
    dg.DagsterEventType.RUN_CANCELED,
)
_FETCH = 50  # run ends read per event type and tick
_SCALAR_METADATA = (
    dg.TextMetadataValue,
    dg.IntMetadataValue,
    dg.FloatMetadataValue,
    dg.BoolMetadataValue,
    dg.JsonMetadataValue,
)


def alert_sensors(jobs: Sequence[MonitoredJob] | None = None) -> list[dg.SensorDefinition]:
    """Return the run-failure and check-failure alert sensors, for ``jobs`` or every job of the location."""
    return [run_failure_alert_sensor(jobs), check_failure_alert_sensor(jobs)]


def _config(log: Any, what: str) -> AlertConfig | str:
    """Return the alert settings, or why there is no alert for ``what`` (the skip reason)."""
    try:
        config = AlertConfig.from_env()
    except AlertConfigError as exc:
        log.error(f"no alert for {what}: {exc}")
        return f"no alert for {what}: {exc}"
    return config if config is not None else f"no alert for {what}: {URL_ENV} is not set"


@dataclass
class PendingAlert:
    """An alert the receiver did not take yet: its content, when it was first tried, the ticks that tried."""

    alert: Alert
    since: float  # epoch seconds of the first try
    attempts: int = 1
    refused: bool = False  # the last try was refused (4xx, robot error), not a receiver down or busy

    def to_dict(self) -> dict[str, Any]:
        """Return the entry as kept in a sensor's cursor (the alert's content; no URL, key or secret)."""
        return {"alert": self.alert.to_dict(), "since": self.since, "attempts": self.attempts,
                "refused": self.refused}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Any) -> PendingAlert:
        """Return the entry :meth:`to_dict` returned; raise ValueError if ``data`` is not one."""
        try:
            return cls(Alert.from_dict(data["alert"]), float(data["since"]), int(data.get("attempts", 1)),
                       bool(data.get("refused", False)))  # fmt: skip
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a pending alert: {type(exc).__name__}") from None


def _pending_from(data: Any) -> list[PendingAlert]:
    """Return the readable pending alerts of a cursor's ``pending`` list (an unreadable entry is skipped)."""
    found = []
    for entry in data if isinstance(data, list) else []:
        try:
            found.append(PendingAlert.from_dict(entry))
        except ValueError:
            continue
    return found


def describe(alert: Alert) -> str:
    """Return how logs and tick messages name an alert (``failed run … of …`` / ``check … of run …``)."""
    if alert.kind == CHECK_FAILURE:
        return f"check {alert.asset} {alert.check} of run {alert.run_id}"
    return f"failed run {alert.run_id} of {alert.job}"


def send_alerts(
    log: Any,
    config: AlertConfig,
    pending: list[PendingAlert],
    new: Sequence[Alert],
    budget: int | None = None,
    now: float | None = None,
) -> tuple[list[PendingAlert], int, str]:
    """Post the ``pending`` alerts (oldest first), then the ``new`` ones; return those still undelivered, how
    many were posted or given up, and a note on the failures.

    After the first failed delivery of the tick (its quick retries included) nothing more is posted: the
    rest waits for the next tick. An alert is given up (logged as an error) when it was first tried more than
    :data:`MAX_PENDING_AGE` ago, after :data:`MAX_ATTEMPTS` ticks refused it, or beyond :data:`MAX_PENDING`.
    ``budget`` caps the posts of one tick (robots take 20 messages a minute).
    """
    now = time.time() if now is None else now
    queue = [*pending, *(PendingAlert(alert, now, 0) for alert in new)]
    waiting: list[PendingAlert] = []
    handled, failure = 0, ""
    for entry in queue:
        what = describe(entry.alert)
        if now - entry.since > MAX_PENDING_AGE:
            log.error(f"alert for {what} dropped: not delivered within {MAX_PENDING_AGE / 3600:g} h")
            handled += 1
            continue
        if failure or (budget is not None and handled >= budget):
            waiting.append(entry)
            continue
        try:
            post_alert(entry.alert, config)
        except AlertDeliveryError as exc:
            entry.attempts, entry.refused = entry.attempts + 1, not exc.transient
            if entry.refused and entry.attempts >= MAX_ATTEMPTS:
                log.error(f"alert for {what} given up after {entry.attempts} attempts: {exc}")
                handled += 1
                continue
            failure = f"alert for {what} not delivered (attempt {entry.attempts}; the next tick tries it again): {exc}"
            log.warning(failure)
            waiting.append(entry)
            continue
        log.info(f"alert sent for {what}")
        handled += 1
    for entry in waiting[:-MAX_PENDING] if len(waiting) > MAX_PENDING else []:
        log.error(f"alert for {describe(entry.alert)} dropped: more than {MAX_PENDING} alerts wait")
    kept = waiting[-MAX_PENDING:]
    if kept and not failure:
        failure = f"{len(kept)} alert(s) wait for the next tick"
    return kept, handled, failure


def _in_scope(
    context: dg.SensorEvaluationContext, run: dg.DagsterRun, job_names: frozenset[str] | None
) -> bool:
    """Return True for a run of this code location (and of the given jobs), as Dagster's run status sensors."""
    if job_names is not None and run.job_name not in job_names:
        return False
    origin = run.remote_job_origin
    location = context.code_location_origin.location_name if context.code_location_origin else None
    if origin is None:
        return location is None  # a run executed in process (tests, `crmi run`) has no origin
    repository = origin.repository_origin
    return (repository.code_location_origin.location_name, repository.repository_name) == (
        location,
        context.repository_name,
    )


def _run_failure(
    instance: dg.DagsterInstance,
    run: dg.DagsterRun,
    failure_event: dg.DagsterEvent | None,
    config: AlertConfig,
) -> Alert:
    records = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE).records
    failures = step_failures(
        [r.event_log_entry.dagster_event for r in records if r.event_log_entry.dagster_event]
    )
    # Steps that only failed because an earlier one had failed the run are not the news.
    first_hand = [f for f in failures if not f.after_failure] or failures
    if first_hand:
        error = first_hand[0].cause
    else:  # the run failed outside any step (a resource, the run worker)
        data = failure_event.event_specific_data if failure_event is not None else None
        info = getattr(data, "error", None)
        message = failure_event.message if failure_event is not None else None
        error = error_info_line(info) if info is not None else (message or "")
    return run_failure_alert(run.job_name, run.run_id, [f.step for f in first_hand], error, config.ui_url)


@dataclass
class RunCursor:
    """Where the run sensor is: after run failure ``after``; ``pending`` alerts wait for the receiver."""

    after: int
    pending: list[PendingAlert] = field(default_factory=list)

    def to_json(self) -> str:
        """Return the cursor string."""
        return json.dumps({"after": self.after, "pending": [p.to_dict() for p in self.pending]})

    @classmethod
    def from_json(cls, text: str | None) -> RunCursor | None:
        """Return the cursor, or None for a new (or unreadable, e.g. Dagster's own run sensor's) one."""
        try:
            data = json.loads(text or "")
            return cls(int(data["after"]), _pending_from(data.get("pending")))
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


def _latest_run_failure(instance: dg.DagsterInstance) -> int:
    records = instance.fetch_run_status_changes(dg.DagsterEventType.RUN_FAILURE, limit=1).records
    return records[0].storage_id if records else -1


def run_failure_alert_sensor(jobs: Sequence[MonitoredJob] | None = None) -> dg.SensorDefinition:
    """Return the sensor that posts one alert per failed run (of ``jobs``, or of any job of the location)."""
    job_names = frozenset(job.name for job in jobs) if jobs else None

    def new_alerts(
        context: dg.SensorEvaluationContext, config: AlertConfig, cursor: RunCursor
    ) -> list[Alert]:
        """Return the alerts of the runs that failed after the cursor, moving it past them."""
        alerts = []
        records = context.instance.fetch_run_status_changes(
            dg.RunStatusChangeRecordsFilter(
                event_type=dg.DagsterEventType.RUN_FAILURE, after_storage_id=cursor.after
            ),
            limit=_FETCH,
            ascending=True,
        ).records
        for record in records:
            cursor.after = record.storage_id
            try:
                run = context.instance.get_run_by_id(record.run_id)
                if run is None or not _in_scope(context, run, job_names):
                    continue
                if run.tags.get(LAUNCHED_BY_TAG) == LAUNCHED_BY_CLI:
                    continue  # `crmi run` posted this run's alert itself
                alerts.append(
                    _run_failure(context.instance, run, record.event_log_entry.dagster_event, config)
                )
            except Exception as exc:  # an unreadable run is logged and passed over; the next ones still count
                context.log.error(
                    f"no alert for failed run {record.run_id}: {config.redact(cause_line(exc))}"
                )
        return alerts

    @dg.sensor(
        name=RUN_ALERT_SENSOR,
        minimum_interval_seconds=INTERVAL_SECONDS,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Posts the job, run id, failed steps, first line of the error and a link to the run to the "
        f"webhook in {URL_ENV} (format CRMI_ALERT_WEBHOOK_FORMAT) when a run fails; an alert the receiver did "
        "not take is tried again on the next ticks. Skips when the URL is not set.",
    )
    def _alert(context: dg.SensorEvaluationContext) -> dg.SkipReason:
        cursor = RunCursor.from_json(context.cursor)
        if cursor is None:  # first tick: alert on runs that fail from now on, not on the history
            context.update_cursor(RunCursor(_latest_run_failure(context.instance)).to_json())
            return dg.SkipReason("started: runs that fail from now on are alerted")
        config = _config(context.log, "failed runs")
        if isinstance(config, str):
            # Runs that fail while alerts are off are passed over, not alerted in a burst later.
            cursor.after = max(cursor.after, _latest_run_failure(context.instance))
            context.update_cursor(cursor.to_json())
            return dg.SkipReason(config)
        try:
            alerts = new_alerts(context, config, cursor)
        except Exception as exc:  # reading the event log: the sensor must keep going (and retry what waits)
            alerts = []
            context.log.error(f"could not read the failed runs: {config.redact(cause_line(exc))}")
        cursor.pending, handled, note = send_alerts(context.log, config, cursor.pending, alerts)
        context.update_cursor(cursor.to_json())
        if handled:
            return dg.SkipReason(f"{handled} run alert(s) handled" + (f"; {note}" if note else ""))
        return dg.SkipReason(note or "no new failed runs")

    return _alert


@dataclass
class CheckCursor:
    """Where the check sensor is: after run end ``after``; ``pending`` alerts wait for the receiver.

    ``failing`` holds the checks (``asset|check``) whose last evaluation failed and was alerted: their next
    failures are the same failure and are not alerted again until the check passes (or is not alerted).
    """

    after: int
    failing: list[str] = field(default_factory=list)
    pending: list[PendingAlert] = field(default_factory=list)

    def to_json(self) -> str:
        """Return the cursor string."""
        return json.dumps({"after": self.after, "failing": self.failing,
                           "pending": [p.to_dict() for p in self.pending]})  # fmt: skip

    @classmethod
    def from_json(cls, text: str | None) -> CheckCursor | None:
        """Return the cursor, or None for a new (or unreadable) one."""
        try:
            data = json.loads(text or "")
            failing = [str(key) for key in data.get("failing", [])]
            return cls(int(data["after"]), failing, _pending_from(data.get("pending")))
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


def _run_ends(instance: dg.DagsterInstance, after: int) -> list[tuple[int, str]]:
    """Return (storage id, run id) of the runs that ended (success, failure, cancel) after ``after``."""
    found: list[tuple[int, str]] = []
    horizon: int | None = None
    for event_type in RUN_END_EVENTS:
        records = instance.fetch_run_status_changes(
            dg.RunStatusChangeRecordsFilter(event_type=event_type, after_storage_id=after),
            limit=_FETCH,
            ascending=True,
        ).records
        found.extend((r.storage_id, r.run_id) for r in records)
        if len(records) == _FETCH:  # more to read: nothing past this one is known to be complete
            last = records[-1].storage_id
            horizon = last if horizon is None else min(horizon, last)
    return sorted(f for f in found if horizon is None or f[0] <= horizon)


def _latest_run_end(instance: dg.DagsterInstance) -> int:
    ids = [-1]
    for event_type in RUN_END_EVENTS:
        ids.extend(r.storage_id for r in instance.fetch_run_status_changes(event_type, limit=1).records)
    return max(ids)


def _metadata(evaluation: dg.AssetCheckEvaluation) -> dict[str, Any]:
    # Tables and markdown stay in the UI; numbers, text and small JSON make the summary.
    return {k: v.value for k, v in evaluation.metadata.items() if isinstance(v, _SCALAR_METADATA)}


def check_key(asset: str, check: str) -> str:
    """Return how the check sensor's cursor names a check (``asset|check``)."""
    return f"{asset}|{check}"


def _failed_checks(
    instance: dg.DagsterInstance, run: dg.DagsterRun, config: AlertConfig
) -> list[tuple[str, Alert | None]]:
    """Return each evaluated check of ``run`` (its key) in evaluation order, with its alert when it failed
    with a severity that is alerted (else None: it passed, for the alerts)."""
    records = instance.get_records_for_run(
        run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
    ).records
    alerts: list[tuple[str, Alert | None]] = []
    for record in records:
        event = record.event_log_entry.dagster_event
        evaluation = event.asset_check_evaluation_data if event is not None else None
        if evaluation is None:
            continue
        asset = evaluation.asset_key.to_user_string()
        key = check_key(asset, evaluation.check_name)
        if evaluation.passed or not config.alerts_severity(evaluation.severity.value):
            alerts.append((key, None))
            continue
        severity, summary = evaluation.severity.value, _metadata(evaluation)
        alerts.append((
            key,
            check_failure_alert(
                run.job_name, run.run_id, asset, evaluation.check_name, severity, evaluation.description,
                summary, config.ui_url,
            ),
        ))  # fmt: skip
    return alerts


def check_failure_alert_sensor(jobs: Sequence[MonitoredJob] | None = None) -> dg.SensorDefinition:
    """Return the sensor that posts one alert per failed asset check, once the check's run has ended."""
    job_names = frozenset(job.name for job in jobs) if jobs else None

    def deliver(
        context: dg.SensorEvaluationContext, config: AlertConfig, cursor: CheckCursor
    ) -> tuple[int, str]:
        """Post the waiting alerts and those after ``cursor``, moving it; return how many were handled and
        the tick's note."""
        new: list[Alert] = []
        room = MAX_CHECK_ALERTS_PER_TICK - len(cursor.pending)
        for storage_id, run_id in _run_ends(context.instance, cursor.after):
            try:
                run = context.instance.get_run_by_id(run_id)
                alerts = (
                    _failed_checks(context.instance, run, config)
                    if run and _in_scope(context, run, job_names)
                    else []
                )
            except Exception as exc:  # an unreadable run is logged and passed over; the next ones still count
                context.log.error(f"failed checks of run {run_id} not read: {config.redact(cause_line(exc))}")
                alerts = []
            fresh = [a for k, a in alerts if a is not None and k not in cursor.failing]
            if new and len(new) + len(fresh) > room:
                break  # this run's alerts wait for the next tick (robots take 20 messages a minute)
            for key, alert in alerts:
                if alert is None:  # passed: its next failure is a new one
                    if key in cursor.failing:
                        cursor.failing.remove(key)
                elif key not in cursor.failing:  # else still failing since its alert
                    cursor.failing.append(key)
                    new.append(alert)
            cursor.after = storage_id
        cursor.pending, handled, note = send_alerts(
            context.log, config, cursor.pending, new, budget=MAX_CHECK_ALERTS_PER_TICK
        )
        return handled, note or ("up to date" if handled else "no new failed checks")

    @dg.sensor(
        name=CHECK_ALERT_SENSOR,
        minimum_interval_seconds=INTERVAL_SECONDS,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Posts one alert per failed asset check (severity ERROR; also WARN with "
        f"CRMI_ALERT_CHECK_SEVERITY=WARN) to the webhook in {URL_ENV} when the check's run has ended: asset, "
        "check, run id, the check's description and metadata, a link to the run. Skips when the URL is not set.",
    )
    def _alert(context: dg.SensorEvaluationContext) -> dg.SkipReason:
        cursor = CheckCursor.from_json(context.cursor)
        if cursor is None:  # first tick: alert on runs that end from now on, not on the history
            context.update_cursor(CheckCursor(_latest_run_end(context.instance)).to_json())
            return dg.SkipReason("started: failed checks of runs that end from now on are alerted")
        config = _config(context.log, "failed checks")
        if isinstance(config, str):
            # Runs that end while alerts are off are passed over, not alerted in a burst later.
            cursor.after = max(cursor.after, _latest_run_end(context.instance))
            context.update_cursor(cursor.to_json())
            return dg.SkipReason(config)
        try:
            handled, note = deliver(context, config, cursor)
        except Exception as exc:  # reading the event log: the sensor must keep going
            handled, note = 0, f"could not read the run ends: {config.redact(cause_line(exc))}"
            context.log.error(note)
        context.update_cursor(cursor.to_json())
        return dg.SkipReason(f"{handled} check alert(s) handled; {note}" if handled else note)

    return _alert
