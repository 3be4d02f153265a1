"""Grading a class with nbgrader: release a lesson, autograde a folder of submissions, feedback, a gradebook.

The instructor's path is two commands (README, "Grading a class")::

    make release LESSON=01_attention                          # the nbgrader source, the release, the exchange
    make grade LESSON=01_attention SUBMISSIONS=path/to/folder  # autograde, feedback HTML, gradebook CSVs

Both run in ``.venv-grade`` (``make grade-setup``: nbgrader, pinned in ``requirements-instructor.txt``, beside
the course's packages), so a student's ``.venv`` never holds nbgrader. ``nbgrader_config.py`` at the root of
the repository wires this module into nbgrader:

* **Release.** ``course_lib.editions.grading_notebook`` writes the nbgrader source (exercise cells are solution
  cells, check cells locked grade cells worth the exercise's points, the rest read-only). In
  ``nbgrader generate_assignment`` :class:`StudentEditionCells` replaces nbgrader's ClearSolutions and
  ClearOutput, so the release is the student edition of ``make student``, cell for cell.
* **Grade cells that cannot be gamed by the usual tricks.** A grade cell runs in the student's kernel, so
  anything the student's cells rebind (``checks``, a ``check_*``, a reference module) is what it would call.
  At autograding :class:`GradeCellsRunFreshChecks` rewrites every grade cell (restored from the gradebook by
  nbgrader) to :func:`grade`, which takes the exercise's check from a private copy of ``course_lib.checks``
  loaded from disk, and builds the check's other arguments (the tokenizer) itself. The checks' rule refuses
  an answer that calls the course's reference. After execution, outside the kernel,
  :class:`GradingRules` gives 0 to every exercise a student cell touches (:func:`tampering`: rebinding
  ``checks`` or a check, patching a reference module or a library, the interpreter's hooks, code built at run
  time) and to a grade cell that printed no verdict (its error display was switched off).
* **Stderr.** nbgrader gives 0 to a grade cell with any stderr output. The checks keep warnings out of it;
  :func:`grade` also sends what the check's libraries write to stderr (logging) to stdout.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import functools
import importlib
import importlib.util
import io
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from course_lib.tools.cellids import exercise_of_grade_id, grade_id  # noqa: F401 (grade_id: for callers)


# The repository, as course_lib.tools.profiles.REPO says, without importing torch through it: nbgrader imports this
# module (nbgrader_config.py names its preprocessors) in every command, feedback and export included.
REPO = Path(__file__).resolve().parent.parent
GRADING = REPO / "grading"            # nbgrader's course folder (CourseDirectory.root in nbgrader_config.py)
VERDICT = "graded {exercise}: "       # the line grade() prints last; GradingRules requires it


# ----------------------------------------------------------------------------------------------
# In the kernel: what a grade cell runs
# ----------------------------------------------------------------------------------------------

def fresh_checks() -> Any:
    """A private copy of ``course_lib.checks``, executed again from its files.

    Nothing a student's cell did to the notebook's ``checks`` (or to ``sys.modules['course_lib.checks']``, or
    to a check module's functions) reaches this copy; the kernel's own modules are put back untouched.
    """
    prefix = "course_lib.checks"
    saved = {name: module for name, module in sys.modules.items() if name == prefix or name.startswith(prefix + ".")}
    package = sys.modules.get("course_lib")
    attribute = getattr(package, "checks", None)
    for name in saved:
        del sys.modules[name]
    try:
        fresh = importlib.import_module(prefix)
    finally:
        for name in [n for n in sys.modules if n == prefix or n.startswith(prefix + ".")]:
            del sys.modules[name]
        sys.modules.update(saved)
        if package is not None and attribute is not None:
            package.checks = attribute
    return fresh


def _tokenizer() -> Any:
    """SmolLM2's tokenizer, loaded from the course cache (09's checks compare with its chat template)."""
    from transformers import AutoTokenizer

    from course_lib.tools import assets

    derived = assets.cache_dir() / "derived" / "smollm2-135m-instruct-f32"
    if (derived / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(derived)
    return assets.load_causal_lm("smollm2-135m-instruct")[0]


# What a check takes after the answer (Exercise.fixtures), built here instead of read from the notebook.
FIXTURES = {"tokenizer": _tokenizer}


@contextlib.contextmanager
def _stderr_to_stdout() -> Iterator[None]:
    """Send what Python code writes to stderr -- print, and logging handlers holding the kernel's stderr
    stream (transformers' logger holds it from import time) -- to stdout for the duration."""
    original = sys.stderr
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]
    handlers = [h for logger in loggers for h in getattr(logger, "handlers", [])
                if type(h) is logging.StreamHandler and h.stream is original]   # not lastResort: it follows sys.stderr
    for handler in handlers:
        handler.setStream(sys.stdout)
    try:
        with contextlib.redirect_stderr(sys.stdout):
            yield
    finally:
        for handler in handlers:
            handler.setStream(original)


