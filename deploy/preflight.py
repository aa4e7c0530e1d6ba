"""Checks before the Dagster webserver or daemon starts, and their health once they run (docs/deploy.md).

``python deploy/preflight.py``           settings and databases: each problem on one line, naming the
                                         environment variable or file to fix; exit 1 if any.
``python deploy/preflight.py --wait 120``  after the webserver started: wait until it answers /server_info.
``python deploy/preflight.py --health``  the webserver answers and every daemon sends heartbeats.

The systemd units run the first as ExecStartPre and the second as ExecStartPost; the health timer runs the
third. Passwords are never printed: URLs are shown without them and they are cut out of driver errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DAGSTER_FILE = "dagster.yaml"
CONNECT_TIMEOUT = 5
# The webserver as seen from this machine (CRMI_DAGSTER_UI_URL is how the chat readers reach it).
DEFAULT_UI = f"http://127.0.0.1:{os.environ.get('DAGSTER_WEBSERVER_PORT', '3000')}"


@dataclass(frozen=True)
class EnvRef:
    """A setting of a YAML file that Dagster reads from an environment variable (``{env: NAME}``)."""

    variable: str
    setting: str


def env_refs(node: Any, path: str = "") -> Iterator[EnvRef]:
    """Yield every ``{env: NAME}`` of a loaded YAML document with the dotted path of its setting."""
    if isinstance(node, Mapping):
        if set(node) == {"env"} and isinstance(node["env"], str):
            yield EnvRef(node["env"], path)
            return
        for key, value in node.items():
            yield from env_refs(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from env_refs(value, f"{path}[{index}]")


def _scrub(text: str, *secrets: str) -> str:
    """Return the first line of ``text`` with every secret replaced by ``***``."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    for secret in secrets:
        if secret:
            line = line.replace(secret, "***")
    return line


def check_dagster_yaml(home: Path) -> tuple[list[str], dict[str, Any]]:
    """Return the problems of ``$DAGSTER_HOME/dagster.yaml`` (schema, unset variables) and the file's content."""
    path = home / DAGSTER_FILE
    if not path.is_file():
        return [f"{path} is missing: copy deploy/dagster.yaml there (DAGSTER_HOME={home})"], {}
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        return [f"{path} is not valid YAML: {_scrub(str(exc))}"], {}
    problems = [
        f"{ref.variable} is not set ({path}: {ref.setting}); add it to the env file of the services"
        for ref in env_refs(document)
        if ref.variable not in os.environ
    ]
    from dagster._core.instance.config import dagster_instance_config  # noqa: TID251 (Dagster's own schema)

    try:
        dagster_instance_config(str(home))
    except Exception as exc:  # DagsterInvalidConfigError and its relatives: the message names the setting
        errors = getattr(exc, "errors", None) or []
        details = "; ".join(str(getattr(e, "message", e)) for e in errors) or _scrub(str(exc))
        problems.append(f"{path} does not match Dagster's instance schema: {details}")
    return problems, document


def _storage_settings(document: Mapping[str, Any]) -> dict[str, tuple[str, str]] | None:
    """Return the storage database settings as ``{name: (value, where it comes from)}``, or None."""
    pg = (document.get("storage") or {}).get("postgres")
    if not isinstance(pg, Mapping) or not isinstance(pg.get("postgres_db"), Mapping):
        return None
    out: dict[str, tuple[str, str]] = {}
    for key, value in pg["postgres_db"].items():
        if isinstance(value, Mapping) and "env" in value:
            out[key] = (os.environ.get(value["env"], ""), str(value["env"]))
        else:
            out[key] = (str(value), f"storage.postgres.postgres_db.{key}")
    return out


def check_storage(document: Mapping[str, Any]) -> list[str]:
    """Return why Dagster's storage database cannot be reached, naming the settings behind it."""
    settings = _storage_settings(document)
    if settings is None:
        return []  # not the production layout (postgres_url, sqlite): Dagster reports its own errors
    import psycopg

    def value(key: str, default: str = "") -> str:
        return settings.get(key, (default, ""))[0] or default

    host, port, db, user = value("hostname"), value("port", "5432"), value("db_name"), value("username")
    password = value("password")
    names = ", ".join(settings[k][1] for k in ("hostname", "port", "db_name", "username") if k in settings)
    where = f"postgresql://{user}@{host}:{port}/{db}"
    try:
        with psycopg.connect(
            host=host, port=port, dbname=db, user=user, password=password, connect_timeout=CONNECT_TIMEOUT
        ):
            pass
    except Exception as exc:
        return [
            f"Dagster storage: cannot connect to {where} (settings: {names}): {_scrub(str(exc), password)}"
        ]
    return []


