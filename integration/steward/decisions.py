"""A steward's decision on a cluster, and the undo of a merge, with their audit lines in one transaction.

A decision is the dedup workflow's own ``integration.dedup.workflow.decide_cluster`` (which ``crmi dedup
decide`` uses for one pair) inside a journaled load run of mode ``steward``: the survivor, its order and the
survivorship-ruled values are the project's, each merge can be undone exactly, a steward's per-field choice
is applied like a survivorship value (with the first merge of the cluster, so undoing that merge restores
the survivor's own values), and pairs are marked ``merged`` or ``distinct`` (never proposed again) — the
decisions that train the supervised classifier (``workflow.steward_labels``). This module adds what the
workbench needs around it: the page's fingerprint, claims, roles and the audit lines.

Each of these writes (and a sheet import, ``integration.steward.sheets``) holds the core's run lock shared for
its own duration (:func:`holding_the_core`): stewards share the core with each other and with syncs, and a
``crmi run``, rollback, recovery, linkage or schema upgrade, which take it alone, neither starts in the middle
of a decision (it refuses naming the steward) nor has one made in the middle of it (the decision is refused
with HTTP 423 naming the command, nothing written).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Literal

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from crm_core.db import session_factory
from crm_core.edits import share_edit_fence
from crm_core.errors import DedupError, SyncLoadWaitError
from crm_core.journal import to_json
from crm_core.loading import get_or_start_run
from crm_core.merging import MODEL_OF, SurvivorshipRule, following_contact_merges, load_members, undo_merge
from crm_core.models import MatchCandidate, MergeLog
from crm_core.runs import CoreBusy, lock_holder
from integration.dedup import workflow
from integration.dedup.workflow import PendingPair, chosen_values
from integration.steward.audit import record_decision, record_event, record_undo
from integration.steward.cluster import FIELDS, Cluster, claim, find_cluster, release
from integration.steward.errors import StewardError
from integration.steward.security import Principal
from integration.sync import engine as sync_engine

Verdict = Literal["same", "different", "split"]
CORE_BUSY = 423  # Locked: a `crmi run`, rollback… holds the core; the same request succeeds once it has ended
# Retry-After of a CORE_BUSY refusal: how long the holder still needs is unknown (a rollback takes seconds, a
# go-live run minutes), and a refused try is cheap (nothing is read before the lock), so a client asks again
# every half minute rather than waiting out the longest run.
CORE_BUSY_RETRY_AFTER = 30


@dataclass(frozen=True)
class Rules:
    """The project's merge rules (``dedup.customer`` of project.yaml) and its name, for the runs."""

    project: str = "steward"
    source_priority: tuple[str, ...] = ()
    survivorship: Mapping[str, SurvivorshipRule] = field(default_factory=dict)
    classifier: str = "auto"  # dedup.customer.linkage.classifier: auto | ecm | supervised


@dataclass
class Outcome:
    """What a decision did: the merges (ids), the golden records, the pairs' new statuses."""

    entity: str
    verdict: str
    merges: list[int]
    survivors: list[int]
    groups: list[list[int]]
    pairs: dict[int, str]


@contextmanager
def holding_the_core(engine: Engine, user: Principal, what: str) -> Iterator[None]:
    """Hold the core's run lock shared while a steward's write runs, as ``steward NAME (workbench) on HOST
    (pid N)``; refuse with :class:`StewardError` (HTTP 423, ``Retry-After`` :data:`CORE_BUSY_RETRY_AFTER`) naming
    the command that holds the core (or the migration run launched from Dagster that is loading into it) before
    anything is written.

    Only the writes of core records, merges and pair decisions take it. Claims, skips, assignments, sign-ins
    and user administration write the workbench's own tables (``crm_core.steward_models``), which no run
    journals and no rollback touches, and a decision checks its cluster again under the lock (the page's
    fingerprint), so they go on while a run holds the core.
    """
    stack = ExitStack()
    try:
        stack.enter_context(sync_engine.holding_the_core(
            engine, lock_holder(f"steward {user.name} (workbench)"), what, again="nothing was changed; try again"
        ))  # fmt: skip
    except CoreBusy as exc:
        raise StewardError(str(exc), status=CORE_BUSY, retry_after=CORE_BUSY_RETRY_AFTER) from None
    with stack:
        yield


def waited(exc: SyncLoadWaitError) -> StewardError:
    """A steward's write that waited its limit for a sync's inbound load, or on SQLite for another writer's
    write lock: 423 with ``Retry-After``, as when a command holds the core (nothing was written; the same request
    goes through once that writer is done)."""
    return StewardError(str(exc), status=CORE_BUSY, retry_after=CORE_BUSY_RETRY_AFTER)


