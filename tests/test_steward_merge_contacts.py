"""A steward's merge of two customers dedups their contacts as an automatic merge does; its undo restores them."""

from __future__ import annotations

import io
from typing import Any

import pytest
import sqlalchemy as sa
from openpyxl import load_workbook

from crm_core.db import session_factory
from crm_core.merging import undo_merge
from crm_core.models import Contact, Customer, LoadRun, MatchCandidate, MergeLog
from integration.dedup.workflow import decide
from integration.steward import security
from integration.steward.decisions import Rules, decide_cluster
from integration.steward.queue import QueueFilter
from integration.steward.sheets import export_queue, import_decisions
from tests.test_dedup_contacts import seed

LEFT, RIGHT = 93, 121  # the planted 宁波 pair of `make demo`


def planted(url: str) -> tuple[sa.Engine, int]:
    """The seeded core plus two customers waiting for a steward, each with 周敏 +8613857412345."""
    engine, _ = seed(url)
    with session_factory(engine)() as session, session.begin():
        run = LoadRun(run_key="plant", project="t", status="succeeded")
        session.add(run)
        session.flush()
        for customer_id, source in ((LEFT, "erp"), (RIGHT, "sheet")):
            session.add(Customer(id=customer_id, name="宁波海曙贸易有限公司", created_run_id=run.id))
            session.flush()
            session.add(
                Contact(customer_id=customer_id, name="周敏", mobile="+8613857412345",
                        email=f"zhoumin@{source}.cn", created_run_id=run.id)
            )  # fmt: skip
        candidate = MatchCandidate(entity="customer", left_id=LEFT, right_id=RIGHT, probability=0.8)
        session.add(candidate)
        session.flush()
        return engine, candidate.id


def contact_rows(engine: sa.Engine) -> dict[int, dict[str, Any]]:
    """The planted customers' contacts, whole rows, by id."""
    with engine.connect() as connection:
        rows = connection.execute(
            sa.select(Contact.__table__).where(Contact.name == "周敏", Contact.mobile == "+8613857412345")
        ).mappings()
        return {row["id"]: dict(row) for row in rows}


def steward(engine: sa.Engine) -> security.Principal:
    with engine.begin() as connection:
        user_id = security.add_user(connection, "li", "steward", "a long enough password", actor=None)
    return security.Principal(user_id, "li", "steward", 0, "csrf")


def merge_by(path: str, engine: sa.Engine, candidate_id: int) -> None:
    """Merge the planted pair as a steward: the CLI's decide, the workbench, or a filled sheet."""
    if path == "cli":
        decide(engine, candidate_id, same=True, steward="li", run_key="steward-1", project="t")
    elif path == "web":
        decide_cluster(engine, candidate_id, "same", steward(engine), Rules(project="t"))
    else:
        user = steward(engine)
        with engine.connect() as connection:
            content = export_queue(connection, QueueFilter(per_page=1000), user.user_id)
        book = load_workbook(io.BytesIO(content))
        sheet = book["queue"]
        for row in sheet.iter_rows(min_row=2):
            if row[0].value == candidate_id:
                row[4].value = "same"
        out = io.BytesIO()
        book.save(out)
        result = import_decisions(engine, out.getvalue(), user, Rules(project="t"))
        assert not result.problems and result.applied.get("same") == 1


@pytest.mark.parametrize("path", ["cli", "web", "sheet"])
def test_a_steward_merge_dedups_the_golden_customers_contacts_and_its_undo_restores_them(
    sqlite_core_url: str, path: str
) -> None:
    engine, candidate_id = planted(sqlite_core_url)
    before = contact_rows(engine)
    assert len(before) == 2 and {row["customer_id"] for row in before.values()} == {LEFT, RIGHT}

    merge_by(path, engine, candidate_id)

    after = contact_rows(engine)
    with session_factory(engine)() as session:
        survivor = session.scalars(
            sa.select(Customer.id).where(Customer.id.in_([LEFT, RIGHT]), Customer.merged_into_id.is_(None))
        ).one()
        merge = session.scalars(
            sa.select(MergeLog).where(MergeLog.entity == "customer", MergeLog.survivor_id == survivor)
        ).one()
    active = [row for row in after.values() if row["merged_into_id"] is None]
    assert len(active) == 1 and active[0]["customer_id"] == survivor  # one 周敏 under the golden customer
    (gone,) = (row for row in after.values() if row["merged_into_id"] is not None)
    assert gone["merged_into_id"] == active[0]["id"] and gone["customer_id"] == survivor

    with session_factory(engine)() as session, session.begin():
        undo_merge(session, merge.id, "li")
    assert contact_rows(engine) == before  # both contacts back, under their own customers, exactly
    with session_factory(engine)() as session:
        contact_merges = session.scalars(sa.select(MergeLog).where(MergeLog.entity == "contact")).all()
    assert contact_merges and all(m.undone_at is not None for m in contact_merges)


def test_a_steward_merge_reads_the_golden_customers_contacts_and_a_bounded_sample_not_every_contact(
    sqlite_core_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decision in the workbench costs the same on a core of a million contacts as on the demo's."""
    from integration.dedup import contacts

    engine, _ = planted(sqlite_core_url)
    with engine.connect() as connection:
        everyone = contacts.read_contact_records(connection)
        monkeypatch.setattr(contacts, "TRAINING_SAMPLE", 10)
        bounded = contacts.read_contact_records(connection, [LEFT, RIGHT])
    assert len(everyone) > 100  # the seeded customers' contacts and the planted pair's
    theirs = everyone.index[everyone["customer_id"].isin([LEFT, RIGHT])]
    assert set(theirs) <= set(bounded.index)  # every contact of the merged customers
    others = bounded.drop(index=theirs)
    assert 0 < len(others) <= 10  # and a sample of the rest for the classifier, never all of them
    assert bounded.loc[others.index].equals(everyone.loc[others.index])  # read as the whole read reads them
