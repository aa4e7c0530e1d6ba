"""Outbound: capture core changes into the outbox, and deliver the outbox to a target system.

**Capture** reads what the core already records: every business row carries the load run that last
changed it (``updated_run_id``, indexed), and every change, whether a migration, a sync, a merge or a CRM
edit (:mod:`crm_core.edits`), is a load run committed in the same transaction as the change. The capture
cursor is the highest run id whose changes were captured; a run still running stops it (its changes are
not committed yet). So a capture reads the rows of the runs since the cursor, an index range, and its cost
grows with the number of changes, not with the table. Per record the outbound mapping builds the target's
document; a document equal to what the record and the target last exchanged (``sync_state``) is not sent: an
**echo** when the target's own sync made the change (its row read in, the key it gave), else a change the
target does not see (``nothing_to_send``: a field no outbound field sends, a value set back).

**Delivery** stores a trade id on each outbox row before the first send (committed), so a resend after a
crash replays the same request and the target applies it once. Transport failures are retried with
exponential backoff that honours Retry-After, up to ``retry.max_attempts``; a business rejection or the
last failed try makes the row a **dead letter** with the reason (``crmi sync retry`` resends it).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

import pandas as pd
from sqlalchemy import Engine, Table, and_, bindparam, func, insert, or_, select, update
from sqlalchemy.orm import Session, aliased

from crm_core.db import session_factory
from crm_core.entities import ENTITIES
from crm_core.errors import SyncError
from crm_core.failpoints import failpoint
from crm_core.journal import ids_in, to_json
from crm_core.models import ExternalId, LoadRun, SyncConflict, SyncOutbox, SyncState
from crm_core.runs import COMMITTED
from crm_core.watermarks import CursorState, read_watermark, save_watermark
from integration.connectors.base import LOCATION, ROW_KIND, ROW_REF
from integration.mappings.engine import map_chunk, python_records
from integration.mappings.expressions import filter_frame, parse
from integration.sync.spec import CRM, KEY_COLUMN, CompiledEntitySync, CompiledTarget, RetryPolicy

CAPTURE_STREAM = "capture"
GO_LIVE_STREAM = "go-live"  # the run a target's first sync with start: now took as go-live
MIGRATION_MODES = ("full", "delta")  # load runs of a migration (a trial loads into a scratch core of its own)
CRM_EDIT_MODE = "edit"  # a change made in the CRM (crm_core.edits): what the first sync sends
CHUNK = 2000
TRADE_ID_PREFETCH = 1000  # trade ids asked for at once (U8 issues up to 1,000 per call)
GAVE_UP = "gave up after"  # how a dead letter of transport failures starts: the target may have applied it
XW: Table = ExternalId.__table__  # type: ignore[assignment]
OUTBOX: Table = SyncOutbox.__table__  # type: ignore[assignment]
STATE: Table = SyncState.__table__  # type: ignore[assignment]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def payload_hash(payload: Mapping[str, Any]) -> str:
    """Return a stable hash of a document (keys sorted, values as JSON)."""
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def watermark_source(target: str) -> str:
    """Return the watermarks 'source' under which a target's capture cursor is kept."""
    return f"sync:{target}"


# --------------------------------------------------------------------------- reading core records


def core_frame(
    session: Session, target: CompiledTarget, entity: str, ids: Sequence[int], needed: set[str] | None = None
) -> pd.DataFrame:
    """Return core records as the outbound mapping reads them: fields, ``_key`` and referenced fields.

    ``needed`` names the columns the mapping reads: a reference's record is read only when one of its
    fields is (``customer._key``), so a document of the record's own fields costs one query per chunk.
    """
    definition = ENTITIES[entity]
    table: Table = definition.model.__table__  # type: ignore[assignment]
    connection = session.connection()
    rows: list[dict[str, Any]] = []
    for part in _parts(ids):
        query = select(table).where(ids_in(connection, table.c.id, part))
        rows.extend(dict(r) for r in session.execute(query).mappings())
    frame_rows = [
        {"id": r["id"], **{name: r[f.column] for name, f in definition.fields.items()}} for r in rows
    ]
    frame = pd.DataFrame(frame_rows, columns=["id", *definition.fields])
    keys = target_keys(session, target, entity, [r["id"] for r in rows])
    frame[KEY_COLUMN] = [keys.get(i) for i in frame["id"]]
    for name, field_def in definition.references.items():
        referenced = ENTITIES[field_def.references or ""]
        wanted = None if needed is None else {c.split(".", 1)[1] for c in needed if c.startswith(f"{name}.")}
        if wanted is not None and not wanted:
            continue
        ref_ids = sorted({int(v) for v in frame[name].dropna()}) if name in frame else []
        ref_table: Table = referenced.model.__table__  # type: ignore[assignment]
        ref_rows: dict[int, dict[str, Any]] = {}
        for part in _parts(ref_ids):
            query = select(ref_table).where(ids_in(connection, ref_table.c.id, part))
            ref_rows.update({r["id"]: dict(r) for r in session.execute(query).mappings()})
        ref_keys = target_keys(session, target, referenced.name, ref_ids)
        ids_column = [None if pd.isna(v) else int(v) for v in frame[name]] if name in frame else []
        frame[f"{name}.id"] = ids_column
        frame[f"{name}.{KEY_COLUMN}"] = [ref_keys.get(i) if i is not None else None for i in ids_column]
        for ref_field, ref_def in referenced.fields.items():
            if wanted is not None and ref_field not in wanted:
                continue
            frame[f"{name}.{ref_field}"] = [
                ref_rows.get(i, {}).get(ref_def.column) if i is not None else None for i in ids_column
            ]
    frame[LOCATION] = definition.model.__tablename__
    frame[ROW_REF] = frame["id"].astype(str)
    frame[ROW_KIND] = "data"
    return frame


def target_keys(session: Session, target: CompiledTarget, entity: str, ids: Sequence[int]) -> dict[int, str]:
    """Return each record's key in the target: the crosswalk key under the target's system."""
    found: dict[int, str] = {}
    connection = session.connection()
    for part in _parts(sorted(set(ids))):
        query = (
            select(XW.c.entity_id, XW.c.external_key)
            .where(
                XW.c.entity == entity, XW.c.system == target.system, ids_in(connection, XW.c.entity_id, part)
            )
            .order_by(XW.c.id)
        )
        for entity_id, key in session.execute(query):
            found.setdefault(entity_id, key)
    return found


def _parts(ids: Sequence[int]) -> Iterator[Sequence[int]]:
    for start in range(0, len(ids), CHUNK):
        yield ids[start : start + CHUNK]


