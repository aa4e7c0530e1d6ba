"""Dedup storage at size and exact undo: bulk candidates, batched merges, any merge undone in any order."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import re
import shutil
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from crm_core.db import make_engine, session_factory, upgrade
from crm_core.errors import DedupError
from crm_core.loading import get_or_start_run
from crm_core.merging import golden_values, merge_records, rank_members, record_candidates, undo_merge
from crm_core.models import (
    Base,
    Contact,
    Customer,
    ExternalId,
    LoadRun,
    MatchCandidate,
    MergeLog,
    Opportunity,
    RowChange,
)
from crm_core.runs import rollback_run
from integration.dedup.workflow import (
    Candidates,
    DedupOutcome,
    decide,
    finish_run,
    merge_clusters,
    review_queue,
)
from tests.conftest import DEMO, reset_postgres
from tests.test_dedup_workflow import seed_tengda_cluster

VALID_CODE = "91440300708461136T"
INVALID_CODE = "91440300708461136X"
# Journal and dedup bookkeeping: an undo marks its pair distinct, stamps the merge log (links kept) on purpose.
# the steward audit log is append-only: it records the decision and its undo, and keeps both
BOOKKEEPING = {
    "load_runs",
    "rejects",
    "row_changes",
    "merge_log",
    "merge_links",
    "match_candidates",
    "steward_audit",
}


def snapshot(engine: sa.Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every business row with every column, bookkeeping columns (updated_at, run ids) included."""
    with engine.connect() as connection:
        return {
            table.name: [
                tuple(row) for row in connection.execute(sa.select(table).order_by(*table.primary_key))
            ]
            for table in Base.metadata.sorted_tables
            if table.name not in BOOKKEEPING
        }


def new_core(url: str, revision: str = "head") -> sa.Engine:
    engine = make_engine(url)
    upgrade(engine, revision)
    return engine


def bulk_customers(engine: sa.Engine, count: int, *, contacts: bool = True) -> None:
    """``count`` customers (ids 1..count), each with a crosswalk entry and, optionally, a contact."""
    with engine.begin() as connection:
        run_id = connection.execute(
            sa.insert(LoadRun).values(run_key="seed", project="t", status="succeeded", stats={})
        ).inserted_primary_key[0]  # type: ignore[index]
        connection.execute(sa.insert(Customer.__table__), [
            {"id": i, "name": f"公司{i}", "phone": f"+86755{i:08d}" if i % 3 else None,
             "email": f"x@c{i}.cn" if i % 2 else None, "created_run_id": run_id}
            for i in range(1, count + 1)
        ])  # fmt: skip
        connection.execute(sa.insert(ExternalId.__table__), [
            {"entity": "customer", "entity_id": i, "system": "erp" if i % 3 else "crm", "external_key": f"C{i}"}
            for i in range(1, count + 1)
        ])  # fmt: skip
        if contacts:
            connection.execute(sa.insert(Contact.__table__), [
                {"customer_id": i, "name": f"联系人{i}", "created_run_id": run_id} for i in range(1, count + 1)
            ])  # fmt: skip


