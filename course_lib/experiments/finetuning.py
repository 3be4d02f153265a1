"""The recorded comparison of lesson 06: majority class, VADER, bag of words, a linear probe on frozen MiniLM
and full fine-tuning of MiniLM, on the same labelled examples, several seeds, learning rates chosen on
validation, paired intervals.

Explained in notebooks/06_finetuning.ipynb. ``python -m course_lib.experiments finetuning`` writes
data/results/finetuning_cpu.json.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from course_lib.experiments.cache import bits, log, RunCache, sizes_for, unbits, is_worker, json_ready
from course_lib.experiments.stats import pairwise_gaps
from course_lib.parts.classifier import (_device_of, classification_metrics, embed, evaluate, load_encoder,
                                         SentenceClassifier, train_classifier, TrainingRun)
from course_lib.tools.data import take


# Notebook 06 at each profile; "quick" is the seconds-long smoke form of the tests.
FINETUNING_SIZES: dict[str, dict[str, Any]] = {
    "quick": dict(n_label=32, n_val=16, n_test=24, n_ood=8, max_length=24, epochs=1, batch_size=16,
                  evals_per_epoch=1, patience=1, lrs=(1e-4, 3e-4)),
    "ci": dict(n_label=128, n_val=64, n_test=120, n_ood=60, max_length=40, epochs=1, batch_size=16,
               evals_per_epoch=2, patience=2, lrs=(1e-4,)),
    "cpu": dict(n_label=1500, n_val=500, n_test=None, n_ood=None, max_length=64, epochs=2, batch_size=16,
                evals_per_epoch=2, patience=2, lrs=(3e-5, 1e-4, 3e-4)),
    "gpu": dict(n_label=None, n_val=None, n_test=None, n_ood=None, max_length=128, epochs=3, batch_size=32,
                evals_per_epoch=2, patience=3, lrs=(2e-5, 5e-5, 1e-4)),
}


def finetuning_sizes(profile: Any, quick: bool = False) -> dict[str, Any]:
    """The sizes notebook 06 and the ``finetuning`` experiment use on ``profile`` (a Profile or its name)."""
    return sizes_for(FINETUNING_SIZES, profile, quick)


def _vader(texts: Sequence[str]) -> np.ndarray:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return np.array([analyzer.polarity_scores(t)["compound"] for t in texts])


def vader_threshold(scores_val: np.ndarray, y_val: np.ndarray) -> float:
    """The threshold t on VADER's compound score (positive if >= t) with the best validation accuracy,
    from -0.9 to 0.9 in steps of 0.05 (the first of equally good ones)."""
    thresholds = np.round(np.arange(-0.9, 0.91, 0.05), 2)
    return float(thresholds[int(np.argmax([((scores_val >= t) == y_val).mean() for t in thresholds]))])


BOW_CS = (0.3, 1, 3, 10, 30)


PROBE_CS = (0.1, 0.3, 1, 3, 10)


def fit_bag_of_words(train_texts: Sequence[str], y_train: Any, val_texts: Sequence[str], y_val: Any):
    """TF-IDF of words and word pairs + logistic regression, C chosen on validation.

    Returns ``(vectorizer, model, C)``; notebook 06 section 3.3 explains it.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    x_train, x_val = vectorizer.fit_transform(list(train_texts)), vectorizer.transform(list(val_texts))
    fits = {c: LogisticRegression(C=c, max_iter=2000).fit(x_train, y_train) for c in BOW_CS}
    c = max(fits, key=lambda c: fits[c].score(x_val, y_val))
    return vectorizer, fits[c], c


def fit_probe(e_train: Any, y_train: Any, e_val: Any, y_val: Any):
    """Logistic regression on frozen sentence embeddings, C chosen on validation: ``(model, C)``."""
    from sklearn.linear_model import LogisticRegression

    fits = {c: LogisticRegression(C=c, max_iter=3000).fit(e_train, y_train) for c in PROBE_CS}
    c = max(fits, key=lambda c: fits[c].score(e_val, y_val))
    return fits[c], c


