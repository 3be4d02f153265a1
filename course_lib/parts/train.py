"""The training loop of the course: batches of random windows, AdamW, warm-up + cosine, checkpoints.

Explained in notebooks/04_training_a_language_model.ipynb; reused by 03 (positions), 05 (scaling laws) and 10 (DDP);
It trains any ``nn.Module`` whose ``forward(x, y)`` returns ``(logits, loss)``, such as
``course_lib.parts.model.GPT``:

    history = train(model, train_tokens, val_tokens, TrainConfig(steps=600, batch_size=32, lr=1e-3))

One optimiser step:
  1. for each of ``grad_accum`` micro-batches: draw (x, y) windows, loss = model(x, y)[1] (bf16
     autocast on a GPU), backward(loss / grad_accum) -- gradients add up over the micro-batches;
  2. clip the global gradient norm to ``grad_clip``;
  3. set the learning rate ``lr_at(step)`` (linear warm-up, then cosine decay to ``min_lr``);
  4. AdamW step (the fused kernel on CUDA), zero the gradients.

Checkpoints are ``safetensors`` files (model weights, optimiser state, step, random-number-generator
states, history as JSON metadata; no pickles), so ``train(..., resume=True)`` continues an interrupted
run exactly where it stopped: the weights equal those of an uninterrupted run (tests/test_train.py).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["TrainConfig", "History", "lr_at", "get_batch", "configure_optimizer", "evaluate", "train",
           "save_checkpoint", "load_checkpoint", "peak_flops", "peak_for_name", "mfu", "MFU", "PEAK_BF16_FLOPS",
           "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "checkpoint.safetensors"
_FORMAT = "course_lib.parts.train/1"

# Dense (no 2:4 sparsity) bf16 tensor-core peaks, FLOP/s, matched against torch.cuda.get_device_name()
# (e.g. "NVIDIA H100 80GB HBM3" for the SXM board, "NVIDIA H100 NVL", "NVIDIA H100 PCIe", "NVIDIA H200",
# "NVIDIA A100-SXM4-80GB"). Sources, dense bf16 = half the datasheets' figures "with sparsity":
# NVIDIA A100 datasheet: 312 TFLOP/s (SXM and PCIe alike). NVIDIA H100 datasheet: SXM 1,979 -> 989,
# NVL 1,671 -> 835, PCIe 1,513 -> 756. NVIDIA H200 datasheet: SXM 1,979 -> 989, NVL 1,671 -> 835.
# Lookup (peak_for_name): the longest key contained in the name wins, so "H100 NVL" and "H100 PCIe" are
# never scored against the SXM peak that the plain "H100" stands for.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H100": 989e12,        # SXM
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H200": 989e12,        # SXM
    "H200 NVL": 835e12,
    "A100": 312e12,
}


def peak_for_name(device_name: str) -> tuple[str, float] | None:
    """``(key, dense bf16 FLOP/s)`` of ``PEAK_BF16_FLOPS`` for a CUDA device name, or None if unknown."""
    name = device_name.lower()
    matches = [key for key in PEAK_BF16_FLOPS if key.lower() in name]
    if not matches:
        return None
    key = max(matches, key=len)
    return key, PEAK_BF16_FLOPS[key]


def peak_flops(device: torch.device | str | None = None) -> float | None:
    """The dense bf16 peak FLOP/s of a CUDA device from ``PEAK_BF16_FLOPS``; None on CPU or if unknown."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None
    found = peak_for_name(torch.cuda.get_device_name(device))
    return found[1] if found else None


@dataclass(frozen=True)
class MFU:
    """Model-FLOPs utilisation of a run: ``value`` (a fraction of the peak) or None, and ``reason``,
    which names the peak used or says why there is none. ``str()`` gives e.g. "37.1% of ..."."""

    value: float | None
    peak_flops: float | None
    reason: str

    def __str__(self) -> str:
        return f"{100 * self.value:.1f}% {self.reason}" if self.value is not None else f"not defined: {self.reason}"


