"""Where a token is: sinusoidal and rotary position encodings, and the recorded comparison of them.

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

``experiment`` trains the tiny GPT once per encoding and seed on Shakespeare's characters and
records the held-out loss at the training context and on longer sequences
(``python -m course_lib.experiments positions``).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

__all__ = ["POSITION_KINDS", "sinusoidal_encoding", "rope_angles", "apply_rope", "char_data",
           "experiment_settings", "per_position_loss", "experiment"]

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


# ----------------------------------------------------------------------------------------------
# The recorded comparison: which encoding learns best, and which can read past its training context
# ----------------------------------------------------------------------------------------------


def char_data() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Shakespeare as character ids: (train ids, held-out ids, characters), split by work (data.py).

    The vocabulary is the training split's characters; a held-out character outside it (there are
    none in the course's split) would map to id 0.
    """
    from course_lib.tools.data import shakespeare_split

    train_text, val_text = shakespeare_split()
    chars = sorted(set(train_text))
    index = {c: i for i, c in enumerate(chars)}

    def encode(text: str) -> torch.Tensor:
        return torch.tensor([index.get(c, 0) for c in text], dtype=torch.long)

    return encode(train_text), encode(val_text), chars


def experiment_settings(profile: Any) -> dict[str, Any]:
    """The model and training sizes of the positions experiment for one profile.

    Kept small on purpose: 4 encodings × several seeds must fit a CPU recording, and the notebook
    trains one of these runs live.
    """
    sizes = profile.pick(
        ci=dict(d_model=32, n_layer=2, n_head=4, context=32, batch_size=8, steps=40, eval_windows=4),
        cpu=dict(d_model=64, n_layer=2, n_head=4, context=64, batch_size=16, steps=800, eval_windows=32),
        gpu=dict(d_model=128, n_layer=4, n_head=4, context=128, batch_size=32, steps=3000, eval_windows=64))
    sizes.update(lr=2e-3, warmup_steps=50 if sizes["steps"] >= 500 else 5, weight_decay=0.1,
                 eval_lengths=[sizes["context"], 2 * sizes["context"], 4 * sizes["context"]])
    return sizes


@torch.no_grad()
def per_position_loss(model: torch.nn.Module, tokens: torch.Tensor, length: int, windows: int,
                      seed: int = 1234) -> torch.Tensor:
    """Cross-entropy (nats) at every position of ``windows`` fixed windows of ``length`` tokens: (windows, length).

    The windows are drawn with ``seed``, so every model is judged on the same text.
    """
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(tokens) - length - 1, (windows,), generator=generator)
    index = starts[:, None] + torch.arange(length)
    device = next(model.parameters()).device
    x, y = tokens[index].to(device), tokens[index + 1].to(device)
    was_training = model.training
    model.eval()
    try:
        logits, _ = model(x)
    finally:
        model.train(was_training)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(),
                                             reduction="none").view(windows, length).cpu()


def train_and_evaluate(kind: str, settings: dict[str, Any], seed: int, train_ids: torch.Tensor,
                       val_ids: torch.Tensor, vocab_size: int, device: torch.device | str = "cpu",
                       progress: bool = False) -> dict[str, Any]:
    """Train one tiny GPT with position encoding ``kind`` and measure its held-out loss per position.

    Returns ``{"loss_at": {length: mean loss}, "window_loss": {length: per-window means},
    "per_position": {length: mean loss at each position}, "train_seconds": ...}``; lengths past the
    training context are skipped for ``"learned"`` (its table ends there).
    """
    from course_lib.parts.model import GPT, GPTConfig
    from course_lib.parts.train import train

    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=vocab_size, context=settings["context"], n_layer=settings["n_layer"],
                       n_head=settings["n_head"], d_model=settings["d_model"], position=kind)
    model = GPT(config).to(device)
    started = time.perf_counter()
    train(model, train_ids, None, steps=settings["steps"], batch_size=settings["batch_size"],
          lr=settings["lr"], warmup_steps=settings["warmup_steps"], weight_decay=settings["weight_decay"],
          seed=seed, eval_every=0, progress=progress, amp="none")
    seconds = time.perf_counter() - started
    out: dict[str, Any] = {"loss_at": {}, "window_loss": {}, "per_position": {}, "train_seconds": round(seconds, 1)}
    for length in settings["eval_lengths"]:
        if kind == "learned" and length > config.context:
            continue
        losses = per_position_loss(model, val_ids, length, settings["eval_windows"])
        out["loss_at"][str(length)] = float(losses.mean())
        out["window_loss"][str(length)] = [round(float(v), 5) for v in losses.mean(dim=1)]
        out["per_position"][str(length)] = [round(float(v), 4) for v in losses.mean(dim=0)]
    return out


def experiment(profile: Any, *, seeds: int = 3, quick: bool = False) -> dict[str, Any]:
    """``python -m course_lib.experiments positions``: every encoding × ``seeds`` seeds, same data order.

    Runs of the same seed see the same batches in the same order and are judged on the same held-out
    windows, so the encodings are compared pairwise (paired bootstrap over seeds and windows,
    :func:`course_lib.parts.finetune.paired_bootstrap_gap_seeds`). One learning rate serves all encodings.
    """
    import numpy as np

    from course_lib.parts.finetune import paired_bootstrap_gap_seeds

    settings = experiment_settings(profile)
    if quick:
        settings.update(steps=5, warmup_steps=1, eval_windows=2)
        seeds = min(seeds, 2)
    train_ids, val_ids, chars = char_data()
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in POSITION_KINDS}
    for seed in range(seeds):
        for kind in POSITION_KINDS:
            runs[kind].append(train_and_evaluate(kind, settings, seed, train_ids, val_ids, len(chars),
                                                 device=profile.device))
    summary: dict[str, Any] = {}
    for kind, per_seed in runs.items():
        summary[kind] = {length: {"mean": float(np.mean([r["loss_at"][length] for r in per_seed])),
                                  "per_seed": [r["loss_at"][length] for r in per_seed]}
                         for length in per_seed[0]["loss_at"]}
    gaps: dict[str, Any] = {}
    for length in map(str, settings["eval_lengths"]):
        kinds = [k for k in POSITION_KINDS if length in runs[k][0]["loss_at"]]
        for i, a in enumerate(kinds):
            for b in kinds[i + 1:]:
                wa = np.array([r["window_loss"][length] for r in runs[a]])
                wb = np.array([r["window_loss"][length] for r in runs[b]])
                gap, low, high = paired_bootstrap_gap_seeds(wa, wb, rng=np.random.default_rng(0))
                gaps[f"{length}: {a} - {b}"] = {"gap": gap, "low": low, "high": high,
                                                "per_seed": (wa.mean(1) - wb.mean(1)).tolist()}
    return {"settings": settings, "seeds": seeds, "vocab_size": len(chars), "summary": summary,
            "gaps": gaps, "runs": runs}
