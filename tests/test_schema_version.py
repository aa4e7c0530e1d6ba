"""A core at another schema revision is refused with one clear error naming `crmi core upgrade`."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from crm_core.db import current_revision, ensure_schema, head_revision, make_engine, redact_url, upgrade
from crm_core.errors import SchemaError
from integration.assets.resources import dispose_engines
from integration.cli import app
from integration.failures import step_failures
from integration.jobs import MIGRATION_JOB, build_definitions
from tests.conftest import PG_URL, reset_postgres, server_or_skip


def old_core(url: str) -> sa.Engine:
    """A core left at the first revision by an older toolkit."""
    engine = make_engine(url)
    upgrade(engine, "0001")
    return engine


def test_an_empty_database_gets_the_schema_and_a_current_core_is_left_alone(sqlite_core_url: str) -> None:
    engine = make_engine(sqlite_core_url)
    assert current_revision(engine) is None
    ensure_schema(engine)
    assert current_revision(engine) == head_revision()
    ensure_schema(engine)  # nothing to do
    engine.dispose()


def test_an_old_core_is_refused_naming_crmi_core_upgrade(sqlite_core_url: str) -> None:
    engine = old_core(sqlite_core_url)
    with pytest.raises(SchemaError) as raised:
        ensure_schema(engine)
    message = str(raised.value)
    assert "\n" not in message
    assert f"is at schema revision 0001, this toolkit needs {head_revision()}" in message
    assert f"`crmi core upgrade --core-url {sqlite_core_url}`" in message
    assert current_revision(engine) == "0001"  # not migrated behind the consultant's back
    engine.dispose()


@pytest.mark.postgres
def test_the_refusal_of_a_core_with_a_password_suggests_a_command_that_can_be_copied() -> None:
    """The password is never shown, so the command names $CRM_CORE_URL instead of a URL with ***."""
    url = sa.engine.make_url(PG_URL).set(password="s3cret-pw").render_as_string(hide_password=False)
    engine = server_or_skip(url, "PostgreSQL")  # trust authentication: any password connects
    reset_postgres(engine)
    upgrade(engine, "0001")
    with pytest.raises(SchemaError) as raised:
        ensure_schema(engine)
    message = str(raised.value)
    engine.dispose()
    assert "s3cret-pw" not in message
    assert message.startswith(f"the core at {redact_url(url)} is at schema revision 0001")  # password masked
    hint = message.split("this toolkit needs", 1)[1]
    assert "***" not in hint  # nothing to copy that cannot work
    assert 'crmi core upgrade --core-url "$CRM_CORE_URL"' in hint
    assert "the same --core-url you gave" in hint
    assert "Backups and restore" in hint  # how to back it up: docs/deploy.md
    assert "\n" not in message


def test_a_core_from_a_newer_toolkit_or_without_revision_is_refused(sqlite_core_url: str) -> None:
    engine = make_engine(sqlite_core_url)
    upgrade(engine)
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(SchemaError, match="revision 9999, which this toolkit does not know"):
        ensure_schema(engine)
    with engine.begin() as connection:
        connection.execute(sa.text("DROP TABLE alembic_version"))
    with pytest.raises(SchemaError, match=r"has tables .* but no schema revision"):
        ensure_schema(engine)
    engine.dispose()


def test_crmi_run_on_an_old_core_says_crmi_core_upgrade_and_exits_1_and_upgrade_fixes_it(
    demo_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRM_CORE_URL", "")  # restored afterwards: `crmi run --core-url` sets it
    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    old_core(url).dispose()
    runner = CliRunner()
    for command in (["run", "--project", str(demo_project)], ["runs", "list"]):
        result = runner.invoke(app, [*command, "--core-url", url])
        assert result.exit_code == 1, result.output
        assert result.output.count("\n") == 1, result.output  # one line, no traceback
        assert "error: the core at sqlite:///" in result.output
        assert "crmi core upgrade --core-url" in result.output
    upgraded = runner.invoke(app, ["core", "upgrade", "--core-url", url])
    assert upgraded.exit_code == 0, upgraded.output
    listed = runner.invoke(app, ["runs", "list", "--json", "--core-url", url])
    assert listed.exit_code == 0 and listed.output == ""


def test_a_dagster_run_on_an_old_core_fails_its_first_step_with_the_same_line(
    demo_project: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    old_core(url).dispose()
    job = build_definitions(demo_project, url).resolve_job_def(MIGRATION_JOB)
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(instance=instance, raise_on_error=False)
    dispose_engines()
    assert not result.success
    causes = {f.cause for f in step_failures(result.all_events)}
    assert len(causes) == 1, causes
    assert "crmi core upgrade" in causes.pop()
