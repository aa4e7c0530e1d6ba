"""Asset factories: the project's mappings become raw, staged, core and reconciliation assets.

* ``raw_<source>_<entity>`` — rows as extracted (one per mapping), with row references.
* ``staged_<entity>``       — canonical records + rejects from every mapping of the entity.
* ``core_<entity>``         — the entity loaded into the core by crosswalk (one transaction).
* ``reconciliation_report`` — per source and entity: read = loaded + merged + rejected, and sums.
"""

# No ``from __future__ import annotations`` here: Dagster inspects the *objects* annotating ``context``
# and asset inputs, and string annotations make it reject the definitions.

import datetime as dt
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
from dagster import AssetExecutionContext
from sqlalchemy import Engine, func, select

from crm_core.collections_policy import rare_collections
from crm_core.db import session_factory
from crm_core.errors import CrmError, TransientExtractError
from crm_core.failpoints import failpoint
from crm_core.loading import SourceStats
from crm_core.merging import changed_in_run
from crm_core.models import Contact, Customer, LoadRun, ReferenceDecision
from crm_core.runs import ACTIVE, CoreBusy, abort_run, core_lock_holder, rollback_run
from crm_core.validation import core_violations
from crm_core.watermarks import CursorState
from integration.assets.resources import CoreDatabase, MigrationProject, SourceSystem
from integration.connectors.base import ROW_KIND
from integration.failures import AFTER_FAILURE, cause_line, frames
from integration.mappings.spec import CompiledMapping
from integration.memory import release_memory
from integration.phases import phase_of
from integration.pipeline import (
    WATERMARK_ATTR,
    Migration,
    RunOptions,
    StagedEntity,
    extract_to_files,
    finish_run,
    load,
    reconcile,
    reload_if_needed,
    stage,
    start_run,
    stream_watermark,
)
from integration.reports import markdown_table, quarantine_notes, unbalanced_reasons, write_reports
from integration.rerun import (
    FINGERPRINT_ATTR,
    UNCHANGED_ATTR,
    Unchanged,
    mapping_fingerprint,
    unchanged_since,
)
from integration.spill import SpillFolder, StoredFrames

MAX_PREVIEW_ROWS = 5
# Who the UI names as the owner of an asset (Dagster wants an e-mail address or `team:<name>`).
OWNER_INTEGRATION = "team:crm-integration"
OWNER_STEWARDS = "team:data-stewards"
LAYER_TAG = "crmi/layer"
ENTITY_TAG = "crmi/entity"
SOURCE_TAG = "crmi/source"
# A core entity is overdue when no migration or delta run has loaded it for this long (the UI marks it,
# Dagster's freshness daemon evaluates it): a warning after a day, a failure after a week. Between go-live
# and the end of the engagement, when the sync keeps the core current instead, its checks are what to watch.
CORE_FRESHNESS = dg.FreshnessPolicy.time_window(
    fail_window=dt.timedelta(days=7), warn_window=dt.timedelta(days=1)
)
MAX_SAMPLE_ROWS = 20
EXTRACT_RETRIES = 3


def _fail(exc: CrmError) -> dg.Failure:
    return dg.Failure(description=str(exc), allow_retries=False)


def _undo(context: AssetExecutionContext, engine: Engine, why: str) -> None:
    """Undo the run now (also outside the named jobs, where no failure hook is attached); never mask ``why``."""
    run_key = context.run.run_id
    try:
        if abort_run(engine, run_key):
            context.log.warning(f"{why}: the changes of run {run_key} were undone")
    except Exception as exc:  # the original failure matters more; the run stays for `crmi runs recover`
        context.log.error(f"{why}, and undoing run {run_key} failed too: {cause_line(exc)}")


def _undone_parent(context: AssetExecutionContext, engine: Engine) -> tuple[str, str] | None:
    """Return (run id, status) of an undone run this one re-executes part of, when this one skips a step that
    wrote to the core in it (or in an undone run before it).

    A re-execution "from failure" or "from asset failure" (or a retry of a run without
    ``dagster/retry_strategy: ALL_STEPS``, as assets materialized from the UI are retried) runs only the
    failed step and those after it; the steps it skips committed their loads in the parent run, which the
    failure then undid. Loading on top of that would leave a fragment (contacts without their customers)
    that nothing reconciles. The chain of undone ancestors counts, not only the parent (re-executing a
    refused re-execution skips what the first run did). An ancestor whose Dagster run failed or was
    canceled but whose load run is still running (the failure sensor has not come round yet) is undone
    first, as the sensor would, so that no run builds on it. Skipped extraction and staging steps are
    harmless: their outputs are files this run reads as the parent left them.
    """
    run = context.run
    if run.parent_run_id is None:
        return None
    instance = context.instance
    undone: tuple[str, str] | None = None
    undone_steps: set[str] = set()
    ancestor_id: str | None = run.parent_run_id
    while ancestor_id is not None:
        ancestor = instance.get_run_by_id(ancestor_id)
        status = _load_run_status(engine, ancestor_id)
        if status == "running" and ancestor is not None and ancestor.status in _ENDED_BADLY:
            abort_run(engine, ancestor_id)
            status = _load_run_status(engine, ancestor_id)
        if status in ACTIVE:
            break  # its loads stand: whatever it skipped, it had
        if status is not None:
            undone = undone or (ancestor_id, status)
            started = instance.all_logs(ancestor_id, of_type=dg.DagsterEventType.STEP_START)
            undone_steps |= {entry.step_key for entry in started if entry.step_key}
        ancestor_id = ancestor.parent_run_id if ancestor is not None else None
    if undone is None:
        return None
    # the steps this run executes: its plan's ("from asset failure" leaves step_keys_to_execute None)
    plan = (
        instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)
        if run.execution_plan_snapshot_id
        else None
    )
    mine = set(plan.step_keys_to_execute) if plan is not None else set(run.step_keys_to_execute or ())
    writing = {step for step in undone_steps - mine if phase_of(step) not in ("extract", "map_validate")}
    return undone if writing else None


