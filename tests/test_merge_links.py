"""Contact merges that follow a customer merge are linked to it and undone with it, automatic or steward's."""

from __future__ import annotations

import json
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from typer.testing import CliRunner

from crm_core.db import alembic_config, current_revision, session_factory, upgrade
from crm_core.merging import undo_merge
from crm_core.models import Contact, Customer, LoadRun, MatchCandidate, MergeLog
from crm_core.runs import rollback_run
from integration.cli import app
from integration.dedup.contacts import deduplicate_contacts
from integration.dedup.workflow import Candidates, DedupOutcome, decide, finish_run, merge_clusters
from tests.test_dedup_contacts import seed
from tests.test_dedup_storage import snapshot
from tests.test_runs import content

HEAD, MERGE, DUP = 91, 92, 93  # the planted customers: the golden one and two merged into it
MOBILE = "+8613857412345"


def planted(url: str, people: dict[int, list[str]]) -> sa.Engine:
    """The seeded core, its own duplicate contacts merged, plus customers ``people`` names with their contacts.

    Every planted contact has the same mobile: contacts with one name are the same person.
    """
    engine, _ = seed(url)
    deduplicate_contacts(engine, "dedup-0", "t")
    finish_run(engine, "dedup-0", "t")
    with session_factory(engine)() as session, session.begin():
        run = LoadRun(run_key="plant", project="t", status="succeeded")
        session.add(run)
        session.flush()
        for customer_id, names in people.items():
            session.add(Customer(id=customer_id, name="宁波海曙贸易有限公司", created_run_id=run.id))
            session.flush()
            for number, name in enumerate(names):
                session.add(Contact(customer_id=customer_id, name=name, mobile=MOBILE,
                                    email=f"{number}@c{customer_id}.cn", created_run_id=run.id))  # fmt: skip
    return engine


def auto_merge(engine: sa.Engine, customers: list[int], run_key: str = "dedup-1") -> list[int]:
    """What `crmi dedup run` does: an automatic merge of the customers, then the contact dedup, one run."""
    candidates = Candidates(DedupOutcome(records=len(customers)), [customers], {}, 0.95, [0.99])
    merges = merge_clusters(engine, run_key, "t", candidates).merge_log_ids
    deduplicate_contacts(engine, run_key, "t")
    finish_run(engine, run_key, "t")
    return merges


def planted_contacts(engine: sa.Engine, name: str) -> dict[int, dict[str, Any]]:
    """The planted contacts called ``name`` (any spacing), whole rows, by id."""
    with engine.connect() as connection:
        rows = connection.execute(
            sa.select(Contact.__table__).where(
                Contact.mobile == MOBILE, sa.func.replace(Contact.name, " ", "") == name
            )
        ).mappings()
        return {row["id"]: dict(row) for row in rows}


def undo(engine: sa.Engine, merge_id: int) -> None:
    with session_factory(engine)() as session, session.begin():
        undo_merge(session, merge_id, "li")


def contact_merges(engine: sa.Engine) -> dict[int, MergeLog]:
    with session_factory(engine)() as session:
        return {m.id: m for m in session.scalars(sa.select(MergeLog).where(MergeLog.entity == "contact"))}


