"""A branch written in brackets (宁波甬兴模具有限公司（北仑分公司）) stays apart from its head office through
``crmi run``: two customers, the branch marked and linked to its parent, and the online match still finds the
head office by its name and phone.

One ERP source (SQLite) holds the head office, its bracketed branch and background firms in five cities.
"""

from __future__ import annotations

import json
import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from integration.assets.resources import dispose_engines
from integration.cli import app
from integration.dedup.customers import CUSTOMER_SPEC, customer_records
from integration.dedup.online import MatchIndex, form_record
from tests.test_matching_classes import code

pytestmark = pytest.mark.slow

HEAD_CODE = code("330212", "52719384")  # 宁波市鄞州区
HEAD_PHONE = "0574-88123456"
HEAD = ("E-HEAD", "宁波甬兴模具有限公司", HEAD_CODE, HEAD_PHONE, "浙江省宁波市鄞州区天童南路500号")
BRANCH = (
    "E-BRANCH",
    "宁波甬兴模具有限公司（北仑分公司）",
    None,
    "0574-86654321",
    "浙江省宁波市北仑区明州路88号",
)
ASCII_BRANCH = (
    "E-ASCII",
    "宁波甬兴模具有限公司(杭州分公司)",
    None,
    "0571-87771234",
    "浙江省杭州市西湖区文三路9号",
)
# a branch whose head office (深圳腾达科技有限公司) is in no source: its name says what it is
ORPHAN_BRANCH = ("E-ORPHAN", "深圳腾达科技有限公司北京分公司", None, "010-65871234", "北京市朝阳区建国路88号")
CITIES = [("宁波", "浙江省", "0574", "330212", "鄞州区"), ("郑州", "河南省", "0371", "410105", "金水区"),
          ("上海", "上海市", "021", "310104", "徐汇区"), ("成都", "四川省", "028", "510107", "武侯区"),
          ("杭州", "浙江省", "0571", "330106", "西湖区")]  # fmt: skip
BRANDS = [
    "博远",
    "瑞丰",
    "金桥",
    "安捷",
    "鼎新",
    "宏图",
    "天成",
    "众合",
    "卓越",
    "远景",
    "嘉禾",
    "明德",
    "汇通",
]
INDUSTRIES = ["贸易", "物流", "机械设备", "模具", "食品"]


def background() -> list[tuple[Any, ...]]:
    """Forty firms in five cities, each with a valid code and a phone of its city."""
    rng = random.Random(2026)
    firms = rng.sample([(brand, industry) for brand in BRANDS for industry in INDUSTRIES], 40)
    rows = []
    for n, (brand, industry) in enumerate(firms):
        city, province, area, division, district = CITIES[n % len(CITIES)]
        valid = code(division, f"{rng.randrange(10**8):08d}")
        phone = f"{area}-{rng.randrange(2 * 10**7, 9 * 10**7)}"
        rows.append(
            (
                f"E{n:03d}",
                f"{city}{brand}{industry}有限公司",
                valid,
                phone,
                f"{province}{city}市{district}建设路{n + 1}号",
            )
        )
    return rows


