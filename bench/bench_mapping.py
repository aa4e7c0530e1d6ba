"""Mapping throughput: N rows × 20 fields with a realistic transform mix, streamed in chunks.

The input is a wide sales export (one row per opportunity with its customer's details, as consultants
usually receive it). Two mappings read every row: customers (12 fields: company names, credit codes,
phones, e-mails, addresses split into province/city/district, value maps, yes/no flags) and
opportunities (8 fields: stage names, percentages, amounts like 12.5万 and ¥1,234.50, currencies, dates
like 2025年3月5日). Chunks stream through ``iter_map`` (threads over both cores) and are dropped after
mapping, so peak memory follows the chunk size, not the row count.

A third case maps the same rows with the expression language: a ``where``, two ``expr`` fields, a ``when``
and a source lookup of an exchange-rate sheet (``computed_rows_per_s``; filter and join included).

Prints one JSON line: rows, fields, seconds, rows_per_s, peak RSS. Run: ``make bench-mapping`` or
``python bench/bench_mapping.py --rows 200000``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pandas as pd

from integration.connectors.base import LOCATION, ROW_KIND, ROW_REF, TEXT_DTYPE, Connector, ReadRequest
from integration.mappings.engine import default_workers, iter_map
from integration.mappings.expressions import filter_frame
from integration.mappings.joins import join_chunks
from integration.mappings.joins import prepare as prepare_joins
from integration.mappings.spec import CompiledMapping, load_mapping

CUSTOMERS = """
version: 1
source: {connector: xlsx, sheet: 销售台账, key: 客户编号}
target: customer
fields:
  name: {from: 客户名称, transforms: [trim, company_name], required: true}
  short_name: {from: 简称, transforms: [trim, nfkc]}
  credit_code: {from: 统一社会信用代码, transforms: [uscc], on_error: "null"}
  phone: {from: 电话, transforms: [phone], on_error: "null"}
  email: {from: 邮箱, transforms: [email], on_error: "null"}
  website: {from: 网址, transforms: [trim, lower]}
  address: {from: 地址, transforms: [trim]}
  province: {from: 地址, transforms: [{address_part: {part: province}}]}
  city: {from: 地址, transforms: [{address_part: {part: city}}]}
  district: {from: 地址, transforms: [{address_part: {part: district}}]}
  industry: {from: 行业, transforms: [{map_values: {values: {IT: 信息技术, MFG: 制造业}, unmatched: keep}}]}
  is_branch: {from: 分公司, transforms: [bool], default: false}
"""

OPPORTUNITIES = """
version: 1
source: {connector: xlsx, sheet: 销售台账, key: 商机编号}
target: opportunity
fields:
  customer: {from: 客户名称, transforms: [trim, company_name]}
  name: {from: 商机名称, transforms: [trim], required: true}
  stage: {from: 阶段, transforms: [stage]}
  probability: {from: 赢率, transforms: [{regex_replace: {pattern: "%", replace: ""}}], on_error: "null"}
  amount: {from: 金额, transforms: [parse_amount], on_error: reject}
  currency: {from: 币种, transforms: [currency]}
  expected_close_date: {from: 预计成交, transforms: [parse_date], on_error: "null"}
  owner: {from: 负责人, transforms: [trim]}
"""

# The computed case: a filter, two computed fields, a condition and a source lookup (an exchange-rate sheet
# of the same workbook), all in the expression language.
COMPUTED = """
version: 1
source:
  connector: xlsx
  sheet: 销售台账
  key: 商机编号
  where: "作废 = 0 and 阶段 is not null"
  lookups:
    汇率: {from: 币种, lookup: {table: 汇率表, key: 币种, value: 汇率}}
target: opportunity
fields:
  customer: {from: 客户名称, transforms: [trim, company_name]}
  name: {expr: "trim(商机名称) || ' ' || 商机编号", required: true}
  stage: {from: 阶段, transforms: [stage]}
  amount: {expr: "数量 * 单价 * coalesce(汇率, 1)"}
  probability:
    when:
      - {if: "阶段 in ('赢单', 'Closed Won')", then: 100}
      - {if: "阶段 = '输单'", then: 0}
      - else: 50
