"""Masking secrets in messages: the secret goes, the punctuation around it stays."""

from __future__ import annotations

import pytest

from crm_core.errors import mask_secrets


def test_a_mariadb_access_denied_keeps_its_closing_parenthesis() -> None:
    raw = """(1045, "Access denied for user 'crm'@'localhost' (using password: YES)")"""
    assert mask_secrets(raw) == """(1045, "Access denied for user 'crm'@'localhost' (using password: ***)")"""


@pytest.mark.parametrize(
    ("raw", "masked"),
    [
        ("[password=s3cret]", "[password=***]"),
        ("connect(host=db, [password=s3cret)])", "connect(host=db, [password=***])"),
        # no opener before the keyword: the bracket may be the password's, so it is masked with it
        ("PWD=s3cret);UID=x", "PWD=***;UID=x"),
        ("PWD=)", "PWD=***"),
        ("a (b) password=s3cret)", "a (b) password=***"),
    ],
)
def test_a_closing_bracket_stays_only_when_it_closes_an_earlier_one(raw: str, masked: str) -> None:
    assert mask_secrets(raw) == masked


def test_a_quoted_secret_is_masked_up_to_its_closing_quote() -> None:
    assert mask_secrets('password: "two words"') == 'password: "***"'
    assert mask_secrets("{'client_secret': 'a b\\'c', 'x': 1}") == "{'client_secret': '***', 'x': 1}"
    assert mask_secrets('token: "unterminated s3cret') == 'token: "***'


def test_masking_still_hides_every_kind_of_secret() -> None:
    assert mask_secrets("postgresql://crm:s3cret@db/x") == "postgresql://crm:***@db/x"
    assert mask_secrets("DSN=u8;UID=sa;PWD=p@ss;x=1") == "DSN=u8;UID=sa;PWD=***;x=1"
    assert mask_secrets("Password={a;b};UID=x") == "Password=***;UID=x"
    assert mask_secrets("password: ${CRM_PW}") == "password: ${CRM_PW}"
    assert mask_secrets('password: "${CRM_PW}"') == 'password: "${CRM_PW}"'
