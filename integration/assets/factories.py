"""Asset factories: the project's mappings become raw, staged, core and reconciliation assets.

* ``raw_<source>_<entity>`` — rows as extracted (one per mapping), with row references.
* ``staged_<entity>``       — canonical records + rejects from every mapping of the entity.
* ``core_<entity>``         — the entity loaded into the core by crosswalk (one transaction).
* ``reconciliation_report`` — per source and entity: read = loaded + merged + rejected, and sums.
"""

# No ``from __future__ import annotations`` here: Dagster inspects the *objects* annotating ``context``
# and asset inputs, and string annotations make it reject the definitions.

from collections import Counter
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
from dagster import AssetExecutionContext
from sqlalchemy import func, select

from crm_core.errors import CrmError, TransientExtractError
from crm_core.loading import SourceStats
from crm_core.models import Customer
from crm_core.watermarks import CursorState
from integration.assets.resources import CoreDatabase, MigrationProject, SourceSystem
from integration.mappings.spec import CompiledMapping
from integration.pipeline import (
    WATERMARK_ATTR,
    Migration,
    StagedEntity,
    extract,
    finish_run,
    load,
    raw_asset_name,
    reconcile,
    stage,
    stream_watermark,
)
from integration.reports import markdown_table, write_reports

MAX_PREVIEW_ROWS = 5
# Above this share of rejected rows a staged entity's check warns.
REJECT_RATIO_WARNING = 0.2


def _fail(exc: CrmError) -> dg.Failure:
    return dg.Failure(description=str(exc), allow_retries=False)


def _preview(frame: pd.DataFrame) -> dg.MetadataValue:
    return dg.MetadataValue.md(markdown_table(frame.head(MAX_PREVIEW_ROWS)))


def raw_asset(migration: Migration, mapping: CompiledMapping) -> dg.AssetsDefinition:
    """Return the asset that extracts the rows one mapping reads."""
    name = raw_asset_name(mapping)
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
        metadata={"mapping_file": str(mapping.file)},
    )
    def _raw(context: AssetExecutionContext) -> dg.Output[pd.DataFrame]:
        source: SourceSystem = getattr(context.resources, source_key)
        project: MigrationProject = context.resources.project
        core: CoreDatabase = context.resources.core
        try:
            since = stream_watermark(core.engine(), mapping)
            frame = extract(project.migration(), mapping, since=since)
        except TransientExtractError as exc:
            raise dg.RetryRequested(max_retries=3, seconds_to_wait=2) from exc
        except CrmError as exc:
            raise _fail(exc) from exc
        data_rows = int((frame.get("_row_kind", pd.Series(dtype=str)) == "data").sum())
        return dg.Output(
            frame,
            metadata={
                "rows_read": len(frame),
                "data_rows": data_rows,
                "columns": dg.MetadataValue.json([c for c in frame.columns if not c.startswith("_")]),
                "source_location": source.connector().describe(),
                "bytes_in_memory": int(frame.memory_usage(deep=True).sum()) if len(frame) else 0,
                "preview": _preview(frame),
                **_cursor_metadata(mapping, since, frame),
            },
        )

    return _raw


def _cursor_metadata(
    mapping: CompiledMapping, since: CursorState | None, frame: pd.DataFrame
) -> dict[str, Any]:
    """Cursor before/after for incremental mappings (what the next run will start from once loaded)."""
    incremental = mapping.spec.source.incremental
    if incremental is None:
        return {"incremental": False}
    carried = frame.attrs.get(WATERMARK_ATTR)
    after = CursorState.from_json(carried[1]) if carried else None
    return {
        "incremental": True,
        "cursor_column": incremental.cursor,
        "cursor_before": since.describe() if since else "(first run: everything)",
        "cursor_after": after.describe() if after else "(nothing read)",
    }


def staged_asset(migration: Migration, entity: str) -> dg.AssetsDefinition:
    """Return the asset that maps every raw input of ``entity`` into canonical records."""
    mappings = migration.mappings_for(entity)
    ins = {raw_asset_name(m): dg.AssetIn(key=raw_asset_name(m)) for m in mappings}
    check = dg.AssetCheckSpec(
        name="check_reject_ratio",
        asset=f"staged_{entity}",
        description=f"Warns when more than {REJECT_RATIO_WARNING:.0%} of a source's rows are rejected by the mapping.",
    )

    @dg.asset(
        name=f"staged_{entity}",
        group_name="stage",
        description=f"Canonical {entity} records mapped from {', '.join(m.name for m in mappings)}, with rejects.",
        ins=ins,
        required_resource_keys={"project"},
        check_specs=[check],
        kinds={"pandas"},
    )
    def _staged(context: AssetExecutionContext, **raw: pd.DataFrame) -> Any:
        project: MigrationProject = context.resources.project
        try:
            staged = stage(project.migration(), entity, raw)
        except CrmError as exc:
            raise _fail(exc) from exc
        rows = []
        worst = 0.0
        for batch in staged.batches:
            rejected_rows = batch.rejects.loc[
                batch.rejects["severity"] == "error", ["location", "row_ref"]
            ].drop_duplicates()
            ratio = len(rejected_rows) / batch.rows_read if batch.rows_read else 0.0
            worst = max(worst, ratio)
            rows.append({"mapping": batch.mapping, "read": batch.rows_read, "mapped": len(batch.records),
                         "rejected": len(rejected_rows), "warnings": int((batch.rejects["severity"] == "warn").sum())})  # fmt: skip
        reasons = Counter(r for b in staged.batches for r in b.rejects["rule"].astype(str))
        yield dg.Output(
            staged,
            metadata={
                "records": staged.records,
                "reject_entries": staged.rejects,
                "by_mapping": dg.MetadataValue.md(markdown_table(pd.DataFrame(rows))),
                "reject_rules": dg.MetadataValue.json(dict(reasons)),
            },
        )
        yield dg.AssetCheckResult(
            check_name="check_reject_ratio",
            passed=worst <= REJECT_RATIO_WARNING,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"worst_reject_ratio": round(worst, 4)},
        )

    return _staged


