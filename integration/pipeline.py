"""The migration steps as plain functions: extract, stage (map + normalize), load, reconcile.

Dagster assets call these; so do the CLI and the tests. Nothing here knows about Dagster.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from functools import cached_property
from itertools import chain, islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from sqlalchemy import Connection, Engine, and_, case, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from crm_core.db import ensure_schema, make_engine, session_factory
from crm_core.entities import ENTITIES, LOAD_ORDER
from crm_core.errors import ConfigError, ExtractError, MappingError, Problem
from crm_core.failpoints import failpoint
from crm_core.loading import (
    EXTERNAL_KEY,
    HELD,
    Batch,
    EntityLoader,
    Lookup,
    MatchRules,
    NameResolver,
    SourceStats,
    StoredPieces,
    crosswalk_ids,
    get_or_start_run,
    row_hash,
)
from crm_core.models import Customer, ExternalId, LoadRun, MergeLog, Reject
from crm_core.runs import COMMITTED, PARTIAL, owner
from crm_core.validation import Rule, RuleContext, one_of, ruleset, validate
from crm_core.watermarks import CursorState, advance, plain_cursor, read_watermark
from integration.connectors import Connector, CsvConnector, ExcelConnector, ReadRequest, connector_for
from integration.connectors.base import (
    DEFAULT_CHUNK_ROWS,
    LOCATION,
    META_COLUMNS,
    ROW_KIND,
    ROW_REF,
    TEXT_DTYPE,
)
from integration.connectors.sql import SqlConnector
from integration.dedup.customers import located_company_keys
from integration.dedup.normalize import company_key, person_key
from integration.mappings.engine import (
    SOURCE,
    MappingResult,
    amount_sum,
    map_ahead,
    map_chunks,
    python_records,
    reject_repeated_keys,
    vanished_columns,
)
from integration.mappings.joins import join_chunks
from integration.mappings.joins import prepare as prepare_joins
from integration.mappings.money import RateTable
from integration.mappings.spec import CompiledMapping, load_mappings
from integration.project import Project, load_project
from integration.readback import CrosswalkRead, texts, unaccounted
from integration.reports import amount_text
from integration.rerun import (
    FINGERPRINT_ATTR,
    UNCHANGED_ATTR,
    UNCHANGED_KEY,
    Unchanged,
    carried_stats,
    copy_rejects,
    depends_on_core,
    file_digest,
    fingerprint_row,
    must_reload,
    record_fingerprints,
    shares_rows,
    stats_object,
)
from integration.spill import SpillFolder, StoredFrames

if TYPE_CHECKING:
    from integration.dedup.linkage import LinkageSpec

MODE_TAG = "crmi/mode"  # Dagster run tags carry the run options, so the UI shows them on every run
SAMPLE_TAG = "crmi/sample"
NO_SKIP_TAG = "crmi/no_skip"  # "true": a full run reads and loads every mapping, unchanged ones too
RUN_MODES = ("full", "delta", "trial")


@dataclass(frozen=True)
class RunOptions:
    """How a run reads and loads: ``full`` re-reads every source, ``delta`` reads from the watermarks,
    ``trial`` loads a sample of ``sample`` rows per source into a scratch core. A full run skips the mappings
    whose input did not change since the run that last loaded them (:mod:`integration.rerun`) unless
    ``no_skip``."""

    mode: str = "full"
    sample: int | None = None
    no_skip: bool = False

    def __post_init__(self) -> None:
        if self.mode not in RUN_MODES:
            raise ConfigError(f"unknown run mode '{self.mode}'; use one of: {', '.join(RUN_MODES)}")
        if self.sample is not None and (self.mode != "trial" or self.sample < 1):
            raise ConfigError("a sample size is for trial runs and must be at least 1")

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> RunOptions:
        """Read the options from a Dagster run's tags (no tags: a full run)."""
        sample = tags.get(SAMPLE_TAG)
        no_skip = tags.get(NO_SKIP_TAG, "").strip().lower() in ("1", "true", "yes")
        return cls(mode=tags.get(MODE_TAG, "full"), sample=int(sample) if sample else None, no_skip=no_skip)

    @property
    def skips_unchanged(self) -> bool:
        """Return True when this run may skip unchanged mappings: full runs, unless told not to."""
        return self.mode == "full" and not self.no_skip

    def tags(self) -> dict[str, str]:
        """Return the Dagster run tags that carry these options."""
        out = {MODE_TAG: self.mode}
        if self.sample is not None:
            out[SAMPLE_TAG] = str(self.sample)
        if self.no_skip:
            out[NO_SKIP_TAG] = "true"
        return out


ALLOW_OTHER_PROJECT = (
    "CRMI_ALLOW_OTHER_PROJECT"  # "1": a migration may load into a core another project loaded
)


def other_project_in_core(connection: Connection, project: str) -> str | None:
    """Return why ``project`` must not load into this core: another project's migration loaded it (runs not
    undone), so a forgotten ``--project``/``CRM_PROJECT`` (the demo is the default) would mix the two. None: it may.

    ``$CRMI_ALLOW_OTHER_PROJECT=1`` lets it (a project renamed in its project.yaml, two projects on purpose).
    """
    if os.environ.get(ALLOW_OTHER_PROJECT, "").strip().lower() in ("1", "true", "yes"):
        return None
    found = connection.execute(
        select(LoadRun.project, func.count(), func.max(LoadRun.id))
        .where(LoadRun.mode.in_(("full", "delta")), LoadRun.status.in_(COMMITTED), LoadRun.project != project)
        .group_by(LoadRun.project)
        .order_by(func.max(LoadRun.id).desc())
        .limit(1)
    ).first()
    if found is None:
        return None
    other, runs, last = found
    return (
        f"this core holds project '{other}' ({runs} migration run(s), the last id {last}), not '{project}': "
        f"point --project (or CRM_PROJECT) at {other}'s folder, or --core-url (or CRM_CORE_URL) at {project}'s "
        f"own core; to load '{project}' into it anyway (a renamed project), set {ALLOW_OTHER_PROJECT}=1"
    )


def start_run(engine: Engine, run_key: str, project: str, mode: str = "full") -> str:
    """Create the load run ``run_key`` (status running) unless it exists; return its status.

    Every step of a Dagster run calls this before it does anything, so a failure at any step, even before
    the first load, finds the run and marks it failed; steps after that see 'failed' and do not load.
    One indexed read when the run exists. A migration into a core that another project loaded is refused
    (:func:`other_project_in_core`) before the run is created.
    """
    query = select(LoadRun.status).where(LoadRun.run_key == run_key)
    with engine.connect() as connection:
        status = connection.scalar(query)
        if status is None:
            refused = other_project_in_core(connection, project) if mode in ("full", "delta") else None
            if refused is not None:
                connection.rollback()
                raise ConfigError(refused)
            host, pid = owner()
            values = {"run_key": run_key, "project": project, "mode": mode, "status": "running", "stats": {}}
            try:
                connection.execute(insert(LoadRun).values(**values, host=host, pid=pid))
                connection.commit()
                return "running"
            except IntegrityError:  # a step running in parallel created it first
                connection.rollback()
                status = connection.scalar(query)
        connection.rollback()
        return str(status)


@dataclass
class StagedEntity:
    """Canonical records of one entity from every mapping that targets it, ready to load."""

    entity: str
    batches: list[Batch] = field(default_factory=list)
    # Mappings skipped because their input did not change (integration.rerun), and the fingerprint of each
    # mapping read (None: none provable), recorded when it loads.
    unchanged: list[Unchanged] = field(default_factory=list)
    fingerprints: dict[str, str | None] = field(default_factory=dict)

    @property
    def records(self) -> int:
        """Return the number of mapped records."""
        return sum(b.record_count for b in self.batches)

    @property
    def rejects(self) -> int:
        """Return the number of mapping reject entries (errors and warnings)."""
        return sum(len(b.rejects) for b in self.batches)


