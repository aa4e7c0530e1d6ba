"""Revision 0013 on a populated core: run stamps lose their foreign keys to load_runs, nothing else changes."""

from __future__ import annotations

import datetime as dt
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from crm_core.db import alembic_config, current_revision, head_revision, make_engine, upgrade
from crm_core.errors import SchemaError
from crm_core.models import (
    Base,
    Contact,
    Customer,
    ExternalId,
    LoadRun,
    MappingFingerprint,
    MatchCandidate,
    MergeLog,
    Opportunity,
    Payment,
    PaymentApplication,
    Receivable,
    ReferenceDecision,
    Reject,
    RowChange,
    SalesOrder,
    SalesOrderLine,
    SalesRep,
    SyncConflict,
    SyncOutbox,
    SyncState,
    Watermark,
)
from integration.cli import app

RUN_STAMPS = {"created_run_id", "updated_run_id", "load_run_id"}


def stamp_columns() -> set[tuple[str, str]]:
    """Every (table, column) of the models that records a load run."""
    return {
        (t.name, c.name) for t in Base.metadata.tables.values() for c in t.columns if c.name in RUN_STAMPS
    }


def dangling_run_stamps(engine: sa.Engine) -> dict[str, int]:
    """Rows per table.column whose run stamp names no load run: what the dropped foreign keys refused."""
    found: dict[str, int] = {}
    with engine.connect() as connection:
        for table, column in sorted(stamp_columns()):
            stamp = Base.metadata.tables[table].c[column]
            count = connection.scalar(
                sa.select(sa.func.count())
                .select_from(stamp.table)
                .where(stamp.is_not(None), stamp.not_in(sa.select(LoadRun.id)))
            )
            if count:
                found[f"{table}.{column}"] = count
    return found


def _default(value: Any) -> str | None:
    """A server default as text, without the parentheses a SQLite table rebuild adds or drops."""
    if value is None:
        return None
    text = str(value)
    while text.startswith("(") and text.endswith(")"):
        text = text[1:-1]
    return text


def schema(engine: sa.Engine) -> dict[str, dict[str, Any]]:
    """Every table's columns, primary key, indexes, unique constraints, foreign keys and checks."""
    inspector = sa.inspect(engine)
    out: dict[str, dict[str, Any]] = {}
    for table in sorted(inspector.get_table_names()):
        out[table] = {
            "columns": [
                (c["name"], str(c["type"]), c["nullable"], _default(c.get("default")))
                for c in inspector.get_columns(table)
            ],
            "pk": (
                inspector.get_pk_constraint(table)["name"],
                inspector.get_pk_constraint(table)["constrained_columns"],
            ),
            "indexes": sorted(
                (i["name"], tuple(i["column_names"]), bool(i["unique"])) for i in inspector.get_indexes(table)
            ),
            "unique": sorted(
                (u["name"], tuple(u["column_names"])) for u in inspector.get_unique_constraints(table)
            ),
            "fks": sorted(
                (
                    f["name"],
                    tuple(f["constrained_columns"]),
                    f["referred_table"],
                    tuple(f["referred_columns"]),
                )
                for f in inspector.get_foreign_keys(table)
            ),
            "checks": sorted((c["name"], c["sqltext"]) for c in inspector.get_check_constraints(table)),
        }
    return out


