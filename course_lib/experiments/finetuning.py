"""The recorded comparison of lesson 06: majority class, VADER, bag of words, a linear probe on frozen MiniLM
and full fine-tuning of MiniLM, on the same labelled examples, several seeds, learning rates chosen on
validation, and every pair of methods compared the course's one way (:func:`course_lib.experiments.stats.compare`).

Explained in notebooks/06_finetuning.ipynb. ``python -m course_lib.experiments finetuning`` writes
data/results/finetuning_cpu.json. A record keeps which test examples each method got right in each seed
(``right``, one bit string per seed; :func:`recorded_right` reads them back), so a notebook compares any two
methods with ``compare`` itself; ``comparisons`` holds what ``compare`` said for every pair when it was recorded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch import nn

from course_lib.experiments.cache import bits, log, RunCache, sizes_for, unbits, is_worker, json_ready
from course_lib.experiments.stats import compare, Comparison
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


def all_comparisons(right: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """:func:`compare` of every pair of methods in ``right`` (name -> (seeds, examples) booleans), in the
    order given, keyed ``"A − B"``; each value is the :class:`Comparison` as a dict (gap, interval, verdict)."""
    names = list(right)
    return {f"{a} − {b}": asdict(compare(right[a], right[b], a=a, b=b))
            for i, a in enumerate(names) for b in names[i + 1:]}


def recorded_right(bit_strings: Mapping[str, Sequence[str]]) -> dict[str, np.ndarray]:
    """A record's per-example correctness as arrays, what :func:`compare` takes: ``record["results"]["right"]``
    (method -> one bit string per seed) becomes method -> (seeds, examples) booleans."""
    if not isinstance(bit_strings, Mapping):
        raise TypeError(f"recorded_right takes a record's table of bit strings (method -> one string per seed), "
                        f"e.g. record['results']['right'], got a {type(bit_strings).__name__}.")
    return {method: np.stack([unbits(b) for b in rows]) for method, rows in bit_strings.items()}


def plot_comparisons(comparisons: Sequence[Comparison], *, ax: Any = None, title: str = "") -> Any:
    """Each comparison A − B as a row: its gap (dot) and 95% interval (bar), the band ±margin shaded, and the
    verdict in the bar's colour and at its right end. Returns the axes (the caller shows the figure)."""
    import matplotlib.pyplot as plt

    colours = {"ahead": "tab:green", "behind": "tab:red", "within": "tab:blue", "undecided": "tab:gray"}
    margin = comparisons[0].margin if comparisons else 1.0
    words = {"ahead": "A ahead", "behind": "B ahead", "within": f"within ±{margin:g}",
             "undecided": "not yet distinguishable"}
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 0.45 * len(comparisons) + 1.4))
    ax.axvspan(-margin, margin, color="tab:blue", alpha=0.12)
    ax.axvline(0, color="k", lw=0.8)
    for row, c in enumerate(comparisons):
        ax.plot([c.low, c.high], [row, row], color=colours[c.verdict], lw=3, solid_capstyle="butt")
        ax.plot(c.gap, row, "o", color="k", ms=4)
        ax.annotate(words[c.verdict], (c.high, row), xytext=(6, 0), textcoords="offset points", va="center",
                    fontsize=8, color=colours[c.verdict])
    ax.set_yticks(range(len(comparisons)), [f"{c.a} − {c.b}" for c in comparisons], fontsize=8)
    ax.set_ylim(len(comparisons) - 0.5, -0.5)
    ax.set_xlabel(f"accuracy gap A − B (points): dot = gap, bar = 95% interval, shaded = ±{margin:g}-point margin")
    ax.set_title(title or "Paired comparisons")
    ax.margins(x=0.25)
    return ax


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
    rate is reused). Every pair of methods is compared with :func:`compare` (test examples and seeds
    resampled together, a three-way verdict against the margin); which examples each method got right is
    kept per seed, on the movie test split (``right``) and out of domain (``right_ood``), so any other
    comparison can be made from the record. Extra processes can share the fine-tuning runs (:func:`is_worker`).
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
                   ood_predictions={d: bits(evaluate(model, tokenizer, data, max_length=max_length)["predictions"])
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
    ood_predictions = {d: {m: [] for m in methods[1:]} for d in ood}  # domain -> method -> one array per seed
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
            ood_predictions[d]["VADER (compound ≥ 0)"].append((vader_ood[d] >= 0).astype(int))
            ood_predictions[d]["VADER (tuned threshold)"].append((vader_ood[d] >= t).astype(int))
            ood_predictions[d]["bag of words + LR"].append(bow.predict(vectorizer.transform(list(data["text"]))))
            ood_predictions[d]["linear probe (frozen MiniLM)"].append(probe.predict(e_ood[d]))
        log(name, f"seed {seed}: baselines done (bag of words C={chosen_c['bag of words + LR'][-1]}, "
                   f"probe C={c})")
    for run in runs:
        predictions["fine-tuned MiniLM"].append(unbits(run["test_predictions"]).astype(int))
        for d in ood:
            ood_predictions[d]["fine-tuned MiniLM"].append(unbits(run["ood_predictions"][d]).astype(int))

    right = {m: [np.asarray(p) == y_test for p in predictions[m]] for m in methods}
    right_ood = {d: {m: [np.asarray(p) == y_ood[d] for p in by[m]] for m in by} for d, by in ood_predictions.items()}
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
        runs=[{k: v for k, v in r.items() if k not in ("test_predictions", "ood_predictions")} | {"seed": s}
              for s, r in enumerate(runs)],
        table=table, comparisons=all_comparisons({m: np.stack(right[m]) for m in methods}),
        run_commits=sorted({r.get("commit", "not recorded") for r in [*search.values(), *runs]}),
        transfer={m: {d: float(np.mean([r.mean() for r in right_ood[d][m]])) for d in ood} for m in methods[1:]},
        transfer_majority={d: float(max(y.mean(), 1 - y.mean())) for d, y in y_ood.items()},
        right={m: [bits(r) for r in right[m]] for m in methods},
        right_ood={d: {m: [bits(r) for r in rows] for m, rows in by.items()} for d, by in right_ood.items()},
    ))
