"""The ``sync:`` section of project.yaml: which target systems the core stays in step with, and how.

Per target: the transport (``u8_openapi``, ``k3cloud``), the crosswalk system its keys live under (the project source
the inbound mappings read), schedules, retry policy, and per entity the direction, field ownership, the
inbound mappings (existing mapping files with an incremental cursor) and the outbound mapping (core fields
→ the target's document, written with the mapping engine's field syntax and transform library).

Everything is checked when the project loads; a problem is ``file:line:col: path: message``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from crm_core.edits import OwnedField
from crm_core.entities import ENTITIES, EntityDef, FieldDef
from crm_core.errors import ConfigError, Problem
from integration.mappings.spec import CompiledMapping, FieldSpec
from integration.yamlconf import DocPath, LocatedDocument, close_names, format_path, time_zone

CRM = "crm"  # the owner name of fields the CRM owns
OPERATIONS = (
    "customer/add", "customer/edit", "saleorder/add",  # u8_openapi
    "BD_Customer/add", "BD_Customer/edit",  # k3cloud: Save without / with the record's K3Cloud id
)  # fmt: skip
# What the outbound mapping of an entity reads besides its own columns: '<reference>.<field>' of the
# record a reference points at (e.g. customer.erp_code on an opportunity).
OUTBOUND_ENTITIES = ("customer", "opportunity")
INBOUND_ENTITIES = (
    "customer", "contact", "sales_order", "sales_order_line", "opportunity",
    "receivable", "payment", "payment_application",  # finance (k3cloud): 应收单, 收款单 and its write-offs
)  # fmt: skip
DEFAULT_TIMEZONE = "Asia/Shanghai"
# The record's key in the target (its crosswalk key under the target's system), empty until the target
# knows the record; '<reference>._key' is the referenced record's.
KEY_COLUMN = "_key"
_CRON = re.compile(r"^\s*(\S+\s+){4}\S+\s*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class U8Transport(_Strict):
    """Yonyou U8 OpenAPI: token from app key/secret, one trade id per request (see docs/u8_openapi.md)."""

    profile: Literal["u8_openapi"]
    secret_fields: ClassVar[tuple[str, ...]] = ("app_secret",)  # ${ENV_VAR} only
    base_url: str
    from_account: str
    to_account: str
    app_key: str = Field(description="${ENV_VAR} recommended")
    app_secret: str = Field(description="a secret: ${ENV_VAR} only")
    ds_sequence: int | None = None
    batch_size: int = Field(default=100, ge=1, le=1000)
    timeout: float = Field(default=10.0, gt=0)


class K3CloudTransport(_Strict):
    """Kingdee K3Cloud WebAPI: a session by user/password or app id/secret (see docs/k3cloud.md)."""

    profile: Literal["k3cloud"]
    secret_fields: ClassVar[tuple[str, ...]] = ("password", "app_secret")  # ${ENV_VAR} only
    base_url: str = Field(description="the K3Cloud site, e.g. http://erp.example.com/k3cloud")
    acct_id: str = Field(description="数据中心 ID (acctID)")
    username: str
    password: str | None = Field(default=None, description="a secret: ${ENV_VAR} only (ValidateUser)")
    app_id: str | None = Field(default=None, description="第三方系统登录授权 app id (LoginByAppSecret)")
    app_secret: str | None = Field(default=None, description="a secret: ${ENV_VAR} only")
    lcid: int = 2052
    org_num: str = Field(default="0", description="organisation number when the data centre has several")
    audit: Literal["none", "auto", "explicit"] = Field(
        default="auto",
        description="auto: Save with IsAutoSubmitAndAudit; explicit: Save, then Submit and Audit; none: saved only",
    )
    crm_key_field: str | None = Field(
        default=None,
        description="the K3Cloud field holding our record id (e.g. F_CRM_ID): an add sent again is found by it",
    )
    batch_size: int = Field(default=100, ge=1, le=1000)
    timeout: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _one_login(self) -> K3CloudTransport:
        if not self.password and not (self.app_id and self.app_secret):
            raise ValueError("give password (ValidateUser) or app_id and app_secret (LoginByAppSecret)")
        return self


class Schedule(_Strict):
    """When Dagster runs the sync jobs (cron in the given time zone)."""

    inbound: str | None = Field(default=None, description="cron, e.g. '*/10 * * * *'")
    outbound: str | None = Field(
        default=None, description="cron; the outbox sensor also starts outbound runs"
    )
    timezone: str = DEFAULT_TIMEZONE

    @field_validator("inbound", "outbound")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None and not _CRON.match(value):
            raise ValueError(f"'{value}' is not a cron expression (five fields, e.g. '*/10 * * * *')")
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        return time_zone(value)


class RetryPolicy(_Strict):
    """Bounded retries of a delivery that failed in transport: exponential backoff, Retry-After honoured."""

    max_attempts: int = Field(default=8, ge=1, le=100)
    backoff_seconds: float = Field(default=30.0, ge=0)
    max_backoff_seconds: float = Field(default=3600.0, ge=0)


class LinesSpec(_Strict):
    """The lines of an outbound document (a sales order's entry), mapped from the same record."""

    name: str = Field(default="entry", description="the document's key holding the lines")
    fields: dict[str, FieldSpec]

    @field_validator("fields", mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: {"from": v} if isinstance(v, str) else v for k, v in value.items()}
        return value


class OutboundSpec(_Strict):
    """Core record → the target's document: operations, the mapped fields, and where the target's key goes."""

    add: Literal[OPERATIONS] = Field(description="operation for a record the target does not know yet")  # type: ignore[valid-type]
    edit: Literal[OPERATIONS] | None = Field(  # type: ignore[valid-type]
        default=None, description="operation for a known record (none: a known record is not sent again)"
    )
    when: str | None = Field(
        default=None, description="only records where this holds are sent, e.g. stage = 'won'"
    )
    key_field: str | None = Field(
        default=None, description="core field that receives the target's key when it applies an add"
    )
    fields: dict[str, FieldSpec] = Field(description="document field -> core field spec (mapping syntax)")
    lines: LinesSpec | None = None

    @field_validator("fields", mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: {"from": v} if isinstance(v, str) else v for k, v in value.items()}
        return value


class InboundSpec(_Strict):
    """A mapping file that reads the entity from the target, and the cursor column it reads changes by."""

    mapping: str = Field(description="the mapping file's name without .yaml")
    cursor: str | None = Field(
        default=None,
        description="column that grows on every change (U8: ufts); default: the mapping's own incremental cursor",
    )


class EntitySync(_Strict):
    """How one entity is kept in step with a target."""

    direction: Literal["inbound", "outbound", "both"]
    inbound: list[InboundSpec] = Field(
        default_factory=list,
        description="mappings that read the entity from the target: {mapping, cursor} or a mapping name",
    )
    ownership: dict[str, list[str]] = Field(
        default_factory=dict,
        description="owner (crm or the target's name) -> core fields; the owner's value wins a conflict",
    )

    @field_validator("inbound", mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"mapping": v} if isinstance(v, str) else v for v in value]
        return value

    conflicts: Literal["owner_wins", "queue"] = Field(
        default="owner_wins",
        description="owner_wins: ownership decides, the conflict is logged; queue: every conflict waits "
        "for a person (crmi sync conflicts)",
    )
    outbound: OutboundSpec | None = None


