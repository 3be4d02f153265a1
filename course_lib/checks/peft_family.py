"""Checks of notebooks/08_peft_family.ipynb (exercises 08.*), with their hints."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from course_lib.checks.framework import (
    exercise, register_hint, fail, call_student, require_tensor, close, compare, passed,
)


# ----------------------------------------------------------------------------------------------
# ---- 08_peft_family: prompt tuning's forward pass, NF4 quantisation, LoRA subspace similarity
# ----------------------------------------------------------------------------------------------

register_hint("08.2",
              "Each block of block_size consecutive numbers (the tensor read row by row) gets its own scale, "
              "the largest |w| in that block; divided by it, the block lies in [-1, 1], and every number is "
              "stored as the index of the nearest of the 16 levels.",
              "Flatten w (w.reshape(-1), which leaves w itself untouched), reshape it to (n_blocks, block_size), "
              "take absmax = blocks.abs().amax(dim=1), scale, then for each scaled number find the closest level "
              "(argmin of the distance to NF4_CODEBOOK, or count the midpoints between levels below it); return "
              "the codes as torch.uint8 in the shape of w.",
              "codes = (scaled.unsqueeze(-1) - NF4_CODEBOOK).abs().argmin(dim=-1).to(torch.uint8)")
register_hint("08.1",
              "The encoder must see n soft tokens followed by the text, as one longer sequence; whatever "
              "describes the sequence (the attention mask, and so the pooling mask) must grow by n too.",
              "Look up the word embeddings of input_ids with encoder.get_input_embeddings(), put prompt "
              "(expanded to the batch) in front with torch.cat along the token axis, prepend n ones to the "
              "attention mask, run encoder(inputs_embeds=..., attention_mask=...), and mean-pool the states "
              "with that grown mask (classifier.mean_pool).",
              "mask = torch.cat([attention_mask.new_ones(B, n), attention_mask], dim=1)")
register_hint("08.3",
              "Compare the directions the two A matrices read from the input, not their entries: the top "
              "right-singular vectors span the subspace each adapter uses; the overlap of two orthonormal "
              "bases is measured by the squared Frobenius norm of their product.",
              "torch.linalg.svd(A) gives U, S, Vh with the right-singular vectors as the *rows* of Vh (sorted "
              "by singular value); take the first i rows of Vh1 and the first j rows of Vh2, multiply one by "
              "the transpose of the other, square and sum, and divide by min(i, j).",
              "return (Vh1[:i] @ Vh2[:j].T).pow(2).sum() / min(i, j)")


# ---- 08.2: block-wise NF4 quantisation -----------------------------------------------------------


def _nf4_reference(w: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from course_lib.parts.quant import quantize_nf4

    return quantize_nf4(w, block_size)


def _nf4_wrong(w: torch.Tensor, block_size: int) -> dict[str, Callable[[], torch.Tensor]]:
    """What the common mistakes return as codes on this case (diagnosed by comparing codes)."""
    from course_lib.parts.quant import NF4_CODEBOOK, quantize_nf4

    def with_scale(scale_of_blocks: Callable[[torch.Tensor], torch.Tensor], blocks_of: Callable[[], torch.Tensor],
                   rounding: str = "nearest") -> torch.Tensor:
        blocks = blocks_of()
        scaled = (blocks / scale_of_blocks(blocks).clamp(min=1e-38)).clamp(-1, 1)
        if rounding == "floor":
            index = (torch.searchsorted(NF4_CODEBOOK, scaled.float().contiguous(), right=True) - 1).clamp(0, 15)
        else:
            index = (scaled.float().unsqueeze(-1) - NF4_CODEBOOK).abs().argmin(-1)
        return index.to(torch.uint8)

    def rows() -> torch.Tensor:
        return w.reshape(-1, block_size).float()

    return {
        "you used one absmax for the whole tensor; every block of block_size numbers needs its own":
            lambda: with_scale(lambda b: b.abs().max(), rows).reshape(w.shape),
        "you rounded down to the level below instead of to the nearest level":
            lambda: with_scale(lambda b: b.abs().amax(1, keepdim=True), rows, "floor").reshape(w.shape),
        "you scaled by the largest value, max(w), instead of the largest magnitude, max(|w|)":
            lambda: with_scale(lambda b: b.amax(1, keepdim=True), rows).reshape(w.shape),
        "you scaled each row of the matrix by its own absmax; the blocks are block_size consecutive numbers "
        "of the flattened tensor, and a row can hold several blocks":
            lambda: with_scale(lambda b: b.abs().amax(1, keepdim=True),
                               lambda: w.reshape(-1, w.shape[-1]).float()).reshape(w.shape),
        "you cut the blocks column by column (from w.T); flatten w row by row (w.reshape(-1))":
            lambda: quantize_nf4(w.T.contiguous(), block_size)[0].T,
        "you took the level nearest to w/absmax among the 8 positive levels only (|w|), losing the sign":
            lambda: with_scale(lambda b: b.abs().amax(1, keepdim=True), lambda: rows().abs()).reshape(w.shape),
    }


def _nf4_cases() -> dict[str, tuple[torch.Tensor, int | None]]:
    g = torch.Generator().manual_seed(8)
    outlier = 0.02 * torch.randn(4, 128, generator=g)
    outlier[1, 70] = 300.0  # one huge weight: only its own block may lose precision
    zeros = 0.05 * torch.randn(3, 64, generator=g)
    zeros[1] = 0.0  # an all-zero block: its codes must point to the level 0, not nan
    return {
        "a (8, 64) weight matrix, block_size=64": (0.05 * torch.randn(8, 64, generator=g), 64),
        "a (4, 128) matrix with one outlier of 300 (rows hold two blocks), block_size=64": (outlier, 64),
        "a (6, 96) matrix with block_size=32 (rows hold three blocks)": (torch.randn(6, 96, generator=g), 32),
        "a (2, 3, 64) tensor with an extra leading dimension, block_size=64": (torch.randn(2, 3, 64, generator=g), 64),
        "a float64 (4, 64) matrix of values near 1e-6, block_size=64":
            (1e-6 * torch.randn(4, 64, generator=g, dtype=torch.float64), 64),
        "a (3, 64) matrix with an all-zero row, block_size=64": (zeros, 64),
        "a (4, 128) matrix with the default block_size": (torch.randn(4, 128, generator=g), None),
        "a (2, 64) matrix of negative numbers only, block_size=64": (-torch.rand(2, 64, generator=g) - 0.1, 64),
    }


@exercise("08.2", points=2, forbid=(
    "course_lib.parts.quant:quantize_nf4",
    "course_lib.parts.quant:NF4Linear",
    "course_lib.parts.quant:QLoRALinear",
    "course_lib.parts.quant:quantize_linears",
    "course_lib.parts.quant:apply_qlora",
))
def check_quantize_nf4(fn: Callable[..., Any]) -> None:
    """``fn(w, block_size=64)`` returns ``(codes, absmax)``: uint8 NF4 codes in the shape of w, and one
    absmax per block of ``block_size`` consecutive numbers of the flattened w (Dettmers et al. 2023)."""
    __tracebackhide__ = True
    for case, (w, block_size) in _nf4_cases().items():
        original = w.clone()
        args = (w,) if block_size is None else (w, block_size)
        result = call_student(fn, *args, case=case)
        if not torch.equal(w, original):
            fail(f"your function changed its input w on {case}: quantising must leave the weights untouched "
                 f"(work on a copy, e.g. w.reshape(-1).float() / absmax rather than w /= absmax).")
        if not (isinstance(result, tuple) and len(result) == 2):
            fail(f"your function should return a pair (codes, absmax), but it returned a {type(result).__name__}.")
        # NumPy arrays are as good an answer as tensors
        codes, absmax = (torch.as_tensor(v.copy()) if type(v).__module__ == "numpy" else v for v in result)
        require_tensor(codes, "codes")
        require_tensor(absmax, "absmax")
        size = 64 if block_size is None else block_size
        expected_codes, expected_absmax = _nf4_reference(w, size)
        if codes.dtype != torch.uint8:
            fail(f"codes have dtype {codes.dtype} on {case}; store them as torch.uint8 (one byte per code "
                 f"0..15; two of them fit in one byte when packed).")
        if tuple(codes.shape) != tuple(w.shape):
            fail(f"codes have shape {tuple(codes.shape)} on {case}, but they should have the shape of w, {tuple(w.shape)} "
                 f"(one code per weight).")
        if block_size is None and absmax.numel() != expected_absmax.numel():
            fail(f"called without block_size, your function made {absmax.numel()} blocks of a tensor of "
                 f"{w.numel()} numbers: the default block_size should be 64, as in QLoRA.")
        if absmax.numel() != expected_absmax.numel():
            if absmax.numel() == 1:
                fail(f"absmax holds a single number on {case}: you used one absmax for the whole tensor; every "
                     f"block of block_size numbers needs its own.")
            if absmax.numel() == w.numel() // w.shape[-1]:
                fail(f"absmax holds one number per row on {case}: you scaled each row of the matrix by its own "
                     f"absmax; the blocks are block_size consecutive numbers of the flattened tensor, and a row "
                     f"can hold several blocks.")
            fail(f"absmax holds {absmax.numel()} numbers on {case}, but a tensor of {w.numel()} numbers in blocks "
                 f"of {size} has {expected_absmax.numel()} blocks.")
        if torch.equal(codes, expected_codes) and close(absmax.reshape(-1), expected_absmax.to(absmax.dtype), rtol=1e-5):
            continue
        sentence = None
        for reason, compute in _nf4_wrong(w, size).items():
            try:
                if torch.equal(codes, compute()):
                    sentence = reason
                    break
            except Exception:  # noqa: BLE001 -- a diagnosis that does not apply to this shape
                continue
        if sentence:
            fail(f"your codes are wrong on {case}: {sentence}.")
        if torch.equal(codes, expected_codes):
            compare(absmax.reshape(-1).double(), expected_absmax.double(), what="your absmax", case=case, rtol=1e-5)
        wrong = int((codes != expected_codes).sum())
        fail(f"{wrong} of your {codes.numel()} codes differ from the reference on {case}: each code should be the "
             f"index of the NF4 level nearest to w / absmax of its block.")
    passed("check_quantize_nf4", f"codes and block absmax match the reference on {len(_nf4_cases())} cases "
                                 f"(outliers, zero blocks, several blocks per row, float64, extra dimensions).")


# ---- 08.1: prompt tuning's forward pass ------------------------------------------------------------


def _tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertModel(config, add_pooling_layer=False).eval()


def _prompt_reference(encoder, prompt, input_ids, attention_mask, *, where="front", mask_value=1,
                      pool="all", combine="cat") -> torch.Tensor:
    from course_lib.parts.classifier import mean_pool

    B, n = input_ids.shape[0], prompt.shape[0]
    words = encoder.get_input_embeddings()(input_ids)
    soft = prompt.unsqueeze(0).expand(B, -1, -1)
    grown = attention_mask.new_full((B, n), mask_value)
    if combine == "add":
        embeds = torch.cat([words[:, :n] + soft, words[:, n:]], dim=1)
        mask = attention_mask
    elif where == "front":
        embeds, mask = torch.cat([soft, words], 1), torch.cat([grown, attention_mask], 1)
    else:
        embeds, mask = torch.cat([words, soft], 1), torch.cat([attention_mask, grown], 1)
    hidden = encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    if pool == "text":
        return mean_pool(hidden[:, n:] if where == "front" else hidden[:, :-n], attention_mask)
    if pool == "plain":
        return hidden.mean(dim=1)
    return mean_pool(hidden, mask)


def _prompt_cases():
    g = torch.Generator().manual_seed(82)
    cases = {}
    ids = torch.randint(5, 40, (3, 7), generator=g)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    cases["a batch of 3 sentences of 7, 4 and 2 tokens, 4 soft tokens"] = (ids, mask, 4)
    cases["one sentence of 5 tokens, 2 soft tokens"] = (torch.randint(5, 40, (1, 5), generator=g),
                                                        torch.ones(1, 5, dtype=torch.long), 2)
    ids = torch.randint(5, 40, (2, 9), generator=g)
    cases["2 padded sentences (9 and 3 tokens), 6 soft tokens"] = (
        ids, torch.tensor([[1] * 9, [1] * 3 + [0] * 6]), 6)
    return cases


@exercise("08.1", points=2, forbid=("course_lib.parts.peft_family:PromptTuning",))
def check_prompt_forward(fn: Callable[..., torch.Tensor]) -> None:
    """``fn(encoder, prompt, input_ids, attention_mask)`` returns the mean-pooled sentence embedding (B, d)
    of [prompt; word embeddings] with the attention and pooling mask grown by n ones (Lester et al. 2021)."""
    __tracebackhide__ = True
    encoder = _tiny_bert()
    g = torch.Generator().manual_seed(83)
    for case, (ids, mask, n) in _prompt_cases().items():
        prompt = torch.randn(n, encoder.config.hidden_size, generator=g)
        ids0, mask0, prompt0 = ids.clone(), mask.clone(), prompt.clone()
        result = call_student(fn, encoder, prompt, ids, mask, case=case)
        if not (torch.equal(ids, ids0) and torch.equal(mask, mask0) and torch.equal(prompt, prompt0)):
            fail(f"your function changed its inputs on {case}: build a new, longer mask with torch.cat instead "
                 f"of writing into attention_mask (or the prompt).")
        with torch.no_grad():
            expected = _prompt_reference(encoder, prompt, ids, mask)
        if isinstance(result, torch.Tensor) and tuple(result.shape) == (ids.shape[0], ids.shape[1] + n,
                                                                         encoder.config.hidden_size):
            fail(f"you returned the token states (B, n + T, d) on {case}; mean-pool them into one vector per "
                 f"sentence (B, d), with the grown mask.")
        reference = dict(encoder=encoder, prompt=prompt, input_ids=ids, attention_mask=mask)
        wrong = {
            "the soft tokens got mask 0, so the text never attends to them and the pooling skips them; "
            "prepend ones": lambda: _prompt_reference(**reference, mask_value=0),
            "you put the soft tokens after the text; prompt tuning prepends them":
                lambda: _prompt_reference(**reference, where="back"),
            "you averaged the states of the real tokens only; the pooling mask grows too, so average the "
            "soft tokens' states with them": lambda: _prompt_reference(**reference, pool="text"),
            "you averaged over every position, padding included; pool with the (grown) attention mask":
                lambda: _prompt_reference(**reference, pool="plain"),
            "you added the prompt to the first n word embeddings; prompt tuning puts n new tokens in front "
            "(torch.cat), it does not change the existing ones": lambda: _prompt_reference(**reference, combine="add"),
        }
        with torch.no_grad():
            compare(result.detach() if isinstance(result, torch.Tensor) else result, expected,
                    what="your sentence embedding", case=case, wrong_answers=wrong, atol=1e-5)
    # the gradient must reach the prompt (it is what trains)
    prompt = torch.randn(3, encoder.config.hidden_size, generator=g, requires_grad=True)
    ids, mask = torch.randint(5, 40, (2, 4), generator=g), torch.ones(2, 4, dtype=torch.long)
    out = call_student(fn, encoder, prompt, ids, mask, case="a prompt that requires grad")
    if not (isinstance(out, torch.Tensor) and out.requires_grad):
        fail("your embedding does not depend on the prompt through autograd (no gradient would reach it): "
             "do not detach the prompt or run under torch.no_grad().")
    out.sum().backward()
    if prompt.grad is None or torch.count_nonzero(prompt.grad) == 0:
        fail("no gradient reaches the prompt: the soft tokens must enter the encoder as part of inputs_embeds.")
    passed("check_prompt_forward", f"soft tokens in front, the mask grown by n, mean pooling over the grown mask "
                                   f"and a gradient into the prompt, on {len(_prompt_cases())} batches.")


# ---- 08.3: subspace similarity (Hu et al. 2021, Sec. 7.2) -------------------------------------------


def _top_right(A: torch.Tensor, k: int) -> torch.Tensor:
    return torch.linalg.svd(A.double(), full_matrices=False)[2][:k]


def _phi(A1: torch.Tensor, A2: torch.Tensor, i: int, j: int) -> torch.Tensor:
    return (_top_right(A1, i) @ _top_right(A2, j).T).pow(2).sum() / min(i, j)


def _phi_cases() -> dict[str, tuple[torch.Tensor, torch.Tensor, int, int]]:
    g = torch.Generator().manual_seed(73)
    A8, A64 = torch.randn(8, 40, generator=g), torch.randn(16, 40, generator=g)
    shared = torch.randn(3, 40, generator=g)
    B1 = torch.cat([3 * shared, 0.1 * torch.randn(3, 40, generator=g)])
    B2 = torch.cat([torch.randn(3, 3, generator=g) @ shared, 0.1 * torch.randn(7, 40, generator=g)])
    scaled = (1e6 * torch.randn(4, 30, generator=g)).double()
    return {
        "the same matrix twice, i=2, j=5": (A8, A8, 2, 5),
        "A1 (8, 40) and A2 (16, 40), i=4, j=10": (A8, A64, 4, 10),
        "A1 (8, 40) and A2 (16, 40), i=6, j=2 (j < i)": (A8, A64, 6, 2),
        "two adapters sharing a 3-dimensional subspace, i=3, j=3": (B1, B2, 3, 3),
        "float64 entries of size 1e6, A1 (4, 30) and A2 (4, 30), i=3, j=1": (scaled, scaled.flip(0) + 1e5, 3, 1),
        "i = j = 1 on A1 (8, 40), A2 (16, 40)": (A8, A64, 1, 1),
    }


@exercise("08.3", points=1, forbid=("course_lib.parts.peft_family:subspace_similarity",))
def check_subspace_similarity(fn: Callable[..., Any]) -> None:
    """``fn(A1, A2, i, j)`` returns phi = ||V1_i^T V2_j||_F^2 / min(i, j) for the top-i and top-j right-singular
    vectors of LoRA's A matrices (shape (r, d_in)), a number in [0, 1] (Hu et al. 2021, Eq. 4)."""
    __tracebackhide__ = True
    for case, (A1, A2, i, j) in _phi_cases().items():
        copies = (A1.clone(), A2.clone())
        result = call_student(fn, A1, A2, i, j, case=case)
        if not (torch.equal(A1, copies[0]) and torch.equal(A2, copies[1])):
            fail(f"your function changed A1 or A2 on {case}; leave the adapters as they are.")
        value = torch.as_tensor(result.detach() if isinstance(result, torch.Tensor) else result, dtype=torch.float64)
        if value.numel() != 1:
            fail(f"phi should be one number, but your function returned a tensor of shape {tuple(value.shape)} on {case}.")
        value = value.reshape(())
        expected = _phi(A1, A2, i, j)
        V1, V2 = _top_right(A1, i), _top_right(A2, j)
        U1 = torch.linalg.svd(A1.double(), full_matrices=False)[0]
        U2 = torch.linalg.svd(A2.double(), full_matrices=False)[0]
        Vh1 = torch.linalg.svd(A1.double(), full_matrices=False)[2]
        Vh2 = torch.linalg.svd(A2.double(), full_matrices=False)[2]
        wrong = {
            "you divided by max(i, j) (or by i when j < i); the paper normalises by min(i, j), so that phi = 1 "
            "when one subspace contains the other": lambda: (V1 @ V2.T).pow(2).sum() / max(i, j),
            "you did not square the Frobenius norm (phi = ||V1^T V2||_F^2 / min(i, j))":
                lambda: torch.linalg.matrix_norm(V1 @ V2.T) / min(i, j),
            "you did not normalise at all (divide the squared norm by min(i, j))": lambda: (V1 @ V2.T).pow(2).sum(),
            "you used the rows of A themselves instead of their (orthonormal) singular vectors":
                lambda: (A1.double()[:i] @ A2.double()[:j].T).pow(2).sum() / min(i, j),
            "you took columns of Vh (Vh[:, :i]); the right-singular vectors are the rows of Vh "
            "(torch.linalg.svd returns A = U S Vh)":
                lambda: (Vh1[:, :i].T @ Vh2[:, :j]).pow(2).sum() / min(i, j),
            "you used the left-singular vectors U (they live in the rank space, of size r); LoRA's A reads "
            "the input through its rows, so use the right-singular vectors":
                lambda: (U1[:, :i].T @ U2[:, :j]).pow(2).sum() / min(i, j),
            "you took the last singular vectors; the top ones come first in torch.linalg.svd":
                lambda: (Vh1[-i:] @ Vh2[-j:].T).pow(2).sum() / min(i, j),
        }
        # float32 SVDs agree with the float64 reference to ~1e-5 when singular values are close
        compare(value, expected, what="your phi", case=case, wrong_answers=wrong, atol=1e-4, rtol=1e-4)
    passed("check_subspace_similarity", f"phi matches the reference on {len(_phi_cases())} pairs of adapters "
                                        f"(j < i, shared subspaces, identical inputs, float64 at 1e6).")
