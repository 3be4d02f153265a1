"""The checks of 10_scaling_out (ring all-reduce 10.1, ZeRO memory 10.3, the all-reduce's time 10.4) accept
correct answers and refuse the common mistakes, each with its own sentence. (10.2, the data-parallel script run
on two processes, is tested in test_checks_scripts.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from course_lib import checks
from course_lib.checks import CheckFailed, NotAttempted, ReferenceCalled, StudentCodeError


def refused(fn) -> str:
    with pytest.raises(CheckFailed) as info:
        checks.check_zero_memory(fn)
    return str(info.value)


def by_parts(n_params, n_gpus, zero_stage):
    weights, grads, adam = 2 * n_params, 2 * n_params, 12 * n_params
    if zero_stage >= 1:
        adam /= n_gpus
    if zero_stage >= 2:
        grads /= n_gpus
    if zero_stage >= 3:
        weights /= n_gpus
    return (weights + grads + adam) / 1e9


def zero_paper_formula(n_params, n_gpus, zero_stage):
    # Rajbhandari et al. 2020, Fig. 1: (2 + 2 + K) Psi, (2 + 2) Psi + K Psi / N_d, 2 Psi + (2 + K) Psi / N_d,
    # (2 + 2 + K) Psi / N_d, with K = 12
    psi, K, N = n_params, 12, n_gpus
    return [(4 + K) * psi, 4 * psi + K * psi / N, 2 * psi + (2 + K) * psi / N, (4 + K) * psi / N][zero_stage] / 1e9


def as_tensor(n_params, n_gpus, zero_stage):
    return torch.tensor(by_parts(n_params, n_gpus, zero_stage), dtype=torch.float64)


def as_numpy_float32(n_params, n_gpus, zero_stage):
    return np.float32(by_parts(n_params, n_gpus, zero_stage))


@pytest.mark.parametrize("fn", [by_parts, zero_paper_formula, as_tensor, as_numpy_float32])
def test_accepts_correct_answers(fn, capsys):
    checks.check_zero_memory(fn)
    assert "check_zero_memory passed" in capsys.readouterr().out


@pytest.mark.parametrize("fn, sentence", [
    (lambda n, N, s: by_parts(n, N, s) * 1e9, "you returned bytes"),
    (lambda n, N, s: by_parts(n, N, s) * 1e9 / 2**30, "you returned GiB"),
    (lambda n, N, s: 16 * n / 1e9, "you did not shard anything"),
    (lambda n, N, s: 16 * n / N / 1e9, "you divided all 16 bytes by n_gpus at every stage"),
    (lambda n, N, s: by_parts(n, N, min(s + 1, 3)), "you shard one kind of memory too many"),
    (lambda n, N, s: by_parts(n, N, s) - 4 * n / (N if s >= 1 else 1) / 1e9, "you counted 8 bytes of Adam state"),
    (lambda n, N, s: by_parts(n, N, s) + 2 * n / (N if s >= 3 else 1) / 1e9 + 2 * n / (N if s >= 2 else 1) / 1e9,
     "you counted fp32 weights and gradients"),
    (lambda n, N, s: by_parts(n, N, s) - 2 * n / (N if s >= 2 else 1) / 1e9, "you left out the gradients"),
    (lambda n, N, s: by_parts(n, N, s) * 1.5, "but it should be"),
    (lambda n, N, s: [by_parts(n, N, s)], "should return one number"),
])
def test_refuses_common_mistakes(fn, sentence):
    assert sentence in refused(fn)


def test_stub_and_crash():
    def stub(n, N, s):
        raise NotImplementedError("Exercise 10.3 is not done yet")

    with pytest.raises(NotAttempted, match="Exercise 10.3 is not done yet"):
        checks.check_zero_memory(stub)
    with pytest.raises(StudentCodeError, match="raised ZeroDivisionError"):
        checks.check_zero_memory(lambda n, N, s: n / 0)


def test_hint_exists(capsys):
    checks.hint("10.3", level=2)
    assert "12 of Adam state" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# 10.1: the ring all-reduce on simulated ranks
# ---------------------------------------------------------------------------------------------

def test_the_course_ring_sums_and_sends_2_w_minus_1_chunks_per_rank():
    from course_lib.distributed.ddp import ring_all_reduce as course_ring

    for W, n in ((1, 5), (3, 10), (4, 6)):
        grads, log = [torch.randn(n) for _ in range(W)], []
        out = course_ring(grads, lambda s, d, t: (log.append((s, d, t.numel())), t.clone())[1])
        assert all(torch.allclose(o, sum(grads)) for o in out)
        assert sum(k for *_, k in log) == 2 * (W - 1) * n and all(d == (s + 1) % W for s, d, _ in log)


def _textbook_ring(grads, send, split):
    """W - 1 reduce-scatter steps, then W - 1 all-gather steps, always to rank r + 1, chunks cut by ``split``."""
    W = len(grads)
    chunks = [list(split(g.flatten().clone(), W)) for g in grads]
    for j in range(W - 1):
        messages = [(r, (r - j) % W, send(r, (r + 1) % W, chunks[r][(r - j) % W])) for r in range(W)]
        for r, c, data in messages:
            chunks[(r + 1) % W][c] = chunks[(r + 1) % W][c] + data
    for j in range(W - 1):
        messages = [(r, (r + 1 - j) % W, send(r, (r + 1) % W, chunks[r][(r + 1 - j) % W])) for r in range(W)]
        for r, c, data in messages:
            chunks[(r + 1) % W][c] = data
    return [torch.cat(c).reshape(g.shape) for c, g in zip(chunks, grads)]


def ring_all_reduce(grads, send):
    """The textbook ring: W - 1 reduce-scatter steps, then W - 1 all-gather steps, always to rank r + 1."""
    return _textbook_ring(grads, send, torch.tensor_split)


def ring_to_the_left(grads, send):
    """The same ring, turning the other way (every rank sends to r - 1)."""
    W = len(grads)
    chunks = [list(torch.tensor_split(g.flatten().clone(), W)) for g in grads]
    for phase in ("reduce", "gather"):
        for j in range(W - 1):
            messages = []
            for r in range(W):
                c = (r + j) % W if phase == "reduce" else (r - 1 + j) % W
                messages.append((r, c, send(r, (r - 1) % W, chunks[r][c])))
            for r, c, data in messages:
                dst = (r - 1) % W
                chunks[dst][c] = chunks[dst][c] + data if phase == "reduce" else data
    return [torch.cat(c).reshape(g.shape) for c, g in zip(chunks, grads)]


def _ring_variant(grads, send, *, average=False, gather=True, even_chunks=False, inplace=False):
    W = len(grads)
    if inplace:
        flats = [g.view(-1) for g in grads]
    else:
        flats = [g.flatten().clone() for g in grads]
    if even_chunks:
        size = flats[0].numel() // W
        chunks = [[f[i * size:(i + 1) * size] for i in range(W)] + [f[W * size:]] for f in flats]
    else:
        chunks = [list(torch.tensor_split(f, W)) for f in flats]
    for j in range(W - 1):
        messages = [(r, (r - j) % W, send(r, (r + 1) % W, chunks[r][(r - j) % W])) for r in range(W)]
        for r, c, data in messages:
            chunks[(r + 1) % W][c].add_(data) if inplace else chunks[(r + 1) % W].__setitem__(c, chunks[(r + 1) % W][c] + data)
    if gather:
        for j in range(W - 1):
            messages = [(r, (r + 1 - j) % W, send(r, (r + 1) % W, chunks[r][(r + 1 - j) % W])) for r in range(W)]
            for r, c, data in messages:
                chunks[(r + 1) % W][c] = data
    out = [torch.cat(c).reshape(g.shape) for c, g in zip(chunks, grads)]
    return [o / W for o in out] if average else out


def naive_exchange(grads, send):
    """Every rank sends its whole tensor to every other rank and adds up what it receives."""
    W = len(grads)
    received = [[grads[r].clone()] for r in range(W)]
    for src in range(W):
        for dst in range(W):
            if src != dst:
                received[dst].append(send(src, dst, grads[src]))
    return [torch.stack(r).sum(0) for r in received]


def whole_tensor_around_the_ring(grads, send):
    """Pass the whole tensor W - 1 times around the ring (right, but W/2 times the traffic of a ring all-reduce)."""
    W = len(grads)
    totals = [g.clone() for g in grads]
    moving = [g.clone() for g in grads]
    for _ in range(W - 1):
        moving = [send((r - 1) % W, r, moving[(r - 1) % W]) for r in range(W)]
        totals = [t + m for t, m in zip(totals, moving)]
    return totals


def ring_cut_by_chunk(grads, send):
    """The textbook ring, its chunks cut with torch.chunk: fewer than W pieces for some sizes (6 numbers on 4 ranks)."""
    return _textbook_ring(grads, send, torch.chunk)


def sends_like_a_ring_but_reads_every_rank(grads, send):
    """The right messages on the network, but each rank's result is summed from the other ranks' tensors directly."""
    W = len(grads)
    for phase in range(2):
        for j in range(W - 1):
            for r in range(W):
                send(r, (r + 1) % W, torch.tensor_split(grads[r].flatten(), W)[(r - j) % W])
    return [torch.stack([g.clone() for g in grads]).sum(0) for _ in range(W)]


def both_directions(grads, send):
    """A correct sum, but the reduce-scatter turns right and the all-gather left."""
    W = len(grads)
    result = ring_all_reduce(grads, lambda s, d, t: send(s, d, t))
    if W > 2:
        send(1, 0, grads[1][:1])
    return result


RING_CORRECT = [ring_all_reduce, ring_to_the_left]

RING_WRONG = {
    "no communication at all": (lambda grads, send: [sum(g.clone() for g in grads) for _ in grads],
                                 "you never called send"),
    "averages": (lambda grads, send: _ring_variant(grads, send, average=True), "you averaged"),
    "reduce-scatter only": (lambda grads, send: _ring_variant(grads, send, gather=False),
                            "holds the full sum in only part of its tensor"),
    "drops the remainder of uneven chunks": (lambda grads, send: _ring_variant(grads, send, even_chunks=True),
                                             "the last numbers of the tensor were never reduced"),
    "changes its input": (lambda grads, send: _ring_variant(grads, send, inplace=True),
                          "changed the input tensors"),
    "all-to-all exchange": (naive_exchange, "sent to rank"),
    "whole tensor around the ring": (whole_tensor_around_the_ring, "each rank sent its whole tensor"),
    "one shared result": (lambda grads, send: [ring_all_reduce(grads, send)[0]] * len(grads),
                          "several ranks share one result tensor"),
    "flat results": (lambda grads, send: [r.flatten() for r in ring_all_reduce(grads, send)], "reshape the chunks"),
    "float64 results": (lambda grads, send: [r.double() for r in ring_all_reduce(grads, send)], "has dtype"),
    "both directions": (both_directions, "sent in both directions"),
    "returns a tensor, not a list": (lambda grads, send: torch.stack(ring_all_reduce(grads, send)),
                                     "should return a list"),
    "cuts with torch.chunk": (ring_cut_by_chunk, "torch.chunk cuts 6 numbers into only 3 pieces"),
    "reads the other ranks' tensors": (sends_like_a_ring_but_reads_every_rank,
                                       "your ranks read the other ranks' tensors directly"),
}


@pytest.mark.parametrize("fn", RING_CORRECT, ids=lambda f: f.__name__)
def test_ring_check_accepts_correct_rings(fn, capsys):
    checks.check_ring_all_reduce(fn)
    assert "check_ring_all_reduce passed" in capsys.readouterr().out


@pytest.mark.parametrize("name", RING_WRONG)
def test_ring_check_refuses_common_mistakes(name):
    fn, sentence = RING_WRONG[name]
    with pytest.raises(CheckFailed) as info:
        checks.check_ring_all_reduce(fn)
    assert sentence in str(info.value)
    assert "\n" not in str(info.value)


def test_ring_check_stub_and_crash():
    def stub(grads, send):
        raise NotImplementedError("Exercise 10.1 is not done yet")

    with pytest.raises(NotAttempted, match="Exercise 10.1 is not done yet"):
        checks.check_ring_all_reduce(stub)
    with pytest.raises(StudentCodeError, match="raised IndexError"):
        checks.check_ring_all_reduce(lambda grads, send: [grads[len(grads)]])


# ---------------------------------------------------------------------------------------------
# 10.4: the alpha-beta model of a ring all-reduce
# ---------------------------------------------------------------------------------------------

def ring_time(n_bytes, world, alpha, beta):
    return 2 * (world - 1) * alpha + 2 * (world - 1) / world * n_bytes / beta


def ring_time_by_steps(n_bytes, world, alpha, beta):
    steps = 2 * (world - 1)
    return sum(alpha + (n_bytes / world) / beta for _ in range(steps))


TIME_WRONG = {
    "milliseconds": (lambda n, W, a, b: 1e3 * ring_time(n, W, a, b), "milliseconds"),
    "reduce-scatter only": (lambda n, W, a, b: (W - 1) * a + (W - 1) / W * n / b, "only the reduce-scatter half"),
    "n bytes per rank": (lambda n, W, a, b: 2 * (W - 1) * a + n / b, "not n"),
    "whole tensor to everyone": (lambda n, W, a, b: 2 * (W - 1) * a + (W - 1) * n / b, "whole tensor"),
    "latency paid twice only": (lambda n, W, a, b: 2 * a + 2 * (W - 1) / W * n / b, "pays the latency"),
    "beta as seconds per byte": (lambda n, W, a, b: 2 * (W - 1) * a + 2 * (W - 1) / W * n * b, "divide the bytes"),
    "bits": (lambda n, W, a, b: 2 * (W - 1) * a + 2 * (W - 1) / W * 8 * n / b, "bits"),
    "no latency": (lambda n, W, a, b: 2 * (W - 1) / W * n / b, "latency term"),
    "slightly off": (lambda n, W, a, b: 1.1 * ring_time(n, W, a, b), "but it should be"),
    "a list": (lambda n, W, a, b: [ring_time(n, W, a, b)], "one number"),
}


@pytest.mark.parametrize("fn", [ring_time, ring_time_by_steps,
                                lambda n, W, a, b: torch.tensor(ring_time(n, W, a, b), dtype=torch.float64),
                                lambda n, W, a, b: np.float32(ring_time(n, W, a, b)),
                                lambda n, W, a, b: np.float64(ring_time(n, W, a, b)),
                                lambda n, W, a, b: np.asarray(ring_time(n, W, a, b))],
                         ids=["formula", "by steps", "tensor", "NumPy float32", "NumPy float64", "0-d array"])
def test_time_check_accepts_correct_answers(fn, capsys):
    checks.check_all_reduce_time(fn)
    assert "check_all_reduce_time passed" in capsys.readouterr().out


@pytest.mark.parametrize("name", TIME_WRONG)
def test_time_check_refuses_common_mistakes(name):
    fn, sentence = TIME_WRONG[name]
    with pytest.raises(CheckFailed) as info:
        checks.check_all_reduce_time(fn)
    assert sentence in str(info.value)


@pytest.mark.parametrize("exercise", ["10.1", "10.2", "10.3", "10.4"])
def test_three_hint_levels_and_the_idea_does_not_give_the_line_away(exercise, capsys):
    from course_lib.checks.framework import HINTS

    idea, approach, key_line = HINTS[exercise]
    assert key_line not in idea and "return" not in idea
    for level in (1, 2, 3):
        checks.hint(exercise, level=level)
        assert f"Hint {level}/3 for exercise {exercise}" in capsys.readouterr().out


# --------------------------------------------- answers that call the course's reference are refused

from course_lib.distributed import ddp, sharded  # noqa: E402
from course_lib.distributed.ddp import memory_per_gpu as per_gpu  # noqa: E402 -- bound under another name


def ring_by_calling_the_check(grads, send):
    checks.scaling_out.check_ring_all_reduce(ring_all_reduce)   # re-entering the check is the check's code
    return ring_all_reduce(grads, send)


from course_lib.checks.scaling_out import check_all_reduce_time as verify_time  # noqa: E402 -- another name


def ring_by_the_check_under_another_name(grads, send):
    verify = checks.scaling_out.check_ring_all_reduce
    verify(ring_all_reduce)
    return ring_all_reduce(grads, send)


REFERENCE_CALLS = {
    "10.1 the course's ring": (checks.check_ring_all_reduce, lambda grads, send: ddp.ring_all_reduce(grads, send),
                               "course_lib.distributed.ddp.ring_all_reduce"),
    "10.1 the check's own code": (checks.check_ring_all_reduce, ring_by_calling_the_check,
                                  "course_lib.checks.scaling_out.check_ring_all_reduce"),
    "10.1 the check under another name": (checks.check_ring_all_reduce, ring_by_the_check_under_another_name,
                                          "course_lib.checks.scaling_out.check_ring_all_reduce"),
    "10.4 the check under another name": (checks.check_all_reduce_time, lambda n, W, a, b: (
        verify_time(ring_time), ring_time(n, W, a, b))[1], "course_lib.checks.scaling_out.check_all_reduce_time"),
    "10.4 the check's own code": (checks.check_all_reduce_time, lambda n, W, a, b: (
        checks.scaling_out.check_all_reduce_time(ring_time), ring_time(n, W, a, b))[1],
        "course_lib.checks.scaling_out.check_all_reduce_time"),
    "10.3 directly": (checks.check_zero_memory, lambda n, N, s: ddp.memory_per_gpu(n, data=N, zero_stage=s)["total"] / 1e9,
                      "course_lib.distributed.ddp.memory_per_gpu"),
    "10.3 under another name": (checks.check_zero_memory, lambda n, N, s: per_gpu(n, data=N, zero_stage=s)["total"] / 1e9,
                                "course_lib.distributed.ddp.memory_per_gpu"),
    "10.3 the sharded module's bytes": (checks.check_zero_memory, lambda n, N, s: (sharded.zero_bytes(n, N, s),
                                                                                  by_parts(n, N, s))[1],
                                        "course_lib.distributed.sharded.zero_bytes"),
}


@pytest.mark.parametrize("name", REFERENCE_CALLS)
def test_an_answer_that_calls_the_reference_is_refused(name):
    check, fn, called = REFERENCE_CALLS[name]
    with pytest.raises(ReferenceCalled) as info:
        check(fn)
    message = str(info.value)
    assert message.startswith("your answer calls ") and f"`{called}`" in message and message.endswith("write it yourself.")
