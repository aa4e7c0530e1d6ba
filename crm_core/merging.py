"""Merging duplicate records into a golden record, journaled so that any single merge can be undone exactly.

A merge keeps the survivor's values and fills its blanks from the merged record (a valid credit code is
never replaced, an invalid one gives way to a valid one); per-field survivorship rules (most recent, most
complete, most frequent across the cluster) override that for the fields they name. It marks the merged
record ``merged_into_id``, re-points everything that referenced it (contacts, opportunities, orders,
receivables, payments, branches) and its crosswalk entries to the survivor.

Merging is set-based: a batch of clusters is read with a few ``IN`` queries, fills and survivorship are
computed in Python, rows are written with executemany updates by primary key, and the journal rows are
written explicitly. Each journal row of a merge carries its ``merge_id`` and the values the merge wrote
(``after``), so :func:`undo_merge` restores one merge column by column, in any order, and names the
columns a later change altered instead of overwriting them.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from sqlalchemy import Connection, Table, and_, delete, exists, or_, select, update
from sqlalchemy.orm import Session, aliased
from stdnum.cn import uscc

from crm_core.db import refresh_statistics as analyze
from crm_core.errors import DedupError
from crm_core.journal import (
    bulk_insert,
    bulk_update,
    comparable,
    from_json,
    id_parts,
    ids_in,
    insert_entry,
    read_rows,
    row_key,
    update_entry,
    write_journal,
)
from crm_core.models import Base, Contact, Customer, LoadRun, MatchCandidate, MergeLink, MergeLog, RowChange
from crm_core.runs import ACTIVE, PARTIAL, replay

_SKIPPED = frozenset({"id", "merged_into_id", "created_run_id", "updated_run_id", "created_at", "updated_at"})
MODEL_OF: dict[str, type[Customer] | type[Contact]] = {"customer": Customer, "contact": Contact}
ENTITY_OF: dict[type[Base], str] = {model: entity for entity, model in MODEL_OF.items()}
SurvivorshipRule = Literal["source_priority", "most_recent", "most_complete", "most_frequent"]
# Fields a survivorship rule may name: the customer's own attributes (not keys, links or bookkeeping).
SURVIVORSHIP_FIELDS = tuple(
    c.key
    for c in Base.metadata.tables["customers"].columns
    if c.key not in _SKIPPED | {"parent_id", "name_normalized"}
)
# The contact fields whose count makes one contact "more complete" than another (it survives).
CONTACT_COMPLETENESS = ("mobile", "phone", "email", "title", "department")
# Columns every merge touches on a shared survivor: a later change to them is no conflict for an undo.
_BOOKKEEPING = frozenset({"updated_at", "updated_run_id"})
# The reason of the contact merges a steward's customer merge makes in its transaction (the contacts of the golden
# customer deduplicated), followed by the customer merge ids. For people only: what undoes a contact merge with
# a customer merge is its row in ``merge_links`` (:func:`following_contact_merges`).
CONTACTS_AFTER = "same person under one customer after customer merge "
CHUNK = 1000  # ids per IN list: far below SQLite's and PostgreSQL's bind-parameter limits
BATCH_RECORDS = 5000  # records (survivors and merged) merged per batch of clusters

T = TypeVar("T")
_TABLES = Base.metadata.tables
_XW, _LOG, _JOURNAL, _CANDIDATES, _LINKS = (
    _TABLES[n] for n in ("external_ids", "merge_log", "row_changes", "match_candidates", "merge_links")
)


def table_of(model: type[Base]) -> Table:
    """Return the Core table of a model (typed as a Table, not a FromClause)."""
    return _TABLES[model.__tablename__]


def chunks(items: Sequence[T], size: int = CHUNK) -> Iterator[Sequence[T]]:
    """Yield consecutive slices of ``items`` of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _valid_code(value: str | None) -> bool:
    return value is not None and bool(uscc.is_valid(value))


def _references_to(table: Table) -> list[tuple[Table, str]]:
    """Return (table, column) pairs whose foreign key points at ``table`` (merge pointers excluded)."""
    found = []
    for other in Base.metadata.sorted_tables:
        for column in other.columns:
            if column.name != "merged_into_id" and any(
                fk.column.table is table for fk in column.foreign_keys
            ):
                found.append((other, column.name))
    return found


def fetch_rows(
    connection: Connection, table: Table, ids: Sequence[int], columns: Sequence[str] = ()
) -> dict[int, dict[str, Any]]:
    """Return rows of ``table`` by id (all columns unless named), read with chunked ``IN`` queries."""
    selected = [table.c[c] for c in ("id", *columns)] if columns else list(table.c)
    found: dict[int, dict[str, Any]] = {}
    for part in id_parts(connection, ids):
        for row in connection.execute(
            select(*selected).where(ids_in(connection, table.c.id, part))
        ).mappings():
            found[row["id"]] = dict(row)
    return found


