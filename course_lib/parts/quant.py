"""Block-wise 4-bit NormalFloat (NF4) quantisation and QLoRA layers, from scratch.

Explained in notebooks/08_peft_family.ipynb ("QLoRA: LoRA on a 4-bit base").

QLoRA (Dettmers et al. 2023) freezes the pretrained weights in 4 bits and trains LoRA matrices in full
precision on top of them; the 4-bit weights are de-quantised on the fly in every forward pass.

* :data:`NF4_CODEBOOK`: the 16 NormalFloat levels q_0 < ... < q_15, quantiles of N(0, 1) rescaled to
  [-1, 1], with exactly -1, 0 and 1 among them (:func:`nf4_codebook` builds them as ``bitsandbytes`` does).
* :func:`quantize_nf4` / :func:`dequantize_nf4`: split the weights (flattened, row-major) into blocks of
  ``block_size`` numbers, scale each block by its absolute maximum s_b = max |w| so that it lies in
  [-1, 1], and store for every number the index of the nearest level (a code 0..15). De-quantising gives
  w_hat = q_code * s_b. Codes are returned *unpacked* (one ``torch.uint8`` per weight, shape of ``w``);
  :func:`pack_nibbles` stores two per byte, high nibble first, as ``bitsandbytes`` does.
* Double quantisation (``double_quant=True``): the block constants s_b themselves are stored in 8 bits
  (the dynamic 8-bit code of ``bitsandbytes``, :data:`DYNAMIC_CODEBOOK`) in blocks of 256, after
  subtracting their mean. Bits per weight: 4 + 32/64 = 4.5 without it, 4 + 8/64 + 32/(64*256) ~ 4.127 with it.
* :func:`quantize_uniform`: symmetric block-wise absmax int4 (levels -7..7) and int8 (-127..127), for
  comparing errors.
* :class:`NF4Linear` (a frozen 4-bit linear layer) and :class:`QLoRALinear` (NF4 base + LoRA branch);
  :func:`quantize_linears` and :func:`apply_qlora` put them into a model.

Verified code for code against ``bitsandbytes.functional.quantize_4bit`` (tests/test_quant.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "nf4_codebook", "NF4_CODEBOOK", "dynamic_codebook", "DYNAMIC_CODEBOOK", "uniform_codebook",
    "quantize_nf4", "dequantize_nf4", "QuantizedAbsmax", "pack_nibbles", "unpack_nibbles",
    "quantize_uniform", "bits_per_parameter", "NF4Linear", "QLoRALinear", "quantize_linears", "apply_qlora",
]

NF4_OFFSET = 0.9677083  # bitsandbytes' outermost quantile (its create_normal_map default)


# ----------------------------------------------------------------------------------------------
# Codebooks
# ----------------------------------------------------------------------------------------------


def nf4_codebook(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 levels, ascending, in float32: normal quantiles normalised to [-1, 1].

    The positive side takes 8 quantiles Phi^-1(p) at p evenly spaced from ``offset`` down to 1/2 (the last,
    p = 1/2, dropped: it is 0), the negative side 7 (one fewer, so that 0 is a level exactly); the 15 values
    and 0 are divided by the largest, so the ends are exactly -1 and 1 (Dettmers et al. 2023, Sec. 3).
    ``offset`` < 1 because Phi^-1(1) is infinite. Computed the way bitsandbytes' ``create_normal_map``
    does (float32 grid of p, float64 quantiles, float32 result), so the levels agree bit for bit.
    """
    from scipy.stats import norm

    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not 0.5 < offset < 1:
        raise ValueError(f"offset is a probability between 0.5 and 1 (bitsandbytes uses {NF4_OFFSET}), got {offset!r}.")
    positive = norm.ppf(torch.linspace(offset, 0.5, 9)[:-1].numpy()).tolist()
    negative = (-norm.ppf(torch.linspace(offset, 0.5, 8)[:-1].numpy())).tolist()
    levels = torch.tensor(positive + [0.0] + negative, dtype=torch.float32).sort().values
    return levels / levels.max()


NF4_CODEBOOK: torch.Tensor = nf4_codebook()


