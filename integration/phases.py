"""Where a run's time went: wall time and rows/s per phase, from the Dagster event log of the run.

Steps map to phases by name: ``raw_*`` extract, ``staged_*`` map and validate, ``core_*`` load,
``customer_match_candidates`` link, ``golden_customers``/``golden_contacts``/``customer_review_queue``
merge, ``reconciliation_report`` reconcile. A phase's time is the wall time during which at least one of
its steps ran (steps of one phase that ran side by side count once).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

PHASES = ("extract", "map_validate", "load", "link", "merge", "reconcile")
MERGE_STEPS = ("golden_customers", "golden_contacts", "customer_review_queue")
# Materialization metadata that counts the rows each phase handled.
ROWS_METADATA = {
    "extract": ("rows_read",),  # source rows read
    "map_validate": ("records",),  # records mapped and validated
    "load": ("rows_read",),  # rows the loads were given
    "link": ("customers",),  # customers linked
    "merge": ("customers", "contacts"),  # customers and contacts deduplicated
    "reconcile": ("rows_reconciled",),  # source rows reconciled
}
_ENDS = ("STEP_SUCCESS", "STEP_FAILURE", "STEP_SKIPPED")


def phase_of(step_key: str | None) -> str | None:
    """Return the phase a step belongs to (None for steps outside the migration, e.g. a rollback)."""
    if not step_key:
        return None
    if step_key.startswith("raw_"):
        return "extract"
    if step_key.startswith("staged_"):
        return "map_validate"
    if step_key.startswith("core_"):
        return "load"
    if step_key == "customer_match_candidates":
        return "link"
    if step_key in MERGE_STEPS:
        return "merge"
    if step_key == "reconciliation_report":
        return "reconcile"
    return None


class _Timed:
    """A timed part of a run (a phase, a step): its wall time and rows, and what follows from them."""

    seconds: float
    rows: int

    @property
    def rows_per_second(self) -> float:
        """Return rows per second of wall time (0 when the part took no measurable time)."""
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def _figures(self) -> dict[str, Any]:
        """The JSON figures: seconds, rows and rows per second, rounded."""
        return {
            "seconds": round(self.seconds, 3),
            "rows": self.rows,
            "rows_per_second": round(self.rows_per_second, 1),
        }


@dataclass(frozen=True)
class PhaseTiming(_Timed):
    """Wall time and rows of one phase."""

    phase: str
    seconds: float
    rows: int

    def as_dict(self) -> dict[str, Any]:
        """Return the JSON form ``{"phase", "seconds", "rows", "rows_per_second"}``."""
        return {"phase": self.phase, **self._figures()}


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def _number(value: Any) -> int:
    raw = getattr(value, "value", value)
    return int(raw) if isinstance(raw, int | float) and not isinstance(raw, bool) else 0


@dataclass(frozen=True)
class StepTiming(_Timed):
    """Wall time and rows of one step of the run, with its phase (where the time of a phase went)."""

    step: str
    phase: str
    started: float  # the step's start, as a timestamp of the event log
    seconds: float
    rows: int

    def as_dict(self) -> dict[str, Any]:
        """Return the JSON form ``{"step", "phase", "seconds", "rows", "rows_per_second"}``."""
        return {"step": self.step, "phase": self.phase, **self._figures()}


def step_timings(entries: Iterable[Any]) -> list[StepTiming]:
    """Return every step of the six phases that started and ended, in the order they started, from a run's
    event log entries (``instance.all_logs(run_id)``); a failed step's time counts."""
    started: dict[str, float] = {}
    rows: dict[str, int] = defaultdict(int)
    steps: list[StepTiming] = []
    for entry in entries:
        event = entry.dagster_event
        phase = phase_of(entry.step_key)
        if event is None or phase is None:
            continue
        kind = event.event_type_value
        if kind == "STEP_START":
            started.setdefault(entry.step_key, entry.timestamp)
        elif kind in _ENDS and entry.step_key in started:
            start = started.pop(entry.step_key)
            steps.append(
                StepTiming(entry.step_key, phase, start, entry.timestamp - start, rows.pop(entry.step_key, 0))
            )
        elif kind == "ASSET_MATERIALIZATION":
            metadata = event.event_specific_data.materialization.metadata
            rows[entry.step_key] += sum(
                _number(metadata[key]) for key in ROWS_METADATA[phase] if key in metadata
            )
    return sorted(steps, key=lambda step: step.started)


def phase_timings(entries: Iterable[Any], steps: Iterable[StepTiming] | None = None) -> list[PhaseTiming]:
    """Return the six phases in order from a run's event log entries (``instance.all_logs(run_id)``), or from
    its :func:`step_timings` when given."""
    intervals: dict[str, list[tuple[float, float]]] = defaultdict(list)
    rows: dict[str, int] = defaultdict(int)
    for step in step_timings(entries) if steps is None else steps:
        intervals[step.phase].append((step.started, step.started + step.seconds))
        rows[step.phase] += step.rows
    return [PhaseTiming(phase, _union(intervals[phase]), rows[phase]) for phase in PHASES]