class SyncTarget(_Strict):
    """One target system: transport, crosswalk system, schedules, retries and entities."""

    system: str = Field(description="the project source whose keys are this target's (crosswalk system)")
    transport: U8Transport | K3CloudTransport = Field(discriminator="profile")
    schedule: Schedule = Field(default_factory=Schedule)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    start: Literal["now", "all"] = Field(
        default="now",
        description="now: the first sync sends only changes made after it (go-live records are not re-sent); "
        "all: the first sync sends every record the target does not know",
    )
    entities: dict[str, EntitySync]

    @field_validator("entities")
    @classmethod
    def _entities(cls, value: dict[str, EntitySync]) -> dict[str, EntitySync]:
        for name in value:
            if name not in ENTITIES:
                raise ValueError(
                    f"unknown entity '{name}'{close_names(name, ENTITIES)}; known: {', '.join(ENTITIES)}"
                )
        return value


@dataclass(frozen=True)
class CompiledOutbound:
    """An outbound mapping ready to run on core rows."""

    spec: OutboundSpec
    mapping: CompiledMapping  # document fields
    lines: CompiledMapping | None
    # document field -> the core fields it reads (ownership decides what an edit may send)
    reads: dict[str, tuple[str, ...]]


@dataclass(frozen=True)
class CompiledEntitySync:
    """One entity's sync settings, checked."""

    entity: str
    spec: EntitySync
    owners: dict[str, str]  # core field -> owner (crm or the target's name); absent: nobody owns it
    outbound: CompiledOutbound | None

    @property
    def inbound_enabled(self) -> bool:
        """Return True when the target's rows flow into the core."""
        return self.spec.direction in ("inbound", "both")

    @property
    def outbound_enabled(self) -> bool:
        """Return True when core changes flow to the target."""
        return self.spec.direction in ("outbound", "both") and self.outbound is not None


