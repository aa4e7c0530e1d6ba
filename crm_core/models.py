"""The canonical CRM model: SQLAlchemy 2 typed tables that run on SQLite and PostgreSQL.

Nullability follows the annotation (``Mapped[str | None]`` is nullable). Every business row records
the load run that created it and the one that last changed it; ``external_ids`` is the crosswalk
between a core record and its keys in every source system.

Run stamps (``created_run_id``, ``updated_run_id``, ``load_run_id``) carry no foreign key to ``load_runs``
(revision 0013): on PostgreSQL each key cost every bulk-written row a trigger check (a crosswalk COPY took
twice as long), while a stamp is only ever written from the run the loader just created and a run is never
deleted (a rolled-back run is marked). Their indexes stay: rollback, delta and dependency detection query
by run id.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Annotated, Any

from sqlalchemy import (
    JSON,
    Boolean,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    false,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Deterministic constraint names so Alembic migrations are portable between SQLite and PostgreSQL.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

intpk = Annotated[int, mapped_column(Integer, primary_key=True, autoincrement=True)]
Money = Annotated[Decimal, mapped_column(Numeric(18, 2))]
Quantity = Annotated[Decimal, mapped_column(Numeric(18, 4))]
Name = Annotated[str, mapped_column(String(255))]
Code = Annotated[str, mapped_column(String(64))]
Currency = Annotated[str, mapped_column(String(3), default="CNY")]
# The amount and ISO 4217 currency a source gave, kept beside the base-currency amount a mapping's
# ``convert`` computed from them (empty when the amount was not converted).
OriginalAmount = Annotated[Decimal | None, mapped_column(Numeric(18, 2))]
OriginalCurrency = Annotated[str | None, mapped_column(String(3))]
# A finance document's own exchange rate (汇率: base-currency units per unit of its currency), as the ERP gave it.
ExchangeRate = Annotated[Decimal | None, mapped_column(Numeric(18, 8))]
# A refund or red-letter entry (红字): its amount is negative; a negative amount without this mark is rejected.
RedLetter = Annotated[bool, mapped_column(Boolean, default=False, server_default=false())]
Timestamp = Annotated[dt.datetime, mapped_column(DateTime(timezone=True))]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    """Declarative base with the naming convention and shared type map."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 (SQLAlchemy reads it as a plain class attribute)
        dict[str, Any]: JSON,
        dt.date: Date,
        dt.datetime: DateTime(timezone=True),
        str: String(255),
    }


class RunTracked:
    """Columns every business table carries: which load run created and last changed the row."""

    # No ForeignKey("load_runs.id"): see the module docstring.

    created_run_id: Mapped[int | None] = mapped_column(index=True)
    updated_run_id: Mapped[int | None] = mapped_column(index=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=_utcnow, server_default=func.now())
    updated_at: Mapped[dt.datetime] = mapped_column(
        default=_utcnow, server_default=func.now(), onupdate=_utcnow
    )


# --------------------------------------------------------------------------- run bookkeeping


class LoadRun(Base):
    """One load into the core (a Dagster run, a CLI run or a trial run)."""

    __tablename__ = "load_runs"

    id: Mapped[intpk]
    run_key: Mapped[str] = mapped_column(String(64), unique=True)
    project: Mapped[str] = mapped_column(String(128))
    # full | delta | trial | dedup | steward | sync | edit
    mode: Mapped[str] = mapped_column(String(16), default="full")
    status: Mapped[str] = mapped_column(String(16), default="running")  # running|succeeded|failed|rolled_back
    started_at: Mapped[dt.datetime] = mapped_column(default=_utcnow)
    finished_at: Mapped[dt.datetime | None]
    stats: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # The process that owns the run: a run still 'running' whose process is gone has crashed.
    host: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None]


class RowChange(Base):
    """Journal: the before-image of one row a load run inserted, changed or deleted (rollback replays it)."""

    __tablename__ = "row_changes"
    __table_args__ = (Index("ix_row_changes_table_name_row_key", "table_name", "row_key"),)

    id: Mapped[intpk]
    load_run_id: Mapped[int] = mapped_column(index=True)
    table_name: Mapped[str] = mapped_column(String(64))
    row_key: Mapped[str] = mapped_column(String(255))  # the primary key as canonical JSON
    operation: Mapped[str] = mapped_column(String(8))  # insert | update | delete
    before: Mapped[dict[str, Any] | None]  # column values before the change (None for inserts)
    # Written by merges only: the merge this change belongs to, and the values it wrote (changed columns),
    # so one merge can be undone column by column whatever happened after it.
    merge_id: Mapped[int | None] = mapped_column(index=True)
    after: Mapped[dict[str, Any] | None]


