"""Checks of notebooks/10_scaling_out.ipynb (exercises 10.*), with their hints."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from numbers import Real
from typing import Any

import torch

from course_lib.checks.framework import (
    StudentCodeError, exercise, register_hint, fail, call_student, passed,
)


def as_number(value: Any) -> float | None:
    """``value`` as a float when it is one number: a Python or NumPy scalar, a 0-d array, a one-element tensor;
    None otherwise (a bool is not a number here)."""
    if isinstance(value, torch.Tensor):
        return float(value.item()) if value.numel() == 1 else None
    if hasattr(value, "shape") and hasattr(value, "item") and getattr(value, "size", 0) == 1:   # NumPy 0-d arrays
        value = value.item()
    if isinstance(value, bool) or type(value).__name__ == "bool_" or not isinstance(value, Real):
        return None
    return float(value)


# ----------------------------------------------------------------------------------------------
# ---- 10_scaling_out: memory per GPU with mixed-precision Adam and ZeRO stages 0-3
# ----------------------------------------------------------------------------------------------

register_hint(
    "10.3",
    "Count bytes per parameter for each of the three kinds of memory (weights, gradients, optimiser state) in "
    "mixed precision, then ask which of them each ZeRO stage divides among the GPUs.",
    "Per parameter: 2 bytes of bf16 weights, 2 of bf16 gradients, 12 of Adam state (fp32 master copy + two "
    "moments). Stage 1 divides the 12 by n_gpus, stage 2 also the gradients' 2, stage 3 also the weights' 2. "
    "Return gigabytes: bytes / 1e9.",
    "return n_params * (2 / (n_gpus if zero_stage >= 3 else 1) + 2 / (n_gpus if zero_stage >= 2 else 1) "
    "+ 12 / (n_gpus if zero_stage >= 1 else 1)) / 1e9",
)


@exercise("10.3", points=1, forbid=(
    "course_lib.distributed.ddp:memory_per_gpu",
    "course_lib.distributed.ddp:gpus_needed",
    "course_lib.distributed.sharded:zero_bytes",
    "course_lib.distributed.sharded:state_bytes",
))
def check_zero_memory(fn: Callable[[float, int, int], float]) -> None:
    """Exercise 10.3: ``fn(n_params, n_gpus, zero_stage)`` returns the GB (1e9 bytes) per GPU of bf16 weights,
    bf16 gradients and fp32 Adam states (Rajbhandari et al. 2020, Sec. 3.1 and 5), stage 0 = plain DDP."""
    __tracebackhide__ = True
    import math

    from course_lib.distributed.ddp import memory_per_gpu

    cases = [(7.5e9, 64, 0), (7.5e9, 64, 1), (7.5e9, 64, 2), (7.5e9, 64, 3), (135e6, 1, 0), (1e9, 4, 1),
             (1e9, 4, 2), (70e9, 16, 3), (13e9, 8, 2)]

    def with_bytes(n: float, N: int, stage: int, w: float, g: float, k: float) -> float:
        return n * (w / (N if stage >= 3 else 1) + g / (N if stage >= 2 else 1) + k / (N if stage >= 1 else 1)) / 1e9

    for n, N, stage in cases:
        case = f"n_params={n:.3g}, n_gpus={N}, zero_stage={stage}"
        answer = call_student(fn, n, N, stage, case=case)
        result = as_number(answer)
        if result is None:
            fail(f"your function should return one number (gigabytes per GPU), but on {case} it returns a "
                 f"{type(answer).__name__}.")
        expected = memory_per_gpu(n, data=N, zero_stage=stage)["total"]
        if math.isclose(result, expected, rel_tol=1e-6):
            continue
        wrong = {
            "you returned bytes; divide by 1e9 to get gigabytes": expected * 1e9,
            "you returned GiB (2**30 bytes); the course and the ZeRO paper use GB = 1e9 bytes":
                expected * 1e9 / 2**30,
            "you did not shard anything: ZeRO stage 1 divides the optimiser states by n_gpus, stage 2 also the "
            "gradients, stage 3 also the weights": 16 * n / 1e9,
            "you divided all 16 bytes by n_gpus at every stage; only stage 3 shards the weights (stage 1: "
            "optimiser states, stage 2: + gradients)": 16 * n / N / 1e9,
            "you shard one kind of memory too many: stage 1 shards only the optimiser states, stage 2 adds the "
            "gradients, stage 3 the weights": with_bytes(n, N, stage + 1, 2, 2, 12),
            "you counted 8 bytes of Adam state; with mixed precision it also keeps an fp32 master copy of the "
            "weights: 4 + 4 + 4 = 12 bytes": with_bytes(n, N, stage, 2, 2, 8),
            "you counted fp32 weights and gradients (4 bytes each); in mixed precision they are bf16, 2 bytes "
            "each, and the fp32 copy lives in the 12 bytes of optimiser state": with_bytes(n, N, stage, 4, 4, 12),
            "you left out the gradients (2 bytes per parameter)": with_bytes(n, N, stage, 2, 0, 12),
        }
        for sentence, value in wrong.items():
            if value != expected and math.isclose(result, value, rel_tol=1e-6):
                fail(f"your memory per GPU is wrong on {case}: {sentence}.")
        fail(f"your memory per GPU on {case} is {result:.4g} GB, but it should be {expected:.4g} GB.")
    passed("check_zero_memory", f"your formula gives the memory per GPU on {len(cases)} cases, ZeRO's Fig. 1 "
                                f"(7.5B parameters on 64 GPUs: 120, 31.4, 16.6, 1.9 GB) among them.")


# ----------------------------------------------------------------------------------------------
# ---- 10_scaling_out: a ring all-reduce on simulated ranks
# ----------------------------------------------------------------------------------------------

register_hint(
    "10.1",
    "Cut every rank's tensor into W chunks. In W − 1 steps of reduce-scatter each rank passes one partial sum "
    "to its right-hand neighbour, which adds its own chunk; afterwards rank r holds the full sum of one chunk. "
    "W − 1 steps of all-gather then pass the finished chunks around the ring.",
    "Work on flat copies (t.flatten().clone()) cut with torch.tensor_split(x, W), which allows unequal pieces. "
    "Reduce-scatter step j: rank r sends chunk (r − j) mod W to rank (r + 1) mod W, which adds it to its own "
    "copy of that chunk. All-gather step j: rank r sends chunk (r + 1 − j) mod W, and the receiver overwrites "
    "its copy. Finally reshape each rank's chunks back to the input's shape.",
    "chunks[(r + 1) % W][c] += send(r, (r + 1) % W, chunks[r][c])   # c = (r - j) % W, for every rank r",
)


class _Ring:
    """The network the check gives the student: ``send(src, dst, tensor)`` returns dst's copy and logs it.

    ``zeros=True`` delivers zeros instead: an answer whose result does not change then never used the network."""

    def __init__(self, zeros: bool = False) -> None:
        self.log: list[tuple[int, int, int]] = []
        self.zeros = zeros

    def send(self, src: int, dst: int, tensor: torch.Tensor) -> torch.Tensor:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"send(src, dst, tensor) expects a tensor, got a {type(tensor).__name__}")
        self.log.append((int(src), int(dst), tensor.numel()))
        return torch.zeros_like(tensor) if self.zeros else tensor.detach().clone()


@exercise("10.1", points=2, forbid=("course_lib.distributed.ddp:ring_all_reduce",))
def check_ring_all_reduce(fn: Callable[[list, Callable], list]) -> None:
    """Exercise 10.1: ``fn(grads, send)`` takes one tensor per rank and returns one tensor per rank, each the sum
    of all of them, computed as a ring all-reduce: rank r may only ``send(r, neighbour, tensor)``."""
    __tracebackhide__ = True
    from course_lib.checks.framework import close, require_tensor

    generator = torch.Generator().manual_seed(10)
    cases = [(2, (8,), torch.float32), (4, (12,), torch.float32), (3, (10,), torch.float64), (4, (4, 5), torch.float32),
             (5, (23,), torch.float64), (1, (6,), torch.float32), (4, (6,), torch.float32)]
    traffic = []
    for W, shape, dtype in cases:
        grads = [torch.randn(shape, generator=generator).to(dtype) for _ in range(W)]
        originals = [g.clone() for g in grads]
        ring = _Ring()
        case = f"{W} rank(s) holding tensors of shape {shape} ({dtype})"
        n = originals[0].numel()
        result = _call_ring(fn, grads, ring, case, n, W)
        expected = torch.stack([g.double() for g in originals]).sum(0)
        if not all(torch.equal(g, o) for g, o in zip(grads, originals)):
            fail(f"your function changed the input tensors (on {case}); work on copies, the ranks' gradients "
                 f"must stay as they were.")
        if not isinstance(result, (list, tuple)) or len(result) != W:
            fail(f"your function should return a list with one tensor per rank ({W} on {case}), but it returns "
                 f"{type(result).__name__}{f' of length {len(result)}' if isinstance(result, (list, tuple)) else ''}.")
        for r, out in enumerate(result):
            require_tensor(out, f"rank {r}'s result on {case}")
            if out.shape != originals[0].shape:
                fail(f"rank {r}'s result has shape {tuple(out.shape)} on {case}, but the input has shape {shape}: "
                     f"reshape the chunks back.")
            if out.dtype != dtype:
                fail(f"rank {r}'s result has dtype {out.dtype} on {case}, but the inputs have {dtype}.")
        if W > 1 and len({out.untyped_storage().data_ptr() for out in result}) < W:
            fail(f"on {case} several ranks share one result tensor; on real machines every rank holds its own "
                 f"copy: give each rank its own tensor.")
        for r, out in enumerate(result):
            if close(out, expected, atol=1e-5, rtol=1e-5):
                continue
            if close(out, expected / W, atol=1e-5, rtol=1e-5):
                fail(f"you averaged on {case}: an all-reduce sums (DDP divides by W itself, afterwards).")
            right = torch.isclose(out.double().flatten(), expected.flatten(), atol=1e-5, rtol=1e-5)
            if n % W and right[: W * (n // W)].all():
                fail(f"on {case} the last numbers of the tensor were never reduced: with {n} numbers on {W} ranks the "
                     f"chunks are unequal; cut with torch.tensor_split, which keeps every number.")
            if right.any():
                fail(f"on {case} rank {r} holds the full sum in only part of its tensor: after the reduce-scatter "
                     f"each rank has finished one chunk; the all-gather must pass the finished chunks around.")
            fail(f"rank {r}'s result on {case} is not the sum of the ranks' tensors.")
        if W > 1:
            traffic.append((W, n, case, ring.log))
        if W > 1 and ring.log:   # it used the network; did its result come from what it received?
            unheard = _call_ring(fn, [g.clone() for g in originals], _Ring(zeros=True), case, n, W)
            if isinstance(unheard, (list, tuple)) and all(isinstance(o, torch.Tensor) and close(o, expected)
                                                          for o in unheard):
                fail(f"on {case} every rank still ends with the full sum when the network delivers only zeros: your "
                     f"ranks read the other ranks' tensors directly; a rank may learn them only through what send "
                     f"returns.")
    _judge_traffic(traffic)
    passed("check_ring_all_reduce", "every rank ends with the sum, and each sent 2(W − 1) chunks to its neighbour "
                                    "only: 2(W − 1)/W of the tensor, whatever the number of ranks.")


def _judge_traffic(traffic: list[tuple[int, int, str, list[tuple[int, int, int]]]]) -> None:
    """The ring's messages on every case (W, n, case, log of (src, dst, numbers)): only to the neighbour, one way
    round, 2(W − 1) chunks per rank."""
    __tracebackhide__ = True
    for W, n, case, log in sorted(traffic, key=lambda item: -item[0]):  # the most ranks show the most
        if not log:
            fail(f"you never called send on {case}: in a ring all-reduce each rank only learns the others' numbers "
                 f"through what its neighbour sends.")
        off_ring = [(s, d) for s, d, _ in log if d not in ((s + 1) % W, (s - 1) % W)]
        if off_ring:
            fail(f"on {case} rank {off_ring[0][0]} sent to rank {off_ring[0][1]}: in a ring every rank sends only "
                 f"to its neighbour, rank (r + 1) mod W.")
        if not (all(d == (s + 1) % W for s, d, _ in log) or all(d == (s - 1) % W for s, d, _ in log)):
            fail(f"on {case} your ranks sent in both directions; a ring passes the chunks one way round, always "
                 f"to rank (r + 1) mod W.")
        sent = sum(k for _, _, k in log)
        if W > 2 and sent >= (W - 1) * W * n:
            fail(f"on {case} each rank sent its whole tensor around the ring ({sent // W} numbers per rank); a "
                 f"ring all-reduce sends chunks of n/W numbers, 2(W − 1)/W · n per rank.")
        if sent != 2 * (W - 1) * n or any(sum(1 for s, _, _ in log if s == r) != 2 * (W - 1) for r in range(W)):
            fail(f"on {case} the ranks sent {sent} numbers in {len(log)} messages; a ring all-reduce takes "
                 f"2(W − 1) steps with one chunk per rank and step: {2 * (W - 1) * n} numbers in "
                 f"{2 * (W - 1) * W} messages.")


def _call_ring(fn: Callable, grads: list, ring: _Ring, case: str, n: int, W: int) -> Any:
    """The student's ring on one case; an IndexError where torch.chunk would cut fewer than W pieces is named."""
    __tracebackhide__ = True
    try:
        return call_student(fn, grads, ring.send, case=case, passthrough=(IndexError,))
    except IndexError as error:
        pieces = len(torch.empty(n).chunk(W))
        if pieces < W:
            fail(f"your function raised IndexError on {case}: torch.chunk cuts {n} numbers into only {pieces} pieces "
                 f"there, fewer than the {W} ranks; cut with torch.tensor_split, which always gives {W}.")
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise StudentCodeError(f"{getattr(fn, '__name__', 'your function')} raised IndexError on {case}"
                               + (f": {first[:200]}" if first else ".")) from None


