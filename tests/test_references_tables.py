"""The resolver's tables built once for all names and books give what the plain, per-record definitions give:
name variants split once per distinct string, characters numbered once for every book, bounds whose plain
edit distance is left out below a threshold, and the variant checks ``resolve`` folds into one loop."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

import numpy as np

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
        everything = [(known, s) for known, s in names._variants.get(written.brand, ())]
        kept = [
            (known, s) for known, s in everything
            if known.branch == written.branch
            and not (written.region and known.region and known.region != written.region)
        ]  # fmt: skip
        assert sorted(found, key=repr) == sorted(kept, key=repr)
        for known, _ in found:
            assert known.brand == written.brand and known.branch == written.branch
            # resolve's folded loop: the spelling check and closeness as the two functions say
            mine, theirs = spelled(written.core), spelled(known.core)
            same = not (mine and theirs and not (mine.startswith(theirs) or theirs.startswith(mine)))
            assert same == same_company_name(written, known)


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


def test_resolve_groups_variants_by_closeness_as_the_functions_do() -> None:
    records = _records(5)
    names = _resolver(records, {})
    for text in [*NAMES, "深圳腾达", "腾达科技有限公司", "上海华鑫", "广州明汇", "明辉"]:
        written = name_variant(text)
        assert written is not None
        by_closeness: dict[int, set[int]] = defaultdict(set)
        for known, survivor in names._same_brand(written):
            if same_company_name(written, known):
                by_closeness[_closeness(written, known)].add(survivor)
        if not by_closeness:
            continue  # resolve goes on to the match index
        match = names.resolve(text)
        found = set().union(*by_closeness.values())
        if match.record_id is not None:
            assert match.record_id in found
            assert len(found) == 1 or by_closeness[min(by_closeness)] == {match.record_id}
        else:
            assert match.candidate_ids == tuple(sorted(found))


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
        assert shared.exact == alone.exact
        for text in NAMES:
            written = name_variant(text)
            assert written is not None
            trade = written.core if not written.core else canonical_industry(written.core)

            for best in (0.85, 1.0):
                assert shared.worth_scoring(
                    written.brand, trade, trade_name(written.core), best
                ) == alone.worth_scoring(written.brand, trade, trade_name(written.core), best)