_ENDED_BADLY = (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)


def _load_run_status(engine: Engine, run_key: str) -> str | None:
    with engine.connect() as connection:
        status = connection.scalar(select(LoadRun.status).where(LoadRun.run_key == run_key))
    return None if status is None else str(status)


@contextmanager
def _load_run_step(context: AssetExecutionContext, core: CoreDatabase, project: str) -> Iterator[Engine]:
    """Run one step of a load run: start the run first, and undo it if the step fails in any way.

    Failures leave the step as one readable line (our message, or the exception type and first line of
    its message, never a SQL statement); the traceback goes into the failure's metadata.
    """
    step = context.op_execution_context.op.name
    release_memory()  # what earlier steps left behind, before this one reads its input
    try:
        engine = core.engine()
        # A run launched from the UI, a schedule or a sensor meets a `crmi` command here (crmi run takes the
        # lock itself, so its own steps pass): loading beside it would interleave two runs' changes.
        holder = core_lock_holder(engine)
        if holder is not None:
            raise CoreBusy(
                f"another command holds this core ({holder}): one at a time; launch this run again when it ends"
            )
        status = start_run(engine, context.run.run_id, project, RunOptions.from_tags(context.run.tags).mode)
    except CrmError as exc:
        raise _fail(exc) from exc
    if status != "running":
        raise dg.Failure(
            description=f"not run: load run {context.run.run_id} is already {status}",
            metadata={AFTER_FAILURE: True},
            allow_retries=False,
        )
    try:
        undone = _undone_parent(context, engine)
    except Exception as exc:  # a later run depends on the parent, or a storage cannot be read: one line
        _undo(context, engine, f"step {step} could not check the run it re-executes")
        cause = str(exc) if isinstance(exc, CrmError) else cause_line(exc)
        raise dg.Failure(
            description=f"not run: the run this one re-executes could not be checked or undone: {cause}",
            allow_retries=False,
        ) from None
    if undone is not None:
        _undo(context, engine, f"step {step} re-executes part of run {undone[0]}, which is {undone[1]}")
        raise dg.Failure(
            description=f"not run: this run re-executes only some steps of run {undone[0]}, whose changes in "
            f"the core were undone ({undone[1]}); the steps it skips would be missing. Re-execute all steps, "
            "or materialize the assets again",
            allow_retries=False,
        )
    try:
        with rare_collections():  # a step at size allocates millions of objects that live until it ends
            yield engine
    except dg.RetryRequested:
        raise
    except dg.Failure:
        _undo(context, engine, f"step {step} failed")
        raise
    except CrmError as exc:
        _undo(context, engine, f"step {step} failed")
        raise _fail(exc) from exc
    except Exception as exc:
        _undo(context, engine, f"step {step} failed")
        raise dg.Failure(
            description=cause_line(exc),
            metadata={"error_type": type(exc).__name__, "traceback": dg.MetadataValue.text(frames(exc))},
            allow_retries=False,
        ) from None
    except dg.DagsterExecutionInterruptedError:
        _undo(context, engine, f"step {step} was interrupted")
        raise


def _blocking(
    context: AssetExecutionContext, engine: Engine, result: dg.AssetCheckResult, why: str = ""
) -> Iterator[dg.AssetCheckResult]:
    """Pass a blocking check's result on; a failed one undoes the run and fails the step saying ``why``."""
    yield result
    if not result.passed:
        _undo(context, engine, f"blocking check {result.check_name} failed")
        raise dg.Failure(
            description=f"{result.check_name} failed: {why}" if why else f"{result.check_name} failed",
            metadata=result.metadata,
        )


def _preview(frame: pd.DataFrame) -> dg.MetadataValue:
    return dg.MetadataValue.md(markdown_table(frame.head(MAX_PREVIEW_ROWS)))


@dg.failure_hook(required_resource_keys={"core"})
def undo_failed_run(context: dg.HookContext) -> None:
    """When any step fails, undo what the run's committed loads changed: a run lands whole or not at all."""
    core: CoreDatabase = context.resources.core
    if abort_run(core.engine(), context.run_id):
        context.log.warning(
            f"step {context.step_key} failed: the changes of run {context.run_id} were undone"
        )


