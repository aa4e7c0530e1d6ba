"""Arrow text columns: the vectorized path of the mapping engine.

Text columns travel through a field's transforms as Arrow string arrays (pandas ``string[pyarrow]``
Series), so the common cases run in Arrow compute kernels, which release the GIL and never create a
Python object per row. A transform settles what its kernels can and hands only the remaining *distinct*
values to its Python parser, so exact behaviour (and every error message) stays with one implementation
for the hard cases while the row count never reaches Python for the easy ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

# Every character Python's str.isspace() accepts (``\s`` of the ``re`` module), written for RE2.
WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680"
    + "".join(map(chr, range(0x2000, 0x200B)))
    + ("\u2028\u2029\u202f\u205f\u3000")
)
INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff\u00ad"


def re2_class(characters: str) -> str:
    """Return an RE2 character class matching exactly ``characters``."""
    return "[" + "".join(f"\\x{{{ord(c):x}}}" for c in characters) + "]"


_WS_CLASS = re2_class(WHITESPACE)
# Characters NFKC leaves alone and whose case mapping is the same in Arrow (utf8proc) and Python:
# ASCII, CJK ideographs and the common CJK punctuation. Values made only of these take the kernel path.
CJK_SIMPLE = "\\x{3001}\\x{3002}\\x{300a}-\\x{3011}\\x{3400}-\\x{4dbf}\\x{4e00}-\\x{9fff}"
_SIMPLE = f"^[\\x{{0}}-\\x{{7f}}{CJK_SIMPLE}]*$"
# Tidy: simple characters, printable, single spaces between words and none at the ends. A tidy value is
# unchanged by NFKC and by clean_text, so one scan tells every text transform which values need work.
_WORD = f"[\\x{{21}}-\\x{{7e}}{CJK_SIMPLE}]+"
_TIDY = f"^(?:{_WORD}(?: {_WORD})*)?$"


def text_array(values: pd.Series) -> pa.Array | pa.ChunkedArray | None:
    """Return ``values`` as an Arrow string array, or None when they are not all text (numbers, dates…)."""
    if isinstance(values.dtype, pd.ArrowDtype):
        return pa.array(values.array) if pa.types.is_string(values.dtype.pyarrow_dtype) else None
    if values.dtype != object:
        return None
    try:  # from the numpy array: skips pandas' per-value NaN checks (NaN still becomes null)
        return pa.array(values.to_numpy(), type=pa.string(), from_pandas=True)
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        return None


def arrow_series(array: pa.Array | pa.ChunkedArray, index: pd.Index) -> pd.Series:
    """Wrap an Arrow array (text, decimals…) as a pandas Series without copying."""
    return pd.Series(pd.arrays.ArrowExtensionArray(array), index=index, copy=False)


def is_arrow(values: pd.Series) -> bool:
    """Return True when ``values`` is Arrow-backed."""
    return isinstance(values.dtype, pd.ArrowDtype)


def is_text(values: pd.Series) -> bool:
    """Return True when ``values`` is an Arrow-backed text Series (the kernel path)."""
    return isinstance(values.dtype, pd.ArrowDtype) and pa.types.is_string(values.dtype.pyarrow_dtype)


def flags(mask: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Return a boolean mask with nulls counted as False."""
    return pc.fill_null(mask, False)


