"""Resolving the customer a source row names (the workbook's 商机 sheet: 客户名称) against the golden customers.

The loader first looks the name up exactly (normalized name of every customer record, merged ones included,
each leading to its survivor) and then a steward's earlier decision on the same name. What is left comes
here, and is tried:

1. against every **name variant** known for a golden customer — the names of all records merged into it,
   their short names (简称) and English names — compared as region, trade name (in toneless pinyin, so
   English pinyin names, traditional characters and 科技/技术-style industry synonyms compare) and branch.
   A name without a region matches in any region; a short name matches the full name it begins. One
   golden customer found: resolved. Several: the one written with the same characters (industry synonyms
   unified) if it is the only one, else the only one with the same sound (明汇 for 明汇软件 beside 明辉科技,
   which shares only the sound); a name matched only as the start of another, or across scripts, never
   picks among several. Otherwise a steward chooses.
2. through the **match index** (:mod:`integration.dedup.online`, the same scoring as the 商机报备 check)
   with a score: resolved when the best candidate is at least the linkage's auto-merge probability and no
   other reaches its review threshold; otherwise the candidates go to a steward.
3. by **name alone** for a Chinese name with a slip (a homophone or look-alike character, a dropped or
   swapped one, an industry synonym, a missing region): the closest known names (by toneless pinyin) are
   scored with the linkage's Chinese-aware trade-name similarity (:func:`~integration.dedup.linkage.
   variant_similarity`); a name in another or no region, when one is written, or another branch does not count. Resolved when the best golden
   customer scores at least ``CLOSE_NAME`` and every other one at least ``CLOSE_NAME_MARGIN`` less, so a
   common trade name (many customers alike) or a name like two customers stays with a steward.

A name still unresolved waits as a *reference decision* (``reference_decisions``); its rows are held, not
rejected, and load on the next run once a steward has linked the name (``crmi dedup decide``).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import gc
import multiprocessing
import os
import signal
import sys
import weakref
import zlib
from collections import defaultdict
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import cached_property, lru_cache, wraps
from itertools import chain
from typing import Any, ParamSpec, TypeVar

import numpy as np
from rapidfuzz import distance, process
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from crm_core.collections_policy import collections_paused
from crm_core.db import session_factory
from crm_core.edits import share_edit_fence
from crm_core.entities import ENTITIES
from crm_core.errors import DedupError
from crm_core.journal import row_key
from crm_core.loading import NameMatch, get_or_start_run
from crm_core.models import Base, Customer, LoadRun, ReferenceDecision, RowChange
from integration.dedup.customers import CUSTOMER_SPEC, linkage_rows
from integration.dedup.linkage import GAP, SOUND_OR_SHAPE, LinkageSpec, variant_similarity
from integration.dedup.normalize import (
    alike_tokens,
    brand_key,
    canonical_industry,
    has_han,
    name_sound,
    normalize_company_name,
    toneless_pinyin,
    trade_name,
)
from integration.dedup.online import NameIndex, query_record
from integration.steward.audit import record_event

# Industry words written two ways for one trade (in pinyin, as the name cores compare).
INDUSTRY_SYNONYMS = {"jishu": "keji", "shangmao": "maoyi"}
CANDIDATES_SHOWN = 5
CLOSE_NAME = 0.9  # name-only similarity a slip keeps (华鑫科技/骅鑫科技 0.92, 纪鼎科技/纪鼎技 0.9)
CLOSE_NAME_NO_REGION = 0.92  # without a region a two-character trade name's slip (0.917) is too weak
CLOSE_NAME_MARGIN = 0.1  # how far every other golden customer must stay below the best
CLOSE_NAME_CUTOFF = 0.3  # how alike in toneless pinyin a known name must be to be among those scored
CLOSE_NAMES_SCORED = 30  # known names (nearest in toneless pinyin) scored with the trade-name similarity
IN_BOOK = 0.85  # among one salesperson's own customers, how alike a name must be to be the one meant
# A call with at least this many names (or owner's-book searches) is shared with a helper process (see
# CustomerNames.helped); below it, forking and the hand-over cost more than half the work saves.
SHARED_AT = 400
_PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


_P = ParamSpec("_P")
_T = TypeVar("_T")


def _gc_paused(build: Callable[_P, _T]) -> Callable[_P, _T]:
    """Run a build with the cyclic garbage collector paused.

    The resolver's tables (every name variant of the core, the match index, a salesperson's book) are
    hundreds of thousands of small containers that all survive: collections triggered while they grow
    find nothing to free, and each full one walks the whole heap again (at 1M, with collection off
    throughout, the resolver took a fifth less CPU; paused in the builds only, about a tenth).
    The tables hold no reference cycles; collection resumes when the build returns.
    """

    @wraps(build)
    def paused(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        with collections_paused():  # a build within a build: still paused
            return build(*args, **kwargs)

    return paused


@dataclass(frozen=True)
class NameVariant:
    """One way a golden customer's name is written, split for comparison."""

    region: str | None
    brand: str  # trade name in pinyin without industry words (brand_key)
    core: str  # trade name and industry as written (normalized)
    branch: str | None


@lru_cache(maxsize=200_000)
def name_variant(name: str) -> NameVariant | None:
    """Return how a company name compares as a variant (None for a name with nothing to compare)."""
    parts = normalize_company_name(name)
    if not parts.core:
        return None
    brand = brand_key(parts.core)
    return NameVariant(parts.region, brand, parts.core, parts.branch) if brand else None


# Sized for the distinct name cores of a 1M-row engagement's customers (a smaller cache is swept by every
# resolver build and then misses on every known core a written name is compared with).
@lru_cache(maxsize=600_000)
def spelled(core: str) -> str | None:
    """Return a Chinese name core in toneless pinyin with industry synonyms unified (None for Latin ones)."""
    if not has_han(core):
        return None
    # synonyms unified before the pinyin: lazy_pinyin reads 商贸 as two syllables, never as "shangmao"
    return "".join(INDUSTRY_SYNONYMS.get(s, s) for s in toneless_pinyin(canonical_industry(core)))


SAME_CHARACTERS, SAME_SOUND, PREFIX_ONLY = 0, 1, 2
_UNSPLIT: Any = object()  # not looked up yet (None is a result)


