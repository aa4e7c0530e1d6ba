"""`deploy/preflight.py --health` judges the daemon's heartbeats itself and finds the deployment's webserver.

Dagster calls a daemon healthy for 30 minutes after its last heartbeat; the health timer runs every 5 minutes
and must see a dead or hung daemon within minutes. The webserver here is Dagster's own, serving a real
instance whose heartbeats the tests write with old timestamps.
"""

from __future__ import annotations

import importlib.util
import re
import socket
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest
import uvicorn
from dagster import DagsterInstance, instance_for_test
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import EmptyWorkspaceTarget, WorkspaceFileTarget
from dagster._daemon.types import DaemonHeartbeat
from dagster_webserver.webserver import DagsterWebserver

from tests.conftest import REPO


def load_preflight() -> ModuleType:
    """deploy/preflight.py is a script, not a package module."""
    spec = importlib.util.spec_from_file_location("preflight", REPO / "deploy" / "preflight.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


preflight = load_preflight()


@contextmanager
def webserver(instance: DagsterInstance, workspace: Path | None = None) -> Iterator[str]:
    """Serve Dagster's webserver (GraphQL included) for ``instance`` on a free port; yield its URL. It loads
    the code locations of ``workspace`` (none without one)."""
    target = WorkspaceFileTarget([str(workspace)]) if workspace else EmptyWorkspaceTarget()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Error loading repository location": a test's point
        context = WorkspaceProcessContext(instance, target)
    with context:
        app = DagsterWebserver(context).create_asgi_app()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, log_level="error"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{port}"  # health() itself waits until /server_info answers
        finally:
            server.should_exit = True
            thread.join(10)
            sock.close()


def beat(instance: DagsterInstance, seconds_ago: float) -> None:
    """Write a heartbeat of every required daemon, ``seconds_ago`` old."""
    for daemon_type in instance.get_required_daemon_types():
        instance.add_daemon_heartbeat(
            DaemonHeartbeat(time.time() - seconds_ago, daemon_type, "test-daemon", errors=[])
        )


def test_a_daemon_silent_for_ten_minutes_is_unhealthy_though_dagster_still_calls_it_healthy() -> None:
    with instance_for_test() as instance, webserver(instance) as ui:
        beat(instance, seconds_ago=10)
        assert preflight.health(ui) == []
        beat(instance, seconds_ago=600)  # killed 10 minutes ago: Dagster's own tolerance is 30 minutes
        problems = preflight.health(ui)
        assert len(problems) == 1, problems
        assert "dagster-daemon is not healthy" in problems[0]
        assert re.search(r"SCHEDULER: last heartbeat 6\d\d s ago", problems[0]), problems
        assert (
            "tolerance 300 s" in problems[0]
        )  # the tolerance it judged by, so the journal explains the restart
        assert preflight.health(ui, tolerance=900) == []  # configurable


def test_a_daemon_that_never_sent_a_heartbeat_is_unhealthy() -> None:
    with instance_for_test() as instance, webserver(instance) as ui:
        problems = preflight.health(ui)
        assert len(problems) == 1 and "no heartbeat" in problems[0], problems


def test_the_tolerance_comes_from_the_option_else_the_environment_else_five_minutes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DAGSTER_DAEMON_HEARTBEAT_TOLERANCE", raising=False)
    assert preflight.DEFAULT_HEARTBEAT_TOLERANCE == 300
    assert preflight.heartbeat_tolerance({}) == 300
    assert preflight.heartbeat_tolerance({"DAGSTER_DAEMON_HEARTBEAT_TOLERANCE": "120"}) == 120
    assert preflight.heartbeat_tolerance({"DAGSTER_DAEMON_HEARTBEAT_TOLERANCE": "soon"}) == 300


def test_the_default_webserver_address_is_the_one_the_env_file_configures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("DAGSTER_WEBSERVER_HOST", "DAGSTER_WEBSERVER_PORT", "DAGSTER_DAEMON_HEARTBEAT_TOLERANCE"):
        monkeypatch.delenv(name, raising=False)
    env_file = tmp_path / "dagster.env"
    with instance_for_test() as instance, webserver(instance) as ui:
        port = ui.rsplit(":", 1)[1]
        env_file.write_text(
            f"# the services' settings\nDAGSTER_WEBSERVER_HOST=0.0.0.0\nDAGSTER_WEBSERVER_PORT={port}\n"
            "DAGSTER_DAEMON_HEARTBEAT_TOLERANCE=900\n",
            encoding="utf-8",
        )
        beat(instance, seconds_ago=600)
        # no --ui, no DAGSTER_WEBSERVER_PORT in the environment: the env file names the port (and tolerance)
        assert preflight.main(["--health", "--env-file", str(env_file)]) == 0
    settings = preflight.deployment_settings(env_file, {})
    assert preflight.webserver_url(settings) == f"http://127.0.0.1:{port}"  # 0.0.0.0 is reached locally
    assert preflight.webserver_url({"DAGSTER_WEBSERVER_PORT": "3310"}) == "http://127.0.0.1:3310"
    assert preflight.webserver_url({}) == "http://127.0.0.1:3000"  # Dagster's own default
    # the environment wins over the file, as it does for the services
    overridden = preflight.deployment_settings(env_file, {"DAGSTER_WEBSERVER_PORT": "4000"})
    assert preflight.webserver_url(overridden) == "http://127.0.0.1:4000"


FINANCE_LOCATION = "crm_integration_finance"
TINY_DEFINITIONS = "import dagster as dg\n\n@dg.op\ndef noop() -> None:\n    pass\n\n@dg.job\ndef tiny() -> None:\n    noop()\n"


def free_port() -> int:
    """A port that was free a moment ago, for a finance code server of one test (workers run side by side)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def finance_workspace(folder: Path, port: int) -> Path:
    """deploy/workspace.finance.yaml with the finance code server moved to ``port``."""
    text = (REPO / "deploy" / "workspace.finance.yaml").read_text(encoding="utf-8")
    path = folder / "workspace.finance.yaml"
    path.write_text(text.replace("port: 4266", f"port: {port}"), encoding="utf-8")
    return path


def installed_units(folder: Path, workspace: Path) -> Path:
    """/etc/systemd/system as docs/deploy.md leaves it for a second project: the webserver and the daemon
    read ``workspace`` (the docs' sed), the finance unit beside them."""
    units = folder / "units"
    units.mkdir()
    for name in ("webserver", "daemon", "finance"):
        unit = f"crm-integration-{name}.service"
        text = (REPO / "deploy" / "systemd" / unit).read_text(encoding="utf-8")
        (units / unit).write_text(
            text.replace("/opt/crm-integration/deploy/workspace.yaml", str(workspace)), encoding="utf-8"
        )
    return units


@contextmanager
def code_server(folder: Path, port: int, definitions_text: str = TINY_DEFINITIONS) -> Iterator[None]:
    """A real Dagster code server for location crm_integration_finance on ``port``; stopped afterwards."""
    import subprocess

    from dagster._grpc.client import DagsterGrpcClient

    definitions = folder / "tiny_definitions.py"
    definitions.write_text(definitions_text, encoding="utf-8")
    command = [sys.executable, "-m", "dagster", "code-server", "start", "-h", "127.0.0.1", "-p", str(port),
               "-f", str(definitions), "--location-name", FINANCE_LOCATION]  # fmt: skip
    log = folder / "code-server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=folder)
    try:
        client = DagsterGrpcClient(port=port, host="127.0.0.1")
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log.read_text(encoding="utf-8", errors="replace")
            try:
                client.ping("ready")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.2)  # polling for the server to listen, not timing the test
        yield
    finally:
        process.terminate()
        process.wait(30)


def test_a_finance_code_server_that_does_not_answer_is_reported_with_its_unit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The units point the webserver and the daemon at the finance workspace: its code server must answer."""
    finance_port = free_port()
    workspace = finance_workspace(tmp_path, finance_port)
    # raising=False: before the health check knew of code servers, it had no UNITS_DIR and said "healthy"
    monkeypatch.setattr(preflight, "UNITS_DIR", installed_units(tmp_path, workspace), raising=False)
    env_file = tmp_path / "dagster.env"
    env_file.write_text("", encoding="utf-8")
    with instance_for_test() as instance, webserver(instance) as ui:
        beat(instance, seconds_ago=10)
        # the health timer runs main(): exit 3, only a code server is down (the restart unit reads it)
        assert preflight.main(["--health", "--ui", ui, "--env-file", str(env_file)]) == 3
        assert preflight.expected_workspaces() == [workspace]
        [server] = preflight.code_servers([workspace])[0]
        assert (server.location, server.host, server.port) == (FINANCE_LOCATION, "127.0.0.1", finance_port)
        problems = preflight.health(ui, workspaces=preflight.expected_workspaces())
        assert len(problems) == 1, problems
        [line] = problems
        # what is down, where, and what to do
        assert f"the code server of location {FINANCE_LOCATION} (127.0.0.1:{finance_port}" in line
        assert str(workspace) in line and "does not answer" in line
        assert "systemctl status crm-integration-finance" in line
        assert "journalctl -u crm-integration-finance" in line
        with code_server(tmp_path, finance_port):
            assert preflight.health(ui, workspaces=[workspace]) == []
            assert preflight.main(["--health", "--ui", ui, "--env-file", str(env_file)]) == 0


def test_a_deployment_without_a_finance_location_expects_no_code_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shipped units (deploy/workspace.yaml: one python_module location) and no units at all."""
    shipped = REPO / "deploy" / "workspace.yaml"
    monkeypatch.setattr(preflight, "UNITS_DIR", REPO / "deploy" / "systemd")
    assert preflight.expected_workspaces() == [Path("/opt/crm-integration/deploy/workspace.yaml")]
    monkeypatch.setattr(preflight, "UNITS_DIR", installed_units(tmp_path, shipped))  # at this checkout
    assert preflight.expected_workspaces() == [shipped]
    assert preflight.code_servers(preflight.expected_workspaces()) == ([], [])
    monkeypatch.setattr(preflight, "UNITS_DIR", tmp_path / "no-units")
    assert preflight.expected_workspaces() == [shipped]
    with instance_for_test() as instance, webserver(instance) as ui:
        beat(instance, seconds_ago=10)
        assert preflight.health(ui, workspaces=preflight.expected_workspaces()) == []


def test_a_workspace_the_units_name_that_is_missing_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "gone.yaml"
    monkeypatch.setattr(preflight, "UNITS_DIR", installed_units(tmp_path, missing))
    servers, problems = preflight.code_servers(preflight.expected_workspaces())
    assert servers == [] and len(problems) == 1, problems
    assert str(missing) in problems[0] and "crm-integration-daemon.service" in problems[0]


def test_a_code_location_the_webserver_cannot_load_is_reported_without_secrets(tmp_path: Path) -> None:
    """The main location (a python_module the webserver loads itself) fails to load: the UI shows an error."""
    broken = tmp_path / "broken_definitions.py"
    broken.write_text(
        'raise RuntimeError("cannot open postgresql://crmi:s3cret-pw@db.intra/crm_core")\n', encoding="utf-8"
    )
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text(
        f"load_from:\n  - python_file:\n      relative_path: {broken}\n      location_name: crm_integration\n",
        encoding="utf-8",
    )
    with instance_for_test() as instance, webserver(instance, workspace) as ui:
        beat(instance, seconds_ago=10)
        [line] = preflight.health(ui, workspaces=[workspace])
    assert line.startswith("the webserver cannot load code location crm_integration: "), line
    assert "RuntimeError: cannot open postgresql://crmi:***@db.intra/crm_core" in line
    assert "s3cret-pw" not in line and "journalctl -u crm-integration-webserver" in line


@pytest.mark.parametrize(("status", "restarts"), [("1", True), ("3", False), (None, True)])
def test_the_restart_unit_leaves_the_services_alone_when_only_a_code_server_is_down(
    tmp_path: Path, status: str | None, restarts: bool
) -> None:
    """crm-integration-restart.service's command as systemd runs it (``$$`` is a ``$``), with the health
    check's exit status in MONITOR_EXIT_STATUS (unset: a systemd before 251) and a systemctl that records."""
    import os
    import shlex
    import subprocess

    unit = (REPO / "deploy" / "systemd" / "crm-integration-restart.service").read_text(encoding="utf-8")
    [line] = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    calls = tmp_path / "calls"
    systemctl = tmp_path / "systemctl"
    systemctl.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n', encoding="utf-8")
    systemctl.chmod(0o755)
    command = shlex.split(
        line.removeprefix("ExecStart=").replace("$$", "$").replace("/bin/systemctl", str(systemctl))
    )
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if status is not None:
        env["MONITOR_EXIT_STATUS"] = status
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    if restarts:
        assert calls.read_text(encoding="utf-8").split() == [
            "restart", "crm-integration-daemon.service", "crm-integration-webserver.service"
        ]  # fmt: skip
    else:
        assert not calls.exists()
        assert "only a code server does not answer" in result.stdout
    # the exit code it tells apart is the health check's own
    assert preflight.EXIT_CODE_SERVERS == 3 and f"= {preflight.EXIT_CODE_SERVERS} ]; then" in line


def test_a_finance_code_server_serving_a_broken_project_is_its_units_problem_not_the_webservers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It answers pings but its location does not load: exit 3 (no restart of the webserver and the daemon),
    the line names the finance unit."""
    finance_port = free_port()
    workspace = tmp_path / "workspace.finance.yaml"
    workspace.write_text(
        f"load_from:\n  - grpc_server:\n      host: 127.0.0.1\n      port: {finance_port}\n"
        f"      location_name: {FINANCE_LOCATION}\n",
        encoding="utf-8",
    )
    monkeypatch.setattr(preflight, "UNITS_DIR", installed_units(tmp_path, workspace))
    broken = 'raise RuntimeError("project.yaml: sync.targets.finance.url: K3_URL is not set")\n'
    with (
        code_server(tmp_path, finance_port, broken),
        instance_for_test() as instance,
        webserver(instance, workspace) as ui,
    ):
        beat(instance, seconds_ago=10)
        report = preflight.health_report(ui, workspaces=preflight.expected_workspaces())
    assert report.services == [] and report.exit_code() == 3, report
    [line] = report.code_servers
    assert line.startswith(
        f"the webserver cannot load code location {FINANCE_LOCATION}: RuntimeError: project.yaml"
    )
    assert "K3_URL is not set" in line
    assert line.endswith(
        "journalctl -u crm-integration-finance, fix what it says, then systemctl restart crm-integration-finance"
    )
