"""Where step outputs go between Dagster steps: pickle files under the instance's storage folder.

Dagster's ``FilesystemIOManager`` pickles every output value as it is. Frames read from an ERP carry their
NUMERIC columns as ``Decimal`` objects, and pickle reduces each one through ``Decimal.__reduce__``: at
1,000,000 source rows the U8 order lines alone (nine money columns, in the extract and again in the
staged batch) cost 13 s of the run in pickling. ``StepOutputFiles`` writes the same files, loadable by a
plain ``pickle.load``, but writes each object column that holds decimals as its text with the positions
of the decimals, and builds the ``Decimal`` objects back from that text (exact: ``Decimal(str(d)) == d``,
sign, exponent, NaN and all).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg
from dagster._core.storage.fs_io_manager import PickledObjectFilesystemIOManager

from crm_core.errors import ConfigError

# _object_array is what earlier step outputs name when unpickled: it stays importable from here.
from integration.pickling import MIN_DECIMALS, _object_array, dump_output  # noqa: F401

if TYPE_CHECKING:
    from upath import UPath


class _StepOutputFiles(PickledObjectFilesystemIOManager):
    """The IO manager ``FilesystemIOManager`` makes, its paths and all, but with its own pickler.

    Its paths: the same file names (outputs written by either load by either) and partition keys
    joined as literal sub-paths (a key with a ``..`` segment stays under the base folder).
    """

    def __init__(self, base_dir: str, trial: bool = False) -> None:
        super().__init__(base_dir=base_dir)  # type: ignore[no-untyped-call]  # Dagster's is untyped
        self.trial = trial

    def dump_to_path(self, context: dg.OutputContext, obj: Any, path: UPath) -> None:
        """Pickle one output (decimal columns as text)."""
        with path.open("wb") as file:
            dump_output(obj, file)

    def load_from_path(self, context: dg.InputContext, path: UPath) -> Any:
        """Unpickle one input; a trial step whose upstream step did not run in the trial says so."""
        if self.trial and not path.exists():
            upstream = context.upstream_output
            name = upstream.asset_key.to_user_string() if upstream and upstream.has_asset_key else path.name
            raise ConfigError(
                f"this trial has no output of {name}: a trial's steps read only what its own run (or the run "
                "it re-executes) wrote, never a migration's; run the whole trial (`crmi run --trial`), or "
                "re-execute the trial run in the Dagster UI to run some of its steps again"
            )
        return super().load_from_path(context, path)


TRIAL_OUTPUTS = "trial"


def trial_root(run: dg.DagsterRun) -> str:
    """Return the run a trial's step outputs and scratch core belong to: its root run, so a re-execution (a
    new run id) works on what its first run's steps wrote."""
    return run.root_run_id or run.run_id


class StepOutputFiles(dg.FilesystemIOManager):
    """Step outputs as pickle files under the instance's storage folder, decimal columns written as text.

    Dagster names an asset's output file by the asset alone, so two runs of one instance write the same
    files. A trial run (run tag ``crmi/mode: trial``) may run beside a migration (it writes a scratch core
    and carries no ``crmi/core`` tag): its outputs go to ``<base>/trial/<root run id>/`` instead, where they
    cannot replace what the migration's later steps read. A trial reads only what it (or the run it
    re-executes) wrote.
    """

    @classmethod
    def _is_dagster_maintained(cls) -> bool:
        return False

    def create_io_manager(self, context: dg.InitResourceContext) -> Any:
        """Return the IO manager writing under ``base_dir`` or the instance's storage directory (a trial run:
        under its own folder there)."""
        from integration.pipeline import MODE_TAG  # here: Dagster's IO manager module stays light to import

        instance = context.instance
        if self.base_dir is not None:
            base = self.base_dir
        elif instance is not None:
            base = instance.storage_directory()
        else:  # Dagster builds IO managers with their instance; a bare context has none
            raise dg.DagsterInvariantViolationError(
                "StepOutputFiles needs base_dir outside a Dagster instance"
            )
        run = context.run
        if run is not None and run.tags.get(MODE_TAG) == "trial":
            return _StepOutputFiles(str(Path(base) / TRIAL_OUTPUTS / trial_root(run)), trial=True)
        return _StepOutputFiles(base)
