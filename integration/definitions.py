"""Dagster ``Definitions`` for the migration project named by ``$CRM_PROJECT`` (default: examples/demo).

``workspace.yaml`` loads this module; everything else imports :mod:`integration.jobs` instead.
"""

from __future__ import annotations

from integration.jobs import build_definitions

defs = build_definitions()
