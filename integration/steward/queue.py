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
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import Connection, and_, exists, func, not_, or_, select

from crm_core.merging import MODEL_OF, table_of
from crm_core.models import Base
from crm_core.steward_models import CLAIMS, USERS
from integration.steward.errors import StewardError

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
    sources: list[str] = field(default_factory=list)  # source systems, for the filter's choices

    @property
    def pages(self) -> int:
        """How many pages the filter has."""
        return max(1, -(-self.total // self.filter.per_page))


def _claimed(entity: str, record: Any, now: dt.datetime, user_id: int | None = None) -> Any:
    """EXISTS: a live claim on ``record`` (by ``user_id`` when given)."""
    conditions = [CLAIMS.c.entity == entity, CLAIMS.c.record_id == record, CLAIMS.c.expires_at > now]
    if user_id is not None:
        conditions.append(CLAIMS.c.user_id == user_id)
    return exists().where(*conditions)


def _conditions(
    connection: Connection, queue: QueueFilter, left: Any, right: Any, user_id: int, now: dt.datetime
) -> tuple[list[Any], Any]:
    """WHERE conditions of a filter, and the customers table joined for a contact's city (or None)."""
    c = CANDIDATES.c
    conditions: list[Any] = [c.status == "review", c.entity == queue.entity]
    low, high = BANDS.get(queue.band, (None, None))
    if low is not None:
        conditions += [c.probability >= low, c.probability < high]
    if queue.min_score is not None:
        conditions.append(c.probability >= queue.min_score)
    if queue.max_score is not None:
        conditions.append(c.probability <= queue.max_score)
    if queue.source:
        conditions.append(
            or_(*(exists().where(CROSSWALK.c.entity == queue.entity, CROSSWALK.c.entity_id == side,
                                 CROSSWALK.c.system == queue.source) for side in (c.left_id, c.right_id)))
        )  # fmt: skip
    company = None
    if queue.city:
        if queue.entity == "customer":
            conditions.append(or_(left.c.city == queue.city, right.c.city == queue.city))
        else:  # a contact's city is its customer's (both contacts of a pair share the customer)
            company = CUSTOMERS.alias("company")
            conditions.append(company.c.city == queue.city)
    sides = (c.left_id, c.right_id)
    if queue.assigned == "unassigned":
        conditions += [not_(_claimed(queue.entity, side, now)) for side in sides]
    elif queue.assigned == "available":  # nobody else holds either record
        conditions += [
            not_(exists().where(CLAIMS.c.entity == queue.entity, CLAIMS.c.record_id == side,
                                CLAIMS.c.expires_at > now, CLAIMS.c.user_id != user_id))
            for side in sides
        ]  # fmt: skip
    elif queue.assigned:
        holder = user_id if queue.assigned == "me" else _user_id_or_none(connection, queue.assigned)
        conditions.append(or_(*(_claimed(queue.entity, side, now, holder or -1) for side in sides)))
    return conditions, company


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
    """Pending pairs per entity (served by the status/entity/score index alone)."""
    c = CANDIDATES.c
    rows = connection.execute(
        select(c.entity, func.count()).where(c.status == "review").group_by(c.entity)
    ).all()
    counts = dict.fromkeys(ENTITIES, 0)
    counts.update({entity: int(count) for entity, count in rows})
    return counts


def queue_page(connection: Connection, queue: QueueFilter, user_id: int) -> QueuePage:
    """Return one page of the queue: pairs with both records' names, keys, cities and who holds them."""
    now = dt.datetime.now(dt.UTC)
    table = table_of(MODEL_OF[queue.entity])
    left, right = table.alias("l"), table.alias("r")
    c = CANDIDATES.c
    conditions, company = _conditions(connection, queue, left, right, user_id, now)
    # Filter, sort and page on the candidates alone (joined only for a city filter), then read the names
    # of the page's pairs: a sort by an expression never joins every pending pair.
    filtered = _filtered(queue, left, right, company)
    total = int(connection.scalar(select(func.count()).select_from(filtered).where(*conditions)) or 0)
    ids = [
        int(i)
        for (i,) in connection.execute(
            select(c.id).select_from(filtered).where(*conditions).order_by(*_order(queue.sort))
            .limit(queue.per_page).offset((queue.page - 1) * queue.per_page)
        )
    ]  # fmt: skip
    key = "credit_code" if queue.entity == "customer" else "mobile"
    city_of = (
        (left.c.city, right.c.city)
        if queue.entity == "customer"
        else (_company_city(left.c.customer_id), _company_city(right.c.customer_id))
    )
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
                left.c[key].label("left_key"), right.c[key].label("right_key"),
                city_of[0].label("left_city"), city_of[1].label("right_city"),
                left.c.merged_into_id.label("left_merged_into"),
                right.c.merged_into_id.label("right_merged_into"), holder.label("held_by"),
            )
            .select_from(CANDIDATES.join(left, left.c.id == c.left_id).join(right, right.c.id == c.right_id))
            .where(c.id.in_(ids))
        )
    } if ids else {}  # fmt: skip
    rows = [found[i] for i in ids if i in found]
    return QueuePage(queue, rows, total, pending_counts(connection))


def _filtered(queue: QueueFilter, left: Any, right: Any, company: Any) -> Any:
    """What a filter selects from: the candidates, joined to their records only for a city filter."""
    if not queue.city:
        return CANDIDATES
    c = CANDIDATES.c
    joined = CANDIDATES.join(left, left.c.id == c.left_id).join(right, right.c.id == c.right_id)
    return joined if company is None else joined.join(company, company.c.id == left.c.customer_id)


def _company_city(customer_id: Any) -> Any:
    return select(CUSTOMERS.c.city).where(CUSTOMERS.c.id == customer_id).scalar_subquery()


def source_systems(connection: Connection, entity: str) -> list[str]:
    """The source systems the crosswalk knows for an entity (the source filter's choices)."""
    rows = connection.execute(
        select(CROSSWALK.c.system).where(CROSSWALK.c.entity == entity).group_by(CROSSWALK.c.system)
    )
    return sorted(str(s) for (s,) in rows)


def first_available(
    connection: Connection, queue: QueueFilter, user_id: int, skipped: tuple[int, ...] = (), limit: int = 20
) -> list[int]:
    """Candidate ids at the top of a filter that nobody else holds and this session did not skip."""
    now = dt.datetime.now(dt.UTC)
    mine = replace(queue, assigned="available")
    table = table_of(MODEL_OF[queue.entity])
    left, right = table.alias("l"), table.alias("r")
    conditions, company = _conditions(connection, mine, left, right, user_id, now)
    c = CANDIDATES.c
    if skipped:
        conditions.append(c.id.not_in(list(skipped)))
    rows = connection.execute(
        select(c.id).select_from(_filtered(queue, left, right, company)).where(and_(*conditions))
        .order_by(*_order(queue.sort)).limit(limit)
    )  # fmt: skip
    return [int(i) for (i,) in rows]