"""

RATES = pd.DataFrame({"币种": ["人民币", "CNY", "¥", "美元"], "汇率": [1.0, 1.0, 1.0, 7.1]})

CITIES = [
    "广东省深圳市南山区科技园",
    "北京市海淀区中关村大街",
    "浙江省杭州市余杭区文一西路",
    "上海浦东新区张江路",
    "江苏省苏州市工业园区星湖街",
    "四川省成都市高新区天府大道",
    "江苏无锡新吴区学院路",  # no 省/市: placed by integration.geo (cpca), once per distinct address
]
STAGES = ["初步接洽", "需求分析", "方案报价", "商务谈判", "赢单", "输单", "Prospecting", "Closed Won"]


def _phone(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return f"138{rng.randrange(10**8):08d}"
    if kind == 1:
        return f"+86 139-{rng.randrange(10**4):04d}-{rng.randrange(10**4):04d}"
    return f"0755-{rng.randrange(10**7, 10**8)}" if kind == 2 else ""


def _amount(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        return f"{rng.randrange(1, 500)}.5万"
    return f"¥{rng.randrange(1000, 900_000):,}.00" if kind == 1 else str(rng.randrange(100, 10**6, 100))


def _date(rng: random.Random) -> str:
    month, day = rng.randrange(1, 13), rng.randrange(1, 29)
    return rng.choice([f"2025年{month}月{day}日", f"2026/{month}/{day}", f"2025-{month:02d}-{day:02d}"])


# Credit codes: most valid, a fifth missing, one in twenty with a digit lost (rejected as a warning).
_CODES = ["91440300708461136T", "91110000600037341L", "9144030070846113", None]
_CODE_WEIGHTS = [38, 37, 5, 20]


def make_chunk(start: int, size: int, rng: random.Random) -> pd.DataFrame:
    """Return a chunk of export rows with repeated and messy values, like a real sales sheet."""
    deals = ["扩容", "续约", "ERP 升级", "New CRM"]
    rows = {
        "客户编号": [f"C{rng.randrange(200_000):07d}" for _ in range(size)],
        "客户名称": [f" 深圳市企业{rng.randrange(50_000)}科技有限公司" for _ in range(size)],
        "简称": [f"企业{rng.randrange(50_000)}" for _ in range(size)],
        "统一社会信用代码": rng.choices(_CODES, weights=_CODE_WEIGHTS, k=size),
        "电话": [_phone(rng) for _ in range(size)],
        "邮箱": [f"User{rng.randrange(5000)}@Example.cn" for _ in range(size)],
        "网址": [f"WWW.EXAMPLE{rng.randrange(500)}.CN" for _ in range(size)],
        "地址": [rng.choice(CITIES) + f"{rng.randrange(999)}号" for _ in range(size)],
        "行业": [rng.choice(["IT", "MFG", "其他"]) for _ in range(size)],
        "分公司": [rng.choice(["是", "否", None]) for _ in range(size)],
        "商机编号": [f"O{i:08d}" for i in range(start, start + size)],
        "商机名称": [f"{rng.choice(deals)} {rng.randrange(100)}" for _ in range(size)],
        "阶段": [rng.choice(STAGES) for _ in range(size)],
        "赢率": [f"{rng.randrange(0, 101, 10)}%" for _ in range(size)],
        "金额": [_amount(rng) for _ in range(size)],
        "币种": [rng.choice(["人民币", "CNY", "¥", "美元"]) for _ in range(size)],
        "预计成交": [_date(rng) for _ in range(size)],
        "负责人": [f"销售{rng.randrange(50)}" for _ in range(size)],
        "作废": rng.choices([0, 1], weights=[19, 1], k=size),
        "数量": [rng.randrange(1, 50) for _ in range(size)],
        "单价": [rng.randrange(100, 100_000) / 100 for _ in range(size)],
    }
    frame = pd.DataFrame(rows)
    frame[ROW_REF] = [str(i + 2) for i in range(start, start + size)]
    frame[LOCATION] = "sales.xlsx#销售台账"
    frame[ROW_KIND] = "data"
    return frame


def stream(rows: int, chunk_rows: int, templates: list[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """Yield ``rows`` rows in chunks, cycling over a few generated chunks (generation is not measured)."""
    cycle = itertools.cycle(templates)
    for start in range(0, rows, chunk_rows):
        chunk = next(cycle)
        yield chunk if start + chunk_rows <= rows else chunk.iloc[: rows - start]


def load(text: str, folder: Path, name: str) -> CompiledMapping:
    """Write a mapping file and load it like any project mapping."""
    file = folder / f"{name}.yaml"
    file.write_text(text, encoding="utf-8")
    return load_mapping(file)


def main() -> None:
    """Map the export with both mappings and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--chunk", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=None, help="mapping threads (default: one per core)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        mappings = [
            load(CUSTOMERS, Path(folder), "customers"),
            load(OPPORTUNITIES, Path(folder), "opportunities"),
        ]
    rng = random.Random(7)
    objects = [make_chunk(i * args.chunk, args.chunk, rng) for i in range(4)]
    workers = args.workers or default_workers()
    fields = sum(len(m.fields) for m in mappings)
    for mapping in mappings:  # warm-up: first-use costs (phone number blocks, imports) are not throughput
        for _ in iter_map(mapping, [objects[0].iloc[:5_000]], 1):
            pass
    arrow = run(mappings, [as_connector_delivers(t) for t in objects], args, workers)
    python = run(mappings, objects, args, workers)
    with tempfile.TemporaryDirectory() as folder:
        computed_mapping = load(COMPUTED, Path(folder), "computed")
    computed = run_computed(computed_mapping, [as_connector_delivers(t) for t in objects], args, workers)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "bench": "mapping", "rows": args.rows, "fields": fields, "chunk_rows": args.chunk, "workers": workers,
        "seconds": arrow["seconds"], "rows_per_s": round(args.rows / arrow["seconds"]),
        "field_values_per_s": round(args.rows * fields / arrow["seconds"]), "records": arrow["records"],
        "reject_entries": arrow["rejects"], "object_input_seconds": python["seconds"],
        "object_input_rows_per_s": round(args.rows / python["seconds"]),
        "computed_case": "where + 2 expr + when + source lookup", "computed_seconds": computed["seconds"],
        "computed_rows_per_s": round(args.rows / computed["seconds"]), "computed_records": computed["records"],
        "peak_rss_mb": round(peak_mb),
        "target_rows_per_s": 200_000, "python": sys.version.split()[0],
    }))  # fmt: skip


