"""The production deployment of deploy/ with real processes (docs/deploy.md).

``dagster-webserver`` and ``dagster-daemon run`` start as subprocesses on an instance whose dagster.yaml is
deploy/dagster.yaml (only the daemon's intervals shortened) with its storage in a private PostgreSQL
database, and load deploy/workspace.yaml's code location (the demo project, a private PostgreSQL core) plus
tests/deploy_location.py (a gated job, a one-minute schedule and a one-second sensor). Everything is
driven and observed through the webserver's GraphQL API, as the UI does.

The processes start once (a module-scoped fixture) and one test runs every scenario on them in order,
each a subtest: starting the webserver, the daemon and their four code servers is what two cores can
least afford, and one test function is what keeps them on one xdist worker.
"""

from __future__ import annotations

import configparser
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import dagster as dg
import pytest
import requests
import sqlalchemy as sa
import yaml

from crm_core.errors import ConfigError
from integration.jobs import CORE_TAG, EXECUTOR_ENV, build_definitions, core_identity
from tests.browser import headless_chromium
from tests.conftest import DEMO, PG_DATABASE, PG_URL, REPO, server_or_skip
from tests.deploy_location import ALL_GATES, GATES_ENV, SCHEDULE, SENSOR
from tests.servers.webhook_receiver import Receiver, closed_port_url, serve

DEPLOY = REPO / "deploy"
BIN = Path(sys.executable).parent  # the venv's dagster-webserver and dagster-daemon
LOCATION = "crm_integration"
TEST_LOCATION = "deploy_test"
REPOSITORY = "__repository__"
STARTUP = 120.0  # webserver answering and both code locations loaded
RUN_DEADLINE = 300.0  # the migration through the multiprocess executor on two busy cores
UI_WAIT = 60.0  # a page of the UI rendered in headless Chromium on two busy cores
SHORT = 120.0  # a small run through the queue (a run worker process starts for each)
IN_PROGRESS = {"STARTING", "STARTED"}
# The multiprocess executor forking its steps from a process that has loaded the code location once,
# instead of a fresh interpreter importing the project for each step (about 3.5 s of CPU per step).
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
    screenshots: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    launched: dict[str, str] = field(default_factory=dict)  # runs a later scenario looks at again

    def migration(self) -> str:
        """Return the run id of the one migration of this deployment; submit it the first time."""
        if "migration" not in self.launched:
            self.launched["migration"] = self.launch("migration")  # forkserver: the default (see below)
        return self.launched["migration"]

    def alert_sensor_ticked(self) -> None:
        """Return once alert_failed_runs has ticked: it reports the runs that fail after its first tick."""
        selector = {
            "repositoryLocationName": LOCATION,
            "repositoryName": REPOSITORY,
            "sensorName": "alert_failed_runs",
        }
        self.until(
            "a first tick of alert_failed_runs",
            lambda: self.graphql(TICKS, selector=selector)["sensorOrError"]["sensorState"]["ticks"],
            SHORT,
        )

    def considered(self) -> None:
        """Return once the daemon's queue has looked at every run submitted so far.

        It takes queued runs oldest first: once a run submitted now (no limit holds it) has started, every
        run still queued from before was held by a limit.
        """
        probe = self.launch("probe", TEST_LOCATION)
        self.wait_status(probe, {"SUCCESS"})

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
    ... on Run { runId status jobName runConfigYaml tags { key value } creationTime startTime endTime }
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
        ... on MaterializationEvent { assetKey { path } metadataEntries { __typename label } }
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
        process.wait()  # reaped: one still running after 30 s on a busy machine is killed above


# The demo project cut to customers and sales reps of two sources (U8, the legacy CRM) and U8's customer
# sync: 13 steps instead of 34 (each a process: ~10 s on two busy cores), and still extraction from two
# sources, staging, the core load, cross-source dedup, reconciliation, checks, sync schedules and sensor.
SMALL_DEMO_MAPPINGS = ("erp_u8_person", "erp_u8_customers", "legacy_crm_users", "legacy_crm_accounts")