def check_core() -> list[str]:
    """Return why the CRM core named by ``$CRM_CORE_URL`` cannot be used by the runs."""
    from sqlalchemy.engine import make_url

    from crm_core.db import current_revision, head_revision, make_engine, redact_url

    url = os.environ.get("CRM_CORE_URL", "")
    if not url:
        return ["CRM_CORE_URL is not set: the runs would write a SQLite file under the working directory"]
    try:
        parsed = make_url(url)
    except Exception:
        return [f"CRM_CORE_URL is not a database URL: {redact_url(url)}"]
    password = parsed.password or ""
    args = {"connect_timeout": CONNECT_TIMEOUT} if parsed.get_backend_name() == "postgresql" else {}
    engine = make_engine(url, connect_args=args)
    try:
        current = current_revision(engine)
    except Exception as exc:
        cause = getattr(exc, "orig", None) or exc
        return [f"CRM_CORE_URL: cannot connect to {redact_url(url)}: {_scrub(str(cause), str(password))}"]
    finally:
        engine.dispose()
    if current is None:  # the runs' parallel steps must not race to create it
        return [
            f"CRM_CORE_URL: the core at {redact_url(url)} has no schema yet: run `crmi core upgrade` once"
        ]
    if current != head_revision():
        return [
            f"CRM_CORE_URL: the core at {redact_url(url)} is at schema {current}: run `crmi core upgrade`"
        ]
    return []


def check_folders() -> list[str]:
    """Return problems with the project folder and the working directory of the runs."""
    problems = []
    project = os.environ.get("CRM_PROJECT", "")
    if not project:
        problems.append("CRM_PROJECT is not set: the engagement's project folder (with project.yaml)")
    elif not Path(project).is_absolute():
        problems.append(
            f"CRM_PROJECT={project} must be an absolute path (the services' working directory differs)"
        )
    elif not (Path(project) / "project.yaml").is_file():
        problems.append(f"CRM_PROJECT={project}: no project.yaml there")
    work = os.environ.get("CRMI_WORK_DIR", "")
    if not work:
        problems.append("CRMI_WORK_DIR is not set: the folder where runs write var/reports and var/trial")
    elif not Path(work).is_dir() or not os.access(work, os.W_OK):
        problems.append(f"CRMI_WORK_DIR={work} is not a folder this user can write to")
    return problems


def preflight() -> list[str]:
    """Return every problem that would keep the webserver, the daemon or the runs from working."""
    home = os.environ.get("DAGSTER_HOME", "")
    if not home:
        return ["DAGSTER_HOME is not set: the folder that holds dagster.yaml"]
    problems, document = check_dagster_yaml(Path(home))
    if not problems:
        problems += check_storage(document)
    return problems + check_folders() + check_core()


def _get(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read()
        return body


def wait_for_webserver(ui: str, seconds: float) -> str | None:
    """Poll ``/server_info`` until it answers; return None, or why it did not within ``seconds``."""
    deadline = time.monotonic() + seconds
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            info = json.loads(_get(f"{ui}/server_info", timeout=5))
            if "dagster_version" in info:
                return None
        except (OSError, ValueError) as exc:
            last = _scrub(str(exc))
        time.sleep(1)
    return f"the Dagster webserver did not answer {ui}/server_info within {seconds:.0f} s: {last}"


DAEMON_HEALTH = "{ instance { daemonHealth { allDaemonStatuses { daemonType required healthy } } } }"


def health(ui: str) -> list[str]:
    """Return what is unhealthy: the webserver not answering, or a required daemon without heartbeats."""
    waited = wait_for_webserver(ui, 10)
    if waited:
        return [waited]
    request = urllib.request.Request(
        f"{ui}/graphql",
        data=json.dumps({"query": DAEMON_HEALTH}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            statuses = json.loads(response.read())["data"]["instance"]["daemonHealth"]["allDaemonStatuses"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"the Dagster webserver at {ui} did not report daemon health: {_scrub(str(exc))}"]
    sick = [s["daemonType"] for s in statuses if s["required"] and not s["healthy"]]
    if sick:
        return [
            f"dagster-daemon is not healthy ({', '.join(sick)} sent no recent heartbeat): systemctl status crm-integration-daemon"
        ]
    return []


def main(argv: list[str] | None = None) -> int:
    """Run the checks the arguments ask for; print one line per problem; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--wait", type=float, metavar="SECONDS", help="wait for the webserver to answer")
    parser.add_argument("--health", action="store_true", help="the webserver answers and the daemon runs")
    parser.add_argument("--ui", default=DEFAULT_UI, help=f"the webserver's URL (default {DEFAULT_UI})")
    args = parser.parse_args(argv)
    ui = args.ui.rstrip("/")
    if args.wait is not None:
        problem = wait_for_webserver(ui, args.wait)
        problems = [problem] if problem else []
    elif args.health:
        problems = health(ui)
    else:
        problems = preflight()
    for line in problems:
        print(f"crm-integration: {line}", file=sys.stderr)
    if not problems:
        print("crm-integration: " + ("healthy" if args.health else "ready" if args.wait else "settings ok"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
