"""Dagster sensors that post an alert when a run fails or an asset check fails (see docs/alerts.md).

:func:`alert_sensors` returns both; ``integration.jobs.build_definitions`` adds them to the code location.
The message and the posting are :mod:`integration.alerts`; the settings come from ``CRMI_ALERT_*`` and are
read on every tick. An alert that cannot be delivered is logged (without the webhook URL) and the sensor
goes on: it never raises, so the next failure is still reported.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import dagster as dg

from integration.alerts import (
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

if TYPE_CHECKING:
    from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition
    from dagster._core.event_api import RunStatusChangeEventType

    MonitoredJob = dg.JobDefinition | UnresolvedAssetJobDefinition

RUN_ALERT_SENSOR = "alert_failed_runs"
CHECK_ALERT_SENSOR = "alert_failed_checks"
INTERVAL_SECONDS = 30
# WeCom and DingTalk robots accept 20 messages a minute: at most 10 check alerts every 30 s; the rest wait.
MAX_CHECK_ALERTS_PER_TICK = 10
MAX_ATTEMPTS = 3  # ticks that try to deliver the same check alert before it is given up (and logged)
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


def _run_failure(context: dg.RunFailureSensorContext, config: AlertConfig) -> Alert:
    run = context.dagster_run
    failures = step_failures(context.get_step_failure_events())
    # Steps that only failed because an earlier one had failed the run are not the news.
    first_hand = [f for f in failures if not f.after_failure] or failures
    if first_hand:
        error = first_hand[0].cause
    else:  # the run failed outside any step (a resource, the run worker)
        data = context.failure_event.event_specific_data
        info = getattr(data, "error", None)
        error = error_info_line(info) if info is not None else (context.failure_event.message or "")
    return run_failure_alert(run.job_name, run.run_id, [f.step for f in first_hand], error, config.ui_url)


def run_failure_alert_sensor(jobs: Sequence[MonitoredJob] | None = None) -> dg.SensorDefinition:
    """Return the sensor that posts one alert per failed run (of ``jobs``, or of any job of the location)."""

    @dg.run_failure_sensor(
        name=RUN_ALERT_SENSOR,
        monitored_jobs=list(jobs) if jobs else None,
        minimum_interval_seconds=INTERVAL_SECONDS,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Posts the job, run id, failed steps, first line of the error and a link to the run to the "
        f"webhook in {URL_ENV} (format CRMI_ALERT_WEBHOOK_FORMAT) when a run fails. Skips when the URL is not set.",
    )
    def _alert(context: dg.RunFailureSensorContext) -> dg.SkipReason | None:
        run = context.dagster_run
        what = f"failed run {run.run_id} of {run.job_name}"
        config = _config(context.log, what)
        if isinstance(config, str):
            return dg.SkipReason(config)
        try:
            post_alert(_run_failure(context, config), config)
        except AlertDeliveryError as exc:
            context.log.warning(f"alert for {what} not delivered: {exc}")
            return dg.SkipReason(f"alert for {what} not delivered: {exc}")
        except Exception as exc:  # reading the run's events: the sensor must keep going
            reason = config.redact(cause_line(exc))
            context.log.error(f"no alert for {what}: {reason}")
            return dg.SkipReason(f"no alert for {what}: {reason}")
        context.log.info(f"alert sent for {what}")
        return None  # the sensor goes on with the next failed run in the same tick

    return _alert


@dataclass
class CheckCursor:
    """Where the check sensor is: after run end ``after``; of the next run, ``sent`` alerts are done.

    ``failing`` holds the checks (``asset|check``) whose last evaluation failed and was alerted: their next
    failures are the same failure and are not alerted again until the check passes (or is not alerted).
    """

    after: int
    sent: int = 0
    attempts: int = 0  # failed deliveries of the next alert so far
    failing: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        """Return the cursor string."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | None) -> CheckCursor | None:
        """Return the cursor, or None for a new (or unreadable) one."""
        try:
            data = json.loads(text or "")
            failing = [str(key) for key in data.get("failing", [])]
            return cls(int(data["after"]), int(data.get("sent", 0)), int(data.get("attempts", 0)), failing)
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

    def in_scope(context: dg.SensorEvaluationContext, run: dg.DagsterRun) -> bool:
        # As Dagster's run status sensors do: a run of this code location (and of the given jobs).
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

    def deliver(
        context: dg.SensorEvaluationContext, config: AlertConfig, cursor: CheckCursor
    ) -> tuple[int, str]:
        """Post the alerts after ``cursor``, moving it; return how many were handled and the tick's note."""
        handled = 0
        for storage_id, run_id in _run_ends(context.instance, cursor.after):
            try:
                run = context.instance.get_run_by_id(run_id)
                alerts = (
                    _failed_checks(context.instance, run, config) if run and in_scope(context, run) else []
                )
            except Exception as exc:  # an unreadable run is logged and passed over; the next ones still count
                context.log.error(f"failed checks of run {run_id} not read: {config.redact(cause_line(exc))}")
                alerts = []
            for key, alert in alerts:
                if alert is None:  # passed: its next failure is a new one
                    if key in cursor.failing:
                        cursor.failing.remove(key)
                    continue
                if key in cursor.failing:  # still failing since its alert (or handled earlier in this run)
                    continue
                if handled == MAX_CHECK_ALERTS_PER_TICK:
                    return handled, "more wait for the next tick"
                what = f"check {alert.asset} {alert.check} of run {run_id}"
                try:
                    post_alert(alert, config)
                except AlertDeliveryError as exc:
                    cursor.attempts += 1
                    if cursor.attempts < MAX_ATTEMPTS:
                        note = (
                            f"alert for {what} not delivered (attempt {cursor.attempts} of {MAX_ATTEMPTS}, "
                            f"the next tick retries): {exc}"
                        )
                        context.log.warning(note)
                        return handled, note
                    context.log.error(f"alert for {what} given up after {MAX_ATTEMPTS} attempts: {exc}")
                else:
                    context.log.info(f"alert sent for {what}")
                cursor.failing.append(key)
                cursor.sent, cursor.attempts, handled = cursor.sent + 1, 0, handled + 1
            cursor.after, cursor.sent, cursor.attempts = storage_id, 0, 0
        return handled, "up to date" if handled else "no new failed checks"

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
            cursor.after, cursor.sent, cursor.attempts = (
                max(cursor.after, _latest_run_end(context.instance)),
                0,
                0,
            )
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
