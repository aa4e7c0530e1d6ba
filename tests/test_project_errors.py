"""project.yaml problems fail fast with file:line:col and what to do; secrets never appear in messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from crm_core.errors import ConfigError, ExtractError, TransientExtractError
from integration.connectors.sql import SqlConnector
from integration.pipeline import Migration
from integration.project import load_project

GOOD_MAPPING = "version: 1\nsource: {connector: crm, table: accounts, key: id}\ntarget: customer\nfields:\n  name: name\n"


def write_project(root: Path, text: str, mapping: str | None = GOOD_MAPPING) -> Path:
    (root / "mappings").mkdir(parents=True, exist_ok=True)
    if mapping is not None:
        (root / "mappings" / "crm_accounts.yaml").write_text(mapping, encoding="utf-8")
    (root / "project.yaml").write_text(text, encoding="utf-8")
    return root


HEADER = "version: 1\nname: acme\nsources:\n  crm: {connector: sql, url: 'sqlite:///crm.sqlite'}\n"

CASES = [
    ("unknown_key", HEADER + "mappings: [mappings/*.yaml]\nmapings: []\n",
     ["6:1: mapings: unknown key 'mapings'; did you mean 'mappings'?; allowed: chunk_rows, currencies, dedup, description, mappings, name, reconciliation, sources, sync, timezone, validation, version"]),
    ("missing_mapping_file", HEADER + "mappings: [mappings/nope.yaml]\n",
     ["5:12: mappings[0]: mapping file 'mappings/nope.yaml' not found in {root}"]),
    ("unset_env_var", "version: 1\nname: acme\nsources:\n  crm: {connector: sql, url: '${ACME_CRM_URL_UNSET}'}\nmappings: [mappings/*.yaml]\n",
     ["4:30: sources.crm.url: environment variable ACME_CRM_URL_UNSET is not set; export ACME_CRM_URL_UNSET=... first"]),
    ("password_in_file", "version: 1\nname: acme\nsources:\n  crm: {connector: sql, url: 'mysql+pymysql://root:hunter2@db/crm'}\nmappings: [mappings/*.yaml]\n",
     ["4:30: sources.crm.url: a password is written into the file; use ${ENV_VAR} for the URL or its password"]),
    ("odbc_password_in_file", "version: 1\nname: acme\nsources:\n  erp: {connector: odbc, connection_string: 'DSN=u8;UID=sa;PWD=hunter2'}\nmappings: [mappings/*.yaml]\n",
     ["4:45: sources.erp.connection_string: a password is written into the file; use PWD=${ENV_VAR}"]),
    ("odbc_unknown_encoding", "version: 1\nname: acme\nsources:\n  erp: {connector: odbc, connection_string: 'DSN=u8', encoding: gbkk}\nmappings: [mappings/*.yaml]\n",
     ["4:65: sources.erp.encoding: unknown encoding 'gbkk' (e.g. gbk, gb18030, big5, utf-8)"]),
    ("bad_source_name", "version: 1\nname: acme\nsources:\n  Legacy-CRM: {connector: sql, url: 'sqlite://'}\nmappings: [mappings/*.yaml]\n",
     ["4:3: sources: source name 'Legacy-CRM' must match ^[a-z][a-z0-9_]*$ (it names Dagster assets)"]),
    ("unknown_connector", "version: 1\nname: acme\nsources:\n  crm: {connector: oracle, url: 'x'}\nmappings: [mappings/*.yaml]\n",
     ["4:20: sources.crm.connector: 'oracle' is not allowed; allowed: excel, sql, odbc, rest, csv, k3cloud"]),
    ("misspelled_connector_key", "version: 1\nname: acme\nsources:\n  crm: {conector: sql, url: 'x'}\nmappings: [mappings/*.yaml]\n",
     ["4:9: sources.crm.conector: unknown key 'conector'; did you mean 'connector'?; allowed: excel, sql, odbc, rest, csv, k3cloud"]),
    ("missing_connector_key", "version: 1\nname: acme\nsources:\n  crm: {url: 'x'}\nmappings: [mappings/*.yaml]\n",
     ["4:3: sources.crm.connector: missing required key 'connector'; allowed: excel, sql, odbc, rest, csv, k3cloud"]),
    ("dedup_unknown_field", HEADER + "mappings: [mappings/*.yaml]\ndedup:\n  customer: {match_keys: [[credit_cod]]}\n",
     ["7:3: dedup: entity 'customer' has no field 'credit_cod'"]),
    ("dedup_unknown_source", HEADER + "mappings: [mappings/*.yaml]\ndedup:\n  customer: {source_priority: [erp]}\n",
     ["7:32: dedup.customer.source_priority[0]: unknown source 'erp'; sources: crm"]),
    ("survivorship_unknown_field",
     HEADER + "mappings: [mappings/*.yaml]\ndedup:\n  customer:\n    survivorship: {adress: most_complete}\n",
     ["8:19: dedup.customer.survivorship: unknown customer field(s) adress; fields: name, short_name, english_name, credit_code, credit_code_as_written, phone, email, website, address, province, city, district, industry, is_branch, owner_id, status, erp_code, credit_limit, payment_terms"]),
    ("survivorship_unknown_rule",
     HEADER + "mappings: [mappings/*.yaml]\ndedup:\n  customer:\n    survivorship: {phone: newest}\n",
     ["8:27: dedup.customer.survivorship.phone: 'newest' is not allowed; allowed: source_priority, most_recent, most_complete, most_frequent"]),
    ("currency_not_iso4217", HEADER + "currencies: {base: CNY, rates: {RMB: 1, USDD: 7.1, eur: 7.8}}\n",
     ["5:33: currencies.rates.RMB: 'RMB' is not an ISO 4217 currency code; did you mean CNY?",
      "5:41: currencies.rates.USDD: 'USDD' is not an ISO 4217 currency code; did you mean USD?",
      "5:52: currencies.rates.eur: 'eur' is not an ISO 4217 currency code; did you mean EUR?"]),
    ("base_currency_not_iso4217", HEADER + "currencies: {base: yuan, rates: {USD: 7.1}}\n",
     ["5:20: currencies.base: 'yuan' is not an ISO 4217 currency code"]),
    ("rate_not_positive", HEADER + "currencies:\n  rates: {USD: -7.1, EUR: abc}\n  dated: {USD: {2025-01-01: 0}}\n",
     ["6:16: currencies.rates.USD: a rate is a positive number (base-currency units per unit, e.g. 7.1), not -7.1",
      "6:27: currencies.rates.EUR: a rate is a positive number (base-currency units per unit, e.g. 7.1), not 'abc'",
      "7:29: currencies.dated.USD.2025-01-01: a rate is a positive number (base-currency units per unit, e.g. 7.1), not 0"]),
    ("base_rate_not_one", HEADER + "currencies: {base: CNY, rates: {CNY: 7.1}}\n",
     ["5:38: currencies.rates.CNY: CNY is the base currency: its rate is 1, not 7.1"]),
    ("dated_currency_without_rates", HEADER + "currencies: {dated: {USD: {}}}\n",
     ["5:27: currencies.dated.USD: no rates for USD; write {2025-01-01: 7.1, …}"]),
    ("quarantine_share_above_one", HEADER + "mappings: [mappings/*.yaml]\nreconciliation: {max_quarantined_share: 5}\n",
     ["6:41: reconciliation.max_quarantined_share: Input should be less than or equal to 1"]),
    ("quarantine_share_unknown_key", HEADER + "mappings: [mappings/*.yaml]\nreconciliation: {max_quarantine: 0.1}\n",
     ["6:18: reconciliation.max_quarantine: unknown key 'max_quarantine'; did you mean 'max_quarantined_share'?; allowed: max_quarantined_share"]),
    ("missing_name", "version: 1\nsources: {}\nmappings: []\n", ["1:1: name: missing required key 'name'"]),
    ("invalid_yaml", "version: 1\nname: [acme\n", ["3:1: invalid YAML: expected ',' or ']', but got '<stream end>'"]),
]  # fmt: skip


@pytest.mark.parametrize(("name", "text", "expected"), CASES, ids=[c[0] for c in CASES])
def test_project_problems_are_located(tmp_path: Path, name: str, text: str, expected: list[str]) -> None:
    root = write_project(tmp_path / name, text)
    with pytest.raises(ConfigError) as caught:
        load_project(root)
    file = root / "project.yaml"
    assert [str(p) for p in caught.value.problems] == [
        f"{file}:{e.replace('{root}', str(root))}" for e in expected
    ]
    assert "hunter2" not in str(caught.value) and "hunter2" not in caught.value.render()


def test_errors_render_the_line_with_a_caret(tmp_path: Path) -> None:
    root = write_project(tmp_path, HEADER + "mappings: [mappings/*.yaml]\nmapings: []\n")
    with pytest.raises(ConfigError) as caught:
        load_project(root)
    assert caught.value.render().splitlines()[1:] == ["    mapings: []", "    ^"]


def test_no_project_here_says_how_to_point_at_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no project\.yaml here; set CRM_PROJECT or --project"):
        load_project(tmp_path)


def test_bad_mapping_inside_a_project_is_reported_with_its_file(tmp_path: Path) -> None:
    root = write_project(
        tmp_path,
        HEADER + "mappings: [mappings/*.yaml]\n",
        mapping=GOOD_MAPPING.replace("name: name", "nmae: name"),
    )
    with pytest.raises(ConfigError) as caught:
        Migration.load(str(root))
    messages = [str(p) for p in caught.value.problems]
    assert messages[0].startswith(
        f"{root / 'mappings' / 'crm_accounts.yaml'}:5:3: fields.nmae: entity 'customer' has no field 'nmae'"
    )
    assert (
        messages[1]
        == f"{root / 'mappings' / 'crm_accounts.yaml'}:4:1: fields: required field 'name' of customer is not mapped"
    )


def test_env_var_default_and_value_are_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = "version: 1\nname: acme\nsources:\n  crm: {connector: sql, url: '${ACME_URL:-sqlite:///data/crm.sqlite}'}\nmappings: [mappings/*.yaml]\n"
    project = load_project(write_project(tmp_path, text))
    assert project.source_url("crm") == f"sqlite:///{(tmp_path / 'data' / 'crm.sqlite').resolve()}"
    monkeypatch.setenv("ACME_URL", "postgresql://u:pw@db/crm")
    assert project.source_url("crm") == "postgresql://u:pw@db/crm"


def test_unreachable_source_names_the_source_and_hides_the_password() -> None:
    connector = SqlConnector("legacy_crm", "postgresql+psycopg://crm:s3cret-pw@127.0.0.1:1/crm")
    with pytest.raises(ExtractError) as caught:
        connector.list_tables()
    message = str(caught.value)
    assert message.startswith(
        "source 'legacy_crm': listing tables failed at postgresql+psycopg://crm:***@127.0.0.1:1/crm"
    )
    assert "check the server is reachable" in message
    assert "s3cret-pw" not in message


def test_a_missing_sqlite_source_file_is_named_and_not_created(tmp_path: Path) -> None:
    # A typo in a sqlite:/// path: SQLite created an empty file and said "table 'accounts' does not exist
    # …; tables: " (none), or, in a missing folder, "check the server is reachable and the credentials".
    for db in (tmp_path / "legacy.sqlite", tmp_path / "data" / "legacy.sqlite"):
        with pytest.raises(ExtractError) as caught:
            SqlConnector("crm", f"sqlite:///{db}").columns("accounts")
        assert str(caught.value).startswith(f"source 'crm': no SQLite database file {db};")
        assert not isinstance(caught.value, TransientExtractError)
        assert not db.exists()


def test_unknown_table_lists_what_exists(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "crm.sqlite"
    sqlite3.connect(db).execute("CREATE TABLE accounts (id TEXT)").connection.commit()
    with pytest.raises(
        ExtractError, match=r"source 'crm': table 'acounts' does not exist at sqlite:///.*; tables: accounts"
    ):
        SqlConnector("crm", f"sqlite:///{db}").columns("acounts")


def test_a_project_without_a_mappings_key_reads_mappings_folder(tmp_path: Path) -> None:
    project = load_project(str(write_project(tmp_path, HEADER)))
    assert [p.name for p in project.mapping_files] == ["crm_accounts.yaml"]


def test_a_glob_that_matches_nothing_is_a_warning_not_an_error(tmp_path: Path) -> None:
    """A fresh project has no mapping yet: loading it warns (where, and how to write one) and goes on."""
    project = load_project(str(write_project(tmp_path, HEADER, mapping=None)))
    assert project.mapping_files == ()
    assert [str(w) for w in project.warnings] == [
        f"{tmp_path / 'project.yaml'}:1:1: mappings[0]: no mapping file matches 'mappings/*.yaml' in {tmp_path} "
        "yet (the default: project.yaml has no `mappings:`); write one with `crmi mapping scaffold`"
    ]  # a newcomer looked for a `mappings:` key in the file at 1:1 that was never written
    assert Migration(project).mappings == []


def test_loading_for_some_sources_turns_problems_elsewhere_into_warnings(tmp_path: Path) -> None:
    """Another source's bad key or unset variable, a sync target or dedup: warnings; the source read: errors."""
    text = (
        HEADER
        + "  erp: {connector: sql, url: '${ACME_ERP_URL_UNSET}'}\n"
        + "  old: {connector: sql, url: 'sqlite://', filter: x}\n"
        + "mappings: [mappings/*.yaml]\n"
        + "dedup:\n  customer: {source_priority: [old, erp, nope]}\n"
    )
    root = write_project(tmp_path, text)
    with pytest.raises(ConfigError):
        load_project(root)  # strict: what `crmi run` loads
    project = load_project(root, sources={"crm"})
    assert list(project.spec.sources) == ["crm", "erp"]  # the invalid one is left out
    assert [w.path for w in project.warnings] == [
        "sources.old.filter",
        "sources.erp.url",
        "dedup.customer.source_priority[0]",
        "dedup.customer.source_priority[2]",
    ]
    with pytest.raises(ConfigError) as caught:
        load_project(root, sources={"erp"})
    assert [p.path for p in caught.value.problems] == ["sources.erp.url"]
    with pytest.raises(ConfigError) as caught:
        load_project(root, sources={"old"})
    assert [p.path for p in caught.value.problems] == ["sources.old.filter"]
