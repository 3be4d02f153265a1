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


@pytest.mark.parametrize("fn", [vertex_polyfit, vertex_log10, vertex_torch_lstsq])
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


@pytest.mark.parametrize("fn", [optimal_closed_form, optimal_torch, optimal_numeric])
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
    (optimal_rounds_exponents, "the loss is lowest at N_opt="),
    (optimal_forgot_six, "you forgot the 6 in C = 6·N·D"),
    (optimal_swapped_exponents, "the exponents are swapped"),
    (optimal_swapped_and_no_six, "you swapped the exponents and forgot the 6"),
    (optimal_G_inverted, "G is upside down"),
    (optimal_G_without_power, "G needs the power 1/(alpha+beta)"),
    (optimal_swapped_outputs, "return (N_opt, D_opt)"),
    (optimal_twenty_tokens, "the loss is lowest at N_opt="),
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

from course_lib.experiments import scaling as sweep  # noqa: E402
from course_lib.experiments import scaling_lab  # noqa: E402
from course_lib.parts import scaling  # noqa: E402


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


def lab_by_hand(service):                     # the same with numpy only, and other runs (the first five)
    C, v = _vertices(service, slice(0, 5))
    a, logk = np.polyfit(np.log(C), np.log([x["N_opt"] for x in v]), 1)
    g, logb = np.polyfit(np.log(C), np.log([x["L_opt"] - service.floor for x in v]), 1)
    T = service.target_budget
    return {"N_opt": float(np.exp(logk + a * np.log(T))), "loss": float(service.floor + np.exp(logb + g * np.log(T)))}


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


def lab_floor_is_the_entropy_rate(service):    # extrapolates towards H, which the evaluation cannot reach
    H = sweep.sweep_language().entropy_rate()
    C, v = _vertices(service)
    excess = scaling.fit_power_law(C, np.array([x["L_opt"] for x in v]) - H, floor=False)
    return {"N_opt": lab_two_power_laws(service)["N_opt"], "loss": H + excess["A"] * service.target_budget ** -excess["alpha"]}


def lab_best_run_not_vertex(service):          # the best run bought at each budget instead of the parabola's vertex
    C, N_best, L_best = [], [], []
    for budget in service.offered_budgets:
        on_offer = [m for m in service.menu() if m["C"] == budget][1:6]
        losses = [service.train(m["N"], budget) for m in on_offer]
        C.append(budget), N_best.append(on_offer[int(np.argmin(losses))]["N"]), L_best.append(min(losses))
    return scaling_lab.extrapolate_optimum(C, [{"N_opt": n, "L_opt": l} for n, l in zip(N_best, L_best)],
                                       floor=service.floor, target=service.target_budget)


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


@pytest.mark.parametrize("fn", [lab_two_power_laws, lab_by_hand])
def test_scaling_prediction_accepts_honest_predictions(fn, capsys):
    checks.check_scaling_prediction(fn)
    assert "check_scaling_prediction passed" in capsys.readouterr().out


@pytest.mark.parametrize("fn, sentence", [
    (lab_no_extrapolation, "your N_opt is the optimum of the largest budget on offer"),
    (lab_all_compute_to_parameters, "you scaled N_opt in proportion to C"),
    (lab_tokens_for_parameters, "looks like a number of tokens"),
    (lab_floor_as_loss, "you predicted the floor itself"),
    (lab_loss_not_extrapolated, "your loss is what the largest budget on offer"),
    (lab_floor_is_the_entropy_rate, "is below the floor"),
    (lab_best_run_not_vertex, "your N_opt is too large"),
    (lab_exponent_sign_flipped, "your N_opt is too small"),
    (lab_buys_everything, "your plan asked for more runs than the FLOP budget buys"),
    (lab_returns_a_tuple, "return a dict {'N_opt': ..., 'loss': ...}"),
    (lab_buys_nothing, "you never bought a run from the service"),
])
def test_scaling_prediction_names_each_mistake(fn, sentence):
    message = refused(checks.check_scaling_prediction, fn)
    assert sentence in message
    assert "\n" not in message and len(message) < 400


def test_scaling_prediction_reports_stubs_and_crashes():
    with pytest.raises(NotAttempted):
        checks.check_scaling_prediction(lambda s: (_ for _ in ()).throw(NotImplementedError("Exercise 05.3 is not done yet")))
    with pytest.raises(StudentCodeError, match="ZeroDivisionError"):
        checks.check_scaling_prediction(lambda s: 1 / 0)


