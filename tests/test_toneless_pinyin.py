"""toneless_pinyin: the per-character fast path gives exactly what pypinyin's lazy_pinyin gives."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest
from pypinyin import lazy_pinyin
from pypinyin.constants import PHRASES_DICT, PINYIN_DICT

from integration.dedup.normalize import (
    _pinyin_tables,
    brand_key,
    has_han,
    normalize_company_name,
    toneless_pinyin,
    trade_name,
)

GENERATOR = Path(__file__).resolve().parents[1] / "bench" / "e2e" / "generate_engagement.py"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate_engagement", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_every_character_reads_as_lazy_pinyin_reads_it_alone() -> None:
    different = [
        chr(n) for n in PINYIN_DICT if toneless_pinyin(chr(n)) != lazy_pinyin(chr(n))
    ]  # fmt: skip
    assert different == []


def _read_per_character(text: str) -> bool:
    first, _, odd_phrases, _ = _pinyin_tables()
    return all(c in first or not has_han(c) for c in text) and not any(
        text[i:j] in odd_phrases for i in range(len(text)) for j in range(i + 1, len(text) + 1)
    )


def test_every_phrase_reads_as_lazy_pinyin_reads_it_alone_and_in_a_name() -> None:
    phrases = list(PHRASES_DICT)
    # every phrase alone; a sample in a name, beside Latin text and beside another phrase (a phrase may
    # form across the two)
    texts = [*phrases, *(t for i, p in enumerate(phrases[::10]) for t in (
        f"深圳{p}科技有限公司", f"A1 {p}-x{p[::-1]}", p + phrases[i * 7 % len(phrases)]))]  # fmt: skip
    fast = [t for t in texts if _read_per_character(t)]
    assert len(fast) > len(texts) * 0.4
    assert [t for t in fast if toneless_pinyin(t) != lazy_pinyin(t)] == []
    # the others read through lazy_pinyin itself (a sample: the same call)
    assert [t for t in texts[::31] if t not in fast and toneless_pinyin(t) != lazy_pinyin(t)] == []


def test_a_character_a_phrase_reads_otherwise_reads_per_character_elsewhere() -> None:
    _, odd_chars, odd_phrases, _ = _pinyin_tables()
    assert {"长", "行", "重", "信"} <= odd_chars and {"长城", "银行"} <= odd_phrases
    assert "信息" not in odd_phrases and _read_per_character("腾信信息网络食品")
    assert toneless_pinyin("腾信信息网络食品") == lazy_pinyin("腾信信息网络食品")
    assert toneless_pinyin("长城科技") == ["chang", "cheng", "ke", "ji"]  # 长城 reads as a phrase
    assert toneless_pinyin("重庆银行") == ["chong", "qing", "yin", "hang"]
    assert toneless_pinyin("") == []
    assert toneless_pinyin("Tengda 科技 Co.") == ["Tengda ", "ke", "ji", " Co."]


def test_generated_company_names_read_as_lazy_pinyin_reads_them() -> None:
    gen = _generator()
    engagement = gen.Engagement(None, 13, customers=3000)
    rng = random.Random(13)
    names: set[str] = set()
    for company in engagement.companies:
        names.add(engagement.official_name(company))
        for style in gen.NAME_FORMS:
            names.add(engagement.name_variant(company, rng, style)[0])
    texts = set(names)
    for name in names:
        core = normalize_company_name(name).core
        texts.update((core, trade_name(core)))
    assert len(texts) > 5000
    assert sum(map(_read_per_character, texts)) > len(texts) * 0.9
    assert [t for t in texts if toneless_pinyin(t) != lazy_pinyin(t)] == []
    assert brand_key("腾达科技") == "tengda"


@pytest.mark.parametrize("text", ["华鑫科技", "骅鑫", "乐行", "〇", "呣嗯", "A股", "𠀀达", "ab 1c腾达-x科技"])
def test_odd_texts_read_as_lazy_pinyin_reads_them(text: str) -> None:
    assert toneless_pinyin(text) == lazy_pinyin(text)
