"""Scaling laws: power-law fits, the Chinchilla fit of L(N, D), and compute-optimal allocation.

Explained in notebooks/05_scaling_laws.ipynb. Symbols as in the notebook and the papers:

* N -- parameters, D -- training tokens, C -- training FLOPs, C ≈ 6·N·D (Kaplan et al. 2020, Sec. 2.1).
* L(N) = E + A / N^α                                  -- :func:`fit_power_law` (E = 0 allowed)
* L(N, D) = E + A / N^α + B / D^β                     -- :func:`chinchilla_loss`, :func:`fit_chinchilla`
* N_opt = G (C/6)^(β/(α+β)),  D_opt = G⁻¹ (C/6)^(α/(α+β)),  G = (αA / (βB))^(1/(α+β))
                                                      -- :func:`compute_optimal`

The published constants (Kaplan 2020, Hoffmann 2022, Besiroglu 2024) are typed in below with their
sources and again, with the same values, in ``data/published_laws.json``; a test keeps the two equal.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import least_squares, minimize
from scipy.special import logsumexp

from course_lib.tools.profiles import REPO

__all__ = [
    "KAPLAN_2020", "CHINCHILLA_APPROACH3", "CHINCHILLA_APPROACH3_UNROUNDED", "BESIROGLU_2024",
    "ALLOCATION_EXPONENTS", "HOFFMANN_GRID", "fit_power_law", "power_law", "fit_chinchilla",
    "chinchilla_loss", "chinchilla_objective", "compute_optimal", "optimal_exponents",
    "isoflop_curve", "isoflop_minimum", "fit_exponent", "load_published_laws", "run_sweep",
]

# ----------------------------------------------------------------------------------------------
# Published constants (values exactly as the papers print them; see data/published_laws.json)
# ----------------------------------------------------------------------------------------------

#: Kaplan et al. 2020, "Scaling Laws for Neural Language Models", Eqs. 1.1-1.3 (Sec. 1.2) and App. A, Table 6.
#: N counts non-embedding parameters, D tokens, C_min PF-days; losses in nats per token.
KAPLAN_2020: dict[str, float] = {
    "alpha_N": 0.076, "N_c": 8.8e13,          # Eq. 1.1: L(N) = (N_c / N)^alpha_N
    "alpha_D": 0.095, "D_c": 5.4e13,          # Eq. 1.2: L(D) = (D_c / D)^alpha_D
    "alpha_C_min": 0.050, "C_c_min": 3.1e8,   # Eq. 1.3: L(C_min) = (C_c_min / C_min)^alpha_C_min, PF-days
    "a": 0.73, "b": 0.27,                     # Sec. 1.2 after Eq. 1.8, App. A Table 6: N_opt ∝ C_min^0.73, D_opt ∝ C_min^0.27
}

#: Hoffmann et al. 2022 (Chinchilla), Approach 3, Eq. 10 / Appendix D.2, as printed (rounded).
CHINCHILLA_APPROACH3: dict[str, float] = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}

#: The same fit unrounded; these reproduce the paper's own ~40B-parameter projection at the Gopher
#: budget 5.76e23 FLOPs, which the rounded constants (~32B) do not.
CHINCHILLA_APPROACH3_UNROUNDED: dict[str, float] = {
    "E": 1.6934, "A": 406.40, "B": 410.72, "alpha": 0.33917, "beta": 0.28491}

#: Besiroglu, Erdil, Barnett & You 2024, "Chinchilla Scaling: A replication attempt", Table 1.
BESIROGLU_2024: dict[str, float] = {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}

#: Exponents a, b of N_opt ∝ C^a, D_opt ∝ C^b: Hoffmann et al. 2022, Table 2.
ALLOCATION_EXPONENTS: dict[str, dict[str, float]] = {
    "Chinchilla Approach 1": {"a": 0.50, "b": 0.50},
    "Chinchilla Approach 2": {"a": 0.49, "b": 0.51},
    "Chinchilla Approach 3": {"a": 0.46, "b": 0.54},
    "Kaplan et al. 2020": {"a": 0.73, "b": 0.27},
}

#: The grid of starting points of Hoffmann et al. 2022 (App. D.2), also used by Besiroglu et al. 2024:
#: alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25} (4,500 starts).
HOFFMANN_GRID: dict[str, Sequence[float]] = {
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0), "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0), "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
}

# A coarser grid (675 starts) that finds the same optimum on the course's data sets in a fraction
# of the time; pass ``grid=HOFFMANN_GRID`` for the paper's grid.
COARSE_GRID: dict[str, Sequence[float]] = {
    "alpha": (0.0, 0.5, 1.0), "beta": (0.0, 0.5, 1.0), "e": (-1.0, 0.0, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 25.0), "b": (0.0, 5.0, 10.0, 15.0, 25.0),
}

_PARAMS = ("E", "A", "B", "alpha", "beta")


# ----------------------------------------------------------------------------------------------
# Input checking
# ----------------------------------------------------------------------------------------------


def _positive_array(x: Any, name: str) -> np.ndarray:
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{name} should be a number or an array of numbers, not {type(x).__name__}.")
    try:
        arr = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} should be a number or an array of numbers, not {type(x).__name__}.") from None
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains nan or inf; drop those runs before fitting.")
    if np.any(arr <= 0):
        raise ValueError(f"{name} must be positive everywhere (a power law lives on log axes); "
                         f"found the value {arr[arr <= 0].flat[0]!r}.")
    return arr


def _same_length(*arrays: tuple[str, np.ndarray], minimum: int) -> None:
    names = [n for n, _ in arrays]
    lengths = [a.size for _, a in arrays]
    if any(a.ndim != 1 for _, a in arrays) or len(set(lengths)) != 1:
        raise ValueError(f"{', '.join(names)} should be 1-D arrays of the same length, one entry per run; "
                         f"got shapes {[tuple(a.shape) for _, a in arrays]}.")
    if lengths[0] < minimum:
        raise ValueError(f"need at least {minimum} runs to fit this law, got {lengths[0]}.")


def _params(params: Mapping[str, float], keys: Sequence[str] = _PARAMS) -> dict[str, float]:
    if not isinstance(params, Mapping):
        raise TypeError(f"params should be a dict with keys {', '.join(keys)}, not {type(params).__name__}.")
    missing = [k for k in keys if k not in params]
    if missing:
        raise ValueError(f"params is missing {', '.join(missing)}; a Chinchilla law needs "
                         f"{', '.join(keys)} (e.g. scaling.CHINCHILLA_APPROACH3).")
    return {k: float(params[k]) for k in keys}


# ----------------------------------------------------------------------------------------------
# One-variable power laws: L(x) = E + A / x^alpha
# ----------------------------------------------------------------------------------------------


def power_law(x: Any, params: Mapping[str, float]) -> np.ndarray:
    """``E + A / x**alpha`` (``E`` defaults to 0)."""
    x = _positive_array(x, "x")
    return params.get("E", 0.0) + params["A"] * x ** (-params["alpha"])


def _loglinear(logx: np.ndarray, logy: np.ndarray) -> tuple[float, float]:
    """Least-squares line logy = c + s·logx; returns (s, c)."""
    slope, intercept = np.polyfit(logx, logy, 1)
    return float(slope), float(intercept)


def fit_power_law(N: Any, L: Any, *, floor: bool = True) -> dict[str, float]:
    """Fit ``L = E + A / N**alpha`` by least squares on log L; returns ``{"E", "A", "alpha"}``.

    ``floor=False`` fits the pure power law ``L = A / N**alpha`` (E = 0): a straight line in log-log
    space, ln L = ln A − α ln N, solved exactly by linear least squares.

    With a floor, E is found by profiling: for each trial E the rest is that same straight-line fit
    of ln(L − E); the best E on a grid in [0, min L) then seeds a joint least-squares polish of
    (E, ln A, α) on the residuals ln L − ln(E + A N^−α). Natural logs throughout, so A is the
    prefactor itself (not 10^intercept).
    """
    N, L = _positive_array(N, "N"), _positive_array(L, "L")
    _same_length(("N", N), ("L", L), minimum=3 if floor else 2)
    logN, logL = np.log(N), np.log(L)
    if np.ptp(logN) == 0:
        raise ValueError("all N are equal; a power law needs runs at different sizes.")
    if not floor:
        slope, intercept = _loglinear(logN, logL)
        return {"E": 0.0, "A": math.exp(intercept), "alpha": -slope}

    def profile(E: float) -> tuple[float, float, float]:
        slope, intercept = _loglinear(logN, np.log(L - E))
        pred = np.log(E + np.exp(intercept + slope * logN))
        return float(np.sum((pred - logL) ** 2)), slope, intercept

    Lmin = float(L.min())
    trials = Lmin * (1.0 - np.geomspace(1.0, 1e-4, 200))  # denser near min L, where floors sit
    scores = [profile(E) for E in trials]
    best = int(np.argmin([s[0] for s in scores]))
    _, slope, intercept = scores[best]
    start = np.array([trials[best], intercept, -slope])

    def residuals(theta: np.ndarray) -> np.ndarray:
        E, lnA, alpha = theta
        return np.logaddexp(np.log(max(E, 1e-300)), lnA - alpha * logN) - logL

    upper_E = Lmin * (1 - 1e-9)
    start[0] = min(max(start[0], 0.0), upper_E)
    result = least_squares(residuals, start, bounds=([0.0, -np.inf, -np.inf], [upper_E, np.inf, np.inf]),
                           xtol=1e-14, ftol=1e-14, gtol=1e-14)
    theta = result.x if result.cost <= 0.5 * scores[best][0] + 1e-15 else start
    return {"E": float(theta[0]), "A": float(math.exp(theta[1])), "alpha": float(theta[2])}


def fit_exponent(C: Any, y: Any) -> dict[str, float]:
    """Fit ``y = k · C**a`` in log space (e.g. N_opt ∝ C^a); returns ``{"a", "k"}``."""
    fit = fit_power_law(C, y, floor=False)
    return {"a": -fit["alpha"], "k": fit["A"]}


# ----------------------------------------------------------------------------------------------
# The Chinchilla law L(N, D) = E + A / N^alpha + B / D^beta
# ----------------------------------------------------------------------------------------------


def chinchilla_loss(N: Any, D: Any, params: Mapping[str, float]) -> np.ndarray | float:
    """``E + A / N**alpha + B / D**beta`` (Hoffmann et al. 2022, Eq. 2), broadcast over N and D."""
    p = _params(params)
    N, D = _positive_array(N, "N"), _positive_array(D, "D")
    out = p["E"] + p["A"] * N ** (-p["alpha"]) + p["B"] * D ** (-p["beta"])
    return float(out) if np.ndim(out) == 0 else out


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss and its derivative (same convention as scipy.special.huber)."""
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))
    grad = np.where(small, r, delta * np.sign(r))
    return value, grad


