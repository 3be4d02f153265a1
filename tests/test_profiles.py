import random

import numpy as np
import pytest
import torch

from course_lib.tools import profiles, timing
from course_lib.tools.profiles import UnknownProfileError, get_profile, seed_everything


def test_env_override_picks_each_profile(monkeypatch):
    for name in ("ci", "cpu"):
        monkeypatch.setenv("COURSE_PROFILE", name)
        profile = get_profile()
        assert profile.name == name
        assert profile.device == torch.device("cpu")
        assert "COURSE_PROFILE" in profile.reason


def test_detection_order(monkeypatch):
    monkeypatch.delenv("COURSE_PROFILE", raising=False)
    monkeypatch.setenv("CI", "true")
    assert get_profile().name == "ci"
    monkeypatch.setenv("CI", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert get_profile().name == "cpu"


def test_cuda_means_gpu_profile(monkeypatch):
    monkeypatch.delenv("COURSE_PROFILE", raising=False)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Fake GPU")
    profile = get_profile()
    assert profile.name == "gpu" and profile.device.type == "cuda" and "Fake GPU" in profile.reason


def test_unknown_profile_is_one_clear_sentence(monkeypatch):
    monkeypatch.setenv("COURSE_PROFILE", "laptop")
    with pytest.raises(UnknownProfileError, match=r"Unknown profile 'laptop'.*ci, cpu, gpu"):
        get_profile()


def test_gpu_profile_without_cuda_is_explained(monkeypatch):
    monkeypatch.setenv("COURSE_PROFILE", "gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UnknownProfileError, match="needs a CUDA GPU"):
        get_profile()


@pytest.mark.parametrize("available", [True, False])
def test_mps_only_when_asked(monkeypatch, available):
    """An Apple-silicon machine (MPS available, faked here) stays on the CPU unless COURSE_MPS=1."""
    monkeypatch.setenv("COURSE_PROFILE", "cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: available)
    monkeypatch.delenv("COURSE_MPS", raising=False)
    assert get_profile().device.type == "cpu"
    monkeypatch.setenv("COURSE_MPS", "0")
    assert get_profile().device.type == "cpu"
    monkeypatch.setenv("COURSE_MPS", "1")
    profile = get_profile()
    assert profile.device.type == ("mps" if available else "cpu")
    assert ("MPS enabled by COURSE_MPS=1" in profile.reason) == available
    monkeypatch.setenv("COURSE_PROFILE", "ci")  # only the cpu profile moves to MPS
    assert get_profile().device.type == "cpu"


def test_knobs_grow_with_the_profile_and_pick_works(monkeypatch):
    monkeypatch.setenv("COURSE_PROFILE", "ci")
    ci = get_profile()
    cpu = get_profile("cpu")
    assert set(profiles.KNOBS["ci"]) == set(profiles.KNOBS["cpu"]) == set(profiles.KNOBS["gpu"])
    assert ci.train_steps < cpu.train_steps and ci.d_model <= cpu.d_model
    assert ci.pick(ci=1, cpu=2, gpu=3) == 1 and cpu.pick(ci=1, cpu=2, gpu=3) == 2
    with pytest.raises(AttributeError, match="no knob 'bogus'"):
        _ = ci.bogus


def test_seed_everything_repeats_every_generator():
    def draw():
        return random.random(), np.random.rand(), torch.randn(3).tolist(), torch.nn.Linear(4, 2).weight.sum().item()

    seed_everything(123)
    first = draw()
    seed_everything(123)
    assert draw() == first
    seed_everything(124)
    assert draw() != first


def test_timing_section_turns_deterministic_algorithms_off_and_restores_them():
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        seed_everything(0)  # what course_lib.start() does
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        with timing.timing_section():
            assert not torch.are_deterministic_algorithms_enabled()
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        with pytest.raises(RuntimeError, match="boom"), timing.timing_section():
            raise RuntimeError("boom")
        assert torch.are_deterministic_algorithms_enabled(), "restored after an error too"
        seed_everything(0, deterministic=False)
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
