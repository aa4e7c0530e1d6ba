"""Customer deduplication on the core: the records linkage sees, default rules, evaluation against truth.

Each active customer becomes one row: the company name split into region | core | branch (see
``normalize``), credit code, phone, e-mail domain (free-mail domains dropped: they say nothing about
the company) and city. The default rules block on credit code, phone, name core and e-mail domain plus
a sorted neighbourhood over the name core, compare the name core by edit distance (one different
character in a four-character trade name is another firm: 腾讯科技 ≠ 腾达科技), and never let a cluster
mix credit codes, regions or branches — those go to a steward instead.
"""

from __future__ import annotations

import csv
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import Engine, select

from crm_core.db import session_factory
from crm_core.models import Customer, ExternalId
from integration.dedup.evaluate import cluster_scores, pair_scores, pairs_of
from integration.dedup.linkage import Comparison, LinkageSpec, link
from integration.dedup.normalize import (
    CompanyName,
    brand_key,
    company_key,
    credit_code_parts,
    has_han,
    name_sound,
    normalize_company_name,
    phone_keys,
    trade_name,
    trade_pinyin,
)
from integration.dedup.spec import CUSTOMER_COLUMNS
from integration.geo import (
    NOWHERE,
    Place,
    area_code_of_city,
    cities_of_area_code,
    city_of_name,
    parse_addresses,
    place_of_division_code,
    place_of_region,
    province_of_city,
)

FREE_MAIL = frozenset({"qq.com", "163.com", "126.com", "sina.com", "sohu.com", "gmail.com", "hotmail.com",
                       "outlook.com", "yahoo.com", "foxmail.com", "139.com", "aliyun.com", "yeah.net"})  # fmt: skip

HEAD_OFFICE = "总部"
RARE_TRADE_NAME = 3  # a trade name carried by at most this many distinct names is distinctive  # a name without a branch marker: never equal to any 分公司, never "unknown"

CUSTOMER_SPEC = LinkageSpec(
    # Candidates: one credit code or organisation code, one phone, one name core, one sound (homophones),
    # one trade name in one city (腾达 / 腾达科技), one street address, one e-mail domain; plus neighbours
    # in name order. A company written in Chinese and in pinyin English is paired by its identifiers and
    # compared on the pinyin trade name (method "name").
    blocks=[
        ("credit_code",),
        ("org_code",),
        ("phone",),
        ("name_core",),
        ("name_sound", "city"),
        ("trade", "city"),
        ("trade_pinyin", "city"),
        ("address_key",),
        ("email_domain",),
    ],
    sorted_neighbourhood=[("name_core", 5)],
    comparisons=[
        Comparison("name_core", "name", (0.999, 0.85), label="name_core_levenshtein"),
        # Term frequency: two rare trade names. Among candidate pairs (which share a name, a sound or a
        # trade name in a city), a pair whose trade names few firms carry is likelier the same firm than
        # one on 华信 or 东方, present in every city. Additive, so the name comparison still decides
        # how close the names are.
        Comparison("trade_rare", "rare", (1.0,)),
        Comparison("credit_code", "identifier", (1.0, 0.9)),
        Comparison("phones", "overlap", (1.0,)),
        Comparison("email_domain", "exact", (1.0,)),
        Comparison("address_key", "exact", (1.0,)),  # the same district and street address
        Comparison("district", "exact", (1.0,)),
    ],
    # Two valid credit codes or two branch markers never share a golden record; two places (city,
    # province from every source of evidence) make a pair distinct (see linkage.link).
    hard_keys=("credit_code", "branch"),
    location_keys=("city", "province"),
    merge_requires=(
        "name_core_levenshtein",
        "credit_code_identifier",
        "phones_overlap",
        "email_domain_exact",
    ),
    # a close name (a slip, a short trade name, the English name) and one shared identifier: one firm
    sure_when=[
        ("name_core_levenshtein", "credit_code_identifier"),
        ("name_core_levenshtein", "phones_overlap"),
        ("name_core_levenshtein", "email_domain_exact"),
    ],
    alike_name="name_core_levenshtein",
    contradicted_by=("phones", "address_key"),
    auto_merge=0.95,
    review=0.5,
)


