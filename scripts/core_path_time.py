"""How long each lesson's core path takes, estimated from the notebook itself, and the README table's row.

    .venv/bin/python scripts/core_path_time.py          # one row per lesson: words, lines, runs, exercises, minutes
    .venv/bin/python scripts/core_path_time.py --worked submitted/*/*/NN_*.ipynb   # what students really took

The core path is everything before a lesson's first "Going further" heading. Its time is the sum of

* reading its markdown at ``READING_WPM`` words a minute: adults read English non-fiction silently at
  about 238 words a minute (Brysbaert 2019, "How many words do we read per minute?", J. Memory and
  Language 109, meta-analysis of 190 studies); prose dense with symbols and derivations is taken at half that;
* reading the code it gives (non-blank, non-comment lines outside exercise cells) at ``CODE_LINES_PER_MINUTE``;
* running its cells, as long as the saved ``cpu`` run took (each cell's execution timestamps);
* its exercises: ``EXERCISE_MINUTES`` each to read the task, run the check and read its answer, plus
  ``MINUTES_PER_LINE_WRITTEN`` for every line the student edition asks the student to write (a line of the
  solution that the student edition's cell lacks).

The rates are the course's assumptions, written down so the estimate can be argued with and re-made when a
lesson changes. ``--worked`` checks them against real reads: the course's JupyterLab settings
(``jupyter/overrides.json``) record when each cell runs, so a notebook a student worked through holds the
times of its core path. It counts from the first core-path cell the student ran to the last, leaving out
pauses over ``BREAK_MINUTES`` and every cell whose time is still the one the course shipped (not re-run);
reading before the first code cell and after the last is not seen, so it undercounts a little.
``tests/test_notebooks.py`` keeps the README's stated times and each lesson's opening sentence within
``TOLERANCE_MINUTES`` of this estimate.
"""

from __future__ import annotations

import copy
import functools
import re
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import nbformat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

READING_WPM = 120
CODE_LINES_PER_MINUTE = 20
EXERCISE_MINUTES = 5
MINUTES_PER_LINE_WRITTEN = 1.0
TOLERANCE_MINUTES = 10
BREAK_MINUTES = 20

GOING_FURTHER = re.compile(r"^#+ .*going further", re.MULTILINE | re.IGNORECASE)


@dataclass
class CorePath:
    """What a lesson's core path asks of a student, counted from its saved notebook."""

    words: int               # markdown words before the first "Going further" heading
    further_words: int       # markdown words from it on
    code_lines: int          # lines of code given (outside exercise cells) on the core path
    exercises: int           # exercise cells on the core path
    lines_written: int       # lines the student edition leaves the student to write
    run_seconds: float       # the saved cpu run's time in core-path cells

    @property
    def minutes(self) -> float:
        return (self.words / READING_WPM + self.code_lines / CODE_LINES_PER_MINUTE + self.run_seconds / 60
                + self.exercises * EXERCISE_MINUTES + self.lines_written * MINUTES_PER_LINE_WRITTEN)


def _code_lines(source: str) -> list[str]:
    return [line.strip() for line in source.splitlines() if line.strip() and not line.strip().startswith("#")]


def _split(nb) -> list[tuple[Any, bool]]:
    """Every cell of ``nb`` with whether it lies in Going further (from the first such heading on)."""
    cells, in_further = [], False
    for cell in nb.cells:
        in_further = in_further or (cell.cell_type == "markdown" and bool(GOING_FURTHER.search(cell.source)))
        cells.append((cell, in_further))
    return cells


def markdown_words(nb) -> tuple[int, int]:
    """Words of markdown on the core path and in Going further."""
    counts = [0, 0]
    for cell, in_further in _split(nb):
        if cell.cell_type == "markdown":
            counts[in_further] += len(cell.source.split())
    return counts[0], counts[1]


def core_code_cells(nb) -> list:
    """The code cells of the core path."""
    return [cell for cell, in_further in _split(nb) if cell.cell_type == "code" and not in_further]


def _stamps(cell) -> tuple[datetime, datetime] | None:
    """When the cell started and finished running, as its metadata recorded (nbclient, or JupyterLab's recordTiming)."""
    stamps = cell.metadata.get("execution", {})
    if "iopub.execute_input" not in stamps or "shell.execute_reply" not in stamps:
        return None
    return datetime.fromisoformat(stamps["iopub.execute_input"]), datetime.fromisoformat(stamps["shell.execute_reply"])


