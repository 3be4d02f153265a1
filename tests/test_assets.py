"""course_lib.tools.assets: pinning, verification, atomic extraction, clear errors, and the real assets."""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from course_lib.tools import assets, cachedir, index
from course_lib.tools.assets import (ASSETS, Asset, AssetHashError, AssetOfflineError, UnknownAssetError, fetch,
                                     is_cached)


def pin_of(files: dict[str, bytes]) -> str:
    """The files_sha256 pin of an asset that extracts exactly ``files``."""
    return assets.tree_digest({name: hashlib.sha256(payload).hexdigest() for name, payload in files.items()})


def make_wheel(path: Path, files: dict[str, bytes]) -> str:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, payload in files.items():
            archive.writestr(name, payload)
    path.write_bytes(buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


@pytest.fixture
def fake_asset(tmp_path, monkeypatch):
    """A registered asset whose 'download' copies a wheel built here: the mechanism without a network."""
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("COURSE_OFFLINE", raising=False)
    source = tmp_path / "fake_pkg-1.0-py3-none-any.whl"
    sha = make_wheel(source, {"fake_pkg/model/weights.bin": b"\x01" * 1000, "fake_pkg/model/config.json": b"{}",
                              "fake_pkg/__init__.py": b""})
    asset = Asset(package="fake-pkg", version="1.0", filename=source.name, sha256=sha,
                  files_sha256=pin_of({"weights.bin": b"\x01" * 1000, "config.json": b"{}"}), kind="wheel",
                  members=("fake_pkg/model/",), strip="fake_pkg/model/", nested=None, licence="MIT",
                  what="a test asset", size_mb=0.001)
    monkeypatch.setitem(ASSETS, "fake", asset)
    calls = []

    def download(name, into):
        calls.append(name)
        into.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(source, into / source.name))

    monkeypatch.setattr(assets, "_download", download)
    return {"source": source, "calls": calls}


def test_fetch_extracts_only_the_needed_files_with_a_manifest(fake_asset):
    folder = fetch("fake")
    assert sorted(p.name for p in folder.iterdir()) == ["MANIFEST.json", "config.json", "weights.bin"]
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert manifest["files"]["weights.bin"]["sha256"] == hashlib.sha256(b"\x01" * 1000).hexdigest()
    assert fetch("fake") == folder and fake_asset["calls"] == ["fake"], "a cached asset is not fetched again"


def test_corrupted_cached_file_is_detected_and_fetched_again(fake_asset):
    folder = fetch("fake")
    (folder / "weights.bin").write_bytes(b"\x02" * 1000)  # same size, different content
    assert not is_cached("fake")
    assert fetch("fake") == folder
    assert (folder / "weights.bin").read_bytes() == b"\x01" * 1000
    assert fake_asset["calls"] == ["fake", "fake"]


def test_truncated_cached_file_is_detected(fake_asset):
    folder = fetch("fake")
    (folder / "weights.bin").write_bytes(b"\x01" * 10)
    assert not is_cached("fake", verify=False), "a size check alone catches truncation"


