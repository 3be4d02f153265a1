"""Checks of notebooks/11_model_parallelism.ipynb (exercises 11.*), with their hints."""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real

import torch

from course_lib.checks.framework import (
    exercise, call_student, close, fail, passed, register_hint, require_tensor,
)

# ----------------------------------------------------------------------------------------------
# 11.1: one rank's rows of the fused QKV matrix, split by heads
# ----------------------------------------------------------------------------------------------

register_hint(
    "11.1",
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


@exercise("11.1", points=1, forbid=(
    "course_lib.distributed.tensor_parallel:shard_qkv",
    "course_lib.distributed.tensor_parallel:head_rows",
    "course_lib.distributed.tensor_parallel:shard_of",
    "course_lib.distributed.tensor_parallel:shard_block",
))
def check_shard_qkv(fn: Callable[[torch.Tensor, int, int, int], torch.Tensor]) -> None:
    """Exercise 11.1: ``fn(t, n_head, rank, world)`` returns rank ``rank``'s rows of a fused QKV weight
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
# 11.2: the idle fraction of a GPipe schedule with unequal stages
# ----------------------------------------------------------------------------------------------

register_hint(
    "11.2",
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


@exercise("11.2", points=2, forbid=(
    "course_lib.distributed.pipeline:gpipe_timeline",
    "course_lib.distributed.pipeline:idle_fraction",
    "course_lib.distributed.pipeline:bubble_fraction",
    "course_lib.distributed.pipeline:measured_idle_fraction",
))
def check_gpipe_idle_fraction(fn: Callable[[list[float], list[float], int], float]) -> None:
    """Exercise 11.2: ``fn(t_forward, t_backward, m)`` returns the idle fraction of GPipe's schedule for stages
    with these forward and backward times per micro-batch (lists, one entry per stage), ``m`` micro-batches."""
    __tracebackhide__ = True
    cases = [([1.0, 1.0], [2.0, 2.0], 1), ([1.0, 1.0], [2.0, 2.0], 4), ([1.0] * 4, [2.0] * 4, 8), ([2.0], [4.0], 3),
             ([1.0, 3.0], [2.0, 6.0], 4), ([3.0, 1.0, 2.0], [5.0, 2.0, 4.0], 5), ([0.5, 0.5, 0.5], [1.0, 1.0, 3.0], 2)]
    for t_f, t_b, m in cases:
        p = len(t_f)
        case = f"t_forward={t_f}, t_backward={t_b}, m={m}"
        result = call_student(fn, list(t_f), list(t_b), m, case=case)
        if isinstance(result, torch.Tensor) and result.numel() == 1:
            result = result.item()
        if isinstance(result, bool) or not isinstance(result, Real):
            fail(f"your function should return one number (the idle fraction), but on {case} it returns a "
                 f"{type(result).__name__}.")
        result = float(result)
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
        result = call_student(fn, s, b, h, a, **kw, case=case)
        if isinstance(result, torch.Tensor) and result.numel() == 1:
            result = result.item()
        if isinstance(result, bool) or not isinstance(result, Real):
            fail(f"your function should return one number (bytes), but on {case} it returns a "
                 f"{type(result).__name__}.")
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
