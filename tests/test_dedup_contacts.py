"""Contact dedup: the same person twice under one customer merges; namesakes elsewhere never do."""

from __future__ import annotations

import random
from dataclasses import replace

import sqlalchemy as sa

from crm_core.db import make_engine, session_factory, upgrade
from crm_core.merging import undo_merge
from crm_core.models import Contact, Customer, ExternalId, LoadRun, MatchCandidate
from integration.dedup.contacts import CONTACT_SPEC, deduplicate_contacts

SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗"
GIVEN = [
    "芳",
    "伟",
    "娜",
    "敏",
    "静",
    "强",
    "磊",
    "洋",
    "艳",
    "勇",
    "军",
    "杰",
    "涛",
    "明",
    "超",
    "霞",
    "平",
    "刚",
]


def seed(url: str) -> tuple[sa.Engine, dict[int, int]]:
    """40 customers with 3 distinct contacts each; 15 people entered a second time (another spelling).

    Returns the engine and each contact's person id (the truth).
    """
    rng = random.Random(7)
    engine = make_engine(url)
    upgrade(engine)
    person: dict[int, int] = {}
    with session_factory(engine)() as session, session.begin():
        run = LoadRun(run_key="seed", project="t", status="succeeded")
        session.add(run)
        session.flush()
        people = []
        for customer_id in range(1, 41):
            session.add(Customer(id=customer_id, name=f"公司{customer_id}", created_run_id=run.id))
            names = rng.sample([s + g for s in SURNAMES for g in GIVEN], 3)
            for name in names:
                people.append(
                    (
                        customer_id,
                        name,
                        f"+86138{rng.randrange(10**8):08d}",
                        f"{len(people)}@c{customer_id}.cn",
                    )
                )
        session.flush()
        for number, (customer_id, name, mobile, email) in enumerate(people):
            contact = Contact(
                customer_id=customer_id, name=name, mobile=mobile, email=email, created_run_id=run.id
            )
            session.add(contact)
            session.flush()
            person[contact.id] = number
            session.add(
                ExternalId(entity="contact", entity_id=contact.id, system="erp", external_key=f"P{number}")
            )
        for number in rng.sample(range(len(people)), 15):  # the same person again, from the spreadsheet
            customer_id, name, mobile, _ = people[number]
            again = Contact(
                customer_id=customer_id, name=f"{name[0]} {name[1:]}", mobile=mobile, created_run_id=run.id
            )
            session.add(again)
            session.flush()
            person[again.id] = number
            session.add(
                ExternalId(entity="contact", entity_id=again.id, system="xlsx", external_key=f"X{number}")
            )
        # A namesake with the same name under another customer: a different person.
        session.add(Contact(customer_id=2, name=people[0][1], mobile="+8613911112222", created_run_id=run.id))
    return engine, person


def test_duplicate_contacts_merge_within_a_customer_and_namesakes_do_not(sqlite_core_url: str) -> None:
    engine, person = seed(sqlite_core_url)
    outcome = deduplicate_contacts(engine, "dedup-contacts", "t")
    assert outcome.auto_merged == 15, outcome
    with session_factory(engine)() as session:
        merged = session.scalars(sa.select(Contact).where(Contact.merged_into_id.is_not(None))).all()
        for loser in merged:
            survivor = session.get(Contact, loser.merged_into_id)
            assert survivor is not None and survivor.merged_into_id is None
            assert person[loser.id] == person[survivor.id]
            assert survivor.email is not None  # the more complete record survives
        # the crosswalk follows the survivor
        moved = session.scalars(sa.select(ExternalId).where(ExternalId.system == "xlsx")).all()
        assert {e.match_method.split(":")[0] for e in moved} == {"linked"}
        assert session.scalar(sa.select(sa.func.count()).select_from(Contact).where(Contact.customer_id == 2,
                                                                                    Contact.merged_into_id.is_(None))) >= 4  # fmt: skip


def test_a_contact_merge_undoes_and_is_never_proposed_again(sqlite_core_url: str) -> None:
    engine, _ = seed(sqlite_core_url)
    outcome = deduplicate_contacts(engine, "dedup-1", "t")
    with session_factory(engine)() as session, session.begin():
        log = undo_merge(session, outcome.merge_log_ids[-1], "steward")
    with session_factory(engine)() as session:
        restored = session.get(Contact, log.merged_id)
        assert restored is not None and restored.merged_into_id is None
        assert session.scalar(sa.select(MatchCandidate.status).where(
            MatchCandidate.entity == "contact", MatchCandidate.left_id == min(log.survivor_id, log.merged_id),
            MatchCandidate.right_id == max(log.survivor_id, log.merged_id))) == "distinct"  # fmt: skip
    again = deduplicate_contacts(engine, "dedup-2", "t")
    assert again.auto_merged == 0


