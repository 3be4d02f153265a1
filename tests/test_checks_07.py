"""The 07_lora checks accept correct LoRA code and refuse each common mistake with its own sentence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from course_lib import checks
from course_lib.parts import lora
from course_lib.checks import CheckFailed, NotAttempted, ReferenceCalled

# ---- check_lora_forward ---------------------------------------------------------------------------


def forward_formula(x, W0, A, B, alpha, r):
    return x @ W0.T + (alpha / r) * (x @ A.T) @ B.T


def forward_merged_weight(x, W0, A, B, alpha, r):  # leaning on torch built-ins
    return F.linear(x, W0 + (alpha / r) * B @ A)


def forward_einsum(x, W0, A, B, alpha, r):
    return torch.einsum("oi,...i->...o", W0, x) + alpha / r * torch.einsum("or,ri,...i->...o", B, A, x)


def forward_numpy_scale(x, W0, A, B, alpha, r):  # the scale as a NumPy scalar
    return F.linear(x, W0) + F.linear(F.linear(x, A), B) * np.float64(alpha / r)


@pytest.mark.parametrize("fn", [forward_formula, forward_merged_weight, forward_einsum, forward_numpy_scale])
def test_lora_forward_accepts_correct(fn, capsys):
    checks.check_lora_forward(fn)
    assert "check_lora_forward passed" in capsys.readouterr().out


WRONG_FORWARD = {
    "your scaling is r/alpha": lambda x, W0, A, B, alpha, r: x @ W0.T + (r / alpha) * x @ A.T @ B.T,
    "your scaling is alpha; divide it by r": lambda x, W0, A, B, alpha, r: x @ W0.T + alpha * x @ A.T @ B.T,
    "you left out the scaling alpha/r": lambda x, W0, A, B, alpha, r: x @ W0.T + x @ A.T @ B.T,
    "alpha/sqrt(r) (that is rsLoRA)": lambda x, W0, A, B, alpha, r: x @ W0.T + alpha / math.sqrt(r) * x @ A.T @ B.T,
    "you scaled the whole output": lambda x, W0, A, B, alpha, r: alpha / r * (x @ W0.T + x @ A.T @ B.T),
    "you left out the pretrained part W0 x": lambda x, W0, A, B, alpha, r: alpha / r * x @ A.T @ B.T,
    "you returned only W0 x": lambda x, W0, A, B, alpha, r: x @ W0.T,
    "raised RuntimeError": lambda x, W0, A, B, alpha, r: W0 @ x + alpha / r * B @ A @ x,  # column-vector habit
    "changed W0 in place": lambda x, W0, A, B, alpha, r: x @ W0.add_(alpha / r * B @ A).T,  # merges into the caller's W0
    "keep the inputs' dtype": lambda x, W0, A, B, alpha, r: (x.float() @ W0.float().T
                                                             + alpha / r * x.float() @ A.float().T @ B.float().T),
    "raised RuntimeError on a (2, 3, in) batch": lambda x, W0, A, B, alpha, r: torch.mm(x, W0.T) + alpha / r * torch.mm(torch.mm(x, A.T), B.T),
}


@pytest.mark.parametrize("sentence", list(WRONG_FORWARD))
def test_lora_forward_refuses(sentence):
    with pytest.raises(CheckFailed, match=sentence.replace("(", r"\(").replace(")", r"\)")):
        checks.check_lora_forward(WRONG_FORWARD[sentence])


def test_lora_forward_stub_is_not_attempted():
    def stub(x, W0, A, B, alpha, r):
        raise NotImplementedError("Exercise 07.1 is not done yet")
    with pytest.raises(NotAttempted, match="Exercise 07.1 is not done yet"):
        checks.check_lora_forward(stub)


# ---- check_lora_linear ----------------------------------------------------------------------------


class Variant(nn.Module):
    """A LoRA layer whose behaviour is set by ``flags``: with no flags it is correct."""

    flags: dict = {}

    def __init__(self, base, r, alpha):
        super().__init__()
        f = self.flags
        self.base = base
        if not f.get("base_trainable"):
            base.requires_grad_(False)
        shape_a, shape_b = ((base.in_features, r), (r, base.out_features)) if f.get("swap") else \
            ((r, base.in_features), (base.out_features, r))
        self.lora_A = nn.Parameter(torch.zeros(shape_a) if f.get("a_zero") else torch.empty(shape_a))
        if not f.get("a_zero"):
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.randn(shape_b) if f.get("b_random") else torch.zeros(shape_b))
        self.scaling = {"r/alpha": r / alpha, "alpha": alpha, "none": 1.0}.get(f.get("scaling"), alpha / r)
        self.merged = False

    def delta(self):
        s = self.scaling if not self.flags.get("merge_no_scale") else 1.0
        return s * self.lora_B @ self.lora_A

    def forward(self, x):
        h = self.base(x)
        if self.merged and not self.flags.get("forward_adds_after_merge"):
            return h
        return h + self.scaling * x @ self.lora_A.T @ self.lora_B.T

    @torch.no_grad()
    def merge(self):
        if self.merged and not self.flags.get("merge_twice"):
            return
        if not self.flags.get("merge_noop"):
            self.base.weight += self.delta()
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged and not self.flags.get("unmerge_twice"):
            return
        if self.flags.get("unmerge_adds"):
            self.base.weight += self.delta()
        else:
            self.base.weight -= self.delta()
        self.merged = False


def variant(**flags):
    return type("LoRALinear", (Variant,), {"flags": flags})


class RaisingOnSecondMerge(Variant):
    """Correct, but refuses a second merge with an error instead of ignoring it."""

    def merge(self):
        if self.merged:
            raise RuntimeError("already merged")
        super().merge()

    def unmerge(self):
        if not self.merged:
            raise RuntimeError("not merged")
        super().unmerge()


class WithCopiedBaseFunctional(nn.Module):
    """Correct and built on torch.nn.functional / torch.addmm instead of calling the base module."""

    def __init__(self, base, r, alpha):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad = False
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features).uniform_(-0.1, 0.1))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        self.scaling = alpha / r
        self.is_merged = False

    def forward(self, x):
        out = F.linear(x, self.base.weight, self.base.bias)
        if not self.is_merged:
            out = out + F.linear(F.linear(x, self.lora_A), self.lora_B, None) * self.scaling
        return out

    def merge(self):
        if not self.is_merged:
            self.base.weight.data.addmm_(self.lora_B.data, self.lora_A.data, alpha=self.scaling)
            self.is_merged = True

    def unmerge(self):
        if self.is_merged:
            self.base.weight.data.addmm_(self.lora_B.data, self.lora_A.data, alpha=-self.scaling)
            self.is_merged = False


class KeepsAlphaAndRank(nn.Module):
    """Correct: keeps alpha and r (no attribute called scaling), A Gaussian as the paper says, and a forward
    that builds the merged weight on the fly."""

    def __init__(self, base, r, alpha):
        super().__init__()
        self.base, self.r, self.alpha, self.merged = base.requires_grad_(False), r, alpha, False
        self.lora_A = nn.Parameter(0.02 * torch.randn(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))

    def forward(self, x):
        if self.merged:
            return self.base(x)
        return F.linear(x, self.base.weight + self.alpha / self.r * self.lora_B @ self.lora_A, self.base.bias)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base.weight.add_(self.alpha / self.r * self.lora_B @ self.lora_A)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight.sub_(self.alpha / self.r * self.lora_B @ self.lora_A)
            self.merged = False


class ScalingAsTensorBuffer(Variant):
    """Correct: the scale kept as a 0-d tensor buffer."""

    def __init__(self, base, r, alpha):
        super().__init__(base, r, alpha)
        scale = self.scaling
        del self.scaling
        self.register_buffer("scaling", torch.tensor(scale))


@pytest.mark.parametrize("cls", [variant(), RaisingOnSecondMerge, WithCopiedBaseFunctional, KeepsAlphaAndRank,
                                 ScalingAsTensorBuffer])
def test_lora_linear_accepts_correct(cls, capsys):
    checks.check_lora_linear(cls)
    assert "check_lora_linear passed" in capsys.readouterr().out


WRONG_LINEAR = {
    "b_random": "lora_B does not start at zero",
    "a_zero": "lora_A starts at zero as well as lora_B",
    "swap": "lora_A and lora_B have swapped shapes",
    "base_trainable": "the base layer is still trainable",
    "scaling=r/alpha": "your scaling is r/alpha; it should be alpha/r",
    "scaling=alpha": "your scaling is alpha; divide it by r",
    "scaling=none": "you left out the scaling alpha/r",
    "merge_no_scale": "merge() is wrong: you left out the scaling alpha/r",
    "merge_noop": "merge() did not change base.weight",
    "forward_adds_after_merge": "after merge() your forward still adds the LoRA branch",
    "merge_twice": "calling merge() twice added the update twice",
    "unmerge_adds": "unmerge() did not restore the original weight W0",
    "unmerge_twice": "calling unmerge() on a layer that is not merged changed base.weight",
}


@pytest.mark.parametrize("flag", list(WRONG_LINEAR))
def test_lora_linear_refuses(flag):
    key, _, value = flag.partition("=")
    cls = variant(**{key: value or True})
    with pytest.raises(CheckFailed, match=WRONG_LINEAR[flag].replace("(", r"\(").replace(")", r"\)")):
        checks.check_lora_linear(cls)


def test_lora_linear_refuses_plain_tensors_and_missing_methods():
    class NotParameters(Variant):
        def __init__(self, base, r, alpha):
            super().__init__(base, r, alpha)
            a = self.lora_A.detach().clone()
            del self.lora_A
            self.lora_A = a

    with pytest.raises(CheckFailed, match="lora_A is a Tensor, not an nn.Parameter"):
        checks.check_lora_linear(NotParameters)

    class NoMerge(nn.Module):
        def __init__(self, base, r, alpha):
            super().__init__()
            self.base = base.requires_grad_(False)
            self.lora_A = nn.Parameter(torch.randn(r, base.in_features))
            self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
            self.s = alpha / r

        def forward(self, x):
            return self.base(x) + self.s * x @ self.lora_A.T @ self.lora_B.T

    with pytest.raises(CheckFailed, match=r"no method merge\(\)"):
        checks.check_lora_linear(NoMerge)


class ScaleUnderAnotherName(WithCopiedBaseFunctional):
    """Right outputs, but the scale is kept as self.s: later cells (and lora.save_adapter) cannot read it."""

    def __init__(self, base, r, alpha):
        super().__init__(base, r, alpha)
        self.s = self.__dict__.pop("scaling")

    def forward(self, x):
        out = F.linear(x, self.base.weight, self.base.bias)
        return out if self.is_merged else out + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.s

    def merge(self):
        if not self.is_merged:
            self.base.weight.data.addmm_(self.lora_B.data, self.lora_A.data, alpha=self.s)
            self.is_merged = True

    def unmerge(self):
        if self.is_merged:
            self.base.weight.data.addmm_(self.lora_B.data, self.lora_A.data, alpha=-self.s)
            self.is_merged = False


class AlphaHoldsTheScale(KeepsAlphaAndRank):
    """Right outputs, but self.alpha holds alpha / r, so a reader of alpha would scale by alpha / r**2."""

    def __init__(self, base, r, alpha):
        super().__init__(base, r, alpha / r)
        self.r = 1


def test_lora_linear_wants_the_scale_where_later_cells_read_it():
    assert "does not keep its scale: store self.scaling = alpha / r" in str(
        pytest.raises(CheckFailed, checks.check_lora_linear, ScaleUnderAnotherName).value)
    assert "self.alpha is 4 on r=2, alpha=8.0" in str(pytest.raises(CheckFailed, checks.check_lora_linear,
                                                                    AlphaHoldsTheScale).value)


def test_lora_linear_keeps_the_global_rng_and_reports_stub():
    state = torch.random.get_rng_state()
    checks.check_lora_linear(variant())
    assert torch.equal(state, torch.random.get_rng_state())

    class Stub(nn.Module):
        def __init__(self, base, r, alpha):
            raise NotImplementedError("Exercise 07.3 is not done yet")

    with pytest.raises(NotAttempted, match="Exercise 07.3 is not done yet"):
        checks.check_lora_linear(Stub)


# ---- check_apply_lora -----------------------------------------------------------------------------


def inject_recursive(model, target_modules, r, alpha):
    """Correct: freeze, then recurse through named_children."""
    model.requires_grad_(False)

    def visit(module, prefix):
        for name, child in list(module.named_children()):
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, nn.Linear) and name in target_modules:
                setattr(module, name, lora.LoRALinear(child, r, alpha))
            else:
                visit(child, full)

    visit(model, "")


def inject_reference(model, target_modules, r, alpha):
    return lora.apply_lora(model, target_modules, r, alpha)


class OwnLoRA(nn.Module):
    """A student's own correct LoRA layer (not course_lib's): accepted as well."""

    def __init__(self, base, r, alpha):
        super().__init__()
        self.base, self.scaling = base, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))

    def forward(self, x):
        return self.base(x) + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)


def inject_own_layer(model, target_modules, r, alpha):
    for p in model.parameters():
        p.requires_grad_(False)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in target_modules):
            parent, _, last = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, last, OwnLoRA(m, r, alpha))
    return model


def inject_into_every_parent(model, target_modules, r, alpha):
    """Correct: visit every module's direct children by their own names (no dotted names at all)."""
    for p in model.parameters():
        p.requires_grad = False
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and name in target_modules:
                setattr(module, name, lora.LoRALinear(child, r, alpha))
    return model


