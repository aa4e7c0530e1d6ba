"""Dedup on the core: auto-merge into golden records, review queue, steward decisions, exact undo."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa

from crm_core.db import make_engine, session_factory, upgrade
from crm_core.errors import DedupError
from crm_core.merging import undo_merge
from crm_core.models import Contact, Customer, ExternalId, LoadRun, MatchCandidate, MergeLog, Opportunity
from crm_core.runs import rollback_run
from integration.dedup.customers import CUSTOMER_SPEC, customer_records
from integration.dedup.linkage import link, ordered
from integration.dedup.workflow import (
    decide,
    decision_weight,
    deduplicate_customers,
    review_count,
    review_queue,
)
from tests.test_linkage import companies
from tests.test_matching_classes import code

INVALID_CODE = "91440300708461136X"


def seed(url: str) -> tuple[sa.Engine, dict[int, int]]:
    """A core holding the linkage test companies, each with a contact and an opportunity."""
    frame, truth = companies()
    engine = make_engine(url)
    upgrade(engine)
    with session_factory(engine)() as session, session.begin():
        run = LoadRun(run_key="seed", project="t", status="succeeded")
        session.add(run)
        session.flush()
        for record_id, row in frame.iterrows():
            session.add(Customer(id=record_id, name=row["name"], credit_code=row["credit_code"],
                                 phone=row["phone"], email=f"sales@{row['email_domain']}", city=row["city"],
                                 created_run_id=run.id))  # fmt: skip
            session.add(
                ExternalId(entity="customer", entity_id=record_id, system="erp", external_key=f"C{record_id}")
            )
        session.flush()
        for record_id in frame.index:
            session.add(Contact(customer_id=record_id, name=f"联系人{record_id}"))
            session.add(Opportunity(customer_id=record_id, name=f"商机{record_id}", stage_code="proposal",
                                    amount=Decimal("100.00")))  # fmt: skip
    return engine, truth


def state(engine: sa.Engine) -> dict[str, list[tuple[Any, ...]]]:
    with engine.connect() as connection:
        return {
            "customers": connection.execute(
                sa.select(
                    Customer.id, Customer.name, Customer.credit_code, Customer.phone, Customer.merged_into_id
                ).order_by(Customer.id)
            ).all(),
            "contacts": connection.execute(
                sa.select(Contact.id, Contact.customer_id).order_by(Contact.id)
            ).all(),
            "opportunities": connection.execute(
                sa.select(Opportunity.id, Opportunity.customer_id).order_by(Opportunity.id)
            ).all(),
            "crosswalk": connection.execute(
                sa.select(ExternalId.external_key, ExternalId.entity_id, ExternalId.match_method).order_by(
                    ExternalId.id
                )
            ).all(),
        }


def test_auto_merge_builds_golden_records_and_repoints_everything(core_url: str) -> None:
    engine, truth = seed(core_url)
    before = state(engine)
    outcome = deduplicate_customers(engine, "dedup-1", "t", source_priority=["erp"], finish=True)
    assert outcome.auto_merged > 10 and outcome.pairs_compared > 0 and outcome.reduction_ratio > 0.5
    with session_factory(engine)() as session:
        merged = session.scalars(sa.select(Customer).where(Customer.merged_into_id.is_not(None))).all()
        for loser in merged:
            assert truth[loser.id] == truth[loser.merged_into_id]  # only true duplicates merge
            assert (
                session.scalar(
                    sa.select(sa.func.count()).select_from(Contact).where(Contact.customer_id == loser.id)
                )
                == 0
            )
            key = session.scalar(
                sa.select(ExternalId.entity_id).where(ExternalId.external_key == f"C{loser.id}")
            )
            assert key == loser.merged_into_id
        logs = session.scalars(sa.select(MergeLog)).all()
        assert len(logs) == outcome.auto_merged and all(log.decided_by == "linkage" for log in logs)
        statuses = set(session.scalars(sa.select(MatchCandidate.status)))
    assert "merged" in statuses

    # A second pass changes nothing: the golden records are already one each.
    again = deduplicate_customers(engine, "dedup-2", "t", finish=True)
    assert again.auto_merged == 0 and again.new_candidates == 0

    # Rolling back the dedup run (the second first: it depends on nothing, but is newer) restores everything.
    rollback_run(engine, "dedup-2")
    rollback_run(engine, "dedup-1")
    assert state(engine) == before
    engine.dispose()


def test_one_merge_undoes_exactly_and_the_pair_is_never_proposed_again(sqlite_core_url: str) -> None:
    engine, _ = seed(sqlite_core_url)
    before = state(engine)
    outcome = deduplicate_customers(engine, "dedup-1", "t", finish=True)
    with session_factory(engine)() as session, session.begin():
        log = session.get(MergeLog, outcome.merge_log_ids[0])
        assert log is not None
        merged_id, survivor_id = log.merged_id, log.survivor_id
        undo_merge(session, log.id, "steward:li")
    after = state(engine)
    loser = next(r for r in after["customers"] if r[0] == merged_id)
    assert loser == next(r for r in before["customers"] if r[0] == merged_id)  # its own values back, unmerged
    assert [c for c in after["contacts"] if c[1] == merged_id] == [
        c for c in before["contacts"] if c[1] == merged_id
    ]
    with (
        session_factory(engine)() as session,
        session.begin(),
        pytest.raises(DedupError, match="already undone"),
    ):
        undo_merge(session, outcome.merge_log_ids[0], "steward:li")
    deduplicate_customers(engine, "dedup-2", "t", finish=True)
    with engine.connect() as connection:
        merged_into = connection.scalar(sa.select(Customer.merged_into_id).where(Customer.id == merged_id))
        status = connection.scalar(sa.select(MatchCandidate.status).where(
            MatchCandidate.left_id == min(merged_id, survivor_id), MatchCandidate.right_id == max(merged_id, survivor_id)
        ))  # fmt: skip
    assert merged_into is None and status == "distinct"
    engine.dispose()


def test_stewards_work_the_review_queue(sqlite_core_url: str) -> None:
    engine, _ = seed(sqlite_core_url)
    with session_factory(engine)() as session, session.begin():
        # Two companies of one name and phone with two valid credit codes, and a record without a code that
        # looks like both: it joins one, and the join that would put two codes in one golden record goes
        # to a steward with the reason (never at probability 1.0).
        for trade, phone in [("甬兴模具", "+8657488880000"), ("海曙包装", "+8657488880001")]:
            for name, body in [(f"宁波{trade}有限公司", "10000001"), (f"宁波市{trade}有限责任公司", None),
                               (f"宁波{trade}股份有限公司", "10000003")]:  # fmt: skip
                session.add(
                    Customer(name=name, credit_code=code("330203", body) if body else None, phone=phone)
                )
    outcome = deduplicate_customers(engine, "dedup-1", "t", finish=True)
    queue = review_queue(engine)
    assert len(queue) >= 2, "expected pairs for a steward"
    assert all(0.5 <= q["probability"] < 1.0 for q in queue)
    assert {q["features"]["reason"].split(" (")[0] for q in queue if "宁波" in q["left"]} == {
        "not merged: the cluster would hold two credit codes"
    }
    assert review_count(engine) == {"pending": len(queue), "expected_same": outcome.review_expected_same}
    weights = [decision_weight(q["probability"], 1, 1) for q in queue]
    assert weights == sorted(weights, reverse=True)  # the decisions that change most come first
    target = queue[0]
    decision = decide(
        engine, target["candidate"], same=False, steward="steward:wang", run_key="steward-1", project="t"
    )
    assert decision.status == "distinct" and decision.decided_by == "steward:wang"
    with pytest.raises(DedupError, match="already decided"):
        decide(
            engine, target["candidate"], same=True, steward="steward:wang", run_key="steward-2", project="t"
        )
    deduplicate_customers(engine, "dedup-2", "t", finish=True)
    assert target["candidate"] not in {q["candidate"] for q in review_queue(engine)}
    other = queue[1]
    decide(engine, other["candidate"], same=True, steward="steward:wang", run_key="steward-3", project="t")
    with engine.connect() as connection:
        merged = connection.scalar(
            sa.select(sa.func.count()).select_from(MergeLog).where(MergeLog.decided_by == "steward:wang")
        )
    assert merged == 1
    engine.dispose()


def test_steward_commands(sqlite_core_url: str) -> None:
    from typer.testing import CliRunner

    from integration.cli import app

    engine, _ = seed(sqlite_core_url)
    with session_factory(engine)() as session:
        first = session.get(Customer, 1)
        assert first is not None
        name, email = first.name, first.email
    engine.dispose()
    runner = CliRunner()
    core = ["--core-url", sqlite_core_url]
    ran = runner.invoke(app, ["dedup", "run", "--json", "--project", "examples/demo", *core])
    assert ran.exit_code == 0, ran.output
    outcome = json.loads(ran.output)
    assert outcome["auto_merged"] > 0 and outcome["merge_log_ids_first"]
    listed = runner.invoke(app, ["runs", "list", "--json", *core])
    runs = [json.loads(line) for line in listed.output.splitlines()]
    # a dedup run says so in `crmi runs list` (it read no source: not a `full` migration run)
    assert [(r["mode"], r["status"]) for r in runs if r["run_key"].startswith("dedup-")] == [
        ("dedup", "succeeded")
    ]

    queue = runner.invoke(app, ["dedup", "review", "--json", *core])
    pending = [json.loads(line) for line in queue.output.splitlines()]
    assert queue.exit_code == 0 and pending
    decided = runner.invoke(
        app, ["dedup", "decide", str(pending[0]["candidate"]), "--different", "--steward", "li", *core]
    )
    assert decided.exit_code == 0 and "distinct (by li)" in decided.output
    again = runner.invoke(
        app, ["dedup", "decide", str(pending[0]["candidate"]), "--same", "--steward", "li", *core]
    )
    assert again.exit_code == 1 and "already decided" in again.output
    flat = " ".join(again.output.split())
    assert "Reopen" in flat and f"/records/{pending[0]['entity']}/" in flat, flat
    bare = runner.invoke(app, ["dedup", "decide", "1", "--customer", "43", "--steward", "li", *core])
    assert bare.exit_code == 1 and "held names are decided as r1" in " ".join(bare.output.split())

    merge_id = str(outcome["merge_log_ids_first"][0])
    undone = runner.invoke(app, ["dedup", "undo", merge_id, "--steward", "li", *core])
    assert undone.exit_code == 0 and "separate from" in undone.output
    assert (
        "already undone" in runner.invoke(app, ["dedup", "undo", merge_id, "--steward", "li", *core]).output
    )

    matched = runner.invoke(app, ["dedup", "match", "--name", name, "--email", str(email), "--json", *core])
    assert matched.exit_code == 0, matched.output
    best = json.loads(matched.output)[0]
    assert best["customer_id"] == 1 and best["probability"] > 0.9
    bad = runner.invoke(app, ["dedup", "match", "--name", name, "--credit-code", "123", *core])
    assert bad.exit_code == 1 and "credit code" in bad.output
    # a code whose check digit fails is compared as written (as a load keeps it), not refused
    damaged = runner.invoke(
        app, ["dedup", "match", "--name", name, "--credit-code", "91110000600037341X", "--json", *core]
    )
    assert damaged.exit_code == 0, damaged.output
    assert json.loads(damaged.output)[0]["customer_id"] == 1


def test_dedup_match_completes_a_local_phone_from_the_city(sqlite_core_url: str) -> None:
    """`crmi dedup match --city` reads a local number as the match API and a mapping's area_code_from do."""
    from typer.testing import CliRunner

    from integration.cli import app

    engine, _ = seed(sqlite_core_url)
    with session_factory(engine)() as session, session.begin():
        first = session.get(Customer, 1)
        assert first is not None
        first.phone, first.city = "+8657488880000", "宁波市"
        name = first.name
    engine.dispose()
    runner = CliRunner()
    core = ["--core-url", sqlite_core_url]
    matched = runner.invoke(
        app, ["dedup", "match", "--name", name, "--phone", "8888 0000", "--city", "宁波市", "--json", *core]
    )
    assert matched.exit_code == 0, matched.output
    best = json.loads(matched.output)[0]
    assert best["customer_id"] == 1 and best["levels"]["phones_overlap"] > 0, best
    alone = runner.invoke(app, ["dedup", "match", "--name", name, "--phone", "8888 0000", *core])
    assert alone.exit_code == 1 and "8888 0000" in alone.output


