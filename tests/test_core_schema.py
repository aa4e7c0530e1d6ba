"""The core schema: migrations match the models, run on SQLite and PostgreSQL, and seed the stages."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from crm_core.db import make_engine, redact_url, upgrade
from crm_core.entities import ENTITIES, LOAD_ORDER
from crm_core.models import Base, Customer, ExternalId, LoadRun, Opportunity, Stage
from crm_core.stages import STAGES, resolve_stage

CRM_CORE = Path(__file__).resolve().parents[1] / "crm_core"


def test_migration_creates_exactly_the_models(core_url: str) -> None:
    engine = make_engine(core_url)
    upgrade(engine)
    upgrade(engine)  # idempotent
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == []
    engine.dispose()


def test_migration_seeds_the_stage_master(core_url: str) -> None:
    engine = make_engine(core_url)
    upgrade(engine)
    with Session(engine) as session:
        stages = {s.code: s for s in session.scalars(sa.select(Stage))}
    assert set(stages) == {s["code"] for s in STAGES}
    assert stages["won"].is_won and stages["won"].is_closed and stages["won"].default_probability == 100
    assert stages["lost"].is_closed and not stages["lost"].is_won
    assert not stages["proposal"].is_closed
    engine.dispose()


def test_crosswalk_key_is_unique_per_entity_and_system(core_url: str) -> None:
    engine = make_engine(core_url)
    upgrade(engine)
    with Session(engine) as session:
        session.add(ExternalId(entity="customer", entity_id=1, system="erp", external_key="C1"))
        session.add(
            ExternalId(entity="customer", entity_id=2, system="crm", external_key="C1")
        )  # other system: fine
        session.commit()
        session.add(ExternalId(entity="customer", entity_id=3, system="erp", external_key="C1"))
        with pytest.raises(IntegrityError):
            session.commit()
    engine.dispose()


def test_foreign_keys_are_enforced(core_url: str) -> None:
    engine = make_engine(core_url)
    upgrade(engine)
    with Session(engine) as session:
        session.add(Opportunity(customer_id=999, name="x", stage_code="won", currency="CNY"))
        with pytest.raises(IntegrityError):
            session.commit()
    engine.dispose()


def test_customer_rows_record_the_run_and_branch_parent(core_url: str) -> None:
    engine = make_engine(core_url)
    upgrade(engine)
    with Session(engine) as session:
        run = LoadRun(run_key="r1", project="p", stats={})
        session.add(run)
        session.flush()
        parent = Customer(name="深圳市腾达科技有限公司", created_run_id=run.id, updated_run_id=run.id)
        session.add(parent)
        session.flush()
        branch = Customer(name="深圳市腾达科技有限公司北京分公司", parent_id=parent.id, is_branch=True)
        session.add(branch)
        session.commit()
        assert session.get(Customer, branch.id).parent_id == parent.id  # type: ignore[union-attr]
        assert session.get(Customer, parent.id).created_run_id == run.id  # type: ignore[union-attr]
        assert parent.status == "active"
    engine.dispose()


def test_crm_core_never_imports_dagster() -> None:
    for path in CRM_CORE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names.append(node.module)
            assert not any(n.split(".")[0] == "dagster" for n in names), f"{path} imports dagster"


def test_entities_follow_the_models_and_load_order_respects_references() -> None:
    assert ENTITIES["opportunity"].fields["customer"].references == "customer"
    assert ENTITIES["opportunity"].fields["customer"].required
    assert ENTITIES["opportunity"].fields["stage"].column == "stage_code"
    assert "id" not in ENTITIES["customer"].fields and "merged_into_id" not in ENTITIES["customer"].fields
    for position, name in enumerate(LOAD_ORDER):
        for field in ENTITIES[name].references.values():
            assert field.references in LOAD_ORDER[: position + 1], (name, field.name)


@pytest.mark.parametrize(
    ("value", "code"),
    [("赢单", "won"), ("Closed Won", "won"), ("closed  won", "won"), ("Ｎｅｇｏｔｉａｔｉｏｎ/Ｒｅｖｉｅｗ", "negotiation"),
     ("方案报价", "proposal"), ("Prospecting", "initial_contact"), ("lost", "lost"), ("随便", None)],
)  # fmt: skip
def test_stage_names_resolve_to_codes(value: str, code: str | None) -> None:
    assert resolve_stage(value) == code


def test_redact_url_hides_the_password() -> None:
    assert "s3cret" not in redact_url("postgresql://u:s3cret@db/x")
    assert redact_url("postgresql://u:s3cret@db/x") == "postgresql://u:***@db/x"
