"""LoRA on a causal chat model: the JSON sentiment task, its exact metric, training and evaluation.

Explained in notebooks/09_lora_causal_lm_gpu.ipynb. The same functions make the recorded `gpu` run
(``python -m course_lib.experiments lora_causal_lm --profile gpu``), so the notebook and the record
run one code path.

The task: given a movie-review snippet, the model answers ``{"sentiment": "positive"}`` or
``{"sentiment": "negative"}`` and nothing else. A reply is *correct* only if it parses as JSON with
exactly that key and the right label, *valid* if it parses and has that shape.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

SYSTEM = "You label the sentiment of movie reviews. You reply with JSON only."
LABELS = ("negative", "positive")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IGNORE = -100  # the label cross-entropy skips (PyTorch's and transformers' convention)


# ------------------------------------------------------------------------------------------------
# The task: chats, answers and the strict metric
# ------------------------------------------------------------------------------------------------


def user_turn(text: str) -> dict[str, str]:
    return {"role": "user", "content": f'Review: "{text}"\nIs the sentiment positive or negative? Answer with '
                                       f'{{"sentiment": "positive"}} or {{"sentiment": "negative"}}.'}


def answer(label: int) -> str:
    """The one correct reply for label 0 (negative) or 1 (positive)."""
    return json.dumps({"sentiment": LABELS[label]})


def chat(text: str, shots: Sequence[tuple[str, int]] = ()) -> list[dict[str, str]]:
    """The messages for one snippet; ``shots`` are (text, label) examples shown as earlier turns."""
    messages = [{"role": "system", "content": SYSTEM}]
    for shot_text, shot_label in shots:
        messages += [user_turn(shot_text), {"role": "assistant", "content": answer(shot_label)}]
    return messages + [user_turn(text)]


def parse(reply: str) -> int | None:
    """The label a reply gives (0 or 1), or None unless it is exactly {"sentiment": "positive"|"negative"}."""
    try:
        obj = json.loads(reply.strip())
    except ValueError:
        return None
    if isinstance(obj, dict) and set(obj) == {"sentiment"} and obj["sentiment"] in LABELS:
        return LABELS.index(obj["sentiment"])
    return None


def task_scores(replies: Sequence[str], labels: Sequence[int]) -> dict[str, Any]:
    """Accuracy, the share of valid replies, and the per-snippet 0/1 correctness (for paired intervals)."""
    parsed = [parse(r) for r in replies]
    right = [int(p == y) for p, y in zip(parsed, labels)]
    return dict(accuracy=sum(right) / len(labels), valid=sum(p is not None for p in parsed) / len(labels),
                right=right)


# ------------------------------------------------------------------------------------------------
# Token ids: prompts, training examples with the prompt masked out of the loss, batches
# ------------------------------------------------------------------------------------------------


def prompt_ids(tokenizer: Any, text: str, shots: Sequence[tuple[str, int]] = ()) -> list[int]:
    """The chat template's token ids up to and including the assistant header."""
    return list(tokenizer.apply_chat_template(chat(text, shots), add_generation_prompt=True)["input_ids"])


def answer_ids(tokenizer: Any, label: int) -> list[int]:
    """The answer's token ids, ending with ``<|im_end|>`` so the model learns to stop."""
    return tokenizer(answer(label) + "<|im_end|>", add_special_tokens=False)["input_ids"]


