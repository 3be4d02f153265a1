"""The checks of 02_cross_entropy accept correct answers and name each common mistake."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from course_lib import checks
from course_lib.checks import CheckFailed, NotAttempted, ReferenceCalled, StudentCodeError


def refused(check, fn) -> str:
    with pytest.raises(CheckFailed) as info:
        check(fn)
    return str(info.value)


# ---- 02.1 check_cross_entropy_grad -------------------------------------------------------------


def grad_manual(logits, targets):
    z = logits - logits.max(dim=1, keepdim=True).values
    p = torch.exp(z) / torch.exp(z).sum(dim=1, keepdim=True)
    p[torch.arange(len(targets)), targets] -= 1
    return p / logits.shape[0]


def grad_builtins(logits, targets):
    return (torch.softmax(logits, dim=1) - F.one_hot(targets, logits.shape[1])) / len(logits)


def grad_autograd(logits, targets):
    z = logits.detach().clone().requires_grad_(True)
    F.cross_entropy(z, targets).backward()
    return z.grad


def grad_torch_func(logits, targets):
    return torch.func.grad(lambda z: F.cross_entropy(z, targets))(logits)


def grad_library(logits, targets):
    from course_lib.parts.losses import cross_entropy_grad
    return cross_entropy_grad(logits, targets)


@pytest.mark.parametrize("fn", [
    grad_manual, grad_builtins,
    lambda z, y: (torch.softmax(z, 1) - torch.eye(z.shape[1])[y]) / len(z),          # a float32 one-hot
    lambda z, y: (torch.softmax(z, -1) - torch.zeros_like(z).scatter(1, y[:, None], 1.0)) / z.size(0),
    lambda z, y: (torch.exp(z - torch.logsumexp(z, 1, keepdim=True)) - F.one_hot(y, z.shape[1])) / len(z),
    lambda z, y: (torch.softmax(z, -1) - F.one_hot(y, z.shape[-1])) / np.int64(z.shape[0]),   # NumPy N
    lambda z, y: (torch.softmax(z, -1) - F.one_hot(y, z.shape[-1])) * np.float64(1 / len(z)),
])
def test_cross_entropy_grad_accepts(fn, capsys):
    checks.check_cross_entropy_grad(fn)
    assert "✅ check_cross_entropy_grad passed" in capsys.readouterr().out


def _p(z):
    return torch.softmax(z, dim=1)


def _oh(y, c, z):
    return F.one_hot(y, c).to(z.dtype)


CE_WRONG = {
    "sum instead of mean": (lambda z, y: _p(z) - _oh(y, z.shape[1], z), "forgot to divide by N"),
    "sign flipped": (lambda z, y: (_oh(y, z.shape[1], z) - _p(z)) / len(z), "the sign is flipped"),
    "sign flipped, no /N": (lambda z, y: _oh(y, z.shape[1], z) - _p(z), "the sign is flipped"),
    "logits instead of softmax": (lambda z, y: (z - _oh(y, z.shape[1], z)) / len(z),
                                  "used the logits z where softmax(z) belongs"),
    "log-softmax instead of softmax": (lambda z, y: (torch.log_softmax(z, 1) - _oh(y, z.shape[1], z)) / len(z),
                                       "used log-softmax"),
    "divide by C": (lambda z, y: (_p(z) - _oh(y, z.shape[1], z)) / z.shape[1], "divided by C"),
    "divide by N*C": (lambda z, y: (_p(z) - _oh(y, z.shape[1], z)) / z.numel(), "divided by N*C"),
    "softmax over the batch": (lambda z, y: (torch.softmax(z, 0) - _oh(y, z.shape[1], z)) / len(z),
                               "softmax over the batch axis (dim=0)"),
    "onehot of the wrong class": (lambda z, y: (_p(z) - _oh((y + 1) % z.shape[1], z.shape[1], z)) / len(z),
                                  "mark the wrong class"),
    "onehot off by one": (lambda z, y: (_p(z) - _oh((y - 1) % z.shape[1], z.shape[1], z)) / len(z),
                          "mark the wrong class"),
    "no onehot at all": (lambda z, y: _p(z) / len(z), "forgot to subtract onehot(y)"),
    "minus one everywhere": (lambda z, y: (_p(z) - 1) / len(z), "subtracted 1 from every entry"),
    "returns the loss": (lambda z, y: F.cross_entropy(z, y), "returns one number on a (4, 3) batch (it equals the loss)"),
    "unstable softmax": (lambda z, y: (torch.exp(z) / torch.exp(z).sum(1, keepdim=True) - _oh(y, z.shape[1], z)) / len(z),
                         "contains nan or inf on logits around ±1000"),
    # right on small logits and on rows whose maximum comes first, wrong elsewhere
    "shift by the first logit": (lambda z, y: (_shifted_softmax(z, z[:, :1]) - _oh(y, z.shape[1], z)) / len(z),
                                 "contains nan or inf on rows whose largest logit is not first"),
    "shift by the row mean": (lambda z, y: (_shifted_softmax(z, z.mean(1, keepdim=True)) - _oh(y, z.shape[1], z)) / len(z),
                              "subtract each row's own maximum"),
    "in place": (lambda z, y: _in_place_grad(z, y), "changed its input logits in place"),
    "float32 inside": (lambda z, y: grad_builtins(z.float(), y), "has dtype torch.float32 on float64 logits"),
}


def _shifted_softmax(z, c):
    e = torch.exp(z - c)
    return e / e.sum(dim=1, keepdim=True)


def _in_place_grad(z, y):
    z -= z.amax(dim=1, keepdim=True)
    z.exp_()
    z /= z.sum(dim=1, keepdim=True)
    z[torch.arange(len(y)), y] -= 1
    return z / len(y)


@pytest.mark.parametrize("name", list(CE_WRONG))
def test_cross_entropy_grad_refuses(name):
    fn, sentence = CE_WRONG[name]
    assert sentence in refused(checks.check_cross_entropy_grad, fn)


def test_cross_entropy_grad_transposed_onehot_on_the_square_case():
    def transposed(z, y):
        onehot = _oh(y, z.shape[1], z)
        if z.shape[0] == z.shape[1]:
            onehot = onehot.T
        return (_p(z) - onehot) / len(z)
    assert "one-hot is transposed" in refused(checks.check_cross_entropy_grad, transposed)


def test_cross_entropy_grad_stub_and_crash():
    def stub(z, y):
        raise NotImplementedError("Exercise 02.1 is not done yet")
    with pytest.raises(NotAttempted, match="Exercise 02.1 is not done yet"):
        checks.check_cross_entropy_grad(stub)

    def crash(z, y):
        return z @ y
    with pytest.raises(StudentCodeError, match="crash raised RuntimeError on a \\(4, 3\\) batch"):
        checks.check_cross_entropy_grad(crash)


# ---- 02.2 check_log_softmax --------------------------------------------------------------------


def lsm_manual(z):
    m = z.max(dim=-1, keepdim=True).values
    return (z - m) - torch.log(torch.exp(z - m).sum(dim=-1, keepdim=True))


def lsm_builtin(z):
    return z - torch.logsumexp(z, dim=-1, keepdim=True)


def lsm_library(z):
    from course_lib.parts.losses import log_softmax
    return log_softmax(z)


@pytest.mark.parametrize("fn", [lsm_manual, lsm_builtin, lambda z: F.log_softmax(z, dim=-1)])
def test_log_softmax_accepts(fn, capsys):
    checks.check_log_softmax(fn)
    assert "✅ check_log_softmax passed" in capsys.readouterr().out


def _m(z):
    return z.max(dim=-1, keepdim=True).values


LSM_WRONG = {
    "unstable": (lambda z: torch.log(torch.exp(z) / torch.exp(z).sum(-1, keepdim=True)), "gives nan"),
    "log of a stable softmax": (lambda z: torch.log(torch.softmax(z, -1)), "gives -inf on logits around ±1000"),
    "wrong axis": (lambda z: torch.log_softmax(z, 0), "over the first axis (dim=0)"),
    "softmax, not log": (lambda z: torch.softmax(z, -1), "returned softmax(z), not its logarithm"),
    "max only": (lambda z: z - _m(z), "subtracted the maximum but not the log-sum-exp"),
    "max not added back": (lambda z: z - torch.log(torch.exp(z - _m(z)).sum(-1, keepdim=True)),
                           "forgot to add the maximum back"),
    "log of sum of z": (lambda z: z - torch.log(z.sum(-1, keepdim=True)), "log(sum(z))"),
    # right on small logits and on rows whose maximum comes first, wrong elsewhere
    "shift by the first logit": (lambda z: (z - z[..., :1]) - torch.log(torch.exp(z - z[..., :1]).sum(-1, keepdim=True)),
                                 "rows whose largest logit is not first"),
    "shift by the global maximum": (lambda z: (z - z.max()) - torch.log(torch.exp(z - z.max()).sum(-1, keepdim=True)),
                                    "two rows 2000 apart"),
    "in place": (lambda z: lsm_manual(z.sub_(0.0).mul_(1.0).add_(1.0)), "changed its input z in place"),
    "float32 inside": (lambda z: lsm_builtin(z.float()), "has dtype torch.float32"),
}


@pytest.mark.parametrize("name", list(LSM_WRONG))
def test_log_softmax_refuses(name):
    fn, sentence = LSM_WRONG[name]
    assert sentence in refused(checks.check_log_softmax, fn)


def test_log_softmax_stub():
    def stub(z):
        raise NotImplementedError("Exercise 02.2 is not done yet")
    with pytest.raises(NotAttempted, match="Exercise 02.2"):
        checks.check_log_softmax(stub)


# ---- 02.3 check_numerical_grad -----------------------------------------------------------------


def ng_loop(f, x, eps):
    grad = torch.zeros_like(x)
    xc = x.clone()
    flat, gflat = xc.view(-1), grad.view(-1)
    for i in range(flat.numel()):
        old = flat[i].item()
        flat[i] = old + eps
        f_plus = f(xc)
        flat[i] = old - eps
        f_minus = f(xc)
        flat[i] = old
        gflat[i] = (f_plus - f_minus) / (2 * eps)
    return grad


def ng_basis(f, x, eps):
    grad = torch.zeros_like(x)
    for i in range(x.numel()):
        e = torch.zeros_like(x).view(-1)
        e[i] = eps
        e = e.view_as(x)
        grad.view(-1)[i] = (f(x + e) - f(x - e)).item() / (2 * eps)
    return grad


def ng_in_place_restoring(f, x, eps):
    grad = torch.zeros_like(x)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in x.shape]).reshape(x.numel(), -1):
        idx = tuple(idx.tolist())
        x[idx] += eps
        fp = f(x)
        x[idx] -= 2 * eps
        fm = f(x)
        x[idx] += eps
        grad[idx] = (fp - fm) / (2 * eps)
    return grad


def ng_library(f, x, eps):
    from course_lib.parts.gradcheck import numerical_grad
    return numerical_grad(f, x, eps)


def ng_ndindex(f, x, eps):
    grad = torch.zeros_like(x)
    for index in np.ndindex(*x.shape):
        x_plus, x_minus = x.clone(), x.clone()
        x_plus[index] += eps
        x_minus[index] -= eps
        grad[index] = (f(x_plus) - f(x_minus)) / 2 / eps
    return grad


def ng_numpy(f, x, eps):
    # Python floats from f, a NumPy array of differences, turned into a tensor at the end
    grad = np.zeros(x.shape)
    for index in np.ndindex(*x.shape):
        x_plus, x_minus = x.clone(), x.clone()
        x_plus[index] += eps
        x_minus[index] -= eps
        grad[index] = (float(f(x_plus)) - float(f(x_minus))) / (2 * eps)
    return torch.from_numpy(grad)


def ng_stacked(f, x, eps):
    steps = torch.eye(x.numel(), dtype=x.dtype) * eps
    return torch.stack([(f(x + e.view_as(x)) - f(x - e.view_as(x))) / (2 * eps) for e in steps]).view_as(x)


@pytest.mark.parametrize("fn", [ng_loop, ng_basis, ng_ndindex, ng_numpy, ng_stacked])
def test_numerical_grad_accepts(fn, capsys):
    checks.check_numerical_grad(fn)
    assert "✅ check_numerical_grad passed" in capsys.readouterr().out


def test_numerical_grad_in_place_version_changes_x_by_rounding_only():
    # x[idx] += eps; -= 2eps; += eps need not restore x bit for bit: the check says so instead of
    # silently comparing gradients of a moved point
    try:
        checks.check_numerical_grad(ng_in_place_restoring)
    except CheckFailed as error:
        assert "changed x" in str(error)


def _scaled(factor):
    return lambda f, x, eps: ng_loop(f, x, eps) * factor


def ng_forward(f, x, eps):
    grad = torch.zeros_like(x)
    f0 = f(x)
    for i in range(x.numel()):
        xp = x.clone()
        xp.view(-1)[i] += eps
        grad.view(-1)[i] = (f(xp) - f0) / eps
    return grad


def ng_backward(f, x, eps):
    grad = torch.zeros_like(x)
    f0 = f(x)
    for i in range(x.numel()):
        xm = x.clone()
        xm.view(-1)[i] -= eps
        grad.view(-1)[i] = (f0 - f(xm)) / eps
    return grad


def ng_all_at_once(f, x, eps):
    return torch.full_like(x, ((f(x + eps) - f(x - eps)) / (2 * eps)).item())


def ng_not_restored(f, x, eps):
    grad = torch.zeros_like(x)
    flat = x.view(-1)
    for i in range(flat.numel()):
        old = flat[i].item()
        flat[i] = old + eps
        fp = f(x)
        flat[i] = old - eps
        fm = f(x)
        grad.view(-1)[i] = (fp - fm) / (2 * eps)
    return grad


def ng_float32(f, x, eps):
    values = []
    for i in range(x.numel()):
        xp, xm = x.clone(), x.clone()
        xp.view(-1)[i] += eps
        xm.view(-1)[i] -= eps
        values.append(((f(xp) - f(xm)) / (2 * eps)).item())
    return torch.tensor(values).reshape(x.shape)


NG_WRONG = {
    "divides by eps": (_scaled(2.0), "divided by eps instead of 2*eps"),
    "divides by 2 eps²": (lambda f, x, eps: ng_loop(f, x, eps) / eps, "divided by 2*eps*eps"),
    "forward differences": (ng_forward, "used the forward difference"),
    "backward differences": (ng_backward, "used the backward difference"),
    "sign flipped": (_scaled(-1.0), "the sign is flipped"),
    "all entries at once": (ng_all_at_once, "nudged every entry of x at once"),
    "does not restore x": (ng_not_restored, "changed x"),
    "float32 result": (ng_float32, "dtype torch.float32"),
}


@pytest.mark.parametrize("name", list(NG_WRONG))
def test_numerical_grad_refuses(name):
    fn, sentence = NG_WRONG[name]
    assert sentence in refused(checks.check_numerical_grad, fn)


def test_numerical_grad_stub():
    def stub(f, x, eps):
        raise NotImplementedError("Exercise 02.3 is not done yet")
    with pytest.raises(NotAttempted, match="Exercise 02.3"):
        checks.check_numerical_grad(stub)


def test_catalogues_hold_at_least_five_wrong_answers_each():
    assert min(len(CE_WRONG), len(LSM_WRONG), len(NG_WRONG)) >= 5


def test_hints_registered(capsys):
    for exercise in ("02.1", "02.2", "02.3"):
        assert len(checks.HINTS[exercise]) == 3
        checks.hint(exercise, level=3)
    assert capsys.readouterr().out.count("the key line") == 3


# --------------------------------------------- answers that call the course's reference are refused

from course_lib.parts import losses  # noqa: E402
from course_lib.parts.gradcheck import numerical_grad as differences  # noqa: E402 -- bound under another name
from course_lib.parts.losses import cross_entropy_grad as ce_gradient  # noqa: E402
from course_lib.parts.losses import logsumexp as lse  # noqa: E402


def ng_autograd(f, x, eps):
    x = x.detach().clone().requires_grad_(True)
    return torch.autograd.grad(f(x), x)[0]


REFERENCE_CALLS = {
    "02.1 directly": (checks.check_cross_entropy_grad, grad_library, "course_lib.parts.losses.cross_entropy_grad"),
    "02.1 under another name": (checks.check_cross_entropy_grad, lambda z, y: ce_gradient(z, y),
                                "course_lib.parts.losses.cross_entropy_grad"),
    "02.1 Tensor.backward": (checks.check_cross_entropy_grad, grad_autograd, "Tensor.backward"),
    "02.1 torch.func.grad": (checks.check_cross_entropy_grad, grad_torch_func, "torch.autograd.grad"),
    "02.2 directly": (checks.check_log_softmax, lsm_library, "course_lib.parts.losses.log_softmax"),
    "02.2 through the module": (checks.check_log_softmax, lambda z: losses.log_softmax(z),
                                "course_lib.parts.losses.log_softmax"),
    "02.2 the course's logsumexp under another name": (checks.check_log_softmax, lambda z: z - lse(z, -1, True),
                                                       "course_lib.parts.losses.logsumexp"),
    "02.3 directly": (checks.check_numerical_grad, ng_library, "course_lib.parts.gradcheck.numerical_grad"),
    "02.3 under another name": (checks.check_numerical_grad, lambda f, x, eps: differences(f, x, eps),
                                "course_lib.parts.gradcheck.numerical_grad"),
    "02.3 autograd": (checks.check_numerical_grad, ng_autograd, "torch.autograd.grad"),
    "02.3 the check's own helper": (checks.check_numerical_grad, lambda f, x, eps: checks.cross_entropy._ce02_central(f, x, eps),
                                    "course_lib.checks.cross_entropy._ce02_central"),
}


@pytest.mark.parametrize("name", REFERENCE_CALLS)
def test_an_answer_that_calls_the_reference_is_refused(name):
    check, fn, called = REFERENCE_CALLS[name]
    with pytest.raises(ReferenceCalled) as info:
        check(fn)
    message = str(info.value)
    assert message.startswith("your answer calls ") and f"`{called}`" in message and message.endswith("write it yourself.")


def test_the_functions_the_check_hands_over_may_be_called(capsys):
    # check_numerical_grad gives the answer its own f (code of course_lib.checks): calling it is the exercise
    checks.check_numerical_grad(ng_loop)
    assert "✅ check_numerical_grad passed" in capsys.readouterr().out
