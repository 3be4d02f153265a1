"""The 08_peft_family checks accept correct answers and refuse each common mistake with its own sentence."""

from __future__ import annotations

import re

import pytest
import torch

from course_lib import checks
from course_lib.checks import CheckFailed, NotAttempted
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


@pytest.mark.parametrize("fn", [nf4_argmin, nf4_midpoints, nf4_library])
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


@pytest.mark.parametrize("fn", [phi_svd, phi_numpy, phi_projection])
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
