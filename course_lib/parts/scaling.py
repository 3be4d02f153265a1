"""Scaling laws: power-law fits, the Chinchilla fit of L(N, D), and compute-optimal allocation.

Explained in notebooks/05_scaling_laws.ipynb. Symbols as in the notebook and the papers:

* N -- parameters, D -- training tokens, C -- training FLOPs, C ≈ 6·N·D (Kaplan et al. 2020, Sec. 2.1).
* L(N) = E + A / N^α                                  -- :func:`fit_power_law` (E = 0 allowed)
* L(N, D) = E + A / N^α + B / D^β                     -- :func:`chinchilla_loss`, :func:`fit_chinchilla`
* N_opt = G (C/6)^(β/(α+β)),  D_opt = G⁻¹ (C/6)^(α/(α+β)),  G = (αA / (βB))^(1/(α+β))
                                                      -- :func:`compute_optimal`

Approach 2 on a set of trained runs (:func:`isoflop_minima`, :func:`bootstrap_isoflop_exponent`) and the
bootstrap of the Chinchilla fit are here too; the sweep that trains the runs and the scaling lab are
recorded experiments (``course_lib.experiments.scaling``, ``course_lib.experiments.scaling_lab``).

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
    "isoflop_curve", "isoflop_minimum", "fit_exponent", "load_published_laws", "mean_over_seeds",
    "isoflop_minima", "counted_budget", "bootstrap_isoflop_exponent", "bootstrap_chinchilla", "interval",
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
