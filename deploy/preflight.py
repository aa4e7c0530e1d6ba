"""Checks before the Dagster webserver or daemon starts, and their health once they run (docs/deploy.md).

``python deploy/preflight.py``           settings and databases: each problem on one line, naming the
                                         environment variable or file to fix; exit 1 if any.
``python deploy/preflight.py --wait 120``  after the webserver started: wait until it answers /server_info.
``python deploy/preflight.py --health``  the webserver answers and loads its code locations, every daemon
                                         sent a heartbeat within the tolerance
                                         (DAGSTER_DAEMON_HEARTBEAT_TOLERANCE, default 300 s), and every code
                                         server the workspace names (the finance project's) answers;
                                         exit 1, or 3 when only such a code server is down or
                                         serves a location that does not load.

Without ``--ui`` the webserver is the one the deployment configures: DAGSTER_WEBSERVER_HOST/PORT from the
environment, else from the services' env file (``--env-file``, default /etc/crm-integration/dagster.env,
else deploy/dagster.env). The code servers are the ``grpc_server`` locations of the workspace files the
installed webserver and daemon units load (their ``-w``; ``--workspace`` to name one), else of
deploy/workspace.yaml, which has none: a deployment without a second project expects no code server.

The systemd units run the first as ExecStartPre and the second as ExecStartPost; the health timer runs the
third. Passwords are never printed: URLs are shown without them and they are cut out of driver errors.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
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
# Where docs/deploy.md installs the units; the webserver's and the daemon's `-w` name the workspace they load
# (deploy/workspace.finance.yaml once a second project is set up).
UNITS_DIR = Path("/etc/systemd/system")
WORKSPACE_UNITS = ("crm-integration-webserver.service", "crm-integration-daemon.service")
DEFAULT_WORKSPACE = Path(__file__).with_name("workspace.yaml")
SHIPPED_UNITS_DIR = Path(__file__).with_name("systemd")
CODE_SERVER_TIMEOUT = 10
# `--health` exit code when only a code server of its own (the finance one) is down or serves a location that
# does not load: crm-integration-restart.service then leaves the webserver and the daemon alone (restarting
# them would not cure it and would interrupt the first project's runs).
EXIT_CODE_SERVERS = 3


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


WORKSPACE_LOCATIONS = (
    "{ workspaceOrError { __typename ... on Workspace { locationEntries { name "
    "locationOrLoadError { __typename ... on PythonError { message causes { message } } } } } } }"
)


@dataclass(frozen=True)
class CodeServer:
    """A ``grpc_server`` location of a workspace file: a code server the webserver and the daemon need."""

    location: str
    host: str
    port: int
    workspace: Path


def _unit_exec_start(path: Path) -> list[str]:
    """Return the arguments of a unit file's ``ExecStart=`` line (none if the file has none)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key.strip() == "ExecStart":
            return shlex.split(value.strip().lstrip("-@+!:"))
    return []


def _workspace_argument(args: Sequence[str]) -> str | None:
    """Return the value of ``-w`` / ``--workspace`` in a command line, or None."""
    for index, arg in enumerate(args):
        if arg in ("-w", "--workspace") and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith("--workspace="):
            return arg.partition("=")[2]
    return None


def expected_workspaces() -> list[Path]:
    """Return the workspace files the installed webserver and daemon units load (``-w``), else
    deploy/workspace.yaml (no unit installed: compose, a laptop)."""
    found: list[Path] = []
    for name in WORKSPACE_UNITS:
        unit = UNITS_DIR / name
        try:
            argument = _workspace_argument(_unit_exec_start(unit)) if unit.is_file() else None
        except (OSError, ValueError):  # unreadable, or a line shlex cannot split: systemd says so itself
            argument = None
        if argument and Path(argument) not in found:
            found.append(Path(argument))
    return found or [DEFAULT_WORKSPACE]


def _setting(value: Any, environ: Mapping[str, str]) -> str:
    """Return a workspace setting's value, ``{env: NAME}`` read from the environment ("" if unset)."""
    if isinstance(value, Mapping) and set(value) == {"env"}:
        return environ.get(str(value["env"]), "")
    return "" if value is None else str(value)


