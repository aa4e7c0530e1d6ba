"""A test-only Dagster code location for tests/test_deploy.py, loaded beside the real one.

``gated``: one op that waits until the test opens its gate (a file named after the run id in
``$CRMI_DEPLOY_TEST_GATES``), so the test decides when a run ends and needs no sleeping.
``probe``: a job that ends at once, started by a one-minute schedule and a sensor, each once.
"""

# No ``from __future__ import annotations`` here: Dagster inspects the *objects* annotating ``context``.
import os
import time
from pathlib import Path

import dagster as dg

GATES_ENV = "CRMI_DEPLOY_TEST_GATES"
ALL_GATES = "all"  # this file opens every gate (the test's teardown)
GATE_TIMEOUT = 150.0
SCHEDULE = "deploy_probe_every_minute"
SENSOR = "deploy_probe_sensor"


@dg.op
def wait_for_gate(context: dg.OpExecutionContext) -> None:
    """Return once the file named after this run exists in the gates folder."""
    gates = Path(os.environ[GATES_ENV])
    gate = gates / context.run_id
    deadline = time.monotonic() + GATE_TIMEOUT
    while not gate.exists() and not (gates / ALL_GATES).exists():
        if time.monotonic() > deadline:
            raise dg.Failure(f"the test never opened {gate}")
        time.sleep(0.1)


@dg.job(description="Waits for the test to open its gate.")
def gated() -> None:
    """Hold a run in progress until the test lets it end."""
    wait_for_gate()


@dg.op
def say_hello(context: dg.OpExecutionContext) -> str:
    """Log who started the run."""
    context.log.info(f"probe started by {context.run.tags.get('crmi/test-trigger', 'hand')}")
    return "hello"


@dg.job(description="Ends at once.")
def probe() -> None:
    """A run the schedule and the sensor start."""
    say_hello()


def _first(instance: dg.DagsterInstance, trigger: str) -> bool:
    return not instance.get_run_records(dg.RunsFilter(tags={"crmi/test-trigger": trigger}), limit=1)


@dg.schedule(
    cron_schedule="* * * * *", job=probe, default_status=dg.DefaultScheduleStatus.RUNNING, name=SCHEDULE
)
def every_minute(context: dg.ScheduleEvaluationContext) -> dg.RunRequest | dg.SkipReason:
    """Start ``probe`` at the first tick only."""
    if not _first(context.instance, "schedule"):
        return dg.SkipReason("the probe ran already")
    return dg.RunRequest(tags={"crmi/test-trigger": "schedule"})


@dg.sensor(job=probe, minimum_interval_seconds=10, default_status=dg.DefaultSensorStatus.RUNNING, name=SENSOR)
def at_once(context: dg.SensorEvaluationContext) -> dg.RunRequest | dg.SkipReason:
    """Start ``probe`` at the first evaluation only (run key); the daemon evaluates a new sensor at once."""
    return dg.RunRequest(run_key="first", tags={"crmi/test-trigger": "sensor"})


defs = dg.Definitions(jobs=[gated, probe], schedules=[every_minute], sensors=[at_once])
