"""Tags that ``crmi run`` puts on its Dagster runs (a module of its own: the CLI imports it at start-up)."""

from __future__ import annotations

# The run executed in the `crmi run` process itself (not by a run worker of the daemon): see
# integration.cli._fail_dead_cli_runs; `crmi run` alerts its failure itself, so the run sensor passes it over.
LAUNCHED_BY_TAG, LAUNCHED_BY_CLI = "crmi/launched_by", "crmi run"
