"""Mapping throughput: N rows × 20 fields with a realistic transform mix, streamed in chunks.

Prints one JSON line: rows, seconds, rows_per_s, peak RSS. Run: ``make bench-mapping`` or
``python bench/bench_mapping.py --rows 200000``.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from integration.connectors.base import LOCATION, ROW_KIND, ROW_REF
from integration.mappings.engine import map_chunk
from integration.mappings.spec import load_mapping

MAPPING = """
version: 1
source: {connector: erp, table: Customer, key: code}
target: customer
fields:
  name: {from: name, transforms: [trim, company_name], required: true}
  short_name: {from: short, transforms: [trim, nfkc]}
  english_name: {from: english, transforms: [trim, title]}
  credit_code: {from: uscc, transforms: [uscc], on_error: "null"}
  phone: {from: phone, transforms: [phone], on_error: "null"}
  email: {from: email, transforms: [email], on_error: "null"}
  website: {from: web, transforms: [trim, lower]}
  address: {from: address, transforms: [trim]}
  province: {from: address, transforms: [{address_part: {part: province}}]}
  city: {from: address, transforms: [{address_part: {part: city}}]}
  district: {from: address, transforms: [{address_part: {part: district}}]}
  industry: {from: industry, transforms: [{map_values: {values: {IT: 信息技术, MFG: 制造业}, unmatched: keep}}]}
  is_branch: {from: branch, transforms: [bool], default: false}
  status: {from: status, transforms: [{map_values: {values: {"1": active, "0": inactive}, unmatched: "null"}}]}
  owner: {from: owner}
  parent: {from: head}
  name_normalized: {from: name, transforms: [nfkc, lower]}
"""


def make_chunk(start: int, size: int, rng: random.Random) -> pd.DataFrame:
    """Return a chunk of customer rows with repeated and messy values, like a real ERP table."""
    cities = [
        "广东省深圳市南山区科技园",
        "北京市海淀区中关村",
        "浙江省杭州市余杭区文一西路",
        "上海市浦东新区张江",
    ]
    rows = {
        "code": [f"{i:08d}" for i in range(start, start + size)],
        "name": [f"深圳市企业{rng.randrange(50_000)}科技有限公司 " for _ in range(size)],
        "short": [f"企业{rng.randrange(50_000)}" for _ in range(size)],
        "english": [f"enterprise {rng.randrange(1000)} ltd" for _ in range(size)],
        "uscc": [rng.choice(["91440300708461136T", "91110000600037341L", "bad", None]) for _ in range(size)],
        "phone": [f"138{rng.randrange(10_000):04d}{rng.randrange(10_000):04d}" for _ in range(size)],
        "email": [f"user{rng.randrange(5000)}@example.cn" for _ in range(size)],
        "web": [f"WWW.EXAMPLE{rng.randrange(500)}.CN" for _ in range(size)],
        "address": [rng.choice(cities) + f"{rng.randrange(999)}号" for _ in range(size)],
        "industry": [rng.choice(["IT", "MFG", "其他"]) for _ in range(size)],
        "branch": [rng.choice(["是", "否", None]) for _ in range(size)],
        "status": [rng.choice(["1", "0"]) for _ in range(size)],
        "owner": [f"u{rng.randrange(50)}" for _ in range(size)],
        "head": [None] * size,
    }
    frame = pd.DataFrame(rows)
    frame[ROW_REF] = frame["code"]
    frame[LOCATION] = "Customer"
    frame[ROW_KIND] = "data"
    return frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--chunk", type=int, default=50_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        file = Path(folder) / "bench.yaml"
        file.write_text(MAPPING, encoding="utf-8")
        mapping = load_mapping(file)
    rng = random.Random(7)
    chunks = [
        make_chunk(start, min(args.chunk, args.rows - start), rng)
        for start in range(0, args.rows, args.chunk)
    ]
    mapped = rejected = 0
    started = time.perf_counter()
    for chunk in chunks:
        result = map_chunk(mapping, chunk)
        mapped += len(result.records)
        rejected += len(result.rejects)
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    fields = len(mapping.fields)
    print(json.dumps({
        "bench": "mapping", "rows": args.rows, "fields": fields, "chunk_rows": args.chunk, "seconds": round(seconds, 2),
        "rows_per_s": round(args.rows / seconds), "mapped": mapped, "reject_entries": rejected,
        "peak_rss_mb": round(peak_mb), "target_rows_per_s": 200_000, "python": sys.version.split()[0],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