def test_undoing_an_automatic_customer_merge_undoes_the_contact_merges_that_joined_its_customers(
    core_url: str,
) -> None:
    # 周敏 under both customers is merged once they are one; 李娜 twice under the golden customer is merged too,
    # but that merge owes nothing to the customer merge and stays when it is undone.
    engine = planted(core_url, {HEAD: ["周敏", "李娜", "李 娜"], MERGE: ["周敏"]})
    whole, before = content(engine), snapshot(engine)
    zhou = planted_contacts(engine, "周敏")
    (merge,) = auto_merge(engine, [HEAD, MERGE])
    assert sum(row["merged_into_id"] is None for row in planted_contacts(engine, "周敏").values()) == 1
    li = planted_contacts(engine, "李娜")
    assert sum(row["merged_into_id"] is None for row in li.values()) == 1  # one customer's own duplicate
    listed = CliRunner().invoke(
        app, ["dedup", "merges", "--json", "--entity", "contact", "--core-url", core_url]
    )
    follows = {m["merged_id"]: m["follows"] for m in map(json.loads, listed.output.splitlines())}
    assert [follows[i] for i in zhou if i in follows] == [[merge]]  # `crmi dedup merges` shows the link
    assert [follows[i] for i in li if i in follows] == [[]]  # 李娜's owes nothing to it

    undone = CliRunner().invoke(app, ["dedup", "undo", str(merge), "--steward", "li", "--core-url", core_url])

    assert undone.exit_code == 0, undone.output
    (follower,) = (i for i, m in contact_merges(engine).items() if m.merged_id in zhou)
    assert f"contact merge(s) {follower} that followed from it undone first" in undone.output
    assert planted_contacts(engine, "周敏") == zhou  # both back under their own customers, exactly
    assert planted_contacts(engine, "李娜") == li  # owes nothing to the customer merge: still merged
    undone = {m.merged_id for m in contact_merges(engine).values() if m.undone_at is not None}
    assert undone and undone <= set(zhou)
    (li_merge,) = (i for i, m in contact_merges(engine).items() if m.merged_id in li and m.undone_at is None)
    undo(engine, li_merge)
    assert snapshot(engine) == before  # every column of every business row

    rollback_run(engine, "dedup-1")  # the run still rolls back: its merge log and links go
    with engine.begin() as connection:  # the undo's "distinct" customer pair is a steward's, not the run's
        connection.execute(sa.delete(MatchCandidate).where(MatchCandidate.entity == "customer"))
    audited = {"steward_audit"}  # the undo's audit lines stay: the log is append-only
    assert {k: v for k, v in content(engine).items() if k not in audited} == {
        k: v for k, v in whole.items() if k not in audited
    }


@pytest.mark.parametrize("first", [0, 1], ids=["first-merge-first", "second-merge-first"])
def test_a_contact_merge_joining_two_merged_customers_is_undone_with_either_customer_merge(
    core_url: str, first: int
) -> None:
    # 周敏 came with both merged customers, none with the golden one: the contact merge follows from both.
    engine = planted(core_url, {HEAD: [], MERGE: ["周敏"], DUP: ["周敏"]})
    before = snapshot(engine)
    merges = auto_merge(engine, [HEAD, MERGE, DUP])
    assert len(merges) == 2
    assert sum(row["merged_into_id"] is None for row in planted_contacts(engine, "周敏").values()) == 1

    undo(engine, merges[first])
    after_one = planted_contacts(engine, "周敏")
    assert all(row["merged_into_id"] is None for row in after_one.values())
    assert len({row["customer_id"] for row in after_one.values()}) == 2  # under two customers again, unmerged
    undo(engine, merges[1 - first])
    assert snapshot(engine) == before


def test_a_steward_merges_contact_merges_are_undone_by_their_link_not_their_reason(
    sqlite_core_url: str,
) -> None:
    engine = planted(sqlite_core_url, {HEAD: ["周敏"], MERGE: ["周敏"]})
    before = snapshot(engine)
    with session_factory(engine)() as session, session.begin():
        candidate = MatchCandidate(entity="customer", left_id=HEAD, right_id=MERGE, probability=0.8)
        session.add(candidate)
    decide(engine, candidate.id, same=True, steward="li", run_key="steward-1", project="t")
    with engine.begin() as connection:  # a reason is for people: rewording it changes nothing
        connection.execute(sa.update(MergeLog).where(MergeLog.entity == "contact").values(reason="reworded"))
        (merge,) = connection.scalars(sa.select(MergeLog.id).where(MergeLog.entity == "customer"))
    undo(engine, merge)
    assert snapshot(engine) == before


def links(engine: sa.Engine) -> set[tuple[int, int]]:
    with engine.connect() as connection:
        return {
            (int(a), int(b))
            for a, b in connection.execute(sa.text("SELECT merge_id, follows_merge_id FROM merge_links"))
        }


