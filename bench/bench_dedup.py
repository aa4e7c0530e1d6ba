"""Record linkage: comparison throughput (ours on rapidfuzz vs recordlinkage's own string compare) and
FEBRL quality and time.

Prints one JSON line. Run: ``make bench-dedup`` or ``python bench/bench_dedup.py --pairs 2000000``.
Target (issue 'Customer dedup'): >= 2,000,000 comparisons/s; F1 above recordlinkage ECM (0.991 / 0.997)
and Splink (0.993 / 0.998) on febrl3 / febrl4.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import pandas as pd
from recordlinkage.compare import String

from integration.dedup.febrl import evaluate_febrl
from integration.dedup.linkage import SimilarityLevels

CORES = list("腾达讯华创环保海纳医疗星河物流启明软件云帆科技同创贸易安捷电子凯达思源信息恒通机械博远咨询")


def names(count: int, seed: int) -> pd.Series:
    """Company-name-like strings of 4–10 Chinese characters."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 11, count)
    picks = rng.integers(0, len(CORES), lengths.sum())
    out, start = [], 0
    for length in lengths:
        out.append("".join(CORES[i] for i in picks[start : start + length]))
        start += length
    return pd.Series(out)


def rate(compute: object, left: pd.Series, right: pd.Series) -> float:
    """Comparisons per second of one feature over the pairs."""
    started = time.perf_counter()
    compute._compute_vectorized(left, right)  # type: ignore[attr-defined]
    return len(left) / (time.perf_counter() - started)


def main() -> None:
    """Measure and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=2_000_000)
    parser.add_argument(
        "--baseline-pairs", type=int, default=200_000, help="recordlinkage's compare is slower"
    )
    args = parser.parse_args()
    left, right = names(args.pairs, 1), names(args.pairs, 2)
    ours = SimilarityLevels("a", "b", "jaro_winkler", (0.95, 0.85), "name")
    levenshtein = SimilarityLevels("a", "b", "levenshtein", (0.95, 0.85), "name")
    baseline = String("a", "b", method="jarowinkler", threshold=0.85)
    n = args.baseline_pairs
    result = {
        "benchmark": "dedup",
        "pairs": args.pairs,
        "ours_jaro_winkler_per_s": round(rate(ours, left, right)),
        "ours_levenshtein_per_s": round(rate(levenshtein, left, right)),
        "recordlinkage_jarowinkler_per_s": round(rate(baseline, left[:n], right[:n])),
        "target_per_s": 2_000_000,
        "python": sys.version.split()[0],
    }
    for dataset in ("febrl3", "febrl4"):
        started = time.perf_counter()
        scores = evaluate_febrl(dataset)
        result[dataset] = {"pair_f1": scores["pairs"]["f1"], "cluster_f1": scores["clusters"]["f1"],
                           "seconds": round(time.perf_counter() - started, 2)}  # fmt: skip
    result["peers_pair_f1"] = {"recordlinkage_ecm": {"febrl3": 0.991, "febrl4": 0.997},
                               "splink": {"febrl3": 0.993, "febrl4": 0.998}}  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
