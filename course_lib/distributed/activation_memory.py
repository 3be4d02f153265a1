"""Activation memory per transformer layer: Korthikanti et al.'s count, a measurement, and recomputation.

Explained in notebooks/11_model_parallelism.ipynb, part 4. The measurement is lesson 03's
(``course_lib.parts.model.saved_activation_bytes``: every tensor autograd packs for the backward pass).

Korthikanti et al. 2022 (Sec. 4.1, Eq. 1) count what one layer keeps for its backward pass in 16-bit,
with 1-byte dropout masks; s = sequence length, b = micro-batch, h = hidden size, a = heads:

    attention     11·sbh + 5·as²b   QKV input 2sbh; Q and K 4sbh; softmax output 2as²b; its dropout mask
                                    as²b; the dropped-out weights 2as²b; V 2sbh; W_o input 2sbh; mask sbh
    MLP           19·sbh            input 2sbh; GeLU input 8sbh; GeLU output 8sbh; dropout mask sbh
    2 LayerNorms   4·sbh            their inputs
    layer         sbh·(34 + 5·a·s/h)

With t-way tensor parallelism the split parts shrink by t but the LayerNorms, the dropouts and the block
inputs stay whole: sbh·(10 + 24/t + 5as/(ht)) (Eq. 2); sequence parallelism splits those too:
sbh·(34/t + 5as/(ht)) (Eq. 4). Recomputing the attention core ("selective") drops the 5as/(ht) term;
recomputing the whole layer keeps only its input, 2sbh (Table 2) -- at the price of a second forward
pass of the layer during the backward pass.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from course_lib.parts.model import Block, CausalSelfAttention, GPT, GPTConfig
from course_lib.tools.timing import seconds_of

__all__ = ["korthikanti_bytes", "ByteMaskDropout", "MegatronAttention", "paper_layer", "recompute",
           "Checkpointed", "checkpoint_blocks", "step_seconds"]

RECOMPUTE = ("none", "selective", "full")


def korthikanti_bytes(s: int, b: int, h: int, a: int, *, t: int = 1, sequence_parallel: bool = False,
                      recompute: str = "none") -> float:
    """Activation bytes one transformer layer keeps for its backward pass (Korthikanti et al. 2022, Table 2)."""
    for name, value in (("s", s), ("b", b), ("h", h), ("a", a), ("t", t)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}.")
    if recompute == "full":
        return 2.0 * s * b * h
    core = 0.0 if recompute == "selective" else 5 * a * s / (h * t)   # the a·s² terms of attention
    linear = 34 / t if sequence_parallel else 10 + 24 / t
    return s * b * h * (linear + core)


class ByteMaskDropout(nn.Module):
    """Dropout that keeps a 1-byte (bool) mask for the backward pass, as fused GPU kernels do.

    (PyTorch's CPU dropout keeps its mask in the activations' dtype: 2 bytes in bf16.)
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape, device=x.device) >= self.p
        return x * keep / (1 - self.p)      # autograd saves `keep`, a bool tensor


class MegatronAttention(CausalSelfAttention):
    """The course's attention computed the way Korthikanti et al. count it: the softmax output is kept
    (no flash attention) and dropped out with a 1-byte mask before it multiplies V."""

    def forward(self, x: torch.Tensor, kv_cache: Any = None, layer: int = 0) -> torch.Tensor:
        if kv_cache is not None:
            raise ValueError("MegatronAttention measures training memory; it has no KV cache for generation.")
        B, T, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (t.view(B, T, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d // self.n_head))
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        weights = self.attn_dropout(torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1))
        y = (weights @ v).transpose(1, 2).reshape(B, T, d)
        return self.resid_dropout(self.proj(y))


def paper_layer(config: GPTConfig) -> Block:
    """A :class:`~course_lib.parts.model.Block` with the choices the paper's count assumes.

    Its LayerNorms are the model's (the fused kernel keeps the input and two small per-token statistics,
    as the paper counts), its attention is :class:`MegatronAttention`, and its dropouts keep 1-byte masks.
    ``config.dropout`` must be > 0.
    """
    if not config.dropout > 0:
        raise ValueError("the paper's count includes dropout masks: build the config with dropout > 0.")
    block = Block(config)
    block.attn.__class__ = MegatronAttention
    block.attn.attn_dropout = ByteMaskDropout(config.dropout)
    block.attn.resid_dropout = ByteMaskDropout(config.dropout)
    block.mlp.dropout = ByteMaskDropout(config.dropout)
    return block


# ------------------------------------------------------------------------------------------------
# Full recomputation ("activation checkpointing"), written out
# ------------------------------------------------------------------------------------------------


class _Recompute(torch.autograd.Function):
    """Keep only the module's input; run the module again during the backward pass."""

    @staticmethod
    def forward(ctx: Any, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        ctx.module = module
        ctx.cpu_rng = torch.get_rng_state()   # so that dropout draws the same masks the second time
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        ctx.save_for_backward(x)               # the one activation this layer keeps
        with torch.no_grad():
            return module(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        (x,) = ctx.saved_tensors
        x = x.detach().requires_grad_()
        devices = [x.device] if x.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
            with torch.enable_grad():
                y = ctx.module(x)               # the forward pass again, this time keeping everything
        torch.autograd.backward(y, grad)        # the module's parameters get their .grad here
        return None, x.grad


def recompute(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, keeping only ``x`` for the backward pass (the input must require grad)."""
    return _Recompute.apply(module, x)


class Checkpointed(nn.Module):
    """A block that is recomputed in the backward pass (while training) instead of storing its activations."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, *cache: Any) -> torch.Tensor:
        if self.training and torch.is_grad_enabled() and x.requires_grad and not cache:
            return recompute(self.block, x)
        return self.block(x, *cache)   # generation with a KV cache: nothing to recompute


def checkpoint_blocks(model: GPT) -> GPT:
    """Wrap every block of ``model`` in :class:`Checkpointed`, in place; returns ``model``."""
    model.blocks = nn.ModuleList(b if isinstance(b, Checkpointed) else Checkpointed(b) for b in model.blocks)
    return model


def step_seconds(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor, repeats: int = 3) -> dict[str, Any]:
    """Fastest of ``repeats`` forward passes without gradients, and of forward + backward passes, in seconds.

    ``"forward_all"`` and ``"forward_backward_all"`` hold every repeat, to judge how noisy the timing was.
    """
    device = next(model.parameters()).device

    def timed(fn: Any) -> list[float]:
        return seconds_of(fn, repeats=repeats, warmup=0, device=device)

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        model(idx, targets)[1].backward()

    with torch.no_grad():
        forward = timed(lambda: model(idx, targets))
    forward_backward = timed(train_step)
    return {"forward": min(forward), "forward_backward": min(forward_backward),
            "forward_all": forward, "forward_backward_all": forward_backward}
