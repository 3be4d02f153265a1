"""The checks of notebook 04 (training_a_language_model) accept correct answers and name each common mistake."""

import math

import pytest
import torch
import torch.nn.functional as F

from course_lib import checks
from course_lib.checks import CheckFailed, NotAttempted, StudentCodeError


def refused(check, fn, *phrases):
    with pytest.raises(CheckFailed) as info:
        check(fn)
    message = str(info.value)
    for phrase in phrases:
        assert phrase in message, message
    return message


def accepted(check, fn, capsys):
    check(fn)
    assert "passed" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- 04.1

def schedule_right(step, lr, warmup_steps, total_steps, min_lr):
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def schedule_library(step, lr, warmup_steps, total_steps, min_lr):
    from course_lib.train import lr_at

    return torch.tensor(lr_at(step, lr=lr, warmup_steps=warmup_steps, total_steps=total_steps, min_lr=min_lr))


def schedule_torch(step, lr, warmup_steps, total_steps, min_lr):
    """Lean on torch's own schedulers, replayed up to `step`."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(total_steps - 1 - warmup_steps, 1), min_lr)
    if warmup_steps:
        warm = torch.optim.lr_scheduler.LinearLR(opt, 1 / warmup_steps, 1.0, max(warmup_steps - 1, 1))
        sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cosine], [warmup_steps])
    else:
        sched = cosine
    for _ in range(min(step, total_steps - 1)):
        opt.step()
        sched.step()
    return opt.param_groups[0]["lr"] if step < total_steps else min_lr


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("fn", [schedule_right, schedule_library, schedule_torch])
def test_lr_schedule_accepts(fn, capsys):
    accepted(checks.check_lr_schedule, fn, capsys)


def _variant(warm=None, decay=None, after=True):
    def fn(step, lr, warmup_steps, total_steps, min_lr):
        if step < warmup_steps:
            return warm(step, lr, warmup_steps) if warm else lr * (step + 1) / warmup_steps
        if step >= total_steps and after:
            return min_lr
        p = (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps)
        return decay(p, lr, min_lr, step, warmup_steps, total_steps) if decay else \
            min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * p))
    return fn


def no_warmup(step, lr, warmup_steps, total_steps, min_lr):
    if step >= total_steps:
        return min_lr
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * step / (total_steps - 1)))


@pytest.mark.parametrize("fn, phrase", [
    (no_warmup, "no warm-up"),
    (_variant(warm=lambda s, lr, W: lr * s / W), "warm-up is off by one"),
    (_variant(decay=lambda p, lr, m, *_: 0.5 * lr * (1 + math.cos(math.pi * p))), "decays to 0"),
    (_variant(decay=lambda p, lr, m, s, W, S: m + 0.5 * (lr - m) * (1 + math.cos(math.pi * (s - W) / (S - W)))),
     "does not reach min_lr"),
    (_variant(decay=lambda p, lr, m, *_: m + 0.5 * (lr - m) * (1 + math.cos(180 * p))), "in degrees"),
    (_variant(decay=lambda p, lr, m, *_: m + 0.5 * (lr - m) * (1 + math.cos(p))), "missing π"),
    (_variant(decay=lambda p, lr, m, *_: lr - (lr - m) * p), "linear"),
    (_variant(after=False), "stay at min_lr"),
    (_variant(warm=lambda s, lr, W: lr * (s + 1) / (W + 1)), "first differs at step 0 (warm-up)"),
    (lambda step, **kw: "fast", "should return a number"),
])
def test_lr_schedule_refuses(fn, phrase):
    refused(checks.check_lr_schedule, fn, phrase)


# ---------------------------------------------------------------------------------------------- 04.2

def topk_right(logits, k):
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def topk_scatter(logits, k):
    values, index = torch.topk(logits, k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, index, values)


def topk_log_probs(logits, k):               # log-probabilities: a per-row shift, the same distribution
    return torch.log_softmax(topk_right(logits, k), dim=-1)


def topk_library(logits, k):
    from course_lib.model import top_k_filter

    return top_k_filter(logits, k)


@pytest.mark.parametrize("fn", [topk_right, topk_scatter, topk_log_probs, topk_library])
def test_top_k_accepts(fn, capsys):
    accepted(checks.check_top_k, fn, capsys)


def _keep(n_of_k):
    def fn(logits, k):
        n = n_of_k(k)
        if n <= 0:
            return torch.full_like(logits, float("-inf"))
        kth = torch.topk(logits, min(n, logits.shape[-1]), dim=-1).values[..., -1:]
        return logits.masked_fill(logits < kth, float("-inf"))
    return fn


def softmax_then_filter(logits, k):
    probs = torch.softmax(logits, dim=-1)
    return topk_right(probs, k)


def probs_with_zeros(logits, k):
    probs = torch.softmax(logits, dim=-1)
    kth = torch.topk(probs, k, dim=-1).values[..., -1:]
    return probs.masked_fill(probs < kth, 0.0)


def zero_not_inf(logits, k):
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, 0.0)


def global_topk(logits, k):
    kth = torch.topk(logits.flatten(), k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def first_row_threshold(logits, k):
    kth = torch.topk(logits.reshape(-1, logits.shape[-1])[0], k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def no_keepdim(logits, k):
    kth = torch.topk(logits, k, dim=-1).values[..., -1]
    return logits.masked_fill(logits < kth, float("-inf"))


def smallest_k(logits, k):
    kth = torch.topk(logits, k, dim=-1, largest=False).values[..., -1:]
    return logits.masked_fill(logits > kth, float("-inf"))


def only_values(logits, k):
    return torch.topk(logits, k, dim=-1).values


@pytest.mark.parametrize("fn, phrase", [
    (_keep(lambda k: k - 1), "keeps k - 1"),
    (_keep(lambda k: k + 1), "keeps k + 1"),
    (softmax_then_filter, "applied softmax before filtering"),
    (probs_with_zeros, "applied softmax before filtering"),
    (zero_not_inf, "sets the dropped logits to 0"),
    (global_topk, "of the whole tensor"),
    (first_row_threshold, "first row's threshold"),
    (no_keepdim, "handle the batch axes"),
    (smallest_k, "not the largest ones"),
    (only_values, "should keep the shape"),
    (lambda logits, k: logits, "drops nothing"),
    (lambda logits, k: topk_right(logits, k) * 2, "changes their values"),
])
def test_top_k_refuses(fn, phrase):
    refused(checks.check_top_k, fn, phrase)


def test_hints_exist(capsys):
    for exercise in ("04.1", "04.2"):
        checks.hint(exercise)
    assert capsys.readouterr().out.count("for exercise") == 2