def _json_value(value: Any) -> Any:
    if value is None or (not isinstance(value, str | list | dict) and pd.isna(value)):
        return None
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dt.date | dt.datetime):
        return value.isoformat()
    return value


@dataclass
class Document:
    """One record's outbound document, or why it cannot be built yet."""

    entity_id: int
    operation: str | None
    payload: dict[str, Any]
    core_values: dict[str, Any]
    external_key: str | None
    problem: str | None = None  # set: waits (e.g. its customer has no ERP code yet)


def cleared(fields: Sequence[str], core: Mapping[Any, Any], held: Mapping[str, Any]) -> bool:
    """Return True when the core holds nothing in ``fields`` where the target holds something (as last
    exchanged): the CRM cleared it, and an edit sends an explicit empty. A value the target holds but the
    core never had (a mapping that reads U8's invalid phone as empty) is left alone: never exchanged as held."""
    return all(_json_value(to_json(core.get(f))) is None for f in fields) and any(
        _json_value(held.get(f)) not in (None, "") for f in fields
    )


def build_documents(
    session: Session, target: CompiledTarget, sync: CompiledEntitySync, ids: Sequence[int]
) -> list[Document]:
    """Map core records to the target's documents (add for a record the target does not know, else edit)."""
    outbound = sync.outbound
    assert outbound is not None
    when = parse(outbound.spec.when, condition=True) if outbound.spec.when else None
    needed = {
        *outbound.mapping.source_columns(),
        *(outbound.lines.source_columns() if outbound.lines else ()),
    }
    needed |= set(when.columns) if when is not None else set()
    frame = core_frame(session, target, sync.entity, ids, needed)
    if when is not None:
        frame = filter_frame(frame, when).reset_index(drop=True)
    if frame.empty:
        return []
    result = map_chunk(outbound.mapping, frame)
    records = python_records(result.records)
    problems: dict[str, list[str]] = {}
    for entry in result.rejects.to_dict("records"):
        problems.setdefault(str(entry["row_ref"]), []).append(
            f"{entry['field'] or ''}: {entry['reason']}".strip(": ")
        )
    lines: dict[str, list[dict[str, Any]]] = {}
    if outbound.lines is not None:
        mapped = map_chunk(outbound.lines, frame)
        for entry in mapped.rejects.to_dict("records"):
            problems.setdefault(str(entry["row_ref"]), []).append(f"line {entry['field']}: {entry['reason']}")
        for row in python_records(mapped.records).to_dict("records"):
            lines.setdefault(str(row[ROW_REF]), []).append(
                {
                    f.name: _json_value(row.get(f.name))
                    for f in outbound.lines.fields
                    if _json_value(row.get(f.name)) is not None
                }
            )
    by_ref = {str(r[ROW_REF]): r for r in records.to_dict("records")}
    owned_by_target = {f for f, owner in sync.owners.items() if owner != CRM}
    own_fields = ENTITIES[sync.entity].fields
    keyed = [int(i) for i, k in zip(frame["id"], frame[KEY_COLUMN], strict=True) if k is not None]
    held, partial = target_holds(session, target, sync, keyed) if keyed else ({}, set())
    documents: list[Document] = []
    for row in frame.to_dict("records"):
        entity_id = int(row["id"])
        key = row.get(KEY_COLUMN)
        operation = outbound.spec.add if key is None else outbound.spec.edit
        ref = str(entity_id)
        core_values = {
            name: to_json(row.get(name))
            for document_field in outbound.reads.values()
            for name in document_field
            if name in ENTITIES[sync.entity].fields
        }
        if ref in problems:
            documents.append(Document(entity_id, operation, {}, core_values, key, "; ".join(problems[ref])))
            continue
        mapped_row = by_ref[ref]
        payload: dict[str, Any] = {}
        known = held.get(entity_id, {}) if key is not None else {}
        restricted = key is not None and entity_id in partial
        carried: set[str] = set()
        for document_field, reads in outbound.reads.items():
            if key is not None and reads and all(r in owned_by_target for r in reads):
                continue  # an edit never sends what the target owns
            own = [r for r in reads if r in own_fields]
            if restricted and not all(r in known for r in own):
                continue  # at the first sync: what the target holds is not known, and the CRM did not edit it
            carried.update(own)
            value = _json_value(mapped_row.get(document_field))
            if value is not None:
                payload[document_field] = value
            elif own and cleared(own, row, known):
                payload[document_field] = ""  # the CRM cleared it: an explicit empty clears the target's
        if restricted:
            if not carried:  # nothing of its own to send: no edit of the CRM's since go-live
                documents.append(Document(entity_id, None, {}, {}, key))
                continue
            core_values = {name: value for name, value in core_values.items() if name in carried}
        if outbound.lines is not None:
            payload[outbound.spec.lines.name if outbound.spec.lines else "entry"] = lines.get(ref, [])
        documents.append(Document(entity_id, operation, payload, core_values, key))
    return documents


# --------------------------------------------------------------------------- capture


@dataclass
class CaptureStats:
    """What one capture found."""

    runs: int = 0
    records: int = 0
    queued: int = 0
    echoes_suppressed: int = 0  # the target's own changes coming back (its sync wrote them): not sent
    nothing_to_send: int = 0  # other changes that leave the document as the target has it (a field not sent)
    waiting: int = 0
    superseded: int = 0
    held: int = 0  # records not sent while a conflict about them waits for a person

    def as_dict(self) -> dict[str, int]:
        """Return the counts."""
        return dict(self.__dict__)


def capture_window(session: Session, target: str, own_run_id: int | None) -> tuple[int, int]:
    """Return (cursor, upto): capture the runs with cursor < id <= upto (none still running among them)."""
    state = read_watermark(session, watermark_source(target), CAPTURE_STREAM)
    cursor = int(state.value) if state is not None else 0
    # The sync's own run counts as running: what it writes (keys the target gave) is captured by the next
    # sync, and found to be an echo there.
    running = select(func.min(LoadRun.id)).where(LoadRun.id > cursor, LoadRun.status == "running")
    first_running = session.scalar(running)
    if first_running is not None:
        return cursor, first_running - 1
    newest = session.scalar(select(func.max(LoadRun.id)).where(LoadRun.id > cursor))
    return cursor, int(newest) if newest is not None else cursor


