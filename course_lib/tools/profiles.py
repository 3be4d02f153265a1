"""Run profiles: one switch that sizes every notebook for CI, a laptop CPU or a GPU.

Explained in notebooks/00_setup.ipynb ("Profiles").

* ``ci``  -- 2 CPU cores; the whole nbval run takes minutes. Chosen when the ``CI`` env var is set.
* ``cpu`` -- a student laptop; each notebook well under 10 minutes. Chosen when there is no CUDA.
* ``gpu`` -- full-size results on one CUDA GPU. Chosen when CUDA is available.

``COURSE_PROFILE=ci|cpu|gpu`` overrides the detection.

Apple silicon: the ``cpu`` profile stays on the CPU by default, because some ops the course uses
(bf16 autocast, a few index ops in older torch releases) gave wrong results or were missing on MPS.
Set ``COURSE_MPS=1`` to run the ``cpu`` profile on MPS at your own risk; the checked numbers in the
notebooks are only promised on the CPU and on CUDA.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The repository's root folder: course_lib/tools/profiles.py is two folders below it.
REPO = Path(__file__).resolve().parents[2]

PROFILE_NAMES = ("ci", "cpu", "gpu")

# Size knobs shared by several notebooks. A notebook that needs a one-off size uses
# ``profile.pick(ci=..., cpu=..., gpu=...)`` instead of growing this table.
KNOBS: dict[str, dict[str, Any]] = {
    "ci": dict(d_model=64, n_layer=2, n_head=4, context=64, batch_size=16, train_steps=60,
               eval_batches=4, n_train_examples=400, n_eval_examples=200, sweep_sizes=3),
    "cpu": dict(d_model=128, n_layer=4, n_head=4, context=128, batch_size=32, train_steps=600,
                eval_batches=20, n_train_examples=3000, n_eval_examples=1000, sweep_sizes=5),
    "gpu": dict(d_model=384, n_layer=6, n_head=6, context=256, batch_size=64, train_steps=3000,
                eval_batches=50, n_train_examples=None, n_eval_examples=None, sweep_sizes=8),
}


class UnknownProfileError(ValueError):
    """``COURSE_PROFILE`` named a profile that does not exist."""


@dataclass(frozen=True)
class Profile:
    """The profile a notebook runs under: its name, its torch device and its size knobs."""

    name: str
    device: torch.device
    knobs: dict[str, Any] = field(default_factory=dict)
    reason: str = ""

    def __getattr__(self, item: str) -> Any:
        knobs = object.__getattribute__(self, "knobs")
        if item in knobs:
            return knobs[item]
        raise AttributeError(f"profile {self.name!r} has no knob {item!r}; known knobs: {sorted(knobs)}")

    def pick(self, *, ci: Any, cpu: Any, gpu: Any) -> Any:
        """The value for this profile, e.g. ``steps = profile.pick(ci=20, cpu=300, gpu=3000)``."""
        return {"ci": ci, "cpu": cpu, "gpu": gpu}[self.name]

    @property
    def is_gpu(self) -> bool:
        return self.device.type == "cuda"

    def __str__(self) -> str:
        return f"profile {self.name!r} on {self.device} ({self.reason})"


def _mps_usable() -> bool:
    return (os.environ.get("COURSE_MPS") == "1" and hasattr(torch.backends, "mps")
            and torch.backends.mps.is_available())


def get_profile(name: str | None = None) -> Profile:
    """Detect the profile (``CI`` env var -> ci; CUDA -> gpu; else cpu), or honour ``COURSE_PROFILE``."""
    requested = name if name is not None else os.environ.get("COURSE_PROFILE")
    if requested:
        requested = requested.strip().lower()
        if requested not in PROFILE_NAMES:
            raise UnknownProfileError(
                f"Unknown profile {requested!r}: COURSE_PROFILE must be one of ci, cpu, gpu "
                f"(or unset it to detect the profile automatically).")
        reason = "chosen by COURSE_PROFILE" if name is None else "chosen by the caller"
        chosen = requested
    elif os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        chosen, reason = "ci", "detected: the CI environment variable is set"
    elif torch.cuda.is_available():
        chosen, reason = "gpu", f"detected: CUDA device {torch.cuda.get_device_name(0)}"
    else:
        chosen, reason = "cpu", "detected: no CUDA device"

    if chosen == "gpu":
        if not torch.cuda.is_available():
            raise UnknownProfileError(
                "The gpu profile needs a CUDA GPU and none is visible to torch: "
                "use COURSE_PROFILE=cpu, or install a CUDA build of torch.")
        device = torch.device("cuda")
    elif chosen == "cpu" and _mps_usable():
        device, reason = torch.device("mps"), reason + "; MPS enabled by COURSE_MPS=1"
    else:
        device = torch.device("cpu")
    return Profile(name=chosen, device=device, knobs=dict(KNOBS[chosen]), reason=reason)


def seed_everything(seed: int = 0, *, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so a notebook's checked numbers repeat exactly.

    With ``deterministic`` (the default) it also asks torch for deterministic kernels where it has them
    (``warn_only`` so that an op without a deterministic version still runs); sections that time
    throughput turn them off with ``course_lib.tools.timing.timing_section``. The CPU thread count is set by
    ``course_lib.start`` from the profile, not here.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=deterministic)
    os.environ["PYTHONHASHSEED"] = str(seed)


def package_versions() -> dict[str, str]:
    """Python and the course's key packages, each by its installed version ("not installed" if missing)."""
    import importlib.metadata as md
    import platform

    versions = {"python": platform.python_version()}
    for package in ("torch", "transformers", "datasets", "tokenizers", "peft", "course_lib"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def code_version() -> str:
    """The git commit the course code runs from, e.g. ``"810f12b…"``, with ``"-dirty"`` if tracked files differ.

    Where there is no ``.git`` (a copy carried to another machine), set ``COURSE_COMMIT`` to the commit
    the copy was made from; it is reported as given, followed by ``" (from COURSE_COMMIT)"``.
    """
    import subprocess

    given = os.environ.get("COURSE_COMMIT", "").strip()
    if given:
        return f"{given} (from COURSE_COMMIT)"
    repo = REPO
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git checkout; set COURSE_COMMIT)"
    return commit + ("-dirty" if changed else "")


def machine_load() -> dict[str, Any]:
    """What else the machine was doing: the 1-minute load average and the CPU count (timings depend on it)."""
    try:
        load1 = round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        load1 = None
    return {"load_average_1min": load1, "cpu_count": os.cpu_count()}


def cpu_name() -> str:
    """The CPU model, e.g. "AMD EPYC 7B13" (platform.processor() is empty on most Linux systems)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_environment(profile: Profile | None = None) -> dict[str, str]:
    """Versions and hardware worth printing at the top of every notebook."""
    profile = profile or get_profile()
    info = {"profile": profile.name, "device": str(profile.device), **package_versions()}
    if profile.is_gpu:
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
