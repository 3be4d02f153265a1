"""The check framework: run a student's code, compare with the reference, name the mistake in one sentence.

Every lesson's checks (the other modules of this package) are built from these pieces; see
``course_lib/checks/__init__.py`` for what a check promises.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
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


def call_student(student: Callable[..., Any], *args: Any, case: str = "", **kwargs: Any) -> Any:
    """Call the student's code; turn its exceptions into one readable sentence."""
    __tracebackhide__ = True
    name = _name_of(student)
    try:
        return student(*args, **kwargs)
    except NotImplementedError as stub:
        raise NotAttempted(not_attempted_message(str(stub) or f"{name} is not written yet")) from None
    except CheckFailed:
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