def test_the_lab_tolerances_follow_the_documented_rule_and_exceed_the_measured_noise():
    """Half the distance from the answer to the nearest naive guess (log scale for N_opt, nats for the loss),
    at least twice the measured noise; the answer's own seed uncertainty is far inside."""
    from course_lib.tools import results

    record = results.recorded("scaling", "cpu")
    truth, tol = scaling_lab.lab_truth(record), scaling_lab.lab_tolerances(record)
    sizes = [v for q, v in tol["naive"].values() if q == "N_opt"]
    losses = [v for q, v in tol["naive"].values() if q == "loss"]
    assert tol["N_factor"] == pytest.approx(math.exp(min(abs(math.log(v / truth["N_opt"])) for v in sizes) / 2))
    assert tol["loss_nats"] == pytest.approx(min(abs(v - truth["loss"]) for v in losses) / 2)
    assert tol["N_factor"] >= tol["noise_N_factor"] and tol["loss_nats"] >= tol["noise_loss_nats"]
    assert 0 < tol["sd_loss_truth"] < tol["loss_nats"] / 10 and 0 < tol["sd_log_N_truth"] < math.log(tol["N_factor"]) / 10
    assert truth["n_seeds"] == 3                                   # the answer is measured on three seeds
    assert checks.scaling_laws.lab_tolerances()["loss_nats"] == tol["loss_nats"]


def test_the_lab_tolerances_refuse_the_neighbouring_budget():
    """The optimum one budget below the target (3x less compute) is refused: on the loss, though not on N_opt
    (the recorded vertex grows only 1.6x from 1e11 to 3e11, inside the factor 1.7)."""
    from course_lib.tools import results

    record = results.recorded("scaling", "cpu")
    truth, tol = scaling_lab.lab_truth(record), scaling_lab.lab_tolerances(record)
    previous = scaling.isoflop_minima([r for r in record["results"]["runs"] if r["seed"] == 0])[-2]
    assert abs(previous["L_opt"] - truth["loss"]) > tol["loss_nats"]
    assert abs(math.log(previous["N_opt"] / truth["N_opt"])) > math.log(tol["N_factor"]) / 2


def _buy(pick_first, pick_second):
    """A good-faith student: the suggested method on a chosen five runs per budget (indices into each line)."""
    def predict(service):
        vertices = []
        for C, pick in zip(service.offered_budgets, (pick_first, pick_second)):
            line = [m for m in service.menu() if m["C"] == C]
            chosen = [line[i] for i in pick]
            vertices.append(scaling.isoflop_minimum([m["N"] for m in chosen], [service.train(m["N"], C) for m in chosen]))
        return scaling_lab.extrapolate_optimum(service.offered_budgets, vertices, floor=service.floor,
                                           target=service.target_budget)
    return predict


def test_a_good_faith_method_passes_for_most_choices_of_runs():
    """The suggested method, on every choice of five runs per budget on sale, passes the check's tolerances
    for most choices, and for almost every choice whose runs bracket both vertices."""
    truth, tol, choices = scaling_lab.lab_truth(), scaling_lab.lab_tolerances(), scaling_lab.lab_choices()
    ok = np.isfinite(choices["N_opt"])
    within = ok & (np.abs(np.log(np.where(ok, choices["N_opt"], 1.0) / truth["N_opt"])) <= math.log(tol["N_factor"]))
    within &= np.abs(np.nan_to_num(choices["loss"] - truth["loss"])) <= tol["loss_nats"]
    assert within.size == 441 and within.mean() >= 0.9                # 417 of 441 with the shipped record
    assert within[choices["brackets"]].mean() >= 0.95                 # 415 of 420


@pytest.mark.parametrize("picks", [((0, 1, 2, 3, 4), (2, 3, 4, 5, 6)), ((1, 2, 3, 4, 5), (0, 1, 2, 3, 4)),
                                   ((0, 2, 3, 4, 6), (0, 2, 3, 4, 6))])
def test_the_check_accepts_good_faith_predictions_from_other_runs(picks, capsys):
    checks.check_scaling_prediction(_buy(*picks))
    assert "check_scaling_prediction passed" in capsys.readouterr().out


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
