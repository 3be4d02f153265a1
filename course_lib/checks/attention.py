"""Checks of notebooks/01_attention.ipynb (exercises 01.*), with their hints."""

from __future__ import annotations

from collections.abc import Callable

import torch

from course_lib.checks.framework import (
    exercise, StudentCodeError, register_hint, fail, call_student, require_tensor, close, diagnose, compare, passed,
)


# ----------------------------------------------------------------------------------------------
# ---- 01_attention: stable softmax, the causal mask, attention with a mask, attention's backward pass
# ----------------------------------------------------------------------------------------------

register_hint(
    "01.1",
    "softmax(z) = softmax(z - c) for any constant c per row. Pick the c that makes every exponent <= 0, so "
    "nothing overflows and the largest term is exactly exp(0) = 1 (the sum is then at least 1).",
    "Along `dim`: subtract the row maximum (keepdim=True, so it broadcasts back), exponentiate, divide by the "
    "sum along the same `dim`, again with keepdim=True. Not the minimum, the mean or the first element: only "
    "the maximum keeps every exponent <= 0. Do not change z in place (no -=, no exp_()).",
    "e = (z - z.amax(dim=dim, keepdim=True)).exp(); return e / e.sum(dim=dim, keepdim=True)")
register_hint(
    "01.2",
    "Row i is query i, column j is key j. Query i may look at itself and at everything before it, never after.",
    "That is the lower triangle of a T x T matrix, diagonal included, as a bool tensor (True = may attend). "
    "torch.ones(...).tril() builds it; mind the dtype.",
    "return torch.ones(T, T, dtype=torch.bool).tril()")
register_hint(
    "01.3",
    "Three steps: scores (every query against every key, scaled), the mask (blocked keys must get weight "
    "exactly 0 and the rest must still sum to 1), and a weighted average of the values.",
    "scores = q @ k.transpose(-2, -1) / sqrt(d_k) (transpose only the last two axes so batch/head axes stay in "
    "front); where the mask is False put -inf into the scores *before* the softmax; softmax over the keys "
    "(dim=-1); out = weights @ v.",
    "scores = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~mask, float('-inf')) if mask is "
    "not None else q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]); weights = scores.softmax(-1); "
    "return weights @ v, weights")
register_hint(
    "01.4",
    "Walk the forward pass backwards, one matrix product at a time: for C = A B the gradients are "
    "dA = dC Bᵀ and dB = Aᵀ dC. The softmax in the middle needs its Jacobian diag(a) - a aᵀ, row by row.",
    "Recompute S = q kᵀ/√d_k and A = softmax(S) with the mask (masked scores -inf). Then dV = Aᵀ dO, "
    "dA = dO Vᵀ, dS = A ⊙ (dA - rowsum(dA ⊙ A)), dQ = dS K/√d_k, dK = dSᵀ Q/√d_k (transpose the last two "
    "axes only). Masked entries need nothing special: A = 0 there, so dS = 0 too.",
    "dS = A * (dA - (dA * A).sum(-1, keepdim=True)); return dS @ k / math.sqrt(d_k), "
    "dS.transpose(-2, -1) @ q / math.sqrt(d_k), A.transpose(-2, -1) @ d_out")


def _unchanged(given: dict[str, torch.Tensor], originals: dict[str, torch.Tensor], what: str, case: str) -> None:
    """Fail if the student's function changed one of its inputs in place."""
    __tracebackhide__ = True
    for name, tensor in given.items():
        if isinstance(tensor, torch.Tensor) and not torch.equal(tensor, originals[name]):
            fail(f"your {what} changed its input {name} in place on {case} (an in-place op such as -=, /= or "
                 f"exp_()); compute into a new tensor so the caller's {name} stays as it was.")


def _same_dtype(result: torch.Tensor, expected_dtype: torch.dtype, what: str, case: str) -> None:
    __tracebackhide__ = True
    if result.dtype != expected_dtype:
        fail(f"{what} has dtype {result.dtype} on {case}, but the input is {expected_dtype}; keep the input's "
             f"dtype (no .float(), and no torch.tensor(...) rebuilt from the numbers).")