@dataclass
class Members:
    """What ranking and survivorship need about records: their rows and what the crosswalk says of them."""

    rows: dict[int, dict[str, Any]]
    creators: dict[int, str] = field(default_factory=dict)  # the source whose row created the record
    synced: dict[int, dt.datetime] = field(default_factory=dict)  # when a source row of it last changed


def load_members(
    connection: Connection, model: type[Customer] | type[Contact], ids: Sequence[int]
) -> Members:
    """Read the rows and crosswalk facts of these records with a few set queries."""
    entity = ENTITY_OF[model]
    members = Members(fetch_rows(connection, table_of(model), ids))
    xw = _XW
    for part in id_parts(connection, ids):
        query = select(xw.c.entity_id, xw.c.system, xw.c.match_method, xw.c.last_synced_at).where(
            xw.c.entity == entity, ids_in(connection, xw.c.entity_id, part)
        )
        for entity_id, system, method, synced in connection.execute(query):
            if method == "created" and (
                entity_id not in members.creators or system < members.creators[entity_id]
            ):
                members.creators[entity_id] = system
            if synced is not None:
                stamp = synced.replace(tzinfo=dt.UTC) if synced.tzinfo is None else synced
                members.synced[entity_id] = max(members.synced.get(entity_id, stamp), stamp)
    return members


def _row(members: Members, record_id: int, entity: str = "customer") -> dict[str, Any]:
    row = members.rows.get(record_id)
    if row is None:
        raise DedupError(f"{entity} {record_id} does not exist in the core")
    return row


def order_members(
    model: type[Customer] | type[Contact],
    members: Members,
    ids: Sequence[int],
    source_priority: Sequence[str] = (),
) -> list[int]:
    """Order a cluster best first, as every merge (automatic or steward) picks its survivor.

    Customers: created by the highest-priority source, then most complete, then oldest. Contacts: most
    complete (mobile, phone, e-mail, title, department), then oldest.
    """
    if model is Contact:

        def contact_rank(contact_id: int) -> tuple[int, int]:
            row = _row(members, contact_id, "contact")
            return (-sum(row[c] is not None for c in CONTACT_COMPLETENESS), contact_id)

        return sorted(ids, key=contact_rank)

    def rank(customer_id: int) -> tuple[int, int, int]:
        row = _row(members, customer_id)
        system = members.creators.get(customer_id)
        priority = source_priority.index(system) if system in source_priority else len(source_priority)
        filled = sum(row[c.name] is not None for c in table_of(Customer).columns if c.key not in _SKIPPED)
        return (priority, -filled, customer_id)

    return sorted(ids, key=rank)


def choose_survivor(session: Session, ids: Sequence[int], source_priority: Sequence[str] = ()) -> int:
    """Pick the golden record of a cluster: created by the highest-priority source, then most complete."""
    return rank_members(session, ids, source_priority)[0]


def rank_members(session: Session, ids: Sequence[int], source_priority: Sequence[str] = ()) -> list[int]:
    """Order a cluster best first: created by the highest-priority source, then most complete, then oldest."""
    session.flush()
    return order_members(Customer, load_members(session.connection(), Customer, ids), ids, source_priority)


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def golden_of(
    members: Members, ranked_ids: Sequence[int], rules: Mapping[str, SurvivorshipRule]
) -> dict[str, Any]:
    """Return the value each ruled field takes on the golden record of loaded members (ranked best first).

    See :func:`golden_values` for the rules.
    """
    epoch = dt.datetime.min.replace(tzinfo=dt.UTC)
    rows = [members.rows[i] for i in ranked_ids if i in members.rows]

    def changed(row: dict[str, Any]) -> dt.datetime:
        stamp = members.synced.get(row["id"]) or row["updated_at"]
        return stamp.replace(tzinfo=dt.UTC) if stamp and stamp.tzinfo is None else stamp or epoch

    chosen: dict[str, Any] = {}
    for name, rule in rules.items():
        filled = [(rank, row, row[name]) for rank, row in enumerate(rows) if not _blank(row[name])]
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
        if name == "credit_code" and not _valid_code(value):
            value = next((v for _, _, v in filled if _valid_code(v)), value)
        chosen[name] = value
    return chosen


