"""The matching-quality measurement of ``make bench-dedup``: figures checked by hand on a tiny truth, and a tiny run."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from integration.cli import app
from tests.conftest import REPO


def load_quality() -> ModuleType:
    """Import bench/e2e/quality.py as a module."""
    spec = importlib.util.spec_from_file_location("bench_quality", REPO / "bench" / "e2e" / "quality.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


quality = load_quality()

# Seven source records of four companies (A=1, B=2, C=3, D=4) and the golden customers they ended in:
# A is split over 10 and 11, B and C are mixed in 12, D alone in 13.
COMPANY = [1, 1, 1, 2, 2, 3, 4]
GOLDEN = [10, 10, 11, 12, 12, 12, 13]
CLASSES = ["x;trap_t:2", "x", "name_homophone", "trap_t:1", "trap_t:1", "trap_t:1", "trap_t:2;trap_single:3"]


def records() -> pd.DataFrame:
    """The seven records as the measurement sees them."""
    return pd.DataFrame({"company_id": COMPANY, "golden": GOLDEN, "classes": CLASSES})


def test_pair_cluster_and_bcubed_scores_by_hand() -> None:
    scores = quality.clustering_scores(records())
    # True pairs: A 3 + B 1 = 4; predicted: g10 1 + g12 3 = 4; right: (A,g10) 1 + (B,g12) 1 = 2.
    assert (scores["true_pairs"], scores["predicted_pairs"]) == (4, 4)
    assert scores["pair_precision"] == scores["pair_recall"] == scores["pair_f1"] == 0.5
    # Exact clusters: only D's {g13} equals a company: 1 of 4 golden customers, 1 of 4 companies.
    assert scores["cluster_precision"] == scores["cluster_recall"] == scores["cluster_f1"] == 0.25
    # B-cubed precision and recall are both 17/21 here (worked out per record in the module docstring's terms).
    assert scores["bcubed_precision"] == scores["bcubed_recall"] == round(17 / 21, 4)
    assert scores["golden_customers"] == scores["companies"] == 4
    assert scores["golden_mixing_companies"] == 1 and scores["golden_mixing_share"] == 0.25
    assert scores["companies_split"] == 1


def test_per_class_recall_and_false_merge_rate_by_hand() -> None:
    classes = quality.class_breakdown(records())
    # name_homophone on A's third record: its pairs with A's other two, neither found.
    assert classes["name_homophone"] == {"records": 1, "pairs": 2, "found": 0, "recall": 0.0}
    # x on A's first two records: pairs (0,1), (0,2), (1,2), the shared one counted once; (0,1) found.
    assert classes["x"] == {"records": 2, "pairs": 3, "found": 1, "recall": round(1 / 3, 4)}
    # trap_t: group 1 = B, B, C (cross pairs 2, both in g12); group 2 = A, D (1 cross pair, apart).
    assert classes["trap_t"] == {"groups": 2, "pairs": 3, "merged": 2, "false_merge_rate": round(2 / 3, 4),
                                 "groups_merged": 0.5}  # fmt: skip
    # A group with one company has nothing to merge wrongly.
    assert classes["trap_single"]["pairs"] == 0 and classes["trap_single"]["false_merge_rate"] is None


def test_review_queue_and_opportunity_figures_by_hand() -> None:
    golden_of = pd.Series({10: 10, 11: 11, 12: 12, 13: 13, 20: 12})
    candidates = pd.DataFrame({"left_id": [10, 11, 12, 10], "right_id": [11, 20, 13, 99]})
    review = quality.review_figures(records(), candidates, golden_of)
    # A/A truly the same; A/B and B/D not; the pair with an unknown customer is not judged.
    assert review == {"review_pairs": 4, "review_share_of_records": round(4 / 7, 4),
                      "review_truly_same": round(1 / 3, 4)}  # fmt: skip
    truth = pd.DataFrame({"source": ["s", "s", "s", "s", "t"], "key": ["o1", "o2", "o3", "o4", "o5"],
                          "company_id": [1, 2, 3, 1, 4], "resolvable": [1, 1, 1, 0, 1],
                          "classes": ["name_short_trade", "", "name_short_trade", "", ""]})  # fmt: skip
    in_core = pd.DataFrame({"source": ["s", "s", "s"], "key": ["o1", "o2", "o3"], "golden": [11, 12, 12]})
    figures = quality.opportunity_figures(records(), truth, in_core)
    # o1 -> g11 (A: right), o2 -> g12 (mostly B: right), o3 -> g12 (C's deal on B's customer: wrong),
    # o5 never loaded, o4 not resolvable.
    assert figures["opportunity_rows_resolvable"] == 4 and figures["opportunity_rows_loaded"] == 3
    assert figures["opportunities_attached_right"] == 0.5
    assert figures["opportunities_attached_wrong"] == 1
    assert figures["opportunities_attached_by_source"] == {"s": round(2 / 3, 4), "t": 0.0}
    assert figures["opportunities_attached_by_class"] == {"name_short_trade": 0.5}  # o1 right, o3 wrong
    assert figures["opportunity_rows_not_resolvable"] == 1


def write_csv(path: Path, header: list[str], rows: list[tuple[object, ...]]) -> None:
    """A CSV file like the generators write."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def test_measure_reads_the_core_follows_merge_chains_and_cleans_keys(tmp_path: Path) -> None:
    keys = [("s", "k0"), ("s", "k1"), ("t", "k 2"), ("s", "k3"), ("s", "k4"), ("t", "k5"), ("t", "k6")]
    write_csv(tmp_path / "truth.csv", ["source", "key", "company_id", "classes"],
              [(s, k, c, tags) for (s, k), c, tags in zip(keys, COMPANY, CLASSES, strict=True)])  # fmt: skip
    write_csv(tmp_path / "opportunities_truth.csv", ["source", "key", "company_id", "resolvable", "classes"],
              [("s", "o1", 1, 1, ""), ("s", "o2", 2, 1, ""), ("s", "o3", 3, 1, ""), ("s", "o4", 1, 0, ""),
               ("t", "o5", 4, 1, "")])  # fmt: skip
    core = f"sqlite:///{tmp_path / 'core.sqlite'}"
    engine = sa.create_engine(core)
    # Customer 20 was merged into 12 and 21 into 20: records loaded onto 20 and 21 belong to golden 12.
    loaded_on = [10, 10, 11, 12, 20, 21, 13]
    with engine.begin() as db:
        db.exec_driver_sql("CREATE TABLE customers (id INTEGER PRIMARY KEY, merged_into_id INTEGER)")
        db.exec_driver_sql(
            "INSERT INTO customers VALUES (10, NULL), (11, NULL), (12, NULL), (13, NULL), (20, 12), (21, 20)"
        )
        db.exec_driver_sql(
            "CREATE TABLE external_ids (system TEXT, external_key TEXT, entity TEXT, entity_id INTEGER)"
        )
        for (source, key), customer in zip(keys, loaded_on, strict=True):
            # The crosswalk keeps the key as read (here with extra spaces); the truth's is cleaned.
            db.execute(sa.text("INSERT INTO external_ids VALUES (:s, :k, 'customer', :c)"),
                       {"s": source, "k": f" {key} ", "c": customer})  # fmt: skip
        db.exec_driver_sql("INSERT INTO external_ids VALUES ('s', 'o1', 'opportunity', 1), ('s', 'o2', 'opportunity', 2),"
                           " ('s', 'o3', 'opportunity', 3), ('s', 'k0', 'contact', 10)")  # fmt: skip
        db.exec_driver_sql("CREATE TABLE opportunities (id INTEGER PRIMARY KEY, customer_id INTEGER)")
        db.exec_driver_sql("INSERT INTO opportunities VALUES (1, 11), (2, 20), (3, 21)")
        db.exec_driver_sql(
            "CREATE TABLE match_candidates (entity TEXT, left_id INTEGER, right_id INTEGER, status TEXT)"
        )
        db.exec_driver_sql("INSERT INTO match_candidates VALUES ('customer', 10, 11, 'review'),"
                           " ('customer', 11, 20, 'review'), ('customer', 12, 13, 'review'),"
                           " ('customer', 10, 99, 'review'), ('customer', 12, 20, 'merged'),"
                           " ('contact', 1, 2, 'review')")  # fmt: skip
    engine.dispose()
    figures = quality.measure(core, tmp_path)
    assert figures["records_in_core"] == figures["truth_records"] == 7
    assert figures["pair_f1"] == 0.5 and figures["cluster_f1"] == 0.25
    assert figures["golden_mixing_share"] == 0.25 and figures["companies_split"] == 1
    assert figures["review_pairs"] == 4 and figures["review_truly_same"] == round(1 / 3, 4)
    assert figures["opportunities_attached_right"] == 0.5
    assert figures["classes"]["trap_t"]["merged"] == 2


