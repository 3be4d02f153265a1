"""A synthetic language whose best possible loss is known exactly: a random order-2 Markov chain.

Explained in notebooks/05_scaling_laws.ipynb ("A language with a known floor").

Tokens 0..V−1. The next token c after the context (a, b) is drawn from

    P(c | a, b) = ε·u(c) + (1 − ε)·[ (1 − λ)·P₁(c | b) + λ·P₂(c | a, b) ]

* u       -- a Zipf-shaped unigram distribution, u(c) ∝ 1 / (c + 1)^s (so some contexts are rare);
* P₁(·|b) -- a sparse "bigram" table: each b has k₁ successors (drawn from u, without replacement)
             with Dirichlet(γ) weights; a small model can learn it;
* P₂(·|a,b) -- a sparse "trigram" table: each pair has k₂ successors of its own; learning all V²
             of them takes capacity (parameters) and data (tokens) -- this is why model size matters;
* ε       -- a little mass on every token, so the chain is irreducible and aperiodic.

The chain lives on pairs s = (a, b): it moves (a, b) → (b, c). Its stationary distribution π(a, b)
solves π = πM and is found by power iteration. The entropy rate, the loss of the true model and hence
the floor no trained model can beat on average, is

    H = Σ_{a,b} π(a, b) · H(P(· | a, b))          (nats per token).

A model that sees a window of T tokens predicts its first target from one token of context only,
so its floor is ``window_floor(T)`` = (H(X₁ | X₀) + (T − 1)·H) / T, slightly above H.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["SyntheticLanguage", "make_language"]


def _entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats along ``axis`` (0 log 0 = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return terms.sum(axis=axis)


@dataclass(frozen=True)
class SyntheticLanguage:
    """An order-2 Markov chain over ``vocab_size`` tokens; ``P[a, b, c]`` = P(next = c | a, b)."""

    P: np.ndarray
    seed: int

    def __post_init__(self) -> None:
        P = self.P
        if P.ndim != 3 or not (P.shape[0] == P.shape[1] == P.shape[2]):
            raise ValueError(f"P must have shape (V, V, V), got {P.shape}.")
        if not np.allclose(P.sum(-1), 1.0, atol=1e-9) or (P < 0).any():
            raise ValueError("every row P[a, b, :] must be a probability distribution (non-negative, sum 1).")

    @property
    def vocab_size(self) -> int:
        return self.P.shape[0]

    # -- exact quantities -------------------------------------------------------------------------

    def stationary(self, tol: float = 1e-14, max_iter: int = 100_000) -> np.ndarray:
        """π(a, b), shape (V, V): the stationary distribution over contexts (power iteration)."""
        V = self.vocab_size
        pi = np.full((V, V), 1.0 / V**2)
        for _ in range(max_iter):
            new = np.einsum("ab,abc->bc", pi, self.P)   # π'(b, c) = Σ_a π(a, b) P(c | a, b)
            if np.abs(new - pi).sum() < tol:
                return new
            pi = new
        raise RuntimeError("power iteration did not converge; is the chain irreducible (epsilon > 0)?")

    def entropy_rate(self) -> float:
        """H = Σ π(a, b) H(P(·|a, b)) in nats per token: the loss of the true model."""
        return float((self.stationary() * _entropy(self.P)).sum())

    def unigram(self) -> np.ndarray:
        """The stationary distribution of single tokens, μ(b) = Σ_a π(a, b)."""
        return self.stationary().sum(0)

    def bigram_entropy(self) -> float:
        """H(X₁ | X₀): the best loss with one token of context (what a bigram model can reach)."""
        pi = self.stationary()
        mu = pi.sum(0)
        Q = np.einsum("ab,abc->bc", pi, self.P) / np.maximum(mu, 1e-300)[:, None]   # Q(c | b)
        return float((mu * _entropy(Q)).sum())

    def unigram_entropy(self) -> float:
        """H(X): the best loss with no context at all."""
        return float(_entropy(self.unigram()))

    def window_floor(self, context: int) -> float:
        """The floor of a model trained on windows of ``context`` tokens: (H(X₁|X₀) + (T−1)·H) / T."""
        if not isinstance(context, int) or context < 1:
            raise ValueError(f"context must be a positive int (the window length T), got {context!r}.")
        return (self.bigram_entropy() + (context - 1) * self.entropy_rate()) / context

    # -- sampling ---------------------------------------------------------------------------------

    def sample(self, n_tokens: int, seed: int = 0, *, n_chains: int | None = None) -> torch.Tensor:
        """A stream of ``n_tokens`` token ids (1-D int64 tensor), reproducible from ``seed``.

        ``n_chains`` independent stationary chains run side by side (vectorised) and are laid end to
        end; each starts from π, so there is no burn-in. By default each chain is ≥ 4,096 tokens long,
        so the joins (one per chain) are negligible.
        """
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 2:
            raise ValueError(f"n_tokens must be an int >= 2, got {n_tokens!r}.")
        if n_chains is None:
            n_chains = int(min(256, max(1, n_tokens // 4096)))
        rng = np.random.default_rng(seed)
        V = self.vocab_size
        length = -(-n_tokens // n_chains)                       # ceil
        pi = self.stationary().ravel()
        start = rng.choice(V * V, size=n_chains, p=pi / pi.sum())
        out = np.empty((n_chains, length), dtype=np.int64)
        out[:, 0], out[:, 1] = start // V, start % V
        cum = np.cumsum(self.P, axis=-1)
        cum[..., -1] = 1.0                                      # guard against rounding below 1
        uniforms = rng.random((length, n_chains))
        for t in range(2, length):
            rows = cum[out[:, t - 2], out[:, t - 1]]            # (n_chains, V)
            out[:, t] = (rows < uniforms[t, :, None]).sum(axis=1)
        return torch.from_numpy(out.reshape(-1)[:n_tokens].copy())

    def train_val(self, n_train: int, n_val: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independent streams (different seeds derived from ``seed``): train and validation."""
        return self.sample(n_train, seed=2 * seed), self.sample(n_val, seed=2 * seed + 1)

    def cross_entropy(self, tokens: torch.Tensor | np.ndarray) -> float:
        """The true model's mean loss −log P(x_t | x_{t−2}, x_{t−1}) over t ≥ 2 of a stream (nats)."""
        x = np.asarray(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens, dtype=np.int64)
        if x.ndim != 1 or x.size < 3:
            raise ValueError("tokens must be a 1-D stream of at least 3 token ids.")
        if x.min() < 0 or x.max() >= self.vocab_size:
            raise ValueError(f"tokens hold ids outside 0..{self.vocab_size - 1}.")
        return float(-np.log(self.P[x[:-2], x[1:-1], x[2:]]).mean())


