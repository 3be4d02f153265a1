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
    """The GPUs are always hidden: on a GPU machine (CUDA_VISIBLE_DEVICES set or not) this would otherwise run
    the full benchmark instead of checking the refusal."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
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


def _fake_asset(cache: Path, monkeypatch) -> Path:
    """A registered asset 'fake' cached in ``cache`` with its manifest, pinned like the real ones."""
    import hashlib

    from course_lib.tools import assets

    monkeypatch.setenv("COURSE_CACHE", str(cache))
    payload = os.urandom(300_000)
    files = {"weights.bin": {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}}
    monkeypatch.setitem(assets.ASSETS, "fake", assets.Asset(
        package="fake-package", version="1.0", filename="fake-1.0.tar.gz", sha256="ab" * 32,
        files_sha256=assets.tree_digest({"weights.bin": files["weights.bin"]["sha256"]}), kind="sdist",
        members=("x/",), strip="x/", nested=None, licence="MIT", what="a test asset", size_mb=0.3))
    folder = cache / "fake-package" / "1.0"
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(payload)
    (folder / "MANIFEST.json").write_text(json.dumps({"archive_sha256": "ab" * 32, "files": files}))
    return folder


def _cut(data: bytes, tmp_path: Path, part_bytes: int, name: str = "fake") -> list[Path]:
    """The parts and index.json pack writes, one part per transfer folder."""
    import hashlib

    pieces = [data[i:i + part_bytes] for i in range(0, len(data), part_bytes)]
    roots = []
    for k, piece in enumerate(pieces):
        root = tmp_path / f".gpu-transfer-{k + 1}"
        root.mkdir()
        (root / f"{name}.tar.part{k:02d}").write_bytes(piece)
        (root / "index.json").write_text(json.dumps({name: {"sha256": hashlib.sha256(data).hexdigest(),
                                                            "parts": len(pieces)}}))
        roots.append(root)
    return roots


def _tar(folder: Path, cache: Path, extra: list[tarfile.TarInfo] = (),
         payloads: dict[str, bytes] | None = None) -> bytes:
    import io

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(folder, arcname=str(folder.relative_to(cache)))
        for info in extra:
            data = (payloads or {}).get(info.name, b"")
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buffer.getvalue()


def _pack_fake(tmp_path: Path, part_bytes: int, monkeypatch) -> tuple[Path, list[Path]]:
    cache = tmp_path / "cache"
    folder = _fake_asset(cache, monkeypatch)
    return folder, _cut(_tar(folder, cache), tmp_path, part_bytes)


def test_parts_reassemble_into_the_same_files(tmp_path, monkeypatch):
    folder, roots = _pack_fake(tmp_path, 120_000, monkeypatch)
    assert len(roots) == 3
    target = tmp_path / "there"
    assert gpu_bundle.unpack(roots[:2], cache=target) == [], "an incomplete set of parts is not extracted"
    assert gpu_bundle.unpack(roots, cache=target) == ["fake"]
    assert (target / "fake-package" / "1.0" / "weights.bin").read_bytes() == (folder / "weights.bin").read_bytes()
    assert sorted(p.name for p in (target / "fake-package").iterdir()) == ["1.0"], "no staging folder is left"


def test_a_damaged_part_stops_with_one_sentence(tmp_path, monkeypatch):
    _, roots = _pack_fake(tmp_path, 120_000, monkeypatch)
    part = next(roots[1].glob("*.part*"))
    part.write_bytes(b"x" + part.read_bytes()[1:])
    with pytest.raises(SystemExit, match="do not reassemble to the packed archive"):
        gpu_bundle.unpack(roots, cache=tmp_path / "there")


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize("member", [
    _member("../escaped.txt"),
    _member("fake-package/1.0/../../../escaped.txt"),
    _member("/tmp/escaped.txt"),
    _member("fake-package/1.0/link", tarfile.SYMTYPE, "weights.bin"),
    _member("fake-package/1.0/hard", tarfile.LNKTYPE, "fake-package/1.0/weights.bin"),
    _member("derived/smollm2-135m-instruct-f32/config.json"),  # another cache folder than the asset's own
])
def test_a_member_outside_the_assets_own_folder_or_not_a_plain_file_is_refused(tmp_path, monkeypatch, member):
    cache = tmp_path / "cache"
    folder = _fake_asset(cache, monkeypatch)
    roots = _cut(_tar(folder, cache, [member], {member.name: b"gotcha"}), tmp_path, 10**7)
    target = tmp_path / "there"
    with pytest.raises(SystemExit, match=r"refusing to extract '.*' from fake's parts: only files inside "
                                         r"fake-package/1\.0/ may be there"):
        gpu_bundle.unpack(roots, cache=target)
    assert not target.exists() or not any(target.rglob("*")), "nothing was extracted"
    assert not list(tmp_path.rglob("escaped.txt"))


def test_parts_and_index_forged_together_are_refused_by_the_assets_pins(tmp_path, monkeypatch):
    """The index only checks the transfer: a bundle whose files (and their manifest lines) were changed and
    whose index.json was rewritten to match is still refused, because the asset's pin is in the code."""
    import hashlib

    cache = tmp_path / "cache"
    folder = _fake_asset(cache, monkeypatch)
    forged = b"forged weights"
    (folder / "weights.bin").write_bytes(forged)
    (folder / "MANIFEST.json").write_text(json.dumps({"archive_sha256": "ab" * 32, "files": {
        "weights.bin": {"size": len(forged), "sha256": hashlib.sha256(forged).hexdigest()}}}))
    roots = _cut(_tar(folder, cache), tmp_path, 10**7)
    target = tmp_path / "there"
    with pytest.raises(SystemExit, match=r"the parts of fake do not hold the pinned asset \(its MANIFEST\.json lists "
                                         r"other files or hashes than the pinned ones"):
        gpu_bundle.unpack(roots, cache=target)
    assert not (target / "fake-package" / "1.0").exists()


