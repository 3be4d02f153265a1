"""The one timer of the course, and model-FLOPs utilisation (MFU).

Explained in notebooks/04_training_a_language_model.ipynb (tokens/s and MFU) and 10_scaling_out.ipynb.

A GPU runs asynchronously: a PyTorch call returns as soon as its kernel is *queued*, so reading the
clock around GPU work measures how fast Python launched the kernels, not how long they took. Every
duration the course measures therefore goes through this module, which waits for the device
(``torch.cuda.synchronize``) before it reads the clock at the start and at the end::

    with Stopwatch(device) as watch:
        model(x)
    watch.seconds

    seconds = fastest(lambda: model(x), repeats=5, device=device)

On a CPU the waiting costs nothing. ``now()`` is the wall clock for events that are not device work
(when a process started, when a file was written); tests/test_layers.py checks that no other module
reads a clock itself.

MFU = tokens/s × training FLOPs per token / the GPU's dense bf16 peak (``mfu``); the peaks come from
the vendors' datasheets (``PEAK_BF16_FLOPS``).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["sync", "clock", "now", "Stopwatch", "seconds_of", "fastest", "median_seconds", "timing_section", "PEAK_BF16_FLOPS",
           "peak_for_name", "peak_flops", "MFU", "mfu"]


def sync(device: torch.device | str | None = None) -> None:
    """Wait until the device has finished the work queued so far (a no-op on the CPU).

    ``device=None`` waits for the current CUDA device if CUDA is in use at all."""
    if device is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.synchronize()


def clock(device: torch.device | str | None = None) -> float:
    """A point in time (seconds, ``time.perf_counter``) read after the device has finished its queued work:
    for timelines, where each event's start and end are kept (lesson 11's pipeline)."""
    sync(device)
    return time.perf_counter()


def now() -> float:
    """Wall-clock seconds since the epoch, for events that are not device work (start-up, files)."""
    return time.time()


class Stopwatch:
    """Seconds of the code inside ``with Stopwatch(device) as watch:``, device work included.

    Synchronises the device on entry and on exit. ``watch.seconds`` is read after the block; a watch
    can also be started and stopped by hand (``start()``, ``stop()`` returns the seconds), and
    ``lap()`` gives the seconds since ``start()`` without stopping (synchronised too)."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = device
        self.seconds = 0.0
        self._start: float | None = None

    def start(self) -> Stopwatch:
        self._start = clock(self.device)
        return self

    def lap(self) -> float:
        if self._start is None:
            raise RuntimeError("the stopwatch was not started: call start() first or use it in a with block.")
        return clock(self.device) - self._start

    def stop(self) -> float:
        self.seconds = self.lap()
        self._start = None
        return self.seconds

    def __enter__(self) -> Stopwatch:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def seconds_of(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1,
               device: torch.device | str | None = None) -> list[float]:
    """The seconds of each of ``repeats`` synchronised calls of ``fn``, after ``warmup`` untimed ones: every
    repeat, to judge how noisy a timing was (:func:`fastest` and :func:`median_seconds` summarise them)."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}.")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        with Stopwatch(device) as watch:
            fn()
        times.append(watch.seconds)
    return times


def fastest(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1,
            device: torch.device | str | None = None) -> float:
    """The fastest of ``repeats`` synchronised calls of ``fn`` (after ``warmup`` untimed ones), in seconds.

    The minimum is the least disturbed by other work on the machine: noise only ever adds time."""
    return min(seconds_of(fn, repeats=repeats, warmup=warmup, device=device))


def median_seconds(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1,
                   device: torch.device | str | None = None) -> float:
    """The median of ``repeats`` synchronised calls of ``fn`` (after ``warmup`` untimed ones), in seconds."""
    return statistics.median(seconds_of(fn, repeats=repeats, warmup=warmup, device=device))


@contextlib.contextmanager
def timing_section() -> Iterator[None]:
    """Time throughput with torch's fast kernels: deterministic algorithms off inside, the previous
    setting (and its ``warn_only``) restored after.

    ``course_lib.start()`` turns deterministic algorithms on so that checked numbers repeat; on a GPU
    some deterministic kernels are slower than the default ones, so a tokens/s or MFU measured with
    them on would describe the reproducible path, not the fast one. Record
    ``torch.are_deterministic_algorithms_enabled()`` *inside* the section with the timing
    (``course_lib.experiments.bench`` does, in its provenance)."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


