"""Guards on the committed notebooks themselves (the solution edition in notebooks/).

nbval proves the notebooks still run; these tests prove they were saved the way a student should
meet them: numbered and titled, executed in order, no stray errors or local paths in the outputs,
the profile and versions printed first, and the exercise convention intact.
"""

import re
from pathlib import Path

import nbformat
import pytest

from course_lib.editions import student_notebook

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
LOCAL_PATH = re.compile(r"(/work/|/root/|/home/\w+|/Users/\w+|/tmp/pytest|[A-Z]:\\\\Users)")


def ids():
    return [p.name for p in NOTEBOOKS]


def load(path):
    return nbformat.read(path, as_version=4)


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_notebooks_exist_and_are_numbered_uniquely():
    assert NOTEBOOKS, "no notebooks found"
    numbers = [p.name[:2] for p in NOTEBOOKS]
    assert all(re.fullmatch(r"\d\d_[a-z0-9_]+\.ipynb", p.name) for p in NOTEBOOKS), numbers
    assert len(set(numbers)) == len(numbers)
    assert numbers[0] == "00"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids())
def test_title_cell(path):
    first = load(path).cells[0]
    assert first.cell_type == "markdown"
    assert re.match(rf"# {path.name[:2]} · \S", first.source), first.source.splitlines()[0]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids())
def test_kernelspec_is_plain_python3(path):
    assert load(path).metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids())
def test_executed_top_to_bottom_in_order(path):
    counts = [c.execution_count for c in code_cells(load(path))
              if "skip-execution" not in c.metadata.get("tags", [])]
    assert None not in counts, "every code cell has been executed and saved with its output"
    assert counts == sorted(counts) and len(set(counts)) == len(counts), f"execution counts out of order: {counts}"
    assert counts[0] == 1, "executed in one fresh kernel, from the top"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids())
def test_no_stray_errors_or_local_paths_in_outputs(path):
    for index, cell in enumerate(code_cells(load(path))):
        tags = cell.metadata.get("tags", [])
        for output in cell.outputs:
            if output.output_type == "error":
                assert "raises-exception" in tags, f"code cell {index} saved an error: {output.ename}"
            text = output.get("text", "") + str(output.get("data", {}).get("text/plain", ""))
            assert not LOCAL_PATH.search(text), f"code cell {index} shows a local path: {LOCAL_PATH.search(text)[0]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids())
def test_starts_by_printing_profile_and_versions(path):
    first = code_cells(load(path))[0]
    assert "course_lib.start(" in first.source
    printed = "".join(o.get("text", "") for o in first.outputs)
    assert printed.startswith("profile: ") and "versions: " in printed and "torch " in printed


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids())
def test_saved_edition_is_the_cpu_run(path):
    """What a student reads first is the laptop run, not the ci smoke test nor an unrecorded gpu run."""
    first = "".join(o.get("text", "") for o in code_cells(load(path))[0].outputs)
    assert first.startswith("profile: cpu on cpu"), (
        f"{path.name} was saved from {first.splitlines()[0] if first else 'no run'!r}; re-execute it with "
        f"`make execute NB=notebooks/{path.name} PROFILE=cpu`")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids())
def test_no_warnings_on_stderr(path):
    """A warning in a saved notebook is fixed at its source or filtered (with a comment saying why)."""
    for index, cell in enumerate(code_cells(load(path))):
        for output in cell.outputs:
            if output.output_type == "stream" and output.name == "stderr":
                raise AssertionError(f"code cell {index} wrote to stderr: {output.text.strip()[:200]!r}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids())
def test_progress_bars_read_as_finished_without_a_kernel(path):
    from course_lib.tools.widgets import unfinished_progress_bars

    unfinished = unfinished_progress_bars(load(path))
    assert not unfinished, (f"saved progress bars that look unfinished where widgets are not rendered: "
                            f"{unfinished}; `make execute` rewrites them from the saved widget state")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids())
def test_exercises_follow_the_convention(path):
    nb = load(path)
    student = student_notebook(nb, path.name)  # raises EditionError naming the cell if broken
    exercises = [c for c in nb.cells if "exercise" in c.metadata.get("tags", [])]
    checks = [c for c in nb.cells if "check" in c.metadata.get("tags", [])]
    assert len(exercises) == len(checks)
    for cell in checks:
        assert cell.source.startswith("# NBVAL_CHECK_OUTPUT"), "a check's verdict is compared by nbval"
        assert "checks.check_" in cell.source
        assert "✅" in "".join(o.get("text", "") for o in cell.outputs), "the solution passes its check"
    assert all("BEGIN SOLUTION" not in c.source for c in student.cells)


def test_checks_and_stubs_exist_for_every_lesson_with_exercises():
    total = sum(1 for p in NOTEBOOKS for c in load(p).cells if "exercise" in c.metadata.get("tags", []))
    assert total >= 1


