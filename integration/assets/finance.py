"""Dagster wiring of the 业财 loop: the ``order_to_cash`` asset, its link check, a job and a daily schedule.

``order_to_cash`` computes from the core (crm_core.finance.order_to_cash) per opportunity and per customer:
ordered, invoiced, collected, outstanding, overdue by due date and days sales outstanding. Totals, the overdue
amount and DSO are float metadata (plotted per materialization in the UI), the exact amounts text; the customers
most overdue are a markdown table. Its check ``check_loop_links`` lists the receipts that apply to no known
receivable and the receivables tied to no known order or customer (nothing is dropped: they stay in the core and
in the figures). The asset reads what the sync targets brought in: it depends on every inbound sync asset that
loads receivables or receipts, and is left out of the migration jobs (``crmi run`` does not compute it). Like a
sync it holds the core's run lock (shared) while it computes: never figures of a core a ``crmi run`` or a
rollback is halfway through; its schedule skips a tick while one of those holds the core, and a step that finds
it held waits its turn as a sync step does (:func:`integration.assets.sync.holding_the_core_or_retry`).
"""

# No ``from __future__ import annotations`` here: Dagster inspects the *objects* annotating ``context``.

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from crm_core.db import session_factory
from crm_core.finance import CashFigures, Orphan, loop_orphans, order_to_cash
from crm_core.runs import lock_holder
from integration.assets.resources import CoreDatabase, MigrationProject
from integration.assets.sync import asset_name, core_free_schedule, holding_the_core_or_retry
from integration.reports import escape_formula
from integration.sync.spec import CompiledTarget

FINANCE_GROUP = "finance"
ORDER_TO_CASH = "order_to_cash"
ORDER_TO_CASH_JOB = "order_to_cash_job"
ORDER_TO_CASH_CRON = "0 6 * * *"
FINANCE_ENTITIES = frozenset({"receivable", "payment", "payment_application"})
MAX_ORPHANS = 50


def _cell(value: object) -> str:
    """A markdown table cell: pipes and line breaks cannot break the table, formulas are escaped."""
    return str(escape_formula("" if value is None else value)).replace("|", "\\|").replace("\n", " ")