class Reject(Base):
    """A source row (or one of its fields) that was not loaded, with the reason: the quarantine."""

    __tablename__ = "rejects"

    id: Mapped[intpk]
    load_run_id: Mapped[int] = mapped_column(index=True)
    source: Mapped[str] = mapped_column(String(64))
    entity: Mapped[str] = mapped_column(String(32))
    location: Mapped[str | None] = mapped_column(String(255))  # table, sheet or file of the source
    row_ref: Mapped[str] = mapped_column(String(255))  # row number or source key
    field: Mapped[str | None] = mapped_column(String(64))
    value: Mapped[str | None] = mapped_column(Text)
    rule: Mapped[str] = mapped_column(String(64))  # mapping | reference | validation rule name
    reason: Mapped[str] = mapped_column(Text)
    severity: Mapped[str] = mapped_column(String(8), default="error")  # error: not loaded; warn: loaded
    raw_row: Mapped[dict[str, Any] | None]  # the source row as read, so it can be fixed and re-imported
    created_at: Mapped[dt.datetime] = mapped_column(default=_utcnow)
    # The mapping that read the row, its crosswalk key when it had one (a correction loaded under that key
    # makes the reject "corrected", see integration.pipeline.reconcile) and its mapped amount when readable.
    mapping: Mapped[str | None] = mapped_column(String(128))
    external_key: Mapped[str | None] = mapped_column(String(255))
    amount: Mapped[Decimal | None] = mapped_column(Numeric(18, 2))


class ExternalId(Base):
    """Crosswalk: one source system's key for one core record, and what was last synced."""

    __tablename__ = "external_ids"
    __table_args__ = (
        UniqueConstraint("entity", "system", "external_key"),
        Index("ix_external_ids_entity_entity_id", "entity", "entity_id"),
    )

    id: Mapped[intpk]
    entity: Mapped[str] = mapped_column(String(32))
    entity_id: Mapped[int]
    system: Mapped[str] = mapped_column(String(64))
    external_key: Mapped[str] = mapped_column(String(255))
    # created: this source row created the core record; matched:<key>: it was merged into an existing one.
    match_method: Mapped[str] = mapped_column(String(64), default="created")
    last_synced_hash: Mapped[str | None] = mapped_column(String(64))
    last_synced_at: Mapped[dt.datetime | None]
    created_run_id: Mapped[int | None]
    updated_run_id: Mapped[int | None]
    # The fix mapping (``system:`` naming another source) whose corrected row last wrote this key; the source's
    # own mapping clears it. A reject of the source under this key is then corrected, not quarantined.
    corrected_by: Mapped[str | None] = mapped_column(String(128))


class Watermark(Base):
    """Incremental extraction cursor per (source, stream); advanced only after the load commits."""

    __tablename__ = "watermarks"

    source: Mapped[str] = mapped_column(String(64), primary_key=True)
    stream: Mapped[str] = mapped_column(String(128), primary_key=True)
    cursor_value: Mapped[str | None] = mapped_column(Text)
    load_run_id: Mapped[int | None]
    updated_at: Mapped[dt.datetime] = mapped_column(default=_utcnow, onupdate=_utcnow)


class MappingFingerprint(Base):
    """What one mapping's input and settings were when a load run last read and loaded it.

    A full run skips a mapping whose fingerprint equals the one of the last run that loaded it (see
    ``integration.rerun``). The row carries the loading run's id in ``created_run_id``, so rolling that run
    back (or its failure) deletes it: a fingerprint only counts while the rows it describes are in the core.
    """

    __tablename__ = "mapping_fingerprints"
    __table_args__ = (Index("ix_mapping_fingerprints_project_mapping", "project", "mapping"),)

    id: Mapped[intpk]
    created_run_id: Mapped[int] = mapped_column(index=True)
    project: Mapped[str] = mapped_column(String(128))
    mapping: Mapped[str] = mapped_column(String(128))  # the mapping file's name without extension
    entity: Mapped[str] = mapped_column(String(32))
    system: Mapped[str] = mapped_column(String(64))  # the crosswalk system its rows belong to
    # None: the run loaded the mapping without a provable fingerprint (delta, trial, a REST source…)
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    locations: Mapped[list[Any]] = mapped_column(
        JSON, default=list
    )  # the tables/sheets/files its rows came from
    # The load's outcome may change with the core although the input does not (rows held for a steward,
    # unresolved references, names looked up): such a mapping is skipped only while the core stands still.
    depends_on_core: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(default=_utcnow)


