"""Checks of notebooks/03_transformer_block.ipynb (exercises 03.*), with their hints."""

from __future__ import annotations

from collections.abc import Callable

import torch

from course_lib.checks.framework import (
    register_hint, fail, call_student, require_tensor, compare, passed,
)


# ----------------------------------------------------------------------------------------------
# ---- 03_transformer_block: LayerNorm from scratch, the parameter count of a GPT
# ----------------------------------------------------------------------------------------------

register_hint("03.1", "mean = x.mean(dim=-1, keepdim=True); var = ((x - mean) ** 2).mean(dim=-1, keepdim=True) "
                      "(divide by d, not d - 1); return gamma * (x - mean) / torch.sqrt(var + eps) + beta.")
register_hint("03.2", "Per block: 4 d x d attention matrices + 4d biases, a d x 4d and a 4d x d MLP matrix + 4d + d "
                      "biases, two LayerNorms of 2d each. Then the final LayerNorm (2d), the token embedding "
                      "(V d) and the position embedding (T d); the tied lm head adds nothing.")


def _layer_norm64(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float, dims=(-1,),
                  unbiased: bool = False, eps_outside: bool = False) -> torch.Tensor:
    x = x.double()
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, keepdim=True, correction=1 if unbiased else 0)
    std = var.sqrt() + eps if eps_outside else (var + eps).sqrt()
    return gamma.double() * (x - mean) / std + beta.double()


def check_layer_norm(fn: Callable[..., torch.Tensor]) -> None:
    """Exercise 03.1: ``fn(x, gamma, beta, eps=1e-5)`` normalises x over its last axis, then scales
    by gamma and shifts by beta -- the same as ``torch.nn.functional.layer_norm``."""
    __tracebackhide__ = True
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    cases = [  # (case, x, gamma, beta, eps)
        ("one vector of d=4 with gamma = 1, beta = 0", torch.tensor([1.0, 2.0, 4.0, 7.0]), torch.ones(4),
         torch.zeros(4), 1e-5),
        ("a (3, 5, 6) batch with random gamma and beta", 3 * r(3, 5, 6) + 1, r(6), r(6), 1e-5),
        ("a (4, 8) batch of tiny values (variance about 1e-4) with eps=1e-2", 1e-2 * r(4, 8), r(8), r(8), 1e-2),
        ("a (2, 3, 4, 6) batch", r(2, 3, 4, 6), r(6), r(6), 1e-5),
    ]
    for case, x, gamma, beta, eps in cases:
        result = call_student(fn, x.clone(), gamma.clone(), beta.clone(), eps=eps, case=case)
        result = require_tensor(result, "your layer_norm")
        expected = torch.nn.functional.layer_norm(x.double(), (x.shape[-1],), gamma.double(), beta.double(), eps)
        if result.shape != x.shape:
            fail(f"your layer_norm returns shape {tuple(result.shape)} on {case}, but it should keep the "
                 f"input's shape {tuple(x.shape)} (reduce with keepdim=True so the statistics broadcast).")
        wrong: dict[str, Callable[[], torch.Tensor]] = {
            "you used the unbiased variance (dividing by d - 1); LayerNorm divides by d (correction=0, "
            "or unbiased=False)": lambda: _layer_norm64(x, gamma, beta, eps, unbiased=True),
            "you added eps outside the square root; it belongs inside: (x - mean) / sqrt(var + eps)":
                lambda: _layer_norm64(x, gamma, beta, eps, eps_outside=True),
            "you forgot eps; add it to the variance inside the square root":
                lambda: _layer_norm64(x, gamma, beta, 0.0),
            "you forgot gamma and beta: scale by gamma and then add beta":
                lambda: _layer_norm64(x, torch.ones_like(gamma), torch.zeros_like(beta), eps),
            "you forgot gamma: multiply the normalised x by gamma":
                lambda: _layer_norm64(x, torch.ones_like(gamma), beta, eps),
            "you forgot beta: add beta after scaling by gamma":
                lambda: _layer_norm64(x, gamma, torch.zeros_like(beta), eps),
            "you divided by the variance instead of its square root (the standard deviation)":
                lambda: gamma.double() * (x.double() - x.double().mean(-1, keepdim=True))
                / (x.double().var(-1, keepdim=True, correction=0) + eps) + beta.double(),
            "you did not subtract the mean before dividing by the standard deviation":
                lambda: gamma.double() * x.double() / (x.double().var(-1, keepdim=True, correction=0) + eps).sqrt()
                + beta.double(),
        }
        if x.dim() > 1:
            wrong["you normalised over the first axis (dim=0); LayerNorm normalises each vector over its "
                  "last axis (dim=-1)"] = lambda: _layer_norm64(x, gamma, beta, eps, dims=(0,))
            wrong["you normalised over every element at once; LayerNorm takes the mean and variance of each "
                  "vector separately, over the last axis with keepdim=True"] = \
                lambda: _layer_norm64(x, gamma, beta, eps, dims=tuple(range(x.dim())))
        if x.dim() > 2:
            wrong["you normalised over axis -2; LayerNorm normalises over the last axis (dim=-1)"] = \
                lambda: _layer_norm64(x, gamma, beta, eps, dims=(-2,))
        compare(result, expected, what="your layer_norm", case=case, wrong_answers=wrong, atol=1e-4, rtol=1e-4)
    passed("check_layer_norm", f"your layer_norm matches torch.nn.functional.layer_norm on {len(cases)} cases "
                               f"(batch axes, tiny variances, random gamma and beta).")


