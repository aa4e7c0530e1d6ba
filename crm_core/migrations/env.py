"""Alembic environment: migrates the engine handed over in ``config.attributes['engine']``."""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import Connection, Engine

from crm_core.db import make_engine
from crm_core.errors import SchemaError
from crm_core.models import Base

config = context.config
target_metadata = Base.metadata


def _sqlite_foreign_keys(connection: Connection, on: bool) -> None:
    """Switch SQLite's foreign key enforcement (a no-op inside a transaction, so call it between them)."""
    connection.exec_driver_sql(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")
    state = connection.exec_driver_sql("PRAGMA foreign_keys").scalar()
    connection.commit()
    if bool(state) != on:
        raise SchemaError(
            f"could not switch SQLite foreign keys {'on' if on else 'off'} for the migration; nothing was"
            " changed: close other programs using the core database file and run `crmi core upgrade` again"
        )


def _sqlite_foreign_keys_back_on(connection: Connection) -> None:
    """Switch foreign keys on again after the migration, however it ended; never pool the connection without.

    A COMMIT that failed (SQLITE_BUSY: a reader held the file) leaves SQLite's transaction open and SQLAlchemy
    does not roll it back: the PRAGMA would be a no-op inside it, and the commit after it would commit the
    failed migration after all or, refused too, leave the connection in it, foreign keys off (the pool skips
    its reset then). A connection that still cannot switch them on is discarded.
    """
    try:
        driver: Any = connection.connection.driver_connection
        if driver.in_transaction:
            driver.rollback()
        _sqlite_foreign_keys(connection, on=True)
    except BaseException:
        connection.invalidate()
        raise


def _sqlite_check_foreign_keys(connection: Connection) -> None:
    """Fail (rolling the migration back) when a rebuilt table left a reference dangling."""
    dangling = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
    if dangling:
        shown = ", ".join(f"{row[0]} rowid {row[1]} -> {row[2]}" for row in dangling[:5])
        raise SchemaError(
            f"the migration would leave {len(dangling)} foreign keys dangling ({shown}); it was rolled back"
            " and the core is as it was"
        )


def run_migrations_online() -> None:
    engine: Engine = config.attributes.get("engine") or make_engine()
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        # SQLite drops a constraint by rebuilding the table (create, copy, drop, rename): with foreign keys
        # enforced, dropping a table other rows reference fails. Its documented procedure switches them off
        # outside the transaction and runs foreign_key_check before committing.
        if sqlite:
            _sqlite_foreign_keys(connection, on=False)
        try:
            with connection.begin():
                if sqlite:
                    # pysqlite begins its transaction at the first INSERT/UPDATE only: without this BEGIN
                    # the DDL before it would be committed even if the migration fails.
                    connection.exec_driver_sql("BEGIN")
                context.configure(
                    connection=connection,
                    target_metadata=target_metadata,
                    render_as_batch=sqlite,
                    compare_type=True,
                )
                context.run_migrations()
                if sqlite:
                    _sqlite_check_foreign_keys(connection)
        finally:
            if sqlite:
                _sqlite_foreign_keys_back_on(connection)


run_migrations_online()
