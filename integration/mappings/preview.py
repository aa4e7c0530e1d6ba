"""Dry run of one mapping on the first rows of its real source: raw vs mapped, and the rejects."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from crm_core.errors import ConfigError, Problem
from integration.connectors.base import LOCATION, ROW_REF
from integration.mappings.engine import MappingResult, map_chunk, python_records
from integration.mappings.spec import CompiledMapping, load_mapping
from integration.pipeline import Migration, extract_chunks
from integration.project import PROJECT_FILE


@dataclass
class Preview:
    """The raw rows read, what the mapping made of them, and why rows were rejected."""

    mapping: CompiledMapping
    raw: pd.DataFrame
    result: MappingResult

    def side_by_side(self) -> pd.DataFrame:
        """Return one row per source row: ``row``, ``status``, and ``field`` / ``field (raw)`` per mapped field."""
        mapped = self.result.records.set_index([LOCATION, ROW_REF]) if len(self.result.records) else None
        errors = self.result.rejects[self.result.rejects["severity"] == "error"]
        reasons = errors.groupby(["location", "row_ref"])["reason"].agg("; ".join).to_dict()
        warnings = self.result.rejects[self.result.rejects["severity"] == "warn"]
        warned = warnings.groupby(["location", "row_ref"])["reason"].agg("; ".join).to_dict()
        rows = []
        for _, raw in self.raw.iterrows():
            where = (raw[LOCATION], raw[ROW_REF])
            row: dict[str, object] = {"row": raw[ROW_REF]}
            if where in reasons:
                row["status"] = f"rejected: {reasons[where]}"
            else:
                row["status"] = "ok" if where not in warned else f"warning: {warned[where]}"
            own = {f.name: f.spec.columns for f in self.mapping.fields}
            for name in self.mapping.written_fields():  # with what a convert fills (currency…)
                columns = own.get(name, [])
                row[f"{name} (raw)"] = (
                    " | ".join(str(raw[c]) for c in columns if c in raw and pd.notna(raw[c]))
                    if columns
                    else ""
                )
                value = None
                if mapped is not None and where in mapped.index:
                    value = mapped.at[where, name]
                row[name] = None if value is None or (isinstance(value, float) and value != value) else value
            rows.append(row)
        return pd.DataFrame(rows)


def find_project(file: Path) -> Path | None:
    """Return the nearest folder above ``file`` that holds a project.yaml."""
    for folder in file.resolve().parents:
        if (folder / PROJECT_FILE).is_file():
            return folder
    return None


def preview(file: Path, rows: int = 20, project: Path | None = None) -> Preview:
    """Map the first ``rows`` rows of a mapping's source without writing anything."""
    root = project or find_project(file)
    if root is None:
        raise ConfigError(Problem("no project.yaml above this mapping; pass --project", file))
    migration = Migration.load(str(root))
    mapping = next((m for m in migration.mappings if m.file.resolve() == file.resolve()), None)
    if mapping is None:
        mapping = load_mapping(
            file, sources={s: None for s in migration.project.spec.sources}, rates=migration.rates
        )
    chunks = extract_chunks(migration, mapping, chunk_rows=rows)
    raw = next(iter(chunks), pd.DataFrame())
    if hasattr(chunks, "close"):
        chunks.close()
    result = map_chunk(mapping, raw) if len(raw) else MappingResult(pd.DataFrame(), pd.DataFrame(), 0)
    result.records = python_records(result.records)
    return Preview(mapping, raw, result)
