"""The checks of 06_finetuning accept correct answers and name each common mistake."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from course_lib import checks
from course_lib.checks.finetuning import _binary_counts, _metric_cases
from course_lib.checks import CheckFailed, NotAttempted, StudentCodeError


def refused(check, fn) -> str:
    with pytest.raises(CheckFailed) as info:
        check(fn)
    return str(info.value)


# ---- 06.1 check_mean_pooling -------------------------------------------------------------------


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
    from course_lib.finetune import mean_pool
    return mean_pool(hidden, mask)


@pytest.mark.parametrize("fn", [pool_manual, pool_loop, pool_einsum, pool_masked_fill_nanmean, pool_library])
def test_mean_pooling_accepts(fn, capsys):
    checks.check_mean_pooling(fn)
    assert "✅ check_mean_pooling passed" in capsys.readouterr().out


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
])
def test_mean_pooling_refuses(fn, sentence):
    assert sentence in refused(checks.check_mean_pooling, fn)


def test_mean_pooling_stub_and_crash():
    def stub(h, m):
        raise NotImplementedError("Exercise 06.1 is not done yet")

    with pytest.raises(NotAttempted, match="Exercise 06.1 is not done yet"):
        checks.check_mean_pooling(stub)
    with pytest.raises(StudentCodeError, match="raised RuntimeError"):
        checks.check_mean_pooling(lambda h, m: h @ m)


# ---- 06.2 check_precision_recall_f1 ------------------------------------------------------------


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
    from course_lib.finetune import classification_metrics
    return classification_metrics(y_true, y_pred)


@pytest.mark.parametrize("fn", [metrics_counts, metrics_sklearn, metrics_tensors, metrics_library])
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


def test_hints_registered():
    assert "06.1" in checks.HINTS and "06.2" in checks.HINTS