def grade(exercise: str, answer: Any) -> None:
    """What a grade cell runs at autograding: exercise ``exercise``'s check on ``answer``.

    The check comes from :func:`fresh_checks`, its extra arguments from :data:`FIXTURES`. A refusal raises (the
    cell scores 0) with the check's one sentence; a pass prints the check's line, then ``graded NN.K: p/p
    points``, which :class:`GradingRules` requires.
    """
    __tracebackhide__ = True
    checks = fresh_checks()
    entry = checks.EXERCISES[exercise]
    with _stderr_to_stdout():
        fixtures = [FIXTURES[name]() for name in entry.fixtures]
        entry.check(answer, *fixtures)
    print(VERDICT.format(exercise=exercise) + f"{entry.points}/{entry.points} point{'s' if entry.points != 1 else ''}")


def grade_cell_source(exercise: str, answer: str) -> str:
    """The source a grade cell runs at autograding (and shows in the feedback)."""
    return (f"# Autograded: exercise {exercise}'s check from a fresh copy of course_lib.checks (not the notebook's\n"
            f"# `checks`); an answer that calls the course's reference is refused.\n"
            f"import course_lib.grading\n"
            f"course_lib.grading.grade({exercise!r}, {answer})")


def answer_of(check_source: str) -> str | None:
    """The answer a check cell passes to its check: ``softmax`` in ``checks.check_softmax(softmax)``."""
    try:
        tree = ast.parse(check_source)
    except SyntaxError:
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr.startswith("check_") \
                and node.args:
            return ast.unparse(node.args[0])
    return None


# ----------------------------------------------------------------------------------------------
# Outside the kernel: which exercises a student's cells touched
# ----------------------------------------------------------------------------------------------

_CODE = {"exec", "eval", "compile"}          # code in a string: read when it is a literal, refused otherwise
_DYNAMIC = {"__import__", "get_ipython"}      # a module named at run time, the kernel itself (its error display)
_HOOKS = {"setprofile", "settrace"}           # the hooks the checks' rule runs on
_NAMESPACES = {"globals", "vars", "locals"}
# Calls whose result is a module or a namespace: an attribute assigned on it is a patch (`__import__("torch").x = ...`)
_HANDLES = _NAMESPACES | {"__import__", "getattr", "importlib.import_module", "sys.modules.get", "get_ipython", "type"}
# Attributes that reach a class, a function's code or a namespace from any object (`tokenizer.__class__.x = ...`)
_DUNDER_PATHS = {"__class__", "__dict__", "__code__", "__globals__", "__func__", "__self__", "__module__", "__bases__"}
_INTERPRETER = {"sys", "builtins", "__builtins__", "threading", "importlib"}
_SETTINGS = ("torch.backends.", "matplotlib.", "pandas.options.")   # configuration, not code: may be set


_PYTHON_CELL_MAGICS = {"writefile", "time", "timeit", "capture", "prun"}   # magics whose body is Python
_TIMED = re.compile(r"^%(?:time|timeit|prun)\s+(?:-[a-z]\s*\d*\s+)*(.+)$")