def check_param_count(fn: Callable[..., int]) -> None:
    """Exercise 03.2: ``fn(vocab_size, context, n_layer, d_model)`` returns the number of parameters of
    ``course_lib.model.GPT`` with biases and tied embeddings (each shared tensor counted once)."""
    __tracebackhide__ = True
    from course_lib.model import GPT, GPTConfig, count_params, param_count_formula

    cases = [(65, 64, 2, 64), (50257, 1024, 12, 768), (1000, 32, 1, 16), (256, 128, 6, 384)]
    for V, T, L, d in cases:
        case = f"vocab_size={V}, context={T}, n_layer={L}, d_model={d}"
        result = call_student(fn, vocab_size=V, context=T, n_layer=L, d_model=d, case=case)
        if isinstance(result, torch.Tensor) and result.numel() == 1:
            result = result.item()
        if isinstance(result, float) and result.is_integer():
            result = int(result)
        if isinstance(result, bool) or not isinstance(result, int):
            fail(f"your parameter count should be an int, but on {case} it is a {type(result).__name__} "
                 f"({result!r}).")
        config = GPTConfig(vocab_size=V, context=T, n_layer=L, n_head=1, d_model=d)
        expected = param_count_formula(config, non_embedding=False)
        if V * d < 1e6:   # small enough to build: the formula must agree with the real model
            assert count_params(GPT(config), non_embedding=False) == expected
        if result == expected:
            continue
        block, ln = 12 * d * d + 13 * d, 2 * d
        wrong = {
            "you counted only 12·L·d²; that is the rule of thumb for the block matrices, add the biases, the "
            "LayerNorms and the embeddings": 12 * L * d * d,
            "you left out the token and position embeddings (that is the non-embedding count N)":
                L * block + ln,
            "you counted the tied lm head a second time; it is the token embedding matrix itself":
                expected + V * d,
            "you forgot the position embedding (context × d_model)": expected - T * d,
            "you forgot the token embedding (vocab_size × d_model)": expected - V * d,
            "you forgot the biases of the Linear layers (4d in attention, 4d + d in the MLP, per block)":
                expected - L * 9 * d,
            "you forgot the LayerNorms (γ and β: 2d each, two per block and a final one)":
                expected - L * 4 * d - ln,
            "you forgot the final LayerNorm (2d)": expected - ln,
            "you forgot the LayerNorms' β (only γ counted)": expected - L * 2 * d - d,
            "the MLP's hidden size is 4·d_model, so its two matrices hold 8d², not 2d²":
                expected - L * (6 * d * d + 3 * d),
            "you counted the MLP with one d × 4d matrix only; it has two (d × 4d and 4d × d)":
                expected - L * (4 * d * d + d),
            "attention has four d × d matrices (W_q, W_k, W_v, W_o), you counted three":
                expected - L * (d * d + d),
        }
        for sentence, value in wrong.items():
            if result == value:
                fail(f"your parameter count is wrong on {case}: {sentence}.")
        fail(f"your parameter count on {case} is {result:,}, but GPT has {expected:,} parameters "
             f"(off by {result - expected:+,}).")
    passed("check_param_count", f"your formula matches the parameter count of the real model on {len(cases)} "
                                f"shapes, GPT-2 small's (124,439,808) among them.")
