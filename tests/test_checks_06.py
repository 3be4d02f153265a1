"""The checks of 06_finetuning accept correct answers and name each common mistake."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from course_lib import checks
from course_lib.checks.finetuning import _binary_counts, _metric_cases
from course_lib.checks import CheckFailed, NotAttempted, ReferenceCalled, StudentCodeError


def refused(check, fn) -> str:
    with pytest.raises(CheckFailed) as info:
        check(fn)
    return str(info.value)


# ---- 06.2 check_mean_pooling -------------------------------------------------------------------


def pool_manual(hidden, mask):
    m = mask.unsqueeze(-1).float()
    return (hidden * m).sum(dim=1) / m.sum(dim=1)


def pool_loop(hidden, mask):
    rows = [hidden[b, mask[b].bool()].mean(dim=0) for b in range(hidden.shape[0])]
    return torch.stack(rows)


def pool_einsum(hidden, mask):
    m = mask.to(hidden.dtype)
    return torch.einsum("bth,bt->bh", hidden, m) / m.sum(dim=1, keepdim=True)


def pool_masked_fill_nanmean(hidden, mask):
    return hidden.masked_fill(mask.unsqueeze(-1) == 0, float("nan")).nanmean(dim=1)


def pool_library(hidden, mask):
    from course_lib.parts.classifier import mean_pool
    return mean_pool(hidden, mask)


def pool_sentence_transformers(hidden, mask):
    """sentence-transformers' own snippet: a float32 mask, promoted to float64 by float64 states."""
    m = mask.unsqueeze(-1).expand(hidden.size()).float()
    return torch.sum(hidden * m, 1) / torch.clamp(m.sum(1), min=1e-9)


def pool_bmm(hidden, mask):
    m = mask.type_as(hidden)
    return torch.bmm(m.unsqueeze(1), hidden).squeeze(1) / m.sum(-1, keepdim=True)


@pytest.mark.parametrize("fn", [pool_manual, pool_loop, pool_einsum, pool_masked_fill_nanmean,
                                pool_sentence_transformers, pool_bmm])
def test_mean_pooling_accepts(fn, capsys):
    checks.check_mean_pooling(fn)
    assert "✅ check_mean_pooling passed" in capsys.readouterr().out


def pool_in_place(hidden, mask):
    """Right on every case, but zeroes the padding of the caller's tensor."""
    hidden.mul_(mask.unsqueeze(-1))
    return hidden.sum(dim=1) / mask.sum(dim=1, keepdim=True)


def pool_preallocated_float32(hidden, mask):
    """A loop into a float32 buffer: right in float32, wrong dtype for float64 states."""
    out = torch.zeros(hidden.shape[0], hidden.shape[2])
    for b in range(hidden.shape[0]):
        out[b] = hidden[b, mask[b].bool()].mean(dim=0)
    return out


def pool_mask_in_place(hidden, mask):
    m = mask.unsqueeze_(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1)


def _masked_sum(hidden, mask):
    return (hidden * mask.unsqueeze(-1).float()).sum(dim=1)


@pytest.mark.parametrize("fn, sentence", [
    (lambda h, m: h.mean(dim=1), "you averaged over the padding tokens too"),
    (lambda h, m: _masked_sum(h, m) / h.shape[1], "instead of by the number of real tokens"),
    (lambda h, m: _masked_sum(h, m) / m.sum(), "in the whole batch"),
    (lambda h, m: _masked_sum(h, m), "did not divide by the number of real tokens"),
    (lambda h, m: h[:, 0], "first token ([CLS])"),
    (lambda h, m: h.masked_fill(m.unsqueeze(-1) == 0, -1e9).max(dim=1).values, "max pooling"),
    (lambda h, m: (h * m.unsqueeze(-1)).sum(-1) / m.sum(1, keepdim=True), "averaged over the hidden axis"),
    (lambda h, m: (h * m.unsqueeze(-1)).mean(0), "averaged over the batch axis"),
    (lambda h, m: _masked_sum(h, m).unsqueeze(1) / m.sum(1).view(-1, 1, 1), "keepdim=False"),
    (lambda h, m: pool_manual(h, m) + 0.01, "differs from the reference"),
    (lambda h, m: pool_manual(h, m).numpy(), "should be a torch.Tensor"),
    (pool_in_place, "changed its input hidden in place"),
    (pool_preallocated_float32, "convert the mask to hidden's dtype"),
    (pool_mask_in_place, "changed its input attention_mask in place"),
])
def test_mean_pooling_refuses(fn, sentence):
    assert sentence in refused(checks.check_mean_pooling, fn)


