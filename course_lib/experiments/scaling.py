"""The recorded IsoFLOP sweep of lesson 05: train tiny GPTs of several widths on a synthetic language with a
known entropy rate, along lines of equal compute, and analyse them (Chinchilla Approaches 2 and 3).

Explained in notebooks/05_scaling_laws.ipynb. ``python -m course_lib.experiments scaling`` writes
data/results/scaling_cpu.json; the notebook trains one IsoFLOP line live and reads the rest from there.
The fits themselves are lesson parts (``course_lib.parts.scaling``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from course_lib.experiments.cache import run_load
from course_lib.parts.scaling import (_positive_array, bootstrap_chinchilla, bootstrap_isoflop_exponent, COARSE_GRID,
                                      fit_chinchilla, fit_exponent, HOFFMANN_GRID, interval, isoflop_minima,
                                      isoflop_minimum, optimal_exponents)
from course_lib.tools.timing import Stopwatch


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
    ``course_lib.parts.lm.train_lm`` (warm-up, then cosine decay over exactly that many steps, so each run
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
    
    import torch

    from course_lib.parts.model import GPT, count_params, flops_per_token
    from course_lib.parts.lm import TrainConfig, train_lm

    torch.manual_seed(seed)
    config = _gpt_config(vocab_size, context, entry["d_model"], entry["n_layer"])
    model = GPT(config)
    watch = Stopwatch(device).start()
    history = train_lm(model, train_tokens, val_tokens,
                       TrainConfig(steps=entry["steps"], batch_size=batch_size, lr=lr,
                                   warmup_steps=min(20, entry["steps"] // 5), eval_every=0,
                                   eval_batches=eval_batches, seed=seed, progress=False),
                       device=device)
    D = entry["steps"] * batch_size * context
    return {**entry, "seed": seed, "N_total": count_params(model, non_embedding=False),
            "N_non_embedding": count_params(model, non_embedding=True), "D": D,
            "C_matmul": float(flops_per_token(config, training=True, seq_len=context) * D),
            "val_loss": history.val_loss[-1], "seconds": round(watch.stop(), 2), "load_average_1min": run_load()}


#: The synthetic language, model shape and training recipe of the recorded sweep.
SWEEP_SETUP: dict[str, Any] = {
    "language": {"vocab_size": 32, "bigram_successors": 4, "trigram_successors": 2, "seed": 0},
    "context": 16, "batch_size": 64, "lr": 1e-2, "n_train": 8_500_000, "n_val": 200_000, "data_seed": 0,
    "eval_batches": 100, "workers": 2,
    # What a run computes besides the data and recipe: bump it when the model or the loop changes what a
    # run's numbers come out as, so that no run of older code is reused (2: the model's fused LayerNorm).
    "code": 2,
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
_SAME_RUNS = ("language", "context", "batch_size", "lr", "n_train", "n_val", "data_seed", "eval_batches", "code")


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
