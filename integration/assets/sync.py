"""Dagster wiring of sync with target systems (``sync:`` in project.yaml): assets, jobs, schedules, sensor, checks.

Per target ``<t>``:

* assets ``sync_<t>_inbound`` and ``sync_<t>_outbound`` (group ``sync``): one :func:`run_sync` each, with the
  run's counts as integer metadata so the asset pages plot them over time;
* jobs ``sync_<t>_inbound_job`` / ``sync_<t>_outbound_job`` (Dagster refuses a job named like an asset),
  tagged ``crmi/sync-target`` and ``crmi/sync-direction``: a run-queue limit of 1 on ``crmi/sync-target``
  (``concurrency: runs: tag_concurrency_limits`` in dagster.yaml, ``value: {applyLimitPerUniqueValue: true}``)
  queues a second sync of a target; without it the engine refuses the second one at start;
* schedules ``sync_<t>_inbound_schedule`` / ``sync_<t>_outbound_schedule`` from the spec's cron and time zone;
* the sensor ``sync_<t>_outbox``: an outbound run when committed changes or due outbox rows appear;
* asset checks (backlog age, dead letters, open conflicts, inbound freshness) and the job
  ``sync_<t>_checks_job`` with its schedule, so freshness is looked at while nothing runs.

Schedules and the sensor start **stopped**: they write to the ERP, and a fresh ``make ui`` before go-live
must not send trial data there. IT staff turn them on after go-live (Dagster UI, Automation page).
The migration jobs leave the ``sync`` group out (integration.jobs), so ``crmi run`` never syncs.

A sync step holds the core's run lock (shared with other syncs) while it runs, so ``crmi run`` and rollback
refuse meanwhile, naming it; the schedules and the sensor skip their tick while one of those holds the core
(:func:`core_free_schedule`), and a sync step that finds it held all the same (launched by hand, or a tick that
raced) waits its turn: it asks Dagster to run it again later, naming the holder, and fails only when the wait is
over (:func:`holding_the_core_or_retry`, :class:`BusyWait`).
"""

# No ``from __future__ import annotations`` here: Dagster inspects the *objects* annotating ``context``.

import datetime as dt
import json
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition
from dagster._utils.schedules import reverse_cron_string_iterator
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from crm_core.db import session_factory
from crm_core.errors import ConfigError, CrmError, SyncError
from crm_core.models import LoadRun, SyncConflict, SyncOutbox
from crm_core.runs import COMMITTED, CoreBusy
from crm_core.settings import env_number
from crm_core.watermarks import read_watermark
from integration.assets.factories import LAYER_TAG, OWNER_INTEGRATION
from integration.assets.resources import CoreDatabase, MigrationProject
from integration.failures import cause_line, frames, shorten
from integration.sync.engine import (
    BUSY_RETRY_ENV,
    BUSY_WAIT_ENV,
    BusyWait,
    SyncReport,
    core_busy,
    holding_the_core,
    run_sync,
    seconds_text,
)
from integration.sync.outbox import CAPTURE_STREAM, oldest_pending, watermark_source
from integration.sync.spec import CompiledTarget

SYNC_GROUP = "sync"
TARGET_TAG = "crmi/sync-target"
DIRECTION_TAG = "crmi/sync-direction"
DIRECTIONS = ("inbound", "outbound")
# SyncReport.as_dict() counts shown as integer metadata (plotted per materialization in the UI).
METRICS = (
    "received", "applied", "unchanged", "rejected", "kept_crm", "conflicts", "conflicts_open", "sent",
    "delivered", "echoes_suppressed", "nothing_to_send", "retries", "dead_letters", "awaiting", "waiting",
)  # fmt: skip
BACKLOG_WARN = dt.timedelta(hours=1)
BACKLOG_ERROR = dt.timedelta(hours=4)  # a target down for a morning pages someone (was 24 h: nobody, all day)
BACKLOG_ERROR_ENV = "CRMI_SYNC_BACKLOG_ERROR_HOURS"
FRESHNESS_DEFAULT = dt.timedelta(hours=1)  # inbound without a schedule
CHECKS_CRON = "*/15 * * * *"
SENSOR_INTERVAL_SECONDS = 30
MAX_REASONS = 5
# Dagster runs of a target's sync that are not over yet: the sensor waits for them instead of piling up.
IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    """Return a database time as UTC-aware (SQLite hands back naive values)."""
    return value.replace(tzinfo=dt.UTC) if value is not None and value.tzinfo is None else value


