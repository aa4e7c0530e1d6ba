"""Deduplicating the core's customers: link, record candidates, auto-merge sure clusters, steward decisions.

Everything runs inside a journaled load run, so a dedup pass rolls back like any load and each merge can
be undone on its own, in any order (``crm_core.merging.undo_merge``). Candidates, merges and the review
queue are read and written set-based (a few statements per batch, never one per pair or per record).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import Engine, func, select

from crm_core.db import session_factory
from crm_core.edits import share_edit_fence
from crm_core.errors import DedupError
from crm_core.journal import id_parts, ids_in
from crm_core.loading import get_or_start_run
from crm_core.merging import (
    BATCH_RECORDS,
    ENTITY_OF,
    MODEL_OF,
    Members,
    MergePlan,
    SurvivorshipRule,
    active_records,
    changed_in_run,
    decided_pairs,
    golden_of,
    load_members,
    members_of,
    merge_plans,
    order_members,
    record_candidates,
    refresh_statistics,
)
from crm_core.models import Contact, Customer, MatchCandidate, MergeLink, MergeLog
from integration.dedup.customers import CUSTOMER_SPEC, CustomerRecords, read_customer_records
from integration.dedup.linkage import (
    CONFLICT_FACTOR,
    Compared,
    HardValues,
    Labels,
    LinkageResult,
    LinkageSpec,
    among,
    coherent_clusters,
    field_words,
    fields_in_words,
    guard_clusters,
    link,
    ordered,
)
from integration.dedup.normalize import normalize_company_name
from integration.steward.audit import record_decision


@dataclass
class DedupOutcome:
    """What a dedup pass found and did (Dagster metadata, CLI output)."""

    records: int = 0
    changed_records: int | None = None  # delta runs: the records this run created or changed (the focus)
    pairs_compared: int = 0
    reduction_ratio: float = 0.0
    bands: dict[str, int] = field(default_factory=dict)
    new_candidates: int = 0
    auto_merged: int = 0  # records merged into a survivor
    review_clusters: int = 0
    cluster_sizes: dict[int, int] = field(default_factory=dict)  # size -> clusters merged
    merge_log_ids: list[int] = field(default_factory=list)
    review_pairs: int = 0  # pairs this pass sent to a steward
    review_share_of_records: float = 0.0  # review pairs per linked record
    # The mean match probability of the review pairs: the share a steward can expect to be the same company.
    review_expected_same: float | None = None
    review_reasons: dict[str, int] = field(default_factory=dict)  # why pairs were held back from merging
    branches_linked: int = 0  # branches (分公司) given their head office as parent_id
    second_look: dict[str, Any] | None = None  # what the second pass over the golden records found and did

    def summary(self, first: int = 10) -> dict[str, Any]:
        """Return the outcome for printing: counts, and the first merge ids instead of all of them."""
        out = {k: v for k, v in asdict(self).items() if k != "merge_log_ids"}
        out["merge_log_ids_first"] = self.merge_log_ids[:first]
        return out


@dataclass
class Candidates:
    """Scored pairs and the clusters to merge, recorded in the core by :func:`link_and_record`."""

    outcome: DedupOutcome
    clusters: list[list[int]]
    scored: dict[tuple[int, int], tuple[float, dict[str, Any], str]]
    auto_merge: float
    cluster_probability: list[float | None] = field(default_factory=list)  # lowest pair score per cluster
    reason: str | None = None  # the merge log's reason; default: the auto-merge threshold
    # The customers as the first pass linked them and the pairs it compared, when it found clusters: the
    # second look (after the merges) computes linkage rows and compares pairs only where the merges changed
    # a customer.
    records: CustomerRecords | None = None
    features: pd.DataFrame | None = None


def find_candidates(
    engine: Engine,
    run_key: str,
    project: str,
    *,
    spec: LinkageSpec = CUSTOMER_SPEC,
    mode: str = "full",
    only_if_changed: bool = False,
) -> Candidates:
    """Link the active customers and record every merge/review pair as a candidate (no merge yet).

    A delta run links only the customers it created or changed, against all active customers. With
    ``only_if_changed`` (migration runs) a run that created or changed no customer links nothing.
    """
    records = read_customer_records(engine)
    found = link_and_record(
        engine, run_key, project, "customer", records.frame, spec, mode=mode, only_if_changed=only_if_changed,
        keep_features=True,
    )  # fmt: skip
    if found.clusters:
        found.records = records
    else:
        found.features = None  # no merges, no second look: nothing to hand on
    return found


def link_and_record(
    engine: Engine,
    run_key: str,
    project: str,
    entity: str,
    records: pd.DataFrame,
    spec: LinkageSpec,
    *,
    mode: str = "full",
    only_if_changed: bool = False,
    keep_features: bool = False,
) -> Candidates:
    """Link ``records`` of ``entity`` (customer or contact) and store every merge/review pair as a candidate.

    Steward decisions on the entity are used: "distinct" pairs never return, and enough of them train the
    supervised classifier. A delta run links only the records it created or changed.

    ``only_if_changed``: when the run created or changed none of the records, link nothing. A migration run
    over unchanged sources then leaves the golden records and the review queue as they are: linking again
    would score a different population (the golden records of the last run, with the values merged into
    them) and merge or re-score pairs no source row changed. ``keep_features``: the candidates carry the
    comparison features of every pair linked (for a second look at the same records).
    """
    outcome = DedupOutcome(records=len(records))
    nothing = Candidates(outcome, [], {}, spec.auto_merge)
    if len(records) < 2:
        return nothing
    factory = session_factory(engine)
    with factory() as session:
        distinct = decided_pairs(session, entity, "distinct")
        queued = decided_pairs(session, entity, "review")
        labels = steward_labels(session, spec, entity)
        changed = (
            changed_in_run(session, MODEL_OF[entity], run_key) if mode == "delta" or only_if_changed else []
        )
        focus = pd.Index(changed) if mode == "delta" else None
    if only_if_changed and not changed:
        outcome.changed_records = 0
        return nothing
    if focus is not None:
        outcome.changed_records = len(focus)
        if focus.empty:
            return nothing
    result = link(records, spec, distinct, labels, focus=focus, queued=queued)
    outcome.pairs_compared = result.pairs_compared
    outcome.reduction_ratio = round(result.reduction_ratio, 4)
    outcome.bands = {str(k): int(v) for k, v in result.band.value_counts().items()}
    outcome.review_clusters = len(result.cluster_review)
    outcome.cluster_sizes = dict(sorted(Counter(len(c) for c in result.clusters).items()))
    in_review = result.probability[result.band == "review"]
    outcome.review_pairs = len(in_review)
    outcome.review_share_of_records = round(len(in_review) / len(records), 4)
    outcome.review_expected_same = round(float(in_review.mean()), 4) if len(in_review) else None
    outcome.review_reasons = dict(
        Counter(reason.split(" (")[0].split(":")[0] for reason in result.reasons.values())
    )
    scored = scored_pairs(result, records.index)
    with factory() as session, session.begin():
        run = get_or_start_run(session, run_key, project, mode)
        outcome.new_candidates = record_candidates(session, run, entity, scored)
    clusters = [[int(i) for i in cluster] for cluster in result.clusters]
    return Candidates(outcome, clusters, scored, spec.auto_merge, lowest_scores(clusters, scored),
                      features=result.features if keep_features else None)  # fmt: skip


def scored_pairs(
    result: LinkageResult, index: pd.Index
) -> dict[tuple[int, int], tuple[float, dict[str, Any], str]]:
    """The pairs a linkage kept (merge or review band) as candidates: pair → (probability, features, status)."""
    label = result.labels(index)
    scored: dict[tuple[int, int], tuple[float, dict[str, Any], str]] = {}
    kept = result.band != "distinct"
    features_of = result.features.loc[kept].to_dict("index")
    for pair, probability in result.probability.loc[kept].items():
        left, right = ordered(pair)  # type: ignore[arg-type]
        # two different records share a label only inside a merge cluster
        status = "merged" if label[left] == label[right] else "review"
        features: dict[str, Any] = {str(k): int(v) for k, v in features_of[pair].items()}
        if status == "review" and (reason := result.reasons.get((left, right))):
            features["reason"] = reason  # shown to the steward: why this pair was not merged
        scored[(int(left), int(right))] = (float(probability), features, status)
    return scored


def lowest_scores(
    clusters: Sequence[list[int]], scored: Mapping[tuple[int, int], tuple[float, dict[str, Any], str]]
) -> list[float | None]:
    """The lowest score inside each cluster, in one pass over the pairs (not a scan of all pairs per cluster)."""
    cluster_of = {member: number for number, cluster in enumerate(clusters) for member in cluster}
    lowest: list[float | None] = [None] * len(clusters)
    for (left, right), (probability, _, _) in scored.items():
        number = cluster_of.get(left)
        if number is not None and cluster_of.get(right) == number:
            current = lowest[number]
            lowest[number] = probability if current is None else min(current, probability)
    return lowest


# Why a pair of the second look waits for a steward instead of merging (shown with the pair): this prefix,
# then what actually held it back (:func:`second_look_reason`).
SECOND_LOOK = "second look at the golden records"
SECOND_LOOK_MERGE = "auto-merge: the same name in the same place (second look at the golden records)"


def second_look(
    engine: Engine,
    run_key: str,
    project: str,
    first: Candidates,
    *,
    spec: LinkageSpec = CUSTOMER_SPEC,
    source_priority: Sequence[str] = (),
    survivorship: Mapping[str, SurvivorshipRule] | None = None,
    mode: str = "full",
) -> DedupOutcome:
    """Link the golden customers once more after the first pass merged, and fill the review queue with what it finds.

    A golden record carries what its members brought (a city, a code, a phone the record that named the
    firm lacked), and the classifier fitted on golden records weighs a name differently from one fitted on
    source records, so pairs the first pass could not score surface here. This pass merges only a pair
    whose names agree at the top level and whose places are known on both sides and the same (one name in
    one city is one registered firm); every other pair it would merge goes to a steward at its probability
    times ``CONFLICT_FACTOR`` (held back, as a refused join is), with the reason. Pairs the first pass
    already scored, or whose two golden records already face each other in the queue, are left alone.
    Runs only when the first pass merged something (else the golden records are what it linked).
    """
    outcome = DedupOutcome()
    if not first.clusters:
        return outcome
    records = read_customer_records(engine, first.records).frame
    outcome.records = len(records)
    if len(records) < 2:
        return outcome
    factory = session_factory(engine)
    with factory() as session:
        distinct = decided_pairs(session, "customer", "distinct")
        labels = steward_labels(session, spec, "customer")
        focus = pd.Index(changed_in_run(session, Customer, run_key)) if mode == "delta" else None
        survivor: dict[int, int] = {
            int(i): int(j)
            for i, j in session.execute(
                select(Customer.id, Customer.merged_into_id).where(Customer.merged_into_id.is_not(None))
            )
            if j is not None
        }
    if focus is not None and focus.empty:
        return outcome
    earlier = (
        Compared(first.records.frame, first.features)
        if first.records is not None and first.features is not None
        else None
    )
    result = link(records, spec, distinct, labels, focus=focus, earlier=earlier)
    outcome.pairs_compared = result.pairs_compared
    outcome.reduction_ratio = round(result.reduction_ratio, 4)

    def golden(record: int) -> int:
        seen = set()
        while record in survivor and record not in seen:
            seen.add(record)
            record = survivor[record]
        return record

    skip = set(first.scored) | {
        ordered((golden(left), golden(right)))
        for (left, right), (_, _, status) in first.scored.items()
        if status == "review"
    }
    clusters, scored, held = look_again(result, records, spec, skip)
    outcome.review_clusters = held
    review = [probability for probability, _, status in scored.values() if status == "review"]
    outcome.bands = dict(Counter(status for _, _, status in scored.values()))
    outcome.review_pairs = len(review)
    outcome.review_share_of_records = round(len(review) / len(records), 4)
    outcome.review_expected_same = round(float(np.mean(review)), 4) if review else None
    outcome.review_reasons = dict(
        Counter(str(f["reason"]).split(" (")[0].split(":")[0] for _, f, s in scored.values() if s == "review")
    )
    outcome.cluster_sizes = dict(sorted(Counter(len(c) for c in clusters).items()))
    with factory() as session, session.begin():
        run = get_or_start_run(session, run_key, project, mode)
        outcome.new_candidates = record_candidates(session, run, "customer", scored)
    candidates = Candidates(
        outcome, clusters, scored, spec.auto_merge, lowest_scores(clusters, scored), reason=SECOND_LOOK_MERGE
    )
    return merge_clusters(
        engine, run_key, project, candidates,
        source_priority=source_priority, survivorship=survivorship, mode=mode,
    )  # fmt: skip


def look_again(
    result: LinkageResult,
    records: pd.DataFrame,
    spec: LinkageSpec,
    skip: AbstractSet[tuple[int, int]] = frozenset(),
) -> tuple[list[list[int]], dict[tuple[int, int], tuple[float, dict[str, Any], str]], int]:
    """Decide the pairs of the second look (see :func:`second_look`): (clusters to merge, scored pairs, clusters
    held for a steward by the cluster guard). ``skip``: pairs (smaller id first) left alone."""
    sure = _same_name_same_place(result, records, spec)
    if skip:  # a pair already before a steward is theirs to decide, not this pass's to merge
        sure &= ~among(sure.index, skip)
    hard = HardValues(records)
    clusters, refused = coherent_clusters(
        result.probability[sure], result.probability[result.band != "distinct"], records, spec, hard
    )
    clusters, held_clusters = guard_clusters(clusters, records, spec, hard)
    clusters = [[int(i) for i in cluster] for cluster in clusters]
    label = {member: cluster[0] for cluster in clusters for member in cluster}
    held_in = {int(member): len(cluster) for cluster in held_clusters for member in cluster}
    scored: dict[tuple[int, int], tuple[float, dict[str, Any], str]] = {}
    kept = result.band != "distinct"
    features_of = result.features.loc[kept].to_dict("index")
    for (pair, probability), band in zip(
        result.probability.loc[kept].items(), result.band.loc[kept], strict=True
    ):
        left, right = (int(x) for x in ordered(pair))  # type: ignore[arg-type]
        if (left, right) in skip:
            continue
        features: dict[str, Any] = {str(k): int(v) for k, v in features_of[pair].items()}
        if left in label and label[left] == label.get(right):
            scored[(left, right)] = (float(probability), features, "merged")
            continue
        reason = refused.get((left, right)) or result.reasons.get((left, right))
        if reason is None:
            held = held_in.get(left) if held_in.get(left) == held_in.get(right) else None
            reason = second_look_reason(features, records, left, right, spec, band, float(probability), held)
        if band == "merge":  # held back: too little to merge on at this level (see second_look)
            probability *= CONFLICT_FACTOR
        features["reason"] = reason
        scored[(left, right)] = (float(probability), features, "review")
    return clusters, scored, len(held_clusters)


def second_look_reason(
    features: Mapping[str, Any],
    records: pd.DataFrame,
    left: int,
    right: int,
    spec: LinkageSpec,
    band: str,
    probability: float,
    held_cluster: int | None = None,
) -> str:
    """Why the second look sent a pair to a steward, true to the pair: its score in the review band, or what
    kept it from "the same name in the same known place" (the names' comparison levels, the location keys on
    each side), or the cluster guard holding the cluster it would join (``held_cluster``: its size)."""
    if band != "merge":
        return (
            f"{SECOND_LOOK}: scored {probability:.2f}, between the review ({spec.review}) and auto-merge "
            f"({spec.auto_merge}) thresholds"
        )
    problems: list[str] = []
    for comparison in spec.comparisons:
        if comparison.method != "name" or comparison.name not in features:
            continue
        level = int(features[comparison.name])
        if level == 0:
            problems.append("names not alike")
        elif level < len(comparison.levels):
            problems.append("names alike but not the same")
    for key in spec.location_keys:
        a, b = (_known(records, record, key) for record in (left, right))
        words = field_words(key)
        if a is None and b is None:
            problems.append(f"no {words.one} on either side")
        elif a is None or b is None:
            problems.append(f"{words.one} known on one side only ({a or b})")
        elif a != b:
            problems.append(f"{words.differing} ({a} / {b})")
    if problems:
        return f"{SECOND_LOOK}: would merge at {probability:.2f}, but {', '.join(dict.fromkeys(problems))}"
    if held_cluster is not None:
        return (
            f"{SECOND_LOOK}: the same name in the same place, but the cluster of {held_cluster} records it "
            f"would join is held (larger than {spec.max_cluster}, or two "
            f"{fields_in_words(spec.hard_keys) or 'values of a hard key'})"
        )
    return f"{SECOND_LOOK}: would merge at {probability:.2f}; only the same name in the same known place merges here"


def _known(records: pd.DataFrame, record: int, column: str) -> str | None:
    """The record's value of a linkage column, None when blank or absent."""
    if column not in records.columns or record not in records.index:
        return None
    value = records.at[record, column]
    return None if value is None or pd.isna(value) or str(value) == "" else str(value)


