"""``crmi``: the consultant's command line (run a migration, check a project or mapping files)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from crm_core.db import core_url, make_engine, redact_url, upgrade
from crm_core.errors import ConfigError, CrmError

app = typer.Typer(
    help="crm-integration: move customer and sales data into a clean CRM core.", no_args_is_help=True
)
mapping_app = typer.Typer(help="Write and check mapping files.", no_args_is_help=True)
project_app = typer.Typer(help="Check a migration project.", no_args_is_help=True)
core_app = typer.Typer(help="Manage the CRM core database.", no_args_is_help=True)
app.add_typer(mapping_app, name="mapping")
app.add_typer(project_app, name="project")
app.add_typer(core_app, name="core")

console = Console(width=None if sys.stdout.isatty() else 160)
errors = Console(stderr=True, soft_wrap=True)  # never wrap: file:line:col must stay on one line

ProjectOption = Annotated[
    Path | None,
    typer.Option("--project", "-p", help="project folder (default: $CRM_PROJECT or examples/demo)"),
]
CoreOption = Annotated[
    str | None, typer.Option("--core-url", help="core database URL (default: $CRM_CORE_URL)")
]

EXIT_OK, EXIT_FAILED, EXIT_UNBALANCED = 0, 1, 2


def _config_error(exc: ConfigError) -> typer.Exit:
    errors.print(exc.render(), markup=False, highlight=False)
    errors.print(f"[red]{len(exc.problems)} problem(s)[/red]")
    return typer.Exit(EXIT_FAILED)


@app.command()
def run(
    project: ProjectOption = None,
    core: CoreOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Dagster's step logs")] = False,
) -> None:
    """Run the whole migration job through Dagster and print the reconciliation (exit 2 if it does not balance)."""
    import dagster as dg

    from integration.definitions import MIGRATION_JOB, build_definitions
    from integration.pipeline import core_engine, reconcile

    if core:
        # Through the environment, not resource config: the UI shows resource config, and URLs hold passwords.
        os.environ["CRM_CORE_URL"] = core
    try:
        defs = build_definitions(project)
    except ConfigError as exc:
        raise _config_error(exc) from None
    # Runs go to a persistent instance so they show up in `make ui` afterwards.
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path("var/dagster_home").resolve())))
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():  # customer data tooling: no usage telemetry by default
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n", encoding="utf-8")
    log_level = "DEBUG" if verbose else "WARNING"
    with dg.DagsterInstance.get() as instance:
        result = defs.resolve_job_def(MIGRATION_JOB).execute_in_process(
            instance=instance,
            raise_on_error=False,
            run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
        )
    if not result.success:
        for event in result.all_events:
            failure = event.step_failure_data if event.is_step_failure else None
            if failure is not None and failure.error is not None:
                errors.print(
                    f"[red]{event.step_key} failed:[/red] {failure.error.message.strip()}", markup=False
                )
        raise typer.Exit(EXIT_FAILED)
    report = reconcile(core_engine(core), result.run_id)
    location = redact_url(core_url(core))
    report_dir = Path("var") / "reports" / result.run_id
    if as_json:
        payload = {
            "run_id": result.run_id,
            "balanced": report.balanced,
            "core": location,
            "reports": str(report_dir),
            "lines": json.loads(report.to_frame().to_json(orient="records")),
            "core_counts": report.core_counts,
        }
        console.print_json(json.dumps(payload, default=str))
    else:
        table = Table(title=f"Reconciliation of run {result.run_id[:8]}")
        for column in (
            "source",
            "entity",
            "read",
            "loaded",
            "merged",
            "rejected",
            "warnings",
            "amount source",
            "amount core",
            "ok",
        ):
            table.add_column(column, justify="left" if column in ("source", "entity") else "right")
        for line in report.lines:
            table.add_row(
                line.source, line.entity, str(line.rows_read), str(line.loaded), str(line.merged), str(line.rejected),
                str(line.warnings), "" if line.amount_source is None else f"{line.amount_source:,.2f}",
                "" if line.amount_core is None else f"{line.amount_core:,.2f}", "✅" if line.balanced else "❌",
            )  # fmt: skip
        console.print(table)
        counts = ", ".join(f"{k}: {v}" for k, v in report.core_counts.items() if v)
        console.print(f"Core database: [bold]{location}[/bold]\nIn the core now: {counts}")
        console.print(f"Reports (reconciliation, rejects): {report_dir}")
        console.print(
            "[green]Every row is accounted for.[/green]"
            if report.balanced
            else "[red]The run does not balance.[/red]"
        )
    raise typer.Exit(EXIT_OK if report.balanced else EXIT_UNBALANCED)


@project_app.command("check")
def project_check(project: ProjectOption = None) -> None:
    """Check project.yaml, every mapping file, and each mapping's columns against its real source."""
    from integration.mappings.spec import load_mappings
    from integration.pipeline import Migration, source_columns

    try:
        migration = Migration.load(str(project) if project else None)
    except ConfigError as exc:
        raise _config_error(exc) from None
    problems = 0
    unchecked: dict[str, list[str] | None] = {name: None for name in migration.project.spec.sources}
    for mapping in migration.mappings:
        try:
            found = source_columns(migration, mapping)
        except CrmError as exc:
            errors.print(str(exc), markup=False, highlight=False)
            problems += 1
            continue
        try:
            load_mappings([mapping.file], sources={**unchecked, mapping.source: found})
        except ConfigError as exc:
            errors.print(exc.render(), markup=False, highlight=False)
            problems += len(exc.problems)
    if problems:
        errors.print(f"[red]{problems} problem(s)[/red]")
        raise typer.Exit(EXIT_FAILED)
    console.print(
        f"[green]ok[/green]: project '{migration.project.name}', {len(migration.mappings)} mapping(s), {len(migration.project.spec.sources)} source(s)"
    )


