"""Step outputs between Dagster steps: decimal columns pickled as text come back exactly as they were."""

from __future__ import annotations

import datetime
import io
import pickle
from decimal import Decimal
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd

from integration.storage import MIN_DECIMALS, StepOutputFiles, dump_output

ROWS = 3 * MIN_DECIMALS


def _same_cells(left: pd.DataFrame, right: pd.DataFrame) -> None:
    """Every cell of the same type and the same repr (Decimal('1.0') and Decimal('1.00') differ)."""
    assert list(left.columns) == list(right.columns)
    assert list(left.dtypes) == list(right.dtypes)
    for name in left.columns:
        for before, after in zip(left[name].tolist(), right[name].tolist(), strict=True):
            assert type(before) is type(after), (name, before, after)
            assert repr(before) == repr(after), (name, before, after)


def _round_trip(value: object) -> object:
    buffer = io.BytesIO()
    dump_output(value, buffer)
    return pickle.loads(buffer.getvalue())  # a plain pickle.load reads what StepOutputFiles writes


def _ledger() -> pd.DataFrame:
    """An ERP-like extract: money as Decimal objects beside text, in one object block, with odd values."""
    odd = [Decimal("-0"), Decimal("1E+3"), Decimal("12.500"), Decimal("NaN"), Decimal("-Infinity"),
           Decimal("0.000001"), None, np.nan, pd.NA, "12.5万", 7]  # fmt: skip
    amounts = [Decimal(i) / Decimal(100) for i in range(ROWS - len(odd))] + odd
    return pd.DataFrame({
        "cSOCode": [f"SO{i:06d}" for i in range(ROWS)],
        "iMoney": amounts,
        "iTaxRate": [Decimal("0.13")] * ROWS,
        "cMemo": [("tuple", i) if i % 7 == 0 else None for i in range(ROWS)],
        "iRowNo": np.arange(ROWS),
    })  # fmt: skip


def test_a_frame_of_decimals_comes_back_cell_for_cell() -> None:
    frame = _ledger()
    frame.attrs["fingerprint"] = "abc"
    back = _round_trip(frame)
    assert isinstance(back, pd.DataFrame)
    _same_cells(frame, back)
    assert back.attrs == {"fingerprint": "abc"}


def test_decimals_are_written_as_text_not_one_reduction_each() -> None:
    frame = _ledger()
    buffer = io.BytesIO()
    dump_output(frame, buffer)
    assert b"_object_array" in buffer.getvalue()
    assert b"_object_array" not in pickle.dumps(frame, pickle.HIGHEST_PROTOCOL)


def test_decimals_found_late_in_a_column_and_in_a_series_and_in_nested_objects() -> None:
    late = pd.Series([None] * ROWS + [Decimal("1.10")] * ROWS, dtype=object)
    nested = {"batches": [late, _ledger()], "few": pd.Series([Decimal("2.5")] * 10, dtype=object)}
    back = _round_trip(nested)
    assert isinstance(back, dict)
    assert back["batches"][0].tolist() == late.tolist()
    assert [repr(v) for v in back["batches"][0].tolist()] == [repr(v) for v in late.tolist()]
    _same_cells(nested["batches"][1], back["batches"][1])
    assert back["few"].tolist() == [Decimal("2.5")] * 10


def test_arrays_without_decimals_pickle_as_before() -> None:
    text = pd.DataFrame({"name": [f"客户{i}" for i in range(ROWS)]})
    buffer = io.BytesIO()
    dump_output(text, buffer)
    assert buffer.getvalue() == pickle.dumps(text, pickle.HIGHEST_PROTOCOL)


def test_a_dagster_run_hands_decimal_frames_from_step_to_step(tmp_path: Path) -> None:
    @dg.asset
    def ledger() -> pd.DataFrame:
        return _ledger()

    @dg.asset
    def total(ledger: pd.DataFrame) -> Decimal:
        money = [v for v in ledger["iMoney"] if isinstance(v, Decimal) and v.is_finite()]
        return sum(money, Decimal(0))

    result = dg.materialize(
        [ledger, total], resources={"io_manager": StepOutputFiles(base_dir=str(tmp_path))}
    )
    assert result.success
    expected = sum((v for v in _ledger()["iMoney"] if isinstance(v, Decimal) and v.is_finite()), Decimal(0))
    assert result.output_for_node("total") == expected
    with (tmp_path / "ledger").open("rb") as file:
        _same_cells(_ledger(), pickle.load(file))


