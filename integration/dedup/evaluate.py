"""Measuring a deduplication against labelled truth: precision, recall and F1 of pairs and clusters."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from itertools import combinations


@dataclass(frozen=True)
class Scores:
    """Precision, recall and F1 with the counts behind them."""

    true_positives: int
    false_positives: int
    false_negatives: int

    @property
    def precision(self) -> float:
        """Return TP / (TP + FP) (1.0 when nothing was predicted)."""
        predicted = self.true_positives + self.false_positives
        return self.true_positives / predicted if predicted else 1.0

    @property
    def recall(self) -> float:
        """Return TP / (TP + FN) (1.0 when there was nothing to find)."""
        actual = self.true_positives + self.false_negatives
        return self.true_positives / actual if actual else 1.0

    @property
    def f1(self) -> float:
        """Return the harmonic mean of precision and recall."""
        total = self.precision + self.recall
        return 2 * self.precision * self.recall / total if total else 0.0

    def as_dict(self) -> dict[str, float | int]:
        """Return the scores rounded for printing, with the counts."""
        return {"precision": round(self.precision, 4), "recall": round(self.recall, 4), "f1": round(self.f1, 4),
                "tp": self.true_positives, "fp": self.false_positives, "fn": self.false_negatives}  # fmt: skip


def _pair(a: Hashable, b: Hashable) -> tuple[Hashable, Hashable]:
    return (a, b) if str(a) <= str(b) else (b, a)


def pair_scores(
    predicted: Iterable[tuple[Hashable, Hashable]], truth: Iterable[tuple[Hashable, Hashable]]
) -> Scores:
    """Score predicted duplicate pairs against true ones (order inside a pair does not matter)."""
    found = {_pair(a, b) for a, b in predicted}
    actual = {_pair(a, b) for a, b in truth}
    return Scores(len(found & actual), len(found - actual), len(actual - found))


def pairs_of(clusters: Mapping[Hashable, Hashable]) -> set[tuple[Hashable, Hashable]]:
    """Return every pair of records that share a cluster label."""
    members: dict[Hashable, list[Hashable]] = defaultdict(list)
    for record, label in clusters.items():
        members[label].append(record)
    return {_pair(a, b) for group in members.values() for a, b in combinations(group, 2)}


def cluster_scores(predicted: Mapping[Hashable, Hashable], truth: Mapping[Hashable, Hashable]) -> Scores:
    """Score whole clusters: a predicted cluster counts only when it equals a true cluster exactly."""

    def groups(labels: Mapping[Hashable, Hashable]) -> set[frozenset[Hashable]]:
        members: dict[Hashable, set[Hashable]] = defaultdict(set)
        for record, label in labels.items():
            members[label].add(record)
        return {frozenset(m) for m in members.values()}

    found, actual = groups(predicted), groups(truth)
    return Scores(len(found & actual), len(found - actual), len(actual - found))
