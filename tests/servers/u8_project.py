"""A project whose only source is a U8 database, with a ``sync:`` section for the local U8 OpenAPI server.

Used by the sync tests and ``bench/bench_sync.py``: the customer block is the demo's, the credentials come
from the environment (``U8_API_URL``, ``U8_APP_SECRET``…), as a real project's would.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.servers.u8_openapi import APP_KEY, APP_SECRET, FROM_ACCOUNT, TO_ACCOUNT

DEMO_MAPPINGS = Path(__file__).resolve().parents[2] / "examples" / "demo" / "mappings"

CUSTOMER = """      customer:
        direction: both
        inbound: [{mapping: erp_u8_customers, cursor: ufts}]
        ownership:
          crm: [name, short_name, phone, email, address]
          u8: [erp_code, credit_limit, payment_terms, credit_code]
        outbound:
          add: customer/add
          edit: customer/edit
          key_field: erp_code
          fields:
            code: _key
            name: name
            abbrname: short_name
            phone: phone
            address: address
            self_define1: id
"""


def sync_yaml(entities: str = CUSTOMER, *, batch_size: int = 50, max_attempts: int = 3) -> str:
    """Return a ``sync:`` section for target ``u8`` (no backoff: a retry is due at once)."""
    return f"""
sync:
  u8:
    system: erp_u8
    transport:
      profile: u8_openapi
      base_url: ${{U8_API_URL}}
      from_account: ${{U8_FROM_ACCOUNT}}
      to_account: ${{U8_TO_ACCOUNT}}
      app_key: ${{U8_APP_KEY}}
      app_secret: ${{U8_APP_SECRET}}
      batch_size: {batch_size}
      timeout: 5
    retry: {{max_attempts: {max_attempts}, backoff_seconds: 0, max_backoff_seconds: 0}}
    entities:
{entities}"""


def write_project(root: Path, u8_url: str, sync: str, mappings: tuple[str, ...]) -> Path:
    """Write project.yaml (the U8 database as source ``erp_u8``) and copy the demo's mapping files."""
    (root / "mappings").mkdir(parents=True, exist_ok=True)
    for name in mappings:
        shutil.copy(DEMO_MAPPINGS / f"{name}.yaml", root / "mappings" / f"{name}.yaml")
    (root / "project.yaml").write_text(
        f"version: 1\nname: synctest\nsources:\n  erp_u8: {{connector: sql, url: '{u8_url}'}}\n{sync}",
        encoding="utf-8",
    )
    return root


def environment(base_url: str) -> dict[str, str]:
    """Return the environment variables the section reads, for the server at ``base_url``."""
    return {"U8_API_URL": base_url, "U8_FROM_ACCOUNT": FROM_ACCOUNT, "U8_TO_ACCOUNT": TO_ACCOUNT,
            "U8_APP_KEY": APP_KEY, "U8_APP_SECRET": APP_SECRET}  # fmt: skip
