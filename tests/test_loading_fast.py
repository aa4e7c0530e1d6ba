"""The loader's fast path (rows decided column by column) writes exactly what one _upsert per row writes."""

from __future__ import annotations

import datetime as dt
import random
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from crm_core import loading
from crm_core.db import make_engine, upgrade
from crm_core.loading import Batch, Lookup, SourceStats
from crm_core.models import Base
from crm_core.runs import rollback_run
from tests.conftest import PG_URL, reset_postgres, server_or_skip
from tests.test_loading import CUSTOMER_RULES, batch, load
from tests.test_runs import content

NAMES = ["甲", "乙", "丙", "丁", "戊", "己", "庚", "辛"]
CODES = ["91440300708461136T", "91110000600037341L", "91310000MA1FL0000X", None, None]
STAGES = ["initial_contact", "needs_analysis", "proposal", "won", "no_such_stage"]


def _customers(rng: random.Random, source: str, count: int, keys: int) -> list[dict[str, Any]]:
    """Rows with repeated keys, shared names and codes (exact-key matches, conflicts) and parents."""
    rows = []
    for _ in range(count):
        key = f"{source}{rng.randrange(keys)}"
        rows.append({
            "_external_key": key, "name": f"{rng.choice(NAMES)}{rng.randrange(6)}有限公司",
            "credit_code": rng.choice(CODES), "phone": rng.choice([None, f"+86755{rng.randrange(10**8):08d}"]),
            "city": rng.choice([None, "深圳", "北京"]), "is_branch": rng.choice([None, True, False]),
            "parent": rng.choice([None, None, None, f"{source}{rng.randrange(keys)}", f"{source}missing"]),
        })  # fmt: skip
    return rows


def _opportunities(rng: random.Random, count: int, keys: int) -> list[dict[str, Any]]:
    """Rows referencing customers (some unknown: rejected), with amounts and stages (some unknown)."""
    return [
        {
            "_external_key": f"O{rng.randrange(keys)}",
            "name": f"商机{rng.randrange(4)}",
            "customer": f"erp{rng.randrange(30)}",
            "stage": rng.choice(STAGES),
            "amount": rng.choice([None, Decimal(rng.randrange(1, 10**6)).scaleb(-2)]),
            "currency": rng.choice([None, "CNY", "USD"]),
        }
        for _ in range(count)
    ]


def _contacts(rng: random.Random, count: int, keys: int) -> list[dict[str, Any]]:
    return [
        {
            "_external_key": f"P{rng.randrange(keys)}",
            "name": f"联系人{rng.randrange(5)}",
            "customer": rng.choice([f"erp{rng.randrange(30)}", None]),
            "is_primary": rng.choice([None, True]),
            "mobile": rng.choice([None, f"+86138{rng.randrange(10**8):08d}"]),
        }
        for _ in range(count)
    ]


