"""Scaled dot-product attention and multi-head attention, written to mirror the math.

Explained in notebooks/01_attention.ipynb. With queries Q (T_q × d_k), keys K (T_k × d_k) and values
V (T_k × d_v),

    A = softmax(Q Kᵀ / √d_k)          (T_q × T_k, each row sums to 1 over the keys)
    out = A V                         (T_q × d_v)

Any leading dimensions (batch, heads) are carried along unchanged.

Masks (one convention throughout the course): a **boolean** tensor broadcastable to (..., T_q, T_k)
in which **True means "this query may attend to this key"**. PyTorch's
``F.scaled_dot_product_attention`` uses the same convention for boolean ``attn_mask``;
``nn.MultiheadAttention`` uses the opposite one (True = blocked), so pass it ``~mask``.

A query whose whole row is masked (for example a padding position when padded queries are masked
as well) has nothing to attend to. Here such a row gets **all-zero weights and an all-zero output**,
never NaN, and its gradient is zero too. (Recent PyTorch versions do the same in
``F.scaled_dot_product_attention``.)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["scaled_dot_product_attention", "attention_backward", "causal_mask", "padding_mask",
           "MultiHeadAttention", "attention_parameter_count"]


def _require_float_tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, but it is a {type(x).__name__}; "
                        f"convert it with torch.as_tensor({name}, dtype=torch.float32).")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, but its dtype is {x.dtype}; "
                        f"convert it with {name}.float().")
    if x.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (..., T, d), but it has shape "
                         f"{tuple(x.shape)}; add a sequence axis with {name}.unsqueeze(0).")
    return x


def _check_mask(mask: object, scores_shape: torch.Size) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor (True = may attend), but it is a "
                        f"{type(mask).__name__}.")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool (True = may attend), but it has dtype "
                        f"{mask.dtype}; for a 0/1 mask use mask.bool(), for an additive 0/-inf mask "
                        f"use mask == 0.")
    try:
        shape = torch.broadcast_shapes(mask.shape, scores_shape)
    except RuntimeError:
        shape = None
    if shape != scores_shape:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to the attention "
                         f"scores' shape {tuple(scores_shape)} (..., T_q, T_k); give it shape "
                         f"(T_q, T_k), (batch, T_q, T_k) or insert size-1 axes where it is shared.")
    return mask


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q Kᵀ / √d_k) V, returning ``(out, weights)``.

    Args:
        q: queries, shape (..., T_q, d_k).
        k: keys, shape (..., T_k, d_k).
        v: values, shape (..., T_k, d_v).
        mask: optional bool tensor broadcastable to (..., T_q, T_k); True = may attend.

    Returns:
        out of shape (..., T_q, d_v) and weights of shape (..., T_q, T_k). Rows of ``weights`` sum to 1,
        except rows whose every key is masked: those are all zero, and so is their output.
    """
    q, k, v = (_require_float_tensor(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v")))
    if len({q.dtype, k.dtype, v.dtype}) > 1 and not torch.is_autocast_enabled(q.device.type):
        raise TypeError(f"q, k and v must share one dtype, but q is {q.dtype}, k is {k.dtype} and v is "
                        f"{v.dtype}; convert them with k.to(q.dtype) and v.to(q.dtype).")
    d_k = q.shape[-1]
    if k.shape[-1] != d_k:
        raise ValueError(f"q and k must have the same last dimension d_k, but q has {d_k} and k has "
                         f"{k.shape[-1]} (q {tuple(q.shape)}, k {tuple(k.shape)}).")
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"k and v must have the same number of positions T_k (second-to-last axis), "
                         f"but k has {k.shape[-2]} and v has {v.shape[-2]} (k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}).")
    try:
        lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except RuntimeError:
        raise ValueError(f"the leading (batch/head) dimensions of q {tuple(q.shape[:-2])}, k "
                         f"{tuple(k.shape[:-2])} and v {tuple(v.shape[:-2])} do not broadcast; give "
                         f"them the same batch and head sizes.") from None

    scores = q @ k.transpose(-2, -1) / math.sqrt(d_k)          # (..., T_q, T_k)
    scores = scores.expand(*lead, *scores.shape[-2:])
    if mask is None:
        weights = torch.softmax(scores, dim=-1)
        return weights @ v, weights

    mask = _check_mask(mask, scores.shape)
    scores = scores.masked_fill(~mask, float("-inf"))
    has_key = mask.any(dim=-1, keepdim=True)                   # rows with at least one allowed key
    # A fully masked row would be softmax(-inf, ..., -inf) = 0/0 = NaN. Give it finite scores so the
    # softmax (and its gradient) stay finite, then zero its weights explicitly.
    scores = scores.masked_fill(~has_key, 0.0)
    weights = torch.softmax(scores, dim=-1).masked_fill(~has_key, 0.0)
    return weights @ v, weights


def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, d_out: torch.Tensor,
                       mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward pass of ``out = softmax(Q Kᵀ/√d_k) V`` by hand: ``(dQ, dK, dV)`` given ``dOut``.

    Derived in notebooks/01_attention.ipynb (exercise 01.4). With S = Q Kᵀ/√d_k, A = softmax(S) row by
    row (masked keys get A = 0) and O = A V:

        dV = Aᵀ dO                          each value row collects the weight every query gave it
        dA = dO Vᵀ
        dS = A ⊙ (dA − rowsum(dA ⊙ A))      the softmax Jacobian diag(a) − a aᵀ, applied row by row
        dQ = dS K / √d_k,   dK = dSᵀ Q / √d_k

    Masked entries have A = 0, so dS = 0 there: no gradient flows to a key a query could not see.
    Leading (batch, head) axes are carried along; tests/test_attention.py compares with autograd.
    """
    _, A = scaled_dot_product_attention(q, k, v, mask)
    d_out = _require_float_tensor(d_out, "d_out")
    scale = 1.0 / math.sqrt(q.shape[-1])
    dV = A.transpose(-2, -1) @ d_out
    dA = d_out @ v.transpose(-2, -1)
    dS = A * (dA - (dA * A).sum(dim=-1, keepdim=True))
    return dS @ k * scale, dS.transpose(-2, -1) @ q * scale, dV


def _positive_int(T: object, what: str) -> int:
    # NumPy integers (np.int64 from an array's shape or len) are ints too
    if isinstance(T, bool) or not isinstance(T, numbers.Integral) or T < 1:
        raise ValueError(f"T must be a positive int ({what}), but it is {T!r}.")
    return int(T)


def causal_mask(T: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The (T, T) bool mask in which query i may attend to keys 0..i: lower-triangular True."""
    T = _positive_int(T, "the sequence length")
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def padding_mask(lengths: Sequence[int] | torch.Tensor, T: int,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Key-padding mask of shape (B, 1, T): True for the first ``lengths[b]`` positions of sequence b.

    It broadcasts over the queries, so every query may attend to the real tokens only. To also mask
    the padded *queries* (their rows then become fully masked: zero weights, zero output), combine
    it with its transpose: ``m = padding_mask(lengths, T); m & m.transpose(-2, -1)`` → (B, T, T).
    """
    lengths = torch.as_tensor(lengths, device=device)
    if lengths.dim() != 1 or lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be a 1-D sequence of ints (one length per sequence), but it "
                         f"has shape {tuple(lengths.shape)} and dtype {lengths.dtype}.")
    T = _positive_int(T, "the padded sequence length")
    if len(lengths) and (lengths.min() < 0 or lengths.max() > T):
        raise ValueError(f"every length must lie in 0..T={T}, but lengths are {lengths.tolist()}.")
    positions = torch.arange(T, device=lengths.device)
    return (positions[None, :] < lengths[:, None])[:, None, :]


def attention_parameter_count(d_model: int, bias: bool = True) -> int:
    """Parameters of the four projections W_q, W_k, W_v, W_o: 4·d² (+ 4·d biases)."""
    return 4 * d_model * d_model + (4 * d_model if bias else 0)


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention: project, split into heads, attend, merge heads, project.

    With d_head = d_model / n_head, for x of shape (B, T, d_model):

        Q, K, V = x W_qᵀ, x W_kᵀ, x W_vᵀ                         (B, T, d_model)
        split:  (B, T, d_model) → (B, T, n_head, d_head) → (B, n_head, T, d_head)
        attend: scaled_dot_product_attention per head             (B, n_head, T, d_head)
        merge:  (B, n_head, T, d_head) → (B, T, n_head, d_head) → (B, T, d_model)
        out = merged W_oᵀ

    Splitting and merging are only reshapes: no parameters, no arithmetic.

    ``attend`` is the attention the heads run, ``attend(q, k, v, mask) -> (out, weights)`` on tensors of
    shape (B, n_head, T, d_head); by default :func:`scaled_dot_product_attention`. Notebook 01 passes the
    student's own attention (exercise 01.3) here, so that the module runs on their code.
    """

    def __init__(self, d_model: int, n_head: int, bias: bool = True,
                 attend: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        super().__init__()
        if d_model < 1 or n_head < 1 or d_model % n_head:
            raise ValueError(f"d_model ({d_model}) must be a positive multiple of n_head ({n_head}) so "
                             f"that every head gets d_model / n_head dimensions.")
        if attend is not None and not callable(attend):
            raise TypeError(f"attend must be an attention function attend(q, k, v, mask) -> (out, weights), "
                            f"but it is a {type(attend).__name__}.")
        self.attend = attend or scaled_dot_product_attention
        self.d_model, self.n_head, self.d_head = d_model, n_head, d_model // n_head
        self.W_q = nn.Linear(d_model, d_model, bias=bias)
        self.W_k = nn.Linear(d_model, d_model, bias=bias)
        self.W_v = nn.Linear(d_model, d_model, bias=bias)
        self.W_o = nn.Linear(d_model, d_model, bias=bias)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d_model) → (B, n_head, T, d_head)."""
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, self.d_head).transpose(1, 2)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n_head, T, d_head) → (B, T, d_model)."""
        B, _, T, _ = x.shape
        return x.transpose(1, 2).reshape(B, T, self.d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                return_weights: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Self-attention over x of shape (B, T, d_model).

        ``mask`` is bool, True = may attend, broadcastable to (B, T, T) -- e.g. ``causal_mask(T)`` of
        shape (T, T) or ``padding_mask(lengths, T)`` of shape (B, 1, T); it is shared by all heads.
        Returns the output (B, T, d_model), and with ``return_weights=True`` also the per-head
        weights (B, n_head, T, T).
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (batch, T, d_model={self.d_model}), but it has "
                             f"shape {shape}; add a batch axis with x.unsqueeze(0) if needed.")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() > 3:
                shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"mask must be a bool tensor broadcastable to (B, T, T), but it has "
                                 f"shape {shape}; the same mask is applied to every head.")
            mask = mask.unsqueeze(-3)                                # a size-1 head axis
        q = self.split_heads(self.W_q(x))
        k = self.split_heads(self.W_k(x))
        v = self.split_heads(self.W_v(x))
        result = self.attend(q, k, v, mask)
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            raise TypeError(f"the attention function {getattr(self.attend, '__name__', self.attend)!r} must "
                            f"return a pair (out, weights), but it returned a {type(result).__name__}.")
        heads, weights = result
        out = self.W_o(self.merge_heads(heads))
        return (out, weights) if return_weights else out

    @torch.no_grad()
    def load_from_torch(self, reference: nn.MultiheadAttention) -> MultiHeadAttention:
        """Copy the weights of a ``torch.nn.MultiheadAttention`` (same d_model, n_head and bias).

        PyTorch stores W_q, W_k, W_v stacked in one ``in_proj_weight`` of shape (3·d_model, d_model),
        in that order, and W_o as ``out_proj``. Returns ``self``.
        """
        if not isinstance(reference, nn.MultiheadAttention):
            raise TypeError(f"reference must be a torch.nn.MultiheadAttention, not "
                            f"{type(reference).__name__}.")
        if (reference.embed_dim, reference.num_heads) != (self.d_model, self.n_head):
            raise ValueError(f"reference has embed_dim={reference.embed_dim}, num_heads="
                             f"{reference.num_heads}, but this module has d_model={self.d_model}, "
                             f"n_head={self.n_head}; build both with the same sizes.")
        if reference.in_proj_weight is None:
            raise ValueError("reference uses separate kdim/vdim projections; build it with "
                             "kdim = vdim = embed_dim.")
        has_bias = reference.in_proj_bias is not None
        if has_bias != (self.W_q.bias is not None) or reference.bias_k is not None:
            raise ValueError(f"bias settings differ: build both with bias={self.W_q.bias is not None} "
                             f"and add_bias_kv=False.")
        for name, w in zip(("W_q", "W_k", "W_v"), reference.in_proj_weight.chunk(3, dim=0)):
            getattr(self, name).weight.copy_(w)
        self.W_o.weight.copy_(reference.out_proj.weight)
        if has_bias:
            for name, b in zip(("W_q", "W_k", "W_v"), reference.in_proj_bias.chunk(3, dim=0)):
                getattr(self, name).bias.copy_(b)
            self.W_o.bias.copy_(reference.out_proj.bias)
        return self

    @classmethod
    def from_torch(cls, reference: nn.MultiheadAttention,
                   attend: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None) -> MultiHeadAttention:
        """A new module holding the weights of ``reference`` (see :meth:`load_from_torch`)."""
        module = cls(reference.embed_dim, reference.num_heads, bias=reference.in_proj_bias is not None,
                     attend=attend)
        module = module.to(device=reference.out_proj.weight.device, dtype=reference.out_proj.weight.dtype)
        return module.load_from_torch(reference)
