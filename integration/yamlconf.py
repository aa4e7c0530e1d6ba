"""YAML with positions: load a config file, validate it with pydantic, report ``file:line:col`` errors.

PyYAML's node tree keeps the start mark of every key and value; we keep them per document path so a
pydantic error (which only knows a path) can be reported at the exact key or value, with a caret.
"""

from __future__ import annotations

import datetime as dt
import difflib
import os
import re
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import yaml
from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError

from crm_core.errors import ConfigError, Problem

DocPath = tuple[str | int, ...]
ModelT = TypeVar("ModelT", bound=BaseModel)

_ENV_REF = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


@dataclass
class LocatedDocument:
    """A parsed YAML document plus the 1-based (line, col) of every key and value in it."""

    data: Any
    file: Path
    value_marks: dict[DocPath, tuple[int, int]] = field(default_factory=dict)
    key_marks: dict[DocPath, tuple[int, int]] = field(default_factory=dict)

    def problem(self, path: DocPath, message: str, *, at_key: bool = False) -> Problem:
        """Return a Problem located at ``path`` (at its key if asked), or its nearest known ancestor."""
        marks = self.key_marks if at_key else self.value_marks
        for cut in range(len(path), -1, -1):
            prefix = path[:cut]
            mark = marks.get(prefix) or self.value_marks.get(prefix)
            if mark:
                return Problem(message, self.file, mark[0], mark[1], format_path(path))
        return Problem(message, self.file, None, None, format_path(path))


def format_path(path: Iterable[str | int]) -> str:
    """Render a document path as ``fields.phone.transforms[0]``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class _Loader(yaml.SafeLoader):
    """Safe loader that refuses duplicate keys (a silent overwrite in plain YAML)."""


def load_yaml(path: Path | str) -> LocatedDocument:
    """Parse a YAML file into plain data and positions; syntax errors become a located ConfigError."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(Problem(f"file not found (looked in {file.resolve().parent})", file)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(Problem(f"not UTF-8 text ({exc.reason}); save the file as UTF-8", file)) from None
    return parse_yaml(text, file)


def parse_yaml(text: str, file: Path) -> LocatedDocument:
    """Parse YAML ``text`` (reported as coming from ``file``)."""
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
        raise ConfigError(Problem(f"invalid YAML: {exc.problem or exc}", file, line, col)) from None
    doc = LocatedDocument(data=None, file=file)
    problems: list[Problem] = []
    doc.data = {} if node is None else _convert(node, (), doc, problems)
    if problems:
        raise ConfigError(problems)
    return doc


def _convert(node: yaml.Node, path: DocPath, doc: LocatedDocument, problems: list[Problem]) -> Any:
    doc.value_marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = yaml.SafeLoader.construct_object(_Loader(""), key_node)  # scalar keys only
            if key in result:
                problems.append(
                    Problem(
                        f"duplicate key '{key}'",
                        doc.file,
                        key_node.start_mark.line + 1,
                        key_node.start_mark.column + 1,
                        format_path((*path, str(key))),
                    )
                )
            child = (*path, str(key) if not isinstance(key, str) else key)
            doc.key_marks[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            result[child[-1]] = _convert(value_node, child, doc, problems)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_convert(item, (*path, i), doc, problems) for i, item in enumerate(node.value)]
    return yaml.SafeLoader.construct_object(_Loader(""), node)


def _annotation_at(model: Any, path: Sequence[str | int]) -> Any:
    """Return the type annotation that validates the value found at ``path``, if it can be told."""
    current: Any = model
    for part in path:
        current = _unwrap_model(current)
        if current is None:
            return None
        if isinstance(current, type) and issubclass(current, BaseModel):
            if isinstance(part, int):
                return None
            info = current.model_fields.get(part)
            if info is None:
                return None
            current = info.annotation
        else:
            args = typing.get_args(current)
            current = args[-1] if args else None
    return current


def _model_at(model: Any, path: Sequence[str | int]) -> type[BaseModel] | None:
    """Return the pydantic model that validates the mapping found at ``path``, if it can be told."""
    found = _unwrap_model(_annotation_at(model, path))
    return found if isinstance(found, type) and issubclass(found, BaseModel) else None


def _union_tags(annotation: Any, key: str) -> list[str]:
    """Return the values of the discriminator ``key`` that the members of a tagged union accept."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    tags: list[str] = []
    for member in typing.get_args(annotation) if union else (annotation,):
        if isinstance(member, type) and issubclass(member, BaseModel) and key in member.model_fields:
            tags.extend(str(v) for v in typing.get_args(member.model_fields[key].annotation))
    return tags


def _unwrap_model(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap_model(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            unwrapped = _unwrap_model(arg)
            if isinstance(unwrapped, type) and issubclass(unwrapped, BaseModel):
                return unwrapped
        return None
    return annotation


def _child(container: Any, part: str | int) -> tuple[bool, Any]:
    if isinstance(container, dict) and part in container:
        return True, container[part]
    if isinstance(container, list) and isinstance(part, int) and 0 <= part < len(container):
        return True, container[part]
    return False, None


def _data_path(data: Any, loc: Sequence[str | int]) -> DocPath:
    """Keep the parts of a pydantic ``loc`` that exist in the data (drops union/validator/discriminator tags)."""
    path: list[str | int] = []
    current = data
    parts = list(loc)
    for index, part in enumerate(parts):
        found, child = _child(current, part)
        if found:
            current = child
            path.append(part)
            continue
        following = parts[index + 1] if index + 1 < len(parts) else None
        if following is not None and _child(current, following)[0]:
            continue  # a tag pydantic inserted (e.g. the discriminator value 'odbc'), not a key
        if isinstance(current, dict) and isinstance(part, str) and not path_is_tag(part):
            path.append(part)  # a missing key: still name it
            current = None
    return tuple(path)


def path_is_tag(part: str) -> bool:
    """Return True for pydantic's internal loc entries such as ``function-after[...]`` or ``list[...]``."""
    return "[" in part or part in {"str", "int", "float", "bool", "dict", "list"}


