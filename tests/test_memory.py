"""Giving memory back between steps: only once the process is large enough for it to matter."""

from __future__ import annotations

import gc

import pytest

from integration import memory


def test_memory_is_given_back_only_above_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    collections: list[int] = []
    monkeypatch.setattr(gc, "collect", lambda *args: collections.append(1) or 0)
    assert memory.resident_bytes() > 0  # Linux: read from /proc
    memory.release_memory(above_bytes=memory.resident_bytes() * 4)
    assert collections == []
    memory.release_memory(above_bytes=0)
    assert collections == [1]