def make_language(vocab_size: int = 64, *, bigram_successors: int = 8, trigram_successors: int = 3,
                  trigram_weight: float = 0.6, epsilon: float = 0.01, zipf: float = 1.0,
                  concentration: float = 0.5, seed: int = 0) -> SyntheticLanguage:
    """Draw a random :class:`SyntheticLanguage` (see the module docstring for the symbols).

    ``bigram_successors`` = k₁, ``trigram_successors`` = k₂, ``trigram_weight`` = λ, ``epsilon`` = ε,
    ``zipf`` = s, ``concentration`` = γ (Dirichlet; small γ → peaky successor weights).
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 4 <= vocab_size <= 256:
        raise ValueError(f"vocab_size must be an int in 4..256 (P is a dense V³ table), got {vocab_size!r}.")
    for name, k in (("bigram_successors", bigram_successors), ("trigram_successors", trigram_successors)):
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab_size:
            raise ValueError(f"{name} must be an int in 1..vocab_size={vocab_size}, got {k!r}.")
    if not 0.0 <= trigram_weight <= 1.0:
        raise ValueError(f"trigram_weight must lie in [0, 1], got {trigram_weight!r}.")
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"epsilon must lie in (0, 1) so that the chain is irreducible, got {epsilon!r}.")
    if concentration <= 0 or zipf < 0:
        raise ValueError("concentration must be > 0 and zipf >= 0.")
    rng = np.random.default_rng(seed)
    V = vocab_size
    u = 1.0 / np.arange(1, V + 1) ** zipf
    u /= u.sum()

    def sparse_rows(n_rows: int, k: int) -> np.ndarray:
        rows = np.zeros((n_rows, V))
        for r in range(n_rows):
            successors = rng.choice(V, size=k, replace=False, p=u)
            rows[r, successors] = rng.dirichlet(np.full(k, concentration))
        return rows

    P1 = sparse_rows(V, bigram_successors)                          # P₁(c | b), (V, V)
    P2 = sparse_rows(V * V, trigram_successors).reshape(V, V, V)    # P₂(c | a, b)
    mix = (1 - trigram_weight) * P1[None, :, :] + trigram_weight * P2
    P = epsilon * u[None, None, :] + (1 - epsilon) * mix
    P /= P.sum(-1, keepdims=True)
    return SyntheticLanguage(P=P, seed=seed)