def inject_walking_the_path(model, target_modules, r, alpha):
    """Correct: split the dotted name and walk it with getattr (ModuleList items and ModuleDict keys too)."""
    model.requires_grad_(False)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.split(".")[-1] in target_modules:
            *path, last = name.split(".")
            parent = model
            for part in path:
                parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
            setattr(parent, last, lora.LoRALinear(module, r, alpha))


@pytest.mark.parametrize("fn", [inject_recursive, inject_own_layer, inject_into_every_parent, inject_walking_the_path])
def test_apply_lora_accepts_correct(fn, capsys):
    checks.check_apply_lora(fn)
    assert "check_apply_lora passed" in capsys.readouterr().out


def _replace(model, name, r, alpha):
    parent, _, last = name.rpartition(".")
    holder = model.get_submodule(parent) if parent else model
    setattr(holder, last, lora.LoRALinear(getattr(holder, last), r, alpha))


def inject_without_freezing(model, target_modules, r, alpha):
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules:
            _replace(model, name, r, alpha)
    for p in model.parameters():  # LoRALinear froze the wrapped layers, but the rest stays trainable
        pass


def inject_substring(model, target_modules, r, alpha):
    model.requires_grad_(False)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and any(t in name for t in target_modules):
            _replace(model, name, r, alpha)


