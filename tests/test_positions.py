"""course_lib.parts.positions (and course_lib.experiments.positions): sinusoidal and rotary encodings against independent formulations, and the GPT's
position options (tests of the recorded experiment's smoke form too)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from course_lib.parts.model import GPT, GPTConfig, count_params, param_count_formula
from course_lib.experiments.positions import experiment_settings, per_position_loss
from course_lib.parts.positions import POSITION_KINDS, apply_rope, rope_angles, sinusoidal_encoding


def test_sinusoidal_encoding_is_the_formula_of_vaswani_et_al():
    T, d = 7, 10
    table = sinusoidal_encoding(T, d)
    expected = np.zeros((T, d))
    for pos in range(T):
        for i in range(d // 2):
            expected[pos, 2 * i] = math.sin(pos / 10000 ** (2 * i / d))
            expected[pos, 2 * i + 1] = math.cos(pos / 10000 ** (2 * i / d))
    assert table.dtype == torch.float32 and table.shape == (T, d)
    np.testing.assert_allclose(table.numpy(), expected, atol=1e-6)


def test_apply_rope_equals_multiplying_complex_numbers():
    # the RoFormer paper's (and Llama's reference code's) formulation: pairs as complex numbers times e^{i m θ}
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    angles = rope_angles(torch.arange(9), 8)
    rotated = torch.view_as_real(torch.view_as_complex(x.reshape(2, 3, 9, 4, 2).contiguous())
                                 * torch.polar(torch.ones_like(angles), angles)).reshape(2, 3, 9, 8)
    torch.testing.assert_close(apply_rope(x), rotated)


def test_apply_rope_matches_transformers_llama_after_reordering_the_pairs():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    B, H, T, d = 2, 3, 11, 16
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(B, H, T, d, generator=g), torch.randn(B, H, T, d, generator=g)
    # Llama pairs dimension i with i + d/2; ours pairs 2i with 2i + 1. Reorder, rotate, reorder back.
    to_halves = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])
    back = torch.argsort(to_halves)
    freqs = rope_angles(torch.arange(T), d).float()
    cos, sin = torch.cat([freqs, freqs], -1).cos()[None], torch.cat([freqs, freqs], -1).sin()[None]
    q_hf, k_hf = apply_rotary_pos_emb(q[..., to_halves], k[..., to_halves], cos, sin)
    torch.testing.assert_close(apply_rope(q), q_hf[..., back], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(apply_rope(k), k_hf[..., back], atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_only_on_the_offset_and_norms_are_kept():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(16, dtype=torch.float64, generator=g), torch.randn(16, dtype=torch.float64, generator=g)
    T = 12
    Q, K = apply_rope(q.expand(T, 16).clone()), apply_rope(k.expand(T, 16).clone())
    scores = Q @ K.T                                              # scores[m, n] = <R_m q, R_n k>
    for offset in range(-T + 1, T):
        diagonal = torch.diagonal(scores, offset)
        assert torch.allclose(diagonal, diagonal[0].expand_as(diagonal), atol=1e-12)
    assert torch.allclose(Q.norm(dim=-1), q.norm().expand(T))
    assert not torch.allclose(scores[0, 1], scores[0, 2])        # and it does depend on the offset


def test_apply_rope_with_explicit_positions_and_dtype():
    x = torch.randn(5, 6, dtype=torch.float64)
    shifted = apply_rope(x, torch.arange(3, 8))
    assert shifted.dtype == torch.float64
    torch.testing.assert_close(shifted, apply_rope(torch.cat([torch.zeros(3, 6, dtype=torch.float64), x]))[3:])
    assert torch.equal(apply_rope(x, torch.zeros(5, dtype=torch.long)), x)   # position 0: no rotation
    x_before = x.clone()
    apply_rope(x)
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("call, message", [
    (lambda: apply_rope(torch.randn(4, 5)), "even"),
    (lambda: apply_rope(torch.randn(4, 6), torch.arange(3)), "one position per row"),
    (lambda: apply_rope(torch.arange(12).view(2, 6)), "floating-point"),
    (lambda: sinusoidal_encoding(0, 4), "positive int"),
])
def test_bad_input_gets_one_sentence(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


@pytest.mark.parametrize("kind", POSITION_KINDS)
def test_gpt_with_each_position_kind(kind):
    config = GPTConfig(vocab_size=20, context=8, n_layer=2, n_head=2, d_model=16, position=kind)
    torch.manual_seed(0)
    model = GPT(config).eval()
    assert count_params(model, non_embedding=False) == param_count_formula(config, non_embedding=False)
    idx = torch.randint(0, 20, (2, 8), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 20
    with torch.no_grad():
        before, after = model(idx)[0], model(changed)[0]
    assert torch.allclose(before[:, :5], after[:, :5], atol=1e-6)      # still causal
    longer = torch.randint(0, 20, (1, 20))
    if kind == "learned":
        with pytest.raises(ValueError, match="context is 8"):
            model(longer)
    else:
        with torch.no_grad():
            assert model(longer)[0].shape == (1, 20, 20)                  # no table to run out of


@pytest.mark.parametrize("kind", ["sinusoidal", "rope"])
def test_kv_cache_generation_is_identical_with_computed_positions(kind):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, context=16, n_layer=2, n_head=2, d_model=16, position=kind))
    prompt = torch.randint(0, 20, (2, 3), generator=torch.Generator().manual_seed(1))
    plain = model.generate(prompt, 10, temperature=0)
    cached = model.generate(prompt, 10, temperature=0, kv_cache=True)
    assert torch.equal(plain, cached)


def test_without_positions_attention_cannot_tell_the_order_of_the_keys():
    # the last query sees all keys; with no position information, permuting the earlier tokens leaves
    # its output unchanged (attention is a weighted sum over a set); with RoPE it changes
    for kind, same in (("none", True), ("rope", False)):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=20, context=8, n_layer=1, n_head=2, d_model=16, position=kind)).eval()
        idx = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
        shuffled = torch.tensor([[4, 1, 7, 2, 6, 3, 5, 8]])
        with torch.no_grad():
            assert torch.allclose(model(idx)[0][:, -1], model(shuffled)[0][:, -1], atol=1e-5) is same


def test_per_position_loss_uses_the_same_windows_for_every_model():
    tokens = torch.randint(0, 20, (500,), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, context=8, n_layer=1, n_head=2, d_model=16, position="none"))
    a = per_position_loss(model, tokens, 12, 3)
    b = per_position_loss(model, tokens, 12, 3)
    assert a.shape == (3, 12) and torch.equal(a, b)
    assert abs(float(a.mean()) - math.log(20)) < 0.2


def test_experiment_settings_per_profile():
    from course_lib.tools.profiles import get_profile

    for name in ("ci", "cpu"):
        settings = experiment_settings(get_profile(name))
        assert settings["eval_lengths"] == [settings["context"], 2 * settings["context"], 4 * settings["context"]]


def test_every_length_is_judged_on_the_same_windows():
    # the recorded comparison draws windows of the longest length once; the loss at a shorter length L is that of
    # their first L tokens, which a causal model predicts exactly as in a window of L tokens
    tokens = torch.randint(0, 20, (500,), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, context=8, n_layer=1, n_head=2, d_model=16, position="rope"))
    long = per_position_loss(model, tokens, 32, 4, span=32)
    short = per_position_loss(model, tokens, 8, 4, span=32)
    torch.testing.assert_close(long[:, :8], short)
    with pytest.raises(ValueError, match="span"):
        per_position_loss(model, tokens, 8, 4, span=4)
