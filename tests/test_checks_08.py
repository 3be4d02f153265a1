"""The 08_peft_family checks accept correct answers and refuse each common mistake with its own sentence."""

from __future__ import annotations

import re

import pytest
import torch

from course_lib import checks
from course_lib.checks import CheckFailed, NotAttempted, ReferenceCalled
from course_lib.parts.classifier import mean_pool
from course_lib.parts.quant import NF4_CODEBOOK


def refused(check, answer, sentence):
    with pytest.raises(CheckFailed, match=re.escape(sentence)):
        check(answer)


# ---- 08.2 check_quantize_nf4 ----------------------------------------------------------------------


def nf4_argmin(w, block_size=64):
    blocks = w.reshape(-1, block_size).float()
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / absmax.clamp(min=1e-30).unsqueeze(1)
    codes = (scaled.unsqueeze(-1) - NF4_CODEBOOK).abs().argmin(dim=-1).to(torch.uint8)
    return codes.reshape(w.shape), absmax


def nf4_midpoints(w, block_size=64):  # counts the midpoints below each value, as bitsandbytes does
    flat = w.flatten().to(torch.float32)
    blocks = flat.view(-1, block_size)
    absmax = torch.max(blocks.abs(), dim=1).values
    scaled = torch.where(absmax[:, None] > 0, blocks / absmax[:, None], torch.zeros_like(blocks))
    midpoints = (NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2
    codes = torch.bucketize(scaled, midpoints).to(torch.uint8)
    return codes.view(w.shape), absmax


def nf4_library(w, block_size=64):
    from course_lib.parts.quant import quantize_nf4
    return quantize_nf4(w, block_size)


def nf4_numpy(w, block_size=64):  # all in NumPy: uint8 codes and float32 constants as arrays
    import numpy as np

    blocks = w.detach().double().numpy().reshape(-1, block_size)
    absmax = np.abs(blocks).max(axis=1)
    scaled = blocks / np.where(absmax > 0, absmax, 1.0)[:, None]
    codes = np.abs(scaled[..., None] - NF4_CODEBOOK.double().numpy()).argmin(-1).astype(np.uint8)
    return codes.reshape(tuple(w.shape)), absmax.astype(np.float32)


def nf4_absmax_kept_as_a_column(w, block_size=64):
    codes, absmax = nf4_argmin(w, block_size)
    return codes, absmax[:, None]


@pytest.mark.parametrize("fn", [nf4_argmin, nf4_midpoints, nf4_numpy, nf4_absmax_kept_as_a_column])
def test_quantize_nf4_accepts_correct(fn, capsys):
    checks.check_quantize_nf4(fn)
    assert "check_quantize_nf4 passed" in capsys.readouterr().out


def _nf4_with(scale, rows=None, rounding="nearest", dtype=torch.uint8, block_default=64, in_place=False,
              magnitude=False):
    def fn(w, block_size=block_default):
        if in_place:
            blocks = w.view(-1, block_size)
        else:
            blocks = (w.reshape(-1, w.shape[-1]) if rows else w.reshape(-1, block_size)).float()
        absmax = scale(blocks)
        if in_place:
            blocks /= absmax.clamp(min=1e-30)
            scaled = blocks.float()
        else:
            scaled = blocks / absmax.clamp(min=1e-30)
        if magnitude:
            scaled = scaled.abs()
        if rounding == "floor":
            codes = (torch.searchsorted(NF4_CODEBOOK, scaled.float().contiguous(), right=True) - 1).clamp(0, 15)
        else:
            codes = (scaled.float().unsqueeze(-1) - NF4_CODEBOOK).abs().argmin(-1)
        return codes.to(dtype).reshape(w.shape), absmax.reshape(-1)
    return fn


def _per_block(b):
    return b.abs().amax(dim=1, keepdim=True)


WRONG_NF4 = {
    "one absmax for the whole tensor": _nf4_with(lambda b: b.abs().max()),
    "you rounded down to the level below": _nf4_with(_per_block, rounding="floor"),
    "instead of the largest magnitude, max(|w|)": _nf4_with(lambda b: b.amax(dim=1, keepdim=True)),
    "you scaled each row of the matrix by its own absmax": _nf4_with(_per_block, rows=True),
    "store them as torch.uint8": _nf4_with(_per_block, dtype=torch.int64),
    "the default block_size should be 64": _nf4_with(_per_block, block_default=32),
    "your function changed its input w": _nf4_with(_per_block, in_place=True),
    "losing the sign": _nf4_with(_per_block, magnitude=True),
    "cut the blocks column by column": lambda w, block_size=64: tuple(
        t.T if i == 0 else t for i, t in enumerate(nf4_argmin(w.T.contiguous(), block_size))),
    "should return a pair (codes, absmax)": lambda w, block_size=64: nf4_argmin(w, block_size)[0],
}


@pytest.mark.parametrize("sentence", list(WRONG_NF4))
def test_quantize_nf4_refuses(sentence):
    refused(checks.check_quantize_nf4, WRONG_NF4[sentence], sentence)


def test_quantize_nf4_stub_is_not_attempted():
    def stub(w, block_size=64):
        raise NotImplementedError("Exercise 08.2 is not done yet")
    with pytest.raises(NotAttempted, match="Exercise 08.2 is not done yet"):
        checks.check_quantize_nf4(stub)


# ---- 08.1 check_prompt_forward --------------------------------------------------------------------


def prompt_cat(encoder, prompt, input_ids, attention_mask):
    B, n = input_ids.shape[0], prompt.shape[0]
    embeds = torch.cat([prompt.expand(B, -1, -1), encoder.get_input_embeddings()(input_ids)], dim=1)
    mask = torch.cat([attention_mask.new_ones(B, n), attention_mask], dim=1)
    return mean_pool(encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state, mask)


def prompt_by_hand(encoder, prompt, input_ids, attention_mask):  # pooling written out, prompt repeated
    B, n = input_ids.shape[0], prompt.shape[0]
    embeds = torch.cat([prompt.unsqueeze(0).repeat(B, 1, 1), encoder.embeddings.word_embeddings(input_ids)], 1)
    mask = torch.cat([torch.ones(B, n, dtype=attention_mask.dtype), attention_mask], 1)
    hidden = encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).float()
    return (hidden * m).sum(1) / m.sum(1)


