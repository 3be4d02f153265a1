"""LoRA on a causal chat model: the JSON sentiment task, its exact metric, training and evaluation.

Explained in notebooks/09_lora_causal_lm_gpu.ipynb. The same functions make the recorded `gpu` run
(``course_lib.experiments.lora_causal_lm``), so the notebook and the record run one code path; training
goes through the course's loop (``course_lib.parts.loop``).

The task: given a movie-review snippet, the model answers ``{"sentiment": "positive"}`` or
``{"sentiment": "negative"}`` and nothing else. A reply is *correct* only if it parses as JSON with
exactly that key and the right label, *valid* if it parses and has that shape.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from course_lib.parts.loop import LoopConfig, linear_schedule, train
from course_lib.tools.timing import mfu, timing_section

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
# A picture of one example: its tokens, the turn each belongs to, and which ones the loss scores
# ------------------------------------------------------------------------------------------------

TURN_COLORS = {"special": "#4d4d4d", "system": "#c6dbef", "user": "#c7e9c0", "assistant": "#fdd0a2"}


def token_turns(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """For each token: ``"special"`` for the chat markers, else the role of the turn it belongs to (the text
    between ``<|im_start|>`` and the next newline names it)."""
    start, end = tokenizer.convert_tokens_to_ids("<|im_start|>"), tokenizer.convert_tokens_to_ids("<|im_end|>")
    turns, role = [], "system"
    for k, i in enumerate(ids):
        if i in (start, end):
            turns.append("special")
            if i == start:
                header = tokenizer.decode(list(ids[k + 1:k + 6])).split("\n")[0].strip()
                role = header if header in TURN_COLORS else "user"
            continue
        turns.append(role)
    return turns


def draw_tokens(tokenizer: Any, ids: Sequence[int], labels: Sequence[int] | None = None, *, first: int = 0,
                per_row: int = 12, ax: Any = None, title: str | None = None) -> Any:
    """Tokens ``first`` onwards of one example as a grid of boxes, read left to right, top to bottom.

    Without ``labels`` each box is coloured by its chat turn (:func:`token_turns`). With ``labels`` (09.2's
    training labels) a box is orange where the loss scores the position and light grey where its label is
    ``IGNORE`` (a scored position's label is its own token; the model predicts it from the position before).
    Spaces show as '·', newlines as '↵'; the chat markers as ⟨start⟩ and ⟨end⟩."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    if labels is not None and len(labels) != len(ids):
        raise ValueError(f"ids and labels must be equally long (one label per position), got {len(ids)} and "
                         f"{len(labels)}.")
    shown = list(range(first, len(ids)))
    rows = math.ceil(len(shown) / per_row)
    if ax is None:
        _, ax = plt.subplots(figsize=(per_row * 1.0, 0.55 * rows + 1.3))
    turns = token_turns(tokenizer, ids)
    markers = {"<|im_start|>": "⟨start⟩", "<|im_end|>": "⟨end⟩"}
    for k, position in enumerate(shown):
        row, col = divmod(k, per_row)
        text = tokenizer.decode([ids[position]])
        text = markers.get(text, text.replace(" ", "·").replace("\n", "↵"))
        if labels is None:
            face = TURN_COLORS[turns[position]]
        else:
            face = "#f3f3f3" if labels[position] == IGNORE else "#fd8d3c"
        ax.add_patch(Rectangle((col, -row - 0.9), 0.95, 0.8, fc=face, ec="#555555", lw=0.6))
        ax.text(col + 0.475, -row - 0.5, text[:11], ha="center", va="center", fontsize=7,
                color="white" if labels is None and turns[position] == "special" else "black")
    if labels is None:
        legend = [Patch(fc=c, ec="#555555", label=name) for name, c in TURN_COLORS.items()]
    else:
        legend = [Patch(fc="#f3f3f3", ec="#555555", label=f"label {IGNORE}: ignored by the loss"),
                  Patch(fc="#fd8d3c", ec="#555555", label="label = this token: scored")]
    ax.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=len(legend), fontsize=8,
              frameon=False)
    ax.set_xlim(0, per_row)
    ax.set_ylim(-rows - 0.1, 0.1)
    ax.set_xticks([c + 0.475 for c in range(per_row)], [f"+{c}" for c in range(per_row)], fontsize=7)
    ax.set_yticks([-r - 0.5 for r in range(rows)], [str(first + r * per_row) for r in range(rows)], fontsize=7)
    ax.xaxis.tick_top()
    ax.set_xlabel("offset within the row (tokens)")
    ax.xaxis.set_label_position("top")
    ax.set_ylabel("position of the row's first token")
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(title or f"{len(ids)} tokens" + (f", from position {first}" if first else ""), pad=28)
    return ax


