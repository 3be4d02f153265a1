"""The scaling lab of lesson 05: an offline "training service" that sells runs of the recorded sweep
for FLOPs, the truth the lab's exercise is graded against, and how it is graded.

Explained in notebooks/05_scaling_laws.ipynb ("The scaling lab"; exercise 05.3). As in Stanford CS336's
scaling assignment, a student spends a fixed budget on IsoFLOP runs and predicts the compute-optimal model
at a larger budget; here the runs come from data/results/scaling_cpu.json, so the answer is known.

How the lab stays blind offline (the record is on the student's disk): the notebook never shows the target
budget's runs, the check shows the answer only once a prediction passes, a refusal names the quantity that
missed but never the direction, and the check also asks the student's function about two transformed copies
of the sweep (:data:`COPIES`) whose answers follow exactly from the recorded one. A method that learns from
the runs it buys predicts every copy as well as the recorded sweep; a number typed in, or an exponent
assumed instead of fitted, cannot pass all three.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from course_lib.parts.scaling import (
    fit_exponent,
    fit_power_law,
    isoflop_minima,
    isoflop_minimum,
    mean_over_seeds,
)


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
            raise ValueError(f"no model with N={N} on offer at C={float(C):.3g}; the sizes there are {sizes} "
                             f"(take them from service.menu(): the check also asks copies of the sweep whose "
                             f"sizes differ).")
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


# ----------------------------------------------------------------------------------------------
# The answer: the vertex of the target budget's runs, averaged over their seeds
# ----------------------------------------------------------------------------------------------



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
    ``loss``, ``floor``, ``n_seeds``, the vertex of each seed alone (``N_opt_by_seed``, ``loss_by_seed``)
    and the bootstrap's standard deviations of ln N_opt (``sd_log_N``), of the loss (``sd_loss``, nats)
    and of the log of its height above the floor (``sd_log_excess``); with one seed, or ``n_resamples=0``,
    these are 0.
    """
    record = record if record is not None else _scaling_record()
    lab = record["results"]["lab"]
    target, floor = float(lab["target_budget"]), float(lab["floor"])
    N, losses = _losses_by_size(record["results"]["runs"], target)
    vertex = isoflop_minimum(N, [l.mean() for l in losses])
    seeds = sorted({r.get("seed", 0) for r in record["results"]["runs"] if float(r["C_budget"]) == target})
    per_seed = [isoflop_minimum(N, [l[i] for l in losses]) for i in range(min(len(l) for l in losses))]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_resamples if len(seeds) > 1 else 0):
        try:
            draws.append(_seed_bootstrap_vertex(N, losses, rng))
        except ValueError:                      # a resample that curves downward has no vertex
            continue

    def sd(values: list[float]) -> float:
        return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

    return {"C": target, "N_opt": vertex["N_opt"], "loss": vertex["L_opt"], "floor": floor, "n_seeds": len(seeds),
            "N_opt_by_seed": [v["N_opt"] for v in per_seed], "loss_by_seed": [v["L_opt"] for v in per_seed],
            "sd_log_N": sd([math.log(d["N_opt"]) for d in draws]), "sd_loss": sd([d["L_opt"] for d in draws]),
            "sd_log_excess": sd([math.log(d["L_opt"] - floor) for d in draws if d["L_opt"] > floor])}


