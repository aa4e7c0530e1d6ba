"""The production deployment of deploy/ with real processes (docs/deploy.md).

``dagster-webserver`` and ``dagster-daemon run`` start as subprocesses on an instance whose dagster.yaml is
deploy/dagster.yaml (only the daemon's intervals shortened) with its storage in a private PostgreSQL
database, and load deploy/workspace.yaml's code location (the demo project, a private PostgreSQL core) plus
tests/deploy_location.py (a gated job, a one-minute schedule and a one-second sensor). Everything is
driven and observed through the webserver's GraphQL API, as the UI does.

The whole scenario is one test: the processes take most of the time, and one deployment per xdist worker
is what two cores can afford.
"""

from __future__ import annotations

import configparser
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
import sqlalchemy as sa
import yaml

from tests.conftest import PG_DATABASE, PG_URL, REPO, server_or_skip
from tests.deploy_location import ALL_GATES, GATES_ENV, SCHEDULE, SENSOR
from tests.servers.webhook_receiver import Receiver, closed_port_url, serve

DEPLOY = REPO / "deploy"
BIN = Path(sys.executable).parent  # the venv's dagster-webserver and dagster-daemon
LOCATION = "crm_integration"
TEST_LOCATION = "deploy_test"
REPOSITORY = "__repository__"
STARTUP = 120.0  # webserver answering and both code locations loaded
RUN_DEADLINE = 300.0  # the migration through the multiprocess executor on two busy cores
SHORT = 120.0  # a small run through the queue (a run worker process starts for each)
IN_PROGRESS = {"STARTING", "STARTED"}
FORKSERVER: dict[str, Any] = {"execution": {"config": {"multiprocess": {"start_method": {"forkserver": {}}}}}}
T = TypeVar("T")


def _free_port() -> int:
    """Return a port that was free a moment ago (dagster-webserver does not take port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _fresh_database(name: str) -> str:
    """Drop and create database ``name`` on the test server; return its URL."""
    admin = sa.create_engine(sa.make_url(PG_URL).set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return sa.make_url(PG_URL).set(database=name).render_as_string(hide_password=False)


def render_instance(home: Path) -> dict[str, Any]:
    """Write deploy/dagster.yaml into ``home`` with only the daemon's polling intervals shortened."""
    config: dict[str, Any] = yaml.safe_load((DEPLOY / "dagster.yaml").read_text(encoding="utf-8"))
    config["run_coordinator"]["config"]["dequeue_interval_seconds"] = 1
    config["run_monitoring"]["poll_interval_seconds"] = 5
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return config


def render_workspace(path: Path) -> None:
    """Write deploy/workspace.yaml plus the test-only code location to ``path``."""
    workspace: dict[str, Any] = yaml.safe_load((DEPLOY / "workspace.yaml").read_text(encoding="utf-8"))
    workspace["load_from"].append(
        {
            "python_module": {
                "module_name": "tests.deploy_location",
                "working_directory": {"env": "CRMI_WORK_DIR"},
                "location_name": TEST_LOCATION,
            }
        }
    )
    path.write_text(yaml.safe_dump(workspace, sort_keys=False), encoding="utf-8")


