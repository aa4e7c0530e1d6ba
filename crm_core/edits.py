"""Changes made in the CRM itself (a salesperson edits a customer, wins a deal): journaled runs like any load.

Each call is one load run of mode ``edit``, committed with the change in one transaction: the change is in
the run journal (so it can be rolled back) and the record's ``updated_run_id`` points at the run, which is
what sync's change capture reads. A CRM front end that writes the core should go through here (or set
``updated_run_id`` to a committed run the same way).
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any

from sqlalchemy import Engine, text, update
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from crm_core.db import SQLITE_BUSY_MILLISECONDS, session_factory
from crm_core.entities import ENTITIES
from crm_core.errors import LoadError, SyncLoadWaitError
from crm_core.loading import get_or_start_run
from crm_core.models import LoadRun
from crm_core.validation import E164, EMAIL, uscc_is_valid

# 'crme': the PostgreSQL advisory lock a sync's inbound load holds alone for its transaction and an edit (or a
# steward's merge, undo or decision) shares
EDIT_FENCE = 0x63726D65
# how long an edit, or a steward's write, waits for a sync's inbound load (default 30)
EDIT_WAIT_ENV = "CRMI_EDIT_WAIT_SECONDS"


def fence_edits(session: Session, run_id: int) -> None:
    """Keep CRM edits out until ``session``'s transaction ends: what a sync's inbound load calls before it reads
    the records whose values it decides (ownership, conflicts), so no edit can commit between that read and its
    write and be overwritten with the value read before it. Stewards' merges, undos and decisions are kept out
    the same way (:func:`share_edit_fence`).

    PostgreSQL: the transaction's advisory lock, taken alone (edits share it). SQLite: the database's write lock,
    taken by a first write (the run's own row, unchanged); an edit waits for it as for any writer.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": EDIT_FENCE})
    else:
        runs: Any = LoadRun.__table__
        session.execute(update(runs).where(runs.c.id == run_id).values(status=runs.c.status))


def _edit_wait(error: type[Exception] = LoadError) -> float:
    """Seconds an edit waits for the core (``CRMI_EDIT_WAIT_SECONDS``, default 30); ``error`` says it is wrong."""
    raw = os.environ.get(EDIT_WAIT_ENV) or "30"
    try:
        wait = float(raw)
    except ValueError:
        wait = math.nan
    if not math.isfinite(wait) or wait <= 0:
        raise error(f"{EDIT_WAIT_ENV} must be a number of seconds above 0, not {raw!r}")
    return wait


def _share_fence(session: Session, wait: float) -> None:
    """Take the fence shared for the transaction on PostgreSQL, waiting at most ``wait`` seconds for an inbound
    load that holds it: only the fence is waited for this long, a row lock keeps its usual wait."""
    session.execute(text(f"SET LOCAL lock_timeout = {max(1, round(wait * 1000))}"))
    session.execute(text("SELECT pg_advisory_xact_lock_shared(:key)"), {"key": EDIT_FENCE})
    session.execute(text("SET LOCAL lock_timeout = DEFAULT"))


def share_edit_fence(session: Session, what: str) -> None:
    """Wait, as a CRM edit does, while a sync's inbound load keeps edits out (:func:`fence_edits`), and keep the
    next one out until ``session``'s transaction ends: what a steward's merge, undo or decision (``what``) calls
    first in its transaction, before it reads the records it writes (read before the wait, they would be what
    the load found, and the merge would write them back over what it loaded).

    PostgreSQL: the fence shared, waited for at most ``CRMI_EDIT_WAIT_SECONDS``; then :class:`SyncLoadWaitError`
    and the transaction must roll back (nothing was written before). SQLite: nothing to take, its write lock lets
    one writer at a time in (a sync's load takes it first: :func:`fence_edits`).
    """
    if session.get_bind().dialect.name != "postgresql":
        return
    wait = _edit_wait(SyncLoadWaitError)
    try:
        _share_fence(session, wait)
    except OperationalError as exc:
        if "lock timeout" not in str(exc):
            raise
        raise SyncLoadWaitError(
            f"the {what} waited {wait:g} s for a sync taking the ERP's changes in, which still holds the core's "
            f"records; nothing was changed: try again in a moment (or raise {EDIT_WAIT_ENV})"
        ) from None


@contextmanager
def _editing(engine: Engine) -> Iterator[Session]:
    """A transaction for a CRM edit: it waits while a sync's inbound load holds the core's records
    (:func:`fence_edits`) or another writer holds SQLite's write lock, and says so if that lasts too long,
    instead of a driver's "database is locked"."""
    wait = _edit_wait()
    milliseconds = max(1, round(wait * 1000))
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as connection:  # the timeout is set and reset on this connection, not another one
        try:
            with session_factory(engine)(bind=connection) as session, session.begin():
                if sqlite:
                    session.execute(text(f"PRAGMA busy_timeout={milliseconds}"))
                elif engine.dialect.name == "postgresql":
                    _share_fence(session, wait)
                yield session
        except OperationalError as exc:
            if "locked" not in str(exc) and "lock timeout" not in str(exc):
                raise
            holder = (
                "a sync taking the ERP's changes in"
                if not sqlite
                else "another write (a sync, a load, a merge)"
            )
            raise LoadError(
                f"the edit waited {wait:g} s for {holder}, which still holds the core; nothing was changed: make "
                f"the edit again in a moment (or raise {EDIT_WAIT_ENV})"
            ) from None
        finally:
            if sqlite:  # the connection goes back to the pool with the engine's own timeout
                with suppress(SQLAlchemyError):  # a connection lost meanwhile: the pool drops it
                    connection.exec_driver_sql(f"PRAGMA busy_timeout={SQLITE_BUSY_MILLISECONDS}")


# The forms the core keeps these fields in (what the mappings' transforms write): a CRM front end hands them in
# that form. A raw 0571-88889999 would differ from the ERP's row as the sync reads it (+8657188889999) on every
# run, and the sync would send the CRM's value back for ever.
_PHONE = (E164, "an E.164 phone number such as +8657188889999 (country code, no spaces or dashes)")
_FORMATS: dict[tuple[str, str], tuple[re.Pattern[str], str]] = {
    **{(entity, name): _PHONE for entity, names in (("customer", ("phone",)), ("contact", ("mobile", "phone")),
                                                     ("sales_rep", ("phone",))) for name in names},
    **{(entity, "email"): (EMAIL, "an e-mail address in lower case") for entity in ("customer", "contact", "sales_rep")},
}  # fmt: skip


_CN_TRUNK = re.compile(r"^\+860")  # +86 0571…: the trunk 0 kept after the country code


def _refuse_malformed(
    entity: str, which: str, values: Mapping[str, Any], stored: Mapping[str, Any] | None = None
) -> None:
    """Raise LoadError when a value is not in the form the core keeps its field in (nothing is written).

    A value equal to the one ``stored`` passes (a front end saving the whole form sends the fields it did not
    change, in whatever form a load wrote them)."""
    for name, value in values.items():
        if value is None or value == "" or (stored is not None and stored.get(name) == value):
            continue
        if entity == "customer" and name == "credit_code":
            text = str(value)
            if not uscc_is_valid(text) or text != text.strip().upper() or not text.isalnum():
                raise LoadError(f"{which}: credit_code {value!r} is not a valid 统一社会信用代码 as the core keeps "
                                "it (18 characters, upper case, no spaces, check digit); nothing was changed")  # fmt: skip
            continue
        form = _FORMATS.get((entity, name))
        if form is None:
            continue
        kept = isinstance(value, str) and form[0].fullmatch(value) is not None
        if kept and form[0] is EMAIL:
            kept = value == value.strip().lower()
        elif kept:
            kept = not _CN_TRUNK.match(value)
        if not kept:
            raise LoadError(f"{which}: {name} {value!r} is not {form[1]}; nothing was changed")


def _new_run_key(prefix: str) -> str:
    return f"{prefix}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"


def edit_record(
    engine: Engine,
    entity: str,
    record_id: int,
    values: Mapping[str, Any],
    *,
    actor: str = "crm",
    project: str = "crm",
    as_read: bool = False,
) -> str:
    """Change fields of one record as the CRM would; return the run key of the change."""
    return edit_records(engine, entity, {record_id: values}, actor=actor, project=project, as_read=as_read)


def edit_records(
    engine: Engine,
    entity: str,
    changes: Mapping[int, Mapping[str, Any]],
    *,
    actor: str = "crm",
    project: str = "crm",
    as_read: bool = False,
) -> str:
    """Change several records in one run (one transaction); return its run key.

    A value not in the form the core keeps its field in is refused (:func:`_refuse_malformed`), unless
    ``as_read``: a value a mapping read from a source (a sync conflict settled for the target's value), which a
    load would have written as it is.
    """
    definition = ENTITIES.get(entity)
    if definition is None:
        raise LoadError(f"unknown entity '{entity}'; known: {', '.join(ENTITIES)}")
    run_key = _new_run_key(f"edit-{actor}")
    with _editing(engine) as session:
        run = get_or_start_run(session, run_key, project, mode="edit")
        for record_id, values in changes.items():
            record: Any = session.get(definition.model, record_id)
            if record is None:
                raise LoadError(f"{entity} {record_id} does not exist")
            unknown = [name for name in values if name not in definition.fields]
            if unknown:
                raise LoadError(f"entity '{entity}' has no field '{unknown[0]}'")
            if not as_read:
                stored = {name: getattr(record, definition.fields[name].column) for name in values}
                _refuse_malformed(entity, f"{entity} {record_id}", values, stored)
            for name, value in values.items():
                setattr(record, definition.fields[name].column, value)
            record.updated_run_id = run.id
        session.flush()
        run.status = "succeeded"
        run.finished_at = dt.datetime.now(dt.UTC)
    return run_key


def create_record(engine: Engine, entity: str, values: Mapping[str, Any], *, actor: str = "crm") -> int:
    """Create one record as the CRM would (e.g. a salesperson's new customer); return its id."""
    return create_records(engine, entity, [values], actor=actor)[0]


def create_records(
    engine: Engine, entity: str, rows: Sequence[Mapping[str, Any]], *, actor: str = "crm"
) -> list[int]:
    """Create records in one CRM run (one transaction); return their ids in order."""
    definition = ENTITIES.get(entity)
    if definition is None:
        raise LoadError(f"unknown entity '{entity}'; known: {', '.join(ENTITIES)}")
    for number, values in enumerate(rows, start=1):
        _refuse_malformed(entity, f"new {entity} {number}", values)
    with _editing(engine) as session:
        run = get_or_start_run(session, _new_run_key(f"edit-{actor}"), "crm", mode="edit")
        records: list[Any] = []
        for values in rows:
            columns: dict[str, Any] = {}
            for name, value in values.items():
                field_def = definition.fields.get(name)
                if field_def is None:
                    raise LoadError(f"entity '{entity}' has no field '{name}'")
                columns[field_def.column] = value
            records.append(definition.model(**columns, created_run_id=run.id, updated_run_id=run.id))
        session.add_all(records)
        session.flush()
        run.status = "succeeded"
        run.finished_at = dt.datetime.now(dt.UTC)
        return [int(record.id) for record in records]
