"""Checks of notebooks/01_attention.ipynb (exercises 01.*), with their hints."""

from __future__ import annotations

from collections.abc import Callable

import torch

from course_lib.checks.framework import (
    StudentCodeError, register_hint, fail, call_student, require_tensor, close, diagnose, compare, passed,
)


# ----------------------------------------------------------------------------------------------
# ---- 01_attention: stable softmax, the causal mask, scaled dot-product attention with a mask
# ----------------------------------------------------------------------------------------------

register_hint("01.1", "Subtract the maximum along `dim` first (z - z.amax(dim=dim, keepdim=True)), exponentiate, "
                      "then divide by the sum along the same `dim` with keepdim=True so that it broadcasts.")
register_hint("01.2", "Row i is query i and column j is key j; query i may see keys j <= i, which is the lower "
                      "triangle including the diagonal: torch.ones(T, T, dtype=torch.bool).tril().")
register_hint("01.3", "scores = q @ k.transpose(-2, -1) / math.sqrt(d_k); where the mask is False set the score to "
                      "-inf (scores.masked_fill(~mask, float('-inf'))); weights = softmax over the last axis (the "
                      "keys); out = weights @ v.")


def _softmax64(z: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.softmax(z.double(), dim=dim)


def check_softmax(fn: Callable[..., torch.Tensor]) -> None:
    """Exercise 01.1: ``fn(z, dim=-1)`` returns softmax(z) along ``dim``, stable for large logits."""
    __tracebackhide__ = True
    generator = torch.Generator().manual_seed(0)
    cases = [
        ("the vector [1, 2, 3]", torch.tensor([1.0, 2.0, 3.0]), -1),
        ("a (3, 5) batch of rows", torch.randn(3, 5, generator=generator), -1),
        ("a (2, 3, 4) tensor", 3 * torch.randn(2, 3, 4, generator=generator), -1),
        ("large logits [[1000, 999, 998], [-1000, -1001, -1002]]",
         torch.tensor([[1000.0, 999.0, 998.0], [-1000.0, -1001.0, -1002.0]]), -1),
        ("a (4, 3) tensor with dim=0", torch.randn(4, 3, generator=generator), 0),
    ]
    for case, z, dim in cases:
        result = require_tensor(call_student(fn, z.clone(), dim=dim, case=case), "your softmax")
        expected = _softmax64(z, dim).float()
        if result.shape != z.shape:
            fail(f"your softmax returns shape {tuple(result.shape)} on {case}, but it should keep the input's "
                 f"shape {tuple(z.shape)} (did you reduce without keepdim=True?).")
        if close(result, expected):
            continue
        if not torch.isfinite(result).all():
            fail(f"your softmax gives inf or nan on {case}: exp overflows (exp(1000) = inf) or underflows to "
                 f"0/0; subtract the maximum along `dim` (keepdim=True) before exponentiating, which does "
                 f"not change the result.")
        z64 = z.double()
        other_axes = [d for d in range(z.dim()) if d != dim % z.dim()]
        wrong: dict[str, Callable[[], torch.Tensor]] = {}
        for axis in other_axes:
            if dim == 0:
                wrong["you normalised over the last axis although dim=0 was asked: use the `dim` argument in "
                      "every reduction (amax and sum)"] = lambda axis=axis: _softmax64(z, axis)
            else:
                wrong[f"you normalised over axis {axis}; softmax must sum to 1 along dim={dim} (the last "
                      f"axis)"] = lambda axis=axis: _softmax64(z, axis)
        wrong.update({
            "you divided by the sum over all elements instead of the sum along `dim` (use "
            "sum(dim=dim, keepdim=True))": lambda: (z64 - z64.max()).exp() / (z64 - z64.max()).exp().sum(),
            "you divided by the sum over all elements instead of the sum along `dim` (subtract the max and "
            "sum along `dim` with keepdim=True)":
                lambda: (z64 - z64.amax(dim, True)).exp() / (z64 - z64.amax(dim, True)).exp().sum(),
            "you returned exp(z) without dividing by the sum": lambda: z64.exp(),
            "you returned exp(z - max) without dividing by the sum": lambda: (z64 - z64.amax(dim, True)).exp(),
            "you returned log-softmax (the log of the probabilities) instead of softmax":
                lambda: torch.log_softmax(z64, dim=dim),
        })
        reason = diagnose(result, wrong)
        if reason:
            fail(f"your softmax is wrong on {case}: {reason}.")
        sums = result.detach().double().sum(dim=dim)
        if not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
            fail(f"your softmax does not sum to 1 along dim={dim} on {case}.")
        compare(result, expected, what="your softmax", case=case)
    passed("check_softmax", f"your softmax matches torch.softmax on {len(cases)} cases, large logits included.")


def check_causal_mask(fn: Callable[[int], torch.Tensor]) -> None:
    """Exercise 01.2: ``fn(T)`` returns the (T, T) bool causal mask, True = may attend (lower triangle)."""
    __tracebackhide__ = True
    for T in (4, 7, 1):
        case = f"T={T}"
        result = require_tensor(call_student(fn, T, case=case), "your causal mask")
        expected = torch.ones(T, T, dtype=torch.bool).tril()
        if tuple(result.shape) != (T, T):
            fail(f"your causal mask has shape {tuple(result.shape)} for {case}, but it should be ({T}, {T}): "
                 f"one row per query, one column per key.")
        if result.dtype != torch.bool:
            right_pattern = torch.equal(result.detach().cpu() != 0, expected)
            additive = result.is_floating_point() and torch.equal(
                result.detach().cpu(), torch.zeros(T, T).masked_fill(~expected, float("-inf")))
            if additive:
                fail(f"your causal mask is an additive float mask (0 / -inf); this course's masks are bool "
                     f"with True = may attend: return the lower triangle as dtype torch.bool.")
            detail = "has the right pattern but" if right_pattern else "is not bool: it"
            fail(f"your causal mask {detail} has dtype {result.dtype}; attention expects a bool mask "
                 f"(True = may attend), so build it with dtype=torch.bool or call .bool().")
        result = result.detach().cpu()
        if torch.equal(result, expected):
            continue
        wrong = {
            "it is upper-triangular; row i is query i and column j is key j, and query i may attend to keys "
            "j <= i, which is the lower triangle (tril)": expected.T.clone(),
            "it excludes the diagonal; a position may attend to itself (use tril(), not tril(-1))":
                expected.tril(-1),
            "it is inverted; True must mean 'may attend', so the allowed keys j <= i must be True":
                ~expected,
            "it allows every key; query i must not see the later keys j > i": torch.ones(T, T, dtype=torch.bool),
        }
        for sentence, pattern in wrong.items():
            if torch.equal(result, pattern):
                fail(f"your causal mask is wrong for {case}: {sentence}.")
        fail(f"your causal mask differs from the causal mask at {int((result != expected).sum())} positions "
             f"for {case}; row i (query i) should be True exactly in columns j <= i.")
    passed("check_causal_mask", "your mask is the bool lower triangle (True = may attend) for T = 4, 7 and 1.")


def _masked_softmax64(scores: torch.Tensor, mask: torch.Tensor | None, dim: int = -1) -> torch.Tensor:
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=dim)


