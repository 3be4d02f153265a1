"""Checks of notebooks/04_training_a_language_model.ipynb (exercises 04.*), with their hints."""

from __future__ import annotations

from collections.abc import Callable

import torch

from course_lib.checks.framework import (
    exercise, StudentCodeError, register_hint, fail, call_student, require_tensor, close, compare, passed,
)


# ----------------------------------------------------------------------------------------------
# ---- 04_training: the learning-rate schedule, top-k sampling
# ----------------------------------------------------------------------------------------------

register_hint(
    "04.2",
    "Two phases and a floor: a straight line up from lr / warmup_steps to lr over the warm-up steps, then "
    "half a cosine wave from lr down to min_lr over the remaining steps, and min_lr forever after.",
    "Branch on the step: step < warmup_steps → the warm-up line (step 0 must already be above 0, so count "
    "step + 1); step >= total_steps → min_lr; otherwise compute the progress p = (step - warmup_steps) / "
    "(total_steps - 1 - warmup_steps), which runs from 0 at the first decay step to exactly 1 at the last "
    "step, and map it through ½(1 + cos(π p)), which runs from 1 to 0.",
    "return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * p))   # and lr * (step + 1) / "
    "warmup_steps during the warm-up",
)
register_hint(
    "04.3",
    "Find the k-th largest logit of each row: everything strictly below it gets -inf, so that softmax gives "
    "it probability 0, and everything else keeps its value.",
    "torch.topk(logits, k, dim=-1) returns the k largest values of every row, sorted; the last of them is "
    "the threshold. Keep the last axis (slice with -1:) so that the threshold broadcasts against its row "
    "for any number of batch axes, and build a new tensor instead of writing into the input.",
    "kth = torch.topk(logits, k, dim=-1).values[..., -1:]; return logits.masked_fill(logits < kth, "
    "float('-inf'))",
)
register_hint(
    "04.1",
    "Count every adjacent pair inside each pre-token (never across two of them), take a pair with the "
    "largest count, and rewrite every pre-token with that pair replaced by new_id.",
    "A collections.Counter over zip(chunk, chunk[1:]) for every chunk gives the counts; max(counts, "
    "key=counts.get) a most frequent pair. Then scan each chunk left to right with an index i: where "
    "(chunk[i], chunk[i+1]) is the pair, append new_id and jump by 2 (so [7, 7, 7] becomes [new, 7]), "
    "else append chunk[i] and step by 1 -- and don't forget the last symbol. Build new lists; leave the "
    "input alone.",
    "if i + 1 < len(chunk) and (chunk[i], chunk[i + 1]) == pair: out.append(new_id); i += 2",
)
register_hint(
    "04.4",
    "The new token's key and value join the cache first; then its one query attends over every stored "
    "key, its own included. There is nothing to mask: no key in the cache lies in its future.",
    "Concatenate along the time axis, which is dim=-2 of (B, H, t, d_head), with the new entries at the "
    "end; then softmax(q Kᵀ / √d_head) V over the full K and V. If you use "
    "F.scaled_dot_product_attention, do not pass is_causal=True: with a single query its mask keeps only "
    "the first key.",
    "k_cache = torch.cat([k_cache, k], dim=-2); v_cache = torch.cat([v_cache, v], dim=-2); "
    "y = F.scaled_dot_product_attention(q, k_cache, v_cache)",
)


