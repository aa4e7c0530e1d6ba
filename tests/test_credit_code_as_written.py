"""The credit code as written (issue 14, identifier near-matches end to end through ``crmi run``).

A mapping cleans ``credit_code`` with ``uscc``: a damaged code, a 15-digit registration number or a
9-character organisation code is refused and, with ``on_error: "null"``, never reaches the core. Mapped a
second time to ``credit_code_as_written`` (``uscc_as_written``), the cell is kept beside it and linkage
compares it as an identifier. A small project of two sources (an ERP and a CRM, SQLite) is run through
``crmi run``, once with the field mapped and once without, among background companies in five cities.
"""

from __future__ import annotations

import json
import random
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa
from stdnum.cn import uscc
from typer.testing import CliRunner

from integration.assets.resources import dispose_engines
from integration.cli import app
from integration.dedup.customers import CUSTOMER_SPEC, customer_records, linkage_frame, linkage_row
from integration.dedup.linkage import compare
from integration.dedup.normalize import credit_code_parts, credit_codes_near
from integration.dedup.online import MatchIndex, query_record
from integration.mappings.transforms import uscc_as_written_value
from tests.test_matching_classes import MISTYPED, code

pytestmark = pytest.mark.slow

TENGDA = code("440305", "70846113")  # 深圳
YUNFAN = code("330106", "31415926")  # 杭州
HENGXIN = code("510107", "27182818")  # 成都
# the CRM's code of 成都衡信, another company: HENGXIN with two characters changed (no one edit repairs it),
# a check digit that fails
HENGDA_WRITTEN = (
    HENGXIN[:9]
    + ("5" if HENGXIN[9] != "5" else "6")
    + HENGXIN[10:13]
    + ("7" if HENGXIN[13] != "7" else "8")
    + HENGXIN[14:]
)
SWAPPED = TENGDA[:10] + TENGDA[11] + TENGDA[10] + TENGDA[12:]  # two characters swapped: check digit fails
REG15 = YUNFAN[2:17]  # the old 15-digit registration number: division + organisation code

# (erp key, name, code as written, phone, address) and (crm id, name, code as written, phone, city)
ERP_PLANTED = [
    ("E-TENGDA", "深圳市腾达科技有限公司", TENGDA, None, "广东省深圳市南山区科技园路12号"),
    ("E-YUNFAN", "杭州云帆软件有限公司", YUNFAN, None, "浙江省杭州市西湖区文三路90号"),
    ("E-HENGXIN", "成都恒信电子有限公司", HENGXIN, None, "四川省成都市武侯区人民南路4段8号"),
]
CRM_PLANTED = [
    ("C-TENGDA", "深圳市腾大科技有限公司", SWAPPED, None, "深圳"),  # 达/大: a homophone
    ("C-YUNFAN", "芸帆软件（杭州）有限公司", REG15, None, "杭州"),  # 云/芸, the region in brackets
    ("C-HENGDA", "成都衡信电子有限公司", HENGDA_WRITTEN, None, "成都"),  # 恒/衡: as alike as 达/大
]
CITIES = [("深圳", "广东省", "0755", "440305", "南山区"), ("郑州", "河南省", "0371", "410105", "金水区"),
          ("上海", "上海市", "021", "310104", "徐汇区"), ("成都", "四川省", "028", "510107", "武侯区"),
          ("杭州", "浙江省", "0571", "330106", "西湖区")]  # fmt: skip
BRANDS = ["博远", "瑞丰", "金桥", "安捷", "鼎新", "宏图", "天成", "众合", "卓越", "远景", "嘉禾", "明德", "汇通",
          "启明", "同创", "海纳", "星河", "凯达", "思源", "长城", "飞扬", "华创", "盛达", "永泰", "志远", "佳和"]  # fmt: skip
INDUSTRIES = ["贸易", "物流", "机械设备", "环保工程", "食品", "咨询"]


