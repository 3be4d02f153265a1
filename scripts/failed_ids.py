"""pytest plugin for scripts/test_latest.sh: append the id of every failed test (and of every file that
failed to collect) to the file named by FAILED_IDS_FILE, one per line."""

import os


def _record(nodeid: str) -> None:
    with open(os.environ["FAILED_IDS_FILE"], "a") as out:
        out.write(nodeid + "\n")


def pytest_runtest_logreport(report):
    if report.failed:
        _record(report.nodeid)


def pytest_collectreport(report):
    if report.failed:
        _record(report.nodeid)
