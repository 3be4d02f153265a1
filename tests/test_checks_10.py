"""The check of 10_scaling_out accepts correct memory formulas and refuses each common mistake."""

from __future__ import annotations

import pytest
import torch

from course_lib import checks
from course_lib.checks import CheckFailed, NotAttempted, StudentCodeError


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


@pytest.mark.parametrize("fn", [by_parts, zero_paper_formula, as_tensor])
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
        raise NotImplementedError("Exercise 10.1 is not done yet")

    with pytest.raises(NotAttempted, match="Exercise 10.1 is not done yet"):
        checks.check_zero_memory(stub)
    with pytest.raises(StudentCodeError, match="raised ZeroDivisionError"):
        checks.check_zero_memory(lambda n, N, s: n / 0)


def test_hint_exists(capsys):
    checks.hint("10.1")
    assert "12 of Adam state" in capsys.readouterr().out