def baseline(session: Session, target: CompiledTarget, run_id: int) -> None:
    """At a target's first sync with ``start: now``: the core as go-live left it is where both sides start.

    This sets the capture cursor (CRM edits after go-live go out); what both sides hold is recorded by the
    inbound read of each record (:func:`integration.sync.inbound.apply_ownership`: a difference that was
    there at go-live is an open conflict, not a change sent to the target).
    """
    if target.spec.start != "now":
        return
    if read_watermark(session, watermark_source(target.name), CAPTURE_STREAM) is not None:
        return
    _, upto = capture_window(session, target.name, run_id)
    # The go-live: the last migration load. CRM edits after it go out with the first sync; a steward's or a
    # dedup run's changes since are part of what go-live left (a difference from the target is a conflict).
    go_live = session.scalar(
        select(func.max(LoadRun.id)).where(
            LoadRun.id <= upto, LoadRun.status.in_(COMMITTED), LoadRun.mode.in_(MIGRATION_MODES)
        )
    )
    start = int(go_live) if go_live is not None else upto
    save_watermark(
        session, watermark_source(target.name), CAPTURE_STREAM, CursorState(start, frozenset()), run_id
    )
    save_watermark(
        session, watermark_source(target.name), GO_LIVE_STREAM, CursorState(start, frozenset()), run_id
    )


def go_live_run(session: Session, target: CompiledTarget) -> int:
    """Return the run the target's first sync took as go-live (a target first synced before it was kept:
    the migration's last load run)."""
    state = read_watermark(session, watermark_source(target.name), GO_LIVE_STREAM)
    if state is not None:
        return int(state.value)
    last = session.scalar(
        select(func.max(LoadRun.id)).where(LoadRun.status.in_(COMMITTED), LoadRun.mode.in_(MIGRATION_MODES))
    )
    return int(last or 0)


def target_holds(
    session: Session, target: CompiledTarget, sync: CompiledEntitySync, ids: Sequence[int]
) -> tuple[dict[int, dict[str, Any]], set[int]]:
    """Return, per record the target knows, what it holds as far as the core knows, and the records whose
    other fields are unknown.

    What it holds is what both sides last exchanged (``sync_state``). With ``start: now`` a field never
    exchanged is unknown, unless a CRM edit changed it since go-live: the target still holds its value at
    go-live (the journal's before-image). An edit document of such a record carries the known fields only, so
    the first sync never overwrites a value the migration or a steward gave the core (the target's row may
    not be read until it changes there).
    """
    from integration.sync.inbound import sent_fields, values_before_edits

    held: dict[int, dict[str, Any]] = {}
    connection = session.connection()
    for part in _parts(sorted(set(ids))):
        query = select(STATE.c.entity_id, STATE.c.core_values).where(
            STATE.c.target == target.name, STATE.c.entity == sync.entity, ids_in(connection, STATE.c.entity_id, part)
        )  # fmt: skip
        held.update({entity_id: dict(values or {}) for entity_id, values in session.execute(query)})
    if target.spec.start != "now":
        return held, set()
    own = sent_fields(sync) if sync.outbound is not None else set()
    partial = sorted(i for i in set(ids) if not own <= set(held.get(i, {})))
    if not partial:
        return held, set()
    definition = ENTITIES[sync.entity]
    columns = {definition.fields[f].column: f for f in own}
    edited = values_before_edits(session, sync.entity, partial, go_live_run(session, target))
    for entity_id in partial:
        known = held.setdefault(entity_id, {})
        for column, value in edited.get(entity_id, {}).items():
            if column in columns:
                known.setdefault(columns[column], value)
    return held, set(partial)


def changed_ids(session: Session, entity: str, cursor: int, upto: int) -> list[int]:
    """Return the live records of ``entity`` changed by a committed run in (cursor, upto]: an index range."""
    table: Table = ENTITIES[entity].model.__table__  # type: ignore[assignment]
    runs = select(LoadRun.id).where(LoadRun.id > cursor, LoadRun.id <= upto, LoadRun.status.in_(COMMITTED))
    query = select(table.c.id).where(
        table.c.updated_run_id > cursor, table.c.updated_run_id <= upto, table.c.updated_run_id.in_(runs)
    )
    if "merged_into_id" in table.c:
        query = query.where(table.c.merged_into_id.is_(None))
    return sorted(session.scalars(query))


def capture(
    session: Session,
    target: CompiledTarget,
    run_id: int,
    *,
    extra: Mapping[str, set[int]] | None = None,
    advance: bool = True,
    settle: Settle | None = None,
) -> CaptureStats:
    """Queue the documents of records changed since the cursor (plus ``extra`` and waiting ones).

    ``settle`` asks the target about adds whose outcome is unknown (:data:`Settle`); without it a record
    whose add is in doubt waits for a sync that can ask."""
    stats = CaptureStats()
    cursor, upto = capture_window(session, target.name, run_id)
    first = read_watermark(session, watermark_source(target.name), CAPTURE_STREAM) is None
    stats.runs = max(0, upto - cursor)
    for entity, sync in target.entities.items():
        if not sync.outbound_enabled:
            continue
        ids = set(changed_ids(session, entity, cursor, upto)) if upto > cursor else set()
        ids |= set((extra or {}).get(entity, set()))
        waiting = session.scalars(
            select(SyncOutbox.entity_id).where(
                SyncOutbox.target == target.name, SyncOutbox.entity == entity, SyncOutbox.status == "waiting"
            )
        ).all()
        ids |= set(waiting)
        _queue_records(session, target, sync, ids, run_id, stats, settle)
    if advance and (upto > cursor or first):
        save_watermark(session, watermark_source(target.name), CAPTURE_STREAM,
                       CursorState(upto, frozenset()), run_id)  # fmt: skip
    return stats


def _queue_records(
    session: Session, target: CompiledTarget, sync: CompiledEntitySync, ids: set[int], run_id: int | None,
    stats: CaptureStats, settle: Settle | None = None,
) -> None:  # fmt: skip
    """Queue the current documents of ``ids`` (one entity), but not of records merged away or held back."""
    entity = sync.entity
    # A record merged into another (a steward's decision, a dedup run) is never sent: its survivor is.
    ids = ids - _drop_merged_away(session, target, entity, stats)
    # A record with a conflict waiting for a person is held back: sending it would decide for the CRM.
    # Settling the conflict queues it again (crmi sync conflicts --decide).
    held = ids & set(session.scalars(select(SyncConflict.entity_id).where(
        SyncConflict.target == target.name, SyncConflict.entity == entity, SyncConflict.status == "open"
    )))  # fmt: skip
    stats.held += len(held)
    ids -= held
    if not ids:
        return
    stats.records += len(ids)
    ordered = sorted(ids)
    for start in range(0, len(ordered), CHUNK):
        _queue(session, target, sync, ordered[start : start + CHUNK], run_id, stats, settle)


