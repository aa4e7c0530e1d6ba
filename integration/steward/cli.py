"""``crmi steward``: serve the workbench, manage its users and the duplicate-check API's tokens.

Registered in ``integration/cli.py`` as ``app.add_typer(steward_app, name="steward")``; also runnable
as ``python -m integration.steward`` (what ``make steward`` does).
"""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from crm_core.errors import ConfigError, CrmError
from integration.yamlconf import show_instant

if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine
    from starlette.applications import Starlette

steward_app = typer.Typer(
    help="The steward workbench: review and decide duplicates in a browser; users; duplicate-check API tokens.",
    no_args_is_help=True,
)
users_app = typer.Typer(help="Workbench users: add, list, disable, enable, reset a password, change a role.",
                        no_args_is_help=True)  # fmt: skip
tokens_app = typer.Typer(help="Tokens of the duplicate-check API (商机报备 forms).", no_args_is_help=True)
steward_app.add_typer(users_app, name="users")
steward_app.add_typer(users_app, name="user", hidden=True)  # `crmi steward user add` reads naturally too
steward_app.add_typer(tokens_app, name="tokens")

console = Console()
errors = Console(stderr=True, soft_wrap=True)
CoreOption = Annotated[
    str | None, typer.Option("--core-url", help="core database URL (default: $CRM_CORE_URL)")
]
ProjectOption = Annotated[
    Path | None,
    typer.Option(
        "--project", "-p", help="project folder for the merge rules (default: $CRM_PROJECT or examples/demo)"
    ),
]


def _actor() -> str:
    """Who ran a command, for the audit log."""
    try:
        return f"cli:{getpass.getuser()}"[:64]
    except Exception:  # no login name (a container): still audited
        return "cli"


def _fail(message: str) -> typer.Exit:
    errors.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    return typer.Exit(1)


def build_app(
    core: str | None,
    project: str | Path | None,
    *,
    secure_cookies: bool = False,
    trust_forwarded_for: bool = False,
    refresh_seconds: float = 10.0,
    start_match_refresh: bool = True,
) -> Starlette:
    """The workbench on the core at ``core`` with the merge rules of ``project`` (schema checked first)."""
    import integration.mappings  # noqa: F401  (before integration.project: their imports are circular)
    from integration.project import load_project
    from integration.steward.app import Settings, create_app
    from integration.steward.decisions import Rules

    spec = load_project(Path(project) if project else None).spec
    rules = spec.dedup.get("customer")
    settings = Settings(
        rules=Rules(
            project=spec.name,
            source_priority=tuple(rules.source_priority) if rules else (),
            survivorship=dict(rules.survivorship) if rules else {},
            classifier=rules.linkage.classifier if rules and rules.linkage else "auto",
        ),
        secure_cookies=secure_cookies,
        trust_forwarded_for=trust_forwarded_for,
        match_refresh_seconds=refresh_seconds,
        timezone=spec.timezone,
        base_currency=spec.currencies.base if spec.currencies is not None else "CNY",
    )
    return create_app(core_engine(core), settings, start_match_refresh=start_match_refresh)


DEFAULT_PORT = 8765  # the demo's test servers: U8 on 8766, K3Cloud on 8767, so all three run at once


@steward_app.command("serve")
def serve(
    core: CoreOption = None,
    project: ProjectOption = None,
    host: Annotated[str, typer.Option("--host", help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="port to listen on")] = DEFAULT_PORT,
    secure_cookies: Annotated[
        bool, typer.Option("--secure-cookies", help="behind HTTPS: cookies travel over TLS only")
    ] = False,
    trust_forwarded_for: Annotated[
        bool,
        typer.Option("--trust-forwarded-for", help="behind a reverse proxy: audit X-Forwarded-For's address"),
    ] = False,
    refresh: Annotated[
        float, typer.Option("--refresh", help="seconds between refreshes of the duplicate-check index")
    ] = 10.0,
    workers: Annotated[
        int,
        typer.Option(
            "--workers", min=1, help="server processes sharing one duplicate-check index (Linux/macOS)"
        ),
    ] = 1,
) -> None:
    """Serve the workbench (queue, clusters, golden records, audit, duplicate-check API)."""
    import uvicorn

    try:
        app = build_app(core, project, secure_cookies=secure_cookies, trust_forwarded_for=trust_forwarded_for,
                        refresh_seconds=refresh)  # fmt: skip
    except ConfigError as exc:
        errors.print(exc.render(), markup=False, highlight=False)
        raise typer.Exit(1) from None
    except CrmError as exc:
        raise _fail(str(exc)) from None
    if workers > 1:
        from integration.steward.serving import fork_workers, listen, stop_workers

        sock = listen(host, port)
        console.print(f"building the duplicate-check index, then {workers} server processes share it")
        pids = fork_workers(app, sock, workers, log_level="info")
        console.print(f"steward workbench on http://{host}:{port}/ (Ctrl+C stops it)")
        try:
            for pid in pids:
                os.waitpid(pid, 0)
        except KeyboardInterrupt:
            pass
        finally:
            stop_workers(pids)
        return
    console.print(f"steward workbench on http://{host}:{port}/ (Ctrl+C stops it)")
    uvicorn.run(app, host=host, port=port, log_level="info", server_header=False)


