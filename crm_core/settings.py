"""Numbers read from the environment (waits, timeouts, ages): one parser and one message for every setting."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping


def env_number(
    name: str,
    default: float,
    error: type[Exception],
    *,
    unit: str = "seconds",
    zero: bool = False,
    at_most: float | None = None,
    env: Mapping[str, str] | None = None,
) -> float:
    """Return the number ``name`` holds in ``env`` (the process environment by default), ``default`` when it
    is unset or blank; raise ``error`` naming the setting and what it allows when it is not a finite number
    above 0 (0 or more with ``zero``), at most ``at_most`` when given."""
    raw = (os.environ if env is None else env).get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if (
        not math.isfinite(value)
        or value < 0
        or (value == 0 and not zero)
        or (at_most is not None and value > at_most)
    ):
        allowed = "0 or more" if zero else "above 0"
        limit = f", at most {at_most:g}" if at_most is not None else ""
        raise error(f"{name}={raw!r} must be a number of {unit}, {allowed}{limit}")
    return value