def _cell_python(source: str) -> tuple[str, bool, list[str]]:
    """What a cell runs: its Python with IPython's syntax taken out (``%time f()`` -> ``f()``, other line magics and
    ``!`` -> ``pass``), whether that Python is a file it writes (``%%writefile``: imported by a check later), and
    the shell commands it runs (a ``!`` line, a ``%%bash`` body)."""
    lines, shell = source.splitlines(), []
    magic = lines[0].lstrip()[2:].split(maxsplit=1)[:1] if lines and lines[0].lstrip().startswith("%%") else []
    if magic and magic[0] not in _PYTHON_CELL_MAGICS:
        return "", False, ["\n".join(lines)]
    python = []
    for line in lines[1:] if magic else lines:
        code = line.lstrip()
        command = code.split("=", 1)[1].strip() if re.match(r"^[\w, ]+=\s*[!%]", code) else code
        if command.startswith(("!", "%")):
            shell += [command] if command.startswith(("!", "%sx", "%system", "%sh")) else []
            timed = _TIMED.match(command)
            code = timed.group(1) if timed else "pass"
        python.append(line[:len(line) - len(line.lstrip())] + code)
    return "\n".join(python), magic == ["writefile"], shell


def _imports(cells: list[Any]) -> dict[str, str]:
    """Name -> dotted path of what the import statements of ``cells`` bind (``F`` -> ``torch.nn.functional``)."""
    bound: dict[str, str] = {}
    for cell in cells:
        if cell.cell_type != "code":
            continue
        try:
            tree = ast.parse(_cell_python(cell.source)[0])
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    bound[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return bound


def _module_level(tree: ast.AST) -> Iterator[ast.AST]:
    """The nodes of a cell that run at module level (not inside a function, lambda or class body)."""
    stack = list(ast.iter_child_nodes(tree))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(node))


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id] + parts[::-1])
    return None