def golden_values(
    session: Session, ranked_ids: Sequence[int], rules: Mapping[str, SurvivorshipRule]
) -> dict[str, Any]:
    """Return the value each ruled field takes on the golden record of a cluster (ranked best first).

    ``source_priority``: the best-ranked member's non-empty value; ``most_recent``: the value of the member
    whose source row changed last (crosswalk sync time); ``most_complete``: the longest value;
    ``most_frequent``: the commonest value. Ties go to the better-ranked member; a valid credit code is
    never replaced by an invalid one.
    """
    session.flush()
    return golden_of(load_members(session.connection(), Customer, ranked_ids), ranked_ids, rules)


@dataclass(frozen=True)
class MergePlan:
    """One cluster to merge: the survivor, the records merged into it (in this order), why and by whom.

    ``golden`` (from :func:`golden_of`) sets survivorship-ruled fields with the first merge, so undoing
    that merge restores the survivor's own values.
    """

    survivor_id: int
    merged_ids: tuple[int, ...]
    probability: float | None
    reason: str
    decided_by: str
    golden: Mapping[str, Any] | None = None


class _Rows:
    """The rows a batch of merges touches: what each holds now, what it held, and the journal of changes."""

    def __init__(self, run_id: int, now: dt.datetime) -> None:
        self.run_id, self.now = run_id, now
        self.state: dict[tuple[str, int], dict[str, Any]] = {}
        self.original: dict[tuple[str, int], dict[str, Any]] = {}
        self.changed: dict[Table, dict[int, None]] = defaultdict(dict)  # insertion-ordered sets
        self.journal: list[dict[str, Any]] = []

    def load(self, table: Table, row: dict[str, Any]) -> None:
        key = (table.name, row["id"])
        if key not in self.state:  # a full row read first (a cluster member) is kept
            self.state[key], self.original[key] = dict(row), dict(row)

    def get(self, table: Table, row_id: int) -> dict[str, Any]:
        return self.state[(table.name, row_id)]

    def change(self, table: Table, row_id: int, values: Mapping[str, Any], merge_id: int) -> None:
        """Apply ``values`` to a row for merge ``merge_id``; journal what actually changed."""
        state = self.state[(table.name, row_id)]
        diff = {k: v for k, v in values.items() if state[k] != v}
        if not diff:
            return
        if "updated_at" in table.c:  # always journaled: replaying an entry must never fall back to onupdate
            diff["updated_at"] = self.now
        self.journal.append(
            update_entry(self.run_id, table, {"id": row_id}, {k: state[k] for k in diff}, diff, merge_id)
        )
        state.update(diff)
        self.changed[table][row_id] = None

    def write(self, connection: Connection) -> None:
        """Write every changed row (executemany per table and set of changed columns), then the journal."""
        for table, row_ids in self.changed.items():
            groups: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
            for row_id in row_ids:
                state, original = self.state[(table.name, row_id)], self.original[(table.name, row_id)]
                columns = tuple(
                    sorted(k for k, v in state.items() if original[k] is not v and original[k] != v)
                )
                if columns:
                    groups[columns].append({"_id": row_id, **{c: state[c] for c in columns}})
            for params in groups.values():
                bulk_update(connection, table, params)
        write_journal(connection, self.journal)


def refresh_statistics(connection: Connection, model: type[Customer] | type[Contact]) -> None:
    """On PostgreSQL, ANALYZE the tables a merge of ``model`` reads and writes.

    Right after a bulk load the planner still believes the tables are small and scans them whole for
    every batch of key lookups (measured at 1,000,000 customers: 0.1–0.2 s per query instead of
    milliseconds). ANALYZE samples a fixed number of rows, so it costs well under a second at that size.
    """
    if connection.dialect.name != "postgresql":
        return
    table = table_of(model)
    analyze(connection, [table.name, "external_ids", *(other.name for other, _ in _references_to(table))])