def test_a_steward_decides_a_contact_pair_from_the_shared_review_queue(sqlite_core_url: str) -> None:
    from integration.dedup.workflow import decide, review_queue

    engine, _ = seed(sqlite_core_url)
    with session_factory(engine)() as session, session.begin():
        left, right = session.scalars(
            sa.select(Contact.id).where(Contact.customer_id == 3).order_by(Contact.id).limit(2)
        ).all()
        session.add(
            MatchCandidate(entity="contact", left_id=left, right_id=right, probability=0.7, status="review")
        )
    [item] = review_queue(engine, entity="contact")
    assert (item["entity"], item["left_id"], item["right_id"]) == ("contact", left, right)
    assert item["left_key"] is not None  # the mobile, shown next to the name
    decide(engine, item["candidate"], same=True, steward="steward:li", run_key="steward-1", project="t")
    with session_factory(engine)() as session:
        merged = session.get(Contact, right)
        assert merged is not None and merged.merged_into_id == left
    assert review_queue(engine, entity="contact") == []


def test_two_people_sharing_a_mailbox_are_never_merged_on_it(sqlite_core_url: str) -> None:
    """A small project whose only contacts with something in common share a mailbox (ECM, fitted on such
    pairs alone, can score them 0.99): 刘勇 and 吴敏 both write from li@acme (no mobiles), 周洋 and 吴娜 share
    a@example with mobiles of their own. Neither pair merges: the first waits for a steward, the second is two
    people."""
    engine = make_engine(sqlite_core_url)
    upgrade(engine)
    rng = random.Random(11)
    names = rng.sample([s + g for s in SURNAMES for g in GIVEN], 8)
    shared = [(9, "刘勇", None, "li@acme.com.cn"), (9, "吴敏", None, "li@acme.com.cn"),
              (10, "周洋", "+8613812345678", "a@example.cn"), (10, "吴娜", "+8613900001111", "a@example.cn"),
              *((c, n, None, f"office@c{c}.cn") for c in (5, 6, 7, 8) for n in ("孙强", "马静"))]  # fmt: skip
    ids = {}
    with session_factory(engine)() as session, session.begin():
        run = LoadRun(run_key="seed", project="t", status="succeeded")
        session.add(run)
        session.flush()
        for customer_id in range(1, 11):
            session.add(Customer(id=customer_id, name=f"公司{customer_id}", created_run_id=run.id))
        session.flush()
        for number, name in enumerate(names):  # two people each, nothing in common
            session.add(Contact(customer_id=number % 4 + 1, name=name, mobile=f"+86138{rng.randrange(10**8):08d}",
                                email=f"{number}@c.cn", created_run_id=run.id))  # fmt: skip
        for customer_id, name, mobile, email in shared:
            contact = Contact(
                customer_id=customer_id, name=name, mobile=mobile, email=email, created_run_id=run.id
            )
            session.add(contact)
            session.flush()
            ids[f"{customer_id}{name}"] = contact.id
    # however sure the classifier is of them (here: every linked pair scores in the merge band)
    sure = replace(CONTACT_SPEC, auto_merge=CONTACT_SPEC.review)
    outcome = deduplicate_contacts(engine, "dedup-contacts", "t", spec=sure)
    assert outcome.auto_merged == 0, outcome
    with session_factory(engine)() as session:
        merged = set(session.scalars(sa.select(Contact.id).where(Contact.merged_into_id.is_not(None))))
        pairs = {
            (left, right): status
            for left, right, status in session.execute(
                sa.select(MatchCandidate.left_id, MatchCandidate.right_id, MatchCandidate.status)
            )
        }
    assert not merged & set(ids.values()), (merged, ids)
    assert pairs.get((ids["9刘勇"], ids["9吴敏"])) == "review", pairs
    assert pairs.get((ids["10周洋"], ids["10吴娜"]), "distinct") == "distinct", pairs


def test_contacts_that_agree_on_nothing_are_not_sent_to_review(sqlite_core_url: str) -> None:
    """A small project whose contacts share nothing (other names, other or no mobiles and e-mails): the
    classifier has no agreement to learn from and scores every pair alike (0.5, at the review threshold), but
    a pair that agrees on no compared field is no candidate. Found by a newcomer: 52 pairs such as 王军 / 周丽
    filled the stewards' queue."""
    engine = make_engine(sqlite_core_url)
    upgrade(engine)
    rng = random.Random(5)
    names = rng.sample([s + g for s in SURNAMES for g in GIVEN], 24)
    with session_factory(engine)() as session, session.begin():
        run = LoadRun(run_key="seed", project="t", status="succeeded")
        session.add(run)
        session.flush()
        for customer_id in range(1, 5):
            session.add(Customer(id=customer_id, name=f"公司{customer_id}", created_run_id=run.id))
        session.flush()
        for number, name in enumerate(names):
            mobile = f"+86138{rng.randrange(10**8):08d}" if number % 3 else None
            email = f"{number}@c.cn" if number % 2 else None
            session.add(Contact(customer_id=number % 4 + 1, name=name, mobile=mobile, email=email,
                                created_run_id=run.id))  # fmt: skip
    from integration.dedup.workflow import review_queue

    outcome = deduplicate_contacts(engine, "dedup-contacts", "t")
    assert outcome.auto_merged == 0, outcome
    assert review_queue(engine, entity="contact") == []