# ----------------------------------------------------------------------------------------------
# ---- 10_scaling_out: the time of a ring all-reduce, latency and bandwidth
# ----------------------------------------------------------------------------------------------

register_hint(
    "10.4",
    "Count the steps and the bytes of the ring: every step pays the latency α once, and every byte a rank "
    "sends costs 1/β seconds.",
    "A ring all-reduce has 2(W − 1) steps (reduce-scatter, then all-gather), and in each a rank sends one chunk "
    "of n/W bytes. Add the two costs; with W = 1 there is nothing to send.",
    "return 2 * (world - 1) * alpha + 2 * (world - 1) / world * n_bytes / beta",
)


@exercise("10.4", points=1)
def check_all_reduce_time(fn: Callable[[float, int, float, float], float]) -> None:
    """Exercise 10.4: ``fn(n_bytes, world, alpha, beta)`` returns the seconds of a ring all-reduce of ``n_bytes``
    over ``world`` ranks, with latency ``alpha`` seconds per message and bandwidth ``beta`` bytes per second."""
    __tracebackhide__ = True
    import math

    cases = [(1e6, 2, 1e-5, 1e10), (1e6, 8, 1e-5, 1e10), (4e9, 64, 5e-6, 5e10), (1024, 4, 2e-5, 1e9),
             (2.5e8, 1, 1e-5, 1e10), (3e7, 3, 0.0, 2e10), (1e3, 16, 1e-4, 1e11)]
    for n, W, alpha, beta in cases:
        case = f"n_bytes={n:g}, world={W}, alpha={alpha:g} s, beta={beta:g} B/s"
        answer = call_student(fn, n, W, alpha, beta, case=case)
        result = as_number(answer)
        if result is None:
            fail(f"your function should return one number (seconds), but on {case} it returns a "
                 f"{type(answer).__name__}.")
        expected = 2 * (W - 1) * alpha + 2 * (W - 1) / W * n / beta
        if math.isclose(result, expected, rel_tol=1e-6, abs_tol=1e-15):
            continue
        wrong = {
            "you returned milliseconds; return seconds": 1e3 * expected,
            "you counted only the reduce-scatter half; the all-gather takes as many steps and bytes again":
                (W - 1) * alpha + (W - 1) / W * n / beta,
            "each rank sends 2(W − 1)/W · n bytes, not n": 2 * (W - 1) * alpha + n / beta,
            "that is every rank sending its whole tensor to each other rank; a ring sends chunks of n/W":
                2 * (W - 1) * alpha + (W - 1) * n / beta,
            "the ring takes 2(W − 1) steps and pays the latency α in each": 2 * alpha + 2 * (W - 1) / W * n / beta,
            "β is a bandwidth in bytes per second: divide the bytes by it": 2 * (W - 1) * alpha + 2 * (W - 1) / W * n * beta,
            "n_bytes is already in bytes; do not convert to bits": 2 * (W - 1) * alpha + 2 * (W - 1) / W * 8 * n / beta,
            "you left out the latency term 2(W − 1)·α": 2 * (W - 1) / W * n / beta,
        }
        for sentence, value in wrong.items():
            if not math.isclose(value, expected, rel_tol=1e-6) and math.isclose(result, value, rel_tol=1e-6):
                fail(f"your all-reduce time is wrong on {case}: {sentence}.")
        fail(f"your all-reduce time on {case} is {result:.4g} s, but it should be {expected:.4g} s.")
    passed("check_all_reduce_time", f"your α-β model gives the ring all-reduce time on {len(cases)} cases, one rank "
                                    f"(no communication) and 64 ranks among them.")


