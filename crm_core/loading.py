"""Loading canonical records into the core: upsert by crosswalk, exact-key matching, references, rejects.

One call loads one entity inside one transaction. Every incoming row ends in exactly one outcome —
inserted, updated, unchanged, merged (attached to an existing record) or rejected — and the counts per
source are returned for the reconciliation report. Re-loading the same rows changes nothing: the
crosswalk remembers a hash of what each source row last contributed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from crm_core.entities import ENTITIES, EntityDef
from crm_core.errors import LoadError
from crm_core.journal import journal_session, to_json
from crm_core.models import Base, ExternalId, LoadRun, Reject, Stage
from crm_core.runs import owner
from crm_core.watermarks import CursorState, save_watermark

EXTERNAL_KEY = "_external_key"
ROW_REF = "_row_ref"
LOCATION = "_location"

KeyFunction = Callable[[Any], Any]
KeyFunctions = Mapping[str, KeyFunction]


@dataclass(frozen=True)
class Lookup:
    """How a reference field finds its target: by the source's key (crosswalk), by name or by code."""

    by: str = "external_id"  # external_id | name | code
    system: str | None = None  # crosswalk system; defaults to the batch's source


@dataclass(frozen=True)
class MatchRules:
    """Exact-key matching: a new row joins an existing record when all fields of one key are equal."""

    keys: Sequence[Sequence[str]] = ()
    conflict_fields: Sequence[str] = ()  # differing non-empty values here forbid a match


@dataclass
class Batch:
    """Mapped records of one mapping (source × entity), with the mapping's rejects."""

    source: str
    mapping: str
    records: pd.DataFrame
    rejects: pd.DataFrame
    rows_read: int
    fields: Sequence[str]
    lookups: dict[str, Lookup] = field(default_factory=dict)
    # Incremental streams: (stream, watermark after these rows), saved in the load's transaction.
    watermark: tuple[str, CursorState] | None = None
    # The rows as extracted (source columns + _location/_row_ref): rejects keep theirs for re-import.
    raw: pd.DataFrame | None = None


@dataclass
class SourceStats:
    """What happened to the rows of one batch."""

    source: str
    entity: str
    mapping: str
    rows_read: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    merged: int = 0
    rejected: int = 0
    warnings: int = 0
    amount_mapped: Decimal | None = None
    amount_loaded: Decimal | None = None
    amount_core: Decimal | None = None  # what the core holds for the loaded rows, read back after the load

    @property
    def loaded(self) -> int:
        """Return rows that are (still) in the core as their own record."""
        return self.inserted + self.updated + self.unchanged

    @property
    def balanced(self) -> bool:
        """Return True when every row read is accounted for."""
        return self.rows_read == self.loaded + self.merged + self.rejected

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-friendly dict (amounts as strings)."""
        out = {k: v for k, v in self.__dict__.items() if not isinstance(v, Decimal)}
        out["amount_mapped"] = None if self.amount_mapped is None else str(self.amount_mapped)
        out["amount_loaded"] = None if self.amount_loaded is None else str(self.amount_loaded)
        out["amount_core"] = None if self.amount_core is None else str(self.amount_core)
        out["loaded"] = self.loaded
        return out


def get_or_start_run(session: Session, run_key: str, project: str, mode: str = "full") -> LoadRun:
    """Return the running load run ``run_key`` (created if new) and journal the session's changes to it."""
    run = session.scalar(select(LoadRun).where(LoadRun.run_key == run_key).with_for_update())
    if run is None:
        host, pid = owner()
        run = LoadRun(
            run_key=run_key, project=project, mode=mode, status="running", stats={}, host=host, pid=pid
        )
        session.add(run)
        session.flush()
    elif run.status != "running":
        raise LoadError(f"load run {run_key} is {run.status}; its changes were undone; start a new run")
    journal_session(session, run.id)
    return run


