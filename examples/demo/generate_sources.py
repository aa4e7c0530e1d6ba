"""Generate the demo project's messy sources, deterministically from a seed.

Writes into ``examples/demo/data/``:

* ``erp_u8.sqlite``   — Yonyou U8 layout: Person, Customer, SO_SOMain, SO_SODetails.
* ``legacy_crm.sqlite`` — SuiteCRM/SugarCRM CE layout: users, accounts, contacts, accounts_contacts,
  opportunities (some in US dollars or euros, with their currencies rows), accounts_opportunities,
  email_addresses, email_addr_bean_rel (soft deletes included).
* ``customer_truth.csv`` — ground truth: which real company each source customer record is.
* ``sales.xlsx``      — the sales team's workbook: a title row above Chinese headers, a 客户 sheet and a
  商机 sheet with amounts like 12.5万 / ¥120,000.00, Excel dates and 2025年3月5日, blank and subtotal rows,
  and a 币种 column (blank = 人民币; a few 美元 and HKD deals).

The same companies appear in several sources, written differently (region in brackets, half-width
brackets, 有限责任公司 vs 有限公司, stray spaces, full-width letters), so dedup has real work; a few
hard negatives (same trade name in another city, branches, a conflicting credit code) must not merge. A few
records written by hand (``REVIEW_CASES``) make pairs linkage can neither merge nor keep apart: they wait in
the stewards' review queue.
Run: ``python examples/demo/generate_sources.py [--out DIR] [--seed N] [--scale X]``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import random
import re
import sqlite3
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from openpyxl import Workbook
from stdnum.cn import uscc

HERE = Path(__file__).resolve().parent
CITIES = [
    ("广东省", "深圳市", ["南山区", "福田区", "宝安区"], "0755"),
    ("北京市", "北京市", ["海淀区", "朝阳区", "东城区"], "010"),
    ("上海市", "上海市", ["浦东新区", "徐汇区", "闵行区"], "021"),
    ("广东省", "广州市", ["天河区", "越秀区", "番禺区"], "020"),
    ("浙江省", "杭州市", ["西湖区", "余杭区", "滨江区"], "0571"),
    ("江苏省", "苏州市", ["姑苏区", "吴中区", "相城区"], "0512"),
    ("四川省", "成都市", ["武侯区", "锦江区", "高新区"], "028"),
    ("湖北省", "武汉市", ["洪山区", "江汉区", "武昌区"], "027"),
]
BRANDS = {"华创": "huachuang", "腾达": "tengda", "恒信": "hengxin", "博远": "boyuan", "中科": "zhongke",
          "瑞丰": "ruifeng", "新元": "xinyuan", "金桥": "jinqiao", "安捷": "anjie", "德邦": "debang", "海纳": "haina",
          "鼎盛": "dingsheng", "天成": "tiancheng", "宏图": "hongtu", "九州": "jiuzhou", "明德": "mingde",
          "卓越": "zhuoyue", "永泰": "yongtai", "星河": "xinghe", "联众": "lianzhong", "思源": "siyuan",
          "汇通": "huitong", "启明": "qiming", "云帆": "yunfan", "锦程": "jincheng", "大华": "dahua", "宇通": "yutong",
          "凯达": "kaida", "正泰": "zhengtai", "同创": "tongchuang"}  # fmt: skip
MOBILE_PREFIXES = ["135", "136", "138", "139", "150", "158", "177", "186", "188", "199"]
TRADES = ["科技", "信息技术", "电子", "机械设备", "贸易", "医疗器械", "新材料", "物流", "软件", "环保工程"]
SURNAMES = list("王李张刘陈杨黄赵吴周徐孙马朱胡郭何林罗高")
GIVEN = [
    "伟",
    "芳",
    "娜",
    "敏",
    "静",
    "磊",
    "洋",
    "勇",
    "艳",
    "杰",
    "军",
    "强",
    "婷",
    "晨",
    "浩",
    "宇",
    "欣",
    "涛",
]
REPS = [("zhangwei", "张", "伟", "0101"), ("lina", "李", "娜", "0102"), ("wangfang", "王", "芳", "0103"),
        ("chenjie", "陈", "杰", "0104"), ("liuyang", "刘", "洋", "0105"), ("zhaomin", "赵", "敏", "0106")]  # fmt: skip
STAGES_ZH = ["初步接洽", "需求分析", "方案报价", "商务谈判", "赢单", "输单"]
STAGES_SUGAR = ["Prospecting", "Needs Analysis", "Proposal/Price Quote", "Negotiation/Review", "Closed Won",
                "Closed Lost", "Qualification"]  # fmt: skip
PRODUCTS = [("A001", "工业控制器", 12800), ("A002", "传感器模组", 860), ("B010", "数据采集网关", 5600),
            ("C100", "运维服务（年）", 30000), ("C200", "软件许可", 18000)]  # fmt: skip
REFERENCE_DAY = dt.date(2025, 6, 30)


@dataclass(frozen=True)
class Planted:
    """A source record written by hand (no draw, so the generated rest stays as it was) for the review queue."""

    company: int  # the real company behind it, counted after the generated ones (customer_truth.csv)
    source: str  # erp_u8 | legacy_crm | sales_xlsx
    name: str
    province: str
    city: str
    street: str  # district and street
    phone: str | None
    credit_code: str | None
    contact: str
    mobile: str


# Pairs the matching can neither merge nor keep apart on its own: each waits in the stewards' review queue
# after `make demo` (README "What `make demo` does", docs/steward.md). No generated company has their names,
# codes or places.
REVIEW_CASES = [
    # Close names in one city (华信 / 华鑫 sound alike), no identifier shared, other phones and addresses: two
    # firms as often as one written with a slip. Two firms here.
    (Planted(0, "erp_u8", "上海华信贸易有限公司", "上海市", "上海市", "浦东新区张杨路500号", "021-58861234",
             "91310115MA1K4QWE23", "何静", "13916627351"),
     Planted(1, "legacy_crm", "上海华鑫贸易有限公司", "上海市", "上海市", "徐汇区漕溪北路88号", "021-64471188",
             None, "孙浩", "13701985562")),
    # One firm written two ways: the ERP has its credit code and switchboard, the sales team's workbook neither,
    # a longer name (精密) and the workshop's address. One firm (the same contact in both).
    (Planted(2, "erp_u8", "宁波甬兴模具有限公司", "浙江省", "宁波市", "北仑区明州路188号", "0574-86881234",
             "91330206MA2H5YXK08", "周敏", "13857412345"),
     Planted(2, "sales_xlsx", "宁波市甬兴精密模具有限公司", "浙江省", "宁波市", "北仑区新碶街道长江路66号", None,
             None, "周敏", "13857412345")),
    # A namesake in another city whose credit code is the Hangzhou firm's with the last character wrong: one
    # code (after the repair) but two places. Two firms here.
    (Planted(3, "erp_u8", "杭州启航物流有限公司", "浙江省", "杭州市", "余杭区文一西路998号", "0571-88231234",
             "91330110MA2B3CD4EU", "罗杰", "18867120934"),
     Planted(4, "legacy_crm", "启航物流（苏州）有限公司", "江苏省", "苏州市", "吴中区东吴北路66号", "0512-65281234",
             "91330110MA2B3CD4E0", "郭婷", "15062218877")),
]  # fmt: skip
PLANTED = [record for pair in REVIEW_CASES for record in pair]


@dataclass
class Company:
    """A real-world customer behind the variants the sources hold."""

    index: int
    brand: str
    trade: str
    province: str
    city: str
    district: str
    area_code: str
    credit_code: str
    phone: str
    mobile: str
    contact: str
    rep: int
    branch_of: int | None = None
    branch_label: str | None = None  # e.g. 上海分公司
    sources: set[str] = field(default_factory=set)

    @property
    def city_short(self) -> str:
        """The city without 市."""
        return self.city.removesuffix("市")

    def official_name(self) -> str:
        """The registered name."""
        return f"{self.city_short}{self.brand}{self.trade}有限公司{self.branch_label or ''}"

    @property
    def domain(self) -> str:
        """The company's made-up web domain."""
        return f"{BRANDS[self.brand]}{self.index}.example.cn"

    def street(self, rng: random.Random) -> str:
        """A street address in the company's district."""
        return (
            f"{self.district}{rng.choice(['科技园', '创业路', '人民路', '建设大道'])}{rng.randint(1, 999)}号"
        )


