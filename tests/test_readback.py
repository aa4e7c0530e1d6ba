"""The check after a load reads back what it committed: every row read is in the crosswalk or quarantined,
and a sample of created records holds the mapped values. It reads a system's crosswalk at once (or by key)
and compares rows as arrays; it must still find what the sets of tuples found."""

from __future__ import annotations

import dataclasses
import pickle
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from crm_core.db import make_engine, session_factory, upgrade
from crm_core.loading import PieceHead, StoredPieces
from crm_core.models import Customer, ExternalId, LoadRun
from integration import readback
from integration.pipeline import Migration, extract, load, stage, verify_pieces
from integration.readback import unaccounted
from integration.spill import SpillFolder, StoredFrames


def _as_sets(
    read: list[tuple[str, str]], accounted: list[list[tuple[str, str]]]
) -> tuple[int, list[tuple[str, str]]]:
    """What the check found with sets of tuples (before it compared arrays)."""
    left = set(read)
    for pairs in accounted:
        left -= set(pairs)
    return len(set(read)), sorted(left)


def _arrays(pairs: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.array([p[0] for p in pairs], dtype=object).reshape(-1),
        np.array([p[1] for p in pairs], dtype=object).reshape(-1),
    )


def test_unaccounted_rows_are_those_the_sets_of_tuples_leave() -> None:
    picker = random.Random(7)
    texts = ["", "None", "nan", "a", "A", "a ", "客户.xlsx#Sheet1", "1", "01", "1.0", "x\x00y", "é", "é"]

    def pairs(count: int) -> list[tuple[str, str]]:
        return [(picker.choice(texts[:6]), picker.choice(texts)) for _ in range(count)]

    for _ in range(200):
        read, landed, quarantined = pairs(picker.randint(0, 40)), pairs(picker.randint(0, 40)), pairs(3)
        got = unaccounted(_arrays(read), [_arrays(landed), _arrays(quarantined)])
        assert got == _as_sets(read, [landed, quarantined])


def test_texts_equal_up_to_a_nul_are_told_apart() -> None:
    """A database source's key (a row's ``_row_ref``) may hold a NUL: pandas codes an array of text as C
    strings, which made ``a\\x00b`` and ``a\\x00c`` one row, the missing one accounted for by the other."""
    read = [("t", "a\x00b"), ("t", "a\x00c"), ("f\x00x", "1"), ("\udcff.csv", "1"), ("g.csv", "1")]
    landed = [("t", "a\x00c"), ("f\x00y", "1"), ("g.csv", "1")]
    found = unaccounted(_arrays(read), [_arrays(landed)])
    assert found == _as_sets(read, [landed])
    assert found == (5, [("f\x00x", "1"), ("t", "a\x00b"), ("\udcff.csv", "1")])


def _stored_customers(migration: Migration, tmp_path: Path) -> Any:
    """The demo's U8 customers staged in pieces of four raw rows (several pieces, as a large source is), one
    row without its required name."""
    mapping = next(m for m in migration.mappings if m.name == "erp_u8_customers")
    frame = extract(migration, mapping)
    frame.loc[5, "cCusName"] = None  # a required name: the row is quarantined
    raw = SpillFolder(tmp_path, "raw_erp_u8_customer", "run")
    parts = [frame.iloc[i : i + 4].reset_index(drop=True) for i in range(0, len(frame), 4)]
    frames = StoredFrames([raw.write(p, prefix="chunk") for p in parts], len(frame), dict(frame.attrs))
    folder = SpillFolder(tmp_path, "staged_customer", "run")
    return stage(migration, "customer", {migration.raw_asset(mapping): frames}, spill=folder)


def _drop_raw_rows(paths: Sequence[str]) -> None:
    """Cut each piece's file after its ``PieceHead``."""
    for path in paths:
        with Path(path).open("r+b") as file:
            assert isinstance(pickle.load(file), PieceHead)
            file.truncate(file.tell())