def combined(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Return ``array`` as one contiguous Arrow array."""
    return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array


def scatter(
    array: pa.Array | pa.ChunkedArray,
    where: pa.Array | pa.ChunkedArray,
    replacements: pa.Array | pa.ChunkedArray,
) -> pa.Array:
    """Return ``array`` with the rows in ``where`` replaced, in order, by ``replacements``."""
    return pc.replace_with_mask(combined(array), combined(where), combined(replacements))


def patch(
    array: pa.Array | pa.ChunkedArray,
    where: pa.Array | pa.ChunkedArray,
    func: Callable[[pa.Array], pa.Array],
) -> pa.Array | pa.ChunkedArray:
    """Apply ``func`` only to the rows in ``where`` (a null-free boolean mask); the rest keep their values."""
    selected = pc.sum(where).as_py() or 0
    if selected == 0:
        return array
    if selected == len(array):
        return func(array)
    return scatter(array, where, func(pc.filter(array, where)))


_SCOPE: ContextVar[dict[tuple[Any, ...], tuple[object, Any]] | None] = ContextVar(
    "mapping_scope", default=None
)


@contextmanager
def chunk_scope() -> Iterator[None]:
    """Let transforms share work done on the same input while one chunk is mapped (see ``memo``)."""
    token = _SCOPE.set({})
    try:
        yield
    finally:
        _SCOPE.reset(token)


def memo(name: str, values: object, compute: Callable[[], Any]) -> Any:
    """Return ``compute()``, computed once per chunk for the same ``values`` object (e.g. three address parts)."""
    cache = _SCOPE.get()
    if cache is None:
        return compute()
    key = (name, id(values))
    found = cache.get(key)
    if found is not None and found[0] is values:
        return found[1]
    result = compute()
    cache[key] = (values, result)  # holding ``values`` keeps its id from being reused within the chunk
    return result


def _full_clean(array: pa.Array) -> pa.Array:
    array = pc.replace_substring_regex(array, re2_class(INVISIBLE), "")
    array = pc.replace_substring_regex(array, _WS_CLASS + "+", " ")
    return pc.utf8_trim(array, " ")


def _nfkc_clean(array: pa.Array) -> pa.Array:
    return _full_clean(pc.utf8_normalize(array, "NFKC"))


def _identity(array: pa.Array | pa.ChunkedArray) -> tuple[Any, ...] | None:
    """The buffers an array's values live in: equal for every view of the same data."""
    if isinstance(array, pa.ChunkedArray):
        if array.num_chunks != 1:
            return None
        array = array.chunk(0)
    return ("tidy", *(b.address if b is not None else 0 for b in array.buffers()), array.offset, len(array))


def _known_tidy(array: pa.Array | pa.ChunkedArray) -> pa.Array | None:
    cache, key = _SCOPE.get(), _identity(array)
    found = cache.get(key) if cache is not None and key is not None else None
    return found[1] if found is not None else None


def _remember_tidy(array: pa.Array | pa.ChunkedArray, mask: pa.Array) -> None:
    cache, key = _SCOPE.get(), _identity(array)
    if cache is not None and key is not None:
        cache[key] = (array, mask)  # holding the array keeps its buffers (the key) from being reused


def tidy_mask(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    """True where a value is tidy (see _TIDY); scanned once per array while a chunk is mapped."""
    known = _known_tidy(array)
    if known is not None:
        return known
    mask = combined(flags(pc.match_substring_regex(array, _TIDY)))
    _remember_tidy(array, mask)
    return mask


def _all(mask: pa.Array) -> bool:
    return bool(pc.all(mask).as_py()) if len(mask) else True


def _tidy_up(
    array: pa.Array | pa.ChunkedArray, func: Callable[[pa.Array], pa.Array]
) -> pa.Array | pa.ChunkedArray:
    """Apply ``func`` to the untidy values only; remember which values of the result are known tidy."""
    known = _known_tidy(array)
    if known is None:
        array = pc.utf8_trim(array, WHITESPACE)  # trailing spaces from spreadsheets: cheap to drop first
        known = tidy_mask(array)
    if _all(known):
        return array
    result = patch(array, pc.invert(known), func)
    _remember_tidy(result, known)
    return result


def clean_text_array(array: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Vectorized ``clean_text``: drop zero-width characters, collapse any whitespace to one space, trim."""
    return _tidy_up(array, _full_clean)


def nfkc_clean_array(array: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """NFKC then ``clean_text``, computed only for the values that are not tidy already."""
    return _tidy_up(array, _nfkc_clean)


def simple_mask(array: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """True where a value holds only characters NFKC keeps and Arrow cases like Python (ASCII, CJK)."""
    tidy = tidy_mask(array)
    return tidy if _all(tidy) else pc.or_(tidy, flags(pc.match_substring_regex(array, _SIMPLE)))


def nfkc_array(array: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Unicode NFKC, computed only for the values that can change."""
    simple = simple_mask(array)
    if _all(simple):
        return array
    result = patch(array, pc.invert(simple), lambda a: pc.utf8_normalize(a, "NFKC"))
    _remember_tidy(result, tidy_mask(array))
    return result


def keep_tidy(result: pa.Array | pa.ChunkedArray, source: pa.Array | pa.ChunkedArray) -> None:
    """Note that ``result`` is tidy where ``source`` was, e.g. after ASCII case mapping or nulling empties."""
    known = _known_tidy(source)
    if known is not None:
        _remember_tidy(result, known)


def empty_to_null(array: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Turn empty strings into nulls (the same array when there are none)."""
    empty = flags(pc.equal(array, ""))
    if not pc.any(empty).as_py():
        return array
    result = pc.if_else(empty, pa.scalar(None, pa.string()), array)
    keep_tidy(result, array)
    return result


def null_where_array(array: pa.Array | pa.ChunkedArray, mask: pa.Array | pa.ChunkedArray) -> Any:
    """Return ``array`` with nulls where ``mask`` is true."""
    return pc.if_else(mask, pa.scalar(None, array.type), array)


def object_array(items: list[Any]) -> np.ndarray:
    """Return ``items`` as an object array with one extra None at the end (the slot for null rows)."""
    out = np.empty(len(items) + 1, dtype=object)
    for position, item in enumerate(items):  # element-wise: numpy would unpack tuple or list results
        out[position] = item
    return out


@dataclass
class Distinct:
    """``func`` applied to the distinct values of an array: results, errors by position, row positions."""

    results: list[Any]
    errors: dict[int, str]
    indices: pa.Array

    def reasons(self, index: pd.Index) -> pd.Series | None:
        """Return the per-row error reasons (None when every value worked)."""
        if not self.errors:
            return None
        reasons = pa.array([self.errors.get(i) for i in range(len(self.results))], pa.string())
        return pd.Series(
            pc.take(reasons, self.indices).to_numpy(zero_copy_only=False), index=index, dtype=object
        )


def apply_distinct(
    array: pa.Array | pa.ChunkedArray, func: Callable[[str], Any], failure: type[Exception]
) -> Distinct:
    """Apply ``func`` once per distinct text value; ``failure`` exceptions become that value's error."""
    encoded = pc.dictionary_encode(combined(array))
    results: list[Any] = []
    errors: dict[int, str] = {}
    for position, value in enumerate(encoded.dictionary.to_pylist()):
        try:
            results.append(func(value))
        except failure as exc:
            results.append(None)
            errors[position] = str(exc)
    return Distinct(results, errors, encoded.indices)


def map_distinct(
    array: pa.Array | pa.ChunkedArray, index: pd.Index, func: Callable[[str], Any], failure: type[Exception]
) -> tuple[pd.Series, pd.Series | None]:
    """Apply ``func`` once per distinct text value; ``failure`` exceptions become that value's error.

    The array is dictionary-encoded in Arrow, ``func`` runs over the dictionary only, and the results are
    taken back by index: text results stay in Arrow, other results become an object Series.
    """
    found = apply_distinct(array, func, failure)
    values: pd.Series
    if all(r is None or isinstance(r, str) for r in found.results):
        values = arrow_series(pc.take(pa.array(found.results, pa.string()), found.indices), index)
    else:
        positions = pc.fill_null(found.indices, len(found.results)).to_numpy(zero_copy_only=False)
        values = pd.Series(object_array(found.results)[positions], index=index, dtype=object)
    return values, found.reasons(index)


def settle(
    array: pa.Array | pa.ChunkedArray,
    index: pd.Index,
    done: pa.Array | pa.ChunkedArray,
    settled: pa.Array | pa.ChunkedArray,
    func: Callable[[str], str | None],
    failure: type[Exception],
) -> tuple[pd.Series, pd.Series | None]:
    """Take the kernel result ``settled`` where ``done``; run ``func`` per distinct value on the rest."""
    rest = null_where_array(array, done)
    if pc.all(pc.is_null(rest)).as_py():
        return arrow_series(settled, index), None
    slow, errors = map_distinct(rest, index, func, failure)
    if not is_text(slow):
        raise AssertionError("settle() needs a text-valued fallback")
    return arrow_series(pc.if_else(done, settled, pa.array(slow.array)), index), errors
