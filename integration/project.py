"""The migration project: one folder per engagement, described by ``project.yaml``.

A project names its sources (connection settings, secrets only as ``${ENV_VAR}``), the mapping files
that turn source rows into canonical entities, and the dedup settings. Loading checks everything it
can before any data moves and reports every problem as ``file:line:col: path: message``.
"""

from __future__ import annotations

import codecs
import glob
import os
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from sqlalchemy.engine import make_url

from crm_core.entities import ENTITIES
from crm_core.errors import ConfigError, Problem
from crm_core.merging import SURVIVORSHIP_FIELDS, SurvivorshipRule
from crm_core.validation import RuleSpec, builtin_rules
from integration.dedup.spec import LinkageConfig
from integration.mappings.money import CurrenciesConfig, currency_problems
from integration.sync.spec import CompiledTarget, SyncTarget, compile_sync, sync_warnings
from integration.yamlconf import (
    LocatedDocument,
    close_names,
    env_references,
    expand_env,
    load_yaml,
    pydantic_problems,
    time_zone,
    validate_document,
)

PROJECT_FILE = "project.yaml"
DEFAULT_PROJECT = Path("examples/demo")
NAME_PATTERN = r"^[a-z][a-z0-9_]*$"  # becomes part of Dagster asset names


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def known_encoding(value: str | None) -> str | None:
    """Validate a Python codec name (gbk, gb18030, big5, utf-8…)."""
    if value is not None:
        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(f"unknown encoding '{value}' (e.g. gbk, gb18030, big5, utf-8)") from None
    return value


class ExcelSource(_Strict):
    """Spreadsheets: one workbook or a glob of them (relative to the project folder)."""

    connector: Literal["excel"]
    path: str = Field(description="workbook path or glob, relative to the project folder")
    description: str | None = None


class SqlSource(_Strict):
    """A database reached through SQLAlchemy (SQLite, PostgreSQL, MariaDB/MySQL, SQL Server)."""

    connector: Literal["sql"]
    url: str = Field(description="SQLAlchemy URL; put secrets in ${ENV_VARS}")
    db_schema: str | None = Field(default=None, alias="schema")
    reader: Literal["auto", "sqlalchemy"] = Field(
        default="auto",
        description="auto: PostgreSQL and MariaDB/MySQL tables stream through ConnectorX (Arrow); "
        "sqlalchemy: always read through the SQLAlchemy driver",
    )
    description: str | None = None


class OdbcSource(_Strict):
    """A database reached through an ODBC driver (pyodbc): a DSN or a full connection string."""

    connector: Literal["odbc"]
    connection_string: str = Field(description="e.g. DSN=u8;UID=${U8_USER};PWD=${U8_PASSWORD}")
    encoding: str | None = Field(default=None, description="code page of CHAR columns, e.g. gbk or gb18030")
    db_schema: str | None = Field(default=None, alias="schema")
    description: str | None = None

    _known_encoding = field_validator("encoding")(known_encoding)


class RestSource(_Strict):
    """A legacy CRM's HTTP API. ``profile: suitecrm_v8`` fills in the SuiteCRM 8 JSON:API conventions."""

    connector: Literal["rest"]
    base_url: str
    profile: Literal["suitecrm_v8"] | None = None
    auth: Literal["none", "bearer", "basic", "login"] | None = None
    token: str | None = Field(default=None, description="bearer token: ${ENV_VAR} only")
    username: str | None = None
    password: str | None = Field(default=None, description="basic auth password: ${ENV_VAR} only")
    login_path: str | None = None
    login_body: dict[str, str] | None = Field(
        default=None, description="e.g. client_id/client_secret; secrets as ${ENV_VAR}"
    )
    pagination: Literal["none", "page_number", "offset", "cursor", "next_link"] | None = None
    page_size: int | None = Field(default=None, ge=1, le=10_000)
    records_field: str | None = None
    incremental_param: str | None = None
    timeout: float = Field(default=30.0, gt=0)
    max_retries: int = Field(default=5, ge=0, le=20)
    description: str | None = None


