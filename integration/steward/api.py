"""The duplicate-check API for 商机报备 forms: likely existing customers for what a salesperson types, and
registered opportunities of the customer held by another salesperson (撞单).

The golden customers sit in one long-lived in-memory index (``integration.dedup.online.MatchIndex``,
the index `crmi dedup match` uses), built once and refreshed incrementally: a background thread looks
every few seconds for load runs that finished since (loads, dedup passes, steward decisions: every writer
of customers works inside a run) and for undone merges, reads only the customers they touched, and
replaces those in the index (a replaced row's old position is marked dead). A rolled-back run, or too
many dead rows, rebuilds it. Calls carry an API token (``Authorization: Bearer …``,
`crmi steward tokens add`).
"""

from __future__ import annotations

import datetime as dt
import gc
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from http import HTTPStatus
from typing import Any

import pandas as pd
from sqlalchemy import Engine, func, or_, select
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from crm_core.models import Base
from crm_core.runs import COMMITTED
from integration.dedup.customers import CUSTOMER_SPEC, RARE_TRADE_NAME, customer_records, linkage_frame
from integration.dedup.linkage import LinkageSpec
from integration.dedup.online import MatchIndex
from integration.dedup.online import form_record as linkage_form_record
from integration.mappings.transforms import TransformFailure
from integration.steward import security
from integration.steward.errors import StewardError

log = logging.getLogger(__name__)
TABLES = Base.metadata.tables
DEAD_SHARE_REBUILD = 0.25  # rebuild when a quarter of the index's rows are replaced or gone
TOKEN_CACHE_SECONDS = 30.0  # a revoked token stops working within this
UNDO_SLACK = dt.timedelta(seconds=60)  # undos committed late with an earlier stamp are read again
EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
API_PREFIX = "/api/v1/"
PROBLEM_JSON = "application/problem+json"
_JSON_TYPES = ("application/json", PROBLEM_JSON)
_HTML_TYPES = ("text/html", "application/xhtml+xml")
_INDEX_COLUMNS = ("id", "name", "credit_code", "phone", "email", "city", "address", "province", "district",
                  "credit_code_as_written")  # fmt: skip


class LiveIndex(MatchIndex):
    """A :class:`MatchIndex` that counts trade-name holders, so replaced customers get their ``trade_rare``."""

    def __init__(self, records: pd.DataFrame, spec: LinkageSpec = CUSTOMER_SPEC) -> None:
        super().__init__(records, spec)
        holders = records.groupby("trade_pinyin")["name_core"].nunique() if len(records) else pd.Series()
        self.holders: dict[str, int] = {str(k): int(v) for k, v in holders.items()}

    def apply(self, changed: pd.DataFrame, removed: Iterable[int]) -> None:
        """Replace ``changed`` customers (linkage rows by id) and drop ``removed`` ones."""
        self.remove([*removed, *changed.index])
        if changed.empty:
            return
        changed = changed.copy()
        for pinyin, core in zip(changed["trade_pinyin"], changed["name_core"], strict=True):
            if pinyin and core:
                self.holders[str(pinyin)] = self.holders.get(str(pinyin), 0) + 1
        changed["trade_rare"] = [
            p if p and self.holders.get(str(p), 0) <= RARE_TRADE_NAME else None
            for p in changed["trade_pinyin"]
        ]
        self.add(changed)


@dataclass
class IndexState:
    """What the index holds and when it was last brought up to date."""

    customers: int = 0
    built_at: str | None = None
    refreshed_at: str | None = None
    replaced_since_build: int = 0