def groups_of(cluster: Cluster, verdict: Verdict, labels: Mapping[int, str] | None = None) -> list[list[int]]:
    """The cluster's active records grouped as decided: one group (same), one each (different), by label."""
    records = cluster.records
    if verdict == "same":
        return [records]
    if verdict == "different":
        return [[i] for i in records]
    labels = labels or {}
    missing = [i for i in records if not labels.get(i)]
    if missing:
        raise StewardError(f"a split puts every record in a group; record {missing[0]} has none")
    grouped: dict[str, list[int]] = {}
    for record_id in records:
        grouped.setdefault(labels[record_id], []).append(record_id)
    return list(grouped.values())


def decide_cluster(
    engine: Engine,
    candidate_id: int,
    verdict: Verdict,
    user: Principal,
    rules: Rules,
    *,
    fingerprint: str | None = None,
    labels: Mapping[int, str] | None = None,
    chosen: Mapping[str, int] | None = None,
    ip: str | None = None,
) -> Outcome:
    """Apply a steward's decision on the cluster of a pending pair (all or nothing) and audit it.

    ``fingerprint``: the cluster as the page showed it; a cluster changed since is refused. ``labels``
    (split): record id → group. ``chosen`` (a merge of the whole cluster): field → the record whose value
    the golden record takes. Someone else's claim on a record of the cluster refuses the decision.
    """
    if not user.can("steward"):
        raise StewardError("a viewer cannot decide; ask an admin for the steward role", status=403)
    try:
        with (
            holding_the_core(engine, user, "steward decision"),
            session_factory(engine)() as session,
            session.begin(),
        ):
            share_edit_fence(session, "steward decision")  # first: what it reads is what it merges
            return _decide(session, candidate_id, verdict, user, rules, fingerprint, labels, chosen or {}, ip)
    except IntegrityError:
        raise StewardError(
            "another steward claimed a record of this cluster a moment ago; open the queue again", status=409
        ) from None
    except SyncLoadWaitError as exc:
        raise waited(exc) from None
    except DedupError as exc:
        raise StewardError(str(exc), status=409) from None


def _decide(
    session: Session,
    candidate_id: int,
    verdict: Verdict,
    user: Principal,
    rules: Rules,
    fingerprint: str | None,
    labels: Mapping[int, str] | None,
    chosen: Mapping[str, int],
    ip: str | None,
) -> Outcome:
    connection = session.connection()
    cluster = find_cluster(connection, candidate_id)
    if fingerprint is not None and fingerprint != cluster.fingerprint():
        raise StewardError(
            "this cluster changed since the page was opened (another decision or a linkage run); "
            "look at it again before deciding",
            status=409,
        )
    entity = cluster.entity
    claim(connection, entity, cluster.claim_ids, user.user_id)
    groups = groups_of(cluster, verdict, labels)
    model = MODEL_OF[entity]
    records = cluster.records
    members = load_members(connection, model, records)
    unknown = sorted(set(chosen) - set(FIELDS[entity]))
    if unknown:
        raise StewardError(f"'{unknown[0]}' is not a field a steward can choose for a {entity}")
    if chosen and (len(groups) != 1 or len(records) < 2):
        raise StewardError("field values are chosen for a merge of the whole cluster only")
    try:
        chosen_values(members.rows, chosen, records)  # checked here too: a wrong choice is the form's fault
    except DedupError as exc:
        raise StewardError(str(exc)) from None
    before = {str(i): {k: to_json(v) for k, v in members.rows[i].items()} for i in records}
    run = get_or_start_run(session, f"steward-{uuid.uuid4()}", rules.project, "steward")
    pairs = [
        PendingPair(p.id, cluster.active[p.left_id], cluster.active[p.right_id], p.probability)
        for p in cluster.pairs
    ]
    decided = workflow.decide_cluster(session, run, entity, pairs, groups, steward=user.name,
                             source_priority=rules.source_priority, survivorship=rules.survivorship or None,
                             chosen=chosen)  # fmt: skip
    merge_ids, statuses = decided.merges, decided.pairs
    now = dt.datetime.now(dt.UTC)
    run.status = "succeeded"
    run.finished_at = now
    session.flush()
    survivors = decided.survivors
    after_rows = load_members(connection, model, survivors).rows if survivors else {}
    main = survivors[0] if survivors else records[0]
    words = {
        "same": f"merged {len(records)} {entity}s into {main}",
        "different": f"marked {len(records)} {entity}s as different",
        "split": f"split {len(records)} {entity}s into {len(groups)} groups",
    }[verdict]
    record_decision(
        connection, user.name, entity, main, records, words, channel="web", ip=ip,
        before={"records": before, "pairs": sorted(statuses)},
        after={"verdict": verdict, "groups": groups, "merges": merge_ids, "pairs": statuses,
               "chosen": dict(chosen), "run": run.run_key,
               "golden": {str(i): {k: to_json(v) for k, v in row.items()} for i, row in after_rows.items()}},
    )  # fmt: skip
    release(connection, entity, cluster.claim_ids, user.user_id)
    return Outcome(entity, verdict, merge_ids, survivors, groups, statuses)


