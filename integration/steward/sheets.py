"""The review queue as an Excel sheet and back: stewards who prefer a sheet fill in a decision column.

The export holds one row per pending pair of a queue filter (up to :data:`EXPORT_LIMIT`): the pair, its
score, a version (it changes when either record or the pair changes), an empty decision column (a list:
same, different, skip), the evidence in words, and both records side by side. Every text cell that a
spreadsheet would run as a formula (``= @``, tab or carriage return first, ``+ -`` unless a phone number or a
plain number follows) is written with a leading apostrophe, so a company name like ``=HYPERLINK(…)`` stays
text and a phone number ``+86-139…`` reads as written.

The import reads the decision column back and checks every row first: unknown pair, a pair decided
since the export, records changed since the export (version), a decision that is not one of the list, a
pair twice, a pair another steward holds. Any problem → the list of problems per row, and nothing is
applied. Otherwise all decisions are applied in one transaction (one load run): each row decides its
pair alone (``same`` merges the two golden records through the workflow's merge path, ``different``
marks the pair distinct), audited like a decision in the browser; then the golden customers' contacts are
deduplicated as after a workbench merge (``contacts.dedup_after_steward_merge``, once for the whole sheet).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from openpyxl import Workbook, load_workbook
from openpyxl.styles import Font, PatternFill
from openpyxl.worksheet.datavalidation import DataValidation
from sqlalchemy import Connection, Engine, select
from sqlalchemy.orm import Session

from crm_core.db import session_factory
from crm_core.edits import share_edit_fence
from crm_core.errors import DedupError, SyncLoadWaitError
from crm_core.journal import id_parts, ids_in, to_json
from crm_core.loading import get_or_start_run
from crm_core.merging import MODEL_OF, load_members, members_of, merge_plans, table_of
from crm_core.models import Base, Customer, MatchCandidate
from integration.dedup.contacts import dedup_after_steward_merge
from integration.dedup.workflow import close_standing_pairs, cluster_plan
from integration.reports import escape_formula
from integration.steward.audit import record_decision
from integration.steward.cluster import Pair, active_ids, claim, explain_pair, holders, release
from integration.steward.decisions import Rules, holding_the_core, waited
from integration.steward.errors import StewardError
from integration.steward.queue import QueueFilter, filter_conditions, page_ids
from integration.steward.security import Principal

TABLES = Base.metadata.tables
EXPORT_LIMIT = 5000
DECISIONS = {"same": "same", "different": "different", "skip": "skip", "相同": "same", "不同": "different",
             "跳过": "skip"}  # fmt: skip
HEADER = ("pair", "entity", "score", "version", "decision", "evidence", "left id", "left name", "left key",
          "left city", "left sources", "right id", "right name", "right key", "right city", "right sources")  # fmt: skip


def safe_cell(value: Any) -> Any:
    """A value a spreadsheet shows as written: text it would run as a formula gets a leading apostrophe (the
    reconciliation report's guard: a phone number such as +86-139… is left alone)."""
    return escape_formula(value)


def pair_version(pair: Mapping[str, Any], left: Mapping[str, Any], right: Mapping[str, Any]) -> str:
    """Changes when the pair's status or score, or either record, changes."""
    text = repr(
        (pair["id"], pair["status"], pair["probability"], sorted(left.items()), sorted(right.items()))
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _rows(connection: Connection, entity: str, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    table = table_of(MODEL_OF[entity])
    found: dict[int, dict[str, Any]] = {}
    for part in id_parts(connection, ids):
        for row in connection.execute(select(table).where(ids_in(connection, table.c.id, part))).mappings():
            found[row["id"]] = dict(row)
    return found


def _pairs(connection: Connection, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    c = TABLES["match_candidates"].c
    found: dict[int, dict[str, Any]] = {}
    for part in id_parts(connection, ids):
        for row in connection.execute(
            select(c.id, c.entity, c.left_id, c.right_id, c.probability, c.features, c.status)
            .where(ids_in(connection, c.id, part))
        ).mappings():  # fmt: skip
            found[row["id"]] = dict(row)
    return found


def export_queue(connection: Connection, queue: QueueFilter, user_id: int) -> bytes:
    """The pending pairs of a filter (up to :data:`EXPORT_LIMIT`) as an .xlsx with a decision column."""
    conditions = filter_conditions(connection, queue, user_id, dt.datetime.now(dt.UTC))
    ids = page_ids(connection, conditions, queue.sort, 0, EXPORT_LIMIT)
    pairs = _pairs(connection, ids)
    scored_on = sorted({i for p in pairs.values() for i in (p["left_id"], p["right_id"])})
    # each side shown as the golden record it is now (a record merged since: the one it ended in)
    active = active_ids(connection, queue.entity, scored_on) if scored_on else {}
    records = _rows(connection, queue.entity, sorted({*scored_on, *active.values()}))
    xw = TABLES["external_ids"]
    sources: dict[int, list[str]] = {}
    for part in id_parts(connection, sorted(records)):
        for entity_id, system, key in connection.execute(
            select(xw.c.entity_id, xw.c.system, xw.c.external_key)
            .where(xw.c.entity == queue.entity, ids_in(connection, xw.c.entity_id, part))
        ):  # fmt: skip
            sources.setdefault(entity_id, []).append(f"{system}:{key}")
    book = Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.title = "queue"
    sheet.append(HEADER)
    for cell in sheet[1]:
        cell.font = Font(bold=True)
    key = "credit_code" if queue.entity == "customer" else "mobile"
    # a customer without a valid code shows its code as written
    written = "credit_code_as_written" if queue.entity == "customer" else "mobile"
    for pair_id in ids:
        pair = pairs.get(pair_id)
        if pair is None:
            continue
        # the evidence is about the records linkage compared; the sides shown are what a decision acts on
        words = explain_pair(queue.entity, records.get(pair["left_id"], {}), records.get(pair["right_id"], {}),
                             Pair(pair["id"], pair["left_id"], pair["right_id"], pair["probability"],
                                  dict(pair["features"] or {})))  # fmt: skip
        left_id, right_id = active[pair["left_id"]], active[pair["right_id"]]
        left, right = records.get(left_id, {}), records.get(right_id, {})
        values = [
            pair_id, queue.entity, round(pair["probability"], 4), pair_version(pair, left, right), None,
            "; ".join(words), left_id, left.get("name"), left.get(key) or left.get(written), left.get("city"),
            ", ".join(sorted(sources.get(left_id, []))), right_id, right.get("name"), right.get(key) or right.get(written),
            right.get("city"), ", ".join(sorted(sources.get(right_id, []))),
        ]  # fmt: skip
        sheet.append([safe_cell(v) for v in values])
    for cells in sheet.iter_rows(min_row=2):
        for cell in cells:
            if isinstance(cell.value, str):
                cell.data_type = "s"  # never a formula, whatever the text
    decision = DataValidation(type="list", formula1='"same,different,skip"', allow_blank=True)
    sheet.add_data_validation(decision)
    decision.add(f"E2:E{max(2, sheet.max_row)}")
    for cell in sheet["E"][1:]:
        cell.fill = PatternFill("solid", fgColor="FFF3C4")
    for column, width in zip(
        "ABCDEFGHIJKLMNOP", (8, 9, 7, 18, 11, 60, 9, 32, 20, 10, 24, 9, 32, 20, 10, 24), strict=True
    ):
        sheet.column_dimensions[column].width = width
    sheet.freeze_panes = "F2"
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()


@dataclass
class ImportResult:
    """What an import did, or the problems that kept it from doing anything."""

    problems: list[tuple[int, str]] = field(default_factory=list)  # (sheet row, problem)
    applied: dict[str, int] = field(default_factory=dict)  # decision -> rows
    merges: list[int] = field(default_factory=list)


def read_decisions(content: bytes) -> tuple[list[tuple[int, int, str, str]], list[tuple[int, str]]]:
    """(sheet row, pair, version, decision) of the rows with a decision, and the problems of reading them."""
    try:
        book = load_workbook(io.BytesIO(content), read_only=True, data_only=True)
    except Exception:
        raise StewardError("this is not an .xlsx exported by the workbench; export the queue again") from None
    sheet = book["queue"] if "queue" in book.sheetnames else book.worksheets[0]
    rows = sheet.iter_rows(values_only=True)
    header = next(rows, None)
    if header is None or tuple(str(h or "") for h in header[: len(HEADER)]) != HEADER:
        raise StewardError("the sheet's first row is not the export's header; export the queue again")
    found: list[tuple[int, int, str, str]] = []
    problems: list[tuple[int, str]] = []
    for number, row in enumerate(rows, start=2):
        raw = row[4] if len(row) > 4 else None
        if raw is None or not str(raw).strip():
            continue
        decision = DECISIONS.get(str(raw).strip().casefold())
        pair = row[0]
        if not isinstance(pair, int | float) or int(pair) != pair:
            problems.append((number, f"pair '{pair}' is not a pair number"))
            continue
        if decision is None:
            problems.append((number, f"decision '{raw}' is not one of same, different, skip"))
            continue
        found.append((number, int(pair), str(row[3] or ""), decision))
    return found, problems


def import_decisions(
    engine: Engine, content: bytes, user: Principal, rules: Rules, ip: str | None = None
) -> ImportResult:
    """Check every decision of a filled export, then apply them all in one transaction, or none."""
    if not user.can("steward"):
        raise StewardError("a viewer cannot decide; ask an admin for the steward role", status=403)
    decisions, problems = read_decisions(content)
    result = ImportResult(problems=problems)
    with holding_the_core(engine, user, "sheet import"), session_factory(engine)() as session:
        try:
            with session.begin():
                share_edit_fence(session, "sheet import")
                _check_and_apply(session, decisions, result, user, rules, ip)
                if result.problems:
                    raise _Refused
        except _Refused:
            pass
        except SyncLoadWaitError as exc:
            raise waited(exc) from None
        except DedupError as exc:
            result.problems.append((0, str(exc)))
        if result.problems:
            result.applied, result.merges = {}, []
    return result


class _Refused(Exception):
    """Some row has a problem: roll the whole import back."""


def _check_and_apply(
    session: Session,
    decisions: list[tuple[int, int, str, str]],
    result: ImportResult,
    user: Principal,
    rules: Rules,
    ip: str | None,
) -> None:
    connection = session.connection()
    pairs = _pairs(connection, [p for _, p, _, _ in decisions])
    seen: dict[int, int] = {}
    for number, pair_id, version, _ in decisions:
        pair = pairs.get(pair_id)
        if pair_id in seen:
            result.problems.append((number, f"pair {pair_id} is decided twice (also row {seen[pair_id]})"))
            continue
        seen[pair_id] = number
        if pair is None:
            result.problems.append((number, f"no pair {pair_id}"))
            continue
        if pair["status"] != "review":
            result.problems.append(
                (number, f"pair {pair_id} was decided since the export ({pair['status']})")
            )
            continue
        golden = active_ids(connection, pair["entity"], [pair["left_id"], pair["right_id"]])
        left_id, right_id = golden[pair["left_id"]], golden[pair["right_id"]]
        records = _rows(connection, pair["entity"], [left_id, right_id])
        current = pair_version(pair, records.get(left_id, {}), records.get(right_id, {}))
        if current != version:
            result.problems.append(
                (number, f"pair {pair_id}: its records changed since the export; export again")
            )
            continue
        held = {
            h.name for h in holders(connection, pair["entity"], [pair["left_id"], pair["right_id"]]).values()
        }
        if held - {user.name}:
            result.problems.append(
                (number, f"pair {pair_id} is held by {', '.join(sorted(held - {user.name}))}")
            )
    if result.problems:
        return
    to_apply = [(n, p, d) for n, p, _, d in decisions if d != "skip"]
    result.applied["skip"] = len(decisions) - len(to_apply)
    if not to_apply:
        return
    run = get_or_start_run(session, f"steward-{uuid.uuid4()}", rules.project, "steward")
    now = dt.datetime.now(dt.UTC)
    customer_merges: list[int] = []
    for number, pair_id, decision in to_apply:
        pair = pairs[pair_id]
        entity = pair["entity"]
        model = MODEL_OF[entity]
        ends = [pair["left_id"], pair["right_id"]]
        claim(connection, entity, ends, user.user_id)
        active = sorted(set(active_ids(connection, entity, ends).values()))
        candidate = session.get(MatchCandidate, pair_id)
        assert candidate is not None
        if candidate.status != "review":  # decided by an earlier row on the same two golden records
            wanted = "merged" if decision == "same" else "distinct"
            if candidate.status != wanted:
                result.problems.append((number, f"pair {pair_id} stands for the same records as a pair an "
                                                f"earlier row decided the other way ({candidate.status})"))  # fmt: skip
            else:
                result.applied[decision] = result.applied.get(decision, 0) + 1
            release(connection, entity, ends, user.user_id)
            continue
        standing = members_of(connection, model, active)  # before the merge re-points them
        group_of = {record: 0 if decision == "same" else position for position, record in enumerate(active)}
        merges: list[int] = []
        if decision == "same" and len(active) == 2:
            members = load_members(connection, model, active)
            before = {str(i): {k: to_json(v) for k, v in members.rows[i].items()} for i in active}
            plan = cluster_plan(model, members, active, rules.source_priority, rules.survivorship or None,
                                probability=pair["probability"], reason="steward decision (sheet)",
                                decided_by=user.name)  # fmt: skip
            merges = merge_plans(session, run, model, [plan], members)
            if model is Customer:
                customer_merges += merges
            result.merges += merges
            main = plan.survivor_id
        else:
            before = {}
            main = active[0]
        candidate.status = "merged" if decision == "same" else "distinct"
        candidate.decided_by = user.name
        candidate.decided_at = now
        closed = close_standing_pairs(session, entity, standing, group_of, user.name, now, {pair_id})
        session.flush()
        record_decision(
            connection, user.name, entity, main, active,
            f"sheet row {number}: pair {pair_id} {'merged' if decision == 'same' else 'marked different'}",
            channel="sheet", ip=ip, before={"records": before, "pairs": [pair_id]},
            after={"verdict": decision, "merges": merges,
                   "pairs": {str(pair_id): candidate.status, **{str(i): st for i, st in closed.items()}},
                   "run": run.run_key, "sheet_row": number},
        )  # fmt: skip
        release(connection, entity, ends, user.user_id)
        result.applied[decision] = result.applied.get(decision, 0) + 1
    if result.problems:
        return
    # The golden customers' contacts, deduplicated as a workbench merge does (one linkage for the whole sheet).
    dedup_after_steward_merge(session, run, customer_merges, decided_by=user.name)
    run.status = "succeeded"
    run.finished_at = now
    session.flush()
