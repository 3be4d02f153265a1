"""Softmax, log-sum-exp, cross-entropy and their gradients, written out so they can be read.

Explained in notebooks/02_cross_entropy.ipynb. The symbols follow the notebook:

* ``z`` -- logits, shape ``(N, C)`` for N examples and C classes (or any shape for ``softmax``),
* ``y`` -- integer class indices, shape ``(N,)``,
* ``p = softmax(z)`` -- the model's probabilities,
* ``L = -(1/N) * sum_i log p[i, y_i]`` -- the mean cross-entropy, and
  ``dL/dz = (p - onehot(y)) / N`` -- its gradient.

Everything is computed stably: ``softmax`` and ``log_softmax`` subtract the row maximum first, so
logits of size 1000 give finite answers (``exp(1000)`` is ``inf`` in every float format).
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = [
    "logsumexp", "softmax", "log_softmax", "one_hot", "cross_entropy", "cross_entropy_grad",
    "sigmoid", "binary_cross_entropy", "binary_cross_entropy_with_logits",
    "binary_cross_entropy_grad", "perplexity",
]


# ----------------------------------------------------------------------------------------------
# Input checks: one sentence naming the problem and the fix
# ----------------------------------------------------------------------------------------------


def _float_tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, but got a {type(x).__name__}; "
                        f"wrap it with torch.tensor(..., dtype=torch.float32).")
    if not torch.is_floating_point(x):
        raise TypeError(f"{name} must be a floating-point tensor, but its dtype is {x.dtype}; "
                        f"convert it with {name}.float().")
    return x


def _dim(x: torch.Tensor, dim: int, name: str) -> int:
    if x.dim() == 0:
        raise ValueError(f"{name} is a 0-d tensor (a single number); softmax needs at least one axis "
                         f"to normalise over: pass a vector or a batch of rows.")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for {name} with {x.dim()} dimensions; "
                         f"use a dim between {-x.dim()} and {x.dim() - 1}.")
    if x.shape[dim] == 0:
        raise ValueError(f"{name} has size 0 along dim={dim}; there must be at least one class.")
    return dim


def _logits_and_targets(logits: object, targets: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``logits`` (N, C) and integer ``targets`` (N,) for the cross-entropy functions."""
    z = _float_tensor(logits, "logits")
    if z.dim() != 2:
        raise ValueError(f"logits must have shape (N, C) -- one row of C class scores per example -- but "
                         f"have shape {tuple(z.shape)}; for a single example use logits.unsqueeze(0), "
                         f"for a sequence batch (B, T, C) use logits.reshape(-1, C).")
    n, c = z.shape
    if n == 0 or c == 0:
        raise ValueError(f"logits have shape {tuple(z.shape)}; there must be at least one example and "
                         f"one class.")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor of class indices, but got a "
                        f"{type(targets).__name__}; use torch.tensor(targets, dtype=torch.long).")
    if torch.is_floating_point(targets) or targets.dtype == torch.bool or torch.is_complex(targets):
        raise TypeError(f"targets must hold integer class indices (dtype torch.long), but their dtype is "
                        f"{targets.dtype}; if they are one-hot rows use targets.argmax(dim=1), if they "
                        f"are whole numbers stored as floats use targets.long().")
    if tuple(targets.shape) != (n,):
        raise ValueError(f"targets must have shape (N,) = ({n},), one class index per row of logits, "
                         f"but have shape {tuple(targets.shape)}.")
    if targets.numel() and (targets.min() < 0 or targets.max() >= c):
        bad = targets[(targets < 0) | (targets >= c)][0].item()
        raise ValueError(f"targets must lie in 0..{c - 1} for logits with C={c} classes, but contain "
                         f"{bad}; check the number of classes (or 1-based labels: subtract 1).")
    return z, targets.to(device=z.device, dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# Softmax and log-sum-exp
# ----------------------------------------------------------------------------------------------


def logsumexp(z: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """``log(sum(exp(z)))`` along ``dim``, computed as ``m + log(sum(exp(z - m)))`` with ``m = max(z)``.

    After the shift the largest term is ``exp(0) = 1``, so nothing overflows and the sum is at least 1,
    so nothing underflows to ``log(0)``. A row of all ``-inf`` gives ``-inf`` (as in torch).
    """
    z = _float_tensor(z, "z")
    dim = _dim(z, dim, "z")
    m = z.amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows of -inf (or +inf): do not shift
    out = m + torch.log(torch.exp(z - m).sum(dim=dim, keepdim=True))
    return out if keepdim else out.squeeze(dim)


def softmax(z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``exp(z) / sum(exp(z))`` along ``dim``, with the maximum subtracted first (same result, no overflow)."""
    z = _float_tensor(z, "z")
    dim = _dim(z, dim, "z")
    e = torch.exp(z - z.amax(dim=dim, keepdim=True))
    return e / e.sum(dim=dim, keepdim=True)


def log_softmax(z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``log(softmax(z)) = z - logsumexp(z)`` along ``dim``: finite even where ``softmax`` underflows to 0.

    Computed as ``(z - m) - log(sum(exp(z - m)))``: subtracting the maximum ``m`` first keeps the
    small differences exact even when the logits themselves are large (float32 has only about 7
    significant digits, so ``-1000.4`` minus ``-999.6`` would lose some of them).
    """
    z = _float_tensor(z, "z")
    dim = _dim(z, dim, "z")
    m = z.amax(dim=dim, keepdim=True)
    shifted = z - torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return shifted - torch.log(torch.exp(shifted).sum(dim=dim, keepdim=True))


def one_hot(targets: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows of zeros with a 1 at each target: shape ``(N, num_classes)``."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, but is {num_classes!r}.")
    num_classes = int(num_classes)  # a NumPy integer (from an array's shape) is fine
    n = targets.shape[0] if isinstance(targets, torch.Tensor) and targets.dim() >= 1 else 1
    _, y = _logits_and_targets(torch.empty(n, num_classes, dtype=dtype), targets)
    return torch.zeros(n, num_classes, dtype=dtype, device=y.device).scatter_(1, y.unsqueeze(1), 1.0)


# ----------------------------------------------------------------------------------------------
# Softmax cross-entropy
# ----------------------------------------------------------------------------------------------


def _smoothed_targets(z: torch.Tensor, y: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], but is {label_smoothing}; 0.1 is usual.")
    n, c = z.shape
    q = torch.zeros_like(z).scatter_(1, y.unsqueeze(1), 1.0)
    return (1.0 - label_smoothing) * q + label_smoothing / c


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """The mean cross-entropy ``-(1/N) sum_i log softmax(z_i)[y_i]`` in nats, a 0-d tensor.

    ``logits`` has shape ``(N, C)``, ``targets`` holds N integer class indices. With
    ``label_smoothing = a`` the target distribution is ``(1 - a) * onehot(y) + a / C`` (as in
    ``torch.nn.functional.cross_entropy``).
    """
    z, y = _logits_and_targets(logits, targets)
    logp = log_softmax(z, dim=1)
    if label_smoothing == 0.0:
        return -logp.gather(1, y.unsqueeze(1)).mean()
    q = _smoothed_targets(z, y, label_smoothing)
    return -(q * logp).sum(dim=1).mean()


def cross_entropy_grad(logits: torch.Tensor, targets: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """The gradient of :func:`cross_entropy` with respect to the logits: ``(softmax(z) - onehot(y)) / N``.

    Same shape as ``logits``. With label smoothing the one-hot rows become the smoothed targets ``q``.
    """
    z, y = _logits_and_targets(logits, targets)
    q = _smoothed_targets(z, y, label_smoothing)
    return (softmax(z, dim=1) - q) / z.shape[0]


# ----------------------------------------------------------------------------------------------
# Binary cross-entropy (one sigmoid output per example)
# ----------------------------------------------------------------------------------------------


def _binary_targets(x: torch.Tensor, targets: object, name: str) -> torch.Tensor:
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor of 0s and 1s (or probabilities), but got a "
                        f"{type(targets).__name__}; use torch.tensor(targets, dtype=torch.float32).")
    if tuple(targets.shape) != tuple(x.shape):
        raise ValueError(f"targets must have the same shape as the {name}, {tuple(x.shape)}, but have "
                         f"shape {tuple(targets.shape)}; binary cross-entropy pairs each {name[:-1]} "
                         f"with one target.")
    t = targets.to(dtype=x.dtype, device=x.device)
    if t.numel() and (t.min() < 0 or t.max() > 1):
        raise ValueError("binary targets must lie in [0, 1] (labels 0/1, or soft labels); "
                         "for class indices of more than two classes use cross_entropy instead.")
    return t


def sigmoid(z: torch.Tensor) -> torch.Tensor:
    """``1 / (1 + exp(-z))``, written so that neither branch overflows."""
    z = _float_tensor(z, "z")
    e = torch.exp(-z.abs())  # in (0, 1]: never overflows
    return torch.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def binary_cross_entropy_with_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy **from logits** ``z`` (the numbers *before* the sigmoid).

    ``-[y log sigmoid(z) + (1 - y) log(1 - sigmoid(z))]`` simplifies to
    ``max(z, 0) - z*y + log(1 + exp(-|z|))``, which is finite for every finite z. Prefer this version.
    """
    z = _float_tensor(logits, "logits")
    y = _binary_targets(z, targets, "logits")
    return (z.clamp(min=0) - z * y + torch.log1p(torch.exp(-z.abs()))).mean()


def binary_cross_entropy(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy **from probabilities** ``p = sigmoid(z)`` in [0, 1].

    ``-[y log p + (1 - y) log(1 - p)]``. Once a probability has rounded to exactly 0 or 1 the
    information is gone; like ``torch.nn.functional.binary_cross_entropy`` each log is clamped at
    -100 so the loss stays finite. Use :func:`binary_cross_entropy_with_logits` when you have logits.
    """
    p = _float_tensor(probs, "probs")
    if p.numel() and (p.min() < 0 or p.max() > 1):
        raise ValueError("probs must lie in [0, 1]; if these are logits (any real numbers), call "
                         "binary_cross_entropy_with_logits instead.")
    y = _binary_targets(p, targets, "probs")
    log_p = torch.log(p).clamp(min=-100.0)
    log_1mp = torch.log1p(-p).clamp(min=-100.0)
    return -(y * log_p + (1 - y) * log_1mp).mean()


def binary_cross_entropy_grad(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`binary_cross_entropy_with_logits` w.r.t. the logits: ``(sigmoid(z) - y) / N``
    where N is the number of elements."""
    z = _float_tensor(logits, "logits")
    y = _binary_targets(z, targets, "logits")
    return (sigmoid(z) - y) / max(z.numel(), 1)


# ----------------------------------------------------------------------------------------------
# Perplexity
# ----------------------------------------------------------------------------------------------


def perplexity(mean_ce: float | torch.Tensor) -> float | torch.Tensor:
    """``exp(mean cross-entropy)``, the cross-entropy measured in nats (natural log), as torch uses.

    A model that guesses uniformly over V tokens has cross-entropy log V and perplexity V: perplexity is
    the number of equally likely choices the model is, on average, hesitating between.
    """
    if isinstance(mean_ce, torch.Tensor):
        if not torch.is_floating_point(mean_ce):
            mean_ce = mean_ce.double()
        if (mean_ce < 0).any():
            raise ValueError("a cross-entropy is never negative; did you pass a log-likelihood "
                             "(which is minus the cross-entropy)?")
        return torch.exp(mean_ce)
    # NumPy scalars (np.float32 from an array's .mean()) are numbers too
    if isinstance(mean_ce, bool) or not isinstance(mean_ce, numbers.Real):
        raise TypeError(f"perplexity takes the mean cross-entropy as a number or tensor, not a "
                        f"{type(mean_ce).__name__}.")
    mean_ce = float(mean_ce)
    if mean_ce < 0:
        raise ValueError("a cross-entropy is never negative; did you pass a log-likelihood "
                         "(which is minus the cross-entropy)?")
    return math.exp(mean_ce)
