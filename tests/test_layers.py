"""The library's shape, kept by tests: its layers (import-linter's contracts in pyproject.toml), no import cycle,
no module past ~600 lines, and one timer (no module but tools/timing.py reads a clock around device work).

Each contract is also shown to fail: a copy of the library with an upward import, or a cycle, is refused.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "course_lib"
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    """import-linter on the course_lib found under ``root`` (the repository, or a copy of it)."""
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run([str(LINT), str(REPO / "pyproject.toml"), "--no-cache"], capture_output=True, text=True,
                          env=env, cwd=root, timeout=120)


@pytest.fixture(scope="module")
def copy_root(tmp_path_factory):
    if not LINT.is_file():
        pytest.fail(f"lint-imports is not installed next to {sys.executable}: run make setup (requirements.txt pins "
                    f"import-linter).")
    root = tmp_path_factory.mktemp("copy")
    shutil.copytree(LIBRARY, root / "course_lib", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_the_layers_hold():
    result = lint(REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, line", [
    ("tools/profiles.py", "from course_lib.parts import model  # an upward import"),
    ("parts/model.py", "from course_lib.experiments import stats  # an upward import"),
    ("distributed/ddp.py", "from course_lib.checks import framework  # an upward import"),
])
def test_an_upward_import_breaks_the_layers(copy_root, module, line):
    path = copy_root / "course_lib" / module
    original = path.read_text()
    try:
        path.write_text(original + "\n" + line + "\n")
        result = lint(copy_root)
        assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout[-2000:]
    finally:
        path.write_text(original)


def test_an_import_cycle_between_modules_of_a_layer_is_refused(copy_root):
    a, b = copy_root / "course_lib" / "parts" / "bpe.py", copy_root / "course_lib" / "parts" / "gradcheck.py"
    originals = a.read_text(), b.read_text()
    try:
        a.write_text(originals[0] + "\n\ndef _cycle():\n    from course_lib.parts import gradcheck  # noqa\n")
        b.write_text(originals[1] + "\n\ndef _cycle():\n    from course_lib.parts import bpe  # noqa\n")
        result = lint(copy_root)
        assert result.returncode != 0 and "no import cycles" in result.stdout and "BROKEN" in result.stdout
    finally:
        a.write_text(originals[0])
        b.write_text(originals[1])


# ---------------------------------------------------------------------------------------------- sizes

MAX_MODULE_LINES = 600


def modules():
    return sorted(p for p in LIBRARY.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_module_is_longer_than_one_sitting():
    long = {str(p.relative_to(REPO)): n for p in modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them by idea): {long}"


# ---------------------------------------------------------------------------------------------- one timer

CLOCKS = {("time", "perf_counter"), ("time", "monotonic"), ("time", "time"), ("time", "process_time"),
          ("time", "perf_counter_ns"), ("time", "monotonic_ns"), ("cuda", "synchronize")}


def clock_reads(tree: ast.AST) -> list[tuple[int, str, bool]]:
    """(line, call, at module level) of every clock read or CUDA synchronisation in a module."""
    found: list[tuple[int, str, bool]] = []

    class Visitor(ast.NodeVisitor):
        depth = 0

        def visit_FunctionDef(self, node):  # noqa: N802 (ast's names)
            self.depth += 1
            self.generic_visit(node)
            self.depth -= 1

        visit_AsyncFunctionDef = visit_Lambda = visit_FunctionDef  # noqa: N815

        def visit_Call(self, node):  # noqa: N802
            if isinstance(node.func, ast.Attribute):
                owner = node.func.value
                name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
                if (name, node.func.attr) in CLOCKS:
                    found.append((node.lineno, f"{name}.{node.func.attr}", self.depth == 0))
            self.generic_visit(node)

    Visitor().visit(tree)
    return found


def test_every_timing_goes_through_the_one_timer():
    """Durations of device work are read by tools/timing.py alone, which waits for the GPU first. The one
    exception: a module that torchrun starts stamps its first line and its torch import with time.time()
    at module level, before torch (and so the timer) can be imported."""
    offenders = []
    for path in modules():
        if path == LIBRARY / "tools" / "timing.py":
            continue
        for line, call, module_level in clock_reads(ast.parse(path.read_text())):
            if not (call == "time.time" and module_level):
                offenders.append(f"{path.relative_to(REPO)}:{line} {call}")
    assert not offenders, ("read the clock through course_lib.tools.timing (Stopwatch, clock, fastest, now): "
                           + ", ".join(offenders))


def test_the_timer_check_sees_a_clock_read():
    tree = ast.parse("import time\nSTART = time.time()\ndef f():\n    t = time.perf_counter()\n    torch.cuda.synchronize()\n")
    assert [(c, top) for _, c, top in clock_reads(tree)] == [("time.time", True), ("time.perf_counter", False),
                                                              ("cuda.synchronize", False)]


def test_the_timer_waits_for_the_device(monkeypatch):
    import torch

    from course_lib.tools import timing

    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    timing.sync("cuda:0")
    with timing.Stopwatch("cuda") as watch:
        pass
    assert timing.fastest(lambda: None, repeats=2, warmup=0, device="cuda") >= 0
    assert len(waited) == 1 + 2 + 2 * 2 and watch.seconds >= 0
    timing.sync("cpu")
    assert len(waited) == 7                                  # nothing more to wait for on a CPU


def test_every_forbidden_reference_of_a_check_exists():
    """A check's ``forbid`` entry names a module and an attribute of the course; one that no longer exists
    (a module moved, a function renamed) would forbid nothing, silently."""
    import importlib

    from course_lib.checks.framework import AUTOGRAD, EXERCISES

    missing = []
    for exercise in EXERCISES.values():
        for entry in exercise.forbidden:
            if entry in AUTOGRAD:
                continue
            module, _, name = entry.partition(":")
            try:
                found = importlib.import_module(module)
            except ImportError:
                missing.append(f"{exercise.id}: {entry} (no module)")
                continue
            for part in name.split(".") if name != "*" else ():
                found = getattr(found, part, None)
            if found is None:
                missing.append(f"{exercise.id}: {entry}")
    assert len(EXERCISES) >= 39 and not missing, missing
