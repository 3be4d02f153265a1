"""The check framework and the warm-up check of notebook 00: right answers pass, each wrong one is named."""

import numpy as np
import pytest
import torch

from course_lib import checks
from course_lib.checks import CheckFailed, NotAttempted, StudentCodeError, check_mse


def mse_reference(pred, target):
    return ((pred - target) ** 2).mean()


CORRECT = {
    "explicit": mse_reference,
    "torch built-in": lambda p, t: torch.nn.functional.mse_loss(p, t),
    "sum over numel": lambda p, t: ((p - t) ** 2).sum() / p.numel(),
    "float64 inside": lambda p, t: ((p.double() - t.double()) ** 2).mean().float(),
    # one number is what is asked: a Python float or a NumPy scalar is as right as a 0-d tensor
    "python float": lambda p, t: float(((p - t) ** 2).mean()),
    "numpy scalar": lambda p, t: np.mean((p - t).numpy() ** 2),
    "0-d numpy array": lambda p, t: np.asarray(((p - t) ** 2).mean().item()),
}

WRONG = {
    "summed": (lambda p, t: ((p - t) ** 2).sum(), "summed the squared errors instead of averaging"),
    "rmse": (lambda p, t: ((p - t) ** 2).mean().sqrt(), "square root"),
    "mae": (lambda p, t: (p - t).abs().mean(), "absolute errors"),
    "square of mean": (lambda p, t: (p - t).mean() ** 2, "squared the mean error"),
    "per-row mean": (lambda p, t: ((p - t) ** 2).mean(dim=-1), "one number"),
    "a list": (lambda p, t: [float(((p - t) ** 2).mean())], "should be a torch.Tensor"),
    "numpy sum": (lambda p, t: np.sum((p - t).numpy() ** 2), "summed the squared errors instead of averaging"),
    "off by a factor": (lambda p, t: 0.5 * ((p - t) ** 2).mean(), "differs from the reference"),
}


@pytest.mark.parametrize("name", CORRECT)
def test_check_mse_accepts_correct_answers(name, capsys):
    check_mse(CORRECT[name])
    assert capsys.readouterr().out.startswith("✅ check_mse passed")


@pytest.mark.parametrize("name", WRONG)
def test_check_mse_names_each_mistake(name):
    fn, sentence = WRONG[name]
    with pytest.raises(CheckFailed, match=sentence) as info:
        check_mse(fn)
    message = str(info.value)
    assert "\n" not in message and len(message) < 300, "one sentence, no tensor dumps"


def test_a_stub_is_reported_as_not_attempted():
    def mse(pred, target):
        raise NotImplementedError(checks.stub_message("00.1"))

    with pytest.raises(NotAttempted, match=r"^Exercise 00.1 is not done yet: replace the"):
        check_mse(mse)


def test_an_exception_in_student_code_is_reported_briefly():
    def mse(pred, target):
        return pred.nonexistent_method()

    with pytest.raises(StudentCodeError, match=r"^mse raised AttributeError on a 1-D example: 'Tensor' object"):
        check_mse(mse)


def test_nan_output_is_called_unstable():
    with pytest.raises(CheckFailed, match="inf or nan"):
        check_mse(lambda p, t: ((p - t) ** 2).mean() * float("nan"))


def test_checks_are_assertion_errors_so_plain_asserts_and_pytest_agree():
    assert issubclass(CheckFailed, AssertionError) and issubclass(NotAttempted, CheckFailed)


def test_hints_come_in_three_levels(capsys):
    checks.hint("00.1")
    first = capsys.readouterr().out
    assert first.startswith("Hint 1/3 for exercise 00.1, the idea:") and "level=2" in first
    checks.hint("00.1", level=3)
    assert "the key line: return ((pred - target) ** 2).mean()" in capsys.readouterr().out
    with pytest.raises(KeyError, match="No hint for exercise '99.9'"):
        checks.hint("99.9")
    with pytest.raises(ValueError, match="Hint level 4 does not exist: use level=1"):
        checks.hint("00.1", level=4)


