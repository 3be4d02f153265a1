"""The checks of 11_model_parallelism accept correct answers and refuse the common mistakes, each by name:
11.2 (GPipe's schedule), 11.3 (activation bytes), 11.4 (the fused QKV split by heads), 11.5 (the idle fraction
of unequal stages). (11.1, Megatron's MLP as a script on two processes, is tested in test_checks_scripts.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from course_lib import checks
from course_lib.checks import CheckFailed, NotAttempted, ReferenceCalled, StudentCodeError
from course_lib.checks.framework import HINTS


def refused(check, fn) -> str:
    with pytest.raises(CheckFailed) as info:
        check(fn)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, "one sentence"
    return message


# ---------------------------------------------------------------------------------------------
# 11.4: the fused QKV split by heads
# ---------------------------------------------------------------------------------------------

def shard_qkv(t, n_head, rank, world):
    d = t.shape[0] // 3
    w = d // n_head * (n_head // world)
    rows = torch.cat([torch.arange(rank * w, (rank + 1) * w) + j * d for j in range(3)])
    return t[rows]


def shard_qkv_by_views(t, n_head, rank, world):
    """Split into W_q, W_k, W_v, cut each into `world` contiguous pieces, stack the rank's three."""
    return torch.cat([part.chunk(world, dim=0)[rank] for part in t.chunk(3, dim=0)], dim=0)