@exercise("04.2", points=1, forbid=("course_lib.parts.lm:lr_at", "course_lib.parts.loop:cosine_schedule",))
def check_lr_schedule(fn: Callable[..., float]) -> None:
    """Exercise 04.2: ``fn(step, lr, warmup_steps, total_steps, min_lr)`` is linear warm-up then cosine
    decay, exactly as ``course_lib.parts.lm.lr_at``."""
    __tracebackhide__ = True
    import math

    from course_lib.parts.lm import lr_at

    configs = [(1.0, 10, 50, 0.1), (3e-4, 5, 40, 3e-5), (2.0, 0, 20, 0.5), (1.0, 4, 30, 0.0)]
    for lr, W, S, m in configs:
        case = f"lr={lr}, warmup_steps={W}, total_steps={S}, min_lr={m}"
        steps = list(range(S + 3))
        got = []
        for step in steps:
            value = call_student(fn, step, lr=lr, warmup_steps=W, total_steps=S, min_lr=m,
                                 case=f"step {step} with {case}")
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():
                value = value.item()                     # np.float32, np.int64, a 0-d array
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                fail(f"your schedule should return a number, but at step {step} with {case} it returned a "
                     f"{type(value).__name__}.")
            got.append(float(value))
        expected = [lr_at(s, lr=lr, warmup_steps=W, total_steps=S, min_lr=m) for s in steps]

        def agrees(values: list[float]) -> bool:
            return all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12 + 1e-9 * lr) for a, b in zip(got, values))

        if agrees(expected):
            continue

        def schedule(warm: Callable[[int], float], decay: Callable[[int], float]) -> list[float]:
            return [warm(s) if s < W else (m if s >= S else decay(s)) for s in steps]

        def warm_ok(s: int) -> float:
            return lr * (s + 1) / W

        def cosine(p: float, low: float = m, angle: float = math.pi) -> float:
            return low + 0.5 * (lr - low) * (1 + math.cos(angle * p))

        D = S - 1 - W
        p = lambda s: (s - W) / D if D > 0 else 1.0  # noqa: E731
        wrong = {
            "there is no warm-up: the first warmup_steps steps must rise linearly, lr * (step + 1) / "
            "warmup_steps": [cosine(s / (S - 1)) if s < S else m for s in steps],
            "the warm-up is off by one: step 0 must already get lr / warmup_steps (use step + 1), so that "
            "the last warm-up step reaches lr": schedule(lambda s: lr * s / W, lambda s: cosine(p(s))),
            "the cosine decays to 0 instead of min_lr": schedule(warm_ok, lambda s: cosine(p(s), low=0.0)),
            "the cosine does not reach min_lr at the last step: divide by total_steps - 1 - warmup_steps so "
            "that p = 1 at step total_steps - 1": schedule(warm_ok, lambda s: cosine((s - W) / (S - W))),
            "the cosine's argument is in degrees (cos(180 * p)); math.cos takes radians, so use "
            "math.pi * p": schedule(warm_ok, lambda s: cosine(p(s), angle=180.0)),
            "the cosine's argument is missing π: use math.cos(math.pi * p), which runs from 1 to -1":
                schedule(warm_ok, lambda s: cosine(p(s), angle=1.0)),
            "the decay is linear; it should follow half a cosine wave":
                schedule(warm_ok, lambda s: lr - (lr - m) * p(s)),
            "after total_steps the rate must stay at min_lr":
                [warm_ok(s) if s < W else cosine(p(s)) for s in steps],
        }
        for sentence, values in wrong.items():
            if agrees(values):
                fail(f"your schedule is wrong with {case}: {sentence}.")
        first = next(i for i, (a, b) in enumerate(zip(got, expected))
                     if not math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12 + 1e-9 * lr))
        phase = "warm-up" if first < W else ("cosine decay" if first < S else "after the end")
        fail(f"your schedule first differs at step {first} ({phase}) with {case}: it gives {got[first]:.6g}, "
             f"the reference {expected[first]:.6g}.")
    passed("check_lr_schedule", f"your schedule matches warm-up + cosine decay step by step for {len(configs)} "
                                f"settings (no warm-up and min_lr = 0 included).")