class RawRows:
    """The extracted rows of a batch, looked up by (location, row ref) when a row is rejected."""

    def __init__(self, raw: pd.DataFrame | None) -> None:
        usable = raw is not None and not raw.empty and ROW_REF in raw.columns and LOCATION in raw.columns
        self.frame = raw if usable else None
        self._positions: dict[tuple[str, str], int] | None = None

    def get(self, location: str | None, row_ref: str) -> dict[str, Any] | None:
        """Return the source columns of one row as JSON-safe values, or None when unknown."""
        if self.frame is None:
            return None
        if self._positions is None:
            keys = zip(self.frame[LOCATION].astype(str), self.frame[ROW_REF].astype(str), strict=True)
            self._positions = {key: position for position, key in enumerate(keys)}
        position = self._positions.get((str(location), str(row_ref)))
        if position is None:
            return None
        row = self.frame.iloc[position]
        return {str(k): to_json(_python(v)) for k, v in row.items() if not str(k).startswith("_")}


def crosswalk_ids(session: Session, entity: str, system: str, keys: Iterable[str]) -> dict[str, int]:
    """Return the core ids of the records that ``system`` knows by these keys (unknown keys are left out)."""
    found: dict[str, int] = {}
    key_list = sorted(set(keys))
    for start in range(0, len(key_list), 500):
        rows = session.execute(
            select(ExternalId.external_key, ExternalId.entity_id).where(
                ExternalId.entity == entity,
                ExternalId.system == system,
                ExternalId.external_key.in_(key_list[start : start + 500]),
            )
        )
        found.update({key: entity_id for key, entity_id in rows})
    return found


def _canonical(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value.normalize(), "f")
    if isinstance(value, dt.date | dt.datetime):
        return value.isoformat()
    return value