def chinchilla_objective(theta: np.ndarray, logN: np.ndarray, logD: np.ndarray, logL: np.ndarray,
                         delta: float = 1e-3) -> tuple[float, np.ndarray]:
    """The fitting objective and its gradient for ``theta = (a, b, e, alpha, beta)``.

    Σ_runs Huber_δ( LSE(a − α ln N, b − β ln D, e) − ln L )   -- SUMMED over runs, not averaged
    (Besiroglu et al. 2024, Sec. 3: averaging shrinks the gradient and stops L-BFGS early).
    """
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * logN, b - beta * logD, np.full_like(logN, e)])
    lse = logsumexp(terms, axis=0)
    value, dh = _huber(lse - logL, delta)
    w = np.exp(terms - lse) * dh  # softmax weights times dHuber/dr, shape (3, runs)
    grad = np.array([w[0].sum(), w[1].sum(), w[2].sum(), -(w[0] * logN).sum(), -(w[1] * logD).sum()])
    return float(value.sum()), grad


def _single_threaded_blas() -> Any:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover -- threadpoolctl comes with scikit-learn and scipy's test deps
        import contextlib
        return contextlib.nullcontext()
    return threadpool_limits(limits=1)


def fit_chinchilla(N: Any, D: Any, L: Any, *, delta: float = 1e-3,
                   grid: Mapping[str, Sequence[float]] | None = None,
                   return_details: bool = False, E: float | None = None) -> dict[str, Any]:
    """Fit L(N, D) = E + A/N^α + B/D^β the way Hoffmann et al. 2022 (App. D.2) and Besiroglu et al. 2024 did.

    E = exp(e), A = exp(a), B = exp(b); minimise Σ Huber_δ(LSE(a − α ln N, b − β ln D, e) − ln L) with
    L-BFGS (``scipy.optimize.minimize(method="L-BFGS-B")``) from every point of ``grid`` (default
    :data:`COARSE_GRID`; :data:`HOFFMANN_GRID` is the paper's), and keep the best. Returns
    ``{"E", "A", "B", "alpha", "beta"}``, plus ``"objective"`` and ``"n_starts"`` if ``return_details``.

    ``E`` given fixes the floor (e = ln E is held, the grid's ``e`` is ignored) and fits the other four
    numbers: what one does when the floor is known, as on the synthetic language of notebook 05.
    """
    N, D, L = _positive_array(N, "N"), _positive_array(D, "D"), _positive_array(L, "L")
    _same_length(("N", N), ("D", D), ("L", L), minimum=5)
    if not (isinstance(delta, (int, float)) and delta > 0):
        raise ValueError(f"delta should be a positive number (the paper uses 1e-3), got {delta!r}.")
    grid = dict(grid or COARSE_GRID)
    missing = [k for k in ("a", "b", "e", "alpha", "beta") if k not in grid]
    if missing:
        raise ValueError(f"grid is missing {', '.join(missing)}; it needs starting values for a, b, e, alpha, beta.")
    logN, logD, logL = np.log(N), np.log(D), np.log(L)
    bounds = None
    if E is not None:
        e_fixed = math.log(float(_positive_array(E, "E")))
        grid["e"] = (e_fixed,)
        bounds = [(None, None), (None, None), (e_fixed, e_fixed), (None, None), (None, None)]   # lower = upper: held
    best_value, best_theta, n_starts = np.inf, None, 0
    # L-BFGS-B works on 5 numbers: multi-threaded BLAS only adds overhead (10x slower on a busy machine).
    with _single_threaded_blas():
        for start in itertools.product(grid["a"], grid["b"], grid["e"], grid["alpha"], grid["beta"]):
            n_starts += 1
            result = minimize(chinchilla_objective, np.array(start, dtype=np.float64), jac=True,
                              args=(logN, logD, logL, delta), method="L-BFGS-B", bounds=bounds)
            if np.isfinite(result.fun) and result.fun < best_value:
                best_value, best_theta = float(result.fun), result.x
    if best_theta is None:
        raise RuntimeError("no starting point gave a finite objective; check that L, N, D are sensible.")
    a, b, e, alpha, beta = best_theta
    out: dict[str, Any] = {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b),
                           "alpha": float(alpha), "beta": float(beta)}
    if return_details:
        out.update(objective=best_value, n_starts=n_starts)
    return out


