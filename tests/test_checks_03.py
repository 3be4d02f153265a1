"""The checks of notebook 03 (transformer_block) accept correct answers and name each common mistake."""

import math

import pytest
import torch
import torch.nn.functional as F

from course_lib import checks
from course_lib.checks import CheckFailed, NotAttempted, StudentCodeError


def refused(check, fn, *phrases):
    with pytest.raises(CheckFailed) as info:
        check(fn)
    message = str(info.value)
    for phrase in phrases:
        assert phrase in message, message
    return message


def accepted(check, fn, capsys):
    check(fn)
    assert "passed" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- 03.1

def ln_right(x, gamma, beta, eps=1e-5):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return gamma * (x - mean) / torch.sqrt(var + eps) + beta


def ln_torch(x, gamma, beta, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), gamma, beta, eps)


def ln_var_mean(x, gamma, beta, eps=1e-5):
    var, mean = torch.var_mean(x, dim=-1, keepdim=True, unbiased=False)
    return (x - mean) * torch.rsqrt(var + eps) * gamma + beta


@pytest.mark.parametrize("fn", [ln_right, ln_torch, ln_var_mean])
def test_layer_norm_accepts(fn, capsys):
    accepted(checks.check_layer_norm, fn, capsys)


@pytest.mark.parametrize("fn, phrase", [
    (lambda x, g, b, eps=1e-5: g * (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + eps) + b,
     "unbiased variance"),
    (lambda x, g, b, eps=1e-5: g * (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True, correction=0) + eps) + b,
     "eps outside the square root"),
    (lambda x, g, b, eps=1e-5: g * (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True, correction=0) + b,
     "forgot eps"),
    (lambda x, g, b, eps=1e-5: ln_right(x, g, b, eps) if x.dim() == 1 else
     g * (x - x.mean(0, keepdim=True)) / torch.sqrt(x.var(0, keepdim=True, correction=0) + eps) + b,
     "first axis"),
    (lambda x, g, b, eps=1e-5: g * (x - x.mean()) / torch.sqrt(x.var(correction=0) + eps) + b, "every element"),
    (lambda x, g, b, eps=1e-5: ln_right(x, torch.ones_like(g), torch.zeros_like(b), eps), "forgot gamma and beta"),
    (lambda x, g, b, eps=1e-5: ln_right(x, torch.ones_like(g), b, eps), "forgot gamma"),
    (lambda x, g, b, eps=1e-5: ln_right(x, g, torch.zeros_like(b), eps), "forgot beta"),
    (lambda x, g, b, eps=1e-5: g * (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True, correction=0) + eps) + b,
     "variance instead of its square root"),
    (lambda x, g, b, eps=1e-5: g * x / torch.sqrt(x.var(-1, keepdim=True, correction=0) + eps) + b,
     "subtract the mean"),
    (lambda x, g, b, eps=1e-5: ln_right(x, g, b, eps).mean(-1), "keep the input's shape"),
])
def test_layer_norm_refuses(fn, phrase):
    refused(checks.check_layer_norm, fn, phrase)


def test_layer_norm_stub_and_crash():
    def stub(x, g, b, eps=1e-5):
        raise NotImplementedError("Exercise 03.1 is not done yet")

    with pytest.raises(NotAttempted, match="Exercise 03.1 is not done yet"):
        checks.check_layer_norm(stub)
    with pytest.raises(StudentCodeError, match="ZeroDivisionError"):
        checks.check_layer_norm(lambda x, g, b, eps=1e-5: 1 / 0)


def test_layer_norm_over_axis_minus_two_is_named():
    def axis_minus_two(x, g, b, eps=1e-5):
        if x.dim() < 3:
            return ln_right(x, g, b, eps)
        return g * (x - x.mean(-2, keepdim=True)) / torch.sqrt(x.var(-2, keepdim=True, correction=0) + eps) + b

    refused(checks.check_layer_norm, axis_minus_two, "axis -2")


# ---------------------------------------------------------------------------------------------- 03.2

def count_right(vocab_size, context, n_layer, d_model):
    d = d_model
    per_block = 4 * d * d + 4 * d + (d * 4 * d + 4 * d) + (4 * d * d + d) + 2 * 2 * d
    return n_layer * per_block + 2 * d + vocab_size * d + context * d


def count_by_building(vocab_size, context, n_layer, d_model):
    from course_lib.model import GPT, GPTConfig

    if vocab_size * d_model > 1e6:      # too big to build quickly: scale the formula of a small one
        return count_right(vocab_size, context, n_layer, d_model)
    model = GPT(GPTConfig(vocab_size=vocab_size, context=context, n_layer=n_layer, n_head=1, d_model=d_model))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("fn", [count_right, count_by_building,
                                lambda **kw: float(count_right(**kw)),
                                lambda **kw: torch.tensor(count_right(**kw))])
def test_param_count_accepts(fn, capsys):
    accepted(checks.check_param_count, fn, capsys)


def _minus(delta):
    return lambda vocab_size, context, n_layer, d_model: count_right(vocab_size, context, n_layer, d_model) - delta(
        vocab_size, context, n_layer, d_model)


@pytest.mark.parametrize("fn, phrase", [
    (lambda vocab_size, context, n_layer, d_model: 12 * n_layer * d_model ** 2, "only 12·L·d²"),
    (_minus(lambda V, T, L, d: V * d + T * d), "left out the token and position embeddings"),
    (_minus(lambda V, T, L, d: -V * d), "tied lm head a second time"),
    (_minus(lambda V, T, L, d: T * d), "forgot the position embedding"),
    (_minus(lambda V, T, L, d: V * d), "forgot the token embedding"),
    (_minus(lambda V, T, L, d: 9 * L * d), "forgot the biases"),
    (_minus(lambda V, T, L, d: 4 * L * d + 2 * d), "forgot the LayerNorms"),
    (_minus(lambda V, T, L, d: 2 * d), "forgot the final LayerNorm"),
    (_minus(lambda V, T, L, d: 2 * L * d + d), "only γ counted"),
    (_minus(lambda V, T, L, d: L * (6 * d * d + 3 * d)), "8d², not 2d²"),
    (_minus(lambda V, T, L, d: L * (4 * d * d + d)), "one d × 4d matrix only"),
    (_minus(lambda V, T, L, d: L * (d * d + d)), "you counted three"),
    (_minus(lambda V, T, L, d: 1), "off by -1"),
    (lambda **kw: "many", "should be an int"),
])
def test_param_count_refuses(fn, phrase):
    refused(checks.check_param_count, fn, phrase)


def test_hints_exist(capsys):
    for exercise in ("03.1", "03.2"):
        checks.hint(exercise)
    assert capsys.readouterr().out.count("for exercise") == 2
