"""The training loop of the course: one loop for every lesson that trains.

Explained in notebooks/04_training_a_language_model.ipynb, where students write their own version of it;
the language model (04, 05, 03's positions), classifier fine-tuning (06, 07), every PEFT method (08), the
causal chat model (09) and data parallelism (10) all train through it. A caller brings only what differs:
its batches and its loss.

    history = train(model, batches, loss_fn, LoopConfig(steps=200, lr=1e-3))

``batches`` is an iterator of micro-batches (anything ``loss_fn`` understands) and ``loss_fn(model, batch)``
returns a scalar loss tensor. One optimiser step:

  1. set the learning rate of this step from the schedule (``LoopConfig.schedule``);
  2. for each of ``grad_accum`` micro-batches: loss = loss_fn(model, batch) (bf16 autocast on a GPU),
     backward(loss / grad_accum) -- the gradients add up to those of the mean over the whole batch;
  3. clip the global gradient norm to ``grad_clip``;
  4. AdamW step (weight decay on matrices only, never on biases or LayerNorm gains), then ``on_step``
     (AdaLoRA reads the gradients there), then zero the gradients.

Every ``eval_every`` steps and at the end, ``evaluate(model)`` runs in eval mode under ``torch.no_grad()``
and its numbers go into the history; ``keep_best`` stops early after ``patience`` evaluations without
improvement and restores the best weights. Checkpoints are ``safetensors`` files (weights, optimiser state,
step, random-number-generator states, history; no pickles), so ``resume=True`` continues an interrupted
run exactly where it stopped. The progress bar shows the loss, tokens/s and, on a GPU, MFU.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from course_lib.parts.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from course_lib.tools.timing import Stopwatch, mfu

__all__ = ["LoopConfig", "History", "train", "cosine_schedule", "linear_schedule", "make_optimizer",
           "optimizer_state_bytes"]


# ----------------------------------------------------------------------------------------------
# Schedules: the learning rate of step s (0-based)
# ----------------------------------------------------------------------------------------------


def cosine_schedule(lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to ``min_lr`` (GPT training; lesson 04):

        warm-up  (s < W):       lr · (s + 1) / W            reaches lr at step W − 1
        decay    (W ≤ s < S):   min_lr + ½ (lr − min_lr) (1 + cos(π · p)),  p = (s − W) / (S − 1 − W)
        after    (s ≥ S):       min_lr

    The first step after the warm-up uses the full lr (p = 0), the last step, S − 1, exactly min_lr.
    """
    if warmup_steps < 0 or total_steps < 1 or warmup_steps > total_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps and total_steps >= 1, got warmup_steps="
                         f"{warmup_steps}, total_steps={total_steps}.")

    def lr_of(step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}.")
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        if step >= total_steps:
            return min_lr
        decay_steps = total_steps - 1 - warmup_steps
        progress = 1.0 if decay_steps <= 0 else (step - warmup_steps) / decay_steps
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))

    return lr_of


def linear_schedule(lr: float, warmup_steps: int, total_steps: int, *, offset: int = 1) -> Callable[[int], float]:
    """Linear warm-up, then linear decay to 0 (BERT's fine-tuning schedule, Devlin et al. 2019, App. A.2-A.3;
    lessons 06-09): step s gets lr · f(s + offset), with f(t) = t / W while t < W, then (T − t) / (T − W),
    where T = total_steps + offset.

    ``offset=1`` (the default) gives the first step a small non-zero rate and the last step a small one
    too. ``offset=0`` is how a ``LambdaLR`` with this f is usually written: the first step then gets
    lr · 0 and does nothing (06's early-stopping fine-tuning keeps it, so its recorded runs repeat).
    """
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}.")
    end = total_steps + offset

    def lr_of(step: int) -> float:
        t = step + offset
        if t < warmup_steps:
            return lr * (t / max(1, warmup_steps))
        return lr * max(0.0, (end - t) / max(1, end - warmup_steps))

    return lr_of