# ---- wheels: pinned by hash, downloaded and installed with pip's --require-hashes ------------------------

def test_every_wheel_is_pinned_by_its_sha256():
    needed = {wheel for _, wheels in gpu_bundle.NEEDS.values() for wheel in wheels}
    assert needed <= set(gpu_bundle.WHEELS)
    assert all(len(sha) == 64 and int(sha, 16) >= 0 for sha in gpu_bundle.WHEELS.values())


def test_pack_downloads_the_wheels_with_require_hashes(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_bundle.NEEDS, "wheels-only", ((), ("gguf==0.19.0", "dill==0.4.1")))
    seen = []

    def run(command, **kwargs):
        requirements = Path(command[command.index("-r") + 1]).read_text()
        seen.append((command, requirements))

    monkeypatch.setattr(gpu_bundle.subprocess, "run", run)
    gpu_bundle.pack(["wheels-only"], root=tmp_path)
    (command, requirements), = seen
    assert command[3:5] == ["download", "--no-deps"] and "--require-hashes" in command
    assert requirements == (f"dill==0.4.1 --hash=sha256:{gpu_bundle.WHEELS['dill==0.4.1']}\n"
                            f"gguf==0.19.0 --hash=sha256:{gpu_bundle.WHEELS['gguf==0.19.0']}\n")
    assert not any(arg.endswith("==0.19.0") for arg in command), "no wheel is named by its version alone"


def test_install_refuses_a_wheel_that_is_not_the_pinned_one(tmp_path, monkeypatch):
    (tmp_path / ".whl").mkdir()
    wheel = tmp_path / ".whl" / "gguf-0.19.0-py3-none-any.whl"
    wheel.write_bytes(b"a wheel with other bytes")
    monkeypatch.setattr(gpu_bundle.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    with pytest.raises(SystemExit, match=r"gguf-0\.19\.0-py3-none-any\.whl does not have the SHA-256 pinned for "
                                         r"gguf==0\.19\.0"):
        gpu_bundle.install(root=tmp_path, target=tmp_path / "site")
    wheel.unlink()
    (tmp_path / ".whl" / "requests-2.0-py3-none-any.whl").write_bytes(b"x")
    with pytest.raises(SystemExit, match=r"requests-2\.0-py3-none-any\.whl in \.whl is not a wheel gpu_bundle"):
        gpu_bundle.install(root=tmp_path, target=tmp_path / "site")


def test_install_hands_pip_the_pins_from_the_repository_not_from_the_bundle(tmp_path, monkeypatch):
    (tmp_path / ".whl").mkdir()
    monkeypatch.setitem(gpu_bundle.WHEELS, "dill==0.4.1", hashlib_of(b"a pinned wheel"))
    (tmp_path / ".whl" / "dill-0.4.1-py3-none-any.whl").write_bytes(b"a pinned wheel")
    (tmp_path / ".whl" / "requirements.txt").write_text("dill==0.4.1 --hash=sha256:" + "0" * 64)  # ignored
    seen = []
    monkeypatch.setattr(gpu_bundle.subprocess, "run",
                        lambda command, **k: seen.append((command, Path(command[-1]).read_text())))
    assert gpu_bundle.install(root=tmp_path, target=tmp_path / "site") == ["dill==0.4.1"]
    (command, requirements), = seen
    assert "--require-hashes" in command and "--no-index" in command
    assert requirements == f"dill==0.4.1 --hash=sha256:{hashlib_of(b'a pinned wheel')}\n"
    script = (REPO / "scripts" / "gpu_record.sh").read_text()
    assert "gpu_bundle.py install" in script and "pip install" not in script


def hashlib_of(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()
