"""The crosswalk loader: outcomes per row, idempotent re-loads, exact-key matching and references."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from crm_core.db import make_engine, upgrade
from crm_core.loading import (
    LOCATION,
    ROW_REF,
    Batch,
    EntityLoader,
    Lookup,
    MatchRules,
    RawRows,
    SourceStats,
    get_or_start_run,
)
from crm_core.models import Contact, Customer, ExternalId, Opportunity, Reject, SalesRep
from integration.dedup.normalize import company_key, person_key
from integration.mappings.engine import empty_rejects
from tests.conftest import reset_postgres

CUSTOMER_RULES = MatchRules(keys=[("credit_code",), ("name_normalized",)], conflict_fields=("credit_code",))
CODE_A = "91440300708461136T"
CODE_B = "91110000600037341L"


@pytest.fixture
def engine(core_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(core_url)
    upgrade(engine)
    yield engine
    engine.dispose()


def batch(source: str, rows: list[dict[str, Any]], lookups: dict[str, Lookup] | None = None) -> Batch:
    records = pd.DataFrame(rows)
    if "name" in records.columns and "name_normalized" not in records.columns and source != "reps":
        records["name_normalized"] = records["name"].map(company_key)
    records["_row_ref"] = [str(i + 2) for i in range(len(records))]
    records["_location"] = "t"
    fields = [c for c in records.columns if not c.startswith("_")]
    return Batch(source, f"{source}_map", records, empty_rejects(), len(records), fields, lookups or {})


def load(
    engine: sa.Engine, run_key: str, entity: str, batches: list[Batch], rules: MatchRules | None = None
) -> list[SourceStats]:
    with Session(engine) as session, session.begin():
        run = get_or_start_run(session, run_key, "test")
        return EntityLoader(
            session, run, entity, match=rules, key_functions={"name": person_key} if entity == "sales_rep" else {},
            name_keys={"customer": company_key, "sales_rep": person_key},
        ).load(batches)  # fmt: skip


def load_one_customer(engine: sa.Engine) -> None:
    """Load 深圳市腾达科技有限公司 from the ERP under key C1."""
    rows = [{"_external_key": "C1", "name": "深圳市腾达科技有限公司", "credit_code": None}]
    load(engine, "r1", "customer", [batch("erp", rows)], CUSTOMER_RULES)


def customers(engine: sa.Engine) -> list[Customer]:
    with Session(engine) as session:
        return list(session.scalars(sa.select(Customer).order_by(Customer.id)))


def test_insert_then_reload_is_unchanged_then_update(engine: sa.Engine) -> None:
    rows = [{"_external_key": "C1", "name": "深圳市腾达科技有限公司", "credit_code": CODE_A, "phone": None}]
    first = load(engine, "r1", "customer", [batch("erp", rows)], CUSTOMER_RULES)
    assert (first[0].inserted, first[0].unchanged) == (1, 0)
    second = load(engine, "r2", "customer", [batch("erp", rows)], CUSTOMER_RULES)
    assert (second[0].inserted, second[0].updated, second[0].unchanged) == (0, 0, 1)
    rows[0]["phone"] = "+8675512345678"
    third = load(engine, "r3", "customer", [batch("erp", rows)], CUSTOMER_RULES)
    assert third[0].updated == 1
    [customer] = customers(engine)
    assert customer.phone == "+8675512345678"
    assert customer.created_run_id != customer.updated_run_id


def test_same_firm_from_two_sources_merges_and_fills_blanks_only(engine: sa.Engine) -> None:
    erp = batch(
        "erp",
        [{"_external_key": "00001", "name": "深圳市腾达科技有限公司", "credit_code": CODE_A, "phone": None}],
    )
    crm = batch(
        "crm",
        [
            {
                "_external_key": "a-1",
                "name": "腾达科技（深圳）有限公司",
                "credit_code": None,
                "phone": "+8675512345678",
            }
        ],
    )
    stats = load(engine, "r1", "customer", [erp, crm], CUSTOMER_RULES)
    assert [(s.inserted, s.merged) for s in stats] == [(1, 0), (0, 1)]
    [customer] = customers(engine)
    assert customer.name == "深圳市腾达科技有限公司"  # the first (priority) source keeps its value
    assert customer.phone == "+8675512345678"  # the blank was filled
    with Session(engine) as session:
        keys = {(x.system, x.external_key, x.match_method) for x in session.scalars(sa.select(ExternalId))}
    assert keys == {("erp", "00001", "created"), ("crm", "a-1", "matched:name_normalized")}
    again = load(engine, "r2", "customer", [erp, crm], CUSTOMER_RULES)
    assert [(s.unchanged, s.merged) for s in again] == [(1, 0), (0, 1)]


def test_conflicting_credit_codes_never_merge_even_with_the_same_name(engine: sa.Engine) -> None:
    erp = batch("erp", [{"_external_key": "1", "name": "深圳市腾达科技有限公司", "credit_code": CODE_A}])
    crm = batch("crm", [{"_external_key": "x", "name": "深圳市腾达科技有限公司", "credit_code": CODE_B}])
    stats = load(engine, "r1", "customer", [erp, crm], CUSTOMER_RULES)
    assert [s.inserted for s in stats] == [1, 1]
    assert len(customers(engine)) == 2


def test_same_trade_name_in_another_city_and_a_branch_stay_apart(engine: sa.Engine) -> None:
    rows = [
        {"_external_key": "1", "name": "深圳市腾达科技有限公司", "credit_code": None},
        {"_external_key": "2", "name": "北京腾达科技有限公司", "credit_code": None},
        {"_external_key": "3", "name": "深圳市腾达科技有限公司北京分公司", "credit_code": None},
    ]
    stats = load(engine, "r1", "customer", [batch("erp", rows)], CUSTOMER_RULES)
    assert stats[0].inserted == 3


def test_references_resolve_by_crosswalk_and_by_name_or_reject(engine: sa.Engine) -> None:
    load(
        engine,
        "r1",
        "sales_rep",
        [batch("reps", [{"_external_key": "u1", "name": "张伟", "code": "zhangwei"}])],
    )
    load_one_customer(engine)
    opportunities = batch(
        "xlsx",
        [
            {"_external_key": "O1", "name": "扩容", "customer": "腾达科技（深圳）有限公司", "stage": "won", "owner": "张 伟", "amount": Decimal("125000")},
            {"_external_key": "O2", "name": "新建", "customer": "不存在有限公司", "stage": "won", "owner": "张伟", "amount": Decimal("5")},
            {"_external_key": "O3", "name": "升级", "customer": "深圳市腾达科技有限公司", "stage": "won", "owner": "李娜", "amount": Decimal("7")},
        ],
        {"customer": Lookup(by="name"), "owner": Lookup(by="name")},
    )  # fmt: skip
    [stats] = load(engine, "r1", "opportunity", [opportunities])
    assert (stats.inserted, stats.rejected, stats.warnings) == (2, 1, 1)
    assert stats.amount_mapped == Decimal("125012") and stats.amount_loaded == Decimal("125007")
    assert stats.balanced
    with Session(engine) as session:
        rejects = [
            (r.row_ref, r.field, r.value, r.severity, r.reason)
            for r in session.scalars(sa.select(Reject).order_by(Reject.id))
        ]
        loaded = {o.name: o for o in session.scalars(sa.select(Opportunity))}
        rep_id = session.scalar(sa.select(SalesRep.id))
    assert rejects == [
        ("3", "customer", "不存在有限公司", "error", "no customer named '不存在有限公司'"),
        ("4", "owner", "李娜", "warn", "no sales_rep named '李娜'"),
    ]
    assert loaded["扩容"].owner_id == rep_id and loaded["升级"].owner_id is None


def test_unknown_external_reference_and_unknown_stage_are_rejected(engine: sa.Engine) -> None:
    rows = [
        {"_external_key": "O1", "name": "a", "customer": "missing", "stage": "won"},
    ]
    [stats] = load(engine, "r1", "opportunity", [batch("crm", rows, {"customer": Lookup()})])
    assert stats.rejected == 1
    with Session(engine) as session:
        reason = session.scalar(sa.select(Reject.reason))
    assert reason == "customer with crm key 'missing' not found (was it loaded or rejected?)"


def test_branch_parent_is_resolved_after_all_rows_are_in(engine: sa.Engine) -> None:
    rows = [
        {
            "_external_key": "B1",
            "name": "深圳市腾达科技有限公司北京分公司",
            "parent": "P1",
            "credit_code": None,
        },
        {"_external_key": "P1", "name": "深圳市腾达科技有限公司", "parent": None, "credit_code": None},
    ]
    load(engine, "r1", "customer", [batch("erp", rows, {"parent": Lookup()})], CUSTOMER_RULES)
    by_name = {c.name: c for c in customers(engine)}
    assert by_name["深圳市腾达科技有限公司北京分公司"].parent_id == by_name["深圳市腾达科技有限公司"].id


def test_contacts_match_on_resolved_customer_and_mobile(engine: sa.Engine) -> None:
    load_one_customer(engine)
    rules = MatchRules(keys=[("customer", "mobile")])
    erp = batch(
        "erp",
        [{"_external_key": "C1", "customer": "C1", "name": "王芳", "mobile": "+8613812345678"}],
        {"customer": Lookup()},
    )
    crm = batch("crm", [{"_external_key": "k", "customer": "深圳市腾达科技有限公司", "name": "王 芳", "mobile": "+8613812345678", "email": "wf@x.cn"}],
                {"customer": Lookup(by="name")})  # fmt: skip
    stats = load(engine, "r1", "contact", [erp, crm], rules)
    assert [(s.inserted, s.merged) for s in stats] == [(1, 0), (0, 1)]
    with Session(engine) as session:
        [contact] = session.scalars(sa.select(Contact)).all()
    assert contact.email == "wf@x.cn" and contact.name == "王芳"


def _load_and_fail_halfway(engine: sa.Engine) -> None:
    """Load two customer batches under run r1; the second fails after the first is written; nothing stays."""
    good = batch("erp", [{"_external_key": "C1", "name": "甲有限公司", "credit_code": None}])
    broken = batch("crm", [{"_external_key": "k1", "name": "乙有限公司", "credit_code": None}])
    broken.fields = [
        *broken.fields,
        "city",
    ]  # a column the records lack: fails after the first batch is written
    with pytest.raises(KeyError):
        load(engine, "r1", "customer", [good, broken], CUSTOMER_RULES)
    assert customers(engine) == []


def test_a_failure_halfway_leaves_the_core_as_it_was(engine: sa.Engine) -> None:
    _load_and_fail_halfway(engine)
    with Session(engine) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(ExternalId)) == 0


def _chunked_rows() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows whose outcomes depend on earlier rows: duplicate keys, exact-key matches, parents after children."""
    erp = [
        {"_external_key": "B1", "name": "深圳市腾达科技有限公司北京分公司", "parent": "P1", "credit_code": None, "phone": None},
        {"_external_key": "A1", "name": "甲有限公司", "parent": None, "credit_code": CODE_A, "phone": None},
        {"_external_key": "X1", "name": "乙有限公司", "parent": None, "credit_code": None, "phone": None},
        {"_external_key": "A1", "name": "甲有限公司", "parent": None, "credit_code": CODE_A, "phone": "+8675511112222"},
        {"_external_key": "P1", "name": "深圳市腾达科技有限公司", "parent": None, "credit_code": None, "phone": None},
        {"_external_key": "B2", "name": "腾达科技（深圳）有限公司广州分公司", "parent": "P1", "credit_code": None, "phone": None},
    ]  # fmt: skip
    crm = [
        {"_external_key": "c-1", "name": "甲公司", "parent": None, "credit_code": CODE_A, "phone": "+8675599998888"},
        {"_external_key": "c-2", "name": "乙有限公司", "parent": None, "credit_code": None, "phone": "+8602088887777"},
        {"_external_key": "c-3", "name": "丙有限公司", "parent": "c-9", "credit_code": CODE_B, "phone": None},
    ]  # fmt: skip
    return erp, crm