def _same_name_same_place(result: LinkageResult, frame: pd.DataFrame, spec: LinkageSpec) -> pd.Series:
    """Per pair: in the merge band, every name comparison at its top level, and every location key known
    on both sides and equal (the same name registered in the same city)."""
    sure = (result.band == "merge").to_numpy(copy=True)
    names = [c for c in spec.comparisons if c.method == "name" and c.name in result.features.columns]
    if not names or not spec.location_keys:
        return pd.Series(False, index=result.band.index)
    for comparison in names:
        sure &= (result.features[comparison.name] >= len(comparison.levels)).to_numpy()
    pairs = result.band.index
    for key in spec.location_keys:
        values = frame[key].astype("string").replace("", pd.NA)
        a = values.reindex(pairs.get_level_values(0)).to_numpy()
        b = values.reindex(pairs.get_level_values(1)).to_numpy()
        known = ~(pd.isna(a) | pd.isna(b))
        same = np.zeros(len(pairs), dtype=bool)
        same[known] = a[known] == b[known]
        sure &= same
    return pd.Series(sure, index=pairs)


def merge_clusters(
    engine: Engine,
    run_key: str,
    project: str,
    candidates: Candidates,
    *,
    source_priority: Sequence[str] = (),
    survivorship: Mapping[str, SurvivorshipRule] | None = None,
    mode: str = "full",
    entity: str = "customer",
) -> DedupOutcome:
    """Merge every sure cluster into its golden record (one transaction, journaled in the run).

    Members are merged best first (source priority, then completeness; contacts: completeness), so blanks
    fill in that order; ``survivorship`` rules pick the value of the fields they name across the whole
    cluster. Clusters are merged in batches with a few set queries each, not a query per record.
    """
    outcome = candidates.outcome
    model = MODEL_OF[entity]
    reason = candidates.reason or f"auto-merge: linkage probability >= {candidates.auto_merge}"
    with session_factory(engine)() as session, session.begin():
        run = get_or_start_run(session, run_key, project, mode)
        if candidates.clusters:
            refresh_statistics(session.connection(), model)
        for batch in _batches(candidates.clusters, candidates.cluster_probability):
            members = load_members(session.connection(), model, [i for ids, _ in batch for i in ids])
            plans = [
                cluster_plan(model, members, ids, source_priority, survivorship, probability=probability,
                             reason=reason, decided_by="linkage")
                for ids, probability in batch
            ]  # fmt: skip
            log_ids = merge_plans(session, run, model, plans, members)
            outcome.merge_log_ids += log_ids
            outcome.auto_merged += len(log_ids)
    return outcome


