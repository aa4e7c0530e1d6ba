"""A generated Chinese B2B customer set with planted duplicates, hard negatives and ground truth.

Each company gets one to four records written differently (legal form, region in brackets or with
省/市, traditional characters, full-width letters, zero-width spaces, the trade name without its
industry word, a pinyin English name; credit code, phone or e-mail missing). Hard negatives are
separate companies: the same trade name and industry in another city, a branch (分公司) of a company,
a trade name one character away in the same city (腾讯/腾达), and the same name under a different
credit code. ``truth`` maps each record to its company.
"""

from __future__ import annotations

import random
from typing import Any

import pandas as pd
from opencc import OpenCC
from pypinyin import lazy_pinyin
from stdnum.cn import uscc

from integration.dedup.normalize import CITIES

# Characters trade names are made of (two or three of them): namesakes exist, as they do in real data.
TRADE = list(
    "腾达讯华创海纳星河启明云帆同安捷凯思源恒通博远金桥瑞丰鼎新宏图天成众合卓越景汇长城德嘉禾飞扬信诚泰和盛兴隆昌"
    "光辉永佳美立中联合顺利祥发展开元亨万方正东南西北宇宙洪荒日月晨宿列张寒来暑往秋收冬藏闰余岁律吕调阳"
    "致雨露结霜丽水玉出昆冈剑号巨阙珠称夜果珍李柰菜重芥姜咸河淡鳞潜羽翔龙师火帝鸟官人皇始制文字乃服衣裳"
)
INDUSTRY = [("科技", "Technology"), ("贸易", "Trading"), ("环保工程", "Environmental Engineering"),
            ("医疗器械", "Medical Equipment"), ("物流", "Logistics"), ("软件", "Software"), ("电子", "Electronics"),
            ("机械设备", "Machinery"), ("信息技术", "Information Technology"), ("新材料", "New Materials"),
            ("食品", "Food"), ("建设", "Construction")]  # fmt: skip
LEGAL = ["有限公司", "有限责任公司", "股份有限公司"]
_TRADITIONAL = OpenCC("s2t")
_ALPHABET = "0123456789ABCDEFGHJKLMNPQRTUWXY"


def credit_code(rng: random.Random) -> str:
    """Return a random 统一社会信用代码 with a valid check digit."""
    body = "91" + f"{rng.randrange(110000, 660000)}" + "".join(rng.choice(_ALPHABET) for _ in range(9))
    return body + uscc.calc_check_digit(body)


def pinyin_name(city: str, trade: str, industry_en: str) -> str:
    """Return the English name a firm would register: 'Shenzhen Tengda Technology Co., Ltd.'."""
    spell = "".join(lazy_pinyin(trade)).title()
    return f"{''.join(lazy_pinyin(city)).title()} {spell} {industry_en} Co., Ltd."


def variant(rng: random.Random, city: str, trade: str, industry: tuple[str, str]) -> str:
    """Return one way a record could write the company's name."""
    zh, en = industry
    roll = rng.random()
    if roll < 0.15:
        return f"{trade}{zh}（{city}）{rng.choice(LEGAL)}"
    if roll < 0.30:
        return f"{city}市{trade}{zh}{rng.choice(LEGAL)}"
    if roll < 0.40:
        return _TRADITIONAL.convert(f"{city}{trade}{zh}有限公司")
    if roll < 0.50:
        return f"{city}\u200b{trade}{zh} 有限公司"
    if roll < 0.60:
        return pinyin_name(city, trade, en)
    if roll < 0.68:
        return f"{city}{trade}有限公司"  # the industry word left out
    return f"{city}{trade}{zh}{rng.choice(LEGAL)}"


def generate(companies: int, seed: int = 17) -> tuple[list[dict[str, Any]], list[int]]:
    """Return raw customer records (name, credit_code, phone, email, city) and each record's company."""
    rng = random.Random(seed)
    records: list[dict[str, Any]] = []
    truth: list[int] = []
    used: set[str] = set()
    next_company = [0]  # a counter the nested function can advance

    def firm(city: str, trade: str, industry: tuple[str, str], copies: int, code: str | None = None) -> None:
        company = next_company[0]
        next_company[0] += 1
        code = code or credit_code(rng)
        phone = f"+86{rng.randrange(10**9, 10**10)}"
        domain = f"{''.join(lazy_pinyin(trade))}{company}.com.cn"
        for copy in range(copies):
            name = f"{city}{trade}{industry[0]}有限公司" if copy == 0 else variant(rng, city, trade, industry)
            records.append({
                "name": name,
                "credit_code": code if copy == 0 or rng.random() < 0.5 else None,
                "phone": phone if copy == 0 or rng.random() < 0.6 else None,
                "email": f"sales@{domain}" if rng.random() < 0.5 else None,
                "city": f"{city}市" if rng.random() < 0.7 else None,
            })  # fmt: skip
            truth.append(company)

    while next_company[0] < companies:
        city = rng.choice(CITIES)
        trade = "".join(rng.sample(TRADE, rng.choice([2, 2, 3])))
        industry = rng.choice(INDUSTRY)
        if f"{city}{trade}{industry[0]}" in used:
            continue
        used.add(f"{city}{trade}{industry[0]}")
        firm(city, trade, industry, rng.choice([1, 1, 2, 2, 3, 4]))
        hard = rng.random()
        if hard < 0.10:  # namesake in another city
            firm(rng.choice([c for c in CITIES if c != city]), trade, industry, rng.choice([1, 2]))
        elif hard < 0.18:  # a branch of this company: another customer
            parent = f"{city}{trade}{industry[0]}有限公司"
            records.append({"name": f"{parent}{rng.choice(CITIES)}分公司", "credit_code": credit_code(rng),
                            "phone": f"+86{rng.randrange(10**9, 10**10)}", "email": None, "city": None})  # fmt: skip
            truth.append(next_company[0])
            next_company[0] += 1
        elif hard < 0.26:  # one character away, same city
            other = trade[0] + rng.choice([t for t in TRADE if t != trade[1]])
            if f"{city}{other}{industry[0]}" not in used:
                used.add(f"{city}{other}{industry[0]}")
                firm(city, other, industry, 1)
    return records, truth


def as_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Return the records as linkage rows indexed 1..n."""
    from integration.dedup.customers import linkage_row

    rows = [linkage_row(r["name"], credit_code=r["credit_code"], phone=r["phone"], email=r["email"],
                        city=r["city"]) for r in records]  # fmt: skip
    return pd.DataFrame(rows, index=pd.RangeIndex(1, len(rows) + 1, name="id"))
