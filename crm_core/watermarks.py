"""Incremental extraction cursors: where the last committed load of a (source, stream) stopped.

A watermark is the largest cursor value loaded plus the keys of the rows that carry exactly that
value. The next read asks for ``cursor >= value`` (rows written later with the same timestamp are not
lost) and drops the rows whose key it already has (rows at the boundary are not read twice). It is
saved in the load's transaction, so a failed load leaves it where it was.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from crm_core.models import Watermark


def plain_cursor(value: Any) -> Any:
    """Return a JSON-able, comparable Python value for a cursor (pandas Timestamps become datetimes)."""
    if hasattr(value, "to_pydatetime"):
        return value.to_pydatetime()
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        return value.item()
    return value


@dataclass(frozen=True)
class CursorState:
    """The highest cursor value loaded and the keys of the rows at exactly that value."""

    value: Any
    keys: frozenset[str]

    def to_json(self) -> str:
        """Serialize, keeping the value's type (datetime, date, int, float or text)."""
        value = plain_cursor(self.value)
        kind: str
        text: str | int | float
        if isinstance(value, dt.datetime):
            kind, text = "datetime", value.isoformat()
        elif isinstance(value, dt.date):
            kind, text = "date", value.isoformat()
        elif isinstance(value, bool | int):
            kind, text = "int", int(value)
        elif isinstance(value, float):
            kind, text = "float", value
        else:
            kind, text = "text", str(value)
        return json.dumps({"type": kind, "value": text, "keys": sorted(self.keys)}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> CursorState:
        """Parse what ``to_json`` wrote."""
        data = json.loads(text)
        raw, kind = data["value"], data["type"]
        value: Any
        if kind == "datetime":
            value = dt.datetime.fromisoformat(raw)
        elif kind == "date":
            value = dt.date.fromisoformat(raw)
        elif kind == "int":
            value = int(raw)
        elif kind == "float":
            value = float(raw)
        else:
            value = str(raw)
        return cls(value, frozenset(data["keys"]))

    def describe(self) -> str:
        """Return a short human form, e.g. ``2025-06-01 09:00:00 (2 rows at this value)``."""
        return f"{plain_cursor(self.value)} ({len(self.keys)} row(s) at this value)"


def advance(previous: CursorState | None, cursors: Sequence[Any], keys: Sequence[str]) -> CursorState | None:
    """Return the watermark after loading rows with these cursor values and keys."""
    values = [plain_cursor(v) for v in cursors if v is not None and v == v]
    if not values:
        return previous
    top = max(values)
    at_top = {k for v, k in zip(cursors, keys, strict=True) if plain_cursor(v) == top}
    if previous is not None and plain_cursor(previous.value) == top:
        at_top |= previous.keys
    if previous is not None and plain_cursor(previous.value) > top:
        return previous
    return CursorState(top, frozenset(at_top))


def read_watermark(session: Session, source: str, stream: str) -> CursorState | None:
    """Return the committed watermark of a stream, or None before its first load."""
    row = session.get(Watermark, (source, stream))
    return CursorState.from_json(row.cursor_value) if row is not None and row.cursor_value else None


def save_watermark(
    session: Session, source: str, stream: str, state: CursorState, run_id: int | None
) -> None:
    """Store a stream's watermark (call inside the load's transaction)."""
    row = session.get(Watermark, (source, stream))
    if row is None:
        session.add(Watermark(source=source, stream=stream, cursor_value=state.to_json(), load_run_id=run_id))
    elif row.cursor_value != state.to_json():  # unchanged: leave it (and its run) alone
        row.cursor_value = state.to_json()
        row.load_run_id = run_id


def all_watermarks(session: Session) -> dict[tuple[str, str], CursorState]:
    """Return every stream's watermark."""
    return {
        (w.source, w.stream): CursorState.from_json(w.cursor_value)
        for w in session.scalars(select(Watermark))
        if w.cursor_value
    }
