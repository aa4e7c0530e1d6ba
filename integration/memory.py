"""Giving freed memory back between pipeline steps.

A step's frames are garbage once Dagster has stored its output, but CPython's allocator, glibc's malloc
and Arrow's memory pool keep the pages for reuse, so the process grows by every source it has read and
peak memory follows the size of the engagement instead of its largest step. Between steps nothing is
live, so returning the pages is cheap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import cache
from typing import Any

import pyarrow as pa


@cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def release_memory() -> None:
    """Collect garbage and hand free heap and Arrow pool pages back to the operating system."""
    gc.collect()
    pa.default_memory_pool().release_unused()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):  # glibc only
        libc.malloc_trim(0)
