"""Exercise checks: run a student's code against the reference and say, in one sentence, what is wrong.

How exercises work is shown in notebooks/00_setup.ipynb ("How an exercise looks").

A check
* calls the student's function or class on several cases (edge cases included),
* prints one friendly line when everything agrees with the reference,
* raises :class:`CheckFailed` (an ``AssertionError``) with one sentence naming the mistake otherwise,
* reports an exception raised inside the student's code briefly, as such,
* reports an untouched stub (``raise NotImplementedError``) as :class:`NotAttempted`.

Wrong answers are named by *diagnosis*: the check computes what the common wrong answers would
return (summing instead of averaging, the wrong axis, a missing scale ...) and, if the student's
output matches one of them, says so. Every check has tests that feed it those wrong answers
(tests/test_checks*.py).

The framework is the first part of this file; the checks of each lesson follow, grouped by notebook.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch

# ----------------------------------------------------------------------------------------------
# The framework
# ----------------------------------------------------------------------------------------------


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


HINTS: dict[str, str] = {}


def register_hint(exercise: str, text: str) -> None:
    """Register the one-line hint that ``hint(exercise)`` prints."""
    HINTS[exercise] = text


def hint(exercise: str) -> None:
    """Print the one-line hint for an exercise, e.g. ``hint("00.1")``."""
    if exercise not in HINTS:
        known = ", ".join(sorted(HINTS)) or "none registered"
        raise KeyError(f"No hint for exercise {exercise!r}; exercises with hints: {known}.")
    print(f"Hint for exercise {exercise}: {HINTS[exercise]}")


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


# ----------------------------------------------------------------------------------------------
# 00_setup: the warm-up exercise
# ----------------------------------------------------------------------------------------------

register_hint("00.1", "Square the differences element by element, then take the mean of all of them: "
                      "((pred - target) ** 2).mean().")


def check_mse(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """Warm-up: ``fn(pred, target)`` returns the mean squared error, a 0-d tensor."""
    __tracebackhide__ = True
    generator = torch.Generator().manual_seed(0)
    cases = {
        "a 1-D example": (torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 0.0, 6.0])),
        "a (4, 3) batch": (torch.randn(4, 3, generator=generator), torch.randn(4, 3, generator=generator)),
        "a perfect prediction": (torch.ones(5), torch.ones(5)),
    }
    for case, (pred, target) in cases.items():
        result = call_student(fn, pred.clone(), target.clone(), case=case)
        expected = ((pred - target) ** 2).mean()
        result = require_tensor(result, "your mse")
        if result.dim() != 0:
            fail(f"your mse returns shape {tuple(result.shape)} on {case}; it should return one number "
                 f"(a 0-d tensor): average over every element, not over one axis.")
        compare(result, expected, what="your mse", case=case, wrong_answers={
            "you summed the squared errors instead of averaging them": lambda: ((pred - target) ** 2).sum(),
            "you took the square root (that is the RMSE, not the MSE)": lambda: ((pred - target) ** 2).mean().sqrt(),
            "you averaged absolute errors instead of squared ones": lambda: (pred - target).abs().mean(),
            "you squared the mean error instead of averaging the squared errors": lambda: (pred - target).mean() ** 2,
        })
    passed("check_mse", f"your mean squared error matches the reference on {len(cases)} cases.")


# ----------------------------------------------------------------------------------------------
# ---- 01_attention: stable softmax, the causal mask, scaled dot-product attention with a mask
# ----------------------------------------------------------------------------------------------

register_hint("01.1", "Subtract the maximum along `dim` first (z - z.amax(dim=dim, keepdim=True)), exponentiate, "
                      "then divide by the sum along the same `dim` with keepdim=True so that it broadcasts.")
register_hint("01.2", "Row i is query i and column j is key j; query i may see keys j <= i, which is the lower "
                      "triangle including the diagonal: torch.ones(T, T, dtype=torch.bool).tril().")
register_hint("01.3", "scores = q @ k.transpose(-2, -1) / math.sqrt(d_k); where the mask is False set the score to "
                      "-inf (scores.masked_fill(~mask, float('-inf'))); weights = softmax over the last axis (the "
                      "keys); out = weights @ v.")


def _softmax64(z: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.softmax(z.double(), dim=dim)


def check_softmax(fn: Callable[..., torch.Tensor]) -> None:
    """Exercise 01.1: ``fn(z, dim=-1)`` returns softmax(z) along ``dim``, stable for large logits."""
    __tracebackhide__ = True
    generator = torch.Generator().manual_seed(0)
    cases = [
        ("the vector [1, 2, 3]", torch.tensor([1.0, 2.0, 3.0]), -1),
        ("a (3, 5) batch of rows", torch.randn(3, 5, generator=generator), -1),
        ("a (2, 3, 4) tensor", 3 * torch.randn(2, 3, 4, generator=generator), -1),
        ("large logits [[1000, 999, 998], [-1000, -1001, -1002]]",
         torch.tensor([[1000.0, 999.0, 998.0], [-1000.0, -1001.0, -1002.0]]), -1),
        ("a (4, 3) tensor with dim=0", torch.randn(4, 3, generator=generator), 0),
    ]
    for case, z, dim in cases:
        result = require_tensor(call_student(fn, z.clone(), dim=dim, case=case), "your softmax")
        expected = _softmax64(z, dim).float()
        if result.shape != z.shape:
            fail(f"your softmax returns shape {tuple(result.shape)} on {case}, but it should keep the input's "
                 f"shape {tuple(z.shape)} (did you reduce without keepdim=True?).")
        if close(result, expected):
            continue
        if not torch.isfinite(result).all():
            fail(f"your softmax gives inf or nan on {case}: exp overflows (exp(1000) = inf) or underflows to "
                 f"0/0; subtract the maximum along `dim` (keepdim=True) before exponentiating, which does "
                 f"not change the result.")
        z64 = z.double()
        other_axes = [d for d in range(z.dim()) if d != dim % z.dim()]
        wrong: dict[str, Callable[[], torch.Tensor]] = {}
        for axis in other_axes:
            if dim == 0:
                wrong["you normalised over the last axis although dim=0 was asked: use the `dim` argument in "
                      "every reduction (amax and sum)"] = lambda axis=axis: _softmax64(z, axis)
            else:
                wrong[f"you normalised over axis {axis}; softmax must sum to 1 along dim={dim} (the last "
                      f"axis)"] = lambda axis=axis: _softmax64(z, axis)
        wrong.update({
            "you divided by the sum over all elements instead of the sum along `dim` (use "
            "sum(dim=dim, keepdim=True))": lambda: (z64 - z64.max()).exp() / (z64 - z64.max()).exp().sum(),
            "you divided by the sum over all elements instead of the sum along `dim` (subtract the max and "
            "sum along `dim` with keepdim=True)":
                lambda: (z64 - z64.amax(dim, True)).exp() / (z64 - z64.amax(dim, True)).exp().sum(),
            "you returned exp(z) without dividing by the sum": lambda: z64.exp(),
            "you returned exp(z - max) without dividing by the sum": lambda: (z64 - z64.amax(dim, True)).exp(),
            "you returned log-softmax (the log of the probabilities) instead of softmax":
                lambda: torch.log_softmax(z64, dim=dim),
        })
        reason = diagnose(result, wrong)
        if reason:
            fail(f"your softmax is wrong on {case}: {reason}.")
        sums = result.detach().double().sum(dim=dim)
        if not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
            fail(f"your softmax does not sum to 1 along dim={dim} on {case}.")
        compare(result, expected, what="your softmax", case=case)
    passed("check_softmax", f"your softmax matches torch.softmax on {len(cases)} cases, large logits included.")


def check_causal_mask(fn: Callable[[int], torch.Tensor]) -> None:
    """Exercise 01.2: ``fn(T)`` returns the (T, T) bool causal mask, True = may attend (lower triangle)."""
    __tracebackhide__ = True
    for T in (4, 7, 1):
        case = f"T={T}"
        result = require_tensor(call_student(fn, T, case=case), "your causal mask")
        expected = torch.ones(T, T, dtype=torch.bool).tril()
        if tuple(result.shape) != (T, T):
            fail(f"your causal mask has shape {tuple(result.shape)} for {case}, but it should be ({T}, {T}): "
                 f"one row per query, one column per key.")
        if result.dtype != torch.bool:
            right_pattern = torch.equal(result.detach().cpu() != 0, expected)
            additive = result.is_floating_point() and torch.equal(
                result.detach().cpu(), torch.zeros(T, T).masked_fill(~expected, float("-inf")))
            if additive:
                fail(f"your causal mask is an additive float mask (0 / -inf); this course's masks are bool "
                     f"with True = may attend: return the lower triangle as dtype torch.bool.")
            detail = "has the right pattern but" if right_pattern else "is not bool: it"
            fail(f"your causal mask {detail} has dtype {result.dtype}; attention expects a bool mask "
                 f"(True = may attend), so build it with dtype=torch.bool or call .bool().")
        result = result.detach().cpu()
        if torch.equal(result, expected):
            continue
        wrong = {
            "it is upper-triangular; row i is query i and column j is key j, and query i may attend to keys "
            "j <= i, which is the lower triangle (tril)": expected.T.clone(),
            "it excludes the diagonal; a position may attend to itself (use tril(), not tril(-1))":
                expected.tril(-1),
            "it is inverted; True must mean 'may attend', so the allowed keys j <= i must be True":
                ~expected,
            "it allows every key; query i must not see the later keys j > i": torch.ones(T, T, dtype=torch.bool),
        }
        for sentence, pattern in wrong.items():
            if torch.equal(result, pattern):
                fail(f"your causal mask is wrong for {case}: {sentence}.")
        fail(f"your causal mask differs from the causal mask at {int((result != expected).sum())} positions "
             f"for {case}; row i (query i) should be True exactly in columns j <= i.")
    passed("check_causal_mask", "your mask is the bool lower triangle (True = may attend) for T = 4, 7 and 1.")


def _masked_softmax64(scores: torch.Tensor, mask: torch.Tensor | None, dim: int = -1) -> torch.Tensor:
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=dim)


def _attention_wrong_weights(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             mask: torch.Tensor | None) -> dict[str, Callable[[], torch.Tensor]]:
    """What the common mistakes of exercise 01.3 give as weights on one case (float64)."""
    q64, k64 = q.double(), k.double()
    d_k, d_v = q.shape[-1], v.shape[-1]
    s = q64 @ k64.transpose(-2, -1)
    right = _masked_softmax64(s / d_k ** 0.5, mask)
    wrong: dict[str, Callable[[], torch.Tensor]] = {
        "they are transposed; weights[..., i, j] is how much query i attends to key j, shape (..., T_q, T_k)":
            lambda: right.transpose(-2, -1),
        "the scores are not scaled by 1/√d_k": lambda: _masked_softmax64(s, mask),
        "you divided the scores by d_k instead of √d_k": lambda: _masked_softmax64(s / d_k, mask),
        "you took the softmax over the queries (dim=-2); each row (one query) must sum to 1 over the keys, "
        "dim=-1": lambda: _masked_softmax64(s / d_k ** 0.5, mask, dim=-2),
    }
    if q.dim() > 2:
        wrong["you took the softmax over the first axis (dim=0); take it over the keys, dim=-1"] = \
            lambda: _masked_softmax64(s / d_k ** 0.5, mask, dim=0)
    if d_v != d_k:
        wrong["you scaled by 1/√d_v; the scale uses d_k, the size of the queries and keys"] = \
            lambda: _masked_softmax64(s / d_v ** 0.5, mask)
    if mask is not None:
        wrong.update({
            "the mask is ignored; where it is False the score must become -inf before the softmax":
                lambda: torch.softmax(s / d_k ** 0.5, dim=-1),
            "the mask is inverted; in this course True means 'may attend', so fill the scores where the mask "
            "is False (masked_fill(~mask, -inf))": lambda: _masked_softmax64(s / d_k ** 0.5, ~mask),
            "you zeroed the masked weights after the softmax without renormalising; set the masked scores to "
            "-inf before the softmax instead": lambda: torch.softmax(s / d_k ** 0.5, dim=-1) * mask,
            "you set the masked scores to 0, but exp(0) = 1 still gives those keys weight; set them to -inf":
                lambda: torch.softmax((s / d_k ** 0.5).masked_fill(~mask, 0.0), dim=-1),
        })
    return wrong


def check_attention(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Exercise 01.3: ``fn(q, k, v, mask=None)`` returns ``(out, weights)`` of softmax(QKᵀ/√d_k)V.

    The mask is bool, True = may attend, broadcastable to (..., T_q, T_k). No case has a fully masked
    row, so -inf and a large negative fill value are both accepted.
    """
    __tracebackhide__ = True
    g = torch.Generator().manual_seed(0)

    def r(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=g)

    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    key_lengths = torch.tensor([5, 3])
    padding = (torch.arange(6)[None, :] < key_lengths[:, None])[:, None, :]          # (2, 1, 6)
    cases = [  # (case, q, k, v, mask, tolerance)
        ("one (T_q=3, T_k=4) example with d_k=8, d_v=5", r(3, 8), r(4, 8), r(4, 5), None, 1e-5),
        ("a batch of 2 with 3 heads (T_q=5, T_k=6, d_k=16, d_v=4)",
         r(2, 3, 5, 16), r(2, 3, 6, 16), r(2, 3, 6, 4), None, 1e-5),
        ("a batch of 2 with a (5, 5) causal mask", r(2, 5, 8), r(2, 5, 8), r(2, 5, 3), causal, 1e-5),
        ("a batch of 2 with a (2, 1, 6) key-padding mask (key lengths 5 and 3, T_q=4)",
         r(2, 4, 8), r(2, 6, 8), r(2, 6, 2), padding, 1e-5),
        ("large logits (q and k scaled by 10)", r(2, 4, 8, scale=10.0), r(2, 6, 8, scale=10.0), r(2, 6, 3),
         None, 1e-4),
    ]
    for number, (case, q, k, v, mask, tol) in enumerate(cases):
        args = (q.clone(), k.clone(), v.clone()) + (() if mask is None else (mask.clone(),))
        try:
            result = call_student(fn, *args, case=case)
        except StudentCodeError as error:
            if number > 0 and q.dim() > 2:
                fail(f"{error} -- it works on a single (T, d) example but not with batch/head axes in front: "
                     f"transpose only the last two axes (k.transpose(-2, -1)) and softmax over dim=-1.")
            raise
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            fail(f"your attention should return a pair (out, weights), but on {case} it returned a "
                 f"{type(result).__name__}.")
        out, weights = result
        require_tensor(weights, "your weights")
        require_tensor(out, "your out")

        expected_w = _masked_softmax64(q.double() @ k.double().transpose(-2, -1) / q.shape[-1] ** 0.5, mask)
        expected_out = expected_w @ v.double()
        T_q, T_k = q.shape[-2], k.shape[-2]
        if weights.shape != expected_w.shape:
            if weights.shape[-2:] == (T_k, T_q) and T_q != T_k:
                fail(f"your weights have shape {tuple(weights.shape)} on {case}: they are transposed; "
                     f"weights[..., i, j] is how much query i attends to key j, shape (..., T_q, T_k).")
            if q.dim() > 2:
                fail(f"your weights have shape {tuple(weights.shape)} on {case}, but they should have shape "
                     f"{tuple(expected_w.shape)}: keep the batch/head axes in front and transpose only the "
                     f"last two axes of k.")
            fail(f"your weights have shape {tuple(weights.shape)} on {case}, but they should have shape "
                 f"{tuple(expected_w.shape)}, (..., T_q, T_k).")
        if not close(weights, expected_w, atol=tol, rtol=tol):
            reason = diagnose(weights, _attention_wrong_weights(q, k, v, mask), atol=tol, rtol=tol)
            if reason:
                fail(f"your weights are wrong on {case}: {reason}.")
            w = weights.detach().double().cpu()
            if mask is not None:
                allowed = mask.expand_as(w)
                if w[~allowed].abs().max() > 1e-4:
                    if w[~allowed].sum() > w[allowed].sum():
                        fail(f"your weights are wrong on {case}: the mask is inverted; in this course True "
                             f"means 'may attend', so fill the scores where the mask is False.")
                    fail(f"your weights are wrong on {case}: keys where the mask is False get nonzero weight; "
                         f"set their scores to -inf before the softmax.")
            if not torch.isfinite(w).all():
                fail(f"your weights contain inf or nan on {case}; the reference is finite there (is your "
                     f"softmax numerically stable? torch.softmax is).")
            sums = w.sum(-1)
            if not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
                fail(f"your weights do not sum to 1 over the keys (the last axis) on {case}.")
            worst = (w - expected_w).abs().max().item()
            fail(f"your weights differ from softmax(QKᵀ/√d_k) on {case} (largest difference {worst:.3g}).")
        compare(out, expected_out, what="your out", case=case, atol=tol, rtol=tol, wrong_answers={
            "it should be weights @ v, one weighted average of the values per query":
                lambda: expected_w.transpose(-2, -1) @ v.double(),
            "you multiplied the weights by k instead of v": lambda: expected_w @ k.double(),
        })
    passed("check_attention", f"out and weights match softmax(QKᵀ/√d_k)V on {len(cases)} cases "
                              f"(batch and head axes, causal and padding masks, large logits).")