def test_tens_of_thousands_of_pairs_store_merge_queue_and_roll_back_exactly(core_url: str) -> None:
    """24,000 merge pairs in 8,000 clusters and 6,000 review pairs: no statement grows with the pairs."""
    engine = new_core(core_url)
    bulk_customers(engine, 30_000)
    before = snapshot(engine)
    clusters = [[i, i + 1, i + 2] for i in range(1, 24_001, 3)]
    scored: dict[tuple[int, int], tuple[float, dict[str, Any], str]] = {}
    for a, b, c in clusters:
        for pair in ((a, b), (a, c), (b, c)):
            scored[pair] = (0.99, {"name": 2}, "merged")
    for i in range(24_001, 30_000, 1):
        if i % 2:
            scored[(i, i + 1)] = (0.7 + (i % 100) / 1000, {"name": 1}, "review")
    assert len(scored) >= 20_000
    with session_factory(engine)() as session, session.begin():
        run = get_or_start_run(session, "dedup-big", "t")
        assert record_candidates(session, run, "customer", scored) == len(scored)
    candidates = Candidates(DedupOutcome(records=30_000), clusters, scored, 0.95, [0.99] * len(clusters))
    outcome = merge_clusters(engine, "dedup-big", "t", candidates, source_priority=["erp", "crm"],
                             survivorship={"phone": "most_complete"})  # fmt: skip
    finish_run(engine, "dedup-big", "t")
    assert outcome.auto_merged == 16_000 and len(outcome.merge_log_ids) == 16_000
    with engine.connect() as connection:
        active = connection.scalar(
            sa.select(sa.func.count()).select_from(Customer).where(Customer.merged_into_id.is_(None))
        )
        orphans = connection.scalar(
            sa.select(sa.func.count()).select_from(Contact).join(Customer, Contact.customer_id == Customer.id)
            .where(Customer.merged_into_id.is_not(None))
        )  # fmt: skip
        tagged = connection.scalar(sa.select(sa.func.count(sa.distinct(RowChange.merge_id))))
    assert (active, orphans, tagged) == (30_000 - 16_000, 0, 16_000)
    queue = review_queue(engine, entity="customer")
    assert len(queue) == 3_000 and all(q["right"] == f"公司{q['right_id']}" for q in queue)

    # A second pass over the same pairs: nothing new, the review pairs take the new scores.
    rescored = {
        pair: (p - 0.01 if status == "review" else p, f, status) for pair, (p, f, status) in scored.items()
    }
    with session_factory(engine)() as session, session.begin():
        run = get_or_start_run(session, "dedup-again", "t")
        assert record_candidates(session, run, "customer", rescored) == 0
    finish_run(engine, "dedup-again", "t")
    assert review_queue(engine, limit=1)[0]["probability"] == round(queue[0]["probability"] - 0.01, 4)

    rollback_run(engine, "dedup-again")
    rollback_run(engine, "dedup-big")
    assert snapshot(engine) == before
    with engine.connect() as connection:
        assert connection.scalar(sa.select(sa.func.count()).select_from(MatchCandidate)) == 0
        assert connection.scalar(sa.select(sa.func.count()).select_from(MergeLog)) == 0
    engine.dispose()


def cluster_core(url: str, revision: str = "head") -> sa.Engine:
    """A survivor (1) and three duplicates (2, 3, 4), each with contacts, an opportunity and crosswalk keys.

    Customer 5 is a branch of duplicate 3 (its parent pointer moves to the survivor). Each duplicate
    fills different blanks of the survivor, so every merge touches the survivor.
    """
    engine = new_core(url, revision)
    people = {  # system, values
        1: ("erp", {"name": "深圳市腾达科技有限公司", "credit_code": INVALID_CODE}),
        2: ("crm", {"name": "腾达科技", "credit_code": VALID_CODE, "phone": "+8675586001234"}),
        3: ("xlsx", {"name": "深圳腾达", "email": "sales@tengda.cn", "website": "tengda.cn"}),
        4: ("crm", {"name": "腾达科技（深圳）", "address": "深圳市南山区科技园", "industry": "软件"}),
        5: ("erp", {"name": "深圳市腾达科技有限公司广州分公司", "is_branch": True}),
    }
    with session_factory(engine)() as session, session.begin():
        run = LoadRun(run_key="seed", project="t", status="succeeded")
        session.add(run)
        session.flush()
        for record_id, (system, values) in people.items():
            session.add(Customer(id=record_id, created_run_id=run.id, **values))
            session.add(ExternalId(entity="customer", entity_id=record_id, system=system, external_key=f"K{record_id}",
                                   last_synced_at=dt.datetime(2025, 1, record_id, tzinfo=dt.UTC), created_run_id=run.id))  # fmt: skip
        session.flush()
        session.get(Customer, 5).parent_id = 3  # type: ignore[union-attr]
        for record_id in range(1, 5):
            for n in range(2):
                session.add(
                    Contact(customer_id=record_id, name=f"联系人{record_id}-{n}", created_run_id=run.id)
                )
            session.add(Opportunity(customer_id=record_id, name=f"商机{record_id}", stage_code="proposal",
                                    amount=Decimal("100.00"), created_run_id=run.id))  # fmt: skip
    return engine


