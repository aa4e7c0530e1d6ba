"""Dry run of one mapping on the first rows of its real source: raw vs mapped, rejects and validation."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from crm_core.errors import ConfigError, Problem
from integration.connectors.base import LOCATION, ROW_REF
from integration.mappings.engine import MappingResult, map_chunk, python_records
from integration.mappings.spec import CompiledMapping
from integration.pipeline import Migration, extract_chunks, quarantine
from integration.project import PROJECT_FILE
from integration.reports import plain_value

ROW, STATUS = "_row", "_status"  # the preview's own columns: no target field starts with "_"


@dataclass
class Preview:
    """The raw rows read, what the mapping made of them, why rows were rejected, and what validation says."""

    mapping: CompiledMapping
    raw: pd.DataFrame
    result: MappingResult
    violations: pd.DataFrame = field(default_factory=pd.DataFrame)  # validation entries (errors, warnings)
    # Problems elsewhere in the project (another source, another mapping file): not this mapping's.
    warnings: list[Problem] = field(default_factory=list)

    def side_by_side(self) -> pd.DataFrame:
        """Return one row per source row: ``_row``, ``_status``, and ``field`` / ``field (raw)`` per mapped field.

        ``_status`` is ``ok``, ``rejected: …`` (the mapping could not make a record), ``invalid: …`` (a
        validation rule with severity error would quarantine it) or ``warning: …`` (it loads, reported).
        """
        mapped = self.result.records.set_index([LOCATION, ROW_REF]) if len(self.result.records) else None
        rejected = _reasons(self.result.rejects, "error")
        invalid = _reasons(self.violations, "error")
        warned = _reasons(pd.concat([self.result.rejects, self.violations], ignore_index=True), "warn")
        rows = []
        for _, raw in self.raw.iterrows():
            where = (raw[LOCATION], raw[ROW_REF])
            row: dict[str, object] = {ROW: raw[ROW_REF]}
            if where in rejected:
                row[STATUS] = f"rejected: {rejected[where]}"
            elif where in invalid:
                row[STATUS] = f"invalid: {invalid[where]}"
            else:
                row[STATUS] = "ok" if where not in warned else f"warning: {warned[where]}"
            own = {f.name: f.spec.columns for f in self.mapping.fields}
            for name in self.mapping.written_fields():  # with what a convert fills (currency…)
                columns = own.get(name, [])
                row[f"{name} (raw)"] = (
                    " | ".join(str(plain_value(raw[c])) for c in columns if c in raw and pd.notna(raw[c]))
                    if columns
                    else ""
                )
                value = None
                if mapped is not None and where in mapped.index:
                    value = mapped.at[where, name]
                row[name] = None if value is None or (isinstance(value, float) and value != value) else value
            rows.append(row)
        return pd.DataFrame(rows)


def _reasons(entries: pd.DataFrame, severity: str) -> dict[Hashable, str]:
    """Return ``(location, row_ref) -> reasons joined by '; '`` for the entries of one severity."""
    if entries.empty:
        return {}
    chosen = entries[entries["severity"] == severity]
    return chosen.groupby(["location", "row_ref"])["reason"].agg("; ".join).to_dict()


def find_project(file: Path) -> Path | None:
    """Return the nearest folder above ``file`` that holds a project.yaml."""
    for folder in file.resolve().parents:
        if (folder / PROJECT_FILE).is_file():
            return folder
    return None


def preview(file: Path, rows: int = 20, project: Path | None = None) -> Preview:
    """Map the first ``rows`` rows of a mapping's source without writing anything.

    Only the mapping, the project's settings and the source it reads must be valid; problems elsewhere in
    the project come back as ``warnings``.
    """
    root = project or find_project(file)
    if root is None:
        raise ConfigError(Problem("no project.yaml above this mapping; pass --project", file))
    migration = Migration.for_mappings([file], str(root))
    mapping = migration.mappings[0]
    chunks = extract_chunks(migration, mapping, chunk_rows=rows)
    raw = next(iter(chunks), pd.DataFrame())
    if hasattr(chunks, "close"):
        chunks.close()
    result = map_chunk(mapping, raw) if len(raw) else MappingResult(pd.DataFrame(), pd.DataFrame(), 0)
    result.records = python_records(result.records)
    violations = pd.DataFrame()
    if len(result.records):
        _, violations = quarantine(mapping, result.records, migration.rules)
        if len(violations):  # the rule that fired and the value it saw, as the quarantine reports them
            violations = violations.assign(
                reason=[
                    f"{rule}: {reason} (value {value!r})" if value is not None else f"{rule}: {reason}"
                    for rule, reason, value in zip(
                        violations["rule"], violations["reason"], violations["value"], strict=True
                    )
                ]
            )
    return Preview(mapping, raw, result, violations, list(migration.project.warnings))
