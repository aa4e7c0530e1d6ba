"""Giving memory back between steps: only once the process is large enough for it to matter."""

from __future__ import annotations

import gc

import pytest

from integration import memory


class _Libc:
    """A C library whose malloc_trim only counts its calls."""

    def __init__(self) -> None:
        self.trims: list[int] = []

    def malloc_trim(self, pad: int) -> int:
        self.trims.append(pad)
        return 1


def test_memory_is_given_back_only_above_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    libc = _Libc()
    collections: list[int] = []
    monkeypatch.setattr(memory, "_libc", lambda: libc)
    monkeypatch.setattr(gc, "collect", lambda *args: collections.append(1) or 0)
    assert memory.resident_bytes() > 0  # Linux: read from /proc
    memory.release_memory(above_bytes=memory.resident_bytes() * 4)
    assert libc.trims == []
    memory.release_memory(above_bytes=0)
    assert libc.trims == [0]
    # no full collection at a step boundary: it walked every object the run keeps, for a few thousand found
    assert collections == []


def test_bulk_work_collects_garbage_rarely_and_restores_the_thresholds() -> None:
    from crm_core.collections_policy import BULK_YOUNG_THRESHOLD, rare_collections

    before = gc.get_threshold()
    assert before[0] < BULK_YOUNG_THRESHOLD
    with rare_collections():
        assert gc.get_threshold()[0] == BULK_YOUNG_THRESHOLD
        with rare_collections():  # nested: left as it is
            assert gc.get_threshold()[0] == BULK_YOUNG_THRESHOLD
        assert gc.get_threshold()[0] == BULK_YOUNG_THRESHOLD
    assert gc.get_threshold() == before
    with pytest.raises(ZeroDivisionError), rare_collections():
        1 / 0  # noqa: B018
    assert gc.get_threshold() == before
    gc.disable()
    try:
        with rare_collections():  # a collector someone disabled stays as it was
            assert gc.get_threshold() == before and not gc.isenabled()
    finally:
        gc.enable()


def test_a_load_runs_with_rare_collections_and_gives_the_thresholds_back(tmp_path: object) -> None:
    import pandas as pd
    from sqlalchemy.orm import Session

    from crm_core.db import make_engine, upgrade
    from crm_core.loading import Batch, EntityLoader, MatchRules, get_or_start_run
    from integration.mappings.engine import empty_rejects

    engine = make_engine(f"sqlite:///{tmp_path}/core.sqlite")
    upgrade(engine)
    seen: list[int] = []

    def company_key(name: str) -> str:
        seen.append(gc.get_threshold()[0])  # called while the load decides its rows
        return name

    records = pd.DataFrame({"_external_key": ["C1"], "name": ["腾达"], "name_normalized": ["腾达"],
                            "_row_ref": ["2"], "_location": ["t"]})  # fmt: skip
    before = gc.get_threshold()
    with Session(engine) as session, session.begin():
        run = get_or_start_run(session, "r1", "test")
        batch = Batch("erp", "erp_map", records, empty_rejects(), 1, ["name", "name_normalized"], {})
        EntityLoader(
            session, run, "customer", match=MatchRules(keys=[("name",)]), key_functions={"name": company_key}
        ).load([batch])
    engine.dispose()
    assert gc.get_threshold() == before
    assert seen and all(threshold > before[0] for threshold in seen)


def test_the_memory_a_large_extract_holds_is_estimated_from_a_sample_close_to_the_exact_figure() -> None:
    import numpy as np
    import pandas as pd

    from integration.assets.factories import MEMORY_SAMPLE_ROWS, bytes_in_memory

    rows = MEMORY_SAMPLE_ROWS * 12
    frame = pd.DataFrame({
        "name": [f"深圳市腾达科技有限公司{i}" for i in range(rows)], "amount": np.arange(rows),
        "note": [None if i % 3 else "备注" * (i % 50) for i in range(rows)],  # a pattern evenly spaced rows alias
    })  # fmt: skip
    exact = int(frame.memory_usage(deep=True).sum())
    assert abs(bytes_in_memory(frame) - exact) < 0.03 * exact
    small = frame.iloc[:MEMORY_SAMPLE_ROWS]
    assert bytes_in_memory(small) == int(small.memory_usage(deep=True).sum())
    assert bytes_in_memory(frame.iloc[:0]) == 0