# ----------------------------------------------------------------------------------------------
# ---- 02_cross_entropy: the cross-entropy gradient, a stable log-softmax, central differences
# ----------------------------------------------------------------------------------------------

register_hint("02.1", "p = torch.softmax(logits, dim=1); subtract 1 at each row's target class "
                      "(p - F.one_hot(targets, C)), then divide by N = logits.shape[0], the number of rows.")
register_hint("02.2", "m = z.max(dim=-1, keepdim=True).values; return (z - m) - torch.log(torch.exp(z - m)"
                      ".sum(dim=-1, keepdim=True)). Every exp is then at most exp(0) = 1.")
register_hint("02.3", "Work on g = torch.zeros_like(x) and xc = x.clone(); for each index i of xc.view(-1): "
                      "set it to old + eps, evaluate f, set it to old - eps, evaluate f, put old back; "
                      "g.view(-1)[i] = (f_plus - f_minus) / (2 * eps).")


def _ce02_onehot(targets: torch.Tensor, num_classes: int, like: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(targets, num_classes).to(like.dtype)


def check_cross_entropy_grad(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """Exercise 02.1: ``fn(logits, targets)`` returns d(mean cross-entropy)/d(logits) = (softmax(z) - onehot(y)) / N."""
    __tracebackhide__ = True
    generator = torch.Generator().manual_seed(2)
    cases = {
        "a (4, 3) batch": (torch.randn(4, 3, generator=generator) * 2, torch.tensor([0, 2, 1, 2])),
        "a (2, 5) batch": (torch.randn(2, 5, generator=generator) * 2, torch.tensor([4, 1])),
        "a square (3, 3) batch": (torch.randn(3, 3, generator=generator) * 2, torch.tensor([1, 2, 2])),
        "logits around ±1000": (torch.tensor([[1000.0, 0.0, -1000.0, 500.0], [1000.0, 1000.0, 999.0, -1000.0],
                                             [-1000.0, -1001.0, -1002.0, -1003.0]]), torch.tensor([1, 2, 0])),
        "a single example with C=2": (torch.tensor([[0.5, -1.5]]), torch.tensor([1])),
        "float64 logits (5, 7)": (torch.randn(5, 7, generator=generator, dtype=torch.float64) * 5,
                                  torch.tensor([6, 0, 3, 3, 1])),
    }
    for case, (z, y) in cases.items():
        n, c = z.shape
        result = call_student(fn, z.clone(), y.clone(), case=case)
        result = require_tensor(result, "your gradient")
        p = torch.softmax(z.double(), dim=1)
        onehot = _ce02_onehot(y, c, p)
        expected = (p - onehot) / n
        if result.numel() == 1 and expected.numel() > 1:
            loss = torch.nn.functional.cross_entropy(z.double(), y)
            looks_like = " (it equals the loss)" if close(result.reshape(()), loss) else ""
            fail(f"your function returns one number on {case}{looks_like}; it should return the gradient "
                 f"of the loss with respect to the logits, a tensor of shape {tuple(z.shape)} like the logits.")
        if result.shape == expected.shape and not torch.isfinite(result).all() and z.abs().max() >= 500:
            fail(f"your gradient contains nan or inf on {case}: exp(1000) overflows to inf; subtract each "
                 f"row's maximum before exp (softmax(z) = softmax(z - max z)) or use torch.softmax.")
        compare(result, expected, what="your gradient", case=case, wrong_answers={
            "you forgot to divide by N; the loss is the mean over the N rows, so the gradient is "
            "(softmax(z) - onehot(y)) / N": lambda: p - onehot,
            "the sign is flipped; the gradient is softmax(z) - onehot(y), not onehot(y) - softmax(z)":
                lambda: (onehot - p) / n,
            "the sign is flipped (it is softmax(z) - onehot(y)) and the division by N is missing":
                lambda: onehot - p,
            "you used the logits z where softmax(z) belongs": lambda: (z.double() - onehot) / n,
            "you used the logits z where softmax(z) belongs, and forgot to divide by N": lambda: z.double() - onehot,
            "you used log-softmax where softmax(z) belongs": lambda: (torch.log_softmax(z.double(), 1) - onehot) / n,
            "you divided by C, the number of classes, instead of by N, the number of rows":
                lambda: (p - onehot) / c,
            "you divided by N*C (a .mean() over every entry?); divide by N, the number of rows, only":
                lambda: (p - onehot) / (n * c),
            "you took the softmax over the batch axis (dim=0); it goes over the classes of each row (dim=1)":
                lambda: (torch.softmax(z.double(), dim=0) - onehot) / n,
            "your one-hot is transposed; row i needs its 1 in column targets[i]": lambda: (p - onehot.T) / n,
            "your one-hot rows mark the wrong class; row i needs its 1 in column targets[i]":
                lambda: (p - _ce02_onehot((y + 1) % c, c, p)) / n,
            "your one-hot rows mark the wrong class (off by one?); row i needs its 1 in column targets[i]":
                lambda: (p - _ce02_onehot((y - 1) % c, c, p)) / n,
            "you forgot to subtract onehot(y), the 1 at each row's target class": lambda: p / n,
            "you subtracted 1 from every entry; subtract it only at each row's target class":
                lambda: (p - 1) / n,
        })
    passed("check_cross_entropy_grad", f"your gradient equals (softmax(z) - onehot(y)) / N on {len(cases)} "
                                       f"cases (huge logits, C=2, float64 included).")


def check_log_softmax(fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Exercise 02.2: ``fn(z)`` returns log(softmax(z)) over the last axis, stably (z - logsumexp(z))."""
    __tracebackhide__ = True
    generator = torch.Generator().manual_seed(3)
    cases = {
        "a vector of 4 logits": torch.tensor([2.0, 1.0, 0.1, -1.0]),
        "a (3, 5) batch": torch.randn(3, 5, generator=generator) * 3,
        "a (2, 3, 4) batch": torch.randn(2, 3, 4, generator=generator) * 3,
        "logits around ±1000": torch.tensor([[1000.0, 0.0, -1000.0], [1000.0, 1000.0, 999.0]], dtype=torch.float64),
        "logits 1000 apart": torch.tensor([[0.0, -1000.0], [5.0, -995.0]], dtype=torch.float64),
        "float64 logits (4, 6)": torch.randn(4, 6, generator=generator, dtype=torch.float64) * 10,
    }
    for case, z in cases.items():
        result = call_student(fn, z.clone(), case=case)
        result = require_tensor(result, "your log_softmax")
        expected = torch.log_softmax(z.double(), dim=-1)
        if result.shape == expected.shape and not torch.isfinite(result).all() and z.abs().max() >= 500:
            if torch.isnan(result).any():
                fail(f"your log_softmax gives nan on {case}: exp(1000) overflows to inf (and inf/inf is nan); "
                     f"subtract each row's maximum from z before taking exp.")
            fail(f"your log_softmax gives -inf on {case}, where the answer is a finite number like -1000: "
                 f"softmax underflows to exactly 0 there and log(0) = -inf, so do not take the log of a "
                 f"softmax; compute z - logsumexp(z) instead.")
        m = z.double().amax(dim=-1, keepdim=True)
        compare(result, expected, what="your log_softmax", case=case, wrong_answers={
            "you normalised over the first axis (dim=0); log-softmax goes over the last axis (dim=-1)":
                lambda: torch.log_softmax(z.double(), dim=0),
            "you returned softmax(z), not its logarithm": lambda: torch.softmax(z.double(), dim=-1),
            "you subtracted the maximum but not the log-sum-exp; log_softmax(z) = z - logsumexp(z)":
                lambda: z.double() - m,
            "you forgot to add the maximum back; logsumexp(z) = m + log(sum(exp(z - m)))":
                lambda: z.double() - torch.log(torch.exp(z.double() - m).sum(dim=-1, keepdim=True)),
            "you subtracted log(sum(z)) instead of log(sum(exp(z)))":
                lambda: z.double() - torch.log(z.double().sum(dim=-1, keepdim=True)),
        })
    passed("check_log_softmax", f"your log_softmax matches torch.log_softmax on {len(cases)} cases, "
                                f"logits of ±1000 included.")


def _ce02_central(f: Callable[[torch.Tensor], Any], x: torch.Tensor, eps: float, *, forward: int = 0,
                  all_at_once: bool = False) -> torch.Tensor:
    """Reference finite differences in float64 (and the wrong variants the check diagnoses)."""
    x = x.detach().double().clone()
    flat, grad = x.view(-1), torch.empty(x.numel(), dtype=torch.float64)

    def value(t: torch.Tensor) -> float:
        return float(f(t))

    f0 = value(x)
    if all_at_once:
        slope = (value(x + eps) - value(x - eps)) / (2 * eps)
        return torch.full_like(x, slope)
    for i in range(flat.numel()):
        old = flat[i].item()
        flat[i] = old + eps
        f_plus = value(x)
        flat[i] = old - eps
        f_minus = value(x)
        flat[i] = old
        grad[i] = {0: (f_plus - f_minus) / (2 * eps), 1: (f_plus - f0) / eps, -1: (f0 - f_minus) / eps}[forward]
    return grad.view_as(x)


def check_numerical_grad(fn: Callable[..., torch.Tensor]) -> None:
    """Exercise 02.3: ``fn(f, x, eps)`` returns the central-difference gradient of scalar ``f`` at ``x``."""
    __tracebackhide__ = True
    eps = 1e-3  # large on purpose: then forward differences are off by ~1e-3 and cannot pass
    targets = torch.tensor([0, 2, 1])
    cases = {
        "f(x) = sum(x**3) at x = [1, -2, 0.5]": (lambda t: (t ** 3).sum(),
                                                 torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)),
        "f(x) = logsumexp of a (2, 3) x": (lambda t: torch.logsumexp(t.reshape(-1), 0),
                                           torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5]], dtype=torch.float64)),
        "the cross-entropy of (3, 4) logits": (
            lambda t: torch.nn.functional.cross_entropy(t, targets),
            torch.randn(3, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2),
    }
    for case, (f, x) in cases.items():
        x_given = x.clone()
        result = call_student(fn, f, x_given, eps, case=case)
        if not torch.equal(x_given, x):
            fail(f"your function changed x on {case}; after nudging an entry put its old value back "
                 f"(or nudge a copy, x.clone()).")
        result = require_tensor(result, "your gradient")
        if result.shape == x.shape and result.dtype != x.dtype:
            fail(f"your gradient has dtype {result.dtype} on {case}, but x is {x.dtype}; create it with "
                 f"torch.zeros_like(x) so no precision is lost (float32 keeps only ~7 digits).")
        expected = _ce02_central(f, x, eps)
        compare(result, expected, what="your gradient", case=case, atol=1e-9, rtol=1e-7, wrong_answers={
            "you divided by eps instead of 2*eps; the two points x+eps and x-eps are 2*eps apart":
                lambda: 2 * expected,
            "you divided by 2*eps*eps; divide the difference by 2*eps only": lambda: expected / eps,
            "you used the forward difference (f(x+eps) - f(x)) / eps; the central difference "
            "(f(x+eps) - f(x-eps)) / (2*eps) is far more accurate (error ~eps² instead of ~eps)":
                lambda: _ce02_central(f, x, eps, forward=1),
            "you used the backward difference (f(x) - f(x-eps)) / eps; the central difference "
            "(f(x+eps) - f(x-eps)) / (2*eps) is far more accurate (error ~eps² instead of ~eps)":
                lambda: _ce02_central(f, x, eps, forward=-1),
            "the sign is flipped; it is f(x+eps) - f(x-eps), not f(x-eps) - f(x+eps)": lambda: -expected,
            "you nudged every entry of x at once; nudge one entry at a time (x + eps*e_i) and "
            "put it back before the next": lambda: _ce02_central(f, x, eps, all_at_once=True),
        })
    passed("check_numerical_grad", f"your central differences match the reference on {len(cases)} "
                                   f"functions, to within rounding.")


# ----------------------------------------------------------------------------------------------
# ---- 07_lora: the LoRA forward pass, a LoRALinear layer, injecting LoRA into a model
# ----------------------------------------------------------------------------------------------

register_hint("07.1", "h = x @ W0.T + (alpha / r) * (x @ A.T) @ B.T: A (r, in) maps x down to r numbers, "
                      "B (out, r) maps them back up, and only that branch is scaled by alpha / r.")
register_hint("07.2", "Keep `base` and freeze its parameters; lora_A = nn.Parameter (r, in) filled by "
                      "nn.init.kaiming_uniform_(a=math.sqrt(5)), lora_B = nn.Parameter(torch.zeros(out, r)); "
                      "forward = base(x) + (alpha/r) * x @ A.T @ B.T unless merged; merge() adds (alpha/r) * B @ A "
                      "to base.weight once (remember it in self.merged), unmerge() subtracts it.")
register_hint("07.3", "Freeze every parameter first; then for name, module in list(model.named_modules()): if it is "
                      "an nn.Linear and name == t or name.endswith('.' + t) for a target t, replace it with "
                      "setattr(model.get_submodule(parent_name), last_name, LoRALinear(module, r, alpha)), "
                      "where parent_name, _, last_name = name.rpartition('.').")


def _lora_wrong_scalings(r: float, alpha: float) -> dict[str, float]:
    return {"your scaling is r/alpha; it should be alpha/r": r / alpha,
            "your scaling is alpha; divide it by r (the scaling is alpha/r)": alpha,
            "you left out the scaling alpha/r of the LoRA branch": 1.0,
            "your scaling is alpha/sqrt(r) (that is rsLoRA); here use alpha/r as in the LoRA paper": alpha / r ** 0.5}


def check_lora_forward(fn: Callable[..., torch.Tensor]) -> None:
    """``fn(x, W0, A, B, alpha, r)`` returns h = W0 x + (alpha/r) B A x for rows x (Hu et al. 2021, Eq. 3)."""
    __tracebackhide__ = True
    g = torch.Generator().manual_seed(7)
    n_in, n_out = 6, 5

    def make(shape: tuple[int, ...], r: int, zero_b: bool = False):
        x = torch.randn(*shape, n_in, generator=g)
        w0 = torch.randn(n_out, n_in, generator=g)
        a = torch.randn(r, n_in, generator=g)
        b = torch.zeros(n_out, r) if zero_b else torch.randn(n_out, r, generator=g)
        return x, w0, a, b

    cases = {"a batch of 4 vectors (r=2, alpha=8)": (make((4,), 2), 8.0, 2),
             "a (2, 3, in) batch of sequences (r=4, alpha=2)": (make((2, 3), 4), 2.0, 4),
             "one vector of shape (in,) (r=3, alpha=6)": (make((), 3), 6.0, 3),
             "B = 0, the starting point (r=2, alpha=16)": (make((4,), 2, zero_b=True), 16.0, 2)}
    for case, ((x, w0, a, b), alpha, r) in cases.items():
        result = call_student(fn, x.clone(), w0.clone(), a.clone(), b.clone(), alpha, r, case=case)
        base = x @ w0.T
        branch = x @ a.T @ b.T
        wrong = {sentence: (lambda s=s: base + s * branch) for sentence, s in _lora_wrong_scalings(r, alpha).items()}
        wrong["you scaled the whole output; only the LoRA branch BAx gets alpha/r"] = \
            lambda: (alpha / r) * (base + branch)
        wrong["you left out the pretrained part W0 x"] = lambda: (alpha / r) * branch
        wrong["you returned only W0 x and left out the LoRA branch"] = lambda: base
        compare(result, base + (alpha / r) * branch, what="your h", case=case, wrong_answers=wrong)
    passed("check_lora_forward", f"h = W0x + (alpha/r)·BAx matches the reference on {len(cases)} cases.")


def _lora_attr(layer: Any, name: str, shape: tuple[int, int]) -> torch.Tensor:
    __tracebackhide__ = True
    value = getattr(layer, name, None)
    if value is None:
        fail(f"your layer has no attribute {name}: store the two LoRA matrices as self.lora_A and self.lora_B.")
    if not isinstance(value, torch.nn.Parameter):
        fail(f"{name} is a {type(value).__name__}, not an nn.Parameter, so the optimiser would never see it: "
             f"wrap it, self.{name} = nn.Parameter(...).")
    return value


def _lora_try(method: Callable[[], Any], what: str) -> bool:
    """Call layer.merge()/unmerge() a second time: raising is an acceptable answer (returns False)."""
    try:
        method()
    except NotImplementedError:
        raise NotAttempted(not_attempted_message(f"{what} is not written yet")) from None
    except Exception:  # noqa: BLE001 -- refusing a second merge is fine
        return False
    return True


def check_lora_linear(cls: Callable[..., torch.nn.Module]) -> None:
    """``cls(base, r, alpha)`` wraps a frozen nn.Linear with lora_A (r, in), lora_B (out, r), merge(), unmerge()."""
    __tracebackhide__ = True
    import torch.nn.functional as F

    n_in, n_out = 7, 5
    with torch.random.fork_rng():
        for r, alpha in ((2, 8.0), (3, 1.5)):
            torch.manual_seed(r)
            case = f"r={r}, alpha={alpha} on nn.Linear({n_in}, {n_out})"
            s = alpha / r
            base = torch.nn.Linear(n_in, n_out)
            w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
            layer = call_student(cls, base, r, alpha, case=case)
            if not isinstance(layer, torch.nn.Module):
                fail(f"{_name_of(cls)}(base, r, alpha) should build an nn.Module, but it returned a "
                     f"{type(layer).__name__}.")
            a = _lora_attr(layer, "lora_A", (r, n_in))
            b = _lora_attr(layer, "lora_B", (n_out, r))
            if tuple(a.shape) == (n_in, r) and tuple(b.shape) == (r, n_out):
                fail(f"lora_A and lora_B have swapped shapes on {case}: A maps the input down, shape (r, in) = "
                     f"({r}, {n_in}), and B maps back up, shape (out, r) = ({n_out}, {r}).")
            if tuple(a.shape) != (r, n_in):
                fail(f"lora_A has shape {tuple(a.shape)} on {case}, but it should be (r, in_features) = ({r}, {n_in}).")
            if tuple(b.shape) != (n_out, r):
                fail(f"lora_B has shape {tuple(b.shape)} on {case}, but it should be (out_features, r) = ({n_out}, {r}).")
            if base.weight.requires_grad or base.bias.requires_grad:
                fail("the base layer is still trainable: freeze it (base.weight.requires_grad_(False), same for the "
                     "bias) so that only lora_A and lora_B learn.")
            if not (a.requires_grad and b.requires_grad):
                fail("lora_A and lora_B must be trainable (requires_grad=True).")
            n_trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
            if n_trainable != r * (n_in + n_out):
                fail(f"your layer trains {n_trainable} numbers, but LoRA trains only A and B, r·(in + out) = "
                     f"{r * (n_in + n_out)}: freeze everything that belongs to the pretrained layer.")
            x = torch.randn(3, 4, n_in)
            reference_base = F.linear(x, w0, b0)
            if torch.count_nonzero(b.detach()) != 0:
                fail("lora_B does not start at zero, so your layer changes the pretrained output before any training: "
                     "initialise B with zeros (and A randomly).")
            if torch.count_nonzero(a.detach()) == 0:
                fail("lora_A starts at zero as well as lora_B: then the gradients of A and B are both zero "
                     "(each is multiplied by the other) and LoRA can never learn; initialise A randomly "
                     "(nn.init.kaiming_uniform_(A, a=math.sqrt(5))).")
            y0 = call_student(layer, x, case=f"{case} at initialisation")
            compare(y0, reference_base, what="your layer's output at initialisation", case=case)
            if not y0.requires_grad:
                fail("your layer's output does not depend on lora_A and lora_B, so they can never be trained: "
                     "compute the LoRA branch from them (and not under torch.no_grad()).")
            # the gradient reaches B at the start (B = 0 but A is random)
            y0.square().sum().backward()
            if b.grad is None or torch.count_nonzero(b.grad) == 0:
                fail("at initialisation lora_B gets no gradient: the forward pass must use lora_A and lora_B "
                     "(the LoRA branch), not copies of them.")
            a.grad = b.grad = None
            # now give A and B values and check the formula
            gen = torch.Generator().manual_seed(10 + r)
            a_val, b_val = torch.randn(r, n_in, generator=gen), torch.randn(n_out, r, generator=gen)
            with torch.no_grad():
                a.copy_(a_val)
                b.copy_(b_val)
            branch = x @ a_val.T @ b_val.T
            expected = reference_base + s * branch
            y = call_student(layer, x, case=case)
            wrong = {sentence: (lambda k=k: reference_base + k * branch)
                     for sentence, k in _lora_wrong_scalings(r, alpha).items()}
            wrong["you scaled the whole output; only the LoRA branch gets alpha/r"] = lambda: s * (reference_base + branch)
            wrong["your forward ignores the LoRA branch (it returns base(x) only)"] = lambda: reference_base
            compare(y, expected, what="your layer's output", case=f"{case} with non-zero A and B", wrong_answers=wrong)
            # merge
            for method in ("merge", "unmerge"):
                if not callable(getattr(layer, method, None)):
                    fail(f"your layer has no method {method}(); write merge() (W0 += (alpha/r)·B@A) and unmerge() "
                         f"(W0 -= (alpha/r)·B@A).")
            delta = s * b_val @ a_val
            call_student(layer.merge, case=f"{case}: merge()")
            w = base.weight.detach()
            if not close(w, w0 + delta):
                for sentence, k in _lora_wrong_scalings(r, alpha).items():
                    if close(w, w0 + k * (b_val @ a_val)):
                        fail(f"merge() is wrong: {sentence}.")
                if close(w, w0):
                    fail("merge() did not change base.weight: add (alpha/r)·B@A to the base layer's weight in place "
                         "(inside torch.no_grad()).")
                fail("after merge() base.weight should be W0 + (alpha/r)·B@A, and it is not.")
            y_merged = call_student(layer, x, case=f"{case} after merge()")
            if close(y_merged, expected + s * branch):
                fail("after merge() your forward still adds the LoRA branch, so the update counts twice: once "
                     "merged, the layer must return base(x) only.")
            compare(y_merged, expected, what="your layer's output after merge()", case=case)
            if _lora_try(layer.merge, "merge()") and not close(base.weight.detach(), w0 + delta):
                fail("calling merge() twice added the update twice: remember that the layer is merged "
                     "(self.merged = True) and do nothing the second time.")
            call_student(layer.unmerge, case=f"{case}: unmerge()")
            if not close(base.weight.detach(), w0):
                fail("unmerge() did not restore the original weight W0: subtract exactly the (alpha/r)·B@A that "
                     "merge() added, and only if the layer is merged.")
            y_back = call_student(layer, x, case=f"{case} after unmerge()")
            if close(y_back, reference_base):
                fail("after unmerge() your forward no longer adds the LoRA branch: set the merged flag back.")
            compare(y_back, expected, what="your layer's output after unmerge()", case=case)
            if _lora_try(layer.unmerge, "unmerge()") and not close(base.weight.detach(), w0):
                fail("calling unmerge() on a layer that is not merged changed base.weight: only subtract the update "
                     "when the layer is merged.")
    passed("check_lora_linear", "shapes, B = 0 start, frozen base, scaling alpha/r, gradients, merge and unmerge "
                                "all match the reference on 2 layers.")


class _LoRAToyAttention(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.query, self.key, self.value, self.dense = (torch.nn.Linear(d, d) for _ in range(4))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.query(h) @ self.key(h).transpose(-2, -1) / h.shape[-1] ** 0.5, dim=-1)
        return h + self.dense(weights @ self.value(h))


class _LoRAToyBlock(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attention = _LoRAToyAttention(d)
        self.query_proj = torch.nn.Linear(d, d)  # matches "query" as a substring only
        self.ffn = torch.nn.Sequential(torch.nn.Linear(d, 2 * d), torch.nn.GELU(), torch.nn.Linear(2 * d, d))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.attention(h)
        return h + self.ffn(h) + 0.1 * self.query_proj(h)


class _LoRAToyModel(torch.nn.Module):
    """A small encoder with attention layers at several depths, used by check_apply_lora."""

    def __init__(self, d: int = 8, vocab: int = 11) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.layers = torch.nn.ModuleList([_LoRAToyBlock(d) for _ in range(2)])
        self.deep = torch.nn.Module()
        self.deep.inner = torch.nn.ModuleDict({"extra": _LoRAToyAttention(d)})
        self.head = torch.nn.Linear(d, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.layers:
            h = block(h)
        return self.head(self.deep.inner["extra"](h))


def check_apply_lora(fn: Callable[..., Any]) -> None:
    """``fn(model, target_modules, r, alpha)`` freezes ``model`` and wraps the matching nn.Linear layers in LoRA."""
    __tracebackhide__ = True
    import copy

    with torch.random.fork_rng():
        torch.manual_seed(0)
        ids = torch.randint(0, 11, (2, 5))
        for targets, r, alpha in ((["query", "value"], 2, 4.0), (["dense"], 1, 2.0)):
            case = f"target_modules={targets}, r={r}"
            original = _LoRAToyModel().eval()
            model = copy.deepcopy(original)
            linear_names = [n for n, m in original.named_modules() if isinstance(m, torch.nn.Linear)]
            wanted = [n for n in linear_names if n.rsplit(".", 1)[-1] in targets]
            returned = call_student(fn, model, targets, r, alpha, case=case)
            if isinstance(returned, torch.nn.Module):
                model = returned
            for name in linear_names:
                try:
                    module = model.get_submodule(name)
                except AttributeError:
                    module = None
                if module is None:
                    fail(f"after your apply_lora the model has no module {name!r} any more: replace a layer under "
                         f"the same name (setattr on its parent) and leave the others where they are.")
                is_lora = hasattr(module, "lora_A") and hasattr(module, "lora_B")
                if name in wanted and not is_lora:
                    if name.startswith("deep."):
                        fail(f"you missed {name!r} ({case}), which sits deeper in the model: walk all modules with "
                             f"model.named_modules(), not only the ones you know about.")
                    fail(f"you did not replace {name!r} ({case}): every nn.Linear whose name ends with "
                         f"'.' + a target should become a LoRA layer (set it on its parent with setattr).")
                if name not in wanted and is_lora:
                    fail(f"you replaced {name!r}, which does not match {targets}: compare the whole last part of the "
                         f"name (name == t or name.endswith('.' + t)), not a substring.")
                if is_lora and tuple(module.lora_A.shape)[0] != r:
                    fail(f"the LoRA layer at {name!r} has rank {tuple(module.lora_A.shape)[0]}, but r={r} was asked "
                         f"for: pass r and alpha on to LoRALinear.")
            trainable = [n for n, p in model.named_parameters() if p.requires_grad]
            extra = [n for n in trainable if not n.endswith(("lora_A", "lora_B"))]
            if extra:
                fail(f"you left {len(extra)} pretrained parameters trainable (e.g. {extra[0]!r}) on {case}: freeze every "
                     f"parameter (requires_grad_(False)) so that only lora_A and lora_B train.")
            n_expected = sum(r * (m.in_features + m.out_features) for n, m in original.named_modules() if n in wanted)
            n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            if n_trainable != n_expected:
                fail(f"your adapted model trains {n_trainable} numbers on {case}; the LoRA layers alone have "
                     f"{n_expected}.")
            with torch.no_grad():
                compare(call_student(model, ids, case=case), original(ids), what="the adapted model's output",
                        case=f"{case} before training (B = 0, so it must equal the original model)")
    passed("check_apply_lora", "the matching layers (nested ones too) and only those got LoRA, only lora_A and "
                               "lora_B train, and the model starts at the pretrained one.")


# ----------------------------------------------------------------------------------------------
# ---- 06_finetuning: mean pooling with the attention mask; precision, recall and F1
# ----------------------------------------------------------------------------------------------

register_hint("06.1", "Turn the mask into floats of shape (B, T, 1), multiply it into hidden so padding "
                      "becomes 0, sum over the token axis (dim=1), and divide by mask.sum(dim=1), the "
                      "number of real tokens of each sentence (not by T).")
register_hint("06.2", "Count TP = ((y_pred == 1) & (y_true == 1)).sum(), likewise FP and FN; then precision "
                      "= TP / (TP + FP), recall = TP / (TP + FN), F1 = 2PR / (P + R), and use 0 wherever "
                      "a denominator is 0.")


def _pooling_cases() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """B, T, H all different, so a pooling over the wrong axis shows in the shape."""
    generator = torch.Generator().manual_seed(6)
    return {
        "2 sentences of 5 and 2 tokens (B=2, T=5, H=3)": (
            torch.randn(2, 5, 3, generator=generator), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])),
        "3 sentences all shorter than T (B=3, T=6, H=4)": (
            torch.randn(3, 6, 4, generator=generator),
            torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])),
        "4 sentences of one length, no padding (B=4, T=3, H=7)": (
            torch.randn(4, 3, 7, generator=generator), torch.ones(4, 3, dtype=torch.long)),
    }


def check_mean_pooling(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """``fn(hidden, attention_mask)`` averages hidden (B, T, H) over the real tokens -> (B, H)."""
    __tracebackhide__ = True
    cases = _pooling_cases()
    for case, (hidden, mask) in cases.items():
        B, T, H = hidden.shape
        result = require_tensor(call_student(fn, hidden.clone(), mask.clone(), case=case), "your pooled embedding")
        if tuple(result.shape) == (B, T):
            fail(f"your pooled embedding has shape {(B, T)} on {case}: you averaged over the hidden axis; "
                 f"average over the token axis (dim=1) to get one vector of size H per sentence.")
        if tuple(result.shape) == (T, H):
            fail(f"your pooled embedding has shape {(T, H)} on {case}: you averaged over the batch axis; "
                 f"average over the token axis (dim=1), separately for each sentence.")
        if tuple(result.shape) == (B, 1, H):
            fail(f"your pooled embedding has shape {(B, 1, H)} on {case}: drop the token axis "
                 f"(keepdim=False, or .squeeze(1)) so that the result is (B, H).")
        m = mask.to(hidden.dtype).unsqueeze(-1)
        masked_sum = (hidden * m).sum(dim=1)
        expected = masked_sum / m.sum(dim=1)
        compare(result, expected, what="your pooled embedding", case=case, wrong_answers={
            "you averaged over the padding tokens too; multiply by the mask before summing and divide by "
            "the number of real tokens": lambda: hidden.mean(dim=1),
            "you divided the masked sum by the padded length T instead of by the number of real tokens "
            "(mask.sum(dim=1))": lambda: masked_sum / T,
            "you divided by the number of real tokens in the whole batch; divide each sentence by its own "
            "count, mask.sum(dim=1)": lambda: masked_sum / m.sum(),
            "you summed the token states but did not divide by the number of real tokens":
                lambda: masked_sum,
            "you took the first token ([CLS]) instead of the mean over the tokens": lambda: hidden[:, 0],
            "you took the maximum over the tokens (max pooling) instead of the mean":
                lambda: hidden.masked_fill(m == 0, float("-inf")).amax(dim=1),
        })
    passed("check_mean_pooling", f"your pooling averages over the real tokens only, on {len(cases)} batches "
                                 f"(with and without padding).")


METRIC_KEYS = ("accuracy", "precision", "recall", "f1")


def _binary_counts(y_true: torch.Tensor, y_pred: torch.Tensor, positive: int) -> dict[str, float]:
    """Accuracy and precision / recall / F1 of class ``positive``, from the counts (0 when undefined)."""
    tp = ((y_pred == positive) & (y_true == positive)).sum().item()
    fp = ((y_pred == positive) & (y_true != positive)).sum().item()
    fn = ((y_pred != positive) & (y_true == positive)).sum().item()
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return dict(accuracy=(y_true == y_pred).double().mean().item(), precision=precision, recall=recall, f1=f1)


def _metric_cases() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(6)
    y_true = (torch.rand(40, generator=generator) < 0.3).long()
    flip = torch.rand(40, generator=generator) < 0.25
    return {
        "a hand-made example of 10 (TP 3, FN 1, FP 2, TN 4)": (
            torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 0, 0]), torch.tensor([1, 1, 1, 0, 1, 1, 0, 0, 0, 0])),
        "40 imbalanced examples (30% positive)": (y_true, torch.where(flip, 1 - y_true, y_true)),
        "a perfect prediction": (torch.tensor([0, 1, 1, 0, 1]), torch.tensor([0, 1, 1, 0, 1])),
        "a classifier that never predicts positive": (
            torch.tensor([1, 0, 1, 0, 0, 0]), torch.zeros(6, dtype=torch.long)),
    }


def _as_number(value: Any, what: str, case: str) -> torch.Tensor:
    __tracebackhide__ = True
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            fail(f"{what} should be one number on {case}, but it is a tensor of shape {tuple(value.shape)}.")
        return value.detach().double().reshape(())
    try:
        return torch.tensor(float(value), dtype=torch.float64)
    except (TypeError, ValueError):
        fail(f"{what} should be a number on {case}, but it is a {type(value).__name__}.")


def check_precision_recall_f1(fn: Callable[[torch.Tensor, torch.Tensor], Mapping[str, Any]]) -> None:
    """``fn(y_true, y_pred)`` returns accuracy, precision, recall and F1 of the positive class (label 1)."""
    __tracebackhide__ = True
    cases = _metric_cases()
    for case, (y_true, y_pred) in cases.items():
        result = call_student(fn, y_true.clone(), y_pred.clone(), case=case)
        if not isinstance(result, Mapping):
            fail(f"your function should return a dict with the keys {', '.join(METRIC_KEYS)}, but it returns "
                 f"a {type(result).__name__}.")
        missing = [key for key in METRIC_KEYS if key not in result]
        if missing:
            fail(f"the dict your function returns lacks the key(s) {', '.join(map(repr, missing))}.")
        right = _binary_counts(y_true, y_pred, positive=1)
        negative = _binary_counts(y_true, y_pred, positive=0)
        p, r = right["precision"], right["recall"]
        n_correct = (y_true == y_pred).sum().item()
        wrong: dict[str, dict[str, Callable[[], Any]]] = {
            "accuracy": {
                "you counted the correct predictions but did not divide by the number of examples":
                    lambda: n_correct,
                "that is the error rate (1 - accuracy)": lambda: 1 - right["accuracy"],
            },
            "precision": {
                "you swapped precision and recall: precision = TP / (TP + FP), the share of predicted "
                "positives that are truly positive": lambda: r,
                "you computed it for the negative class (label 0); the positive class is label 1":
                    lambda: negative["precision"],
            },
            "recall": {
                "you swapped precision and recall: recall = TP / (TP + FN), the share of true positives "
                "that were found": lambda: p,
                "you computed it for the negative class (label 0); the positive class is label 1":
                    lambda: negative["recall"],
            },
            "f1": {
                "that is the micro-averaged F1, which for one label per example always equals the accuracy; "
                "the binary F1 is the F1 of the positive class only": lambda: right["accuracy"],
                "you averaged the F1 of both classes (that is the macro-F1); the binary F1 is the F1 of the "
                "positive class only": lambda: (right["f1"] + negative["f1"]) / 2,
                "you computed it for the negative class (label 0); the positive class is label 1":
                    lambda: negative["f1"],
                "you took the arithmetic mean (P + R) / 2; F1 is the harmonic mean 2PR / (P + R)":
                    lambda: (p + r) / 2,
                "you left out the factor 2: F1 = 2PR / (P + R)": lambda: p * r / (p + r),
            },
        }
        for key in METRIC_KEYS:
            what = f"your {key}"
            value = _as_number(result[key], what, case)
            expected = torch.tensor(right[key], dtype=torch.float64)
            if torch.isnan(value) and (key != "accuracy"):
                fail(f"{what} is nan on {case}: when a denominator is 0 (e.g. nothing is predicted positive) "
                     f"define the metric as 0, as scikit-learn does.")
            compare(value, expected, what=what, case=case, atol=1e-6, wrong_answers={
                sentence: (lambda c=compute: torch.tensor(float(c()), dtype=torch.float64))
                for sentence, compute in wrong[key].items()})
    passed("check_precision_recall_f1", f"accuracy, precision, recall and F1 of the positive class match the "
                                        f"reference on {len(cases)} cases (including one with no positive "
                                        f"prediction).")


# ----------------------------------------------------------------------------------------------
# ---- 03_transformer_block: LayerNorm from scratch, the parameter count of a GPT
# ----------------------------------------------------------------------------------------------

register_hint("03.1", "mean = x.mean(dim=-1, keepdim=True); var = ((x - mean) ** 2).mean(dim=-1, keepdim=True) "
                      "(divide by d, not d - 1); return gamma * (x - mean) / torch.sqrt(var + eps) + beta.")
register_hint("03.2", "Per block: 4 d x d attention matrices + 4d biases, a d x 4d and a 4d x d MLP matrix + 4d + d "
                      "biases, two LayerNorms of 2d each. Then the final LayerNorm (2d), the token embedding "
                      "(V d) and the position embedding (T d); the tied lm head adds nothing.")


def _layer_norm64(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float, dims=(-1,),
                  unbiased: bool = False, eps_outside: bool = False) -> torch.Tensor:
    x = x.double()
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, keepdim=True, correction=1 if unbiased else 0)
    std = var.sqrt() + eps if eps_outside else (var + eps).sqrt()
    return gamma.double() * (x - mean) / std + beta.double()


def check_layer_norm(fn: Callable[..., torch.Tensor]) -> None:
    """Exercise 03.1: ``fn(x, gamma, beta, eps=1e-5)`` normalises x over its last axis, then scales
    by gamma and shifts by beta -- the same as ``torch.nn.functional.layer_norm``."""
    __tracebackhide__ = True
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    cases = [  # (case, x, gamma, beta, eps)
        ("one vector of d=4 with gamma = 1, beta = 0", torch.tensor([1.0, 2.0, 4.0, 7.0]), torch.ones(4),
         torch.zeros(4), 1e-5),
        ("a (3, 5, 6) batch with random gamma and beta", 3 * r(3, 5, 6) + 1, r(6), r(6), 1e-5),
        ("a (4, 8) batch of tiny values (variance about 1e-4) with eps=1e-2", 1e-2 * r(4, 8), r(8), r(8), 1e-2),
        ("a (2, 3, 4, 6) batch", r(2, 3, 4, 6), r(6), r(6), 1e-5),
    ]
    for case, x, gamma, beta, eps in cases:
        result = call_student(fn, x.clone(), gamma.clone(), beta.clone(), eps=eps, case=case)
        result = require_tensor(result, "your layer_norm")
        expected = torch.nn.functional.layer_norm(x.double(), (x.shape[-1],), gamma.double(), beta.double(), eps)
        if result.shape != x.shape:
            fail(f"your layer_norm returns shape {tuple(result.shape)} on {case}, but it should keep the "
                 f"input's shape {tuple(x.shape)} (reduce with keepdim=True so the statistics broadcast).")
        wrong: dict[str, Callable[[], torch.Tensor]] = {
            "you used the unbiased variance (dividing by d - 1); LayerNorm divides by d (correction=0, "
            "or unbiased=False)": lambda: _layer_norm64(x, gamma, beta, eps, unbiased=True),
            "you added eps outside the square root; it belongs inside: (x - mean) / sqrt(var + eps)":
                lambda: _layer_norm64(x, gamma, beta, eps, eps_outside=True),
            "you forgot eps; add it to the variance inside the square root":
                lambda: _layer_norm64(x, gamma, beta, 0.0),
            "you forgot gamma and beta: scale by gamma and then add beta":
                lambda: _layer_norm64(x, torch.ones_like(gamma), torch.zeros_like(beta), eps),
            "you forgot gamma: multiply the normalised x by gamma":
                lambda: _layer_norm64(x, torch.ones_like(gamma), beta, eps),
            "you forgot beta: add beta after scaling by gamma":
                lambda: _layer_norm64(x, gamma, torch.zeros_like(beta), eps),
            "you divided by the variance instead of its square root (the standard deviation)":
                lambda: gamma.double() * (x.double() - x.double().mean(-1, keepdim=True))
                / (x.double().var(-1, keepdim=True, correction=0) + eps) + beta.double(),
            "you did not subtract the mean before dividing by the standard deviation":
                lambda: gamma.double() * x.double() / (x.double().var(-1, keepdim=True, correction=0) + eps).sqrt()
                + beta.double(),
        }
        if x.dim() > 1:
            wrong["you normalised over the first axis (dim=0); LayerNorm normalises each vector over its "
                  "last axis (dim=-1)"] = lambda: _layer_norm64(x, gamma, beta, eps, dims=(0,))
            wrong["you normalised over every element at once; LayerNorm takes the mean and variance of each "
                  "vector separately, over the last axis with keepdim=True"] = \
                lambda: _layer_norm64(x, gamma, beta, eps, dims=tuple(range(x.dim())))
        if x.dim() > 2:
            wrong["you normalised over axis -2; LayerNorm normalises over the last axis (dim=-1)"] = \
                lambda: _layer_norm64(x, gamma, beta, eps, dims=(-2,))
        compare(result, expected, what="your layer_norm", case=case, wrong_answers=wrong, atol=1e-4, rtol=1e-4)
    passed("check_layer_norm", f"your layer_norm matches torch.nn.functional.layer_norm on {len(cases)} cases "
                               f"(batch axes, tiny variances, random gamma and beta).")


def check_param_count(fn: Callable[..., int]) -> None:
    """Exercise 03.2: ``fn(vocab_size, context, n_layer, d_model)`` returns the number of parameters of
    ``course_lib.model.GPT`` with biases and tied embeddings (each shared tensor counted once)."""
    __tracebackhide__ = True
    from course_lib.model import GPT, GPTConfig, count_params, param_count_formula

    cases = [(65, 64, 2, 64), (50257, 1024, 12, 768), (1000, 32, 1, 16), (256, 128, 6, 384)]
    for V, T, L, d in cases:
        case = f"vocab_size={V}, context={T}, n_layer={L}, d_model={d}"
        result = call_student(fn, vocab_size=V, context=T, n_layer=L, d_model=d, case=case)
        if isinstance(result, torch.Tensor) and result.numel() == 1:
            result = result.item()
        if isinstance(result, float) and result.is_integer():
            result = int(result)
        if isinstance(result, bool) or not isinstance(result, int):
            fail(f"your parameter count should be an int, but on {case} it is a {type(result).__name__} "
                 f"({result!r}).")
        config = GPTConfig(vocab_size=V, context=T, n_layer=L, n_head=1, d_model=d)
        expected = param_count_formula(config, non_embedding=False)
        if V * d < 1e6:   # small enough to build: the formula must agree with the real model
            assert count_params(GPT(config), non_embedding=False) == expected
        if result == expected:
            continue
        block, ln = 12 * d * d + 13 * d, 2 * d
        wrong = {
            "you counted only 12·L·d²; that is the rule of thumb for the block matrices, add the biases, the "
            "LayerNorms and the embeddings": 12 * L * d * d,
            "you left out the token and position embeddings (that is the non-embedding count N)":
                L * block + ln,
            "you counted the tied lm head a second time; it is the token embedding matrix itself":
                expected + V * d,
            "you forgot the position embedding (context × d_model)": expected - T * d,
            "you forgot the token embedding (vocab_size × d_model)": expected - V * d,
            "you forgot the biases of the Linear layers (4d in attention, 4d + d in the MLP, per block)":
                expected - L * 9 * d,
            "you forgot the LayerNorms (γ and β: 2d each, two per block and a final one)":
                expected - L * 4 * d - ln,
            "you forgot the final LayerNorm (2d)": expected - ln,
            "you forgot the LayerNorms' β (only γ counted)": expected - L * 2 * d - d,
            "the MLP's hidden size is 4·d_model, so its two matrices hold 8d², not 2d²":
                expected - L * (6 * d * d + 3 * d),
            "you counted the MLP with one d × 4d matrix only; it has two (d × 4d and 4d × d)":
                expected - L * (4 * d * d + d),
            "attention has four d × d matrices (W_q, W_k, W_v, W_o), you counted three":
                expected - L * (d * d + d),
        }
        for sentence, value in wrong.items():
            if result == value:
                fail(f"your parameter count is wrong on {case}: {sentence}.")
        fail(f"your parameter count on {case} is {result:,}, but GPT has {expected:,} parameters "
             f"(off by {result - expected:+,}).")
    passed("check_param_count", f"your formula matches the parameter count of the real model on {len(cases)} "
                                f"shapes, GPT-2 small's (124,439,808) among them.")


# ----------------------------------------------------------------------------------------------
# ---- 04_training: the learning-rate schedule, top-k sampling
# ----------------------------------------------------------------------------------------------

register_hint("04.1", "Warm-up: step < warmup_steps gives lr * (step + 1) / warmup_steps. Then p = (step - "
                      "warmup_steps) / (total_steps - 1 - warmup_steps) runs from 0 to 1 and the rate is "
                      "min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * p)); after the end, min_lr.")
register_hint("04.2", "Per row, the k-th largest value is torch.topk(logits, k, dim=-1).values[..., -1:] "
                      "(keep the last axis so it broadcasts); set every logit below it to -inf with "
                      "logits.masked_fill(logits < kth, float('-inf')).")


def check_lr_schedule(fn: Callable[..., float]) -> None:
    """Exercise 04.1: ``fn(step, lr, warmup_steps, total_steps, min_lr)`` is linear warm-up then cosine
    decay, exactly as ``course_lib.train.lr_at``."""
    __tracebackhide__ = True
    import math

    from course_lib.train import lr_at

    configs = [(1.0, 10, 50, 0.1), (3e-4, 5, 40, 3e-5), (2.0, 0, 20, 0.5), (1.0, 4, 30, 0.0)]
    for lr, W, S, m in configs:
        case = f"lr={lr}, warmup_steps={W}, total_steps={S}, min_lr={m}"
        steps = list(range(S + 3))
        got = []
        for step in steps:
            value = call_student(fn, step, lr=lr, warmup_steps=W, total_steps=S, min_lr=m,
                                 case=f"step {step} with {case}")
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                fail(f"your schedule should return a number, but at step {step} with {case} it returned a "
                     f"{type(value).__name__}.")
            got.append(float(value))
        expected = [lr_at(s, lr=lr, warmup_steps=W, total_steps=S, min_lr=m) for s in steps]

        def agrees(values: list[float]) -> bool:
            return all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12 + 1e-9 * lr) for a, b in zip(got, values))

        if agrees(expected):
            continue

        def schedule(warm: Callable[[int], float], decay: Callable[[int], float]) -> list[float]:
            return [warm(s) if s < W else (m if s >= S else decay(s)) for s in steps]

        def warm_ok(s: int) -> float:
            return lr * (s + 1) / W

        def cosine(p: float, low: float = m, angle: float = math.pi) -> float:
            return low + 0.5 * (lr - low) * (1 + math.cos(angle * p))

        D = S - 1 - W
        p = lambda s: (s - W) / D if D > 0 else 1.0  # noqa: E731
        wrong = {
            "there is no warm-up: the first warmup_steps steps must rise linearly, lr * (step + 1) / "
            "warmup_steps": [cosine(s / (S - 1)) if s < S else m for s in steps],
            "the warm-up is off by one: step 0 must already get lr / warmup_steps (use step + 1), so that "
            "the last warm-up step reaches lr": schedule(lambda s: lr * s / W, lambda s: cosine(p(s))),
            "the cosine decays to 0 instead of min_lr": schedule(warm_ok, lambda s: cosine(p(s), low=0.0)),
            "the cosine does not reach min_lr at the last step: divide by total_steps - 1 - warmup_steps so "
            "that p = 1 at step total_steps - 1": schedule(warm_ok, lambda s: cosine((s - W) / (S - W))),
            "the cosine's argument is in degrees (cos(180 * p)); math.cos takes radians, so use "
            "math.pi * p": schedule(warm_ok, lambda s: cosine(p(s), angle=180.0)),
            "the cosine's argument is missing π: use math.cos(math.pi * p), which runs from 1 to -1":
                schedule(warm_ok, lambda s: cosine(p(s), angle=1.0)),
            "the decay is linear; it should follow half a cosine wave":
                schedule(warm_ok, lambda s: lr - (lr - m) * p(s)),
            "after total_steps the rate must stay at min_lr":
                [warm_ok(s) if s < W else cosine(p(s)) for s in steps],
        }
        for sentence, values in wrong.items():
            if agrees(values):
                fail(f"your schedule is wrong with {case}: {sentence}.")
        first = next(i for i, (a, b) in enumerate(zip(got, expected))
                     if not math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12 + 1e-9 * lr))
        phase = "warm-up" if first < W else ("cosine decay" if first < S else "after the end")
        fail(f"your schedule first differs at step {first} ({phase}) with {case}: it gives {got[first]:.6g}, "
             f"the reference {expected[first]:.6g}.")
    passed("check_lr_schedule", f"your schedule matches warm-up + cosine decay step by step for {len(configs)} "
                                f"settings (no warm-up and min_lr = 0 included).")


def check_top_k(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
    """Exercise 04.2: ``fn(logits, k)`` keeps the k largest logits of each row (last axis) and sets the
    others to -inf, for any number of leading batch axes."""
    __tracebackhide__ = True
    g = torch.Generator().manual_seed(0)
    cases = [
        ("a vector of 10 logits with k=3", torch.randn(10, generator=g), 3),
        ("a (4, 12) batch with k=5", 2 * torch.randn(4, 12, generator=g), 5),
        ("a (2, 3, 9) batch with k=2", torch.randn(2, 3, 9, generator=g) + torch.arange(3.0)[:, None] * 5, 2),
        ("a (3, 7) batch with k=1", torch.randn(3, 7, generator=g), 1),
        ("a (2, 6) batch with k=6 (keep everything)", torch.randn(2, 6, generator=g), 6),
    ]
    for case, z, k in cases:
        try:
            result = call_student(fn, z.clone(), k, case=case)
        except StudentCodeError as error:
            if z.dim() > 1:
                fail(f"{error} -- if it works on a single vector, handle the batch axes: take the k-th largest "
                     f"value of each row with keepdim (torch.topk(logits, k, dim=-1).values[..., -1:]) so "
                     f"that it broadcasts against its row.")
            raise
        result = require_tensor(result, "your top-k filter")
        kth = torch.topk(z, k, dim=-1).values[..., -1:]
        expected = z.masked_fill(z < kth, float("-inf"))
        if result.shape != z.shape:
            fail(f"your top-k filter returns shape {tuple(result.shape)} on {case}, but it should keep the "
                 f"shape {tuple(z.shape)}: return all the logits, with the dropped ones set to -inf "
                 f"(torch.topk alone returns only the k kept values).")
        result = result.detach().cpu()
        kept = torch.isfinite(result)
        want = torch.isfinite(expected)
        probs = torch.softmax(z.double(), dim=-1)
        if torch.equal(kept, want):
            # any per-row shift of the kept logits (e.g. log-probabilities) samples the same tokens
            if close(torch.softmax(result.double(), -1), torch.softmax(expected.double(), -1)):
                continue
            if close(result[kept], probs[kept]) or close(result[kept], (probs.masked_fill(~want, 0.0) / probs.masked_fill(
                    ~want, 0.0).sum(-1, keepdim=True))[kept]):
                fail(f"your top-k filter keeps the right tokens on {case} but returns their probabilities: "
                     f"you applied softmax before filtering; return the logits themselves (the sampler takes "
                     f"the softmax after filtering, and a softmax of probabilities is a much flatter "
                     f"distribution).")
            fail(f"your top-k filter keeps the right logits on {case} but changes their values; return them "
                 f"unchanged (only the dropped ones become -inf).")
        if bool(kept.all()):
            masked = probs.masked_fill(~want, 0.0)
            if close(result, masked) or close(result, masked / masked.sum(-1, keepdim=True)):
                fail(f"your top-k filter returns probabilities with zeros on {case}: you applied softmax "
                     f"before filtering; return the filtered logits, with the dropped ones at -inf (sampling "
                     f"takes the softmax afterwards).")
            if close(result, z.masked_fill(~want, 0.0)):
                fail(f"your top-k filter sets the dropped logits to 0 on {case}; exp(0) = 1 still gives them "
                     f"probability, set them to -inf.")
            fail(f"your top-k filter drops nothing on {case}: every logit is still finite; set all but the "
                 f"k largest of each row to -inf.")
        counts = kept.reshape(-1, z.shape[-1]).sum(-1)
        if kept.sum() == k and z.dim() > 1:
            fail(f"your top-k filter keeps {k} logits of the whole tensor on {case}; keep the k largest of "
                 f"every row (topk along dim=-1).")
        if z.dim() > 1:
            first_row_kth = kth.reshape(-1)[0]
            if torch.equal(kept, z >= first_row_kth):
                fail(f"your top-k filter uses the first row's threshold for every row on {case}; take the "
                     f"k-th largest value of each row (topk(...).values[..., -1:]).")
        if bool((counts == k - 1).all()):
            fail(f"your top-k filter keeps k - 1 = {k - 1} logits per row on {case}; the k-th largest value "
                 f"itself must be kept (drop only logits strictly below it).")
        if bool((counts == k + 1).all()):
            fail(f"your top-k filter keeps k + 1 = {k + 1} logits per row on {case}; the threshold is the "
                 f"k-th largest value, not the (k+1)-th.")
        if bool((counts == k).all()) and not torch.equal(kept, want):
            fail(f"your top-k filter keeps {k} logits per row on {case}, but not the largest ones; keep the "
                 f"k largest (topk along the last axis).")
        fail(f"your top-k filter keeps {counts.tolist()} logits per row on {case}, but it should keep k = {k} "
             f"per row.")
    passed("check_top_k", f"your filter keeps exactly the k largest logits of every row on {len(cases)} cases "
                          f"(1-D, 2-D and 3-D, k = 1 and k = vocabulary size).")


# ----------------------------------------------------------------------------------------------
# ---- 10_scaling_out: memory per GPU with mixed-precision Adam and ZeRO stages 0-3
# ----------------------------------------------------------------------------------------------

register_hint("10.1", "Per parameter: 2 bytes of bf16 weights, 2 of bf16 gradients, 12 of Adam state (fp32 master "
                      "copy + two moments). Stage 1 divides the 12 by n_gpus, stage 2 also the gradients' 2, "
                      "stage 3 also the weights' 2. Return gigabytes: bytes / 1e9.")


def check_zero_memory(fn: Callable[[float, int, int], float]) -> None:
    """Exercise 10.1: ``fn(n_params, n_gpus, zero_stage)`` returns the GB (1e9 bytes) per GPU of bf16 weights,
    bf16 gradients and fp32 Adam states (Rajbhandari et al. 2020, Sec. 3.1 and 5), stage 0 = plain DDP."""
    __tracebackhide__ = True
    import math

    from course_lib.ddp import memory_per_gpu

    cases = [(7.5e9, 64, 0), (7.5e9, 64, 1), (7.5e9, 64, 2), (7.5e9, 64, 3), (135e6, 1, 0), (1e9, 4, 1),
             (1e9, 4, 2), (70e9, 16, 3), (13e9, 8, 2)]

    def with_bytes(n: float, N: int, stage: int, w: float, g: float, k: float) -> float:
        return n * (w / (N if stage >= 3 else 1) + g / (N if stage >= 2 else 1) + k / (N if stage >= 1 else 1)) / 1e9

    for n, N, stage in cases:
        case = f"n_params={n:.3g}, n_gpus={N}, zero_stage={stage}"
        result = call_student(fn, n, N, stage, case=case)
        if isinstance(result, torch.Tensor) and result.numel() == 1:
            result = result.item()
        if isinstance(result, bool) or not isinstance(result, (int, float)):
            fail(f"your function should return one number (gigabytes per GPU), but on {case} it returns a "
                 f"{type(result).__name__}.")
        expected = memory_per_gpu(n, data=N, zero_stage=stage)["total"]
        if math.isclose(result, expected, rel_tol=1e-6):
            continue
        wrong = {
            "you returned bytes; divide by 1e9 to get gigabytes": expected * 1e9,
            "you returned GiB (2**30 bytes); the course and the ZeRO paper use GB = 1e9 bytes":
                expected * 1e9 / 2**30,
            "you did not shard anything: ZeRO stage 1 divides the optimiser states by n_gpus, stage 2 also the "
            "gradients, stage 3 also the weights": 16 * n / 1e9,
            "you divided all 16 bytes by n_gpus at every stage; only stage 3 shards the weights (stage 1: "
            "optimiser states, stage 2: + gradients)": 16 * n / N / 1e9,
            "you shard one kind of memory too many: stage 1 shards only the optimiser states, stage 2 adds the "
            "gradients, stage 3 the weights": with_bytes(n, N, stage + 1, 2, 2, 12),
            "you counted 8 bytes of Adam state; with mixed precision it also keeps an fp32 master copy of the "
            "weights: 4 + 4 + 4 = 12 bytes": with_bytes(n, N, stage, 2, 2, 8),
            "you counted fp32 weights and gradients (4 bytes each); in mixed precision they are bf16, 2 bytes "
            "each, and the fp32 copy lives in the 12 bytes of optimiser state": with_bytes(n, N, stage, 4, 4, 12),
            "you left out the gradients (2 bytes per parameter)": with_bytes(n, N, stage, 2, 0, 12),
        }
        for sentence, value in wrong.items():
            if value != expected and math.isclose(result, value, rel_tol=1e-6):
                fail(f"your memory per GPU is wrong on {case}: {sentence}.")
        fail(f"your memory per GPU on {case} is {result:.4g} GB, but it should be {expected:.4g} GB.")
    passed("check_zero_memory", f"your formula gives the memory per GPU on {len(cases)} cases, ZeRO's Fig. 1 "
                                f"(7.5B parameters on 64 GPUs: 120, 31.4, 16.6, 1.9 GB) among them.")


# ----------------------------------------------------------------------------------------------
# ---- 05_scaling_laws: a power law fitted in log space; the compute-optimal allocation
# ----------------------------------------------------------------------------------------------

register_hint("05.1", "Take natural logs of both: ln L = ln A − α·ln N is a straight line. Fit it with "
                      "slope, intercept = np.polyfit(np.log(N), np.log(L), 1); then alpha = −slope and "
                      "A = np.exp(intercept).")
register_hint("05.2", "Set G = (alpha*A / (beta*B)) ** (1 / (alpha + beta)); then N_opt = G * (C/6) ** (beta / "
                      "(alpha + beta)) and D_opt = (C/6) ** (alpha / (alpha + beta)) / G. Check: 6 * N_opt * D_opt == C.")


def _two_numbers(result: Any, what: str, names: str, case: str) -> torch.Tensor:
    """The student's pair of numbers as a float64 tensor of shape (2,), or one sentence saying why not."""
    __tracebackhide__ = True
    if isinstance(result, Mapping) or not isinstance(result, (tuple, list)) or len(result) != 2:
        fail(f"{what} should return a pair {names} (a tuple of two numbers), but on {case} it returned "
             f"{type(result).__name__}{'' if not isinstance(result, (tuple, list)) else ' of length ' + str(len(result))}.")
    values = []
    for item in result:
        if isinstance(item, torch.Tensor):
            if item.numel() != 1:
                fail(f"{what} should return two single numbers {names}, but on {case} one of them is a tensor "
                     f"of shape {tuple(item.shape)}.")
            item = item.item()
        try:
            values.append(float(item))
        except (TypeError, ValueError):
            fail(f"{what} should return two numbers {names}, but on {case} one of them is a "
                 f"{type(item).__name__}.")
    return torch.tensor(values, dtype=torch.float64)


def check_power_law_fit(fn: Callable[[Any, Any], tuple[float, float]]) -> None:
    """Exercise 05.1: ``fn(N, L)`` fits L = A · N^(−alpha) by least squares in log space; returns (A, alpha).

    N and L are 1-D numpy float64 arrays. The reference is the straight-line fit of ln L against ln N.
    """
    __tracebackhide__ = True
    import math

    import numpy as np
    from scipy.optimize import curve_fit

    rng = np.random.default_rng(5)
    N1 = np.geomspace(1e3, 1e7, 9)
    N2 = np.geomspace(1e4, 1e8, 12)
    N3 = np.geomspace(2e5, 2e9, 10)
    cases = {
        "an exact power law (A=20, alpha=0.3)": (N1, 20.0 * N1 ** -0.3),
        "noisy losses (20% scatter, A=50, alpha=0.25)": (N2, 50.0 * N2 ** -0.25 * np.exp(rng.normal(0, 0.2, 12))),
        "a steep noisy law (A=3e4, alpha=0.8)": (N3, 3e4 * N3 ** -0.8 * np.exp(rng.normal(0, 0.3, 10))),
    }
    exact_ok = False
    for case, (N, L) in cases.items():
        result = call_student(fn, N.copy(), L.copy(), case=case)
        actual = _two_numbers(result, "your fit", "(A, alpha)", case)
        slope, intercept = np.polyfit(np.log(N), np.log(L), 1)
        A, alpha = math.exp(intercept), -slope
        s10, c10 = np.polyfit(np.log10(N), np.log10(L), 1)
        expected = torch.tensor([A, alpha], dtype=torch.float64)

        def linear_space(N=N, L=L, A=A, alpha=alpha):
            popt, _ = curve_fit(lambda n, a_, k_: a_ * n ** -k_, N, L, p0=(A, alpha), maxfev=20000)
            return torch.tensor(popt, dtype=torch.float64)

        wrong = {
            "you fitted in linear space (least squares on L itself), which lets the largest losses dominate; "
            "fit a straight line to ln L against ln N instead": linear_space,
            "alpha is minus the slope of ln L against ln N (L falls as N grows); you returned the slope "
            "itself, so the sign is flipped": lambda: torch.tensor([A, -alpha], dtype=torch.float64),
            "you fitted with log10 but undid the intercept with exp; use the same base both ways "
            "(A = 10**intercept for log10, np.exp(intercept) for ln)":
                lambda: torch.tensor([math.exp(c10), -s10], dtype=torch.float64),
            "you fitted with ln but undid the intercept with 10**; use the same base both ways "
            "(A = np.exp(intercept) for ln)": lambda: torch.tensor([10.0 ** intercept, alpha], dtype=torch.float64),
            "you returned the intercept ln A instead of A = exp(intercept)":
                lambda: torch.tensor([intercept, alpha], dtype=torch.float64),
            "you returned the intercept log10 A instead of A = 10**intercept":
                lambda: torch.tensor([c10, alpha], dtype=torch.float64),
            "you returned (alpha, A); return them in the order (A, alpha)":
                lambda: torch.tensor([alpha, A], dtype=torch.float64),
        }
        if not close(actual, expected, atol=1e-8, rtol=1e-5):
            reason = diagnose(actual, wrong, atol=1e-8, rtol=1e-3)
            if reason:
                fail(f"your fit is wrong on {case}: {reason}.")
            if exact_ok:
                fail(f"your fit is right on exact data but not on {case}: a least-squares fit in log space is "
                     f"the straight line through (ln N, ln L); are you fitting in linear space or dropping points?")
            fail(f"your fit on {case} gives A={actual[0].item():.4g}, alpha={actual[1].item():.4g}, but the "
                 f"log-space least-squares fit gives A={A:.4g}, alpha={alpha:.4g}.")
        exact_ok = True
    passed("check_power_law_fit", f"your log-space fit matches the reference on {len(cases)} cases, noisy ones "
                                  f"included.")


def check_compute_optimal(fn: Callable[[float, Mapping[str, float]], tuple[float, float]]) -> None:
    """Exercise 05.2: ``fn(C, params)`` returns (N_opt, D_opt) minimising E + A/N^alpha + B/D^beta under C = 6ND.

    ``params`` is a dict with keys E, A, B, alpha, beta (like ``scaling.CHINCHILLA_APPROACH3``).
    """
    __tracebackhide__ = True
    from course_lib import scaling

    cases = {
        "Chinchilla's Approach 3 law at the Gopher budget (C=5.76e23)": (5.76e23, scaling.CHINCHILLA_APPROACH3),
        "the replication's law at C=1e21": (1e21, scaling.BESIROGLU_2024),
        "a lopsided law (alpha=0.6, beta=0.2) at C=1e19":
            (1e19, {"E": 1.0, "A": 50.0, "B": 3000.0, "alpha": 0.6, "beta": 0.2}),
    }
    for case, (C, params) in cases.items():
        result = call_student(fn, C, dict(params), case=case)
        actual = _two_numbers(result, "your compute_optimal", "(N_opt, D_opt)", case)
        N_opt, D_opt = scaling.compute_optimal(C, params)
        expected = torch.tensor([N_opt, D_opt], dtype=torch.float64)
        A, B, alpha, beta = params["A"], params["B"], params["alpha"], params["beta"]
        s = alpha + beta
        G = (alpha * A / (beta * B)) ** (1 / s)

        def pair(n: float, d: float) -> Callable[[], torch.Tensor]:
            return lambda: torch.tensor([n, d], dtype=torch.float64)

        wrong = {
            "you forgot the 6 in C = 6·N·D: N_opt·D_opt must equal C/6, so use C/6 in the formula":
                pair(G * C ** (beta / s), C ** (alpha / s) / G),
            "the exponents are swapped: N_opt grows as (C/6)^(beta/(alpha+beta)) and D_opt as "
            "(C/6)^(alpha/(alpha+beta))": pair(G * (C / 6) ** (alpha / s), (C / 6) ** (beta / s) / G),
            "you swapped the exponents and forgot the 6 in C = 6·N·D":
                pair(G * C ** (alpha / s), C ** (beta / s) / G),
            "G is upside down: N_opt = G·(C/6)^(beta/(alpha+beta)) with G = (alpha·A/(beta·B))^(1/(alpha+beta)), "
            "and D_opt = (C/6)^(alpha/(alpha+beta)) / G": pair((C / 6) ** (beta / s) / G, G * (C / 6) ** (alpha / s)),
            "G needs the power 1/(alpha+beta): G = (alpha·A/(beta·B))^(1/(alpha+beta))":
                pair(G**s * (C / 6) ** (beta / s), (C / 6) ** (alpha / s) / G**s),
            "you returned (D_opt, N_opt); return (N_opt, D_opt)": pair(D_opt, N_opt),
        }
        if close(actual, expected, atol=0.0, rtol=1e-6):
            continue
        reason = diagnose(actual, wrong, atol=0.0, rtol=1e-6)
        if reason:
            fail(f"your allocation is wrong on {case}: {reason}.")
        n, d = actual.tolist()
        if abs(6 * n * d / C - 1) > 1e-6:
            fail(f"on {case} your N_opt·D_opt·6 is {6 * n * d:.4g}, but it must equal the budget C={C:.4g}.")
        fail(f"on {case} you return N_opt={n:.4g}, D_opt={d:.4g}; the loss is lowest at N_opt={N_opt:.4g}, "
             f"D_opt={D_opt:.4g}.")
    passed("check_compute_optimal", f"your closed form matches the reference on {len(cases)} laws, Chinchilla's "
                                    f"~32B-parameter answer at the Gopher budget among them.")