def shard_qkv_by_heads(t, n_head, rank, world):
    """Reshape to (3, n_head, d_head, ...) and take the rank's heads."""
    per = n_head // world
    shaped = t.reshape(3, n_head, t.shape[0] // 3 // n_head, *t.shape[1:])
    return shaped[:, rank * per:(rank + 1) * per].reshape(-1, *t.shape[1:])


def interleaved(t, n_head, rank, world):
    d = t.shape[0] // 3
    d_head = d // n_head
    return torch.cat([t[j * d + h * d_head: j * d + (h + 1) * d_head] for j in range(3)
                      for h in range(rank, n_head, world)])


def next_rank(t, n_head, rank, world):
    return shard_qkv(t, n_head, (rank + 1) % world, world)


def weight_only(t, n_head, rank, world):
    """Right for the (3d x d) weight; the bias (3d,) breaks it."""
    d = t.shape[1]
    return shard_qkv(t, n_head, rank, world)[:, :d]


def in_place(t, n_head, rank, world):
    t.mul_(1.0)
    t[0] = t[0] + 0
    out = shard_qkv(t, n_head, rank, world)
    t.zero_()
    return out


QKV_CORRECT = [shard_qkv, shard_qkv_by_views, shard_qkv_by_heads]

QKV_WRONG = {
    "contiguous chunk": (lambda t, H, r, W: t.chunk(W, dim=0)[r], "contiguous pieces"),
    "columns": (lambda t, H, r, W: t.chunk(W, dim=-1)[r], "split the columns"),
    "W_q only": (lambda t, H, r, W: t[: t.shape[0] // 3].chunk(W, dim=0)[r], "the rows of W_q only"),
    "interleaved heads": (interleaved, "every"),
    "another rank's heads": (next_rank, "you returned the heads of rank"),
    "one head per rank": (lambda t, H, r, W: shard_qkv(t, H, r, H), "should have shape"),
    "float32 result": (lambda t, H, r, W: shard_qkv(t, H, r, W).float(), "has dtype"),
    "mutates its input": (in_place, "changed the tensor it was given"),
    "weight only": (weight_only, "raised IndexError"),
    "a list": (lambda t, H, r, W: shard_qkv(t, H, r, W).tolist(), "should be a torch.Tensor"),
    "perturbed": (lambda t, H, r, W: shard_qkv(t, H, r, W) * 1.001, "differs from rank"),
}


@pytest.mark.parametrize("fn", QKV_CORRECT, ids=lambda f: f.__name__)
def test_shard_qkv_accepts_correct_answers(fn, capsys):
    checks.check_shard_qkv(fn)
    assert "check_shard_qkv passed" in capsys.readouterr().out


@pytest.mark.parametrize("name", QKV_WRONG)
def test_shard_qkv_refuses_common_mistakes(name):
    fn, sentence = QKV_WRONG[name]
    assert sentence in refused(checks.check_shard_qkv, fn)


def test_the_reference_split_matches_the_tensor_parallel_module():
    from course_lib.distributed.tensor_parallel import shard_qkv as library

    t = torch.randn(48, 16)
    for rank in range(4):
        assert torch.equal(shard_qkv(t, 8, rank, 4), library(t, 8, rank, 4))


# ---------------------------------------------------------------------------------------------
# 11.5: GPipe's idle fraction, simulated
# ---------------------------------------------------------------------------------------------

def gpipe_idle(t_forward, t_backward, m):
    p = len(t_forward)
    free = [0.0] * p
    done_f = [[0.0] * m for _ in range(p)]
    for k in range(m):
        for s in range(p):
            start = max(free[s], done_f[s - 1][k] if s else 0.0)
            free[s] = done_f[s][k] = start + t_forward[s]
    done_b = [[0.0] * m for _ in range(p)]
    for k in range(m):
        for s in reversed(range(p)):
            start = max(free[s], done_b[s + 1][k] if s < p - 1 else 0.0)
            free[s] = done_b[s][k] = start + t_backward[s]
    return 1 - m * sum(f + b for f, b in zip(t_forward, t_backward)) / (p * max(free))


def gpipe_idle_backward_last_first(t_forward, t_backward, m):
    """Backward passes in reverse micro-batch order (as some GPipe write-ups draw it): the same idle time."""
    p = len(t_forward)
    free = [0.0] * p
    done_f = [[0.0] * m for _ in range(p)]
    for k in range(m):
        for s in range(p):
            start = max(free[s], done_f[s - 1][k] if s else 0.0)
            free[s] = done_f[s][k] = start + t_forward[s]
    done_b = [[0.0] * m for _ in range(p)]
    for k in reversed(range(m)):
        for s in reversed(range(p)):
            start = max(free[s], done_b[s + 1][k] if s < p - 1 else 0.0)
            free[s] = done_b[s][k] = start + t_backward[s]
    busy = m * sum(t_forward) + m * sum(t_backward)
    return torch.tensor(1 - busy / (p * max(free)))


def formula_only(t_f, t_b, m):
    p = len(t_f)
    return (p - 1) / (m + p - 1)


def slowest_stage(t_f, t_b, m):
    p = len(t_f)
    busy = m * sum(f + b for f, b in zip(t_f, t_b))
    return 1 - busy / (p * (m + p - 1) * max(f + b for f, b in zip(t_f, t_b)))


def no_overlap(t_f, t_b, m):
    return 1 - 1 / len(t_f)


def makespan_from_the_slowest_stage(t_f, t_b, m):
    """Right whenever the slowest forward stage is also the slowest backward stage (tf = [3, 1], tb = [1, 3],
    m = 4 gives 0.20 instead of 0.385)."""
    p = len(t_f)
    total = sum(t_f) + sum(t_b) + (m - 1) * max(f + b for f, b in zip(t_f, t_b))
    return 1 - m * sum(f + b for f, b in zip(t_f, t_b)) / (p * total)


IDLE_WRONG = {
    "the formula for equal stages": (formula_only, "assumes equal stages"),
    "total time from the slowest stage": (makespan_from_the_slowest_stage,
                                          "holds only when the slowest forward stage is also the slowest backward"),
    "bubble over useful time": (lambda t_f, t_b, m: (len(t_f) - 1) / m, "(p − 1)/m"),
    "the slowest stage everywhere": (slowest_stage, "the slowest"),
    "forwards only": (lambda t_f, t_b, m: gpipe_idle(t_f, [0.0] * len(t_f), m), "left out the backward"),
    "one micro-batch at a time": (no_overlap, "before starting the next"),
    "busy fraction": (lambda t_f, t_b, m: 1 - gpipe_idle(t_f, t_b, m), "busy fraction"),
    "percent": (lambda t_f, t_b, m: 100 * gpipe_idle(t_f, t_b, m), "percentage"),
    "forgot p": (lambda t_f, t_b, m: 1 - len(t_f) * (1 - gpipe_idle(t_f, t_b, m)), "divide by p"),
    "a list": (lambda t_f, t_b, m: [gpipe_idle(t_f, t_b, m)], "one number"),
    "mutates and misreads": (lambda t_f, t_b, m: gpipe_idle(t_f, t_b, m) + 0.01, "but it should be"),
}


def test_the_slowest_stage_case_is_the_issue_s():
    assert gpipe_idle([3.0, 1.0], [1.0, 3.0], 4) == pytest.approx(0.385, abs=5e-4)
    assert makespan_from_the_slowest_stage([3.0, 1.0], [1.0, 3.0], 4) == pytest.approx(0.20)


@pytest.mark.parametrize("fn", [gpipe_idle, gpipe_idle_backward_last_first,
                                lambda t_f, t_b, m: np.float32(gpipe_idle(t_f, t_b, m))],
                         ids=["simulated", "backward last first", "NumPy float32"])
def test_idle_check_accepts_correct_answers(fn, capsys):
    checks.check_gpipe_idle_fraction(fn)
    assert "check_gpipe_idle_fraction passed" in capsys.readouterr().out


@pytest.mark.parametrize("name", IDLE_WRONG)
def test_idle_check_refuses_common_mistakes(name):
    fn, sentence = IDLE_WRONG[name]
    assert sentence in refused(checks.check_gpipe_idle_fraction, fn)


def test_the_library_schedule_gives_the_gpipe_formula_for_equal_stages():
    from course_lib.distributed.pipeline import bubble_fraction, gpipe_timeline, idle_fraction

    for p in (1, 2, 3, 4):
        for m in (1, 2, 5, 8):
            assert idle_fraction(gpipe_timeline([1.0] * p, [2.0] * p, m)) == pytest.approx(bubble_fraction(p, m))


# ---------------------------------------------------------------------------------------------
# 11.2: GPipe's schedule, tick by tick
# ---------------------------------------------------------------------------------------------

def gpipe_schedule(p, m):
    ticks = [[None] * p for _ in range(2 * (m + p - 1))]
    for s in range(p):
        for k in range(m):
            ticks[s + k][s] = ("F", k)
            ticks[m + p - 1 + (p - 1 - s) + k][s] = ("B", k)
    return ticks


def schedule_by_simulation(p, m):
    """Event by event: at every tick each stage starts the first pass whose input is ready (forwards first)."""
    done, ticks, t = set(), [], 0
    while len(done) < 2 * p * m:
        tick = []
        for s in range(p):
            ready = [("F", k) for k in range(m) if ("F", s, k) not in done and (s == 0 or ("F", s - 1, k) in done)]
            if not ready and all(("F", s, k) in done for k in range(m)):
                ready = [("B", k) for k in range(m) if ("B", s, k) not in done and ("F", s, k) in done
                         and (s == p - 1 or ("B", s + 1, k) in done)]
            tick.append(ready[0] if ready else None)
        done |= {(kind, s, k) for s, entry in enumerate(tick) if entry for kind, k in [entry]}
        ticks.append(tuple(tick))
        t += 1
    return ticks


def backward_last_micro_batch_first(p, m):
    ticks = [[None] * p for _ in range(2 * (m + p - 1))]
    for s in range(p):
        for k in range(m):
            ticks[s + k][s] = ("F", k)
            ticks[m + p - 1 + (p - 1 - s) + (m - 1 - k)][s] = ["B", np.int64(k)]
    return ticks + [[None] * p]   # a trailing idle tick changes nothing


def shifted(p, m, entries):
    """A schedule from a function (s, k) -> (forward tick, backward tick)."""
    length = 1 + max(t for s in range(p) for k in range(m) for t in entries(s, k))
    ticks = [[None] * p for _ in range(length)]
    for s in range(p):
        for k in range(m):
            f_at, b_at = entries(s, k)
            ticks[f_at][s], ticks[b_at][s] = ("F", k), ("B", k)
    return ticks


def one_micro_batch_at_a_time(p, m):
    return shifted(p, m, lambda s, k: (2 * p * k + s, 2 * p * k + 2 * p - 1 - s))


def one_f_one_b(p, m):
    """Forward and backward passes interleaved once the pipeline is full (valid, but not GPipe's order)."""
    when = {}
    t = 0
    pending_f = {s: list(range(m)) for s in range(p)}
    pending_b = {s: list(range(m)) for s in range(p)}
    ticks = []
    while any(pending_f.values()) or any(pending_b.values()):
        tick = [None] * p
        for s in range(p):
            can_b = [k for k in pending_b[s] if ("F", s, k) in when and when[("F", s, k)] < t
                     and (s == p - 1 or (("B", s + 1, k) in when and when[("B", s + 1, k)] < t))]
            can_f = [k for k in pending_f[s] if s == 0 or (("F", s - 1, k) in when and when[("F", s - 1, k)] < t)]
            if can_b:
                tick[s] = ("B", can_b[0])
            elif can_f:
                tick[s] = ("F", can_f[0])
        for s, entry in enumerate(tick):
            if entry:
                when[(entry[0], s, entry[1])] = t
                (pending_f if entry[0] == "F" else pending_b)[s].remove(entry[1])
        ticks.append(tick)
        t += 1
    return ticks


SCHEDULE_WRONG = {
    "forwards without waiting": (lambda p, m: shifted(p, m, lambda s, k: (k, m + p - 1 + (p - 1 - s) + k)),
                                 "needs the previous stage's output"),
    "backward from the first stage": (lambda p, m: shifted(p, m, lambda s, k: (s + k, m + p - 1 + s + k)),
                                      "the backward pass flows from the last stage"),
    "backward before forward": (lambda p, m: shifted(p, m, lambda s, k: (s + k + 1, s + k)), "before its own forward"),
    "1F1B, not GPipe": (one_f_one_b, "that interleaving is 1F1B"),
    "one micro-batch at a time": (one_micro_batch_at_a_time, "only one stage works at any tick"),
    "an idle tick between the phases": (lambda p, m: shifted(p, m, lambda s, k: (s + k, m + p + (p - 1 - s) + k)),
                                        "keeps every dependency but takes"),
    "the last micro-batch missing": (lambda p, m: [[e if e is None or e[1] < m - 1 else None for e in tick]
                                                   for tick in gpipe_schedule(p, m)], "never runs"),
    "one list per stage": (lambda p, m: [list(stage) for stage in zip(*gpipe_schedule(p, m))], "one list per stage?"),
    "strings for entries": (lambda p, m: [[None if e is None else f"{e[0]}{e[1]}" for e in tick]
                                          for tick in gpipe_schedule(p, m)], "an entry is ('F', k), ('B', k) or None"),
    "lower-case kinds": (lambda p, m: [[None if e is None else (e[0].lower(), e[1]) for e in tick]
                                       for tick in gpipe_schedule(p, m)], "k in 0"),
    "a pass twice": (lambda p, m: gpipe_schedule(p, m) + [[("F", 0)] * p], "twice"),
    "a dict": (lambda p, m: dict(enumerate(gpipe_schedule(p, m))), "should return a list of clock ticks"),
}


@pytest.mark.parametrize("fn", [gpipe_schedule, schedule_by_simulation, backward_last_micro_batch_first],
                         ids=lambda f: f.__name__)
def test_schedule_check_accepts_correct_schedules(fn, capsys):
    checks.check_gpipe_schedule(fn)
    assert "check_gpipe_schedule passed" in capsys.readouterr().out


@pytest.mark.parametrize("name", SCHEDULE_WRONG)
def test_schedule_check_refuses_common_mistakes(name):
    fn, sentence = SCHEDULE_WRONG[name]
    assert sentence in refused(checks.check_gpipe_schedule, fn)


def test_the_course_schedule_is_gpipe_with_its_bubble():
    from course_lib.distributed.pipeline import bubble_fraction, gpipe_schedule as course

    for p in (1, 2, 3, 5):
        for m in (1, 2, 7):
            ticks = course(p, m)
            busy = sum(e is not None for tick in ticks for e in tick)
            assert busy == 2 * p * m and 1 - busy / (p * len(ticks)) == pytest.approx(bubble_fraction(p, m))
            assert course(p, m) == gpipe_schedule(p, m)


# ---------------------------------------------------------------------------------------------
# 11.3: activation bytes per layer
# ---------------------------------------------------------------------------------------------

def activation_bytes(s, b, h, a, t=1, sequence_parallel=False):
    linear = 34 / t if sequence_parallel else 10 + 24 / t
    return s * b * h * (linear + 5 * a * s / (h * t))


def activation_bytes_by_parts(s, b, h, a, t=1, sequence_parallel=False):
    attention = 11 * s * b * h + 5 * a * s * s * b
    mlp, norms = 19 * s * b * h, 4 * s * b * h
    split = (attention - 3 * s * b * h) / t + (mlp - 3 * s * b * h) / t  # all but QKV input, one mask, MLP input + mask
    whole = 3 * s * b * h + 3 * s * b * h + norms
    return int(round(split + (whole / t if sequence_parallel else whole)))


ACT_WRONG = {
    "no attention term": (lambda s, b, h, a, t=1, sequence_parallel=False:
                          s * b * h * (34 / t if sequence_parallel else 10 + 24 / t), "5·a·s/h"),
    "fp32": (lambda s, b, h, a, t=1, sequence_parallel=False: 2 * activation_bytes(s, b, h, a, t, sequence_parallel),
             "4 bytes per value"),
    "bits": (lambda s, b, h, a, t=1, sequence_parallel=False: 8 * activation_bytes(s, b, h, a, t, sequence_parallel),
             "bits"),
    "everything split by t": (lambda s, b, h, a, t=1, sequence_parallel=False: activation_bytes(s, b, h, a, t, True),
                              "stay whole"),
    "sequence parallelism ignored": (lambda s, b, h, a, t=1, sequence_parallel=False:
                                     activation_bytes(s, b, h, a, t, False), "split over the t ranks too"),
    "attention term not split": (lambda s, b, h, a, t=1, sequence_parallel=False:
                                 s * b * h * ((34 / t if sequence_parallel else 10 + 24 / t) + 5 * a * s / h),
                                 "divided by t too"),
    "h and a swapped": (lambda s, b, h, a, t=1, sequence_parallel=False:
                        s * b * h * ((34 / t if sequence_parallel else 10 + 24 / t) + 5 * h * s / (a * t)),
                        "heads a times sequence length"),
    "no batch": (lambda s, b, h, a, t=1, sequence_parallel=False: activation_bytes(s, b, h, a, t, sequence_parallel) / b,
                 "batch size b"),
    "wrong default t": (lambda s, b, h, a, t=8, sequence_parallel=False: activation_bytes(s, b, h, a, t, sequence_parallel),
                        "check the defaults"),
    "a tensor of two numbers": (lambda s, b, h, a, t=1, sequence_parallel=False: torch.tensor([1.0, 2.0]), "one number"),
}


@pytest.mark.parametrize("fn", [activation_bytes, activation_bytes_by_parts,
                                lambda s, b, h, a, t=1, sequence_parallel=False:
                                torch.tensor(activation_bytes(s, b, h, a, t, sequence_parallel), dtype=torch.float64),
                                lambda s, b, h, a, t=1, sequence_parallel=False:
                                np.int64(activation_bytes_by_parts(s, b, h, a, t, sequence_parallel))],
                         ids=["formula", "by parts", "tensor", "NumPy int64"])
def test_activation_check_accepts_correct_answers(fn, capsys):
    checks.check_activation_bytes(fn)
    assert "check_activation_bytes passed" in capsys.readouterr().out


@pytest.mark.parametrize("name", ACT_WRONG)
def test_activation_check_refuses_common_mistakes(name):
    fn, sentence = ACT_WRONG[name]
    assert sentence in refused(checks.check_activation_bytes, fn)


# ---------------------------------------------------------------------------------------------
# all three: stubs, crashes, hints
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("check, exercise", [(checks.check_gpipe_schedule, "11.2"), (checks.check_activation_bytes, "11.3"),
                                             (checks.check_shard_qkv, "11.4"), (checks.check_gpipe_idle_fraction, "11.5")])
def test_stubs_and_crashes(check, exercise):
    def stub(*args, **kwargs):
        raise NotImplementedError(f"Exercise {exercise} is not done yet")

    with pytest.raises(NotAttempted, match=f"Exercise {exercise} is not done yet"):
        check(stub)
    with pytest.raises(StudentCodeError, match="raised ZeroDivisionError"):
        check(lambda *args, **kwargs: 1 / 0)


@pytest.mark.parametrize("exercise", ["11.1", "11.2", "11.3", "11.4", "11.5"])
def test_three_hint_levels_and_the_idea_does_not_give_the_line_away(exercise, capsys):
    idea, approach, key_line = HINTS[exercise]
    assert key_line not in idea and "return" not in idea
    for level in (1, 2, 3):
        checks.hint(exercise, level=level)
        assert f"Hint {level}/3 for exercise {exercise}" in capsys.readouterr().out


# --------------------------------------------- answers that call the course's reference are refused

from course_lib.distributed import activation_memory, pipeline, tensor_parallel  # noqa: E402
from course_lib.distributed.activation_memory import korthikanti_bytes as eq_4  # noqa: E402 -- another name
from course_lib.distributed.pipeline import idle_fraction as idle  # noqa: E402
from course_lib.distributed.tensor_parallel import shard_qkv as rows_of_rank  # noqa: E402
from course_lib.distributed.pipeline import gpipe_schedule as schedule_of_the_course  # noqa: E402


def idle_from_the_course_timeline(t_f, t_b, m):
    timeline = pipeline.gpipe_timeline(list(t_f), list(t_b), m)
    end = max(stop for stage in timeline for *_, stop in stage)
    return 1 - m * sum(f + b for f, b in zip(t_f, t_b)) / (len(t_f) * end)


REFERENCE_CALLS = {
    "11.2 directly": (checks.check_gpipe_schedule, lambda p, m: pipeline.gpipe_schedule(p, m),
                      "course_lib.distributed.pipeline.gpipe_schedule"),
    "11.2 under another name": (checks.check_gpipe_schedule, lambda p, m: schedule_of_the_course(p, m),
                                "course_lib.distributed.pipeline.gpipe_schedule"),
    "11.4 directly": (checks.check_shard_qkv, lambda t, H, r, W: tensor_parallel.shard_qkv(t, H, r, W),
                      "course_lib.distributed.tensor_parallel.shard_qkv"),
    "11.4 under another name": (checks.check_shard_qkv, lambda t, H, r, W: rows_of_rank(t, H, r, W),
                                "course_lib.distributed.tensor_parallel.shard_qkv"),
    "11.5 the course's timeline": (checks.check_gpipe_idle_fraction, idle_from_the_course_timeline,
                                   "course_lib.distributed.pipeline.gpipe_timeline"),
    "11.5 under another name": (checks.check_gpipe_idle_fraction, lambda t_f, t_b, m: idle(pipeline.gpipe_timeline(
        list(t_f), list(t_b), m)), "course_lib.distributed.pipeline.gpipe_timeline"),
    "11.3 directly": (checks.check_activation_bytes, lambda s, b, h, a, t=1, sequence_parallel=False:
                      activation_memory.korthikanti_bytes(s, b, h, a, t=t, sequence_parallel=sequence_parallel),
                      "course_lib.distributed.activation_memory.korthikanti_bytes"),
    "11.3 under another name": (checks.check_activation_bytes, lambda s, b, h, a, t=1, sequence_parallel=False:
                                eq_4(s, b, h, a, t=t, sequence_parallel=sequence_parallel),
                                "course_lib.distributed.activation_memory.korthikanti_bytes"),
}


@pytest.mark.parametrize("name", REFERENCE_CALLS)
def test_an_answer_that_calls_the_reference_is_refused(name):
    check, fn, called = REFERENCE_CALLS[name]
    with pytest.raises(ReferenceCalled) as info:
        check(fn)
    message = str(info.value)
    assert message.startswith("your answer calls ") and f"`{called}`" in message and message.endswith("write it yourself.")