def raw_asset(migration: Migration, mapping: CompiledMapping) -> dg.AssetsDefinition:
    """Return the asset that extracts the rows one mapping reads."""
    name = migration.raw_asset(mapping)
    source_key = f"source_{mapping.source}"
    where = mapping.spec.source.location
    description = (
        f"Rows of {mapping.source}.{where} as extracted for {mapping.entity.name} ({mapping.file.name})."
    )

    @dg.asset(
        name=name,
        group_name="extract",
        description=description,
        required_resource_keys={source_key, "project", "core"},
        kinds={migration.project.spec.sources[mapping.source].connector},
        owners=[OWNER_INTEGRATION],
        tags={LAYER_TAG: "extract", ENTITY_TAG: mapping.entity.name, SOURCE_TAG: mapping.source},
        # The step's tag: an executor's tag_concurrency_limits can cap the readers of one source system.
        op_tags={SOURCE_TAG: mapping.source},
        metadata={"mapping_file": str(mapping.file)},
    )
    def _raw(context: AssetExecutionContext) -> dg.Output[Any]:  # StoredFrames, or a skipped empty frame
        source: SourceSystem = getattr(context.resources, source_key)
        project: MigrationProject = context.resources.project
        core: CoreDatabase = context.resources.core
        with _load_run_step(context, core, migration.project.name) as engine:
            # Full and trial runs read everything (unchanged rows load as no-ops); delta runs start at the watermark.
            options = RunOptions.from_tags(context.run.tags)
            delta = options.mode == "delta"
            since = stream_watermark(engine, mapping) if delta else None
            failpoint(f"extract:{mapping.name}")  # also where a skipped mapping stops reading (tests)
            # A full run first proves whether the input changed since the last load (integration.rerun).
            fingerprint = (
                mapping_fingerprint(project.migration(), mapping) if options.mode == "full" else None
            )
            unchanged = (
                unchanged_since(engine, project.migration(), mapping, context.run.run_id, fingerprint)
                if options.skips_unchanged
                else None
            )
            if unchanged is not None:
                return _skipped_output(unchanged, source)
            try:
                stored, facts = _extract_to_files(context, project.migration(), mapping, since)
            except TransientExtractError as exc:
                if context.retry_number >= EXTRACT_RETRIES:
                    raise  # the last attempt fails with the source's own message
                raise dg.RetryRequested(max_retries=EXTRACT_RETRIES, seconds_to_wait=2) from exc
            stored.attrs[FINGERPRINT_ATTR] = fingerprint
        return dg.Output(
            stored,
            metadata={
                **facts,
                "source_location": source.connector().describe(),
                **_cursor_metadata(mapping, since, stored.attrs),
            },
        )

    return _raw


def _running(context: AssetExecutionContext) -> Callable[[str], bool]:
    """Return whether a run of this instance is not finished: the pieces its steps wrote are still read."""

    def running(run_id: str) -> bool:
        run = context.instance.get_run_by_id(run_id)
        return run is not None and not run.is_finished

    return running


def _extract_to_files(
    context: AssetExecutionContext, migration: Migration, mapping: CompiledMapping, since: CursorState | None
) -> tuple[StoredFrames, dict[str, Any]]:
    """Extract a mapping's rows chunk by chunk into the step's spill folder; return them and their metadata.

    One chunk is held at a time: the step's memory is bounded by the chunk size, not the source's.
    """
    folder = SpillFolder(context.instance.storage_directory(), context.op_def.name, context.run.run_id)
    chunks: list[pd.DataFrame] = []  # the first one (preview)
    # Every chunk's columns in the order first seen: a later workbook or file may have more than the first.
    columns: dict[str, None] = {}
    counts = {"data_rows": 0, "bytes_in_memory": 0, "chunks": 0}

    def note(chunk: pd.DataFrame) -> None:
        counts["data_rows"] += int((chunk.get(ROW_KIND, pd.Series(dtype=str)) == "data").sum())
        counts["bytes_in_memory"] += bytes_in_memory(chunk)
        counts["chunks"] += 1
        columns.update(dict.fromkeys(c for c in chunk.columns if not str(c).startswith("_")))
        if not chunks:
            chunks.append(chunk)

    stored = extract_to_files(migration, mapping, folder, since, each_chunk=note)
    folder.keep_only_this_run(_running(context))
    [first] = chunks  # an extraction yields at least one chunk (its columns, maybe no rows)
    facts = {
        "rows_read": stored.rows,
        **counts,
        "columns": dg.MetadataValue.json(list(columns)),
        "preview": _preview(first),
    }
    return stored, facts


MEMORY_SAMPLE_ROWS = 10_000


def bytes_in_memory(frame: pd.DataFrame) -> int:
    """Return what a frame holds in memory, text included; above 10,000 rows estimated from 10,000 random rows.

    Measuring every string of a million-row extract cost seconds per step for one number in the UI.
    """
    if len(frame) <= MEMORY_SAMPLE_ROWS:
        return int(frame.memory_usage(deep=True).sum()) if len(frame) else 0
    sample = frame.sample(n=MEMORY_SAMPLE_ROWS, random_state=0)  # random: evenly spaced rows alias patterns
    columns = sample.memory_usage(deep=True, index=False).sum() * len(frame) / len(sample)
    return int(columns + frame.index.memory_usage(deep=True))