def as_connector_delivers(chunk: pd.DataFrame) -> pd.DataFrame:
    """Text columns as the xlsx and SQL (ConnectorX) connectors hand them over: Arrow-backed strings."""
    text = {c: TEXT_DTYPE for c in chunk.columns if not c.startswith("_")}
    return chunk.astype(text)


def run(
    mappings: list[CompiledMapping], templates: list[pd.DataFrame], args: argparse.Namespace, workers: int
) -> dict[str, float]:
    """Stream the rows through every mapping; return the seconds taken and what came out."""
    records = rejects = 0
    started = time.perf_counter()
    for mapping in mappings:
        for result in iter_map(mapping, stream(args.rows, args.chunk, templates), workers):
            records += len(result.records)
            rejects += len(result.rejects)
    return {"seconds": round(time.perf_counter() - started, 2), "records": records, "rejects": rejects}


class _Workbook:
    """The other sheet of the workbook (the rate table) as a connector delivers it."""

    name = "xlsx"

    def read(self, request: ReadRequest) -> Iterator[pd.DataFrame]:
        yield RATES.assign(**{ROW_REF: "1", LOCATION: "sales.xlsx#汇率表", ROW_KIND: "data"})


def run_computed(
    mapping: CompiledMapping, templates: list[pd.DataFrame], args: argparse.Namespace, workers: int
) -> dict[str, float]:
    """Filter (where), join the rate sheet and map: the whole path a computed mapping takes after reading."""
    assert mapping.where is not None
    where = mapping.where
    records = 0
    started = time.perf_counter()
    prepared = prepare_joins(mapping, cast("Connector", _Workbook()))
    filtered = (filter_frame(chunk, where) for chunk in stream(args.rows, args.chunk, templates))
    for result in iter_map(mapping, join_chunks(filtered, prepared), workers):
        records += len(result.records)
    return {"seconds": round(time.perf_counter() - started, 2), "records": records}


if __name__ == "__main__":
    main()