def test_the_links_migration_backfills_the_steward_contact_merges_from_their_reason(core_url: str) -> None:
    engine = planted(core_url, {HEAD: ["周敏"], MERGE: ["周敏"]})
    before = snapshot(engine)
    with session_factory(engine)() as session, session.begin():
        candidate = MatchCandidate(entity="customer", left_id=HEAD, right_id=MERGE, probability=0.8)
        session.add(candidate)
    decide(engine, candidate.id, same=True, steward="li", run_key="steward-1", project="t")
    written = links(engine)
    (merge,) = {follows for _, follows in written}
    with engine.connect() as connection:
        steward_run = connection.scalar(sa.select(LoadRun.id).where(LoadRun.run_key == "steward-1"))
    assert written == {(i, merge) for i, m in contact_merges(engine).items() if m.load_run_id == steward_run}

    command.downgrade(alembic_config(engine), "0015")  # an older toolkit's core: the link is the reason text
    with engine.connect() as connection:
        assert "merge_links" not in sa.inspect(connection).get_table_names()
        assert not connection.scalar(
            sa.text("SELECT count(*) FROM row_changes WHERE table_name = 'merge_links'")
        )
    upgrade(engine)
    assert current_revision(engine) == "0016" and links(engine) == written
    undo(engine, merge)
    assert snapshot(engine) == before
    rollback_run(
        engine, "steward-1"
    )  # the backfilled links are journaled in the merge's run: they go with it
    assert links(engine) == set()


def test_the_links_migration_links_automatic_contact_merges_made_before_it_from_the_journal(
    core_url: str,
) -> None:
    # 周敏 of two customers merged into a third, 李娜 twice under one customer: merged by an older toolkit,
    # whose undo of either customer merge left 周敏 merged across two customers.
    engine = planted(core_url, {HEAD: ["李娜", "李 娜"], MERGE: ["周敏"], DUP: ["周敏"]})
    before = snapshot(engine)
    merges = auto_merge(engine, [HEAD, MERGE, DUP])
    written = links(engine)
    (zhou,) = (
        i for i, m in contact_merges(engine).items() if m.merged_id in planted_contacts(engine, "周敏")
    )
    assert written == {(zhou, merge) for merge in merges}  # 李娜's merge follows from none

    command.downgrade(alembic_config(engine), "0015")
    upgrade(engine)
    assert links(engine) == written
    undo(engine, merges[1])
    assert all(row["merged_into_id"] is None for row in planted_contacts(engine, "周敏").values())
    undo(engine, merges[0])
    li = planted_contacts(engine, "李娜")
    (li_merge,) = (i for i, m in contact_merges(engine).items() if m.undone_at is None and m.merged_id in li)
    undo(engine, li_merge)
    assert snapshot(engine) == before


@pytest.mark.parametrize(("undoer", "role", "allowed"), [("li", "steward", False), ("wang", "steward", True),
                                                          ("zhao", "admin", True)])  # fmt: skip
def test_the_workbench_undo_of_a_customer_merge_leaves_another_stewards_contact_merges_to_them(
    sqlite_core_url: str, undoer: str, role: str, allowed: bool
) -> None:
    """A steward may undo an automatic customer merge, but its undo undoes the contact merges that follow from
    it first: one another steward decided is theirs (403 naming it, nothing undone); they and an admin may."""
    from integration.steward import security
    from integration.steward.decisions import undo as workbench_undo
    from integration.steward.errors import StewardError

    engine = planted(sqlite_core_url, {HEAD: ["周敏"], MERGE: ["周敏"]})
    zhou = planted_contacts(engine, "周敏")
    (merge,) = auto_merge(engine, [HEAD, MERGE])
    (follower,) = (i for i, m in contact_merges(engine).items() if m.merged_id in zhou)
    with engine.begin() as connection:  # as wang's decision of the contact pair records it
        connection.execute(sa.update(MergeLog).where(MergeLog.id == follower).values(decided_by="wang"))
        user_id = security.add_user(connection, undoer, role, "a long enough password", actor=None)
    user = security.Principal(user_id, undoer, role, 0, "csrf")
    before = snapshot(engine)

    if not allowed:
        with pytest.raises(StewardError) as refused:
            workbench_undo(engine, merge, user)
        assert refused.value.status == 403
        assert f"contact merge(s) {follower} (decided by wang)" in str(refused.value), refused.value
        assert snapshot(engine) == before  # nothing undone
        assert contact_merges(engine)[follower].undone_at is None
        return
    workbench_undo(engine, merge, user)
    assert contact_merges(engine)[follower].undone_at is not None
    with session_factory(engine)() as session:
        assert session.get(MergeLog, merge).undone_at is not None  # type: ignore[union-attr]