# --------------------------------------------------------------------------- master data


class Stage(Base):
    """Opportunity stage master: what a stage means for probability and forecasting."""

    __tablename__ = "stages"

    code: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    name_zh: Mapped[str] = mapped_column(String(64))
    sort_order: Mapped[int]
    default_probability: Mapped[int]  # percent, 0..100
    forecast_category: Mapped[str] = mapped_column(String(16))  # pipeline|best_case|commit|closed|omitted
    is_closed: Mapped[bool] = mapped_column(Boolean, default=False)
    is_won: Mapped[bool] = mapped_column(Boolean, default=False)


class SalesRep(RunTracked, Base):
    """A sales representative / record owner."""

    __tablename__ = "sales_reps"

    id: Mapped[intpk]
    code: Mapped[str | None] = mapped_column(String(64), index=True)
    name: Mapped[Name]
    email: Mapped[str | None]
    phone: Mapped[str | None] = mapped_column(String(32))
    department: Mapped[str | None]
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    merged_into_id: Mapped[int | None] = mapped_column(ForeignKey("sales_reps.id"), index=True)


class Customer(RunTracked, Base):
    """A company customer; branches (分公司) point at their parent, merged duplicates at the survivor."""

    __tablename__ = "customers"

    id: Mapped[intpk]
    name: Mapped[Name]
    name_normalized: Mapped[str | None] = mapped_column(String(255), index=True)
    short_name: Mapped[str | None]
    english_name: Mapped[str | None]
    credit_code: Mapped[str | None] = mapped_column(String(18), index=True)  # 统一社会信用代码
    # The source's credit-code cell as written (compacted), kept where ``credit_code`` stays empty because
    # the code is damaged, a 15-digit registration number or a 9-character organisation code: linkage
    # compares it as an identifier (near-matches); it is never validated as a 统一社会信用代码.
    credit_code_as_written: Mapped[str | None] = mapped_column(String(64))
    phone: Mapped[str | None] = mapped_column(String(32))  # E.164
    email: Mapped[str | None]
    website: Mapped[str | None]
    address: Mapped[str | None] = mapped_column(String(512))
    province: Mapped[str | None] = mapped_column(String(32))
    city: Mapped[str | None] = mapped_column(String(32))
    district: Mapped[str | None] = mapped_column(String(32))
    industry: Mapped[str | None] = mapped_column(String(64))
    is_branch: Mapped[bool] = mapped_column(Boolean, default=False)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("customers.id"), index=True)
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("sales_reps.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="active")  # active | inactive | prospect
    merged_into_id: Mapped[int | None] = mapped_column(ForeignKey("customers.id"), index=True)
    # Usually owned by the ERP and synced in: its customer code, credit limit (信用额度) and payment terms.
    erp_code: Mapped[str | None] = mapped_column(String(64), index=True)
    credit_limit: Mapped[Money | None]
    payment_terms: Mapped[str | None] = mapped_column(String(64))

    owner: Mapped[SalesRep | None] = relationship(foreign_keys=[owner_id])
    contacts: Mapped[list[Contact]] = relationship(back_populates="customer")


class Contact(RunTracked, Base):
    """A person at a customer."""

    __tablename__ = "contacts"

    id: Mapped[intpk]
    customer_id: Mapped[int | None] = mapped_column(ForeignKey("customers.id"), index=True)
    name: Mapped[Name]
    title: Mapped[str | None] = mapped_column(String(128))
    department: Mapped[str | None] = mapped_column(String(128))
    mobile: Mapped[str | None] = mapped_column(String(32))  # E.164
    phone: Mapped[str | None] = mapped_column(String(32))  # E.164
    email: Mapped[str | None]
    is_primary: Mapped[bool] = mapped_column(Boolean, default=False)
    merged_into_id: Mapped[int | None] = mapped_column(ForeignKey("contacts.id"), index=True)

    customer: Mapped[Customer | None] = relationship(back_populates="contacts")


# --------------------------------------------------------------------------- pipeline and orders


class Opportunity(RunTracked, Base):
    """A sales opportunity (商机); stage semantics come from the stage master."""

    __tablename__ = "opportunities"

    id: Mapped[intpk]
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"), index=True)
    name: Mapped[Name]
    stage_code: Mapped[str] = mapped_column(ForeignKey("stages.code"))
    probability: Mapped[int | None]  # overrides the stage default when set
    amount: Mapped[Money | None]  # in the base currency
    currency: Mapped[Currency]
    original_amount: Mapped[OriginalAmount]
    original_currency: Mapped[OriginalCurrency]
    expected_close_date: Mapped[dt.date | None]
    closed_on: Mapped[dt.date | None]
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("sales_reps.id"), index=True)
    registered_at: Mapped[dt.datetime | None]  # 商机报备
    registered_by_id: Mapped[int | None] = mapped_column(ForeignKey("sales_reps.id"), index=True)
    lead_source: Mapped[str | None] = mapped_column(String(64))
    description: Mapped[str | None] = mapped_column(Text)
    erp_order_no: Mapped[str | None] = mapped_column(String(64))  # the ERP's sales order for a won deal

    stage: Mapped[Stage] = relationship()
    customer: Mapped[Customer] = relationship()


