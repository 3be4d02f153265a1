"""Checks of notebooks/05_scaling_laws.ipynb (exercises 05.*), with their hints."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch

from course_lib.checks.framework import (
    exercise, CheckFailed, NotAttempted, student_code, register_hint, fail, call_student, close, diagnose,
    not_attempted_message, passed,
)


# ----------------------------------------------------------------------------------------------
# ---- 05_scaling_laws: an IsoFLOP vertex, a power law fitted in log space, the scaling lab (a prediction
# ---- at 10x the budget, graded against the record), and the compute-optimal allocation
# ----------------------------------------------------------------------------------------------

register_hint("05.1",
              "Along one IsoFLOP line the loss is U-shaped in ln N, so fit a parabola L ≈ c2·x² + c1·x + c0 with "
              "x = ln N and take its lowest point, not the lowest measured run.",
              "np.polyfit(x, L, 2) returns (c2, c1, c0), highest power first. The vertex of a parabola is at "
              "x* = −c1 / (2·c2), and its value there is c0 − c1² / (4·c2). If c2 <= 0 the parabola has no "
              "minimum: raise ValueError. Go back from x* to N with exp. Work on copies; never sort the inputs in place.",
              "c2, c1, c0 = np.polyfit(np.log(N), L, 2); x = -c1 / (2 * c2); "
              "return float(np.exp(x)), float(c0 - c1**2 / (4 * c2))")
register_hint("05.2",
              "Take logarithms of both sides of L = A·N^(−α): ln L = ln A − α·ln N is a straight line in "
              "(ln N, ln L), so an ordinary least-squares line does the fit.",
              "Fit a degree-1 polynomial to (ln N, ln L). Its slope is −α (mind the sign: L falls as N grows) and its "
              "intercept is ln A; undo the logarithm with the same base you used to take it.",
              "slope, intercept = np.polyfit(np.log(N), np.log(L), 1); return float(np.exp(intercept)), float(-slope)")
register_hint("05.3",
              "Do at each budget on offer what section 2 did with one line: find its best size and its loss there. "
              "Then see how both move with C, and extrapolate them to service.target_budget.",
              "Take the sizes from service.menu() (the check also asks copies whose sizes differ); the allowance "
              "buys five runs per budget on offer, enough for one parabola each (scaling.isoflop_minimum, or your "
              "05.1). Fit N_opt ∝ C^a through the vertices "
              "(scaling.fit_exponent) and, for the loss, a power law in C of what is left above the floor: "
              "L_opt(C) − service.floor ∝ C^(−γ) (scaling.fit_power_law with floor=False).",
              "fit = scaling.fit_exponent(C_on_offer, N_opt_on_offer); "
              "N_pred = fit['k'] * service.target_budget ** fit['a']  (and the same for L_opt − service.floor)")
register_hint("05.4",
              "Substitute D = C/(6N) into L(N, D), set the derivative with respect to N to zero, and solve "
              "for N: the optimum is a power of C/6 times a constant G.",
              "The derivation in the notebook gives N_opt = G·(C/6)^(β/(α+β)) with G = (αA/(βB))^(1/(α+β)), and "
              "D_opt follows from the budget: D_opt = C / (6·N_opt). Check that 6·N_opt·D_opt equals C.",
              "G = (alpha * A / (beta * B)) ** (1 / (alpha + beta)); N_opt = G * (C / 6) ** (beta / (alpha + beta)); "
              "return N_opt, C / (6 * N_opt)")


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


def _unchanged(N_in: Any, N: Any, L_in: Any, L: Any, n_name: str, l_name: str, case: str) -> None:
    """Fail if the student's function changed its input arrays in place (sorted them, overwrote them)."""
    __tracebackhide__ = True
    import numpy as np

    for name, given, original in ((n_name, N_in, N), (l_name, L_in, L)):
        if not np.array_equal(np.asarray(given), np.asarray(original)):
            fail(f"your function changed the array {name} it was given on {case} (sorted or overwrote it in "
                 f"place); work on a copy, e.g. np.log({name}) or np.sort({name}), never {name}.sort().")


