"""The checks of notebook 04 (training_a_language_model) accept correct answers and name each common mistake."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from course_lib import checks
from course_lib.checks import CheckFailed, NotAttempted, ReferenceCalled


def refused(check, fn, *phrases):
    with pytest.raises(CheckFailed) as info:
        check(fn)
    message = str(info.value)
    for phrase in phrases:
        assert phrase in message, message
    return message


def accepted(check, fn, capsys):
    check(fn)
    assert "passed" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- 04.2

def schedule_right(step, lr, warmup_steps, total_steps, min_lr):
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def schedule_library(step, lr, warmup_steps, total_steps, min_lr):
    from course_lib.parts.lm import lr_at

    return torch.tensor(lr_at(step, lr=lr, warmup_steps=warmup_steps, total_steps=total_steps, min_lr=min_lr))


def schedule_torch(step, lr, warmup_steps, total_steps, min_lr):
    """Lean on torch's own schedulers, replayed up to `step`."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(total_steps - 1 - warmup_steps, 1), min_lr)
    if warmup_steps:
        warm = torch.optim.lr_scheduler.LinearLR(opt, 1 / warmup_steps, 1.0, max(warmup_steps - 1, 1))
        sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cosine], [warmup_steps])
    else:
        sched = cosine
    for _ in range(min(step, total_steps - 1)):
        opt.step()
        sched.step()
    return opt.param_groups[0]["lr"] if step < total_steps else min_lr


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("fn", [schedule_right, schedule_torch])
def test_lr_schedule_accepts(fn, capsys):
    accepted(checks.check_lr_schedule, fn, capsys)


def _variant(warm=None, decay=None, after=True):
    def fn(step, lr, warmup_steps, total_steps, min_lr):
        if step < warmup_steps:
            return warm(step, lr, warmup_steps) if warm else lr * (step + 1) / warmup_steps
        if step >= total_steps and after:
            return min_lr
        p = (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps)
        return decay(p, lr, min_lr, step, warmup_steps, total_steps) if decay else \
            min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * p))
    return fn


def no_warmup(step, lr, warmup_steps, total_steps, min_lr):
    if step >= total_steps:
        return min_lr
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * step / (total_steps - 1)))


@pytest.mark.parametrize("fn, phrase", [
    (no_warmup, "no warm-up"),
    (_variant(warm=lambda s, lr, W: lr * s / W), "warm-up is off by one"),
    (_variant(decay=lambda p, lr, m, *_: 0.5 * lr * (1 + math.cos(math.pi * p))), "decays to 0"),
    (_variant(decay=lambda p, lr, m, s, W, S: m + 0.5 * (lr - m) * (1 + math.cos(math.pi * (s - W) / (S - W)))),
     "does not reach min_lr"),
    (_variant(decay=lambda p, lr, m, *_: m + 0.5 * (lr - m) * (1 + math.cos(180 * p))), "in degrees"),
    (_variant(decay=lambda p, lr, m, *_: m + 0.5 * (lr - m) * (1 + math.cos(p))), "missing π"),
    (_variant(decay=lambda p, lr, m, *_: lr - (lr - m) * p), "linear"),
    (_variant(after=False), "stay at min_lr"),
    (_variant(warm=lambda s, lr, W: lr * (s + 1) / (W + 1)), "first differs at step 0 (warm-up)"),
    (lambda step, **kw: "fast", "should return a number"),
])
def test_lr_schedule_refuses(fn, phrase):
    refused(checks.check_lr_schedule, fn, phrase)


# ---------------------------------------------------------------------------------------------- 04.3

def topk_right(logits, k):
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def topk_scatter(logits, k):
    values, index = torch.topk(logits, k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, index, values)


def topk_log_probs(logits, k):               # log-probabilities: a per-row shift, the same distribution
    return torch.log_softmax(topk_right(logits, k), dim=-1)


def topk_library(logits, k):
    from course_lib.parts.model import top_k_filter

    return top_k_filter(logits, k)


@pytest.mark.parametrize("fn", [topk_right, topk_scatter, topk_log_probs])
def test_top_k_accepts(fn, capsys):
    accepted(checks.check_top_k, fn, capsys)


