"""Numbers from the environment: one parser for waits, timeouts and ages, and what it says when one is wrong."""

from __future__ import annotations

import datetime as dt

import pytest

from crm_core.errors import ConfigError, LoadError, SyncError
from crm_core.settings import env_number
from integration.alerts import AlertConfig, AlertConfigError
from integration.assets.sync import backlog_error_after
from integration.sync.engine import BusyWait


@pytest.mark.parametrize(
    ("raw", "expected"), [(None, 30.0), ("", 30.0), ("  ", 30.0), ("2.5", 2.5), (" 7 ", 7.0)]
)
def test_an_unset_or_blank_setting_is_the_default_and_a_number_is_read(
    raw: str | None, expected: float
) -> None:
    env = {} if raw is None else {"CRMI_X": raw}
    assert env_number("CRMI_X", 30.0, LoadError, env=env) == expected


@pytest.mark.parametrize("raw", ["abc", "0", "-1", "nan", "inf", "1e999"])
def test_a_setting_that_is_no_number_above_0_names_itself_and_what_it_allows(raw: str) -> None:
    with pytest.raises(LoadError) as raised:
        env_number("CRMI_X", 30.0, LoadError, env={"CRMI_X": raw})
    assert str(raised.value) == f"CRMI_X={raw!r} must be a number of seconds, above 0"


def test_zero_is_allowed_when_asked_and_an_upper_limit_is_named() -> None:
    assert env_number("CRMI_X", 5.0, SyncError, zero=True, env={"CRMI_X": "0"}) == 0.0
    with pytest.raises(SyncError, match=r"CRMI_X='-1' must be a number of seconds, 0 or more$"):
        env_number("CRMI_X", 5.0, SyncError, zero=True, env={"CRMI_X": "-1"})
    with pytest.raises(ConfigError, match=r"CRMI_X='61' must be a number of minutes, above 0, at most 60$"):
        env_number("CRMI_X", 5.0, ConfigError, unit="minutes", at_most=60, env={"CRMI_X": "61"})


def test_every_setting_read_through_it_refuses_a_wrong_value_with_its_own_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CRMI_SYNC_BACKLOG_ERROR_HOURS", "four")
    with pytest.raises(ConfigError, match="CRMI_SYNC_BACKLOG_ERROR_HOURS='four' must be a number of hours"):
        backlog_error_after()
    monkeypatch.setenv("CRMI_SYNC_BACKLOG_ERROR_HOURS", "0.5")  # below the 1-hour warning: the warning's age
    assert backlog_error_after() == dt.timedelta(hours=1)
    with pytest.raises(
        AlertConfigError, match="CRMI_ALERT_TIMEOUT='90' must be a number of seconds, above 0, at most 60"
    ):
        AlertConfig.from_env(
            {"CRMI_ALERT_WEBHOOK_URL": "http://127.0.0.1:9/hook", "CRMI_ALERT_TIMEOUT": "90"}
        )
    with pytest.raises(SyncError, match="must be a number of seconds, 0 or more"):
        BusyWait.from_env({"CRMI_CORE_BUSY_WAIT_SECONDS": "-3"})
