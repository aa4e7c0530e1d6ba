"""A candidate cluster as a steward sees it: its records side by side, what differs, why linkage paired them.

A cluster is the connected group of pending pairs around one pair, walked breadth first with one query per
step (never one per record), capped at :data:`MAX_CLUSTER` records. Its records are shown as the golden
records they are now (a pair may name a record merged since): the survivor the merge would keep first,
then the others in the order the project's rules rank them (``crm_core.merging.order_members``).

What a merge would make of the cluster is computed with the same rules the merge applies — the survivor's
values, blanks filled in rank order, a valid credit code never given up, survivorship rules on top — and
tests check it against a real merge. A steward may pick another record's value per field; values the
project's normalization makes equal (上海 / 上海市) are one choice, in their most complete spelling, which a
merge from the page keeps.
"""

from __future__ import annotations

import datetime as dt
import difflib
import hashlib
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rapidfuzz.distance import Levenshtein
from sqlalchemy import Connection, delete, func, insert, select, update
from stdnum.cn import uscc

from crm_core.journal import id_parts, ids_in
from crm_core.merging import (
    MODEL_OF,
    SURVIVORSHIP_FIELDS,
    SurvivorshipRule,
    load_members,
    table_of,
)
from crm_core.models import Base
from crm_core.steward_models import CLAIMS, USERS
from integration.dedup.customers import linkage_rows
from integration.dedup.normalize import person_key, phone_keys
from integration.dedup.workflow import cluster_plan
from integration.geo import city_of_name, place_of_region
from integration.steward.errors import StewardError

TABLES = Base.metadata.tables

MAX_CLUSTER = 30  # records per cluster page; a bigger group is shown in parts
CLAIM_TTL = dt.timedelta(minutes=30)
ASSIGN_TTL = dt.timedelta(days=7)
CANDIDATES = TABLES["match_candidates"]
CROSSWALK = TABLES["external_ids"]
_BOOKKEEPING = frozenset(
    {"id", "merged_into_id", "created_run_id", "updated_run_id", "created_at", "updated_at"}
)
CONTACT_FIELDS = ("name", "title", "department", "mobile", "phone", "email", "is_primary")
FIELDS: dict[str, tuple[str, ...]] = {"customer": SURVIVORSHIP_FIELDS, "contact": CONTACT_FIELDS}
# How the pages name a record's fields (a field not listed: its column name, spaced).
FIELD_LABELS = {
    "short_name": "short name", "english_name": "English name", "credit_code": "credit code (统一社会信用代码)",
    "credit_code_as_written": "credit code as written", "email": "e-mail", "is_branch": "branch", "owner_id": "owner",
    "erp_code": "ERP code", "credit_limit": "credit limit", "payment_terms": "payment terms",
    "is_primary": "primary contact",
}  # fmt: skip


def field_label(name: str) -> str:
    """A record field as the workbench's pages name it (``credit_code``: credit code (统一社会信用代码))."""
    return FIELD_LABELS.get(name) or name.replace("_", " ")


@dataclass(frozen=True)
class Pair:
    """One pending pair of a cluster."""

    id: int
    left_id: int
    right_id: int
    probability: float
    features: dict[str, Any]


@dataclass
class Cluster:
    """The pending pairs connected to one pair, and the golden records they stand for now."""

    entity: str
    start: int
    pairs: list[Pair]
    active: dict[int, int]  # every record a pair names -> the active record it is now
    truncated: bool = False

    @property
    def records(self) -> list[int]:
        """The active records of the cluster (distinct), by id."""
        return sorted(set(self.active.values()))

    @property
    def claim_ids(self) -> list[int]:
        """Every record a claim on the cluster covers: the ones the pairs name and the active ones."""
        return sorted(set(self.active) | set(self.active.values()))

    def fingerprint(self) -> str:
        """Changes when the cluster's pending pairs or records change (a decision made on a stale page)."""
        text = f"{self.entity}|{sorted(p.id for p in self.pairs)}|{sorted(self.active.items())}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]