def _attention_wrong_weights(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             mask: torch.Tensor | None) -> dict[str, Callable[[], torch.Tensor]]:
    """What the common mistakes of exercise 01.3 give as weights on one case (float64)."""
    q64, k64 = q.double(), k.double()
    d_k, d_v = q.shape[-1], v.shape[-1]
    s = q64 @ k64.transpose(-2, -1)
    right = _masked_softmax64(s / d_k ** 0.5, mask)
    wrong: dict[str, Callable[[], torch.Tensor]] = {
        "they are transposed; weights[..., i, j] is how much query i attends to key j, shape (..., T_q, T_k)":
            lambda: right.transpose(-2, -1),
        "the scores are not scaled by 1/√d_k": lambda: _masked_softmax64(s, mask),
        "you divided the scores by d_k instead of √d_k": lambda: _masked_softmax64(s / d_k, mask),
        "you took the softmax over the queries (dim=-2); each row (one query) must sum to 1 over the keys, "
        "dim=-1": lambda: _masked_softmax64(s / d_k ** 0.5, mask, dim=-2),
    }
    if q.dim() > 2:
        wrong["you took the softmax over the first axis (dim=0); take it over the keys, dim=-1"] = \
            lambda: _masked_softmax64(s / d_k ** 0.5, mask, dim=0)
    if d_v != d_k:
        wrong["you scaled by 1/√d_v; the scale uses d_k, the size of the queries and keys"] = \
            lambda: _masked_softmax64(s / d_v ** 0.5, mask)
    if mask is not None:
        wrong.update({
            "the mask is ignored; where it is False the score must become -inf before the softmax":
                lambda: torch.softmax(s / d_k ** 0.5, dim=-1),
            "the mask is inverted; in this course True means 'may attend', so fill the scores where the mask "
            "is False (masked_fill(~mask, -inf))": lambda: _masked_softmax64(s / d_k ** 0.5, ~mask),
            "you zeroed the masked weights after the softmax without renormalising; set the masked scores to "
            "-inf before the softmax instead": lambda: torch.softmax(s / d_k ** 0.5, dim=-1) * mask,
            "you set the masked scores to 0, but exp(0) = 1 still gives those keys weight; set them to -inf":
                lambda: torch.softmax((s / d_k ** 0.5).masked_fill(~mask, 0.0), dim=-1),
        })
    return wrong


