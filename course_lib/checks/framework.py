"""The check framework: run a student's code, compare with the reference, name the mistake in one sentence.

Every lesson's checks (the other modules of this package) are built from these pieces; see
``course_lib/checks/__init__.py`` for what a check promises.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import sys
import threading
import types
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


class CheckFailed(AssertionError):
    """The student's answer disagrees with the reference; the message says how, in one sentence."""

    def _render_traceback_(self) -> list[str]:
        # IPython calls this instead of printing a traceback: the student sees the sentence, not the
        # check's internals. (pytest and plain Python still show the full traceback.)
        return [f"\x1b[0;31m{type(self).__name__}\x1b[0m: {self}"]


class NotAttempted(CheckFailed):
    """The exercise still holds its stub (``raise NotImplementedError``)."""


class StudentCodeError(CheckFailed):
    """The student's code raised an exception while the check ran it."""


class ReferenceCalled(CheckFailed):
    """The student's code called the course's reference of the exercise (or autograd, or the check's own code)."""


HINT_LEVELS = {1: "the idea", 2: "the approach", 3: "the key line"}
HINTS: dict[str, tuple[str, ...]] = {}


def register_hint(exercise: str, idea: str, approach: str | None = None, key_line: str | None = None) -> None:
    """Register an exercise's hints in three steps: the idea, the approach, the key line.

    ``hint(exercise)`` prints the idea; ``level=2`` the approach; ``level=3`` the line that solves it.
    (``approach`` and ``key_line`` may be missing while a lesson is being written; the tests insist on
    all three for every exercise of a committed notebook.)
    """
    HINTS[exercise] = tuple(text for text in (idea, approach, key_line) if text)


def hint(exercise: str, level: int = 1) -> None:
    """Print one hint for an exercise: ``hint("01.1")`` the idea, ``level=2`` the approach, ``level=3`` the key line."""
    if exercise not in HINTS:
        known = ", ".join(sorted(HINTS)) or "none registered"
        raise KeyError(f"No hint for exercise {exercise!r}; exercises with hints: {known}.")
    if level not in HINT_LEVELS:
        raise ValueError(f"Hint level {level!r} does not exist: use level=1 (the idea), 2 (the approach) "
                         f"or 3 (the key line).")
    texts = HINTS[exercise]
    if level > len(texts):
        raise ValueError(f"Exercise {exercise} has only {len(texts)} hint level(s) written so far.")
    more = f" (more: checks.hint({exercise!r}, level={level + 1}))" if level < len(texts) else ""
    print(f"Hint {level}/3 for exercise {exercise}, {HINT_LEVELS[level]}: {texts[level - 1]}{more}")


def fail(message: str) -> None:
    """Raise :class:`CheckFailed` with ``message`` (one sentence, no tensor dumps)."""
    __tracebackhide__ = True  # IPython and pytest hide this frame: the student sees the sentence
    raise CheckFailed(message)


def _name_of(student: Any) -> str:
    return getattr(student, "__name__", None) or type(student).__name__


def stub_message(exercise: str) -> str:
    """What the stub of an exercise raises in the student edition (see course_lib/editions.py)."""
    return f"Exercise {exercise} is not done yet"


def not_attempted_message(stub_text: str) -> str:
    """The one sentence a check says when it meets an untouched stub."""
    return (f"{stub_text}: replace the `raise NotImplementedError(...)` line with your code, run that "
            f"cell, then run this check again.")


# ----------------------------------------------------------------------------------------------
# Exercises: the registry (points, forbidden callables) and the rule "an answer that calls the
# reference is refused"
# ----------------------------------------------------------------------------------------------

DEFAULT_POINTS = 1
# Every way into autograd from Python ends in _engine_run_backward (Tensor.backward, torch.autograd.grad
# and .backward, torch.autograd.functional, torch.func): the first three name what the student wrote,
# the last catches the rest.
AUTOGRAD = {"torch._tensor:Tensor.backward": "Tensor.backward", "torch.autograd:backward": "torch.autograd.backward",
            "torch.autograd:grad": "torch.autograd.grad", "torch.autograd.graph:_engine_run_backward": "torch.autograd"}
