"""Online duplicate check (商机报备): score one incoming record against the golden customers in milliseconds.

The index holds the golden customers once, column by column in plain lists (no pandas per call), with a
dictionary per exact blocking key (credit code, organisation code, phone, name core, street address,
e-mail domain) and an inverted index of the name core's character bigrams. A query takes the customers
its exact keys point at (a key shared by more than :data:`MAX_EXACT` customers says nothing and is
skipped) and the :data:`NAME_CANDIDATES` customers sharing most bigrams of its name core (bigrams held by
more than :data:`MAX_POSTINGS` customers — 科技, 贸易 — are skipped, and a candidate must share a third of
the query's bigrams): a bounded set, however many customers the index holds, and a typo anywhere in the
name still finds the customer. The candidates are compared with the same rules as the batch linkage
(:func:`integration.dedup.linkage.similarity_levels`, single-threaded: rapidfuzz's thread pool costs more
than a few dozen comparisons) and scored Fellegi–Sunter style: each comparison level adds log(m/u), where
u — how often two random customers agree at that level — is measured on random pairs of the indexed
customers when the index is built, and m — how often true duplicates agree — takes the fixed values below.
A value missing on either side adds nothing. The prior spreads an even chance of "already registered" over
the candidates. A candidate that disagrees with the record on a hard key (credit code, region, branch) is
shown but capped below the review threshold: a 分公司 is never reported as its head office.

Customers can be added, replaced and removed in place (:meth:`MatchIndex.add`, :meth:`MatchIndex.remove`):
a removed row is marked dead and skipped, so the steward API refreshes the index without a rebuild.
:class:`NameIndex` gives the same matches from linkage rows computed only as its queries need them: the name
resolver's name-only queries read a few of the rows a whole core's index would hold.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import numpy as np
import pandas as pd

from crm_core.errors import DedupError
from integration.dedup.customers import CUSTOMER_SPEC, NAME_FIELDS, linkage_row
from integration.dedup.linkage import Comparison, LinkageSpec, _texts, similarity_levels
from integration.dedup.normalize import credit_code_parts, normalize_company_name

ALREADY_REGISTERED = 0.5  # prior chance that the record is some existing customer, spread over candidates
M_TOP, M_LOWER = 0.9, 0.07  # P(level | same company): top level, each lower level; the rest is disagreement
U_SAMPLE_PAIRS = 50_000
# Fields whose agreement is evidence but whose difference is not: a rare trade name (the name comparison
# already weighs a different name) and a street address (written many ways).
AGREEMENT_ONLY = frozenset({"trade_rare", "address_key"})
NAME_CANDIDATES = 50  # customers sharing most name bigrams with the query, scored in full
MAX_POSTINGS = 5_000  # a bigram more customers share than this (科技, 贸易) selects nobody
MAX_EXACT = 1_000  # an exact key (a switchboard phone) more customers share than this selects nobody


@dataclass(frozen=True)
class Candidate:
    """A golden customer the incoming record may be, with its probability and comparison levels."""

    customer_id: int
    name: str | None
    probability: float
    levels: dict[str, int]


def form_record(
    name: str | None,
    *,
    phone: str | None = None,
    credit_code: str | None = None,
    email: str | None = None,
    city: str | None = None,
) -> dict[str, Any]:
    """Turn what a person typed in a form into a linkage row, normalized as a load normalizes a source row.

    A credit code failing its check digit (damaged, 15-digit, cut short) is compared as written, as a load
    keeps it in ``credit_code_as_written``; a local phone number without its area code takes the city's, as
    a mapping's ``area_code_from`` does. Raises ``TransformFailure`` for a phone that is no number and a
    credit-code cell that is no code at all (a placeholder such as ``123``).
    """
    from integration.geo import area_code_of_city
    from integration.mappings.transforms import (
        TransformFailure,
        phone_e164,
        uscc_as_written_value,
        uscc_value,
        with_area_code,
    )

    number = None
    if phone:
        try:
            number = phone_e164(phone)
        except TransformFailure:
            # a local number without its area code, completed from the city as a mapping's area_code_from does
            code = area_code_of_city(city) if city else None
            completed = with_area_code(phone, code) if code else None
            if completed is None:
                raise
            number = phone_e164(completed)
    valid_code = written_code = None
    if credit_code:
        try:
            valid_code = uscc_value(credit_code)
        except TransformFailure:
            written_code = uscc_as_written_value(credit_code)
            if written_code is None:
                raise
    return query_record(
        name, phone=number, credit_code=valid_code,
        credit_code_as_written=written_code, email=email, city=city,
    )  # fmt: skip


def query_record(name: str | None = None, **fields: Any) -> dict[str, Any]:
    """Turn what a form has (name, credit_code or credit_code_as_written, phone, email, city) into a linkage row."""
    return linkage_row(
        name, credit_code=fields.get("credit_code"), phone=fields.get("phone"), email=fields.get("email"),
        city=fields.get("city"), credit_code_as_written=fields.get("credit_code_as_written"),
    )  # fmt: skip


def _value(value: Any) -> Any:
    """None for a missing value (None, NaN, pd.NA, NaT, empty text), else the value."""
    if isinstance(value, str):  # most values: one check (the index is built from every golden customer)
        return value or None
    if value is None or value is pd.NA or value != value:  # NaN and NaT differ from themselves
        return None
    return value


def name_grams(core: Any) -> set[str]:
    """The character bigrams of a name core (a one-character core is its own gram)."""
    if not isinstance(core, str) or not core:
        return set()
    return {core[i : i + 2] for i in range(len(core) - 1)} if len(core) > 1 else {core}


def _sampled_pairs(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The positions of the random pairs u is measured on (left, right), as drawn from ``seed``."""
    if not count:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    pairs = min(U_SAMPLE_PAIRS, max(count * (count - 1) // 2, 1))
    return rng.integers(0, count, pairs), rng.integers(0, count, pairs)


def _weight(comparison: Comparison, left: pd.Series, right: pd.Series) -> list[float]:
    """log(m/u) per level of one comparison, u measured on the random pairs' values ``left`` and ``right``."""
    top = len(comparison.levels)
    given = (left.notna() & right.notna()).to_numpy()
    # the linkage's comparison (recordlinkage_parts.SimilarityLevels), without recordlinkage
    levels = similarity_levels(
        comparison.method, tuple(sorted(comparison.levels, reverse=True)), _texts(left), _texts(right)
    )[given]
    m = [1 - M_TOP - M_LOWER * (top - 1)] + [M_LOWER] * (top - 1) + [M_TOP]
    # Laplace-smoothed u: a level never seen among random pairs is rare, not impossible.
    u = [(np.sum(levels == level) + 1) / (len(levels) + top + 1) for level in range(top + 1)]
    weight = [math.log(m[level] / u[level]) for level in range(top + 1)]
    if comparison.field in AGREEMENT_ONLY:
        weight[0] = 0.0
    for level in range(top - 1, 0, -1):  # a closer level never counts less than a looser one
        weight[level] = min(weight[level], weight[level + 1])
    return weight


class MatchIndex:
    """Golden customers indexed for one-record matching (see module doc)."""

    def __init__(self, records: pd.DataFrame, spec: LinkageSpec = CUSTOMER_SPEC, seed: int = 0) -> None:
        self.spec = spec
        self.exact_keys = [block[0] for block in spec.blocks if len(block) == 1]
        wanted = {"name", "name_core", *self.exact_keys, *spec.hard_keys, *spec.location_keys}
        wanted |= {c.field for c in spec.comparisons}
        self.fields = sorted(wanted)  # a column the rows lack is kept as missing values
        self.columns: dict[str, list[Any]] = {f: [] for f in self.fields}
        self.ids: list[int] = []
        self.alive = bytearray()
        self.where: dict[int, int] = {}  # customer id -> its live position
        self.exact: dict[str, dict[Any, list[int]]] = {key: {} for key in self.exact_keys}
        self.grams: dict[str, array[int]] = {}
        self.weights = self._weights(records, seed)
        self.add(records)

    # ------------------------------------------------------------------ contents

    @property
    def size(self) -> int:
        """Live customers in the index."""
        return len(self.where)

    @property
    def dead_share(self) -> float:
        """Share of the index's rows that are replaced or gone."""
        return 1 - len(self.where) / max(1, len(self.ids))

    def add(self, records: pd.DataFrame) -> None:
        """Add linkage rows (indexed by customer id); a customer already in the index is replaced."""
        if records.empty:
            return
        self.remove(records.index)
        start = len(self.ids)
        for field in self.fields:
            values = records[field].to_numpy(dtype=object) if field in records else [None] * len(records)
            self.columns[field].extend(_value(v) for v in values)
        ids = [int(i) for i in records.index]
        self.ids.extend(ids)
        self.alive.extend(b"\x01" * len(ids))
        for offset, record_id in enumerate(ids):
            self.where[record_id] = start + offset
        for key in self.exact_keys:
            index, column = self.exact[key], self.columns[key]
            for position in range(start, len(self.ids)):
                value = column[position]
                if value is not None:
                    index.setdefault(value, []).append(position)
        grams, cores = self.grams, self.columns["name_core"]
        for position in range(start, len(self.ids)):
            for gram in name_grams(cores[position]):
                postings = grams.get(gram)
                if postings is None:
                    grams[gram] = postings = array("i")
                postings.append(position)

    def remove(self, ids: Iterable[Any]) -> None:
        """Drop customers by id (their rows stay, marked dead)."""
        for record_id in ids:
            position = self.where.pop(int(record_id), None)
            if position is not None:
                self.alive[position] = 0

    def value(self, customer_id: int, field: str) -> Any:
        """A live customer's linkage value (None when missing or not indexed)."""
        position = self.where.get(int(customer_id))
        return None if position is None or field not in self.columns else self.columns[field][position]

    # ------------------------------------------------------------------ weights

    def _weights(self, records: pd.DataFrame, seed: int) -> dict[str, list[float]]:
        """log(m/u) per comparison level, with u measured on random pairs of indexed customers."""
        count = len(records)
        left_at, right_at = _sampled_pairs(count, seed)
        left = records.iloc[left_at].reset_index(drop=True) if count else records
        right = records.iloc[right_at].reset_index(drop=True) if count else records
        weights: dict[str, list[float]] = {}
        for comparison in self.spec.comparisons:
            if comparison.field not in records:  # a column the rows lack: missing everywhere, no evidence
                weights[comparison.name] = [0.0] * (len(comparison.levels) + 1)
                continue
            weights[comparison.name] = _weight(comparison, left[comparison.field], right[comparison.field])
        return weights

    # ------------------------------------------------------------------ matching

    def candidates(self, record: Mapping[str, Any]) -> list[int]:
        """Return the live positions of the customers ``record`` is compared with (see module doc)."""
        found: set[int] = set()
        for key in self.exact_keys:
            value = _value(record.get(key))
            postings = self.exact[key].get(value) if value is not None else None
            if postings and len(postings) <= MAX_EXACT:
                found.update(postings)
        grams = name_grams(_value(record.get("name_core")))
        lists = [self.grams[g] for g in grams if g in self.grams and len(self.grams[g]) <= MAX_POSTINGS]
        if lists:
            shared = np.concatenate([np.frombuffer(p, dtype=np.int32) for p in lists])
            positions, counts = np.unique(shared, return_counts=True)
            keep = counts >= max(1, math.ceil(len(grams) / 3))
            positions, counts = positions[keep], counts[keep]
            best = np.argsort(-counts, kind="stable")[: NAME_CANDIDATES * 2]
            alive = self.alive
            found.update([p for p in positions[best].tolist() if alive[p]][:NAME_CANDIDATES])
        alive = self.alive
        return sorted(p for p in found if alive[p])

    def match(self, record: Mapping[str, Any], limit: int = 5) -> list[Candidate]:
        """Return the most likely golden customers for ``record`` (see :func:`query_record`), best first."""
        positions = self.candidates(record)
        if not positions:
            return []
        count = len(positions)
        columns = self.columns

        gather = itemgetter(*positions)  # one C call per column instead of a Python loop

        def theirs(field: str) -> np.ndarray:
            column = columns.get(field)
            out = np.empty(count, dtype=object)
            if column is None:
                return out
            out[:] = gather(column) if count > 1 else [column[positions[0]]]
            return out

        def mine(field: str) -> np.ndarray:
            out = np.empty(count, dtype=object)
            value = _value(record.get(field))
            out[:] = [str(value) if value is not None else None] * count
            return out

        prior = ALREADY_REGISTERED / count
        score = np.full(count, math.log(prior / (1 - prior)))
        levels: dict[str, np.ndarray] = {}
        for comparison in self.spec.comparisons:
            if _value(record.get(comparison.field)) is None:  # missing on the form: level 0, no evidence
                levels[comparison.name] = np.zeros(count, dtype=np.int8)
                continue
            left, right = mine(comparison.field), theirs(comparison.field)
            right = np.array([None if v is None else str(v) for v in right], dtype=object)
            level = similarity_levels(comparison.method, comparison.levels, left, right, workers=1)
            levels[comparison.name] = level
            given = np.fromiter((v is not None for v in right), dtype=bool, count=count)
            score += np.where(given, np.asarray(self.weights[comparison.name])[level], 0.0)
        probability = 1 / (1 + np.exp(-score))
        if "credit_code" in self.columns and self.spec.hard_keys and _value(record.get("credit_code")):
            # one credit code: at least worth a steward's look, whatever the name says
            code = credit_code_parts(record.get("credit_code")).raw
            if code:
                same_code = np.fromiter((v == code for v in theirs("credit_code")), dtype=bool, count=count)
                probability = np.where(same_code, np.maximum(probability, self.spec.review), probability)
        caps = [(key, 0.5) for key in self.spec.location_keys] + [(key, 0.98) for key in self.spec.hard_keys]
        for key, share in caps:  # another city or province, another credit code or branch: not this customer
            value = _value(record.get(key))
            if key == "credit_code":  # as in the batch linkage, only two valid codes conflict (a damaged,
                value = credit_code_parts(value).valid  # old-style or cut code may be this one)
            if value is None:
                continue
            others = theirs(key)
            if key == "credit_code":
                others = np.array([credit_code_parts(v).valid for v in others], dtype=object)
            conflict = np.fromiter(
                (v is not None and str(v) != str(value) for v in others), dtype=bool, count=count
            )
            probability = np.where(conflict, np.minimum(probability, self.spec.review * share), probability)
        best = np.argsort(-probability, kind="stable")[:limit]
        return [
            Candidate(
                self.ids[positions[i]],
                columns["name"][positions[i]] if "name" in columns else None,
                round(float(probability[i]), 4),
                {name: int(values[i]) for name, values in levels.items()},
            )
            for i in best
        ]


class NameIndex(MatchIndex):
    """A :class:`MatchIndex` over linkage rows computed as the queries need them: cheap for name-only queries.

    A name-only query (``query_record(name)``, the name resolver's) holds only what the name decides
    (:data:`~integration.dedup.customers.NAME_FIELDS`, and the city and province of a region written in it):
    it finds its candidates by name core alone and is scored on the name comparisons, capped by the
    candidates' place and branch. So the index reads every customer's name core up front (its exact key and
    bigrams), weighs a name comparison on the name fields of the random pairs :class:`MatchIndex` draws
    (the same pairs), and computes a customer's whole linkage row when it first is a candidate. Any other
    query is answered too, at the cost it needs: an exact key or a comparison of another field fills the
    rows it reads (every row, for an exact key). The matches are those of a :class:`MatchIndex` over the
    same rows in the same order.
    Filled as it is queried, it is for one thread (each load builds its own); the steward API's index, shared
    by request threads, stays a :class:`MatchIndex`.

    ``linkage(positions)`` returns the linkage rows (as :func:`~integration.dedup.customers.linkage_rows`
    gives them: no term frequency in ``trade_rare``) of the customers at those positions of ``ids``.
    """

    def __init__(
        self,
        ids: Sequence[int],
        names: Sequence[str | None],
        linkage: Callable[[list[int]], list[dict[str, Any]]],
        spec: LinkageSpec = CUSTOMER_SPEC,
        seed: int = 0,
    ) -> None:
        self.spec = spec
        self.exact_keys = [block[0] for block in spec.blocks if len(block) == 1]
        wanted = {"name", "name_core", *self.exact_keys, *spec.hard_keys, *spec.location_keys}
        wanted |= {c.field for c in spec.comparisons}
        self.fields = sorted(wanted)
        self._linkage = linkage
        count = len(names)
        self.ids = [int(i) for i in ids]
        self.alive = bytearray(b"\x01" * count)
        self.where = {record_id: position for position, record_id in enumerate(self.ids)}
        self._parts = [normalize_company_name(n or "") for n in names]
        self.columns = {f: [None] * count for f in self.fields}
        self.columns["name"] = [_value(n) for n in names]
        core = NAME_FIELDS["name_core"]
        self.columns["name_core"] = [_value(core(p)) for p in self._parts]
        self._filled = bytearray(count)  # 1: the position's whole linkage row is in the columns
        self.exact = {key: {} for key in self.exact_keys}
        self._exact_built: set[str] = set()
        if "name_core" in self.exact:
            self._index_exact("name_core")
        self.grams = {}
        grams = self.grams
        for position, core in enumerate(self.columns["name_core"]):
            for gram in name_grams(core):
                postings = grams.get(gram)
                if postings is None:
                    grams[gram] = postings = array("i")
                postings.append(position)
        self._pairs = _sampled_pairs(count, seed)
        self.weights = _LazyWeights(self)

    def _index_exact(self, key: str) -> None:
        """Build the dictionary of exact key ``key`` from its column (as :meth:`MatchIndex.add` does)."""
        index, column = self.exact[key], self.columns[key]
        for position, value in enumerate(column):
            if value is not None:
                index.setdefault(value, []).append(position)
        self._exact_built.add(key)  # only once built: a failure halfway leaves it to be built again

    def add(self, records: pd.DataFrame) -> None:
        """Not supported: the index holds the customers it was built with."""
        raise DedupError("a NameIndex holds the customers it was built with; build a MatchIndex to add some")

    def value(self, customer_id: int, field: str) -> Any:
        """A live customer's linkage value (None when missing or not indexed)."""
        position = self.where.get(int(customer_id))
        if position is not None:
            self._fill([position])
        return super().value(customer_id, field)

    def candidates(self, record: Mapping[str, Any]) -> list[int]:
        """Return the live positions of the customers ``record`` is compared with, their rows filled in."""
        for key in self.exact_keys:
            if key not in self._exact_built and _value(record.get(key)) is not None:
                self._fill(range(len(self.ids)))  # a key beside the name core: every customer's value
                self._index_exact(key)
        positions = super().candidates(record)
        self._fill(positions)
        return positions

    def _fill(self, positions: Iterable[int]) -> None:
        """Put the whole linkage rows of ``positions`` in the columns (those not there yet)."""
        filled = self._filled
        missing = [p for p in positions if not filled[p]]
        if not missing:
            return
        rows = self._linkage(missing)
        columns = self.columns
        for field in self.fields:
            column = columns[field]
            for position, row in zip(missing, rows, strict=True):
                column[position] = _value(row.get(field))
        for position in missing:
            filled[position] = 1

    def _comparison_weight(self, comparison: Comparison) -> list[float]:
        """The weights of one comparison, u measured on the sampled pairs' values of its field only."""
        left_at, right_at = self._pairs
        sampled = np.unique(np.concatenate([left_at, right_at])).tolist()
        values = np.empty(len(self.ids), dtype=object)
        if comparison.field in NAME_FIELDS:
            derive, parts = NAME_FIELDS[comparison.field], self._parts
            values[sampled] = [derive(parts[p]) for p in sampled] if sampled else []
        else:  # as linkage_rows gives them (an empty text is a value to the weights, as in MatchIndex)
            rows = self._linkage(sampled) if sampled else []
            if rows and comparison.field not in rows[0]:
                return [0.0] * (len(comparison.levels) + 1)
            values[sampled] = [row[comparison.field] for row in rows] if rows else []
        left = pd.Series(values[left_at], dtype=object)
        return _weight(comparison, left, pd.Series(values[right_at], dtype=object))


class _LazyWeights(dict[str, list[float]]):
    """A :class:`NameIndex`'s weights, each comparison's worked out when a query first needs it."""

    def __init__(self, index: NameIndex) -> None:
        super().__init__()
        self._comparisons = {c.name: c for c in index.spec.comparisons}
        self._index = index

    def __missing__(self, name: str) -> list[float]:
        found = self[name] = self._index._comparison_weight(self._comparisons[name])
        return found