def _batches(
    clusters: Sequence[list[int]], probabilities: Sequence[float | None]
) -> list[list[tuple[list[int], float | None]]]:
    """Group clusters into batches of about ``BATCH_RECORDS`` records."""
    batches: list[list[tuple[list[int], float | None]]] = [[]]
    size = 0
    for ids, probability in zip(clusters, probabilities, strict=True):
        if size and size + len(ids) > BATCH_RECORDS:
            batches.append([])
            size = 0
        batches[-1].append((ids, probability))
        size += len(ids)
    return [b for b in batches if b]


def cluster_plan(
    model: type[Customer] | type[Contact],
    members: Members,
    ids: Sequence[int],
    source_priority: Sequence[str] = (),
    survivorship: Mapping[str, SurvivorshipRule] | None = None,
    *,
    probability: float | None,
    reason: str,
    decided_by: str,
) -> MergePlan:
    """Return how a cluster merges: survivor and order by the project's rules, golden values for customers.

    Automatic and steward merges both go through here, so a steward's merge keeps the same survivor and
    the same survivorship-ruled values an automatic merge of the pair would.
    """
    survivor, *merged = order_members(model, members, ids, source_priority if model is Customer else ())
    golden = (
        golden_of(members, [survivor, *merged], survivorship) if survivorship and model is Customer else None
    )
    return MergePlan(survivor, tuple(merged), probability, reason, decided_by, golden)