class K3CloudTableSpec(_Strict):
    """A table of a K3Cloud source: a form (FormId) read with field keys; each becomes a column."""

    form: str = Field(description="FormId, e.g. AR_receivable, AR_RECEIVEBILL, BD_Customer")
    fields: list[str] | dict[str, str] = Field(
        description="field keys (FCUSTOMERID.FNumber becomes column FCUSTOMERID_FNumber), or column: field key"
    )
    filter: str = Field(default="", description="FilterString always applied, e.g. FDOCUMENTSTATUS = 'C'")

    def columns(self) -> dict[str, str]:
        """Return column -> field key."""
        if isinstance(self.fields, dict):
            return dict(self.fields)
        return {key.replace(".", "_"): key for key in self.fields}


class K3CloudSource(_Strict):
    """Kingdee K3Cloud read through its WebAPI (ExecuteBillQuery); see docs/k3cloud.md."""

    connector: Literal["k3cloud"]
    base_url: str = Field(description="the K3Cloud site, e.g. http://erp.example.com/k3cloud")
    acct_id: str
    username: str
    password: str | None = Field(default=None, description="${ENV_VAR} only")
    app_id: str | None = None
    app_secret: str | None = Field(default=None, description="${ENV_VAR} only")
    lcid: int = 2052
    org_num: str = "0"
    page_size: int = Field(default=2000, ge=1, le=10_000)
    timeout: float = Field(default=30.0, gt=0)
    tables: dict[str, K3CloudTableSpec] = Field(description="table name -> form and field keys")
    description: str | None = None


class CsvSource(_Strict):
    """Delimited text exports: one file or a glob (relative to the project folder)."""

    connector: Literal["csv"]
    path: str
    encoding: str = Field(default="utf-8", description="utf-8, or gb18030/gbk for Chinese Windows exports")
    delimiter: str = Field(default=",", min_length=1, max_length=1)
    description: str | None = None

    _known_encoding = field_validator("encoding")(known_encoding)


SourceConfig = Annotated[
    ExcelSource | SqlSource | OdbcSource | RestSource | CsvSource | K3CloudSource,
    Field(discriminator="connector"),
]


class EntityDedup(_Strict):
    """Exact-key matching for one entity (issue 'Customer dedup' adds probabilistic linkage)."""

    match_keys: list[list[str]] = Field(
        default_factory=list,
        description="each entry is a list of fields that must all be equal and non-empty to match",
    )
    conflict_fields: list[str] = Field(
        default_factory=list, description="records whose non-empty values differ here never match"
    )
    source_priority: list[str] = Field(
        default_factory=list, description="sources loaded first win; later ones only fill blanks"
    )
    survivorship: dict[str, SurvivorshipRule] = Field(
        default_factory=dict,
        description="customers: field -> how a golden record picks its value across merged records "
        "(source_priority, most_recent, most_complete, most_frequent); other fields keep the survivor's "
        "value and fill blanks by source priority",
    )
    linkage: LinkageConfig | None = Field(
        default=None, description="record-linkage rules (customers; defaults apply when absent)"
    )

    @field_validator("survivorship")
    @classmethod
    def _survivorship_fields(cls, value: dict[str, SurvivorshipRule]) -> dict[str, SurvivorshipRule]:
        unknown = [f for f in value if f not in SURVIVORSHIP_FIELDS]
        if unknown:
            raise ValueError(
                f"unknown customer field(s) {', '.join(unknown)}; fields: {', '.join(SURVIVORSHIP_FIELDS)}"
            )
        return value