def _small_demo(root: Path, demo_data: Path) -> Path:
    """Copy the demo project to ``root`` with only SMALL_DEMO_MAPPINGS and the customer sync; return it."""
    shutil.copytree(DEMO, root, ignore=shutil.ignore_patterns("data", "__pycache__"))
    shutil.copytree(demo_data, root / "data")
    for mapping in (root / "mappings").glob("*.yaml"):
        if mapping.stem not in SMALL_DEMO_MAPPINGS:
            mapping.unlink()
    project = yaml.safe_load((root / "project.yaml").read_text(encoding="utf-8"))
    for target in project["sync"].values():
        target["entities"] = {"customer": target["entities"]["customer"]}
    (root / "project.yaml").write_text(yaml.safe_dump(project, allow_unicode=True, sort_keys=False), "utf-8")
    return root


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> Iterator[Deployment]:
    """Start dagster-webserver and dagster-daemon as the systemd units do, on private PostgreSQL databases.

    Once for the module: every scenario below shares the two processes (starting them, their code servers
    and the core schema is most of a scenario's cost on two cores).
    """
    server_or_skip(PG_URL, "PostgreSQL").dispose()
    tmp_path = tmp_path_factory.mktemp("deploy")
    demo_project = _small_demo(tmp_path / "demo", demo_data)
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
            screenshots=tmp_path / "screenshots",
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


def _job(name: str) -> dict[str, str]:
    return {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "pipelineName": name}


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

    finance = yaml.safe_load((DEPLOY / "workspace.finance.yaml").read_text(encoding="utf-8"))
    processed = process_workspace_config(finance)
    assert processed.success, processed.errors
    # The first project's location exactly as in workspace.yaml, then the finance unit's code server.
    assert finance["load_from"][0] == workspace["load_from"][0]
    assert finance["load_from"][1] == {
        "grpc_server": {"host": "127.0.0.1", "port": _finance_port(), "location_name": FINANCE_LOCATION}
    }
    assert len(finance["load_from"]) == 2


def test_the_kubernetes_and_celery_files_pass_dagster_k8s_and_dagster_celerys_schemas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo_project: Path
) -> None:
    """deploy/k8s/dagster.yaml loads as an instance with K8sRunLauncher's own config schema, keeping
    deploy/dagster.yaml's storage and queue; the run configs of deploy/k8s and deploy/celery are valid for
    the real migration job once CRMI_DAGSTER_EXECUTOR picks k8s_job_executor or celery_executor."""
    from dagster._config import process_config
    from dagster._core.instance.config import dagster_instance_config
    from dagster_k8s import K8sRunLauncher

    shutil.copy(DEPLOY / "k8s" / "dagster.yaml", tmp_path / "dagster.yaml")
    config, _ = dagster_instance_config(str(tmp_path))
    launcher = config["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")
    processed = process_config(K8sRunLauncher.config_type(), launcher["config"])
    assert processed.success, processed.errors
    assert processed.value["env_secrets"] == ["crm-integration"]  # type: ignore[index]
    single = yaml.safe_load((DEPLOY / "dagster.yaml").read_text(encoding="utf-8"))
    for same in ("storage", "run_coordinator", "run_retries", "retention"):
        assert config[same] == single[same], same
    assert (
        config["concurrency"]["runs"]["tag_concurrency_limits"]
        == (single["concurrency"]["runs"]["tag_concurrency_limits"])
    )

    monkeypatch.setenv("CRMI_CELERY_BROKER_URL", "pyamqp://crmi:planted@rabbitmq:5672//")
    url = "postgresql+psycopg://crmi@db.example:5432/crm_core"
    for executor, folder in (("k8s", "k8s"), ("celery", "celery")):
        monkeypatch.setenv(EXECUTOR_ENV, executor)
        defs = build_definitions(demo_project, url)
        for name in ("migration", "migration_delta"):
            job = defs.resolve_job_def(name)
            assert job.executor_def.name == executor, name
            run_config = yaml.safe_load((DEPLOY / folder / "run_config.yaml").read_text(encoding="utf-8"))
            dg.validate_run_config(job, run_config)  # raises DagsterInvalidConfigError with every problem
        assert defs.resolve_job_def("migration_trial").executor_def.name == "in_process"
    monkeypatch.setenv(EXECUTOR_ENV, "spark")
    with pytest.raises(ConfigError, match=r"CRMI_DAGSTER_EXECUTOR='spark'.*multiprocess, k8s or celery"):
        build_definitions(demo_project, url)


