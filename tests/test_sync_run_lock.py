"""A sync and a migration never write into one core at once: the core's run lock, from both sides.

While a `crmi` command (run, rollback…) holds the core, a sync refuses naming it (`crmi sync run` exits 1, the
Dagster step asks to be retried later, and fails only once its wait is over) and the sync schedules and the outbox
sensor skip their tick naming it; while a sync runs,
`crmi run`, rollback and migration steps launched from Dagster refuse naming the sync. Syncs share the core with
each other. The holder is another process (or another connection), as a command in another terminal is.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from crm_core.db import make_engine
from crm_core.models import LoadRun
from crm_core.runs import CoreBusy, core_lock_holder, core_run_lock, core_sync_lock, lock_holder
from integration.assets.resources import dispose_engines
from integration.assets.sync import BUSY_RETRY_ENV, BUSY_WAIT_ENV
from integration.cli import app
from integration.jobs import build_definitions
from integration.pipeline import Migration, core_engine
from integration.sync import engine as sync_engine
from integration.sync.engine import BusyWait, run_sync
from tests.test_run_lock_steps import REPO, held_by_another_process
from tests.test_runs import content

COMMAND = "crmi rollback on the consultant's laptop (pid 4242)"  # what held_by_another_process holds
SYNC = "Dagster run 0c0ffee0 u8 inbound on dagster-host (pid 4343)"  # <= 63 characters


def sync_in_another_process(url: str) -> AbstractContextManager[None]:
    """Hold the core's run lock as a sync does, in another process (a sync running on the Dagster host)."""
    return held_by_another_process(url, "core_sync_lock", SYNC)


@pytest.fixture
def core(core_url: str) -> Iterator[sa.Engine]:
    """The core (schema made) the test's URL names."""
    engine = core_engine(core_url)
    yield engine
    engine.dispose()
    dispose_engines()


def sync_runs(engine: sa.Engine) -> list[str]:
    with engine.connect() as connection:
        return list(connection.scalars(sa.select(LoadRun.run_key).where(LoadRun.mode == "sync")))


def failure_descriptions(result: Any) -> list[str]:
    return [
        e.step_failure_data.user_failure_data.description or ""
        for e in result.all_events
        if e.is_step_failure and e.step_failure_data.user_failure_data is not None
    ]


def tick(defs: dg.Definitions, name: str, instance: dg.DagsterInstance) -> Any:
    """Evaluate a schedule once, as the daemon does at its cron time."""
    return defs.resolve_schedule_def(name).evaluate_tick(dg.build_schedule_context(instance=instance))


