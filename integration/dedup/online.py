"""Online duplicate check (商机报备): score one incoming record against the golden customers in milliseconds.

The index holds the golden customers once, with a dictionary per blocking key (credit code, phone,
name core, e-mail domain, and the first two characters of the name core for near-misses). A query
collects the candidates its keys point at, compares them with the same rules as the batch linkage, and
scores them Fellegi–Sunter style: each comparison level adds log(m/u), where u — how often two random
customers agree at that level — is measured on random pairs of the indexed customers when the index is
built, and m — how often true duplicates agree — takes the fixed values below. A value missing on either
side adds nothing. The prior spreads an even chance of "already registered" over the blocked candidates.
A candidate that disagrees with the record on a hard key (credit code, region, branch) is shown but
capped below the review threshold: a 分公司 is never reported as its head office.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from integration.dedup.customers import CUSTOMER_SPEC, linkage_row
from integration.dedup.linkage import LinkageSpec, SimilarityLevels
from integration.dedup.normalize import credit_code_parts

ALREADY_REGISTERED = 0.5  # prior chance that the record is some existing customer, spread over candidates
M_TOP, M_LOWER = 0.9, 0.07  # P(level | same company): top level, each lower level; the rest is disagreement
U_SAMPLE_PAIRS = 50_000
# Fields whose agreement is evidence but whose difference is not: a rare trade name (the name comparison
# already weighs a different name) and a street address (written many ways).
AGREEMENT_ONLY = frozenset({"trade_rare", "address_key"})


@dataclass(frozen=True)
class Candidate:
    """A golden customer the incoming record may be, with its probability and comparison levels."""

    customer_id: int
    name: str | None
    probability: float
    levels: dict[str, int]


def query_record(name: str | None = None, **fields: Any) -> dict[str, Any]:
    """Turn what a form has (name, credit_code, phone, email, city) into a linkage row."""
    return linkage_row(
        name, credit_code=fields.get("credit_code"), phone=fields.get("phone"), email=fields.get("email"),
        city=fields.get("city"),
    )  # fmt: skip


class MatchIndex:
    """Golden customers indexed for one-record matching (see module doc)."""

    def __init__(self, records: pd.DataFrame, spec: LinkageSpec = CUSTOMER_SPEC, seed: int = 0) -> None:
        self.spec = spec
        self.records = records
        self.ids = records.index.to_numpy()
        self.blocks: dict[str, dict[Any, list[int]]] = {}
        keys = [block[0] for block in spec.blocks if len(block) == 1] + ["name_prefix"]
        prefix = records["name_core"].fillna("").astype(str).str[:2]
        for key in keys:
            column = prefix if key == "name_prefix" else records[key]
            index: dict[Any, list[int]] = defaultdict(list)
            for position, value in enumerate(column.to_numpy()):
                if value is not None and value == value and value != "":
                    index[value].append(position)
            self.blocks[key] = dict(index)
        self.features = [
            SimilarityLevels(c.field, c.field, c.method, c.levels, c.name) for c in spec.comparisons
        ]
        self.weights = self._weights(seed)

    def _weights(self, seed: int) -> dict[str, list[float]]:
        """log(m/u) per comparison level, with u measured on random pairs of indexed customers."""
        rng = np.random.default_rng(seed)
        count = len(self.records)
        pairs = min(U_SAMPLE_PAIRS, max(count * (count - 1) // 2, 1))
        left = (
            self.records.iloc[rng.integers(0, count, pairs)].reset_index(drop=True) if count else self.records
        )
        right = (
            self.records.iloc[rng.integers(0, count, pairs)].reset_index(drop=True) if count else self.records
        )
        weights: dict[str, list[float]] = {}
        for comparison, feature in zip(self.spec.comparisons, self.features, strict=True):
            top = len(comparison.levels)
            given = (left[comparison.field].notna() & right[comparison.field].notna()).to_numpy()
            levels = feature._compute_vectorized(left[comparison.field], right[comparison.field]).to_numpy()[
                given
            ]
            m = [1 - M_TOP - M_LOWER * (top - 1)] + [M_LOWER] * (top - 1) + [M_TOP]
            # Laplace-smoothed u: a level never seen among random pairs is rare, not impossible.
            u = [(np.sum(levels == level) + 1) / (len(levels) + top + 1) for level in range(top + 1)]
            weight = [math.log(m[level] / u[level]) for level in range(top + 1)]
            if comparison.field in AGREEMENT_ONLY:
                weight[0] = 0.0
            for level in range(top - 1, 0, -1):  # a closer level never counts less than a looser one
                weight[level] = min(weight[level], weight[level + 1])
            weights[comparison.name] = weight
        return weights

    def candidates(self, record: Mapping[str, Any]) -> list[int]:
        """Return the positions of indexed customers sharing a blocking key with ``record``."""
        found: set[int] = set()
        for key, index in self.blocks.items():
            value = (record.get("name_core") or "")[:2] if key == "name_prefix" else record.get(key)
            if value:
                found.update(index.get(value, ()))
        return sorted(found)

    def match(self, record: Mapping[str, Any], limit: int = 5) -> list[Candidate]:
        """Return the most likely golden customers for ``record`` (see :func:`query_record`), best first."""
        positions = self.candidates(record)
        if not positions:
            return []
        others = self.records.iloc[positions]
        query = pd.DataFrame([dict(record)] * len(positions), index=others.index)
        prior = ALREADY_REGISTERED / len(positions)
        score = np.full(len(positions), math.log(prior / (1 - prior)))
        levels: dict[str, np.ndarray] = {}
        for comparison, feature in zip(self.spec.comparisons, self.features, strict=True):
            mine, theirs = query[comparison.field], others[comparison.field]
            level = feature._compute_vectorized(mine, theirs).to_numpy()
            levels[comparison.name] = level
            given = (mine.notna() & theirs.notna()).to_numpy()
            score += np.where(given, np.asarray(self.weights[comparison.name])[level], 0.0)
        probability = 1 / (1 + np.exp(-score))
        if "credit_code" in query and self.spec.hard_keys:
            # one credit code: at least worth a steward's look, whatever the name says
            code = credit_code_parts(query["credit_code"].iloc[0]).raw
            same_code = (others["credit_code"] == code).to_numpy() if code else np.zeros(len(others), bool)
            probability = np.where(same_code, np.maximum(probability, self.spec.review), probability)
        for key in self.spec.location_keys:  # another city or province: not this customer
            mine, theirs = query[key], others[key]
            conflict = (mine.notna() & theirs.notna() & (mine.astype(str) != theirs.astype(str))).to_numpy()
            probability = np.where(conflict, np.minimum(probability, self.spec.review * 0.5), probability)
        for key in self.spec.hard_keys:
            mine, theirs = query[key], others[key]
            conflict = (mine.notna() & theirs.notna() & (mine.astype(str) != theirs.astype(str))).to_numpy()
            probability = np.where(conflict, np.minimum(probability, self.spec.review * 0.98), probability)
        best = np.argsort(-probability, kind="stable")[:limit]
        return [
            Candidate(
                int(others.index[i]),
                others["name"].iloc[i],
                round(float(probability[i]), 4),
                {name: int(values[i]) for name, values in levels.items()},
            )
            for i in best
        ]
