"""Fixtures of the browser test: headless Chromium (Debian's, never a downloaded one), a page per test,
and screenshots under test-artifacts/browser/ on success and on failure.

Without Chromium (or Playwright) the browser tests skip, with the reason, on a developer's machine;
under CI (the ``CI`` environment variable set, as ``.ci/run`` does) they fail instead, so that a CI
run can never pass without the browser test having run."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from labdriver import skip_or_fail

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "browser"
CHROMIUM = Path(os.environ.get("COURSE_CHROMIUM", "/usr/bin/chromium"))  # Debian's; never a downloaded one
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Remember each phase's report on the item, so a fixture can tell whether its test failed."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture(scope="session")
def browser():
    if not CHROMIUM.exists():
        skip_or_fail(f"Chromium not found at {CHROMIUM}: run scripts/install_browser.sh (as root, Debian) "
                     f"to run the browser test")
    try:
        import playwright.sync_api as sync_api
    except ImportError:
        skip_or_fail("playwright is not installed: run `make setup` (it is in requirements.txt)")
    shutil.rmtree(ARTIFACTS, ignore_errors=True)  # the folder shows the last run only
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-"))
    with sync_api.sync_playwright() as playwright:
        # A fresh profile every run; Playwright would otherwise make its own temporary one too.
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000}, chromium_sandbox=False)
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser, request):
    """A new tab; on teardown a screenshot ``<test name>-passed.png`` or ``-failed.png`` is saved,
    and on failure the browser console too."""
    tab = browser.new_page()
    console: list[str] = []
    tab.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
    tab.on("pageerror", lambda error: console.append(f"pageerror: {error}"))
    tab.set_default_timeout(30_000)
    yield tab
    report = getattr(request.node, "report_call", None)
    failed = report is None or report.failed
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        tab.screenshot(path=str(ARTIFACTS / f"{name}-{'failed' if failed else 'passed'}.png"), full_page=True)
    except Exception:  # noqa: BLE001 -- a broken page must not hide the test's own error
        pass
    if failed:
        (ARTIFACTS / f"{name}-console.txt").write_text("\n".join(console))
    tab.close()