def test_survivorship_rules_pick_each_field_across_the_cluster(sqlite_core_url: str) -> None:

    from crm_core.merging import golden_values, merge_records, rank_members

    engine = make_engine(sqlite_core_url)
    upgrade(engine)
    seed_tengda_cluster(engine, ("erp", "crm", "xlsx"))
    rules: dict[str, Any] = {"phone": "most_recent", "address": "most_complete", "industry": "most_frequent",
                             "credit_code": "source_priority", "name": "source_priority"}  # fmt: skip
    with session_factory(engine)() as session, session.begin():
        ranked = rank_members(session, [3, 2, 1], ["erp", "crm", "xlsx"])
        assert ranked == [1, 2, 3]
        golden = golden_values(session, ranked, rules)
        assert golden == {
            "phone": "+8613800000000",  # crm's row changed last
            "address": "广东省深圳市南山区科技园南区高新南一道9号",  # the longest
            "industry": "信息技术",  # two of three
            "credit_code": "91440300708461136T",  # erp's comes first but is invalid: the valid one wins
            "name": "深圳市腾达科技有限公司",  # erp's, by source priority
        }
        run = session.scalars(sa.select(LoadRun)).one()
        merge_records(
            session,
            run,
            Customer,
            1,
            [2, 3],
            probability=0.99,
            reason="test",
            decided_by="test",
            golden=golden,
        )
    with session_factory(engine)() as session:
        survivor = session.get(Customer, 1)
        assert survivor is not None
        assert (survivor.phone, survivor.industry, survivor.credit_code, survivor.name) == (
            "+8613800000000", "信息技术", "91440300708461136T", "深圳市腾达科技有限公司"
        )  # fmt: skip
        assert survivor.website == "tengda.cn"  # no rule: blanks still fill from the merged records


