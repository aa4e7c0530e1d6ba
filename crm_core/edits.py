"""Changes made in the CRM itself (a salesperson edits a customer, wins a deal): journaled runs like any load.

Each call is one load run of mode ``edit``, committed with the change in one transaction: the change is in
the run journal (so it can be rolled back) and the record's ``updated_run_id`` points at the run, which is
what sync's change capture reads. A CRM front end that writes the core should go through here (or set
``updated_run_id`` to a committed run the same way).
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from sqlalchemy import Engine, select, text, update
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from crm_core.db import SQLITE_BUSY_MILLISECONDS, session_factory
from crm_core.entities import ENTITIES
from crm_core.errors import DedupError, EditWaitError, LoadError, OwnedFieldError, SyncLoadWaitError
from crm_core.journal import to_json
from crm_core.loading import get_or_start_run
from crm_core.models import ExternalId, LoadRun, SyncConflict, SyncState
from crm_core.settings import env_number
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
    return env_number(EDIT_WAIT_ENV, 30.0, error)


def _share_fence(session: Session, wait: float) -> None:
    """Take the fence shared for the transaction on PostgreSQL, waiting at most ``wait`` seconds for an inbound
    load that holds it: only the fence is waited for this long, a row lock keeps its usual wait."""
    session.execute(text(f"SET LOCAL lock_timeout = {max(1, round(wait * 1000))}"))
    session.execute(text("SELECT pg_advisory_xact_lock_shared(:key)"), {"key": EDIT_FENCE})
    session.execute(text("SET LOCAL lock_timeout = DEFAULT"))


def core_busy_message(engine: Engine, what: str, wait: float, *, configurable: bool = True) -> str:
    """The refusal of a person's write (``what``: ``edit``, ``steward decision``…) that waited ``wait`` seconds
    for SQLite's write lock: who holds the core where the run lock and the run journal tell (a sync, a command,
    a load run marked running), that nothing was changed, and what to do (``configurable``: the wait was
    ``CRMI_EDIT_WAIT_SECONDS``, which can be raised)."""
    from crm_core.runs import core_lock_holder  # only a refusal needs it

    writers: list[str] = []
    with suppress(SQLAlchemyError, OSError):  # naming the writer is a courtesy: the refusal stands without it
        holder = core_lock_holder(engine)
        if holder:
            writers.append(holder)
    with suppress(SQLAlchemyError), engine.connect() as connection:
        runs = connection.execute(
            select(LoadRun.run_key, LoadRun.mode)
            .where(LoadRun.status == "running")
            .order_by(LoadRun.id)
            .limit(3)
        ).all()
        writers.extend(f"load run {key} ({mode}) is running" for key, mode in runs)
    who = "; ".join(writers) or "a load, a sync or another program writing into it"
    return (
        f"the core is busy with another writer ({who}): the {what} waited {wait:g} s for it; nothing was "
        "changed: wait for it to finish (`crmi runs list` shows the load runs) and try again"
        + (f" (or raise {EDIT_WAIT_ENV})" if configurable else "")
    )


def _take_write_lock(session: Session, what: str) -> None:
    """Take SQLite's write lock for ``session``'s transaction now, waiting at most ``CRMI_EDIT_WAIT_SECONDS`` for
    another writer (rather than the engine's 30 s busy timeout, and then the driver's "database is locked");
    then :class:`SyncLoadWaitError` saying who holds the core. The write is a no-op one (no row has id -1)."""
    wait = _edit_wait(DedupError)  # a wrong setting is no busy core: nothing to try again
    connection = session.connection()
    connection.exec_driver_sql(f"PRAGMA busy_timeout={max(1, round(wait * 1000))}")
    try:
        runs: Any = LoadRun.__table__
        connection.execute(update(runs).where(runs.c.id == -1).values(status=runs.c.status))
    except OperationalError as exc:
        if "locked" not in str(exc):
            raise
        raise SyncLoadWaitError(core_busy_message(connection.engine, what, wait)) from None
    finally:  # held now, the rest of the transaction waits for no writer; readers keep the engine's timeout
        with suppress(SQLAlchemyError):
            connection.exec_driver_sql(f"PRAGMA busy_timeout={SQLITE_BUSY_MILLISECONDS}")


def share_edit_fence(session: Session, what: str) -> None:
    """Wait, as a CRM edit does, while a sync's inbound load keeps edits out (:func:`fence_edits`), and keep the
    next one out until ``session``'s transaction ends: what a steward's merge, undo or decision (``what``) calls
    first in its transaction, before it reads the records it writes (read before the wait, they would be what
    the load found, and the merge would write them back over what it loaded).

    PostgreSQL: the fence shared, waited for at most ``CRMI_EDIT_WAIT_SECONDS``; then :class:`SyncLoadWaitError`
    and the transaction must roll back (nothing was written before). SQLite: its write lock, which lets one
    writer at a time in (a sync's load takes it first: :func:`fence_edits`; a load run's or a script's
    transaction holds it too), taken now and waited for as long; then :class:`SyncLoadWaitError` saying the core
    is busy with another writer, naming it where it can (:func:`core_busy_message`).
    """
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        _take_write_lock(session, what)
        return
    if dialect != "postgresql":
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
    (:func:`fence_edits`) or another writer holds SQLite's write lock, and says so if that lasts too long
    (:class:`EditWaitError`, naming the writer on SQLite), instead of a driver's "database is locked"."""
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
            if sqlite:
                raise EditWaitError(core_busy_message(engine, "edit", wait)) from None
            raise EditWaitError(
                f"the edit waited {wait:g} s for a sync taking the ERP's changes in, which still holds the core; "
                f"nothing was changed: make the edit again in a moment (or raise {EDIT_WAIT_ENV})"
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


@dataclass(frozen=True)
class OwnedField:
    """A field a sync target owns (its ``ownership`` in project.yaml): the CRM's edits leave it to the target."""

    entity: str
    field: str
    target: str  # the sync target's name in project.yaml (``u8``)
    system: str  # the source whose keys are the target's keys in the crosswalk (``erp_u8``)
    label: str  # what its users call it (``U8``)


def _same_value(left: Any, right: Any) -> bool:
    """Return True when an edit's value is the one stored (``12.5`` is the stored ``Decimal('12.50')``)."""
    if left == right:
        return True
    if isinstance(left, Decimal) or isinstance(right, Decimal):
        try:
            return Decimal(str(left)) == Decimal(str(right))
        except (InvalidOperation, ValueError):
            return False
    return False


def _text(value: Any) -> str | None:
    value = to_json(value)
    return None if value is None else str(value)


def _owned_changes(
    session: Session, entity: str, record_id: int, values: Mapping[str, Any], changed: Sequence[str],
    owned: Sequence[OwnedField],
) -> tuple[list[tuple[OwnedField, str | None]], list[OwnedField]]:  # fmt: skip
    """Split the owned fields among ``changed`` whose target knows the record (a key of it in the crosswalk, or an
    exchange): those the edit sets apart from what the target holds as far as the core knows (with that value,
    None: unknown, the record's own), and those it sets back to it.

    A record the target does not know yet is the CRM's to fill in: its add carries what the mapping sends.
    """
    apart: list[tuple[OwnedField, str | None]] = []
    back: list[OwnedField] = []
    for owner in owned:
        if owner.entity != entity or owner.field not in changed:
            continue
        state = session.scalar(select(SyncState.core_values).where(
            SyncState.target == owner.target, SyncState.entity == entity, SyncState.entity_id == record_id
        ))  # fmt: skip
        keyed = session.scalar(select(ExternalId.id).where(
            ExternalId.entity == entity, ExternalId.entity_id == record_id, ExternalId.system == owner.system
        ).limit(1))  # fmt: skip
        if state is None and keyed is None:
            continue
        held = _text((state or {}).get(owner.field)) if owner.field in (state or {}) else None
        value = values[owner.field]
        if held is not None and (_same_value(value, held) or _text(value) == held):
            back.append(owner)  # the target's own value: the CRM agrees with it again
        else:
            apart.append((owner, held))
    return apart, back


def _owned_message(which: str, owner: OwnedField) -> str:
    return (
        f"{which}: {owner.field} is owned by {owner.label} (sync target '{owner.target}'): change it in "
        f"{owner.label}, and the next inbound sync brings it here; nothing was changed (--force-owned, or "
        f"force_owned=True, makes the CRM differ from {owner.label} on purpose, recorded as an open sync conflict)"
    )


def _record_forced(
    session: Session, run_id: int, entity: str, record_id: int, owner: OwnedField, before: Any, value: Any,
    held: str | None,
) -> None:  # fmt: skip
    """Record a forced edit of an owned field as an open conflict with its target (one per field and target)."""
    target_value = held if held is not None else _text(before)
    conflict = session.scalar(select(SyncConflict).where(
        SyncConflict.target == owner.target, SyncConflict.entity == entity, SyncConflict.entity_id == record_id,
        SyncConflict.field == owner.field, SyncConflict.status == "open",
    ).limit(1))  # fmt: skip
    if conflict is not None:
        conflict.crm_value = _text(value)
        return
    session.add(SyncConflict(
        target=owner.target, entity=entity, entity_id=record_id, field=owner.field, exchanged_value=target_value,
        crm_value=_text(value), target_value=target_value, owner=owner.target, status="open", load_run_id=run_id,
        created_at=dt.datetime.now(dt.UTC),
    ))  # fmt: skip


def _close_agreed(session: Session, entity: str, record_id: int, owner: OwnedField) -> None:
    """Settle an open conflict on an owned field the CRM set back to the target's value."""
    for conflict in session.scalars(select(SyncConflict).where(
        SyncConflict.target == owner.target, SyncConflict.entity == entity, SyncConflict.entity_id == record_id,
        SyncConflict.field == owner.field, SyncConflict.status == "open",
    )):  # fmt: skip
        conflict.status = "resolved_target"


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
    owned: Sequence[OwnedField] = (),
    force_owned: bool = False,
) -> str:
    """Change fields of one record as the CRM would; return the run key of the change."""
    return edit_records(engine, entity, {record_id: values}, actor=actor, project=project, as_read=as_read,
                        owned=owned, force_owned=force_owned)  # fmt: skip