def target_sync_runs(target: str) -> Any:
    """Return the condition on ``LoadRun`` of the target's own sync runs (inbound loads, acknowledgements)."""
    return and_(LoadRun.mode == "sync", LoadRun.run_key.like(f"sync-{target}-%"))


def written_by_target(session: Session, target: CompiledTarget, entity: str, ids: Sequence[int]) -> set[int]:
    """Return the records among ``ids`` last changed by the target's own sync: what the target sent or answered
    (its row read in, the key it gave), i.e. an echo when their document comes out as the target has it."""
    table: Table = ENTITIES[entity].model.__table__  # type: ignore[assignment]
    connection = session.connection()
    runs = select(LoadRun.id).where(target_sync_runs(target.name))
    found: set[int] = set()
    for part in _parts(sorted(set(ids))):
        query = select(table.c.id).where(
            ids_in(connection, table.c.id, part), table.c.updated_run_id.in_(runs)
        )
        found.update(session.scalars(query))
    return found


def _drop_merged_away(session: Session, target: CompiledTarget, entity: str, stats: CaptureStats) -> set[int]:
    """Supersede the unsent documents of records merged into another since they were queued; return those
    records. (A merge changes the survivor, whose own document carries the merged values.)"""
    table: Table = ENTITIES[entity].model.__table__  # type: ignore[assignment]
    if "merged_into_id" not in table.c:
        return set()
    rows = session.execute(
        select(OUTBOX.c.id, OUTBOX.c.entity_id, table.c.merged_into_id)
        .join(table, table.c.id == OUTBOX.c.entity_id)
        .where(OUTBOX.c.target == target.name, OUTBOX.c.entity == entity,
               OUTBOX.c.status.in_(("pending", "waiting")), OUTBOX.c.trade_id.is_(None),
               table.c.merged_into_id.is_not(None))
    ).all()  # fmt: skip
    if rows:
        session.execute(
            update(OUTBOX).where(OUTBOX.c.id == bindparam("_id")).values(status="superseded", last_error=bindparam("why")),
            [{"_id": row.id, "why": f"merged into {entity} {row.merged_into_id}, which is sent instead"} for row in rows],
        )  # fmt: skip
        stats.superseded += len(rows)
    return {int(row.entity_id) for row in rows}


def pairs_in_review(session: Session, entity: str, ids: Sequence[int]) -> dict[int, tuple[int, int, int]]:
    """Return, per record among ``ids``, the first pair waiting for a steward that stands for it (candidate id,
    left and right record): linkage proposed it, or a record since merged into it, as a duplicate of another."""
    from crm_core.merging import MODEL_OF, active_records, members_of
    from crm_core.models import MatchCandidate

    model = MODEL_OF.get(entity)
    if model is None or not ids:
        return {}
    connection = session.connection()
    candidates: Table = MatchCandidate.__table__  # type: ignore[assignment]
    members = members_of(connection, model, ids)  # every record that ended in one of ids (merged into it)
    rows: dict[int, tuple[int, int, int]] = {}
    for part in _parts(sorted(members)):
        for column in (candidates.c.left_id, candidates.c.right_id):
            query = select(candidates.c.id, candidates.c.left_id, candidates.c.right_id).where(
                candidates.c.entity == entity,
                candidates.c.status == "review",
                ids_in(connection, column, part),
            )
            rows.update({row.id: (row.id, row.left_id, row.right_id) for row in session.execute(query)})
    if not rows:
        return {}
    active = active_records(
        connection, model, [side for _, left, right in rows.values() for side in (left, right)]
    )
    wanted = set(ids)
    found: dict[int, tuple[int, int, int]] = {}
    for candidate_id, left, right in sorted(rows.values()):
        sides = {active[left], active[right]}
        if len(sides) == 1:  # both sides are one record already: nothing left to decide for the sync
            continue
        for record in sides & wanted:
            found.setdefault(record, (candidate_id, left, right))
    return found


def review_reason(candidate_id: int, left: int, right: int, entity: str = "customer") -> str:
    """Why a new record's document waits for a steward's decision on a pair (what to run about it)."""
    return (
        f"waits for a steward's decision on duplicate pair {candidate_id} ({entity}s {left} and {right}): "
        f"`crmi dedup review` lists it, `crmi dedup decide {candidate_id}` or the steward workbench decides it"
    )


# Asked about adds whose outcome is unknown (dead letters of transport failures, as outbox rows); returns
# (outbox id -> the key the target holds from it, having recorded it like an applied delivery; outbox id -> why
# the target could not say). A row in neither was not applied.
Settle = Callable[[Session, list[dict[str, Any]]], tuple[dict[int, str], dict[int, str]]]
ASK_NEXT_SYNC = "waits for the next sync to ask"  # a doubt no target was asked about (crmi sync retry)


def adds_in_doubt(
    session: Session, target: str, sync: CompiledEntitySync, ids: Sequence[int]
) -> list[dict[str, Any]]:
    """Return the dead letters of the records ``ids`` that are adds whose last try failed in transport: sent with
    a trade id, never answered, so the target may have applied them (a business rejection is no doubt)."""
    if sync.outbound is None or not ids:
        return []
    connection = session.connection()
    rows: list[dict[str, Any]] = []
    for part in _parts(sorted(set(ids))):
        rows.extend(dict(r) for r in session.execute(
            select(OUTBOX).where(
                OUTBOX.c.target == target, OUTBOX.c.entity == sync.entity, OUTBOX.c.status == "dead",
                OUTBOX.c.operation == sync.outbound.spec.add, OUTBOX.c.trade_id.is_not(None),
                OUTBOX.c.last_error.like(f"{GAVE_UP} %"), ids_in(connection, OUTBOX.c.entity_id, part),
            ).order_by(OUTBOX.c.id)
        ).mappings())  # fmt: skip
    return rows