def credit_code(rng: random.Random) -> str:
    """Return a valid 统一社会信用代码 (check digit computed with python-stdnum)."""
    alphabet = "0123456789ABCDEFGHJKLMNPQRTUWXY"
    body = "91" + f"{rng.randint(110000, 659999)}" + "".join(rng.choice(alphabet) for _ in range(9))
    return body + uscc.calc_check_digit(body)


def mobile(rng: random.Random) -> str:
    """A valid Chinese mobile number."""
    return rng.choice(MOBILE_PREFIXES) + f"{rng.randint(0, 9999_9999):08d}"


def person(rng: random.Random) -> str:
    """A Chinese personal name."""
    return rng.choice(SURNAMES) + rng.choice(GIVEN) + (rng.choice(GIVEN) if rng.random() < 0.5 else "")


def build_companies(rng: random.Random, count: int) -> list[Company]:
    """Return the ground truth: companies, a few branches and planted hard negatives."""
    companies: list[Company] = []
    used: set[tuple[str, str, str]] = set()
    while len(companies) < count:
        province, city, districts, area = rng.choice(CITIES)
        brand, trade = rng.choice(sorted(BRANDS)), rng.choice(TRADES)
        if (brand, trade, city) in used:
            continue
        used.add((brand, trade, city))
        companies.append(Company(
            index=len(companies), brand=brand, trade=trade, province=province, city=city,
            district=rng.choice(districts), area_code=area, credit_code=credit_code(rng),
            phone=f"{area}-{rng.randint(2000_0000, 8999_9999)}", mobile=mobile(rng),
            contact=person(rng), rep=rng.randrange(len(REPS)),
        ))  # fmt: skip
    # Hard negatives: the same trade name in another city is another company.
    for original in rng.sample(companies[: count // 2], 3):
        free = [c for c in CITIES if (original.brand, original.trade, c[1]) not in used]
        if not free:
            continue
        province, city, districts, area = free[0]
        used.add((original.brand, original.trade, city))
        companies.append(Company(
            index=len(companies), brand=original.brand, trade=original.trade, province=province, city=city,
            district=districts[0], area_code=area, credit_code=credit_code(rng),
            phone=f"{area}-{rng.randint(2000_0000, 8999_9999)}", mobile=mobile(rng), contact=person(rng),
            rep=rng.randrange(len(REPS)),
        ))  # fmt: skip
    return companies


def name_variant(company: Company, rng: random.Random, style: str) -> str:
    """Write a company name the way a given source tends to."""
    official = company.official_name()
    if company.branch_of is not None:
        return official
    if style == "erp":
        return official if rng.random() < 0.85 else official.replace("有限公司", "有限责任公司")
    if style == "crm":
        roll = rng.random()
        if roll < 0.35:
            return f"{company.brand}{company.trade}（{company.city_short}）有限公司"
        if roll < 0.5:
            return f"{company.brand}{company.trade}({company.city_short})有限公司"
        if roll < 0.6:
            return f" {official} "
        return official
    roll = rng.random()  # the sales team's spreadsheet
    if roll < 0.3:
        return f"{company.city}{company.brand}{company.trade}有限公司"
    if roll < 0.45:
        return official.replace("有限公司", "有限公司 ")
    if roll < 0.55:
        return f"{company.brand}{company.trade}（{company.city_short}）有限公司"
    return official


def fmt_phone(number: str, rng: random.Random) -> str:
    """Write a phone number the way people type them."""
    roll = rng.random()
    if number.startswith("1") and len(number) == 11:
        if roll < 0.3:
            return f"+86 {number[:3]} {number[3:7]} {number[7:]}"
        if roll < 0.4:
            return "".join(chr(ord(ch) + 0xFEE0) for ch in number)  # full-width digits
        if roll < 0.5:
            return f"0086-{number}"
        return number
    return number if roll < 0.6 else f"({number.split('-')[0]}){number.split('-')[1]}"


# --------------------------------------------------------------------------- ERP (Yonyou U8 layout)

U8_DDL = """
CREATE TABLE Person (cPersonCode TEXT PRIMARY KEY, cPersonName TEXT NOT NULL, cDepCode TEXT, bPsnPerson INTEGER);
CREATE TABLE Customer (
    cCusCode TEXT PRIMARY KEY, cCusName TEXT NOT NULL, cCusAbbName TEXT, cCCCode TEXT, cDCCode TEXT,
    cCusAddress TEXT, cCusPhone TEXT, cCusFax TEXT, cCusEmail TEXT, cCusPerson TEXT, cCusHand TEXT,
    cCusRegCode TEXT, cCusBank TEXT, cCusAccount TEXT, cCusPPerson TEXT, cCusDepart TEXT,
    dCusDevDate TEXT, dEndDate TEXT, cCusHeadCode TEXT, iCusCreLine REAL, cMemo TEXT,
    cCusPayCond TEXT, cCusDefine1 TEXT, dModifyDate TEXT, ufts INTEGER
);
CREATE TABLE SO_SOMain (
    ID INTEGER PRIMARY KEY, cSOCode TEXT NOT NULL UNIQUE, dDate TEXT, cBusType TEXT, cSTCode TEXT,
    cCusCode TEXT, cDepCode TEXT, cPersonCode TEXT, cexch_name TEXT, iExchRate REAL, iTaxRate REAL,
    cMemo TEXT, cVerifier TEXT, cMaker TEXT, iStatus INTEGER, cDefine1 TEXT, dModifyDate TEXT, ufts INTEGER
);
CREATE TABLE SO_SODetails (
    AutoID INTEGER PRIMARY KEY, ID INTEGER, cSOCode TEXT, iRowNo INTEGER, cInvCode TEXT, cInvName TEXT,
    iQuantity REAL, iQuotedPrice REAL, iUnitPrice REAL, iTaxUnitPrice REAL, iMoney REAL, iTax REAL,
    iSum REAL, iTaxRate REAL, dPreDate TEXT, iFHQuantity REAL, iKPQuantity REAL, dModifyDate TEXT, ufts INTEGER
);
"""


def write_erp(
    path: Path, companies: list[Company], rng: random.Random, truth: list[tuple[str, str, int]]
) -> dict[int, str]:
    """Write the U8 database; return company index -> cCusCode."""
    path.unlink(missing_ok=True)
    db = sqlite3.connect(path)
    db.executescript(U8_DDL)
    db.executemany("INSERT INTO Person VALUES (?,?,?,1)", [(r[3], r[1] + r[2], "03") for r in REPS])
    codes: dict[int, str] = {}
    parents = {c.branch_of for c in companies if c.branch_of is not None}
    # The ERP holds the branch structure (cCusHeadCode), so branches and their parents are always there.
    erp_companies = [
        c for c in companies if rng.random() < 0.75 or c.branch_of is not None or c.index in parents
    ]
    for n, company in enumerate(erp_companies, start=1):
        code = f"{n:05d}"
        codes[company.index] = code
        company.sources.add("erp")
        truth.append(("erp_u8", code, company.index))
        reg_code = company.credit_code if rng.random() < 0.8 else None
        if reg_code and rng.random() < 0.1:
            reg_code = reg_code.lower()
        db.execute(
            "INSERT INTO Customer (cCusCode, cCusName, cCusAbbName, cCusAddress, cCusPhone, cCusPerson, cCusHand,"
            " cCusRegCode, cCusPPerson, dCusDevDate, cCusHeadCode, cCusEmail) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                code,
                name_variant(company, rng, "erp"),
                f"{company.brand}{company.trade[:2]}",
                f"{company.province if company.province != company.city else ''}{company.city}{company.street(rng)}",
                company.phone,
                company.contact,
                company.mobile if rng.random() < 0.9 else None,
                reg_code,
                REPS[company.rep][3],
                (REFERENCE_DAY - dt.timedelta(days=rng.randint(30, 2000))).isoformat(),
                codes.get(company.branch_of) if company.branch_of is not None else None,
                f"info@{company.domain}" if rng.random() < 0.3 else None,
            ),
        )
    order_id = line_id = 0
    for company in erp_companies:
        for _ in range(rng.choice([0, 1, 1, 2, 3])):
            order_id += 1
            so_code = f"SO{2025}{order_id:05d}"
            order_day = REFERENCE_DAY - dt.timedelta(days=rng.randint(0, 360))
            db.execute(
                "INSERT INTO SO_SOMain (ID, cSOCode, dDate, cBusType, cCusCode, cPersonCode, cexch_name, iExchRate,"
                " iTaxRate, cMaker, iStatus) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (order_id, so_code, order_day.isoformat() + " 00:00:00", "普通销售", codes[company.index],
                 REPS[company.rep][3], "人民币", 1.0, 13.0, "系统管理员", 1),
            )  # fmt: skip
            for row_no in range(1, rng.randint(1, 4) + 1):
                line_id += 1
                inv_code, inv_name, price = rng.choice(PRODUCTS)
                quantity = rng.choice([1, 2, 5, 10, 20])
                money = round(price * quantity / 1.13, 2)
                db.execute(
                    "INSERT INTO SO_SODetails (AutoID, ID, cSOCode, iRowNo, cInvCode, cInvName, iQuantity,"
                    " iUnitPrice, iTaxUnitPrice, iMoney, iTax, iSum, iTaxRate) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (line_id, order_id, so_code, row_no, inv_code, inv_name, quantity, round(price / 1.13, 4),
                     price, money, round(price * quantity - money, 2), price * quantity, 13.0),
                )  # fmt: skip
    # U8's rowversion (ufts) grows with every write across the database: inbound sync reads changes by it.
    # Credit limits (信用额度) and payment terms (付款条件) are the ERP's; derived from the code, not drawn,
    # so the rest of the generated data stays as it was.
    db.executescript("""
        UPDATE Customer SET ufts = rowid, dModifyDate = dCusDevDate || ' 00:00:00',
            iCusCreLine = (CAST(cCusCode AS INTEGER) % 10 + 1) * 50000,
            cCusPayCond = CASE CAST(cCusCode AS INTEGER) % 3 WHEN 0 THEN '01' WHEN 1 THEN '02' ELSE '03' END;
        UPDATE SO_SOMain SET ufts = (SELECT MAX(ufts) FROM Customer) + ID, dModifyDate = dDate;
        UPDATE SO_SODetails SET ufts = (SELECT MAX(ufts) FROM SO_SOMain) + AutoID,
            iFHQuantity = 0, iKPQuantity = 0;
    """)
    # The planted customers came later (their ufts after every generated row's, which keep theirs).
    (last,) = db.execute(
        "SELECT MAX(ufts) FROM (SELECT ufts FROM Customer UNION ALL SELECT ufts FROM SO_SODetails)"
    ).fetchone()
    for offset, planted in enumerate(p for p in PLANTED if p.source == "erp_u8"):
        code = f"{len(erp_companies) + 1 + offset:05d}"
        truth.append(("erp_u8", code, len(companies) + planted.company))
        opened = (REFERENCE_DAY - dt.timedelta(days=400 + offset)).isoformat()
        db.execute(
            "INSERT INTO Customer (cCusCode, cCusName, cCusAddress, cCusPhone, cCusPerson, cCusHand, cCusRegCode,"
            " cCusPPerson, dCusDevDate, dModifyDate, iCusCreLine, cCusPayCond, ufts)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (code, planted.name, f"{planted.province if planted.province != planted.city else ''}"
             f"{planted.city}{planted.street}", planted.phone, planted.contact, planted.mobile, planted.credit_code,
             REPS[offset % len(REPS)][3], opened, f"{opened} 00:00:00", (int(code) % 10 + 1) * 50000,
             ("01", "02", "03")[int(code) % 3], last + 1 + offset),
        )  # fmt: skip
    db.commit()
    db.close()
    return codes