def _skipped_output(unchanged: Unchanged, source: SourceSystem) -> dg.Output[pd.DataFrame]:
    """The output of a skipped extraction: no rows, marked unchanged (staging and loading pass it through)."""
    frame = pd.DataFrame()
    frame.attrs[UNCHANGED_ATTR] = unchanged.to_dict()
    return dg.Output(
        frame,
        metadata={
            "rows_read": 0,
            "skipped": f"unchanged since run {unchanged.run_key}: not read again",
            "unchanged_since_run": unchanged.run_key,
            "fingerprint": unchanged.fingerprint,
            "source_location": source.connector().describe(),
        },
    )


def _cursor_metadata(
    mapping: CompiledMapping, since: CursorState | None, attrs: Mapping[str, Any]
) -> dict[str, Any]:
    """Cursor before/after for incremental mappings (what the next run will start from once loaded)."""
    incremental = mapping.spec.source.incremental
    if incremental is None:
        return {"incremental": False}
    carried = attrs.get(WATERMARK_ATTR)
    after = CursorState.from_json(carried[1]) if carried else None
    return {
        "incremental": True,
        "cursor_column": incremental.cursor,
        "cursor_before": since.describe() if since else "(first run: everything)",
        "cursor_after": after.describe() if after else "(nothing read)",
    }


def _violation_sample(batches: list[Any], rules: set[str]) -> pd.DataFrame:
    rejects = pd.concat([b.rejects for b in batches], ignore_index=True) if batches else pd.DataFrame()
    if rejects.empty:
        return rejects
    rejects = rejects[rejects["rule"].isin(rules)]
    columns = ["source", "location", "row_ref", "rule", "field", "value", "reason", "severity"]
    return rejects.groupby("rule", sort=True).head(3)[columns].head(MAX_SAMPLE_ROWS)


def staged_asset(migration: Migration, entity: str) -> dg.AssetsDefinition:
    """Return the asset that maps, validates and quarantines every raw input of ``entity``."""
    mappings = migration.mappings_for(entity)
    ins = {migration.raw_asset(m): dg.AssetIn(key=migration.raw_asset(m)) for m in mappings}
    limit = migration.project.spec.validation.max_reject_ratio
    rules = sorted(rule.name for rule in migration.rules if rule.entity == entity)
    checks = [
        dg.AssetCheckSpec(
            name="check_reject_ratio",
            asset=f"staged_{entity}",
            description=f"Stops the load when a source rejects more than {limit:.0%} of its rows "
            "(usually a wrong mapping or source, not bad data).",
            blocking=True,
        ),
        dg.AssetCheckSpec(
            name="check_validation_rules",
            asset=f"staged_{entity}",
            description=f"Rows breaking the {entity} rules ({len(rules)}): errors are quarantined, "
            "warnings load; metadata counts each rule and shows a sample.",
        ),
    ]

    @dg.asset(
        name=f"staged_{entity}",
        group_name="stage",
        description=f"Canonical {entity} records mapped from {', '.join(m.name for m in mappings)}, "
        "validated, with the rejects quarantined.",
        ins=ins,
        required_resource_keys={"project", "core"},
        check_specs=checks,
        kinds={"pandas"},
        owners=[OWNER_INTEGRATION],
        tags={LAYER_TAG: "stage", ENTITY_TAG: entity},
        metadata={"validation_rules": dg.MetadataValue.json(rules)},
    )
    def _staged(context: AssetExecutionContext, **raw: Any) -> Any:  # StoredFrames, or a skipped DataFrame
        project: MigrationProject = context.resources.project
        core: CoreDatabase = context.resources.core
        with _load_run_step(context, core, migration.project.name) as engine:
            yield from _stage_step(context, engine, project.migration(), entity, raw, limit, rules)

    return _staged