# Dense (no 2:4 sparsity) bf16 tensor-core peaks, FLOP/s, matched against torch.cuda.get_device_name()
# (e.g. "NVIDIA H100 80GB HBM3" for the SXM board, "NVIDIA H100 NVL", "NVIDIA H100 PCIe", "NVIDIA H200",
# "NVIDIA A100-SXM4-80GB"). Sources, dense bf16 = half the datasheets' figures "with sparsity":
# NVIDIA A100 datasheet: 312 TFLOP/s (SXM and PCIe alike). NVIDIA H100 datasheet: SXM 1,979 -> 989,
# NVL 1,671 -> 835, PCIe 1,513 -> 756. NVIDIA H200 datasheet: SXM 1,979 -> 989, NVL 1,671 -> 835.
# Lookup (peak_for_name): the longest key contained in the name wins, so "H100 NVL" and "H100 PCIe" are
# never scored against the SXM peak that the plain "H100" stands for.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H100": 989e12,        # SXM
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H200": 989e12,        # SXM
    "H200 NVL": 835e12,
    "A100": 312e12,
}


def peak_for_name(device_name: str) -> tuple[str, float] | None:
    """``(key, dense bf16 FLOP/s)`` of ``PEAK_BF16_FLOPS`` for a CUDA device name, or None if unknown."""
    name = device_name.lower()
    matches = [key for key in PEAK_BF16_FLOPS if key.lower() in name]
    if not matches:
        return None
    key = max(matches, key=len)
    return key, PEAK_BF16_FLOPS[key]


def peak_flops(device: torch.device | str | None = None) -> float | None:
    """The dense bf16 peak FLOP/s of a CUDA device from ``PEAK_BF16_FLOPS``; None on CPU or if unknown."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None
    found = peak_for_name(torch.cuda.get_device_name(device))
    return found[1] if found else None


@dataclass(frozen=True)
class MFU:
    """Model-FLOPs utilisation of a run: ``value`` (a fraction of the peak) or None, and ``reason``,
    which names the peak used or says why there is none. ``str()`` gives e.g. "37.1% of ..."."""

    value: float | None
    peak_flops: float | None
    reason: str

    def __str__(self) -> str:
        return f"{100 * self.value:.1f}% {self.reason}" if self.value is not None else f"not defined: {self.reason}"


def mfu(tokens_per_s: float, flops_per_token: float, device: torch.device | str | None = None, *,
        amp: str = "bf16") -> MFU:
    """MFU = tokens/s × training FLOPs per token / the GPU's dense bf16 peak, the one definition the
    course uses (notebooks 04, 09, 10; the training loop and ``course_lib.experiments.bench``).

    ``flops_per_token`` counts the training FLOPs of one token (``course_lib.parts.model.flops_per_token``
    for the GPT, ≈ 6N; ≈ 4N for LoRA, where no weight gradients of the frozen base are computed).
    ``amp`` is how the run computed: "bf16" (or "auto", which is bf16 autocast on CUDA, as in the loop)
    is scored against ``PEAK_BF16_FLOPS``; "none" (fp32 matmuls) is not held to a bf16 peak and gets
    None, as do CPUs and GPUs missing from the table. ``device`` defaults to the current CUDA device.
    """
    if amp not in ("auto", "bf16", "none"):
        raise ValueError(f"amp must be 'auto', 'bf16' or 'none' (as in the loop's settings), got {amp!r}.")
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return MFU(None, None, f"there is no bf16 tensor-core peak for a {device.type} device; MFU is "
                               f"measured on CUDA GPUs only")
    if amp == "none":
        return MFU(None, None, "the run computed in fp32 (amp='none'), so it is not scored against the "
                               "dense bf16 peak")
    name = torch.cuda.get_device_name(device)
    found = peak_for_name(name)
    if found is None:
        return MFU(None, None, f"{name} is not in course_lib.tools.timing.PEAK_BF16_FLOPS (add its dense bf16 "
                               f"peak from its datasheet)")
    key, peak = found
    return MFU(tokens_per_s * flops_per_token / peak, peak,
               f"of the {name}'s dense bf16 peak, {peak / 1e12:.0f} TFLOP/s (PEAK_BF16_FLOPS[{key!r}])")