class Migration:
    """A loaded project and its compiled mappings: the unit the pipeline steps work on."""

    def __init__(self, project: Project, mappings: list[CompiledMapping] | None = None) -> None:
        self.project = project
        self.rates = RateTable.of(project.spec.currencies)
        self.mappings: list[CompiledMapping] = (
            mappings
            if mappings is not None
            else load_mappings(
                list(project.mapping_files), sources={s: None for s in project.spec.sources}, rates=self.rates
            )
        )
        # Several mappings may read one source for one entity (two sheets, two tables, a fix sheet): one keeps
        # raw_<source>_<entity>, the others add their file name. The plain name goes to the source's own
        # mapping with the shortest file name (erp_u8_customers before erp_u8_customers_2024), so adding a
        # mapping does not rename the asset that was there (its history in the Dagster UI stays).
        self._raw_names: dict[Path, str] = {}
        names: dict[str, CompiledMapping] = {}
        problems = []
        keep_name_first = sorted(
            self.mappings, key=lambda m: (m.spec.source.system is not None, len(m.name), m.name)
        )
        for mapping in keep_name_first:
            asset = raw_asset_name(mapping)
            if asset in names:
                asset = f"{asset}_{_identifier(mapping.name)}"
            if asset in names:
                problems.append(
                    Problem(
                        f"{asset} is also produced by {names[asset].file.name}; rename one of the two files",
                        mapping.file,
                    )
                )
            names[asset] = mapping
            self._raw_names[mapping.file] = asset
        if problems:
            raise ConfigError(problems)

    def raw_asset(self, mapping: CompiledMapping) -> str:
        """Return the name of the raw asset that extracts a mapping's rows (see :func:`raw_asset_name`)."""
        return self._raw_names[mapping.file]

    @classmethod
    def load(cls, path: str | None = None) -> Migration:
        """Load the project at ``path`` (default: ``$CRM_PROJECT`` or the demo)."""
        return cls(load_project(path))

    @classmethod
    def for_mappings(
        cls, files: Sequence[Path], path: str | None = None, reading: Sequence[str] = ()
    ) -> Migration:
        """Load the project for work on some mapping files (preview, check): its mappings are those files.

        A consultant works on one mapping at a time: only those files, the project's settings and the sources
        they read (and those in ``reading``: scaffold's) must be valid. Problems elsewhere (another source's unset
        variable, another mapping file) become the project's warnings; ``crmi run`` (:meth:`load`) stays strict.
        """
        own = load_mappings(files)  # their own problems refuse; also names the sources they read
        project = load_project(path, sources={m.source for m in own} | set(reading))
        data = project.document.data
        declared = data["sources"] if isinstance(data, dict) and isinstance(data.get("sources"), dict) else {}
        sources: dict[str, list[str] | None] = {str(s): None for s in [*project.spec.sources, *declared]}
        rates = RateTable.of(project.spec.currencies)
        mappings = load_mappings(files, sources=sources, rates=rates)
        chosen = {file.resolve() for file in files}
        warnings = list(project.warnings)
        for other in project.mapping_files:
            if other.resolve() not in chosen:
                try:
                    load_mappings([other], sources=sources, rates=rates)
                except ConfigError as exc:
                    warnings.extend(exc.problems)
        return cls(replace(project, warnings=tuple(warnings)), mappings)

    @property
    def entities(self) -> list[str]:
        """Return the entities the project loads, in load order."""
        targets = {m.entity.name for m in self.mappings}
        return [e for e in LOAD_ORDER if e in targets]

    def mappings_for(self, entity: str) -> list[CompiledMapping]:
        """Return the mappings of an entity in load order: by the dedup source priority of their system,
        a system's own mappings before those that re-import its rows (fix sheets), so a correction wins."""
        priority = self.project.spec.dedup.get(entity)
        order = list(priority.source_priority) if priority else []
        chosen = [m for m in self.mappings if m.entity.name == entity]

        def rank(m: CompiledMapping) -> tuple[int, bool, str]:
            system = crosswalk_system(m)
            return order.index(system) if system in order else len(order), system != m.source, m.name

        return sorted(chosen, key=rank)

    def connector(self, source: str) -> Connector:
        """Return a connector for a project source."""
        return connector_for(self.project, source)

    @cached_property
    def rules(self) -> list[Rule]:
        """Return the validation rules: built-ins with the project's severities, plus its own rules."""
        config = self.project.spec.validation
        return ruleset(config.severity, [rule.spec() for rule in config.rules]) + self._currency_rules()

    def _currency_rules(self) -> list[Rule]:
        """Finance documents in a currency the project does not list (``currencies:``) are rejected."""
        currencies = self.project.spec.currencies
        if currencies is None:
            return []
        known = sorted({currencies.base, *currencies.rates, *currencies.dated})
        rules = []
        for entity in ("receivable", "payment"):
            for name in ("currency", "original_currency"):
                rule = one_of(entity, name, known, rule=f"{entity}.{name}.project")
                message = f"{name} is not a currency of this project (currencies: {', '.join(known)} in project.yaml)"
                rules.append(replace(rule, message=message))
        return rules

    @cached_property
    def linkage_spec(self) -> LinkageSpec:
        """Return the customer record-linkage rules: the project's, else the defaults."""
        from integration.dedup.customers import CUSTOMER_SPEC

        rules = self.project.spec.dedup.get("customer")
        return rules.linkage.to_spec() if rules is not None and rules.linkage is not None else CUSTOMER_SPEC

    @cached_property
    def after_golden_customers(self) -> frozenset[str]:
        """Return the entities that load after customer dedup: those naming their customer by name (a name
        resolves against the golden customers and every name merged into them), and those referencing them."""
        if "customer" not in self.entities:
            return frozenset()
        late = {entity for entity in self.entities if names_customers(self, entity)}
        for entity in self.entities:  # load order: a referenced entity comes first
            if any(f.references in late for f in ENTITIES[entity].references.values()):
                late.add(entity)
        return frozenset(late)

    @cached_property
    def match_rules(self) -> dict[str, MatchRules]:
        """Return the exact-key match rules per entity from project.yaml (customers have defaults)."""
        rules = {
            name: MatchRules(
                keys=[tuple(k) for k in rules.match_keys], conflict_fields=tuple(rules.conflict_fields)
            )
            for name, rules in self.project.spec.dedup.items()
        }
        # Without them, one company written twice with its credit code (a common ledger) loads as two
        # customers and breaks the core rule that a credit code belongs to one customer.
        rules.setdefault("customer", DEFAULT_CUSTOMER_MATCH)
        return rules


# What dedup.customer.match_keys / conflict_fields default to: the same credit code, or the same normalized
# name (region + trade name + branch marker), never across two different credit codes.
DEFAULT_CUSTOMER_MATCH = MatchRules(
    keys=[("credit_code",), ("name_normalized",)], conflict_fields=("credit_code",)
)


def raw_asset_name(mapping: CompiledMapping) -> str:
    """Return the base name of the raw asset of a mapping: ``raw_<source>_<entity>``.

    When several mappings read one source for one entity, all but one get ``_<file name>`` added
    (:meth:`Migration.raw_asset` gives the name in use).
    """
    return f"raw_{mapping.source}_{mapping.entity.name}"


def _identifier(name: str) -> str:
    """Return ``name`` as a Dagster-safe identifier (letters, digits and underscores)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def crosswalk_system(mapping: CompiledMapping) -> str:
    """Return the system a mapping's rows belong to in the crosswalk: ``source.system``, else its source."""
    return mapping.spec.source.system or mapping.source


def corrects_another_source(mapping: CompiledMapping) -> bool:
    """Return True for a mapping that re-imports corrected rows of another source (``system:``, a fix sheet)."""
    return crosswalk_system(mapping) != mapping.source