@dataclass(frozen=True)
class CompiledTarget:
    """A checked sync target."""

    name: str
    spec: SyncTarget
    entities: dict[str, CompiledEntitySync]

    @property
    def system(self) -> str:
        """Return the crosswalk system of the target's keys."""
        return self.spec.system

    def inbound(self) -> list[tuple[str, InboundSpec]]:
        """Return (entity, inbound mapping) in the core's load order (customers before their orders)."""
        from crm_core.entities import LOAD_ORDER

        order = {name: i for i, name in enumerate(LOAD_ORDER)}
        found: list[tuple[str, InboundSpec]] = []
        for entity in sorted(self.entities, key=lambda e: order.get(e, 99)):
            sync = self.entities[entity]
            if sync.inbound_enabled:
                found.extend((entity, spec) for spec in sync.spec.inbound)
        return found


SYSTEM_LABELS = {"u8_openapi": "U8", "k3cloud": "K3Cloud"}  # what users call a transport's system


def owned_fields(targets: Mapping[str, CompiledTarget]) -> list[OwnedField]:
    """Return the fields the project's sync targets own and read in (what :mod:`crm_core.edits` refuses to
    change on a record the target knows: its value comes in from the target)."""
    found: list[OwnedField] = []
    for name, target in targets.items():
        label = SYSTEM_LABELS.get(target.spec.transport.profile, name)
        for entity, sync in target.entities.items():
            if not sync.inbound_enabled:
                continue  # nothing of the target's comes in: ownership only keeps the field out of its edits
            found.extend(
                OwnedField(entity, field_name, name, target.system, label)
                for field_name, owner in sync.owners.items()
                if owner == name
            )
    return found


def _sub_document(doc: LocatedDocument, prefix: DocPath, data: Any) -> LocatedDocument:
    """Return ``data`` as a document whose positions are those of ``prefix`` in ``doc`` (errors stay located)."""
    size = len(prefix)
    root_mark = doc.value_marks.get(prefix)
    values = {p[size:]: m for p, m in doc.value_marks.items() if p[:size] == prefix}
    keys = {p[size:]: m for p, m in doc.key_marks.items() if p[:size] == prefix}
    if root_mark:
        values.setdefault((), root_mark)
    return LocatedDocument(data=data, file=doc.file, value_marks=values, key_marks=keys)


def _document_entity(name: str, fields: dict[str, FieldSpec]) -> EntityDef:
    """Return a stand-in entity for a target document: every mapped field is text in the payload."""
    from crm_core import models

    return EntityDef(
        name=name,
        model=models.Customer,  # unused: an outbound document is never loaded
        fields={f: FieldDef(name=f, kind="str", required=False, column=f) for f in fields},
    )