# ----------------------------------------------------------------------------------------------
# ---- 10_scaling_out: data parallelism by hand, a script on two processes
# ----------------------------------------------------------------------------------------------

register_hint(
    "10.2",
    "Three things make W replicas take the step one process takes on the whole batch: they start from the same "
    "weights, each trains on different rows, and each applies the mean of all the ranks' gradients.",
    "shard: with b = batch.shape[0] // world rows per rank, rank r takes rows r·b … (r+1)·b − 1. broadcast_weights: "
    "dist.broadcast(p, src=0) for every parameter, under torch.no_grad(). average_gradients: dist.all_reduce "
    "sums p.grad in place over the ranks; divide by world afterwards.",
    "for p in model.parameters(): dist.all_reduce(p.grad); p.grad /= world",
)

# What the check's run trains: small, so that the two processes spend their time starting, not working; plain
# SGD, so that a gradient of the wrong size shows in the weights (Adam would divide a constant factor away).
DATA_PARALLEL_SPEC = dict(steps=3, batch_per_rank=2, context=8, vocab_size=16, d_model=16, n_layer=1, n_head=2,
                          lr=0.5, seed=3, optimizer="sgd")
WORLD = 2
_DDP_FORBIDDEN = ("course_lib.distributed.data_parallel", "course_lib.distributed.ddp.train_single",
                  "course_lib.distributed.ddp.launch", "course_lib.distributed.ddp.main", "course_lib.distributed.sharded",
                  "torch.nn.parallel", "torch.distributed.fsdp", "torch.distributed.optim", "accelerate")


