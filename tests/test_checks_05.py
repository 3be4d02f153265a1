"""The checks of 05_scaling_laws accept correct answers and name each common mistake."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import optimize, stats

from course_lib import checks
from course_lib.checks import CheckFailed, NotAttempted, ReferenceCalled, StudentCodeError


def refused(check, fn) -> str:
    with pytest.raises(CheckFailed) as info:
        check(fn)
    return str(info.value)


# ---- 05.1 check_isoflop_vertex: a parabola in ln N through one IsoFLOP line, and its vertex -------


def vertex_polyfit(N, L):
    c2, c1, c0 = np.polyfit(np.log(N), L, 2)
    if c2 <= 0:
        raise ValueError("no minimum")
    x = -c1 / (2 * c2)
    return float(np.exp(x)), float(c0 - c1**2 / (4 * c2))


def vertex_log10(N, L):                        # log10 throughout is fine if it is undone with 10**
    c2, c1, c0 = np.polyfit(np.log10(N), L, 2)
    if c2 <= 0:
        raise ValueError("no minimum")
    return 10.0 ** (-c1 / (2 * c2)), c0 - c1**2 / (4 * c2)


def vertex_torch_lstsq(N, L):
    x = torch.log(torch.as_tensor(N, dtype=torch.float64))
    X = torch.stack([x**2, x, torch.ones_like(x)], dim=1)
    c2, c1, c0 = torch.linalg.lstsq(X, torch.as_tensor(L, dtype=torch.float64)[:, None]).solution[:, 0]
    if c2 <= 0:
        raise ValueError("the runs bracket no minimum")
    return torch.exp(-c1 / (2 * c2)), c0 - c1**2 / (4 * c2)


def vertex_library(N, L):
    from course_lib.parts import scaling

    found = scaling.isoflop_minimum(N, L)
    return found["N_opt"], found["L_opt"]


def vertex_rounded_to_whole_parameters(N, L):   # issue 20: parameters come in whole numbers
    N_opt, L_opt = vertex_polyfit(N, L)
    return round(N_opt), L_opt


def vertex_int_and_numpy_scalars(N, L):       # truncated to an int; numpy scalars where numbers are expected
    c2, c1, c0 = np.polyfit(np.log(N), L, 2)
    if c2 <= 0:
        raise ValueError("no minimum")
    return int(np.exp(-c1 / (2 * c2))), np.float64(c0 - c1**2 / (4 * c2))


def vertex_by_derivative(N, L):               # the vertex as the root of the parabola's derivative (np.roots)
    poly = np.polyfit(np.log(N), L, 2)
    if poly[0] <= 0:
        raise ValueError("no minimum")
    x = np.roots(np.polyder(poly))[0].real
    return float(np.exp(x)), float(np.polyval(poly, x))


@pytest.mark.parametrize("fn", [vertex_polyfit, vertex_log10, vertex_torch_lstsq, vertex_rounded_to_whole_parameters,
                                vertex_int_and_numpy_scalars, vertex_by_derivative])
def test_isoflop_vertex_accepts_correct_answers(fn, capsys):
    checks.check_isoflop_vertex(fn)
    assert "check_isoflop_vertex passed" in capsys.readouterr().out


def vertex_best_run(N, L):                     # right when the vertex is one of the runs, wrong between runs
    i = int(np.argmin(L))
    return N[i], L[i]


def vertex_against_N(N, L):
    c2, c1, c0 = np.polyfit(N, L, 2)
    return -c1 / (2 * c2), c0 - c1**2 / (4 * c2)


def vertex_sign_flipped(N, L):
    c2, c1, c0 = np.polyfit(np.log(N), L, 2)
    return np.exp(c1 / (2 * c2)), c0 - c1**2 / (4 * c2)


def vertex_returns_log(N, L):
    c2, c1, c0 = np.polyfit(np.log(N), L, 2)
    return -c1 / (2 * c2), c0 - c1**2 / (4 * c2)


def vertex_log10_then_exp(N, L):
    c2, c1, c0 = np.polyfit(np.log10(N), L, 2)
    return np.exp(-c1 / (2 * c2)), c0 - c1**2 / (4 * c2)


def vertex_reversed_coefficients(N, L):
    c0, c1, c2 = np.polyfit(np.log(N), L, 2)   # polyfit gives the highest power first
    return np.exp(-c1 / (2 * c2)), c0 - c1**2 / (4 * c2)


def vertex_min_loss(N, L):
    N_opt, _ = vertex_polyfit(N, L)
    return N_opt, L.min()


def vertex_sorts_in_place(N, L):               # right numbers, but the caller's arrays are reordered
    order = np.argsort(N)
    N.sort()
    L[:] = L[order]
    return vertex_polyfit(N, L)


def vertex_no_concavity_check(N, L):           # right on every U-shaped line, returns a maximum otherwise
    c2, c1, c0 = np.polyfit(np.log(N), L, 2)
    return np.exp(-c1 / (2 * c2)), c0 - c1**2 / (4 * c2)


def vertex_asserts(N, L):                      # refuses the downward curve, but with the wrong exception
    c2, c1, c0 = np.polyfit(np.log(N), L, 2)
    assert c2 > 0, "no minimum"
    return np.exp(-c1 / (2 * c2)), c0 - c1**2 / (4 * c2)


@pytest.mark.parametrize("fn, sentence", [
    (vertex_best_run, "you returned the best measured run"),
    (vertex_against_N, "you fitted the parabola against N itself"),
    (vertex_sign_flipped, "your sign is flipped"),
    (vertex_returns_log, "you returned x = ln N_opt"),
    (vertex_log10_then_exp, "you fitted against log10 N but undid it with exp"),
    (vertex_reversed_coefficients, "you read the coefficients in reverse"),
    (vertex_min_loss, "your L_opt is the lowest measured loss"),
    (vertex_sorts_in_place, "your function changed the array N"),
    (vertex_no_concavity_check, "which is the parabola's maximum"),
    (vertex_asserts, "your function raised AssertionError; raise ValueError"),
])
def test_isoflop_vertex_names_each_mistake(fn, sentence):
    message = refused(checks.check_isoflop_vertex, fn)
    assert sentence in message
    assert "\n" not in message and len(message) < 400


def vertex_drops_the_end_runs(N, L):          # a parabola through the middle runs only: not the least-squares fit
    order = np.argsort(N)
    return vertex_polyfit(N[order][1:-1], L[order][1:-1])


def test_isoflop_vertex_refuses_without_giving_the_vertex_away():
    message = refused(checks.check_isoflop_vertex, vertex_drops_the_end_runs)
    assert "is not the vertex of the least-squares parabola in ln N" in message
    assert "N_opt=" not in message and "L_opt=" not in message


def test_isoflop_vertex_reports_shape_errors_stubs_and_crashes():
    assert "a pair (N_opt, L_opt)" in refused(checks.check_isoflop_vertex, lambda N, L: 3.0)
    with pytest.raises(NotAttempted):
        checks.check_isoflop_vertex(lambda N, L: (_ for _ in ()).throw(NotImplementedError("Exercise 05.1 is not done yet")))
    with pytest.raises(StudentCodeError, match="ZeroDivisionError"):
        checks.check_isoflop_vertex(lambda N, L: 1 / 0)


# ---- 05.2 check_power_law_fit --------------------------------------------------------------------


def fit_polyfit(N, L):
    slope, intercept = np.polyfit(np.log(N), np.log(L), 1)
    return np.exp(intercept), -slope


def fit_linregress(N, L):
    r = stats.linregress(np.log(N), np.log(L))
    return math.exp(r.intercept), -r.slope


def fit_torch_lstsq(N, L):
    x = torch.log(torch.as_tensor(N, dtype=torch.float64))
    X = torch.stack([torch.ones_like(x), x], dim=1)
    y = torch.log(torch.as_tensor(L, dtype=torch.float64))[:, None]
    coef = torch.linalg.lstsq(X, y).solution[:, 0]
    return torch.exp(coef[0]), -coef[1]


def fit_log10_consistent(N, L):
    slope, intercept = np.polyfit(np.log10(N), np.log10(L), 1)
    return 10.0 ** intercept, -slope


@pytest.mark.parametrize("fn", [fit_polyfit, fit_linregress, fit_torch_lstsq, fit_log10_consistent])
def test_power_law_fit_accepts_correct_answers(fn, capsys):
    checks.check_power_law_fit(fn)
    assert "check_power_law_fit passed" in capsys.readouterr().out


def fit_linear_space(N, L):
    popt, _ = optimize.curve_fit(lambda n, A, a: A * n ** -a, N, L, p0=fit_polyfit(N, L), maxfev=20000)
    return popt[0], popt[1]


def fit_linear_space_own_start(N, L):         # a linear-space fit started elsewhere lands on the same optimum
    popt, _ = optimize.curve_fit(lambda n, A, a: A * n ** -a, N, L, p0=(L[0] * N[0] ** 0.3, 0.3), maxfev=50000)
    return popt[0], popt[1]


def fit_sign_flipped(N, L):
    slope, intercept = np.polyfit(np.log(N), np.log(L), 1)
    return np.exp(intercept), slope


def fit_log10_then_exp(N, L):
    slope, intercept = np.polyfit(np.log10(N), np.log10(L), 1)
    return np.exp(intercept), -slope


def fit_ln_then_pow10(N, L):
    slope, intercept = np.polyfit(np.log(N), np.log(L), 1)
    return 10 ** intercept, -slope


def fit_returns_intercept(N, L):
    slope, intercept = np.polyfit(np.log(N), np.log(L), 1)
    return intercept, -slope


def fit_swapped_order(N, L):
    A, alpha = fit_polyfit(N, L)
    return alpha, A


def fit_endpoints_only(N, L):                 # two-point "fit": right on exact data only
    alpha = -(np.log(L[-1]) - np.log(L[0])) / (np.log(N[-1]) - np.log(N[0]))
    return L[0] * N[0] ** alpha, alpha


def fit_logs_in_place(N, L):                  # right numbers, but overwrites the caller's arrays with logs
    np.log(N, out=N)
    np.log(L, out=L)
    slope, intercept = np.polyfit(N, L, 1)
    return np.exp(intercept), -slope


@pytest.mark.parametrize("fn, sentence", [
    (fit_logs_in_place, "your function changed the array N"),
    (fit_linear_space, "you fitted in linear space"),
    (fit_linear_space_own_start, "you fitted in linear space"),
    (fit_sign_flipped, "the sign is flipped"),
    (fit_log10_then_exp, "you fitted with log10 but undid the intercept with exp"),
    (fit_ln_then_pow10, "you fitted with ln but undid the intercept with 10**"),
    (fit_returns_intercept, "you returned the intercept ln A"),
    (fit_swapped_order, "return them in the order (A, alpha)"),
    (fit_endpoints_only, "right on exact data but not on noisy losses"),
])
def test_power_law_fit_names_each_mistake(fn, sentence):
    assert sentence in refused(checks.check_power_law_fit, fn)


def fit_drops_a_point(N, L):                  # leaves out the last run: right on exact data only
    return fit_polyfit(N[:-1], L[:-1])


def test_power_law_fit_refuses_without_giving_the_fit_away():
    message = refused(checks.check_power_law_fit, fit_drops_a_point)
    assert "right on exact data but not on noisy losses" in message and "gives A=" not in message


def test_power_law_fit_reports_shape_errors_stubs_and_crashes():
    assert "a pair (A, alpha)" in refused(checks.check_power_law_fit, lambda N, L: {"A": 1, "alpha": 2})
    assert "tensor of shape" in refused(checks.check_power_law_fit, lambda N, L: (torch.ones(2), 0.3))
    with pytest.raises(NotAttempted):
        checks.check_power_law_fit(lambda N, L: (_ for _ in ()).throw(NotImplementedError("Exercise 05.2 is not done yet")))
    with pytest.raises(StudentCodeError, match="ZeroDivisionError"):
        checks.check_power_law_fit(lambda N, L: 1 / 0)


# ---- 05.4 check_compute_optimal ------------------------------------------------------------------


def optimal_closed_form(C, p):
    s = p["alpha"] + p["beta"]
    G = (p["alpha"] * p["A"] / (p["beta"] * p["B"])) ** (1 / s)
    return G * (C / 6) ** (p["beta"] / s), (C / 6) ** (p["alpha"] / s) / G


def optimal_torch(C, p):
    alpha, beta = torch.tensor(p["alpha"], dtype=torch.float64), torch.tensor(p["beta"], dtype=torch.float64)
    logG = (torch.log(alpha * p["A"]) - torch.log(beta * p["B"])) / (alpha + beta)
    logND = torch.log(torch.tensor(C / 6, dtype=torch.float64))
    N = torch.exp(logG + beta / (alpha + beta) * logND)
    return N, C / 6 / N


def optimal_numeric(C, p):                    # minimise along the IsoFLOP line, to high precision
    f = lambda x: p["A"] * math.exp(-p["alpha"] * x) + p["B"] * (C / 6 / math.exp(x)) ** -p["beta"]
    x = optimize.minimize_scalar(f, bounds=(0, math.log(C / 6)), method="bounded", options={"xatol": 1e-12}).x
    return math.exp(x), C / 6 / math.exp(x)


def optimal_bounded_default(C, p):            # issue 20: bounded minimize_scalar at its default tolerance (xatol 1e-5)
    f = lambda x: p["A"] * math.exp(-p["alpha"] * x) + p["B"] * (C / 6 / math.exp(x)) ** -p["beta"]
    x = optimize.minimize_scalar(f, bounds=(0, math.log(C / 6)), method="bounded").x
    return math.exp(x), C / 6 / math.exp(x)


def optimal_bounded_wide_default(C, p):       # the same over a generous fixed range of ln N
    f = lambda x: p["A"] * math.exp(-p["alpha"] * x) + p["B"] * (C / 6 / math.exp(x)) ** -p["beta"]
    x = optimize.minimize_scalar(f, bounds=(0, 60), method="bounded").x
    return np.exp(x), C / 6 / np.exp(x)


def optimal_minimize_default(C, p):           # scipy.optimize.minimize on ln N from a rough start, default tolerances
    f = lambda x: p["A"] * math.exp(-p["alpha"] * x[0]) + p["B"] * (C / 6 / math.exp(x[0])) ** -p["beta"]
    x = optimize.minimize(f, x0=[20.0]).x[0]
    return math.exp(x), C / 6 / math.exp(x)


@pytest.mark.parametrize("fn", [optimal_closed_form, optimal_torch, optimal_numeric, optimal_bounded_default,
                                optimal_bounded_wide_default, optimal_minimize_default])
def test_compute_optimal_accepts_correct_answers(fn, capsys):
    checks.check_compute_optimal(fn)
    assert "check_compute_optimal passed" in capsys.readouterr().out


def _G(p):
    s = p["alpha"] + p["beta"]
    return (p["alpha"] * p["A"] / (p["beta"] * p["B"])) ** (1 / s), s


def optimal_forgot_six(C, p):
    G, s = _G(p)
    return G * C ** (p["beta"] / s), C ** (p["alpha"] / s) / G


def optimal_swapped_exponents(C, p):
    G, s = _G(p)
    return G * (C / 6) ** (p["alpha"] / s), (C / 6) ** (p["beta"] / s) / G


def optimal_swapped_and_no_six(C, p):
    G, s = _G(p)
    return G * C ** (p["alpha"] / s), C ** (p["beta"] / s) / G


def optimal_G_inverted(C, p):
    G, s = _G(p)
    return (C / 6) ** (p["beta"] / s) / G, G * (C / 6) ** (p["alpha"] / s)


def optimal_G_without_power(C, p):
    G, s = _G(p)
    G = G**s
    return G * (C / 6) ** (p["beta"] / s), (C / 6) ** (p["alpha"] / s) / G


def optimal_swapped_outputs(C, p):
    N, D = optimal_closed_form(C, p)
    return D, N


def optimal_twenty_tokens(C, p):              # the rule of thumb D = 20 N: close, but not this law's optimum
    N = math.sqrt(C / 120)
    return N, 20 * N


def optimal_budget_broken(C, p):
    N, D = optimal_closed_form(C, p)
    return N, 2 * D


def optimal_pops_params(C, p):                # right numbers, but empties the caller's dict
    A, B, alpha, beta = p.pop("A"), p.pop("B"), p.pop("alpha"), p.pop("beta")
    return optimal_closed_form(C, {"A": A, "B": B, "alpha": alpha, "beta": beta})


def optimal_rounds_exponents(C, p):           # "0.34 and 0.28 are close enough": the 32B-vs-40B lesson
    q = {**p, "alpha": round(p["alpha"], 2), "beta": round(p["beta"], 2)}
    return optimal_closed_form(C, q)


@pytest.mark.parametrize("fn, sentence", [
    (optimal_pops_params, "changed the params dict"),
    (optimal_rounds_exponents, "the law's loss is lower at another N along 6·N·D = C"),
    (optimal_forgot_six, "you forgot the 6 in C = 6·N·D"),
    (optimal_swapped_exponents, "the exponents are swapped"),
    (optimal_swapped_and_no_six, "you swapped the exponents and forgot the 6"),
    (optimal_G_inverted, "G is upside down"),
    (optimal_G_without_power, "G needs the power 1/(alpha+beta)"),
    (optimal_swapped_outputs, "return (N_opt, D_opt)"),
    (optimal_twenty_tokens, "the law's loss is lower at another N along 6·N·D = C"),
    (optimal_budget_broken, "must equal the budget C="),
])
def test_compute_optimal_names_each_mistake(fn, sentence):
    assert sentence in refused(checks.check_compute_optimal, fn)


def test_compute_optimal_reports_bad_returns():
    assert "a pair (N_opt, D_opt)" in refused(checks.check_compute_optimal, lambda C, p: 3.0)
    with pytest.raises(NotAttempted):
        checks.check_compute_optimal(lambda C, p: (_ for _ in ()).throw(NotImplementedError("Exercise 05.4 is not done yet")))


def test_compute_optimal_says_which_constants_give_32B():
    import io
    from contextlib import redirect_stdout

    with redirect_stdout(io.StringIO()) as out:
        checks.check_compute_optimal(optimal_closed_form)
    assert "~32B parameters that Chinchilla's printed (rounded) constants give" in out.getvalue()
    assert "the unrounded ones give the paper's ~40B" in out.getvalue()


@pytest.mark.parametrize("exercise", ["05.1", "05.2", "05.3", "05.4"])
def test_hints_come_in_three_levels_and_the_first_gives_no_code(exercise, capsys):
    for level in (1, 2, 3):
        checks.hint(exercise, level=level)
    out = capsys.readouterr().out
    assert all(f"Hint {k}/3 for exercise {exercise}" in out for k in (1, 2, 3))
    idea, approach, key_line = checks.HINTS[exercise]
    assert "np." not in idea and "return" not in idea and "scaling." not in idea
    assert key_line not in idea and key_line not in approach


# ---- 05.3 check_scaling_prediction: the scaling lab, graded against the recorded sweep ----------------

import functools  # noqa: E402
import json  # noqa: E402

from course_lib.experiments import scaling as sweep  # noqa: E402
from course_lib.experiments import scaling_lab  # noqa: E402
from course_lib.parts import scaling  # noqa: E402
from course_lib.tools import results  # noqa: E402

RECORD = results.recorded("scaling", "cpu")
TRUTH = scaling_lab.lab_truth(RECORD, n_resamples=0)


def _vertices(service, pick=slice(1, 6)):
    out = []
    for C in service.offered_budgets:
        on_offer = [m for m in service.menu() if m["C"] == C][pick]
        N = np.array([m["N"] for m in on_offer], dtype=float)
        L = np.array([service.train(m["N"], C) for m in on_offer])
        out.append(scaling.isoflop_minimum(N, L))
    return np.array(service.offered_budgets), out


def lab_two_power_laws(service):              # the notebook's solution
    C, v = _vertices(service)
    size = scaling.fit_exponent(C, [x["N_opt"] for x in v])
    excess = scaling.fit_power_law(C, np.array([x["L_opt"] for x in v]) - service.floor, floor=False)
    T = service.target_budget
    return {"N_opt": size["k"] * T ** size["a"], "loss": service.floor + excess["A"] * T ** -excess["alpha"]}


def lab_by_hand(service):                     # the same with numpy only, other runs (the first five), numpy scalars out
    C, v = _vertices(service, slice(0, 5))
    a, logk = np.polyfit(np.log(C), np.log([x["N_opt"] for x in v]), 1)
    g, logb = np.polyfit(np.log(C), np.log([x["L_opt"] - service.floor for x in v]), 1)
    T = service.target_budget
    return {"N_opt": np.exp(logk + a * np.log(T)), "loss": service.floor + np.exp(logb + g * np.log(T))}


def lab_with_torch(service):                  # parabolas and lines by torch.linalg.lstsq, tensors returned
    logC, logN, logE = [], [], []
    for C in service.offered_budgets:
        line = [m for m in service.menu() if m["C"] == C][1:6]
        x = torch.log(torch.tensor([m["N"] for m in line], dtype=torch.float64))
        y = torch.tensor([service.train(m["N"], C) for m in line], dtype=torch.float64)
        c2, c1, c0 = torch.linalg.lstsq(torch.stack([x**2, x, torch.ones_like(x)], 1), y[:, None]).solution[:, 0]
        logC.append(math.log(C)), logN.append(-c1 / (2 * c2)), logE.append(torch.log(c0 - c1**2 / (4 * c2) - service.floor))
    X = torch.stack([torch.ones(2, dtype=torch.float64), torch.tensor(logC, dtype=torch.float64)], 1)
    n0, a = torch.linalg.lstsq(X, torch.stack(logN)[:, None]).solution[:, 0]
    e0, g = torch.linalg.lstsq(X, torch.stack(logE)[:, None]).solution[:, 0]
    T = math.log(service.target_budget)
    return {"N_opt": torch.exp(n0 + a * T), "loss": service.floor + torch.exp(e0 + g * T)}


FEW_STARTS = {"a": (5.0, 10.0), "b": (5.0, 15.0), "e": (0.0,), "alpha": (0.5, 1.0), "beta": (0.5, 1.0)}


def lab_joint_law_with_the_floor(service):    # Approach 3 on the runs bought, the floor held at the known value
    N, D, L = [], [], []
    for C in service.offered_budgets:
        for m in [m for m in service.menu() if m["C"] == C][1:6]:
            N.append(m["N"]), D.append(m["D"]), L.append(service.train(m["N"], C))
    law = scaling.fit_chinchilla(N, D, L, E=service.floor, grid=scaling.COARSE_GRID)
    n, d = scaling.compute_optimal(service.target_budget, law)
    return {"N_opt": n, "loss": scaling.chinchilla_loss(n, d, law)}


def _buy(pick_first, pick_second):
    """A good-faith student: the suggested method on a chosen five runs per budget (indices into each line)."""
    def predict(service):
        vertices = []
        for C, pick in zip(service.offered_budgets, (pick_first, pick_second)):
            line = [m for m in service.menu() if m["C"] == C]
            chosen = [line[i] for i in pick]
            vertices.append(scaling.isoflop_minimum([m["N"] for m in chosen], [service.train(m["N"], C) for m in chosen]))
        size = scaling.fit_exponent(service.offered_budgets, [v["N_opt"] for v in vertices])
        excess = scaling.fit_power_law(service.offered_budgets, [v["L_opt"] - service.floor for v in vertices], floor=False)
        T = service.target_budget
        return {"N_opt": size["k"] * T ** size["a"], "loss": service.floor + excess["A"] * T ** -excess["alpha"]}
    return predict


LAB_RIGHT = [lab_two_power_laws, lab_by_hand, lab_with_torch, lab_joint_law_with_the_floor,
             _buy((0, 1, 2, 3, 4), (2, 3, 4, 5, 6)), _buy((1, 2, 3, 4, 5), (0, 1, 2, 3, 4)),
             _buy((0, 2, 3, 4, 6), (0, 2, 3, 4, 6))]


@pytest.mark.parametrize("fn", LAB_RIGHT)
def test_scaling_prediction_accepts_honest_predictions(fn, capsys):
    checks.check_scaling_prediction(fn)
    out = capsys.readouterr().out
    assert "check_scaling_prediction passed" in out and "it passes on the 4 transformed copies too" in out
    assert f"the recorded answer is N_opt = {TRUTH['N_opt']:,.0f}" in out          # shown once a prediction passes


def _best_bought(service):
    line = [m for m in service.menu() if m["C"] == max(service.offered_budgets)][1:6]
    losses = [service.train(m["N"], m["C"]) for m in line]
    return line[int(np.argmin(losses))]["N"]


def lab_guess_root_ten(service):              # issue 20: the best bought run × √10, the loss set to the floor + 0.03
    return {"N_opt": _best_bought(service) * math.sqrt(10), "loss": service.floor + 0.03}


def lab_guess_round_numbers(service):         # issue 20: N = 15,000 with the floor + 0.02
    _best_bought(service)
    return {"N_opt": 15_000, "loss": service.floor + 0.02}


def lab_types_in_the_answer(service):         # found by probing the check (or read from the record): a number typed in
    _best_bought(service)
    return {"N_opt": TRUTH["N_opt"], "loss": TRUTH["loss"]}


def lab_reads_the_record_file(service):       # opens the JSON itself, out of the check's sight
    from course_lib.tools.results import path_for

    runs = json.loads(path_for("scaling", "cpu").read_text())["results"]["runs"]
    at_target = scaling.mean_over_seeds([r for r in runs if r["C_budget"] == service.target_budget])
    _best_bought(service)
    vertex = scaling.isoflop_minimum([r["N"] for r in at_target], [r["val_loss"] for r in at_target])
    return {"N_opt": vertex["N_opt"], "loss": vertex["L_opt"]}


def lab_assumes_kaplan(service):              # an exponent assumed (Kaplan's 0.73), not fitted
    C, v = _vertices(service)
    return {**lab_two_power_laws(service), "N_opt": v[-1]["N_opt"] * 10**0.73}


def lab_assumes_chinchilla(service):          # an exponent assumed (Chinchilla's 0.5), not fitted
    C, v = _vertices(service)
    return {**lab_two_power_laws(service), "N_opt": v[-1]["N_opt"] * 10**0.5}


def lab_assumes_a_rate(service):              # "ten times the compute leaves a fifth of the excess": a rate assumed
    C, v = _vertices(service)
    return {**lab_two_power_laws(service), "loss": service.floor + (v[-1]["L_opt"] - service.floor) / 5}


def lab_typed_sizes(service):                 # sizes copied from the printed menu instead of read from service.menu()
    losses = [service.train(N, 1e10) for N in (1830, 2484, 3234, 4080, 6060)]
    losses += [service.train(N, 3e10) for N in (2484, 4080, 6060, 8424, 11172)]
    return lab_two_power_laws(service)


def lab_no_extrapolation(service):            # the optimum of the largest budget on offer
    C, v = _vertices(service)
    return {"N_opt": v[-1]["N_opt"], "loss": lab_two_power_laws(service)["loss"]}


def lab_all_compute_to_parameters(service):   # N_opt ∝ C: ten times the budget, ten times the model
    C, v = _vertices(service)
    return {"N_opt": 10 * v[-1]["N_opt"], "loss": lab_two_power_laws(service)["loss"]}


def lab_tokens_for_parameters(service):       # returned D_opt = C/(6 N_opt) in place of N_opt
    right = lab_two_power_laws(service)
    return {"N_opt": service.target_budget / (6 * right["N_opt"]), "loss": right["loss"]}


def lab_floor_as_loss(service):               # "the loss at a big budget is the floor"
    return {"N_opt": lab_two_power_laws(service)["N_opt"], "loss": service.floor}


def lab_loss_not_extrapolated(service):       # the loss of the largest budget on offer
    C, v = _vertices(service)
    return {"N_opt": lab_two_power_laws(service)["N_opt"], "loss": v[-1]["L_opt"]}


def lab_floor_is_the_entropy_rate(service):   # extrapolates towards H, which the evaluation cannot reach
    H = sweep.sweep_language().entropy_rate()
    C, v = _vertices(service)
    excess = scaling.fit_power_law(C, np.array([x["L_opt"] for x in v]) - H, floor=False)
    return {"N_opt": lab_two_power_laws(service)["N_opt"], "loss": H + excess["A"] * service.target_budget ** -excess["alpha"]}


def lab_plain_power_law_in_loss(service):     # L ∝ C^(-γ) with no floor: it falls through the floor
    C, v = _vertices(service)
    fit = scaling.fit_power_law(C, [x["L_opt"] for x in v], floor=False)
    return {"N_opt": lab_two_power_laws(service)["N_opt"], "loss": fit["A"] * service.target_budget ** -fit["alpha"]}


def lab_joint_law_free_floor(service):        # Approach 3 with E free: five numbers from ten runs put E too low
    N, D, L = [], [], []
    for C in service.offered_budgets:
        for m in [m for m in service.menu() if m["C"] == C][1:6]:
            N.append(m["N"]), D.append(m["D"]), L.append(service.train(m["N"], C))
    law = scaling.fit_chinchilla(N, D, L, grid=FEW_STARTS)
    n, d = scaling.compute_optimal(service.target_budget, law)
    return {"N_opt": n, "loss": scaling.chinchilla_loss(n, d, law)}


def lab_exponent_sign_flipped(service):       # N_opt ∝ C^(-a): the model shrinks as the budget grows
    C, v = _vertices(service)
    size = scaling.fit_exponent(C, [x["N_opt"] for x in v])
    return {"N_opt": v[-1]["N_opt"] * (service.target_budget / C[-1]) ** -size["a"], "loss": lab_two_power_laws(service)["loss"]}


def lab_buys_everything(service):             # more runs than the allowance pays for
    for m in service.menu():
        service.train(m["N"], m["C"])
    return lab_two_power_laws(service)


def lab_returns_a_tuple(service):
    right = lab_two_power_laws(service)
    return right["N_opt"], right["loss"]


def lab_buys_nothing(service):                # the published law instead of runs of this language
    N, D = scaling.compute_optimal(service.target_budget, scaling.CHINCHILLA_APPROACH3)
    return {"N_opt": N, "loss": scaling.chinchilla_loss(N, D, scaling.CHINCHILLA_APPROACH3)}


COPIES_MISSED = "passes on the recorded sweep, but its"
OUTSIDE_N = "your N_opt is outside the tolerance around the recorded optimum"
OUTSIDE_L = "your loss is outside the tolerance around the recorded best loss"


@pytest.mark.parametrize("fn, sentence", [
    (lab_guess_root_ten, COPIES_MISSED + " N_opt and its loss miss on transformed copies"),
    (lab_guess_round_numbers, COPIES_MISSED + " N_opt and its loss miss on transformed copies"),
    (lab_types_in_the_answer, COPIES_MISSED),
    (lab_reads_the_record_file, COPIES_MISSED),
    (lab_assumes_kaplan, COPIES_MISSED + " N_opt misses"),
    (lab_assumes_chinchilla, COPIES_MISSED + " N_opt misses"),
    (lab_assumes_a_rate, COPIES_MISSED + " loss misses"),
    (lab_typed_sizes, "take them from service.menu()"),
    (lab_no_extrapolation, "your N_opt is the optimum of the largest budget on offer"),
    (lab_all_compute_to_parameters, "you scaled N_opt in proportion to C"),
    (lab_tokens_for_parameters, "looks like a number of tokens"),
    (lab_floor_as_loss, "you predicted the floor itself"),
    (lab_loss_not_extrapolated, "your loss is what the largest budget on offer"),
    (lab_floor_is_the_entropy_rate, "is below the floor"),
    (lab_plain_power_law_in_loss, "is below the floor"),
    (lab_joint_law_free_floor, "is below the floor"),
    (lab_exponent_sign_flipped, OUTSIDE_N),
    (lab_buys_everything, "your plan asked for more runs than the FLOP budget buys"),
    (lab_returns_a_tuple, "return a dict {'N_opt': ..., 'loss': ...}"),
    (lab_buys_nothing, "you never bought a run from the service"),
])
def test_scaling_prediction_names_each_mistake(fn, sentence):
    message = refused(checks.check_scaling_prediction, fn)
    assert sentence in message
    assert "\n" not in message and len(message) < 400
    assert f"{TRUTH['N_opt']:,.0f}" not in message and f"{TRUTH['loss']:.3f}" not in message   # never the answer


@pytest.mark.parametrize("quantity, factors", [("N_opt", (1 / 2.3, 2.3)), ("loss", (1 / 4, 4))])
def test_scaling_refusals_do_not_say_which_way(quantity, factors):
    """Too large and too small get the same sentence, so the refusals cannot be bisected."""
    def predict(factor):
        def fn(service):
            _best_bought(service)
            if quantity == "N_opt":
                return {"N_opt": TRUTH["N_opt"] * factor, "loss": TRUTH["loss"]}
            return {"N_opt": TRUTH["N_opt"], "loss": service.floor + factor * (TRUTH["loss"] - service.floor)}
        return fn
    low, high = (refused(checks.check_scaling_prediction, predict(f)) for f in factors)
    assert low == high and (OUTSIDE_N if quantity == "N_opt" else OUTSIDE_L) in low
    assert not any(word in low for word in ("large", "small", "high", "low", "above", "below"))


def test_scaling_prediction_reports_stubs_and_crashes():
    with pytest.raises(NotAttempted):
        checks.check_scaling_prediction(lambda s: (_ for _ in ()).throw(NotImplementedError("Exercise 05.3 is not done yet")))
    with pytest.raises(StudentCodeError, match="ZeroDivisionError"):
        checks.check_scaling_prediction(lambda s: 1 / 0)


@functools.cache
def _worlds():
    return [(name, record, scaling_lab.lab_truth(record, n_resamples=0))
            for name, record in scaling_lab.lab_worlds(RECORD).items()]


def _passes_everywhere(predict):
    """Whether ``predict(name, service)`` passes on the recorded sweep and on every copy."""
    for name, record, truth in _worlds():
        verdict = scaling_lab.grade(predict(name, scaling_lab.TrainingService.from_record(record)), truth)
        if not (verdict["N_ok"] and verdict["loss_ok"]):
            return False
    return True


def test_no_typed_in_number_passes_the_recorded_sweep_and_its_copies():
    """Whatever N_opt and loss one types in (a grid over two decades of N and three of the loss's height above the
    floor, all of them around the answer), the recorded sweep or one of its copies refuses it."""
    floor = TRUTH["floor"]
    for N in np.geomspace(TRUTH["N_opt"] / 10, TRUTH["N_opt"] * 10, 41):
        passes_N = [abs(math.log(N / t["N_opt"])) <= math.log(scaling_lab.N_FACTOR) for _, _, t in _worlds()]
        assert not all(passes_N), N
    for excess in np.geomspace((TRUTH["loss"] - floor) / 30, (TRUTH["loss"] - floor) * 30, 61):
        passes_L = [abs(math.log(excess / (t["loss"] - floor))) <= math.log(scaling_lab.EXCESS_FACTOR)
                    for _, _, t in _worlds()]
        assert not all(passes_L), excess


def test_no_assumed_exponent_or_rate_passes_everywhere():
    """Growing the largest budget's vertex by 10^a0 for any assumed a0 in [0, 1.2], or shrinking its height above
    the floor by any assumed factor, fails on the recorded sweep or one of its copies: the exponent must be fitted."""
    def vertex_there(service):
        C, v = _vertices(service)
        return v[-1]
    for a0 in np.linspace(0.0, 1.2, 49):
        assert not _passes_everywhere(lambda name, s: {**lab_two_power_laws(s), "N_opt": vertex_there(s)["N_opt"] * 10**a0})
    for shrink in np.geomspace(1, 100, 41):
        assert not _passes_everywhere(lambda name, s: {**lab_two_power_laws(s),
                                                       "loss": s.floor + (vertex_there(s)["L_opt"] - s.floor) / shrink})


def test_the_copies_move_the_answer_exactly_as_stated_and_the_method_with_it():
    """Each copy's answer is the recorded one moved by the copy's maps (to the rounding of sizes to whole
    parameters), and the suggested method's prediction moves with it, so its error is the same in every one."""
    g = TRUTH["C"] / max(RECORD["results"]["lab"]["offered_budgets"])
    errors = []
    for name, record, truth in _worlds():
        moves = scaling_lab.COPIES.get(name, {"size": 1.0, "size_exponent": 0.0, "excess": 1.0, "excess_exponent": 0.0})
        assert truth["N_opt"] == pytest.approx(TRUTH["N_opt"] * moves["size"] * g ** moves["size_exponent"], rel=2e-3)
        assert truth["loss"] - truth["floor"] == pytest.approx(
            (TRUTH["loss"] - TRUTH["floor"]) * moves["excess"] * g ** moves["excess_exponent"], rel=1e-3)
        verdict = scaling_lab.grade(lab_two_power_laws(scaling_lab.TrainingService.from_record(record)), truth)
        errors.append((verdict["N_ratio"], verdict["excess_ratio"]))
    assert np.allclose(errors, errors[0], rtol=2e-3)
    assert {m["N"] for m in scaling_lab.TrainingService.from_record(_worlds()[1][1]).menu()}.isdisjoint(
        {m["N"] for m in scaling_lab.TrainingService.from_record(RECORD).menu()})      # no size is shared