def dynamic_codebook() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit code (Dettmers 2015), the 256 levels double quantisation uses.

    For exponent i = 0..6 it holds 2^i evenly spaced fractions in [0.1, 1] (midpoints of a grid),
    scaled by 10^(i-6), with both signs; plus 0 and 1: 2 * 127 + 2 = 256 levels in [-1, 1], dense near
    zero, sparse near one (a float-like grid). Same arithmetic as bitsandbytes' ``create_dynamic_map``.
    """
    levels: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        middles = (edges[:-1] + edges[1:]) / 2.0
        levels += (10 ** (i - 6) * middles).tolist() + (-(10 ** (i - 6)) * middles).tolist()
    return torch.tensor(sorted(levels + [0.0, 1.0]), dtype=torch.float32)


DYNAMIC_CODEBOOK: torch.Tensor = dynamic_codebook()


def uniform_codebook(bits: int) -> torch.Tensor:
    """Symmetric uniform levels k / (2^(bits-1) - 1) for k = -(2^(bits-1) - 1) ... 2^(bits-1) - 1.

    int4: 15 levels -7/7 ... 7/7 (one of the 16 codes is unused, so that 0 is exact and the grid is
    symmetric); int8: 255 levels.
    """
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8, got {bits!r}.")
    top = 2 ** (bits - 1) - 1
    return torch.arange(-top, top + 1, dtype=torch.float32) / top


# ----------------------------------------------------------------------------------------------
# Block-wise absmax quantisation onto a codebook
# ----------------------------------------------------------------------------------------------


def _check_weights(w: object, block_size: object) -> torch.Tensor:
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"w must be a floating-point torch.Tensor (a weight matrix), got "
                        f"{type(w).__name__ if not isinstance(w, torch.Tensor) else w.dtype}.")
    if w.numel() == 0:
        raise ValueError("w is empty: there is nothing to quantise.")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an integer >= 2 (QLoRA uses 64), got {block_size!r}.")
    if not torch.isfinite(w).all():
        raise ValueError("w contains inf or nan: absmax scaling needs finite weights.")
    return w


def _blocks(w: torch.Tensor, block_size: int) -> tuple[torch.Tensor, int]:
    """The weights flattened (row-major) in float32 and cut into blocks (n_blocks, block_size); the last
    block is padded with zeros (they never change its absmax, and their codes are dropped)."""
    flat = w.detach().reshape(-1).float()
    pad = (-flat.numel()) % block_size
    return F.pad(flat, (0, pad)).reshape(-1, block_size), pad


def _nearest(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level for every x in [-1, 1]; exactly half-way goes to the lower level.

    The decision thresholds are the midpoints between neighbouring levels; the code is how many
    thresholds lie strictly below x (the rule bitsandbytes' ``torch.bucketize`` applies)."""
    midpoints = (codebook[:-1] + codebook[1:]) / 2
    return torch.searchsorted(midpoints, x.contiguous(), right=False).to(torch.uint8)


def _absmax_scale(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax s_b per block, blocks / s_b clamped to [-1, 1]). Multiplies by the reciprocal 1/s_b, as
    bitsandbytes does (x * (1/s) and x / s can differ in the last bit, which moves a code at a midpoint);
    an all-zero block keeps s_b = 0 and scales by 1/1e-38 (its codes all point to the level 0)."""
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1)
    return absmax, scaled


class QuantizedAbsmax(NamedTuple):
    """Double-quantised block constants: s_b ~ DYNAMIC_CODEBOOK[codes] * scale_g + offset.

    ``codes`` (uint8, one per 4-bit block), ``scale`` (float32, one per group of ``group_size`` constants)
    and ``offset`` (the mean of the constants, a float32 scalar tensor)."""

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    group_size: int

    def dequantize(self) -> torch.Tensor:
        values = DYNAMIC_CODEBOOK[self.codes.long()]
        n = values.numel()
        pad = (-n) % self.group_size
        values = F.pad(values, (0, pad)).reshape(-1, self.group_size) * self.scale.unsqueeze(1)
        return values.reshape(-1)[:n] + self.offset


def quantize_absmax(absmax: torch.Tensor, group_size: int = 256) -> QuantizedAbsmax:
    """Double quantisation (Dettmers et al. 2023, Sec. 3): the constants minus their mean, block-wise absmax
    scaled in groups of ``group_size`` and stored as 8-bit codes of :data:`DYNAMIC_CODEBOOK`."""
    offset = absmax.float().mean()
    blocks, _ = _blocks(absmax - offset, group_size)
    scale, scaled = _absmax_scale(blocks)
    codes = _nearest(scaled.reshape(-1), DYNAMIC_CODEBOOK)[: absmax.numel()]
    return QuantizedAbsmax(codes, scale, offset, group_size)


def quantize_nf4(w: torch.Tensor, block_size: int = 64, *, double_quant: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | QuantizedAbsmax]:
    """NF4-quantise ``w`` block by block: returns ``(codes, absmax)``.

    ``codes``: torch.uint8 of the shape of ``w``, one code 0..15 per weight (unpacked; see
    :func:`pack_nibbles`), indices into :data:`NF4_CODEBOOK`. ``absmax``: float32, one s_b per block of
    ``block_size`` consecutive weights of the flattened (row-major) tensor; with ``double_quant=True`` a
    :class:`QuantizedAbsmax` instead (the codes are the same either way).
    """
    _check_weights(w, block_size)
    blocks, pad = _blocks(w, block_size)
    absmax, scaled = _absmax_scale(blocks)
    codes = _nearest(scaled.reshape(-1), NF4_CODEBOOK)
    codes = codes[: codes.numel() - pad].reshape(w.shape)
    return codes, (quantize_absmax(absmax) if double_quant else absmax)


def dequantize_nf4(codes: torch.Tensor, absmax: torch.Tensor | QuantizedAbsmax, shape: Sequence[int] | None = None,
                   block_size: int = 64, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w_hat = NF4_CODEBOOK[code] * s_b, reshaped to ``shape`` (default: the shape of ``codes``)."""
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        raise TypeError("codes must be the torch.uint8 tensor quantize_nf4 returned (unpacked, one code per weight).")
    _check_codes(codes, "dequantize_nf4")
    if isinstance(absmax, QuantizedAbsmax):
        absmax = absmax.dequantize()
    shape = tuple(codes.shape) if shape is None else tuple(shape)
    n = codes.numel()
    if math.prod(shape) != n:
        raise ValueError(f"shape {shape} holds {math.prod(shape)} numbers but there are {n} codes.")
    if absmax.numel() != math.ceil(n / block_size):
        raise ValueError(f"{n} codes in blocks of {block_size} need {math.ceil(n / block_size)} absmax values, "
                         f"got {absmax.numel()}: was it quantised with another block_size?")
    return _dequantize(codes, absmax, shape, block_size, dtype)