class WrittenName:
    """A written name's side of the comparison with known name variants, worked out once."""

    __slots__ = ("canonical", "han", "spelled", "variant")

    def __init__(self, variant: NameVariant) -> None:
        self.variant = variant
        self.spelled = spelled(variant.core)
        self.canonical = canonical_industry(variant.core)
        self.han = has_han(self.canonical)

    def in_same_place(self, known: NameVariant) -> bool:
        """Return True when ``known`` has the same trade name and branch, and no other region than one written."""
        written = self.variant
        if written.brand != known.brand or written.branch != known.branch:
            return False
        return not (written.region and known.region and written.region != known.region)

    def closeness_to(self, known: NameVariant) -> int | None:
        """How closely a known variant in the same place is written: the same characters (industry synonyms
        unified), the same sound (a homophone: 明汇/明辉), or only a start of the other or across scripts;
        None when both are Chinese and neither is the other or a short form of it."""
        return self.closeness_to_core(known.core)

    def closeness_to_core(self, core: str) -> int | None:
        """:meth:`closeness_to` a known variant with name core ``core`` (it depends on the core only)."""
        mine, theirs = self.spelled, spelled(core)
        if mine and theirs and not (mine.startswith(theirs) or theirs.startswith(mine)):
            return None
        if self.han and self.canonical == canonical_industry(core):
            return SAME_CHARACTERS
        if mine is not None and mine == theirs:
            return SAME_SOUND
        # also a pinyin-English name against a Chinese one: the trade name and region decide
        return PREFIX_ONLY


def same_company_name(written: NameVariant, known: NameVariant) -> bool:
    """Return True when a written name may be a variant of a known one (see the module doc)."""
    side = WrittenName(written)
    return side.in_same_place(known) and side.closeness_to(known) is not None