def test_mean_pooling_stub_and_crash():
    def stub(h, m):
        raise NotImplementedError("Exercise 06.2 is not done yet")

    with pytest.raises(NotAttempted, match="Exercise 06.2 is not done yet"):
        checks.check_mean_pooling(stub)
    with pytest.raises(StudentCodeError, match="raised RuntimeError"):
        checks.check_mean_pooling(lambda h, m: h @ m)


# ---- 06.1 check_precision_recall_f1 ------------------------------------------------------------


def metrics_counts(y_true, y_pred):
    tp = int(((y_pred == 1) & (y_true == 1)).sum())
    fp = int(((y_pred == 1) & (y_true == 0)).sum())
    fn = int(((y_pred == 0) & (y_true == 1)).sum())
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return dict(accuracy=(y_true == y_pred).float().mean(), precision=p, recall=r,
                f1=2 * p * r / (p + r) if p + r else 0.0)


def metrics_sklearn(y_true, y_pred):
    p, r, f, _ = precision_recall_fscore_support(y_true.numpy(), y_pred.numpy(), average="binary",
                                                 pos_label=1, zero_division=0)
    return dict(accuracy=accuracy_score(y_true.numpy(), y_pred.numpy()), precision=p, recall=r, f1=f)


def metrics_tensors(y_true, y_pred):
    tp = (y_pred * y_true).sum()
    precision = torch.nan_to_num(tp / y_pred.sum())
    recall = torch.nan_to_num(tp / y_true.sum())
    f1 = torch.nan_to_num(2 * tp / (y_pred.sum() + y_true.sum()))  # 2TP / (2TP + FP + FN)
    return {"accuracy": (y_pred == y_true).double().mean(), "precision": precision, "recall": recall, "f1": f1}


def metrics_library(y_true, y_pred):
    from course_lib.parts.classifier import classification_metrics
    return classification_metrics(y_true, y_pred)


def metrics_numpy(y_true, y_pred):
    """NumPy all the way: np.int64 counts, np.float64 and np.float32 numbers."""
    t, p = y_true.numpy(), y_pred.numpy()
    tp, fp, fn = np.sum((p == 1) & (t == 1)), np.sum((p == 1) & (t == 0)), np.sum((p == 0) & (t == 1))
    precision = tp / (tp + fp) if tp + fp > 0 else 0
    recall = tp / (tp + fn) if tp + fn > 0 else 0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0
    return {"accuracy": np.mean(t == p), "precision": np.float32(precision), "recall": recall, "f1": f1}


def metrics_confusion_matrix(y_true, y_pred):
    from sklearn.metrics import confusion_matrix

    tn, fp, fn, tp = confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return dict(accuracy=(tp + tn) / (tp + tn + fp + fn), precision=p, recall=r, f1=2 * p * r / (p + r) if p + r else 0.0)


@pytest.mark.parametrize("fn", [metrics_counts, metrics_sklearn, metrics_tensors, metrics_numpy,
                                metrics_confusion_matrix])
def test_precision_recall_f1_accepts(fn, capsys):
    checks.check_precision_recall_f1(fn)
    assert "✅ check_precision_recall_f1 passed" in capsys.readouterr().out


def _with(**changes):
    def fn(y_true, y_pred):
        right = metrics_counts(y_true, y_pred)
        negative = metrics_counts(1 - y_true, 1 - y_pred)
        values = {k: (v(right, negative, y_true, y_pred) if callable(v) else v) for k, v in changes.items()}
        return {**right, **values}
    return fn


