"""Exceptions of the toolkit, grouped by the phase that raises them.

Every message is meant for a consultant: it names the file, source or record and says what to do.
Foreign exceptions (drivers, parsers) are translated at the boundary into one of these.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]+@")
# PWD=… (ODBC), password: … / token: … / client_secret: … (YAML, JSON); ${ENV_VAR} references stay readable.
# A quoted value is masked up to its closing quote (spaces included), a braced ODBC value up to its brace.
_KEYWORD_PASSWORD = re.compile(
    r"((?:PWD|PASSWORD|TOKEN|[A-Z_]*SECRET)[\"']?\s*[=:]\s*)(?!\$\{)"
    r"(?:(?P<quote>[\"'])(?!\$\{)(?P<quoted>(?:\\.|(?!(?P=quote))[^\\\n])*)|(?P<bare>\{[^}]*\}|[^;\s'\",}]+))",
    re.IGNORECASE,
)
_CLOSERS = {")": "(", "]": "["}


def _mask_keyword(match: re.Match[str]) -> str:
    if match.group("quote") is not None:
        return f"{match.group(1)}{match.group('quote')}***"
    value, kept = match.group("bare"), ""
    # A bracket closing one that was opened before the keyword is punctuation, not part of the secret:
    # "(using password: YES)" keeps its ")". A bracket without an opener stays masked ("PWD=abc)").
    before = match.string[: match.start()]
    still_open = {closer: before.count(opener) - before.count(closer) for closer, opener in _CLOSERS.items()}
    while len(value) > 1 and still_open.get(value[-1], 0) > 0:
        still_open[value[-1]] -= 1
        value, kept = value[:-1], value[-1] + kept
    return f"{match.group(1)}***{kept}"


def mask_secrets(text: str) -> str:
    """Mask passwords in URLs (``user:***@host``), ODBC strings and YAML (``PWD=***``, ``token: ***``)."""
    return _KEYWORD_PASSWORD.sub(_mask_keyword, _URL_PASSWORD.sub(r"\1***@", text))


def caret_padding(text: str) -> str:
    """Return blanks as wide on a terminal as ``text``: two per East Asian wide character, a tab kept a tab.

    ``file:line:col`` counts characters (as editors do); the caret under the line must count cells.
    """
    cells = []
    for char in text:
        if char == "\t":
            cells.append("\t")
        elif unicodedata.combining(char):
            continue
        else:
            cells.append("  " if unicodedata.east_asian_width(char) in ("W", "F") else " ")
    return "".join(cells)


class CrmError(Exception):
    """Base class of every error this toolkit raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One problem found in a configuration file, with its location when known."""

    message: str
    file: Path | None = None
    line: int | None = None  # 1-based
    col: int | None = None  # 1-based
    path: str = ""  # dotted path inside the document, e.g. ``fields.phone.transforms[0]``

    def location(self) -> str:
        """Return ``file:line:col`` (as much of it as is known)."""
        parts = [str(self.file) if self.file else "<config>"]
        if self.line is not None:
            parts.append(str(self.line))
            if self.col is not None:
                parts.append(str(self.col))
        return ":".join(parts)

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.location()}: {where}{self.message}"

    def render(self) -> str:
        """Return the one-line form followed by the offending source line and a caret."""
        text = str(self)
        if self.file is None or self.line is None:
            return text
        try:
            source_line = Path(self.file).read_text(encoding="utf-8").splitlines()[self.line - 1]
        except (OSError, IndexError, UnicodeDecodeError):
            return text
        caret = caret_padding(source_line[: (self.col or 1) - 1]) + "^"
        return f"{text}\n    {mask_secrets(source_line)}\n    {caret}"


class ConfigError(CrmError):
    """A project, mapping or rules file is invalid; carries every problem found, not just the first."""

    def __init__(self, problems: list[Problem] | Problem | str) -> None:
        if isinstance(problems, str):
            problems = [Problem(problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = problems
        super().__init__("\n".join(str(p) for p in problems))

    def render(self) -> str:
        """Return every problem with its source line and caret, for terminals."""
        return "\n".join(p.render() for p in self.problems)


class ExtractError(CrmError):
    """Reading a source failed; the message names the source and what to check."""

    def __init__(self, source: str, message: str) -> None:
        self.source = source
        super().__init__(f"source '{source}': {message}")


class TransientExtractError(ExtractError):
    """A read failed for a reason that may pass (timeout, 5xx, lost connection); retrying makes sense."""


class MappingError(CrmError):
    """A mapping cannot run at all (``on_error: fail`` or a column that vanished from the source)."""


class DataValidationError(CrmError):
    """Validation found errors that must stop the load."""


class LoadError(CrmError):
    """Writing into the CRM core failed; the transaction of that entity was rolled back."""


class OwnedFieldError(LoadError):
    """A CRM edit of a field a sync target owns (``ownership`` in project.yaml): made in the target instead."""


class DedupError(CrmError):
    """Duplicate detection or merging failed."""


class CoreWaitError(CrmError):
    """A person's write (a CRM edit; a steward's merge, undo or decision) waited longer than
    ``CRMI_EDIT_WAIT_SECONDS`` for another writer that holds the core (a sync's inbound load; on SQLite any
    connection holding the write lock: a load, a sync, a script); nothing was changed, and the same write goes
    through once that writer is done. The message names the writer where the core's run lock tells who."""


class EditWaitError(CoreWaitError, LoadError):
    """A CRM edit (``crm_core.edits``, ``crmi edit``) that waited too long for the core (:class:`CoreWaitError`)."""


class SyncLoadWaitError(CoreWaitError, DedupError):
    """A steward's merge, undo or decision that waited too long for the core (:class:`CoreWaitError`): for a
    sync's inbound load that holds the core's records, or on SQLite for any writer holding its write lock."""


class SyncError(CrmError):
    """Synchronisation with ERP or finance failed."""


class RunError(CrmError):
    """Managing load runs failed: an unknown run, or a rollback that later runs depend on."""


class SchemaError(CrmError):
    """The core database is not at the schema revision this toolkit needs (``crmi core upgrade``)."""
