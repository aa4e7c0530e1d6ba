"""Deduplicating contacts with record linkage: the same person entered twice under one customer.

After customers merge, their contacts sit under one golden customer and often repeat (王芳 from the ERP,
王 芳 with the same mobile from the spreadsheet). Contacts are linked within a customer only (the
customer is a hard key: two customers' contacts never merge), compared on the person's name, mobile,
phone and e-mail, scored by the same ECM classifier and banded like customers; sure clusters merge
into the most complete contact (``crm_core.merging.order_members``, which steward merges use too), the
rest wait in the review queue (entity ``contact``).
"""

from __future__ import annotations

import pandas as pd
from sqlalchemy import Engine, select

from crm_core.db import session_factory
from crm_core.models import Contact
from integration.dedup.linkage import Comparison, LinkageSpec
from integration.dedup.normalize import person_key
from integration.dedup.workflow import DedupOutcome, link_and_record, merge_clusters

CONTACT_COLUMNS = ("customer_id", "name_key", "mobile", "phone", "email")
# Every pair of contacts of one customer is compared, and only those: a customer has tens of contacts,
# not thousands, and pairs across customers are namesakes (王芳 is everywhere), which would teach the
# classifier that a name alone makes a match.
CONTACT_SPEC = LinkageSpec(
    blocks=[("customer_id",)],
    comparisons=[
        Comparison("name_key", "jaro_winkler", (0.999, 0.9)),
        Comparison("mobile", "exact", (1.0,)),
        Comparison("phone", "exact", (1.0,)),
        Comparison("email", "exact", (1.0,)),
    ],
    hard_keys=("customer_id",),
    # Two names sharing an e-mail or a desk phone (a company mailbox, a switchboard) are two people: distinct
    # when their mobiles differ, else a steward's call; never merged on that alone.
    merge_needs=("name_key_jaro_winkler", "mobile_exact"),
    differ_on=("mobile",),
    merge_needs_reason="names differ and no mobile in common (one is missing): a shared e-mail or phone alone is no match",
    auto_merge=0.95,
    review=0.5,
)


def contact_records(engine: Engine) -> pd.DataFrame:
    """Return the active (not merged) contacts as linkage rows, indexed by contact id."""
    with session_factory(engine)() as session:
        rows = session.execute(
            select(Contact.id, Contact.customer_id, Contact.name, Contact.mobile, Contact.phone, Contact.email)
            .where(Contact.merged_into_id.is_(None)).order_by(Contact.id)
        ).all()  # fmt: skip
    records = [
        {"id": contact_id, "customer_id": customer_id, "name_key": person_key(name), "mobile": mobile or None,
         "phone": phone or None, "email": email.strip().casefold() if email and email.strip() else None}
        for contact_id, customer_id, name, mobile, phone, email in rows
    ]  # fmt: skip
    if not records:
        return pd.DataFrame(columns=list(CONTACT_COLUMNS), index=pd.Index([], name="id"))
    return pd.DataFrame.from_records(records, index="id")


def deduplicate_contacts(
    engine: Engine,
    run_key: str,
    project: str,
    *,
    spec: LinkageSpec = CONTACT_SPEC,
    mode: str = "full",
    only_if_changed: bool = False,
) -> DedupOutcome:
    """Link the active contacts within each customer, record candidates, merge the sure clusters.

    A delta run links only the contacts it created or changed (and those of customers it changed).
    """
    candidates = link_and_record(
        engine,
        run_key,
        project,
        "contact",
        contact_records(engine),
        spec,
        mode=mode,
        only_if_changed=only_if_changed,
    )
    if not candidates.clusters:
        return candidates.outcome
    return merge_clusters(engine, run_key, project, candidates, mode=mode, entity="contact")