def test_every_exercise_of_every_notebook_has_three_hint_levels():
    import re
    from pathlib import Path

    import nbformat

    missing = []
    for path in sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            if "exercise" in cell.metadata.get("tags", []):
                # re.M: a cell that writes a file (%%writefile my_gpt.py) names its exercise on its second line
                exercise = re.search(r"^# Exercise (\d\d\.\d+)", cell.source, re.M).group(1)
                if len(checks.HINTS.get(exercise, ())) != 3:
                    missing.append(exercise)
    assert not missing, f"exercises without all three hint levels: {missing}"


def test_compare_diagnoses_in_order_and_falls_back():
    actual = torch.tensor([2.0, 4.0])
    with pytest.raises(CheckFailed, match="doubled"):
        checks.compare(actual, torch.tensor([1.0, 2.0]), what="x", case="c",
                       wrong_answers={"doubled": lambda: torch.tensor([2.0, 4.0]),
                                      "broken": lambda: 1 / 0})
    with pytest.raises(CheckFailed, match=r"shape \(2,\).*\(3,\)"):
        checks.compare(actual, torch.zeros(3), what="x", case="c")


# ------------------------------------- the rule: an answer that calls the course's reference is refused

import sys  # noqa: E402
import threading  # noqa: E402
import types  # noqa: E402
import warnings  # noqa: E402

from course_lib.checks import EXERCISES, ReferenceCalled  # noqa: E402
from course_lib.parts import losses  # noqa: E402
from course_lib.parts.losses import softmax as saved_softmax  # noqa: E402 -- bound before any check runs


def calls_reference(z, dim=-1):
    return saved_softmax(z, dim)


def swallows_the_refusal(z, dim=-1):
    try:
        saved_softmax(z, dim)
    except BaseException:  # noqa: BLE001 -- the rule records, it does not rely on raising
        pass
    return torch.softmax(z, dim)


def switches_the_watch_off(z, dim=-1):
    sys.setprofile(None)
    return saved_softmax(z, dim)


def in_a_thread(z, dim=-1):
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("p", saved_softmax(z, dim)))
    worker.start(), worker.join()
    return out["p"]


copied_code = types.FunctionType(saved_softmax.__code__, saved_softmax.__globals__, "my_softmax")


def test_the_sentence_names_what_was_called():
    with pytest.raises(ReferenceCalled) as info:
        checks.check_softmax(calls_reference)
    assert str(info.value) == ("your answer calls the course's reference `course_lib.parts.losses.softmax`; write it "
                               "yourself.")


@pytest.mark.parametrize("fn", [swallows_the_refusal, in_a_thread, copied_code])
def test_the_reference_is_refused_however_it_is_reached(fn):
    with pytest.raises(ReferenceCalled, match="`course_lib.parts.losses.softmax`"):
        checks.check_softmax(fn)


def test_a_rebound_module_attribute_does_not_hide_the_reference(monkeypatch):
    # the student's cell rebinds losses.softmax to their own function and calls the saved original
    monkeypatch.setattr(losses, "softmax", lambda z, dim=-1: torch.softmax(z, dim))
    with pytest.raises(ReferenceCalled, match="`course_lib.parts.losses.softmax`"):
        checks.check_softmax(lambda z, dim=-1: saved_softmax(z, dim))


def test_switching_the_watch_off_is_refused():
    with pytest.raises(ReferenceCalled, match="switched off the interpreter's profiling hook"):
        checks.check_softmax(switches_the_watch_off)


def test_the_check_code_is_out_of_reach_too():
    # 00.1 has no library reference; the checks' own code is forbidden in every exercise
    with pytest.raises(ReferenceCalled, match="`course_lib.checks.setup.check_mse`"):
        check_mse(lambda p, t: (checks.setup.check_mse(mse_reference), mse_reference(p, t))[1])
    verify = check_mse                                                   # the same, under another name
    with pytest.raises(ReferenceCalled, match="`course_lib.checks.setup.check_mse`"):
        check_mse(lambda p, t: (verify(mse_reference), mse_reference(p, t))[1])


