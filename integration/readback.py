"""Reading back what a load committed, for its check (``pipeline.verify_batch``), in arrays, not Python sets.

At 1,000,000 source rows the check read the crosswalk by key in ``IN`` lists of ``IN_CHUNK`` keys and
compared sets of ``(location, row)`` tuples: most of its 13 s. :class:`CrosswalkRead` reads one system's
entries at once (or by key, when the batch is small beside what the system holds) into an index, and
:func:`unaccounted` compares rows as integer codes; what they find is what the sets found.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import Connection, func, select

from crm_core.collections_policy import collections_paused
from crm_core.journal import ids_in
from crm_core.loading import IN_CHUNK
from crm_core.models import ExternalId

# A batch reads its system's whole crosswalk once when the system holds at most this many entries per
# record of the batch; else (a delta against a large core) it reads its own keys, piece by piece. Read by
# key, an entry costs about twice what it costs in one scan (SQLite, 363,172 order lines: 1.1 s and 0.55 s).
WHOLE_CROSSWALK_PER_RECORD = 2


@dataclass(frozen=True)
class CrosswalkRead:
    """Crosswalk entries of one entity and system as read back from the core: key, record id, whether the
    source row created its record (the only use of the match method: a bool, not a string per entry), and the
    fix mapping that last wrote it (``corrected_by``, None: the source's own mapping)."""

    keys: pd.Index
    entity_ids: np.ndarray
    created: np.ndarray
    corrected_by: np.ndarray

    @classmethod
    def read(
        cls, connection: Connection, entity: str, system: str, keys: Sequence[str] | None = None
    ) -> CrosswalkRead:
        """Read the entries of ``keys`` (None: every entry of the system)."""
        xw = ExternalId.__table__.c
        query = select(xw.external_key, xw.entity_id, xw.match_method, xw.corrected_by).where(
            xw.entity == entity, xw.system == system
        )
        with collections_paused():  # hundreds of thousands of rows, no cycles among them
            if keys is None:
                rows: list[Any] = list(connection.execute(query).all())
            else:
                rows = []
                for start in range(0, len(keys), IN_CHUNK):
                    chunk = keys[start : start + IN_CHUNK]
                    rows.extend(
                        connection.execute(query.where(ids_in(connection, xw.external_key, chunk))).all()
                    )
            found, entity_ids, methods, fixes = zip(*rows, strict=True) if rows else ((), (), (), ())
            index = pd.Index(np.array(found, dtype=object), dtype=object)
            ids = np.fromiter(entity_ids, dtype=np.int64, count=len(entity_ids))
            created = np.fromiter((m == "created" for m in methods), dtype=bool, count=len(methods))
            corrected_by = np.empty(len(fixes), dtype=object)
            corrected_by[:] = fixes
            # Freed here, by reference counting: a collection after the pause would walk every row first.
            del rows, found, entity_ids, methods, fixes
        if not index.is_unique:  # the unique constraint rules it out; a dict kept the last one
            keep = ~index.duplicated(keep="last")
            index, ids, created, corrected_by = index[keep], ids[keep], created[keep], corrected_by[keep]
        return cls(index, ids, created, corrected_by)

    @classmethod
    def for_batch(
        cls, connection: Connection, entity: str, system: str, records: int
    ) -> CrosswalkRead | None:
        """Read the whole crosswalk of a system for a batch of ``records``; None when it is too large beside the
        batch (then each piece reads its own keys)."""
        xw = ExternalId.__table__.c
        held = connection.scalar(select(func.count()).where(xw.entity == entity, xw.system == system)) or 0
        if held > WHOLE_CROSSWALK_PER_RECORD * records:
            return None
        return cls.read(connection, entity, system)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Return each key's position among the entries, -1 for a key the crosswalk does not hold."""
        if not len(self.keys):
            return np.full(len(keys), -1, dtype=np.intp)
        return np.asarray(self.keys.get_indexer(pd.Index(keys, dtype=object)))


def unaccounted(
    read: tuple[np.ndarray, np.ndarray], accounted: Sequence[tuple[np.ndarray, np.ndarray]]
) -> tuple[int, list[tuple[str, str]]]:
    """Return how many distinct (location, row) pairs ``read`` holds, and those of them no pair of
    ``accounted`` matches, sorted. Pairs are given as two arrays of text (locations, rows)."""
    if not len(read[0]):
        return 0, []
    locations = np.concatenate([read[0], *(a[0] for a in accounted)]).astype(object, copy=False)
    refs = np.concatenate([read[1], *(a[1] for a in accounted)]).astype(object, copy=False)
    if not (_c_strings(locations) and _c_strings(refs)):  # a source key holding a NUL
        return _unaccounted_pairs(read, accounted)
    # Text only, so factorize codes every value (no NA sentinel) and equal codes are equal texts.
    location_codes, location_values = pd.factorize(locations)
    ref_codes, ref_values = pd.factorize(refs)
    pairs = location_codes.astype(np.int64) * len(ref_values) + ref_codes
    count = len(read[0])
    distinct = np.unique(pairs[:count])
    gone = distinct[~np.isin(distinct, pairs[count:])]
    missing = sorted(
        zip(
            location_values[gone // len(ref_values)].tolist(),
            ref_values[gone % len(ref_values)].tolist(),
            strict=True,
        )
    )
    return len(distinct), missing


def _c_strings(values: np.ndarray) -> bool:
    """Whether pandas tells these texts apart when it codes them: it hashes an array of text as C strings,
    so two texts equal up to a NUL would get one code."""
    return "\x00" not in "".join(values.tolist())


def _unaccounted_pairs(
    read: tuple[np.ndarray, np.ndarray], accounted: Sequence[tuple[np.ndarray, np.ndarray]]
) -> tuple[int, list[tuple[str, str]]]:
    """:func:`unaccounted` with sets of (location, row) pairs, for texts holding a NUL."""
    distinct = set(zip(read[0].tolist(), read[1].tolist(), strict=True))
    left = distinct.difference(*(zip(a[0].tolist(), a[1].tolist(), strict=True) for a in accounted))
    return len(distinct), sorted(left)


def texts(values: pd.Series | Sequence[Any]) -> np.ndarray:
    """Return ``str`` of each value as an object array (what ``str(value)`` gives, value by value)."""
    if isinstance(values, pd.Series) and values.dtype == object:
        array = values.to_numpy()
        if pd.api.types.infer_dtype(array, skipna=False) == "string":  # all str already: str(v) is v
            return array
    return np.fromiter(map(str, values), dtype=object, count=len(values))