_COURSE_LIB = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Exercise:
    """One exercise as the course grades it: its check, its points, and what its answer may not call."""

    id: str
    check: Callable[..., None]
    points: int
    forbidden: tuple[str, ...]   # "module:qualname" (a function, or a class with its methods) or "module:*"
    fixtures: tuple[str, ...]    # what the check takes after the answer (e.g. "tokenizer"); see course_lib.grading

    @property
    def autograd(self) -> bool:
        return any(spec in AUTOGRAD for spec in self.forbidden)

    def reference_modules(self) -> set[str]:
        """The course modules holding what this exercise forbids (the grader's scan watches them)."""
        return {spec.partition(":")[0] for spec in self.forbidden if spec.startswith("course_lib.")}


EXERCISES: dict[str, Exercise] = {}
#: The exercises whose check passed in this session (this kernel): later cells build on the student's version.
PASSED: set[str] = set()


def exercise(exercise_id: str, *, points: int = DEFAULT_POINTS, forbid: Iterable[str] = (), autograd: bool = False,
             fixtures: Iterable[str] = ()) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register a check as the check of ``exercise_id``, worth ``points`` (what the released notebook states).

    ``forbid`` lists the course's reference of the exercise as ``"module:qualname"`` strings: a function, a
    class (all its methods) or ``"module:*"`` (everything in the module); ``autograd=True`` forbids autograd too
    (backward-pass exercises). While the check runs the student's code (:func:`call_student`,
    :func:`student_code`), calling any of them -- under any name, through any alias -- fails the check with
    one sentence. The check's own code (``course_lib.checks``) is always forbidden, except the callbacks the
    check hands to the student. Warnings raised inside the check never reach stderr (a graded cell with
    stderr output earns nothing); those from the student's code are summed up in one line on stdout.
    """
    forbidden = tuple(forbid) + (tuple(AUTOGRAD) if autograd else ())

    def register(check: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(check)
        def run(*args: Any, **kwargs: Any) -> None:
            __tracebackhide__ = True
            rule = _Rule(exercise_id, forbidden)
            _ACTIVE.append(rule)
            PASSED.discard(exercise_id)
            try:
                with warnings.catch_warnings(record=True):     # the filters stay: what would show is recorded
                    result = check(*args, **kwargs)
                PASSED.add(exercise_id)
                return result
            finally:
                _ACTIVE.remove(rule)
                rule.tell_warnings()

        if exercise_id in EXERCISES and EXERCISES[exercise_id].check.__qualname__ != check.__qualname__:
            raise ValueError(f"exercise {exercise_id} already has a check, {EXERCISES[exercise_id].check.__name__}.")
        EXERCISES[exercise_id] = Exercise(exercise_id, run, points, forbidden, tuple(fixtures))
        run.exercise_id = exercise_id  # type: ignore[attr-defined]
        return run

    return register


def yours_or_reference(exercise_id: str, yours: Any, reference: Any, *, what: str | None = None) -> Any:
    """What a lesson builds on after exercise ``exercise_id``: ``yours`` when its check passed in this session,
    else ``reference``, saying so in one line, so that an unfinished exercise never breaks the rest of the
    lesson. ``what`` names the thing in that line (default: the reference's qualified name)."""
    if exercise_id not in EXERCISES:
        raise KeyError(f"no exercise {exercise_id!r}; the exercises are {sorted(EXERCISES)}.")
    if exercise_id in PASSED:
        print(f"Using your {what or _name_of(yours)} (exercise {exercise_id} passed its check).")
        return yours
    name = what or f"{getattr(reference, '__module__', '')}.{getattr(reference, '__qualname__', _name_of(reference))}"
    print(f"Exercise {exercise_id} has not passed its check yet, so what follows uses the course's {name}.")
    return reference


def exercise_of(check: Callable[..., Any]) -> Exercise:
    """The registered exercise a check function belongs to."""
    exercise_id = getattr(check, "exercise_id", None)
    if exercise_id not in EXERCISES:
        raise KeyError(f"{getattr(check, '__name__', check)!r} is not a registered exercise check.")
    return EXERCISES[exercise_id]


def _module_file(module: str) -> str | None:
    """The source file of ``module`` without importing it (the course's own files by their place on disk)."""
    if module.split(".")[0] == "course_lib":
        parts = module.split(".")[1:]
        for candidate in (_COURSE_LIB.joinpath(*parts).with_suffix(".py"), _COURSE_LIB.joinpath(*parts, "__init__.py")):
            if candidate.is_file():
                return str(candidate)
        return None
    loaded = sys.modules.get(module)
    if getattr(loaded, "__file__", None):
        return loaded.__file__
    top, _, rest = module.partition(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if not rest:
        return spec.origin
    for base in spec.submodule_search_locations or ():
        path = Path(base).joinpath(*rest.split("."))
        for candidate in (path.with_suffix(".py"), path / "__init__.py"):
            if candidate.is_file():
                return str(candidate)
    return None


_FUNCTIONS_ONLY = "<functions>"  # a check module: its functions and lambdas, not the methods of its classes


@functools.lru_cache(maxsize=None)
def _watch_table(forbidden: tuple[str, ...]) -> dict[str, tuple[tuple[str, str, str], ...]]:
    """Source file -> ((qualname prefix, module, kind), ...) of everything a student's call may not enter.

    Matching a frame's code by its file and qualified name, not by identity, catches a reference bound under
    another name before the check ran, a copy of its code object, and a module whose attribute was rebound.
    """
    table: dict[str, list[tuple[str, str, str]]] = {}

    def add(path: str | None, prefix: str, module: str, kind: str) -> None:
        if path:
            for variant in {path, os.path.realpath(path)}:
                table.setdefault(variant, []).append((prefix, module, kind))

    for spec in forbidden:
        module, _, qualname = spec.partition(":")
        add(_module_file(module), qualname, module, "autograd" if spec in AUTOGRAD else "reference")
    # The checks' own reference helpers (_softmax64, ...) are as good as the reference; the methods of the
    # checks' classes (toy models, the ring's send) are what a check hands to the student, so they stay open.
    for path in sorted((_COURSE_LIB / "checks").glob("*.py")):
        if path.name not in ("framework.py", "__init__.py"):
            add(str(path), _FUNCTIONS_ONLY, f"course_lib.checks.{path.stem}", "check")
    return {path: tuple(rules) for path, rules in table.items()}


def _is_method(qualname: str) -> bool:
    parts = qualname.split(".")
    return len(parts) >= 2 and parts[-2] != "<locals>"


def _match(qualname: str, rules: tuple[tuple[str, str, str], ...]) -> tuple[str, str] | None:
    """(kind, dotted name to report) if ``qualname`` falls under one of ``rules``."""
    for prefix, module, kind in rules:
        if prefix == _FUNCTIONS_ONLY:
            if not _is_method(qualname):
                return kind, f"{module}.{qualname.split('.<locals>')[0]}"
        elif prefix == "*":
            return kind, f"{module}.{qualname.split('.<locals>')[0]}"
        elif qualname == prefix or qualname.startswith(prefix + "."):
            return kind, AUTOGRAD.get(f"{module}:{prefix}", f"{module}.{prefix}")
    return None


def _callable_codes(objects: Iterable[Any]) -> set[types.CodeType]:
    """The code of the functions among ``objects`` (and of every method of the classes among them)."""
    codes: set[types.CodeType] = set()
    for obj in objects:
        while isinstance(obj, functools.partial):
            obj = obj.func
        if isinstance(obj, type):
            for member in vars(obj).values():
                codes |= _callable_codes([getattr(member, "__func__", member)])
            continue
        code = getattr(getattr(obj, "__func__", obj), "__code__", None)
        if isinstance(code, types.CodeType):
            codes.add(code)
    return codes


class _Rule:
    """What one running check forbids, and what the student's code did while it ran."""

    def __init__(self, exercise_id: str, forbidden: tuple[str, ...]) -> None:
        self.exercise_id, self.forbidden = exercise_id, forbidden
        self.warned: list[str] = []

    def tell_warnings(self) -> None:
        if self.warned:
            more = f" (and {len(self.warned) - 1} more)" if len(self.warned) > 1 else ""
            print(f"note: your code raised a warning while the check ran it: {self.warned[0]}{more}; a warning "
                  f"does not change the verdict.")


_ACTIVE: list[_Rule] = []


def _sentence(kind: str, name: str) -> str:
    if kind == "autograd":
        return (f"your answer calls autograd (`{name}`); this exercise asks for the gradient by hand, so write "
                f"it yourself.")
    if kind == "check":
        return f"your answer calls the course's check code `{name}`; write it yourself."
    if kind == "unwatched":
        return ("your answer switched off the interpreter's profiling hook that the check watches the reference "
                "with (sys.setprofile); write the answer without touching it.")
    return f"your answer calls the course's reference `{name}`; write it yourself."


class student_code:  # noqa: N801 -- used like a function: ``with student_code(*args): fn(*args)``
    """Run the student's code with the exercise's forbidden callables out of reach.

    A profiling hook (``sys.setprofile``, and ``threading.setprofile`` for threads the code starts) sees every
    Python function the student's code enters; entering a forbidden one is recorded -- not raised, so that a
    ``try``/``except`` in the answer cannot swallow it -- and the check fails on leaving this block with one
    sentence naming what was called. ``handed_over`` are the arguments the check gives the student's code:
    code reached through a function among them, or through ``exempt``, is the check's, not the student's
    (never pass the student's own function here). Warnings are recorded, not printed.
    Outside a registered check (no forbidden list) it only records warnings.
    """

    def __init__(self, *handed_over: Any, exempt: Iterable[Any] = ()) -> None:
        self.rule = _ACTIVE[-1] if _ACTIVE else None
        self.exempt = _callable_codes(list(exempt) + [a for a in handed_over if callable(a)])
        self.hit: tuple[str, str] | None = None

    def _record(self, frame: types.FrameType, hit: tuple[str, str]) -> None:
        if self.hit is not None:
            return
        walk: types.FrameType | None = frame
        while walk is not None and walk is not self.boundary:
            if walk.f_code in self.exempt:
                return
            walk = walk.f_back
        self.hit = hit

    def __enter__(self) -> "student_code":
        self.boundary = sys._getframe(1)
        self._warnings = warnings.catch_warnings(record=True)
        self.caught = self._warnings.__enter__()
        if self.rule is None:
            return self
        table = _watch_table(self.rule.forbidden)
        autograd = any(spec in AUTOGRAD for spec in self.rule.forbidden)
        record = self._record

        def hook(frame: types.FrameType, event: str, arg: Any) -> None:
            if event == "call":
                rules = table.get(frame.f_code.co_filename)
                if rules is not None:
                    hit = _match(frame.f_code.co_qualname, rules)
                    if hit is not None:
                        record(frame, hit)
            elif autograd and event == "c_call" and getattr(arg, "__name__", None) == "run_backward":
                record(frame, ("autograd", "torch.autograd"))  # the engine, called directly from Python

        self.hook = hook
        self.previous = sys.getprofile(), threading.getprofile()
        threading.setprofile(hook)
        sys.setprofile(hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        __tracebackhide__ = True
        if self.rule is not None:
            unwatched = sys.getprofile() is not self.hook
            sys.setprofile(self.previous[0])
            threading.setprofile(self.previous[1])
            if unwatched and self.hit is None:
                self.hit = ("unwatched", "")
        self._warnings.__exit__(*exc)
        if self.rule is not None:
            self.rule.warned += [f"{w.category.__name__}: {str(w.message).strip().splitlines()[0][:120]}"
                                 for w in self.caught if str(w.message).strip()]
        if self.hit is not None:
            raise ReferenceCalled(_sentence(*self.hit)) from None


def call_student(student: Callable[..., Any], *args: Any, case: str = "", exempt: Iterable[Any] = (),
                 passthrough: tuple[type[BaseException], ...] = (), **kwargs: Any) -> Any:
    """Call the student's code; turn its exceptions into one readable sentence.

    Inside a registered check the call runs under :class:`student_code` (the exercise's reference out of
    reach). ``passthrough`` exceptions reach the check unchanged (it has its own sentence for them).
    """
    __tracebackhide__ = True
    name = _name_of(student)
    try:
        with student_code(*args, *kwargs.values(), exempt=exempt):
            return student(*args, **kwargs)
    except NotImplementedError as stub:
        raise NotAttempted(not_attempted_message(str(stub) or f"{name} is not written yet")) from None
    except CheckFailed:
        raise
    except passthrough:
        raise
    except Exception as error:  # noqa: BLE001 -- any student error is reported, briefly
        where = f" on {case}" if case else ""
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        message = f"{name} raised {type(error).__name__}{where}"
        message += f": {first_line[:200]}" if first_line else "."
        raise StudentCodeError(message) from None


def require_tensor(value: Any, what: str, *, shape: tuple[int, ...] | torch.Size | None = None) -> torch.Tensor:
    """Fail unless ``value`` is a tensor (of ``shape``, when given)."""
    __tracebackhide__ = True
    if not isinstance(value, torch.Tensor):
        fail(f"{what} should be a torch.Tensor, but it is a {type(value).__name__}.")
    if shape is not None and tuple(value.shape) != tuple(shape):
        fail(f"{what} has shape {tuple(value.shape)}, but it should have shape {tuple(shape)}.")
    return value


def close(a: torch.Tensor, b: torch.Tensor, *, atol: float = 1e-5, rtol: float = 1e-4) -> bool:
    """Whether two tensors agree (same shape, NaNs in the same places, values within tolerance)."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape:
        return False
    a64, b64 = a.detach().to(torch.float64).cpu(), b.detach().to(torch.float64).cpu()
    return bool(torch.allclose(a64, b64, atol=atol, rtol=rtol, equal_nan=True))


def diagnose(actual: torch.Tensor, wrong_answers: Mapping[str, Callable[[], torch.Tensor]],
             *, atol: float = 1e-5, rtol: float = 1e-4) -> str | None:
    """The description of the first known wrong answer that ``actual`` reproduces, if any.

    ``wrong_answers`` maps a sentence ("you summed instead of averaging") to a zero-argument function
    computing what that mistake returns on the current case.
    """
    for sentence, compute in wrong_answers.items():
        try:
            expected_if_wrong = compute()
        except Exception:  # noqa: BLE001 -- a diagnosis that cannot be computed simply does not apply
            continue
        if close(actual, expected_if_wrong, atol=atol, rtol=rtol):
            return sentence
    return None


def compare(actual: Any, expected: torch.Tensor, *, what: str, case: str,
            wrong_answers: Mapping[str, Callable[[], torch.Tensor]] | None = None,
            atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """Fail with one sentence unless ``actual`` matches ``expected`` on this case."""
    __tracebackhide__ = True
    require_tensor(actual, what)
    if actual.shape != expected.shape:
        fail(f"{what} has shape {tuple(actual.shape)} on {case}, but it should have shape "
             f"{tuple(expected.shape)}.")
    if close(actual, expected, atol=atol, rtol=rtol):
        return
    if not torch.isfinite(actual).all() and torch.isfinite(expected).all():
        fail(f"{what} contains inf or nan on {case}; the reference is finite there "
             f"(is your computation numerically stable?).")
    reason = diagnose(actual, wrong_answers or {}, atol=atol, rtol=rtol)
    if reason:
        fail(f"{what} is wrong on {case}: {reason}.")
    worst = (actual.detach().double().cpu() - expected.detach().double().cpu()).abs().nan_to_num(float("inf")).max()
    fail(f"{what} differs from the reference on {case} (largest difference {worst.item():.3g}).")


def passed(check_name: str, detail: str) -> None:
    """Print the one friendly line of a passed check."""
    print(f"✅ {check_name} passed: {detail}")


def accepts_keyword(fn: Callable[..., Any], keyword: str) -> bool:
    """Whether ``fn`` can be called with ``keyword=...``."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return keyword in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