# ----------------------------------------------------------------------------------------------
# Compute-optimal allocation under C = 6 N D
# ----------------------------------------------------------------------------------------------


def optimal_exponents(params: Mapping[str, float]) -> dict[str, float]:
    """``{"a": β/(α+β), "b": α/(α+β)}``: N_opt ∝ C^a and D_opt ∝ C^b for a Chinchilla law."""
    p = _params(params, ("alpha", "beta"))
    s = p["alpha"] + p["beta"]
    return {"a": p["beta"] / s, "b": p["alpha"] / s}


def compute_optimal(C: Any, params: Mapping[str, float], *,
                    flops_per_param_token: float = 6.0) -> tuple[Any, Any]:
    """The (N_opt, D_opt) minimising L(N, D) subject to C = 6 N D, in closed form.

    With k = flops_per_param_token (6: Kaplan et al. 2020, Sec. 2.1) and G = (αA / (βB))^(1/(α+β)):
    N_opt = G (C/k)^(β/(α+β)),  D_opt = G⁻¹ (C/k)^(α/(α+β))   (Hoffmann et al. 2022, Eq. 4 with D.2).
    Returns floats for a scalar C, arrays for an array C.
    """
    p = _params(params)
    C = _positive_array(C, "C")
    if p["alpha"] <= 0 or p["beta"] <= 0:
        raise ValueError("alpha and beta must be positive for a compute-optimal allocation to exist.")
    s = p["alpha"] + p["beta"]
    G = (p["alpha"] * p["A"] / (p["beta"] * p["B"])) ** (1.0 / s)
    ND = C / flops_per_param_token
    N_opt = G * ND ** (p["beta"] / s)
    D_opt = ND ** (p["alpha"] / s) / G
    if np.ndim(N_opt) == 0:
        return float(N_opt), float(D_opt)
    return N_opt, D_opt


def isoflop_curve(C: float, N: Any, params: Mapping[str, float], *,
                  flops_per_param_token: float = 6.0) -> np.ndarray:
    """The law's loss along an IsoFLOP line: L(N, C / (6 N)) for each N."""
    N = _positive_array(N, "N")
    return chinchilla_loss(N, C / (flops_per_param_token * N), params)


def isoflop_minimum(N: Any, L: Any) -> dict[str, float]:
    """Chinchilla's Approach 2 for one budget: fit a parabola to L against ln N, return its vertex.

    Returns ``{"N_opt", "L_opt", "curvature"}``; raises ``ValueError`` if the parabola opens downward
    (the runs do not bracket a minimum), and flags a vertex outside the sampled range with
    ``"extrapolated": 1.0``.
    """
    N, L = _positive_array(N, "N"), _positive_array(L, "L")
    _same_length(("N", N), ("L", L), minimum=3)
    x = np.log(N)
    c2, c1, c0 = np.polyfit(x, L, 2)
    if c2 <= 0:
        raise ValueError("the losses along this IsoFLOP line do not curve upward, so they bracket no "
                         "minimum; add smaller and larger models to this budget.")
    x_opt = -c1 / (2 * c2)
    out = {"N_opt": float(math.exp(x_opt)), "L_opt": float(c0 - c1**2 / (4 * c2)), "curvature": float(c2),
           "extrapolated": float(not (x.min() <= x_opt <= x.max()))}
    return out


# ----------------------------------------------------------------------------------------------
# The data file
# ----------------------------------------------------------------------------------------------


