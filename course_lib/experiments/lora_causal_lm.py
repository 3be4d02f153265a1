"""The recorded run of lesson 09: zero- and few-shot prompting of SmolLM2-135M-Instruct against LoRA from
several seeds, with paired intervals, and our LoRA step against ``peft``'s.

Explained in notebooks/09_lora_causal_lm_gpu.ipynb. ``python -m course_lib.experiments lora_causal_lm --profile
gpu`` is meant for a GPU; the notebook's live run uses the same functions of ``course_lib.parts.causal_lm``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from course_lib.parts.causal_lm import (answer_perplexity, balanced_shots, compare_with_peft, encode, generate_replies,
                                        run_config, TARGETS, task_scores, train_lora)


def experiment(profile: Any, *, seeds: int = 3, quick: bool = False) -> dict[str, Any]:
    """The recorded run: zero-/few-shot prompting once (greedy, deterministic), then LoRA from each of
    ``seeds`` seeds, each against few-shot with a paired bootstrap interval over the test snippets;
    ours vs ``peft`` step time and memory, timed interleaved and repeated."""
    from course_lib.tools import assets
    from course_lib.parts import lora
    from course_lib.tools.data import load_sentiment
    from course_lib.experiments.stats import paired_bootstrap_gap

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
    few = scores[f"{len(shots)}-shot"]
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
        gap = paired_bootstrap_gap(lora_scores["right"], few["right"])
        runs.append(dict(seed=seed, accuracy=lora_scores["accuracy"], valid=lora_scores["valid"],
                         minus_few_shot=gap, perplexity_after=answer_perplexity(model, tokenizer, texts, labels),
                         **result))
        base = lora.merge_lora(model)  # back to a plain model; the next seed restores the base weights
    base.load_state_dict(base_state)
    timing = compare_with_peft(base, examples, tokenizer, config, device=device)
    return dict(config=asdict(config), steps=config.steps, n_frozen=n_frozen, shots=len(shots),
                scores={k: {m: v for m, v in s.items() if m != "right"} for k, s in scores.items()},
                perplexity_before=ppl_before, lora=runs, step_comparison=timing)