def _same_vertex(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether (N_opt, L_opt) agree with the reference: N_opt to the nearest whole parameter (a rounded N_opt is
    right: parameters come in whole numbers) or to 1e-6 of itself, L_opt to 1e-6 of itself."""
    (N, L), (N_ref, L_ref) = actual.tolist(), expected.tolist()
    return abs(N - N_ref) <= max(1.0, 1e-6 * abs(N_ref)) and abs(L - L_ref) <= 1e-9 + 1e-6 * abs(L_ref)


@exercise("05.1", points=1, forbid=(
    "course_lib.parts.scaling:isoflop_minimum",
    "course_lib.parts.scaling:isoflop_minima",
))
def check_isoflop_vertex(fn: Callable[[Any, Any], tuple[float, float]]) -> None:
    """Exercise 05.1: ``fn(N, L)`` fits a parabola to L against ln N and returns its vertex (N_opt, L_opt).

    N and L are 1-D numpy float64 arrays in any order (one entry per run on one IsoFLOP line). If the
    parabola opens downward (no minimum) ``fn`` raises ``ValueError``. The reference is
    ``course_lib.parts.scaling.isoflop_minimum``.
    """
    __tracebackhide__ = True
    import math

    import numpy as np

    from course_lib.parts import scaling

    rng = np.random.default_rng(11)
    N1 = np.geomspace(1e3, 6.4e4, 7)                       # the vertex sits exactly on the 4th run
    N2 = np.geomspace(2e3, 5e4, 6)                         # the vertex lies between two runs
    N3 = np.geomspace(1e6, 1e12, 9)                        # seven decades: a fit against N itself fails
    N4 = rng.permutation(np.geomspace(1e4, 1e6, 8))        # the runs arrive in no particular order

    def bowl(N, x0, c2, L0):
        return L0 + c2 * (np.log(N) - x0) ** 2

    cases = {
        "an exact parabola whose vertex is one of the runs": (N1, bowl(N1, math.log(8e3), 0.05, 1.5)),
        "an exact parabola whose vertex lies between runs": (N2, bowl(N2, math.log(1.3e4), 0.08, 1.4)),
        "noisy losses over seven decades of N (1e6 to 1e12)":
            (N3, bowl(N3, math.log(3e8), 0.01, 2.0) + rng.normal(0, 0.004, 9)),
        "runs given in shuffled order": (N4, bowl(N4, math.log(1e5), 0.03, 1.3) + rng.normal(0, 0.002, 8)),
    }
    for case, (N, L) in cases.items():
        N_in, L_in = N.copy(), L.copy()
        result = call_student(fn, N_in, L_in, case=case)
        _unchanged(N_in, N, L_in, L, "N", "L", case)
        actual = _two_numbers(result, "your isoflop_vertex", "(N_opt, L_opt)", case)
        ref = scaling.isoflop_minimum(N, L)
        expected = torch.tensor([ref["N_opt"], ref["L_opt"]], dtype=torch.float64)
        c2, c1, c0 = np.polyfit(np.log(N), L, 2)
        d2, d1, d0 = np.polyfit(np.log10(N), L, 2)

        def pair(n: Any, l: Any) -> Callable[[], torch.Tensor]:
            return lambda: torch.tensor([float(n), float(l)], dtype=torch.float64)

        def linear_N() -> torch.Tensor:
            e2, e1, e0 = np.polyfit(N, L, 2)
            return torch.tensor([-e1 / (2 * e2), e0 - e1**2 / (4 * e2)], dtype=torch.float64)

        wrong = {
            "you returned the best measured run; fit a parabola in ln N and return its vertex, which can lie "
            "between the runs": pair(N[np.argmin(L)], L.min()),
            "you fitted the parabola against N itself; the IsoFLOP curve is a parabola in x = ln N": linear_N,
            "the vertex of c2·x² + c1·x + c0 is at x = −c1/(2·c2); your sign is flipped":
                pair(math.exp(c1 / (2 * c2)), c0 - c1**2 / (4 * c2)),
            "you returned x = ln N_opt; return N_opt = exp(x)": pair(-c1 / (2 * c2), c0 - c1**2 / (4 * c2)),
            "you fitted against log10 N but undid it with exp; use 10**x for log10 (or np.log throughout)":
                pair(math.exp(-d1 / (2 * d2)), d0 - d1**2 / (4 * d2)),
            "np.polyfit returns the highest power first (c2, c1, c0); you read the coefficients in reverse":
                pair(math.exp(-c1 / (2 * c0)), c2 - c1**2 / (4 * c0)),
            "your L_opt is the lowest measured loss; return the parabola's value at its vertex, "
            "c0 − c1²/(4·c2)": pair(ref["N_opt"], L.min()),
        }
        if _same_vertex(actual, expected):
            continue
        reason = diagnose(actual, wrong, atol=1e-9, rtol=1e-6)
        if reason:
            fail(f"your vertex is wrong on {case}: {reason}.")
        N_off = abs(actual[0].item() - ref["N_opt"]) > max(1.0, 1e-6 * ref["N_opt"])
        fail(f"on {case} your {'N_opt' if N_off else 'L_opt'} is not the vertex of the least-squares parabola in "
             f"ln N through these runs; fit all of them with np.polyfit(np.log(N), L, 2).")
    N = np.geomspace(1e3, 1e5, 6)
    L = 2.0 - 0.05 * (np.log(N) - math.log(1e4)) ** 2       # curves downward: a maximum, no minimum
    try:
        with student_code():
            result = fn(N.copy(), L.copy())
    except ValueError:
        pass
    except NotImplementedError as stub:
        raise NotAttempted(not_attempted_message(str(stub))) from None
    except CheckFailed:
        raise
    except Exception as error:  # noqa: BLE001 -- any other exception is the wrong kind of refusal
        fail(f"on losses that curve downward your function raised {type(error).__name__}; raise ValueError "
             f"(the runs bracket no minimum) instead.")
    else:
        fail("on losses that curve downward (c2 < 0) your function returned a vertex, which is the parabola's "
             "maximum; check the sign of c2 and raise ValueError when the runs bracket no minimum.")
    passed("check_isoflop_vertex", f"your parabola vertex matches the reference on {len(cases)} IsoFLOP lines "
                                   f"(between runs, over seven decades, shuffled) and refuses a downward curve.")


@exercise("05.2", points=1, forbid=(
    "course_lib.parts.scaling:fit_power_law",
    "course_lib.parts.scaling:fit_exponent",
))
def check_power_law_fit(fn: Callable[[Any, Any], tuple[float, float]]) -> None:
    """Exercise 05.2: ``fn(N, L)`` fits L = A · N^(−alpha) by least squares in log space; returns (A, alpha).

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
        N_in, L_in = N.copy(), L.copy()
        result = call_student(fn, N_in, L_in, case=case)
        _unchanged(N_in, N, L_in, L, "N", "L", case)
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
            fail(f"your fit on {case} (A={actual[0].item():.4g}, alpha={actual[1].item():.4g}) is not the "
                 f"least-squares line through (ln N, ln L) of all the runs.")
        exact_ok = True
    passed("check_power_law_fit", f"your log-space fit matches the reference on {len(cases)} cases, noisy ones "
                                  f"included.")


@exercise("05.4", points=1, forbid=(
    "course_lib.parts.scaling:compute_optimal",
    "course_lib.parts.scaling:optimal_exponents",
))
def check_compute_optimal(fn: Callable[[float, Mapping[str, float]], tuple[float, float]]) -> None:
    """Exercise 05.4: ``fn(C, params)`` returns (N_opt, D_opt) minimising E + A/N^alpha + B/D^beta under C = 6ND.

    ``params`` is a dict with keys E, A, B, alpha, beta (like ``scaling.CHINCHILLA_APPROACH3``).
    """
    __tracebackhide__ = True
    from course_lib.parts import scaling

    cases = {
        "Chinchilla's printed (rounded) Approach 3 law at the Gopher budget (C=5.76e23)":
            (5.76e23, scaling.CHINCHILLA_APPROACH3),
        "the replication's law at C=1e21": (1e21, scaling.BESIROGLU_2024),
        "a lopsided law (alpha=0.6, beta=0.2) at C=1e19":
            (1e19, {"E": 1.0, "A": 50.0, "B": 3000.0, "alpha": 0.6, "beta": 0.2}),
    }
    for case, (C, params) in cases.items():
        given = dict(params)
        result = call_student(fn, C, given, case=case)
        if given != dict(params):
            fail(f"your compute_optimal changed the params dict it was given on {case}; read the constants "
                 f"without writing to (or popping from) the caller's dict.")
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
        # 1e-4: a numerical minimiser at its default tolerance (scipy's bounded minimize_scalar on ln N lands
        # within ~1e-6, minimize within ~1e-5) is a right answer; every mistake above is off by far more
        if close(actual, expected, atol=0.0, rtol=1e-4):
            continue
        reason = diagnose(actual, wrong, atol=0.0, rtol=1e-4)
        if reason:
            fail(f"your allocation is wrong on {case}: {reason}.")
        n, d = actual.tolist()
        if abs(6 * n * d / C - 1) > 1e-6:
            fail(f"on {case} your N_opt·D_opt·6 is {6 * n * d:.4g}, but it must equal the budget C={C:.4g}.")
        fail(f"on {case} the law's loss is lower at another N along 6·N·D = C than at your N_opt={n:.4g}; use the "
             f"closed form with the constants exactly as given (unrounded).")
    passed("check_compute_optimal", f"your closed form matches the reference on {len(cases)} laws, among them "
                                    f"the ~32B parameters that Chinchilla's printed (rounded) constants give at the "
                                    f"Gopher budget (the unrounded ones give the paper's ~40B).")


@functools.cache
def _lab_worlds() -> tuple[tuple[str, Any, dict[str, Any]], ...]:
    """(name, record, answer) of the recorded sweep and of its copies, computed once per session."""
    from course_lib.experiments import scaling_lab

    return tuple((name, record, scaling_lab.lab_truth(record, n_resamples=0))
                 for name, record in scaling_lab.lab_worlds().items())


def _lab_prediction(fn: Callable[[Any], Mapping[str, float]], service: Any, world: str) -> tuple[float, float]:
    """Call the student's lab function on one service; (N_opt, loss) or one sentence saying what is wrong."""
    __tracebackhide__ = True
    import math

    from course_lib.experiments import scaling_lab

    case = "the recorded sweep" if world == "recorded" else "a transformed copy of the sweep (see the lesson)"
    try:
        result = call_student(fn, service, case=case, passthrough=(scaling_lab.FlopBudgetExceeded,))
    except scaling_lab.FlopBudgetExceeded as error:
        fail(f"your plan asked for more runs than the FLOP budget buys ({error}); pick at most five runs per "
             f"budget on offer.")
    if not isinstance(result, Mapping) or not {"N_opt", "loss"} <= set(result):
        keys = f" with keys {sorted(map(str, result))}" if isinstance(result, Mapping) else ""
        fail(f"return a dict {{'N_opt': ..., 'loss': ...}} with your prediction at C={service.target_budget:.0e}, "
             f"not {type(result).__name__}{keys}.")
    try:
        N_pred, L_pred = float(result["N_opt"]), float(result["loss"])
    except (TypeError, ValueError):
        fail("N_opt and loss should be plain numbers (floats).")
    if not (math.isfinite(N_pred) and math.isfinite(L_pred)) or N_pred <= 0:
        fail(f"your prediction is N_opt={N_pred}, loss={L_pred}; both must be finite and N_opt positive.")
    if not service.bought:
        fail("you never bought a run from the service; the prediction must come from runs (service.train(N, C)).")
    return N_pred, L_pred


def _why_N_missed(N_pred: float, service: Any) -> str:
    """A sentence for an N_opt outside the tolerance: a known mistake it resembles, never a direction."""
    import math

    from course_lib.parts import scaling

    biggest = max(service.offered_budgets)
    on_offer = [r for r in scaling.mean_over_seeds(service._runs.values()) if r["C_budget"] == biggest]
    there = scaling.isoflop_minimum([r["N"] for r in on_offer], [r["val_loss"] for r in on_offer])["N_opt"]
    near = lambda x, y: abs(math.log(x / y)) <= math.log(1.15)  # noqa: E731
    if near(N_pred, there):
        return (f"your N_opt is the optimum of the largest budget on offer (C={biggest:.0e}); the question is about "
                f"C={service.target_budget:.0e}, ten times more compute, so extrapolate N_opt ∝ C^a")
    if near(N_pred, there * service.target_budget / biggest):
        return ("you scaled N_opt in proportion to C (a = 1, all extra compute into parameters); fit the exponent a "
                "of N_opt ∝ C^a from the budgets on offer: the tokens must grow too")
    if service.target_budget / (6 * N_pred) < N_pred:
        return ("your N_opt would leave fewer training tokens than parameters (D = C/6N); it looks like a number of "
                "tokens, not of parameters")
    return (f"your N_opt is outside the tolerance around the recorded optimum at C={service.target_budget:.0e} "
            f"(the check does not say in which direction: that would give the answer away)")


def _why_loss_missed(L_pred: float, service: Any) -> str:
    """A sentence for a loss outside the tolerance: a known mistake it resembles, never a direction."""
    from course_lib.parts import scaling

    biggest = max(service.offered_budgets)
    on_offer = [r for r in scaling.mean_over_seeds(service._runs.values()) if r["C_budget"] == biggest]
    there = scaling.isoflop_minimum([r["N"] for r in on_offer], [r["val_loss"] for r in on_offer])["L_opt"]
    if abs(L_pred - service.floor) <= 0.005:
        return "you predicted the floor itself; a finite budget stays above it (extrapolate L − floor ∝ C^(−γ))"
    if L_pred < service.floor:
        return (f"your loss {L_pred:.3f} is below the floor {service.floor:.3f}, which no model can beat on average; "
                f"extrapolate what is left above the floor, L − floor ∝ C^(−γ)")
    if abs(L_pred - there) <= 0.01:
        return (f"your loss is what the largest budget on offer (C={biggest:.0e}) reaches; ten times more compute "
                f"lowers it, so extrapolate the loss too")
    return (f"your loss is outside the tolerance around the recorded best loss at C={service.target_budget:.0e} "
            f"(the check does not say in which direction: that would give the answer away)")


@exercise("05.3", points=3, forbid=(
    "course_lib.experiments.scaling_lab:lab_truth",
    "course_lib.experiments.scaling_lab:lab_tolerances",
    "course_lib.experiments.scaling_lab:lab_choices",
    "course_lib.experiments.scaling_lab:extrapolate_optimum",
    "course_lib.experiments.scaling_lab:lab_worlds",
    "course_lib.experiments.scaling_lab:copy_of_record",
    "course_lib.experiments.scaling_lab:naive_guesses",
    "course_lib.experiments.scaling_lab:grading_evidence",
    "course_lib.experiments.scaling_lab:recorded_runs",
    "course_lib.experiments.scaling_lab:_scaling_record",
    "course_lib.tools.results:recorded",
))
def check_scaling_prediction(fn: Callable[[Any], Mapping[str, float]]) -> None:
    """Exercise 05.3 (the scaling lab): ``fn(service)`` buys runs from a fresh ``scaling_lab.TrainingService``
    and returns ``{"N_opt": ..., "loss": ...}`` at ``service.target_budget``.

    Graded against the recorded runs at that budget (``scaling_lab.lab_truth``) by ``scaling_lab.grade``:
    N_opt within a factor ``N_FACTOR`` and the loss's height above the floor within a factor ``EXCESS_FACTOR``.
    ``fn`` is then asked the same question about each of ``scaling_lab.COPIES`` (the sweep transformed so that
    its answer moves in a known way) and must pass there too: a prediction that does not come from the runs
    bought cannot. A refusal names the quantity that missed and the mistake it resembles, never the direction
    or the answer; a passing prediction is shown the answer.
    """
    __tracebackhide__ = True
    from course_lib.experiments import scaling_lab

    try:
        worlds = _lab_worlds()
    except FileNotFoundError as error:
        fail(str(error))
    shown: dict[str, Any] = {}
    missed: set[str] = set()
    for world, record, truth in worlds:
        service = scaling_lab.TrainingService.from_record(record)
        N_pred, L_pred = _lab_prediction(fn, service, world)
        verdict = scaling_lab.grade({"N_opt": N_pred, "loss": L_pred}, truth)
        if world == "recorded":
            if not verdict["N_ok"]:
                fail(_why_N_missed(N_pred, service) + ".")
            if not verdict["loss_ok"]:
                fail(_why_loss_missed(L_pred, service) + ".")
            shown = {"service": service, "N": N_pred, "L": L_pred, "truth": truth, "verdict": verdict}
        else:
            missed |= {q for q, ok in (("N_opt", verdict["N_ok"]), ("loss", verdict["loss_ok"])) if not ok}
    if missed:
        what = "its N_opt and its loss miss" if len(missed) == 2 else f"its {missed.pop()} misses"
        fail(f"your prediction passes on the recorded sweep, but {what} on transformed copies of it (see the lesson), "
             f"so it does not follow the runs your function bought: compute it from them rather than typing a number "
             f"in or assuming an exponent.")
    service, truth, verdict = shown["service"], shown["truth"], shown["verdict"]
    off_N = max(verdict["N_ratio"], 1 / verdict["N_ratio"])
    off_L = max(verdict["excess_ratio"], 1 / verdict["excess_ratio"])
    passed("check_scaling_prediction",
           f"from {len(service.bought)} runs ({service.spent:.2g} of {service.flop_budget:.2g} FLOPs) you predicted "
           f"N_opt = {shown['N']:,.0f} and loss {shown['L']:.3f} at C = {service.target_budget:.0e}; the recorded "
           f"answer is N_opt = {truth['N_opt']:,.0f}, loss {truth['loss']:.3f}: off by a factor {off_N:.2f} in N_opt "
           f"and {off_L:.2f} in the height above the floor (tolerances {scaling_lab.N_FACTOR:g} and "
           f"{scaling_lab.EXCESS_FACTOR:g}); it passes on the {len(worlds) - 1} transformed copies too.")