def _findings(source: str, course: dict[str, str], imported: dict[str, str]) -> Iterator[tuple[str, str]]:
    """(what, dotted target) for everything in one student cell that rebinds or patches what grading relies on.

    ``course`` is what the course's own (locked) cells import, ``imported`` that plus the student's imports.
    Rebinding a name only changes the notebook's namespace, which grading does not read, so only the names
    the rule is about count (``checks``, ``check_*``, ``course_lib``); patching a module or a class changes it
    for everyone, so any attribute assignment on an imported module or class counts.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return
    roots = set(imported) | {"checks", "course_lib"} | _INTERPRETER

    def patched(target: ast.AST) -> str | None:
        dotted = _dotted(target)
        root = dotted.split(".")[0] if dotted else None
        hit = imported.get(root, root) + dotted[len(root):] if root in roots else None
        return None if hit is None or hit.startswith(_SETTINGS) else hit

    for node in ast.walk(tree):
        targets: list[ast.AST] = []
        if isinstance(node, (ast.Assign, ast.Delete)):
            targets = list(node.targets)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        while any(isinstance(t, (ast.Tuple, ast.List, ast.Starred)) for t in targets):   # a, b.c = ...
            targets = [x for t in targets for x in (t.elts if isinstance(t, (ast.Tuple, ast.List)) else
                                                    [t.value] if isinstance(t, ast.Starred) else [t])]
        for target in targets:
            for leaf in (target,):
                base = leaf
                while isinstance(base, (ast.Attribute, ast.Subscript)):
                    base = base.value
                chain = ast.unparse(leaf) if isinstance(leaf, (ast.Attribute, ast.Subscript)) else ""
                if isinstance(leaf, ast.Attribute) and isinstance(base, ast.Call) and _dotted(base.func) in _HANDLES:
                    yield "patches", f"{_dotted(base.func)}(...).{_dotted(leaf) or leaf.attr}"
                elif isinstance(leaf, ast.Attribute) and (hit := patched(leaf)):
                    yield "patches", hit
                elif any(f".{name}" in chain for name in _DUNDER_PATHS):
                    yield "patches", chain
                elif isinstance(leaf, ast.Subscript):
                    inner = leaf.value
                    if isinstance(inner, ast.Call) and _dotted(inner.func) in _NAMESPACES:
                        yield "patches", f"{_dotted(inner.func)}()"
                    elif (hit := patched(inner)) and hit.split(".")[0] in _INTERPRETER | {"course_lib"}:
                        yield "patches", hit                   # sys.modules[...], course_lib.x.__dict__[...]
        if isinstance(node, ast.Call):
            name = _dotted(node.func) or ""
            literal = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else None
            if name in _CODE and isinstance(literal, str):
                yield from _findings(literal, course, imported)        # exec("...") is read like a cell
            elif name in _CODE or (name == "__import__" and not isinstance(literal, str)) or name == "get_ipython" \
                    or name.split(".")[-1] in _HOOKS or name.startswith(("sys.modules.", "importlib.")):
                yield "calls", name
            elif name in ("setattr", "delattr") and node.args and (hit := patched(node.args[0])):
                attribute = node.args[1] if len(node.args) > 1 else None
                named = isinstance(attribute, ast.Constant) and isinstance(attribute.value, str)
                yield "patches", f"{hit}.{attribute.value}" if named else hit
            elif isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Call) \
                    and _dotted(node.func.value.func) in _NAMESPACES:
                yield "patches", f"{_dotted(node.func.value.func)}()"    # globals().update(...)
    module_level = set(map(id, _module_level(tree)))
    declared = {name for node in ast.walk(tree) if isinstance(node, ast.Global) for name in node.names}
    for node in ast.walk(tree):
        names: list[tuple[str, str | None]] = []     # (name bound, what an import binds it to)
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names = [(node.id, None)]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [(node.name, None)]
        elif isinstance(node, ast.Import):
            names = [(a.asname or a.name.split(".")[0], a.name if a.asname else a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [(a.asname or a.name, f"{node.module}.{a.name}") for a in node.names]
        for name, source in names:
            if id(node) not in module_level and name not in declared:
                continue
            same = source is not None and (source == course.get(name) or source == name == "course_lib" or
                                           (name.startswith("check_") and source == f"course_lib.checks.{name}"))
            if not same and (name in ("checks", "course_lib") or name.startswith("check_")):
                yield "rebinds", name


def _touched(what: str, target: str, graded: dict[str, Any]) -> set[str]:
    """The graded exercises a finding touches: a check -> its exercise; a course module -> the exercises whose
    references or checks live there; anything else (the checks as a whole, a library, the interpreter) -> all."""
    name = target.split(".")[-1]
    if what != "calls" and name.startswith("check_"):
        return {e for e, entry in graded.items() if entry.check.__name__ == name}
    if what == "patches" and target.startswith("course_lib.") and not target.startswith("course_lib.checks"):
        hit = {e for e, entry in graded.items()
               if any(target == m or target.startswith(m + ".") for m in entry.reference_modules())}
        return hit or set(graded)
    if what == "patches" and target.startswith("course_lib.checks."):
        for entry in graded.values():
            module = entry.check.__module__                   # course_lib.checks.attention ...
            if target == module or target.startswith(module + "."):
                return {e for e, other in graded.items() if other.check.__module__ == module}
    return set(graded)


def is_student_cell(cell: Any) -> bool:
    """A cell whose source the student controls after nbgrader's OverwriteCells: a solution cell, or a cell
    without nbgrader's locked or grade flags (one the student added, or stripped of its metadata)."""
    meta = cell.get("metadata", {}).get("nbgrader", {})
    return cell.cell_type == "code" and not meta.get("grade") and bool(meta.get("solution") or not meta.get("locked"))


