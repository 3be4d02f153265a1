"""Pipeline parallelism (GPipe): the tiny GPT cut into stages, each batch cut into micro-batches.

Explained in notebooks/11_model_parallelism.ipynb, part 2 (Huang et al. 2019, Sec. 2).

Stage s of p holds n_layer/p consecutive blocks; the first stage also holds the token and position
embeddings, the last one the final LayerNorm, the lm head and the loss. GPipe cuts a batch into m equal
micro-batches, runs all m forward passes (each stage sends its output activation to the next), then all
m backward passes (each stage sends the gradient of its input back), then one optimiser step. The loss of
micro-batch k is divided by m, so the summed gradients are those of the mean loss over the whole batch:
the same step as one process.

While the pipeline fills and drains, stages wait. If every stage takes t_F per forward and t_B per
backward pass of a micro-batch, each stage works m·(t_F + t_B) out of (m + p − 1)·(t_F + t_B), so the
idle fraction -- the *bubble* -- is

    (p − 1) / (m + p − 1)                  (Huang et al. 2019, Sec. 2.3, "O((K−1)/(M+K−1))")

The schedule -- which stage runs which micro-batch's forward or backward pass at each clock tick -- is data
(:func:`gpipe_schedule`, exercise 11.2): :func:`gpipe_step` runs a stage's passes in the order a schedule lists
them, so the lesson's run executes the student's. Each stage's clock times its passes; :func:`idle_breakdown`
splits the idle time into the bubble (fill, turn, drain) and the gaps between passes (messages, overhead, a
slower neighbour).

Tied weights: the lm head reuses the token-embedding matrix E, but now the two uses live on different
ranks, the first and the last stage, each with its own copy of E. Each copy receives only its own part of
the gradient (the embedding lookup's, or the head's). :func:`sum_tied_gradients` all-reduces the two
between those stages before the optimiser step, so both copies get the full gradient and stay equal --
what Megatron-LM does in its "embedding group".
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from course_lib.parts.model import GPT, GPTConfig
from course_lib.tools.timing import clock, Stopwatch

__all__ = ["bubble_fraction", "gpipe_schedule", "gpipe_timeline", "idle_fraction", "measured_idle_fraction",
           "idle_breakdown", "Stage",
           "global_name", "gpipe_step", "message_seconds", "sum_tied_gradients", "Spec", "worker"]


def bubble_fraction(p: int, m: int) -> float:
    """GPipe's idle fraction (p − 1)/(m + p − 1) for p equal stages and m micro-batches."""
    for name, value in (("p", p), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return (p - 1) / (m + p - 1)


def gpipe_schedule(p: int, m: int) -> list[list[tuple[str, int] | None]]:
    """GPipe's schedule on ``p`` stages with ``m`` micro-batches, one clock tick per forward or backward pass.

    ``schedule[t][s]`` is what stage s does at tick t: ``("F", k)``, ``("B", k)`` or None (idle). Stage s runs
    F_k at tick s + k, as soon as stage s − 1 has finished it; the last stage starts the backward passes at
    tick m + p − 1, right after its last forward pass, and B_k reaches stage s p − 1 − s ticks later. It takes
    2(m + p − 1) ticks, of which each stage works 2m: the idle fraction is (p − 1)/(m + p − 1).
    """
    bubble_fraction(p, m)   # the same one-sentence refusal of a bad p or m
    ticks: list[list[tuple[str, int] | None]] = [[None] * p for _ in range(2 * (m + p - 1))]
    for s in range(p):
        for k in range(m):
            ticks[s + k][s] = ("F", k)
            ticks[m + p - 1 + (p - 1 - s) + k][s] = ("B", k)
    return ticks


def gpipe_timeline(t_forward: list[float], t_backward: list[float], m: int, *,
                   t_message: float = 0.0) -> list[list[tuple[str, int, float, float]]]:
    """The GPipe schedule with these per-stage times: per stage, (kind, k, start, end).

    Stage s runs F_0 … F_{m−1}, then B_0 … B_{m−1}. F_k on stage s waits for F_k on stage s − 1; B_k on
    stage s waits for B_k on stage s + 1. Each stage does one thing at a time. ``t_message`` is the time a
    message takes from one stage to the next (0: communication free); the sender does not wait for it.
    """
    if not t_message >= 0:
        raise ValueError(f"t_message must be a time in seconds, 0 or more, got {t_message!r}.")
    p = len(t_forward)
    if p < 1 or len(t_backward) != p:
        raise ValueError(f"t_forward and t_backward need one time per stage each, got {len(t_forward)} and "
                         f"{len(t_backward)}.")
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m (the number of micro-batches) must be a positive integer, got {m!r}.")
    free = [0.0] * p                       # when each stage is next free
    done_f = [[0.0] * m for _ in range(p)]
    events: list[list[tuple[str, int, float, float]]] = [[] for _ in range(p)]
    for k in range(m):
        for s in range(p):
            start = max(free[s], done_f[s - 1][k] + t_message if s else 0.0)
            free[s] = done_f[s][k] = start + t_forward[s]
            events[s].append(("F", k, start, free[s]))
    done_b = [[0.0] * m for _ in range(p)]
    for k in range(m):
        for s in reversed(range(p)):
            start = max(free[s], done_b[s + 1][k] + t_message if s < p - 1 else 0.0)
            free[s] = done_b[s][k] = start + t_backward[s]
            events[s].append(("B", k, start, free[s]))
    return events


def idle_fraction(timeline: list[list[tuple[str, int, float, float]]]) -> float:
    """1 − (busy time of all stages) / (stages × (last end − first start))."""
    starts = [e[2] for stage in timeline for e in stage]
    ends = [e[3] for stage in timeline for e in stage]
    busy = sum(e[3] - e[2] for stage in timeline for e in stage)
    return 1.0 - busy / (len(timeline) * (max(ends) - min(starts)))


def measured_idle_fraction(ranks: list[dict[str, Any]], m: int) -> list[float]:
    """The idle fraction of every timed step with ``m`` micro-batches, from the ranks' recorded events."""
    steps = zip(*(rank["timelines"][str(m)] for rank in ranks))
    return [idle_fraction([[tuple(e) for e in stage] for stage in step]) for step in steps]


def idle_breakdown(timeline: list[list[tuple[str, int, float, float]]]) -> dict[str, float]:
    """Where the stages' idle time lies in one step, as fractions of p × the step's time (with "busy" they add to 1).

    "bubble": idle where the schedule's fill, turn and drain put it -- before a stage's first pass, between its
    last forward and its first backward pass, after its last pass until the step ends. "between passes": every
    other gap between two passes of a stage -- receiving a message, Python between passes, waiting for a slower
    neighbour. With equal stages and free messages the bubble is (p − 1)/(m + p − 1) and nothing lies between.
    """
    t0 = min(e[2] for stage in timeline for e in stage)
    t1 = max(e[3] for stage in timeline for e in stage)
    bubble = between = busy = 0.0
    for stage in timeline:
        events = sorted(stage, key=lambda e: e[2])
        busy += sum(e[3] - e[2] for e in events)
        gaps = [(nxt[2] - prev[3], prev[0] == "F" and nxt[0] == "B") for prev, nxt in zip(events, events[1:])]
        turn = sum(gap for gap, is_turn in gaps if is_turn)
        bubble += (events[0][2] - t0) + turn + (t1 - events[-1][3])
        between += sum(gap for gap, is_turn in gaps if not is_turn)
    total = len(timeline) * (t1 - t0)
    return {"bubble": bubble / total, "between passes": between / total, "busy": busy / total}


# ------------------------------------------------------------------------------------------------
# A stage of the GPT
# ------------------------------------------------------------------------------------------------


class Stage(nn.Module):
    """Stage ``stage`` of ``n_stages`` of a :class:`~course_lib.parts.model.GPT` (copies of its modules).

    ``forward(x, targets)`` takes token ids on the first stage and activations (B, T, d) elsewhere; it
    returns activations, or the mean cross-entropy on the last stage.
    """

    def __init__(self, model: GPT, stage: int, n_stages: int) -> None:
        super().__init__()
        L = model.config.n_layer
        if isinstance(n_stages, bool) or not isinstance(n_stages, int) or n_stages < 1 or L % n_stages:
            raise ValueError(f"n_layer = {L} cannot be split into {n_stages!r} stages of equal depth: choose a "
                             f"number of stages that divides it.")
        if not 0 <= stage < n_stages:
            raise ValueError(f"stage must lie in 0..{n_stages - 1}, got {stage!r}.")
        if not model.config.tie_weights:
            raise ValueError("Stage expects a GPT with tie_weights=True (the course's default).")
        self.first, self.last, per = stage == 0, stage == n_stages - 1, L // n_stages
        self.blocks = nn.ModuleList(copy.deepcopy(model.blocks[stage * per:(stage + 1) * per]))
        if self.first:
            self.tok_emb, self.pos_emb = copy.deepcopy(model.tok_emb), copy.deepcopy(model.pos_emb)
        if self.last:
            self.ln_f = copy.deepcopy(model.ln_f)
            self.lm_head = nn.Linear(model.config.d_model, model.config.vocab_size, bias=False)
            # its own copy of E on another rank; one and the same tensor when a single stage holds both
            self.lm_head.weight = self.tok_emb.weight if self.first else nn.Parameter(model.tok_emb.weight.detach().clone())

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if self.first:
            x = self.tok_emb(x) + self.pos_emb(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            x = block(x)
        if not self.last:
            return x
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def global_name(name: str, stage: int, n_stages: int, n_layer: int) -> str:
    """The name in the whole GPT of stage parameter ``name`` (the head's copy of E is ``tok_emb.weight``)."""
    if name.startswith("blocks."):
        _, index, rest = name.split(".", 2)
        return f"blocks.{stage * (n_layer // n_stages) + int(index)}.{rest}"
    return "tok_emb.weight" if name == "lm_head.weight" else name


# ------------------------------------------------------------------------------------------------
# One GPipe step, by hand, with point-to-point sends
# ------------------------------------------------------------------------------------------------


def gpipe_step(module: Stage, idx: torch.Tensor, targets: torch.Tensor, m: int, stage: int, n_stages: int,
               d_model: int, schedule: list[list[Any]] | None = None
               ) -> tuple[torch.Tensor | None, list[tuple[str, int, float, float]]]:
    """Forward and backward of one batch in ``m`` micro-batches on this stage (gradients accumulate in .grad).

    The stage runs its passes in the order ``schedule`` lists them (tick by tick, its own column; default
    :func:`gpipe_schedule`); a pass starts as soon as its input has arrived, whatever its tick. Messages carry
    their micro-batch in their tag, so two stages may order their passes differently. Returns the loss (on the
    last stage; None elsewhere) and this stage's events (kind, k, start, end) in
    ``course_lib.tools.timing.clock`` seconds (read after the device caught up), computation only: waiting for
    a message counts as idle.
    """
    if idx.shape[0] % m:
        raise ValueError(f"a batch of {idx.shape[0]} sequences cannot be cut into {m} equal micro-batches.")
    order = [tuple(tick[stage]) for tick in (schedule or gpipe_schedule(n_stages, m)) if tick[stage] is not None]
    if sorted(order) != sorted([("F", k) for k in range(m)] + [("B", k) for k in range(m)]):
        raise ValueError(f"the schedule gives stage {stage} the passes {order}; it needs F and B of each of the "
                         f"{m} micro-batches once.")
    device, b, T = idx.device, idx.shape[0] // m, idx.shape[1]
    shape, dtype = (b, T, d_model), next(module.parameters()).dtype
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    events, pending = [], []
    for kind, k in order:
        if kind == "F":
            if module.first:
                x = idx[k * b:(k + 1) * b]
            else:
                x = torch.empty(shape, dtype=dtype, device=device)
                dist.recv(x, src=stage - 1, tag=k)                   # the previous stage's activation
                x.requires_grad_()
            start = clock(device)
            y = module(x, targets[k * b:(k + 1) * b] if module.last else None)
            events.append(("F", k, start, clock(device)))
            if module.last:
                y = y / m                                            # mean over the whole batch
            else:
                pending.append(dist.isend(y.detach(), dst=stage + 1, tag=k))
            inputs[k], outputs[k] = x, y
        else:
            grad = None
            if not module.last:
                grad = torch.empty(shape, dtype=dtype, device=device)
                dist.recv(grad, src=stage + 1, tag=m + k)            # dLoss/d(our output) from the next stage
            start = clock(device)
            outputs[k].backward(grad)
            events.append(("B", k, start, clock(device)))
            if not module.first:
                pending.append(dist.isend(inputs[k].grad, dst=stage - 1, tag=m + k))
    for work in pending:
        work.wait()
    loss = sum(outputs[k].detach() for k in range(m)) if module.last else None
    return loss, events


def message_seconds(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, repeats: int = 5) -> float:
    """One-way time of one activation message between ranks 0 and 1: the median of ``repeats`` round trips
    (0 sends, 1 receives and sends it back), halved. Every rank must call it; the others only wait."""
    rank, x = dist.get_rank(), torch.zeros(shape, dtype=dtype, device=device)
    times = []
    for trip in range(repeats + 1):                    # the first round trip is a warm-up
        dist.barrier()
        with Stopwatch(device) as watch:
            if rank == 0:
                dist.send(x, dst=1)
                dist.recv(x, src=1)
            elif rank == 1:
                dist.recv(x, src=0)
                dist.send(x, dst=0)
        if trip:
            times.append(watch.seconds)
    seconds = torch.tensor([statistics.median(times) / 2 if rank == 0 else 0.0], dtype=torch.float64, device=device)
    dist.broadcast(seconds, src=0)                     # every rank reports rank 0's measurement
    return seconds.item()


def sum_tied_gradients(module: Stage, group: Any) -> None:
    """HERE the tied matrix E gets its full gradient: the first stage's copy holds the embedding's part,
    the last stage's copy the lm head's part; an all-reduce over those two stages adds them up."""
    if module.first and module.last:
        return  # one stage holds the one shared tensor: autograd already added both parts
    if module.first:
        dist.all_reduce(module.tok_emb.weight.grad, group=group)
    elif module.last:
        dist.all_reduce(module.lm_head.weight.grad, group=group)


# ------------------------------------------------------------------------------------------------
# What every rank runs (python -m course_lib.distributed.parallel pipeline)
# ------------------------------------------------------------------------------------------------


@dataclass
class Spec:
    """The GPT, the batch, the micro-batch counts to time, and the optimiser steps compared with one process.

    No biases and no dropout, as in course_lib.distributed.ddp: a key bias has an exactly-zero gradient, whose rounding
    noise Adam would blow up into full-size steps, and dropout would draw different masks per micro-batch.
    """

    vocab_size: int = 65
    context: int = 32
    d_model: int = 64
    n_layer: int = 2
    n_head: int = 4
    batch: int = 8
    micro_batches: tuple[int, ...] = (1, 2, 4, 8)
    timed_steps: int = 3
    train_steps: int = 2
    train_micro_batches: int = 4
    lr: float = 1e-3
    dtype: str = "float32"
    seed: int = 0
    # the schedule of each number of micro-batches, str(m) -> ticks (exercise 11.2); None: gpipe_schedule
    schedules: dict[str, list[list[Any]]] | None = None

    def __post_init__(self) -> None:
        self.micro_batches = tuple(self.micro_batches)
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}.")
        for m in (*self.micro_batches, self.train_micro_batches):
            if isinstance(m, bool) or not isinstance(m, int) or m < 1 or self.batch % m:
                raise ValueError(f"each number of micro-batches must divide the batch of {self.batch}, got {m!r}.")
            if self.schedules is not None and str(m) not in self.schedules:
                raise ValueError(f"schedules has no schedule for m = {m}: give one for every number of micro-batches "
                                 f"the run uses ({sorted({*self.micro_batches, self.train_micro_batches})}).")
        if self.schedules is not None:   # plain lists of ["F" or "B", int]: they travel to the ranks as JSON
            self.schedules = {str(m): [[None if e is None else [str(e[0]), int(e[1])] for e in tick] for tick in ticks]
                              for m, ticks in self.schedules.items()}

    def schedule(self, m: int) -> list[list[Any]] | None:
        return None if self.schedules is None else self.schedules[str(m)]

    def config(self) -> GPTConfig:
        return GPTConfig(vocab_size=self.vocab_size, context=self.context, d_model=self.d_model,
                         n_layer=self.n_layer, n_head=self.n_head, dropout=0.0, bias=False)


def _model(spec: Spec, device: torch.device) -> GPT:
    torch.manual_seed(spec.seed)
    return GPT(spec.config()).to(device=device, dtype=getattr(torch, spec.dtype))


def _batch(spec: Spec, step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(spec.seed + 1000 + step)
    tokens = torch.randint(spec.vocab_size, (spec.batch, spec.context + 1), generator=generator)
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device)


def _reference(spec: Spec, device: torch.device) -> tuple[GPT, float, dict[str, torch.Tensor]]:
    """One process, whole batches, through the course's loop: the first step's loss and gradients, then the
    weights after training."""
    from course_lib.parts.lm import lm_loss
    from course_lib.parts.loop import LoopConfig, train

    model = _model(spec, device)
    losses: list[torch.Tensor] = []
    grads0: dict[str, torch.Tensor] = {}

    def loss_fn(module: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        losses.append(lm_loss(module, batch))
        return losses[-1]

    def keep_first_gradients(step: int) -> None:   # after the step, before the loop zeroes the gradients
        if step == 0:
            grads0.update({n: p.grad.clone() for n, p in model.named_parameters()})

    config = LoopConfig(steps=spec.train_steps, lr=spec.lr, schedule="constant", grad_clip=None, amp="none",
                        log_every=spec.train_steps, progress=False)
    train(model, (_batch(spec, step, device) for step in range(spec.train_steps)), loss_fn, config,
          optimizer=torch.optim.AdamW(model.parameters(), lr=spec.lr, foreach=False), on_step=keep_first_gradients)
    return model, losses[0].item(), grads0


def _max_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def worker(spec: Spec, rank: int, world: int, device: torch.device) -> dict[str, Any]:
    p, stage = world, rank
    module = Stage(_model(spec, device), stage, p)
    tied_group = dist.new_group([0, p - 1]) if p > 1 else None   # the "embedding group"
    reference, ref_loss, ref_grads = _reference(spec, device)
    ref_params = dict(reference.named_parameters())
    start_params = dict(_model(spec, device).named_parameters())
    moved = max((ref_params[n] - q).abs().max().item() for n, q in start_params.items())

    # correctness: train_steps optimiser steps, the first one's gradients compared before and after the sum
    optimizer = torch.optim.AdamW(module.parameters(), lr=spec.lr, foreach=False)
    grad_gap_before = grad_gap_after = 0.0
    loss0 = torch.zeros((), dtype=torch.float64, device=device)
    for step in range(spec.train_steps):
        x, y = _batch(spec, step, device)
        optimizer.zero_grad(set_to_none=True)
        loss, _ = gpipe_step(module, x, y, spec.train_micro_batches, stage, p, spec.d_model,
                             spec.schedule(spec.train_micro_batches))
        if step == 0:
            gaps = {n: (q.grad - ref_grads[global_name(n, stage, p, spec.n_layer)]).abs().max().item()
                    for n, q in module.named_parameters()}
            grad_gap_before = max(gaps.get("tok_emb.weight", 0.0), gaps.get("lm_head.weight", 0.0))
            if loss is not None:
                loss0 += loss.double()
        sum_tied_gradients(module, tied_group)
        if step == 0:
            grad_gap_after = max((q.grad - ref_grads[global_name(n, stage, p, spec.n_layer)]).abs().max().item()
                                 for n, q in module.named_parameters())
        optimizer.step()
    dist.all_reduce(loss0)  # only the last stage contributed
    weight_gap = max((q.detach() - ref_params[global_name(n, stage, p, spec.n_layer)].detach()).abs().max().item()
                     for n, q in module.named_parameters())
    tied_gap = 0.0
    if p > 1 and (module.first or module.last):
        signed = module.tok_emb.weight.detach().clone() if module.first else -module.lm_head.weight.detach()
        dist.all_reduce(signed, group=tied_group)       # E on the first stage minus E on the last stage
        tied_gap = signed.abs().max().item()

    # timing: the GPipe schedule for each number of micro-batches, and one message of its activation
    timelines: dict[str, list[list[tuple[str, int, float, float]]]] = {}
    messages: dict[str, float] = {}
    x, y = _batch(spec, 0, device)
    dtype = getattr(torch, spec.dtype)
    for m in spec.micro_batches:
        messages[str(m)] = message_seconds((spec.batch // m, spec.context, spec.d_model), dtype, device) if p > 1 else 0.0
        timelines[str(m)] = []
        for step in range(spec.timed_steps + 1):           # the first run of each m is a warm-up
            module.zero_grad(set_to_none=True)
            dist.barrier()
            _, events = gpipe_step(module, x, y, m, stage, p, spec.d_model, spec.schedule(m))
            if step:
                timelines[str(m)].append(events)
    return dict(
        stage=stage, n_stages=p, params_this_stage=sum(q.numel() for q in module.parameters()),
        loss_pipeline=loss0.item(), loss_one_process=ref_loss,
        loss_abs_diff=abs(loss0.item() - ref_loss),
        tied_grad_gap_before_sum=_max_over_ranks(grad_gap_before, device),
        grad_max_abs_diff=_max_over_ranks(grad_gap_after, device),
        weights_max_abs_diff=_max_over_ranks(weight_gap, device), weights_moved_by_training=moved,
        tied_copies_max_abs_diff=_max_over_ranks(tied_gap, device),
        timelines=timelines, message_seconds=messages,
    )
