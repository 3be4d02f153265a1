"""Check of notebooks/04_training_a_language_model.ipynb's own training loop (exercise 04.5), with its hints, and the
course's loop behind the exercise's signature (:func:`course_loop`, what the lesson falls back to).

The student writes

    train_loop(model, tokens, steps, *, batch_size, context, lr_at, generator, weight_decay=0.1, grad_clip=1.0,
               evaluate=None, eval_every=100) -> (losses, evaluations)

one optimiser step per iteration: a batch of random windows of ``tokens`` (targets shifted by one), the learning
rate of this step, forward, loss, ``zero_grad``, backward, clipping, AdamW (betas 0.9, 0.95; weight decay on the
matrices only), and every ``eval_every`` steps ``evaluate(model)`` in eval mode under ``torch.no_grad()``. The check
hands the loop a small float64 GPT that records every call, replays the very batches the student's loop drew through
the course's loop (``course_lib.parts.loop.train``) from the same weights, compares every loss and the final weights,
and names the usual slips by replaying them too.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from course_lib.checks.framework import call_student, exercise, fail, passed, register_hint

register_hint(
    "04.5",
    "Each step is the same six moves: a batch of windows (targets = the window shifted by one token), set this "
    "step's learning rate, forward to the loss, clear the old gradients, backward, clip, optimiser step; every "
    "eval_every steps, evaluate with the model in eval mode and without gradients, then switch back.",
    "Build AdamW once, before the loop, with two parameter groups: p.dim() >= 2 (matrices, embeddings included) "
    "with weight_decay, the rest (biases, LayerNorm γ and β) with 0.0; betas=(0.9, 0.95). In the loop: starts = "
    "torch.randint(len(tokens) - context, (batch_size,), generator=generator); x and y from tokens[s : s + "
    "context] and tokens[s + 1 : s + context + 1]; for every group, group['lr'] = lr_at(step); "
    "optimizer.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip); "
    "optimizer.step(); after step + 1 is a multiple of eval_every: model.eval(), evaluate under torch.no_grad(), "
    "model.train().",
    "for group in optimizer.param_groups: group['lr'] = lr_at(step)   # then: logits, loss = model(x, y); "
    "optimizer.zero_grad(); loss.backward(); clip_grad_norm_(...); optimizer.step()",
)

_TINY = dict(vocab_size=13, context=8, n_layer=1, n_head=2, d_model=16)
_RUN = dict(steps=6, batch_size=4, eval_every=3, weight_decay=0.5, grad_clip=0.1)
_PEAK, _WARMUP, _FLOOR = 3e-2, 2, 3e-3
_TOL = 1e-6


# ----------------------------------------------------------------------------------------------
# The course's loop behind the exercise's signature
# ----------------------------------------------------------------------------------------------

def course_loop(model: nn.Module, tokens: torch.Tensor, steps: int, *, batch_size: int, context: int,
                lr_at: Callable[[int], float], generator: torch.Generator, weight_decay: float = 0.1,
                grad_clip: float | None = 1.0, evaluate: Callable[[nn.Module], Any] | None = None,
                eval_every: int = 100) -> tuple[list[float], list[tuple[int, Any]]]:
    """Exercise 04.5's ``train_loop``, done by the course's one loop (``course_lib.parts.loop.train``) with a language
    model's batches (``course_lib.parts.lm.get_batch``): the same batches, steps and evaluations."""
    from course_lib.parts.lm import get_batch, lm_loss
    from course_lib.parts.loop import LoopConfig, train

    device = next(model.parameters()).device
    batches = (get_batch(tokens, batch_size, context, generator, device) for _ in itertools.count())
    done, evaluations = [0], []

    def evaluate_rows(m: nn.Module) -> dict[str, float]:
        evaluations.append((done[0], evaluate(m)))
        return {}

    config = LoopConfig(steps=steps, lr=max(lr_at(0), 1e-12), schedule=lr_at, weight_decay=weight_decay,
                        grad_clip=grad_clip, eval_every=eval_every, log_every=max(1, steps // 50),
                        desc="the course's loop")
    history = train(model, batches, lm_loss, config, evaluate=evaluate_rows if evaluate is not None else None,
                    on_step=lambda step: done.__setitem__(0, step + 1), generator=generator,
                    tokens_in=lambda batch: batch[0].numel(), device=device)
    return history.losses, evaluations


# ----------------------------------------------------------------------------------------------
# What the check hands the loop, and the slips it replays
# ----------------------------------------------------------------------------------------------

class _Watched(nn.Module):
    """The model the check hands to the student's loop: it records every call (inputs, mode, gradients)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[dict[str, Any]] = []
        self.evaluating = False

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> Any:
        self.calls.append(dict(x=x.detach().clone() if isinstance(x, torch.Tensor) else x,
                               y=y.detach().clone() if isinstance(y, torch.Tensor) else None,
                               training=self.training, grad=torch.is_grad_enabled(), evaluating=self.evaluating))
        return self.inner(x, y)


def _stream(n: int, seed: int) -> torch.Tensor:
    """A token stream in which every window of the context is unique (so each batch row can be located)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        tokens = torch.randint(_TINY["vocab_size"], (n,), generator=g)
        windows = {tuple(tokens[s:s + _TINY["context"]].tolist()) for s in range(n - _TINY["context"] + 1)}
        if len(windows) == n - _TINY["context"] + 1:
            return tokens


def _schedule(step: int) -> float:
    from course_lib.parts.loop import cosine_schedule

    return cosine_schedule(_PEAK, _WARMUP, _RUN["steps"], _FLOOR)(step)


def _replay(start: dict[str, torch.Tensor], batches: list[tuple[torch.Tensor, torch.Tensor]], *,
            zero_grad: str = "before", clip: bool = True, lr_shift: int = 0, constant_lr: bool = False,
            decay: str = "matrices", betas: tuple[float, float] = (0.9, 0.95), adam: bool = False,
            step: bool = True, targets: str = "shifted") -> tuple[list[float], nn.Module]:
    """The loop written out, with switches for the slips students make; from weights ``start`` on ``batches``."""
    from course_lib.parts.model import GPT, GPTConfig

    model = GPT(GPTConfig(**_TINY)).double()
    model.load_state_dict(start)
    params, wd = list(model.parameters()), _RUN["weight_decay"]
    groups = {"matrices": [{"params": [p for p in params if p.dim() >= 2], "weight_decay": wd},
                           {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
              "all": [{"params": params, "weight_decay": wd}],
              "none": [{"params": params, "weight_decay": 0.0}],
              "default": [{"params": params, "weight_decay": 0.01}]}[decay]
    optimizer = (torch.optim.Adam if adam else torch.optim.AdamW)(groups, lr=_schedule(0), betas=betas)
    losses = []
    for s, (x, y) in enumerate(batches):
        lr = _schedule(0) if constant_lr else _schedule(max(0, s + lr_shift))
        for group in optimizer.param_groups:
            group["lr"] = lr
        if zero_grad == "before":
            optimizer.zero_grad()
        loss = model(x, x if targets == "inputs" else y)[1]
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, _RUN["grad_clip"])
        if step:
            optimizer.step()
        losses.append(loss.item())
    return losses, model


_SLIPS: dict[str, dict[str, Any]] = {
    "the gradients pile up across steps: clear them every step (optimizer.zero_grad()) before backward()":
        dict(zero_grad="never"),
    "your update is not clipped: clip the gradient norm after backward() and before optimizer.step() (clipping "
    "after the step changes nothing)": dict(clip=False),
    "your schedule runs one step ahead: step s must use lr_at(s), set before optimizer.step() (calling a "
    "scheduler's step() before the optimiser's does this)": dict(lr_shift=1),
    "your schedule runs one step behind: set step s's learning rate, lr_at(s), before that step's "
    "optimizer.step(), not after it": dict(lr_shift=-1),
    "your learning rate never changes: set every param group's 'lr' to lr_at(step) at each step":
        dict(constant_lr=True),
    "you decay every parameter; the lesson decays the matrices only (p.dim() >= 2), not biases or LayerNorm's "
    "γ and β": dict(decay="all"),
    "your loop applies no weight decay: the matrices' group takes weight_decay": dict(decay="none"),
    "you left AdamW's default weight decay (0.01) on every parameter: build two groups, the matrices with "
    "weight_decay and the rest with 0.0": dict(decay="default"),
    "your AdamW uses its default betas (0.9, 0.999); the lesson's are (0.9, 0.95)": dict(betas=(0.9, 0.999)),
    "you used torch.optim.Adam, whose weight_decay adds an L2 term to the gradient; AdamW decays the weights "
    "directly (decoupled)": dict(adam=True),
    "your weights never change: call optimizer.step() after backward(), and clear the gradients before "
    "backward(), not between backward() and optimizer.step()": dict(step=False),
    "your targets are not shifted: the model must predict the *next* token, y = tokens[s + 1 : s + context + 1], "
    "not the input itself": dict(targets="inputs"),
}


# ----------------------------------------------------------------------------------------------
# The check
# ----------------------------------------------------------------------------------------------

def _number(value: Any) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.detach())
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():
        value = value.item()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _batches(calls: list[dict[str, Any]], tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (x, shifted y) of every training call, after checking that x holds windows of ``tokens`` and y, if the
    loop passed it, the next tokens."""
    __tracebackhide__ = True
    B, T = _RUN["batch_size"], _TINY["context"]
    where = {tuple(tokens[s:s + T].tolist()): s for s in range(len(tokens) - T)}
    out = []
    for step, call in enumerate(calls):
        x = call["x"]
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != (B, T) or x.is_floating_point():
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            fail(f"at step {step} your loop called the model with inputs of shape {shape}; a batch is an integer "
                 f"tensor of shape (batch_size, context) = {(B, T)}.")
        starts = [where.get(tuple(row.tolist())) for row in x]
        if None in starts:
            fail(f"the inputs of step {step} are not windows of the token stream (with room for the next token): "
                 f"each row is tokens[s : s + context] for a start s < len(tokens) - context.")
        y = torch.stack([tokens[s + 1:s + T + 1] for s in starts])
        given = call["y"]
        if given is not None:
            if torch.equal(given, x):
                fail("your targets are the inputs themselves; the model predicts the *next* token, so y is the "
                     "window shifted by one: tokens[s + 1 : s + context + 1].")
            if not torch.equal(given, y):
                fail(f"the targets of step {step} are not the next tokens of each window: y = tokens[s + 1 : s + "
                     f"context + 1] for the window x = tokens[s : s + context].")
        out.append((x, y))
    return out


def _modes(watched: _Watched, evaluated: list[dict[str, Any]], training: list[dict[str, Any]]) -> None:
    """Train mode with gradients for the steps; eval mode without gradients inside evaluate()."""
    __tracebackhide__ = True
    every, steps = _RUN["eval_every"], _RUN["steps"]
    for step, call in enumerate(training):
        if not call["training"]:
            after = any(e["after"] <= step for e in evaluated)
            fail("after evaluating, your loop leaves the model in eval mode: switch it back with model.train() "
                 "before the next step." if after else "your loop trains the model in eval mode: call model.train() "
                 "before the first step.")
        if not call["grad"]:
            fail("your training step runs without gradients (torch.no_grad() around it?); only evaluate() runs "
                 "under torch.no_grad().")
    if not evaluated:
        fail(f"your loop never calls evaluate(model); call it after every eval_every steps (here after steps "
             f"{', '.join(str(s) for s in range(every, steps + 1, every))}).")
    for e in evaluated:
        if e["training"]:
            fail("evaluate() ran with the model in train mode (dropout on): call model.eval() before evaluating "
                 "and model.train() after.")
        if e["grad"]:
            fail("evaluate() ran with gradients switched on: wrap the evaluation in torch.no_grad() (it saves the "
                 "memory and time autograd would spend).")
    expected = list(range(every, steps + 1, every))
    got = [e["after"] for e in evaluated]
    if got != expected:
        early = [s - every for s in expected]
        fail(f"your loop evaluates after steps {got}; evaluate after every eval_every steps, i.e. after steps "
             f"{expected} (when step + 1 is a multiple of eval_every)" + (": yours runs before the step" if
                                                                          got == early else "") + ".")


@exercise("04.5", points=3, forbid=(
    "course_lib.parts.loop:train", "course_lib.parts.loop:_Run", "course_lib.parts.loop:_loop",
    "course_lib.parts.loop:make_optimizer", "course_lib.parts.lm:train_lm",
))
def check_train_loop(fn: Callable[..., Any]) -> None:
    """Exercise 04.5: ``fn`` trains like the course's loop: every loss and the final weights equal those of
    ``course_lib.parts.loop.train`` from the same weights on the same batches; evaluation in eval mode, no grad."""
    __tracebackhide__ = True
    from course_lib.parts.lm import lm_loss
    from course_lib.parts.loop import LoopConfig, train
    from course_lib.parts.model import GPT, GPTConfig

    tokens, held = _stream(300, 0), _stream(60, 1)
    torch.manual_seed(0)
    inner = GPT(GPTConfig(**_TINY)).double()
    start = copy.deepcopy(inner.state_dict())
    watched = _Watched(inner)
    evaluated: list[dict[str, Any]] = []
    returned_values: list[float] = []
    held_x, held_y = held[:48].view(6, 8), held[1:49].view(6, 8)

    def evaluate(model: nn.Module) -> float:
        watched.evaluating = True
        try:
            evaluated.append(dict(after=sum(not c["evaluating"] for c in watched.calls), training=watched.training,
                                  grad=torch.is_grad_enabled()))
            value = float(model(held_x, held_y)[1])
        finally:
            watched.evaluating = False
        returned_values.append(value)
        return value

    steps, every = _RUN["steps"], _RUN["eval_every"]
    case = (f"{steps} steps of {_RUN['batch_size']} windows of {_TINY['context']} tokens, eval_every={every}")
    result = call_student(fn, watched, tokens, steps, batch_size=_RUN["batch_size"], context=_TINY["context"],
                          lr_at=_schedule, generator=torch.Generator().manual_seed(0),
                          weight_decay=_RUN["weight_decay"], grad_clip=_RUN["grad_clip"], evaluate=evaluate,
                          eval_every=every, case=case)
    if not (isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[0], (list, tuple))):
        fail(f"your loop should return (losses, evaluations): the list of every step's loss and the list of "
             f"(step, evaluate(model)) pairs, but it returned a {type(result).__name__}.")
    losses = [_number(v) for v in result[0]]
    if len(losses) != steps or None in losses:
        fail(f"your loop should return {steps} losses, one number per step, but it returned {len(losses)}"
             + (" (not all of them numbers)." if None in losses else "."))
    training = [c for c in watched.calls if not c["evaluating"]]
    if len(training) != steps:
        fail(f"your loop ran the model {len(training)} times outside evaluate() for {steps} steps; one forward pass "
             f"per step.")
    _modes(watched, evaluated, training)
    pairs = list(result[1]) if isinstance(result[1], (list, tuple)) else None
    expected_pairs = list(zip(range(every, steps + 1, every), returned_values))
    if pairs is None or len(pairs) != len(expected_pairs) or any(
            not (isinstance(p, (tuple, list)) and len(p) == 2 and p[0] == s and _number(p[1]) == v)
            for p, (s, v) in zip(pairs, expected_pairs)):
        fail(f"your loop should return its evaluations as [(step, evaluate(model)), ...], here {expected_pairs}.")
    batches = _batches(training, tokens)
    reference = GPT(GPTConfig(**_TINY)).double()
    reference.load_state_dict(start)
    history = train(reference, iter(batches), lm_loss, LoopConfig(
        steps=steps, lr=_PEAK, schedule=_schedule, weight_decay=_RUN["weight_decay"], betas=(0.9, 0.95),
        grad_clip=_RUN["grad_clip"], log_every=steps, progress=False, amp="none"))
    _compare_losses(losses, history.losses, start, batches, case)
    for (name, p), q in zip(inner.named_parameters(), reference.parameters()):
        if not torch.allclose(p.detach(), q.detach(), atol=1e-6, rtol=1e-5):   # the course's GPT: loss in float32
            fail(f"every loss matches the course's loop, but after the last step your `{name}` differs from its: "
                 f"look at what your loop does after the last forward pass (the last optimizer.step()).")
    passed("check_train_loop", f"every loss of your loop equals the course's loop's on the same batches ({steps} "
                               f"steps: warm-up, decay, clipping, AdamW with decay on the matrices only), the final "
                               f"weights too, and it evaluates in eval mode without gradients.")


def _compare_losses(losses: list[float], expected: list[float], start: dict[str, torch.Tensor],
                    batches: list[tuple[torch.Tensor, torch.Tensor]], case: str) -> None:
    __tracebackhide__ = True
    def agree(a: list[float], b: list[float]) -> bool:
        return all(math.isclose(x, y, rel_tol=_TOL, abs_tol=_TOL) for x, y in zip(a, b))

    if agree(losses, expected):
        return
    for sentence, slip in _SLIPS.items():
        try:
            simulated = _replay(start, batches, **slip)[0]
        except Exception:  # noqa: BLE001 -- a slip that cannot be replayed here does not apply
            continue
        if agree(losses, simulated):
            fail(f"your loop is wrong on {case}: {sentence}.")
    first = next(i for i, (x, y) in enumerate(zip(losses, expected))
                 if not math.isclose(x, y, rel_tol=_TOL, abs_tol=_TOL))
    fail(f"your loss at step {first} is {losses[first]:.6f}, the course's loop gets {expected[first]:.6f} on the same "
         f"batches from the same weights" + (f" (steps 0-{first - 1} agree)." if first else "."))


def _assert_slips_differ() -> dict[str, float]:
    """For the tests: how far each slip's losses land from the right ones (all must be well beyond the tolerance)."""
    tokens = _stream(300, 0)
    g = torch.Generator().manual_seed(0)
    from course_lib.parts.lm import get_batch
    from course_lib.parts.model import GPT, GPTConfig

    batches = [get_batch(tokens, _RUN["batch_size"], _TINY["context"], g) for _ in range(_RUN["steps"])]
    torch.manual_seed(0)
    start = GPT(GPTConfig(**_TINY)).double().state_dict()
    right = _replay(start, batches)[0]
    return {sentence: max(abs(a - b) for a, b in zip(_replay(start, batches, **slip)[0], right))
            for sentence, slip in _SLIPS.items()}


__all__ = ["check_train_loop", "course_loop"]
