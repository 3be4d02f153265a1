"""course_lib.parts.attention against PyTorch's own attention (F.scaled_dot_product_attention, nn.MultiheadAttention)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from course_lib.parts.attention import (MultiHeadAttention, attention_backward, attention_parameter_count, causal_mask,
                                  padding_mask, scaled_dot_product_attention)

ATOL, RTOL = 1e-5, 1e-4


def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _naive(q, k, v, mask=None):
    """A loop-free float64 reference written independently: explicit exp / sum."""
    q, k, v = q.double(), k.double(), v.double()
    s = torch.einsum("...qd,...kd->...qk", q, k) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = torch.where(mask, s, torch.tensor(-math.inf, dtype=s.dtype))
    s = s - s.amax(-1, keepdim=True)
    e = s.exp()
    w = e / e.sum(-1, keepdim=True)
    return w @ v, w


SHAPES = [  # (lead, T_q, T_k, d_k, d_v)
    ((), 3, 4, 8, 5),
    ((2,), 5, 5, 16, 16),
    ((2, 3), 7, 4, 6, 3),
    ((1, 4), 1, 9, 2, 7),
    ((3, 2), 13, 11, 33, 1),
]


@pytest.mark.parametrize("lead,T_q,T_k,d_k,d_v", SHAPES)
def test_matches_torch_sdpa_without_mask(lead, T_q, T_k, d_k, d_v):
    q, k, v = _rand(*lead, T_q, d_k, seed=1), _rand(*lead, T_k, d_k, seed=2), _rand(*lead, T_k, d_v, seed=3)
    out, w = scaled_dot_product_attention(q, k, v)
    assert out.shape == (*lead, T_q, d_v) and w.shape == (*lead, T_q, T_k)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=ATOL, rtol=RTOL)
    ref_out, ref_w = _naive(q, k, v)
    torch.testing.assert_close(w.double(), ref_w, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(w.sum(-1), torch.ones(*lead, T_q), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("lead,T_q,T_k,d_k,d_v", SHAPES)
def test_matches_torch_sdpa_with_random_bool_mask(lead, T_q, T_k, d_k, d_v):
    q, k, v = _rand(*lead, T_q, d_k, seed=4), _rand(*lead, T_k, d_k, seed=5), _rand(*lead, T_k, d_v, seed=6)
    mask = _rand(*lead, T_q, T_k, seed=7) > 0
    mask[..., 0] = True  # every query keeps at least one key
    out, w = scaled_dot_product_attention(q, k, v, mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=ATOL, rtol=RTOL)
    assert (w[~mask] == 0).all()
    torch.testing.assert_close(w.double(), _naive(q, k, v, mask)[1], atol=ATOL, rtol=RTOL)


def test_causal_matches_is_causal():
    q, k, v = _rand(2, 3, 6, 8, seed=8), _rand(2, 3, 6, 8, seed=9), _rand(2, 3, 6, 4, seed=10)
    out, w = scaled_dot_product_attention(q, k, v, causal_mask(6))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=ATOL, rtol=RTOL)
    assert torch.equal(w[..., 0, :], torch.tensor([1.0, 0, 0, 0, 0, 0]).expand(2, 3, 6))
    assert (w.triu(1) == 0).all()


def test_large_logits_are_stable():
    q, k, v = _rand(2, 5, 8, seed=11, scale=300.0), _rand(2, 7, 8, seed=12, scale=300.0), _rand(2, 7, 3, seed=13)
    out, w = scaled_dot_product_attention(q, k, v)
    assert torch.isfinite(out).all() and torch.isfinite(w).all()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-4, rtol=1e-4)


def test_fully_masked_rows_give_zero_weights_and_output_and_finite_grads():
    q = _rand(2, 4, 8, seed=14).requires_grad_()
    k, v = _rand(2, 4, 8, seed=15), _rand(2, 4, 3, seed=16)
    pad = padding_mask([4, 2], 4)                     # (2, 1, 4)
    mask = pad & pad.transpose(-2, -1)                # padded queries fully masked
    out, w = scaled_dot_product_attention(q, k, v, mask)
    assert torch.isfinite(out).all() and torch.isfinite(w).all()
    assert (w[1, 2:] == 0).all() and (out[1, 2:] == 0).all()
    torch.testing.assert_close(w[1, :2].sum(-1), torch.ones(2))
    # the rows that do have keys agree with PyTorch (which also returns zeros for the empty rows)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=ATOL, rtol=RTOL)
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and (q.grad[1, 2:] == 0).all()


def test_broadcast_mask_shapes():
    q, k, v = _rand(2, 3, 5, 4, seed=17), _rand(2, 3, 6, 4, seed=18), _rand(2, 3, 6, 2, seed=19)
    key_mask = padding_mask([6, 3], 6)[:, None]       # (2, 1, 1, 6)
    out, w = scaled_dot_product_attention(q, k, v, key_mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask), atol=ATOL, rtol=RTOL)
    assert (w[1, ..., 3:] == 0).all()


def test_masks():
    assert torch.equal(causal_mask(3), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    assert causal_mask(1).dtype == torch.bool
    m = padding_mask([3, 1, 0], 4)
    assert m.shape == (3, 1, 4) and m.dtype == torch.bool
    assert m[:, 0].tolist() == [[True, True, True, False], [True, False, False, False], [False] * 4]
    assert torch.equal(padding_mask(torch.tensor([2]), 2), torch.ones(1, 1, 2, dtype=torch.bool))


@pytest.mark.parametrize("call,error,words", [
    (lambda: scaled_dot_product_attention(_rand(3, 4), _rand(5, 3), _rand(5, 2)), ValueError, "same last dimension"),
    (lambda: scaled_dot_product_attention(_rand(3, 4), _rand(5, 4), _rand(6, 2)), ValueError, "number of positions"),
    (lambda: scaled_dot_product_attention(_rand(2, 3, 4), _rand(3, 5, 4), _rand(3, 5, 2)), ValueError, "do not broadcast"),
    (lambda: scaled_dot_product_attention(_rand(3, 4), _rand(5, 4), _rand(5, 2), torch.ones(3, 5)), TypeError, "torch.bool"),
    (lambda: scaled_dot_product_attention(_rand(3, 4), _rand(5, 4), _rand(5, 2), torch.ones(5, 3, dtype=torch.bool)), ValueError, "does not broadcast"),
    (lambda: scaled_dot_product_attention(_rand(3, 4), _rand(5, 4), _rand(5, 2), torch.ones(2, 3, 5, dtype=torch.bool)), ValueError, "does not broadcast"),
    (lambda: scaled_dot_product_attention([[1.0]], _rand(5, 4), _rand(5, 2)), TypeError, "torch.Tensor"),
    (lambda: scaled_dot_product_attention(torch.ones(3, 4, dtype=torch.long), _rand(5, 4), _rand(5, 2)), TypeError, "floating-point"),
    (lambda: scaled_dot_product_attention(_rand(4), _rand(5, 4), _rand(5, 2)), ValueError, "at least 2 dimensions"),
    (lambda: causal_mask(0), ValueError, "positive int"),
    (lambda: padding_mask([5], 4), ValueError, "0..T=4"),
    (lambda: padding_mask([[1, 2]], 4), ValueError, "1-D"),
    (lambda: MultiHeadAttention(10, 3), ValueError, "multiple of n_head"),
    (lambda: MultiHeadAttention(8, 2)(_rand(5, 8)), ValueError, "(batch, T, d_model=8)"),
])
def test_bad_input_gets_one_clear_sentence(call, error, words):
    with pytest.raises(error, match=None) as info:
        call()
    assert words in str(info.value)


@pytest.mark.parametrize("bias", [True, False])
def test_multihead_matches_torch_multiheadattention(bias):
    torch.manual_seed(0)
    d_model, n_head, B, T = 24, 4, 3, 7
    reference = nn.MultiheadAttention(d_model, n_head, bias=bias, batch_first=True).eval()
    ours = MultiHeadAttention.from_torch(reference)
    x = _rand(B, T, d_model, seed=20)
    ref_out, ref_w = reference(x, x, x, need_weights=True, average_attn_weights=False)
    out, w = ours(x, return_weights=True)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(w, ref_w, atol=ATOL, rtol=RTOL)

    # masks: ours True = may attend, torch's bool attn_mask True = blocked
    mask = causal_mask(T)
    ref_out, _ = reference(x, x, x, attn_mask=~mask, need_weights=False)
    torch.testing.assert_close(ours(x, mask), ref_out, atol=ATOL, rtol=RTOL)
    pad = padding_mask([7, 5, 2], T)                  # (B, 1, T)
    ref_out, _ = reference(x, x, x, key_padding_mask=~pad[:, 0], need_weights=False)
    torch.testing.assert_close(ours(x, pad), ref_out, atol=ATOL, rtol=RTOL)


def test_multihead_parameter_count_and_reshapes():
    mha = MultiHeadAttention(32, 4)
    assert sum(p.numel() for p in mha.parameters()) == attention_parameter_count(32) == 4 * 32 * 32 + 4 * 32
    assert sum(p.numel() for p in MultiHeadAttention(32, 4, bias=False).parameters()) == 4 * 32 * 32
    torch_mha = nn.MultiheadAttention(32, 4)
    assert sum(p.numel() for p in torch_mha.parameters()) == attention_parameter_count(32)
    x = _rand(2, 5, 32, seed=21)
    heads = mha.split_heads(x)
    assert heads.shape == (2, 4, 5, 8)
    assert torch.equal(heads[1, 2, 3], x[1, 3, 16:24])     # head h holds columns h*d_head .. (h+1)*d_head
    assert torch.equal(mha.merge_heads(heads), x)


def test_multihead_heads_are_independent_sdpa_calls():
    torch.manual_seed(1)
    mha = MultiHeadAttention(12, 3)
    x = _rand(2, 4, 12, seed=22)
    out, w = mha(x, return_weights=True)
    q, k, v = mha.W_q(x), mha.W_k(x), mha.W_v(x)
    per_head = [F.scaled_dot_product_attention(q[..., h * 4:(h + 1) * 4], k[..., h * 4:(h + 1) * 4],
                                               v[..., h * 4:(h + 1) * 4]) for h in range(3)]
    torch.testing.assert_close(out, mha.W_o(torch.cat(per_head, dim=-1)), atol=ATOL, rtol=RTOL)


def test_load_from_torch_refuses_mismatch():
    with pytest.raises(ValueError, match="same sizes"):
        MultiHeadAttention(16, 4).load_from_torch(nn.MultiheadAttention(16, 2))
    with pytest.raises(ValueError, match="bias settings differ"):
        MultiHeadAttention(16, 4, bias=False).load_from_torch(nn.MultiheadAttention(16, 4))
    with pytest.raises(TypeError, match="nn.MultiheadAttention"):
        MultiHeadAttention(16, 4).load_from_torch(nn.Linear(16, 16))


def test_plot_attention_and_explorer():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from course_lib.tools.plots import plot_attention
    from course_lib.tools.widgets import attention_explorer, show_attention

    tokens = [["a", "b", "c"], ["x", "y"]]
    attentions = [torch.softmax(_rand(2, 3, 3, 3, seed=23), -1), torch.softmax(_rand(2, 3, 2, 2, seed=24), -1)]
    ax = plot_attention(attentions[0][1, 2], tokens[0], title="t")
    assert [t.get_text() for t in ax.get_xticklabels()] == tokens[0] and ax.get_title() == "t"
    with pytest.raises(ValueError, match="one row per query token"):
        plot_attention(attentions[0], tokens[0])
    ax = show_attention(attentions, tokens, layer=1, head=2, sentence=1)
    assert ax.get_images()[0].get_array().shape == (2, 2)
    explorer = attention_explorer(attentions, tokens)
    layer, head, sentence = explorer.children[:3]
    assert (layer.max, head.max) == (1, 2)
    layer.value, head.value, sentence.value = 1, 1, 1
    assert explorer.result.get_title() == "layer 1, head 1: sentence 1"
    plt.close("all")


def test_mixed_dtypes_get_one_sentence_not_a_matmul_error():
    with pytest.raises(TypeError) as info:
        scaled_dot_product_attention(_rand(3, 4), _rand(5, 4).double(), _rand(5, 2))
    assert str(info.value) == ("q, k and v must share one dtype, but q is torch.float32, k is torch.float64 and v "
                               "is torch.float32; convert them with k.to(q.dtype) and v.to(q.dtype).")
    with pytest.raises(TypeError, match="must share one dtype"):
        scaled_dot_product_attention(_rand(3, 4), _rand(5, 4), _rand(5, 2).half())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast mixes dtypes on purpose: allowed there
        out, _ = scaled_dot_product_attention(_rand(3, 4), _rand(5, 4).bfloat16(), _rand(5, 2))
    assert out.shape == (3, 2)


# ------------------------------------------------------------------------- the backward pass by hand

def _autograd_backward(q, k, v, d_out, mask=None):
    q, k, v = (t.detach().double().clone().requires_grad_(True) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out.backward(d_out.double())
    return q.grad, k.grad, v.grad


@pytest.mark.parametrize("case", ["plain", "causal", "padding with fully masked rows", "non-square"])
def test_attention_backward_matches_autograd_in_float64(case):
    g = torch.Generator().manual_seed(7)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    mask = None
    if case == "non-square":
        q, k, v, d_out = r(2, 3, 5, 8), r(2, 3, 7, 8), r(2, 3, 7, 4), r(2, 3, 5, 4)
    else:
        q, k, v, d_out = r(2, 3, 6, 8), r(2, 3, 6, 8), r(2, 3, 6, 5), r(2, 3, 6, 5)
    if case == "causal":
        mask = causal_mask(6)
    if case == "padding with fully masked rows":
        m = padding_mask([6, 3], 6)
        mask = (m & m.transpose(-2, -1))[:, None]                     # (2, 1, 6, 6)
    ours = attention_backward(q, k, v, d_out, mask)
    reference = _autograd_backward(q, k, v, d_out, mask)
    for name, a, b in zip(("dQ", "dK", "dV"), ours, reference):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=name)
    if mask is not None:   # a key no query may see gets no gradient
        unseen = ~mask.expand(2, 3, 6, 6).any(dim=-2)
        assert torch.all(ours[1][unseen] == 0) and torch.all(ours[2][unseen] == 0)


def test_multihead_runs_the_attention_it_is_given():
    # notebook 01 runs MultiHeadAttention on the student's attention (exercise 01.3)
    calls = []

    def fused(q, k, v, mask=None):
        calls.append(tuple(q.shape))
        weights = torch.softmax((q @ k.mT / math.sqrt(q.shape[-1])).masked_fill(~mask, -math.inf), -1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), weights

    torch.manual_seed(2)
    default = MultiHeadAttention(16, 4)
    given = MultiHeadAttention(16, 4, attend=fused)
    given.load_state_dict(default.state_dict())
    x = _rand(2, 5, 16, seed=23)
    torch.testing.assert_close(given(x, causal_mask(5)), default(x, causal_mask(5)), atol=ATOL, rtol=RTOL)
    assert calls == [(2, 4, 5, 4)]                       # one call, the heads an axis of the batch
    torch_mha = nn.MultiheadAttention(16, 4, batch_first=True)
    assert MultiHeadAttention.from_torch(torch_mha, attend=fused).attend is fused
    with pytest.raises(TypeError, match="must be an attention function"):
        MultiHeadAttention(16, 4, attend="softmax")
    with pytest.raises(TypeError, match="must return a pair \\(out, weights\\)"):
        MultiHeadAttention(16, 4, attend=lambda q, k, v, mask=None: q)(x)


def test_masks_take_numpy_integers():
    import numpy as np

    assert torch.equal(causal_mask(np.int64(4)), causal_mask(4))
    assert torch.equal(padding_mask(np.array([3, 1]), np.int64(4)), padding_mask([3, 1], 4))
    with pytest.raises(ValueError, match="positive int"):
        causal_mask(np.float64(4.0))
