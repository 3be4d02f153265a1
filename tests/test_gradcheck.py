"""course_lib.parts.gradcheck against torch.autograd (gradients) and torch.autograd.gradcheck (verdicts)."""

from __future__ import annotations

import pytest
import torch

from course_lib.parts import losses as L
from course_lib.parts.gradcheck import gradcheck, numerical_grad, relative_error


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


KNOWN = {
    "sum of cubes": lambda t: (t ** 3).sum(),
    "log-sum-exp": lambda t: torch.logsumexp(t.reshape(-1), 0),
    "sin times exp": lambda t: (torch.sin(t) * torch.exp(0.3 * t)).sum(),
    "a matrix product": lambda t: (t @ t.T).trace() + t.sum() ** 2,
}


def autograd_grad(f, x):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(x), x)
    return g


@pytest.mark.parametrize("name", list(KNOWN))
def test_numerical_grad_matches_autograd(name):
    f, x = KNOWN[name], _x(3, 4)
    torch.testing.assert_close(numerical_grad(f, x), autograd_grad(f, x), atol=1e-8, rtol=1e-7)


@pytest.mark.parametrize("name", list(KNOWN))
def test_gradcheck_agrees_with_torch_gradcheck_on_correct_gradients(name):
    f, x = KNOWN[name], _x(3, 4)
    result = gradcheck(f, x, lambda t: autograd_grad(f, t))
    assert result.passed and bool(result)
    assert result.max_relative_error < 1e-7
    assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(True),))


class _WrongSquare(torch.autograd.Function):
    """x**2 with a deliberately wrong backward (x instead of 2x)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 2

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        return grad_out * x


def test_gradcheck_catches_a_wrong_gradient_like_torch_does():
    x = _x(5)
    f = lambda t: _WrongSquare.apply(t).sum()  # noqa: E731
    result = gradcheck(f, x, lambda t: autograd_grad(f, t))
    assert not result.passed
    assert result.max_relative_error == pytest.approx(0.5, rel=1e-6)
    assert not torch.autograd.gradcheck(f, (x.clone().requires_grad_(True),), raise_exception=False)


def test_gradcheck_on_cross_entropy_and_its_common_mistakes():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 3, generator=g, dtype=torch.float64) * 3
    y = torch.tensor([0, 2, 1, 2])
    f = lambda t: L.cross_entropy(t, y)  # noqa: E731
    good = gradcheck(f, z, lambda t: L.cross_entropy_grad(t, y))
    assert good.passed and good.max_relative_error < 1e-7
    p, onehot = torch.softmax(z, 1), torch.nn.functional.one_hot(y, 3).double()
    for wrong in (p - onehot, (onehot - p) / 4, (p - onehot) / 3, (z - onehot) / 4):
        assert not gradcheck(f, z, wrong).passed


def test_report_names_the_verdict_and_the_worst_entry():
    x = _x(2, 3)
    wrong = 3 * x ** 2
    wrong[1, 2] += 1.0
    result = gradcheck(lambda t: (t ** 3).sum(), x, wrong)
    assert result.worst_index == (1, 2)
    text = str(result)
    assert text.startswith("gradcheck FAILED: max relative error") and "worst at index (1, 2)" in text
    with pytest.raises(AssertionError, match="gradcheck FAILED"):
        gradcheck(lambda t: (t ** 3).sum(), x, wrong, raise_on_failure=True)
    assert str(gradcheck(lambda t: (t ** 3).sum(), x, 3 * x ** 2)).startswith("gradcheck PASSED")


def test_central_beats_forward_and_float64_beats_float32():
    f = lambda t: (t ** 3).sum()  # noqa: E731
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    exact = 3 * x ** 2
    err = {m: (numerical_grad(f, x, 1e-3, method=m) - exact).abs().max().item() for m in ("central", "forward")}
    assert err["central"] < 1e-5 < 1e-3 < err["forward"]
    err32 = (numerical_grad(f, x.float(), 1e-6, dtype=None) - exact).abs().max().item()
    err64 = (numerical_grad(f, x, 1e-6) - exact).abs().max().item()
    assert err64 < 1e-8 < 1e-2 < err32


def test_numerical_grad_leaves_x_alone_and_keeps_shape():
    x = _x(2, 3)
    before = x.clone()
    g = numerical_grad(lambda t: (t ** 2).sum(), x)
    assert torch.equal(x, before) and g.shape == x.shape and g.dtype == torch.float64
    assert numerical_grad(lambda t: t ** 2, torch.tensor(3.0)).item() == pytest.approx(6.0)


def test_relative_error_floor():
    a = torch.tensor([0.0, 1.0, 1e-9])
    n = torch.tensor([1e-10, 1.1, 2e-9])
    rel = relative_error(a, n, floor=1e-3)
    torch.testing.assert_close(rel, torch.tensor([1e-7, 0.1 / 1.1, 1e-6], dtype=torch.float64))


def test_bad_input():
    x = _x(3)
    with pytest.raises(ValueError, match="scalar"):
        numerical_grad(lambda t: t * 2, x)
    with pytest.raises(ValueError, match="eps must be a positive"):
        numerical_grad(lambda t: t.sum(), x, eps=0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        numerical_grad(lambda t: t.sum(), [1.0, 2.0])
    with pytest.raises(ValueError, match="method"):
        numerical_grad(lambda t: t.sum(), x, method="backward")
    with pytest.raises(ValueError, match="shape of its input"):
        gradcheck(lambda t: t.sum(), x, torch.ones(4))


def test_gradcheck_runs_the_central_differences_it_is_given():
    # notebook 02 checks the cross-entropy gradient with the student's central differences (exercise 02.3)
    import numpy as np

    Z, Y = _x(3, 4, seed=9), torch.tensor([0, 3, 1])
    calls = []

    def mine(f, x, eps):
        calls.append(eps)
        return numerical_grad(f, x, eps)

    result = gradcheck(lambda t: L.cross_entropy(t, Y), Z, lambda t: L.cross_entropy_grad(t, Y), numerical=mine)
    assert result.passed and calls == [1e-6] and "central differences by mine" in str(result)
    wrong = gradcheck(lambda t: L.cross_entropy(t, Y), Z, lambda t: L.cross_entropy_grad(t, Y),
                      numerical=lambda f, x, eps: -numerical_grad(f, x, eps))
    assert not wrong.passed
    with pytest.raises(ValueError, match="must return a tensor of x's shape"):
        gradcheck(lambda t: (t ** 2).sum(), Z, 2 * Z, numerical=lambda f, x, eps: x.sum())
    # NumPy numbers where a number is expected: f's value and eps
    assert gradcheck(lambda t: np.float32((t ** 2).sum().item()), Z, 2 * Z, tol=1e-2, eps=np.float64(1e-3))
