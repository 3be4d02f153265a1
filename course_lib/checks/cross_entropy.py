"""Checks of notebooks/02_cross_entropy.ipynb (exercises 02.*), with their hints."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from course_lib.checks.framework import (
    exercise, register_hint, fail, call_student, require_tensor, close, compare, passed,
)


# ----------------------------------------------------------------------------------------------
# ---- 02_cross_entropy: the cross-entropy gradient, a stable log-softmax, central differences
# ----------------------------------------------------------------------------------------------

register_hint(
    "02.1",
    "The loss is a mean over the N rows, and each row's loss depends only on that row's logits; so "
    "row i of the gradient is (1/N) times the gradient of one example's loss, which section 3 derived.",
    "Compute p = softmax over each row (stable: torch.softmax or subtract the row maximum), build the one-hot "
    "rows of the targets in p's dtype, subtract, and divide by N = logits.shape[0] (the rows, not the classes). "
    "Leave the logits unchanged: no in-place -= or exp_().",
    "return (torch.softmax(logits, dim=1) - F.one_hot(targets, logits.shape[1]).to(logits.dtype)) / logits.shape[0]")
register_hint(
    "02.2",
    "log softmax(z) = z - log(sum(exp(z))). The log-sum-exp is the part that overflows; it can be shifted by "
    "any constant m: log(sum(exp(z))) = m + log(sum(exp(z - m))).",
    "Take m = each row's own maximum over the last axis (keepdim=True); then every exponent is <= 0 and the "
    "sum is >= 1, so neither exp nor log misbehaves. Return (z - m) - log(sum(exp(z - m))), not the log of a "
    "softmax (that gives -inf where the softmax underflows to 0).",
    "m = z.amax(dim=-1, keepdim=True); return (z - m) - torch.log(torch.exp(z - m).sum(dim=-1, keepdim=True))")
register_hint(
    "02.3",
    "Nudge one entry of x at a time, up and down by eps, and see how much f changes: "
    "(f(x + eps e_i) - f(x - eps e_i)) / (2 eps) for every index i.",
    "Start from g = torch.zeros_like(x) (same shape and dtype) and a copy xc = x.clone(); loop over the entries "
    "of xc.view(-1): remember the old value, set old + eps and evaluate f, set old - eps and evaluate f, put "
    "the old value back, store the difference quotient in g.view(-1)[i].",
    "g.view(-1)[i] = (f_plus - f_minus) / (2 * eps)")


def _unchanged02(given: torch.Tensor, original: torch.Tensor, what: str, name: str, case: str) -> None:
    __tracebackhide__ = True
    if not torch.equal(given, original):
        fail(f"your {what} changed its input {name} in place on {case} (an in-place op such as -=, /= or "
             f"exp_()); compute into a new tensor so the caller's {name} stays as it was.")


def _dtype02(result: torch.Tensor, dtype: torch.dtype, what: str, case: str) -> None:
    __tracebackhide__ = True
    if result.dtype != dtype:
        fail(f"{what} has dtype {result.dtype} on {case}, but the logits are {dtype}; keep their dtype (no "
             f".float(), and no torch.tensor(...) rebuilt from the numbers).")


def _ce02_onehot(targets: torch.Tensor, num_classes: int, like: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(targets, num_classes).to(like.dtype)


@exercise("02.1", points=1, forbid=("course_lib.parts.losses:cross_entropy_grad",), autograd=True)
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
        "rows whose largest logit is not first: [[-1000, 0, 1000, 500], [0, -1000, 500, 1000]]":
            (torch.tensor([[-1000.0, 0.0, 1000.0, 500.0], [0.0, -1000.0, 500.0, 1000.0]]), torch.tensor([2, 0])),
        "a single example with C=2": (torch.tensor([[0.5, -1.5]]), torch.tensor([1])),
        "float64 logits (5, 7)": (torch.randn(5, 7, generator=generator, dtype=torch.float64) * 5,
                                  torch.tensor([6, 0, 3, 3, 1])),
    }
    for case, (z, y) in cases.items():
        n, c = z.shape
        z_given, y_given = z.clone(), y.clone()
        result = call_student(fn, z_given, y_given, case=case)
        _unchanged02(z_given, z, "gradient function", "logits", case)
        _unchanged02(y_given, y, "gradient function", "targets", case)
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
                 f"row's own maximum before exp (softmax(z) = softmax(z - max z); not the first element or "
                 f"the mean of the row) or use torch.softmax.")
        if result.shape == expected.shape:
            _dtype02(result, z.dtype, "your gradient", case)
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


@exercise("02.2", points=1, forbid=("course_lib.parts.losses:log_softmax", "course_lib.parts.losses:logsumexp"))
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
        "rows whose largest logit is not first: [[-1000, 0, 1000], [0, 1000, -1000]]":
            torch.tensor([[-1000.0, 0.0, 1000.0], [0.0, 1000.0, -1000.0]], dtype=torch.float64),
        "two rows 2000 apart: [[1000, 999, 998], [-1000, -1001, -1002]]":
            torch.tensor([[1000.0, 999.0, 998.0], [-1000.0, -1001.0, -1002.0]], dtype=torch.float64),
        "float64 logits (4, 6)": torch.randn(4, 6, generator=generator, dtype=torch.float64) * 10,
    }
    for case, z in cases.items():
        z_given = z.clone()
        result = call_student(fn, z_given, case=case)
        _unchanged02(z_given, z, "log_softmax", "z", case)
        result = require_tensor(result, "your log_softmax")
        expected = torch.log_softmax(z.double(), dim=-1)
        if result.shape == expected.shape:
            _dtype02(result, z.dtype, "your log_softmax", case)
        if result.shape == expected.shape and not torch.isfinite(result).all() and z.abs().max() >= 500:
            if torch.isnan(result).any():
                fail(f"your log_softmax gives nan on {case}: exp(1000) overflows to inf (and inf/inf is nan); "
                     f"subtract each row's maximum from z before taking exp.")
            fail(f"your log_softmax gives -inf on {case}, where the answer is a finite number like -1000: a "
                 f"softmax or a sum of exponentials underflowed to exactly 0 and log(0) = -inf; subtract each "
                 f"row's own maximum m (keepdim=True) and compute (z - m) - log(sum(exp(z - m))), never the log "
                 f"of a softmax.")
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


@exercise("02.3", points=1, autograd=True, forbid=(
    "course_lib.parts.gradcheck:numerical_grad",
    "course_lib.parts.gradcheck:gradcheck",
))
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