class SalesOrder(RunTracked, Base):
    """A sales order (销售订单), usually owned by the ERP."""

    __tablename__ = "sales_orders"

    id: Mapped[intpk]
    order_no: Mapped[Code]
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"), index=True)
    opportunity_id: Mapped[int | None] = mapped_column(ForeignKey("opportunities.id"), index=True)
    order_date: Mapped[dt.date | None]
    currency: Mapped[Currency]
    total_amount: Mapped[Money | None]
    original_amount: Mapped[OriginalAmount]  # of total_amount
    original_currency: Mapped[OriginalCurrency]
    status: Mapped[str | None] = mapped_column(String(32))
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("sales_reps.id"), index=True)
    shipment_status: Mapped[str | None] = mapped_column(String(16))  # none | partial | shipped
    invoice_status: Mapped[str | None] = mapped_column(String(16))  # none | partial | invoiced

    lines: Mapped[list[SalesOrderLine]] = relationship(back_populates="order")


class SalesOrderLine(RunTracked, Base):
    """One line of a sales order."""

    __tablename__ = "sales_order_lines"

    id: Mapped[intpk]
    order_id: Mapped[int] = mapped_column(ForeignKey("sales_orders.id"), index=True)
    line_no: Mapped[int]
    product_code: Mapped[str | None] = mapped_column(String(64))
    product_name: Mapped[str | None]
    quantity: Mapped[Quantity | None]
    unit_price: Mapped[Quantity | None]
    amount: Mapped[Money | None]
    tax_rate: Mapped[Decimal | None] = mapped_column(Numeric(6, 4))
    original_amount: Mapped[OriginalAmount]
    original_currency: Mapped[OriginalCurrency]

    order: Mapped[SalesOrder] = relationship(back_populates="lines")


class Receivable(RunTracked, Base):
    """An amount a customer owes (应收), usually from an order or invoice."""

    __tablename__ = "receivables"

    id: Mapped[intpk]
    receivable_no: Mapped[Code]
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"), index=True)
    order_id: Mapped[int | None] = mapped_column(ForeignKey("sales_orders.id"), index=True)
    invoiced_on: Mapped[dt.date | None]  # 业务日期: the document's date
    due_date: Mapped[dt.date | None]
    amount: Mapped[Money]
    currency: Mapped[Currency]
    exchange_rate: Mapped[ExchangeRate]
    red_letter: Mapped[RedLetter]
    original_amount: Mapped[OriginalAmount]
    original_currency: Mapped[OriginalCurrency]
    status: Mapped[str | None] = mapped_column(String(32))


