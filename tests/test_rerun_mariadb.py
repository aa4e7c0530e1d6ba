"""A re-run skips a MariaDB/MySQL source that did not change: it is fingerprinted in the server.

`source_digest` had no proof for MySQL/MariaDB, so "Nothing changed since run …" never happened for them and
every re-run read the legacy CRM again and recorded a new run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from integration.pipeline import Migration
from integration.rerun import source_digest
from tests.conftest import MARIADB_URL, server_or_skip
from tests.test_rerun_skip import MAPPINGS, assert_balanced, crmi_run, skipped
from tests.test_runs import content

pytestmark = pytest.mark.mariadb
QUERY = "SELECT id, name, 'a:b 100%' AS note FROM accounts WHERE deleted = 0"


@pytest.fixture
def mariadb(tmp_path: Path) -> str:
    """A database of this test's own on the MariaDB server (emptied first); its URL."""
    root = server_or_skip(MARIADB_URL, "MariaDB")
    name = f"{sa.engine.make_url(MARIADB_URL).database}_rerun"
    with root.begin() as connection:
        connection.execute(sa.text(f"DROP DATABASE IF EXISTS `{name}`"))
        connection.execute(sa.text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
    root.dispose()
    return sa.engine.make_url(MARIADB_URL).set(database=name).render_as_string(hide_password=False)


def accounts_project(root: Path, url: str) -> Migration:
    """A project reading the accounts table and a query over it from ``url``."""
    (root / "mappings").mkdir(parents=True)
    (root / "project.yaml").write_text(
        f"version: 1\nname: acme\nsources:\n  crm: {{connector: sql, url: '{url}'}}\n", encoding="utf-8"
    )
    for name, source in (("table", "table: accounts"), ("query", f'query: "{QUERY}"')):
        (root / "mappings" / f"{name}.yaml").write_text(
            f"version: 1\nsource: {{connector: crm, {source}, key: id}}\ntarget: customer\n"
            "fields:\n  name: {from: name, required: true}\n",
            encoding="utf-8",
        )
    return Migration.load(str(root))


def test_a_mariadb_source_is_fingerprinted_in_the_server(mariadb: str, tmp_path: Path) -> None:
    engine = sa.create_engine(mariadb)
    with engine.begin() as connection:
        connection.execute(sa.text(
            "CREATE TABLE accounts (id int primary key, name varchar(20) COLLATE utf8mb4_bin, "
            "city varchar(20) COLLATE utf8mb4_general_ci, score float, deleted int)"
        ))  # fmt: skip
        connection.execute(sa.text(
            "INSERT INTO accounts VALUES (1, 'a', NULL, 1.0000001, 0), (2, 'b', '', 2, 0), (3, 'c', 'x', 3, 1)"
        ))  # fmt: skip
    migration = accounts_project(tmp_path / "project", mariadb)
    table, query = ({m.name: m for m in migration.mappings}[name] for name in ("table", "query"))

    def digests() -> tuple[str | None, str | None]:
        return source_digest(migration, table), source_digest(migration, query)

    first = digests()
    assert first[0] is not None and first[1] is not None and digests() == first
    changes = [
        "UPDATE accounts SET name = 'B' WHERE id = 2",
        "UPDATE accounts SET name = CASE id WHEN 1 THEN 'B' ELSE 'a' END WHERE id < 3",  # a swap between rows
        "UPDATE accounts SET city = NULL WHERE id = 2",  # '' and NULL differ
        "UPDATE accounts SET city = 'NULL' WHERE id = 2",  # and so do NULL and the text 'NULL'
        "UPDATE accounts SET score = 1.0000002 WHERE id = 1",  # a float the text protocol shows as 1
        "UPDATE accounts SET deleted = 0 WHERE id = 3",
    ]
    seen: list[str | None] = [first[0]]
    for change in changes:
        with engine.begin() as connection:
            connection.execute(sa.text(change))
        now = digests()
        assert now[0] not in seen, change
        seen.append(now[0])
    assert now[1] != first[1]  # the query's rows changed too (row 3 is no longer deleted)
    with engine.begin() as connection:  # a change the query does not read leaves its digest alone
        connection.execute(sa.text("UPDATE accounts SET city = 'y' WHERE id = 1"))
    assert digests()[1] == now[1]
    engine.dispose()


@pytest.mark.slow
def test_an_unchanged_re_run_of_a_mariadb_source_changes_nothing(
    demo_project: Path, mariadb: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_connectors import copy_tables

    tables = ["users", "accounts", "contacts", "accounts_contacts", "opportunities", "accounts_opportunities",
              "email_addresses", "email_addr_bean_rel", "currencies"]  # fmt: skip
    source = sa.create_engine(mariadb)
    copy_tables(f"sqlite:///{demo_project / 'data' / 'legacy_crm.sqlite'}", source, tables)
    monkeypatch.setenv("LEGACY_CRM_URL", mariadb)
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'core.sqlite'}"
    monkeypatch.setenv("CRM_CORE_URL", url)
    code, first = crmi_run(demo_project, url)
    assert code == 0 and first["skipped"] == []
    core = sa.create_engine(url)
    before = content(core)

    code, again = crmi_run(demo_project, url, "--new-run")

    assert code == 0 and skipped(again) == set(MAPPINGS)
    assert_balanced(again)
    code, same = crmi_run(demo_project, url)  # nothing changed since: no run starts
    assert code == 0 and same["nothing_changed"] and same["run_id"] == again["run_id"]
    assert content(core) == before
    with source.begin() as connection:  # a changed account is read again, with what depends on it
        connection.execute(
            sa.text("UPDATE accounts SET name = CONCAT(name, ' 2') WHERE id = (SELECT MIN(id) FROM accounts)")
        )
    code, changed = crmi_run(demo_project, url)
    assert not changed.get("nothing_changed") and "legacy_crm_accounts" not in skipped(changed)
    assert "erp_u8_customers" in skipped(changed)
    core.dispose()
    source.dispose()
