"""Headless Chromium for the playground's tests and screenshots: Debian's `chromium` and
`chromium-driver` packages (make test-tools installs them) driven by selenium. Nothing is
downloaded at run time: both binaries are given by path, so Selenium Manager never runs."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

CHROMIUM = os.environ.get("ADASD_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("ADASD_CHROMEDRIVER", "/usr/bin/chromedriver")
# as root Chromium needs --no-sandbox; the rest keeps a test browser from reaching out to the network
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1")


def missing() -> str | None:
    """What is not installed, with the command that installs it; None when all is there."""
    for path, _package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} not found: install it with `apt-get install -y chromium chromium-driver` (make test-tools)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is missing: pip install -e '.[dev]'"
    return None


@contextmanager
def chromium(width: int = 1280, height: int = 1000) -> Iterator:
    """A headless Chromium WebDriver with a fresh profile, removed afterwards."""
    problem = missing()
    if problem:
        raise RuntimeError(problem)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="adasd-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + (f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console errors, for the tests
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# ---------------------------------------------------------------------------- the playground page


def open_playground(driver, base_url: str, timeout: float = 60, **fields) -> None:
    """Load base_url/playground, wait until it knows the server, fill in fields by element id
    (underscores for dashes: max_tokens -> #max-tokens; checkboxes take booleans, selects values)."""
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver.get(base_url.rstrip("/") + "/playground")
    WebDriverWait(driver, timeout).until(lambda d: "Serving" in d.find_element("id", "server-info").text)
    for name, value in fields.items():
        el = driver.find_element("id", name.replace("_", "-"))
        if el.get_attribute("type") == "checkbox":
            if el.is_selected() != bool(value):
                el.click()
        elif el.tag_name == "select":
            Select(el).select_by_value(str(value))
        else:
            el.clear()
            el.send_keys(str(value))


def wait_run(driver, panel: str = "main", timeout: float = 120) -> dict:
    """The page's raw data of a run (window.adasdPlayground.runs[panel]) once the page is idle again."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: d.execute_script(
        "const r = window.adasdPlayground.runs[arguments[0]];"
        "return !!(r && r.done) && document.body.dataset.busy === '0'", panel))
    return driver.execute_script(
        "const r = window.adasdPlayground.runs[arguments[0]]; return {sources: r.sources, rounds: r.rounds,"
        " text: r.text, usage: r.usage, error: r.error, chunkLog: r.chunkLog}", panel)
