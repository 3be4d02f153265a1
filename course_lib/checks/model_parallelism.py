"""Checks of notebooks/11_model_parallelism.ipynb (exercises 11.*), with their hints."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable

import torch

from course_lib.checks.framework import (
    exercise, call_student, close, fail, passed, register_hint, require_tensor,
)
from course_lib.checks.scaling_out import as_number

# ----------------------------------------------------------------------------------------------
# 11.1: Megatron's f and g, and the MLP split by columns then rows, a script on two processes
# ----------------------------------------------------------------------------------------------

register_hint(
    "11.1",
    "Split A = fc by columns and B = proj by rows, so that GeLU works on each rank's columns alone and the "
    "output is the sum of the ranks' partial outputs. f and g are the two places where the ranks meet: one "
    "going forward (the sum of partial outputs), one going backward (the sum of the input's gradient).",
    "nn.Linear stores weight = Aᵀ: rank r keeps rows r·4d/W … of fc.weight and of fc.bias, and the same range "
    "of columns (dim 1) of proj.weight; proj.bias stays whole and is added once, after g. f: forward returns x, "
    "backward all-reduces a copy of the gradient. g: forward all-reduces a copy of x, backward returns the "
    "gradient as it is.",
    "return SumOverRanks.apply(F.linear(F.gelu(self.fc(CopyToRanks.apply(x))), self.proj.weight)) + self.proj.bias",
)

MLP_ARGS = dict(d_model=8, batch=2, tokens=3, seed=0)   # what the check's run computes: tiny, so it starts fast
_MLP_FORBIDDEN = ("course_lib.distributed.megatron_mlp", "torch.distributed.tensor", "torch.distributed.nn",
                  *(f"course_lib.distributed.tensor_parallel.{name}" for name in (
                      "f", "g", "_CopyToRanks", "_SumOverRanks", "TensorParallelMLP", "TensorParallelBlock",
                      "TensorParallelAttention", "shard_block", "shard_of", "plain_chunk", "load_operators")))
_WORLD = 2


@exercise("11.1", points=2, forbid=("course_lib.distributed.megatron_mlp:*",
                                     "course_lib.distributed.tensor_parallel:TensorParallelMLP",
                                     "course_lib.distributed.tensor_parallel:f", "course_lib.distributed.tensor_parallel:g"))
def check_megatron_mlp(script: str) -> None:
    """Exercise 11.1: ``script`` (a file) defines Megatron's f (``CopyToRanks``), g (``SumOverRanks``) and
    ``ParallelMLP``; run on 2 processes, every rank's output, input gradient and weight gradients must be those
    of the whole MLP (its own part of them, for the split weights)."""
    __tracebackhide__ = True
    from course_lib.checks.scripts import read_script, run_script

    read_script(script, "11.1", _MLP_FORBIDDEN)
    args = [item for key, value in MLP_ARGS.items() for item in (f"--{key.replace('_', '-')}", str(value))]
    out, failure = run_script(script, "11.1", args)
    try:
        judge_megatron_mlp(out, failure)
    finally:
        shutil.rmtree(out, ignore_errors=True)   # the ranks' files were only needed for the verdict


def judge_megatron_mlp(out, failure: str | None) -> None:
    """The verdict on what the two ranks of a Megatron MLP script wrote in ``out`` (``failure``: what went wrong
    in the launch). One sentence per slip; the tests hand it the runs of their wrong scripts."""
    __tracebackhide__ = True
    import argparse

    from course_lib.checks.scripts import load_per_rank
    from course_lib.distributed.tensor_parallel import mlp_case

    mlp, x, dy = mlp_case(argparse.Namespace(**MLP_ARGS))
    shards = load_per_rank(out, "shards", _WORLD)
    if shards is None:
        fail(f"your script failed on {_WORLD} processes: {failure}." if failure else
             "your script ran but wrote no shards_rank0.safetensors: keep the template's lines after "
             "`if __name__ == \"__main__\":` (tensor_parallel.save_shards and save_results).")
    _judge_shards(shards, mlp)
    if failure:
        fail(f"your script failed on {_WORLD} processes: {failure}.")
    results = load_per_rank(out, "results", _WORLD)
    if results is None or any("x_grad" not in r for r in results):
        fail("your script ran but wrote no results_rank0.safetensors with the input's gradient: keep the "
             "template's lines that run the part forward and backward and save what it computed.")
    want = _mlp_expectations(mlp, x, dy)
    for r, got in enumerate(results):
        _judge_output(got["y"], want, r)
    for r, got in enumerate(results):
        _judge_gradients(got, want, r)
    passed("check_megatron_mlp", "on both ranks your f, g and split MLP give the whole MLP's output, the gradient of "
                                 "its input and each weight's gradient (its own part of them), with one all-reduce "
                                 "forward (g) and one backward (f).")


def _rows(rank: int, d_ff: int) -> slice:
    return slice(rank * d_ff // _WORLD, (rank + 1) * d_ff // _WORLD)


def _judge_shards(shards: list[dict[str, torch.Tensor]], mlp) -> None:
    """What each rank holds, before anything ran: the split's slips have their own sentences."""
    __tracebackhide__ = True
    A, a, B, b = (t.detach() for t in (mlp.fc.weight, mlp.fc.bias, mlp.proj.weight, mlp.proj.bias))
    d_ff, d = A.shape
    want = {"fc.weight", "fc.bias", "proj.weight", "proj.bias"}
    if set(shards[0]) != want:
        fail(f"your ParallelMLP holds {sorted(shards[0])}; it should hold two nn.Linear layers named fc (its "
             f"columns of A) and proj (its rows of B), with their biases, as the course's MLP does.")
    for r, held in enumerate(shards):
        fw, fb, pw, pb = held["fc.weight"], held["fc.bias"], held["proj.weight"], held["proj.bias"]
        if tuple(fw.shape) == (d_ff, d):
            fail(f"rank {r} holds the whole fc.weight ({d_ff} × {d}); it should keep only its {d_ff // _WORLD} "
                 f"columns of A: rows r·4d/W … (r+1)·4d/W − 1 of fc.weight.")
        if tuple(fw.shape) == (d_ff, d // _WORLD):
            fail(f"rank {r} split fc.weight along dim 1 (the input features, A's rows); Megatron splits A by "
                 f"columns, and nn.Linear stores Aᵀ: split fc.weight's rows (dim 0).")
        if tuple(pw.shape) == (d // _WORLD, d_ff):
            fail(f"rank {r} split proj.weight along dim 0 (B's columns); B is split by rows, which nn.Linear keeps "
                 f"as proj.weight's columns: split dim 1.")
        if tuple(fb.shape) == (d_ff,):
            fail(f"rank {r} kept fc's whole bias; it splits with A's columns: keep entries r·4d/W … (r+1)·4d/W − 1.")
        if tuple(pb.shape) != (d,):
            fail(f"rank {r}'s proj.bias has shape {tuple(pb.shape)}; proj's bias is added once, after the sum of "
                 f"the partial outputs: every rank keeps it whole ({d} numbers).")
        expected = {"fc.weight": A[_rows(r, d_ff)], "fc.bias": a[_rows(r, d_ff)], "proj.weight": B[:, _rows(r, d_ff)],
                    "proj.bias": b}
        for name, tensor in (("fc.weight", fw), ("fc.bias", fb), ("proj.weight", pw), ("proj.bias", pb)):
            if tuple(tensor.shape) != tuple(expected[name].shape):
                fail(f"rank {r}'s {name} has shape {tuple(tensor.shape)}, but its part of the MLP has shape "
                     f"{tuple(expected[name].shape)}.")
            if close(tensor, expected[name]):
                continue
            other = 1 - r
            if name != "proj.bias" and close(tensor, {"fc.weight": A[_rows(other, d_ff)], "fc.bias": a[_rows(other, d_ff)],
                                                      "proj.weight": B[:, _rows(other, d_ff)]}[name]):
                fail(f"rank {r} holds rank {other}'s part of {name}: take the range that belongs to rank {r}.")
            fail(f"rank {r}'s {name} is not its part of the whole MLP's {name}: copy the values of your range.")


def _mlp_expectations(mlp, x: torch.Tensor, dy: torch.Tensor) -> dict[str, object]:
    """In float64: the whole MLP's output and gradients, each rank's partial output and the gradient of the input
    through that rank alone, and the outputs the forward slips would give."""
    import torch.nn.functional as F

    A, a, B, b = (t.detach().double() for t in (mlp.fc.weight, mlp.fc.bias, mlp.proj.weight, mlp.proj.bias))
    d_ff = A.shape[0]
    X, dY = x.double(), dy.double()

    def partial(r: int, inp: torch.Tensor) -> torch.Tensor:
        rows = _rows(r, d_ff)
        return F.gelu(inp @ A[rows].T + a[rows]) @ B[:, rows].T

    whole = [t.clone().requires_grad_() for t in (X, A, a, B, b)]
    y = F.gelu(whole[0] @ whole[1].T + whole[2]) @ whole[3].T + whole[4]
    y.backward(dY)
    alone = []
    for r in range(_WORLD):
        xr = X.clone().requires_grad_()
        partial(r, xr).backward(dY)
        alone.append(xr.grad)
    total = sum(partial(r, X) for r in range(_WORLD))
    return dict(y=y.detach(), dx=whole[0].grad, dA=whole[1].grad, da=whole[2].grad, dB=whole[3].grad, db=whole[4].grad,
                dx_alone=alone, d_ff=d_ff,
                slips={"f all-reduced the input in its forward pass too (it is already whole on every rank, so it "
                       "doubled): f is the identity going forward": sum(partial(r, _WORLD * X) for r in range(_WORLD)) + b,
                       "the output is the mean of the ranks' partial outputs, not their sum (Z = Y₁B₁ + Y₂B₂): g sums, "
                       "without dividing": total / _WORLD + b,
                       f"proj's bias was added on every rank before g, so the sum counts it {_WORLD} times: add it once, "
                       f"after g": total + _WORLD * b},
                partials=[partial(r, X) + b for r in range(_WORLD)])


def _judge_output(y: torch.Tensor, want: dict, r: int) -> None:
    __tracebackhide__ = True
    expected = want["y"]
    if tuple(y.shape) != tuple(expected.shape):
        fail(f"rank {r}'s output has shape {tuple(y.shape)}, but the MLP's has shape {tuple(expected.shape)}.")
    if close(y, expected):
        return
    if close(y, want["partials"][r]):
        fail(f"rank {r}'s output is only its own partial output Y_r B_r (+ bias): g must all-reduce the partial "
             f"outputs in its forward pass.")
    for sentence, value in want["slips"].items():
        if close(y, value):
            fail(f"rank {r}'s output is wrong: {sentence}.")
    worst = (y.double() - expected).abs().max().item()
    fail(f"rank {r}'s output differs from the whole MLP's by up to {worst:.2g}.")


def _judge_gradients(got: dict[str, torch.Tensor], want: dict, r: int) -> None:
    __tracebackhide__ = True
    dx = got["x_grad"]
    rows = _rows(r, want["d_ff"])
    params = {"fc.weight": want["dA"][rows], "fc.bias": want["da"][rows], "proj.weight": want["dB"][:, rows],
              "proj.bias": want["db"]}
    if not close(dx, want["dx"]):
        if close(dx, want["dx_alone"][r]):
            fail(f"the gradient of the input on rank {r} is only the part that flowed through rank {r}: every rank "
                 f"used x, so f's backward must all-reduce (sum) the gradient.")
        if close(dx, _WORLD * want["dx"]) and close(got.get("grad.fc.weight", dx), _WORLD * params["fc.weight"]):
            fail(f"your gradients on rank {r} are {_WORLD} times too large: g all-reduced the output's gradient in its "
                 f"backward pass too, although every rank already holds it whole; g's backward is the identity.")
        if close(dx, want["dx"] / _WORLD):
            fail(f"the gradient of the input on rank {r} is the mean of the ranks' parts, not their sum: f's backward "
                 f"sums, without dividing.")
        fail(f"the gradient of the input on rank {r} differs from the whole MLP's by up to "
             f"{(dx.double() - want['dx']).abs().max().item():.2g}.")
    for name, expected in params.items():
        grad = got.get(f"grad.{name}")
        if grad is None:
            fail(f"rank {r}'s {name} got no gradient: it must take part in the forward pass (as a parameter).")
        if close(grad, expected):
            continue
        if close(grad, _WORLD * expected):
            fail(f"the gradient of {name} on rank {r} is {_WORLD} times too large: g's backward must pass the "
                 f"output's gradient through unchanged (the identity), not all-reduce it.")
        fail(f"the gradient of {name} on rank {r} differs from its part of the whole MLP's gradient by up to "
             f"{(grad.double() - expected).abs().max().item():.2g}.")


# ----------------------------------------------------------------------------------------------
# 11.2: GPipe's schedule, clock tick by clock tick
# ----------------------------------------------------------------------------------------------

register_hint(
    "11.2",
    "Give every forward and backward pass one clock tick. A stage can start F_k once the stage before it has "
    "finished F_k, and B_k once the stage after it has finished B_k; GPipe starts each pass as early as that "
    "allows, all forward passes first.",
    "Stage s runs F_k at tick s + k. The last stage starts its backward passes right after its last forward "
    "pass, at tick m + p − 1, and B_k reaches stage s one tick per stage later. Make a list of 2(m + p − 1) "
    "ticks, each a list of p entries (None where the stage is idle), and fill in the two kinds of pass.",
    "ticks[s + k][s] = ('F', k); ticks[m + p - 1 + (p - 1 - s) + k][s] = ('B', k)",
)


@exercise("11.2", points=2, forbid=("course_lib.distributed.pipeline:gpipe_schedule",
                                     "course_lib.distributed.pipeline:gpipe_timeline"))
def check_gpipe_schedule(fn: Callable[[int, int], list]) -> None:
    """Exercise 11.2: ``fn(p, m)`` returns GPipe's schedule, one clock tick per pass: a list of ticks, each a list
    of p entries ("F", k), ("B", k) or None: what each stage does at that tick."""
    __tracebackhide__ = True
    cases = [(2, 1), (2, 4), (3, 2), (1, 3), (4, 8), (4, 3)]
    idle = {}
    for p, m in cases:
        case = f"p = {p} stages, m = {m} micro-batches"
        ticks = _as_ticks(call_student(fn, p, m, case=case), p, m, case)
        used = _check_dependencies(ticks, p, m, case)
        idle[(p, m)] = 1 - 2 * m / used
        if used != 2 * (m + p - 1):
            fail(f"on {case} your schedule keeps every dependency but takes {used} ticks; GPipe needs 2(m + p − 1) = "
                 f"{2 * (m + p - 1)}, for an idle fraction of (p − 1)/(m + p − 1) = {(p - 1) / (m + p - 1):.3f} "
                 f"instead of your {idle[(p, m)]:.3f}: start every pass as soon as what it needs is done.")
    passed("check_gpipe_schedule", f"your schedule keeps every dependency, and with one tick per pass its idle fraction "
                                   f"is (p − 1)/(m + p − 1): {idle[(2, 1)]:.3f} at p = 2, m = 1, {idle[(2, 4)]:.3f} at "
                                   f"m = 4, {idle[(4, 8)]:.3f} at p = 4, m = 8.")


def _as_ticks(result: object, p: int, m: int, case: str) -> list[list[tuple[str, int] | None]]:
    """The student's schedule as a list of ticks of p entries each, after one sentence for a wrong format."""
    __tracebackhide__ = True
    import operator

    if not isinstance(result, (list, tuple)) or not result:
        fail(f"your function should return a list of clock ticks (each a list of p entries), but on {case} it "
             f"returns {type(result).__name__ if not isinstance(result, (list, tuple)) else 'an empty list'}.")
    ticks = []
    for t, tick in enumerate(result):
        if not isinstance(tick, (list, tuple)) or len(tick) != p:
            size = len(tick) if isinstance(tick, (list, tuple)) else type(tick).__name__
            transposed = " (one list per stage? schedule[t][s] is what stage s does at tick t)" if len(result) == p else ""
            fail(f"on {case} tick {t} should hold one entry per stage ({p}), but it holds {size}{transposed}.")
        entries = []
        for s, entry in enumerate(tick):
            if entry is None:
                entries.append(None)
                continue
            try:
                kind, k = entry
                k = operator.index(k)
            except (TypeError, ValueError):
                fail(f"on {case} tick {t}, stage {s} holds {entry!r}; an entry is ('F', k), ('B', k) or None.")
            if kind not in ("F", "B") or not 0 <= k < m:
                fail(f"on {case} tick {t}, stage {s} holds {entry!r}; an entry is ('F', k) or ('B', k) with "
                     f"k in 0 … {m - 1}, or None.")
            entries.append((kind, k))
        ticks.append(entries)
    return ticks


def _check_dependencies(ticks: list, p: int, m: int, case: str) -> int:
    """Refuse a schedule that runs a pass twice or never, before what it needs, not pipelined or not in GPipe's
    order; return how many ticks it uses (up to its last pass)."""
    __tracebackhide__ = True
    when: dict[tuple[int, str, int], int] = {}
    for t, tick in enumerate(ticks):
        for s, entry in enumerate(tick):
            if entry is not None:
                if (s, *entry) in when:
                    fail(f"on {case} stage {s} runs {entry[0]}{entry[1]} twice (ticks {when[(s, *entry)]} and {t}).")
                when[(s, *entry)] = t
    for s in range(p):
        for kind in ("F", "B"):
            for k in range(m):
                if (s, kind, k) not in when:
                    fail(f"on {case} stage {s} never runs {kind}{k}: every stage runs the forward and the backward "
                         f"pass of every micro-batch once.")
    for s in range(p):
        for k in range(m):
            f_at, b_at = when[(s, "F", k)], when[(s, "B", k)]
            if s and f_at <= when[(s - 1, "F", k)]:
                fail(f"on {case} stage {s} runs F{k} at tick {f_at}, but stage {s - 1} runs F{k} at tick "
                     f"{when[(s - 1, 'F', k)]}: a stage needs the previous stage's output, one tick later at the earliest.")
            if b_at <= f_at:
                fail(f"on {case} stage {s} runs B{k} at tick {b_at}, before its own forward pass F{k} (tick {f_at}) "
                     f"is done.")
            if s < p - 1 and b_at <= when[(s + 1, "B", k)]:
                fail(f"on {case} stage {s} runs B{k} at tick {b_at}, but stage {s + 1} runs B{k} at tick "
                     f"{when[(s + 1, 'B', k)]}: the backward pass flows from the last stage to the first, one tick "
                     f"per stage.")
    if p > 1 and m > 1 and all(sum(e is not None for e in tick) <= 1 for tick in ticks):
        fail(f"on {case} only one stage works at any tick: you run each micro-batch through the whole pipeline "
             f"before the next; in GPipe stage s works on micro-batch k + 1 while stage s + 1 works on k.")
    for s in range(p):
        last_f = max(when[(s, "F", k)] for k in range(m))
        first_b = min(when[(s, "B", k)] for k in range(m))
        if first_b < last_f:
            fail(f"on {case} stage {s} starts a backward pass (tick {first_b}) before its last forward pass (tick "
                 f"{last_f}): that interleaving is 1F1B (Narayanan et al. 2021); GPipe runs all m forward passes, "
                 f"then all m backward passes.")
    return 1 + max(when.values())


# ----------------------------------------------------------------------------------------------
# 11.4: one rank's rows of the fused QKV matrix, split by heads
# ----------------------------------------------------------------------------------------------

register_hint(
    "11.4",
    "The fused matrix is three (d × d) matrices on top of each other: W_q, then W_k, then W_v. A rank owns "
    "whole heads, and a head needs its rows in all three.",
    "With d_head = d / n_head and H/W heads per rank, rank r's heads occupy rows r·w … (r+1)·w − 1 of each "
    "of the three blocks, where w = d_head · n_head / world. Collect those three row ranges (offsets 0, d "
    "and 2d) and index dim 0, which works for the (3d × d) weight and the (3d,) bias alike.",
    "rows = torch.cat([torch.arange(rank * w, (rank + 1) * w) + j * d for j in range(3)]); return t[rows]",
)


def _reference_qkv(t: torch.Tensor, n_head: int, rank: int, world: int) -> torch.Tensor:
    from course_lib.distributed.tensor_parallel import shard_qkv

    return shard_qkv(t, n_head, rank, world)


def _interleaved(t: torch.Tensor, n_head: int, rank: int, world: int) -> torch.Tensor:
    d = t.shape[0] // 3
    d_head = d // n_head
    heads = range(rank, n_head, world)
    rows = torch.cat([torch.arange(h * d_head, (h + 1) * d_head) + j * d for j in range(3) for h in heads])
    return t[rows]


@exercise("11.4", points=1, forbid=(
    "course_lib.distributed.tensor_parallel:shard_qkv",
    "course_lib.distributed.tensor_parallel:head_rows",
    "course_lib.distributed.tensor_parallel:shard_of",
    "course_lib.distributed.tensor_parallel:shard_block",
))
def check_shard_qkv(fn: Callable[[torch.Tensor, int, int, int], torch.Tensor]) -> None:
    """Exercise 11.4: ``fn(t, n_head, rank, world)`` returns rank ``rank``'s rows of a fused QKV weight
    (3d × d) or bias (3d,): its heads' rows of W_q, then of W_k, then of W_v (heads r·H/W … (r+1)·H/W − 1)."""
    __tracebackhide__ = True
    generator = torch.Generator().manual_seed(11)
    cases = [((24, 8), 4, 2, torch.float32), ((24,), 4, 2, torch.float32), ((48, 16), 8, 4, torch.float64),
             ((36, 12), 6, 3, torch.float32), ((24, 8), 4, 1, torch.float32), ((48,), 4, 4, torch.bfloat16),
             ((24, 8), 4, 4, torch.float32)]
    for shape, n_head, world, dtype in cases:
        full = torch.randn(shape, generator=generator).to(dtype)
        for rank in range(world):
            kind = "weight" if len(shape) == 2 else "bias"
            case = f"a {kind} of shape {shape} ({dtype}), n_head={n_head}, rank {rank} of {world}"
            given = full.clone()
            result = call_student(fn, given, n_head, rank, world, case=case)
            if not torch.equal(given, full):
                fail(f"your function changed the tensor it was given (on {case}); index it instead of writing "
                     f"into it.")
            require_tensor(result, f"your shard on {case}")
            expected = _reference_qkv(full, n_head, rank, world)
            if result.dtype != full.dtype:
                fail(f"your shard has dtype {result.dtype} on {case}, but the input has {full.dtype}: keep it.")
            if result.shape != expected.shape:
                d = shape[0] // 3
                if len(shape) == 2 and tuple(result.shape) == (shape[0], shape[1] // world):
                    fail(f"your shard has shape {tuple(result.shape)} on {case}: you split the columns (the input "
                         f"dimension d); a head lives in rows of the (3d × d) matrix, so split dim 0.")
                if result.shape[0] == d // world:
                    fail(f"your shard has {result.shape[0]} rows on {case}, the rows of W_q only: a rank also needs "
                         f"its heads' rows of W_k and of W_v, 3·d/W rows in all.")
                fail(f"your shard has shape {tuple(result.shape)} on {case}, but it should have shape "
                     f"{tuple(expected.shape)}: 3·d/W rows (the rank's heads in W_q, W_k and W_v).")
            if close(result, expected, atol=0, rtol=0):
                continue
            if close(result, full.chunk(world, dim=0)[rank], atol=0, rtol=0):
                fail(f"on {case} you cut the fused matrix into {world} contiguous pieces: rank 0 then holds all of "
                     f"W_q and none of W_v. Take the rank's heads from each of W_q, W_k and W_v.")
            if close(result, _interleaved(full, n_head, rank, world), atol=0, rtol=0):
                fail(f"on {case} you gave rank {rank} every {world}-th head; Megatron gives each rank a contiguous "
                     f"block of heads, r·H/W … (r+1)·H/W − 1, to match W_o's contiguous columns.")
            for other in range(world):
                if other != rank and close(result, _reference_qkv(full, n_head, other, world), atol=0, rtol=0):
                    fail(f"on {case} you returned the heads of rank {other}, not of rank {rank}.")
            fail(f"your shard differs from rank {rank}'s rows of W_q, W_k and W_v on {case}.")
    passed("check_shard_qkv", f"every rank gets its own heads' rows of W_q, W_k and W_v, for weights and biases, "
                              f"{len(cases)} layouts from 1 to 4 ranks.")


# ----------------------------------------------------------------------------------------------
# 11.5: the idle fraction of a GPipe schedule with unequal stages
# ----------------------------------------------------------------------------------------------

register_hint(
    "11.5",
    "Simulate the schedule: each stage does one thing at a time, a forward pass of micro-batch k on stage s "
    "needs the same micro-batch's forward on stage s − 1, a backward pass needs the same micro-batch's "
    "backward on stage s + 1. The idle fraction is 1 − busy / (p × total time).",
    "Keep `free[s]`, the time stage s is next free, and the finish time of every (stage, micro-batch). Forward "
    "phase: for k in 0..m−1, for s in 0..p−1: start = max(free[s], finish_F[s−1][k]). Backward phase: for k "
    "in 0..m−1, for s from p−1 down to 0: start = max(free[s], finish_B[s+1][k]). The total time is the "
    "largest finish time; busy = m · Σ_s (t_F[s] + t_B[s]).",
    "return 1 - m * sum(f + b for f, b in zip(t_forward, t_backward)) / (p * max(free))",
)


def _idle(t_forward: list[float], t_backward: list[float], m: int) -> float:
    from course_lib.distributed.pipeline import gpipe_timeline, idle_fraction

    return idle_fraction(gpipe_timeline(t_forward, t_backward, m))


def _makespan(t_forward: list[float], t_backward: list[float], m: int) -> float:
    from course_lib.distributed.pipeline import gpipe_timeline

    return max(event[3] for stage in gpipe_timeline(t_forward, t_backward, m) for event in stage)


@exercise("11.5", points=2, forbid=(
    "course_lib.distributed.pipeline:gpipe_timeline",
    "course_lib.distributed.pipeline:idle_fraction",
    "course_lib.distributed.pipeline:bubble_fraction",
    "course_lib.distributed.pipeline:measured_idle_fraction",
))
def check_gpipe_idle_fraction(fn: Callable[[list[float], list[float], int], float]) -> None:
    """Exercise 11.5: ``fn(t_forward, t_backward, m)`` returns the idle fraction of GPipe's schedule for stages
    with these forward and backward times per micro-batch (lists, one entry per stage), ``m`` micro-batches."""
    __tracebackhide__ = True
    cases = [([1.0, 1.0], [2.0, 2.0], 1), ([1.0, 1.0], [2.0, 2.0], 4), ([1.0] * 4, [2.0] * 4, 8), ([2.0], [4.0], 3),
             ([1.0, 3.0], [2.0, 6.0], 4), ([3.0, 1.0, 2.0], [5.0, 2.0, 4.0], 5), ([0.5, 0.5, 0.5], [1.0, 1.0, 3.0], 2),
             ([3.0, 1.0], [1.0, 4.0], 3), ([3.0, 1.0], [1.0, 3.0], 4)]   # slowest forward stage != slowest backward
    for t_f, t_b, m in cases:
        p = len(t_f)
        case = f"t_forward={t_f}, t_backward={t_b}, m={m}"
        answer = call_student(fn, list(t_f), list(t_b), m, case=case)
        result = as_number(answer)
        if result is None:
            fail(f"your function should return one number (the idle fraction), but on {case} it returns a "
                 f"{type(answer).__name__}.")
        expected = _idle(t_f, t_b, m)
        if math.isclose(result, expected, rel_tol=1e-6, abs_tol=1e-9):
            continue
        busy = m * sum(f + b for f, b in zip(t_f, t_b))
        slowest = max(f + b for f, b in zip(t_f, t_b))
        wrong = {
            "you returned a percentage; return a fraction between 0 and 1": 100 * expected,
            "you returned the busy fraction; the idle fraction is 1 minus it": 1 - expected,
            "you used (p − 1)/(m + p − 1), which assumes equal stages; with these times simulate the schedule":
                (p - 1) / (m + p - 1),
            "you returned (p − 1)/m, the bubble time over the useful time; the idle fraction divides by the total "
            "time of all stages": (p - 1) / m,
            "you took the total time as Σt_F + Σt_B + (m − 1)·max(t_F + t_B), which holds only when the slowest "
            "forward stage is also the slowest backward stage; simulate the schedule's start and finish times":
                1 - busy / (p * (sum(t_f) + sum(t_b) + (m - 1) * slowest)),
            "you assumed every stage takes as long as the slowest; simulate the actual start and finish times":
                1 - busy / (p * (m + p - 1) * slowest),
            "you left out the backward passes (they take t_backward and run after all forwards)":
                _idle(t_f, [0.0] * p, m),
            "you ran each micro-batch through the whole pipeline before starting the next; in GPipe stage s works "
            "on micro-batch k + 1 while stage s + 1 works on k": 1 - busy / (p * m * sum(f + b for f, b in zip(t_f, t_b))),
            "you divided by the total time once; divide by p × the total time (every stage can be idle)":
                1 - busy / _makespan(t_f, t_b, m),
        }
        for sentence, value in wrong.items():
            if not math.isclose(value, expected, rel_tol=1e-6) and math.isclose(result, value, rel_tol=1e-6):
                fail(f"your idle fraction is wrong on {case}: {sentence}.")
        fail(f"your idle fraction on {case} is {result:.4g}, but it should be {expected:.4g}.")
    passed("check_gpipe_idle_fraction", f"your schedule gives the idle fraction on {len(cases)} pipelines, with "
                                        f"equal stages ((p − 1)/(m + p − 1)) and unequal ones.")


# ----------------------------------------------------------------------------------------------
# 11.3: activation memory per layer (Korthikanti et al. 2022)
# ----------------------------------------------------------------------------------------------

register_hint(
    "11.3",
    "Count in units of s·b·h bytes (16-bit values). Without parallelism a layer keeps 34·sbh plus the attention "
    "scores' 5·as²b. Tensor parallelism splits what lives inside the split matrices and heads; sequence "
    "parallelism splits the rest.",
    "Of the 34: 24 sit inside the split parts (divided by t), 10 do not (LayerNorm inputs, dropout masks, the "
    "inputs of the first matrices) unless sequence parallelism splits them too. The attention term 5as/h "
    "is per head, so it is divided by t as well.",
    "return s * b * h * ((34 / t if sequence_parallel else 10 + 24 / t) + 5 * a * s / (h * t))",
)


@exercise("11.3", points=1, forbid=("course_lib.distributed.activation_memory:korthikanti_bytes",))
def check_activation_bytes(fn: Callable[..., float]) -> None:
    """Exercise 11.3: ``fn(s, b, h, a, t=1, sequence_parallel=False)`` returns the activation bytes per layer of
    Korthikanti et al. 2022 (Eqs. 1, 2 and 4), 16-bit values and 1-byte dropout masks."""
    __tracebackhide__ = True
    from course_lib.distributed.activation_memory import korthikanti_bytes

    cases = [((2048, 1, 12288, 96), {}), ((2048, 1, 12288, 96), dict(t=8)),
             ((2048, 1, 12288, 96), dict(t=8, sequence_parallel=True)), ((128, 4, 64, 4), {}),
             ((512, 2, 1024, 16), dict(t=4)), ((512, 2, 1024, 16), dict(t=4, sequence_parallel=True)),
             ((64, 8, 256, 8), dict(t=1, sequence_parallel=True)), ((1024, 3, 768, 12), dict(t=2))]

    def formula(s, b, h, a, t=1, sp=False, *, linear=None, core=None, unit=1.0):
        lin = (34 / t if sp else 10 + 24 / t) if linear is None else linear
        att = 5 * a * s / (h * t) if core is None else core
        return unit * s * b * h * (lin + att)

    for (s, b, h, a), kw in cases:
        t, sp = kw.get("t", 1), kw.get("sequence_parallel", False)
        args = ", ".join([f"s={s}, b={b}, h={h}, a={a}"] + [f"{k}={v}" for k, v in kw.items()])
        case = f"({args})"
        answer = call_student(fn, s, b, h, a, **kw, case=case)
        result = as_number(answer)
        if result is None:
            fail(f"your function should return one number (bytes), but on {case} it returns a "
                 f"{type(answer).__name__}.")
        expected = korthikanti_bytes(s, b, h, a, t=t, sequence_parallel=sp)
        if math.isclose(float(result), expected, rel_tol=1e-6):
            continue
        wrong = {
            "called with only s, b, h, a your function should assume no parallelism (t = 1, no sequence "
            "parallelism): check the defaults": None,
            "you left out the attention scores' term 5·a·s/h (softmax output, its dropout mask and the dropped-out "
            "weights, a·s² values each per sequence)": formula(s, b, h, a, t, sp, core=0.0),
            "you counted 4 bytes per value; the formula is for 16-bit activations (2 bytes) and 1-byte masks":
                2 * expected,
            "you returned bits, not bytes": 8 * expected,
            "without sequence parallelism the LayerNorm inputs, the dropout masks and the inputs of the first "
            "matrices (10·sbh) stay whole on every rank: 10 + 24/t": formula(s, b, h, a, t, True),
            "with sequence parallelism the remaining 10·sbh are split over the t ranks too: 34/t":
                formula(s, b, h, a, t, False),
            "tensor parallelism splits the heads, so the attention term 5·a·s/h is divided by t too":
                formula(s, b, h, a, t, sp, core=5 * a * s / h),
            "the attention term is 5·a·s/h (heads a times sequence length s over hidden size h)":
                formula(s, b, h, a, t, sp, core=5 * h * s / (a * t)),
            "you forgot the batch size b": expected / b,
        }
        for sentence, value in wrong.items():
            if value is not None and value != expected and math.isclose(float(result), value, rel_tol=1e-6):
                fail(f"your activation bytes are wrong on {case}: {sentence}.")
        if not kw:
            other_defaults = [korthikanti_bytes(s, b, h, a, t=tt, sequence_parallel=spp)
                              for tt in (2, 4, 8) for spp in (False, True)]
            if any(math.isclose(float(result), v, rel_tol=1e-6) for v in other_defaults):
                fail(f"your activation bytes are wrong on {case}: {next(iter(wrong))}.")
        fail(f"your activation bytes on {case} are {float(result):.6g}, but they should be {expected:.6g}.")
    passed("check_activation_bytes", f"your count matches Korthikanti et al.'s Eqs. 1, 2 and 4 on {len(cases)} "
                                     f"layers, GPT-3's shape (s 2048, h 12288, 96 heads, t = 8) among them.")
