"""The recorded comparison of lesson 07: linear probe, BitFit, LoRA at several ranks and full fine-tuning
on one sentiment task, with the same labelled examples and the same number of steps for each.

Explained in notebooks/07_lora.ipynb. ``python -m course_lib.experiments lora`` writes data/results/lora_cpu.json.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from course_lib.experiments.cache import bits, log, RunCache, sizes_for, unbits, is_worker, json_ready
from course_lib.experiments.finetuning import _summarise, _vader, all_comparisons
from course_lib.parts.classifier import (_device_of, embed, evaluate, load_encoder, SentenceClassifier,
                                         train_fixed_steps, train_head_on_embeddings)
from course_lib.tools.data import take
from course_lib.tools.timing import Stopwatch


# Notebook 07 at each profile: LoRA's alpha is alpha_over_r * r, so alpha / r is the same at every rank.
LORA_SIZES: dict[str, dict[str, Any]] = {
    "quick": dict(n_train=32, n_val=16, n_test=16, batch_size=8, max_length=24, epochs=None, steps=2,
                  ranks=(1, 2), search_rank=2, alpha_over_r=2,
                  lrs={"linear probe": (1e-2,), "BitFit": (3e-3,), "LoRA": (1e-3, 3e-3),
                       "full fine-tuning": (1e-4,)}),
    "ci": dict(n_train=200, n_val=48, n_test=48, batch_size=8, max_length=48, epochs=None, steps=3,
               ranks=(1, 4), search_rank=4, alpha_over_r=2,
               lrs={"linear probe": (1e-2,), "BitFit": (3e-3,), "LoRA": (3e-3,), "full fine-tuning": (1e-4,)}),
    "cpu": dict(n_train=1500, n_val=500, n_test=None, batch_size=16, max_length=64, epochs=1, steps=None,
                ranks=(1, 4, 8, 16), search_rank=8, alpha_over_r=2,
                lrs={"linear probe": (3e-3, 1e-2, 3e-2, 1e-1), "BitFit": (1e-3, 3e-3, 1e-2, 3e-2),
                     "LoRA": (3e-4, 1e-3, 3e-3, 1e-2), "full fine-tuning": (3e-5, 1e-4, 3e-4, 1e-3)}),
    "gpu": dict(n_train=None, n_val=None, n_test=None, batch_size=32, max_length=64, epochs=3, steps=None,
                ranks=(1, 2, 4, 8, 16, 64), search_rank=8, alpha_over_r=2,
                lrs={"linear probe": (3e-3, 1e-2, 3e-2), "BitFit": (3e-4, 1e-3, 3e-3),
                     "LoRA": (1e-4, 3e-4, 1e-3, 3e-3), "full fine-tuning": (2e-5, 5e-5, 1e-4)}),
}


LORA_TARGETS = ("query", "value")


def lora_sizes(profile: Any, quick: bool = False) -> dict[str, Any]:
    """The sizes notebook 07 and the ``lora`` experiment use on ``profile`` (a Profile or its name)."""
    return sizes_for(LORA_SIZES, profile, quick)


def experiment(profile: Any, *, seeds: int = 3, quick: bool = False) -> dict[str, Any]:
    """The recorded run behind notebook 07: ``python -m course_lib.experiments lora`` (it calls this).

    Methods that differ only in what trains -- the head alone (linear probe), biases (BitFit), LoRA on
    ``query`` and ``value`` at every rank of ``ranks`` with alpha = alpha_over_r * r (the same scale
    alpha / r at every rank), everything (full fine-tuning) -- trained by :func:`train_fixed_steps` on
    the same labelled examples ``take(train, n_train, seed=s)`` for the same number of steps. Each
    method family's learning rate is chosen on the validation split by a search on seed 0 (LoRA's at
    ``search_rank``, then used at every rank); the other seeds run at the chosen rates. Every pair of
    methods, and each against VADER, is compared with :func:`course_lib.experiments.stats.compare` (test
    examples and seeds resampled together, a three-way verdict); which test examples each method got right in
    each seed is kept (``right``) so that a notebook can make any comparison from the record.
    """
    import copy

    from course_lib.parts import lora
    from course_lib.tools.data import load_sentiment
    from course_lib.tools.profiles import code_version

    sizes = lora_sizes(profile, quick)
    name, profile_name = "lora", "quick" if quick else profile.name
    code_at_start = code_version()
    cache = RunCache(name, profile_name, sizes, enabled=not quick)
    movies = load_sentiment("movies")
    val, test = take(movies["validation"], sizes["n_val"]), take(movies["test"], sizes["n_test"])
    y_test = np.array(test["label"])
    tokenizer, encoder = load_encoder(profile)
    n_train = len(take(movies["train"], sizes["n_train"]))
    steps = sizes["steps"] or math.ceil(sizes["epochs"] * n_train / sizes["batch_size"])

    def family(method: str) -> str:
        return "LoRA" if method.startswith("LoRA") else method

    def build(method: str, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = SentenceClassifier(copy.deepcopy(encoder)).to(_device_of(encoder))
        if method == "linear probe":
            return model.freeze_encoder()
        if method == "BitFit":
            return lora.apply_bitfit(model, trainable_extra=["head"])
        if method.startswith("LoRA"):
            r = int(method.split("=")[1])
            return lora.apply_lora(model, list(LORA_TARGETS), r=r, alpha=sizes["alpha_over_r"] * r,
                                   trainable_extra=["head"])
        return model

    frozen: dict[Any, torch.Tensor] = {}  # the probe's embeddings, computed once per split and seed

    def embeddings(key: Any, data: Any) -> torch.Tensor:
        if key not in frozen:
            with Stopwatch(encoder.device) as watch:
                frozen[key] = embed(encoder, tokenizer, list(data["text"]), max_length=sizes["max_length"])
            frozen[("seconds", key)] = watch.seconds
        return frozen[key]

    def probe_run(lr: float, seed: int, with_val: bool) -> dict[str, Any]:
        pool = take(movies["train"], sizes["n_train"], seed=seed)
        model = build("linear probe", seed)
        e_pool = embeddings(("train", seed), pool)
        out = train_head_on_embeddings(model, e_pool, pool["label"], lr=lr, steps=steps,
                                       batch_size=sizes["batch_size"], seed=seed)
        out["embed_seconds"] = frozen[("seconds", ("train", seed))]
        with torch.no_grad():
            if with_val:
                out["val_accuracy"] = float((model.head(embeddings("val", val)).argmax(-1).numpy()
                                             == np.array(val["label"])).mean())
            out["test_predictions"] = bits(model.head(embeddings("test", test)).argmax(-1).numpy())
        return out

    def one_run(method: str, lr: float, seed: int, with_val: bool) -> dict[str, Any]:
        if method == "linear probe":
            out = probe_run(lr, seed, with_val)
        else:
            model = build(method, seed)
            out = train_fixed_steps(model, tokenizer, take(movies["train"], sizes["n_train"], seed=seed), lr=lr,
                                    steps=steps, batch_size=sizes["batch_size"], max_length=sizes["max_length"],
                                    seed=seed)
            if with_val:
                out["val_accuracy"] = evaluate(model, tokenizer, val, max_length=sizes["max_length"])["accuracy"]
            out["test_predictions"] = bits(evaluate(model, tokenizer, test,
                                                     max_length=sizes["max_length"])["predictions"])
        log(name, f"{method} lr={lr:g} seed {seed}: "
                   + (f"validation {out['val_accuracy']:.3f}, " if with_val else "")
                   + f"test {float((unbits(out['test_predictions']) == y_test).mean()):.3f}, {out['seconds']:.0f} s")
        return out

    def item(method: str, lr: float, seed: int, with_val: bool = False) -> tuple[dict[str, Any], Any]:
        return (dict(method=method, lr=lr, seed=seed, with_val=with_val),
                lambda: one_run(method, lr, seed, with_val))

    search_method = {"linear probe": "linear probe", "BitFit": "BitFit", "LoRA": f"LoRA r={sizes['search_rank']}",
                     "full fine-tuning": "full fine-tuning"}
    methods = ["linear probe", "BitFit", *[f"LoRA r={r}" for r in sizes["ranks"]], "full fine-tuning"]
    planned = [(m, s) for m in methods for s in range(seeds) if not (s == 0 and m == search_method[family(m)])]
    search_items = {fam: [item(search_method[fam], lr, 0, with_val=True) for lr in sizes["lrs"][fam]]
                    for fam in search_method}

    def chosen(fam: str) -> float:
        values = [cache.done[cache.key(settings)] for settings, _ in search_items[fam]]
        return max(zip(sizes["lrs"][fam], values), key=lambda pair: pair[1]["val_accuracy"])[0]  # first of equals

    # every search run first; a family's other seeds as soon as its own search is finished
    while True:
        cache.reload()
        finished = [fam for fam, items in search_items.items() if all(cache.has(st) for st, _ in items)]
        seed_items = [item(m, chosen(family(m)), s) for m, s in planned if family(m) in finished]
        if len(finished) == len(search_items) and all(cache.has(st) for st, _ in seed_items):
            break
        if not cache.work_on_one([it for items in search_items.values() for it in items] + seed_items):
            time.sleep(15)
    chosen_lr = {fam: chosen(fam) for fam in search_items}
    search = {fam: {lr: cache.done[cache.key(st)] for lr, (st, _) in zip(sizes["lrs"][fam], items)}
              for fam, items in search_items.items()}
    done = {(m, s): cache.done[cache.key(item(m, chosen_lr[family(m)], s)[0])] for m, s in planned}
    if is_worker():
        log(name, "worker: no run left, exiting (the main process writes the record)")
        raise SystemExit(0)
    results = {m: [search[family(m)][chosen_lr[family(m)]] if (m, s) not in done else done[(m, s)]
                   for s in range(seeds)] for m in methods}

    vader_right = (_vader(test["text"]) >= 0).astype(int) == y_test
    right = {m: [unbits(r["test_predictions"]) == y_test for r in rows] for m, rows in results.items()}
    predictions = {m: [unbits(r["test_predictions"]).astype(int) for r in rows] for m, rows in results.items()}
    table = _summarise(right, predictions, y_test)
    for m, rows in results.items():
        if m == "linear probe":
            table[m]["embed_seconds_mean"] = float(np.mean([r["embed_seconds"] for r in rows]))
        table[m].update(lr=chosen_lr[family(m)], trainable=rows[0]["trainable"], adam_bytes=rows[0]["adam_bytes"],
                        step_ms=float(np.median([r["step_ms"] for r in rows])),
                        seconds_mean=float(np.mean([r["seconds"] for r in rows])))
    right["VADER (compound ≥ 0)"] = [vader_right] * seeds  # no training: the same answers in every seed
    return json_ready(dict(
        sizes=sizes, seeds=seeds, steps=steps, n_train=n_train, n_val=len(val), n_test=len(test),
        targets=list(LORA_TARGETS), code_at_start=code_at_start, chosen_lr=chosen_lr,
        search={fam: [dict(lr=lr, method=search_method[fam], val_accuracy=r["val_accuracy"],
                           test_accuracy=float((unbits(r["test_predictions"]) == y_test).mean()))
                      for lr, r in by_lr.items()] for fam, by_lr in search.items()},
        table=table, vader_accuracy=float(vader_right.mean()),
        comparisons=all_comparisons({m: np.stack(rows) for m, rows in right.items()}),
        run_commits=sorted({r.get("commit", "not recorded") for rows in results.values() for r in rows}
                           | {r.get("commit", "not recorded") for by_lr in search.values() for r in by_lr.values()}),
        right={m: [bits(r) for r in rows] for m, rows in right.items()},
    ))