@pytest.mark.parametrize("fn, sentence", [
    (_with(accuracy=lambda r, n, t, p: int((t == p).sum())), "did not divide by the number of examples"),
    (_with(accuracy=lambda r, n, t, p: 1 - r["accuracy"]), "error rate"),
    (_with(precision=lambda r, n, t, p: r["recall"], recall=lambda r, n, t, p: r["precision"]),
     "you swapped precision and recall: precision = TP / (TP + FP)"),
    (_with(recall=lambda r, n, t, p: r["precision"]), "you swapped precision and recall: recall = TP / (TP + FN)"),
    (lambda t, p: metrics_counts(1 - t, 1 - p), "negative class (label 0)"),
    (_with(f1=lambda r, n, t, p: r["accuracy"]), "micro-averaged F1"),
    (lambda t, p: {**metrics_sklearn(t, p), "f1": precision_recall_fscore_support(
        t.numpy(), p.numpy(), average="micro")[2]}, "micro-averaged F1"),
    (lambda t, p: {**metrics_sklearn(t, p), "f1": precision_recall_fscore_support(
        t.numpy(), p.numpy(), average="macro", zero_division=0)[2]}, "macro-F1"),
    (_with(f1=lambda r, n, t, p: n["f1"]), "negative class (label 0)"),
    (_with(f1=lambda r, n, t, p: (r["precision"] + r["recall"]) / 2), "harmonic mean"),
    (_with(f1=lambda r, n, t, p: r["precision"] * r["recall"] / (r["precision"] + r["recall"] + 1e-30)),
     "factor 2"),
    (_with(f1=lambda r, n, t, p: r["f1"] * 0.9), "differs from the reference"),
])
def test_precision_recall_f1_refuses(fn, sentence):
    assert sentence in refused(checks.check_precision_recall_f1, fn)


def test_precision_recall_f1_zero_division_and_shapes():
    def nan_precision(y_true, y_pred):
        tp = ((y_pred == 1) & (y_true == 1)).sum().double()
        p, r = tp / (y_pred == 1).sum(), tp / (y_true == 1).sum()
        return dict(accuracy=(y_true == y_pred).double().mean(), precision=p, recall=r, f1=2 * p * r / (p + r))

    assert "define the metric as 0" in refused(checks.check_precision_recall_f1, nan_precision)
    assert "lacks the key(s) 'f1'" in refused(
        checks.check_precision_recall_f1, lambda t, p: {k: v for k, v in metrics_counts(t, p).items() if k != "f1"})
    assert "should return a dict" in refused(
        checks.check_precision_recall_f1, lambda t, p: tuple(metrics_counts(t, p).values()))
    assert "should be one number" in refused(
        checks.check_precision_recall_f1, lambda t, p: {**metrics_counts(t, p), "f1": torch.zeros(2)})


def test_metric_cases_tell_the_mistakes_apart():
    """On the non-degenerate cases every diagnosed wrong value differs from the right one."""
    for case, (t, p) in list(_metric_cases().items())[:2]:
        right = _binary_counts(t, p, 1)
        negative = _binary_counts(t, p, 0)
        wrong_f1 = [right["accuracy"], (right["f1"] + negative["f1"]) / 2, negative["f1"],
                    (right["precision"] + right["recall"]) / 2]
        assert all(abs(w - right["f1"]) > 1e-3 for w in wrong_f1), case
        assert abs(right["precision"] - right["recall"]) > 1e-3, case
        assert abs(right["precision"] - negative["precision"]) > 1e-3, case


# ---- 06.3 check_paired_bootstrap ----------------------------------------------------------------


def bootstrap_vectorised(right_a, right_b, rng, resamples=2000):
    a, b = np.asarray(right_a, float), np.asarray(right_b, float)
    index = rng.integers(0, len(a), size=(resamples, len(a)))
    gaps = a[index].mean(axis=1) - b[index].mean(axis=1)
    low, high = np.percentile(gaps, [2.5, 97.5])
    return a.mean() - b.mean(), low, high


def bootstrap_loop(right_a, right_b, rng, resamples=2000):
    """A Python loop with rng.choice: consumes the generator differently, same statistics."""
    n, gaps = len(right_a), []
    for _ in range(resamples):
        i = rng.choice(n, size=n, replace=True)
        gaps.append(right_a[i].mean() - right_b[i].mean())
    return float(right_a.mean() - right_b.mean()), *np.quantile(gaps, [0.025, 0.975])


def bootstrap_differences(right_a, right_b, rng, resamples=2000):
    """Resample the per-example differences (the same thing, one array instead of two)."""
    d = right_a.astype(np.int8) - right_b.astype(np.int8)
    means = np.array([rng.choice(d, size=len(d)).mean() for _ in range(resamples)])
    return d.mean(), np.percentile(means, 2.5), np.percentile(means, 97.5)