def test_a_delta_run_links_only_what_it_changed_against_the_golden_records(sqlite_core_url: str) -> None:
    from crm_core.loading import get_or_start_run
    from integration.dedup.workflow import find_candidates, merge_clusters

    engine, _ = seed(sqlite_core_url)
    full = deduplicate_customers(engine, "dedup-1", "t", finish=True)
    with session_factory(engine)() as session:
        golden = session.scalars(
            sa.select(Customer).where(Customer.merged_into_id.is_(None), Customer.credit_code.is_not(None))
        ).first()
        assert golden is not None
        twin = {
            "name": golden.name,
            "credit_code": golden.credit_code,
            "phone": golden.phone,
            "city": golden.city,
        }
    with session_factory(engine)() as session, session.begin():
        run = get_or_start_run(session, "delta-1", "t", "delta")
        session.add(
            Customer(id=9001, created_run_id=run.id, **twin)
        )  # the same company, from a new source row
        session.add(
            Customer(id=9002, name="拉萨雪域高原新材料有限公司", created_run_id=run.id)
        )  # a new company
    candidates = find_candidates(engine, "delta-1", "t", mode="delta")
    outcome = candidates.outcome
    assert outcome.changed_records == 2
    assert 0 < outcome.pairs_compared < full.pairs_compared / 10  # the delta's pairs, not everyone's again
    assert all(9001 in pair or 9002 in pair for pair in candidates.scored)
    assert [sorted(c) for c in candidates.clusters] == [sorted([golden.id, 9001])]
    merge_clusters(engine, "delta-1", "t", candidates, mode="delta")
    with session_factory(engine)() as session:
        new = session.get(Customer, 9001)
        assert new is not None and new.merged_into_id == golden.id  # the golden record survives