def deduplicate_customers(
    engine: Engine,
    run_key: str,
    project: str,
    *,
    spec: LinkageSpec = CUSTOMER_SPEC,
    source_priority: Sequence[str] = (),
    survivorship: Mapping[str, SurvivorshipRule] | None = None,
    mode: str = "full",
    finish: bool = False,
) -> DedupOutcome:
    """Link active customers, store merge/review candidates, and merge every sure cluster into a golden record.

    Inside a migration the run continues (reconciliation finishes it); ``finish`` closes a standalone pass.
    """
    candidates = find_candidates(engine, run_key, project, spec=spec, mode=mode)
    outcome = merge_clusters(
        engine, run_key, project, candidates,
        source_priority=source_priority, survivorship=survivorship, mode=mode,
    )  # fmt: skip
    second = second_look(
        engine, run_key, project, candidates,
        spec=spec, source_priority=source_priority, survivorship=survivorship, mode=mode,
    )  # fmt: skip
    outcome.second_look = second.summary()
    outcome.auto_merged += second.auto_merged
    outcome.merge_log_ids += second.merge_log_ids
    outcome.branches_linked = link_branches(engine, run_key, project, mode)
    if finish:
        finish_run(engine, run_key, project, mode)
    return outcome


def link_branches(engine: Engine, run_key: str, project: str, mode: str = "full") -> int:
    """Point each branch (分公司) without a parent at its head office: the one active customer whose name is
    the branch's name without the branch marker (same region and core). Journaled in the run; returns how
    many branches were linked. A branch is never merged into its parent (linkage keeps them distinct)."""
    with session_factory(engine)() as session, session.begin():
        rows = session.execute(
            select(Customer.id, Customer.name, Customer.parent_id).where(Customer.merged_into_id.is_(None))
        ).all()
        heads: dict[tuple[str | None, str], list[int]] = {}
        branches: list[tuple[int, tuple[str | None, str]]] = []
        for customer_id, name, parent_id in rows:
            parts = normalize_company_name(name or "")
            if not parts.core:
                continue
            if parts.branch is None:
                heads.setdefault((parts.region, parts.core), []).append(customer_id)
            elif parent_id is None:
                branches.append((customer_id, (parts.region, parts.core)))
        found = {
            branch: heads[key][0] for branch, key in branches if len(heads.get(key, ())) == 1
        }  # an ambiguous head office (two customers of that name) is left for a steward
        if not found:
            return 0
        get_or_start_run(session, run_key, project, mode)  # journals the changes below to the run
        connection = session.connection()
        for part in id_parts(connection, sorted(found)):
            for customer in session.scalars(
                select(Customer).where(ids_in(connection, Customer.__table__.c.id, part))
            ):
                customer.parent_id, customer.is_branch = found[customer.id], True
        session.flush()
        return len(found)