def code_servers(
    workspaces: Iterable[Path], environ: Mapping[str, str] | None = None
) -> tuple[list[CodeServer], list[str]]:
    """Return the ``grpc_server`` locations of the workspace files, and why a file could not be read."""
    env = os.environ if environ is None else environ
    servers: list[CodeServer] = []
    problems: list[str] = []
    for workspace in workspaces:
        named_by = [n for n in WORKSPACE_UNITS if _names_workspace(UNITS_DIR / n, workspace)]
        by = f" (named by {', '.join(str(UNITS_DIR / n) for n in named_by)})" if named_by else ""
        try:
            document = yaml.safe_load(workspace.read_text(encoding="utf-8")) or {}
        except OSError as exc:
            problems.append(f"cannot read the workspace {workspace}{by}: {exc.strerror}; the webserver and "
                            "the daemon cannot start with it: install it, or fix their -w")  # fmt: skip
            continue
        except yaml.YAMLError as exc:
            problems.append(f"the workspace {workspace}{by} is not valid YAML: {_scrub(str(exc))}")
            continue
        entries = document.get("load_from") if isinstance(document, Mapping) else None
        for entry in entries if isinstance(entries, list) else []:
            grpc = entry.get("grpc_server") if isinstance(entry, Mapping) else None
            if not isinstance(grpc, Mapping):
                continue
            location = _setting(grpc.get("location_name"), env)
            host = _setting(grpc.get("host"), env) or "localhost"
            port = _setting(grpc.get("port"), env)
            name = location or f"{host}:{port}"
            if not port.isdigit():
                problems.append(f"the workspace {workspace}: location {name} has no port (port: {port or '?'}): "
                                "set it, or the variable it names")  # fmt: skip
                continue
            servers.append(CodeServer(name, host, int(port), workspace))
    return servers, problems


def _names_workspace(unit: Path, workspace: Path) -> bool:
    try:
        return unit.is_file() and _workspace_argument(_unit_exec_start(unit)) == str(workspace)
    except (OSError, ValueError):
        return False


def serving_unit(location: str) -> str | None:
    """Return the name of the unit whose ``dagster code-server start`` serves ``location`` (installed
    units first, then deploy/systemd), or None."""
    for folder in (UNITS_DIR, SHIPPED_UNITS_DIR):
        try:
            units = sorted(folder.glob("crm-integration-*.service"))
        except OSError:
            continue
        for unit in units:
            try:
                args = _unit_exec_start(unit)
            except (OSError, ValueError):
                continue
            if "code-server" in args and _option(args, "--location-name") == location:
                return unit.stem
    return None


