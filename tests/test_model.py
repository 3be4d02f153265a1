"""course_lib.parts.model against independent implementations: torch.nn.LayerNorm, transformers' GPT-2,
course_lib.parts.attention, FlopCounterMode, transformers' top-k / top-p warpers."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from course_lib.parts.model import (GPT, ACTIVATION_UNITS_PER_BLOCK, GPTConfig, LayerNorm, count_params,
                              flops_per_token, gpt2_config, load_gpt2_weights, memory_estimate,
                              param_count_formula, saved_activation_bytes, top_k_filter, top_p_filter)

SMALL = GPTConfig(vocab_size=50, context=16, n_layer=2, n_head=4, d_model=32)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest (and most predictably on a shared machine) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ids(shape, vocab=50, seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- LayerNorm

@pytest.mark.parametrize("shape", [(7,), (3, 5, 16), (2, 4, 3, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_matches_torch(shape, bias):
    g = torch.Generator().manual_seed(1)
    d = shape[-1] if len(shape) > 1 else 7
    ours, theirs = LayerNorm(d, eps=1e-5, bias=bias), nn.LayerNorm(d, eps=1e-5, bias=bias)
    with torch.no_grad():
        gamma = torch.randn(d, generator=g)
        ours.weight.copy_(gamma), theirs.weight.copy_(gamma)
        if bias:
            beta = torch.randn(d, generator=g)
            ours.bias.copy_(beta), theirs.bias.copy_(beta)
    x = (3 * torch.randn(*shape, generator=g) + 2).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y, y2 = ours(x), theirs(x2)
    torch.testing.assert_close(y, y2, atol=1e-5, rtol=1e-5)
    y.pow(2).sum().backward()
    y2.pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", [(7,), (3, 5, 16), (2, 4, 3, 128)])
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_layer_norm_from_scratch_equals_the_fused_op_the_model_uses(shape, offset):
    """03's LayerNorm written out (course_lib.parts.model.layer_norm) is what F.layer_norm computes, values
    and gradients; the model runs the fused op (one kernel instead of five passes)."""
    from course_lib.parts.model import layer_norm

    g = torch.Generator().manual_seed(2)
    d = shape[-1]
    gamma, beta = torch.randn(d, generator=g, requires_grad=True), torch.randn(d, generator=g, requires_grad=True)
    x = (3 * torch.randn(*shape, generator=g) + offset).requires_grad_()
    ours = layer_norm(x, gamma, beta, 1e-5)
    fused = F.layer_norm(x, (d,), gamma, beta, 1e-5)
    torch.testing.assert_close(ours, fused, atol=2e-4 if offset else 2e-5, rtol=1e-5)
    dy = torch.randn(*shape, generator=g)
    grads_ours = torch.autograd.grad(ours, (x, gamma, beta), dy)
    grads_fused = torch.autograd.grad(fused, (x, gamma, beta), dy)
    for a, b in zip(grads_ours, grads_fused):
        torch.testing.assert_close(a, b, atol=1e-3 if offset else 1e-4, rtol=1e-4)
    # far from 0, float32 loses digits of x − μ in both computations alike (offset 1e3: ~1e-4)
    torch.testing.assert_close(layer_norm(x, gamma), F.layer_norm(x, (d,), gamma, None, 1e-5),
                               atol=2e-4 if offset else 2e-5, rtol=1e-5)


def test_layernorm_of_constant_vector_is_beta():
    ln = LayerNorm(4)
    with torch.no_grad():
        ln.bias.fill_(0.5)
    torch.testing.assert_close(ln(torch.full((2, 4), 3.0)), torch.full((2, 4), 0.5))


# ---------------------------------------------------------------------------------------------- counting

@pytest.mark.parametrize("config", [
    SMALL,
    GPTConfig(vocab_size=101, context=8, n_layer=3, n_head=2, d_model=24, bias=False),
    GPTConfig(vocab_size=30, context=12, n_layer=1, n_head=1, d_model=16, tie_weights=False),
])
def test_param_count_formula_matches_code(config):
    model = GPT(config)
    assert count_params(model, non_embedding=True) == param_count_formula(config, non_embedding=True)
    assert count_params(model, non_embedding=False) == param_count_formula(config, non_embedding=False)
    d, L = config.d_model, config.n_layer
    extra = (13 * L * d + 2 * d) if config.bias else (2 * L * d + d)   # biases and LayerNorms
    assert count_params(model) == 12 * L * d * d + extra


def test_tied_weights_are_one_tensor_counted_once():
    model = GPT(SMALL)
    assert model.lm_head.weight is model.tok_emb.weight
    total = sum(p.numel() for p in model.parameters())                    # parameters() de-duplicates
    assert count_params(model, non_embedding=False) == total
    untied = GPT(GPTConfig(**{**SMALL.to_dict(), "tie_weights": False}))
    assert count_params(untied, non_embedding=False) == total + SMALL.vocab_size * SMALL.d_model
    assert count_params(untied) == count_params(model)                    # the lm head is left out of N


@pytest.mark.parametrize("config", [SMALL, GPTConfig(vocab_size=97, context=20, n_layer=3, n_head=3, d_model=48)])
def test_param_counts_agree_with_transformers_gpt2(config):
    from transformers import GPT2LMHeadModel

    reference = GPT2LMHeadModel(gpt2_config(config))
    assert sum(p.numel() for p in reference.parameters()) == count_params(GPT(config), non_embedding=False)
    assert reference.num_parameters(exclude_embeddings=True) == count_params(GPT(config), non_embedding=True)


def test_logits_agree_with_transformers_gpt2():
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    reference = GPT2LMHeadModel(gpt2_config(SMALL)).eval()
    with torch.no_grad():                                 # make the biases and LayerNorms non-trivial
        for name, p in reference.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    ours = load_gpt2_weights(GPT(SMALL), reference.state_dict()).eval()
    idx = ids((3, 16))
    logits, loss = ours(idx, idx)
    out = reference(idx, labels=idx)
    torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=1e-5)
    # transformers shifts the labels inside; ours expects targets already shifted
    torch.testing.assert_close(ours(idx[:, :-1], idx[:, 1:])[1], out.loss, atol=1e-5, rtol=1e-5)


def test_attention_agrees_with_course_attention():
    from course_lib.parts.attention import MultiHeadAttention, causal_mask

    torch.manual_seed(0)
    model = GPT(SMALL)
    attn = model.blocks[0].attn
    with torch.no_grad():
        attn.qkv.bias.normal_(), attn.proj.bias.normal_()
    mha = MultiHeadAttention(SMALL.d_model, SMALL.n_head)
    with torch.no_grad():
        for name, w, b in zip(("W_q", "W_k", "W_v"), attn.qkv.weight.chunk(3), attn.qkv.bias.chunk(3)):
            getattr(mha, name).weight.copy_(w)
            getattr(mha, name).bias.copy_(b)
        mha.W_o.weight.copy_(attn.proj.weight)
        mha.W_o.bias.copy_(attn.proj.bias)
    x = torch.randn(2, 10, SMALL.d_model)
    torch.testing.assert_close(attn(x), mha(x, causal_mask(10)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [SMALL, GPTConfig(vocab_size=70, context=12, n_layer=3, n_head=2, d_model=40)])
def test_flops_per_token_matches_flop_counter(config):
    model = GPT(config)
    B, T = 2, config.context
    idx = ids((B, T), config.vocab_size)
    with sdpa_kernel(SDPBackend.MATH):                    # the CPU flash kernel is not counted by torch
        with FlopCounterMode(display=False) as forward:
            model(idx)
        with FlopCounterMode(display=False) as training:
            model(idx, idx)[1].backward()
    assert forward.get_total_flops() == B * T * flops_per_token(config, training=False)
    assert training.get_total_flops() == B * T * flops_per_token(config, training=True)
    # the rule of thumb: C ≈ 6N plus the lm head and attention terms
    N = 12 * config.n_layer * config.d_model ** 2
    assert flops_per_token(config) == 6 * N + 6 * config.d_model * config.vocab_size \
        + 12 * config.n_layer * T * config.d_model
    assert flops_per_token(config, seq_len=4) < flops_per_token(config)


def test_memory_estimate_matches_measurements():
    config = GPTConfig(vocab_size=50, context=16, n_layer=3, n_head=4, d_model=32)
    model = GPT(config)
    idx = ids((3, 16))
    estimate = memory_estimate(config, batch_size=3)
    measured = saved_activation_bytes(model, idx, idx)
    # the estimate leaves out small (B, T, 1) statistics and the int64 ids: within 2 %
    assert abs(measured - estimate["activations"]) / measured < 0.02
    big = 4 * ACTIVATION_UNITS_PER_BLOCK * 3 * 16 * 32
    assert estimate["activations"] > config.n_layer * big
    optimizer = torch.optim.AdamW(model.parameters())
    model(idx, idx)[1].backward()
    optimizer.step()
    params = list(model.parameters())
    assert estimate["weights"] == sum(p.numel() * p.element_size() for p in params)
    assert estimate["gradients"] == sum(p.grad.numel() * p.grad.element_size() for p in params)
    adam = sum(t.numel() * t.element_size() for s in optimizer.state.values() for k, t in s.items()
               if k in ("exp_avg", "exp_avg_sq"))
    assert estimate["adam_states"] == adam
    assert estimate["total"] == sum(v for k, v in estimate.items() if k != "total")


# ---------------------------------------------------------------------------------------------- behaviour

def test_loss_is_cross_entropy_and_near_log_vocab_at_init():
    model = GPT(SMALL)
    idx, targets = ids((4, 16)), ids((4, 16), seed=1)
    logits, loss = model(idx, targets)
    assert logits.shape == (4, 16, SMALL.vocab_size)
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), targets.flatten()))
    assert abs(loss.item() - math.log(SMALL.vocab_size)) < 0.1
    assert model(idx)[1] is None


def test_future_tokens_do_not_change_past_logits():
    model = GPT(SMALL).eval()
    idx = ids((2, 16))
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 7) % SMALL.vocab_size
    a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_gradient_flows_only_to_the_past():
    model = GPT(SMALL)
    emb = model.tok_emb(ids((1, 16))).detach().requires_grad_()
    x = emb + model.pos_emb(torch.arange(16))
    for block in model.blocks:
        x = block(x)
    x[0, 5].sum().backward()
    grad_norm = emb.grad[0].norm(dim=-1)
    assert (grad_norm[:6] > 0).all() and (grad_norm[6:] == 0).all()


def test_bad_inputs_raise_one_clear_sentence():
    model = GPT(SMALL)
    with pytest.raises(ValueError, match="context is 16; crop it"):
        model(ids((1, 17)))
    with pytest.raises(ValueError, match="outside 0..49"):
        model(torch.tensor([[3, 50]]))
    with pytest.raises(ValueError, match="outside 0..49"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"unsqueeze\(0\)"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="same shape as idx"):
        model(ids((2, 4)), ids((2, 5)))
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPTConfig(d_model=30, n_head=4)
    with pytest.raises(ValueError, match="positive int"):
        GPTConfig(n_layer=0)
    with pytest.raises(TypeError, match="GPTConfig"):
        GPT({"d_model": 32})


def test_generate_shapes_seeds_and_greedy():
    model = GPT(SMALL)
    prompt = ids((2, 3))
    a = model.generate(prompt, 20, generator=torch.Generator().manual_seed(0))
    b = model.generate(prompt, 20, generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 23) and torch.equal(a, b) and torch.equal(a[:, :3], prompt)
    assert model.training                                          # restored after sampling
    greedy = model.generate(prompt, 5, temperature=0)
    assert torch.equal(greedy, model.generate(prompt, 5, top_k=1))
    model.eval()
    expected = prompt
    for _ in range(5):                                             # greedy, written out by hand
        next_id = model(expected[:, -16:])[0][:, -1].argmax(-1, keepdim=True)
        expected = torch.cat([expected, next_id], 1)
    assert torch.equal(greedy, expected)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 2, temperature=-1)


@pytest.mark.parametrize("k", [1, 3, 29, 100])
def test_top_k_matches_transformers(k):
    from transformers.generation.logits_process import TopKLogitsWarper

    z = 2 * torch.randn(5, 29, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(top_k_filter(z, k), TopKLogitsWarper(k)(None, z.clone()))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 1.0])
def test_top_p_matches_transformers(p):
    from transformers.generation.logits_process import TopPLogitsWarper

    z = 2 * torch.randn(5, 29, generator=torch.Generator().manual_seed(0))
    ours, theirs = top_p_filter(z, p), TopPLogitsWarper(p)(None, z.clone())
    assert torch.equal(ours.isinf(), theirs.isinf())
    torch.testing.assert_close(ours[~ours.isinf()], z[~ours.isinf()])
    with pytest.raises(ValueError, match="top_p"):
        top_p_filter(z, 0.0)


# ---------------------------------------------------------------------------------------------- KV cache

def test_kv_cache_logits_equal_the_full_forward_pass():
    from course_lib.parts.model import KVCache

    torch.manual_seed(0)
    model = GPT(SMALL).eval()
    x = ids((2, 12))
    full = model(x)[0]
    cache = KVCache(SMALL.n_layer)
    pieces = [model(x[:, :5], kv_cache=cache)[0]]                          # a prompt of 5 tokens
    pieces += [model(x[:, i:i + 1], kv_cache=cache)[0] for i in range(5, 9)]   # one token at a time
    pieces.append(model(x[:, 9:], kv_cache=cache)[0])                      # several new tokens at once
    torch.testing.assert_close(torch.cat(pieces, 1), full)
    assert cache.length == 12
    assert cache.nbytes() == 2 * SMALL.n_layer * 2 * 12 * SMALL.d_model * 4   # 2·L·B·t·d floats
    with pytest.raises(ValueError, match="KV cache holds 12 tokens"):
        model(ids((2, 5)), kv_cache=cache)


@pytest.mark.parametrize("settings", [dict(temperature=0), dict(temperature=1.0), dict(temperature=0.7, top_k=5),
                                      dict(top_p=0.8)])
@pytest.mark.parametrize("prompt_len, new", [(1, 15), (4, 12), (3, 30), (16, 5)])
def test_kv_cache_generates_the_same_tokens(settings, prompt_len, new):
    """Within the context and past it (where the cached path recomputes the sliding window)."""
    torch.manual_seed(1)
    model = GPT(SMALL)
    prompt = ids((3, prompt_len))
    plain = model.generate(prompt, new, generator=torch.Generator().manual_seed(0), **settings)
    cached = model.generate(prompt, new, generator=torch.Generator().manual_seed(0), kv_cache=True, **settings)
    assert torch.equal(plain, cached)


def test_one_cached_query_attends_to_every_key():
    """The trap: scaled_dot_product_attention(is_causal=True) with one query keeps only the first key."""
    from course_lib.parts.attention import scaled_dot_product_attention as course_attention
    from course_lib.parts.model import CausalSelfAttention, KVCache

    torch.manual_seed(2)
    attn = CausalSelfAttention(SMALL).eval()
    x = torch.randn(2, 6, SMALL.d_model)
    cache = KVCache(1)
    attn(x[:, :5], cache, 0)
    last = attn(x[:, 5:], cache, 0)
    torch.testing.assert_close(last, attn(x)[:, 5:])
    q = torch.randn(1, 1, 1, 8)
    k = torch.randn(1, 1, 4, 8)
    wrong = torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True)
    torch.testing.assert_close(wrong, k[:, :, :1])                          # only the first key
    right = torch.nn.functional.scaled_dot_product_attention(q, k, k)
    torch.testing.assert_close(right, course_attention(q, k, k)[0])        # no mask: every key


# ---- the backward pass of LayerNorm by hand (03.3) and the position options' defaults ---------------

@pytest.mark.parametrize("shape", [(6,), (5, 8), (2, 3, 6), (2, 2, 3, 4)])
def test_layer_norm_backward_matches_autograd_in_float64(shape):
    from course_lib.parts.model import layer_norm_backward

    g = torch.Generator().manual_seed(3)
    x = (3 * torch.randn(*shape, generator=g, dtype=torch.float64) + 1).requires_grad_(True)
    gamma = torch.randn(shape[-1], generator=g, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(shape[-1], generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(*shape, generator=g, dtype=torch.float64)
    F.layer_norm(x, (shape[-1],), gamma, beta, 1e-5).backward(dy)
    dx, dgamma, dbeta = layer_norm_backward(x.detach(), gamma.detach(), dy, 1e-5)
    torch.testing.assert_close(dx, x.grad, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(dgamma, gamma.grad, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(dbeta, beta.grad, atol=1e-12, rtol=1e-10)


def test_default_gpt_keeps_learned_positions_and_its_count():
    config = GPTConfig()
    assert config.position == "learned"
    model = GPT(config)
    assert isinstance(model.pos_emb, nn.Embedding) and model.pos_emb.weight.shape == (64, 64)
    with pytest.raises(ValueError, match="GPTConfig.position must be one of learned, sinusoidal, rope, none"):
        GPTConfig(position="alibi")
    with pytest.raises(ValueError, match="d_model / n_head must be even"):
        GPTConfig(d_model=12, n_head=4, position="rope")


def test_the_speed_experiment_times_another_gpt_with_the_course_names():
    # lesson 04 times the student's GPT of lesson 03 against the course's: it is built with the course's weights
    from course_lib.experiments import speed

    result = speed.model_vs_anchor(steps=1, windows=1, anchor_class=speed.AnchorGPT)
    assert result["ratio"] > 0 and "AnchorGPT (the course's weights)" in result["anchor"]
    assert result["parameters"]["course"] == result["parameters"]["anchor"]
