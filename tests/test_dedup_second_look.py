"""The second look at the golden customers (issue 14, a review queue worth a steward's time).

After the first pass merged, linkage runs once more over the golden records: it merges only one name in one
place, and queues what else it would merge (held back at half its probability) for a steward.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from crm_core.models import Customer, MatchCandidate
from integration.dedup.customers import CUSTOMER_SPEC, linkage_row
from integration.dedup.linkage import CONFLICT_FACTOR, LinkageResult, location_conflicts
from integration.dedup.spec import CUSTOMER_COLUMNS
from integration.dedup.workflow import Candidates, DedupOutcome, look_again, second_look

NAME = "name_core_levenshtein"


def frame_of(rows: dict[int, dict[str, Any]]) -> pd.DataFrame:
    """Linkage rows of the given customers (name, phone, address, city), indexed by id."""
    return pd.DataFrame([linkage_row(**row) for row in rows.values()], index=list(rows))[
        list(CUSTOMER_COLUMNS)
    ]


def result_of(scores: dict[tuple[int, int], tuple[float, str, int]]) -> LinkageResult:
    """A linkage result of hand-set pairs: probability, band and the name comparison's level."""
    index = pd.MultiIndex.from_tuples(list(scores))
    features = pd.DataFrame(0, index=index, columns=[c.name for c in CUSTOMER_SPEC.comparisons])
    features[NAME] = [level for _, _, level in scores.values()]
    probability = pd.Series([p for p, _, _ in scores.values()], index=index, dtype=float)
    band = pd.Series([b for _, b, _ in scores.values()], index=index, dtype=object)
    return LinkageResult(len(scores), 10, features, probability, band)


RECORDS = {
    # one firm: a golden record from the Chinese sources, and the English CRM record of the same city
    1: {"name": "武汉联大网络科技有限责任公司", "address": "湖北省武汉市江汉区工业大道498号"},
    2: {"name": "Wuhan Lianda Network Technology Co., Ltd.", "city": "武汉", "phone": "027-31259714"},
    # the same name, but one record says nothing about where it is: a steward decides
    3: {"name": "远合食品有限公司"},
    4: {"name": "远合食品有限公司", "address": "辽宁省沈阳市浑南区文化路631号"},
    # a close name (not the same) in one city: never merged by the second look
    5: {"name": "苏州海和供应链管理有限公司", "city": "苏州"},
    6: {"name": "苏州海泓供应链管理有限公司", "city": "苏州"},
    # a pair the first pass already put before a steward
    7: {"name": "杭州隆桥自动化设备有限公司", "city": "杭州"},
    8: {"name": "杭州隆桥自动化设备有限公司", "city": "杭州"},
}


def test_the_second_look_merges_one_name_in_one_place_and_queues_the_rest() -> None:
    frame = frame_of(RECORDS)
    result = result_of({(2, 1): (1.0, "merge", 2), (4, 3): (1.0, "merge", 2), (6, 5): (0.97, "merge", 1),
                        (8, 7): (1.0, "merge", 2)})  # fmt: skip
    clusters, scored, held = look_again(result, frame, CUSTOMER_SPEC, skip={(7, 8)})
    assert clusters == [[1, 2]] and held == 0
    assert scored[(1, 2)][2] == "merged"
    probability, features, status = scored[(3, 4)]  # no place on one side: held back, halved, explained
    assert status == "review" and probability == CONFLICT_FACTOR * 1.0
    assert features["reason"] == (
        "second look at the golden records: would merge at 1.00, but city known on one side only (沈阳市), "
        "province known on one side only (辽宁省)"
    )
    assert scored[(5, 6)][2] == "review" and scored[(5, 6)][0] < 0.5  # a close name never merges here
    assert (7, 8) not in scored  # already before a steward: not asked twice


def test_the_second_look_keeps_review_band_pairs_at_their_probability() -> None:
    frame = frame_of(RECORDS)
    result = result_of({(4, 3): (0.7, "review", 2), (6, 5): (0.1, "distinct", 1)})
    clusters, scored, _ = look_again(result, frame, CUSTOMER_SPEC)
    assert clusters == [] and list(scored) == [(3, 4)] and scored[(3, 4)][:1] == (0.7,)


def test_the_second_look_says_what_held_a_pair_back_true_to_its_comparisons() -> None:
    """The reason names what kept a pair from "the same name in the same place": never "the same name" for
    names that differ, never a missing place when both places are known (pair 8 of a newcomer's queue read
    "names 25% alike … held back: … the same name, but no shared identifier")."""
    frame = frame_of({**RECORDS, 9: {"name": "上海东方物流有限公司", "city": "苏州"}})
    result = result_of({(6, 5): (0.97, "merge", 1), (9, 5): (0.96, "merge", 0), (4, 3): (0.7, "review", 2)})
    _, scored, _ = look_again(result, frame, CUSTOMER_SPEC)
    close, other, middling = (str(scored[pair][1]["reason"]) for pair in [(5, 6), (5, 9), (3, 4)])
    assert close == "second look at the golden records: would merge at 0.97, but names alike but not the same"
    assert other == "second look at the golden records: would merge at 0.96, but names not alike"
    assert middling == (
        "second look at the golden records: scored 0.70, between the review (0.5) and auto-merge (0.95) thresholds"
    )
    for reason in (close, other, middling):
        assert "the same name" not in reason and "identifier" not in reason