def seed_tengda_cluster(engine: sa.Engine, systems: tuple[str, str, str]) -> None:
    """Seed one company from three sources as customers 1-3, in a succeeded run 'seed'.

    The first source holds an invalid credit code, the second changed last, the third is least complete.
    """
    import datetime as dt

    synced = {1: dt.datetime(2025, 1, 1, tzinfo=dt.UTC), 2: dt.datetime(2025, 6, 1, tzinfo=dt.UTC),
              3: dt.datetime(2025, 3, 1, tzinfo=dt.UTC)}  # fmt: skip
    records = {
        1: dict(name="深圳市腾达科技有限公司", credit_code=INVALID_CODE, phone="+8675586001234",
                address="深圳市南山区", industry="软件"),
        2: dict(name="腾达科技", credit_code="91440300708461136T", phone="+8613800000000",
                address="广东省深圳市南山区科技园南区高新南一道9号", industry="信息技术"),
        3: dict(name="深圳腾达", phone="+8613900000000", industry="信息技术", website="tengda.cn"),
    }  # fmt: skip
    with session_factory(engine)() as session, session.begin():
        run = LoadRun(run_key="seed", project="t", status="succeeded")
        session.add(run)
        session.flush()
        for (record_id, values), system in zip(records.items(), systems, strict=True):
            session.add(Customer(id=record_id, created_run_id=run.id, **values))
            session.add(ExternalId(entity="customer", entity_id=record_id, system=system,
                                   external_key=f"K{record_id}", last_synced_at=synced[record_id]))  # fmt: skip


