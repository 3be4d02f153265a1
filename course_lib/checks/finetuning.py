"""Checks of notebooks/06_finetuning.ipynb (exercises 06.*), with their hints."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from course_lib.checks.framework import (
    exercise, register_hint, fail, call_student, require_tensor, compare, passed,
)


# ----------------------------------------------------------------------------------------------
# ---- 06_finetuning: mean pooling with the attention mask; precision, recall and F1
# ----------------------------------------------------------------------------------------------

register_hint("06.1",
              "Everything follows from three counts for the positive class: true positives, false positives "
              "and false negatives. Precision asks how many of the positive calls were right, recall how many "
              "of the true positives were found.",
              "Count TP, FP and FN with boolean masks such as (y_pred == 1) & (y_true == 0), summed; then "
              "precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2PR / (P + R), each 0 when its "
              "denominator is 0; accuracy is the mean of (y_true == y_pred).",
              "tp = ((y_pred == 1) & (y_true == 1)).sum().item()")
register_hint("06.2",
              "The padding positions have hidden states too, and they are not zero: multiply them away with "
              "the mask before summing, and divide each sentence by its own number of real tokens.",
              "Turn the mask into floats of shape (B, T, 1), multiply it into hidden, sum over the token axis "
              "(dim=1), and divide by mask.sum(dim=1) (shape (B, 1)), not by T.",
              "m = attention_mask.unsqueeze(-1).to(hidden.dtype); return (hidden * m).sum(dim=1) / m.sum(dim=1)")
register_hint("06.3",
              "A paired bootstrap resamples the test examples, and each resample must be the *same* examples "
              "for both methods: that is what makes it paired, and narrow.",
              "Draw `resamples` rows of n indices with replacement (rng.integers(0, n, size=(resamples, n))), "
              "index both right_a and right_b with them, take each row's mean accuracy gap, and read the 2.5th "
              "and 97.5th percentiles of those gaps; the gap itself is right_a.mean() - right_b.mean().",
              "gaps = a[index].mean(axis=1) - b[index].mean(axis=1); low, high = np.percentile(gaps, [2.5, 97.5])")


def _pooling_cases() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """B, T, H all different, so a pooling over the wrong axis shows in the shape."""
    generator = torch.Generator().manual_seed(6)
    return {
        "2 sentences of 5 and 2 tokens (B=2, T=5, H=3)": (
            torch.randn(2, 5, 3, generator=generator), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])),
        "3 sentences all shorter than T (B=3, T=6, H=4)": (
            torch.randn(3, 6, 4, generator=generator),
            torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])),
        "4 sentences of one length, no padding (B=4, T=3, H=7)": (
            torch.randn(4, 3, 7, generator=generator), torch.ones(4, 3, dtype=torch.long)),
        "float64 states, 2 sentences of 4 and 1 tokens (B=2, T=4, H=5)": (
            1e3 * torch.randn(2, 4, 5, generator=generator, dtype=torch.float64),
            torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])),
    }


@exercise("06.2", points=1, forbid=("course_lib.parts.classifier:mean_pool",))
def check_mean_pooling(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """``fn(hidden, attention_mask)`` averages hidden (B, T, H) over the real tokens -> (B, H)."""
    __tracebackhide__ = True
    cases = _pooling_cases()
    for case, (hidden, mask) in cases.items():
        B, T, H = hidden.shape
        given_hidden, given_mask = hidden.clone(), mask.clone()
        result = require_tensor(call_student(fn, given_hidden, given_mask, case=case), "your pooled embedding")
        if not (torch.equal(given_hidden, hidden) and torch.equal(given_mask, mask)):
            changed = "hidden" if not torch.equal(given_hidden, hidden) else "attention_mask"
            fail(f"your function changed its input {changed} in place on {case} (an in-place op such as "
                 f"mul_ or masked_fill_): the caller still needs it; compute on a new tensor instead.")
        if result.dtype != hidden.dtype:
            fail(f"your pooled embedding is {result.dtype} on {case} but hidden is {hidden.dtype}: convert the "
                 f"mask to hidden's dtype (mask.to(hidden.dtype)), not to a fixed one such as float32.")
        if tuple(result.shape) == (B, T):
            fail(f"your pooled embedding has shape {(B, T)} on {case}: you averaged over the hidden axis; "
                 f"average over the token axis (dim=1) to get one vector of size H per sentence.")
        if tuple(result.shape) == (T, H):
            fail(f"your pooled embedding has shape {(T, H)} on {case}: you averaged over the batch axis; "
                 f"average over the token axis (dim=1), separately for each sentence.")
        if tuple(result.shape) == (B, 1, H):
            fail(f"your pooled embedding has shape {(B, 1, H)} on {case}: drop the token axis "
                 f"(keepdim=False, or .squeeze(1)) so that the result is (B, H).")
        m = mask.to(hidden.dtype).unsqueeze(-1)
        masked_sum = (hidden * m).sum(dim=1)
        expected = masked_sum / m.sum(dim=1)
        compare(result, expected, what="your pooled embedding", case=case, wrong_answers={
            "you averaged over the padding tokens too; multiply by the mask before summing and divide by "
            "the number of real tokens": lambda: hidden.mean(dim=1),
            "you divided the masked sum by the padded length T instead of by the number of real tokens "
            "(mask.sum(dim=1))": lambda: masked_sum / T,
            "you divided by the number of real tokens in the whole batch; divide each sentence by its own "
            "count, mask.sum(dim=1)": lambda: masked_sum / m.sum(),
            "you summed the token states but did not divide by the number of real tokens":
                lambda: masked_sum,
            "you took the first token ([CLS]) instead of the mean over the tokens": lambda: hidden[:, 0],
            "you took the maximum over the tokens (max pooling) instead of the mean":
                lambda: hidden.masked_fill(m == 0, float("-inf")).amax(dim=1),
        })
    passed("check_mean_pooling", f"your pooling averages over the real tokens only, on {len(cases)} batches "
                                 f"(with and without padding).")


METRIC_KEYS = ("accuracy", "precision", "recall", "f1")


def _binary_counts(y_true: torch.Tensor, y_pred: torch.Tensor, positive: int) -> dict[str, float]:
    """Accuracy and precision / recall / F1 of class ``positive``, from the counts (0 when undefined)."""
    tp = ((y_pred == positive) & (y_true == positive)).sum().item()
    fp = ((y_pred == positive) & (y_true != positive)).sum().item()
    fn = ((y_pred != positive) & (y_true == positive)).sum().item()
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return dict(accuracy=(y_true == y_pred).double().mean().item(), precision=precision, recall=recall, f1=f1)


def _metric_cases() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(6)
    y_true = (torch.rand(40, generator=generator) < 0.3).long()
    flip = torch.rand(40, generator=generator) < 0.25
    return {
        "a hand-made example of 10 (TP 3, FN 1, FP 2, TN 4)": (
            torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 0, 0]), torch.tensor([1, 1, 1, 0, 1, 1, 0, 0, 0, 0])),
        "40 imbalanced examples (30% positive)": (y_true, torch.where(flip, 1 - y_true, y_true)),
        "a perfect prediction": (torch.tensor([0, 1, 1, 0, 1]), torch.tensor([0, 1, 1, 0, 1])),
        "a classifier that never predicts positive": (
            torch.tensor([1, 0, 1, 0, 0, 0]), torch.zeros(6, dtype=torch.long)),
    }


def _as_number(value: Any, what: str, case: str) -> torch.Tensor:
    __tracebackhide__ = True
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            fail(f"{what} should be one number on {case}, but it is a tensor of shape {tuple(value.shape)}.")
        return value.detach().double().reshape(())
    try:
        return torch.tensor(float(value), dtype=torch.float64)
    except (TypeError, ValueError):
        fail(f"{what} should be a number on {case}, but it is a {type(value).__name__}.")


@exercise("06.1", points=1, forbid=("course_lib.parts.classifier:classification_metrics",))
def check_precision_recall_f1(fn: Callable[[torch.Tensor, torch.Tensor], Mapping[str, Any]]) -> None:
    """``fn(y_true, y_pred)`` returns accuracy, precision, recall and F1 of the positive class (label 1)."""
    __tracebackhide__ = True
    cases = _metric_cases()
    for case, (y_true, y_pred) in cases.items():
        result = call_student(fn, y_true.clone(), y_pred.clone(), case=case)
        if not isinstance(result, Mapping):
            fail(f"your function should return a dict with the keys {', '.join(METRIC_KEYS)}, but it returns "
                 f"a {type(result).__name__}.")
        missing = [key for key in METRIC_KEYS if key not in result]
        if missing:
            fail(f"the dict your function returns lacks the key(s) {', '.join(map(repr, missing))}.")
        right = _binary_counts(y_true, y_pred, positive=1)
        negative = _binary_counts(y_true, y_pred, positive=0)
        p, r = right["precision"], right["recall"]
        n_correct = (y_true == y_pred).sum().item()
        wrong: dict[str, dict[str, Callable[[], Any]]] = {
            "accuracy": {
                "you counted the correct predictions but did not divide by the number of examples":
                    lambda: n_correct,
                "that is the error rate (1 - accuracy)": lambda: 1 - right["accuracy"],
            },
            "precision": {
                "you swapped precision and recall: precision = TP / (TP + FP), the share of predicted "
                "positives that are truly positive": lambda: r,
                "you computed it for the negative class (label 0); the positive class is label 1":
                    lambda: negative["precision"],
            },
            "recall": {
                "you swapped precision and recall: recall = TP / (TP + FN), the share of true positives "
                "that were found": lambda: p,
                "you computed it for the negative class (label 0); the positive class is label 1":
                    lambda: negative["recall"],
            },
            "f1": {
                "that is the micro-averaged F1, which for one label per example always equals the accuracy; "
                "the binary F1 is the F1 of the positive class only": lambda: right["accuracy"],
                "you averaged the F1 of both classes (that is the macro-F1); the binary F1 is the F1 of the "
                "positive class only": lambda: (right["f1"] + negative["f1"]) / 2,
                "you computed it for the negative class (label 0); the positive class is label 1":
                    lambda: negative["f1"],
                "you took the arithmetic mean (P + R) / 2; F1 is the harmonic mean 2PR / (P + R)":
                    lambda: (p + r) / 2,
                "you left out the factor 2: F1 = 2PR / (P + R)": lambda: p * r / (p + r),
            },
        }
        for key in METRIC_KEYS:
            what = f"your {key}"
            value = _as_number(result[key], what, case)
            expected = torch.tensor(right[key], dtype=torch.float64)
            if torch.isnan(value) and (key != "accuracy"):
                fail(f"{what} is nan on {case}: when a denominator is 0 (e.g. nothing is predicted positive) "
                     f"define the metric as 0, as scikit-learn does.")
            compare(value, expected, what=what, case=case, atol=1e-6, wrong_answers={
                sentence: (lambda c=compute: torch.tensor(float(c()), dtype=torch.float64))
                for sentence, compute in wrong[key].items()})
    passed("check_precision_recall_f1", f"accuracy, precision, recall and F1 of the positive class match the "
                                        f"reference on {len(cases)} cases (including one with no positive "
                                        f"prediction).")


# ---- 06.3: a paired bootstrap interval for the accuracy gap of two methods ------------------------


def _bootstrap_cases() -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    rng = np.random.default_rng(6)
    n = 1500
    a = rng.random(n) < 0.8
    b = np.where(rng.random(n) < 0.1, ~a, a)  # B disagrees with A on about 10% of the examples
    same = rng.random(200) < 0.7
    c = rng.random(400) < 0.6
    d = np.where(rng.random(400) < 0.3, ~c, c) | (rng.random(400) < 0.2)  # B ahead of A
    return {
        "1,500 test examples on which B disagrees with A on about 10%": (a, b, 2000),
        "two methods that agree on all 200 examples": (same, same.copy(), 1000),
        "400 examples on which B is ahead of A": (c, d, 2000),
    }


_REFERENCE_INTERVALS: dict[tuple[bytes, bytes, bool, float], tuple[float, float]] = {}


def _reference_interval(a: np.ndarray, b: np.ndarray, *, paired: bool = True, level: float = 0.95,
                        resamples: int = 10000) -> tuple[float, float]:
    """Percentile interval of the bootstrapped gap, drawn in chunks (the check's own reference, kept)."""
    key = (np.packbits(a).tobytes(), np.packbits(b).tobytes(), paired, level)
    if key not in _REFERENCE_INTERVALS:
        _REFERENCE_INTERVALS[key] = _draw_interval(a, b, paired=paired, level=level, resamples=resamples)
    return _REFERENCE_INTERVALS[key]


def _draw_interval(a: np.ndarray, b: np.ndarray, *, paired: bool, level: float,
                   resamples: int) -> tuple[float, float]:
    rng = np.random.default_rng(12345)
    a, b, n, gaps = a.astype(float), b.astype(float), len(a), []
    for _ in range(resamples // 1000):
        index = rng.integers(0, n, size=(1000, n))
        other = index if paired else rng.integers(0, n, size=(1000, n))
        gaps.append(a[index].mean(axis=1) - b[other].mean(axis=1))
    low, high = np.percentile(np.concatenate(gaps), [50 * (1 - level), 100 - 50 * (1 - level)])
    return float(low), float(high)


def _three_numbers(result: Any, case: str) -> tuple[float, float, float]:
    __tracebackhide__ = True
    if isinstance(result, (str, bytes, Mapping)) or not hasattr(result, "__len__") or len(result) != 3:
        fail(f"your function should return three numbers (gap, low, high) on {case}, but it returns "
             f"{type(result).__name__}{' of length ' + str(len(result)) if hasattr(result, '__len__') else ''}.")
    try:
        return tuple(float(np.asarray(v).reshape(())) for v in result)  # type: ignore[return-value]
    except (TypeError, ValueError):
        fail(f"your function should return three numbers (gap, low, high) on {case}, but one of them is "
             f"not a single number.")


@exercise("06.3", points=2, forbid=(
    "course_lib.experiments.stats:paired_bootstrap_gap",
    "course_lib.experiments.stats:paired_bootstrap_gap_seeds",
    "course_lib.experiments.stats:compare",
))
def check_paired_bootstrap(fn: Callable[..., Any]) -> None:
    """``fn(right_a, right_b, rng, resamples=...)`` returns (gap, low, high): A's accuracy minus B's and a
    95% paired bootstrap interval, as fractions."""
    __tracebackhide__ = True
    cases = _bootstrap_cases()
    for case, (a, b, resamples) in cases.items():
        given_a, given_b = a.copy(), b.copy()
        result = call_student(fn, given_a, given_b, np.random.default_rng(0), resamples=resamples, case=case)
        if not (np.array_equal(given_a, a) and np.array_equal(given_b, b)):
            fail(f"your function changed right_a or right_b in place on {case}: the caller still needs them.")
        gap, low, high = _three_numbers(result, case)
        true_gap = float(a.mean() - b.mean())
        if abs(gap - 100 * true_gap) < 1e-6 and abs(true_gap) > 1e-9:
            fail(f"your gap is in percentage points on {case}; return fractions (0.06, not 6), as the "
                 f"accuracies themselves are.")
        if abs(gap + true_gap) < 1e-9 and abs(true_gap) > 1e-9:
            fail(f"your gap has the wrong sign on {case}: it is B's accuracy minus A's; return "
                 f"right_a.mean() - right_b.mean().")
        if abs(gap - true_gap) > 1e-9:
            fail(f"your gap is {gap:.4f} on {case}, but A's accuracy minus B's on the test examples as given "
                 f"is {true_gap:.4f}: the gap is measured once on the real test set, not on a resample.")
        if not low <= high:
            fail(f"your interval ({low:.4f}, {high:.4f}) has low > high on {case}: return (gap, low, high).")
        ref_low, ref_high = _reference_interval(a, b)
        width, ref_width = high - low, ref_high - ref_low
        # resampling noise: each end moves by ~1.5% of the width with 2,000 resamples; 7% is > 4 of those
        tolerance = max(0.07 * ref_width, 1.5 / len(a))
        width_ok = abs(width - ref_width) <= max(0.08 * ref_width, 1.5 / len(a))
        if abs(low - ref_low) <= tolerance and abs(high - ref_high) <= tolerance and width_ok:
            continue
        if ref_width > 0 and width < 0.02 * ref_width and abs(low - true_gap) < 1e-9:
            fail(f"your interval has width 0 on {case}: every resample held each example exactly once (a "
                 f"permutation, or sampling without replacement), so all gave the same gap; draw the "
                 f"indices with replacement.")
        if high < true_gap - tolerance or low > true_gap + tolerance:
            if high < true_gap:
                fail(f"your interval ({low:.4f}, {high:.4f}) lies below the gap {true_gap:.4f} on {case}: "
                     f"np.percentile takes percents (2.5 and 97.5), not fractions (0.025 and 0.975).")
            fail(f"your interval ({low:.4f}, {high:.4f}) does not contain the gap {true_gap:.4f} on {case}.")
        un_low, un_high = _reference_interval(a, b, paired=False)
        if width > ref_width + 3 * tolerance and abs(width - (un_high - un_low)) < 0.15 * (un_high - un_low):
            fail(f"your interval is as wide as one for two independent samples on {case}: resample the same "
                 f"test examples for A and B (one set of indices for both); pairing is what makes the "
                 f"interval narrow when the methods agree on most examples.")
        n90_low, n90_high = _reference_interval(a, b, level=0.90)
        if abs(width - (n90_high - n90_low)) <= 0.05 * ref_width:
            fail(f"your interval covers 90%, not 95%, on {case}: take the 2.5th and 97.5th percentiles of the "
                 f"resampled gaps.")
        fail(f"your interval ({low:.4f}, {high:.4f}) on {case} differs from the paired bootstrap's "
             f"({ref_low:.4f}, {ref_high:.4f}) by more than the resampling noise allows.")
    passed("check_paired_bootstrap", f"the gap and its 95% paired interval match the reference on {len(cases)} "
                                     f"cases (including two methods that always agree).")