def _stage_step(
    context: AssetExecutionContext,
    engine: Engine,
    migration: Migration,
    entity: str,
    raw: dict[str, Any],
    limit: float,
    rules: list[str],
) -> Iterator[Any]:
    """Map and validate one entity; yield its output and its two checks."""
    spill = SpillFolder(context.instance.storage_directory(), context.op_def.name, context.run.run_id)
    staged = stage(migration, entity, raw, spill=spill)
    spill.keep_only_this_run(_running(context))
    rows = []
    ratios: dict[str, float] = {}
    for batch in staged.batches:
        rejected_rows = batch.rejects.loc[
            batch.rejects["severity"] == "error", ["location", "row_ref"]
        ].drop_duplicates()
        ratios[batch.mapping] = round(len(rejected_rows) / batch.rows_read, 4) if batch.rows_read else 0.0
        rows.append({"mapping": batch.mapping, "read": batch.rows_read, "mapped": batch.record_count,
                     "rejected": len(rejected_rows), "warnings": int((batch.rejects["severity"] == "warn").sum()),
                     "skipped": ""})  # fmt: skip
    for item in staged.unchanged:
        rows.append({"mapping": item.mapping, "read": 0, "mapped": 0, "rejected": 0, "warnings": 0,
                     "skipped": item.describe()})  # fmt: skip
    all_rejects = [b.rejects for b in staged.batches if len(b.rejects)]
    by_rule = (
        pd.concat(all_rejects).groupby(["rule", "severity"]).size().reset_index(name="rows")
        if all_rejects
        else pd.DataFrame(columns=["rule", "severity", "rows"])
    )
    yield dg.Output(
        staged,
        metadata={
            "records": staged.records,
            "reject_entries": staged.rejects,
            "skipped_unchanged": dg.MetadataValue.json({u.mapping: u.run_key for u in staged.unchanged}),
            "by_mapping": dg.MetadataValue.md(markdown_table(pd.DataFrame(rows))),
            "reject_rules": dg.MetadataValue.json(
                {str(r): int(n) for r, n in by_rule.groupby("rule")["rows"].sum().items()}
            ),
        },
    )
    too_many = {name: ratio for name, ratio in ratios.items() if ratio > limit}
    yield from _blocking(context, engine, dg.AssetCheckResult(
        check_name="check_reject_ratio",
        passed=not too_many,
        metadata={"reject_ratio_by_mapping": dg.MetadataValue.json(ratios), "limit": limit,
                  "over_the_limit": dg.MetadataValue.json(too_many)},
    ), "; ".join(f"{name} rejects {ratio:.0%} of its rows (limit {limit:.0%}: a wrong mapping or source?)"
                 for name, ratio in too_many.items()))  # fmt: skip
    # Mapping rejects (subtotal rows, unparsable values) are the reject ratio's business; this check
    # reports the validation rules only.
    broken = by_rule[by_rule["rule"].isin(rules)] if len(by_rule) else by_rule
    yield dg.AssetCheckResult(
        check_name="check_validation_rules",
        passed=broken.empty,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "quarantined_entries": int(broken.loc[broken["severity"] == "error", "rows"].sum()),
            "warning_entries": int(broken.loc[broken["severity"] == "warn", "rows"].sum()),
            "failing_rows_by_rule": dg.MetadataValue.md(markdown_table(broken)),
            "sample": dg.MetadataValue.md(markdown_table(_violation_sample(staged.batches, set(rules)))),
        },
    )


def _stats_table(stats: list[SourceStats]) -> str:
    frame = pd.DataFrame([s.as_dict() for s in stats])
    columns = ["source", "rows_read", "inserted", "updated", "unchanged", "merged", "rejected", "warnings"]
    return markdown_table(frame[columns]) if len(frame) else "_none_"


def core_asset(migration: Migration, entity: str) -> dg.AssetsDefinition:
    """Return the asset that loads ``entity`` into the core by crosswalk."""
    definition = migration.mappings_for(entity)[0].entity
    referenced = {f.references for f in definition.references.values()} - {entity}
    deps = [f"core_{name}" for name in migration.entities if name in referenced]
    if entity in migration.after_golden_customers:
        deps.append("golden_customers")  # names resolve against the golden customers, after the merges
    checks = [
        dg.AssetCheckSpec(
            name="check_every_row_accounted_for",
            asset=f"core_{entity}",
            description="Each source row is loaded, merged or rejected: read = loaded + merged + rejected.",
            blocking=True,
        )
    ]
    checks.append(
        dg.AssetCheckSpec(
            name="check_core_rules",
            asset=f"core_{entity}",
            description="Core-wide rules after the load: references point at surviving records; for customers, "
            "no shared 统一社会信用代码; for payment applications, never more than the receivable or payment.",
            blocking=True,
        )
    )

    @dg.asset(
        name=f"core_{entity}",
        group_name="core",
        description=f"The {entity} records of the CRM core: each migration or delta run inserts new ones and "
        "updates changed ones by their source keys (crosswalk), in one transaction. Rows read, inserted, "
        "updated, merged and rejected, and the load's duration, are plotted per run; both checks must pass "
        "or the run is undone. Overdue after a day without a load (a week: failed).",
        ins={"staged": dg.AssetIn(key=f"staged_{entity}")},
        deps=deps,
        required_resource_keys={"core", "project"},
        check_specs=checks,
        kinds={"sqlalchemy"},
        owners=[OWNER_INTEGRATION],
        tags={LAYER_TAG: "core", ENTITY_TAG: entity},
        freshness_policy=CORE_FRESHNESS,
    )
    def _core(context: AssetExecutionContext, staged: StagedEntity) -> Any:
        started = time.monotonic()
        core: CoreDatabase = context.resources.core
        project: MigrationProject = context.resources.project
        with _load_run_step(context, core, migration.project.name) as engine:
            options = RunOptions.from_tags(context.run.tags)
            # skipped mappings read again now stream as the extraction and staging steps do
            spill = SpillFolder(context.instance.storage_directory(), context.op_def.name, context.run.run_id)
            staged = reload_if_needed(project.migration(), engine, context.run.run_id, staged, spill=spill)
            stats = load(
                project.migration(),
                engine,
                context.run.run_id,
                staged,
                mode=options.mode,
                sample=options.sample,
            )
            spill.keep_only_this_run(_running(context))
            skipped = {u.mapping for u in staged.unchanged}
            carried = [s for s in stats if s.mapping in skipped]
            # Rows of skipped mappings were not loaded again: they are counted apart (rows/s stays honest).
            totals = {
                k: sum(getattr(s, k) for s in stats if s.mapping not in skipped)
                for k in ("rows_read", "inserted", "updated", "unchanged", "merged", "rejected")
            }
            yield dg.MaterializeResult(
                metadata={
                    **{key: dg.MetadataValue.int(int(value)) for key, value in totals.items()},
                    "rows_unchanged_skipped": dg.MetadataValue.int(sum(s.rows_read for s in carried)),
                    "skipped_unchanged": dg.MetadataValue.json(sorted(skipped)),
                    "duration_seconds": dg.MetadataValue.float(round(time.monotonic() - started, 3)),
                    "by_source": dg.MetadataValue.md(_stats_table(stats)),
                    "core": core.location(),
                }
            )
            unbalanced = [s.source for s in stats if not s.balanced]
            yield from _blocking(context, engine, dg.AssetCheckResult(
                check_name="check_every_row_accounted_for",
                passed=not unbalanced,
                metadata={
                    "unbalanced_sources": dg.MetadataValue.json(unbalanced),
                    "unbalanced_count": dg.MetadataValue.int(len(unbalanced)),  # plotted per run
                },
            ), f"rows read ≠ loaded + merged + rejected for {', '.join(unbalanced)}")  # fmt: skip
            with session_factory(engine)() as session:
                violations = core_violations(session, entity)
            broken = [v for v in violations if v.count]
            yield from _blocking(context, engine, dg.AssetCheckResult(
                check_name="check_core_rules",
                passed=not broken,
                metadata={
                    "failing_rows_by_rule": dg.MetadataValue.json({v.rule: v.count for v in violations}),
                    "failing_rows": dg.MetadataValue.int(sum(v.count for v in violations)),  # plotted per run
                    "sample": dg.MetadataValue.md(
                        "\n\n".join(
                            f"**{v.rule}**: {v.message}\n\n{markdown_table(pd.DataFrame(v.sample))}"
                            for v in broken
                        )
                        or "_none_"
                    ),
                },
            ), "; ".join(f"{v.rule}: {v.message} ({v.count} row(s), e.g. {v.sample[:2]})" for v in broken))  # fmt: skip

    return _core