def test_a_pair_waiting_in_the_queue_is_never_merged_by_a_later_pass(sqlite_core_url: str) -> None:
    engine, _ = seed(sqlite_core_url)
    sure = link(customer_records(engine), CUSTOMER_SPEC)
    left, right = min((ordered(p) for p in sure.band.index[sure.band == "merge"]), key=lambda p: (p[0], p[1]))
    with session_factory(engine)() as session, session.begin():
        run = LoadRun(run_key="earlier", project="t", status="succeeded")
        session.add(run)
        session.flush()
        session.add(MatchCandidate(entity="customer", left_id=int(left), right_id=int(right), probability=0.5,
                                   features={}, status="review", load_run_id=run.id))  # fmt: skip
    deduplicate_customers(engine, "dedup-1", "t", finish=True)
    with engine.connect() as connection:
        merged = connection.execute(
            sa.select(Customer.id, Customer.merged_into_id).where(Customer.id.in_([int(left), int(right)]))
        ).all()
        waiting = connection.execute(
            sa.select(MatchCandidate.status, MatchCandidate.features).where(
                MatchCandidate.left_id == int(left), MatchCandidate.right_id == int(right)
            )
        ).one()
    assert all(into is None for _, into in merged)  # neither merged behind the steward's back
    assert waiting.status == "review" and "already in the review queue" in waiting.features["reason"]
    engine.dispose()


OLD_NAME = "腾达（深圳）旧户"  # record 1's own name: never shown once 1 is part of 49


