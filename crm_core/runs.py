"""Load runs after the fact: list them, roll one back, compensate runs that failed or crashed.

A run's journal (``row_changes``) holds the before-image of every row it changed; the rows it created
carry its id in ``created_run_id``. Rolling back replays the journal newest first in one transaction
(changed rows get their old values back, crosswalk entries and watermarks included), then deletes the
rows the run created. A later run that touched the same rows, or whose rows point
at rows this run inserted, depends on it: rollback refuses unless ``cascade`` rolls those back first.
"""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import os
import socket
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import IO, Any

from sqlalchemy import (
    Engine,
    String,
    Table,
    and_,
    bindparam,
    cast,
    create_engine,
    delete,
    func,
    insert,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from crm_core.db import refresh_statistics, session_factory
from crm_core.entities import ENTITIES
from crm_core.errors import RunError
from crm_core.journal import NOT_JOURNALED, from_json
from crm_core.models import Base, ExternalId, LoadRun, ReferenceDecision, RowChange

# A run that ended without a reconciliation: assets materialized on their own (from the Dagster UI) that
# succeeded. Its changes stay; it is never the basis of a skip, and linkage counts its records as changed.
PARTIAL = "partial"
COMMITTED = ("succeeded", "unbalanced", PARTIAL)  # statuses of runs that ended with their changes in the core
ACTIVE = ("running", *COMMITTED)  # statuses whose changes are in the core
RUN_LOCK = 0x63726D6A  # 'crmj': the PostgreSQL advisory lock a `crmi run` holds while it runs (db.SCHEMA_LOCK is 'crmi')
# 'crms': what a sync holds (shared) beside its shared hold of RUN_LOCK, so that the probe of a migration step
# tells a running sync from another step's momentary probe (both share RUN_LOCK)
SYNC_LOCK = 0x63726D73


class CoreBusy(RunError):
    """Another ``crmi run``, rollback, recovery, linkage or schema upgrade (on any host) holds the core."""


# The run locks this process holds (see :func:`_lock_identity`): the steps a `crmi run` executes in its own
# process see the lock as theirs, not as another command's.
_HELD_HERE: set[str] = set()


def _lock_identity(engine: Engine) -> str:
    """Name the core a run lock guards: a SQLite file's lock file, else the URL without its password."""
    path = _lock_path(engine)
    return str(path.resolve()) if path is not None else engine.url.render_as_string(hide_password=True)


def _session_holder(connection: Any) -> str:
    """Describe the PostgreSQL session holding the run lock (its transaction is left rolled back)."""
    held_by = connection.scalar(_holder_query(), {"key": RUN_LOCK})
    connection.rollback()
    return str(held_by or "a session that has just ended")


def _file_holder(lock: Any, path: Path) -> str:
    """Describe the holder a SQLite core's lock file names (the holder writes itself in on taking it), or the
    syncs that share it (each names itself in a file of its own beside it)."""
    lock.seek(0)
    held_by = lock.read().strip() or "; ".join(_sync_holders(path)) or _unnamed_holder(path)
    return f"{held_by or 'a process that has just started'}; lock file {path}"


UNNAMED_COMMAND_WIDTH = 160  # of an unnamed holder's command line, in a refusal


def _unnamed_holder(path: Path) -> str:
    """Name the process that holds ``path`` flocked without writing itself in (another program, a shell's
    ``flock``, or one of ours in the instant before it writes), from the kernel's ``/proc/locks``; "" where
    that cannot tell (no /proc, the holder in another PID namespace)."""
    try:
        status = path.stat()
        held = Path("/proc/locks").read_text(encoding="ascii").splitlines()
    except OSError:
        return ""
    # "1: FLOCK  ADVISORY  WRITE 3792 fe:00:1474572 0 EOF": pid, then major:minor (hex) and inode of the file
    wanted = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}"
    pids = sorted({fields[4] for fields in map(str.split, held) if len(fields) > 5 and fields[5] == wanted})
    named = []
    for pid in pids:
        if not pid.isdigit() or int(pid) in (0, os.getpid()):
            continue
        try:
            command = " ".join(
                Path(f"/proc/{pid}/cmdline")
                .read_bytes()
                .replace(b"\0", b" ")
                .decode(errors="replace")
                .split()
            )
        except OSError:  # it has just let go
            continue
        named.append(f"pid {pid} ({command[:UNNAMED_COMMAND_WIDTH] or 'no command line'})")
    return "; ".join(named)