def _dequantize(codes: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...], block_size: int,
                dtype: torch.dtype) -> torch.Tensor:
    """:func:`dequantize_nf4` without its checks, for :class:`NF4Linear`'s every forward pass (its codes come
    from its own packed bytes; checking their range would wait for the GPU each time)."""
    n = codes.numel()
    values = NF4_CODEBOOK.to(codes.device)[codes.reshape(-1).long()]
    pad = (-n) % block_size
    values = F.pad(values, (0, pad)).reshape(-1, block_size) * absmax.float().reshape(-1, 1)
    return values.reshape(-1)[:n].reshape(shape).to(dtype)


def _check_codes(codes: object, what: str) -> torch.Tensor:
    """4-bit codes must be torch.uint8 in 0..15: a larger value would spill into the neighbouring nibble
    when packed, or index past the 16 levels when de-quantised."""
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        raise TypeError(f"{what} takes the torch.uint8 codes quantize_nf4 returned (unpacked, one code per weight), "
                        f"got {codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__}.")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"{what} takes 4-bit codes 0..15, but one code is {int(codes.max())}: are these packed "
                         f"bytes? unpack_nibbles(packed, n) gives the codes.")
    return codes


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the first in the high nibble (bitsandbytes' layout); odd counts get a
    zero code appended. Returns a flat torch.uint8 tensor of ceil(n/2) bytes."""
    flat = _check_codes(codes, "pack_nibbles").reshape(-1)
    if flat.numel() % 2:
        flat = F.pad(flat, (0, 1))
    return (flat[0::2] << 4) | flat[1::2]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of :func:`pack_nibbles`: the first ``n`` codes, flat, torch.uint8."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError("unpack_nibbles takes the torch.uint8 bytes pack_nibbles returned.")
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 2 * packed.numel():
        raise ValueError(f"{packed.numel()} packed bytes hold at most {2 * packed.numel()} codes, but n is {n!r}.")
    packed = packed.reshape(-1)
    return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n]


def quantize_uniform(w: torch.Tensor, bits: int = 4, block_size: int = 64) -> torch.Tensor:
    """Round-trip ``w`` through symmetric block-wise absmax quantisation with ``bits`` bits (int4: levels
    -7..7, int8: -127..127, each times s_b / (2^(bits-1) - 1)); returns the de-quantised weights."""
    _check_weights(w, block_size)
    codebook = uniform_codebook(bits)
    blocks, pad = _blocks(w, block_size)
    absmax, scaled = _absmax_scale(blocks)
    values = codebook[_nearest(scaled.reshape(-1), codebook).long()].reshape(blocks.shape) * absmax.unsqueeze(1)
    return values.reshape(-1)[: w.numel()].reshape(w.shape).to(w.dtype)


def bits_per_parameter(block_size: int = 64, double_quant: bool = False, group_size: int = 256) -> float:
    """Storage per weight: 4 bits of code plus the block constants (32 bits per block, or with double
    quantisation 8 bits per block plus 32 bits per group of ``group_size`` blocks)."""
    if double_quant:
        return 4 + 8 / block_size + 32 / (block_size * group_size)
    return 4 + 32 / block_size


# ----------------------------------------------------------------------------------------------
# Layers: a frozen NF4 linear layer, and LoRA on top of it (QLoRA)
# ----------------------------------------------------------------------------------------------


class NF4Linear(nn.Module):
    """A frozen linear layer stored in NF4: y = dequant(codes, s) x + b, de-quantised on every call.

    Holds the codes packed two per byte (``packed``, out*in/2 bytes) and the block constants as buffers,
    the bias (frozen) as a parameter. Built from an ``nn.Linear`` by :meth:`from_linear`.
    """

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, bias: torch.Tensor | None,
                 in_features: int, out_features: int, block_size: int = 64) -> None:
        super().__init__()
        self.in_features, self.out_features, self.block_size = in_features, out_features, block_size
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", absmax)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, layer: nn.Linear, block_size: int = 64) -> NF4Linear:
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"NF4Linear.from_linear quantises an nn.Linear, got a {type(layer).__name__}.")
        codes, absmax = quantize_nf4(layer.weight, block_size)
        return cls(pack_nibbles(codes), absmax, layer.bias, layer.in_features, layer.out_features, block_size)

    def dequantized_weight(self) -> torch.Tensor:
        n = self.in_features * self.out_features
        codes = unpack_nibbles(self.packed, n)
        return _dequantize(codes, self.absmax, (self.out_features, self.in_features), self.block_size, torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FrozenNF4Matmul.apply(x, self) + (self.bias if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, block_size={self.block_size}"


class _FrozenNF4Matmul(torch.autograd.Function):
    """y = x W^T with W de-quantised from NF4, saving nothing for the backward pass: W is frozen, so only
    dL/dx = dL/dy W is needed, and W is de-quantised once more there (as bitsandbytes' 4-bit matmul does).
    ``F.linear`` would keep the de-quantised float32 W alive until the backward pass instead."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:
        ctx.layer = layer
        return x @ layer.dequantized_weight().to(x.dtype).T

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ ctx.layer.dequantized_weight().to(grad.dtype), None


class QLoRALinear(nn.Module):
    """QLoRA's layer (Dettmers et al. 2023, Eq. 5, with full-precision LoRA): h = dequant(W_nf4) x + b +
    (alpha/r) B A x. The NF4 base is frozen; lora_A (r, in) starts kaiming-uniform (a = sqrt 5) and
    lora_B (out, r) at zero, exactly like :class:`course_lib.parts.lora.LoRALinear`."""

    def __init__(self, base: NF4Linear, r: int, alpha: float) -> None:
        super().__init__()
        if not isinstance(base, NF4Linear):
            raise TypeError(f"QLoRALinear wraps an NF4Linear (quantise the layer first), got {type(base).__name__}.")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1 or not alpha > 0:
            raise ValueError(f"need an integer rank r >= 1 and alpha > 0, got r={r!r}, alpha={alpha!r}.")
        self.base, self.r, self.alpha, self.scaling = base, r, alpha, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def quantize_linears(model: nn.Module, skip: Sequence[str] = ("head",), block_size: int = 64) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` by an :class:`NF4Linear`, except those named in ``skip``
    (peft's matching rule: the name equals it or ends with "." + it); freezes the whole model. In place."""
    for p in model.parameters():
        p.requires_grad_(False)
    replaced = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not _matches(name, skip):
            _set_child(model, name, NF4Linear.from_linear(module, block_size))
            replaced += 1
    if not replaced:
        raise ValueError("the model has no nn.Linear layers outside `skip` to quantise.")
    return model


def apply_qlora(model: nn.Module, target_modules: Sequence[str], r: int, alpha: float,
                trainable_extra: Sequence[str] = ("head",), block_size: int = 64) -> nn.Module:
    """QLoRA from scratch: every linear layer except ``trainable_extra`` goes to NF4 and is frozen; the
    ones matching ``target_modules`` get a LoRA branch; ``trainable_extra`` (a new head) stays trainable
    in full precision. In place; returns ``model``."""
    quantize_linears(model, skip=trainable_extra, block_size=block_size)
    matched = [n for n, m in model.named_modules() if isinstance(m, NF4Linear) and _matches(n, target_modules)]
    if not matched:
        raise ValueError(f"no linear layer matches target_modules={list(target_modules)}.")
    for name in matched:
        _set_child(model, name, QLoRALinear(model.get_submodule(name), r, alpha))
    for name, module in model.named_modules():
        if _matches(name, trainable_extra):
            for p in module.parameters():
                p.requires_grad_(True)
    return model
