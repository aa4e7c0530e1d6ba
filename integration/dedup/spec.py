"""Record-linkage rules as project configuration (``dedup.customer.linkage`` in project.yaml).

Validated like every other config file: unknown keys, unknown columns (with close names), methods,
levels and thresholds are reported as ``file:line:col``. Kept free of heavy imports: ``to_spec`` loads
the linkage engine only when rules are used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    from integration.dedup.linkage import LinkageSpec

# The columns linkage sees for a customer (see integration.dedup.customers.customer_records).
CUSTOMER_COLUMNS = (
    "name",
    "name_core",
    "region",
    "branch",
    "trade",
    "trade_rare",
    "name_sound",
    "trade_pinyin",
    "credit_code",
    "org_code",
    "phone",
    "phones",
    "email_domain",
    "city",
    "province",
    "district",
    "address_key",
)
Method = Literal[
    "exact", "jaro_winkler", "levenshtein", "token_set", "prefix", "name", "identifier", "overlap", "rare"
]


def _close(name: str) -> str:
    import difflib

    found = difflib.get_close_matches(name, CUSTOMER_COLUMNS, n=1, cutoff=0.6)
    return f"; did you mean '{found[0]}'?" if found else f"; columns: {', '.join(CUSTOMER_COLUMNS)}"


def _check_column(name: str) -> str:
    if name not in CUSTOMER_COLUMNS:
        raise ValueError(f"unknown column '{name}'{_close(name)}")
    return name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ComparisonConfig(_Strict):
    """One comparison: a column, a method and similarity levels (highest first)."""

    field: str
    method: Method = "jaro_winkler"
    levels: Annotated[list[Annotated[float, Field(gt=0, le=1)]], Field(min_length=1)] = [0.92]

    @field_validator("field")
    @classmethod
    def _known(cls, value: str) -> str:
        return _check_column(value)

    @field_validator("levels")
    @classmethod
    def _descending(cls, value: list[float]) -> list[float]:
        if value != sorted(value, reverse=True) or len(set(value)) != len(value):
            raise ValueError("levels must be distinct and highest first, e.g. [0.95, 0.85]")
        return value


class NeighbourhoodConfig(_Strict):
    """Sorted-neighbourhood indexing: sort by a column, pair records within a window."""

    column: str
    window: Annotated[int, Field(ge=3)] = 5

    @field_validator("column")
    @classmethod
    def _known(cls, value: str) -> str:
        return _check_column(value)

    @field_validator("window")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("window must be odd (the record plus as many neighbours on each side)")
        return value


class LinkageConfig(_Strict):
    """Blocking, comparisons, classifier and bands for customer record linkage.

    Every key is optional: one left out takes the built-in rule (``customers.CUSTOMER_SPEC``), so a project
    can change one threshold alone. The defaults below are the built-in ones (a test holds them equal).
    """

    blocks: list[list[str]] | None = Field(
        default=None,
        description="each block pairs records equal on all its columns; blocks are unioned "
        "(omitted: the built-in blocks)",
    )
    sorted_neighbourhood: list[NeighbourhoodConfig] | None = Field(
        default=None, description="omitted: the built-in neighbourhood (name_core, window 5); [] for none"
    )
    comparisons: Annotated[list[ComparisonConfig], Field(min_length=1)] | None = Field(
        default=None, description="omitted: the built-in comparisons"
    )
    classifier: Literal["auto", "ecm", "supervised"] = Field(
        default="auto", description="auto: supervised once stewards labelled enough pairs, else ECM"
    )
    auto_merge: Annotated[float, Field(gt=0, le=1)] = 0.95
    review: Annotated[float, Field(gt=0, le=1)] = 0.5
    hard_keys: list[str] = Field(default_factory=lambda: ["credit_code", "branch"])
    location_keys: list[str] = Field(
        default_factory=lambda: ["city", "province"],
        description="a record's reconciled location; two records placed differently are distinct",
    )
    merge_requires: list[str] = Field(
        default_factory=lambda: ["name_core", "credit_code", "phones", "email_domain"],
        description="columns of which at least one comparison must agree for an automatic merge",
    )
    sure_when: list[list[str]] = Field(
        default_factory=lambda: [
            ["name_core", "credit_code"],
            ["name_core", "phones"],
            ["name_core", "email_domain"],
        ],
        description="groups of columns whose comparisons, all agreeing, make a pair a match whatever the classifier",
    )
    max_cluster: Annotated[int, Field(ge=2)] = 10
    max_block: Annotated[int, Field(ge=2)] = Field(
        default=200, description="block keys shared by more records are skipped (too common to tell)"
    )

    @field_validator("blocks")
    @classmethod
    def _blocks(cls, value: list[list[str]] | None) -> list[list[str]] | None:
        for block in value or ():
            if not block:
                raise ValueError("a block needs at least one column")
            for column in block:
                _check_column(column)
        return value

    @field_validator("sure_when")
    @classmethod
    def _groups(cls, value: list[list[str]]) -> list[list[str]]:
        for group in value:
            for column in group:
                _check_column(column)
        return value

    @field_validator("hard_keys", "location_keys", "merge_requires")
    @classmethod
    def _hard_keys(cls, value: list[str]) -> list[str]:
        for column in value:
            _check_column(column)
        return value

    @model_validator(mode="after")
    def _bands(self) -> LinkageConfig:
        if self.review >= self.auto_merge:
            raise ValueError(f"review ({self.review}) must be below auto_merge ({self.auto_merge})")
        return self

    def to_spec(self) -> LinkageSpec:
        """Return the engine's spec: the keys written here, the built-in rules for the others."""
        from integration.dedup.customers import CUSTOMER_SPEC
        from integration.dedup.linkage import Comparison, LinkageSpec

        # A comparison written out keeps the built-in one's feature name (name_core_levenshtein, not
        # name_core_name): steward decisions store features by name, and train whichever spec reads them.
        built_in = {(c.field, c.method): c.label for c in CUSTOMER_SPEC.comparisons}
        comparisons = (
            list(CUSTOMER_SPEC.comparisons)
            if self.comparisons is None
            else [
                Comparison(c.field, c.method, tuple(c.levels), label=built_in.get((c.field, c.method)))
                for c in self.comparisons
            ]
        )
        return LinkageSpec(
            blocks=list(CUSTOMER_SPEC.blocks) if self.blocks is None else [tuple(b) for b in self.blocks],
            sorted_neighbourhood=(
                list(CUSTOMER_SPEC.sorted_neighbourhood)
                if self.sorted_neighbourhood is None
                else [(n.column, n.window) for n in self.sorted_neighbourhood]
            ),
            comparisons=comparisons,
            classifier=self.classifier,
            auto_merge=self.auto_merge,
            review=self.review,
            hard_keys=tuple(self.hard_keys),
            location_keys=tuple(self.location_keys),
            sure_when=[tuple(c.name for c in comparisons if c.field in group) for group in self.sure_when],
            merge_requires=tuple(c.name for c in comparisons if c.field in self.merge_requires),
            # the name comparison (whatever its label) and the built-in contradicting fields
            alike_name=next((c.name for c in comparisons if c.field == "name_core"), None),
            contradicted_by=tuple(CUSTOMER_SPEC.contradicted_by),
            max_cluster=self.max_cluster,
            max_block=self.max_block,
        )
