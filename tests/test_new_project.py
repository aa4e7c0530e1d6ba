"""A new engagement as the README tells a newcomer: the smallest project.yaml, a scaffolded mapping, a run."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa
from openpyxl import Workbook
from typer.testing import CliRunner

from crm_core.errors import ConfigError
from integration.assets.resources import dispose_engines
from integration.cli import app

LEDGER = [
    ["客户名称", "统一社会信用代码", "联系电话", "地址", "联系人"],
    ["深圳市腾达科技有限公司", "91440300708461136T", "0755-86013388", "广东省深圳市南山区科技园", "张伟"],
    ["腾达科技（深圳）有限公司", "91440300708461136T", "86013388", "深圳南山区科技园", None],  # the same firm
    ["无锡市科众贸易有限公司", None, "0510-85201234", "江苏无锡新吴区学院路12号", "李娜"],
]


@pytest.fixture
def acme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder with one workbook (no id column) and the smallest project.yaml."""
    root = tmp_path / "acme"
    (root / "data").mkdir(parents=True)
    workbook = Workbook()
    sheet = workbook.active
    assert sheet is not None
    sheet.title = "客户"
    for row in LEDGER:
        sheet.append(row)
    workbook.save(root / "data" / "ledger.xlsx")
    (root / "project.yaml").write_text(
        "version: 1\nname: acme\nsources:\n  ledger: {connector: excel, path: data/ledger*.xlsx}\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(root)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    (tmp_path / "dagster_home").mkdir()
    return root


def test_a_scaffolded_sheet_mapping_runs_on_the_smallest_project(acme: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = acme / "mappings" / "ledger_customers.yaml"
    out.parent.mkdir()
    scaffold = runner.invoke(
        app,
        ["mapping", "scaffold", "-p", str(acme), "--source", "ledger", "--table", "客户", "--out", str(out)],
    )
    assert scaffold.exit_code == 0, scaffold.output
    text = out.read_text(encoding="utf-8")
    assert "hash: [客户名称, 统一社会信用代码]" in text  # no id column: a stable key, not row positions
    assert "from: 联系电话" in text

    core = f"sqlite:///{tmp_path / 'core.sqlite'}"
    created = runner.invoke(app, ["core", "upgrade", "--core-url", core])
    assert created.exit_code == 0 and created.stdout.startswith(f"core created at {core} (schema "), (
        created.output
    )
    again = runner.invoke(app, ["core", "upgrade", "--core-url", core])
    assert "nothing to do" in again.stdout and "created" not in again.stdout, again.output
    result = runner.invoke(app, ["run", "--project", str(acme), "--core-url", core])
    dispose_engines()
    assert result.exit_code == 0, result.output
    engine = sa.create_engine(core)
    with engine.connect() as connection:
        names = connection.scalars(sa.text("SELECT name FROM customers WHERE merged_into_id IS NULL")).all()
    engine.dispose()
    # Without a dedup block, the same credit code still makes one customer (the default match keys).
    assert sorted(names) == ["无锡市科众贸易有限公司", "深圳市腾达科技有限公司"]


def test_make_steward_serves_the_project_crm_project_names(tmp_path: Path) -> None:
    # README step 6 has a newcomer export CRM_PROJECT (and CRM_CORE_URL) for `make ui`; `make steward` then
    # served the demo's merge rules over the new engagement's core.
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "CRM_PROJECT": "projects/acme"}
    dry = subprocess.run(
        ["make", "-n", "-C", str(root), "steward"], env=env, capture_output=True, text=True, check=True
    )
    assert "serve --project projects/acme" in dry.stdout
    env.pop("CRM_PROJECT")
    dry = subprocess.run(
        ["make", "-n", "-C", str(root), "steward"], env=env, capture_output=True, text=True, check=True
    )
    assert "serve --project examples/demo" in dry.stdout


def test_a_core_another_project_loaded_is_refused_before_any_run(
    acme: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A newcomer who forgot --project/CRM_PROJECT ran the demo into a client's core. A migration into a core
    another project loaded now stops before it starts a run, naming both projects, and loads nothing; a step
    started from the Dagster UI is refused the same way; CRMI_ALLOW_OTHER_PROJECT=1 lets it through."""
    from integration.pipeline import start_run

    runner = CliRunner()
    out = acme / "mappings" / "ledger_customers.yaml"
    out.parent.mkdir()
    scaffold = runner.invoke(app, ["mapping", "scaffold", "-p", str(acme), "--source", "ledger",
                                   "--table", "客户", "--out", str(out)])  # fmt: skip
    assert scaffold.exit_code == 0, scaffold.output
    core = f"sqlite:///{tmp_path / 'core.sqlite'}"
    assert runner.invoke(app, ["run", "--project", str(acme), "--core-url", core]).exit_code == 0
    dispose_engines()
    beta = tmp_path / "beta"
    shutil.copytree(acme, beta)
    (beta / "project.yaml").write_text(
        (beta / "project.yaml").read_text(encoding="utf-8").replace("name: acme", "name: beta"),
        encoding="utf-8",
    )
    engine = sa.create_engine(core)

    def state() -> tuple[int, int]:
        with engine.connect() as connection:
            return (
                connection.scalar(sa.text("SELECT count(*) FROM load_runs")),
                connection.scalar(sa.text("SELECT count(*) FROM customers")),
            )

    before = state()
    refused = runner.invoke(app, ["run", "--project", str(beta), "--core-url", core, "--new-run"])
    dispose_engines()
    assert refused.exit_code == 1, refused.output
    assert "this core holds project 'acme'" in refused.output and "not 'beta'" in refused.output, (
        refused.output
    )
    assert "CRMI_ALLOW_OTHER_PROJECT=1" in refused.output
    assert state() == before
    with pytest.raises(ConfigError, match="holds project 'acme'"):
        start_run(engine, "from-the-ui", "beta", "full")
    assert state() == before
    monkeypatch.setenv("CRMI_ALLOW_OTHER_PROJECT", "1")
    allowed = runner.invoke(app, ["run", "--project", str(beta), "--core-url", core, "--new-run"])
    dispose_engines()
    assert allowed.exit_code == 0, allowed.output
    assert state()[0] == before[0] + 1
    engine.dispose()