def mfu(tokens_per_s: float, flops_per_token: float, device: torch.device | str | None = None, *,
        amp: str = "bf16") -> MFU:
    """MFU = tokens/s × training FLOPs per token / the GPU's dense bf16 peak, the one definition the
    course uses (notebooks 04, 09, 10; ``train`` and ``course_lib.experiments.bench``).

    ``flops_per_token`` counts the training FLOPs of one token (``course_lib.parts.model.flops_per_token`` for
    the GPT, ≈ 6N; ≈ 4N for LoRA, where no weight gradients of the frozen base are computed).
    ``amp`` is how the run computed: "bf16" (or "auto", which is bf16 autocast on CUDA, as in ``train``)
    is scored against ``PEAK_BF16_FLOPS``; "none" (fp32 matmuls) is not held to a bf16 peak and gets
    None, as do CPUs and GPUs missing from the table. ``device`` defaults to the current CUDA device.
    """
    if amp not in ("auto", "bf16", "none"):
        raise ValueError(f"amp must be 'auto', 'bf16' or 'none' (as in TrainConfig), got {amp!r}.")
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return MFU(None, None, f"there is no bf16 tensor-core peak for a {device.type} device; MFU is "
                               f"measured on CUDA GPUs only")
    if amp == "none":
        return MFU(None, None, "the run computed in fp32 (amp='none'), so it is not scored against the "
                               "dense bf16 peak")
    name = torch.cuda.get_device_name(device)
    found = peak_for_name(name)
    if found is None:
        return MFU(None, None, f"{name} is not in course_lib.parts.train.PEAK_BF16_FLOPS (add its dense bf16 "
                               f"peak from its datasheet)")
    key, peak = found
    return MFU(tokens_per_s * flops_per_token / peak, peak,
               f"of the {name}'s dense bf16 peak, {peak / 1e12:.0f} TFLOP/s (PEAK_BF16_FLOPS[{key!r}])")


# ----------------------------------------------------------------------------------------------
# The learning-rate schedule
# ----------------------------------------------------------------------------------------------


def lr_at(step: int, *, lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """The learning rate of optimiser step ``step`` (0-based): linear warm-up, then cosine decay.

        warm-up  (step < W):       lr · (step + 1) / W            reaches lr at step W − 1
        decay    (W ≤ step < S):   min_lr + ½ (lr − min_lr) (1 + cos(π · p)),  p = (step − W) / (S − 1 − W)
        after    (step ≥ S):       min_lr

    with W = ``warmup_steps`` and S = ``total_steps``: the first step after the warm-up uses the full lr
    (p = 0) and the last step, S − 1, uses exactly min_lr (p = 1).
    """
    if warmup_steps < 0 or total_steps < 1 or warmup_steps > total_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps and total_steps >= 1, got warmup_steps="
                         f"{warmup_steps}, total_steps={total_steps}.")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}.")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    decay_steps = total_steps - 1 - warmup_steps
    progress = 1.0 if decay_steps <= 0 else (step - warmup_steps) / decay_steps
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------


def _check_tokens(tokens: Any, context: int, name: str = "tokens") -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D torch.Tensor of token ids, but it is a {type(tokens).__name__}; "
                        f"use torch.tensor(ids, dtype=torch.long).")
    if tokens.dim() != 1 or tokens.is_floating_point() or tokens.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D integer tensor (the whole token stream), but it has shape "
                         f"{tuple(tokens.shape)} and dtype {tokens.dtype}.")
    if len(tokens) <= context:
        raise ValueError(f"{name} has {len(tokens)} tokens, too few for one window of {context} + 1; use more "
                         f"text or a smaller context.")
    return tokens