def check_attention(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Exercise 01.3: ``fn(q, k, v, mask=None)`` returns ``(out, weights)`` of softmax(QKᵀ/√d_k)V.

    The mask is bool, True = may attend, broadcastable to (..., T_q, T_k). No case has a fully masked
    row, so -inf and a large negative fill value are both accepted.
    """
    __tracebackhide__ = True
    g = torch.Generator().manual_seed(0)

    def r(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=g)

    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    key_lengths = torch.tensor([5, 3])
    padding = (torch.arange(6)[None, :] < key_lengths[:, None])[:, None, :]          # (2, 1, 6)
    cases = [  # (case, q, k, v, mask, tolerance)
        ("one (T_q=3, T_k=4) example with d_k=8, d_v=5", r(3, 8), r(4, 8), r(4, 5), None, 1e-5),
        ("a batch of 2 with 3 heads (T_q=5, T_k=6, d_k=16, d_v=4)",
         r(2, 3, 5, 16), r(2, 3, 6, 16), r(2, 3, 6, 4), None, 1e-5),
        ("a batch of 2 with a (5, 5) causal mask", r(2, 5, 8), r(2, 5, 8), r(2, 5, 3), causal, 1e-5),
        ("a batch of 2 with a (2, 1, 6) key-padding mask (key lengths 5 and 3, T_q=4)",
         r(2, 4, 8), r(2, 6, 8), r(2, 6, 2), padding, 1e-5),
        ("large logits (q and k scaled by 10)", r(2, 4, 8, scale=10.0), r(2, 6, 8, scale=10.0), r(2, 6, 3),
         None, 1e-4),
    ]
    for number, (case, q, k, v, mask, tol) in enumerate(cases):
        args = (q.clone(), k.clone(), v.clone()) + (() if mask is None else (mask.clone(),))
        try:
            result = call_student(fn, *args, case=case)
        except StudentCodeError as error:
            if number > 0 and q.dim() > 2:
                fail(f"{error} -- it works on a single (T, d) example but not with batch/head axes in front: "
                     f"transpose only the last two axes (k.transpose(-2, -1)) and softmax over dim=-1.")
            raise
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            fail(f"your attention should return a pair (out, weights), but on {case} it returned a "
                 f"{type(result).__name__}.")
        out, weights = result
        require_tensor(weights, "your weights")
        require_tensor(out, "your out")

        expected_w = _masked_softmax64(q.double() @ k.double().transpose(-2, -1) / q.shape[-1] ** 0.5, mask)
        expected_out = expected_w @ v.double()
        T_q, T_k = q.shape[-2], k.shape[-2]
        if weights.shape != expected_w.shape:
            if weights.shape[-2:] == (T_k, T_q) and T_q != T_k:
                fail(f"your weights have shape {tuple(weights.shape)} on {case}: they are transposed; "
                     f"weights[..., i, j] is how much query i attends to key j, shape (..., T_q, T_k).")
            if q.dim() > 2:
                fail(f"your weights have shape {tuple(weights.shape)} on {case}, but they should have shape "
                     f"{tuple(expected_w.shape)}: keep the batch/head axes in front and transpose only the "
                     f"last two axes of k.")
            fail(f"your weights have shape {tuple(weights.shape)} on {case}, but they should have shape "
                 f"{tuple(expected_w.shape)}, (..., T_q, T_k).")
        if not close(weights, expected_w, atol=tol, rtol=tol):
            reason = diagnose(weights, _attention_wrong_weights(q, k, v, mask), atol=tol, rtol=tol)
            if reason:
                fail(f"your weights are wrong on {case}: {reason}.")
            w = weights.detach().double().cpu()
            if mask is not None:
                allowed = mask.expand_as(w)
                if w[~allowed].abs().max() > 1e-4:
                    if w[~allowed].sum() > w[allowed].sum():
                        fail(f"your weights are wrong on {case}: the mask is inverted; in this course True "
                             f"means 'may attend', so fill the scores where the mask is False.")
                    fail(f"your weights are wrong on {case}: keys where the mask is False get nonzero weight; "
                         f"set their scores to -inf before the softmax.")
            if not torch.isfinite(w).all():
                fail(f"your weights contain inf or nan on {case}; the reference is finite there (is your "
                     f"softmax numerically stable? torch.softmax is).")
            sums = w.sum(-1)
            if not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
                fail(f"your weights do not sum to 1 over the keys (the last axis) on {case}.")
            worst = (w - expected_w).abs().max().item()
            fail(f"your weights differ from softmax(QKᵀ/√d_k) on {case} (largest difference {worst:.3g}).")
        compare(out, expected_out, what="your out", case=case, atol=tol, rtol=tol, wrong_answers={
            "it should be weights @ v, one weighted average of the values per query":
                lambda: expected_w.transpose(-2, -1) @ v.double(),
            "you multiplied the weights by k instead of v": lambda: expected_w @ k.double(),
        })
    passed("check_attention", f"out and weights match softmax(QKᵀ/√d_k)V on {len(cases)} cases "
                              f"(batch and head axes, causal and padding masks, large logits).")