def reconciliation_asset(migration: Migration, report_dir: Path) -> dg.AssetsDefinition:
    """Return the asset that reconciles the run: rows and amounts per source and entity."""

    @dg.asset(
        name="reconciliation_report",
        group_name="report",
        owners=[OWNER_INTEGRATION],
        tags={LAYER_TAG: "report"},
        description="Per source and entity: rows read = loaded + merged + rejected + held, the money read vs "
        "loaded, merged and quarantined, and what the core holds.",
        deps=[f"core_{e}" for e in migration.entities]
        + (["customer_review_queue", "golden_contacts"] if "customer" in migration.entities else []),
        required_resource_keys={"core"},
        check_specs=[
            # Not blocking: an unbalanced run stays in the core, marked 'unbalanced', for the consultant to
            # inspect and roll back; failing the step would undo it before anyone could look.
            dg.AssetCheckSpec(
                "check_reconciliation_balances",
                asset="reconciliation_report",
                description="Rows, keys and amounts balance per source and entity (amount source counts every "
                "row read, quarantined ones too); spot-checked values match; no source quarantines more of its "
                "rows or money than reconciliation.max_quarantined_share.",
            )
        ],
        kinds={"pandas"},
    )
    def _reconciliation(context: AssetExecutionContext) -> Any:
        core: CoreDatabase = context.resources.core
        with _load_run_step(context, core, migration.project.name) as engine:
            limit = migration.project.spec.reconciliation.max_quarantined_share
            report = reconcile(engine, context.run.run_id, max_quarantined_share=limit)
            waiting = _references_waiting(engine)
            files = write_reports(report, report_dir / context.run.run_id)
            failpoint("reconcile")
            finish_run(engine, context.run.run_id, report, partial=not _whole_migration(context, migration))
        yield dg.MaterializeResult(
            metadata={
                "reconciliation": dg.MetadataValue.md(report.to_markdown()),
                "balanced": report.balanced,
                "verdict": report.verdict(),
                "quarantined_rows": report.quarantined_rows,
                # held rows still waiting for a steward; those a fix sheet loaded are counted apart
                "held_rows": sum(line.waiting for line in report.lines),
                "corrected_held_rows": sum(line.corrected_held for line in report.lines),
                # fix sheet rows whose source rows load by themselves now (warned: remove the fix)
                "superseded_rows": sum(line.superseded for line in report.lines),
                "customer_names_waiting_for_a_steward": waiting,
                "quarantined_amount": float(report.quarantined_amount),
                "max_quarantined_share": limit,
                "rows_reconciled": sum(line.rows_read for line in report.lines),
                "rejected_rows": int((report.rejects["severity"] == "error").sum()),
                "core_counts": dg.MetadataValue.json(report.core_counts),
                "report_files": dg.MetadataValue.json({k: str(v) for k, v in files.items()}),
            }
        )
        yield dg.AssetCheckResult(
            check_name="check_reconciliation_balances",
            passed=report.acceptable,
            metadata={
                "unbalanced": dg.MetadataValue.json(unbalanced_reasons(report)),
                "quarantined": dg.MetadataValue.json(quarantine_notes(report)),
            },
        )

    return _reconciliation


