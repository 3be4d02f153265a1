"""The checks of 01_attention accept correct answers and refuse each common mistake with the right sentence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from course_lib import checks
from course_lib.parts.attention import scaled_dot_product_attention
from course_lib.checks import CheckFailed, NotAttempted, ReferenceCalled, StudentCodeError

pytestmark = pytest.mark.filterwarnings("ignore:The use of `x.T`:UserWarning")  # the k.T mistake below


def refused(check, fn) -> str:
    with pytest.raises(CheckFailed) as info:
        check(fn)
    return str(info.value)


# ---------------------------------------------------------------------------------------- softmax

def softmax_manual(z, dim=-1):
    e = (z - z.amax(dim=dim, keepdim=True)).exp()
    return e / e.sum(dim=dim, keepdim=True)


def softmax_via_logsumexp(z, dim=-1):
    return (z - torch.logsumexp(z, dim=dim, keepdim=True)).exp()


def softmax_moved_axis(z, dim=-1):
    moved = z.movedim(dim, -1)
    e = (moved - torch.max(moved, dim=-1, keepdim=True)[0]).exp()
    return (e / e.sum(-1, keepdim=True)).movedim(-1, dim)


def softmax_in_numpy(z, dim=-1):
    e = np.exp(z.numpy() - z.numpy().max(axis=dim, keepdims=True))
    return torch.from_numpy(e / e.sum(axis=dim, keepdims=True))


@pytest.mark.parametrize("fn", [
    softmax_manual,
    softmax_via_logsumexp,
    softmax_moved_axis,
    softmax_in_numpy,
    lambda z, dim=-1: torch.softmax(z, dim=dim),
    lambda z, dim=-1: F.softmax(z, dim),
])
def test_check_softmax_accepts(fn, capsys):
    checks.check_softmax(fn)
    assert "check_softmax passed" in capsys.readouterr().out


def _no_max(z, dim=-1):
    return z.exp() / z.exp().sum(dim=dim, keepdim=True)


def _global_max(z, dim=-1):
    e = (z - z.max()).exp()
    return e / e.sum(dim=dim, keepdim=True)


def _sum_all(z, dim=-1):
    e = (z - z.amax(dim=dim, keepdim=True)).exp()
    return e / e.sum()


def _sum_all_global_max(z, dim=-1):
    e = (z - z.max()).exp()
    return e / e.sum()


def _no_normalise(z, dim=-1):
    return (z - z.amax(dim=dim, keepdim=True)).exp()


def _no_keepdim(z, dim=-1):
    e = (z - z.amax(dim=dim, keepdim=True)).exp()
    return e / e.sum(dim=dim)


def _shift_by(shift):
    """A softmax that subtracts something other than the row maximum: right on small logits only."""
    def softmax(z, dim=-1):
        e = (z - shift(z, dim)).exp()
        return e / e.sum(dim=dim, keepdim=True)
    return softmax


def _in_place(z, dim=-1):
    z -= z.amax(dim=dim, keepdim=True)
    z.exp_()
    return z / z.sum(dim=dim, keepdim=True)


def _default_dim_zero(z, dim=0):
    return softmax_manual(z, dim)


def _float32_inside(z, dim=-1):
    return softmax_manual(z.float(), dim)


def _rebuilt_with_torch_tensor(z, dim=-1):
    return torch.tensor(softmax_manual(z, dim).tolist())


@pytest.mark.parametrize("fn,words", [
    (lambda z, dim=-1: torch.softmax(z, dim=0), "you normalised over axis 0"),
    (lambda z, dim=-1: torch.softmax(z, dim=-1), "you normalised over the last axis although dim=0 was asked"),
    (_no_max, "subtract the maximum along `dim`"),
    (_global_max, "subtract the maximum along `dim`"),
    (_sum_all, "you divided by the sum over all elements"),
    (_sum_all_global_max, "you divided by the sum over all elements"),
    (_no_normalise, "without dividing by the sum"),
    (lambda z, dim=-1: z.exp(), "without dividing by the sum"),
    (lambda z, dim=-1: torch.log_softmax(z, dim=dim), "you returned log-softmax"),
    (_no_keepdim, "keepdim"),
    (lambda z, dim=-1: torch.sigmoid(z), "does not sum to 1"),
    (lambda z, dim=-1: torch.softmax(z, dim=dim).numpy(), "should be a torch.Tensor"),
    # right on small logits, wrong on rows spanning 2000 such as [1000, 0, -1000] (the leak of issue 12)
    (_shift_by(lambda z, dim: z.amin(dim=dim, keepdim=True)), "the minimum, the mean or one element of the row do not"),
    (_shift_by(lambda z, dim: z.mean(dim=dim, keepdim=True)), "the minimum, the mean or one element of the row do not"),
    (_shift_by(lambda z, dim: z.narrow(dim, 0, 1)), "the minimum, the mean or one element of the row do not"),
    (_shift_by(lambda z, dim: z.narrow(dim, z.shape[dim] - 1, 1)), "the minimum, the mean or one element of the row do not"),
    (_in_place, "changed its input z in place"),
    (_default_dim_zero, "your default for dim normalises over axis 0"),
    (_float32_inside, "has dtype torch.float32 on float64 logits"),
    (_rebuilt_with_torch_tensor, "has dtype torch.float32 on float64 logits"),
])
def test_check_softmax_refuses(fn, words):
    assert words in refused(checks.check_softmax, fn)


def test_check_softmax_catalogue_is_large_enough():
    # issue 12: at least five wrong answers per check, several of them right on easy inputs
    assert len(test_check_softmax_refuses.pytestmark[0].args[1]) >= 5


def test_check_softmax_stub_and_crash():
    def stub(z, dim=-1):
        raise NotImplementedError("Exercise 01.1 is not done yet")

    with pytest.raises(NotAttempted, match="Exercise 01.1 is not done yet"):
        checks.check_softmax(stub)
    with pytest.raises(StudentCodeError, match="raised ZeroDivisionError"):
        checks.check_softmax(lambda z, dim=-1: 1 / 0)


# ------------------------------------------------------------------------------------ causal mask

@pytest.mark.parametrize("fn", [
    lambda T: torch.ones(T, T, dtype=torch.bool).tril(),
    lambda T: torch.tril(torch.ones(T, T)).bool(),
    lambda T: torch.arange(T)[:, None] >= torch.arange(T)[None, :],
    lambda T: ~torch.ones(T, T, dtype=torch.bool).triu(1),
    lambda T: torch.from_numpy(np.tril(np.ones((T, T), dtype=bool))),
    lambda T: torch.tensor([[j <= i for j in range(T)] for i in range(T)]),
    lambda T: torch.ones(T, T).tril() == 1,
])
def test_check_causal_mask_accepts(fn, capsys):
    checks.check_causal_mask(fn)
    assert "check_causal_mask passed" in capsys.readouterr().out


@pytest.mark.parametrize("fn,words", [
    (lambda T: torch.ones(T, T, dtype=torch.bool).triu(), "upper-triangular"),
    (lambda T: torch.ones(T, T, dtype=torch.bool).tril(-1), "excludes the diagonal"),
    (lambda T: torch.ones(T, T, dtype=torch.bool).triu(1), "inverted"),
    (lambda T: torch.ones(T, T, dtype=torch.bool), "allows every key"),
    (lambda T: torch.ones(T, T).tril(), "has the right pattern but has dtype torch.float32"),
    (lambda T: torch.ones(T, T, dtype=torch.long).tril(), "has the right pattern but has dtype torch.int64"),
    (lambda T: torch.zeros(T, T).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")),
     "additive float mask"),
    (lambda T: torch.ones(T, T, dtype=torch.bool).tril()[None], "should be"),
    (lambda T: torch.eye(T, dtype=torch.bool), "differs from the causal mask"),
])
def test_check_causal_mask_refuses(fn, words):
    assert words in refused(checks.check_causal_mask, fn)


# -------------------------------------------------------------------------------------- attention

def attention_manual(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return weights @ v, weights


def attention_big_negative(q, k, v, mask=None):
    scores = torch.einsum("...id,...jd->...ij", q, k) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = torch.where(mask, scores, torch.tensor(-1e9))
    weights = scores.softmax(-1)
    return torch.einsum("...ij,...jd->...id", weights, v), weights


def attention_with_torch_sdpa(q, k, v, mask=None):
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = q @ k.mT / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(mask.logical_not(), -math.inf)
    return out, F.softmax(scores, dim=-1)


def attention_filled_with(fill, *, scale=math.sqrt, additive=False):
    """A right attention whose masked scores get ``fill(scores)`` (any value far enough below the rest)."""

    def attention(q, k, v, mask=None):
        scores = q @ k.transpose(-2, -1) / scale(q.shape[-1])
        if mask is not None:
            blocked = torch.zeros_like(scores).masked_fill(~mask, fill(scores))
            scores = scores + blocked if additive else scores.masked_fill(~mask, fill(scores))
        weights = torch.softmax(scores, dim=-1)
        return weights @ v, weights

    return attention


RIGHT_ATTENTIONS = {
    "-inf": attention_manual,
    "-1e9 with torch.where and einsum": attention_big_negative,
    "F.scaled_dot_product_attention for out": attention_with_torch_sdpa,
    "torch.finfo(dtype).min": attention_filled_with(lambda s: torch.finfo(s.dtype).min),
    "float32's finfo.min on every dtype": attention_filled_with(lambda s: torch.finfo(torch.float32).min),
    "-1e4": attention_filled_with(lambda s: -1e4),
    "an additive 0 / finfo.min mask": attention_filled_with(lambda s: torch.finfo(s.dtype).min, additive=True),
    "an additive 0 / -inf mask": attention_filled_with(lambda s: float("-inf"), additive=True),
    "the scale as a float32 tensor, torch.tensor(d_k).sqrt()":
        attention_filled_with(lambda s: float("-inf"), scale=lambda d: torch.tensor(d).sqrt()),
    "the scale as a NumPy scalar, np.sqrt(d_k)": attention_filled_with(lambda s: -1e9, scale=np.sqrt),
    "the scale as np.float32": attention_filled_with(lambda s: -1e9, scale=lambda d: np.float32(np.sqrt(d))),
}


@pytest.mark.parametrize("fn", RIGHT_ATTENTIONS.values(), ids=RIGHT_ATTENTIONS.keys())
def test_check_attention_accepts(fn, capsys):
    checks.check_attention(fn)
    assert "check_attention passed" in capsys.readouterr().out


def make_wrong(*, scale=lambda q, v: math.sqrt(q.shape[-1]), softmax_dim=-1, fill=float("-inf"), invert=False,
               ignore_mask=False, zero_after=False, transpose_weights=False, unstable=False, use_k=False,
               k_T=False):
    """An attention with one deliberate mistake switched on."""

    def attention(q, k, v, mask=None):
        kt = k.T if k_T else k.transpose(-2, -1)
        scores = q @ kt / scale(q, v)
        if mask is not None and not ignore_mask and not zero_after:
            scores = scores.masked_fill(mask if invert else ~mask, fill)
        if unstable:
            e = scores.exp()
            weights = e / e.sum(dim=softmax_dim, keepdim=True)
        else:
            weights = torch.softmax(scores, dim=softmax_dim)
        if mask is not None and zero_after:
            weights = weights * mask
        out = weights @ (k if use_k else v)
        return out, (weights.transpose(-2, -1) if transpose_weights else weights)

    return attention


@pytest.mark.parametrize("fn,words", [
    (make_wrong(scale=lambda q, v: 1.0), "not scaled by 1/√d_k"),
    (make_wrong(scale=lambda q, v: q.shape[-1]), "divided the scores by d_k instead of √d_k"),
    (make_wrong(scale=lambda q, v: math.sqrt(v.shape[-1])), "scaled by 1/√d_v"),
    (make_wrong(softmax_dim=-2), "softmax over the queries (dim=-2)"),
    (make_wrong(softmax_dim=0), "softmax over the queries (dim=-2)"),  # on a 2-D example dim 0 is dim -2
    (make_wrong(ignore_mask=True), "the mask is ignored"),
    (make_wrong(invert=True), "the mask is inverted"),
    (make_wrong(invert=True, fill=-1e9), "the mask is inverted"),
    (make_wrong(zero_after=True), "without renormalising"),
    (make_wrong(fill=0.0), "set the masked scores to 0"),
    (make_wrong(transpose_weights=True), "they are transposed"),
    (make_wrong(unstable=True), "contain inf or nan"),
    (make_wrong(use_k=True), "should have shape"),
    (make_wrong(k_T=True), "not with batch/head axes in front"),
    (lambda q, k, v, mask=None: attention_manual(q, k, v, mask)[1], "should return a pair (out, weights)"),
    (lambda q, k, v, mask=None: (attention_manual(q, k, v, mask)[0], None), "should be a torch.Tensor"),
    (lambda q, k, v, mask=None: (q, attention_manual(q, k, v, mask)[1]), "your out"),
    (lambda q, k, v, mask=None: attention_manual(q.mul_(1.0 / math.sqrt(q.shape[-1])) * math.sqrt(q.shape[-1]),
                                                 k, v, mask), "changed its input q in place"),
    (lambda q, k, v, mask=None: attention_manual(q.float(), k.float(), v.float(), mask),
     "has dtype torch.float32 on float64 inputs"),
])
def test_check_attention_refuses(fn, words):
    assert words in refused(checks.check_attention, fn)


def test_check_attention_refuses_code_that_only_works_without_batch_axes():
    def two_d_only(q, k, v, mask=None):
        weights = torch.softmax(torch.mm(q, k.t()) / math.sqrt(q.shape[-1]), dim=-1)
        return torch.mm(weights, v), weights

    assert "not with batch/head axes in front" in refused(checks.check_attention, two_d_only)

    def softmax_dim0_batched(q, k, v, mask=None):
        return make_wrong(softmax_dim=0)(q, k, v, mask) if q.dim() > 2 else attention_manual(q, k, v, mask)

    assert "dim=0" in refused(checks.check_attention, softmax_dim0_batched)


# ------------------------------------------------------------------------------ attention backward

def backward_manual(q, k, v, d_out, mask=None):
    d_k = q.shape[-1]
    scores = q @ k.transpose(-2, -1) / math.sqrt(d_k)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    A = torch.softmax(scores, dim=-1)
    dA = d_out @ v.transpose(-2, -1)
    dS = A * (dA - (dA * A).sum(-1, keepdim=True))
    return dS @ k / math.sqrt(d_k), dS.transpose(-2, -1) @ q / math.sqrt(d_k), A.transpose(-2, -1) @ d_out


def backward_by_autograd(q, k, v, d_out, mask=None):
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return torch.autograd.grad(out, (q, k, v), d_out)


def backward_jacobian_explicit(q, k, v, d_out, mask=None):
    # the softmax Jacobian diag(a) - a aᵀ built as a matrix for every row, then applied
    _, A = scaled_dot_product_attention(q, k, v, mask)
    dA = d_out @ v.mT
    J = torch.diag_embed(A) - A[..., :, None] * A[..., None, :]
    dS = (J @ dA[..., :, None])[..., 0]
    s = q.shape[-1] ** -0.5
    return dS @ k * s, dS.mT @ q * s, A.mT @ d_out


def backward_library(q, k, v, d_out, mask=None):
    from course_lib.parts.attention import attention_backward
    return attention_backward(q, k, v, d_out, mask)


def backward_filled_with(fill, scale=math.sqrt):
    """A right backward pass whose forward recomputation fills the masked scores with ``fill(scores)``."""

    def attention_backward(q, k, v, d_out, mask=None):
        scores = q @ k.mT / scale(q.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(~mask, fill(scores))
        A = scores.softmax(-1)
        dA = d_out @ v.mT
        dS = A * (dA - (dA * A).sum(-1, keepdim=True))
        return dS @ k / scale(q.shape[-1]), dS.mT @ q / scale(q.shape[-1]), A.mT @ d_out

    return attention_backward


def backward_flash_form(q, k, v, d_out, mask=None):
    # FlashAttention's form of the softmax step: rowsum(dA ⊙ A) = rowsum(dO ⊙ O)
    scale = q.shape[-1] ** -0.5
    scores = (q @ k.mT * scale).masked_fill(~mask, float("-inf")) if mask is not None else q @ k.mT * scale
    A = scores.softmax(-1)
    dS = A * (d_out @ v.mT - (d_out * (A @ v)).sum(-1, keepdim=True))
    return dS @ k * scale, dS.mT @ q * scale, A.mT @ d_out


@pytest.mark.parametrize("fn", [
    backward_manual, backward_jacobian_explicit, backward_flash_form,
    backward_filled_with(lambda s: -1e9),
    backward_filled_with(lambda s: torch.finfo(s.dtype).min),
    backward_filled_with(lambda s: torch.finfo(torch.float32).min, scale=np.sqrt),
    backward_filled_with(lambda s: float("-inf"), scale=lambda d: torch.tensor(d).sqrt()),
])
def test_check_attention_backward_accepts(fn, capsys):
    checks.check_attention_backward(fn)
    assert "check_attention_backward passed" in capsys.readouterr().out


def make_backward_wrong(*, dv_no_transpose=False, dk_no_transpose=False, dq_transposed=False, no_diag=False,
                        no_outer=False, no_softmax=False, rowsum_dim=-1, no_scale=False, scale_by_d=False,
                        mean_over_batch=False, ignore_mask=False, sum_batch=False, float32=False):
    """attention_backward with one deliberate slip switched on."""

    def attention_backward(q, k, v, d_out, mask=None):
        if float32:
            q, k, v, d_out = q.float(), k.float(), v.float(), d_out.float()
        d_k = q.shape[-1]
        scale = 1.0 if no_scale else (1 / d_k if scale_by_d else 1 / math.sqrt(d_k))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d_k)
        if mask is not None and not ignore_mask:
            scores = scores.masked_fill(~mask, float("-inf"))
        A = torch.softmax(scores, dim=-1)
        dA = d_out @ v.transpose(-2, -1)
        if no_softmax:
            dS = dA
        elif no_diag:
            dS = -A * (dA * A).sum(rowsum_dim, keepdim=True)
        elif no_outer:
            dS = A * dA
        else:
            dS = A * (dA - (dA * A).sum(rowsum_dim, keepdim=True))
        dq = (dS.transpose(-2, -1) if dq_transposed else dS) @ k * scale
        dk = (dS if dk_no_transpose else dS.transpose(-2, -1)) @ q * scale
        dv = (A if dv_no_transpose else A.transpose(-2, -1)) @ d_out
        if mean_over_batch and q.dim() > 2:
            dq, dk, dv = dq / q.shape[0], dk / q.shape[0], dv / q.shape[0]
        if sum_batch and q.dim() > 2:
            dk = dk.sum(0)
        return dq, dk, dv

    return attention_backward


BACKWARD_WRONG = {
    "dV = A dO (missing transpose)": (make_backward_wrong(dv_no_transpose=True), "a transpose is missing or extra"),
    "dK = dS Q (missing transpose)": (make_backward_wrong(dk_no_transpose=True), "a transpose is missing or extra"),
    "dQ = dSᵀ K (extra transpose)": (make_backward_wrong(dq_transposed=True), "a transpose is missing or extra"),
    "no diagonal term": (make_backward_wrong(no_diag=True), "dropped the diagonal term of the softmax Jacobian"),
    "no outer term": (make_backward_wrong(no_outer=True), "dropped the - a aᵀ part"),
    "no softmax backward": (make_backward_wrong(no_softmax=True), "straight through the softmax"),
    "rowsum over queries": (make_backward_wrong(rowsum_dim=-2), "your rowsum runs over the queries"),
    "no 1/√d_k": (make_backward_wrong(no_scale=True), "missing the factor 1/√d_k"),
    "1/d_k": (make_backward_wrong(scale_by_d=True), "scaled by 1/d_k"),
    "mean over the batch": (make_backward_wrong(mean_over_batch=True), "divided by the batch size"),
    "mask ignored": (make_backward_wrong(ignore_mask=True), "without the mask"),
    "dK summed over the batch": (make_backward_wrong(sum_batch=True), "you summed over the batch axis"),
    "float32 inside": (make_backward_wrong(float32=True), "dtype torch.float32"),
    "returns two": (lambda q, k, v, d_out, mask=None: backward_manual(q, k, v, d_out, mask)[:2],
                    "should return three tensors"),
    "mutates d_out": (lambda q, k, v, d_out, mask=None: backward_manual(q, k, v, d_out.mul_(1.0), mask)
                      if False else backward_manual(q, k, v, d_out.div_(2).mul_(2).add_(0.5), mask),
                      "changed its input d_out in place"),
}


@pytest.mark.parametrize("name", list(BACKWARD_WRONG))
def test_check_attention_backward_refuses(name):
    fn, words = BACKWARD_WRONG[name]
    message = refused(checks.check_attention_backward, fn)
    assert words in message, message
    assert "\n" not in message


def test_check_attention_backward_names_transposes_on_square_inputs():
    # on a square case the shapes agree, and the sentence names the transpose
    def square_only(fn):
        def wrapper(q, k, v, d_out, mask=None):
            if q.shape[-2] == k.shape[-2] and q.shape[-1] == v.shape[-1]:
                return fn(q, k, v, d_out, mask)
            return backward_manual(q, k, v, d_out, mask)
        return wrapper

    assert "Aᵀ dO" in refused(checks.check_attention_backward, square_only(make_backward_wrong(dv_no_transpose=True)))
    assert "dk is missing a transpose" in refused(checks.check_attention_backward,
                                                  square_only(make_backward_wrong(dk_no_transpose=True)))
    assert "dq is missing a transpose" in refused(checks.check_attention_backward,
                                                  square_only(make_backward_wrong(dq_transposed=True)))


def test_check_attention_backward_stub():
    def stub(q, k, v, d_out, mask=None):
        raise NotImplementedError("Exercise 01.4 is not done yet")

    with pytest.raises(NotAttempted, match="Exercise 01.4 is not done yet"):
        checks.check_attention_backward(stub)


def test_hints_registered(capsys):
    for exercise in ("01.1", "01.2", "01.3", "01.4"):
        assert len(checks.HINTS[exercise]) == 3
        checks.hint(exercise, level=3)
    assert capsys.readouterr().out.count("the key line") == 4


# --------------------------------------------- answers that call the course's reference are refused

import course_lib.parts.attention as attention_module  # noqa: E402
from course_lib.parts.attention import attention_backward as backward_by_the_book  # noqa: E402 -- another name
from course_lib.parts.attention import causal_mask as lower_triangle  # noqa: E402
from course_lib.parts.attention import scaled_dot_product_attention as attend  # noqa: E402
from course_lib.parts.losses import softmax as stable_softmax  # noqa: E402


def softmax_library(z, dim=-1):
    from course_lib.parts.losses import softmax
    return softmax(z, dim)


def backward_by_tensor_backward(q, k, v, d_out, mask=None):
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    (F.scaled_dot_product_attention(q, k, v, attn_mask=mask) * d_out).sum().backward()
    return q.grad, k.grad, v.grad


def backward_by_torch_func(q, k, v, d_out, mask=None):
    _, pull = torch.func.vjp(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask), q, k, v)
    return pull(d_out)


REFERENCE_CALLS = {
    "01.1 directly": (checks.check_softmax, softmax_library, "course_lib.parts.losses.softmax"),
    "01.1 under another name": (checks.check_softmax, lambda z, dim=-1: stable_softmax(z, dim),
                                "course_lib.parts.losses.softmax"),
    "01.1 the reference itself": (checks.check_softmax, stable_softmax, "course_lib.parts.losses.softmax"),
    "01.1 the check's own helper": (checks.check_softmax, lambda z, dim=-1: checks.attention._softmax64(z, dim).to(z.dtype),
                                    "course_lib.checks.attention._softmax64"),
    "01.2 directly": (checks.check_causal_mask, lambda T: attention_module.causal_mask(T),
                      "course_lib.parts.attention.causal_mask"),
    "01.2 under another name": (checks.check_causal_mask, lambda T: lower_triangle(T),
                                "course_lib.parts.attention.causal_mask"),
    "01.3 the reference itself": (checks.check_attention, scaled_dot_product_attention,
                                  "course_lib.parts.attention.scaled_dot_product_attention"),
    "01.3 under another name": (checks.check_attention, lambda q, k, v, mask=None: attend(q, k, v, mask),
                                "course_lib.parts.attention.scaled_dot_product_attention"),
    "01.4 directly": (checks.check_attention_backward, backward_library, "course_lib.parts.attention.attention_backward"),
    "01.4 under another name": (checks.check_attention_backward, lambda *args: backward_by_the_book(*args),
                                "course_lib.parts.attention.attention_backward"),
    "01.4 torch.autograd.grad": (checks.check_attention_backward, backward_by_autograd, "torch.autograd.grad"),
    "01.4 Tensor.backward": (checks.check_attention_backward, backward_by_tensor_backward, "Tensor.backward"),
    "01.4 torch.func.vjp": (checks.check_attention_backward, backward_by_torch_func, "torch.autograd.grad"),
}


@pytest.mark.parametrize("name", REFERENCE_CALLS)
def test_an_answer_that_calls_the_reference_is_refused(name):
    check, fn, called = REFERENCE_CALLS[name]
    with pytest.raises(ReferenceCalled) as info:
        check(fn)
    message = str(info.value)
    assert message.startswith("your answer calls ") and f"`{called}`" in message and message.endswith("write it yourself.")


def test_the_attention_backward_may_use_the_forward_reference(capsys):
    # 01.4 forbids the backward pass and autograd, not the forward pass of 01.3 (backward_jacobian_explicit uses it)
    checks.check_attention_backward(backward_jacobian_explicit)
    assert "check_attention_backward passed" in capsys.readouterr().out
