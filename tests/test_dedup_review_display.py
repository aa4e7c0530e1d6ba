"""`crmi dedup review`'s held names as a steward reads them: amounts as everywhere else, and a candidate
without a probability said to have none (found by a newcomer's trial)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from integration import cli
from integration.dedup import references, workflow


def held_names_output(monkeypatch: pytest.MonkeyPatch, candidates: list[dict[str, Any]]) -> str:
    """Return what `crmi dedup review` prints for one held name with these candidates."""

    @contextlib.contextmanager
    def no_core(core: str | None, *, create: bool = False) -> Iterator[None]:
        yield None

    held = {"reference": "r7", "name": "华鑫科技", "rows_held": 2, "amount_held": "200000.00",
            "candidates": candidates}  # fmt: skip
    monkeypatch.setattr(cli, "_core_engine", no_core)
    monkeypatch.setattr(workflow, "review_queue", lambda engine, limit: [])
    monkeypatch.setattr(references, "reference_queue", lambda engine, limit: [held])
    out = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(width=200, file=out))
    cli.dedup_review(core=None, limit=50, as_json=False)
    return out.getvalue()


def columns_of(shown: str) -> list[dict[str, str]]:
    """The held-names table's lines as {column header: cell text} (one candidate a line)."""
    lines = shown.split("Names that match no single customer")[1].splitlines()
    header = next(line for line in lines if "┃" in line)
    names = [cell.strip() for cell in header.split("┃")[1:-1]]
    rows = [line for line in lines if line.count("│") == len(names) + 1]
    return [dict(zip(names, (c.strip() for c in row.split("│")[1:-1]), strict=True)) for row in rows]


def test_the_amount_held_is_written_like_every_other_amount_and_names_its_currency(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A newcomer steward read "200,000.00" and could not tell in which currency (amounts are converted into
    # the project's base currency when they load).
    from integration.project import load_project

    spec = load_project(None).spec  # the project `crmi dedup review` reads by default
    base = spec.currencies.base if spec.currencies else "CNY"
    shown = held_names_output(
        monkeypatch, [{"id": 1, "name": "华鑫科技（北京）有限公司", "probability": 0.91}]
    )
    assert "200000.00" not in shown, shown
    (row,) = columns_of(shown)
    assert row[f"amount held ({base})"] == "200,000.00", row
    assert row["candidates (id name)"] == "1 华鑫科技（北京）有限公司" and row["probability"] == "0.91", row


def test_probabilities_and_name_similarities_have_columns_of_their_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The column said "probability" and held name similarities too, written differently: which was which?
    shown = held_names_output(
        monkeypatch,
        [{"id": 1, "name": "华鑫科技（北京）有限公司", "probability": 0.91},
         {"id": 4, "name": "骅鑫科技（上海）有限公司", "probability": None, "similarity": 0.92},
         {"id": 6, "name": "华欣科技有限公司", "probability": None}],
    )  # fmt: skip
    first, second, third = columns_of(shown)
    assert (first["probability"], first["name similarity"]) == ("0.91", "—"), first
    assert (second["probability"], second["name similarity"]) == ("—", "0.92"), second
    assert (third["probability"], third["name similarity"]) == ("—", "—"), third
    assert second["candidates (id name)"] == "4 骅鑫科技（上海）有限公司", second
    assert "0.9" not in third["candidates (id name)"], third


def test_a_candidate_without_a_probability_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    # Candidates found as name variants carry no probability: the header promised one, the row showed none.
    shown = held_names_output(
        monkeypatch,
        [{"id": 1, "name": "华鑫科技（北京）有限公司", "probability": 0.91},
         {"id": 4, "name": "华鑫科技（上海）有限公司", "probability": None}],
    )  # fmt: skip
    assert [(r["candidates (id name)"], r["probability"]) for r in columns_of(shown)] == [
        ("1 华鑫科技（北京）有限公司", "0.91"),
        ("4 华鑫科技（上海）有限公司", "—"),
    ], shown
    unscored = held_names_output(
        monkeypatch,
        [{"id": 1, "name": "华鑫科技（北京）有限公司", "probability": None},
         {"id": 4, "name": "华鑫科技（上海）有限公司", "probability": None}],
    )  # fmt: skip
    rows = columns_of(unscored)
    assert all("probability" not in r and "name similarity" not in r for r in rows), unscored
    assert [r["candidates (id name)"] for r in rows] == [
        "1 华鑫科技（北京）有限公司",
        "4 华鑫科技（上海）有限公司",
    ]


def review_output(monkeypatch: pytest.MonkeyPatch, reason: str | None, width: int = 400) -> str:
    """Return what `crmi dedup review` prints for one pair whose features carry this reason."""

    @contextlib.contextmanager
    def no_core(core: str | None, *, create: bool = False) -> Iterator[None]:
        yield None

    features: dict[str, Any] = {"name_core_levenshtein": 1, "phones_overlap": 0}
    if reason is not None:
        features["reason"] = reason
    pair = {"candidate": 7, "entity": "customer", "probability": 1.0, "left_id": 120, "left": "宁波华信模具有限公司",
            "left_key": None, "right_id": 121, "right": "宁波华鑫模具有限公司", "right_key": None,
            "features": features, "scored_on": [120, 121], "same_pair": []}  # fmt: skip
    monkeypatch.setattr(cli, "_core_engine", no_core)
    monkeypatch.setattr(workflow, "review_queue", lambda engine, limit: [pair])
    monkeypatch.setattr(references, "reference_queue", lambda engine, limit: [])
    out = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(width=width, file=out))
    cli.dedup_review(core=None, limit=50, as_json=False)
    return out.getvalue()


def test_the_review_table_says_why_linkage_held_each_pair_back(monkeypatch: pytest.MonkeyPatch) -> None:
    # A newcomer steward: a 1.000 pair in the queue and no word why; the reason was only in --json.
    reason = "names alike but not the same, no identifier shared, and different street addresses (#121 has no phone)"
    shown = review_output(monkeypatch, reason)
    assert "why" in shown.splitlines()[2], shown
    assert reason in shown, shown
    # a pair without a recorded reason says so rather than leaving the steward guessing
    assert "—" in review_output(monkeypatch, None).split("why")[1], review_output(monkeypatch, None)


def test_a_long_reason_is_shortened_in_the_table_and_whole_in_json(monkeypatch: pytest.MonkeyPatch) -> None:
    long = (
        "not merged: links 3 of 8 member pairs between two groups of 2 and 4 records "
        + "(one record " * 20
        + ")"
    )
    shown = review_output(monkeypatch, long)
    assert long not in shown and "not merged: links 3 of 8 member pairs" in shown and "…" in shown, shown
    assert "--json" in shown, shown


def test_without_a_project_the_amount_held_says_it_is_in_the_base_currency(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # `crmi dedup review` reads the core alone (`--core-url`); no project found is no reason to refuse it.
    monkeypatch.setenv("CRM_PROJECT", str(tmp_path))
    shown = held_names_output(
        monkeypatch, [{"id": 1, "name": "华鑫科技（北京）有限公司", "probability": 0.91}]
    )
    (row,) = columns_of(shown)
    assert row["amount held (base currency)"] == "200,000.00", row
    assert "`--project` (or $CRM_PROJECT) names it" in shown, shown
