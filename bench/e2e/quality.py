"""Matching quality of a finished ``crmi run`` against a generator's truth: the figures of ``make bench-dedup``.

Independent of the toolkit (nothing from ``crm_core`` or ``integration`` is imported): it reads the
core's tables with SQL and the generator's CSV files, so the measurement cannot share a mistake with
the code it measures. The pure functions take plain frames, so a test can check them by hand.

Definitions (every figure is over the truth's customer records that reached the core; a record's
*golden* customer is its crosswalk customer followed along ``merged_into_id`` to the survivor):

* **pair precision / recall / F1**: a pair is two source records; predicted when they share a golden
  customer, true when they share a company.
* **cluster F1** (exact-cluster F1, as ``integration.dedup.evaluate.cluster_scores`` defines it): a
  golden customer counts as right only when its records are exactly one company's records; precision
  = right golden customers / golden customers, recall = right / companies. ``bcubed_*`` (B-cubed: per
  record, the share of its golden customer that is its company and the share of its company that is in
  its golden customer, averaged over records) is printed beside it as the gentler measure.
* **mixed golden share**: golden customers holding records of two or more companies / golden customers.
* **review queue**: customer candidates with status ``review``; share of records = pairs / records;
  truly the same = pairs whose two golden customers' majority companies are the same company.
* **opportunities attached**: of the opportunity rows the truth marks resolvable (their customer has
  a record in some source and the row names or references it), the share in the core whose customer's
  golden record's majority company is the row's company (rows not in the core count as not attached);
  ``opportunities_attached_wrong`` counts loaded rows on another company's golden customer, and
  ``opportunities_attached_by_class`` breaks the share down by how the row wrote its customer's name.
* **per class**: a must-match class tags records; its recall is over the true pairs with at least
  one tagged record. A trap class tags records with a group (``trap_x:17``); its false-merge rate is
  the share of the group's cross-company pairs that share a golden customer, and ``groups_merged`` the
  share of groups with at least one such pair.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa

TRAP_PREFIX = "trap_"


def clean_key(value: object) -> str:
    """Keys compared the way a spreadsheet key is cleaned: trimmed, inner whitespace collapsed."""
    return " ".join(re.sub("[\u200b-\u200d\ufeff]", "", str(value)).split())


def pairs(counts: pd.Series) -> int:
    """Number of pairs within groups of the given sizes."""
    return int((counts * (counts - 1) // 2).sum())


def ratio(numerator: float, denominator: float, empty: float | None = 1.0) -> float | None:
    """A rounded share; ``empty`` when there is nothing to divide by."""
    return round(numerator / denominator, 4) if denominator else empty


def follow_merges(ids: pd.Series, merged_into: pd.Series) -> pd.Series:
    """Each customer id followed along ``merged_into`` (id -> survivor) to the end of its chain."""
    current = ids.astype("int64")
    for _ in range(1000):
        step = current.map(merged_into)
        if step.isna().all():
            return current
        current = step.fillna(current).astype("int64")
    raise RuntimeError("merge chain longer than 1000 steps (a cycle?)")


def f1_of(precision: float, recall: float) -> float:
    """Harmonic mean."""
    return round(2 * precision * recall / (precision + recall), 4) if precision + recall else 0.0


def clustering_scores(records: pd.DataFrame) -> dict[str, Any]:
    """Pair, exact-cluster and B-cubed scores of ``records`` (columns company_id, golden)."""
    true_pairs = pairs(records.groupby("company_id").size())
    found_pairs = pairs(records.groupby("golden").size())
    right_pairs = pairs(records.groupby(["company_id", "golden"]).size())
    precision = right_pairs / found_pairs if found_pairs else 1.0
    recall = right_pairs / true_pairs if true_pairs else 1.0
    company_members = {frozenset(rows) for rows in records.groupby("company_id").groups.values()}
    golden_members = {frozenset(rows) for rows in records.groupby("golden").groups.values()}
    exact = len(company_members & golden_members)
    cluster_p = exact / len(golden_members) if len(golden_members) else 1.0
    cluster_r = exact / len(company_members) if len(company_members) else 1.0
    both = records.groupby(["company_id", "golden"]).size()
    per_record = records.join(both.rename("both"), on=["company_id", "golden"])
    per_record = per_record.join(records.groupby("golden").size().rename("in_golden"), on="golden")
    per_record = per_record.join(records.groupby("company_id").size().rename("in_company"), on="company_id")
    bcubed_p = float((per_record["both"] / per_record["in_golden"]).mean()) if len(records) else 1.0
    bcubed_r = float((per_record["both"] / per_record["in_company"]).mean()) if len(records) else 1.0
    companies_per_golden = records.groupby("golden")["company_id"].nunique()
    goldens_per_company = records.groupby("company_id")["golden"].nunique()
    return {
        "pair_precision": round(precision, 4), "pair_recall": round(recall, 4),
        "pair_f1": f1_of(precision, recall), "true_pairs": true_pairs, "predicted_pairs": found_pairs,
        "cluster_precision": round(cluster_p, 4), "cluster_recall": round(cluster_r, 4),
        "cluster_f1": f1_of(cluster_p, cluster_r),
        "bcubed_precision": round(bcubed_p, 4), "bcubed_recall": round(bcubed_r, 4),
        "bcubed_f1": f1_of(bcubed_p, bcubed_r),
        "golden_customers": len(golden_members), "companies": len(company_members),
        "golden_mixing_companies": int((companies_per_golden > 1).sum()),
        "golden_mixing_share": ratio(int((companies_per_golden > 1).sum()), len(golden_members)),
        "companies_split": int((goldens_per_company > 1).sum()),
    }  # fmt: skip


def tags_of(records: pd.DataFrame) -> pd.DataFrame:
    """One row per (record, tag) from the ``classes`` column (``;``-separated); trap tags split into class/group."""
    if "classes" not in records.columns:
        return pd.DataFrame(columns=["record", "tag", "group"])
    exploded = records["classes"].fillna("").astype(str).str.split(";").explode()
    exploded = exploded[exploded != ""]
    raw = pd.Series(exploded.to_numpy(), dtype=object)
    return pd.DataFrame({
        "record": exploded.index.to_numpy(), "tag": raw.map(lambda t: t.split(":", 1)[0]),
        "group": raw.map(lambda t: t.split(":", 1)[1] if ":" in t else None),
    })  # fmt: skip


def class_breakdown(records: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Recall per must-match class and false-merge rate per trap class (see the module docstring)."""
    tags = tags_of(records)
    out: dict[str, dict[str, Any]] = {}
    company_size = records.groupby("company_id").size()
    company_golden_size = records.groupby(["company_id", "golden"]).size()
    for tag, rows in tags[~tags["tag"].str.startswith(TRAP_PREFIX)].groupby("tag"):
        tagged = records.loc[rows["record"].unique()]
        n_c = tagged["company_id"].map(company_size)
        n_cg = pd.Series(
            company_golden_size.loc[
                list(zip(tagged["company_id"], tagged["golden"], strict=True))
            ].to_numpy(),
            index=tagged.index,
        )
        total = int((n_c - 1).sum()) - pairs(tagged.groupby("company_id").size())
        found = int((n_cg - 1).sum()) - pairs(tagged.groupby(["company_id", "golden"]).size())
        out[str(tag)] = {
            "records": len(tagged),
            "pairs": total,
            "found": found,
            "recall": ratio(found, total, None),
        }
    for tag, rows in tags[tags["tag"].str.startswith(TRAP_PREFIX)].groupby("tag"):
        members = (
            rows[["record", "group"]].drop_duplicates().join(records[["company_id", "golden"]], on="record")
        )
        cross = pairs(members.groupby("group").size()) - pairs(
            members.groupby(["group", "company_id"]).size()
        )
        same_golden = members.groupby(["group", "golden"]).size()
        same_both = members.groupby(["group", "golden", "company_id"]).size()
        merged = pairs(same_golden) - pairs(same_both)
        groups = members.groupby("group")["company_id"].nunique()
        testable = groups[groups > 1].index
        mixed = members[members["group"].isin(testable)].groupby(["group", "golden"])["company_id"].nunique()
        merged_groups = mixed[mixed > 1].reset_index()["group"].nunique()
        out[str(tag)] = {"groups": len(testable), "pairs": cross, "merged": merged,
                         "false_merge_rate": ratio(merged, cross, None),
                         "groups_merged": ratio(merged_groups, len(testable), None)}  # fmt: skip
    return dict(sorted(out.items()))