def merge_plans(
    session: Session,
    run: LoadRun,
    model: type[Customer] | type[Contact],
    plans: Sequence[MergePlan],
    members: Members | None = None,
) -> list[int]:
    """Merge clusters of ``model`` set-based inside the run; return the ``merge_log`` ids in plan order.

    Pending ORM changes are flushed first; objects of the session are expired afterwards (the rows were
    written with Core statements). ``members`` may hold rows already read in this transaction.
    """
    if not plans:
        return []
    session.flush()
    connection = session.connection()
    entity, table = ENTITY_OF[model], table_of(model)
    seen: set[int] = set()
    for plan in plans:
        for record_id in (plan.survivor_id, *plan.merged_ids):
            if record_id in seen:
                raise DedupError(f"{entity} {record_id} is in two clusters of one merge; merge them as one")
            seen.add(record_id)
    rows = dict(members.rows) if members else {}
    rows.update(fetch_rows(connection, table, sorted(seen - rows.keys())))
    for plan in plans:
        survivor = rows.get(plan.survivor_id)
        if survivor is None or survivor["merged_into_id"] is not None:
            raise DedupError(
                f"{entity} {plan.survivor_id} is not an active {entity}; it cannot survive a merge"
            )
        for merged_id in plan.merged_ids:
            merged = rows.get(merged_id)
            if merged is None or merged["merged_into_id"] is not None or merged_id == plan.survivor_id:
                raise DedupError(
                    f"{entity} {merged_id} is not an active {entity} other than {plan.survivor_id}"
                )

    now = dt.datetime.now(dt.UTC)
    touched = _Rows(run.id, now)
    for member in rows.values():
        touched.load(table, member)
    merged_all = sorted(i for plan in plans for i in plan.merged_ids)
    referrers: list[tuple[Table, str, dict[int, list[int]]]] = []
    for other, column in _references_to(table):
        by_target: dict[int, list[int]] = defaultdict(list)
        wanted = [column, *(c for c in _BOOKKEEPING if c in other.c)]
        for part in id_parts(connection, merged_all):
            query = select(*(other.c[c] for c in ("id", *wanted))).where(
                ids_in(connection, other.c[column], part)
            )
            for found in connection.execute(query).mappings():
                touched.load(other, dict(found))
                by_target[found[column]].append(found["id"])
        referrers.append((other, column, by_target))
    xw = _XW
    crosswalk: dict[int, list[int]] = defaultdict(list)
    for part in id_parts(connection, merged_all):
        query = select(xw.c.id, xw.c.entity_id, xw.c.match_method, xw.c.updated_run_id).where(
            xw.c.entity == entity, ids_in(connection, xw.c.entity_id, part)
        )
        for found in connection.execute(query).mappings():
            touched.load(xw, dict(found))
            crosswalk[found["entity_id"]].append(found["id"])

    log_table = _LOG
    log_rows = [
        {"entity": entity, "survivor_id": plan.survivor_id, "merged_id": merged_id,
         "probability": plan.probability, "reason": plan.reason, "decided_by": plan.decided_by,
         "load_run_id": run.id, "first_change_id": None, "last_change_id": None, "created_at": now,
         "undone_at": None}
        for plan in plans for merged_id in plan.merged_ids
    ]  # fmt: skip
    log_ids = bulk_insert(connection, log_table, log_rows, return_ids=True)
    touched.journal.extend(insert_entry(run.id, log_table, {"id": log_id}) for log_id in log_ids)
    if model is Contact:
        pairs = [(plan.survivor_id, merged_id) for plan in plans for merged_id in plan.merged_ids]
        following = customer_merges_between(connection, pairs)
        links = [
            {"merge_id": log_id, "follows_merge_id": follows}
            for log_id, pair in zip(log_ids, pairs, strict=True) for follows in sorted(following[pair])
        ]  # fmt: skip
        bulk_insert(connection, _LINKS, links)
        touched.journal.extend(insert_entry(run.id, _LINKS, link) for link in links)

    fill = [c.name for c in table.columns if c.name not in _SKIPPED | {"parent_id", "customer_id"}]
    numbers = iter(log_ids)
    for plan in plans:
        survivor_id = plan.survivor_id
        survivor = touched.get(table, survivor_id)
        for position, merged_id in enumerate(plan.merged_ids):
            merge_id = next(numbers)
            merged = touched.get(table, merged_id)
            values: dict[str, Any] = {}
            for name in fill:
                mine, theirs = survivor[name], merged[name]
                if name == "credit_code":
                    if theirs and _valid_code(theirs) and not _valid_code(mine):
                        values[name] = theirs
                elif mine is None and theirs is not None:
                    values[name] = theirs
            if plan.golden and position == 0:
                values.update(plan.golden)
            touched.change(table, survivor_id, {**values, "updated_run_id": run.id}, merge_id)
            touched.change(
                table, merged_id, {"merged_into_id": survivor_id, "updated_run_id": run.id}, merge_id
            )
            for other, column, by_target in referrers:
                for row_id in by_target.get(merged_id, ()):
                    if not (other is table and row_id == survivor_id):
                        touched.change(other, row_id, {column: survivor_id}, merge_id)
            for entry_id in crosswalk.get(merged_id, ()):
                touched.change(xw, entry_id, {"entity_id": survivor_id, "match_method": f"linked:{merged_id}",
                                              "updated_run_id": run.id}, merge_id)  # fmt: skip
    touched.write(connection)
    session.expire_all()
    return log_ids


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
    """Merge records of ``model`` (customers or contacts) into a survivor inside the run; return the log entries.

    Blanks of the survivor fill from the merged records; references and crosswalk entries are re-pointed.
    ``golden`` (from :func:`golden_values`) sets survivorship-ruled fields; it is applied with the first
    merge, so undoing that merge restores the survivor's own values.
    """
    plan = MergePlan(survivor_id, tuple(merged_ids), probability, reason, decided_by, golden)
    return merge_logs(session, merge_plans(session, run, model, [plan]))


