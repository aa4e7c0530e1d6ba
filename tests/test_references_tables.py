"""The resolver's tables built once for all names and books give what the plain, per-record definitions give:
name variants split once per distinct string, characters numbered once for every book, bounds whose plain
edit distance is left out below a threshold, and the variant checks ``resolve`` folds into one loop."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

import numpy as np

from crm_core.loading import NameMatch
from integration.dedup.normalize import canonical_industry, has_han, trade_name
from integration.dedup.references import (
    PREFIX_ONLY,
    SAME_CHARACTERS,
    SAME_SOUND,
    CustomerNames,
    NameVariant,
    WrittenName,
    _Alphabet,
    _Book,
    _CoreFacts,
    _Strings,
    name_variant,
    same_company_name,
    spelled,
)

NAMES = ["深圳市腾达科技有限公司", "北京腾达科技有限公司", "腾达科技", "腾达技术", "Shenzhen Tengda Technology Co., Ltd.",
         "上海华鑫贸易有限公司", "华鑫商贸", "骅鑫科技", "上海骅鑫科技有限公司", "深圳腾达科技有限公司北京分公司",
         "成都恒信机械设备有限公司", "恒信环保", "武汉恒信环保工程有限公司", "明汇软件", "明辉科技", "广州明汇软件有限公司",
         "纪鼎科技", "纪鼎技", "江软件", "江科软件", "Huaxin Trading", "长城电子", "长成电子", "腾达"]  # fmt: skip


class _Rows:
    """A session whose every query returns the same rows (the customer records _variants reads)."""

    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self.rows = rows

    def execute(self, _query: Any) -> list[tuple[Any, ...]]:
        return self.rows


def _records(seed: int) -> list[tuple[int, str | None, str | None, str | None]]:
    """Customer records (id, name, short name, English name) sharing names and short names."""
    rng = random.Random(seed)
    records = []
    for record_id in range(1, 400):
        name = rng.choice(NAMES)
        short = rng.choice([None, None, "", *NAMES])
        english = rng.choice([None, None, "Tengda Technology", "Huaxin Trading", *NAMES])
        records.append((record_id, name if rng.random() > 0.05 else None, short, english))
    return records


def _per_record_variants(
    records: list[tuple[int, str | None, str | None, str | None]], survivor: dict[int, int]
) -> dict[str, list[tuple[NameVariant, int]]]:
    """The variants as the resolver read them record by record (dataclasses.replace per short name)."""
    from dataclasses import replace

    by_brand: dict[str, list[tuple[NameVariant, int]]] = defaultdict(list)
    for record_id, name, *other_names in records:
        full = name_variant(name) if name else None
        for variant in [full] + [name_variant(other) if other else None for other in other_names]:
            if variant is None:
                continue
            if variant.region is None and full is not None:
                variant = replace(variant, region=full.region)
            by_brand[variant.brand].append((variant, survivor.get(record_id, record_id)))
    return by_brand


def _resolver(records: list[tuple[int, str | None, str | None, str | None]], survivor: dict[int, int]) -> Any:
    names = CustomerNames(_Rows(records))  # type: ignore[arg-type]
    names.__dict__["_survivor"] = survivor
    names.__dict__["_golden_names"] = {}
    return names


def test_variants_split_once_per_distinct_string_are_the_per_record_variants() -> None:
    for seed in range(3):
        records = _records(seed)
        survivor = {i: i - i % 3 or i for i, *_ in records}
        variants = _resolver(records, survivor)._variants
        expected = _per_record_variants(records, survivor)
        assert list(variants) == list(expected)  # same trade names, in the same order
        assert variants == expected  # same variants, regions and survivors, in the same order


def test_same_brand_variants_share_trade_name_branch_and_a_written_region() -> None:
    """What lets resolve test a variant by its spelling only (same_company_name's other checks hold)."""
    records = _records(4)
    names = _resolver(records, {})
    for text in [*NAMES, "深圳腾达", "腾达科技有限公司", "北京腾达", "上海华鑫", "骅鑫", "明汇"]:
        written = name_variant(text)
        assert written is not None
        found = names._same_brand(written)
        kept = _same_place(names, written)
        assert sorted(found, key=repr) == sorted(kept, key=repr)
        for known, _ in found:
            assert known.brand == written.brand and known.branch == written.branch
            # resolve's folded loop: the spelling check and closeness as the two functions say
            mine, theirs = spelled(written.core), spelled(known.core)
            same = not (mine and theirs and not (mine.startswith(theirs) or theirs.startswith(mine)))
            assert same == same_company_name(written, known)


def _same_place(names: Any, written: NameVariant) -> list[tuple[NameVariant, int]]:
    """The variants same_company_name's place checks keep: same trade name and branch, no other region."""
    return [
        (known, s) for known, s in names._variants.get(written.brand, ())
        if known.branch == written.branch
        and not (written.region and known.region and known.region != written.region)
    ]  # fmt: skip


def _closeness(written: NameVariant, known: NameVariant) -> int:
    """Closeness as the module doc defines it, written out independently of WrittenName."""
    mine, theirs = canonical_industry(written.core), canonical_industry(known.core)
    if has_han(mine) and mine == theirs:
        return SAME_CHARACTERS
    if spelled(written.core) is not None and spelled(written.core) == spelled(known.core):
        return SAME_SOUND
    return PREFIX_ONLY


def test_closeness_of_written_names() -> None:
    """Same characters (industry synonyms unified), same sound, a short form, another name."""
    cases = [
        ("明汇科技有限公司", "明汇科技有限公司", SAME_CHARACTERS),
        ("明汇商贸有限公司", "明汇贸易有限公司", SAME_CHARACTERS),
        ("明辉科技有限公司", "明汇科技有限公司", SAME_SOUND),
        ("明汇", "明汇科技有限公司", PREFIX_ONLY),
        ("Minghui Technology Co., Ltd.", "明汇科技有限公司", PREFIX_ONLY),
        ("明汇科技有限公司", "明汇建设工程有限公司", None),
    ]
    for written_text, known_text, expected in cases:
        written, known = name_variant(written_text), name_variant(known_text)
        assert written is not None and known is not None
        assert WrittenName(written).closeness_to(known) == expected, (written_text, known_text)
        if expected is not None:
            assert _closeness(written, known) == expected


def _resolvers() -> list[Any]:
    """Resolvers over the hand-written names and over generated ones (regions, branches, Latin names)."""
    generated = [_generated_records(seed) for seed in range(3)]
    return [
        _resolver(_records(5), {}),
        *(_resolver(r, {i: s.get(i, i) for i, *_ in r}) for r, s in generated),
    ]


def test_resolve_groups_variants_by_closeness_as_the_functions_do() -> None:
    """resolve compares each name core of a place once: what it finds is what every variant gives."""
    rng = random.Random(11)
    texts = [*NAMES, "深圳腾达", "腾达科技有限公司", "上海华鑫", "广州明汇", "明辉", "北京明辉科技有限公司上海分公司",
             "Minghui Technology", "Shenzhen Tengda Technology Co., Ltd.", "成都腾达", "骅鑫贸易", "长成电子有限公司"]  # fmt: skip
    texts += [_generated_name(rng) for _ in range(150)]
    for names in _resolvers():
        resolved = 0
        for text in texts:
            written = name_variant(text)
            assert written is not None
            _check_resolve(names, text, written)
            resolved += bool(_same_place(names, written))
        assert resolved > len(texts) // 3  # most names had variants to compare


def _check_resolve(names: Any, text: str, written: NameVariant) -> None:
    """resolve's name-variant step gives what same_company_name and _closeness say of every variant."""
    by_closeness: dict[int, set[int]] = defaultdict(set)
    for known, survivor in _same_place(names, written):
        if same_company_name(written, known):
            by_closeness[_closeness(written, known)].add(survivor)
    if not by_closeness:
        return  # resolve goes on to the match index
    match = names.resolve(text)
    found = set().union(*by_closeness.values())
    closest = by_closeness[min(by_closeness)]
    picks = trade_name(written.core) != canonical_industry(written.core)
    if picks and len(found) > 1 and len(closest) == 1 and min(by_closeness) == SAME_CHARACTERS:
        assert match == NameMatch(next(iter(closest)), method="name variant"), text
    elif len(found) == 1:
        assert match == NameMatch(next(iter(found)), method="name variant"), text
    else:
        assert match.record_id is None and match.method == "name variant", text
        assert match.candidate_ids == tuple(sorted(found)), text


def _texts(seed: int) -> list[str]:
    rng = random.Random(seed)
    cores = [name_variant(n).core for n in NAMES if name_variant(n) is not None]  # type: ignore[union-attr]
    slips = "华骅新鑫馨天夭己已未末土士达腾科技贸易商联连大捷杰长城成"
    texts = []
    for _ in range(300):
        core = list(rng.choice(cores))
        core[rng.randrange(len(core))] = rng.choice(slips)
        texts.append(canonical_industry("".join(core)))
    return texts


def test_bounds_do_not_depend_on_a_shared_alphabet_or_a_threshold() -> None:
    for seed in range(3):
        texts = _texts(seed)
        alone = _Strings(texts)
        alphabet = _Alphabet()
        _Strings(_texts(seed + 10), alphabet)  # characters numbered before ...
        shared = _Strings(texts, alphabet)
        _Strings(["鑫鑫", "zz", "龘"], alphabet)  # ... and after
        for written in [*texts[:60], "腾达", "骅鑫科技", "龘龘", "zz"]:
            expected = alone.bounds(written)
            assert np.array_equal(shared.bounds(written), expected)
            for at_least in (0.75 - 1e-9, 0.9 - 1e-9):
                cut = shared.bounds(written, at_least)
                reach = expected >= at_least
                assert np.array_equal(cut >= at_least, reach)
                assert np.array_equal(cut[reach], expected[reach])
                assert np.all(cut >= expected)  # still a bound below the threshold


def test_books_sharing_core_facts_equal_books_of_their_own() -> None:
    rng = random.Random(9)
    variants = [v for n in NAMES if (v := name_variant(n)) is not None]
    facts = _CoreFacts(_Alphabet())
    for _ in range(5):
        chosen = rng.sample(variants, 12)
        survivors = list(range(len(chosen)))
        shared, alone = _Book(survivors, chosen, facts), _Book(survivors, chosen)
        assert shared.raw_trades == alone.raw_trades and shared.industries == alone.industries
        assert _exact_of(shared, facts) == _exact_of(alone, _alone_facts(alone))
        assert _exact_of(shared, facts) == _tuple_keyed_exact(shared, facts)
        for text in NAMES:
            written = name_variant(text)
            assert written is not None
            trade = written.core if not written.core else canonical_industry(written.core)

            for best in (0.85, 1.0):
                assert shared.worth_scoring(
                    written.brand, trade, trade_name(written.core), best
                ) == alone.worth_scoring(written.brand, trade, trade_name(written.core), best)


# --------------------------------------------------------------------------- the book's tables, built faster
REGIONS = ["深圳", "北京", "上海", "成都", "武汉", None]
TRADES = ["腾达", "华鑫", "骅鑫", "明汇", "明辉", "恒信", "纪鼎", "长城", "长成", "江科", "宇协", "博中"]
INDUSTRIES = ["科技", "技术", "贸易", "商贸", "机械设备", "环保工程", "软件", "电子", ""]
LATIN = {"腾达": "Tengda", "华鑫": "Huaxin", "明汇": "Minghui", "恒信": "Hengxin"}


def _generated_name(rng: random.Random) -> str:
    """A company name as sources write them: region before or in brackets, 有限公司 or not, a branch, Latin."""
    trade, industry, region = rng.choice(TRADES), rng.choice(INDUSTRIES), rng.choice(REGIONS)
    form = rng.randrange(6)
    if form == 0 and trade in LATIN:
        return f"{'Shenzhen ' if region else ''}{LATIN[trade]} {'Technology ' if industry else ''}Co., Ltd."
    legal = rng.choice(["有限公司", "有限责任公司", "股份有限公司", ""])
    if form == 1 and region:
        return f"{trade}{industry}（{region}）{legal}"
    if form == 2 and region:
        return f"{region}{trade}{industry}{legal or '有限公司'}{rng.choice(['北京', '广州'])}分公司"
    return f"{region or ''}{rng.choice(['市', ''])}{trade}{industry}{legal}"


def _generated_records(
    seed: int,
) -> tuple[list[tuple[int, str | None, str | None, str | None]], dict[int, int]]:
    """Customer records with short and English names, a third of them merged into another."""
    rng = random.Random(seed)
    records = []
    for record_id in range(1, 300):
        short = rng.choice([None, rng.choice(TRADES), rng.choice(TRADES) + rng.choice(INDUSTRIES)])
        english = rng.choice([None, None, f"{rng.choice(list(LATIN.values()))} Trading"])
        records.append((record_id, _generated_name(rng), short, english))
    survivor = {i: rng.randrange(1, i) for i, *_ in records if i > 1 and rng.random() < 0.3}
    return records, survivor


class _PairTableStrings(_Strings):
    """_Strings with the holders of each character built as before: distinct (name, character) pairs."""

    def __init__(self, texts: list[str], alphabet: _Alphabet | None = None, read: Any = None) -> None:
        super().__init__(texts, alphabet, read)
        size = self._size
        distinct = np.unique(self._entry_of * size + self._char_of)
        pair_entry, pair_char = np.divmod(distinct, size)
        order = np.argsort(pair_char, kind="stable")
        self._entries_by_char = pair_entry[order]
        self._char_start = np.searchsorted(pair_char[order], np.arange(size + 1))


def _tuple_keyed_exact(book: _Book, facts: _CoreFacts) -> dict[str, dict[str, list[int]]]:
    """The book's exact keys as they were built before, one (kind, value) key per variant and kind."""
    exact: dict[tuple[str, str], list[int]] = defaultdict(list)
    for entry, variant in enumerate(book.variants):
        core, _, _, trade, core_trade, trade_trade, *_ = facts[variant.core]
        for key in (("brand", variant.brand), ("core", core), ("core_trade", core_trade), ("trade", trade),
                    ("trade_trade", trade_trade)):  # fmt: skip
            exact[key].append(entry)
    nested: dict[str, dict[str, list[int]]] = {kind: {} for kind in book.EXACT_KINDS}
    for (kind, value), entries in exact.items():
        nested[kind][value] = entries
    return nested


def _exact_of(book: _Book, facts: _CoreFacts) -> dict[str, dict[str, list[int]]]:
    """The book's exact keys as :meth:`_Book.entries` finds them, for every value of a kind it holds."""
    values = _tuple_keyed_exact(book, facts)
    found = {
        kind: {value: book.entries(kind, value).tolist() for value in held} for kind, held in values.items()
    }
    for kind in book.EXACT_KINDS:  # a value no entry holds: none, known to the codes or not
        assert book.entries(kind, "龘龘科技").tolist() == []
        for other in values["brand" if kind != "brand" else "core"]:
            if other not in values[kind]:
                assert book.entries(kind, other).tolist() == []
    return found


def _alone_facts(book: _Book) -> _CoreFacts:
    """The facts a book built without shared ones made for itself (its codes)."""
    facts = _CoreFacts(_Alphabet())
    facts.codes = book._codes
    return facts


class _DictKeyedBook(_Book):
    """A book finding a key's entries as it did before: in a dict of lists per kind, and the raw trade names
    of every length grouped when built."""

    def __init__(self, survivors: list[int], variants: list[NameVariant], facts: _CoreFacts) -> None:
        super().__init__(survivors, variants, facts)
        self.exact = _tuple_keyed_exact(self, facts)
        by_length: dict[int, list[int]] = defaultdict(list)
        for entry, trade in enumerate(self.raw_trades):
            by_length[len(trade)].append(entry)
        self.eager_by_length = {
            length: (np.array(held, dtype=np.int64), [self.raw_trades[i] for i in held])
            for length, held in by_length.items()
        }

    def entries(self, kind: str, value: str) -> np.ndarray:
        """Return the entries of a key from the dict of lists."""
        return np.array(self.exact[kind].get(value, []), dtype=np.int64)

    def _raw_of_length(self, length: int) -> tuple[np.ndarray, list[str]]:
        """Return the names of a length from the groups built with the book."""
        return self.eager_by_length.get(length, (np.zeros(0, dtype=np.int64), []))


def test_the_holders_of_each_character_are_those_of_the_distinct_pairs() -> None:
    """Holders read from one sort of every (character, name) position mark the names the pairs marked."""
    for seed in range(3):
        texts = [*_texts(seed), "鑫鑫鑫", "", "zz", "腾达腾达"]
        alphabet = _Alphabet()
        _Strings(_texts(seed + 20), alphabet)  # characters numbered before
        fast, pairs = _Strings(texts, alphabet), _PairTableStrings(texts, alphabet)
        for char in {*"".join(texts), "龘", "骅"}:
            (fast_alike, fast_holding, fast_numbers), (alike, holding, numbers) = (
                fast._holders(char),
                pairs._holders(char),
            )
            assert np.array_equal(fast_alike, alike) and fast_numbers == numbers
            assert sorted(set(fast_holding.tolist())) == holding.tolist()
        for written in [*texts[:40], "腾达", "龘龘", "zz"]:
            assert np.array_equal(fast.bounds(written), pairs.bounds(written))
            assert np.array_equal(fast.bounds(written, 0.75), pairs.bounds(written, 0.75))


def test_books_of_generated_customers_pick_as_the_tables_built_before() -> None:
    """Exact keys and the variants worth scoring of every book, against the tables as they were built."""
    for seed in range(3):
        records, survivor = _generated_records(seed)
        names = _resolver(records, {i: survivor.get(i, i) for i, *_ in records})
        golden = sorted(names._variants_of)
        rng = random.Random(seed)
        for _ in range(6):
            ids = rng.sample(golden, min(40, len(golden)))
            book = names._book(ids, None)
            assert _exact_of(book, names._core_facts) == _tuple_keyed_exact(book, names._core_facts)
            facts = names._core_facts
            before = _DictKeyedBook(book.survivors, book.variants, facts)
            before.cores = _PairTableStrings([facts[v.core][0] for v in book.variants], facts.alphabet)
            before.trades = _PairTableStrings([facts[v.core][3] for v in book.variants], facts.alphabet)
            for length in {*before.eager_by_length, 0, 99}:  # the names of a length, found when asked
                held, texts = book._raw_of_length(length)
                eager_held, eager_texts = before._raw_of_length(length)
                assert held.tolist() == eager_held.tolist() and texts == eager_texts
            scored = 0
            for _ in range(15):
                written = name_variant(_generated_name(rng))
                if written is None:
                    continue
                canonical, trade = canonical_industry(written.core), trade_name(written.core)
                for best in (0.85, 1.0):
                    worth = book.worth_scoring(written.brand, canonical, trade, best)
                    assert worth == before.worth_scoring(written.brand, canonical, trade, best)
                    scored += len(worth[0])
            assert scored  # the books held names worth scoring
