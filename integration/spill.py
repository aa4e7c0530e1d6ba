"""Step outputs written piece by piece, so a step holds one piece of a source at a time, not all of it.

Extraction writes each chunk a connector reads as a file, staging maps and validates those one at a time
and writes each staged piece, and the core load reads the staged pieces one at a time. What passes
between the Dagster steps is a reference to the files (``StoredFrames``, ``crm_core.loading.StoredPieces``),
pickled by the run's IO manager as any output. The files of a step live in
``<storage>/spill/<step>/<run id>/``; writing a step again removes what the earlier runs wrote for it,
as the IO manager overwrites the step's own output file (not what runs still in progress wrote).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from crm_core.errors import ExtractError
from crm_core.loading import Batch, PieceHead, read_piece
from integration.pickling import dump_output

SPILL_FOLDER = "spill"


@dataclass
class StoredFrames:
    """A frame written as pieces, one file each; iterating reads them back one at a time, in order."""

    paths: list[str]
    rows: int
    attrs: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # the source system read (named when a piece is gone)

    def __iter__(self) -> Iterator[pd.DataFrame]:
        for path in self.paths:
            frame = read_piece(path, lambda gone: ExtractError(
                self.source, f"{gone} is gone (its extraction step ran again since): extract again"
            ))  # fmt: skip
            frame.attrs.update(self.attrs)
            yield frame

    def to_frame(self) -> pd.DataFrame:
        """Return every piece joined into one frame (its attrs kept)."""
        frames = list(self)
        frame = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
        frame.attrs.update(self.attrs)
        return frame


class SpillFolder:
    """Where one step of one run writes its pieces: ``<storage>/spill/<step>/<run id>/``.

    Created empty (a retried step writes anew); ``keep_only_this_run`` removes the step's pieces of
    earlier runs once this run's are written.
    """

    def __init__(self, storage: str | Path, step: str, run_id: str) -> None:
        self.root = Path(storage) / SPILL_FOLDER / step
        self.path = self.root / run_id
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True)
        self._written = 0

    def write(self, value: Any, prefix: str = "piece") -> str:
        """Pickle one piece (decimal columns as text, as step outputs are) and return its path."""
        path = self._next(prefix)
        with path.open("wb") as file:
            dump_output(value, file)
        return str(path)

    def write_batch(self, batch: Batch, read_columns: Sequence[str], prefix: str = "piece") -> str:
        """Write one staged piece as a ``PieceHead`` (the batch, and those of ``read_columns`` its raw rows have:
        what the load's check reads) followed by its raw rows, and return its path (``StoredPieces`` reads it)."""
        path = self._next(prefix)
        raw = batch.raw
        read = None if raw is None else raw[[c for c in raw.columns if c in read_columns]]
        with path.open("wb") as file:
            dump_output(PieceHead(replace(batch, raw=None), read), file)
            if raw is not None:
                dump_output(raw, file)
        return str(path)

    def _next(self, prefix: str) -> Path:
        self._written += 1
        return self.path / f"{prefix}-{self._written:05d}.pkl"

    def keep_only_this_run(self, running: Callable[[str], bool] | None = None) -> None:
        """Remove the pieces earlier runs wrote for this step, but those of the runs ``running`` says are not
        finished (a trial beside a migration: their later steps still read them)."""
        for other in self.root.iterdir():
            if other != self.path and not (running is not None and running(other.name)):
                shutil.rmtree(other, ignore_errors=True)
