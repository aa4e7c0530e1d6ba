"""``python -m integration.steward``: the ``crmi steward`` commands without the main CLI."""

from __future__ import annotations

from integration.steward.cli import steward_app

if __name__ == "__main__":
    steward_app(prog_name="crmi steward")
