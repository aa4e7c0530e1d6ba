"""The workbench's own error: a message a steward or consultant can act on, and the HTTP status to send."""

from __future__ import annotations

from crm_core.errors import CrmError


class StewardError(CrmError):
    """A refused request: the message is shown as is (it never holds a secret). ``retry_after``: seconds after
    which the same request may succeed (sent as ``Retry-After``), for a refusal that passes by itself."""

    def __init__(self, message: str, *, status: int = 400, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
