"""A tiny GPT in one file: LayerNorm, causal self-attention, MLP, pre-LN blocks, the language model.

Explained in notebooks/03_transformer_block.ipynb; trained in 04, scaled in 05, distributed in 10 and split across processes in 11.
The layout follows GPT-2 (Radford et al. 2019, Sec. 2.3: LayerNorm moved to the input of each
sub-block, a final LayerNorm, residual projections initialised with std 0.02/√(2·n_layer)):

    x₀ = E[idx] + P[0..T-1]                                  token + position embeddings (B, T, d)
    for each of the L blocks:
        x = x + Attention(LayerNorm₁(x))                     causal self-attention, H heads
        x = x + W₂ · GELU(W₁ · LayerNorm₂(x))                MLP, hidden size 4d
    logits = LayerNorm_f(x) · Eᵀ                             lm head tied to the token embedding

Counting (Kaplan et al. 2020, Table 1): one block holds 4d² attention weights (W_q, W_k, W_v, W_o)
and 8d² MLP weights (d×4d and 4d×d), so the non-embedding parameter count is N ≈ 12·L·d²; a forward
pass costs ≈ 2 FLOPs per weight per token (one multiply, one add) and training ≈ 3× that: C ≈ 6N
(``flops_per_token`` counts exactly, attention included).

Positions (``GPTConfig.position``, explained in 03's "Positions"): ``"learned"`` (the table P above,
the default), ``"sinusoidal"``, ``"rope"`` (queries and keys rotated inside attention) or ``"none"``;
see ``course_lib.parts.positions``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.parts.positions import POSITION_KINDS, apply_rope, sinusoidal_encoding

__all__ = ["GPTConfig", "LayerNorm", "layer_norm", "layer_norm_backward", "CausalSelfAttention", "MLP", "Block", "GPT", "KVCache", "count_params",
           "param_count_formula", "flops_per_token", "memory_estimate", "saved_activation_bytes",
           "top_k_filter", "top_p_filter", "gpt2_config", "load_gpt2_weights"]


@dataclass
class GPTConfig:
    """The shape of a GPT. ``context`` is the block size: the most tokens the model can look at."""

    vocab_size: int = 65
    context: int = 64
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    dropout: float = 0.0
    bias: bool = True          # biases in the Linear layers and LayerNorms (GPT-2 has them)
    tie_weights: bool = True   # lm head shares its matrix with the token embedding (GPT-2 does)
    layer_norm_eps: float = 1e-5
    position: str = "learned"  # "learned" (GPT-2), "sinusoidal", "rope" or "none": course_lib.parts.positions

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context", "n_layer", "n_head", "d_model"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, but it is {value!r}.")
        if self.d_model % self.n_head:
            raise ValueError(f"GPTConfig.d_model ({self.d_model}) must be a multiple of n_head "
                             f"({self.n_head}) so that every head gets d_model / n_head dimensions.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must lie in [0, 1), but it is {self.dropout!r}.")
        if self.position not in POSITION_KINDS:
            raise ValueError(f"GPTConfig.position must be one of {', '.join(POSITION_KINDS)}, but it is "
                             f"{self.position!r}.")
        if self.position == "rope" and self.d_head % 2:
            raise ValueError(f"RoPE rotates pairs of dimensions, so d_model / n_head must be even, but it is "
                             f"{self.d_head}.")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    @property
    def d_ff(self) -> int:
        return 4 * self.d_model

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_profile(cls, profile: Any, vocab_size: int, **overrides: Any) -> GPTConfig:
        """The profile's model size (``d_model``, ``n_layer``, ``n_head``, ``context``)."""
        sizes = dict(d_model=profile.d_model, n_layer=profile.n_layer, n_head=profile.n_head,
                     context=profile.context)
        sizes.update(overrides)
        return cls(vocab_size=vocab_size, **sizes)


