"""Checks before the Dagster webserver or daemon starts, and their health once they run (docs/deploy.md).

``python deploy/preflight.py``           settings and databases: each problem on one line, naming the
                                         environment variable or file to fix; exit 1 if any.
``python deploy/preflight.py --wait 120``  after the webserver started: wait until it answers /server_info.
``python deploy/preflight.py --health``  the webserver answers and every daemon sent a heartbeat within
                                         the tolerance (DAGSTER_DAEMON_HEARTBEAT_TOLERANCE, default 300 s).

Without ``--ui`` the webserver is the one the deployment configures: DAGSTER_WEBSERVER_HOST/PORT from the
environment, else from the services' env file (``--env-file``, default /etc/crm-integration/dagster.env,
else deploy/dagster.env).

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
# The services' env files: systemd's EnvironmentFile, then compose's env_file (docs/deploy.md).
ENV_FILES = (Path("/etc/crm-integration/dagster.env"), Path(__file__).with_name("dagster.env"))
# Dagster calls a daemon healthy for 30 minutes after its last heartbeat (it sends one every 30 s); the
# health timer runs every 5 minutes and must restart a dead or hung daemon well before that.
TOLERANCE_ENV = "DAGSTER_DAEMON_HEARTBEAT_TOLERANCE"  # dagster-daemon's own setting of the same name
DEFAULT_HEARTBEAT_TOLERANCE = 300
DEPLOYMENT_SETTINGS = ("DAGSTER_WEBSERVER_HOST", "DAGSTER_WEBSERVER_PORT", TOLERANCE_ENV)


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


def read_env_file(path: Path) -> dict[str, str]:
    """Return the ``NAME=value`` lines of a systemd/compose env file (comments and blank lines skipped)."""
    values: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and not name.startswith("#"):
            values[name.strip()] = value.strip().strip('"').strip("'")
    return values


def deployment_settings(env_file: Path | None, environ: Mapping[str, str]) -> dict[str, str]:
    """Return the webserver address and heartbeat tolerance settings: the environment, else the env file."""
    from_file = read_env_file(env_file) if env_file is not None and env_file.is_file() else {}
    return {
        name: environ.get(name) or from_file.get(name, "")
        for name in DEPLOYMENT_SETTINGS
        if environ.get(name) or from_file.get(name)
    }


def webserver_url(settings: Mapping[str, str]) -> str:
    """Return the URL this machine reaches the webserver at, from DAGSTER_WEBSERVER_HOST/PORT."""
    host = settings.get("DAGSTER_WEBSERVER_HOST", "") or "127.0.0.1"
    if host in ("0.0.0.0", "::", "[::]"):  # listens everywhere: reach it locally
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{settings.get('DAGSTER_WEBSERVER_PORT', '') or '3000'}"


def heartbeat_tolerance(settings: Mapping[str, str]) -> float:
    """Return the seconds a daemon may go without a heartbeat (DAGSTER_DAEMON_HEARTBEAT_TOLERANCE, else 300)."""
    try:
        value = float(settings.get(TOLERANCE_ENV, ""))
    except ValueError:
        return DEFAULT_HEARTBEAT_TOLERANCE
    return value if value > 0 else DEFAULT_HEARTBEAT_TOLERANCE


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


DAEMON_HEALTH = (
    "{ instance { daemonHealth { allDaemonStatuses { daemonType required healthy lastHeartbeatTime } } } }"
)


def daemon_problems(statuses: list[dict[str, Any]], now: float, tolerance: float) -> list[str]:
    """Return why the daemon is unhealthy: a required daemon Dagster calls unhealthy, or silent too long."""
    sick = []
    for status in statuses:
        if not status["required"]:
            continue
        last = status.get("lastHeartbeatTime")
        if last is None:
            sick.append(f"{status['daemonType']}: no heartbeat")
        elif now - last > tolerance:
            sick.append(f"{status['daemonType']}: last heartbeat {now - last:.0f} s ago")
        elif not status["healthy"]:
            sick.append(f"{status['daemonType']}: unhealthy")
    if not sick:
        return []
    return [
        f"dagster-daemon is not healthy ({'; '.join(sick)}; tolerance {tolerance:.0f} s, {TOLERANCE_ENV}): "
        "systemctl status crm-integration-daemon"
    ]


def health(ui: str, tolerance: float = DEFAULT_HEARTBEAT_TOLERANCE) -> list[str]:
    """Return what is unhealthy: the webserver not answering, or a required daemon without recent heartbeats."""
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
    return daemon_problems(statuses, time.time(), tolerance)


def main(argv: list[str] | None = None) -> int:
    """Run the checks the arguments ask for; print one line per problem; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--wait", type=float, metavar="SECONDS", help="wait for the webserver to answer")
    parser.add_argument("--health", action="store_true", help="the webserver answers and the daemon runs")
    parser.add_argument(
        "--ui", help="the webserver's URL (default: DAGSTER_WEBSERVER_HOST/PORT, see --env-file)"
    )
    parser.add_argument(
        "--env-file",
        type=Path,
        help="the services' env file that --ui and the tolerance default to "
        f"(default: the first of {', '.join(map(str, ENV_FILES))} that exists)",
    )
    parser.add_argument(
        "--heartbeat-tolerance",
        type=float,
        metavar="SECONDS",
        help=f"--health: a daemon is dead after this long without a heartbeat (default: {TOLERANCE_ENV}, "
        f"else {DEFAULT_HEARTBEAT_TOLERANCE})",
    )
    args = parser.parse_args(argv)
    env_file = args.env_file or next((p for p in ENV_FILES if p.is_file()), None)
    try:
        settings = deployment_settings(env_file, os.environ)
    except OSError as exc:  # e.g. the env file is root:crmi 0640 and this user is neither
        print(f"crm-integration: cannot read {env_file}: {exc.strerror}; pass --ui", file=sys.stderr)
        settings = deployment_settings(None, os.environ)
    ui = (args.ui or webserver_url(settings)).rstrip("/")
    tolerance = args.heartbeat_tolerance or heartbeat_tolerance(settings)
    if args.wait is not None:
        problem = wait_for_webserver(ui, args.wait)
        problems = [problem] if problem else []
    elif args.health:
        problems = health(ui, tolerance)
    else:
        problems = preflight()
    for line in problems:
        print(f"crm-integration: {line}", file=sys.stderr)
    if not problems:
        print("crm-integration: " + ("healthy" if args.health else "ready" if args.wait else "settings ok"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