def steward_labels(session: Any, spec: LinkageSpec, entity: str = "customer") -> Labels | None:
    """Return the pairs stewards decided (merged or distinct) with their stored comparison levels."""
    rows = session.execute(
        select(MatchCandidate.left_id, MatchCandidate.right_id, MatchCandidate.features, MatchCandidate.status).where(
            MatchCandidate.entity == entity, MatchCandidate.status.in_(("merged", "distinct")),
            MatchCandidate.decided_by.is_not(None), MatchCandidate.decided_by != "linkage",
        )
    ).all()  # fmt: skip
    names = [c.name for c in spec.comparisons]
    # Decisions stored before a written-out comparison took its built-in name carry the other one
    # (name_core_name for name_core_levenshtein): read under either.
    spelled = [(c.name, f"{c.field}_{c.method}") for c in spec.comparisons]

    def levels(found: Mapping[str, Any] | None) -> list[Any] | None:
        found = found or {}
        picked = [found.get(name, found.get(other)) for name, other in spelled]
        return None if any(level is None for level in picked) else picked

    usable = [(r, found) for r in rows if (found := levels(r.features)) is not None]
    if not usable:
        return None
    index = pd.MultiIndex.from_tuples([(r.left_id, r.right_id) for r, _ in usable])
    features = pd.DataFrame([found for _, found in usable], index=index, columns=names)
    return Labels(features, pd.Series([r.status == "merged" for r, _ in usable], index=index))


def review_count(engine: Engine, entity: str | None = None) -> dict[str, Any]:
    """Return the size of the review queue and the share of it expected to be the same record, in SQL."""
    table = MatchCandidate.__table__.c
    query = select(func.count(), func.avg(table.probability)).where(table.status == "review")
    if entity is not None:
        query = query.where(table.entity == entity)
    with engine.connect() as connection:
        pending, mean = connection.execute(query).one()
    return {"pending": int(pending), "expected_same": None if mean is None else round(float(mean), 4)}


def decision_weight(probability: float, left_size: int, right_size: int) -> float:
    """How much a steward's decision changes: the record pairs it settles times how unsure linkage is.

    Merging two golden records of 3 and 2 source records settles 6 pairs; a pair at 0.5 is a coin toss,
    one at 0.95 nearly decided. Pairs are shown in this order, largest first.
    """
    return left_size * right_size * (1.0 - abs(2.0 * probability - 1.0))