def tampering(nb: Any) -> dict[str, str]:
    """Exercise -> one sentence, for every graded exercise of ``nb`` that a student cell touches."""
    from course_lib.checks import EXERCISES

    graded = {e: EXERCISES[e] for cell in nb.cells
              if (e := exercise_of_grade_id(cell.get("metadata", {}).get("nbgrader", {}).get("grade_id", "")))
              and e in EXERCISES}
    course = _imports([c for c in nb.cells if not is_student_cell(c)])
    imported = {**_imports([c for c in nb.cells if is_student_cell(c)]), **course}
    verdicts: dict[str, str] = {}
    for index, cell in enumerate(nb.cells):
        if not is_student_cell(cell):
            continue
        python, is_file, shell = _cell_python(cell.source)
        findings = [("calls", f"shell: {c.splitlines()[0][:60]}") for c in shell if "course_lib" in c]
        # a file's names are its own, not the notebook's: only its patches count
        findings += [f for f in _findings(python, course, imported) if not (is_file and f[0] == "rebinds")]
        for what, target in findings:
            for exercise in sorted(_touched(what, target, graded)):
                verdicts.setdefault(exercise, (
                    f"cell {index} {what} `{target}`; a notebook that changes what grading relies on earns "
                    f"nothing for exercise {exercise}."))
    return verdicts


# ----------------------------------------------------------------------------------------------
# nbgrader's preprocessors (nbgrader_config.py names them). Built on first use: a kernel imports this
# module to call grade(), and nbconvert alone takes ~2 s to import.
# ----------------------------------------------------------------------------------------------

@functools.cache
def _preprocessors() -> dict[str, type]:
    from nbconvert.preprocessors import Preprocessor as Disabled
    from traitlets import Bool

    class Preprocessor(Disabled):
        enabled = Bool(True)     # nbconvert's preprocessors start disabled; nbgrader's lists mean "run these"

    def nbgrader_meta(cell: Any) -> dict[str, Any]:
        return cell.get("metadata", {}).get("nbgrader", {})

    class StudentEditionCells(Preprocessor):
        """generate_assignment: solutions become the course's stubs and the outputs those of the student
        edition (``course_lib.editions.student_notebook``) -- in place of nbgrader's ClearSolutions (one stub
        for every exercise, matched by substring) and ClearOutput."""

        def preprocess(self, nb: Any, resources: Any) -> tuple[Any, Any]:
            from course_lib.editions import student_notebook

            name = resources.get("unique_key", "notebook") + ".ipynb"
            return student_notebook(nb, name), resources

    class GradeCellsRunFreshChecks(Preprocessor):
        """autograde, after OverwriteCells: every grade cell runs ``course_lib.grading.grade`` on its answer."""

        def preprocess_cell(self, cell: Any, resources: Any, index: int) -> tuple[Any, Any]:
            exercise = exercise_of_grade_id(nbgrader_meta(cell).get("grade_id", ""))
            if cell.cell_type == "code" and nbgrader_meta(cell).get("grade") and exercise:
                answer = answer_of(cell.source)
                cell.source = grade_cell_source(exercise, answer) if answer else \
                    f"raise RuntimeError({f'the check cell of exercise {exercise} names no answer'!r})"
            return cell, resources

    class GradingRules(Preprocessor):
        """autograde, after Execute: 0 for every exercise a student cell touched, and for a grade cell that
        printed no verdict; the sentence goes into the cell's output, so the feedback shows it."""

        def preprocess(self, nb: Any, resources: Any) -> tuple[Any, Any]:
            import nbformat

            refused = tampering(nb)
            for cell in nb.cells:
                exercise = exercise_of_grade_id(nbgrader_meta(cell).get("grade_id", ""))
                if cell.cell_type != "code" or not nbgrader_meta(cell).get("grade") or not exercise:
                    continue
                failed = any(o.output_type == "error" for o in cell.outputs)
                printed = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
                sentence = refused.get(exercise)
                if sentence is None and not failed and VERDICT.format(exercise=exercise) not in printed:
                    sentence = (f"the grading call of exercise {exercise} printed no verdict (was the notebook's "
                                f"error display changed?), so it earns nothing.")
                if sentence:
                    cell.outputs = [o for o in cell.outputs if o.output_type != "error"] + [nbformat.v4.new_output(
                        "error", ename="GradingRefused", evalue=sentence,
                        traceback=[f"\x1b[0;31mGradingRefused\x1b[0m: {sentence}"])]
            return nb, resources

    return {"StudentEditionCells": StudentEditionCells, "GradeCellsRunFreshChecks": GradeCellsRunFreshChecks,
            "GradingRules": GradingRules}