@exercise("04.3", points=1, forbid=("course_lib.parts.model:top_k_filter",))
def check_top_k(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
    """Exercise 04.3: ``fn(logits, k)`` keeps the k largest logits of each row (last axis) and sets the
    others to -inf, for any number of leading batch axes."""
    __tracebackhide__ = True
    g = torch.Generator().manual_seed(0)
    cases = [
        ("a vector of 10 logits with k=3", torch.randn(10, generator=g), 3),
        ("a (4, 12) batch with k=5", 2 * torch.randn(4, 12, generator=g), 5),
        ("a (2, 3, 9) batch with k=2", torch.randn(2, 3, 9, generator=g) + torch.arange(3.0)[:, None] * 5, 2),
        ("a (3, 7) batch with k=1", torch.randn(3, 7, generator=g), 1),
        ("a (2, 6) batch with k=6 (keep everything)", torch.randn(2, 6, generator=g), 6),
        ("a float64 (3, 8) batch with k=3", torch.randn(3, 8, generator=g, dtype=torch.float64), 3),
    ]
    for case, z, k in cases:
        given = z.clone()
        try:
            result = call_student(fn, given, k, case=case)
        except StudentCodeError as error:
            if z.dim() > 1:
                fail(f"{error} -- if it works on a single vector, handle the batch axes: take the k-th largest "
                     f"value of each row with keepdim (torch.topk(logits, k, dim=-1).values[..., -1:]) so "
                     f"that it broadcasts against its row.")
            raise
        result = require_tensor(result, "your top-k filter")
        if not torch.equal(given, z):
            fail(f"your top-k filter changes its input logits in place on {case}; the caller may still need "
                 f"them (to try another k, or top-p): build a new tensor (masked_fill, not masked_fill_ or "
                 f"logits[...] = ...).")
        kth = torch.topk(z, k, dim=-1).values[..., -1:]
        expected = z.masked_fill(z < kth, float("-inf"))
        if result.shape != z.shape:
            fail(f"your top-k filter returns shape {tuple(result.shape)} on {case}, but it should keep the "
                 f"shape {tuple(z.shape)}: return all the logits, with the dropped ones set to -inf "
                 f"(torch.topk alone returns only the k kept values).")
        if result.dtype != z.dtype:
            fail(f"your top-k filter returns {result.dtype} for {z.dtype} logits on {case}; keep the input's "
                 f"dtype (torch.full_like or masked_fill, not torch.full without dtype=).")
        result = result.detach().cpu()
        # dropped = probability exactly 0 after the softmax: -inf, or a fill such as -1e9 or finfo.min
        kept = torch.softmax(result.double(), dim=-1) > 0
        want = torch.isfinite(expected)
        probs = torch.softmax(z.double(), dim=-1)
        if torch.equal(kept, want):
            # any per-row shift of the kept logits (e.g. log-probabilities) samples the same tokens
            if close(torch.softmax(result.double(), -1), torch.softmax(expected.double(), -1)):
                continue
            if close(result[kept], probs[kept]) or close(result[kept], (probs.masked_fill(~want, 0.0) / probs.masked_fill(
                    ~want, 0.0).sum(-1, keepdim=True))[kept]):
                fail(f"your top-k filter keeps the right tokens on {case} but returns their probabilities: "
                     f"you applied softmax before filtering; return the logits themselves (the sampler takes "
                     f"the softmax after filtering, and a softmax of probabilities is a much flatter "
                     f"distribution).")
            fail(f"your top-k filter keeps the right logits on {case} but changes their values; return them "
                 f"unchanged (only the dropped ones become -inf).")
        if bool(kept.all()):
            masked = probs.masked_fill(~want, 0.0)
            if close(result, masked) or close(result, masked / masked.sum(-1, keepdim=True)):
                fail(f"your top-k filter returns probabilities with zeros on {case}: you applied softmax "
                     f"before filtering; return the filtered logits, with the dropped ones at -inf (sampling "
                     f"takes the softmax afterwards).")
            if close(result, z.masked_fill(~want, 0.0)):
                fail(f"your top-k filter sets the dropped logits to 0 on {case}; exp(0) = 1 still gives them "
                     f"probability, set them to -inf.")
            fail(f"your top-k filter drops nothing on {case}: every logit still gets some probability; set all "
                 f"but the k largest of each row to -inf.")
        counts = kept.reshape(-1, z.shape[-1]).sum(-1)
        if kept.sum() == k and z.dim() > 1:
            fail(f"your top-k filter keeps {k} logits of the whole tensor on {case}; keep the k largest of "
                 f"every row (topk along dim=-1).")
        if z.dim() > 1:
            first_row_kth = kth.reshape(-1)[0]
            if torch.equal(kept, z >= first_row_kth):
                fail(f"your top-k filter uses the first row's threshold for every row on {case}; take the "
                     f"k-th largest value of each row (topk(...).values[..., -1:]).")
        if bool((counts == k - 1).all()):
            fail(f"your top-k filter keeps k - 1 = {k - 1} logits per row on {case}; the k-th largest value "
                 f"itself must be kept (drop only logits strictly below it).")
        if bool((counts == k + 1).all()):
            fail(f"your top-k filter keeps k + 1 = {k + 1} logits per row on {case}; the threshold is the "
                 f"k-th largest value, not the (k+1)-th.")
        if bool((counts == k).all()) and not torch.equal(kept, want):
            fail(f"your top-k filter keeps {k} logits per row on {case}, but not the largest ones; keep the "
                 f"k largest (topk along the last axis).")
        fail(f"your top-k filter keeps {counts.tolist()} logits per row on {case}, but it should keep k = {k} "
             f"per row.")
    passed("check_top_k", f"your filter keeps exactly the k largest logits of every row on {len(cases)} cases "
                          f"(1-D, 2-D and 3-D, k = 1 and k = vocabulary size, float64), and leaves its input "
                          f"unchanged.")


def _merge(chunk: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    from course_lib.parts.bpe import merge_pair

    return merge_pair(chunk, pair, new_id)


@exercise("04.1", points=2, forbid=("course_lib.parts.bpe:*",))
def check_merge_step(fn: Callable[[list[list[int]], int], tuple]) -> None:
    """Exercise 04.1: ``fn(chunks, new_id) -> (pair, new_chunks)``: one step of BPE training.

    ``chunks`` is a list of pre-tokens, each a list of ids. The pair must be a most frequent adjacent
    pair counted inside the pre-tokens (any of them on a tie); ``new_chunks`` holds every pre-token
    with that pair replaced by ``new_id`` left to right, without overlaps. The input stays unchanged.
    """
    __tracebackhide__ = True
    import copy
    from collections import Counter

    cases = [
        ("one pre-token [1, 2, 3, 1, 2]", [[1, 2, 3, 1, 2]], 9),
        ("pre-tokens [5, 6, 5, 6, 7] and [5, 6]", [[5, 6, 5, 6, 7], [5, 6], [8]], 300),
        ("the pre-tokens [1], [2], [1], [2], … [3, 4] ×3, where (1, 2) is only frequent across pre-tokens",
         [[1], [2]] * 4 + [[3, 4]] * 3, 256),
        ("a run [7, 7, 7, 7, 7] and [8, 9] twice (merges must not overlap)", [[7, 7, 7, 7, 7], [8, 9], [8, 9]], 261),
        ("a run [7, 7, 7, 7, 7] and [8, 9] three times (the run holds the pair (7, 7) four times)",
         [[8, 9], [7, 7, 7, 7, 7], [8, 9], [8, 9]], 262),
        ("a tie between (1, 2) and (3, 4)", [[1, 2], [3, 4], [5]], 400),
    ]
    for case, chunks, new_id in cases:
        given = copy.deepcopy(chunks)
        result = call_student(fn, given, new_id, case=case)
        if given != chunks:
            fail(f"your merge step changes the input pre-tokens in place on {case}; build new lists (the "
                 f"caller keeps the old ones, e.g. to count the next pair).")
        if isinstance(result, tuple | list) and len(result) == 2 and all(isinstance(i, int) for i in result):
            fail(f"your merge step returns only the pair {tuple(result)} on {case}; it should return a tuple "
                 f"(pair, new_chunks) with the merged pre-tokens too.")
        if not (isinstance(result, tuple | list) and len(result) == 2):
            fail(f"your merge step should return a tuple (pair, new_chunks), but on {case} it returned a "
                 f"{type(result).__name__}" + (f" of length {len(result)}." if isinstance(result, tuple | list) else "."))
        pair, new_chunks = result
        if isinstance(pair, list) and pair and isinstance(pair[0], list) and isinstance(new_chunks, tuple | list) \
                and len(new_chunks) == 2 and all(isinstance(i, int) for i in new_chunks):
            fail(f"your merge step returns (new_chunks, pair) on {case}; return the pair first: (pair, new_chunks).")
        if not (isinstance(pair, tuple | list) and len(pair) == 2 and all(isinstance(i, int) for i in pair)):
            fail(f"the pair your merge step returns on {case} should be two ints such as (1, 2), but it is {pair!r}.")
        pair = (int(pair[0]), int(pair[1]))
        counts = Counter(p for chunk in chunks for p in zip(chunk, chunk[1:]))
        top = max(counts.values())
        if counts.get(pair, 0) != top:
            stream = [i for chunk in chunks for i in chunk]
            across = Counter(zip(stream, stream[1:]))
            if across.get(pair, 0) == max(across.values()):
                fail(f"your merge step picks {pair} on {case}, which is most frequent only when pairs are counted "
                     f"across pre-tokens; count pairs inside each pre-token (zip(chunk, chunk[1:]) per chunk), "
                     f"never from the end of one to the start of the next.")
            apart = Counter({p: sum(_merge(chunk, p, -1).count(-1) for chunk in chunks) for p in counts})
            if apart.get(pair, 0) == max(apart.values()):
                fail(f"your merge step picks {pair} on {case}, which is most frequent only when overlapping pairs are "
                     f"counted once; counting looks at every adjacent pair: [7, 7, 7] holds the pair (7, 7) twice "
                     f"(only merging skips ahead).")
            if counts.get(pair, 0) == min(counts.values()):
                fail(f"your merge step picks {pair} on {case}, a least frequent pair; BPE merges a most "
                     f"frequent one (it occurs {top} times).")
            fail(f"your merge step picks {pair} on {case}, which occurs {counts.get(pair, 0)} times; a most "
                 f"frequent pair occurs {top} times.")
        want = [_merge(chunk, pair, new_id) for chunk in chunks]
        if not isinstance(new_chunks, tuple | list) or not all(isinstance(c, tuple | list) for c in new_chunks):
            if isinstance(new_chunks, tuple | list) and new_chunks and all(isinstance(i, int) for i in new_chunks):
                fail(f"your merge step returns one flat list on {case}; return one list per pre-token, so that "
                     f"later merges still cannot cross them.")
            fail(f"new_chunks should be a list of lists of ids on {case}, but it is {type(new_chunks).__name__}.")
        got = [list(c) for c in new_chunks]
        if got == want:
            continue
        if len(got) != len(want):
            fail(f"your merge step returns {len(got)} pre-tokens for {len(want)} on {case}; merge inside each "
                 f"one and keep them all (also those without the pair).")
        used = {i for c in got for i in c} - {i for c in chunks for i in c}
        if used and new_id not in used:
            fail(f"your merge step writes the new token as {sorted(used)[0]} on {case}; use the new_id it is "
                 f"given ({new_id}).")

        def no_skip(chunk: list[int]) -> list[int]:
            out = [new_id if (a, b) == pair else a for a, b in zip(chunk, chunk[1:])]
            return out + ([chunk[-1]] if chunk and (len(chunk) < 2 or (chunk[-2], chunk[-1]) != pair) else [])

        def first_only(chunk: list[int]) -> list[int]:
            for i in range(len(chunk) - 1):
                if (chunk[i], chunk[i + 1]) == pair:
                    return chunk[:i] + [new_id] + chunk[i + 2:]
            return list(chunk)

        def drop_last(chunk: list[int]) -> list[int]:
            merged = _merge(chunk, pair, new_id)
            return merged[:-1] if merged and merged[-1] == chunk[-1] and len(chunk) > 1 and \
                (chunk[-2], chunk[-1]) != pair else merged

        wrong = {
            "after merging a pair the scan must jump past both symbols: [7, 7, 7] with the pair (7, 7) becomes "
            "[new, 7], not [new, new]": [no_skip(c) for c in chunks],
            "it merges only the first occurrence in each pre-token; replace every occurrence": [first_only(c) for c in chunks],
            "it drops the last symbol of a pre-token when that symbol is not part of a merge (the loop stops one "
            "short; append the last symbol too)": [drop_last(c) for c in chunks],
        }
        for sentence, value in wrong.items():
            if got == value:
                fail(f"your merge step is wrong on {case}: {sentence}.")
        fail(f"your merge step picks the right pair {pair} on {case} but returns {got} instead of {want}.")
    passed("check_merge_step", f"your merge step picks a most frequent pair inside the pre-tokens and merges it "
                               f"without overlaps on {len(cases)} cases (runs of one symbol and ties included), "
                               f"leaving its input unchanged.")


@exercise("04.4", points=2, forbid=("course_lib.parts.model:KVCache", "course_lib.parts.model:CausalSelfAttention"))
def check_kv_cache_step(fn: Callable[..., tuple]) -> None:
    """Exercise 04.4: ``fn(q, k, v, k_cache, v_cache) -> (y, k_cache, v_cache)``: one generation step.

    q, k, v: the new token's (B, H, 1, d_head); the caches (B, H, t, d_head) hold the t earlier tokens.
    The new key and value are appended along the time axis; y (B, H, 1, d_head) is the new query's
    attention over all t + 1 keys. The check feeds the returned caches back, token after token, and
    compares with causal attention over the whole sequence.
    """
    __tracebackhide__ = True
    import math

    g = torch.Generator().manual_seed(4)
    cases = [
        ("one head, batch 1, d_head 4", 1, 1, 5, 4, torch.float32, 1.0),
        ("batch 2, 3 heads, d_head 8", 2, 3, 6, 8, torch.float32, 1.0),
        ("float64, batch 2, 2 heads, d_head 16, large scores", 2, 2, 5, 16, torch.float64, 4.0),
    ]
    for name, B, H, T, d, dtype, scale in cases:
        Q, K, V = (scale * torch.randn(B, H, T, d, generator=g, dtype=dtype) for _ in range(3))
        k_cache, v_cache = K[:, :, :0].clone(), V[:, :, :0].clone()
        for t in range(T):
            case = f"{name}, token {t} (the cache holds {t} earlier tokens)"
            inputs = [Q[:, :, t:t + 1].clone(), K[:, :, t:t + 1].clone(), V[:, :, t:t + 1].clone(),
                      k_cache.clone(), v_cache.clone()]
            given = [x.clone() for x in inputs]
            try:
                result = call_student(fn, *given, case=case)
            except StudentCodeError as error:
                if t == 0 and "size" in str(error).lower():
                    fail(f"{error} -- append along the time axis, dim=-2 of (B, H, t, d_head): the empty "
                         f"cache has 0 there, the new key 1.")
                raise
            for x, before, label in zip(given, inputs, ("q", "k", "v", "k_cache", "v_cache")):
                if not torch.equal(x, before):
                    fail(f"your cache step changes its input {label} in place on {case}; compute new tensors "
                         f"(q / math.sqrt(d), not q /= ...).")
            if not (isinstance(result, tuple | list) and len(result) == 3):
                fail(f"your cache step should return (y, k_cache, v_cache), but on {case} it returned a "
                     f"{type(result).__name__}" + (f" of length {len(result)}." if isinstance(result, tuple | list) else "."))
            y, new_k, new_v = result
            for value, label in ((y, "y"), (new_k, "the returned k_cache"), (new_v, "the returned v_cache")):
                require_tensor(value, label)
            want_shape = (B, H, t + 1, d)
            if tuple(new_k.shape) != want_shape or tuple(new_v.shape) != want_shape:
                if tuple(new_k.shape) == (B, H, t, d):
                    fail(f"the returned k_cache still holds {t} tokens on {case}; append the new key (and value) "
                         f"and return the grown caches.")
                fail(f"the returned caches have shapes {tuple(new_k.shape)} and {tuple(new_v.shape)} on {case}, "
                     f"but should have shape {want_shape}: append along the time axis, dim=-2.")
            if y.dtype != dtype:
                fail(f"your cache step returns y as {y.dtype} for {dtype} inputs on {case}; keep the inputs' dtype.")
            if tuple(y.shape) != (B, H, 1, d):
                fail(f"y has shape {tuple(y.shape)} on {case}, but it should have shape {(B, H, 1, d)}: one "
                     f"output for the one new query.")
            keys, values = K[:, :, :t + 1], V[:, :, :t + 1]
            if not close(new_k, keys) or not close(new_v, values):
                if not close(new_k, keys) and close(new_k, torch.cat([K[:, :, t:t + 1], k_cache], -2)):
                    fail(f"your cache step puts the new key at the front of the cache on {case}; append it at "
                         f"the end (torch.cat([k_cache, k], dim=-2)), so that position i stays at index i.")
                if close(new_v, keys):
                    fail(f"your v_cache holds the keys on {case}; append v to v_cache.")
                fail(f"the returned caches on {case} are not the earlier ones with the new key and value "
                     f"appended at the end.")
            scores = Q[:, :, t:t + 1] @ keys.transpose(-2, -1)
            expected = torch.softmax(scores / math.sqrt(d), dim=-1) @ values
            wrong = {
                "the new query attends only to the first key: scaled_dot_product_attention(..., is_causal=True) "
                "with one query aligns the causal mask to the top left; the new token may see every cached "
                "key, so pass no mask": lambda: values[:, :, :1],
                "the new query attends only to the earlier tokens: append the new key and value before "
                "attending (a token attends to itself too)":
                    lambda: torch.softmax(scores[..., :t] / math.sqrt(d), -1) @ values[:, :, :t],
                "the scores are not divided by √d_head": lambda: torch.softmax(scores, dim=-1) @ values,
                "the softmax runs over the wrong axis: normalise over the keys (dim=-1)":
                    lambda: torch.softmax(scores / math.sqrt(d), dim=-2) @ values,
            }
            if t == 0 and (not torch.isfinite(y).all() or close(y, torch.zeros_like(y))):
                fail(f"y is {'nan' if not torch.isfinite(y).all() else 'zero'} on {case}: append the new key "
                     f"and value before attending, so that the first token attends to itself.")
            compare(y, expected, what="y", case=case, wrong_answers=wrong,
                    atol=1e-9 if dtype == torch.float64 else 1e-5, rtol=1e-7 if dtype == torch.float64 else 1e-4)
            k_cache, v_cache = new_k.detach(), new_v.detach()
    passed("check_kv_cache_step", f"your step appends the new key and value and attends over the whole cache, "
                                  f"token after token, in {len(cases)} sequences (several heads and float64 "
                                  f"included), and leaves its inputs unchanged.")