def _settle_doubts(
    session: Session, target: CompiledTarget, sync: CompiledEntitySync, documents: list[Document],
    open_rows: Mapping[int, list[Any]], settle: Settle | None,
) -> tuple[list[Document], dict[int, str], dict[int, str]]:  # fmt: skip
    """Before a record is added again, find out whether the target applied an add of it sent before.

    Return the documents (those of records the target turned out to hold built again: edits now), why records
    must wait instead (an add still in flight, a doubt the target could not settle), and what was found out,
    per record (said when its dead letter is superseded)."""
    assert sync.outbound is not None
    adds = [d.entity_id for d in documents
            if d.problem is None and d.operation == sync.outbound.spec.add and d.external_key is None]  # fmt: skip
    blocked: dict[int, str] = {}
    for entity_id in adds:
        flying = [
            r
            for r in open_rows.get(entity_id, [])
            if r.trade_id is not None and r.operation == sync.outbound.spec.add
        ]
        if flying:  # its answer gives the key the record is then edited by (the same run builds it again)
            blocked[entity_id] = f"waits for outbox row {flying[-1].id}, its add sent before, to be answered"
    doubts = adds_in_doubt(session, target.name, sync, [i for i in adds if i not in blocked])
    if not doubts:
        return documents, blocked, {}
    if settle is None:
        for row in doubts:
            blocked[row["entity_id"]] = (
                f"{ASK_NEXT_SYNC} {target.name} whether it applied outbox row {row['id']} (its add, never "
                "answered)"
            )
        return documents, blocked, {}
    found, unknown = settle(session, doubts)
    notes: dict[int, str] = {}
    for row in doubts:
        entity_id = row["entity_id"]
        if row["id"] in unknown:
            blocked[entity_id] = (
                f"waits until {target.name} says whether it applied outbox row {row['id']} (its add, never "
                f"answered): {unknown[row['id']]}; or look in {target.name} and say what you found: `crmi sync "
                f"settle {row['id']} --applied-as KEY --by NAME` (or --not-applied)"
            )
        elif row["id"] in found:
            notes[entity_id] = f"{target.name} had applied it as {found[row['id']]}"
            session.execute(
                update(OUTBOX).where(OUTBOX.c.id == row["id"]).values(external_key=found[row["id"]])
            )
        else:
            notes.setdefault(entity_id, f"{target.name} does not hold it")
    held = {row["entity_id"] for row in doubts if row["id"] in found}
    if held:  # the target holds them now: their current document is an edit
        documents = [d for d in documents if d.entity_id not in held] + build_documents(
            session, target, sync, sorted(held)
        )
    return documents, blocked, notes


def _queue(
    session: Session, target: CompiledTarget, sync: CompiledEntitySync, ids: list[int], run_id: int | None,
    stats: CaptureStats, settle: Settle | None = None,
) -> None:  # fmt: skip
    documents = build_documents(session, target, sync, ids)
    connection = session.connection()
    states = {
        row.entity_id: row
        for part in _parts(ids)
        for row in session.execute(
            select(STATE.c.entity_id, STATE.c.payload_hash).where(
                STATE.c.target == target.name,
                STATE.c.entity == sync.entity,
                ids_in(connection, STATE.c.entity_id, part),
            )
        )
    }
    # Rows not sent yet (no trade id) are replaced by the newer document; sent ones stay in order.
    open_rows: dict[int, list[Any]] = {}
    for part in _parts(ids):
        query = select(OUTBOX.c.id, OUTBOX.c.entity_id, OUTBOX.c.payload_hash, OUTBOX.c.trade_id,
                       OUTBOX.c.status, OUTBOX.c.operation, OUTBOX.c.last_error).where(
            OUTBOX.c.target == target.name, OUTBOX.c.entity == sync.entity,
            OUTBOX.c.status.in_(("pending", "waiting", "awaiting")), ids_in(connection, OUTBOX.c.entity_id, part),
        ).order_by(OUTBOX.c.id)  # fmt: skip
        for row in session.execute(query):
            open_rows.setdefault(row.entity_id, []).append(row)
    # A record the target does not know yet that linkage sent to review waits for the steward: added now, the
    # target would keep it when the steward merges it away. (A record the target knows keeps syncing.)
    new_records = [
        d.entity_id for d in documents
        if d.problem is None and d.operation is not None and d.external_key is None and d.entity_id not in states
        and not any(r.trade_id is not None for r in open_rows.get(d.entity_id, []))
    ]  # fmt: skip
    in_review = pairs_in_review(session, sync.entity, new_records)
    for document in documents:
        if document.entity_id in in_review:
            document.problem = review_reason(*in_review[document.entity_id], entity=sync.entity)
    # An add sent before whose answer never came may have been applied: a second add would make a duplicate.
    documents, blocked, notes = _settle_doubts(session, target, sync, documents, open_rows, settle)
    now = _utcnow()
    new_rows: list[dict[str, Any]] = []
    superseded: list[int] = []
    unchanged: list[int] = []  # documents the target has already (or none: nothing of the CRM's to send)
    for document in documents:
        current = open_rows.get(document.entity_id, [])
        replaceable = [r.id for r in current if r.trade_id is None]
        if document.problem is None:
            digest = payload_hash({"operation": document.operation, **document.payload})
            in_flight = [r for r in current if r.trade_id is not None]
            latest = in_flight[-1].payload_hash if in_flight else None
            state = states.get(document.entity_id)
            known = latest if latest is not None else (state.payload_hash if state is not None else None)
            if document.operation is None or digest == known:
                unchanged.append(document.entity_id)
                superseded.extend(replaceable)
                continue
            document.problem = blocked.get(document.entity_id)
            unsent = [r for r in current if r.trade_id is None]
            if document.problem is None and [(r.status, r.payload_hash) for r in unsent] == [
                ("pending", digest)
            ]:
                continue  # queued already as it is now (e.g. by a retry of its dead letter): the row stays
        if document.problem is not None:
            digest = ""
            if [(r.status, r.operation, r.last_error) for r in current if r.trade_id is None] == [
                ("waiting", document.operation or "", document.problem)
            ]:  # still waiting for the same reason: the row stays as it is (and says since when)
                stats.waiting += 1
                continue
        superseded.extend(replaceable)
        status = "waiting" if document.problem else "pending"
        stats.waiting += status == "waiting"
        stats.queued += status == "pending"
        new_rows.append({
            "target": target.name, "entity": sync.entity, "entity_id": document.entity_id,
            "operation": document.operation or "", "payload": document.payload, "payload_hash": digest,
            "core_values": document.core_values, "idempotency_key": f"{target.name}:{uuid.uuid4().hex}",
            "trade_id": None, "status": status, "attempts": 0, "next_attempt_at": now,
            "last_error": document.problem, "external_key": document.external_key, "load_run_id": run_id,
            "created_at": now, "delivered_at": None,
        })  # fmt: skip
    if unchanged:
        echoes = written_by_target(session, target, sync.entity, unchanged)
        stats.echoes_suppressed += len(echoes)
        stats.nothing_to_send += len(unchanged) - len(echoes)
    if superseded:
        stats.superseded += len(superseded)
        for part in _parts(sorted(superseded)):
            session.execute(
                update(OUTBOX).where(ids_in(connection, OUTBOX.c.id, part)).values(status="superseded")
            )
    if new_rows:
        session.execute(insert(OUTBOX), new_rows)
    newer: dict[int, str] = {}  # record -> why its dead letters no longer wait
    for part in _parts([r["idempotency_key"] for r in new_rows]):
        for row_id, entity_id in session.execute(
            select(OUTBOX.c.id, OUTBOX.c.entity_id).where(OUTBOX.c.idempotency_key.in_(part))
        ):
            newer[int(entity_id)] = f"superseded by outbox row {row_id}, the record's current document"
    for entity_id in unchanged:
        newer.setdefault(
            entity_id, f"superseded: {target.name} holds the record as it is now (nothing to send)"
        )
    for entity_id in blocked:  # a dead letter in doubt stays until the target says what became of it
        newer.pop(entity_id, None)
    for entity_id, note in notes.items():
        if entity_id in newer:
            newer[entity_id] += f"; {note}"
    stats.superseded += supersede_dead(session, target.name, sync.entity, newer)