def __getattr__(name: str) -> type:
    if name in ("StudentEditionCells", "GradeCellsRunFreshChecks", "GradingRules"):
        return _preprocessors()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------
# The instructor's commands (run in .venv-grade, where nbgrader is installed)
# ----------------------------------------------------------------------------------------------

STUDENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]*$")


def _nbgrader(*args: str, root: Path) -> None:
    """Run one nbgrader command from the repository (where nbgrader_config.py is) on the course in ``root``.

    Kernels inherit the environment: the ``ci`` profile (small, fast), and this checkout's course_lib first
    on the path whatever .venv's editable install points to.
    """
    env = dict(os.environ)
    env.setdefault("COURSE_PROFILE", "ci")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # nbgrader runs `alembic`
    # nbconvert's templates (feedback HTML) live in the data folder of .venv, where nbconvert is installed
    spec = importlib.util.find_spec("nbconvert")
    if spec and spec.origin:
        shared = Path(spec.origin).resolve().parents[4] / "share" / "jupyter"
        env["JUPYTER_PATH"] = os.pathsep.join([str(shared)] + [p for p in env.get("JUPYTER_PATH", "").split(os.pathsep) if p])
    command = [sys.executable, "-m", "nbgrader", *args, f"--CourseDirectory.root={root}"]
    print("$ nbgrader " + " ".join(args), flush=True)
    result = subprocess.run(command, cwd=REPO, env=env)
    if result.returncode:
        raise SystemExit(f"error: `nbgrader {' '.join(args)}` failed (exit {result.returncode}); its log is above.")


def release(lesson: str, root: Path = GRADING, *, to_exchange: bool = True, write_source: bool = True) -> Path:
    """Write the nbgrader source of ``lesson`` (unless ``write_source`` is False: an assignment an instructor
    put in ``root/source`` by hand), generate its release and (``to_exchange``) put it in the exchange."""
    if write_source:
        from course_lib.editions import write_grading_source    # imports the checks, and torch: only when needed

        write_grading_source([lesson], REPO / "notebooks", root / "source")
    _nbgrader("generate_assignment", lesson, "--force", root=root)
    if to_exchange:
        _nbgrader("release_assignment", lesson, "--force", root=root)
    return root / "release" / lesson