def merge_logs(session: Session, ids: Sequence[int]) -> list[MergeLog]:
    """Return the merge log entries with these ids, in id order."""
    found: list[MergeLog] = []
    for part in chunks(sorted(ids)):
        found.extend(session.scalars(select(MergeLog).where(MergeLog.id.in_(part)).order_by(MergeLog.id)))
    return found


@dataclass
class _Later:
    """A journal entry written after the merge being undone, on a row it touched."""

    id: int
    before: dict[str, Any] | None
    merge_id: int | None
    run_key: str


def undo_merge(session: Session, log_id: int, decided_by: str) -> MergeLog:
    """Undo one merge exactly, whatever merges or loads came after it, as long as they left its values alone.

    Each column the merge wrote is restored when the core still holds what the merge wrote. A business
    column a later change altered is a conflict: nothing is undone and the error names the column and the
    change. Bookkeeping columns (``updated_at``, ``updated_run_id``) a later change rewrote stay as they
    are, and that change's journal entry now restores them past this merge, so rolling back the later run
    stays exact. The pair is then marked ``distinct`` (a steward said these are different) and not proposed
    again. The contact merges that follow from a customer merge (:func:`following_contact_merges`: automatic or
    steward's, in this run or a later one) are undone with it, first, so the contacts come back as they were;
    their contact pairs keep their ``merged`` status (the same person, now under two customers again).
    """
    log = session.get(MergeLog, log_id)
    if log is None:
        raise DedupError(f"no merge {log_id}; `crmi dedup merges` lists them")
    if log.undone_at is not None:
        raise DedupError(f"merge {log_id} was already undone at {log.undone_at:%Y-%m-%d %H:%M}")
    session.flush()
    followers = following_contact_merges(session, log) if log.entity == "customer" else []
    for follower in followers:  # newest first, then the customer merge they followed from
        _restore(session, follower)
    _restore(session, log)
    session.expire_all()
    now = dt.datetime.now(dt.UTC)
    for follower in followers:
        follower.undone_at = now
    log.undone_at = now
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


def following_contact_merges(session: Session, log: MergeLog) -> list[MergeLog]:
    """The contact merges (not undone, newest first) that follow from customer merge ``log`` (``merge_links``):
    undoing that merge undoes them first."""
    return list(
        session.scalars(
            select(MergeLog)
            .join(MergeLink, MergeLink.merge_id == MergeLog.id)
            .where(MergeLink.follows_merge_id == log.id, MergeLog.undone_at.is_(None))
            .order_by(MergeLog.id.desc())
        )
    )


def customer_merges_between(
    connection: Connection, pairs: Sequence[tuple[int, int]]
) -> dict[tuple[int, int], set[int]]:
    """Map pairs of contacts under one customer to the customer merges (not undone) that brought one of the two
    under it and not the other: undoing any of those puts them under two customers again.

    A customer merge re-points the merged customer's contacts and journals each with its ``merge_id``; what
    moved both contacts (a later merge of their shared customer) keeps them together and is left out.
    """
    contacts = sorted({contact for pair in pairs for contact in pair})
    table = table_of(Contact)
    keys = {row_key(table, {"id": contact}): contact for contact in contacts}
    moves: list[tuple[int, int]] = []
    for key_part in chunks(sorted(keys)):
        query = select(_JOURNAL.c.row_key, _JOURNAL.c.merge_id, _JOURNAL.c.after).where(
            _JOURNAL.c.table_name == table.name, ids_in(connection, _JOURNAL.c.row_key, key_part),
            _JOURNAL.c.merge_id.is_not(None),
        )  # fmt: skip
        moves.extend((keys[key], int(merge)) for key, merge, after in connection.execute(query)
                     if after and "customer_id" in after)  # fmt: skip
    customer_merges: set[int] = set()
    for part in id_parts(connection, sorted({merge for _, merge in moves})):
        customer_merges.update(int(i) for i in connection.scalars(
            select(_LOG.c.id).where(ids_in(connection, _LOG.c.id, part), _LOG.c.entity == "customer",
                                    _LOG.c.undone_at.is_(None))
        ))  # fmt: skip
    moved: dict[int, set[int]] = defaultdict(set)
    for contact, merge in moves:
        if merge in customer_merges:
            moved[contact].add(merge)
    return {(a, b): moved[a] ^ moved[b] for a, b in pairs}


