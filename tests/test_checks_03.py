"""The checks of notebook 03 (transformer_block) accept correct answers and name each common mistake."""


import pytest
import torch
import torch.nn.functional as F

from course_lib import checks
from course_lib.checks import CheckFailed, NotAttempted, ReferenceCalled, StudentCodeError


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
    # right on the usual inputs, wrong on harder ones
    (lambda x, g, b, eps=1e-3: ln_right(x, g, b, eps), "your default eps is 0.001"),
    (lambda x, g, b, eps=1e-5: ln_right(x.float(), g.float(), b.float(), eps), "has dtype torch.float32"),
    (lambda x, g, b, eps=1e-5: g * x.sub_(x.mean(-1, keepdim=True)).div_(
        torch.sqrt((x ** 2).mean(-1, keepdim=True) + eps)) + b, "changed its input x in place"),
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


# ---------------------------------------------------------------------------------------------- 03.4

def count_right(vocab_size, context, n_layer, d_model):
    d = d_model
    per_block = 4 * d * d + 4 * d + (d * 4 * d + 4 * d) + (4 * d * d + d) + 2 * 2 * d
    return n_layer * per_block + 2 * d + vocab_size * d + context * d


def count_by_building(vocab_size, context, n_layer, d_model):
    from course_lib.parts.model import GPT, GPTConfig

    if vocab_size * d_model > 1e6:      # too big to build quickly: scale the formula of a small one
        return count_right(vocab_size, context, n_layer, d_model)
    model = GPT(GPTConfig(vocab_size=vocab_size, context=context, n_layer=n_layer, n_head=1, d_model=d_model))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("fn", [count_right,
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


# ---------------------------------------------------------------------------------------------- 03.2

def lnb_right(x, gamma, dy, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    sigma = torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + eps)
    x_hat = (x - mean) / sigma
    g = dy * gamma
    dx = (g - g.mean(-1, keepdim=True) - x_hat * (g * x_hat).mean(-1, keepdim=True)) / sigma
    return dx, (dy * x_hat).reshape(-1, x.shape[-1]).sum(0), dy.reshape(-1, x.shape[-1]).sum(0)


def lnb_autograd(x, gamma, dy, eps=1e-5):
    x = x.clone().requires_grad_(True)
    gamma = gamma.clone().requires_grad_(True)
    beta = torch.zeros_like(gamma, requires_grad=True)
    F.layer_norm(x, (x.shape[-1],), gamma, beta, eps).backward(dy)
    return x.grad, gamma.grad, beta.grad


def lnb_jacobian(x, gamma, dy, eps=1e-5):
    # the d x d Jacobian of one vector's normalisation, written out: (I - 1/d - x̂ x̂ᵀ/d) / σ
    d = x.shape[-1]
    mean = x.mean(-1, keepdim=True)
    sigma = torch.sqrt(x.var(-1, keepdim=True, correction=0) + eps)
    x_hat = (x - mean) / sigma
    eye = torch.eye(d, dtype=x.dtype)
    J = (eye - 1.0 / d - x_hat[..., :, None] * x_hat[..., None, :] / d) / sigma[..., None]
    dx = (J @ (dy * gamma)[..., :, None])[..., 0]
    return dx, (dy * x_hat).reshape(-1, d).sum(0), dy.reshape(-1, d).sum(0)


def lnb_library(x, gamma, dy, eps=1e-5):
    from course_lib.parts.model import layer_norm_backward
    return layer_norm_backward(x, gamma, dy, eps)


@pytest.mark.parametrize("fn", [lnb_right, lnb_jacobian])
def test_layer_norm_backward_accepts(fn, capsys):
    accepted(checks.check_layer_norm_backward, fn, capsys)


def make_lnb_wrong(*, no_mu=False, no_sigma=False, no_gamma=False, no_eps=False, unbiased=False, mean_batch=False,
                   first_axis_only=False, x_for_xhat=False, default_eps=1e-5, float32=False, in_place=False,
                   beta_mean=False):
    def layer_norm_backward(x, gamma, dy, eps=default_eps):
        if float32:
            x, gamma, dy = x.float(), gamma.float(), dy.float()
        d = x.shape[-1]
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True, correction=1 if unbiased else 0)
        sigma = torch.sqrt(var + (0.0 if no_eps else eps))
        x_hat = (x - mean) / sigma
        g = dy if no_gamma else dy * gamma
        dx = g.clone()
        if not no_mu:
            dx = dx - g.mean(-1, keepdim=True)
        if not no_sigma:
            dx = dx - x_hat * (g * x_hat).mean(-1, keepdim=True)
        dx = dx / sigma
        rows_g, rows_b = (dy * (x if x_for_xhat else x_hat)).reshape(-1, d), dy.reshape(-1, d)
        if first_axis_only and x.dim() > 2:
            dgamma, dbeta = (dy * x_hat).sum(0), dy.sum(0)
        elif mean_batch:
            dgamma, dbeta = rows_g.mean(0), rows_b.mean(0)
        else:
            dgamma, dbeta = rows_g.sum(0), (rows_b.mean(0) if beta_mean else rows_b.sum(0))
        if in_place:
            dy.zero_()
        return dx, dgamma, dbeta
    return layer_norm_backward


LNB_WRONG = {
    "no path through the mean": (make_lnb_wrong(no_mu=True), "left out the path through the mean"),
    "no path through sigma": (make_lnb_wrong(no_sigma=True), "left out the path through σ"),
    "neither path": (make_lnb_wrong(no_mu=True, no_sigma=True), "left out both paths"),
    "gamma forgotten": (make_lnb_wrong(no_gamma=True), "you forgot gamma"),
    "eps dropped": (make_lnb_wrong(no_eps=True), "dropped eps"),
    "unbiased variance": (make_lnb_wrong(unbiased=True), "unbiased variance"),
    "mean over the batch": (make_lnb_wrong(mean_batch=True), "the *sum* over the batch and positions"),
    "dbeta mean only": (make_lnb_wrong(beta_mean=True), "you averaged dy over the rows"),
    "sum over the first axis only": (make_lnb_wrong(first_axis_only=True), "sum over *every* leading axis"),
    "x instead of x̂": (make_lnb_wrong(x_for_xhat=True), "you used x where x̂ belongs"),
    "default eps 1e-3": (make_lnb_wrong(default_eps=1e-3), "your dx differs from the reference on a (3, 4) batch, called without eps"),
    "float32 inside": (make_lnb_wrong(float32=True), "has dtype torch.float32"),
    "changes dy in place": (make_lnb_wrong(in_place=True), "changed its input dy in place"),
    "returns two": (lambda x, gamma, dy, eps=1e-5: lnb_right(x, gamma, dy, eps)[:2], "should return three tensors"),
}


@pytest.mark.parametrize("name", list(LNB_WRONG))
def test_layer_norm_backward_refuses(name):
    fn, phrase = LNB_WRONG[name]
    refused(checks.check_layer_norm_backward, fn, phrase)


def test_layer_norm_backward_stub():
    def stub(x, gamma, dy, eps=1e-5):
        raise NotImplementedError("Exercise 03.2 is not done yet")

    with pytest.raises(NotAttempted, match="Exercise 03.2 is not done yet"):
        checks.check_layer_norm_backward(stub)


# ---------------------------------------------------------------------------------------------- 03.3

def rope_right(x):
    T, d = x.shape[-2], x.shape[-1]
    theta = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * theta
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1).flatten(-2)