def _python_calls_in_storage(value: object) -> int:
    """How many calls of the step-output pickler's Python code pickling ``value`` makes."""
    import sys

    import integration.pickling as storage

    calls = 0

    def count(frame: Any, event: str, _arg: object) -> None:
        nonlocal calls
        if event == "call" and frame.f_code.co_filename == storage.__file__:
            calls += 1

    sys.setprofile(count)
    try:
        dump_output(value, io.BytesIO())
    finally:
        sys.setprofile(None)
    return calls


def test_outputs_without_decimals_cost_no_python_call_per_value() -> None:
    """Dates, timestamps and records pickle at C speed: no Python call per object or per record."""
    dates = pd.DataFrame(
        {"dDate": [datetime.date(2024, 1, 1) + datetime.timedelta(days=i) for i in range(ROWS)]}
    )
    records = np.array([[f"SO{i:06d}", i] for i in range(ROWS)], dtype=object)  # frame.to_numpy(): short rows
    assert _python_calls_in_storage(dates) < 20
    assert _python_calls_in_storage(records) < 20
    assert _round_trip(records).tolist() == records.tolist()  # type: ignore[attr-defined]


def test_a_fortran_ordered_object_block_comes_back_fortran_ordered() -> None:
    """numpy's pickle keeps an F-ordered array so; a frame built from a 2-D array has such a block."""
    cells = np.array([[Decimal(i) / 100, f"SO{i:06d}"] for i in range(ROWS)], dtype=object)
    frame = pd.DataFrame(cells, columns=["iMoney", "cSOCode"])
    assert frame._mgr.blocks[0].values.flags.f_contiguous  # type: ignore[attr-defined]
    back = _round_trip(frame)
    assert isinstance(back, pd.DataFrame)
    _same_cells(frame, back)
    assert back._mgr.blocks[0].values.flags.f_contiguous  # type: ignore[attr-defined]
    raw = _round_trip(np.asfortranarray(cells))
    assert isinstance(raw, np.ndarray)
    assert raw.flags.f_contiguous
    assert raw.tolist() == cells.tolist()


def test_a_decimal_object_repeated_in_a_column_is_written_once_and_comes_back_once() -> None:
    """``[rate] * n``, a merge, a fillna: one Decimal object stays one (memory) and is written once (size)."""
    rate, other = Decimal("0.13"), Decimal("0.090")
    merged = pd.Series([rate, rate, other] * ROWS + [Decimal(i) for i in range(ROWS)] + [None], dtype=object)
    back = _round_trip(merged)
    assert isinstance(back, pd.Series)
    assert [repr(v) for v in back.tolist()] == [repr(v) for v in merged.tolist()]
    assert back[0] is back[1] is back[3 * ROWS - 2]
    assert back[2] is back[5]
    assert len({id(value) for value in back.tolist()}) == 2 + ROWS + 1
    constant = pd.Series([rate] * ROWS, dtype=object)
    buffer = io.BytesIO()
    dump_output(constant, buffer)
    assert len(buffer.getvalue()) <= 2 * len(pickle.dumps(constant, pickle.HIGHEST_PROTOCOL))


def test_a_partition_key_with_dotdot_stays_under_the_base_folder(tmp_path: Path) -> None:
    """Like FilesystemIOManager: a partition key is a literal sub-path, never a way up."""
    base = tmp_path / "storage"

    @dg.asset(partitions_def=dg.StaticPartitionsDefinition(["../../outside"]))
    def ledger() -> pd.DataFrame:
        return _ledger()

    result = dg.materialize(
        [ledger], partition_key="../../outside", resources={"io_manager": StepOutputFiles(base_dir=str(base))}
    )
    assert result.success
    assert not (tmp_path / "outside").exists()
    written = [path for path in base.rglob("*") if path.is_file()]
    assert len(written) == 1
    with written[0].open("rb") as file:
        _same_cells(_ledger(), pickle.load(file))
