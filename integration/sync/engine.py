"""One sync run with a target system: inbound (target → core), then outbound (core → target).

A sync run is a load run (mode ``sync``): inbound rows load through the migration's mapping engine and
loader with the run journal, outbound acknowledgements write the target's keys back in the same way, so a
sync run can be listed and rolled back like any run. Only one sync per target runs at a time, and none while a
``crmi run``, rollback or another command holds the core (a sync holds the core's run lock shared while it runs:
those commands refuse meanwhile, naming it).
"""

from __future__ import annotations

import datetime as dt
import math
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.orm import Session

from crm_core.db import session_factory
from crm_core.edits import fence_edits
from crm_core.entities import ENTITIES
from crm_core.errors import CrmError, SyncError
from crm_core.failpoints import failpoint
from crm_core.journal import to_json
from crm_core.loading import LINKED, Batch, get_or_start_run
from crm_core.models import ExternalId, LoadRun, SyncConflict, SyncOutbox, SyncState
from crm_core.runs import (
    CoreBusy,
    core_lock_holder,
    core_sync_lock,
    is_crashed,
    live_runs,
    lock_holder,
    rollback_run,
)
from crm_core.settings import env_number
from integration.sync.inbound import (
    OwnershipOutcome,
    apply_ownership,
    loaded_values,
    record_exchange,
    with_cursor,
)
from integration.sync.outbox import (
    MIGRATION_MODES,
    Acknowledge,
    CaptureStats,
    DeliveryStats,
    Settle,
    Transport,
    baseline,
    build_documents,
    capture,
    deliver,
    payload_hash,
)
from integration.sync.spec import CRM, KEY_COLUMN, CompiledEntitySync, CompiledTarget

DIRECTIONS = ("both", "inbound", "outbound")
DECISION_PROJECT = "sync-conflict"  # the runs of conflicts settled by a person


@dataclass
class SyncReport:
    """What one sync run did (also the Dagster metadata of the sync assets)."""

    target: str
    direction: str
    run_key: str
    received: int = 0  # inbound rows read
    applied: int = 0  # inbound rows inserted or updated
    unchanged: int = 0
    rejected: int = 0
    kept_crm: int = 0  # target values not applied: the CRM owns the field or a conflict waits
    conflicts: int = 0
    conflicts_open: int = 0  # opened by this run
    conflicts_waiting: int = 0  # open for this target after the run (this run's and older ones)
    capture: CaptureStats = field(default_factory=CaptureStats)
    delivery: DeliveryStats = field(default_factory=DeliveryStats)
    entities: dict[str, dict[str, int]] = field(default_factory=dict)
    status: str = "succeeded"
    seconds: dict[str, float] = field(default_factory=dict)  # per phase: inbound, capture, deliver

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-friendly dict."""
        return {
            "target": self.target, "direction": self.direction, "run_key": self.run_key, "status": self.status,
            "received": self.received, "applied": self.applied, "unchanged": self.unchanged,
            "rejected": self.rejected, "kept_crm": self.kept_crm, "conflicts": self.conflicts,
            "conflicts_open": self.conflicts_open, "conflicts_waiting": self.conflicts_waiting,
            "hint": self.hint(), "captured": self.capture.as_dict(),
            "sent": self.delivery.sent, "delivered": self.delivery.applied,
            "echoes_suppressed": self.capture.echoes_suppressed, "nothing_to_send": self.capture.nothing_to_send,
            "retries": self.delivery.retries,
            "dead_letters": self.delivery.dead_letters, "awaiting": self.delivery.awaiting,
            "waiting": self.capture.waiting, "stopped": self.delivery.stopped, "entities": self.entities,
            "seconds": self.seconds,
        }  # fmt: skip

    def hint(self) -> str | None:
        """Return what a person should do next (open conflicts), or None."""
        return waiting_line(self.conflicts_waiting)


def waiting_line(count: int) -> str | None:
    """Return what to do about ``count`` open conflicts (None when none)."""
    if not count:
        return None
    return f"{count} conflict{'' if count == 1 else 's'} open: `crmi sync conflicts` to decide"


def target_of(migration: Any, name: str | None) -> CompiledTarget:
    """Return the project's sync target ``name`` (the only one when None)."""
    targets: dict[str, CompiledTarget] = migration.project.sync
    if not targets:
        raise SyncError("project.yaml has no 'sync:' section; see docs/sync.md")
    if name is None:
        if len(targets) > 1:
            raise SyncError(f"several sync targets ({', '.join(targets)}); choose one with --target")
        return next(iter(targets.values()))
    if name not in targets:
        raise SyncError(f"unknown sync target '{name}'; targets: {', '.join(targets)}")
    return targets[name]


def make_client(target: CompiledTarget) -> Transport:
    """Return the transport client of a target (by its transport profile), secrets expanded from the environment."""
    from integration.connectors.u8_openapi import U8Client, U8Credentials
    from integration.sync.spec import K3CloudTransport
    from integration.yamlconf import expand_env

    transport = target.spec.transport
    if isinstance(transport, K3CloudTransport):
        from integration.connectors.k3cloud import k3cloud_client

        return k3cloud_client(target.name, transport)
    try:
        credentials = U8Credentials(
            base_url=expand_env(transport.base_url), from_account=expand_env(transport.from_account),
            to_account=expand_env(transport.to_account), app_key=expand_env(transport.app_key),
            app_secret=expand_env(transport.app_secret), ds_sequence=transport.ds_sequence,
        )  # fmt: skip
    except KeyError as exc:
        raise SyncError(
            f"environment variable {exc.args[0]} is not set (sync target '{target.name}')"
        ) from None
    client: Transport = U8Client(credentials, timeout=transport.timeout, max_batch=transport.batch_size)
    return client


