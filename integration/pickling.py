"""Pickling step outputs and staged pieces with decimal columns written as text (see :mod:`integration.storage`).

Kept apart from the Dagster IO manager that uses it so that reading and writing pieces (the spill folders,
``crmi run``'s check whether anything changed) does not import Dagster.
"""

from __future__ import annotations

import copyreg
import pickle
from decimal import Decimal
from typing import Any

import numpy as np

MIN_DECIMALS = 1_000  # fewer: the ordinary pickle costs less than the scan
SAMPLE = 64  # values looked at per column (the first ones, and as many evenly spaced) before a whole scan


Column = tuple[Any, ...]
"""One row of an object array (a frame's column): ``(values, None)`` without decimals, ``(values,
positions)`` with each decimal's text at its position, or ``(values, positions, texts, shared)`` when
``Decimal`` objects repeat: the text of each distinct one, and which one is at each position."""


def _object_array(shape: tuple[int, ...], columns: list[Column], order: str = "C") -> np.ndarray:
    """Build an object array back from ``_object_columns``' form (unpickling calls it).

    ``order`` is the array's memory layout (numpy's own pickle keeps a Fortran-ordered array so, and a
    frame built from a 2-D array has its object block in that order).
    """
    array = np.empty(shape, dtype=object, order="F" if order == "F" else "C")
    rows = array.reshape(1, -1) if array.ndim == 1 else array
    for row, (values, positions, *shared) in zip(rows, columns, strict=True):
        # fromiter: assigning a list would make rows of tuples or lists stored in the column
        row[:] = np.fromiter(values, dtype=object, count=len(values))
        if positions is None or not len(positions):
            continue
        if shared:  # one Decimal object per distinct one written, as many references as there were
            texts, which = shared
            distinct = np.fromiter(map(Decimal, texts), dtype=object, count=len(texts))
            row[positions] = distinct[which]
        else:
            texts = row[positions].tolist()
            row[positions] = np.fromiter(map(Decimal, texts), dtype=object, count=len(texts))
    return array


def _sample(row: np.ndarray) -> list[Any]:
    """The first values of a row and evenly spaced ones after them (no position twice)."""
    stride = max(1, len(row) // SAMPLE)
    first: list[Any] = row[:SAMPLE].tolist()
    spaced: list[Any] = row[SAMPLE::stride].tolist()
    return first + spaced


def _column(row: np.ndarray) -> tuple[Column, int]:
    """Return a row holding decimals in ``_object_array``'s form, and how many decimals it holds."""
    positions = np.flatnonzero(np.fromiter(map(type, row.tolist()), dtype=object, count=len(row)) == Decimal)
    found = row[positions]
    small = positions.astype(np.min_scalar_type(len(row)))  # 2 or 4 bytes a position, not 8
    written = row.copy()
    sampled = _sample(found)
    if len(set(map(id, sampled))) == len(sampled):  # distinct objects, as a database driver makes them
        written[positions] = np.fromiter(map(str, found.tolist()), dtype=object, count=len(found))
        return (written.tolist(), small), len(found)
    # Decimal objects repeat (a merge, a fillna, a constant): each distinct one is written and built once.
    ids = np.fromiter(map(id, found.tolist()), dtype=np.uintp, count=len(found))
    _ids, first, which = np.unique(ids, return_index=True, return_inverse=True)
    written[positions] = None
    texts = list(map(str, found[first].tolist()))
    return (written.tolist(), small, texts, which.astype(np.min_scalar_type(len(texts)))), len(found)


def _object_columns(array: np.ndarray) -> list[Column] | None:
    """Return an object array as columns whose decimals are text, or None when it holds few decimals.

    A pandas frame keeps its object columns in one 2-D block, a column per row of the block: few rows,
    long ones. An array of many short rows (records, ``frame.to_numpy()``) is left to the ordinary pickle,
    as is one whose sampled values hold no decimal (no list of its values is made for it).
    """
    rows = array.reshape(1, -1) if array.ndim == 1 else array
    if rows.shape[0] > rows.shape[1]:
        return None
    sampled = [Decimal in set(map(type, _sample(row))) for row in rows]
    if not any(sampled):
        return None
    columns: list[Column] = []
    decimals = 0
    for row, has_decimals in zip(rows, sampled, strict=True):
        if has_decimals:
            column, count = _column(row)
            columns.append(column)
            decimals += count
        else:
            columns.append((row.tolist(), None))
    return columns if decimals >= MIN_DECIMALS else None


class _OutputPickler(pickle.Pickler):
    """A pickler that writes decimal columns of object arrays as text (see the module doc).

    Only numpy arrays reach Python code: a ``dispatch_table`` entry for ``np.ndarray``, not a
    ``reducer_override`` (which pickle would call for every object that is not a str, number, tuple,
    list, dict or set, every date and every ``Decimal`` of a column left as it is).
    """

    def __init__(self, file: Any, protocol: int) -> None:
        super().__init__(file, protocol)
        self._protocol = protocol
        self.dispatch_table = copyreg.dispatch_table.copy()
        self.dispatch_table[np.ndarray] = self._reduce_array

    def _reduce_array(self, obj: np.ndarray) -> Any:
        """Reduce a large object array holding decimals to ``_object_array``, any other as numpy does."""
        if obj.dtype == object and obj.ndim in (1, 2) and obj.size >= MIN_DECIMALS:
            columns = _object_columns(obj)
            if columns is not None:
                order = "F" if obj.flags.f_contiguous and not obj.flags.c_contiguous else "C"
                return _object_array, (obj.shape, columns, order)
        return obj.__reduce_ex__(self._protocol)


def dump_output(value: Any, file: Any) -> None:
    """Pickle ``value`` into an open binary file the way ``StepOutputFiles`` does."""
    _OutputPickler(file, pickle.HIGHEST_PROTOCOL).dump(value)