# --------------------------------------------------------------------------- legacy CRM (SuiteCRM layout)

SUITE_DDL = """
CREATE TABLE users (id CHAR(36) PRIMARY KEY, user_name VARCHAR(60), first_name VARCHAR(255), last_name VARCHAR(255),
    email1 VARCHAR(100), status VARCHAR(100), is_admin TINYINT DEFAULT 0, deleted TINYINT DEFAULT 0);
CREATE TABLE accounts (id CHAR(36) PRIMARY KEY, name VARCHAR(150), date_entered DATETIME, date_modified DATETIME,
    modified_user_id CHAR(36), created_by CHAR(36), description TEXT, deleted TINYINT DEFAULT 0,
    assigned_user_id CHAR(36), account_type VARCHAR(50), industry VARCHAR(50), annual_revenue VARCHAR(100),
    phone_fax VARCHAR(100), billing_address_street VARCHAR(150), billing_address_city VARCHAR(100),
    billing_address_state VARCHAR(100), billing_address_postalcode VARCHAR(20), billing_address_country VARCHAR(255),
    rating VARCHAR(100), phone_office VARCHAR(100), phone_alternate VARCHAR(100), website VARCHAR(255),
    ownership VARCHAR(100), employees VARCHAR(10), ticker_symbol VARCHAR(10), parent_id CHAR(36),
    sic_code VARCHAR(18), campaign_id CHAR(36));
CREATE TABLE contacts (id CHAR(36) PRIMARY KEY, date_entered DATETIME, date_modified DATETIME, deleted TINYINT DEFAULT 0,
    assigned_user_id CHAR(36), salutation VARCHAR(255), first_name VARCHAR(100), last_name VARCHAR(100),
    title VARCHAR(100), department VARCHAR(255), phone_home VARCHAR(100), phone_mobile VARCHAR(100),
    phone_work VARCHAR(100), phone_other VARCHAR(100), phone_fax VARCHAR(100), lead_source VARCHAR(255),
    primary_address_city VARCHAR(100), reports_to_id CHAR(36), birthdate DATE);
CREATE TABLE accounts_contacts (id CHAR(36) PRIMARY KEY, contact_id CHAR(36), account_id CHAR(36),
    date_modified DATETIME, deleted TINYINT DEFAULT 0);
CREATE TABLE opportunities (id CHAR(36) PRIMARY KEY, name VARCHAR(50), date_entered DATETIME, date_modified DATETIME,
    deleted TINYINT DEFAULT 0, assigned_user_id CHAR(36), opportunity_type VARCHAR(255), lead_source VARCHAR(50),
    amount DOUBLE, amount_usdollar DOUBLE, currency_id CHAR(36), date_closed DATE, next_step VARCHAR(100),
    sales_stage VARCHAR(255), probability DOUBLE, description TEXT);
CREATE TABLE accounts_opportunities (id CHAR(36) PRIMARY KEY, opportunity_id CHAR(36), account_id CHAR(36),
    date_modified DATETIME, deleted TINYINT DEFAULT 0);
CREATE TABLE currencies (id CHAR(36) PRIMARY KEY, name VARCHAR(36), symbol VARCHAR(36), iso4217 VARCHAR(3),
    conversion_rate DOUBLE DEFAULT 0, status VARCHAR(100), deleted TINYINT DEFAULT 0, date_entered DATETIME,
    date_modified DATETIME, created_by CHAR(36));
CREATE TABLE email_addresses (id CHAR(36) PRIMARY KEY, email_address VARCHAR(255), email_address_caps VARCHAR(255),
    invalid_email TINYINT DEFAULT 0, opt_out TINYINT DEFAULT 0, date_created DATETIME, date_modified DATETIME,
    deleted TINYINT DEFAULT 0);
CREATE TABLE email_addr_bean_rel (id CHAR(36) PRIMARY KEY, email_address_id CHAR(36), bean_id CHAR(36),
    bean_module VARCHAR(100), primary_address TINYINT DEFAULT 0, reply_to_address TINYINT DEFAULT 0,
    date_created DATETIME, date_modified DATETIME, deleted TINYINT DEFAULT 0);
"""