def review_queue(engine: Engine, limit: int | None = None, entity: str | None = None) -> list[dict[str, Any]]:
    """Return the pairs waiting for a steward (customers, contacts or both), side by side, those whose decision
    changes most first (:func:`decision_weight`).

    Each pair is shown as the golden records it stands for now: a side merged since shows the record it ended
    in (``left_id``/``right_id``; ``scored_on``: the records linkage compared, in the same order). Pending pairs that stand
    for the same two golden records are one entry: the one scored on those records (else the highest score),
    with the others' ids in ``same_pair``; deciding it decides them all (:func:`close_standing_pairs`).
    """
    with session_factory(engine)() as session:
        table = MatchCandidate.__table__.c
        query = select(
            table.id, table.entity, table.probability, table.left_id, table.right_id, table.features
        ).where(table.status == "review")
        if entity is not None:
            query = query.where(table.entity == entity)
        candidates = session.execute(query).all()
        connection = session.connection()
        active: dict[str, dict[int, int]] = {
            name: active_records(connection, MODEL_OF[name],
                                 [i for c in candidates if c.entity == name for i in (c.left_id, c.right_id)])
            for name in {c.entity for c in candidates}
        }  # fmt: skip
        by_pair: dict[tuple[str, int, int], list[Any]] = {}
        for c in candidates:
            a, b = active[c.entity][c.left_id], active[c.entity][c.right_id]
            by_pair.setdefault((c.entity, min(a, b), max(a, b)), []).append(c)
        entries = []
        for (name, left_id, right_id), group in by_pair.items():
            shown = min(
                group, key=lambda c: ((c.left_id, c.right_id) != (left_id, right_id), -c.probability, c.id)
            )
            others = sorted(c.id for c in group if c.id != shown.id)
            entries.append((name, left_id, right_id, shown, others))
        sizes = _golden_sizes(
            session, [(name, i) for name, left, right, _, _ in entries for i in (left, right)]
        )
        weighted = sorted(
            entries,
            key=lambda e: (-decision_weight(e[3].probability, sizes.get((e[0], e[1]), 1),
                                            sizes.get((e[0], e[2]), 1)), -e[3].probability, e[3].id),
        )  # fmt: skip
        pending = weighted[:limit] if limit is not None else weighted
        shown_records: dict[str, dict[int, tuple[str, Any]]] = {}
        for name in {e[0] for e in pending}:
            model: Any = MODEL_OF[name]
            key = (  # what tells them apart; a customer's code as written where no valid code was kept
                func.coalesce(Customer.credit_code, Customer.credit_code_as_written)
                if model is Customer
                else model.mobile
            )
            ids = [i for e in pending if e[0] == name for i in (e[1], e[2])]
            shown_records[name] = {}
            for part in id_parts(connection, ids):
                rows = session.execute(
                    select(model.id, model.name, key).where(ids_in(connection, model.id, part))
                )
                shown_records[name].update({record_id: (label, value) for record_id, label, value in rows})
        out = []
        for name, left_id, right_id, c, others in pending:
            left, right = shown_records[name].get(left_id), shown_records[name].get(right_id)
            # the records linkage compared, each beside the golden record it ended in
            scored = (
                [c.left_id, c.right_id] if active[name][c.left_id] == left_id else [c.right_id, c.left_id]
            )
            out.append({
                "candidate": c.id, "entity": name, "probability": round(c.probability, 4),
                "left_id": left_id, "left": left[0] if left else None, "left_key": left[1] if left else None,
                "right_id": right_id, "right": right[0] if right else None,
                "right_key": right[1] if right else None, "features": c.features,
                "scored_on": scored, "same_pair": others,
            })  # fmt: skip
        return out


