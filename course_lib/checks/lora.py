"""Checks of notebooks/07_lora.ipynb (exercises 07.*), with their hints."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from course_lib.checks.framework import (
    exercise, CheckFailed, NotAttempted, student_code, register_hint, fail, _name_of, not_attempted_message,
    call_student, close, compare, passed, require_tensor,
)


# ----------------------------------------------------------------------------------------------
# ---- 07_lora: the LoRA forward pass, a LoRALinear layer, injecting LoRA into a model
# ----------------------------------------------------------------------------------------------

register_hint("07.1",
              "h is the frozen layer's output plus a low-rank correction: A maps x down to r numbers, B maps "
              "them back up, and only that correction is scaled by alpha / r.",
              "Rows of x are the vectors, so every matrix appears transposed: x @ W0.T for the base, x @ A.T "
              "then @ B.T for the branch; never form B @ A (and never change W0 in place).",
              "return x @ W0.T + (alpha / r) * (x @ A.T) @ B.T")
register_hint("07.2",
              "h depends on B through u = A x and on A through B^T g: write the chain rule for one row x_n with "
              "upstream gradient g_n = dL/dh_n, then add up the rows.",
              "With s = alpha / r, u_n = A x_n: dL/dB = s * sum_n g_n u_n^T and dL/dA = s * sum_n (B^T g_n) x_n^T. "
              "Flatten the leading dimensions of x and g to rows first (reshape(-1, d)); sum over rows, do not "
              "average (g already carries any 1/N of the loss).",
              "X, G = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]); dB = s * G.T @ (X @ A.T); "
              "dA = s * (G @ B).T @ X")
register_hint("07.3",
              "The layer keeps the pretrained nn.Linear frozen and adds two small trainable matrices; B starts "
              "at zero so that the layer starts exactly at the pretrained one.",
              "In __init__: store base, freeze its parameters, make lora_A an nn.Parameter of shape (r, in) "
              "filled by nn.init.kaiming_uniform_(a=math.sqrt(5)) and lora_B an nn.Parameter of zeros (out, r), "
              "store self.scaling = alpha / r and merged = False. forward adds the scaled branch unless merged; merge() adds "
              "(alpha/r) B @ A to base.weight once, unmerge() subtracts it once.",
              "return self.base(x) + self.scaling * (x @ self.lora_A.T) @ self.lora_B.T")
register_hint("07.4",
              "Freeze the whole model first, then find each nn.Linear whose name matches a target and put a "
              "LoRA layer wrapping it in its place: the LoRA layer must *replace* the old one inside its parent.",
              "Loop over list(model.named_modules()) (a list, because you change the model while looping); a "
              "name matches when name == t or name.endswith('.' + t); split 'a.b.query' into the parent 'a.b' "
              "and 'query' with name.rpartition('.'), get the parent with model.get_submodule, and setattr.",
              "setattr(model.get_submodule(parent_name), last_name, lora.LoRALinear(module, r, alpha))")


def _lora_wrong_scalings(r: float, alpha: float) -> dict[str, float]:
    return {"your scaling is r/alpha; it should be alpha/r": r / alpha,
            "your scaling is alpha; divide it by r (the scaling is alpha/r)": alpha,
            "you left out the scaling alpha/r of the LoRA branch": 1.0,
            "your scaling is alpha/sqrt(r) (that is rsLoRA); here use alpha/r as in the LoRA paper": alpha / r ** 0.5}


@exercise("07.1", points=1, forbid=("course_lib.parts.lora:LoRALinear",))
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
             "B = 0, the starting point (r=2, alpha=16)": (make((4,), 2, zero_b=True), 16.0, 2),
             "float64 inputs (r=2, alpha=4)": (tuple(t.double() for t in make((3,), 2)), 4.0, 2)}
    for case, ((x, w0, a, b), alpha, r) in cases.items():
        given = [t.clone() for t in (x, w0, a, b)]
        result = call_student(fn, *given, alpha, r, case=case)
        for label, before, after in zip(("x", "W0", "A", "B"), (x, w0, a, b), given):
            if not torch.equal(before, after):
                fail(f"your function changed {label} in place on {case} (e.g. W0 += ...): the pretrained "
                     f"weight and the inputs must stay as they were; compute h from new tensors.")
        if isinstance(result, torch.Tensor) and result.dtype != x.dtype:
            fail(f"your h is {result.dtype} on {case} but the inputs are {x.dtype}: keep the inputs' dtype "
                 f"(no .float() inside).")
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


def _lora_scaling_attribute(layer: Any, r: int, alpha: float, case: str) -> None:
    """The layer keeps its scale where later cells read it: ``scaling`` (= alpha / r), or else ``alpha``."""
    __tracebackhide__ = True
    for name, expected in (("scaling", alpha / r), ("alpha", alpha)):
        value = getattr(layer, name, None)
        if value is None:
            continue
        try:
            value = float(value)
        except (TypeError, ValueError):
            fail(f"self.{name} should be a number on {case}, but it is a {type(value).__name__}.")
        if abs(value - expected) > 1e-9 * max(1.0, abs(expected)):
            fail(f"self.{name} is {value:g} on {case}, but it should be {'alpha / r' if name == 'scaling' else 'alpha'}"
                 f" = {expected:g}: later cells read the layer's scale from it.")
        return
    fail("your layer does not keep its scale: store self.scaling = alpha / r in __init__ (later cells, like peft, "
         "read it from there).")


def _lora_try(method: Callable[[], Any], what: str) -> bool:
    """Call layer.merge()/unmerge() a second time: raising is an acceptable answer (returns False)."""
    try:
        with student_code():
            method()
    except NotImplementedError:
        raise NotAttempted(not_attempted_message(f"{what} is not written yet")) from None
    except CheckFailed:
        raise
    except Exception:  # noqa: BLE001 -- refusing a second merge is fine
        return False
    return True


@exercise("07.3", points=2, forbid=("course_lib.parts.lora:LoRALinear",))
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
            _lora_scaling_attribute(layer, r, alpha, case)
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
        self.key_value = torch.nn.Linear(d, d)   # ends with "value", but its last name part is not "value"
        self.ffn = torch.nn.Sequential(torch.nn.Linear(d, 2 * d), torch.nn.GELU(), torch.nn.Linear(2 * d, d))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.attention(h)
        return h + self.ffn(h) + 0.1 * self.query_proj(h) + 0.1 * self.key_value(h)


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


def _lora_alternative_scalings(r: int, alpha: float) -> dict[str, float]:
    return {**_lora_wrong_scalings(r, alpha),
            "you passed alpha / r as alpha, so the layer scales by alpha / r**2; pass alpha itself "
            "(LoRALinear divides by r)": alpha / r ** 2}


@exercise("07.4", points=2, forbid=("course_lib.parts.lora:apply_lora",))
def check_apply_lora(fn: Callable[..., Any]) -> None:
    """``fn(model, target_modules, r, alpha)`` freezes ``model`` and wraps the matching nn.Linear layers in LoRA.

    Checked on a toy encoder: which layers were replaced (nested ones too, whole-name matches only),
    that only A and B train, that the model starts at the pretrained one, and -- with A and B set to
    seeded non-zero values -- that the adapted model computes what the reference LoRA computes with the
    same A and B and that a gradient reaches every A and B.
    """
    __tracebackhide__ = True
    import copy

    from course_lib.parts.lora import LoRALinear as ReferenceLoRA

    with torch.random.fork_rng():
        torch.manual_seed(0)
        ids = torch.randint(0, 11, (2, 5))
        for targets, r, alpha in ((["query", "value"], 2, 6.0), (["dense"], 3, 1.5)):
            case = f"target_modules={targets}, r={r}, alpha={alpha}"
            original = _LoRAToyModel().eval()
            model = copy.deepcopy(original)
            linear_names = [n for n, m in original.named_modules() if isinstance(m, torch.nn.Linear)]
            wanted = [n for n in linear_names if n.rsplit(".", 1)[-1] in targets]
            returned = call_student(fn, model, targets, r, alpha, case=case)
            if isinstance(returned, torch.nn.Module):
                model = returned
            model.eval()
            for name in linear_names:
                try:
                    module = model.get_submodule(name)
                except AttributeError:
                    module = None
                if module is None:
                    fail(f"after your apply_lora the model has no module {name!r} any more: replace a layer under "
                         f"the same name (setattr on its parent) and leave the others where they are.")
                is_lora = hasattr(module, "lora_A") and hasattr(module, "lora_B")
                if is_lora and type(module) is torch.nn.Linear:
                    fail(f"{name!r} is still a plain nn.Linear with lora_A and lora_B attached to it ({case}): its "
                         f"forward never uses them; put a LoRA layer that wraps it in its place (setattr on the "
                         f"parent).")
                if name in wanted and not is_lora:
                    if name.startswith("deep."):
                        fail(f"you missed {name!r} ({case}), which sits deeper in the model: walk all modules with "
                             f"model.named_modules(), not only the ones you know about.")
                    fail(f"you did not replace {name!r} ({case}): every nn.Linear whose name ends with "
                         f"'.' + a target should become a LoRA layer (set it on its parent with setattr).")
                if name not in wanted and is_lora:
                    last = name.rsplit(".", 1)[-1]
                    if any(last.endswith(t) for t in targets):
                        fail(f"you replaced {name!r}, which does not match {targets}: its last part {last!r} only "
                             f"ends with a target; a name matches when name == t or name.endswith('.' + t), "
                             f"with the dot.")
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

            # B = 0 hides the branch: give every A and B seeded non-zero values and compare with the
            # reference LoRA holding the same A and B
            generator = torch.Generator().manual_seed(100 + r)
            reference = copy.deepcopy(original)
            for name in wanted:
                layer = model.get_submodule(name)
                a_value = 0.5 * torch.randn(r, layer.lora_A.shape[-1], generator=generator)
                b_value = 0.5 * torch.randn(layer.lora_B.shape[0], r, generator=generator)
                if tuple(layer.lora_A.shape) != tuple(a_value.shape) or tuple(layer.lora_B.shape) != tuple(b_value.shape):
                    fail(f"the LoRA layer at {name!r} has lora_A {tuple(layer.lora_A.shape)} and lora_B "
                         f"{tuple(layer.lora_B.shape)}; they should be (r, in) and (out, r).")
                with torch.no_grad():
                    layer.lora_A.copy_(a_value)
                    layer.lora_B.copy_(b_value)
                parent, _, child = name.rpartition(".")
                twin = ReferenceLoRA(reference.get_submodule(name), r, alpha)
                with torch.no_grad():
                    twin.lora_A.copy_(a_value)
                    twin.lora_B.copy_(b_value)
                setattr(reference.get_submodule(parent) if parent else reference, child, twin)
            reference.eval()

            def with_scaling(k: float) -> torch.Tensor:
                twins = [m for m in reference.modules() if isinstance(m, ReferenceLoRA)]
                for twin in twins:
                    twin.scaling = k
                with torch.no_grad():
                    out = reference(ids)
                for twin in twins:
                    twin.scaling = alpha / r
                return out

            wrong = {"it ignores lora_A and lora_B: the layers that replace the targets must add the LoRA branch "
                     "(use lora.LoRALinear(module, r, alpha))": lambda: original(ids)}
            wrong.update({f"the LoRA layers scale wrongly: {sentence}": (lambda k=k: with_scaling(k))
                          for sentence, k in _lora_alternative_scalings(r, alpha).items()})
            with torch.no_grad():
                expected = reference(ids)
                compare(call_student(model, ids, case=case), expected, what="the adapted model's output",
                        case=f"{case} with non-zero A and B", wrong_answers=wrong)
            model.zero_grad(set_to_none=True)
            out = call_student(model, ids, case=case)
            if out.requires_grad:
                out.square().sum().backward()
            for name in wanted:
                layer = model.get_submodule(name)
                for matrix in ("lora_A", "lora_B"):
                    grad = getattr(layer, matrix).grad
                    if grad is None or torch.count_nonzero(grad) == 0:
                        fail(f"no gradient reaches {matrix} of {name!r} ({case}, non-zero A and B): the LoRA branch "
                             f"must be computed from the parameters themselves, not under torch.no_grad() or from "
                             f"detached copies, or training will never move them.")
    passed("check_apply_lora", "the matching layers (nested ones too) and only those got LoRA, only lora_A and "
                               "lora_B train, the model starts at the pretrained one, and with non-zero A and B it "
                               "computes the reference LoRA and passes gradients to every A and B.")


# ---- 07.2: the backward pass of the LoRA branch ----------------------------------------------------


def _lora_grad_reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float,
                         g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dL/dA and dL/dB of h = W0 x + s B A x for upstream gradient g = dL/dh, by autograd (float64)."""
    a_, b_ = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    h = s * (x @ a_.T) @ b_.T
    (h * g).sum().backward()
    return a_.grad, b_.grad


