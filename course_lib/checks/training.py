"""Checks of notebooks/04_training.ipynb (exercises 04.*), with their hints."""

from __future__ import annotations

from collections.abc import Callable

import torch

from course_lib.checks.framework import (
    StudentCodeError, register_hint, fail, call_student, require_tensor, close, passed,
)


# ----------------------------------------------------------------------------------------------
# ---- 04_training: the learning-rate schedule, top-k sampling
# ----------------------------------------------------------------------------------------------

register_hint("04.1", "Warm-up: step < warmup_steps gives lr * (step + 1) / warmup_steps. Then p = (step - "
                      "warmup_steps) / (total_steps - 1 - warmup_steps) runs from 0 to 1 and the rate is "
                      "min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * p)); after the end, min_lr.")
register_hint("04.2", "Per row, the k-th largest value is torch.topk(logits, k, dim=-1).values[..., -1:] "
                      "(keep the last axis so it broadcasts); set every logit below it to -inf with "
                      "logits.masked_fill(logits < kth, float('-inf')).")


def check_lr_schedule(fn: Callable[..., float]) -> None:
    """Exercise 04.1: ``fn(step, lr, warmup_steps, total_steps, min_lr)`` is linear warm-up then cosine
    decay, exactly as ``course_lib.train.lr_at``."""
    __tracebackhide__ = True
    import math

    from course_lib.train import lr_at

    configs = [(1.0, 10, 50, 0.1), (3e-4, 5, 40, 3e-5), (2.0, 0, 20, 0.5), (1.0, 4, 30, 0.0)]
    for lr, W, S, m in configs:
        case = f"lr={lr}, warmup_steps={W}, total_steps={S}, min_lr={m}"
        steps = list(range(S + 3))
        got = []
        for step in steps:
            value = call_student(fn, step, lr=lr, warmup_steps=W, total_steps=S, min_lr=m,
                                 case=f"step {step} with {case}")
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                fail(f"your schedule should return a number, but at step {step} with {case} it returned a "
                     f"{type(value).__name__}.")
            got.append(float(value))
        expected = [lr_at(s, lr=lr, warmup_steps=W, total_steps=S, min_lr=m) for s in steps]

        def agrees(values: list[float]) -> bool:
            return all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12 + 1e-9 * lr) for a, b in zip(got, values))

        if agrees(expected):
            continue

        def schedule(warm: Callable[[int], float], decay: Callable[[int], float]) -> list[float]:
            return [warm(s) if s < W else (m if s >= S else decay(s)) for s in steps]

        def warm_ok(s: int) -> float:
            return lr * (s + 1) / W

        def cosine(p: float, low: float = m, angle: float = math.pi) -> float:
            return low + 0.5 * (lr - low) * (1 + math.cos(angle * p))

        D = S - 1 - W
        p = lambda s: (s - W) / D if D > 0 else 1.0  # noqa: E731
        wrong = {
            "there is no warm-up: the first warmup_steps steps must rise linearly, lr * (step + 1) / "
            "warmup_steps": [cosine(s / (S - 1)) if s < S else m for s in steps],
            "the warm-up is off by one: step 0 must already get lr / warmup_steps (use step + 1), so that "
            "the last warm-up step reaches lr": schedule(lambda s: lr * s / W, lambda s: cosine(p(s))),
            "the cosine decays to 0 instead of min_lr": schedule(warm_ok, lambda s: cosine(p(s), low=0.0)),
            "the cosine does not reach min_lr at the last step: divide by total_steps - 1 - warmup_steps so "
            "that p = 1 at step total_steps - 1": schedule(warm_ok, lambda s: cosine((s - W) / (S - W))),
            "the cosine's argument is in degrees (cos(180 * p)); math.cos takes radians, so use "
            "math.pi * p": schedule(warm_ok, lambda s: cosine(p(s), angle=180.0)),
            "the cosine's argument is missing π: use math.cos(math.pi * p), which runs from 1 to -1":
                schedule(warm_ok, lambda s: cosine(p(s), angle=1.0)),
            "the decay is linear; it should follow half a cosine wave":
                schedule(warm_ok, lambda s: lr - (lr - m) * p(s)),
            "after total_steps the rate must stay at min_lr":
                [warm_ok(s) if s < W else cosine(p(s)) for s in steps],
        }
        for sentence, values in wrong.items():
            if agrees(values):
                fail(f"your schedule is wrong with {case}: {sentence}.")
        first = next(i for i, (a, b) in enumerate(zip(got, expected))
                     if not math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12 + 1e-9 * lr))
        phase = "warm-up" if first < W else ("cosine decay" if first < S else "after the end")
        fail(f"your schedule first differs at step {first} ({phase}) with {case}: it gives {got[first]:.6g}, "
             f"the reference {expected[first]:.6g}.")
    passed("check_lr_schedule", f"your schedule matches warm-up + cosine decay step by step for {len(configs)} "
                                f"settings (no warm-up and min_lr = 0 included).")