# SuiteCRM currencies rows: (id, name, symbol, iso4217, conversion_rate = units per base unit, CNY).
SUITE_CURRENCIES = [
    ("8f1c2d3e-0000-4000-8000-000000000840", "US Dollar", "$", "USD", 0.1408),
    ("8f1c2d3e-0000-4000-8000-000000000978", "Euro", "€", "EUR", 0.1282),
]


def write_legacy_crm(
    path: Path, companies: list[Company], rng: random.Random, truth: list[tuple[str, str, int]]
) -> None:
    """Write the SuiteCRM-layout database."""
    path.unlink(missing_ok=True)
    db = sqlite3.connect(path)
    db.executescript(SUITE_DDL)
    ids = random.Random(rng.random())

    def new_id() -> str:
        return str(uuid.UUID(int=ids.getrandbits(128), version=4))

    user_ids = [new_id() for _ in REPS]
    # The system currency (CNY here) is id -99 and has no row; conversion_rate is units per base unit, so
    # SuiteCRM stores amount_usdollar (the base amount, whatever the name says) = amount / conversion_rate.
    for currency_id, name, symbol, code, rate in SUITE_CURRENCIES:
        db.execute("INSERT INTO currencies (id, name, symbol, iso4217, conversion_rate, status, deleted, date_entered,"
                   " date_modified) VALUES (?,?,?,?,?,'Active',0,?,?)",
                   (currency_id, name, symbol, code, rate, "2025-01-01 00:00:00", "2025-01-01 00:00:00"))  # fmt: skip
    opportunities = 0
    for uid, (login, last, first, _) in zip(user_ids, REPS, strict=True):
        db.execute("INSERT INTO users (id, user_name, first_name, last_name, email1, status) VALUES (?,?,?,?,?,?)",
                   (uid, login, first, last, f"{login}@example.com", "Active"))  # fmt: skip
    stamp = "2025-06-01 09:00:00"
    crm_companies = [c for c in companies if c.branch_of is None and rng.random() < 0.7]
    for company in crm_companies:
        company.sources.add("crm")
        account_id = new_id()
        truth.append(("legacy_crm", account_id, company.index))
        code = company.credit_code
        roll = rng.random()
        if roll < 0.15:
            code = None
        elif roll < 0.2:
            code = code[:-1] + ("0" if code[-1] != "0" else "1")  # typo: check digit fails
        elif roll < 0.3:
            code = f" {code[:6]} {code[6:]}".lower()
        db.execute(
            "INSERT INTO accounts (id, name, date_entered, date_modified, deleted, assigned_user_id, account_type,"
            " industry, billing_address_street, billing_address_city, billing_address_state, billing_address_country,"
            " phone_office, phone_alternate, website, sic_code) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (account_id, name_variant(company, rng, "crm"), stamp, stamp, 0, user_ids[company.rep], "Customer",
             company.trade, company.street(rng), company.city, company.province, "中国",
             fmt_phone(company.phone, rng) if rng.random() < 0.8 else None,
             fmt_phone(company.mobile, rng) if rng.random() < 0.3 else None,
             f"www.{company.domain}" if rng.random() < 0.4 else None, code),
        )  # fmt: skip
        for _ in range(rng.choice([1, 1, 2])):
            contact_id = new_id()
            name = company.contact if _ == 0 else person(rng)
            db.execute(
                "INSERT INTO contacts (id, date_entered, date_modified, deleted, assigned_user_id, first_name,"
                " last_name, title, phone_mobile, phone_work) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (contact_id, stamp, stamp, 0, user_ids[company.rep], name[1:], name[0],
                 rng.choice(["采购经理", "总经理", "IT主管", "财务总监", None]),
                 fmt_phone(company.mobile, rng) if _ == 0 else mobile(rng),
                 fmt_phone(company.phone, rng) if rng.random() < 0.3 else None),
            )  # fmt: skip
            db.execute(
                "INSERT INTO accounts_contacts VALUES (?,?,?,?,0)", (new_id(), contact_id, account_id, stamp)
            )
            if rng.random() < 0.6:
                email_id, address = new_id(), f"{name_pinyin(rng)}@{company.domain}"
                if rng.random() < 0.05:
                    address = address.replace("@", " at ")  # not an address
                db.execute("INSERT INTO email_addresses (id, email_address, email_address_caps, date_created, deleted)"
                           " VALUES (?,?,?,?,0)", (email_id, address, address.upper(), stamp))  # fmt: skip
                db.execute("INSERT INTO email_addr_bean_rel (id, email_address_id, bean_id, bean_module,"
                           " primary_address, deleted) VALUES (?,?,?,?,1,0)", (new_id(), email_id, contact_id, "Contacts"))  # fmt: skip
        for _ in range(rng.choice([0, 1, 1, 2])):
            opp_id = new_id()
            stage = rng.choice(STAGES_SUGAR)
            close = REFERENCE_DAY + dt.timedelta(days=rng.randint(-200, 120))
            title = f"{company.brand}{rng.choice(['产线改造', '年度框架', '设备采购', '运维续约'])}项目"
            lead_source = rng.choice(["Web Site", "Cold Call", "Existing Customer", None])
            amount = rng.choice([50000, 120000, 86000.5, 300000, 18000])
            opportunities += (
                1  # every 5th deal in US dollars, every 11th in euros (no draw: the rest stays put)
            )
            currency_id, rate = "-99", 1.0
            if opportunities % 5 == 0 or opportunities % 11 == 0:
                currency_id, _, _, _, rate = SUITE_CURRENCIES[0 if opportunities % 5 == 0 else 1]
            db.execute(
                "INSERT INTO opportunities (id, name, date_entered, date_modified, deleted, assigned_user_id,"
                " lead_source, amount, amount_usdollar, currency_id, date_closed, sales_stage, probability)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (opp_id, title, stamp, stamp, 0, user_ids[company.rep], lead_source,
                 amount, round(amount / rate, 2), currency_id, close.isoformat(), stage, None),
            )  # fmt: skip
            db.execute(
                "INSERT INTO accounts_opportunities VALUES (?,?,?,?,0)", (new_id(), opp_id, account_id, stamp)
            )
    # Soft-deleted rows: must never reach the core.
    for company in rng.sample(crm_companies, min(4, len(crm_companies))):
        db.execute("INSERT INTO accounts (id, name, date_entered, date_modified, deleted, sic_code) VALUES (?,?,?,?,1,?)",
                   (new_id(), company.official_name() + "（旧）", stamp, stamp, None))  # fmt: skip
    for offset, planted in enumerate(p for p in PLANTED if p.source == "legacy_crm"):
        account_id = new_id()
        truth.append(("legacy_crm", account_id, len(companies) + planted.company))
        db.execute(
            "INSERT INTO accounts (id, name, date_entered, date_modified, deleted, assigned_user_id, account_type,"
            " billing_address_street, billing_address_city, billing_address_state, billing_address_country,"
            " phone_office, sic_code) VALUES (?,?,?,?,0,?,'Customer',?,?,?,?,?,?)",
            (account_id, planted.name, stamp, stamp, user_ids[offset % len(user_ids)], planted.street,
             planted.city.removesuffix("市"), planted.province, "中国", planted.phone, planted.credit_code),
        )  # fmt: skip
        contact_id = new_id()
        db.execute(
            "INSERT INTO contacts (id, date_entered, date_modified, deleted, assigned_user_id, first_name, last_name,"
            " phone_mobile) VALUES (?,?,?,0,?,?,?,?)",
            (contact_id, stamp, stamp, user_ids[offset % len(user_ids)], planted.contact[1:], planted.contact[0],
             planted.mobile),
        )  # fmt: skip
        db.execute(
            "INSERT INTO accounts_contacts VALUES (?,?,?,?,0)", (new_id(), contact_id, account_id, stamp)
        )
    db.commit()
    db.close()