def background() -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Sixty companies in the ERP, half of them also in the CRM (valid code, one shared phone), and in the
    CRM a dozen other firms whose names sound like an ERP company's in its city (so a name alone is not
    taken for a match by the unsupervised classifier)."""
    rng = random.Random(1411)
    erp: list[tuple[Any, ...]] = []
    crm: list[tuple[Any, ...]] = []
    firms = rng.sample([(brand, industry) for brand in BRANDS for industry in INDUSTRIES], 60)
    for n, (brand, industry) in enumerate(firms):
        city, province, area, division, district = CITIES[n % len(CITIES)]
        name = f"{city}{brand}{industry}有限公司"
        phone = f"{area}-{rng.randrange(2 * 10**7, 9 * 10**7)}"
        valid = code(division, f"{rng.randrange(10**8):08d}")
        erp.append((f"E{n:03d}", name, valid, phone, f"{province}{city}市{district}建设路{n + 1}号"))
        if n % 2 == 0:
            crm.append(
                (
                    f"C{n:03d}",
                    f"{brand}{industry}（{city}）有限公司",
                    valid if n % 4 == 0 else None,
                    phone,
                    city,
                )
            )
        elif n % 3 == 1 and brand[0] in MISTYPED:
            other = f"{city}{MISTYPED[brand[0]]}{brand[1:]}{industry}有限公司"
            crm.append((f"N{n:03d}", other, None, f"{area}-{rng.randrange(2 * 10**7, 9 * 10**7)}", city))
    return erp, crm


@dataclass(frozen=True)
class Outcome:
    """What one ``crmi run`` left in the core."""

    core_url: str
    run_id: str
    golden: dict[tuple[str, str], int]  # (system, key) -> golden customer id
    rows: dict[tuple[str, str], dict[str, Any]]  # (system, key) -> the source record's own customer row


def project(root: Path, *, as_written: bool) -> Path:
    """Two sources (ERP and CRM customers, SQLite) and their mappings, with or without the code as written."""
    root.mkdir(parents=True)
    erp_rows, crm_rows = background()
    erp = sqlite3.connect(root / "erp.sqlite")
    erp.execute(
        "CREATE TABLE customers (code TEXT PRIMARY KEY, name TEXT, reg_code TEXT, phone TEXT, address TEXT)"
    )
    erp.executemany("INSERT INTO customers VALUES (?, ?, ?, ?, ?)", [*erp_rows, *ERP_PLANTED])
    erp.commit()
    erp.close()
    crm = sqlite3.connect(root / "crm.sqlite")
    crm.execute(
        "CREATE TABLE accounts (id TEXT PRIMARY KEY, name TEXT, sic_code TEXT, phone_office TEXT, city TEXT)"
    )
    crm.executemany("INSERT INTO accounts VALUES (?, ?, ?, ?, ?)", [*crm_rows, *CRM_PLANTED])
    crm.commit()
    crm.close()
    (root / "project.yaml").write_text(
        "version: 1\nname: written\nsources:\n"
        f"  erp: {{connector: sql, url: 'sqlite:///{root / 'erp.sqlite'}'}}\n"
        f"  crm: {{connector: sql, url: 'sqlite:///{root / 'crm.sqlite'}'}}\n"
        "dedup:\n  customer:\n    match_keys: [[credit_code], [name_normalized]]\n"
        "    conflict_fields: [credit_code]\n    source_priority: [erp, crm]\n",
        encoding="utf-8",
    )
    written = "  credit_code_as_written: {{from: {column}, transforms: [uscc_as_written]}}\n"
    (root / "mappings").mkdir()
    (root / "mappings" / "erp_customers.yaml").write_text(
        "version: 1\nsource: {connector: erp, table: customers, key: code}\ntarget: customer\nfields:\n"
        "  name: {from: name, transforms: [company_name], required: true}\n"
        '  credit_code: {from: reg_code, transforms: [uscc], on_error: "null"}\n'
        + (written.format(column="reg_code") if as_written else "")
        + '  phone: {from: phone, transforms: [phone], on_error: "null"}\n'
        "  address: {from: address, transforms: [trim]}\n"
        "  city: {from: address, transforms: [{address_part: {part: city}}]}\n",
        encoding="utf-8",
    )
    (root / "mappings" / "crm_accounts.yaml").write_text(
        "version: 1\nsource: {connector: crm, table: accounts, key: id}\ntarget: customer\nfields:\n"
        "  name: {from: name, transforms: [company_name], required: true}\n"
        '  credit_code: {from: sic_code, transforms: [uscc], on_error: "null"}\n'
        + (written.format(column="sic_code") if as_written else "")
        + '  phone: {from: phone_office, transforms: [phone], on_error: "null"}\n'
        "  city: {from: city, transforms: [trim]}\n",
        encoding="utf-8",
    )
    return root


def run(root: Path, monkeypatch: pytest.MonkeyPatch) -> Outcome:
    """``crmi run`` the project on a fresh SQLite core; read each source record's golden customer."""
    monkeypatch.setenv("DAGSTER_HOME", str(root / "dagster_home"))
    (root / "dagster_home").mkdir()
    monkeypatch.chdir(root)
    core_url = f"sqlite:///{root / 'core.sqlite'}"
    result = CliRunner().invoke(app, ["run", "--project", str(root), "--core-url", core_url, "--json"])
    dispose_engines()
    assert result.exit_code == 0, result.output
    run_id = json.loads(result.stdout)["run_id"]
    engine = sa.create_engine(core_url)
    with engine.connect() as connection:
        customers = pd.read_sql("SELECT * FROM customers", connection).set_index("id")
        crosswalk = connection.execute(
            sa.text(
                "SELECT system, external_key, entity_id, match_method FROM external_ids WHERE entity = 'customer'"
            )
        ).all()
    engine.dispose()
    merged_into = customers["merged_into_id"].dropna().astype(int).to_dict()

    def survivor(customer_id: int) -> int:
        while customer_id in merged_into:
            customer_id = merged_into[customer_id]
        return customer_id

    golden: dict[tuple[str, str], int] = {}
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for system, key, entity_id, method in crosswalk:
        golden[(system, key)] = survivor(int(entity_id))
        # a record merged by linkage keeps its own row (linked:<id>); one matched at load shares one
        own = int(method.split(":", 1)[1]) if method.startswith("linked:") else int(entity_id)
        rows[(system, key)] = {"id": own, **{str(k): v for k, v in customers.loc[own].items()}}
    return Outcome(core_url, run_id, golden, rows)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Outcome]]:
    """The project run once with the code as written mapped and once without."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        found = {
            name: run(project(tmp_path_factory.mktemp(name) / "p", as_written=flag), monkeypatch)
            for name, flag in (("with", True), ("without", False))
        }
        yield found


def same(outcome: Outcome, left: str, right: str) -> bool:
    """True when the ERP record ``left`` and the CRM record ``right`` share one golden customer."""
    return outcome.golden[("erp", left)] == outcome.golden[("crm", right)]


def test_the_planted_codes_are_what_the_classes_say() -> None:
    assert not uscc.is_valid(SWAPPED) and credit_codes_near(TENGDA, SWAPPED)
    assert credit_code_parts(REG15).organisation == credit_code_parts(YUNFAN).organisation
    assert not uscc.is_valid(HENGDA_WRITTEN) and not credit_codes_near(HENGXIN, HENGDA_WRITTEN)


def test_a_credit_code_with_two_characters_swapped_merges_through_crmi_run(runs: dict[str, Outcome]) -> None:
    assert same(runs["with"], "E-TENGDA", "C-TENGDA")
    assert not same(runs["without"], "E-TENGDA", "C-TENGDA")  # the mistyped name alone is not enough


def test_a_15_digit_registration_number_merges_with_the_18_character_code(runs: dict[str, Outcome]) -> None:
    assert same(runs["with"], "E-YUNFAN", "C-YUNFAN")
    assert not same(runs["without"], "E-YUNFAN", "C-YUNFAN")


def test_codes_no_one_edit_explains_keep_two_companies_apart(runs: dict[str, Outcome]) -> None:
    # names a homophone apart, like 腾达/腾大 above: only a code one edit away would have made them one
    outcome = runs["with"]
    assert not same(outcome, "E-HENGXIN", "C-HENGDA")
    ids = sorted(outcome.rows[record]["id"] for record in (("erp", "E-HENGXIN"), ("crm", "C-HENGDA")))
    engine = sa.create_engine(outcome.core_url)
    with engine.connect() as connection:
        features = connection.scalar(
            sa.text("SELECT features FROM match_candidates WHERE left_id = :a AND right_id = :b"),
            {"a": ids[0], "b": ids[1]},
        )
    # Stored only when it scored for review; compared either way (same city, names alike): the levels again
    records = customer_records(engine)
    engine.dispose()
    pair = pd.MultiIndex.from_tuples([tuple(ids)])
    levels = compare(records, pair, CUSTOMER_SPEC).iloc[0]
    assert levels["name_core_levenshtein"] >= 1  # names alike …
    assert levels["credit_code_identifier"] == 0  # … and the codes not taken for one
    if features is not None:
        found = json.loads(features) if isinstance(features, str) else features
        assert found["credit_code_identifier"] == 0


def test_the_damaged_code_is_kept_as_written_while_credit_code_stays_empty(runs: dict[str, Outcome]) -> None:
    crm = runs["with"].rows[("crm", "C-TENGDA")]
    assert crm["credit_code"] is None and crm["credit_code_as_written"] == SWAPPED
    assert runs["with"].rows[("crm", "C-YUNFAN")]["credit_code_as_written"] == REG15
    erp = runs["with"].rows[("erp", "E-TENGDA")]  # the golden record: its own code, valid
    assert erp["credit_code"] == TENGDA and erp["credit_code_as_written"] == TENGDA
    assert runs["without"].rows[("crm", "C-TENGDA")]["credit_code_as_written"] is None
    engine = sa.create_engine(runs["with"].core_url)
    with engine.connect() as connection:  # never validated as a 统一社会信用代码: only credit_code warns
        reasons = (
            connection.execute(
                sa.text("SELECT DISTINCT field FROM rejects WHERE row_ref IN ('C-TENGDA', 'C-YUNFAN')")
            )
            .scalars()
            .all()
        )
    engine.dispose()
    assert reasons == ["credit_code"]


def test_rolling_the_run_back_removes_the_codes_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outcome = run(project(tmp_path / "p", as_written=True), monkeypatch)
    rolled = CliRunner().invoke(
        app, ["rollback", outcome.run_id, "--cascade", "--core-url", outcome.core_url]
    )
    dispose_engines()
    assert rolled.exit_code == 0, rolled.output
    engine = sa.create_engine(outcome.core_url)
    with engine.connect() as connection:
        left = connection.scalar(
            sa.text("SELECT count(*) FROM customers WHERE credit_code_as_written IS NOT NULL")
        )
    engine.dispose()
    assert left == 0


@pytest.mark.parametrize(
    ("written", "kept"),
    [
        ("9144 0300 7084 6113 6X", "91440300708461136X"),
        ("４４０３０１７０８４６１１３６", "440301708461136"),
        ("70846113-6", "708461136"),
        ("91440300mA", "91440300MA"),
        ("无", None),
        ("N/A", None),
        ("0", None),
        ("000000000", None),
        ("91440300708461136T；91440300708461137X", None),  # two codes in one cell: not one identifier
    ],
)
def test_the_code_as_written_is_compacted_and_placeholders_dropped(written: str, kept: str | None) -> None:
    assert uscc_as_written_value(written) == kept


def test_linkage_reads_the_code_as_written_only_where_no_valid_code_is_kept() -> None:
    assert linkage_row("深圳腾达科技有限公司", credit_code_as_written=SWAPPED)["credit_code"] == SWAPPED
    both = linkage_row("深圳腾达科技有限公司", credit_code=TENGDA, credit_code_as_written=REG15)
    assert both["credit_code"] == TENGDA
    assert linkage_row("深圳腾达科技有限公司", credit_code_as_written="000000000")["credit_code"] is None
    assert linkage_row("深圳腾达科技有限公司", credit_code_as_written="N/A")["credit_code"] is None


def test_the_online_index_finds_a_customer_by_its_code_as_written() -> None:
    erp_rows, _ = background()
    customers = [{"id": n, "name": row[1], "credit_code": row[2], "phone": row[3], "address": row[4]}
                 for n, row in enumerate(erp_rows, start=1)]  # fmt: skip
    customers.append({"id": 900, "name": "深圳市腾达科技有限公司", "credit_code_as_written": TENGDA[2:17]})
    index = MatchIndex(linkage_frame(customers))
    assert index.value(900, "credit_code") == TENGDA[2:17]
    # the form has the valid 18-character code: the old 15-digit number is this code, not a conflicting one
    [best, *_] = index.match(query_record("腾达科技（深圳）有限公司", credit_code=TENGDA))
    assert best.customer_id == 900 and best.probability >= CUSTOMER_SPEC.review
    assert best.levels["credit_code_identifier"] == 1
    other = code("440305", "12345678")  # another firm's code: no identifier evidence, a lower score
    [unsure, *_] = index.match(query_record("腾达科技（深圳）有限公司", credit_code=other))
    assert unsure.levels["credit_code_identifier"] == 0 and unsure.probability < best.probability


def test_a_wrong_check_digit_keeps_the_organisation_code_it_still_holds() -> None:
    wrong = TENGDA[:17] + ("0" if TENGDA[17] != "0" else "1")  # only the check digit is wrong
    assert credit_code_parts(wrong).organisation == TENGDA[8:17]  # its own GB 11714 check still holds
    assert credit_code_parts(TENGDA[2:17]).organisation == credit_code_parts(wrong).organisation  # one block
    assert credit_code_parts(SWAPPED).organisation is None  # the swap is inside it: nothing to compare
