"""Dagster's SQLite event log, writing through one kept connection per database file.

Dagster's ``SqliteEventLogStorage`` creates an engine, opens a connection, compiles the INSERT, commits and
closes for every event (a run of the migration job stores some 400; an asset event is written twice, to the
run's file and to ``index.db``). Closing the last connection to a WAL database checkpoints it and deletes
the WAL file, so each event paid a connect, a compilation, two syncs and a file deletion: about 2.4 s of wall
time and 1 s of CPU for 400 events on the benchmark machine, a third of a re-run with nothing changed.

:class:`KeptConnectionsEventLogStorage` writes the same files with the same statements, through one connection
per file kept until the instance is disposed, with ``synchronous=NORMAL``: in WAL mode a commit then writes the
WAL without waiting for the disk; the file stays consistent whatever happens, and a power cut (not a crash of
the process) can lose only the last events. The Dagster UI (``dagster dev`` on the same ``DAGSTER_HOME``, a
process with Dagster's own storage) reads committed events from the WAL, but learns of them by watching the
run's database file for changes: after each transaction the file's modification time is set, which is what
closing the connection's checkpoint did, without its three disk syncs (about 1 s of a 5 s re-run with nothing
changed at 100,000 rows; the WAL is checkpointed by SQLite every 1,000 pages and when the instance is disposed).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
from dagster._core.storage.sql import create_engine
from dagster._core.storage.sqlite import SQLITE_BUSY_TIMEOUT_SECONDS

# What the kept connections rely on in Dagster's class; a release without them keeps Dagster's own.
_RELIED_ON = (
    "_connect",
    "_db_lock",
    "_initialized_dbs",
    "_initdb",
    "conn_string_for_shard",
    "path_for_shard",
    "wipe",
    "dispose",
)


def _commit_without_waiting_for_disk(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.execute("PRAGMA synchronous=NORMAL")


class KeptConnectionsEventLogStorage(SqliteEventLogStorage):
    """``SqliteEventLogStorage`` with one connection per database file, kept until :meth:`dispose`."""

    def _kept_engines(self) -> dict[str, sa.Engine]:
        engines: dict[str, sa.Engine] | None = self.__dict__.get("_kept")
        if engines is None:
            engines = self.__dict__["_kept"] = {}
        return engines

    @contextlib.contextmanager
    def _connect(self, shard: str) -> Iterator[sa.Connection]:
        if self.__dict__.get("_disposed"):
            # A thread still writing after dispose (a run interrupted on the terminal): Dagster's own
            # connection per use, closed after it, not a kept one nothing would close (its WAL left behind).
            with super()._connect(shard) as conn:
                yield conn
            return
        with self._db_lock:  # as Dagster's: one user of the storage's connections at a time
            engines = self._kept_engines()
            engine = engines.get(shard)
            if engine is None:
                engine = create_engine(
                    self.conn_string_for_shard(shard),
                    poolclass=sa.pool.StaticPool,  # one connection, used under the lock by any thread
                    connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS, "check_same_thread": False},
                )
                sa.event.listen(engine, "connect", _commit_without_waiting_for_disk)
                if shard not in self._initialized_dbs:
                    self._initdb(engine)
                    self._initialized_dbs.add(shard)
                engines[shard] = engine
            with engine.connect() as conn:
                written_before = conn.connection.dbapi_connection.total_changes  # type: ignore[union-attr]
                with conn.begin():
                    yield conn
                wrote = conn.connection.dbapi_connection.total_changes != written_before  # type: ignore[union-attr]
            # What closing the connection did for the UI's watcher: the database file changes (after a write
            # only: the progress bar reads the log four times a second, which must not wake the UI).
            if wrote:
                with contextlib.suppress(OSError):
                    os.utime(self.path_for_shard(shard))

    def _close_kept(self) -> None:
        with self._db_lock:
            engines = self._kept_engines()
            for engine in engines.values():
                engine.dispose()  # the last connection: checkpoints and deletes the WAL file
            engines.clear()

    def wipe(self) -> None:
        """Delete every run's events (the files go, so their connections close first)."""
        self._close_kept()
        super().wipe()

    def dispose(self) -> None:
        """Stop watching and close the kept connections; later uses connect as Dagster does."""
        self.__dict__["_disposed"] = True
        super().dispose()
        self._close_kept()


def keep_event_log_connections(instance: Any) -> bool:
    """Make ``instance`` write its events through kept connections if it uses Dagster's SQLite event log.

    Another storage (PostgreSQL, a consolidated or in-memory one) is left alone; so is a Dagster release
    whose SQLite storage no longer has what this relies on. Return whether the storage was switched.
    """
    storage = instance.event_log_storage
    if type(storage) is not SqliteEventLogStorage or not all(hasattr(storage, a) for a in _RELIED_ON):
        return False
    storage.__class__ = KeptConnectionsEventLogStorage  # same object, state and files: only how it connects
    return True
