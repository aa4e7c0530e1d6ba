"""Shared fixtures: demo sources generated once, core databases on SQLite and PostgreSQL."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest
import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "demo"
# Each xdist worker gets its own databases (test_gw0, test_gw1, ...): tests reset whole schemas.
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")


def _per_worker(url: str) -> str:
    if not WORKER:
        return url
    parsed = sa.engine.make_url(url)
    return parsed.set(database=f"{parsed.database}_{WORKER}").render_as_string(hide_password=False)


PG_URL = _per_worker(os.environ.get("CRM_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
MARIADB_URL = _per_worker(
    os.environ.get("CRM_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test?charset=utf8mb4")
)
PG_DATABASE = sa.engine.make_url(PG_URL).database


def _ensure_database(url: str) -> None:
    """Create the worker's database on the server if it is missing (the server must already run)."""
    parsed = sa.engine.make_url(url)
    name = parsed.database
    if parsed.get_backend_name() == "postgresql":
        admin = sa.create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            exists = connection.scalar(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name})
            if not exists:
                connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    else:
        admin = sa.create_engine(parsed.set(database=""))
        with admin.begin() as connection:
            connection.execute(sa.text(f"CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER SET utf8mb4"))
    admin.dispose()


def server_or_skip(url: str, what: str) -> sa.Engine:
    """Return an engine for a test server; skip when it is absent, fail under CI=true."""
    engine = sa.create_engine(url)
    try:
        if WORKER:
            _ensure_database(url)
        with engine.connect():
            pass
    except Exception as exc:
        reason = f"{what} not reachable at {engine.url.render_as_string(hide_password=True)}: {str(exc).splitlines()[0]}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true requires the server: {reason}")
        pytest.skip(reason)
    return engine


def load_generator() -> ModuleType:
    """Import examples/demo/generate_sources.py as a module."""
    spec = importlib.util.spec_from_file_location("generate_sources", DEMO / "generate_sources.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def generator() -> ModuleType:
    return load_generator()


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory, generator: ModuleType) -> Path:
    """The demo sources, generated once per test session."""
    out = tmp_path_factory.mktemp("demo_data")
    generator.generate(out)
    return out


@pytest.fixture
def demo_project(tmp_path: Path, demo_data: Path) -> Path:
    """A private copy of the demo project (project.yaml, mappings, data) for one test."""
    root = tmp_path / "demo"
    shutil.copytree(DEMO, root, ignore=shutil.ignore_patterns("data", "__pycache__"))
    shutil.copytree(demo_data, root / "data")
    return root


def reset_postgres(engine: sa.Engine) -> None:
    """Drop and recreate the public schema of the PostgreSQL test database."""
    with engine.begin() as connection:
        connection.execute(sa.text("DROP SCHEMA IF EXISTS public CASCADE"))
        connection.execute(sa.text("CREATE SCHEMA public"))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def core_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty core database URL: a SQLite file, or the PostgreSQL test database wiped clean."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / f'core-{uuid.uuid4().hex[:8]}.sqlite'}"
        return
    engine = server_or_skip(PG_URL, "PostgreSQL")
    reset_postgres(engine)
    engine.dispose()
    yield PG_URL
    from integration.assets.resources import dispose_engines

    dispose_engines()  # Dagster resources cache engines per URL; close them with the database


@pytest.fixture
def sqlite_core_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'core.sqlite'}"


@pytest.fixture(autouse=True, scope="session")
def _private_dagster_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Give each test process its own DAGSTER_HOME so parallel CLI runs never share run storage."""
    home = tmp_path_factory.mktemp("dagster_home")
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n", encoding="utf-8")
    previous = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(home)
    yield
    if previous is None:
        os.environ.pop("DAGSTER_HOME", None)
    else:
        os.environ["DAGSTER_HOME"] = previous


@contextmanager
def crmi_run_paused_at(
    failpoint: str, project: Path, core_url: str, tmp_path: Path, *, own_session: bool = False
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """Start `crmi run` as a subprocess and give it (with its log file) once it is paused at ``failpoint``.

    The run announces the failpoint on a pipe; if it dies before reaching it, the read sees EOF and the test
    fails with the run's log. ``own_session``: a process group of its own, as a terminal's. Killed (its group,
    with ``own_session``) on the way out if it still runs.
    """
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n", encoding="utf-8")
    reached, announce = os.pipe()
    env = {**os.environ, "CRMI_FAILPOINT": failpoint, "CRMI_FAILPOINT_ACTION": f"pause:/dev/fd/{announce}",
           "DAGSTER_HOME": str(home)}  # fmt: skip
    command = [
        sys.executable,
        "-m",
        "integration.cli",
        "run",
        "--project",
        str(project),
        "--core-url",
        core_url,
    ]
    log = tmp_path / "run.log"
    with log.open("wb") as output:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=output, pass_fds=(announce,),
                                   start_new_session=own_session)  # fmt: skip
    os.close(announce)
    try:
        with os.fdopen(reached, encoding="utf-8") as pipe:  # returns once the run is at the failpoint
            assert pipe.readline().strip() == failpoint, log.read_text(encoding="utf-8")
        yield process, log
    finally:
        if process.poll() is None:
            if own_session:
                os.killpg(process.pid, signal.SIGKILL)
            else:
                process.kill()
            process.wait()
