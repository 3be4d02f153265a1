"""Training a language model: batches of random windows, the held-out loss, and the loop's LM settings.

Explained in notebooks/04_training_a_language_model.ipynb; reused by 03 (positions), 05 (scaling laws) and
10. It trains any ``nn.Module`` whose ``forward(x, y)`` returns ``(logits, loss)``, such as
``course_lib.parts.model.GPT``, through the course's one loop (``course_lib.parts.loop``):

    history = train_lm(model, train_tokens, val_tokens, TrainConfig(steps=600, batch_size=32, lr=1e-3))

What is particular to a language model is only where its batches come from (x = tokens[s : s+T],
y = tokens[s+1 : s+T+1] at random starts s), its loss (``model(x, y)[1]``) and how it is evaluated (the mean
loss of fixed random windows, or every token of a held-out text once: :func:`heldout_loss`).
"""

from __future__ import annotations

import inspect
import itertools
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from course_lib.parts.loop import History, LoopConfig, cosine_schedule, train

__all__ = ["TrainConfig", "train_lm", "get_batch", "evaluate", "lm_loss", "lr_at", "heldout_loss",
           "char_vocabulary", "History"]


def lr_at(step: int, *, lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """The learning rate of optimiser step ``step`` (0-based): linear warm-up, then cosine decay to
    ``min_lr`` (:func:`course_lib.parts.loop.cosine_schedule`, the schedule students write in 04)."""
    return cosine_schedule(lr, warmup_steps, total_steps, min_lr)(step)


# ----------------------------------------------------------------------------------------------
# Batches and evaluation
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


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The loss of ``model(x, y)``, which must return ``(logits, loss)`` with a scalar loss."""
    x, y = batch
    out = model(x, y)
    loss = out[1] if isinstance(out, (tuple, list)) and len(out) == 2 else None
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        what = (f"a {type(out).__name__} of {len(out)} items" if isinstance(out, (tuple, list))
                else f"a {type(out).__name__}")
        raise TypeError(f"train_lm() needs model(x, y) to return (logits, loss) with a scalar loss tensor, but "
                        f"{type(_unwrap(model)).__name__} returned {what}: compute the loss inside forward, "
                        f"e.g. return logits, F.cross_entropy(logits.flatten(0, 1), y.flatten()).")
    return loss


@torch.no_grad()
def evaluate(model: nn.Module, tokens: torch.Tensor, *, batch_size: int, context: int, batches: int,
             seed: int = 1234, device: torch.device | str | None = None, amp: str = "auto") -> float:
    """Mean loss over ``batches`` random windows drawn with a fixed seed (the same windows every call)."""
    from course_lib.parts.loop import _autocast

    device = torch.device(device) if device is not None else next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for _ in range(batches):
            batch = get_batch(tokens, batch_size, context, generator, device)
            with _autocast(device, amp):
                loss = lm_loss(model, batch)
            total += float(loss)
    finally:
        model.train(was_training)
    return total / batches


@torch.no_grad()
def heldout_loss(model: nn.Module, tokens: torch.Tensor, context: int, batch_size: int = 64) -> float:
    """The mean cross-entropy (nats per token) of predicting every token of ``tokens`` but the first.

    The stream is cut into consecutive windows of ``context`` tokens; every target is predicted exactly
    once, from the tokens before it in its window. Deterministic: no sampling of windows.
    """
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a 1-D torch.Tensor of token ids, got a {type(tokens).__name__}: pass "
                        f"torch.tensor(tokens).")
    if tokens.dim() != 1 or len(tokens) < 2:
        raise ValueError(f"tokens must be a 1-D stream of at least 2 ids, but it has shape {tuple(tokens.shape)}.")
    for name, value in (("context", context), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer (tokens per window / windows per batch), got "
                             f"{value!r}.")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    n = (len(tokens) - 1) // context
    x = tokens[: n * context].view(n, context)
    y = tokens[1: n * context + 1].view(n, context)
    total, count = 0.0, 0
    try:
        for i in range(0, n, batch_size):
            logits, _ = model(x[i:i + batch_size].to(device))
            total += float(torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), y[i:i + batch_size].flatten().to(device), reduction="sum"))
            count += y[i:i + batch_size].numel()
        rest = len(tokens) - 1 - n * context                               # the last, shorter window
        if rest:
            logits, _ = model(tokens[n * context: n * context + rest][None].to(device))
            total += float(torch.nn.functional.cross_entropy(
                logits.float()[0], tokens[n * context + 1:].to(device), reduction="sum"))
            count += rest
    finally:
        model.train(was_training)
    return total / count


def char_vocabulary(text: str) -> list[str]:
    """The sorted characters of ``text``: character i gets id i."""
    return sorted(set(text))


# ----------------------------------------------------------------------------------------------
# The loop's settings for a language model, and the call
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainConfig(LoopConfig):
    """The loop's settings (:class:`~course_lib.parts.loop.LoopConfig`) and a language model's batches:
    ``batch_size`` windows of ``context`` tokens (``None``: ``model.config.context``) drawn with ``seed``;
    ``eval_batches`` fixed windows of each split at every evaluation."""

    eval_every: int = 100
    batch_size: int = 16
    context: int | None = None
    seed: int = 0
    eval_batches: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("batch_size", "eval_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, but it is {value!r}.")


def _check_forward_takes_targets(model: nn.Module) -> None:
    """``train_lm`` calls ``model(x, y)``; say so in one sentence when ``forward`` cannot take ``y``."""
    try:
        inspect.signature(model.forward).bind(torch.empty(0), torch.empty(0))
    except TypeError:
        raise TypeError(f"train_lm() calls model(x, y) with the targets y and needs (logits, loss) back, but "
                        f"{type(model).__name__}.forward{inspect.signature(model.forward)} does not take the "
                        f"targets: give the model a forward(x, y) that returns (logits, loss), like "
                        f"course_lib.parts.model.GPT.") from None
    except ValueError:  # no signature to inspect (some C extensions): the first call will tell
        pass


def _context_and_flops(model: nn.Module, config: TrainConfig, flops_per_token: float | None
                       ) -> tuple[int, float | None]:
    from course_lib.parts.model import GPTConfig, flops_per_token as gpt_flops

    model_config = getattr(_unwrap(model), "config", None)
    context = config.context or getattr(model_config, "context", None)
    if context is None:
        raise ValueError("TrainConfig.context is not set and the model has no config.context; pass context=T.")
    if flops_per_token is None and isinstance(model_config, GPTConfig):
        flops_per_token = gpt_flops(model_config, training=True, seq_len=context)
    return context, flops_per_token


def train_lm(model: nn.Module, train_tokens: torch.Tensor, val_tokens: torch.Tensor | None = None,
             config: TrainConfig | None = None, *, device: torch.device | str | None = None,
             resume: bool | str = False, until_step: int | None = None,
             flops_per_token: float | None = None, **overrides: Any) -> History:
    """Train ``model`` on random windows of ``train_tokens`` with the course's loop; returns its History.

    ``config`` fields may also be given as keywords (``train_lm(model, tokens, steps=100, lr=3e-4)``).
    Evaluations (every ``eval_every`` steps and at the end) record the loss of fixed windows of the
    training text (``train_loss``) and of ``val_tokens`` (``val_loss``). ``resume``, ``until_step``: as
    in :func:`course_lib.parts.loop.train`. ``flops_per_token`` (training FLOPs) enables the MFU column;
    for a ``GPT`` it is computed with ``course_lib.parts.model.flops_per_token``. The model is trained in
    place on ``device`` (default: where its parameters are).
    """
    unknown = sorted(set(overrides) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise TypeError(f"train_lm() got unknown settings {unknown}; the TrainConfig fields are "
                        f"{[f.name for f in fields(TrainConfig)]}.")
    config = replace(config or TrainConfig(), **overrides)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module whose forward(x, y) returns (logits, loss), not a "
                        f"{type(model).__name__}.")
    _check_forward_takes_targets(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    context, flops_per_token = _context_and_flops(model, config, flops_per_token)
    _check_tokens(train_tokens, context, "train_tokens")
    if val_tokens is not None:
        _check_tokens(val_tokens, context, "val_tokens")
    generator = torch.Generator().manual_seed(config.seed)
    batches = (get_batch(train_tokens, config.batch_size, context, generator, device) for _ in itertools.count())

    def windows_loss(m: nn.Module) -> dict[str, float]:
        kwargs = dict(batch_size=config.batch_size, context=context, batches=config.eval_batches, device=device,
                      amp=config.amp)
        out = {"train_loss": evaluate(m, train_tokens, **kwargs)}
        if val_tokens is not None:
            out["val_loss"] = evaluate(m, val_tokens, **kwargs)
        return out

    return train(model, batches, lm_loss, config, evaluate=windows_loss, generator=generator,
                 tokens_in=lambda batch: batch[0].numel(), flops_per_token=flops_per_token, device=device,
                 resume=resume, until_step=until_step)