def _markdown(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def finance_inbound_assets(targets: dict[str, CompiledTarget]) -> list[str]:
    """Return the inbound sync assets that bring receivables, receipts or write-offs into the core."""
    return sorted(
        asset_name(name, "inbound")
        for name, target in targets.items()
        if any(entity in FINANCE_ENTITIES for entity, _ in target.inbound())
    )


def cash_metadata(totals: CashFigures) -> dict[str, dg.MetadataValue]:
    """Return the totals as float metadata (for the plots) and the exact amounts as JSON text."""
    dso = totals.dso
    return {
        **{
            name: dg.MetadataValue.float(float(value))
            for name, value in (
                ("ordered", totals.ordered),
                ("invoiced", totals.invoiced),
                ("collected", totals.collected),
                ("outstanding", totals.outstanding),
                ("overdue", totals.overdue),
            )
        },
        "dso_days": dg.MetadataValue.float(float(dso) if dso is not None else 0.0),
        "totals_exact": dg.MetadataValue.json(totals.as_dict()),
    }


def order_to_cash_asset(targets: dict[str, CompiledTarget]) -> dg.AssetsDefinition:
    """Return the ``order_to_cash`` asset: the loop's figures per opportunity and customer, from the core."""
    deps = finance_inbound_assets(targets)

    @dg.asset(
        name=ORDER_TO_CASH,
        group_name=FINANCE_GROUP,
        deps=deps,
        description="商机 → 订单 → 应收 → 回款 per opportunity and per customer, from the core: ordered, invoiced, "
        "collected, outstanding, overdue by due date, days sales outstanding (90-day window). Foreign-currency "
        "documents count at their own exchange rate; red-letter entries as negatives.",
        required_resource_keys={"core", "project"},
        kinds={"sqlalchemy"},
    )
    def _order_to_cash(context: dg.AssetExecutionContext) -> dg.MaterializeResult:  # type: ignore[type-arg]
        """Compute the loop's figures and report totals, overdue and the most overdue customers."""
        core: CoreDatabase = context.resources.core
        project: MigrationProject = context.resources.project
        currencies = project.migration().project.spec.currencies
        base = currencies.base if currencies is not None else "CNY"
        engine = core.engine()
        holder = lock_holder(f"Dagster run {context.run.run_id[:8]} {ORDER_TO_CASH}")
        with (
            holding_the_core_or_retry(context, engine, holder, ORDER_TO_CASH),
            session_factory(engine)() as session,
        ):
            loop = order_to_cash(session, base_currency=base)
        top = _markdown(
            ["customer", "overdue", "outstanding", "DSO (days)"],
            [[f"{t['customer']} (#{t['customer_id']})", t["overdue"], t["outstanding"], t["dso"] or "–"]
             for t in loop.top_overdue],
        )  # fmt: skip
        if loop.documents["orders_without_amount"]:
            context.log.warning(
                f"{loop.documents['orders_without_amount']} of {loop.documents['orders']} sales orders have no amount "
                "(neither total_amount nor an amount on every line): 'ordered' leaves them out; map total_amount"
            )
        if loop.documents["foreign_without_rate"]:
            context.log.warning(
                f"{loop.documents['foreign_without_rate']} receivables/receipts are in another currency than "
                f"{base} and carry no exchange rate: they count at their document amount; map exchange_rate"
            )
        return dg.MaterializeResult(
            metadata={
                **cash_metadata(loop.totals),
                "as_of": dg.MetadataValue.text(loop.as_of.isoformat()),
                "base_currency": dg.MetadataValue.text(base),
                "opportunities": dg.MetadataValue.int(len(loop.opportunities)),
                "customers": dg.MetadataValue.int(len(loop.customers)),
                "customers_overdue": dg.MetadataValue.int(
                    sum(1 for f in loop.customers.values() if f.overdue > 0)
                ),
                **{name: dg.MetadataValue.int(count) for name, count in loop.documents.items()},
                "top_overdue_customers": dg.MetadataValue.md(top if loop.top_overdue else "nothing overdue"),
            }
        )

    return _order_to_cash


def orphan_table(orphans: list[Orphan]) -> str:
    """Return orphans as a markdown table (document, kind, customer, amount, reason)."""
    return _markdown(
        ["document", "kind", "customer", "amount", "reason"],
        [[o.number, o.kind, o.customer_id, o.amount, o.reason] for o in orphans],
    )


def loop_links_check() -> dg.AssetChecksDefinition:
    """Return the check that every receipt applies to a known receivable and every receivable to an order or customer."""

    @dg.asset_check(
        asset=ORDER_TO_CASH,
        name="check_loop_links",
        description="Every receipt (收款单) applies to a known receivable, every write-off to a known receivable, "
        "every receivable to a known order (of its customer) or, without an order, to a known customer. "
        "The documents that do not are listed, not dropped.",
        required_resource_keys={"core"},
    )
    def _links(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        core: CoreDatabase = context.resources.core
        with session_factory(core.engine())() as session:
            counts, orphans = loop_orphans(session, MAX_ORPHANS)
        total = sum(counts.values())
        return dg.AssetCheckResult(
            passed=total == 0,
            severity=dg.AssetCheckSeverity.WARN,
            description=None
            if total == 0
            else f"{total} documents break the loop: "
            + ", ".join(f"{n} {kind}{'s' if n > 1 else ''}" for kind, n in sorted(counts.items())),
            metadata={
                "orphans": dg.MetadataValue.int(total),
                **{f"orphan_{kind}s": dg.MetadataValue.int(n) for kind, n in sorted(counts.items())},
                **({"listed": dg.MetadataValue.md(orphan_table(orphans))} if orphans else {}),
            },
        )

    return _links


def finance_definitions(
    targets: dict[str, CompiledTarget],
    executor: dg.ExecutorDefinition | None,
    core_database_url: str | None = None,
) -> tuple[
    dg.AssetsDefinition, dg.AssetChecksDefinition, UnresolvedAssetJobDefinition, dg.ScheduleDefinition
]:
    """Return the ``order_to_cash`` asset, its check, its job and its daily schedule (stopped at first)."""
    asset = order_to_cash_asset(targets)
    check = loop_links_check()
    job = dg.define_asset_job(
        ORDER_TO_CASH_JOB,
        selection=dg.AssetSelection.assets(asset),
        description="Compute order_to_cash from the core and check the loop's links.",
        executor_def=executor,
    )
    schedule = core_free_schedule(
        core_database_url,
        ORDER_TO_CASH,
        name="order_to_cash_schedule",
        job=job,
        cron_schedule=ORDER_TO_CASH_CRON,
        execution_timezone="Asia/Shanghai",
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="order_to_cash every morning at 06:00 (Asia/Shanghai). Stopped at first: turn it on after go-live. "
        "A tick while `crmi run` or a rollback holds the core is skipped, naming it.",
    )
    return asset, check, job, schedule


__all__ = [
    "FINANCE_GROUP",
    "ORDER_TO_CASH",
    "finance_definitions",
    "finance_inbound_assets",
    "loop_links_check",
    "order_to_cash_asset",
    "orphan_table",
]