def _option(args: Sequence[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args[:-1] else None


def code_server_problem(server: CodeServer, timeout: float = CODE_SERVER_TIMEOUT) -> str | None:
    """Return why ``server`` does not answer a ping (with what to do), or None when it answers."""
    import grpc
    from dagster._grpc.client import DagsterGrpcClient  # noqa: TID251 (Dagster's own client of its servers)

    address = f"{server.host}:{server.port}"
    try:
        # Nothing listening fails here at once; gRPC itself would keep trying until its timeout.
        socket.create_connection((server.host, server.port), timeout=timeout).close()
    except OSError as exc:
        why = f"cannot connect ({exc.strerror or type(exc).__name__})"
    else:
        channel = grpc.insecure_channel(address)
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)  # a hung process: no 60 s ping
            DagsterGrpcClient(port=server.port, host=server.host).ping("crm-integration health")
            return None
        except grpc.FutureTimeoutError:
            why = f"no gRPC answer within {timeout:.0f} s"
        except Exception as exc:  # DagsterUserCodeUnreachableError and its causes: the first line says which
            why = _scrub(str(exc)) or type(exc).__name__
        finally:
            channel.close()
    unit = serving_unit(server.location)
    todo = (
        f"systemctl status {unit}, journalctl -u {unit}; systemctl restart {unit}"
        if unit
        else f"start its code server (dagster code-server start -h {server.host} -p {server.port} "
        f"--location-name {server.location} …)"
    )
    return (
        f"the code server of location {server.location} ({address}, {server.workspace}) does not answer: "
        f"{why}; its jobs, schedules and sensors are down: {todo}"
    )


def location_problems(entries: Sequence[Mapping[str, Any]], skip: Iterable[str] = ()) -> dict[str, str]:
    """Return a line per code location the webserver could not load, by location (``skip``: already said)."""
    from crm_core.errors import mask_secrets

    problems = {}
    for entry in entries:
        error = entry.get("locationOrLoadError") or {}
        if error.get("__typename") != "PythonError" or entry["name"] in skip:
            continue
        # Dagster's own message is "Error occurred during the loading of Dagster definitions in": the last
        # cause is the project's own error (a ConfigError naming the file, a database that does not answer).
        causes = [c.get("message", "") for c in error.get("causes") or [] if isinstance(c, Mapping)]
        why = mask_secrets(_scrub(causes[-1] if causes else error.get("message", "")))
        unit = serving_unit(entry["name"])
        todo = (
            f"journalctl -u {unit}, fix what it says, then systemctl restart {unit}"
            if unit  # its own code server loads the code: the finance project's
            else "journalctl -u crm-integration-webserver, fix what it says, then reload it "
            "(Deployment → Code locations) or systemctl restart crm-integration-webserver"
        )
        problems[entry["name"]] = f"the webserver cannot load code location {entry['name']}: {why}; {todo}"
    return problems


def _graphql(ui: str, query: str) -> Any:
    request = urllib.request.Request(
        f"{ui}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["data"]


@dataclass(frozen=True)
class Health:
    """What ``--health`` found: problems a restart of the webserver and the daemon may cure (``services``), and
    those of code servers with units of their own (``code_servers``: not answering, or serving a location that
    does not load), which that restart would not cure."""

    services: list[str]
    code_servers: list[str]

    def lines(self) -> list[str]:
        """Return every problem, the services' first."""
        return [*self.services, *self.code_servers]

    def exit_code(self) -> int:
        """Return 0 healthy, 1 the webserver or daemon is unhealthy, 3 only a code server of its own is."""
        return 1 if self.services else EXIT_CODE_SERVERS if self.code_servers else 0


def health_report(
    ui: str, tolerance: float = DEFAULT_HEARTBEAT_TOLERANCE, workspaces: Sequence[Path] = ()
) -> Health:
    """Check the webserver (answers, loads its code locations), the daemons' heartbeats and the code servers of
    ``workspaces`` (each answers a ping); return what is unhealthy."""
    servers, down_lines = code_servers(workspaces)
    down = []
    for server in servers:
        problem = code_server_problem(server)
        if problem:
            down_lines.append(problem)
            down.append(server.location)
    waited = wait_for_webserver(ui, 10)
    if waited:
        return Health([waited], down_lines)
    try:
        statuses = _graphql(ui, DAEMON_HEALTH)["instance"]["daemonHealth"]["allDaemonStatuses"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return Health(
            [f"the Dagster webserver at {ui} did not report daemon health: {_scrub(str(exc))}"], down_lines
        )
    problems = daemon_problems(statuses, time.time(), tolerance)
    try:
        entries = _graphql(ui, WORKSPACE_LOCATIONS)["workspaceOrError"].get("locationEntries")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        problems.append(f"the Dagster webserver at {ui} did not list its code locations: {_scrub(str(exc))}")
    else:  # a location whose code server is down is said once, above
        served = {server.location for server in servers}
        for location, line in location_problems(entries or [], skip=down).items():
            # A code server of its own that loads a broken project (the finance one) answers pings and shows
            # the error: restarting the webserver and the daemon would not cure it.
            (down_lines if location in served else problems).append(line)
    return Health(problems, down_lines)


def health(
    ui: str, tolerance: float = DEFAULT_HEARTBEAT_TOLERANCE, workspaces: Sequence[Path] = ()
) -> list[str]:
    """Return what is unhealthy: the webserver not answering or not loading a code location, a required
    daemon without recent heartbeats, a code server of ``workspaces`` not answering."""
    return health_report(ui, tolerance, workspaces).lines()


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
    parser.add_argument(
        "--workspace",
        type=Path,
        action="append",
        help="--health: a workspace file whose code servers must answer (repeatable; default: the -w of the "
        f"installed {' and '.join(WORKSPACE_UNITS)} in {UNITS_DIR}, else {DEFAULT_WORKSPACE.name})",
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
        report = health_report(ui, tolerance, args.workspace or expected_workspaces())
        problems = report.lines()
    else:
        problems = preflight()
    for line in problems:
        print(f"crm-integration: {line}", file=sys.stderr)
    if not problems:
        print("crm-integration: " + ("healthy" if args.health else "ready" if args.wait else "settings ok"))
    if args.health:
        return report.exit_code()
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
