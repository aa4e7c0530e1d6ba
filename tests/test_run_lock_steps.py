"""Runs launched from Dagster (the UI, a schedule, a sensor) respect the run lock a `crmi` command holds."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

from crm_core.db import ensure_schema, make_engine
from crm_core.models import LoadRun
from crm_core.runs import CoreBusy, core_lock_holder, core_run_lock
from integration.assets.resources import dispose_engines
from tests.test_end_to_end import execute, run_job
from tests.test_runs import content

REPO = Path(__file__).resolve().parent.parent

HOLD_THE_LOCK = """
import sys
from crm_core.db import make_engine
from crm_core import runs
with getattr(runs, sys.argv[2])(make_engine(sys.argv[1]), sys.argv[3]):
    print("held", flush=True)
    sys.stdin.read()
"""


@contextmanager
def held_by_another_process(
    url: str, lock: str = "core_run_lock", holder: str = "crmi rollback on the consultant's laptop (pid 4242)"
) -> Iterator[None]:
    """Hold the core's run lock in another process (as a `crmi` command in another terminal does), with ``lock``
    (``core_sync_lock``: shared, as a sync on the Dagster host does) under the name ``holder``."""
    with subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, url, lock, holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        cwd=REPO, text=True,
    ) as process:  # fmt: skip
        try:
            assert process.stdout is not None and process.stdout.readline().strip() == "held"
            yield
        finally:
            process.kill()


def test_a_run_launched_from_dagster_refuses_to_load_beside_a_crmi_command(
    demo_project: Path, core_url: str
) -> None:
    """The migration job run as the UI runs it (no `crmi`, no lock of its own) while `crmi rollback` holds the
    core: its first step fails naming the holder, nothing is loaded and no load run is left behind; once the
    command ended the same job runs."""
    engine = make_engine(core_url)
    ensure_schema(engine)
    before = content(engine)
    with held_by_another_process(core_url):
        result = execute(demo_project, core_url)
    dispose_engines()
    assert not result.success
    failures = [
        e.step_failure_data.user_failure_data.description or ""
        for e in result.all_events
        if e.is_step_failure and e.step_failure_data.user_failure_data is not None
    ]
    assert failures and all(
        "another command holds this core (crmi rollback on the consultant's laptop (pid 4242)" in message
        and "launch this run again when it ends" in message
        for message in failures
    ), failures
    assert content(engine) == before
    with engine.connect() as connection:
        assert connection.scalar(sa.select(sa.func.count()).select_from(LoadRun)) == 0
    run_job(demo_project, core_url)
    dispose_engines()
    engine.dispose()


def test_the_lock_probe_names_another_holder_and_not_this_process(core_url: str) -> None:
    """A step asks who holds the core: another process's command is named; the lock this very process holds
    (the steps of its own `crmi run`) is no other holder; a free core has none."""
    engine = make_engine(core_url)
    ensure_schema(engine)
    assert core_lock_holder(engine) is None
    with held_by_another_process(core_url):
        assert "crmi rollback on the consultant's laptop (pid 4242)" in (core_lock_holder(engine) or "")
    assert core_lock_holder(engine) is None  # the holder ended: its lock went with it
    with core_run_lock(engine, "crmi run here"):
        assert core_lock_holder(engine) is None
        other = make_engine(core_url)  # the same core reached through another engine of this process
        assert core_lock_holder(other) is None
        other.dispose()
    engine.dispose()


HOLD_THE_FILE = (
    "import fcntl, sys; lock = open(sys.argv[1], 'a+'); fcntl.flock(lock, fcntl.LOCK_EX); "
    "print('held', flush=True); sys.stdin.read()"
)


def test_a_lock_file_held_by_another_program_names_that_program(tmp_path: Path) -> None:
    """A lock file held by a process that wrote nothing into it (a backup script's `flock`, a copy tool) was
    "held by a process that has just started" for as long as it held it: the kernel's lock table names it."""
    if not Path("/proc/locks").exists():
        pytest.skip("no /proc/locks on this system: the holder cannot be named")
    url = f"sqlite:///{tmp_path / 'core.sqlite'}"
    engine = make_engine(url)
    ensure_schema(engine)
    lock_file = tmp_path / "core.sqlite.run-lock"
    backup = tmp_path / "nightly-backup.py"
    backup.write_text(HOLD_THE_FILE, encoding="utf-8")
    with subprocess.Popen(
        [sys.executable, str(backup), str(lock_file)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True,
    ) as process:  # fmt: skip
        try:
            assert process.stdout is not None and process.stdout.readline().strip() == "held"
            holder = core_lock_holder(engine) or ""
            assert f"pid {process.pid} (" in holder and "nightly-backup" in holder, holder
            assert f"lock file {lock_file}" in holder
            with (
                pytest.raises(CoreBusy, match=f"pid {process.pid} .*nightly-backup"),
                core_run_lock(engine, "run"),
            ):
                pass
        finally:
            process.kill()
    assert core_lock_holder(engine) is None
    engine.dispose()
