"""course_lib.parts.quant against bitsandbytes 0.50.2 (its CPU path), code for code, and its layers against torch."""

from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from course_lib.parts import quant

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # see course_lib.start
if os.environ.get("CI"):
    import bitsandbytes.functional as bnb  # pinned in requirements.txt: under CI a broken install fails the run
else:
    bnb = pytest.importorskip("bitsandbytes.functional")


@pytest.fixture(scope="module")
def minilm_weights():
    """A few of MiniLM's weight matrices: attention, feed-forward (both shapes) and a slice of the embeddings."""
    from course_lib.parts.classifier import load_encoder

    _, encoder = load_encoder()
    layer = encoder.encoder.layer[0]
    return {"query": layer.attention.self.query.weight.detach(),
            "intermediate": layer.intermediate.dense.weight.detach(),
            "output": encoder.encoder.layer[5].output.dense.weight.detach(),
            "embeddings": encoder.embeddings.word_embeddings.weight.detach()[:2000]}


def test_nf4_codebook_is_bitsandbytes_bit_for_bit():
    assert torch.equal(quant.NF4_CODEBOOK, bnb.get_4bit_type("nf4", device="cpu"))
    levels = quant.NF4_CODEBOOK
    assert levels.shape == (16,) and bool((levels[1:] > levels[:-1]).all())
    assert levels[0] == -1 and levels[7] == 0 and levels[15] == 1
    # the values the QLoRA paper's appendix and bitsandbytes print, to 4 decimals
    assert torch.allclose(levels[[1, 6, 8, 14]], torch.tensor([-0.6962, -0.0911, 0.0796, 0.7230]), atol=5e-5)


def test_dynamic_codebook_is_bitsandbytes_bit_for_bit():
    assert torch.equal(quant.DYNAMIC_CODEBOOK, bnb.create_dynamic_map())


def test_offset_changes_the_levels():
    wider = quant.nf4_codebook(0.99)
    assert wider[0] == -1 and wider[-1] == 1 and not torch.equal(wider, quant.NF4_CODEBOOK)
    with pytest.raises(ValueError, match="offset is a probability"):
        quant.nf4_codebook(1.0)


def test_codes_and_dequantised_values_equal_bitsandbytes(minilm_weights):
    for name, w in minilm_weights.items():
        codes, absmax = quant.quantize_nf4(w, 64)
        packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
        assert codes.dtype == torch.uint8 and codes.shape == w.shape
        assert torch.equal(quant.unpack_nibbles(packed, w.numel()), codes.reshape(-1)), name
        assert torch.equal(quant.pack_nibbles(codes), packed.reshape(-1)), name
        assert torch.equal(absmax, state.absmax), name
        assert torch.equal(quant.dequantize_nf4(codes, absmax), bnb.dequantize_4bit(packed, state)), name


@pytest.mark.parametrize("block_size", [32, 128, 256])
def test_other_block_sizes_and_a_partial_last_block(block_size):
    g = torch.Generator().manual_seed(block_size)
    w = torch.randn(7, 100, generator=g)  # 700 numbers: the last block is partial for every size
    codes, absmax = quant.quantize_nf4(w, block_size)
    packed, state = bnb.quantize_4bit(w, blocksize=block_size, quant_type="nf4")
    assert torch.equal(quant.unpack_nibbles(packed, w.numel()), codes.reshape(-1))
    assert torch.allclose(absmax, state.absmax)
    assert torch.allclose(quant.dequantize_nf4(codes, absmax, block_size=block_size),
                          bnb.dequantize_4bit(packed, state))


