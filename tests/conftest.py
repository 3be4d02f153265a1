"""Shared test set-up: the ci profile, no Hub, and the course cache."""

import os

import pytest

os.environ.setdefault("COURSE_PROFILE", "ci")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer from the course cache (tests of lesson 09's library and checks)."""
    from transformers import AutoTokenizer

    from course_lib.tools import assets

    derived = assets.cache_dir() / "derived" / "smollm2-135m-instruct-f32"
    if not (derived / "tokenizer.json").is_file():  # made by `make assets`; the model is not needed here
        assets.load_causal_lm("smollm2-135m-instruct")
    return AutoTokenizer.from_pretrained(derived)


@pytest.fixture(scope="session")
def core_path_time():
    """scripts/core_path_time.py as a module: core-path words and time of a lesson, and a student's measured read."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "core_path_time", Path(__file__).resolve().parent.parent / "scripts" / "core_path_time.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                 # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module