@mapping_app.command("check")
def mapping_check(files: Annotated[list[Path], typer.Argument(help="mapping files")]) -> None:
    """Check mapping files without connecting to sources (exit 1 on any problem)."""
    from integration.mappings.spec import load_mappings

    try:
        load_mappings(files)
    except ConfigError as exc:
        raise _config_error(exc) from None
    console.print(f"[green]ok[/green]: {len(files)} mapping file(s)")


@mapping_app.command("preview")
def mapping_preview(
    file: Annotated[Path, typer.Argument(help="mapping file")],
    rows: Annotated[int, typer.Option("--rows", "-n", help="source rows to map")] = 20,
    project: ProjectOption = None,
    output: Annotated[str, typer.Option("--format", help="table or csv")] = "table",
) -> None:
    """Map the first rows of the mapping's real source: raw vs mapped side by side, rejects with reasons."""
    import pandas as pd

    from integration.mappings.preview import preview

    try:
        result = preview(file, rows, project)
    except ConfigError as exc:
        raise _config_error(exc) from None
    frame = result.side_by_side()
    if output == "csv":
        from integration.reports import escape_formula

        frame.map(escape_formula).to_csv(sys.stdout, index=False)
        return
    if output != "table":
        errors.print(f"unknown --format '{output}'; use table or csv")
        raise typer.Exit(EXIT_FAILED)
    table = Table(
        title=f"{file.name}: {result.mapping.source}.{result.mapping.spec.source.location} → {result.mapping.entity.name}"
    )
    for column in ("row", "status", "field", "raw", "mapped"):
        table.add_column(column, overflow="fold")
    fields = [f.name for f in result.mapping.fields]
    for record in frame.to_dict("records"):
        status = str(record["status"])
        style = (
            "red"
            if status.startswith("rejected")
            else ("yellow" if status.startswith("warning") else "green")
        )
        for position, field in enumerate(fields):
            mapped = record[field]
            table.add_row(
                str(record["row"]) if position == 0 else "",
                f"[{style}]{status}[/{style}]" if position == 0 else "",
                field,
                str(record[f"{field} (raw)"]),
                "" if mapped is None or pd.isna(mapped) else str(mapped),
                end_section=position == len(fields) - 1,
            )
    console.print(table)
    rejected = int(frame["status"].str.startswith("rejected").sum()) if len(frame) else 0
    console.print(f"{len(frame)} row(s) read, {len(frame) - rejected} mapped, {rejected} rejected")


@mapping_app.command("scaffold")
def mapping_scaffold(
    source: Annotated[str, typer.Option("--source", help="a source named in project.yaml")],
    table: Annotated[str, typer.Option("--table", help="table or sheet to map")],
    target: Annotated[
        str | None, typer.Option("--target", help="entity (guessed from the table name if omitted)")
    ] = None,
    project: ProjectOption = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="write here instead of stdout")] = None,
) -> None:
    """Write a starter mapping from the source's real columns, guessing fields from Chinese and English headers."""
    from crm_core.entities import ENTITIES
    from integration.connectors import ExcelConnector
    from integration.mappings.scaffold import scaffold
    from integration.pipeline import Migration

    if target is not None and target not in ENTITIES:
        errors.print(f"unknown --target '{target}'; entities: {', '.join(ENTITIES)}")
        raise typer.Exit(EXIT_FAILED)
    try:
        migration = Migration.load(str(project) if project else None)
    except ConfigError as exc:
        raise _config_error(exc) from None
    if source not in migration.project.spec.sources:
        errors.print(
            f"unknown --source '{source}'; project sources: {', '.join(migration.project.spec.sources)}"
        )
        raise typer.Exit(EXIT_FAILED)
    connector = migration.connector(source)
    text = scaffold(
        source, table, connector.columns(table), target=target, sheet=isinstance(connector, ExcelConnector)
    )
    if out is None:
        sys.stdout.write(text)
        return
    if out.exists():
        errors.print(f"{out} exists; not overwriting it")
        raise typer.Exit(EXIT_FAILED)
    out.write_text(text, encoding="utf-8")
    console.print(f"wrote {out}; check it with: crmi mapping check {out}")


@mapping_app.command("schema")
def mapping_schema() -> None:
    """Print the JSON Schema of mapping files (for editor completion)."""
    from integration.mappings.spec import json_schema

    sys.stdout.write(json_schema())


@core_app.command("upgrade")
def core_upgrade(core: CoreOption = None) -> None:
    """Create or migrate the core database schema to the latest revision."""
    engine = make_engine(core)
    upgrade(engine)
    console.print(f"core schema up to date at {redact_url(core_url(core))}")


def main() -> None:
    """Entry point that turns our errors into one clear line instead of a traceback."""
    try:
        app()
    except CrmError as exc:
        errors.print(f"[red]error:[/red] {exc}")
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