def make_delivery(trade_id: str, operation: str, payload: dict[str, Any]) -> Any:
    """Return the transport's delivery object for one outbox row."""
    from integration.sync.transport import Delivery

    return Delivery(trade_id=trade_id, operation=operation, payload=payload)


def _sync_run_key(target: str, direction: str) -> str:
    return f"sync-{target}-{direction}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


def _claim(engine: Engine, target: CompiledTarget, run_key: str, project: str) -> None:
    """Start the sync run unless another sync of the target is running (one at a time per target)."""
    factory = session_factory(engine)
    with factory() as session, session.begin():
        others = session.scalars(
            select(LoadRun).where(
                LoadRun.mode == "sync",
                LoadRun.status == "running",
                LoadRun.run_key.like(f"sync-{target.name}-%"),
            )
        ).all()
        crashed = [o.run_key for o in others if is_crashed(o)]
        alive = [o for o in others if not is_crashed(o)]
        for other in alive:
            raise SyncError(
                f"a sync of '{target.name}' is already running (run {other.run_key}, pid {other.pid}); "
                "wait for it or stop it"
            )
        if not crashed:
            get_or_start_run(session, run_key, project, mode="sync")
    if crashed:  # a sync process that died: undo what it wrote to the core, then start
        for key in crashed:
            rollback_run(engine, key, status="failed", allow_running=True)
            _forget_conflicts(engine, key)
        with factory() as session, session.begin():
            get_or_start_run(session, run_key, project, mode="sync")


def busy_advice(what: str = "sync", again: str = "run it again") -> str:
    """What to do when ``what`` is refused because a ``crmi run``, rollback… holds the core."""
    return f"no {what} while it loads or rolls back the core; {again} when it has ended"


def _migration_loading(engine: Engine) -> str | None:
    """Describe a migration run loading into the core from another live process on this host: one launched
    from Dagster holds no lock between its steps, its running load run is what shows it."""
    for key, mode, pid in live_runs(engine):
        if mode in MIGRATION_MODES:
            return f"run {key} ({mode}) is loading into this core (process {pid} on this host)"
    return None


def core_busy(engine: Engine) -> str | None:
    """Why no sync may start now, else None: a ``crmi run``, rollback… holds the core (other syncs share it),
    or a migration run launched from Dagster is loading into it. What the sync schedules and sensor ask."""
    holder = core_lock_holder(engine, syncs=False)
    if holder is not None:
        return f"another command holds this core ({holder})"
    return _migration_loading(engine)


# How long a sync or order_to_cash step waits while a command holds the core, and how often it looks again
BUSY_WAIT_ENV = "CRMI_CORE_BUSY_WAIT_SECONDS"
BUSY_RETRY_ENV = "CRMI_CORE_BUSY_RETRY_SECONDS"
BUSY_WAIT_DEFAULT = 3600.0  # a go-live migration's load or a rollback; longer, someone should look
BUSY_RETRY_DEFAULT = 60.0
FIRST_LOOK_AGAIN = 0.1  # how soon a process waiting in itself looks again first (then ever more seldom)


def seconds_text(seconds: float) -> str:
    """Return a wait as IT staff read it: seconds, minutes or hours."""
    if seconds < 120:
        return f"{seconds:g} s"
    return f"{seconds / 60:g} min" if seconds < 7200 else f"{seconds / 3600:g} h"


@dataclass(frozen=True)
class BusyWait:
    """How a sync waits while a command holds the core: it looks again every ``every`` seconds for at most
    ``total`` seconds in all (0: it is refused at once, naming the holder). A Dagster step looks again by
    asking for a retry; a ``crmi`` command told to ``--wait`` looks again in itself (:meth:`pauses`)."""

    total: float = BUSY_WAIT_DEFAULT
    every: float = BUSY_RETRY_DEFAULT

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BusyWait:
        """Return the wait ``$CRMI_CORE_BUSY_WAIT_SECONDS`` and ``$CRMI_CORE_BUSY_RETRY_SECONDS`` set (a value
        that is no number of seconds is a :class:`SyncError` naming its variable)."""
        env = os.environ if env is None else env
        return cls(
            env_number(BUSY_WAIT_ENV, BUSY_WAIT_DEFAULT, SyncError, zero=True, env=env),
            env_number(BUSY_RETRY_ENV, BUSY_RETRY_DEFAULT, SyncError, env=env),
        )

    @property
    def retries(self) -> int:
        """Return how many times the step is run again before it gives up."""
        return math.ceil(round(self.total / self.every, 6))

    def pauses(self) -> Iterator[float]:
        """Yield how long to pause before each look again, from now until ``total`` is spent: short at first
        (a hold that is just ending), doubling up to ``every``."""
        deadline = time.monotonic() + self.total
        pause = min(FIRST_LOOK_AGAIN, self.every)
        while (left := deadline - time.monotonic()) > 0:
            yield min(pause, left)
            pause = min(pause * 2, self.every)