def name_pinyin(rng: random.Random) -> str:
    """The local part of a made-up e-mail address."""
    return rng.choice(["zhang", "li", "wang", "chen", "liu", "zhao"]) + rng.choice(
        ["wei", "na", "fang", "jie", "min"]
    )


# --------------------------------------------------------------------------- sales workbook


def amount_text(value: int, rng: random.Random) -> object:
    """Write an amount the way sales people do."""
    roll = rng.random()
    if roll < 0.25:
        return f"{value / 10000:g}万"
    if roll < 0.45:
        return f"¥{value:,.2f}"
    if roll < 0.5:
        return {100000: "壹拾万元整", 200000: "贰拾万元整", 120000: "一十二万"}.get(value, value)
    if roll < 0.55:
        return f"{value:,}元"
    return value


def date_cell(day: dt.date, rng: random.Random) -> object:
    """Write a date as an Excel date or as text."""
    roll = rng.random()
    if roll < 0.3:
        return f"{day.year}年{day.month}月{day.day}日"
    if roll < 0.4:
        return f"{day.year}/{day.month}/{day.day}"
    return day  # a real Excel date cell


def write_workbook(
    path: Path, companies: list[Company], rng: random.Random, truth: list[tuple[str, str, int]]
) -> None:
    """Write the sales team's workbook."""
    workbook = Workbook()
    sheet = workbook.active
    assert sheet is not None
    sheet.title = "客户"
    sheet.append(["2025年度重点客户台账（华东 / 华南）"])
    sheet.merge_cells("A1:G1")
    sheet.append([])
    sheet.append(["序号", "客户名称", "统一社会信用代码", "联系人", "手机", "地址", "负责人"])
    chosen = [c for c in companies if c.branch_of is None and rng.random() < 0.35]
    for n, company in enumerate(chosen, start=1):
        company.sources.add("xlsx")
        code = company.credit_code if rng.random() < 0.6 else None
        if code and rng.random() < 0.2:
            code = "".join(chr(ord(ch) + 0xFEE0) for ch in code)  # full-width
        rep = REPS[company.rep]
        name = name_variant(company, rng, "xlsx")
        truth.append(("sales_xlsx", " ".join(name.split()), company.index))
        sheet.append([n, name, code, company.contact, fmt_phone(company.mobile, rng),
                      f"{company.city}{company.street(rng)}", rep[1] + rep[2]])  # fmt: skip
        if rng.random() < 0.05:
            sheet.append([])
    planted = [p for p in PLANTED if p.source == "sales_xlsx"]
    for n, record in enumerate(planted, start=len(chosen) + 1):
        truth.append(("sales_xlsx", record.name, len(companies) + record.company))
        rep = REPS[n % len(REPS)]
        sheet.append([n, record.name, record.credit_code, record.contact, record.mobile,
                      f"{record.city}{record.street}", rep[1] + rep[2]])  # fmt: skip
    sheet.append(["合计", f"{len(chosen) + len(planted)} 家"])

    deals = workbook.create_sheet("商机")
    deals.append(["商机跟进表（导出自销售周会）"])
    deals.append(
        [
            "商机编号",
            "客户名称",
            "商机名称",
            "阶段",
            "预计金额",
            "预计成交日期",
            "负责人",
            "报备日期",
            "备注",
            "币种",
        ]
    )
    total = 0
    pool = [c for c in companies if c.branch_of is None]
    for n in range(1, 8 + len(chosen) * 2):
        company = rng.choice(pool)
        value = rng.choice([50000, 80000, 100000, 120000, 125000, 200000, 350000])
        total += value
        stage = rng.choice(STAGES_ZH)
        rep = REPS[company.rep]
        name = (
            name_variant(company, rng, "xlsx")
            if company.sources
            else f"{company.city_short}{company.brand}{company.trade}公司"
        )
        if n % 23 == 0:
            name = "某某未知客户有限公司"  # exists nowhere: the row must be rejected with a reason
        deal = f"{company.brand}{rng.choice(['扩容', '新建', '升级'])}项目"
        amount = amount_text(value, rng)
        # A few deals in foreign currency (币种; blank = 人民币), decided by position so no draw moves.
        currency = "美元" if n % 9 == 0 else ("HKD" if n % 20 == 0 else None)
        if currency is not None:
            amount = round(value / (7 if currency == "美元" else 0.9))
        deals.append([
            f"OPP-2025-{n:03d}", name, deal, stage,
            amount, date_cell(REFERENCE_DAY + dt.timedelta(days=rng.randint(-90, 150)), rng),
            rep[1] + rep[2], date_cell(REFERENCE_DAY - dt.timedelta(days=rng.randint(0, 200)), rng),
            "ＶＩＰ客户" if rng.random() < 0.1 else None, currency,
        ])  # fmt: skip
        if n % 17 == 0:
            deals.append([])
    deals.append(
        [
            "OPP-2025-999",
            "安捷科技有限公司",
            "金额待定项目",
            "需求分析",
            "待定",
            "2025年13月1日",
            "张伟",
            None,
        ]
    )
    deals.append(["小计", None, None, None, total])
    workbook.save(path)
    _reproducible(path)