def merge_three(engine: sa.Engine, *, separate_runs: bool, tag: str = "") -> tuple[list[int], list[str]]:
    """Merge 2, 3 and 4 into 1: in one batch of one run, or one steward-style merge per run."""
    rules: dict[str, Any] = {"credit_code": "source_priority", "name": "source_priority"}
    runs = [f"merge{tag}-{n}" for n in range(3)] if separate_runs else [f"merge{tag}-all"]
    ids: list[int] = []
    for number, run_key in enumerate(runs):
        with session_factory(engine)() as session, session.begin():
            run = get_or_start_run(session, run_key, "t")
            merged = [2 + number] if separate_runs else [2, 3, 4]
            golden = golden_values(session, [1, *merged], rules) if number == 0 else None
            logs = merge_records(session, run, Customer, 1, merged, probability=0.99, reason="test",
                                 decided_by="test", golden=golden)  # fmt: skip
            ids += [log.id for log in logs]
        finish_run(engine, run_key, "t")
    return ids, runs


@pytest.mark.parametrize("separate_runs", [False, True], ids=["one-run", "run-per-merge"])
def test_any_merge_undoes_exactly_in_any_order(core_url: str, separate_runs: bool) -> None:
    engine = cluster_core(core_url)
    original = snapshot(engine)
    for order in itertools.permutations(range(3)):
        merges, runs = merge_three(engine, separate_runs=separate_runs, tag="".join(map(str, order)))
        merged = snapshot(engine)
        assert merged != original
        survivor = next(r for r in merged["customers"] if r[0] == 1)
        assert VALID_CODE in survivor and "sales@tengda.cn" in survivor and "软件" in survivor
        for done, position in enumerate(order, start=1):
            with session_factory(engine)() as session, session.begin():
                log = undo_merge(session, merges[position], "steward")
            with engine.connect() as connection:
                record = connection.execute(
                    sa.select(Customer.merged_into_id).where(Customer.id == log.merged_id)
                )
                assert record.scalar() is None
                contacts = connection.scalars(
                    sa.select(Contact.customer_id).where(Contact.name.like(f"联系人{log.merged_id}-%"))
                )
                assert set(contacts) == {log.merged_id}  # fmt: skip
            if done < 3:
                assert snapshot(engine) != original
        assert snapshot(engine) == original, f"undo order {order}"
        # The merge runs still roll back (nothing left to undo but their merge log), the core unchanged.
        for run_key in reversed(runs):
            rollback_run(engine, run_key)
        assert snapshot(engine) == original
        with engine.begin() as connection:  # let the pairs merge again for the next order
            connection.execute(sa.delete(MatchCandidate))
    engine.dispose()


def test_undoing_one_merge_then_rolling_back_its_run_restores_the_core(core_url: str) -> None:
    engine = cluster_core(core_url)
    original = snapshot(engine)
    merges, runs = merge_three(engine, separate_runs=True)
    with session_factory(engine)() as session, session.begin():
        undo_merge(session, merges[1], "steward")  # the middle merge, with merges before and after it
    for run_key in reversed(runs):
        rollback_run(engine, run_key)
    assert snapshot(engine) == original
    engine.dispose()


def test_undo_names_a_column_a_later_change_altered_and_leaves_bookkeeping_to_the_later_run(
    core_url: str,
) -> None:
    engine = cluster_core(core_url)
    merges, _ = merge_three(engine, separate_runs=True)
    with session_factory(engine)() as session, session.begin():  # a later load changes what merge 1 filled
        get_or_start_run(session, "load-later", "t")
        session.get(Customer, 1).phone = "+8613800000000"  # type: ignore[union-attr]
    finish_run(engine, "load-later", "t")
    with session_factory(engine)() as session, session.begin(), pytest.raises(DedupError) as refused:
        undo_merge(session, merges[0], "steward")
    message = str(refused.value)
    assert f"merge {merges[0]} cannot be undone exactly" in message
    assert "customers 1 phone" in message and "+8613800000000" in message and "run load-later" in message
    # Merge 3 wrote other columns: it undoes, and rolling back the later load afterwards is still exact.
    with session_factory(engine)() as session, session.begin():
        undo_merge(session, merges[2], "steward")
    expected = snapshot(engine)
    with session_factory(engine)() as session, session.begin():
        get_or_start_run(session, "load-after-undo", "t")
        session.get(Customer, 1).industry = "制造"  # type: ignore[union-attr]
    finish_run(engine, "load-after-undo", "t")
    rollback_run(engine, "load-after-undo")
    assert snapshot(engine) == expected
    rollback_run(engine, "load-later")
    with session_factory(engine)() as session, session.begin():
        undo_merge(session, merges[0], "steward")  # the phone is what merge 1 wrote again: it undoes
    engine.dispose()