class ProjectRule(_Strict):
    """A project's own validation rule: exactly one of required, pattern, one_of, min/max, unique."""

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_.]*$")]
    entity: str
    field: str
    severity: Literal["error", "warn"] = "error"
    required: bool = False
    pattern: str | None = None
    one_of: list[str | int | float] | None = None
    min: float | None = None
    max: float | None = None
    unique: bool = False
    message: str | None = Field(default=None, description="what the quarantine says instead of the default")

    @model_validator(mode="after")
    def _one_kind(self) -> ProjectRule:
        if self.entity not in ENTITIES:
            raise ValueError(f"unknown entity '{self.entity}'; known: {', '.join(ENTITIES)}")
        fields = ENTITIES[self.entity].fields
        if self.field not in fields:
            raise ValueError(f"{self.entity} has no field '{self.field}'{close_names(self.field, fields)}")
        kinds = [self.required, self.pattern is not None, self.one_of is not None,
                 self.min is not None or self.max is not None, self.unique]  # fmt: skip
        if sum(kinds) != 1:
            raise ValueError("give exactly one of: required, pattern, one_of, min/max, unique")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern is not a valid regular expression: {exc}") from None
        return self

    def spec(self) -> RuleSpec:
        """Return the rule in crm_core's terms."""
        return RuleSpec(**self.model_dump())


class ValidationConfig(_Strict):
    """Validation settings: built-in rule severities, the project's own rules, the reject-ratio stop."""

    severity: dict[str, Literal["error", "warn", "off"]] = Field(
        default_factory=dict, description="built-in rule name -> error | warn | off"
    )
    rules: list[ProjectRule] = Field(default_factory=list)
    max_reject_ratio: float = Field(
        default=0.5, ge=0, le=1, description="a source rejecting a larger share of its rows stops the load"
    )

    @field_validator("severity")
    @classmethod
    def _known_rules(cls, value: dict[str, str]) -> dict[str, str]:
        known = {rule.name for rule in builtin_rules()}
        for name in value:
            if name not in known:
                raise ValueError(f"unknown built-in rule '{name}'{close_names(name, known)}")
        return value


class ReconciliationConfig(_Strict):
    """When a run that balances still fails: too much of a source's rows or money left in quarantine."""

    max_quarantined_share: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="largest share of a source's record rows or money (per entity) that may be quarantined "
        "(rejected or waiting for a steward) in a run that passes; above it `crmi run` exits 2",
    )


class ProjectSpec(_Strict):
    """Schema of ``project.yaml``."""

    version: Literal[1]
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    description: str | None = None
    sources: dict[str, SourceConfig]
    mappings: list[str] = Field(
        default_factory=lambda: ["mappings/*.yaml"],
        description="mapping files or globs, relative to the project folder (default: mappings/*.yaml)",
    )
    dedup: dict[str, EntityDedup] = Field(default_factory=dict)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    currencies: CurrenciesConfig | None = Field(
        default=None, description="base currency and rates for mapping fields that convert amounts"
    )
    reconciliation: ReconciliationConfig = Field(default_factory=ReconciliationConfig)
    chunk_rows: int = Field(
        default=50_000,  # integration.connectors.base.DEFAULT_CHUNK_ROWS (that package imports this module)
        ge=1,
        description="rows of a source read, staged and loaded at a time: each step holds one such piece (and "
        "what linkage needs), whatever the source's size",
    )
    sync: dict[str, SyncTarget] = Field(
        default_factory=dict, description="target systems the core stays in step with after go-live"
    )
    timezone: str = Field(
        default="UTC",
        description="the project's time zone (IANA name, e.g. Asia/Shanghai): the steward workbench shows "
        "instants in it, named; the core stores them in UTC",
    )

    @field_validator("sources")
    @classmethod
    def _source_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"source name '{name}' must match {NAME_PATTERN} (it names Dagster assets)")
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        return time_zone(value)

    @field_validator("sync")
    @classmethod
    def _target_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not re.match(NAME_PATTERN, name) or len(name) > 20:
                raise ValueError(
                    f"sync target name '{name}' must match {NAME_PATTERN} and have at most 20 characters "
                    "(it names Dagster jobs and run keys)"
                )
        return value

    @field_validator("dedup")
    @classmethod
    def _dedup_entities(cls, value: dict[str, EntityDedup]) -> dict[str, EntityDedup]:
        for name, rules in value.items():
            if name not in ENTITIES:
                raise ValueError(f"unknown entity '{name}'; known: {', '.join(ENTITIES)}")
            if rules.linkage is not None and name != "customer":
                raise ValueError(f"linkage rules are for customers; '{name}' supports match_keys only")
            fields = ENTITIES[name].fields
            for key in [*(f for k in rules.match_keys for f in k), *rules.conflict_fields]:
                if key not in fields:
                    raise ValueError(f"entity '{name}' has no field '{key}'")
        return value