def majority_company(records: pd.DataFrame) -> pd.Series:
    """Golden customer -> the company most of its records belong to (ties: the smallest company id)."""
    counts = records.groupby(["golden", "company_id"]).size().rename("n").reset_index()
    counts = counts.sort_values(["golden", "n", "company_id"], ascending=[True, False, True])
    return counts.drop_duplicates("golden").set_index("golden")["company_id"]


def review_figures(records: pd.DataFrame, candidates: pd.DataFrame, golden_of: pd.Series) -> dict[str, Any]:
    """Review queue size (share of records) and share of its pairs truly the same (see the docstring)."""
    company = majority_company(records)
    left = candidates["left_id"].map(golden_of).map(company)
    right = candidates["right_id"].map(golden_of).map(company)
    known = left.notna() & right.notna()
    same = int((left[known] == right[known]).sum())
    return {"review_pairs": len(candidates), "review_share_of_records": ratio(len(candidates), len(records), 0.0),
            "review_truly_same": ratio(same, int(known.sum()), None)}  # fmt: skip


def opportunity_figures(
    records: pd.DataFrame, opportunity_truth: pd.DataFrame, opportunities_in_core: pd.DataFrame
) -> dict[str, Any]:
    """Share of resolvable opportunity rows attached to their company's golden customer.

    ``opportunity_truth``: source, key, company_id, resolvable; ``opportunities_in_core``: source, key,
    golden (the golden customer the loaded row points at).
    """
    wanted = opportunity_truth[opportunity_truth["resolvable"].astype(int) == 1]
    joined = wanted.merge(opportunities_in_core, on=["source", "key"], how="left")
    attached_to = joined["golden"].map(majority_company(records))
    right = int((attached_to == joined["company_id"]).sum())
    loaded = int(joined["golden"].notna().sum())
    by_source = {
        str(source): ratio(int((attached_to[group.index] == group["company_id"]).sum()), len(group))
        for source, group in joined.groupby("source")
    }
    by_class: dict[str, float | None] = {}
    if "classes" in joined.columns:
        for tag, rows in tags_of(joined).groupby("tag"):
            group = joined.loc[rows["record"].unique()]
            by_class[str(tag)] = ratio(
                int((attached_to[group.index] == group["company_id"]).sum()), len(group)
            )
    return {"opportunity_rows_resolvable": len(wanted), "opportunity_rows_loaded": loaded,
            "opportunities_attached_right": ratio(right, len(wanted)),
            "opportunities_attached_wrong": loaded - right, "opportunities_attached_by_source": by_source,
            "opportunities_attached_by_class": by_class,
            "opportunity_rows_not_resolvable": int(len(opportunity_truth) - len(wanted))}  # fmt: skip


