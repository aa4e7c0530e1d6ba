"""What the canonical model offers to mappings: entities, their fields, references and load order.

Derived from the SQLAlchemy models so the two cannot drift apart. Reference fields (``customer`` on
an opportunity) hold a *source value* in a mapped frame and are resolved to a core id at load time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final, Literal

from sqlalchemy import Boolean, ColumnElement, Date, DateTime, Integer, Numeric

from crm_core import models

FieldKind = Literal["str", "int", "decimal", "date", "datetime", "bool"]

# Columns written by the loader itself, never by a mapping.
SYSTEM_COLUMNS: Final = frozenset(
    {"id", "created_run_id", "updated_run_id", "created_at", "updated_at", "merged_into_id"}
)


@dataclass(frozen=True)
class FieldDef:
    """A field a mapping may fill."""

    name: str
    kind: FieldKind
    required: bool  # non-nullable without a default: a mapping must provide it
    column: str  # the model column that stores it
    references: str | None = None  # target entity for reference fields
    max_length: int | None = None


@dataclass(frozen=True)
class EntityDef:
    """A canonical entity: its model, mappable fields and reconciliation amount."""

    name: str
    model: type[models.Base]
    fields: dict[str, FieldDef] = field(default_factory=dict)
    amount_field: str | None = None  # summed in reconciliation
    label_field: str = "name"  # what a human recognises the record by; also the 'by name' lookup

    @property
    def references(self) -> dict[str, FieldDef]:
        """Return the reference fields, by field name."""
        return {name: f for name, f in self.fields.items() if f.references}


_MODELS: Final[dict[str, type[models.Base]]] = {
    "sales_rep": models.SalesRep,
    "customer": models.Customer,
    "contact": models.Contact,
    "opportunity": models.Opportunity,
    "sales_order": models.SalesOrder,
    "sales_order_line": models.SalesOrderLine,
    "receivable": models.Receivable,
    "payment": models.Payment,
    "payment_application": models.PaymentApplication,
}

# reference field -> (FK column, target entity); a column named ``<field>_id`` is the default.
_REFERENCES: Final[dict[str, dict[str, str]]] = {
    "customer": {"parent": "customer", "owner": "sales_rep"},
    "contact": {"customer": "customer"},
    "opportunity": {"customer": "customer", "owner": "sales_rep", "registered_by": "sales_rep"},
    "sales_order": {"customer": "customer", "opportunity": "opportunity", "owner": "sales_rep"},
    "sales_order_line": {"order": "sales_order"},
    "receivable": {"customer": "customer", "order": "sales_order"},
    "payment": {"customer": "customer"},
    "payment_application": {"payment": "payment", "receivable": "receivable"},
}
_RENAMED: Final[dict[str, str]] = {"stage_code": "stage"}  # a code checked against the stage master
_AMOUNTS: Final[dict[str, str]] = {
    "opportunity": "amount",
    "sales_order": "total_amount",
    "sales_order_line": "amount",
    "receivable": "amount",
    "payment": "amount",
    "payment_application": "amount",
}
_LABELS: Final[dict[str, str]] = {
    "sales_order": "order_no",
    "sales_order_line": "line_no",
    "receivable": "receivable_no",
    "payment": "payment_no",
    "payment_application": "amount",
}


def _kind(column: ColumnElement[Any]) -> FieldKind:
    t = column.type
    if isinstance(t, Boolean):
        return "bool"
    if isinstance(t, DateTime):
        return "datetime"
    if isinstance(t, Date):
        return "date"
    if isinstance(t, Numeric):
        return "decimal"
    if isinstance(t, Integer):
        return "int"
    return "str"


def _build(name: str, model: type[models.Base]) -> EntityDef:
    refs = _REFERENCES.get(name, {})
    fk_to_ref = {f"{ref}_id": ref for ref in refs}
    fields: dict[str, FieldDef] = {}
    for column in model.__table__.columns:
        if column.name in SYSTEM_COLUMNS:
            continue
        field_name = fk_to_ref.get(column.name) or _RENAMED.get(column.name, column.name)
        required = not column.nullable and column.default is None and column.server_default is None
        length = getattr(column.type, "length", None)
        fields[field_name] = FieldDef(
            name=field_name,
            kind="str" if field_name in refs or field_name == "stage" else _kind(column),
            required=required,
            column=column.name,
            references=refs.get(field_name),
            max_length=length if isinstance(length, int) else None,
        )
    return EntityDef(
        name=name,
        model=model,
        fields=fields,
        amount_field=_AMOUNTS.get(name),
        label_field=_LABELS.get(name, "name"),
    )


ENTITIES: Final[dict[str, EntityDef]] = {name: _build(name, model) for name, model in _MODELS.items()}

# Order in which entities load: every reference points at an entity loaded earlier (or itself).
LOAD_ORDER: Final[tuple[str, ...]] = tuple(_MODELS)


def entity(name: str) -> EntityDef:
    """Return the entity definition for ``name``; raise KeyError listing the known entities."""
    try:
        return ENTITIES[name]
    except KeyError:
        raise KeyError(f"unknown entity '{name}'; known: {', '.join(ENTITIES)}") from None