def inject_suffix_without_dot(model, target_modules, r, alpha):
    model.requires_grad_(False)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and any(name.endswith(t) for t in target_modules):
            _replace(model, name, r, alpha)


def inject_known_layers_only(model, target_modules, r, alpha):
    model.requires_grad_(False)
    for name, m in list(model.layers.named_modules()):
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules:
            _replace(model.layers, name, r, alpha)


def inject_setattr_dotted(model, target_modules, r, alpha):
    model.requires_grad_(False)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules:
            setattr(model, name, lora.LoRALinear(m, r, alpha))  # sets an attribute called "layers.0.attention.query"


def inject_fixed_rank(model, target_modules, r, alpha):
    model.requires_grad_(False)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules:
            _replace(model, name, 4, alpha)


def inject_random_b(model, target_modules, r, alpha):
    model.requires_grad_(False)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules:
            _replace(model, name, r, alpha)
            with torch.no_grad():
                model.get_submodule(name).lora_B.normal_()


class IgnoresBranch(nn.Module):
    """A home-made LoRA layer whose forward forgets the branch: invisible while B = 0."""

    def __init__(self, base, r, alpha):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features) * 0.1)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))

    def forward(self, x):
        return self.base(x)


class DetachedBranch(nn.Module):
    """Adds the branch from detached copies: right values, no gradient for A and B."""

    def __init__(self, base, r, alpha):
        super().__init__()
        self.base, self.scaling = base, alpha / r
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features) * 0.1)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))

    def forward(self, x):
        return self.base(x) + self.scaling * x @ self.lora_A.detach().T @ self.lora_B.detach().T


