"""The review queue as the workbench shows it: pending pairs filtered, sorted and paged in SQL.

Every page is two statements (the page and its count) plus one for the counts per entity, whatever the
queue's size: filters are WHERE clauses (EXISTS for a source system or a claim), names come from one join,
and the indexes of migration 0009 serve the status/entity/score predicate. Parameters are bound, never
pasted into SQL; a value that is not one of the allowed ones is refused with a message.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from sqlalchemy import Connection, exists, func, or_, select

from crm_core.merging import MODEL_OF, active_records, table_of
from crm_core.models import Base
from crm_core.steward_models import CLAIMS, USERS
from integration.steward.errors import StewardError

if TYPE_CHECKING:
    from integration.dedup.linkage import Evaluation

TABLES = Base.metadata.tables

CANDIDATES = TABLES["match_candidates"]
CROSSWALK = TABLES["external_ids"]
CUSTOMERS = TABLES["customers"]
ENTITIES = ("customer", "contact")
# Score bands inside the review band (linkage sends pairs between review and auto_merge to stewards).
BANDS: dict[str, tuple[float, float]] = {"high": (0.8, 1.01), "medium": (0.65, 0.8), "low": (0.0, 0.65)}
SORTS = {
    "uncertain": "closest to a coin toss first",
    "score_desc": "highest score first",
    "score_asc": "lowest score first",
    "newest": "newest first",
    "oldest": "oldest first",
}
PER_PAGE = (25, 50, 100, 200)
COUNT_CAP = 5000  # a filter on the records (source, city, claims) is counted up to this: "5,000+"
# Assigned filter: anyone, pairs nobody holds, pairs I hold, pairs free for me (nobody else holds them).
ASSIGNED_SPECIAL = ("", "unassigned", "me", "available")


@dataclass(frozen=True)
class QueueFilter:
    """What the queue page shows: filters, sort and page (parsed from the query string)."""

    entity: str = "customer"
    band: str = ""
    min_score: float | None = None
    max_score: float | None = None
    source: str = ""
    city: str = ""
    assigned: str = ""
    sort: str = "uncertain"
    page: int = 1
    per_page: int = 50

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> QueueFilter:
        """Parse query parameters; refuse values that are not allowed (never pass them to SQL as text)."""
        entity = params.get("entity") or "customer"
        if entity not in ENTITIES:
            raise StewardError(f"unknown entity '{entity}'; use customer or contact")
        band = params.get("band") or ""
        if band and band not in BANDS:
            raise StewardError(f"unknown score band '{band}'; use {', '.join(BANDS)}")
        sort = params.get("sort") or "uncertain"
        if sort not in SORTS:
            raise StewardError(f"unknown sort '{sort}'; use {', '.join(SORTS)}")

        def number(name: str, low: float, high: float) -> float | None:
            text = (params.get(name) or "").strip()
            if not text:
                return None
            try:
                value = float(text)
            except ValueError:
                raise StewardError(f"{name} must be a number between {low} and {high}") from None
            if not low <= value <= high:
                raise StewardError(f"{name} must be a number between {low} and {high}")
            return value

        per_page = int(number("per_page", 1, 1000) or 50)
        if per_page not in PER_PAGE:
            per_page = 50
        return cls(
            entity=entity, band=band, min_score=number("min", 0, 1), max_score=number("max", 0, 1),
            source=(params.get("source") or "").strip()[:64], city=(params.get("city") or "").strip()[:32],
            assigned=(params.get("assigned") or "").strip()[:64], sort=sort,
            page=int(number("page", 1, 10**7) or 1), per_page=per_page,
        )  # fmt: skip

    def query(self, **changes: Any) -> str:
        """The query string of this filter with ``changes`` (for links: sort, next page...)."""
        changed = replace(self, **changes)
        values = {
            "entity": changed.entity, "band": changed.band,
            "min": "" if changed.min_score is None else changed.min_score,
            "max": "" if changed.max_score is None else changed.max_score, "source": changed.source,
            "city": changed.city, "assigned": changed.assigned, "sort": changed.sort,
            "page": changed.page, "per_page": changed.per_page,
        }  # fmt: skip
        return urlencode({k: v for k, v in values.items() if v not in ("", None)})


@dataclass
class QueuePage:
    """A page of pending pairs and the counts around it."""

    filter: QueueFilter
    rows: list[dict[str, Any]]
    total: int  # pairs matching the filter
    pending: dict[str, int]  # pending pairs per entity, unfiltered
    capped: bool = False  # more than COUNT_CAP pairs match (a filter on the records is counted up to it)

    @property
    def pages(self) -> int:
        """How many pages the filter has."""
        return max(1, -(-self.total // self.filter.per_page))


def _either(ids: Any) -> Any:
    """Either record of the pair is in the subquery ``ids`` (each side served by its own index)."""
    c = CANDIDATES.c
    return or_(c.left_id.in_(ids), c.right_id.in_(ids))


def filter_conditions(
    connection: Connection, queue: QueueFilter, user_id: int, now: dt.datetime
) -> list[Any]:
    """WHERE conditions of a filter, on the candidates alone (no join): a city or claim filter is
    ``IN (subquery)``, evaluated once; a source filter probes the crosswalk's covering index per side."""
    c = CANDIDATES.c
    conditions: list[Any] = [c.status == "review", c.entity == queue.entity]
    low, high = BANDS.get(queue.band, (None, None))
    if low is not None:
        conditions += [c.probability >= low, c.probability < high]
    if queue.min_score is not None:
        conditions.append(c.probability >= queue.min_score)
    if queue.max_score is not None:
        conditions.append(c.probability <= queue.max_score)
    if queue.source:  # most pairs have a record from a big source: an index probe per pair, no hash of all
        conditions.append(exists().where(
            CROSSWALK.c.entity == queue.entity, CROSSWALK.c.system == queue.source,
            CROSSWALK.c.entity_id.in_([c.left_id, c.right_id]),
        ))  # fmt: skip
    if queue.city:
        in_city = select(CUSTOMERS.c.id).where(CUSTOMERS.c.city == queue.city)
        if queue.entity == "contact":  # a contact's city is its customer's
            contacts = TABLES["contacts"]
            in_city = select(contacts.c.id).where(contacts.c.customer_id.in_(in_city))
        conditions.append(_either(in_city))
    claims = select(CLAIMS.c.record_id).where(CLAIMS.c.entity == queue.entity, CLAIMS.c.expires_at > now)
    sides = (c.left_id, c.right_id)
    if queue.assigned == "unassigned":
        conditions += [side.not_in(claims) for side in sides]
    elif queue.assigned == "available":  # nobody else holds either record
        others = claims.where(CLAIMS.c.user_id != user_id)
        conditions += [side.not_in(others) for side in sides]
    elif queue.assigned:
        holder = user_id if queue.assigned == "me" else _user_id_or_none(connection, queue.assigned)
        conditions.append(_either(claims.where(CLAIMS.c.user_id == (holder or -1))))
    return conditions


