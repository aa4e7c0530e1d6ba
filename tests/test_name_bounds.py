"""The bounds that let ``CustomerNames.among`` skip names: never below the similarity they stand for."""

from __future__ import annotations

import random

import pytest

from integration.dedup.linkage import TRADE_NAME_ONLY, variant_similarity
from integration.dedup.normalize import (
    _shapes,
    alike_tokens,
    canonical_industry,
    look_alike,
    sound_alike,
    trade_name,
)
from integration.dedup.references import _Strings

SLIPS = "华骅新鑫馨天夭己已未末土士达腾科技贸易商联连大捷杰"
CORES = ["华鑫科技", "骅鑫科技", "天成贸易", "夭成商贸", "佳晨自动化设备", "佳河自动化设备", "腾达", "腾达科技",
         "腾科技", "源祥贸易", "源祥", "联大网络", "连达网络", "卓泰微电子", "卓泰众电子", "ABC Trading"]  # fmt: skip


def test_alike_tokens_meet_exactly_when_characters_look_or_sound_alike() -> None:
    chars = [*list(_shapes())[:1500], *SLIPS, "a", "B", "7"]
    random.seed(7)
    pairs = [(random.choice(chars), random.choice(chars)) for _ in range(50_000)]
    pairs += [(a, b) for a in SLIPS for b in SLIPS]
    for left, right in pairs:
        shares = bool(alike_tokens(left) & alike_tokens(right))
        assert shares == (look_alike(left, right) or sound_alike(left, right)), (left, right)


def _slipped(core: str, rng: random.Random) -> str:
    """The core with one slip: a character replaced, dropped, doubled or two swapped."""
    i = rng.randrange(len(core))
    kind = rng.randrange(4)
    if kind == 0:
        return core[:i] + rng.choice(SLIPS) + core[i + 1 :]
    if kind == 1 and len(core) > 2:
        return core[:i] + core[i + 1 :]
    if kind == 2:
        return core[:i] + core[i] + core[i:]
    if i + 1 < len(core):
        return core[:i] + core[i + 1] + core[i] + core[i + 2 :]
    return core + rng.choice(SLIPS)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_similarity_bounds_never_fall_below_the_similarity(seed: int) -> None:
    rng = random.Random(seed)
    names = [canonical_industry(c) for c in CORES]
    names += [canonical_industry(_slipped(_slipped(rng.choice(CORES), rng), rng)) for _ in range(300)]
    strings = _Strings(names)
    for written in names[:120]:
        bounds = strings.bounds(written)
        for known, bound in zip(names, bounds, strict=True):
            similarity = variant_similarity(written, known)
            if similarity == TRADE_NAME_ONLY and (
                trade_name(written) == known or trade_name(known) == written
            ):
                continue  # the one case decided by equality, kept by the book before any bound
            assert bound >= similarity - 1e-9, (written, known, bound, similarity)
    # and the bounds do leave names out: a different trade name in the same trade is not scored
    far = strings.bounds(canonical_industry("华鑫科技"))[names.index(canonical_industry("卓泰微电子"))]
    assert far < 0.75