def get_batch(tokens: torch.Tensor, batch_size: int, context: int, generator: torch.Generator,
              device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows of the token stream: x = tokens[s : s+T], y = tokens[s+1 : s+T+1].

    The start positions s come from ``generator`` (a seeded CPU ``torch.Generator``), so the same seed
    gives the same batches. Returns two (batch_size, context) int64 tensors on ``device``.
    """
    _check_tokens(tokens, context)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)), "
                        f"but it is a {type(generator).__name__}.")
    starts = torch.randint(len(tokens) - context, (batch_size,), generator=generator, device="cpu")
    index = starts[:, None] + torch.arange(context)
    tokens = tokens.cpu()
    x, y = tokens[index].long(), tokens[index + 1].long()
    if device is not None and torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return (x.to(device), y.to(device)) if device is not None else (x, y)


# ----------------------------------------------------------------------------------------------
# The optimiser, evaluation
# ----------------------------------------------------------------------------------------------


def configure_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                        betas: tuple[float, float] = (0.9, 0.95), fused: bool | None = None
                        ) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices (2-D and up) only, not on biases or LayerNorm γ/β.

    ``fused=None`` uses the fused CUDA kernel when the parameters live on a GPU.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad is False everywhere).")
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if fused is None:
        fused = params[0].is_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def _check_forward_takes_targets(model: nn.Module) -> None:
    """``train`` calls ``model(x, y)``; say so in one sentence when ``forward`` cannot take ``y``."""
    try:
        inspect.signature(model.forward).bind(torch.empty(0), torch.empty(0))
    except TypeError:
        raise TypeError(f"train() calls model(x, y) with the targets y and needs (logits, loss) back, but "
                        f"{type(model).__name__}.forward{inspect.signature(model.forward)} does not take the "
                        f"targets: give the model a forward(x, y) that returns (logits, loss), like "
                        f"course_lib.parts.model.GPT.") from None
    except ValueError:  # no signature to inspect (some C extensions): the first call will tell
        pass


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss of ``model(x, y)``, which must return ``(logits, loss)`` with a scalar loss."""
    out = model(x, y)
    loss = out[1] if isinstance(out, (tuple, list)) and len(out) == 2 else None
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        what = (f"a {type(out).__name__} of {len(out)} items" if isinstance(out, (tuple, list))
                else f"a {type(out).__name__}")
        raise TypeError(f"train() needs model(x, y) to return (logits, loss) with a scalar loss tensor, but "
                        f"{type(_unwrap(model)).__name__} returned {what}: compute the loss inside forward, "
                        f"e.g. return logits, F.cross_entropy(logits.flatten(0, 1), y.flatten()).")
    return loss


def _autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    use = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use else contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, tokens: torch.Tensor, *, batch_size: int, context: int, batches: int,
             seed: int = 1234, device: torch.device | str | None = None, amp: str = "auto") -> float:
    """Mean loss over ``batches`` random windows drawn with a fixed seed (the same windows every call)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for _ in range(batches):
            x, y = get_batch(tokens, batch_size, context, generator, device)
            with _autocast(device, amp):
                loss = _loss(model, x, y)
            total += float(loss)
    finally:
        model.train(was_training)
    return total / batches


# ----------------------------------------------------------------------------------------------
# Configuration and history
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """What ``train`` does. ``context=None`` uses ``model.config.context``; ``min_lr=None`` is lr / 10;
    ``warmup_steps=None`` is 20 steps, or a tenth of the run when that is shorter (see ``warmup``)."""

    steps: int = 200
    batch_size: int = 16
    context: int | None = None
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float | None = None
    warmup_steps: int | None = None
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0
    log_every: int = 10
    eval_every: int = 100        # 0: evaluate only at the end
    eval_batches: int = 10
    checkpoint_every: int = 0    # 0: only at the end (and when interrupted), if checkpoint_dir is set
    checkpoint_dir: str | None = None
    seed: int = 0
    amp: str = "auto"            # "auto": bf16 autocast on CUDA, fp32 elsewhere; or "bf16", "none"
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, but it is {value!r}.")
        if self.warmup_steps is not None and (isinstance(self.warmup_steps, bool) or not isinstance(
                self.warmup_steps, int) or not 0 <= self.warmup_steps <= self.steps):
            raise ValueError(f"TrainConfig.warmup_steps must be an int in 0..steps={self.steps}, got "
                             f"{self.warmup_steps!r}.")
        if self.amp not in ("auto", "bf16", "none"):
            raise ValueError(f"TrainConfig.amp must be 'auto', 'bf16' or 'none', got {self.amp!r}.")
        self.betas = tuple(self.betas)

    @property
    def warmup(self) -> int:
        """The warm-up length used: ``warmup_steps``, or by default min(20, steps // 10)."""
        return min(20, self.steps // 10) if self.warmup_steps is None else self.warmup_steps

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr


@dataclass
class History:
    """What happened during training. Train losses are logged every ``log_every`` steps (the mean over
    those steps); ``eval_*`` lists are filled at every evaluation (fixed windows of both splits)."""

    step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    mfu: list[float | None] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    eval_train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    tokens_seen: int = 0
    seconds: float = 0.0
    interrupted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def summary(self) -> str:
        parts = [f"{self.step[-1] if self.step else 0} steps", f"{self.tokens_seen:,} tokens",
                 f"{self.seconds:.1f} s"]
        if self.tokens_per_s:
            parts.append(f"{sum(self.tokens_per_s) / len(self.tokens_per_s):,.0f} tokens/s")
        if self.mfu and self.mfu[-1] is not None:
            parts.append(f"MFU {100 * self.mfu[-1]:.1f}%")
        if self.val_loss:
            parts.append(f"val loss {self.val_loss[-1]:.3f} (perplexity {math.exp(self.val_loss[-1]):.1f})")
        return ", ".join(parts)


# ----------------------------------------------------------------------------------------------
# Checkpoints: safetensors, no pickles
# ----------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    step: int, *, generator: torch.Generator | None = None,
                    metadata: dict[str, Any] | None = None) -> Path:
    """Write model weights, optimiser state, ``step`` and RNG states to one safetensors file.

    Tensors: ``model.<name>``, ``optim.<i>.<key>`` (the optimiser state of parameter i), ``rng.*``.
    Everything else (step, the optimiser's hyper-parameters, ``metadata``) is JSON in the header.
    Written to a temporary file first and renamed, so an interruption never leaves half a checkpoint.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone()
               for k, v in _unwrap(model).state_dict().items()}
    header: dict[str, str] = {"format": _FORMAT, "step": str(step),
                              "metadata": json.dumps(metadata or {})}
    if optimizer is not None:
        state = optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for index, entries in state["state"].items():
            for key, value in entries.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous().clone()
                else:
                    scalars.setdefault(str(index), {})[key] = value
        header["optim_param_groups"] = json.dumps(state["param_groups"])
        header["optim_scalars"] = json.dumps(scalars)
    tensors["rng.torch_cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.torch_cuda"] = torch.cuda.get_rng_state()
    if generator is not None:
        tensors["rng.batches"] = generator.get_state()
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=header)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    *, generator: torch.Generator | None = None, restore_rng: bool = True) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` (and ``optimizer``,
    ``generator``); returns ``{"step": int, "metadata": dict}``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train with TrainConfig(checkpoint_dir=...) first.")
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        if header.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a course_lib.parts.train checkpoint (format {header.get('format')!r}).")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model_state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    _unwrap(model).load_state_dict(model_state)
    if optimizer is not None:
        if "optim_param_groups" not in header:
            raise ValueError(f"{path} holds no optimiser state; pass optimizer=None to load the weights only.")
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        for index, entries in json.loads(header["optim_scalars"]).items():
            state.setdefault(int(index), {}).update(entries)
        groups = json.loads(header["optim_param_groups"])
        for group in groups:
            if "betas" in group:
                group["betas"] = tuple(group["betas"])
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    if restore_rng:
        torch.set_rng_state(tensors["rng.torch_cpu"])
        if "rng.torch_cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.torch_cuda"])
    if generator is not None and "rng.batches" in tensors:
        generator.set_state(tensors["rng.batches"])
    return {"step": int(header["step"]), "metadata": json.loads(header.get("metadata", "{}"))}


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def train(model: nn.Module, train_tokens: torch.Tensor, val_tokens: torch.Tensor | None = None,
          config: TrainConfig | None = None, *, device: torch.device | str | None = None,
          resume: bool | str | os.PathLike = False, until_step: int | None = None,
          flops_per_token: float | None = None, **overrides: Any) -> History:
    """Train ``model`` on random windows of ``train_tokens``; returns a :class:`History`.

    ``config`` fields may also be given as keywords (``train(model, tokens, steps=100, lr=3e-4)``).
    ``resume=True`` continues from ``checkpoint_dir/checkpoint.safetensors`` if it exists (a path
    names another file). ``until_step`` stops after that many steps as if interrupted; the schedule
    still runs to ``config.steps``. Ctrl-C (KeyboardInterrupt) also stops cleanly: a checkpoint is
    written (when ``checkpoint_dir`` is set) and the history so far is returned.
    ``flops_per_token`` (training FLOPs) enables the MFU column (``mfu()``: None on a CPU and for
    amp="none"); for a ``GPT`` it is computed with ``course_lib.parts.model.flops_per_token``. The model is
    trained in place on ``device`` (default: where its parameters are).
    """
    from tqdm.auto import tqdm

    unknown = sorted(set(overrides) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise TypeError(f"train() got unknown settings {unknown}; the TrainConfig fields are "
                        f"{[f.name for f in fields(TrainConfig)]}.")
    config = replace(config or TrainConfig(), **overrides)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module whose forward(x, y) returns (logits, loss), not a "
                        f"{type(model).__name__}.")
    _check_forward_takes_targets(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    inner = _unwrap(model)
    model_config = getattr(inner, "config", None)
    context = config.context or getattr(model_config, "context", None)
    if context is None:
        raise ValueError("TrainConfig.context is not set and the model has no config.context; pass context=T.")
    _check_tokens(train_tokens, context, "train_tokens")
    if val_tokens is not None:
        _check_tokens(val_tokens, context, "val_tokens")
    if flops_per_token is None and model_config is not None:
        from course_lib.parts.model import GPTConfig, flops_per_token as gpt_flops

        if isinstance(model_config, GPTConfig):
            flops_per_token = gpt_flops(model_config, training=True, seq_len=context)

    optimizer = configure_optimizer(model, config.lr, config.weight_decay, config.betas)
    generator = torch.Generator().manual_seed(config.seed)
    history, start = History(), 0
    checkpoint = Path(config.checkpoint_dir) / CHECKPOINT_NAME if config.checkpoint_dir else None
    if resume:
        source = checkpoint if resume is True else Path(resume)
        if source is None:
            raise ValueError("resume=True needs TrainConfig.checkpoint_dir (or pass resume=path).")
        if source.is_file():
            loaded = load_checkpoint(source, model, optimizer, generator=generator)
            start = loaded["step"]
            history = History.from_dict(loaded["metadata"].get("history", {}))
            history.interrupted = False

    def save(step: int) -> None:
        if checkpoint is not None and _is_main_process():
            save_checkpoint(checkpoint, model, optimizer, step, generator=generator,
                            metadata={"history": history.to_dict(), "config": asdict(config)})

    def run_eval(step: int) -> None:
        kwargs = dict(batch_size=config.batch_size, context=context, batches=config.eval_batches,
                      device=device, amp=config.amp)
        history.eval_step.append(step)
        history.eval_train_loss.append(evaluate(model, train_tokens, **kwargs))
        if val_tokens is not None:
            history.val_loss.append(evaluate(model, val_tokens, **kwargs))

    def log(step: int, lr: float) -> None:
        nonlocal window_steps, window_start
        mean_loss = float(window_loss) / window_steps               # float() waits for the GPU
        elapsed = time.perf_counter() - window_start
        history.seconds += elapsed
        speed = window_steps * tokens_per_step / elapsed
        history.step.append(step)
        history.train_loss.append(mean_loss)
        history.lr.append(lr)
        history.tokens_per_s.append(speed)
        utilisation = mfu(speed, flops_per_token, device, amp=config.amp).value if flops_per_token else None
        history.mfu.append(utilisation)
        postfix = {"loss": f"{mean_loss:.3f}", "tok/s": f"{speed:,.0f}"}
        if utilisation is not None:
            postfix["MFU"] = f"{100 * utilisation:.1f}%"
        bar.set_postfix(postfix, refresh=False)
        window_loss.zero_()
        window_steps = 0
        window_start = time.perf_counter()

    params = [p for p in model.parameters() if p.requires_grad]
    tokens_per_step = config.batch_size * config.grad_accum * context
    stop = config.steps if until_step is None else min(until_step, config.steps)
    # a run stopped on purpose (until_step) shows a bar that ends where it was asked to stop, not a
    # bar frozen halfway that reads as a crash where the saved notebook is viewed without a kernel
    bar = tqdm(total=stop, initial=start, disable=not config.progress, dynamic_ncols=True,
               desc="training" if stop == config.steps else f"training to step {stop} of {config.steps}")
    model.train()
    window_loss, window_steps = torch.zeros((), device=device), 0
    window_start = time.perf_counter()
    step = start
    step_rng = (generator.get_state(), torch.get_rng_state())
    try:
        while step < stop:
            # remember the RNG states, so that a Ctrl-C in the middle of a step can undo its draws
            step_rng = (generator.get_state(), torch.get_rng_state())
            lr = lr_at(step, lr=config.lr, warmup_steps=config.warmup, total_steps=config.steps,
                       min_lr=config.final_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros((), device=device)
            for micro in range(config.grad_accum):
                x, y = get_batch(train_tokens, config.batch_size, context, generator, device)
                last = micro == config.grad_accum - 1
                # DDP: all-reduce the gradients only once, after the last micro-batch
                sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
                with sync:
                    with _autocast(device, config.amp):
                        loss = _loss(model, x, y)
                    (loss / config.grad_accum).backward()
                step_loss += loss.detach().float() / config.grad_accum
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            window_loss += step_loss
            step += 1
            window_steps += 1
            history.tokens_seen += tokens_per_step
            bar.update(1)

            if step % config.log_every == 0 or step == stop:
                log(step, lr)
            if (config.eval_every and step % config.eval_every == 0) or step == config.steps:
                eval_start = time.perf_counter()
                run_eval(step)
                window_start += time.perf_counter() - eval_start    # evaluation is not training time
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < stop:
                save(step)
    except KeyboardInterrupt:
        history.interrupted = True
        optimizer.zero_grad(set_to_none=True)          # drop the half-accumulated step
        generator.set_state(step_rng[0])
        torch.set_rng_state(step_rng[1])
        if window_steps:                                # log the steps finished since the last log
            log(step, lr_at(step - 1, lr=config.lr, warmup_steps=config.warmup,
                            total_steps=config.steps, min_lr=config.final_lr))
    finally:
        bar.close()
    if step < config.steps:
        history.interrupted = True
    save(step)
    if history.interrupted and until_step is None:
        print(f"interrupted after step {step}" + (f"; checkpoint written to {checkpoint}, continue with "
                                                   f"train(..., resume=True)" if checkpoint else "."))
    return history
