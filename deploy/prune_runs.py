"""Delete old finished Dagster runs (and their event logs) from the instance; Dagster has no setting for it.

``python deploy/prune_runs.py [--days 90] [--keep 20] [--dry-run]`` deletes runs that ended (success,
failure, canceled) and were created more than ``--days`` ago, except the ``--keep`` newest of each job,
so the last go-live migration and its asset materializations stay visible however old they are. Runs
still queued or running are never touched. The crm-integration-prune.timer unit runs it daily.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import dagster as dg  # noqa: TID251 (a Dagster maintenance script)

FINISHED = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]
PAGE = 500


def prune(instance: dg.DagsterInstance, days: float, keep: int, dry_run: bool = False) -> list[str]:
    """Delete the runs that ended before ``days`` ago, keeping the ``keep`` newest per job; return their ids."""
    cutoff = datetime.now(UTC) - timedelta(days=days)
    seen: dict[str, int] = defaultdict(int)
    doomed: list[str] = []
    cursor: str | None = None
    while True:  # newest first, so the first `keep` runs of each job are the ones kept
        records = instance.get_run_records(
            filters=dg.RunsFilter(statuses=FINISHED), limit=PAGE, cursor=cursor
        )
        for record in records:
            run = record.dagster_run
            seen[run.job_name] += 1
            if seen[run.job_name] > keep and record.create_timestamp < cutoff:
                doomed.append(run.run_id)
        if len(records) < PAGE:
            break
        cursor = records[-1].dagster_run.run_id
    if not dry_run:
        for run_id in doomed:
            instance.delete_run(run_id)
    return doomed


def main(argv: list[str] | None = None) -> int:
    """Prune the instance of ``$DAGSTER_HOME`` and print how many runs went."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--days", type=float, default=90, help="delete runs created before this many days ago"
    )
    parser.add_argument("--keep", type=int, default=20, help="always keep this many newest runs per job")
    parser.add_argument("--dry-run", action="store_true", help="only say how many runs would go")
    args = parser.parse_args(argv)
    if args.days < 0 or args.keep < 0:
        print("crm-integration: --days and --keep must not be negative", file=sys.stderr)
        return 2
    with dg.DagsterInstance.get() as instance:
        gone = prune(instance, args.days, args.keep, args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    print(
        f"crm-integration: {verb} {len(gone)} finished runs older than {args.days:g} days (kept {args.keep} per job)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