def _sync_holders(path: Path) -> list[str]:
    """Describe the syncs holding a SQLite core's lock file shared: ``<lock file>.sync-<pid>-<token>`` files
    of live processes (one a sync that was killed left behind is removed)."""
    found = []
    for mark in sorted(path.parent.glob(f"{path.name}.sync-*")):
        pid = mark.name.removeprefix(f"{path.name}.sync-").split("-", 1)[0]
        if pid.isdigit() and _alive(int(pid)):
            try:
                found.append(mark.read_text(encoding="utf-8").strip() or f"a sync (pid {pid})")
            except FileNotFoundError:  # it has just ended
                continue
        else:
            mark.unlink(missing_ok=True)
    return found


def _holder_query() -> Any:
    # another role sees only the holder's application_name: its address and start are null
    return text(
        "SELECT a.application_name || coalesce(' from ' || host(a.client_addr), '') "
        "|| ', server process ' || a.pid "
        "|| coalesce(' since ' || to_char(a.backend_start, 'YYYY-MM-DD HH24:MI:SS'), '') FROM pg_locks l "
        "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
        "AND l.classid = 0 AND l.objid = :key AND l.database = "
        "(SELECT oid FROM pg_database WHERE datname = current_database()) "
        # a command's hold before a sync's, a sync's before a step's passing probe (pg_try_advisory_lock_shared)
        "ORDER BY l.mode = 'ExclusiveLock' DESC, EXISTS (SELECT 1 FROM pg_locks s WHERE s.pid = l.pid "
        f"AND s.locktype = 'advisory' AND s.granted AND s.classid = 0 AND s.objid = {SYNC_LOCK}) DESC LIMIT 1"
    )