def _inject_with(make):
    def inject(model, target_modules, r, alpha):
        model.requires_grad_(False)
        for name, m in list(model.named_modules()):
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules:
                parent, _, last = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, last, make(m, r, alpha))
    return inject


def inject_attach_to_old_layer(model, target_modules, r, alpha):
    """Hangs A and B on the frozen nn.Linear itself instead of wrapping it."""
    model.requires_grad_(False)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules:
            m.lora_A = nn.Parameter(torch.randn(r, m.in_features) * 0.1)
            m.lora_B = nn.Parameter(torch.zeros(m.out_features, r))


inject_ignores_branch = _inject_with(IgnoresBranch)
inject_detached_branch = _inject_with(DetachedBranch)
inject_alpha_over_r = _inject_with(lambda m, r, alpha: lora.LoRALinear(m, r, alpha / r))
inject_alpha_one = _inject_with(lambda m, r, alpha: lora.LoRALinear(m, r, r))  # "alpha defaults to r"
inject_rslora = _inject_with(lambda m, r, alpha: lora.LoRALinear(m, r, alpha * math.sqrt(r)))


WRONG_INJECTION = {
    inject_ignores_branch: "it ignores lora_A and lora_B",
    inject_detached_branch: "no gradient reaches lora_A",
    inject_attach_to_old_layer: "is still a plain nn.Linear with lora_A and lora_B attached to it",
    inject_alpha_over_r: "you passed alpha / r as alpha",
    inject_alpha_one: "you left out the scaling alpha/r",
    inject_rslora: "alpha/sqrt(r) (that is rsLoRA)",
    inject_without_freezing: "pretrained parameters trainable",
    inject_substring: "you replaced 'layers.0.query_proj', which does not match",
    inject_suffix_without_dot: "you replaced 'layers.0.key_value', which does not match ['query', 'value']: its last "
                               "part 'key_value' only ends with a target",
    inject_known_layers_only: "you missed 'deep.inner.extra.query'",
    inject_setattr_dotted: "you did not replace 'layers.0.attention.query'",
    inject_fixed_rank: "has rank 4, but r=2 was asked for",
    inject_random_b: "the adapted model's output differs from the reference",
}


