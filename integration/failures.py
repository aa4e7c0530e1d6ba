"""One readable line for a failed step: what a consultant sees in ``crmi run`` and in the Dagster UI.

A step can fail deep inside a driver with a message that carries a whole SQL statement (100 KB for a
large batch). The line keeps our own message when there is one, else the exception type and the first
line of its message, never the statement, and is cut at :data:`MAX_CAUSE` characters.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from crm_core.errors import CrmError, mask_secrets

MAX_CAUSE = 300
_QUALIFIED = re.compile(r"^(?:[A-Za-z_][\w]*\.)+(?=[A-Za-z_]\w*(?::|$))")  # sqlalchemy.exc.X: → X:


def shorten(text: str, limit: int = MAX_CAUSE) -> str:
    """Return ``text`` on one line (lines joined by '; '), masked and cut at ``limit`` characters."""
    line = "; ".join(part.strip() for part in text.strip().splitlines() if part.strip())
    line = mask_secrets(line)
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _first_line(text: str) -> str:
    lines = [part.strip() for part in text.strip().splitlines() if part.strip()]
    return lines[0] if lines else ""


def cause_line(exc: BaseException) -> str:
    """Return the one-line cause of ``exc``: our message, or ``Type: first line`` (SQL statements left out)."""
    if isinstance(exc, CrmError):
        return shorten(str(exc))
    original = getattr(exc, "orig", None)  # SQLAlchemy DBAPIError: the driver's own error, without [SQL: …]
    if isinstance(original, BaseException):
        detail = _first_line(str(original))
        return shorten(f"{type(original).__name__}: {detail}" if detail else type(original).__name__)
    detail = _first_line(str(exc))
    return shorten(f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__)


def frames(exc: BaseException, limit: int = 4000) -> str:
    """Return where ``exc`` was raised (the traceback's frames, without the message), for step metadata."""
    text = "".join(traceback.format_tb(exc.__traceback__))
    return text[-limit:]


# What a step stopped by Ctrl-C or terminated from the UI says (Dagster's interrupt carries no message).
INTERRUPTED = "interrupted (Ctrl-C, or the run was terminated)"


def error_info_line(error: Any) -> str:
    """Return the one-line cause of a Dagster ``SerializableErrorInfo``: the innermost cause's first line."""
    chain = []
    while error is not None:
        chain.append(error)
        error = error.cause or error.context
    if any(info.cls_name == "DagsterExecutionInterruptedError" for info in chain):
        return INTERRUPTED
    for info in reversed(chain):  # the innermost error with a message says what really happened
        detail = _first_line(info.message or "")
        if detail:
            return shorten(_QUALIFIED.sub("", detail))
    return shorten(chain[0].cls_name) if chain else "unknown error"


# Failure metadata of a step that did not run because an earlier step had already failed the run.
AFTER_FAILURE = "crmi/after_failure"


@dataclass(frozen=True)
class StepFailure:
    """One failed step of a Dagster run, with its cause on one line."""

    step: str
    cause: str
    after_failure: bool = False  # the step did not run: an earlier failure had already undone the run

    def as_dict(self) -> dict[str, Any]:
        """Return the JSON form."""
        return {"step": self.step, "cause": self.cause, "after_failure": self.after_failure}


def step_failures(events: Iterable[Any]) -> list[StepFailure]:
    """Return the failed steps of a run (``result.all_events``) in the order they failed.

    A step that failed with our ``dg.Failure`` says why in its description; any other error is reduced to
    its innermost cause's first line.
    """
    failures = []
    for event in events:
        if not event.is_step_failure:
            continue
        data = event.step_failure_data
        user = data.user_failure_data
        if user is not None and user.description:
            cause = shorten(user.description)
        elif data.error is not None:
            cause = error_info_line(data.error)
        else:
            cause = "failed (no error recorded)"
        failures.append(StepFailure(event.step_key or "?", cause, is_after_failure(event)))
    return failures


def is_after_failure(event: Any) -> bool:
    """Return True for the failure of a step that did not run because the run had already failed."""
    data = event.step_failure_data if event.is_step_failure else None
    user = data.user_failure_data if data is not None else None
    return bool(user is not None and AFTER_FAILURE in (user.metadata or {}))
