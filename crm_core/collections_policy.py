"""Rare garbage collections while bulk work allocates millions of objects.

CPython's cyclic garbage collector starts a young collection every 700 net allocations and, once the heap has
grown by a quarter, a full one that walks every tracked object in the process. A load, a linkage or a merge
at size allocates millions of rows and index entries that stay alive until the step ends, so the collector
keeps walking a growing heap for nothing: measured on the loader at 100,000 customers (bench_load's frames,
one core), 17-21% of the load's CPU time went to collections (1.4-2.3 s per entity, most of it in five to
eight full collections); with a young threshold of 50,000 it was 0.2-0.4 s. Reference cycles are still
collected, only in larger batches, so memory does not grow by more than a few young generations.

A command's start-up is the other case: importing Dagster, pandas and SQLAlchemy and building the definitions
leaves some 330,000 objects that live until the process ends, and CPython walked them in every full collection
of the run and once more at exit (a re-run of ``crmi run`` with nothing changed, 100,000 source rows: 0.9 s in
collections during the run and 0.7 s at exit, of 6 s CPU). :func:`frozen_start_up` builds them without
collections and then moves them to the permanent generation, which no collection walks.
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


@contextmanager
def collections_paused() -> Iterator[None]:
    """Run the block with the cyclic garbage collector paused: for building many objects that all survive.

    Collections triggered while such tables grow free nothing, and each full one walks the whole heap again
    (the name resolver's tables at 1M: a tenth of its CPU). Only for objects without reference cycles; a
    collector already paused (a block within a block) stays paused, and collection resumes after the block.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@contextmanager
def frozen_start_up() -> Iterator[None]:
    """Run a command's start-up (imports, definitions) without collections, then freeze what it left alive.

    Frozen objects are never collected: only for what lives until the process ends anyway, not for bulk work.
    The reference cycles start-up left behind stay too (crmi run: some 17,000 of 450,000 objects); collecting
    them first would cost the full collection this avoids (0.8 s). A block that raises freezes nothing; a
    collector that was disabled stays as it was.
    """
    if not gc.isenabled():
        yield
        return
    with collections_paused():
        yield
        gc.freeze()  # not reached when the block raises