def _user_id_or_none(connection: Connection, name: str) -> int | None:
    found = connection.scalar(select(USERS.c.id).where(USERS.c.name == name))
    return None if found is None else int(found)


def _order(sort: str) -> list[Any]:
    c = CANDIDATES.c
    orders: dict[str, list[Any]] = {
        "uncertain": [func.abs(c.probability - 0.5), c.id],
        "score_desc": [c.probability.desc(), c.id],
        "score_asc": [c.probability, c.id],
        "newest": [c.id.desc()],
        "oldest": [c.id],
    }
    return orders[sort]


def pending_counts(connection: Connection) -> dict[str, int]:
    """Pending pairs per entity (a range of the queue index each)."""
    c = CANDIDATES.c
    return {
        entity: int(
            connection.scalar(select(func.count()).where(c.status == "review", c.entity == entity)) or 0
        )
        for entity in ENTITIES
    }


def queue_page(connection: Connection, queue: QueueFilter, user_id: int) -> QueuePage:
    """Return one page of the queue: pairs with both records' names, keys, cities and who holds them."""
    now = dt.datetime.now(dt.UTC)
    table = table_of(MODEL_OF[queue.entity])
    left, right = table.alias("l"), table.alias("r")
    c = CANDIDATES.c
    conditions = filter_conditions(connection, queue, user_id, now)
    # Filter, sort and page on the candidates alone, in the order of the (status, entity, probability,
    # left, right) index where the sort allows, so a page stops reading once it is full; then read the
    # names of the page's pairs. A filter on the records (source, city, claims) is counted up to a cap.
    pending = pending_counts(connection)
    if queue.source or queue.city or queue.assigned:
        limited = select(c.id).where(*conditions).limit(COUNT_CAP + 1).subquery()
        total = int(connection.scalar(select(func.count()).select_from(limited)) or 0)
    elif queue.band or queue.min_score is not None or queue.max_score is not None:
        total = int(connection.scalar(select(func.count()).select_from(CANDIDATES).where(*conditions)) or 0)
    else:
        total = pending[queue.entity]
    ids = page_ids(connection, conditions, queue.sort, (queue.page - 1) * queue.per_page, queue.per_page)

    def key_of(record: Any) -> Any:  # a customer's code as written shows where no valid code was kept
        if queue.entity == "customer":
            return func.coalesce(record.c.credit_code, record.c.credit_code_as_written)
        return record.c.mobile

    def city_of_record(record: Any) -> Any:  # a contact's city is its customer's
        return record.c.city if queue.entity == "customer" else _company_city(record.c.customer_id)

    city_of = (city_of_record(left), city_of_record(right))
    holder = (
        select(USERS.c.name)
        .join(CLAIMS, CLAIMS.c.user_id == USERS.c.id)
        .where(CLAIMS.c.entity == queue.entity, CLAIMS.c.expires_at > now,
               or_(CLAIMS.c.record_id == c.left_id, CLAIMS.c.record_id == c.right_id))
        .limit(1)
        .scalar_subquery()
    )  # fmt: skip
    found = {
        row.id: dict(row._mapping)
        for row in connection.execute(
            select(
                c.id, c.probability, c.left_id, c.right_id, c.features,
                left.c.name.label("left_name"), right.c.name.label("right_name"),
                key_of(left).label("left_key"), key_of(right).label("right_key"),
                city_of[0].label("left_city"), city_of[1].label("right_city"),
                left.c.merged_into_id.label("left_merged_into"),
                right.c.merged_into_id.label("right_merged_into"), holder.label("held_by"),
            )
            .select_from(CANDIDATES.join(left, left.c.id == c.left_id).join(right, right.c.id == c.right_id))
            .where(c.id.in_(ids))
        )
    } if ids else {}  # fmt: skip
    rows = [found[i] for i in ids if i in found]
    _as_golden(connection, queue.entity, rows, key_of, city_of_record)
    rows = _one_row_per_golden_pair(rows)
    capped = total > COUNT_CAP and bool(queue.source or queue.city or queue.assigned)
    return QueuePage(queue, rows, COUNT_CAP if capped else total, pending, capped=capped)


