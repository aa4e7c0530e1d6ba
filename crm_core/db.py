"""Connecting to the CRM core and bringing its schema up to date with Alembic."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

import crm_core.steward_models  # noqa: F401  (the workbench tables join Base.metadata)
from crm_core.errors import SchemaError
from crm_core.models import Base

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
DEFAULT_SQLITE_PATH = Path("var") / "crm_core.sqlite"


def core_url(url: str | None = None) -> str:
    """Return the core database URL: ``url``, else ``$CRM_CORE_URL``, else a SQLite file under ``var/``."""
    if url:
        return url
    from_env = os.environ.get("CRM_CORE_URL")
    if from_env:
        return from_env
    return f"sqlite:///{DEFAULT_SQLITE_PATH.resolve()}"


def redact_url(url: str) -> str:
    """Return ``url`` with its password masked, for logs, errors and Dagster metadata."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a SQLAlchemy URL: mask everything after the scheme
        return url.split("://", 1)[0] + "://***"


# SQLite's page cache (default 2 MiB): a load inserts into a dozen indexes of tables that outgrow it at once,
# and every index page it must read back from the file costs a system call.
SQLITE_CACHE_KIB = 64 * 1024
SQLITE_BUSY_MILLISECONDS = 30_000  # how long a statement waits for another connection's write lock


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MILLISECONDS}")
    cursor.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
    cursor.close()


def make_engine(url: str | None = None, **kwargs: Any) -> Engine:
    """Create an engine for the core; SQLite gets foreign keys on and its parent folder created."""
    resolved = make_url(core_url(url))
    if resolved.get_backend_name() == "sqlite" and resolved.database not in (None, "", ":memory:"):
        Path(resolved.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(resolved, **kwargs)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def alembic_config(engine: Engine) -> Config:
    """Return an Alembic config that migrates ``engine`` with the migrations shipped in this package."""
    config = _script_config()
    config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply the Alembic migrations up to ``revision`` (idempotent)."""
    command.upgrade(alembic_config(engine), revision)


def _script_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


@lru_cache(maxsize=1)
def _revisions() -> tuple[str, frozenset[str]]:
    """Return the head revision this code needs and every revision it knows."""
    script = ScriptDirectory.from_config(_script_config())
    return ",".join(sorted(script.get_heads())), frozenset(s.revision for s in script.walk_revisions())


def head_revision() -> str:
    """Return the schema revision this code needs (the newest migration shipped with it)."""
    return _revisions()[0]


def current_revision(engine: Engine) -> str | None:
    """Return the core's schema revision, or None when it has none (an empty database)."""
    with engine.connect() as connection:
        heads = MigrationContext.configure(connection).get_current_heads()
    return ",".join(sorted(heads)) if heads else None


UPGRADE_HINT = (
    'back it up (docs/deploy.md, "Backups and restore"), then run `crmi core upgrade{option}`{tail}'
)
# A URL with a password is shown masked (a *** cannot be copied): the command names where the real URL is kept.
UPGRADE_SECRET_TAIL = (
    " with CRM_CORE_URL set to this core's URL (as in the services' env file), or with the same --core-url "
    "you gave (the password is not shown here)"
)


SCHEMA_LOCK = 0x63726D69  # 'crmi': the PostgreSQL advisory lock taken while an empty core gets its schema


@contextmanager
def _schema_lock(engine: Engine) -> Iterator[None]:
    """Serialize schema creation between processes (parallel Dagster steps on an empty PostgreSQL core).

    Without it two steps starting together both create the schema and one fails on ``alembic_version``.
    SQLite cores run their steps in one process.
    """
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": SCHEMA_LOCK})
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": SCHEMA_LOCK})
            connection.commit()


def ensure_schema(engine: Engine) -> None:
    """Create the schema in an empty database; refuse a core at another revision with one clear error.

    An existing core is never migrated behind the consultant's back: a toolkit update that changes the
    schema asks for ``crmi core upgrade`` (after a backup), instead of failing later on a missing column.
    """
    where = redact_url(engine.url.render_as_string(hide_password=False))
    default = make_url(f"sqlite:///{DEFAULT_SQLITE_PATH.resolve()}")
    option, tail = ("", "") if engine.url == default else (f" --core-url {where}", "")
    if engine.url.password and option:
        option, tail = ' --core-url "$CRM_CORE_URL"', UPGRADE_SECRET_TAIL
    try:
        current = current_revision(engine)
        ours = (
            set(inspect(engine).get_table_names()) & set(Base.metadata.tables) if current is None else set()
        )
    except SQLAlchemyError as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise SchemaError(f"cannot open the core at {where}: {detail}") from None
    head, known = _revisions()
    if current == head:
        return
    if current is None and not ours:
        with _schema_lock(engine):
            if current_revision(engine) is None:  # not created meanwhile by a process we waited for
                upgrade(engine)
        return
    if current is None:
        raise SchemaError(
            f"the core at {where} has tables ({', '.join(sorted(ours)[:3])}, …) but no schema revision: it was "
            "not created by `crmi core upgrade`; point --core-url at an empty database or at the real core"
        )
    if not set(current.split(",")) <= known:
        raise SchemaError(
            f"the core at {where} is at schema revision {current}, which this toolkit does not know (its newest "
            f"is {head}): a newer crm-integration upgraded it; run that version"
        )
    raise SchemaError(
        f"the core at {where} is at schema revision {current}, this toolkit needs {head}: "
        + UPGRADE_HINT.format(option=option, tail=tail)
    )


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Return a session factory that keeps loaded objects usable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


def refresh_statistics(connection: Connection, tables: Iterable[str]) -> None:
    """Let PostgreSQL's planner see what a bulk load wrote (no-op elsewhere).

    Without fresh statistics a table that grew from nothing within the transaction is planned as empty, and
    a key lookup (``external_key = ANY(...)``) filters every row of the entity instead of using the index:
    seconds per chunk instead of milliseconds. ANALYZE counts the transaction's own uncommitted rows.
    """
    if connection.dialect.name == "postgresql":
        quote = connection.dialect.identifier_preparer.quote
        connection.execute(text(f"ANALYZE {', '.join(quote(n) for n in sorted(set(tables)))}"))