class CustomerNames:
    """A name resolver for customers (see the module doc), built on the core as it is after the merges."""

    def __init__(
        self,
        session: Session,
        spec: LinkageSpec = CUSTOMER_SPEC,
        *,
        helper: bool | None = None,
        shared_at: int = SHARED_AT,
    ) -> None:
        self.session = session
        self.spec = spec
        # A second process sharing large calls (see helped); None: when this machine has a second core to give.
        self._helper_wanted = _second_core() if helper is None else helper
        self._helper: ProcessPoolExecutor | None = None
        self._helper_stopped: weakref.finalize[Any, Any] | None = None
        self.shared_at = shared_at
        self._books: dict[Hashable, _Book] = {}
        # shared by every book: what among compares of each distinct name core, and the characters numbered
        self._core_facts = _CoreFacts(_Alphabet())
        self._postings: dict[str | None, tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]] = {}
        # trade name -> (branch, region or "*" for all) -> its name variants (see _same_brand)
        self._by_place: dict[str, dict[tuple[str | None, str | None], list[tuple[NameVariant, int]]]] = {}

    @cached_property
    @_gc_paused
    def _survivor(self) -> dict[int, int]:
        rows = self.session.execute(select(Customer.id, Customer.merged_into_id)).all()
        merged_into = {i: m for i, m in rows if m is not None}

        def follow(record_id: int) -> int:
            seen: set[int] = set()
            while record_id in merged_into and record_id not in seen:
                seen.add(record_id)
                record_id = merged_into[record_id]
            return record_id

        return {i: follow(i) for i, _ in rows}

    @cached_property
    @_gc_paused
    def _variants(self) -> dict[str, list[tuple[NameVariant, int]]]:
        """Every name, short name and English name of every customer record, by trade name."""
        by_brand: dict[str, list[tuple[NameVariant, int]]] = defaultdict(list)
        # In id order: the order of variants decides ties among equally close names (rapidfuzz keeps the
        # choices' order, then keeps the first CLOSE_NAMES_SCORED). Unordered, PostgreSQL returns the rows a
        # merge updated elsewhere in its heap, and the same engagement resolved names differently on it.
        every_name = select(Customer.id, Customer.name, Customer.short_name, Customer.english_name)
        rows = self.session.execute(every_name.order_by(Customer.id))
        survivor_of = self._survivor
        # Split once per distinct string (records share short names) and, for a short name without a region,
        # once per (variant, its company's region): a per-record name_variant misses its bounded cache.
        split: dict[str, NameVariant | None] = {}
        placed: dict[tuple[NameVariant, str | None], NameVariant] = {}
        for record_id, *names in rows:
            survivor = survivor_of.get(record_id, record_id)
            full: NameVariant | None = None
            for position, text in enumerate(names):
                if not text:
                    continue
                variant = split.get(text, _UNSPLIT)
                if variant is _UNSPLIT:
                    variant = split[text] = name_variant(text)
                if position == 0:
                    full = variant
                if variant is None:
                    continue
                if variant.region is None and full is not None:  # a short name is in its company's region
                    key = (variant, full.region)
                    in_region = placed.get(key)
                    if in_region is None:
                        in_region = placed[key] = NameVariant(
                            full.region, variant.brand, variant.core, variant.branch
                        )
                    variant = in_region
                by_brand[variant.brand].append((variant, survivor))
        return by_brand

    @cached_property
    @_gc_paused
    def _sounds(self) -> tuple[list[str], list[list[tuple[NameVariant, int]]]]:
        """Every Chinese name variant by its core in toneless pinyin (homophones equal): keys and variants."""
        by_sound: dict[str, list[tuple[NameVariant, int]]] = defaultdict(list)
        sound_of: dict[str, str | None] = {}  # per distinct core (None: not Chinese)
        for variants in self._variants.values():
            for entry in variants:
                core = entry[0].core
                sound = sound_of.get(core, _UNSPLIT)
                if sound is _UNSPLIT:
                    sound = sound_of[core] = name_sound(core) if has_han(core) else None
                if sound is not None:
                    by_sound[sound].append(entry)
        keys = list(by_sound)
        return keys, [by_sound[k] for k in keys]

    @cached_property
    @_gc_paused
    def _sounds_by_region(self) -> dict[str, tuple[list[str], list[list[tuple[NameVariant, int]]]]]:
        """:attr:`_sounds` split by region: a name written with its region is compared with that region's."""
        by_region: dict[str, dict[str, list[tuple[NameVariant, int]]]] = {}
        for key, variants in zip(*self._sounds, strict=True):
            for entry in variants:
                region = entry[0].region
                if region:
                    keyed = by_region.get(region)
                    if keyed is None:
                        keyed = by_region[region] = {}
                    held = keyed.get(key)
                    if held is None:
                        keyed[key] = [entry]
                    else:
                        held.append(entry)
        return {region: (list(keyed), list(keyed.values())) for region, keyed in by_region.items()}

    def _close_name(self, written: NameVariant) -> tuple[int | None, list[tuple[float, int]]]:
        """Step 3 of the module doc: the golden customer a slipped name picks clearly, and the scored ones.

        A name written with its region is compared with the names of that region only (the others could not
        count), so the nearest names scored are that region's and the search does not grow with the core.
        """
        keys, variants = (
            self._sounds_by_region.get(written.region, ([], [])) if written.region else self._sounds
        )
        if not has_han(written.core) or not keys or len(trade_name(written.core)) < 2:
            return None, []
        sound = name_sound(written.core)
        # Only a key sharing syllables with the name can reach the cutoff (its distance is at least the longer
        # length less the syllables shared), so the others are left out before rapidfuzz scores: the same
        # keys reach the cutoff, in the same order (rapidfuzz keeps the choices' order among equal scores).
        postings, lengths, key_array = self._sound_postings(written.region)
        shared = np.zeros(len(keys), dtype=np.int64)
        for symbol in set(sound):
            holders = postings.get(symbol)
            if holders is not None:
                shared[holders] += sound.count(symbol)  # at least what the key shares of this syllable
        near = np.flatnonzero(shared >= (CLOSE_NAME_CUTOFF - 1e-6) * np.maximum(lengths, len(sound)))
        nearest = process.extract(
            sound, key_array[near].tolist(), scorer=distance.Levenshtein.normalized_similarity,
            limit=CLOSE_NAMES_SCORED, score_cutoff=CLOSE_NAME_CUTOFF,
        )  # fmt: skip
        best: dict[int, float] = {}
        for _key, _score, found in nearest:
            position = int(near[found])
            for known, survivor in variants[position]:
                if known.branch != written.branch:
                    continue
                if written.region and known.region != written.region:  # a region written must be theirs
                    continue
                if len(known.core) < len(
                    written.core
                ):  # 江软件 for 江科软件: a shorter known name is another
                    continue
                similarity = variant_similarity(written.core, known.core)
                best[survivor] = max(best.get(survivor, 0.0), similarity)
        scored = sorted(((s, i) for i, s in best.items()), reverse=True)
        if not scored or scored[0][0] < (CLOSE_NAME if written.region else CLOSE_NAME_NO_REGION):
            return None, scored
        if len(scored) > 1 and scored[1][0] > scored[0][0] - CLOSE_NAME_MARGIN:
            return None, scored
        return scored[0][1], scored

    def _sound_postings(self, region: str | None) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """Return, for the sound keys :meth:`_close_name` searches (``region``'s, or all), each syllable's
        keys, every key's length in syllables and the keys as an array (built once per region)."""
        found = self._postings.get(region)
        if found is None:
            found = self._postings[region] = self._build_postings(region)
        return found

    @_gc_paused
    def _build_postings(self, region: str | None) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        keys = (self._sounds_by_region.get(region, ([], [])) if region else self._sounds)[0]
        holding: dict[str, list[int]] = defaultdict(list)
        for position, key in enumerate(keys):
            for symbol in set(key):
                holding[symbol].append(position)
        postings = {symbol: np.array(held, dtype=np.int64) for symbol, held in holding.items()}
        key_array = np.empty(len(keys), dtype=object)
        key_array[:] = keys
        return postings, np.array([len(k) for k in keys], dtype=np.int64), key_array

    @cached_property
    @_gc_paused
    def _golden(self) -> Sequence[Any]:
        """Every golden customer in id order: id, name and what the match index compares of it (read once
        for both)."""
        # Read in the loader's own transaction (customer_records opens another connection, which SQLite would
        # make wait for this writer).
        return self.session.execute(
            select(Customer.id, Customer.name, Customer.credit_code, Customer.phone, Customer.email, Customer.city,
                   Customer.credit_code_as_written)
            .where(Customer.merged_into_id.is_(None)).order_by(Customer.id)
        ).all()  # fmt: skip

    @cached_property
    @_gc_paused
    def _golden_names(self) -> dict[int, str]:
        return {row[0]: row[1] for row in self._golden}

    @cached_property
    @_gc_paused
    def _index(self) -> NameIndex:
        """The match index over the golden customers in id order, their linkage rows computed as queries need
        them (:class:`NameIndex`): the index serves the names the variants left, a small share of a load's."""
        rows = self._golden

        def linkage(positions: list[int]) -> list[dict[str, Any]]:
            # as linkage_row row by row: no address, province or district
            return linkage_rows([
                {"name": n, "credit_code": c, "phone": p, "email": e, "city": t, "address": None, "province": None,
                 "district": None, "credit_code_as_written": w}
                for _, n, c, p, e, t, w in (rows[position] for position in positions)
            ])  # fmt: skip

        return NameIndex([row[0] for row in rows], [row[1] for row in rows], linkage, self.spec)

    def __call__(self, target: str, names: Sequence[str]) -> Mapping[str, NameMatch]:
        """Resolve each name to one golden customer, or list the candidates a steward chooses from."""
        helper = self.helped() if len(names) >= self.shared_at else None
        if helper is None:
            return self._resolve_each(names)
        # By trade name: the per-trade-name tables (_by_place) are then built on one side only.
        theirs, mine, _ = _halves(names, [_trade_key(name) for name in names])
        found, found_there = self._shared(
            helper, "_resolve_each", (theirs,), lambda: self._resolve_each(mine)
        )
        found.update(found_there)
        return {name: found[name] for name in names}

    def _resolve_each(self, names: Sequence[str]) -> dict[str, NameMatch]:
        return {name: self.resolve(name) for name in names}

    def among_many(
        self, calls: Sequence[tuple[str, Collection[int], int | None, Hashable]]
    ) -> list[int | None]:
        """:meth:`among` for each ``(name, ids, current, book_key)``, answers in order; a large batch is shared
        with the helper process, each salesperson's book searched on one side only (it is built once there)."""
        keyed = all(book_key is not None for *_, book_key in calls)  # each book on one side needs its key
        helper = self.helped() if keyed and len(calls) >= self.shared_at else None
        if helper is None:
            return [self.among(name, ids, current, book_key) for name, ids, current, book_key in calls]
        their_calls, mine, there = _halves(calls, [repr(book_key) for *_, book_key in calls])
        theirs = [(name, current, key) for name, _, current, key in their_calls]
        books = {key: tuple(sorted(ids)) for _, ids, _, key in their_calls}
        answers, answers_there = self._shared(
            helper, "_among_each", (books, theirs),
            lambda: [self.among(name, ids, current, book_key) for name, ids, current, book_key in mine],
        )  # fmt: skip
        here, away = iter(answers), iter(answers_there)
        return [next(away) if go else next(here) for go in there]

    def _among_each(
        self, books: Mapping[Hashable, tuple[int, ...]], calls: Sequence[tuple[str, int | None, Hashable]]
    ) -> list[int | None]:
        return [self.among(name, books[key], current, key) for name, current, key in calls]

    def helped(self) -> ProcessPoolExecutor | None:
        """Return the helper process that takes half of a large call, started on first use (None: work alone).

        The helper is forked once every table the resolver reads from the database is built: it shares them
        copy-on-write, never touches the database (the loader's transaction stays this process's), and answers
        from the same tables, so its answers are those this process would give. A call's work is split by trade
        name or salesperson, whose tables each side then builds once. The helper freezes what it inherited
        (``gc.freeze``), so its collections leave the shared pages alone, and dies with this process
        (``PR_SET_PDEATHSIG``): killed, this process leaves no helper holding a copy of its connection.
        """
        if self._helper is None and self._helper_wanted:
            self._build_tables()
            global _FORKED_RESOLVER
            _FORKED_RESOLVER = self
            pool = ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("fork"), initializer=_helper_started,
                initargs=(os.getpid(),),
            )  # fmt: skip
            try:
                pool.submit(int).result()  # forks now, with the tables built
            except BaseException as exc:  # forked or not, nothing may stay behind
                _stop(pool, kill=True)
                if not isinstance(exc, OSError | RuntimeError | BrokenProcessPool):
                    raise
                self._helper_wanted = False  # no process or thread to spare (limits): the work stays here
                return None
            finally:
                _FORKED_RESOLVER = None
            self._helper = pool
            self._helper_stopped = weakref.finalize(self, _stop, pool)
        return self._helper

    def close(self, *, kill: bool = False) -> None:
        """Stop the helper process, if one was started (the resolver still answers, alone). ``kill``: at once,
        without waiting for the part it is working on (the load failed or was interrupted)."""
        helper, self._helper, self._helper_wanted = self._helper, None, False
        if helper is not None:
            if self._helper_stopped is not None:
                self._helper_stopped.detach()
            _stop(helper, kill=kill)

    def _build_tables(self) -> None:
        """Read and build every table resolving a name reads (the helper must find them all built)."""
        for table in ("_survivor", "_variants", "_golden", "_golden_names", "_variants_of", "_sounds",
                      "_sounds_by_region", "_index"):  # fmt: skip
            getattr(self, table)

    def _shared(self, helper: ProcessPoolExecutor, method: str, their_part: tuple[Any, ...],
                my_part: Callable[[], _T]) -> tuple[_T, Any]:  # fmt: skip
        """Run ``method(*their_part)`` in the helper while this process does ``my_part``; both answers."""
        future: Future[Any] | None
        try:
            future = helper.submit(_in_helper, method, their_part)
        except BrokenProcessPool:
            future = None
        mine = my_part()
        if future is not None:
            with contextlib.suppress(BrokenProcessPool):
                return mine, future.result()
        self.close()  # the helper died (killed, out of memory): its part is done here, and the rest alone
        return mine, getattr(self, method)(*their_part)

    def resolve(self, name: str) -> NameMatch:
        """Resolve one name (see the module doc)."""
        written = name_variant(name)
        if written is not None:
            by_closeness: dict[int, set[int]] = defaultdict(set)
            side = WrittenName(written)
            # A popular trade name's variants share a few cores (every record of a firm written alike):
            # closeness depends on the core only, so each is worked out once.
            closeness: dict[str, int | None] = {}
            for known, survivor in self._same_brand(written):  # all in the same place (see _same_brand)
                how_close = closeness.get(known.core, _UNSPLIT)
                if how_close is _UNSPLIT:
                    how_close = closeness[known.core] = side.closeness_to_core(known.core)
                if how_close is not None:
                    by_closeness[how_close].add(survivor)
            found = set().union(*by_closeness.values())
            closest = by_closeness[min(by_closeness)] if by_closeness else set()
            # A bare trade name (坤飞) is many companies' short name: only a name with its industry picks one.
            picks = trade_name(written.core) != side.canonical
            if picks and len(found) > 1 and len(closest) == 1 and min(by_closeness) == SAME_CHARACTERS:
                return NameMatch(next(iter(closest)), method="name variant")
            if len(found) == 1 and written.region is None and written.branch is None:
                # A branch of the trade name in another city's firm (深圳腾达科技有限公司北京分公司 beside 上海腾达科技
                # 有限公司) says a second company bears it, loaded or not: the bare name may mean either.
                found |= self._other_firms_branches(written, side, next(iter(found)))
            if len(found) == 1:
                return NameMatch(next(iter(found)), method="name variant")
            if found:
                # the closest way of writing the name first (then by id): what a steward compares first
                # (another firm's branch, which the variants did not find, comes after them)
                nearest = {i: c for c in sorted(by_closeness, reverse=True) for i in by_closeness[c]}
                ranked = sorted(found, key=lambda i: (i not in nearest, nearest.get(i, 0), i))
                return NameMatch(None, tuple(self._shown(ranked)), method="name variant",
                                 candidate_ids=tuple(sorted(found)))  # fmt: skip
        matches = self._index.match(query_record(name), limit=CANDIDATES_SHOWN)
        candidates = tuple(
            {"id": c.customer_id, "name": c.name, "probability": c.probability}
            for c in matches
            if c.probability > 0.01
        )
        may_mean = [c.customer_id for c in matches if c.probability >= self.spec.review]
        if matches and matches[0].probability >= self.spec.auto_merge:
            rivals = [c for c in matches[1:] if c.probability >= self.spec.review]
            if not rivals:
                return NameMatch(matches[0].customer_id, candidates, method="match index")
        if written is not None and not (matches and matches[0].probability >= self.spec.auto_merge):
            chosen, scored = self._close_name(written)
            if chosen is not None:
                return NameMatch(chosen, candidates, method="close name")
            if not candidates and scored:
                # Shown with the name similarity (no probability: the match index did not score them), the same
                # trade name first: 瑞丰电子 before 新客户科技 for 瑞丰科技, however the whole names score.
                written_trade = trade_name(written.core)

                def trade_similarity(record_id: int) -> float:
                    return max((variant_similarity(written_trade, trade_name(v.core))
                                for v in self._variants_of.get(record_id, ())), default=0.0)  # fmt: skip

                shown = sorted(scored, key=lambda pair: (-trade_similarity(pair[1]), -pair[0], pair[1]))
                candidates = tuple(
                    {
                        "id": i,
                        "name": self._golden_names.get(i),
                        "probability": None,
                        "similarity": round(s, 2),
                    }
                    for s, i in shown[:CANDIDATES_SHOWN]
                )
            # the names as close as the best one (within the margin a clear pick needs) may be meant
            may_mean += [
                i for s, i in scored if scored and s >= max(scored[0][0] - CLOSE_NAME_MARGIN, CLOSE_NAME)
            ]
        return NameMatch(None, candidates, method="match index", candidate_ids=tuple(dict.fromkeys(may_mean)))

    def _other_firms_branches(self, written: NameVariant, side: WrittenName, found: int) -> set[int]:
        """The branches of ``written``'s trade name whose firm is in a region where ``found`` (the one golden
        customer the name found) is not: each is evidence of another company of that name."""
        regions = {v.region for v in self._variants_of.get(found, ()) if v.region is not None}
        if not regions:
            return set()  # found is written without a region: no place tells the firms apart
        by_place = self._by_place.get(written.brand)
        if by_place is None:
            by_place = self._by_place[written.brand] = self._placed(written.brand)
        return {
            survivor
            for (branch, region), entries in by_place.items()
            if branch is not None and region != "*"
            for known, survivor in entries
            if survivor != found and known.region is not None and known.region not in regions
            and side.closeness_to_core(known.core) is not None
        }  # fmt: skip

    def _same_brand(self, written: NameVariant) -> list[tuple[NameVariant, int]]:
        """Return the name variants of ``written``'s trade name that :func:`same_company_name` may accept:
        the same branch, and the same region or none when ``written`` has one (a popular trade name has
        hundreds of variants, most of them in other cities)."""
        by_place = self._by_place.get(written.brand)
        if by_place is None:
            by_place = self._by_place[written.brand] = self._placed(written.brand)
        if written.region is None:
            return by_place.get((written.branch, "*"), [])
        return by_place.get((written.branch, written.region), []) + by_place.get((written.branch, None), [])

    @_gc_paused
    def _placed(self, brand: str) -> dict[tuple[str | None, str | None], list[tuple[NameVariant, int]]]:
        """Return a trade name's variants by (branch, region), and by (branch, "*") for any region."""
        by_place: dict[tuple[str | None, str | None], list[tuple[NameVariant, int]]] = defaultdict(list)
        for entry in self._variants.get(brand, ()):
            known = entry[0]
            by_place[known.branch, known.region].append(entry)
            by_place[known.branch, "*"].append(entry)  # any region
        return by_place

    @cached_property
    @_gc_paused
    def _variants_of(self) -> dict[int, list[NameVariant]]:
        """Golden customer -> every way its name is written."""
        by_survivor: dict[int, list[NameVariant]] = defaultdict(list)
        for variants in self._variants.values():
            for variant, survivor in variants:
                by_survivor[survivor].append(variant)
        return by_survivor

    def among(
        self, name: str, ids: Collection[int], current: int | None = None, book_key: Hashable | None = None
    ) -> int | None:
        """Return the one customer of ``ids`` (a salesperson's own book) ``name`` clearly means, else None.

        ``current`` is the customer the name found elsewhere: kept (None) when the name carries its industry
        and that customer is written the same way (trade name and industry, no other region), since a whole
        name outweighs whose book it is in; only a weak name (a bare trade name) is settled by the book.

        Each customer scores the best of its name variants: 1.0 for the same trade name (in toneless
        pinyin) unless both name an industry and they differ, else the trade name's and the whole core's
        Chinese-aware similarity (a bare trade name 亿越 is 佛山亿越建设工程's); none when a region written on
        both sides differs or one is a branch. The best must reach ``IN_BOOK`` and lead the next by
        ``CLOSE_NAME_MARGIN``.
        """
        written = name_variant(name)
        if written is None or not ids:
            return None
        written_trade = trade_name(written.core)
        written_canonical = canonical_industry(written.core)
        written_industry = written_canonical[len(written_trade) :]
        if (
            current is not None
            and written_industry
            and any(
                canonical_industry(known.core) == written_canonical
                and (not written.region or not known.region or known.region == written.region)
                for known in self._variants_of.get(current, ())
            )
        ):
            return None
        book = self._book(ids, book_key)
        scored: list[tuple[float, int]] = []
        regions: dict[int, set[str]] = {}
        best_of: dict[int, float] = {}
        # A variant with the trade name itself (in a place the name allows) scores 1.0 unscored; then only a
        # score above 1.0 - CLOSE_NAME_MARGIN can be a rival, and the variants bounded below it are not scored.
        whole = any(
            (known := book.variants[entry]).branch == written.branch
            and not (written.region and known.region and known.region != written.region)
            and (
                not written_industry
                or not book.industries[entry]
                or book.industries[entry] == written_industry
            )
            for entry in book.entries("brand", written.brand).tolist()
        )
        entries, core_counts, trade_counts = book.worth_scoring(
            written.brand, written_canonical, written_trade, 1.0 if whole else IN_BOOK
        )
        for entry, core_may, trade_may in zip(entries, core_counts, trade_counts, strict=True):
            survivor, known = book.survivors[entry], book.variants[entry]
            if known.branch != written.branch or (
                written.region and known.region and known.region != written.region
            ):
                continue
            known_trade = book.raw_trades[entry]
            known_industry = book.industries[entry]
            best = best_of.get(survivor, 0.0)
            if known.brand == written.brand and (
                not written_industry or not known_industry or known_industry == written_industry
            ):
                best_of[survivor] = 1.0
                regions.setdefault(survivor, set()).update([known.region] if known.region else [])
                continue
            # a side whose bound stays below a rival's score is not scored: below it, any score decides alike
            similarity = 0.0
            if core_may:
                similarity = variant_similarity(written.core, known.core)
            if trade_may:
                similarity = max(similarity, variant_similarity(written_trade, known_trade))
            if (similarity < IN_BOOK and written.region and known.region == written.region and written_industry
                    and known_industry == written_industry
                    and len(known_trade) == len(written_trade) >= 2
                    and distance.Hamming.distance(known_trade, written_trade) == 1):  # fmt: skip
                similarity = IN_BOOK  # one trade-name character off, same city, industry and salesperson
            best_of[survivor] = max(best, similarity)
        scored = [(best, survivor) for survivor, best in best_of.items()]
        scored.sort(key=lambda pair: (-pair[0], pair[1]))
        if not scored or scored[0][0] < IN_BOOK:
            return None
        rivals = [(score, i) for score, i in scored[1:] if score > scored[0][0] - CLOSE_NAME_MARGIN]
        if not rivals:
            return scored[0][1]
        # Several of the owner's customers carry the trade name itself, in no two places: one firm that
        # linkage left in pieces. The deal goes to the piece with the most names known (a steward's merge
        # of the pieces brings it along).
        tied = [scored[0][1], *(i for _, i in rivals)]
        whole = scored[0][0] == 1.0 and all(score == 1.0 for score, _ in rivals)
        if whole and len(set().union(*(regions.get(i, set()) for i in tied))) <= 1:
            return max(tied, key=lambda i: (len(self._variants_of.get(i, ())), -i))
        return None

    @_gc_paused
    def _book(self, ids: Collection[int], book_key: Hashable | None) -> _Book:
        """Return the name variants of the customers ``ids``, prepared once per ``book_key`` (a salesperson)."""
        book = self._books.get(book_key) if book_key is not None else None
        if book is None:
            survivors: list[int] = []
            variants: list[NameVariant] = []
            variants_of = self._variants_of
            for survivor in sorted(ids):
                known = variants_of.get(survivor)
                if known:
                    survivors += [survivor] * len(known)
                    variants += known
            book = _Book(survivors, variants, self._core_facts)
            if book_key is not None:
                self._books[book_key] = book
        return book

    def _shown(self, ids: Sequence[int]) -> list[dict[str, Any]]:
        """Return candidates for a steward: id and name, scored by the match index where it knows them."""
        return [
            {"id": i, "name": self._golden_names.get(i), "probability": None} for i in ids[:CANDIDATES_SHOWN]
        ]


