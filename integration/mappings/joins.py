"""Source-side lookups, link tables and child aggregates, joined onto extracted chunks.

Each hop (a ``lookup`` with ``table``, a ``via`` step, an ``aggregate``) is summarised once per run into
one row per key — in the database for SQL sources (``GROUP BY`` pushed down, only the groups travel),
with pyarrow's ``group_by`` for sheets, CSV and APIs (the other sheet is read once) — and then joined
onto every chunk with ``index_in``/``take``: vectorized, no Python per row.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from crm_core.errors import ExtractError
from integration.connectors.base import META_COLUMNS, Connector, ReadRequest
from integration.mappings.expressions import to_arrow, to_number, to_text
from integration.mappings.spec import AggregateSpec, CompiledMapping, SourceJoin, SourceLookupSpec, ViaHop

# Appended to a joined column's name: the column giving, per row, why the join has no value.
JOIN_PROBLEM = "__problem"

_ARROW_FUNCTIONS = {"sum": "sum", "min": "min", "max": "max", "avg": "mean", "count": "count"}


def join_key(values: pa.Array) -> pa.Array:
    """Return values as join keys: text, whole numbers without ``.0``, trimmed, empty as missing."""
    text = pc.utf8_trim_whitespace(to_text(values))
    return pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)


@dataclass(frozen=True)
class Groups:
    """One hop summarised: per key its value and how many different values matched."""

    keys: pa.Array  # text
    values: pa.Array
    counts: pa.Array


def _hop_columns(hop: ViaHop | SourceLookupSpec | AggregateSpec) -> tuple[str, str | None, str]:
    """Return (key column, value column, function) of a hop."""
    if isinstance(hop, ViaHop):
        return hop.from_, hop.to, "min"
    if isinstance(hop, SourceLookupSpec):
        return hop.key, hop.value, "min"
    return hop.key, hop.value, hop.function


def summarise(connector: Connector, hop: ViaHop | SourceLookupSpec | AggregateSpec) -> Groups:
    """Summarise one hop's table into one row per key (pushed down to the database when it can)."""
    key, value, function = _hop_columns(hop)
    aggregate = getattr(connector, "aggregate", None)
    if aggregate is not None:
        frame = aggregate(hop.table, key, value, function, hop.where)
        keys = join_key(to_arrow(frame["key"]))
        values = to_arrow(frame["value"])
        counts = pc.cast(to_arrow(frame["n"]), pa.int64())
        return _merge_keys(keys, values, counts, function)
    chunks = list(connector.read(ReadRequest(table=hop.table, where=hop.where)))
    if not chunks:
        return Groups(pa.array([], pa.string()), pa.array([], pa.string()), pa.array([], pa.int64()))
    frame = pd.concat(chunks, ignore_index=True)
    if "_row_kind" in frame.columns:
        frame = frame[frame["_row_kind"] != "subtotal"]
    for column in (key, value):
        if column is not None and column not in frame.columns:
            columns = [c for c in frame.columns if c not in META_COLUMNS]
            raise ExtractError(
                connector.name, f"column '{column}' is not in {hop.table}; columns: {', '.join(columns)}"
            )
    keys = join_key(to_arrow(frame[key]))
    data = {"key": keys}
    if value is not None:
        values = to_arrow(frame[value])
        if function in ("sum", "avg"):
            values = pc.cast(to_number(values), pa.float64())
        data["value"] = values
    table = pa.table(data).filter(pc.is_valid(keys))
    if function == "count":
        grouped = table.group_by("key").aggregate([("key", "count")])
        counts = grouped["key_count"].combine_chunks()
        return Groups(grouped["key"].combine_chunks(), counts, pa.array([1] * len(counts), pa.int64()))
    aggregations = [("value", _ARROW_FUNCTIONS[function]), ("value", "count_distinct")]
    grouped = table.group_by("key").aggregate(aggregations)
    return Groups(
        grouped["key"].combine_chunks(),
        grouped[f"value_{_ARROW_FUNCTIONS[function]}"].combine_chunks(),
        pc.cast(grouped["value_count_distinct"].combine_chunks(), pa.int64()),
    )


