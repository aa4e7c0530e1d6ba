"""Skipping what did not change: a full re-run leaves a mapping alone when its input provably did not change.

A mapping's **fingerprint** is taken before anything is read: a hash of its input (the content of every file it
matches; a SQLite source's database file; on PostgreSQL, MySQL and MariaDB a server-side aggregate over every
table it reads, joined tables too), its mapping file, the project's settings, the toolkit's code and the core's schema
revision. A load records it (``mapping_fingerprints``, keyed by the loading run: a rollback or a failure of that
run deletes it). A later full run skips the mapping's extract → map → validate → load when

* its fingerprint equals the one the last run that loaded the mapping recorded, and that run succeeded;
* no run was rolled back since (when in doubt, read again);
* for a mapping whose outcome depends on the core as well as on its input (rows held for a steward's decision,
  references that did not resolve, customers found by name): nothing changed since in the entities it
  references or in its own (no other run wrote there, no merge was undone), and nothing in this run did
  before its load (:func:`must_reload`, checked again by the load step, which then extracts after all).

A skipped mapping still reconciles: its line is the last loading run's, carried over (what loaded then is
``unchanged`` now), with that run's quarantine entries copied, and says since which run it is unchanged.
Sources without a cheap proof (REST, ODBC, K3Cloud, SQL Server…) are never skipped.

When every mapping would be skipped and the newest run on the core is this project's last full run, a run
would read, load, link and merge nothing and carry that run's reconciliation over line by line:
:func:`nothing_changed` says so, and ``crmi run`` then reports that run instead of starting Dagster.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import Connection, Engine, and_, exists, or_, select

from crm_core.db import head_revision
from crm_core.entities import ENTITIES
from crm_core.loading import SourceStats
from crm_core.models import Base, ExternalId, LoadRun, MappingFingerprint, MergeLog, Reject, RowChange
from crm_core.runs import ACTIVE
from integration.connectors import CsvConnector, ExcelConnector
from integration.connectors.sql import SqlConnector

if TYPE_CHECKING:
    from integration.mappings.spec import CompiledMapping
    from integration.pipeline import Migration

FINGERPRINT_ATTR = "fingerprint"  # DataFrame.attrs key: the mapping's fingerprint, taken before extraction
UNCHANGED_ATTR = (
    "unchanged"  # DataFrame.attrs key on the empty frame of a skipped mapping: Unchanged as a dict
)
UNCHANGED_KEY = "unchanged_since"  # run.stats entry of a skipped mapping: the run whose counts it carries
FORMAT = "crmi-fingerprint-1"
# Lookups whose answer depends on the records' values, not only on which keys exist (a name can become ambiguous).
CORE_LOOKUPS = ("name", "code")
_HASHED_CODE = ("integration", "crm_core")
_LIBRARIES = ("pandas", "pyarrow", "fastexcel", "sqlalchemy", "python-calamine")


@dataclass(frozen=True)
class Unchanged:
    """A mapping skipped in this run: the run whose load it stands on, and what that load recorded."""

    mapping: str
    entity: str
    system: str
    fingerprint: str
    run_id: int  # the last run that loaded the mapping
    run_key: str
    locations: tuple[str | None, ...]
    depends_on_core: bool

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-safe form carried in ``frame.attrs``."""
        return {**asdict(self), "locations": list(self.locations)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Unchanged:
        """Parse :meth:`to_dict`."""
        return cls(**{**data, "locations": tuple(data["locations"])})

    def describe(self) -> str:
        """Return e.g. ``unchanged since run 1b2c3d4e, skipped``."""
        return f"unchanged since run {self.run_key[:8]}, skipped"


# --------------------------------------------------------------------------- fingerprints


@cache
def _file_digest(path: str, size: int, mtime_ns: int, inode: int) -> str:
    """SHA-256 of a file's content (cached per process for a file that did not change size, time or inode)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """Return the SHA-256 of a file's content: the proof a file did not change (a touch alone does not count)."""
    stat = path.stat()
    return _file_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)