def active_ids(connection: Connection, entity: str, ids: Sequence[int]) -> dict[int, int]:
    """Map records to the active record each ended in (following ``merged_into_id``, a query per level)."""
    table = table_of(MODEL_OF[entity])
    pointer: dict[int, int | None] = {}
    wanted = sorted(set(ids))
    for _ in range(50):  # merge chains are short; a cycle would be a bug elsewhere, never loop on it
        wanted = [i for i in wanted if i not in pointer]
        if not wanted:
            break
        for part in id_parts(connection, wanted):
            for record_id, merged_into in connection.execute(
                select(table.c.id, table.c.merged_into_id).where(ids_in(connection, table.c.id, part))
            ):
                pointer[record_id] = merged_into
        missing = [i for i in wanted if i not in pointer]
        if missing:
            raise StewardError(f"{entity} {missing[0]} no longer exists in the core", status=409)
        wanted = [target for i in wanted if (target := pointer[i]) is not None]
    found: dict[int, int] = {}
    for record_id in ids:
        current, hops = record_id, 0
        while (target := pointer.get(current)) is not None and hops < 50:
            current, hops = target, hops + 1
        found[record_id] = current
    return found


def find_cluster(connection: Connection, candidate_id: int) -> Cluster:
    """Return the cluster of a pending pair; refuse a pair that does not exist or was decided already."""
    c = CANDIDATES.c
    start = connection.execute(
        select(c.id, c.entity, c.left_id, c.right_id, c.probability, c.features, c.status, c.decided_by)
        .where(c.id == candidate_id)
    ).first()  # fmt: skip
    if start is None:
        raise StewardError(f"no pair {candidate_id}; the queue lists the pending ones", status=404)
    if start.status != "review":
        raise StewardError(
            f"pair {candidate_id} was already decided: {start.status} by {start.decided_by}", status=409
        )
    entity = start.entity
    pairs: dict[int, Pair] = {}
    nodes = {start.left_id, start.right_id}
    seen: set[int] = set()
    truncated = False
    while frontier := nodes - seen:
        seen |= frontier
        # One query per side, each served by its own index ((entity, left_id, right_id) and (entity,
        # right_id)); the status is checked here, so the planner never prefers the status index.
        rows = {
            row.id: row
            for side in (c.left_id, c.right_id)
            for part in id_parts(connection, sorted(frontier))
            for row in connection.execute(
                select(c.id, c.left_id, c.right_id, c.probability, c.features, c.status)
                .where(c.entity == entity, ids_in(connection, side, part))
            )
            if row.status == "review"
        }  # fmt: skip
        for row in sorted(rows.values(), key=lambda r: (-r.probability, r.id)):
            ends = {row.left_id, row.right_id}
            if row.id in pairs:
                continue
            if ends <= nodes or len(nodes | ends) <= MAX_CLUSTER:
                pairs[row.id] = Pair(
                    row.id, row.left_id, row.right_id, row.probability, dict(row.features or {})
                )
                nodes |= ends
            else:
                truncated = True
    ordered = sorted(pairs.values(), key=lambda p: (p.id != candidate_id, -p.probability, p.id))
    records = sorted({i for p in ordered for i in (p.left_id, p.right_id)})
    return Cluster(entity, candidate_id, ordered, active_ids(connection, entity, records), truncated)


# --------------------------------------------------------------------------- claims


@dataclass(frozen=True)
class Holder:
    """Who holds a record of a cluster, until when, and whether an admin assigned it."""

    user_id: int
    name: str
    expires_at: dt.datetime
    assigned_by: str | None


def holders(connection: Connection, entity: str, ids: Sequence[int]) -> dict[int, Holder]:
    """Live claims on these records."""
    now = dt.datetime.now(dt.UTC)
    found: dict[int, Holder] = {}
    rows = connection.execute(
        select(CLAIMS.c.record_id, CLAIMS.c.user_id, USERS.c.name, CLAIMS.c.expires_at, CLAIMS.c.assigned_by)
        .join(USERS, USERS.c.id == CLAIMS.c.user_id)
        .where(CLAIMS.c.entity == entity, CLAIMS.c.record_id.in_(list(ids)), CLAIMS.c.expires_at > now)
    )  # fmt: skip
    for record_id, user_id, name, expires, assigned_by in rows:
        stamp = expires.replace(tzinfo=dt.UTC) if expires.tzinfo is None else expires
        found[record_id] = Holder(user_id, name, stamp, assigned_by)
    return found