def asset_name(target: str, direction: str) -> str:
    """Return the asset name of a target's sync in one direction."""
    return f"sync_{target}_{direction}"


def job_name(target: str, what: str) -> str:
    """Return the job name of a target's ``inbound``, ``outbound`` or ``checks``.

    Not the asset's name: Dagster refuses a job and an op of one name.
    """
    return f"sync_{target}_{what}_job"


def schedule_name(target: str, what: str) -> str:
    """Return the schedule name of a target's ``inbound``, ``outbound`` or ``checks`` job."""
    return f"sync_{target}_{what}_schedule"


def sensor_name(target: str) -> str:
    """Return the name of a target's outbox sensor."""
    return f"sync_{target}_outbox"


def _sync_runs_of(target: str) -> Any:
    """Return the SQL condition 'a sync run of ``target``' (run keys ``sync-<target>-...``)."""
    return LoadRun.run_key.startswith(f"sync-{target}-", autoescape=True)


# --------------------------------------------------------------------------- assets


def sync_asset(target: CompiledTarget, direction: str) -> dg.AssetsDefinition:
    """Return the asset that runs one sync of ``target`` in ``direction`` (inbound or outbound)."""
    if direction not in DIRECTIONS:
        raise SyncError(f"unknown direction '{direction}'; choose {', '.join(DIRECTIONS)}")
    name = target.name
    entities = sorted(
        e
        for e, s in target.entities.items()
        if (s.inbound_enabled if direction == "inbound" else s.outbound_enabled)
    )
    description = (
        f"Reads what changed in {name} (crosswalk system {target.system}) since the last sync into the CRM "
        f"core ({', '.join(entities) or 'no entity'}): the owner's value wins, conflicts are recorded."
        if direction == "inbound"
        else f"Sends the CRM core's committed changes ({', '.join(entities) or 'no entity'}) to {name} "
        "through the outbox: trade ids, retries with backoff, dead letters, keys written back."
    )
    schedule = getattr(target.spec.schedule, direction)
    freshness = None
    if direction == "inbound":  # overdue in the UI after one interval of its schedule, failed after two
        limit = freshness_limit(target)
        freshness = dg.FreshnessPolicy.time_window(fail_window=limit, warn_window=limit / 2)
        description += f" Overdue when no inbound sync ended in the last {_hours(limit / 2)}."

    @dg.asset(
        name=asset_name(name, direction),
        group_name=SYNC_GROUP,
        description=description,
        required_resource_keys={"core", "project"},
        kinds={"sqlalchemy"},
        owners=[OWNER_INTEGRATION],
        tags={LAYER_TAG: "sync", TARGET_TAG: name, DIRECTION_TAG: direction},
        freshness_policy=freshness,
        metadata={
            "sync_target": name,
            "direction": direction,
            "entities": dg.MetadataValue.json(entities),
            "schedule": f"{schedule} ({target.spec.schedule.timezone})" if schedule else "none",
        },
    )
    def _sync(context: dg.AssetExecutionContext) -> dg.MaterializeResult:  # type: ignore[type-arg]
        started = time.monotonic()
        core: CoreDatabase = context.resources.core
        project: MigrationProject = context.resources.project
        try:
            report = run_sync(
                project.migration(),
                core.engine(),
                name,
                direction,
                by=f"Dagster run {context.run.run_id[:8]}",
                hold=lambda engine, holder: holding_the_core_or_retry(context, engine, holder),
            )
        except (dg.RetryRequested, dg.Failure):  # waiting for the core, or given up: already said
            raise
        except CoreBusy as exc:  # the holder and what to do, whole (cause_line would cut a long lock path)
            raise dg.Failure(description=str(exc), allow_retries=False) from None
        except CrmError as exc:
            raise dg.Failure(description=cause_line(exc), allow_retries=False) from None
        except Exception as exc:
            raise dg.Failure(
                description=cause_line(exc),
                metadata={"error_type": type(exc).__name__, "traceback": dg.MetadataValue.text(frames(exc))},
                allow_retries=False,
            ) from None
        if report.delivery.stopped:
            context.log.warning(
                f"delivery to {name} paused: {shorten(report.delivery.stopped)} (retried later)"
            )
        metadata = report_metadata(report)
        metadata["duration_seconds"] = dg.MetadataValue.float(round(time.monotonic() - started, 3))
        return dg.MaterializeResult(metadata=metadata)

    return _sync


