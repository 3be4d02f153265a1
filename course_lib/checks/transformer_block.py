"""Checks of notebooks/03_transformer_block.ipynb (exercises 03.1-03.4), with their hints."""

from __future__ import annotations

from collections.abc import Callable

import torch

from course_lib.checks.framework import (
    exercise, register_hint, fail, call_student, require_tensor, close, compare, passed,
)


# ----------------------------------------------------------------------------------------------
# ---- 03_transformer_block: LayerNorm and its backward pass, the parameter count, RoPE
# ----------------------------------------------------------------------------------------------

register_hint(
    "03.1",
    "Each vector (the last axis) is normalised on its own: subtract its mean, divide by its standard "
    "deviation, then scale by gamma and shift by beta.",
    "Take the mean and the *biased* variance (divide by d, not d - 1) over dim=-1 with keepdim=True so they "
    "broadcast back; eps goes inside the square root, sqrt(var + eps); keep the default eps=1e-5 and do not "
    "change x in place.",
    "mean = x.mean(-1, keepdim=True); var = ((x - mean) ** 2).mean(-1, keepdim=True); "
    "return gamma * (x - mean) / torch.sqrt(var + eps) + beta")
register_hint(
    "03.4",
    "Count block by block: which weight matrices and bias vectors does one block hold, and what sits outside "
    "the blocks (embeddings, the final LayerNorm, the lm head that is tied to the token embedding)?",
    "Per block: attention 4 d x d matrices + 4d biases; MLP d x 4d and 4d x d matrices + 4d + d biases; two "
    "LayerNorms of 2d each. Outside: the final LayerNorm (2d), the token embedding (V d), the position "
    "embedding (T d); the tied lm head adds nothing.",
    "d = d_model; return n_layer * (12 * d * d + 13 * d) + 2 * d + vocab_size * d + context * d")
register_hint(
    "03.2",
    "y = gamma ⊙ x̂ + beta with x̂ = (x - μ)/σ: gamma and beta are shared by every position, so their "
    "gradients add up over all leading axes; x reaches the loss three ways, directly and through μ and σ.",
    "Recompute μ, σ = sqrt(var + eps) and x̂. dbeta = dy summed over every axis but the last; dgamma = "
    "(dy ⊙ x̂) summed the same way (a sum, not a mean). With g = dy ⊙ gamma: dx = (g - mean(g) - x̂ ⊙ mean(g ⊙ x̂)) "
    "/ σ, the means over the last axis: the mean(g) term is the path through μ, the x̂ term the path through σ.",
    "dx = (g - g.mean(-1, keepdim=True) - x_hat * (g * x_hat).mean(-1, keepdim=True)) / sigma; "
    "rows = (-1, x.shape[-1]); return dx, (dy * x_hat).reshape(rows).sum(0), dy.reshape(rows).sum(0)")
register_hint(
    "03.3",
    "RoPE turns each pair of neighbouring dimensions (x[2i], x[2i+1]) of the vector at position m into a "
    "point in the plane and rotates it by the angle m·θ_i, with a different frequency θ_i per pair.",
    "θ_i = 10000^(-2i/d) for i = 0 .. d/2 - 1; angles = m·θ_i for m = 0 .. T-1 (the second-to-last axis of x), "
    "shape (T, d/2). Split x[..., 0::2] and x[..., 1::2], rotate each pair by [[cos, -sin], [sin, cos]], and "
    "interleave them back (torch.stack(..., dim=-1).flatten(-2)). Keep x's dtype; do not change x in place.",
    "return torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1).flatten(-2)")


def _unchanged03(given: dict[str, torch.Tensor], originals: dict[str, torch.Tensor], what: str, case: str) -> None:
    __tracebackhide__ = True
    for name, tensor in given.items():
        if not torch.equal(tensor, originals[name]):
            fail(f"your {what} changed its input {name} in place on {case} (an in-place op such as -=, /= or "
                 f"mul_()); compute into a new tensor so the caller's {name} stays as it was.")