def test_interrupted_fetch_leaves_nothing_that_looks_valid(fake_asset, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(assets, "_extract", crash)
    with pytest.raises(KeyboardInterrupt):
        fetch("fake")
    assert not assets.asset_dir("fake").exists()
    assert not is_cached("fake")
    leftovers = list(assets.asset_dir("fake").parent.glob("*partial*"))
    assert leftovers == [], "the staging folder is removed"


def test_leftovers_of_a_killed_fetch_are_removed(fake_asset):
    """A fetch killed with SIGKILL cannot clean up after itself: the next fetch removes its staging folder."""
    parent = assets.asset_dir("fake").parent
    leftover = parent / ".1.0.partial-killed"
    (leftover / "staging").mkdir(parents=True)
    (leftover / "staging" / "weights.bin").write_bytes(b"half")
    fetch("fake")
    assert not leftover.exists()
    (leftover / "staging").mkdir(parents=True)  # and again while the asset is cached
    fetch("fake")
    assert not leftover.exists() and fake_asset["calls"] == ["fake"]


def test_simultaneous_fetches_of_one_asset_download_once(fake_asset, monkeypatch):
    """Two fetches at once (threads here; the lock is a file lock, so processes too): the second waits
    for the first and finds the asset cached instead of colliding at the rename."""
    import threading
    import time

    real_extract = assets._extract

    def slow_extract(*args):
        time.sleep(0.5)  # keep the first fetch inside its critical section while the second arrives
        return real_extract(*args)

    monkeypatch.setattr(assets, "_extract", slow_extract)
    results, errors = [], []

    def worker():
        try:
            results.append(fetch("fake"))
        except BaseException as error:  # noqa: BLE001 -- reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 2 and results[0] == results[1]
    assert fake_asset["calls"] == ["fake"], "the second fetch waited and reused the first one's work"
    assert is_cached("fake")


def test_offline_with_a_corrupt_cached_asset_says_so(fake_asset, monkeypatch):
    folder = fetch("fake")
    (folder / "weights.bin").write_bytes(b"\x02" * 1000)
    monkeypatch.setenv("COURSE_OFFLINE", "1")
    with pytest.raises(AssetOfflineError) as caught:
        fetch("fake")
    message = str(caught.value)
    assert "is in the cache" in message and "not in the cache" not in message
    assert "weights.bin does not match the SHA-256 its manifest records" in message
    assert "python -m course_lib.tools.assets fetch fake" in message


def test_wrong_hash_is_one_clear_sentence(fake_asset, monkeypatch):
    monkeypatch.setitem(ASSETS, "fake", Asset(**{**ASSETS["fake"].__dict__, "sha256": "0" * 64}))
    with pytest.raises(AssetHashError, match=r"not the pinned 0000.*python -m course_lib.tools.assets fetch fake"):
        fetch("fake")
    assert not assets.asset_dir("fake").exists()


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(UnknownAssetError, match=r"Unknown asset 'bert'.*minilm-l6-v2.*shakespeare"):
        fetch("bert")


def test_offline_flag_with_cold_cache_names_asset_and_command(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    monkeypatch.setenv("COURSE_OFFLINE", "1")
    with pytest.raises(AssetOfflineError, match=r"'minilm-l6-v2' is not in the cache.*"
                                                r"python -m course_lib.tools.assets fetch minilm-l6-v2"):
        fetch("minilm-l6-v2")


def test_unreachable_index_with_cold_cache_is_explained(tmp_path, monkeypatch):
    """A real pip run against an index that does not answer: the error names the asset and the fix."""
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    monkeypatch.delenv("COURSE_OFFLINE", raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(AssetOfflineError, match=r"'vader-corpora' is not in the cache.*could not be downloaded"
                                                r".*python -m course_lib.tools.assets fetch vader-corpora"):
        fetch("vader-corpora")


def test_model_path_passes_hub_ids_through(fake_asset):
    assert assets.model_path("some-org/some-model") == "some-org/some-model"
    assert Path(assets.model_path("fake")) == assets.asset_dir("fake")


def test_registry_pins_every_course_asset():
    assert {"minilm-l6-v2", "smollm2-135m-instruct", "vader-corpora", "shakespeare"} <= set(ASSETS)
    for name, asset in ASSETS.items():
        assert len(asset.sha256) == 64 and asset.version and asset.licence, name


def test_cli_list_runs(capsys):
    assert assets.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "minilm-l6-v2" in out and "cache:" in out


@pytest.mark.index
def test_real_sdist_fetch_into_a_fresh_cache(tmp_path, monkeypatch):
    """The whole path for real: the pinned sdist is fetched from the configured index, its hash verifies, the nested
    corpus archive is unpacked.

    It needs the package index pip is configured with and fails, never skips, without it: it is the one test that
    the real assets can still be fetched and verified, so a CI run that cannot reach the index must not pass.
    Offline, deselect it: ``pytest -m "not index"``."""
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    monkeypatch.delenv("COURSE_OFFLINE", raising=False)
    try:
        folder = fetch("vader-corpora")
    except AssetOfflineError as error:
        pytest.fail(f"this test needs the package index pip is configured with, and it cannot be reached "
                    f"({error}); offline, deselect it with -m 'not index'.", pytrace=False)
    assert (folder / "movieReviewSnippets_GroundTruth.txt").stat().st_size > 1_000_000
    assert is_cached("vader-corpora")


# ---- the real models, from the shared cache (make test fetches them first) ----------------------

@pytest.mark.slow
def test_minilm_encoder_gives_a_real_sentence_embedding():
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = fetch("minilm-l6-v2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    sentences = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    embeddings = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    similarity = embeddings @ embeddings.T
    assert similarity[0, 1] > 0.6 > similarity[0, 2], similarity


@pytest.mark.slow
def test_smollm2_chat_model_answers():
    import torch

    tokenizer, model = assets.load_causal_lm("smollm2-135m-instruct")
    model.eval()
    assert model.config.model_type == "llama"
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "paris" in answer.lower(), answer


@pytest.mark.slow
def test_smollm2_float_copy_equals_the_gguf_weights():
    """The cached float32 copy holds exactly what the GGUF file de-quantises to (read with `gguf`)."""
    import gguf
    import numpy as np

    _, model = assets.load_causal_lm("smollm2-135m-instruct")
    reader = gguf.GGUFReader(fetch("smollm2-135m-instruct") / assets.GGUF_FILES["smollm2-135m-instruct"])
    tensors = {t.name: t for t in reader.tensors}
    for layer in (0, 29):
        raw = tensors[f"blk.{layer}.attn_v.weight"]
        expected = gguf.quants.dequantize(raw.data, raw.tensor_type).reshape(
            model.model.layers[layer].self_attn.v_proj.weight.shape)
        actual = model.model.layers[layer].self_attn.v_proj.weight.detach().numpy()
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6)


# ---- the package index: fetched and verified, never built (a fake index on localhost) -----------

def make_sdist(path: Path, files: dict[str, bytes]) -> str:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    path.write_bytes(buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the test output stays readable
        pass


@pytest.fixture
def fake_index(tmp_path, monkeypatch):
    """A PEP 503 index served by http.server on localhost with one sdist, ``fake-sdist==1.0``, whose
    setup.py writes a marker file when anything runs it (as pip does to read an sdist's metadata)."""
    marker = tmp_path / "setup-py-ran"
    root = tmp_path / "index"
    (root / "files").mkdir(parents=True)
    setup_py = (f"import pathlib\npathlib.Path({str(marker)!r}).write_text('build code ran')\n"
                f"from setuptools import setup\nsetup(name='fake-sdist', version='1.0')\n")
    sdist = root / "files" / "fake_sdist-1.0.tar.gz"
    sha = make_sdist(sdist, {"fake_sdist-1.0/setup.py": setup_py.encode(),
                             "fake_sdist-1.0/PKG-INFO": b"Metadata-Version: 1.0\nName: fake-sdist\nVersion: 1.0\n",
                             "fake_sdist-1.0/corpus/text.txt": b"to be or not to be"})
    page = root / "simple" / "fake-sdist"
    page.mkdir(parents=True)

    def list_file(advertised: str | None) -> None:
        fragment = f"#sha256={advertised}" if advertised else ""
        (page / "index.html").write_text(f'<!DOCTYPE html><html><body><a href="../../files/{sdist.name}{fragment}">'
                                         f'{sdist.name}</a></body></html>')

    list_file(sha)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/simple"
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("COURSE_OFFLINE", raising=False)
    for variable, value in [("PIP_CONFIG_FILE", os.devnull), ("PIP_INDEX_URL", url), ("PIP_EXTRA_INDEX_URL", ""),
                            ("PIP_FIND_LINKS", ""), ("PIP_NO_INDEX", "")]:
        monkeypatch.setenv(variable, value)
    asset = Asset(package="fake-sdist", version="1.0", filename=sdist.name, sha256=sha,
                  files_sha256=pin_of({"text.txt": b"to be or not to be"}), kind="sdist",
                  members=("fake_sdist-1.0/corpus/",), strip="fake_sdist-1.0/corpus/", nested=None, licence="MIT",
                  what="a test sdist", size_mb=0.001)
    monkeypatch.setitem(ASSETS, "fake-sdist", asset)
    commands = []
    real_run = subprocess.run

    def run(command, *args, **kwargs):  # what fetch runs besides itself: only `pip config list`
        commands.append([str(c) for c in command])
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(index.subprocess, "run", run)
    try:
        yield dict(url=url, root=root, sdist=sdist, sha=sha, marker=marker, list_file=list_file, commands=commands)
    finally:
        server.shutdown()
        server.server_close()


def test_sdist_from_the_index_is_verified_and_never_built(fake_index, tmp_path):
    folder = fetch("fake-sdist")
    assert (folder / "text.txt").read_text() == "to be or not to be"
    assert is_cached("fake-sdist")
    assert not fake_index["marker"].exists(), "the sdist's setup.py ran"
    assert fake_index["commands"] == [[sys.executable, "-m", "pip", "config", "list"]], \
        "nothing but `pip config list` may run (no pip download, no build backend)"
    # Positive control: the marker mechanism works, i.e. running the sdist's build code would have shown.
    with tarfile.open(fake_index["sdist"]) as archive:
        archive.extractall(tmp_path / "unpacked", filter="data")
    subprocess.run([sys.executable, "setup.py", "--name"], cwd=tmp_path / "unpacked" / "fake_sdist-1.0",
                   capture_output=True, check=True)
    assert fake_index["marker"].read_text() == "build code ran"


@pytest.mark.parametrize("advertised", ["pinned", "none"])
def test_wrong_hash_from_the_index_stops_with_one_sentence(fake_index, monkeypatch, advertised):
    """The index serves a file whose bytes differ from the pin: whether its page lists the pin (a lying
    mirror: the bytes are downloaded and refused) or no hash at all, the fetch stops before anything opens
    the file."""
    pin = "ab" * 32
    monkeypatch.setitem(ASSETS, "fake-sdist", Asset(**{**ASSETS["fake-sdist"].__dict__, "sha256": pin}))
    fake_index["list_file"](pin if advertised == "pinned" else None)
    with pytest.raises(AssetHashError) as caught:
        fetch("fake-sdist")
    message = str(caught.value)
    assert message.count(". ") == 0 and "\n" not in message, f"not one sentence: {message}"
    assert f"SHA-256 {fake_index['sha'][:16]}…, not the pinned {pin[:16]}…" in message
    assert "python -m course_lib.tools.assets fetch fake-sdist" in message
    assert not fake_index["marker"].exists()
    assert not assets.asset_dir("fake-sdist").exists()
    assert list(assets.cache_dir().rglob("*.tar.gz*")) == [], "the refused download is deleted"


def test_index_listing_another_hash_is_refused_without_download(fake_index, monkeypatch):
    fake_index["list_file"]("cd" * 32)
    with pytest.raises(AssetHashError, match=r"as listed at http://127\.0\.0\.1.*has SHA-256 cdcdcdcd"):
        fetch("fake-sdist")
    assert not fake_index["marker"].exists()


def test_pip_configuration_file_and_extra_indexes_are_honoured(fake_index, tmp_path, monkeypatch):
    """index-url from a pip.conf (a file:// index without the project), the fake index as an extra."""
    empty = tmp_path / "empty-index" / "simple"
    empty.mkdir(parents=True)
    config = tmp_path / "pip.conf"
    config.write_text(f"[global]\nindex-url = {empty.as_uri()}\nextra-index-url = {fake_index['url']}\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(config))
    for variable in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(variable)
    settings = index.pip_settings()
    assert index.sources(settings)[:2] == [("index", empty.as_uri()), ("index", fake_index["url"])]
    assert (fetch("fake-sdist") / "text.txt").is_file()
    assert not fake_index["marker"].exists()


def test_file_index_and_find_links_work_offline(fake_index, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", (fake_index["root"] / "simple").as_uri())
    assert (fetch("fake-sdist") / "text.txt").is_file()
    shutil.rmtree(assets.cache_dir())
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(fake_index["root"] / "files"))
    assert (fetch("fake-sdist") / "text.txt").is_file()
    assert not fake_index["marker"].exists()


def test_index_without_the_pinned_file_names_the_indexes(fake_index, monkeypatch):
    monkeypatch.setitem(ASSETS, "fake-sdist", Asset(**{**ASSETS["fake-sdist"].__dict__, "version": "2.0",
                                                       "filename": "fake_sdist-2.0.tar.gz"}))
    with pytest.raises(assets.AssetError, match=r"None of the package indexes pip is configured with \(http://127"
                                                r".*lists fake_sdist-2\.0\.tar\.gz.*pip config list"):
        fetch("fake-sdist")


def test_json_simple_api_pages_are_read():
    """PEP 691: the JSON form of the simple API (what PyPI answers first), relative URLs resolved."""
    body = json.dumps({"meta": {"api-version": "1.1"}, "name": "x", "files": [
        {"filename": "x-1.0.tar.gz", "url": "../../files/x-1.0.tar.gz", "hashes": {"sha256": "ab" * 32}},
        {"filename": "x-1.0-py3-none-any.whl", "url": "https://files.example/x.whl", "hashes": {}}]}).encode()
    links = index.file_links(body, "application/vnd.pypi.simple.v1+json", "https://index.example/simple/x/")
    assert links == [("x-1.0.tar.gz", "https://index.example/files/x-1.0.tar.gz", "ab" * 32),
                     ("x-1.0-py3-none-any.whl", "https://files.example/x.whl", None)]


# ---- the de-quantised float copy of a GGUF asset: manifest, verification, rebuild (a tiny fake GGUF) -----

def write_tiny_gguf(path: Path, seed: int = 0) -> None:
    """A one-layer Llama (d = 32, vocabulary of 99 byte-level BPE tokens) in GGUF, random weights."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    d, ff, heads, kv = 32, 64, 4, 2
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *(chr(c) for c in range(33, 127)), "Ġ", "th", "Ġt"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(d)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(d // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * 3 + [1] * (len(tokens) - 3))
    writer.add_token_merges(["t h", "Ġ t"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)

    def weight(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    writer.add_tensor("token_embd.weight", weight(len(tokens), d))
    writer.add_tensor("output_norm.weight", np.ones(d, np.float32))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(d, np.float32))
    writer.add_tensor("blk.0.ffn_norm.weight", np.ones(d, np.float32))
    # Q8_0, like SmolLM2's embedding: the copy must hold the de-quantised values
    writer.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(weight(d, d), gguf.GGMLQuantizationType.Q8_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    for name, shape in [("attn_k", (kv * d // heads, d)), ("attn_v", (kv * d // heads, d)), ("attn_output", (d, d)),
                        ("ffn_gate", (ff, d)), ("ffn_up", (ff, d)), ("ffn_down", (d, ff))]:
        writer.add_tensor(f"blk.0.{name}.weight", weight(*shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A registered GGUF asset (a wheel holding a tiny GGUF), 'downloaded' by copying."""
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("COURSE_OFFLINE", raising=False)
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_path)
    source = tmp_path / "fake_llm-1.0-py3-none-any.whl"
    sha = make_wheel(source, {"fake_llm/tiny.gguf": gguf_path.read_bytes()})
    monkeypatch.setitem(ASSETS, "fake-llm", Asset(
        package="fake-llm", version="1.0", filename=source.name, sha256=sha,
        files_sha256=pin_of({"tiny.gguf": gguf_path.read_bytes()}), kind="wheel",
        members=("fake_llm/tiny.gguf",), strip="fake_llm/", nested=None, licence="MIT", what="a tiny GGUF",
        size_mb=0.05))
    monkeypatch.setitem(assets.GGUF_FILES, "fake-llm", "tiny.gguf")

    def download(name, into):
        into.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(source, into / source.name))

    monkeypatch.setattr(assets, "_download", download)
    _pin_the_tiny_copy(monkeypatch, sha)
    return gguf_path


_TINY_PINS: dict[str, dict] = {}


def _pin_the_tiny_copy(monkeypatch, wheel_sha: str) -> None:
    """Pin the float copy of the tiny GGUF as DERIVED_PINS pins SmolLM2's: the files the installed
    transformers writes from it (derived once per test session, in a scratch folder)."""
    from importlib.metadata import version

    if wheel_sha not in _TINY_PINS:
        with tempfile.TemporaryDirectory() as scratch:
            assets._write_float_copy("fake-llm", fetch("fake-llm"), Path(scratch) / "copy")
            files = json.loads((Path(scratch) / "copy" / "MANIFEST.json").read_text())["files"]
        _TINY_PINS[wheel_sha] = {"transformers": version("transformers"),
                                 "files": {path: entry["sha256"] for path, entry in files.items()}}
    monkeypatch.setitem(assets.DERIVED_PINS, "fake-llm", _TINY_PINS[wheel_sha])


def derived_problem() -> str | None:
    return cachedir.folder_problem(assets.derived_dir("fake-llm"), "source_sha256", ASSETS["fake-llm"].sha256,
                                   assets._derived_pin("fake-llm"))


def test_float_copy_has_a_manifest_and_holds_the_gguf_weights(fake_gguf):
    import gguf
    import numpy as np

    tokenizer, model = assets.load_causal_lm("fake-llm")
    derived = assets.derived_dir("fake-llm")
    manifest = json.loads((derived / "MANIFEST.json").read_text())
    assert manifest["source_sha256"] == ASSETS["fake-llm"].sha256
    weights = manifest["files"]["model.safetensors"]
    assert weights["size"] == (derived / "model.safetensors").stat().st_size
    assert weights["sha256"] == assets.sha256_of(derived / "model.safetensors")
    assert {"config.json", "tokenizer.json"} <= set(manifest["files"])
    tensor = {t.name: t for t in gguf.GGUFReader(fake_gguf).tensors}["blk.0.attn_v.weight"]
    np.testing.assert_array_equal(model.model.layers[0].self_attn.v_proj.weight.detach().numpy(),
                                  np.asarray(tensor.data).reshape(16, 32))
    assert tokenizer("th").input_ids == [tokenizer.convert_tokens_to_ids("th")]


def test_corrupted_float_copy_is_detected_and_rebuilt_offline(fake_gguf, monkeypatch, capsys):
    """The issue's fault: 4 KiB in the middle of model.safetensors overwritten (same size, weights of
    3.4e38). The copy is refused and rebuilt from the cached GGUF, with COURSE_OFFLINE=1."""
    _, model = assets.load_causal_lm("fake-llm")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = assets.derived_dir("fake-llm") / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as handle:
        handle.seek(size // 2)
        handle.write(b"\x7f" * 4096)
    assert weights.stat().st_size == size
    assert "model.safetensors does not match the SHA-256" in derived_problem()
    monkeypatch.setenv("COURSE_OFFLINE", "1")
    capsys.readouterr()
    _, rebuilt = assets.load_causal_lm("fake-llm")
    assert "is not usable (model.safetensors does not match" in capsys.readouterr().out
    for key, value in rebuilt.state_dict().items():
        torch_equal = (value == before[key]).all()
        assert torch_equal, f"{key} differs after the rebuild"
    assert derived_problem() is None


def test_float_copy_without_a_manifest_is_rebuilt(fake_gguf):
    """A copy written before manifests existed (or by hand) is not trusted."""
    derived = assets.float_copy("fake-llm")
    (derived / "MANIFEST.json").unlink()
    assert "has no MANIFEST.json" in derived_problem()
    assert assets.float_copy("fake-llm") == derived and (derived / "MANIFEST.json").is_file()


# ---- what an archive may not do: escape the cache, smuggle links, or hold nothing ----------------------

def _register_archive(tmp_path, monkeypatch, name: str, members: dict[str, bytes], *, kind: str = "sdist",
                      links: dict[str, str] | None = None, nested: str | None = None, strip: str = "pkg-1.0/data/"):
    """Register asset ``name`` whose 'download' is a tar.gz (or wheel) built from ``members`` (and symlinks)."""
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("COURSE_OFFLINE", raising=False)
    source = tmp_path / ("pkg-1.0.tar.gz" if kind == "sdist" else "pkg-1.0-py3-none-any.whl")
    if kind == "wheel":
        sha = make_wheel(source, members)
    else:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
            for member, payload in members.items():
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
            for member, target in (links or {}).items():
                info = tarfile.TarInfo(member)
                info.type, info.linkname = tarfile.SYMTYPE, target
                archive.addfile(info)
        source.write_bytes(buffer.getvalue())
        sha = hashlib.sha256(buffer.getvalue()).hexdigest()
    extracted = {m[len(strip):]: p for m, p in members.items() if m.startswith(strip) and nested is None}
    monkeypatch.setitem(ASSETS, name, Asset(package="pkg", version="1.0", filename=source.name, sha256=sha,
                                            files_sha256=pin_of(extracted), kind=kind,
                                            members=("pkg-1.0/data/",), strip=strip, nested=nested, licence="MIT",
                                            what="a hostile test archive", size_mb=0.001))

    def download(asset_name, into):
        into.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(source, into / source.name))

    monkeypatch.setattr(assets, "_download", download)


def _nested_tar(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for member, payload in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


@pytest.mark.parametrize("kind, members, nested", [
    ("sdist", {"pkg-1.0/data/ok.txt": b"ok", "pkg-1.0/data/../../../escaped.txt": b"gotcha"}, None),
    ("wheel", {"pkg-1.0/data/ok.txt": b"ok", "pkg-1.0/data/../../../../escaped.txt": b"gotcha"}, None),
    ("sdist", {"pkg-1.0/data//tmp/escaped.txt": b"gotcha"}, None),
    ("sdist", {"pkg-1.0/data/inner.tar.gz": _nested_tar({"corpus/ok.txt": b"ok",
                                                         "corpus/../../../../escaped.txt": b"gotcha"})}, "corpus/"),
])
def test_a_member_that_points_outside_the_cache_is_refused(tmp_path, monkeypatch, kind, members, nested):
    _register_archive(tmp_path, monkeypatch, "hostile", members, kind=kind, nested=nested,
                      strip="pkg-1.0/data/" if nested is None else "")
    with pytest.raises(assets.AssetError, match=r"refusing to extract '.*escaped\.txt': it points outside the cache"):
        fetch("hostile")
    assert not list(tmp_path.rglob("escaped.txt")) and not Path("/tmp/escaped.txt").exists()
    assert not assets.asset_dir("hostile").exists()


def test_links_in_an_archive_are_not_extracted(tmp_path, monkeypatch):
    _register_archive(tmp_path, monkeypatch, "links", {"pkg-1.0/data/ok.txt": b"ok"},
                      links={"pkg-1.0/data/passwd": "/etc/passwd", "pkg-1.0/data/again.txt": "ok.txt"})
    folder = fetch("links")
    assert sorted(p.name for p in folder.iterdir()) == ["MANIFEST.json", "ok.txt"]
    assert not any(p.is_symlink() for p in folder.rglob("*"))


def test_an_archive_without_the_pinned_members_is_refused(tmp_path, monkeypatch):
    _register_archive(tmp_path, monkeypatch, "empty", {"pkg-1.0/other/readme.txt": b"not what we want"})
    with pytest.raises(assets.AssetError, match=r"pkg-1\.0\.tar\.gz holds none of \('pkg-1\.0/data/',\): the pinned "
                                                r"release changed shape"):
        fetch("empty")
    assert not assets.asset_dir("empty").exists()


def test_a_manifest_of_another_release_is_not_trusted(fake_asset):
    folder = fetch("fake")
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    (folder / "MANIFEST.json").write_text(json.dumps({**manifest, "archive_sha256": "ef" * 32}))
    assert "describes another release" in assets.cache_problem("fake")
    assert fetch("fake") == folder and fake_asset["calls"] == ["fake", "fake"]


# ---- a file and its manifest line edited together: the pins in the code catch it --------------------------

def _edit_with_manifest(folder: Path, relative: str, payload: bytes) -> None:
    """What someone with write access to the cache does: change a file and its manifest line together."""
    (folder / relative).write_bytes(payload)
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    manifest["files"][relative] = {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))


def test_an_asset_file_edited_with_its_manifest_line_is_refused_and_fetched_again(fake_asset):
    folder = fetch("fake")
    _edit_with_manifest(folder, "config.json", b'{"evil": true}')
    assert "lists other files or hashes than the pinned ones" in assets.cache_problem("fake")
    assert fetch("fake") == folder and (folder / "config.json").read_bytes() == b"{}"
    assert fake_asset["calls"] == ["fake", "fake"]


def test_every_real_asset_pins_its_extracted_files():
    for name, asset in ASSETS.items():
        assert len(asset.files_sha256) == 64 and asset.files_sha256 != asset.sha256, name
        if is_cached(name, verify=False):  # the shared cache (make test fetches it) matches the pins
            assert assets.cache_problem(name) is None, name
    assert set(assets.DERIVED_PINS) == set(assets.GGUF_FILES)


def test_a_float_copy_config_edited_with_its_manifest_line_is_rebuilt(fake_gguf, capsys):
    """The issue's attack: rms_norm_eps = 0.5 written into config.json and its manifest line."""
    derived = assets.float_copy("fake-llm")
    config = json.loads((derived / "config.json").read_text())
    _edit_with_manifest(derived, "config.json", json.dumps({**config, "rms_norm_eps": 0.5}).encode())
    assert "lists other files or hashes than the pinned ones" in derived_problem()
    _, model = assets.load_causal_lm("fake-llm")
    assert model.config.rms_norm_eps == pytest.approx(1e-5)
    assert "is not usable (its MANIFEST.json lists other files" in capsys.readouterr().out


def test_a_copy_that_is_not_the_pinned_one_is_never_put_in_place(fake_gguf, monkeypatch):
    pin = assets.DERIVED_PINS["fake-llm"]
    monkeypatch.setitem(assets.DERIVED_PINS, "fake-llm", {**pin, "files": {**pin["files"], "config.json": "00" * 32}})
    with pytest.raises(assets.AssetError, match=r"The float32 copy of 'fake-llm' that transformers \S+ writes is not "
                                                r"the pinned one .*install the versions in requirements\.txt"):
        assets.float_copy("fake-llm")
    assert not assets.derived_dir("fake-llm").exists()


def test_under_another_transformers_only_the_weights_are_trusted(fake_gguf, monkeypatch):
    """The GPU machine's transformers writes other tokenizer and config files: there the copy's weights are
    checked against their pin and the config and tokenizer are read from the verified GGUF itself."""
    monkeypatch.setitem(assets.DERIVED_PINS, "fake-llm", {**assets.DERIVED_PINS["fake-llm"], "transformers": "0.0"})
    derived = assets.float_copy("fake-llm")
    config = json.loads((derived / "config.json").read_text())
    _edit_with_manifest(derived, "config.json", json.dumps({**config, "rms_norm_eps": 0.5}).encode())
    _, model = assets.load_causal_lm("fake-llm")
    assert model.config.rms_norm_eps == pytest.approx(1e-5), "the config came from the GGUF, not the copy"
    weights = (derived / "model.safetensors").read_bytes()
    _edit_with_manifest(derived, "model.safetensors", weights[:-4] + b"\x00\x00\x80\x7f")
    assert "does not record model.safetensors with the pinned SHA-256" in derived_problem()