@cache
def code_digest() -> str:
    """Return a hash of the toolkit's code, the schema revision and the libraries that parse sources."""
    digest = hashlib.sha256(f"{FORMAT}|{head_revision()}".encode())
    root = Path(__file__).resolve().parent.parent
    for package in _HASHED_CODE:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    for name in _LIBRARIES:
        try:
            digest.update(f"{name}={importlib.metadata.version(name)}".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{name}=-".encode())
    return digest.hexdigest()


def _tables_read(mapping: CompiledMapping) -> list[str]:
    """Return the tables a SQL mapping reads: its own (or ``query:``) and every joined table."""
    source = mapping.spec.source
    tables = [f"query:{source.query}" if source.query is not None else str(source.location)]
    for join in mapping.joins:
        tables.extend(str(hop.table) for hop in join.hops if getattr(hop, "table", None))
    return list(dict.fromkeys(tables))


def _relation(connector: SqlConnector, table: str) -> str:
    """Return what a digest reads ``FROM``: a ``query:`` source as a subquery, else the quoted table."""
    if table.startswith("query:"):
        return f"({table.removeprefix('query:')})"
    quote = connector.engine.dialect.identifier_preparer.quote
    return (f"{quote(connector.schema)}." if connector.schema else "") + quote(table)


def _postgres_digest(connector: SqlConnector, tables: Sequence[str]) -> str:
    """Aggregate every table on the server: row count and two order-free sums of 64-bit row hashes."""
    parts = []
    with connector.engine.connect() as connection:
        for table in tables:
            relation = _relation(connector, table)
            row = connection.execute(sa.text(
                "SELECT count(*), coalesce(sum(hashtextextended(t::text, 0)::numeric), 0), "
                f"coalesce(sum(hashtextextended(t::text, 7)::numeric), 0) FROM {relation} AS t"
            )).one()  # fmt: skip
            parts.append(f"{table}:{row[0]}:{row[1]}:{row[2]}")
    return "|".join(parts)


# MySQL protocol column types whose text form rounds (a FLOAT shows 6 digits): hashed as a DOUBLE instead.
_MYSQL_FLOATS = (4, 5)  # FLOAT, DOUBLE


def _mysql_digest(connector: SqlConnector, tables: Sequence[str]) -> str:
    """Aggregate every table on the server: row count and two order-free sums of 64-bit row hashes.

    A row's hash is the SHA-256 of its values, each ``QUOTE``d as bytes (NULL and the text 'NULL' differ,
    columns of different collations concatenate, a float exactly as a DOUBLE); the two sums add its two
    first 64-bit words, as the PostgreSQL digest adds two seeded hashes.
    """
    quote = connector.engine.dialect.identifier_preparer.quote
    parts = []
    with connector.engine.connect() as connection:
        for table in tables:
            relation = _relation(connector, table)
            # Colons are the text's bind markers: a query's own are escaped.
            described = connection.execute(
                sa.text(f"SELECT * FROM {relation} AS t LIMIT 0".replace(":", r"\:"))
            )
            columns = [(d[0], d[1]) for d in described.cursor.description]
            described.close()
            values = ", ".join(
                f"QUOTE(CAST(t.{quote(name)}{' + 0e0' if kind in _MYSQL_FLOATS else ''} AS BINARY))"
                for name, kind in columns
            )
            word = "COALESCE(SUM(CAST(CONV(SUBSTRING(h, {}, 16), 16, 10) AS UNSIGNED)), 0)"
            sql = (
                f"SELECT COUNT(*), {word.format(1)}, {word.format(17)} "
                f"FROM (SELECT SHA2(CONCAT_WS(',', {values}), 256) AS h FROM {relation} AS t) AS hashed"
            )
            row = connection.execute(sa.text(sql.replace(":", r"\:"))).one()
            parts.append(f"{table}:{row[0]}:{row[1]}:{row[2]}")
    return "|".join(parts)


def source_digest(migration: Migration, mapping: CompiledMapping) -> str | None:
    """Return a proof of a mapping's input as it is now, or None when there is no cheap one (then no skip).

    Files (xlsx, csv): the content hash of every file the source matches (other sheets of a workbook and
    lookups in it included). SQLite: the database file (and its write-ahead log). PostgreSQL: per table read
    (joined tables too), ``count(*)`` and two sums of ``hashtextextended`` over the row's text, in the server.
    MySQL/MariaDB: the same per table read, with two words of a SHA-256 of the row's values
    (:func:`_mysql_digest`; ``CHECKSUM TABLE`` is not used: a 32-bit sum that follows the row format, for
    tables only).
    """
    connector = migration.connector(mapping.source)
    if isinstance(connector, ExcelConnector | CsvConnector):
        if not connector.paths:
            return None
        return "|".join(f"{p.name}:{file_digest(p)}" for p in sorted(connector.paths))
    if not isinstance(connector, SqlConnector):
        return None
    try:
        url = sa.engine.make_url(migration.project.source_url(mapping.source))
        backend = url.get_backend_name()
        if backend == "sqlite":
            database = url.database
            if not database or database == ":memory:" or not Path(database).is_file():
                return None
            files = [Path(database), Path(f"{database}-wal")]
            return "|".join(f"{p.name}:{file_digest(p)}" for p in files if p.is_file())
        if backend == "postgresql":
            return _postgres_digest(connector, _tables_read(mapping))
        if backend in ("mysql", "mariadb"):
            return _mysql_digest(connector, _tables_read(mapping))
        return None
    except (sa.exc.SQLAlchemyError, OSError):
        return None  # the extraction will say what is wrong with the source
    finally:
        connector.dispose()


def mapping_fingerprint(migration: Migration, mapping: CompiledMapping) -> str | None:
    """Return the fingerprint of everything that decides a mapping's load, or None when its input has none."""
    data = source_digest(migration, mapping)
    if data is None:
        return None
    digest = hashlib.sha256(code_digest().encode())
    digest.update(migration.project.spec.model_dump_json().encode())
    digest.update(mapping.file.read_bytes())
    digest.update(data.encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class Dependencies:
    """What in the core a mapping's load reads besides its input: crosswalk keys and whole records."""

    by_key: frozenset[str]  # found by source key or core id: new keys or records may resolve more rows
    by_record: frozenset[str]  # found by name or code: any change may change the answer

    @property
    def entities(self) -> frozenset[str]:
        """Return every entity the load depends on."""
        return self.by_key | self.by_record


def dependencies(mapping: CompiledMapping) -> Dependencies:
    """Return the entities a mapping's references resolve against, by how they resolve."""
    fields = ENTITIES[mapping.entity.name].fields
    by_key: set[str] = set()
    by_record: set[str] = set()
    for f in mapping.fields:
        target = fields[f.name].references if f.name in fields else None
        if not target:
            continue
        how = f.lookup.by if f.lookup is not None else "external_id"
        (by_record if how in CORE_LOOKUPS else by_key).add(target)
    return Dependencies(frozenset(by_key), frozenset(by_record))


def _tables_of(entities: Iterable[str]) -> list[str]:
    return sorted({ENTITIES[e].model.__table__.name for e in entities})  # type: ignore[attr-defined]


def core_changed(
    connection: Connection, run_ids: Sequence[int], needs: Dependencies, *, decisions: bool = True
) -> bool:
    """Return True when one of ``run_ids`` changed what a mapping's load reads in the core.

    New records or crosswalk keys of the entities it depends on; any change to the records of those it finds
    by name or code; with ``decisions``, any change to a steward's reference decisions or merges.
    Updates of crosswalk rows (a changed row's hash, a merge re-pointing a key) resolve the same keys: ignored.
    """
    if not run_ids:
        return False
    watched = _tables_of(needs.by_record)
    if decisions:
        watched += ["reference_decisions", "merge_log"]
    if watched:
        journaled = select(RowChange.id).where(
            RowChange.load_run_id.in_(run_ids), RowChange.table_name.in_(watched)
        )
        if connection.scalar(select(exists(journaled))):
            return True
    for name in _tables_of(needs.entities):
        column = Base.metadata.tables[name].c.created_run_id
        if connection.scalar(select(exists(select(column).where(column.in_(run_ids))))):
            return True
    if not needs.entities:
        return False
    crosswalk = select(ExternalId.id).where(
        ExternalId.created_run_id.in_(run_ids), ExternalId.entity.in_(sorted(needs.entities))
    )
    return bool(connection.scalar(select(exists(crosswalk))))


def unchanged_since(
    engine: Engine, migration: Migration, mapping: CompiledMapping, run_key: str, fingerprint: str | None
) -> Unchanged | None:
    """Return what makes ``mapping`` skippable in run ``run_key``, or None when it must be read and loaded.

    See the module's docstring for the rules; any doubt answers None.
    """
    if fingerprint is None:
        return None
    with engine.connect() as connection:
        current = connection.scalar(select(LoadRun.id).where(LoadRun.run_key == run_key))
        query = (
            select(
                MappingFingerprint.created_run_id,
                MappingFingerprint.system,
                MappingFingerprint.fingerprint,
                MappingFingerprint.locations,
                MappingFingerprint.depends_on_core,
                LoadRun.run_key,
                LoadRun.status,
                LoadRun.started_at,
                LoadRun.stats,
            )
            .join(LoadRun, LoadRun.id == MappingFingerprint.created_run_id)
            .where(
                MappingFingerprint.project == migration.project.name,
                MappingFingerprint.mapping == mapping.name,
                MappingFingerprint.created_run_id != (current or -1),
            )
            .order_by(MappingFingerprint.created_run_id.desc())
            .limit(1)
        )
        found = connection.execute(query).first()
        if found is None:
            return None
        last = found
        key, status, started, stats = last.run_key, last.status, last.started_at, last.stats
        if status != "succeeded" or last.fingerprint != fingerprint:
            return None
        entries = (stats or {}).get(mapping.entity.name, [])
        if not any(e.get("mapping") == mapping.name and UNCHANGED_KEY not in e for e in entries):
            return None  # its counts cannot be carried over
        later = select(LoadRun.id, LoadRun.status, LoadRun.mode).where(
            LoadRun.id > last.created_run_id, LoadRun.id != (current or -1)
        )
        runs = connection.execute(later).all()
        active = [i for i, s, _ in runs if s in ACTIVE]
        # A rollback since, or a sync run (it rewrites crosswalk hashes of source systems): read again.
        if any(s == "rolled_back" for _, s, _ in runs) or any(
            m == "sync" and i in active for i, _, m in runs
        ):
            return None
        if last.depends_on_core:
            if core_changed(connection, active, dependencies(mapping)):
                return None
            undone = select(MergeLog.id).where(MergeLog.undone_at >= started)
            if connection.scalar(select(exists(undone))):
                return None
    return Unchanged(
        mapping=mapping.name, entity=mapping.entity.name, system=last.system, fingerprint=fingerprint,
        run_id=last.created_run_id, run_key=key, locations=tuple(last.locations or ()),
        depends_on_core=bool(last.depends_on_core),
    )  # fmt: skip


def nothing_changed(engine: Engine, migration: Migration) -> str | None:
    """Return the last run's key when a full run now would change nothing, else None.

    Nothing changes when the newest run on the core (any project, any mode: steward decisions, edits and syncs
    are runs too) is a full run of this project that succeeded, it reconciled exactly the project's mappings,
    each mapping is unchanged since the run that loaded it (:func:`unchanged_since`: its input, mapping file,
    settings and the toolkit's code, and the core it depends on), and since that run started no merge was
    undone and no other run ended (a rollback or a recovery of an earlier run, a run that overlapped it).
    Such a run would read and load nothing, so linkage and merges would find nothing new, and its
    reconciliation would carry the last run's over line by line. Any doubt answers None: the run goes ahead.
    """
    with engine.connect() as connection:
        newest = connection.execute(
            select(LoadRun.id, LoadRun.run_key, LoadRun.project, LoadRun.mode, LoadRun.status, LoadRun.stats,
                   LoadRun.started_at)
            .order_by(LoadRun.id.desc())
            .limit(1)
        ).first()  # fmt: skip
        if newest is None or (newest.project, newest.mode, newest.status) != (
            migration.project.name, "full", "succeeded",
        ):  # fmt: skip
            return None
        # Undoing a merge, rolling back or recovering an earlier run write no run of their own, yet a run checks
        # the whole core again (its blocking core rules), also when none of its mappings depends on the core.
        # An earlier run that ended after this one started (a rollback or recovery stamps its end) changed
        # the core since, as a merge undone since did.
        undone = select(MergeLog.id).where(MergeLog.undone_at >= newest.started_at)
        ended = select(LoadRun.id).where(LoadRun.id != newest.id, LoadRun.finished_at >= newest.started_at)
        if connection.scalar(select(exists(undone))) or connection.scalar(select(exists(ended))):
            return None
    reconciled = {
        entry.get("mapping")
        for entries in (newest.stats or {}).values()
        if isinstance(entries, list)
        for entry in entries
    }
    if reconciled != {mapping.name for mapping in migration.mappings}:
        return None  # a mapping added or removed since: its line appears or goes
    for mapping in migration.mappings:
        fingerprint = mapping_fingerprint(migration, mapping)
        if unchanged_since(engine, migration, mapping, "", fingerprint) is None:
            return None
    return str(newest.run_key)


def must_reload(
    connection: Connection, run_id: int, mapping: CompiledMapping, unchanged: Unchanged, others_loading: bool
) -> bool:
    """Return True when a mapping skipped at extraction must load after all: it depends on the core, and this
    run changed what it reads there before its load (or loads another mapping of an entity it references
    itself, a branch's parent say)."""
    if not unchanged.depends_on_core:
        return False
    needs = dependencies(mapping)
    if others_loading and mapping.entity.name in needs.entities:
        return True
    return core_changed(connection, [run_id], needs, decisions=False)


# --------------------------------------------------------------------------- recording and carrying over


def depends_on_core(
    connection: Connection,
    run_id: int,
    mapping: CompiledMapping,
    system: str,
    locations: Sequence[Any],
    held: int,
) -> bool:
    """Return True when the load's outcome may change with the core while the input stays the same."""
    if held:
        return True
    if dependencies(mapping).by_record:
        return True
    problems = select(Reject.id).where(
        Reject.load_run_id == run_id, Reject.entity == mapping.entity.name, Reject.source == system,
        Reject.rule == "reference", _of(mapping.name, locations),
    )  # fmt: skip
    return bool(connection.scalar(select(exists(problems))))


def _of(mapping: str, locations: Sequence[Any]) -> Any:
    """Select a mapping's quarantine entries: by the mapping that read them, or where they were read for
    entries recorded before rejects named their mapping (core revision 0014)."""
    return or_(Reject.mapping == mapping, and_(Reject.mapping.is_(None), _at(locations)))


def shares_rows(unchanged: Unchanged, system: str, locations: Iterable[Any]) -> bool:
    """Return True when a skipped mapping read the rows of ``locations`` of ``system`` as well: a fix sheet
    (``system:``) keeps its rows' original ``_location``, so it and the source's own mapping write one
    crosswalk key each, in mapping order: one read without the other could leave another core."""
    return unchanged.system == system and bool(
        {str(v) for v in unchanged.locations if v is not None} & {str(v) for v in locations if v is not None}
    )


def _at(locations: Sequence[Any]) -> Any:
    named = [str(loc) for loc in locations if loc is not None]
    conditions = [Reject.location.in_(named)] if named else []
    if any(loc is None for loc in locations):
        conditions.append(Reject.location.is_(None))
    return or_(*conditions) if conditions else sa.false()


def record_fingerprints(connection: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Insert the fingerprints of the mappings a run loaded (rows of ``mapping_fingerprints``)."""
    if rows:
        connection.execute(sa.insert(MappingFingerprint), list(rows))


def carried_stats(connection: Connection, unchanged: Unchanged) -> dict[str, Any]:
    """Return the run.stats entry of a skipped mapping: the loading run's, what loaded then unchanged now."""
    stats = connection.scalar(select(LoadRun.stats).where(LoadRun.id == unchanged.run_id)) or {}
    entry = next(
        e for e in stats.get(unchanged.entity, [])
        if e.get("mapping") == unchanged.mapping and UNCHANGED_KEY not in e
    )  # fmt: skip
    loaded = int(entry.get("loaded", entry["inserted"] + entry["updated"] + entry["unchanged"]))
    return {**entry, "inserted": 0, "updated": 0, "unchanged": loaded, "loaded": loaded,
            UNCHANGED_KEY: unchanged.run_key}  # fmt: skip


def stats_object(entry: dict[str, Any]) -> SourceStats:
    """Return a carried run.stats entry as :class:`SourceStats` (for the load's checks and metadata)."""
    names = SourceStats.__dataclass_fields__
    values = {k: v for k, v in entry.items() if k in names}
    for k, v in values.items():
        if k.startswith("amount_") and k != "amount_unreadable" and v is not None:
            values[k] = Decimal(str(v))
    return SourceStats(**values)


def copy_rejects(connection: Connection, run_id: int, unchanged: Sequence[Unchanged]) -> None:
    """Copy the quarantine entries of skipped mappings from the runs that loaded them, in their order."""
    by_run: dict[int, list[Unchanged]] = {}
    for item in unchanged:
        by_run.setdefault(item.run_id, []).append(item)
    columns = [c for c in Reject.__table__.columns if c.name not in ("id", "load_run_id")]
    for origin, items in sorted(by_run.items()):
        which = or_(*(
            and_(Reject.entity == u.entity, Reject.source == u.system, _of(u.mapping, u.locations))
            for u in items
        ))  # fmt: skip
        chosen = (
            select(sa.literal(run_id).label("load_run_id"), *columns)
            .where(Reject.load_run_id == origin, which)
            .order_by(Reject.id)
        )
        names = ["load_run_id", *(c.name for c in columns)]
        connection.execute(sa.insert(Reject).from_select(names, chosen))


def fingerprint_row(
    run_id: int, project: str, mapping: CompiledMapping, system: str, fingerprint: str | None,
    locations: Sequence[Any], dependent: bool,
) -> dict[str, Any]:  # fmt: skip
    """Return one ``mapping_fingerprints`` row."""
    return {
        "created_run_id": run_id, "project": project, "mapping": mapping.name, "entity": mapping.entity.name,
        "system": system, "fingerprint": fingerprint, "locations": [None if v is None else str(v) for v in locations],
        "depends_on_core": dependent, "created_at": dt.datetime.now(dt.UTC),
    }  # fmt: skip
