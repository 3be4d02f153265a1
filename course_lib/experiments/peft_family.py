"""The recorded comparison of lesson 08: every method of the PEFT family on one sentiment task, learning rates
chosen on validation, several seeds, each method against full fine-tuning, and the memory each needs.

Explained in notebooks/08_peft_family.ipynb. ``python -m course_lib.experiments peft_family`` writes
data/results/peft_family_cpu.json; the notebook runs seed 0 live with the same settings. The record keeps, per
method and seed, which test snippets were right (``test_correct_by_seed``), so that every comparison
(:func:`versus_full`, :func:`course_lib.experiments.stats.compare`) resamples seeds and snippets together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch import nn

from course_lib.experiments.cache import run_load
from course_lib.experiments.stats import compare, Comparison
from course_lib.parts.classifier import _device_of, evaluate
from course_lib.parts.peft_family import (ADAPTER_M, build, encode_batch, load_classifier_parts, LORA_ALPHA, LORA_R,
                                          LORA_TARGETS, memory_split, METHODS, N_VIRTUAL, train_method)


def settings(profile: Any, quick: bool = False) -> dict[str, Any]:
    """Data and training sizes shared by the notebook's live run and the recorded experiment."""
    if quick:
        return dict(n_train=32, n_val=16, n_test=16, steps=2, batch_size=8, max_length=32)
    return profile.pick(
        ci=dict(n_train=64, n_val=24, n_test=24, steps=2, batch_size=8, max_length=32),
        cpu=dict(n_train=800, n_val=200, n_test=400, steps=50, batch_size=16, max_length=64),
        gpu=dict(n_train=8057, n_val=1007, n_test=1008, steps=1000, batch_size=32, max_length=64))


def task_data(sizes: dict[str, Any]) -> dict[str, Any]:
    """07's movie-review sentiment task: a fixed training subset, the first validation and test snippets."""
    from course_lib.tools.data import load_sentiment

    data = load_sentiment("movies")
    return dict(train=data["train"].shuffle(seed=0).select(range(sizes["n_train"])),
                validation=data["validation"].select(range(sizes["n_val"])),
                test=data["test"].select(range(sizes["n_test"])))


def run_method(method: str, encoder: nn.Module, tokenizer: Any, data: dict[str, Any], sizes: dict[str, Any], *,
               lr: float, seed: int = 0, splits: Sequence[str] = ("validation", "test"),
               progress: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Build, train and evaluate one method once; returns the trained model and its row."""
    model, on_step = build(method, encoder, seed=seed, total_steps=sizes["steps"])
    reference = encode_batch(tokenizer, data["train"]["text"][: sizes["batch_size"]], sizes["max_length"],
                       _device_of(model))
    memory = memory_split(model, reference)
    row = train_method(model, tokenizer, data["train"], lr=lr, steps=sizes["steps"], batch_size=sizes["batch_size"],
                       max_length=sizes["max_length"], seed=seed, on_step=on_step, progress=progress, desc=method)
    row |= dict(lr=lr, seed=seed, memory=memory, load_average_1min=run_load())
    for split in splits:
        evaluation = evaluate(model, tokenizer, data[split], max_length=sizes["max_length"])
        row[f"{split}_accuracy"] = evaluation["accuracy"]
        row[f"{split}_correct"] = (evaluation["predictions"] == torch.tensor(data[split]["label"])).int().tolist()
    return model, row


REFERENCE = "full fine-tuning"


def experiment(profile: Any, *, seeds: int = 3, quick: bool = False) -> dict[str, Any]:
    """Every method of :data:`METHODS` on 07's task: each learning rate tried with seed 0 and judged on the
    validation split, then the chosen one run with ``seeds - 1`` more seeds. Per method: test accuracy and
    which test snippets were right, per seed; and its comparison with full fine-tuning (:func:`versus_full`)."""
    from tqdm.auto import tqdm

    sizes = settings(profile, quick)
    tokenizer, encoder = load_classifier_parts(profile)
    data = task_data(sizes)
    methods = {k: (v[:1] if quick else v) for k, v in METHODS.items()}  # --quick: one learning rate each
    table: dict[str, Any] = {}
    for method, lrs in tqdm(methods.items(), desc="methods"):
        tried = {lr: run_method(method, encoder, tokenizer, data, sizes, lr=lr, seed=0)[1] for lr in lrs}
        best = max(lrs, key=lambda lr: (tried[lr]["validation_accuracy"], -lr))
        rows = [tried[best]] + [run_method(method, encoder, tokenizer, data, sizes, lr=best, seed=s,
                                           splits=("test",))[1] for s in range(1, seeds)]
        accuracies = [r["test_accuracy"] for r in rows]
        table[method] = dict(
            lr=best, validation_accuracy_by_lr={f"{lr:g}": tried[lr]["validation_accuracy"] for lr in lrs},
            test_accuracy_by_seed=accuracies, test_accuracy=float(np.mean(accuracies)),
            test_correct_by_seed=[r["test_correct"] for r in rows],
            trainable=rows[0]["trainable"], optimizer_bytes=rows[0]["optimizer_bytes"], memory=rows[0]["memory"],
            step_ms=float(np.median([r["step_ms"] for r in rows])))
    results = dict(settings=sizes, seeds=seeds, methods=table, reference=REFERENCE,
                   lora=dict(targets=list(LORA_TARGETS), r=LORA_R, alpha=LORA_ALPHA), adapter_m=ADAPTER_M,
                   n_virtual=N_VIRTUAL)
    for method, comparison in versus_full(results).items():
        table[method]["versus_full"] = asdict(comparison)
    return results


def versus_full(results: dict[str, Any]) -> dict[str, Comparison]:
    """Each method against full fine-tuning, from the per-seed test correctness of a record's ``results``:
    :func:`~course_lib.experiments.stats.compare` resamples the seeds and the test snippets together and gives
    the three-way verdict against its margin. Keyed by method, full fine-tuning itself left out."""
    methods = results["methods"]
    stale = [m for m, row in methods.items() if "test_correct_by_seed" not in row]
    if stale:
        raise ValueError("this peft_family record predates per-seed correctness (it has no test_correct_by_seed "
                         "for " + ", ".join(stale) + "): record it again with `python -m course_lib.experiments "
                         "peft_family`.")
    reference = results.get("reference", REFERENCE)
    right = {m: np.asarray(row["test_correct_by_seed"], dtype=float) for m, row in methods.items()}
    order = [m for m in METHODS if m in methods] + [m for m in methods if m not in METHODS]  # a record sorts its keys
    return {m: compare(right[m], right[reference], a=m, b=reference) for m in order if m != reference}
