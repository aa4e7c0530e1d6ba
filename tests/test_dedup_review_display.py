"""`crmi dedup review`'s held names as a steward reads them: amounts as everywhere else, and a candidate
without a probability said to have none (found by a newcomer's trial)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
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


def test_the_amount_held_is_written_like_every_other_amount(monkeypatch: pytest.MonkeyPatch) -> None:
    shown = held_names_output(
        monkeypatch, [{"id": 1, "name": "华鑫科技（北京）有限公司", "probability": 0.91}]
    )
    assert "200,000.00" in shown and "200000.00" not in shown, shown
    assert "1 华鑫科技（北京）有限公司 0.91" in shown, shown


def test_a_candidate_without_a_probability_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    # Candidates found as name variants carry no probability: the header promised one, the row showed none.
    shown = held_names_output(
        monkeypatch,
        [{"id": 1, "name": "华鑫科技（北京）有限公司", "probability": 0.91},
         {"id": 4, "name": "华鑫科技（上海）有限公司", "probability": None}],
    )  # fmt: skip
    assert "4 华鑫科技（上海）有限公司 (no probability)" in shown, shown
    unscored = held_names_output(
        monkeypatch,
        [{"id": 1, "name": "华鑫科技（北京）有限公司", "probability": None},
         {"id": 4, "name": "华鑫科技（上海）有限公司", "probability": None}],
    )  # fmt: skip
    assert "probability" not in unscored.split("candidates")[1].splitlines()[0], unscored
    assert "1 华鑫科技（北京）有限公司; 4 华鑫科技（上海）有限公司" in unscored, unscored


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