def project(root: Path) -> Path:
    """The ERP's customers and their mapping; exact keys credit code, then the normalized name."""
    root.mkdir(parents=True)
    erp = sqlite3.connect(root / "erp.sqlite")
    erp.execute(
        "CREATE TABLE customers (code TEXT PRIMARY KEY, name TEXT, reg_code TEXT, phone TEXT, address TEXT)"
    )
    erp.executemany(
        "INSERT INTO customers VALUES (?, ?, ?, ?, ?)",
        [*background(), HEAD, BRANCH, ASCII_BRANCH, ORPHAN_BRANCH],
    )
    erp.commit()
    erp.close()
    (root / "project.yaml").write_text(
        "version: 1\nname: branches\nsources:\n"
        f"  erp: {{connector: sql, url: 'sqlite:///{root / 'erp.sqlite'}'}}\n"
        "dedup:\n  customer:\n    match_keys: [[credit_code], [name_normalized]]\n"
        "    conflict_fields: [credit_code]\n",
        encoding="utf-8",
    )
    (root / "mappings").mkdir()
    (root / "mappings" / "erp_customers.yaml").write_text(
        "version: 1\nsource: {connector: erp, table: customers, key: code}\ntarget: customer\nfields:\n"
        "  name: {from: name, transforms: [company_name], required: true}\n"
        '  credit_code: {from: reg_code, transforms: [uscc], on_error: "null"}\n'
        '  phone: {from: phone, transforms: [phone], on_error: "null"}\n'
        "  address: {from: address, transforms: [trim]}\n"
        "  city: {from: address, transforms: [{address_part: {part: city}}]}\n"
        "  district: {from: address, transforms: [{address_part: {part: district}}]}\n",
        encoding="utf-8",
    )
    return root


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``crmi run`` the project once on a fresh SQLite core; yield the core's URL."""
    root = project(tmp_path_factory.mktemp("branches") / "p")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("DAGSTER_HOME", str(root / "dagster_home"))
        (root / "dagster_home").mkdir()
        monkeypatch.chdir(root)
        core_url = f"sqlite:///{root / 'core.sqlite'}"
        result = CliRunner().invoke(app, ["run", "--project", str(root), "--core-url", core_url, "--json"])
        dispose_engines()
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["run_id"]
        yield core_url


def customer_of(core_url: str) -> dict[str, dict[str, Any]]:
    """ERP key -> the active customer its record ended up in (merges followed)."""
    engine = sa.create_engine(core_url)
    with engine.connect() as connection:
        customers = pd.read_sql("SELECT * FROM customers", connection).set_index("id")
        crosswalk = connection.execute(
            sa.text(
                "SELECT external_key, entity_id FROM external_ids WHERE entity = 'customer' AND system = 'erp'"
            )
        ).all()
    engine.dispose()
    merged_into = customers["merged_into_id"].dropna().astype(int).to_dict()
    found: dict[str, dict[str, Any]] = {}
    for key, entity_id in crosswalk:
        customer_id = int(entity_id)
        while customer_id in merged_into:
            customer_id = merged_into[customer_id]
        row = customers.loc[customer_id]
        found[str(key)] = {"id": customer_id, **{str(k): v for k, v in row.items()}}
    return found


def test_a_bracketed_branch_stays_its_own_customer_marked_and_linked(core: str) -> None:
    found = customer_of(core)
    head = found["E-HEAD"]
    assert (head["name"], head["credit_code"], head["phone"]) == (
        "宁波甬兴模具有限公司",
        HEAD_CODE,
        "+8657488123456",
    )
    assert not head["is_branch"] and pd.isna(head["parent_id"]) and head["district"] == "鄞州区"
    for key, name, district in (
        ("E-BRANCH", BRANCH[1], "北仑区"),
        ("E-ASCII", "宁波甬兴模具有限公司（杭州分公司）", "西湖区"),
    ):
        branch = found[key]
        assert branch["id"] != head["id"]
        assert (branch["name"], branch["district"]) == (name, district)
        assert branch["is_branch"] and int(branch["parent_id"]) == head["id"]
        assert pd.isna(branch["credit_code"])  # the head office's code stays with the head office


def test_a_branch_whose_head_office_is_in_no_source_is_marked_by_its_name(core: str) -> None:
    """深圳腾达科技有限公司北京分公司 loads as a branch although no source holds its head office (no parent)."""
    found = customer_of(core)
    orphan = found["E-ORPHAN"]
    assert orphan["name"] == ORPHAN_BRANCH[1] and orphan["is_branch"] and pd.isna(orphan["parent_id"]), orphan
    assert not any(found[key]["is_branch"] for key in ("E-HEAD", "E000", "E001"))


def test_the_online_match_finds_the_head_office_by_its_name_and_phone(core: str) -> None:
    head_id = customer_of(core)["E-HEAD"]["id"]
    engine = sa.create_engine(core)
    index = MatchIndex(customer_records(engine))
    engine.dispose()
    [best, *_] = index.match(form_record("宁波甬兴模具有限公司", phone=HEAD_PHONE))
    assert best.customer_id == head_id and best.probability >= CUSTOMER_SPEC.auto_merge
