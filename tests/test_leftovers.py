"""Leftovers of the streaming review: work done once, rejects stored once, the extraction's columns whole."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from crm_core import loading
from tests.conftest import PG_URL, reset_postgres, server_or_skip


@pytest.fixture
def statements() -> Iterator[tuple[sa.Engine, list[str]]]:
    """The PostgreSQL test database, wiped, and the statements run on it (as tests/test_loading_fast.py does)."""
    engine = server_or_skip(PG_URL, "PostgreSQL")
    reset_postgres(engine)
    seen: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", note)
    yield engine, seen
    sa.event.remove(engine, "before_cursor_execute", note)
    engine.dispose()


@pytest.mark.postgres
def test_an_id_allocator_looks_its_sequence_up_once(statements: tuple[sa.Engine, list[str]]) -> None:
    engine, seen = statements
    table = sa.Table("things", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True))
    table.metadata.create_all(engine)
    with Session(engine) as session:
        allocator = loading._IdAllocator(session, table)
        seen.clear()
        ids = [allocator.take(1) for _ in range(40)] + allocator.take_many([20] * 30)  # blocks of 16, then 20
    assert ids == list(range(1, 71))
    assert sum("nextval" in s for s in seen) == 5  # three blocks of 16, then two of 20
    assert sum("pg_get_serial_sequence" in s for s in seen) == 1