@pytest.mark.parametrize("fn", list(WRONG_INJECTION), ids=lambda f: getattr(f, "__name__", "inject"))
def test_apply_lora_refuses(fn):
    with pytest.raises(CheckFailed) as info:
        checks.check_apply_lora(fn)
    assert WRONG_INJECTION[fn] in str(info.value)


# ---- check_lora_grads (07.2) ----------------------------------------------------------------------


def _rows(x, g):
    return x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])


def grads_matrix(x, A, B, alpha, r, g):
    X, G = _rows(x, g)
    s = alpha / r
    return s * (G @ B).T @ X, s * G.T @ (X @ A.T)


def grads_einsum(x, A, B, alpha, r, g):
    s = alpha / r
    u = torch.einsum("ri,...i->...r", A, x)
    return s * torch.einsum("...o,or,...i->ri", g, B, x), s * torch.einsum("...o,...r->or", g, u)


def grads_autograd(x, A, B, alpha, r, g):
    A_, B_ = A.clone().requires_grad_(), B.clone().requires_grad_()
    h = alpha / r * (x @ A_.T) @ B_.T
    return torch.autograd.grad(h, (A_, B_), grad_outputs=g)


def grads_row_by_row(x, A, B, alpha, r, g):
    """The one-row formulas, summed over the rows."""
    X, G, s = x.flatten(0, -2), g.flatten(0, -2), alpha / r
    return (sum(s * torch.outer(B.T @ G[n], X[n]) for n in range(len(X))),
            sum(s * torch.outer(G[n], A @ X[n]) for n in range(len(X))))


