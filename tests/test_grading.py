"""Grading a class: the nbgrader source, grade cells that cannot be gamed, and a whole class graded end to end.

The end-to-end test builds a small nbgrader course -- lesson 01 trimmed to its four exercises, and one notebook
with a later exercise of every other lesson -- releases it with nbgrader, grades the eight kinds of submission of
issue 24 plus the later exercises, and reads the gradebook. nbgrader lives in .venv-grade (`make grade-setup`,
which `make test` runs); without it the test is skipped, except under CI, where that is a failure.
"""

from __future__ import annotations

import ast
import csv
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from course_lib import checks
from course_lib import grading
from course_lib.checks import EXERCISES
from course_lib.editions import grading_notebook, student_notebook

REPO = Path(__file__).resolve().parent.parent
GRADE_PY = REPO / ".venv-grade" / "bin" / "python"


def solution_notebook(lesson: str) -> nbformat.NotebookNode:
    return nbformat.read(REPO / "notebooks" / f"{lesson}.ipynb", as_version=4)


def exercise_cells(nb: nbformat.NotebookNode) -> dict[str, tuple[nbformat.NotebookNode, nbformat.NotebookNode]]:
    """Exercise id -> (exercise cell, check cell) of a solution notebook."""
    out, pending = {}, None
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if "exercise" in tags:
            pending = cell
        elif "check" in tags and pending is not None:
            out[re.search(r"Exercise (\d\d\.\d+)", pending.source).group(1)] = (pending, cell)
    return out


