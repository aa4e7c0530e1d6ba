"""Rare garbage collections while bulk work allocates millions of objects.

CPython's cyclic garbage collector starts a young collection every 700 net allocations and, once the heap has
grown by a quarter, a full one that walks every tracked object in the process. A load, a linkage or a merge
at size allocates millions of rows and index entries that stay alive until the step ends, so the collector
keeps walking a growing heap for nothing: measured on the loader at 100,000 customers (bench_load's frames,
one core), 17-21% of the load's CPU time went to collections (1.4-2.3 s per entity, most of it in five to
eight full collections); with a young threshold of 50,000 it was 0.2-0.4 s. Reference cycles are still
collected, only in larger batches, so memory does not grow by more than a few young generations.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

BULK_YOUNG_THRESHOLD = 50_000  # net allocations between two young collections during bulk work
BULK_OLDER_THRESHOLD = 20  # young collections between two middle-aged ones (full ones follow CPython's rule)


@contextmanager
def rare_collections() -> Iterator[None]:
    """Run the block with rare garbage collections; the thresholds in force before come back after it.

    Nested blocks and a collector that was disabled are left as they are.
    """
    before = gc.get_threshold()
    if before[0] >= BULK_YOUNG_THRESHOLD or not gc.isenabled():
        yield
        return
    gc.set_threshold(BULK_YOUNG_THRESHOLD, max(before[1], BULK_OLDER_THRESHOLD), before[2])
    try:
        yield
    finally:
        gc.set_threshold(*before)
