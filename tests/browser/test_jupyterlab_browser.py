"""The JupyterLab experience, tested in a real browser (headless Chromium driven by Playwright).

What a student gets from ``make lab``, on a copy of notebooks/ (nothing in the repo is written):

* a lesson (WIDGET_NOTEBOOK) opens on the course kernel without a dialog, although the notebook names
  the kernelspec ``python3``; Run > Run All Cells runs it without an error output; its explorer is
  live controls (not the text fallback, not "Error displaying widget"); moving a slider redraws the
  figure;
* in the student edition of a lesson (STUDENT_NOTEBOOK) every check cell shows the friendly
  "Exercise NN.K is not done yet: ..." and every other cell still runs and shows its output;
* the live-widget assertion is not vacuous: a one-cell widget notebook passes it, and fails it once
  the ipywidgets lab extension is disabled (in the test server's throw-away config only);
* the settings shipped in jupyter/ are what JupyterLab and the server serve.

Needs /usr/bin/chromium (``scripts/install_browser.sh``; without it the tests skip, or fail under CI), the course kernel
and the course's Jupyter settings (``make setup``). Screenshots land in test-artifacts/browser/.

To point the test at other lessons or widgets, change the constants below (or, while developing,
set the environment variables named there).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import pytest

from labdriver import (WIDGET_EXTENSION, LabServer, Notebook, cell_source, cell_tags, describe_error,
                       error_outputs, skip_or_fail, wait_for)

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "browser"
sys.path.insert(0, str(REPO / "jupyter"))
import install_settings  # noqa: E402  (jupyter/install_settings.py)

# ---- what to test: change these to move the test to another lesson --------------------------------
NOTEBOOKS = Path(os.environ.get("COURSE_BROWSER_NOTEBOOKS", REPO / "notebooks"))
WIDGET_NOTEBOOK = os.environ.get("COURSE_BROWSER_WIDGET_NOTEBOOK", "01_attention.ipynb")
STUDENT_NOTEBOOK = os.environ.get("COURSE_BROWSER_STUDENT_NOTEBOOK", "00_setup.ipynb")
COURSE_KERNEL = install_settings.course_kernel()          # "llm-course", the Makefile's KERNEL
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"  # how a stored output says "a widget was here"
LIVE_WIDGET = ".jupyter-widgets.widget-slider, .jupyter-widgets.widget-dropdown, .widget-interact"
SLIDER_HANDLE = ".widget-slider .noUi-handle"
DROPDOWN = ".widget-dropdown select"
FIGURE = ".jp-RenderedImage img"
WIDGET_REPR = re.compile(r"^[A-Za-z]\w*\((children|value|description|options)=")  # e.g. interactive(children=(
NOT_DONE = re.compile(r"^Exercise \d{2}\.\d+ is not done yet: ")

PROBE = "widget-probe.ipynb"  # one widget cell, written into the lab's root by the fixture
PROBE_SOURCE = """from ipywidgets import IntSlider, interact
import matplotlib.pyplot as plt

def draw(n):
    plt.plot(range(n + 2))
    plt.title(f"n = {n}")
    plt.show()