def seed_merged_since(url: str) -> sa.Engine:
    """Customer 1 waits in a pair with 7 (candidate 1), then is merged into 49 by a steward: 1 / 7 now stands
    for the golden records 49 / 7 (a newcomer's queue still listed it as 1 / 7)."""
    from crm_core.merging import merge_records

    engine = make_engine(url)
    upgrade(engine)
    with session_factory(engine)() as session, session.begin():
        run = LoadRun(run_key="seed", project="t", status="succeeded")
        session.add(run)
        session.flush()
        session.add_all([
            Customer(id=1, name=OLD_NAME, phone="+8675586001234", created_run_id=run.id),
            Customer(id=7, name="深圳市腾达科技有限公司", phone="+8675586009999", address="深圳市南山区科技园",
                     created_run_id=run.id),
            Customer(id=49, name="深圳腾达科技有限公司", phone="+8675586001234", email="a@tengda.cn",
                     created_run_id=run.id),
        ])  # fmt: skip
        session.flush()
        session.add(MatchCandidate(entity="customer", left_id=1, right_id=7, probability=0.6, features={},
                                   status="review", load_run_id=run.id))  # fmt: skip
    with session_factory(engine)() as session, session.begin():
        run = LoadRun(run_key="steward-0", project="t", mode="steward", status="succeeded")
        session.add(run)
        session.flush()
        merge_records(
            session, run, Customer, 49, [1], probability=None, reason="steward decision", decided_by="li"
        )
    return engine


def open_pairs(engine: sa.Engine) -> list[tuple[int, int, int]]:
    with engine.connect() as connection:
        return [tuple(r) for r in connection.execute(
            sa.select(MatchCandidate.id, MatchCandidate.left_id, MatchCandidate.right_id)
            .where(MatchCandidate.status == "review").order_by(MatchCandidate.id)
        )]  # fmt: skip


def test_a_pair_whose_record_was_merged_since_is_shown_and_decided_as_its_golden_records(
    core_url: str,
) -> None:
    from typer.testing import CliRunner

    from integration.cli import app

    engine = seed_merged_since(core_url)
    deduplicate_customers(engine, "dedup-1", "t", finish=True)  # links the golden records: 7 / 49 comes up
    (stale, *_), (fresh, *_) = open_pairs(engine)
    assert open_pairs(engine) == [(stale, 1, 7), (fresh, 7, 49)]
    queue = review_queue(engine)
    assert len(queue) == 1  # one golden pair, one entry
    entry = queue[0]
    assert (entry["left_id"], entry["right_id"]) == (7, 49) and entry["scored_on"] in ([7, 49], [7, 1])
    assert (entry["left"], entry["right"]) == ("深圳市腾达科技有限公司", "深圳腾达科技有限公司")
    assert {entry["candidate"], *entry["same_pair"]} == {stale, fresh}
    shown = CliRunner().invoke(app, ["dedup", "review", "--core-url", core_url])
    assert shown.exit_code == 0 and OLD_NAME not in shown.output, shown.output
    assert f"{entry['candidate']} +{entry['same_pair'][0]}" in shown.output, shown.output
    # Deciding the stale pair (as the newcomer did) decides the golden pair: nothing of it stays open.
    decided = decide(engine, stale, same=False, steward="steward:wang", run_key="steward-1", project="t")
    assert decided.status == "distinct"
    assert open_pairs(engine) == [] and review_queue(engine) == []
    with engine.connect() as connection:
        fresh_now = connection.execute(
            sa.select(MatchCandidate.status, MatchCandidate.decided_by).where(MatchCandidate.id == fresh)
        ).one()
    assert tuple(fresh_now) == ("distinct", "steward:wang")
    deduplicate_customers(engine, "dedup-2", "t", finish=True)
    assert open_pairs(engine) == []
    engine.dispose()


def test_a_different_on_a_pair_holds_for_the_golden_record_its_record_was_merged_into(core_url: str) -> None:
    engine = seed_merged_since(core_url)
    ((stale, *_),) = open_pairs(engine)
    decide(engine, stale, same=False, steward="steward:wang", run_key="steward-1", project="t")
    outcome = deduplicate_customers(engine, "dedup-1", "t", finish=True)
    assert outcome.auto_merged == 0 and outcome.bands == {"distinct": 1}  # 7 / 49 is never proposed again
    assert open_pairs(engine) == [] and review_queue(engine) == []
    engine.dispose()