def test_while_a_command_holds_the_core_a_sync_refuses_and_its_schedules_skip_naming_it(
    demo_project: Path, core: sa.Engine, core_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`crmi rollback` in another terminal holds the core: run_sync, the Dagster sync step told not to wait
    (``CRMI_CORE_BUSY_WAIT_SECONDS=0``) and `crmi sync run` refuse with one line naming it and saying what to do,
    start no sync run; the schedules and the outbox sensor skip their tick naming it. Once the command ended the
    schedule launches its run again."""
    monkeypatch.setenv("U8_APP_SECRET", "not-needed-refused-first")
    monkeypatch.setenv(BUSY_WAIT_ENV, "0")
    defs = build_definitions(demo_project, core_url)
    runner = CliRunner()
    with held_by_another_process(core_url), dg.instance_for_test() as instance:
        with pytest.raises(CoreBusy) as refused:
            run_sync(Migration.load(str(demo_project)), core, "u8", "inbound")
        assert str(refused.value).startswith(f"another command holds this core ({COMMAND}")
        assert str(refused.value).endswith(
            "no sync while it loads or rolls back the core; run it again when it has ended"
        )

        result = defs.resolve_job_def("sync_u8_inbound_job").execute_in_process(
            instance=instance, raise_on_error=False
        )
        assert not result.success
        [failure] = failure_descriptions(result)
        assert f"another command holds this core ({COMMAND}" in failure and "run it again when" in failure

        cli = runner.invoke(app, ["sync", "run", "--target", "u8", "--direction", "inbound", "--project",
                                  str(demo_project), "--core-url", core_url])  # fmt: skip
        assert cli.exit_code == 1, cli.output
        [line] = [line for line in cli.output.splitlines() if line.strip()]
        assert line.startswith(f"sync refused: another command holds this core ({COMMAND}"), line

        # the checks too: a sync skipped meanwhile is not stale, and a core halfway through a load says nothing
        for name in ("sync_u8_inbound_schedule", "sync_u8_outbound_schedule", "sync_u8_checks_schedule"):
            data = tick(defs, name, instance)
            assert not data.run_requests, name
            assert f"another command holds this core ({COMMAND}" in (data.skip_message or ""), name
            assert "the next tick runs it when it has ended" in (data.skip_message or "")
        sensed = defs.resolve_sensor_def("sync_u8_outbox").evaluate_tick(
            dg.build_sensor_context(instance=instance)
        )
        assert not sensed.run_requests and COMMAND in (sensed.skip_message or "")
    assert sync_runs(core) == []  # refused before any sync run started
    with dg.instance_for_test() as instance:
        assert len(tick(defs, "sync_u8_inbound_schedule", instance).run_requests) == 1
        assert len(tick(defs, "sync_u8_checks_schedule", instance).run_requests) == 1


def sync_u8_inbound_job(project: str, url: str) -> dg.JobDefinition:
    """The inbound job of a project and core, as a function: what ``dg.execute_job`` reconstructs."""
    return build_definitions(Path(project), url).resolve_job_def("sync_u8_inbound_job")


def retries_of(result: Any) -> list[dg.DagsterEvent]:
    """The run's STEP_UP_FOR_RETRY events: a step that asked to be run again later."""
    return [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY]


def log_lines(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """What the run's steps logged (``context.log``), in order."""
    return [e.user_message for e in instance.all_logs(run_id) if e.dagster_event is None]


def test_a_dagster_sync_step_waits_while_a_command_holds_the_core_and_then_runs(
    demo_project: Path, core: sa.Engine, core_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sync job launched from the UI (or a sensor, or a schedule tick that raced) while `crmi rollback` holds
    the core: its step does not fail, it asks Dagster to run it again later (STEP_UP_FOR_RETRY) naming the holder,
    having written nothing; the attempt after the command ended syncs, and the run succeeds."""
    monkeypatch.setenv("U8_APP_SECRET", "not-needed-inbound-reads-the-u8-database")
    monkeypatch.setenv(BUSY_WAIT_ENV, "120")
    monkeypatch.setenv(BUSY_RETRY_ENV, "0.05")
    job = build_definitions(demo_project, core_url).resolve_job_def("sync_u8_inbound_job")
    before = content(core)
    run_id = str(uuid.uuid4())
    holding = ExitStack()
    holding.enter_context(held_by_another_process(core_url))
    seen: dict[str, Any] = {}
    ended = threading.Event()

    def release_after_the_first_retry(instance: dg.DagsterInstance) -> None:
        """What the command's user does: end it, here once the step has asked for its retry."""
        deadline = time.monotonic() + 120
        try:
            while not ended.wait(0.02) and time.monotonic() < deadline:
                if instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_UP_FOR_RETRY):
                    # what the refused attempt left in the core
                    seen.update(runs=sync_runs(core), unchanged=content(core) == before)
                    return
        finally:
            holding.close()

    with dg.instance_for_test() as instance:
        watcher = threading.Thread(target=release_after_the_first_retry, args=(instance,))
        watcher.start()
        try:
            result = job.execute_in_process(instance=instance, run_id=run_id, raise_on_error=False)
        finally:
            ended.set()
            watcher.join()
            holding.close()
        lines = log_lines(instance, run_id)
    assert seen == {"runs": [], "unchanged": True}  # the attempt that found the core busy wrote nothing
    assert result.success, failure_descriptions(result)
    assert retries_of(result)  # waited, never failed
    assert not failure_descriptions(result)
    waited = [line for line in lines if "another command holds this core" in line]
    assert waited and all(f"({COMMAND}" in line and "this step tries again every" in line for line in waited)
    [materialization] = result.asset_materializations_for_node("sync_u8_inbound")
    [run_key] = sync_runs(core)
    assert materialization.metadata["load_run"].value == run_key and run_key.startswith("sync-u8-inbound-")


def test_a_dagster_sync_step_fails_naming_the_holder_once_its_wait_is_over(
    demo_project: Path, core: sa.Engine, core_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command holds the core for longer than the step waits (``CRMI_CORE_BUSY_WAIT_SECONDS``): the step asks
    for each retry naming the holder, then fails with the busy error and how long it waited; no sync run is left.
    A run whose executor retries no step fails at once with the busy error."""
    monkeypatch.setenv(BUSY_WAIT_ENV, "0.3")
    monkeypatch.setenv(BUSY_RETRY_ENV, "0.1")
    job = build_definitions(demo_project, core_url).resolve_job_def("sync_u8_inbound_job")
    with held_by_another_process(core_url), dg.instance_for_test() as instance:
        result = job.execute_in_process(instance=instance, raise_on_error=False)
        lines = log_lines(instance, result.run_id)
        # execute_in_process always retries: the job as the daemon launches it, its executor told not to
        rebuilt = dg.build_reconstructable_job(
            __name__,
            sync_u8_inbound_job.__name__,
            reconstructable_kwargs={"project": str(demo_project), "url": core_url},
        )
        # a SQLite core's jobs run in process; a PostgreSQL core's executor is told to, here
        no_retries: dict[str, Any] = {"retries": {"disabled": {}}}
        executor = no_retries if core_url.startswith("sqlite") else {"in_process": no_retries}
        unretried = dg.execute_job(rebuilt, instance, run_config={"execution": {"config": executor}})
    assert not result.success
    retries = retries_of(result)
    assert len(retries) == 3  # 0.3 s in retries every 0.1 s
    for retry in retries:
        error = retry.step_retry_data.error
        assert error is not None and error.cause is not None and f"({COMMAND}" in error.cause.message
    assert sum("this step tries again every" in line and f"({COMMAND}" in line for line in lines) == 3
    [failure] = failure_descriptions(result)
    assert failure.startswith(f"another command holds this core ({COMMAND}"), failure
    assert "run it again when it has ended" in failure and "gave up after 3 retries" in failure, failure
    assert not retries_of(unretried)
    [at_once] = failure_descriptions(unretried)
    assert at_once.startswith(f"another command holds this core ({COMMAND}"), at_once
    assert at_once.endswith("run it again when it has ended"), at_once
    assert sync_runs(core) == []
    assert not result.asset_materializations_for_node("sync_u8_inbound")


def test_while_a_sync_runs_crmi_run_rollback_and_migration_steps_refuse_naming_it(
    core: sa.Engine, core_url: str, demo_project: Path
) -> None:
    """A sync on the Dagster host holds the core: a `crmi run` (core_run_lock), `crmi rollback` and the probe of
    a migration step launched from Dagster refuse naming it. Another sync shares the core, and the sync schedules
    do not skip for a sync."""
    defs = build_definitions(demo_project, core_url)
    with sync_in_another_process(core_url):
        with pytest.raises(CoreBusy, match=re.escape(f"another command holds this core ({SYNC}")):  # noqa: SIM117
            with core_run_lock(core, lock_holder("crmi run")):
                pytest.fail("crmi run took the core beside a sync")
        assert SYNC in (core_lock_holder(core) or "")  # what a migration step launched from Dagster asks
        assert core_lock_holder(core, syncs=False) is None  # what a sync's schedule asks
        rollback = CliRunner().invoke(app, ["rollback", "some-run", "--core-url", core_url])
        assert rollback.exit_code == 1 and f"another command holds this core ({SYNC}" in rollback.output
        with core_sync_lock(core, "sync of another target"):  # syncs share the core
            pass
        with dg.instance_for_test() as instance:
            assert len(tick(defs, "sync_u8_inbound_schedule", instance).run_requests) == 1
    assert core_lock_holder(core) is None  # the sync ended: its lock went with it
    with core_run_lock(core, "crmi run here"):
        pass


class Stop(Exception):
    """Ends a sync where the test has seen what it needed."""


def test_run_sync_holds_the_core_from_its_start_and_lets_go_at_its_end(
    core: sa.Engine, core_url: str, demo_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside run_sync (where it claims its run) a `crmi run` on another connection is refused naming the sync;
    when the sync has ended, failed here, the core is free again."""
    seen: list[str] = []

    def claim(*args: Any) -> None:
        other = make_engine(core_url)
        try:
            with core_run_lock(other, "crmi run here"):
                seen.append("taken")
        except CoreBusy as exc:
            seen.append(str(exc))
        finally:
            other.dispose()
        raise Stop

    monkeypatch.setattr(sync_engine, "_claim", claim)
    with pytest.raises(Stop):
        run_sync(Migration.load(str(demo_project)), core, "u8", "inbound", by="crmi sync run")
    [refusal] = seen
    assert f"crmi sync run u8 inbound on {socket.gethostname()}"[:40] in refusal, refusal
    assert f"(pid {os.getpid()})" in refusal
    with core_run_lock(core, "crmi run after the sync"):
        pass


def test_a_sync_inside_the_process_that_holds_the_core_passes(
    core: sa.Engine, demo_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sync run by the process whose command holds the core (its own steps, a notebook under `crmi run`) is
    part of that command: it neither waits for nor refuses itself."""
    reached: list[bool] = []

    def claim(*args: Any) -> None:
        reached.append(True)
        raise Stop

    monkeypatch.setattr(sync_engine, "_claim", claim)
    with core_run_lock(core, "crmi run here"):
        with core_sync_lock(core, "a sync inside it"):
            assert core_lock_holder(core) is None
        with pytest.raises(Stop):
            run_sync(Migration.load(str(demo_project)), core, "u8", "inbound")
    assert reached == [True]


def test_a_killed_syncs_mark_is_no_holder(sqlite_core_url: str) -> None:
    """SQLite: a sync killed while it held the core leaves its mark beside the lock file; the lock went with
    the process, and its mark names no one (it is removed when found)."""
    engine = core_engine(sqlite_core_url)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = Path(f"{engine.url.database}.run-lock")
    lock.touch()
    mark = lock.with_name(f"{lock.name}.sync-{dead.pid}-deadbeef")
    mark.write_text("sync u8 inbound on a crashed worker (pid 1)\n", encoding="utf-8")
    assert core_lock_holder(engine) is None
    assert not mark.exists()
    with core_run_lock(engine, "crmi run here"):
        pass
    engine.dispose()


def test_a_migration_launched_from_dagster_refuses_to_load_beside_a_sync(
    demo_project: Path, core: sa.Engine, core_url: str
) -> None:
    """The migration job run as the UI runs it (no `crmi`, no lock of its own) while a sync runs: its steps fail
    naming the sync and nothing is loaded."""
    from tests.test_end_to_end import execute

    with sync_in_another_process(core_url):
        result = execute(demo_project, core_url)
    dispose_engines()
    assert not result.success
    failures = failure_descriptions(result)
    assert failures and all(f"another command holds this core ({SYNC}" in m for m in failures), failures
    with core.connect() as connection:
        assert connection.scalar(sa.select(sa.func.count()).select_from(LoadRun)) == 0


def test_a_sync_refuses_while_a_migration_launched_from_dagster_is_loading(
    core: sa.Engine, core_url: str, demo_project: Path
) -> None:
    """A migration run launched from the Dagster UI holds no lock between its steps; its load run, running in a
    live process on this host, is what a sync and its schedule see: refused and skipped naming it. Once its
    process has gone (crashed: `crmi runs recover` settles it) it stops no sync."""
    defs = build_definitions(demo_project, core_url)
    with subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    ) as worker:
        with core.begin() as connection:
            connection.execute(sa.insert(LoadRun).values(
                run_key="0c0ffee0-migration", project="demo", mode="full", status="running", stats={},
                host=socket.gethostname(), pid=worker.pid,
            ))  # fmt: skip
        loading = (
            f"run 0c0ffee0-migration (full) is loading into this core (process {worker.pid} on this host)"
        )
        with pytest.raises(CoreBusy, match=rf"^{re.escape(loading)}: no sync while it loads"):
            run_sync(Migration.load(str(demo_project)), core, "u8", "inbound")
        with dg.instance_for_test() as instance:
            data = tick(defs, "sync_u8_inbound_schedule", instance)
        assert not data.run_requests and loading in (data.skip_message or "")
        worker.kill()  # its process gone: a crashed run, which `crmi runs recover` settles
    with dg.instance_for_test() as instance:
        assert len(tick(defs, "sync_u8_inbound_schedule", instance).run_requests) == 1


def test_a_shared_hold_takes_no_connection_from_the_cores_pool(core_url: str, core: sa.Engine) -> None:
    """A steward's decision (or a sync) holds the lock while its own session writes. Were the lock's session
    taken from the engine's pool, as many decisions at once as the pool holds would each wait for a second
    connection until the pool's timeout: here the pool's only connection is the writer's, and the lock is still
    taken, seen and let go."""
    engine = make_engine(core_url, pool_size=1, max_overflow=0, pool_timeout=2)
    try:
        # the request's session holds the pool's only connection
        with engine.connect() as writer, core_sync_lock(engine, "steward wang (workbench) on host-1 (pid 9)"):
            assert writer.scalar(sa.text("SELECT 1")) == 1
            with (
                pytest.raises(CoreBusy, match=r"steward wang \(workbench\)"),
                core_run_lock(core, "crmi run"),
            ):
                pass
        with core_run_lock(core, "crmi run on host-2 (pid 10)"):  # let go
            pass
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- crmi … --wait


@contextmanager
def crmi_in_another_process(*args: str) -> Iterator[tuple[subprocess.Popen[str], queue.Queue[str | None]]]:
    """Start ``crmi ARGS`` in a process of its own, as cron does; its stderr comes line by line into the queue
    (None once it has closed). Killed on the way out if it still runs."""
    process = subprocess.Popen(
        # Ctrl-C raises KeyboardInterrupt as in a terminal, even when pytest was started where SIGINT is ignored
        # (a background job of a script), which its children would otherwise inherit.
        [sys.executable, "-c", "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
         "from integration.cli import main; main()", *args],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield process, lines
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        reader.join(timeout=30)
        assert process.stdout is not None and process.stderr is not None
        process.stdout.close()
        process.stderr.close()


def line_starting(lines: queue.Queue[str | None], start: str) -> str:
    """The first line of the queue that starts with ``start`` (the process has 120 s to print it)."""
    seen = []
    while (line := lines.get(timeout=120)) is not None:
        if line.startswith(start):
            return line
        seen.append(line)
    pytest.fail(f"no line starting with {start!r}; it printed: {seen}")


def rest_of(lines: queue.Queue[str | None]) -> list[str]:
    """The lines left in the queue, up to its end (once the process has ended)."""
    found = []
    while (line := lines.get(timeout=120)) is not None:
        found.append(line)
    return found


def sync_run_args(project: Path, url: str, *more: str) -> list[str]:
    return ["sync", "run", "--target", "u8", "--direction", "inbound", "--project", str(project),
            "--core-url", url, *more]  # fmt: skip


def test_crmi_sync_run_told_to_wait_syncs_once_the_command_holding_the_core_has_ended(
    demo_project: Path, core: sa.Engine, core_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cron's `crmi sync run --wait 600` while `crmi rollback` holds the core: it says once what holds the core
    and how long it waits, writes nothing meanwhile, and syncs as soon as the command has ended."""
    monkeypatch.setenv("U8_APP_SECRET", "not-needed-inbound-reads-the-u8-database")
    before = content(core)
    with ExitStack() as holding:
        holding.enter_context(held_by_another_process(core_url))
        args = sync_run_args(demo_project, core_url, "--wait", "600")
        with crmi_in_another_process(*args) as (process, lines):
            waiting = line_starting(lines, "waiting:")
            assert waiting.startswith(f"waiting: another command holds this core ({COMMAND}"), waiting
            assert waiting.endswith("`crmi sync run` waits up to 10 min for it to end (--wait)"), waiting
            assert process.poll() is None  # it waits: the command still holds the core
            assert sync_runs(core) == [] and content(core) == before
            holding.close()  # the command has ended
            assert process.wait(timeout=120) == 0, rest_of(lines)
            after = rest_of(lines)
    assert not [line for line in after if "waiting" in line or "refused" in line], after  # said once
    [run_key] = sync_runs(core)
    assert run_key.startswith("sync-u8-inbound-")


def test_crmi_sync_run_told_to_wait_too_short_is_refused_naming_the_holder(
    demo_project: Path, core: sa.Engine, core_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command holds the core for longer than `crmi sync run --wait` waits: refused (exit 1) with one line
    naming the holder, what to do and how long it waited, after the line saying it waits; nothing written."""
    monkeypatch.setenv("U8_APP_SECRET", "not-needed-refused-first")
    before = content(core)
    with held_by_another_process(core_url):
        cli = CliRunner().invoke(app, sync_run_args(demo_project, core_url, "--wait", "0.3"))
    assert cli.exit_code == 1, cli.output
    [waiting, refused] = [line for line in cli.output.splitlines() if line.strip()]
    assert waiting.startswith(f"waiting: another command holds this core ({COMMAND}"), waiting
    assert "waits up to 0.3 s" in waiting, waiting
    assert refused.startswith(f"sync refused: another command holds this core ({COMMAND}"), refused
    assert refused.endswith(
        "no sync while it loads or rolls back the core; run it again when it has ended; waited 0.3 s (--wait)"
    ), refused
    assert sync_runs(core) == [] and content(core) == before


def test_ctrl_c_while_crmi_sync_run_waits_for_the_core_ends_it_having_written_nothing(
    demo_project: Path, core: sa.Engine, core_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while `crmi sync run --wait` waits: it ends at once (exit 130) with one line, no traceback, and
    nothing written."""
    monkeypatch.setenv("U8_APP_SECRET", "not-needed-stopped-first")
    before = content(core)
    with (
        held_by_another_process(core_url),
        crmi_in_another_process(*sync_run_args(demo_project, core_url, "--wait", "600")) as (process, lines),
    ):
        line_starting(lines, "waiting:")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 130
        after = rest_of(lines)
    assert len(after) == 1, after
    [stopped] = after
    assert stopped.startswith(f"stopped waiting (another command holds this core ({COMMAND}"), stopped
    assert stopped.endswith("): no sync, nothing written"), stopped
    assert sync_runs(core) == [] and content(core) == before


def test_a_wait_looks_again_soon_then_ever_more_seldom_until_it_is_spent() -> None:
    """A command told to --wait looks again after 0.1 s, doubling the pause up to ``every``; none at all
    without a wait."""
    assert list(BusyWait(0, 5).pauses()) == []
    pauses = BusyWait(3600, 5).pauses()
    assert [next(pauses) for _ in range(8)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5, 5]


class InterruptedRightAfterTheFirstLine:
    """A stderr on which Ctrl-C arrives right after the first line has been written (before the writer returns)."""

    def __init__(self) -> None:
        self.written: list[str] = []

    def write(self, text: str) -> int:
        self.written.append(text)
        if len(self.written) == 1:
            raise KeyboardInterrupt
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def test_a_ctrl_c_right_after_the_waiting_line_is_written_does_not_print_that_line_again(
    core: sa.Engine, core_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C arriving as the waiting line shows (rich has written it but not yet emptied its buffer) ends the wait,
    and the "stopped waiting" line that follows comes alone: the waiting line is not written a second time."""
    from integration.cli import _waiting_hold, errors

    stream = InterruptedRightAfterTheFirstLine()
    monkeypatch.setattr(sys, "stderr", stream)
    with (
        held_by_another_process(core_url),
        pytest.raises(sync_engine.StoppedWaiting) as stopped,
        _waiting_hold(600, "crmi sync run")(core, "crmi sync run u8 inbound"),
    ):
        pytest.fail("the core was held by another process")
    errors.print(str(stopped.value), highlight=False)  # what `crmi sync run` prints next
    text = "".join(stream.written)
    assert text.count("waiting: another command holds this core") == 1, text
    assert text.rstrip("\n").endswith("no sync, nothing written"), text
