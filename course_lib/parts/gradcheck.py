"""Finite-difference gradient checking: is a hand-written gradient right?

Explained in notebooks/02_cross_entropy.ipynb ("Checking gradients numerically").

For a scalar function ``f`` of a tensor ``x`` the central difference

    df/dx_i  ~  (f(x + eps e_i) - f(x - eps e_i)) / (2 eps)

has truncation error O(eps^2) (the forward difference ``(f(x + eps e_i) - f(x)) / eps`` only O(eps)),
and rounding error about ``machine_eps * |f| / eps``. In float64 with ``eps = 1e-6`` both are tiny,
so a correct analytic gradient agrees to about 1e-9 relative error and a wrong one is off by far more.

``gradcheck`` reports the largest element-wise relative error

    rel_i = |a_i - n_i| / max(|a_i|, |n_i|, floor)

between the analytic gradient ``a`` and the numerical one ``n``. The ``floor`` keeps entries where
the true gradient is (almost) zero from dividing rounding noise by zero: below it, an entry is judged
by its absolute error divided by ``floor``. The rounding noise grows like ``1e-16 * |f| / eps``, so
for a function with large values (|f| in the hundreds) raise ``floor`` or ``tol`` accordingly.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["numerical_grad", "relative_error", "GradcheckResult", "gradcheck"]

Function = Callable[[torch.Tensor], "torch.Tensor | float"]


def _as_float(value: object, where: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"f must return a scalar (one number) to be differentiated, but returned a "
                             f"tensor of shape {tuple(value.shape)} {where}; reduce it, e.g. with .sum() "
                             f"or .mean().")
        return float(value.detach().double().item())
    if isinstance(value, numbers.Real) and not isinstance(value, bool):   # NumPy scalars included
        return float(value)
    raise TypeError(f"f must return a number or a one-element tensor, but returned a "
                    f"{type(value).__name__} {where}.")


def numerical_grad(f: Function, x: torch.Tensor, eps: float = 1e-6, *,
                   method: str = "central", dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
    """The finite-difference gradient of the scalar function ``f`` at ``x`` (same shape as ``x``).

    ``method`` is ``"central"`` (default, error O(eps^2)) or ``"forward"`` (error O(eps), shown in the
    notebook for comparison). ``x`` is copied to ``dtype`` (float64 by default; ``None`` keeps its own
    dtype, e.g. to see how badly float32 does); ``x`` itself is never modified. Costs 2 evaluations of
    ``f`` per element (central) -- use it on small inputs.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, but got a {type(x).__name__}; "
                        f"use torch.tensor(x, dtype=torch.float64).")
    if not callable(f):
        raise TypeError(f"f must be a function of one tensor returning a scalar, but got a {type(f).__name__}.")
    if method not in ("central", "forward"):
        raise ValueError(f"method must be 'central' or 'forward', but is {method!r}.")
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a positive number (1e-6 suits float64), but is {eps!r}.")
    eps = float(eps)
    dtype = dtype if dtype is not None else x.dtype
    if not dtype.is_floating_point:
        raise TypeError(f"finite differences need a floating-point dtype, but got {dtype}; "
                        f"use dtype=torch.float64.")
    x = x.detach().to(dtype=dtype).clone()
    flat = x.view(-1)  # shares memory with x: nudging flat[i] nudges x
    grad = torch.empty_like(flat)
    f0 = _as_float(f(x), "at x") if method == "forward" else 0.0
    with torch.no_grad():
        for i in range(flat.numel()):
            original = flat[i].item()
            flat[i] = original + eps
            f_plus = _as_float(f(x), f"at x + eps*e_{i}")
            if method == "central":
                flat[i] = original - eps
                f_minus = _as_float(f(x), f"at x - eps*e_{i}")
                grad[i] = (f_plus - f_minus) / (2 * eps)
            else:
                grad[i] = (f_plus - f0) / eps
            flat[i] = original
    return grad.view_as(x)