# The fields of a linkage row (see linkage_rows) that the company name alone decides, each from the name's parts
# (normalize_company_name): what a name-only query (online.query_record(name)) compares, worked out without the
# rest of the row (online.NameIndex). tests/test_online_name_index.py holds them to linkage_rows.
NAME_FIELDS: dict[str, Callable[[CompanyName], Any]] = {
    "name_core": lambda parts: parts.core or None,
    "region": lambda parts: parts.region or None,
    "branch": lambda parts: parts.branch or HEAD_OFFICE,
    "trade": lambda parts: (
        (trade_name(parts.core) if has_han(parts.core) else brand_key(parts.core)) if parts.core else None
    ),
    "name_sound": lambda parts: name_sound(parts.core) if parts.core else None,
    "trade_pinyin": lambda parts: trade_pinyin(parts.core) or None if parts.core else None,
    "trade_rare": lambda parts: trade_pinyin(parts.core) or None if parts.core else None,
}


def linkage_row(
    name: str | None,
    *,
    credit_code: str | None = None,
    phone: str | None = None,
    email: str | None = None,
    city: str | None = None,
    address: str | None = None,
    province: str | None = None,
    district: str | None = None,
    credit_code_as_written: str | None = None,
) -> dict[str, Any]:
    """Return what linkage compares of one customer (see :func:`linkage_rows`)."""
    row = {"name": name, "credit_code": credit_code, "phone": phone, "email": email, "city": city,
           "address": address, "province": province, "district": district,
           "credit_code_as_written": credit_code_as_written}  # fmt: skip
    return linkage_rows([row])[0]