def core_lock_holder(engine: Engine, *, syncs: bool = True) -> str | None:
    """Return who holds the core's run lock when another process does (a `crmi run`, rollback…), else None.

    What a Dagster run's step asks before it touches the core: a run launched from the UI, a schedule or a
    sensor does not go through ``crmi`` and would otherwise load beside a command that holds the core. It
    probes with a shared lock (steps of runs never exclude each other; the run queue orders those) and lets
    go at once; a lock this process holds (the steps of its own `crmi run`) is no other holder. A sync
    holding it (:func:`core_sync_lock`) is named too, unless ``syncs`` is False: what a sync's schedule asks,
    as syncs share the core with each other.
    """
    if _lock_identity(engine) in _HELD_HERE:
        return None
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            if connection.scalar(text("SELECT pg_try_advisory_lock_shared(:key)"), {"key": RUN_LOCK}):
                connection.execute(text("SELECT pg_advisory_unlock_shared(:key)"), {"key": RUN_LOCK})
                held_by = connection.scalar(_holder_query(), {"key": SYNC_LOCK}) if syncs else None
                connection.commit()
                return None if held_by is None else str(held_by)
            return _session_holder(connection)
    path = _lock_path(engine)
    if path is None or not path.exists():
        return None  # no command ever took it (its file is made by the first holder)
    import fcntl

    with path.open("r", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _file_holder(lock, path)
        fcntl.flock(lock, fcntl.LOCK_UN)
    held = _sync_holders(path) if syncs else []
    return f"{'; '.join(held)}; lock file {path}" if held else None


def _lock_path(engine: Engine) -> Path | None:
    """The SQLite core's lock file, or None where no file lock applies (memory, URIs, no flock)."""
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    try:
        import fcntl  # noqa: F401
    except ImportError:  # no flock (Windows): the same-host check of live runs still applies
        return None
    return Path(f"{database}.run-lock")


@contextmanager
def _held_here(engine: Engine) -> Iterator[None]:
    identity = _lock_identity(engine)
    _HELD_HERE.add(identity)
    try:
        yield
    finally:
        _HELD_HERE.discard(identity)


def lock_holder(command: str) -> str:
    """``<command> on HOST (pid N)``, at most 63 characters (PostgreSQL's application_name): a long host name
    is shortened, the pid kept."""
    pid = f" (pid {os.getpid()})"
    return f"{command} on {socket.gethostname()}"[: 63 - len(pid)] + pid


def _name_holding_session(connection: Any, holder: str) -> None:
    """Name the PostgreSQL session that holds the lock after its holder, and keep it alive for the whole hold."""
    connection.execute(text("SELECT set_config('application_name', :name, false)"), {"name": holder[:63]})
    # A holder that vanished without closing its connection (a laptop off the network, out of power) holds
    # the lock until the server notices: probe the client after 30 s of silence, give up after 3 x 10 s
    # more, instead of the system's two hours (TCP connections only; a Unix socket closes with its process).
    for setting, value in (("tcp_keepalives_idle", 30), ("tcp_keepalives_interval", 10),
                           ("tcp_keepalives_count", 3)):  # fmt: skip
        connection.execute(text(f"SET SESSION {setting} = {value}"))
    if (connection.dialect.server_version_info or (0,)) >= (14,):
        # idle for the whole run: a server's (or role's) idle_session_timeout would end it, lock and all
        connection.execute(text("SET SESSION idle_session_timeout = 0"))


@contextmanager
def _flocked(path: Path, *, exclusive: bool) -> Iterator[IO[str]]:
    """Open a SQLite core's lock file and ``flock`` it, alone or shared, without waiting; raise
    :class:`CoreBusy` naming the holder when another process holds it the other way."""
    import fcntl

    with path.open("a+", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CoreBusy(f"another command holds this core ({_file_holder(lock, path)})") from None
        try:
            yield lock
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _since(holder: str) -> str:
    """The line a holder writes into its lock file: who, and since when."""
    return f"{holder} since {dt.datetime.now().isoformat(sep=' ', timespec='seconds')}\n"


@contextmanager
def core_run_lock(engine: Engine, holder: str) -> Iterator[None]:
    """Hold the core's run lock for the block; raise :class:`CoreBusy` naming its holder when another has it.

    PostgreSQL: a session advisory lock on a connection of its own, so a ``crmi run`` on another machine is
    refused too; the holder is the connection's ``application_name``. SQLite: an exclusive ``flock`` on
    ``<database>.run-lock`` beside the file, which holds the holder's description. Either is released when the
    block ends or the process dies (a killed run leaves no stale lock). Other databases: no lock.
    """
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            _name_holding_session(connection, holder)
            if not connection.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": RUN_LOCK}):
                raise CoreBusy(f"another command holds this core ({_session_holder(connection)})")
            connection.commit()
            try:
                with _held_here(engine):
                    yield
            finally:
                try:
                    connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": RUN_LOCK})
                    connection.commit()
                except SQLAlchemyError:  # its session ended during the run (a restart): the lock went with it
                    connection.invalidate()  # the run's own outcome (its exit code) is what the caller sees
        return
    path = _lock_path(engine)
    if path is None:
        yield
        return
    with _flocked(path, exclusive=True) as lock:
        try:
            lock.seek(0)
            lock.truncate()
            lock.write(_since(holder))
            lock.flush()
            with _held_here(engine):
                yield
        finally:
            lock.truncate(0)


_UNPOOLED: weakref.WeakKeyDictionary[Engine, Engine] = weakref.WeakKeyDictionary()


def _unpooled(engine: Engine) -> Engine:
    """An engine on ``engine``'s database whose connections are opened for one hold and closed after it.

    A shared hold lasts as long as its holder's own work, which runs on ``engine``'s pool: a lock session from
    that pool too would make every steward decision need two of its connections, and as many decisions at
    once as the pool holds would wait for each other until its timeout. Nor could the session go back to the
    pool afterwards: it is named after its holder and set up to hold.
    """
    found = _UNPOOLED.get(engine)
    if found is None:
        found = _UNPOOLED[engine] = create_engine(engine.url, poolclass=NullPool)
    return found


@contextmanager
def core_sync_lock(engine: Engine, holder: str) -> Iterator[None]:
    """Hold the core's run lock shared while a sync (or what computes from its data) works on the core.

    Syncs share it with each other (one sync per target is the sync engine's own rule) and with the probes of
    migration steps launched from Dagster, which see a sync as a holder; a ``crmi run``, rollback, recovery,
    linkage or schema upgrade, which take it alone, refuse while a sync holds it, naming the sync (``holder``),
    and the sync refuses with :class:`CoreBusy` naming the command while one of them holds it. Held for one
    sync, not for a Dagster run: a sync step is a whole load run of its own, so between two steps the core
    holds no half of one. A process that holds the lock itself (its own ``crmi run``, a command's
    in-process steps) passes without taking it again: the sync is part of what that process does, and
    taking it a second time from the same process would refuse it (another session, another open file).
    """
    if _lock_identity(engine) in _HELD_HERE:
        yield
        return
    if engine.dialect.name == "postgresql":
        with _unpooled(engine).connect() as connection:
            try:
                _name_holding_session(connection, holder)
                if not connection.scalar(text("SELECT pg_try_advisory_lock_shared(:key)"), {"key": RUN_LOCK}):
                    raise CoreBusy(f"another command holds this core ({_session_holder(connection)})")
                # never waits: every holder of SYNC_LOCK shares it
                connection.execute(text("SELECT pg_advisory_lock_shared(:key)"), {"key": SYNC_LOCK})
                connection.commit()
                yield
            finally:
                try:
                    connection.execute(text("SELECT pg_advisory_unlock_all()"))
                    connection.commit()
                except SQLAlchemyError:  # its session ended during the sync (a restart): the lock went too
                    pass
        return
    path = _lock_path(engine)
    if path is None:
        yield
        return
    with _flocked(path, exclusive=False) as lock:
        mark = path.with_name(f"{path.name}.sync-{os.getpid()}-{os.urandom(4).hex()}")
        try:
            lock.truncate(0)  # what a command killed while it held the file wrote: no one holds it alone now
            mark.write_text(_since(holder), encoding="utf-8")
            yield
        finally:
            mark.unlink(missing_ok=True)


@dataclass(frozen=True)
class RunSummary:
    """One line of ``crmi runs list``."""

    id: int
    run_key: str
    project: str
    mode: str
    status: str
    started_at: dt.datetime
    finished_at: dt.datetime | None
    changes: int
    rows_read: int
    rejected: int

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-friendly dict."""
        return {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in self.__dict__.items()}


def owner() -> tuple[str, int]:
    """Return (host, pid) of the process that owns the current run (a step's parent under multiprocessing)."""
    parent = multiprocessing.parent_process()
    return socket.gethostname(), parent.pid if parent is not None and parent.pid else os.getpid()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def is_crashed(run: LoadRun) -> bool:
    """Return True for a run still marked running whose owning process on this host is gone."""
    return (
        run.status == "running"
        and run.host == socket.gethostname()
        and run.pid is not None
        and not _alive(run.pid)
    )


def live_runs(engine: Engine) -> list[tuple[str, str, int]]:
    """Return (run key, mode, pid) of the runs marked running whose process is alive on this host.

    This process's own are left out (a load it started and abandoned, in a test or a notebook).
    """
    with session_factory(engine)() as session:
        rows = session.execute(
            select(LoadRun.run_key, LoadRun.mode, LoadRun.pid, LoadRun.host).where(
                LoadRun.status == "running"
            )
        ).all()
    here = socket.gethostname()
    return [
        (key, mode, pid)
        for key, mode, pid, host in rows
        if host == here and pid is not None and pid != os.getpid() and _alive(pid)
    ]


def list_runs(engine: Engine) -> list[RunSummary]:
    """Return every load run, newest first, with its journal size and row counts."""
    with session_factory(engine)() as session:
        # What the run changed of rows that existed before it: not the rows it inserted (they carry its id), nor
        # what a sync recorded as exchanged with its target (sync_state, journaled only to be undone with it).
        changed = select(RowChange.load_run_id, func.count()).where(
            RowChange.operation != "insert", RowChange.table_name != "sync_state"
        )
        changes = dict(session.execute(changed.group_by(RowChange.load_run_id)).all())
        summaries = []
        for run in session.scalars(select(LoadRun).order_by(LoadRun.id.desc())):
            # Per entity a list of batch stats; a sync run also keeps its report under "sync" (a dict).
            batches = [
                s
                for entity in (run.stats or {}).values()
                if isinstance(entity, list)
                for s in entity
                if isinstance(s, dict)
            ]
            status = "crashed" if is_crashed(run) else run.status
            summaries.append(RunSummary(
                id=run.id, run_key=run.run_key, project=run.project, mode=run.mode, status=status,
                started_at=run.started_at, finished_at=run.finished_at, changes=changes.get(run.id, 0),
                rows_read=sum(s.get("rows_read", 0) for s in batches),
                rejected=sum(s.get("rejected", 0) for s in batches),
            ))  # fmt: skip
        return summaries


def find_run(session: Session, reference: str) -> LoadRun:
    """Return the run named by its key, a unique key prefix (as shown by ``runs list``) or its number."""
    run = session.scalar(select(LoadRun).where(LoadRun.run_key == reference))
    if run is None and reference.isdigit():
        run = session.get(LoadRun, int(reference))
    if run is None:
        matches = session.scalars(select(LoadRun).where(LoadRun.run_key.startswith(reference))).all()
        if len(matches) > 1:
            raise RunError(f"run '{reference}' is ambiguous: {', '.join(m.run_key for m in matches)}")
        run = matches[0] if matches else None
    if run is None:
        raise RunError(f"no load run '{reference}' in the core; `crmi runs list` shows them")
    return run


def dependents(session: Session, run: LoadRun) -> set[int]:
    """Return the later active runs that changed rows this run touched or point at rows it inserted."""
    later = {
        r
        for (r,) in session.execute(select(LoadRun.id).where(LoadRun.id > run.id, LoadRun.status.in_(ACTIVE)))
    }
    if not later:
        return set()
    mine, theirs = RowChange.__table__.alias("mine"), RowChange.__table__.alias("theirs")
    found = set(
        session.scalars(
            select(theirs.c.load_run_id)
            .distinct()
            .join(mine, and_(mine.c.table_name == theirs.c.table_name, mine.c.row_key == theirs.c.row_key))
            .where(mine.c.load_run_id == run.id, theirs.c.load_run_id.in_(later))
        )
    )
    # Rows this run inserted still carry its id in created_run_id (a rollback deletes them): one join per
    # table finds later journal entries on them, and one per foreign key later rows pointing at them.
    for table in Base.metadata.sorted_tables:
        if "created_run_id" not in table.c:
            continue
        if [c.name for c in table.primary_key.columns] == ["id"]:
            found |= set(
                session.scalars(
                    select(theirs.c.load_run_id)
                    .distinct()
                    .join(
                        table,
                        and_(theirs.c.table_name == table.name, theirs.c.row_key == _created_rows_key(table)),
                    )
                    .where(table.c.created_run_id == run.id, theirs.c.load_run_id.in_(later))
                )
            )
        for fk in table.foreign_keys:
            parent = fk.column.table
            if parent.name == "load_runs" or "created_run_id" not in parent.c:
                continue
            child = table.alias("child")
            rows = session.execute(
                select(child.c.created_run_id, child.c.updated_run_id)
                .distinct()
                .join(parent, child.c[fk.parent.name] == fk.column)
                .where(parent.c.created_run_id == run.id)
            )
            for created, updated in rows:
                found |= {created, updated} & later
    xw = ExternalId.__table__
    decisions = Base.metadata.tables[ReferenceDecision.__tablename__]
    linked = set(
        session.scalars(select(decisions.c.entity).distinct().where(decisions.c.target_id.is_not(None)))
    )
    for entity, definition in ENTITIES.items():
        target = definition.model.__table__
        found |= set(
            session.scalars(
                select(xw.c.created_run_id)
                .distinct()
                .join(target, and_(xw.c.entity == entity, xw.c.entity_id == target.c.id))
                .where(target.c.created_run_id == run.id, xw.c.created_run_id.in_(later))
            )
        )
        if entity not in linked:
            continue
        # A steward's decision linking a held name to a record this run created names it by id, with no
        # foreign key: undone with it, or the name would lead to whatever record takes that id next.
        found |= set(
            session.scalars(
                select(theirs.c.load_run_id)
                .distinct()
                .join(
                    decisions,
                    and_(
                        theirs.c.table_name == decisions.name,
                        theirs.c.row_key == _created_rows_key(decisions),
                    ),
                )
                .join(target, and_(decisions.c.entity == entity, decisions.c.target_id == target.c.id))
                .where(target.c.created_run_id == run.id, theirs.c.load_run_id.in_(later))
            )
        )
    return found


def _replay(session: Session, run: LoadRun) -> None:
    """Undo a run's journal newest first, then delete the rows it created."""
    replay(session, RowChange.load_run_id == run.id)
    # Set-based loads journal no entry per new row: the row's created_run_id says which run made it. The
    # journal's updates are undone first, so nothing older still points at these rows; children go first.
    for table in reversed(Base.metadata.sorted_tables):
        if "created_run_id" in table.c and table.name not in NOT_JOURNALED:
            session.execute(delete(table).where(table.c.created_run_id == run.id))


def _created_rows_key(table: Table) -> Any:
    """The journal's ``row_key`` of a row with an ``id`` primary key, built in SQL ('{"id": 7}')."""
    return literal('{"id": ') + cast(table.c.id, String) + literal("}")


REPLAY_PAGE = 20_000  # journal entries read at a time (keyset pages, newest first)


def replay(session: Session, condition: Any) -> None:
    """Undo the journal entries matching ``condition``, newest first (Core statements: not journaled).

    Consecutive entries of one table and operation are undone with one statement (a DELETE by key list,
    an executemany UPDATE or INSERT), in the same newest-first order, so a row changed twice gets its oldest
    before-image last.
    """
    below: int | None = None
    while True:
        query = select(RowChange.id, RowChange.table_name, RowChange.row_key, RowChange.operation,
                       RowChange.before).where(condition)  # fmt: skip
        if below is not None:
            query = query.where(RowChange.id < below)
        page = session.execute(query.order_by(RowChange.id.desc()).limit(REPLAY_PAGE)).all()
        if not page:
            return
        below = page[-1][0]

        def shape(entry: Any) -> tuple[str, str, tuple[str, ...]]:
            return entry[1], entry[3], tuple(sorted(entry[4])) if entry[4] else ()

        for (table_name, operation, columns), group in groupby(page, key=shape):
            _undo(session, Base.metadata.tables[table_name], operation, columns, list(group))


def _undo(
    session: Session, table: Table, operation: str, columns: tuple[str, ...], entries: list[Any]
) -> None:
    keys = [json.loads(entry[2]) for entry in entries]
    pk = sorted(keys[0])
    if operation == "insert":
        if pk == ["id"]:
            ids = [int(key["id"]) for key in keys]
            for start in range(0, len(ids), 5_000):
                session.execute(delete(table).where(table.c.id.in_(ids[start : start + 5_000])))
        else:
            removal = delete(table).where(and_(*(table.c[n] == bindparam(f"_pk_{n}") for n in pk)))
            session.execute(
                removal, [{f"_pk_{n}": from_json(table.c[n], key[n]) for n in pk} for key in keys]
            )
    elif operation == "update":
        names = [name for name in columns if name in table.c]
        statement = (
            update(table)
            .where(and_(*(table.c[n] == bindparam(f"_pk_{n}") for n in pk)))
            .values({name: bindparam(f"_v_{name}") for name in names})
        )
        session.execute(statement, [
            {**{f"_pk_{n}": from_json(table.c[n], key[n]) for n in pk},
             **{f"_v_{name}": from_json(table.c[name], entry[4][name]) for name in names}}
            for key, entry in zip(keys, entries, strict=True)
        ])  # fmt: skip
    else:
        session.execute(
            insert(table),
            [
                {name: from_json(table.c[name], v) for name, v in entry[4].items() if name in table.c}
                for entry in entries
            ],
        )


def _refuse_unless_undoable(run: LoadRun, allow_running: bool) -> None:
    """Raise RunError when ``run``'s changes are not in the core, or it is still loading (unless allowed)."""
    if run.status not in ACTIVE:
        raise RunError(
            f"run {run.run_key} is {run.status}; only runs whose changes are in the core roll back"
        )
    if run.status == "running" and not allow_running and not is_crashed(run):
        raise RunError(
            f"run {run.run_key} is still in progress (process {run.pid} on {run.host}); "
            "wait for it to finish or fail, then roll it back"
        )


def rollback_run(
    engine: Engine,
    reference: str,
    *,
    cascade: bool = False,
    status: str = "rolled_back",
    allow_running: bool = False,
    only_if: Sequence[str] | None = None,
) -> list[str]:
    """Restore the core as it was before run ``reference`` (and, with ``cascade``, the runs that depend on it).

    Returns the keys of the runs rolled back, newest first. Everything happens in one transaction.
    ``only_if``: roll back nothing (return []) unless the run is in one of these statuses once locked (it
    may have ended meanwhile: finished as partial, or undone by its own step).
    """
    with session_factory(engine)() as session, session.begin():
        run = find_run(session, reference)
        if only_if is not None and run.status not in only_if:
            return []
        _refuse_unless_undoable(run, allow_running)  # at once, without waiting for a lock a live load holds
        # Lock the run and read its status again, so that no one ends it between the check and the undo. A
        # write locks on both databases (the row on PostgreSQL; SQLite, which renders no FOR UPDATE, the file).
        session.execute(
            update(LoadRun).where(LoadRun.id == run.id).values(status=LoadRun.status),
            execution_options={"synchronize_session": False},
        )
        session.refresh(run)
        if only_if is not None and run.status not in only_if:
            return []
        _refuse_unless_undoable(run, allow_running)
        refresh_statistics(session.connection(), ["row_changes", "external_ids"])
        todo = {run.id}
        frontier = [run]
        while frontier:
            needed = dependents(session, frontier.pop())
            new = needed - todo
            if new and not cascade:
                keys = session.scalars(select(LoadRun.run_key).where(LoadRun.id.in_(needed))).all()
                raise RunError(
                    f"later run(s) depend on {run.run_key}: {', '.join(keys)}; roll those back first, "
                    "or pass --cascade to roll them back too"
                )
            todo |= new
            frontier.extend(session.get(LoadRun, i) for i in new)  # type: ignore[misc]
        rolled = []
        for run_id in sorted(todo, reverse=True):
            target = session.get(LoadRun, run_id)
            assert target is not None
            _replay(session, target)
            target.status = status if run_id == run.id else "rolled_back"
            target.finished_at = dt.datetime.now(dt.UTC)
            rolled.append(target.run_key)
        return rolled


def abort_run(engine: Engine, run_key: str) -> bool:
    """Compensate a failed run: undo what its committed steps loaded and mark it failed.

    False if the run is unknown or its changes are not in the core (undone already, e.g. by its own step).
    """
    with session_factory(engine)() as session:
        run = session.scalar(select(LoadRun).where(LoadRun.run_key == run_key))
        if run is None or run.status not in ACTIVE:
            return False
    return bool(rollback_run(engine, run_key, status="failed", allow_running=True, only_if=ACTIVE))


def finish_partial_run(engine: Engine, run_key: str) -> bool:
    """Mark run ``run_key`` partial if it is still running (its Dagster run succeeded); False if it was not."""
    running = select(LoadRun.id).where(LoadRun.run_key == run_key, LoadRun.status == "running")
    # Most succeeded runs (the jobs, syncs) have none: a read first takes no write lock for them on SQLite.
    with engine.connect() as connection:
        if connection.scalar(running) is None:
            return False
    with engine.begin() as connection:
        finished = connection.execute(
            update(LoadRun)
            .where(LoadRun.run_key == run_key, LoadRun.status == "running")
            .values(status=PARTIAL, finished_at=dt.datetime.now(dt.UTC))
        )
    return bool(finished.rowcount)


@dataclass(frozen=True)
class Recovery:
    """What :func:`recover_crashed_runs` did: runs marked partial, and runs undone."""

    finished: list[str]
    undone: list[str]


def recover_crashed_runs(
    engine: Engine, succeeded: Callable[[Sequence[str]], set[str]] | None = None
) -> Recovery:
    """Settle every run still marked running whose process died (on this host).

    One whose Dagster run ``succeeded`` (asked about these runs only, after their process was found gone:
    a run's success is recorded before its process ends) is marked partial: assets materialized on their
    own, whose load run no reconciliation ended. Any other is undone and marked failed. ``succeeded``
    may raise (the Dagster instance cannot be opened): nothing is settled then.
    """
    with session_factory(engine)() as session:
        crashed = [
            run.run_key
            for run in session.scalars(select(LoadRun).where(LoadRun.status == "running"))
            if is_crashed(run)
        ]
    ended = succeeded(crashed) if crashed and succeeded is not None else set()
    finished = [key for key in crashed if key in ended and finish_partial_run(engine, key)]
    # a run that ended meanwhile (marked partial by the sensor) keeps its changes
    undone = [
        key
        for key in crashed
        if key not in ended
        and rollback_run(engine, key, status="failed", allow_running=True, only_if=("running",))
    ]
    return Recovery(finished, undone)
