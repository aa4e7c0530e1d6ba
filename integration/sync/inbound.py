"""Inbound: the target's changed rows through the migration's mapping engine, ownership, and the loader.

A sync reads each inbound mapping from its cursor (U8: ``ufts``), maps and validates the rows exactly as a
migration does, and loads them with the same loader and journal, so every row is applied, unchanged or
rejected with its reason, and a sync run can be rolled back like any run. Before the load, each row of a
record the core already has is checked field by field against what the record and the target last
exchanged (``sync_state.core_values``):

- the target changed a field the CRM did not: its value is applied (unless the CRM owns the field: then the
  CRM's value is kept and sent back, so both sides hold the owner's value);
- both changed it differently: a **conflict**. With an owner, the owner's value wins and the conflict is
  logged (resolved); without one, or with ``conflicts: queue``, the CRM's value stays and the conflict
  waits for a person (``crmi sync conflicts``);
- an open conflict on a field the target owns (a CRM edit forced over its ownership, ``crmi edit --force-owned``)
  is settled (``resolved_target``) once the target's value is applied or equals the CRM's (not with
  ``conflicts: queue``: there a person decides every conflict).

A record read for the first time starts from the core as the capture cursor left it (go-live, with
``start: now``): where the target differs from that, a field the target owns takes its value and any other
field the document sends, or nobody owns, becomes an open conflict (the ERP is never overwritten unasked, nor
the core's cleaned or golden value replaced unseen). What is recorded
as exchanged is what the target holds, and a record with a CRM change not sent yet is not recorded as agreed.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd
from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.orm import Session

from crm_core.entities import ENTITIES
from crm_core.journal import ids_in, insert_entry, to_json, update_entry, write_journal
from crm_core.loading import Batch, crosswalk_ids
from crm_core.models import LoadRun, SyncConflict, SyncState
from integration.mappings.engine import EXTERNAL_KEY
from integration.mappings.spec import CompiledMapping, IncrementalSpec
from integration.sync.spec import CRM, CompiledEntitySync, CompiledTarget, InboundSpec

STATE: Table = SyncState.__table__  # type: ignore[assignment]
CONFLICTS: Table = SyncConflict.__table__  # type: ignore[assignment]


@dataclass
class OwnershipOutcome:
    """What the ownership check did to one batch."""

    batch: Batch
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    send_back: set[int] = field(default_factory=set)  # records whose CRM-owned values go back to the target
    kept_crm: int = 0  # field values of the target not applied (the CRM's value stays)
    # Records with a CRM change not delivered yet (not captured, or its document not sent): not agreed.
    unsent: set[int] = field(default_factory=set)
    # Per record, the target's values of the fields where the CRM's value stayed: what the target holds.
    target_values: dict[int, dict[str, Any]] = field(default_factory=dict)


def with_cursor(mapping: CompiledMapping, inbound: InboundSpec) -> CompiledMapping:
    """Return the mapping reading incrementally by the sync's cursor column (the mapping's own if none)."""
    if inbound.cursor is None:
        return mapping
    source = mapping.spec.source.model_copy(update={"incremental": IncrementalSpec(cursor=inbound.cursor)})
    return replace(mapping, spec=mapping.spec.model_copy(update={"source": source}))


def _same(left: Any, right: Any) -> bool:
    return bool(_comparable(left) == _comparable(right))


def _comparable(value: Any) -> Any:
    if value is None or (not isinstance(value, str | list | dict) and pd.isna(value)):
        return None
    value = to_json(value)
    if isinstance(value, str):
        # Decimals and numbers as text: 12.50 and 12.5 are the same amount.
        try:
            from decimal import Decimal, InvalidOperation

            return ("n", Decimal(value).normalize())
        except (InvalidOperation, ValueError):
            return value.strip()
    return value


def apply_ownership(
    session: Session, target: CompiledTarget, sync: CompiledEntitySync, batch: Batch, run_id: int
) -> OwnershipOutcome:
    """Keep the CRM's values where ownership or an open conflict says so; record conflicts."""
    outcome = OwnershipOutcome(batch)
    records = batch.records
    definition = ENTITIES[sync.entity]
    fields = [f for f in batch.fields if f in definition.fields and not definition.fields[f].references]
    if records.empty or not fields:
        return outcome
    keys = records[EXTERNAL_KEY].astype(str).tolist()
    ids = crosswalk_ids(session, sync.entity, batch.source, keys)
    known = sorted({i for i in ids.values()})
    if not known:
        return outcome
    table: Table = definition.model.__table__  # type: ignore[assignment]
    connection = session.connection()
    core: dict[int, dict[str, Any]] = {}
    states: dict[int, dict[str, Any]] = {}
    for start in range(0, len(known), 2000):
        part = known[start : start + 2000]
        for row in session.execute(select(table).where(ids_in(connection, table.c.id, part))).mappings():
            core[row["id"]] = dict(row)
        query = select(STATE.c.entity_id, STATE.c.core_values).where(
            STATE.c.target == target.name,
            STATE.c.entity == sync.entity,
            ids_in(connection, STATE.c.entity_id, part),
        )
        states.update({entity_id: values or {} for entity_id, values in session.execute(query)})
    outcome.unsent = unsent_changes(session, target, sync.entity, known, run_id)
    # A record never exchanged yet (the first sync): both sides start from the core as the capture cursor
    # left it, i.e. before the CRM's changes since then (which go out with this sync).
    # (A record the CRM's edits were sent for, but whose row the target never sent, has only those fields.)
    at_cursor = values_at_cursor(session, target, sync.entity, sorted(outcome.unsent))
    baseline = target.spec.start == "now"
    go_live = go_live_run(session, target) if baseline else 0
    sendable = sent_fields(sync)
    queue_all = sync.spec.conflicts == "queue"
    # Open conflicts on fields the target owns (a CRM edit forced over its ownership): settled by the target's
    # value once it comes in, or once both sides hold the same value.
    forced = set() if queue_all else _open_owned_conflicts(session, target, sync, known, fields)
    settled: dict[str, set[int]] = {}
    records = records.copy()
    now = dt.datetime.now(dt.UTC)
    for position, key in enumerate(keys):
        entity_id = ids.get(key)
        if entity_id is None or entity_id not in core:
            continue
        current = core[entity_id]
        exchanged = states.get(entity_id)
        for name in fields:
            column = definition.fields[name].column
            theirs = records.at[position, name]
            ours = current.get(column)
            if _same(theirs, ours):
                if (entity_id, name) in forced:
                    settled.setdefault(name, set()).add(entity_id)
                continue
            if exchanged is not None and name in exchanged:
                before = exchanged[name]
            else:  # no exchange yet: the core's value at the capture cursor is where both sides start
                before = at_cursor.get(entity_id, {}).get(column, to_json(ours))
            they_changed = not _same(theirs, before)
            we_changed = not _same(ours, before)
            owner = sync.owners.get(name)
            keep_ours = False
            # A field not exchanged yet of a record go-live left (its first sync sent only the CRM's edits)
            first_read = exchanged is None or (
                name not in exchanged and (current.get("created_run_id") or 0) <= go_live
            )
            differs_at_start = baseline and first_read and they_changed and not we_changed
            unsent_unowned = owner is None and name not in sendable
            if differs_at_start and unsent_unowned and _comparable(theirs) is None:
                # The target has nothing where the core has a value (a merge filled it from another
                # source): nothing to decide. Its empty is what was exchanged; the core's value stays.
                outcome.target_values.setdefault(entity_id, {})[name] = None
                continue
            if differs_at_start and owner != target.name and (name in sendable or unsent_unowned):
                # The target differs from the core as go-live left it (the migration cleaned the value, a
                # steward merged, or the target changed it since the extract): nobody knows which side is
                # right. Sending the CRM's value would overwrite the ERP unasked, and taking the ERP's raw
                # value would undo the migration's or the steward's work unseen: a person decides.
                outcome.conflicts.append({
                    "target": target.name, "entity": sync.entity, "entity_id": entity_id, "field": name,
                    "exchanged_value": _text(before), "crm_value": _text(ours), "target_value": _text(theirs),
                    "owner": owner, "status": "open", "load_run_id": run_id, "created_at": now,
                })  # fmt: skip
                keep_ours = True
            elif they_changed and we_changed:
                status = "open" if queue_all or owner is None else (
                    "resolved_crm" if owner == CRM else "resolved_target")  # fmt: skip
                outcome.conflicts.append({
                    "target": target.name, "entity": sync.entity, "entity_id": entity_id, "field": name,
                    "exchanged_value": _text(before), "crm_value": _text(ours), "target_value": _text(theirs),
                    "owner": owner, "status": status, "load_run_id": run_id, "created_at": now,
                })  # fmt: skip
                keep_ours = status in ("open", "resolved_crm")
            elif they_changed:
                keep_ours = owner == CRM
            else:
                keep_ours = True  # only the CRM changed it: its value stays (and goes out on its own)
            if not keep_ours and they_changed and (entity_id, name) in forced:
                settled.setdefault(name, set()).add(entity_id)  # the owner's new value is applied
            if keep_ours:
                records.at[position, name] = ours
                outcome.kept_crm += 1
                # What is agreed is what the target holds: the CRM's value is not there yet.
                outcome.target_values.setdefault(entity_id, {})[name] = to_json(theirs)
                # Only what a document carries goes back: a field no outbound field sends, or an empty value
                # (left out of the document), would not change the target, whose row would come back changed.
                if owner == CRM and they_changed and name in sendable and _comparable(ours) is not None:
                    outcome.send_back.add(entity_id)
    if outcome.conflicts:
        session.execute(insert(SyncConflict), outcome.conflicts)
    for name, settled_ids in settled.items():
        for start in range(0, len(settled_ids), 2000):
            part = sorted(settled_ids)[start : start + 2000]
            session.execute(update(CONFLICTS).where(
                CONFLICTS.c.target == target.name, CONFLICTS.c.entity == sync.entity, CONFLICTS.c.field == name,
                CONFLICTS.c.status == "open", ids_in(connection, CONFLICTS.c.entity_id, part),
            ).values(status="resolved_target"))  # fmt: skip
    outcome.batch = replace(batch, records=records)
    return outcome