@pytest.mark.parametrize("fn", [grads_matrix, grads_einsum, grads_row_by_row])
def test_lora_grads_accepts(fn, capsys):
    checks.check_lora_grads(fn)
    assert "check_lora_grads passed" in capsys.readouterr().out


def _scaled(k):
    def fn(x, A, B, alpha, r, g):
        dA, dB = grads_matrix(x, A, B, alpha, r, g)
        factor = k(alpha, r) / (alpha / r)
        return dA * factor, dB * factor
    return fn


def grads_mean(x, A, B, alpha, r, g):
    dA, dB = grads_matrix(x, A, B, alpha, r, g)
    n = x.numel() // x.shape[-1]
    return dA / n, dB / n


def grads_transposed_dA(x, A, B, alpha, r, g):
    X, G = _rows(x, g)
    return alpha / r * X.T @ (G @ B), grads_matrix(x, A, B, alpha, r, g)[1]


def grads_swapped(x, A, B, alpha, r, g):
    dA, dB = grads_matrix(x, A, B, alpha, r, g)
    return dB, dA


def grads_full_matrix(x, A, B, alpha, r, g):
    X, G = _rows(x, g)
    return grads_matrix(x, A, B, alpha, r, g)[0], alpha / r * G.T @ X  # dL/dW instead of dL/dB


def grads_no_flatten(x, A, B, alpha, r, g):
    s = alpha / r
    return s * (g @ B).transpose(-2, -1) @ x, s * g.transpose(-2, -1) @ (x @ A.T)  # right only for 2-D x


def grads_sign(x, A, B, alpha, r, g):
    dA, dB = grads_matrix(x, A, B, alpha, r, g)
    return -dA, -dB


def grads_float32(x, A, B, alpha, r, g):
    return tuple(t.float() for t in grads_matrix(x, A, B, alpha, r, g))


def grads_in_place(x, A, B, alpha, r, g):
    g.mul_(alpha / r)  # folds the scale into the caller's g
    X, G = _rows(x, g)
    return (G @ B).T @ X, G.T @ (X @ A.T)


def grads_a_without_b(x, A, B, alpha, r, g):
    """Forgets that dA passes through B: dA = s * (G 1)^T X with B replaced by ones."""
    X, G = _rows(x, g)
    s = alpha / r
    return s * (G @ torch.ones_like(B)).T @ X, s * G.T @ (X @ A.T)


WRONG_GRADS = {
    "missing scale": (_scaled(lambda alpha, r: 1.0), "you left out the scaling alpha/r"),
    "r over alpha": (_scaled(lambda alpha, r: r / alpha), "your scaling is r/alpha"),
    "rsLoRA": (_scaled(lambda alpha, r: alpha / math.sqrt(r)), "alpha/sqrt(r)"),
    "mean over rows": (grads_mean, "you averaged over the rows"),
    "transposed dA": (grads_transposed_dA, "the transpose of A's"),
    "swapped": (grads_swapped, "you returned (dB, dA)"),
    "dW instead of dB": (grads_full_matrix, "that is the gradient of a full matrix W"),
    "no flatten": (grads_no_flatten, "it still has the leading batch dimensions"),
    "sign": (grads_sign, "wrong sign"),
    "float32": (grads_float32, "keep their dtype"),
    "in place": (grads_in_place, "changed g in place"),
    "dA without B": (grads_a_without_b, "your dA is not zero"),
}


@pytest.mark.parametrize("name", list(WRONG_GRADS))
def test_lora_grads_refuses(name):
    fn, sentence = WRONG_GRADS[name]
    with pytest.raises(CheckFailed) as info:
        checks.check_lora_grads(fn)
    assert sentence in str(info.value)