def steward_project(tmp_path: Path) -> Path:
    """The demo project (no data) with survivorship rules for customers."""
    root = tmp_path / "project"
    shutil.copytree(DEMO, root, ignore=shutil.ignore_patterns("data", "__pycache__"))
    project = root / "project.yaml"
    text = project.read_text(encoding="utf-8")
    marker = "    source_priority: [erp_u8, legacy_crm, sales_xlsx]\n    # Record linkage"
    assert marker in text
    rules = ("    survivorship: {phone: most_recent, address: most_complete, industry: most_frequent, "
             "credit_code: source_priority, name: source_priority}\n")  # fmt: skip
    project.write_text(
        text.replace(marker, marker.replace("    # Record", rules + "    # Record")), encoding="utf-8"
    )
    return root


def survivorship_core(url: str) -> sa.Engine:
    """Three records of one company from three sources; 1 and 2 are queued for a steward."""
    engine = new_core(url)
    seed_tengda_cluster(engine, ("erp_u8", "legacy_crm", "sales_xlsx"))
    with session_factory(engine)() as session, session.begin():
        # The steward's pair names the crm record first: the survivor must still be the ERP's.
        session.add(
            MatchCandidate(entity="customer", left_id=1, right_id=2, probability=0.8, status="review")
        )
        session.add(
            MatchCandidate(entity="customer", left_id=2, right_id=3, probability=0.7, status="review")
        )
    return engine


def test_steward_merges_apply_the_projects_survivorship_rules_like_automatic_ones(
    core_url: str, tmp_path: Path
) -> None:
    rules: dict[str, Any] = {"phone": "most_recent", "address": "most_complete", "industry": "most_frequent",
                             "credit_code": "source_priority", "name": "source_priority"}  # fmt: skip
    priority = ["erp_u8", "legacy_crm", "sales_xlsx"]
    # The automatic path on the same pair, in a core of its own: what the steward's merge must equal.
    automatic = survivorship_core(core_url)
    with session_factory(automatic)() as session:
        ranked = rank_members(session, [2, 1], priority)
        expected_golden = golden_values(session, ranked, rules)
    candidates = Candidates(DedupOutcome(records=3), [[2, 1]], {}, 0.95, [0.8])
    merge_clusters(automatic, "auto", "t", candidates, source_priority=priority, survivorship=rules)
    auto = snapshot(automatic)["customers"]
    automatic.dispose()
    if core_url.startswith("sqlite"):
        core_url = core_url.replace(".sqlite", "-steward.sqlite")
    else:
        wipe = sa.create_engine(core_url)
        reset_postgres(wipe)
        wipe.dispose()
    assert ranked[0] == 1 and expected_golden["phone"] == "+8613800000000"

    engine = survivorship_core(core_url)
    [pair] = [c for c in review_queue(engine) if {c["left_id"], c["right_id"]} == {1, 2}]
    decide(engine, pair["candidate"], same=True, steward="steward:li", run_key="steward-1", project="t",
           source_priority=priority, survivorship=rules)  # fmt: skip
    steward = snapshot(engine)["customers"]
    names = Customer.__table__.columns.keys()
    strip = {names.index(c) for c in ("created_at", "updated_at", "updated_run_id")}  # when and which run
    assert [tuple(v for i, v in enumerate(r) if i not in strip) for r in steward] == [
        tuple(v for i, v in enumerate(r) if i not in strip) for r in auto
    ]
    with session_factory(engine)() as session:
        survivor = session.get(Customer, 1)
        assert survivor is not None and survivor.merged_into_id is None
        assert (survivor.phone, survivor.credit_code, survivor.name, survivor.address) == (
            "+8613800000000", VALID_CODE, "深圳市腾达科技有限公司", "广东省深圳市南山区科技园南区高新南一道9号"
        )  # fmt: skip
    engine.dispose()

    # The CLI reads the rules from the project: the second pair (crm 2, already merged into 1, with 3).
    project = steward_project(tmp_path)
    core = ["--core-url", core_url]
    result = CliRunner().invoke(app_(), ["dedup", "review", "--json", *core])
    [other] = [json.loads(line) for line in result.output.splitlines()]
    decided = CliRunner().invoke(
        app_(),
        [
            "dedup",
            "decide",
            str(other["candidate"]),
            "--same",
            "--steward",
            "li",
            "--project",
            str(project),
            *core,
        ],
    )
    assert decided.exit_code == 0, decided.output
    engine = make_engine(core_url)
    with session_factory(engine)() as session:
        survivor = session.get(Customer, 1)
        assert survivor is not None
        # most_recent phone: the crm row now on 1 (June) beats the spreadsheet's (March); most_frequent
        # industry is a tie between the pair, so the better-ranked survivor keeps its own; xlsx fills the website
        assert (survivor.phone, survivor.industry, survivor.website) == (
            "+8613800000000",
            "软件",
            "tengda.cn",
        )
        assert session.get(Customer, 3).merged_into_id == 1  # type: ignore[union-attr]
    engine.dispose()


