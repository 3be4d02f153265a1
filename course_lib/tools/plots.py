"""Figures that several lessons draw. Each function draws on a matplotlib ``Axes`` and returns it.

First used in notebooks/01_attention.ipynb (attention maps). Keep each function short, give every
figure a title and axis labels with units, and leave ``plt.show()`` to the notebook.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import torch


def plot_attention(weights: torch.Tensor, query_tokens: Sequence[str], key_tokens: Sequence[str] | None = None,
                   *, ax: plt.Axes | None = None, title: str = "attention weights",
                   colorbar: bool = True, vmax: float | None = 1.0) -> plt.Axes:
    """Heatmap of one (T_q, T_k) attention matrix: row i = query token i, column j = key token j.

    Each row sums to 1 (how query i spreads its attention over the keys). ``vmax=1.0`` keeps the colour
    scale comparable between heads; pass ``vmax=None`` to stretch it to this matrix.
    """
    key_tokens = query_tokens if key_tokens is None else key_tokens
    weights = torch.as_tensor(weights).detach().float().cpu()
    if weights.dim() != 2 or weights.shape != (len(query_tokens), len(key_tokens)):
        raise ValueError(f"weights must be a (T_q, T_k) = ({len(query_tokens)}, {len(key_tokens)}) matrix, "
                         f"one row per query token and one column per key token, but it has shape "
                         f"{tuple(weights.shape)}; select one layer, head and sentence first.")
    if ax is None:
        size = max(3.0, 0.35 * max(len(query_tokens), len(key_tokens)) + 1.5)
        _, ax = plt.subplots(figsize=(size + (1.0 if colorbar else 0.0), size))
    image = ax.imshow(weights.numpy(), cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(key_tokens)), list(key_tokens), rotation=90)
    ax.set_yticks(range(len(query_tokens)), list(query_tokens))
    ax.set_xlabel("key token (attended to)")
    ax.set_ylabel("query token (attending)")
    ax.set_title(title)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label="attention weight (rows sum to 1)")
    return ax
