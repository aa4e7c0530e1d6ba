"""Probabilistic record linkage on ``recordlinkage``: blocking, fast comparisons, Fellegi–Sunter, bands.

The spec says how to find candidate pairs (blocks on equal keys, sorted neighbourhoods, unioned), how
to compare them (per field, with similarity levels) and where the bands lie. String similarities run
in rapidfuzz's C++ ``cpdist`` over whole columns, plugged into ``recordlinkage.Compare`` as features,
so comparing does not dominate. The classifier is recordlinkage's unsupervised ECM (Fellegi–Sunter
fitted by expectation/conditional maximisation) on binary "at least level k" indicators; pairs whose
match probability reaches ``auto_merge`` are merged, those between ``review`` and ``auto_merge`` go to a
steward, the rest are distinct. Clusters are connected components of the merged pairs; a cluster whose
members disagree on a hard key (credit code, region, branch) or that is larger than ``max_cluster``
goes to review as a whole instead of merging.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import pandas as pd
from rapidfuzz import distance, fuzz
from rapidfuzz.process import cpdist

from crm_core.errors import DedupError
from integration.dedup.normalize import (
    canonical_industry,
    credit_code_parts,
    credit_codes_near,
    has_han,
    look_alike,
    same_name_across_scripts,
    sound_alike,
    trade_name,
    trade_pinyin,
)

# "name": Chinese-aware similarity of name cores (variant_similarity: homophones, look-alikes, gaps, synonyms,
# bare trade names); a pair written in two scripts (腾达科技 / Tengda Technology) is
# compared on the pinyin trade name and the industry words (normalize.same_name_across_scripts).
# "identifier": credit codes, equal (1.0) or the same code after a one-edit repair, by its organisation code
# or cut short (0.9). "overlap": space-separated keys (every phone of a cell), any one shared (1.0).
# "rare": both records hold a value (a term-frequency bucket: both trade names are rare ones).
Method = Literal[
    "exact", "jaro_winkler", "levenshtein", "token_set", "prefix", "name", "identifier", "overlap", "rare"
]
# rapidfuzz scorers and the factor that brings their score to 0..1
_SCORERS: dict[str, tuple[Any, float]] = {
    "jaro_winkler": (distance.JaroWinkler.normalized_similarity, 1.0),
    "levenshtein": (distance.Levenshtein.normalized_similarity, 1.0),
    "token_set": (fuzz.token_set_ratio, 0.01),
}


@dataclass(frozen=True)
class Comparison:
    """Compare one field of a pair; ``levels`` are similarity thresholds, highest first."""

    field: str
    method: Method = "jaro_winkler"
    levels: tuple[float, ...] = (0.92,)
    label: str | None = None

    @property
    def name(self) -> str:
        """Return the feature's column name."""
        return self.label or f"{self.field}_{self.method}"


@dataclass(frozen=True)
class LinkageSpec:
    """Blocking, comparisons, classifier thresholds and cluster guards for one entity."""

    blocks: Sequence[Sequence[str]]
    comparisons: Sequence[Comparison]
    sorted_neighbourhood: Sequence[tuple[str, int]] = ()
    auto_merge: float = 0.95
    review: float = 0.5
    hard_keys: Sequence[str] = ()  # members of one cluster must not disagree on these
    # Columns of a record's reconciled location (city, province): two records that both have one and
    # differ are in different places, so the pair is distinct, whatever the names say (unless the
    # credit code says otherwise: then a steward looks).
    location_keys: Sequence[str] = ()
    # Comparisons (by name) of which at least one must agree (level >= 1) for a pair to merge: the same
    # street address and district alone, with another name, are two firms in one building.
    merge_requires: Sequence[str] = ()
    # Groups of comparisons (by name) that, all agreeing (level >= 1), make a pair a match whatever the
    # classifier says: a close name with the same phone is one firm. ECM, fitted on pairs whose names are
    # mostly equal, takes any name short of equal as near-proof of two firms.
    sure_when: Sequence[Sequence[str]] = ()
    # A merge-band pair whose names are alike but not the same (the comparison ``alike_name`` below its top
    # level), that no ``sure_when`` group makes sure, and whose records both hold one of ``contradicted_by``
    # and share none of its values (no phone in common, another street address) goes to a steward: near
    # names in one city are two firms (上海华信贸易 / 上海华鑫贸易) as often as one written with a slip, and
    # a classifier fitted on few pairs scores both near 1.0.
    alike_name: str | None = None
    contradicted_by: Sequence[str] = ()
    # Comparisons (by name) of which at least one must agree (level >= 1) for a pair to merge without a
    # steward, when both records hold the field of one of them: a pair agreeing on none goes to review, and is
    # distinct when both records hold one of ``differ_on`` with another value. Contacts: two names sharing a
    # company mailbox or switchboard are two people (each with a mobile of their own) or a steward's call;
    # ECM fitted on a small project's pairs takes the shared e-mail alone as near-proof.
    merge_needs: Sequence[str] = ()
    differ_on: Sequence[str] = ()
    merge_needs_reason: str = "the records agree on none of the fields a merge needs"  # what the queue shows
    max_cluster: int = 10
    # A block key shared by more records than this (a 400 switchboard, a namesake trade name in every
    # city) is skipped: it would add size² pairs and say little; those records still pair elsewhere.
    max_block: int = 200
    classifier: str = "auto"  # auto | ecm | supervised (steward labels)

    def columns(self) -> set[str]:
        """Return every column the spec reads."""
        used = {c for block in self.blocks for c in block} | {c for c, _ in self.sorted_neighbourhood}
        return used | {c.field for c in self.comparisons} | set(self.hard_keys)


def similarity_levels(
    method: str, levels: Sequence[float], left: np.ndarray, right: np.ndarray, *, workers: int = -1
) -> np.ndarray:
    """Levels 0..len(levels) (int8) of two object arrays of text (None: missing, level 0), by ``method``.

    The comparison of ``recordlinkage_parts.SimilarityLevels``, without pandas: the online match index calls it on a few
    dozen candidates with ``workers=1`` (rapidfuzz's thread pool costs milliseconds to start per call).
    """
    if method == "name":
        similarity = _name_similarity(left, right, workers=workers, floor=min(levels, default=0.0))
    elif method in _SCORERS:
        # rapidfuzz scores a missing value (None) on either side 0: no mask needed, no copy made.
        scorer, scale = _SCORERS[method]
        similarity = cpdist(left, right, scorer=scorer, workers=workers, dtype=np.float32) * scale
    elif method == "identifier":
        similarity = _identifier_similarity(left, right, workers=workers)
    elif method == "overlap":
        similarity = _overlap(left, right)
    else:
        # NaN is missing too: a frame's column left partly empty by pandas holds NaN, not None
        present = np.asarray(pd.notna(left) & pd.notna(right), dtype=bool)
        if method == "rare":
            similarity = present.astype(np.float32)
        elif method == "exact":
            similarity = (present & (left == right)).astype(np.float32)
        else:  # prefix
            similarity = np.fromiter(
                (p and a[:3] == b[:3] for p, a, b in zip(present, left, right, strict=True)),
                dtype=bool,
                count=len(left),
            ).astype(np.float32)
    level = np.zeros(len(similarity), dtype=np.int8)
    for rank, threshold in enumerate(sorted(levels), start=1):
        level[similarity >= threshold - 1e-9] = rank
    return level