@dataclass(frozen=True)
class Project:
    """A loaded, checked project: its folder, spec, and the document positions for later errors."""

    root: Path
    spec: ProjectSpec
    document: LocatedDocument
    mapping_files: tuple[Path, ...]
    warnings: tuple[Problem, ...] = ()  # not errors: e.g. a mappings glob that matches nothing yet
    sync: dict[str, CompiledTarget] = field(default_factory=dict)  # checked ``sync:`` targets

    @property
    def name(self) -> str:
        """Return the project's name."""
        return self.spec.name

    def source_url(self, source: str) -> str:
        """Return the expanded connection URL (with secrets) of a SQL source; never log it."""
        config = self.spec.sources[source]
        assert isinstance(config, SqlSource)
        return resolve_sqlite_path(expand_env(config.url), self.root)

    def source_connection_string(self, source: str) -> str:
        """Return the expanded ODBC connection string (with secrets) of an ODBC source; never log it."""
        config = self.spec.sources[source]
        assert isinstance(config, OdbcSource)
        return expand_env(config.connection_string)

    def rest_settings(self, source: str) -> dict[str, object]:
        """Return the REST settings of a source (profile defaults, then the file's values, secrets expanded)."""
        from integration.connectors.rest import SUITECRM_V8

        config = self.spec.sources[source]
        assert isinstance(config, RestSource)
        settings: dict[str, object] = dict(SUITECRM_V8) if config.profile == "suitecrm_v8" else {}
        for key in ("auth", "token", "username", "password", "login_path", "pagination", "page_size",
                    "records_field", "incremental_param", "timeout", "max_retries"):  # fmt: skip
            value = getattr(config, key)
            if value is not None:
                settings[key] = expand_env(value) if isinstance(value, str) else value
        if config.login_body is not None:
            settings["login_body"] = {k: expand_env(v) for k, v in config.login_body.items()}
        settings["base_url"] = expand_env(config.base_url)
        return settings

    def k3cloud_settings(self, source: str) -> Any:
        """Return the K3Cloud connector settings of a source (secrets expanded; never log them)."""
        from integration.connectors.k3cloud import FormTable, K3CloudCredentials, K3CloudSettings

        config = self.spec.sources[source]
        assert isinstance(config, K3CloudSource)

        def value(text: str | None) -> str | None:
            return expand_env(text) if text else None

        credentials = K3CloudCredentials(
            base_url=expand_env(config.base_url), acct_id=expand_env(config.acct_id),
            username=expand_env(config.username), password=value(config.password), app_id=value(config.app_id),
            app_secret=value(config.app_secret), lcid=config.lcid, org_num=expand_env(config.org_num),
        )  # fmt: skip
        tables = {name: FormTable(t.form, t.columns(), t.filter) for name, t in config.tables.items()}
        return K3CloudSettings(credentials, tables, page_size=config.page_size, timeout=config.timeout)

    def source_paths(self, source: str) -> list[Path]:
        """Return the files an Excel or CSV source's glob matches, sorted."""
        config = self.spec.sources[source]
        assert isinstance(config, ExcelSource | CsvSource)
        pattern = str(self.root / expand_env(config.path))
        return sorted(Path(p) for p in glob.glob(pattern, recursive=True))


