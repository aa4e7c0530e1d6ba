"""Debian's headless Chromium (``chromium``, ``chromium-driver``) driven by Selenium with the system
chromedriver, no browser download. Skipped with the reason when something is missing, except under
CI=true, where it must be there (``.ci/run`` installs it)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@contextlib.contextmanager
def headless_chromium(*, window: str, lang: str, page_timeout: float) -> Iterator[Any]:
    """Yield a Selenium driver for headless Chromium (window ``"1500,1100"``, UI language ``lang``)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None
    )
    missing = [name for name, path in (("chromium", browser), ("chromedriver", driver_path)) if not path]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip)")
    if missing:
        reason = f"real-browser tests need {', '.join(missing)} (apt-get install chromium chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true requires them: {reason}")
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = str(browser)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={window}", f"--lang={lang}"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(driver_path)))
    driver.set_page_load_timeout(page_timeout)
    try:
        yield driver
    finally:
        driver.quit()