def report_metadata(report: SyncReport) -> dict[str, Any]:
    """Return a sync report as materialization metadata: counts as integers, reasons masked, no URLs."""
    data = report.as_dict()
    metadata: dict[str, Any] = {key: dg.MetadataValue.int(int(data[key])) for key in METRICS}
    metadata["load_run"] = dg.MetadataValue.text(report.run_key)
    metadata["captured"] = dg.MetadataValue.json(data["captured"])
    metadata["by_entity"] = dg.MetadataValue.json(data["entities"])
    if report.delivery.stopped:
        metadata["delivery_paused"] = dg.MetadataValue.text(shorten(report.delivery.stopped))
    if report.delivery.errors:
        metadata["dead_letter_reasons"] = dg.MetadataValue.json(
            [shorten(e) for e in report.delivery.errors[:MAX_REASONS]]
        )
    return metadata


# --------------------------------------------------------------------------- outbox sensor


@dataclass(frozen=True)
class OutboxCursor:
    """Where the outbox sensor of a target stopped looking (stored as JSON in the sensor's cursor).

    ``run``: every load run up to this id was looked at (none of them still running);
    ``outbox``: the highest pending outbox row id that asked for a run;
    ``due``: the latest ``next_attempt_at`` of the pending rows that asked for a run (a retry moves a row's
    ``next_attempt_at`` past it, so the row asks again when it becomes due).
    """

    run: int = 0
    outbox: int = 0
    due: dt.datetime | None = None

    @classmethod
    def parse(cls, text: str | None) -> "OutboxCursor":
        """Return the cursor stored as ``text`` (empty: the start)."""
        if not text:
            return cls()
        data = json.loads(text)
        due = data.get("due")
        return cls(int(data.get("run", 0)), int(data.get("outbox", 0)),
                   dt.datetime.fromisoformat(due) if due else None)  # fmt: skip

    def to_json(self) -> str:
        """Return the cursor as JSON."""
        return json.dumps(
            {"run": self.run, "outbox": self.outbox, "due": self.due.isoformat() if self.due else None},
            sort_keys=True,
        )


@dataclass
class OutboxScan:
    """What the outbox sensor found since its cursor."""

    cursor: OutboxCursor
    changed_runs: list[int] = field(default_factory=list)  # committed load runs with changes to capture
    new_rows: int = 0  # pending, due outbox rows above the cursor's id
    due_rows: int = 0  # rows seen before that are pending and due again (retries, resent dead letters)
    running: int | None = None  # the first load run still running (the scan stops before it)
    first: bool = False  # no outbound capture of the target yet
    start: str = "now"  # the target's ``start``: what its first sync sends

    @property
    def wanted(self) -> bool:
        """Return True when an outbound run has something to do."""
        return bool(self.changed_runs or self.new_rows or self.due_rows)

    def reason(self) -> str:
        """Return why a run is (or is not) requested, on one line."""
        parts = []
        if self.first and self.changed_runs and self.start == "now":
            parts.append("no outbound sync yet: the first one marks where capture starts (start: now)")
        elif self.changed_runs:
            shown = ", ".join(str(i) for i in self.changed_runs[:MAX_REASONS])
            more = "…" if len(self.changed_runs) > MAX_REASONS else ""
            parts.append(f"{len(self.changed_runs)} committed load run(s) to capture (ids {shown}{more})")
        if self.new_rows:
            parts.append(f"{self.new_rows} new outbox row(s) pending")
        if self.due_rows:
            parts.append(f"{self.due_rows} outbox row(s) due for a retry")
        if not parts:
            parts.append("no committed change and no outbox row due since the last look")
        if self.running is not None:
            parts.append(
                f"load run {self.running} is still running (looked at when it ends; "
                "if its process is gone, `crmi runs recover`)"
            )
        return "; ".join(parts)