def load_published_laws(path: str | Path | None = None) -> dict[str, Any]:
    """Read ``data/published_laws.json`` (the published laws with their citations)."""
    path = Path(path) if path is not None else REPO / "data" / "published_laws.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; it ships with the course repository (data/published_laws.json).")
    return json.loads(path.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------
# Sweeps: train GPTs of several sizes, on a grid of token budgets or along IsoFLOP lines
# ----------------------------------------------------------------------------------------------


def _gpt_config(vocab_size: int, context: int, d_model: int, n_layer: int) -> Any:
    from course_lib.parts.model import GPTConfig

    return GPTConfig(vocab_size=vocab_size, context=context, n_layer=n_layer,
                     n_head=max(1, d_model // 16), d_model=d_model)


def run_sweep(train_tokens: Any, val_tokens: Any, *, vocab_size: int, sizes: Sequence[tuple[int, int]],
              steps: Sequence[int], batch_size: int, context: int, lr: float = 5e-3,
              device: Any = "cpu", eval_batches: int = 10, seed: int = 0,
              progress: bool = True) -> list[dict[str, Any]]:
    """Train one ``course_lib.parts.model.GPT`` per (size, step budget) and return one record per run.

    ``sizes`` holds (d_model, n_layer) pairs (n_head = max(1, d_model // 16)); every run trains for
    its number of ``steps`` on batches of ``batch_size`` windows of ``context`` tokens with
    ``course_lib.parts.train.train`` (warm-up, then cosine decay over exactly that many steps, so each run
    is a finished run, as in Hoffmann et al. 2022, not a snapshot of a longer one). A record holds
    d_model, n_layer, N (non-embedding parameters, Kaplan's count), N_total, steps, D (training
    tokens), C = 6·N·D, the final validation loss and the seconds it took.
    """
    if not sizes or not steps:
        raise ValueError("sizes and steps must both be non-empty lists.")
    plan = [{"d_model": d, "n_layer": L, "steps": s} for (d, L) in sizes for s in steps]
    records = _train_runs(plan, train_tokens, val_tokens, vocab_size=vocab_size, batch_size=batch_size,
                          context=context, lr=lr, device=device, eval_batches=eval_batches, progress=progress,
                          seeds=(seed,))
    for r in records:
        r["N"] = r.pop("N_non_embedding")
        r["C"] = 6.0 * r["N"] * r["D"]
    return records


def isoflop_sweep(train_tokens: Any, val_tokens: Any, *, vocab_size: int,
                  plan: Mapping[float, Sequence[tuple[int, int]]], batch_size: int, context: int,
                  lr: float = 1e-2, device: Any = "cpu", eval_batches: int = 100,
                  seeds: Sequence[int] | Mapping[float, Sequence[int]] = (0,), workers: int = 1,
                  progress: bool = True, reuse: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """Chinchilla's Approach 2 sweep: for each budget C in ``plan``, train each (d_model, n_layer) in ``plan[C]``
    for as many steps as make 6·N·D = C (Hoffmann et al. 2022, Sec. 3.2).

    N counts *all* parameters, embeddings included, as Hoffmann et al. do (Kaplan et al. 2020 leave the
    embeddings out); D = steps · batch_size · context, with the steps rounded to an integer, so a run's
    own C = 6·N·D is within half a step of the budget. Every run has its own warm-up and cosine
    schedule ending at its last step. ``seeds`` are the training seeds of every run, or a dict giving
    them per budget. ``workers`` > 1 trains that many runs at once in separate processes (one thread
    each); a run's numbers do not depend on where it ran. One record per run and seed: C_budget,
    d_model, n_layer, N, N_non_embedding, steps, D, C, C_matmul (every matrix multiply counted,
    attention and the lm head included: ``course_lib.parts.model.flops_per_token`` · D), seed, val_loss, seconds.

    ``reuse`` holds records of an earlier sweep made with the same data and recipe (the caller checks
    that): a job with the same budget, size, steps and seed is not trained again but returned as it was
    recorded. Training is deterministic on one machine, so this extends a recorded sweep with new runs
    without changing the old ones.
    """
    from course_lib.parts.model import param_count_formula

    if not plan:
        raise ValueError("plan is empty: give {budget C: [(d_model, n_layer), ...]}.")
    tokens_per_step = batch_size * context
    jobs = []
    for C, sizes in sorted(plan.items()):
        C = float(_positive_array(C, "budget C"))
        if len(sizes) < 3:
            raise ValueError(f"the budget C={C:.3g} has {len(sizes)} model sizes; a parabola needs at least 3, "
                             f"and more sizes pin its vertex down better.")
        budget_seeds = seeds.get(C, (0,)) if isinstance(seeds, Mapping) else seeds
        for d_model, n_layer in sizes:
            N = param_count_formula(_gpt_config(vocab_size, context, d_model, n_layer), non_embedding=False)
            steps = round(C / (6.0 * N * tokens_per_step))
            if steps < 1:
                raise ValueError(f"the budget C={C:.3g} buys less than one step of the model with d_model="
                                 f"{d_model} (N={N:,}); use a larger budget or a smaller model.")
            jobs += [({"C_budget": C, "d_model": d_model, "n_layer": n_layer, "steps": steps}, s) for s in budget_seeds]
    def key(entry: Mapping[str, Any], seed: int) -> tuple:
        return float(entry["C_budget"]), int(entry["d_model"]), int(entry["n_layer"]), int(entry["steps"]), int(seed)

    done = {key(r, r["seed"]): dict(r) for r in reuse}
    todo = [job for job in jobs if key(*job) not in done]
    trained = _train_jobs(todo, train_tokens, val_tokens, workers=workers, progress=progress,
                          settings=dict(vocab_size=vocab_size, batch_size=batch_size, context=context, lr=lr,
                                        device=str(device), eval_batches=eval_batches))
    for r in trained:
        r["N"] = r.pop("N_total")
        r["C"] = 6.0 * r["N"] * r["D"]
        done[key(r, r["seed"])] = r
    return [done[key(*job)] for job in jobs]


def _train_runs(plan: list[dict[str, Any]], train_tokens: Any, val_tokens: Any, *, vocab_size: int,
                batch_size: int, context: int, lr: float, device: Any, eval_batches: int, progress: bool,
                seeds: tuple[int, ...]) -> list[dict[str, Any]]:
    """Train one GPT per entry of ``plan`` and seed; each record is the entry plus what was measured."""
    return _train_jobs([(entry, seed) for entry in plan for seed in seeds], train_tokens, val_tokens, workers=1,
                       progress=progress, settings=dict(vocab_size=vocab_size, batch_size=batch_size,
                                                        context=context, lr=lr, device=str(device),
                                                        eval_batches=eval_batches))


def _train_jobs(jobs: list[tuple[dict[str, Any], int]], train_tokens: Any, val_tokens: Any, *, workers: int,
                progress: bool, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Run the (entry, seed) jobs here or in ``workers`` processes; records come back in the jobs' order."""
    import torch
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc="sweep", disable=not progress)
    try:
        if workers <= 1:
            # Models this small are dominated by per-op overhead on a CPU: one thread is faster than several
            # (and far faster on a busy machine, where threads wait for each other).
            threads = torch.get_num_threads()
            if torch.device(settings["device"]).type == "cpu":
                torch.set_num_threads(1)
            try:
                records = []
                for entry, seed in jobs:
                    records.append(_train_one(entry, seed, train_tokens, val_tokens, **settings))
                    bar.update(1)
                return records
            finally:
                torch.set_num_threads(threads)
        import concurrent.futures
        import multiprocessing

        # the longest runs first, so that no worker is left with a long run at the end
        order = sorted(range(len(jobs)), key=lambda i: -jobs[i][0]["steps"] * jobs[i][0]["d_model"] ** 2)
        records: list[dict[str, Any] | None] = [None] * len(jobs)
        with concurrent.futures.ProcessPoolExecutor(
                max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                initargs=(train_tokens, val_tokens, settings)) as pool:
            futures = {pool.submit(_worker_job, jobs[i]): i for i in order}
            for future in concurrent.futures.as_completed(futures):
                records[futures[future]] = future.result()
                bar.update(1)
        return records  # type: ignore[return-value]
    finally:
        bar.close()


_WORKER: dict[str, Any] = {}


def _start_worker(train_tokens: Any, val_tokens: Any, settings: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(1)
    _WORKER.update(train_tokens=train_tokens, val_tokens=val_tokens, settings=settings)


def _worker_job(job: tuple[dict[str, Any], int]) -> dict[str, Any]:
    return _train_one(job[0], job[1], _WORKER["train_tokens"], _WORKER["val_tokens"], **_WORKER["settings"])


def _train_one(entry: dict[str, Any], seed: int, train_tokens: Any, val_tokens: Any, *, vocab_size: int,
               batch_size: int, context: int, lr: float, device: str, eval_batches: int) -> dict[str, Any]:
    """Train one GPT of ``entry``'s size for ``entry["steps"]`` steps; the entry plus what was measured."""
    import time

    import torch

    from course_lib.parts.model import GPT, count_params, flops_per_token
    from course_lib.parts.train import TrainConfig, train

    torch.manual_seed(seed)
    config = _gpt_config(vocab_size, context, entry["d_model"], entry["n_layer"])
    model = GPT(config)
    start = time.perf_counter()
    history = train(model, train_tokens, val_tokens,
                    TrainConfig(steps=entry["steps"], batch_size=batch_size, lr=lr,
                                warmup_steps=min(20, entry["steps"] // 5), eval_every=0,
                                eval_batches=eval_batches, seed=seed, progress=False),
                    device=device)
    D = entry["steps"] * batch_size * context
    return {**entry, "seed": seed, "N_total": count_params(model, non_embedding=False),
            "N_non_embedding": count_params(model, non_embedding=True), "D": D,
            "C_matmul": float(flops_per_token(config, training=True, seq_len=context) * D),
            "val_loss": history.val_loss[-1], "seconds": round(time.perf_counter() - start, 2)}


# ----------------------------------------------------------------------------------------------
# Approach 2 on trained runs, the Approach 3 fit's uncertainty
# ----------------------------------------------------------------------------------------------


def mean_over_seeds(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One record per (C_budget, d_model, n_layer): the first seed's record with val_loss averaged over seeds."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["C_budget"], r["d_model"], r["n_layer"]), []).append(r)
    return [{**rs[0], "val_loss": float(np.mean([r["val_loss"] for r in rs])), "n_seeds": len(rs)}
            for rs in groups.values()]


def isoflop_minima(runs: Sequence[Mapping[str, Any]], *, size_key: str = "N") -> list[dict[str, Any]]:
    """Approach 2 on measured losses: per budget, a parabola in ln N through the runs' final losses.

    ``runs`` are records of :func:`isoflop_sweep` (several seeds are averaged first). Returns, per
    budget in increasing order, the vertex of :func:`isoflop_minimum` with ``C`` (the budget),
    ``n_runs`` and the parabola's residuals (``rms_residual``, ``max_abs_residual``, nats).
    ``size_key="N_non_embedding"`` puts the parabola on Kaplan's count of N instead; ``C_count`` is
    then the budget in that count at the vertex, 6·N_opt·D of the model at the vertex (see
    :func:`counted_budget`); with ``size_key="N"`` it is the budget C itself.
    """
    by_budget = _by_budget(runs)
    out = []
    for C, rs in sorted(by_budget.items()):
        N = np.array([r[size_key] for r in rs], dtype=float)
        L = np.array([r["val_loss"] for r in rs], dtype=float)
        vertex = isoflop_minimum(N, L)
        residual = L - np.polyval(np.polyfit(np.log(N), L, 2), np.log(N))
        out.append({"C": C, **vertex, "C_count": counted_budget(C, vertex["N_opt"], rs, size_key),
                    "n_runs": len(rs), "rms_residual": float(np.sqrt(np.mean(residual**2))),
                    "max_abs_residual": float(np.abs(residual).max())})
    return out


def _by_budget(runs: Sequence[Mapping[str, Any]]) -> dict[float, list[dict[str, Any]]]:
    by_budget: dict[float, list[dict[str, Any]]] = {}
    for r in mean_over_seeds(runs):
        by_budget.setdefault(float(r["C_budget"]), []).append(r)
    return by_budget


def counted_budget(C: float, N_opt: float, runs: Sequence[Mapping[str, Any]], size_key: str) -> float:
    """The budget of the model at a vertex, counted as ``size_key`` counts N: 6 · N_opt · D_opt.

    The vertex ``N_opt`` is in the ``size_key`` count (e.g. Kaplan's non-embedding N). The model there
    has some total size N_all, and its tokens are D_opt = C / (6 · N_all), so 6 · N_opt · D_opt =
    C · N_opt / N_all. N_all is read off the architecture through this budget's ``runs``: ln N_all is
    a smooth, increasing function of ln N_opt (both grow with the width), interpolated linearly between
    the runs (and extended along the end segments). Both numbers thus come from the same vertex, not
    from the vertices of two parabolas.
    """
    if size_key == "N":
        return float(C)
    pairs = sorted({(math.log(r[size_key]), math.log(r["N"])) for r in runs})
    x, y = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    if x.size < 2:
        raise ValueError("counting N another way needs runs of at least two sizes at this budget.")
    t = math.log(N_opt)
    i = int(np.clip(np.searchsorted(x, t) - 1, 0, x.size - 2))          # the segment t falls in (or the end one)
    log_N_all = y[i] + (y[i + 1] - y[i]) * (t - x[i]) / (x[i + 1] - x[i])
    return float(C) * N_opt / math.exp(log_N_all)


def bootstrap_isoflop_exponent(runs: Sequence[Mapping[str, Any]], *, n_resamples: int = 1000, seed: int = 0,
                               size_key: str = "N") -> np.ndarray:
    """The exponent a of N_opt ∝ C^a, refitted on runs resampled with replacement within each budget.

    With ``size_key="N_non_embedding"`` both N and C are counted Kaplan's way: each resample's vertex
    gets its own budget in that count (:func:`counted_budget`). A resample that leaves fewer than 3 distinct sizes in a budget, or whose parabola opens downward,
    is drawn again (a parabola needs 3 points that curve upward).
    """
    rng = np.random.default_rng(seed)
    by_budget = _by_budget(runs)
    budgets = sorted(by_budget)
    out = np.empty(n_resamples)
    for i in range(n_resamples):
        for _ in range(100):
            minima, counted = [], []
            for C in budgets:
                rs = by_budget[C]
                pick = rng.integers(len(rs), size=len(rs))
                if len(set(pick.tolist())) < 3:
                    break
                N = np.array([rs[j][size_key] for j in pick], dtype=float)
                L = np.array([rs[j]["val_loss"] for j in pick], dtype=float)
                try:
                    minima.append(isoflop_minimum(N, L)["N_opt"])
                except ValueError:
                    break
                counted.append(counted_budget(C, minima[-1], rs, size_key))   # the resample's own vertex
            if len(minima) == len(budgets):
                out[i] = fit_exponent(counted, minima)["a"]
                break
        else:  # pragma: no cover -- needs a budget whose runs hardly ever curve upward
            raise RuntimeError("could not draw a resample whose parabolas all open upward; add runs per budget.")
    return out


def _start_at(law: Mapping[str, float]) -> dict[str, tuple[float]]:
    """A one-point "grid" for :func:`fit_chinchilla`: start L-BFGS at ``law``."""
    p = _params(law)
    return {"a": (math.log(p["A"]),), "b": (math.log(p["B"]),), "e": (math.log(p["E"]),),
            "alpha": (p["alpha"],), "beta": (p["beta"],)}


def bootstrap_chinchilla(N: Any, D: Any, L: Any, law: Mapping[str, float], *, n_resamples: int = 200,
                         seed: int = 0, delta: float = 1e-3) -> dict[str, np.ndarray]:
    """Refit L(N, D) on runs drawn with replacement (Besiroglu et al. 2024, Sec. 4: a bootstrap over runs).

    Each refit starts L-BFGS at ``law`` (the fit of all runs), which finds the same optimum as the grid
    at a fraction of the cost. Returns arrays E, A, B, alpha, beta and a = beta/(alpha+beta).
    """
    N, D, L = _positive_array(N, "N"), _positive_array(D, "D"), _positive_array(L, "L")
    _same_length(("N", N), ("D", D), ("L", L), minimum=5)
    rng = np.random.default_rng(seed)
    start = _start_at(law)
    draws = {k: np.empty(n_resamples) for k in (*_PARAMS, "a")}
    for i in range(n_resamples):
        pick = rng.integers(N.size, size=N.size)
        fit = fit_chinchilla(N[pick], D[pick], L[pick], delta=delta, grid=start)
        for k in _PARAMS:
            draws[k][i] = fit[k]
        draws["a"][i] = optimal_exponents(fit)["a"]
    return draws


def interval(draws: Any, level: float = 0.95) -> tuple[float, float]:
    """The central percentile interval of bootstrap draws, e.g. (2.5%, 97.5%) for ``level=0.95``."""
    draws = np.asarray(draws, dtype=float)
    tail = 50.0 * (1.0 - level)
    lo, hi = np.percentile(draws, [tail, 100.0 - tail])
    return float(lo), float(hi)


# ----------------------------------------------------------------------------------------------
# The scaling lab: an offline "training service" over the recorded sweep
# ----------------------------------------------------------------------------------------------


class FlopBudgetExceeded(RuntimeError):
    """A query to :class:`TrainingService` would spend more FLOPs than are left."""


class TrainingService:
    """An offline training service for the lab of notebooks/05_scaling_laws.ipynb.

    It holds recorded runs of the synthetic language at a few small budgets. ``train(N, C)`` "trains"
    the model with N parameters for C FLOPs (D = C / 6N tokens) and returns its final validation loss,
    charging C to ``flop_budget``; asking again for a run already paid for is free. ``menu()`` lists
    what can be bought. The lab's question is the compute-optimal N and the loss at ``target_budget``,
    ten times the largest budget on offer; its answer lies in the part of the recorded sweep that is
    not for sale. ``floor`` is the lowest loss the evaluation can reach (the window floor).
    """

    def __init__(self, runs: Sequence[Mapping[str, Any]], *, offered_budgets: Sequence[float], flop_budget: float,
                 target_budget: float, floor: float) -> None:
        offered = {float(C) for C in offered_budgets}
        self._runs = {(int(r["N"]), float(r["C_budget"])): r for r in mean_over_seeds(runs)
                      if float(r["C_budget"]) in offered}
        if not self._runs:
            raise ValueError("none of the runs lies on an offered budget; check offered_budgets.")
        self.offered_budgets = tuple(sorted(offered))
        self.flop_budget, self.target_budget, self.floor = float(flop_budget), float(target_budget), float(floor)
        self.spent = 0.0
        self.bought: list[dict[str, float]] = []

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | None = None) -> TrainingService:
        """The service of the recorded sweep (``data/results/scaling_cpu.json``)."""
        record = record if record is not None else _scaling_record()
        lab = record["results"]["lab"]
        return cls(record["results"]["runs"], offered_budgets=lab["offered_budgets"],
                   flop_budget=lab["flop_budget"], target_budget=lab["target_budget"], floor=lab["floor"])

    @property
    def remaining(self) -> float:
        return self.flop_budget - self.spent

    def menu(self) -> list[dict[str, float]]:
        """Every run on offer: N (all parameters), C (its budget and price, FLOPs) and D = C / (6N) tokens."""
        return [{"N": N, "C": C, "D": self._runs[N, C]["D"]} for N, C in sorted(self._runs, key=lambda k: (k[1], k[0]))]

    def train(self, N: int, C: float) -> float:
        """The final validation loss (nats/token) of the model with ``N`` parameters trained on budget ``C``."""
        key = (int(N), float(C))
        if key[1] not in self.offered_budgets:
            raise ValueError(f"no runs are on offer at C={float(C):.3g}; the budgets on offer are "
                             f"{', '.join(f'{b:.3g}' for b in self.offered_budgets)} FLOPs.")
        if key not in self._runs:
            sizes = sorted(n for n, c in self._runs if c == key[1])
            raise ValueError(f"no model with N={N} on offer at C={float(C):.3g}; the sizes there are {sizes}.")
        run = self._runs[key]
        if not any(b["N"] == key[0] and b["C"] == key[1] for b in self.bought):
            if key[1] > self.remaining * (1 + 1e-12):
                raise FlopBudgetExceeded(
                    f"this run costs {key[1]:.3g} FLOPs but only {self.remaining:.3g} of your {self.flop_budget:.3g} "
                    f"are left ({len(self.bought)} runs bought); choose fewer runs.")
            self.spent += key[1]
            self.bought.append({"N": key[0], "C": key[1], "D": float(run["D"]), "loss": float(run["val_loss"])})
        return float(run["val_loss"])

    def __repr__(self) -> str:
        return (f"TrainingService({len(self._runs)} runs on offer at C = "
                f"{', '.join(f'{b:.0e}' for b in self.offered_budgets)}; spent {self.spent:.3g} of "
                f"{self.flop_budget:.3g} FLOPs; question: N_opt and loss at C = {self.target_budget:.0e})")


def _losses_by_size(runs: Sequence[Mapping[str, Any]], C: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """At budget ``C``: the model sizes N in increasing order and, for each, its losses ordered by seed."""
    by_size: dict[float, list[float]] = {}
    for r in sorted((r for r in runs if float(r["C_budget"]) == float(C)), key=lambda r: r.get("seed", 0)):
        by_size.setdefault(float(r["N"]), []).append(float(r["val_loss"]))
    sizes = sorted(by_size)
    return np.array(sizes, dtype=float), [np.array(by_size[n]) for n in sizes]


def _seed_bootstrap_vertex(N: np.ndarray, losses: Sequence[np.ndarray], rng: np.random.Generator) -> dict[str, Any]:
    """The parabola's vertex after each size's seeds are drawn again with replacement and averaged
    (ValueError where the resampled line curves downward)."""
    return isoflop_minimum(N, [l[rng.integers(len(l), size=len(l))].mean() for l in losses])


def lab_truth(record: Mapping[str, Any] | None = None, *, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """What the lab asks for, and how well the record knows it.

    The answer is the vertex of the parabola through the target budget's runs, each size's loss
    averaged over its recorded seeds. Its uncertainty comes from a bootstrap over seeds: each size's
    seeds are drawn again with replacement, averaged, and the vertex refitted. Returns ``C``, ``N_opt``,
    ``loss``, ``n_seeds``, the vertex of each seed alone (``N_opt_by_seed``, ``loss_by_seed``) and the
    bootstrap's standard deviations ``sd_log_N`` (of ln N_opt) and ``sd_loss`` (nats); with one seed
    the last two are 0.
    """
    record = record if record is not None else _scaling_record()
    target = float(record["results"]["lab"]["target_budget"])
    N, losses = _losses_by_size(record["results"]["runs"], target)
    vertex = isoflop_minimum(N, [l.mean() for l in losses])
    seeds = sorted({r.get("seed", 0) for r in record["results"]["runs"] if float(r["C_budget"]) == target})
    per_seed = [isoflop_minimum(N, [l[i] for l in losses]) for i in range(min(len(l) for l in losses))]
    rng = np.random.default_rng(seed)
    draws = []
    if len(seeds) > 1:
        for _ in range(n_resamples):
            try:
                draws.append(_seed_bootstrap_vertex(N, losses, rng))
            except ValueError:                      # a resample that curves downward has no vertex
                continue
    return {"C": target, "N_opt": vertex["N_opt"], "loss": vertex["L_opt"], "n_seeds": len(seeds),
            "N_opt_by_seed": [v["N_opt"] for v in per_seed], "loss_by_seed": [v["L_opt"] for v in per_seed],
            "sd_log_N": float(np.std([math.log(d["N_opt"]) for d in draws], ddof=1)) if draws else 0.0,
            "sd_loss": float(np.std([d["L_opt"] for d in draws], ddof=1)) if draws else 0.0}


def recorded_runs(budgets: Sequence[float], *, seeds: Sequence[int] | None = (0,),
                  record: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The recorded sweep's runs at ``budgets`` (and ``seeds``; ``None`` for every seed), nothing else.

    The notebook reads the record through this before the lab, so that the budgets the lab asks about
    stay out of sight until its check has been run.
    """
    record = record if record is not None else _scaling_record()
    wanted = {float(C) for C in budgets}
    return [dict(r) for r in record["results"]["runs"] if float(r["C_budget"]) in wanted
            and (seeds is None or r.get("seed", 0) in seeds)]


def extrapolate_optimum(budgets: Sequence[float], vertices: Sequence[Mapping[str, float]], *, floor: float,
                        target: float) -> dict[str, float]:
    """The lab's suggested method: N_opt ∝ C^a through the vertices, and L_opt − floor ∝ C^(−γ)."""
    size = fit_exponent(budgets, [v["N_opt"] for v in vertices])
    excess = fit_power_law(budgets, np.array([v["L_opt"] for v in vertices]) - floor, floor=False)
    return {"N_opt": size["k"] * target ** size["a"], "loss": floor + excess["A"] * target ** -excess["alpha"]}


def lab_choices(record: Mapping[str, Any] | None = None, *, per_budget: int = 5) -> dict[str, np.ndarray]:
    """The suggested method on every choice of ``per_budget`` runs from each budget the lab sells.

    For each choice (C(7, 5)² = 441 with the recorded menu), one parabola per budget through the runs
    chosen and :func:`extrapolate_optimum`. Returns arrays ``N_opt`` and ``loss`` (nan where a chosen
    line curves downward) and ``brackets`` (whether every chosen line's vertex lies inside its runs).
    """
    service = TrainingService.from_record(record)
    lines = {C: [m for m in service.menu() if m["C"] == C] for C in service.offered_budgets}
    out: dict[str, list[float]] = {"N_opt": [], "loss": [], "brackets": []}
    for picks in itertools.product(*(itertools.combinations(range(len(lines[C])), per_budget) for C in lines)):
        try:
            vertices = [isoflop_minimum([lines[C][i]["N"] for i in pick], [service._runs[lines[C][i]["N"], C]["val_loss"]
                                                                           for i in pick])
                        for C, pick in zip(lines, picks)]
        except ValueError:
            out["N_opt"].append(math.nan), out["loss"].append(math.nan), out["brackets"].append(False)
            continue
        guess = extrapolate_optimum(list(lines), vertices, floor=service.floor, target=service.target_budget)
        out["N_opt"].append(guess["N_opt"]), out["loss"].append(guess["loss"])
        out["brackets"].append(not any(v["extrapolated"] for v in vertices))
    return {k: np.array(v, dtype=float if k != "brackets" else bool) for k, v in out.items()}


def lab_tolerances(record: Mapping[str, Any] | None = None, *, n_resamples: int = 1000,
                   seed: int = 0) -> dict[str, Any]:
    """How close a lab prediction must come to the answer, and the measured noise that bounds it from below.

    The rule: a prediction passes if it lies within half the distance from the answer to the nearest
    naive guess, on the log scale for N_opt and in nats for the loss. The naive guesses need no
    fitting: for N_opt, no growth beyond the largest budget on sale (its vertex) and all the extra
    compute into parameters (that vertex times target / budget); for the loss, no improvement on the
    largest budget on sale and the floor itself. So the nearest naive guess is refused, by a margin of one
    tolerance, unless the noise bound below sets the tolerance.

    The noise a check cannot see through bounds the tolerances from below (they are at least
    2·√(sd_truth² + sd_sale²)):

    * ``sd_*_truth``: the answer's own uncertainty, the bootstrap over seeds of :func:`lab_truth`;
    * ``sd_*_sale``: how far a sound prediction moves only because the runs on sale carry seed noise:
      :func:`extrapolate_optimum` through the five middle sizes of each budget on sale, with each
      run's seeds drawn again with replacement.

    Returns ``N_factor`` and ``loss_nats`` (the tolerances), ``naive`` (name -> (quantity, value)),
    the four standard deviations, and ``noise_N_factor`` and ``noise_loss_nats`` (the lower bounds).
    """
    record = record if record is not None else _scaling_record()
    truth = lab_truth(record, n_resamples=n_resamples, seed=seed)
    lab = record["results"]["lab"]
    offered, floor, target = [float(C) for C in lab["offered_budgets"]], float(lab["floor"]), float(lab["target_budget"])
    rng = np.random.default_rng(seed)
    lines = []
    for C in offered:
        N, losses = _losses_by_size(record["results"]["runs"], C)
        middle = slice((len(N) - 5) // 2, (len(N) - 5) // 2 + 5) if len(N) > 5 else slice(None)
        lines.append((N[middle], losses[middle]))
    log_N, loss = [], []
    for _ in range(n_resamples):
        try:
            vertices = [_seed_bootstrap_vertex(N, losses, rng) for N, losses in lines]
        except ValueError:
            continue
        guess = extrapolate_optimum(offered, vertices, floor=floor, target=target)
        log_N.append(math.log(guess["N_opt"]))
        loss.append(guess["loss"])
    sd_log_N_sale, sd_loss_sale = float(np.std(log_N, ddof=1)), float(np.std(loss, ddof=1))
    largest = isoflop_minima([r for r in record["results"]["runs"] if float(r["C_budget"]) == max(offered)])[0]
    naive = {"no growth beyond the largest budget on sale": ("N_opt", largest["N_opt"]),
             "all the extra compute into parameters": ("N_opt", largest["N_opt"] * target / max(offered)),
             "no improvement on the largest budget on sale": ("loss", largest["L_opt"]),
             "the floor": ("loss", floor)}
    half_N = min(abs(math.log(v / truth["N_opt"])) for q, v in naive.values() if q == "N_opt") / 2
    half_L = min(abs(v - truth["loss"]) for q, v in naive.values() if q == "loss") / 2
    noise_N = 2 * math.hypot(truth["sd_log_N"], sd_log_N_sale)
    noise_L = 2 * math.hypot(truth["sd_loss"], sd_loss_sale)
    return {"N_factor": math.exp(max(half_N, noise_N)), "loss_nats": max(half_L, noise_L), "naive": naive,
            "sd_log_N_truth": truth["sd_log_N"], "sd_loss_truth": truth["sd_loss"],
            "sd_log_N_sale": sd_log_N_sale, "sd_loss_sale": sd_loss_sale,
            "noise_N_factor": math.exp(noise_N), "noise_loss_nats": noise_L}


def _scaling_record() -> dict[str, Any]:
    from course_lib.tools import results

    record = results.recorded("scaling", "cpu")
    if record is None:
        raise FileNotFoundError("data/results/scaling_cpu.json is missing: it ships with the course; "
                                "remake it with `python -m course_lib.experiments scaling`.")
    return record


# ----------------------------------------------------------------------------------------------
# The recorded experiment: python -m course_lib.experiments scaling
# ----------------------------------------------------------------------------------------------

#: The synthetic language, model shape and training recipe of the recorded sweep.
SWEEP_SETUP: dict[str, Any] = {
    "language": {"vocab_size": 32, "bigram_successors": 4, "trigram_successors": 2, "seed": 0},
    "context": 16, "batch_size": 64, "lr": 1e-2, "n_train": 8_500_000, "n_val": 200_000, "data_seed": 0,
    "eval_batches": 100, "workers": 2,
}

#: Budget C (FLOPs, C = 6·N·D with N all parameters) -> the (d_model, n_layer) trained on it. One layer
#: throughout, so that N changes by width alone; the widths bracket each budget's optimum.
ISOFLOP_PLAN: dict[float, tuple[tuple[int, int], ...]] = {
    1e10: tuple((d, 1) for d in (8, 10, 12, 14, 16, 20, 24)),
    3e10: tuple((d, 1) for d in (10, 12, 16, 20, 24, 28, 32)),
    1e11: tuple((d, 1) for d in (12, 16, 20, 24, 32, 40, 48)),
    3e11: tuple((d, 1) for d in (20, 24, 28, 32, 40, 48, 64)),
}

_QUICK_PLAN: dict[float, tuple[tuple[int, int], ...]] = {
    1e8: ((8, 1), (12, 1), (16, 1)), 3e8: ((8, 1), (12, 1), (16, 1)), 1e9: ((8, 1), (12, 1), (16, 1)),
}


def sweep_language(setup: Mapping[str, Any] = SWEEP_SETUP) -> Any:
    """The synthetic language of the sweep (``course_lib.parts.synthetic.make_language`` with the setup's arguments)."""
    from course_lib.parts.synthetic import make_language

    spec = dict(setup["language"])
    return make_language(spec.pop("vocab_size"), **spec)


def experiment(profile: Any, *, seeds: int = 3, quick: bool = False) -> dict[str, Any]:
    """The IsoFLOP sweep of notebook 05, with its Approach 2 and Approach 3 analyses and the lab's setup.

    Every run of :data:`ISOFLOP_PLAN` is trained once (seed 0). The lab's budgets get ``seeds`` seeds:
    the two it sells (the smallest is the one the notebook re-runs live) and the largest, its target,
    whose seeds measure how uncertain the lab's answer is (and so set the check's tolerances). The analyses use seed 0
    only, so every budget has the same noise. Runs already in the recorded sweep of this profile, made
    with the same data and recipe, are reused rather than retrained (``results["reused"]`` says which
    record they come from). ``quick`` is a seconds-long smoke form.
    """
    setup = {**SWEEP_SETUP, **({"n_train": 100_000, "n_val": 20_000, "eval_batches": 2, "workers": 1} if quick else {})}
    plan = _QUICK_PLAN if quick else ISOFLOP_PLAN
    lang = sweep_language(setup)
    floor = lang.window_floor(setup["context"])
    train_tokens, val_tokens = lang.train_val(setup["n_train"], setup["n_val"], seed=setup["data_seed"])
    common = dict(vocab_size=lang.vocab_size, batch_size=setup["batch_size"], context=setup["context"],
                  lr=setup["lr"], device=profile.device, eval_batches=setup["eval_batches"])
    budgets = sorted(plan)
    offered = budgets[:-2] if len(budgets) > 2 else budgets[:1]
    several = tuple(range(max(1, seeds)))
    seeded = sorted({budgets[0], *offered, budgets[-1]})
    previous = None if quick else _reusable_record(profile, setup)
    runs = isoflop_sweep(train_tokens, val_tokens, plan=plan, seeds={C: several for C in seeded},
                         workers=setup["workers"], reuse=previous["results"]["runs"] if previous else (), **common)
    main = [r for r in runs if r["seed"] == 0]
    try:
        analysis = analyse_sweep(main, n_resamples=20 if quick else 1000,
                                 grid=COARSE_GRID if quick else HOFFMANN_GRID)
    except (ValueError, RuntimeError) as error:
        if not quick:
            raise
        analysis = {"skipped": f"the smoke sweep is too short to analyse: {error}"}
    if "approach3" in analysis:
        analysis["approach3"]["E_minus_floor"] = analysis["approach3"]["E"] - floor
    return {
        "setup": {**setup, "plan": {f"{C:.0e}": [list(s) for s in plan[C]] for C in budgets}, "seeds_first_budget": seeds,
                  "entropy_rate": lang.entropy_rate(), "window_floor": floor, "bigram_entropy": lang.bigram_entropy()},
        "runs": runs,
        **analysis,
        "seed_spread": ({f"{C:.0e}": _seed_spread([r for r in runs if r["C_budget"] == C]) for C in seeded}
                        if seeds > 1 else None),
        "reused": ({"runs": sum(1 for r in runs if r in previous["results"]["runs"]),
                    "from": {k: previous["provenance"].get(k) for k in ("date", "commit", "load_average_1min")},
                    "wall_time_s": previous["results"].get("wall_time_s")} if previous else None),
        "lab": {"offered_budgets": offered, "target_budget": budgets[-1], "flop_budget": 5.0 * sum(offered),
                "floor": floor},
    }


#: What must be equal for runs of an earlier record to count as runs of this sweep.
_SAME_RUNS = ("language", "context", "batch_size", "lr", "n_train", "n_val", "data_seed", "eval_batches")


def _reusable_record(profile: Any, setup: Mapping[str, Any]) -> dict[str, Any] | None:
    """The recorded sweep of this profile if it was made with ``setup``'s data and recipe, else None."""
    from course_lib.tools import results

    previous = results.recorded("scaling", profile.name)
    if previous is None or any(previous["results"]["setup"].get(k) != setup[k] for k in _SAME_RUNS):
        return None
    return previous


def _seed_spread(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """How much one run varies with its seed: the std of each size's loss, and each seed's parabola vertex."""
    per_size: dict[int, list[float]] = {}
    for r in runs:
        per_size.setdefault(r["d_model"], []).append(r["val_loss"])
    vertices, losses = [], []
    for seed in sorted({r["seed"] for r in runs}):
        mine = [r for r in runs if r["seed"] == seed]
        try:
            vertex = isoflop_minimum([r["N"] for r in mine], [r["val_loss"] for r in mine])
            vertices.append(vertex["N_opt"])
            losses.append(vertex["L_opt"])
        except ValueError:
            vertices.append(None)
            losses.append(None)
    return {"loss_std_by_d_model": {str(d): float(np.std(v, ddof=1)) for d, v in sorted(per_size.items())},
            "N_opt_by_seed": vertices, "L_opt_by_seed": losses}


def analyse_sweep(runs: Sequence[Mapping[str, Any]], *, n_resamples: int = 1000,
                  grid: Mapping[str, Sequence[float]] | None = None, seed: int = 0) -> dict[str, Any]:
    """Approach 2 (parabola minima, N_opt ∝ C^a) and Approach 3 (the fitted law) on the same runs, each
    with a bootstrap interval over runs (95%)."""
    minima = isoflop_minima(runs)
    a2 = fit_exponent([m["C"] for m in minima], [m["N_opt"] for m in minima])
    a2_draws = bootstrap_isoflop_exponent(runs, n_resamples=n_resamples, seed=seed)
    N, D, L = (np.array([r[k] for r in runs], dtype=float) for k in ("N", "D", "val_loss"))
    law = fit_chinchilla(N, D, L, grid=grid, return_details=True)
    draws = bootstrap_chinchilla(N, D, L, law, n_resamples=n_resamples, seed=seed)
    return {"approach2": {"minima": minima, "a": a2["a"], "k": a2["k"], "a_interval95": interval(a2_draws)},
            "approach3": {**law, "a": optimal_exponents(law)["a"], "E_interval95": interval(draws["E"]),
                          "a_interval95": interval(draws["a"])}}