_FORKED_RESOLVER: CustomerNames | None = (
    None  # the resolver a helper process is forked with (set over the fork)
)


def _second_core() -> bool:
    """Whether a helper process can run beside this one: a second core to run on, and ``fork`` to share tables."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores >= 2 and "fork" in multiprocessing.get_all_start_methods()


def _helper_started(parent: int) -> None:
    """In the helper process, first: die with the parent, leave Ctrl-C to it, and leave the inherited objects
    to reference counting (a collection would write into, and so copy, every page it walks)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the helper (close)
    gc.freeze()


def _stop(helper: ProcessPoolExecutor, *, kill: bool = False) -> None:
    """Shut a helper down: after its current part, or at once (``kill``: SIGKILL, without waiting)."""
    if kill:
        for pid in list(getattr(helper, "_processes", None) or {}):  # forked but maybe not yet known: private
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    helper.shutdown(wait=not kill, cancel_futures=True)


def _in_helper(method: str, arguments: tuple[Any, ...]) -> Any:
    """In the helper process: answer with the resolver it was forked with."""
    if _FORKED_RESOLVER is None:
        raise DedupError("the name resolver's helper process started without its resolver")
    return getattr(_FORKED_RESOLVER, method)(*arguments)


def _trade_key(name: str) -> str:
    variant = name_variant(name)
    return variant.brand if variant is not None else name


