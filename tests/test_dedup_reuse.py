"""Work a dedup pass reuses or counts differently without changing what it finds (issue 13).

The second look reuses the first pass's linkage rows of the customers the merges left alone; pair lookups,
block sizes and ECM's count of distinct comparison vectors run over whole columns. Each must give exactly
what the straightforward computation gives.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
import recordlinkage as rl
from sqlalchemy import update

from crm_core.db import make_engine, session_factory, upgrade
from crm_core.models import Customer
from integration.dedup import customers as customers_module
from integration.dedup import linkage as linkage_module
from integration.dedup.customers import CUSTOMER_SPEC, customer_records, linkage_frame, read_customer_records
from integration.dedup.linkage import Compared, _block_key, among, candidate_pairs, compare, ordered
from integration.dedup.recordlinkage_parts import PackedECM

CUSTOMERS = [
    {"name": "深圳市腾达科技有限公司", "phone": "0755-26781234", "city": "深圳"},
    {"name": "腾达科技(深圳)有限公司", "phone": "0755-26781234"},
    {"name": "郑州腾达科技有限公司", "address": "河南省郑州市金水区花园路12号"},
    {"name": "杭州隆桥自动化设备有限公司", "credit_code": "91330106MA2H0XXXXX"},
    {"name": "上海博远物流有限公司", "email": "info@boyuan.com", "city": "上海"},
]


def test_a_second_read_computes_only_new_and_changed_customers_and_equals_a_fresh_read(
    sqlite_core_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(sqlite_core_url)
    upgrade(engine)
    with session_factory(engine)() as session, session.begin():
        session.add_all([Customer(**row) for row in CUSTOMERS])
    first = read_customer_records(engine)
    assert list(first.frame.index) == [1, 2, 3, 4, 5]
    with session_factory(engine)() as session, session.begin():
        session.execute(update(Customer).where(Customer.id == 2).values(merged_into_id=1))
        session.execute(update(Customer).where(Customer.id == 1).values(email="sales@tengda.cn"))  # a fill
        session.add(Customer(name="上海博远物流有限公司", city="上海", phone="021-64871234"))
    computed: list[str] = []
    linkage_rows = customers_module.linkage_rows

    def counting(rows: Any) -> Any:
        computed.extend(row["name"] for row in rows)
        return linkage_rows(rows)

    monkeypatch.setattr(customers_module, "linkage_rows", counting)
    again = read_customer_records(engine, first)
    assert sorted(computed) == sorted([CUSTOMERS[0]["name"], "上海博远物流有限公司"])  # changed, new
    monkeypatch.undo()
    fresh = customer_records(engine)
    pd.testing.assert_frame_equal(again.frame, fresh, check_exact=True)
    for column in fresh.columns:  # None stays None, NaN stays NaN
        assert [type(v) for v in again.frame[column]] == [type(v) for v in fresh[column]], column
    engine.dispose()


def test_a_read_with_nothing_earlier_or_no_customers_is_a_plain_read(sqlite_core_url: str) -> None:
    engine = make_engine(sqlite_core_url)
    upgrade(engine)
    empty = read_customer_records(engine)
    assert empty.frame.empty and list(empty.frame.columns) == list(customer_records(engine).columns)
    with session_factory(engine)() as session, session.begin():
        session.add_all([Customer(**row) for row in CUSTOMERS])
    pd.testing.assert_frame_equal(read_customer_records(engine, empty).frame, customer_records(engine))
    engine.dispose()


def test_among_finds_stored_pairs_in_either_order() -> None:
    pairs = pd.MultiIndex.from_tuples([(2, 1), (1, 3), (5, 4), (7, 6), (8, 8)])
    stored = {(1, 2), (4, 5), (8, 8), (9, 10)}
    expected = [ordered(pair) in stored for pair in pairs]
    assert among(pairs, stored).tolist() == expected == [True, False, True, False, True]
    assert among(pairs, set()).tolist() == [False] * 5
    assert among(pd.MultiIndex.from_tuples([], names=[None, None]), stored).tolist() == []


def test_block_keys_shared_by_too_many_records_are_dropped() -> None:
    frame = pd.DataFrame({"phone": ["1", "1", "1", "2", "2", None], "city": ["a", "a", "b", "a", "a", "a"]})
    assert _block_key(frame, ["phone"], 2).tolist() == [pd.NA, pd.NA, pd.NA, "2", "2", pd.NA]
    assert _block_key(frame, ["phone", "city"], 1).tolist() == [pd.NA, pd.NA, "1\x1fb", pd.NA, pd.NA, pd.NA]


def _fitted(kernel: str, fit_on: pd.DataFrame) -> Any:
    classifier = rl.ECMClassifier(binarize=None)
    if kernel == "packed":
        classifier.kernel = PackedECM(**classifier.kernel.get_params())
    with np.errstate(divide="ignore", invalid="ignore"):
        classifier.fit(fit_on)
    return classifier


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_packed_ecm_fits_exactly_as_recordlinkage_does(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows = 20_000
    same = rng.random(rows) < 0.1  # a tenth duplicates: most indicators agree for them, few otherwise
    chance = np.where(same[:, None], [0.95, 0.9, 0.6, 0.7, 0.5], [0.2, 0.05, 0.01, 0.03, 0.1])
    fit_on = pd.DataFrame((rng.random((rows, 5)) < chance).astype(np.int8), columns=list("abcde"))
    stock, packed = _fitted("stock", fit_on), _fitted("packed", fit_on)
    assert np.array_equal(stock.kernel.class_log_prior_, packed.kernel.class_log_prior_)
    assert np.array_equal(stock.kernel.feature_log_prob_, packed.kernel.feature_log_prob_)
    assert np.array_equal(stock.prob(fit_on).to_numpy(), packed.prob(fit_on).to_numpy())


def test_the_packed_ecm_leaves_other_input_to_recordlinkage() -> None:
    levels = pd.DataFrame({"a": [0, 1, 2, 2, 0, 1] * 50, "b": [1, 0, 1, 1, 0, 0] * 50}, dtype=np.int8)
    for kernel in ("stock", "packed"):  # ECM's "jaro" start takes binary comparison vectors only
        with pytest.raises(ValueError, match="Only binary labels"):
            _fitted(kernel, levels)


FIRMS = [
    {"id": 1, "name": "深圳市腾达科技有限公司", "phone": "0755-26781234"},
    {"id": 2, "name": "腾达科技(深圳)有限公司", "phone": "0755-26781234"},
    {"id": 3, "name": "深圳市腾达科技有限公司", "email": "info@tengda.cn"},
    {"id": 4, "name": "深圳腾大科技有限公司", "email": "info@tengda.cn"},
    {"id": 5, "name": "郑州腾达科技有限公司", "address": "河南省郑州市金水区花园路12号"},
]


def test_compare_keeps_the_features_of_pairs_whose_records_are_unchanged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = linkage_frame(FIRMS)
    pairs = candidate_pairs(before, CUSTOMER_SPEC)
    features = compare(before, pairs, CUSTOMER_SPEC)
    # record 2 merged away, record 4 gained a phone, record 6 is new
    now_rows = [FIRMS[0], FIRMS[2], {**FIRMS[3], "phone": "0755-26781234"}, FIRMS[4],
                {"id": 6, "name": "深圳市腾达科技有限公司", "phone": "0755-26781234"}]  # fmt: skip
    now = linkage_frame(now_rows)
    now_pairs = candidate_pairs(now, CUSTOMER_SPEC)
    compared: list[tuple[int, int]] = []
    plain = linkage_module._compare

    def counting(frame: pd.DataFrame, subset: pd.MultiIndex, spec: Any) -> pd.DataFrame:
        compared.extend(subset)
        return plain(frame, subset, spec)

    monkeypatch.setattr(linkage_module, "_compare", counting)
    reused = compare(now, now_pairs, CUSTOMER_SPEC, Compared(before, features))
    monkeypatch.undo()
    pd.testing.assert_frame_equal(reused, compare(now, now_pairs, CUSTOMER_SPEC), check_exact=True)
    changed = {4, 6}.union(  # and records whose term-frequency bucket moved with the new record
        i for i in now.index if i in before.index and not now.loc[i].equals(before.loc[i])
    )
    assert set(compared) == {pair for pair in now_pairs if set(pair) & changed or pair not in pairs}
    assert len(compared) < len(now_pairs)


def test_none_and_nan_are_different_values_to_compare() -> None:
    frame = linkage_frame(FIRMS)
    pairs = candidate_pairs(frame, CUSTOMER_SPEC)
    features = compare(frame, pairs, CUSTOMER_SPEC)
    flipped = frame.copy()
    flipped["trade_rare"] = [None if v != v else v for v in flipped["trade_rare"]]  # NaN -> None
    if flipped["trade_rare"].equals(frame["trade_rare"]):
        flipped["trade_rare"] = np.nan
    pd.testing.assert_frame_equal(
        compare(flipped, pairs, CUSTOMER_SPEC, Compared(frame, features)),
        compare(flipped, pairs, CUSTOMER_SPEC),
    )