def _golden_sizes(session: Any, records: Sequence[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """(entity, record id) → the source records it stands for (itself and every record merged into it)."""
    sizes: dict[tuple[str, int], int] = {}
    connection = session.connection()
    for name in {entity for entity, _ in records}:
        model: Any = MODEL_OF[name]
        ids = sorted({i for entity, i in records if entity == name})
        for part in id_parts(connection, ids):
            rows = session.execute(
                select(model.merged_into_id, func.count())
                .where(ids_in(connection, model.merged_into_id, part))
                .group_by(model.merged_into_id)
            )
            sizes.update({(name, survivor): count + 1 for survivor, count in rows})
    return sizes


def list_merges(engine: Engine, entity: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Return the merges, newest first: who merged what into what (ids and the records' names now), why, when,
    whether it was undone, and (``follows``) the customer merges a contact merge follows from."""
    with session_factory(engine)() as session:
        query = select(MergeLog).order_by(MergeLog.id.desc())
        if entity is not None:
            query = query.where(MergeLog.entity == entity)
        if limit is not None:
            query = query.limit(limit)
        logs = list(session.scalars(query))
        names: dict[tuple[str, int], str] = {}
        for kind, model in (("customer", Customer), ("contact", Contact)):
            ids = sorted({i for log in logs if log.entity == kind for i in (log.survivor_id, log.merged_id)})
            for part in (ids[start : start + 500] for start in range(0, len(ids), 500)):
                names.update(((kind, i), n) for i, n in session.execute(
                    select(model.id, model.name).where(model.id.in_(part))))  # fmt: skip
        # a contact merge follows the customer merges that put its two contacts under one customer; undoing
        # any of them undoes it first (``merge_links``)
        follows: dict[int, list[int]] = defaultdict(list)
        contact_merges = sorted(log.id for log in logs if log.entity == "contact")
        for part in (contact_merges[start : start + 500] for start in range(0, len(contact_merges), 500)):
            for merge_id, customer_merge in session.execute(
                select(MergeLink.merge_id, MergeLink.follows_merge_id)
                .where(MergeLink.merge_id.in_(part))
                .order_by(MergeLink.follows_merge_id)
            ):
                follows[merge_id].append(customer_merge)
        return [
            {"merge": log.id, "entity": log.entity, "survivor_id": log.survivor_id,
             "survivor_name": names.get((log.entity, log.survivor_id)), "merged_id": log.merged_id,
             "merged_name": names.get((log.entity, log.merged_id)),
             "probability": None if log.probability is None else round(log.probability, 4),
             "reason": log.reason, "decided_by": log.decided_by, "merged_at": _iso(log.created_at),
             "undone_at": _iso(log.undone_at), "follows": follows.get(log.id, [])}
            for log in logs
        ]  # fmt: skip


def _iso(stamp: dt.datetime | None) -> str | None:
    if stamp is None:
        return None
    return (stamp.replace(tzinfo=dt.UTC) if stamp.tzinfo is None else stamp).isoformat(timespec="seconds")


@dataclass(frozen=True)
class PendingPair:
    """A pending pair of a cluster: its candidate, the active records its two sides are now, its score."""

    candidate_id: int
    left: int
    right: int
    probability: float | None


@dataclass
class ClusterDecision:
    """What deciding a cluster did: merge ids, the golden records (one per merged group), pairs' statuses."""

    merges: list[int]
    survivors: list[int]
    pairs: dict[int, str]
    contact_merges: list[int] = field(default_factory=list)  # the golden customers' contacts deduplicated


def chosen_values(
    rows: Mapping[int, Mapping[str, Any]], chosen: Mapping[str, int], records: Sequence[int]
) -> dict[str, Any]:
    """The values a steward picked for the golden record: field → the chosen record's (non-blank) value."""
    values: dict[str, Any] = {}
    for name, record_id in chosen.items():
        if record_id not in records:
            raise DedupError(f"record {record_id} is not in this cluster; choose {name} from its records")
        value = rows[record_id].get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DedupError(f"record {record_id} has no {name}; choose a record that has one")
        values[name] = value
        if name == "name" and "name_normalized" in rows[record_id]:
            values["name_normalized"] = rows[record_id]["name_normalized"]
    return values


def decide_cluster(
    session: Any,
    run: Any,
    entity: str,
    pairs: Sequence[PendingPair],
    groups: Sequence[Sequence[int]],
    *,
    steward: str,
    source_priority: Sequence[str] = (),
    survivorship: Mapping[str, SurvivorshipRule] | None = None,
    chosen: Mapping[str, int] | None = None,
) -> ClusterDecision:
    """Decide a cluster of pending pairs inside ``run``: each group of active records becomes one golden record.

    Every group of two or more records merges as an automatic merge would (:func:`cluster_plan`: survivor,
    order and survivorship values by the project's rules; the lowest score of the group's pairs); the
    pairs inside a group become ``merged``, pairs across groups ``distinct`` (never proposed again), each
    stamped with the steward. ``chosen`` (a merge of the whole cluster only): field → the record whose value
    the golden record takes, applied with the first merge like a survivorship value, so undoing that merge
    restores the survivor's own. A pair decided meanwhile refuses the whole decision (DedupError). Merged
    customers' contacts are then deduplicated under each golden customer as the automatic contact dedup does
    (``contacts.dedup_after_steward_merge``), in this transaction; undoing a customer merge undoes those too.
    """
    model = MODEL_OF[entity]
    records = sorted({record for group in groups for record in group})
    members = load_members(session.connection(), model, records)
    standing = members_of(session.connection(), model, records)  # read before the merges re-point them
    if chosen and (len(groups) != 1 or len(records) < 2):
        raise DedupError("field values are chosen for a merge of the whole cluster only")
    picked = chosen_values(members.rows, chosen, records) if chosen else {}
    group_of = {record: number for number, group in enumerate(groups) for record in group}
    plans = []
    for number, group in enumerate(groups):
        if len(group) < 2:
            continue
        scores = [p.probability for p in pairs if group_of.get(p.left) == group_of.get(p.right) == number]
        lowest = min((x for x in scores if x is not None), default=None)
        plan = cluster_plan(model, members, group, source_priority, survivorship, probability=lowest,
                            reason="steward decision", decided_by=steward)  # fmt: skip
        if picked:
            plan = replace(plan, golden={**(plan.golden or {}), **picked})
        plans.append(plan)
    merge_ids = merge_plans(session, run, model, plans, members)
    contact_merges: list[int] = []
    if model is Customer and merge_ids:
        from integration.dedup.contacts import dedup_after_steward_merge  # contacts imports this module

        contact_merges = dedup_after_steward_merge(session, run, merge_ids, decided_by=steward)
    now = dt.datetime.now(dt.UTC)
    statuses: dict[int, str] = {}
    for pair in pairs:
        candidate = session.get(MatchCandidate, pair.candidate_id)
        if candidate is None or candidate.status != "review":
            raise DedupError(f"pair {pair.candidate_id} was decided meanwhile; look at the cluster again")
        same = group_of[pair.left] == group_of[pair.right]
        candidate.status = statuses[pair.candidate_id] = "merged" if same else "distinct"
        candidate.decided_by = steward
        candidate.decided_at = now
    statuses.update(close_standing_pairs(session, entity, standing, group_of, steward, now, set(statuses)))
    session.flush()
    return ClusterDecision(merge_ids, [plan.survivor_id for plan in plans], statuses, contact_merges)


def close_standing_pairs(
    session: Any,
    entity: str,
    standing: Mapping[int, int],
    group_of: Mapping[int, int],
    steward: str,
    now: dt.datetime,
    decided: AbstractSet[int] = frozenset(),
) -> dict[int, str]:
    """Decide every other pending pair that stands for a pair of the decided golden records as they were.

    ``standing``: every record that had ended in one of the decided records (:func:`crm_core.merging.members_of`,
    read before the decision merged anything) → that record; ``group_of``: decided record → its group. A
    pending pair 1 / 7 whose record 1 had been merged into 49 stands for 49 / 7: a decision on 49 / 7 decides
    it too (merged within a group, distinct across groups), so the same two golden records never wait twice.
    A pair inside one record (both sides merged into it before) is not this decision's. Returns id → status.
    """
    table = MatchCandidate.__table__.c
    connection = session.connection()
    closed: dict[int, str] = {}
    for part in id_parts(connection, list(standing)):
        rows = session.execute(
            select(table.id, table.left_id, table.right_id).where(
                table.entity == entity, table.status == "review", ids_in(connection, table.left_id, part)
            )
        ).all()
        for candidate_id, left, right in rows:
            if candidate_id in decided or right not in standing:
                continue
            a, b = standing[left], standing[right]
            if a == b or a not in group_of or b not in group_of:
                continue
            closed[candidate_id] = "merged" if group_of[a] == group_of[b] else "distinct"
    for candidate_id, status in closed.items():
        candidate = session.get(MatchCandidate, candidate_id)
        if candidate is not None:
            candidate.status, candidate.decided_by, candidate.decided_at = status, steward, now
    return closed


def decide(
    engine: Engine,
    candidate_id: int,
    *,
    same: bool,
    steward: str,
    run_key: str,
    project: str,
    source_priority: Sequence[str] = (),
    survivorship: Mapping[str, SurvivorshipRule] | None = None,
    channel: str = "cli",
) -> MatchCandidate:
    """Record a steward's decision: merge the pair (same company) or mark it distinct (never proposed again).

    A merge picks the survivor and the survivorship-ruled values exactly as an automatic merge does
    (``source_priority`` and ``survivorship`` are the project's ``dedup.customer`` rules); it is
    :func:`decide_cluster` on a cluster of one pair, as the steward workbench decides whole clusters. It waits
    for a sync's inbound load that holds the core's records, as a CRM edit does (:func:`share_edit_fence`).
    The decision's audit line (``channel``: where it was taken) commits with it.
    """
    with session_factory(engine)() as session, session.begin():
        share_edit_fence(session, "steward decision")
        candidate = session.get(MatchCandidate, candidate_id)
        if candidate is None:
            raise DedupError(f"no match candidate {candidate_id}; `crmi dedup review` lists them")
        if candidate.status != "review":
            raise DedupError(_decided_already(session, candidate))
        run = get_or_start_run(session, run_key, project, "steward")
        model = MODEL_OF[candidate.entity]
        left, right = _active(session, model, candidate.left_id), _active(session, model, candidate.right_id)
        groups = [sorted({left, right})] if same or left == right else [[left], [right]]
        pair = PendingPair(candidate_id, left, right, candidate.probability)
        decided = decide_cluster(session, run, candidate.entity, [pair], groups, steward=steward,
                                 source_priority=source_priority, survivorship=survivorship)  # fmt: skip
        if not same:
            candidate.status = "distinct"  # two sides that are one record already: still "not the same"
        session.flush()
        # audited as a workbench decision is, so the golden records' Audit lists show it (channel: CLI)
        records = sorted({left, right})
        main = decided.survivors[0] if decided.survivors else records[0]
        record_decision(
            session.connection(), steward, candidate.entity, main, records,
            f"pair {candidate_id} {'merged' if same else 'marked different'} ({candidate.entity}s "
            f"{' and '.join(map(str, records))})",
            channel=channel, after={"verdict": "same" if same else "different", "merges": decided.merges,
                                    "pairs": {str(k): v for k, v in decided.pairs.items()}, "run": run_key},
        )  # fmt: skip
        session.refresh(candidate)
        run.status = "succeeded"
        run.finished_at = dt.datetime.now(dt.UTC)
        session.expunge(candidate)
        return candidate


def _decided_already(session: Any, candidate: MatchCandidate) -> str:
    """Why a decided pair is refused, and how its decision is changed."""
    said = f"candidate {candidate.id} was already decided: {candidate.status}"
    model = MODEL_OF[candidate.entity]
    left = _active(session, model, candidate.left_id)
    if candidate.status == "merged" and left == _active(session, model, candidate.right_id):
        return (
            f"{said}; to change it, undo the merge (`crmi dedup merges` lists them, `crmi dedup undo MERGE`, "
            f"or Undo on the golden record page /records/{candidate.entity}/{left} of the steward workbench)"
        )
    return (
        f"{said}; to decide it again, Reopen it on the golden record page /records/{candidate.entity}/{left} "
        "of the steward workbench (`crmi steward serve`), then decide it there or here"
    )


def reopen_pair(session: Any, candidate_id: int) -> MatchCandidate:
    """Put a decided pair back in the review queue: a "different" (``distinct``) pair, or a ``merged`` one whose
    merge was undone (its two sides are separate records again). It no longer trains the classifier."""
    candidate: MatchCandidate | None = session.get(MatchCandidate, candidate_id)
    if candidate is None:
        raise DedupError(f"no match candidate {candidate_id}")
    if candidate.status == "review":
        raise DedupError(f"pair {candidate_id} is waiting for a steward already")
    if candidate.status == "merged":
        model = MODEL_OF[candidate.entity]
        if _active(session, model, candidate.left_id) == _active(session, model, candidate.right_id):
            raise DedupError(
                f"pair {candidate_id} is merged: undo the merge on the golden record's page first"
            )
    candidate.status = "review"
    candidate.decided_by = None
    candidate.decided_at = None
    session.flush()
    return candidate


def _active(session: Any, model: type[Customer] | type[Contact], record_id: int) -> int:
    """Follow ``merged_into_id`` from a record to the active record it ended in."""
    seen = set()
    record = session.get(model, record_id)
    while record is not None and record.merged_into_id is not None and record.id not in seen:
        seen.add(record.id)
        record = session.get(model, record.merged_into_id)
    if record is None:
        raise DedupError(f"{ENTITY_OF[model]} {record_id} no longer exists")
    return int(record.id)


def finish_run(engine: Engine, run_key: str, project: str, mode: str = "full") -> None:
    """Mark a standalone dedup run succeeded."""
    with session_factory(engine)() as session, session.begin():
        run = get_or_start_run(session, run_key, project, mode)
        run.status = "succeeded"
        run.finished_at = dt.datetime.now(dt.UTC)