def test_the_lab_is_graded_soundly_on_the_shipped_record():
    """Every choice of five runs per budget that brackets both vertices passes, every naive guess is refused,
    and the tolerances exceed twice the measured noise (the record's seeds)."""
    evidence = scaling_lab.grading_evidence(RECORD)
    assert evidence["choices"] == 441 and evidence["bracketing"] >= 400
    assert evidence["bracketing_passing"] == evidence["bracketing"]              # 420 of 420 with the shipped record
    assert evidence["naive_refused"] == evidence["naive"] == 4
    assert evidence["over_noise"] > 1.5


def test_the_suggested_method_passes_with_margin_and_the_naive_guesses_fail_with_margin():
    """The notebook's solution uses at most 60% of either tolerance (in log units); each naive guess misses its
    quantity by at least 1.25 times the tolerance."""
    verdict = scaling_lab.grade(lab_two_power_laws(scaling_lab.TrainingService.from_record(RECORD)), TRUTH)
    assert abs(math.log(verdict["N_ratio"])) <= 0.6 * math.log(scaling_lab.N_FACTOR)
    assert abs(math.log(verdict["excess_ratio"])) <= 0.6 * math.log(scaling_lab.EXCESS_FACTOR)
    for guess in scaling_lab.naive_guesses(RECORD).values():
        if "N_opt" in guess:
            assert abs(math.log(guess["N_opt"] / TRUTH["N_opt"])) >= 1.25 * math.log(scaling_lab.N_FACTOR)
        else:
            excess = (guess["loss"] - TRUTH["floor"]) / (TRUTH["loss"] - TRUTH["floor"])
            assert excess <= 0 or abs(math.log(excess)) >= 1.25 * math.log(scaling_lab.EXCESS_FACTOR)


