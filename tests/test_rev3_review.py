"""Third review of the partial-run feature: a re-execution whose undone-ancestor check itself fails."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from crm_core.db import make_engine
from crm_core.models import Customer, LoadRun, RowChange
from tests.test_partial_runs import reconstructable_ui_subset_job


def test_a_retry_whose_parent_cannot_be_undone_fails_with_one_readable_line(
    demo_project: Path, sqlite_core_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A UI run's worker dies after core_customer committed (its load run stays 'running'); a steward edits one
    of its customers before the retry starts. The retry's first step undoes the failed parent itself
    (_undone_parent), which raises 'later run(s) depend on'. That must leave the step failed the way every
    other step failure is (a dg.Failure with our one line, its own load run undone by the step), not as a raw
    RunError escaping _load_run_step before its try."""
    import dagster as dg

    import integration.assets.factories as factories
    from integration.assets.resources import dispose_engines

    job = reconstructable_ui_subset_job(demo_project, sqlite_core_url)
    engine = make_engine(sqlite_core_url)
    with dg.instance_for_test() as instance:
        monkeypatch.setenv("CRMI_FAILPOINT", "load:contact:before_commit")
        monkeypatch.setattr(factories, "abort_run", lambda *_: False)  # the worker died: nothing undid it
        with dg.execute_job(job, instance=instance, raise_on_error=False) as first:
            assert not first.success
        monkeypatch.delenv("CRMI_FAILPOINT")
        monkeypatch.undo()
        with engine.begin() as connection:  # a steward's edit of one of its customers, in between
            customer = connection.execute(sa.select(Customer.id, Customer.name).limit(1)).one()
            edit = connection.execute(
                sa.insert(LoadRun)
                .values(run_key="edit-1", project="demo", mode="edit", status="succeeded", stats={})
                .returning(LoadRun.id)
            ).scalar_one()
            connection.execute(sa.insert(RowChange).values(
                load_run_id=edit, table_name="customers", row_key=f'{{"id": {customer.id}}}',
                operation="update", before={"name": customer.name},
            ))  # fmt: skip
        options = dg.ReexecutionOptions.from_failure(first.run_id, instance)  # the daemon's retry
        with dg.execute_job(
            job, instance=instance, reexecution_options=options, raise_on_error=False
        ) as again:
            dispose_engines()
            failures = [e for e in again.all_events if e.is_step_failure]
            error = failures[0].step_failure_data.error  # type: ignore[union-attr]
            user = failures[0].step_failure_data.user_failure_data  # type: ignore[union-attr]
    with engine.connect() as connection:
        statuses = dict(connection.execute(sa.select(LoadRun.run_key, LoadRun.status)).all())
    engine.dispose()
    assert not again.success
    # every other failure of a step is a dg.Failure carrying our line; its own load run is undone by the step
    assert user is not None, (error.cls_name if error else None, error.message if error else None)
    assert "depend" in (user.description or "")
    assert statuses[again.run_id] == "failed", statuses
