"""course_lib.parts.losses against torch.nn.functional and autograd (the independent implementations)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from course_lib.parts import losses as L

DTYPES = [torch.float32, torch.float64]


def tol(dtype):
    return dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-10)


def random_case(n, c, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, c, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, c, (n,), generator=g)
    return z, y


EDGE_LOGITS = {
    "huge positive": torch.tensor([[1000.0, 0.0, -1000.0], [1000.0, 1000.0, 999.0]]),
    "huge negative": torch.tensor([[-1000.0, -1001.0, -1002.0], [-1000.0, -1000.0, -1000.0]]),
    "mixed extremes": torch.tensor([[0.0, -1000.0, 1000.0], [88.0, 89.0, -89.0]]),
}


# ---- softmax, log_softmax, logsumexp -----------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim", [((5,), -1), ((4, 7), -1), ((4, 7), 0), ((2, 3, 5), 1), ((1, 1), -1)])
def test_softmax_family_matches_torch(shape, dim, dtype):
    z = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=dtype) * 4
    torch.testing.assert_close(L.softmax(z, dim), torch.softmax(z, dim), **tol(dtype))
    torch.testing.assert_close(L.log_softmax(z, dim), F.log_softmax(z, dim), **tol(dtype))
    torch.testing.assert_close(L.logsumexp(z, dim), torch.logsumexp(z, dim), **tol(dtype))
    torch.testing.assert_close(L.logsumexp(z, dim, keepdim=True), torch.logsumexp(z, dim, keepdim=True),
                               **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(EDGE_LOGITS))
def test_softmax_family_is_stable_on_huge_logits(name, dtype):
    z = EDGE_LOGITS[name].to(dtype)
    for ours, theirs in [(L.softmax(z), torch.softmax(z, -1)), (L.log_softmax(z), F.log_softmax(z, -1)),
                         (L.logsumexp(z), torch.logsumexp(z, -1))]:
        assert torch.isfinite(ours).all(), name
        torch.testing.assert_close(ours, theirs, **tol(dtype))
    # the naive formula really does fail here, which is the point of the stable one
    if name == "huge positive":
        naive = torch.exp(z) / torch.exp(z).sum(-1, keepdim=True)
        assert torch.isnan(naive).any()


def test_softmax_rows_sum_to_one_and_logsumexp_of_minus_inf_row():
    z = torch.randn(6, 9, dtype=torch.float64) * 50
    torch.testing.assert_close(L.softmax(z).sum(-1), torch.ones(6, dtype=torch.float64))
    minus_inf = torch.full((2, 3), float("-inf"))
    assert torch.equal(L.logsumexp(minus_inf), torch.logsumexp(minus_inf, -1))
    masked = torch.tensor([[0.0, float("-inf"), 1.0]])
    torch.testing.assert_close(L.softmax(masked), torch.softmax(masked, -1))


def test_softmax_gradient_via_autograd_matches_torch():
    z = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, dtype=torch.float64)
    (g_ours,) = torch.autograd.grad((L.log_softmax(z) * w).sum(), z)
    (g_torch,) = torch.autograd.grad((F.log_softmax(z, -1) * w).sum(), z)
    torch.testing.assert_close(g_ours, g_torch)


def test_softmax_bad_input():
    with pytest.raises(TypeError, match="torch.Tensor"):
        L.softmax([1.0, 2.0])
    with pytest.raises(TypeError, match="floating-point"):
        L.softmax(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="0-d tensor"):
        L.log_softmax(torch.tensor(1.0))
    with pytest.raises(ValueError, match="out of range"):
        L.logsumexp(torch.zeros(2, 3), dim=2)


# ---- cross-entropy and its gradient ------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c", [(1, 1), (1, 2), (2, 2), (3, 5), (8, 3), (16, 50)])
def test_cross_entropy_matches_torch(n, c, dtype):
    z, y = random_case(n, c, dtype, seed=n * 100 + c)
    torch.testing.assert_close(L.cross_entropy(z, y), F.cross_entropy(z, y), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(EDGE_LOGITS))
def test_cross_entropy_and_grad_on_huge_logits(name, dtype):
    z = EDGE_LOGITS[name].to(dtype)
    y = torch.tensor([2, 0])
    torch.testing.assert_close(L.cross_entropy(z, y), F.cross_entropy(z, y), **tol(dtype))
    z_req = z.clone().requires_grad_(True)
    F.cross_entropy(z_req, y).backward()
    grad = L.cross_entropy_grad(z, y)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, z_req.grad, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c", [(1, 1), (1, 2), (2, 2), (3, 5), (7, 3), (16, 50)])
def test_cross_entropy_grad_matches_autograd(n, c, dtype):
    z, y = random_case(n, c, dtype, seed=n * 10 + c)
    z_req = z.clone().requires_grad_(True)
    F.cross_entropy(z_req, y).backward()
    grad = L.cross_entropy_grad(z, y)
    assert grad.shape == z.shape and grad.dtype == dtype
    torch.testing.assert_close(grad, z_req.grad, **tol(dtype))
    # the formula itself: rows sum to zero, (softmax - onehot) / N
    torch.testing.assert_close(grad.sum(1), torch.zeros(n, dtype=dtype), atol=1e-6, rtol=0)
    expected = (torch.softmax(z, 1) - F.one_hot(y, c).to(dtype)) / n
    torch.testing.assert_close(grad, expected, **tol(dtype))


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5, 1.0])
def test_label_smoothing_matches_torch(smoothing):
    z, y = random_case(6, 4, torch.float64, seed=3)
    torch.testing.assert_close(L.cross_entropy(z, y, label_smoothing=smoothing),
                               F.cross_entropy(z, y, label_smoothing=smoothing))
    z_req = z.clone().requires_grad_(True)
    F.cross_entropy(z_req, y, label_smoothing=smoothing).backward()
    torch.testing.assert_close(L.cross_entropy_grad(z, y, label_smoothing=smoothing), z_req.grad)
    with pytest.raises(ValueError, match="label_smoothing"):
        L.cross_entropy(z, y, label_smoothing=1.5)


def test_one_hot_matches_torch():
    y = torch.tensor([0, 3, 1, 3])
    assert torch.equal(L.one_hot(y, 4), F.one_hot(y, 4).float())
    with pytest.raises(ValueError, match="0..2"):
        L.one_hot(y, 3)


def test_cross_entropy_bad_input():
    z = torch.randn(4, 3)
    with pytest.raises(TypeError, match="integer class indices"):
        L.cross_entropy(z, torch.tensor([0.0, 1.0, 2.0, 1.0]))
    with pytest.raises(TypeError, match="argmax"):
        L.cross_entropy_grad(z, F.one_hot(torch.tensor([0, 1, 2, 1]), 3).float())
    with pytest.raises(ValueError, match=r"must lie in 0\.\.2 .* contain 3"):
        L.cross_entropy(z, torch.tensor([0, 1, 3, 1]))
    with pytest.raises(ValueError, match="contain -1"):
        L.cross_entropy_grad(z, torch.tensor([0, -1, 2, 1]))
    with pytest.raises(ValueError, match=r"shape \(N,\) = \(4,\)"):
        L.cross_entropy(z, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"shape \(N, C\).*unsqueeze"):
        L.cross_entropy(torch.randn(3), torch.tensor([0]))
    with pytest.raises(ValueError, match="reshape"):
        L.cross_entropy(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="floating-point"):
        L.cross_entropy(torch.ones(2, 3, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="torch.Tensor of class indices"):
        L.cross_entropy(z, [0, 1, 2, 1])


# ---- binary cross-entropy ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_binary_cross_entropy_matches_torch(dtype):
    g = torch.Generator().manual_seed(5)
    z = (torch.randn(20, generator=g, dtype=torch.float64) * 4).to(dtype)
    y = torch.randint(0, 2, (20,), generator=g).to(dtype)
    torch.testing.assert_close(L.binary_cross_entropy_with_logits(z, y),
                               F.binary_cross_entropy_with_logits(z, y), **tol(dtype))
    p = torch.sigmoid(z)
    torch.testing.assert_close(L.sigmoid(z), p, **tol(dtype))
    torch.testing.assert_close(L.binary_cross_entropy(p, y), F.binary_cross_entropy(p, y), **tol(dtype))
    soft = torch.rand(20, generator=g, dtype=torch.float64).to(dtype)
    torch.testing.assert_close(L.binary_cross_entropy_with_logits(z, soft),
                               F.binary_cross_entropy_with_logits(z, soft), **tol(dtype))
    z_req = z.clone().requires_grad_(True)
    F.binary_cross_entropy_with_logits(z_req, y).backward()
    torch.testing.assert_close(L.binary_cross_entropy_grad(z, y), z_req.grad, **tol(dtype))


def test_binary_cross_entropy_with_logits_is_stable():
    z = torch.tensor([1000.0, -1000.0, 40.0, -40.0, 0.0])
    y = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0])
    ours = L.binary_cross_entropy_with_logits(z, y)
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours, F.binary_cross_entropy_with_logits(z, y))
    assert torch.isfinite(L.sigmoid(z)).all()
    # from probabilities, saturated sigmoids hit the clamp at -100 exactly as torch does
    p = torch.sigmoid(z)
    torch.testing.assert_close(L.binary_cross_entropy(p, y), F.binary_cross_entropy(p, y))


def test_binary_cross_entropy_bad_input():
    with pytest.raises(ValueError, match="binary_cross_entropy_with_logits"):
        L.binary_cross_entropy(torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="same shape"):
        L.binary_cross_entropy_with_logits(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        L.binary_cross_entropy_with_logits(torch.zeros(3), torch.tensor([0.0, 2.0, 1.0]))


# ---- perplexity ------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [2, 50, 50257])
def test_perplexity_of_uniform_guess_is_vocab_size(vocab):
    z = torch.zeros(4, vocab, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0])
    ce = L.cross_entropy(z, y)
    torch.testing.assert_close(ce, torch.tensor(math.log(vocab), dtype=torch.float64))
    assert L.perplexity(ce).item() == pytest.approx(vocab, rel=1e-12)
    assert L.perplexity(ce.item()) == pytest.approx(vocab, rel=1e-12)


def test_numpy_numbers_are_numbers():
    import numpy as np

    assert L.perplexity(np.float32(math.log(10))) == pytest.approx(10, rel=1e-6)
    assert L.perplexity(np.float64(0.0)) == 1.0
    torch.testing.assert_close(L.one_hot(torch.tensor([2, 0]), np.int64(3)), F.one_hot(torch.tensor([2, 0]), 3).float())


def test_perplexity_bad_input():
    with pytest.raises(ValueError, match="never negative"):
        L.perplexity(-0.5)
    with pytest.raises(TypeError, match="number or tensor"):
        L.perplexity("2.0")