def test_double_quantisation_matches_bitsandbytes_where_its_search_finds_the_nearest_level(minilm_weights):
    w = minilm_weights["intermediate"]
    codes, qabsmax = quant.quantize_nf4(w, 64, double_quant=True)
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(quant.unpack_nibbles(packed, w.numel()), codes.reshape(-1))  # 4-bit codes unchanged
    assert torch.equal(qabsmax.offset, state.offset)
    assert torch.equal(qabsmax.scale, state.state2.absmax)
    same = qabsmax.codes == state.absmax
    assert same.float().mean() > 0.99
    # where bitsandbytes' C search picked another level, ours is at least as near to the true constant
    _, absmax = quant.quantize_nf4(w, 64)
    target = (absmax - qabsmax.offset) / qabsmax.scale.repeat_interleave(256)[: absmax.numel()]
    ours = (quant.DYNAMIC_CODEBOOK[qabsmax.codes.long()] - target).abs()
    theirs = (quant.DYNAMIC_CODEBOOK[state.absmax.long()] - target).abs()
    assert bool((ours <= theirs + 1e-7).all())
    # given bitsandbytes' 8-bit codes, our de-quantisation is theirs exactly
    borrowed = quant.QuantizedAbsmax(state.absmax, state.state2.absmax, state.offset, 256)
    assert torch.equal(quant.dequantize_nf4(codes, borrowed), bnb.dequantize_4bit(packed, state))


def test_bits_per_parameter():
    assert quant.bits_per_parameter(64) == 4.5
    assert quant.bits_per_parameter(64, double_quant=True) == pytest.approx(4.127, abs=1e-3)


def test_nf4_beats_uniform_int4_and_loses_to_int8_on_minilm(minilm_weights):
    for name, w in minilm_weights.items():
        nf4 = quant.dequantize_nf4(*quant.quantize_nf4(w))
        int4 = quant.quantize_uniform(w, 4)
        int8 = quant.quantize_uniform(w, 8)
        err = {k: (v - w).pow(2).mean().item() for k, v in (("nf4", nf4), ("int4", int4), ("int8", int8))}
        assert err["int8"] < err["nf4"] < err["int4"], (name, err)


def test_uniform_levels():
    assert torch.equal(quant.uniform_codebook(4) * 7, torch.arange(-7, 8, dtype=torch.float32))
    w = torch.tensor([[0.7, -0.33, 0.1, 0.0]])
    assert torch.allclose(quant.quantize_uniform(w, 4, block_size=4), torch.tensor([[0.7, -0.3, 0.1, 0.0]]))


def test_zero_block_and_input_untouched():
    w = torch.zeros(2, 64)
    w[1] = torch.linspace(-1, 1, 64)
    before = w.clone()
    codes, absmax = quant.quantize_nf4(w)
    assert torch.equal(w, before)
    assert absmax[0] == 0 and bool((codes[0] == 7).all())
    assert torch.equal(quant.dequantize_nf4(codes, absmax)[0], torch.zeros(64))


def test_bad_input_gets_one_sentence():
    with pytest.raises(TypeError, match="floating-point"):
        quant.quantize_nf4(torch.ones(4, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="block_size"):
        quant.quantize_nf4(torch.ones(4, 64), 0)
    with pytest.raises(ValueError, match="inf or nan"):
        quant.quantize_nf4(torch.tensor([[float("nan")] * 64]))
    codes, absmax = quant.quantize_nf4(torch.randn(4, 64))
    with pytest.raises(ValueError, match="another block_size"):
        quant.dequantize_nf4(codes, absmax, block_size=32)
    with pytest.raises(TypeError, match="uint8"):
        quant.dequantize_nf4(codes.long(), absmax)


def test_nf4_linear_forward_and_backward_match_torch_and_save_no_weight():
    torch.manual_seed(0)
    base = nn.Linear(128, 64)
    layer = quant.NF4Linear.from_linear(base)
    w_hat = quant.dequantize_nf4(*quant.quantize_nf4(base.weight))
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = layer(x)
    assert torch.allclose(y, F.linear(x, w_hat, base.bias), atol=1e-6)
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    F.linear(x2, w_hat, base.bias).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    assert layer.packed.dtype == torch.uint8 and layer.packed.numel() == 128 * 64 // 2
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(torch.randn(2, 128, requires_grad=True))
    assert not any(t.shape == (64, 128) for t in saved)  # the de-quantised weight is recomputed, not kept


def test_qlora_layer_starts_at_the_quantised_base_and_trains_only_a_and_b():
    torch.manual_seed(0)
    layer = quant.QLoRALinear(quant.NF4Linear.from_linear(nn.Linear(32, 16)), r=4, alpha=8)
    x = torch.randn(6, 32)
    assert torch.equal(layer(x), layer.base(x))
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert trainable == ["lora_A", "lora_B"]
    layer(x).sum().backward()
    assert layer.lora_B.grad.abs().sum() > 0 and layer.lora_A.grad.abs().sum() == 0  # B = 0 at the start
    with pytest.raises(TypeError, match="NF4Linear"):
        quant.QLoRALinear(nn.Linear(4, 4), 2, 4)


def test_apply_qlora_matches_peft_with_bitsandbytes_code_for_code():
    """peft + bitsandbytes' own QLoRA path on the CPU: the same 4-bit codes, the same trainable count."""
    import peft
    from transformers import AutoModel, BitsAndBytesConfig

    from course_lib.parts import classifier as finetune
    from course_lib.tools.assets import model_path

    _, encoder = finetune.load_encoder()
    ours = quant.apply_qlora(finetune.SentenceClassifier(encoder), ["query", "value"], r=8, alpha=16)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                llm_int8_skip_modules=["classifier", "pooler"])
    theirs = AutoModel.from_pretrained(model_path("minilm-l6-v2"), quantization_config=config)
    for i in (0, 5):
        mine = ours.encoder.encoder.layer[i].intermediate.dense
        other = theirs.encoder.layer[i].intermediate.dense.weight
        assert torch.equal(mine.packed, other.reshape(-1)) and torch.equal(mine.absmax, other.quant_state.absmax)
    wrapped = peft.get_peft_model(finetune.SentenceClassifier(theirs),
                                  peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                  modules_to_save=["head"]))
    n_peft = sum(p.numel() for n, p in wrapped.named_parameters() if p.requires_grad and "original_module" not in n)
    n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert n_ours == n_peft == 6 * 2 * 8 * (384 + 384) + 384 * 2 + 2


