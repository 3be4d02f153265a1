"""The ids of an exercise's cells in an nbgrader assignment (00_setup, "Grading a class" in the README).

Kept apart from ``course_lib.editions`` and ``course_lib.grading`` so that nbgrader's own processes can read
them without importing torch.
"""

from __future__ import annotations

import re

__all__ = ["grade_id", "exercise_of_grade_id"]


def grade_id(exercise: str, kind: str) -> str:
    """nbgrader's id of an exercise's cells (letters, digits, - and _ only): ``exercise-01_1`` (the answer),
    ``check-01_1`` (the grade cell)."""
    return f"{kind}-{exercise.replace('.', '_')}"



def exercise_of_grade_id(grade_id_: str) -> str | None:
    """``check-01_1`` -> ``01.1``; None for any other cell."""
    match = re.fullmatch(r"check-(\d{2})_(\d+)", grade_id_ or "")
    return f"{match.group(1)}.{match.group(2)}" if match else None
