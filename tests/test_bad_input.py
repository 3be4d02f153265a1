"""Bad input gets one clear sentence naming the problem and the fix (CONTRIBUTING.md), raised before torch,
transformers or urllib can answer with something cryptic, and never silently accepted.

The inputs an attacker and a careless student tried in issue 23's audit that are not about the package
index (those are in tests/test_index.py). Rows marked xfail need a fix in a file another change is
rewriting; the reason names it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from course_lib.parts import quant
from course_lib.parts.bpe import BPETokenizer
from course_lib.tools import assets, results, widgets
from course_lib.tools.profiles import get_profile


def one_sentence(message: str) -> None:
    assert "\n" not in message.strip() and message.strip().endswith("."), f"not one sentence: {message!r}"
    assert "Traceback" not in message


@pytest.fixture()
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RESULTS", tmp_path / "data" / "results")
    monkeypatch.setenv("COURSE_PROFILE", "cpu")
    return tmp_path / "data" / "results"


def _tiny_gpt():
    from course_lib.parts.model import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=20, context=16, n_layer=1, n_head=2, d_model=16))


# ---- asset names: a typo is not a Hub id ------------------------------------------------------------

@pytest.mark.parametrize("call, guess", [
    (lambda: assets.load_causal_lm("smollm2"), "smollm2-135m-instruct"),
    (lambda: assets.model_path("minilm"), "minilm-l6-v2"),
    (lambda: assets.model_path("MiniLM-L6"), "minilm-l6-v2"),
    (lambda: assets.model_path("/no/such/folder"), None),
])
def test_a_name_that_is_no_asset_folder_or_hub_id_gets_the_asset_list(call, guess, monkeypatch):
    monkeypatch.setattr(assets, "fetch", lambda *a, **k: pytest.fail("nothing may be fetched"))
    with pytest.raises(assets.UnknownAssetError, match=r"is not a course asset.*an existing folder or a Hugging "
                                                       r"Face Hub id 'owner/name': the course's assets are minilm-l6"):
        call()
    try:
        call()
    except assets.UnknownAssetError as error:
        one_sentence(str(error))
        assert (f"did you mean {guess!r}" in str(error)) == (guess is not None)


def test_load_encoder_inherits_the_asset_list(monkeypatch):
    from course_lib.parts.classifier import load_encoder

    with pytest.raises(assets.UnknownAssetError, match=r"'minilm' is not a course asset \(did you mean 'minilm-l6-v2'"):
        load_encoder(name="minilm")


def test_hub_ids_and_folders_still_pass_through(tmp_path):
    assert assets.model_path("some-org/some-model") == "some-org/some-model"
    assert assets.model_path(tmp_path) == str(tmp_path)
    with pytest.raises(TypeError, match="non-empty str"):
        assets.model_path("")
    with pytest.raises(assets.UnknownAssetError, match="Unknown asset"):
        assets.fetch(["minilm-l6-v2"])


# ---- results: records stay in data/results and hold JSON ---------------------------------------------

def test_a_record_name_cannot_leave_data_results(results_dir, tmp_path):
    with pytest.raises(ValueError, match=r"the record's name must be a plain name.*got '\.\./\.\./x'") as caught:
        results.record("../../x", get_profile(), {"a": 1})
    one_sentence(str(caught.value))
    assert not list(tmp_path.rglob("*.json")) and not list(tmp_path.rglob("*.tmp")), "nothing is written"
    with pytest.raises(ValueError, match="plain name"):
        results.recorded("../x", "cpu")
    with pytest.raises(ValueError, match="profile name"):
        results.path_for("x", "cpu/../../y")


@pytest.mark.parametrize("value, sentence", [
    ({"seen": {1, 2}}, r"results\['seen'\] is a set, which JSON cannot hold: sorted\(\.\.\.\) gives a list\."),
    ({"w": np.zeros(3)}, r"results\['w'\] is a numpy\.ndarray of shape \(3,\); record it as a list with \.tolist"),
    ({"runs": [{"loss": torch.ones(2)}]}, r"results\['runs'\]\[0\]\['loss'\] is a torch\.Tensor of shape \(2,\)"),
    ({"where": Path("/tmp")}, r"results\['where'\] is a PosixPath, which JSON cannot hold"),
    ({("a", "b"): 1}, r"results has the key \('a', 'b'\), a tuple; JSON keys are strings or numbers"),
    ([1, 2], r"results must be a dict of what the run measured, got a list\."),
])
def test_what_json_cannot_hold_is_named(results_dir, value, sentence):
    with pytest.raises(TypeError, match=sentence) as caught:
        results.record("x", get_profile(), value)
    one_sentence(str(caught.value))
    assert not results_dir.exists() or not list(results_dir.iterdir())


def test_numpy_and_torch_scalars_keep_their_kind(results_dir):
    results.record("x", get_profile(), {"n": np.int64(5), "loss": torch.tensor(0.5), "pair": (1, 2)})
    assert results.recorded("x", "cpu")["results"] == {"n": 5, "loss": 0.5, "pair": [1, 2]}
    assert isinstance(results.recorded("x", "cpu")["results"]["n"], int)


@pytest.mark.parametrize("text", ["{\"name\": \"x\", \"prov", "[1, 2]"])
def test_a_damaged_record_is_named(results_dir, text):
    results_dir.mkdir(parents=True)
    (results_dir / "x_cpu.json").write_text(text)
    with pytest.raises(ValueError, match=r"x_cpu\.json is not a (readable record|recorded run).*record the run again"):
        results.recorded("x", "cpu")


# ---- the BPE tokenizer -----------------------------------------------------------------------------

def test_decode_takes_tensors_and_arrays_of_ids():
    tok = BPETokenizer()
    assert tok.decode(torch.tensor([116, 111])) == tok.decode(np.array([116, 111])) == tok.decode([116, 111]) == "to"
    assert tok.token_text(torch.tensor(116)) == "t"


@pytest.mark.parametrize("call, error, sentence", [
    (lambda t: t.decode(torch.tensor([[116, 111]])), TypeError,
     r"decode expects integer token ids \(a flat sequence of them for decode\).*shape \(2,\)"),
    (lambda t: t.decode(5), TypeError, r"for one id i use decode\(\[i\]\)"),
    (lambda t: t.decode([1.0]), TypeError, r"but got 1\.0: pass a list of ints"),
    (lambda t: t.decode(torch.tensor([1.0])), TypeError, r"but got tensor\(1\.\): pass a list of ints"),
    (lambda t: t.decode([300]), ValueError, r"decode got 300, which is not a token id"),
    (lambda t: t.token_text(999), ValueError, r"token_text got 999, which is not a token id"),
    (lambda t: BPETokenizer([(1, 2, 3)]), ValueError, r"merge 0 is \(1, 2, 3\), but each merge is a pair"),
])
def test_bpe_bad_input_is_one_sentence(call, error, sentence):
    with pytest.raises(error, match=sentence) as caught:
        call(BPETokenizer())
    one_sentence(str(caught.value))


# ---- NF4 codes ---------------------------------------------------------------------------------------

def test_codes_out_of_range_are_refused_not_packed_into_the_next_nibble():
    codes, absmax = quant.quantize_nf4(torch.randn(2, 64))
    with pytest.raises(ValueError, match=r"pack_nibbles takes 4-bit codes 0\.\.15, but one code is 16"):
        quant.pack_nibbles(torch.tensor([16, 1], dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"dequantize_nf4 takes 4-bit codes 0\.\.15, but one code is 200.*unpack"):
        quant.dequantize_nf4(torch.full_like(codes, 200), absmax)
    with pytest.raises(ValueError, match=r"32 packed bytes hold at most 64 codes, but n is 65"):
        quant.unpack_nibbles(quant.pack_nibbles(codes[0]), 65)
    with pytest.raises(TypeError, match="uint8"):
        quant.pack_nibbles(codes.float())
    with pytest.raises(ValueError, match=r"offset is a probability.*got '0\.9'"):
        quant.nf4_codebook("0.9")


# ---- make execute and the widgets --------------------------------------------------------------------

@pytest.mark.parametrize("argv, sentence", [
    (["execute"], "usage: python -m course_lib.tools.widgets execute|finish-bars NOTEBOOK.ipynb"),
    (["finish-bars"], "usage: python -m course_lib.tools.widgets execute|finish-bars NOTEBOOK.ipynb"),
    (["execute", "notebooks/nope.ipynb"], "error: notebooks/nope.ipynb does not exist (the lessons are "
                                          "notebooks/NN_name.ipynb)."),
    (["execute", "README.md"], "error: README.md is not a notebook (.ipynb)."),
])
def test_widgets_cli_refuses_with_one_line_and_exit_2(argv, sentence, capsys, monkeypatch):
    monkeypatch.setattr(widgets, "execute_notebook", lambda *a, **k: pytest.fail("nothing may run"))
    assert widgets.main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == sentence or err.startswith(sentence), err


def test_a_notebook_that_is_not_json_is_named(tmp_path, capsys):
    broken = tmp_path / "01_x.ipynb"
    broken.write_text('{"cells": [')
    assert widgets.main(["finish-bars", str(broken)]) == 2
    assert "is not readable notebook JSON" in capsys.readouterr().err


def test_show_attention_names_a_layer_head_or_sentence_that_does_not_exist():
    attentions, tokens = [torch.rand(2, 3, 4, 4)], [["a", "b", "c", "d"]]
    for kwargs, sentence in (({"layer": 2}, r"layer 2 does not exist: the model has 2"),
                             ({"head": -1}, r"head -1 does not exist: the model has 3"),
                             ({"sentence": 1}, r"sentence 1 does not exist: there are 1")):
        with pytest.raises(ValueError, match=sentence):
            widgets.show_attention(attentions, tokens, **kwargs)


# ---- the language model's held-out loss and the loop's checkpoints ------------------------------------

def test_heldout_loss_with_context_zero_is_one_sentence():
    from course_lib.parts.lm import heldout_loss

    with pytest.raises(ValueError, match=r"context must be a positive integer.*got 0") as caught:
        heldout_loss(_tiny_gpt(), torch.randint(0, 20, (40,)), context=0)
    one_sentence(str(caught.value))


def test_heldout_loss_with_a_list_of_tokens_is_one_sentence():
    from course_lib.parts.lm import heldout_loss

    with pytest.raises(TypeError, match=r"tokens must be a 1-D torch\.Tensor of token ids, got a list") as caught:
        heldout_loss(_tiny_gpt(), [1, 2, 3, 4, 5], context=16)
    one_sentence(str(caught.value))


@pytest.mark.parametrize("content", [b"step,loss\n1,2.5\n", json.dumps({"a": 1}).encode(), b""])
def test_load_checkpoint_on_a_file_that_is_not_one_is_one_sentence(tmp_path, content):
    from course_lib.parts.checkpoint import load_checkpoint

    path = tmp_path / "notes.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"notes\.safetensors is not a safetensors checkpoint") as caught:
        load_checkpoint(path, _tiny_gpt())
    one_sentence(str(caught.value))
