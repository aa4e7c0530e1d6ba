"""The migration steps as plain functions: extract, stage (map + normalize), load, reconcile.

Dagster assets call these; so do the CLI and the tests. Nothing here knows about Dagster.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import Engine, func, select

from crm_core.db import make_engine, session_factory, upgrade
from crm_core.entities import ENTITIES, LOAD_ORDER
from crm_core.errors import ConfigError, MappingError, Problem
from crm_core.loading import Batch, EntityLoader, Lookup, MatchRules, SourceStats, get_or_start_run
from crm_core.models import LoadRun, Reject
from crm_core.watermarks import CursorState, advance, plain_cursor, read_watermark
from integration.connectors import Connector, CsvConnector, ExcelConnector, ReadRequest, connector_for
from integration.connectors.base import DEFAULT_CHUNK_ROWS, META_COLUMNS, ROW_REF
from integration.connectors.sql import SqlConnector
from integration.dedup.normalize import company_key, person_key
from integration.mappings.engine import MappingResult, map_chunks
from integration.mappings.spec import CompiledMapping, load_mappings
from integration.project import Project, load_project


@dataclass
class StagedEntity:
    """Canonical records of one entity from every mapping that targets it, ready to load."""

    entity: str
    batches: list[Batch] = field(default_factory=list)

    @property
    def records(self) -> int:
        """Return the number of mapped records."""
        return sum(len(b.records) for b in self.batches)

    @property
    def rejects(self) -> int:
        """Return the number of mapping reject entries (errors and warnings)."""
        return sum(len(b.rejects) for b in self.batches)


class Migration:
    """A loaded project and its compiled mappings: the unit the pipeline steps work on."""

    def __init__(self, project: Project) -> None:
        self.project = project
        self.mappings: list[CompiledMapping] = load_mappings(
            list(project.mapping_files), sources={s: None for s in project.spec.sources}
        )
        names: dict[str, CompiledMapping] = {}
        problems = []
        for mapping in self.mappings:
            asset = raw_asset_name(mapping)
            if asset in names:
                problems.append(
                    Problem(
                        f"{asset} is also produced by {names[asset].file.name}; one mapping per source table",
                        mapping.file,
                    )
                )
            names[asset] = mapping
        if problems:
            raise ConfigError(problems)

    @classmethod
    def load(cls, path: str | None = None) -> Migration:
        """Load the project at ``path`` (default: ``$CRM_PROJECT`` or the demo)."""
        return cls(load_project(path))

    @property
    def entities(self) -> list[str]:
        """Return the entities the project loads, in load order."""
        targets = {m.entity.name for m in self.mappings}
        return [e for e in LOAD_ORDER if e in targets]

    def mappings_for(self, entity: str) -> list[CompiledMapping]:
        """Return the mappings of an entity, the dedup source priority first."""
        priority = self.project.spec.dedup.get(entity)
        order = list(priority.source_priority) if priority else []
        chosen = [m for m in self.mappings if m.entity.name == entity]
        return sorted(
            chosen, key=lambda m: (order.index(m.source) if m.source in order else len(order), m.name)
        )

    def connector(self, source: str) -> Connector:
        """Return a connector for a project source."""
        return connector_for(self.project, source)

    @cached_property
    def match_rules(self) -> dict[str, MatchRules]:
        """Return the exact-key match rules per entity from project.yaml."""
        return {
            name: MatchRules(
                keys=[tuple(k) for k in rules.match_keys], conflict_fields=tuple(rules.conflict_fields)
            )
            for name, rules in self.project.spec.dedup.items()
        }


def raw_asset_name(mapping: CompiledMapping) -> str:
    """Return the name of the raw asset that extracts a mapping's rows: ``raw_<source>_<entity>``."""
    return f"raw_{mapping.source}_{mapping.entity.name}"