def _lora_grad_cases() -> dict[str, tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(74)
    d_in, d_out = 5, 3

    def make(lead: tuple[int, ...], r: int, zero_b: bool = False):
        x = torch.randn(*lead, d_in, generator=g, dtype=torch.float64)
        a = torch.randn(r, d_in, generator=g, dtype=torch.float64)
        b = torch.zeros(d_out, r, dtype=torch.float64) if zero_b else torch.randn(d_out, r, generator=g, dtype=torch.float64)
        upstream = torch.randn(*lead, d_out, generator=g, dtype=torch.float64)
        return x, a, b, upstream

    return {"B = 0, the first step (r=2, alpha=16)": (*make((6,), 2, zero_b=True), 16.0, 2),
            "a batch of 4 rows, A and B non-zero (d_in=5, d_out=3, r=2, alpha=6)": (*make((4,), 2), 6.0, 2),
            "a (2, 3, d_in) batch of sequences (r=4, alpha=2)": (*make((2, 3), 4), 2.0, 4)}


@exercise("07.2", points=2, forbid=("course_lib.parts.lora:LoRALinear",), autograd=True)
def check_lora_grads(fn: Callable[..., Any]) -> None:
    """``fn(x, A, B, alpha, r, g)`` returns (dA, dB), the gradients of L through h = W0 x + (alpha/r) B A x
    given g = dL/dh of the same shape as h; compared with autograd in float64."""
    __tracebackhide__ = True
    cases = _lora_grad_cases()
    for case, (x, a, b, g, alpha, r) in cases.items():
        s = alpha / r
        given = [t.clone() for t in (x, a, b, g)]
        result = call_student(fn, given[0], given[1], given[2], alpha, r, given[3], case=case)
        for label, before, after in zip(("x", "A", "B", "g"), (x, a, b, g), given):
            if not torch.equal(before, after):
                fail(f"your function changed {label} in place on {case}: compute the gradients into new tensors.")
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            fail(f"your function should return two tensors (dA, dB) on {case}, but it returns "
                 f"{type(result).__name__}.")
        da, db = result
        require_tensor(da, "your dA")
        require_tensor(db, "your dB")
        n_out, n_in = b.shape[0], a.shape[1]
        if tuple(da.shape) == tuple(b.shape) and tuple(db.shape) == tuple(a.shape):
            fail(f"you returned (dB, dA) on {case}: return dA (shape (r, d_in)) first, then dB (shape (d_out, r)).")
        for what, value, shape, name, left, right in (("dA", da, a.shape, "A", "r", "d_in"),
                                                      ("dB", db, b.shape, "B", "d_out", "r")):
            if tuple(value.shape) == tuple(shape):
                continue
            if tuple(value.shape) == tuple(shape)[::-1]:
                fail(f"your {what} has shape {tuple(value.shape)} on {case}, the transpose of {name}'s "
                     f"({left}, {right}) = {tuple(shape)}: a gradient has the shape of its parameter; check "
                     f"which factor is transposed.")
            if tuple(value.shape) == (n_out, n_in):
                fail(f"your {what} has shape ({n_out}, {n_in}) on {case}: that is the gradient of a full matrix "
                     f"W (g x^T), not of the low-rank factor {name}; multiply by the other factor as the chain "
                     f"rule says.")
            if value.dim() > 2 and tuple(value.shape[-2:]) == tuple(shape):
                fail(f"your {what} has shape {tuple(value.shape)} on {case}: it still has the leading batch "
                     f"dimensions; flatten x and g to rows (reshape(-1, d)) and sum over all of them.")
            fail(f"your {what} has shape {tuple(value.shape)} on {case}, but it should have {name}'s shape "
                 f"{tuple(shape)}.")
        if da.dtype != torch.float64 or db.dtype != torch.float64:
            fail(f"your gradients are {da.dtype} and {db.dtype} on {case}, but the inputs are float64: keep their "
                 f"dtype (the check compares with autograd in float64).")
        ref_a, ref_b = _lora_grad_reference(x, a, b, s, g)
        rows = x.numel() // x.shape[-1]
        wrong_scalings = _lora_wrong_scalings(r, alpha)
        for what, value, ref in (("dA", da, ref_a), ("dB", db, ref_b)):
            wrong = {sentence: (lambda k=k, ref=ref: ref * (k / s)) for sentence, k in wrong_scalings.items()
                     if abs(k - s) > 1e-12}
            wrong["you averaged over the rows; the gradient of a sum is the sum of the rows' gradients (g already "
                  "holds any 1/N of the loss)"] = lambda ref=ref: ref / rows
            wrong["it has the wrong sign: the gradient is g pushed back through h, no minus"] = lambda ref=ref: -ref
            if what == "dA" and torch.count_nonzero(b) == 0 and torch.count_nonzero(value) != 0:
                fail(f"your dA is not zero on {case}: dA = s (G B)^T X carries the factor B, so while B = 0 the "
                     f"first step moves B but not A.")
            compare(value, ref, what=f"your {what}", case=case, wrong_answers=wrong, atol=1e-9, rtol=1e-7)
    passed("check_lora_grads", f"dA and dB match autograd in float64 on {len(cases)} cases, including batches of "
                               f"sequences and B = 0 (where dA is exactly zero).")
