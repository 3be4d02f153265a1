"""What CI relies on: the notebook kernels nbval starts get the same no-Hub environment as the unit tests, a
broken bitsandbytes fails a CI run instead of skipping its tests, the real-fetch test says why it fails
offline, and the GPU-record test cannot start the full benchmark on a GPU machine."""

from __future__ import annotations

import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_nbval_kernels_get_the_no_hub_environment():
    """nbval runs with -c /dev/null, so tests/conftest.py never reaches the kernels: the Makefile sets it."""
    if shutil.which("make") is None:
        pytest.fail("make is needed to run the course (make test): install it")
    dry = subprocess.run(["make", "-n", "-C", str(REPO), "nbval-solution", "nbval-student"], capture_output=True,
                         text=True, check=True).stdout
    commands = [line for line in dry.splitlines() if "-m pytest" in line and "--nbval-lax" in line]
    assert len(commands) == 2, dry
    for command in commands:
        environment = command.split("-m pytest")[0]
        for setting in ("COURSE_PROFILE=ci", "HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1"):
            assert setting in environment, f"{setting} does not reach nbval's kernels: {command}"


@pytest.mark.parametrize("ci, outcome", [("true", ImportError), (None, pytest.skip.Exception)])
def test_a_broken_bitsandbytes_fails_under_ci_and_skips_elsewhere(monkeypatch, ci, outcome):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    if ci:
        monkeypatch.setenv("CI", ci)
    else:
        monkeypatch.delenv("CI", raising=False)
    try:
        runpy.run_path(str(REPO / "tests" / "test_quant.py"))
        raised = None
    except BaseException as error:  # noqa: BLE001 -- a skip raised here would skip this test, not fail it
        raised = error
    assert isinstance(raised, outcome), f"CI={ci}: collecting test_quant.py raised {raised!r}, not {outcome.__name__}"


def test_the_real_fetch_test_fails_offline_with_its_reason(tmp_path, monkeypatch):
    import test_assets

    test = test_assets.test_real_sdist_fetch_into_a_fresh_cache
    assert "index" in [mark.name for mark in getattr(test, "pytestmark", [])], "it carries the 'index' marker"
    for variable, value in (("PIP_CONFIG_FILE", "/dev/null"), ("PIP_INDEX_URL", "http://127.0.0.1:9/simple"),
                            ("PIP_EXTRA_INDEX_URL", ""), ("PIP_FIND_LINKS", ""), ("PIP_NO_INDEX", ""),
                            ("PIP_TIMEOUT", "2")):
        monkeypatch.setenv(variable, value)
    with pytest.raises(pytest.fail.Exception, match=r"this test needs the package index pip is configured with.*"
                                                    r"deselect it with -m 'not index'"):
        test(tmp_path, monkeypatch)


def test_the_gpu_refusal_test_hides_the_gpus_even_where_cuda_visible_devices_is_set(monkeypatch):
    import test_gpu_record

    seen = []

    def run(command, **kwargs):
        seen.append(kwargs["env"].get("CUDA_VISIBLE_DEVICES"))
        return SimpleNamespace(returncode=1, stderr="error: no CUDA GPU is visible to torch; run with --quick")

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # a GPU machine
    monkeypatch.setattr(test_gpu_record.subprocess, "run", run)
    test_gpu_record.test_without_a_gpu_the_full_form_refuses_and_names_the_quick_one()
    assert seen == [""]