def _core_columns(entity: str) -> list[str]:
    """Return what an outbound mapping of ``entity`` may read: its fields and its references' fields."""
    definition = ENTITIES[entity]
    columns = ["id", KEY_COLUMN, *definition.fields]
    for name, field_def in definition.references.items():
        target = ENTITIES[field_def.references or ""]
        columns.extend(f"{name}.{f}" for f in ["id", KEY_COLUMN, *target.fields])
    return columns


def _compile_outbound(
    doc: LocatedDocument, path: DocPath, target: str, entity: str, outbound: OutboundSpec
) -> tuple[CompiledOutbound | None, list[Problem]]:
    from integration.mappings.spec import compile_document

    problems: list[Problem] = []
    columns = _core_columns(entity)
    raw = doc.data
    for part in path:
        raw = raw[part]
    compiled: dict[str, CompiledMapping] = {}
    for part_name, fields, sub_path in (
        ("document", outbound.fields, (*path, "fields")),
        *((("lines", outbound.lines.fields, (*path, "lines", "fields")),) if outbound.lines else ()),
    ):
        raw_fields = raw["fields"] if part_name == "document" else raw["lines"]["fields"]
        data = {
            "version": 1,
            "source": {"connector": CRM, "table": entity, "key": "id"},
            "target": entity,
            "fields": raw_fields,
        }
        sub = _sub_document(doc, sub_path, data)
        # Shift positions: the mapping's ('fields', x) is the outbound block's ('fields', x).
        sub.value_marks = {("fields", *p) if p else ("fields",): m for p, m in sub.value_marks.items()}
        sub.key_marks = {("fields", *p) if p else ("fields",): m for p, m in sub.key_marks.items()}
        try:
            compiled[part_name] = compile_document(
                sub,
                sources={CRM: columns},
                entity=_document_entity(f"{target}.{entity}", fields),
            )
        except ConfigError as exc:
            prefix = format_path(sub_path[:-1])
            problems.extend(replace(p, path=f"{prefix}.{p.path}" if p.path else prefix) for p in exc.problems)
    if outbound.when is not None:
        from integration.mappings.expressions import ExpressionError, parse

        try:
            unknown = [c for c in parse(outbound.when, condition=True).columns if c not in columns]
        except ExpressionError as exc:
            problems.append(doc.problem((*path, "when"), f"{exc.message}"))
        else:
            for column in unknown:
                problems.append(doc.problem(
                    (*path, "when"), f"column '{column}' is not in {entity}{close_names(column, columns)}"
                ))  # fmt: skip
    if outbound.key_field is not None and outbound.key_field not in ENTITIES[entity].fields:
        problems.append(
            doc.problem(
                (*path, "key_field"),
                f"entity '{entity}' has no field '{outbound.key_field}'"
                f"{close_names(outbound.key_field, ENTITIES[entity].fields)}",
            )
        )
    if problems or "document" not in compiled:
        return None, problems
    reads = {
        f.name: tuple(c.split(".")[0] if "." in c else c for c in (*f.columns, *f.expression_columns()))
        for f in compiled["document"].fields
    }
    return CompiledOutbound(outbound, compiled["document"], compiled.get("lines"), reads), problems