def test_the_student_edition_never_shows_the_answer():
    """No saved output that the student edition keeps (every cell but the checks') prints the lab's answer."""
    import nbformat

    from course_lib.editions import student_notebook
    from course_lib.tools.profiles import REPO

    path = REPO / "notebooks" / "05_scaling_laws.ipynb"
    student = student_notebook(nbformat.read(path, as_version=4), path.name)
    shown = " ".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                     for c in student.cells if c.cell_type == "code" for o in c.outputs)
    for answer in (f"{TRUTH['N_opt']:,.0f}", f"{TRUTH['N_opt']:.0f}", f"{TRUTH['loss']:.4f}", f"{TRUTH['C']:.0e}: N_opt"):
        assert answer not in shown


# --------------------------------------------- answers that call the course's reference are refused

from course_lib.parts.scaling import compute_optimal as allocate  # noqa: E402 -- bound under another name
from course_lib.parts.scaling import fit_power_law as straight_line  # noqa: E402
from course_lib.parts.scaling import isoflop_minimum as vertex_of  # noqa: E402
from course_lib.experiments.scaling_lab import lab_truth as the_answer  # noqa: E402


def lab_reads_the_answer(service):
    truth = the_answer()
    service.train(service.menu()[0]["N"], service.menu()[0]["C"])
    return {"N_opt": truth["N_opt"], "loss": truth["loss"]}