def claim(
    connection: Connection,
    entity: str,
    ids: Sequence[int],
    user_id: int,
    *,
    ttl: dt.timedelta = CLAIM_TTL,
    assigned_by: str | None = None,
) -> None:
    """Claim records for a user (all or none); refuse when someone else holds one of them.

    An admin's assignment (``assigned_by``) takes the records from whoever held them. The unique key on
    (entity, record) makes a race between two stewards end with one claim and one refusal.
    """
    now = dt.datetime.now(dt.UTC)
    wanted = sorted(set(ids))
    connection.execute(
        delete(CLAIMS).where(
            CLAIMS.c.entity == entity, CLAIMS.c.record_id.in_(wanted), CLAIMS.c.expires_at <= now
        )
    )
    held = holders(connection, entity, wanted)
    if assigned_by is None:
        others = {h.name for h in held.values() if h.user_id != user_id}
        if others:
            raise StewardError(
                f"{', '.join(sorted(others))} is working on this cluster; pick another one", status=409
            )
    else:
        connection.execute(
            delete(CLAIMS).where(CLAIMS.c.entity == entity, CLAIMS.c.record_id.in_(wanted),
                                 CLAIMS.c.user_id != user_id)
        )  # fmt: skip
        held = {k: v for k, v in held.items() if v.user_id == user_id}
    expires = now + ttl
    for record_id, holder in held.items():
        keep = max(holder.expires_at, expires)  # a claim never shortens an assignment
        connection.execute(
            update(CLAIMS).where(CLAIMS.c.entity == entity, CLAIMS.c.record_id == record_id)
            .values(expires_at=keep, assigned_by=assigned_by or holder.assigned_by)
        )  # fmt: skip
    new = [i for i in wanted if i not in held]
    if new:
        connection.execute(
            insert(CLAIMS),
            [{"entity": entity, "record_id": i, "user_id": user_id, "assigned_by": assigned_by,
              "claimed_at": now, "expires_at": expires} for i in new],
        )  # fmt: skip


def release(connection: Connection, entity: str, ids: Sequence[int], user_id: int | None = None) -> None:
    """Drop the claims on these records (only this user's, when given)."""
    condition = [CLAIMS.c.entity == entity, CLAIMS.c.record_id.in_(sorted(set(ids)))]
    if user_id is not None:
        condition.append(CLAIMS.c.user_id == user_id)
    connection.execute(delete(CLAIMS).where(*condition))


# --------------------------------------------------------------------------- what the page shows