@exercise("10.2", points=2, forbid=("course_lib.distributed.data_parallel:*", "course_lib.distributed.ddp:train_single",
                                     "torch.nn.parallel.distributed:DistributedDataParallel"))
def check_data_parallel(script: str) -> None:
    """Exercise 10.2: ``script`` (a file) trains with data parallelism by hand; run on 2 processes, its replicas
    must end with the weights of one process trained on the whole batch (ddp.train_single), and each rank must
    have trained on its own rows."""
    __tracebackhide__ = True
    from course_lib.checks.scripts import read_script, run_script
    from course_lib.distributed.ddp import DDPSpec, spec_arguments

    read_script(script, "10.2", _DDP_FORBIDDEN)
    spec = DDPSpec(**DATA_PARALLEL_SPEC)
    out, failure = run_script(script, "10.2", spec_arguments(spec))
    try:
        judge_data_parallel(out, failure, spec)
    finally:
        shutil.rmtree(out, ignore_errors=True)   # the ranks' files were only needed for the verdict


def judge_data_parallel(out, failure: str | None, spec) -> None:
    """The verdict on what a data-parallel script's two ranks wrote in ``out`` (``failure``: what went wrong
    in the launch, if anything). One sentence per slip; the tests hand it the runs of their wrong scripts."""
    __tracebackhide__ = True
    from course_lib.checks.scripts import load_per_rank
    from course_lib.distributed.ddp import global_batches, make_model, max_abs_difference, train_single, weights_of

    runs = {name: load_per_rank(out, name, WORLD) for name in ("start", "weights", "rows")}
    if failure is not None:
        fail(f"your script failed on {WORLD} processes: {failure}.")
    missing = [name for name, run in runs.items() if run is None]
    if missing:
        fail(f"your script ran but did not write {missing[0]}_rank0.safetensors in its --out folder: keep the "
             f"template's last lines (ddp.save_run), which write what the check reads.")
    batches = global_batches(spec, WORLD)
    picked = _rows_of_ranks(runs["rows"], batches, spec)
    start, final = runs["start"], runs["weights"]
    own = [weights_of(make_model(spec, seed=spec.seed + r)) for r in range(WORLD)]
    for r in range(1, WORLD):
        if max_abs_difference(start[r], start[0]) > 0:
            if max_abs_difference(start[r], own[r]) == 0:
                fail(f"rank {r} started from its own random weights (its own seed), not rank 0's: broadcast rank "
                     f"0's weights to every rank before training (dist.broadcast with src=0).")
            fail(f"rank {r} started from other weights than rank 0: after broadcast_weights every rank must hold "
                 f"rank 0's weights.")
    reference, _ = train_single(spec, world_size=WORLD)
    moved = max_abs_difference(reference, own[0])
    if max_abs_difference(start[0], own[0]) > 0:
        source = next((r for r in range(WORLD) if max_abs_difference(start[0], own[r]) == 0), None)
        where = f"rank {source}'s" if source is not None else "other"
        fail(f"every rank started from {where} weights; broadcast rank 0's (src=0): the one-process run starts "
             f"from the weights rank 0 draws.")
    close = lambda a, b: max_abs_difference(a, b) <= 1e-5 * moved  # noqa: E731 -- float32 rounding, far below a slip
    slips = {
        "the ranks' weights drifted apart: you all-reduced the weights instead of the gradients (each rank then "
        "stepped with its own gradient); all-reduce p.grad": dict(weights="sum", grads="none"),
        "the ranks' weights drifted apart: you averaged the weights instead of the gradients, so each rank still "
        "stepped with its own gradient; average p.grad before the step": dict(weights="mean", grads="none"),
        "the ranks' weights drifted apart: each rank stepped with its own gradient; average the gradients over "
        "the ranks (dist.all_reduce of p.grad, then divide by the world size)": dict(grads="none"),
        "you summed the gradients over the ranks without dividing by the world size: every step was "
        f"{WORLD} times too large; divide by world": dict(grads="sum"),
        "your gradients are divided by the world size twice (or averaged and then divided): every step was "
        f"{WORLD} times too small": dict(grads="halved"),
    }
    drifted = any(not close(final[r], final[0]) for r in range(1, WORLD))
    if drifted or not close(final[0], reference):
        for sentence, slip in slips.items():
            simulated = _simulate(spec, picked, batches, **slip)
            if all(close(final[r], simulated[r]) for r in range(WORLD)):
                fail(f"{sentence}.")
        if drifted:
            fail("the replicas ended with different weights although they started equal: every rank must apply "
                 "the same averaged gradient at every step.")
        fail(f"your weights after {spec.steps} steps differ from one process trained on the whole batch by up to "
             f"{max_abs_difference(final[0], reference):.2g} (training moved them by {moved:.2g}).")
    passed("check_data_parallel", f"your {WORLD} ranks trained on their own rows, started from rank 0's weights and "
                                  f"took the same {spec.steps} SGD steps as one process on the whole batch, up to "
                                  f"float32 rounding; the replicas agree.")