def contacts_after(customer_merges: Sequence[int]) -> str:
    """The reason of contact merges that follow from these customer merges (:data:`CONTACTS_AFTER`)."""
    return CONTACTS_AFTER + ", ".join(str(i) for i in sorted(customer_merges))


def _restore(session: Session, log: MergeLog) -> None:
    """Restore what merge ``log`` wrote from its journal entries (or its range of them, for old merges)."""
    connection = session.connection()
    entries = connection.execute(
        select(RowChange.id, RowChange.table_name, RowChange.row_key, RowChange.operation, RowChange.before,
               RowChange.after).where(RowChange.merge_id == log.id).order_by(RowChange.id.desc())
    ).all()  # fmt: skip
    if entries:
        _undo_columns(connection, log, entries)
    elif log.first_change_id is not None and log.last_change_id is not None:
        _undo_range(session, log)
    else:
        raise DedupError(f"merge {log.id} has no journal entries to undo it from")


def _later_changes(
    connection: Connection, log: MergeLog, keys: Mapping[str, set[str]], since: int
) -> dict[tuple[str, str], list[_Later]]:
    """Return the journal entries of active runs after ``since`` on these rows, oldest first, per row."""
    found: dict[tuple[str, str], list[_Later]] = defaultdict(list)
    for table_name, row_keys in keys.items():
        for part in chunks(sorted(row_keys)):
            query = (
                select(RowChange.id, RowChange.row_key, RowChange.before, RowChange.merge_id, LoadRun.run_key)
                .join(LoadRun, LoadRun.id == RowChange.load_run_id)
                .where(
                    RowChange.table_name == table_name, RowChange.row_key.in_(part), RowChange.id > since,
                    or_(RowChange.merge_id.is_(None), RowChange.merge_id != log.id),
                    LoadRun.status.in_(ACTIVE),
                )
                .order_by(RowChange.id)
            )  # fmt: skip
            for entry_id, key, before, merge_id, run_key in connection.execute(query):
                found[(table_name, key)].append(_Later(entry_id, before, merge_id, run_key))
    return found


def _undo_columns(connection: Connection, log: MergeLog, entries: Sequence[Any]) -> None:
    """Restore what a merge wrote column by column from its tagged journal entries (newest first)."""
    tables = Base.metadata.tables
    keys: dict[str, set[str]] = defaultdict(set)
    for entry in entries:
        keys[entry.table_name].add(entry.row_key)
    current: dict[tuple[str, str], dict[str, Any]] = {}
    for table_name, row_keys in keys.items():
        found = read_rows(connection, tables[table_name], [json.loads(k) for k in row_keys])
        current.update({(table_name, k): v for k, v in found.items()})
    later = _later_changes(connection, log, keys, min(e.id for e in entries))
    restores: dict[tuple[str, str], dict[str, Any]] = defaultdict(dict)
    splices: dict[int, dict[str, Any]] = {}
    conflicts: list[str] = []
    for entry in entries:
        table = tables[entry.table_name]
        name = f"{entry.table_name} {', '.join(str(v) for v in json.loads(entry.row_key).values())}"
        row = current.get((entry.table_name, entry.row_key))
        if entry.operation != "update" or entry.after is None:
            raise DedupError(
                f"merge {log.id}: journal entry {entry.id} is not a merge update; it cannot be undone"
            )
        if row is None:
            conflicts.append(f"{name} was deleted after the merge")
            continue
        for column, wrote in entry.after.items():
            kind = table.c[column]
            following = next(
                (e for e in later.get((entry.table_name, entry.row_key), ()) if e.id > entry.id
                 and e.before is not None and column in e.before),
                None,
            )  # fmt: skip
            before_value = entry.before[column]
            holds_written = comparable(kind, row[column]) == comparable(kind, wrote)
            if not holds_written and column not in _BOOKKEEPING:
                by = (
                    f"merge {following.merge_id}" if following and following.merge_id
                    else f"run {following.run_key}" if following else "a change outside the journal"
                )  # fmt: skip
                conflicts.append(f"{name} {column} (the merge wrote {wrote!r}, the core holds {row[column]!r}; "
                                 f"changed by {by})")  # fmt: skip
                continue
            if holds_written:
                restores[(entry.table_name, entry.row_key)][column] = before_value
                row[column] = before_value
            # The next change's before-image held what this merge wrote: it now holds what was there before.
            if (
                following is not None
                and following.before is not None
                and comparable(kind, following.before[column]) == comparable(kind, wrote)
            ):
                patched = splices.setdefault(following.id, dict(following.before))
                patched[column] = before_value
                following.before = patched
    if conflicts:
        raise DedupError(
            f"merge {log.id} cannot be undone exactly: later changes altered what it wrote: "
            f"{'; '.join(conflicts[:5])}{' …' if len(conflicts) > 5 else ''}; undo those merges first "
            "(`crmi dedup merges`) or roll back those runs (`crmi runs list`)"
        )
    for (table_name, key), values in restores.items():
        table = tables[table_name]
        row = current[(table_name, key)]
        if "updated_at" in table.c and "updated_at" not in values:  # not onupdate's "now"
            values = {**values, "updated_at": row["updated_at"]}
        where = and_(*(table.c[c] == from_json(table.c[c], v) for c, v in json.loads(key).items()))
        connection.execute(
            update(table).where(where).values({c: from_json(table.c[c], v) for c, v in values.items()})
        )
    bulk_update(
        connection, _JOURNAL, [{"_id": entry_id, "before": before} for entry_id, before in splices.items()]
    )
    # The merge's entries no longer describe the core: a later rollback of its run must not replay them.
    connection.execute(delete(_JOURNAL).where(_JOURNAL.c.merge_id == log.id))


