"""Where a token is: sinusoidal and rotary position encodings.

Explained in notebooks/03_transformer_block.ipynb ("Positions"). Attention by itself does not know
the order of its inputs (permuting the tokens permutes its outputs the same way), so a language model
adds position information in one of these ways (all options of ``course_lib.parts.model.GPTConfig``):

* ``"learned"``: a trained table P of shape (context, d) added to the token embeddings (GPT-2). It has
  no row for a position past ``context``, so such a model cannot even be run on longer inputs.
* ``"sinusoidal"``: a fixed table (Vaswani et al. 2017, Sec. 3.5) with
  PE[m, 2i] = sin(m·θ_i), PE[m, 2i+1] = cos(m·θ_i), θ_i = 10000^(-2i/d), added to the embeddings.
* ``"rope"``: rotary position embedding (Su et al. 2021, RoFormer, Sec. 3.4, Eq. 34). Inside every
  attention layer each pair (x_2i, x_2i+1) of a query or key at position m is rotated by the angle
  m·θ_i. Rotations compose, R_mᵀ R_n = R_(n-m), so the score ⟨R_m q, R_n k⟩ = ⟨q, R_(n-m) k⟩ depends
  on the positions only through the offset n - m.
* ``"none"``: nothing. The causal mask alone still lets a decoder infer positions (query m sees m + 1
  keys), which Haviv et al. 2022 found is enough for a language model to learn.

Which of them learns best, and which can read past its training context, is a recorded experiment
(``course_lib.experiments.positions``).
"""

from __future__ import annotations


import torch

__all__ = ["POSITION_KINDS", "sinusoidal_encoding", "rope_angles", "apply_rope"]

POSITION_KINDS = ("learned", "sinusoidal", "rope", "none")


def _check_length_and_width(T: int, d: int) -> None:
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be a positive int (the number of positions), but it is {T!r}.")
    if isinstance(d, bool) or not isinstance(d, int) or d < 2 or d % 2:
        raise ValueError(f"d must be a positive even int (dimensions come in (sin, cos) or rotation pairs), "
                         f"but it is {d!r}.")


def _frequencies(d: int, base: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """θ_i = base^(-2i/d) for i = 0 .. d/2 - 1: one full turn every 2π/θ_i positions."""
    return base ** (-torch.arange(0, d, 2, dtype=dtype) / d)


def sinusoidal_encoding(T: int, d: int, base: float = 10000.0) -> torch.Tensor:
    """The (T, d) table PE[m, 2i] = sin(m·θ_i), PE[m, 2i+1] = cos(m·θ_i), θ_i = base^(-2i/d), in float32.

    Vaswani et al. 2017, Sec. 3.5. Row m is the encoding of position m (0-based).
    """
    _check_length_and_width(T, d)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * _frequencies(d, base)[None, :]   # (T, d/2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2).float()


def rope_angles(positions: torch.Tensor, d: int, base: float = 10000.0) -> torch.Tensor:
    """The rotation angles m·θ_i of RoPE, shape (len(positions), d/2), in float64."""
    _check_length_and_width(1, d)
    positions = torch.as_tensor(positions)
    if positions.dim() != 1 or positions.is_complex() or positions.dtype == torch.bool:
        raise ValueError(f"positions must be a 1-D tensor of position indices, one per row of x, but it "
                         f"has shape {tuple(positions.shape)} and dtype {positions.dtype}.")
    return positions.to(torch.float64)[:, None] * _frequencies(d, base)[None, :].to(positions.device)


def apply_rope(x: torch.Tensor, positions: torch.Tensor | None = None, base: float = 10000.0) -> torch.Tensor:
    """Rotate each pair (x[..., 2i], x[..., 2i+1]) of the row at position m by the angle m·θ_i.

    Su et al. 2021, Eq. 34. ``x`` has shape (..., T, d) with d even (queries or keys of one head);
    ``positions`` (T,) defaults to 0 .. T-1. Returns a new tensor of the same shape and dtype; ``x`` is
    not modified. Applied to queries and keys (never to values), the scores depend only on offsets.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        what = f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating-point tensor of shape (..., T, d), but it is {what}.")
    T, d = x.shape[-2], x.shape[-1]
    _check_length_and_width(T, d)
    if positions is None:
        positions = torch.arange(T, device=x.device)
    if len(positions) != T:
        raise ValueError(f"positions has {len(positions)} entries but x has T = {T} rows (x.shape[-2]); "
                         f"give one position per row.")
    angles = rope_angles(positions, d, base).to(x.device)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)          # (T, d/2)
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    # the 2x2 rotation [[cos, -sin], [sin, cos]] applied to every pair (x_even, x_odd)
    return torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1).flatten(-2)