def compile_sync(
    doc: LocatedDocument, targets: dict[str, SyncTarget], sources: list[str], mappings: dict[str, Path]
) -> tuple[dict[str, CompiledTarget], list[Problem]]:
    """Check the ``sync:`` section against the project (sources, mapping names, entity fields)."""
    problems: list[Problem] = []
    compiled: dict[str, CompiledTarget] = {}
    for name, target in targets.items():
        base: DocPath = ("sync", name)
        if target.system not in sources:
            problems.append(
                doc.problem(
                    (*base, "system"),
                    f"unknown source '{target.system}'{close_names(target.system, sources)}; "
                    f"sources: {', '.join(sources)}",
                )
            )
        for secret in type(target.transport).secret_fields:
            value = getattr(target.transport, secret) or ""
            if value and "${" not in value:
                problems.append(
                    doc.problem(
                        (*base, "transport", secret),
                        f"{secret} is a secret; write ${{ENV_VAR}} and export it",
                    )
                )
        entities: dict[str, CompiledEntitySync] = {}
        for entity, sync in target.entities.items():
            path: DocPath = (*base, "entities", entity)
            fields = ENTITIES[entity].fields
            owners: dict[str, str] = {}
            for owner, owned in sync.ownership.items():
                if owner not in (CRM, name):
                    problems.append(
                        doc.problem(
                            (*path, "ownership", owner),
                            f"unknown owner '{owner}'; a field is owned by '{CRM}' or by '{name}'",
                            at_key=True,
                        )
                    )
                    continue
                for i, field_name in enumerate(owned):
                    if field_name not in fields:
                        problems.append(
                            doc.problem(
                                (*path, "ownership", owner, i),
                                f"entity '{entity}' has no field '{field_name}'{close_names(field_name, fields)}",
                            )
                        )
                    elif field_name in owners:
                        problems.append(
                            doc.problem(
                                (*path, "ownership", owner, i),
                                f"field '{field_name}' is owned twice ({owners[field_name]} and {owner}); "
                                "give each field one owner",
                            )
                        )
                    else:
                        owners[field_name] = owner
            if sync.direction in ("inbound", "both"):
                if entity not in INBOUND_ENTITIES:
                    problems.append(
                        doc.problem((*path, "direction"), f"{entity} cannot be synced inbound yet")
                    )
                if not sync.inbound:
                    problems.append(
                        doc.problem(
                            (*path, "inbound"),
                            "name the mapping file(s) that read this entity from the target",
                        )
                    )
                for i, inbound in enumerate(sync.inbound):
                    if inbound.mapping not in mappings:
                        problems.append(
                            doc.problem(
                                (*path, "inbound", i),
                                f"unknown mapping '{inbound.mapping}'{close_names(inbound.mapping, mappings)}; "
                                "give a mapping file's name without .yaml",
                            )
                        )
            outbound = None
            if sync.direction in ("outbound", "both"):
                if entity not in OUTBOUND_ENTITIES:
                    problems.append(
                        doc.problem(
                            (*path, "direction"),
                            f"{entity} cannot be sent outbound; entities: {', '.join(OUTBOUND_ENTITIES)}",
                        )
                    )
                elif sync.outbound is None:
                    problems.append(
                        doc.problem(path, "an outbound direction needs an 'outbound' mapping", at_key=True)
                    )
                else:
                    outbound, found = _compile_outbound(doc, (*path, "outbound"), name, entity, sync.outbound)
                    problems.extend(found)
            entities[entity] = CompiledEntitySync(entity, sync, owners, outbound)
        compiled[name] = CompiledTarget(name, target, entities)
    return compiled, problems


def sync_warnings(doc: LocatedDocument, targets: dict[str, CompiledTarget]) -> list[Problem]:
    """Return the warnings of a checked ``sync:`` section: a field the CRM owns that no outbound field sends.

    The sync keeps the CRM's value of such a field (U8's change of it is not taken) but cannot send it, so the
    two sides stay apart until someone adds it to ``outbound.fields`` or gives up owning it.
    """
    warnings: list[Problem] = []
    for name, target in targets.items():
        for entity, sync in target.entities.items():
            if sync.outbound is None:
                continue
            fields = ENTITIES[entity].fields
            sent = {f for reads in sync.outbound.reads.values() for f in reads if f in fields}
            for i, field_name in enumerate(sync.spec.ownership.get(CRM, [])):
                if field_name in fields and field_name not in sent:
                    warnings.append(doc.problem(
                        ("sync", name, "entities", entity, "ownership", CRM, i),
                        f"the CRM owns '{field_name}' but no outbound field sends it: {name}'s changes of it are "
                        f"not taken and the CRM's are never sent; add it to outbound.fields or leave it unowned",
                    ))  # fmt: skip
    return warnings