def row_hash(values: dict[str, Any]) -> str:
    """Return a stable SHA-256 of a record's values (what the crosswalk remembers)."""
    payload = json.dumps(
        {k: _canonical(v) for k, v in sorted(values.items())}, ensure_ascii=False, default=str
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _python(value: Any) -> Any:
    """Return plain Python scalars (drivers cannot bind numpy types); missing values become None.

    Aware datetimes are converted to UTC: SQLite keeps only the wall-clock part, so 2025-03-24 00:00+08:00
    would come back as midnight UTC, eight hours off. The core stores instants in UTC on every database.
    """
    if not _present(value):
        return None
    if isinstance(value, pd.Timestamp):
        value = value.to_pydatetime()
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        return value.astimezone(dt.UTC)
    return value.item() if isinstance(value, np.generic) else value


def _present(value: Any) -> bool:
    return (
        value is not None
        and value is not pd.NA
        and not (isinstance(value, float) and value != value)
        and value is not pd.NaT
    )


class EntityLoader:
    """Loads the batches of one entity in one transaction (see module doc)."""

    def __init__(
        self,
        session: Session,
        run: LoadRun,
        entity: EntityDef | str,
        *,
        match: MatchRules | None = None,
        key_functions: KeyFunctions | None = None,
        name_keys: KeyFunctions | None = None,
    ) -> None:
        self.session = session
        self.run = run
        self.entity = ENTITIES[entity] if isinstance(entity, str) else entity
        self.model: type[Base] = self.entity.model
        self.match = match or MatchRules()
        self.key_functions = key_functions or {}  # normalize a match-key field before comparing
        self.name_keys = name_keys or {}  # per target entity: normalize names for 'by: name' lookups
        self._index: dict[tuple[str, tuple[Any, ...]], set[int]] = defaultdict(set)
        self._records: dict[int, Any] = {}
        self._name_index: dict[str, dict[Any, set[int]]] = {}
        self._stages: set[str] | None = None
        self._pending_self_refs: list[tuple[Any, str, Any, Lookup, str]] = []
        self._raw = RawRows(None)

    # ------------------------------------------------------------------ matching index

    def _key_values(self, values: dict[str, Any], key: Sequence[str]) -> tuple[Any, ...] | None:
        parts = []
        for name in key:
            value = values.get(name)
            if not _present(value):
                return None
            function = self.key_functions.get(name)
            parts.append(function(value) if function else value)
        return None if any(p is None for p in parts) else tuple(parts)

    def _record_values(self, record: Any) -> dict[str, Any]:
        return {name: getattr(record, f.column) for name, f in self.entity.fields.items()}

    def _add_to_index(self, record: Any) -> None:
        self._records[record.id] = record
        values = self._record_values(record)
        for key in self.match.keys:
            found = self._key_values(values, key)
            if found is not None:
                self._index[("|".join(key), found)].add(record.id)

    def _build_index(self) -> None:
        if not self.match.keys:
            return
        model: Any = self.model
        query = select(model)
        if hasattr(model, "merged_into_id"):
            query = query.where(model.merged_into_id.is_(None))
        for record in self.session.scalars(query):
            self._add_to_index(record)

    def _find_match(self, values: dict[str, Any]) -> tuple[Any, str] | None:
        for key in self.match.keys:
            found = self._key_values(values, key)
            if found is None:
                continue
            for record_id in sorted(self._index.get(("|".join(key), found), ())):
                record = self._records[record_id]
                if not self._conflicts(values, record):
                    return record, "+".join(key)
        return None

    def _conflicts(self, values: dict[str, Any], record: Any) -> bool:
        for name in self.match.conflict_fields:
            mine, theirs = values.get(name), getattr(record, self.entity.fields[name].column)
            if _present(mine) and _present(theirs) and mine != theirs:
                return True
        return False

    # ------------------------------------------------------------------ references

    def _crosswalk_ids(self, entity: str, system: str, keys: set[str]) -> dict[str, int]:
        return crosswalk_ids(self.session, entity, system, keys)

    def _names(self, entity: str, by: str) -> dict[Any, set[int]]:
        cache_key = f"{entity}:{by}"
        if cache_key not in self._name_index:
            target = ENTITIES[entity]
            model: Any = target.model
            column = (
                "code"
                if by == "code"
                else ("name_normalized" if entity == "customer" else target.label_field)
            )
            query = select(model.id, getattr(model, column))
            if hasattr(model, "merged_into_id"):
                query = query.where(model.merged_into_id.is_(None))
            index: dict[Any, set[int]] = defaultdict(set)
            normalize = self.name_keys.get(entity) if entity != "customer" and by == "name" else None
            for record_id, value in self.session.execute(query):
                if value is not None:
                    index[normalize(value) if normalize else value].add(record_id)
            self._name_index[cache_key] = index
        return self._name_index[cache_key]

    def _resolve(
        self, batch: Batch, records: pd.DataFrame
    ) -> tuple[dict[str, pd.Series], list[dict[str, Any]]]:
        resolved: dict[str, pd.Series] = {}
        problems: list[dict[str, Any]] = []
        for name, definition in self.entity.references.items():
            if name not in records.columns or definition.references is None:
                continue
            target = definition.references
            lookup = batch.lookups.get(name, Lookup())
            values = records[name]
            present = values.map(_present)
            if target == self.entity.name and lookup.by == "external_id":
                resolved[name] = pd.Series([None] * len(records), index=records.index, dtype=object)
                continue  # self-references resolve after all rows of the entity are in
            ids: dict[Any, int | None] = {}
            reasons: dict[Any, str] = {}
            unique = {v for v in values[present]}
            if lookup.by == "external_id":
                system = lookup.system or batch.source
                found = self._crosswalk_ids(target, system, {str(v) for v in unique})
                for value in unique:
                    ids[value] = found.get(str(value))
                    if ids[value] is None:
                        reasons[value] = (
                            f"{target} with {system} key '{value}' not found (was it loaded or rejected?)"
                        )
            else:
                index = self._names(target, lookup.by)
                normalize = self.name_keys.get(target) if lookup.by == "name" else None
                for value in unique:
                    matches = index.get(normalize(value) if normalize else value, set())
                    if len(matches) == 1:
                        ids[value] = next(iter(matches))
                    else:
                        ids[value] = None
                        reasons[value] = (
                            f"no {target} named '{value}'" if not matches
                            else f"'{value}' is ambiguous: {len(matches)} {target} records match ({sorted(matches)[:5]})"
                        )  # fmt: skip
            resolved[name] = pd.Series(
                [ids.get(v) if _present(v) else None for v in values], index=values.index, dtype=object
            )
            failed = present & resolved[name].isna()
            for index_value in records.index[failed]:
                raw = values.at[index_value]
                problems.append({
                    "index": index_value, "field": name, "value": raw, "reason": reasons[raw],
                    "severity": "error" if definition.required else "warn",
                })  # fmt: skip
        return resolved, problems

    def _valid_stage(self, code: Any) -> bool:
        if self._stages is None:
            self._stages = set(self.session.scalars(select(Stage.code)))
        return code in self._stages

    # ------------------------------------------------------------------ loading

    def load(self, batches: Sequence[Batch]) -> list[SourceStats]:
        """Load ``batches`` in order (earlier batches win on conflicting values); return stats per batch."""
        self._build_index()
        all_stats = [self._load_batch(batch) for batch in batches]
        self._resolve_self_references()
        for batch in batches:
            if batch.watermark is not None:
                stream, state = batch.watermark
                save_watermark(self.session, batch.source, stream, state, self.run.id)
        self.session.flush()
        return all_stats

    def _reject(
        self,
        source: str,
        row: pd.Series | dict[str, Any],
        field_name: str | None,
        value: Any,
        rule: str,
        reason: str,
        severity: str = "error",
    ) -> None:
        location = str(row.get(LOCATION)) if row.get(LOCATION) is not None else None
        self.session.add(Reject(
            load_run_id=self.run.id, source=source, entity=self.entity.name, location=location,
            row_ref=str(row.get(ROW_REF)), field=field_name, value=None if value is None else str(value)[:2000],
            rule=rule, reason=reason, severity=severity, raw_row=self._raw.get(location, str(row.get(ROW_REF))),
        ))  # fmt: skip

    def _load_batch(self, batch: Batch) -> SourceStats:
        stats = SourceStats(
            source=batch.source, entity=self.entity.name, mapping=batch.mapping, rows_read=batch.rows_read
        )
        mapping_rejected: set[str] = set()
        self._raw = RawRows(batch.raw)
        for entry in batch.rejects.to_dict("records"):
            self._reject(batch.source, {LOCATION: entry["location"], ROW_REF: entry["row_ref"]}, entry["field"],
                         entry["value"], entry["rule"], entry["reason"], entry.get("severity") or "error")  # fmt: skip
            if (entry.get("severity") or "error") == "error":
                mapping_rejected.add(f"{entry['location']}\x00{entry['row_ref']}")
            else:
                stats.warnings += 1
        stats.rejected = len(mapping_rejected)
        records = batch.records.reset_index(drop=True)
        amount_field = self.entity.amount_field
        if amount_field and amount_field in records.columns:
            stats.amount_mapped = sum((v for v in records[amount_field] if _present(v)), Decimal(0))
            stats.amount_loaded = Decimal(0)
        resolved, problems = self._resolve(batch, records)
        row_errors: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        for problem in problems:
            row_errors[problem["index"]].append(problem)
        fields = [f for f in batch.fields if f in self.entity.fields]
        loaded_ids: list[int] = []
        crosswalk = {
            xw.external_key: xw
            for xw in self.session.scalars(
                select(ExternalId).where(
                    ExternalId.entity == self.entity.name, ExternalId.system == batch.source
                )
            )
        }
        for index, row in records.iterrows():
            errors = row_errors.get(index, [])
            for problem in errors:
                self._reject(
                    batch.source,
                    row,
                    problem["field"],
                    problem["value"],
                    "reference",
                    problem["reason"],
                    problem["severity"],
                )
            if any(p["severity"] == "error" for p in errors):
                stats.rejected += 1
                continue
            stats.warnings += len(errors)
            values = {name: (resolved[name].at[index] if name in resolved else row[name]) for name in fields}
            values = {k: _python(v) for k, v in values.items()}
            if "stage" in values and values["stage"] is not None and not self._valid_stage(values["stage"]):
                self._reject(
                    batch.source,
                    row,
                    "stage",
                    values["stage"],
                    "reference",
                    f"unknown stage code {values['stage']!s}",
                )
                stats.rejected += 1
                continue
            outcome, entity_id = self._upsert(batch, row, values, crosswalk)
            setattr(stats, outcome, getattr(stats, outcome) + 1)
            if stats.amount_loaded is not None and outcome != "merged" and amount_field:
                amount = values.get(amount_field)
                stats.amount_loaded += amount if isinstance(amount, Decimal) else Decimal(0)
                loaded_ids.append(entity_id)
        if stats.amount_loaded is not None and amount_field:
            stats.amount_core = self._stored_amount(amount_field, loaded_ids)
        return stats

    def _stored_amount(self, amount_field: str, ids: list[int]) -> Decimal:
        """Sum what the core holds for these records (read back, so rounding or truncation shows)."""
        self.session.flush()
        model: Any = self.model
        column = getattr(model, self.entity.fields[amount_field].column)
        total = Decimal(0)
        for start in range(0, len(ids), 500):
            part = self.session.scalar(select(func.sum(column)).where(model.id.in_(ids[start : start + 500])))
            total += Decimal(str(part)) if part is not None else Decimal(0)
        return total

    def _assign(self, record: Any, values: dict[str, Any], *, only_blanks: bool) -> bool:
        changed = False
        for name, value in values.items():
            definition = self.entity.fields[name]
            if definition.references == self.entity.name and definition.references is not None:
                continue
            current = getattr(record, definition.column)
            if value is None or (only_blanks and current is not None):
                continue
            if current != value:
                setattr(record, definition.column, value)
                changed = True
        return changed

    def _upsert(
        self, batch: Batch, row: pd.Series, values: dict[str, Any], crosswalk: dict[str, ExternalId]
    ) -> tuple[str, int]:
        key = str(row[EXTERNAL_KEY])
        digest = row_hash(values)
        existing = crosswalk.get(key)
        record: Any  # an instance of self.model: the ORM classes share no typed base with these columns
        self._queue_self_refs(batch, row, values)
        if existing is not None:
            merged = existing.match_method != "created"
            if existing.last_synced_hash == digest:
                return ("merged" if merged else "unchanged"), existing.entity_id
            record = self._survivor(existing.entity_id)
            self._assign(record, values, only_blanks=merged)
            record.updated_run_id = self.run.id
            existing.last_synced_hash = digest
            existing.last_synced_at = dt.datetime.now(dt.UTC)
            existing.updated_run_id = self.run.id
            return ("merged" if merged else "updated"), int(record.id)
        match = self._find_match(values)
        if match is not None:
            record, method = match
            if self._assign(record, values, only_blanks=True):
                record.updated_run_id = self.run.id
            self._add_crosswalk(batch, key, record.id, f"matched:{method}", digest, crosswalk)
            self._add_to_index(record)
            return "merged", int(record.id)
        record = self.model()
        self._assign(record, values, only_blanks=False)
        record.created_run_id = record.updated_run_id = self.run.id
        self.session.add(record)
        self.session.flush()
        self._add_crosswalk(batch, key, record.id, "created", digest, crosswalk)
        self._add_to_index(record)
        return "inserted", int(record.id)

    def _survivor(self, entity_id: int) -> Any:
        record: Any = self.session.get(self.model, entity_id)
        seen: set[int] = set()
        while record is not None and getattr(record, "merged_into_id", None) and record.id not in seen:
            seen.add(record.id)
            record = self.session.get(self.model, record.merged_into_id)
        if record is None:
            raise LoadError(
                f"crosswalk points at missing {self.entity.name} {entity_id}; the core is inconsistent"
            )
        return record

    def _add_crosswalk(
        self,
        batch: Batch,
        key: str,
        entity_id: int,
        method: str,
        digest: str,
        crosswalk: dict[str, ExternalId],
    ) -> None:
        xw = ExternalId(entity=self.entity.name, entity_id=entity_id, system=batch.source, external_key=key,
                        match_method=method, last_synced_hash=digest, last_synced_at=dt.datetime.now(dt.UTC),
                        created_run_id=self.run.id, updated_run_id=self.run.id)  # fmt: skip
        self.session.add(xw)
        crosswalk[key] = xw

    def _queue_self_refs(self, batch: Batch, row: pd.Series, values: dict[str, Any]) -> None:
        for name, definition in self.entity.references.items():
            if definition.references != self.entity.name or name not in row.index or not _present(row[name]):
                continue
            lookup = batch.lookups.get(name, Lookup())
            if lookup.by == "external_id":
                self._pending_self_refs.append((row, name, row[name], lookup, batch.source))

    def _resolve_self_references(self) -> None:
        self.session.flush()
        for row, name, value, lookup, source in self._pending_self_refs:
            system = lookup.system or source
            own = self._crosswalk_ids(self.entity.name, source, {str(row[EXTERNAL_KEY])})
            target = self._crosswalk_ids(self.entity.name, system, {str(value)})
            if not own:
                continue
            record = self._survivor(own[str(row[EXTERNAL_KEY])])
            column = self.entity.fields[name].column
            target_id = target.get(str(value))
            if target_id is None:
                self._reject(source, row, name, value, "reference",
                             f"{self.entity.name} with {system} key '{value}' not found", "warn")  # fmt: skip
            elif target_id != record.id and getattr(record, column) != target_id:
                setattr(record, column, target_id)
