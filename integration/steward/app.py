"""The steward workbench: a server-rendered Starlette app on the CRM core (SQLite or PostgreSQL).

Pages are Jinja2 templates with autoescaping; the little JavaScript and CSS there is ship in the package
(``static/``), and the Content-Security-Policy allows nothing else. Every page needs a session (else a
redirect to the login page); every POST needs the session's CSRF token (else 403, nothing changed); roles
gate what a user may do (viewer < steward < admin). Database work runs in Starlette's thread pool, one
transaction per request.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode
from zoneinfo import ZoneInfo

import jinja2
from sqlalchemy import Connection, Engine, event
from sqlalchemy.exc import IntegrityError, OperationalError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, MutableHeaders
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from crm_core.db import SQLITE_BUSY_MILLISECONDS
from crm_core.edits import core_busy_message
from crm_core.steward_models import ROLES
from integration.steward import security
from integration.steward.api import MatchService, api_routes, problem, wants_json
from integration.steward.audit import audit_page, record_event
from integration.steward.cluster import ASSIGN_TTL, build_view, claim, field_label, find_cluster, release
from integration.steward.decisions import (
    CORE_BUSY,
    CORE_BUSY_RETRY_AFTER,
    Rules,
    can_undo,
    decide_cluster,
    reopen,
    skip_cluster,
    undo,
)
from integration.steward.errors import StewardError
from integration.steward.golden import golden_view
from integration.steward.names import decide_held_name, held_names
from integration.steward.queue import (
    BANDS,
    PER_PAGE,
    SORTS,
    QueueFilter,
    Training,
    first_available,
    queue_page,
    source_systems,
    training,
)
from integration.steward.security import Principal
from integration.steward.sheets import export_queue, import_decisions
from integration.yamlconf import show_instant

HERE = Path(__file__).parent
XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
COOKIE = "crmi_steward"
LOGIN_CSRF_COOKIE = "crmi_steward_login"
FLASH_COOKIE = "crmi_steward_flash"
HEADERS = {
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}
T = TypeVar("T")
MAX_UPLOAD = 20 * 1024 * 1024  # a filled queue export of 5,000 pairs is well under this


@dataclass
class Settings:
    """How the app runs: the core, the project's merge rules, cookies, the match API."""

    rules: Rules = field(default_factory=Rules)
    secure_cookies: bool = False  # set behind HTTPS: cookies only travel over TLS
    match_refresh_seconds: float = 10.0  # how often the duplicate-check index looks for changed customers
    trust_forwarded_for: bool = False  # behind a reverse proxy: the client address is X-Forwarded-For's first
    training_cache_seconds: float = 60.0  # the decision counts scan every decided pair: at most this often
    timezone: str = "UTC"  # project.yaml's ``timezone:``: pages show instants in it
    base_currency: str = "CNY"  # project.yaml's ``currencies.base``: held amounts are counted in it