def read_request(mapping: CompiledMapping, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> ReadRequest:
    """Return what a mapping asks its connector to read."""
    source = mapping.spec.source
    return ReadRequest(
        table=source.location if source.query is None else f"query:{mapping.name}",
        where=source.where,
        query=source.query,
        key=tuple(source.read_key),
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
        # Lookups, link tables and aggregates: each summarised once, then joined onto every chunk.
        prepared = prepare_joins(mapping, connector) if mapping.joins else []
        yield from join_chunks(connector.read(request), prepared)
    finally:
        if isinstance(connector, SqlConnector):
            connector.dispose()


def file_fingerprint(path: Path) -> str:
    """Identify a file by name and content (SHA-256): a changed file is read again, a touched one is not."""
    return f"{path.name}|{file_digest(path)}"  # hashed once per process (the re-run fingerprint reads it too)


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


def table_catalog(migration: Migration, source: str) -> Callable[[str], list[str]]:
    """Return a function giving the columns of another table or sheet of ``source`` (LookupError: none such)."""
    cache: dict[str, list[str]] = {}

    def columns(table: str) -> list[str]:
        if table not in cache:
            connector = migration.connector(source)
            try:
                cache[table] = connector.columns(table)
            except ExtractError as exc:
                raise LookupError(str(exc)) from None
            finally:
                if isinstance(connector, SqlConnector):
                    connector.dispose()
        return cache[table]

    return columns


def empty_extract(migration: Migration, mapping: CompiledMapping) -> pd.DataFrame:
    """Return a frame with the source's columns and no rows."""
    columns = [*source_columns(migration, mapping), *(j.name for j in mapping.joins)]
    return pd.DataFrame({c: pd.Series(dtype=object) for c in [*columns, *META_COLUMNS]})


WATERMARK_ATTR = "watermark"  # DataFrame.attrs key: (stream, CursorState as JSON) of an incremental read


def extract(migration: Migration, mapping: CompiledMapping, since: CursorState | None = None) -> pd.DataFrame:
    """Return the raw rows of a mapping's source as one frame (source columns + row metadata).

    For incremental mappings only rows from the watermark ``since`` on are read; rows at the boundary
    that were loaded before are dropped, and the new watermark rides along in ``frame.attrs``.
    """
    extraction = Extraction(migration, mapping, since)
    chunks = list(extraction)
    frame = chunks[0] if len(chunks) == 1 else pd.concat(chunks, ignore_index=True)
    frame.attrs.update(extraction.attrs)
    return frame


def extract_to_files(
    migration: Migration,
    mapping: CompiledMapping,
    spill: SpillFolder,
    since: CursorState | None = None,
    each_chunk: Callable[[pd.DataFrame], None] | None = None,
) -> StoredFrames:
    """:func:`extract` chunk by chunk into ``spill``: the rows as files, one chunk held at a time.

    ``each_chunk`` sees every chunk as it is written (the extraction step's metadata).
    """
    extraction = Extraction(migration, mapping, since)
    paths, rows = [], 0
    for chunk in extraction:
        paths.append(spill.write(chunk, prefix="chunk"))
        rows += len(chunk)
        if each_chunk is not None:
            each_chunk(chunk)
    return StoredFrames(paths, rows, dict(extraction.attrs), source=mapping.source)


class Extraction:
    """The raw rows of a mapping's source, read chunk by chunk (see :func:`extract` for what is read).

    Iterating yields at least one chunk (with the source's columns, maybe no rows: a vanished column is
    caught every run); once it is done, ``attrs`` holds what the read carries on (the new watermark).
    """

    def __init__(
        self, migration: Migration, mapping: CompiledMapping, since: CursorState | None = None
    ) -> None:
        self.migration, self.mapping, self.since = migration, mapping, since
        self.attrs: dict[str, Any] = {}

    def __iter__(self) -> Iterator[pd.DataFrame]:
        migration, mapping, since = self.migration, self.mapping, self.since
        failpoint(f"extract:{mapping.name}")
        incremental = mapping.spec.source.incremental
        connector = migration.connector(mapping.source)
        matched_files: set[str] = set()
        if incremental is not None and incremental.files:
            matched_files = restrict_to_new_files(connector, mapping, since)
        by_cursor = incremental is not None and not incremental.files
        cursors: list[Any] = []
        keys: list[str] = []
        empty: pd.DataFrame | None = None
        yielded = False
        boundary = plain_cursor(since.value) if since is not None else None
        chunk_rows = migration.project.spec.chunk_rows
        for chunk in extract_chunks(migration, mapping, chunk_rows, since=since, connector=connector):
            if by_cursor and incremental is not None:
                chunk_keys = chunk[ROW_REF].astype(str)
                if since is not None:
                    values = chunk[incremental.cursor].map(plain_cursor)
                    at = (values == boundary) & chunk_keys.isin(since.keys)
                    kept = ~((values < boundary) | at)
                    chunk, chunk_keys = chunk.loc[kept].reset_index(drop=True), chunk_keys.loc[kept]
                cursors.extend(chunk[incremental.cursor])
                keys.extend(chunk_keys)
            if chunk.empty:
                empty = chunk if empty is None else empty
                continue
            yielded = True
            yield chunk
        if not yielded:
            yield empty if empty is not None else empty_extract(migration, mapping)
        if incremental is None:
            return
        if incremental.files:
            files_state = CursorState(
                "files", frozenset(matched_files | (since.keys if since else frozenset()))
            )
            self.attrs[WATERMARK_ATTR] = (mapping.name, files_state.to_json())
        elif not keys:
            self.attrs[WATERMARK_ATTR] = (mapping.name, since.to_json()) if since else None
        else:
            state = advance(since, cursors, keys)
            self.attrs[WATERMARK_ATTR] = (mapping.name, state.to_json()) if state else None


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
        return read_watermark(session, crosswalk_system(mapping), mapping.name)


def _lookups(mapping: CompiledMapping) -> dict[str, Lookup]:
    """The core lookups of a mapping's fields; a ``required`` field's reference must resolve (rejected if not)."""
    return {
        f.name: Lookup(by=f.lookup.by, system=f.lookup.system,
                       missing=f.lookup.missing or ("reject" if f.spec.required else None))
        for f in mapping.fields
        if f.lookup is not None
    }  # fmt: skip


def quarantine(
    mapping: CompiledMapping, records: pd.DataFrame, rules: Sequence[Rule], context: RuleContext | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Apply the validation rules: return the records to load and the quarantine entries (errors and warnings)."""
    violations = validate(mapping.entity.name, records, rules, context)
    if violations.empty:
        return records, violations.iloc[0:0]
    rows = records.loc[violations["index"]]
    amount = mapping.entity.amount_field
    entries = pd.DataFrame({
        "source": crosswalk_system(mapping), "entity": mapping.entity.name,
        "location": rows[LOCATION].astype(str).to_numpy(), "row_ref": rows[ROW_REF].astype(str).to_numpy(),
        "field": violations["field"].to_numpy(), "value": violations["value"].to_numpy(),
        "rule": violations["rule"].to_numpy(), "reason": violations["reason"].to_numpy(),
        "severity": violations["severity"].to_numpy(),
        "external_key": rows[EXTERNAL_KEY].to_numpy() if EXTERNAL_KEY in rows else None,
        "amount": rows[amount].to_numpy() if amount is not None and amount in rows else None,
    })  # fmt: skip
    failed = records.index.isin(violations.loc[violations["severity"] == "error", "index"])
    return records.loc[~failed].reset_index(drop=True), entries


def stage(
    migration: Migration,
    entity: str,
    raw: Mapping[str, pd.DataFrame | StoredFrames],
    context: RuleContext | None = None,
    spill: SpillFolder | None = None,
) -> StagedEntity:
    """Map the raw frames of one entity (keyed by raw asset name), validate, and batch them for loading.

    A raw input stored piece by piece (``StoredFrames``) is mapped and validated one piece at a time (keys
    and ``unique`` values repeated across pieces are rejected as within one frame); with ``spill`` each
    staged piece is written there and the batch refers to the files, so no step holds a whole source.
    """
    staged = StagedEntity(entity)
    for mapping in migration.mappings_for(entity):
        frame = raw.get(migration.raw_asset(mapping))
        if frame is None:
            continue
        marker = frame.attrs.get(UNCHANGED_ATTR)
        if marker is not None:  # skipped: nothing was read, its last load stands
            staged.unchanged.append(Unchanged.from_dict(marker))
            continue
        staged.fingerprints[mapping.name] = frame.attrs.get(FINGERPRINT_ATTR)
        carried = frame.attrs.get(WATERMARK_ATTR)
        seen_columns: set[str] = set()
        chunks = [frame] if isinstance(frame, pd.DataFrame) else _aligned(mapping, frame, seen_columns)
        piece_context = replace(context or RuleContext(), seen={})  # unique values: per source, across pieces
        first_rows: dict[Any, Any] = {}
        watermark = (carried[0], CursorState.from_json(carried[1])) if carried else None
        if spill is None:
            pieces = [_stage_piece(migration, mapping, chunk, piece_context, first_rows) for chunk in chunks]
            _require_columns(mapping, seen_columns)
            batch = pieces[0] if len(pieces) == 1 else _joined(pieces)
            staged.batches.append(replace(batch, watermark=watermark))
            continue
        paths: list[str] = []
        rejects: list[pd.DataFrame] = []  # kept in the batch, not in the piece files (Batch.pieces)
        locations: set[Any] = set()
        totals = {"records": 0, "rows_read": 0}
        amount_read: Decimal | None = None
        columns = pd.DataFrame()
        for chunk, mapped in map_ahead(mapping, chunks):  # the next chunks map while this one is staged
            piece = _stage_piece(migration, mapping, chunk, piece_context, first_rows, mapped)
            paths.append(
                spill.write_batch(
                    replace(piece, rejects=piece.rejects.iloc[0:0]),
                    META_COLUMNS,
                    prefix=_identifier(mapping.name),
                )
            )
            rejects.append(piece.rejects)
            if piece.raw is not None and LOCATION in piece.raw:
                locations.update(piece.raw[LOCATION].unique())
            totals["records"] += len(piece.records)
            totals["rows_read"] += piece.rows_read
            if piece.amount_read is not None:
                amount_read = (amount_read or Decimal(0)) + piece.amount_read
            columns = piece.records.iloc[0:0]
        _require_columns(mapping, seen_columns)
        if not paths:
            continue
        staged.batches.append(
            Batch(
                source=crosswalk_system(mapping),
                mapping=mapping.name,
                corrects=corrects_another_source(mapping),
                records=columns,
                rejects=pd.concat(rejects, ignore_index=True) if len(rejects) > 1 else rejects[0],
                rows_read=totals["rows_read"],
                fields=_staged_fields(mapping),
                lookups=_lookups(mapping),
                watermark=watermark,
                amount_read=amount_read,
                stored=StoredPieces(tuple(paths), totals["records"], tuple(len(r) for r in rejects)),
                locations=frozenset(locations),
            )
        )
    failpoint(f"stage:{entity}")
    return staged


def _aligned(
    mapping: CompiledMapping, chunks: Iterable[pd.DataFrame], seen: set[str]
) -> Iterator[pd.DataFrame]:
    """Yield the chunks with the source columns a chunk lacks added empty, noting in ``seen`` the columns read.

    The chunks of several workbooks or files differ in their columns; joined into one frame, a column one
    of them lacks was empty (text) for its rows. Only a column no chunk has is gone (:func:`_require_columns`).
    """
    wanted = mapping.source_columns()
    for chunk in chunks:
        if len(chunk.columns):  # a chunk without columns (nothing read) maps to no records
            seen.update(chunk.columns)
            lacking = [c for c in wanted if c not in chunk.columns]
            if lacking:
                chunk = chunk.assign(
                    **{c: pd.Series(None, index=chunk.index, dtype=TEXT_DTYPE) for c in lacking}
                )
        yield chunk


def _require_columns(mapping: CompiledMapping, seen: set[str]) -> None:
    """Raise the vanished-column error for the source columns no chunk of a stored raw input had."""
    if seen:
        missing = [c for c in mapping.source_columns() if c not in seen]
        if missing:
            raise vanished_columns(mapping, missing)


def _staged_fields(mapping: CompiledMapping) -> list[str]:
    written = mapping.written_fields()
    if mapping.entity.name != "customer":
        return written
    return [*written, "name_normalized", *([] if "is_branch" in written else ["is_branch"])]


def _stage_piece(
    migration: Migration,
    mapping: CompiledMapping,
    frame: pd.DataFrame,
    context: RuleContext,
    first_rows: dict[Any, Any],
    mapped: MappingResult | None = None,
) -> Batch:
    """Map (unless ``mapped`` already) and validate one piece of a mapping's raw rows into a batch.

    Its watermark is left to the caller.
    """
    entity = mapping.entity.name
    system = crosswalk_system(mapping)
    result: MappingResult = (
        # a frame without columns (nothing read) maps to no records
        map_chunks(mapping, [frame] if len(frame.columns) else [], first_rows=first_rows)
        if mapped is None
        else reject_repeated_keys(mapping, mapped, first_rows)
    )
    if system != mapping.source and len(result.rejects):
        result.rejects = result.rejects.assign(source=system)
    records = python_records(result.records)
    if system != mapping.source and SOURCE in records.columns:
        records[SOURCE] = system
    if entity == "customer" and "name" in records.columns:
        # the region completed from the record's location: one bare name in two cities is two keys
        records["name_normalized"] = located_company_keys(records)
        if "is_branch" not in mapping.written_fields():
            # a name that says it is a branch (…有限公司北京分公司) is one, its head office loaded or not
            records["is_branch"] = pd.Series(
                [isinstance(key, str) and key.rsplit("|", 1)[-1] != "" for key in records["name_normalized"]],
                index=records.index,
                dtype=object,  # Python booleans, as a mapping's own field (a bool column is stored as text)
            )
    amount_field = mapping.entity.amount_field
    amount_read = (
        amount_sum(records[amount_field]) + (result.amount_rejected or Decimal(0))
        if amount_field is not None and amount_field in records.columns
        else None
    )
    records, quarantined = quarantine(mapping, records, migration.rules, context)
    return Batch(
        source=system,
        mapping=mapping.name,
        corrects=corrects_another_source(mapping),
        records=records,
        rejects=pd.concat([result.rejects, quarantined], ignore_index=True)
        if len(quarantined)
        else result.rejects,
        rows_read=result.rows_read,
        fields=_staged_fields(mapping),
        lookups=_lookups(mapping),
        raw=frame,
        amount_read=amount_read,
    )


def _joined(pieces: list[Batch]) -> Batch:
    """One batch held whole from the pieces of a stored raw input staged without a spill folder."""
    amounts = [p.amount_read for p in pieces if p.amount_read is not None]
    raws = [p.raw for p in pieces if p.raw is not None]
    return replace(
        pieces[0],
        records=pd.concat([p.records for p in pieces], ignore_index=True),
        rejects=pd.concat([p.rejects for p in pieces], ignore_index=True),
        rows_read=sum(p.rows_read for p in pieces),
        raw=pd.concat(raws, ignore_index=True) if raws else None,
        amount_read=sum(amounts, Decimal(0)) if amounts else None,
    )


NAME_KEYS = {"customer": company_key, "sales_rep": person_key, "contact": person_key}
MATCH_KEY_FUNCTIONS = {"name": person_key}


def core_engine(url: str | None = None) -> Engine:
    """Return an engine for the core: an empty database gets the schema; another revision is refused."""
    engine = make_engine(url)
    try:
        ensure_schema(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine


def _sample_order(keys: pd.Series) -> pd.Series:
    """Return a stable pseudo-random rank per key (the same key ranks the same in every run)."""
    ranks = [
        int.from_bytes(hashlib.blake2b(k.encode("utf-8"), digest_size=7).digest()) for k in keys.astype(str)
    ]
    return pd.Series(ranks, index=keys.index, dtype="int64")


LeftOut = Mapping[tuple[str, str], set[str]]  # (entity, crosswalk system) → source keys a sample left out
LEFT_OUT_KEY = "left_out_keys"  # a trial's run.stats entry: the record keys its sample left out


def sample_batch(
    session: Session,
    entity: str,
    batch: Batch,
    size: int,
    names: dict[str, set[Any]] | None = None,
    left_out: LeftOut | None = None,
    keys: set[str] | None = None,
) -> Batch:
    """Return a trial sample of ``batch``: at most ``size`` source rows whose references the sample can resolve.

    Trial runs load entities in reference order, so a row is left out when a record it points at by source key
    was read but left out of its own sample (``left_out``, from :func:`sample_left_out`): the sample then loads
    without reference rejects that the full run would not have. A row pointing at a key that no source holds
    stays in, to be rejected as in the full run. Subtotal lines take no place a record row could take: they
    fill the places left (a table no larger than the sample comes whole). Rows are picked by a hash of their row reference: the same sample every time. ``names`` keeps the
    customer names read from the core between calls; ``keys`` are the batch's record keys when ``batch``
    holds only some of its records (:func:`sample_pieces`). The result says how many data rows the source read
    (``sampled_from``: its subtotal lines aside, as blank and title rows are) and which record keys the sample
    left out.
    """
    records = batch.records
    eligible = _sample_eligible(session, entity, batch, {} if names is None else names, left_out or {})
    candidates = _sample_candidates(records.loc[eligible], batch.rejects)
    chosen = set(map(tuple, candidates.nsmallest(size, "_rank")[[LOCATION, ROW_REF]].to_numpy()))
    chosen |= _spare_subtotals(batch.rejects, size - len(chosen))
    every_key = set(records[EXTERNAL_KEY].dropna().astype(str)) if keys is None else keys

    def picked(locations: pd.Series, refs: pd.Series) -> pd.Series:
        pairs = zip(locations.astype(str), refs.astype(str), strict=True)
        return pd.Series([p in chosen for p in pairs], index=locations.index, dtype=bool)

    # A branch whose parent (same entity) was read but fell outside the sample leaves the sample too.
    in_sample = eligible & picked(records[LOCATION], records[ROW_REF])
    sampled_keys = set(records.loc[in_sample, EXTERNAL_KEY].astype(str))
    for name, field_def in ENTITIES[entity].references.items():
        lookup = batch.lookups.get(name, Lookup())
        if field_def.references != entity or name not in records.columns or lookup.by != "external_id":
            continue
        parents = records[name]
        outside = parents.astype(str).isin(every_key) & ~parents.astype(str).isin(sampled_keys)
        orphan = in_sample & parents.notna() & outside
        chosen -= set(
            zip(
                records.loc[orphan, LOCATION].astype(str),
                records.loc[orphan, ROW_REF].astype(str),
                strict=True,
            )
        )

    raw = batch.raw
    if raw is not None and not raw.empty:
        raw = raw.loc[picked(raw[LOCATION], raw[ROW_REF])]
    sampled = records.loc[eligible & picked(records[LOCATION], records[ROW_REF])].reset_index(drop=True)
    rejects = batch.rejects.loc[picked(batch.rejects["location"], batch.rejects["row_ref"])]
    return replace(
        batch,
        records=sampled,
        rejects=rejects,
        rows_read=len(chosen),
        raw=raw,
        watermark=None,  # a sample must not move a stream's cursor
        amount_read=_sample_amount(entity, sampled, rejects),
        # the source's data rows: its subtotal lines are no record a full run loads or rejects
        sampled_from=(
            batch.rows_read - len(_subtotal_rows(batch.rejects))
            if batch.sampled_from is None
            else batch.sampled_from
        ),
        left_out_keys=frozenset(every_key - set(sampled[EXTERNAL_KEY].dropna().astype(str))),
    )


def sample_left_out(stats: Mapping[str, Any] | None) -> dict[tuple[str, str], set[str]]:
    """Return the source keys the samples of a trial's load run left out so far, from its ``run.stats``."""
    found: dict[tuple[str, str], set[str]] = {}
    for entity, entries in (stats or {}).items():
        for entry in entries if isinstance(entries, list) else ():
            keys = entry.get(LEFT_OUT_KEY)
            if keys:
                found.setdefault((entity, entry["source"]), set()).update(keys)
    return found


def _spare_subtotals(rejects: pd.DataFrame, spare: int) -> set[tuple[str, str]]:
    """Return the subtotal lines that fill the ``spare`` places a sample's rows left (ranked as they are)."""
    lines = sorted(_subtotal_rows(rejects))
    if spare <= 0 or not lines:
        return set()
    frame = pd.DataFrame(lines, columns=[LOCATION, ROW_REF])
    ranked = frame.assign(_rank=_sample_order(frame[LOCATION] + ":" + frame[ROW_REF])).nsmallest(
        spare, "_rank"
    )
    return set(zip(ranked[LOCATION], ranked[ROW_REF], strict=True))


def _subtotal_rows(rejects: pd.DataFrame) -> set[tuple[str, str]]:
    """Return the (location, row) of the subtotal lines among the rejected rows."""
    if "rule" not in rejects.columns or rejects.empty:
        return set()
    lines = rejects.loc[rejects["rule"] == "subtotal", ["location", "row_ref"]].astype(str)
    return set(zip(lines["location"], lines["row_ref"], strict=True))


def _sample_amount(entity: str, records: pd.DataFrame, rejects: pd.DataFrame) -> Decimal | None:
    """Return the money a sample read, as a full run counts it: its records' and its rejected rows' amounts.

    Each rejected row (not a subtotal line) counts once, with the amount it was mapped to where one was read;
    warnings are on rows among the records.
    """
    field = ENTITIES[entity].amount_field
    if field is None or field not in records.columns:
        return None
    total = amount_sum(records[field])
    if len(rejects) and "amount" in rejects.columns:
        blank = pd.Series(None, index=rejects.index, dtype=object)
        severity = rejects.get("severity", blank).fillna("error")
        rule = rejects.get("rule", blank)
        errors = rejects[(severity == "error") & (rule != "subtotal")]
        per_row = errors.groupby(["location", "row_ref"], dropna=False, sort=False)["amount"].first()
        total += amount_sum(per_row)
    return total


def _sample_eligible(
    session: Session, entity: str, batch: Batch, names: dict[str, set[Any]], left_out: LeftOut
) -> pd.Series:
    """Return which records of ``batch`` may be sampled: none they point at was left out of its sample."""
    records = batch.records
    eligible = pd.Series(True, index=records.index)
    for name, field_def in ENTITIES[entity].references.items():
        lookup = batch.lookups.get(name, Lookup())
        if name in records.columns and lookup.by == "name" and field_def.references == "customer" != entity:
            # A row naming its customer qualifies when a sampled customer carries that name: the rest would
            # wait for a steward only because the sample left their customer out.
            if "customer" not in names:
                names["customer"] = set(
                    session.scalars(
                        select(Customer.name_normalized).where(Customer.name_normalized.is_not(None))
                    )
                )
            values = records[name]
            eligible &= values.isna() | values.map(
                lambda v: company_key(v) if isinstance(v, str) else None
            ).isin(names["customer"])
            continue
        if name not in records.columns or lookup.by != "external_id" or field_def.references == entity:
            continue
        values = records[name]
        given = values.notna()
        system = lookup.system or batch.source
        referenced = field_def.references or ""
        known = crosswalk_ids(session, referenced, system, values[given].astype(str))
        # A key no source holds is rejected by the full run too: the sample keeps (and rejects) its row.
        missed = left_out.get((referenced, system), set())
        eligible &= ~given | values.astype(str).isin(known) | ~values.astype(str).isin(missed)
    return eligible


def _sample_candidates(records: pd.DataFrame, rejects: pd.DataFrame) -> pd.DataFrame:
    """Return the (location, row) a sample picks among, ranked: these records and the rejected rows.

    Subtotal lines are not among them (they fill the places left: see :func:`sample_batch`).
    """
    rule = (
        rejects["rule"] if "rule" in rejects.columns else pd.Series(None, index=rejects.index, dtype=object)
    )
    candidates = pd.concat([
        records[[LOCATION, ROW_REF]].astype(str),
        rejects.loc[(rejects["severity"] == "error") & (rule != "subtotal"), ["location", "row_ref"]]
        .astype(str).set_axis([LOCATION, ROW_REF], axis=1),
    ]).drop_duplicates()  # fmt: skip
    candidates = candidates.loc[~_pairs_in(candidates, _subtotal_rows(rejects))]
    return candidates.assign(_rank=_sample_order(candidates[LOCATION] + ":" + candidates[ROW_REF]))


def _pairs_in(frame: pd.DataFrame, pairs: set[tuple[str, str]]) -> pd.Series:
    """Return which rows of ``frame`` have their (location, row) among ``pairs``."""
    found = [p in pairs for p in zip(frame[LOCATION].astype(str), frame[ROW_REF].astype(str), strict=True)]
    return pd.Series(found, index=frame.index, dtype=bool)


def sample_pieces(
    session: Session, entity: str, batch: Batch, size: int, left_out: LeftOut | None = None
) -> Batch:
    """:func:`sample_batch` of a batch stored in pieces, read one at a time: only the sampled rows are held.

    The first pass ranks each piece's candidates and keeps the ``size`` best; the second takes the records
    and raw rows chosen, which :func:`sample_batch` then samples as it would the whole batch.
    """
    if batch.stored is None:
        return sample_batch(session, entity, batch, size, left_out=left_out)
    names: dict[str, set[Any]] = {}
    keys: set[str] = set()
    best = _sample_candidates(batch.records.iloc[0:0], batch.rejects).nsmallest(size, "_rank")
    for piece in batch.pieces():
        keys.update(piece.records[EXTERNAL_KEY].dropna().astype(str))
        eligible = _sample_eligible(session, entity, piece, names, left_out or {})
        ranked = _sample_candidates(piece.records.loc[eligible], piece.rejects.iloc[0:0])
        best = pd.concat([best, ranked]).drop_duplicates([LOCATION, ROW_REF]).nsmallest(size, "_rank")
    # every subtotal line: sample_batch keeps those that fill the places left
    chosen = set(zip(best[LOCATION], best[ROW_REF], strict=True)) | _subtotal_rows(batch.rejects)

    def picked(frame: pd.DataFrame) -> pd.DataFrame:
        pairs = zip(frame[LOCATION].astype(str), frame[ROW_REF].astype(str), strict=True)
        return frame.loc[[p in chosen for p in pairs]]

    records, raws = [], []
    for piece in batch.pieces():
        records.append(picked(piece.records))
        if piece.raw is not None and not piece.raw.empty:
            raws.append(picked(piece.raw))
    reduced = replace(
        batch,
        records=_rows_of(records),
        raw=_rows_of(raws) if raws else None,
        stored=None,
        locations=None,  # where the sampled rows were read, as for a batch held whole
    )
    return sample_batch(session, entity, reduced, size, names, left_out, keys)


def _rows_of(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Join the rows of frames with the same columns (none: the first one's columns, no rows)."""
    filled = [f for f in frames if len(f)]
    return pd.concat(filled, ignore_index=True) if filled else frames[0].iloc[0:0].reset_index(drop=True)


def names_customers(migration: Migration, entity: str) -> bool:
    """Return True when some mapping of ``entity`` finds its customer by name (the workbook's 商机 sheet)."""
    definition = ENTITIES[entity]
    return entity != "customer" and any(
        field.lookup is not None
        and field.lookup.by == "name"
        and definition.fields[field.name].references == "customer"
        for mapping in migration.mappings_for(entity)
        for field in mapping.fields
        if field.name in definition.fields
    )


def name_resolvers(migration: Migration, session: Session, entity: str) -> dict[str, NameResolver]:
    """Return the resolvers for names that match no customer exactly (variants, the match index, stewards)."""
    if not names_customers(migration, entity):
        return {}
    from integration.dedup.references import CustomerNames

    return {"customer": CustomerNames(session, migration.linkage_spec)}


def _close_resolvers(resolvers: Mapping[str, NameResolver], *, kill: bool = False) -> None:
    """Stop the helper processes the name resolvers started (``kill``: without waiting for their work)."""
    for resolver in resolvers.values():
        close = getattr(resolver, "close", None)
        if close is not None:
            close(kill=kill)


def load(
    migration: Migration,
    engine: Engine,
    run_key: str,
    staged: StagedEntity,
    mode: str = "full",
    sample: int | None = None,
    prepare: Callable[[Session, int, list[Batch]], list[Batch]] | None = None,
    finish: Callable[[Session, int, list[Batch]], None] | None = None,
) -> list[SourceStats]:
    """Load one staged entity into the core in one transaction; record its stats on the load run.

    With ``sample`` (trial runs) each source contributes at most that many rows, chosen by :func:`sample_batch`.
    ``prepare(session, run_id, batches)`` returns the batches to load, decided in the load's own transaction
    (a sync's ownership check: nothing can change the records between its reading them and the load's write);
    ``finish(session, run_id, batches)`` runs after the loader, before the commit.
    Mappings skipped as unchanged (``staged.unchanged``) keep their last load: their stats and quarantine
    entries are carried over from it. Those this run must read after all (it changed what they depend on)
    are read by :func:`reload_if_needed`, which the caller runs first (the core step, into its spill folder).
    """
    factory = session_factory(engine)
    stats: list[SourceStats] = []
    with factory() as session, session.begin():
        run = get_or_start_run(session, run_key, migration.project.name, mode)
        if sample is not None:
            left_out = sample_left_out(run.stats)
            staged = replace(
                staged,
                batches=[sample_pieces(session, staged.entity, b, sample, left_out) for b in staged.batches],
            )
        if prepare is not None:
            staged = replace(staged, batches=prepare(session, run.id, list(staged.batches)))
        if staged.batches:  # nothing to load when every mapping was skipped: not even the loader's index
            key_functions = dict(MATCH_KEY_FUNCTIONS) if staged.entity in ("sales_rep", "contact") else {}
            resolvers = name_resolvers(migration, session, staged.entity)
            try:
                loader = EntityLoader(
                    session, run, staged.entity,
                    match=migration.match_rules.get(staged.entity),
                    key_functions=key_functions,
                    name_keys=NAME_KEYS,
                    name_resolvers=resolvers,
                )  # fmt: skip
                stats = loader.load(staged.batches)
            except BaseException:
                _close_resolvers(resolvers, kill=True)  # a failed or interrupted load waits for no helper
                raise
            _close_resolvers(resolvers)
        if finish is not None:
            finish(session, run.id, list(staged.batches))
        failpoint(f"load:{staged.entity}:before_commit")
    failpoint(f"load:{staged.entity}:after_commit")
    # Checked after the commit, reading the core back: what landed, not what the loader believes it wrote.
    with factory() as session, session.begin():
        run = get_or_start_run(session, run_key, migration.project.name, mode)
        checked = [
            {**s.as_dict(), **verify_pieces(session, run, staged.entity, b), **_sample_entry(b)}
            for s, b in zip(stats, staged.batches, strict=True)
        ]
        connection = session.connection()
        carried = [carried_stats(connection, u) for u in staged.unchanged]
        copy_rejects(connection, run.id, staged.unchanged)
        _record_loaded(connection, migration, run.id, staged, stats, sample)
        order = [m.name for m in migration.mappings_for(staged.entity)]
        entries = sorted([*checked, *carried], key=lambda e: order.index(e["mapping"]))
        run.stats = {**(run.stats or {}), staged.entity: entries}
    return [*stats, *(stats_object(c) for c in carried)]


def _sample_entry(batch: Batch) -> dict[str, Any]:
    """Return what a run.stats entry says of a trial's sample: the rows its source read, the keys left out."""
    if batch.sampled_from is None:
        return {}
    return {"rows_in_source": batch.sampled_from, LEFT_OUT_KEY: sorted(batch.left_out_keys)}


def reload_if_needed(
    migration: Migration,
    engine: Engine,
    run_key: str,
    staged: StagedEntity,
    spill: SpillFolder | None = None,
) -> StagedEntity:
    """Read and stage now the skipped mappings that depend on what this run already changed in the core.

    Idempotent: what it returns has no skipped mapping left that would need it. With ``spill`` they are read
    and staged piece by piece into that folder, as the extraction and staging steps do.
    """
    if not staged.unchanged:
        return staged
    mappings = {m.name: m for m in migration.mappings_for(staged.entity)}
    with engine.connect() as connection:
        run_id = connection.scalar(select(LoadRun.id).where(LoadRun.run_key == run_key))

        def must(item: Unchanged, loading: bool) -> bool:
            return run_id is None or must_reload(connection, run_id, mappings[item.mapping], item, loading)

        loading = bool(staged.batches)
        again = [u for u in staged.unchanged if must(u, loading)]
        read = [(b.source, _places(b)) for b in staged.batches]
        while True:
            # A skipped mapping reading the rows of one read now (a fix sheet and its source) is read too.
            reading = read + [(u.system, set(u.locations)) for u in again]
            more = [
                u for u in staged.unchanged if u not in again and any(shares_rows(u, *r) for r in reading)
            ]
            if again and not loading:
                # Reading these loads the entity after all: a skipped mapping that must load whenever another
                # mapping of its entity does (a branch's parent) is read now too.
                more += [u for u in staged.unchanged if u not in again and u not in more and must(u, True)]
            if not more:
                break
            again += more
    if not again:
        return staged
    raw: dict[str, pd.DataFrame | StoredFrames] = {}
    for item in again:
        mapping = mappings[item.mapping]
        frame = extract(migration, mapping) if spill is None else extract_to_files(migration, mapping, spill)
        frame.attrs[FINGERPRINT_ATTR] = item.fingerprint
        raw[migration.raw_asset(mapping)] = frame
    extra = stage(migration, staged.entity, raw, spill=spill)
    order = [m.name for m in migration.mappings_for(staged.entity)]
    return replace(
        staged,
        batches=sorted([*staged.batches, *extra.batches], key=lambda b: order.index(b.mapping)),
        unchanged=[u for u in staged.unchanged if u not in again],
        fingerprints={**staged.fingerprints, **extra.fingerprints},
    )


def _places(batch: Batch) -> set[Any]:
    """Return the tables, sheets or files a batch's rows were read from (their ``_location``)."""
    if batch.locations is not None:
        return set(batch.locations)
    raw = batch.raw
    return set(raw[LOCATION].unique()) if raw is not None and LOCATION in raw else set()


def _record_loaded(
    connection: Any,
    migration: Migration,
    run_id: int,
    staged: StagedEntity,
    stats: Sequence[SourceStats],
    sample: int | None,
) -> None:
    """Record the fingerprint of each mapping this load read (a sample or a delta records none).

    Two mappings of one system reading one table or sheet (a fix sheet keeps its rows' original ``_location``)
    are fingerprinted each: their quarantine entries are told apart by mapping, and one is skipped only
    with the other (:func:`reload_if_needed`).
    """
    mappings = {m.name: m for m in migration.mappings_for(staged.entity)}
    places = {batch.mapping: _places(batch) for batch in staged.batches}
    rows = []
    for batch, batch_stats in zip(staged.batches, stats, strict=True):
        mapping = mappings[batch.mapping]
        fingerprint = None if sample is not None else staged.fingerprints.get(batch.mapping)
        locations = sorted(places[batch.mapping], key=str)
        dependent = depends_on_core(connection, run_id, mapping, batch.source, locations, batch_stats.held)
        rows.append(fingerprint_row(run_id, migration.project.name, mapping, batch.source,
                                    fingerprint, locations, dependent))  # fmt: skip
    record_fingerprints(connection, rows)


SPOT_CHECK_SIZE = 25
SPOT_CHECK_LOOKS = (
    8  # records looked at per spot check at most (those a sync or edit changed are passed over)
)


def _comparable(value: Any) -> Any:
    """Return a form in which a mapped value and the value read back from the core compare equal."""
    if value is None or (isinstance(value, float) and value != value) or value is pd.NaT:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float | Decimal):
        return format(Decimal(str(value)).normalize(), "f")
    if isinstance(value, dt.datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        return aware.astimezone(dt.UTC).replace(tzinfo=None).isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    return str(value)


def verify_pieces(session: Session, run: LoadRun, entity: str, batch: Batch) -> dict[str, Any]:
    """:func:`verify_batch` for a batch piece by piece (one piece when held whole), the findings added up."""
    rejected = _quarantined_rows(session, run, entity, batch.source)
    survivors = _merge_survivors(session, entity)
    changed_since = _changed_outside_migration(session, run)
    crosswalk = CrosswalkRead.for_batch(session.connection(), entity, batch.source, batch.record_count)
    found: dict[str, Any] | None = None
    pieces = len(batch.stored.paths) if batch.stored is not None else 1
    for number, piece in enumerate(batch.pieces(raw=False)):  # the raw rows' location and row only
        # The batch's spot checks spread evenly over its pieces, at most SPOT_CHECK_SIZE in all; a piece
        # with fewer records to check than its share leaves the rest to the next.
        due = -(-SPOT_CHECK_SIZE * (number + 1) // pieces) - (found["spot_checked"] if found else 0)
        checked = verify_batch(session, run, entity, piece, rejected=rejected, survivors=survivors,
                               spot_checks=max(due, 0), crosswalk=crosswalk, changed_since=changed_since)  # fmt: skip
        if found is None:
            found = checked
            continue
        for key, value in checked.items():
            found[key] = found[key] + value
    if found is None:
        return verify_batch(session, run, entity, batch, rejected=rejected, survivors=survivors,
                            crosswalk=crosswalk, changed_since=changed_since)  # fmt: skip
    found["missing_sample"] = found["missing_sample"][:20]
    found["spot_sample"] = found["spot_sample"][:5]
    return found


@dataclass(frozen=True)
class Quarantined:
    """The (location, row) of every row a run quarantined for one source and entity, as two arrays of text."""

    locations: np.ndarray
    refs: np.ndarray


def _quarantined_rows(session: Session, run: LoadRun, entity: str, source: str) -> Quarantined:
    """The (location, row) of every row this run quarantined (rejected or held) for one source and entity."""
    rows = session.execute(
        select(Reject.location, Reject.row_ref).where(
            Reject.load_run_id == run.id, Reject.source == source, Reject.entity == entity, Reject.severity.in_(("error", "held"))
        )
    ).all()  # fmt: skip
    return Quarantined(texts([loc for loc, _ in rows]), texts([ref for _, ref in rows]))


def _changed_outside_migration(session: Session, run: LoadRun) -> set[int]:
    """The runs other than ``run`` that change core records other than by a migration's load (syncs, edits,
    steward decisions)."""
    query = select(LoadRun.id).where(LoadRun.mode.not_in(RUN_MODES), LoadRun.id != run.id)
    return set(session.scalars(query))


def _merge_survivors(session: Session, entity: str) -> set[int]:
    """The records standing for others after a merge not undone (golden records)."""
    return set(session.scalars(
        select(MergeLog.survivor_id).where(MergeLog.entity == entity, MergeLog.undone_at.is_(None))
    ))  # fmt: skip


def verify_batch(
    session: Session,
    run: LoadRun,
    entity: str,
    batch: Batch,
    *,
    rejected: Quarantined | None = None,
    survivors: set[int] | None = None,
    spot_checks: int = SPOT_CHECK_SIZE,
    crosswalk: CrosswalkRead | None = None,
    changed_since: set[int] | None = None,
) -> dict[str, Any]:
    """Compare what one batch should have put in the core with what is there.

    Key set: every row read is in the crosswalk (loaded or merged) or quarantined in this run; anything else is
    reported as missing. Spot check: for a sample of records this source created, the core's values hash the
    same as the mapped ones (references, which hold source keys in the batch, are left out), ``spot_checks`` of
    them at most, passing over records a run in ``changed_since`` (syncs, edits) changed since. ``rejected``,
    ``survivors``, the batch's ``crosswalk`` entries and ``changed_since`` are read from the core when not given
    (:func:`verify_pieces` reads them once).
    """
    definition = ENTITIES[entity]
    records = batch.records
    read = (np.empty(0, dtype=object), np.empty(0, dtype=object))
    if batch.raw is not None and not batch.raw.empty:
        data = (
            batch.raw if ROW_KIND not in batch.raw.columns else batch.raw[batch.raw[ROW_KIND] != "subtotal"]
        )
        read = (
            data[LOCATION].astype(str).to_numpy(dtype=object),
            data[ROW_REF].astype(str).to_numpy(dtype=object),
        )
    if rejected is None:
        rejected = _quarantined_rows(session, run, entity, batch.source)
    keys = (
        records[EXTERNAL_KEY].astype(str).to_numpy(dtype=object)
        if len(records)
        else np.empty(0, dtype=object)
    )
    if crosswalk is None:
        crosswalk = CrosswalkRead.read(session.connection(), entity, batch.source, keys.tolist())
    at = crosswalk.lookup(keys)
    found = at >= 0
    landed = (
        (texts(records[LOCATION][found]), texts(records[ROW_REF][found]))
        if len(records)
        else (np.empty(0, dtype=object), np.empty(0, dtype=object))
    )
    keys_read, missing = unaccounted(read, [landed, (rejected.locations, rejected.refs)])
    fields = [
        name for name in batch.fields
        if name in definition.fields and not definition.fields[name].references and name != "stage"
    ]  # fmt: skip
    # Golden records took values from the records merged into them (fill blanks, survivorship rules):
    # they no longer equal their own source row, so the spot check samples records no merge touched.
    if survivors is None:
        survivors = _merge_survivors(session, entity)
    entity_ids = np.zeros(len(keys), dtype=np.int64)
    entity_ids[found] = crosswalk.entity_ids[at[found]]
    created = np.zeros(len(keys), dtype=bool)
    created[found] = crosswalk.created[at[found]]
    # A record holds what the mapping that last wrote its key loaded: a fix sheet's rows are compared with the
    # records it wrote last, the source's own rows with those no fix sheet wrote (a superseded fix sheet row or a
    # source row a fix sheet corrected holds the other one's values).
    marks = pd.Series(crosswalk.corrected_by[at[found]], dtype=object)
    created[found] &= (marks.eq(batch.mapping) if batch.corrects else marks.isna()).to_numpy(dtype=bool)
    created &= ~np.isin(entity_ids, np.fromiter(survivors, dtype=np.int64, count=len(survivors)))
    positions = np.flatnonzero(created)
    step = max(1, len(positions) // max(spot_checks, 1))
    mismatches: list[dict[str, Any]] = []
    sampled: list[int] = []
    model: Any = definition.model
    # A record a sync, a steward or an edit changed after its load holds what they wrote, on purpose: it is
    # not compared with its source row (the sample takes the next record instead).
    if changed_since is None:
        changed_since = _changed_outside_migration(session, run)
    evenly = positions[::step].tolist()
    chosen = set(evenly)
    # At most SPOT_CHECK_LOOKS times the checks are looked at (their stamps read a block at a time): on a
    # live core whose syncs touched most records the check stays a sample, not a walk through the batch.
    looked_at = list(islice(chain(evenly, (p for p in positions.tolist() if p not in chosen)),
                            SPOT_CHECK_LOOKS * max(spot_checks, 0)))  # fmt: skip
    stamped = getattr(model, "updated_run_id", None)
    for start in range(0, len(looked_at), 2 * max(spot_checks, 1)):
        if len(sampled) >= spot_checks:
            break
        block = looked_at[start : start + 2 * max(spot_checks, 1)]
        if stamped is not None and changed_since:
            ids = [int(entity_ids[p]) for p in block]
            stamps: dict[int, Any] = {
                i: r for i, r in session.execute(select(model.id, stamped).where(model.id.in_(ids)))
            }
            block = [p for p in block if stamps.get(int(entity_ids[p])) not in changed_since]
        sampled.extend(block[: spot_checks - len(sampled)])
    for position in sampled:
        record = session.get(model, int(entity_ids[position]))
        row = records.iloc[position]
        mapped = {n: _comparable(row[n]) for n in fields if _comparable(row[n]) is not None}
        stored = {n: _comparable(getattr(record, definition.fields[n].column)) for n in mapped}
        if row_hash(mapped) != row_hash(stored):
            differing = sorted(n for n in mapped if mapped[n] != stored[n])
            mismatches.append({"key": keys[position], "fields": differing,
                               "mapped": {n: mapped[n] for n in differing}, "core": {n: stored[n] for n in differing}})  # fmt: skip
    return {
        "keys_read": keys_read, "keys_missing": len(missing),
        "missing_sample": [f"{loc}:{ref}" for loc, ref in missing[:20]],
        "spot_checked": len(sampled), "spot_mismatches": len(mismatches), "spot_sample": mismatches[:5],
    }  # fmt: skip


# --------------------------------------------------------------------------- reconciliation


@dataclass
class ReconciliationLine:
    """Per source and entity: rows read vs loaded + merged + rejected + held, and the money of each."""

    source: str
    entity: str
    rows_read: int
    loaded: int
    merged: int
    rejected: int
    warnings: int
    amount_source: Decimal | None  # every record row read: loaded, merged and quarantined
    amount_core: Decimal | None  # what the core holds for the loaded rows, read back
    keys_missing: int = 0  # rows read that are neither in the crosswalk nor quarantined
    spot_checked: int = 0
    spot_mismatches: int = 0  # sampled records whose core values differ from the mapped ones
    # the first of them: {"key", "fields", "mapped", "core"}
    spot_sample: list[dict[str, Any]] = field(default_factory=list)
    held: int = 0  # rows waiting for a steward's reference decision
    subtotals: int = 0  # subtotal/total lines among the rejected: not records
    # Among the merged: fix sheet rows whose source row loaded by itself (corrected at the source), not written
    superseded: int = 0
    amount_loaded: Decimal | None = None  # what the loaded rows carried (compared with amount_core)
    amount_merged: Decimal | None = None
    amount_quarantined: Decimal | None = None  # every rejected and held row's money, corrected ones too
    amount_unreadable: int = 0  # quarantined rows whose amount could not be read
    max_quarantined_share: float = 1.0  # the project's limit (reconciliation.max_quarantined_share)
    mapping: str = ""  # the mapping file the rows were read by
    unchanged_since: str | None = None  # skipped: the run whose load (and counts) this line carries over
    # Rejected or held rows (subtotals aside) whose key a re-imported fix sheet loaded: in the core, not
    # quarantined; one row per key (see ``_one_row_per_key``). ``corrected_held``: the held ones among them
    # (no longer waiting for a steward).
    corrected: int = 0
    amount_corrected: Decimal | None = None
    corrected_held: int = 0
    # A trial's sample: the data rows its source read, subtotal lines aside (``rows_read`` counts the sampled
    # rows, with the subtotal lines that filled places the records left); None: every row.
    rows_in_source: int | None = None

    @property
    def sampled_data_rows(self) -> int:
        """Return the data rows among the rows read: the subtotal lines aside, which are no record."""
        return self.rows_read - self.subtotals

    @property
    def left_out(self) -> int:
        """Return the data rows of the source a trial's sample left out (0 outside a trial)."""
        return 0 if self.rows_in_source is None else self.rows_in_source - self.sampled_data_rows

    @property
    def waiting(self) -> int:
        """Return the held rows still waiting for a steward's decision: held, less those a fix sheet loaded."""
        return self.held - self.corrected_held

    @property
    def quarantined(self) -> int:
        """Return the record rows that did not load: rejected or held (subtotal lines and corrected rows aside)."""
        return self.rejected - self.subtotals - self.corrected + self.held

    @property
    def amount_in_quarantine(self) -> Decimal | None:
        """Return the money of the quarantined rows: :attr:`amount_quarantined` less the corrected rows'."""
        if self.amount_quarantined is None:
            return None
        return self.amount_quarantined - (self.amount_corrected or Decimal(0))

    @property
    def quarantined_rows_share(self) -> float:
        """Return the quarantined share of the record rows read (subtotal lines aside)."""
        records = self.rows_read - self.subtotals
        return self.quarantined / records if records > 0 else 0.0

    @property
    def quarantined_amount_share(self) -> float | None:
        """Return the quarantined share of the money read, or None when the line reads no money."""
        money = self.amount_in_quarantine
        if not self.amount_source or money is None:
            return None
        return float(abs(money) / abs(self.amount_source))

    @property
    def quarantined_share(self) -> float:
        """Return the larger of the quarantined share of the record rows and of the money read."""
        return max(self.quarantined_rows_share, self.quarantined_amount_share or 0.0)

    def quarantined_shares(self) -> list[tuple[str, float]]:
        """Return ``("rows", share)`` and, for a line with money, ``("amount", share)``: what each share is of."""
        shares = [("rows", self.quarantined_rows_share)]
        if self.quarantined_amount_share is not None:
            shares.append(("amount", self.quarantined_amount_share))
        return shares

    @property
    def rows_balance(self) -> bool:
        """Return True when every row read is loaded, merged, rejected or held."""
        return self.rows_read == self.loaded + self.merged + self.rejected + self.held

    @property
    def amounts_balance(self) -> bool:
        """Return True when the money read is what loaded + merged + quarantined carry, and the core holds it."""
        if self.amount_source is None:
            return True
        loaded = self.amount_loaded if self.amount_loaded is not None else self.amount_source
        parts = [self.amount_merged, self.amount_quarantined]
        accounted = loaded + sum((p for p in parts if p is not None), Decimal(0))
        return accounted == self.amount_source and loaded == self.amount_core

    @property
    def balanced(self) -> bool:
        """Return True when rows and keys balance, amounts agree, and the spot check found no difference."""
        return (
            self.rows_balance
            and self.amounts_balance
            and self.keys_missing == 0
            and self.spot_mismatches == 0
        )

    @property
    def over_quarantine_limit(self) -> bool:
        """Return True when more of the rows or money is quarantined than the project allows."""
        return self.quarantined_share > self.max_quarantined_share

    @property
    def status(self) -> str:
        """Return ``clean`` (all loaded), ``quarantined`` (balanced, some held back, within the limit) or ``failed``."""
        if not self.balanced or self.over_quarantine_limit:
            return "failed"
        return "quarantined" if self.quarantined else "clean"


STATUS_MARK = {"clean": "✅", "quarantined": "⚠️", "failed": "❌"}


@dataclass
class ReconciliationReport:
    """The reconciliation of one load run, plus the rejects it recorded."""

    run_key: str
    lines: list[ReconciliationLine]
    rejects: pd.DataFrame
    core_counts: dict[str, int]
    max_quarantined_share: float = 1.0

    @property
    def balanced(self) -> bool:
        """Return True when every line balances (rows, keys, amounts, spot check)."""
        return all(line.balanced for line in self.lines)

    @property
    def acceptable(self) -> bool:
        """Return True when every line balances and none quarantines more than the project allows."""
        return all(line.status != "failed" for line in self.lines)

    @property
    def quarantined_rows(self) -> int:
        """Return the record rows quarantined over all lines (rejected or held)."""
        return sum(line.quarantined for line in self.lines)

    @property
    def quarantined_amount(self) -> Decimal:
        """Return the money quarantined over all lines (corrected rows aside)."""
        return sum((line.amount_in_quarantine or Decimal(0) for line in self.lines), Decimal(0))

    @property
    def corrected_rows(self) -> int:
        """Return the rejected or held rows over all lines whose key a re-imported fix sheet loaded."""
        return sum(line.corrected for line in self.lines)

    @property
    def skipped(self) -> list[dict[str, str]]:
        """Return the mappings skipped as unchanged: ``{"mapping", "entity", "source", "unchanged_since"}``."""
        return [
            {"mapping": line.mapping, "entity": line.entity, "source": line.source,
             "unchanged_since": line.unchanged_since}
            for line in self.lines if line.unchanged_since
        ]  # fmt: skip

    def labels(self) -> list[str]:
        """Return each line's source, with its mapping file when another line has the same source and entity.

        A fix sheet re-imported with ``system:`` (or a second sheet of one workbook) reads the same source for
        the same entity: without the mapping the two lines could not be told apart.
        """
        seen = Counter((line.source, line.entity) for line in self.lines)
        return [
            f"{line.source} ({line.mapping})"
            if seen[(line.source, line.entity)] > 1 and line.mapping
            else line.source
            for line in self.lines
        ]

    def sample_note(self) -> str | None:
        """Return how much of each source a trial's sample read (None: not a sample): the counts are the sample's."""
        sampled = [
            (label, line) for line, label in zip(self.lines, self.labels(), strict=True)
            if line.rows_in_source is not None
        ]  # fmt: skip
        if not sampled:
            return None
        parts = [
            f"{label} {line.entity}: sample of {line.sampled_data_rows} of {line.rows_in_source} rows"
            + (f" ({line.left_out} left out)" if line.left_out else " (every row)")
            for label, line in sampled
        ]
        left = sum(line.left_out for _, line in sampled)
        if not left:
            return "Trial sample of every source row: " + "; ".join(parts) + "."
        return (
            f"Trial sample: the counts are the sample's, {left} source row(s) left out: "
            + "; ".join(parts)
            + "."
        )

    def verdict(self) -> str:
        """Return the one-line summary: clean only when nothing at all is quarantined."""
        if not self.balanced:
            return "The run does NOT balance."
        corrected = self.corrected_rows
        how = "rejected or held" if any(line.corrected_held for line in self.lines) else "rejected"
        fixed = f" ({corrected} {how} row(s) loaded from a fix sheet instead)" if corrected else ""
        if not self.quarantined_rows:
            return f"Every row is accounted for and loaded{fixed}."
        held = sum(line.waiting for line in self.lines)
        money = self.quarantined_amount
        text = (
            f"Every row is accounted for, but {self.quarantined_rows} row(s)"
            + (f" carrying {amount_text(money)}" if money else "")
            + " are quarantined"
            + (f" ({held} waiting for a steward's reference decision)" if held else "")
        )
        if not self.acceptable:
            over = sum(line.over_quarantine_limit for line in self.lines)
            text += (
                f"; the quarantined share of {over} line(s) is more than the project's limit of "
                f"{self.max_quarantined_share:.0%}"
            )
        if corrected:
            return text + f". {corrected} more row(s) were {how} but loaded from a fix sheet."
        return text + "."

    def to_frame(self) -> pd.DataFrame:
        """Return the lines as a table."""
        return pd.DataFrame([
            {**line.__dict__, "quarantined": line.quarantined, "amount_in_quarantine": line.amount_in_quarantine,
             "quarantined_share": round(line.quarantined_share, 4),
             "quarantined_rows_share": round(line.quarantined_rows_share, 4),
             "quarantined_amount_share": None if line.quarantined_amount_share is None
             else round(line.quarantined_amount_share, 4),
             "balanced": line.balanced, "status": line.status, "left_out": line.left_out}
            for line in self.lines
        ])  # fmt: skip

    def to_markdown(self) -> str:
        """Return the table as Markdown (Dagster metadata, README output)."""
        header = (
            "| source | entity | read | loaded | merged | rejected | held | warnings | amount source | amount core "
            "| quarantined (% of rows) | amount quarantined (% of amount) | corrected | keys missing | spot check | ok |"
        )
        rows = [header, "|" + "---|" * 16]
        for line, label in zip(self.lines, self.labels(), strict=True):
            rows.append(
                f"| {label} | {line.entity} | {line.rows_read} | {line.loaded} | {merged_text(line)} | {rejected_text(line)} "
                f"| {line.held} | {line.warnings} | {_money(line.amount_source)} | {_money(line.amount_core)} "
                f"| {quarantined_text(line)} | {amount_quarantined_text(line)} "
                f"| {corrected_text(line)} | {line.keys_missing} | {line.spot_checked - line.spot_mismatches}/{line.spot_checked} "
                f"| {STATUS_MARK[line.status]} |"
            )
        skipped = ", ".join(f"{s['mapping']} (run {str(s['unchanged_since'])[:8]})" for s in self.skipped)
        note = f"\n\nUnchanged since an earlier run, not read again: {skipped}." if skipped else ""
        sample = self.sample_note()
        note += f"\n\n{sample}" if sample else ""
        return "\n".join(rows) + f"\n\n{self.verdict()}" + note


def _money(value: Decimal | None) -> str:
    return amount_text(value)


def merged_text(line: ReconciliationLine) -> str:
    """Return a line's merged rows as its tables show them: the count, and how many are superseded fix sheet rows."""
    return f"{line.merged} ({line.superseded} superseded)" if line.superseded else str(line.merged)


def rejected_text(line: ReconciliationLine) -> str:
    """Return a line's rejected rows as its tables show them: the count, and how many are subtotal lines."""
    if not line.subtotals:
        return str(line.rejected)
    return f"{line.rejected} ({line.subtotals} subtotal{'s' if line.subtotals > 1 else ''})"


def quarantined_text(line: ReconciliationLine) -> str:
    """Return a line's quarantined rows as its tables show them: the count and their share of the record rows."""
    return f"{line.quarantined} ({line.quarantined_rows_share:.1%})"


def amount_quarantined_text(line: ReconciliationLine) -> str:
    """Return a line's quarantined money as its tables show it: the amount and its share of the money read."""
    money, share = line.amount_in_quarantine, line.quarantined_amount_share
    if money is None:
        return ""
    return amount_text(money) + (f" ({share:.1%})" if share is not None else "")


def corrected_text(line: ReconciliationLine) -> str:
    """Return a line's corrected rows as shown in its tables: the count, and their money when it has any."""
    return (
        f"{line.corrected} ({amount_text(line.amount_corrected)})"
        if line.amount_corrected
        else str(line.corrected)
    )


def _amount(value: Any) -> Decimal | None:
    return None if value is None else Decimal(value).quantize(Decimal("0.01"))


def reconcile(
    engine: Engine,
    run_key: str,
    entities: Sequence[str] | None = None,
    max_quarantined_share: float = 1.0,
) -> ReconciliationReport:
    """Build the reconciliation of ``run_key`` from its stats, the core's sums and its rejects.

    ``max_quarantined_share`` is the project's limit on the share of a line's rows or money that may sit in
    quarantine (``reconciliation.max_quarantined_share``); a line over it fails like an unbalanced one.
    """
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
                # Runs recorded before the source amount covered every row read only knew the loaded rows.
                source_amount = stats.get("amount_source", stats.get("amount_loaded"))
                lines.append(ReconciliationLine(
                    source=stats["source"], entity=entity, rows_read=stats["rows_read"], loaded=stats["loaded"],
                    merged=stats["merged"], rejected=stats["rejected"], warnings=stats["warnings"],
                    amount_source=_amount(source_amount), amount_core=_amount(stats.get("amount_core")),
                    keys_missing=stats.get("keys_missing", 0), spot_checked=stats.get("spot_checked", 0),
                    spot_mismatches=stats.get("spot_mismatches", 0), spot_sample=stats.get("spot_sample", []),
                    held=stats.get("held", 0), superseded=stats.get("superseded", 0),
                    subtotals=stats.get("subtotals", 0), amount_loaded=_amount(stats.get("amount_loaded")),
                    amount_merged=_amount(stats.get("amount_merged")),
                    amount_quarantined=_amount(stats.get("amount_quarantined")),
                    amount_unreadable=stats.get("amount_unreadable", 0), max_quarantined_share=max_quarantined_share,
                    mapping=stats.get("mapping", ""), unchanged_since=stats.get(UNCHANGED_KEY),
                    rows_in_source=stats.get("rows_in_source"),
                ))  # fmt: skip
        columns = [Reject.source, Reject.entity, Reject.location, Reject.row_ref, Reject.field, Reject.value,
                   Reject.rule, Reject.reason, Reject.severity, Reject.raw_row, Reject.mapping, Reject.amount]  # fmt: skip
        # A rejected or held row whose key a re-imported fix sheet loaded (this run or before): marked
        # corrected_by it. (A held row's entries are all ``held``: a row also rejected records no hold.)
        loaded = (
            select(ExternalId.id)
            .where(ExternalId.entity == Reject.entity, ExternalId.system == Reject.source,
                   ExternalId.external_key == Reject.external_key, ExternalId.corrected_by.is_not(None))
            .exists()
        )  # fmt: skip
        corrected = and_(
            Reject.severity.in_(("error", HELD)),
            Reject.rule != "subtotal",
            Reject.external_key.is_not(None),
            loaded,
        )
        query = select(*columns, case((corrected, True), else_=False).label("corrected"), Reject.external_key)
        rows = session.execute(query.where(Reject.load_run_id == run.id).order_by(Reject.id)).all()
        names = [*(c.key for c in columns), "corrected", "external_key"]
        rejects = pd.DataFrame([tuple(r) for r in rows], columns=names)
        rejects["corrected"] = _one_row_per_key(rejects)
        _count_corrected(lines, rejects)
        counts = {}
        for name, definition in ENTITIES.items():
            model: Any = definition.model
            query = select(func.count()).select_from(model)
            if hasattr(model, "merged_into_id"):
                query = query.where(model.merged_into_id.is_(None))
            counts[name] = session.scalar(query) or 0
    return ReconciliationReport(run_key, lines, rejects, counts, max_quarantined_share)


def _one_row_per_key(rejects: pd.DataFrame) -> pd.Series:
    """Return the ``corrected`` mark of each reject, with one corrected source row per line and key.

    The core holds one record under a key, so a fix sheet that loaded a key corrected one source row of a
    line: the first one recorded (a row's first reject comes first; the fix sheet lists its rows in that
    order, and a mapping loads the first row of a repeated key and rejects the others as duplicate keys).
    Other rows of the line under that key (a row repeated in a sheet, each rejected) stay quarantined, with
    their money, and stay in the next fix sheet: the core does not have them. Every row read is still
    loaded, merged, rejected or held; a corrected row is one of the rejected or held.
    """
    marks = rejects["corrected"].astype(bool)
    if not marks.any():
        return marks
    chosen = rejects.loc[marks, ["mapping", "source", "entity", "external_key", "location", "row_ref"]]
    first: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    for index, *values in chosen.itertuples(name=None):
        where, row = tuple(values[:4]), tuple(values[4:])
        if first.setdefault(where, row) != row:
            marks[index] = False
    return marks


def _count_corrected(lines: Sequence[ReconciliationLine], rejects: pd.DataFrame) -> None:
    """Set each line's corrected rows (the held among them) and their money from the rejects marked ``corrected``."""
    chosen = rejects[rejects["corrected"]]
    if chosen.empty:
        return
    row = ["mapping", "source", "entity", "location", "row_ref"]
    # A row rejected because its amount could not be read (counted in amount_unreadable by its load).
    amount_fields = chosen["entity"].map(lambda e: ENTITIES[e].amount_field if e in ENTITIES else None)
    unreadable_amount = (chosen["field"] == amount_fields) & chosen["amount"].isna()
    # One row can have several rejects (one per field): it counts once, with its amount once.
    per_row = (
        chosen.assign(held=chosen["severity"] == HELD, unreadable=unreadable_amount)
        .groupby(row, dropna=False, sort=False)
        .agg(amount=("amount", "first"), held=("held", "any"), unreadable=("unreadable", "any"))
    )
    counted: dict[tuple[Any, ...], list[Any]] = {}
    held: Counter[tuple[Any, ...]] = Counter()
    unreadable: Counter[tuple[Any, ...]] = Counter()
    for key, amount, was_held, was_unreadable in zip(
        per_row.index, per_row["amount"], per_row["held"], per_row["unreadable"], strict=True
    ):
        where: tuple[Any, ...] = tuple(key)
        counted.setdefault(where[:3], []).append(amount)
        held[where[:3]] += bool(was_held)
        unreadable[where[:3]] += bool(was_unreadable)
    for line in lines:
        amounts = counted.get((line.mapping, line.source, line.entity))
        if amounts:
            line.corrected = len(amounts)
            line.corrected_held = held[(line.mapping, line.source, line.entity)]
            # A corrected row is no longer quarantined, nor among the quarantined rows without an amount.
            line.amount_unreadable = max(
                0, line.amount_unreadable - unreadable[(line.mapping, line.source, line.entity)]
            )
            if line.amount_quarantined is not None:
                total = sum((Decimal(a) for a in amounts if a is not None and a == a), Decimal(0))
                line.amount_corrected = _amount(total)


def finish_run(engine: Engine, run_key: str, report: ReconciliationReport, *, partial: bool = False) -> None:
    """Mark a load run finished: succeeded when the reconciliation is acceptable, else unbalanced.

    ``partial``: the run loaded only some of the migration's assets (materialized on their own): partial,
    whatever the reconciliation says, so that it is never the basis of a skip nor taken for a linkage.
    """
    factory = session_factory(engine)
    with factory() as session, session.begin():
        run = session.scalar(select(LoadRun).where(LoadRun.run_key == run_key))
        if run is not None:
            run.status = PARTIAL if partial else "succeeded" if report.acceptable else "unbalanced"
            run.finished_at = dt.datetime.now(dt.UTC)
