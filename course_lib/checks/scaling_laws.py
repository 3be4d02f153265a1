"""Checks of notebooks/05_scaling_laws.ipynb (exercises 05.*), with their hints."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from course_lib.checks.framework import (
    register_hint, fail, call_student, close, diagnose, passed,
)


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