class StoppedWaiting(CrmError):
    """Ctrl-C while a sync waited for the core: it never held it, nothing was written."""


def _hold_if_free(stack: ExitStack, engine: Engine, holder: str) -> str | None:
    """Take the core's run lock shared on ``stack`` and return None; else why not (the lock is let go when a
    migration run launched from Dagster is loading)."""
    try:
        stack.enter_context(core_sync_lock(engine, holder))
    except CoreBusy as exc:
        return str(exc)
    return _migration_loading(engine)  # after the lock: a `crmi run` starting now waits for this sync


@contextmanager
def holding_the_core(
    engine: Engine,
    holder: str,
    what: str = "sync",
    *,
    again: str = "run it again",
    wait: BusyWait | None = None,
    waiting: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Hold the core's run lock shared for a sync (see :func:`crm_core.runs.core_sync_lock`), or for a
    person's short write (a steward's decision, a retried dead letter): they share it with each other; refuse
    with :class:`CoreBusy` naming the command that holds it, or the migration run loading into it, and what
    to do (``again``: how the refused ``what`` is done again, e.g. ``try again``).

    With ``wait`` (a ``crmi`` command told to ``--wait``) it looks again (:meth:`BusyWait.pauses`) and is
    refused only once ``wait.total`` is spent, having told ``waiting`` why once, when it first found the core
    held; Ctrl-C meanwhile raises :class:`StoppedWaiting`. Nothing is held, so nothing written, until it has."""
    pauses: Iterator[float] = iter(()) if wait is None else wait.pauses()  # its time runs from the first look
    said = waiting is None
    reason: str | None = None  # why the last look found the core held
    pause = 0.0
    # Ctrl-C anywhere once the core was found held (between two looks, while saying so, during a look) ends
    # the wait; before the first look, or while the core is held by this, it is Ctrl-C as anywhere else.
    try:
        while True:
            with ExitStack() as stack:
                if reason is not None:
                    time.sleep(pause)
                reason = _hold_if_free(stack, engine, holder)
                if reason is None:
                    yield
                    return
            next_pause = next(pauses, None)
            if next_pause is None:
                raise CoreBusy(f"{reason}: {busy_advice(what, again)}")
            pause = next_pause
            if not said and waiting is not None:
                waiting(reason)
                said = True
    except KeyboardInterrupt:
        if reason is None:
            raise
        raise StoppedWaiting(f"stopped waiting ({reason}): no {what}, nothing written") from None


def run_sync(
    migration: Any,
    engine: Engine,
    target_name: str | None = None,
    direction: str = "both",
    *,
    client: Transport | None = None,
    run_key: str | None = None,
    by: str = "sync",
    hold: Callable[[Engine, str], AbstractContextManager[None]] = holding_the_core,
) -> SyncReport:
    """Run one sync with a target: inbound rows into the core, then captured changes out to the target.

    It holds the core's run lock (shared) from start to end, as ``<by> <target> <direction> on HOST (pid N)``:
    refused with :class:`CoreBusy` while a ``crmi run`` or rollback holds the core, which refuse meanwhile.
    ``hold(engine, holder)`` takes it (:func:`holding_the_core`; a Dagster step's asks for a retry instead of
    failing): nothing is written before it has.
    """
    if direction not in DIRECTIONS:
        raise SyncError(f"unknown direction '{direction}'; choose {', '.join(DIRECTIONS)}")
    target = target_of(migration, target_name)
    with hold(engine, lock_holder(f"{by} {target.name} {direction}")):
        return _run_sync(migration, engine, target, direction, client, run_key)


def _run_sync(
    migration: Any,
    engine: Engine,
    target: CompiledTarget,
    direction: str,
    client: Transport | None,
    run_key: str | None,
) -> SyncReport:
    run_key = run_key or _sync_run_key(target.name, direction)
    report = SyncReport(target.name, direction, run_key)
    _claim(engine, target, run_key, migration.project.name)
    own_client = client is None
    try:
        with session_factory(engine)() as session, session.begin():
            baseline(session, target, _run_id(session, run_key))
        send_back: dict[str, set[int]] = {}
        if direction in ("both", "inbound"):
            started = time.perf_counter()
            send_back = _inbound(migration, engine, target, run_key, report)
            report.seconds["inbound"] = round(time.perf_counter() - started, 3)
            if direction == "inbound" and any(send_back.values()):
                # CRM-owned values the target changed go back with the next outbound run: queue them now.
                with session_factory(engine)() as session, session.begin():
                    queued = capture(
                        session, target, _run_id(session, run_key), extra=send_back, advance=False
                    )
                report.capture.queued += queued.queued
        if direction in ("both", "outbound"):
            client = client or make_client(target)
            _outbound(engine, target, client, run_key, report, send_back)
    except BaseException:
        report.status = "failed"
        _fail(engine, run_key)
        raise
    finally:
        if own_client and client is not None:
            client.close()
    _finish(engine, run_key, report)
    return report


def _run_id(session: Session, run_key: str) -> int:
    return int(session.scalar(select(LoadRun.id).where(LoadRun.run_key == run_key)) or 0)


def _fail(engine: Engine, run_key: str) -> None:
    """Undo what the failed sync run wrote to the core (the outbox keeps what the target answered)."""
    try:
        rollback_run(engine, run_key, status="failed", allow_running=True)
    except CrmError:
        with session_factory(engine)() as session, session.begin():
            session.execute(update(LoadRun).where(LoadRun.run_key == run_key).values(status="failed"))
    _forget_conflicts(engine, run_key)


def _forget_conflicts(engine: Engine, run_key: str) -> None:
    """Delete the conflicts a failed sync run recorded (committed before its load): its changes are undone,
    and the next run finds the same differences again (a person's decision already taken is kept)."""
    from sqlalchemy import delete

    with session_factory(engine)() as session, session.begin():
        run_id = _run_id(session, run_key)
        session.execute(delete(SyncConflict).where(
            SyncConflict.load_run_id == run_id, SyncConflict.status.not_like("decided%")
        ))  # fmt: skip


def _finish(engine: Engine, run_key: str, report: SyncReport) -> None:
    with session_factory(engine)() as session, session.begin():
        run = session.scalar(select(LoadRun).where(LoadRun.run_key == run_key))
        assert run is not None
        report.conflicts_waiting = count_open_conflicts(session, report.target)
        run.status = "succeeded"
        run.finished_at = dt.datetime.now(dt.UTC)
        run.stats = {**(run.stats or {}), "sync": report.as_dict()}


# --------------------------------------------------------------------------- inbound


def _inbound(
    migration: Any, engine: Engine, target: CompiledTarget, run_key: str, report: SyncReport
) -> dict[str, set[int]]:
    from integration.pipeline import extract, load, stage, stream_watermark

    send_back: dict[str, set[int]] = {}
    mappings = {m.name: m for entity in migration.entities for m in migration.mappings_for(entity)}
    for entity, inbound in target.inbound():
        sync = target.entities[entity]
        mapping = with_cursor(mappings[inbound.mapping], inbound)
        if mapping.entity.name != entity:
            raise SyncError(
                f"sync target '{target.name}': mapping '{mapping.name}' loads {mapping.entity.name}, "
                f"not {entity}; list it under entities.{mapping.entity.name}"
            )
        since = stream_watermark(engine, mapping)
        frame = extract(migration, mapping, since)
        staged = stage(migration, entity, {migration.raw_asset(mapping): frame})
        inbound_load = _InboundLoad(target, sync, send_back)
        stats = load(
            migration, engine, run_key, staged, mode="sync", prepare=inbound_load.owned,
            finish=inbound_load.record_exchanges,
        )  # fmt: skip
        counts = report.entities.setdefault(
            entity, {"received": 0, "applied": 0, "unchanged": 0, "rejected": 0}
        )
        for s in stats:
            counts["received"] += s.rows_read
            counts["applied"] += s.inserted + s.updated
            counts["unchanged"] += s.unchanged + s.merged
            counts["rejected"] += s.rejected + s.held
        for outcome in inbound_load.outcomes:
            report.kept_crm += outcome.kept_crm
            report.conflicts += len(outcome.conflicts)
            report.conflicts_open += sum(c["status"] == "open" for c in outcome.conflicts)
        unsent = inbound_load.unsent
        # The loader may have stamped them with this run, which this run's capture does not read.
        if sync.outbound_enabled and unsent:
            send_back.setdefault(entity, set()).update(unsent)
    for counts in report.entities.values():
        report.received += counts["received"]
        report.applied += counts["applied"]
        report.unchanged += counts["unchanged"]
        report.rejected += counts["rejected"]
    return send_back


def _payload_hashes(
    session: Session, target: CompiledTarget, entity: str, ids: Sequence[int]
) -> dict[int, str | None] | None:
    """Return the hash of the document each record would be sent as now: an inbound value is not echoed."""
    sync = target.entities.get(entity)
    if sync is None or not sync.outbound_enabled or not ids:
        return None
    return {
        d.entity_id: payload_hash({"operation": d.operation, **d.payload})
        for d in build_documents(session, target, sync, list(ids))
        if d.problem is None
    }


# --------------------------------------------------------------------------- outbound


def _outbound(
    engine: Engine,
    target: CompiledTarget,
    client: Transport,
    run_key: str,
    report: SyncReport,
    send_back: dict[str, set[int]],
) -> None:
    factory = session_factory(engine)
    added: dict[str, set[int]] = {}
    on_applied = _acknowledge(target, run_key, added)
    settle = _settler(client, on_applied)
    started = time.perf_counter()
    with factory() as session, session.begin():
        run_id = _run_id(session, run_key)
        report.capture = capture(session, target, run_id, extra=send_back, settle=settle)
    report.seconds["capture"] = round(time.perf_counter() - started, 3)
    started = time.perf_counter()
    report.delivery = deliver(engine, target, client, run_id, make_delivery, on_applied=on_applied)
    report.seconds["deliver"] = round(time.perf_counter() - started, 3)
    # Records that waited for another one (an order for its customer's ERP code) may be ready now.
    if report.delivery.applied and report.capture.waiting:
        with factory() as session, session.begin():
            again = capture(session, target, run_id, advance=False, settle=settle)
        report.capture.queued += again.queued
        report.capture.waiting = again.waiting
        more = deliver(engine, target, client, run_id, make_delivery, on_applied=on_applied)
        for name in ("sent", "applied", "retries", "dead_letters", "awaiting"):
            setattr(report.delivery, name, getattr(report.delivery, name) + getattr(more, name))
        report.delivery.stopped = more.stopped or report.delivery.stopped
        report.delivery.errors.extend(more.errors)
    _rehash_added(engine, target, run_key, added)


def _settler(client: Transport, on_applied: Acknowledge) -> Settle:
    """Return how capture asks the target about adds sent before whose answer never came: one it holds is
    recorded as applied (crosswalk, key field, sync state), so the record's current document is an edit."""

    def ask(rows: list[dict[str, Any]]) -> list[str | None]:
        return client.find_applied([make_delivery(r["trade_id"], r["operation"], r["payload"]) for r in rows])

    return _settling(ask, on_applied)


def _settling(find: Callable[[list[dict[str, Any]]], list[str | None]], on_applied: Acknowledge) -> Settle:
    """Return a :data:`Settle` that learns from ``find`` what the target holds from each add in doubt (its key,
    or None: nothing; :class:`SyncError`: it cannot say) and records a held one like an applied delivery."""

    def settle(session: Session, rows: list[dict[str, Any]]) -> tuple[dict[int, str], dict[int, str]]:
        try:
            keys = find(rows)
        except SyncError as exc:
            return {}, {r["id"]: str(exc) for r in rows}
        found = {r["id"]: key for r, key in zip(rows, keys, strict=True) if key}
        applied = [{**r, "external_key": found[r["id"]]} for r in rows if r["id"] in found]
        refused = on_applied(session, applied) if applied else {}
        return {i: key for i, key in found.items() if i not in refused}, refused

    return settle


def _rehash_added(engine: Engine, target: CompiledTarget, run_key: str, added: dict[str, set[int]]) -> None:
    """Store the hash of the next document of records the target just added: their key is not an echo."""
    with session_factory(engine)() as session, session.begin():
        run_id = _run_id(session, run_key)
        for entity, ids in added.items():
            ordered = sorted(ids)
            for start in range(0, len(ordered), 5000):
                part = ordered[start : start + 5000]
                hashes = _payload_hashes(session, target, entity, part)
                if hashes:
                    record_exchange(session, target, entity, {i: {} for i in hashes}, payload_hashes=hashes,
                                    run_id=run_id)  # fmt: skip


def _edit_derivation(sync: CompiledEntitySync) -> Any:
    """Return ``f(add_payload, key) -> hash of the edit document`` the record is sent as once it has the key.

    The edit differs from the add in three ways only: its operation, the fields that read the key (``_key``
    or ``key_field``), now filled, and the fields the target owns, which an edit never sends. When every
    field that reads the key is a plain copy, the edit document follows from the add's without mapping the
    record again; otherwise (None) the caller maps it again.
    """
    outbound = sync.outbound
    if outbound is None or outbound.spec.edit is None:
        return None
    key_columns = {KEY_COLUMN, *([outbound.spec.key_field] if outbound.spec.key_field else [])}
    owned_by_target = {f for f, owner in sync.owners.items() if owner != CRM}
    copies: list[str] = []
    for compiled in outbound.mapping.fields:
        reads = outbound.reads.get(compiled.name, ())
        if not key_columns & set(reads):
            continue
        spec = compiled.spec
        plain = (not compiled.steps and compiled.expr is None and not compiled.when and compiled.lookup is None
                 and compiled.convert is None and spec.const is None and spec.default is None
                 and len(compiled.columns) == 1)  # fmt: skip
        if not plain:
            return None
        copies.append(compiled.name)
    if outbound.lines is not None and any(
        key_columns & {c.split(".")[0] for c in (*f.columns, *f.expression_columns())}
        for f in outbound.lines.fields
    ):
        return None
    dropped = {
        name for name, reads in outbound.reads.items() if reads and all(r in owned_by_target for r in reads)
    }
    edit = outbound.spec.edit

    def edit_hash(payload: dict[str, Any], key: str) -> str:
        document = {name: value for name, value in payload.items() if name not in dropped}
        document.update({name: key for name in copies if name not in dropped})
        return payload_hash({"operation": edit, **document})

    return edit_hash


@dataclass
class _InboundLoad:
    """What a sync's inbound load decides in the load's own transaction, with CRM edits kept out
    (:func:`crm_core.edits.fence_edits`) from the ownership check's read to the commit: an edit committed in
    between would be overwritten with the value read before it, or recorded as already exchanged."""

    target: CompiledTarget
    sync: CompiledEntitySync
    send_back: dict[str, set[int]]  # per entity, records whose CRM-owned values go back to the target
    outcomes: list[OwnershipOutcome] = field(default_factory=list)
    unsent: set[int] = field(default_factory=set)  # records with a CRM change not delivered yet

    def owned(self, session: Session, run_id: int, batches: list[Batch]) -> list[Batch]:
        """The load's ``prepare``: the batches with the CRM's values kept where ownership says so."""
        fence_edits(session, run_id)
        self.outcomes = [apply_ownership(session, self.target, self.sync, b, run_id) for b in batches]
        failpoint("sync:owned")  # tests edit here
        back = self.send_back.setdefault(self.sync.entity, set())
        for outcome in self.outcomes:
            back.update(outcome.send_back)
            self.unsent |= outcome.unsent
        return [o.batch for o in self.outcomes]

    def record_exchanges(self, session: Session, run_id: int, batches: list[Batch]) -> None:
        """The load's ``finish``: record what the loaded records and the target now agree on."""
        target, entity = self.target, self.sync.entity
        target_values: dict[int, dict[str, Any]] = {}
        for outcome in self.outcomes:
            for entity_id, kept in outcome.target_values.items():
                target_values.setdefault(entity_id, {}).update(kept)
        for batch in batches:
            values, keys = loaded_values(session, entity, target.system, batch, batch.fields)
            for entity_id, kept in target_values.items():
                if entity_id in values:
                    values[entity_id].update(kept)
            record_exchange(
                session, target, entity, values, external_keys=keys, run_id=run_id, journaled=True
            )
            # The document is built from what both sides now hold (known fields, explicit empties).
            hashes = _payload_hashes(session, target, entity, list(values))
            if hashes is not None:
                # The target still holds its own value of a field the CRM kept, or a CRM change has not been
                # sent yet: not agreed, so the CRM's document must go out even if it equals the one last sent.
                hashes.update(dict.fromkeys((self.send_back.get(entity, set()) | self.unsent) & set(values)))
                record_exchange(session, target, entity, {i: {} for i in values}, payload_hashes=hashes,
                                run_id=run_id, journaled=True)  # fmt: skip


def _acknowledge(target: CompiledTarget, run_key: str, added: dict[str, set[int]]) -> Acknowledge:
    """Return the callback that records applied deliveries: crosswalk key, key field, sync state (set-based).

    Records the target added are collected in ``added`` for :func:`_rehash_added`.
    """

    def acknowledge(session: Session, rows: list[dict[str, Any]]) -> dict[int, str]:
        run = get_or_start_run(session, run_key, "sync", mode="sync")
        refused: dict[int, str] = {}
        by_entity: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_entity.setdefault(row["entity"], []).append(row)
        for entity, entity_rows in by_entity.items():
            sync = target.entities[entity]
            key_field = sync.outbound.spec.key_field if sync.outbound else None
            refused.update(_link(session, entity, target.system, entity_rows, run.id))
            accepted = [r for r in entity_rows if r["id"] not in refused]
            if key_field is not None:
                _write_keys(session, entity, key_field, accepted, run.id)
            values: dict[int, dict[str, Any]] = {}
            keys: dict[int, str | None] = {}
            for row in accepted:
                values[row["entity_id"]] = dict(row["core_values"] or {})
                if key_field is not None and row["external_key"]:
                    values[row["entity_id"]][key_field] = row["external_key"]
                keys[row["entity_id"]] = row["external_key"]
            # An edit leaves the record as it was sent. An add gets the target's key, so what must not be
            # sent again is its next document, the edit carrying that key: derived from the add's document
            # when the key fields are plain copies, else mapped again at the end of the run (_rehash_added).
            hashes: dict[int, str | None] = {r["entity_id"]: _settled_hash(sync, r) for r in accepted}
            derive = _edit_derivation(sync)
            for row in accepted:
                if sync.outbound is None or row["operation"] != sync.outbound.spec.add:
                    continue
                if derive is None or not row["external_key"]:
                    added.setdefault(entity, set()).add(row["entity_id"])
                else:
                    hashes[row["entity_id"]] = derive(row["payload"] or {}, str(row["external_key"]))
            record_exchange(session, target, entity, values, external_keys=keys, payload_hashes=hashes,
                            run_id=run.id)  # fmt: skip
        return refused

    return acknowledge


def _settled_hash(sync: CompiledEntitySync, row: dict[str, Any]) -> str | None:
    """Return the hash of the document an applied delivery leaves the record with: the one sent, less the
    explicit empties (what was cleared is exchanged as empty, and an empty is sent only to clear a value)."""
    outbound = sync.outbound
    payload = row["payload"] or {}
    if outbound is None or "" not in payload.values():
        return row["payload_hash"]  # type: ignore[no-any-return]
    core = row["core_values"] or {}
    emptied = {
        name for name, value in payload.items()
        if value == "" and (reads := [r for r in outbound.reads.get(name, ()) if r in ENTITIES[sync.entity].fields])
        and all(core.get(r) is None for r in reads)
    }  # fmt: skip
    kept = {name: value for name, value in payload.items() if name not in emptied}
    return payload_hash({"operation": row["operation"], **kept})


def _link(
    session: Session, entity: str, system: str, rows: list[dict[str, Any]], run_id: int
) -> dict[int, str]:
    """Add crosswalk rows (entity, system, key) → record for the keys the target gave; return refusals.

    A key that already belongs to another record is refused (outbox id → why): a person must look at both.
    """
    from crm_core.journal import ids_in

    keyed = [r for r in rows if r["external_key"]]
    owners: dict[str, int] = {}
    keys = sorted({str(r["external_key"]) for r in keyed})
    connection = session.connection()
    xw: Any = ExternalId.__table__
    for start in range(0, len(keys), 2000):
        query = select(xw.c.external_key, xw.c.entity_id).where(
            xw.c.entity == entity,
            xw.c.system == system,
            ids_in(connection, xw.c.external_key, keys[start : start + 2000]),
        )
        owners.update({key: entity_id for key, entity_id in session.execute(query)})
    refused: dict[int, str] = {}
    now = dt.datetime.now(dt.UTC)
    new_links: list[dict[str, Any]] = []
    for row in keyed:
        key, entity_id = str(row["external_key"]), row["entity_id"]
        owner = owners.get(key)
        if owner is not None and owner != entity_id:
            refused[row["id"]] = (
                f"{system} answered key '{key}' for {entity} {entity_id}, but it belongs to {entity} {owner} "
                f"already; check both records in {system}"
            )
        elif owner is None:
            owners[key] = entity_id
            new_links.append({"entity": entity, "entity_id": entity_id, "system": system, "external_key": key,
                              "match_method": LINKED, "last_synced_hash": None, "last_synced_at": now,
                              "created_run_id": run_id, "updated_run_id": run_id})  # fmt: skip
    if new_links:
        session.execute(insert(xw), new_links)
    return refused


def _write_keys(
    session: Session, entity: str, key_field: str, rows: list[dict[str, Any]], run_id: int
) -> None:
    """Write the keys the target gave into ``key_field`` of the records, journaled (set-based)."""
    from crm_core.journal import bulk_update, ids_in, update_entry, write_journal

    definition = ENTITIES[entity]
    table: Any = definition.model.__table__
    column = definition.fields[key_field].column
    wanted = {r["entity_id"]: str(r["external_key"]) for r in rows if r["external_key"]}
    if not wanted:
        return
    connection = session.connection()
    ids = sorted(wanted)
    current: dict[int, tuple[Any, Any, Any]] = {}
    for start in range(0, len(ids), 2000):
        query = select(table.c.id, table.c[column], table.c.updated_run_id, table.c.updated_at).where(
            ids_in(connection, table.c.id, ids[start : start + 2000])
        )
        current.update({i: (value, run, stamp) for i, value, run, stamp in session.execute(query)})
    now = dt.datetime.now(dt.UTC)
    updates: list[dict[str, Any]] = []
    journal: list[dict[str, Any]] = []
    for record_id, key in wanted.items():
        if record_id not in current or current[record_id][0] == key:
            continue
        value, previous_run, stamp = current[record_id]
        after = {column: key, "updated_run_id": run_id, "updated_at": now}
        updates.append({"_id": record_id, **after})
        journal.append(update_entry(run_id, table, {"id": record_id},
                                    {column: value, "updated_run_id": previous_run, "updated_at": stamp}, after))  # fmt: skip
    bulk_update(connection, table, updates)
    if journal:
        write_journal(connection, journal)


# --------------------------------------------------------------------------- conflicts


def open_conflicts(session: Session, target: str | None = None) -> list[SyncConflict]:
    """Return the conflicts waiting for a person, oldest first."""
    query = select(SyncConflict).where(SyncConflict.status == "open").order_by(SyncConflict.id)
    if target is not None:
        query = query.where(SyncConflict.target == target)
    return list(session.scalars(query))


def count_open_conflicts(session: Session, target: str) -> int:
    """Return how many conflicts of ``target`` wait for a person (one count query)."""
    from sqlalchemy import func

    query = select(func.count()).where(SyncConflict.status == "open", SyncConflict.target == target)
    return int(session.scalar(query) or 0)


def decide_conflict(migration: Any, engine: Engine, conflict_id: int, take: str, *, by: str) -> str:
    """Settle an open conflict: ``crm`` keeps the CRM's value (sent to the target), ``target`` takes theirs.

    Either way the decision is a run of its own: taking the target's value is a journaled edit of the record,
    keeping the CRM's queues the record for the target under a decision run, with the conflict closed in
    the same transaction.
    """
    from crm_core.edits import edit_record
    from integration.sync.outbox import capture as capture_records

    if take not in ("crm", "target"):
        raise SyncError("take 'crm' (keep the CRM's value and send it) or 'target' (take the target's value)")
    factory = session_factory(engine)

    def close(session: Session) -> SyncConflict:
        conflict = session.get(SyncConflict, conflict_id, with_for_update=True)
        if conflict is None or conflict.status != "open":
            raise SyncError(f"conflict {conflict_id} is not open; list them with `crmi sync conflicts`")
        conflict.status = f"decided_{take}"
        conflict.decided_by = by
        conflict.decided_at = dt.datetime.now(dt.UTC)
        return conflict

    with factory() as session:
        conflict = session.get(SyncConflict, conflict_id)
        if conflict is None or conflict.status != "open":
            raise SyncError(f"conflict {conflict_id} is not open; list them with `crmi sync conflicts`")
        target = target_of(migration, conflict.target)
        entity, entity_id, field_name, value = (
            conflict.entity,
            conflict.entity_id,
            conflict.field,
            conflict.target_value,
        )
    if take == "target":
        taken = _typed(entity, field_name, value)
        # the target's value as the inbound mapping read it: written as a load would write it
        edit_record(
            engine, entity, entity_id, {field_name: taken}, actor=by, project=DECISION_PROJECT, as_read=True
        )
        with factory() as session, session.begin():
            close(session)
            # Both sides now hold the target's value. The record's next document still goes out: it carries
            # whatever the CRM changed while the conflict held the record back (and U8's value as the CRM
            # writes it).
            record_exchange(session, target, entity, {entity_id: {field_name: taken}}, run_id=None)
    else:
        with factory() as session, session.begin():
            close(session)
            run_key = f"edit-{by}-conflict-{conflict_id}-{uuid.uuid4().hex[:8]}"
            run = get_or_start_run(session, run_key, DECISION_PROJECT, mode="edit")
            # Sent even when the last exchange left the same document (a field the CRM does not own).
            session.execute(update(SyncState).where(
                SyncState.target == target.name, SyncState.entity == entity, SyncState.entity_id == entity_id
            ).values(payload_hash=None))  # fmt: skip
            capture_records(session, target, run.id, extra={entity: {entity_id}}, advance=False)
            run.status = "succeeded"
            run.finished_at = dt.datetime.now(dt.UTC)
    return f"{entity} {entity_id}.{field_name}: {'CRM value kept' if take == 'crm' else 'target value taken'}"


SETTLE_PROJECT = "sync-settle"  # the runs of adds in doubt settled by a person (crmi sync settle)


def settle_by_hand(migration: Any, engine: Engine, row_id: int, applied_as: str | None, *, by: str) -> str:
    """Settle an add in doubt (a dead letter whose answer never came) with what a person found in the target.

    ``applied_as``: the key the target holds the record under from that add, recorded as the sync records an
    add it finds applied (crosswalk, key field, sync state), so the record's current document is queued as an
    edit; None: the target holds nothing, the record's current document is queued as an add. The dead letter
    is superseded, naming ``by``. A run of its own, like a conflict decision; nothing is written on a refusal.
    """
    from integration.sync.outbox import ASK_NEXT_SYNC, _queue_records, adds_in_doubt

    who = (by or "").strip()
    if not who:
        raise SyncError("say who settles the add (--by NAME): it is recorded with it")
    key = applied_as.strip() if applied_as is not None else None
    if applied_as is not None and not key:
        raise SyncError(
            "--applied-as needs the key the target holds the record under (e.g. U8's customer code)"
        )
    factory = session_factory(engine)
    with factory() as session:
        row = session.get(SyncOutbox, row_id)
        if row is None:
            raise SyncError(f"there is no outbox row {row_id}; `crmi sync status` lists the dead letters")
        target = target_of(migration, row.target)
        entity, entity_id = row.entity, row.entity_id
    sync = target.entities.get(entity)
    run_key = f"edit-{who}-settle-{row_id}-{uuid.uuid4().hex[:8]}"
    asked: list[int] = []

    def found_by_hand(rows: list[dict[str, Any]]) -> list[str | None]:
        asked.extend(r["id"] for r in rows)
        others = [str(r["id"]) for r in rows if r["id"] != row_id]
        if others:
            raise SyncError(f"settle outbox row(s) {', '.join(others)} too, adds in doubt of the same record")
        return [key]

    with factory() as session, session.begin():
        doubts = adds_in_doubt(session, target.name, sync, [entity_id]) if sync is not None else []
        if row_id not in {d["id"] for d in doubts}:
            current = session.get(SyncOutbox, row_id)
            assert current is not None
            raise SyncError(
                f"outbox row {row_id} is not an add in doubt ({current.status} {current.operation}): only a dead "
                "add whose answer never came (gave up after …) is settled; `crmi sync retry` or `crmi sync "
                "discard ID --by NAME` deals with other dead letters"
            )
        assert sync is not None
        run = get_or_start_run(session, run_key, SETTLE_PROJECT, mode="edit")
        settle = _settling(found_by_hand, _acknowledge(target, run_key, {}))
        _queue_records(session, target, sync, {entity_id}, run.id, CaptureStats(), settle)
        after = session.execute(
            select(SyncOutbox.status, SyncOutbox.last_error).where(SyncOutbox.id == row_id)
        ).one()
        if row_id not in asked or after.status == "dead":
            waiting = session.scalar(
                select(SyncOutbox.last_error)
                .where(SyncOutbox.target == target.name, SyncOutbox.entity == entity,
                       SyncOutbox.entity_id == entity_id, SyncOutbox.status == "waiting")
                .order_by(SyncOutbox.id.desc()).limit(1)
            )  # fmt: skip
            reason = (
                waiting if waiting and not waiting.startswith(ASK_NEXT_SYNC) else "it has no add to send now"
            )
            raise SyncError(f"{entity} {entity_id} cannot be settled now: {reason}; nothing was settled")
        when = f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC"
        session.execute(
            update(SyncOutbox).where(SyncOutbox.id == row_id)
            .values(last_error=f"settled by {who} at {when}: {after.last_error}")
        )  # fmt: skip
        run.status = "succeeded"
        run.finished_at = dt.datetime.now(dt.UTC)
    said = (
        f"{target.name} holds it as {key}: sent as an edit" if key else f"{target.name} holds nothing: added"
    )
    return f"outbox row {row_id} ({entity} {entity_id}) settled by {who}; {said} by the next `crmi sync run`"


def _typed(entity: str, field_name: str, value: str | None) -> Any:
    """Return a conflict's text value as the field's type."""
    from crm_core.journal import from_json

    definition = ENTITIES[entity]
    table: Any = definition.model.__table__
    column = table.c[definition.fields[field_name].column]
    return from_json(column, value) if value is not None else None


def pending_outbox(session: Session, target: str) -> int:
    """Return the outbox rows of ``target`` not delivered yet (pending, waiting or awaiting a result)."""
    from sqlalchemy import func

    return int(
        session.scalar(
            select(func.count()).where(
                SyncOutbox.target == target, SyncOutbox.status.in_(("pending", "waiting", "awaiting"))
            )
        )
        or 0
    )


__all__ = [
    "BusyWait",
    "StoppedWaiting",
    "SyncReport",
    "count_open_conflicts",
    "decide_conflict",
    "open_conflicts",
    "run_sync",
    "target_of",
    "to_json",
]