def _stats_table(stats: list[SourceStats]) -> str:
    frame = pd.DataFrame([s.as_dict() for s in stats])
    columns = ["source", "rows_read", "inserted", "updated", "unchanged", "merged", "rejected", "warnings"]
    return markdown_table(frame[columns]) if len(frame) else "_none_"


def core_asset(migration: Migration, entity: str) -> dg.AssetsDefinition:
    """Return the asset that loads ``entity`` into the core by crosswalk."""
    definition = migration.mappings_for(entity)[0].entity
    referenced = {f.references for f in definition.references.values()} - {entity}
    deps = [f"core_{name}" for name in migration.entities if name in referenced]
    checks = [
        dg.AssetCheckSpec(
            name="check_every_row_accounted_for",
            asset=f"core_{entity}",
            description="Each source row is loaded, merged or rejected: read = loaded + merged + rejected.",
            blocking=True,
        )
    ]
    if entity == "customer":
        checks.append(
            dg.AssetCheckSpec(
                name="check_unique_credit_codes",
                asset="core_customer",
                description="No two active customers share a 统一社会信用代码.",
                blocking=True,
            )
        )

    @dg.asset(
        name=f"core_{entity}",
        group_name="core",
        description=f"{entity} records in the CRM core, upserted by crosswalk in one transaction.",
        ins={"staged": dg.AssetIn(key=f"staged_{entity}")},
        deps=deps,
        required_resource_keys={"core", "project"},
        check_specs=checks,
        kinds={"sqlalchemy"},
    )
    def _core(context: AssetExecutionContext, staged: StagedEntity) -> Any:
        core: CoreDatabase = context.resources.core
        project: MigrationProject = context.resources.project
        engine = core.engine()
        try:
            stats = load(project.migration(), engine, context.run.run_id, staged)
        except CrmError as exc:
            raise _fail(exc) from exc
        totals = {
            k: sum(getattr(s, k) for s in stats)
            for k in ("rows_read", "inserted", "updated", "unchanged", "merged", "rejected")
        }
        yield dg.MaterializeResult(
            metadata={
                **totals,
                "by_source": dg.MetadataValue.md(_stats_table(stats)),
                "core": core.location(),
            }
        )
        unbalanced = [s.source for s in stats if not s.balanced]
        yield dg.AssetCheckResult(
            check_name="check_every_row_accounted_for",
            passed=not unbalanced,
            metadata={"unbalanced_sources": dg.MetadataValue.json(unbalanced)},
        )
        if entity == "customer":
            with engine.connect() as connection:
                shared = connection.execute(
                    select(Customer.credit_code, func.count())
                    .where(Customer.merged_into_id.is_(None), Customer.credit_code.is_not(None))
                    .group_by(Customer.credit_code)
                    .having(func.count() > 1)
                ).all()
            yield dg.AssetCheckResult(
                check_name="check_unique_credit_codes",
                passed=not shared,
                metadata={
                    "shared_codes": len(shared),
                    "sample": dg.MetadataValue.json([r[0] for r in shared[:10]]),
                },
            )

    return _core


def reconciliation_asset(migration: Migration, report_dir: Path) -> dg.AssetsDefinition:
    """Return the asset that reconciles the run: rows and amounts per source and entity."""

    @dg.asset(
        name="reconciliation_report",
        group_name="report",
        description="Per source and entity: rows read = loaded + merged + rejected, amount sums source vs core.",
        deps=[f"core_{e}" for e in migration.entities],
        required_resource_keys={"core"},
        check_specs=[
            dg.AssetCheckSpec("check_reconciliation_balances", asset="reconciliation_report", blocking=True)
        ],
        kinds={"pandas"},
    )
    def _reconciliation(context: AssetExecutionContext) -> Any:
        core: CoreDatabase = context.resources.core
        engine = core.engine()
        report = reconcile(engine, context.run.run_id)
        finish_run(engine, context.run.run_id, report)
        files = write_reports(report, report_dir / context.run.run_id)
        yield dg.MaterializeResult(
            metadata={
                "reconciliation": dg.MetadataValue.md(report.to_markdown()),
                "balanced": report.balanced,
                "rejected_rows": int((report.rejects["severity"] == "error").sum()),
                "core_counts": dg.MetadataValue.json(report.core_counts),
                "report_files": dg.MetadataValue.json({k: str(v) for k, v in files.items()}),
            }
        )
        yield dg.AssetCheckResult(
            check_name="check_reconciliation_balances",
            passed=report.balanced,
            metadata={
                "unbalanced": dg.MetadataValue.json(
                    [f"{line.source}/{line.entity}" for line in report.lines if not line.balanced]
                )
            },
        )

    return _reconciliation