def _halves(items: Sequence[_T], keys: Sequence[str]) -> tuple[list[_T], list[_T], list[bool]]:
    """Split ``items`` by their ``keys`` (the same half for a key in every process and run): the helper's, this
    process's, and for each item whether it is the helper's."""
    theirs = [zlib.crc32(key.encode("utf-8")) % 2 == 1 for key in keys]
    return (
        [item for item, go in zip(items, theirs, strict=True) if go],
        [item for item, go in zip(items, theirs, strict=True) if not go],
        theirs,
    )


_Read = tuple[tuple[int, ...], int]  # a text's character numbers and its trade name's length (_Alphabet.text)
# the exact keys a core gives (_Book.EXACT_KINDS but the brand), as _CoreFacts.codes numbers
_KeyCodes = tuple[int, int, int, int]
_Facts = tuple[str, str, str, str, str, str, _Read, _Read, _KeyCodes]


class _CoreFacts(dict[str, _Facts]):
    """Name core -> what a :class:`_Book` compares of it, worked out once per distinct core for every book:
    the core with industry words unified, its trade name as written, its industry (unified), the trade name
    unified, the trade names of those two, the unified core and trade name as ``alphabet`` reads them, and
    the numbers ``codes`` gives the unified core, trade name and their trade names (the book's exact keys)."""

    def __init__(self, alphabet: _Alphabet) -> None:
        super().__init__()
        self.alphabet = alphabet
        # text -> its number, given the first time it is asked for (equal texts, equal numbers)
        self.codes: dict[str, int] = {}

    def __missing__(self, core: str) -> _Facts:
        canonical = canonical_industry(core)  # as variant_similarity compares cores
        raw_trade = trade_name(core)
        trade = canonical_industry(raw_trade)  # ... and trade names
        core_trade, trade_trade = trade_name(canonical), trade_name(trade)
        codes = self.codes
        found = self[core] = (
            canonical, raw_trade, canonical[len(raw_trade) :], trade, core_trade, trade_trade,
            self.alphabet.text(canonical), self.alphabet.text(trade),
            (codes.setdefault(canonical, len(codes)), codes.setdefault(trade, len(codes)),
             codes.setdefault(core_trade, len(codes)), codes.setdefault(trade_trade, len(codes))),
        )  # fmt: skip
        return found