def _again(
    rng: random.Random, rows: list[dict[str, Any]], more: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The rows of the first run again, a few with one value changed, and ``more`` new ones among them."""
    out = []
    for row in rows:
        row = dict(row)
        if rng.random() < 0.2:
            name = rng.choice([k for k in row if k != "_external_key"])
            row[name] = rng.choice([None, *(r[name] for r in more)]) if more else None
        out.append(row)
    for row in more:
        out.insert(rng.randrange(len(out) + 1), row)
    return out


def _loads(seed: int) -> list[tuple[str, str, list[Batch], Any]]:
    """Two runs: new keys first, then the same keys unchanged, changed, repeated, and new ones."""
    rng = random.Random(seed)
    ref = {"customer": Lookup(), "parent": Lookup()}
    first = {
        "erp": _customers(rng, "erp", 40, 30), "crm": _customers(rng, "crm", 30, 25),
        "opportunity": _opportunities(rng, 40, 30), "contact": _contacts(rng, 40, 30),
    }  # fmt: skip
    second = {
        "erp": _again(rng, first["erp"], _customers(rng, "erp", 8, 40)),
        "crm": _again(rng, first["crm"], _customers(rng, "crm", 8, 35)),
        "opportunity": _again(rng, first["opportunity"], _opportunities(rng, 8, 40)),
        "contact": _again(rng, first["contact"], _contacts(rng, 8, 40)),
    }
    runs = []
    for run, rows in (("r1", first), ("r2", second)):
        runs += [
            (
                run,
                "customer",
                [batch("erp", rows["erp"], ref), batch("crm", rows["crm"], ref)],
                CUSTOMER_RULES,
            ),
            (run, "opportunity", [batch("erp", rows["opportunity"], ref)], None),
            (run, "contact", [batch("erp", rows["contact"], ref)], None),
        ]
    return runs


def _tables(engine: sa.Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every table row by row, ids included; only the clock's values (``*_at``, also in the journal) left out."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items() if not k.endswith("_at")}
        return value

    with engine.connect() as connection:
        return {
            table.name: sorted(
                (
                    tuple(
                        (c.name, repr(plain(row[c.name])))
                        for c in table.columns
                        if not c.name.endswith("_at") and c.name not in ("pid", "host")
                    )
                    for row in connection.execute(sa.select(table)).mappings()
                ),
                key=repr,
            )
            for table in Base.metadata.sorted_tables
        }


def _load_all(url: str, seed: int) -> tuple[list[Any], list[Any]]:
    """Load the runs into an empty core; return stats and tables after each step, and after rolling back."""
    engine = make_engine(url)
    upgrade(engine)
    empty = content(engine)
    snapshots: list[Any] = []
    stats: list[Any] = []
    for run, entity, batches, rules in _loads(seed):
        result: list[SourceStats] = load(engine, run, entity, batches, rules)
        stats.append([s.as_dict() for s in result])
        snapshots.append(_tables(engine))
    rollback_run(engine, "r2", allow_running=True)
    snapshots.append(_tables(engine))
    rollback_run(engine, "r1", allow_running=True)
    assert content(engine) == empty  # the journal undoes the fast path's rows exactly
    engine.dispose()
    return stats, snapshots


def _fresh(core: str, tmp_path: Path) -> str:
    if core == "sqlite":
        return f"sqlite:///{tmp_path / f'core-{uuid.uuid4().hex[:8]}.sqlite'}"
    engine = server_or_skip(PG_URL, "PostgreSQL")
    reset_postgres(engine)  # the sequences start again: both paths draw the same ids
    engine.dispose()
    return PG_URL


# (shortest run decided column-wise, rows left per row before a chunk's new rows are no longer tried)
TUNINGS = [(8, 800), (1, 800), (2, 0)]


@pytest.mark.parametrize("tuning", TUNINGS, ids=["default", "every_run", "give_up"])
@pytest.mark.parametrize("chunk_rows", [7, 20_000])
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("core", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_fast_path_writes_what_row_by_row_writes(
    core: str,
    seed: int,
    chunk_rows: int,
    tuning: tuple[int, int],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(loading, "CHUNK_ROWS", chunk_rows)
    monkeypatch.setattr(loading, "_FAST_RUN_MIN", tuning[0])
    monkeypatch.setattr(loading, "_FAST_GIVE_UP", tuning[1])
    monkeypatch.setattr(loading, "_ROW_BY_ROW", True)
    expected_stats, expected = _load_all(_fresh(core, tmp_path), seed)
    monkeypatch.setattr(loading, "_ROW_BY_ROW", False)
    stats, snapshots = _load_all(_fresh(core, tmp_path), seed)
    assert stats == expected_stats
    for step, (got, want) in enumerate(zip(snapshots, expected, strict=True)):
        assert got == want, f"step {step}"
    outcomes = {k for step in expected_stats for s in step for k in ("inserted", "merged", "unchanged",
                "updated", "rejected") if s[k]}  # fmt: skip
    assert outcomes == {"inserted", "merged", "unchanged", "updated", "rejected"}  # every case was loaded


def test_fast_path_draws_postgres_ids_as_take_does() -> None:
    """take_many hands out the ids one take per row would, block boundaries included."""

    class Fake(loading._IdAllocator):
        def __init__(self) -> None:
            self._free, self._next, self._postgres, self.drawn = [], None, True, 0
            self.blocks: list[int] = []

        def _draw(self, expected: int) -> None:
            block = max(16, min(expected, loading.CHUNK_ROWS))
            self.blocks.append(block)
            self._free = sorted(range(self.drawn + 1, self.drawn + block + 1), reverse=True)
            self.drawn += block

    expected = [40, 39, 20, 3, 2, 1] * 5 + [100, 17]
    one, many = Fake(), Fake()
    assert many.take_many(expected[:7]) + many.take_many(expected[7:]) == [one.take(e) for e in expected]
    assert many.blocks == one.blocks


@pytest.mark.postgres
def test_copy_writes_dates_as_psycopg_formats_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """bulk_insert formats each distinct date and datetime once for COPY: the rows read back are the ones
    psycopg's own formatting of each value stores, in every zone and for naive values, in both kinds of column."""
    from crm_core import journal

    engine = server_or_skip(PG_URL, "PostgreSQL")
    reset_postgres(engine)
    meta = sa.MetaData()

    def table(name: str) -> sa.Table:
        return sa.Table(name, meta, sa.Column("id", sa.Integer, primary_key=True),
                        sa.Column("aware", sa.DateTime(timezone=True)), sa.Column("naive", sa.DateTime()),
                        sa.Column("day", sa.Date()), sa.Column("note", sa.String(20)))  # fmt: skip

    once, each = table("once"), table("each")
    meta.create_all(engine)
    east = dt.timezone(dt.timedelta(hours=8))
    moments = [dt.datetime(2025, 3, 24, 0, 0, tzinfo=east), dt.datetime(2025, 3, 23, 16, 0, tzinfo=dt.UTC),
               dt.datetime(2025, 3, 24, 0, 0), dt.datetime(1, 1, 1), dt.datetime(2025, 3, 24, 0, 0, 0, 1, tzinfo=dt.UTC),
               None]  # fmt: skip
    rows = [
        {"id": i, "aware": moments[i % 6], "naive": moments[(i + 1) % 6], "day": dt.date(2025, 1, 1 + i % 3),
         "note": "\\t\n" if i % 2 else None}
        for i in range(30)
    ]  # fmt: skip
    with engine.begin() as connection:
        connection.execute(sa.text("SET TIME ZONE 'Asia/Shanghai'"))
        journal.bulk_insert(connection, once, rows)
        with monkeypatch.context() as patched:
            patched.setattr(
                journal, "_dates_as_text", lambda driver, rows: rows
            )  # psycopg formats each value
            journal.bulk_insert(connection, each, rows)
        got = connection.execute(sa.select(once).order_by(once.c.id)).all()
        want = connection.execute(sa.select(each).order_by(each.c.id)).all()
    engine.dispose()
    assert got == want
    assert [row[1] for row in got[:2]] == moments[:2]  # the same instant, whichever zone it was written in