class MatchService:
    """The long-lived index and its refresh (see module doc); thread-safe."""

    def __init__(
        self, engine: Engine, refresh_seconds: float = 10.0, spec: LinkageSpec = CUSTOMER_SPEC
    ) -> None:
        self.engine = engine
        self.refresh_seconds = refresh_seconds
        self.spec = spec
        self.state = IndexState()
        self._index: LiveIndex | None = None
        self._lock = threading.RLock()
        self._refreshing = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_run = 0
        self._open_runs: set[int] = set()
        self._undo_mark = EPOCH
        self._rolled_back = 0
        self._tokens: dict[str, tuple[str, float]] = {}
        # The owning salesperson of each indexed customer, and the sales reps: kept with the index (and
        # refreshed with it), so a look-up reads nothing from the database.
        self._owner_of: dict[int, int] = {}
        self._reps: dict[int, dict[str, Any]] = {}

    # ------------------------------------------------------------------ index

    def _marks(self) -> tuple[int, set[int], dt.datetime, int]:
        runs = TABLES["load_runs"]
        merges = TABLES["merge_log"]
        with self.engine.connect() as connection:
            last = connection.scalar(select(runs.c.id).order_by(runs.c.id.desc()).limit(1)) or 0
            running = set(connection.scalars(select(runs.c.id).where(runs.c.status == "running")))
            undone = connection.scalar(
                select(merges.c.undone_at).order_by(merges.c.undone_at.desc()).limit(1)
            )
            rolled_back = connection.scalar(select(func.count()).where(runs.c.status == "rolled_back")) or 0
        stamp = _aware(undone) if undone is not None else EPOCH
        return int(last), {int(i) for i in running}, stamp, int(rolled_back)

    def build(self) -> LiveIndex:
        """Read every active customer and build the index (the marks are read first: nothing is missed)."""
        with self._refreshing:
            marks = self._marks()
            index = LiveIndex(customer_records(self.engine), self.spec)
            customers = TABLES["customers"]
            with self.engine.connect() as connection:
                owner_of = {
                    int(i): int(o)
                    for i, o in connection.execute(
                        select(customers.c.id, customers.c.owner_id).where(
                            customers.c.merged_into_id.is_(None), customers.c.owner_id.is_not(None)
                        )
                    )
                }
                reps = self._read_reps(connection)
            now = _now()
            with self._lock:
                self._index = index
                self._owner_of, self._reps = owner_of, reps
                self._last_run, self._open_runs, self._undo_mark, self._rolled_back = marks
                self.state = IndexState(index.size, now, now, 0)
            # Millions of long-lived objects: a full garbage collection would walk them all (hundreds of
            # milliseconds at 1,000,000 customers, in some look-up's time). They hold no reference cycles
            # (a replaced index is freed by reference counting), so the collector is told to leave them be.
            gc.collect()
            gc.freeze()
            return index

    @property
    def ready(self) -> bool:
        """Whether the index is built (a look-up then takes about a millisecond)."""
        return self._index is not None

    def index(self) -> LiveIndex:
        """The index, built on first use."""
        with self._lock:
            found = self._index
        return found if found is not None else self.build()

    def refresh(self) -> int:
        """Bring the index up to date with what changed since; returns the customers replaced or removed.

        Customers written by load runs that finished since the last refresh (and by undone merges) are
        read again and replaced; a run rolled back since, or a quarter of the rows replaced, rebuilds.
        """
        if self._index is None:
            self.build()
            return 0
        with self._refreshing:
            touched = self._apply_changes()
        if touched is None or self._index.dead_share > DEAD_SHARE_REBUILD:
            self.build()
        return touched or 0

    def _apply_changes(self) -> int | None:
        """Read and apply what changed (None: a rollback happened, rebuild)."""
        runs, merges, customers = TABLES["load_runs"], TABLES["merge_log"], TABLES["customers"]
        with self.engine.connect() as connection:
            rolled_back = connection.scalar(select(func.count()).where(runs.c.status == "rolled_back")) or 0
            if rolled_back != self._rolled_back:
                return None
            rows = connection.execute(
                select(runs.c.id, runs.c.status).where(
                    or_(runs.c.id > self._last_run, runs.c.id.in_(sorted(self._open_runs)))
                )
            ).all()
            if any(status in ("failed", "rolled_back") for _, status in rows):
                return None  # a run undone since: what it had committed before may be in the index
            finished = [run_id for run_id, status in rows if status in COMMITTED]
            undone_rows = connection.execute(
                select(merges.c.merged_id, merges.c.survivor_id, merges.c.undone_at).where(
                    merges.c.undone_at > self._undo_mark - UNDO_SLACK
                )
            ).all()
            touched: set[int] = {i for row in undone_rows for i in (row.merged_id, row.survivor_id)}
            for part in _chunks(finished):
                touched |= set(
                    connection.scalars(
                        select(customers.c.id).where(
                            or_(customers.c.created_run_id.in_(part), customers.c.updated_run_id.in_(part))
                        )
                    )
                )
            found: list[dict[str, Any]] = []
            for part in _chunks(sorted(touched)):
                query = select(
                    *(customers.c[c] for c in _INDEX_COLUMNS),
                    customers.c.merged_into_id,
                    customers.c.owner_id,
                )
                found += [
                    dict(r) for r in connection.execute(query.where(customers.c.id.in_(part))).mappings()
                ]
            reps = self._read_reps(connection)
        active = [{c: r[c] for c in _INDEX_COLUMNS} for r in found if r["merged_into_id"] is None]
        gone = [int(r["id"]) for r in found if r["merged_into_id"] is not None]
        gone += sorted(touched - {int(r["id"]) for r in found})  # deleted since
        changed = linkage_frame(active) if active else None
        with self._lock:
            index = self._index
            assert index is not None
            index.apply(changed if changed is not None else pd.DataFrame(), gone)
            for record_id in gone:
                self._owner_of.pop(record_id, None)
            for row in found:
                if row["merged_into_id"] is None and row["owner_id"] is not None:
                    self._owner_of[int(row["id"])] = int(row["owner_id"])
                else:
                    self._owner_of.pop(int(row["id"]), None)
            self._reps = reps
            self._last_run = max([self._last_run, *(run_id for run_id, _ in rows)])
            self._open_runs = {run_id for run_id, status in rows if status == "running"}
            if undone_rows:
                self._undo_mark = max(self._undo_mark, *(_aware(r.undone_at) for r in undone_rows))
            self.state.customers = index.size
            self.state.refreshed_at = _now()
            self.state.replaced_since_build += len(touched)
        return len(touched)

    def match(self, record: dict[str, Any], limit: int = 5) -> list[dict[str, Any]]:
        """Likely existing customers for a form's record, best first, with their owner."""
        index = self.index()
        with self._lock:
            found = index.match(record, limit)
            cities = {c.customer_id: index.value(c.customer_id, "city") for c in found}
            owners = self._owners([c.customer_id for c in found])
        return [
            {"customer_id": c.customer_id, "name": c.name, "probability": c.probability, "levels": c.levels,
             "city": _text(cities[c.customer_id]),
             "agrees_on": [k.rsplit("_", 1)[0] for k, v in c.levels.items() if v],
             "owner": owners.get(c.customer_id)}
            for c in found
        ]  # fmt: skip

    def _owners(self, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        owners = {i: self._reps.get(self._owner_of.get(i, -1)) for i in ids}
        return {i: rep for i, rep in owners.items() if rep is not None}

    @staticmethod
    def _read_reps(connection: Any) -> dict[int, dict[str, Any]]:
        reps = TABLES["sales_reps"]
        rows = connection.execute(select(reps.c.id, reps.c.code, reps.c.name))
        return {int(r.id): {"id": r.id, "code": r.code, "name": r.name} for r in rows}

    # ------------------------------------------------------------------ background refresh

    def start(self) -> None:
        """Build the index and refresh it every ``refresh_seconds`` in a daemon thread."""
        if self._thread is not None:
            return
        self._stop.clear()

        def loop() -> None:
            try:
                if self._index is None:  # a worker forked after the build keeps the index it was given
                    self.build()
            except Exception as exc:  # the API answers 503 until a refresh succeeds
                log.warning("duplicate-check index not built: %s", type(exc).__name__)
            while not self._stop.wait(self.refresh_seconds):
                try:
                    self.refresh()
                except Exception as exc:
                    log.warning("duplicate-check index refresh failed: %s", type(exc).__name__)

        self._thread = threading.Thread(target=loop, name="steward-match-refresh", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background refresh."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # ------------------------------------------------------------------ tokens

    def cached_token_name(self, token: str | None) -> str | None:
        """The name of a token checked against the database within the last few seconds, else None."""
        cached = self._tokens.get(security.token_hash(token)) if token else None
        return cached[0] if cached and cached[1] > time.monotonic() else None

    def token_name(self, token: str | None) -> str | None:
        """The name of a valid API token (cached for a few seconds: no database read per call)."""
        if not token:
            return None
        cached = self.cached_token_name(token)
        if cached is not None:
            return cached
        key = security.token_hash(token)
        with self.engine.connect() as connection:
            name = security.api_token_name(connection, token)
        if name is not None:
            self._tokens[key] = (name, time.monotonic() + TOKEN_CACHE_SECONDS)
        return name


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _aware(stamp: dt.datetime) -> dt.datetime:
    return stamp.replace(tzinfo=dt.UTC) if stamp.tzinfo is None else stamp


def _text(value: Any) -> str | None:
    return None if value is None or value != value else str(value)


def _chunks(ids: Sequence[int], size: int = 1000) -> list[list[int]]:
    return [list(ids[i : i + size]) for i in range(0, len(ids), size)]


# --------------------------------------------------------------------------- HTTP


def problem(status: int, detail: str, *, retry_after: int | None = None) -> JSONResponse:
    """A refusal as an RFC 7807 problem (``application/problem+json``): ``type``, ``title`` (the status's
    phrase), ``status`` and ``detail``, which says what to do; ``error`` repeats it for the clients written
    against the API's earlier ``{"error": …}`` body. ``retry_after``: seconds, sent as ``Retry-After``."""
    body = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail,
            "error": detail}  # fmt: skip
    headers = None if retry_after is None else {"retry-after": str(retry_after)}
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


def wants_json(request: Request) -> bool:
    """Whether a refusal goes to this caller as a problem rather than a page: a call of the API, or an
    ``Accept`` that prefers ``application/json`` or ``application/problem+json`` to HTML (a script's). A
    browser's, ``*/*``, none, or JSON and HTML alike (same quality) get the page."""
    if request.url.path.startswith(API_PREFIX):
        return True
    best = {"json": 0.0, "html": 0.0}
    for item in request.headers.get("accept", "").lower().split(","):
        kind, *params = (part.strip() for part in item.split(";"))
        side = "json" if kind in _JSON_TYPES else "html" if kind in _HTML_TYPES else None
        if side is None:
            continue
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        best[side] = max(best[side], quality)
    return best["json"] > best["html"]


def refused(exc: StewardError) -> JSONResponse:
    """The API's answer to a refused call: its problem (a plain refusal is the input's fault: 422)."""
    return problem(exc.status if exc.status != 400 else 422, str(exc), retry_after=exc.retry_after)


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise StewardError("the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise StewardError("the body must be a JSON object")
    return body


def _field(body: dict[str, Any], name: str, *, required: bool = False, length: int = 255) -> str | None:
    value = body.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise StewardError(f"'{name}' is required")
        return None
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise StewardError(f"'{name}' must be text")
    text = str(value).strip()
    if len(text) > length:
        raise StewardError(f"'{name}' is longer than {length} characters")
    return text


def form_record(body: dict[str, Any], *, name_required: bool = True) -> dict[str, Any]:
    """The linkage row of what a form sent (name, phone, credit_code, email, city), normalized as a load does."""
    name = _field(body, "name", required=name_required)
    phone, code = _field(body, "phone", length=64), _field(body, "credit_code", length=64)
    try:
        return linkage_form_record(
            name,
            phone=phone,
            credit_code=code,
            email=_field(body, "email"),
            city=_field(body, "city", length=32),
        )
    except TransformFailure as exc:
        raise StewardError(str(exc), status=422) from None


def api_routes(service: MatchService) -> list[Route]:
    """The API's routes: match, opportunity check, and the OpenAPI document."""

    async def authorized(request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else None
        # a token seen within the cache time needs no database read, nor a hop to the thread pool
        return service.cached_token_name(token) or await run_in_threadpool(service.token_name, token)

    async def match(request: Request) -> Response:
        if await authorized(request) is None:
            return problem(
                401, "a valid API token is required (Authorization: Bearer …; `crmi steward tokens add`)"
            )
        try:
            body = await _body(request)
            record = form_record(body)
            limit = body.get("limit", 5)
            if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 20:
                raise StewardError("'limit' must be a whole number from 1 to 20")
            # A look-up on a built index is about a millisecond of CPU and reads nothing from the database:
            # it runs on the event loop, where a thread pool would add hand-offs and contention for the GIL.
            # The first one, which builds the index, goes to a thread.
            if service.ready:
                found = service.match(record, limit)
            else:
                found = await run_in_threadpool(service.match, record, limit)
        except StewardError as exc:
            return refused(exc)
        return JSONResponse({"candidates": found, "index": asdict(service.state)})

    async def check(request: Request) -> Response:
        if await authorized(request) is None:
            return problem(
                401, "a valid API token is required (Authorization: Bearer …; `crmi steward tokens add`)"
            )
        try:
            body = await _body(request)
            result = await run_in_threadpool(_opportunity_check, service, body)
        except StewardError as exc:
            return refused(exc)
        return JSONResponse(result)

    async def openapi(request: Request) -> Response:
        return JSONResponse(OPENAPI)

    return [
        Route(f"{API_PREFIX}match", match, methods=["POST"]),
        Route(f"{API_PREFIX}opportunities/check", check, methods=["POST"]),
        Route(f"{API_PREFIX}openapi.json", openapi, methods=["GET"]),
    ]


def _opportunity_check(service: MatchService, body: dict[str, Any]) -> dict[str, Any]:
    """Registered, open opportunities of the customer held by another salesperson (撞单)."""
    salesperson = _field(body, "salesperson", required=True, length=64)
    customer_id = body.get("customer_id")
    customers, reps = TABLES["customers"], TABLES["sales_reps"]
    opportunities, stages = TABLES["opportunities"], TABLES["stages"]
    with service.engine.connect() as connection:
        rep = connection.execute(
            select(reps.c.id, reps.c.name).where(
                or_(reps.c.code == salesperson, reps.c.name == salesperson), reps.c.merged_into_id.is_(None)
            )
        ).first()
    targets: list[dict[str, Any]] = []
    if customer_id is not None:
        if not isinstance(customer_id, int) or isinstance(customer_id, bool):
            raise StewardError("'customer_id' must be a whole number")
        targets = [{"customer_id": customer_id, "probability": 1.0}]
    else:
        targets = [c for c in service.match(form_record(body), 5) if c["probability"] >= service.spec.review]
    ids = [int(t["customer_id"]) for t in targets]
    registrations: list[dict[str, Any]] = []
    if ids:
        owner, registrar = reps.alias("owner"), reps.alias("registrar")
        with service.engine.connect() as connection:
            rows = connection.execute(
                select(opportunities.c.id, opportunities.c.name, opportunities.c.customer_id,
                       customers.c.name.label("customer_name"), opportunities.c.stage_code, opportunities.c.amount,
                       opportunities.c.registered_at, opportunities.c.owner_id, opportunities.c.registered_by_id,
                       owner.c.name.label("owner"), registrar.c.name.label("registered_by"))
                .join(customers, customers.c.id == opportunities.c.customer_id)
                .join(stages, stages.c.code == opportunities.c.stage_code)
                .outerjoin(owner, owner.c.id == opportunities.c.owner_id)
                .outerjoin(registrar, registrar.c.id == opportunities.c.registered_by_id)
                .where(opportunities.c.customer_id.in_(ids), opportunities.c.registered_at.is_not(None),
                       stages.c.is_closed.is_(False))
                .order_by(opportunities.c.registered_at)
            ).mappings().all()  # fmt: skip
        mine = rep.id if rep is not None else None
        by_customer: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for row in rows:
            holder = row["registered_by_id"] or row["owner_id"]
            if holder is not None and holder == mine:
                continue
            by_customer[row["customer_id"]].append({
                "opportunity_id": row["id"], "name": row["name"], "customer_id": row["customer_id"],
                "customer_name": row["customer_name"], "stage": row["stage_code"],
                "amount": None if row["amount"] is None else str(row["amount"]),
                "registered_at": _aware(row["registered_at"]).isoformat(timespec="seconds"),
                "registered_by": row["registered_by"], "owner": row["owner"],
            })  # fmt: skip
        registrations = [r for i in ids for r in by_customer.get(i, [])]
    return {
        "conflict": bool(registrations),
        "salesperson": None if rep is None else {"id": rep.id, "name": rep.name},
        "customers": targets,
        "registrations": registrations,
    }


_RECORD: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 255, "description": "company name as typed"},
        "phone": {"type": "string", "description": "any Chinese phone notation; normalized to E.164"},
        "credit_code": {
            "type": "string",
            "description": "统一社会信用代码 (18 characters, check digit verified)",
        },
        "email": {"type": "string"},
        "city": {"type": "string"},
    },
}
_PROBLEM: dict[str, Any] = {
    "type": "object",
    "description": "RFC 7807 problem details",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string", "format": "uri-reference"},
        "title": {"type": "string", "description": "the status's phrase"},
        "status": {"type": "integer"},
        "detail": {"type": "string", "description": "what was refused and what to do"},
        "error": {"type": "string", "description": "the detail again, for clients of the earlier body"},
    },
}
OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "crm-integration duplicate check (商机报备)", "version": "1"},
    "components": {"securitySchemes": {"token": {"type": "http", "scheme": "bearer"}}},
    "security": [{"token": []}],
    "paths": {
        "/api/v1/match": {
            "post": {
                "summary": "Likely existing customers for a new customer or opportunity form, best first",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    **_RECORD, "required": ["name"],
                    "properties": {**_RECORD["properties"], "limit": {"type": "integer", "minimum": 1, "maximum": 20}},
                }}}},
                "responses": {
                    "200": {"description": "candidates with probability, comparison levels and owner",
                            "content": {"application/json": {"schema": {"type": "object", "properties": {
                                "candidates": {"type": "array", "items": {"type": "object", "properties": {
                                    "customer_id": {"type": "integer"}, "name": {"type": "string"},
                                    "probability": {"type": "number"}, "levels": {"type": "object"},
                                    "agrees_on": {"type": "array", "items": {"type": "string"}},
                                    "city": {"type": ["string", "null"]},
                                    "owner": {"type": ["object", "null"]}}}},
                                "index": {"type": "object"}}}}}},
                    "401": {"description": "no or invalid token", "content": {PROBLEM_JSON: {"schema": _PROBLEM}}},
                    "422": {"description": "invalid input (e.g. a credit code whose check digit fails)",
                            "content": {PROBLEM_JSON: {"schema": _PROBLEM}}},
                },
            }
        },
        "/api/v1/opportunities/check": {
            "post": {
                "summary": "Open registered opportunities of this customer held by another salesperson (撞单)",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    **_RECORD, "required": ["salesperson"],
                    "properties": {**_RECORD["properties"],
                                   "customer_id": {"type": "integer", "description": "instead of name/phone/code"},
                                   "salesperson": {"type": "string", "description": "sales rep code or name"}},
                }}}},
                "responses": {
                    "200": {"description": "conflict flag, the customers considered, the conflicting registrations",
                            "content": {"application/json": {"schema": {"type": "object"}}}},
                    "401": {"description": "no or invalid token", "content": {PROBLEM_JSON: {"schema": _PROBLEM}}},
                    "422": {"description": "invalid input", "content": {PROBLEM_JSON: {"schema": _PROBLEM}}},
                },
            }
        },
    },
}  # fmt: skip