def _open_owned_conflicts(
    session: Session,
    target: CompiledTarget,
    sync: CompiledEntitySync,
    ids: Sequence[int],
    fields: Sequence[str],
) -> set[tuple[int, str]]:
    """Return (record, field) of the open conflicts among ``ids`` on fields the target owns."""
    owned = [f for f in fields if sync.owners.get(f) == target.name]
    if not owned:
        return set()
    connection = session.connection()
    found: set[tuple[int, str]] = set()
    for start in range(0, len(ids), 2000):
        query = select(CONFLICTS.c.entity_id, CONFLICTS.c.field).where(
            CONFLICTS.c.target == target.name, CONFLICTS.c.entity == sync.entity, CONFLICTS.c.status == "open",
            CONFLICTS.c.field.in_(owned), ids_in(connection, CONFLICTS.c.entity_id, ids[start : start + 2000]),
        )  # fmt: skip
        found.update((int(entity_id), str(name)) for entity_id, name in session.execute(query))
    return found


def go_live_run(session: Session, target: CompiledTarget) -> int:
    """Return the run the target's first sync took as go-live (see :func:`integration.sync.outbox.go_live_run`)."""
    from integration.sync.outbox import go_live_run as from_watermark

    return from_watermark(session, target)


def sent_fields(sync: CompiledEntitySync) -> set[str]:
    """Return the record's own fields its outbound document carries (none when nothing goes out)."""
    if not sync.outbound_enabled or sync.outbound is None:
        return set()
    fields = ENTITIES[sync.entity].fields
    return {name for reads in sync.outbound.reads.values() for name in reads if name in fields}