def _rows_of_ranks(rows: list[dict[str, torch.Tensor]], batches: list, spec) -> list[list[list[int]]]:
    """Which rows of each global batch each rank trained on (indices), after refusing the slips of the split."""
    __tracebackhide__ = True
    b, total = spec.batch_per_rank, WORLD * spec.batch_per_rank
    picked: list[list[list[int]]] = [[] for _ in range(WORLD)]
    for step, (x, _) in enumerate(batches):
        seen = [rank_rows.get(f"step{step}") for rank_rows in rows]
        if any(s is None for s in seen):
            fail(f"your ranks recorded no rows for step {step}: train for the spec's {spec.steps} steps with the "
                 f"template's loop.")
        if all(s.shape[0] == total and torch.equal(s, x) for s in seen):
            fail(f"every rank trained on the whole global batch of {total} rows: each rank must take its own {b} "
                 f"rows (shard depends on the rank), or all ranks compute the same gradient and {WORLD} processes "
                 f"do the work of one.")
        unused = list(range(total))   # rows may repeat in a batch: match them as a multiset
        for r, s in enumerate(seen):
            if s.shape[0] != b:
                fail(f"rank {r} trained on {s.shape[0]} rows at step {step}; a global batch of {total} rows on "
                     f"{WORLD} ranks gives each rank b = {b}.")
            index = []
            for row in s:
                match = next((i for i in unused if torch.equal(row, x[i])), None)
                if match is None:
                    if any(torch.equal(row, x[i]) for i in range(total)):
                        fail(f"the ranks trained on overlapping rows at step {step}: give every rank different "
                             f"rows, so that together they cover the batch once.")
                    fail(f"rank {r} trained on rows that are not in the global batch of step {step}: take whole "
                         f"rows of the batch you are given.")
                unused.remove(match)
                index.append(match)
            picked[r].append(index)
    return picked


