"""Linkage on bad input: empty names, all-null columns, one record, 1,000 identical records, Unicode oddities."""

from __future__ import annotations

import pandas as pd

from integration.dedup.customers import CUSTOMER_SPEC, linkage_row
from integration.dedup.linkage import link
from tests.test_linkage import companies


def frame_of(rows: dict[int, dict[str, object]]) -> pd.DataFrame:
    return pd.DataFrame.from_dict(rows, orient="index")


def test_empty_names_and_all_null_columns_link_without_error_and_merge_nothing() -> None:
    rows = {
        i: linkage_row(name)
        for i, name in enumerate(["", "   ", None, "有限公司", "Co., Ltd.", "（）"], start=1)
    }
    frame = frame_of(rows)
    assert frame[["credit_code", "phone", "email_domain", "city"]].isna().all().all()
    result = link(frame, CUSTOMER_SPEC)
    assert result.clusters == []  # no evidence at all: nothing is sure


def test_a_single_record_and_no_records_give_empty_results() -> None:
    one = link(frame_of({1: linkage_row("深圳市腾达科技有限公司", phone="+8675586001234")}), CUSTOMER_SPEC)
    assert (one.pairs_compared, one.clusters, one.cluster_review) == (0, [], [])
    none = link(frame_of({1: linkage_row("x")}).iloc[0:0], CUSTOMER_SPEC)
    assert none.pairs_compared == 0 and none.reduction_ratio == 0.0


def test_a_thousand_identical_records_go_to_review_as_one_cluster_not_auto_merged() -> None:
    frame, _ = companies()
    same = linkage_row("深圳市腾达科技有限公司", credit_code="91440300708461136T", phone="+8675586001234")
    copies = frame_of({100_000 + i: same for i in range(1000)})
    result = link(pd.concat([frame, copies]), CUSTOMER_SPEC)
    assert not any(member >= 100_000 for cluster in result.clusters for member in cluster)
    [big] = [c for c in result.cluster_review if c[0] >= 100_000]
    assert len(big) == 1000  # larger than max_cluster: a steward decides, once, for the whole group


def test_unicode_oddities_normalize_away_and_still_match() -> None:
    frame, _ = companies()
    variants = {
        90001: "深圳市腾达\u200b科技有限公司",  # zero-width space
        90002: "深圳市腾达科技有限公司😀",  # emoji
        90003: "深圳市\ufeff腾達科技有限公司",  # BOM + a traditional character
        90004: "ＳＨＥＮＺＨＥＮ ＴＥＮＧＤＡ Ｔｅｃｈｎｏｌｏｇｙ Ｃｏ．，Ｌｔｄ．",  # full-width Latin
    }
    extra = frame_of({i: linkage_row(n, phone="+8675586001234") for i, n in variants.items()})
    result = link(pd.concat([frame, extra]), CUSTOMER_SPEC)
    assert len({extra.at[i, "name_core"] for i in (90001, 90003)}) == 1
    together = [c for c in result.clusters + result.cluster_review if 90001 in c]
    assert together and {90001, 90003, 90004} <= set(together[0])