def _reproducible(path: Path) -> None:
    """Give the saved workbook fixed timestamps (openpyxl stamps the save time into docProps/core.xml and every
    zip entry), so the same seed writes the same bytes and a second ``make demo`` finds the workbook unchanged."""
    stamp = f"{REFERENCE_DAY.isoformat()}T00:00:00Z"
    with zipfile.ZipFile(path) as source:
        members = [(info, source.read(info)) for info in source.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as target:
        for info, data in members:
            if info.filename == "docProps/core.xml":
                data = re.sub(
                    rb"(<dcterms:(?:created|modified)[^>]*>)[^<]*", rb"\g<1>" + stamp.encode(), data
                )
            fixed = zipfile.ZipInfo(info.filename, date_time=(*REFERENCE_DAY.timetuple()[:3], 0, 0, 0))
            fixed.compress_type = zipfile.ZIP_DEFLATED
            target.writestr(fixed, data)


def generate(out: Path = HERE / "data", seed: int = 20251123, scale: float = 1.0) -> dict[str, Path]:
    """Write the three demo sources into ``out`` and return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    companies = build_companies(rng, max(10, int(120 * scale)))
    # Branches (分公司) of a few companies: distinct customers with the parent's trade name.
    for parent in rng.sample(companies[:40], 3):
        label = "上海分公司" if parent.city == "北京市" else "北京分公司"
        branch = Company(**{**parent.__dict__, "index": len(companies), "branch_of": parent.index, "sources": set(),
                            "credit_code": credit_code(rng), "branch_label": label})  # fmt: skip
        companies.append(branch)
    paths = {
        "erp_u8": out / "erp_u8.sqlite",
        "legacy_crm": out / "legacy_crm.sqlite",
        "sales_xlsx": out / "sales.xlsx",
        "truth": out / "customer_truth.csv",
    }
    truth: list[tuple[str, str, int]] = []
    write_erp(paths["erp_u8"], companies, rng, truth)
    write_legacy_crm(paths["legacy_crm"], companies, rng, truth)
    write_workbook(paths["sales_xlsx"], companies, rng, truth)
    # Ground truth for dedup evaluation: which real company each source customer record is.
    with paths["truth"].open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["source", "external_key", "company"])
        writer.writerows(truth)
    return paths


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=HERE / "data")
    parser.add_argument("--seed", type=int, default=20251123)
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args()
    for name, path in generate(args.out, args.seed, args.scale).items():
        print(f"{name:<11} {path}")


if __name__ == "__main__":
    main()