def values_at_cursor(
    session: Session, target: CompiledTarget, entity: str, ids: Sequence[int]
) -> dict[int, dict[str, Any]]:
    """Return, per record, the columns a CRM edit changed after the capture cursor, as they were before the
    first such edit (the journal's before-images); a column not edited since is not in it.

    Only CRM edits count: a steward's merge or a dedup run since go-live is part of what go-live left (where
    the target differs from it, a person decides), not a change of the CRM's to send.
    """
    return values_before_edits(session, entity, ids, _capture_cursor(session, target))


def values_before_edits(
    session: Session, entity: str, ids: Sequence[int], after_run: int
) -> dict[int, dict[str, Any]]:
    """Return, per record, the columns a CRM edit (a committed run after ``after_run``) changed, as they were
    before the first such edit (the journal's before-images).

    A before-image holds the whole row: what an edit changed is where it differs from the row after it (the
    next change's before-image, or the row as it is now), so a column another run changed later is not taken
    for an edit of the CRM's.
    """
    from crm_core.journal import row_key
    from crm_core.models import RowChange
    from crm_core.runs import COMMITTED
    from integration.sync.outbox import CRM_EDIT_MODE

    if not ids:
        return {}
    table: Table = ENTITIES[entity].model.__table__  # type: ignore[assignment]
    keys = {row_key(table, {"id": i}): i for i in ids}
    journal: Table = RowChange.__table__  # type: ignore[assignment]
    connection = session.connection()
    found: dict[int, dict[str, Any]] = {}
    ordered = sorted(keys)
    for start in range(0, len(ordered), 2000):
        part = ordered[start : start + 2000]
        query = (
            select(journal.c.row_key, journal.c.before, LoadRun.mode)
            .join(LoadRun, LoadRun.id == journal.c.load_run_id)
            .where(
                journal.c.table_name == table.name, journal.c.operation == "update", LoadRun.id > after_run,
                LoadRun.status.in_(COMMITTED), ids_in(connection, journal.c.row_key, part),
            )
            .order_by(journal.c.id)
        )  # fmt: skip
        changes: dict[int, list[tuple[dict[str, Any], str]]] = {}
        for key, before, mode in session.execute(query):
            changes.setdefault(keys[key], []).append((before or {}, mode))
        edited = [i for i, entries in changes.items() if any(mode == CRM_EDIT_MODE for _, mode in entries)]
        now: dict[int, dict[str, Any]] = {}
        if edited:
            rows = session.execute(select(table).where(ids_in(connection, table.c.id, sorted(edited))))
            now = {row["id"]: {c: to_json(v) for c, v in row.items()} for row in rows.mappings()}
        for entity_id in edited:
            entries = changes[entity_id]
            images = [before for before, _ in entries[1:]] + [now.get(entity_id, {})]
            for (before, mode), after in zip(entries, images, strict=True):
                if mode != CRM_EDIT_MODE:
                    continue
                values = found.setdefault(entity_id, {})
                for column, value in before.items():
                    if column in after and not _same(value, after[column]):
                        values.setdefault(column, value)
    return found