def encode(tokenizer: Any, text: str, label: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one training example: the labels are the answer's ids, and ``IGNORE``
    at every prompt position, so that the loss is the answer's alone."""
    prompt, reply = prompt_ids(tokenizer, text), answer_ids(tokenizer, label)
    return prompt + reply, [IGNORE] * len(prompt) + reply


def pad(sequences: Sequence[Sequence[int]], value: int, *, left: bool = False) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    return torch.tensor([[value] * (width - len(s)) + list(s) if left else list(s) + [value] * (width - len(s))
                         for s in sequences])


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int,
            device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A right-padded training batch: padding is masked out of attention and, with ``IGNORE``, of the loss."""
    ids, labels = zip(*examples)
    return dict(input_ids=pad(ids, pad_id).to(device),
                attention_mask=pad([[1] * len(i) for i in ids], 0).to(device),
                labels=pad(labels, IGNORE).to(device))


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["attention_mask"].sum())


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on a GPU; nothing on a CPU (the cpu profile trains in float32)."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------
# Evaluation: greedy generation and the perplexity of the right answer
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_replies(model: Any, tokenizer: Any, texts: Sequence[str], shots: Sequence[tuple[str, int]] = (), *,
                     batch_size: int = 16, max_new_tokens: int = 12, progress: Callable | None = None) -> list[str]:
    """Greedy replies, stopping at ``<|im_end|>``. Prompts are padded on the left so that every prompt
    ends where generation starts."""
    model.eval()
    device = next(model.parameters()).device
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    replies: list[str] = []
    for start in range(0, len(texts), batch_size):
        prompts = [prompt_ids(tokenizer, t, shots) for t in texts[start:start + batch_size]]
        input_ids = pad(prompts, tokenizer.pad_token_id, left=True).to(device)
        mask = pad([[1] * len(p) for p in prompts], 0, left=True).to(device)
        with autocast_for(device):
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=im_end, pad_token_id=tokenizer.pad_token_id)
        replies += tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)
        if progress is not None:
            progress(len(prompts))
    return replies


@torch.no_grad()
def answer_perplexity(model: Any, tokenizer: Any, texts: Sequence[str], labels: Sequence[int], *,
                      batch_size: int = 16) -> float:
    """exp of the mean negative log-likelihood of the correct answer's tokens given the zero-shot prompt."""
    model.eval()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        batch = collate([encode(tokenizer, t, y) for t, y in zip(texts[start:start + batch_size],
                                                                  labels[start:start + batch_size])],
                        tokenizer.pad_token_id, device)
        with autocast_for(device):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]  # position t predicts token t + 1
        nll += F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE,
                               reduction="sum").item()
        count += int((targets != IGNORE).sum())
    return math.exp(nll / count)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def training_step(model: Any, optimizer: torch.optim.Optimizer, micro_batches: Sequence[dict]) -> float:
    """One optimiser step over ``micro_batches`` (gradient accumulation); returns the mean loss.

    Each micro-batch's loss is divided by their number, so the summed gradients are those of the mean
    over the large batch.
    """
    model.train()
    device = next(model.parameters()).device
    total = 0.0
    for batch in micro_batches:
        with autocast_for(device):
            loss = model(**batch).loss / len(micro_batches)
        loss.backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


class Batches:
    """Optimiser steps drawn from a fixed shuffled order of the training examples (seeded)."""

    def __init__(self, examples: Sequence[tuple[list[int], list[int]]], pad_id: int, device: torch.device, *,
                 micro_batch: int, accumulate: int, seed: int = 0) -> None:
        self.examples, self.pad_id, self.device = list(examples), pad_id, device
        self.micro_batch, self.accumulate = micro_batch, accumulate
        self.order = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(seed)).tolist()

    def step(self, step: int) -> list[dict[str, torch.Tensor]]:
        size = self.micro_batch * self.accumulate
        index = [self.order[(step * size + i) % len(self.order)] for i in range(size)]
        return [collate([self.examples[i] for i in index[k:k + self.micro_batch]], self.pad_id, self.device)
                for k in range(0, size, self.micro_batch)]


def lora_flops_per_token(n_frozen: int) -> float:
    """Training FLOPs per token with frozen weights: 2N forward + 2N backward for the input gradients
    (no weight gradients, so not the 6N of full training); attention's own FLOPs are left out."""
    return 4.0 * n_frozen


def set_checkpointing(model: Any, enabled: bool) -> None:
    """Gradient (activation) checkpointing on or off: fewer activations kept, one more forward pass.

    transformers 5.23 calls it ``activation_checkpointing_enable`` and deprecates the older
    ``gradient_checkpointing_enable``, which 5.17 (the GPU machine's) still needs; use whichever exists.
    The KV cache is switched off first: it is useless in training and transformers would warn about it.
    """
    model.config.use_cache = not enabled
    name = "activation_checkpointing" if hasattr(model, "activation_checkpointing_enable") else "gradient_checkpointing"
    getattr(model, f"{name}_{'enable' if enabled else 'disable'}")()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------
# Sizes per profile, and the whole run (what the notebook does, as one function for the record)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    n_train: int
    n_test: int
    n_shots: int
    micro_batch: int
    accumulate: int
    epochs: float
    lr: float
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    timing_repeats: int = 3

    @property
    def steps(self) -> int:
        return max(1, math.ceil(self.epochs * self.n_train / (self.micro_batch * self.accumulate)))


def run_config(profile_name: str) -> RunConfig:
    """The sizes of each profile: ci is a seconds-long smoke test; cpu fits a laptop's few minutes; gpu is
    the full run (the whole movie-review training split once, 400 test snippets)."""
    return {
        "ci": RunConfig(n_train=16, n_test=8, n_shots=2, micro_batch=4, accumulate=1, epochs=1, lr=1e-3,
                        timing_repeats=1),
        "cpu": RunConfig(n_train=256, n_test=96, n_shots=4, micro_batch=8, accumulate=1, epochs=1, lr=1e-3),
        "gpu": RunConfig(n_train=8000, n_test=1000, n_shots=4, micro_batch=32, accumulate=1, epochs=1, lr=3e-4,
                         timing_repeats=10),
    }[profile_name]


