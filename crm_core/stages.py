"""The default opportunity stage master and the synonyms that map source stage names onto it."""

from __future__ import annotations

import unicodedata
from typing import Final, TypedDict


class StageRow(TypedDict):
    """One row of the stage master as seeded by the initial migration."""

    code: str
    name: str
    name_zh: str
    sort_order: int
    default_probability: int
    forecast_category: str
    is_closed: bool
    is_won: bool


STAGES: Final[list[StageRow]] = [
    {"code": "initial_contact", "name": "Initial contact", "name_zh": "初步接洽", "sort_order": 10,
     "default_probability": 10, "forecast_category": "pipeline", "is_closed": False, "is_won": False},
    {"code": "needs_analysis", "name": "Needs analysis", "name_zh": "需求分析", "sort_order": 20,
     "default_probability": 25, "forecast_category": "pipeline", "is_closed": False, "is_won": False},
    {"code": "proposal", "name": "Proposal / quote", "name_zh": "方案报价", "sort_order": 30,
     "default_probability": 50, "forecast_category": "best_case", "is_closed": False, "is_won": False},
    {"code": "negotiation", "name": "Negotiation", "name_zh": "商务谈判", "sort_order": 40,
     "default_probability": 75, "forecast_category": "commit", "is_closed": False, "is_won": False},
    {"code": "won", "name": "Closed won", "name_zh": "赢单", "sort_order": 50,
     "default_probability": 100, "forecast_category": "closed", "is_closed": True, "is_won": True},
    {"code": "lost", "name": "Closed lost", "name_zh": "输单", "sort_order": 60,
     "default_probability": 0, "forecast_category": "omitted", "is_closed": True, "is_won": False},
]  # fmt: skip

# Source stage names (Chinese funnels and SugarCRM/SuiteCRM ``sales_stage``) -> stage code.
STAGE_SYNONYMS: Final[dict[str, str]] = {
    "初步接洽": "initial_contact", "初步沟通": "initial_contact", "接洽": "initial_contact",
    "线索": "initial_contact", "prospecting": "initial_contact", "qualification": "initial_contact",
    "需求分析": "needs_analysis", "需求确认": "needs_analysis", "needs analysis": "needs_analysis",
    "value proposition": "needs_analysis", "id. decision makers": "needs_analysis",
    "方案报价": "proposal", "报价": "proposal", "方案": "proposal", "perception analysis": "proposal",
    "proposal/price quote": "proposal",
    "商务谈判": "negotiation", "谈判": "negotiation", "negotiation/review": "negotiation",
    "赢单": "won", "成交": "won", "签约": "won", "已签约": "won", "closed won": "won",
    "输单": "lost", "丢单": "lost", "closed lost": "lost",
}  # fmt: skip


def stage_lookup_key(value: str) -> str:
    """Return the comparison form of a stage name: NFKC, case-folded, inner spaces collapsed."""
    return " ".join(unicodedata.normalize("NFKC", value).casefold().split())


def resolve_stage(value: str) -> str | None:
    """Return the stage code for a stage code, English or Chinese stage name, or synonym; None if unknown."""
    key = stage_lookup_key(value)
    for stage in STAGES:
        if key in (stage["code"], stage_lookup_key(stage["name"]), stage_lookup_key(stage["name_zh"])):
            return stage["code"]
    return STAGE_SYNONYMS.get(key)