def lab_reads_the_record(service):
    runs = scaling_lab.recorded_runs([service.target_budget], seeds=None)
    service.train(service.menu()[0]["N"], service.menu()[0]["C"])
    best = min(runs, key=lambda r: r["val_loss"])
    return {"N_opt": best["N"], "loss": best["val_loss"]}


def lab_reads_the_record_through_results(service):
    record = results.recorded("scaling", "cpu")
    service.train(service.menu()[0]["N"], service.menu()[0]["C"])
    return {"N_opt": record["results"]["approach2"]["k"] * service.target_budget ** record["results"]["approach2"]["a"],
            "loss": service.floor + 0.03}


def lab_calls_the_suggested_method(service):  # the lab's whole method in one call of the course's code
    vertices = _vertices(service)[1]
    return scaling_lab.extrapolate_optimum(service.offered_budgets, vertices, floor=service.floor,
                                           target=service.target_budget)


def lab_builds_the_copies(service):             # answers each copy from the library's own copies
    answers = [scaling_lab.lab_worlds()]
    service.train(service.menu()[0]["N"], service.menu()[0]["C"])
    return {"N_opt": 2e4, "loss": service.floor + 0.03, "seen": len(answers)}


REFERENCE_CALLS = {
    "05.1 directly": (checks.check_isoflop_vertex, vertex_library, "course_lib.parts.scaling.isoflop_minimum"),
    "05.1 under another name": (checks.check_isoflop_vertex, lambda N, L: tuple(vertex_of(N, L)[k] for k in ("N_opt", "L_opt")),
                                "course_lib.parts.scaling.isoflop_minimum"),
    "05.2 the course's fit": (checks.check_power_law_fit, lambda N, L: (
        (fit := straight_line(N, L, floor=False))["A"], fit["alpha"]), "course_lib.parts.scaling.fit_power_law"),
    "05.2 the course's exponent fit": (checks.check_power_law_fit, lambda N, L: (
        (fit := scaling.fit_exponent(N, L))["k"], -fit["a"]), "course_lib.parts.scaling.fit_exponent"),
    "05.3 the recorded answer": (checks.check_scaling_prediction, lab_reads_the_answer, "course_lib.experiments.scaling_lab.lab_truth"),
    "05.3 the record itself": (checks.check_scaling_prediction, lab_reads_the_record,
                               "course_lib.experiments.scaling_lab.recorded_runs"),
    "05.3 the record through tools.results": (checks.check_scaling_prediction, lab_reads_the_record_through_results,
                                              "course_lib.tools.results.recorded"),
    "05.3 the copies' answers": (checks.check_scaling_prediction, lab_builds_the_copies,
                                 "course_lib.experiments.scaling_lab.lab_worlds"),
    "05.3 the suggested method in one call": (checks.check_scaling_prediction, lab_calls_the_suggested_method,
                                              "course_lib.experiments.scaling_lab.extrapolate_optimum"),
    "05.4 directly": (checks.check_compute_optimal, lambda C, params: scaling.compute_optimal(C, params),
                      "course_lib.parts.scaling.compute_optimal"),
    "05.4 under another name": (checks.check_compute_optimal, lambda C, params: allocate(C, params),
                                "course_lib.parts.scaling.compute_optimal"),
}


@pytest.mark.parametrize("name", REFERENCE_CALLS)
def test_an_answer_that_calls_the_reference_is_refused(name):
    check, fn, called = REFERENCE_CALLS[name]
    with pytest.raises(ReferenceCalled) as info:
        check(fn)
    message = str(info.value)
    assert message.startswith("your answer calls ") and f"`{called}`" in message and message.endswith("write it yourself.")


def test_the_lab_may_use_the_course_fits_on_its_own_runs(capsys):
    # 05.3 forbids the recorded answer, not the fitting tools of 05.1-05.2 (the notebook's solution uses them)
    checks.check_scaling_prediction(lab_two_power_laws)
    assert "check_scaling_prediction passed" in capsys.readouterr().out