@pytest.mark.parametrize("fn", [prompt_cat, prompt_by_hand])
def test_prompt_forward_accepts_correct(fn, capsys):
    checks.check_prompt_forward(fn)
    assert "check_prompt_forward passed" in capsys.readouterr().out


def _prompt_variant(**how):
    def fn(encoder, prompt, input_ids, attention_mask):
        B, n = input_ids.shape[0], prompt.shape[0]
        words = encoder.get_input_embeddings()(input_ids)
        if how.get("in_place"):
            prompt.unsqueeze_(0)  # mutates the caller's prompt
            soft = prompt.expand(B, -1, -1)
        else:
            soft = prompt.unsqueeze(0) if how.get("no_expand") else prompt.expand(B, -1, -1)
        if how.get("detach"):
            soft = soft.detach()
        ones = attention_mask.new_full((B, n), how.get("mask_value", 1))
        if how.get("back"):
            embeds, mask = torch.cat([words, soft], 1), torch.cat([attention_mask, ones], 1)
        elif how.get("add"):
            embeds, mask = torch.cat([words[:, :n] + soft, words[:, n:]], 1), attention_mask
        else:
            embeds, mask = torch.cat([soft, words], 1), torch.cat([ones, attention_mask], 1)
        if how.get("no_grow"):
            mask = attention_mask
        hidden = encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        if how.get("tokens"):
            return hidden
        if how.get("plain"):
            return hidden.mean(1)
        if how.get("text_only"):
            return mean_pool(hidden[:, n:], attention_mask)
        return mean_pool(hidden, mask)
    return fn


WRONG_PROMPT = {
    "the soft tokens got mask 0": _prompt_variant(mask_value=0),
    "you put the soft tokens after the text": _prompt_variant(back=True),
    "you averaged the states of the real tokens only": _prompt_variant(text_only=True),
    "padding included": _prompt_variant(plain=True),
    "you added the prompt to the first n word embeddings": _prompt_variant(add=True),
    "you returned the token states": _prompt_variant(tokens=True),
    "raised RuntimeError": _prompt_variant(no_expand=True),  # right for one sentence, fails on a batch
    "your function changed its inputs": _prompt_variant(in_place=True),
    "no gradient reaches the prompt": _prompt_variant(detach=True),
}


