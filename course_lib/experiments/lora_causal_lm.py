"""The recorded run of lesson 09: zero- and few-shot prompting of SmolLM2-135M-Instruct against LoRA from
several seeds, compared with :func:`course_lib.experiments.stats.compare` (seeds and test snippets resampled
together), and our LoRA step against ``peft``'s.

Explained in notebooks/09_lora_causal_lm_gpu.ipynb. ``python -m course_lib.experiments lora_causal_lm --profile
gpu`` is meant for a GPU; the notebook's live run uses the same functions of ``course_lib.parts.causal_lm``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from course_lib.experiments.stats import compare, Comparison
from course_lib.parts.causal_lm import (answer_perplexity, balanced_shots, compare_with_peft, encode, generate_replies,
                                        parse, run_config, TARGETS, task_scores, train_lora)


def experiment(profile: Any, *, seeds: int = 3, quick: bool = False) -> dict[str, Any]:
    """The recorded run: zero-/few-shot prompting once (greedy, deterministic), then LoRA from each of
    ``seeds`` seeds; which test snippets each got right, and LoRA against each prompt (:func:`versus_prompts`);
    ours vs ``peft`` step time and memory, timed interleaved and repeated."""
    from course_lib.tools import assets
    from course_lib.parts import lora
    from course_lib.tools.data import load_sentiment

    config = run_config("ci" if quick else profile.name)
    device = profile.device
    tokenizer, base = assets.load_causal_lm("smollm2-135m-instruct")
    data = load_sentiment("movies")
    train = data["train"].shuffle(seed=0).select(range(min(config.n_train, len(data["train"]))))
    test = data["test"].shuffle(seed=0).select(range(min(config.n_test, len(data["test"]))))
    texts, labels = list(test["text"]), list(test["label"])
    shots = balanced_shots(data["train"], config.n_shots)
    base = base.to(device)
    replies = {"zero-shot": generate_replies(base, tokenizer, texts),
               f"{len(shots)}-shot": generate_replies(base, tokenizer, texts, shots)}
    scores = {name: task_scores(r, labels) for name, r in replies.items()}
    ppl_before = answer_perplexity(base, tokenizer, texts, labels)
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    n_frozen = sum(p.numel() for p in base.parameters())
    examples = [encode(tokenizer, t, y) for t, y in zip(train["text"], train["label"])]

    runs = []
    for seed in range(seeds):
        base.load_state_dict(base_state)
        torch.manual_seed(seed)
        model = lora.apply_lora(base, list(TARGETS), r=config.r, alpha=config.alpha, dropout=config.dropout)
        result = train_lora(model, examples, tokenizer, config, device=device, seed=seed, n_frozen=n_frozen)
        lora_replies = generate_replies(model, tokenizer, texts)
        lora_scores = task_scores(lora_replies, labels)
        runs.append(dict(seed=seed, accuracy=lora_scores["accuracy"], valid=lora_scores["valid"],
                         right=lora_scores["right"], said=[parse(r) for r in lora_replies],
                         perplexity_after=answer_perplexity(model, tokenizer, texts, labels), **result))
        base = lora.merge_lora(model)  # back to a plain model; the next seed restores the base weights
    base.load_state_dict(base_state)
    timing = compare_with_peft(base, examples, tokenizer, config, device=device)
    for name, r in replies.items():
        scores[name]["said"] = [parse(reply) for reply in r]
    results = dict(config=asdict(config), steps=config.steps, n_frozen=n_frozen, shots=len(shots), labels=labels,
                   ratings=list(test["rating"]), scores=scores, perplexity_before=ppl_before, lora=runs,
                   step_comparison=timing)
    results["versus_prompts"] = {name: asdict(c) for name, c in versus_prompts(results).items()}
    return results


def versus_prompts(results: dict[str, Any]) -> dict[str, Comparison]:
    """LoRA against each prompt, from a record's ``results``: the LoRA runs' per-seed correctness (seeds, snippets)
    against the prompt's, which greedy decoding makes the same for every seed (so it is repeated once per seed);
    :func:`~course_lib.experiments.stats.compare` resamples seeds and snippets together. Keyed by prompt name."""
    if any("right" not in run for run in results["lora"]) or any("right" not in s for s in results["scores"].values()):
        raise ValueError("this lora_causal_lm record predates per-snippet correctness (it has no 'right' lists): "
                         "record it again with `python -m course_lib.experiments lora_causal_lm --profile gpu`.")
    lora_right = np.array([run["right"] for run in results["lora"]], dtype=float)
    return {name: compare(lora_right, np.tile(np.asarray(s["right"], dtype=float), (len(lora_right), 1)),
                          a="LoRA", b=name)
            for name, s in results["scores"].items()}