def linkage_rows(customers: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Return what linkage compares of each customer: name parts and keys, identifiers, reconciled location.

    Name: region | core | branch, the trade name (industry words dropped, synonyms unified), its sound
    (toneless pinyin, so homophones are equal). Identifiers: the credit code — the cleaned ``credit_code``,
    else ``credit_code_as_written`` (the cell the mapping's ``uscc`` refused: damaged, 15-digit, 9-character,
    cut short) — and its 9-character organisation code; every phone number of the cell as E.164
    without extension, local numbers completed with the city's area code. Location: the city every source
    of evidence agrees on most — the name's region, the address, the CRM city field (Chinese or pinyin),
    the credit code's division digits, the phone's area code — and the district and street of the address.
    """
    parsed = parse_addresses([c.get("address") for c in customers])
    rows = []
    for customer, (address_place, street) in zip(customers, parsed, strict=True):
        name = customer.get("name")
        parts = normalize_company_name(name or "")
        code = credit_code_parts(customer.get("credit_code") or customer.get("credit_code_as_written"))
        email = customer.get("email")
        domain = email.rsplit("@", 1)[-1].lower() if email and "@" in email else None
        # In order of trust when sources disagree as often: where the firm is written down now (address,
        # city field, the name's region, the phone), then where the credit code says it registered.
        places = [
            address_place,
            Place(province_of_city(field), field)
            if (field := city_of_name(customer.get("city")))
            else NOWHERE,
            place_of_region(parts.region),
            place_of_division_code(code.division),
        ]
        # Bare local numbers are completed from the other evidence first, then the phone votes too.
        city = _reconciled_city(places)
        raw_phone = customer.get("phone")
        phones = phone_keys(raw_phone, area_code_of_city(city))
        area_cities = _area_cities(phones)
        if len(area_cities) == 1:
            places.insert(3, Place(province_of_city(area_cities[0]), area_cities[0]))
            city = _reconciled_city(places)
        elif len(provinces := {p for c in area_cities if (p := province_of_city(c))}) == 1:
            # an area code several cities of one province share (028: 成都, 资阳, 眉山) still places the
            # firm in that province
            places.insert(3, Place(provinces.pop(), None))
        province = province_of_city(city) if city else _reconciled_province(places)
        district = address_place.district or customer.get("district") or None
        core = parts.core or None
        rows.append({
            "name": name, "name_core": core, "region": parts.region or None,
            "branch": parts.branch or HEAD_OFFICE,
            "trade": (trade_name(core) if has_han(core) else brand_key(core)) if core else None,
            "name_sound": name_sound(core) if core else None,
            "trade_pinyin": trade_pinyin(core) or None if core else None,
            # the trade name's term-frequency bucket: rare until linkage_frame counts its holders
            "trade_rare": trade_pinyin(core) or None if core else None,
            "credit_code": code.valid or code.raw, "org_code": code.organisation,
            "phone": phones[0] if phones else None, "phones": " ".join(phones) or None,
            "email_domain": None if domain in FREE_MAIL else domain,
            "city": city, "province": province, "district": district if city else None,
            "address_key": f"{city}|{district}|{_street_key(street)}" if city and district and street else None,
        })  # fmt: skip
    return rows


def _reconciled_city(places: Sequence[Place]) -> str | None:
    """The city most sources name (earlier sources win a tie); None when none names one."""
    # a handful of votes: counted in a list (a Counter per customer costs more than the counting)
    cities = [place.city for place in places if place.city]
    if len(cities) < 2:
        return cities[0] if cities else None
    best = max(cities.count(city) for city in cities)
    return next(city for city in cities if cities.count(city) == best)


def _reconciled_province(places: Sequence[Place]) -> str | None:
    """The province most sources name (the first named of those tied); None when none names one."""
    provinces = [place.province for place in places if place.province]
    if len(provinces) < 2:
        return provinces[0] if provinces else None
    best = max(provinces.count(province) for province in provinces)
    return next(province for province in provinces if provinces.count(province) == best)


def _area_cities(phones: Sequence[str]) -> tuple[str, ...]:
    """The cities the first fixed-line number's area code serves (mobiles say nothing about a place)."""
    for number in phones:
        national = number.removeprefix("+86")
        if national.startswith("1") and not national.startswith("10"):
            continue
        code = national[:2] if national[:1] in "12" else national[:3]
        return cities_of_area_code(code)
    return ()


def _street_key(street: str) -> str:
    """A street and number written one way (NFKC, no spaces or punctuation, case-folded)."""
    return re.sub(r"[\s,，.。#－\-]", "", unicodedata.normalize("NFKC", street)).casefold()


def located_company_keys(records: pd.DataFrame) -> pd.Series:
    """Return each customer's exact-match name key (``normalize.company_key``), the region completed from
    the record's own location when the name has none.

    "腾达科技有限公司" with a Shenzhen address and the same name with a Zhengzhou phone are two companies:
    their keys become ``深圳|腾达科技|`` and ``郑州|腾达科技|`` instead of one ``|腾达科技|`` that the load
    would match on. The location is reconciled as in :func:`linkage_rows` (address, city field, credit
    code or the code as written, phone area code).
    """
    keys = records["name"].map(company_key)
    bare = keys.notna() & keys.str.startswith("|", na=False)
    if not bare.any():
        return keys
    columns = [
        c
        for c in ("credit_code", "credit_code_as_written", "phone", "city", "address")
        if c in records.columns
    ]
    subset = records.loc[bare, ["name", *columns]]
    rows = linkage_rows([{str(k): (v if isinstance(v, str) else None) for k, v in row.items()}
                         for row in subset.to_dict("records")])  # fmt: skip
    regions = pd.Series([_short_city(row["city"]) for row in rows], index=subset.index, dtype=object)
    located = regions.notna()
    keys.loc[located[located].index] = regions[located] + keys.loc[located[located].index]
    return keys


def _short_city(city: str | None) -> str | None:
    """深圳市 → 深圳 (the form a company name writes its region in)."""
    if not city:
        return None
    for suffix in ("市", "地区", "自治州", "盟"):
        if city.endswith(suffix) and len(city) > len(suffix) + 1:
            return city[: -len(suffix)]
    return city


# The core columns a customer's linkage row is computed from (see :func:`linkage_rows`).
SOURCE_COLUMNS = ("name", "credit_code", "phone", "email", "city", "address", "province", "district",
                  "credit_code_as_written")  # fmt: skip


@dataclass(frozen=True)
class CustomerRecords:
    """The active customers as linkage saw them: their linkage rows and the core values behind each row.

    Handed from the first linkage pass of a run to the second look (:func:`read_customer_records`), so a
    customer the merges left as it was is not turned into a linkage row twice.
    """

    frame: pd.DataFrame  # linkage rows (CUSTOMER_COLUMNS), indexed by customer id
    source: pd.DataFrame  # SOURCE_COLUMNS as read from the core, indexed by customer id


def customer_records(engine: Engine) -> pd.DataFrame:
    """Return the active (not merged) customers as linkage rows, indexed by customer id."""
    return read_customer_records(engine).frame


def read_customer_records(engine: Engine, earlier: CustomerRecords | None = None) -> CustomerRecords:
    """Read the active customers and their linkage rows (:func:`customer_records`).

    ``earlier``: what an earlier read of the same core returned. A customer whose core values are still the
    ones its earlier row was computed from keeps that row; only new and changed customers are computed.
    The term-frequency column ``trade_rare`` is always counted afresh over all active customers.
    """
    columns = [getattr(Customer, name) for name in SOURCE_COLUMNS]
    with session_factory(engine)() as session:
        rows = session.execute(
            select(Customer.id, *columns).where(Customer.merged_into_id.is_(None)).order_by(Customer.id)
        ).all()
    index = pd.Index([row[0] for row in rows], name="id", dtype="int64" if rows else None)
    source = pd.DataFrame([row[1:] for row in rows], index=index, columns=list(SOURCE_COLUMNS), dtype=object)
    if not rows:
        return CustomerRecords(linkage_frame([]), source)
    compute = np.ones(len(source), dtype=bool)
    if earlier is not None and len(earlier.source) and not earlier.frame.empty:
        compute = ~_unchanged(source, earlier.source)
    fresh = source[compute]
    computed = linkage_rows(
        [
            dict(zip(SOURCE_COLUMNS, values, strict=True))
            for values in fresh.itertuples(index=False, name=None)
        ]
    )
    if compute.all():
        frame = pd.DataFrame(computed, index=index)
    else:
        kept = earlier.frame.loc[source.index[~compute]]  # type: ignore[union-attr]
        frame = pd.concat([kept, pd.DataFrame(computed, index=fresh.index, columns=kept.columns)]).loc[index]
    return CustomerRecords(_with_trade_rare(frame), source)


def _unchanged(source: pd.DataFrame, earlier: pd.DataFrame) -> np.ndarray:
    """Per customer of ``source``: whether ``earlier`` holds it with the very same core values."""
    position = earlier.index.get_indexer(source.index)
    same = position >= 0
    for column in SOURCE_COLUMNS:
        now = source[column].to_numpy(dtype=object)
        before = earlier[column].to_numpy(dtype=object)[np.where(same, position, 0)]
        same &= (now == before).astype(bool)  # elementwise Python ==, None == None included
    return same


def linkage_frame(customers: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Return linkage rows (see :func:`linkage_rows`) as a frame indexed by ``id``, with ``trade_rare``.

    ``trade_rare`` is the trade name when few distinct names carry it (term-frequency weighting, as
    Splink's term-frequency adjustments: agreeing on 华信, present in every city, says less than agreeing
    on a trade name only one firm has).
    """
    if not customers:
        return pd.DataFrame(columns=list(CUSTOMER_COLUMNS), index=pd.Index([], name="id"))
    rows = linkage_rows(customers)
    return _with_trade_rare(pd.DataFrame(rows, index=pd.Index([c["id"] for c in customers], name="id")))


def _with_trade_rare(frame: pd.DataFrame) -> pd.DataFrame:
    """Set ``trade_rare`` from the trade names' holders in ``frame``; return the linkage columns."""
    holders = frame.groupby("trade_pinyin")["name_core"].nunique()
    rare = frame["trade_pinyin"].map(holders) <= RARE_TRADE_NAME
    trade = frame["trade_pinyin"].to_numpy(dtype=object, copy=True)
    trade[~rare.to_numpy(dtype=bool)] = None  # None, not NaN: missing, as in every other column
    frame["trade_rare"] = trade
    return frame[list(CUSTOMER_COLUMNS)]


def evaluate_against_truth(
    engine: Engine, truth_file: Path, spec: LinkageSpec = CUSTOMER_SPEC
) -> dict[str, Any]:
    """Link the core's customers and score the outcome per source record against a truth CSV.

    The truth file has columns ``source, external_key, company``: source records of one company should
    end up in one customer. A source record's predicted customer is its crosswalk target after linkage.
    """
    records = customer_records(engine)
    result = link(records, spec)
    label = result.labels(records.index)
    with session_factory(engine)() as session:
        crosswalk = {
            (system, key): entity_id
            for system, key, entity_id in session.execute(
                select(ExternalId.system, ExternalId.external_key, ExternalId.entity_id).where(
                    ExternalId.entity == "customer"
                )
            )
        }
        survivors: dict[int, int | None] = {
            customer_id: merged_into for customer_id, merged_into in session.execute(
                select(Customer.id, Customer.merged_into_id)
            )
        }  # fmt: skip
    truth: dict[Any, Any] = {}
    predicted: dict[Any, Any] = {}
    with truth_file.open(encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            record = (row["source"], row["external_key"])
            customer = crosswalk.get(record)
            if customer is None:
                continue  # rejected at load: not part of deduplication
            while (survivor := survivors.get(customer)) is not None:
                customer = survivor
            truth[record] = row["company"]
            predicted[record] = label.get(customer, customer)
    return {
        "records": len(truth),
        "customers_linked": len(records),
        "pairs_compared": result.pairs_compared,
        "reduction_ratio": round(result.reduction_ratio, 4),
        "auto_merge_clusters": len(result.clusters),
        "review_pairs": int((result.band == "review").sum()),
        "pairs": pair_scores(pairs_of(predicted), pairs_of(truth)).as_dict(),
        "clusters": cluster_scores(predicted, truth).as_dict(),
    }