def close_names(name: str, allowed: Iterable[str]) -> str:
    """Return ``; did you mean 'x'?`` when a close name exists, else an empty string."""
    matches = difflib.get_close_matches(name, list(allowed), n=3, cutoff=0.6)
    if not matches:
        return ""
    return "; did you mean " + " or ".join(f"'{m}'" for m in matches) + "?"


def pydantic_problems(
    doc: LocatedDocument, model: type[BaseModel], exc: PydanticValidationError
) -> list[Problem]:
    """Translate pydantic errors into located problems with consultant-friendly wording."""
    problems: list[Problem] = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        path = _data_path(doc.data, loc)
        kind = error["type"]
        if kind == "extra_forbidden":
            key = str(path[-1])
            owner = _model_at(model, path[:-1])
            allowed = sorted(f.alias or name for name, f in owner.model_fields.items()) if owner else []
            hint = close_names(key, allowed)
            listing = f"; allowed: {', '.join(allowed)}" if allowed else ""
            problems.append(doc.problem(path, f"unknown key '{key}'{hint}{listing}", at_key=True))
        elif kind == "literal_error" and isinstance(error.get("input"), str):
            expected = [
                str(v) for v in (error.get("ctx") or {}).get("expected", "").replace("'", "").split(" or ")
            ]
            options = [o.strip() for part in expected for o in part.split(",") if o.strip()]
            hint = close_names(error["input"], options)
            problems.append(
                doc.problem(path, f"'{error['input']}' is not allowed{hint}; allowed: {', '.join(options)}")
            )
        elif kind == "union_tag_invalid":
            ctx = error.get("ctx") or {}
            key = str(ctx.get("discriminator", "")).strip("'")
            options = [o.strip(" '") for o in str(ctx.get("expected_tags", "")).split(",")]
            tag = str(ctx.get("tag"))
            problems.append(
                doc.problem(
                    (*path, key),
                    f"'{tag}' is not allowed{close_names(tag, options)}; allowed: {', '.join(options)}",
                )
            )
        elif kind == "union_tag_not_found":
            # The key that picks the kind (e.g. a source's `connector`) is absent, often misspelled.
            key = str((error.get("ctx") or {}).get("discriminator", "")).strip("'")
            tags = _union_tags(_annotation_at(model, path), key)
            listing = f"; allowed: {', '.join(tags)}" if tags else ""
            found, container = True, doc.data
            for part in path:
                found, container = _child(container, part) if found else (False, None)
            written = [str(k) for k in container] if found and isinstance(container, dict) else []
            near = difflib.get_close_matches(key, written, n=1, cutoff=0.6)
            if near:
                problems.append(doc.problem(
                    (*path, near[0]), f"unknown key '{near[0]}'; did you mean '{key}'?{listing}", at_key=True
                ))  # fmt: skip
            else:
                problems.append(
                    doc.problem((*path, key), f"missing required key '{key}'{listing}", at_key=True)
                )
        elif kind == "missing":
            problems.append(doc.problem(path, f"missing required key '{path[-1]}'", at_key=True))
        else:
            message = str(error["msg"])
            message = message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
            problems.append(doc.problem(path, message))
    return problems


def validate_document(
    doc: LocatedDocument, model: type[ModelT], context: dict[str, Any] | None = None
) -> ModelT:
    """Validate ``doc`` against ``model``; raise one ConfigError listing every problem with its location."""
    try:
        return model.model_validate(doc.data, context=context)
    except PydanticValidationError as exc:
        raise ConfigError(pydantic_problems(doc, model, exc)) from None


def env_references(template: str) -> list[tuple[str, str | None]]:
    """Return the ``(NAME, default)`` pairs of every ``${NAME}`` / ``${NAME:-default}`` in ``template``."""
    return [(m.group("name"), m.group("default")) for m in _ENV_REF.finditer(template)]


def expand_env(template: str, environ: typing.Mapping[str, str] | None = None) -> str:
    """Replace ``${NAME}`` and ``${NAME:-default}``; raise KeyError(NAME) when unset without default."""
    env = os.environ if environ is None else environ

    def replace(match: re.Match[str]) -> str:
        name, default = match.group("name"), match.group("default")
        value = env.get(name)
        if value:
            return value
        if default is not None:
            return default
        raise KeyError(name)

    return _ENV_REF.sub(replace, template)


def time_zone(value: str) -> str:
    """Return ``value`` when it names a time zone the machine knows (IANA, e.g. Asia/Shanghai, or UTC); raise
    ValueError saying what is allowed (a config validator's message) when it does not."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone '{value}' (use an IANA name such as Asia/Shanghai, or UTC)"
        ) from None
    return value


UTC_ZONE = ZoneInfo("UTC")


def show_instant(value: Any, zone: ZoneInfo = UTC_ZONE) -> str:
    """An instant as a page or a command's table shows it: in ``zone`` (a page: the project's), the zone named
    (``2025-01-18 14:30:00 Asia/Shanghai``); a local midnight is a date written without a time and shows as the
    date alone.

    The core stores instants in UTC (SQLite hands them back naive): a naive value is read as UTC.
    """
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        local = (value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value).astimezone(zone)
        if local.time() == dt.time(0):
            return local.date().isoformat()
        return f"{local.replace(tzinfo=None).isoformat(sep=' ', timespec='seconds')} {zone.key}"
    if isinstance(value, dt.date):
        return value.isoformat()
    return str(value)