# ----------------------------------------------------------------------------------------------
# The optimiser
# ----------------------------------------------------------------------------------------------


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                   betas: tuple[float, float] = (0.9, 0.95), fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices (2-D and up) only, not on biases or LayerNorm γ/β.

    ``fused=None`` uses the fused CUDA kernel when the parameters live on a GPU.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad is False everywhere): unfreeze "
                         "something before training.")
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if fused is None:
        fused = params[0].is_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in the optimiser's state (for Adam: exp_avg and exp_avg_sq, two numbers per parameter,
    and a step counter per parameter). The state appears after the first ``step()``; call this after one."""
    return sum(v.numel() * v.element_size() for state in optimizer.state.values()
               for v in state.values() if isinstance(v, torch.Tensor))


# ----------------------------------------------------------------------------------------------
# Configuration and history
# ----------------------------------------------------------------------------------------------


@dataclass
class LoopConfig:
    """What ``train`` does besides the batches and the loss.

    ``schedule`` is "cosine" (warm-up, then cosine to ``min_lr``; lesson 04), "linear" (warm-up, then
    linear to 0; lessons 06-09), "constant", or a function step -> learning rate. ``warmup_steps=None``
    is 20 steps, or a tenth of the run when that is shorter; ``min_lr=None`` is lr / 10.
    ``keep_best`` names an ``evaluate`` result to maximise: training stops after ``patience``
    evaluations without a better value, and the best weights are restored.
    """

    steps: int = 200
    lr: float = 1e-3
    schedule: str | Callable[[int], float] = "cosine"
    warmup_steps: int | None = None
    min_lr: float | None = None
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    log_every: int = 10
    eval_every: int = 0            # 0: evaluate only at the end (when an evaluate function is given)
    keep_best: str | None = None
    patience: int = 3
    checkpoint_every: int = 0      # 0: only at the end (and when interrupted), if checkpoint_dir is set
    checkpoint_dir: str | None = None
    amp: str = "auto"              # "auto": bf16 autocast on CUDA, fp32 elsewhere; or "bf16", "none"
    fused: bool | None = None      # AdamW's fused kernel; None: on when the parameters are on a GPU
    time_steps: bool = False       # measure every step's seconds (synchronised: slower on a GPU)
    progress: bool = True
    desc: str = "training"
    leave: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "grad_accum", "log_every", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be a positive int, but it is {value!r}.")
        if self.warmup_steps is not None and (isinstance(self.warmup_steps, bool) or not isinstance(
                self.warmup_steps, int) or not 0 <= self.warmup_steps <= self.steps):
            raise ValueError(f"{type(self).__name__}.warmup_steps must be an int in 0..steps={self.steps}, got "
                             f"{self.warmup_steps!r}.")
        if self.amp not in ("auto", "bf16", "none"):
            raise ValueError(f"{type(self).__name__}.amp must be 'auto', 'bf16' or 'none', got {self.amp!r}.")
        if not callable(self.schedule) and self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"{type(self).__name__}.schedule must be 'cosine', 'linear', 'constant' or a function "
                             f"step -> learning rate, got {self.schedule!r}.")
        if not isinstance(self.progress, bool):
            raise ValueError(f"{type(self).__name__}.progress must be True (the loop draws its own progress bar) or "
                             f"False, got {type(self.progress).__name__}; pass progress=True, not a bar's update method.")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"{type(self).__name__}.lr must be a positive number, got {self.lr!r}.")
        self.betas = tuple(self.betas)

    @property
    def warmup(self) -> int:
        """The warm-up length used: ``warmup_steps``, or by default min(20, steps // 10)."""
        return min(20, self.steps // 10) if self.warmup_steps is None else self.warmup_steps

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def lr_schedule(self) -> Callable[[int], float]:
        """The function step -> learning rate this configuration describes."""
        if callable(self.schedule):
            return self.schedule
        if self.schedule == "cosine":
            return cosine_schedule(self.lr, self.warmup, self.steps, self.final_lr)
        if self.schedule == "linear":
            return linear_schedule(self.lr, self.warmup, self.steps)
        return lambda step: self.lr

    def to_json(self) -> dict[str, Any]:
        return {k: (repr(v) if callable(v) else v) for k, v in asdict(self).items()}


@dataclass
class History:
    """What happened during training.

    Logged every ``log_every`` steps (means over those steps): ``step``, ``train_loss``, ``lr``,
    ``tokens_per_s``, ``mfu``. Every step: ``losses`` (and ``step_seconds`` with ``time_steps``). Every
    evaluation: a row of ``evals`` (``{"step": …, **what evaluate returned}``). ``seconds`` is training
    time without evaluation; ``eval_seconds`` the evaluations'."""

    step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    mfu: list[float | None] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    tokens_seen: int = 0
    seconds: float = 0.0
    eval_seconds: float = 0.0
    best_step: int | None = None
    stopped_early: bool = False
    interrupted: bool = False
    optimizer_bytes: int = 0

    def column(self, name: str) -> list[float]:
        """One number of every evaluation, e.g. ``history.column("val_loss")``."""
        return [row[name] for row in self.evals if name in row]

    @property
    def eval_step(self) -> list[int]:
        return [row["step"] for row in self.evals]

    @property
    def val_loss(self) -> list[float]:
        return self.column("val_loss")

    @property
    def eval_train_loss(self) -> list[float]:
        return self.column("train_loss")

    @property
    def steps_done(self) -> int:
        return len(self.losses)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def summary(self) -> str:
        parts = [f"{self.steps_done} steps", f"{self.tokens_seen:,} tokens", f"{self.seconds:.1f} s"]
        if self.tokens_per_s:
            parts.append(f"{sum(self.tokens_per_s) / len(self.tokens_per_s):,.0f} tokens/s")
        if self.mfu and self.mfu[-1] is not None:
            parts.append(f"MFU {100 * self.mfu[-1]:.1f}%")
        if self.val_loss:
            parts.append(f"val loss {self.val_loss[-1]:.3f} (perplexity {math.exp(self.val_loss[-1]):.1f})")
        return ", ".join(parts)


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def _autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    use = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use else contextlib.nullcontext()


def _scalar_loss(loss: Any, loss_fn: Callable) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(f"the loss function {getattr(loss_fn, '__name__', loss_fn)!r} must return a scalar loss "
                        f"tensor, but it returned {type(loss).__name__}"
                        + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "") + ".")
    return loss


class _Run:
    """The state of one call of :func:`train`: the pieces its steps, logs, evaluations and saves share."""

    def __init__(self, model: nn.Module, config: LoopConfig, optimizer: torch.optim.Optimizer,
                 device: torch.device, generator: torch.Generator | None, tokens_in: Callable | None,
                 flops_per_token: float | None) -> None:
        self.model, self.config, self.optimizer, self.device = model, config, optimizer, device
        self.generator, self.tokens_in, self.flops_per_token = generator, tokens_in, flops_per_token
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.schedule = config.lr_schedule()
        self.history = History()
        self.checkpoint = Path(config.checkpoint_dir) / CHECKPOINT_NAME if config.checkpoint_dir else None
        self.window: list[torch.Tensor] = []            # the losses since the last log, still on the device
        self.window_sum = torch.zeros((), device=device)  # their float32 running sum: the logged mean
        self.window_tokens = 0
        self.window_eval_seconds = 0.0                  # evaluation is not training time
        self.watch = Stopwatch(device)
        self.last_lr = 0.0
        self.best_value: float | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.since_best = 0
        self.step_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    def step(self, step: int, micro_batches: list[Any], loss_fn: Callable, on_step: Callable | None) -> None:
        """One optimiser step over ``micro_batches``; the loss stays on the device (no waiting for it)."""
        lr = self.schedule(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        n = len(micro_batches)
        step_loss = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            # DDP: all-reduce the gradients only once, after the last micro-batch
            last = i == n - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                with _autocast(self.device, self.config.amp):
                    loss = _scalar_loss(loss_fn(self.model, batch), loss_fn)
                (loss / n).backward()
            step_loss += loss.detach().float() / n
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.optimizer.step()
        if on_step is not None:
            on_step(step)
        self.optimizer.zero_grad(set_to_none=True)
        self.window.append(step_loss)
        self.window_sum += step_loss
        if self.tokens_in is not None:
            tokens = sum(int(self.tokens_in(b)) for b in micro_batches)
            self.window_tokens += tokens
            self.history.tokens_seen += tokens
        self.last_lr = lr

    def log(self, step: int, bar: Any) -> None:
        """Move the window's losses to the host (one wait per log, not per step) and write one log row."""
        if not self.window:
            return
        losses = torch.stack(self.window).tolist()
        seconds = self.watch.lap() - self.window_eval_seconds
        self.history.seconds += seconds
        self.history.losses += losses
        h = self.history
        h.step.append(step)
        h.train_loss.append(float(self.window_sum) / len(losses))
        h.lr.append(self.last_lr)
        speed = self.window_tokens / seconds if self.tokens_in is not None and seconds > 0 else None
        utilisation = None
        if speed is not None:
            h.tokens_per_s.append(speed)
            if self.flops_per_token:
                utilisation = mfu(speed, self.flops_per_token, self.device, amp=self.config.amp).value
            h.mfu.append(utilisation)
        postfix = {"loss": f"{h.train_loss[-1]:.3f}"}
        if speed is not None:
            postfix["tok/s"] = f"{speed:,.0f}"
        if utilisation is not None:
            postfix["MFU"] = f"{100 * utilisation:.1f}%"
        bar.set_postfix(postfix, refresh=False)
        self.window, self.window_tokens, self.window_eval_seconds = [], 0, 0.0
        self.window_sum.zero_()
        self.watch.start()

    def evaluate(self, step: int, evaluate: Callable[[nn.Module], dict[str, float]]) -> bool:
        """Run ``evaluate`` in eval mode without gradients; True when training should stop early."""
        with Stopwatch(self.device) as eval_watch:
            self.model.eval()
            try:
                with torch.no_grad():
                    row = {"step": step, **{k: float(v) for k, v in evaluate(self.model).items()}}
            finally:
                self.model.train()
        self.history.eval_seconds += eval_watch.seconds
        self.window_eval_seconds += eval_watch.seconds
        self.history.evals.append(row)
        return self._track_best(step, row)

    def _track_best(self, step: int, row: dict[str, float]) -> bool:
        name = self.config.keep_best
        if name is None:
            return False
        if name not in row:
            raise KeyError(f"keep_best={name!r}, but evaluate returned only {sorted(row)}.")
        if self.best_value is None or not self.best_value >= row[name]:   # also true for the first evaluation
            self.best_value, self.history.best_step, self.since_best = row[name], step, 0
            self.best_weights = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
            return False
        self.since_best += 1
        return self.since_best >= self.config.patience

    def restore_best(self) -> None:
        if self.best_weights is not None:
            with torch.no_grad():
                for name, p in self.model.named_parameters():
                    if name in self.best_weights:
                        p.copy_(self.best_weights[name])

    def save(self, step: int) -> None:
        if self.checkpoint is not None and _is_main_process():
            save_checkpoint(self.checkpoint, self.model, self.optimizer, step, generator=self.generator,
                            metadata={"history": self.history.to_dict(), "config": self.config.to_json()})

    def resume(self, resume: bool | str | os.PathLike) -> int:
        source = self.checkpoint if resume is True else Path(resume)
        if source is None:
            raise ValueError("resume=True needs checkpoint_dir in the configuration (or pass resume=path).")
        if not source.is_file():
            return 0
        loaded = load_checkpoint(source, self.model, self.optimizer, generator=self.generator)
        self.history = History.from_dict(loaded["metadata"].get("history", {}))
        self.history.interrupted = False
        return loaded["step"]


def train(model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor],
          config: LoopConfig | None = None, *, evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
          optimizer: torch.optim.Optimizer | None = None, on_step: Callable[[int], None] | None = None,
          generator: torch.Generator | None = None, tokens_in: Callable[[Any], int] | None = None,
          flops_per_token: float | None = None, device: torch.device | str | None = None,
          resume: bool | str | os.PathLike = False, until_step: int | None = None,
          step_context: Callable[[], contextlib.AbstractContextManager] | None = None) -> History:
    """Train ``model`` for ``config.steps`` optimiser steps; returns a :class:`History`.

    ``batches`` yields micro-batches (``grad_accum`` per step) and ``loss_fn(model, batch)`` turns one into
    a scalar loss. ``optimizer`` defaults to :func:`make_optimizer` with the configuration's weight decay
    and betas. ``generator`` is the random-number generator the batches draw from: checkpoints save it
    and ``resume`` restores it, so a resumed run sees the batches an uninterrupted one would.
    ``tokens_in(batch)`` counts a micro-batch's tokens (for tokens/s; with ``flops_per_token`` also MFU).
    ``step_context()`` makes a context manager entered around every optimiser step (lesson 11 counts each
    step's collectives in a ``CommDebugMode``).
    ``until_step`` stops after that many steps as if interrupted (the schedule still runs to ``steps``);
    Ctrl-C (KeyboardInterrupt) also stops cleanly: a checkpoint is written when ``checkpoint_dir`` is set,
    and the history so far is returned.
    """
    from tqdm.auto import tqdm

    config = config or LoopConfig()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, not a {type(model).__name__}.")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    optimizer = optimizer or make_optimizer(model, config.lr, config.weight_decay, config.betas, config.fused)
    run = _Run(model, config, optimizer, device, generator, tokens_in, flops_per_token)
    start = run.resume(resume) if resume else 0
    stop = config.steps if until_step is None else min(until_step, config.steps)
    # a run stopped on purpose (until_step) shows a bar that ends where it was asked to stop, not a
    # bar frozen halfway that reads as a crash where the saved notebook is viewed without a kernel
    bar = tqdm(total=stop, initial=start, disable=not config.progress, dynamic_ncols=True, leave=config.leave,
               desc=config.desc if stop == config.steps else f"{config.desc} to step {stop} of {config.steps}")
    run.step_context = step_context or contextlib.nullcontext
    step = _loop(run, iter(batches), loss_fn, evaluate, on_step, start, stop, bar)
    history = run.history
    if step < config.steps and not history.stopped_early:
        history.interrupted = True
    run.save(step)
    run.restore_best()
    history.optimizer_bytes = optimizer_state_bytes(optimizer)
    model.eval()   # a trained model is ready to use; the next call of train() switches it back
    if history.interrupted and until_step is None:
        print(f"interrupted after step {step}" + (f"; checkpoint written to {run.checkpoint}, continue with "
                                                   f"resume=True" if run.checkpoint else "."))
    return history


def _loop(run: _Run, batches: Iterator[Any], loss_fn: Callable, evaluate: Callable | None,
          on_step: Callable | None, start: int, stop: int, bar: Any) -> int:
    """The steps of :func:`train` from ``start`` to ``stop``; returns the step reached."""
    config, model = run.config, run.model
    model.train()
    step = start
    step_rng = (run.generator.get_state() if run.generator else None, torch.get_rng_state())
    run.watch.start()
    try:
        while step < stop:
            # remember the RNG states, so that a Ctrl-C in the middle of a step can undo its draws
            step_rng = (run.generator.get_state() if run.generator else None, torch.get_rng_state())
            micro_batches = [next(batches) for _ in range(config.grad_accum)]
            with run.step_context():
                if config.time_steps:
                    with Stopwatch(run.device) as watch:
                        run.step(step, micro_batches, loss_fn, on_step)
                    run.history.step_seconds.append(watch.seconds)
                else:
                    run.step(step, micro_batches, loss_fn, on_step)
            step += 1
            bar.update(1)
            if step % config.log_every == 0 or step == stop:
                run.log(step, bar)
            due = (config.eval_every and step % config.eval_every == 0) or step == config.steps
            if evaluate is not None and due and run.evaluate(step, evaluate):
                run.history.stopped_early = step < config.steps
                run.log(step, bar)
                break
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < stop:
                run.save(step)
    except KeyboardInterrupt:
        run.history.interrupted = True
        run.optimizer.zero_grad(set_to_none=True)          # drop the half-accumulated step
        if run.generator is not None:
            run.generator.set_state(step_rng[0])
        torch.set_rng_state(step_rng[1])
        run.log(step, bar)                                  # the steps finished since the last log
    except StopIteration:
        raise ValueError(f"the batches ran out after {step} steps of {stop}: give an endless iterator (e.g. "
                         f"cycle through the data) or fewer steps.") from None
    finally:
        bar.close()
    return step