def test_the_profiler_that_was_there_is_restored_after_a_pass_and_a_failure(capsys):
    seen = []

    def tracer(frame, event, arg):  # e.g. a profiler or a debugger the student runs
        seen.append(event)

    sys.setprofile(tracer)
    try:
        check_mse(mse_reference)
        assert sys.getprofile() is tracer
        with pytest.raises(ReferenceCalled):
            checks.check_softmax(calls_reference)
        assert sys.getprofile() is tracer and threading.getprofile() is None
    finally:
        sys.setprofile(None)


def test_warnings_from_the_answer_stay_out_of_stderr(capsys):
    def warns(pred, target):
        warnings.warn("this answer warns", UserWarning)
        return mse_reference(pred, target)

    check_mse(warns)
    out, err = capsys.readouterr()
    assert err == "" and "✅ check_mse passed" in out
    assert "note: your code raised a warning while the check ran it: UserWarning: this answer warns" in out


def test_every_exercise_is_registered_with_points_and_forbidden_callables_that_exist():
    import importlib
    import re
    from pathlib import Path

    import nbformat

    in_notebooks = set()
    for path in sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            if "check" in cell.metadata.get("tags", []):
                name = re.search(r"checks\.(check_\w+)\(", cell.source).group(1)
                in_notebooks.add((getattr(checks, name).exercise_id, name))
    assert {(e.id, e.check.__name__) for e in EXERCISES.values()} >= in_notebooks
    for exercise in EXERCISES.values():
        assert isinstance(exercise.points, int) and exercise.points >= 1
        for spec in exercise.forbidden:
            module, _, qualname = spec.partition(":")
            target = importlib.import_module(module)
            if qualname != "*":
                for part in qualname.split("."):
                    target = getattr(target, part)    # a renamed reference fails here, not silently in class
            assert checks.framework._module_file(module), spec


@pytest.fixture
def demo_exercises():
    """Checks registered for one test only (exercise ids 99.*), removed afterwards."""
    yield checks.exercise
    for key in [k for k in EXERCISES if k.startswith("99.")]:
        del EXERCISES[key]


def test_a_callback_the_check_hands_over_may_use_the_reference(demo_exercises):
    @demo_exercises("99.1", forbid=("course_lib.parts.losses:softmax",))
    def check_demo(fn):
        return checks.call_student(fn, lambda z: saved_softmax(z))     # the check's own callback

    assert check_demo(lambda callback: callback(torch.zeros(3))).sum() == 1
    with pytest.raises(ReferenceCalled):
        check_demo(lambda callback: saved_softmax(torch.zeros(3)))     # the answer itself may not


def test_a_block_of_student_code_watches_the_answer_itself(demo_exercises):
    @demo_exercises("99.2", forbid=("course_lib.parts.losses:softmax",))
    def check_demo(fn):
        with checks.student_code():
            return fn(torch.zeros(3))

    with pytest.raises(ReferenceCalled):
        check_demo(lambda z: saved_softmax(z))
    assert check_demo(lambda z: torch.softmax(z, -1)).sum() == 1


def test_yours_or_reference_builds_on_a_passed_exercise_and_falls_back_otherwise(capsys):
    """A lesson continues with the student's version only after its check passed in this session."""
    from course_lib.checks.framework import PASSED

    def mse(pred, target):
        return ((pred - target) ** 2).mean()

    def stub(pred, target):
        raise NotImplementedError("Exercise 00.1 is not done yet")

    PASSED.discard("00.1")
    assert checks.yours_or_reference("00.1", mse, len, what="mse") is len
    assert "has not passed its check yet, so what follows uses the course's mse" in capsys.readouterr().out
    checks.check_mse(mse)
    assert "00.1" in PASSED and checks.yours_or_reference("00.1", mse, len) is mse
    with pytest.raises(checks.NotAttempted):
        checks.check_mse(stub)
    assert "00.1" not in PASSED                    # a failed re-run withdraws the earlier pass
    with pytest.raises(KeyError, match="no exercise '99.9'"):
        checks.yours_or_reference("99.9", mse, len)