def _dtype03(result: torch.Tensor, dtype: torch.dtype, what: str, case: str) -> None:
    __tracebackhide__ = True
    if result.dtype != dtype:
        fail(f"{what} has dtype {result.dtype} on {case}, but the input is {dtype}; keep the input's dtype "
             f"(no .float(), and no torch.tensor(...) rebuilt from the numbers).")


def _layer_norm64(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float, dims=(-1,),
                  unbiased: bool = False, eps_outside: bool = False) -> torch.Tensor:
    x = x.double()
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, keepdim=True, correction=1 if unbiased else 0)
    std = var.sqrt() + eps if eps_outside else (var + eps).sqrt()
    return gamma.double() * (x - mean) / std + beta.double()


@exercise("03.1", points=1, forbid=("course_lib.parts.model:LayerNorm", "course_lib.parts.model:layer_norm",))
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
        ("a (3, 8) batch of values of size ~1e-3, called without eps (the default must be 1e-5)",
         1e-3 * r(3, 8), r(8), r(8), None),
        ("a float64 (2, 5, 6) batch", (2 * r(2, 5, 6) - 1).double(), r(6).double(), r(6).double(), 1e-5),
    ]
    for case, x, gamma, beta, eps in cases:
        given = {"x": x.clone(), "gamma": gamma.clone(), "beta": beta.clone()}
        if eps is None:
            result = call_student(fn, given["x"], given["gamma"], given["beta"], case=case)
            eps = 1e-5
        else:
            result = call_student(fn, given["x"], given["gamma"], given["beta"], eps=eps, case=case)
        _unchanged03(given, {"x": x, "gamma": gamma, "beta": beta}, "layer_norm", case)
        result = require_tensor(result, "your layer_norm")
        if result.shape == x.shape:
            _dtype03(result, x.dtype, "your layer_norm", case)
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
        if "without eps" in case:
            for other in (1e-3, 1e-6, 1e-8, 1e-12, 0.0):
                wrong[f"your default eps is {other:g}; it must be 1e-5, as in layer_norm(x, gamma, beta, eps=1e-5)"] = \
                    lambda other=other: _layer_norm64(x, gamma, beta, other)
        compare(result, expected, what="your layer_norm", case=case, wrong_answers=wrong, atol=1e-4, rtol=1e-4)
    passed("check_layer_norm", f"your layer_norm matches torch.nn.functional.layer_norm on {len(cases)} cases "
                               f"(batch axes, tiny variances, the default eps, float64, random gamma and beta).")


def _whole_number(value: object) -> object:
    """An int for any whole number the student may return (int, a whole float, a NumPy or one-element torch
    scalar); anything else unchanged, for the check to name."""
    import numbers

    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():
        value = value.item()        # np.int64, np.float32, a 0-d array
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer():
        return int(value)
    return value


@exercise("03.4", points=1, forbid=(
    "course_lib.parts.model:param_count_formula",
    "course_lib.parts.model:count_params",
    "course_lib.parts.model:GPT",
))
def check_param_count(fn: Callable[..., int]) -> None:
    """Exercise 03.4: ``fn(vocab_size, context, n_layer, d_model)`` returns the number of parameters of
    ``course_lib.parts.model.GPT`` with biases and tied embeddings (each shared tensor counted once)."""
    __tracebackhide__ = True
    from course_lib.parts.model import GPT, GPTConfig, count_params, param_count_formula

    cases = [(65, 64, 2, 64), (50257, 1024, 12, 768), (1000, 32, 1, 16), (256, 128, 6, 384)]
    for V, T, L, d in cases:
        case = f"vocab_size={V}, context={T}, n_layer={L}, d_model={d}"
        result = _whole_number(call_student(fn, vocab_size=V, context=T, n_layer=L, d_model=d, case=case))
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