def supersede_dead(session: Session, target: str, entity: str, why: Mapping[int, str]) -> int:
    """Supersede the dead letters of the records in ``why`` (record -> reason, e.g. the newer row that carries
    the record's current state); the reason goes before what the target had said. Return how many."""
    if not why:
        return 0
    connection = session.connection()
    dead: list[Any] = []
    for part in _parts(sorted(why)):
        dead.extend(session.execute(
            select(OUTBOX.c.id, OUTBOX.c.entity_id, OUTBOX.c.last_error).where(
                OUTBOX.c.target == target, OUTBOX.c.entity == entity, OUTBOX.c.status == "dead",
                ids_in(connection, OUTBOX.c.entity_id, part),
            )
        ))  # fmt: skip
    if dead:
        session.execute(
            update(OUTBOX).where(OUTBOX.c.id == bindparam("_id")).values(status="superseded", last_error=bindparam("why")),
            [{"_id": r.id, "why": f"{why[r.entity_id]} (was dead: {r.last_error or 'no reason recorded'})"} for r in dead],
        )  # fmt: skip
    return len(dead)


# --------------------------------------------------------------------------- delivery


class Delivered(Protocol):
    """What a transport answers for one delivery (see integration.connectors.u8_openapi.Outcome)."""

    @property
    def trade_id(self) -> str:
        """The trade id the delivery was sent with."""
        ...

    @property
    def status(self) -> str:
        """applied | rejected | pending | retry."""
        ...

    @property
    def external_key(self) -> str | None:
        """The key the target gave the record."""
        ...

    @property
    def message(self) -> str | None:
        """The target's or the transport's message."""
        ...

    @property
    def retry_after(self) -> float | None:
        """Seconds to wait before the next try, when the target said."""
        ...


class Transport(Protocol):
    """A target's client: trade ids, delivery and asynchronous results."""

    def new_trade_ids(self, count: int) -> list[str]:
        """Return ``count`` trade ids (stored on outbox rows before they are sent)."""
        ...

    def deliver(self, deliveries: Sequence[Any]) -> Sequence[Delivered]:
        """Send documents; one outcome per delivery, in order."""
        ...

    def results(self, trade_ids: Sequence[str]) -> Sequence[Delivered]:
        """Return the outcomes of deliveries the target answers asynchronously."""
        ...

    def find_applied(self, deliveries: Sequence[Any]) -> list[str | None]:
        """Return, per add whose outcome is unknown (its answer was lost), the key of the record the target
        holds from it (it was applied) or None (it holds none); raise SyncError when it cannot tell."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


# Records applied deliveries (crosswalk, key field, sync state); returns outbox id -> why one cannot be.
Acknowledge = Callable[[Session, list[dict[str, Any]]], dict[int, str]]


@dataclass
class DeliveryStats:
    """What one delivery pass did."""

    sent: int = 0
    applied: int = 0
    retries: int = 0
    dead_letters: int = 0
    awaiting: int = 0
    stopped: str | None = None  # why delivery stopped early (the target is down)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Return the counts."""
        return dict(self.__dict__)


def backoff(attempts: int, policy: RetryPolicy, retry_after: float | None) -> float:
    """Return the seconds before the next try: exponential from the policy, never sooner than Retry-After."""
    delay = min(policy.backoff_seconds * float(2 ** max(0, attempts - 1)), policy.max_backoff_seconds)
    return max(delay, retry_after or 0.0)


def deliver(
    engine: Engine,
    target: CompiledTarget,
    client: Transport,
    run_id: int,
    make_delivery: Callable[[str, str, dict[str, Any]], Any],
    *,
    on_applied: Acknowledge,
    now: Callable[[], dt.datetime] = _utcnow,
) -> DeliveryStats:
    """Send the due outbox rows of ``target`` in batches and record each outcome.

    One batch is on the wire while the one before it is recorded: the target's work and ours overlap. Every
    row has its trade id stored before it is first sent, so a crash with two batches unrecorded replays
    both and the target applies each once.
    """
    stats = DeliveryStats()
    factory = session_factory(engine)
    _poll_awaiting(factory, target, client, stats, on_applied, now)

    def record(rows: list[dict[str, Any]], sending: Future[Sequence[Delivered]]) -> bool:
        """Record one sent batch; return True when the target answered none of it (stop sending)."""
        outcomes = sending.result()
        failpoint("sync:delivered")  # tests crash here: sent, the acknowledgement not recorded yet
        stats.sent += len(rows)
        retried = _record(factory, target, rows, outcomes, stats, on_applied, now)
        if retried == len(rows):
            stats.stopped = next((o.message for o in outcomes if o.message), "the target did not answer")
            return True
        return False

    trade_ids: list[str] = []  # issued by the target, not yet stored on a row
    unrecorded: list[tuple[list[dict[str, Any]], Future[Sequence[Delivered]]]] = []  # sent, oldest first
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sync-{target.name}") as sender:
        try:
            while True:
                sending_ids = [r["id"] for batch, _ in unrecorded for r in batch]
                rows = _next_batch(factory, target, client, stats, now, sending_ids, trade_ids)
                if rows:
                    deliveries = [make_delivery(r["trade_id"], r["operation"], r["payload"]) for r in rows]
                    unrecorded.append((rows, sender.submit(client.deliver, deliveries)))
                if len(unrecorded) > 1 or (unrecorded and not rows):
                    stopped = record(*unrecorded.pop(0))
                    if (
                        stopped
                    ):  # the target answers nothing: what is on the wire is recorded, no more is sent
                        while unrecorded:
                            record(*unrecorded.pop(0))
                        return stats
                if not rows and not unrecorded:
                    return stats
        except BaseException:
            # Whatever the target already answered is recorded before the error goes up (a resend would be
            # applied once anyway, by trade id); what has not been sent yet is not sent.
            for batch, sending in unrecorded:
                if sending.cancel() or sending.exception() is not None:
                    continue
                try:
                    record(batch, sending)
                except Exception:  # the first error is the one to report
                    break
            raise