def _simulate(spec, picked: list[list[list[int]]], batches: list, *, grads: str = "mean",
              weights: str | None = None) -> list[dict[str, torch.Tensor]]:
    """The weights each rank would end with after a slip, computed with ``WORLD`` replicas in this process: plain
    SGD, the ranks' own rows, ``grads`` "mean" (right), "sum", "halved" or "none" (each its own), and ``weights``
    "sum"/"mean" when the weights are all-reduced instead (just before each step, as a pre-step hook would)."""
    from course_lib.distributed.ddp import make_model, weights_of
    from course_lib.parts.lm import lm_loss

    models = [make_model(spec) for _ in range(WORLD)]
    for step, (x, y) in enumerate(batches):
        for model, rows in zip(models, picked):
            model.zero_grad(set_to_none=True)
            lm_loss(model, (x[rows[step]], y[rows[step]])).backward()
        with torch.no_grad():
            for params in zip(*(m.parameters() for m in models)):
                if weights is not None:
                    total = torch.stack(list(params)).sum(0)
                    for p in params:
                        p.copy_(total / (WORLD if weights == "mean" else 1))
                g = torch.stack([p.grad for p in params]).sum(0)
                scale = {"mean": 1 / WORLD, "sum": 1.0, "halved": 1 / WORLD**2}.get(grads)
                for p in params:
                    p -= spec.lr * (p.grad if scale is None else g * scale)
    return [weights_of(m) for m in models]