def edit_records(
    engine: Engine,
    entity: str,
    changes: Mapping[int, Mapping[str, Any]],
    *,
    actor: str = "crm",
    project: str = "crm",
    as_read: bool = False,
    owned: Sequence[OwnedField] = (),
    force_owned: bool = False,
) -> str:
    """Change several records in one run (one transaction); return its run key.

    A value not in the form the core keeps its field in is refused (:func:`_refuse_malformed`), unless
    ``as_read``: a value a mapping read from a source (a sync conflict settled for the target's value), which a
    load would have written as it is.

    ``owned``: the fields sync targets own (``integration.sync.spec.owned_fields`` of the project). A change of
    one of them on a record its target knows is refused (:class:`OwnedFieldError`, nothing changed): the target's
    value wins there and comes back with its next change. ``force_owned`` makes it all the same and records an
    open sync conflict per field and target, which holds the record back from that target until a person
    decides (``crmi sync conflicts``) or the target's value changes.
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
            stored = {name: getattr(record, definition.fields[name].column) for name in values}
            if not as_read:
                _refuse_malformed(entity, f"{entity} {record_id}", values, stored)
            changed = [name for name in values if not _same_value(values[name], stored[name])]
            forced, agreed = (
                _owned_changes(session, entity, record_id, values, changed, owned) if owned else ([], [])
            )
            if forced and not force_owned:
                raise OwnedFieldError(_owned_message(f"{entity} {record_id}", forced[0][0]))
            for name, value in values.items():
                setattr(record, definition.fields[name].column, value)
            record.updated_run_id = run.id
            for owner, held in forced:
                _record_forced(session, run.id, entity, record_id, owner, stored[owner.field],
                               values[owner.field], held)  # fmt: skip
            for owner in agreed:
                _close_agreed(session, entity, record_id, owner)
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