def check_top_k(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
    """Exercise 04.2: ``fn(logits, k)`` keeps the k largest logits of each row (last axis) and sets the
    others to -inf, for any number of leading batch axes."""
    __tracebackhide__ = True
    g = torch.Generator().manual_seed(0)
    cases = [
        ("a vector of 10 logits with k=3", torch.randn(10, generator=g), 3),
        ("a (4, 12) batch with k=5", 2 * torch.randn(4, 12, generator=g), 5),
        ("a (2, 3, 9) batch with k=2", torch.randn(2, 3, 9, generator=g) + torch.arange(3.0)[:, None] * 5, 2),
        ("a (3, 7) batch with k=1", torch.randn(3, 7, generator=g), 1),
        ("a (2, 6) batch with k=6 (keep everything)", torch.randn(2, 6, generator=g), 6),
    ]
    for case, z, k in cases:
        try:
            result = call_student(fn, z.clone(), k, case=case)
        except StudentCodeError as error:
            if z.dim() > 1:
                fail(f"{error} -- if it works on a single vector, handle the batch axes: take the k-th largest "
                     f"value of each row with keepdim (torch.topk(logits, k, dim=-1).values[..., -1:]) so "
                     f"that it broadcasts against its row.")
            raise
        result = require_tensor(result, "your top-k filter")
        kth = torch.topk(z, k, dim=-1).values[..., -1:]
        expected = z.masked_fill(z < kth, float("-inf"))
        if result.shape != z.shape:
            fail(f"your top-k filter returns shape {tuple(result.shape)} on {case}, but it should keep the "
                 f"shape {tuple(z.shape)}: return all the logits, with the dropped ones set to -inf "
                 f"(torch.topk alone returns only the k kept values).")
        result = result.detach().cpu()
        kept = torch.isfinite(result)
        want = torch.isfinite(expected)
        probs = torch.softmax(z.double(), dim=-1)
        if torch.equal(kept, want):
            # any per-row shift of the kept logits (e.g. log-probabilities) samples the same tokens
            if close(torch.softmax(result.double(), -1), torch.softmax(expected.double(), -1)):
                continue
            if close(result[kept], probs[kept]) or close(result[kept], (probs.masked_fill(~want, 0.0) / probs.masked_fill(
                    ~want, 0.0).sum(-1, keepdim=True))[kept]):
                fail(f"your top-k filter keeps the right tokens on {case} but returns their probabilities: "
                     f"you applied softmax before filtering; return the logits themselves (the sampler takes "
                     f"the softmax after filtering, and a softmax of probabilities is a much flatter "
                     f"distribution).")
            fail(f"your top-k filter keeps the right logits on {case} but changes their values; return them "
                 f"unchanged (only the dropped ones become -inf).")
        if bool(kept.all()):
            masked = probs.masked_fill(~want, 0.0)
            if close(result, masked) or close(result, masked / masked.sum(-1, keepdim=True)):
                fail(f"your top-k filter returns probabilities with zeros on {case}: you applied softmax "
                     f"before filtering; return the filtered logits, with the dropped ones at -inf (sampling "
                     f"takes the softmax afterwards).")
            if close(result, z.masked_fill(~want, 0.0)):
                fail(f"your top-k filter sets the dropped logits to 0 on {case}; exp(0) = 1 still gives them "
                     f"probability, set them to -inf.")
            fail(f"your top-k filter drops nothing on {case}: every logit is still finite; set all but the "
                 f"k largest of each row to -inf.")
        counts = kept.reshape(-1, z.shape[-1]).sum(-1)
        if kept.sum() == k and z.dim() > 1:
            fail(f"your top-k filter keeps {k} logits of the whole tensor on {case}; keep the k largest of "
                 f"every row (topk along dim=-1).")
        if z.dim() > 1:
            first_row_kth = kth.reshape(-1)[0]
            if torch.equal(kept, z >= first_row_kth):
                fail(f"your top-k filter uses the first row's threshold for every row on {case}; take the "
                     f"k-th largest value of each row (topk(...).values[..., -1:]).")
        if bool((counts == k - 1).all()):
            fail(f"your top-k filter keeps k - 1 = {k - 1} logits per row on {case}; the k-th largest value "
                 f"itself must be kept (drop only logits strictly below it).")
        if bool((counts == k + 1).all()):
            fail(f"your top-k filter keeps k + 1 = {k + 1} logits per row on {case}; the threshold is the "
                 f"k-th largest value, not the (k+1)-th.")
        if bool((counts == k).all()) and not torch.equal(kept, want):
            fail(f"your top-k filter keeps {k} logits per row on {case}, but not the largest ones; keep the "
                 f"k largest (topk along the last axis).")
        fail(f"your top-k filter keeps {counts.tolist()} logits per row on {case}, but it should keep k = {k} "
             f"per row.")
    passed("check_top_k", f"your filter keeps exactly the k largest logits of every row on {len(cases)} cases "
                          f"(1-D, 2-D and 3-D, k = 1 and k = vocabulary size).")
