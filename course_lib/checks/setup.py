"""Checks of notebooks/00_setup.ipynb (exercises 00.*), with their hints."""

from __future__ import annotations

import numbers
from collections.abc import Callable

import numpy as np
import torch

from course_lib.checks.framework import (
    exercise, register_hint, fail, call_student, require_tensor, compare, passed,
)


# ----------------------------------------------------------------------------------------------
# 00_setup: the warm-up exercise
# ----------------------------------------------------------------------------------------------

register_hint("00.1",
              "The error of one element is pred - target; squaring makes every error count positively.",
              "Square the differences element by element, then average over all elements (not only one axis).",
              "return ((pred - target) ** 2).mean()")


@exercise("00.1", points=1)
def check_mse(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """Warm-up: ``fn(pred, target)`` returns the mean squared error: one number (a 0-d tensor, or a Python or
    NumPy number)."""
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
        # one number is what is asked: a Python or NumPy number (np.mean(...)) is as good as a 0-d tensor
        if isinstance(result, np.ndarray) and result.ndim == 0:
            result = result.item()
        if isinstance(result, numbers.Real) and not isinstance(result, bool):
            result = torch.tensor(float(result), dtype=torch.float64)
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