def _load_chunked(engine: sa.Engine, run_key: str) -> list[SourceStats]:
    erp, crm = _chunked_rows()
    lookups = {"parent": Lookup()}
    return load(
        engine, run_key, "customer", [batch("erp", erp, lookups), batch("crm", crm, lookups)], CUSTOMER_RULES
    )


def _reference_load(tmp_path: Any) -> tuple[list[dict[str, Any]], Any]:
    """Load the chunked rows into a fresh SQLite core with the defaults: the stats and content to expect."""
    from tests.test_runs import content

    reference = make_engine(f"sqlite:///{tmp_path / 'reference.sqlite'}")
    upgrade(reference)
    expected_stats = [s.as_dict() for s in _load_chunked(reference, "r1")]
    expected = content(reference)
    reference.dispose()
    return expected_stats, expected


@pytest.mark.parametrize("chunk_rows", [1, 2, 4])
def test_small_chunks_decide_exactly_as_one_chunk_and_roll_back_exactly(
    core_url: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, chunk_rows: int
) -> None:
    from crm_core import loading
    from crm_core.runs import rollback_run
    from tests.test_runs import content

    expected_stats, expected = _reference_load(tmp_path)

    monkeypatch.setattr(loading, "CHUNK_ROWS", chunk_rows)
    engine = make_engine(core_url)
    upgrade(engine)
    empty = content(engine)
    stats = [s.as_dict() for s in _load_chunked(engine, "r1")]
    assert stats == expected_stats
    assert content(engine) == expected
    by_name = {c.name: c for c in customers(engine)}
    parent = by_name["深圳市腾达科技有限公司"].id
    assert by_name["深圳市腾达科技有限公司北京分公司"].parent_id == parent
    assert by_name["腾达科技（深圳）有限公司广州分公司"].parent_id == parent
    assert by_name["甲有限公司"].phone == "+8675511112222"  # its own second row wins over the CRM's
    assert by_name["乙有限公司"].phone == "+8602088887777"  # blank filled by the exact-name match
    again = [s.as_dict() for s in _load_chunked(engine, "r2")]
    assert [s["inserted"] for s in again] == [0, 0]
    assert content(engine) == expected  # A1's two rows take turns in the crosswalk hash, the core stays put
    rollback_run(engine, "r2", allow_running=True)
    rollback_run(engine, "r1", allow_running=True)
    assert content(engine) == empty
    engine.dispose()


