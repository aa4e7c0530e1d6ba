"""Speed-ups that must not change a decision: SQLite key lists, the go-live shortcuts, the exact-key index."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from crm_core.db import make_engine, upgrade
from crm_core.journal import ids_in
from crm_core.loading import MatchRules
from crm_core.models import Customer, ExternalId, SalesRep
from tests.test_loading import CODE_A, CODE_B, CUSTOMER_RULES, batch, load


def _sqlite_table() -> tuple[sa.Engine, sa.Table]:
    engine = sa.create_engine("sqlite://")
    meta = sa.MetaData()
    table = sa.Table(
        "t", meta, sa.Column("id", sa.Integer, primary_key=True), sa.Column("key", sa.String(20))
    )
    meta.create_all(engine)
    with engine.begin() as connection:
        connection.execute(sa.insert(table), [{"id": 1, "key": "5"}, {"id": 2, "key": "A"}])
    return engine, table


def test_ids_in_int_keys_on_a_text_column_match_as_in_list_does() -> None:
    """``key IN (5)`` matches the stored text '5' (TEXT affinity goes to the right side); json_each must too."""
    engine, table = _sqlite_table()
    with engine.connect() as connection:
        plain = connection.execute(sa.select(table.c.id).where(table.c.key.in_([5]))).scalars().all()
        found = (
            connection.execute(sa.select(table.c.id).where(ids_in(connection, table.c.key, [5])))
            .scalars()
            .all()
        )
    assert plain == [1]
    assert found == plain


def test_ids_in_str_keys_on_an_integer_column() -> None:
    engine, table = _sqlite_table()
    with engine.connect() as connection:
        found = (
            connection.execute(sa.select(table.c.id).where(ids_in(connection, table.c.id, ["1", "2"])))
            .scalars()
            .all()
        )
    assert sorted(found) == [1, 2]


def test_ids_in_a_key_with_a_nul_character_matches_only_itself() -> None:
    engine, table = _sqlite_table()
    with engine.connect() as connection:
        plain = connection.execute(sa.select(table.c.id).where(table.c.key.in_(["A\x00B"]))).scalars().all()
        found = (
            connection.execute(sa.select(table.c.id).where(ids_in(connection, table.c.key, ["A\x00B"])))
            .scalars()
            .all()
        )
    assert plain == []
    assert found == plain


def _customers(engine: sa.Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as connection:
        return [tuple(r) for r in connection.execute(
            sa.select(ExternalId.system, ExternalId.external_key, ExternalId.match_method, Customer.name,
                      Customer.credit_code)
            .join(Customer, Customer.id == ExternalId.entity_id)
            .where(ExternalId.external_key != "Z9")
            .order_by(ExternalId.system, ExternalId.external_key)
        ).all()]  # fmt: skip


@pytest.mark.parametrize("later_row", ["same_code", "other_code"])
def test_go_live_decides_as_a_load_into_a_core_holding_other_records(tmp_path: Any, later_row: str) -> None:
    """A1 comes twice (the second time with its credit code); a later row has that code, or another code and
    A1's name. The empty core decides as a core holding an unrelated record."""
    erp = [
        {"_external_key": "A1", "name": "甲有限公司", "credit_code": None},
        {"_external_key": "A1", "name": "甲有限公司", "credit_code": CODE_A},
    ]
    crm = [
        {"_external_key": "c-1", "name": "丁有限公司", "credit_code": CODE_A}
        if later_row == "same_code"
        else {"_external_key": "c-1", "name": "甲有限公司", "credit_code": CODE_B}
    ]
    outcomes = []
    for name, unrelated in (("empty", False), ("holding", True)):
        engine = make_engine(f"sqlite:///{tmp_path / f'{name}.sqlite'}")
        upgrade(engine)
        if unrelated:
            load(engine, "r0", "customer",
                 [batch("erp", [{"_external_key": "Z9", "name": "无关有限公司", "credit_code": None}])],
                 CUSTOMER_RULES)  # fmt: skip
        stats = [s.as_dict() for s in load(engine, "r1", "customer", [batch("erp", erp), batch("crm", crm)],
                                           CUSTOMER_RULES)]  # fmt: skip
        outcomes.append((stats, _customers(engine)))
        engine.dispose()
    assert outcomes[0] == outcomes[1]


def test_a_renamed_rep_is_matched_as_before_in_a_core_holding_it(tmp_path: Any) -> None:
    """sales_rep: every key field has a key function, so the whole index is read at the first chunk. The new
    name an update gives a stored rep is not indexed within the load: another row with that name is a new rep."""
    engine = make_engine(f"sqlite:///{tmp_path / 'reps.sqlite'}")
    upgrade(engine)
    rules = MatchRules(keys=[("name",)])
    load(engine, "r1", "sales_rep", [batch("reps", [{"_external_key": "E1", "name": "张伟"}])], rules)
    load(
        engine,
        "r2",
        "sales_rep",
        [batch("reps", [{"_external_key": "E1", "name": "李娜"}, {"_external_key": "h1", "name": "李娜"}])],
        rules,
    )
    with engine.connect() as connection:
        reps = connection.execute(sa.select(SalesRep.name).order_by(SalesRep.id)).scalars().all()
    engine.dispose()
    assert reps == ["李娜", "李娜"]  # h1 inserted, as before the go-live shortcuts