def test_the_tuning_project_checks_against_its_generated_sources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = importlib.util.spec_from_file_location(
        "tuning_engagement", REPO / "bench" / "e2e" / "tuning_engagement.py"
    )
    assert spec and spec.loader
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    manifest = generator.generate(60, tmp_path)
    assert (
        sum(manifest["by_source"].values()) == manifest["customers"]
        and min(manifest["by_source"].values()) > 0
    )
    with (tmp_path / "truth.csv").open(encoding="utf-8") as handle:
        assert len(list(csv.DictReader(handle))) == manifest["customers"]
    monkeypatch.setenv("TUNING_ERP_URL", f"sqlite:///{tmp_path / 'erp.sqlite'}")
    monkeypatch.setenv("TUNING_CRM_URL", f"sqlite:///{tmp_path / 'crm.sqlite'}")
    monkeypatch.setenv("TUNING_SALES_XLSX", str(tmp_path / "sales.xlsx"))
    project = REPO / "bench" / "e2e" / "tuning_project"
    result = CliRunner().invoke(app, ["project", "check", "--project", str(project)])
    assert result.exit_code == 0, result.output
    assert "5 mapping(s), 3 source(s)" in result.output


@pytest.mark.slow
def test_bench_dedup_runs_both_sets_end_to_end_at_a_tiny_size(tmp_path: Path) -> None:
    command = [
        sys.executable,
        str(REPO / "bench" / "bench_dedup.py"),
        "--customers",
        "120",
        "--work",
        str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    line = json.loads(done.stdout)
    assert line["mode"] == "end_to_end" and set(line["sets"]) == {"tuning", "heldout"}
    for name, figures in line["sets"].items():
        assert "error" not in figures, (name, figures.get("error"))
        assert figures["crmi_exit_code"] in (0, 2)
        assert figures["records_in_core"] == figures["truth_records"] > 0
        assert figures["companies"] <= figures["records_in_core"]
        assert figures["golden_customers"] <= figures["records_in_core"]
        for key in ("pair_f1", "cluster_f1", "golden_mixing_share", "review_share_of_records",
                    "opportunities_attached_right"):  # fmt: skip
            assert 0.0 <= figures[key] <= 1.0, (name, key)
        assert set(figures["targets_met"]) == set(line["targets"])
    heldout = line["sets"]["heldout"]["classes"]
    assert any(tag.startswith("trap_") for tag in heldout) and any(tag.startswith("name_") for tag in heldout)