@pytest.mark.parametrize("sentence", list(WRONG_PROMPT))
def test_prompt_forward_refuses(sentence):
    refused(checks.check_prompt_forward, WRONG_PROMPT[sentence], sentence)


def test_prompt_forward_mask_not_grown_is_reported_briefly():
    with pytest.raises(CheckFailed, match="raised"):
        checks.check_prompt_forward(_prompt_variant(no_grow=True))


# ---- 08.3 check_subspace_similarity ---------------------------------------------------------------


def phi_svd(A1, A2, i, j):
    Vh1, Vh2 = torch.linalg.svd(A1)[2], torch.linalg.svd(A2)[2]
    return (Vh1[:i] @ Vh2[:j].T).pow(2).sum() / min(i, j)


def phi_numpy(A1, A2, i, j):  # numpy, V as columns, plain float out
    import numpy as np
    V1 = np.linalg.svd(A1.numpy(), full_matrices=False)[2].T[:, :i]
    V2 = np.linalg.svd(A2.numpy(), full_matrices=False)[2].T[:, :j]
    return float(np.linalg.norm(V1.T @ V2, "fro") ** 2 / min(i, j))


def phi_projection(A1, A2, i, j):  # trace of the product of the two projections
    V1 = torch.linalg.svd(A1.double(), full_matrices=False).Vh[:i]
    V2 = torch.linalg.svd(A2.double(), full_matrices=False).Vh[:j]
    return torch.trace((V1.T @ V1) @ (V2.T @ V2)) / min(i, j)


def phi_numpy_scalar(A1, A2, i, j):  # a NumPy float64, not a Python float
    import numpy as np

    V1 = np.linalg.svd(A1.double().numpy(), full_matrices=False)[2][:i]
    V2 = np.linalg.svd(A2.double().numpy(), full_matrices=False)[2][:j]
    return np.square(V1 @ V2.T).sum() / min(i, j)


@pytest.mark.parametrize("fn", [phi_svd, phi_numpy, phi_projection, phi_numpy_scalar])
def test_subspace_similarity_accepts_correct(fn, capsys):
    checks.check_subspace_similarity(fn)
    assert "check_subspace_similarity passed" in capsys.readouterr().out


def _svd(A):
    return torch.linalg.svd(A.double(), full_matrices=False)


WRONG_PHI = {
    "you divided by max(i, j)": lambda A1, A2, i, j: (_svd(A1)[2][:i] @ _svd(A2)[2][:j].T).pow(2).sum() / max(i, j),
    "(or by i when j < i)": lambda A1, A2, i, j: (_svd(A1)[2][:i] @ _svd(A2)[2][:j].T).pow(2).sum() / i,
    "you did not square the Frobenius norm":
        lambda A1, A2, i, j: torch.linalg.matrix_norm(_svd(A1)[2][:i] @ _svd(A2)[2][:j].T) / min(i, j),
    "you did not normalise at all": lambda A1, A2, i, j: (_svd(A1)[2][:i] @ _svd(A2)[2][:j].T).pow(2).sum(),
    "rows of A themselves": lambda A1, A2, i, j: (A1.double()[:i] @ A2.double()[:j].T).pow(2).sum() / min(i, j),
    "you took columns of Vh": lambda A1, A2, i, j: (_svd(A1)[2][:, :i].T @ _svd(A2)[2][:, :j]).pow(2).sum() / min(i, j),
    "you took the last singular vectors":
        lambda A1, A2, i, j: (_svd(A1)[2][-i:] @ _svd(A2)[2][-j:].T).pow(2).sum() / min(i, j),
    "phi should be one number":
        lambda A1, A2, i, j: (_svd(A1)[2][:i] @ _svd(A2)[2][:j].T).pow(2) / min(i, j),
    "changed A1 or A2": lambda A1, A2, i, j: phi_svd(A1.mul_(1.0).add_(0.5), A2, i, j),
}


@pytest.mark.parametrize("sentence", list(WRONG_PHI))
def test_subspace_similarity_refuses(sentence):
    refused(checks.check_subspace_similarity, WRONG_PHI[sentence], sentence)


