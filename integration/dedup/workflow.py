"""Deduplicating the core's customers: link, record candidates, auto-merge sure clusters, steward decisions.

Everything runs inside a journaled load run, so a dedup pass rolls back like any load and each merge can
be undone on its own (``crm_core.merging.undo_merge``).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from sqlalchemy import Engine, select

from crm_core.db import session_factory
from crm_core.errors import DedupError
from crm_core.loading import get_or_start_run
from crm_core.merging import (
    ENTITY_OF,
    MODEL_OF,
    SurvivorshipRule,
    changed_in_run,
    choose_survivor,
    decided_pairs,
    golden_values,
    merge_records,
    rank_members,
    record_candidates,
)
from crm_core.models import Contact, Customer, MatchCandidate
from integration.dedup.customers import CUSTOMER_SPEC, customer_records
from integration.dedup.linkage import Labels, LinkageSpec, link, ordered


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


@dataclass
class Candidates:
    """Scored pairs and the clusters to merge, recorded in the core by :func:`link_and_record`."""

    outcome: DedupOutcome
    clusters: list[list[int]]
    scored: dict[tuple[int, int], tuple[float, dict[str, Any], str]]
    auto_merge: float
    cluster_probability: list[float | None] = field(default_factory=list)  # lowest pair score per cluster


def find_candidates(
    engine: Engine, run_key: str, project: str, *, spec: LinkageSpec = CUSTOMER_SPEC, mode: str = "full"
) -> Candidates:
    """Link the active customers and record every merge/review pair as a candidate (no merge yet).

    A delta run links only the customers it created or changed, against all active customers.
    """
    return link_and_record(engine, run_key, project, "customer", customer_records(engine), spec, mode=mode)


def link_and_record(
    engine: Engine,
    run_key: str,
    project: str,
    entity: str,
    records: pd.DataFrame,
    spec: LinkageSpec,
    *,
    mode: str = "full",
) -> Candidates:
    """Link ``records`` of ``entity`` (customer or contact) and store every merge/review pair as a candidate.

    Steward decisions on the entity are used: "distinct" pairs never return, and enough of them train the
    supervised classifier. A delta run links only the records it created or changed.
    """
    outcome = DedupOutcome(records=len(records))
    nothing = Candidates(outcome, [], {}, spec.auto_merge)
    if len(records) < 2:
        return nothing
    factory = session_factory(engine)
    with factory() as session:
        distinct = decided_pairs(session, entity, "distinct")
        labels = steward_labels(session, spec, entity)
        focus = pd.Index(changed_in_run(session, MODEL_OF[entity], run_key)) if mode == "delta" else None
    if focus is not None:
        outcome.changed_records = len(focus)
        if focus.empty:
            return nothing
    result = link(records, spec, distinct, labels, focus=focus)
    outcome.pairs_compared = result.pairs_compared
    outcome.reduction_ratio = round(result.reduction_ratio, 4)
    outcome.bands = {str(k): int(v) for k, v in result.band.value_counts().items()}
    outcome.review_clusters = len(result.cluster_review)
    outcome.cluster_sizes = dict(sorted(Counter(len(c) for c in result.clusters).items()))
    label = result.labels(records.index)
    scored: dict[tuple[int, int], tuple[float, dict[str, Any], str]] = {}
    kept = result.band != "distinct"
    features_of = result.features.loc[kept].to_dict("index")
    for pair, probability in result.probability.loc[kept].items():
        left, right = ordered(pair)  # type: ignore[arg-type]
        # two different records share a label only inside a merge cluster
        status = "merged" if label[left] == label[right] else "review"
        features = {str(k): int(v) for k, v in features_of[pair].items()}
        scored[(int(left), int(right))] = (float(probability), features, status)
    with factory() as session, session.begin():
        run = get_or_start_run(session, run_key, project, mode)
        outcome.new_candidates = record_candidates(session, run, entity, scored)
    clusters = [[int(i) for i in cluster] for cluster in result.clusters]
    # The lowest score inside each cluster, in one pass over the pairs (not a scan of all pairs per cluster).
    cluster_of = {member: number for number, cluster in enumerate(clusters) for member in cluster}
    lowest: list[float | None] = [None] * len(clusters)
    for (left, right), (probability, _, _) in scored.items():
        number = cluster_of.get(left)
        if number is not None and cluster_of.get(right) == number:
            current = lowest[number]
            lowest[number] = probability if current is None else min(current, probability)
    return Candidates(outcome, clusters, scored, spec.auto_merge, lowest)


def merge_clusters(
    engine: Engine,
    run_key: str,
    project: str,
    candidates: Candidates,
    *,
    source_priority: Sequence[str] = (),
    survivorship: Mapping[str, SurvivorshipRule] | None = None,
    mode: str = "full",
) -> DedupOutcome:
    """Merge every sure cluster into its golden record (one transaction, journaled in the run).

    Members are merged best first (source priority, then completeness), so blanks fill in that order;
    ``survivorship`` rules pick the value of the fields they name across the whole cluster.
    """
    outcome = candidates.outcome
    with session_factory(engine)() as session, session.begin():
        run = get_or_start_run(session, run_key, project, mode)
        for ids, probability in zip(candidates.clusters, candidates.cluster_probability, strict=True):
            survivor, *merged = rank_members(session, ids, source_priority)
            logs = merge_records(
                session, run, Customer, survivor, merged, probability=probability,
                reason=f"auto-merge: linkage probability >= {candidates.auto_merge}", decided_by="linkage",
                golden=golden_values(session, [survivor, *merged], survivorship) if survivorship else None,
            )  # fmt: skip
            outcome.merge_log_ids += [log.id for log in logs]
            outcome.auto_merged += len(logs)
    return outcome


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
    if finish:
        finish_run(engine, run_key, project, mode)
    return outcome


def steward_labels(session: Any, spec: LinkageSpec, entity: str = "customer") -> Labels | None:
    """Return the pairs stewards decided (merged or distinct) with their stored comparison levels."""
    rows = session.execute(
        select(MatchCandidate.left_id, MatchCandidate.right_id, MatchCandidate.features, MatchCandidate.status).where(
            MatchCandidate.entity == entity, MatchCandidate.status.in_(("merged", "distinct")),
            MatchCandidate.decided_by.is_not(None), MatchCandidate.decided_by != "linkage",
        )
    ).all()  # fmt: skip
    names = [c.name for c in spec.comparisons]
    usable = [r for r in rows if all(n in (r.features or {}) for n in names)]
    if not usable:
        return None
    index = pd.MultiIndex.from_tuples([(r.left_id, r.right_id) for r in usable])
    features = pd.DataFrame([[r.features[n] for n in names] for r in usable], index=index, columns=names)
    return Labels(features, pd.Series([r.status == "merged" for r in usable], index=index))


def review_queue(engine: Engine, limit: int | None = None, entity: str | None = None) -> list[dict[str, Any]]:
    """Return the pairs waiting for a steward (customers, contacts or both), most likely first, side by side."""
    with session_factory(engine)() as session:
        query = (
            select(MatchCandidate)
            .where(MatchCandidate.status == "review")
            .order_by(MatchCandidate.probability.desc(), MatchCandidate.id)
        )
        if entity is not None:
            query = query.where(MatchCandidate.entity == entity)
        if limit is not None:
            query = query.limit(limit)
        out = []
        for candidate in session.scalars(query):
            model: Any = MODEL_OF[candidate.entity]
            left, right = session.get(model, candidate.left_id), session.get(model, candidate.right_id)
            key = "credit_code" if candidate.entity == "customer" else "mobile"  # what tells them apart
            out.append({
                "candidate": candidate.id, "entity": candidate.entity, "probability": round(candidate.probability, 4),
                "left_id": candidate.left_id, "left": left.name if left else None,
                "left_key": getattr(left, key) if left else None,
                "right_id": candidate.right_id, "right": right.name if right else None,
                "right_key": getattr(right, key) if right else None,
                "features": candidate.features,
            })  # fmt: skip
        return out


def decide(
    engine: Engine, candidate_id: int, *, same: bool, steward: str, run_key: str, project: str
) -> MatchCandidate:
    """Record a steward's decision: merge the pair (same company) or mark it distinct (never proposed again)."""
    with session_factory(engine)() as session, session.begin():
        candidate = session.get(MatchCandidate, candidate_id)
        if candidate is None:
            raise DedupError(f"no match candidate {candidate_id}; `crmi dedup review` lists them")
        if candidate.status != "review":
            raise DedupError(f"candidate {candidate_id} was already decided: {candidate.status}")
        run = get_or_start_run(session, run_key, project, "steward")
        if same:
            model = MODEL_OF[candidate.entity]
            ids = sorted(
                {_active(session, model, candidate.left_id), _active(session, model, candidate.right_id)}
            )
            if len(ids) == 2:
                survivor = choose_survivor(session, ids) if model is Customer else ids[0]
                merge_records(session, run, model, survivor, [i for i in ids if i != survivor],
                              probability=candidate.probability, reason="steward decision", decided_by=steward)  # fmt: skip
        candidate.status = "merged" if same else "distinct"
        candidate.decided_by = steward
        candidate.decided_at = dt.datetime.now(dt.UTC)
        session.flush()
        run.status = "succeeded"
        run.finished_at = dt.datetime.now(dt.UTC)
        session.expunge(candidate)
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
