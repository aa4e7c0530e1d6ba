"""Deduplicating contacts with record linkage: the same person entered twice under one customer.

After customers merge, their contacts sit under one golden customer and often repeat (王芳 from the ERP,
王 芳 with the same mobile from the spreadsheet). Contacts are linked within a customer only (the
customer is a hard key: two customers' contacts never merge), compared on the person's name, mobile,
phone and e-mail, scored by the same ECM classifier and banded like customers; sure clusters merge
into the most complete contact (``crm_core.merging.order_members``, which steward merges use too), the
rest wait in the review queue (entity ``contact``). A contact merge that joins contacts a customer merge brought
under one customer is linked to that merge (``merge_links``, written by ``crm_core.merging.merge_plans``):
undoing the customer merge undoes the contact merge first.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Sequence

import pandas as pd
from sqlalchemy import Connection, Engine, func, or_, select
from sqlalchemy.orm import Session

from crm_core.merging import contacts_after, decided_pairs, load_members, merge_plans, record_candidates
from crm_core.models import Contact, LoadRun, MergeLog
from integration.dedup.linkage import TRAINING_SAMPLE, Comparison, LinkageSpec, link
from integration.dedup.normalize import person_key
from integration.dedup.workflow import (
    DedupOutcome,
    cluster_plan,
    link_and_record,
    lowest_scores,
    merge_clusters,
    scored_pairs,
    steward_labels,
)

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
    with engine.connect() as connection:
        return read_contact_records(connection)


def read_contact_records(connection: Connection, customers: Collection[int] | None = None) -> pd.DataFrame:
    """Return the active contacts as linkage rows (as this connection's transaction sees them), by contact id.

    With ``customers``: those customers' contacts, and an evenly spread sample of at most
    :data:`~integration.dedup.linkage.TRAINING_SAMPLE` others for the classifier's fit (what a delta's
    linkage would draw from all of them), so the read stays the same size however many contacts the core holds.
    """
    query = select(
        Contact.id, Contact.customer_id, Contact.name, Contact.mobile, Contact.phone, Contact.email
    )
    active = Contact.merged_into_id.is_(None)
    if customers is None:
        rows = connection.execute(query.where(active).order_by(Contact.id)).all()
    else:
        total = connection.scalar(select(func.count()).select_from(Contact).where(active)) or 0
        stride = max(1, -(-total // TRAINING_SAMPLE))
        rows = connection.execute(
            query.where(active, or_(Contact.customer_id.in_(list(customers)), Contact.id % stride == 0))
            .order_by(Contact.id)
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


def dedup_after_steward_merge(
    session: Session,
    run: LoadRun,
    customer_merges: Sequence[int],
    *,
    decided_by: str,
    spec: LinkageSpec = CONTACT_SPEC,
) -> list[int]:
    """Deduplicate the contacts of the golden customers of a steward's customer merges, in its transaction.

    The contacts are linked and merged as the automatic contact dedup does (the same spec, classifier,
    bands, candidates and survivor), limited to the customers these merges kept. Each contact merge's reason
    names these customer merges (``crm_core.merging.contacts_after``, for people); ``merge_links`` ties it to
    the ones it follows from, as for every contact merge, so undoing one of those undoes it too
    (``crm_core.merging.undo_merge``). Returns the contact merges' ids.
    """
    if not customer_merges:
        return []
    connection = session.connection()
    merges_of: dict[int, list[int]] = defaultdict(list)
    for merge_id, survivor_id in connection.execute(
        select(MergeLog.id, MergeLog.survivor_id).where(
            MergeLog.id.in_(list(customer_merges)), MergeLog.entity == "customer"
        )
    ):
        merges_of[survivor_id].append(merge_id)
    records = read_contact_records(connection, list(merges_of))
    if records.empty:
        return []
    focus = records.index[records["customer_id"].isin(list(merges_of))]
    if len(focus) < 2:
        return []
    result = link(
        records, spec, decided_pairs(session, "contact", "distinct"), steward_labels(session, spec, "contact"),
        focus=focus, queued=decided_pairs(session, "contact", "review"),
    )  # fmt: skip
    scored = scored_pairs(result, records.index)
    record_candidates(session, run, "contact", scored)
    clusters = [[int(i) for i in cluster] for cluster in result.clusters]
    if not clusters:
        return []
    owner = {int(i): int(c) for i, c in records.loc[focus, "customer_id"].items()}
    members = load_members(session.connection(), Contact, [i for ids in clusters for i in ids])
    plans = [
        cluster_plan(Contact, members, ids, probability=probability, decided_by=decided_by,
                     reason=contacts_after(merges_of[owner[ids[0]]]))
        for ids, probability in zip(clusters, lowest_scores(clusters, scored), strict=True)
    ]  # fmt: skip
    return merge_plans(session, run, Contact, plans, members)