def _whole_migration(context: AssetExecutionContext, migration: Migration) -> bool:
    """Return whether this run loads every entity and deduplicates customers and contacts: a migration job,
    not a subset of its assets materialized on their own (from the UI) nor a re-execution of some steps."""
    needed = {f"core_{entity}" for entity in migration.entities}
    if "customer" in migration.entities:  # linkage and both merges: what the reconciliation depends on
        needed |= {
            "customer_match_candidates",
            "golden_customers",
            "golden_contacts",
            "customer_review_queue",
        }
    run = context.run
    selected = run.asset_selection  # empty, not None, for a job run in process
    if selected and not needed <= {key.to_user_string() for key in selected}:
        return False
    return run.step_keys_to_execute is None or needed <= set(run.step_keys_to_execute)


def _references_waiting(engine: Engine) -> int:
    """Return how many customer names wait for a steward's decision (`crmi dedup review`)."""
    with engine.connect() as connection:
        query = select(func.count()).where(
            ReferenceDecision.status == "pending", ReferenceDecision.rows_held > 0
        )
        return int(connection.scalar(query) or 0)


class RollbackConfig(dg.Config):
    """Which load run to undo (as in ``crmi rollback``)."""

    run_id: str
    cascade: bool = False


@dg.op(required_resource_keys={"core"})
def rollback_load_run(context: dg.OpExecutionContext, config: RollbackConfig) -> None:
    """Undo exactly what a load run inserted or changed, crosswalk and watermarks included (one transaction).

    Refuses when later runs depend on it unless ``cascade`` is set; the failure names those runs.
    """
    core: CoreDatabase = context.resources.core
    try:
        rolled = rollback_run(core.engine(), config.run_id, cascade=config.cascade)
    except CrmError as exc:
        raise _fail(exc) from exc
    context.log.info(f"rolled back {', '.join(rolled)}")
    context.add_output_metadata({"rolled_back": dg.MetadataValue.json(rolled)}, output_name="result")
    return None


def _active_if_unchanged(
    engine: Engine, run_key: str, model: type[Customer] | type[Contact], mode: str
) -> int | None:
    """Return how many active records ``model`` has when run ``run_key`` (not a delta) created or changed none
    of them, else None: linkage then has nothing to do (``only_if_changed``), and need not read them all."""
    if mode == "delta":
        return None
    with session_factory(engine)() as session:
        if changed_in_run(session, model, run_key):
            return None
        active = select(func.count()).select_from(model).where(model.merged_into_id.is_(None))
        return int(session.scalar(active) or 0)


