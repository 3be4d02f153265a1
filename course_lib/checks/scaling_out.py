"""Checks of notebooks/10_scaling_out.ipynb (exercises 10.*), with their hints."""

from __future__ import annotations

from collections.abc import Callable

import torch

from course_lib.checks.framework import (
    register_hint, fail, call_student, passed,
)


# ----------------------------------------------------------------------------------------------
# ---- 10_scaling_out: memory per GPU with mixed-precision Adam and ZeRO stages 0-3
# ----------------------------------------------------------------------------------------------

register_hint("10.1", "Per parameter: 2 bytes of bf16 weights, 2 of bf16 gradients, 12 of Adam state (fp32 master "
                      "copy + two moments). Stage 1 divides the 12 by n_gpus, stage 2 also the gradients' 2, "
                      "stage 3 also the weights' 2. Return gigabytes: bytes / 1e9.")


def check_zero_memory(fn: Callable[[float, int, int], float]) -> None:
    """Exercise 10.1: ``fn(n_params, n_gpus, zero_stage)`` returns the GB (1e9 bytes) per GPU of bf16 weights,
    bf16 gradients and fp32 Adam states (Rajbhandari et al. 2020, Sec. 3.1 and 5), stage 0 = plain DDP."""
    __tracebackhide__ = True
    import math

    from course_lib.ddp import memory_per_gpu

    cases = [(7.5e9, 64, 0), (7.5e9, 64, 1), (7.5e9, 64, 2), (7.5e9, 64, 3), (135e6, 1, 0), (1e9, 4, 1),
             (1e9, 4, 2), (70e9, 16, 3), (13e9, 8, 2)]

    def with_bytes(n: float, N: int, stage: int, w: float, g: float, k: float) -> float:
        return n * (w / (N if stage >= 3 else 1) + g / (N if stage >= 2 else 1) + k / (N if stage >= 1 else 1)) / 1e9

    for n, N, stage in cases:
        case = f"n_params={n:.3g}, n_gpus={N}, zero_stage={stage}"
        result = call_student(fn, n, N, stage, case=case)
        if isinstance(result, torch.Tensor) and result.numel() == 1:
            result = result.item()
        if isinstance(result, bool) or not isinstance(result, (int, float)):
            fail(f"your function should return one number (gigabytes per GPU), but on {case} it returns a "
                 f"{type(result).__name__}.")
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
