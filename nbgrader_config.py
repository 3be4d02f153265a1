"""nbgrader's configuration for this course: used by `make release` / `make grade` (README, "Grading a class")
and by nbgrader's JupyterLab extension when the instructor starts JupyterLab from .venv-grade in this folder."""

import os
import sys
from pathlib import Path

from nbconvert.preprocessors import ClearMetadataPreprocessor
from nbgrader.preprocessors import (
    AssignLatePenalties, CheckCellMetadata, ClearHiddenTests, ClearMarkScheme, ClearOutput, ComputeChecksums,
    DeduplicateIds, Execute, IgnorePattern, IncludeHeaderFooter, InstantiateTests, LimitOutput, LockCells,
    OverwriteCells, OverwriteKernelspec, SaveAutoGrades, SaveCells,
)

c = get_config()  # noqa: F821 -- traitlets gives config files this function

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))          # this checkout's course_lib, whatever an editable install points to
from course_lib.grading import GradeCellsRunFreshChecks, GradingRules, StudentEditionCells  # noqa: E402

c.CourseDirectory.course_id = "llm-course"
# The course folder: source/, release/, submitted/, autograded/, feedback/, gradebook.db (git-ignored).
c.CourseDirectory.root = str(HERE / "grading")

# The exchange, where students fetch releases and submit. nbgrader's default (/usr/local/share/nbgrader/exchange)
# is often not writable, so it is a folder of the course on one machine; under JupyterHub every user must see the
# same writable folder: set NBGRADER_EXCHANGE (e.g. /srv/nbgrader/exchange, created with mode 1777) for everyone.
exchange = Path(os.environ.get("NBGRADER_EXCHANGE", HERE / "grading" / "exchange"))
exchange.mkdir(parents=True, exist_ok=True)
c.Exchange.root = str(exchange)
c.Exchange.path_includes_course = True

# Per-cell timeout of autograding, sized for the ci profile `make grade` runs under: there the slowest cell of any
# lesson took 27 s (09's step timing against peft) on a busy 2-core machine, 10 s or less elsewhere; a student's
# answer that loops forever costs this long and earns 0 for its cell only. COURSE_GRADE_TIMEOUT overrides it
# (under the cpu profile single cells train for up to ~5 minutes).
c.Execute.timeout = int(os.environ.get("COURSE_GRADE_TIMEOUT", "120"))

# Releases: the course's student edition (its stubs, its outputs) in place of ClearSolutions and ClearOutput.
c.GenerateAssignment.preprocessors = [
    IncludeHeaderFooter,
    InstantiateTests,
    LockCells,
    StudentEditionCells,
    CheckCellMetadata,
    ComputeChecksums,
    SaveCells,
    ClearHiddenTests,
    ClearMarkScheme,
    ComputeChecksums,
    CheckCellMetadata,
]

# A grade cell the student deleted comes back (and is graded) instead of silently missing from the gradebook.
c.OverwriteCells.add_missing_cells = True

# Autograding: grade cells run course_lib.grading.grade (a fresh copy of the checks), and after execution the
# grading rules give 0 to every exercise a student's cell tampered with (README, "Grading a class").
c.Autograde.sanitize_preprocessors = [
    ClearOutput,
    DeduplicateIds,
    OverwriteKernelspec,
    OverwriteCells,
    GradeCellsRunFreshChecks,
    CheckCellMetadata,
]
c.Autograde.autograde_preprocessors = [
    Execute,
    GradingRules,
    IgnorePattern,
    ClearMetadataPreprocessor,
    LimitOutput,
    SaveAutoGrades,
    AssignLatePenalties,
    CheckCellMetadata,
]
