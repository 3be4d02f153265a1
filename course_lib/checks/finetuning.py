"""Checks of notebooks/06_finetuning.ipynb (exercises 06.*), with their hints."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from course_lib.checks.framework import (
    register_hint, fail, call_student, require_tensor, compare, passed,
)


# ----------------------------------------------------------------------------------------------
# ---- 06_finetuning: mean pooling with the attention mask; precision, recall and F1
# ----------------------------------------------------------------------------------------------

register_hint("06.1", "Turn the mask into floats of shape (B, T, 1), multiply it into hidden so padding "
                      "becomes 0, sum over the token axis (dim=1), and divide by mask.sum(dim=1), the "
                      "number of real tokens of each sentence (not by T).")
register_hint("06.2", "Count TP = ((y_pred == 1) & (y_true == 1)).sum(), likewise FP and FN; then precision "
                      "= TP / (TP + FP), recall = TP / (TP + FN), F1 = 2PR / (P + R), and use 0 wherever "
                      "a denominator is 0.")


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
    }


def check_mean_pooling(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """``fn(hidden, attention_mask)`` averages hidden (B, T, H) over the real tokens -> (B, H)."""
    __tracebackhide__ = True
    cases = _pooling_cases()
    for case, (hidden, mask) in cases.items():
        B, T, H = hidden.shape
        result = require_tensor(call_student(fn, hidden.clone(), mask.clone(), case=case), "your pooled embedding")
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