def test_lora_grads_stub():
    def stub(x, A, B, alpha, r, g):
        raise NotImplementedError("Exercise 07.2 is not done yet")

    with pytest.raises(NotAttempted, match="Exercise 07.2 is not done yet"):
        checks.check_lora_grads(stub)


def test_hints_have_three_levels(capsys):
    for k in ("07.1", "07.2", "07.3", "07.4"):
        assert len(checks.HINTS[k]) == 3, k
        assert checks.HINTS[k][2] not in checks.HINTS[k][0], "the idea does not hand out the key line"
        checks.hint(k, level=3)
    assert capsys.readouterr().out.count("the key line") == 4


# --------------------------------------------- answers that call the course's reference are refused

from course_lib.parts.lora import LoRALinear as Adapter  # noqa: E402 -- bound under another name
from course_lib.parts.lora import apply_lora as inject  # noqa: E402


def forward_through_the_course_layer(x, W0, A, B, alpha, r):
    base = nn.Linear(W0.shape[1], W0.shape[0], bias=False)
    with torch.no_grad():
        base.weight.copy_(W0)
    layer = Adapter(base, r, alpha)
    with torch.no_grad():
        layer.lora_A.copy_(A), layer.lora_B.copy_(B)
    return layer(x).detach()


class SubclassOfTheCourse(lora.LoRALinear):
    """Inherits everything from the course's layer."""


def grads_by_backward(x, A, B, alpha, r, g):
    A_, B_ = A.clone().requires_grad_(), B.clone().requires_grad_()
    (alpha / r * (x @ A_.T) @ B_.T * g).sum().backward()
    return A_.grad, B_.grad


def forward_through_the_module(x, W0, A, B, alpha, r):
    layer = lora.LoRALinear(nn.Linear(W0.shape[1], W0.shape[0], bias=False), r, alpha)
    layer.base.weight.data, layer.lora_A.data, layer.lora_B.data = W0, A, B
    return layer(x).detach()


REFERENCE_CALLS = {
    "07.1 the course's layer under another name": (checks.check_lora_forward, forward_through_the_course_layer,
                                                   "course_lib.parts.lora.LoRALinear"),
    "07.1 the course's layer": (checks.check_lora_forward, forward_through_the_module, "course_lib.parts.lora.LoRALinear"),
    "07.2 torch.autograd.grad": (checks.check_lora_grads, grads_autograd, "torch.autograd.grad"),
    "07.2 Tensor.backward": (checks.check_lora_grads, grads_by_backward, "Tensor.backward"),
    "07.3 the course's class": (checks.check_lora_linear, lora.LoRALinear, "course_lib.parts.lora.LoRALinear"),
    "07.3 under another name": (checks.check_lora_linear, Adapter, "course_lib.parts.lora.LoRALinear"),
    "07.3 a subclass": (checks.check_lora_linear, SubclassOfTheCourse, "course_lib.parts.lora.LoRALinear"),
    "07.4 directly": (checks.check_apply_lora, inject_reference, "course_lib.parts.lora.apply_lora"),
    "07.4 under another name": (checks.check_apply_lora, lambda model, targets, r, alpha: inject(model, targets, r, alpha),
                                "course_lib.parts.lora.apply_lora"),
}


@pytest.mark.parametrize("name", REFERENCE_CALLS)
def test_an_answer_that_calls_the_reference_is_refused(name):
    check, fn, called = REFERENCE_CALLS[name]
    with pytest.raises(ReferenceCalled) as info:
        check(fn)
    message = str(info.value)
    assert message.startswith("your answer calls ") and f"`{called}`" in message and message.endswith("write it yourself.")


def test_injecting_the_course_layer_is_the_exercise(capsys):
    # 07.4 forbids apply_lora, not the LoRALinear of 07.3 (the notebook's solution wraps layers in it)
    checks.check_apply_lora(inject_recursive)
    assert "check_apply_lora passed" in capsys.readouterr().out