def bootstrap_library(right_a, right_b, rng, resamples=2000):
    from course_lib.experiments.stats import paired_bootstrap_gap
    return paired_bootstrap_gap(right_a, right_b, rng=rng, resamples=resamples)


def bootstrap_scipy(right_a, right_b, rng, resamples=2000):
    """scipy's bootstrap, paired, percentile method: an independent implementation."""
    from scipy.stats import bootstrap

    a, b = right_a.astype(float), right_b.astype(float)
    result = bootstrap((a, b), lambda x, y, axis: x.mean(axis) - y.mean(axis), paired=True, vectorized=True,
                       n_resamples=resamples, method="percentile", random_state=rng)
    return a.mean() - b.mean(), result.confidence_interval.low, result.confidence_interval.high


def bootstrap_torch(right_a, right_b, rng, resamples=2000):
    """Returns 0-d torch tensors (torch.quantile) instead of floats."""
    a, b = torch.as_tensor(right_a, dtype=torch.float64), torch.as_tensor(right_b, dtype=torch.float64)
    gaps = (lambda i: a[i].mean(1) - b[i].mean(1))(torch.as_tensor(rng.integers(0, len(a), (resamples, len(a)))))
    low, high = torch.quantile(gaps, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return a.mean() - b.mean(), low, high


@pytest.mark.parametrize("fn", [bootstrap_vectorised, bootstrap_loop, bootstrap_differences, bootstrap_scipy,
                                bootstrap_torch])
def test_paired_bootstrap_accepts(fn, capsys):
    checks.check_paired_bootstrap(fn)
    assert "✅ check_paired_bootstrap passed" in capsys.readouterr().out


def bootstrap_unpaired(right_a, right_b, rng, resamples=2000):
    a, b, n = right_a.astype(float), right_b.astype(float), len(right_a)
    gaps = a[rng.integers(0, n, (resamples, n))].mean(1) - b[rng.integers(0, n, (resamples, n))].mean(1)
    return a.mean() - b.mean(), *np.percentile(gaps, [2.5, 97.5])


def bootstrap_normal_unpaired(right_a, right_b, rng, resamples=2000):
    pa, pb, n = right_a.mean(), right_b.mean(), len(right_a)
    half = 1.96 * np.sqrt(pa * (1 - pa) / n + pb * (1 - pb) / n)
    return pa - pb, pa - pb - half, pa - pb + half


def bootstrap_90(right_a, right_b, rng, resamples=2000):
    a, b = right_a.astype(float), right_b.astype(float)
    index = rng.integers(0, len(a), size=(resamples, len(a)))
    gaps = a[index].mean(1) - b[index].mean(1)
    return a.mean() - b.mean(), *np.percentile(gaps, [5, 95])


def bootstrap_fraction_percentiles(right_a, right_b, rng, resamples=2000):
    a, b = right_a.astype(float), right_b.astype(float)
    index = rng.integers(0, len(a), size=(resamples, len(a)))
    gaps = a[index].mean(1) - b[index].mean(1)
    return a.mean() - b.mean(), *np.percentile(gaps, [0.025, 0.975])


def bootstrap_without_replacement(right_a, right_b, rng, resamples=2000):
    a, b = right_a.astype(float), right_b.astype(float)
    gaps = [a[i].mean() - b[i].mean() for i in (rng.permutation(len(a)) for _ in range(resamples))]
    return a.mean() - b.mean(), *np.percentile(gaps, [2.5, 97.5])


def bootstrap_reversed(right_a, right_b, rng, resamples=2000):
    gap, low, high = bootstrap_vectorised(right_b, right_a, rng, resamples)
    return gap, low, high


def bootstrap_percent(right_a, right_b, rng, resamples=2000):
    return tuple(100 * v for v in bootstrap_vectorised(right_a, right_b, rng, resamples))


def bootstrap_gap_of_resample_mean(right_a, right_b, rng, resamples=2000):
    """Reports the mean of the resampled gaps as the gap: close, but not the measured gap."""
    a, b = right_a.astype(float), right_b.astype(float)
    index = rng.integers(0, len(a), size=(resamples, len(a)))
    gaps = a[index].mean(1) - b[index].mean(1)
    return gaps.mean(), *np.percentile(gaps, [2.5, 97.5])


def bootstrap_in_place(right_a, right_b, rng, resamples=2000):
    right_a.sort()  # "tidies" the caller's array
    return bootstrap_vectorised(right_a, right_b, rng, resamples)


def bootstrap_low_high_only(right_a, right_b, rng, resamples=2000):
    return bootstrap_vectorised(right_a, right_b, rng, resamples)[1:]


@pytest.mark.parametrize("fn, sentence", [
    (bootstrap_unpaired, "as wide as one for two independent samples"),
    (bootstrap_normal_unpaired, "as wide as one for two independent samples"),
    (bootstrap_90, "covers 90%, not 95%"),
    (bootstrap_fraction_percentiles, "np.percentile takes percents"),
    (bootstrap_without_replacement, "draw the indices with replacement"),
    (bootstrap_reversed, "wrong sign"),
    (bootstrap_percent, "in percentage points"),
    (bootstrap_gap_of_resample_mean, "measured once on the real test set"),
    (bootstrap_in_place, "changed right_a or right_b in place"),
    (bootstrap_low_high_only, "should return three numbers"),
])
def test_paired_bootstrap_refuses(fn, sentence):
    assert sentence in refused(checks.check_paired_bootstrap, fn)


def test_paired_bootstrap_stub():
    def stub(a, b, rng, resamples=2000):
        raise NotImplementedError("Exercise 06.3 is not done yet")

    with pytest.raises(NotAttempted, match="Exercise 06.3 is not done yet"):
        checks.check_paired_bootstrap(stub)


def test_hints_have_three_levels_and_match_their_exercise(capsys):
    for exercise in ("06.1", "06.2", "06.3"):
        assert len(checks.HINTS[exercise]) == 3, exercise
    assert "true positives" in checks.HINTS["06.1"][0]      # 06.1 is the metrics exercise ...
    assert "padding" in checks.HINTS["06.2"][0]             # ... 06.2 the pooling one
    assert "same" in checks.HINTS["06.3"][0]
    for exercise in ("06.1", "06.2", "06.3"):             # the idea never hands out the key line
        assert checks.HINTS[exercise][2] not in checks.HINTS[exercise][0]


# --------------------------------------------- answers that call the course's reference are refused

from course_lib.experiments import stats  # noqa: E402
from course_lib.parts.classifier import classification_metrics as report  # noqa: E402 -- bound under another name
from course_lib.parts.classifier import mean_pool as pool  # noqa: E402
from course_lib.experiments.stats import paired_bootstrap_gap as interval  # noqa: E402

REFERENCE_CALLS = {
    "06.1 directly": (checks.check_precision_recall_f1, metrics_library, "course_lib.parts.classifier.classification_metrics"),
    "06.1 under another name": (checks.check_precision_recall_f1, lambda y_true, y_pred: report(y_true, y_pred),
                                "course_lib.parts.classifier.classification_metrics"),
    "06.2 directly": (checks.check_mean_pooling, pool_library, "course_lib.parts.classifier.mean_pool"),
    "06.2 under another name": (checks.check_mean_pooling, lambda hidden, mask: pool(hidden, mask),
                                "course_lib.parts.classifier.mean_pool"),
    "06.3 directly": (checks.check_paired_bootstrap, bootstrap_library, "course_lib.experiments.stats.paired_bootstrap_gap"),
    "06.3 under another name": (checks.check_paired_bootstrap, lambda a, b, rng, resamples=2000: interval(
        a, b, rng=rng, resamples=resamples), "course_lib.experiments.stats.paired_bootstrap_gap"),
    "06.3 the seeds variant": (checks.check_paired_bootstrap, lambda a, b, rng, resamples=2000: stats.paired_bootstrap_gap_seeds(
        a, b, rng=rng, resamples=resamples), "course_lib.experiments.stats.paired_bootstrap_gap_seeds"),
    "06.3 through compare": (checks.check_paired_bootstrap, lambda a, b, rng, resamples=2000: (lambda c: (
        c.gap / 100, c.low / 100, c.high / 100))(stats.compare(a, b, resamples=resamples)),
        "course_lib.experiments.stats.compare"),
}


@pytest.mark.parametrize("name", REFERENCE_CALLS)
def test_an_answer_that_calls_the_reference_is_refused(name):
    check, fn, called = REFERENCE_CALLS[name]
    with pytest.raises(ReferenceCalled) as info:
        check(fn)
    message = str(info.value)
    assert message.startswith("your answer calls ") and f"`{called}`" in message and message.endswith("write it yourself.")