def _as_golden(
    connection: Connection, entity: str, rows: list[dict[str, Any]], key_of: Any, city_of: Any
) -> None:
    """Show each side of the page's pairs as the golden record it is now: a side merged since takes the name,
    key and city of the record it ended in (``left_golden``/``right_golden``: its id; the pair's own ids stay
    the records linkage compared). A few queries for the whole page."""
    model = MODEL_OF[entity]
    merged = [row[f"{side}_id"] for row in rows for side in ("left", "right") if row[f"{side}_merged_into"]]
    active = active_records(connection, model, merged) if merged else {}
    golden: dict[int, dict[str, Any]] = {}
    if active:
        table = table_of(model)
        for found in connection.execute(
            select(table.c.id, table.c.name.label("name"), key_of(table).label("key"), city_of(table).label("city"))
            .where(table.c.id.in_(sorted(set(active.values()))))
        ).mappings():  # fmt: skip
            golden[found["id"]] = dict(found)
    for row in rows:
        for side in ("left", "right"):
            record = golden.get(active.get(row[f"{side}_id"], -1))
            row[f"{side}_golden"] = record["id"] if record else None
            if record:
                row[f"{side}_name"], row[f"{side}_key"], row[f"{side}_city"] = (
                    record["name"],
                    record["key"],
                    record["city"],
                )


