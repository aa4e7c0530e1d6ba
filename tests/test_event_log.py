"""crmi's Dagster instance writes its event log through kept connections; the UI's own storage reads it live."""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.events.log import EventLogEntry
from dagster._core.storage.event_log.base import EventLogCursor
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage

from integration.event_log import KeptConnectionsEventLogStorage, keep_event_log_connections


def _entry(run_id: str, n: int) -> EventLogEntry:
    return EventLogEntry(
        error_info=None, level=20, user_message=f"event {n}", run_id=run_id, timestamp=time.time(),
        step_key="raw_erp_u8_customer", job_name="migration", dagster_event=None,
    )  # fmt: skip


def _events_in_file_alone(db: Path, tmp_path: Path) -> int:
    """Count the events of a run's database file copied without its WAL: what a checkpoint wrote to it."""
    alone = tmp_path / "alone.db"
    shutil.copyfile(db, alone)
    with sqlite3.connect(alone) as connection:
        return int(connection.execute("select count(*) from event_logs").fetchone()[0])


def test_crmi_instance_keeps_one_connection_per_file_and_the_ui_sees_every_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from integration.cli import _instance

    home = tmp_path / "dagster_home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    run_id = "0b1c2d3e-0000-4000-8000-000000000001"
    with _instance(ephemeral=False) as instance:
        storage = instance.event_log_storage
        assert isinstance(storage, KeptConnectionsEventLogStorage)
        for n in range(3):
            instance.handle_new_event(_entry(run_id, n))
        connections = set()
        for _ in range(2):
            with storage.run_connection(run_id) as conn:
                connections.add(id(conn.connection.dbapi_connection))
        assert len(connections) == 1  # not a new connection per event
        # The UI: another process with Dagster's own storage on the same folder, while the run goes on.
        ui = SqliteEventLogStorage(storage._base_dir)
        assert [e.user_message for e in ui.get_logs_for_run(run_id)] == ["event 0", "event 1", "event 2"]
        # Its watcher (watchdog on the run's database file) is told of each new event as it is written.
        seen: list[str | None] = []
        all_seen = threading.Event()

        def shown(entry: EventLogEntry, _cursor: str) -> None:
            seen.append(entry.user_message)
            if len(seen) == 2:
                all_seen.set()

        ui.watch(run_id, str(EventLogCursor.from_storage_id(3)), shown)
        for n in range(3, 5):
            instance.handle_new_event(_entry(run_id, n))
        assert all_seen.wait(timeout=30), f"the UI's watcher saw {seen} of the two new events"
        assert seen == ["event 3", "event 4"]
        ui.dispose()
        # Reads (the progress bar's, four times a second) leave the file alone; a write touches it.
        db = Path(storage.path_for_shard(run_id))
        os.utime(db, ns=(0, 0))
        assert [e.user_message for e in storage.get_logs_for_run(run_id)][-1] == "event 4"
        assert db.stat().st_mtime_ns == 0
        instance.handle_new_event(_entry(run_id, 5))
        assert db.stat().st_mtime_ns > 0
        # A commit does not wait for the disk (WAL mode keeps the file consistent; a power cut loses the last events).
        with storage.run_connection(run_id) as conn:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        db = Path(storage.path_for_shard(run_id))
    assert not Path(f"{db}-wal").exists()  # closed as Dagster closes: checkpointed, WAL deleted
    assert _events_in_file_alone(db, tmp_path) == 6  # every event checkpointed into the file when closed
    with dg.DagsterInstance.get() as again:  # the next process (or `dagster dev`) reads the run
        assert len(again.all_logs(run_id)) == 6


def test_other_event_log_storages_are_left_alone() -> None:
    with dg.DagsterInstance.ephemeral() as instance:
        before = type(instance.event_log_storage)
        assert not keep_event_log_connections(instance)
        assert type(instance.event_log_storage) is before


def test_events_written_after_dispose_leave_no_open_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run interrupted on the terminal: its worker thread still writes events after the instance is disposed."""
    from integration.cli import _instance

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    run_id = "0b1c2d3e-0000-4000-8000-000000000002"
    with _instance(ephemeral=False) as instance:
        instance.handle_new_event(_entry(run_id, 0))
    instance.handle_new_event(_entry(run_id, 1))  # after dispose
    db = Path(instance.event_log_storage.path_for_shard(run_id))
    assert not Path(f"{db}-wal").exists()  # closed after the event: nothing left for the process exit
    assert _events_in_file_alone(db, tmp_path) == 2