def without_run_stamp_fks(tables: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``tables`` with the foreign keys to load_runs left out."""
    return {
        name: {**parts, "fks": [fk for fk in parts["fks"] if fk[2] != "load_runs"]}
        for name, parts in tables.items()
    }


def run_stamp_fks(tables: dict[str, dict[str, Any]]) -> set[tuple[str, str]]:
    """(table, column) of every foreign key to load_runs."""
    return {(name, fk[1][0]) for name, parts in tables.items() for fk in parts["fks"] if fk[2] == "load_runs"}


def contents(engine: sa.Engine, of: dict[str, dict[str, Any]] | None = None) -> dict[str, list[str]]:
    """Every row of every table but alembic_version as stored (PostgreSQL's row text, SQLite's typed values);
    with ``of`` (a :func:`schema`), only the tables and columns that schema has (those of an earlier revision)."""
    out: dict[str, list[str]] = {}
    with engine.connect() as connection:
        for table in sa.inspect(engine).get_table_names():
            if table == "alembic_version" or (of is not None and table not in of):
                continue
            columns = "*" if of is None else ", ".join(f'"{c[0]}"' for c in of[table]["columns"])
            if engine.dialect.name == "postgresql":
                query = f'SELECT CAST(ROW({columns if of else "t.*"}) AS text) FROM "{table}" t'
                rows = [r[0] for r in connection.exec_driver_sql(query)]
            else:  # the driver's own values: repr tells 1 from 1.0 from '1'
                rows = [
                    repr(tuple(r)) for r in connection.exec_driver_sql(f'SELECT {columns} FROM "{table}"')
                ]
            out[table] = sorted(rows)
    return out


def populate(engine: sa.Engine) -> None:
    """Rows in every table that carries a run stamp, and in the tables they reference."""
    at = dt.datetime(2026, 3, 1, 9, 30, tzinfo=dt.UTC)
    with Session(engine) as session:
        first = LoadRun(run_key="r-first", project="演示", mode="full", status="succeeded", stats={"rows": 3})
        undone = LoadRun(run_key="r-undone", project="演示", mode="delta", status="rolled_back", stats={})
        session.add_all([first, undone])
        session.flush()
        stamps = {"created_run_id": first.id, "updated_run_id": undone.id}
        rep = SalesRep(code="S01", name="王芳", email="wf@example.cn", **stamps)
        session.add(rep)
        session.flush()
        parent = Customer(name="深圳市腾达科技有限公司", credit_code="91440300MA5FUTXX1X", owner_id=rep.id,
                          credit_limit=Decimal("1234567.89"), **stamps)  # fmt: skip
        session.add(parent)
        session.flush()
        branch = Customer(
            name="深圳市腾达科技有限公司北京分公司", parent_id=parent.id, is_branch=True, **stamps
        )
        twin = Customer(name="腾达科技", merged_into_id=parent.id, status="inactive", created_run_id=first.id)
        session.add_all([branch, twin])
        session.flush()
        contact = Contact(
            customer_id=parent.id, name="李雷", mobile="+8613800138000", is_primary=True, **stamps
        )
        opportunity = Opportunity(customer_id=parent.id, name="二期扩容", stage_code="won", amount=Decimal("88000.00"),
                                  currency="CNY", original_amount=Decimal("12000.00"), original_currency="USD",
                                  owner_id=rep.id, closed_on=dt.date(2026, 2, 28), **stamps)  # fmt: skip
        session.add_all([contact, opportunity])
        session.flush()
        order = SalesOrder(order_no="SO-0001", customer_id=parent.id, opportunity_id=opportunity.id,
                           order_date=dt.date(2026, 3, 1), currency="CNY", total_amount=Decimal("88000.00"), **stamps)  # fmt: skip
        session.add(order)
        session.flush()
        line = SalesOrderLine(order_id=order.id, line_no=1, product_code="P-1", quantity=Decimal("3.5000"),
                              unit_price=Decimal("25142.8571"), amount=Decimal("88000.00"),
                              tax_rate=Decimal("0.1300"), **stamps)  # fmt: skip
        receivable = Receivable(receivable_no="AR-1", customer_id=parent.id, order_id=order.id, amount=Decimal("88000.00"),
                                currency="CNY", exchange_rate=Decimal("1.00000000"), red_letter=False, **stamps)  # fmt: skip
        payment = Payment(payment_no="RC-1", customer_id=parent.id, amount=Decimal("-100.50"), currency="CNY",
                          red_letter=True, received_on=dt.date(2026, 3, 2), **stamps)  # fmt: skip
        session.add_all([line, receivable, payment])
        session.flush()
        session.add(PaymentApplication(payment_id=payment.id, receivable_id=receivable.id, amount=Decimal("-100.50"),
                                       red_letter=True, **stamps))  # fmt: skip
        insert_as_stored(session, [
            ExternalId(entity="customer", entity_id=parent.id, system="erp", external_key="C001",
                       last_synced_hash="ab" * 32, last_synced_at=at, **stamps),
            ExternalId(entity="customer", entity_id=twin.id, system="crm", external_key="客户-7",
                       match_method="matched:credit_code", created_run_id=first.id),
            RowChange(load_run_id=undone.id, table_name="customers", row_key=f'{{"id": {parent.id}}}',
                      operation="update", before={"name": "腾达", "credit_limit": "1.50"}),
            RowChange(load_run_id=first.id, table_name="customers", row_key=f'{{"id": {twin.id}}}',
                      operation="update", before={"merged_into_id": None}, merge_id=1,
                      after={"merged_into_id": parent.id}),
            Reject(load_run_id=first.id, source="erp", entity="customer", row_ref="17", field="phone",
                   value="12", rule="phone", reason="太短", raw_row={"电话": "12"}, created_at=at),
            Watermark(source="erp", stream="customers", cursor_value="2026-03-01T09:30:00", load_run_id=first.id,
                      updated_at=at),
            MappingFingerprint(created_run_id=first.id, project="演示", mapping="customers", entity="customer",
                               system="erp", fingerprint="cd" * 32, locations=["Customer"], depends_on_core=True,
                               created_at=at),
            MatchCandidate(entity="customer", left_id=parent.id, right_id=twin.id, probability=0.9731,
                           features={"name": 0.5}, status="merged", load_run_id=first.id),
            MergeLog(entity="customer", survivor_id=parent.id, merged_id=twin.id, probability=0.9731,
                     reason="auto-merge above threshold", decided_by="linkage", load_run_id=first.id,
                     created_at=at),
            ReferenceDecision(entity="customer", name="腾达", name_key="腾达", candidates=[{"id": parent.id}],
                              rows_held=2, amount_held=Decimal("10.00"), load_run_id=undone.id, created_at=at),
            SyncOutbox(target="k3cloud", entity="customer", entity_id=parent.id, operation="customer/add",
                       payload={"FName": "腾达"}, payload_hash="ef" * 32, idempotency_key="k-1",
                       load_run_id=first.id, next_attempt_at=at, created_at=at),
            SyncState(target="k3cloud", entity="customer", entity_id=parent.id, payload_hash="ef" * 32,
                      core_values={"name": "腾达"}, load_run_id=first.id, updated_at=at),
            SyncConflict(target="k3cloud", entity="customer", entity_id=parent.id, field="phone",
                         crm_value="1", target_value="2", status="open", load_run_id=undone.id, created_at=at),
        ])  # fmt: skip
        session.commit()


def insert_as_stored(session: Session, objects: list[Any]) -> None:
    """Insert ORM objects with only the columns the database has: a core at an older revision lacks the columns
    later migrations added (the ORM's batched INSERT names every column of the model)."""
    inspector = sa.inspect(session.connection())
    for obj in objects:
        table = obj.__table__
        present = {c["name"] for c in inspector.get_columns(table.name)}
        values = {c.name: getattr(obj, c.key) for c in table.columns if c.name in present}
        session.execute(sa.insert(table).values({k: v for k, v in values.items() if v is not None}))


def migrate_to(engine: sa.Engine, revision: str) -> None:
    """Upgrade or downgrade the core to ``revision``."""
    if revision == "0012" and current_revision(engine) not in (None, "0012"):
        command.downgrade(alembic_config(engine), revision)
    else:
        upgrade(engine, revision)


def assert_foreign_keys_enforced(engine: sa.Engine) -> None:
    """The engine's connections still enforce foreign keys after a migration (SQLite switches them off)."""
    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(sa.insert(Contact.__table__).values(customer_id=10**6, name="x", is_primary=False))
    # every pooled connection, the one that migrated among them (the pool hands them out first in, first out)
    if engine.dialect.name == "sqlite":
        pooled = engine.pool.checkedin() if isinstance(engine.pool, sa.pool.QueuePool) else 1
        held = [engine.connect() for _ in range(max(pooled, 1))]
        try:
            assert [c.exec_driver_sql("PRAGMA foreign_keys").scalar() for c in held] == [1] * len(held)
        finally:
            for connection in held:
                connection.close()


def test_upgrade_of_a_populated_core_keeps_every_row_and_drops_only_the_run_stamp_foreign_keys(
    core_url: str,
) -> None:
    engine = make_engine(core_url)
    migrate_to(engine, "0012")
    populate(engine)
    rows, before = contents(engine), schema(engine)
    assert run_stamp_fks(before) == stamp_columns()  # 0012 has a key on every stamp: 0013 drops them all
    assert sum(len(r) for r in rows.values()) > 30

    upgrade(engine, "0013")
    after = schema(engine)
    assert run_stamp_fks(after) == set()
    assert after == without_run_stamp_fks(before)  # every other FK, index, unique and check, every column
    assert contents(engine) == rows

    result = CliRunner().invoke(app, ["core", "upgrade", "--core-url", core_url])  # and on to the latest
    assert result.exit_code == 0, result.output
    assert f"core schema upgraded from 0013 to {head_revision()}" in result.stdout, result.output
    assert current_revision(engine) == head_revision()
    assert contents(engine, before) == rows
    assert dangling_run_stamps(engine) == {}
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    assert_foreign_keys_enforced(engine)
    engine.dispose()


def test_downgrade_to_0012_restores_the_foreign_keys_and_keeps_every_row(core_url: str) -> None:
    engine = make_engine(core_url)
    migrate_to(engine, "0012")
    at_0012 = schema(engine)
    upgrade(engine)
    populate(engine)
    rows = contents(engine, at_0012)

    migrate_to(engine, "0012")

    assert current_revision(engine) == "0012"
    assert schema(engine) == at_0012
    assert contents(engine) == rows
    assert_foreign_keys_enforced(engine)
    upgrade(engine)  # and back
    assert contents(engine, at_0012) == rows
    engine.dispose()


def test_a_downgrade_that_would_leave_a_stamp_dangling_fails_and_changes_nothing(core_url: str) -> None:
    engine = make_engine(core_url)
    upgrade(engine)
    populate(engine)
    with engine.begin() as connection:  # possible since 0013: a stamp naming no run
        connection.execute(sa.update(Customer.__table__).where(Customer.id == 1).values(updated_run_id=999))
    rows, tables = contents(engine), schema(engine)
    assert dangling_run_stamps(engine) == {"customers.updated_run_id": 1}

    # SQLite: our foreign_key_check before commit; PostgreSQL: the constraint refuses the rows
    with pytest.raises((SchemaError, sa.exc.IntegrityError), match=r"(?i)foreign key"):
        migrate_to(engine, "0012")

    assert current_revision(engine) == head_revision()
    assert schema(engine) == tables  # on SQLite too: no half-rebuilt table, no _alembic_tmp_ leftover
    assert contents(engine) == rows
    assert_foreign_keys_enforced(engine)
    engine.dispose()


def test_a_commit_refused_by_a_reader_rolls_the_migration_back_and_leaves_foreign_keys_on(
    tmp_path: Path,
) -> None:
    """SQLITE_BUSY at COMMIT (a reader holds the file) leaves SQLite's transaction open and SQLAlchemy does not
    roll it back: switching foreign keys on failed in it too, and the connection went back to the pool inside
    the failed migration, foreign keys off, for the next commit on it to commit the migration."""
    path = tmp_path / "core.sqlite"
    engine = make_engine(f"sqlite:///{path}", poolclass=sa.pool.StaticPool)  # the migrating connection only
    sa.event.listen(engine, "connect", lambda dbapi, _: dbapi.execute("PRAGMA busy_timeout=100"))
    upgrade(engine, "0012")
    reader = sqlite3.connect(path, isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM load_runs").fetchall()  # a shared lock until it ends
        with pytest.raises(OperationalError, match="locked"):
            upgrade(engine)
    finally:
        reader.close()
    assert current_revision(engine) == "0012"
    assert_foreign_keys_enforced(engine)
    engine.dispose()


def test_a_migration_whose_commit_failed_is_not_committed_afterwards(tmp_path: Path) -> None:
    """A COMMIT that fails once (then would succeed) must not be retried by switching foreign keys on."""
    engine = make_engine(f"sqlite:///{tmp_path / 'core.sqlite'}", poolclass=sa.pool.StaticPool)
    upgrade(engine, "0012")
    failures = [OperationalError("COMMIT", {}, sqlite3.OperationalError("database is locked"))]

    def refuse_once(connection: sa.Connection) -> None:
        driver: Any = connection.connection.driver_connection
        if failures and driver.in_transaction:  # the migration's COMMIT, not a PRAGMA's
            raise failures.pop()

    sa.event.listen(engine, "commit", refuse_once)
    with pytest.raises(OperationalError, match="locked"):
        upgrade(engine)
    sa.event.remove(engine, "commit", refuse_once)
    assert current_revision(engine) == "0012"
    assert_foreign_keys_enforced(engine)
    engine.dispose()