class _Alphabet:
    """Characters numbered once for every :class:`_Strings` of a resolver, with the numbers of each text.

    A character is numbered the first time a text holds it; the numbers a :class:`_Strings` reads are those
    given before it was built (its own characters among them), so later ones never reach its arrays.
    """

    def __init__(self) -> None:
        self.number: dict[str, int] = {}
        self.alike: dict[tuple[str, ...], list[int]] = defaultdict(list)  # alike token -> character numbers
        self._texts: dict[str, _Read] = {}

    def text(self, text: str) -> _Read:
        """Return the numbers of a text's characters and the length of its trade name."""
        found = self._texts.get(text)
        if found is None:
            number = self.number
            numbers = []
            for char in text:
                n = number.get(char)
                if n is None:
                    n = number[char] = len(number)
                    for token in alike_tokens(char):
                        self.alike[token].append(n)
                numbers.append(n)
            found = self._texts[text] = (tuple(numbers), len(trade_name(text)))
        return found


_NO_ENTRIES = np.zeros(0, dtype=np.int64)
_NO_ENTRIES.flags.writeable = False


def _similarity_bound(costs: np.ndarray, written_trade_length: int, trade_lengths: np.ndarray) -> np.ndarray:
    """Upper bounds of :func:`variant_similarity` from lower bounds of its weighted edit cost."""
    bounds: np.ndarray = 1.0 - costs / (np.maximum(trade_lengths, written_trade_length) + 1)
    return bounds