def dedup_assets(migration: Migration) -> list[dg.AssetsDefinition]:
    """Return customer_match_candidates → golden_customers → customer_review_queue, golden_contacts.

    Linkage runs after every core load except those that resolve customers by name
    (:attr:`Migration.after_golden_customers`), which wait for the golden customers.
    """
    from integration.dedup.workflow import (
        Candidates,
        DedupOutcome,
        find_candidates,
        link_branches,
        merge_clusters,
        review_count,
        review_queue,
        second_look,
    )

    core_deps = [f"core_{e}" for e in migration.entities if e not in migration.after_golden_customers]
    rules = migration.project.spec.dedup.get("customer")
    priority = list(rules.source_priority) if rules else []
    survivorship = dict(rules.survivorship) if rules else {}

    @dg.asset(
        name="customer_match_candidates",
        group_name="dedup",
        owners=[OWNER_STEWARDS],
        tags={LAYER_TAG: "dedup"},
        deps=core_deps,
        required_resource_keys={"core", "project"},
        kinds={"recordlinkage"},
    )
    def _candidates(context: AssetExecutionContext) -> dg.Output[Candidates]:
        """Pairs of customers that may be one company: blocked, compared (rapidfuzz), scored by Fellegi–Sunter (ECM)."""
        core: CoreDatabase = context.resources.core
        options = RunOptions.from_tags(context.run.tags)
        with _load_run_step(context, core, migration.project.name) as engine:
            # A run that created or changed no customer links nothing: say so without reading every customer.
            unchanged = _active_if_unchanged(engine, context.run.run_id, Customer, options.mode)
            found = (
                Candidates(DedupOutcome(records=unchanged, changed_records=0), [], {}, migration.linkage_spec.auto_merge)
                if unchanged is not None
                else find_candidates(
                    engine, context.run.run_id, migration.project.name,
                    spec=migration.linkage_spec, mode=options.mode, only_if_changed=True,
                )
            )  # fmt: skip
            failpoint("dedup:candidates")
        outcome = found.outcome
        return dg.Output(found, metadata={
            "customers": outcome.records, "changed_customers": outcome.changed_records or outcome.records,
            "pairs_compared": outcome.pairs_compared,
            "reduction_ratio": outcome.reduction_ratio, "bands": dg.MetadataValue.json(outcome.bands),
            "new_candidates": outcome.new_candidates, "clusters_to_merge": len(found.clusters),
            "clusters_for_review": outcome.review_clusters,
            "cluster_size_histogram": dg.MetadataValue.json({str(k): v for k, v in outcome.cluster_sizes.items()}),
            "review_pairs": outcome.review_pairs, "review_share_of_records": outcome.review_share_of_records,
            "review_expected_same": outcome.review_expected_same,
            "review_reasons": dg.MetadataValue.json(outcome.review_reasons),
        })  # fmt: skip

    @dg.asset(
        name="golden_customers",
        group_name="dedup",
        owners=[OWNER_STEWARDS],
        tags={LAYER_TAG: "dedup"},
        ins={"candidates": dg.AssetIn(key="customer_match_candidates")},
        required_resource_keys={"core"},
        check_specs=[
            dg.AssetCheckSpec(
                "check_no_shared_credit_code",
                asset="golden_customers",
                blocking=True,
                description="No two golden customers share a valid 统一社会信用代码.",
            )
        ],
        kinds={"sqlalchemy"},
    )
    def _golden(context: AssetExecutionContext, candidates: Candidates) -> Any:
        """Sure clusters merged into one golden customer each; references and crosswalk re-pointed, merges logged."""
        core: CoreDatabase = context.resources.core
        options = RunOptions.from_tags(context.run.tags)
        with _load_run_step(context, core, migration.project.name) as engine:
            outcome = merge_clusters(engine, context.run.run_id, migration.project.name, candidates,
                                     source_priority=priority, survivorship=survivorship, mode=options.mode)  # fmt: skip
            second = second_look(engine, context.run.run_id, migration.project.name, candidates,
                                 spec=migration.linkage_spec, source_priority=priority, survivorship=survivorship,
                                 mode=options.mode)  # fmt: skip
            # Branches were pointed at their head office when their customers last changed.
            relink = candidates.outcome.changed_records != 0 or options.mode == "delta" or second.auto_merged
            branches = (
                link_branches(engine, context.run.run_id, migration.project.name, options.mode)
                if relink
                else 0
            )
            failpoint("dedup:merge")
            yield dg.MaterializeResult(metadata={
                "customers": candidates.outcome.records, "auto_merged": outcome.auto_merged + second.auto_merged,
                "merge_log_ids": dg.MetadataValue.json((outcome.merge_log_ids + second.merge_log_ids)[:50]),
                "second_look": dg.MetadataValue.json(second.summary()),
                "branches_linked_to_head_office": branches,
            })  # fmt: skip
            with session_factory(engine)() as session:
                shared = next(
                    v for v in core_violations(session, "customer") if v.rule == "customer.credit_code.unique"
                )
            yield from _blocking(context, engine, dg.AssetCheckResult(
                check_name="check_no_shared_credit_code",
                passed=shared.count == 0,
                metadata={"shared_codes": shared.count, "sample": dg.MetadataValue.json(shared.sample)},
            ), f"{shared.message} ({shared.count}, e.g. {shared.sample[:2]})")  # fmt: skip

    @dg.asset(
        name="customer_review_queue",
        group_name="dedup",
        owners=[OWNER_STEWARDS],
        tags={LAYER_TAG: "dedup"},
        deps=["golden_customers"],
        required_resource_keys={"core"},
        kinds={"pandas"},
    )
    def _review(context: AssetExecutionContext) -> dg.MaterializeResult:  # type: ignore[type-arg]
        """Pairs a data steward must decide (`crmi dedup review`): likely the same company, not sure enough to merge."""
        core: CoreDatabase = context.resources.core
        with _load_run_step(context, core, migration.project.name) as engine:
            counts = review_count(engine, entity="customer")  # counted in SQL, not by loading the queue
            queue = review_queue(engine, limit=MAX_SAMPLE_ROWS, entity="customer")
        sample = pd.DataFrame([{k: v for k, v in q.items() if k != "features"} for q in queue])
        return dg.MaterializeResult(
            metadata={
                "pending": counts["pending"],
                "expected_same": counts["expected_same"],
                "sample": dg.MetadataValue.md(markdown_table(sample)),
            }
        )

    @dg.asset(
        name="golden_contacts",
        group_name="dedup",
        owners=[OWNER_STEWARDS],
        tags={LAYER_TAG: "dedup"},
        deps=["golden_customers", *(["core_contact"] if "contact" in migration.entities else [])],
        required_resource_keys={"core"},
        kinds={"recordlinkage"},
    )
    def _contacts(context: AssetExecutionContext) -> dg.MaterializeResult:  # type: ignore[type-arg]
        """Contacts entered twice under one (golden) customer, linked and merged; uncertain pairs go to review."""
        from integration.dedup.contacts import deduplicate_contacts

        core: CoreDatabase = context.resources.core
        options = RunOptions.from_tags(context.run.tags)
        with _load_run_step(context, core, migration.project.name) as engine:
            unchanged = _active_if_unchanged(engine, context.run.run_id, Contact, options.mode)
            outcome = (
                DedupOutcome(records=unchanged, changed_records=0)
                if unchanged is not None
                else deduplicate_contacts(
                    engine,
                    context.run.run_id,
                    migration.project.name,
                    mode=options.mode,
                    only_if_changed=True,
                )
            )
        return dg.MaterializeResult(metadata={
            "contacts": outcome.records, "pairs_compared": outcome.pairs_compared,
            "bands": dg.MetadataValue.json(outcome.bands), "auto_merged": outcome.auto_merged,
            "clusters_for_review": outcome.review_clusters,
        })  # fmt: skip

    return [_candidates, _golden, _review, _contacts]