def scan_outbox(
    session: Session, target: CompiledTarget, cursor: OutboxCursor, now: dt.datetime
) -> OutboxScan:
    """Look at what changed since ``cursor`` with indexed range reads only (never a full table).

    Load runs above ``max(cursor, capture watermark)`` that committed and are not this target's own sync runs
    (each outbound run would otherwise start the next) have changes for the outbound capture; pending outbox
    rows above the cursor's id, or that became due since its time, are waiting for a delivery.
    """
    name = target.name
    captured = read_watermark(session, watermark_source(name), CAPTURE_STREAM)
    floor = max(cursor.run, int(captured.value) if captured is not None else 0)
    running = session.scalar(
        select(func.min(LoadRun.id)).where(LoadRun.id > floor, LoadRun.status == "running")
    )
    if running is not None:
        upto = int(running) - 1
    else:
        newest = session.scalar(select(func.max(LoadRun.id)).where(LoadRun.id > floor))
        upto = int(newest) if newest is not None else floor
    changed = list(
        session.scalars(
            select(LoadRun.id)
            .where(
                LoadRun.id > floor, LoadRun.id <= upto, LoadRun.status.in_(COMMITTED), ~_sync_runs_of(name)
            )
            .order_by(LoadRun.id)
        )
    )
    pending = (SyncOutbox.target == name, SyncOutbox.status == "pending", SyncOutbox.next_attempt_at <= now)
    new_count, new_max, new_due = session.execute(
        select(func.count(), func.max(SyncOutbox.id), func.max(SyncOutbox.next_attempt_at)).where(
            *pending, SyncOutbox.id > cursor.outbox
        )
    ).one()
    # Rows seen before that are pending again and due: a retry after a transport failure, a dead letter
    # resent with `crmi sync retry`. Their next_attempt_at moved past the cursor's.
    retry_count, retry_due = 0, None
    if cursor.outbox:
        retry = select(func.count(), func.max(SyncOutbox.next_attempt_at)).where(
            *pending, SyncOutbox.id <= cursor.outbox
        )
        if cursor.due is not None:
            retry = retry.where(SyncOutbox.next_attempt_at > cursor.due)
        retry_count, retry_due = session.execute(retry).one()
    dues = [d for d in (cursor.due, _aware(new_due), _aware(retry_due)) if d is not None]
    return OutboxScan(
        cursor=OutboxCursor(
            run=max(cursor.run, upto),
            outbox=max(cursor.outbox, int(new_max or 0)),
            due=max(dues) if dues else None,
        ),
        changed_runs=changed,
        new_rows=int(new_count or 0),
        due_rows=int(retry_count or 0),
        running=int(running) if running is not None else None,
        first=captured is None,
        start=target.spec.start,
    )


