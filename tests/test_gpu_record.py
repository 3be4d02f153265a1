"""The GPU record's script cannot rot while no GPU is available: its CPU form runs here, and the way its
assets travel (cut into parts, reassembled, hash-checked) is tested with a small fake asset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import gpu_bundle  # noqa: E402


def test_unknown_part_is_one_sentence():
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_record.sh"), "everything"], capture_output=True,
                          text=True)
    assert done.returncode == 2 and "unknown part 'everything'" in done.stderr


def test_without_a_gpu_the_full_form_refuses_and_names_the_quick_one():
    if os.environ.get("CUDA_VISIBLE_DEVICES") is None:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    else:
        env = dict(os.environ)
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_record.sh"), "bench"], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 1 and "run with --quick" in done.stderr


@pytest.mark.slow
def test_quick_form_runs_every_default_part_and_writes_outside_the_record(tmp_path):
    env = {**os.environ, "QUICK_OUT": str(tmp_path), "COURSE_COMMIT": "test"}
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_record.sh"), "--quick"], capture_output=True,
                          text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    bench = json.loads((tmp_path / "gpu_benchmarks_quick.json").read_text())
    assert bench["reduced"] is True or bench.get("provenance", {}).get("reduced") is True
    run = json.loads((tmp_path / "lora_causal_lm_quick.json").read_text())
    result = run["results"]
    assert run["provenance"]["commit"] == "test (from COURSE_COMMIT)"
    assert {"zero-shot", "2-shot"} <= set(result["scores"]) and len(result["lora"]) == 1
    assert result["lora"][0]["losses"] and set(result["step_comparison"]) == {"ours", "peft", "ours + checkpointing"}
    assert not (REPO / "data" / "results" / "lora_causal_lm_ci.json").exists()


def _fake_asset(cache: Path) -> Path:
    folder = cache / "fake-package" / "1.0"
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(os.urandom(300_000))
    (folder / "MANIFEST.json").write_text("{}")
    return folder


def _pack_fake(tmp_path: Path, part_bytes: int) -> tuple[Path, list[Path]]:
    cache = tmp_path / "cache"
    folder = _fake_asset(cache)
    import hashlib
    import io

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(folder, arcname=str(folder.relative_to(cache)))
    data = buffer.getvalue()
    pieces = [data[i:i + part_bytes] for i in range(0, len(data), part_bytes)]
    roots = []
    for k, piece in enumerate(pieces):
        root = tmp_path / f".gpu-transfer-{k + 1}"
        root.mkdir()
        (root / f"fake.tar.part{k:02d}").write_bytes(piece)
        (root / "index.json").write_text(json.dumps({"fake": {"sha256": hashlib.sha256(data).hexdigest(),
                                                              "parts": len(pieces)}}))
        roots.append(root)
    return folder, roots


def test_parts_reassemble_into_the_same_files(tmp_path):
    folder, roots = _pack_fake(tmp_path, 120_000)
    assert len(roots) == 3
    target = tmp_path / "there"
    assert gpu_bundle.unpack(roots[:2], cache=target) == [], "an incomplete set of parts is not extracted"
    assert gpu_bundle.unpack(roots, cache=target) == ["fake"]
    assert (target / "fake-package" / "1.0" / "weights.bin").read_bytes() == (folder / "weights.bin").read_bytes()


def test_a_damaged_part_stops_with_one_sentence(tmp_path):
    _, roots = _pack_fake(tmp_path, 120_000)
    part = next(roots[1].glob("*.part*"))
    part.write_bytes(b"x" + part.read_bytes()[1:])
    with pytest.raises(SystemExit, match="do not reassemble to the packed archive"):
        gpu_bundle.unpack(roots, cache=tmp_path / "there")
