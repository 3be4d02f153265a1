"""LoRA from scratch: low-rank adapters for frozen linear layers.

Explained in notebooks/07_lora.ipynb (and used on a causal LM in notebooks/09_lora_causal_lm_gpu.ipynb).

Hu et al. 2021 (LoRA, Eq. 3): a frozen pretrained weight W0 (out x in) gets a trainable update of rank r,

    h = W0 x + (alpha / r) * B A x,        A: (r, in),  B: (out, r),

with A random (kaiming-uniform, a = sqrt(5), as ``nn.Linear`` and ``peft`` do) and B = 0, so the adapted
model starts *exactly* at the pretrained one. Only A and B are trained: r * (in + out) numbers instead of
in * out. After training, ``merge()`` folds the update into the weight, W0 <- W0 + (alpha / r) B A, and
the layer costs nothing extra at inference.

Names follow ``peft`` (``lora_A``, ``lora_B``, ``scaling``, ``target_modules``) so the two can be compared
weight for weight (tests/test_lora.py does).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LoRALinear", "apply_lora", "apply_bitfit", "lora_layers", "is_lora_layer", "scaling_of", "low_rank_update",
    "merge_lora", "count_trainable", "trainable_parameters", "save_adapter", "load_adapter",
]


def _check_rank_alpha(r: object, alpha: object) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r (the LoRA rank) must be a positive integer, got {r!r}: try r=8.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha must be a positive number (the scaling is alpha / r), got {alpha!r}: "
                         f"try alpha=2*r.")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update: h = W0 x + b + (alpha/r) B A dropout(x).

    ``lora_A`` has shape (r, in_features) and starts kaiming-uniform; ``lora_B`` has shape
    (out_features, r) and starts at zero, so at first the layer computes exactly what ``base`` does.
    Dropout acts on the input of the LoRA branch only, as in ``peft``.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got a {type(base).__name__}: pass the linear "
                            f"layer itself (e.g. model.encoder.layer[0].attention.self.query).")
        _check_rank_alpha(r, alpha)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
        if r > min(base.in_features, base.out_features):
            raise ValueError(f"r={r} is larger than the layer itself ({base.out_features} x "
                             f"{base.in_features}); a rank above min(in, out) adds nothing: choose a smaller r.")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        factory = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, r, **factory))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # code that reads layer.weight (e.g. for its dtype) keeps working
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def reset_lora_parameters(self) -> None:
        """A ~ kaiming-uniform(a=sqrt(5)) (fan_in = in_features, as nn.Linear and peft), B = 0."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """The update (alpha/r) B A, shape (out_features, in_features), in the base weight's dtype."""
        delta = self.scaling * (self.lora_B.float() @ self.lora_A.float())
        return delta.to(self.base.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"this LoRA layer takes inputs whose last dimension is in_features="
                             f"{self.in_features}, but x has shape {tuple(x.shape)}; pass (..., "
                             f"{self.in_features}) inputs, or wrap a linear layer of the right width.")
        h = self.base(x)
        if self.merged:  # the update already lives in base.weight
            return h
        x_lora = self.lora_dropout(x).to(self.lora_A.dtype)
        update = F.linear(F.linear(x_lora, self.lora_A), self.lora_B) * self.scaling
        return h + update.to(h.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + (alpha/r) B A. Afterwards the forward pass uses only the base layer.

        Merging an already merged layer does nothing (it would add the update twice).
        """
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 <- W0 - (alpha/r) B A: undo ``merge()`` (up to float rounding). No-op when not merged."""
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}")