def relative_error(analytic: torch.Tensor, numeric: torch.Tensor, floor: float = 1e-3) -> torch.Tensor:
    """Element-wise ``|a - n| / max(|a|, |n|, floor)`` in float64 (same shape as the inputs)."""
    for name, t in (("analytic", analytic), ("numeric", numeric)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, but got a {type(t).__name__}.")
    if analytic.shape != numeric.shape:
        raise ValueError(f"the analytic gradient has shape {tuple(analytic.shape)} but the numerical one "
                         f"has shape {tuple(numeric.shape)}; a gradient has the shape of its input.")
    a = analytic.detach().double().cpu()
    n = numeric.detach().double().cpu()
    scale = torch.maximum(torch.maximum(a.abs(), n.abs()), torch.full_like(a, floor))
    return (a - n).abs() / scale


@dataclass
class GradcheckResult:
    """What :func:`gradcheck` found. Truthy when the check passed; ``print`` it for the report."""

    passed: bool
    max_relative_error: float
    max_abs_error: float
    worst_index: tuple[int, ...]
    analytic: torch.Tensor
    numeric: torch.Tensor
    tol: float
    eps: float
    method: str = "central differences"

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        i = self.worst_index
        a = self.analytic[i].item() if self.analytic.numel() else float("nan")
        n = self.numeric[i].item() if self.numeric.numel() else float("nan")
        return (f"gradcheck {verdict}: max relative error {self.max_relative_error:.2e} "
                f"({'<=' if self.passed else '>'} tol {self.tol:.0e}), max abs error {self.max_abs_error:.2e}, "
                f"worst at index {i}: analytic {a:.6g} vs numerical {n:.6g} "
                f"({self.numeric.numel()} entries, {self.method}, eps={self.eps:g}, float64)")


def gradcheck(f: Function, x: torch.Tensor,
              analytic_grad: torch.Tensor | Callable[[torch.Tensor], torch.Tensor], *,
              eps: float = 1e-6, tol: float = 1e-5, floor: float = 1e-3,
              raise_on_failure: bool = False,
              numerical: Callable[[Function, torch.Tensor, float], torch.Tensor] | None = None) -> GradcheckResult:
    """Compare an analytic gradient of ``f`` at ``x`` with central differences in float64.

    ``analytic_grad`` is the gradient tensor, or a function ``x -> gradient`` (called on a float64
    copy of ``x``). Passes when the largest relative error (see :func:`relative_error`) is at most
    ``tol``. With ``raise_on_failure=True`` a failure raises ``AssertionError`` with the report.
    ``numerical(f, x, eps)`` computes the central differences instead of :func:`numerical_grad`
    (notebook 02 passes the student's own, exercise 02.3).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, but got a {type(x).__name__}.")
    x64 = x.detach().double().clone()
    if callable(analytic_grad) and not isinstance(analytic_grad, torch.Tensor):
        analytic = analytic_grad(x64.clone())
        if not isinstance(analytic, torch.Tensor):
            raise TypeError(f"analytic_grad(x) must return a tensor, but returned a {type(analytic).__name__}.")
    else:
        analytic = analytic_grad
    if not isinstance(analytic, torch.Tensor):
        raise TypeError(f"analytic_grad must be a tensor or a function returning one, not a "
                        f"{type(analytic_grad).__name__}.")
    if analytic.shape != x.shape:
        raise ValueError(f"the analytic gradient has shape {tuple(analytic.shape)}, but x has shape "
                         f"{tuple(x.shape)}; the gradient of a scalar has the shape of its input.")
    analytic = analytic.detach().double().cpu()
    if numerical is None:
        numeric, method = numerical_grad(f, x64, eps=eps).cpu(), "central differences"
    else:
        numeric, method = numerical(f, x64.clone(), eps), f"central differences by {getattr(numerical, '__name__', 'yours')}"
        if not isinstance(numeric, torch.Tensor) or numeric.shape != x.shape:
            shape = tuple(numeric.shape) if isinstance(numeric, torch.Tensor) else type(numeric).__name__
            raise ValueError(f"numerical(f, x, eps) must return a tensor of x's shape {tuple(x.shape)}, but "
                             f"returned {shape}.")
        numeric = numeric.detach().double().cpu()
    rel = relative_error(analytic, numeric, floor=floor)
    if rel.numel() == 0:
        worst, max_rel, max_abs = (), 0.0, 0.0
    else:
        rel_clean = rel.nan_to_num(nan=float("inf"))
        worst = tuple(int(k) for k in torch.unravel_index(rel_clean.argmax(), rel.shape))
        max_rel = float(rel_clean.max())
        max_abs = float((analytic - numeric).abs().nan_to_num(nan=float("inf")).max())
    result = GradcheckResult(passed=max_rel <= tol, max_relative_error=max_rel, max_abs_error=max_abs,
                             worst_index=worst, analytic=analytic, numeric=numeric, tol=tol, eps=eps,
                             method=method)
    if raise_on_failure and not result.passed:
        raise AssertionError(str(result))
    return result
