"""The scaling lab of lesson 05: an offline "training service" that sells runs of the recorded sweep
for FLOPs, and the truth the lab's exercise is graded against.

Explained in notebooks/05_scaling_laws.ipynb ("The scaling lab"; exercise 05.3). As in Stanford CS336's
scaling assignment, a student spends a fixed budget on IsoFLOP runs and predicts the compute-optimal model
at a larger budget; here the runs come from data/results/scaling_cpu.json, so the answer is known.
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
