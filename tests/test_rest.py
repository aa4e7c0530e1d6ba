"""The REST connector against a real HTTP server speaking the SuiteCRM 8 JSON:API profile."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from crm_core.errors import ConfigError, ExtractError, TransientExtractError
from integration.connectors import ReadRequest, RestConnector, RestSettings
from integration.connectors.rest import SUITECRM_V8
from integration.mappings.engine import map_chunks
from integration.pipeline import Migration, extract
from integration.project import load_project
from tests.jsonapi_server import CLIENT_ID, CLIENT_SECRET, SuiteCrmApi, serve
from tests.test_connectors import check_contract


@pytest.fixture
def accounts(demo_data: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(demo_data / "legacy_crm.sqlite") as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM accounts ORDER BY id")]


@pytest.fixture
def api(accounts: list[dict[str, Any]]) -> Iterator[tuple[str, SuiteCrmApi]]:
    with serve({"Accounts": accounts, "Contacts": []}) as running:
        yield running


def connector(base_url: str, **overrides: Any) -> tuple[RestConnector, list[float]]:
    waits: list[float] = []
    settings = RestSettings(base_url=base_url, **{**SUITECRM_V8, "page_size": 20, "timeout": 2.0,  # type: ignore[arg-type]
                            "login_body": {"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET},
                            **overrides})  # fmt: skip
    return RestConnector("legacy_api", settings, sleep=waits.append), waits


def read_all(rest: RestConnector, **request: Any) -> pd.DataFrame:
    return pd.concat(
        rest.read(ReadRequest("Accounts", key=("id",), chunk_rows=25, **request)), ignore_index=True
    )


def test_pages_through_every_account_after_logging_in(
    api: tuple[str, SuiteCrmApi], accounts: list[dict[str, Any]]
) -> None:
    base_url, server = api
    rest, waits = connector(base_url)
    check_contract(rest, "Accounts")
    already = len(server.requests)
    frame = read_all(rest)
    live = [a["id"] for a in accounts if not a["deleted"]]
    assert list(frame["id"]) == live and list(frame["_row_ref"]) == live
    assert frame.loc[0, "name"] == next(a["name"] for a in accounts if a["id"] == live[0])
    assert waits == []
    pages = [r for r in server.requests[already:] if r.startswith("GET /Api/V8/module/Accounts")]
    assert len(pages) == len(live) // 20 + 1  # pages until a short one (an empty one after a full last page)


def test_429_is_retried_after_the_servers_retry_after(
    api: tuple[str, SuiteCrmApi], accounts: list[dict[str, Any]]
) -> None:
    base_url, server = api
    rest, waits = connector(base_url)
    server.faults.extend(["429:7"])
    assert len(read_all(rest)) == sum(1 for a in accounts if not a["deleted"])
    assert waits == [7.0]


def test_5xx_dropped_connections_and_slow_answers_back_off_then_succeed(api: tuple[str, SuiteCrmApi]) -> None:
    base_url, server = api
    rest, waits = connector(base_url, timeout=0.3, backoff=0.5)
    server.faults.extend(["500", "drop", "slow:1.0", "503"])
    assert len(read_all(rest)) > 0
    assert waits == [0.5, 1.0, 2.0, 4.0]  # exponential backoff, one wait per failed attempt


def test_retries_stop_at_the_cap_with_one_clear_error(api: tuple[str, SuiteCrmApi]) -> None:
    base_url, server = api
    rest, waits = connector(base_url, max_retries=3, backoff=1.0)
    server.faults.extend(["503"] * 10)
    with pytest.raises(TransientExtractError) as caught:
        read_all(rest)
    assert len(waits) == 3
    message = str(caught.value)
    assert message.startswith("source 'legacy_api': POST http://127.0.0.1:")
    assert "failed after 4 attempts (HTTP 503); the server is down or overloaded, try again later" in message


def test_bad_credentials_and_unknown_modules_are_clear_errors(api: tuple[str, SuiteCrmApi]) -> None:
    base_url, _ = api
    rest, _ = connector(
        base_url,
        login_body={"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": "wrong"},
    )
    with pytest.raises(
        ExtractError, match=r"login at /Api/access_token refused \(HTTP 401\); check the API credentials"
    ):
        read_all(rest)
    good, _ = connector(base_url)
    with pytest.raises(ExtractError, match=r"/Api/V8/module/Acounts does not exist \(HTTP 404\)"):
        list(good.read(ReadRequest("Acounts")))
    assert good.list_tables() == ["Accounts", "Contacts"]


def test_incremental_reads_send_the_watermark_filter(
    api: tuple[str, SuiteCrmApi], accounts: list[dict[str, Any]]
) -> None:
    base_url, server = api
    accounts[0]["date_modified"] = "2025-09-01 08:00:00"
    rest, _ = connector(base_url)
    frame = read_all(rest, cursor_column="date_modified", cursor_from="2025-08-01 00:00:00")
    assert list(frame["id"]) == [accounts[0]["id"]]
    assert any("filter%5Bdate_modified%5D%5Bgte%5D=2025-08-01" in r for r in server.requests)


def test_a_project_maps_suitecrm_accounts_over_the_api(
    api: tuple[str, SuiteCrmApi], demo_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base_url, _ = api
    monkeypatch.setenv("SUITECRM_URL", base_url)
    monkeypatch.setenv("SUITECRM_CLIENT_SECRET", CLIENT_SECRET)
    project_file = demo_project / "project.yaml"
    text = project_file.read_text(encoding="utf-8").replace("sources:\n", (
        "sources:\n  legacy_api:\n    connector: rest\n    profile: suitecrm_v8\n    base_url: ${SUITECRM_URL}\n"
        "    login_body: {grant_type: client_credentials, client_id: crm-migration, client_secret: '${SUITECRM_CLIENT_SECRET}'}\n"
    ), 1)  # fmt: skip
    project_file.write_text(text, encoding="utf-8")
    mapping = (demo_project / "mappings" / "legacy_crm_accounts.yaml").read_text(encoding="utf-8")
    mapping = mapping.replace(
        'connector: legacy_crm\n  table: accounts\n  where: "deleted = 0"',
        "connector: legacy_api\n  table: Accounts",
    )
    (demo_project / "mappings" / "legacy_api_accounts.yaml").write_text(mapping, encoding="utf-8")
    migration = Migration.load(str(demo_project))
    [compiled] = [m for m in migration.mappings if m.name == "legacy_api_accounts"]
    result = map_chunks(compiled, [extract(migration, compiled)])
    sql = next(m for m in migration.mappings if m.name == "legacy_crm_accounts")
    expected = map_chunks(sql, [extract(migration, sql)])
    assert result.rows_read == expected.rows_read > 0
    assert sorted(result.records["name"]) == sorted(expected.records["name"])


def test_api_secrets_must_come_from_the_environment(tmp_path: Path) -> None:
    (tmp_path / "mappings").mkdir()
    (tmp_path / "project.yaml").write_text(
        "version: 1\nname: acme\nsources:\n  api: {connector: rest, base_url: 'https://crm', token: 'abc123'}\nmappings: []\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as caught:
        load_project(tmp_path)
    assert str(caught.value).endswith(
        "4:58: sources.api.token: token is a secret; write ${ENV_VAR} and export it"
    )
    assert "abc123" not in caught.value.render()


def test_where_filters_api_records_after_reading(
    api: tuple[str, SuiteCrmApi], accounts: list[dict[str, Any]]
) -> None:
    rest, _ = connector(api[0])
    frame = read_all(rest, where="industry is not null and lower(name) like '%科技%'")
    expected = [
        a["id"]
        for a in accounts
        if not a["deleted"] and a["industry"] is not None and "科技" in (a["name"] or "").lower()
    ]
    assert expected and list(frame["id"]) == expected