@dataclass
class Deployment:
    """The running webserver and daemon, their settings, and what the test planted."""

    url: str
    env: dict[str, str]
    home: Path
    work: Path
    gates: Path
    storage_url: str
    core_url: str
    secrets: list[str]
    receiver: Receiver
    logs: list[Path]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def tail(self) -> str:
        """Return the end of the processes' output, for a failure message."""
        parts = []
        for log in self.logs:
            text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
            parts.append(f"--- {log.name} ---\n{text[-3000:]}")
        return "\n".join(parts)

    def until(self, what: str, probe: Callable[[], T | None], timeout: float) -> T:
        """Poll ``probe`` until it returns something truthy; fail with the processes' output at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            value = probe()
            if value:
                return value
            for name, process in self.processes.items():
                if process.poll() is not None:
                    pytest.fail(
                        f"{name} exited ({process.returncode}) while waiting for {what}\n{self.tail()}"
                    )
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {timeout:.0f} s\n{self.tail()}")
            time.sleep(0.25)

    def graphql(self, query: str, **variables: Any) -> dict[str, Any]:
        """Run a GraphQL query against the webserver and return its data."""
        response = requests.post(
            f"{self.url}/graphql", json={"query": query, "variables": variables}, timeout=60
        )
        response.raise_for_status()
        body = response.json()
        assert "errors" not in body, body["errors"]
        data: dict[str, Any] = body["data"]
        return data

    def launch(
        self, job: str, location: str = LOCATION, tags: dict[str, str] | None = None, config: Any = None
    ) -> str:
        """Submit a run as the UI's Launchpad does; return its id."""
        params = {
            "selector": {"repositoryLocationName": location, "repositoryName": REPOSITORY, "jobName": job},
            "runConfigData": config or {},
            "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in (tags or {}).items()]},
        }
        result = self.graphql(LAUNCH, params=params)["launchRun"]
        assert result["__typename"] == "LaunchRunSuccess", result
        run_id: str = result["run"]["runId"]
        return run_id

    def run(self, run_id: str) -> dict[str, Any]:
        """Return a run's status, job, tags and run config as GraphQL reports them."""
        run: dict[str, Any] = self.graphql(RUN, id=run_id)["runOrError"]
        assert run["__typename"] == "Run", run
        return run

    def status(self, run_id: str) -> str:
        """Return a run's status."""
        status: str = self.run(run_id)["status"]
        return status

    def wait_status(self, run_id: str, wanted: set[str], timeout: float = SHORT) -> str:
        """Wait until a run reaches one of ``wanted``; fail early when it ends otherwise."""
        ended = {"SUCCESS", "FAILURE", "CANCELED"}

        def probe() -> str | None:
            status = self.status(run_id)
            if status not in wanted and status in ended:
                pytest.fail(
                    f"run {run_id} ended {status}, expected {wanted}:\n{self.failure_text(run_id)}\n{self.tail()}"
                )
            return status if status in wanted else None

        return self.until(f"run {run_id} in {sorted(wanted)}", probe, timeout)

    def events(self, run_id: str) -> list[dict[str, Any]]:
        """Return every event of a run's event log, through GraphQL."""
        events: list[dict[str, Any]] = []
        cursor = None
        while True:
            page = self.graphql(LOGS, id=run_id, cursor=cursor)["logsForRun"]
            assert page["__typename"] == "EventConnection", page
            events += page["events"]
            cursor = page["cursor"]
            if not page["hasMore"]:
                return events

    def failure_text(self, run_id: str) -> str:
        """Return the error messages of a run, for a failure message."""
        return "\n".join(e.get("message", "") for e in self.events(run_id) if e.get("level") == "ERROR")[
            -4000:
        ]

    def open_gate(self, run_id: str) -> None:
        """Let the gated run ``run_id`` end."""
        (self.gates / run_id).touch()


LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on PythonError { message stack }
    ... on Error { message }
  }
}"""
RUN = """
query Run($id: ID!) {
  runOrError(runId: $id) {
    __typename
    ... on Run { runId status jobName runConfigYaml tags { key value } }
  }
}"""
LOGS = """
query Logs($id: ID!, $cursor: String) {
  logsForRun(runId: $id, afterCursor: $cursor, limit: 1000) {
    __typename
    ... on EventConnection {
      cursor hasMore
      events {
        __typename
        ... on MessageEvent { message level stepKey eventType }
        ... on MaterializationEvent { assetKey { path } metadataEntries { label } }
        ... on AssetCheckEvaluationEvent { evaluation { checkName success severity assetKey { path } } }
      }
    }
  }
}"""
RUNS = """
query Runs($filter: RunsFilter) {
  runsOrError(filter: $filter) { ... on Runs { results { runId status jobName runConfigYaml tags { key value } } } }
}"""
ASSETS = """
query Assets($job: PipelineSelector!) {
  assetNodes(pipeline: $job) {
    assetKey { path }
    assetChecksOrError { ... on AssetChecks { checks { name } } }
  }
}"""
LOCATIONS = """
{ workspaceOrError { ... on Workspace { locationEntries {
    name loadStatus
    locationOrLoadError { __typename ... on PythonError { message } }
} } } }"""
TICKS = """
query Ticks($selector: SensorSelector!, $statuses: [InstigationTickStatus!]) {
  sensorOrError(sensorSelector: $selector) {
    __typename
    ... on Sensor { sensorState { status ticks(limit: 5, statuses: $statuses) { status runIds } } }
  }
}"""
SCHEDULE_TICKS = """
query Ticks($selector: ScheduleSelector!, $statuses: [InstigationTickStatus!]) {
  scheduleOrError(scheduleSelector: $selector) {
    __typename
    ... on Schedule { scheduleState { status ticks(limit: 5, statuses: $statuses) { status runIds } } }
  }
}"""
EXPOSED = """
query Exposed($core: ResourceSelector!, $job: PipelineSelector!) {
  instance { info }
  topLevelResourceDetailsOrError(resourceSelector: $core) {
    __typename ... on ResourceDetails { configuredValues { key value type } }
  }
  runConfigSchemaOrError(selector: $job) { __typename ... on RunConfigSchema { rootDefaultYaml } }
}"""


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each process group (webserver, daemon, their code servers and run workers), then SIGKILL."""
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):  # what is left of the group (run workers, code servers)
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture
def deployment(tmp_path: Path, demo_project: Path) -> Iterator[Deployment]:
    """Start dagster-webserver and dagster-daemon as the systemd units do, on private PostgreSQL databases."""
    server_or_skip(PG_URL, "PostgreSQL").dispose()
    storage_url = _fresh_database(f"{PG_DATABASE}_dagster")
    core_db = f"{PG_DATABASE}_deploycore"
    _fresh_database(core_db)
    # The server trusts local connections, so any password works: plant secrets where passwords go.
    core_secret, storage_secret, hook_secret = (
        f"planted-{what}-{uuid.uuid4().hex}" for what in ("core", "pg", "hook")
    )
    core_url = (
        sa.make_url(PG_URL).set(database=core_db, password=core_secret).render_as_string(hide_password=False)
    )
    storage = sa.make_url(storage_url)
    home, work, gates = tmp_path / "dagster_home", tmp_path / "work", tmp_path / "gates"
    for folder in (work, gates):
        folder.mkdir()
    render_instance(home)
    render_workspace(tmp_path / "workspace.yaml")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with serve() as receiver:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("CRM", "DAGSTER", "CRMI"))},
            "DAGSTER_HOME": str(home),
            "DAGSTER_PG_HOST": storage.host or "127.0.0.1",
            "DAGSTER_PG_PORT": str(storage.port or 5432),
            "DAGSTER_PG_DB": storage.database or "",
            "DAGSTER_PG_USER": storage.username or "postgres",
            "DAGSTER_PG_PASSWORD": storage_secret,
            "DAGSTER_WEBSERVER_PORT": str(port),
            "CRM_PROJECT": str(demo_project),
            "CRM_CORE_URL": core_url,
            "CRMI_WORK_DIR": str(work),
            "CRMI_ALERT_WEBHOOK_URL": f"{receiver.url}/hook?key={hook_secret}",
            "CRMI_ALERT_WEBHOOK_FORMAT": "json",
            "CRMI_DAGSTER_UI_URL": url,
            GATES_ENV: str(gates),
            "PYTHONPATH": str(REPO),
        }
        # As docs/deploy.md says: the core schema is created once, before the services start.
        upgrade = subprocess.run(
            [str(BIN / "crmi"), "core", "upgrade"],
            env=env,
            cwd=work,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert upgrade.returncode == 0, upgrade.stderr
        preflight = subprocess.run(
            [sys.executable, str(DEPLOY / "preflight.py")],
            env=env,
            cwd=work,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert preflight.returncode == 0, preflight.stderr
        logs = [tmp_path / "webserver.log", tmp_path / "daemon.log"]
        deployment = Deployment(
            url=url, env=env, home=home, work=work, gates=gates, storage_url=storage_url, core_url=core_url,
            secrets=[core_secret, storage_secret, hook_secret], receiver=receiver, logs=logs,
        )  # fmt: skip
        workspace = str(tmp_path / "workspace.yaml")
        commands = {
            "dagster-webserver": ["-h", "127.0.0.1", "-p", str(port), "-w", workspace],
            "dagster-daemon": ["run", "-w", workspace],
        }
        try:
            for (name, args), log in zip(commands.items(), logs, strict=True):
                with log.open("wb") as out:
                    deployment.processes[name] = subprocess.Popen(
                        [str(BIN / name), *args], env=env, cwd=work, stdout=out, stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )  # fmt: skip
            deployment.until("answer from /server_info", lambda: _server_info(url), STARTUP)
            deployment.until("both code locations loaded", lambda: _locations_loaded(deployment), STARTUP)
            yield deployment
        finally:
            (gates / ALL_GATES).touch()  # whatever still waits ends by itself
            _stop(list(deployment.processes.values()))


def _server_info(url: str) -> dict[str, Any] | None:
    try:
        response = requests.get(f"{url}/server_info", timeout=5)
    except requests.ConnectionError:
        return None
    info: dict[str, Any] = response.json() if response.ok else {}
    return info if "dagster_version" in info else None


def _locations_loaded(deployment: Deployment) -> bool:
    entries = deployment.graphql(LOCATIONS)["workspaceOrError"]["locationEntries"]
    for entry in entries:
        if entry["locationOrLoadError"] and entry["locationOrLoadError"]["__typename"] == "PythonError":
            pytest.fail(
                f"code location {entry['name']} did not load: {entry['locationOrLoadError']['message']}"
            )
    return {e["name"] for e in entries if e["loadStatus"] == "LOADED"} == {LOCATION, TEST_LOCATION}


def _tag(run: dict[str, Any], key: str) -> str | None:
    return next((t["value"] for t in run["tags"] if t["key"] == key), None)


def _storage_text(storage_url: str) -> str:
    """Return everything in Dagster's storage database as text, compressed snapshots unpacked."""
    engine = sa.create_engine(storage_url)
    chunks: list[str] = []
    with engine.connect() as connection:
        for table in sa.inspect(connection).get_table_names():
            for row in connection.execute(sa.text(f'SELECT * FROM "{table}"')):
                for value in row:
                    if isinstance(value, bytes | memoryview):
                        raw = bytes(value)
                        with contextlib.suppress(zlib.error):
                            raw = zlib.decompress(raw)
                        chunks.append(raw.decode("utf-8", errors="replace"))
                    else:
                        chunks.append(str(value))
    engine.dispose()
    return "\n".join(chunks)


def _files_text(*roots: Path) -> Iterator[tuple[Path, bytes]]:
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                yield path, path.read_bytes()


def test_the_deploy_files_pass_dagsters_own_schemas(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dagster.yaml, the run coordinator's config and workspace.yaml load with Dagster's schemas; no literal secret."""
    from dagster._config import validate_config
    from dagster._core.instance.config import dagster_instance_config
    from dagster._core.run_coordinator import QueuedRunCoordinator
    from dagster._core.workspace.config_schema import process_workspace_config

    shutil.copy(DEPLOY / "dagster.yaml", tmp_path / "dagster.yaml")
    config, _ = dagster_instance_config(str(tmp_path))
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert validate_config(QueuedRunCoordinator.config_type(), config["run_coordinator"]["config"]).success
    database = config["storage"]["postgres"]["postgres_db"]
    assert {k: v for k, v in database.items() if k != "scheme"} == {
        "hostname": {"env": "DAGSTER_PG_HOST"},
        "port": {"env": "DAGSTER_PG_PORT"},
        "db_name": {"env": "DAGSTER_PG_DB"},
        "username": {"env": "DAGSTER_PG_USER"},
        "password": {"env": "DAGSTER_PG_PASSWORD"},
    }
    limits = {limit["key"]: limit for limit in config["concurrency"]["runs"]["tag_concurrency_limits"]}
    for key in ("crmi/core", "crmi/sync-target"):
        assert limits[key] == {"key": key, "value": {"applyLimitPerUniqueValue": True}, "limit": 1}
    assert config["run_retries"] == {"enabled": True, "max_retries": 2, "retry_on_asset_or_op_failure": False}
    assert config["run_monitoring"]["enabled"] is True
    assert config["telemetry"] == {"enabled": False}
    assert config["retention"]["sensor"]["purge_after_days"]["skipped"] > 0

    monkeypatch.setenv("CRMI_WORK_DIR", str(tmp_path))
    workspace = yaml.safe_load((DEPLOY / "workspace.yaml").read_text(encoding="utf-8"))
    processed = process_workspace_config(workspace)
    assert processed.success, processed.errors
    target = processed.value["load_from"][0]["python_module"]  # type: ignore[index]
    assert target["module_name"] == "integration.definitions"
    assert target["working_directory"] == str(tmp_path)


def test_compose_runs_the_same_files_with_health_checks_and_no_secrets() -> None:
    """compose.yaml: PostgreSQL, webserver and daemon with health checks; secrets only from the env file."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    services = compose["services"]
    for name in ("postgres", "webserver", "daemon"):
        assert services[name]["healthcheck"]["test"], name
    for name in ("webserver", "daemon", "setup"):
        assert services[name]["env_file"] == ["dagster.env"]
        assert "/opt/crm-integration/deploy/workspace.yaml" in services[name]["command"] or name == "setup"
    assert services["daemon"]["healthcheck"]["test"] == ["CMD", "dagster-daemon", "liveness-check"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${DAGSTER_PG_PASSWORD")
    environment = [v for s in services.values() for v in (s.get("environment") or {}).values()]
    assert not [v for v in environment if "://" in str(v) and "@" in str(v)], (
        "a URL with credentials in compose.yaml"
    )
    example = (DEPLOY / "dagster.env.example").read_text(encoding="utf-8")
    names = {line.split("=", 1)[0].lstrip("# ") for line in example.splitlines() if "=" in line}
    assert {
        "DAGSTER_PG_HOST",
        "DAGSTER_PG_PASSWORD",
        "CRM_CORE_URL",
        "CRM_PROJECT",
        "CRMI_ALERT_WEBHOOK_URL",
    } <= names


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / "systemd" / name, encoding="utf-8")
    return parser


def test_the_systemd_units_restart_check_and_read_secrets_from_the_env_file(tmp_path: Path) -> None:
    """Both services: restart policy, EnvironmentFile, preflight before start; the webserver waits until it answers."""
    for name in ("crm-integration-webserver.service", "crm-integration-daemon.service"):
        service = _unit(name)["Service"]
        assert service["Restart"] in {"always", "on-failure"}, name
        assert service["EnvironmentFile"] == "/etc/crm-integration/dagster.env"
        assert service["ExecStartPre"].endswith("deploy/preflight.py")
        assert "deploy/workspace.yaml" in service["ExecStart"]
    assert _unit("crm-integration-webserver.service")["Service"]["ExecStartPost"].endswith(
        "preflight.py --wait 150"
    )
    assert "--health" in _unit("crm-integration-health.service")["Service"]["ExecStart"]
    assert _unit("crm-integration-health.service")["Unit"]["OnFailure"] == "crm-integration-restart.service"
    assert "prune_runs.py" in _unit("crm-integration-prune.service")["Service"]["ExecStart"]
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: the units were parsed, not verified")
    # Verified as installed: the paths of docs/deploy.md pointed at this checkout and its venv.
    for unit in (DEPLOY / "systemd").iterdir():
        text = unit.read_text(encoding="utf-8")
        text = text.replace("/opt/crm-integration/.venv", sys.prefix).replace(
            "/opt/crm-integration", str(REPO)
        )
        (tmp_path / unit.name).write_text(text, encoding="utf-8")
    result = subprocess.run(
        [analyze, "verify", *sorted(str(p) for p in tmp_path.iterdir())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    problems = [
        line for line in result.stderr.splitlines()
        if "crm-integration" in line and "User" not in line and "Group" not in line
    ]  # fmt: skip
    assert not problems, result.stderr


def _preflight(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DEPLOY / "preflight.py")],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_preflight_names_the_setting_behind_an_unreachable_storage_and_hides_the_password(
    tmp_path: Path, demo_project: Path
) -> None:
    """A dagster.yaml pointing at a PostgreSQL that does not answer: one line naming the settings, no password."""
    home = tmp_path / "home"
    render_instance(home)
    password = f"planted-{uuid.uuid4().hex}"
    port = sa.make_url(closed_port_url()).port
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CRM", "DAGSTER"))},
        "DAGSTER_HOME": str(home),
        "DAGSTER_PG_HOST": "127.0.0.1",
        "DAGSTER_PG_PORT": str(port),
        "DAGSTER_PG_DB": "dagster",
        "DAGSTER_PG_USER": "dagster",
        "DAGSTER_PG_PASSWORD": password,
        "CRM_PROJECT": str(demo_project),
        "CRM_CORE_URL": f"sqlite:///{tmp_path / 'core.sqlite'}",
        "CRMI_WORK_DIR": str(tmp_path),
        "PYTHONPATH": str(REPO),
    }
    result = _preflight(env, tmp_path)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    storage = [line for line in lines if "Dagster storage" in line]
    assert len(storage) == 1, result.stderr
    assert f"postgresql://dagster@127.0.0.1:{port}/dagster" in storage[0]
    assert "DAGSTER_PG_HOST, DAGSTER_PG_PORT, DAGSTER_PG_DB, DAGSTER_PG_USER" in storage[0]
    # The core is an empty SQLite file: the schema must be made before the services start.
    assert any("CRM_CORE_URL" in line and "crmi core upgrade" in line for line in lines), result.stderr
    assert password not in result.stdout + result.stderr

    del env["DAGSTER_PG_DB"]
    env["CRM_PROJECT"] = "relative/project"
    result = _preflight(env, tmp_path)
    assert result.returncode == 1
    assert "DAGSTER_PG_DB is not set" in result.stderr
    assert "storage.postgres.postgres_db.db_name" in result.stderr
    assert "CRM_PROJECT=relative/project must be an absolute path" in result.stderr


@pytest.mark.slow
@pytest.mark.postgres
def test_the_production_instance_queues_runs_fires_automations_and_keeps_secrets(
    deployment: Deployment,
) -> None:
    """Migration through the queue and the multiprocess executor, concurrency limits, schedule, sensor, alert,
    no planted secret anywhere, health check and run pruning."""
    d = deployment
    # (c) The run queue: one run per sync target and per core database. The first gated run holds both
    # tags; two more wait behind it, while the migration (neither tag), submitted after them, starts.
    first = d.launch("gated", TEST_LOCATION, {"crmi/sync-target": "u8", "crmi/core": "core-1"})
    d.wait_status(first, {"STARTED"})
    second = {
        "sync target": d.launch("gated", TEST_LOCATION, {"crmi/sync-target": "u8"}),
        "core": d.launch("gated", TEST_LOCATION, {"crmi/core": "core-1"}),
    }
    migration = d.launch("migration", config=FORKSERVER)
    # Once the daemon started the migration it had looked at the runs queued before it, and held them.
    d.wait_status(migration, IN_PROGRESS | {"SUCCESS"})
    for kind, run_id in second.items():
        assert d.status(run_id) == "QUEUED", f"the second run with the same {kind} tag did not wait"
    assert d.status(first) == "STARTED"
    d.open_gate(first)
    d.wait_status(first, {"SUCCESS"})
    for run_id in second.values():
        d.wait_status(run_id, IN_PROGRESS | {"SUCCESS"})
        d.open_gate(run_id)
    for run_id in second.values():
        d.wait_status(run_id, {"SUCCESS"})

    # A failed run reaches the alert webhook (the sensor starts from its first tick: wait for that one).
    alert_sensor = {
        "repositoryLocationName": LOCATION,
        "repositoryName": REPOSITORY,
        "sensorName": "alert_failed_runs",
    }
    d.until(
        "a first tick of alert_failed_runs",
        lambda: d.graphql(TICKS, selector=alert_sensor)["sensorOrError"]["sensorState"]["ticks"],
        SHORT,
    )
    failing = d.launch(
        "rollback", config={"ops": {"rollback_load_run": {"config": {"run_id": "no-such-run"}}}}
    )
    d.wait_status(failing, {"FAILURE"})

    # (a) The migration: dequeued by the daemon, executed by the multiprocess executor on the PostgreSQL core.
    d.wait_status(migration, {"SUCCESS"}, RUN_DEADLINE)
    events = d.events(migration)
    kinds = {e.get("eventType") for e in events}
    assert {
        "RUN_ENQUEUED",
        "RUN_STARTING",
        "RUN_START",
        "RUN_SUCCESS",
    } <= kinds  # queued, then launched by the daemon
    messages = [e.get("message", "") for e in events]
    assert any("multiprocess executor" in m for m in messages), (
        "the run did not use the multiprocess executor"
    )
    assert sum("Launching subprocess for" in m for m in messages) > 1
    job = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "pipelineName": "migration"}
    nodes = d.graphql(ASSETS, job=job)["assetNodes"]
    expected_assets = {"/".join(n["assetKey"]["path"]) for n in nodes}
    expected_checks = {
        ("/".join(n["assetKey"]["path"]), c["name"])
        for n in nodes
        for c in (n["assetChecksOrError"].get("checks") or [])
    }
    materialized = {
        "/".join(e["assetKey"]["path"]) for e in events if e["__typename"] == "MaterializationEvent"
    }
    assert materialized == expected_assets
    evaluations = [e["evaluation"] for e in events if e["__typename"] == "AssetCheckEvaluationEvent"]
    assert (
        expected_checks
        and {("/".join(v["assetKey"]["path"]), v["checkName"]) for v in evaluations} == expected_checks
    )
    failed_errors = [v for v in evaluations if not v["success"] and v["severity"] == "ERROR"]
    assert not failed_errors, failed_errors
    core = sa.create_engine(d.core_url)
    with core.connect() as connection:
        assert connection.scalar(sa.text("SELECT count(*) FROM customers")) > 0
    core.dispose()

    # (b) The daemon fired the one-minute schedule and the one-second sensor of the test location.
    for trigger, query, key, name in (
        ("sensor", TICKS, "sensorName", SENSOR),
        ("schedule", SCHEDULE_TICKS, "scheduleName", SCHEDULE),
    ):
        selector = {"repositoryLocationName": TEST_LOCATION, "repositoryName": REPOSITORY, key: name}

        def fired(query: str = query, selector: dict[str, str] = selector) -> list[str]:
            data = next(iter(d.graphql(query, selector=selector, statuses=["SUCCESS"]).values()))
            state = data.get("sensorState") or data.get("scheduleState")
            return [run_id for tick in state["ticks"] for run_id in tick["runIds"]]

        run_ids = d.until(f"a {trigger} tick that started a run", fired, 90)
        run = d.run(run_ids[0])
        assert run["jobName"] == "probe"
        assert _tag(run, "crmi/test-trigger") == trigger
        d.wait_status(run_ids[0], {"SUCCESS"})

    # The alert of the failed run arrived, and names the run.
    alert = d.until(
        "the run-failure alert at the webhook",
        lambda: next((b for b in d.receiver.bodies() if b.get("run_id") == failing), None),
        SHORT,
    )
    assert alert["job"] == "rollback"
    assert alert["url"] == f"{d.url}/runs/{failing}"

    # (d) No planted secret in the run configs, the UI's resource and instance views, the storage database,
    # the instance's files (compute logs, step outputs), the reports, or the processes' own logs.
    runs = d.graphql(RUNS, filter={})["runsOrError"]["results"]
    assert len(runs) >= 7
    resource = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "resourceName": "core"}
    exposed = json.dumps([runs, d.graphql(EXPOSED, core=resource, job=job)])
    stored = _storage_text(d.storage_url)
    assert migration in stored  # the search reads the real event log
    for secret in d.secrets:
        assert secret not in exposed, "a planted secret is shown by GraphQL (run config or UI)"
        assert secret not in stored, (
            "a planted secret is in Dagster's storage database (event log, runs, ticks)"
        )
        for path, content in _files_text(d.home, d.work):
            assert secret.encode() not in content, f"a planted secret is in {path}"
        for log in d.logs:
            assert secret not in log.read_text(encoding="utf-8", errors="replace"), (
                f"a planted secret is in {log.name}"
            )

    # The health check of the systemd timer, and run pruning (keep the newest run of each job).
    health = subprocess.run(
        [sys.executable, str(DEPLOY / "preflight.py"), "--health"],
        env=d.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert health.returncode == 0, health.stderr
    assert "healthy" in health.stdout
    pruned = subprocess.run(
        [sys.executable, str(DEPLOY / "prune_runs.py"), "--days", "0", "--keep", "1"],
        env=d.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert pruned.returncode == 0, pruned.stderr
    left = d.graphql(RUNS, filter={"statuses": ["SUCCESS", "FAILURE", "CANCELED"]})["runsOrError"]["results"]
    per_job: dict[str, int] = {}
    for run in left:
        per_job[run["jobName"]] = per_job.get(run["jobName"], 0) + 1
    assert per_job == {"migration": 1, "gated": 1, "probe": 1, "rollback": 1}
    assert d.status(migration) == "SUCCESS"