class SecurityHeaders:
    """Adds the security headers (CSP, nosniff, no framing, no caching) to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on; add the headers to the response start."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope.get("path", "").startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS.items():
                    if not (static and name == "cache-control") and name not in headers:
                        headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


class Workbench:
    """The app's state: engine, settings, templates, the match service; and the page handlers."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        env.filters["money"] = lambda v: "" if v is None else f"{v:,.2f}"
        zone = ZoneInfo(settings.timezone)
        env.filters["stamp"] = lambda value: show_instant(value, zone)
        env.filters["pct"] = lambda v: "" if v is None else f"{float(v):.0%}"
        env.filters["label"] = field_label
        self.templates = Jinja2Templates(env=env)
        self.match = MatchService(engine, refresh_seconds=settings.match_refresh_seconds)
        self._training: tuple[float, Training] | None = None

    # ------------------------------------------------------------------ plumbing

    def client_ip(self, request: Request) -> str | None:
        """The caller's address (X-Forwarded-For's first hop only when configured to trust it)."""
        if self.settings.trust_forwarded_for and (forwarded := request.headers.get("x-forwarded-for")):
            return forwarded.split(",")[0].strip()[:64]
        return request.client.host[:64] if request.client else None

    async def db(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` in one transaction, in the thread pool."""

        def run() -> T:
            with self.engine.begin() as connection:
                return work(connection)

        return await run_in_threadpool(run)

    def render(
        self, request: Request, name: str, user: Principal | None, status: int = 200, **context: Any
    ) -> Response:
        """Render a template with the user, the CSRF token and a pending flash message."""
        flash = _read_flash(request)
        response = self.templates.TemplateResponse(
            request, name, {"user": user, "csrf": user.csrf_token if user else "", "flash": flash, **context},
            status_code=status,
        )  # fmt: skip
        if flash:
            response.delete_cookie(FLASH_COOKIE, path="/")
        return response

    def error(
        self,
        request: Request,
        user: Principal | None,
        status: int,
        message: str,
        *,
        retry_after: int | None = None,
    ) -> Response:
        """A refusal: an error page (the message is escaped like everything else), or the same as an RFC 7807
        problem to a caller asking for JSON (:func:`~integration.steward.api.wants_json`); ``retry_after``
        (seconds) is sent as ``Retry-After`` either way."""
        if wants_json(request):
            return problem(status, message, retry_after=retry_after)
        response = self.render(request, "error.html", user, status=status, message=message, code=status)
        if retry_after is not None:
            response.headers["retry-after"] = str(retry_after)
        return response

    def refused(self, request: Request, user: Principal | None, exc: StewardError) -> Response:
        """The answer to a :class:`StewardError`: its status, message and Retry-After (see :meth:`error`)."""
        return self.error(request, user, exc.status, str(exc), retry_after=exc.retry_after)

    def set_cookie(self, response: Response, name: str, value: str, *, max_age: int | None = None) -> None:
        """Set an HttpOnly, SameSite=Lax cookie (Secure behind HTTPS)."""
        response.set_cookie(name, value, max_age=max_age, path="/", httponly=True, samesite="lax",
                            secure=self.settings.secure_cookies)  # fmt: skip

    def redirect(self, url: str, flash: str | None = None, link: str | None = None) -> Response:
        """A 303 redirect, with a message for the next page."""
        response = RedirectResponse(url, status_code=303)
        if flash:
            payload = json.dumps({"text": flash, "link": link if _local(link) else None}, ensure_ascii=False)
            self.set_cookie(
                response, FLASH_COOKIE, base64.urlsafe_b64encode(payload.encode()).decode(), max_age=60
            )
        return response

    def _sign_in_first(self, request: Request) -> Response:
        """No session: a redirect to the sign-in page, or a 401 problem to a script (which has no use for it)."""
        if wants_json(request):
            idle = int(security.IDLE_TIMEOUT.total_seconds() // 60)
            return problem(401, f"no session, or it ended after {idle} idle minutes: sign in at /login and send "
                                "its session cookie")  # fmt: skip
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?{urlencode({'next': target})}", status_code=303)

    def page(
        self, role: str = "viewer"
    ) -> Callable[
        [Callable[[Request, Principal], Awaitable[Response]]], Callable[[Request], Awaitable[Response]]
    ]:
        """Wrap a handler: a session is required, the role checked, a POST's CSRF token verified."""

        def wrap(
            handler: Callable[[Request, Principal], Awaitable[Response]],
        ) -> Callable[[Request], Awaitable[Response]]:
            async def endpoint(request: Request) -> Response:
                token = request.cookies.get(COOKIE)
                user = await self.db(lambda c: security.session_user(c, token))
                if user is None:
                    response = self._sign_in_first(request)
                    if token:
                        response.delete_cookie(COOKIE, path="/")
                    return response
                form: FormData | None = None
                try:
                    if request.method == "POST":
                        form = await request.form(max_part_size=MAX_UPLOAD)
                        sent = form.get("csrf") or request.headers.get("x-csrf-token")
                        if not security.csrf_matches(user, sent if isinstance(sent, str) else None):
                            return self.error(request, user, 403, "the form's security token is missing or "
                                                                  "stale; reload the page and try again")  # fmt: skip
                        request.state.form = form
                    if not user.can(role):
                        return self.error(
                            request, user, 403, f"this needs the {role} role; you are a {user.role}"
                        )
                    return await handler(request, user)
                except StewardError as exc:
                    return self.refused(request, user, exc)
                except IntegrityError:
                    return self.error(
                        request, user, 409, "someone else changed this at the same moment; reload"
                    )
                except OperationalError as exc:
                    # SQLite's write lock held past the engine's busy timeout by another writer where a write
                    # takes no part in the core's run lock (a claim, a skip…): 423 as for the decisions, no 500
                    if self.engine.dialect.name != "sqlite" or "locked" not in str(exc):
                        raise
                    message = core_busy_message(
                        self.engine, "request", SQLITE_BUSY_MILLISECONDS / 1000, configurable=False
                    )
                    return self.error(request, user, CORE_BUSY, message, retry_after=CORE_BUSY_RETRY_AFTER)
                finally:
                    if form is not None:
                        await form.close()  # uploaded files are spooled to disk: remove them

            return endpoint

        return wrap

    def training(self, connection: Connection) -> Training:
        """The steward decision counts, read again at most every ``training_cache_seconds``."""
        cached = self._training
        if cached is None or cached[0] <= time.monotonic():
            cached = (time.monotonic() + self.settings.training_cache_seconds, training(connection))
            self._training = cached
        return cached[1]

    # ------------------------------------------------------------------ login

    async def login_form(self, request: Request) -> Response:
        """The sign-in page (its form carries a CSRF token paired with a cookie)."""
        token = secrets.token_urlsafe(32)
        response = self.render(request, "login.html", None, login_csrf=token,
                               next=_local_or(request.query_params.get("next"), "/queue"), message=None)  # fmt: skip
        self.set_cookie(response, LOGIN_CSRF_COOKIE, token, max_age=3600)
        return response

    async def login(self, request: Request) -> Response:
        """Check name and password; open a session; throttle repeated failures."""
        form = await request.form()
        expected = request.cookies.get(LOGIN_CSRF_COOKIE) or ""
        sent = str(form.get("csrf") or "")
        target = _local_or(str(form.get("next") or ""), "/queue")
        if not expected or not secrets.compare_digest(expected.encode(), sent.encode()):
            return self.error(request, None, 403, "the sign-in form's security token is missing or stale; "
                                                  "reload the page and sign in again")  # fmt: skip
        name, password = str(form.get("name") or "").strip(), str(form.get("password") or "")
        ip = self.client_ip(request)
        try:
            session_token = await self.db(lambda c: security.login(c, name, password, ip))
            if session_token is None:
                raise StewardError("wrong name or password, or the user is disabled", status=401)
        except StewardError as exc:
            if wants_json(request):
                return self.refused(request, None, exc)
            token = secrets.token_urlsafe(32)
            response = self.render(request, "login.html", None, status=exc.status, login_csrf=token, next=target,
                                   message=str(exc))  # fmt: skip
            if exc.retry_after is not None:
                response.headers["retry-after"] = str(exc.retry_after)
            self.set_cookie(response, LOGIN_CSRF_COOKIE, token, max_age=3600)
            return response
        response = RedirectResponse(target, status_code=303)
        self.set_cookie(response, COOKIE, session_token)
        response.delete_cookie(LOGIN_CSRF_COOKIE, path="/")
        return response

    async def logout(self, request: Request, user: Principal) -> Response:
        """End the session."""
        ip = self.client_ip(request)
        await self.db(lambda c: security.logout(c, user, ip))
        response = self.redirect("/login", "signed out")
        response.delete_cookie(COOKIE, path="/")
        return response

    # ------------------------------------------------------------------ queue

    async def home(self, request: Request) -> Response:
        """The queue is the start page."""
        return RedirectResponse("/queue", status_code=303)

    async def queue(self, request: Request, user: Principal) -> Response:
        """Pending pairs with filters, sort, pages and counts."""
        queue = QueueFilter.from_params(request.query_params)

        def read(connection: Connection) -> tuple[Any, list[str], list[str], Training]:
            page = queue_page(connection, queue, user.user_id)
            users = [
                u["name"] for u in security.list_users(connection) if u["active"] and u["role"] != "viewer"
            ]
            return page, source_systems(connection, queue.entity), users, self.training(connection)

        page, sources, users, trained = await self.db(read)
        classifier = trained.classifier(queue.entity, self.settings.rules.classifier)
        return self.render(request, "queue.html", user, page=page, q=queue, sources=sources, users=users,
                           bands=BANDS, sorts=SORTS, per_page=PER_PAGE, training=trained,
                           classifier=classifier)  # fmt: skip

    async def next_cluster(self, request: Request, user: Principal) -> Response:
        """Claim the first cluster of the filter nobody else holds and open it."""
        form: FormData = request.state.form
        query = str(form.get("queue") or "")
        queue = QueueFilter.from_params(_params(query))
        found = await self._claim_next(queue, user)
        if found is None:
            return self.redirect(f"/queue?{query}", "nothing left to review in this filter")
        return RedirectResponse(f"/cluster/{found}?{urlencode({'queue': query})}", status_code=303)

    async def _claim_next(
        self, queue: QueueFilter, user: Principal, exclude: int | None = None
    ) -> int | None:
        skipped = (*user.skipped, *((exclude,) if exclude else ()))
        for candidate_id in await self.db(lambda c: first_available(c, queue, user.user_id, skipped)):

            def take(connection: Connection, candidate_id: int = candidate_id) -> bool:
                try:
                    cluster = find_cluster(connection, candidate_id)
                    claim(connection, cluster.entity, cluster.claim_ids, user.user_id)
                except StewardError:
                    return False
                return True

            try:
                if await self.db(take):
                    return candidate_id
            except IntegrityError:
                continue  # another steward took it this instant: the next one
        return None

    async def export_sheet(self, request: Request, user: Principal) -> Response:
        """The queue filter's pending pairs as an .xlsx with a decision column."""
        queue = QueueFilter.from_params(request.query_params)
        content = await self.db(lambda c: export_queue(c, queue, user.user_id))
        name = f"steward-queue-{queue.entity}-{dt.date.today():%Y%m%d}.xlsx"
        return Response(
            content, media_type=XLSX, headers={"content-disposition": f'attachment; filename="{name}"'}
        )

    async def import_sheet(self, request: Request, user: Principal) -> Response:
        """Apply the decisions of a filled export: all of them, or none and the problems per row."""
        form: FormData = request.state.form
        upload = form.get("sheet")
        if upload is None or isinstance(upload, str):
            raise StewardError("choose the filled .xlsx to import")
        content = await upload.read()
        ip = self.client_ip(request)
        result = await run_in_threadpool(
            import_decisions, self.engine, content, user, self.settings.rules, ip
        )
        status = 422 if result.problems else 200
        return self.render(request, "import.html", user, status=status, result=result)

    # ------------------------------------------------------------------ cluster

    async def cluster(self, request: Request, user: Principal) -> Response:
        """The records of a cluster side by side, what differs, why they were paired, and the decision form."""
        candidate_id = int(request.path_params["candidate"])
        rules = self.settings.rules

        def read(connection: Connection) -> tuple[Any, list[str]]:
            view = build_view(connection, find_cluster(connection, candidate_id), rules.source_priority,
                              rules.survivorship or None)  # fmt: skip
            users = [
                u["name"] for u in security.list_users(connection) if u["active"] and u["role"] != "viewer"
            ]
            return view, users

        view, users = await self.db(read)
        holders = {h.name for h in view.holders.values()}
        mine = holders == {user.name}
        others = sorted(holders - {user.name})
        return self.render(request, "cluster.html", user, view=view, mine=mine, others=others, users=users,
                           queue_query=request.query_params.get("queue", ""), group_labels="ABCDEFGH")  # fmt: skip

    async def decide(self, request: Request, user: Principal) -> Response:
        """Apply a decision (same, different, split) to the cluster; then the next cluster or the golden record."""
        candidate_id = int(request.path_params["candidate"])
        form: FormData = request.state.form
        verdict = str(form.get("verdict") or "")
        if verdict not in ("same", "different", "split"):
            raise StewardError("choose same, different or split")
        chosen: dict[str, int] = {}
        labels: dict[int, str] = {}
        for key, value in form.multi_items():
            if key.startswith("field:") and verdict == "same":
                chosen[key[6:]] = _int(value, key)
            elif key.startswith("group:"):
                labels[_int(key[6:], key)] = str(value)[:8]
        ip = self.client_ip(request)
        fingerprint = str(form.get("fingerprint") or "") or None
        outcome = await run_in_threadpool(
            decide_cluster, self.engine, candidate_id, verdict, user, self.settings.rules,  # type: ignore[arg-type]
            fingerprint=fingerprint, labels=labels if verdict == "split" else None, chosen=_changed(chosen, form),
            ip=ip,
        )  # fmt: skip
        link = f"/records/{outcome.entity}/{outcome.survivors[0]}" if outcome.survivors else None
        text = {
            "same": f"merged {len(outcome.groups[0])} {outcome.entity}s into #{outcome.survivors[0] if outcome.survivors else ''}",
            "different": f"marked as different: {len(outcome.pairs)} pair(s) will not be proposed again",
            "split": f"split into {len(outcome.groups)} groups ({len(outcome.merges)} merge(s))",
        }[verdict]
        query = str(form.get("queue") or "")
        if form.get("then") == "next":
            found = await self._claim_next(QueueFilter.from_params(_params(query)), user)
            if found is not None:
                return self.redirect(f"/cluster/{found}?{urlencode({'queue': query})}", text, link)
            return self.redirect(f"/queue?{query}", f"{text}; nothing left to review in this filter", link)
        if link:
            return self.redirect(link, text)
        return self.redirect(f"/queue?{query}", text)

    async def skip(self, request: Request, user: Principal) -> Response:
        """Let go of the cluster without a decision and open the next one."""
        candidate_id = int(request.path_params["candidate"])
        form: FormData = request.state.form
        ip = self.client_ip(request)
        await run_in_threadpool(skip_cluster, self.engine, candidate_id, user, ip)
        await self.db(lambda c: security.remember_skip(c, user, candidate_id))
        query = str(form.get("queue") or "")
        found = await self._claim_next(QueueFilter.from_params(_params(query)), user, exclude=candidate_id)
        if found is None:
            return self.redirect(f"/queue?{query}", "skipped; nothing else left in this filter")
        return self.redirect(
            f"/cluster/{found}?{urlencode({'queue': query})}", f"skipped pair {candidate_id}"
        )

    async def claim_cluster(self, request: Request, user: Principal) -> Response:
        """Claim a cluster (a steward starts working on it)."""
        candidate_id = int(request.path_params["candidate"])
        ip = self.client_ip(request)

        def work(connection: Connection) -> None:
            cluster = find_cluster(connection, candidate_id)
            claim(connection, cluster.entity, cluster.claim_ids, user.user_id)
            record_event(connection, user.name, "claim", ip=ip, entity=cluster.entity,
                                  record_id=cluster.records[0], summary=f"claimed pair {candidate_id}")  # fmt: skip

        await self.db(work)
        return self.redirect(f"/cluster/{candidate_id}", "this cluster is yours for 30 minutes")

    async def release_cluster(self, request: Request, user: Principal) -> Response:
        """Let go of a cluster (admins release anybody's)."""
        candidate_id = int(request.path_params["candidate"])
        ip = self.client_ip(request)

        def work(connection: Connection) -> None:
            cluster = find_cluster(connection, candidate_id)
            release(
                connection, cluster.entity, cluster.claim_ids, None if user.can("admin") else user.user_id
            )
            record_event(connection, user.name, "release", ip=ip, entity=cluster.entity,
                                  record_id=cluster.records[0], summary=f"released pair {candidate_id}")  # fmt: skip

        await self.db(work)
        return self.redirect("/queue", f"released pair {candidate_id}")

    async def assign_cluster(self, request: Request, user: Principal) -> Response:
        """An admin gives a cluster to a steward (it stays theirs for a week or until decided)."""
        candidate_id = int(request.path_params["candidate"])
        form: FormData = request.state.form
        assignee = str(form.get("user") or "")
        ip = self.client_ip(request)

        def work(connection: Connection) -> None:
            users = {u["name"]: u for u in security.list_users(connection)}
            target = users.get(assignee)
            if target is None or not target["active"] or target["role"] == "viewer":
                raise StewardError(f"'{assignee}' is not an active steward or admin")
            cluster = find_cluster(connection, candidate_id)
            claim(
                connection,
                cluster.entity,
                cluster.claim_ids,
                target["id"],
                ttl=ASSIGN_TTL,
                assigned_by=user.name,
            )
            record_event(connection, user.name, "assign", ip=ip, entity=cluster.entity,
                                  record_id=cluster.records[0],
                                  summary=f"assigned pair {candidate_id} to {assignee}")  # fmt: skip

        await self.db(work)
        return self.redirect(f"/cluster/{candidate_id}", f"assigned to {assignee}")

    # ------------------------------------------------------------------ held names

    async def names(self, request: Request, user: Principal) -> Response:
        """The names source rows give for a customer that matched no single one, and the latest decisions."""
        found = await run_in_threadpool(held_names, self.engine)
        return self.render(request, "names.html", user, found=found, currency=self.settings.base_currency)

    async def decide_name(self, request: Request, user: Principal) -> Response:
        """Say which customer a held name means (a candidate or any id), or that it means none."""
        decision_id = int(request.path_params["decision"])
        form: FormData = request.state.form
        choice = str(form.get("customer") or "")
        if not choice:  # nothing is chosen for the steward: a weak first candidate is no default
            raise StewardError(
                "choose the customer the name means (a candidate or another id), or none of them"
            )
        if choice == "other":
            choice = str(form.get("other") or "").strip().lstrip("#")
            if not choice:
                raise StewardError("write the id of the customer the name means, or choose a candidate")
        customer = None if choice == "none" else _int(choice, "customer")
        decision = await run_in_threadpool(
            decide_held_name,
            self.engine,
            decision_id,
            customer,
            user,
            self.settings.rules,
            self.client_ip(request),
        )
        reference = f"r{decision_id} '{decision.name}'"
        if decision.target_id is None:
            return self.redirect(
                "/names", f"{reference}: no customer; its {decision.rows_held} held row(s) are rejected from the "
                "next run on"
            )  # fmt: skip
        return self.redirect(
            "/names",
            f"{reference} means customer #{decision.target_id}: its {decision.rows_held} held row(s) load on "
            "the next run",
            f"/records/customer/{decision.target_id}",
        )

    # ------------------------------------------------------------------ golden record

    async def record(self, request: Request, user: Principal) -> Response:
        """A golden record with its sources, keys, related rows and history."""
        entity = str(request.path_params["entity"])
        record_id = int(request.path_params["record"])
        view = await self.db(lambda c: golden_view(c, entity, record_id))
        undoable = {
            m["id"] for m in view.merges if m["undone_at"] is None and can_undo(user, m["decided_by"])
        }
        reopenable = {p["id"] for p in view.different if can_undo(user, p["decided_by"] or "linkage")}
        return self.render(request, "record.html", user, view=view, undoable=undoable, reopenable=reopenable)

    async def reopen_pair(self, request: Request, user: Principal) -> Response:
        """Reverse a "different" decision from the golden record page: the pair waits in the queue again."""
        candidate_id = int(request.path_params["candidate"])
        form: FormData = request.state.form
        ip = self.client_ip(request)
        pair = await run_in_threadpool(reopen, self.engine, candidate_id, user, ip)
        back = _int(str(form.get("back") or pair.left_id), "back")
        return self.redirect(
            f"/records/{pair.entity}/{back}",
            f"reopened pair {candidate_id}: it is back in the review queue",
        )

    async def undo_merge(self, request: Request, user: Principal) -> Response:
        """Undo one merge from the golden record page."""
        merge_id = int(request.path_params["merge"])
        ip = self.client_ip(request)
        log = await run_in_threadpool(undo, self.engine, merge_id, user, ip)
        return self.redirect(
            f"/records/{log.entity}/{log.survivor_id}",
            f"undid merge {merge_id}: {log.entity} #{log.merged_id} is separate again and the pair will not be "
            "proposed again",
        )

    # ------------------------------------------------------------------ admin

    async def audit(self, request: Request, user: Principal) -> Response:
        """The audit log, newest first (admins)."""
        params = request.query_params
        actor = (params.get("actor") or "").strip()[:64] or None
        action = (params.get("action") or "").strip()[:32] or None
        page = max(1, _int(params.get("page") or "1", "page"))
        found = await self.db(lambda c: audit_page(c, actor=actor, action=action, page=page))
        pages = max(1, -(-found.total // 50))
        return self.render(request, "audit.html", user, found=found, actor=actor or "", action=action or "",
                           page=page, pages=pages)  # fmt: skip

    async def users(self, request: Request, user: Principal) -> Response:
        """Users and their roles (admins)."""
        found = await self.db(security.list_users)
        return self.render(request, "users.html", user, users=found, roles=ROLES)

    async def users_post(self, request: Request, user: Principal) -> Response:
        """Add a user, change a role, disable, enable, or set a new password (admins)."""
        form: FormData = request.state.form
        action = str(form.get("action") or "")
        name = str(form.get("name") or "").strip()
        password = str(form.get("password") or "")
        role = str(form.get("role") or "")
        if name == user.name and action in ("disable", "role"):
            raise StewardError("you cannot disable yourself or change your own role; ask another admin")

        def work(connection: Connection) -> str:
            if action == "add":
                security.add_user(connection, name, role, password, actor=user.name)
                return f"added {role} '{name}'"
            if action == "role":
                security.set_role(connection, name, role, actor=user.name)
                return f"'{name}' is now {role}"
            if action in ("disable", "enable"):
                security.set_active(connection, name, action == "enable", actor=user.name)
                return f"{action}d '{name}'"
            if action == "reset":
                security.reset_password(connection, name, password, actor=user.name)
                return f"new password set for '{name}'"
            raise StewardError(f"unknown action '{action}'")

        done = await self.db(work)
        return self.redirect("/users", done)

    async def health(self, request: Request) -> Response:
        """Liveness: the app answers and the core is reachable."""
        await self.db(lambda c: c.exec_driver_sql("SELECT 1").scalar())
        return JSONResponse({"ok": True})

    # ------------------------------------------------------------------ wiring

    def routes(self) -> list[Any]:
        """Every route of the workbench."""
        page = self.page
        # The core's run lock: the routes that write core records, merges or pair decisions (decide, undo,
        # reopen, import) hold it shared for their write (``decisions.holding_the_core``) and answer 423 with
        # the holder while a `crmi run`, rollback… holds the core, nothing written. Claim, skip, release,
        # assign, sign-in and users write only the workbench's own tables, which no run journals or rolls
        # back, so they take no lock and go on during a run; reading pages takes none either.
        return [
            Route("/", self.home),
            Route("/healthz", self.health),
            Route("/login", self.login_form, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", page()(self.logout), methods=["POST"]),
            Route("/queue", page()(self.queue)),
            Route("/queue/next", page("steward")(self.next_cluster), methods=["POST"]),
            Route("/queue/export.xlsx", page("steward")(self.export_sheet), methods=["GET"]),
            Route("/queue/import", page("steward")(self.import_sheet), methods=["POST"]),
            Route("/cluster/{candidate:int}", page()(self.cluster)),
            Route("/cluster/{candidate:int}/decide", page("steward")(self.decide), methods=["POST"]),
            Route("/cluster/{candidate:int}/skip", page("steward")(self.skip), methods=["POST"]),
            Route("/cluster/{candidate:int}/claim", page("steward")(self.claim_cluster), methods=["POST"]),
            Route(
                "/cluster/{candidate:int}/release", page("steward")(self.release_cluster), methods=["POST"]
            ),
            Route("/cluster/{candidate:int}/assign", page("admin")(self.assign_cluster), methods=["POST"]),
            Route("/names", page()(self.names)),
            Route("/names/{decision:int}/decide", page("steward")(self.decide_name), methods=["POST"]),
            Route("/records/{entity:str}/{record:int}", page()(self.record)),
            Route("/merges/{merge:int}/undo", page("steward")(self.undo_merge), methods=["POST"]),
            Route("/pairs/{candidate:int}/reopen", page("steward")(self.reopen_pair), methods=["POST"]),
            Route("/audit", page("admin")(self.audit)),
            Route("/users", page("admin")(self.users), methods=["GET"]),
            Route("/users", page("admin")(self.users_post), methods=["POST"]),
            *api_routes(self.match),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]


def create_app(
    engine: Engine, settings: Settings | None = None, *, start_match_refresh: bool = False
) -> Starlette:
    """Build the workbench on a core engine (schema already current: see ``crm_core.db.ensure_schema``).

    ``start_match_refresh``: keep the duplicate-check index in memory and refresh it in the background
    (``crmi steward serve`` does; tests refresh it by hand).
    """
    workbench = Workbench(engine, settings or Settings())
    if engine.dialect.name == "postgresql":
        event.listen(engine, "connect", _no_jit)

    async def not_found(request: Request, exc: Exception) -> Response:
        return workbench.error(request, None, 404, "no such page")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> Any:
        if start_match_refresh:
            workbench.match.start()
            # The address parser loads its division tables on first use (a second or two): not on the
            # first cluster page a steward opens.
            threading.Thread(target=_warm_up, name="steward-warm-up", daemon=True).start()
        try:
            yield
        finally:
            workbench.match.stop()

    app = Starlette(routes=workbench.routes(), exception_handlers={404: not_found}, lifespan=lifespan)
    app.state.workbench = workbench
    app.add_middleware(SecurityHeaders)
    return app


# --------------------------------------------------------------------------- helpers


def _warm_up() -> None:
    from integration.dedup.customers import linkage_rows

    linkage_rows([{"name": "深圳市腾达科技有限公司", "address": "广东省深圳市南山区科技园"}])


def _no_jit(dbapi_connection: Any, _record: Any) -> None:
    """PostgreSQL's JIT compiles the queue's statements for tens of milliseconds each (their cost estimate
    crosses ``jit_above_cost``) to save less than that: the workbench's connections go without it."""
    cursor = dbapi_connection.cursor()
    cursor.execute("SET jit = off")
    cursor.close()
    dbapi_connection.commit()


def _local(url: str | None) -> bool:
    """A path on this site (never another host: no open redirects)."""
    return bool(url) and str(url).startswith("/") and not str(url).startswith("//") and "\\" not in str(url)


def _local_or(url: str | None, default: str) -> str:
    return str(url) if _local(url) else default


def _read_flash(request: Request) -> dict[str, Any] | None:
    raw = request.cookies.get(FLASH_COOKIE)
    if not raw:
        return None
    try:
        found = json.loads(base64.urlsafe_b64decode(raw.encode()).decode())
    except ValueError:
        return None
    if not isinstance(found, dict) or not isinstance(found.get("text"), str):
        return None
    return {"text": found["text"][:500], "link": found.get("link") if _local(found.get("link")) else None}


def _params(query: str) -> Mapping[str, str]:
    return dict(parse_qsl(query[:2000]))


def _int(value: Any, what: str) -> int:
    try:
        return int(str(value))
    except ValueError:
        raise StewardError(f"{what} must be a number") from None


def _changed(chosen: Mapping[str, int], form: FormData) -> dict[str, int]:
    """The field choices that differ from the page's defaults (hidden ``default:<field>`` inputs)."""
    return {
        name: record
        for name, record in chosen.items()
        if str(form.get(f"default:{name}") or "") != str(record)
    }


def app_from_environment() -> Starlette:
    """An app from ``CRM_CORE_URL`` and ``CRM_PROJECT`` (for ``uvicorn --factory``)."""
    from integration.steward.cli import build_app

    return build_app(os.environ.get("CRM_CORE_URL"), os.environ.get("CRM_PROJECT"))