def test_qlora_layer_adds_the_scaled_update_once_b_has_learned():
    """h = dequant(W) x + b + (alpha / r) B A x with B != 0 (at the start B = 0 hides the scaling)."""
    torch.manual_seed(0)
    layer = quant.QLoRALinear(quant.NF4Linear.from_linear(nn.Linear(32, 16)), r=4, alpha=12)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(6, 32)
    expected = layer.base(x) + 3.0 * (x @ layer.lora_A.T @ layer.lora_B.T)  # alpha / r = 3
    assert torch.allclose(layer(x), expected, atol=1e-5)


# Blocks [s, x, 0, ...] where x / s and x * (1 / s) differ in the last bit and fall on two sides of an NF4
# midpoint (found by search; float32 values). bitsandbytes multiplies by the reciprocal.
MIDPOINT_CASES = [(1.498769760131836, 0.30503150820732117), (0.9322684407234192, 0.18973644077777863),
                  (1.3768839836120605, -0.4676991403102875), (1.05668044090271, 0.4113789498806),
                  (0.8916653394699097, 0.3471364974975586)]


def test_codes_at_a_midpoint_equal_bitsandbytes_because_both_multiply_by_the_reciprocal():
    w = torch.zeros(len(MIDPOINT_CASES), 64)
    for row, (s, x) in enumerate(MIDPOINT_CASES):
        w[row, 0], w[row, 1] = s, x
    scale = w[:, :1]
    by_reciprocal = quant._nearest((w[:, 1] * (1.0 / scale[:, 0])), quant.NF4_CODEBOOK)
    by_division = quant._nearest((w[:, 1] / scale[:, 0]), quant.NF4_CODEBOOK)
    assert bool((by_reciprocal != by_division).all()), "the cases must sit where the two roundings disagree"
    codes, _ = quant.quantize_nf4(w, 64)
    packed, _ = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(codes.reshape(-1), quant.unpack_nibbles(packed, w.numel()))
    assert torch.equal(codes[:, 1], by_reciprocal)


def test_a_value_exactly_at_a_midpoint_goes_to_the_lower_level_like_bitsandbytes():
    midpoints = (quant.NF4_CODEBOOK[:-1] + quant.NF4_CODEBOOK[1:]) / 2
    w = torch.zeros(1, 64)
    w[0, 0] = 1.0  # absmax 1: the scaled values are the midpoints themselves
    w[0, 1:16] = midpoints
    codes, _ = quant.quantize_nf4(w, 64)
    assert torch.equal(codes[0, 1:16], torch.arange(15, dtype=torch.uint8))
    packed, _ = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(codes.reshape(-1), quant.unpack_nibbles(packed, 64))
