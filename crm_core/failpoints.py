"""Named failure points, so tests can crash a real run at an exact step instead of racing a timer.

``CRMI_FAILPOINT=<name>`` arms one point; ``CRMI_FAILPOINT_ACTION`` says what happens there: ``raise``
(the step fails with a LoadError), ``pause:<fifo>`` (announce the point on a named pipe, then block so the
test can kill the process) or ``hold:<fifo>`` (announce it, then go on once the test writes a line to
``<fifo>.go``: a test does something else while the run stands there). Unset, a failpoint costs one
dictionary lookup.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from crm_core.errors import LoadError


def failpoint(name: str) -> None:
    """Fail or pause here when ``$CRMI_FAILPOINT`` names this point (test hook; no effect otherwise)."""
    if os.environ.get("CRMI_FAILPOINT") != name:
        return
    action = os.environ.get("CRMI_FAILPOINT_ACTION", "raise")
    if action.startswith("pause:"):
        with Path(action.removeprefix("pause:")).open("w", encoding="utf-8") as signal:
            signal.write(f"{name}\n")
        threading.Event().wait()  # until the test kills the process
    if action.startswith("hold:"):
        fifo = Path(action.removeprefix("hold:"))
        with fifo.open("w", encoding="utf-8") as signal:
            signal.write(f"{name}\n")
        with fifo.with_name(f"{fifo.name}.go").open(encoding="utf-8") as go:
            go.readline()
        return
    raise LoadError(f"failpoint {name} triggered (CRMI_FAILPOINT is set; unset it for real runs)")
