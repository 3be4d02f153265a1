"""How long each lesson's core path takes, estimated from the notebook itself, and the README table's row.

    .venv/bin/python scripts/core_path_time.py          # one row per lesson: words, lines, runs, exercises, minutes

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
lesson changes; they have not been checked against a stopwatch on a student's real read.
``tests/test_notebooks.py`` keeps the README's stated times and each lesson's opening sentence within
``TOLERANCE_MINUTES`` of this estimate.
"""

from __future__ import annotations

import copy
import re
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

READING_WPM = 120
CODE_LINES_PER_MINUTE = 20
EXERCISE_MINUTES = 5
MINUTES_PER_LINE_WRITTEN = 1.0
TOLERANCE_MINUTES = 10

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


def _cell_seconds(cell) -> float:
    stamps = cell.metadata.get("execution", {})
    if "iopub.execute_input" not in stamps or "shell.execute_reply" not in stamps:
        return 0.0
    start, end = (datetime.fromisoformat(stamps[k])
                  for k in ("iopub.execute_input", "shell.execute_reply"))
    return (end - start).total_seconds()


def core_path(path: Path) -> CorePath:
    """Count the core path of the notebook at ``path`` (the solution edition, as committed)."""
    from course_lib.editions import student_notebook

    nb = nbformat.read(path, as_version=4)
    student = student_notebook(copy.deepcopy(nb), path.name)
    stubs = {cell.get("id"): set(_code_lines(cell.source)) for cell in student.cells if cell.cell_type == "code"}
    words = further = code = exercises = written = 0
    seconds = 0.0
    in_further = False
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            in_further = in_further or bool(GOING_FURTHER.search(cell.source))
            n = len(cell.source.split())
            further, words = (further + n, words) if in_further else (further, words + n)
            continue
        if in_further or cell.cell_type != "code":
            continue
        seconds += _cell_seconds(cell)
        lines = _code_lines(cell.source)
        if "exercise" in cell.metadata.get("tags", []):
            exercises += 1
            stub = stubs.get(cell.get("id"), set())
            written += sum(line not in stub for line in lines)
        else:
            code += len(lines)
    return CorePath(words, further, code, exercises, written, seconds)


def main() -> None:
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