def layer_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | None = None, eps: float = 1e-5
               ) -> torch.Tensor:
    """LayerNorm from scratch (the one students write in 03): normalise each vector over its last axis,
    then scale and shift.

        μ = mean(x),  σ² = mean((x − μ)²)   (biased: divide by d, not d − 1)
        y = γ ⊙ (x − μ) / √(σ² + ε) + β      (ε inside the square root)

    Equal to ``torch.nn.functional.layer_norm`` to float rounding (tests/test_model.py), which the model
    uses instead: one fused kernel rather than five elementwise passes over the activations (a quarter of
    a training step at nanoGPT's CPU shape).
    """
    var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
    y = (x - mean) * torch.rsqrt(var + eps) * gamma
    return y + beta if beta is not None else y


class LayerNorm(nn.Module):
    """A LayerNorm's parameters, γ (``weight``) and β (``bias``, optional), applied by the fused
    ``F.layer_norm``; :func:`layer_norm` is the same computation written out."""

    def __init__(self, d: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))                        # γ
        self.bias = nn.Parameter(torch.zeros(d)) if bias else None        # β

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def layer_norm_backward(x: torch.Tensor, gamma: torch.Tensor, dy: torch.Tensor, eps: float = 1e-5
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward pass of y = γ ⊙ x̂ + β, x̂ = (x − μ)/σ, σ = √(var + ε), over the last axis (03.3).

    With g = dy ⊙ γ (the gradient reaching x̂) and means over the d features of each vector,

        dx = (g − mean(g) − x̂ ⊙ mean(g ⊙ x̂)) / σ     (the subtracted terms: the paths through μ and σ)
        dγ = Σ dy ⊙ x̂,   dβ = Σ dy                      (sums over every leading axis: batch, positions)

    Returns ``(dx, dgamma, dbeta)``; tests/test_model.py compares them with autograd in float64.
    """
    var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
    sigma = torch.sqrt(var + eps)
    x_hat = (x - mean) / sigma
    g = dy * gamma
    dx = (g - g.mean(dim=-1, keepdim=True) - x_hat * (g * x_hat).mean(dim=-1, keepdim=True)) / sigma
    if x.dim() == 1:                       # one vector: nothing to sum over (sum(dim=()) would sum all)
        return dx, dy * x_hat, dy.clone()
    lead = tuple(range(x.dim() - 1))
    return dx, (dy * x_hat).sum(dim=lead), dy.sum(dim=lead)


class KVCache:
    """The keys and values of the tokens a model has already seen: one (K, V) pair per layer.

    Generation appends one token at a time; without a cache every step recomputes the keys and
    values of the whole window, although those of the earlier tokens never change (the mask keeps
    them from seeing later tokens). With it, a step computes q, k, v for the new token only, appends
    k and v along the time axis and attends over everything stored. Each layer's tensors have shape
    (B, H, t, d_head), so the cache holds 2·L·t·d numbers per sequence. Explained in
    notebooks/04_training_a_language_model.ipynb ("Generation with a KV cache").
    """

    def __init__(self, n_layer: int) -> None:
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer

    @property
    def length(self) -> int:
        """The number of tokens stored (the position the next token gets), read from the last layer."""
        return 0 if self.k[-1] is None else self.k[-1].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens' keys and values (B, H, T_new, d_head) of ``layer``; return all of them."""
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)                       # time is axis 2
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused projection for Q, K and V.

    ``qkv.weight`` stacks W_q, W_k, W_v (3d × d); ``proj`` is W_o. The attention itself is
    ``F.scaled_dot_product_attention(is_causal=True)``, which runs a flash-attention kernel on GPUs
    and computes the same softmax(QKᵀ/√d_head)V as ``course_lib.parts.attention`` (tests/test_model.py).
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.d_model, self.dropout = config.n_head, config.d_model, config.dropout
        self.rope = config.position == "rope"
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        # (B, T, d) → (B, H, T, d_head): every head attends on its own slice of the d dimensions
        q, k, v = (t.view(B, T, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))
        past = 0
        if kv_cache is not None:
            past = 0 if kv_cache.k[layer] is None else kv_cache.k[layer].shape[2]
        if self.rope:       # rotate queries and new keys by their positions (values stay as they are)
            positions = torch.arange(past, past + T, device=x.device)
            q, k = apply_rope(q, positions), apply_rope(k, positions)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
        mask, causal = None, True
        if past and T == 1:
            causal = False     # one new query sees every key; is_causal=True would keep only the first
        elif past:             # new query i sits at position past + i and sees keys 0 .. past + i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, d)                 # merge the heads
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    """The position-wise feed-forward network: d → 4d → GELU → d."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.gelu = nn.GELU()
        self.proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.gelu(self.fc(x))))


class Block(nn.Module):
    """A pre-LN decoder block: x + Attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.d_model, config.layer_norm_eps, config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.d_model, config.layer_norm_eps, config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