def _undo_range(session: Session, log: MergeLog) -> None:
    """Undo a merge recorded before journal entries carried their merge (a global id range): newest only."""
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
            f"merge {log.id} cannot be undone exactly: later changes touched {', '.join(conflicts[:5])}; "
            "roll back the later runs first"
        )
    replay(session, mine)


def decided_pairs(session: Session, entity: str, status: str) -> set[tuple[int, int]]:
    """Return the (left, right) pairs a steward or an earlier run decided with ``status`` (``review``: waiting),
    and the pair of golden records each stands for now where a side has been merged since (smaller id first).

    A steward's "different" on 1 / 7 holds for the golden record 1 was merged into: linkage, which compares
    golden records, must not propose 49 / 7 again, nor merge it while 1 / 7 waits for a steward.
    """
    rows = session.execute(
        select(MatchCandidate.left_id, MatchCandidate.right_id).where(
            MatchCandidate.entity == entity, MatchCandidate.status == status
        )
    )
    pairs = {(int(left), int(right)) for left, right in rows}
    if not pairs:
        return pairs
    active = active_records(session.connection(), MODEL_OF[entity], [i for pair in pairs for i in pair])
    golden = {(min(a, b), max(a, b)) for left, right in pairs if (a := active[left]) != (b := active[right])}
    return pairs | golden


def active_records(
    connection: Connection, model: type[Customer] | type[Contact], ids: Sequence[int]
) -> dict[int, int]:
    """Map records to the active record each ended in, following ``merged_into_id`` (a query per level of
    merges, not per record); a record that no longer exists maps to itself."""
    table = table_of(model)
    pointer: dict[int, int] = {}  # merged record -> the record it was merged into
    seen: set[int] = set()
    wanted = sorted(set(ids))
    for _ in range(50):  # merge chains are short; never loop on a cycle
        wanted = [i for i in wanted if i not in seen]
        if not wanted:
            break
        seen.update(wanted)
        for part in id_parts(connection, wanted):
            rows = connection.execute(
                select(table.c.id, table.c.merged_into_id)
                .where(ids_in(connection, table.c.id, part), table.c.merged_into_id.is_not(None))
            )  # fmt: skip
            pointer.update({int(record): int(into) for record, into in rows})
        wanted = sorted({pointer[i] for i in wanted if i in pointer})
    found: dict[int, int] = {}
    for record in ids:
        current, hops = record, 0
        while current in pointer and hops < 50:
            current, hops = pointer[current], hops + 1
        found[record] = current
    return found


def members_of(
    connection: Connection, model: type[Customer] | type[Contact], ids: Sequence[int]
) -> dict[int, int]:
    """Map every record that ended in one of the active records ``ids`` (merged into it, also through earlier
    survivors) to that record, the records themselves included."""
    table = table_of(model)
    found = {int(i): int(i) for i in ids}
    frontier = sorted(found)
    for _ in range(50):
        if not frontier:
            break
        following: list[int] = []
        for part in id_parts(connection, frontier):
            for record, into in connection.execute(
                select(table.c.id, table.c.merged_into_id).where(
                    ids_in(connection, table.c.merged_into_id, part)
                )
            ):
                if record not in found:
                    found[record] = found[into]
                    following.append(record)
        frontier = sorted(following)
    return found