def outbox_sensor(
    target: CompiledTarget, job: UnresolvedAssetJobDefinition, core_database_url: str | None
) -> dg.SensorDefinition:
    """Return the sensor that starts an outbound run of ``target`` when there is something to send."""
    name = target.name

    @dg.sensor(
        name=sensor_name(name),
        job=job,
        minimum_interval_seconds=SENSOR_INTERVAL_SECONDS,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description=f"Starts {job.name} when a load run, a CRM edit or another target's sync committed changes, "
        "or outbox rows are due (new or retried); reads only what is new since its cursor. Waits while a "
        f"sync of {name} is queued or running. Stopped at first: turn it on after go-live.",
    )
    def _outbox(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        in_flight = context.instance.get_runs(
            filters=dg.RunsFilter(tags={TARGET_TAG: name}, statuses=IN_FLIGHT), limit=1
        )
        if in_flight:
            return dg.SkipReason(
                f"a sync of {name} is queued or running (run {in_flight[0].run_id}); looked at after it"
            )
        cursor = OutboxCursor.parse(context.cursor)
        try:
            engine = CoreDatabase(url=core_database_url).engine()
            busy = core_busy(engine)
            if busy is not None:  # the cursor stays: what changed meanwhile is looked at when it has ended
                return dg.SkipReason(busy_reason(busy))
            with session_factory(engine)() as session:
                scan = scan_outbox(session, target, cursor, _utcnow())
        except Exception as exc:  # one readable line in the tick's error, never the URL's password
            raise SyncError(f"outbox sensor of '{name}' could not read the core: {cause_line(exc)}") from None
        if not scan.wanted:
            return dg.SensorResult(skip_reason=scan.reason(), cursor=scan.cursor.to_json())
        state = scan.cursor
        due = int(state.due.timestamp() * 1_000_000) if state.due else 0
        request = dg.RunRequest(
            run_key=f"{name}-outbox-r{state.run}-o{state.outbox}-d{due}",  # one request per cursor state
            tags={"crmi/sync-trigger": shorten(scan.reason(), 250)},
        )
        return dg.SensorResult(run_requests=[request], cursor=state.to_json())

    return _outbox


# --------------------------------------------------------------------------- schedules


def busy_reason(busy: str, what: str = "sync") -> str:
    """Why a tick is skipped while the core is ``busy`` (:func:`integration.sync.engine.core_busy`)."""
    return f"skipped: {busy}: no {what} while it loads or rolls back the core; the next tick runs it when it has ended"


def core_free_schedule(
    core_database_url: str | None, what: str = "sync", **definition: Any
) -> dg.ScheduleDefinition:
    """Return a schedule (``definition``: ScheduleDefinition's arguments) whose tick is skipped, naming the holder,
    while a ``crmi run``, rollback or another command holds the core, or a migration run launched from Dagster
    loads into it, instead of launching a run that fails and alerts. Syncs holding it do not count: they share
    the core with each other. A core that cannot be asked (unreachable) launches the run, whose failure then
    says why."""

    def _tick(context: dg.ScheduleEvaluationContext) -> dg.RunRequest | dg.SkipReason:
        try:
            busy = core_busy(CoreDatabase(url=core_database_url).engine())
        except Exception as exc:
            context.log.warning(f"could not ask whether the core is busy: {cause_line(exc)}")
            busy = None
        return dg.SkipReason(busy_reason(busy, what)) if busy is not None else dg.RunRequest()

    return dg.ScheduleDefinition(execution_fn=_tick, **definition)


# --------------------------------------------------------------------------- waiting for the core


def _retries_disabled(context: dg.AssetExecutionContext) -> bool:
    """Return True when the run's executor retries no step (``retries: disabled`` in its run config): there a
    retry request fails the step at once, so the busy error is what it should fail with."""
    try:
        return bool(context.get_step_execution_context().retry_mode.disabled)
    except AttributeError:  # a Dagster that moved it: the request's failure still carries the busy line
        return False


@contextmanager
def holding_the_core_or_retry(
    context: dg.AssetExecutionContext, engine: Engine, holder: str, what: str = "sync"
) -> Iterator[None]:
    """Hold the core shared for a Dagster step, as :func:`integration.sync.engine.holding_the_core` does; while
    a ``crmi run``, rollback or another one-at-a-time command holds it (or a migration run launched from
    Dagster loads into it), ask Dagster to run the step again later (``RetryRequested``), logging who holds
    it, instead of failing; once :class:`BusyWait` is over, fail with the busy error. The hold is taken
    before anything is written, so the attempt that finds the core busy has written nothing."""
    try:
        wait = BusyWait.from_env()
    except SyncError as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from None
    done = context.retry_number
    last = done >= wait.retries or _retries_disabled(context)
    again = "run it again" if last else f"this step tries again every {seconds_text(wait.every)} and runs"
    with ExitStack() as stack:
        try:
            stack.enter_context(holding_the_core(engine, holder, what, again=again))
        except CoreBusy as exc:
            if last:
                gave_up = (
                    f"; gave up after {done} retries {seconds_text(wait.every)} apart ({BUSY_WAIT_ENV} sets "
                    "how long a step waits)"
                    if done
                    else ""
                )
                raise dg.Failure(description=f"{exc}{gave_up}", allow_retries=False) from None
            waiting = f"{exc} (retry {done + 1} of {wait.retries})"
            context.log.info(waiting)
            # the cause is what the UI shows for the retry, and the failure's text if retries are disabled
            raise dg.RetryRequested(max_retries=wait.retries, seconds_to_wait=wait.every) from dg.Failure(
                description=waiting, allow_retries=False
            )
        yield


# --------------------------------------------------------------------------- checks


def _session(engine: Engine) -> Session:
    return session_factory(engine)()


def _backlog_check(target: CompiledTarget) -> dg.AssetChecksDefinition:
    name = target.name

    @dg.asset_check(
        asset=asset_name(name, "outbound"),
        name="check_outbox_backlog_age",
        description=f"The oldest change not yet delivered to {name} (pending or awaiting a result): warns after "
        f"{BACKLOG_WARN.total_seconds() / 3600:g} h, errors after {BACKLOG_ERROR.total_seconds() / 3600:g} h "
        f"(${BACKLOG_ERROR_ENV}; the target is down, or nothing runs the outbound job).",
        required_resource_keys={"core"},
    )
    def _backlog(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        core: CoreDatabase = context.resources.core
        with _session(core.engine()) as session:
            oldest = oldest_pending(session, name)
            counts = _open_counts(session, name)
        age = _utcnow() - oldest if oldest is not None else dt.timedelta(0)
        severity = dg.AssetCheckSeverity.ERROR if age > backlog_error_after() else dg.AssetCheckSeverity.WARN
        passed = age <= BACKLOG_WARN
        return dg.AssetCheckResult(
            passed=passed,
            severity=severity,
            description=None
            if passed
            else f"the oldest undelivered change to {name} waits for {_hours(age)} (since {oldest:%Y-%m-%d %H:%M} UTC); "
            "`crmi sync status` shows why",
            metadata={
                "oldest_pending_age_minutes": dg.MetadataValue.float(round(age.total_seconds() / 60, 1)),
                **{f"outbox_{status}": dg.MetadataValue.int(count) for status, count in counts.items()},
            },
        )

    return _backlog


def backlog_error_after() -> dt.timedelta:
    """How old the oldest undelivered change may get before the backlog check fails as an ERROR (alerted by
    default): ``$CRMI_SYNC_BACKLOG_ERROR_HOURS``, else 4 hours; never below the 1-hour warning."""
    hours = env_number(BACKLOG_ERROR_ENV, BACKLOG_ERROR.total_seconds() / 3600, ConfigError, unit="hours")
    return max(dt.timedelta(hours=hours), BACKLOG_WARN)


def _open_counts(session: Session, target: str) -> dict[str, int]:
    """Return the target's outbox rows not done, by status (an index range: done rows are not read)."""
    statuses = ("pending", "waiting", "awaiting", "dead")
    found = dict(
        session.execute(
            select(SyncOutbox.status, func.count())
            .where(SyncOutbox.target == target, SyncOutbox.status.in_(statuses))
            .group_by(SyncOutbox.status)
        ).all()
    )
    return {status: int(found.get(status, 0)) for status in statuses}


def _hours(age: dt.timedelta) -> str:
    """Return a duration as IT staff read it: minutes, hours or days."""
    hours = age.total_seconds() / 3600
    if hours < 1:
        return f"{age.total_seconds() / 60:.0f} min"
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def _count_and_first(
    engine: Engine, columns: tuple[Any, ...], condition: tuple[Any, ...]
) -> tuple[int, list[Any]]:
    """Return how many rows match and the first few (by id, the first column), for a check's message."""
    with _session(engine) as session:
        count = int(session.scalar(select(func.count()).where(*condition)) or 0)
        first = session.execute(
            select(*columns).where(*condition).order_by(columns[0]).limit(MAX_REASONS)
        ).all()
    return count, list(first)


def _dead_letter_check(target: CompiledTarget) -> dg.AssetChecksDefinition:
    name = target.name

    @dg.asset_check(
        asset=asset_name(name, "outbound"),
        name="check_dead_letters",
        description=f"Changes {name} rejected, or that failed every retry: none may wait. Fix the cause and "
        f"resend them with `crmi sync retry --target {name}` (a record fixed in the CRM is sent as it is now), "
        "or give one up with `crmi sync discard ID --by NAME --reason TEXT`.",
        required_resource_keys={"core"},
    )
    def _dead(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        core: CoreDatabase = context.resources.core
        count, first = _count_and_first(
            core.engine(),
            (SyncOutbox.id, SyncOutbox.entity, SyncOutbox.entity_id, SyncOutbox.last_error),
            (SyncOutbox.target == name, SyncOutbox.status == "dead"),
        )
        reasons = [
            shorten(f"{r.entity} {r.entity_id}: {r.last_error or 'no reason recorded'}", 200) for r in first
        ]
        return dg.AssetCheckResult(
            passed=count == 0,
            severity=dg.AssetCheckSeverity.ERROR,
            description=None
            if count == 0
            else f"{count} dead letter(s) for {name}: {'; '.join(reasons)}{'; …' if count > len(reasons) else ''}"
            f" — fix the cause, then `crmi sync retry --target {name}`; or give one up with "
            "`crmi sync discard ID --by NAME --reason TEXT`",
            metadata={
                "dead_letters": dg.MetadataValue.int(count),
                "first_reasons": dg.MetadataValue.json(reasons),
                "outbox_ids": dg.MetadataValue.json([r.id for r in first]),
            },
        )

    return _dead


def _conflicts_check(target: CompiledTarget) -> dg.AssetChecksDefinition:
    name = target.name

    @dg.asset_check(
        asset=asset_name(name, "outbound"),
        name="check_conflicts_open",
        description=f"Fields the CRM and {name} both changed that no owner decides: a person settles them "
        f"with `crmi sync conflicts --target {name}`; until then the CRM's value stays.",
        required_resource_keys={"core"},
    )
    def _conflicts(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        core: CoreDatabase = context.resources.core
        count, first = _count_and_first(
            core.engine(),
            (SyncConflict.id, SyncConflict.entity, SyncConflict.entity_id, SyncConflict.field),
            (SyncConflict.target == name, SyncConflict.status == "open"),
        )
        # Which record and field, not the values: they are customer data, and the queue shows them.
        sample = [f"#{r.id} {r.entity} {r.entity_id}.{r.field}" for r in first]
        return dg.AssetCheckResult(
            passed=count == 0,
            severity=dg.AssetCheckSeverity.WARN,
            description=None
            if count == 0
            else f"{count} open conflict(s) with {name} ({', '.join(sample)}{', …' if count > len(sample) else ''}); "
            f"`crmi sync conflicts --target {name}`",
            metadata={"conflicts_open": dg.MetadataValue.int(count), "first": dg.MetadataValue.json(sample)},
        )

    return _conflicts


def freshness_limit(target: CompiledTarget, now: dt.datetime | None = None) -> dt.timedelta:
    """Return how old the last inbound sync may be: twice the inbound schedule's interval, else 1 h."""
    cron = target.spec.schedule.inbound
    if cron is None:
        return FRESHNESS_DEFAULT
    ticks = reverse_cron_string_iterator((now or _utcnow()).timestamp(), cron, target.spec.schedule.timezone)
    latest, before = next(ticks), next(ticks)
    return 2 * (latest - before)


def last_inbound(session: Session, target: str) -> LoadRun | None:
    """Return the target's last succeeded sync run that read inbound (direction inbound or both)."""
    return session.scalar(
        select(LoadRun)
        .where(
            LoadRun.mode == "sync",
            LoadRun.status == "succeeded",
            LoadRun.run_key.startswith(f"sync-{target}-inbound-", autoescape=True)
            | LoadRun.run_key.startswith(f"sync-{target}-both-", autoescape=True),
        )
        .order_by(LoadRun.id.desc())
        .limit(1)
    )


def _freshness_check(target: CompiledTarget) -> dg.AssetChecksDefinition:
    name = target.name
    limit_text = (
        f"twice the interval of its schedule '{target.spec.schedule.inbound}'"
        if target.spec.schedule.inbound
        else f"{FRESHNESS_DEFAULT.total_seconds() / 3600:g} h (no inbound schedule)"
    )

    @dg.asset_check(
        asset=asset_name(name, "inbound"),
        name="check_inbound_freshness",
        description=f"The last succeeded inbound sync of {name} (Dagster or `crmi sync run`) is at most "
        f"{limit_text} old; older, the CRM shows stale ERP data.",
        required_resource_keys={"core"},
    )
    def _fresh(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        core: CoreDatabase = context.resources.core
        now = _utcnow()
        limit = freshness_limit(target, now)
        with _session(core.engine()) as session:
            last = last_inbound(session, name)
            finished = _aware(last.finished_at or last.started_at) if last is not None else None
            run_key = last.run_key if last is not None else None
        age = now - finished if finished is not None else None
        passed = age is not None and age <= limit
        if age is None:
            why = f"no inbound sync of {name} has succeeded yet (`crmi sync run --target {name} -d inbound`)"
        else:
            why = f"the last inbound sync of {name} ended {_hours(age)} ago (limit {_hours(limit)})"
        # Stale for twice its limit (the ERP unreachable, the schedule stopped): an ERROR, alerted by default.
        long_stale = age is not None and age > 2 * limit
        return dg.AssetCheckResult(
            passed=passed,
            severity=dg.AssetCheckSeverity.ERROR if long_stale else dg.AssetCheckSeverity.WARN,
            description=None if passed else why,
            metadata={
                "last_inbound_run": dg.MetadataValue.text(run_key or "none"),
                **(
                    {"age_minutes": dg.MetadataValue.float(round(age.total_seconds() / 60, 1))} if age else {}
                ),
                "limit_minutes": dg.MetadataValue.float(round(limit.total_seconds() / 60, 1)),
            },
        )

    return _fresh


def sync_checks(target: CompiledTarget) -> list[dg.AssetChecksDefinition]:
    """Return the asset checks of a target's sync assets."""
    return [
        _backlog_check(target),
        _dead_letter_check(target),
        _conflicts_check(target),
        _freshness_check(target),
    ]


# --------------------------------------------------------------------------- definitions


@dataclass
class SyncDefinitions:
    """Everything Dagster needs for the project's sync targets (empty without a ``sync:`` section)."""

    assets: list[dg.AssetsDefinition] = field(default_factory=list)
    checks: list[dg.AssetChecksDefinition] = field(default_factory=list)
    jobs: list[UnresolvedAssetJobDefinition] = field(default_factory=list)
    schedules: list[dg.ScheduleDefinition] = field(default_factory=list)
    sensors: list[dg.SensorDefinition] = field(default_factory=list)


def sync_definitions(
    targets: dict[str, CompiledTarget], core_database_url: str | None, executor: dg.ExecutorDefinition | None
) -> SyncDefinitions:
    """Return assets, checks, jobs, schedules and the outbox sensor of every sync target."""
    found = SyncDefinitions()
    for name, target in targets.items():
        jobs: dict[str, UnresolvedAssetJobDefinition] = {}
        for direction in DIRECTIONS:
            asset = sync_asset(target, direction)
            found.assets.append(asset)
            job = dg.define_asset_job(
                job_name(name, direction),
                selection=dg.AssetSelection.assets(asset),
                description=f"One {direction} sync of {name}, then its checks. Tagged {TARGET_TAG}={name}: a "
                "run-queue limit of 1 on that tag runs one sync of the target at a time (without it, a second "
                "sync fails at start saying which one runs).",
                tags={TARGET_TAG: name, DIRECTION_TAG: direction},
                executor_def=executor,
            )
            jobs[direction] = job
            found.jobs.append(job)
            cron = getattr(target.spec.schedule, direction)
            if cron is not None:
                found.schedules.append(
                    core_free_schedule(
                        core_database_url,
                        name=schedule_name(name, direction),
                        job=job,
                        cron_schedule=cron,
                        execution_timezone=target.spec.schedule.timezone,
                        default_status=dg.DefaultScheduleStatus.STOPPED,
                        description=f"{direction.capitalize()} sync of {name} at '{cron}' "
                        f"({target.spec.schedule.timezone}), from project.yaml. Stopped at first: turn it on "
                        "after go-live"
                        + (
                            ", or the ERP receives trial data."
                            if direction == "outbound"
                            else ", or ERP rows race the cutover's final migration run."
                        )
                        + " A tick while `crmi run` or a rollback holds the core is skipped, naming it.",
                    )
                )
        found.checks.extend(sync_checks(target))
        checks_job = dg.define_asset_job(
            job_name(name, "checks"),
            selection=dg.AssetSelection.checks_for_assets(
                asset_name(name, "inbound"), asset_name(name, "outbound")
            ),
            description=f"Only the checks of {name}'s sync (backlog age, dead letters, open conflicts, inbound "
            "freshness): reads the core, runs no sync.",
            executor_def=executor,
        )
        found.jobs.append(checks_job)
        found.schedules.append(
            # skipped while a migration holds the core too: its syncs are skipped meanwhile (not stale), and a
            # core halfway through a load or a rollback says nothing about them
            core_free_schedule(
                core_database_url,
                "sync check",
                name=schedule_name(name, "checks"),
                job=checks_job,
                cron_schedule=CHECKS_CRON,
                execution_timezone=target.spec.schedule.timezone,
                default_status=dg.DefaultScheduleStatus.STOPPED,
                description=f"The checks of {name}'s sync every 15 minutes, so a sync that stopped running is "
                "noticed. Stopped at first: turn it on with the sync schedules. A tick while `crmi run` or a "
                "rollback holds the core is skipped, naming it.",
            )
        )
        found.sensors.append(outbox_sensor(target, jobs["outbound"], core_database_url))
    return found


__all__ = [
    "BUSY_RETRY_ENV",
    "BUSY_WAIT_ENV",
    "SYNC_GROUP",
    "BusyWait",
    "OutboxCursor",
    "SyncDefinitions",
    "busy_reason",
    "core_free_schedule",
    "holding_the_core_or_retry",
    "report_metadata",
    "scan_outbox",
    "sync_asset",
    "sync_checks",
    "sync_definitions",
]