def _merge_keys(keys: pa.Array, values: pa.Array, counts: pa.Array, function: str) -> Groups:
    """Database groups whose keys normalise alike (1 and '1 ') are merged; none usually do."""
    valid = pc.is_valid(keys)
    keys, values, counts = keys.filter(valid), values.filter(valid), counts.filter(valid)
    if pc.count_distinct(keys).as_py() == len(keys):
        return Groups(keys, values, counts)
    table = pa.table({"key": keys, "value": values, "n": counts})
    merge = {"sum": "sum", "count": "sum", "min": "min", "max": "max", "avg": "mean"}[function]
    grouped = table.group_by("key").aggregate([("value", merge), ("n", "sum")])
    return Groups(
        grouped["key"].combine_chunks(),
        grouped[f"value_{merge}"].combine_chunks(),
        grouped["n_sum"].combine_chunks(),
    )


@dataclass(frozen=True)
class PreparedJoin:
    """A join with its hops summarised: ready to apply to any number of chunks."""

    join: SourceJoin
    groups: tuple[Groups, ...]

    def apply(self, chunk: pd.DataFrame) -> tuple[pd.Series, pd.Series | None]:
        """Return the joined values for ``chunk`` and, per row, why there is none (None: no problems)."""
        current = join_key(to_arrow(chunk[self.join.column]))
        problems: pa.Array | None = None
        values: pa.Array = current
        last = len(self.groups) - 1
        for position, (hop, groups) in enumerate(zip(self.join.hops, self.groups, strict=True)):
            found = pc.index_in(current, value_set=groups.keys)
            values = pc.take(groups.values, found)
            if isinstance(hop, AggregateSpec):
                if hop.function == "count":
                    values = pc.fill_null(values, 0)
                continue
            counts = pc.take(groups.counts, found)
            ambiguous = pc.fill_null(pc.greater(counts, 1), False)
            if hop.multiple == "reject" and pc.any(ambiguous).as_py():
                column = hop.from_ if isinstance(hop, ViaHop) else hop.key
                target = hop.to if isinstance(hop, ViaHop) else hop.value
                reason = pc.binary_join_element_wise(
                    pc.cast(counts, pa.string()),
                    f" different {target} in {hop.table} for {column} = ",
                    current,
                    "",
                )
                reason = pc.if_else(ambiguous, reason, pa.scalar(None, pa.string()))
                problems = reason if problems is None else pc.coalesce(problems, reason)
                values = pc.if_else(ambiguous, pa.scalar(None, values.type), values)
            if position < last:
                current = join_key(values)
        index = chunk.index
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            from integration.mappings.columnar import arrow_series

            series = arrow_series(pc.cast(values, pa.string()), index)
        else:
            series = pd.Series(values.to_pylist(), index=index, dtype=object)
        if problems is None:
            return series, None
        return series, pd.Series(problems.to_pylist(), index=index, dtype=object)


def prepare(mapping: CompiledMapping, connector: Connector) -> list[PreparedJoin]:
    """Summarise every hop of every join of ``mapping`` (once per run)."""
    return [
        PreparedJoin(join, tuple(summarise(connector, hop) for hop in join.hops)) for join in mapping.joins
    ]


def join_chunks(chunks: Iterable[pd.DataFrame], prepared: list[PreparedJoin]) -> Iterator[pd.DataFrame]:
    """Add the joined columns (and their problem columns, when a row has one) to every chunk."""
    for chunk in chunks:
        if prepared and len(chunk.columns):
            added: dict[str, pd.Series] = {}
            for item in prepared:
                if item.join.column not in chunk.columns:
                    raise ExtractError(
                        "mapping",
                        f"column '{item.join.column}' (looked up in {item.join.hops[0].table}) is missing",
                    )
                values, problems = item.apply(chunk)
                added[item.join.name] = values
                if problems is not None:
                    added[item.join.name + JOIN_PROBLEM] = problems
            chunk = chunk.assign(**added)
        yield chunk