def test_left_singular_vectors_are_refused():
    def left(A1, A2, i, j):
        U1, U2 = _svd(A1)[0], _svd(A2)[0]
        k = min(U1.shape[0], U2.shape[0])
        return (U1[:k, :i].T @ U2[:k, :j]).pow(2).sum() / min(i, j)
    with pytest.raises(CheckFailed, match="phi"):
        checks.check_subspace_similarity(left)


def test_hints_have_three_levels(capsys):
    for exercise in ("08.1", "08.2", "08.3"):
        for level in (1, 2, 3):
            checks.hint(exercise, level=level)
    out = capsys.readouterr().out
    assert out.count("Hint 3/3") == 3


# --------------------------------------------- answers that call the course's reference are refused

from types import SimpleNamespace  # noqa: E402

from course_lib.parts import peft_family, quant  # noqa: E402
from course_lib.parts.peft_family import PromptTuning  # noqa: E402
from course_lib.parts.peft_family import subspace_similarity as phi_of  # noqa: E402 -- bound under another name
from course_lib.parts.quant import quantize_nf4 as to_nf4  # noqa: E402


def prompt_through_the_course_class(encoder, prompt, input_ids, attention_mask):
    base = SimpleNamespace(encoder=encoder, head=torch.nn.Identity(), dropout=torch.nn.Identity(), _pool=mean_pool)
    return PromptTuning.forward(SimpleNamespace(base=base, n_virtual=prompt.shape[0], prompt=prompt), input_ids,
                                attention_mask)


def nf4_through_a_quantised_layer(w, block_size=64):
    linear = torch.nn.Linear(w.shape[-1], w.numel() // w.shape[-1], bias=False)
    with torch.no_grad():
        linear.weight.copy_(w.reshape(linear.weight.shape))
    layer = quant.NF4Linear.from_linear(linear, block_size)
    return quant.unpack_nibbles(layer.packed, w.numel()).reshape(w.shape), layer.absmax


def prompt_under_another_name(encoder, prompt, input_ids, attention_mask):
    base = SimpleNamespace(encoder=encoder, head=torch.nn.Identity(), dropout=torch.nn.Identity(), _pool=mean_pool)
    soft_prompt = peft_family.PromptTuning.forward                     # saved under another name
    return soft_prompt(SimpleNamespace(base=base, n_virtual=prompt.shape[0], prompt=prompt), input_ids, attention_mask)


REFERENCE_CALLS = {
    "08.1 the course's PromptTuning": (checks.check_prompt_forward, prompt_through_the_course_class,
                                       "course_lib.parts.peft_family.PromptTuning"),
    "08.1 under another name": (checks.check_prompt_forward, prompt_under_another_name,
                                "course_lib.parts.peft_family.PromptTuning"),
    "08.2 directly": (checks.check_quantize_nf4, nf4_library, "course_lib.parts.quant.quantize_nf4"),
    "08.2 under another name": (checks.check_quantize_nf4, lambda w, block_size=64: to_nf4(w, block_size),
                                "course_lib.parts.quant.quantize_nf4"),
    "08.2 a quantised layer": (checks.check_quantize_nf4, nf4_through_a_quantised_layer, "course_lib.parts.quant.NF4Linear"),
    "08.3 directly": (checks.check_subspace_similarity, lambda A1, A2, i, j: peft_family.subspace_similarity(A1, A2, i, j),
                      "course_lib.parts.peft_family.subspace_similarity"),
    "08.3 under another name": (checks.check_subspace_similarity, lambda A1, A2, i, j: phi_of(A1, A2, i, j),
                                "course_lib.parts.peft_family.subspace_similarity"),
}


@pytest.mark.parametrize("name", REFERENCE_CALLS)
def test_an_answer_that_calls_the_reference_is_refused(name):
    check, fn, called = REFERENCE_CALLS[name]
    with pytest.raises(ReferenceCalled) as info:
        check(fn)
    message = str(info.value)
    assert message.startswith("your answer calls ") and f"`{called}`" in message and message.endswith("write it yourself.")


def test_the_prompt_forward_may_pool_with_the_course_mean_pool(capsys):
    # 08.1 forbids PromptTuning, not 06's mean_pool (the notebook's solution pools with it)
    checks.check_prompt_forward(prompt_cat)
    assert "check_prompt_forward passed" in capsys.readouterr().out