def _keep(n_of_k):
    def fn(logits, k):
        n = n_of_k(k)
        if n <= 0:
            return torch.full_like(logits, float("-inf"))
        kth = torch.topk(logits, min(n, logits.shape[-1]), dim=-1).values[..., -1:]
        return logits.masked_fill(logits < kth, float("-inf"))
    return fn


def softmax_then_filter(logits, k):
    probs = torch.softmax(logits, dim=-1)
    return topk_right(probs, k)


def probs_with_zeros(logits, k):
    probs = torch.softmax(logits, dim=-1)
    kth = torch.topk(probs, k, dim=-1).values[..., -1:]
    return probs.masked_fill(probs < kth, 0.0)


def zero_not_inf(logits, k):
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, 0.0)


def global_topk(logits, k):
    kth = torch.topk(logits.flatten(), k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def first_row_threshold(logits, k):
    kth = torch.topk(logits.reshape(-1, logits.shape[-1])[0], k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def no_keepdim(logits, k):
    kth = torch.topk(logits, k, dim=-1).values[..., -1]
    return logits.masked_fill(logits < kth, float("-inf"))


def smallest_k(logits, k):
    kth = torch.topk(logits, k, dim=-1, largest=False).values[..., -1:]
    return logits.masked_fill(logits > kth, float("-inf"))


def only_values(logits, k):
    return torch.topk(logits, k, dim=-1).values


def topk_in_place(logits, k):                # right values, but the caller's logits are overwritten
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    logits[logits < kth] = float("-inf")
    return logits


def topk_float32(logits, k):                 # scatter into a float32 buffer: float64 logits come back as float32
    values, index = torch.topk(logits, k, dim=-1)
    return torch.full(logits.shape, float("-inf")).scatter(-1, index, values.float())


@pytest.mark.parametrize("fn, phrase", [
    (_keep(lambda k: k - 1), "keeps k - 1"),
    (_keep(lambda k: k + 1), "keeps k + 1"),
    (softmax_then_filter, "applied softmax before filtering"),
    (probs_with_zeros, "applied softmax before filtering"),
    (zero_not_inf, "sets the dropped logits to 0"),
    (global_topk, "of the whole tensor"),
    (first_row_threshold, "first row's threshold"),
    (no_keepdim, "handle the batch axes"),
    (smallest_k, "not the largest ones"),
    (only_values, "should keep the shape"),
    (lambda logits, k: logits, "drops nothing"),
    (lambda logits, k: topk_right(logits, k) * 2, "changes their values"),
    (topk_in_place, "changes its input logits in place"),
    (topk_float32, "keep the input's dtype"),
])
def test_top_k_refuses(fn, phrase):
    refused(checks.check_top_k, fn, phrase)



# ---------------------------------------------------------------------------------------------- 04.1

from collections import Counter  # noqa: E402


def _count(chunks):
    return Counter(p for chunk in chunks for p in zip(chunk, chunk[1:]))


def _merge_left_to_right(chunk, pair, new_id):
    out, i = [], 0
    while i < len(chunk):
        if i + 1 < len(chunk) and (chunk[i], chunk[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(chunk[i])
            i += 1
    return out


def merge_step_right(chunks, new_id):
    counts = _count(chunks)
    pair = max(counts, key=counts.get)
    return pair, [_merge_left_to_right(c, pair, new_id) for c in chunks]


def merge_step_most_common(chunks, new_id):           # Counter.most_common, a tuple of lists
    counts = Counter()
    for chunk in chunks:
        counts.update(zip(chunk, chunk[1:]))
    (pair, _), = counts.most_common(1)
    return tuple(pair), [_merge_left_to_right(list(c), pair, new_id) for c in chunks]


def merge_step_last_tie(chunks, new_id):              # a different (legal) tie-break: the largest pair
    counts = _count(chunks)
    pair = max(counts, key=lambda p: (counts[p], p))
    return list(pair), [_merge_left_to_right(c, pair, new_id) for c in chunks]


def merge_step_library(chunks, new_id):
    from course_lib.parts.bpe import merge_pair

    counts = _count(chunks)
    pair = min(counts, key=lambda p: (-counts[p], p))
    return pair, [merge_pair(c, pair, new_id) for c in chunks]


@pytest.mark.parametrize("fn", [merge_step_right, merge_step_most_common, merge_step_last_tie])
def test_merge_step_accepts(fn, capsys):
    accepted(checks.check_merge_step, fn, capsys)


def merge_across_pretokens(chunks, new_id):           # counts over the joined stream
    stream = [i for c in chunks for i in c]
    counts = Counter(zip(stream, stream[1:]))
    pair = max(counts, key=counts.get)
    return pair, [_merge_left_to_right(c, pair, new_id) for c in chunks]


def merge_no_skip(chunks, new_id):                    # overlapping merges: [7, 7, 7] -> [new, new]
    counts = _count(chunks)
    pair = max(counts, key=counts.get)
    out = []
    for c in chunks:
        merged = [new_id if (a, b) == pair else a for a, b in zip(c, c[1:])]
        if c and (len(c) < 2 or (c[-2], c[-1]) != pair):
            merged.append(c[-1])
        out.append(merged)
    return pair, out


def merge_first_only(chunks, new_id):
    counts = _count(chunks)
    pair = max(counts, key=counts.get)
    out = []
    for c in chunks:
        for i in range(len(c) - 1):
            if (c[i], c[i + 1]) == pair:
                c = c[:i] + [new_id] + c[i + 2:]
                break
        out.append(list(c))
    return pair, out


def merge_drop_last(chunks, new_id):                  # the loop stops one short and never adds the tail
    counts = _count(chunks)
    pair = max(counts, key=counts.get)
    out = []
    for c in chunks:
        merged, i = [], 0
        while i < len(c) - 1:
            if (c[i], c[i + 1]) == pair:
                merged.append(new_id)
                i += 2
            else:
                merged.append(c[i])
                i += 1
        out.append(merged if len(c) > 1 else list(c))
    return pair, out


def merge_in_place(chunks, new_id):                   # rewrites the caller's lists
    counts = _count(chunks)
    pair = max(counts, key=counts.get)
    for c in chunks:
        c[:] = _merge_left_to_right(c, pair, new_id)
    return pair, chunks


def merge_least_frequent(chunks, new_id):
    counts = _count(chunks)
    pair = min(counts, key=counts.get)
    return pair, [_merge_left_to_right(c, pair, new_id) for c in chunks]


def merge_wrong_id(chunks, new_id):                   # invents its own id instead of the one given
    counts = _count(chunks)
    pair = max(counts, key=counts.get)
    fresh = max(i for c in chunks for i in c) + 1
    return pair, [_merge_left_to_right(c, pair, fresh) for c in chunks]


def merge_flat(chunks, new_id):
    pair, merged = merge_step_right(chunks, new_id)
    return pair, [i for c in merged for i in c]


def merge_swapped(chunks, new_id):
    pair, merged = merge_step_right(chunks, new_id)
    return merged, pair


def merge_tuple_pairs_only(chunks, new_id):           # returns only the pair
    return merge_step_right(chunks, new_id)[0]


@pytest.mark.parametrize("fn, phrase", [
    (merge_across_pretokens, "counted across pre-tokens"),
    (merge_no_skip, "jump past both symbols"),
    (merge_first_only, "only the first occurrence"),
    (merge_drop_last, "drops the last symbol"),
    (merge_in_place, "changes the input pre-tokens in place"),
    (merge_least_frequent, "least frequent"),
    (merge_wrong_id, "use the new_id it is given"),
    (merge_flat, "one flat list"),
    (merge_swapped, "return the pair first"),
    (merge_tuple_pairs_only, "should return a tuple (pair, new_chunks)"),
])
def test_merge_step_refuses(fn, phrase):
    refused(checks.check_merge_step, fn, phrase)


# ---------------------------------------------------------------------------------------------- 04.4

def cache_step_right(q, k, v, k_cache, v_cache):
    k_cache = torch.cat([k_cache, k], dim=-2)
    v_cache = torch.cat([v_cache, v], dim=-2)
    return F.scaled_dot_product_attention(q, k_cache, v_cache), k_cache, v_cache


def cache_step_by_hand(q, k, v, k_cache, v_cache):
    K, V = torch.cat((k_cache, k), 2), torch.cat((v_cache, v), 2)
    weights = torch.softmax(q @ K.mT / math.sqrt(q.shape[-1]), dim=-1)
    return weights @ V, K, V


def cache_step_course_attention(q, k, v, k_cache, v_cache):
    from course_lib.parts.attention import scaled_dot_product_attention

    K, V = torch.cat([k_cache, k], -2), torch.cat([v_cache, v], -2)
    return scaled_dot_product_attention(q, K, V)[0], K, V


def cache_step_library(q, k, v, k_cache, v_cache):
    from course_lib.parts.model import KVCache

    cache = KVCache(1)
    if k_cache.shape[-2]:
        cache.update(0, k_cache, v_cache)
    K, V = cache.update(0, k, v)
    return F.scaled_dot_product_attention(q, K, V), K, V


@pytest.mark.parametrize("fn", [cache_step_right, cache_step_by_hand, cache_step_course_attention])
def test_kv_cache_step_accepts(fn, capsys):
    accepted(checks.check_kv_cache_step, fn, capsys)


def cache_is_causal(q, k, v, k_cache, v_cache):       # the trap: right for the first token only
    K, V = torch.cat([k_cache, k], -2), torch.cat([v_cache, v], -2)
    return F.scaled_dot_product_attention(q, K, V, is_causal=True), K, V


def cache_attend_before_append(q, k, v, k_cache, v_cache):
    y = torch.softmax(q @ k_cache.mT / math.sqrt(q.shape[-1]), -1) @ v_cache
    return y, torch.cat([k_cache, k], -2), torch.cat([v_cache, v], -2)


def cache_prepend(q, k, v, k_cache, v_cache):         # the output is the same, the cache order is not
    K, V = torch.cat([k, k_cache], -2), torch.cat([v, v_cache], -2)
    return F.scaled_dot_product_attention(q, K, V), K, V


def cache_wrong_axis(q, k, v, k_cache, v_cache):
    K, V = torch.cat([k_cache, k], 1), torch.cat([v_cache, v], 1)
    return F.scaled_dot_product_attention(q, K, V), K, V


def cache_not_returned(q, k, v, k_cache, v_cache):
    K, V = torch.cat([k_cache, k], -2), torch.cat([v_cache, v], -2)
    return F.scaled_dot_product_attention(q, K, V), k_cache, v_cache


def cache_no_scale(q, k, v, k_cache, v_cache):
    K, V = torch.cat([k_cache, k], -2), torch.cat([v_cache, v], -2)
    return torch.softmax(q @ K.mT, -1) @ V, K, V


def cache_softmax_over_queries(q, k, v, k_cache, v_cache):
    K, V = torch.cat([k_cache, k], -2), torch.cat([v_cache, v], -2)
    return torch.softmax(q @ K.mT / math.sqrt(q.shape[-1]), -2) @ V, K, V


def cache_keys_in_both(q, k, v, k_cache, v_cache):
    K, V = torch.cat([k_cache, k], -2), torch.cat([v_cache, k], -2)
    return F.scaled_dot_product_attention(q, K, V), K, V


def cache_scales_q_in_place(q, k, v, k_cache, v_cache):
    q /= math.sqrt(q.shape[-1])
    K, V = torch.cat([k_cache, k], -2), torch.cat([v_cache, v], -2)
    return torch.softmax(q @ K.mT, -1) @ V, K, V


def cache_float32(q, k, v, k_cache, v_cache):         # right in float32, loses the float64 inputs' dtype
    y, K, V = cache_step_right(q, k, v, k_cache, v_cache)
    return y.float(), K, V


def cache_first_head_only(q, k, v, k_cache, v_cache):  # right with one head, wrong with several
    K, V = torch.cat([k_cache, k], -2), torch.cat([v_cache, v], -2)
    w = torch.softmax(q[:, :1] @ K[:, :1].mT / math.sqrt(q.shape[-1]), -1)
    return (w @ V[:, :1]).expand_as(q).clone(), K, V


@pytest.mark.parametrize("fn, phrase", [
    (cache_is_causal, "attends only to the first key"),
    (cache_attend_before_append, "append the new key and value before attending"),
    (cache_prepend, "at the front of the cache"),
    (cache_wrong_axis, "append along the time axis"),
    (cache_not_returned, "still holds 0 tokens"),
    (cache_no_scale, "not divided by √d_head"),
    (cache_softmax_over_queries, "wrong axis"),
    (cache_keys_in_both, "v_cache holds the keys"),
    (cache_scales_q_in_place, "changes its input q in place"),
    (cache_float32, "keep the inputs' dtype"),
    (cache_first_head_only, "y differs from the reference on batch 2, 3 heads"),
])
def test_kv_cache_step_refuses(fn, phrase):
    refused(checks.check_kv_cache_step, fn, phrase)


# ---------------------------------------------------------------------------------------------- stubs, hints

@pytest.mark.parametrize("check, exercise", [(checks.check_lr_schedule, "04.2"), (checks.check_top_k, "04.3"),
                                             (checks.check_merge_step, "04.1"),
                                             (checks.check_kv_cache_step, "04.4")])
def test_a_stub_is_reported_as_not_attempted(check, exercise):
    def stub(*args, **kwargs):
        raise NotImplementedError(checks.stub_message(exercise))

    with pytest.raises(NotAttempted, match=rf"^Exercise {exercise} is not done yet"):
        check(stub)


def test_hints_exist_in_three_levels(capsys):
    for exercise in ("04.2", "04.3", "04.1", "04.4"):
        for level in (1, 2, 3):
            checks.hint(exercise, level=level)
    assert capsys.readouterr().out.count("for exercise 04.") == 12


# --------------------------------------------- answers that call the course's reference are refused

from course_lib.parts import bpe  # noqa: E402
from course_lib.parts.bpe import merge_pair as replace_pair  # noqa: E402 -- bound under another name
from course_lib.parts.model import KVCache as Cache  # noqa: E402
from course_lib.parts.model import top_k_filter as keep_top  # noqa: E402
from course_lib.parts.lm import lr_at as schedule  # noqa: E402


REFERENCE_CALLS = {
    "04.1 directly": (checks.check_merge_step, merge_step_library, "course_lib.parts.bpe.merge_pair"),
    "04.1 under another name": (checks.check_merge_step, lambda chunks, new_id: (
        (pair := min(_count(chunks), key=lambda p: (-_count(chunks)[p], p))),
        [replace_pair(c, pair, new_id) for c in chunks]), "course_lib.parts.bpe.merge_pair"),
    "04.1 anything of the course's tokenizer": (checks.check_merge_step, lambda chunks, new_id: (
        bpe.byte_symbols(), merge_step_right(chunks, new_id))[1], "course_lib.parts.bpe.byte_symbols"),
    "04.2 directly": (checks.check_lr_schedule, schedule_library, "course_lib.parts.lm.lr_at"),
    "04.2 under another name": (checks.check_lr_schedule, lambda step, lr, warmup_steps, total_steps, min_lr: schedule(
        step, lr=lr, warmup_steps=warmup_steps, total_steps=total_steps, min_lr=min_lr), "course_lib.parts.lm.lr_at"),
    "04.3 directly": (checks.check_top_k, topk_library, "course_lib.parts.model.top_k_filter"),
    "04.3 under another name": (checks.check_top_k, lambda logits, k: keep_top(logits, k),
                                "course_lib.parts.model.top_k_filter"),
    "04.4 the course's KVCache": (checks.check_kv_cache_step, cache_step_library, "course_lib.parts.model.KVCache"),
    "04.4 under another name": (checks.check_kv_cache_step, lambda q, k, v, kc, vc: (
        (K := Cache(1).update(0, torch.cat([kc, k], -2), torch.cat([vc, v], -2)))
        and (F.scaled_dot_product_attention(q, *K), *K)), "course_lib.parts.model.KVCache"),
}


@pytest.mark.parametrize("name", REFERENCE_CALLS)
def test_an_answer_that_calls_the_reference_is_refused(name):
    check, fn, called = REFERENCE_CALLS[name]
    with pytest.raises(ReferenceCalled) as info:
        check(fn)
    message = str(info.value)
    assert message.startswith("your answer calls ") and f"`{called}`" in message and message.endswith("write it yourself.")


# ------------------------------------------------------ leaks and false refusals (issue 20, item 6)

def merge_step_counting_apart(chunks, new_id):
    # counts a pair again only after the scan has moved past it: [7, 7, 7] would hold (7, 7) once
    counts = Counter()
    for chunk in chunks:
        i = 0
        while i + 1 < len(chunk):
            counts[(chunk[i], chunk[i + 1])] += 1
            i += 2 if chunk[i] == chunk[i + 1] else 1
    pair = max(counts, key=counts.get)
    return pair, [_merge_left_to_right(c, pair, new_id) for c in chunks]


def test_merge_step_refuses_counting_overlapping_pairs_once():
    refused(checks.check_merge_step, merge_step_counting_apart, "only when overlapping pairs are counted once")


@pytest.mark.parametrize("kind", ["float32", "float64", "0-d array"])
def test_lr_schedule_accepts_numpy_numbers(kind, capsys):
    import numpy as np

    convert = {"float32": np.float32, "float64": np.float64, "0-d array": np.array}[kind]
    accepted(checks.check_lr_schedule, lambda step, **kw: convert(schedule_right(step, **kw)), capsys)


@pytest.mark.parametrize("fill", [-1e9, "finfo", -1e4])
def test_top_k_accepts_a_very_low_fill(fill, capsys):
    def topk_filled(logits, k):
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        low = torch.finfo(logits.dtype).min if fill == "finfo" else fill
        return logits.masked_fill(logits < kth, low)

    accepted(checks.check_top_k, topk_filled, capsys)


def test_top_k_still_refuses_a_fill_that_keeps_probability():
    def topk_minus_ten(logits, k):
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        return logits.masked_fill(logits < kth, -10.0)

    refused(checks.check_top_k, topk_minus_ten, "")


# ---------------------------------------------------------------------------------------------- 04.5

from course_lib.checks.training_loop import _SLIPS as LOOP_SLIPS, _assert_slips_differ  # noqa: E402


def make_loop(*, zero_grad="before", clip="before_step", lr="set", decay="matrices", betas=(0.9, 0.95), adam=False,
              targets="shifted", eval_mode="eval", eval_grad=False, back_to_train=True, eval_when="after",
              returns="both", loss_outside=False, extra_forward=False, losses_as="item", step=True):
    """A student's loop with switches for the slips (the defaults are a right answer)."""
    def train_loop(model, tokens, steps, *, batch_size, context, lr_at, generator, weight_decay=0.1, grad_clip=1.0,
                   evaluate=None, eval_every=100):
        params = list(model.parameters())
        groups = {"matrices": [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                               {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                  "all": [{"params": params, "weight_decay": weight_decay}]}
        if decay == "default":
            optimizer = torch.optim.AdamW(params, lr=lr_at(0), betas=betas)
        else:
            optimizer = (torch.optim.Adam if adam else torch.optim.AdamW)(groups[decay], lr=lr_at(0), betas=betas)
        losses, evaluations = [], []
        model.train()
        for s in range(steps):
            starts = torch.randint(len(tokens) - context, (batch_size,), generator=generator)
            x = torch.stack([tokens[i:i + context] for i in starts])
            y = x if targets == "inputs" else torch.stack([tokens[i + 1:i + context + 1] for i in starts])
            if lr == "set":
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(s)
            elif lr == "ahead":
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(s + 1)
            if eval_when == "before" and evaluate is not None and s % eval_every == 0:
                model.eval()
                with torch.no_grad():
                    evaluations.append((s + eval_every, evaluate(model)))
                model.train()
            if zero_grad == "before":
                optimizer.zero_grad()
            if loss_outside:
                logits = model(x)[0]
                loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            else:
                loss = model(x, y)[1]
            if extra_forward:
                model(x, y)
            loss.backward()
            if zero_grad == "after_backward":
                optimizer.zero_grad()
            if clip == "before_step":
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            if step:
                optimizer.step()
            if clip == "after_step":
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            if lr == "behind":
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(s)
            if zero_grad == "after_step":
                optimizer.zero_grad(set_to_none=False)
            losses.append({"item": loss.item(), "tensor": loss.detach(), "numpy": loss.detach().numpy()}[losses_as])
            if eval_when == "after" and evaluate is not None and (s + 1) % eval_every == 0:
                if eval_mode == "eval":
                    model.eval()
                if eval_grad:
                    evaluations.append((s + 1, evaluate(model)))
                else:
                    with torch.no_grad():
                        evaluations.append((s + 1, evaluate(model)))
                if back_to_train:
                    model.train()
        return (losses, evaluations) if returns == "both" else losses
    return train_loop


def loop_with_lambda_lr(model, tokens, steps, *, batch_size, context, lr_at, generator, weight_decay=0.1,
                        grad_clip=1.0, evaluate=None, eval_every=100):
    """torch's scheduler, stepped after the optimiser, and the course's batches."""
    from course_lib.parts.lm import get_batch

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0}],
                                  lr=1.0, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    losses, evaluations = [], []
    for s in range(steps):
        x, y = get_batch(tokens, batch_size, context, generator)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if evaluate is not None and (s + 1) % eval_every == 0:
            model.eval()
            with torch.no_grad():
                evaluations.append((s + 1, evaluate(model)))
            model.train()
    return losses, evaluations


LOOP_RIGHT = {
    "written out": make_loop(),
    "zero_grad after the step": make_loop(zero_grad="after_step"),
    "the loss computed outside the model": make_loop(loss_outside=True),
    "losses as tensors": make_loop(losses_as="tensor"),
    "losses as NumPy scalars": make_loop(losses_as="numpy"),
    "torch's LambdaLR and the course's get_batch": loop_with_lambda_lr,
}


@pytest.mark.parametrize("name", list(LOOP_RIGHT))
def test_train_loop_accepts(name, capsys):
    accepted(checks.check_train_loop, LOOP_RIGHT[name], capsys)


LOOP_WRONG = {
    "gradients accumulated": (make_loop(zero_grad="never"), "pile up across steps"),
    "zero_grad between backward and step": (make_loop(zero_grad="after_backward"), "never change"),
    "clipping after the step": (make_loop(clip="after_step"), "not clipped"),
    "no clipping": (make_loop(clip="none"), "not clipped"),
    "schedule one step ahead": (make_loop(lr="ahead"), "one step ahead"),
    "schedule one step behind": (make_loop(lr="behind"), "one step behind"),
    "constant learning rate": (make_loop(lr="never"), "never changes"),
    "decay on biases and norms": (make_loop(decay="all"), "decay every parameter"),
    "AdamW's default decay everywhere": (make_loop(decay="default"), "default weight decay (0.01)"),
    "default betas": (make_loop(betas=(0.9, 0.999)), "default betas"),
    "Adam with L2": (make_loop(adam=True), "torch.optim.Adam"),
    "no optimiser step": (make_loop(step=False), "never change"),
    "targets not shifted": (make_loop(targets="inputs"), "targets are the inputs themselves"),
    "targets not shifted, loss outside": (make_loop(targets="inputs", loss_outside=True), "targets are not shifted"),
    "evaluation in train mode": (make_loop(eval_mode="train"), "in train mode"),
    "evaluation with gradients": (make_loop(eval_grad=True), "gradients switched on"),
    "left in eval mode": (make_loop(back_to_train=False), "leaves the model in eval mode"),
    "evaluating before the step": (make_loop(eval_when="before"), "runs before the step"),
    "never evaluates": (make_loop(eval_when="never"), "never calls evaluate"),
    "returns the losses only": (make_loop(returns="losses"), "should return (losses, evaluations)"),
    "two forward passes per step": (make_loop(extra_forward=True), "one forward pass per step"),
}


@pytest.mark.parametrize("name", list(LOOP_WRONG))
def test_train_loop_refuses(name):
    fn, phrase = LOOP_WRONG[name]
    message = refused(checks.check_train_loop, fn, phrase)
    assert len(message) < 400 and "tensor(" not in message


def test_train_loop_slips_are_far_apart():
    # every replayed slip lands far beyond the tolerance from the right losses, and from every other slip
    assert len(LOOP_SLIPS) >= 8 and len(LOOP_WRONG) >= 8
    assert min(_assert_slips_differ().values()) > 1e-4


def test_course_loop_passes_the_check_and_stubs_are_not_attempted(capsys):
    from course_lib.checks.training_loop import course_loop

    with pytest.raises(ReferenceCalled, match="course_lib.checks.training_loop.course_loop"):
        checks.check_train_loop(course_loop)      # the fallback is the reference: it may not be handed in

    def stub(*args, **kwargs):
        raise NotImplementedError("Exercise 04.5 is not done yet")

    with pytest.raises(NotAttempted, match="Exercise 04.5 is not done yet"):
        checks.check_train_loop(stub)


def test_course_loop_is_the_same_loop_as_the_students():
    # the fallback (the course's loop behind the exercise's signature) gives the right answer's losses
    from course_lib.checks.training_loop import _TINY, _schedule, _stream, course_loop
    from course_lib.parts.model import GPT, GPTConfig

    tokens, runs = _stream(300, 0), []
    for loop in (course_loop, make_loop()):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**_TINY)).double()
        runs.append(loop(model, tokens, 6, batch_size=4, context=8, lr_at=_schedule,
                         generator=torch.Generator().manual_seed(0), weight_decay=0.5, grad_clip=0.1,
                         evaluate=lambda m: 1.0, eval_every=3))
    assert runs[0][1] == runs[1][1] == [(3, 1.0), (6, 1.0)]
    assert max(abs(a - b) for a, b in zip(runs[0][0], runs[1][0])) < 1e-6


def _loop_cell():
    import re
    from pathlib import Path

    import nbformat

    path = Path(__file__).resolve().parent.parent / "notebooks" / "04_training_a_language_model.ipynb"
    return next(c.source for c in nbformat.read(path, as_version=4).cells
                if "exercise" in c.metadata.get("tags", []) and re.search(r"^# Exercise 04\.5", c.source, re.M))


def test_the_notebooks_loop_passes_its_stub_is_not_attempted_and_the_pasted_key_line_works(capsys):
    from tqdm.auto import tqdm

    from course_lib.editions import strip_solutions

    source = _loop_cell()
    namespace = {"torch": torch, "tqdm": tqdm}
    exec(source, namespace)
    accepted(checks.check_train_loop, namespace["train_loop"], capsys)
    stub = {"torch": torch, "tqdm": tqdm}
    exec(strip_solutions(source, "04.5", "test"), stub)
    with pytest.raises(NotAttempted, match="Exercise 04.5 is not done yet"):
        checks.check_train_loop(stub["train_loop"])
    key_line = checks.HINTS["04.5"][2]
    lines = "        for group in optimizer.param_groups:\n            group[\"lr\"] = lr_at(step)\n"
    assert lines in source
    pasted = {"torch": torch, "tqdm": tqdm}
    exec(source.replace(lines, "        " + key_line + "\n"), pasted)
    accepted(checks.check_train_loop, pasted["train_loop"], capsys)


from course_lib.parts import loop as course_loop_module  # noqa: E402
from course_lib.parts.loop import make_optimizer as decaying_adamw  # noqa: E402 -- under another name


def loop_with_the_course_optimizer(model, tokens, steps, *, batch_size, context, lr_at, generator, weight_decay=0.1,
                                   grad_clip=1.0, evaluate=None, eval_every=100):
    optimizer = decaying_adamw(model, lr_at(0), weight_decay)
    return _drive(model, tokens, steps, optimizer, batch_size, context, lr_at, generator, grad_clip, evaluate,
                  eval_every)


def _drive(model, tokens, steps, optimizer, batch_size, context, lr_at, generator, grad_clip, evaluate, eval_every):
    losses, evaluations = [], []
    for s in range(steps):
        starts = torch.randint(len(tokens) - context, (batch_size,), generator=generator)
        x = torch.stack([tokens[i:i + context] for i in starts])
        y = torch.stack([tokens[i + 1:i + context + 1] for i in starts])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(s)
        optimizer.zero_grad()
        loss = model(x, y)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        losses.append(loss.item())
        if evaluate is not None and (s + 1) % eval_every == 0:
            model.eval()
            with torch.no_grad():
                evaluations.append((s + 1, evaluate(model)))
            model.train()
    return losses, evaluations


def loop_through_the_course_train(model, tokens, steps, *, batch_size, context, lr_at, generator, weight_decay=0.1,
                                  grad_clip=1.0, evaluate=None, eval_every=100):
    from course_lib.parts.lm import get_batch, lm_loss

    batches = iter([get_batch(tokens, batch_size, context, generator) for _ in range(steps)])
    history = course_loop_module.train(model, batches, lm_loss, course_loop_module.LoopConfig(
        steps=steps, lr=lr_at(0), schedule=lr_at, weight_decay=weight_decay, grad_clip=grad_clip, progress=False))
    return history.losses, []


@pytest.mark.parametrize("fn, called", [(loop_with_the_course_optimizer, "course_lib.parts.loop.make_optimizer"),
                                        (loop_through_the_course_train, "course_lib.parts.loop.train")])
def test_train_loop_that_calls_the_reference_is_refused(fn, called):
    with pytest.raises(ReferenceCalled, match=re.escape(called)):
        checks.check_train_loop(fn)
