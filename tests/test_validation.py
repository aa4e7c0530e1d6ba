"""Validation rules: each rule gets its violating rows and must produce exactly the quarantine entries."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa
import yaml

from crm_core.db import make_engine, session_factory, upgrade
from crm_core.errors import ConfigError
from crm_core.models import Customer, LoadRun, Payment, PaymentApplication, Receivable, Reject
from crm_core.validation import RuleContext, builtin_rules, core_violations, ruleset, validate
from integration.pipeline import Migration, extract, load, stage

TODAY = dt.date(2026, 11, 23)
CONTEXT = RuleContext(today=TODAY)
VALID_USCC = "91110000600037341L"

# rule name -> (entity, violating row, passing row); the violating row's reported value comes from the rule's field.
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "sales_rep.name.required": ({"name": "  "}, {"name": "王芳"}),
    "customer.name.required": ({"name": None}, {"name": "华为技术有限公司"}),
    "contact.name.required": ({"name": None}, {"name": "Li Lei"}),
    "opportunity.customer.required": ({"customer": None}, {"customer": "A-1"}),
    "opportunity.name.required": ({"name": ""}, {"name": "ERP 升级"}),
    "opportunity.stage.required": ({"stage": None}, {"stage": "proposal"}),
    "sales_order.order_no.required": ({"order_no": None}, {"order_no": "SO-1"}),
    "sales_order.customer.required": ({"customer": None}, {"customer": "C1"}),
    "sales_order_line.order.required": ({"order": None}, {"order": "SO-1"}),
    "sales_order_line.line_no.required": ({"line_no": None}, {"line_no": 1}),
    "receivable.receivable_no.required": ({"receivable_no": None}, {"receivable_no": "AR-1"}),
    "receivable.customer.required": ({"customer": None}, {"customer": "C1"}),
    "receivable.amount.required": ({"amount": None}, {"amount": Decimal("10")}),
    "payment.payment_no.required": ({"payment_no": None}, {"payment_no": "P-1"}),
    "payment.customer.required": ({"customer": None}, {"customer": "C1"}),
    "payment.amount.required": ({"amount": None}, {"amount": Decimal("10")}),
    "payment_application.payment.required": ({"payment": None}, {"payment": "P-1"}),
    "payment_application.receivable.required": ({"receivable": None}, {"receivable": "AR-1"}),
    "payment_application.amount.required": ({"amount": None}, {"amount": Decimal("1")}),
    "customer.phone.format": ({"phone": "0571-8888666"}, {"phone": "+8657188886666"}),
    "contact.mobile.format": ({"mobile": "138 0013 8000"}, {"mobile": "+8613800138000"}),
    "contact.phone.format": ({"phone": "+86 10 1234"}, {"phone": "+861012345678;ext=21"}),
    "sales_rep.phone.format": ({"phone": "8613800138000"}, {"phone": "+8613800138000"}),
    "customer.email.format": ({"email": "sales@huawei"}, {"email": "sales@huawei.com"}),
    "contact.email.format": ({"email": "li lei@example.com"}, {"email": "li.lei@example.com"}),
    "sales_rep.email.format": ({"email": "王芳"}, {"email": "wang.fang@example.cn"}),
    "customer.credit_code.check_digit": ({"credit_code": "91110000600037341X"}, {"credit_code": VALID_USCC}),
    "customer.status.allowed": ({"status": "closed"}, {"status": "prospect"}),
    "opportunity.stage.allowed": ({"stage": "商务谈判"}, {"stage": "negotiation"}),
    "opportunity.probability.range": ({"probability": 120}, {"probability": 100}),
    "opportunity.probability.matches_stage": ({"stage": "lost", "probability": 40}, {"stage": "lost", "probability": 0}),
    "opportunity.closed_on.required_when_won": ({"stage": "won", "closed_on": None}, {"stage": "won", "closed_on": TODAY}),
    "opportunity.closed_on.not_in_future": ({"closed_on": TODAY + dt.timedelta(days=8)}, {"closed_on": TODAY + dt.timedelta(days=7)}),
    "sales_order.order_date.not_in_future": ({"order_date": dt.date(2027, 1, 1)}, {"order_date": dt.date(2025, 3, 5)}),
    "payment.received_on.not_in_future": ({"received_on": "2030-01-01"}, {"received_on": "2025-03-05"}),
    "receivable.invoiced_on.not_in_future": ({"invoiced_on": "2030-01-01"}, {"invoiced_on": "2025-03-05"}),
    "opportunity.amount.range": ({"amount": Decimal("-1.00")}, {"amount": Decimal("0")}),
    "customer.credit_limit.range": ({"credit_limit": Decimal("-500")}, {"credit_limit": Decimal("0")}),
    "sales_order.total_amount.range": ({"total_amount": Decimal("-125000")}, {"total_amount": Decimal("125000")}),
    "sales_order_line.quantity.range": ({"quantity": -2}, {"quantity": 2}),
    "receivable.amount.range": ({"amount": "abc"}, {"amount": "12.50"}),
    "payment.amount.range": ({"amount": Decimal("-0.01")}, {"amount": Decimal("0.01")}),
    "payment_application.amount.range": ({"amount": -5}, {"amount": 5}),
    **{f"{entity}.original_currency.iso4217": ({"original_currency": "RMB"}, {"original_currency": "USD"})
       for entity in ("opportunity", "sales_order", "sales_order_line", "receivable", "payment")},
    **{f"{entity}.original_amount.needs_currency": (
        {"original_amount": Decimal("100"), "original_currency": None},
        {"original_amount": Decimal("100"), "original_currency": "EUR"})
       for entity in ("opportunity", "sales_order", "sales_order_line", "receivable", "payment")},
    "sales_order_line.amount.matches_quantity_price": (
        {"amount": Decimal("1300"), "quantity": Decimal("10"), "unit_price": Decimal("100")},
        {"amount": Decimal("1005"), "quantity": Decimal("10"), "unit_price": Decimal("100")},
    ),
}  # fmt: skip
RULES = {rule.name: rule for rule in builtin_rules()}


def test_every_built_in_rule_has_a_case() -> None:
    assert set(CASES) == set(RULES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_rule_quarantines_exactly_its_violating_row(name: str) -> None:
    rule = RULES[name]
    bad, good = CASES[name]
    frame = pd.DataFrame([good, bad, good], index=[10, 11, 12])
    found = validate(rule.entity, frame, [rule], CONTEXT)
    bad_value = bad[rule.field]
    expected_value = None if bad_value is None else str(bad_value)
    assert found.to_dict("records") == [{
        "index": 11, "rule": name, "field": rule.field, "value": expected_value,
        "reason": rule.message, "severity": rule.severity,
    }]  # fmt: skip


def test_rules_skip_batches_without_their_fields_and_other_entities() -> None:
    frame = pd.DataFrame({"name": ["ACME"], "email": ["not-an-email"]})
    found = validate("customer", frame, builtin_rules(), CONTEXT)
    assert list(found["rule"]) == ["customer.email.format"]
    assert validate("contact", pd.DataFrame({"title": ["CTO"]}), builtin_rules(), CONTEXT).empty


def test_project_severities_and_own_rules() -> None:
    from crm_core.validation import RuleSpec

    rules = ruleset(
        {"customer.email.format": "error", "customer.status.allowed": "off"},
        [RuleSpec(name="customer_industry_known", entity="customer", field="industry", severity="warn",
                  one_of=("制造业", "零售"), message="行业不在清单中"),
         RuleSpec(name="customer_code_unique", entity="customer", field="short_name", unique=True),
         RuleSpec(name="big_deal", entity="opportunity", field="amount", max=1_000_000, severity="warn")],
    )  # fmt: skip
    frame = pd.DataFrame({
        "name": ["甲", "乙", "丙"], "email": ["bad", None, "a@b.cn"], "status": ["gone", "active", "active"],
        "industry": ["制造业", "金融", None], "short_name": ["JIA", "JIA", "BING"],
    })  # fmt: skip
    found = validate("customer", frame, rules, CONTEXT)
    assert sorted(zip(found["index"], found["rule"], found["severity"], found["reason"], strict=True)) == [
        (0, "customer.email.format", "error", "email is not an e-mail address"),
        (1, "customer_code_unique", "error", "short_name appears more than once in this source"),
        (1, "customer_industry_known", "warn", "行业不在清单中"),
    ]
    deals = validate(
        "opportunity", pd.DataFrame({"amount": [Decimal("2000000"), Decimal("5")]}), rules, CONTEXT
    )
    assert list(deals["index"]) == [0] and list(deals["reason"]) == ["amount must be <= 1000000"]


def write_project(root: Path, validation: Any) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "project.yaml").write_text(
        yaml.safe_dump({"version": 1, "name": "p", "sources": {}, "mappings": [], "validation": validation},
                       allow_unicode=True, sort_keys=False),
        encoding="utf-8",
    )  # fmt: skip
    return root


@pytest.mark.parametrize(
    ("validation", "message"),
    [
        ({"severity": {"customer.email.formt": "warn"}},
         "unknown built-in rule 'customer.email.formt'; did you mean 'customer.email.format'"),
        ({"severity": {"customer.email.format": "fatal"}}, "'fatal' is not allowed; allowed: error, warn, off"),
        ({"rules": [{"name": "r", "entity": "customer", "field": "industry", "required": True, "unique": True}]},
         "give exactly one of: required, pattern, one_of, min/max, unique"),
        ({"rules": [{"name": "r", "entity": "customer", "field": "industy", "required": True}]},
         "customer has no field 'industy'; did you mean 'industry'"),
        ({"rules": [{"name": "r", "entity": "customer", "field": "name", "pattern": "(["}]},
         "pattern is not a valid regular expression"),
        ({"max_reject_ratio": 2}, "less than or equal to 1"),
    ],
)  # fmt: skip
def test_bad_validation_config_is_reported_with_its_location(
    tmp_path: Path, validation: Any, message: str
) -> None:
    root = write_project(tmp_path / "p", validation)
    with pytest.raises(ConfigError) as caught:
        Migration.load(str(root))
    rendered = caught.value.render()
    assert message in rendered, rendered
    assert f"{root / 'project.yaml'}:" in rendered


def test_quarantined_rows_are_not_loaded_and_keep_their_raw_row(
    demo_project: Path, sqlite_core_url: str
) -> None:
    project = demo_project / "project.yaml"
    spec = yaml.safe_load(project.read_text(encoding="utf-8"))
    spec["validation"] = {"rules": [
        {"name": "customer_needs_email", "entity": "customer", "field": "email", "required": True,
         "message": "客户必须有邮箱"},
    ]}  # fmt: skip
    project.write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False), encoding="utf-8")
    migration = Migration.load(str(demo_project))
    mapping = next(m for m in migration.mappings if m.name == "erp_u8_customers")
    raw = extract(migration, mapping)
    staged = stage(migration, "customer", {"raw_erp_u8_customer": raw}, CONTEXT)
    batch = staged.batches[0]
    quarantined = batch.rejects[batch.rejects["rule"] == "customer_needs_email"]
    assert len(quarantined) > 0 and set(quarantined["reason"]) == {"客户必须有邮箱"}
    assert not set(quarantined["row_ref"]) & set(batch.records["_row_ref"].astype(str))

    engine = make_engine(sqlite_core_url)
    upgrade(engine)
    stats = load(migration, engine, "run-1", staged)
    assert stats[0].balanced and stats[0].rejected >= len(quarantined)
    with session_factory(engine)() as session:
        stored = session.scalars(sa.select(Reject).where(Reject.rule == "customer_needs_email")).all()
        codes = set(session.scalars(sa.select(Customer.name)))
    assert {r.row_ref for r in stored} == set(quarantined["row_ref"])
    first = stored[0]
    source_row = raw[raw["_row_ref"].astype(str) == first.row_ref].iloc[0]
    assert first.raw_row is not None and first.raw_row["cCusCode"] == first.row_ref
    assert first.raw_row["cCusName"] == source_row["cCusName"] and source_row["cCusName"] not in codes
    engine.dispose()


def test_core_rules_find_over_applied_receivables_and_shared_credit_codes(sqlite_core_url: str) -> None:
    engine = make_engine(sqlite_core_url)
    upgrade(engine)
    with session_factory(engine)() as session, session.begin():
        run = LoadRun(run_key="r", project="p")
        session.add(run)
        session.flush()
        a = Customer(name="甲公司", credit_code=VALID_USCC)
        b = Customer(name="甲公司（北京）", credit_code=VALID_USCC)
        merged = Customer(name="甲", credit_code=VALID_USCC)
        session.add_all([a, b, merged])
        session.flush()
        merged.merged_into_id = a.id
        receivable = Receivable(receivable_no="AR-1", customer_id=a.id, amount=Decimal("100.00"))
        payment = Payment(payment_no="P-1", customer_id=a.id, amount=Decimal("500.00"))
        session.add_all([receivable, payment])
        session.flush()
        session.add(
            PaymentApplication(payment_id=payment.id, receivable_id=receivable.id, amount=Decimal("120.00"))
        )
    with session_factory(engine)() as session:
        customers = {v.rule: v for v in core_violations(session, "customer")}
        applications = {v.rule: v for v in core_violations(session, "payment_application")}
        payments = {v.rule: v for v in core_violations(session, "payment")}
    assert customers["customer.credit_code.unique"].sample == [{"credit_code": VALID_USCC, "customers": 2}]
    assert applications["payment_application.amount.within_receivable"].sample == [
        {"receivable_no": "AR-1", "amount": "100.00", "applied": "120.00"}
    ]
    assert applications["payment_application.amount.within_payment"].count == 0
    assert payments["payment.customer.not_merged"].count == 0
    engine.dispose()


def test_credit_codes_checked_all_at_once_agree_with_python_stdnum() -> None:
    """The array check of compact codes and python-stdnum give the same verdict on every kind of cell."""
    import random

    from stdnum.cn import uscc

    from crm_core.validation import valid_uscc

    rng = random.Random(13)
    alphabet = "0123456789ABCDEFGHJKLMNPQRTUWXY"
    codes: list[str] = []
    for _ in range(2_000):
        body = "".join(rng.choice("0123456789") for _ in range(8)) + "".join(
            rng.choice(alphabet) for _ in range(9)
        )
        code = body + uscc.calc_check_digit(body)
        codes.append(code)
        wrong = body + rng.choice([c for c in alphabet if c != code[-1]])
        codes.append(wrong)
        position = rng.randrange(18)
        codes.append(code[:position] + rng.choice("IOSVZio0 -（") + code[position + 1 :])  # not the alphabet
        codes.append(code.lower())  # python-stdnum upper-cases
        codes.append(f"{code[:6]} {code[6:12]}-{code[12:]}")  # separators it strips
        codes.append(f"{code[:2]}{code[2:].replace('1', '１')}")  # full-width digit
        codes.append(code[:17])
        codes.append(code + "0")
    codes += ["", " ", "91110000600037341L", "91110000600037341l", "110108000000016"]
    assert valid_uscc(codes).tolist() == [uscc.is_valid(code) for code in codes]
    assert valid_uscc(["91110000600037341L", "9111000060003734\ud800"]).tolist() == [True, False]
    assert (
        sum(valid_uscc(codes)) > 4_000
    )  # the generated codes are mostly valid: the comparison means something


def test_a_credit_code_python_stdnum_trips_over_is_invalid_not_a_crash() -> None:
    """python-stdnum's digit check (``^[0-9]+$``) lets "1234567\\n" through, then raises ValueError on the
    check digit: the rule marks such a cell invalid instead of failing the whole validation."""
    import pytest
    from stdnum.cn import uscc

    from crm_core.validation import valid_uscc

    broken = "5576032\nRY2NNP9DH0"  # compact: the newline is the eighth character
    with pytest.raises(ValueError):
        uscc.is_valid(broken)
    assert valid_uscc([broken, VALID_USCC, " 5576032\nRY2NNP9DH0 "]).tolist() == [False, True, False]
    assert valid_uscc([broken, "9111000060003734\ud800"]).tolist() == [False, False]  # the one-by-one path
    rule = RULES["customer.credit_code.check_digit"]
    frame = pd.DataFrame({"credit_code": [VALID_USCC, broken]}, index=[10, 11])
    found = validate(rule.entity, frame, [rule], CONTEXT)
    assert found[["index", "rule"]].to_dict("records") == [{"index": 11, "rule": rule.name}]
