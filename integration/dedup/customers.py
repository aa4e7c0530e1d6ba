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
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import Engine, select

from crm_core.db import session_factory
from crm_core.models import Customer, ExternalId
from integration.dedup.evaluate import cluster_scores, pair_scores, pairs_of
from integration.dedup.linkage import Comparison, LinkageSpec, link
from integration.dedup.normalize import normalize_company_name
from integration.dedup.spec import CUSTOMER_COLUMNS

FREE_MAIL = frozenset({"qq.com", "163.com", "126.com", "sina.com", "sohu.com", "gmail.com", "hotmail.com",
                       "outlook.com", "yahoo.com", "foxmail.com", "139.com", "aliyun.com", "yeah.net"})  # fmt: skip

HEAD_OFFICE = "总部"  # a name without a branch marker: never equal to any 分公司, never "unknown"

CUSTOMER_SPEC = LinkageSpec(
    blocks=[("credit_code",), ("phone",), ("name_core",), ("email_domain",)],
    # A company written in Chinese and in pinyin English is paired by its credit code, phone or e-mail
    # domain and then compared on the pinyin trade name (method "name"). Indexing on the pinyin itself
    # pairs every 同创医疗 with every 同创贸易 in a city: ECM then learns "same city" as the match signal.
    sorted_neighbourhood=[("name_core", 5)],
    comparisons=[
        Comparison("name_core", "name", (0.999, 0.85), label="name_core_levenshtein"),
        Comparison("credit_code", "exact", (1.0,)),
        Comparison("phone", "exact", (1.0,)),
        Comparison("email_domain", "exact", (1.0,)),
        # City and branch are not compared: the city repeats the region (ECM assumes independent
        # evidence and counted it twice, so "same city" alone scored 1.0), and nearly every name is a
        # head office. Both still guard as hard keys (region, branch).
        Comparison("region", "exact", (1.0,)),
    ],
    hard_keys=("credit_code", "region", "branch"),
    auto_merge=0.95,
    review=0.5,
)


def linkage_row(
    name: str | None,
    *,
    credit_code: str | None = None,
    phone: str | None = None,
    email: str | None = None,
    city: str | None = None,
) -> dict[str, Any]:
    """Return what linkage compares of one customer: name parts, keys, e-mail domain (not free mail)."""
    parts = normalize_company_name(name or "")
    domain = email.rsplit("@", 1)[-1].lower() if email and "@" in email else None
    return {
        "name": name, "name_core": parts.core or None, "region": parts.region or None,
        "branch": parts.branch or HEAD_OFFICE, "credit_code": credit_code or None, "phone": phone or None,
        "email_domain": None if domain in FREE_MAIL else domain, "city": city or None,
    }  # fmt: skip


def customer_records(engine: Engine) -> pd.DataFrame:
    """Return the active (not merged) customers as linkage rows, indexed by customer id."""
    with session_factory(engine)() as session:
        rows = session.execute(
            select(Customer.id, Customer.name, Customer.credit_code, Customer.phone, Customer.email, Customer.city)
            .where(Customer.merged_into_id.is_(None)).order_by(Customer.id)
        ).all()  # fmt: skip
    records = [
        {"id": customer_id, **linkage_row(name, credit_code=credit_code, phone=phone, email=email, city=city)}
        for customer_id, name, credit_code, phone, email, city in rows
    ]
    columns = list(CUSTOMER_COLUMNS)
    if not records:
        return pd.DataFrame(columns=columns, index=pd.Index([], name="id"))
    return pd.DataFrame.from_records(records, index="id")


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