def app_() -> Any:
    from integration.cli import app

    return app


def test_dedup_merges_says_where_the_matches_made_at_load_are(sqlite_core_url: str) -> None:
    # A newcomer's run merged two rows by credit code at load (the reconciliation's `merged` column), and
    # `crmi dedup merges` showed an empty table without saying why: those are crosswalk matches, not merges.
    engine = make_engine(sqlite_core_url)
    upgrade(engine)
    engine.dispose()
    table = CliRunner().invoke(app_(), ["dedup", "merges", "--core-url", sqlite_core_url], terminal_width=200)
    assert table.exit_code == 0, table.output
    text = " ".join(table.output.split())
    assert "merged at load" in text and "crmi rollback" in text


def test_dedup_merges_lists_merges_newest_first_with_their_undo(sqlite_core_url: str) -> None:
    engine = cluster_core(sqlite_core_url)
    merges, _ = merge_three(engine, separate_runs=True)
    with session_factory(engine)() as session, session.begin():
        undo_merge(session, merges[1], "steward")
    engine.dispose()
    runner = CliRunner()
    core = ["--core-url", sqlite_core_url]
    listed = runner.invoke(app_(), ["dedup", "merges", "--json", *core])
    assert listed.exit_code == 0, listed.output
    rows = [json.loads(line) for line in listed.output.splitlines()]
    assert [r["merge"] for r in rows] == sorted(merges, reverse=True)
    assert [r["merged_id"] for r in rows] == [4, 3, 2] and {r["survivor_id"] for r in rows} == {1}
    assert [r["undone_at"] is not None for r in rows] == [False, True, False]
    assert rows[0]["decided_by"] == "test" and rows[0]["reason"] == "test" and rows[0]["probability"] == 0.99
    assert rows[0]["merged_at"]
    # who is who without looking the ids up: the records' names as they are now
    assert [r["merged_name"] for r in rows] == ["腾达科技（深圳）", "深圳腾达", "腾达科技"]
    assert {r["survivor_name"] for r in rows} == {"深圳市腾达科技有限公司"}
    limited = runner.invoke(
        app_(), ["dedup", "merges", "--json", "--limit", "1", "--entity", "customer", *core]
    )
    assert len(limited.output.splitlines()) == 1
    assert runner.invoke(app_(), ["dedup", "merges", "--json", "--entity", "contact", *core]).output == ""
    table = runner.invoke(app_(), ["dedup", "merges", *core], terminal_width=250)
    assert table.exit_code == 0 and "undone" in table.output and str(merges[1]) in table.output
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", table.output), table.output  # named, as pages do
    assert "腾达科技（深圳）" in table.output
    bad = runner.invoke(app_(), ["dedup", "merges", "--entity", "order", *core])
    assert bad.exit_code == 1 and "customer or contact" in bad.output
    missing = runner.invoke(app_(), ["dedup", "undo", "999", "--steward", "li", *core])
    assert missing.exit_code == 1 and "`crmi dedup merges` lists them" in missing.output