def _one_row_per_golden_pair(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The page's pairs with those that stand for the same two golden records shown once, at the place of the
    first: the one scored on those records themselves where the page has it, the others' ids in ``same_pair``
    (deciding it decides them: :func:`integration.dedup.workflow.close_standing_pairs`)."""
    shown: dict[tuple[int, int], int] = {}  # golden pair → its place in ``out``
    out: list[dict[str, Any]] = []
    for row in rows:
        left, right = row["left_golden"] or row["left_id"], row["right_golden"] or row["right_id"]
        place = shown.get((min(left, right), max(left, right)))
        row["same_pair"] = []
        if place is None:
            shown[(min(left, right), max(left, right))] = len(out)
            out.append(row)
            continue
        first = out[place]
        if (first["left_golden"] or first["right_golden"]) and not (
            row["left_golden"] or row["right_golden"]
        ):
            row["same_pair"], out[place] = [*first["same_pair"], first["id"]], row
        else:
            first["same_pair"].append(row["id"])
    for row in out:
        row["same_pair"].sort()
    return out


def page_ids(connection: Connection, conditions: list[Any], sort: str, offset: int, limit: int) -> list[int]:
    """The ids of one page. "Closest to a coin toss" reads two index ranges (scores from 0.5 up, and below
    0.5 down) and merges them: no sort of every matching pair by an expression."""
    c = CANDIDATES.c
    if sort != "uncertain":
        query = select(c.id).where(*conditions).order_by(*_order(sort)).limit(limit).offset(offset)
        return [int(i) for (i,) in connection.execute(query)]
    wanted = offset + limit
    upper = select(c.id, c.probability).where(*conditions, c.probability >= 0.5)
    lower = select(c.id, c.probability).where(*conditions, c.probability < 0.5)
    rows = [
        *connection.execute(upper.order_by(c.probability, c.id).limit(wanted)),
        *connection.execute(lower.order_by(c.probability.desc(), c.id).limit(wanted)),
    ]
    rows.sort(key=lambda r: (abs(r.probability - 0.5), r.id))
    return [int(r.id) for r in rows[offset:wanted]]


def _company_city(customer_id: Any) -> Any:
    return select(CUSTOMERS.c.city).where(CUSTOMERS.c.id == customer_id).scalar_subquery()


@dataclass(frozen=True)
class Training:
    """Steward decisions per entity, each way, and the classifier the next linkage run will use."""

    same: dict[str, int]
    different: dict[str, int]
    needed: int  # decisions of each kind before a supervised model replaces ECM
    # per entity: the supervised model cross-validated on the decided pairs (None: too few decisions yet)
    evaluation: dict[str, Evaluation | None] = field(default_factory=dict)

    def classifier(self, entity: str, setting: str) -> str:
        """What the next linkage run of ``entity`` fits, given the project's ``classifier`` setting."""
        enough = min(self.same.get(entity, 0), self.different.get(entity, 0)) >= self.needed
        if setting == "ecm" or (setting == "auto" and not enough):
            return "ECM (unsupervised)"
        return (
            "supervised (logistic regression on steward decisions)"
            if enough
            else "supervised: not enough decisions"
        )


def training(connection: Connection) -> Training:
    """Pairs stewards decided (not linkage), per entity and side, and the supervised model cross-validated
    on them (``linkage.cross_validate``; a scan of the decided pairs and a few small fits: cache it)."""
    from integration.dedup.contacts import CONTACT_SPEC
    from integration.dedup.customers import CUSTOMER_SPEC
    from integration.dedup.linkage import MIN_LABELS, cross_validate
    from integration.dedup.workflow import steward_labels

    c = CANDIDATES.c
    rows = connection.execute(
        select(c.entity, c.status, func.count())
        .where(c.status.in_(("merged", "distinct")), c.decided_by.is_not(None), c.decided_by != "linkage")
        .group_by(c.entity, c.status)
    ).all()
    same = {e: int(n) for e, st, n in rows if st == "merged"}
    different = {e: int(n) for e, st, n in rows if st == "distinct"}
    evaluation: dict[str, Evaluation | None] = {}
    for entity, spec in (("customer", CUSTOMER_SPEC), ("contact", CONTACT_SPEC)):
        if min(same.get(entity, 0), different.get(entity, 0)) >= MIN_LABELS:
            labels = steward_labels(connection, spec, entity)
            evaluation[entity] = cross_validate(labels, spec) if labels is not None else None
    return Training(same, different, MIN_LABELS, evaluation)


def source_systems(connection: Connection, entity: str, most: int = 50) -> list[str]:
    """The source systems the crosswalk knows for an entity (the source filter's choices), read one by one
    from the (entity, system, …) index: a seek per system instead of a scan of every crosswalk key."""
    found: list[str] = []
    while len(found) < most:
        query = select(func.min(CROSSWALK.c.system)).where(CROSSWALK.c.entity == entity)
        if found:
            query = query.where(CROSSWALK.c.system > found[-1])
        system = connection.scalar(query)
        if system is None:
            break
        found.append(str(system))
    return found


def first_available(
    connection: Connection, queue: QueueFilter, user_id: int, skipped: tuple[int, ...] = (), limit: int = 20
) -> list[int]:
    """Candidate ids at the top of a filter that nobody else holds and this session did not skip."""
    now = dt.datetime.now(dt.UTC)
    mine = replace(queue, assigned="available")
    conditions = filter_conditions(connection, mine, user_id, now)
    c = CANDIDATES.c
    if skipped:
        conditions.append(c.id.not_in(list(skipped)))
    return page_ids(connection, conditions, queue.sort, 0, limit)
