"""Under CI the browser test runs or fails: a missing Chromium is a failure there, a printed skip elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
ONE_TEST = ["tests/browser/test_jupyterlab_browser.py", "-k", "test_course_settings_reach_jupyterlab"]


def run_browser_test(ci: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CI": ci, "COURSE_CHROMIUM": "/nonexistent/chromium"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *ONE_TEST],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_missing_chromium_fails_under_ci():
    result = run_browser_test("true")
    assert result.returncode == 1, result.stdout[-2000:]
    assert "Chromium not found at /nonexistent/chromium" in result.stdout
    assert "so the browser test must run, not skip" in result.stdout


def test_missing_chromium_is_a_reported_skip_elsewhere():
    result = run_browser_test("")
    assert result.returncode == 0, result.stdout[-2000:]
    assert "SKIPPED" in result.stdout and "Chromium not found at /nonexistent/chromium" in result.stdout