def skip_cluster(engine: Engine, candidate_id: int, user: Principal, ip: str | None = None) -> None:
    """Let go of a cluster without deciding: the claims end, nothing else changes."""
    with engine.begin() as connection:
        try:
            cluster = find_cluster(connection, candidate_id)
        except StewardError:
            return
        release(connection, cluster.entity, cluster.claim_ids, user.user_id)
        record_event(connection, user.name, "skip", ip=ip, entity=cluster.entity, record_id=cluster.records[0],
                     summary=f"skipped pair {candidate_id}")  # fmt: skip


def can_undo(user: Principal, decided_by: str) -> bool:
    """Admins undo any merge; stewards their own and the automatic ones (``linkage``); viewers none."""
    return user.can("admin") or (user.can("steward") and decided_by in (user.name, "linkage"))


def undo(engine: Engine, merge_id: int, user: Principal, ip: str | None = None) -> MergeLog:
    """Undo one merge exactly (``crm_core.merging.undo_merge``, as `crmi dedup undo`) and audit it."""
    with holding_the_core(engine, user, "undo of a merge"), session_factory(engine)() as session:
        try:
            with session.begin():
                share_edit_fence(session, "undo of a merge")
                log = session.scalar(select(MergeLog).where(MergeLog.id == merge_id))
                if log is None:
                    raise StewardError(f"no merge {merge_id}", status=404)
                if not can_undo(user, log.decided_by):
                    raise StewardError(
                        f"merge {merge_id} was decided by {log.decided_by}; only an admin undoes another "
                        "steward's decision",
                        status=403,
                    )
                followers = following_contact_merges(session, log) if log.entity == "customer" else []
                theirs = [f for f in followers if not can_undo(user, f.decided_by)]
                if theirs:  # undoing the customer merge undoes them first: another steward's decisions
                    raise StewardError(
                        f"undoing merge {merge_id} undoes contact merge(s) "
                        + ", ".join(f"{f.id} (decided by {f.decided_by})" for f in theirs)
                        + " that followed from it; only an admin undoes another steward's decision",
                        status=403,
                    )
                log = undo_merge(session, merge_id, user.name)
                record_undo(session.connection(), user.name, log, channel="web", ip=ip)
                session.expunge(log)
                return log
        except SyncLoadWaitError as exc:
            raise waited(exc) from None
        except DedupError as exc:
            raise StewardError(str(exc), status=409) from None


def reopen(engine: Engine, candidate_id: int, user: Principal, ip: str | None = None) -> MatchCandidate:
    """Reverse a "different" decision (``workflow.reopen_pair``): the pair waits in the queue again; audited.

    The rights are those of an undo: stewards reopen their own decisions (and linkage's), admins anybody's.
    """
    with holding_the_core(engine, user, "reopening of a pair"), session_factory(engine)() as session:
        try:
            with session.begin():
                share_edit_fence(session, "reopening of a pair")
                candidate = session.get(MatchCandidate, candidate_id)
                if candidate is None:
                    raise StewardError(f"no pair {candidate_id}", status=404)
                decided_by, status = candidate.decided_by or "linkage", candidate.status
                if not can_undo(user, decided_by):
                    raise StewardError(
                        f"pair {candidate_id} was decided by {decided_by}; only an admin reopens another "
                        "steward's decision",
                        status=403,
                    )
                candidate = workflow.reopen_pair(session, candidate_id)
                record_event(
                    session.connection(), user.name, "reopen", ip=ip, entity=candidate.entity,
                    record_id=candidate.left_id,
                    summary=f"reopened pair {candidate_id} ({candidate.left_id} / {candidate.right_id}): "
                    "back in the review queue",
                    before={"pair": candidate_id, "status": status, "decided_by": decided_by},
                    after={"status": "review"},
                )  # fmt: skip
                session.expunge(candidate)
                return candidate
        except SyncLoadWaitError as exc:
            raise waited(exc) from None
        except DedupError as exc:
            raise StewardError(str(exc), status=409) from None
