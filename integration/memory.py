"""Giving freed memory back between pipeline steps.

A step's frames are garbage once Dagster has stored its output, but CPython's allocator, glibc's malloc
and Arrow's memory pool keep the pages for reuse, so the process grows by every source it has read and
peak memory follows the size of the engagement instead of its largest step. Between steps nothing is
live, so returning the pages is cheap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import cache
from pathlib import Path
from typing import Any

import pyarrow as pa


@cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


# Below this resident size a step does not give memory back: small runs and test processes have nothing to gain.
RELEASE_ABOVE_BYTES = 1 << 30


def resident_bytes() -> int:
    """Return this process's resident set size in bytes (0 where /proc is not available)."""
    try:
        statm = Path("/proc/self/statm").read_text(encoding="ascii")
        return int(statm.split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def release_memory(above_bytes: int = RELEASE_ABOVE_BYTES) -> None:
    """Hand free heap and Arrow pool pages back to the operating system.

    Only once the process holds more than ``above_bytes`` (1 GiB): that is when an engagement's size, not
    the toolkit's, sets the peak.
    """
    if resident_bytes() <= above_bytes:
        return
    # No full garbage collection here: it walked the 1.7 million objects that live for the whole run (Dagster's
    # definitions, the caches of name forms and pinyin) at every step boundary, 1.4-1.6 s each and 12.7 s of a
    # 1M-row run, and found a few thousand objects; the collections during the steps still find the cycles.
    # Measured at 1M rows: peak RSS 2,987 MB without it, 2,869-2,881 MB with it (docs/performance.md).
    pa.default_memory_pool().release_unused()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):  # glibc only
        libc.malloc_trim(0)