def draw_answers(replies: dict[str, Sequence[str]], labels: Sequence[int], *, ax: Any = None,
                 title: str | None = None) -> Any:
    """One bar per method: on how many test snippets it answered positive, negative, or nothing valid, with
    the number of truly positive snippets marked. A one-colour bar is a method that did not read the snippets."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 0.55 * len(replies) + 1.5))
    names = list(replies)
    left = [0] * len(names)
    kinds = (("answered positive", 1, "#fd8d3c"), ("answered negative", 0, "#6baed6"),
             ("no valid answer", None, "#d9d9d9"))
    for what, value, color in kinds:
        counts = [[parse(reply) for reply in replies[name]].count(value) for name in names]
        ax.barh(names, counts, left=left, color=color, edgecolor="white", label=what)
        left = [a + b for a, b in zip(left, counts)]
    ax.axvline(sum(labels), color="black", ls="--", lw=1, label=f"truly positive: {sum(labels)}")
    ax.set_xlim(0, len(labels))
    ax.invert_yaxis()
    ax.set_xlabel("test snippets (count)")
    ax.set_ylabel("method")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(title or f"What each method answered on {len(labels)} test snippets")
    return ax


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


def causal_lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's own mean cross-entropy over the answer tokens (labels -100 elsewhere)."""
    return model(**batch).loss


def train_lora(model: Any, examples: Sequence, tokenizer: Any, config: RunConfig, *, device: torch.device,
               seed: int, n_frozen: int, progress: bool = False) -> dict[str, Any]:
    """Train the LoRA parameters of ``model`` for ``config.steps`` steps with the course's loop
    (``course_lib.parts.loop``): AdamW without weight decay, warm-up over a tenth of the steps then linear
    decay, clipping at 1, ``config.accumulate`` micro-batches of ``config.micro_batch`` per step, bf16
    autocast on a GPU. Returns the losses, the throughput and (on a GPU) MFU and peak memory."""
    batches = Batches(examples, tokenizer.pad_token_id, device, micro_batch=config.micro_batch,
                      accumulate=config.accumulate, seed=seed)
    micro_batches = (micro for step in itertools.count() for micro in batches.step(step))
    loop_config = LoopConfig(steps=config.steps, lr=config.lr,
                             schedule=linear_schedule(config.lr, max(1, config.steps // 10), config.steps),
                             weight_decay=0.0, betas=(0.9, 0.999), grad_clip=1.0, grad_accum=config.accumulate,
                             log_every=config.steps, progress=progress, desc="LoRA training")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    history = train(model, micro_batches, causal_lm_loss, loop_config, tokens_in=count_tokens,
                    flops_per_token=lora_flops_per_token(n_frozen), device=device)
    seconds = history.seconds
    utilisation = mfu(history.tokens_seen / seconds, lora_flops_per_token(n_frozen), device,
                      amp="bf16" if device.type == "cuda" else "none")
    return dict(losses=history.losses, seconds=seconds, tokens=history.tokens_seen,
                tokens_per_s=history.tokens_seen / seconds, mfu=utilisation.value, mfu_note=str(utilisation),
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


def _timed_step(model: Any, optimizer: torch.optim.Optimizer, micro_batches: list[dict[str, torch.Tensor]],
                device: torch.device) -> float:
    """Seconds of one optimiser step of the course's loop over ``micro_batches`` (learning rate 0: the
    weights do not move, so every repeat times the same model)."""
    config = LoopConfig(steps=1, lr=1.0, schedule=lambda step: 0.0, weight_decay=0.0, betas=(0.9, 0.999),
                        grad_clip=1.0, grad_accum=len(micro_batches), time_steps=True, progress=False)
    history = train(model, iter(micro_batches), causal_lm_loss, config, optimizer=optimizer, device=device)
    return history.step_seconds[0]


def compare_with_peft(base: Any, examples: Sequence, tokenizer: Any, config: RunConfig, *,
                      device: torch.device) -> dict[str, Any]:
    """Step time (and GPU peak memory) of our LoRA, ``peft``'s, and ours with gradient checkpointing, on
    the same micro-batches, timed interleaved (ours, peft, ours + checkpointing, ours, ...)
    ``config.timing_repeats`` times after one warm-up step each; the median and the spread (min, max)."""
    import copy

    from course_lib.parts import lora

    same = Batches(examples, tokenizer.pad_token_id, device, micro_batch=config.micro_batch,
                   accumulate=config.accumulate).step(0)
    ours = lora.apply_lora(copy.deepcopy(base), list(TARGETS), r=config.r, alpha=config.alpha, dropout=0.0)
    checkpointed = lora.apply_lora(copy.deepcopy(base), list(TARGETS), r=config.r, alpha=config.alpha, dropout=0.0)
    set_checkpointing(checkpointed, True)
    models = {"ours": ours, "peft": peft_lora(copy.deepcopy(base), r=config.r, alpha=config.alpha),
              "ours + checkpointing": checkpointed}
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.0)
                  for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    peaks: dict[str, float | None] = {}
    with timing_section():  # the fast kernels, not the reproducible ones; the flag is recorded below
        deterministic = torch.are_deterministic_algorithms_enabled()
        for name, model in models.items():
            _timed_step(model, optimizers[name], same, device)  # warm-up: allocation, kernel choice
        for _ in range(config.timing_repeats):
            for name, model in models.items():
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                times[name].append(1e3 * _timed_step(model, optimizers[name], same, device))
                peaks[name] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    tokens = sum(count_tokens(b) for b in same)
    return {name: dict(ms_median=statistics.median(t), ms_min=min(t), ms_max=max(t), repeats=len(t),
                       tokens_per_s=tokens / (statistics.median(t) / 1e3), peak_gib=peaks[name],
                       deterministic_algorithms=deterministic)
            for name, t in times.items()}