def rope_complex(x):
    T, d = x.shape[-2], x.shape[-1]
    theta = 10000.0 ** (-torch.arange(0, d, 2) / d)                       # float32 angles are precise enough
    rotation = torch.polar(torch.ones(T, d // 2), torch.arange(T)[:, None] * theta)
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(pairs * rotation).reshape(x.shape).to(x.dtype)


def rope_library(x):
    from course_lib.parts.positions import apply_rope
    return apply_rope(x)


@pytest.mark.parametrize("fn", [rope_right, rope_complex])
def test_rope_accepts(fn, capsys):
    accepted(checks.check_rope, fn, capsys)


def make_rope_wrong(*, halves=False, exponent=2.0, sign=1.0, start=0, first_axis=False, same_angle=False,
                    cos_twice=False, float32=False, in_place=False):
    def rope(x):
        if float32:
            x = x.float()
        T = x.shape[0] if first_axis else x.shape[-2]
        d = x.shape[-1]
        theta = 10000.0 ** (-exponent * torch.arange(d // 2, dtype=torch.float64) / d)
        if same_angle:
            theta = torch.ones_like(theta)
        angles = (torch.arange(T, dtype=torch.float64) + start)[:, None] * theta
        cos, sin = angles.cos().to(x.dtype), sign * angles.sin().to(x.dtype)
        if first_axis and x.dim() > 2:
            cos, sin = cos[:, None, None, :], sin[:, None, None, :]
        if halves:
            x1, x2 = x[..., : d // 2], x[..., d // 2:]
            return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        x_even, x_odd = x[..., 0::2], x[..., 1::2]
        second = x_even * cos + x_odd * cos if cos_twice else x_even * sin + x_odd * cos
        out = torch.stack((x_even * cos - x_odd * sin, second), dim=-1).flatten(-2)
        if in_place:
            x.copy_(out)
            return x
        return out
    return rope


ROPE_WRONG = {
    "half-split pairs": (make_rope_wrong(halves=True), "paired dimension i with i + d/2"),
    "missing factor 2 in the exponent": (make_rope_wrong(exponent=1.0), "10000^(-i/d)"),
    "frequencies inverted": (make_rope_wrong(exponent=-2.0), "your frequencies grow with i"),
    "rotation the other way": (make_rope_wrong(sign=-1.0), "you rotate by -m·θ_i"),
    "positions from 1": (make_rope_wrong(start=1), "your positions start at 1"),
    "positions from the first axis": (make_rope_wrong(first_axis=True), "positions from the first axis"),
    "one angle for every pair": (make_rope_wrong(same_angle=True), "your rope differs from the reference"),
    "cos where sin belongs": (make_rope_wrong(cos_twice=True), "changes the length of the vectors"),
    "float32 inside": (make_rope_wrong(float32=True), "has dtype torch.float32"),
    "rotates x in place": (make_rope_wrong(in_place=True), "changed its input x in place"),
    "identity": (lambda x: x.clone(), "you returned x unrotated"),
}


@pytest.mark.parametrize("name", list(ROPE_WRONG))
def test_rope_refuses(name):
    fn, phrase = ROPE_WRONG[name]
    refused(checks.check_rope, fn, phrase)


def test_rope_offset_property_is_checked_on_its_own():
    # rotating queries by a position-independent angle passes no case, but a function that is right on the
    # cases and breaks the offset property must still fail: it sees position m as m**2 beyond row 7
    def right_then_quadratic(x):
        out = rope_right(x)
        if x.shape[-2] == 9 and x.shape[-1] == 16:
            m = torch.arange(9, dtype=torch.float64) ** 2
            theta = 10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
            angles = m[:, None] * theta
            xe, xo = x[..., 0::2], x[..., 1::2]
            out = torch.stack((xe * angles.cos() - xo * angles.sin(), xe * angles.sin() + xo * angles.cos()),
                              dim=-1).flatten(-2)
        return out

    refused(checks.check_rope, right_then_quadratic, "depend only on the offset n - m")


def test_rope_stub():
    def stub(x):
        raise NotImplementedError("Exercise 03.3 is not done yet")

    with pytest.raises(NotAttempted, match="Exercise 03.3 is not done yet"):
        checks.check_rope(stub)


def test_catalogues_hold_at_least_five_wrong_answers_each():
    assert len(test_layer_norm_refuses.pytestmark[0].args[1]) >= 5
    assert len(test_param_count_refuses.pytestmark[0].args[1]) >= 5
    assert len(LNB_WRONG) >= 5 and len(ROPE_WRONG) >= 5


def test_hints_exist(capsys):
    for exercise in ("03.1", "03.2", "03.3", "03.4", "03.5"):
        assert len(checks.HINTS[exercise]) == 3
        checks.hint(exercise, level=3)
    assert capsys.readouterr().out.count("the key line") == 5


# --------------------------------------------- answers that call the course's reference are refused

from course_lib.parts import model as gpt_module  # noqa: E402
from course_lib.parts.model import layer_norm_backward as ln_backward  # noqa: E402 -- bound under another name
from course_lib.parts.model import param_count_formula as formula  # noqa: E402
from course_lib.parts.positions import apply_rope as rotate  # noqa: E402
from course_lib.parts.positions import rope_angles as angles_of  # noqa: E402


def ln_library(x, gamma, beta, eps=1e-5):
    layer = gpt_module.LayerNorm(x.shape[-1], eps=eps).to(x.dtype)
    with torch.no_grad():
        layer.weight.copy_(gamma), layer.bias.copy_(beta)
    return layer(x).detach()


def rope_from_the_course_angles(x):
    T, d = x.shape[-2], x.shape[-1]
    angles = angles_of(torch.arange(T), d).to(torch.float64)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1).flatten(-2)


def count_by_formula(vocab_size, context, n_layer, d_model):
    return formula(gpt_module.GPTConfig(vocab_size=vocab_size, context=context, n_layer=n_layer, n_head=1,
                                        d_model=d_model), non_embedding=False)


from course_lib.parts.model import LayerNorm as Norm  # noqa: E402


def ln_under_another_name(x, gamma, beta, eps=1e-5):
    layer = Norm(x.shape[-1], eps=eps).to(x.dtype)
    layer.weight.data, layer.bias.data = gamma, beta
    return layer(x).detach()


REFERENCE_CALLS = {
    "03.1 the course's LayerNorm": (checks.check_layer_norm, ln_library, "course_lib.parts.model.LayerNorm"),
    "03.1 under another name": (checks.check_layer_norm, ln_under_another_name, "course_lib.parts.model.LayerNorm"),
    "03.2 directly": (checks.check_layer_norm_backward, lnb_library, "course_lib.parts.model.layer_norm_backward"),
    "03.2 under another name": (checks.check_layer_norm_backward, lambda x, g, dy, eps=1e-5: ln_backward(x, g, dy, eps),
                                "course_lib.parts.model.layer_norm_backward"),
    "03.2 Tensor.backward": (checks.check_layer_norm_backward, lnb_autograd, "Tensor.backward"),
    "03.3 directly": (checks.check_rope, rope_library, "course_lib.parts.positions.apply_rope"),
    "03.3 under another name": (checks.check_rope, lambda x: rotate(x), "course_lib.parts.positions.apply_rope"),
    "03.3 the course's angles": (checks.check_rope, rope_from_the_course_angles, "course_lib.parts.positions.rope_angles"),
    "03.4 building the course's GPT": (checks.check_param_count, count_by_building, "course_lib.parts.model.GPT"),
    "03.4 the course's formula under another name": (checks.check_param_count, count_by_formula,
                                                    "course_lib.parts.model.param_count_formula"),
}


@pytest.mark.parametrize("name", REFERENCE_CALLS)
def test_an_answer_that_calls_the_reference_is_refused(name):
    check, fn, called = REFERENCE_CALLS[name]
    with pytest.raises(ReferenceCalled) as info:
        check(fn)
    message = str(info.value)
    assert message.startswith("your answer calls ") and f"`{called}`" in message and message.endswith("write it yourself.")


def test_torch_built_ins_stay_allowed(capsys):
    accepted(checks.check_layer_norm, lambda x, g, b, eps=1e-5: F.layer_norm(x, x.shape[-1:], g, b, eps), capsys)


# ---------------------------------------------------------------------------------------------- 03.4, NumPy

@pytest.mark.parametrize("kind", ["int64", "float32", "0-d array"])
def test_param_count_accepts_numpy_numbers(kind, capsys):
    import numpy as np

    convert = {"int64": np.int64, "int32": np.int32, "float32": np.float32, "float64": np.float64,
               "0-d array": np.array}[kind]
    accepted(checks.check_param_count, lambda **kw: convert(count_right(**kw)), capsys)


def test_the_pasted_key_lines_of_03_2_and_03_4_work(capsys):
    # level 3 of a hint is the line that solves the exercise: pasted into the function it must pass
    key_04 = checks.HINTS["03.4"][2]
    namespace: dict = {}
    exec("def param_count(vocab_size, context, n_layer, d_model):\n    " + key_04, namespace)
    accepted(checks.check_param_count, namespace["param_count"], capsys)
    key_02 = checks.HINTS["03.2"][2]
    exec("import torch\ndef lnb(x, gamma, dy, eps=1e-5):\n"
         "    mean = x.mean(-1, keepdim=True)\n    sigma = torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + eps)\n"
         "    x_hat = (x - mean) / sigma\n    g = dy * gamma\n    " + key_02.replace("; ", "\n    "), namespace)
    accepted(checks.check_layer_norm_backward, namespace["lnb"], capsys)


# ---------------------------------------------------------------------------------------------- 03.5

import re  # noqa: E402
from pathlib import Path  # noqa: E402

import nbformat  # noqa: E402

from course_lib.checks.gpt import MY_GPT  # noqa: E402
from course_lib.editions import strip_solutions  # noqa: E402

NOTEBOOK_03 = Path(__file__).resolve().parent.parent / "notebooks" / "03_transformer_block.ipynb"


def my_gpt_cell() -> str:
    """The exercise cell of 03.5 in the solution edition, without its %%writefile line."""
    for cell in nbformat.read(NOTEBOOK_03, as_version=4).cells:
        if "exercise" in cell.metadata.get("tags", []) and re.search(r"^# Exercise 03\.5", cell.source, re.M):
            first, _, rest = cell.source.partition("\n")
            assert first == f"%%writefile {MY_GPT}"
            return rest
    raise AssertionError("no exercise 03.5 in the notebook")


SOLUTION = my_gpt_cell()


def gpt_file(tmp_path, *edits):
    """The solution with (old, new) replacements applied (each must apply), written to tmp_path/my_gpt.py."""
    source = SOLUTION
    for old, new in edits:
        assert old in source, old
        source = source.replace(old, new)
    path = tmp_path / MY_GPT
    path.write_text(source)
    return str(path)


BLOCK = "        x = x + self.attn(self.ln_1(x))\n        return x + self.mlp(self.ln_2(x))"
MASK = "mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()"
SCORES = "scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])"
EMBED = "x = self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device))"

GPT_RIGHT = {
    "the solution": (),
    "torch's fused LayerNorm and attention": (
        ("    mean = x.mean(dim=-1, keepdim=True)\n", "    return F.layer_norm(x, x.shape[-1:], gamma, beta, eps)\n"),
        ("y, _ = attention(q, k, v, mask)",
         "y = F.scaled_dot_product_attention(q, k, v, is_causal=True)")),
    "a -1e9 fill": (('float("-inf")', "-1e9"),),
    "finfo.min fill": (('float("-inf")', "torch.finfo(scores.dtype).min"),),
    "a float mask of ones": ((MASK, "mask = torch.tril(torch.ones(T, T, device=x.device)) == 1"),),
    "var_mean and rsqrt": (("    mean = x.mean(dim=-1, keepdim=True)\n    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)\n"
                            "    return gamma * (x - mean) / torch.sqrt(var + eps) + beta",
                            "    var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)\n"
                            "    return (x - mean) * torch.rsqrt(var + eps) * gamma + beta"),),
}


@pytest.mark.parametrize("name", list(GPT_RIGHT))
def test_gpt_accepts(name, tmp_path, capsys):
    accepted(checks.check_gpt, gpt_file(tmp_path, *GPT_RIGHT[name]), capsys)


GPT_WRONG = {
    "post-LN": (((BLOCK, "        x = self.ln_1(x + self.attn(x))\n        return self.ln_2(x + self.mlp(x))"),),
                "post-LN"),
    "residual around the normalised x": (((BLOCK, "        h = self.ln_1(x)\n        x = h + self.attn(h)\n"
                                                  "        h = self.ln_2(x)\n        return h + self.mlp(h)"),),
                                         "carry the normalised x"),
    "no residual": (((BLOCK, "        return self.mlp(self.ln_2(self.attn(self.ln_1(x))))"),), "no residual additions"),
    "MLP on the block's input": (((BLOCK, "        return x + self.attn(self.ln_1(x)) + self.mlp(self.ln_2(x))"),),
                                 "reads the block's input"),
    "no final LayerNorm": ((("logits = self.lm_head(self.ln_f(x))", "logits = self.lm_head(x)"),),
                           "final LayerNorm"),
    "untied head": ((("        self.lm_head.weight = self.tok_emb.weight\n", "        pass\n"),), "tie it"),
    "mask off by one (sees the next token)": (((MASK, MASK.replace("tril()", "tril(1)")),), "off by one"),
    "mask hides the diagonal": (((MASK, MASK.replace("tril()", "tril(-1)")),), "hides the diagonal"),
    "no mask": ((("y, _ = attention(q, k, v, mask)", "y, _ = attention(q, k, v)"),), "looks at the future"),
    "upper triangle": (((MASK, MASK.replace("tril()", "triu()")),), "looks at the future"),
    "missing 1/√d": (((SCORES, "scores = q @ k.transpose(-2, -1)"),), "not divided by √d_head"),
    "divided by d": (((SCORES, "scores = q @ k.transpose(-2, -1) / q.shape[-1]"),), "divided the attention scores by d_head"),
    "divided by √d_model": ((("y, _ = attention(q, k, v, mask)",
                              "y, _ = attention(q / math.sqrt(self.n_head), k, v, mask)"),), "√d_model"),
    "no positions": (((EMBED, "x = self.tok_emb(idx)"),), "position embedding"),
    "ln_1 twice": ((("return x + self.mlp(self.ln_2(x))", "return x + self.mlp(self.ln_1(x))"),), "read ln_1"),
    "softmax over the queries": ((("torch.softmax(scores, dim=-1)", "torch.softmax(scores, dim=-2)"),), "over the queries"),
    "embeddings times √d": (((EMBED, "x = self.tok_emb(idx) * math.sqrt(self.config.d_model) + "
                                     "self.pos_emb(torch.arange(T, device=idx.device))"),), "√d_model"),
    "the whole position table": (((EMBED, "x = self.tok_emb(idx) + self.pos_emb.weight"),),
                                 "for the input's own T"),
    "a renamed parameter": ((("self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)",
                              "self.wte = nn.Embedding(config.vocab_size, config.d_model)"),
                             ("self.lm_head.weight = self.tok_emb.weight", "self.lm_head.weight = self.wte.weight"),
                             ("self.tok_emb(idx)", "self.wte(idx)")), "no parameter `tok_emb.weight`"),
    "an extra parameter": ((("        self.ln_f = LayerNorm(config.d_model)\n",
                             "        self.ln_f = LayerNorm(config.d_model)\n        self.gain = nn.Parameter(torch.ones(1))\n"),),
                           "`gain`"),
    "a detached block": ((("            x = block(x)\n", "            x = block(x.detach())\n"),), "gets no gradient"),
    "logits only": ((("        return logits, loss", "        return logits"),), "should return (logits, loss)"),
    "the unbiased variance": ((("var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)", "var = x.var(dim=-1, keepdim=True)"),),
                              "your GPT's output differs from the reference"),
}


@pytest.mark.parametrize("name", list(GPT_WRONG))
def test_gpt_refuses(name, tmp_path):
    edits, phrase = GPT_WRONG[name]
    message = refused(checks.check_gpt, gpt_file(tmp_path, *edits), phrase)
    assert len(message) < 400 and "tensor(" not in message


def test_gpt_catalogue_names_at_least_eight_slips():
    from course_lib.checks.gpt import _SLIPS

    assert len(_SLIPS) >= 8 and len(GPT_WRONG) >= 8


def test_gpt_diagnoses_start_from_the_reference():
    # the written-out forward behind the diagnoses, without slips, is the course's GPT
    from course_lib.checks.gpt import _SMALL, _forward64, _reference
    from course_lib.parts.model import GPTConfig

    config = GPTConfig(**_SMALL)
    reference = _reference(config)
    idx = torch.randint(11, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(_forward64(reference.state_dict(), idx, 2), reference(idx)[0])


def test_gpt_stub_missing_file_and_broken_file(tmp_path):
    stub = tmp_path / MY_GPT
    stub.write_text(strip_solutions(SOLUTION, "03.5", "test"))
    with pytest.raises(NotAttempted, match="Exercise 03.5 is not done yet"):
        checks.check_gpt(str(stub))
    refused(checks.check_gpt, str(tmp_path / "absent.py"), "there is no absent.py", "run the exercise cell")
    broken = tmp_path / "broken.py"
    broken.write_text("def GPT(:\n")
    refused(checks.check_gpt, str(broken), "broken.py does not parse")
    crash = tmp_path / "crash.py"
    crash.write_text("raise ValueError('boom')\n")
    with pytest.raises(StudentCodeError, match="importing crash.py raised ValueError: boom"):
        checks.check_gpt(str(crash))


@pytest.mark.parametrize("source, called", [
    ("from course_lib.parts.model import GPT\n", "course_lib.parts.model.GPT"),
    ("from course_lib.parts import attention as a\n", "course_lib.parts.attention"),
    ("from course_lib.parts.model import layer_norm as ln\n", "course_lib.parts.model.layer_norm"),
])
def test_gpt_that_calls_the_reference_is_refused(source, called, tmp_path):
    if "attention as a" in source:
        path = gpt_file(tmp_path, ("import math\n", "import math\n" + source),
                        ("y, _ = attention(q, k, v, mask)", "y, _ = a.scaled_dot_product_attention(q, k, v, mask)"))
    elif "layer_norm as ln" in source:
        path = gpt_file(tmp_path, ("import math\n", "import math\n" + source),
                        ("return layer_norm(x, self.weight, self.bias)", "return ln(x, self.weight, self.bias)"))
    else:
        path = tmp_path / MY_GPT
        path.write_text(source)
    with pytest.raises(ReferenceCalled, match=re.escape(called)):
        checks.check_gpt(str(path))


def test_your_gpt_builds_on_the_checked_file_or_falls_back(tmp_path, capsys, monkeypatch):
    from course_lib.parts.model import GPT

    monkeypatch.chdir(tmp_path)
    assert checks.your_gpt(recheck=True) is GPT                          # no file yet: the reference, no error
    out = capsys.readouterr().out
    assert "No my_gpt.py beside this notebook yet" in out and "uses the course's GPT" in out
    (tmp_path / MY_GPT).write_text(strip_solutions(SOLUTION, "03.5", "test"))
    assert checks.your_gpt(recheck=True) is GPT                          # the stub: the reference, no error
    assert "does not pass exercise 03.5's check yet: Exercise 03.5 is not done yet" in capsys.readouterr().out
    (tmp_path / MY_GPT).write_text(SOLUTION)
    mine = checks.your_gpt(recheck=True)
    assert mine is not GPT and mine.__name__ == "GPT"
    assert "Using your GPT (exercise 03.5 passed its check)." in capsys.readouterr().out


def test_the_pasted_key_line_of_03_5_works(tmp_path, capsys):
    key_line = checks.HINTS["03.5"][2]
    accepted(checks.check_gpt, gpt_file(tmp_path, (BLOCK, "        " + key_line)), capsys)
