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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest
import uvicorn
from dagster import DagsterInstance, instance_for_test
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import EmptyWorkspaceTarget
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
def webserver(instance: DagsterInstance) -> Iterator[str]:
    """Serve Dagster's webserver (GraphQL included) for ``instance`` on a free port; yield its URL."""
    with WorkspaceProcessContext(instance, EmptyWorkspaceTarget()) as context:
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