@pytest.mark.parametrize("crosswalk", ["whole", "by_key"])
def test_the_check_of_stored_pieces_finds_a_lost_key_and_changed_values(
    demo_project: Path, core_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crosswalk: str
) -> None:
    # whole: each batch reads its system's crosswalk once; by_key: each piece reads its own keys
    monkeypatch.setattr(readback, "WHOLE_CROSSWALK_PER_RECORD", 10**9 if crosswalk == "whole" else 0)
    migration = Migration.load(str(demo_project))
    staged = _stored_customers(migration, tmp_path)
    [batch] = staged.batches
    assert isinstance(batch.stored, StoredPieces) and len(batch.stored.paths) > 5
    assert len(batch.rejects)  # some rows are quarantined: they are accounted for, not missing
    engine = make_engine(core_url)
    upgrade(engine)
    load(migration, engine, "run-1", staged)
    pieces = list(batch.pieces())
    _drop_raw_rows(batch.stored.paths)  # the check reads each file's head, never the raw rows after it
    factory = session_factory(engine)
    with factory() as session:
        run = session.scalar(sa.select(LoadRun).where(LoadRun.run_key == "run-1"))
        assert run is not None
        clean = verify_pieces(session, run, "customer", batch)
    assert clean["keys_read"] == batch.rows_read and clean["keys_missing"] == 0
    assert clean["spot_checked"] == 25 and clean["spot_mismatches"] == 0

    # Behind the loader's back: one crosswalk entry is lost and every customer's name changes.
    lost = pieces[-1].records.iloc[-1]
    with factory() as session, session.begin():
        session.execute(
            sa.delete(ExternalId).where(
                ExternalId.entity == "customer", ExternalId.external_key == str(lost["_external_key"])
            )
        )
        session.execute(sa.update(Customer).values(name=Customer.name + "X"))
    with factory() as session:
        run = session.scalar(sa.select(LoadRun).where(LoadRun.run_key == "run-1"))
        assert run is not None
        found = verify_pieces(session, run, "customer", batch)
    engine.dispose()
    assert found["keys_read"] == batch.rows_read
    assert found["keys_missing"] == 1
    assert found["missing_sample"] == [f"{lost['_location']}:{lost['_row_ref']}"]
    assert found["spot_checked"] == 25 and found["spot_mismatches"] == 25
    first = found["spot_sample"][0]
    assert first["fields"] == ["name"] and first["core"]["name"] == first["mapped"]["name"] + "X"
    mapped = pd.concat([p.records for p in pieces], ignore_index=True)
    assert first["key"] in set(mapped["_external_key"].astype(str))


def test_the_check_reads_a_pieces_raw_rows_location_and_row_only(demo_project: Path, tmp_path: Path) -> None:
    """A staged piece's file holds the batch and its raw rows' location, row and kind first, the raw rows
    after: the load reads the whole piece back as written, the check the first part only."""
    migration = Migration.load(str(demo_project))
    [batch] = _stored_customers(migration, tmp_path).batches
    assert isinstance(batch.stored, StoredPieces)
    whole, checked = list(batch.pieces()), list(batch.pieces(raw=False))
    assert len(whole) == len(checked) == len(batch.stored.paths)
    for full, head in zip(whole, checked, strict=True):
        assert full.raw is not None and head.raw is not None and len(full.raw.columns) > 3
        assert list(head.raw.columns) == [
            c for c in full.raw.columns if c in ("_location", "_row_ref", "_row_kind")
        ]
        assert head.raw.equals(full.raw[head.raw.columns])
        assert head.records.equals(full.records) and head.rejects.equals(full.rejects)
    with Path(batch.stored.paths[0]).open("rb") as file:
        head = pickle.load(file)
        assert isinstance(head, PieceHead) and head.batch.raw is None
        assert pickle.load(file).equals(whole[0].raw)  # the raw rows, as extracted


