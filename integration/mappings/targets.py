"""What a mapping can fill: each target entity's fields, types, required flags, allowed values and rules.

Read from the canonical model (:mod:`crm_core.entities`) and the built-in validation rules
(:mod:`crm_core.validation`), so ``crmi mapping targets`` and ``docs/targets.md`` cannot drift from them.
"""

from __future__ import annotations

from dataclasses import dataclass

from crm_core.entities import ENTITIES, LOAD_ORDER
from crm_core.stages import STAGE_SYNONYMS, STAGES
from crm_core.validation import builtin_rules


@dataclass(frozen=True)
class TargetField:
    """One field of a target entity, as a consultant needs to know it."""

    name: str
    kind: str  # str(150), decimal, date, … or "→ customer" for a reference
    required: bool
    allowed: tuple[str, ...]  # enumerated fields: the values validation accepts
    rules: tuple[str, ...]  # the other built-in rules on the field: "name (severity): message"


# What the allowed values mean where a name alone does not say it.
_NOTES: dict[tuple[str, str], str] = {
    ("opportunity", "stage"): "stage codes; the `stage` transform maps source names onto them ("
    + ", ".join(f"{source} → {code}" for source, code in list(STAGE_SYNONYMS.items())[:6])
    + ", …; see crm_core/stages.py)",
    ("customer", "status"): "default active",
}


def target_fields(entity: str) -> list[TargetField]:
    """Return the fields a mapping of ``entity`` may fill, in model order."""
    definition = ENTITIES[entity]
    rules = [r for r in builtin_rules() if r.entity == entity]
    fields = []
    for name, field in definition.fields.items():
        on_field = [r for r in rules if r.field == name]
        allowed = next((r.allowed for r in on_field if r.allowed), ())
        kind = f"→ {field.references}" if field.references else field.kind
        if field.max_length and not field.references:
            kind += f"({field.max_length})"
        fields.append(
            TargetField(
                name=name,
                kind=kind,
                required=field.required,
                allowed=allowed,
                rules=tuple(
                    f"{r.name} ({r.severity}): {r.message}"
                    for r in on_field
                    if not r.allowed and not r.name.endswith(".required")
                ),
            )
        )
    return fields


def note(entity: str, field: str) -> str:
    """Return what an enumerated field's values mean, if the names alone do not say it."""
    return _NOTES.get((entity, field), "")


def entities() -> list[str]:
    """Return the target entities in load order."""
    return list(LOAD_ORDER)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown() -> str:
    """Return the target reference as Markdown (docs/targets.md)."""
    lines = [
        "# Target reference",
        "",
        "Generated from the code by `crmi mapping targets --format markdown` (`make schema` rewrites this",
        "file; a test fails when it is out of date). Each target entity's fields: the type a value is cast",
        "to, whether a mapping must fill it, the values validation accepts for enumerated fields, and the",
        "other built-in rules (their severity can be changed in `project.yaml` under `validation.severity`).",
        "A reference (→ entity) takes the source's key or name of the referenced record, with `lookup`.",
        "",
        "Stages: " + ", ".join(f"`{s['code']}` ({s['name']} / {s['name_zh']})" for s in STAGES) + ".",
        "",
        "| entity | fields |",
        "|---|---|",
        *(f"| [`{e}`](#{e}) | {len(ENTITIES[e].fields)} |" for e in entities()),
    ]
    for entity in entities():
        lines += [
            "",
            f"## {entity}",
            "",
            "| field | type | required | allowed values | rules |",
            "|---|---|---|---|---|",
        ]
        for f in target_fields(entity):
            allowed = ", ".join(f"`{v}`" for v in f.allowed)
            if f.allowed and note(entity, f.name):
                allowed += f" ({note(entity, f.name)})"
            lines.append(
                f"| `{f.name}` | {_cell(f.kind)} | {'yes' if f.required else ''} | {_cell(allowed)} "
                f"| {_cell('; '.join(f.rules))} |"
            )
    return "\n".join(lines) + "\n"