def test_the_default_executor_forks_steps_from_a_forkserver_unless_the_run_config_says_otherwise(
    demo_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PostgreSQL core's jobs take Dagster's default executor config (``multiprocess:`` or ``in_process:``);
    a step process is forked from a forkserver that imported the code location once, unless the run config
    names another start method."""
    from dagster._config import process_config
    from dagster._core.executor.in_process import InProcessExecutor
    from dagster._core.executor.multiprocess import MultiprocessExecutor

    monkeypatch.delenv(EXECUTOR_ENV, raising=False)
    defs = build_definitions(demo_project, "postgresql+psycopg://crmi@db.example:5432/crm_core")
    for name in ("migration", "migration_delta", "sync_u8_inbound_job"):
        executor_def = defs.resolve_job_def(name).executor_def

        def made(config: dict[str, Any], executor_def: dg.ExecutorDefinition = executor_def) -> Any:
            processed = process_config(executor_def.config_schema.config_type, config)
            assert processed.success, processed.errors
            return executor_def.executor_creation_fn(SimpleNamespace(executor_config=processed.value))  # type: ignore[arg-type, misc]

        default, spawned, in_process = (
            made({"multiprocess": {}}),  # what the job takes without an execution config
            made({"multiprocess": {"start_method": {"spawn": {}}}}),
            made({"in_process": {}}),
        )
        assert isinstance(default, MultiprocessExecutor) and default._start_method == "forkserver", name
        assert made({"multiprocess": {"max_concurrent": 2}})._start_method == "forkserver"
        assert isinstance(spawned, MultiprocessExecutor) and spawned._start_method == "spawn"
        assert isinstance(in_process, InProcessExecutor)
        dg.validate_run_config(defs.resolve_job_def(name), FORKSERVER)  # the run config docs/deploy.md shows


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


FINANCE_UNIT = "crm-integration-finance.service"
FINANCE_LOCATION = "crm_integration_finance"


def _unit_environment(name: str) -> dict[str, str]:
    """The ``Environment=`` assignments of unit ``name`` (configparser keeps only the last of a repeated key)."""
    lines = (DEPLOY / "systemd" / name).read_text(encoding="utf-8").splitlines()
    pairs = (
        line.removeprefix("Environment=").split("=", 1) for line in lines if line.startswith("Environment=")
    )
    return {key: value for key, value in pairs}


def _systemd_command(line: str, environment: Mapping[str, str]) -> list[str]:
    """An Exec line as systemd runs it: ``${NAME}`` expanded, the paths of docs/deploy.md at this checkout."""
    for name, value in environment.items():
        line = line.replace(f"${{{name}}}", value)
    line = line.replace("/opt/crm-integration/.venv", sys.prefix).replace("/opt/crm-integration", str(REPO))
    return shlex.split(line)


def _finance_port() -> int:
    """The port the finance unit's code server listens on (its ``-p``)."""
    args = shlex.split(_unit(FINANCE_UNIT)["Service"]["ExecStart"])
    return int(args[args.index("-p") + 1])


def test_the_finance_code_server_unit_serves_its_own_project_before_the_webserver_and_the_daemon() -> None:
    """Same user, env file, hardening and restart policy as the daemon; its own CRM_PROJECT wins over the env file's."""
    unit, daemon = _unit(FINANCE_UNIT), _unit("crm-integration-daemon.service")
    assert unit["Unit"]["Before"].split() == [
        "crm-integration-webserver.service",
        "crm-integration-daemon.service",
    ]
    service = unit["Service"]
    for key in ("User", "Group", "EnvironmentFile", "WorkingDirectory", "Restart", "RestartSec", "KillMode",
                "TimeoutStopSec", "NoNewPrivileges", "PrivateTmp", "ProtectSystem", "ReadWritePaths"):  # fmt: skip
        assert service[key] == daemon["Service"][key], key
    assert service["EnvironmentFile"] == "/etc/crm-integration/dagster.env"
    environment = _unit_environment(FINANCE_UNIT)
    assert environment["CRMI_FINANCE_PROJECT"] == "/srv/crm/finance"
    assert {k: v for k, v in environment.items() if k != "CRMI_FINANCE_PROJECT"} == _unit_environment(
        "crm-integration-daemon.service"
    )
    # systemd lets the env file (which sets CRM_PROJECT to the first project) override Environment=, so
    # both commands set CRM_PROJECT themselves, on their command line.
    assert "CRM_PROJECT" not in environment
    for key in ("ExecStartPre", "ExecStart"):
        assert service[key].startswith(
            "/usr/bin/env CRM_PROJECT=${CRMI_FINANCE_PROJECT} /opt/crm-integration/"
        )
    assert service["ExecStartPre"].endswith("deploy/preflight.py")
    assert shlex.split(service["ExecStart"])[2:] == [
        "/opt/crm-integration/.venv/bin/dagster", "code-server", "start", "-h", "127.0.0.1", "-p", "4266",
        "-m", "integration.definitions", "--working-directory", "/var/lib/crm-integration/work",
        "--location-name", FINANCE_LOCATION,
    ]  # fmt: skip
    docs = (REPO / "docs" / "deploy.md").read_text(encoding="utf-8")
    assert f"deploy/systemd/{FINANCE_UNIT}" in docs
    assert "deploy/workspace.finance.yaml" in docs
    assert "/srv/crm/finance" in docs


def _wait_for_code_server(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    """Wait until the code server on ``port`` answers a ping; skip if it could not bind, fail if it died."""
    from dagster._grpc.client import DagsterGrpcClient

    client = DagsterGrpcClient(port=port, host="127.0.0.1")
    deadline = time.monotonic() + STARTUP
    while time.monotonic() < deadline:
        if process.poll() is not None:
            text = log.read_text(encoding="utf-8", errors="replace")
            if "address already in use" in text.lower() or "failed to bind" in text.lower():
                pytest.skip(f"the code server could not bind port {port}: {text[-500:]}")
            pytest.fail(f"the finance code server exited with {process.returncode}:\n{text[-3000:]}")
        with contextlib.suppress(Exception):
            client.ping("ready")
            return
        time.sleep(0.5)
    pytest.fail(f"the finance code server did not answer within {STARTUP} s:\n{log.read_text()[-3000:]}")


def test_the_finance_unit_starts_a_code_server_that_the_finance_workspace_lists_the_finance_jobs_of(
    tmp_path: Path,
) -> None:
    """The unit's ExecStart, run as systemd would (the env file's CRM_PROJECT set): the finance project's jobs."""
    if not (BIN / "dagster").exists() or not Path("/usr/bin/env").exists():
        pytest.skip("no dagster command in this venv or no /usr/bin/env: the unit cannot start here")
    home, work = tmp_path / "dagster_home", tmp_path / "work"
    for folder in (home, work):
        folder.mkdir()
    port = _free_port()
    environment = {
        **_unit_environment(FINANCE_UNIT),
        "CRMI_FINANCE_PROJECT": str(DEMO / "finance"),
        "DAGSTER_HOME": str(home),
        "CRMI_WORK_DIR": str(work),
    }
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CRM", "DAGSTER", "CRMI"))},
        **environment,
        "CRM_PROJECT": str(DEMO),  # the env file's: the first project
        "CRM_CORE_URL": f"sqlite:///{tmp_path / 'core.sqlite'}",
        "PYTHONPATH": str(REPO),
    }
    command = _systemd_command(_unit(FINANCE_UNIT)["Service"]["ExecStart"], environment)
    command = [str(work) if arg == "/var/lib/crm-integration/work" else arg for arg in command]
    command[command.index("-p") + 1] = str(port)
    workspace = yaml.safe_load((DEPLOY / "workspace.finance.yaml").read_text(encoding="utf-8"))
    for entry in workspace["load_from"]:
        if "grpc_server" in entry:
            entry["grpc_server"]["port"] = port
    (tmp_path / "workspace.yaml").write_text(yaml.safe_dump(workspace), encoding="utf-8")
    log = tmp_path / "code-server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, env=env, cwd=work, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_for_code_server(process, port, log)
        listed = subprocess.run(
            [str(BIN / "dagster"), "job", "list", "-w", str(tmp_path / "workspace.yaml"), "-l", FINANCE_LOCATION],
            env=env, cwd=work, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        _stop([process])
    assert listed.returncode == 0, listed.stderr
    jobs = {line.removeprefix("Job: ") for line in listed.stdout.splitlines() if line.startswith("Job: ")}
    assert {"sync_finance_inbound_job", "sync_finance_outbound_job", "order_to_cash_job", "migration"} <= jobs
    assert not any(job.startswith("sync_u8") for job in jobs), jobs


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


# The scenarios of the production instance, in the order the test below runs them on one deployment:
# the queue leaves the migration running with a rollback waiting behind it; the rollback fails and alerts;
# the migration's result is read; the automations; the UI in a browser; the secrets; pruning comes last.


def queue_holds_a_second_run_per_sync_target_and_a_second_core_job_per_core(
    deployment: Deployment,
) -> None:
    """The migration holds its core (`crmi/core`, the job's own tag) and a gated run holds `crmi/sync-target:
    u8`: a `rollback` of the same core and a second u8 run stay queued while a later untagged run starts."""
    d = deployment
    migration = d.migration()
    assert _tag(d.run(migration), CORE_TAG) == core_identity(d.core_url)  # the job's own tag, no password
    d.wait_status(migration, IN_PROGRESS)
    first = d.launch("gated", TEST_LOCATION, {"crmi/sync-target": "u8"})
    d.wait_status(first, {"STARTED"})
    second = d.launch("gated", TEST_LOCATION, {"crmi/sync-target": "u8"})
    # The rollback fails at once when it runs (no such load run): the next scenario's alert. The alert
    # sensor reports failures after its first tick, so that tick comes first.
    d.alert_sensor_ticked()
    rollback = d.launch(
        "rollback", config={"ops": {"rollback_load_run": {"config": {"run_id": "no-such-run"}}}}
    )
    assert _tag(d.run(rollback), CORE_TAG) == core_identity(d.core_url)
    d.launched["rollback"] = rollback
    d.considered()
    assert d.status(second) == "QUEUED", "the second run with the same crmi/sync-target did not wait"
    if d.status(migration) in IN_PROGRESS:  # else the next scenario compares the runs' times
        assert d.status(rollback) == "QUEUED", "a rollback started while the migration wrote the same core"
    assert d.status(first) == "STARTED"
    d.open_gate(first)
    d.wait_status(first, {"SUCCESS"})
    d.wait_status(second, IN_PROGRESS | {"SUCCESS"})
    d.open_gate(second)
    d.wait_status(second, {"SUCCESS"})


def rollback_ran_after_the_migration_on_its_core_and_its_failure_reached_the_webhook(
    deployment: Deployment,
) -> None:
    """The rollback, submitted while the migration wrote the core, started only after it ended; it failed
    (no such load run), and the run-failure alert names it at the local receiver."""
    d = deployment
    migration = d.migration()
    if "rollback" not in d.launched:  # this scenario on its own (-k): the queue scenario waits for the tick
        d.alert_sensor_ticked()
        d.launched["rollback"] = d.launch(
            "rollback", config={"ops": {"rollback_load_run": {"config": {"run_id": "no-such-run"}}}}
        )
    failing = d.launched["rollback"]
    d.wait_status(migration, {"SUCCESS"}, RUN_DEADLINE)
    d.wait_status(failing, {"FAILURE"})
    first, then = d.run(migration), d.run(failing)
    assert then["creationTime"] < first["endTime"], "the rollback was not submitted while the migration ran"
    assert then["startTime"] >= first["endTime"], "two runs wrote the same core at once"
    alert = d.until(
        "the run-failure alert at the webhook",
        lambda: next((b for b in d.receiver.bodies() if b.get("run_id") == failing), None),
        SHORT,
    )
    assert alert["job"] == "rollback"
    assert alert["url"] == f"{d.url}/runs/{failing}"


def migration_ran_through_the_daemon_and_the_multiprocess_executor_on_the_postgresql_core(
    deployment: Deployment,
) -> None:
    """Dequeued by the daemon, one process per step, every asset materialized with numeric counts, every
    check evaluated and none failed, customers in the PostgreSQL core."""
    d = deployment
    migration = d.migration()
    d.wait_status(migration, {"SUCCESS"}, RUN_DEADLINE)
    events = d.events(migration)
    kinds = {e.get("eventType") for e in events}
    assert {"RUN_ENQUEUED", "RUN_STARTING", "RUN_START", "RUN_SUCCESS"} <= kinds  # queued, then launched
    messages = [e.get("message", "") for e in events]
    assert any("multiprocess executor" in m for m in messages), (
        "the run did not use the multiprocess executor"
    )
    assert sum("Launching subprocess for" in m for m in messages) > 1
    nodes = d.graphql(ASSETS, job=_job("migration"))["assetNodes"]
    expected_assets = {"/".join(n["assetKey"]["path"]) for n in nodes}
    expected_checks = {
        ("/".join(n["assetKey"]["path"]), c["name"])
        for n in nodes
        for c in (n["assetChecksOrError"].get("checks") or [])
    }
    materializations = {
        "/".join(e["assetKey"]["path"]): e for e in events if e["__typename"] == "MaterializationEvent"
    }
    assert set(materializations) == expected_assets
    # What the UI plots over time: counts, rejects and duration of every core asset as numbers.
    core_assets = [key for key in materializations if key.startswith("core_")]
    assert core_assets
    for key in core_assets:
        types = {m["label"]: m["__typename"] for m in materializations[key]["metadataEntries"]}
        for label in ("rows_read", "inserted", "rejected"):
            assert types.get(label) == "IntMetadataEntry", (key, label, types)
        assert types.get("duration_seconds") == "FloatMetadataEntry", (key, types)
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


def daemon_fired_the_schedule_and_the_sensor(deployment: Deployment) -> None:
    """The one-minute schedule and the sensor of the test location each started a `probe` run that succeeded."""
    d = deployment
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


@contextlib.contextmanager
def _chromium() -> Iterator[Any]:
    """Debian's headless Chromium through its chromedriver, in English (the screenshots are in docs/)."""
    with headless_chromium(window="1600,1000", lang="en-US", page_timeout=UI_WAIT) as driver:
        yield driver


def ui_shows_the_asset_graph_a_core_assets_checks_and_the_automations(deployment: Deployment) -> None:
    """What IT staff look for, in a real browser: the asset graph with its groups, a core asset's page with
    its owner, description, numeric metadata and passed checks, and every schedule and sensor on the
    Automation page. Screenshots go to $DEPLOY_SCREENSHOTS (docs/ refreshes the documentation's)."""
    d = deployment
    d.wait_status(d.migration(), {"SUCCESS"}, RUN_DEADLINE)
    d.screenshots.mkdir(exist_ok=True)
    with _chromium() as chromium:  # skips (fails under CI=true) without Chromium, chromedriver, Selenium
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        shots = [d.screenshots] + (
            [Path(os.environ["DEPLOY_SCREENSHOTS"])] if os.environ.get("DEPLOY_SCREENSHOTS") else []
        )

        def shown(name: str, *texts: str, counts: dict[str, int] | None = None) -> str:
            """Wait until the page shows every text (and each of ``counts`` that often); save a screenshot."""

            def ready(driver: Any) -> str | None:
                text: str = driver.find_element(By.TAG_NAME, "body").text
                complete = all(t in text for t in texts)
                return (
                    text if complete and all(text.count(t) >= n for t, n in (counts or {}).items()) else None
                )

            try:
                text: str = WebDriverWait(chromium, UI_WAIT).until(ready)
            except Exception:
                chromium.save_screenshot(str(d.screenshots / f"failed-{name}.png"))
                body = chromium.find_element(By.TAG_NAME, "body").text
                pytest.fail(
                    f"{name}: not all of {texts} {counts or ''} shown within {UI_WAIT} s; the page says:\n{body[:3000]}"
                )
            (d.screenshots / f"{name}.txt").write_text(text, encoding="utf-8")
            for folder in shots:
                chromium.save_screenshot(str(folder / f"deploy-{name}.png"))
            return text

        def page(path: str, name: str, *texts: str, counts: dict[str, int] | None = None) -> str:
            chromium.get(f"{d.url}{path}")
            return shown(name, *texts, counts=counts)

        # Lineage: the six groups in their order (extract → stage → core → dedup → report, and sync).
        page("/asset-groups", "lineage", "extract", "stage", "core", "dedup", "report", "sync")
        # The core group's graph: each entity materialized, its checks passed.
        page(f"/locations/{LOCATION}/asset-groups/core", "core-group", "core_customer", "core_sales_rep",
             counts={"Materialized": 2, "2 / 2 Passed": 2})  # fmt: skip
        # A core asset: its owner, tags, description, freshness, and the numbers the plots are drawn from.
        page("/assets/core_customer", "core-asset", "crm-integration", "crmi/layer: core", "crosswalk",
             "Freshness policy", "Passing", "rows_read", "rejected", "duration_seconds")  # fmt: skip
        # Its checks: both succeeded; the one that balances the rows, opened, says what it checks.
        chromium.get(f"{d.url}/assets/core_customer?view=checks")
        WebDriverWait(chromium, UI_WAIT).until(
            lambda driver: "check_core_rules" in driver.find_element(By.TAG_NAME, "body").text
        )
        chromium.find_element(By.XPATH, "//*[starts-with(normalize-space(text()), 'check_every_ro')]").click()
        shown(
            "core-checks", "Each source row is loaded, merged or rejected", "Passed", counts={"Succeeded": 2}
        )
        # Automation: every schedule and sensor of both code locations, with what starts it.
        page("/automation", "automation", "alert_failed_runs", "alert_failed_checks", "undo_failed_load_runs",
             "undo_canceled_load_runs", "finish_partial_load_runs",
             "sync_u8_outbox", "sync_u8_inbound_schedule", "sync_u8_outbound_schedule", "sync_u8_checks_schedule",
             SCHEDULE, SENSOR, "Scheduled Every 5 minutes", "Scheduled Every minute",
             counts={"Run status sensor": 3, "Standard sensor": 4, "Scheduled Every": 4})  # fmt: skip


def no_planted_secret_in_graphql_storage_files_or_logs(deployment: Deployment) -> None:
    """No planted secret in the run configs, the UI's resource and instance views, the storage database,
    the instance's files (compute logs, step outputs), the reports, or the processes' own logs."""
    d = deployment
    migration = d.migration()
    d.wait_status(migration, {"SUCCESS"}, RUN_DEADLINE)
    runs = d.graphql(RUNS, filter={})["runsOrError"]["results"]
    resource = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "resourceName": "core"}
    exposed = json.dumps([runs, d.graphql(EXPOSED, core=resource, job=_job("migration"))])
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


def health_check_passes_and_pruning_keeps_the_newest_run_of_each_job(deployment: Deployment) -> None:
    """The systemd timer's health check, then `prune_runs.py --days 0 --keep 1` (last: it deletes runs)."""
    d = deployment
    migration = d.migration()
    d.wait_status(migration, {"SUCCESS"}, RUN_DEADLINE)
    health = subprocess.run(
        [sys.executable, str(DEPLOY / "preflight.py"), "--health"],
        env=d.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert health.returncode == 0, health.stderr
    assert "healthy" in health.stdout
    finished = {"SUCCESS", "FAILURE", "CANCELED"}
    before = d.graphql(RUNS, filter={"statuses": sorted(finished)})["runsOrError"]["results"]
    jobs = {run["jobName"] for run in before}
    assert len(before) > len(jobs)  # something to prune
    pruned = subprocess.run(
        [sys.executable, str(DEPLOY / "prune_runs.py"), "--days", "0", "--keep", "1"],
        env=d.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert pruned.returncode == 0, pruned.stderr
    left = d.graphql(RUNS, filter={"statuses": sorted(finished)})["runsOrError"]["results"]
    per_job: dict[str, int] = {}
    for run in left:
        per_job[run["jobName"]] = per_job.get(run["jobName"], 0) + 1
    assert per_job == dict.fromkeys(jobs, 1)
    assert d.status(migration) == "SUCCESS"


@pytest.mark.slow
@pytest.mark.postgres
def test_the_production_instance_queues_runs_fires_automations_shows_the_ui_and_keeps_secrets(
    deployment: Deployment, subtests: pytest.Subtests
) -> None:
    """Every scenario above on the one deployment, in order, each reported as a subtest.

    One test function rather than one per scenario: pytest-xdist's `xdist_group` (which would keep separate
    tests on one worker) has no effect with pytest 9, and on two workers each would start a deployment.
    """
    for scenario in (
        queue_holds_a_second_run_per_sync_target_and_a_second_core_job_per_core,
        rollback_ran_after_the_migration_on_its_core_and_its_failure_reached_the_webhook,
        migration_ran_through_the_daemon_and_the_multiprocess_executor_on_the_postgresql_core,
        daemon_fired_the_schedule_and_the_sensor,
        ui_shows_the_asset_graph_a_core_assets_checks_and_the_automations,
        no_planted_secret_in_graphql_storage_files_or_logs,
        health_check_passes_and_pruning_keeps_the_newest_run_of_each_job,
    ):
        with subtests.test(msg=scenario.__name__):
            scenario(deployment)