def _identifier_similarity(left: np.ndarray, right: np.ndarray, *, workers: int = -1) -> np.ndarray:
    """1.0 equal, 0.9 the same code written damaged, short or old-style (normalize.credit_codes_near).

    Equality and the one-edit distance run over whole columns (rapidfuzz, C++); only the few pairs that
    could be near are checked one by one.
    """
    present = np.array(
        [a is not None and b is not None for a, b in zip(left, right, strict=True)], dtype=bool
    )
    similarity = np.zeros(len(left), dtype=np.float32)
    if not present.any():
        return similarity
    equal = present & (left == right)
    similarity[equal] = 1.0
    rest = np.flatnonzero(present & ~equal)
    if len(rest):
        a, b = left[rest], right[rest]
        edits = cpdist(a, b, scorer=distance.OSA.distance, dtype=np.int32, workers=workers)
        lengths = np.fromiter(
            (min(len(x), len(y)) for x, y in zip(a, b, strict=True)), dtype=np.int32, count=len(a)
        )
        maybe = (edits <= 1) | (lengths < 18)
        for position in rest[maybe]:
            if credit_codes_near(left[position], right[position]):
                similarity[position] = 0.9
    return similarity


def _overlap(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """1.0 when two space-separated key lists share a key, else 0 (lists of one key compare as columns)."""
    present = np.array(
        [a is not None and b is not None for a, b in zip(left, right, strict=True)], dtype=bool
    )
    similarity = np.zeros(len(left), dtype=np.float32)
    equal = present & (left == right)
    similarity[equal] = 1.0
    several = np.fromiter(
        (
            p and not e and (" " in a or " " in b)
            for p, e, a, b in zip(present, equal, left, right, strict=True)
        ),
        dtype=bool,
        count=len(left),
    )
    for position in np.flatnonzero(several):
        if set(left[position].split()) & set(right[position].split()):
            similarity[position] = 1.0
    return similarity


def _scripts(values: np.ndarray) -> np.ndarray:
    """Return per value: 1 written with Chinese characters, 0 otherwise, -1 missing (once per distinct value)."""
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    script = np.array([1 if has_han(v) else 0 for v in uniques] + [-1], dtype=np.int8)
    return script[codes]  # the sentinel -1 picks the trailing "missing" entry


def _name_similarity(
    left: np.ndarray, right: np.ndarray, *, workers: int = -1, floor: float = 0.0
) -> np.ndarray:
    """Similarity of name cores, Chinese-aware (see :func:`variant_similarity`); cross-script on pinyin.

    A similarity below ``floor`` (the lowest level) only has to be known to be below it: the weighted edit
    distance is skipped for pairs whose bound (:func:`_variant_bound`) cannot reach it.
    """
    similarity = cpdist(left, right, scorer=distance.Levenshtein.normalized_similarity, workers=workers,
                        dtype=np.float32)  # fmt: skip
    left_script, right_script = _scripts(left), _scripts(right)
    cross = (left_script >= 0) & (right_script >= 0) & (left_script != right_script)
    if cross.any():
        brands = cpdist([trade_pinyin(v) for v in left[cross]], [trade_pinyin(v) for v in right[cross]],
                        scorer=distance.JaroWinkler.normalized_similarity, dtype=np.float32)  # fmt: skip
        # Across scripts the industry words cannot be checked (物流 is not "Logistics" to a string metric):
        # an equal trade name is a close name, not an equal one.
        similarity[cross] = np.maximum(similarity[cross], np.minimum(brands, TRADE_NAME_ONLY))
        # "Xinhong New Materials" against 鑫宏新材料: the English core starts with the trade name's pinyin
        for position in np.flatnonzero(cross & (similarity < 0.999)):
            han, latin = (
                (left[position], right[position])
                if left_script[position] == 1
                else (right[position], left[position])
            )
            if same_name_across_scripts(han, latin):  # trade name and industry words both agree
                similarity[position] = 1.0
            elif (
                (spoken := trade_pinyin(han))
                and len(spoken) >= 4
                and re.sub(r"[^0-9a-z]", "", latin).startswith(spoken)
            ):
                similarity[position] = max(similarity[position], TRADE_NAME_ONLY)
    # Chinese names that are close but not equal: homophones, look-alikes, a dropped or swapped character,
    # industry synonyms and a bare trade name are scored by the weighted edit distance (few pairs).
    han = (left_script == 1) & (right_script == 1) & (similarity < 1.0) & (similarity >= 0.3)
    for position in np.flatnonzero(han):
        if floor and _variant_bound(left[position], right[position]) < floor:
            continue
        similarity[position] = max(similarity[position], variant_similarity(left[position], right[position]))
    return similarity


def _variant_bound(left: str, right: str) -> float:
    """An upper bound of :func:`variant_similarity`, from the unweighted edit distance (C++, no table in Python).

    Every weighted edit costs at least ``SOUND_OR_SHAPE`` (a quarter), so the weighted cost of either way of
    comparing is at least a quarter of the optimal-string-alignment distance of the whole cores.
    """
    a, b = canonical_industry(left), canonical_industry(right)
    trade_a, trade_b = trade_name(a), trade_name(b)
    if a == b or (min(len(a), len(b)) >= 2 and (trade_a == b or trade_b == a)):
        return 1.0
    edits = distance.OSA.distance(a, b)
    return 1.0 - min(SOUND_OR_SHAPE, GAP) * edits / (max(len(trade_a), len(trade_b)) + 1)


SOUND_OR_SHAPE = 0.25  # a homophone or look-alike character instead of another: a quarter of an edit
GAP = 0.4  # a character dropped, added, or two swapped: less than half an edit (another character costs one)
TRADE_NAME_ONLY = 0.9  # 腾达 against 腾达科技: the short name is the other's trade name


@lru_cache(maxsize=300_000)
def _substitution_cost(x: str, y: str) -> float:
    """Return the cost of writing ``y`` for ``x`` (two different characters): a homophone or look-alike, or 1.

    Cached per pair: the edit-cost table asks for the same character pairs again and again, and the
    look-alike test reads two shape codes each time.
    """
    return SOUND_OR_SHAPE if look_alike(x, y) or sound_alike(x, y) else 1.0


def _edit_cost(a: str, b: str) -> float:
    """Weighted edit distance: homophone or look-alike substitutions and gaps cheap, other characters 1."""
    rows, cols = len(a) + 1, len(b) + 1
    cost = [[0.0] * cols for _ in range(rows)]
    for i in range(rows):
        cost[i][0] = i * GAP
    for j in range(cols):
        cost[0][j] = j * GAP
    for i in range(1, rows):
        for j in range(1, cols):
            x, y = a[i - 1], b[j - 1]
            substitute = 0.0 if x == y else _substitution_cost(x, y)
            best = min(cost[i - 1][j] + GAP, cost[i][j - 1] + GAP, cost[i - 1][j - 1] + substitute)
            if i > 1 and j > 1 and x == b[j - 2] and a[i - 2] == y:
                best = min(best, cost[i - 2][j - 2] + GAP)
            cost[i][j] = best
    return cost[-1][-1]


@lru_cache(maxsize=500_000)
def variant_similarity(left: str, right: str) -> float:
    """Return how alike two Chinese name cores are, 0..1, weighing the trade name, not the industry words.

    Industry synonyms are unified first (商贸/贸易). The edits are weighted (a homophone 华鑫/华新 or a
    look-alike 天/夭 a quarter, a dropped, added or swapped character 0.4, any other character 1) and
    counted against the trade name's length plus one, so a long industry word cannot dilute a different
    trade name: 佳晨自动化设备 / 佳河自动化设备 score 0.67, 华鑫科技 / 骅鑫科技 0.92, 腾达科技 / 腾科技 0.87.
    A name that is only the other's trade name scores ``TRADE_NAME_ONLY``.
    """
    a, b = canonical_industry(left), canonical_industry(right)
    if a == b:
        return 1.0
    trade_a, trade_b = trade_name(a), trade_name(b)
    if min(len(a), len(b)) >= 2 and (trade_a == b or trade_b == a):
        return TRADE_NAME_ONLY
    industry_a, industry_b = a[len(trade_a) :], b[len(trade_b) :]
    if industry_a == industry_b or trade_a == trade_b:
        cost = _edit_cost(trade_a, trade_b) + _edit_cost(industry_a, industry_b)
    else:  # the split differs (a dropped industry character): the whole core, still weighed by the trade name
        cost = _edit_cost(a, b)
    return max(0.0, 1.0 - cost / (max(len(trade_a), len(trade_b)) + 1))


def _texts(values: pd.Series) -> np.ndarray:
    """Return the values as an object array rapidfuzz accepts: text, with None/NaN/NA as None."""
    array = values.to_numpy(dtype=object)
    missing = pd.isna(array)  # NaN, and pd.NA of a nullable string column
    if missing.any():
        array = array.copy()  # to_numpy may return the frame's own array
        array[missing] = None
    if pd.api.types.infer_dtype(array, skipna=True) not in ("string", "empty"):
        array = np.array([None if v is None else str(v) for v in array], dtype=object)
    return array


@dataclass
class LinkageResult:
    """Scored candidate pairs (MultiIndex of record ids) with their features, bands and clusters."""

    pairs_compared: int
    records: int
    features: pd.DataFrame
    probability: pd.Series
    band: pd.Series  # merge | review | distinct
    clusters: list[list[Any]] = field(default_factory=list)
    cluster_review: list[list[Any]] = field(default_factory=list)  # clusters too large or split: for stewards
    reasons: dict[tuple[Any, Any], str] = field(default_factory=dict)  # why a pair is in review, not merged

    @property
    def reduction_ratio(self) -> float:
        """Return the share of all possible pairs that blocking avoided comparing."""
        total = self.records * (self.records - 1) / 2
        return 1 - self.pairs_compared / total if total else 0.0

    def labels(self, ids: Iterable[Any]) -> dict[Any, Any]:
        """Return each record's cluster label: the smallest id of its merge cluster, else its own id."""
        label = {record: record for record in ids}
        for cluster in self.clusters:
            for member in cluster:
                label[member] = cluster[0]
        return label

    def pairs(self, band: str) -> pd.MultiIndex:
        """Return the pairs in one band."""
        return self.band.index[self.band == band]  # type: ignore[return-value]


def check_columns(frame: pd.DataFrame, spec: LinkageSpec) -> None:
    """Raise a DedupError naming the columns the spec uses that the records lack."""
    missing = sorted(spec.columns() - set(frame.columns))
    if missing:
        raise DedupError(f"dedup rules use columns the records do not have: {', '.join(missing)}")


def candidate_pairs(frame: pd.DataFrame, spec: LinkageSpec, focus: pd.Index | None = None) -> pd.MultiIndex:
    """Return the union of the pairs every block and sorted neighbourhood proposes (deduplication).

    With ``focus`` (the records a delta run changed), only pairs with at least one focus record: the
    focus is indexed against all records, so the work grows with the focus, not with all records.
    """
    check_columns(frame, spec)
    frame = frame.copy(deep=False)  # the block keys below are added to a shallow copy only
    import recordlinkage as rl  # here, not at import: see integration.dedup.recordlinkage_parts

    indexer = rl.Index()
    for number, block in enumerate(spec.blocks):
        key = f"_block_{number}"
        frame[key] = _block_key(frame, list(block), spec.max_block)
        indexer.block(left_on=key)
    for column, window in spec.sorted_neighbourhood:
        indexer.sortedneighbourhood(left_on=column, window=window)
    if not spec.blocks and not spec.sorted_neighbourhood:
        indexer.full()
    if focus is None:
        pairs: pd.MultiIndex = indexer.index(frame)
        return pairs
    linked = indexer.index(frame.loc[frame.index.isin(focus)], frame)
    left, right = linked.get_level_values(0).to_numpy(), linked.get_level_values(1).to_numpy()
    keep = left != right
    # recordlinkage orders a deduplication pair (larger id, smaller id); a focus pair found from both
    # sides appears once.
    oriented = pd.MultiIndex.from_arrays(
        [np.maximum(left[keep], right[keep]), np.minimum(left[keep], right[keep])]
    )
    return oriented.unique()


def _block_key(frame: pd.DataFrame, columns: list[str], max_block: int) -> pd.Series:
    """Return the block key per record (columns joined), missing where a column is or the key is too common."""
    key = frame[columns[0]].astype("string")
    for column in columns[1:]:
        key = key + "\x1f" + frame[column].astype("string")  # NA in any column leaves the key NA
    codes, _ = pd.factorize(key)  # one hash pass: counting and looking the counts up by code, not by text
    keyed = codes >= 0
    common = np.zeros(len(key), dtype=bool)
    common[keyed] = np.bincount(codes[keyed])[codes[keyed]] > max_block
    return key.mask(common)


@dataclass(frozen=True)
class Compared:
    """Pairs an earlier pass compared: their features, and the records (linkage rows) it compared them on."""

    frame: pd.DataFrame
    features: pd.DataFrame  # one row per pair (MultiIndex), one column per comparison


def compare(
    frame: pd.DataFrame, pairs: pd.MultiIndex, spec: LinkageSpec, earlier: Compared | None = None
) -> pd.DataFrame:
    """Return one feature column (a level) per comparison for every pair.

    ``earlier``: a pair it compared, whose two records still hold the values it compared (every field a
    comparison reads), keeps its features; the others are compared. A pair's levels depend on its two
    records only, so the features are the same as comparing every pair.
    """
    if earlier is not None and len(pairs):
        known, position = _known_pairs(frame, pairs, spec, earlier)
        if known.any():
            names = [comparison.name for comparison in spec.comparisons]
            fresh = _compare(frame, pairs[~known], spec) if not known.all() else None
            columns = {}
            for name in names:
                before = earlier.features[name].to_numpy()
                values = np.empty(len(pairs), dtype=before.dtype)
                values[known] = before[position[known]]
                if fresh is not None:
                    values[~known] = fresh[name].to_numpy(dtype=before.dtype)
                columns[name] = values
            return pd.DataFrame(columns, index=pairs)
    return _compare(frame, pairs, spec)


def _known_pairs(
    frame: pd.DataFrame, pairs: pd.MultiIndex, spec: LinkageSpec, earlier: Compared
) -> tuple[np.ndarray, np.ndarray]:
    """Per pair: whether ``earlier`` compared it on the values its records hold now, and where its features are."""
    nothing = np.zeros(len(pairs), dtype=bool), np.zeros(len(pairs), dtype=np.intp)
    names = [comparison.name for comparison in spec.comparisons]
    fields = sorted({comparison.field for comparison in spec.comparisons})
    features = earlier.features
    if list(features.columns) != names or any(str(features[n].dtype) != "int8" for n in names):
        return nothing
    if (
        earlier.frame.empty
        or not set(fields) <= set(earlier.frame.columns)
        or not earlier.frame.index.is_unique
    ):
        return nothing
    place = earlier.frame.index.get_indexer(frame.index)
    same = place >= 0
    for name in fields:
        now = frame[name].to_numpy(dtype=object)
        before = earlier.frame[name].to_numpy(dtype=object)[np.where(same, place, 0)]
        same &= _identical(now, before)
    left = frame.index.get_indexer(pairs.get_level_values(0))
    right = frame.index.get_indexer(pairs.get_level_values(1))
    position = np.asarray(features.index.get_indexer(pairs), dtype=np.intp)
    return same[left] & same[right] & (position >= 0), position


def _identical(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Elementwise: the same text, None against None, NaN against NaN (not None against NaN: a comparison
    tells them apart). Any other value counts as changed."""
    return np.fromiter(
        (
            (type(a) is str and type(b) is str and a == b)
            or (a is None and b is None)
            or (type(a) is float and type(b) is float and a != a and b != b)
            for a, b in zip(left, right, strict=True)
        ),
        dtype=bool,
        count=len(left),
    )


def _compare(frame: pd.DataFrame, pairs: pd.MultiIndex, spec: LinkageSpec) -> pd.DataFrame:
    """Compare every pair (recordlinkage's Compare over the spec's comparisons)."""
    import recordlinkage as rl  # here, not at import: see integration.dedup.recordlinkage_parts

    from integration.dedup.recordlinkage_parts import SimilarityLevels

    comparer = rl.Compare(n_jobs=1)
    for comparison in spec.comparisons:
        comparer.add(SimilarityLevels(comparison.field, comparison.field, comparison.method,
                                      comparison.levels, comparison.name))  # fmt: skip
    features: pd.DataFrame = comparer.compute(pairs, frame)
    return features


def indicators(features: pd.DataFrame, spec: LinkageSpec) -> pd.DataFrame:
    """Return binary 'at least level k' columns, the input of the Fellegi–Sunter classifier."""
    out = {}
    for comparison in spec.comparisons:
        for rank in range(1, len(comparison.levels) + 1):
            out[f"{comparison.name}>={rank}"] = (features[comparison.name] >= rank).astype(np.int8)
    return pd.DataFrame(out, index=features.index)


MIN_LABELS = 10  # steward decisions of each kind before a supervised model replaces ECM
MIN_FIT_PAIRS = 5_000  # fewer focus pairs than this: ECM also fits on a sample's pairs
TRAINING_SAMPLE = 50_000  # records in that sample (a constant cost, whatever the number of records)
MAX_FIT_PAIRS = 2_000_000  # ECM fits on at most this many pairs (a random sample), then scores all
_PROBABILITY_FLOOR = 1e-9  # ECM's m and u probabilities never reach 0 (log weights stay finite)


@dataclass(frozen=True)
class Labels:
    """Pairs a steward decided, with their comparison levels: training data for the supervised classifier."""

    features: pd.DataFrame  # one row per pair (MultiIndex), one column per comparison
    same: pd.Series  # True: the same record


def classify(
    features: pd.DataFrame,
    spec: LinkageSpec,
    labels: Labels | None = None,
    extra_pairs: pd.DataFrame | None = None,
) -> pd.Series:
    """Return the match probability of every pair.

    Supervised (logistic regression on steward decisions) when ``spec.classifier`` allows it and there are at
    least ``MIN_LABELS`` decisions of each kind; otherwise an unsupervised ECM fit on these pairs, plus
    the features of ``extra_pairs`` when given (a delta run's few pairs alone are too few to fit on).
    """
    if features.empty:
        return pd.Series(dtype=float, index=features.index)
    binary = indicators(features, spec)
    enough = labels is not None and min(int(labels.same.sum()), int((~labels.same).sum())) >= MIN_LABELS
    if spec.classifier == "supervised" and not enough:
        have = (
            "none"
            if labels is None
            else f"{int(labels.same.sum())} same, {int((~labels.same).sum())} different"
        )
        raise DedupError(
            f"classifier: supervised needs {MIN_LABELS} steward decisions of each kind (have {have}); "
            "use classifier: auto until then"
        )
    if spec.classifier != "ecm" and enough and labels is not None:
        training = indicators(labels.features, spec)
        # Weak regularization: a few dozen labels must still give sure pairs probabilities near 1.
        import recordlinkage as rl  # here, not at import: see integration.dedup.recordlinkage_parts

        model = rl.LogisticRegressionClassifier(C=1000.0)
        model.fit(training, labels.same.index[labels.same.to_numpy(dtype=bool)])
        return pd.Series(model.prob(binary), index=features.index)
    fit_on = (
        binary
        if extra_pairs is None
        else pd.concat([indicators(extra_pairs, spec), binary], ignore_index=True)
    )
    if len(fit_on) > MAX_FIT_PAIRS:  # the m/u estimates settle long before; fitting costs per row
        fit_on = fit_on.sample(n=MAX_FIT_PAIRS, random_state=0)
    varying = [c for c in fit_on.columns if fit_on[c].nunique() > 1]
    if not varying:  # every pair looks the same: nothing to learn from, so nothing is sure
        return pd.Series(0.5, index=features.index)
    import recordlinkage as rl  # here, not at import: see integration.dedup.recordlinkage_parts

    from integration.dedup.recordlinkage_parts import PackedECM

    classifier = rl.ECMClassifier(binarize=None)
    classifier.kernel = PackedECM(**classifier.kernel.get_params())
    # A level that never occurs in one class (small sets: every duplicate contact shares its mobile) gives
    # a zero probability, log(0) = -inf and NaN match probabilities; a floor keeps the weights finite.
    with np.errstate(divide="ignore", invalid="ignore"):
        classifier.fit(fit_on[varying])
    kernel = classifier.kernel
    kernel.feature_log_prob_ = np.log(np.clip(np.exp(kernel.feature_log_prob_), _PROBABILITY_FLOOR, 1.0))
    return pd.Series(classifier.prob(binary[varying]), index=features.index)


def _distinct_rows(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(X, axis=0, return_counts=True)`` of a binary matrix: its rows read as binary numbers (the first
    column the highest bit, so they sort as the rows do), counted, and unpacked."""
    width = X.shape[1]
    bits = np.arange(width - 1, -1, -1, dtype=np.int64)
    codes, counts = np.unique(X.astype(np.int64) @ (np.int64(1) << bits), return_counts=True)
    return ((codes[:, None] >> bits) & 1).astype(X.dtype), counts


EVALUATION_FOLDS = 5


@dataclass(frozen=True)
class Evaluation:
    """The supervised model cross-validated on steward decisions: precision and recall of "the same"."""

    pairs: int  # decided pairs evaluated
    same: int  # of which stewards called the same
    folds: int
    threshold: float  # a pair is predicted the same at or above this probability (the review threshold)
    precision: float  # of the held-out pairs predicted the same, the share stewards called the same
    recall: float  # of the held-out pairs stewards called the same, the share predicted the same
    precision_auto: float  # the same at the auto-merge threshold: what would merge without a steward
    recall_auto: float


def cross_validate(labels: Labels, spec: LinkageSpec, folds: int = EVALUATION_FOLDS) -> Evaluation | None:
    """Evaluate the supervised classifier of :func:`classify` on steward-decided pairs, by k-fold cross-validation.

    Each fold's pairs are scored by a model fitted on the other folds' (stratified: every fold holds both
    decisions, assigned in a fixed order, so the figures do not change from one reading to the next).
    None until there are ``MIN_LABELS`` decisions each way, as for the model itself.
    """
    same = labels.same.to_numpy(dtype=bool)
    counts = (int(same.sum()), int((~same).sum()))
    if min(counts) < MIN_LABELS:
        return None
    folds = max(2, min(folds, min(counts)))
    binary = indicators(labels.features, spec)
    fold = np.empty(len(same), dtype=np.int64)
    for side in (True, False):  # stratified: each decision's pairs dealt round the folds
        members = np.flatnonzero(same == side)
        fold[members] = np.arange(len(members)) % folds
    probability = np.zeros(len(same))
    for number in range(folds):
        train, test = fold != number, fold == number
        import recordlinkage as rl  # here, not at import: see integration.dedup.recordlinkage_parts

        model = rl.LogisticRegressionClassifier(C=1000.0)
        model.fit(binary[train], labels.same.index[train & same])
        probability[test] = model.prob(binary[test]).to_numpy()

    def rates(threshold: float) -> tuple[float, float]:
        predicted = probability >= threshold
        hits = int((predicted & same).sum())
        return (hits / int(predicted.sum()) if predicted.any() else 0.0), hits / counts[0]

    precision, recall = rates(spec.review)
    precision_auto, recall_auto = rates(spec.auto_merge)
    return Evaluation(len(same), counts[0], folds, spec.review, round(precision, 3), round(recall, 3),
                      round(precision_auto, 3), round(recall_auto, 3))  # fmt: skip


def bands(probability: pd.Series, spec: LinkageSpec) -> pd.Series:
    """Return merge / review / distinct per pair."""
    band = np.where(
        probability >= spec.auto_merge, "merge", np.where(probability >= spec.review, "review", "distinct")
    )
    return pd.Series(band, index=probability.index)


def connected_components(pairs: Sequence[tuple[Any, Any]]) -> list[list[Any]]:
    """Return the groups of records linked by ``pairs`` (union–find), each sorted, largest first."""
    parent: dict[Any, Any] = {}

    def find(x: Any) -> Any:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        root_a, root_b = find(a), find(b)
        if root_a != root_b:
            parent[max(root_a, root_b)] = min(root_a, root_b)
    groups: dict[Any, list[Any]] = defaultdict(list)
    for x in parent:
        groups[find(x)].append(x)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: (-len(g), g[0]))


def guard_clusters(
    clusters: list[list[Any]], frame: pd.DataFrame, spec: LinkageSpec, hard: HardValues | None = None
) -> tuple[list[list[Any]], list[list[Any]]]:
    """Return (clusters to merge, clusters for a steward) — the guard against chaining.

    Linked pairs chain: A~B and B~C put A and C together even when A and C carry different credit codes
    (pairs that conflict directly were already sent to review by :func:`link`). A cluster whose members
    still disagree on a hard key, or that is larger than ``max_cluster``, is not merged automatically;
    the whole cluster goes to review, where a steward sees every member side by side. ``hard``: the
    frame's hard-key values when the caller has them already.
    """
    if not clusters:
        return [], []
    members = [member for cluster in clusters for member in cluster]
    sizes = np.array([len(cluster) for cluster in clusters])
    label = np.repeat(np.arange(len(clusters)), sizes)
    conflicting = sizes > spec.max_cluster
    hard = hard or HardValues(frame)
    for key in spec.hard_keys:  # one groupby per key over all clustered records, not a lookup per cluster
        values = hard(key).reindex(members)
        distinct_values = pd.Series(values.to_numpy(), index=label).groupby(level=0).nunique()
        conflicting[distinct_values.index.to_numpy()] |= distinct_values.to_numpy() > 1
    merge = [cluster for cluster, bad in zip(clusters, conflicting, strict=True) if not bad]
    review = [cluster for cluster, bad in zip(clusters, conflicting, strict=True) if bad]
    return merge, review


class HardValues:
    """A frame's hard-key values (:func:`_hard_values`), each key computed once however often it is asked for."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self.frame = frame
        self._values: dict[str, pd.Series] = {}

    def __call__(self, key: str) -> pd.Series:
        """Return the values of ``key``."""
        if key not in self._values:
            self._values[key] = _hard_values(self.frame, key)
        return self._values[key]


def _hard_values(frame: pd.DataFrame, key: str) -> pd.Series:
    """A hard key's values, blanks missing; a credit code counts only when valid (a damaged one may be a typo)."""
    values = frame[key].astype("string").str.strip().replace("", pd.NA)
    if key == "credit_code":
        valid = values.map(lambda v: credit_code_parts(v).valid is not None, na_action="ignore")
        values = values.where(valid.astype("boolean").fillna(False).astype(bool))
    return values


def _without_needed_agreement(
    frame: pd.DataFrame, features: pd.DataFrame, band: pd.Series, spec: LinkageSpec
) -> tuple[np.ndarray, np.ndarray]:
    """Per pair: linked (merge or review) without agreeing on any of ``merge_needs`` although both records hold
    the field of one of them; and, of those, the ones whose records differ on a ``differ_on`` column (see
    LinkageSpec)."""
    unsupported = np.zeros(len(band), dtype=bool)
    needed = [c for c in spec.comparisons if c.name in spec.merge_needs and c.name in features.columns]
    if not needed or not len(band):
        return unsupported, unsupported.copy()
    left, right = band.index.get_level_values(0), band.index.get_level_values(1)
    comparable = np.zeros(len(band), dtype=bool)  # both records hold the field of one of them
    for comparison in needed:
        values = frame[comparison.field]
        comparable |= pd.notna(values.reindex(left).to_numpy()) & pd.notna(values.reindex(right).to_numpy())
    agreed = (features[[c.name for c in needed]] >= 1).any(axis=1).to_numpy()
    unsupported = (band != "distinct").to_numpy() & comparable & ~agreed
    columns = (frame[c].astype("string").replace("", pd.NA) for c in spec.differ_on if c in frame.columns)
    return unsupported, unsupported & _differing(band.index, columns)


@dataclass(frozen=True)
class FieldWords:
    """How a linkage field reads to a steward: one value, several, two records disagreeing, one lacking it."""

    one: str
    many: str
    differ: str = ""  # "" : "different <many>"
    lacking: str = ""  # "" : "<one>"

    @property
    def differing(self) -> str:
        """The words for two records holding different values of the field."""
        return self.differ or f"different {self.many}"

    @property
    def missing(self) -> str:
        """The words for what a record without the field lacks ("#121 has no phone")."""
        return self.lacking or self.one


# The one place that says how the linkage fields read to a steward: every held-back reason (the review queue's
# why, the workbench's queue and cluster pages) names fields through it, never by their column names.
FIELD_WORDS: dict[str, FieldWords] = {
    "credit_code": FieldWords("credit code", "credit codes"),
    "branch": FieldWords("branch", "branches"),
    "city": FieldWords("city", "cities"),
    "province": FieldWords("province", "provinces"),
    "district": FieldWords("district", "districts"),
    "phones": FieldWords("phone", "phones", differ="no phone in common"),
    "address_key": FieldWords("street address", "street addresses", lacking="complete street address"),
    "email_domain": FieldWords("e-mail domain", "e-mail domains"),
    "customer_id": FieldWords("customer", "customers"),
    "mobile": FieldWords("mobile", "mobiles"),
    "phone": FieldWords("phone", "phones"),
    "email": FieldWords("e-mail", "e-mails"),
}


def field_words(name: str) -> FieldWords:
    """How a linkage field reads to a steward (a field of a project's own rules: its name, spaced)."""
    return FIELD_WORDS.get(name) or FieldWords(name.replace("_", " "), f"{name.replace('_', ' ')} values")


def fields_in_words(names: Iterable[str]) -> str:
    """Several fields' plural words joined by "or" ("credit codes or branches")."""
    return " or ".join(field_words(name).many for name in names)


def _alike_but_contradicted(
    frame: pd.DataFrame, features: pd.DataFrame, band: pd.Series, spec: LinkageSpec
) -> tuple[np.ndarray, dict[int, str]]:
    """Per pair: a merge the spec's ``alike_name`` / ``contradicted_by`` rule holds back (see LinkageSpec); and,
    per held pair's position, why in a steward's words: the fields that contradict (both records hold one and
    they share no value), then those a record lacks (which could not confirm the pair either)."""
    held = np.zeros(len(band), dtype=bool)
    name = spec.alike_name
    if name is None or name not in features.columns or not spec.contradicted_by:
        return held, {}
    top = next((len(c.levels) for c in spec.comparisons if c.name == name), None)
    candidates = (band == "merge").to_numpy() & (features[name] < (top or 0)).to_numpy()
    for group in spec.sure_when:
        if group and all(g in features.columns for g in group):
            candidates &= ~(features[list(group)] >= 1).all(axis=1).to_numpy()
    positions = np.flatnonzero(candidates)
    if not len(positions):
        return held, {}
    pairs = band.index[positions]
    left, right = pairs.get_level_values(0), pairs.get_level_values(1)
    differing: dict[int, list[str]] = defaultdict(list)
    missing: dict[int, list[str]] = defaultdict(list)
    for column in spec.contradicted_by:
        if column not in frame.columns:
            continue
        words = field_words(column)
        differs, field = words.differing, words.missing
        values = frame[column].astype("string").str.strip().replace("", pd.NA)
        a, b = values.reindex(left).to_numpy(), values.reindex(right).to_numpy()
        for offset, (x, y) in enumerate(zip(a, b, strict=True)):
            if not (pd.isna(x) or pd.isna(y)):
                if not set(str(x).split()) & set(str(y).split()):
                    held[positions[offset]] = True
                    differing[offset].append(differs)
            elif pd.isna(x) and pd.isna(y):
                missing[offset].append(f"neither has a {field}")
            else:
                missing[offset].append(
                    f"#{pairs[offset][0] if pd.isna(x) else pairs[offset][1]} has no {field}"
                )
    reasons = {}
    for offset, fields in differing.items():
        said = ["names alike but not the same", "no identifier shared", *fields]
        reasons[int(positions[offset])] = f"{', '.join(said[:-1])}, and {said[-1]}" + (
            f" ({'; '.join(missing[offset])})" if missing[offset] else ""
        )
    return held, reasons


def location_conflicts(frame: pd.DataFrame, pairs: pd.Index, spec: LinkageSpec) -> np.ndarray:
    """Return, per pair, whether both records are placed (a location key) and the places differ."""
    return _differing(pairs, (frame[key].astype("string").replace("", pd.NA) for key in spec.location_keys))


def _differing(pairs: pd.Index, columns: Iterable[pd.Series]) -> np.ndarray:
    """Return, per pair, whether some column has a value on both sides and the two values differ."""
    conflict = np.zeros(len(pairs), dtype=bool)
    if not len(pairs):
        return conflict
    left, right = pairs.get_level_values(0), pairs.get_level_values(1)
    for values in columns:
        a, b = values.reindex(left).to_numpy(), values.reindex(right).to_numpy()
        known = ~(pd.isna(a) | pd.isna(b))
        conflict[known] |= a[known] != b[known]
    return conflict


def same_identifier(frame: pd.DataFrame, pairs: pd.Index) -> np.ndarray:
    """Return, per pair, whether the credit codes name one code (equal or near, see credit_codes_near)."""
    if "credit_code" not in frame or not len(pairs):
        return np.zeros(len(pairs), dtype=bool)
    codes = _texts(frame["credit_code"])
    position = pd.Series(np.arange(len(frame)), index=frame.index)
    a = codes[position.reindex(pairs.get_level_values(0)).to_numpy()]
    b = codes[position.reindex(pairs.get_level_values(1)).to_numpy()]
    return _identifier_similarity(a, b) > 0


CONFLICT_FACTOR = 0.5  # a pair across two valid credit codes: its probability halved (never shown as 1.0)


def coherent_clusters(
    merged: pd.Series,
    linked: pd.Series,
    frame: pd.DataFrame,
    spec: LinkageSpec,
    hard: HardValues | None = None,
) -> tuple[list[list[Any]], dict[tuple[Any, Any], str]]:
    """Return (clusters, refused pairs with the reason) built from merge pairs, best first.

    Pairs are joined in order of probability. Two groups join only when no hard key or location would
    then hold two values (two valid credit codes, two cities, two branches) and when the pairs linking
    them (merge or review) are at least half of all their member pairs: one record that looks like two
    companies cannot bridge them. A refused pair goes to review with the reason, for a steward.
    """
    keys = [*spec.hard_keys, *[k for k in spec.location_keys if k not in spec.hard_keys]]
    hard = hard or HardValues(frame)
    # only the records of merge pairs are looked up: a dict of theirs, not of every record
    records = pd.unique(np.concatenate([merged.index.get_level_values(level).to_numpy() for level in (0, 1)]))
    value_of = {key: hard(key).reindex(records).dropna().to_dict() for key in keys}
    neighbours: dict[Any, set[Any]] = defaultdict(set)
    for a, b in linked.index:
        neighbours[a].add(b)
        neighbours[b].add(a)
    members: dict[Any, list[Any]] = {}
    group: dict[Any, Any] = {}
    seen: dict[Any, dict[str, set[Any]]] = {}
    refused: dict[tuple[Any, Any], str] = {}
    for pair in merged.sort_values(ascending=False, kind="stable").index:
        a, b = pair
        for record in (a, b):
            if record not in group:
                group[record], members[record] = record, [record]
                seen[record] = {k: {value_of[k][record]} if record in value_of[k] else set() for k in keys}
        ga, gb = group[a], group[b]
        if ga == gb:
            continue
        clash = next((k for k in keys if seen[ga][k] and seen[gb][k] and seen[ga][k] != seen[gb][k]), None)
        if clash is not None:
            both = sorted(map(str, seen[ga][clash] | seen[gb][clash]))
            refused[ordered(pair)] = (
                f"not merged: the cluster would hold two {field_words(clash).many} ({', '.join(both)})"
            )
            continue
        small, large = sorted((members[ga], members[gb]), key=len)
        large_set = set(large)
        links = sum(len(neighbours[m] & large_set) for m in small)
        if 2 * links < len(small) * len(large):
            refused[ordered(pair)] = (
                f"not merged: links {links} of {len(small) * len(large)} member pairs between two groups "
                f"of {len(small)} and {len(large)} records (one record would bridge two companies)"
            )
            continue
        keep, drop = (ga, gb) if len(members[ga]) >= len(members[gb]) else (gb, ga)
        for record in members[drop]:
            group[record] = keep
        members[keep] += members.pop(drop)
        for key in keys:
            seen[keep][key] |= seen[drop][key]
        del seen[drop]
    clusters = sorted((sorted(m) for m in members.values() if len(m) > 1), key=lambda g: (-len(g), g[0]))
    return clusters, refused


def hard_key_conflicts(
    frame: pd.DataFrame, pairs: pd.Index, spec: LinkageSpec, hard: HardValues | None = None
) -> np.ndarray:
    """Return, per pair, whether both records have a value for some hard key and the values differ."""
    hard = hard or HardValues(frame)
    return _differing(pairs, (hard(key) for key in spec.hard_keys))


def ordered(pair: tuple[Any, Any]) -> tuple[Any, Any]:
    """Return a pair with the smaller id first (how candidates and decisions are stored)."""
    a, b = pair
    return (a, b) if a <= b else (b, a)


def among(pairs: pd.Index, stored: AbstractSet[tuple[Any, Any]]) -> np.ndarray:
    """Per pair of ``pairs`` (either order): whether ``stored`` (pairs, smaller id first) holds it.

    The set lookup of :func:`ordered` over whole columns: one index lookup, not a Python call per pair.
    """
    if not len(pairs) or not stored:
        return np.zeros(len(pairs), dtype=bool)
    left, right = pairs.get_level_values(0).to_numpy(), pairs.get_level_values(1).to_numpy()
    swap = right < left
    low, high = np.where(swap, right, left), np.where(swap, left, right)
    return np.asarray(pd.MultiIndex.from_arrays([low, high]).isin(list(stored)), dtype=bool)


def link(
    frame: pd.DataFrame,
    spec: LinkageSpec,
    distinct: set[tuple[Any, Any]] | None = None,
    labels: Labels | None = None,
    focus: pd.Index | None = None,
    queued: set[tuple[Any, Any]] | None = None,
    earlier: Compared | None = None,
) -> LinkageResult:
    """Find, compare, classify and cluster duplicate records in ``frame`` (indexed by record id).

    ``distinct`` holds pairs (smaller id first) a steward declared different: they never merge or return.
    ``queued`` holds pairs (smaller id first) waiting in the review queue: they stay there for the steward,
    however high they score now (a later run never merges a pair behind the steward's back).
    ``labels`` (steward decisions) train the supervised classifier once there are enough. ``focus``
    limits the pairs to those touching these records (a delta run); when they are fewer than
    ``MIN_FIT_PAIRS``, the candidate pairs of a fixed-size random sample of all records join the ECM fit.
    ``earlier``: pairs an earlier pass compared, whose features are kept where the records are unchanged
    (see :func:`compare`).
    """
    if not frame.index.is_unique:
        raise DedupError("record ids must be unique to deduplicate")
    if len(frame) < 2:  # nothing to pair (recordlinkage divides by the number of possible pairs)
        check_columns(frame, spec)
        nothing = pd.Series(dtype=float, index=pd.MultiIndex.from_arrays([[], []]))
        return LinkageResult(
            0, len(frame), pd.DataFrame(index=nothing.index), nothing, nothing.astype(object)
        )
    pairs = candidate_pairs(frame, spec, focus)
    features = compare(frame, pairs, spec, earlier)
    sample_pairs = None
    if focus is not None and len(pairs) < MIN_FIT_PAIRS and len(frame) > len(focus):
        sample = frame.sample(n=min(len(frame), TRAINING_SAMPLE), random_state=0)
        sample_pairs = compare(sample, candidate_pairs(sample, spec), spec)
    probability = classify(features, spec, labels, sample_pairs)
    band = bands(probability, spec)
    # A pair agreeing on no compared field at any level is no candidate, whatever the classifier says: fitted
    # on pairs that all agree on nothing (a small project's contacts), ECM learns nothing and scores 0.5.
    if len(features.columns):
        agrees_on_nothing = ~(features.to_numpy() > 0).any(axis=1)
        band.iloc[np.flatnonzero(agrees_on_nothing)] = "distinct"
    for group in spec.sure_when:
        if group and all(name in features.columns for name in group):
            sure = (features[list(group)] >= 1).all(axis=1).to_numpy() & (band != "merge").to_numpy()
            if sure.any():
                probability = probability.copy()
                probability[sure] = np.maximum(probability[sure], spec.auto_merge)
                band[sure] = "merge"
    if distinct:
        band[among(band.index, distinct)] = "distinct"
    reasons: dict[tuple[Any, Any], str] = {}
    # Two places (the city from every source of evidence) are two companies, unless the credit codes say
    # it is one: then a steward looks.
    elsewhere = location_conflicts(frame, band.index, spec)
    if elsewhere.any():
        positions = np.flatnonzero(elsewhere)
        one_code = same_identifier(frame, band.index[positions])
        values = band.to_numpy(dtype=object, copy=True)
        values[positions[~one_code]] = "distinct"
        held = positions[one_code & (values[positions] != "distinct")]
        values[held] = "review"
        band = pd.Series(values, index=band.index)
        for pair in band.index[held]:
            reasons[ordered(pair)] = "one credit code but two locations"
    # A high score across a hard-key conflict (two valid credit codes, branches) is not a sure match: its
    # probability is cut (never 1.0 in the queue), and it is reviewed only if it stays above review.
    # A branch (分公司) is never its head office or another branch: distinct (linked as parent_id instead).
    branches = LinkageSpec(blocks=[], comparisons=[], hard_keys=[k for k in spec.hard_keys if k == "branch"])
    hard = HardValues(frame)
    band[hard_key_conflicts(frame, band.index, branches, hard)] = "distinct"
    conflict = hard_key_conflicts(frame, band.index, spec, hard) & (band != "distinct").to_numpy()
    if conflict.any():
        probability = probability.copy()
        probability[conflict] = probability[conflict] * CONFLICT_FACTOR
        band[conflict] = np.where(probability[conflict] >= spec.review, "review", "distinct")
        held = conflict & (band == "review").to_numpy()
        # the keys that conflict for each held pair, named in a steward's words
        by_key = {key: hard_key_conflicts(frame, band.index, replace(spec, hard_keys=(key,)), hard)
                  for key in spec.hard_keys}  # fmt: skip
        for position in (int(p) for p in np.flatnonzero(held)):
            keys = [key for key, differs in by_key.items() if differs[position]]
            reasons[ordered(band.index[position])] = "hard key conflict: different " + fields_in_words(keys)
    if spec.merge_requires:
        required = [name for name in spec.merge_requires if name in features.columns]
        if required:
            agreed = (features[required] >= 1).any(axis=1).to_numpy()
            band[(band == "merge").to_numpy() & ~agreed] = "distinct"
    unsupported, different = _without_needed_agreement(frame, features, band, spec)
    if unsupported.any():
        probability = probability.copy()
        probability[unsupported] = probability[unsupported] * CONFLICT_FACTOR
        band[unsupported & different] = "distinct"
        review = unsupported & ~different
        band[review] = "review"
        for pair in band.index[review]:
            reasons[ordered(pair)] = spec.merge_needs_reason
    held_back, why = _alike_but_contradicted(frame, features, band, spec)
    if held_back.any():
        probability = probability.copy()
        probability[held_back] = probability[held_back] * CONFLICT_FACTOR
        band[held_back] = "review"
        for position, reason in why.items():
            reasons[ordered(band.index[position])] = reason
    if queued:
        merging = [int(i) for i in np.flatnonzero((band == "merge").to_numpy())]
        waiting = [i for i in merging if ordered(band.index[i]) in queued]
        if waiting:
            band.iloc[waiting] = "review"
            for pair in band.index[waiting]:
                reasons[ordered(pair)] = "already in the review queue: a steward decides"
    merged = probability[band == "merge"]
    linked = probability[band != "distinct"]
    clusters, refused = coherent_clusters(merged, linked, frame, spec, hard)
    if refused:  # a join the cluster refused: the pair is sure, the cluster it would make is not
        refused_pairs = pd.MultiIndex.from_tuples(list(refused))
        swapped = refused_pairs.swaplevel()  # band's pairs may come in either order
        held = (band == "merge").to_numpy() & (band.index.isin(refused_pairs) | band.index.isin(swapped))
        band[held] = "review"
        probability = probability.copy()
        probability[held] = probability[held] * CONFLICT_FACTOR
    reasons.update(refused)
    clusters, review = guard_clusters(clusters, frame, spec, hard)
    return LinkageResult(len(pairs), len(frame), features, probability, band, clusters, review, reasons)