def read_truth(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The generator's truth.csv (keys cleaned) and opportunities_truth.csv (None when absent)."""
    truth = pd.read_csv(folder / "truth.csv", dtype=str, keep_default_na=False)
    truth["company_id"] = truth["company_id"].astype("int64")
    truth["key"] = truth["key"].map(clean_key)
    opportunity_file = folder / "opportunities_truth.csv"
    if not opportunity_file.exists():
        return truth, None
    opportunities = pd.read_csv(opportunity_file, dtype=str, keep_default_na=False)
    opportunities["company_id"] = opportunities["company_id"].map(lambda v: int(v) if v else -1)
    opportunities["key"] = opportunities["key"].map(clean_key)
    return truth, opportunities


def measure(core_url: str, data: Path) -> dict[str, Any]:
    """Every figure of the module docstring for the core at ``core_url`` and the truth in ``data``."""
    truth, opportunity_truth = read_truth(data)
    engine = sa.create_engine(core_url)
    try:
        crosswalk = pd.read_sql(
            "SELECT system, external_key, entity, entity_id FROM external_ids "
            "WHERE entity IN ('customer', 'opportunity')",
            engine,
        )
        customers = pd.read_sql("SELECT id, merged_into_id FROM customers", engine)
        opportunities = pd.read_sql("SELECT id, customer_id FROM opportunities", engine)
        candidates = pd.read_sql(
            "SELECT left_id, right_id FROM match_candidates WHERE entity = 'customer' AND status = 'review'",
            engine,
        )
    finally:
        engine.dispose()
    merged_into = customers.set_index("id")["merged_into_id"].dropna().astype("int64")
    golden_of = pd.Series(follow_merges(customers["id"], merged_into).to_numpy(), index=customers["id"])
    customer_keys = crosswalk[crosswalk["entity"] == "customer"]
    customer_keys = customer_keys.assign(
        key=customer_keys["external_key"].map(clean_key), golden=customer_keys["entity_id"].map(golden_of)
    )
    records = truth.merge(
        customer_keys[["system", "key", "golden"]], left_on=["source", "key"], right_on=["system", "key"]
    )
    records = records.drop_duplicates(["source", "key"]).reset_index(drop=True)
    records["golden"] = records["golden"].astype("int64")
    out: dict[str, Any] = {"truth_records": len(truth), "records_in_core": len(records)}
    out.update(clustering_scores(records))
    out.update(review_figures(records, candidates, golden_of))
    if opportunity_truth is not None:
        opportunity_keys = crosswalk[crosswalk["entity"] == "opportunity"]
        customer_of = opportunities.set_index("id")["customer_id"]
        in_core = pd.DataFrame({
            "source": opportunity_keys["system"], "key": opportunity_keys["external_key"].map(clean_key),
            "golden": opportunity_keys["entity_id"].map(customer_of).map(golden_of),
        }).dropna(subset=["golden"]).drop_duplicates(["source", "key"])  # fmt: skip
        out.update(opportunity_figures(records, opportunity_truth, in_core))
    out["classes"] = class_breakdown(records)
    return out