def _capture_cursor(session: Session, target: CompiledTarget) -> int:
    from crm_core.watermarks import read_watermark
    from integration.sync.outbox import CAPTURE_STREAM, watermark_source

    state = read_watermark(session, watermark_source(target.name), CAPTURE_STREAM)
    return int(state.value) if state is not None else 0


def unsent_changes(
    session: Session, target: CompiledTarget, entity: str, ids: Sequence[int], own_run_id: int
) -> set[int]:
    """Return the records among ``ids`` with a CRM change the target has not been sent yet.

    Those are the records changed by a run after the capture cursor (not captured yet) and those with a
    document in the outbox not delivered yet. An inbound row of such a record must not be recorded as
    agreeing with the core: the loader may stamp the record with the sync's run, and the change would then
    be taken for the sync's own echo and never sent.
    """
    from integration.sync.outbox import OUTBOX, target_sync_runs

    cursor = _capture_cursor(session, target)
    table: Table = ENTITIES[entity].model.__table__  # type: ignore[assignment]
    connection = session.connection()
    # This target's own sync runs wrote what it sent or acknowledged: no change of the CRM's.
    changes = select(LoadRun.id).where(
        LoadRun.id > cursor, LoadRun.id != own_run_id, ~target_sync_runs(target.name)
    )
    found: set[int] = set()
    ordered = sorted(set(ids))
    for start in range(0, len(ordered), 2000):
        part = ordered[start : start + 2000]
        found.update(session.scalars(select(table.c.id).where(
            ids_in(connection, table.c.id, part), table.c.updated_run_id > cursor,
            table.c.updated_run_id.in_(changes),
        )))  # fmt: skip
        found.update(session.scalars(select(OUTBOX.c.entity_id).where(
            OUTBOX.c.target == target.name, OUTBOX.c.entity == entity,
            OUTBOX.c.status.in_(("pending", "waiting", "awaiting")), ids_in(connection, OUTBOX.c.entity_id, part),
        )))  # fmt: skip
    return found