def resolve_sqlite_path(url: str, root: Path) -> str:
    """Make a relative SQLite file path in ``url`` relative to the project folder."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        db_path = Path(parsed.database)
        if not db_path.is_absolute():
            return parsed.set(database=str((root / db_path).resolve())).render_as_string(hide_password=False)
    return url


def project_dir(path: str | Path | None = None) -> Path:
    """Return the project folder: ``path``, else ``$CRM_PROJECT``, else ``examples/demo``."""
    return Path(path or os.environ.get("CRM_PROJECT") or DEFAULT_PROJECT)


def load_project(path: str | Path | None = None, *, sources: Collection[str] | None = None) -> Project:
    """Load and check a project folder; raise ConfigError with every problem found.

    With ``sources`` (the sources some mappings read: ``crmi mapping preview``/``check``), only the project's
    settings and those sources must be valid: problems of other sources (an unset variable, a bad key), of
    the mapping file list, sync targets and dedup become the project's warnings instead. ``crmi run`` loads
    strictly.
    """
    root = project_dir(path)
    file = root / PROJECT_FILE if root.is_dir() or not root.suffix else root
    if file.name != PROJECT_FILE and file.is_file():
        root = file.parent
    if not file.is_file():
        raise ConfigError(
            Problem(f"no {PROJECT_FILE} here; set CRM_PROJECT or --project to a project folder", file)
        )
    root = file.parent
    document = load_yaml(file)
    spec, skipped = _validate(document, sources)
    problems = _check_env(document, spec) + _check_secrets(document, spec)
    problems += currency_problems(document, spec.currencies)
    mapping_files, mapping_problems, warnings = _mapping_files(document, spec, root)
    problems += mapping_problems
    sync, sync_problems = compile_sync(
        document, spec.sync, list(spec.sources), {path.stem: path for path in mapping_files}
    )
    problems += sync_problems
    if not sync_problems:
        warnings += sync_warnings(document, sync)
    for entity_name, rules in spec.dedup.items():
        for i, source in enumerate(rules.source_priority):
            if source not in spec.sources:
                problems.append(
                    document.problem(
                        ("dedup", entity_name, "source_priority", i),
                        f"unknown source '{source}'; sources: {', '.join(spec.sources)}",
                    )
                )
    if sources is not None:
        warnings = [*skipped, *(p for p in problems if _elsewhere(p, sources)), *warnings]
        problems = [p for p in problems if not _elsewhere(p, sources)]
    if problems:
        raise ConfigError(problems)
    return Project(
        root=root.resolve(),
        spec=spec,
        document=document,
        mapping_files=tuple(mapping_files),
        warnings=tuple(warnings),
        sync=sync,
    )


_ELSEWHERE = ("mappings", "sync", "dedup")  # sections a mapping's preview or check does not read


def _elsewhere(problem: Problem, sources: Collection[str]) -> bool:
    """Return True when a project.yaml problem concerns neither the settings nor one of ``sources``."""
    head, _, rest = problem.path.partition(".")
    head = head.split("[")[0]
    if head in _ELSEWHERE:
        return True
    return head == "sources" and bool(rest) and rest.split(".")[0] not in sources


def _validate(
    document: LocatedDocument, sources: Collection[str] | None
) -> tuple[ProjectSpec, list[Problem]]:
    """Validate project.yaml; with ``sources``, leave out the invalid parts not needed (returned as problems)."""
    if sources is None:
        return validate_document(document, ProjectSpec), []
    try:
        return ProjectSpec.model_validate(document.data), []
    except ValidationError as exc:
        problems = pydantic_problems(document, ProjectSpec, exc)
    if not isinstance(document.data, dict) or not all(_elsewhere(p, sources) for p in problems):
        raise ConfigError([p for p in problems if not _elsewhere(p, sources)] or problems)
    data = dict(document.data)
    for problem in problems:
        head, _, rest = problem.path.partition(".")
        head = head.split("[")[0]
        if head == "sources" and isinstance(data.get("sources"), dict):
            data["sources"] = {k: v for k, v in data["sources"].items() if k != rest.split(".")[0]}
        else:
            data.pop(head, None)  # an optional section: its default applies
    try:
        return ProjectSpec.model_validate(data), problems
    except ValidationError:
        raise ConfigError(problems) from None


def _templates(spec: ProjectSpec) -> list[tuple[tuple[str, ...], str]]:
    found: list[tuple[tuple[str, ...], str]] = []
    for name, source in spec.sources.items():
        if isinstance(source, SqlSource):
            found.append((("sources", name, "url"), source.url))
        elif isinstance(source, OdbcSource):
            found.append((("sources", name, "connection_string"), source.connection_string))
        elif isinstance(source, RestSource):
            found.append((("sources", name, "base_url"), source.base_url))
            for key in ("token", "username", "password"):
                value = getattr(source, key)
                if value:
                    found.append((("sources", name, key), value))
            for key, value in (source.login_body or {}).items():
                found.append((("sources", name, "login_body", key), value))
        elif isinstance(source, ExcelSource | CsvSource):
            found.append((("sources", name, "path"), source.path))
        elif isinstance(source, K3CloudSource):
            for key in ("base_url", "acct_id", "username", "password", "app_id", "app_secret", "org_num"):
                value = getattr(source, key)
                if value:
                    found.append((("sources", name, key), value))
    return found


def _check_env(document: LocatedDocument, spec: ProjectSpec) -> list[Problem]:
    problems = []
    for path, template in _templates(spec):
        for name, default in env_references(template):
            if default is None and not os.environ.get(name):
                problems.append(
                    document.problem(path, f"environment variable {name} is not set; export {name}=... first")
                )
    return problems


def _check_secrets(document: LocatedDocument, spec: ProjectSpec) -> list[Problem]:
    problems = []
    for name, source in spec.sources.items():
        if isinstance(source, K3CloudSource):
            for key in ("password", "app_secret"):
                value = getattr(source, key)
                if value and "${" not in value:
                    problems.append(
                        document.problem(
                            ("sources", name, key), f"{key} is a secret; write ${{ENV_VAR}} and export it"
                        )
                    )
            if not source.password and not (source.app_id and source.app_secret):
                problems.append(
                    document.problem(
                        ("sources", name), "give password, or app_id and app_secret", at_key=True
                    )
                )
            continue
        if isinstance(source, RestSource):
            secrets = {"token": source.token, "password": source.password}
            secrets.update(
                {
                    f"login_body.{k}": v
                    for k, v in (source.login_body or {}).items()
                    if "secret" in k or "password" in k
                }
            )
            for key, value in secrets.items():
                if value and "${" not in value:
                    problems.append(
                        document.problem(
                            ("sources", name, *key.split(".")),
                            f"{key} is a secret; write ${{ENV_VAR}} and export it",
                        )
                    )
            continue
        if isinstance(source, OdbcSource):
            literal = re.sub(r"\$\{[^}]*\}", "", source.connection_string)
            if re.search(r"(?:PWD|PASSWORD)\s*=\s*[^;\s]", literal, re.IGNORECASE):
                problems.append(
                    document.problem(
                        ("sources", name, "connection_string"),
                        "a password is written into the file; use PWD=${ENV_VAR}",
                    )
                )
            continue
        if not isinstance(source, SqlSource):
            continue
        literal = re.sub(r"\$\{[^}]*\}", "", source.url)
        if re.search(r"://[^/@]*:[^/@]+@", literal):
            problems.append(
                document.problem(
                    ("sources", name, "url"),
                    "a password is written into the file; use ${ENV_VAR} for the URL or its password",
                )
            )
    return problems


def _mapping_files(
    document: LocatedDocument, spec: ProjectSpec, root: Path
) -> tuple[list[Path], list[Problem], list[Problem]]:
    """Return the mapping files, the errors (a named file that does not exist) and the warnings.

    A glob that matches nothing is a warning: a fresh project has no mapping yet (``crmi mapping
    scaffold`` writes the first one).
    """
    files: list[Path] = []
    problems: list[Problem] = []
    warnings: list[Problem] = []
    written = isinstance(document.data, dict) and "mappings" in document.data
    for i, pattern in enumerate(spec.mappings):
        matches = sorted(Path(p) for p in glob.glob(str(root / pattern)))
        if not matches:
            if glob.has_magic(pattern):
                default = "" if written else " (the default: project.yaml has no `mappings:`)"
                warnings.append(
                    document.problem(
                        ("mappings", i),
                        f"no mapping file matches '{pattern}' in {root} yet{default}; "
                        "write one with `crmi mapping scaffold`",
                    )
                )
            else:
                problems.append(
                    document.problem(("mappings", i), f"mapping file '{pattern}' not found in {root}")
                )
        files.extend(m for m in matches if m not in files)
    return files, problems, warnings
