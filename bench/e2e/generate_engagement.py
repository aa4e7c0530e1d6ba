"""A held-out three-source engagement for the end-to-end benchmark, with the truth about who is who.

Independent of the toolkit on purpose (nothing from ``crm_core`` or ``integration`` is imported), so the
benchmark measures what a consultant would meet rather than what the product's own demo generator
already knows how to read. Writes, for a chosen total of source rows:

* ``sales.xlsx`` — the sales team's workbook: a 客户 sheet and a 商机 sheet, title rows above Chinese
  headers, 小计 rows after each region or owner, a 合计 row at the end, amounts such as 12.5万 and
  ¥120,000.00, dates as Excel dates or 2025年3月5日.
* a SuiteCRM-like database (users, accounts, contacts, accounts_contacts, opportunities,
  accounts_opportunities, currencies, email_addresses, email_addr_bean_rel): soft deletes
  (``deleted = 1``), foreign-currency opportunities (``currency_id`` → currencies, ``amount_usdollar``
  in the base currency), English (pinyin) account names.
* a Yonyou U8-like database (Person, Customer, SO_SOMain, SO_SODetails): branches (分公司) pointing at
  their head office through ``cCusHeadCode``, old 15-digit tax numbers next to 统一社会信用代码.
* ``truth.csv`` (source, key, company_id, classes) for every live customer record, ``soft_deleted.csv`` (source,
  table, key) for rows that must never reach the core, and ``manifest.json`` with the counts.

The same company is written differently per source (深圳腾达科技有限公司 / 腾达科技（深圳）有限公司 /
Shenzhen Tengda Technology Co., Ltd. / 深圳市腾达科技有限责任公司), and every failure class of issue 14
is planted and tagged per record in ``truth.csv``'s ``classes`` column (``;``-separated), so matching
quality can be broken down per class (``bench/e2e/quality.py``). The homophone, look-alike,
industry-word and traditional-character tables are written by hand here, not taken from the toolkit.

Must-match classes (shares are of the records a source writes; estimates of what migrations meet):

* name: region before the trade name (U8 80% / CRM 37% / sheet 50%, the baseline), region in brackets
  after it (4 / 24 / 15%), region absent (7 / 8 / 10%), English pinyin name (CRM 13%), only the short
  trade name 腾达 (3 / 5 / 8%); on top, one slip in 6% (U8), 12% (CRM), 15% (sheet) of the Chinese names:
  a homophone or near-homophone 华鑫→华新 (30% of slips), a look-alike 天→夭 (12%), a character dropped
  (14%) or two swapped (9%), an industry-word variant 贸易→商贸 (25%), traditional characters mixed in
  (10%). Tags ``name_region_before|bracket|absent``, ``name_english``, ``name_short_trade``,
  ``name_homophone``, ``name_lookalike``, ``name_char_dropped``, ``name_chars_swapped``,
  ``name_industry_variant``, ``name_traditional_mixed``; branches ``name_branch``.
* identifiers in the credit-code column: the 15-digit old registration number (U8 12%, CRM 8%, sheet
  5%: ``id_reg15``), the 9-character organization code, mostly as 12345678-9 (2–4%: ``id_org9``), the code
  cut to 10 characters (1–3%: ``id_uscc_cut10``), one character dropped, doubled or two swapped (1% each:
  ``id_uscc_dropped|doubled|swapped``), a wrong check digit (CRM 3%: ``id_uscc_check_digit``); 20–46% empty.
* phones (office phone, when a record has one: U8 85%, CRM 80%, sheet 45%): without area code 9%
  (``phone_local_only``), with an extension 转6206 / -8001 / ext.12 / （分机123） 6% (``phone_extension``),
  two numbers in one cell separated by 、 ； / , 5% (``phone_multi``), +86 / 0086 / 86- prefixes 6%
  (``phone_intl_prefix``).
* ``address_only``: a record with neither credit code nor phone, whose street address (the same in
  every record of the company) is its evidence; ``within_source_duplicate``: a company entered twice
  in one system (U8 2%, CRM 8%).

False-merge traps (shares of the head offices; each adds one company; both companies' records are
tagged ``trap_x:<group>``): the same trade name and industry in another city whose records mostly (70%)
leave the region out of the name, the city then only in the address (1.5%,
``trap_other_city_address``), the CRM city field in pinyin such as Zhengzhou (1.5%,
``trap_other_city_crm_city_en``), the phone's area code (1.5%, ``trap_other_city_area_code``) or the
credit code's division digits (1.5%, ``trap_other_city_uscc_division``); a namesake in another city
kept in the CRM under its English pinyin name (1%, ``trap_english_other_city``); a 分公司 and its head
office (3%, ``trap_branch_parent``); a company in the same district and building whose trade name
differs in one distinctive character 卓泰 / 卓众 (2%, ``trap_same_district_one_char``); the same trade
name in another business in the same city, bridged by a CRM record that is only the trade name with
one company's phone (1%, ``trap_bridge``; the record itself is tagged ``bridge_record``); different
companies sharing one phone number (one pair per 60 companies, ``trap_shared_phone``).

``opportunities_truth.csv`` (source, key, company_id, resolvable, classes) says, for every live
opportunity row, whose it is and whether its customer can be found (a record of it in some source and a
reference to it: CRM rows linked to their account, sheet rows naming it, 60% as the 客户 sheet writes it
and otherwise in a name form of their own, tagged like the customer names).

``--rows`` is the total of customer, contact, opportunity and order-line rows over all sources
(soft-deleted rows included; order headers, users and link tables not counted); order lines fill
up to it exactly. Databases are SQLite files unless ``--u8-url`` / ``--crm-url`` name a PostgreSQL
database (created if missing, tables replaced; written with COPY).

``--customers`` sizes it by customer records instead (about that many over the three sources; contacts
and opportunities follow, order lines are half as many as customers).

Run: ``python bench/e2e/generate_engagement.py --rows 100000 --out var/e2e`` or ``--customers 50000``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import random
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from openpyxl import Workbook

SEED = 20260101
REFERENCE_DAY = dt.date(2025, 6, 30)
BATCH = 20_000
DEFAULT_ROWS = 100_000
RECORDS_PER_HEAD = 1.91  # customer records per head office at these source shares (measured)

# (province, city, pinyin, area code, admin code, districts)
CITIES = [
    ("广东省", "深圳市", "Shenzhen", "0755", "4403", ["南山区", "福田区", "宝安区", "龙岗区"]),
    ("广东省", "广州市", "Guangzhou", "020", "4401", ["天河区", "越秀区", "番禺区", "海珠区"]),
    ("广东省", "东莞市", "Dongguan", "0769", "4419", ["南城街道", "松山湖", "长安镇"]),
    ("广东省", "佛山市", "Foshan", "0757", "4406", ["禅城区", "南海区", "顺德区"]),
    ("北京市", "北京市", "Beijing", "010", "1101", ["海淀区", "朝阳区", "东城区", "丰台区"]),
    ("上海市", "上海市", "Shanghai", "021", "3101", ["浦东新区", "徐汇区", "闵行区", "静安区"]),
    ("天津市", "天津市", "Tianjin", "022", "1201", ["和平区", "河西区", "滨海新区"]),
    ("重庆市", "重庆市", "Chongqing", "023", "5001", ["渝中区", "江北区", "九龙坡区"]),
    ("浙江省", "杭州市", "Hangzhou", "0571", "3301", ["西湖区", "余杭区", "滨江区"]),
    ("浙江省", "宁波市", "Ningbo", "0574", "3302", ["海曙区", "鄞州区", "北仑区"]),
    ("江苏省", "苏州市", "Suzhou", "0512", "3205", ["姑苏区", "吴中区", "相城区"]),
    ("江苏省", "南京市", "Nanjing", "025", "3201", ["玄武区", "鼓楼区", "江宁区"]),
    ("江苏省", "无锡市", "Wuxi", "0510", "3202", ["梁溪区", "滨湖区", "新吴区"]),
    ("四川省", "成都市", "Chengdu", "028", "5101", ["武侯区", "锦江区", "成华区"]),
    ("湖北省", "武汉市", "Wuhan", "027", "4201", ["洪山区", "江汉区", "武昌区"]),
    ("湖南省", "长沙市", "Changsha", "0731", "4301", ["岳麓区", "芙蓉区", "雨花区"]),
    ("陕西省", "西安市", "Xi'an", "029", "6101", ["雁塔区", "碑林区", "未央区"]),
    ("山东省", "济南市", "Jinan", "0531", "3701", ["历下区", "市中区", "槐荫区"]),
    ("山东省", "青岛市", "Qingdao", "0532", "3702", ["市南区", "崂山区", "黄岛区"]),
    ("福建省", "厦门市", "Xiamen", "0592", "3502", ["思明区", "湖里区", "集美区"]),
    ("福建省", "福州市", "Fuzhou", "0591", "3501", ["鼓楼区", "台江区", "仓山区"]),
    ("河南省", "郑州市", "Zhengzhou", "0371", "4101", ["金水区", "中原区", "二七区"]),
    ("安徽省", "合肥市", "Hefei", "0551", "3401", ["蜀山区", "包河区", "庐阳区"]),
    ("辽宁省", "沈阳市", "Shenyang", "024", "2101", ["和平区", "沈河区", "浑南区"]),
]  # fmt: skip
REGION_OF_PROVINCE = {
    "广东省": "华南区", "福建省": "华南区", "北京市": "华北区", "天津市": "华北区", "山东省": "华北区",
    "辽宁省": "华北区", "上海市": "华东区", "浙江省": "华东区", "江苏省": "华东区", "安徽省": "华东区",
    "四川省": "西南区", "重庆市": "西南区", "湖北省": "华中区", "湖南省": "华中区", "河南省": "华中区",
    "陕西省": "西北区",
}  # fmt: skip
# Trade-name characters with their pinyin (for English names and e-mail domains).
BRAND_CHARS = {
    "华": "hua", "创": "chuang", "腾": "teng", "达": "da", "恒": "heng", "信": "xin", "博": "bo", "远": "yuan",
    "中": "zhong", "科": "ke", "瑞": "rui", "丰": "feng", "新": "xin", "金": "jin", "桥": "qiao", "安": "an",
    "捷": "jie", "德": "de", "邦": "bang", "海": "hai", "纳": "na", "鼎": "ding", "盛": "sheng", "天": "tian",
    "成": "cheng", "宏": "hong", "图": "tu", "九": "jiu", "州": "zhou", "明": "ming", "卓": "zhuo", "越": "yue",
    "永": "yong", "泰": "tai", "星": "xing", "河": "he", "联": "lian", "众": "zhong", "思": "si", "源": "yuan",
    "汇": "hui", "通": "tong", "启": "qi", "云": "yun", "帆": "fan", "锦": "jin", "程": "cheng", "大": "da",
    "宇": "yu", "凯": "kai", "正": "zheng", "同": "tong", "嘉": "jia", "润": "run", "隆": "long", "昌": "chang",
    "兴": "xing", "荣": "rong", "福": "fu", "祥": "xiang", "和": "he", "美": "mei", "顺": "shun", "东": "dong",
    "方": "fang", "富": "fu", "鑫": "xin", "浩": "hao", "辰": "chen", "智": "zhi", "睿": "rui", "诚": "cheng",
    "弘": "hong", "立": "li", "志": "zhi", "光": "guang", "辉": "hui", "飞": "fei", "龙": "long", "世": "shi",
    "纪": "ji", "佳": "jia", "协": "xie", "力": "li", "合": "he", "长": "chang", "江": "jiang", "山": "shan",
    "峰": "feng", "旭": "xu", "晨": "chen", "阳": "yang", "蓝": "lan", "青": "qing", "松": "song", "亿": "yi",
    "百": "bai", "千": "qian", "高": "gao", "精": "jing", "伟": "wei", "泓": "hong", "坤": "kun", "宸": "chen",
}  # fmt: skip
TRADES = [
    ("科技", "Technology"), ("信息技术", "Information Technology"), ("电子", "Electronics"),
    ("机械设备", "Machinery Equipment"), ("贸易", "Trading"), ("医疗器械", "Medical Devices"),
    ("新材料", "New Materials"), ("物流", "Logistics"), ("软件", "Software"),
    ("环保工程", "Environmental Engineering"), ("网络科技", "Network Technology"), ("生物科技", "Biotechnology"),
    ("实业", "Industrial"), ("建设工程", "Construction Engineering"), ("食品", "Foods"),
    ("自动化设备", "Automation Equipment"), ("光电", "Optoelectronics"), ("化工", "Chemical"),
    ("咨询", "Consulting"), ("供应链管理", "Supply Chain Management"),
]  # fmt: skip
# Written by hand for this generator (not taken from the toolkit): characters a clerk types instead of
# a trade-name character because they sound the same or nearly so (same pinyin, tone ignored) ...
HOMOPHONES = {
    "世": "事市仕", "东": "冬栋", "中": "忠钟", "丰": "峰锋风", "九": "久玖", "云": "芸运", "亿": "益艺毅",
    "众": "重仲", "伟": "玮纬炜", "佳": "嘉家加", "信": "鑫新欣", "光": "广", "兴": "星馨", "凯": "恺楷铠",
    "创": "闯", "力": "立利", "千": "仟谦", "华": "骅桦化", "协": "谐", "卓": "琢灼", "博": "搏柏", "合": "和禾",
    "同": "通彤童", "启": "起琪奇", "和": "合禾", "嘉": "佳家", "图": "途涂", "坤": "昆琨", "大": "达",
    "天": "田添", "宇": "雨羽语", "安": "岸", "宏": "鸿弘红", "宸": "辰晨", "富": "福赋", "山": "珊杉",
    "峰": "锋丰", "州": "洲舟", "帆": "凡繁", "弘": "宏鸿", "德": "得", "志": "智致", "思": "斯司",
    "恒": "衡横", "成": "诚城程", "捷": "杰洁", "新": "鑫信欣", "方": "芳舫", "旭": "煦序", "昌": "常",
    "明": "铭鸣", "星": "兴", "晨": "辰臣", "智": "志致", "松": "嵩颂", "桥": "侨乔", "正": "政征",
    "永": "咏泳", "汇": "惠慧会", "江": "疆姜", "河": "和禾", "泓": "宏鸿", "泰": "太态", "浩": "昊皓灏",
    "海": "亥", "润": "闰", "源": "元远园", "瑞": "锐睿", "百": "佰柏", "盛": "胜圣", "睿": "瑞锐",
    "祥": "翔详", "福": "富甫", "科": "可柯", "程": "成诚", "立": "力利", "精": "晶京", "纪": "记际继", "纳": "娜拿",
    "美": "梅媚", "联": "连莲", "腾": "藤滕", "荣": "容蓉融", "蓝": "岚兰", "诚": "成城", "越": "悦跃",
    "辉": "晖徽", "辰": "晨宸", "达": "大答", "远": "源圆元", "通": "同彤", "邦": "帮", "金": "今锦津",
    "鑫": "新信欣馨", "锦": "金瑾", "长": "昌", "阳": "扬洋杨", "隆": "龙珑", "青": "清晴", "顺": "舜",
    "飞": "菲非", "高": "皋", "鼎": "顶定", "龙": "隆珑",
}  # fmt: skip
# ... and characters that look alike (a misread form or a wrong candidate picked from the input method).
LOOKALIKES = {
    "天": "夭", "大": "太犬", "千": "干", "力": "刀办", "九": "丸", "永": "水冰", "金": "全", "成": "戍戌",
    "百": "白", "明": "朋", "东": "车", "思": "恩", "泰": "秦", "光": "先", "汇": "江汀", "江": "汪汇",
    "海": "梅", "锦": "绵", "正": "止", "同": "司", "祥": "样", "润": "涧", "福": "褔", "嘉": "喜", "辉": "挥",
    "峰": "蜂", "宇": "字宁", "纪": "红", "志": "忐", "佳": "住", "伟": "韦", "博": "傅", "腾": "滕", "盛": "威",
    "远": "运", "宏": "宠", "鑫": "鍂", "达": "込", "荣": "荥", "程": "桯", "精": "睛", "信": "言", "青": "责",
    "星": "昱", "昌": "冒", "晨": "晟", "启": "后", "创": "仓", "立": "玄", "山": "出", "长": "张", "坤": "绅",
}  # fmt: skip
# Industry words written another way for the same business (商贸 for 贸易, 技术 for 科技).
INDUSTRY_VARIANTS = {
    "科技": ["技术", "科技发展"], "信息技术": ["信息科技", "资讯科技"], "电子": ["电子科技", "电子技术"],
    "机械设备": ["机械", "机电设备"], "贸易": ["商贸", "经贸"], "医疗器械": ["医疗设备", "医疗科技"],
    "新材料": ["材料科技", "新材料科技"], "物流": ["供应链", "物流服务"], "软件": ["软件技术", "软件科技"],
    "环保工程": ["环保科技", "环境工程"], "网络科技": ["网络技术", "互联网科技"], "生物科技": ["生物技术", "生物工程"],
    "实业": ["实业发展", "实业投资"], "建设工程": ["建筑工程", "工程建设"], "食品": ["食品科技", "食品贸易"],
    "自动化设备": ["自动化", "自动化科技"], "光电": ["光电科技", "光电技术"], "化工": ["化学", "化工科技"],
    "咨询": ["管理咨询", "企业咨询"], "供应链管理": ["供应链", "供应链服务"],
}  # fmt: skip
# Simplified -> traditional for the characters of these names (a Hong Kong or Taiwan colleague's typing,
# or a document scanned from there): only some of a name's characters are converted.
TRADITIONAL = dict(zip(
    "华达东贸电机设备医疗软网络实业动询应链责长广门创腾恒远丰桥纳图联众汇启云锦凯润兴荣顺辉飞龙纪协亿伟"
    "宁苏庆汉济岛阳郑锡厦韩专术发筑环无锋鸿书资经营销务总厂团进际体质产业开关县区镇庄",
    "華達東貿電機設備醫療軟網絡實業動詢應鏈責長廣門創騰恆遠豐橋納圖聯眾匯啟雲錦凱潤興榮順輝飛龍紀協億偉"
    "寧蘇慶漢濟島陽鄭錫廈韓專術發築環無鋒鴻書資經營銷務總廠團進際體質產業開關縣區鎮莊",
    strict=True,
))  # fmt: skip
SURNAMES = {
    "王": "wang", "李": "li", "张": "zhang", "刘": "liu", "陈": "chen", "杨": "yang", "黄": "huang", "赵": "zhao",
    "吴": "wu", "周": "zhou", "徐": "xu", "孙": "sun", "马": "ma", "朱": "zhu", "胡": "hu", "郭": "guo", "何": "he",
    "林": "lin", "罗": "luo", "高": "gao", "郑": "zheng", "梁": "liang", "谢": "xie", "宋": "song", "唐": "tang",
}  # fmt: skip
GIVEN = {
    "伟": "wei", "芳": "fang", "娜": "na", "敏": "min", "静": "jing", "磊": "lei", "洋": "yang", "勇": "yong",
    "艳": "yan", "杰": "jie", "军": "jun", "强": "qiang", "婷": "ting", "晨": "chen", "浩": "hao", "宇": "yu",
    "欣": "xin", "涛": "tao", "明": "ming", "丽": "li", "超": "chao", "鹏": "peng", "慧": "hui", "斌": "bin",
    "霞": "xia", "平": "ping", "刚": "gang", "琳": "lin", "倩": "qian", "博": "bo", "凯": "kai", "佳": "jia",
}  # fmt: skip
MOBILE_PREFIXES = ["133", "135", "136", "137", "138", "139", "150", "151", "158", "166", "177", "180", "186",
                   "188", "189", "199"]  # fmt: skip
PRODUCTS = [
    ("A001", "工业控制器", 12800.0), ("A002", "传感器模组", 860.0), ("A003", "伺服驱动器", 4200.0),
    ("B010", "数据采集网关", 5600.0), ("B020", "边缘计算盒", 9800.0), ("B030", "工业交换机", 3150.0),
    ("C100", "运维服务（年）", 30000.0), ("C200", "软件许可", 18000.0), ("C300", "实施服务（人天）", 2500.0),
    ("D001", "备件包", 420.5), ("D002", "电源模块", 268.0), ("D003", "线缆组件", 35.8),
]  # fmt: skip
STAGES_SUITE = ["Prospecting", "Qualification", "Needs Analysis", "Value Proposition", "Id. Decision Makers",
                "Perception Analysis", "Proposal/Price Quote", "Negotiation/Review", "Closed Won", "Closed Lost"]  # fmt: skip
STAGES_ZH = ["初步接洽", "需求分析", "方案报价", "商务谈判", "赢单", "输单"]
# SuiteCRM keeps the system currency (here CNY) as id -99 outside the currencies table.
CURRENCIES = [  # id, name, symbol, iso4217, conversion_rate (units per 1 CNY)
    ("9b1e7c1e-0000-4000-8000-000000000001", "US Dollar", "$", "USD", 0.1389),
    ("9b1e7c1e-0000-4000-8000-000000000002", "Euro", "€", "EUR", 0.1282),
    ("9b1e7c1e-0000-4000-8000-000000000003", "Hong Kong Dollar", "HK$", "HKD", 1.0870),
]  # fmt: skip
USCC_ALPHABET = "0123456789ABCDEFGHJKLMNPQRTUWXY"
USCC_WEIGHTS = [1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28]
ORG_WEIGHTS = [3, 7, 9, 10, 5, 8, 4, 2]


def org_code(body: str) -> str:
    """Return the 9-character organization code (GB 11714) of an 8-digit body, check character added."""
    check = 11 - sum(int(c) * w for c, w in zip(body, ORG_WEIGHTS, strict=True)) % 11
    return body + ("X" if check == 10 else "0" if check == 11 else str(check))


def uscc_of(region6: str, org9: str) -> str:
    """Return the 18-character 统一社会信用代码 (GB 32100) for an enterprise: 91 + region + org code + check."""
    body = "91" + region6 + org9
    total = sum(USCC_ALPHABET.index(c) * w for c, w in zip(body, USCC_WEIGHTS, strict=True))
    return body + USCC_ALPHABET[(31 - total % 31) % 31]


@dataclass(slots=True)
class Company:
    """A real company: what every source record of it was written from."""

    id: int
    city: int
    district: str
    brand: str
    trade: int
    uscc: str
    tax15: str  # the old 税务登记号: region + organization code
    phone: str
    contact: str
    contact_mobile: str
    rep: int
    parent: int = -1  # branches (分公司): the head office's id
    brand_py: str = ""
    street: str = ""  # the street address inside the district: the same in every record that writes it
    traps: list[str] = field(default_factory=list)  # trap tags "trap_class:group" on every record of it
    # A trap company whose records often leave the region out of the name; the location is then only
    # in this channel: address | crm_city | crm_city_en | area_code | uscc_division.
    channel: str = ""

    @property
    def city_short(self) -> str:
        """The city without 市."""
        return CITIES[self.city][1].removesuffix("市")

    @property
    def domain(self) -> str:
        """A made-up web domain."""
        return f"{self.brand_py.lower()}{self.id}.com.cn"

    @property
    def org9(self) -> str:
        """The 9-character organization code inside the credit code."""
        return self.uscc[8:17]


@dataclass(slots=True)
class Written:
    """One customer record as a source writes it, with the classes it carries."""

    name: str
    code: str | None
    phone: str | None
    address: str | None  # full: [province]city district street
    street: str | None  # without the city (the CRM's billing street)
    city_field: str | None  # the CRM's billing city
    tags: list[str]


# Share of records per way of writing the name, per source (see the module docstring).
NAME_FORMS = {
    "u8": [("region_before", 0.80), ("llc", 0.06), ("region_bracket", 0.04), ("region_absent", 0.07),
           ("short_trade", 0.03)],
    "crm": [("region_before", 0.37), ("region_bracket", 0.24), ("region_absent", 0.08), ("english", 0.13),
            ("spaces", 0.07), ("llc", 0.06), ("short_trade", 0.05)],
    "xlsx": [("region_before", 0.50), ("region_bracket", 0.15), ("region_absent", 0.10), ("spaces", 0.13),
             ("short_trade", 0.08), ("llc", 0.04)],
    "deal": [("region_before", 0.45), ("region_bracket", 0.10), ("region_absent", 0.17), ("short_trade", 0.18),
             ("spaces", 0.10)],
}  # fmt: skip
# Share of Chinese names with one slip in them, per source, and how the slips divide.
SLIP_RATE = {"u8": 0.06, "crm": 0.12, "xlsx": 0.15, "deal": 0.12}
SLIPS = [("homophone", 0.30), ("lookalike", 0.12), ("char_dropped", 0.14), ("chars_swapped", 0.09),
         ("industry_variant", 0.25), ("traditional_mixed", 0.10)]  # fmt: skip
# What the credit-code column holds, per source.
CODE_FORMS = {
    "u8": [("uscc", 0.58), ("reg15", 0.12), ("org9", 0.04), ("cut10", 0.03), ("dropped", 0.01),
           ("doubled", 0.01), ("swapped", 0.01), ("none", 0.20)],
    "crm": [("uscc", 0.36), ("spaced", 0.08), ("reg15", 0.08), ("org9", 0.03), ("cut10", 0.02),
            ("check_digit", 0.03), ("dropped", 0.01), ("doubled", 0.01), ("swapped", 0.01), ("none", 0.37)],
    "xlsx": [("uscc", 0.38), ("fullwidth", 0.05), ("reg15", 0.05), ("org9", 0.02), ("cut10", 0.01),
             ("dropped", 0.01), ("doubled", 0.01), ("swapped", 0.01), ("none", 0.46)],
}  # fmt: skip
# How the office phone is written when a record has one.
PHONE_FORMS = [("typed", 0.74), ("local_only", 0.09), ("extension", 0.06), ("multi", 0.05),
               ("intl_prefix", 0.06)]  # fmt: skip
PHONE_PRESENT = {"u8": 0.85, "crm": 0.80, "xlsx": 0.45}
ADDRESS_PRESENT = {"u8": 0.90, "crm": 0.75, "xlsx": 0.80}
# Trap shares of the head offices (each trap adds one more company).
TRAPS = [("trap_other_city_address", 0.015), ("trap_other_city_crm_city_en", 0.015),
         ("trap_other_city_area_code", 0.015), ("trap_other_city_uscc_division", 0.015),
         ("trap_english_other_city", 0.010), ("trap_same_district_one_char", 0.020), ("trap_bridge", 0.010)]  # fmt: skip
STREETS = ["科技园路", "创业路", "人民路", "建设大道", "高新南一道", "工业大道", "中山路", "解放路", "长江路",
           "学府路", "滨河路", "金融街", "文化路", "迎宾大道", "新华路", "环城东路"]  # fmt: skip


def pick(rng: random.Random, weights: Sequence[tuple[str, float]]) -> str:
    """One choice from (choice, share) pairs; the last takes what the shares leave."""
    roll = rng.random()
    for choice, weight in weights:
        if roll < weight:
            return choice
        roll -= weight
    return weights[-1][0]


class Engagement:
    """The generated companies and the choices shared by the writers (one RNG per table, from the seed)."""

    def __init__(self, rows: int | None, seed: int, customers: int | None = None) -> None:
        self.rows, self.seed = rows, seed
        if customers:
            self.heads = max(8, round(customers / RECORDS_PER_HEAD))
        else:
            self.heads = max(8, round((rows or DEFAULT_ROWS) / 6.2))
        self.companies: list[Company] = []
        self.reps: list[tuple[str, str, str]] = []  # (code, surname, given)
        self.counts: dict[str, int] = {}
        self.hard_cases: dict[str, int] = {}
        self.truth: list[tuple[str, str, int, str]] = []
        self.opportunity_truth: list[tuple[str, str, int, int, str]] = []
        self.soft_deleted: list[tuple[str, str, str]] = []
        self.u8_code: dict[int, str] = {}
        self.crm_id: dict[int, str] = {}
        self.xlsx_name: dict[int, str] = {}
        self.xlsx_names: set[str] = set()
        self.groups = 0
        self.used: set[tuple[int, str, int]] = set()
        self.used_py: set[tuple[int, str, int]] = set()
        self.force_crm_english: set[int] = set()
        self.bridges: dict[int, int] = {}  # company -> the namesake its short-name record also fits
        self._build()

    def rng(self, name: str) -> random.Random:
        """An independent, reproducible random stream for one part of the output."""
        return random.Random(f"{self.seed}:{name}")

    def _free(self, city: int, brand: str, trade: int) -> bool:
        brand_py = (BRAND_CHARS[brand[0]] + BRAND_CHARS[brand[1]]).capitalize()
        return (
            brand[0] != brand[1]
            and (city, brand, trade) not in self.used
            and (city, brand_py, trade) not in self.used_py
        )

    def _add(self, rng: random.Random, city: int, brand: str, trade: int) -> Company:
        brand_py = (BRAND_CHARS[brand[0]] + BRAND_CHARS[brand[1]]).capitalize()
        self.used.add((city, brand, trade))
        self.used_py.add((city, brand_py, trade))
        company = self._company(rng, len(self.companies), city, brand, trade, brand_py)
        self.companies.append(company)
        return company

    def _group(self, tag: str, *members: Company) -> None:
        self.groups += 1
        for member in members:
            member.traps.append(f"{tag}:{self.groups}")
        self.note(tag)

    def _build(self) -> None:
        rng = self.rng("companies")
        brand_chars = sorted(BRAND_CHARS)
        while len(self.companies) < self.heads:
            city = rng.randrange(len(CITIES))
            brand = rng.choice(brand_chars) + rng.choice(brand_chars)
            trade = rng.randrange(len(TRADES))
            # Different companies never share an English name either (恒信 / 恒新 are both Hengxin).
            if self._free(city, brand, trade):
                self._add(rng, city, brand, trade)
        heads = list(self.companies)
        self._plant_traps(rng, heads, brand_chars)
        # Branches (分公司) of 3% of the companies: distinct customers in another city.
        for head in rng.sample(heads, max(1, len(heads) * 3 // 100)):
            city = rng.choice([c for c in range(len(CITIES)) if c != head.city])
            branch = self._company(rng, len(self.companies), city, head.brand, head.trade, head.brand_py)
            branch.parent = head.id
            self.companies.append(branch)
            self._group("trap_branch_parent", head, branch)
        self.hard_cases["branches"] = sum(1 for c in self.companies if c.parent >= 0)
        # Different companies in one building (or with one bookkeeping agent) share a phone number.
        shared = 0
        by_city: dict[int, list[Company]] = {}
        for company in self.companies:
            by_city.setdefault(company.city, []).append(company)
        groups = [group for _, group in sorted(by_city.items()) if len(group) > 1]
        for _ in range(max(1, len(self.companies) // 60)):
            first, second = rng.sample(rng.choice(groups), 2)
            if first.parent != second.id and second.parent != first.id and first.phone != second.phone:
                second.phone = first.phone
                self._group("trap_shared_phone", first, second)
                shared += 1
        self.hard_cases["companies_sharing_a_phone"] = shared
        reps = max(8, len(self.companies) // 400)
        names: set[str] = set()
        while len(self.reps) < reps:
            surname, given = rng.choice(sorted(SURNAMES)), rng.choice(sorted(GIVEN))
            if rng.random() < 0.6:
                given += rng.choice(sorted(GIVEN))
            if surname + given not in names:
                names.add(surname + given)
                self.reps.append((f"{len(self.reps) + 1:04d}", surname, given))

    def _plant_traps(self, rng: random.Random, heads: list[Company], brand_chars: list[str]) -> None:
        """Companies that must stay apart from a head office although their records look alike."""
        for tag, share in TRAPS:
            # One trap per head office: a second namesake with another channel would leave a pair that
            # no evidence can decide (one record located by its address, the other by its phone only).
            free = [head for head in heads if not head.traps]
            for head in rng.sample(free, min(len(free), max(1, round(len(heads) * share)))):
                if tag.startswith(("trap_other_city", "trap_english")):
                    others = [
                        c
                        for c in range(len(CITIES))
                        if c != head.city and self._free(c, head.brand, head.trade)
                    ]
                    if not others:
                        continue
                    other = self._add(rng, rng.choice(others), head.brand, head.trade)
                    if tag == "trap_english_other_city":
                        self.force_crm_english.add(other.id)
                    else:
                        head.channel = other.channel = tag.removeprefix("trap_other_city_")
                elif tag == "trap_same_district_one_char":
                    near = set(HOMOPHONES.get(head.brand[1], "")) | set(LOOKALIKES.get(head.brand[1], ""))
                    options = [ch for ch in brand_chars if ch not in near and ch != head.brand[1]
                               and self._free(head.city, head.brand[0] + ch, head.trade)]  # fmt: skip
                    if not options:
                        continue
                    other = self._add(rng, head.city, head.brand[0] + rng.choice(options), head.trade)
                    other.district, other.street = head.district, head.street  # one building, another floor
                else:  # trap_bridge: same trade name, another business in the same city
                    trades = [
                        t
                        for t in range(len(TRADES))
                        if t != head.trade and self._free(head.city, head.brand, t)
                    ]
                    if not trades:
                        continue
                    other = self._add(rng, head.city, head.brand, rng.choice(trades))
                    self.bridges[head.id] = other.id
                self._group(tag, head, other)

    def _company(
        self, rng: random.Random, index: int, city: int, brand: str, trade: int, brand_py: str
    ) -> Company:
        area = CITIES[city][3]
        region6 = CITIES[city][4] + f"{rng.randint(2, 30):02d}"
        org9 = org_code(f"{rng.randrange(10**8):08d}")
        digits = 7 if area == "0592" else 8
        phone = f"{area}-{rng.randint(2, 8)}{rng.randrange(10 ** (digits - 1)):0{digits - 1}d}"
        street = f"{rng.choice(STREETS)}{rng.randint(1, 999)}号"
        return Company(
            id=index, city=city, district=rng.choice(CITIES[city][5]), brand=brand, trade=trade,
            uscc=uscc_of(region6, org9), tax15=region6 + org9, phone=phone, contact=person(rng),
            contact_mobile=mobile(rng), rep=rng.randrange(max(8, self.heads // 400)), brand_py=brand_py,
            street=street,
        )  # fmt: skip

    def official_name(self, company: Company) -> str:
        """The registered name; a branch is its head office's name plus 〈city〉分公司."""
        if company.parent >= 0:
            head = self.companies[company.parent]
            return f"{self.official_name(head)}{company.city_short}分公司"
        return f"{company.city_short}{company.brand}{TRADES[company.trade][0]}有限公司"

    def name_variant(self, company: Company, rng: random.Random, style: str) -> tuple[str, list[str]]:
        """Write the name the way a source tends to; return (name, classes it carries)."""
        official = self.official_name(company)
        if company.parent >= 0:
            head = self.companies[company.parent]
            if rng.random() < 0.8:
                return official, ["name_branch"]
            return f"{CITIES[head.city][1]}{official.removeprefix(head.city_short)}", ["name_branch"]
        forms = NAME_FORMS[style]
        if company.channel and rng.random() < 0.7:
            form = "region_absent"
        elif style == "crm" and company.id in self.force_crm_english:
            form = "english"
        else:
            form = pick(rng, forms)
        city = CITIES[company.city]
        brand, trade = company.brand, TRADES[company.trade][0]
        if form == "english":
            english = f"{city[2]} {company.brand_py} {TRADES[company.trade][1]} Co., Ltd."
            return (english.upper().replace(", ", ",") if rng.random() < 0.3 else english), ["name_english"]
        if form == "short_trade":
            return brand, ["name_short_trade"]
        tags: list[str] = []
        slip = pick(rng, SLIPS) if rng.random() < SLIP_RATE[style] else None
        if slip == "homophone" or slip == "lookalike":
            table = HOMOPHONES if slip == "homophone" else LOOKALIKES
            spots = [i for i, ch in enumerate(brand) if ch in table]
            if spots:
                i = rng.choice(spots)
                brand = brand[:i] + rng.choice(table[brand[i]]) + brand[i + 1 :]
                tags.append(f"name_{slip}")
        elif slip == "industry_variant":
            trade = rng.choice(INDUSTRY_VARIANTS[trade])
            tags.append("name_industry_variant")
        elif slip in ("char_dropped", "chars_swapped"):
            core = brand + trade
            i = rng.randrange(len(core) - 1)
            core = (
                core[:i] + core[i + 1 :]
                if slip == "char_dropped"
                else core[:i] + core[i + 1] + core[i] + core[i + 2 :]
            )
            brand, trade = core, ""
            tags.append(f"name_{slip}")
        legal = "有限责任公司" if form == "llc" else "有限公司"
        if form == "region_bracket":
            open_, close = ("（", "）") if rng.random() < 0.7 else ("(", ")")
            name = f"{brand}{trade}{open_}{company.city_short}{close}{legal}"
        elif form == "region_absent":
            name = f"{brand}{trade}{legal}"
        elif form == "spaces":
            name = f" {company.city_short} {brand}{trade}{legal} "
        else:
            region = city[1] if rng.random() < 0.25 else company.city_short
            name = f"{region}{brand}{trade}{legal}"
        tags.append("name_region_bracket" if form == "region_bracket" else
                    "name_region_absent" if form == "region_absent" else "name_region_before")  # fmt: skip
        if slip == "traditional_mixed":
            convertible = [i for i, ch in enumerate(name) if ch in TRADITIONAL]
            if convertible:
                chosen = set(rng.sample(convertible, max(1, (len(convertible) + 1) // 2)))
                name = "".join(TRADITIONAL[ch] if i in chosen else ch for i, ch in enumerate(name))
                tags.append("name_traditional_mixed")
        return name, tags

    def code_variant(self, company: Company, rng: random.Random, style: str) -> tuple[str | None, list[str]]:
        """What a source's credit-code column holds for the company; return (value, classes)."""
        form = pick(rng, CODE_FORMS[style])
        code = company.uscc
        if form == "uscc":
            return code, []
        if form == "spaced":
            return f"{code[:6]} {code[6:]}".lower(), []
        if form == "fullwidth":
            return "".join(chr(ord(ch) + 0xFEE0) for ch in code), []
        if form == "reg15":
            self.note("old_15_digit_tax_numbers")
            return company.tax15, ["id_reg15"]
        if form == "org9":
            org = company.org9
            return (f"{org[:8]}-{org[8]}" if rng.random() < 0.7 else org), ["id_org9"]
        if form == "cut10":
            return code[:10], ["id_uscc_cut10"]
        if form == "check_digit":
            self.note("credit_code_typos")
            return code[:-1] + ("0" if code[-1] != "0" else "1"), ["id_uscc_check_digit"]
        i = rng.randrange(2, 17)  # not the leading 91: a slip inside the body
        if form == "dropped":
            return code[:i] + code[i + 1 :], ["id_uscc_dropped"]
        if form == "doubled":
            return code[:i] + code[i] + code[i:], ["id_uscc_doubled"]
        if form == "swapped":
            j = next((k for k in range(i, 17) if code[k] != code[k + 1]), None)
            if j is None:
                return code, []
            return code[:j] + code[j + 1] + code[j] + code[j + 2 :], ["id_uscc_swapped"]
        return None, []

    def phone_variant(self, company: Company, rng: random.Random) -> tuple[str, list[str]]:
        """The office phone as somebody typed it; return (cell, classes)."""
        form = pick(rng, PHONE_FORMS)
        area, local = company.phone.split("-")
        if form == "local_only":
            return local, ["phone_local_only"]
        if form == "extension":
            extension = rng.choice([f"转{rng.randint(100, 8999)}", f"-{rng.randint(800, 8999)}",
                                    f" ext.{rng.randint(10, 999)}", f"（分机{rng.randint(100, 999)}）"])  # fmt: skip
            return f"{area}-{local}{extension}", ["phone_extension"]
        if form == "multi":
            other = rng.choice(
                [company.contact_mobile, f"{area}-{local[:-2]}{(int(local[-2:]) + 1) % 100:02d}"]
            )
            first, second = (company.phone, other) if rng.random() < 0.6 else (other, company.phone)
            return f"{first}{rng.choice(['、', '；', '/', ',', ', ', ' / '])}{second}", ["phone_multi"]
        if form == "intl_prefix":
            prefix = rng.choice(["+86 ", "+86-", "0086-", "0086 ", "86-"])
            return f"{prefix}{area[1:]}-{local}", ["phone_intl_prefix"]
        return typed_phone(company.phone, rng), []

    def written(self, company: Company, rng: random.Random, style: str) -> Written:
        """One record of the company as the source ``style`` writes it, tagged with its classes."""
        name, tags = self.name_variant(company, rng, style)
        code, code_tags = self.code_variant(company, rng, style)
        phone: str | None = None
        if rng.random() < PHONE_PRESENT[style]:
            phone, phone_tags = self.phone_variant(company, rng)
            code_tags += phone_tags
        province, city = CITIES[company.city][0], CITIES[company.city][1]
        with_province = province != city and rng.random() < 0.4
        address: str | None = f"{province if with_province else ''}{city}{company.district}{company.street}"
        street: str | None = f"{company.district}{company.street}"
        city_field: str | None = city if rng.random() < 0.85 else CITIES[company.city][2]
        if rng.random() >= ADDRESS_PRESENT[style]:
            address = street = None
        if company.channel and "name_region_absent" in tags:
            # The name says nothing of the city: only the trap's channel does.
            channel = company.channel
            code, code_tags = (company.uscc if channel == "uscc_division" else None), []
            phone = company.phone if channel == "area_code" else None
            if channel in ("area_code", "uscc_division"):
                address = street = city_field = None
            elif channel == "crm_city_en":
                address = f"{city}{company.district}{company.street}"
                street, city_field = None, CITIES[company.city][2]
            else:
                address = f"{city}{company.district}{company.street}"
                street, city_field = f"{company.district}{company.street}", city
        tags += code_tags
        if code is None and phone is None and (street if style == "crm" else address):
            tags.append("address_only")
        return Written(name, code, phone, address, street, city_field, tags + company.traps)

    @property
    def in_sources(self) -> set[int]:
        """Companies with a customer record in some source (so far)."""
        return {company for _source, _key, company, _tags in self.truth}

    def record_count(self, source: str) -> int:
        """Customer records of ``source`` written so far."""
        self.counts[source] = self.counts.get(source, 0) + 1
        return self.counts[source] - 1

    def note(self, name: str) -> None:
        """Count a planted hard case."""
        self.hard_cases[name] = self.hard_cases.get(name, 0) + 1


def person(rng: random.Random) -> str:
    """A Chinese personal name."""
    given = rng.choice(sorted(GIVEN)) + (rng.choice(sorted(GIVEN)) if rng.random() < 0.6 else "")
    return rng.choice(sorted(SURNAMES)) + given


def pinyin_of(name: str) -> str:
    """The pinyin of a generated personal name, for e-mail addresses."""
    return SURNAMES.get(name[0], "x") + "".join(GIVEN.get(c, "x") for c in name[1:])


def mobile(rng: random.Random) -> str:
    """A Chinese mobile number."""
    return rng.choice(MOBILE_PREFIXES) + f"{rng.randrange(10**8):08d}"


def typed_phone(number: str, rng: random.Random) -> str:
    """Write a phone number the way people type them."""
    roll = rng.random()
    if number.startswith("1"):
        if roll < 0.25:
            return f"+86 {number[:3]} {number[3:7]} {number[7:]}"
        if roll < 0.32:
            return "".join(chr(ord(ch) + 0xFEE0) for ch in number)  # full-width digits
        if roll < 0.40:
            return f"0086-{number}"
        return number
    area, local = number.split("-")
    if roll < 0.2:
        return f"({area}){local}"
    if roll < 0.3:
        return f"{area} {local}"
    if roll < 0.35:
        return f"+86-{area[1:]}-{local}"
    return number


def uuid_from(rng: random.Random) -> str:
    """A reproducible UUID4 like SuiteCRM's ids."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def stamp(rng: random.Random, days_back: int = 900) -> str:
    """A SuiteCRM/U8 datetime before the reference day."""
    moment = dt.datetime(2025, 6, 30, 18) - dt.timedelta(seconds=rng.randrange(days_back * 86_400))
    return moment.strftime("%Y-%m-%d %H:%M:%S")


# --------------------------------------------------------------------------- database schemas

U8 = sa.MetaData()
sa.Table("Person", U8, sa.Column("cPersonCode", sa.String(20), primary_key=True),
         sa.Column("cPersonName", sa.String(40), nullable=False), sa.Column("cDepCode", sa.String(12)),
         sa.Column("cPersonEmail", sa.String(60)), sa.Column("cPersonPhone", sa.String(60)),
         sa.Column("bPsnPerson", sa.SmallInteger))  # fmt: skip
sa.Table("Customer", U8, sa.Column("cCusCode", sa.String(20), primary_key=True),
         sa.Column("cCusName", sa.String(98), nullable=False), sa.Column("cCusAbbName", sa.String(60)),
         sa.Column("cCCCode", sa.String(12)), sa.Column("cDCCode", sa.String(12)), sa.Column("cTrade", sa.String(50)),
         sa.Column("cCusAddress", sa.String(255)), sa.Column("cCusPostCode", sa.String(30)),
         sa.Column("cCusRegCode", sa.String(50)), sa.Column("cCusBank", sa.String(100)),
         sa.Column("cCusAccount", sa.String(50)), sa.Column("dCusDevDate", sa.DateTime),
         sa.Column("cCusLPerson", sa.String(40)), sa.Column("cCusEmail", sa.String(100)),
         sa.Column("cCusPerson", sa.String(40)), sa.Column("cCusPhone", sa.String(100)),
         sa.Column("cCusFax", sa.String(100)), sa.Column("cCusHand", sa.String(100)),
         sa.Column("cCusPPerson", sa.String(20)), sa.Column("cCusDepart", sa.String(12)),
         sa.Column("cCusHeadCode", sa.String(20)), sa.Column("iCusCreLine", sa.Numeric(28, 6)),
         sa.Column("dEndDate", sa.DateTime), sa.Column("cMemo", sa.String(240)))  # fmt: skip
sa.Table("SO_SOMain", U8, sa.Column("ID", sa.Integer, primary_key=True, autoincrement=False),
         sa.Column("cSOCode", sa.String(30), nullable=False, unique=True), sa.Column("dDate", sa.DateTime),
         sa.Column("cBusType", sa.String(8)), sa.Column("cSTCode", sa.String(2)), sa.Column("cCusCode", sa.String(20)),
         sa.Column("cDepCode", sa.String(12)), sa.Column("cPersonCode", sa.String(20)),
         sa.Column("cexch_name", sa.String(8)), sa.Column("iExchRate", sa.Float), sa.Column("iTaxRate", sa.Float),
         sa.Column("cMemo", sa.String(255)), sa.Column("cVerifier", sa.String(20)), sa.Column("cMaker", sa.String(20)),
         sa.Column("iStatus", sa.SmallInteger))  # fmt: skip
sa.Table("SO_SODetails", U8, sa.Column("AutoID", sa.Integer, primary_key=True, autoincrement=False),
         sa.Column("ID", sa.Integer), sa.Column("cSOCode", sa.String(30)), sa.Column("iRowNo", sa.Integer),
         sa.Column("cInvCode", sa.String(60)), sa.Column("cInvName", sa.String(255)),
         sa.Column("iQuantity", sa.Numeric(28, 6)), sa.Column("iQuotedPrice", sa.Numeric(28, 6)),
         sa.Column("iUnitPrice", sa.Numeric(28, 6)), sa.Column("iTaxUnitPrice", sa.Numeric(28, 6)),
         sa.Column("iMoney", sa.Numeric(28, 6)), sa.Column("iTax", sa.Numeric(28, 6)),
         sa.Column("iSum", sa.Numeric(28, 6)), sa.Column("iNatSum", sa.Numeric(28, 6)),
         sa.Column("iTaxRate", sa.Numeric(28, 6)), sa.Column("dPreDate", sa.DateTime))  # fmt: skip
U8_INDEXES = [("SO_SODetails", "ID"), ("SO_SODetails", "cSOCode"), ("SO_SOMain", "cCusCode")]

CRM = sa.MetaData()
sa.Table("users", CRM, sa.Column("id", sa.String(36), primary_key=True), sa.Column("user_name", sa.String(60)),
         sa.Column("first_name", sa.String(255)), sa.Column("last_name", sa.String(255)),
         sa.Column("email1", sa.String(100)), sa.Column("status", sa.String(100)),
         sa.Column("is_admin", sa.SmallInteger), sa.Column("deleted", sa.SmallInteger))  # fmt: skip
sa.Table("currencies", CRM, sa.Column("id", sa.String(36), primary_key=True), sa.Column("name", sa.String(36)),
         sa.Column("symbol", sa.String(36)), sa.Column("iso4217", sa.String(3)),
         sa.Column("conversion_rate", sa.Float), sa.Column("status", sa.String(100)),
         sa.Column("deleted", sa.SmallInteger), sa.Column("date_entered", sa.DateTime),
         sa.Column("date_modified", sa.DateTime), sa.Column("created_by", sa.String(36)))  # fmt: skip
sa.Table("accounts", CRM, sa.Column("id", sa.String(36), primary_key=True), sa.Column("name", sa.String(150)),
         sa.Column("date_entered", sa.DateTime), sa.Column("date_modified", sa.DateTime),
         sa.Column("modified_user_id", sa.String(36)), sa.Column("created_by", sa.String(36)),
         sa.Column("description", sa.Text), sa.Column("deleted", sa.SmallInteger),
         sa.Column("assigned_user_id", sa.String(36)), sa.Column("account_type", sa.String(50)),
         sa.Column("industry", sa.String(50)), sa.Column("annual_revenue", sa.String(100)),
         sa.Column("phone_fax", sa.String(100)), sa.Column("billing_address_street", sa.String(150)),
         sa.Column("billing_address_city", sa.String(100)), sa.Column("billing_address_state", sa.String(100)),
         sa.Column("billing_address_postalcode", sa.String(20)), sa.Column("billing_address_country", sa.String(255)),
         sa.Column("rating", sa.String(100)), sa.Column("phone_office", sa.String(100)),
         sa.Column("phone_alternate", sa.String(100)), sa.Column("website", sa.String(255)),
         sa.Column("ownership", sa.String(100)), sa.Column("employees", sa.String(10)),
         sa.Column("ticker_symbol", sa.String(10)), sa.Column("parent_id", sa.String(36)),
         sa.Column("sic_code", sa.String(50)), sa.Column("campaign_id", sa.String(36)))  # fmt: skip
sa.Table("contacts", CRM, sa.Column("id", sa.String(36), primary_key=True), sa.Column("date_entered", sa.DateTime),
         sa.Column("date_modified", sa.DateTime), sa.Column("deleted", sa.SmallInteger),
         sa.Column("assigned_user_id", sa.String(36)), sa.Column("salutation", sa.String(255)),
         sa.Column("first_name", sa.String(100)), sa.Column("last_name", sa.String(100)),
         sa.Column("title", sa.String(100)), sa.Column("department", sa.String(255)),
         sa.Column("phone_home", sa.String(100)), sa.Column("phone_mobile", sa.String(100)),
         sa.Column("phone_work", sa.String(100)), sa.Column("phone_other", sa.String(100)),
         sa.Column("phone_fax", sa.String(100)), sa.Column("lead_source", sa.String(255)),
         sa.Column("primary_address_city", sa.String(100)), sa.Column("reports_to_id", sa.String(36)),
         sa.Column("birthdate", sa.Date))  # fmt: skip
sa.Table("accounts_contacts", CRM, sa.Column("id", sa.String(36), primary_key=True),
         sa.Column("contact_id", sa.String(36)), sa.Column("account_id", sa.String(36)),
         sa.Column("date_modified", sa.DateTime), sa.Column("deleted", sa.SmallInteger))  # fmt: skip
sa.Table("opportunities", CRM, sa.Column("id", sa.String(36), primary_key=True), sa.Column("name", sa.String(50)),
         sa.Column("date_entered", sa.DateTime), sa.Column("date_modified", sa.DateTime),
         sa.Column("modified_user_id", sa.String(36)), sa.Column("created_by", sa.String(36)),
         sa.Column("description", sa.Text), sa.Column("deleted", sa.SmallInteger),
         sa.Column("assigned_user_id", sa.String(36)), sa.Column("opportunity_type", sa.String(255)),
         sa.Column("campaign_id", sa.String(36)), sa.Column("lead_source", sa.String(50)),
         sa.Column("amount", sa.Float), sa.Column("amount_usdollar", sa.Float), sa.Column("currency_id", sa.String(36)),
         sa.Column("date_closed", sa.Date), sa.Column("next_step", sa.String(100)),
         sa.Column("sales_stage", sa.String(255)), sa.Column("probability", sa.Float))  # fmt: skip
sa.Table("accounts_opportunities", CRM, sa.Column("id", sa.String(36), primary_key=True),
         sa.Column("opportunity_id", sa.String(36)), sa.Column("account_id", sa.String(36)),
         sa.Column("date_modified", sa.DateTime), sa.Column("deleted", sa.SmallInteger))  # fmt: skip
sa.Table("email_addresses", CRM, sa.Column("id", sa.String(36), primary_key=True),
         sa.Column("email_address", sa.String(255)), sa.Column("email_address_caps", sa.String(255)),
         sa.Column("invalid_email", sa.SmallInteger), sa.Column("opt_out", sa.SmallInteger),
         sa.Column("date_created", sa.DateTime), sa.Column("date_modified", sa.DateTime),
         sa.Column("deleted", sa.SmallInteger))  # fmt: skip
sa.Table("email_addr_bean_rel", CRM, sa.Column("id", sa.String(36), primary_key=True),
         sa.Column("email_address_id", sa.String(36)), sa.Column("bean_id", sa.String(36)),
         sa.Column("bean_module", sa.String(100)), sa.Column("primary_address", sa.SmallInteger),
         sa.Column("reply_to_address", sa.SmallInteger), sa.Column("date_created", sa.DateTime),
         sa.Column("date_modified", sa.DateTime), sa.Column("deleted", sa.SmallInteger))  # fmt: skip
# SuiteCRM's own indexes on the relationship tables (idx_con_acc_con, idx_acc_opp_opp, ...).
CRM_INDEXES = [("accounts_contacts", "contact_id"), ("accounts_contacts", "account_id"),
               ("accounts_opportunities", "opportunity_id"), ("accounts_opportunities", "account_id"),
               ("email_addr_bean_rel", "bean_id"), ("accounts", "deleted"), ("contacts", "deleted"),
               ("opportunities", "deleted")]  # fmt: skip


class DatabaseWriter:
    """Bulk writes into a fresh copy of a schema: SQLite executemany, PostgreSQL COPY."""

    def __init__(self, url: str, metadata: sa.MetaData, indexes: Sequence[tuple[str, str]]) -> None:
        self.url = sa.make_url(url)
        self.metadata, self.indexes = metadata, indexes
        self.sqlite = self.url.get_backend_name() == "sqlite"
        if self.sqlite:
            assert self.url.database, "a SQLite URL needs a file path"
            Path(self.url.database).unlink(missing_ok=True)
            Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
        else:
            ensure_database(self.url)
        self.engine = sa.create_engine(self.url)
        with self.engine.begin() as connection:
            metadata.drop_all(connection)
            metadata.create_all(connection)
        self.raw = self.engine.raw_connection()
        if self.sqlite:
            self.raw.execute("PRAGMA journal_mode = OFF")
            self.raw.execute("PRAGMA synchronous = OFF")

    def write(self, table: str, rows: Iterable[Sequence[Any]]) -> int:
        """Write the rows (tuples in column order) into ``table``; return how many."""
        columns = [c.name for c in self.metadata.tables[table].columns]
        quote = self.engine.dialect.identifier_preparer.quote
        names = ", ".join(quote(c) for c in columns)
        count = 0
        if self.sqlite:
            statement = f"INSERT INTO {quote(table)} ({names}) VALUES ({', '.join('?' * len(columns))})"
            cursor = self.raw.cursor()
            for batch in batched(rows, BATCH):
                cursor.executemany(statement, batch)
                count += len(batch)
            cursor.close()
        else:
            with (
                self.raw.cursor() as cursor,
                cursor.copy(f"COPY {quote(table)} ({names}) FROM STDIN") as copy,
            ):
                for row in rows:
                    copy.write_row(row)
                    count += 1
        self.raw.commit()
        return count

    def close(self) -> None:
        """Build the indexes, analyze, and close."""
        quote = self.engine.dialect.identifier_preparer.quote
        cursor = self.raw.cursor()
        for table, column in self.indexes:
            cursor.execute(
                f"CREATE INDEX {quote(f'ix_{table}_{column}'.lower())} ON {quote(table)} ({quote(column)})"
            )
        cursor.execute("ANALYZE")
        cursor.close()
        self.raw.commit()
        self.raw.close()
        self.engine.dispose()


def ensure_database(url: sa.URL) -> None:
    """Create a PostgreSQL database if it does not exist yet."""
    admin = sa.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        exists = connection.execute(
            sa.text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": url.database}
        ).first()
        if not exists:
            connection.exec_driver_sql(f'CREATE DATABASE "{url.database}"')
    admin.dispose()


def batched(rows: Iterable[Sequence[Any]], size: int) -> Iterator[list[Sequence[Any]]]:
    """Lists of at most ``size`` rows."""
    batch: list[Sequence[Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# --------------------------------------------------------------------------- U8 (customers; orders written last)


def u8_people(engagement: Engagement) -> Iterator[tuple[Any, ...]]:
    """Person: the salespeople (业务员)."""
    for code, surname, given in engagement.reps:
        yield code, surname + given, "0301", f"{pinyin_of(surname + given)}@example.com", None, 1


def u8_customers(engagement: Engagement) -> Iterator[tuple[Any, ...]]:
    """Customer: 80% of the head offices, every branch and every branch's head office; 2% entered twice."""
    rng = engagement.rng("u8_customers")
    heads_of_branches = {c.parent for c in engagement.companies if c.parent >= 0}
    for company in engagement.companies:
        if not (company.parent >= 0 or company.id in heads_of_branches or rng.random() < 0.80):
            continue
        for copy in range(2 if rng.random() < 0.02 else 1):
            code = f"{engagement.record_count('erp_u8') + 1:08d}"
            engagement.u8_code.setdefault(company.id, code)
            record = engagement.written(company, rng, "u8")
            tags = record.tags + (["within_source_duplicate"] if copy else [])
            engagement.truth.append(("erp_u8", code, company.id, ";".join(tags)))
            trade = TRADES[company.trade][0]
            yield (
                code, record.name.strip(), f"{company.brand}{trade[:2]}", rng.choice(["01", "02", "03"]),
                CITIES[company.city][4], trade, record.address, None, record.code,
                rng.choice(["中国工商银行", "中国建设银行", "招商银行", None]), None, stamp(rng, 3000), None,
                f"info@{company.domain}" if rng.random() < 0.3 else None,
                company.contact if rng.random() < 0.8 else None, record.phone, None,
                company.contact_mobile if rng.random() < 0.7 else None, engagement.reps[company.rep][0], "0301",
                engagement.u8_code.get(company.parent) if company.parent >= 0 else None,
                float(rng.choice([0, 50000, 100000, 500000])), None, None,
            )  # fmt: skip


def u8_orders(
    engagement: Engagement, lines_wanted: int
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """SO_SOMain and SO_SODetails: orders of U8 customers until the order lines reach ``lines_wanted``."""
    rng = engagement.rng("u8_orders")
    customers = list(engagement.u8_code.items())
    # A few customers order a lot: weights from a long-tailed distribution.
    weights = [rng.paretovariate(1.5) for _ in customers]
    picks = rng.choices(range(len(customers)), weights=weights, k=max(1, lines_wanted // 2))
    orders: list[tuple[Any, ...]] = []
    lines: list[tuple[Any, ...]] = []
    pick = 0
    while len(lines) < lines_wanted and customers:
        company_id, code = customers[picks[pick % len(picks)]]
        pick += 1
        company = engagement.companies[company_id]
        order_id = len(orders) + 1
        so_code = f"SO{2023 + order_id % 3}{order_id:07d}"
        foreign = rng.random() < 0.02
        currency, rate = ("美元", 7.2) if foreign else ("人民币", 1.0)
        day = REFERENCE_DAY - dt.timedelta(days=rng.randrange(900))
        orders.append((
            order_id, so_code, f"{day.isoformat()} 00:00:00", "普通销售", "01", code, "0301",
            engagement.reps[company.rep][0], currency, rate, 13.0, None, "审核人", "制单人", rng.choice([0, 1, 1, 2]),
        ))  # fmt: skip
        for row_no in range(1, min(rng.choice([1, 1, 2, 2, 3, 4, 6]), lines_wanted - len(lines)) + 1):
            inv, inv_name, list_price = rng.choice(PRODUCTS)
            price = round(list_price * rng.choice([1.0, 1.0, 0.95, 0.9]) / rate, 2)
            quantity = float(rng.choice([1, 1, 2, 3, 5, 10, 20, 50]))
            total = round(price * quantity, 2)
            money = round(total / 1.13, 2)
            lines.append((
                len(lines) + 1, order_id, so_code, row_no, inv, inv_name, quantity, round(list_price / rate, 2),
                round(price / 1.13, 6), price, money, round(total - money, 2), total, round(total * rate, 2), 13.0,
                f"{(day + dt.timedelta(days=rng.randint(7, 60))).isoformat()} 00:00:00",
            ))  # fmt: skip
        if foreign:
            engagement.note("foreign_currency_orders")
    return orders, lines


# --------------------------------------------------------------------------- SuiteCRM


def crm_users(engagement: Engagement) -> Iterator[tuple[Any, ...]]:
    """users: one per salesperson."""
    rng = engagement.rng("crm_users")
    for code, surname, given in engagement.reps:
        login = pinyin_of(surname + given) + code[-2:]
        yield uuid_from(rng), login, given, surname, f"{login}@example.com", "Active", 0, 0


def crm_accounts(engagement: Engagement, user_ids: list[str]) -> Iterator[tuple[Any, ...]]:
    """accounts: 55% of the head offices, 30% of the branches (8% entered twice), soft-deleted copies (3%)."""
    rng = engagement.rng("crm_accounts")
    for company in engagement.companies:
        if company.id not in engagement.force_crm_english and rng.random() >= (
            0.30 if company.parent >= 0 else 0.55
        ):
            continue
        copies = 2 if rng.random() < 0.08 else 1
        bridge = company.id in engagement.bridges
        for copy in range(copies + (1 if bridge else 0)):
            account_id = uuid_from(rng)
            engagement.crm_id.setdefault(company.id, account_id)
            record = engagement.written(company, rng, "crm")
            tags = record.tags + (["within_source_duplicate"] if copy else [])
            if copy == copies:  # the bridging record: only the trade name, which two companies share
                record = Written(company.brand, None, typed_phone(company.phone, rng), None, None,
                                 CITIES[company.city][1], ["name_short_trade", "bridge_record", *company.traps])  # fmt: skip
                tags = record.tags
            engagement.truth.append(("legacy_crm", account_id, company.id, ";".join(tags)))
            created = stamp(rng)
            state = CITIES[company.city][0] if record.city_field == CITIES[company.city][1] else None
            row = (
                account_id, record.name, created, created, user_ids[company.rep], user_ids[company.rep], None, 0,
                user_ids[company.rep], "Customer", TRADES[company.trade][0], None, None, record.street,
                record.city_field, state, None, "中国", None, record.phone,
                typed_phone(company.contact_mobile, rng) if rng.random() < 0.2 and record.phone else None,
                f"www.{company.domain}" if rng.random() < 0.35 else None, None, None, None,
                engagement.crm_id.get(company.parent) if company.parent >= 0 else None, record.code, None,
            )  # fmt: skip
            yield row
            # An old duplicate someone deleted (at least one at any size): must never reach the core.
            if rng.random() < 0.03 or not engagement.soft_deleted:
                deleted_id = uuid_from(rng)
                engagement.soft_deleted.append(("legacy_crm", "accounts", deleted_id))
                yield (deleted_id, f"{record.name}（作废）", *row[2:7], 1, *row[8:])


def crm_contacts(
    engagement: Engagement, user_ids: list[str]
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """contacts, accounts_contacts, email_addresses, email_addr_bean_rel for the CRM accounts."""
    rng = engagement.rng("crm_contacts")
    contacts: list[tuple[Any, ...]] = []
    links: list[tuple[Any, ...]] = []
    emails: list[tuple[Any, ...]] = []
    email_links: list[tuple[Any, ...]] = []
    for company_id, account_id in engagement.crm_id.items():
        company = engagement.companies[company_id]
        for n in range(rng.choice([1, 1, 1, 2, 2, 3])):
            contact_id, name = uuid_from(rng), company.contact if n == 0 else person(rng)
            phone = company.contact_mobile if n == 0 else mobile(rng)
            deleted = 1 if rng.random() < 0.03 or not contacts else 0
            created = stamp(rng)
            contacts.append((
                contact_id, created, created, deleted, user_ids[company.rep], None, name[1:], name[0],
                rng.choice(["采购经理", "总经理", "IT主管", "财务总监", "技术总监", None]),
                rng.choice(["采购部", "信息部", "财务部", None]), None, typed_phone(phone, rng),
                typed_phone(company.phone, rng) if rng.random() < 0.3 else None, None, None,
                rng.choice(["Web Site", "Cold Call", "Trade Show", None]), CITIES[company.city][1], None, None,
            ))  # fmt: skip
            if deleted:
                engagement.soft_deleted.append(("legacy_crm", "contacts", contact_id))
            links.append((uuid_from(rng), contact_id, account_id, created, 0))
            if rng.random() < 0.5:
                email_id = uuid_from(rng)
                address = f"{pinyin_of(name)}@{company.domain}"
                if rng.random() < 0.03:
                    address = address.replace("@", " at ")  # not an address
                emails.append((email_id, address, address.upper(), 0, 0, created, created, 0))
                email_links.append(
                    (uuid_from(rng), email_id, contact_id, "Contacts", 1, 0, created, created, 0)
                )
    return contacts, links, emails, email_links


def crm_opportunities(
    engagement: Engagement, user_ids: list[str]
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """opportunities and accounts_opportunities; 10% in a foreign currency, 3% soft-deleted, 1% unlinked."""
    rng = engagement.rng("crm_opportunities")
    opportunities: list[tuple[Any, ...]] = []
    links: list[tuple[Any, ...]] = []
    for company_id, account_id in engagement.crm_id.items():
        company = engagement.companies[company_id]
        for _ in range(rng.choice([0, 0, 1, 1, 1, 2, 2, 3])):
            opp_id = uuid_from(rng)
            amount = float(rng.choice([18000, 50000, 86000.5, 120000, 300000, 1250000])) * rng.choice(
                [1, 1, 2, 3]
            )
            currency_id, rate = "-99", 1.0
            if rng.random() < 0.10:
                currency_id, _name, _symbol, _iso, rate = rng.choice(CURRENCIES)
                amount = round(amount * rate, 2)
                engagement.note("foreign_currency_opportunities")
            deleted = 1 if rng.random() < 0.03 or not opportunities else 0
            created = stamp(rng)
            close = REFERENCE_DAY + dt.timedelta(days=rng.randint(-300, 180))
            stage = rng.choice(STAGES_SUITE)
            opportunities.append((
                opp_id, f"{company.brand}{rng.choice(['产线改造', '年度框架', '设备采购', '运维续约', 'MES升级'])}项目",
                created, created, user_ids[company.rep], user_ids[company.rep], None, deleted, user_ids[company.rep],
                rng.choice(["New Business", "Existing Business", None]), None,
                rng.choice(["Web Site", "Cold Call", "Existing Customer", "Partner", None]), amount,
                round(amount / rate, 2), currency_id, close.isoformat(), None, stage, None,
            ))  # fmt: skip
            if deleted:
                engagement.soft_deleted.append(("legacy_crm", "opportunities", opp_id))
            unlinked = rng.random() < 0.01
            links.append((uuid_from(rng), opp_id, account_id, created, 1 if unlinked else 0))
            if unlinked:
                engagement.note("opportunities_without_live_account_link")
            if not deleted:
                engagement.opportunity_truth.append(
                    ("legacy_crm", opp_id, company.id, 0 if unlinked else 1, "")
                )
    return opportunities, links


# --------------------------------------------------------------------------- the sales workbook

CUSTOMER_HEADER = ["序号", "客户名称", "统一社会信用代码", "联系人", "手机", "电话", "地址", "负责人", "客户等级", "备注"]  # fmt: skip
DEAL_HEADER = ["商机编号", "客户名称", "商机名称", "阶段", "预计金额", "币种", "预计成交日期", "负责人", "报备日期", "备注"]  # fmt: skip


def amount_text(value: float, rng: random.Random) -> object:
    """Write an amount the way sales people do."""
    roll = rng.random()
    if roll < 0.25:
        return f"{value / 10000:g}万"
    if roll < 0.45:
        return f"¥{value:,.2f}"
    if roll < 0.50:
        return f"{value:,.0f}元"
    if roll < 0.505:
        return "待定"  # not an amount: the row is rejected with a reason
    return value


def date_cell(day: dt.date, rng: random.Random) -> object:
    """Write a date as an Excel date or as text."""
    roll = rng.random()
    if roll < 0.30:
        return f"{day.year}年{day.month}月{day.day}日"
    if roll < 0.40:
        return f"{day.year}/{day.month}/{day.day}"
    if roll < 0.45:
        return f"{day.year}.{day.month}.{day.day}"
    return day


def write_workbook(engagement: Engagement, path: Path) -> dict[str, int]:
    """Write the sales workbook (write-only openpyxl); return its data row counts."""
    rng = engagement.rng("xlsx")
    workbook = Workbook(write_only=True)
    customers = workbook.create_sheet("客户")
    customers.append(["2025年度重点客户台账（全国）"])
    customers.append(["制表：销售管理部", None, None, None, "更新日期：2025年6月30日"])
    customers.append([])
    customers.append(CUSTOMER_HEADER)
    chosen = [c for c in engagement.companies if rng.random() < (0.05 if c.parent >= 0 else 0.25)]
    chosen.sort(key=lambda c: (REGION_OF_PROVINCE[CITIES[c.city][0]], c.id))
    rows = subtotals = 0
    region = None
    in_region = 0
    for company in chosen:
        company_region = REGION_OF_PROVINCE[CITIES[company.city][0]]
        if region is not None and company_region != region:
            customers.append(["小计", f"{region} {in_region} 家"])
            subtotals += 1
            in_region = 0
        region = company_region
        record = engagement.written(company, rng, "xlsx")
        key = " ".join(record.name.split())
        if key in engagement.xlsx_names:
            continue
        engagement.xlsx_names.add(key)
        engagement.xlsx_name[company.id] = key
        engagement.truth.append(("sales_xlsx", key, company.id, ";".join(record.tags)))
        rep = engagement.reps[company.rep]
        rows += 1
        in_region += 1
        customers.append([
            rows, record.name, record.code, company.contact, typed_phone(company.contact_mobile, rng),
            record.phone, record.address, rep[1] + rep[2],
            rng.choice(["A", "B", "C"]), "重点跟进" if rng.random() < 0.05 else None,
        ])  # fmt: skip
        if rng.random() < 0.01:
            customers.append([])
    if region is not None:
        customers.append(["小计", f"{region} {in_region} 家"])
        subtotals += 1
    customers.append(["合计", f"{rows} 家"])

    deals = workbook.create_sheet("商机")
    deals.append(["2025年商机跟进表（导出自销售周会）"])
    deals.append([])
    deals.append(DEAL_HEADER)
    wanted = round(engagement.heads * 0.25)
    pool = [c for c in engagement.companies if c.parent < 0]
    picked = sorted(rng.choices(range(len(pool)), k=wanted), key=lambda i: pool[i].rep)
    deal_rows = 0
    known = engagement.in_sources
    owner = None
    owner_total = 0.0
    for n, position in enumerate(picked, start=1):
        company = pool[position]
        if owner is not None and company.rep != owner:
            deals.append(["小计", None, None, None, owner_total])
            subtotals += 1
            owner_total = 0.0
        owner = company.rep
        if company.id in engagement.xlsx_name and rng.random() < 0.6:
            name, tags = engagement.xlsx_name[company.id], ["deal_name_as_in_sheet"]
        else:
            name, tags = engagement.name_variant(company, rng, "deal")
        value = float(rng.choice([30000, 50000, 80000, 100000, 125000, 200000, 350000, 1200000]))
        foreign = rng.random() < 0.03
        if foreign:
            value = round(value * 0.1389, -2)
            engagement.note("foreign_currency_opportunities")
        owner_total += value
        rep = engagement.reps[company.rep]
        stage = rng.choice(STAGES_ZH) if rng.random() < 0.98 else "已签约"
        amount = amount_text(value, rng)
        resolvable = int(
            company.id in known and amount != "待定"
        )  # 待定 is rejected for its amount, not its customer
        engagement.opportunity_truth.append(
            ("sales_xlsx", f"SJ-2025-{n:06d}", company.id, resolvable, ";".join(tags))
        )
        deals.append([
            f"SJ-2025-{n:06d}", name, f"{company.brand}{rng.choice(['扩容', '新建', '升级', '替换'])}项目", stage,
            amount, "美元" if foreign else rng.choice(["人民币", None, None]),
            date_cell(REFERENCE_DAY + dt.timedelta(days=rng.randint(-90, 200)), rng), rep[1] + rep[2],
            date_cell(REFERENCE_DAY - dt.timedelta(days=rng.randint(0, 300)), rng),
            "ＶＩＰ客户" if rng.random() < 0.05 else None,
        ])  # fmt: skip
        deal_rows += 1
    if owner is not None:
        deals.append(["小计", None, None, None, owner_total])
        subtotals += 1
    deals.append(["合计", None, None, None, f"{deal_rows} 条"])
    workbook.save(path)
    engagement.hard_cases["subtotal_rows"] = subtotals + 2
    engagement.hard_cases["title_rows"] = 4
    return {"customers": rows, "opportunities": deal_rows}


# --------------------------------------------------------------------------- putting it together


def generate(
    rows: int | None,
    out: Path,
    seed: int = SEED,
    u8_url: str | None = None,
    crm_url: str | None = None,
    customers: int | None = None,
) -> dict[str, Any]:
    """Write the engagement into ``out`` (and the databases named by URL); return the manifest.

    ``customers`` sizes the engagement by customer records instead (about that many over the three
    sources); ``rows`` then defaults to those plus contacts, opportunities and half as many order lines.
    """
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if rows is None and customers is None:
        rows = DEFAULT_ROWS
    engagement = Engagement(rows, seed, customers)
    u8_url = u8_url or f"sqlite:///{(out / 'erp_u8.sqlite').resolve()}"
    crm_url = crm_url or f"sqlite:///{(out / 'legacy_crm.sqlite').resolve()}"
    counts: dict[str, int] = {}

    crm = DatabaseWriter(crm_url, CRM, CRM_INDEXES)
    users = list(crm_users(engagement))
    counts["crm.users"] = crm.write("users", users)
    user_ids = [u[0] for u in users]
    counts["crm.currencies"] = crm.write(
        "currencies",
        [(c[0], c[1], c[2], c[3], c[4], "Active", 0, "2020-01-01 00:00:00", "2025-01-01 00:00:00", "1")
         for c in CURRENCIES],
    )  # fmt: skip
    counts["crm.accounts"] = crm.write("accounts", crm_accounts(engagement, user_ids))
    contacts, contact_links, emails, email_links = crm_contacts(engagement, user_ids)
    counts["crm.contacts"] = crm.write("contacts", contacts)
    counts["crm.accounts_contacts"] = crm.write("accounts_contacts", contact_links)
    counts["crm.email_addresses"] = crm.write("email_addresses", emails)
    counts["crm.email_addr_bean_rel"] = crm.write("email_addr_bean_rel", email_links)
    del contacts, contact_links, emails, email_links
    opportunities, opportunity_links = crm_opportunities(engagement, user_ids)
    counts["crm.opportunities"] = crm.write("opportunities", opportunities)
    counts["crm.accounts_opportunities"] = crm.write("accounts_opportunities", opportunity_links)
    del opportunities, opportunity_links
    crm.close()

    u8 = DatabaseWriter(u8_url, U8, U8_INDEXES)
    counts["u8.Person"] = u8.write("Person", u8_people(engagement))
    counts["u8.Customer"] = u8.write("Customer", u8_customers(engagement))
    sheet_counts = write_workbook(engagement, out / "sales.xlsx")
    counts["xlsx.客户"] = sheet_counts["customers"]
    counts["xlsx.商机"] = sheet_counts["opportunities"]
    fixed = (counts["u8.Customer"] + counts["crm.accounts"] + counts["xlsx.客户"] + counts["crm.contacts"]
             + counts["crm.opportunities"] + counts["xlsx.商机"])  # fmt: skip
    lines_wanted = max(0, rows - fixed) if rows is not None else (customers or 0) // 2
    orders, lines = u8_orders(engagement, lines_wanted)
    counts["u8.SO_SOMain"] = u8.write("SO_SOMain", orders)
    counts["u8.SO_SODetails"] = u8.write("SO_SODetails", lines)
    del orders, lines
    u8.close()

    with (out / "truth.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["source", "key", "company_id", "classes"])
        writer.writerows(engagement.truth)
    with (out / "opportunities_truth.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["source", "key", "company_id", "resolvable", "classes"])
        writer.writerows(engagement.opportunity_truth)
    classes: dict[str, int] = {}
    for _source, _key, _company, tags in engagement.truth:
        for tag in filter(None, tags.split(";")):
            classes[tag.split(":")[0]] = classes.get(tag.split(":")[0], 0) + 1
    with (out / "soft_deleted.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["source", "table", "key"])
        writer.writerows(engagement.soft_deleted)
    by_entity = {
        "customers": counts["u8.Customer"] + counts["crm.accounts"] + counts["xlsx.客户"],
        "contacts": counts["crm.contacts"],
        "opportunities": counts["crm.opportunities"] + counts["xlsx.商机"],
        "order_lines": counts["u8.SO_SODetails"],
    }
    manifest = {
        "rows": sum(by_entity.values()),
        "rows_requested": rows,
        "customers_requested": customers,
        "seed": seed,
        "companies": len(engagement.companies),
        "by_entity": by_entity,
        "tables": counts,
        "all_rows_written": sum(counts.values()),
        "hard_cases": dict(sorted(engagement.hard_cases.items())),
        "classes": dict(sorted(classes.items())),  # customer records carrying each class
        "truth_records": len(engagement.truth),
        "soft_deleted_rows": len(engagement.soft_deleted),
        "files": {
            "sales_xlsx": str((out / "sales.xlsx").resolve()),
            "truth": str((out / "truth.csv").resolve()),
            "soft_deleted": str((out / "soft_deleted.csv").resolve()),
            "opportunities_truth": str((out / "opportunities_truth.csv").resolve()),
        },
        "urls": {"erp_u8": redact(u8_url), "legacy_crm": redact(crm_url)},
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=1), encoding="utf-8")
    return manifest


def redact(url: str) -> str:
    """A URL without its password."""
    return sa.make_url(url).render_as_string(hide_password=True)


def main() -> None:
    """Command-line entry point: generate, print the manifest as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--rows",
        type=int,
        default=None,
        help="customer + contact + opportunity + order-line rows (default 100,000)",
    )
    parser.add_argument(
        "--customers", type=int, default=None, help="size by customer records over the three sources instead"
    )
    parser.add_argument("--out", type=Path, default=Path("var/e2e/data"))
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--u8-url", help="SQLAlchemy URL for the U8 database (default: SQLite file in --out)")
    parser.add_argument(
        "--crm-url", help="SQLAlchemy URL for the SuiteCRM database (default: SQLite file in --out)"
    )
    args = parser.parse_args()
    manifest = generate(args.rows, args.out, args.seed, args.u8_url, args.crm_url, args.customers)
    print(json.dumps(manifest, ensure_ascii=False))


if __name__ == "__main__":
    main()
