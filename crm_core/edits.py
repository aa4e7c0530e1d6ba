"""Changes made in the CRM itself (a salesperson edits a customer, wins a deal): journaled runs like any load.

Each call is one load run of mode ``edit``, committed with the change in one transaction: the change is in
the run journal (so it can be rolled back) and the record's ``updated_run_id`` points at the run, which is
what sync's change capture reads. A CRM front end that writes the core should go through here (or set
``updated_run_id`` to a committed run the same way).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Engine

from crm_core.db import session_factory
from crm_core.entities import ENTITIES
from crm_core.errors import LoadError
from crm_core.loading import get_or_start_run


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
) -> str:
    """Change fields of one record as the CRM would; return the run key of the change."""
    return edit_records(engine, entity, {record_id: values}, actor=actor, project=project)


def edit_records(
    engine: Engine,
    entity: str,
    changes: Mapping[int, Mapping[str, Any]],
    *,
    actor: str = "crm",
    project: str = "crm",
) -> str:
    """Change several records in one run (one transaction); return its run key."""
    definition = ENTITIES.get(entity)
    if definition is None:
        raise LoadError(f"unknown entity '{entity}'; known: {', '.join(ENTITIES)}")
    run_key = _new_run_key(f"edit-{actor}")
    factory = session_factory(engine)
    with factory() as session, session.begin():
        run = get_or_start_run(session, run_key, project, mode="edit")
        for record_id, values in changes.items():
            record: Any = session.get(definition.model, record_id)
            if record is None:
                raise LoadError(f"{entity} {record_id} does not exist")
            for name, value in values.items():
                field_def = definition.fields.get(name)
                if field_def is None:
                    raise LoadError(f"entity '{entity}' has no field '{name}'")
                setattr(record, field_def.column, value)
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
    factory = session_factory(engine)
    with factory() as session, session.begin():
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