def _next_batch(
    factory: Any, target: CompiledTarget, client: Transport, stats: DeliveryStats,
    now: Callable[[], dt.datetime], in_flight: list[int], trade_ids: list[str],
) -> list[dict[str, Any]]:  # fmt: skip
    """Return the next due rows (not those in flight), each with its trade id stored; [] when none or down.

    ``trade_ids`` holds ids issued by the target and not yet given to a row (taken from, refilled).
    """
    with factory() as session, session.begin():
        query = (
            select(OUTBOX)
            .where(OUTBOX.c.target == target.name, OUTBOX.c.status == "pending", OUTBOX.c.next_attempt_at <= now())
            .order_by(OUTBOX.c.id)
            .limit(target.spec.transport.batch_size)
        )  # fmt: skip
        if in_flight:
            query = query.where(OUTBOX.c.id.not_in(in_flight))
        # A record whose conflict waits for a person is not sent, even if it was queued before the conflict.
        conflicted = select(SyncConflict.id).where(
            SyncConflict.target == OUTBOX.c.target, SyncConflict.entity == OUTBOX.c.entity,
            SyncConflict.entity_id == OUTBOX.c.entity_id, SyncConflict.status == "open",
        )  # fmt: skip
        query = query.where(~conflicted.exists())
        rows = [dict(r) for r in session.execute(query).mappings()]
        missing = [r for r in rows if r["trade_id"] is None]
        if not missing:
            return rows
        if len(trade_ids) < len(missing):
            # Asked for many batches at once (one call), stored batch by batch: a row with a trade id is a
            # row that may have been sent.
            try:
                trade_ids.extend(client.new_trade_ids(max(TRADE_ID_PREFETCH, len(missing) - len(trade_ids))))
            except SyncError as exc:
                if not getattr(exc, "transient", False):
                    raise
                stats.stopped = str(exc)  # the target is down: the rows wait for the next run
                wait = getattr(exc, "retry_after", None)
                if wait:  # honour Retry-After: not before the target said
                    later = now() + dt.timedelta(seconds=float(wait))
                    session.execute(update(OUTBOX).where(OUTBOX.c.id.in_([r["id"] for r in rows]))
                                    .values(next_attempt_at=later))  # fmt: skip
                return []
        # Stored before the first send: a resend after a crash replays the same trade id.
        for row in missing:
            row["trade_id"] = trade_ids.pop(0)
        assigned = [{"_id": r["id"], "trade_id": r["trade_id"]} for r in missing]
        session.execute(
            update(OUTBOX).where(OUTBOX.c.id == bindparam("_id")).values(trade_id=bindparam("trade_id")),
            assigned,
        )
        return rows


def _poll_awaiting(
    factory: Any, target: CompiledTarget, client: Transport, stats: DeliveryStats,
    on_applied: Acknowledge, now: Callable[[], dt.datetime],
) -> None:  # fmt: skip
    with factory() as session:
        rows = [dict(r) for r in session.execute(
            select(OUTBOX).where(OUTBOX.c.target == target.name, OUTBOX.c.status == "awaiting").order_by(OUTBOX.c.id)
        ).mappings()]  # fmt: skip
    for start in range(0, len(rows), target.spec.transport.batch_size):
        part = rows[start : start + target.spec.transport.batch_size]
        outcomes = client.results([r["trade_id"] for r in part])
        _record(factory, target, part, outcomes, stats, on_applied, now)


def _record(
    factory: Any, target: CompiledTarget, rows: list[dict[str, Any]], outcomes: Sequence[Delivered],
    stats: DeliveryStats, on_applied: Acknowledge,
    now: Callable[[], dt.datetime],
) -> int:  # fmt: skip
    """Write the outcomes of one batch in one transaction; return how many must be retried."""
    policy = target.spec.retry
    retried = 0
    applied: list[dict[str, Any]] = []
    changes: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    with factory() as session, session.begin():
        for row, outcome in zip(rows, outcomes, strict=True):
            values: dict[str, Any]
            if outcome.status == "applied":
                values = {"status": "done", "delivered_at": now(), "last_error": None,
                          "external_key": outcome.external_key or row["external_key"]}  # fmt: skip
                applied.append({**row, **values})
                stats.applied += 1
            elif outcome.status == "pending":
                values = {"status": "awaiting"}
                stats.awaiting += 1
            elif outcome.status == "rejected":
                values = {"status": "dead", "last_error": outcome.message, "attempts": row["attempts"] + 1}
                stats.dead_letters += 1
                stats.errors.append(f"{row['entity']} {row['entity_id']}: {outcome.message}")
            else:
                attempts = row["attempts"] + 1
                retried += 1
                if attempts >= policy.max_attempts:
                    values = {"status": "dead", "attempts": attempts,
                              "last_error": f"{GAVE_UP} {attempts} tries: {outcome.message}"}  # fmt: skip
                    stats.dead_letters += 1
                else:
                    delay = backoff(attempts, policy, outcome.retry_after)
                    values = {"attempts": attempts, "last_error": outcome.message,
                              "next_attempt_at": now() + dt.timedelta(seconds=delay)}  # fmt: skip
                    stats.retries += 1
            changes.setdefault(tuple(sorted(values)), []).append({"_id": row["id"], **values})
        for names, group in changes.items():  # one executemany per shape of change
            statement = update(OUTBOX).where(OUTBOX.c.id == bindparam("_id"))
            session.execute(statement.values({n: bindparam(n) for n in names}), group)
        if applied:
            refused = on_applied(session, applied)
            for outbox_id, reason in refused.items():
                # The target applied it, but its answer cannot be recorded (e.g. the key it gave belongs to
                # another record): a person must look at both records.
                session.execute(
                    update(OUTBOX).where(OUTBOX.c.id == outbox_id).values(status="dead", last_error=reason)
                )
                stats.applied -= 1
                stats.dead_letters += 1
                stats.errors.append(reason)
    return retried


# --------------------------------------------------------------------------- status


def outbox_counts(session: Session, target: str | None = None) -> dict[str, dict[str, int]]:
    """Return outbox rows per target and status."""
    query = select(SyncOutbox.target, SyncOutbox.status, func.count()).group_by(
        SyncOutbox.target, SyncOutbox.status
    )
    if target is not None:
        query = query.where(SyncOutbox.target == target)
    counts: dict[str, dict[str, int]] = {}
    for name, status, count in session.execute(query):
        counts.setdefault(name, {})[status] = int(count)
    return counts