def read_request(mapping: CompiledMapping, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> ReadRequest:
    """Return what a mapping asks its connector to read."""
    source = mapping.spec.source
    return ReadRequest(
        table=source.location if source.query is None else f"query:{mapping.name}",
        where=source.where,
        query=source.query,
        key=tuple(source.key_columns),
        header_row=source.header_row,
        chunk_rows=chunk_rows,
    )


def extract_chunks(
    migration: Migration,
    mapping: CompiledMapping,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    since: CursorState | None = None,
    connector: Connector | None = None,
) -> Iterator[pd.DataFrame]:
    """Yield the raw chunks of a mapping's source table or sheet (from ``since`` for cursor-incremental ones)."""
    connector = connector or migration.connector(mapping.source)
    request = read_request(mapping, chunk_rows)
    incremental = mapping.spec.source.incremental
    if incremental is not None and incremental.cursor is not None:
        request = replace(request, cursor_column=incremental.cursor, cursor_from=_query_bound(since))
    try:
        yield from connector.read(request)
    finally:
        if isinstance(connector, SqlConnector):
            connector.dispose()


def file_fingerprint(path: Path) -> str:
    """Identify a file by name and content (SHA-256): a changed file is read again, a touched one is not."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"{path.name}|{digest.hexdigest()}"


def restrict_to_new_files(
    connector: Connector, mapping: CompiledMapping, since: CursorState | None
) -> set[str]:
    """Keep only the files not loaded before (by name + content hash); return every matched file's fingerprint."""
    if not isinstance(connector, ExcelConnector | CsvConnector):
        raise MappingError(f"{mapping.file}: incremental: {{files: true}} needs an excel or csv source")
    if not connector.paths:
        connector.list_tables()  # the glob matches nothing at all: say so
    fingerprints = {path: file_fingerprint(path) for path in connector.paths}
    known = since.keys if since else frozenset()
    connector.paths = [path for path, fingerprint in fingerprints.items() if fingerprint not in known]
    connector.require_files = False
    return set(fingerprints.values())


def source_columns(migration: Migration, mapping: CompiledMapping) -> list[str]:
    """Return the columns a mapping's source really has (its query's, or its table's or sheet's)."""
    connector = migration.connector(mapping.source)
    source = mapping.spec.source
    try:
        if source.query is not None and hasattr(connector, "query_columns"):
            return list(connector.query_columns(source.query))
        return connector.columns(source.location, source.header_row)
    finally:
        if isinstance(connector, SqlConnector):
            connector.dispose()


def empty_extract(migration: Migration, mapping: CompiledMapping) -> pd.DataFrame:
    """Return a frame with the source's columns and no rows."""
    columns = source_columns(migration, mapping)
    return pd.DataFrame({c: pd.Series(dtype=object) for c in [*columns, *META_COLUMNS]})


WATERMARK_ATTR = "watermark"  # DataFrame.attrs key: (stream, CursorState as JSON) of an incremental read


def extract(migration: Migration, mapping: CompiledMapping, since: CursorState | None = None) -> pd.DataFrame:
    """Return the raw rows of a mapping's source as one frame (source columns + row metadata).

    For incremental mappings only rows from the watermark ``since`` on are read; rows at the boundary
    that were loaded before are dropped, and the new watermark rides along in ``frame.attrs``.
    """
    incremental = mapping.spec.source.incremental
    connector = migration.connector(mapping.source)
    matched_files: set[str] = set()
    if incremental is not None and incremental.files:
        matched_files = restrict_to_new_files(connector, mapping, since)
    chunks = list(extract_chunks(migration, mapping, since=since, connector=connector))
    # No rows (an empty delta) still carries the columns, so a vanished column is caught every run.
    frame = pd.concat(chunks, ignore_index=True) if chunks else empty_extract(migration, mapping)
    if incremental is None:
        return frame
    if incremental.files:
        files_state = CursorState("files", frozenset(matched_files | (since.keys if since else frozenset())))
        frame.attrs[WATERMARK_ATTR] = (mapping.name, files_state.to_json())
        return frame
    if frame.empty:
        frame.attrs[WATERMARK_ATTR] = (mapping.name, since.to_json()) if since else None
        return frame
    keys = frame[ROW_REF].astype(str)
    if since is not None:
        cursors = frame[incremental.cursor]
        boundary = plain_cursor(since.value)
        before = cursors.map(lambda v: plain_cursor(v) < boundary)
        seen = before | (cursors.map(lambda v: plain_cursor(v) == boundary) & keys.isin(since.keys))
        frame = frame.loc[~seen].reset_index(drop=True)
        keys = keys.loc[~seen].reset_index(drop=True)
    state = advance(since, list(frame[incremental.cursor]), list(keys))
    frame.attrs[WATERMARK_ATTR] = (mapping.name, state.to_json()) if state else None
    return frame


# Datetime cursors are queried a little early: a database that stores them as text (SQLite) compares
# '2025-06-01 09:00:00' < '2025-06-01 09:00:00.000000' and would skip the boundary rows. What the margin
# re-reads is dropped exactly, in Python, before anything is loaded.
DATETIME_CURSOR_MARGIN = dt.timedelta(seconds=1)


def _query_bound(since: CursorState | None) -> Any:
    if since is None:
        return None
    value = plain_cursor(since.value)
    return value - DATETIME_CURSOR_MARGIN if isinstance(value, dt.datetime) else value


def stream_watermark(engine: Engine, mapping: CompiledMapping) -> CursorState | None:
    """Return the committed watermark of an incremental mapping (None: read everything)."""
    if mapping.spec.source.incremental is None:
        return None
    with session_factory(engine)() as session:
        return read_watermark(session, mapping.source, mapping.name)


def _lookups(mapping: CompiledMapping) -> dict[str, Lookup]:
    return {
        f.name: Lookup(by=f.lookup.by, system=f.lookup.system) for f in mapping.fields if f.lookup is not None
    }


def stage(migration: Migration, entity: str, raw: dict[str, pd.DataFrame]) -> StagedEntity:
    """Map the raw frames of one entity (keyed by raw asset name) into batches ready to load."""
    staged = StagedEntity(entity)
    for mapping in migration.mappings_for(entity):
        frame = raw.get(raw_asset_name(mapping))
        if frame is None:
            continue
        result: MappingResult = map_chunks(mapping, [frame] if len(frame.columns) else [])
        records = result.records
        if entity == "customer" and "name" in records.columns:
            records["name_normalized"] = records["name"].map(company_key)
        fields = [f.name for f in mapping.fields] + (["name_normalized"] if entity == "customer" else [])
        carried = frame.attrs.get(WATERMARK_ATTR)
        staged.batches.append(
            Batch(
                source=mapping.source,
                mapping=mapping.name,
                records=records,
                rejects=result.rejects,
                rows_read=result.rows_read,
                fields=fields,
                lookups=_lookups(mapping),
                watermark=(carried[0], CursorState.from_json(carried[1])) if carried else None,
            )
        )
    return staged


NAME_KEYS = {"customer": company_key, "sales_rep": person_key, "contact": person_key}
MATCH_KEY_FUNCTIONS = {"name": person_key}


def core_engine(url: str | None = None) -> Engine:
    """Return an engine for the core with the schema migrated to the latest revision."""
    engine = make_engine(url)
    upgrade(engine)
    return engine


def load(
    migration: Migration, engine: Engine, run_key: str, staged: StagedEntity, mode: str = "full"
) -> list[SourceStats]:
    """Load one staged entity into the core in one transaction; record its stats on the load run."""
    factory = session_factory(engine)
    with factory() as session, session.begin():
        run = get_or_start_run(session, run_key, migration.project.name, mode)
        key_functions = dict(MATCH_KEY_FUNCTIONS) if staged.entity in ("sales_rep", "contact") else {}
        loader = EntityLoader(
            session, run, staged.entity,
            match=migration.match_rules.get(staged.entity),
            key_functions=key_functions,
            name_keys=NAME_KEYS,
        )  # fmt: skip
        stats = loader.load(staged.batches)
        run.stats = {**(run.stats or {}), staged.entity: [s.as_dict() for s in stats]}
    return stats


# --------------------------------------------------------------------------- reconciliation


@dataclass
class ReconciliationLine:
    """Per source and entity: rows read vs loaded + merged + rejected, and amount sums."""

    source: str
    entity: str
    rows_read: int
    loaded: int
    merged: int
    rejected: int
    warnings: int
    amount_source: Decimal | None
    amount_core: Decimal | None

    @property
    def balanced(self) -> bool:
        """Return True when rows balance and the core holds the amounts the source gave."""
        rows_ok = self.rows_read == self.loaded + self.merged + self.rejected
        amounts_ok = self.amount_source is None or self.amount_source == self.amount_core
        return rows_ok and amounts_ok


@dataclass
class ReconciliationReport:
    """The reconciliation of one load run, plus the rejects it recorded."""

    run_key: str
    lines: list[ReconciliationLine]
    rejects: pd.DataFrame
    core_counts: dict[str, int]

    @property
    def balanced(self) -> bool:
        """Return True when every line balances."""
        return all(line.balanced for line in self.lines)

    def to_frame(self) -> pd.DataFrame:
        """Return the lines as a table."""
        return pd.DataFrame([{**line.__dict__, "balanced": line.balanced} for line in self.lines])

    def to_markdown(self) -> str:
        """Return the table as Markdown (Dagster metadata, README output)."""
        header = "| source | entity | read | loaded | merged | rejected | warnings | amount source | amount core | ok |"
        rows = [header, "|" + "---|" * 10]
        for line in self.lines:
            rows.append(
                f"| {line.source} | {line.entity} | {line.rows_read} | {line.loaded} | {line.merged} | {line.rejected} "
                f"| {line.warnings} | {_money(line.amount_source)} | {_money(line.amount_core)} | {'✅' if line.balanced else '❌'} |"
            )
        return "\n".join(rows)


def _money(value: Decimal | None) -> str:
    return "" if value is None else f"{value:,.2f}"


def reconcile(engine: Engine, run_key: str, entities: Sequence[str] | None = None) -> ReconciliationReport:
    """Build the reconciliation of ``run_key`` from its stats, the core's sums and its rejects."""
    factory = session_factory(engine)
    with factory() as session:
        run = session.scalar(select(LoadRun).where(LoadRun.run_key == run_key))
        if run is None:
            raise ConfigError(f"no load run '{run_key}' in the core")
        lines: list[ReconciliationLine] = []
        for entity, batch_stats in (run.stats or {}).items():
            if entities is not None and entity not in entities:
                continue
            for stats in batch_stats:
                amount, stored = stats.get("amount_loaded"), stats.get("amount_core")
                lines.append(ReconciliationLine(
                    source=stats["source"], entity=entity, rows_read=stats["rows_read"], loaded=stats["loaded"],
                    merged=stats["merged"], rejected=stats["rejected"], warnings=stats["warnings"],
                    amount_source=None if amount is None else Decimal(amount).quantize(Decimal("0.01")),
                    amount_core=None if stored is None else Decimal(stored).quantize(Decimal("0.01")),
                ))  # fmt: skip
        rejects = pd.read_sql(
            select(Reject.source, Reject.entity, Reject.location, Reject.row_ref, Reject.field, Reject.value,
                   Reject.rule, Reject.reason, Reject.severity).where(Reject.load_run_id == run.id)
            .order_by(Reject.id),
            session.connection(),
        )  # fmt: skip
        counts = {}
        for name, definition in ENTITIES.items():
            model: Any = definition.model
            query = select(func.count()).select_from(model)
            if hasattr(model, "merged_into_id"):
                query = query.where(model.merged_into_id.is_(None))
            counts[name] = session.scalar(query) or 0
    return ReconciliationReport(run_key, lines, rejects, counts)


def finish_run(engine: Engine, run_key: str, report: ReconciliationReport) -> None:
    """Mark a load run finished, succeeded when the reconciliation balances."""
    factory = session_factory(engine)
    with factory() as session, session.begin():
        run = session.scalar(select(LoadRun).where(LoadRun.run_key == run_key))
        if run is not None:
            run.status = "succeeded" if report.balanced else "unbalanced"
            run.finished_at = dt.datetime.now(dt.UTC)