def test_a_merge_recorded_before_merge_tags_still_undoes_from_its_journal_range(sqlite_core_url: str) -> None:
    """Cores upgraded from revision 0003 hold merges that name a global journal range, not tagged rows."""
    engine = cluster_core(sqlite_core_url)
    original = snapshot(engine)
    with session_factory(engine)() as session, session.begin():  # what merge_records wrote before 0004
        run = get_or_start_run(session, "legacy", "t")
        session.flush()
        first = (session.scalar(sa.select(sa.func.max(RowChange.id))) or 0) + 1
        survivor, merged = session.get(Customer, 1), session.get(Customer, 4)
        assert survivor is not None and merged is not None
        survivor.address, survivor.updated_run_id = merged.address, run.id
        merged.merged_into_id, merged.updated_run_id = 1, run.id
        for contact in session.scalars(sa.select(Contact).where(Contact.customer_id == 4)):
            contact.customer_id = 1
        session.flush()
        last = session.scalar(sa.select(sa.func.max(RowChange.id)))
        log = MergeLog(entity="customer", survivor_id=1, merged_id=4, probability=0.99, reason="old",
                       decided_by="linkage", load_run_id=run.id, first_change_id=first, last_change_id=last)  # fmt: skip
        session.add(log)
        session.flush()
        log_id = log.id
    finish_run(engine, "legacy", "t")
    with session_factory(engine)() as session, session.begin():
        undo_merge(session, log_id, "steward")
    assert snapshot(engine) == original


def test_a_rolled_back_runs_merge_ids_are_never_handed_out_again(core_url: str) -> None:
    # A newcomer undid merge 1, rolled its run back and ran again: the new merge was "merge 1" too, so a
    # note saying "undid merge 1" named another merge. SQLite gave the largest id + 1.
    engine = cluster_core(core_url)
    first, runs = merge_three(engine, separate_runs=False, tag="a")
    rollback_run(engine, runs[0])
    with engine.connect() as connection:
        assert connection.scalar(sa.select(sa.func.count()).select_from(MergeLog)) == 0
    again, _ = merge_three(engine, separate_runs=False, tag="b")
    assert min(again) > max(first)
    engine.dispose()


def test_the_merge_ids_migration_keeps_a_sqlite_cores_merges_and_ids(tmp_path: Path) -> None:
    from alembic import command

    from crm_core.db import alembic_config

    engine = cluster_core(f"sqlite:///{tmp_path / 'core.sqlite'}", "0014")
    merges, _ = merge_three(engine, separate_runs=True)
    with engine.begin() as connection:
        kept = connection.execute(sa.select(MergeLog.__table__).order_by(MergeLog.id)).all()
        connection.execute(sa.delete(MergeLog.__table__).where(MergeLog.id == max(merges)))
    upgrade(engine)
    with engine.begin() as connection:
        assert connection.execute(sa.select(MergeLog.__table__).order_by(MergeLog.id)).all() == kept[:-1]
        assert "AUTOINCREMENT" in connection.scalar(
            sa.text("SELECT sql FROM sqlite_master WHERE name = 'merge_log'")
        )  # fmt: skip
        # what the rebuild copied is remembered; a new merge continues after it
        new_id = connection.execute(
            sa.insert(MergeLog.__table__).values(**{**kept[0]._asdict(), "id": None})
        ).inserted_primary_key[0]  # type: ignore[index]
        assert new_id == max(merges)
    command.downgrade(alembic_config(engine), "0014")
    upgrade(engine)
    with engine.connect() as connection:
        assert connection.scalar(sa.select(sa.func.count()).select_from(MergeLog)) == len(kept)
    engine.dispose()