def collect(lesson: str, folder: Path, root: Path = GRADING) -> list[str]:
    """Copy a folder of submissions into nbgrader's ``submitted/STUDENT/LESSON/``.

    Accepted: ``folder/STUDENT.ipynb`` (the lesson's notebook, under the student's id), or the notebooks in
    ``folder/STUDENT/`` or ``folder/STUDENT/LESSON/`` (what ``nbgrader collect`` and ``zip_collect`` leave).
    Returns the student ids.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SystemExit(f"error: {folder} is not a folder of submitted notebooks.")
    found: dict[str, list[tuple[Path, str]]] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix == ".ipynb":
            found[path.stem] = [(path, f"{lesson}.ipynb")]
        elif path.is_dir():
            inner = path / lesson if (path / lesson).is_dir() else path
            notebooks = sorted(inner.glob("*.ipynb"))
            if notebooks:
                found[path.name] = [(nb, nb.name) for nb in notebooks]
    if not found:
        raise SystemExit(f"error: no submissions of {lesson} in {folder}: expected STUDENT.ipynb, STUDENT/{lesson}.ipynb "
                         f"or STUDENT/{lesson}/{lesson}.ipynb.")
    for student, notebooks in found.items():
        if not STUDENT_ID.match(student):
            raise SystemExit(f"error: {student!r} is not usable as a student id (letters, digits and _ . @ + - only).")
        target = root / "submitted" / student / lesson
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for notebook, name in notebooks:
            shutil.copyfile(notebook, target / name)
            if (notebook.parent / "timestamp.txt").is_file():
                shutil.copyfile(notebook.parent / "timestamp.txt", target / "timestamp.txt")
    return sorted(found)


def gradebook(lesson: str, root: Path = GRADING) -> Path:
    """Write ``root/gradebook/LESSON.csv`` (one row per student, one column per exercise, then the total) and
    nbgrader's ``root/grades.csv`` (every assignment's totals)."""
    from nbgrader.api import Gradebook
    from nbgrader.plugins import CsvExportPlugin

    out = root / "gradebook" / f"{lesson}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with Gradebook(f"sqlite:///{root / 'gradebook.db'}") as gb:
        # nbgrader's own grades.csv (what `nbgrader export` writes: one row per student and assignment), here
        # rather than in one more nbgrader process
        exporter = CsvExportPlugin()
        exporter.to = str(root / "grades.csv")
        with contextlib.redirect_stdout(io.StringIO()):
            exporter.export(gb)
        assignment = gb.find_assignment(lesson)
        cells = [(nb.name, cell.name, cell.max_score) for nb in assignment.notebooks for cell in nb.grade_cells]
        several = len(assignment.notebooks) > 1
        columns = [(f"{nb}:" if several else "") + (exercise_of_grade_id(name) or name) for nb, name, _ in cells]
        rows = []
        for submission in sorted(assignment.submissions, key=lambda s: s.student.id):
            scores = {(nb.name, g.name): g.score for nb in submission.notebooks for g in nb.grades}
            rows.append([submission.student.id] + [f"{scores.get((nb, name), 0):g}" for nb, name, _ in cells]
                        + [f"{submission.score:g}", f"{submission.max_score:g}"])
        with out.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["student"] + columns + ["total", "max"])
            writer.writerow(["(points)"] + [f"{m:g}" for *_, m in cells] + [f"{sum(m for *_, m in cells):g}", ""])
            writer.writerows(rows)
    return out


def grade_class(lesson: str, submissions: Path | None, root: Path = GRADING) -> None:
    """Autograde every submission of ``lesson`` (the ci profile, per-cell timeouts), write per-student feedback
    HTML, nbgrader's ``grades.csv`` and the per-exercise gradebook. Releases the lesson first if it never was."""
    if not (root / "release" / lesson).is_dir():
        release(lesson, root, to_exchange=False)
    if submissions is not None:
        students = collect(lesson, submissions, root)
        print(f"collected {len(students)} submission(s) of {lesson}: {', '.join(students)}")
    else:
        _nbgrader("collect", lesson, "--update", root=root)
    _nbgrader("autograde", lesson, "--force", root=root)
    _nbgrader("generate_feedback", lesson, "--force", root=root)
    table = gradebook(lesson, root)
    print(f"feedback: {root / 'feedback'}/STUDENT/{lesson}/{lesson}.html\ngrades:   {root / 'grades.csv'} "
          f"(nbgrader's totals) and {table} (per exercise)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_lib.grading", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_release = sub.add_parser("release", help="the nbgrader source and release of a lesson, put in the exchange")
    p_release.add_argument("lesson")
    p_release.add_argument("--no-exchange", action="store_true", help="only generate the release folder")
    p_release.add_argument("--keep-source", action="store_true",
                           help="release the assignment already in ROOT/source (e.g. a trimmed notebook) as it is")
    p_grade = sub.add_parser("grade", help="autograde a folder of submissions: feedback and gradebook")
    p_grade.add_argument("lesson")
    p_grade.add_argument("submissions", nargs="?", type=Path,
                         help="a folder of submitted notebooks (default: collect them from the exchange)")
    p_book = sub.add_parser("gradebook", help="rewrite the per-exercise gradebook CSV of a graded lesson")
    p_book.add_argument("lesson")
    for p in (p_release, p_grade, p_book):
        p.add_argument("--root", type=Path, default=GRADING, help="nbgrader's course folder (default: grading/)")
    args = parser.parse_args(argv)
    lesson = Path(args.lesson).stem
    if args.command == "release":
        folder = release(lesson, args.root.resolve(), to_exchange=not args.no_exchange, write_source=not args.keep_source)
        print(f"released {lesson}: {folder}")
    elif args.command == "grade":
        grade_class(lesson, args.submissions, args.root.resolve())
    else:
        print(gradebook(lesson, args.root.resolve()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