def recorded_runs(budgets: Sequence[float], *, seeds: Sequence[int] | None = (0,),
                  record: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The recorded sweep's runs at ``budgets`` (and ``seeds``; ``None`` for every seed), nothing else.

    The notebook reads the record through this, so that the budget the lab asks about stays out of sight.
    """
    record = record if record is not None else _scaling_record()
    wanted = {float(C) for C in budgets}
    return [dict(r) for r in record["results"]["runs"] if float(r["C_budget"]) in wanted
            and (seeds is None or r.get("seed", 0) in seeds)]


def budgets_below_target(record: Mapping[str, Any] | None = None) -> list[float]:
    """The recorded budgets smaller than the lab's target: what the notebook may show."""
    record = record if record is not None else _scaling_record()
    target = float(record["results"]["lab"]["target_budget"])
    return sorted({float(r["C_budget"]) for r in record["results"]["runs"] if float(r["C_budget"]) < target})


# ----------------------------------------------------------------------------------------------
# The copies: the recorded sweep transformed so that its answer moves in a known way
# ----------------------------------------------------------------------------------------------

#: The copies of the sweep the check also asks about. At budget C, with g = C / C_ref (C_ref the largest budget
#: on sale), a copy makes every size N' = size · N · g^size_exponent (so N_opt ∝ C^a becomes C^(a + size_exponent))
#: and every loss L' = floor + excess · g^excess_exponent · (L − floor) (so the height above the floor falls more
#: slowly, or faster, with C). Parabola vertices and straight lines in log-log space move with these maps exactly,
#: so each copy's answer is the recorded one, moved; a method that fits the runs moves with it, and a typed-in
#: number or an assumed exponent does not. Each copy moves one quantity only, so that a method which fits the
#: runs but is not exactly moved by the maps (the joint law of section 6) is not asked to follow two at once.
COPIES: dict[str, dict[str, float]] = {
    "N_opt grows faster": {"size": 2.0, "size_exponent": 0.35, "excess": 1.0, "excess_exponent": 0.0},
    "N_opt grows slower": {"size": 0.5, "size_exponent": -0.35, "excess": 1.0, "excess_exponent": 0.0},
    "the loss falls slower": {"size": 1.0, "size_exponent": 0.0, "excess": 2.0, "excess_exponent": 0.45},
    "the loss falls faster": {"size": 1.0, "size_exponent": 0.0, "excess": 0.5, "excess_exponent": -0.45},
}


def copy_of_record(record: Mapping[str, Any], *, size: float, size_exponent: float, excess: float,
                   excess_exponent: float) -> dict[str, Any]:
    """The record with every run moved as :data:`COPIES` describes (sizes rounded to whole parameters,
    tokens scaled so that 6·N·D stays the run's budget); its ``lab`` settings are unchanged."""
    lab = record["results"]["lab"]
    C_ref, floor = max(float(C) for C in lab["offered_budgets"]), float(lab["floor"])
    runs = []
    for r in record["results"]["runs"]:
        g = float(r["C_budget"]) / C_ref
        N = max(1, round(r["N"] * size * g**size_exponent))
        runs.append({**r, "N": N, "D": max(1, round(r["D"] * r["N"] / N)),
                     "val_loss": floor + excess * g**excess_exponent * (float(r["val_loss"]) - floor)})
    return {**record, "results": {**record["results"], "runs": runs}}


def lab_worlds(record: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The records the check asks about: ``"recorded"`` (the sweep itself) and each of :data:`COPIES`."""
    record = record if record is not None else _scaling_record()
    return {"recorded": dict(record), **{name: copy_of_record(record, **moves) for name, moves in COPIES.items()}}


# ----------------------------------------------------------------------------------------------
# How a prediction is graded
# ----------------------------------------------------------------------------------------------

#: A prediction passes when its N_opt is within this factor of the answer's ...
N_FACTOR = 2.0
#: ... and its loss's height above the floor (L − floor) within this factor of the answer's.
EXCESS_FACTOR = 2.5


def grade(prediction: Mapping[str, float], truth: Mapping[str, float]) -> dict[str, Any]:
    """How far ``prediction`` ({"N_opt", "loss"}) is from ``truth`` (:func:`lab_truth`): ``N_ratio`` (N_opt over
    the answer's), ``excess_ratio`` ((loss − floor) over the answer's; 0 or less below the floor) and
    whether each lies within :data:`N_FACTOR` and :data:`EXCESS_FACTOR` (``N_ok``, ``loss_ok``)."""
    N_ratio = float(prediction["N_opt"]) / truth["N_opt"]
    excess_ratio = (float(prediction["loss"]) - truth["floor"]) / (truth["loss"] - truth["floor"])
    N_ok = N_ratio > 0 and abs(math.log(N_ratio)) <= math.log(N_FACTOR) + 1e-12
    loss_ok = excess_ratio > 0 and abs(math.log(excess_ratio)) <= math.log(EXCESS_FACTOR) + 1e-12
    return {"N_ratio": N_ratio, "excess_ratio": excess_ratio, "N_ok": bool(N_ok), "loss_ok": bool(loss_ok)}


# ----------------------------------------------------------------------------------------------
# The evidence that the grading is sound (tests/test_checks_05.py and the notebook's "Going further")
# ----------------------------------------------------------------------------------------------


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


def naive_guesses(record: Mapping[str, Any] | None = None) -> dict[str, dict[str, float]]:
    """Predictions that need no fitting, each as {"N_opt"} or {"loss"}: for N_opt no growth beyond the largest
    budget on sale (its vertex) and all the extra compute into parameters (that vertex times target / budget);
    for the loss no improvement on the largest budget on sale, and the floor itself."""
    record = record if record is not None else _scaling_record()
    lab = record["results"]["lab"]
    largest, target = max(float(C) for C in lab["offered_budgets"]), float(lab["target_budget"])
    there = isoflop_minima([r for r in record["results"]["runs"] if float(r["C_budget"]) == largest])[0]
    return {"no growth beyond the largest budget on sale": {"N_opt": there["N_opt"]},
            "all the extra compute into parameters": {"N_opt": there["N_opt"] * target / largest},
            "no improvement on the largest budget on sale": {"loss": there["L_opt"]},
            "the floor": {"loss": float(lab["floor"])}}


def lab_tolerances(record: Mapping[str, Any] | None = None, *, n_resamples: int = 1000,
                   seed: int = 0) -> dict[str, Any]:
    """The lab's tolerances beside the measured noise that a verdict must not depend on.

    Returns ``N_factor`` and ``excess_factor`` (:data:`N_FACTOR`, :data:`EXCESS_FACTOR`), the standard
    deviations of ln N_opt and of ln(L − floor) of the answer (``sd_*_truth``: the bootstrap over seeds of
    :func:`lab_truth`) and of a sound prediction (``sd_*_sale``: :func:`extrapolate_optimum` through the five
    middle sizes of each budget on sale, with each run's seeds drawn again with replacement), and the noise
    bounds ``noise_N_factor`` and ``noise_excess_factor``: exp(2·√(sd_truth² + sd_sale²)).
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
    log_N, log_excess = [], []
    for _ in range(n_resamples):
        try:
            vertices = [_seed_bootstrap_vertex(N, losses, rng) for N, losses in lines]
        except ValueError:
            continue
        guess = extrapolate_optimum(offered, vertices, floor=floor, target=target)
        log_N.append(math.log(guess["N_opt"]))
        log_excess.append(math.log(guess["loss"] - floor))
    sd_log_N_sale, sd_log_excess_sale = float(np.std(log_N, ddof=1)), float(np.std(log_excess, ddof=1))
    return {"N_factor": N_FACTOR, "excess_factor": EXCESS_FACTOR,
            "sd_log_N_truth": truth["sd_log_N"], "sd_log_excess_truth": truth["sd_log_excess"],
            "sd_log_N_sale": sd_log_N_sale, "sd_log_excess_sale": sd_log_excess_sale,
            "noise_N_factor": math.exp(2 * math.hypot(truth["sd_log_N"], sd_log_N_sale)),
            "noise_excess_factor": math.exp(2 * math.hypot(truth["sd_log_excess"], sd_log_excess_sale))}


def grading_evidence(record: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Counts that say whether the grading is sound, and nothing that would give the answer away.

    ``choices``/``passing``: every choice of five runs per budget on sale, and how many of them the suggested
    method passes with (``bracketing``/``bracketing_passing``: those whose runs bracket both vertices);
    ``naive_refused``: how many of the :func:`naive_guesses` (each completed by the suggested method's other
    quantity) are refused; ``over_noise``: the smaller of the two tolerances over its noise bound, in log units.
    """
    record = record if record is not None else _scaling_record()
    truth, tol, choices = lab_truth(record, n_resamples=0), lab_tolerances(record), lab_choices(record)
    ok = np.isfinite(choices["N_opt"])
    passing = np.array([bool(o) and (g := grade({"N_opt": n, "loss": l}, truth))["N_ok"] and g["loss_ok"]
                        for o, n, l in zip(ok, choices["N_opt"], choices["loss"])])
    sound = {"N_opt": float(np.nanmedian(choices["N_opt"])), "loss": float(np.nanmedian(choices["loss"]))}
    refused = 0
    for guess in naive_guesses(record).values():
        verdict = grade({**sound, **guess}, truth)
        refused += not (verdict["N_ok"] and verdict["loss_ok"])
    over_noise = min(math.log(tol["N_factor"]) / math.log(tol["noise_N_factor"]),
                     math.log(tol["excess_factor"]) / math.log(tol["noise_excess_factor"]))
    return {"choices": int(ok.size), "passing": int(passing.sum()), "bracketing": int(choices["brackets"].sum()),
            "bracketing_passing": int(passing[choices["brackets"]].sum()), "naive": len(naive_guesses(record)),
            "naive_refused": refused, "over_noise": over_noise}


def _scaling_record() -> dict[str, Any]:
    from course_lib.tools import results

    record = results.recorded("scaling", "cpu")
    if record is None:
        raise FileNotFoundError("data/results/scaling_cpu.json is missing: it ships with the course; "
                                "remake it with `python -m course_lib.experiments scaling`.")
    return record