# Above this many distinct left ids, one scan of the entity's candidates beats chunked IN lists.
_SCAN_ALL = 50_000


def record_candidates(
    session: Session,
    run: LoadRun,
    entity: str,
    scored: Mapping[tuple[int, int], tuple[float, dict[str, Any], str]],
) -> int:
    """Upsert scored pairs as candidates; decisions already made (merged, distinct) are kept. Returns new ones.

    Set-based: existing candidates are read by chunks of left ids (or in one scan), new ones inserted and
    review ones updated with executemany, each journaled in the run.
    """
    if not scored:
        return 0
    session.flush()
    connection = session.connection()
    table = _CANDIDATES
    columns = (
        table.c.id,
        table.c.left_id,
        table.c.right_id,
        table.c.status,
        table.c.probability,
        table.c.features,
    )
    lefts = sorted({left for left, _ in scored})
    queries = (
        [select(*columns).where(table.c.entity == entity)]
        if len(lefts) > _SCAN_ALL
        else [
            select(*columns).where(table.c.entity == entity, ids_in(connection, table.c.left_id, part))
            for part in id_parts(connection, lefts)
        ]
    )
    existing: dict[tuple[int, int], Any] = {}
    for query in queries:
        for row in connection.execute(query):
            if (row.left_id, row.right_id) in scored:
                existing[(row.left_id, row.right_id)] = row
    now = dt.datetime.now(dt.UTC)
    new: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    journal: list[dict[str, Any]] = []
    for (left, right), (probability, features, status) in scored.items():
        stored = existing.get((left, right))
        if stored is None:
            merged = status == "merged"
            new.append({"entity": entity, "left_id": left, "right_id": right, "probability": probability,
                        "features": features, "status": status, "load_run_id": run.id,
                        "decided_by": "linkage" if merged else None, "decided_at": now if merged else None})  # fmt: skip
        elif stored.status == "review" and (stored.probability != probability or stored.features != features):
            updates.append({"_id": stored.id, "probability": probability, "features": features})
            journal.append(update_entry(run.id, table, {"id": stored.id},
                                        {"probability": stored.probability, "features": stored.features},
                                        {"probability": probability, "features": features}))  # fmt: skip
    bulk_update(connection, table, updates)
    journal.extend(
        insert_entry(run.id, table, {"id": i}) for i in bulk_insert(connection, table, new, return_ids=True)
    )
    write_journal(connection, journal)
    session.expire_all()
    return len(new)


# the load run of `crmi dedup run`: linkage of every customer and contact, no source read
DEDUP_MODE = "dedup"


def unlinked_partial_runs(session: Session, run_id: int) -> list[int]:
    """Return the partial runs before run ``run_id`` whose records no linkage has seen since.

    A partial run (assets materialized on their own) may have loaded customers without linking them. A
    migration or delta run of the same project that started once the partial run had ended, and ended
    itself (succeeded or unbalanced), linked them, and so did a `crmi dedup run`; a run that started earlier may
    have asked what changed while the partial run was still going.
    """
    partial, linking = aliased(LoadRun), aliased(LoadRun)
    linked = exists().where(
        linking.id < run_id,
        linking.id > partial.id,
        linking.project == partial.project,
        linking.mode.in_(("full", "delta", DEDUP_MODE)),
        linking.status.in_(("succeeded", "unbalanced")),
        linking.started_at >= partial.finished_at,  # never, when it has no end (then it stays unlinked)
    )
    query = select(partial.id).where(partial.id < run_id, partial.status == PARTIAL, ~linked)
    return [int(i) for i in session.scalars(query)]


def changed_in_run(session: Session, model: type[Customer] | type[Contact], run_key: str) -> list[int]:
    """Return the active records of ``model`` that load run ``run_key`` created or changed (a delta run's focus),
    or a partial run before it that no linkage has seen (:func:`unlinked_partial_runs`)."""
    run_id = session.scalar(select(LoadRun.id).where(LoadRun.run_key == run_key))
    if run_id is None:
        return []
    runs = [run_id, *unlinked_partial_runs(session, run_id)]
    touched = or_(model.created_run_id.in_(runs), model.updated_run_id.in_(runs))
    if model is Contact:  # contacts of a customer the run changed (merged into it, say) meet new siblings
        customers = select(Customer.id).where(
            or_(Customer.created_run_id.in_(runs), Customer.updated_run_id.in_(runs))
        )
        touched = or_(touched, Contact.customer_id.in_(customers))
    return [int(i) for i in session.scalars(select(model.id).where(model.merged_into_id.is_(None), touched))]