def oldest_pending(session: Session, target: str) -> dt.datetime | None:
    """Return when the oldest undelivered outbox row of ``target`` was captured."""
    value = session.scalar(
        select(func.min(SyncOutbox.created_at)).where(
            SyncOutbox.target == target, or_(SyncOutbox.status == "pending", SyncOutbox.status == "awaiting")
        )
    )
    if value is not None and value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value


def retry_dead(
    session: Session,
    target: str | None = None,
    ids: Sequence[int] = (),
    *,
    targets: Mapping[str, CompiledTarget] | None = None,
) -> int:
    """Queue dead letters again; return how many (resent as they are, or replaced by a fresh document).

    A dead letter whose record changed again since (a newer outbox row) is superseded: resending it would put
    older values over newer ones. With the compiled ``targets``, each record's document is built again from
    the record as it is now: the same document is resent with its trade id (attempts reset; the target
    applies it once), a different one (the record was fixed in the CRM) is queued as a new row that
    supersedes the dead letter; a record the target already holds as it is now has nothing to resend. A
    different document of a record whose dead letter is an add the target may have applied (never answered)
    waits for the next sync, which asks the target first (:func:`capture`'s ``settle``).
    """
    condition = [SyncOutbox.status == "dead"]
    if target is not None:
        condition.append(SyncOutbox.target == target)
    if ids:
        condition.append(SyncOutbox.id.in_(list(ids)))
    newer = aliased(SyncOutbox)
    newest = (
        select(func.max(newer.id))
        .where(newer.target == SyncOutbox.target, newer.entity == SyncOutbox.entity,
               newer.entity_id == SyncOutbox.entity_id, newer.id > SyncOutbox.id, newer.status != "superseded")
        .scalar_subquery()
    )  # fmt: skip
    dead = session.execute(
        select(SyncOutbox.id, SyncOutbox.target, SyncOutbox.entity, SyncOutbox.entity_id,
               SyncOutbox.payload_hash, SyncOutbox.last_error, newest.label("newer_id"))
        .where(and_(*condition)).order_by(SyncOutbox.id)
    ).all()  # fmt: skip
    overtaken = [r for r in dead if r.newer_id is not None]
    if overtaken:
        session.execute(
            update(OUTBOX).where(OUTBOX.c.id == bindparam("_id")).values(status="superseded", last_error=bindparam("why")),
            [{"_id": r.id, "why": f"superseded by outbox row {r.newer_id}, a newer change of the record "
              f"(was dead: {r.last_error or 'no reason recorded'})"} for r in overtaken],
        )  # fmt: skip
    resend = [r.id for r in dead if r.newer_id is None]
    rebuilt = 0
    groups: dict[tuple[str, str], list[Any]] = {}
    for r in dead:
        if r.newer_id is None and targets is not None and r.target in targets:
            groups.setdefault((r.target, r.entity), []).append(r)
    for (name, entity), rows in groups.items():
        compiled = targets[name] if targets is not None else None
        sync = compiled.entities.get(entity) if compiled is not None else None
        if compiled is None or sync is None or not sync.outbound_enabled:
            continue
        now = {d.entity_id: d for d in build_documents(session, compiled, sync, [r.entity_id for r in rows])}
        changed = set()
        for r in rows:
            document = now.get(r.entity_id)
            if document is None or document.problem is not None or document.operation is None:
                changed.add(r.entity_id)  # no document as it was: capture decides (wait, nothing to send)
            elif payload_hash({"operation": document.operation, **document.payload}) != r.payload_hash:
                changed.add(r.entity_id)
        if not changed:
            continue
        _queue_records(session, compiled, sync, changed, None, CaptureStats())
        replaced = {r.id for r in rows if r.entity_id in changed}
        still_dead = set(session.scalars(
            select(SyncOutbox.id).where(SyncOutbox.id.in_(sorted(replaced)), SyncOutbox.status == "dead")
        ))  # fmt: skip
        # Held back (a conflict, a merge) or never queued: the dead letter stays for a person to look at. An add
        # in doubt stays too, its record's document queued to wait until the next sync asks the target about it.
        asking = set(session.scalars(select(SyncOutbox.entity_id).where(
            SyncOutbox.target == name, SyncOutbox.entity == entity, SyncOutbox.status == "waiting",
            SyncOutbox.entity_id.in_(sorted(changed)), SyncOutbox.last_error.like(f"{ASK_NEXT_SYNC} %"),
        )))  # fmt: skip
        rebuilt += len(replaced - still_dead) + sum(
            r.id in still_dead and r.entity_id in asking for r in rows
        )
        resend = [i for i in resend if i not in replaced]
    if resend:
        session.execute(
            update(SyncOutbox)
            .where(SyncOutbox.id.in_(resend))
            .values(status="pending", attempts=0, next_attempt_at=_utcnow())
        )
    return len(resend) + rebuilt


DISCARDED = "discarded"


def discard_dead(session: Session, ids: Sequence[int], *, by: str, reason: str | None = None) -> int:
    """Give dead letters up on purpose: status ``discarded``, who and why put before the target's message.

    Only dead letters can be discarded (a row still to be sent is not one's to drop); return how many.
    """
    if not by or not by.strip():
        raise SyncError("say who discards the dead letters (--by NAME): it is recorded with them")
    wanted = sorted(set(ids))
    if not wanted:
        raise SyncError(
            "name the dead letters to discard by their outbox ids (`crmi sync status` lists them)"
        )
    rows = {
        r.id: r
        for r in session.execute(
            select(SyncOutbox.id, SyncOutbox.status, SyncOutbox.last_error).where(SyncOutbox.id.in_(wanted))
        )
    }
    wrong = [
        f"outbox row {i} is not a dead letter ({rows[i].status})"
        if i in rows
        else f"there is no outbox row {i}"
        for i in wanted
        if i not in rows or rows[i].status != "dead"
    ]
    if wrong:
        raise SyncError("; ".join(wrong) + "; nothing was discarded")
    when = f"{_utcnow():%Y-%m-%d %H:%M} UTC"
    why = f": {reason.strip()}" if reason and reason.strip() else ""
    session.execute(
        update(OUTBOX).where(OUTBOX.c.id == bindparam("_id")).values(status=DISCARDED, last_error=bindparam("why")),
        [{"_id": i, "why": f"discarded by {by.strip()} at {when}{why} (was dead: {rows[i].last_error or 'no reason recorded'})"}
         for i in wanted],
    )  # fmt: skip
    return len(wanted)
