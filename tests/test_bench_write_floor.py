"""`make bench-write-floor`: the records and crosswalk rows of a finished core written again, entity by entity."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sqlalchemy.orm import Session

from crm_core.db import make_engine, upgrade
from crm_core.models import Contact, Customer, ExternalId
from tests.conftest import REPO


def _core_with_two_customers_and_a_contact(path: Path) -> None:
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    with Session(engine) as session, session.begin():
        session.add_all([Customer(id=1, name="腾达科技有限公司"), Customer(id=2, name="Acme Ltd")])
        session.flush()
        session.add(Contact(id=1, name="王军", customer_id=1))
        keys = [("customer", 1, "erp", "C1"), ("customer", 2, "erp", "C2"), ("customer", 2, "crm", "A9"),
                ("contact", 1, "erp", "P1")]  # fmt: skip
        session.add_all(ExternalId(entity=e, entity_id=r, system=s, external_key=k) for e, r, s, k in keys)
    engine.dispose()


def test_the_floor_writes_every_record_and_crosswalk_row_of_the_core_and_prints_one_json_line(
    tmp_path: Path,
) -> None:
    core = tmp_path / "core.sqlite"
    _core_with_two_customers_and_a_contact(core)
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_write_floor.py"), "--core", str(core),
         "--without-crosswalk-entity-indexes"],
        capture_output=True, text=True, check=True, cwd=REPO,
    )  # fmt: skip
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    figures = json.loads(lines[0])
    for variant in ("floor", "without_crosswalk_entity_indexes"):
        measured = figures[variant]
        assert measured["steps"]["customer"]["records"] == 2
        assert measured["steps"]["customer"]["crosswalk_rows"] == 3
        assert measured["steps"]["contact"]["records"] == 1
        assert measured["steps"]["contact"]["crosswalk_rows"] == 1
        assert "opportunity" not in measured["steps"]  # an entity without records is not timed
        assert (measured["records"], measured["crosswalk_rows"]) == (3, 4)


def test_a_missing_core_says_how_to_make_one(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_write_floor.py"), "--core", str(tmp_path / "none.sqlite")],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert result.returncode != 0
    assert "bench_e2e.py" in result.stderr and "--keep" in result.stderr