def balanced_shots(train: Any, n_shots: int, seed: int = 1) -> list[tuple[str, int]]:
    """``n_shots`` training snippets, alternating negative and positive."""
    shuffled = train.shuffle(seed=seed)
    negatives = [r for r in shuffled if r["label"] == 0][: n_shots - n_shots // 2]
    positives = [r for r in shuffled if r["label"] == 1][: n_shots // 2]
    return [(row["text"], row["label"]) for pair in zip(negatives, positives) for row in pair]


def experiment(profile: Any, *, seeds: int = 3, quick: bool = False) -> dict[str, Any]:
    """The recorded run: zero-/few-shot prompting once (greedy, deterministic), then LoRA from each of
    ``seeds`` seeds, each against few-shot with a paired bootstrap interval over the test snippets;
    ours vs ``peft`` step time and memory, timed interleaved and repeated."""
    from course_lib.tools import assets
    from course_lib.parts import lora
    from course_lib.tools.data import load_sentiment
    from course_lib.parts.finetune import paired_bootstrap_gap

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


def train_lora(model: Any, examples: Sequence, tokenizer: Any, config: RunConfig, *, device: torch.device,
               seed: int, n_frozen: int, progress: Callable | None = None) -> dict[str, Any]:
    """Train the LoRA parameters of ``model`` for ``config.steps`` steps; returns losses and throughput."""
    from course_lib.parts.finetune import warmup_linear_decay
    from course_lib.parts.train import mfu

    batches = Batches(examples, tokenizer.pad_token_id, device, micro_batch=config.micro_batch,
                      accumulate=config.accumulate, seed=seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=0.0)
    warmup = max(1, config.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_linear_decay(s + 1, warmup, config.steps + 1))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, tokens = [], 0
    sync(device)
    start = time.perf_counter()
    for step in range(config.steps):
        micro = batches.step(step)
        losses.append(training_step(model, optimizer, micro))
        schedule.step()
        tokens += sum(count_tokens(b) for b in micro)
        if progress is not None:
            progress(1)
    sync(device)
    seconds = time.perf_counter() - start
    utilisation = mfu(tokens / seconds, lora_flops_per_token(n_frozen), device,
                      amp="bf16" if device.type == "cuda" else "none")
    return dict(losses=losses, seconds=seconds, tokens=tokens, tokens_per_s=tokens / seconds,
                mfu=utilisation.value, mfu_note=str(utilisation),
                deterministic_algorithms=torch.are_deterministic_algorithms_enabled(),
                peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)


def peft_lora(base: Any, *, r: int, alpha: float, targets: Sequence[str] = TARGETS) -> Any:
    """``peft``'s LoRA with the given rank, scale and targets (dropout off: for timing and equality)."""
    import warnings

    import peft

    with warnings.catch_warnings():
        # peft 0.21 reads `model.is_gradient_checkpointing`, which transformers 5 deprecates with a
        # FutureWarning; the notice is about peft's code, not ours, and changes nothing here.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                         target_modules=list(targets)))


def compare_with_peft(base: Any, examples: Sequence, tokenizer: Any, config: RunConfig, *,
                      device: torch.device) -> dict[str, Any]:
    """Step time (and GPU peak memory) of our LoRA, ``peft``'s, and ours with gradient checkpointing, on
    the same micro-batches, timed interleaved (ours, peft, ours + checkpointing, ours, ...)
    ``config.timing_repeats`` times after one warm-up step each; the median and the spread (min, max)."""
    import copy

    from course_lib.parts import lora
    from course_lib.tools.profiles import timing_section

    same = Batches(examples, tokenizer.pad_token_id, device, micro_batch=config.micro_batch,
                   accumulate=config.accumulate).step(0)
    ours = lora.apply_lora(copy.deepcopy(base), list(TARGETS), r=config.r, alpha=config.alpha, dropout=0.0)
    checkpointed = lora.apply_lora(copy.deepcopy(base), list(TARGETS), r=config.r, alpha=config.alpha, dropout=0.0)
    set_checkpointing(checkpointed, True)
    models = {"ours": ours, "peft": peft_lora(copy.deepcopy(base), r=config.r, alpha=config.alpha), "ours + checkpointing": checkpointed}
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.0)
                  for name, m in models.items()}  # lr 0: timing only, the weights do not move
    times: dict[str, list[float]] = {name: [] for name in models}
    peaks: dict[str, float | None] = {}
    with timing_section():  # the fast kernels, not the reproducible ones; the flag is recorded below
        deterministic = torch.are_deterministic_algorithms_enabled()
        for name, model in models.items():
            training_step(model, optimizers[name], same)  # warm-up: allocation, kernel choice
        for _ in range(config.timing_repeats):
            for name, model in models.items():
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                sync(device)
                start = time.perf_counter()
                training_step(model, optimizers[name], same)
                sync(device)
                times[name].append(1e3 * (time.perf_counter() - start))
                peaks[name] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    tokens = sum(count_tokens(b) for b in same)
    return {name: dict(ms_median=statistics.median(t), ms_min=min(t), ms_max=max(t), repeats=len(t),
                       tokens_per_s=tokens / (statistics.median(t) / 1e3), peak_gib=peaks[name],
                       deterministic_algorithms=deterministic)
            for name, t in times.items()}