def core_path(path: Path) -> CorePath:
    """Count the core path of the notebook at ``path`` (the solution edition, as committed)."""
    from course_lib.editions import student_notebook

    nb = nbformat.read(path, as_version=4)
    student = student_notebook(copy.deepcopy(nb), path.name)
    stubs = {cell.get("id"): set(_code_lines(cell.source)) for cell in student.cells if cell.cell_type == "code"}
    code = exercises = written = 0
    seconds = 0.0
    for cell in core_code_cells(nb):
        if stamps := _stamps(cell):
            seconds += (stamps[1] - stamps[0]).total_seconds()
        lines = _code_lines(cell.source)
        if "exercise" in cell.metadata.get("tags", []):
            exercises += 1
            stub = stubs.get(cell.get("id"), set())
            written += sum(line not in stub for line in lines)
        else:
            code += len(lines)
    return CorePath(*markdown_words(nb), code, exercises, written, seconds)


@dataclass
class WorkedPath:
    """How long a student took over a lesson's core path, from the cell times their notebook recorded."""

    minutes: float          # first cell run to last, pauses over BREAK_MINUTES left out
    cells_run: int          # core-path code cells the student ran
    cells: int              # core-path code cells
    pauses: int             # pauses left out


@functools.cache
def _shipped_stamps(shipped: Path) -> frozenset:
    """The run times the course shipped in ``shipped``: a student's cell that still carries one was not re-run."""
    return frozenset(s for cell in core_code_cells(nbformat.read(shipped, as_version=4)) if (s := _stamps(cell)))


def worked_path(worked: Path, shipped: Path) -> WorkedPath:
    """Measure ``worked`` (a student's copy of the lesson ``shipped``, either edition)."""
    cells = core_code_cells(nbformat.read(worked, as_version=4))
    runs = sorted(s for cell in cells if (s := _stamps(cell)) and s not in _shipped_stamps(shipped))
    seconds, pauses, busy_until = 0.0, 0, None      # busy_until: when the latest cell so far finished
    for start, end in runs:
        gap = (start - busy_until).total_seconds() if busy_until else 0.0
        if gap > BREAK_MINUTES * 60:
            pauses += 1                             # a break, not the lesson: left out
        else:
            seconds += max(gap, 0.0)                # reading and writing between two cells
        seconds += (end - start).total_seconds()
        busy_until = max(busy_until, end) if busy_until else end
    return WorkedPath(seconds / 60, len(runs), len(cells), pauses)


def report_worked(paths: list[Path]) -> None:
    """One line per worked notebook, then each lesson's median beside its estimate."""
    import statistics

    by_lesson: dict[Path, list[WorkedPath]] = {}
    for path in paths:
        shipped = next((ROOT / "notebooks").glob(f"{path.name[:2]}_*.ipynb"), None)
        if not path.name[:2].isdigit() or shipped is None:
            raise SystemExit(f"error: {path} is not named like a lesson (NN_name.ipynb); pass the students' notebooks")
        if not path.is_file():
            raise SystemExit(f"error: {path} does not exist; pass the students' notebooks (nbgrader: submitted/*/NN/)")
        measured = worked_path(path, shipped)
        by_lesson.setdefault(shipped, []).append(measured)
        print(f"{path}: {measured.minutes:.0f} min over {measured.cells_run} of {measured.cells} core-path cells run"
              + (f", {measured.pauses} pauses over {BREAK_MINUTES} min left out" if measured.pauses else ""))
    for shipped, measured in sorted(by_lesson.items()):
        full = [m.minutes for m in measured if m.cells_run >= 0.9 * m.cells]    # a few skipped cells: still a read
        found = (f"median {statistics.median(full):.0f} min over the {len(full)} of {len(measured)} notebooks"
                 if full else f"none of the {len(measured)} notebooks")
        print(f"lesson {shipped.name[:2]}: {found} that ran >= 90 % of the core path's cells; "
              f"estimate {core_path(shipped).minutes:.0f} min")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worked", nargs="+", type=Path, metavar="NOTEBOOK",
                        help="notebooks students worked through: measure their time instead of estimating")
    args = parser.parse_args()
    if args.worked:
        report_worked(args.worked)
        return

    print(f"reading {READING_WPM} words/min, code {CODE_LINES_PER_MINUTE} lines/min, exercises "
          f"{EXERCISE_MINUTES} min + {MINUTES_PER_LINE_WRITTEN:g} min per line written, runs as saved (cpu)")
    print("| lesson | words (core / going further) | code lines | run (min) | exercises | lines written | estimate (min) |")
    print("|---|---|---|---|---|---|---|")
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        c = core_path(path)
        print(f"| {path.name[:2]} | {c.words:,} / {c.further_words:,} | {c.code_lines} | {c.run_seconds / 60:.1f} | "
              f"{c.exercises} | {c.lines_written} | {c.minutes:.0f} |")


if __name__ == "__main__":
    main()