def test_the_second_look_never_joins_two_cities_through_a_record_without_one() -> None:
    frame = frame_of({
        1: {"name": "华远贸易有限公司", "city": "苏州"}, 2: {"name": "华远贸易有限公司", "city": "苏州"},
        3: {"name": "华远贸易有限公司"}, 4: {"name": "华远贸易有限公司", "city": "成都"},
    })  # fmt: skip
    result = result_of({(2, 1): (1.0, "merge", 2), (3, 1): (1.0, "merge", 2), (4, 3): (1.0, "merge", 2)})
    clusters, scored, _ = look_again(result, frame, CUSTOMER_SPEC)
    assert clusters == [[1, 2]]
    assert {pair: s[2] for pair, s in scored.items()} == {
        (1, 2): "merged",
        (1, 3): "review",
        (3, 4): "review",
    }


def test_an_area_code_shared_by_cities_of_one_province_places_the_province() -> None:
    # 028 serves 成都, 资阳 and 眉山, 0731 长沙, 湘潭 and 株洲: the province is known though the city is not
    assert linkage_row("恒捷科技有限公司", phone="028-27093924")["province"] == "四川省"
    assert linkage_row("和鑫网络科技有限公司", phone="0731-36430105")["province"] == "湖南省"
    frame = frame_of({
        1: {"name": "恒捷科技有限公司", "phone": "028-27093924"},
        2: {"name": "佛山恒捷科技有限公司", "phone": "0757-25017106"},
        3: {"name": "恒捷科技有限公司", "phone": "028-27093924"},
    })  # fmt: skip
    conflict = location_conflicts(frame, pd.MultiIndex.from_tuples([(1, 2), (1, 3)]), CUSTOMER_SPEC)
    assert np.array_equal(conflict, [True, False])  # Sichuan against Foshan: two firms


def test_the_second_look_runs_only_after_the_first_pass_merged(sqlite_core_url: str) -> None:
    import sqlalchemy as sa

    from crm_core.db import make_engine, session_factory, upgrade

    engine = make_engine(sqlite_core_url)
    upgrade(engine)
    with session_factory(engine)() as session, session.begin():
        session.add_all([Customer(name="远合食品有限公司"), Customer(name="远合食品有限公司", city="沈阳")])
    nothing = second_look(engine, "dedup-1", "t", Candidates(DedupOutcome(), [], {}, 0.95))
    assert nothing.records == 0 and nothing.auto_merged == 0
    with engine.connect() as connection:
        assert connection.scalar(sa.select(sa.func.count()).select_from(MatchCandidate)) == 0
    engine.dispose()


def test_a_dedup_pass_takes_its_second_look_at_the_golden_records(sqlite_core_url: str) -> None:
    import random

    import sqlalchemy as sa

    from crm_core.db import make_engine, session_factory, upgrade
    from integration.dedup.workflow import deduplicate_customers

    engine = make_engine(sqlite_core_url)
    upgrade(engine)
    rng = random.Random(7)
    cities = [
        ("深圳", "755", "南山区"),
        ("郑州", "371", "金水区"),
        ("上海", "21", "徐汇区"),
        ("杭州", "571", "西湖区"),
    ]
    brands = ["恒信", "博远", "瑞丰", "金桥", "安捷", "鼎新", "宏图", "天成", "众合", "卓越", "远景", "嘉禾"]
    with session_factory(engine)() as session, session.begin():
        for _ in range(60):  # firms written twice with one phone: the first pass merges them
            city, area, district = rng.choice(cities)
            brand, industry = rng.choice(brands), rng.choice(["科技", "贸易", "电子", "物流"])
            phone = f"+86{area}{rng.randrange(2 * 10**7, 9 * 10**7)}"
            session.add(Customer(name=f"{city}{brand}{industry}有限公司", phone=phone,
                                 address=f"{city}市{district}人民路{rng.randrange(1, 300)}号"))  # fmt: skip
            session.add(Customer(name=f"{city}市{brand}{industry}有限公司", phone=phone))
    outcome = deduplicate_customers(engine, "dedup-1", "t", finish=True)
    assert outcome.auto_merged > 0 and outcome.second_look is not None
    with engine.connect() as connection:
        golden = connection.scalar(
            sa.select(sa.func.count()).select_from(Customer).where(Customer.merged_into_id.is_(None))
        )
    assert (
        outcome.second_look["records"] == golden + outcome.second_look["auto_merged"]
    )  # golden, not sources
    again = deduplicate_customers(
        engine, "dedup-2", "t", finish=True
    )  # nothing left to merge: no second look
    assert again.auto_merged == 0 and again.second_look is not None and again.second_look["records"] == 0
    engine.dispose()