def test_finished_bar_text_is_rebuilt_from_the_saved_widget_state():
    from course_lib.tools.widgets import finish_progress_bars, unfinished_progress_bars

    ids_ = {"box": "HBoxModel", "l": "HTMLModel", "b": "FloatProgressModel", "r": "HTMLModel"}
    state = {k: {"model_name": v, "state": {}} for k, v in ids_.items()}
    state["box"]["state"]["children"] = ["IPY_MODEL_l", "IPY_MODEL_b", "IPY_MODEL_r"]
    state["l"]["state"]["value"] = "sweep:\u2007100%"
    state["b"]["state"].update(value=20.0, max=20.0)
    state["r"]["state"]["value"] = "\u200720/20\u2007[04:54&lt;00:00,\u200731.43s/it]"
    output = {"output_type": "display_data", "metadata": {},
              "data": {"application/vnd.jupyter.widget-view+json": {"model_id": "box"},
                       "text/plain": "sweep:   0%|          | 0/20 [00:00<?, ?it/s]"}}
    nb = {"metadata": {"widgets": {"application/vnd.jupyter.widget-state+json": {"state": state}}},
          "cells": [{"cell_type": "code", "outputs": [output]}]}
    assert unfinished_progress_bars(nb) == ["sweep:   0%|          | 0/20 [00:00<?, ?it/s]"]
    assert finish_progress_bars(nb) == 1
    assert output["data"]["text/plain"] == "sweep: 100%|██████████| 20/20 [04:54<00:00, 31.43s/it]"
    assert unfinished_progress_bars(nb) == []


CORE_WORDS_MAX = 2_700  # issue 21: "a core path of at most ~2,500 words of markdown"


def readme_rows():
    """The README's course table: lesson number -> (core-path minutes, core words, going-further words)."""
    text = (NOTEBOOKS[0].parent.parent / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d\d) \|.*\| (\d+) min \| ([\d,]+) / ([\d,]+) \|$", text, re.MULTILINE)
    return {n: (int(m), int(a.replace(",", "")), int(b.replace(",", ""))) for n, m, a, b in rows}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids())
def test_core_path_is_short_and_the_readme_counts_it(path, core_path_time):
    core, further = core_path_time.markdown_words(load(path))
    assert core <= CORE_WORDS_MAX, f"{path.name}: the core path holds {core} words of markdown; move depth to Going further"
    row = readme_rows().get(path.name[:2])
    assert row is not None, f"the README's course table has no row for lesson {path.name[:2]}"
    stated = row[1:]
    assert abs(stated[0] - core) <= 50 and abs(stated[1] - further) <= 50, (
        f"{path.name}: README states {stated[0]} / {stated[1]} words (core / going further), the notebook "
        f"has {core} / {further}; update the README's course table")


STATED_MINUTES = re.compile(r"(?:about|takes)\s+(?:about\s+)?(\d+)\s+minutes")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids())
def test_stated_core_path_time_matches_the_estimate(path, core_path_time):
    timing = core_path_time
    estimate = timing.core_path(path)
    row = readme_rows().get(path.name[:2])
    assert row is not None, f"the README's course table states no core-path time for lesson {path.name[:2]}"
    stated = row[0]
    assert abs(stated - estimate.minutes) <= timing.TOLERANCE_MINUTES, (
        f"{path.name}: the README states {stated} min, the estimate is {estimate.minutes:.0f} min "
        f"(python scripts/core_path_time.py); update the README's course table and the lesson's opening")
    opening = STATED_MINUTES.findall(load(path).cells[0].source)
    assert opening == [str(stated)], (
        f"{path.name}: its opening cell states {opening or 'no'} minutes, the README {stated}; say the same time")


def test_core_path_estimate_counts_exercise_lines_the_student_writes(core_path_time):
    timing = core_path_time
    lesson = timing.core_path(next(p for p in NOTEBOOKS if p.name.startswith("03")))
    assert lesson.exercises >= 3 and lesson.lines_written > lesson.exercises
    assert lesson.run_seconds > 0 and lesson.code_lines > 0
    slower = timing.CorePath(lesson.words + timing.READING_WPM * 10, lesson.further_words, lesson.code_lines,
                             lesson.exercises, lesson.lines_written, lesson.run_seconds)
    assert slower.minutes - lesson.minutes == pytest.approx(10)


def test_worked_path_measures_a_students_read_from_the_cell_times(tmp_path, core_path_time):
    """--worked: the time from the first core-path cell a student ran to the last, pauses over BREAK_MINUTES left
    out, cells still carrying the shipped run's times (not re-run) and Going further ignored."""
    import datetime as dt

    timing = core_path_time
    shipped = next(p for p in NOTEBOOKS if p.name.startswith("02"))
    nb = load(shipped)
    core = timing.core_code_cells(nb)
    skipped = core[3]                                  # keeps the shipped times: not run by the student
    ran = [c for c in core if c is not skipped]
    t0 = dt.datetime(2027, 1, 11, 9, 0, tzinfo=dt.timezone.utc)
    for i, cell in enumerate(ran):
        start = t0 + dt.timedelta(seconds=60 * i + (7200 if i >= 5 else 0))      # a two-hour break before the 6th
        cell.metadata["execution"] = {"iopub.execute_input": start.isoformat(),
                                      "shell.execute_reply": (start + dt.timedelta(seconds=5)).isoformat()}
    further = [c for c in nb.cells if c.cell_type == "code" and c not in core]
    for cell in further:                               # a day later: not the core path, not counted
        cell.metadata["execution"] = {"iopub.execute_input": (t0 + dt.timedelta(days=1)).isoformat(),
                                      "shell.execute_reply": (t0 + dt.timedelta(days=1, seconds=9)).isoformat()}
    worked = tmp_path / shipped.name
    nbformat.write(nb, worked)
    measured = timing.worked_path(worked, shipped)
    assert (measured.cells_run, measured.cells, measured.pauses) == (len(ran), len(core), 1)
    assert measured.minutes * 60 == pytest.approx(5 * len(ran) + 55 * (len(ran) - 2))
    with pytest.raises(SystemExit, match="not named like a lesson"):
        timing.report_worked([tmp_path / "notes.ipynb"])
    with pytest.raises(SystemExit, match="does not exist"):
        timing.report_worked([tmp_path / "02_missing.ipynb"])