def core_engine(core: str | None) -> Engine:
    """An engine on the core whose schema is current (an empty database gets it; another revision is refused)."""
    from crm_core.db import ensure_schema, make_engine

    engine = make_engine(core)
    try:
        ensure_schema(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine


def _with_core(core: str | None) -> Engine:
    try:
        return core_engine(core)
    except CrmError as exc:
        raise _fail(str(exc)) from None


def _password(stdin: bool) -> str:
    if stdin:
        return sys.stdin.readline().rstrip("\n")
    return str(typer.prompt("password", hide_input=True, confirmation_prompt=True))


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="sign-in name")],
    role: Annotated[str, typer.Option("--role", help="viewer, steward or admin")] = "steward",
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="read the password from stdin instead of a prompt")
    ] = False,
    core: CoreOption = None,
) -> None:
    """Add a user (the password is asked twice, or read from stdin)."""
    from integration.steward import security
    from integration.steward.errors import StewardError

    engine = _with_core(core)
    try:
        with engine.begin() as connection:
            security.add_user(connection, name, role, _password(password_stdin), actor=_actor())
    except StewardError as exc:
        raise _fail(str(exc)) from None
    finally:
        engine.dispose()
    console.print(f"added {role} '{escape(name)}'")


@users_app.command("list")
def users_list(core: CoreOption = None) -> None:
    """List users: name, role, active."""
    from integration.steward import security

    engine = _with_core(core)
    try:
        with engine.connect() as connection:
            found = security.list_users(connection)
    finally:
        engine.dispose()
    table = Table(title=f"Workbench users ({len(found)})")
    for column in ("name", "role", "active", "created"):
        table.add_column(column)
    for user in found:
        table.add_row(
            escape(user["name"]),
            user["role"],
            "yes" if user["active"] else "no",
            show_instant(user["created_at"]),
        )
    console.print(table)


def _change(core: str | None, done: str, change: Callable[[Connection], None]) -> None:
    from integration.steward.errors import StewardError

    engine = _with_core(core)
    try:
        with engine.begin() as connection:
            change(connection)
    except StewardError as exc:
        raise _fail(str(exc)) from None
    finally:
        engine.dispose()
    console.print(done)


@users_app.command("disable")
def users_disable(name: Annotated[str, typer.Argument()], core: CoreOption = None) -> None:
    """Disable a user: their sessions end and they cannot sign in."""
    from integration.steward import security

    _change(core, f"disabled '{escape(name)}'", lambda c: security.set_active(c, name, False, actor=_actor()))


@users_app.command("enable")
def users_enable(name: Annotated[str, typer.Argument()], core: CoreOption = None) -> None:
    """Enable a disabled user again."""
    from integration.steward import security

    _change(core, f"enabled '{escape(name)}'", lambda c: security.set_active(c, name, True, actor=_actor()))


@users_app.command("reset")
def users_reset(
    name: Annotated[str, typer.Argument()],
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="read the password from stdin")
    ] = False,
    core: CoreOption = None,
) -> None:
    """Set a new password (the user's sessions end)."""
    from integration.steward import security

    password = _password(password_stdin)
    _change(core, f"new password set for '{escape(name)}'",
            lambda c: security.reset_password(c, name, password, actor=_actor()))  # fmt: skip


@users_app.command("role")
def users_role(
    name: Annotated[str, typer.Argument()],
    role: Annotated[str, typer.Argument(help="viewer, steward or admin")],
    core: CoreOption = None,
) -> None:
    """Change a user's role."""
    from integration.steward import security

    _change(
        core, f"'{escape(name)}' is now {role}", lambda c: security.set_role(c, name, role, actor=_actor())
    )


@tokens_app.command("add")
def tokens_add(
    name: Annotated[str, typer.Argument(help="who uses it, e.g. the CRM form: crm-opportunity-form")],
    core: CoreOption = None,
) -> None:
    """Create an API token; it is printed once (only its hash is stored)."""
    from integration.steward import security
    from integration.steward.errors import StewardError

    engine = _with_core(core)
    try:
        with engine.begin() as connection:
            token = security.add_token(connection, name, actor=_actor())
    except StewardError as exc:
        raise _fail(str(exc)) from None
    finally:
        engine.dispose()
    errors.print(f"API token '{escape(name)}' (shown once; send it as 'Authorization: Bearer <token>'):")
    sys.stdout.write(token + "\n")


@tokens_app.command("revoke")
def tokens_revoke(name: Annotated[str, typer.Argument()], core: CoreOption = None) -> None:
    """Revoke an API token (refused within 30 seconds everywhere)."""
    from integration.steward import security

    _change(
        core, f"revoked API token '{escape(name)}'", lambda c: security.revoke_token(c, name, actor=_actor())
    )