class _Strings:
    """Names compared the way :func:`variant_similarity` compares them, with lower bounds of its cost.

    Two bounds, both computed for every name at once: every weighted edit costs at least ``SOUND_OR_SHAPE``
    and is one plain edit (OSA distance, in C); and each character of the written name that a name lacks
    costs at least ``SOUND_OR_SHAPE`` when the name has a character like it (:func:`alike_tokens`), else
    ``GAP`` (dropped, or replaced at full cost).

    Characters are numbered by an :class:`_Alphabet` (one per resolver, shared by its books, so a name's
    characters are read once); a number is only a position, so the bounds do not depend on it.
    """

    def __init__(
        self, texts: list[str], alphabet: _Alphabet | None = None, read: list[_Read] | None = None
    ) -> None:
        self.texts = texts
        self._alphabet = alphabet = alphabet if alphabet is not None else _Alphabet()
        if read is None:  # else given: what alphabet.text returns for each text
            read = [alphabet.text(t) for t in texts]
        self.trade_lengths = np.array([length for _, length in read], dtype=np.float64)
        self._number = alphabet.number
        self._size = size = max(len(alphabet.number), 1)  # the characters numbered so far (ours among them)
        # every character of every name, flattened: (name, character number) per position
        lengths = np.array([len(t) for t in texts], dtype=np.int64)
        self._entry_of = np.repeat(np.arange(len(texts), dtype=np.int64), lengths)
        self._char_of = np.fromiter(
            chain.from_iterable(numbers for numbers, _ in read), dtype=np.int64, count=int(lengths.sum())
        )
        # the names holding each character: _entries_by_char[_char_start[n]:_char_start[n + 1]] for number n,
        # in name order; a name holding a character twice is there twice (the holders only mark names)
        stride = max(len(texts), 1)
        pairs = np.sort(self._char_of * stride + self._entry_of)  # by character, then name
        self._entries_by_char = pairs % stride
        self._char_start = np.searchsorted(pairs, np.arange(size + 1, dtype=np.int64) * stride)
        self._holding: dict[str, tuple[np.ndarray, np.ndarray, list[int]]] = {}

    def _known(self, char: str) -> int | None:
        """The number of a character numbered before these names were read (else none of them holds it)."""
        n = self._number.get(char)
        return n if n is not None and n < self._size else None

    def _holders(self, char: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Return the names holding a character like ``char`` (or it), those holding ``char`` itself, and the
        numbers of the characters like it.

        Cached per character: one salesperson's book is searched for many names written with the same ones.
        """
        found = self._holding.get(char)
        if found is None:
            start, size, chars_alike = self._char_start, self._size, self._alphabet.alike
            alike = [chars_alike[t] for t in alike_tokens(char) if t in chars_alike]
            numbers = [n for n in np.unique(np.concatenate(alike)).tolist() if n < size] if alike else []
            holding_alike = np.unique(
                np.concatenate([self._entries_by_char[start[n] : start[n + 1]] for n in numbers])
                if numbers else np.zeros(0, dtype=np.int64)
            )  # fmt: skip
            n = self._known(char)
            holding = self._entries_by_char[start[n] : start[n + 1]] if n is not None else holding_alike[:0]
            found = self._holding[char] = (holding_alike, holding, numbers)
        return found

    def bounds(self, written: str, at_least: float | None = None) -> np.ndarray:
        """Return, per name, an upper bound of ``variant_similarity(written, name)`` (exact cases aside).

        With ``at_least``, a name whose bound from the characters alone stays below it keeps that bound: the
        plain edit distance (which can only lower a bound) is computed for the others only.
        """
        count = len(self.texts)
        lacking = np.zeros(count)
        for char in written:  # each character of the written name a name lacks
            holding_alike, holding, _ = self._holders(char)
            cost = np.full(count, GAP)
            cost[holding_alike] = SOUND_OR_SHAPE
            cost[holding] = 0.0
            lacking += cost
        # each character of a name the written one lacks: the same costs, summed per name
        char_cost = np.full(self._size, GAP)
        for char in set(written):
            char_cost[self._holders(char)[2]] = SOUND_OR_SHAPE
        for char in set(written):
            number = self._known(char)
            if number is not None:
                char_cost[number] = 0.0
        missing = np.bincount(self._entry_of, weights=char_cost[self._char_of], minlength=count)
        costs = np.maximum(lacking, missing)
        written_trade_length = len(trade_name(written))
        if at_least is None:
            plain = process.cdist([written], self.texts, scorer=distance.OSA.distance, dtype=np.int32)[0]
            return _similarity_bound(
                np.maximum(costs, SOUND_OR_SHAPE * plain), written_trade_length, self.trade_lengths
            )
        bounds = _similarity_bound(costs, written_trade_length, self.trade_lengths)
        reach = np.flatnonzero(bounds >= at_least)
        if len(reach):
            texts = self.texts
            plain = process.cdist(
                [written], [texts[i] for i in reach], scorer=distance.OSA.distance, dtype=np.int32
            )[0]
            bounds[reach] = _similarity_bound(
                np.maximum(costs[reach], SOUND_OR_SHAPE * plain),
                written_trade_length,
                self.trade_lengths[reach],
            )
        return bounds


class _Book:
    """A salesperson's customers' name variants, with what :meth:`CustomerNames.among` compares precomputed.

    ``worth_scoring`` leaves out, with bounds computed for the whole book at once, the variants whose
    similarity cannot reach a rival's score (``IN_BOOK - CLOSE_NAME_MARGIN``), so the Python comparison runs
    on a handful of variants instead of every name a salesperson's book holds; the pick is the same.
    """

    def __init__(
        self,
        survivors: list[int],
        variants: list[NameVariant],
        facts: _CoreFacts | None = None,
    ) -> None:
        self.survivors = survivors
        self.variants = variants
        facts = facts if facts is not None else _CoreFacts(_Alphabet())
        known = [facts[v.core] for v in variants]
        cores = [f[0] for f in known]  # as variant_similarity compares cores
        self.raw_trades = [f[1] for f in known]
        self.industries = [f[2] for f in known]
        trades = [f[3] for f in known]  # ... and trade names
        self.cores = _Strings(cores, facts.alphabet, [f[6] for f in known])
        self.trades = _Strings(trades, facts.alphabet, [f[7] for f in known])
        self.raw_trade_lengths = np.array([len(t) for t in self.raw_trades], dtype=np.int64)
        # the raw trade names of each length asked for, with their entries (see _raw_of_length)
        self._raw_by_length: dict[int, tuple[np.ndarray, list[str]]] = {}
        # Each entry's exact keys as numbers (facts.codes), one column per kind: a key's entries are found with
        # one comparison of a column, and a book holds no list per key and entry (at 1M, some 1.2 million
        # lists every garbage collection walked again).
        self._codes = codes = facts.codes
        count = len(variants)
        keys = np.empty((len(self.EXACT_KINDS), count), dtype=np.int64)
        keys[0] = np.fromiter(
            (codes.setdefault(v.brand, len(codes)) for v in variants), dtype=np.int64, count=count
        )
        keys[1:] = (
            np.fromiter(chain.from_iterable(f[8] for f in known), dtype=np.int64, count=4 * count)
            .reshape(-1, 4)
            .T
        )
        self._keys = keys

    EXACT_KINDS = ("brand", "core", "trade", "core_trade", "trade_trade")

    def entries(self, kind: str, value: str) -> np.ndarray:
        """Return the entries whose key of ``kind`` (one of ``EXACT_KINDS``) is ``value``, in entry order:
        ``brand`` the variant's brand, ``core``/``trade`` its core/trade name with industry words unified,
        ``core_trade``/``trade_trade`` the trade names of those two."""
        code = self._codes.get(value)
        if code is None:  # no book holds it
            return _NO_ENTRIES
        return np.flatnonzero(self._keys[self.EXACT_KINDS.index(kind)] == code)

    def _raw_of_length(self, length: int) -> tuple[np.ndarray, list[str]]:
        """Return the entries whose raw trade name has ``length`` characters, and those names, in entry order
        (the same-city rule compares names of equal length; found once per length a book is asked for)."""
        found = self._raw_by_length.get(length)
        if found is None:
            held = np.flatnonzero(self.raw_trade_lengths == length)
            raw_trades = self.raw_trades
            found = self._raw_by_length[length] = (held, [raw_trades[i] for i in held.tolist()])
        return found

    def worth_scoring(
        self, brand: str, written_core: str, written_trade: str, best: float = IN_BOOK
    ) -> tuple[list[int], list[bool], list[bool]]:
        """Return the entries that may score above ``best - CLOSE_NAME_MARGIN`` against a written name,
        and for each whether its core and whether its trade name may (the other side need not be scored).

        ``written_core`` is the written core with industry words unified, ``written_trade`` its trade name;
        ``best`` the score the best customer has at least (1.0 when a variant carries the trade name itself),
        else ``IN_BOOK`` (below it, nothing is picked). Kept: the same brand; a core or trade name that is the
        other's trade name (``TRADE_NAME_ONLY``); a raw trade name one character off (the same-city rule);
        and every variant whose similarity bound reaches the rival threshold.
        """
        if not self.variants:
            return [], [], []
        trade_canonical = canonical_industry(written_trade)
        count = len(self.variants)
        keep, core_may, trade_may = (np.zeros(count, dtype=bool) for _ in range(3))
        keep[self.entries("brand", brand)] = True
        for kind, value in (("core", trade_name(written_core)), ("core_trade", written_core)):
            core_may[self.entries(kind, value)] = True
        for kind, value in (("trade", trade_name(trade_canonical)), ("trade_trade", trade_canonical)):
            trade_may[self.entries(kind, value)] = True
        rival = best - CLOSE_NAME_MARGIN - 1e-9
        core_may |= self.cores.bounds(written_core, rival) >= rival
        trade_may |= self.trades.bounds(trade_canonical, rival) >= rival
        # one character off: OSA distance 1 between trade names of the same length (those only compared)
        alike_length, texts = self._raw_of_length(len(written_trade))
        if texts:
            raw = process.cdist([written_trade], texts, scorer=distance.OSA.distance, dtype=np.int32)[0]
            keep[alike_length[raw == 1]] = True
        keep |= core_may | trade_may
        entries = np.flatnonzero(keep)
        return entries.tolist(), core_may[entries].tolist(), trade_may[entries].tolist()


REFERENCE_PREFIX = "r"  # `crmi dedup decide r12`: reference decision 12 (pair candidates are plain numbers)


def reference_queue(engine: Engine, limit: int | None = None) -> list[dict[str, Any]]:
    """Return the names waiting for a steward, the most money held first: rows, amount and candidates."""
    with session_factory(engine)() as session:
        query = (
            select(ReferenceDecision)
            .where(ReferenceDecision.status == "pending", ReferenceDecision.rows_held > 0)  # rows wait on it
            .order_by(ReferenceDecision.amount_held.desc().nulls_last(), ReferenceDecision.rows_held.desc(),
                      ReferenceDecision.id)
        )  # fmt: skip
        if limit is not None:
            query = query.limit(limit)
        return [
            {"reference": f"{REFERENCE_PREFIX}{d.id}", "entity": d.entity, "name": d.name, "rows_held": d.rows_held,
             "amount_held": None if d.amount_held is None else str(d.amount_held), "candidates": d.candidates}
            for d in session.scalars(query)
        ]  # fmt: skip


def _deciding_run(session: Any, decision_id: int) -> str | None:
    """The key of the steward run (not rolled back) that last decided reference ``decision_id``, if journaled."""
    table = Base.metadata.tables[ReferenceDecision.__tablename__]
    key: str | None = session.scalar(
        select(LoadRun.run_key)
        .join(RowChange, RowChange.load_run_id == LoadRun.id)
        .where(
            RowChange.table_name == table.name,
            RowChange.row_key == row_key(table, {"id": decision_id}),
            LoadRun.mode == "steward",
            LoadRun.status == "succeeded",
        )
        .order_by(RowChange.id.desc())
        .limit(1)
    )
    return key


def decide_reference(
    engine: Engine,
    decision_id: int,
    *,
    record_id: int | None,
    steward: str,
    run_key: str,
    project: str,
    channel: str = "cli",
    ip: str | None = None,
) -> ReferenceDecision:
    """Record a steward's decision on a held name: the record it names (``record_id``), or none at all.

    Linked, the rows naming it load on the next run (as every later row writing the name that way); with
    no record they are rejected from then on, with the steward's decision as the reason. Journaled in a
    steward run of its own, so ``crmi rollback`` undoes it; audited (from ``ip``), a link on the record (``channel``:
    where it was decided), its golden record page lists it. It waits for another writer holding the core as a
    merge does (:func:`share_edit_fence`: :class:`~crm_core.errors.SyncLoadWaitError` past its limit).
    """
    with session_factory(engine)() as session, session.begin():
        share_edit_fence(session, "reference decision")
        decision = session.get(ReferenceDecision, decision_id)
        if decision is None:
            raise DedupError(
                f"no reference decision {REFERENCE_PREFIX}{decision_id}; `crmi dedup review` lists them"
            )
        if decision.status != "pending":
            deciding = _deciding_run(session, decision_id)
            raise DedupError(
                f"reference {REFERENCE_PREFIX}{decision_id} was already decided: {decision.status}; a reference "
                "decision is changed by rolling back the steward run that made it: "
                + (
                    f"`crmi rollback {deciding}`"
                    if deciding
                    else "`crmi rollback RUN` (`crmi runs list` lists them)"
                )
                + ", then decide it again"
            )
        model: Any = ENTITIES[decision.entity].model
        if record_id is not None:
            record = session.get(model, record_id)
            seen: set[int] = set()
            while (
                record is not None
                and getattr(record, "merged_into_id", None) is not None
                and record.id not in seen
            ):
                seen.add(record.id)
                record = session.get(model, record.merged_into_id)
            if record is None:
                raise DedupError(f"no {decision.entity} {record_id} in the core")
            record_id = int(record.id)
        run = get_or_start_run(session, run_key, project, "steward")
        decision.status = "linked" if record_id is not None else "no_match"
        decision.target_id = record_id
        decision.decided_by = steward
        decision.decided_at = dt.datetime.now(dt.UTC)
        # a link on the record's golden record page, as the workbench's decisions are; "none" on the audit page
        record_event(
            session.connection(), steward, "decide_reference", ip=ip, entity=decision.entity, record_id=record_id,
            summary=(
                f"held name '{decision.name}' ({REFERENCE_PREFIX}{decision_id}) linked to this {decision.entity}: "
                f"its {decision.rows_held} held row(s) load on the next run"
                if record_id is not None
                else f"held name '{decision.name}' ({REFERENCE_PREFIX}{decision_id}) means no {decision.entity}: "
                f"its {decision.rows_held} held row(s) are rejected from the next run on"
            ),
            after={"reference": f"{REFERENCE_PREFIX}{decision_id}", "run": run_key}, channel=channel,
        )  # fmt: skip
        run.status = "succeeded"
        run.finished_at = dt.datetime.now(dt.UTC)
        session.flush()
        session.expunge(decision)
        return decision