class Payment(RunTracked, Base):
    """Money received from a customer (回款)."""

    __tablename__ = "payments"

    id: Mapped[intpk]
    payment_no: Mapped[Code]
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"), index=True)
    received_on: Mapped[dt.date | None]
    amount: Mapped[Money]
    currency: Mapped[Currency]
    exchange_rate: Mapped[ExchangeRate]
    red_letter: Mapped[RedLetter]
    original_amount: Mapped[OriginalAmount]
    original_currency: Mapped[OriginalCurrency]
    method: Mapped[str | None] = mapped_column(String(32))
    reference: Mapped[str | None] = mapped_column(String(128))


class PaymentApplication(RunTracked, Base):
    """The part of a payment applied to one receivable (核销)."""

    __tablename__ = "payment_applications"
    __table_args__ = (UniqueConstraint("payment_id", "receivable_id"),)

    id: Mapped[intpk]
    payment_id: Mapped[int] = mapped_column(ForeignKey("payments.id"), index=True)
    receivable_id: Mapped[int] = mapped_column(ForeignKey("receivables.id"), index=True)
    amount: Mapped[Money]
    red_letter: Mapped[RedLetter]


# --------------------------------------------------------------------------- deduplication


class MatchCandidate(Base):
    """A pair of records that may be the same: scored by linkage, decided automatically or by a steward."""

    __tablename__ = "match_candidates"
    __table_args__ = (UniqueConstraint("entity", "left_id", "right_id"),)

    id: Mapped[intpk]
    entity: Mapped[str] = mapped_column(String(32))
    left_id: Mapped[int]  # the smaller id of the pair
    right_id: Mapped[int]
    probability: Mapped[float]
    features: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # review: waiting for a steward | merged | distinct (a steward said no: never proposed again)
    status: Mapped[str] = mapped_column(String(16), default="review", index=True)
    decided_by: Mapped[str | None] = mapped_column(String(64))
    decided_at: Mapped[dt.datetime | None]
    load_run_id: Mapped[int | None]


class MergeLog(Base):
    """One record merged into a survivor: who, when, why; its journal entries carry ``merge_id`` = this id."""

    __tablename__ = "merge_log"
    # Stewards and audit notes name merges by id ("undid merge 17"): on SQLite a rolled-back run's merge ids
    # would otherwise be handed out again (the largest id + 1); PostgreSQL's sequence never reuses one.
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[intpk]
    entity: Mapped[str] = mapped_column(String(32))
    survivor_id: Mapped[int] = mapped_column(index=True)
    merged_id: Mapped[int] = mapped_column(index=True)
    probability: Mapped[float | None]
    reason: Mapped[str] = mapped_column(Text)  # auto-merge above threshold | steward decision
    decided_by: Mapped[str] = mapped_column(String(64))
    load_run_id: Mapped[int]
    first_change_id: Mapped[int | None]  # merges before revision 0004 only: their row_changes first..last
    last_change_id: Mapped[int | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=_utcnow)
    undone_at: Mapped[dt.datetime | None]


class MergeLink(Base):
    """A contact merge that follows from a customer merge: the customer merge brought one of the two contacts,
    not the other, under the customer they share. Undoing the customer merge undoes the contact merge first
    (a contact merge joining the contacts of two merged customers follows from both customer merges)."""

    __tablename__ = "merge_links"

    merge_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)  # the contact merge
    follows_merge_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False, index=True)


class ReferenceDecision(Base):
    """A name source rows give for a record (an opportunity's customer) that resolved to no single record.

    The rows wait (held, not rejected) until a data steward links the name to a record (``linked``) or says
    no record is meant (``no_match``, the rows are then rejected); one decision covers every row that writes
    the name the same way (``name_key``), in this run and the next ones.
    """

    __tablename__ = "reference_decisions"
    __table_args__ = (UniqueConstraint("entity", "name_key"),)

    id: Mapped[intpk]
    entity: Mapped[str] = mapped_column(String(32))  # the entity the name refers to (customer)
    name: Mapped[str] = mapped_column(String(255))  # as a source row wrote it
    name_key: Mapped[str] = mapped_column(String(255))  # normalized: the rows one decision covers
    # [{"id": 12, "name": "...", "probability": 0.81}, ...] best first, from the match index
    candidates: Mapped[list[Any]] = mapped_column(JSON, default=list)
    # pending | linked (target_id) | no_match
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    target_id: Mapped[int | None]  # the record a steward linked the name to (merges are followed)
    rows_held: Mapped[int] = mapped_column(default=0)  # rows waiting on it in the run that last saw it
    amount_held: Mapped[Decimal | None] = mapped_column(Numeric(18, 2))
    decided_by: Mapped[str | None] = mapped_column(String(64))
    decided_at: Mapped[dt.datetime | None]
    load_run_id: Mapped[int | None] = mapped_column(index=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=_utcnow)