def _layer_norm_backward64(x: torch.Tensor, gamma: torch.Tensor, dy: torch.Tensor, eps: float
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dgamma, dbeta) by autograd in float64: the independent reference of exercise 03.2."""
    x64 = x.detach().double().clone().requires_grad_(True)
    g64 = gamma.detach().double().clone().requires_grad_(True)
    b64 = torch.zeros_like(g64, requires_grad=True)
    torch.nn.functional.layer_norm(x64, (x.shape[-1],), g64, b64, eps).backward(dy.double())
    return x64.grad, g64.grad, b64.grad


@exercise("03.2", points=2, forbid=("course_lib.parts.model:layer_norm_backward",), autograd=True)
def check_layer_norm_backward(fn: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """Exercise 03.2: ``fn(x, gamma, dy, eps=1e-5)`` returns ``(dx, dgamma, dbeta)`` for
    y = LayerNorm(x) over the last axis (with gamma, beta), given dy = ∂loss/∂y; compared with autograd in float64."""
    __tracebackhide__ = True
    g = torch.Generator().manual_seed(5)

    def r(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=g, dtype=torch.float64)

    cases = [  # (case, x, gamma, dy, eps)
        ("a (4, 6) batch", 2 * r(4, 6) + 1, r(6), r(4, 6), 1e-5),
        ("a (2, 3, 5) batch (two leading axes)", r(2, 3, 5, scale=3.0), r(5), r(2, 3, 5), 1e-5),
        ("one vector of d=4", torch.tensor([1.0, 2.0, 4.0, 7.0], dtype=torch.float64), r(4), r(4), 1e-5),
        ("a (3, 8) batch of values of size ~0.01 with eps=1e-3", r(3, 8, scale=0.01), r(8), r(3, 8), 1e-3),
        ("a (3, 4) batch, called without eps (the default must be 1e-5)", r(3, 4, scale=0.003), r(4), r(3, 4), None),
    ]
    for case, x, gamma, dy, eps in cases:
        given = {"x": x.clone(), "gamma": gamma.clone(), "dy": dy.clone()}
        if eps is None:
            result = call_student(fn, given["x"], given["gamma"], given["dy"], case=case)
            eps = 1e-5
        else:
            result = call_student(fn, given["x"], given["gamma"], given["dy"], eps=eps, case=case)
        _unchanged03(given, {"x": x, "gamma": gamma, "dy": dy}, "layer_norm_backward", case)
        if not isinstance(result, (tuple, list)) or len(result) != 3:
            fail(f"your layer_norm_backward should return three tensors (dx, dgamma, dbeta), but on {case} it "
                 f"returned a {type(result).__name__}" + (f" of length {len(result)}" if isinstance(result, (tuple, list))
                                                          else "") + ".")
        dx, dgamma, dbeta = result
        d = x.shape[-1]
        for name, value, shape in (("dx", dx, x.shape), ("dgamma", dgamma, (d,)), ("dbeta", dbeta, (d,))):
            require_tensor(value, f"your {name}")
            if tuple(value.shape) != tuple(shape):
                extra = ""
                if name != "dx" and value.dim() > 1:
                    extra = (" (gamma and beta are shared by every position of every example, so sum over "
                             "*every* leading axis, not only the first)")
                fail(f"your {name} has shape {tuple(value.shape)} on {case}, but it should have shape "
                     f"{tuple(shape)}{extra}.")
            _dtype03(value, torch.float64, f"your {name}", case)
        exp_dx, exp_dgamma, exp_dbeta = _layer_norm_backward64(x, gamma, dy, eps)
        lead = tuple(range(x.dim() - 1))
        n_rows = max(1, x.numel() // d)
        var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
        sigma = (var + eps).sqrt()
        x_hat = (x - mean) / sigma

        def dx_of(grad_hat: torch.Tensor, sig: torch.Tensor, xh: torch.Tensor, mu_term: bool = True,
                  sigma_term: bool = True) -> torch.Tensor:
            out = grad_hat.clone()
            if mu_term:
                out = out - grad_hat.mean(-1, keepdim=True)
            if sigma_term:
                out = out - xh * (grad_hat * xh).mean(-1, keepdim=True)
            return out / sig

        g_hat = dy * gamma
        var_unbiased = x.var(dim=-1, keepdim=True, correction=1) if d > 1 else var
        sigma_unbiased = (var_unbiased + eps).sqrt()
        compare(dx, exp_dx, what="your dx", case=case, atol=1e-8, rtol=1e-7, wrong_answers={
            "you left out the path through the mean μ: subtract mean(g) over the last axis (g = dy ⊙ gamma)":
                lambda: dx_of(g_hat, sigma, x_hat, mu_term=False),
            "you left out the path through σ: subtract x̂ ⊙ mean(g ⊙ x̂) over the last axis":
                lambda: dx_of(g_hat, sigma, x_hat, sigma_term=False),
            "you left out both paths through μ and σ: dx is not just g / σ":
                lambda: dx_of(g_hat, sigma, x_hat, mu_term=False, sigma_term=False),
            "you forgot gamma: the gradient reaching x̂ is g = dy ⊙ gamma":
                lambda: dx_of(dy, sigma, x_hat),
            "you dropped eps from σ; σ = sqrt(var + eps), as in the forward pass":
                lambda: dx_of(g_hat, var.sqrt(), (x - mean) / var.sqrt()),
            "you used the unbiased variance (d - 1); LayerNorm's σ divides by d":
                lambda: dx_of(g_hat, sigma_unbiased, (x - mean) / sigma_unbiased),
            "you multiplied by σ instead of dividing by it": lambda: dx_of(g_hat, sigma, x_hat) * sigma ** 2,
            f"you divided by the number of rows ({n_rows}); dy already holds the loss's gradient, average "
            f"nothing again": lambda: exp_dx / n_rows,
        })
        for name, value, expected, per_row, wrong_factor in (
                ("dgamma", dgamma, exp_dgamma, dy * x_hat, "dy ⊙ x̂"), ("dbeta", dbeta, exp_dbeta, dy, "dy")):
            wrong = {
                f"you averaged {wrong_factor} over the rows; gamma and beta are used by every row, so their "
                f"gradients are the *sum* over the batch and positions, not the mean": lambda per_row=per_row:
                    per_row.mean(dim=lead) if lead else per_row,
            }
            if name == "dgamma":
                wrong["you used x where x̂ belongs: dgamma = sum of dy ⊙ x̂, the normalised input"] = \
                    lambda: (dy * x).sum(dim=lead) if lead else dy * x
                wrong["you multiplied by gamma: dgamma = sum of dy ⊙ x̂ (gamma is what you differentiate by)"] = \
                    lambda: (dy * x_hat * gamma).sum(dim=lead) if lead else dy * x_hat * gamma
            compare(value, expected, what=f"your {name}", case=case, atol=1e-8, rtol=1e-7, wrong_answers=wrong)
    passed("check_layer_norm_backward", f"dx, dgamma and dbeta equal autograd's in float64 on {len(cases)} cases "
                                        f"(extra batch axes, a single vector, small variances, the default eps).")


def _rope64(x: torch.Tensor, *, base: float = 10000.0, halves: bool = False, exponent: float = 2.0,
            sign: float = 1.0, start: int = 0, T_axis: int = -2) -> torch.Tensor:
    """RoPE in float64 (and the variants students write by mistake)."""
    x = x.double()
    T, d = x.shape[T_axis], x.shape[-1]
    theta = base ** (-exponent * torch.arange(d // 2, dtype=torch.float64) / d)
    angles = (torch.arange(T, dtype=torch.float64) + start)[:, None] * theta[None, :]
    cos, sin = angles.cos(), sign * angles.sin()
    if T_axis == 0 and x.dim() > 2:        # positions along the first axis, broadcast over the others
        cos, sin = (t.view(T, *[1] * (x.dim() - 2), d // 2) for t in (cos, sin))
    if halves:
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    xe, xo = x[..., 0::2], x[..., 1::2]
    return torch.stack((xe * cos - xo * sin, xe * sin + xo * cos), dim=-1).flatten(-2)


@exercise("03.3", points=1, forbid=(
    "course_lib.parts.positions:apply_rope",
    "course_lib.parts.positions:rope_angles",
))
def check_rope(fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Exercise 03.3: ``fn(x)`` rotates each pair (x[..., m, 2i], x[..., m, 2i+1]) by the angle m·θ_i,
    θ_i = 10000^(-2i/d), for x of shape (..., T, d) (Su et al. 2021, Eq. 34). Also checks the property that
    makes it useful: the score ⟨rope(q)_m, rope(k)_n⟩ depends on m and n only through n - m."""
    __tracebackhide__ = True
    g = torch.Generator().manual_seed(6)
    cases = [
        ("one (T=6, d=4) sequence", torch.randn(6, 4, generator=g)),
        ("a batch of 2 with 3 heads, T=7, d=8", torch.randn(2, 3, 7, 8, generator=g)),
        ("a float64 (T=40, d=16) sequence", torch.randn(40, 16, generator=g, dtype=torch.float64)),
        ("a (T=5, d=2) sequence (a single pair)", torch.randn(5, 2, generator=g)),
    ]
    for case, x in cases:
        given = x.clone()
        result = call_student(fn, given, case=case)
        _unchanged03({"x": given}, {"x": x}, "rope", case)
        result = require_tensor(result, "your rope")
        if result.shape != x.shape:
            fail(f"your rope returns shape {tuple(result.shape)} on {case}, but a rotation keeps the shape "
                 f"{tuple(x.shape)} (interleave the rotated pairs back with torch.stack(..., dim=-1).flatten(-2)).")
        _dtype03(result, x.dtype, "your rope", case)
        expected = _rope64(x)
        tol = 1e-5
        if close(result, expected, atol=tol, rtol=tol):
            continue
        wrong: dict[str, Callable[[], torch.Tensor]] = {
            "you paired dimension i with i + d/2 (the layout of GPT-NeoX and Llama's code); this exercise pairs "
            "the neighbours 2i and 2i + 1, as in Su et al. (Eq. 34)": lambda: _rope64(x, halves=True),
            "your frequencies are 10000^(-i/d); they are θ_i = 10000^(-2i/d), i = 0 .. d/2 - 1":
                lambda: _rope64(x, exponent=1.0),
            "your frequencies grow with i; θ_i = 10000^(-2i/d) shrinks from 1 (fast pairs) to ~1/10000 (slow pairs)":
                lambda: _rope64(x, exponent=-2.0),
            "you rotate by -m·θ_i: the first output of a pair is x_2i·cos - x_2i+1·sin, the second "
            "x_2i·sin + x_2i+1·cos": lambda: _rope64(x, sign=-1.0),
            "your positions start at 1; the first row (position 0) is not rotated at all":
                lambda: _rope64(x, start=1),
            "you took the positions from the first axis; they run along the second-to-last axis (T), "
            "whatever batch or head axes come first": lambda: _rope64(x, T_axis=0) if x.dim() > 2 else x * 0,
            "you returned x unrotated": lambda: x.double(),
        }
        for sentence, compute in wrong.items():
            try:
                candidate = compute()
            except Exception:  # noqa: BLE001 -- a variant that cannot be computed here does not apply
                continue
            if candidate.shape == result.shape and close(result, candidate, atol=tol, rtol=tol):
                fail(f"your rope is wrong on {case}: {sentence}.")
        norms_kept = torch.allclose(result.detach().double().norm(dim=-1), x.double().norm(dim=-1), atol=1e-4)
        if not norms_kept:
            fail(f"your rope changes the length of the vectors on {case}; a rotation keeps every pair's length "
                 f"(cos² + sin² = 1): check that each output pair uses cos and sin of the same angle.")
        compare(result, expected, what="your rope", case=case, atol=tol, rtol=tol)
    # the property: scores depend only on the offset
    q, k = torch.randn(16, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
    T = 9
    Q = require_tensor(call_student(fn, q.expand(T, 16).clone(), case="the offset test"), "your rope")
    K = require_tensor(call_student(fn, k.expand(T, 16).clone(), case="the offset test"), "your rope")
    scores = Q.double() @ K.double().T
    for offset in range(-T + 1, T):
        diagonal = torch.diagonal(scores, offset)
        if not torch.allclose(diagonal, diagonal[0].expand_as(diagonal), atol=1e-6):
            fail("your rope's scores ⟨rope(q)_m, rope(k)_n⟩ change along a diagonal n - m = const; with the "
                 "same angle m·θ_i for queries and keys they depend only on the offset n - m.")
    passed("check_rope", f"your rope equals Su et al.'s rotation on {len(cases)} cases (batch and head axes, "
                         f"float64, a single pair), and its scores depend only on the offset n - m.")