def _softmax64(z: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.softmax(z.double(), dim=dim)


@exercise("01.1", points=1, forbid=("course_lib.parts.losses:softmax",))
def check_softmax(fn: Callable[..., torch.Tensor]) -> None:
    """Exercise 01.1: ``fn(z, dim=-1)`` returns softmax(z) along ``dim``, stable for large logits.

    Rows spanning 2000 (``[1000, 0, -1000]`` and its permutations) give nan unless the row *maximum* is
    subtracted: subtracting the minimum, the mean or one fixed element of the row overflows there.
    """
    __tracebackhide__ = True
    generator = torch.Generator().manual_seed(0)
    cases = [  # (case, z, dim); dim None means "called without dim": the default must be -1
        ("the vector [1, 2, 3]", torch.tensor([1.0, 2.0, 3.0]), -1),
        ("a (2, 3, 4) tensor", 3 * torch.randn(2, 3, 4, generator=generator), -1),
        ("a (3, 5) batch of rows, called without dim", torch.randn(3, 5, generator=generator), None),
        ("large logits [[1000, 999, 998], [-1000, -1001, -1002]]",
         torch.tensor([[1000.0, 999.0, 998.0], [-1000.0, -1001.0, -1002.0]]), -1),
        ("rows spanning 2000: [[1000, 0, -1000], [-1000, 0, 1000], [0, 1000, -1000]]",
         torch.tensor([[1000.0, 0.0, -1000.0], [-1000.0, 0.0, 1000.0], [0.0, 1000.0, -1000.0]]), -1),
        ("float64 logits of size ~300, shape (4, 6)",
         300 * torch.randn(4, 6, generator=generator, dtype=torch.float64), -1),
        ("a (4, 3) tensor with dim=0", torch.randn(4, 3, generator=generator), 0),
    ]
    for case, z, dim in cases:
        given = z.clone()
        result = call_student(fn, given, case=case) if dim is None else call_student(fn, given, dim=dim, case=case)
        _unchanged({"z": given}, {"z": z}, "softmax", case)
        result = require_tensor(result, "your softmax")
        dim = -1 if dim is None else dim
        expected = _softmax64(z, dim).to(z.dtype)
        if result.shape != z.shape:
            fail(f"your softmax returns shape {tuple(result.shape)} on {case}, but it should keep the input's "
                 f"shape {tuple(z.shape)} (did you reduce without keepdim=True?).")
        _same_dtype(result, z.dtype, "your softmax", case)
        if close(result, expected, atol=1e-6 if z.dtype == torch.float64 else 1e-5):
            continue
        if not torch.isfinite(result).all():
            fail(f"your softmax gives inf or nan on {case}: exp overflows (exp(1000) = inf) or underflows to "
                 f"0/0; subtract the maximum along `dim` (keepdim=True) before exponentiating: only the "
                 f"maximum makes every exponent <= 0 (the minimum, the mean or one element of the row do not).")
        z64 = z.double()
        other_axes = [d for d in range(z.dim()) if d != dim % z.dim()]
        wrong: dict[str, Callable[[], torch.Tensor]] = {}
        for axis in other_axes:
            if "without dim" in case:
                wrong["your default for dim normalises over axis 0; it must be dim=-1, as in the exercise's "
                      "signature softmax(z, dim=-1)"] = lambda axis=axis: _softmax64(z, axis)
            elif dim == 0:
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
    passed("check_softmax", f"your softmax matches torch.softmax on {len(cases)} cases: rows spanning 2000, "
                            f"float64, dim=0 and the default dim included.")


@exercise("01.2", points=1, forbid=("course_lib.parts.attention:causal_mask",))
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
                fail("your causal mask is an additive float mask (0 / -inf); this course's masks are bool "
                     "with True = may attend: return the lower triangle as dtype torch.bool.")
            detail = "has the right pattern but" if right_pattern else "is not bool: it"
            fail(f"your causal mask {detail} has dtype {result.dtype}; attention expects a bool mask "
                 f"(True = may attend), so build it with dtype=torch.bool or call .bool().")
        result = result.detach().cpu()
        if torch.equal(result, expected):
            continue
        wrong = {
            "it is upper-triangular; row i is query i and column j is key j, and query i may attend to keys "
            "j <= i only": expected.T.clone(),
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


@exercise("01.3", points=2, forbid=(
    "course_lib.parts.attention:scaled_dot_product_attention",
    "course_lib.parts.attention:MultiHeadAttention",
))
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
        # float32's precision is enough here: the case is about keeping the dtype, and a scale computed as
        # torch.tensor(d_k).sqrt() (a float32 number) is a right answer
        ("float64 inputs, a batch of 2 with a (5, 5) causal mask", r(2, 5, 8).double(), r(2, 5, 8).double(),
         r(2, 5, 3).double(), causal, 1e-6),
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
        _unchanged(dict(zip(("q", "k", "v", "mask"), args)), dict(zip(("q", "k", "v", "mask"), (q, k, v, mask))),
                   "attention", case)
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            fail(f"your attention should return a pair (out, weights), but on {case} it returned a "
                 f"{type(result).__name__}.")
        out, weights = result
        require_tensor(weights, "your weights")
        require_tensor(out, "your out")
        _same_dtype(weights, q.dtype, "your weights", case)
        _same_dtype(out, q.dtype, "your out", case)

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
                              f"(batch and head axes, causal and padding masks, large logits, float64).")


def _attention_backward64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, d_out: torch.Tensor,
                          mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """(dQ, dK, dV) by autograd in float64: the independent reference of exercise 01.4."""
    q, k, v = (t.detach().double().clone().requires_grad_(True) for t in (q, k, v))
    A = _masked_softmax64(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, mask)
    (A @ v).backward(d_out.double())
    return q.grad, k.grad, v.grad


@exercise("01.4", points=2, forbid=("course_lib.parts.attention:attention_backward",), autograd=True)
def check_attention_backward(fn: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """Exercise 01.4: ``fn(q, k, v, d_out, mask=None)`` returns ``(dq, dk, dv)``, the gradients of
    ``sum(out * d_out)`` for ``out = softmax(q kᵀ/√d_k) v`` (bool mask, True = may attend), in float64."""
    __tracebackhide__ = True
    g = torch.Generator().manual_seed(4)

    def r(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=g, dtype=torch.float64)

    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    padding = (torch.arange(6)[None, :] < torch.tensor([6, 3])[:, None])[:, None, :]      # (2, 1, 6)
    cases = [  # (case, q, k, v, d_out, mask)
        ("one example with T_q=3, T_k=4, d_k=5, d_v=2", r(3, 5), r(4, 5), r(4, 2), r(3, 2), None),
        ("a (5, 5) causal mask on a batch of 2 with 3 heads (d_k=8, d_v=4)",
         r(2, 3, 5, 8), r(2, 3, 5, 8), r(2, 3, 5, 4), r(2, 3, 5, 4), causal),
        ("a key-padding mask (2, 1, 6) with T_q=4 (key lengths 6 and 3)",
         r(2, 4, 8), r(2, 6, 8), r(2, 6, 3), r(2, 4, 3), padding),
        ("a square causal example with scores of size ~10 (T=5, d_k=d_v=4)",
         r(5, 4, scale=3.0), r(5, 4, scale=3.0), r(5, 4), r(5, 4), causal),
    ]
    for case, q, k, v, d_out, mask in cases:
        args = (q.clone(), k.clone(), v.clone(), d_out.clone()) + (() if mask is None else (mask.clone(),))
        try:
            result = call_student(fn, *args, case=case)
        except StudentCodeError as error:
            if "cannot be multiplied" in str(error) or "must match the size" in str(error):
                fail(f"{error} -- a transpose is missing or extra: for C = A B the gradients are dA = dC Bᵀ and "
                     f"dB = Aᵀ dC, so dV = Aᵀ dO, dQ = dS K/√d_k and dK = dSᵀ Q/√d_k.")
            raise
        names = ("q", "k", "v", "d_out", "mask")
        _unchanged(dict(zip(names, args)), dict(zip(names, (q, k, v, d_out, mask))), "attention_backward", case)
        if not isinstance(result, (tuple, list)) or len(result) != 3:
            fail(f"your attention_backward should return three tensors (dq, dk, dv), but on {case} it returned "
                 f"a {type(result).__name__}" + (f" of length {len(result)}" if isinstance(result, (tuple, list))
                                                 else "") + ".")
        dq, dk, dv = result
        for name, value, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
            require_tensor(value, f"your {name}")
            _same_dtype(value, torch.float64, f"your {name}", case)
            if value.shape != like.shape:
                hint = ""
                if value.dim() < like.dim():
                    hint = (" (you summed over the batch axis: q, k and v are inputs of each example, not "
                            "shared weights, so their gradients keep the batch axis)")
                elif value.shape[-2:] != like.shape[-2:]:
                    hint = " (a transpose missing or extra: a gradient has the shape of what it differentiates)"
                fail(f"your {name} has shape {tuple(value.shape)} on {case}, but it should have the shape of "
                     f"{name[1:]}, {tuple(like.shape)}{hint}.")
        exp_dq, exp_dk, exp_dv = _attention_backward64(q, k, v, d_out, mask)
        sqrt_d = q.shape[-1] ** 0.5
        S = q @ k.transpose(-2, -1) / sqrt_d
        A = _masked_softmax64(S, mask)
        A_unmasked = torch.softmax(S, dim=-1)
        dA = d_out @ v.transpose(-2, -1)
        batch = q.shape[0] if q.dim() > 2 else 1

        def through_softmax(dS: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
            return {"q": lambda: dS @ k / sqrt_d, "k": lambda: dS.transpose(-2, -1) @ q / sqrt_d}

        right_dS = A * (dA - (dA * A).sum(-1, keepdim=True))
        slips = {   # sentence -> dS a slip produces (used for dq and dk alike)
            "you dropped the diagonal term of the softmax Jacobian diag(a) - a aᵀ: dS = A ⊙ dA - A ⊙ "
            "rowsum(dA ⊙ A), not only the second part": -A * (dA * A).sum(-1, keepdim=True),
            "you dropped the - a aᵀ part of the softmax Jacobian: subtract rowsum(dA ⊙ A) from dA before "
            "multiplying by A": A * dA,
            "you passed dA straight through the softmax; its Jacobian diag(a) - a aᵀ gives dS = A ⊙ (dA - "
            "rowsum(dA ⊙ A))": dA,
            "your rowsum runs over the queries (dim=-2); the softmax normalises each row over the keys, so "
            "sum over dim=-1": A * (dA - (dA * A).sum(-2, keepdim=True)),
            "you recomputed A without the mask; the forward pass set the masked scores to -inf, and the "
            "backward pass must use the same A": A_unmasked * (dA - (dA * A_unmasked).sum(-1, keepdim=True)),
        }
        for name, value, expected, others in (("dv", dv, exp_dv, {
                "you computed A dO; the values' gradient is Aᵀ dO (value j collects the weight every query "
                "gave key j)": lambda: A @ d_out,
                "you used the attention weights without the mask": lambda: A_unmasked.transpose(-2, -1) @ d_out,
                f"you divided by the batch size {batch}; d_out already holds the loss's gradient (with any "
                f"1/N of a mean), so do not average again": lambda: exp_dv / batch,
        }), ("dq", dq, exp_dq, {
                "dq is missing a transpose: it is dS K/√d_k, with dS of shape (..., T_q, T_k)":
                    lambda: right_dS.transpose(-2, -1) @ k / sqrt_d,
                "dq is missing the factor 1/√d_k of the scores": lambda: right_dS @ k,
                "dq is scaled by 1/d_k; the scores were divided by √d_k": lambda: right_dS @ k / sqrt_d ** 2,
                "you computed dq from the values instead of the keys: dQ = dS K/√d_k":
                    lambda: right_dS @ v / sqrt_d,
                f"you divided by the batch size {batch}; d_out already holds the loss's gradient (with any "
                f"1/N of a mean), so do not average again": lambda: exp_dq / batch,
                **{sentence: through_softmax(dS)["q"] for sentence, dS in slips.items()},
        }), ("dk", dk, exp_dk, {
                "dk is missing a transpose: it is dSᵀ Q/√d_k (key j collects from every query that scored it)":
                    lambda: right_dS @ q / sqrt_d,
                "dk is missing the factor 1/√d_k of the scores": lambda: right_dS.transpose(-2, -1) @ q,
                "dk is scaled by 1/d_k; the scores were divided by √d_k":
                    lambda: right_dS.transpose(-2, -1) @ q / sqrt_d ** 2,
                f"you divided by the batch size {batch}; d_out already holds the loss's gradient (with any "
                f"1/N of a mean), so do not average again": lambda: exp_dk / batch,
                **{sentence: through_softmax(dS)["k"] for sentence, dS in slips.items()},
        })):
            if batch == 1:
                others = {s_: f for s_, f in others.items() if "batch size" not in s_}
            compare(value, expected, what=f"your {name}", case=case, atol=1e-8, rtol=1e-7, wrong_answers=others)
    passed("check_attention_backward", f"dq, dk and dv equal autograd's in float64 on {len(cases)} cases "
                                       f"(non-square, batch and heads, causal and padding masks).")