def finetune_once(encoder: nn.Module, tokenizer: Any, train_data: Any, val_data: Any, *, lr: float, seed: int,
                  sizes: Mapping[str, Any], progress: bool = False) -> tuple[nn.Module, TrainingRun]:
    """Full fine-tuning of a fresh copy of ``encoder`` as notebook 06 does it: ``(model, run)``.

    The copy, its head and its dropout are seeded with ``seed``; training is :func:`train_classifier`
    with the sizes of the profile (epochs, batch, early stopping twice per epoch).
    """
    import copy

    torch.manual_seed(seed)
    model = SentenceClassifier(copy.deepcopy(encoder), n_classes=2, pooling="mean", dropout=0.1)
    model.to(_device_of(encoder))
    steps_per_epoch = math.ceil(len(train_data) / sizes["batch_size"])
    run = train_classifier(model, tokenizer, train_data, val_data, epochs=sizes["epochs"], lr=lr,
                           batch_size=sizes["batch_size"], max_length=sizes["max_length"], weight_decay=0.01,
                           warmup_fraction=0.1, patience=sizes["patience"], seed=seed, progress=progress,
                           eval_every=max(1, steps_per_epoch // sizes["evals_per_epoch"]))
    return model, run


def _summarise(right: Mapping[str, list], predictions: Mapping[str, list], y_test: np.ndarray) -> dict:
    table = {}
    for name, rows in right.items():
        accuracy = [float(np.mean(r)) for r in rows]
        f1 = [classification_metrics(y_test, p)["f1"] for p in predictions[name]]
        macro = [classification_metrics(y_test, p)["macro_f1"] for p in predictions[name]]
        table[name] = dict(accuracy_mean=float(np.mean(accuracy)), accuracy_sd=float(np.std(accuracy, ddof=1))
                           if len(accuracy) > 1 else 0.0, accuracy_by_seed=accuracy,
                           f1_mean=float(np.mean(f1)), macro_f1_mean=float(np.mean(macro)))
    return table


def experiment(profile: Any, *, seeds: int = 3, quick: bool = False) -> dict[str, Any]:
    """The recorded run behind notebook 06: ``python -m course_lib.experiments finetuning``.

    For each seed s the labelled examples are ``take(train, n_label, seed=s)``, the same for the bag of
    words, the linear probe and full fine-tuning. VADER's threshold, the C of both logistic regressions
    and the fine-tuning learning rate are chosen on the validation split; the learning rate by a search
    over ``lrs`` on seed 0, after which the other seeds run at the chosen rate (seed 0's run at that
    rate is reused). Every pair of methods gets a paired bootstrap interval over test examples and
    seeds (:func:`pairwise_gaps`). Extra processes can share the fine-tuning runs (:func:`is_worker`).
    """
    from course_lib.tools.data import load_sentiment
    from course_lib.tools.profiles import code_version

    sizes = finetuning_sizes(profile, quick)
    name, profile_name = "finetuning", "quick" if quick else profile.name
    code_at_start = code_version()
    cache = RunCache(name, profile_name, sizes, enabled=not quick)
    movies = load_sentiment("movies")
    val, test = take(movies["validation"], sizes["n_val"]), take(movies["test"], sizes["n_test"])
    ood = {d: take(load_sentiment(d)["test"], sizes["n_ood"]) for d in ("tweets", "amazon")}
    y_val, y_test = np.array(val["label"]), np.array(test["label"])
    y_ood = {d: np.array(data["label"]) for d, data in ood.items()}
    tokenizer, encoder = load_encoder(profile)
    max_length = sizes["max_length"]

    def finetune_run(lr: float, seed: int) -> dict[str, Any]:
        pool = take(movies["train"], sizes["n_label"], seed=seed)
        model, run = finetune_once(encoder, tokenizer, pool, val, lr=lr, seed=seed, sizes=sizes)
        out = dict(val_accuracy=run.best_val_accuracy, best_step=run.best_step, steps=run.steps,
                   stopped_early=run.stopped_early, seconds=run.seconds,
                   examples_per_second=run.train_examples_per_second, history=run.history,
                   test_predictions=bits(evaluate(model, tokenizer, test, max_length=max_length)["predictions"]),
                   ood_accuracy={d: evaluate(model, tokenizer, data, max_length=max_length)["accuracy"]
                                 for d, data in ood.items()})
        log(name, f"fine-tuning lr={lr:g} seed {seed}: validation {out['val_accuracy']:.3f} "
                   f"(best step {run.best_step} of {run.steps}) in {run.seconds:.0f} s")
        return out

    # the fine-tuning runs first, so that worker processes can share them
    searched = cache.get_many([(dict(method="full", lr=lr, seed=0), lambda lr=lr: finetune_run(lr, 0))
                               for lr in sizes["lrs"]])
    search = dict(zip(sizes["lrs"], searched))
    chosen_lr = max(sizes["lrs"], key=lambda lr: search[lr]["val_accuracy"])  # the first of equal ones
    runs = [search[chosen_lr]] + cache.get_many([(dict(method="full", lr=chosen_lr, seed=s),
                                                  lambda s=s: finetune_run(chosen_lr, s)) for s in range(1, seeds)])
    if is_worker():
        log(name, "worker: no fine-tuning run left, exiting (the main process writes the record)")
        raise SystemExit(0)

    def embeddings(texts):
        return embed(encoder, tokenizer, list(texts), max_length=max_length).numpy()

    vader_val, vader_test = _vader(val["text"]), _vader(test["text"])
    vader_ood = {d: _vader(data["text"]) for d, data in ood.items()}
    t = vader_threshold(vader_val, y_val)
    e_val, e_test = embeddings(val["text"]), embeddings(test["text"])
    e_ood = {d: embeddings(data["text"]) for d, data in ood.items()}
    log(name, f"VADER threshold {t:+.2f}; embedded validation, test and out-of-domain snippets")

    methods = ["majority class", "VADER (compound ≥ 0)", "VADER (tuned threshold)", "bag of words + LR",
               "linear probe (frozen MiniLM)", "fine-tuned MiniLM"]
    predictions = {m: [] for m in methods}
    transfer = {m: {d: [] for d in ood} for m in methods[1:]}
    chosen_c = {"bag of words + LR": [], "linear probe (frozen MiniLM)": []}
    for seed in range(seeds):
        pool = take(movies["train"], sizes["n_label"], seed=seed)
        y_pool = np.array(pool["label"])
        predictions["majority class"].append(np.full(len(y_test), int(np.bincount(y_pool).argmax())))
        predictions["VADER (compound ≥ 0)"].append((vader_test >= 0).astype(int))
        predictions["VADER (tuned threshold)"].append((vader_test >= t).astype(int))
        vectorizer, bow, c = fit_bag_of_words(pool["text"], y_pool, val["text"], y_val)
        predictions["bag of words + LR"].append(bow.predict(vectorizer.transform(list(test["text"]))))
        chosen_c["bag of words + LR"].append(c)
        probe, c = fit_probe(embeddings(pool["text"]), y_pool, e_val, y_val)
        predictions["linear probe (frozen MiniLM)"].append(probe.predict(e_test))
        chosen_c["linear probe (frozen MiniLM)"].append(c)
        for d, data in ood.items():
            transfer["VADER (compound ≥ 0)"][d].append(float(((vader_ood[d] >= 0) == y_ood[d]).mean()))
            transfer["VADER (tuned threshold)"][d].append(float(((vader_ood[d] >= t) == y_ood[d]).mean()))
            transfer["bag of words + LR"][d].append(
                float((bow.predict(vectorizer.transform(list(data["text"]))) == y_ood[d]).mean()))
            transfer["linear probe (frozen MiniLM)"][d].append(float((probe.predict(e_ood[d]) == y_ood[d]).mean()))
        log(name, f"seed {seed}: baselines done (bag of words C={chosen_c['bag of words + LR'][-1]}, "
                   f"probe C={c})")
    for run in runs:
        predictions["fine-tuned MiniLM"].append(unbits(run["test_predictions"]).astype(int))
        for d in ood:
            transfer["fine-tuned MiniLM"][d].append(run["ood_accuracy"][d])

    right = {m: [np.asarray(p) == y_test for p in predictions[m]] for m in methods}
    table = _summarise(right, predictions, y_test)
    n_pool = len(take(movies["train"], sizes["n_label"]))
    for m in methods:
        table[m]["trained_on"] = 0 if m.startswith("VADER") else n_pool  # labelled examples it learned from
    table["fine-tuned MiniLM"]["seconds_mean"] = float(np.mean([r["seconds"] for r in runs]))
    return json_ready(dict(
        sizes=sizes, seeds=seeds, n_train_split=len(movies["train"]), n_val=len(val), n_test=len(test),
        n_ood={d: len(data) for d, data in ood.items()}, code_at_start=code_at_start,
        vader_threshold=t, chosen_c=chosen_c, chosen_lr=chosen_lr,
        search=[dict(lr=lr, val_accuracy=r["val_accuracy"], best_step=r["best_step"], steps=r["steps"],
                     stopped_early=r["stopped_early"], seconds=r["seconds"],
                     test_accuracy=float((unbits(r["test_predictions"]) == y_test).mean()))
                for lr, r in search.items()],
        runs=[{k: v for k, v in r.items() if k != "test_predictions"} | {"seed": s} for s, r in enumerate(runs)],
        table=table, gaps=pairwise_gaps({m: right[m] for m in methods}),
        run_commits=sorted({r.get("commit", "not recorded") for r in [*search.values(), *runs]}),
        transfer={m: {d: float(np.mean(v)) for d, v in by.items()} for m, by in transfer.items()},
        transfer_majority={d: float(max(y.mean(), 1 - y.mean())) for d, y in y_ood.items()},
        right={m: [bits(r) for r in right[m]] for m in methods},
    ))