SINUSOIDAL_SCALE = 0.02 * math.sqrt(2)   # sin and cos have RMS 1/√2: this makes it 0.02


class GPT(nn.Module):
    """A decoder-only language model: ``forward(idx, targets=None) -> (logits, loss)``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT expects a GPTConfig, but got a {type(config).__name__}; build one with "
                            f"GPTConfig(vocab_size=..., context=..., n_layer=..., n_head=..., d_model=...).")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)      # E
        # P: a learned table for "learned" only; "sinusoidal" adds a fixed one, "rope"/"none" add nothing
        self.pos_emb = nn.Embedding(config.context, config.d_model) if config.position == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = LayerNorm(config.d_model, config.layer_norm_eps, config.bias)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.tok_emb.weight                        # one matrix, two uses
        self.apply(self._init_weights)
        # GPT-2 (Radford et al. 2019, Sec. 2.3): scale the projections that write into the residual
        # stream by 1/√(number of residual layers) = 1/√(2·n_layer), so the stream's variance does
        # not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def _check_input(self, idx: Any, targets: Any, past: int = 0) -> None:
        V, context = self.config.vocab_size, self.config.context
        if not isinstance(idx, torch.Tensor):
            raise TypeError(f"idx must be a torch.Tensor of token ids, but it is a {type(idx).__name__}; "
                            f"use torch.tensor(ids, dtype=torch.long).")
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise TypeError(f"idx must hold integer token ids, but its dtype is {idx.dtype}; "
                            f"convert it with idx.long().")
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (batch, T), but it has shape {tuple(idx.shape)}; "
                             f"for one sequence use idx.unsqueeze(0).")
        learned = self.config.position == "learned"     # the other encodings have no table to run out of
        if idx.shape[1] > context and learned:
            raise ValueError(f"idx has {idx.shape[1]} positions but the model's context is {context}; "
                             f"crop it to the last {context} tokens with idx[:, -{context}:].")
        if past + idx.shape[1] > context and learned:
            raise ValueError(f"the KV cache holds {past} tokens and idx adds {idx.shape[1]}, more than the "
                             f"model's context of {context}; start a new cache from the last tokens.")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= V):
            raise ValueError(f"idx holds token ids outside 0..{V - 1} (min {int(idx.min())}, max "
                             f"{int(idx.max())}); the model's vocab_size is {V}, so the tokenizer and "
                             f"GPTConfig.vocab_size must agree.")
        if targets is not None:
            if not isinstance(targets, torch.Tensor) or targets.shape != idx.shape:
                shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
                raise ValueError(f"targets must be a tensor of the same shape as idx {tuple(idx.shape)}, "
                                 f"but it is {shape}; targets are idx shifted left by one token.")

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                kv_cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab_size) for every position, and the mean cross-entropy if ``targets``.

        Target ids equal to -1 are ignored in the loss (e.g. padding). With ``kv_cache``, ``idx`` holds
        only the tokens after those already in the cache: they get positions past .. past + T - 1, and
        their keys and values are appended to the cache.
        """
        past = 0 if kv_cache is None else kv_cache.length
        self._check_input(idx, targets, past)
        B, T = idx.shape
        x = self.tok_emb(idx)
        if self.config.position == "learned":
            x = x + self.pos_emb(torch.arange(past, past + T, device=idx.device))
        elif self.config.position == "sinusoidal":
            # scaled so that each component has the std of the learned table at initialisation (0.02);
            # Vaswani et al. instead multiply the embeddings by √d, which tying them to the lm head forbids
            table = sinusoidal_encoding(past + T, self.config.d_model)[past:]
            x = x + SINUSOIDAL_SCALE * table.to(x.device, x.dtype)
        x = self.drop(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, kv_cache, layer) if kv_cache is not None else block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(B * T, -1).float(), targets.reshape(B * T),
                                   ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, kv_cache: bool = False) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` (B, T) and return (B, T + new).

        Each step looks at the last ``context`` tokens, divides the last logits by ``temperature``
        (0 means greedy: always the most likely token), keeps the ``top_k`` most likely tokens and/or
        the smallest set whose probability reaches ``top_p``, and samples from what is left.

        ``kv_cache=True`` feeds the prompt once, then one token per step, keeping the keys and values
        in a :class:`KVCache`; the tokens are the same as without it. While the sequence fits in the
        context, that is all. Past the context the window slides: the learned position of every token
        in it changes, and the keys of deeper layers depend on tokens that have left the window, so no
        stored key stays valid. The cached path then recomputes the window at every step, exactly as
        the cache-free one does (a rolling cache that kept the old keys would be faster but would
        generate different tokens).
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, but it is {max_new_tokens!r}.")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), but it is {temperature}.")
        was_training = self.training
        self.eval()
        try:
            cache = KVCache(self.config.n_layer) if kv_cache else None
            for _ in range(max_new_tokens):
                if cache is not None and idx.shape[1] <= self.config.context:
                    logits, _ = self(idx[:, cache.length:], kv_cache=cache)   # only the tokens not yet seen
                else:
                    logits, _ = self(idx[:, -self.config.context:])
                logits = logits[:, -1, :].float()
                if temperature == 0:
                    next_id = logits.argmax(dim=-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k is not None:
                        logits = top_k_filter(logits, top_k)
                    if top_p is not None:
                        logits = top_p_filter(logits, top_p)
                    probs = torch.softmax(logits, dim=-1)
                    next_id = torch.multinomial(probs, num_samples=1, generator=generator)
                idx = torch.cat([idx, next_id], dim=1)
        finally:
            self.train(was_training)
        return idx


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits along the last axis, set the rest to -inf (ties at the k-th kept)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k must be a positive int, but it is {k!r}.")
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]                  # the k-th largest, per row
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probabilities sum to ≥ p.

    Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration", Sec. 3.1 (Eq. 2).
    The most likely token is always kept.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], but it is {p!r}.")
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs                            # mass of the better tokens
    drop_sorted = mass_before >= p                                        # already reached p without it
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


# ----------------------------------------------------------------------------------------------
# Counting: parameters, FLOPs, memory
# ----------------------------------------------------------------------------------------------


def _embedding_parameters(model: nn.Module) -> set[int]:
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear):
        ids.add(id(head.weight))
    return ids


def count_params(model: nn.Module, non_embedding: bool = True) -> int:
    """The number of parameters of ``model``, each distinct tensor counted once.

    Tied weights: the matrix shared by the token embedding and the lm head is one tensor, so it is
    counted once in the total (as ``transformers`` does). ``non_embedding=True`` leaves out every
    ``nn.Embedding`` (token and position embeddings) and the lm head's matrix, tied or not -- the
    vocabulary-sized matrices that Kaplan et al. 2020 (Table 1) exclude from N.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"count_params expects an nn.Module, but got a {type(model).__name__}.")
    excluded = _embedding_parameters(model) if non_embedding else set()
    return sum(p.numel() for p in model.parameters() if id(p) not in excluded)


def param_count_formula(config: GPTConfig, non_embedding: bool = True) -> int:
    """The parameter count of ``GPT(config)`` by formula.

    Per block: attention 4d² (+ 4d biases), MLP 8d² (+ 4d + d biases), two LayerNorms 2·2d
    (γ and β; γ only without biases): 12d² + 13d with biases, 12d² + 2d without. Then the final
    LayerNorm. Embeddings add V·d (tokens; the tied lm head adds nothing) + T·d (learned positions
    only), and an untied lm head another V·d.
    """
    d, L, V, T = config.d_model, config.n_layer, config.vocab_size, config.context
    if config.bias:
        per_block, final_ln = 12 * d * d + 13 * d, 2 * d
    else:
        per_block, final_ln = 12 * d * d + 2 * d, d
    n = L * per_block + final_ln
    if not non_embedding:
        n += V * d + (T * d if config.position == "learned" else 0) + (0 if config.tie_weights else V * d)
    return n


def flops_per_token(config: GPTConfig, training: bool = True, seq_len: int | None = None) -> int:
    """Matrix-multiply FLOPs per token (2 per multiply-add), as ``FlopCounterMode`` counts them.

        forward  = 24·L·d²          the weight matrices of the blocks, 2·12·L·d² (biases and
                                    LayerNorms are not matrix products, so this is a little below 2N)
                 + 2·d·V            the lm head (logits)
                 + 4·L·T·d          attention: QKᵀ and A·V, 2·T·d each per layer, over the full
                                    context T (the causal mask makes half of it wasted work; flash
                                    kernels skip it, this count does not)
        training = 3 × forward      the backward pass costs two matmuls per forward matmul
                                    (gradient w.r.t. the input and w.r.t. the weight)

    So training = 72·L·d² + 6·d·V + 12·L·T·d per token. The attention term is PaLM's convention
    (Chowdhery et al. 2022, App. B: 6N + 12·L·H·Q·T, with H·Q = d); Kaplan et al. 2020 (Table 1)
    count 2·L·T·d forward, half of it, and write C ≈ 6N, dropping the smaller terms. LayerNorm,
    GELU, softmax, RoPE and additions are not counted (O(d) per token, not O(d²)). ``seq_len``
    defaults to the full context.
    """
    if not isinstance(config, GPTConfig):
        raise TypeError(f"flops_per_token expects a GPTConfig, but got a {type(config).__name__}.")
    T = config.context if seq_len is None else seq_len
    d, L, V = config.d_model, config.n_layer, config.vocab_size
    forward = 2 * 12 * L * d * d + 2 * d * V + 4 * L * T * d
    return 3 * forward if training else forward


# Tensors autograd keeps for the backward pass, in units of B·T·d floats, per block of this file's
# GPT (with dropout 0; measured by saved_activation_bytes in tests/test_model.py):
#   LayerNorm ×2: its input (the fused kernel keeps only that, and a mean and 1/σ per vector)   2 × 1
#   attention:    the qkv input, q/k/v (one 3d buffer), the attention output   1 + 3 + 1
#                 (the kernels return it laid out as (B, T, H, d_head), so merging the heads
#                 is a free view and W_o's input shares that buffer)
#   MLP:          the fc input, the GELU input (4d) and its output (4d)        1 + 4 + 4
# (03's LayerNorm written out in elementwise ops would keep x − μ and x̂ too: 2 × 3 instead of 2 × 1.)
ACTIVATION_UNITS_PER_BLOCK = 16


def memory_estimate(config: GPTConfig, batch_size: int, seq_len: int | None = None,
                    bytes_per_value: int = 4) -> dict[str, int]:
    """Bytes needed to train ``GPT(config)`` with AdamW on one (batch_size, seq_len) batch in fp32.

    * weights: 4 bytes per parameter; gradients: the same again;
    * AdamW state: two moments (exp_avg, exp_avg_sq) per parameter, 8 bytes;
    * activations kept for the backward pass: ``ACTIVATION_UNITS_PER_BLOCK``·B·T·d values per block,
      the final LayerNorm's input (B·T·d) and the lm-head input (B·T·d), and two B·T·V tensors for the
      logits and their log-softmax inside the cross-entropy.

    Ignores allocator rounding, temporary buffers of the backward pass and the framework itself.
    """
    T = config.context if seq_len is None else seq_len
    if batch_size < 1 or T < 1:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {T}.")
    P = param_count_formula(config, non_embedding=False)
    B, d, V, L = batch_size, config.d_model, config.vocab_size, config.n_layer
    activations = (L * ACTIVATION_UNITS_PER_BLOCK + 2) * B * T * d + 2 * B * T * V
    estimate = {"weights": P * bytes_per_value, "gradients": P * bytes_per_value,
                "adam_states": 2 * P * bytes_per_value, "activations": activations * bytes_per_value}
    estimate["total"] = sum(estimate.values())
    return estimate


def saved_activation_bytes(model: nn.Module, *inputs: torch.Tensor) -> int:
    """Measure the bytes autograd saves for the backward pass of ``model(*inputs)``.

    Counts every distinct storage packed by ``torch.autograd.graph.saved_tensors_hooks`` that is not
    a parameter, plus the returned logits (the caller holds them too). Runs one forward pass.
    """
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in parameters:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*inputs)
    logits = out[0] if isinstance(out, tuple) else out
    storages[logits.untyped_storage().data_ptr()] = logits.untyped_storage().nbytes()
    return sum(storages.values())


# ----------------------------------------------------------------------------------------------
# The same shape in Hugging Face transformers (for cross-checks)
# ----------------------------------------------------------------------------------------------


def gpt2_config(config: GPTConfig):
    """A ``transformers.GPT2Config`` of the same shape as ``config`` (exact GELU, no dropout)."""
    from transformers import GPT2Config

    if not config.bias:
        raise ValueError("GPT-2 always has biases; build the GPTConfig with bias=True to compare.")
    return GPT2Config(vocab_size=config.vocab_size, n_positions=config.context, n_embd=config.d_model,
                      n_layer=config.n_layer, n_head=config.n_head, n_inner=config.d_ff,
                      activation_function="gelu", layer_norm_epsilon=config.layer_norm_eps,
                      resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
                      tie_word_embeddings=config.tie_weights, bos_token_id=0, eos_token_id=0)


@torch.no_grad()
def load_gpt2_weights(model: GPT, gpt2_state_dict: dict[str, torch.Tensor]) -> GPT:
    """Copy the weights of a ``transformers`` GPT2LMHeadModel's state dict into ``model``.

    GPT-2 stores its Linear layers as ``Conv1D`` with the matrix transposed (in × out), so each of
    them is transposed on the way in. Returns ``model``.
    """
    sd = {k.removeprefix("transformer."): v for k, v in gpt2_state_dict.items()}
    model.tok_emb.weight.copy_(sd["wte.weight"])
    model.pos_emb.weight.copy_(sd["wpe.weight"])
    ours_to_theirs = {"ln_1": "ln_1", "ln_2": "ln_2", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj",
                      "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
    for i, block in enumerate(model.blocks):
        for ours, theirs in ours_to_theirs.items():
            module = block.get_submodule(ours)
            weight = sd[f"h.{i}.{theirs}.weight"]
            module.weight.copy_(weight if ours.startswith("ln") else weight.T)
            module.bias.copy_(sd[f"h.{i}.{theirs}.bias"])
    model.ln_f.weight.copy_(sd["ln_f.weight"])
    model.ln_f.bias.copy_(sd["ln_f.bias"])
    if not model.config.tie_weights:
        model.lm_head.weight.copy_(gpt2_state_dict["lm_head.weight"])
    return model
