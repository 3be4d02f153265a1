"""The checks of 11_model_parallelism accept correct answers and refuse the common mistakes, each by name."""

from __future__ import annotations

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
# 11.1: the fused QKV split by heads
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
# 11.2: GPipe's idle fraction, simulated
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


IDLE_WRONG = {
    "the formula for equal stages": (formula_only, "assumes equal stages"),
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


@pytest.mark.parametrize("fn", [gpipe_idle, gpipe_idle_backward_last_first], ids=lambda f: f.__name__)
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
                                torch.tensor(activation_bytes(s, b, h, a, t, sequence_parallel), dtype=torch.float64)],
                         ids=["formula", "by parts", "tensor"])
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

@pytest.mark.parametrize("check, exercise", [(checks.check_shard_qkv, "11.1"), (checks.check_gpipe_idle_fraction, "11.2"),
                                             (checks.check_activation_bytes, "11.3")])
def test_stubs_and_crashes(check, exercise):
    def stub(*args, **kwargs):
        raise NotImplementedError(f"Exercise {exercise} is not done yet")

    with pytest.raises(NotAttempted, match=f"Exercise {exercise} is not done yet"):
        check(stub)
    with pytest.raises(StudentCodeError, match="raised ZeroDivisionError"):
        check(lambda *args, **kwargs: 1 / 0)


@pytest.mark.parametrize("exercise", ["11.1", "11.2", "11.3"])
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


def idle_from_the_course_timeline(t_f, t_b, m):
    timeline = pipeline.gpipe_timeline(list(t_f), list(t_b), m)
    end = max(stop for stage in timeline for *_, stop in stage)
    return 1 - m * sum(f + b for f, b in zip(t_f, t_b)) / (len(t_f) * end)


REFERENCE_CALLS = {
    "11.1 directly": (checks.check_shard_qkv, lambda t, H, r, W: tensor_parallel.shard_qkv(t, H, r, W),
                      "course_lib.distributed.tensor_parallel.shard_qkv"),
    "11.1 under another name": (checks.check_shard_qkv, lambda t, H, r, W: rows_of_rank(t, H, r, W),
                                "course_lib.distributed.tensor_parallel.shard_qkv"),
    "11.2 the course's timeline": (checks.check_gpipe_idle_fraction, idle_from_the_course_timeline,
                                   "course_lib.distributed.pipeline.gpipe_timeline"),
    "11.2 under another name": (checks.check_gpipe_idle_fraction, lambda t_f, t_b, m: idle(pipeline.gpipe_timeline(
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