# --------------------------------------------------------------------------- sync with ERP and finance


class SyncOutbox(Base):
    """One change of a core record waiting to be delivered to a target system (or delivered, or dead).

    Rows are captured from committed load runs (see integration/sync/capture.py); ``trade_id`` is stored
    before the first send, so a resend after a crash replays the same request and the target applies it once.
    """

    __tablename__ = "sync_outbox"
    __table_args__ = (
        Index("ix_sync_outbox_target_status_next_attempt_at", "target", "status", "next_attempt_at"),
        Index("ix_sync_outbox_target_entity_entity_id", "target", "entity", "entity_id"),
    )

    id: Mapped[intpk]
    target: Mapped[str] = mapped_column(String(64))
    entity: Mapped[str] = mapped_column(String(32))
    entity_id: Mapped[int]
    operation: Mapped[str] = mapped_column(String(32))  # e.g. customer/add, customer/edit, saleorder/add
    payload: Mapped[dict[str, Any]]
    payload_hash: Mapped[str] = mapped_column(String(64))
    # The core values of the fields the payload carries: what the target holds once it is applied.
    core_values: Mapped[dict[str, Any]] = mapped_column(default=dict)
    idempotency_key: Mapped[str] = mapped_column(String(128), unique=True)
    trade_id: Mapped[str | None] = mapped_column(String(64))
    # pending | waiting (for a record it needs, e.g. the customer's ERP code) | awaiting (async result) |
    # done | dead | superseded (a newer document of the record replaced it before it was sent, or replaced its
    # dead letter) | discarded (a dead letter a person gave up: crmi sync discard, who and why in last_error)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(default=_utcnow)
    last_error: Mapped[str | None] = mapped_column(Text)
    external_key: Mapped[str | None] = mapped_column(String(255))
    load_run_id: Mapped[int | None] = mapped_column(index=True)  # captured by
    created_at: Mapped[dt.datetime] = mapped_column(default=_utcnow)
    delivered_at: Mapped[dt.datetime | None]


class SyncState(Base):
    """What one record and a target system last agreed on: the values exchanged and the payload's hash.

    Echo suppression compares a new payload's hash with ``payload_hash``; conflict detection compares both
    sides' current values with ``core_values`` (a field changed on a side differs from what was exchanged).
    """

    __tablename__ = "sync_state"

    target: Mapped[str] = mapped_column(String(64), primary_key=True)
    entity: Mapped[str] = mapped_column(String(32), primary_key=True)
    entity_id: Mapped[int] = mapped_column(primary_key=True)
    external_key: Mapped[str | None] = mapped_column(String(255))
    payload_hash: Mapped[str | None] = mapped_column(String(64))
    core_values: Mapped[dict[str, Any]] = mapped_column(default=dict)
    load_run_id: Mapped[int | None] = mapped_column(index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(default=_utcnow, onupdate=_utcnow)


class SyncConflict(Base):
    """A field both sides changed since their last exchange: resolved by ownership, or open for a person."""

    __tablename__ = "sync_conflicts"

    id: Mapped[intpk]
    target: Mapped[str] = mapped_column(String(64))
    entity: Mapped[str] = mapped_column(String(32))
    entity_id: Mapped[int] = mapped_column(index=True)
    field: Mapped[str] = mapped_column(String(64))
    exchanged_value: Mapped[str | None] = mapped_column(Text)  # what both sides held after the last exchange
    crm_value: Mapped[str | None] = mapped_column(Text)
    target_value: Mapped[str | None] = mapped_column(Text)
    owner: Mapped[str | None] = mapped_column(String(64))  # crm | the target | None: a person decides
    # resolved_crm | resolved_target (by ownership) | open | decided_crm | decided_target (by a person)
    status: Mapped[str] = mapped_column(String(16), index=True)
    decided_by: Mapped[str | None] = mapped_column(String(64))
    decided_at: Mapped[dt.datetime | None]
    load_run_id: Mapped[int | None] = mapped_column(index=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=_utcnow)