def _indexes(engine: sa.Engine) -> dict[str, list[tuple[str, tuple[str, ...], bool]]]:
    inspector = sa.inspect(engine)
    return {
        table: sorted(
            (i["name"], tuple(i["column_names"]), bool(i["unique"])) for i in inspector.get_indexes(table)
        )
        for table in ("customers", "external_ids")
    }


def _foreign_keys(engine: sa.Engine) -> list[tuple[Any, ...]]:
    """Every foreign key of the core as the database defines it (PostgreSQL's own text of each)."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            query = (
                "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid), convalidated FROM pg_constraint"
                " WHERE contype = 'f' ORDER BY 1, 2"
            )
            return [tuple(row) for row in connection.exec_driver_sql(query)]
    inspector = sa.inspect(engine)
    return sorted(
        (table, fk["name"], tuple(fk["constrained_columns"]), fk["referred_table"])
        for table in inspector.get_table_names()
        for fk in inspector.get_foreign_keys(table)
    )


def test_a_big_load_builds_its_indexes_afterwards_with_the_same_outcome(
    core_url: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite a load as big as its table drops the secondary indexes it does not read and builds them after."""
    from crm_core import loading
    from tests.test_runs import content

    expected_stats, expected = _reference_load(tmp_path)

    monkeypatch.setattr(loading, "DEFER_INDEXES_MIN_ROWS", 1)
    monkeypatch.setattr(loading, "CHUNK_ROWS", 2)
    engine = make_engine(core_url)
    upgrade(engine)
    indexes = _indexes(engine)
    foreign_keys = _foreign_keys(engine)
    assert ("ix_customers_city", ("city",), False) in indexes["customers"]
    dropped: list[str] = []
    keys_dropped: list[str] = []

    def watch(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("DROP INDEX"):
            dropped.append(statement.split()[-1].strip('"'))
        elif "DROP CONSTRAINT" in statement.upper():
            keys_dropped.append(statement.split()[-1].strip('"'))

    sa.event.listen(engine, "before_cursor_execute", watch)
    stats = [s.as_dict() for s in _load_chunked(engine, "r1")]
    assert stats == expected_stats
    assert content(engine) == expected
    assert _indexes(engine) == indexes
    assert _foreign_keys(engine) == foreign_keys  # back exactly as they were, validated
    if engine.dialect.name == "sqlite":
        # the exact-key columns the loader looks records up by keep their indexes throughout
        assert "ix_customers_city" in dropped and "ix_external_ids_entity_entity_id" in dropped
        assert "ix_customers_credit_code" not in dropped and "ix_customers_name_normalized" not in dropped
        assert keys_dropped == []  # a foreign-key check is one index lookup there
    else:  # PostgreSQL keeps its indexes (the rebuild cost more than it saved there), not its foreign keys
        assert dropped == []
        assert set(keys_dropped) == {name for table, name, *_ in foreign_keys if table == "customers"}
        assert "fk_customers_parent_id_customers" in keys_dropped
    # a smaller load into a table that holds more rows keeps every index and foreign key
    dropped.clear()
    keys_dropped.clear()
    _, crm = _chunked_rows()
    load(engine, "r2", "customer", [batch("crm", crm, {"parent": Lookup()})], CUSTOMER_RULES)
    assert dropped == [] and keys_dropped == [] and _indexes(engine) == indexes
    engine.dispose()


def test_a_first_load_skips_lookups_of_keys_nothing_stored_and_decides_the_same(
    core_url: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Into an empty table and crosswalk only what the load itself wrote is looked up; the outcome is the same."""
    from crm_core import loading

    monkeypatch.setattr(loading, "CHUNK_ROWS", 2)  # A1 comes back in a later chunk, c-1 matches it by code

    def run_load(engine: sa.Engine) -> tuple[list[dict[str, Any]], list[tuple[Any, ...]], list[str]]:
        looked_up: list[
            str
        ] = []  # "crosswalk" per chunk reading its keys' crosswalk rows, "records" by exact key

        def watch(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            if statement.startswith("SELECT external_ids.id, external_ids.entity,"):
                looked_up.append("crosswalk")
            elif statement.startswith(
                "SELECT customers.id, customers.credit_code, customers.name_normalized"
            ):
                looked_up.append("records")

        sa.event.listen(engine, "before_cursor_execute", watch)
        stats = [s.as_dict() for s in _load_chunked(engine, "r2")]
        sa.event.remove(engine, "before_cursor_execute", watch)
        with engine.connect() as connection:
            rows = connection.execute(
                sa.select(ExternalId.system, ExternalId.external_key, ExternalId.match_method, Customer.name,
                          Customer.credit_code, Customer.phone, Customer.parent_id.is_not(None))
                .join(Customer, Customer.id == ExternalId.entity_id)
                .where(ExternalId.external_key.not_in(["Z9", "z-9"]))
                .order_by(ExternalId.system, ExternalId.external_key)
            ).all()  # fmt: skip
        return stats, [tuple(r) for r in rows], looked_up

    empty = make_engine(core_url)
    upgrade(empty)
    first_stats, first_rows, first_lookups = run_load(empty)
    if empty.dialect.name == "postgresql":  # the same database: start again from an empty core
        reset_postgres(empty)
        holding = empty
    else:
        empty.dispose()
        holding = make_engine(f"sqlite:///{tmp_path / 'holding.sqlite'}")
    upgrade(holding)
    unrelated = [
        {"_external_key": "Z9", "name": "无关有限公司", "parent": None, "credit_code": None, "phone": None}
    ]
    load(holding, "r1", "customer", [batch("erp", unrelated), batch("crm", [{**unrelated[0], "_external_key": "z-9"}])],
         CUSTOMER_RULES)  # fmt: skip
    later_stats, later_rows, later_lookups = run_load(holding)
    holding.dispose()
    assert first_stats == later_stats
    assert first_rows == later_rows and len(first_rows) == 8
    # into the empty core only what this load wrote is looked up: A1's crosswalk row when it comes back, the
    # records of the values its earlier chunks wrote; with stored records every chunk reads its keys'
    # crosswalk rows and the records its exact keys may join
    assert first_lookups.count("crosswalk") == 1 and later_lookups.count("crosswalk") == 5
    assert first_lookups.count("records") < later_lookups.count("records")
    # the key that came back found its record of the earlier chunk; the CRM's row joined it by credit code
    methods = {(system, key): method for system, key, method, *_ in first_rows}
    assert methods[("erp", "A1")] == "created" and methods[("crm", "c-1")] == "matched:credit_code"


def test_a_failed_big_load_gets_its_indexes_and_foreign_keys_back(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from crm_core import loading

    monkeypatch.setattr(loading, "DEFER_INDEXES_MIN_ROWS", 1)
    indexes = _indexes(engine)
    # as in a pipeline run: the load run exists (committed) before its first load, which writes nothing
    # before dropping the indexes (SQLite's driver would commit a DROP INDEX outside a transaction)
    with Session(engine) as session, session.begin():
        get_or_start_run(session, "r1", "test")
    foreign_keys = _foreign_keys(engine)
    _load_and_fail_halfway(engine)
    assert _indexes(engine) == indexes
    assert _foreign_keys(engine) == foreign_keys


@pytest.mark.postgres
def test_a_big_load_keeps_a_not_valid_foreign_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """A NOT VALID key checks each new row only while it is there: added back NOT VALID, it would check none."""
    from crm_core import loading
    from tests.conftest import PG_URL, reset_postgres, server_or_skip

    server = server_or_skip(PG_URL, "PostgreSQL")
    reset_postgres(server)
    server.dispose()
    engine = make_engine(PG_URL)
    upgrade(engine)
    with engine.begin() as connection:  # as a DBA adds a key over rows they have not cleaned yet
        connection.exec_driver_sql("ALTER TABLE customers DROP CONSTRAINT fk_customers_owner_id_sales_reps")
        connection.exec_driver_sql(
            "ALTER TABLE customers ADD CONSTRAINT fk_customers_owner_id_sales_reps "
            "FOREIGN KEY (owner_id) REFERENCES sales_reps (id) NOT VALID"
        )
    foreign_keys = _foreign_keys(engine)
    monkeypatch.setattr(loading, "DEFER_INDEXES_MIN_ROWS", 1)
    dropped: list[str] = []

    def watch(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "DROP CONSTRAINT" in statement.upper():
            dropped.append(statement.split()[-1].strip('"'))

    sa.event.listen(engine, "before_cursor_execute", watch)
    _load_chunked(engine, "r1")
    assert "fk_customers_parent_id_customers" in dropped  # the validated keys are still deferred
    assert "fk_customers_owner_id_sales_reps" not in dropped
    assert _foreign_keys(engine) == foreign_keys
    engine.dispose()


def test_rows_pointing_at_a_merged_record_stay_unchanged_on_reload(engine: sa.Engine) -> None:
    from crm_core.merging import merge_records

    rows = [
        {"_external_key": "C1", "name": "深圳市腾达科技有限公司", "credit_code": None},
        {"_external_key": "C2", "name": "腾达科技", "credit_code": None},
    ]
    load(engine, "r1", "customer", [batch("erp", rows)], CUSTOMER_RULES)
    contacts = batch(
        "erp", [{"_external_key": "P1", "customer": "C2", "name": "王芳"}], {"customer": Lookup()}
    )
    load(engine, "r1", "contact", [contacts])
    with Session(engine) as session, session.begin():
        run = get_or_start_run(session, "r2", "test")
        ids = {c.name: c.id for c in session.scalars(sa.select(Customer))}
        merge_records(session, run, Customer, ids["深圳市腾达科技有限公司"], [ids["腾达科技"]],
                      probability=1.0, reason="test", decided_by="steward")  # fmt: skip
    [again] = load(engine, "r3", "contact", [contacts])
    assert (again.unchanged, again.updated) == (1, 0)
    with Session(engine) as session:
        [contact] = session.scalars(sa.select(Contact)).all()
    assert contact.customer_id == ids["深圳市腾达科技有限公司"]
    # A reference that did not resolve and now does is a change: the row is updated.
    orphan = batch("erp", [{"_external_key": "P2", "customer": "C3", "name": "李雷"}], {"customer": Lookup()})
    [first] = load(engine, "r4", "contact", [orphan])
    assert first.inserted == 1 and first.warnings == 1
    load(
        engine,
        "r5",
        "customer",
        [batch("erp", [{"_external_key": "C3", "name": "丙有限公司", "credit_code": None}])],
        CUSTOMER_RULES,
    )
    [second] = load(engine, "r6", "contact", [orphan])
    assert second.updated == 1


def test_a_row_naming_a_merged_customer_finds_its_survivor(engine: sa.Engine) -> None:
    from crm_core.merging import merge_records

    rows = [
        {"_external_key": "C1", "name": "无锡科众贸易有限公司", "credit_code": None},
        {"_external_key": "C2", "name": "无锡市科众商贸有限公司", "credit_code": None},
    ]
    load(engine, "r1", "customer", [batch("erp", rows)], CUSTOMER_RULES)
    with Session(engine) as session, session.begin():
        run = get_or_start_run(session, "r2", "test")
        ids = {c.name: c.id for c in session.scalars(sa.select(Customer))}
        merge_records(session, run, Customer, ids["无锡科众贸易有限公司"], [ids["无锡市科众商贸有限公司"]],
                      probability=1.0, reason="test", decided_by="linkage")  # fmt: skip
    contacts = batch("xlsx", [{"_external_key": "P1", "customer": "无锡市科众商贸有限公司", "name": "张伟"}],
                     {"customer": Lookup(by="name")})  # fmt: skip
    [stats] = load(engine, "r3", "contact", [contacts])
    assert (stats.inserted, stats.warnings) == (1, 0)
    with Session(engine) as session:
        [contact] = session.scalars(sa.select(Contact)).all()
    assert contact.customer_id == ids["无锡科众贸易有限公司"]


def test_raw_rows_of_rejects_are_read_in_one_go_even_with_a_repeated_header() -> None:
    frame = pd.DataFrame([["a.xlsx#客户", "3", "C1", "旧备注", "新备注"], ["a.xlsx#客户", "4", "C2", None, "x"]],
                         columns=[LOCATION, ROW_REF, "编号", "备注", "备注"])  # fmt: skip
    rows = RawRows(frame).many([("a.xlsx#客户", "4"), ("a.xlsx#客户", "9"), ("a.xlsx#客户", "3")])
    assert rows == [{"编号": "C2", "备注": "x"}, None, {"编号": "C1", "备注": "新备注"}]
    assert RawRows(frame).get("a.xlsx#客户", "3") == rows[2]
    assert RawRows(None).many([("x", "1")]) == [None]


def test_raw_rows_of_every_kind_of_column_are_json_safe_value_by_value() -> None:
    """Text columns pass as they are; any other column goes value by value (missing markers to None, decimal
    amounts to numbers, dates to text, numpy scalars to Python): what each value alone would give."""
    from decimal import Decimal

    import numpy as np

    from crm_core.journal import decimal_cell, to_json
    from crm_core.loading import _python

    def alone(value: object) -> object:
        return decimal_cell(value) if isinstance(value, Decimal) else to_json(_python(value))

    frame = pd.DataFrame({
        LOCATION: ["s#1"] * 4, ROW_REF: ["1", "2", "3", "4"],
        "名称": ["甲", None, "乙", "丙"],
        "金额": [Decimal("12.50"), None, Decimal("3"), float("nan")],
        "日期": pd.to_datetime(["2025-03-05", None, "2025-01-01", "2024-12-31"]),
        "数量": np.array([1, 2, 3, 4], dtype=np.int64),
        "备注": pd.array(["x", None, "y", "z"], dtype="string"),
        "空": [None, None, None, None],
    })  # fmt: skip
    wanted = [("s#1", ref) for ref in ("4", "1", "3", "2")]
    rows = RawRows(frame).many(wanted)
    for (_, ref), row in zip(wanted, rows, strict=True):
        source = frame[frame[ROW_REF] == ref].iloc[0]
        expected = {name: alone(source[name]) for name in frame.columns if not name.startswith("_")}
        assert row == expected
        assert all(type(row[name]) is type(expected[name]) for name in expected)
    assert rows[1] == {
        "名称": "甲",
        "金额": 12.5,  # a number, so that the fix sheet writes a number cell
        "日期": "2025-03-05T00:00:00",
        "数量": 1,
        "备注": "x",
        "空": None,
    }
    assert rows[3]["金额"] is None and rows[3]["日期"] is None and rows[3]["备注"] is None


def test_a_row_level_reject_read_back_from_staging_stores_no_field_rather_than_nan(engine: sa.Engine) -> None:
    """A mapping's row-level rejects (subtotal, empty key, repeated key) have no field and no value; read back
    from staged pieces they come as NaN, which was stored as the text 'nan' and shown to the consultant as
    ``nan: duplicate source key`` in the fix sheet."""
    rows = [{"_external_key": "C1", "name": "深圳市腾达科技有限公司", "credit_code": None}]
    customers_batch = batch("erp", rows)
    customers_batch.rejects = pd.DataFrame([
        {"source": "erp", "entity": "customer", "location": "t", "row_ref": "9", "field": float("nan"),
         "value": float("nan"), "rule": "subtotal", "reason": "subtotal/total row, not a record", "severity": "error"},
        {"source": "erp", "entity": "customer", "location": "t", "row_ref": "10", "field": pd.NA,
         "value": None, "rule": "duplicate_key", "reason": "duplicate source key (first seen on row 2)",
         "severity": "error"},
    ])  # fmt: skip
    load(engine, "r1", "customer", [customers_batch], CUSTOMER_RULES)
    with Session(engine) as session:
        stored = session.execute(
            sa.select(Reject.row_ref, Reject.field, Reject.value).order_by(Reject.id)
        ).all()
    assert [tuple(r) for r in stored] == [("9", None, None), ("10", None, None)]


def test_a_reference_that_must_resolve_rejects_its_row_when_the_record_is_missing(engine: sa.Engine) -> None:
    """``missing: reject`` (what a mapping's ``required: true`` lookup asks for): a contact whose customer key is
    in no source's crosswalk is rejected with the reason, not loaded without its customer."""
    load_one_customer(engine)
    contacts = batch(
        "erp",
        [{"_external_key": "P1", "name": "张伟", "customer": "C1"}, {"_external_key": "P2", "name": "李娜", "customer": "C9"}],
        {"customer": Lookup(by="external_id", missing="reject")},
    )  # fmt: skip
    [stats] = load(engine, "r2", "contact", [contacts])
    assert (stats.inserted, stats.rejected, stats.warnings) == (1, 1, 0)
    with Session(engine) as session:
        [reject] = session.scalars(sa.select(Reject).where(Reject.entity == "contact"))
        assert (reject.row_ref, reject.field, reject.value, reject.severity) == (
            "3",
            "customer",
            "C9",
            "error",
        )