@pytest.mark.parametrize("crosswalk", ["whole", "by_key"])
def test_pieces_written_whole_before_are_read_and_checked_alike(
    demo_project: Path, sqlite_core_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crosswalk: str
) -> None:
    """Pieces staged before the split (one pickled ``Batch`` a file) still load and check the same."""
    monkeypatch.setattr(readback, "WHOLE_CROSSWALK_PER_RECORD", 10**9 if crosswalk == "whole" else 0)
    migration = Migration.load(str(demo_project))
    staged = _stored_customers(migration, tmp_path)
    [batch] = staged.batches
    assert batch.stored is not None
    pieces = list(batch.stored)
    old = [str(tmp_path / f"old-{n}.pkl") for n in range(len(pieces))]
    for path, piece in zip(old, pieces, strict=True):
        with Path(path).open("wb") as file:
            pickle.dump(piece, file)
    before = dataclasses.replace(batch, stored=dataclasses.replace(batch.stored, paths=tuple(old)))
    for got, expected in zip(before.pieces(raw=False), batch.pieces(), strict=True):
        assert got.raw is not None and expected.raw is not None and got.raw.equals(expected.raw)
    engine = make_engine(sqlite_core_url)
    upgrade(engine)
    load(migration, engine, "run-1", dataclasses.replace(staged, batches=[before]))
    with session_factory(engine)() as session, session.begin():
        session.execute(sa.update(Customer).values(name=Customer.name + "X"))
        run = session.scalar(sa.select(LoadRun).where(LoadRun.run_key == "run-1"))
        assert run is not None
        found = verify_pieces(session, run, "customer", before)
        assert found == verify_pieces(session, run, "customer", batch)
    engine.dispose()
    assert found["keys_missing"] == 0 and found["spot_mismatches"] == found["spot_checked"] == 25


def test_records_an_edit_changed_after_their_load_are_not_spot_checked_but_others_are(
    demo_project: Path, core_url: str, tmp_path: Path
) -> None:
    # After go-live a newcomer's every `crmi run` exited 2: the spot check compared a customer whose phone a
    # sync had changed since with its (unchanged) source row, and the report named no record or field.
    from crm_core.edits import edit_records
    from integration.pipeline import ReconciliationLine
    from integration.reports import line_problems

    migration = Migration.load(str(demo_project))
    staged = _stored_customers(migration, tmp_path)
    [batch] = staged.batches
    engine = make_engine(core_url)
    upgrade(engine)
    load(migration, engine, "run-1", staged)
    factory = session_factory(engine)
    with factory() as session:
        ids = sorted(session.scalars(sa.select(Customer.id).where(Customer.merged_into_id.is_(None))))
    edit_records(engine, "customer", {i: {"phone": "+8613800000000"} for i in ids[::2]})  # every other one
    with factory() as session:
        run = session.scalar(sa.select(LoadRun).where(LoadRun.run_key == "run-1"))
        assert run is not None
        half = verify_pieces(session, run, "customer", batch)
    assert half["spot_checked"] == 25 and half["spot_mismatches"] == 0  # the others are checked instead
    edit_records(engine, "customer", {i: {"phone": "+8613800000000"} for i in ids})  # every record, by hand
    with factory() as session:
        run = session.scalar(sa.select(LoadRun).where(LoadRun.run_key == "run-1"))
        assert run is not None
        after_edit = verify_pieces(session, run, "customer", batch)
    assert after_edit["spot_mismatches"] == 0 and after_edit["spot_checked"] == 0  # all changed on purpose

    # The same change behind every run's back (no run recorded it) is still found, and named.
    with factory() as session, session.begin():
        session.execute(sa.update(Customer).values(name=Customer.name + "X", updated_run_id=run.id))
    with factory() as session:
        run = session.scalar(sa.select(LoadRun).where(LoadRun.run_key == "run-1"))
        assert run is not None
        found = verify_pieces(session, run, "customer", batch)
    engine.dispose()
    assert found["spot_checked"] == 25 and found["spot_mismatches"] == 25
    line = ReconciliationLine(
        source="erp_u8", entity="customer", rows_read=1, loaded=1, merged=0, rejected=0, warnings=0,
        amount_source=None, amount_core=None, spot_checked=found["spot_checked"],
        spot_mismatches=found["spot_mismatches"], spot_sample=found["spot_sample"],
    )  # fmt: skip
    [problem] = line_problems(line)
    first = found["spot_sample"][0]
    assert f"e.g. key {first['key']}: name core {first['core']['name']!r}" in problem
