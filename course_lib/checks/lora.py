"""Checks of notebooks/07_lora.ipynb (exercises 07.*), with their hints."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from course_lib.checks.framework import (
    NotAttempted, register_hint, fail, _name_of, not_attempted_message, call_student, close, compare, passed,
)


# ----------------------------------------------------------------------------------------------
# ---- 07_lora: the LoRA forward pass, a LoRALinear layer, injecting LoRA into a model
# ----------------------------------------------------------------------------------------------

register_hint("07.1", "h = x @ W0.T + (alpha / r) * (x @ A.T) @ B.T: A (r, in) maps x down to r numbers, "
                      "B (out, r) maps them back up, and only that branch is scaled by alpha / r.")
register_hint("07.2", "Keep `base` and freeze its parameters; lora_A = nn.Parameter (r, in) filled by "
                      "nn.init.kaiming_uniform_(a=math.sqrt(5)), lora_B = nn.Parameter(torch.zeros(out, r)); "
                      "forward = base(x) + (alpha/r) * x @ A.T @ B.T unless merged; merge() adds (alpha/r) * B @ A "
                      "to base.weight once (remember it in self.merged), unmerge() subtracts it.")
register_hint("07.3", "Freeze every parameter first; then for name, module in list(model.named_modules()): if it is "
                      "an nn.Linear and name == t or name.endswith('.' + t) for a target t, replace it with "
                      "setattr(model.get_submodule(parent_name), last_name, LoRALinear(module, r, alpha)), "
                      "where parent_name, _, last_name = name.rpartition('.').")


def _lora_wrong_scalings(r: float, alpha: float) -> dict[str, float]:
    return {"your scaling is r/alpha; it should be alpha/r": r / alpha,
            "your scaling is alpha; divide it by r (the scaling is alpha/r)": alpha,
            "you left out the scaling alpha/r of the LoRA branch": 1.0,
            "your scaling is alpha/sqrt(r) (that is rsLoRA); here use alpha/r as in the LoRA paper": alpha / r ** 0.5}


def check_lora_forward(fn: Callable[..., torch.Tensor]) -> None:
    """``fn(x, W0, A, B, alpha, r)`` returns h = W0 x + (alpha/r) B A x for rows x (Hu et al. 2021, Eq. 3)."""
    __tracebackhide__ = True
    g = torch.Generator().manual_seed(7)
    n_in, n_out = 6, 5

    def make(shape: tuple[int, ...], r: int, zero_b: bool = False):
        x = torch.randn(*shape, n_in, generator=g)
        w0 = torch.randn(n_out, n_in, generator=g)
        a = torch.randn(r, n_in, generator=g)
        b = torch.zeros(n_out, r) if zero_b else torch.randn(n_out, r, generator=g)
        return x, w0, a, b

    cases = {"a batch of 4 vectors (r=2, alpha=8)": (make((4,), 2), 8.0, 2),
             "a (2, 3, in) batch of sequences (r=4, alpha=2)": (make((2, 3), 4), 2.0, 4),
             "one vector of shape (in,) (r=3, alpha=6)": (make((), 3), 6.0, 3),
             "B = 0, the starting point (r=2, alpha=16)": (make((4,), 2, zero_b=True), 16.0, 2)}
    for case, ((x, w0, a, b), alpha, r) in cases.items():
        result = call_student(fn, x.clone(), w0.clone(), a.clone(), b.clone(), alpha, r, case=case)
        base = x @ w0.T
        branch = x @ a.T @ b.T
        wrong = {sentence: (lambda s=s: base + s * branch) for sentence, s in _lora_wrong_scalings(r, alpha).items()}
        wrong["you scaled the whole output; only the LoRA branch BAx gets alpha/r"] = \
            lambda: (alpha / r) * (base + branch)
        wrong["you left out the pretrained part W0 x"] = lambda: (alpha / r) * branch
        wrong["you returned only W0 x and left out the LoRA branch"] = lambda: base
        compare(result, base + (alpha / r) * branch, what="your h", case=case, wrong_answers=wrong)
    passed("check_lora_forward", f"h = W0x + (alpha/r)·BAx matches the reference on {len(cases)} cases.")


def _lora_attr(layer: Any, name: str, shape: tuple[int, int]) -> torch.Tensor:
    __tracebackhide__ = True
    value = getattr(layer, name, None)
    if value is None:
        fail(f"your layer has no attribute {name}: store the two LoRA matrices as self.lora_A and self.lora_B.")
    if not isinstance(value, torch.nn.Parameter):
        fail(f"{name} is a {type(value).__name__}, not an nn.Parameter, so the optimiser would never see it: "
             f"wrap it, self.{name} = nn.Parameter(...).")
    return value


def _lora_try(method: Callable[[], Any], what: str) -> bool:
    """Call layer.merge()/unmerge() a second time: raising is an acceptable answer (returns False)."""
    try:
        method()
    except NotImplementedError:
        raise NotAttempted(not_attempted_message(f"{what} is not written yet")) from None
    except Exception:  # noqa: BLE001 -- refusing a second merge is fine
        return False
    return True


def check_lora_linear(cls: Callable[..., torch.nn.Module]) -> None:
    """``cls(base, r, alpha)`` wraps a frozen nn.Linear with lora_A (r, in), lora_B (out, r), merge(), unmerge()."""
    __tracebackhide__ = True
    import torch.nn.functional as F

    n_in, n_out = 7, 5
    with torch.random.fork_rng():
        for r, alpha in ((2, 8.0), (3, 1.5)):
            torch.manual_seed(r)
            case = f"r={r}, alpha={alpha} on nn.Linear({n_in}, {n_out})"
            s = alpha / r
            base = torch.nn.Linear(n_in, n_out)
            w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
            layer = call_student(cls, base, r, alpha, case=case)
            if not isinstance(layer, torch.nn.Module):
                fail(f"{_name_of(cls)}(base, r, alpha) should build an nn.Module, but it returned a "
                     f"{type(layer).__name__}.")
            a = _lora_attr(layer, "lora_A", (r, n_in))
            b = _lora_attr(layer, "lora_B", (n_out, r))
            if tuple(a.shape) == (n_in, r) and tuple(b.shape) == (r, n_out):
                fail(f"lora_A and lora_B have swapped shapes on {case}: A maps the input down, shape (r, in) = "
                     f"({r}, {n_in}), and B maps back up, shape (out, r) = ({n_out}, {r}).")
            if tuple(a.shape) != (r, n_in):
                fail(f"lora_A has shape {tuple(a.shape)} on {case}, but it should be (r, in_features) = ({r}, {n_in}).")
            if tuple(b.shape) != (n_out, r):
                fail(f"lora_B has shape {tuple(b.shape)} on {case}, but it should be (out_features, r) = ({n_out}, {r}).")
            if base.weight.requires_grad or base.bias.requires_grad:
                fail("the base layer is still trainable: freeze it (base.weight.requires_grad_(False), same for the "
                     "bias) so that only lora_A and lora_B learn.")
            if not (a.requires_grad and b.requires_grad):
                fail("lora_A and lora_B must be trainable (requires_grad=True).")
            n_trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
            if n_trainable != r * (n_in + n_out):
                fail(f"your layer trains {n_trainable} numbers, but LoRA trains only A and B, r·(in + out) = "
                     f"{r * (n_in + n_out)}: freeze everything that belongs to the pretrained layer.")
            x = torch.randn(3, 4, n_in)
            reference_base = F.linear(x, w0, b0)
            if torch.count_nonzero(b.detach()) != 0:
                fail("lora_B does not start at zero, so your layer changes the pretrained output before any training: "
                     "initialise B with zeros (and A randomly).")
            if torch.count_nonzero(a.detach()) == 0:
                fail("lora_A starts at zero as well as lora_B: then the gradients of A and B are both zero "
                     "(each is multiplied by the other) and LoRA can never learn; initialise A randomly "
                     "(nn.init.kaiming_uniform_(A, a=math.sqrt(5))).")
            y0 = call_student(layer, x, case=f"{case} at initialisation")
            compare(y0, reference_base, what="your layer's output at initialisation", case=case)
            if not y0.requires_grad:
                fail("your layer's output does not depend on lora_A and lora_B, so they can never be trained: "
                     "compute the LoRA branch from them (and not under torch.no_grad()).")
            # the gradient reaches B at the start (B = 0 but A is random)
            y0.square().sum().backward()
            if b.grad is None or torch.count_nonzero(b.grad) == 0:
                fail("at initialisation lora_B gets no gradient: the forward pass must use lora_A and lora_B "
                     "(the LoRA branch), not copies of them.")
            a.grad = b.grad = None
            # now give A and B values and check the formula
            gen = torch.Generator().manual_seed(10 + r)
            a_val, b_val = torch.randn(r, n_in, generator=gen), torch.randn(n_out, r, generator=gen)
            with torch.no_grad():
                a.copy_(a_val)
                b.copy_(b_val)
            branch = x @ a_val.T @ b_val.T
            expected = reference_base + s * branch
            y = call_student(layer, x, case=case)
            wrong = {sentence: (lambda k=k: reference_base + k * branch)
                     for sentence, k in _lora_wrong_scalings(r, alpha).items()}
            wrong["you scaled the whole output; only the LoRA branch gets alpha/r"] = lambda: s * (reference_base + branch)
            wrong["your forward ignores the LoRA branch (it returns base(x) only)"] = lambda: reference_base
            compare(y, expected, what="your layer's output", case=f"{case} with non-zero A and B", wrong_answers=wrong)
            # merge
            for method in ("merge", "unmerge"):
                if not callable(getattr(layer, method, None)):
                    fail(f"your layer has no method {method}(); write merge() (W0 += (alpha/r)·B@A) and unmerge() "
                         f"(W0 -= (alpha/r)·B@A).")
            delta = s * b_val @ a_val
            call_student(layer.merge, case=f"{case}: merge()")
            w = base.weight.detach()
            if not close(w, w0 + delta):
                for sentence, k in _lora_wrong_scalings(r, alpha).items():
                    if close(w, w0 + k * (b_val @ a_val)):
                        fail(f"merge() is wrong: {sentence}.")
                if close(w, w0):
                    fail("merge() did not change base.weight: add (alpha/r)·B@A to the base layer's weight in place "
                         "(inside torch.no_grad()).")
                fail("after merge() base.weight should be W0 + (alpha/r)·B@A, and it is not.")
            y_merged = call_student(layer, x, case=f"{case} after merge()")
            if close(y_merged, expected + s * branch):
                fail("after merge() your forward still adds the LoRA branch, so the update counts twice: once "
                     "merged, the layer must return base(x) only.")
            compare(y_merged, expected, what="your layer's output after merge()", case=case)
            if _lora_try(layer.merge, "merge()") and not close(base.weight.detach(), w0 + delta):
                fail("calling merge() twice added the update twice: remember that the layer is merged "
                     "(self.merged = True) and do nothing the second time.")
            call_student(layer.unmerge, case=f"{case}: unmerge()")
            if not close(base.weight.detach(), w0):
                fail("unmerge() did not restore the original weight W0: subtract exactly the (alpha/r)·B@A that "
                     "merge() added, and only if the layer is merged.")
            y_back = call_student(layer, x, case=f"{case} after unmerge()")
            if close(y_back, reference_base):
                fail("after unmerge() your forward no longer adds the LoRA branch: set the merged flag back.")
            compare(y_back, expected, what="your layer's output after unmerge()", case=case)
            if _lora_try(layer.unmerge, "unmerge()") and not close(base.weight.detach(), w0):
                fail("calling unmerge() on a layer that is not merged changed base.weight: only subtract the update "
                     "when the layer is merged.")
    passed("check_lora_linear", "shapes, B = 0 start, frozen base, scaling alpha/r, gradients, merge and unmerge "
                                "all match the reference on 2 layers.")


class _LoRAToyAttention(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.query, self.key, self.value, self.dense = (torch.nn.Linear(d, d) for _ in range(4))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.query(h) @ self.key(h).transpose(-2, -1) / h.shape[-1] ** 0.5, dim=-1)
        return h + self.dense(weights @ self.value(h))


class _LoRAToyBlock(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attention = _LoRAToyAttention(d)
        self.query_proj = torch.nn.Linear(d, d)  # matches "query" as a substring only
        self.ffn = torch.nn.Sequential(torch.nn.Linear(d, 2 * d), torch.nn.GELU(), torch.nn.Linear(2 * d, d))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.attention(h)
        return h + self.ffn(h) + 0.1 * self.query_proj(h)


class _LoRAToyModel(torch.nn.Module):
    """A small encoder with attention layers at several depths, used by check_apply_lora."""

    def __init__(self, d: int = 8, vocab: int = 11) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.layers = torch.nn.ModuleList([_LoRAToyBlock(d) for _ in range(2)])
        self.deep = torch.nn.Module()
        self.deep.inner = torch.nn.ModuleDict({"extra": _LoRAToyAttention(d)})
        self.head = torch.nn.Linear(d, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.layers:
            h = block(h)
        return self.head(self.deep.inner["extra"](h))


def check_apply_lora(fn: Callable[..., Any]) -> None:
    """``fn(model, target_modules, r, alpha)`` freezes ``model`` and wraps the matching nn.Linear layers in LoRA."""
    __tracebackhide__ = True
    import copy

    with torch.random.fork_rng():
        torch.manual_seed(0)
        ids = torch.randint(0, 11, (2, 5))
        for targets, r, alpha in ((["query", "value"], 2, 4.0), (["dense"], 1, 2.0)):
            case = f"target_modules={targets}, r={r}"
            original = _LoRAToyModel().eval()
            model = copy.deepcopy(original)
            linear_names = [n for n, m in original.named_modules() if isinstance(m, torch.nn.Linear)]
            wanted = [n for n in linear_names if n.rsplit(".", 1)[-1] in targets]
            returned = call_student(fn, model, targets, r, alpha, case=case)
            if isinstance(returned, torch.nn.Module):
                model = returned
            for name in linear_names:
                try:
                    module = model.get_submodule(name)
                except AttributeError:
                    module = None
                if module is None:
                    fail(f"after your apply_lora the model has no module {name!r} any more: replace a layer under "
                         f"the same name (setattr on its parent) and leave the others where they are.")
                is_lora = hasattr(module, "lora_A") and hasattr(module, "lora_B")
                if name in wanted and not is_lora:
                    if name.startswith("deep."):
                        fail(f"you missed {name!r} ({case}), which sits deeper in the model: walk all modules with "
                             f"model.named_modules(), not only the ones you know about.")
                    fail(f"you did not replace {name!r} ({case}): every nn.Linear whose name ends with "
                         f"'.' + a target should become a LoRA layer (set it on its parent with setattr).")
                if name not in wanted and is_lora:
                    fail(f"you replaced {name!r}, which does not match {targets}: compare the whole last part of the "
                         f"name (name == t or name.endswith('.' + t)), not a substring.")
                if is_lora and tuple(module.lora_A.shape)[0] != r:
                    fail(f"the LoRA layer at {name!r} has rank {tuple(module.lora_A.shape)[0]}, but r={r} was asked "
                         f"for: pass r and alpha on to LoRALinear.")
            trainable = [n for n, p in model.named_parameters() if p.requires_grad]
            extra = [n for n in trainable if not n.endswith(("lora_A", "lora_B"))]
            if extra:
                fail(f"you left {len(extra)} pretrained parameters trainable (e.g. {extra[0]!r}) on {case}: freeze every "
                     f"parameter (requires_grad_(False)) so that only lora_A and lora_B train.")
            n_expected = sum(r * (m.in_features + m.out_features) for n, m in original.named_modules() if n in wanted)
            n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            if n_trainable != n_expected:
                fail(f"your adapted model trains {n_trainable} numbers on {case}; the LoRA layers alone have "
                     f"{n_expected}.")
            with torch.no_grad():
                compare(call_student(model, ids, case=case), original(ids), what="the adapted model's output",
                        case=f"{case} before training (B = 0, so it must equal the original model)")
    passed("check_apply_lora", "the matching layers (nested ones too) and only those got LoRA, only lora_A and "
                               "lora_B train, and the model starts at the pretrained one.")
