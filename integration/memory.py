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


# Below this resident size a step does not give memory back: a full garbage collection walks every live object
# (0.3-1 s in a process holding Dagster's definitions), which small runs and test processes pay for nothing.
RELEASE_ABOVE_BYTES = 1 << 30


def resident_bytes() -> int:
    """Return this process's resident set size in bytes (0 where /proc is not available)."""
    try:
        statm = Path("/proc/self/statm").read_text(encoding="ascii")
        return int(statm.split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def release_memory(above_bytes: int = RELEASE_ABOVE_BYTES) -> None:
    """Collect garbage and hand free heap and Arrow pool pages back to the operating system.

    Only once the process holds more than ``above_bytes`` (1 GiB): that is when an engagement's size, not
    the toolkit's, sets the peak.
    """
    if resident_bytes() <= above_bytes:
        return
    gc.collect()
    pa.default_memory_pool().release_unused()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):  # glibc only
        libc.malloc_trim(0)