def _text(value: Any) -> str | None:
    value = to_json(value)
    if value is None or (not isinstance(value, str | list | dict) and pd.isna(value)):
        return None
    return str(value)


def record_exchange(
    session: Session,
    target: CompiledTarget,
    entity: str,
    values: Mapping[int, Mapping[str, Any]],
    *,
    external_keys: Mapping[int, str | None] | None = None,
    payload_hashes: Mapping[int, str | None] | None = None,
    run_id: int | None,
    journaled: bool = False,
) -> None:
    """Record what a record and the target now agree on (upsert of ``sync_state``, merged per field).

    ``journaled``: the change goes into run ``run_id``'s journal, so undoing the run (a sync that fails after
    its inbound load) restores ``sync_state`` with the values it undoes; otherwise the state would claim the
    target and the record agree on values the core no longer holds.
    """
    if not values:
        return
    connection = session.connection()
    ids = sorted(values)
    existing: dict[int, dict[str, Any]] = {}
    for start in range(0, len(ids), 2000):
        part = ids[start : start + 2000]
        query = select(STATE).where(
            STATE.c.target == target.name,
            STATE.c.entity == entity,
            ids_in(connection, STATE.c.entity_id, part),
        )
        existing.update({r["entity_id"]: dict(r) for r in session.execute(query).mappings()})
    now = dt.datetime.now(dt.UTC)
    inserts: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    for entity_id in ids:
        merged = {**(existing.get(entity_id, {}).get("core_values") or {}),
                  **{k: to_json(v) for k, v in values[entity_id].items()}}  # fmt: skip
        row = {
            "core_values": merged, "load_run_id": run_id, "updated_at": now,
            **({"external_key": external_keys[entity_id]}
               if external_keys and external_keys.get(entity_id) is not None else {}),
            **({"payload_hash": payload_hashes[entity_id]}
               if payload_hashes is not None and entity_id in payload_hashes else {}),
        }  # fmt: skip
        if entity_id in existing:
            updates.append({"_entity_id": entity_id, "payload_hash": existing[entity_id]["payload_hash"],
                            "external_key": existing[entity_id]["external_key"], **row})  # fmt: skip
        else:
            inserts.append({"target": target.name, "entity": entity, "entity_id": entity_id,
                            "external_key": None, "payload_hash": None, **row})  # fmt: skip
    if journaled and run_id is not None:
        changed = ("core_values", "load_run_id", "updated_at", "external_key", "payload_hash")
        write_journal(connection, [
            *(insert_entry(run_id, STATE, row) for row in inserts),
            *(update_entry(run_id, STATE, {"target": target.name, "entity": entity, "entity_id": row["_entity_id"]},
                           {name: existing[row["_entity_id"]][name] for name in changed},
                           {name: row[name] for name in changed})
              for row in updates),
        ])  # fmt: skip
    if updates:
        statement = (
            STATE.update()
            .where(
                STATE.c.target == target.name,
                STATE.c.entity == entity,
                STATE.c.entity_id == bindparam("_entity_id"),
            )
            .values(
                {
                    name: bindparam(name)
                    for name in ("core_values", "load_run_id", "updated_at", "external_key", "payload_hash")
                }
            )
        )
        session.execute(statement, updates)
    if inserts:
        session.execute(STATE.insert(), inserts)


def loaded_values(
    session: Session, entity: str, system: str, batch: Batch, fields: Sequence[str]
) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
    """Return, per core record a batch's rows landed on, the core's current values of ``fields``."""
    definition = ENTITIES[entity]
    keys = batch.records[EXTERNAL_KEY].astype(str).tolist() if not batch.records.empty else []
    ids = crosswalk_ids(session, entity, system, keys)
    table: Table = definition.model.__table__  # type: ignore[assignment]
    connection = session.connection()
    found: dict[int, dict[str, Any]] = {}
    wanted = sorted(set(ids.values()))
    columns = [f for f in fields if f in definition.fields and not definition.fields[f].references]
    for start in range(0, len(wanted), 2000):
        part = wanted[start : start + 2000]
        for row in session.execute(select(table).where(ids_in(connection, table.c.id, part))).mappings():
            found[row["id"]] = {f: row[definition.fields[f].column] for f in columns}
    keys_by_id = {entity_id: key for key, entity_id in ids.items()}
    return found, keys_by_id