def excerpt(picks: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """A solution-edition notebook holding the exercises ``picks`` ((lesson, exercise id), ...): the import
    statements of their lessons that the picked cells use, then each exercise and its check."""
    used: set[str] = set()
    pairs, imports = [], {}
    for lesson, exercise in picks:
        nb = solution_notebook(lesson)
        pair = exercise_cells(nb)[exercise]
        pairs.append(pair)
        for cell in pair:
            used |= {n.id for n in ast.walk(ast.parse(cell.source)) if isinstance(n, ast.Name)}
        for cell in nb.cells:
            if cell.cell_type == "code" and "exercise" not in cell.metadata.get("tags", []):
                for node in ast.parse(cell.source).body:
                    for alias in getattr(node, "names", []) if isinstance(node, (ast.Import, ast.ImportFrom)) else []:
                        name = alias.asname or alias.name.split(".")[0]
                        line = (f"from {node.module} import {alias.name}" if isinstance(node, ast.ImportFrom)
                                else f"import {alias.name}") + (f" as {alias.asname}" if alias.asname else "")
                        imports.setdefault(name, line)
    # No course_lib.start(): it adds 1.6 s per graded notebook (ten here), and no check depends on the profile.
    needed = sorted({line for name, line in imports.items() if name in used})
    cells = [nbformat.v4.new_markdown_cell("# An excerpt of the course for the grading test"),
             nbformat.v4.new_code_cell("\n".join(needed))]
    for exercise_cell, check_cell in pairs:
        for cell in (exercise_cell, check_cell):
            copy = nbformat.v4.new_code_cell(cell.source)
            copy.metadata["tags"] = list(cell.metadata.get("tags", []))
            copy.outputs = list(cell.outputs)
            copy.execution_count = cell.execution_count
            cells.append(copy)
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata = dict(solution_notebook(picks[0][0]).metadata)
    return nb


# ------------------------------------------------------------------------------ the nbgrader source


def test_the_source_marks_exercises_checks_and_the_rest_and_states_the_points():
    nb = grading_notebook(solution_notebook("01_attention"), "01_attention.ipynb")
    meta = [c.metadata["nbgrader"] for c in nb.cells]
    solution = [m for m in meta if m["solution"]]
    graded = [m for m in meta if m["grade"]]
    assert [m["grade_id"] for m in solution] == ["exercise-01_1", "exercise-01_2", "exercise-01_3", "exercise-01_4"]
    assert [(m["grade_id"], m["points"]) for m in graded] == [
        ("check-01_1", 1), ("check-01_2", 1), ("check-01_3", 2), ("check-01_4", 2)]
    assert all(m["locked"] for m in meta if not m["solution"]), "the rest is read-only"
    assert all(re.fullmatch(r"[A-Za-z0-9_\-]+", m["grade_id"]) for m in meta), "nbgrader's grade_id pattern"
    assert len({m["grade_id"] for m in meta}) == len(meta)
    assert "# Exercise 01.3 (2 points): scaled dot-product attention" in nb.cells[
        [c.metadata["nbgrader"]["grade_id"] for c in nb.cells].index("exercise-01_3")].source
    assert "BEGIN SOLUTION" in nb.cells[[m["solution"] for m in meta].index(True)].source, "the source keeps solutions"


def test_the_student_edition_states_the_points_of_every_exercise():
    for path in sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        student = student_notebook(nbformat.read(path, as_version=4), path.name)
        for cell in student.cells:
            if "exercise" in cell.metadata.get("tags", []):
                # a %%writefile exercise (03.5, 10.2, 11.1) names itself on its second line
                exercise = re.search(r"^# Exercise (\d\d\.\d+) \((\d+) points?\): ", cell.source, re.MULTILINE)
                assert exercise, cell.source.splitlines()[0]
                assert int(exercise.group(2)) == EXERCISES[exercise.group(1)].points


# ------------------------------------------------------------------- grade cells that cannot be gamed


def right_softmax(z, dim=-1):
    e = (z - z.amax(dim=dim, keepdim=True)).exp()
    return e / e.sum(dim=dim, keepdim=True)


def test_grade_takes_the_check_from_a_fresh_copy(monkeypatch, capsys):
    import course_lib.checks.attention as attention_checks

    fake = lambda fn: print("✅ check_softmax passed")  # noqa: E731 -- what a student's cell would put there
    monkeypatch.setattr(checks, "check_softmax", fake)
    monkeypatch.setattr(attention_checks, "check_softmax", fake)
    monkeypatch.setattr(checks.framework, "close", lambda *a, **k: True)
    monkeypatch.setitem(checks.EXERCISES, "01.1", checks.EXERCISES["01.1"].__class__(
        "01.1", fake, 1, (), ()))
    with pytest.raises(AssertionError, match="does not sum to 1"):
        grading.grade("01.1", lambda z, dim=-1: z)
    grading.grade("01.1", right_softmax)
    assert capsys.readouterr().out.endswith("graded 01.1: 1/1 point\n")
    assert checks.check_softmax is fake and sys.modules["course_lib.checks"] is checks, "the kernel's modules stay"


def test_grade_refuses_an_answer_that_calls_the_reference():
    from course_lib.parts.losses import softmax as saved

    with pytest.raises(AssertionError, match="calls the course's reference `course_lib.parts.losses.softmax`"):
        grading.grade("01.1", lambda z, dim=-1: saved(z, dim))


def test_grade_keeps_warnings_and_logging_out_of_stderr(capsys):
    import warnings

    logger = logging.getLogger("a_library")
    handler = logging.StreamHandler(sys.stderr)          # what transformers sets up at import time
    logger.addHandler(handler)
    try:
        def warns(z, dim=-1):
            warnings.warn("a library warned", UserWarning)
            logger.warning("a library logged")
            print("to stderr", file=sys.stderr)
            return right_softmax(z, dim)

        grading.grade("01.1", warns)
    finally:
        logger.removeHandler(handler)
    out, err = capsys.readouterr()
    assert err == "" and "graded 01.1" in out and "a library logged" in out and "to stderr" in out


def test_grade_builds_the_tokenizer_itself(capsys):
    def render_chat(messages, add_generation_prompt=True):
        text = "" if messages[0]["role"] == "system" else (
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n")
        for m in messages:
            text += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    grading.grade("09.1", render_chat)
    assert "graded 09.1: 1/1 point" in capsys.readouterr().out


def test_grade_cells_are_rewritten_to_the_fresh_check():
    assert grading.answer_of("# NBVAL_CHECK_OUTPUT\nchecks.check_render_chat(render_chat, tokenizer)") == "render_chat"
    source = grading.grade_cell_source("01.1", "softmax")
    assert source.endswith("course_lib.grading.grade('01.1', softmax)") and "checks.check" not in source


def cell(source, **nbgrader):
    c = nbformat.v4.new_code_cell(source)
    if nbgrader:
        c.metadata["nbgrader"] = {"grade": False, "solution": False, "locked": False, **nbgrader}
    return c


def graded_notebook(*student_cells):
    """Lesson 01's imports and grade cells around the given student cells."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [cell("import math\nimport torch\nfrom course_lib import checks\n"
                     "from course_lib.parts.attention import causal_mask", locked=True, grade_id="c0"),
                *student_cells,
                *[cell("checks.check_x(x)", grade=True, locked=True, grade_id=f"check-01_{k}", points=1)
                  for k in (1, 2, 3, 4)]]
    return nb


@pytest.mark.parametrize("source, touched, words", [
    ("checks.check_softmax = lambda f: None", {"01.1"}, "patches `course_lib.checks.check_softmax`"),
    ("def check_causal_mask(fn):\n    pass", {"01.2"}, "rebinds `check_causal_mask`"),
    ("from fake import check_attention", {"01.3"}, "rebinds `check_attention`"),
    ("checks = None", {"01.1", "01.2", "01.3", "01.4"}, "rebinds `checks`"),
    ("import fake as checks", {"01.1", "01.2", "01.3", "01.4"}, "rebinds `checks`"),
    ("import course_lib.parts.attention as A\nA.causal_mask = lambda T: None", {"01.2", "01.3", "01.4"},
     "patches `course_lib.parts.attention.causal_mask`"),
    ("causal_mask.__code__ = (lambda T: None).__code__", {"01.2", "01.3", "01.4"}, "patches"),
    ("checks.attention._softmax64 = None", {"01.1", "01.2", "01.3", "01.4"}, "course_lib.checks.attention._softmax64"),
    ("torch.allclose = lambda *a, **k: True", {"01.1", "01.2", "01.3", "01.4"}, "patches `torch.allclose`"),
    ("import sys\nsys.modules['course_lib.grading'] = None", {"01.1", "01.2", "01.3", "01.4"}, "sys.modules"),
    ("setattr(checks, 'check_softmax', print)", {"01.1"}, "course_lib.checks"),
    ("globals()['checks'] = None", {"01.1", "01.2", "01.3", "01.4"}, "globals()"),
    ("exec('checks.check_softmax = print')", {"01.1"}, "patches `course_lib.checks.check_softmax`"),
    ("code = 'checks.check_softmax = print'\nexec(code)", {"01.1", "01.2", "01.3", "01.4"}, "calls `exec`"),
    ("__import__('torch').allclose = all", {"01.1", "01.2", "01.3", "01.4"}, "patches `__import__(...)"),
    ("type(tokenizer).apply_chat_template = print", {"01.1", "01.2", "01.3", "01.4"}, "patches `type(...)"),
    ("tokenizer.__class__.apply_chat_template = print", {"01.1", "01.2", "01.3", "01.4"}, "__class__"),
    ("get_ipython().showtraceback = print", {"01.1", "01.2", "01.3", "01.4"}, "get_ipython"),
    ("ip = get_ipython()", {"01.1", "01.2", "01.3", "01.4"}, "calls `get_ipython`"),
    ("import sys\nsys.setprofile(None)", {"01.1", "01.2", "01.3", "01.4"}, "calls `sys.setprofile`"),
    # IPython's syntax does not hide the rest of a cell, and a file the student writes is read as Python
    ("!echo hiding\nchecks.check_softmax = print", {"01.1"}, "patches `course_lib.checks.check_softmax`"),
    ("%time checks.check_softmax = print", {"01.1"}, "patches `course_lib.checks.check_softmax`"),
    ("%%writefile my_gpt.py\nimport course_lib.checks as c\nc.check_softmax = print", {"01.1"},
     "patches `course_lib.checks.check_softmax`"),
    ("!sed -i s/assert/pass/ .venv/lib/python3.11/site-packages/course_lib/checks/attention.py",
     {"01.1", "01.2", "01.3", "01.4"}, "calls `shell: !sed"),
    ("%%bash\nrm -r course_lib/checks", {"01.1", "01.2", "01.3", "01.4"}, "calls `shell: %%bash"),
])
def test_a_student_cell_that_tampers_earns_nothing_for_what_it_touches(source, touched, words):
    found = grading.tampering(graded_notebook(cell(source, solution=True, grade_id="exercise-01_1")))
    assert set(found) == touched
    assert all(words in sentence and sentence.endswith(f"earns nothing for exercise {e}.") for e, sentence in found.items())


def test_a_cell_the_student_added_is_read_too():
    assert set(grading.tampering(graded_notebook(cell("checks.check_softmax = print")))) == {"01.1"}


@pytest.mark.parametrize("source", [
    "from course_lib import checks",                         # importing the real thing again
    "import course_lib.checks",
    "from course_lib.checks import check_softmax",
    "results = []\ntrain = None\ncausal_mask = None",        # names shadowed in the notebook only
    "def softmax(z, dim=-1):\n    checks = 1\n    return z",  # a local named like the module
    "torch.backends.cudnn.deterministic = True",             # settings, not code
    "import matplotlib.pyplot as plt\nplt.rcParams['figure.dpi'] = 80",
    "total = eval('1 + 2')\nnp = __import__('numpy')",                    # literal code that patches nothing
    "model.get_submodule('encoder').query = None",                       # an attribute of the student's object
    "%matplotlib inline\n%timeit -n 3 softmax(torch.randn(3))\nfiles = !ls\n!pip list",   # IPython's syntax
    "%%writefile my_gpt.py\nimport torch\nchecks = 1\n\ndef check_gpt():\n    pass",     # a file's own names
])
def test_ordinary_student_code_is_not_tampering(source):
    assert grading.tampering(graded_notebook(cell(source, solution=True, grade_id="exercise-01_1"))) == {}


def test_no_solution_of_the_course_counts_as_tampering():
    for path in sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        source = grading_notebook(nbformat.read(path, as_version=4), path.name)
        assert grading.tampering(source) == {}, path.name


# ------------------------------------------------------------------------------ a class, end to end

LATER = [("00_setup", "00.1"), ("02_cross_entropy", "02.3"), ("03_transformer_block", "03.4"),
         ("04_training_a_language_model", "04.4"), ("05_scaling_laws", "05.4"), ("06_finetuning", "06.3"),
         ("07_lora", "07.4"), ("08_peft_family", "08.3"), ("09_lora_causal_lm_gpu", "09.3"),
         ("10_scaling_out", "10.3"), ("11_model_parallelism", "11.3")]

# Answers of lesson 01's four exercises; "solution" is the solution edition's.
WRONG = {
    "01.1": "def softmax(z, dim=-1):\n    return z.exp() / z.exp().sum(dim=dim, keepdim=True)",
    "01.2": "def my_causal_mask(T):\n    return torch.ones(T, T, dtype=torch.bool).triu()",
    "01.3": ("def attention(q, k, v, mask=None):\n    s = q @ k.transpose(-2, -1)\n    if mask is not None:\n"
             "        s = s.masked_fill(~mask, float('-inf'))\n    w = torch.softmax(s, -1)\n    return w @ v, w"),
    "01.4": ("def attention_backward_ex(q, k, v, d_out, mask=None):\n    z = torch.zeros_like\n"
             "    return z(q), z(k), z(v)"),
}
REFERENCE = {   # the course's reference under another name, or autograd for the backward pass
    "01.1": "from course_lib.parts.losses import softmax as stable\ndef softmax(z, dim=-1):\n    return stable(z, dim)",
    "01.2": "from course_lib.parts.attention import causal_mask as lower\ndef my_causal_mask(T):\n    return lower(T)",
    "01.3": "from course_lib.parts.attention import scaled_dot_product_attention as attention",
    "01.4": ("def attention_backward_ex(q, k, v, d_out, mask=None):\n"
             "    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))\n"
             "    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)\n"
             "    return torch.autograd.grad(out, (q, k, v), d_out)"),
}
NAMES = {"01.1": "softmax", "01.2": "my_causal_mask", "01.3": "attention", "01.4": "attention_backward_ex"}
POINTS_01 = {e: EXERCISES[e].points for e in NAMES}
FORBIDDEN_LATER = {
    "00.1": "import course_lib.checks.setup as s\ndef mse(pred, target):\n    s.check_mse(lambda p, t: ((p - t) ** 2).mean())\n"
            "    return ((pred - target) ** 2).mean()",
    "02.3": "from course_lib.parts.gradcheck import numerical_grad as ng\ndef numerical_grad_ex(f, x, eps):\n"
            "    return ng(f, x, eps)",
    "03.4": "from course_lib.parts import model\ndef param_count(vocab_size, context, n_layer, d_model):\n"
            "    return model.param_count_formula(model.GPTConfig(vocab_size=vocab_size, context=context, "
            "n_layer=n_layer, n_head=1, d_model=d_model), non_embedding=False)",
    "04.4": "from course_lib.parts.model import KVCache\ndef attend_with_cache(q, k, v, k_cache, v_cache):\n"
            "    K, V = KVCache(1).update(0, torch.cat([k_cache, k], -2), torch.cat([v_cache, v], -2))\n"
            "    return torch.nn.functional.scaled_dot_product_attention(q, K, V), K, V",
    "05.4": "from course_lib.parts.scaling import compute_optimal as compute_optimal_allocation",
    "06.3": "from course_lib.experiments.stats import paired_bootstrap_gap\n"
            "def paired_bootstrap(right_a, right_b, rng, resamples=2000):\n"
            "    return paired_bootstrap_gap(right_a, right_b, rng=rng, resamples=resamples)",
    "07.4": "from course_lib.parts import lora\ndef inject_lora(model, target_modules, r, alpha):\n"
            "    return lora.apply_lora(model, target_modules, r, alpha)",
    "08.3": "from course_lib.parts.peft_family import subspace_similarity",
    "09.3": "from course_lib.parts import lora\ndef lora_trainable(config, r, targets):\n"
            "    from transformers import LlamaForCausalLM\n"
            "    return lora.count_trainable(lora.apply_lora(LlamaForCausalLM(config), list(targets), r, r))",
    "10.3": "from course_lib.distributed.ddp import memory_per_gpu\ndef zero_memory_gb(n_params, n_gpus, zero_stage):\n"
            "    return memory_per_gpu(n_params, data=n_gpus, zero_stage=zero_stage)['total'] / 1e9",
    "11.3": "from course_lib.distributed.activation_memory import korthikanti_bytes as kb\n"
            "def activation_bytes(s, b, h, a, t=1, sequence_parallel=False):\n"
            "    return kb(s, b, h, a, t=t, sequence_parallel=sequence_parallel)",
}
TIMEOUT = 8      # seconds per cell: the excerpt's slowest cell (its imports) takes ~2-4 s on a busy 2-core machine


def submission(release: nbformat.NotebookNode, answers: dict[str, str], solutions: dict[str, str],
               extra_before_check: dict[str, str] | None = None, deleted: tuple[str, ...] = ()) -> nbformat.NotebookNode:
    """The release with each exercise cell's stub replaced: answers[e] ("solution": the solution edition's,
    "stub": left as released, else code under the exercise's header line); ``extra_before_check[e]`` is a cell
    the student adds just before exercise e's grade cell; the grade cells of ``deleted`` are deleted."""
    nb = nbformat.reads(nbformat.writes(release), as_version=4)
    cells = []
    for c in nb.cells:
        grade_id = c.metadata.get("nbgrader", {}).get("grade_id", "")
        if grade_id.startswith("exercise-"):
            exercise = grade_id[len("exercise-"):].replace("_", ".")
            answer = answers.get(exercise, "solution")
            if answer == "solution":
                c.source = solutions[exercise]
            elif answer != "stub":
                c.source = c.source.splitlines()[0] + "\n" + answer
        if grade_id.startswith("check-"):
            exercise = grade_id[len("check-"):].replace("_", ".")
            if exercise in (extra_before_check or {}):
                cells.append(nbformat.v4.new_code_cell(extra_before_check[exercise]))
            if exercise in deleted:
                continue
        cells.append(c)
    nb.cells = cells
    return nb


def kinds(solutions: dict[str, str]) -> dict[str, tuple[dict[str, str], dict[str, str] | None, dict[str, float]]]:
    """The eight kinds of submission of issue 24: name -> (answers, added cells, expected score per exercise).
    ("warns" has also deleted the grade cell of 01.2: nbgrader puts it back and grades it.)"""
    full = dict(POINTS_01)
    warn = {e: "import warnings\n" + solutions[e].replace(
        "    # BEGIN SOLUTION", "    warnings.warn('deprecated, but right')\n    # BEGIN SOLUTION", 1) for e in NAMES}
    return {
        "correct": ({}, None, full),
        "wrong": (WRONG, None, {e: 0 for e in NAMES}),
        # a loop that sleeps: the same timeout and interrupt as a busy one, without burning a shared CPU for TIMEOUT s
        "loops_forever": ({"01.1": "import time\ndef softmax(z, dim=-1):\n    while True:\n        time.sleep(0.05)"}, None,
                          {**full, "01.1": 0}),
        "raises": ({e: f"def {n}(*args, **kwargs):\n    raise ValueError('no idea')" for e, n in NAMES.items()}, None,
                   {e: 0 for e in NAMES}),
        "calls_reference": (REFERENCE, None, {e: 0 for e in NAMES}),
        "untouched": ({e: "stub" for e in NAMES}, None, {e: 0 for e in NAMES}),
        "warns": (warn, None, full),
        "replaces_check": ({"01.1": "def softmax(z, dim=-1):\n    return z"},
                           {"01.1": "checks.check_softmax = lambda fn: print('✅ check_softmax passed')"},
                           {**full, "01.1": 0}),
    }


@pytest.fixture(scope="module")
def graded_class(tmp_path_factory):
    """Release the excerpt course with nbgrader, grade every submission, return (root, gradebook rows, seconds)."""
    if not GRADE_PY.is_file():
        message = "nbgrader's environment .venv-grade is missing: run `make grade-setup` (make test does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    started = time.perf_counter()
    root = tmp_path_factory.mktemp("course")
    source = root / "source" / "excerpt"
    source.mkdir(parents=True)
    trimmed = {"01_attention": excerpt([("01_attention", e) for e in NAMES]), "later_exercises": excerpt(LATER)}
    for name, nb in trimmed.items():
        nbformat.write(grading_notebook(nb, f"{name}.ipynb"), source / f"{name}.ipynb")
    env = {**os.environ, "COURSE_GRADE_TIMEOUT": str(TIMEOUT)}
    run = lambda *args: subprocess.run([str(GRADE_PY), "-m", "course_lib.grading", *args, "--root", str(root)],  # noqa: E731
                                       cwd=REPO, env=env, capture_output=True, text=True)
    released = run("release", "excerpt", "--no-exchange", "--keep-source")
    assert released.returncode == 0, released.stdout[-3000:] + released.stderr[-3000:]
    release = {name: nbformat.read(root / "release" / "excerpt" / f"{name}.ipynb", as_version=4) for name in trimmed}
    solutions = {}
    for name, nb in trimmed.items():
        graded_source = grading_notebook(nb, f"{name}.ipynb")
        for c in graded_source.cells:
            if c.metadata["nbgrader"]["solution"]:
                solutions[c.metadata["nbgrader"]["grade_id"][len("exercise-"):].replace("_", ".")] = c.source
    folder = root / "inbox"
    expected = {}
    for kind, (answers, added, scores) in kinds(solutions).items():
        (folder / kind).mkdir(parents=True)
        nbformat.write(submission(release["01_attention"], answers, solutions, added,
                                  deleted=("01.2",) if kind == "warns" else ()), folder / kind / "01_attention.ipynb")
        expected[kind] = scores
    (folder / "later_correct").mkdir()
    nbformat.write(submission(release["later_exercises"], {}, solutions), folder / "later_correct" / "later_exercises.ipynb")
    result = run("grade", "excerpt", str(folder))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with (root / "gradebook" / "excerpt.csv").open() as handle:
        rows = {row["student"]: row for row in csv.DictReader(handle)}
    return root, rows, expected, trimmed, release, time.perf_counter() - started


def test_the_release_is_the_student_edition(graded_class):
    _, _, _, trimmed, release, _ = graded_class
    for name, nb in trimmed.items():
        student = student_notebook(nb, f"{name}.ipynb")
        ours = [(c.cell_type, c.source, c.get("outputs"), c.metadata.get("tags")) for c in student.cells]
        theirs = [(c.cell_type, c.source, c.get("outputs"), c.metadata.get("tags")) for c in release[name].cells]
        assert theirs == ours, name
        assert all("nbgrader" in c.metadata for c in release[name].cells)


def test_the_eight_kinds_of_submission(graded_class):
    _, rows, expected, _, _, seconds = graded_class
    table = {}
    for kind, scores in expected.items():
        got = {e: float(rows[kind][f"01_attention:{e}"]) for e in NAMES}
        table[kind] = (sum(got.values()), got)
        assert got == {e: float(s) for e, s in scores.items()}, (kind, got)
    print("\n" + "\n".join(f"{kind:>16}: {total:g}/{sum(POINTS_01.values())}  {got}" for kind, (total, got) in table.items())
          + f"\n(graded in {seconds:.0f} s)")


def test_a_later_exercise_of_every_lesson(graded_class):
    _, rows, _, _, _, _ = graded_class
    for exercise in [e for _, e in LATER]:
        assert float(rows["later_correct"][f"later_exercises:{exercise}"]) == EXERCISES[exercise].points, exercise


@pytest.mark.parametrize("exercise", [e for _, e in LATER])
def test_grading_refuses_the_reference_in_a_later_exercise_of_every_lesson(exercise):
    # what the end-to-end test's grade cells run, on answers that call each later exercise's reference
    lesson = dict((e, name) for name, e in LATER)[exercise]
    notebook = excerpt([(lesson, exercise)])
    namespace: dict = {}
    exec(notebook.cells[1].source, namespace)                          # the excerpt's imports
    exec(FORBIDDEN_LATER[exercise], namespace)
    answer = grading.answer_of(exercise_cells(solution_notebook(lesson))[exercise][1].source)
    with pytest.raises(AssertionError, match=r"^your answer calls "):
        grading.grade(exercise, namespace[answer])


def test_feedback_and_grades_csv_for_every_student(graded_class):
    root, rows, _, _, _, _ = graded_class
    assert (root / "grades.csv").is_file()
    with (root / "grades.csv").open() as handle:
        totals = {row["student_id"]: float(row["score"]) for row in csv.DictReader(handle)}
    assert totals["correct"] == sum(POINTS_01.values()) and totals["calls_reference"] == 0
    for student in rows:
        if student == "(points)":
            continue
        name = "later_exercises" if student.startswith("later") else "01_attention"
        html = (root / "feedback" / student / "excerpt" / f"{name}.html").read_text()
        assert "Score" in html or "score" in html
    html = (root / "feedback" / "calls_reference" / "excerpt" / "01_attention.html").read_text()
    assert "write it yourself" in html
    html = (root / "feedback" / "replaces_check" / "excerpt" / "01_attention.html").read_text()
    assert "earns nothing for exercise 01.1" in html
