"""Merging duplicate customers into a golden record, logged so each merge can be undone exactly.

A merge keeps the survivor's values and fills its blanks from the merged record (a valid credit code is
never replaced, an invalid one gives way to a valid one); per-field survivorship rules (most recent, most
complete, most frequent across the cluster) override that for the fields they name. It marks the merged
record ``merged_into_id``,
re-points everything that referenced it (contacts, opportunities, orders, receivables, payments, branches)
and its crosswalk entries to the survivor. All of it goes through the ORM inside a journaled load run, so
the ``merge_log`` entry can name the journal entries that undo exactly this merge.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session
from stdnum.cn import uscc

from crm_core.errors import DedupError
from crm_core.models import Base, Contact, Customer, ExternalId, LoadRun, MatchCandidate, MergeLog, RowChange
from crm_core.runs import replay

_SKIPPED = frozenset({"id", "merged_into_id", "created_run_id", "updated_run_id", "created_at", "updated_at"})
MODEL_OF: dict[str, type[Customer] | type[Contact]] = {"customer": Customer, "contact": Contact}
ENTITY_OF: dict[type[Base], str] = {model: entity for entity, model in MODEL_OF.items()}
SurvivorshipRule = Literal["source_priority", "most_recent", "most_complete", "most_frequent"]
# Fields a survivorship rule may name: the customer's own attributes (not keys, links or bookkeeping).
SURVIVORSHIP_FIELDS = tuple(
    c.key for c in Customer.__table__.columns if c.key not in _SKIPPED | {"parent_id", "name_normalized"}
)


def _valid_code(value: str | None) -> bool:
    return value is not None and bool(uscc.is_valid(value))


def _references_to(model: type[Base]) -> list[tuple[type[Base], str]]:
    """Return (model, column) pairs whose foreign key points at ``model`` (merge pointers excluded)."""
    table = model.__table__
    found = []
    for mapper in Base.registry.mappers:
        for column in mapper.local_table.columns:
            if column.name == "merged_into_id":
                continue
            if any(fk.column.table is table for fk in column.foreign_keys):
                found.append((mapper.class_, column.name))
    return found


def choose_survivor(session: Session, ids: Sequence[int], source_priority: Sequence[str] = ()) -> int:
    """Pick the golden record of a cluster: created by the highest-priority source, then most complete."""
    return rank_members(session, ids, source_priority)[0]


def rank_members(session: Session, ids: Sequence[int], source_priority: Sequence[str] = ()) -> list[int]:
    """Order a cluster best first: created by the highest-priority source, then most complete, then oldest."""
    creators = dict(session.execute(
        select(ExternalId.entity_id, func.min(ExternalId.system)).where(
            ExternalId.entity == "customer", ExternalId.entity_id.in_(ids), ExternalId.match_method == "created"
        ).group_by(ExternalId.entity_id)
    ).all())  # fmt: skip

    def rank(customer_id: int) -> tuple[int, int, int]:
        record = session.get(Customer, customer_id)
        assert record is not None
        system = creators.get(customer_id)
        priority = source_priority.index(system) if system in source_priority else len(source_priority)
        filled = sum(
            getattr(record, c.key) is not None for c in Customer.__table__.columns if c.key not in _SKIPPED
        )
        return (priority, -filled, customer_id)

    return sorted(ids, key=rank)


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def golden_values(
    session: Session, ranked_ids: Sequence[int], rules: Mapping[str, SurvivorshipRule]
) -> dict[str, Any]:
    """Return the value each ruled field takes on the golden record of a cluster (ranked best first).

    ``source_priority``: the best-ranked member's non-empty value; ``most_recent``: the value of the member
    whose source row changed last (crosswalk sync time); ``most_complete``: the longest value;
    ``most_frequent``: the commonest value. Ties go to the better-ranked member; a valid credit code is
    never replaced by an invalid one.
    """
    members = [session.get(Customer, i) for i in ranked_ids]
    synced = dict(session.execute(
        select(ExternalId.entity_id, func.max(ExternalId.last_synced_at)).where(
            ExternalId.entity == "customer", ExternalId.entity_id.in_(ranked_ids)
        ).group_by(ExternalId.entity_id)
    ).all())  # fmt: skip
    epoch = dt.datetime.min.replace(tzinfo=dt.UTC)

    def changed(member: Customer) -> dt.datetime:
        stamp = synced.get(member.id) or member.updated_at
        return stamp.replace(tzinfo=dt.UTC) if stamp and stamp.tzinfo is None else stamp or epoch

    chosen: dict[str, Any] = {}
    for field, rule in rules.items():
        filled = [(rank, m, getattr(m, field)) for rank, m in enumerate(members) if m is not None]
        filled = [(rank, m, v) for rank, m, v in filled if not _blank(v)]
        if not filled:
            continue
        if rule == "most_recent":
            value = max(filled, key=lambda f: (changed(f[1]), -f[0]))[2]
        elif rule == "most_complete":
            value = max(filled, key=lambda f: (len(str(f[2]).strip()), -f[0]))[2]
        elif rule == "most_frequent":
            counts = Counter(v for _, _, v in filled)
            value = max(filled, key=lambda f: (counts[f[2]], -f[0]))[2]
        else:
            value = filled[0][2]
        if field == "credit_code" and not _valid_code(value):
            value = next((v for _, _, v in filled if _valid_code(v)), value)
        chosen[field] = value
    return chosen


def merge_records(
    session: Session,
    run: LoadRun,
    model: type[Customer] | type[Contact],
    survivor_id: int,
    merged_ids: Sequence[int],
    *,
    probability: float | None,
    reason: str,
    decided_by: str,
    golden: Mapping[str, Any] | None = None,
) -> list[MergeLog]:
    """Merge records of ``model`` (customers or contacts) inside the run's journaled session; return the log entries.

    Blanks of the survivor fill from the merged records; references and crosswalk entries are re-pointed.
    ``golden`` (from :func:`golden_values`) sets survivorship-ruled fields; it is applied with the first
    merge, so undoing that merge restores the survivor's own values.
    """
    entity = ENTITY_OF[model]
    survivor: Any = session.get(model, survivor_id)
    if survivor is None or survivor.merged_into_id is not None:
        raise DedupError(f"{entity} {survivor_id} is not an active {entity}; it cannot survive a merge")
    logs: list[MergeLog] = []
    for merged_id in merged_ids:
        merged: Any = session.get(model, merged_id)
        if merged is None or merged.merged_into_id is not None or merged_id == survivor_id:
            raise DedupError(f"{entity} {merged_id} is not an active {entity} other than {survivor_id}")
        session.flush()
        first = (session.scalar(select(func.max(RowChange.id))) or 0) + 1
        for attribute in model.__table__.columns:
            name = attribute.key
            if name in _SKIPPED or name in ("parent_id", "customer_id"):
                continue
            mine, theirs = getattr(survivor, name), getattr(merged, name)
            if name == "credit_code":
                if theirs and _valid_code(theirs) and not _valid_code(mine):
                    survivor.credit_code = theirs
            elif mine is None and theirs is not None:
                setattr(survivor, name, theirs)
        if golden and not logs:
            for name, value in golden.items():
                if getattr(survivor, name) != value:
                    setattr(survivor, name, value)
        survivor.updated_run_id = run.id
        merged.merged_into_id = survivor.id
        merged.updated_run_id = run.id
        for referrer, column_name in _references_to(model):
            column: Any = getattr(referrer, column_name)
            for row in session.scalars(select(referrer).where(column == merged_id)):
                if row is not survivor:
                    setattr(row, column_name, survivor.id)
        for entry in session.scalars(
            select(ExternalId).where(ExternalId.entity == entity, ExternalId.entity_id == merged_id)
        ):
            entry.entity_id = survivor.id
            entry.match_method = f"linked:{merged_id}"
            entry.updated_run_id = run.id
        session.flush()
        last = session.scalar(select(func.max(RowChange.id)))
        log = MergeLog(entity=entity, survivor_id=survivor.id, merged_id=merged_id, probability=probability,
                       reason=reason, decided_by=decided_by, load_run_id=run.id,
                       first_change_id=first, last_change_id=last)  # fmt: skip
        session.add(log)
        logs.append(log)
    session.flush()
    return logs


def undo_merge(session: Session, log_id: int, decided_by: str) -> MergeLog:
    """Undo one merge exactly from its journal entries; refuse if later changes touched the same rows.

    The pair is then marked ``distinct`` (a steward said these are different), so it is not proposed again.
    """
    log = session.get(MergeLog, log_id)
    if log is None:
        raise DedupError(f"no merge {log_id}; `crmi dedup merges` lists them")
    if log.undone_at is not None:
        raise DedupError(f"merge {log_id} was already undone at {log.undone_at:%Y-%m-%d %H:%M}")
    mine = and_(RowChange.id >= log.first_change_id, RowChange.id <= log.last_change_id)
    touched = {
        (t, k) for t, k in session.execute(select(RowChange.table_name, RowChange.row_key).where(mine))
    }
    later = session.execute(
        select(RowChange.table_name, RowChange.row_key).where(RowChange.id > log.last_change_id)
    ).all()
    conflicts = sorted({f"{t} {json.loads(k)}" for t, k in later if (t, k) in touched})
    if conflicts:
        raise DedupError(
            f"merge {log_id} cannot be undone exactly: later changes touched {', '.join(conflicts[:5])}; "
            "roll back the later runs first"
        )
    replay(session, mine)
    log.undone_at = dt.datetime.now(dt.UTC)
    left, right = sorted((log.survivor_id, log.merged_id))
    candidate = session.scalar(select(MatchCandidate).where(
        MatchCandidate.entity == log.entity, MatchCandidate.left_id == left, MatchCandidate.right_id == right
    ))  # fmt: skip
    if candidate is None:
        candidate = MatchCandidate(
            entity=log.entity, left_id=left, right_id=right, probability=log.probability or 0.0
        )
        session.add(candidate)
    candidate.status = "distinct"
    candidate.decided_by = decided_by
    candidate.decided_at = dt.datetime.now(dt.UTC)
    session.flush()
    return log


def decided_pairs(session: Session, entity: str, status: str) -> set[tuple[int, int]]:
    """Return the (left, right) pairs a steward or an earlier run decided with ``status``."""
    rows = session.execute(
        select(MatchCandidate.left_id, MatchCandidate.right_id).where(
            MatchCandidate.entity == entity, MatchCandidate.status == status
        )
    )
    return {(left, right) for left, right in rows}


def record_candidates(
    session: Session,
    run: LoadRun,
    entity: str,
    scored: Mapping[tuple[int, int], tuple[float, dict[str, Any], str]],
) -> int:
    """Upsert scored pairs as candidates; decisions already made (merged, distinct) are kept. Returns new ones."""
    existing = {
        (c.left_id, c.right_id): c
        for c in session.scalars(select(MatchCandidate).where(MatchCandidate.entity == entity, or_(
            *(and_(MatchCandidate.left_id == a, MatchCandidate.right_id == b) for a, b in scored)
        )))
    } if scored else {}  # fmt: skip
    added = 0
    for (left, right), (probability, features, status) in scored.items():
        candidate = existing.get((left, right))
        if candidate is None:
            session.add(MatchCandidate(entity=entity, left_id=left, right_id=right, probability=probability,
                                       features=features, status=status, load_run_id=run.id,
                                       decided_by="linkage" if status == "merged" else None,
                                       decided_at=dt.datetime.now(dt.UTC) if status == "merged" else None))  # fmt: skip
            added += 1
        elif candidate.status == "review":
            candidate.probability, candidate.features = probability, features
    session.flush()
    return added


def changed_in_run(session: Session, model: type[Customer] | type[Contact], run_key: str) -> list[int]:
    """Return the active records of ``model`` that load run ``run_key`` created or changed (a delta run's focus)."""
    run_id = session.scalar(select(LoadRun.id).where(LoadRun.run_key == run_key))
    if run_id is None:
        return []
    touched = or_(model.created_run_id == run_id, model.updated_run_id == run_id)
    if model is Contact:  # contacts of a customer the run changed (merged into it, say) meet new siblings
        customers = select(Customer.id).where(
            or_(Customer.created_run_id == run_id, Customer.updated_run_id == run_id)
        )
        touched = or_(touched, Contact.customer_id.in_(customers))
    return [int(i) for i in session.scalars(select(model.id).where(model.merged_into_id.is_(None), touched))]