interact(draw, n=IntSlider(value=1, min=0, max=5));"""
NEGATIVE_NOTEBOOK = os.environ.get("COURSE_BROWSER_NEGATIVE_NOTEBOOK", PROBE)
STUDENT_DIR = "student-edition"  # where the student edition goes inside the lab's root
RUN_TIMEOUT = 180.0  # seconds for Run All under the ci profile on a busy machine

pytestmark = pytest.mark.slow


# ---- fixtures ---------------------------------------------------------------------------------------
def _require(notebook: str) -> Path:
    path = NOTEBOOKS / notebook
    if not path.exists():
        skip_or_fail(f"{path} does not exist yet; the browser test needs it (or set COURSE_BROWSER_NOTEBOOKS)")
    return path


def _check_setup() -> None:
    stale = install_settings.missing()
    if stale:
        pytest.fail("the course's Jupyter settings are not installed in this environment "
                    f"({', '.join(map(str, stale))}): run `make setup` "
                    f"(it runs `{Path(sys.executable).name} jupyter/install_settings.py`).", pytrace=False)
    kernels = Path(sys.prefix) / "share" / "jupyter" / "kernels" / COURSE_KERNEL / "kernel.json"
    if not kernels.exists():
        pytest.fail(f"the course kernel '{COURSE_KERNEL}' is not registered in {sys.prefix}: run `make setup`.",
                    pytrace=False)


@pytest.fixture(scope="module")
def lab(browser):
    """One ``jupyter lab`` for the module, rooted at a copy of the lesson folder (so nothing JupyterLab
    writes, checkpoints say, lands in the repo), with the student edition in its sub-folder
    ``student-edition/``; kernels get the ci profile."""
    _require(WIDGET_NOTEBOOK)
    _require(STUDENT_NOTEBOOK)
    _check_setup()
    from course_lib.editions import write_student_edition

    workdir = Path(tempfile.mkdtemp(prefix="browser-test-"))
    root = workdir / "notebooks"
    shutil.copytree(NOTEBOOKS, root, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    write_student_edition(NOTEBOOKS, root / STUDENT_DIR)
    probe = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(PROBE_SOURCE)])
    probe.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(probe, root / PROBE)
    try:
        with LabServer(root, env={"COURSE_PROFILE": "ci"}, keep_log=ARTIFACTS / "jupyter-lab.log") as server:
            yield server
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# ---- helpers ----------------------------------------------------------------------------------------
def widget_cells(path: Path) -> list[int]:
    """Indices of the cells that showed a widget when the notebook was executed (falls back to
    code cells calling ``interact(``)."""
    nb = nbformat.read(path, as_version=4)
    found = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and any(WIDGET_MIME in out.get("data", {}) for out in cell.get("outputs", []))]
    return found or [i for i, cell in enumerate(nb.cells)
                     if cell.cell_type == "code" and "interact(" in cell.source]


def open_and_run_all(page, server: LabServer, notebook: str) -> tuple[Notebook, dict]:
    started = time.monotonic()
    nb = Notebook(page, server, notebook).open(timeout=90)
    assert_course_kernel(nb)
    opened = time.monotonic()
    nb.run_all()
    nb.wait_run_finished(timeout=RUN_TIMEOUT)
    print(f"\n{notebook}: page and kernel ready in {opened - started:.1f} s, "
          f"Run All took {time.monotonic() - opened:.1f} s")
    return nb, nb.model()


def assert_course_kernel(nb: Notebook) -> None:
    session = nb.server.session_for(nb.path)
    assert session is not None, f"no kernel session for {nb.path}"
    name = session["kernel"]["name"]
    assert name == COURSE_KERNEL, (f"{nb.path} runs on kernel '{name}', not the course kernel '{COURSE_KERNEL}': "
                                   "are jupyter/jupyter_server_config.json and the kernel installed (make setup)?")
    display = nb.server.api("kernelspecs")["kernelspecs"][COURSE_KERNEL]["spec"]["display_name"]
    try:
        wait_for(lambda: nb.kernel_display_name() == display, timeout=20,
                 what=f"the toolbar to show the kernel '{display}'")
    except AssertionError as error:
        raise AssertionError(f"{error}; it shows {nb.kernel_display_name()!r}") from None


def assert_all_ran(model: dict, notebook: str) -> None:
    not_run = [i for i, cell in enumerate(model["cells"])
               if cell["cell_type"] == "code" and cell_source(cell).strip() and cell.get("execution_count") is None]
    assert not not_run, f"{notebook}: code cells {not_run} did not run after Run All"


def assert_cell_times_recorded(model: dict, notebook: str, timing) -> None:
    """The course's settings make JupyterLab record when each cell ran (recordTiming), so that
    scripts/core_path_time.py --worked (``timing``) can measure a student's read: here, of this Run All."""
    with tempfile.TemporaryDirectory() as folder:
        worked = Path(folder) / notebook
        cells = [{k: v for k, v in cell.items() if not (k == "attachments" and v is None)}   # as the server saves it
                 for cell in model["cells"]]
        worked.write_text(json.dumps({**model, "cells": cells}), encoding="utf-8")
        measured = timing.worked_path(worked, REPO / "notebooks" / notebook)
    assert measured.cells_run == measured.cells, (
        f"{notebook}: JupyterLab recorded run times for {measured.cells_run} of {measured.cells} core-path cells "
        "after Run All; is recordTiming on in jupyter/overrides.json (make setup installs it)?")
    assert 0 < measured.minutes < 30 and measured.pauses == 0, measured


def assert_live_widgets(nb: Notebook, cells: list[int], *, timeout: float = 20.0) -> None:
    """Each widget cell shows live controls, not "Error displaying widget" and not the text fallback
    (``interactive(children=...)``) that JupyterLab prints when no widget renderer is installed."""
    assert cells, f"{nb.path} has no widget cell (no stored {WIDGET_MIME} output, no interact( call)"
    for index in cells:
        cell = nb.scroll_to(index)
        outputs = cell.locator(".jp-Cell-outputArea")

        def verdict() -> str | None:
            text = outputs.text_content()
            if "Error displaying widget" in text:
                return f"shows {text.strip()[:300]!r}"
            if cell.locator(LIVE_WIDGET).count() and cell.locator(LIVE_WIDGET).first.is_visible():
                return "live"
            fallbacks = cell.locator('.jp-OutputArea-output[data-mime-type="text/plain"]').all_text_contents()
            if any(WIDGET_REPR.match(t.strip()) for t in fallbacks):
                return (f"shows the widget's text fallback {next(t for t in fallbacks if WIDGET_REPR.match(t.strip()))[:200]!r}")
            return None

        try:
            seen = wait_for(verdict, timeout=timeout, what=f"cell {index} of {nb.path} to show its widget")
        except AssertionError:
            seen = f"shows no widget; its output reads {outputs.text_content().strip()[:300]!r}"
        if seen != "live":
            raise AssertionError(f"cell {index} of {nb.path} {seen} instead of live controls ({LIVE_WIDGET}). "
                                 f"Is the ipywidgets lab extension ({WIDGET_EXTENSION}) installed and enabled?")
        assert cell.locator(FIGURE).count() >= 1, f"cell {index} of {nb.path}: the explorer shows no figure"


def figure_src(cell) -> str | None:
    images = cell.locator(FIGURE)
    return images.first.get_attribute("src") if images.count() else None


def move_a_control(nb: Notebook, index: int) -> str:
    """Move the first slider one step (keyboard on its handle) or pick another dropdown entry;
    return what was done."""
    cell = nb.scroll_to(index)
    handles = cell.locator(SLIDER_HANDLE)
    if handles.count():
        handle = handles.first
        handle.focus()
        nb.page.keyboard.press("ArrowRight")
        return "slider moved one step right"
    select = cell.locator(DROPDOWN).first
    options = select.locator("option").all_text_contents()
    current = select.input_value()
    choice = next(o for o in options if o != current)
    select.select_option(label=choice)
    return f"dropdown set to {choice!r}"


# ---- tests ------------------------------------------------------------------------------------------
def test_lesson_runs_on_the_course_kernel_with_live_widgets(page, lab, core_path_time):
    nb, model = open_and_run_all(page, lab, WIDGET_NOTEBOOK)
    stored = nbformat.read(NOTEBOOKS / WIDGET_NOTEBOOK, as_version=4)
    assert stored.metadata.get("kernelspec", {}).get("name") == "python3", "the lesson's committed kernelspec changed"

    assert_all_ran(model, WIDGET_NOTEBOOK)
    errors = [(i, describe_error(out)) for i, cell in enumerate(model["cells"]) for out in error_outputs(cell)]
    assert not errors, f"{WIDGET_NOTEBOOK} shows errors after Run All: {errors}"

    figures = page.locator(f"{nb.panel} {FIGURE}")
    assert figures.count() >= 1, "no figure was drawn"

    assert_cell_times_recorded(model, WIDGET_NOTEBOOK, core_path_time)

    cells = widget_cells(lab.root / WIDGET_NOTEBOOK)
    assert_live_widgets(nb, cells)

    cell = nb.scroll_to(cells[0])
    before = figure_src(cell)
    nb.screenshot(ARTIFACTS / "lesson-widget-before.png")
    action = move_a_control(nb, cells[0])
    wait_for(lambda: (src := figure_src(cell)) is not None and src != before, timeout=30,
             what=f"the explorer's figure to change after the {action}")
    nb.screenshot(ARTIFACTS / "lesson-widget-after.png")


def test_student_edition_shows_the_friendly_error_and_keeps_going(page, lab):
    path = f"{STUDENT_DIR}/{STUDENT_NOTEBOOK}"
    student = nbformat.read(lab.root / path, as_version=4)
    checks = [i for i, cell in enumerate(student.cells) if "check" in cell_tags(cell)]
    assert checks, f"{STUDENT_NOTEBOOK} has no exercise; pick a lesson with one for STUDENT_NOTEBOOK"
    solution = nbformat.read(NOTEBOOKS / STUDENT_NOTEBOOK, as_version=4)

    nb, model = open_and_run_all(page, lab, path)
    assert_all_ran(model, path)
    for index, cell in enumerate(model["cells"]):
        errors = error_outputs(cell)
        if index in checks:
            assert len(errors) == 1, f"check cell {index} shows {len(errors)} errors, expected the one friendly error"
            error = errors[0]
            assert error["ename"] == "NotAttempted" and NOT_DONE.match(error["evalue"]), \
                f"check cell {index} shows {describe_error(error)!r}, not the friendly 'not done yet' error"
            shown = nb.scroll_to(index).locator(".jp-Cell-outputArea").text_content()
            assert error["evalue"].split(":")[0] in shown, f"the student does not see {error['evalue']!r}"
        else:
            assert not errors, f"cell {index} of the student edition shows {describe_error(errors[0])!r}"
    # The lesson goes on after the first unfinished exercise: later cells printed or drew what they
    # print or draw in the solution edition.
    for index in range(checks[0] + 1, len(model["cells"])):
        cell, reference = model["cells"][index], solution.cells[index]
        if cell["cell_type"] == "code" and reference.get("outputs") and index not in checks:
            assert cell.get("outputs"), f"cell {index} (after the first check) ran but shows no output"
    nb.scroll_to(checks[0])
    nb.screenshot(ARTIFACTS / "student-check-cell.png")


def test_probe_widget_renders_live_with_the_extension(page, lab):
    """Positive control for the probe: the same notebook with the extension on passes the assertion."""
    nb, model = open_and_run_all(page, lab, PROBE)
    assert not [out for cell in model["cells"] for out in error_outputs(cell)]
    assert_live_widgets(nb, widget_cells(lab.root / PROBE))


def test_widget_assertion_fails_without_the_widget_extension(page, lab):
    """The live-widget assertion is not vacuous: with the ipywidgets lab extension disabled (in this
    server's own throw-away config, as ``jupyter labextension disable`` would write it) a notebook
    whose widget renders live above shows the text fallback, and the assertion refuses it.

    By default this runs the one-cell PROBE notebook (seconds); set COURSE_BROWSER_NEGATIVE_NOTEBOOK
    to the lesson's name to see the lesson itself fail the same way."""
    notebook = NEGATIVE_NOTEBOOK
    lab.disable_extensions(WIDGET_EXTENSION)
    try:
        nb, model = open_and_run_all(page, lab, notebook)
        disabled = page.evaluate("() => JSON.parse(document.getElementById('jupyter-config-data')"
                                 ".textContent).disabledExtensions")
        assert WIDGET_EXTENSION in json.dumps(disabled), f"the extension was not disabled: {disabled}"
        errors = [describe_error(out) for cell in model["cells"] for out in error_outputs(cell)]
        assert not errors, f"{notebook} failed for another reason: {errors}"
        with pytest.raises(AssertionError, match="shows the widget's text fallback") as caught:
            assert_live_widgets(nb, widget_cells(lab.root / notebook))
        print(f"\nwithout {WIDGET_EXTENSION} the assertion says: {caught.value}")
    finally:
        lab.enable_all_extensions()


def test_course_settings_reach_jupyterlab(lab):
    """The shipped overrides are what JupyterLab serves as defaults, and the server offers the course
    kernel only, as its default."""
    specs = lab.api("kernelspecs")
    assert specs["default"] == COURSE_KERNEL and set(specs["kernelspecs"]) == {COURSE_KERNEL}, specs
    shipped = json.loads((REPO / "jupyter" / "overrides.json").read_text())
    for plugin, values in shipped.items():
        served = lab.lab_api(f"settings/{plugin}")
        for key, value in values.items():
            # Overrides reach the front end as the schema's default.
            assert served["schema"]["properties"][key]["default"] == value, (plugin, key)