def _matches(name: str, targets: Sequence[str]) -> bool:
    """peft's rule: the module's full name equals a target or ends with '.' + target."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _as_names(value: object, what: str, example: str) -> list[str]:
    if isinstance(value, str):
        raise TypeError(f"{what} must be a list of module names, got the string {value!r}: "
                        f"write {what}=[{value!r}] (e.g. {example}).")
    if not isinstance(value, Iterable):
        raise TypeError(f"{what} must be a list of module names such as {example}, got "
                        f"{type(value).__name__}.")
    names = list(value)
    if not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"{what} must contain non-empty strings (module names such as {example}), got {names!r}.")
    return names


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _some_names(names: list[str], k: int = 8) -> str:
    suffixes = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
    shown = ", ".join(repr(s) for s in suffixes[:k])
    return shown + (", ..." if len(suffixes) > k else "") if shown else "none"


def _train_extra(model: nn.Module, trainable_extra: Sequence[str]) -> None:
    for target in trainable_extra:
        hits = [m for n, m in model.named_modules() if n and _matches(n, [target])]
        if not hits:
            top = ", ".join(repr(n) for n, _ in model.named_children())
            raise ValueError(f"trainable_extra names {target!r}, but no module of the model is called that; "
                             f"top-level modules are: {top}.")
        for module in hits:
            for p in module.parameters():
                p.requires_grad_(True)


def apply_lora(model: nn.Module, target_modules: Sequence[str], r: int, alpha: float,
               dropout: float = 0.0, trainable_extra: Sequence[str] = (),
               layer: Callable[[nn.Linear, int, float], nn.Module] | None = None) -> nn.Module:
    """Freeze ``model`` and wrap every ``nn.Linear`` whose name matches ``target_modules`` in a LoRA layer.

    A module matches a target when its full name equals it or ends with ``"." + target`` (peft's rule), so
    ``["query", "value"]`` picks ``encoder.layer.3.attention.self.query`` but not ``query_proj``.
    Afterwards only the LoRA matrices are trainable, plus every parameter of the modules named in
    ``trainable_extra`` -- e.g. ``trainable_extra=["classifier"]`` to train a new task head too (peft calls
    this ``modules_to_save``). The model is changed in place and returned.

    ``layer`` builds the LoRA layers: :class:`LoRALinear` by default, or another class called as
    ``layer(base, r, alpha)`` -- notebook 07 passes the student's own layer of exercise 07.3 here.
    """
    targets = _as_names(target_modules, "target_modules", "['query', 'value']")
    extra = _as_names(trainable_extra, "trainable_extra", "['classifier']")
    if not targets:
        raise ValueError("target_modules is empty: name the linear layers to adapt, e.g. ['query', 'value'].")
    _check_rank_alpha(r, alpha)
    if layer is not None and dropout:
        raise ValueError(f"dropout={dropout!r} belongs to the course's LoRALinear; a layer of your own is built as "
                         f"layer(base, r, alpha): leave dropout at 0 (or pass layer=None).")
    if lora_layers(model):
        raise ValueError("this model already has LoRA layers: call apply_lora once, on a fresh model "
                         "(or merge_lora(model) first).")
    for p in model.parameters():
        p.requires_grad_(False)
    matched: list[str] = []
    for name, module in list(model.named_modules()):
        if not name or not _matches(name, targets):
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"target {name!r} is a {type(module).__name__}, not an nn.Linear; this LoRA wraps "
                             f"linear layers only: name the linear layers inside it instead.")
        new = LoRALinear(module, r, alpha, dropout) if layer is None else layer(module, r, alpha)
        if not is_lora_layer(new):
            raise TypeError(f"layer(base, r, alpha) built a {type(new).__name__} without nn.Parameter attributes "
                            f"lora_A and lora_B: pass a LoRA layer class such as lora.LoRALinear.")
        new.to(module.weight.device)  # a layer of one's own may make A and B on the CPU
        _set_child(model, name, new)
        matched.append(name)
    if not matched:
        raise ValueError(f"no nn.Linear of the model matches target_modules={targets}; its linear layers are "
                         f"called {_some_names(_linear_names(model))}.")
    _train_extra(model, extra)
    return model


def apply_bitfit(model: nn.Module, trainable_extra: Sequence[str] = ()) -> nn.Module:
    """BitFit (Ben Zaken et al. 2022): freeze everything except the bias vectors (and ``trainable_extra``)."""
    extra = _as_names(trainable_extra, "trainable_extra", "['classifier']")
    found = False
    for name, p in model.named_parameters():
        is_bias = name == "bias" or name.endswith(".bias")
        p.requires_grad_(is_bias)
        found |= is_bias
    if not found:
        raise ValueError("the model has no parameters called 'bias', so BitFit has nothing to train.")
    _train_extra(model, extra)
    return model


def is_lora_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a LoRA layer: the course's :class:`LoRALinear`, or any module with nn.Parameter
    attributes ``lora_A`` (r, in) and ``lora_B`` (out, r) -- such as the one a student writes in exercise 07.3.
    (peft's layers keep their matrices in ModuleDicts and do not count.)"""
    return isinstance(module, LoRALinear) or (isinstance(getattr(module, "lora_A", None), nn.Parameter)
                                              and isinstance(getattr(module, "lora_B", None), nn.Parameter))


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's LoRA layers by name (see :func:`is_lora_layer`)."""
    return {n: m for n, m in model.named_modules() if is_lora_layer(m)}


def scaling_of(layer: nn.Module) -> float:
    """alpha / r of a LoRA layer: its ``scaling``, or else its ``alpha`` over its rank (``lora_A``'s rows)."""
    scaling = getattr(layer, "scaling", None)
    if scaling is None and getattr(layer, "alpha", None) is not None:
        scaling = float(layer.alpha) / layer.lora_A.shape[0]
    try:
        return float(scaling)
    except (TypeError, ValueError):
        raise ValueError(f"this {type(layer).__name__} says neither its scaling nor its alpha: give it an attribute "
                         f"scaling = alpha / r, as the course's and peft's layers have.") from None


def low_rank_update(layer: nn.Module) -> torch.Tensor:
    """The layer's update Delta W = (alpha / r) B A, shape (out_features, in_features), detached, float32."""
    if not is_lora_layer(layer):
        raise TypeError(f"low_rank_update takes a LoRA layer (with lora_A and lora_B), got a {type(layer).__name__}.")
    return scaling_of(layer) * (layer.lora_B.detach().float() @ layer.lora_A.detach().float())


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer (W0 += (alpha/r) B A) and put its plain ``nn.Linear`` back in its place.

    The result is an ordinary model (same class, same state-dict keys as before LoRA) that can be saved
    with ``save_pretrained`` or safetensors and loaded without this library.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to merge: call apply_lora(model, ...) first.")
    for name, layer in layers.items():
        if not isinstance(getattr(layer, "base", None), nn.Linear) or not callable(getattr(layer, "merge", None)):
            raise ValueError(f"layer {name!r} ({type(layer).__name__}) has no merge() or no wrapped nn.Linear called "
                             f"base, so merge_lora cannot put a plain layer back: give it both, as LoRALinear has.")
        layer.merge()
        _set_child(model, name, layer.base)
    return model


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that require gradients, by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def count_trainable(model: nn.Module) -> int:
    """How many numbers the optimiser updates."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


_META_KEY = "course_lib.lora"  # the adapter format's name, kept as first written


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Save only what training changed: every LoRA A and B plus the other trainable parameters
    (a task head from ``trainable_extra``), as safetensors, with r and alpha of each layer in the metadata.
    Any LoRA layer will do (:func:`is_lora_layer`); :func:`load_adapter` rebuilds them as :class:`LoRALinear`.
    """
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers: call apply_lora(model, ...) before save_adapter.")
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        tensors[f"{name}.lora_A"] = layer.lora_A.detach().contiguous().cpu()
        tensors[f"{name}.lora_B"] = layer.lora_B.detach().contiguous().cpu()
    extra = [n for n, p in model.named_parameters() if p.requires_grad and not n.endswith((".lora_A", ".lora_B"))]
    params = dict(model.named_parameters())
    for n in extra:
        tensors[n] = params[n].detach().contiguous().cpu()
    meta = {"layers": {n: {"r": l.lora_A.shape[0], "alpha": l.alpha if isinstance(l, LoRALinear)
                           else scaling_of(l) * l.lora_A.shape[0]} for n, l in layers.items()}, "extra": extra}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={_META_KEY: json.dumps(meta)})
    return path


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Load an adapter written by :func:`save_adapter` into ``model``.

    ``model`` is either the same architecture without LoRA (the LoRA layers are added, with the saved r
    and alpha, and frozen like ``apply_lora`` does) or one that already has matching unmerged LoRA layers.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no adapter file at {path}: save one with save_adapter(model, path) first.")
    with safe_open(str(path), framework="pt") as f:
        meta_text = (f.metadata() or {}).get(_META_KEY)
        if meta_text is None:
            raise ValueError(f"{path.name} is not an adapter written by course_lib.parts.lora.save_adapter "
                             f"(its metadata has no {_META_KEY!r} entry).")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(meta_text)
    modules = dict(model.named_modules())
    if not lora_layers(model):
        for p in model.parameters():
            p.requires_grad_(False)
    for name, spec in meta["layers"].items():
        module = modules.get(name)
        if isinstance(module, nn.Linear):
            _set_child(model, name, LoRALinear(module, spec["r"], spec["alpha"]))
        elif isinstance(module, LoRALinear):
            if module.merged:
                raise ValueError(f"layer {name!r} is merged: call unmerge() on it before loading an adapter.")
            if module.r != spec["r"]:
                raise ValueError(f"layer {name!r} has rank {module.r} but the adapter was saved with rank "
                                 f"{spec['r']}: load it into a model without LoRA instead.")
        else:
            raise ValueError(f"the adapter adapts {name!r}, but this model has no linear layer of that name: "
                             f"load it into the same architecture it was trained on.")
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        if key not in params:
            raise ValueError(f"the adapter holds {key!r}, which this model does not have.")
        if params[key].shape != value.shape:
            raise ValueError(f"{key!r} has shape {tuple(value.shape)} in the adapter but "
                             f"{tuple(params[key].shape)} in the model: is it the same architecture?")
        with torch.no_grad():
            params[key].copy_(value)
    for n in meta["extra"]:
        params[n].requires_grad_(True)
    return model