def merge_preview(
    entity: str,
    rows: Mapping[int, Mapping[str, Any]],
    ordered: Sequence[int],
    golden: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The survivor's values after merging ``ordered`` (survivor first) as ``crm_core.merging`` does.

    Each merged record fills the survivor's blanks in turn (a valid credit code replaces an invalid one);
    ``golden`` (survivorship rules, a steward's choices) is applied with the first merge.
    """
    table = table_of(MODEL_OF[entity])
    fill = [c.name for c in table.columns if c.name not in _BOOKKEEPING | {"parent_id", "customer_id"}]
    survivor = dict(rows[ordered[0]])
    for position, merged_id in enumerate(ordered[1:]):
        merged = rows[merged_id]
        values: dict[str, Any] = {}
        for name in fill:
            mine, theirs = survivor[name], merged[name]
            if name == "credit_code":
                if theirs and uscc.is_valid(theirs) and not (mine and uscc.is_valid(mine)):
                    values[name] = theirs
            elif mine is None and theirs is not None:
                values[name] = theirs
        if golden and position == 0:
            values.update(golden)
        survivor.update(values)
    return survivor


def name_diff(mine: str | None, other: str | None) -> list[tuple[str, bool]]:
    """Split ``mine`` into (text, differs) segments against ``other``, character by character (腾达 / 腾讯)."""
    if not mine:
        return []
    if not other:
        return [(mine, False)]
    segments: list[tuple[str, bool]] = []
    for tag, i1, i2, _, _ in difflib.SequenceMatcher(None, mine, other, autojunk=False).get_opcodes():
        if i2 > i1:
            segments.append((mine[i1:i2], tag != "equal"))
    return segments


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def explain_pair(entity: str, a: Mapping[str, Any], b: Mapping[str, Any], pair: Pair) -> list[str]:
    """The evidence for and against a pair, in words: "same credit code", "names 92% alike", "different city"."""
    words: list[str] = []
    if entity == "customer":
        left, right = linkage_rows([{k: a.get(k) for k in _LINKAGE}, {k: b.get(k) for k in _LINKAGE}])
        code_a, code_b = left["credit_code"], right["credit_code"]
        if code_a and code_b:
            if code_a == code_b:
                words.append("same credit code")
            elif pair.features.get("credit_code_identifier", 0) >= 1:
                words.append("credit codes nearly alike (one damaged or shortened)")
            else:
                words.append("different credit codes")
        elif code_a or code_b:
            words.append("credit code on one side only")
        core_a, core_b = left["name_core"] or "", right["name_core"] or ""
        if core_a and core_b:
            similarity = Levenshtein.normalized_similarity(core_a, core_b)
            if core_a != core_b:
                words.append(f"names {similarity:.0%} alike")
            elif (a.get("name") or "") == (b.get("name") or ""):
                words.append("same name")
            else:
                words.append(f"same trade name ({core_a}), written differently")
        if left["branch"] != right["branch"]:
            words.append(f"branches differ ({left['branch']} / {right['branch']})")
        phones_a, phones_b = set((left["phones"] or "").split()), set((right["phones"] or "").split())
        if phones_a and phones_b:
            words.append("same phone" if phones_a & phones_b else "different phones")
        if left["email_domain"] and left["email_domain"] == right["email_domain"]:
            words.append(f"same e-mail domain ({left['email_domain']})")
        if left["address_key"] and left["address_key"] == right["address_key"]:
            words.append("same street address")
        city_a, city_b = left["city"], right["city"]
        if city_a and city_b:
            words.append(
                f"same city ({city_a})" if city_a == city_b else f"different city ({city_a} / {city_b})"
            )
        elif city_a or city_b:
            words.append(f"city known on one side only ({city_a or city_b})")
    else:
        name_a, name_b = person_key(a.get("name")) or "", person_key(b.get("name")) or ""
        if name_a and name_b:
            similarity = Levenshtein.normalized_similarity(name_a, name_b)
            words.append("same name" if name_a == name_b else f"names {similarity:.0%} alike")
        for key, label in (("mobile", "mobile"), ("phone", "phone"), ("email", "e-mail")):
            value_a, value_b = a.get(key), b.get(key)
            if not _blank(value_a) and not _blank(value_b):
                same = str(value_a).strip().casefold() == str(value_b).strip().casefold()
                words.append(f"same {label}" if same else f"different {label}s")
        if a.get("customer_id") == b.get("customer_id"):
            words.append("same customer")
    reason = pair.features.get("reason")
    if reason:
        words.append(f"held back: {reason}")
    return words


_LINKAGE = ("name", "credit_code", "phone", "email", "city", "address", "province", "district",
            "credit_code_as_written")  # fmt: skip


def _city(value: Any) -> Any:
    return city_of_name(str(value)) or value


def _province(value: Any) -> Any:
    return place_of_region(str(value)).province or value


def _phones(value: Any) -> Any:
    return phone_keys(str(value)) or value


def _email(value: Any) -> Any:
    return str(value).strip().lower()


# Fields whose values the project's normalization makes equal though written differently (上海 / 上海市,
# 021-50001111 / +86 21 5000 1111): the cluster page offers them as one choice.
SAME_VALUE: dict[str, Callable[[Any], Any]] = {
    "city": _city,
    "province": _province,
    "phone": _phones,
    "mobile": _phones,
    "email": _email,
}


def same_values(name: str, values: Mapping[int, Any]) -> dict[int, list[int]]:
    """Group records (in order) by their value of field ``name`` as the project's normalization sees it.

    Returns, per distinct non-blank value, the record holding its most complete spelling (the longest;
    the first in order among equals) -> every record holding that value, in order.
    """
    key_of = SAME_VALUE.get(name, lambda value: value)
    groups: dict[Any, list[int]] = {}
    for record_id, value in values.items():
        if not _blank(value):
            groups.setdefault(key_of(value), []).append(record_id)
    return {max(ids, key=lambda i: (len(str(values[i])), -ids.index(i))): ids for ids in groups.values()}


@dataclass
class FieldRow:
    """One field across the cluster's records: values, whether they differ, the merge's default."""

    name: str
    values: list[Any]
    differs: bool
    default: Any
    default_record: int | None  # the record whose value the merge keeps (None: blank everywhere)
    choices: list[int] = field(
        default_factory=list
    )  # a record per distinct value (its most complete spelling)
    carriers: dict[int, list[int]] = field(default_factory=dict)  # choice -> the records holding that value
    checked: int | None = None  # the choice the page starts from: the default value's most complete spelling


@dataclass
class ClusterView:
    """Everything the cluster page shows."""

    cluster: Cluster
    records: list[dict[str, Any]]  # active records, survivor first
    order: list[int]
    fields: list[FieldRow]
    crosswalk: dict[int, list[dict[str, Any]]]
    sources: dict[int, int]  # active record -> how many records are already merged into it
    name_diffs: dict[int, list[tuple[str, bool]]]
    pair_words: list[tuple[Pair, list[str]]]
    holders: dict[int, Holder]
    golden: dict[str, Any]  # survivorship-ruled values (defaults before a steward's choice)
    preview: dict[str, Any]
    owners: dict[int, str]
    customers: dict[int, str]  # contacts: their customer's name


def build_view(
    connection: Connection,
    cluster: Cluster,
    source_priority: Sequence[str] = (),
    survivorship: Mapping[str, SurvivorshipRule] | None = None,
) -> ClusterView:
    """Read the cluster's records, crosswalk and claims (a few set queries) and work out what to show."""
    entity = cluster.entity
    model = MODEL_OF[entity]
    ids = cluster.records
    members = load_members(connection, model, ids)
    if len(ids) > 1:
        plan = cluster_plan(model, members, ids, source_priority, survivorship, probability=None,
                            reason="preview", decided_by="preview")  # fmt: skip
        order = [plan.survivor_id, *plan.merged_ids]
        golden = dict(plan.golden or {})
    else:
        order, golden = list(ids), {}
    rows = members.rows
    preview = merge_preview(entity, rows, order, golden) if len(order) > 1 else dict(rows[order[0]])
    fields = []
    for name in FIELDS[entity]:
        values = [rows[i][name] for i in order]
        filled = [v for v in values if not _blank(v)]
        default = preview.get(name)
        default_record = next((i for i in order if rows[i][name] == default and not _blank(default)), None)
        carriers = same_values(name, {i: rows[i][name] for i in order})
        checked = next((choice for choice, ids in carriers.items() if default_record in ids), None)
        if checked is not None and checked != default_record:  # the page keeps the most complete spelling
            preview[name] = rows[checked][name]
        if filled:  # a field blank on every record says nothing
            fields.append(FieldRow(name, values, len(carriers) > 1 or 0 < len(filled) < len(values), default,
                                   default_record, list(carriers), carriers, checked))  # fmt: skip
    crosswalk: dict[int, list[dict[str, Any]]] = defaultdict(list)
    keys = connection.execute(
        select(CROSSWALK.c.entity_id, CROSSWALK.c.system, CROSSWALK.c.external_key, CROSSWALK.c.match_method)
        .where(CROSSWALK.c.entity == entity, CROSSWALK.c.entity_id.in_(ids))
    )  # sorted here: an ORDER BY would tempt the planner into the (entity, system, key) index  # fmt: skip
    for row in sorted(keys, key=lambda r: (r.system, r.external_key)):
        crosswalk[row.entity_id].append(dict(row._mapping))
    table = table_of(model)
    sources = dict.fromkeys(ids, 0)
    log = TABLES["merge_log"]
    merged_in = connection.execute(
        select(log.c.survivor_id, func.count())
        .where(log.c.entity == entity, log.c.survivor_id.in_(ids), log.c.undone_at.is_(None))
        .group_by(log.c.survivor_id)
    )
    for survivor, count in merged_in:
        sources[survivor] = int(count)
    survivor_name = rows[order[0]].get("name")
    second_name = rows[order[1]].get("name") if len(order) > 1 else None
    name_diffs = {
        record_id: name_diff(
            rows[record_id].get("name"), second_name if record_id == order[0] else survivor_name
        )
        for record_id in order
    }
    originals = _rows_by_id(connection, table, sorted(set(cluster.active)))
    pair_words = [
        (pair, explain_pair(entity, originals[pair.left_id], originals[pair.right_id], pair))
        for pair in cluster.pairs
        if pair.left_id in originals and pair.right_id in originals
    ]
    reps = TABLES["sales_reps"]
    owner_ids = sorted({r["owner_id"] for r in rows.values() if r.get("owner_id") is not None})
    owners = (
        {i: n for i, n in connection.execute(select(reps.c.id, reps.c.name).where(reps.c.id.in_(owner_ids)))}
        if owner_ids
        else {}
    )
    customers: dict[int, str] = {}
    if entity == "contact":
        company_ids = sorted({r["customer_id"] for r in rows.values() if r.get("customer_id") is not None})
        companies = TABLES["customers"]
        customers = {
            i: n for i, n in connection.execute(
                select(companies.c.id, companies.c.name).where(companies.c.id.in_(company_ids))
            )
        }  # fmt: skip
    return ClusterView(
        cluster, [rows[i] for i in order], order, fields, dict(crosswalk), sources, name_diffs, pair_words,
        holders(connection, entity, cluster.claim_ids), golden, preview, owners, customers,
    )  # fmt: skip


def _rows_by_id(connection: Connection, table: Any, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    found: dict[int, dict[str, Any]] = {}
    for part in id_parts(connection, ids):
        for row in connection.execute(select(table).where(ids_in(connection, table.c.id, part))).mappings():
            found[row["id"]] = dict(row)
    return found
